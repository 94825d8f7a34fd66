//! Nothing is lost: a buildlet killed mid-build, or the coordinator killed
//! mid-build and restarted, leaves every build finished exactly once.

use crate::common;

use std::time::Duration;

use common::{Bot, Coordinator, TestRepo, config};

const SLOW: &str = r#"
[builders.slow]
host = "host-test-trusted"
repos = ["r"]
timeout = "2m"
[[builders.slow.steps]]
name = "work"
run = "echo step-started; sleep 3; echo step-done"
timeout = "1m"
"#;

#[test]
fn buildlet_killed_mid_build_is_retried_on_another_machine() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    repo.commit("one", &[("x", "x")]);
    let cfg = dir.path().join("farm.toml");
    std::fs::write(&cfg, config(&repo.path, SLOW)).unwrap();
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let key = c.key("host-test-trusted");
    let bots = dir.path().join("bots");
    let mut first = Bot::start(&c, &bots, "host-test-trusted", "victim", Some(&key));
    c.wait_connected(1);
    let id = c.wait(
        "the build to run on the victim",
        Duration::from_secs(30),
        |c| {
            let b = c.get("/api/builds?status=running");
            b.as_array()
                .unwrap()
                .first()
                .map(|b| b["id"].as_i64().unwrap())
        },
    );
    // Let the step start, then kill the machine.
    c.wait("the step to start", Duration::from_secs(20), |c| {
        c.get(&format!("/api/builds/{id}"))["current_step"]
            .as_str()
            .filter(|s| *s == "work")
            .map(|_| ())
    });
    first.kill();
    let _second = Bot::start(&c, &bots, "host-test-trusted", "rescuer", Some(&key));
    let builds = c.wait_builds_done(1, Duration::from_secs(90));
    assert_eq!(builds.len(), 1, "no duplicate build");
    assert_eq!(builds[0]["status"], "passed", "{}", builds[0]);
    let detail = c.get(&format!("/api/builds/{id}"));
    let attempts = detail["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{detail}");
    assert_eq!(attempts[0]["machine"], "victim");
    assert_eq!(attempts[0]["result"], "infra-error");
    assert_eq!(attempts[1]["machine"], "rescuer");
    assert_eq!(attempts[1]["result"], "passed");
    let log = c.get_text(&format!("/api/builds/{id}/log"));
    assert!(log.contains("attempt 1 on victim"), "{log}");
    assert!(log.contains("step-done"), "{log}");
}

#[test]
fn coordinator_killed_mid_build_requeues_and_finishes_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    repo.commit("one", &[("x", "x")]);
    repo.commit("two", &[("x", "y")]);
    let cfg = dir.path().join("farm.toml");
    std::fs::write(&cfg, config(&repo.path, SLOW)).unwrap();
    let data = dir.path().join("data");
    let mut c = Coordinator::start(&data, &cfg);
    let addr = c.addr.clone();
    let key = c.key("host-test-trusted");
    let bots = dir.path().join("bots");
    let _bot = Bot::start(&c, &bots, "host-test-trusted", "steady", Some(&key));
    let id = c.wait("a running build", Duration::from_secs(30), |c| {
        let b = c.get("/api/builds?status=running");
        b.as_array()
            .unwrap()
            .first()
            .map(|b| b["id"].as_i64().unwrap())
    });
    // SIGKILL: no chance to clean up.
    c.kill();
    // Same address, so the buildlet reconnects by itself.
    let c = Coordinator::start_on(&data, &cfg, &addr);
    assert!(
        c.err
            .wait_for("recovered from an unclean stop", Duration::from_secs(10)),
        "{}",
        c.err.all()
    );
    let builds = c.wait_builds_done(2, Duration::from_secs(120));
    assert_eq!(builds.len(), 2, "exactly one build per commit: {builds:?}");
    assert!(builds.iter().all(|b| b["status"] == "passed"), "{builds:?}");
    let detail = c.get(&format!("/api/builds/{id}"));
    let attempts = detail["attempts"].as_array().unwrap();
    assert_eq!(attempts[0]["result"], "lost", "{detail}");
    assert!(
        attempts[0]["error"]
            .as_str()
            .unwrap()
            .contains("coordinator stopped")
    );
    assert_eq!(attempts.last().unwrap()["result"], "passed");
    let finished = c.get_text("/metrics");
    assert!(
        finished.contains("farmer_builds{status=\"passed\"} 2"),
        "{finished}"
    );
}
