//! A second real port: the linux/arm64 buildlet (built by
//! `scripts/cross.sh`) run under qemu-user next to a native coordinator.
//! `scripts/test` builds it and sets `FARMER_ARM64_DIR`; without it this
//! test fails and says how to get it — it is never skipped silently.

use crate::common;

use std::os::unix::process::CommandExt;
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
    let child = Command::new("qemu-aarch64-static")
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
        .process_group(0)
        .spawn()
        .expect("qemu-aarch64-static (run scripts/cross.sh to install it)");
    // The buildlet's commands run in its group: they go with the test.
    let mut child = common::Stopped(child);
    let log = Lines::follow(child.stderr.take().unwrap());
    // Its binary facts are recorded just after it joins the pool.
    let m = c.wait("the arm64 machine", Duration::from_secs(60), |c| {
        c.get("/api/machines")["connected"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["hostname"] == "arm64-qemu" && m["binary"]["platform"] != "")
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

/// A copy of the arm64 buildlet with `tag` appended: a distinct release.
fn arm64_release(dir: &std::path::Path, tag: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut data = std::fs::read(arm64("buildlet")).unwrap();
    data.extend_from_slice(format!("\nrelease {tag}\n").as_bytes());
    let out = dir.join(format!("buildlet-arm64-{tag}"));
    std::fs::write(&out, data).unwrap();
    out
}

fn publish_arm64(c: &Coordinator, file: &std::path::Path, version: &str) {
    let out = Command::new(common::FARMER)
        .args(["buildlet", "publish", "--os", "linux", "--arch", "arm64"])
        .arg(file)
        .arg("--data-dir")
        .arg(&c.data_dir)
        .args(["--version", version])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "publish {version}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_arm64_stage0_fetches_verifies_and_runs_arm64_releases_and_moves_to_a_new_one() {
    let stage0 = arm64("stage0");
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    repo.commit("one", &[("file", "tree contents\n")]);
    let cfg = dir.path().join("farm.toml");
    std::fs::write(&cfg, config(&repo.path, BUILDER)).unwrap();
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let bin = dir.path().join("bin");
    publish_arm64(&c, &arm64_release(&bin, "v1"), "v1");
    let release_key = std::fs::read_to_string(c.data_dir.join("release").join("release.pub"))
        .unwrap()
        .trim()
        .to_string();
    let key_file = dir.path().join("builder.key");
    std::fs::write(&key_file, c.key("host-test-trusted")).unwrap();
    // Started through qemu; the buildlet it downloads runs through the
    // kernel's binfmt_misc registration (scripts/cross.sh sets it up).
    let child = Command::new("qemu-aarch64-static")
        .arg(&stage0)
        .arg(format!("-coordinator={}", c.addr))
        .arg(format!("-tls-pin={}", c.fingerprint))
        .arg(format!("-release-key={release_key}"))
        .arg(format!("-dir={}", dir.path().join("s0").display()))
        .arg("-reverse-type=host-test-trusted")
        .arg("-hostname=arm64-s0")
        .arg(format!("-workdir={}", dir.path().join("wd").display()))
        .arg(format!("-key-file={}", key_file.display()))
        .arg("-loop")
        .env("HOME", dir.path())
        .env("STAGE0_LOG", "info")
        .env("BUILDLET_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("qemu-aarch64-static (run scripts/cross.sh to install it)");
    // stage0 runs the buildlet as its child: the group goes with the test.
    let mut child = common::Stopped(child);
    let log = Lines::follow(child.stdout.take().unwrap());
    log.also(child.stderr.take().unwrap());
    let on = |version: &str| {
        let want = version.to_string();
        c.wait(
            &format!("the arm64 machine on {version}"),
            Duration::from_secs(180),
            |c| {
                c.get("/api/machines")["connected"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|m| m["hostname"] == "arm64-s0" && m["binary"]["release"] == want)
                    .cloned()
            },
        )
    };
    let m = on("v1");
    assert_eq!(m["binary"]["platform"], "linux/aarch64", "{m}");
    assert_eq!(m["binary"]["stage0"], true, "{m}");
    assert!(
        log.all().contains("downloaded and verified"),
        "{}",
        log.all()
    );
    let builds = c.wait_builds_done(1, Duration::from_secs(120));
    assert_eq!(builds[0]["status"], "passed", "{}", builds[0]);
    // A new arm64 release moves it.
    publish_arm64(&c, &arm64_release(&bin, "v2"), "v2");
    on("v2");
    // SIGTERM: stage0 passes it on and both stop.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the arm64 stage0 did not stop:\n{}", log.all());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn farmer_up_runs_a_real_arm64_buildlet_for_its_arm64_host_type_when_one_is_built() {
    let buildlet = arm64("buildlet");
    let dir = tempfile::tempdir().unwrap();
    let mut child = common::Stopped(
        Command::new(common::FARMER)
            .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("farm"))
            .env("FARMER_ARM64_BUILDLET", &buildlet)
            .env("FARMER_LOG", "info,sqlx=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap(),
    );
    let (log, addr) = Lines::follow_announcing(child.stdout.take().unwrap());
    log.also(child.stderr.take().unwrap());
    let addr = match addr.recv_timeout(Duration::from_secs(60)) {
        Ok(l) => l.trim_start_matches("listening on ").trim().to_string(),
        Err(_) => panic!("farmer up did not start:\n{}", log.all()),
    };
    let machines = || -> serde_json::Value {
        serde_json::from_str(&common::http_get(&format!("http://{addr}/api/machines"))).unwrap()
    };
    let start = std::time::Instant::now();
    let arm = loop {
        let found = machines()["connected"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["host_type"] == "host-linux-arm64-sim" && m["binary"]["platform"] != "")
            .cloned();
        if let Some(m) = found {
            break m;
        }
        if start.elapsed() > Duration::from_secs(90) {
            panic!("no arm64 machine:\n{}", log.all());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = log.all();
    drop(child);
    assert_eq!(arm["binary"]["platform"], "linux/aarch64", "{arm}");
    assert!(
        text.contains("runs a real arm64 buildlet under emulation"),
        "{text}"
    );
    let written = std::fs::read_to_string(dir.path().join("farm").join("farmer.toml")).unwrap();
    assert!(
        written.contains(&format!(
            "{:?}",
            buildlet.canonicalize().unwrap().display().to_string()
        )),
        "{written}"
    );
}
