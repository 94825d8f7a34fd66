//! The `farmer` command line: config checking, refusing broken configs,
//! reload keeping the old config, genbuilderkey, a taken port.

use crate::common;

use std::os::unix::process::CommandExt;
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

/// Starts `cmd` (a `farmer serve` or `up`) in its own process group,
/// stopped when the guard drops; returns it with the address its first
/// line says it listens on.
fn listening(cmd: &mut Command) -> (common::Stopped, String) {
    let mut child = common::Stopped(
        cmd.env("FARMER_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap(),
    );
    let mut first = String::new();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut out, &mut first).unwrap();
    // Keep reading: a closed pipe would fail the rest of the banner.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let addr = first
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("not a listening line: {first:?}"))
        .to_string();
    (child, addr)
}

#[test]
fn up_builds_the_sample_on_every_builder_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("farmer-data");
    let mut cmd = Command::new(FARMER);
    cmd.args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data);
    let (mut child, addr) = listening(&mut cmd);
    let start = std::time::Instant::now();
    let builds = loop {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "demo builds did not finish"
        );
        let v: serde_json::Value = serde_json::from_str(&common::http_get(&format!(
            "http://{addr}/api/builds?limit=100"
        )))
        .unwrap();
        let v = v.as_array().unwrap().clone();
        if v.len() == 12
            && v.iter()
                .all(|b| b["status"] == "passed" || b["status"] == "failed")
        {
            break v;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let builders: std::collections::BTreeSet<_> = builds
        .iter()
        .map(|b| b["builder"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(builders.len(), 3);
    assert!(builds.iter().any(|b| b["status"] == "failed"));
    assert!(builds.iter().any(|b| b["status"] == "passed"));
    // The race builder's tests are sharded: on the newest commit, one unit
    // per test file, each run once.
    let race = builds
        .iter()
        .filter(|b| b["builder"] == "linux-amd64-race")
        .max_by_key(|b| b["commit_time"].as_i64())
        .unwrap();
    let detail: serde_json::Value = serde_json::from_str(&common::http_get(&format!(
        "http://{addr}/api/builds/{}",
        race["id"]
    )))
    .unwrap();
    let mut units: Vec<&str> = detail["shards"][0]["units"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["unit"].as_str().unwrap())
        .collect();
    units.sort();
    assert_eq!(units, ["hello", "world"], "{detail}");
    let grid = common::http_get(&format!("http://{addr}/"));
    assert!(
        grid.contains("<td class=\"fail\">") && grid.contains("<td class=\"ok\">"),
        "{grid}"
    );
    // Ctrl-C: the coordinator and every local buildlet exit.
    assert!(
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "{st}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "farmer up did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = Command::new("pgrep")
        .arg("-f")
        .arg(data.display().to_string())
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "processes left behind: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}

/// `farmer build`: trigger --wait follows the log and exits with the
/// build's result; watch, list, cancel and rebuild; a missing token is a
/// clear error.
#[test]
fn farmer_build_triggers_follows_lists_cancels_and_rebuilds() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    repo.commit("one", &[("test.sh", "echo tests ran on $FARMER_BUILDER\n")]);
    // A second name for the repo, watching a branch it does not have: the
    // poller queues nothing, so every build here is the CLI's.
    let builders = format!(
        r#"
[repos.quiet]
url = "{}"
branches = ["unborn"]

[builders.ok]
host = "host-test-trusted"
repos = ["quiet"]
[[builders.ok.steps]]
name = "test"
run = "sh test.sh"

[builders.bad]
host = "host-test-trusted"
repos = ["quiet"]
[[builders.bad.steps]]
name = "test"
run = "echo about to fail; exit 3"

[builders.slow]
host = "host-test-trusted"
repos = ["quiet"]
[[builders.slow.steps]]
name = "sleep"
run = "sleep 30"
"#,
        repo.path.display()
    );
    let cfg = dir.path().join("farm.toml");
    std::fs::write(&cfg, config(&repo.path, &builders)).unwrap();
    let data = dir.path().join("data");
    let c = Coordinator::start(&data, &cfg);
    let key = c.key("host-test-trusted");
    let _bot = common::Bot::start(
        &c,
        &dir.path().join("bots"),
        "host-test-trusted",
        "b1",
        Some(&key),
    );
    c.wait_connected(1);
    // No saved gomote login may stand in for the admin token here.
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let farmer = |args: &[&str]| {
        let mut cmd = Command::new(FARMER);
        cmd.arg("build")
            .args(args)
            .arg(format!("--coordinator={}", c.url("")))
            .arg("--data-dir")
            .arg(&data)
            .env("XDG_CONFIG_HOME", &home)
            .env_remove("FARMER_TOKEN");
        common::output_within(&mut cmd, Duration::from_secs(60))
    };
    let out = farmer(&["trigger", "ok", "--commit", "main", "--wait"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("tests ran on ok"),
        "the log streamed: {stdout}"
    );
    assert!(stdout.contains("passed"), "{stdout}");
    // No --commit: the head of the builder's repo's first branch, which
    // this repo does not have: a clear refusal, exit 2.
    let out = farmer(&["trigger", "bad", "--wait"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unborn") || err.contains("commit"), "{err}");
    let out = farmer(&["trigger", "bad", "--commit", "main", "--wait"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed build exits 1: {stdout}"
    );
    assert!(stdout.contains("about to fail"), "{stdout}");
    let bad_id: i64 = stdout
        .split("build ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert_eq!(
        farmer(&["watch", &bad_id.to_string()]).status.code(),
        Some(1)
    );
    let out = farmer(&["list", "--json", "--builder", "bad"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["status"], "failed");
    let out = farmer(&["list", "--status", "passed"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("passed") && table.contains(" ok "),
        "{table}"
    );
    assert!(!table.contains("bad"), "{table}");
    // Cancel a running build; rebuild the failed one.
    let out = farmer(&["trigger", "slow", "--commit", "main"]);
    let slow = String::from_utf8_lossy(&out.stdout).to_string();
    let slow_id = slow.split_whitespace().nth(1).unwrap().to_string();
    c.wait("the slow build to run", Duration::from_secs(30), |c| {
        (c.get(&format!("/api/builds/{slow_id}"))["build"]["status"] == "running").then_some(())
    });
    let out = farmer(&["cancel", &slow_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        farmer(&["watch", &slow_id]).status.code(),
        Some(2),
        "a cancelled build exits 2"
    );
    let out = farmer(&["rebuild", &bad_id.to_string()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("again {bad_id}")));
    // A user's token, saved by `farmer gomote login`: the build is theirs,
    // they may cancel it, but not a build the admin queued.
    let out = common::output_within(
        Command::new(FARMER)
            .args([
                "user",
                "add",
                "alice",
                "--coordinator",
                &c.url(""),
                "--data-dir",
            ])
            .arg(&data),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token_file = dir.path().join("alice.token");
    std::fs::write(&token_file, String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    let alice_home = dir.path().join("alice");
    std::fs::create_dir_all(&alice_home).unwrap();
    let out = common::output_within(
        Command::new(FARMER)
            .args([
                "gomote",
                "login",
                "--coordinator",
                &c.url(""),
                "--token-file",
            ])
            .arg(&token_file)
            .env("XDG_CONFIG_HOME", &alice_home)
            .env("HOME", &alice_home)
            .env_remove("FARMER_TOKEN"),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let alice = |args: &[&str]| {
        // No --coordinator, no token file, no data dir: all from the login.
        let mut cmd = Command::new(FARMER);
        cmd.arg("build")
            .args(args)
            .current_dir(&alice_home)
            .env("XDG_CONFIG_HOME", &alice_home)
            .env("HOME", &alice_home)
            .env_remove("FARMER_TOKEN");
        common::output_within(&mut cmd, Duration::from_secs(60))
    };
    let out = alice(&["trigger", "slow", "--commit", "main"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mine = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    let b = c.get(&format!("/api/builds/{mine}"));
    assert_eq!(b["build"]["requested_by"], "alice", "{b}");
    let out = alice(&["cancel", &bad_id.to_string()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("only an admin or the user who queued it"),
        "{err}"
    );
    let out = alice(&["cancel", &mine]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without a token: a sentence that says where one is looked for.
    let mut cmd = Command::new(FARMER);
    cmd.args(["build", "list", "--data-dir"])
        .arg(dir.path().join("nowhere"))
        .arg(format!("--coordinator={}", c.url("")))
        .env("XDG_CONFIG_HOME", &home)
        .env_remove("FARMER_TOKEN");
    let out = common::output_within(&mut cmd, Duration::from_secs(30));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("admin token") && err.contains("FARMER_TOKEN"),
        "{err}"
    );
}

/// The README's systemd units (the coordinator's, stage0's) pass
/// `systemd-analyze verify` without a warning, with their programs pointed
/// at this build's binaries.
#[test]
fn the_readme_systemd_units_verify() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let units: Vec<&str> = readme
        .split("```ini\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .filter(|b| b.contains("[Service]"))
        .collect();
    assert!(
        units.len() >= 2,
        "the README has the coordinator's and stage0's units"
    );
    let dir = tempfile::tempdir().unwrap();
    for (i, unit) in units.iter().enumerate() {
        let text = unit
            .replace("/usr/local/bin/farmer", FARMER)
            .replace("/usr/local/bin/stage0", FARMER);
        let path = dir.path().join(format!("farmer-test-{i}.service"));
        std::fs::write(&path, text).unwrap();
        let mut cmd = Command::new("systemd-analyze");
        cmd.arg("verify").arg(&path);
        let out = common::output_within(&mut cmd, Duration::from_secs(60));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !err.contains(&path.display().to_string()),
            "unit {i} of the README:\n{unit}\nsystemd-analyze says:\n{err}"
        );
    }
}

/// `farmer serve --config FILE` alone: where to listen and keep its data
/// come from the file's `[serve]` (flags still win).
#[test]
fn serve_takes_listen_and_data_dir_from_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = dir.path().join("farm.toml");
    std::fs::write(
        &cfg,
        format!("[serve]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"state\"\n"),
    )
    .unwrap();
    let mut cmd = Command::new(FARMER);
    cmd.args(["serve", "--config"])
        .arg(&cfg)
        .current_dir(dir.path().join(".."));
    let (_child, addr) = listening(&mut cmd);
    assert_eq!(addr, format!("127.0.0.1:{port}"));
    assert!(
        dir.path().join("state").join("admin.token").exists(),
        "the data dir is the config's, beside the file"
    );
    let status = common::http_get(&format!("http://127.0.0.1:{port}/api/status"));
    assert!(status.contains("version"), "{status}");
}
