//! The coordinator end to end: real `farmer serve` and `farmer buildlet`
//! processes over loopback (TLS, real builder keys), real git repositories.

use crate::common;

use std::time::Duration;

use common::{Bot, Coordinator, TestRepo, config};

const BUILDER: &str = r#"
[builders.linux-test]
host = "host-test-trusted"
repos = ["r"]
presubmit = true
timeout = "2m"
env = { GREETING = "hi" }
[[builders.linux-test.steps]]
name = "build"
run = "echo building $FARMER_COMMIT; echo $GREETING from $FARMER_BUILDER; sh build.sh"
timeout = "1m"
[[builders.linux-test.steps]]
name = "test"
command = ["sh", "test.sh"]
timeout = "1m"
"#;

fn setup(builders: &str) -> (tempfile::TempDir, TestRepo, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let repo = TestRepo::new(&dir.path().join("repo"));
    let cfg = dir.path().join("farm.toml");
    std::fs::write(&cfg, config(&repo.path, builders)).unwrap();
    (dir, repo, cfg)
}

#[test]
fn builds_end_to_end_pass_and_fail_with_logs() {
    let (dir, mut repo, cfg) = setup(BUILDER);
    let good = repo.commit(
        "good",
        &[
            ("build.sh", "echo compiled\n"),
            ("test.sh", "echo all tests ok\n"),
        ],
    );
    let bad = repo.commit("bad", &[("test.sh", "echo FAIL TestThing; exit 1\n")]);
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let key = c.key("host-test-trusted");
    let _b = Bot::start(
        &c,
        &dir.path().join("bots"),
        "host-test-trusted",
        "bot-1",
        Some(&key),
    );
    c.wait_connected(1);
    let builds = c.wait_builds_done(2, Duration::from_secs(60));
    let by_commit = |h: &str| builds.iter().find(|b| b["commit"] == h).unwrap().clone();
    let g = by_commit(&good);
    let b = by_commit(&bad);
    assert_eq!(g["status"], "passed", "{g}");
    assert_eq!(b["status"], "failed", "{b}");
    assert!(
        b["error"]
            .as_str()
            .unwrap()
            .contains("step test failed: exit status 1"),
        "{b}"
    );

    let log = c.get_text(&format!("/api/builds/{}/log", g["id"]));
    assert!(log.contains(&format!("building {good}")), "{log}");
    // The stored log is what the live log showed: the attempt's header,
    // the source push, each step's header with its command, the end.
    for line in [
        format!("farmer: build {} attempt 1: linux-test on bot-1", g["id"]),
        "farmer: source: ".to_string(),
        "--- step test: sh test.sh".to_string(),
        format!("farmer: build {} passed", g["id"]),
    ] {
        assert!(log.contains(&line), "{line:?} missing:\n{log}");
    }
    assert!(log.contains("hi from linux-test"), "{log}");
    assert!(
        log.contains("compiled") && log.contains("all tests ok"),
        "{log}"
    );
    let log = c.get_text(&format!("/api/builds/{}/log", b["id"]));
    assert!(log.contains("FAIL TestThing"), "{log}");

    let detail = c.get(&format!("/api/builds/{}", b["id"]));
    let steps = detail["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0]["result"], "passed");
    assert_eq!(steps[1]["result"], "failed");
    assert_eq!(detail["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(detail["attempts"][0]["machine"], "bot-1");

    // Pages of builds: newest first, the next page before the last id.
    let first = c.get("/api/builds?limit=1");
    let newest = first[0]["id"].as_i64().unwrap();
    let next = c.get(&format!("/api/builds?limit=1&before={newest}"));
    assert_eq!(next.as_array().unwrap().len(), 1, "{next}");
    assert!(next[0]["id"].as_i64().unwrap() < newest, "{next}");
    let none = c.get(&format!(
        "/api/builds?before={}",
        next[0]["id"]
            .as_i64()
            .unwrap()
            .min(g["id"].as_i64().unwrap())
            .min(b["id"].as_i64().unwrap())
    ));
    assert!(none.as_array().unwrap().is_empty(), "{none}");

    // A new commit is noticed by the poller and built.
    let third = repo.commit("third", &[("test.sh", "echo fixed\n")]);
    let builds = c.wait_builds_done(3, Duration::from_secs(60));
    assert_eq!(
        builds
            .iter()
            .find(|b| b["commit"] == third.as_str())
            .unwrap()["status"],
        "passed"
    );
    // Commits are listed newest first.
    let commits = c.get("/api/commits?repo=r");
    let hashes: Vec<_> = commits["commits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["hash"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(hashes, vec![third, bad, good]);
}

#[test]
fn wrong_missing_and_unknown_keys_are_refused_with_reasons() {
    let (dir, mut repo, cfg) = setup(BUILDER);
    repo.commit("one", &[("build.sh", "true\n"), ("test.sh", "true\n")]);
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let bots = dir.path().join("bots");

    let wrong = Bot::start(
        &c,
        &bots,
        "host-test-trusted",
        "bad-key",
        Some(&"0".repeat(64)),
    );
    assert!(
        wrong.log.wait_for(
            "wrong builder key for host-test-trusted",
            Duration::from_secs(20)
        ),
        "{}",
        wrong.log.all()
    );
    // Another host type's key does not work either.
    let other = c.key("host-test-untrusted");
    let cross = Bot::start(&c, &bots, "host-test-trusted", "cross-key", Some(&other));
    assert!(
        cross
            .log
            .wait_for("wrong builder key", Duration::from_secs(20))
    );
    let unknown = Bot::start(&c, &bots, "host-nope", "unknown", Some("abc"));
    assert!(
        unknown
            .log
            .wait_for("unknown host type \"host-nope\"", Duration::from_secs(20)),
        "{}",
        unknown.log.all()
    );

    // No key anywhere: the buildlet says where it looked.
    let mut missing = Bot::start(&c, &bots, "host-test-trusted", "no-key", None);
    let st = missing.child.wait().unwrap();
    assert!(!st.success());
    assert!(
        missing
            .log
            .wait_for(".gobuildkey-host-test-trusted", Duration::from_secs(5)),
        "{}",
        missing.log.all()
    );

    assert!(c.connected().is_empty());
    let status = c.get("/api/status");
    let reasons: Vec<String> = status["refusals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reason"].as_str().unwrap().to_string())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("wrong builder key")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("unknown host type")),
        "{reasons:?}"
    );
    let metrics = c.get_text("/metrics");
    assert!(metrics.contains("farmer_registrations_refused_total{host_type=\"host-test-trusted\",reason=\"wrong-key\"}"), "{metrics}");

    // The key from the home directory is found (~/.gobuildkey-<host type>).
    std::fs::write(
        bots.join(".gobuildkey-host-test-trusted"),
        c.key("host-test-trusted"),
    )
    .unwrap();
    let _home = Bot::start(&c, &bots, "host-test-trusted", "home-key", None);
    c.wait("home-key connected", Duration::from_secs(20), |c| {
        c.connected()
            .contains(&"home-key".to_string())
            .then_some(())
    });
}

#[test]
fn reconnect_with_same_hostname_replaces_the_old_entry() {
    let (dir, mut repo, cfg) = setup(BUILDER);
    repo.commit("one", &[("build.sh", "true\n"), ("test.sh", "true\n")]);
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let key = c.key("host-test-trusted");
    let bots = dir.path().join("bots");
    let _a = Bot::start(&c, &bots.join("a"), "host-test-trusted", "same", Some(&key));
    c.wait_connected(1);
    let first_id = c.get("/api/machines")["connected"][0]["id"].clone();
    let _b = Bot::start(&c, &bots.join("b"), "host-test-trusted", "same", Some(&key));
    c.wait(
        "the second connection to replace the first",
        Duration::from_secs(20),
        |c| {
            let m = c.get("/api/machines");
            let conn = m["connected"].as_array().unwrap();
            (conn.len() == 1 && conn[0]["id"] != first_id).then_some(())
        },
    );
}

#[test]
fn step_timeout_fails_the_build() {
    let builders = r#"
[builders.slow]
host = "host-test-trusted"
repos = ["r"]
[[builders.slow.steps]]
name = "hang"
run = "echo started; sleep 60"
timeout = "1s"
"#;
    let (dir, mut repo, cfg) = setup(builders);
    repo.commit("one", &[("x", "x")]);
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let _b = Bot::start(
        &c,
        &dir.path().join("bots"),
        "host-test-trusted",
        "bot",
        Some(&c.key("host-test-trusted")),
    );
    let builds = c.wait_builds_done(1, Duration::from_secs(60));
    assert_eq!(builds[0]["status"], "failed");
    assert!(
        builds[0]["error"]
            .as_str()
            .unwrap()
            .contains("step hang timed out after 1s"),
        "{}",
        builds[0]
    );
    // The machine was cleaned and returned to the pool.
    c.wait("machine idle again", Duration::from_secs(20), |c| {
        let m = c.get("/api/machines");
        (m["connected"][0]["state"] == "idle").then_some(())
    });
}

#[test]
fn presubmit_only_on_trusted_hosts() {
    let builders = r#"
[builders.trusted]
host = "host-test-trusted"
repos = ["r"]
presubmit = true
[[builders.trusted.steps]]
name = "s"
run = "echo trusted-ran"

[builders.untrusted]
host = "host-test-untrusted"
repos = ["r"]
presubmit = true
[[builders.untrusted.steps]]
name = "s"
run = "echo untrusted-ran"
"#;
    let (dir, mut repo, cfg) = setup(builders);
    let head = repo.commit("one", &[("x", "x")]);
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let bots = dir.path().join("bots");
    let _t = Bot::start(
        &c,
        &bots,
        "host-test-trusted",
        "t",
        Some(&c.key("host-test-trusted")),
    );
    let _u = Bot::start(
        &c,
        &bots,
        "host-test-untrusted",
        "u",
        Some(&c.key("host-test-untrusted")),
    );
    c.wait_connected(2);
    c.wait_builds_done(2, Duration::from_secs(60));

    let body = format!(r#"{{"builder":"untrusted","commit":"{head}","kind":"pre-submit"}}"#);
    let (code, v) = c.post("/api/builds", &body, Some(&c.token));
    assert_eq!(code, 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains("not trusted"), "{v}");

    // Without the admin token, nothing is created.
    let body = format!(r#"{{"builder":"trusted","commit":"{head}","kind":"pre-submit"}}"#);
    let (code, _) = c.post("/api/builds", &body, None);
    assert_eq!(code, 401);
    let (code, _) = c.post("/api/builds", &body, Some("wrong"));
    assert_eq!(code, 403);

    let (code, v) = c.post("/api/builds", &body, Some(&c.token));
    assert_eq!(code, 201, "{v}");
    let id = v["id"].as_i64().unwrap();
    let builds = c.wait_builds_done(3, Duration::from_secs(60));
    let b = builds.iter().find(|b| b["id"] == id).unwrap();
    assert_eq!(b["status"], "passed");
    assert_eq!(b["kind"], "pre-submit");
    let detail = c.get(&format!("/api/builds/{id}"));
    assert_eq!(detail["attempts"][0]["machine"], "t");
    // No pre-submit build ever ran on the untrusted host.
    let all = c.get("/api/builds?host_type=host-test-untrusted&limit=100");
    assert!(
        all.as_array()
            .unwrap()
            .iter()
            .all(|b| b["kind"] != "pre-submit")
    );
}

#[test]
fn cancel_a_running_build() {
    let pids = tempfile::tempdir().unwrap();
    let pid_file = pids.path().join("step.pid");
    let builders = format!(
        r#"
[builders.slow]
host = "host-test-trusted"
repos = ["r"]
[[builders.slow.steps]]
name = "hang"
run = "echo started; echo $$ > {}; exec sleep 60"
timeout = "2m"
"#,
        pid_file.display()
    );
    let (dir, mut repo, cfg) = setup(&builders);
    repo.commit("one", &[("x", "x")]);
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let _b = Bot::start(
        &c,
        &dir.path().join("bots"),
        "host-test-trusted",
        "bot",
        Some(&c.key("host-test-trusted")),
    );
    let id = c.wait("a running build", Duration::from_secs(30), |c| {
        let b = c.get("/api/builds?status=running");
        b.as_array()
            .unwrap()
            .first()
            .map(|b| b["id"].as_i64().unwrap())
    });
    let pid: u32 = c.wait("the step's process", Duration::from_secs(30), |_| {
        std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
    });
    let alive = common::alive;
    assert!(alive(pid));
    let (code, v) = c.post(&format!("/api/builds/{id}/cancel"), "", Some(&c.token));
    assert_eq!(code, 200, "{v}");
    let builds = c.wait_builds_done(1, Duration::from_secs(30));
    assert_eq!(builds[0]["status"], "cancelled");
    // The command is killed, and the machine is cleaned and idle again.
    c.wait("the step's process gone", Duration::from_secs(30), |_| {
        (!alive(pid)).then_some(())
    });
    c.wait("the machine idle", Duration::from_secs(30), |c| {
        (c.get("/api/machines")["connected"][0]["state"] == "idle").then_some(())
    });
    let (code, _) = c.post(&format!("/api/builds/{id}/cancel"), "", Some(&c.token));
    assert_eq!(code, 400);
}

#[test]
fn work_waits_visibly_and_old_buildlets_are_refused() {
    let (dir, mut repo, cfg) = setup(BUILDER);
    repo.commit("one", &[("build.sh", "true\n"), ("test.sh", "true\n")]);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[farm]\n", "[farm]\nmin_buildlet_version = 99\n");
    std::fs::write(&cfg, text).unwrap();
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let q = c.wait("a queued build", Duration::from_secs(30), |c| {
        let q = c.get("/api/queue");
        q.as_array().unwrap().first().cloned()
    });
    assert_eq!(q["host_type"], "host-test-trusted");
    assert_eq!(
        q["reason"],
        "waiting: no machine of host-test-trusted connected, expected 2"
    );
    let bot = Bot::start(
        &c,
        &dir.path().join("bots"),
        "host-test-trusted",
        "old",
        Some(&c.key("host-test-trusted")),
    );
    assert!(
        bot.log.wait_for(
            "too old: this farm needs at least 99",
            Duration::from_secs(20)
        ),
        "{}",
        bot.log.all()
    );
    let health = c.get("/api/status")["health"].clone();
    assert!(health.to_string().contains("2 missing"), "{health}");
}

#[test]
fn hung_machine_leaves_the_pool_and_workdir_is_cleaned() {
    let (dir, mut repo, cfg) = setup(BUILDER);
    // This test is about dropping a silent machine: a short timeout.
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("heartbeat_timeout = \"30s\"", "heartbeat_timeout = \"5s\""),
    )
    .unwrap();
    repo.commit(
        "one",
        &[
            ("build.sh", "echo data > artifact\n"),
            ("test.sh", "true\n"),
        ],
    );
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let bot = Bot::start(
        &c,
        &dir.path().join("bots"),
        "host-test-trusted",
        "sleepy",
        Some(&c.key("host-test-trusted")),
    );
    let builds = c.wait_builds_done(1, Duration::from_secs(60));
    assert_eq!(builds[0]["status"], "passed");
    // Cleaned before reuse: only tmp/ is left in the work dir.
    c.wait("the machine to be cleaned", Duration::from_secs(20), |c| {
        let idle = c.get("/api/machines")["connected"][0]["state"] == "idle";
        let left: Vec<_> = std::fs::read_dir(&bot.workdir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        (idle && left == vec!["tmp"]).then_some(())
    });
    // Freeze the process: it stops answering HTTP/2 PINGs and health checks.
    let pid = bot.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );
    // Dropped by the 5 s silence limit set above (the bounded wait is the
    // check; no assertion on how fast).
    c.wait("the hung machine to leave", Duration::from_secs(30), |c| {
        c.connected().is_empty().then_some(())
    });
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status();
}

#[test]
fn overall_timeout_and_log_streaming_while_running() {
    let builders = r#"
[builders.slow]
host = "host-test-trusted"
repos = ["r"]
timeout = "3s"
[[builders.slow.steps]]
name = "a"
run = "for i in 1 2 3 4 5 6 7 8 9 10; do echo tick $i; sleep 0.5; done"
timeout = "1m"
[[builders.slow.steps]]
name = "b"
run = "echo never-reached"
"#;
    let (dir, mut repo, cfg) = setup(builders);
    repo.commit("one", &[("x", "x")]);
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let _b = Bot::start(
        &c,
        &dir.path().join("bots"),
        "host-test-trusted",
        "bot",
        Some(&c.key("host-test-trusted")),
    );
    let id = c.wait("a running build", Duration::from_secs(30), |c| {
        let b = c.get("/api/builds?status=running");
        b.as_array()
            .unwrap()
            .first()
            .map(|b| b["id"].as_i64().unwrap())
    });
    // The log endpoint follows the running build and ends when it is done.
    let t0 = std::time::Instant::now();
    let log = c.get_text(&format!("/api/builds/{id}/log"));
    assert!(
        t0.elapsed() > Duration::from_secs(1),
        "log did not follow the running build"
    );
    assert!(log.contains("tick 1") && log.contains("tick 4"), "{log}");
    assert!(!log.contains("never-reached"));
    let builds = c.wait_builds_done(1, Duration::from_secs(30));
    assert_eq!(builds[0]["status"], "failed");
    assert!(
        builds[0]["error"]
            .as_str()
            .unwrap()
            .contains("build timed out after 3s"),
        "{}",
        builds[0]
    );
}

#[test]
fn rebuild_through_the_api_runs_the_same_commit_again() {
    let (dir, mut repo, cfg) = setup(BUILDER);
    let commit = repo.commit("one", &[("build.sh", "true\n"), ("test.sh", "echo run\n")]);
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let _b = Bot::start(
        &c,
        &dir.path().join("bots"),
        "host-test-trusted",
        "bot",
        Some(&c.key("host-test-trusted")),
    );
    let first = c.wait_builds_done(1, Duration::from_secs(60));
    let id = first[0]["id"].as_i64().unwrap();
    // Without the admin token: refused, nothing created. Every admin
    // endpoint answers alike: 401 with no token, 403 with a wrong one.
    for path in [
        format!("/api/builds/{id}/rebuild"),
        format!("/api/builds/{id}/cancel"),
        "/api/requests/1/approve".to_string(),
        "/api/ca/revoke".to_string(),
    ] {
        let (code, v) = c.post(&path, "{}", None);
        assert_eq!(code, 401, "{path}: {v}");
        assert!(
            v.to_string().contains("needs the admin token"),
            "{path}: {v}"
        );
        let (code, v) = c.post(&path, "{}", Some("not-the-token"));
        assert_eq!(code, 403, "{path}: {v}");
        assert!(v.to_string().contains("wrong admin token"), "{path}: {v}");
    }
    assert_eq!(c.get("/api/builds").as_array().unwrap().len(), 1);
    let (code, v) = c.post(&format!("/api/builds/{id}/rebuild"), "", Some(&c.token));
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["rebuild_of"], id);
    let new = v["id"].as_i64().unwrap();
    assert_ne!(new, id);
    let builds = c.wait_builds_done(2, Duration::from_secs(60));
    let rebuilt = builds.iter().find(|b| b["id"] == new).unwrap();
    assert_eq!(rebuilt["status"], "passed", "{rebuilt}");
    assert_eq!(rebuilt["commit"], commit.as_str());
    assert_eq!(rebuilt["builder"], first[0]["builder"]);
    let (code, _) = c.post("/api/builds/999999/rebuild", "", Some(&c.token));
    assert_eq!(code, 404);
}

#[test]
fn machines_that_keep_breaking_end_in_an_infra_error_after_max_attempts() {
    // Each attempt kills the buildlet that runs it: the machine breaks.
    let builders = r#"
[builders.breaker]
host = "host-test-trusted"
repos = ["r"]
[[builders.breaker.steps]]
name = "break"
run = "echo breaking; kill -9 $PPID; sleep 30"
"#;
    let (dir, mut repo, cfg) = setup(builders);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("max_attempts = 3", "max_attempts = 2");
    std::fs::write(&cfg, text).unwrap();
    repo.commit("one", &[("x", "x")]);
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let key = c.key("host-test-trusted");
    let bots = dir.path().join("bots");
    let _a = Bot::start(&c, &bots, "host-test-trusted", "first", Some(&key));
    let _b = Bot::start(&c, &bots, "host-test-trusted", "second", Some(&key));
    let builds = c.wait_builds_done(1, Duration::from_secs(90));
    let b = &builds[0];
    assert_eq!(b["status"], "infra-error", "{b}");
    assert!(
        b["error"]
            .as_str()
            .unwrap()
            .contains("gave up after 2 attempts"),
        "{b}"
    );
    let detail = c.get(&format!("/api/builds/{}", b["id"]));
    let attempts = detail["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{detail}");
    assert!(
        attempts.iter().all(|a| a["result"] == "infra-error"),
        "{detail}"
    );
    let machines: std::collections::BTreeSet<&str> = attempts
        .iter()
        .map(|a| a["machine"].as_str().unwrap())
        .collect();
    assert_eq!(
        machines.len(),
        2,
        "each attempt on another machine: {detail}"
    );
}
