//! stage0 and buildlet releases end to end, with real processes: a `farmer
//! serve` coordinator, `farmer buildlet publish`, and `farmer stage0`
//! (the same code as the `stage0` binary) downloading, verifying and running
//! published buildlets that register over TLS and run builds.
//!
//! The published "buildlets" are copies of the `farmer` test binary (which
//! runs as a buildlet when saved as `buildlet`, as stage0 does) with a few
//! bytes appended, so each version has its own SHA-256 and really runs.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Bot, Coordinator, FARMER, Lines, TestRepo, config};

/// The machine that ran a build's (only) attempt.
fn build_machine(c: &Coordinator, id: &serde_json::Value) -> String {
    let d = c.get(&format!("/api/builds/{id}"));
    d["attempts"][0]["machine"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

const BUILDER: &str = r#"
[builders.linux-test]
host = "host-test-trusted"
repos = ["r"]
timeout = "2m"
[[builders.linux-test.steps]]
name = "test"
command = ["sh", "test.sh"]
timeout = "1m"
"#;

/// A log line without its terminal colours.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn platform() -> stage0::Platform {
    stage0::Platform::current()
}

/// A copy of the farmer binary (without debug info when objcopy is there,
/// to keep the copies small) with `tag` appended: a distinct, runnable
/// buildlet binary.
fn buildlet_binary(dir: &Path, tag: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let base = dir.join("farmer-base");
    if !base.exists() {
        let stripped = Command::new("objcopy")
            .arg("--strip-debug")
            .arg(FARMER)
            .arg(&base)
            .status()
            .is_ok_and(|s| s.success());
        if !stripped {
            std::fs::copy(FARMER, &base).unwrap();
        }
    }
    let out = dir.join(format!("buildlet-{tag}"));
    let mut data = std::fs::read(&base).unwrap();
    data.extend_from_slice(format!("\nrelease {tag}\n").as_bytes());
    std::fs::write(&out, data).unwrap();
    out
}

/// `farmer buildlet publish`; returns its stdout.
fn publish(c: &Coordinator, file: &Path, version: &str) -> String {
    let p = platform();
    let out = Command::new(FARMER)
        .args(["buildlet", "publish", "--os", &p.os, "--arch", &p.arch])
        .arg(file)
        .arg("--data-dir")
        .arg(&c.data_dir)
        .args(["--version", version])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "publish failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// GET returning the raw bytes (the binary download).
fn rt_get_bytes(url: &str) -> Vec<u8> {
    let out = Command::new("curl").args(["-sf", url]).output().unwrap();
    assert!(out.status.success(), "GET {url} failed");
    out.stdout
}

fn release_key(c: &Coordinator) -> String {
    std::fs::read_to_string(c.data_dir.join("release").join("release.pub"))
        .unwrap()
        .trim()
        .to_string()
}

/// A `farmer stage0 -loop` process for one machine.
struct Stage0 {
    child: Child,
    log: Lines,
    dir: PathBuf,
}

impl Stage0 {
    fn start(
        addr: &str,
        pin: &str,
        key: &str,
        builder_key: &str,
        dir: &Path,
        hostname: &str,
        extra: &[&str],
    ) -> Stage0 {
        std::fs::create_dir_all(dir).unwrap();
        let kf = dir.join("builder.key");
        std::fs::write(&kf, builder_key).unwrap();
        let mut child = Command::new(FARMER)
            .arg("stage0")
            .arg(format!("-coordinator={addr}"))
            .arg(format!("-tls-pin={pin}"))
            .arg(format!("-release-key={key}"))
            .arg(format!("-dir={}", dir.join("stage0").display()))
            .arg("-reverse-type=host-test-trusted")
            .arg(format!("-hostname={hostname}"))
            .arg(format!("-workdir={}", dir.join("wd").display()))
            .arg(format!("-key-file={}", kf.display()))
            .arg("-loop")
            .args(extra)
            .env("HOME", dir)
            .env("STAGE0_LOG", "info")
            .env("BUILDLET_LOG", "info")
            .env_remove("GO_BUILDER_ENV")
            .env_remove("FARMER_STAGE0_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Lines::follow(child.stdout.take().unwrap());
        log.also(child.stderr.take().unwrap());
        Stage0 {
            child,
            log,
            dir: dir.join("stage0"),
        }
    }

    fn for_coordinator(c: &Coordinator, dir: &Path, hostname: &str) -> Stage0 {
        Stage0::start(
            &c.addr,
            &c.fingerprint,
            &release_key(c),
            &c.key("host-test-trusted"),
            dir,
            hostname,
            &[],
        )
    }

    fn installed_version(&self) -> String {
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.dir.join("buildlet.json")).unwrap())
                .unwrap();
        m["version"].as_str().unwrap().to_string()
    }

    fn expect(&self, needle: &str, limit: Duration) {
        assert!(
            self.log.wait_for(needle, limit),
            "stage0 log has no {needle:?}:\n{}",
            self.log.all()
        );
    }
}

impl Drop for Stage0 {
    fn drop(&mut self) {
        // SIGTERM first: stage0 passes it on, so no buildlet is left behind.
        #[cfg(unix)]
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The connected machine `hostname` from `/api/machines`.
fn machine(c: &Coordinator, hostname: &str) -> Option<serde_json::Value> {
    c.get("/api/machines")["connected"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["hostname"] == hostname)
        .cloned()
}

/// Waits until `hostname` is connected running release `version`.
fn wait_on_release(
    c: &Coordinator,
    hostname: &str,
    version: &str,
    limit: Duration,
) -> serde_json::Value {
    c.wait(&format!("{hostname} connected on {version}"), limit, |c| {
        machine(c, hostname).filter(|m| m["binary"]["release"] == version)
    })
}

fn setup() -> (tempfile::TempDir, TestRepo, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let repo = TestRepo::new(&dir.path().join("repo"));
    let cfg = dir.path().join("farm.toml");
    std::fs::write(&cfg, config(&repo.path, BUILDER)).unwrap();
    (dir, repo, cfg)
}

#[test]
fn stage0_downloads_verifies_registers_and_builds() {
    let (dir, mut repo, cfg) = setup();
    let commit = repo.commit("one", &[("test.sh", "echo tests pass\n")]);
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    // Nothing published yet: the endpoints say what to do.
    let p = platform();
    let none = c.get_text(&format!("/stage0/manifest?os={}&arch={}", p.os, p.arch));
    assert!(none.contains("farmer buildlet publish"), "{none}");

    let v1 = buildlet_binary(&dir.path().join("bin"), "v1");
    let out = publish(&c, &v1, "v1");
    assert!(out.contains("published buildlet v1"), "{out}");
    let key = release_key(&c);
    assert!(out.contains(&format!("-release-key={key}")), "{out}");
    assert_eq!(c.get_text("/stage0/release-key").trim(), key);
    // Publishing the same thing again changes nothing.
    assert!(publish(&c, &v1, "v1").contains("already the current release"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(c.data_dir.join("release").join("release.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let s = Stage0::for_coordinator(&c, &dir.path().join("m1"), "s0-1");
    let m = wait_on_release(&c, "s0-1", "v1", Duration::from_secs(60));
    assert_eq!(m["binary"]["status"], "current", "{m}");
    assert_eq!(m["binary"]["stage0"], true, "{m}");
    assert_eq!(m["binary"]["platform"], p.to_string(), "{m}");
    s.expect(
        "downloaded and verified buildlet v1",
        Duration::from_secs(5),
    );
    assert_eq!(s.installed_version(), "v1");

    let builds = c.wait_builds_done(1, Duration::from_secs(60));
    assert_eq!(builds[0]["status"], "passed", "{builds:?}");
    assert_eq!(builds[0]["commit"], commit.as_str());
    assert_eq!(build_machine(&c, &builds[0]["id"]), "s0-1");

    let st = c.get("/api/status");
    assert_eq!(st["buildlets"]["current"], 1, "{st}");
    assert_eq!(st["buildlets"]["outdated"], 0, "{st}");
    assert_eq!(st["buildlets"]["releases"][0]["version"], "v1", "{st}");
    assert_eq!(st["buildlets"]["release_key"], key.as_str());
    // The status page shows each machine's release and the fleet summary.
    let page = c.get_text("/status");
    assert!(page.contains("runs the current buildlet release"), "{page}");
    assert!(
        page.contains("<code>v1</code> <span class=\"muted\">current</span>"),
        "{page}"
    );
}

/// With several `-coordinator` addresses (a leader and its standby),
/// stage0 downloads from the first that answers and the buildlet it runs
/// gets them all.
#[test]
fn stage0_takes_several_coordinators_and_uses_the_one_that_answers() {
    let (dir, mut repo, cfg) = setup();
    repo.commit("one", &[("test.sh", "echo tests pass\n")]);
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    publish(&c, &buildlet_binary(&dir.path().join("bin"), "v1"), "v1");
    // Nothing listens on the first address.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let s = Stage0::start(
        &format!("{dead},{}", c.addr),
        &c.fingerprint,
        &release_key(&c),
        &c.key("host-test-trusted"),
        &dir.path().join("m1"),
        "s0-two",
        &[],
    );
    let m = wait_on_release(&c, "s0-two", "v1", Duration::from_secs(60));
    assert_eq!(m["binary"]["stage0"], true, "{m}");
    s.expect(
        "downloaded and verified buildlet v1",
        Duration::from_secs(5),
    );
    let builds = c.wait_builds_done(1, Duration::from_secs(60));
    assert_eq!(build_machine(&c, &builds[0]["id"]), "s0-two");
}

#[test]
fn a_new_release_moves_the_fleet_without_losing_a_build() {
    let (dir, mut repo, cfg) = setup();
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let bin = dir.path().join("bin");
    publish(&c, &buildlet_binary(&bin, "v1"), "v1");
    let _a = Stage0::for_coordinator(&c, &dir.path().join("a"), "s0-a");
    let _b = Stage0::for_coordinator(&c, &dir.path().join("b"), "s0-b");
    wait_on_release(&c, "s0-a", "v1", Duration::from_secs(60));
    wait_on_release(&c, "s0-b", "v1", Duration::from_secs(60));

    // One machine is busy with a slow build when v2 is published.
    // The slow build holds its machine until the test lets it go (bounded:
    // it gives up waiting after 50 s, inside the step timeout).
    let go = dir.path().join("let-the-slow-build-finish");
    repo.commit(
        "slow",
        &[(
            "test.sh",
            &format!(
                "echo start; i=0; while [ ! -e {go} ] && [ $i -lt 500 ]; do sleep 0.1; i=$((i+1)); done; echo done\n",
                go = go.display()
            ),
        )],
    );
    let busy = c.wait("a running build", Duration::from_secs(30), |c| {
        let st = c.get("/api/status");
        st["running"]
            .as_array()
            .unwrap()
            .first()
            .map(|r| r["machine"].as_str().unwrap().to_string())
            .filter(|m| !m.is_empty())
    });
    let idle = if busy == "s0-a" { "s0-b" } else { "s0-a" };
    let out = publish(&c, &buildlet_binary(&bin, "v2"), "v2");
    assert!(out.contains("published buildlet v2"), "{out}");

    // The idle machine comes back on v2 while the other still builds on v1.
    wait_on_release(&c, idle, "v2", Duration::from_secs(60));
    let m = machine(&c, &busy).expect("the busy machine stays connected during its build");
    assert_eq!(m["binary"]["release"], "v1", "{m}");
    let st = c.get("/api/status");
    assert!(st["buildlets"]["outdated"].as_u64().unwrap() >= 1, "{st}");

    // More work while the busy machine drains: it takes none of it.
    let commits: Vec<String> = (0..3)
        .map(|i| {
            repo.commit(
                &format!("more {i}"),
                &[("test.sh", &format!("echo quick {i}\n"))],
            )
        })
        .collect();
    // The idle machine does all of it while the other one drains.
    let quick = c.wait("the quick builds done", Duration::from_secs(120), |c| {
        let b = c.get("/api/builds?limit=1000");
        let done: Vec<serde_json::Value> = b
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| commits.contains(&b["commit"].as_str().unwrap().to_string()))
            .filter(|b| b["status"] == "passed")
            .cloned()
            .collect();
        (done.len() == commits.len()).then_some(done)
    });
    for b in &quick {
        assert_eq!(
            build_machine(&c, &b["id"]),
            idle,
            "the draining machine took new work: {b}"
        );
    }
    std::fs::write(&go, "").unwrap();
    wait_on_release(&c, &busy, "v2", Duration::from_secs(90));
    let builds = c.wait_builds_done(4, Duration::from_secs(120));
    for b in &builds {
        assert_eq!(b["status"], "passed", "{b}");
        assert_eq!(b["attempts"], 1, "a build was retried or lost: {b}");
    }
    assert_eq!(builds.len(), 1 + commits.len());
    let st = c.get("/api/status");
    assert_eq!(st["buildlets"]["current"], 2, "{st}");
    assert_eq!(st["buildlets"]["outdated"], 0, "{st}");
    assert!(
        c.err.all().contains("asking an outdated machine to halt"),
        "{}",
        c.err.all()
    );
}

#[test]
fn a_tampered_binary_or_bad_signature_is_refused_and_the_last_good_one_runs() {
    let (dir, mut repo, cfg) = setup();
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let bin = dir.path().join("bin");
    publish(&c, &buildlet_binary(&bin, "v1"), "v1");
    let s = Stage0::for_coordinator(&c, &dir.path().join("m"), "s0-t");
    wait_on_release(&c, "s0-t", "v1", Duration::from_secs(60));

    // v2's stored binary is changed after it was signed.
    let v2 = buildlet_binary(&bin, "v2");
    let (sha2, _) = stage0::manifest::sha256_file(&v2).unwrap();
    publish(&c, &v2, "v2");
    let blob = c.data_dir.join("artifacts/stage0/blobs").join(&sha2);
    let mut data = std::fs::read(&blob).unwrap();
    let n = data.len();
    data[n - 2] ^= 0xff;
    std::fs::write(&blob, data).unwrap();

    // The coordinator checks the blob's digest before serving it.
    s.expect("is corrupt", Duration::from_secs(60));
    s.expect("keeping the last good buildlet v1", Duration::from_secs(10));
    let m = c.wait("s0-t back on v1, stuck", Duration::from_secs(60), |c| {
        machine(c, "s0-t").filter(|m| m["binary"]["status"] == "stuck")
    });
    assert_eq!(m["binary"]["release"], "v1", "{m}");
    assert!(
        m["binary"]["note"]
            .as_str()
            .unwrap()
            .contains("could not download or verify"),
        "{m}"
    );
    assert_eq!(s.installed_version(), "v1");
    // Publishing the same binary again repairs the stored copy.
    let p = platform();
    let url = c.url(&format!("/stage0/buildlet?os={}&arch={}", p.os, p.arch));
    assert!(common::http_get(&url).contains("is corrupt"));
    publish(&c, &v2, "v2");
    let served = rt_get_bytes(&url);
    assert_eq!(served.len() as u64, std::fs::metadata(&v2).unwrap().len());
    assert_eq!(
        {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            h.update(&served);
            h.finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        },
        sha2
    );
    // It is asked once, not halted in a loop, and still builds.
    repo.commit("one", &[("test.sh", "echo ok\n")]);
    let builds = c.wait_builds_done(1, Duration::from_secs(60));
    assert_eq!(builds[0]["status"], "passed", "{builds:?}");
    assert_eq!(build_machine(&c, &builds[0]["id"]), "s0-t");
    let asked = c
        .err
        .all()
        .lines()
        .map(strip_ansi)
        .filter(|l| l.contains("asking an outdated machine to halt") && l.contains("to=v2"))
        .count();
    assert_eq!(asked, 1, "{}", c.err.all());

    // v3's manifest signature is broken in the index.
    publish(&c, &buildlet_binary(&bin, "v3"), "v3");
    let index_path = c.data_dir.join("artifacts/stage0/index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let p = platform().to_string();
    let sig = index["current"][&p]["signature"]
        .as_str()
        .unwrap()
        .to_string();
    let flipped = if sig.starts_with('0') { "1" } else { "0" };
    index["current"][&p]["signature"] = format!("{flipped}{}", &sig[1..]).into();
    std::fs::write(&index_path, serde_json::to_vec_pretty(&index).unwrap()).unwrap();

    s.expect(
        "does not verify against the release key",
        Duration::from_secs(60),
    );
    c.wait("s0-t back on v1 again", Duration::from_secs(60), |c| {
        machine(c, "s0-t").filter(|m| {
            m["binary"]["status"] == "stuck" && m["binary"]["note"].as_str().unwrap().contains("v3")
        })
    });
    assert_eq!(s.installed_version(), "v1");
    let st = c.get("/api/status");
    assert_eq!(st["buildlets"]["outdated"], 1, "{st}");
    assert_eq!(
        st["buildlets"]["outdated_machines"][0]["hostname"], "s0-t",
        "{st}"
    );
}

#[test]
fn stage0_waits_for_a_coordinator_that_is_down_at_start() {
    let (dir, mut repo, cfg) = setup();
    repo.commit("one", &[("test.sh", "echo ok\n")]);
    let data = dir.path().join("data");
    // A first start creates the TLS certificate and the builder keys; the
    // release is published while the coordinator is down.
    let mut c = Coordinator::start(&data, &cfg);
    let (addr, pin, bkey) = (
        c.addr.clone(),
        c.fingerprint.clone(),
        c.key("host-test-trusted"),
    );
    c.kill();
    drop(c);
    let p = platform();
    let out = Command::new(FARMER)
        .args(["buildlet", "publish", "--os", &p.os, "--arch", &p.arch])
        .arg(buildlet_binary(&dir.path().join("bin"), "v1"))
        .arg("--data-dir")
        .arg(&data)
        .args(["--version", "v1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = std::fs::read_to_string(data.join("release/release.pub")).unwrap();

    let s = Stage0::start(
        &addr,
        &pin,
        key.trim(),
        &bkey,
        &dir.path().join("m"),
        "s0-late",
        &["-network-wait=3s"],
    );
    s.expect("waiting for the network", Duration::from_secs(10));
    s.expect("gave up waiting for the network", Duration::from_secs(15));
    s.expect(
        "no verified buildlet to fall back to",
        Duration::from_secs(30),
    );
    s.expect("trying again in", Duration::from_secs(10));

    let c = Coordinator::start_on(&data, &cfg, &addr);
    wait_on_release(&c, "s0-late", "v1", Duration::from_secs(90));
    let builds = c.wait_builds_done(1, Duration::from_secs(60));
    assert_eq!(builds[0]["status"], "passed", "{builds:?}");
}

#[test]
fn min_buildlet_version_is_coherent_with_releases() {
    let (dir, _repo, cfg) = setup();
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let bin = dir.path().join("bin");
    publish(&c, &buildlet_binary(&bin, "v1"), "v1");

    // The farm now needs a newer protocol than any published buildlet speaks.
    let min = format!("min_buildlet_version = {}", buildlet::proto::VERSION + 1);
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replacen("[farm]\n", &format!("[farm]\n{min}\n"), 1),
    )
    .unwrap();
    assert!(
        Command::new("kill")
            .args(["-HUP", &c.child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let warning = c.wait("a release warning", Duration::from_secs(20), |c| {
        c.get("/api/status")["buildlets"]["warnings"][0]
            .as_str()
            .map(str::to_string)
    });
    assert!(warning.contains(&min), "{warning}");

    // Publishing a buildlet below the minimum is refused.
    let p = platform();
    let out = Command::new(FARMER)
        .args(["buildlet", "publish", "--os", &p.os, "--arch", &p.arch])
        .arg(buildlet_binary(&bin, "v2"))
        .arg("--data-dir")
        .arg(&c.data_dir)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("below the farm's {min}")), "{err}");

    // A machine under stage0 refused as too old exits, so its stage0 looks
    // for a newer release instead of retrying forever with the old binary.
    let s = Stage0::for_coordinator(&c, &dir.path().join("m"), "s0-old");
    s.expect("is too old", Duration::from_secs(60));
    s.expect(
        "exiting so stage0 can fetch the current buildlet",
        Duration::from_secs(10),
    );
    s.expect("checking for a new version", Duration::from_secs(10));
    assert!(machine(&c, "s0-old").is_none());
}

#[test]
fn a_replayed_older_release_is_refused_and_the_newer_one_kept() {
    let (dir, _repo, cfg) = setup();
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let bin = dir.path().join("bin");
    publish(&c, &buildlet_binary(&bin, "v1"), "v1");
    let index_path = c.data_dir.join("artifacts/stage0/index.json");
    let p = platform().to_string();
    let read_index = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap()
    };
    let v1_manifest = read_index()["current"][&p].clone();
    publish(&c, &buildlet_binary(&bin, "v2"), "v2");
    let s = Stage0::for_coordinator(&c, &dir.path().join("m"), "s0-d");
    let before = wait_on_release(&c, "s0-d", "v2", Duration::from_secs(60));
    // Someone with write access to the releases serves v1's signed
    // manifest again: validly signed, but older than what runs.
    let mut index = read_index();
    index["current"][&p] = v1_manifest;
    std::fs::write(&index_path, serde_json::to_vec_pretty(&index).unwrap()).unwrap();
    s.expect("refusing a downgrade", Duration::from_secs(60));
    s.expect("keeping the last good buildlet v2", Duration::from_secs(10));
    assert_eq!(s.installed_version(), "v2");
    // It came back (a new connection) and still runs v2.
    c.wait("s0-d back on v2", Duration::from_secs(60), |c| {
        machine(c, "s0-d").filter(|m| {
            m["binary"]["release"] == "v2" && m["connected_at"] != before["connected_at"]
        })
    });
}

#[test]
fn stage0_runs_the_last_good_buildlet_while_the_coordinator_is_away_and_passes_signals_on() {
    let (dir, _repo, cfg) = setup();
    let mut c = Coordinator::start(&dir.path().join("data"), &cfg);
    publish(&c, &buildlet_binary(&dir.path().join("bin"), "v1"), "v1");
    let (addr, pin, key, bkey) = (
        c.addr.clone(),
        c.fingerprint.clone(),
        release_key(&c),
        c.key("host-test-trusted"),
    );
    let m = dir.path().join("m");
    let first = Stage0::start(&addr, &pin, &key, &bkey, &m, "s0-away", &[]);
    wait_on_release(&c, "s0-away", "v1", Duration::from_secs(60));
    drop(first);
    c.kill();
    // The coordinator is gone: after a few tries stage0 runs what it has.
    let s = Stage0::start(
        &addr,
        &pin,
        &key,
        &bkey,
        &m,
        "s0-away",
        &["-network-wait=1s"],
    );
    s.expect("keeping the last good buildlet v1", Duration::from_secs(60));
    s.expect("running buildlet v1", Duration::from_secs(10));
    // The buildlet is up (it tries to reach the coordinator), so its
    // signal handler is in place.
    s.expect("reconnecting in", Duration::from_secs(30));
    // SIGTERM reaches the buildlet, which stops; stage0 exits with its status.
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", s.child.id()))
        .unwrap_or_default();
    let buildlet: Vec<u32> = children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert_eq!(buildlet.len(), 1, "stage0 runs one buildlet: {children:?}");
    let mut s = s;
    // SAFETY: a signal to the stage0 process this test started.
    unsafe {
        libc::kill(s.child.id() as i32, libc::SIGTERM);
    }
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "stage0 did not stop:\n{}",
            s.log.all()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        s.log.all().contains("signal received, stopping"),
        "the buildlet did not get the signal:\n{}",
        s.log.all()
    );
    assert_eq!(status.code(), Some(0), "{}", s.log.all());
    for pid in buildlet {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|st| st.contains(") Z ")),
            "the buildlet {pid} outlived stage0"
        );
    }
}

#[test]
fn releases_are_listed_and_a_machine_outside_stage0_is_not_managed() {
    let (dir, _repo, cfg) = setup();
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let bin = dir.path().join("bin");
    let empty = c.get("/api/releases");
    assert_eq!(empty["current"], serde_json::json!([]), "{empty}");
    publish(&c, &buildlet_binary(&bin, "v1"), "v1");
    publish(&c, &buildlet_binary(&bin, "v2"), "v2");
    let r = c.get("/api/releases");
    assert_eq!(r["release_key"], release_key(&c).as_str(), "{r}");
    let current = r["current"].as_array().unwrap();
    assert_eq!(current.len(), 1, "{r}");
    assert_eq!(current[0]["version"], "v2");
    assert_eq!(current[0]["platform"], platform().to_string());
    let (sha, size) = stage0::manifest::sha256_file(&bin.join("buildlet-v2")).unwrap();
    assert_eq!(current[0]["sha256"], sha.as_str(), "{r}");
    assert_eq!(current[0]["size"], size, "{r}");
    let versions: Vec<&str> = r["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["v2", "v1"], "newest first: {r}");
    // A buildlet started by hand, not by stage0: the farm does not try to
    // upgrade it and says so.
    let _bot = Bot::start(
        &c,
        &dir.path().join("bots"),
        "host-test-trusted",
        "by-hand",
        Some(&c.key("host-test-trusted")),
    );
    let m = c.wait(
        "the machine's binary status",
        Duration::from_secs(30),
        // Empty until the farm has looked at the machine's binary.
        |c| {
            machine(c, "by-hand")
                .filter(|m| !matches!(m["binary"]["status"].as_str(), Some("unknown" | "") | None))
        },
    );
    assert_eq!(m["binary"]["status"], "not-managed", "{m}");
    assert_eq!(m["binary"]["stage0"], false, "{m}");
    assert!(
        !c.err.all().contains("asking an outdated machine to halt"),
        "a machine outside stage0 was asked to halt"
    );
}
