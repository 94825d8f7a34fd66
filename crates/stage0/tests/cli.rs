//! The `stage0` binary itself: settings errors say what to do, and the help
//! lists the Go-style flags. (Downloading, verifying and running buildlets
//! against a real coordinator is tested in `crates/coordinator/tests/stage0.rs`.)

use std::process::Command;

const STAGE0: &str = env!("CARGO_BIN_EXE_stage0");

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(STAGE0)
        .args(args)
        .env_remove("GO_BUILDER_ENV")
        .env_remove("FARMER_STAGE0_CONFIG")
        .env_remove("FARMER_COORDINATOR")
        .env_remove("FARMER_RELEASE_KEY")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn missing_settings_are_explained() {
    let (code, _, err) = run(&[]);
    assert_eq!(code, 2);
    assert!(err.contains("no coordinator: pass -coordinator"), "{err}");

    let (code, _, err) = run(&["-coordinator=farm.example", "-reverse-type=host-a"]);
    assert_eq!(code, 2);
    assert!(err.contains("no release key"), "{err}");
    assert!(err.contains("/stage0/release-key"), "{err}");

    let key = "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29";
    let (code, _, err) = run(&["-coordinator=farm.example", &format!("-release-key={key}")]);
    assert_eq!(code, 2);
    assert!(err.contains("-reverse-type"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("s0.toml");
    std::fs::write(
        &cfg,
        "coordinator = \"farm.example\"\nrelese_key = \"typo\"\n",
    )
    .unwrap();
    let (code, _, err) = run(&[&format!("-config={}", cfg.display())]);
    assert_eq!(code, 2);
    assert!(err.contains("relese_key"), "{err}");
}

#[test]
fn help_lists_the_flags() {
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--coordinator",
        "--release-key",
        "--reverse-type",
        "--hostname",
        "--workdir",
        "--key-file",
        "--tls-pin",
        "--ca-file",
        "--loop",
        "--network-wait",
        "GO_BUILDER_ENV",
    ] {
        assert!(out.contains(flag), "{flag} missing from:\n{out}");
    }
}
