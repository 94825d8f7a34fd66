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
    assert!(log.contains("attempt 1: slow on victim"), "{log}");
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
        finished.contains("farmer_builds_recorded{status=\"passed\"} 2"),
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
    // A silent machine is noticed after 5 s here (heartbeats go every second).
    let (c, mark, mut bots) = shard_farm(
        dir.path(),
        SHARD_UNITS,
        &sharded_builder("hold\\nvictim\\nq1\\nq2\\nq3\\n", 1, ""),
        2,
        if stop_instead_of_kill { "5s" } else { "30s" },
    );
    let (victim, mut others) = victim_bot(&c, &mark, &mut bots);
    let (killed, survivor) = (victim.0, others.remove(0).0);
    let victim = &mut victim.1;
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

/// A builder whose step `test` is sharded: units from `printf LIST`, run
/// by `unit.sh`, with `helpers` helpers and `$MARK` set; then a step
/// `after` running `later`, unless empty.
fn sharded_builder(list: &str, helpers: u32, later: &str) -> String {
    let mut b = format!(
        r#"
[builders.sharded]
host = "host-test-trusted"
repos = ["r"]
timeout = "3m"
env = {{ MARK = "MARK_DIR" }}
[[builders.sharded.steps]]
name = "test"
shard.list = "printf '{list}'"
shard.run = ["sh", "unit.sh", "{{unit}}"]
shard.helpers = {helpers}
timeout = "2m"
"#
    );
    if !later.is_empty() {
        b.push_str(&format!(
            "[[builders.sharded.steps]]\nname = \"after\"\nrun = \"{later}\"\n"
        ));
    }
    b
}

/// Starts a coordinator with `builder` (`MARK_DIR` in it becomes the
/// returned mark dir) and `machines` bots: alpha, beta, gamma.
fn shard_farm(
    dir: &std::path::Path,
    units_sh: &str,
    builder: &str,
    machines: usize,
    heartbeat_timeout: &str,
) -> (Coordinator, std::path::PathBuf, Vec<(&'static str, Bot)>) {
    let mark = dir.join("mark");
    std::fs::create_dir_all(&mark).unwrap();
    let mut repo = TestRepo::new(&dir.join("repo"));
    repo.commit("one", &[("unit.sh", units_sh)]);
    let builder = builder.replace("MARK_DIR", &mark.display().to_string());
    let cfg = dir.join("farm.toml");
    let farm = config(&repo.path, &builder).replace(
        "heartbeat_timeout = \"30s\"",
        &format!("heartbeat_timeout = \"{heartbeat_timeout}\""),
    );
    std::fs::write(&cfg, farm).unwrap();
    let c = Coordinator::start(&dir.join("data"), &cfg);
    let key = c.key("host-test-trusted");
    let bots = dir.join("bots");
    let all = ["alpha", "beta", "gamma"][..machines]
        .iter()
        .map(|n| {
            (
                *n,
                Bot::start(&c, &bots, "host-test-trusted", n, Some(&key)),
            )
        })
        .collect();
    (c, mark, all)
}

/// Waits for the `victim` unit to start and splits `bots` into the one
/// running it and the others.
fn victim_bot<'b>(
    c: &Coordinator,
    mark: &std::path::Path,
    bots: &'b mut [(&'static str, Bot)],
) -> (
    &'b mut (&'static str, Bot),
    Vec<&'b mut (&'static str, Bot)>,
) {
    let victim_file = mark.join("victim");
    c.wait("the victim unit to start", Duration::from_secs(60), |_| {
        victim_file.exists().then_some(())
    });
    let victim_dir = std::fs::read_to_string(&victim_file).unwrap();
    let mut victim = None;
    let mut others = Vec::new();
    for b in bots.iter_mut() {
        if victim_dir.contains(&format!("wd-{}/", b.0)) {
            victim = Some(b);
        } else {
            others.push(b);
        }
    }
    (victim.expect("a bot's work dir"), others)
}

/// The build's own machine SIGKILLed mid-unit with a later step to come:
/// its unit runs on the helper waiting as a standby, which then carries
/// the build on; the build is not retried.
#[test]
fn the_builds_own_machine_lost_mid_unit_hands_the_build_to_a_helper() {
    let dir = tempfile::tempdir().unwrap();
    let (c, mark, mut bots) = shard_farm(
        dir.path(),
        SHARD_UNITS,
        &sharded_builder("victim\\nq1\\nq2\\nq3\\n", 1, "echo after in $(pwd)"),
        2,
        "30s",
    );
    let (victim, others) = victim_bot(&c, &mark, &mut bots);
    let (main, helper) = (victim.0, others[0].0);
    let bot = &mut victim.1;
    // The helper has run the short units and waits as the standby.
    let id = c.wait(
        "the helper done with q1..q3",
        Duration::from_secs(30),
        |c| {
            let b = c.get("/api/builds?status=running");
            let id = b.as_array().unwrap().first()?["id"].as_i64()?;
            let d = c.get(&format!("/api/builds/{id}"));
            let done = d["shards"][0]["units"].as_array()?.len();
            (done == 3).then_some(id)
        },
    );
    bot.kill();
    let builds = c.wait_builds_done(1, Duration::from_secs(90));
    assert_eq!(builds[0]["status"], "passed", "{}", builds[0]);
    let detail = c.get(&format!("/api/builds/{id}"));
    let attempts = detail["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "not retried: {detail}");
    assert_eq!(attempts[0]["machine"], main);
    let victim: Vec<(&str, &str)> = detail["shards"][0]["units"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["unit"] == "victim")
        .map(|r| {
            (
                r["result"].as_str().unwrap(),
                r["machine"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(victim.contains(&("lost", main)), "{detail}");
    assert!(victim.contains(&("passed", helper)), "{detail}");
    let log = c.get_text(&format!("/api/builds/{id}/log"));
    assert!(
        log.contains(&format!(
            "{main} was lost; the build goes on on helper {helper}"
        )),
        "{log}"
    );
    assert!(log.contains(&format!("wd-{helper}/src")), "{log}");
    // The line the step printed, not its header (which shows the script).
    let after = log
        .lines()
        .find(|l| l.starts_with("after in "))
        .unwrap_or_else(|| panic!("the later step did not run: {log}"));
    assert!(
        after.contains(&format!("wd-{helper}")),
        "the later step ran on the helper: {log}"
    );
}

/// A unit that kills whatever machine runs it fails the step after two
/// machines, by name, instead of going through the whole pool (and the
/// build is not retried: the unit is at fault).
#[test]
fn a_unit_that_breaks_its_machines_fails_after_two_instead_of_emptying_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let units = "case \"$1\" in poison) echo \"poison on $(pwd)\"; kill -9 $PPID; sleep 30;; *) exec sleep 0.1;; esac\n";
    let (c, _mark, _bots) = shard_farm(
        dir.path(),
        units,
        &sharded_builder("poison\\nq1\\nq2\\n", 2, ""),
        3,
        "30s",
    );
    let builds = c.wait_builds_done(1, Duration::from_secs(90));
    assert_eq!(builds[0]["status"], "failed", "{}", builds[0]);
    let error = builds[0]["error"].as_str().unwrap();
    assert!(
        error.contains("unit poison failed: it lost its machine 2 times"),
        "{error}"
    );
    let id = builds[0]["id"].as_i64().unwrap();
    let detail = c.get(&format!("/api/builds/{id}"));
    assert_eq!(detail["attempts"].as_array().unwrap().len(), 1, "{detail}");
    // Two machines broke; the third is back, idle.
    c.wait("one machine left, idle", Duration::from_secs(30), |c| {
        let m = c.get("/api/machines")["connected"].clone();
        let m = m.as_array().unwrap();
        (m.len() == 1 && m[0]["state"] == "idle").then_some(())
    });
}

/// How many machines of the trusted host type have parked links.
fn parked(c: &Coordinator) -> usize {
    let needle = "farmer_machines{host_type=\"host-test-trusted\",state=\"parked\"} ";
    c.get_text("/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(needle))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn an_idle_machines_link_parks_over_tls_and_wakes_for_each_build() {
    const QUICK: &str = r#"
[builders.quick]
host = "host-test-trusted"
repos = ["r"]
[[builders.quick.steps]]
name = "show"
run = "cat x"
"#;
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    repo.commit("one", &[("x", "round 0\n")]);
    let cfg = dir.path().join("farm.toml");
    std::fs::write(&cfg, config(&repo.path, QUICK)).unwrap();
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let key = c.key("host-test-trusted");
    let bot = Bot::start(
        &c,
        &dir.path().join("bots"),
        "host-test-trusted",
        "parker",
        Some(&key),
    );
    c.wait_connected(1);
    let connected_at = c.get("/api/machines")["connected"][0]["connected_at"].clone();
    for round in 0..3 {
        c.wait_builds_done(round + 1, Duration::from_secs(60));
        // park_after is 1 s in the shared config.
        c.wait("the idle link parked", Duration::from_secs(20), |c| {
            (parked(c) == 1).then_some(())
        });
        // Parked across heartbeats (1 s): its pings are answered.
        std::thread::sleep(Duration::from_millis(2500));
        assert_eq!(
            parked(&c),
            1,
            "round {round}: the link left its parked state"
        );
        repo.commit(
            &format!("c{round}"),
            &[("x", &format!("round {}\n", round + 1))],
        );
    }
    let builds = c.wait_builds_done(4, Duration::from_secs(60));
    for b in &builds {
        assert_eq!(b["status"], "passed", "{b}");
    }
    let log = c.get_text(&format!("/api/builds/{}/log", builds[0]["id"]));
    assert!(
        log.contains("round 3"),
        "the newest build ran on its own tree: {log}"
    );
    // Woken, not reconnected: the same connection served every build.
    let m = c.get("/api/machines");
    assert_eq!(m["connected"][0]["connected_at"], connected_at, "{m}");
    assert!(!bot.log.all().contains("reconnecting"), "{}", bot.log.all());
}
