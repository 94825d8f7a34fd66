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

/// Units of the sharded test below. `hold` keeps the build's own machine
/// busy until `victim` has started elsewhere (on the helper), which then
/// sleeps until the test SIGKILLs that machine; run again, it passes.
const SHARD_UNITS: &str = r#"case "$1" in
hold)
  i=0
  while [ $i -lt 300 ]; do [ -e "$MARK/victim" ] && exit 0; sleep 0.1; i=$((i+1)); done
  echo "the victim never started"; exit 1;;
victim)
  if [ -e "$MARK/victim" ]; then echo "victim runs again in $(pwd)"; exit 0; fi
  pwd > "$MARK/victim.tmp" && mv "$MARK/victim.tmp" "$MARK/victim"
  exec sleep 30;;
*) exec sleep 0.1;;
esac
"#;

#[test]
fn a_helper_killed_mid_unit_loses_only_that_unit_which_runs_again_elsewhere() {
    helper_fails_mid_unit(false);
}

/// A helper that stops answering (SIGSTOP: its link stays open) is dropped
/// once its heartbeats go unanswered, and its unit runs elsewhere.
#[test]
fn a_helper_that_stops_answering_mid_unit_loses_only_that_unit() {
    helper_fails_mid_unit(true);
}

fn helper_fails_mid_unit(stop_instead_of_kill: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("mark");
    std::fs::create_dir_all(&mark).unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    repo.commit("one", &[("unit.sh", SHARD_UNITS)]);
    let builder = format!(
        r#"
[builders.sharded]
host = "host-test-trusted"
repos = ["r"]
timeout = "3m"
env = {{ MARK = "{}" }}
[[builders.sharded.steps]]
name = "test"
shard.list = "printf 'hold\nvictim\nq1\nq2\nq3\n'"
shard.run = ["sh", "unit.sh", "{{unit}}"]
shard.helpers = 1
timeout = "2m"
"#,
        mark.display()
    );
    let cfg = dir.path().join("farm.toml");
    let mut farm = config(&repo.path, &builder);
    if stop_instead_of_kill {
        // Silence is noticed after 5 s here (heartbeats go every second).
        farm = farm.replace("heartbeat_timeout = \"30s\"", "heartbeat_timeout = \"5s\"");
    }
    std::fs::write(&cfg, farm).unwrap();
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let key = c.key("host-test-trusted");
    let bots = dir.path().join("bots");
    let mut alpha = Bot::start(&c, &bots, "host-test-trusted", "alpha", Some(&key));
    let mut beta = Bot::start(&c, &bots, "host-test-trusted", "beta", Some(&key));
    let victim_file = mark.join("victim");
    let start = std::time::Instant::now();
    while !victim_file.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the victim unit never started; coordinator:\n{}",
            c.err.all()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let victim_dir = std::fs::read_to_string(&victim_file).unwrap();
    let (victim, killed, survivor) = if victim_dir.contains("wd-alpha") {
        (&mut alpha, "alpha", "beta")
    } else {
        assert!(victim_dir.contains("wd-beta"), "{victim_dir}");
        (&mut beta, "beta", "alpha")
    };
    if stop_instead_of_kill {
        // Still connected, never answering; killed when the test ends.
        let st = std::process::Command::new("kill")
            .args(["-STOP", &victim.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    } else {
        victim.kill();
    }
    let builds = c.wait_builds_done(1, Duration::from_secs(90));
    assert_eq!(builds[0]["status"], "passed", "{}", builds[0]);
    let id = builds[0]["id"].as_i64().unwrap();
    let detail = c.get(&format!("/api/builds/{id}"));
    let attempts = detail["attempts"].as_array().unwrap();
    assert_eq!(
        attempts.len(),
        1,
        "the build itself was not retried: {detail}"
    );
    assert_eq!(
        attempts[0]["machine"], survivor,
        "the helper was the one killed"
    );
    let runs = detail["shards"][0]["units"].as_array().unwrap();
    let of = |unit: &str| -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = runs
            .iter()
            .filter(|r| r["unit"] == unit)
            .map(|r| {
                (
                    r["result"].as_str().unwrap().to_string(),
                    r["machine"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        of("victim"),
        [
            ("lost".to_string(), killed.to_string()),
            ("passed".to_string(), survivor.to_string())
        ],
        "{detail}"
    );
    for u in ["hold", "q1", "q2", "q3"] {
        let r = of(u);
        assert_eq!(r.len(), 1, "{u} ran once: {detail}");
        assert_eq!(r[0].0, "passed", "{u}: {detail}");
    }
    let log = c.get_text(&format!("/api/builds/{id}/log"));
    assert!(log.contains("the unit goes back to the queue"), "{log}");
    assert!(log.contains("victim runs again"), "{log}");
    // The page shows the units and the machines' timelines.
    let page = c.get_text(&format!("/builds/{id}"));
    assert!(page.contains("Units of step test"), "{page}");
    assert!(page.contains("<svg class=\"timeline\""), "{page}");
    assert!(page.contains("victim: lost in"), "{page}");
    // The lost helper is out of the pool; the survivor is idle again.
    c.wait("the survivor idle", Duration::from_secs(20), |c| {
        let m = c.get("/api/machines")["connected"].clone();
        let m = m.as_array().unwrap();
        (m.len() == 1 && m[0]["hostname"] == survivor && m[0]["state"] == "idle").then_some(())
    });
}
