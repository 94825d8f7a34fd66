//! Builds on the local pool run repository code on the coordinator's own
//! machine: they must not read the farm's secrets. A step probes every
//! secret file of a `farmer up` farm, the coordinator's `/proc` entries and
//! ways out of the sandbox, and the test checks it read none of them.

use crate::common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A demo config with one untrusted local host type and a builder whose
/// only step is the probe.
fn probe_config(data: &Path) -> String {
    let d = data.display();
    format!(
        r#"[farm]
max_attempts = 1

[repos.sample]
url = "sample-repo"
branches = ["main"]
poll_interval = "1s"

[hosts.host-linux-probe]
pool = "local"
count = 1
trusted = false

[builders.probe]
host = "host-linux-probe"
repos = ["sample"]
timeout = "2m"
[[builders.probe.steps]]
name = "probe"
run = '''
leak=0
try() {{ if cat "$1" > "$TMPDIR/probe.$$" 2>/dev/null && [ -s "$TMPDIR/probe.$$" ]; then echo "LEAK $1"; leak=1; fi; rm -f "$TMPDIR/probe.$$"; }}
for f in {d}/master.key {d}/admin.token {d}/tls/key.pem {d}/farmer.db {d}/release/release.key {d}/ca/ca.key {d}/farmer.toml; do try "$f"; done
[ -n "$(ls -A {d} 2>/dev/null)" ] && {{ echo "LEAK listing of the data dir"; leak=1; }}
coord=$(cut -d' ' -f4 /proc/$PPID/stat)
echo "buildlet $PPID, its parent $coord"
for f in /proc/$coord/environ /proc/$coord/root{d}/master.key /proc/$coord/cwd/master.key; do try "$f"; done
umount {d} 2>/dev/null && {{ try {d}/master.key; }}
if command -v unshare >/dev/null; then
  unshare -Urm sh -c 'umount -l {d}; cat {d}/master.key' 2>/dev/null | grep -q . && {{ echo "LEAK through a nested namespace"; leak=1; }}
fi
[ -z "$FARMER_TOKEN$ADMIN_TOKEN" ] || {{ echo "LEAK environment"; leak=1; }}
echo "running as $(id -u), probe done"
exit $leak
'''
"#
    )
}

/// Runs the probe on a `farmer up` farm started by `run_as` (a command
/// prefix, empty for ourselves); returns the probe's log.
fn probe(dir: &Path, farmer: &Path, run_as: &[&str]) -> String {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("farmer.toml"), probe_config(&data)).unwrap();
    if !run_as.is_empty() {
        let status = Command::new("chown")
            .args(["-R", "nobody:"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success());
    }
    let mut cmd = if run_as.is_empty() {
        Command::new(farmer)
    } else {
        let mut c = Command::new(run_as[0]);
        c.args(&run_as[1..]).arg(farmer);
        c
    };
    let mut child = common::Stopped(
        cmd.arg("up")
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen", "127.0.0.1:0"])
            .env("FARMER_TOKEN", "coordinator-env-secret")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap(),
    );
    let err = common::Lines::follow(child.stderr.take().unwrap());
    let out = common::Lines::follow(child.stdout.take().unwrap());
    assert!(
        out.wait_for("listening on ", Duration::from_secs(60)),
        "farmer up did not start: {}",
        err.all()
    );
    let addr = out
        .all()
        .lines()
        .find_map(|l| l.strip_prefix("listening on "))
        .unwrap()
        .trim()
        .to_string();
    // Make the CA exist too, so its key is on disk to be probed.
    let _ = common::http_get(&format!("http://{addr}/api/ca/cert"));
    let start = Instant::now();
    let build = loop {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "probe build did not finish: {}",
            err.all()
        );
        let v: serde_json::Value = serde_json::from_str(&common::http_get(&format!(
            "http://{addr}/api/builds?builder=probe&limit=1"
        )))
        .unwrap();
        if let Some(b) = v.as_array().and_then(|a| a.first())
            && matches!(b["status"].as_str(), Some("passed" | "failed" | "error"))
        {
            break b.clone();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let log = common::http_get(&format!("http://{addr}/api/builds/{}/log", build["id"]));
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    // Every secret the probe tried exists: a probe of missing files proves nothing.
    for f in [
        "master.key",
        "admin.token",
        "tls/key.pem",
        "farmer.db",
        "release/release.key",
        "ca/ca.key",
    ] {
        assert!(data.join(f).exists(), "{f} was never created");
    }
    let master = std::fs::read_to_string(data.join("master.key")).unwrap();
    assert!(
        !log.contains(master.trim()),
        "the master key is in the build log:\n{log}"
    );
    assert!(!log.contains("coordinator-env-secret"), "{log}");
    assert!(log.contains("probe done"), "the probe did not run:\n{log}");
    // Output lines, not the step's header (which shows the script).
    assert!(
        !log.lines().any(|l| l.starts_with("LEAK")),
        "a build read a secret:\n{log}"
    );
    assert_eq!(build["status"], "passed", "{build}\n{log}");
    log
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// As root, local buildlets run as `nobody` in a mount namespace that hides
/// the data dir; as any other user, in a user and mount namespace.
#[test]
fn builds_on_the_local_pool_cannot_read_the_farms_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let log = probe(dir.path(), Path::new(common::FARMER), &[]);
    if is_root() {
        assert!(!log.contains("running as 0,"), "{log}");
    }
}

/// The same farm run by an unprivileged user (the user + mount namespace
/// path). Needs root to become that user; skipped with a message otherwise,
/// as the test above then covers this path already.
#[test]
fn builds_cannot_read_secrets_of_an_unprivileged_coordinator() {
    if !is_root() {
        eprintln!("not root: the other test already runs the unprivileged path");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // `nobody` must be able to reach the executable and own the data dir.
    let exe = dir.path().join("farmer");
    std::fs::copy(common::FARMER, &exe).unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let log = probe(
        dir.path(),
        &exe,
        &[
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--",
        ],
    );
    assert!(log.contains("running as 65534,"), "{log}");
}

/// `[secrets]` referenced from a builder's env: the step gets the value,
/// and it never shows in the live log, the stored step and attempt logs,
/// the test results, the builders API or the build page, not even when the
/// step prints it in pieces that arrive in separate writes.
#[test]
fn a_secret_reaches_the_step_and_is_masked_everywhere() {
    use crate::common::inproc::{InProc, config, rt};
    use coordinator::store::{BuildKind, BuildStatus};
    const VALUE: &str = "pypi-AgEIcHlwaS5vcmcCJDk2NzA";
    rt().block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let mut repo = common::TestRepo::new(&tmp.path().join("repo"));
        let head = repo.commit("one", &[("README", "hi\n")]);
        use sha2::Digest;
        let digest = hex::encode(sha2::Sha256::digest(VALUE.as_bytes()));
        let builders = r#"
[secrets]
pypi-token = {}

[builders.upload]
host = "host-a"
env = { TOKEN = "secret:pypi-token" }
[[builders.upload.steps]]
name = "upload"
run = '''
[ "$(printf %s "$TOKEN" | sha256sum | cut -d' ' -f1)" = "DIGEST" ] || { echo "wrong value: ${#TOKEN} bytes"; exit 3; }
echo "whole: $TOKEN"
printf 'split: %s' "${TOKEN%??????????}"; sleep 0.3; printf '%s end\n' "${TOKEN#${TOKEN%??????????}}"
echo "test tests::prints_token ... FAILED"
echo "---- tests::prints_token stdout ----"
echo "token was $TOKEN"
exit 1
'''

[builders.pr]
host = "host-a"
presubmit = true
env = { TOKEN = "secret:pypi-token" }
[[builders.pr.steps]]
name = "show"
run = 'echo "TOKEN is ${TOKEN-unset}"'
"#
        .replace("DIGEST", &digest);
        let f = InProc::start_with_secrets(
            &config(&repo.path, &builders),
            &[("pypi-token", VALUE)],
        )
        .await;
        f.machine("host-a", "m1").await;
        let id = f
            .farm
            .trigger("upload", None, None, &head, BuildKind::PostSubmit, "admin")
            .await
            .unwrap();
        let live = loop {
            if let Some(rb) = f.farm.running(id) {
                break rb.log.clone();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let b = f.finished(id).await;
        assert_eq!(b.status, BuildStatus::Failed, "{b:?}");
        let step = f.step_log(id, 0).await;
        assert!(step.contains("whole: ***"), "{step}");
        assert!(step.contains("split: *** end"), "{step}");
        let live = String::from_utf8_lossy(&live.snapshot()).into_owned();
        let attempt_log = f.attempt_log(id).await;
        assert!(attempt_log.contains("whole: ***"), "{attempt_log}");
        // A pre-submit build (a pull request: anyone's code) gets no secret.
        let pr = f
            .farm
            .trigger("pr", None, None, &head, BuildKind::PreSubmit, "github pull request #1")
            .await
            .unwrap();
        assert_eq!(f.finished(pr).await.status, BuildStatus::Passed);
        let pr_log = f.step_log(pr, 0).await;
        assert!(pr_log.contains("TOKEN is unset"), "{pr_log}");
        let tests = format!("{:?}", f.farm.store.build_tests(id, 100).await.unwrap());
        assert!(tests.contains("prints_token"), "{tests}");
        let builders_api = f.get("/api/builders").await;
        assert!(builders_api.contains("upload"), "{builders_api}");
        let page = f.get(&format!("/builds/{id}")).await;
        for (what, text) in [
            ("live log", &live),
            ("step log", &step),
            ("attempt log", &attempt_log),
            ("builders API", &builders_api),
            ("build page", &page),
            ("test results", &tests),
        ] {
            assert!(!text.contains(VALUE), "the secret shows in the {what}: {text}");
            // Nor a long piece of it.
            assert!(!text.contains(&VALUE[..14]), "half the secret shows in the {what}");
        }
    });
}

/// The config check refuses a secret sent to an untrusted host type, one
/// that is not declared, and a forge credential written in the clear; a
/// farm whose secret file is missing or readable by others does not start,
/// and says how to fix it.
#[test]
fn secrets_are_checked_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let farmer = env!("CARGO_BIN_EXE_farmer");
    let cfg = tmp.path().join("farm.toml");
    std::fs::write(
        &cfg,
        r#"
[secrets]
deploy = {}

[repos.r]
url = "https://git.example.com/org/r.git"
password = "hunter2-in-the-clear"
[repos.r.forge]
type = "github"
repository = "org/r"
webhook_secret = "secret:hook"

[hosts.host-untrusted]
pool = "reverse"

[builders.b]
host = "host-untrusted"
env = { TOKEN = "secret:deploy" }
[[builders.b.steps]]
run = "true"
"#,
    )
    .unwrap();
    let out = Command::new(farmer)
        .arg("check-config")
        .arg(&cfg)
        .output()
        .unwrap();
    let err =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        err.contains("builders.b.env.TOKEN") && err.contains("not trusted"),
        "{err}"
    );
    assert!(
        err.contains("repos.r.password") && err.contains("must name a secret"),
        "{err}"
    );
    assert!(err.contains("secret \"hook\" is not declared"), "{err}");
    assert!(!err.contains("hunter2-in-the-clear"), "{err}");

    // A valid config whose secret is not stored yet: serve refuses to start.
    std::fs::write(
        &cfg,
        r#"
[secrets]
deploy = {}
[repos.r]
url = "repo"
[hosts.host-a]
pool = "reverse"
trusted = true
[builders.b]
host = "host-a"
env = { TOKEN = "secret:deploy" }
[[builders.b.steps]]
name = "t"
run = "true"
"#,
    )
    .unwrap();
    let data = tmp.path().join("data");
    let serve = |data: &Path| {
        common::output_within(
            Command::new(farmer)
                .args(["serve", "--listen", "127.0.0.1:0", "--config"])
                .arg(&cfg)
                .arg("--data-dir")
                .arg(data),
            Duration::from_secs(30),
        )
    };
    let out = serve(&data);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(err.contains("farmer secret set deploy"), "{err}");

    // `farmer secret set` stores it 0600; `list` shows where, never the value.
    let mut set = Command::new(farmer)
        .args(["secret", "set", "deploy", "--data-dir"])
        .arg(&data)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    set.stdin
        .take()
        .unwrap()
        .write_all(b"deploy-key-0123456789\n")
        .unwrap();
    assert!(set.wait().unwrap().success());
    let list = Command::new(farmer)
        .args(["secret", "list", "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(list.status.success(), "{text}");
    assert!(text.contains("deploy") && text.contains("ok"), "{text}");
    assert!(!text.contains("deploy-key-0123456789"), "{text}");
    let file = data.join("secrets/deploy");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = serve(&data);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        err.contains("readable by others") && err.contains("chmod 600"),
        "{err}"
    );
}
