//! TLS choices of reverse buildlets: a CA file instead of a pin, a wrong
//! pin, and plaintext only when both sides allow it.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Bot, Coordinator, FARMER, Lines, TestRepo, config};

fn farm() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    repo.commit("one", &[("x", "x")]);
    let cfg = dir.path().join("farm.toml");
    std::fs::write(&cfg, config(&repo.path, "")).unwrap();
    (dir, cfg)
}

#[test]
fn buildlet_trusts_a_ca_file() {
    let (dir, cfg) = farm();
    // A CA and a server certificate for 127.0.0.1 made by the admin.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test farm CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let pem = dir.path().join("server.pem");
    let key_pem = dir.path().join("server.key");
    let ca_pem = dir.path().join("ca.pem");
    std::fs::write(&pem, cert.pem()).unwrap();
    std::fs::write(&key_pem, key.serialize_pem()).unwrap();
    std::fs::write(&ca_pem, ca_cert.pem()).unwrap();

    let data = dir.path().join("data");
    let mut child = Command::new(FARMER)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(&data)
        .arg("--tls-cert")
        .arg(&pem)
        .arg("--tls-key")
        .arg(&key_pem)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let keyout = Command::new(FARMER)
        .args(["genbuilderkey", "host-test-trusted", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let bkey = dir.path().join("bkey");
    std::fs::write(&bkey, &keyout.stdout).unwrap();
    let run_bot = |extra: &str| {
        let mut c = Command::new(FARMER)
            .arg("buildlet")
            .arg(format!("-coordinator={addr}"))
            .arg("-reverse-type=host-test-trusted")
            .arg("-hostname=ca-bot")
            .arg(format!("-key-file={}", bkey.display()))
            .arg(format!("-workdir={}", dir.path().join("wd").display()))
            .arg(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Lines::follow(c.stderr.take().unwrap());
        (c, lines)
    };
    let (mut bot, log) = run_bot(&format!("-ca-file={}", ca_pem.display()));
    assert!(
        log.wait_for("registered with the coordinator", Duration::from_secs(20)),
        "{}",
        log.all()
    );
    let _ = bot.kill();
    // A pin that does not match is refused by the buildlet itself.
    let (mut bot, log) = run_bot(&format!("-tls-pin={}", "ab".repeat(32)));
    assert!(
        log.wait_for("does not match the pinned SHA-256", Duration::from_secs(20)),
        "{}",
        log.all()
    );
    let _ = bot.kill();
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn plaintext_needs_both_sides() {
    let (dir, cfg) = farm();
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let key = c.key("host-test-trusted");
    let bot = Bot::start_args(
        &c,
        &dir.path().join("bots"),
        "host-test-trusted",
        "plain",
        Some(&key),
        &["-insecure-plaintext"],
    );
    assert!(
        bot.log
            .wait_for("accepts buildlets only over TLS", Duration::from_secs(20)),
        "{}",
        bot.log.all()
    );
    assert!(c.connected().is_empty());
}
