//! The `farmer` command line: config checking, refusing broken configs,
//! reload keeping the old config, genbuilderkey, a taken port.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Coordinator, FARMER, TestRepo, config};

#[test]
fn check_config_reports_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(&f, "[hosts.host-a]\npool = \"reverse\"\n\n[builders.b]\nhost = \"host-missing\"\n[[builders.b.steps]]\nname = \"s\"\nrun = \"true\"\n").unwrap();
    let out = Command::new(FARMER)
        .arg("check-config")
        .arg(&f)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:5", f.display())), "{err}");
    assert!(err.contains("builders.b.host"), "{err}");
    assert!(err.contains("host-missing"), "{err}");

    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[hosts.host-a]\npool = \"reverse\"\n").unwrap();
    let out = Command::new(FARMER)
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

#[test]
fn serve_refuses_a_broken_config_and_reload_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[hosts.nothost]\npool = \"reverse\"\n").unwrap();
    let out = Command::new(FARMER)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&bad)
        .arg("--data-dir")
        .arg(dir.path().join("d0"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not starting") && err.contains("nothost"),
        "{err}"
    );

    let mut repo = TestRepo::new(&dir.path().join("repo"));
    repo.commit("one", &[("x", "x")]);
    let cfg = dir.path().join("farm.toml");
    std::fs::write(&cfg, config(&repo.path, "")).unwrap();
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let hosts = c.get("/api/hosts");
    assert_eq!(hosts.as_array().unwrap().len(), 2);
    // Break the file and send SIGHUP: the old config stays.
    std::fs::write(&cfg, "this is = = not toml").unwrap();
    unsafe_sighup(c.child.id());
    assert!(
        c.err
            .wait_for("keeping the old config", Duration::from_secs(10)),
        "{}",
        c.err.all()
    );
    assert_eq!(c.get("/api/hosts").as_array().unwrap().len(), 2);
    // A good edit is picked up.
    let mut text = config(&repo.path, "");
    text.push_str("\n[hosts.host-new]\npool = \"reverse\"\n");
    std::fs::write(&cfg, text).unwrap();
    unsafe_sighup(c.child.id());
    c.wait("the new host type", Duration::from_secs(10), |c| {
        (c.get("/api/hosts").as_array().unwrap().len() == 3).then_some(())
    });
}

fn unsafe_sighup(pid: u32) {
    let out = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(out.success());
}

#[test]
fn taken_port_is_a_clear_error() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("farm.toml");
    std::fs::write(&cfg, "").unwrap();
    let out = Command::new(FARMER)
        .args(["serve", "--listen", &addr, "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(dir.path().join("d"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
}

#[test]
fn genbuilderkey_binary_matches_the_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    // No master key yet: a clear error.
    let out = Command::new(env!("CARGO_BIN_EXE_genbuilderkey"))
        .arg("host-x")
        .arg(format!("-data-dir={}", dir.path().display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("master key"));
    std::fs::write(dir.path().join("master.key"), "11".repeat(32)).unwrap();
    let a = Command::new(env!("CARGO_BIN_EXE_genbuilderkey"))
        .arg("host-x")
        .arg(format!("-data-dir={}", dir.path().display()))
        .output()
        .unwrap();
    let b = Command::new(FARMER)
        .args(["genbuilderkey", "host-x", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(a.status.success() && b.status.success());
    assert_eq!(a.stdout, b.stdout);
    assert_eq!(String::from_utf8_lossy(&a.stdout).trim().len(), 64);
}
