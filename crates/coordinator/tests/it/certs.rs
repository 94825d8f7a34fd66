//! Certificate onboarding end to end with real processes and real
//! certificates: genbotcert → request → approve → machine-tokend → the bot
//! takes a build; and every refusal of the token endpoint and of bots.

use crate::common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Coordinator, FARMER, Lines, TestRepo, http_post, openssl};

const HOST: &str = "linux-riscv64-alice";

fn farmer(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(FARMER)
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

struct Farm {
    _dir: tempfile::TempDir,
    c: Coordinator,
    owner: std::path::PathBuf,
}

fn start() -> Farm {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    repo.commit("one", &[("x", "x")]);
    let cfg = dir.path().join("farm.toml");
    let text = format!(
        r#"[farm]
heartbeat = "1s"
heartbeat_timeout = "30s"
park_after = "1s"

[repos.r]
url = "{}"
poll_interval = "300ms"

[hosts.host-linux-riscv64]
pool = "reverse"
expected = 1

[builders.linux-riscv64]
host = "host-linux-riscv64"
[[builders.linux-riscv64.steps]]
name = "hello"
run = "echo hello from $(hostname) on $FARMER_HOST_TYPE"
"#,
        repo.path.display()
    );
    std::fs::write(&cfg, text).unwrap();
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let owner = dir.path().join("owner");
    std::fs::create_dir_all(&owner).unwrap();
    Farm {
        _dir: dir,
        c,
        owner,
    }
}

impl Farm {
    fn url(&self) -> String {
        format!("http://{}", self.c.addr)
    }

    fn admin(&self, args: &[&str]) -> (bool, String, String) {
        let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        a.extend([
            "--coordinator".into(),
            self.url(),
            "--data-dir".into(),
            self.c.data_dir.display().to_string(),
        ]);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        farmer(&refs)
    }

    /// genbotcert + submit + approve + fetch the certificate. Returns (key, cert) paths.
    fn onboard(&self, host: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let owner = self.owner.display().to_string();
        let (ok, out, err) = farmer(&[
            "genbotcert",
            &format!("-bot-hostname={host}"),
            &format!("-out-dir={owner}"),
        ]);
        assert!(ok, "{out}{err}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let key = self.owner.join(format!("{host}.key"));
            assert_eq!(
                std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        self.onboard_files(host)
    }

    /// submit + approve + fetch for the OWNER/HOST.key and .csr already there.
    fn onboard_files(&self, host: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let key = self.owner.join(format!("{host}.key"));
        let csr = self.owner.join(format!("{host}.csr"));
        let (ok, out, err) = self.admin(&[
            "request",
            "submit",
            "--hostname",
            host,
            "--csr",
            csr.to_str().unwrap(),
            "--contact",
            "alice@example.com",
            "--notes",
            "a VisionFive 2 board",
        ]);
        assert!(ok, "{out}{err}");
        let id = out.split_whitespace().nth(1).unwrap().to_string();
        let secret = out
            .split("secret: ")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        let (ok, out, _) = self.admin(&["request", "status", &id, "--secret", &secret]);
        assert!(ok && out.contains("pending"), "{out}");
        let (ok, out, _) = self.admin(&["request", "list"]);
        assert!(
            ok && out.contains(host) && out.contains("a VisionFive 2 board"),
            "{out}"
        );
        let (ok, out, err) = self.admin(&[
            "request",
            "approve",
            &id,
            "--host-type",
            "host-linux-riscv64",
        ]);
        assert!(ok, "{out}{err}");
        let cert = self.owner.join(format!("{host}.crt"));
        let (ok, out, err) = self.admin(&[
            "request",
            "status",
            &id,
            "--secret",
            &secret,
            "--out",
            cert.to_str().unwrap(),
        ]);
        assert!(ok && out.contains("approved"), "{out}{err}");
        // The wrong secret sees nothing.
        let (ok, _, err) = self.admin(&["request", "status", &id, "--secret", "nope"]);
        assert!(!ok && err.contains("wrong secret"), "{err}");
        (key, cert)
    }

    fn tokend(&self, key: &Path, cert: &Path, token: &Path) -> (bool, String, String) {
        farmer(&[
            "machine-tokend",
            &format!("-backend={}", self.url()),
            &format!("-cert-pem={}", cert.display()),
            &format!("-pkey-pem={}", key.display()),
            &format!("-token-file={}", token.display()),
        ])
    }

    fn bot(&self, hostname: &str, token: &Path) -> (common::Reaped, Lines) {
        let mut child = Command::new(FARMER)
            .arg("buildlet")
            .arg(format!("-coordinator={}", self.c.addr))
            .arg(format!("-hostname={hostname}"))
            .arg(format!("-token-file={}", token.display()))
            .arg(format!("-tls-pin={}", self.c.fingerprint))
            .arg(format!(
                "-workdir={}",
                self.owner.join(format!("wd-{hostname}")).display()
            ))
            .env("BUILDLET_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Lines::follow(child.stderr.take().unwrap());
        (common::Reaped(child), lines)
    }
}

#[test]
fn the_whole_certificate_path_then_revocation() {
    let f = start();
    let (key, cert) = f.onboard(HOST);
    let token = f.owner.join("token.json");
    let (ok, out, err) = f.tokend(&key, &cert, &token);
    assert!(ok, "{out}{err}");
    assert!(out.contains("wrote a new token"), "{out}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&token).unwrap().permissions().mode() & 0o777,
            0o644
        );
    }
    let first = std::fs::read_to_string(&token).unwrap();
    let tf: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(tf["hostname"], HOST);
    assert!(tf["next_update"].as_i64().unwrap() > tf["last_update"].as_i64().unwrap());
    // Idempotent: a second run before half-life writes nothing.
    let (ok, out, _) = f.tokend(&key, &cert, &token);
    assert!(ok && out.contains("fresh"), "{out}");
    assert_eq!(std::fs::read_to_string(&token).unwrap(), first);
    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.owner.join("token.json.status")).unwrap())
            .unwrap();
    assert_eq!(status["ok"], true);
    // No temp files left beside the token.
    let names: Vec<String> = std::fs::read_dir(&f.owner)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains(".tmp")), "{names:?}");

    // The bot joins the host type bound by the admin, and builds.
    let (mut bot, log) = f.bot(HOST, &token);
    f.c.wait("the bot to connect", Duration::from_secs(30), |c| {
        let m = c.get("/api/machines");
        m["connected"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["hostname"] == HOST)
            .map(|m| m["host_type"].clone())
    });
    let m = f.c.get("/api/machines");
    assert_eq!(m["connected"][0]["host_type"], "host-linux-riscv64");
    let builds = f.c.wait_builds_done(1, Duration::from_secs(60));
    assert_eq!(builds[0]["status"], "passed", "{}", builds[0]);
    // Token checks of the connected bot pass (heartbeat is 1s here): two
    // more of them, and it is still connected.
    let checks = |c: &Coordinator| -> u64 {
        c.get_text("/metrics")
            .lines()
            .find_map(|l| l.strip_prefix("farmer_machine_token_checks_passed_total "))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let before = checks(&f.c);
    f.c.wait("two more token checks", Duration::from_secs(30), |c| {
        (checks(c) >= before + 2).then_some(())
    });
    assert_eq!(f.c.connected(), vec![HOST.to_string()]);
    // Idle, its link parks; its checks go on without waking it (they
    // read the binding and the revocation list), so it stays parked.
    let parked = |c: &Coordinator| {
        c.get_text("/metrics")
            .lines()
            .any(|l| l == "farmer_machines{host_type=\"host-linux-riscv64\",state=\"parked\"} 1")
    };
    f.c.wait("the idle bot's link parked", Duration::from_secs(20), |c| {
        parked(c).then_some(())
    });
    let parks = |c: &Coordinator| {
        c.get_text("/metrics").lines().find_map(|l| {
            l.strip_prefix("farmer_links_parked_total ")
                .map(str::to_string)
        })
    };
    let (before, parks_before) = (checks(&f.c), parks(&f.c));
    assert!(parks_before.is_some(), "no farmer_links_parked_total");
    f.c.wait("two checks while parked", Duration::from_secs(30), |c| {
        (checks(c) >= before + 2).then_some(())
    });
    assert!(parked(&f.c), "a token check woke the parked link");
    assert_eq!(parks(&f.c), parks_before, "the link woke and parked again");
    let blog =
        f.c.get_text(&format!("/api/builds/{}/log", builds[0]["id"]));
    assert!(blog.contains("on host-linux-riscv64"), "{blog}");

    // Revocation: the connected (parked) bot is dropped at the next check,
    // and the token daemon is refused with the reason.
    let (ok, out, err) = f.admin(&[
        "ca",
        "revoke",
        "--hostname",
        HOST,
        "--reason",
        "board returned",
    ]);
    assert!(ok, "{out}{err}");
    f.c.wait(
        "the revoked bot to be dropped",
        Duration::from_secs(20),
        |c| c.connected().is_empty().then_some(()),
    );
    let st = f.c.get("/api/status");
    let refusals = st["refusals"].as_array().unwrap();
    assert_eq!(refusals.len(), 1, "{st}");
    assert_eq!(refusals[0]["kind"], "revoked", "{st}");
    assert!(
        refusals[0]["reason"]
            .as_str()
            .unwrap()
            .contains("board returned"),
        "{st}"
    );
    let old_token = std::fs::read(&token).unwrap();
    std::fs::remove_file(&token).unwrap();
    let (ok, _, err) = f.tokend(&key, &cert, &token);
    assert!(!ok && err.contains("revoked"), "{err}");
    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.owner.join("token.json.status")).unwrap())
            .unwrap();
    assert_eq!(status["ok"], false);
    assert!(status["message"].as_str().unwrap().contains("revoked"));
    // And the bot itself logs the refusal, with the reason, when it
    // reconnects with its old (still unexpired) token.
    let seen = log.all().lines().count();
    std::fs::write(&token, &old_token).unwrap();
    let refused = f.c.wait("the bot's refusal", Duration::from_secs(30), |_| {
        log.all()
            .lines()
            .skip(seen)
            .find(|l| l.contains("refused this buildlet"))
            .map(str::to_string)
    });
    assert!(refused.contains("revoked"), "{refused}");
    let _ = bot.kill();
    let _ = bot.wait();
}

fn token_post(f: &Farm, body: serde_json::Value) -> (u16, String) {
    let (code, v) = http_post(
        &format!("{}/auth/machine-token", f.url()),
        &body.to_string(),
        None,
    );
    (code, v["error"].as_str().unwrap_or("").to_string())
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn token_endpoint_refusals() {
    let f = start();
    let (key, cert) = f.onboard(HOST);
    let cert_pem = std::fs::read_to_string(&cert).unwrap();
    let key_pem = std::fs::read_to_string(&key).unwrap();
    let ok = botauth::token::sign_request(&cert_pem, &key_pem, now()).unwrap();
    let (code, e) = token_post(&f, serde_json::to_value(&ok).unwrap());
    assert_eq!(code, 200, "{e}");

    // Stale timestamp.
    let stale = botauth::token::sign_request(&cert_pem, &key_pem, now() - 3600).unwrap();
    let (code, e) = token_post(&f, serde_json::to_value(&stale).unwrap());
    assert_eq!(code, 401);
    assert!(e.contains("timestamp"), "{e}");

    // Forged signature: signed by another key.
    let other =
        botauth::csr::generate("mallory", "x.test", botauth::csr::KeyType::Ed25519).unwrap();
    let forged = botauth::token::sign_request(&cert_pem, &other.key_pem, now()).unwrap();
    let (code, e) = token_post(&f, serde_json::to_value(&forged).unwrap());
    assert_eq!(code, 401);
    assert!(e.contains("signature does not match"), "{e}");

    // Garbage certificate.
    let mut bad = serde_json::to_value(&ok).unwrap();
    bad["cert_pem"] = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into();
    let (code, e) = token_post(&f, bad);
    assert_eq!(code, 400);
    assert!(e.contains("does not parse"), "{e}");

    // A certificate from another CA, for the same name and key.
    let dns = botauth::hostname::bot_dns_name(HOST, botauth::hostname::DEFAULT_BOT_DOMAIN);
    let rogue_dir = tempfile::tempdir().unwrap();
    let rogue = coordinator::ca::Ca::load_or_create(rogue_dir.path()).unwrap();
    let generated = botauth::csr::generate(
        HOST,
        botauth::hostname::DEFAULT_BOT_DOMAIN,
        botauth::csr::KeyType::P256,
    )
    .unwrap();
    let rogue_cert = rogue.sign(&generated.csr_pem, &dns, 30).unwrap();
    let req =
        botauth::token::sign_request(&rogue_cert.cert_pem, &generated.key_pem, now()).unwrap();
    let (code, e) = token_post(&f, serde_json::to_value(&req).unwrap());
    assert_eq!(code, 401);
    assert!(e.contains("not issued by this farm's CA"), "{e}");

    // Expired: really issued by the farm CA, but in the past.
    let farm_ca = coordinator::ca::Ca::load_or_create(&f.c.data_dir).unwrap();
    let expired = farm_ca
        .sign_with_validity(&generated.csr_pem, &dns, now() - 86400 * 10, now() - 86400)
        .unwrap();
    let req = botauth::token::sign_request(&expired.cert_pem, &generated.key_pem, now()).unwrap();
    let (code, e) = token_post(&f, serde_json::to_value(&req).unwrap());
    assert_eq!(code, 401);
    assert!(e.contains("not valid now"), "{e}");

    // A valid farm certificate for a hostname nobody approved.
    let stranger = botauth::csr::generate(
        "stranger",
        botauth::hostname::DEFAULT_BOT_DOMAIN,
        botauth::csr::KeyType::Ed25519,
    )
    .unwrap();
    let sdns = botauth::hostname::bot_dns_name("stranger", botauth::hostname::DEFAULT_BOT_DOMAIN);
    let scert = farm_ca.sign(&stranger.csr_pem, &sdns, 30).unwrap();
    let req = botauth::token::sign_request(&scert.cert_pem, &stranger.key_pem, now()).unwrap();
    let (code, e) = token_post(&f, serde_json::to_value(&req).unwrap());
    assert_eq!(code, 403);
    assert!(e.contains("not bound to a host type"), "{e}");

    // The refusals are visible on the status page and in metrics.
    let metrics = f.c.get_text("/metrics");
    assert!(metrics.contains("reason=\"stale-timestamp\""), "{metrics}");
    assert!(metrics.contains("reason=\"unknown-ca\""), "{metrics}");
}

#[test]
fn bots_claiming_another_hostname_or_without_a_token_are_refused() {
    let f = start();
    let (key, cert) = f.onboard(HOST);
    let token = f.owner.join("token.json");
    assert!(f.tokend(&key, &cert, &token).0);
    // The token says alice; the bot claims to be bob.
    let (mut bot, log) = f.bot("linux-riscv64-bob", &token);
    assert!(
        log.wait_for(
            "was issued to \"linux-riscv64-alice\"",
            Duration::from_secs(20)
        ),
        "{}",
        log.all()
    );
    let _ = bot.kill();
    // A forged token.
    let forged = f.owner.join("forged.json");
    std::fs::write(&forged, r#"{"token":"v1.eyJoIjoibGludXgtcmlzY3Y2NC1hbGljZSIsInMiOiIwMCIsImUiOjk5OTk5OTk5OTl9.AAAA"}"#).unwrap();
    let (mut bot2, log2) = f.bot(HOST, &forged);
    assert!(
        log2.wait_for("not issued by this farm", Duration::from_secs(20)),
        "{}",
        log2.all()
    );
    let _ = bot2.kill();
    // A missing token file: the bot says what to run.
    let (mut bot3, log3) = f.bot(HOST, &f.owner.join("missing.json"));
    assert!(
        log3.wait_for("machine token file", Duration::from_secs(20)),
        "{}",
        log3.all()
    );
    let _ = bot3.kill();
    assert!(f.c.connected().is_empty());
}

#[test]
fn csr_must_match_the_request_and_rejections_carry_a_reason() {
    let f = start();
    let owner = f.owner.display().to_string();
    assert!(
        farmer(&[
            "genbotcert",
            "-bot-hostname=linux-riscv64-alice",
            &format!("-out-dir={owner}")
        ])
        .0
    );
    // Bob submits Alice's CSR.
    let csr = f.owner.join("linux-riscv64-alice.csr");
    let (ok, _, err) = f.admin(&[
        "request",
        "submit",
        "--hostname",
        "linux-riscv64-bob",
        "--csr",
        csr.to_str().unwrap(),
        "--contact",
        "bob@example.com",
    ]);
    assert!(!ok);
    assert!(
        err.contains("subject CN") && err.contains("linux-riscv64-bob"),
        "{err}"
    );
    // Bad hostnames are refused before anything is sent.
    let (ok, _, err) = farmer(&[
        "genbotcert",
        "-bot-hostname=Linux--Box",
        &format!("-out-dir={owner}"),
    ]);
    assert!(!ok && err.contains("lowercase"), "{err}");
    // A rejection needs a reason, and the owner sees it.
    let (ok, out, err) = f.admin(&[
        "request",
        "submit",
        "--hostname",
        "linux-riscv64-alice",
        "--csr",
        csr.to_str().unwrap(),
        "--contact",
        "alice@example.com",
    ]);
    assert!(ok, "{err}");
    let id = out.split_whitespace().nth(1).unwrap().to_string();
    let secret = out
        .split("secret: ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let (ok, _, err) = f.admin(&["request", "reject", &id, "--reason", ""]);
    assert!(!ok && err.contains("reason"), "{err}");
    let (ok, _, err) = f.admin(&[
        "request",
        "reject",
        &id,
        "--reason",
        "we have enough riscv64 boards",
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = f.admin(&["request", "status", &id, "--secret", &secret]);
    assert!(
        !ok && err.contains("we have enough riscv64 boards"),
        "{err}"
    );
    // Approving an unknown host type is refused.
    let (ok, out, _) = f.admin(&[
        "request",
        "submit",
        "--hostname",
        "linux-riscv64-alice",
        "--csr",
        csr.to_str().unwrap(),
        "--contact",
        "alice@example.com",
    ]);
    assert!(ok);
    let id = out.split_whitespace().nth(1).unwrap().to_string();
    let (ok, _, err) = f.admin(&["request", "approve", &id, "--host-type", "host-nope"]);
    assert!(!ok && err.contains("not in the config"), "{err}");
}

#[test]
fn bootstrapswarm_downloads_the_bot_and_it_takes_a_build() {
    let f = start();
    // The admin publishes the bot; its copy of the farmer binary acts as the buildlet.
    let os = std::env::consts::OS;
    let arch = std::env::consts::ARCH;
    let (ok, out, err) = farmer(&[
        "buildlet",
        "publish",
        "--os",
        os,
        "--arch",
        arch,
        FARMER,
        "--data-dir",
        f.c.data_dir.to_str().unwrap(),
        "--version",
        "v1",
    ]);
    assert!(ok, "{out}{err}");
    let release_key = std::fs::read_to_string(f.c.data_dir.join("release").join("release.pub"))
        .unwrap()
        .trim()
        .to_string();
    let (key, cert) = f.onboard(HOST);
    let token = f.owner.join("token.json");
    // bootstrapswarm starts before the token exists and waits for it.
    let mut swarm = common::Stopped(
        Command::new(FARMER)
            .arg("bootstrapswarm")
            .arg(format!("-hostname={HOST}"))
            .arg(format!("-coordinator={}", f.c.addr))
            .arg(format!("-release-key={release_key}"))
            .arg(format!("-tls-pin={}", f.c.fingerprint))
            .arg(format!("-dir={}", f.owner.join("swarm").display()))
            .arg(format!("-workdir={}", f.owner.join("swarm-wd").display()))
            .env(botauth::token::TOKEN_ENV, &token)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap(),
    );
    let log = Lines::follow(swarm.stderr.take().unwrap());
    assert!(
        log.wait_for("waiting for the machine token", Duration::from_secs(20)),
        "{}",
        log.all()
    );
    assert!(f.tokend(&key, &cert, &token).0);
    f.c.wait(
        "the bot from bootstrapswarm to connect",
        Duration::from_secs(60),
        |c| c.connected().contains(&HOST.to_string()).then_some(()),
    );
    let m = f.c.get("/api/machines");
    assert_eq!(m["connected"][0]["host_type"], "host-linux-riscv64");
    let builds = f.c.wait_builds_done(1, Duration::from_secs(60));
    assert_eq!(builds[0]["status"], "passed", "{}", builds[0]);
    assert!(log.all().contains("running buildlet v1"), "{}", log.all());
    let stop = |child: &mut std::process::Child| {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "bootstrapswarm did not stop"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    stop(&mut swarm);

    // The download is verified before it runs: with another farm's release
    // key (well formed, wrong), nothing is run and the reason is logged.
    let other = ring::signature::Ed25519KeyPair::from_pkcs8(
        ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .unwrap()
            .as_ref(),
    )
    .unwrap();
    let other_key: String = ring::signature::KeyPair::public_key(&other)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let wrong = Command::new(FARMER)
        .arg("bootstrapswarm")
        .arg(format!("-hostname={HOST}"))
        .arg(format!("-coordinator={}", f.c.addr))
        .arg(format!("-release-key={other_key}"))
        .arg(format!("-tls-pin={}", f.c.fingerprint))
        .arg(format!("-dir={}", f.owner.join("swarm-wrong").display()))
        .arg(format!(
            "-workdir={}",
            f.owner.join("swarm-wrong-wd").display()
        ))
        .env(botauth::token::TOKEN_ENV, &token)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut wrong = common::Reaped(wrong);
    let wlog = Lines::follow(wrong.stderr.take().unwrap());
    assert!(
        wlog.wait_for(
            "signature does not verify against the release key",
            Duration::from_secs(30)
        ),
        "{}",
        wlog.all()
    );
    assert!(!wlog.all().contains("running buildlet"), "{}", wlog.all());
    let bin_dir = f.owner.join("swarm-wrong");
    let kept: Vec<String> = std::fs::read_dir(&bin_dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !kept
            .iter()
            .any(|n| n.starts_with("buildlet") && !n.contains(".tmp")),
        "an unverified binary was kept: {kept:?}"
    );
    let _ = wrong.kill();
    let _ = wrong.wait();
}

fn post_form(url: &str, body: &str) -> (u16, String) {
    let a = common::http(
        "POST",
        url,
        &[("content-type", "application/x-www-form-urlencoded")],
        body,
    );
    (a.status, a.body)
}

#[test]
fn dashboard_request_form_submits_and_explains_refusals() {
    let f = start();
    let page = f.c.get_text("/requests");
    assert!(
        page.contains("action=\"/requests/submit\"") && page.contains("host-linux-riscv64"),
        "{page}"
    );
    let g = botauth::csr::generate(
        HOST,
        botauth::hostname::DEFAULT_BOT_DOMAIN,
        botauth::csr::KeyType::Ed25519,
    )
    .unwrap();
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    // A CSR for another name is refused with the reason, and nothing is stored.
    let body = format!(
        "hostname=linux-riscv64-bob&csr_pem={}&contact=bob%40example.com&notes=",
        enc(&g.csr_pem)
    );
    let (code, html) = post_form(&format!("{}/requests/submit", f.url()), &body);
    assert_eq!(code, 200);
    assert!(
        html.contains("id=\"submit-error\"") && html.contains("subject CN"),
        "{html}"
    );
    // The right one is accepted: id and secret shown, and the secret works.
    let body = format!(
        "hostname={HOST}&csr_pem={}&contact=alice%40example.com&notes=board+%3Cb%3E",
        enc(&g.csr_pem)
    );
    let (_, html) = post_form(&format!("{}/requests/submit", f.url()), &body);
    assert!(
        html.contains("Request <strong>1</strong> submitted"),
        "{html}"
    );
    let secret = html
        .split("<code id=\"secret\">")
        .nth(1)
        .unwrap()
        .split('<')
        .next()
        .unwrap()
        .to_string();
    let v = f.c.get(&format!("/api/requests/1?secret={secret}"));
    assert_eq!(v["status"], "pending");
    assert_eq!(v["notes"], "board <b>");
}

/// True when python3 with the cryptography package is installed.
fn python_cryptography() -> bool {
    Command::new("python3")
        .args(["-c", "import cryptography"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn genbotcert_keys_load_in_openssl_and_python() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().display().to_string();
    let python = python_cryptography();
    if !python {
        eprintln!("python3 -c 'import cryptography' failed: checking the keys with openssl only");
    }
    for kt in ["ed25519", "p256"] {
        let host = format!("linux-keys-{kt}");
        let (ok, out, err) = farmer(&[
            "genbotcert",
            &format!("-bot-hostname={host}"),
            &format!("-key-type={kt}"),
            &format!("-out-dir={out_dir}"),
        ]);
        assert!(ok, "{out}{err}");
        let key = dir.path().join(format!("{host}.key"));
        let csr = dir.path().join(format!("{host}.csr"));
        let (key, csr) = (key.to_str().unwrap(), csr.to_str().unwrap());
        openssl(&["pkey", "-in", key, "-noout"], b"");
        // The key openssl reads is the one the CSR was made for.
        assert_eq!(
            openssl(&["pkey", "-in", key, "-pubout"], b""),
            openssl(&["req", "-in", csr, "-pubkey", "-noout"], b""),
            "{kt}"
        );
        if python {
            let script = "import sys\nfrom cryptography.hazmat.primitives.serialization import load_pem_private_key\nprint(type(load_pem_private_key(open(sys.argv[1], 'rb').read(), None)).__name__)";
            let o = Command::new("python3")
                .args(["-c", script, key])
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{kt}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}

#[test]
fn keys_written_by_the_old_genbotcert_still_get_tokens() {
    // Before, genbotcert wrote Ed25519 keys as PKCS#8 v2 (what ring makes);
    // machines onboarded with one must keep refreshing their tokens.
    let f = start();
    let dns = botauth::hostname::bot_dns_name(HOST, botauth::hostname::DEFAULT_BOT_DOMAIN);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    assert_eq!(key.serialized_der().len(), 83, "not a v2 key");
    let mut params = rcgen::CertificateParams::new(vec![dns.clone()]).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, dns.clone());
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    std::fs::write(f.owner.join(format!("{HOST}.key")), key.serialize_pem()).unwrap();
    std::fs::write(f.owner.join(format!("{HOST}.csr")), csr).unwrap();
    let (key, cert) = f.onboard_files(HOST);
    let token = f.owner.join("token.json");
    let (ok, out, err) = f.tokend(&key, &cert, &token);
    assert!(ok && out.contains("wrote a new token"), "{out}{err}");
}

#[test]
fn issued_certificates_pass_openssl_strict_verification() {
    let f = start();
    let (key, cert) = f.onboard(HOST);
    let ca = f.c.data_dir.join("ca").join("ca.pem");
    let (ca, cert, key) = (
        ca.to_str().unwrap(),
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
    );
    let out = openssl(&["verify", "-x509_strict", "-CAfile", ca, cert], b"");
    assert!(
        String::from_utf8_lossy(&out).contains(": OK"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    // The CA certificate the farm publishes is the one that verifies it.
    let published = f.c.get_text("/api/ca/cert");
    assert!(
        published.starts_with("-----BEGIN CERTIFICATE-----"),
        "{published}"
    );
    assert_eq!(
        published.trim(),
        std::fs::read_to_string(ca).unwrap().trim()
    );
    let served = f.owner.join("served-ca.pem");
    std::fs::write(&served, &published).unwrap();
    let out = openssl(
        &[
            "verify",
            "-x509_strict",
            "-CAfile",
            served.to_str().unwrap(),
            cert,
        ],
        b"",
    );
    assert!(
        String::from_utf8_lossy(&out).contains(": OK"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    // The certificate names its issuer by key id, and that is the CA's key id.
    let key_id = |file: &str, ext: &str| {
        let text = openssl(&["x509", "-in", file, "-noout", "-ext", ext], b"");
        let text = String::from_utf8(text).unwrap();
        let id = text
            .lines()
            .skip(1)
            .map(|l| l.trim().trim_start_matches("keyid:"))
            .find(|l| !l.is_empty())
            .unwrap_or_default()
            .to_string();
        assert!(id.len() >= 20 && id.contains(':'), "{ext}: {text}");
        id
    };
    assert_eq!(
        key_id(cert, "authorityKeyIdentifier"),
        key_id(ca, "subjectKeyIdentifier")
    );
    // And the private key genbotcert wrote is the certificate's.
    assert_eq!(
        openssl(&["pkey", "-in", key, "-pubout"], b""),
        openssl(&["x509", "-in", cert, "-pubkey", "-noout"], b"")
    );
}

#[test]
fn each_farm_ca_has_its_own_subject_and_starts_at_its_creation() {
    let mut seen = Vec::new();
    for _ in 0..2 {
        let f = start();
        let before = now();
        // The CA is created on first use; fetching it is a use.
        let pem = f.c.get_text("/api/ca/cert");
        let after = now();
        let file = f.owner.join("ca.pem");
        std::fs::write(&file, &pem).unwrap();
        let subject = String::from_utf8(openssl(
            &["x509", "-in", file.to_str().unwrap(), "-noout", "-subject"],
            b"",
        ))
        .unwrap();
        assert!(subject.contains("farmer machine CA "), "{subject}");
        let der = botauth::token::cert_der(&pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let not_before = cert.validity().not_before.timestamp();
        assert!(
            (before - 2..=after + 2).contains(&not_before),
            "notBefore {not_before} is not the creation time ({before}..{after})"
        );
        assert!(cert.validity().not_after.timestamp() > after + 10 * 365 * 86400);
        seen.push(subject);
        if seen.len() == 1 {
            // The second farm's CA is made at another time as well as in another dir.
            std::thread::sleep(Duration::from_millis(1100));
        }
    }
    assert_ne!(seen[0], seen[1]);
}

/// A store error while checking revocation refuses the token (fail
/// closed); it is never taken to mean "not revoked".
#[test]
fn a_revocation_check_that_fails_refuses_the_token() {
    let f = start();
    let (key, cert) = f.onboard(HOST);
    let token = f.owner.join("token.json");
    let (ok, out, err) = f.tokend(&key, &cert, &token);
    assert!(ok, "{out}{err}");
    // The revocation list becomes unreadable under the running coordinator.
    common::store_sql(&f.c.data_dir, "ALTER TABLE revoked RENAME TO revoked_gone");
    std::fs::remove_file(&token).unwrap();
    let (ok, out, err) = f.tokend(&key, &cert, &token);
    assert!(
        !ok,
        "a token was issued without a revocation check: {out}{err}"
    );
    assert!(
        format!("{out}{err}").contains("revocation list"),
        "{out}{err}"
    );
    assert!(!token.exists());
}

#[test]
fn machine_tokend_refreshes_only_past_half_life_and_keeps_going_with_loop() {
    let f = start();
    let (key, cert) = f.onboard(HOST);
    let token = f.owner.join("token.json");
    let read = || -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(&token).unwrap()).unwrap()
    };
    assert!(f.tokend(&key, &cert, &token).0);
    let first = read();
    // The next refresh is due at half the token's life.
    let (last, next, expiry) = (
        first["last_update"].as_i64().unwrap(),
        first["next_update"].as_i64().unwrap(),
        first["expiry"].as_i64().unwrap(),
    );
    assert!((next - last - (expiry - last) / 2).abs() <= 1, "{first}");
    // Past half-life (as if time went by): the next run refreshes.
    let mut aged = first.clone();
    aged["next_update"] = (tokend_now() - 1).into();
    std::fs::write(&token, aged.to_string()).unwrap();
    let (ok, out, err) = f.tokend(&key, &cert, &token);
    assert!(ok && out.contains("wrote a new token"), "{out}{err}");
    let second = read();
    assert!(
        second["next_update"].as_i64().unwrap() > tokend_now(),
        "{second}"
    );

    // -loop: a run while the token is fresh writes nothing and sleeps until
    // the half-life, then refreshes by itself.
    let mut soon = second.clone();
    soon["next_update"] = (tokend_now() + 2).into();
    std::fs::write(&token, soon.to_string()).unwrap();
    let before = std::fs::read_to_string(&token).unwrap();
    let _tokend = common::Reaped(
        Command::new(FARMER)
            .args([
                "machine-tokend",
                &format!("-backend={}", f.url()),
                &format!("-cert-pem={}", cert.display()),
                &format!("-pkey-pem={}", key.display()),
                &format!("-token-file={}", token.display()),
                "-loop",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let status_file = f.owner.join("token.json.status");
    f.c.wait("a first, fresh run", Duration::from_secs(20), |_| {
        std::fs::read_to_string(&status_file)
            .ok()
            .filter(|s| s.contains("still fresh"))
    });
    assert_eq!(std::fs::read_to_string(&token).unwrap(), before);
    let refreshed =
        f.c.wait("the loop to refresh", Duration::from_secs(30), |_| {
            let now = std::fs::read_to_string(&token).ok()?;
            (now != before).then_some(now)
        });
    let v: serde_json::Value = serde_json::from_str(&refreshed).unwrap();
    assert!(v["next_update"].as_i64().unwrap() > tokend_now(), "{v}");
}

fn tokend_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
