//! A second real port: the linux/arm64 buildlet (built by
//! `scripts/cross.sh`) run under qemu-user next to a native coordinator.
//! `scripts/test` builds it and sets `FARMER_ARM64_DIR`; without it this
//! test fails and says how to get it — it is never skipped silently.

use crate::common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Coordinator, Lines, TestRepo, config};

/// An arm64 binary built by `scripts/cross.sh`.
fn arm64(name: &str) -> PathBuf {
    let dir = std::env::var_os("FARMER_ARM64_DIR").unwrap_or_else(|| {
        panic!(
            "the arm64 port test needs the arm64 binaries and qemu-user: run scripts/test \
             (it runs scripts/cross.sh), or run scripts/cross.sh and set FARMER_ARM64_DIR \
             to the directory it prints"
        )
    });
    let p = PathBuf::from(dir).join(name);
    assert!(
        p.is_file(),
        "{} is missing; run scripts/cross.sh",
        p.display()
    );
    p
}

const BUILDER: &str = r#"
[builders.on-arm64]
host = "host-test-trusted"
repos = ["r"]
[[builders.on-arm64.steps]]
name = "test"
run = "echo built on $FARMER_HOST_TYPE; cat file"
"#;

#[test]
fn the_arm64_buildlet_under_emulation_registers_reports_aarch64_and_builds() {
    let buildlet = arm64("buildlet");
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    repo.commit("one", &[("file", "tree contents\n")]);
    let cfg = dir.path().join("farm.toml");
    std::fs::write(&cfg, config(&repo.path, BUILDER)).unwrap();
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let key_file = dir.path().join("builder.key");
    std::fs::write(&key_file, c.key("host-test-trusted")).unwrap();
    // No -L: the distribution's arm64 C library (see scripts/cross.sh).
    let mut child = Command::new("qemu-aarch64-static")
        .arg(&buildlet)
        .arg(format!("-coordinator={}", c.addr))
        .arg("-reverse-type=host-test-trusted")
        .arg("-hostname=arm64-qemu")
        .arg(format!("-key-file={}", key_file.display()))
        .arg(format!("-tls-pin={}", c.fingerprint))
        .arg(format!("-workdir={}", dir.path().join("wd").display()))
        .env("BUILDLET_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-aarch64-static (run scripts/cross.sh to install it)");
    let log = Lines::follow(child.stderr.take().unwrap());
    let m = c.wait("the arm64 machine", Duration::from_secs(60), |c| {
        c.get("/api/machines")["connected"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["hostname"] == "arm64-qemu")
            .cloned()
    });
    assert_eq!(
        m["binary"]["platform"],
        "linux/aarch64",
        "{m}\n{}",
        log.all()
    );
    let builds = c.wait_builds_done(1, Duration::from_secs(120));
    assert_eq!(
        builds[0]["status"],
        "passed",
        "{}\n{}",
        builds[0],
        log.all()
    );
    let out = c.get_text(&format!("/api/builds/{}/log", builds[0]["id"]));
    assert!(out.contains("built on host-test-trusted"), "{out}");
    assert!(out.contains("tree contents"), "{out}");
    assert!(out.contains("on arm64-qemu"), "{out}");
    let _ = child.kill();
    let _ = child.wait();
}
