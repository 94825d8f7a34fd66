//! TLS choices of reverse buildlets: a CA file instead of a pin, a wrong
//! pin, plaintext only when both sides allow it, a key pin that survives
//! certificate renewal; and the coordinator's ALPN (HTTP/2 when chosen).

use crate::common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Bot, Coordinator, FARMER, Lines, TestRepo, config, openssl};
use std::sync::Arc;

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
    let mut child = common::Reaped(
        Command::new(FARMER)
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
            .unwrap(),
    );
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
        (common::Reaped(c), lines)
    };
    let (mut bot, log) = run_bot(&format!("-ca-file={}", ca_pem.display()));
    assert!(
        log.wait_for("registered with the coordinator", Duration::from_secs(20)),
        "{}",
        log.all()
    );
    let _ = bot.kill();
    let _ = bot.wait();
    // A CA file of another CA: the coordinator's certificate is refused,
    // and the buildlet never registers.
    let other_key = rcgen::KeyPair::generate().unwrap();
    let mut other_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    other_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    other_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "another farm's CA");
    let other_ca = other_params.self_signed(&other_key).unwrap();
    let other_pem = dir.path().join("other-ca.pem");
    std::fs::write(&other_pem, other_ca.pem()).unwrap();
    let (mut bot, log) = run_bot(&format!("-ca-file={}", other_pem.display()));
    assert!(
        log.wait_for("certificate", Duration::from_secs(20)),
        "{}",
        log.all()
    );
    let refused = log.all();
    assert!(
        refused.contains("UnknownIssuer") || refused.contains("unknown issuer"),
        "{refused}"
    );
    assert!(
        !refused.contains("registered with the coordinator"),
        "{refused}"
    );
    let _ = bot.kill();
    let _ = bot.wait();
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

/// GETs `path` over TLS offering `alpn`, trusting the coordinator by `pin`.
/// Returns the negotiated ALPN, the response's HTTP version and its body.
fn tls_get(
    addr: &str,
    pin: &str,
    alpn: &[&[u8]],
    path: &str,
) -> (Option<Vec<u8>>, http::Version, String) {
    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tls = farmtls::Tls::Pinned(farmtls::parse_pin(pin).unwrap());
        let mut cfg = Arc::unwrap_or_clone(farmtls::client_config(&tls).unwrap().unwrap());
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .unwrap();
        let negotiated = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let empty = http_body_util::Empty::<bytes::Bytes>::new();
        let io = TokioIo::new(stream);
        let resp = if negotiated.as_deref() == Some(b"h2") {
            let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            let req = http::Request::get(format!("https://{addr}{path}"))
                .body(empty)
                .unwrap();
            send.send_request(req).await.unwrap()
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            let req = http::Request::get(path)
                .header("host", addr)
                .body(empty)
                .unwrap();
            send.send_request(req).await.unwrap()
        };
        let version = resp.version();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (
            negotiated,
            version,
            String::from_utf8_lossy(&body).into_owned(),
        )
    })
}

#[test]
fn http2_over_tls_when_alpn_chooses_it_and_reverse_still_upgrades() {
    let (dir, cfg) = farm();
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let (alpn, version, body) = tls_get(
        &c.addr,
        &c.fingerprint,
        &[b"h2", b"http/1.1"],
        "/api/status",
    );
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(version, http::Version::HTTP_2);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["tls_spki_pin"], c.fingerprint.as_str());
    assert_eq!(status["tls_fingerprint"], c.cert_pin.as_str());
    // Clients that ask for HTTP/1.1, or do not use ALPN, get HTTP/1.1.
    let (alpn, version, _) = tls_get(&c.addr, &c.fingerprint, &[b"http/1.1"], "/api/status");
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(version, http::Version::HTTP_11);
    let (alpn, version, _) = tls_get(&c.addr, &c.cert_pin, &[], "/api/status");
    assert_eq!(alpn, None);
    assert_eq!(version, http::Version::HTTP_11);
    // curl, an independent client, agrees (when it is built with HTTP/2).
    let curl_h2 = Command::new("curl")
        .arg("-V")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("HTTP2"));
    if curl_h2 {
        let url = format!("https://{}/api/status", c.addr);
        for (flag, want) in [("--http2", "2"), ("--http1.1", "1.1")] {
            let o = Command::new("curl")
                .args([
                    "-sk",
                    flag,
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_version}",
                    &url,
                ])
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&o.stdout), want, "curl {flag}");
        }
    } else {
        eprintln!("curl without HTTP/2: checked with the hyper client only");
    }
    // The buildlet's /reverse upgrade (TLS without ALPN, HTTP/1.1) still works.
    let key = c.key("host-test-trusted");
    let _bot = Bot::start(
        &c,
        &dir.path().join("bots"),
        "host-test-trusted",
        "h2-era",
        Some(&key),
    );
    c.wait_connected(1);
}

/// The pins of a certificate file as openssl computes them (not farmer).
fn openssl_pins(cert: &std::path::Path) -> (String, String) {
    let cert = cert.to_str().unwrap();
    let dgst = |der: &[u8]| {
        let out = String::from_utf8(openssl(&["dgst", "-sha256", "-r"], der)).unwrap();
        out.split_whitespace().next().unwrap().to_string()
    };
    let pubkey = openssl(&["x509", "-in", cert, "-pubkey", "-noout"], b"");
    let spki = openssl(&["pkey", "-pubin", "-outform", "der"], &pubkey);
    let der = openssl(&["x509", "-in", cert, "-outform", "der"], b"");
    (format!("spki-sha256:{}", dgst(&spki)), dgst(&der))
}

#[test]
fn key_pin_survives_renewing_the_certificate_with_the_same_key() {
    let (dir, cfg) = farm();
    let data = dir.path().join("data");
    let cert = data.join("tls").join("cert.pem");
    let mut c = Coordinator::start(&data, &cfg);
    // The banner's pins are the standard ones.
    assert!(
        c.fingerprint.starts_with("spki-sha256:"),
        "{}",
        c.fingerprint
    );
    assert_eq!(
        openssl_pins(&cert),
        (c.fingerprint.clone(), c.cert_pin.clone())
    );
    let key = c.key("host-test-trusted");
    let bots = dir.path().join("bots");
    let _bot = Bot::start(&c, &bots, "host-test-trusted", "keypinned", Some(&key));
    c.wait_connected(1);

    // The admin renews the certificate with the same key (with openssl, as
    // one would for a real certificate) and restarts the coordinator.
    let (addr, old_cert_pin, key_pin) = (c.addr.clone(), c.cert_pin.clone(), c.fingerprint.clone());
    c.kill();
    let key_file = data.join("tls").join("key.pem");
    openssl(
        &[
            "req",
            "-new",
            "-x509",
            "-key",
            key_file.to_str().unwrap(),
            "-subj",
            "/CN=farmer coordinator renewed",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-days",
            "30",
            "-out",
            cert.to_str().unwrap(),
        ],
        b"",
    );
    let c = Coordinator::start_on(&data, &cfg, &addr);
    assert_eq!(c.fingerprint, key_pin);
    assert_ne!(c.cert_pin, old_cert_pin);
    // The machine pinned to the key comes back by itself.
    c.wait(
        "the key-pinned bot to reconnect",
        Duration::from_secs(60),
        |c| (c.connected() == ["keypinned"]).then_some(()),
    );
    // A machine pinned to the old certificate is stranded (why the key pin
    // exists), and a wrong key pin is refused.
    let old = Bot::start_pinned(
        &c,
        &bots,
        "host-test-trusted",
        "certpinned",
        Some(&key),
        &old_cert_pin,
        &[],
    );
    assert!(
        old.log.wait_for(
            "certificate does not match the pinned SHA-256",
            Duration::from_secs(20)
        ),
        "{}",
        old.log.all()
    );
    let wrong = format!("spki-sha256:{}", "ab".repeat(32));
    let bad = Bot::start_pinned(
        &c,
        &bots,
        "host-test-trusted",
        "wrongkey",
        Some(&key),
        &wrong,
        &[],
    );
    assert!(
        bad.log.wait_for(
            "public key does not match the pinned SHA-256",
            Duration::from_secs(20)
        ),
        "{}",
        bad.log.all()
    );
    // And the message says what the coordinator presented, to pin it knowingly.
    assert!(bad.log.all().contains(&key_pin), "{}", bad.log.all());
    assert_eq!(c.connected(), vec!["keypinned".to_string()]);
}
