//! Machine sources and the lease queue, end to end: exec pools whose hooks
//! start and kill real `farmer buildlet` processes, broken hooks, a
//! coordinator killed with machines alive, and config reloads.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Bot, Coordinator, FARMER, TestRepo, alive};

/// A scratch dir for hooks: the event log, pid files of started
/// buildlets (killed when this is dropped, so no test leaks a process).
struct Hooks {
    dir: PathBuf,
}

impl Hooks {
    fn new(dir: &Path) -> Hooks {
        for d in ["pids", "work", "env"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        Hooks {
            dir: dir.to_path_buf(),
        }
    }

    /// A `create` that logs itself and starts a real buildlet in the
    /// background with what the coordinator passed.
    fn create_buildlet(&self) -> String {
        let d = self.dir.display();
        let script = format!(
            r#"set -e
echo "create $FARMER_HOST_TYPE $FARMER_HOSTNAME $(date +%s.%N)" >> {d}/events
test -f "$FARMER_KEY_FILE" || {{ echo "no key file" >&2; exit 9; }}
env | sort > {d}/env/$FARMER_HOSTNAME
stat -c %a "$FARMER_KEY_FILE" > {d}/env/$FARMER_HOSTNAME.keymode
{farmer} buildlet -coordinator="$FARMER_COORDINATOR" -reverse-type="$FARMER_HOST_TYPE" \
  -hostname="$FARMER_HOSTNAME" -key-file="$FARMER_KEY_FILE" -tls-pin="$FARMER_TLS_PIN" \
  -workdir={d}/work/$FARMER_HOSTNAME > {d}/work/$FARMER_HOSTNAME.log 2>&1 < /dev/null &
echo $! > {d}/pids/$FARMER_HOSTNAME
"#,
            farmer = FARMER
        );
        let path = self.dir.join("create.sh");
        std::fs::write(&path, script).unwrap();
        format!("[\"sh\", \"{}\"]", path.display())
    }

    /// A `destroy` that logs itself and kills the machine's buildlet.
    fn destroy_buildlet(&self) -> String {
        let d = self.dir.display();
        let script = format!(
            r#"echo "destroy $FARMER_HOST_TYPE $FARMER_HOSTNAME $(date +%s.%N)" >> {d}/events
if [ -f {d}/pids/$FARMER_HOSTNAME ]; then
  kill -9 $(cat {d}/pids/$FARMER_HOSTNAME) 2>/dev/null || true
  rm -f {d}/pids/$FARMER_HOSTNAME
fi
"#
        );
        let path = self.dir.join("destroy.sh");
        std::fs::write(&path, script).unwrap();
        format!("[\"sh\", \"{}\"]", path.display())
    }

    /// A shell hook that logs `verb` and then runs `rest`.
    fn logging(&self, verb: &str, rest: &str) -> String {
        let d = self.dir.display();
        format!(
            "[\"sh\", \"-c\", \"echo {verb} $FARMER_HOST_TYPE $FARMER_HOSTNAME $(date +%s.%N) >> {d}/events; {rest}\"]"
        )
    }

    /// (verb, host type, hostname, time) in the order they happened.
    fn events(&self) -> Vec<(String, String, String, f64)> {
        let text = std::fs::read_to_string(self.dir.join("events")).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                Some((
                    f.first()?.to_string(),
                    f.get(1)?.to_string(),
                    f.get(2)?.to_string(),
                    f.get(3)?.parse().ok()?,
                ))
            })
            .collect()
    }

    fn names(&self, verb: &str, host_type: &str) -> Vec<String> {
        self.events()
            .into_iter()
            .filter(|e| e.0 == verb && e.1 == host_type)
            .map(|e| e.2)
            .collect()
    }

    fn times(&self, verb: &str, host_type: &str) -> Vec<f64> {
        self.events()
            .into_iter()
            .filter(|e| e.0 == verb && e.1 == host_type)
            .map(|e| e.3)
            .collect()
    }

    /// Buildlets started by `create` and not killed by `destroy`.
    fn live_pids(&self) -> BTreeMap<String, u32> {
        let mut out = BTreeMap::new();
        for e in std::fs::read_dir(self.dir.join("pids")).unwrap() {
            let e = e.unwrap();
            if let Ok(p) = std::fs::read_to_string(e.path()).unwrap().trim().parse() {
                out.insert(e.file_name().to_string_lossy().into_owned(), p);
            }
        }
        out
    }
}

impl Drop for Hooks {
    fn drop(&mut self) {
        for pid in self.live_pids().values() {
            let _ = Command::new("kill")
                .args(["-9", &pid.to_string()])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

fn signal(c: &Coordinator, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &c.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

/// Waits for the coordinator process to exit after SIGTERM.
fn terminate(c: &mut Coordinator, limit: Duration) {
    signal(c, "-TERM");
    let start = Instant::now();
    while start.elapsed() < limit {
        if c.child.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "coordinator did not stop within {limit:?}:\n{}",
        c.err.all()
    );
}

fn farm_config(repo: &Path, rest: &str) -> String {
    format!(
        r#"[farm]
heartbeat = "1s"
heartbeat_timeout = "30s"

[repos.r]
url = "{}"
branches = ["main"]
poll_interval = "300ms"

{rest}
"#,
        repo.display()
    )
}

/// A farm in `dir` with a repo of `commits` commits and an exec host type
/// whose hooks start and kill real buildlets, with `settings` added to
/// its section and a builder `b` running `step` on it.
fn exec_farm(
    dir: &Path,
    hooks: &Hooks,
    commits: usize,
    host_type: &str,
    settings: &str,
    step: &str,
) -> PathBuf {
    let mut repo = TestRepo::new(&dir.join("repo"));
    for i in 0..commits {
        repo.commit(&format!("c{i}"), &[("x", &i.to_string())]);
    }
    let cfg = dir.join("farm.toml");
    let hosts = format!(
        r#"[hosts.{host_type}]
pool = "exec"
create = {}
destroy = {}
{settings}

[builders.b]
host = "{host_type}"
[[builders.b.steps]]
name = "work"
run = "{step}"
"#,
        hooks.create_buildlet(),
        hooks.destroy_buildlet()
    );
    std::fs::write(&cfg, farm_config(&repo.path, &hosts)).unwrap();
    cfg
}

fn source(c: &Coordinator, host_type: &str) -> serde_json::Value {
    c.get("/api/sources")
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["host_type"] == host_type)
        .cloned()
        .unwrap_or_else(|| panic!("no source for {host_type}"))
}

fn instances(c: &Coordinator, host_type: &str, state: &str) -> Vec<String> {
    source(c, host_type)["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] == state)
        .map(|i| i["hostname"].as_str().unwrap().to_string())
        .collect()
}

fn machines_of(c: &Coordinator, host_type: &str) -> Vec<serde_json::Value> {
    c.get("/api/machines")["connected"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["host_type"] == host_type)
        .cloned()
        .collect()
}

fn attempt_machines(c: &Coordinator, builds: &[serde_json::Value]) -> Vec<String> {
    builds
        .iter()
        .flat_map(|b| {
            let d = c.get(&format!("/api/builds/{}", b["id"]));
            d["attempts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["machine"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn exec_pool_scales_up_under_a_burst_and_back_to_min_idle() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = Hooks::new(&dir.path().join("hooks"));
    let cfg = exec_farm(
        dir.path(),
        &hooks,
        5,
        "host-elastic",
        "max = 3\nmin_idle = 1\nidle_timeout = \"2s\"\nregister_timeout = \"60s\"",
        "sleep 2; echo built-on-$FARMER_HOST_TYPE",
    );
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let builds = c.wait_builds_done(5, Duration::from_secs(120));
    assert_eq!(builds.len(), 5);
    assert!(builds.iter().all(|b| b["status"] == "passed"), "{builds:?}");
    let created = hooks.names("create", "host-elastic");
    assert!(
        created.len() >= 2,
        "a burst of 5 builds on 1 warm machine scales up: {created:?}"
    );
    // Never more than max alive at once (counting from create to destroy).
    let mut alive_now = 0i32;
    let mut most = 0;
    for (verb, ..) in hooks.events() {
        alive_now += if verb == "create" { 1 } else { -1 };
        most = most.max(alive_now);
    }
    assert!(most <= 3, "more than max machines: {:?}", hooks.events());
    // The builds ran on machines the pool created.
    let used: BTreeSet<String> = attempt_machines(&c, &builds).into_iter().collect();
    assert!(
        used.iter().all(|m| created.contains(m)),
        "{used:?} {created:?}"
    );
    // Back to min_idle once idle_timeout passes: one warm machine left.
    c.wait("the pool back at min_idle", Duration::from_secs(60), |c| {
        let registered = instances(c, "host-elastic", "registered");
        let all = source(c, "host-elastic")["instances"]
            .as_array()
            .unwrap()
            .len();
        (registered.len() == 1 && all == 1 && machines_of(c, "host-elastic").len() == 1)
            .then_some(())
    });
    let destroyed = hooks.names("destroy", "host-elastic");
    let created = hooks.names("create", "host-elastic");
    assert_eq!(destroyed.len(), created.len() - 1, "{:?}", hooks.events());
    assert_eq!(hooks.live_pids().len(), 1, "one buildlet left running");
    // Hooks get a clean environment plus the FARMER_* variables, and the
    // key in a private file.
    let env = std::fs::read_to_string(hooks.dir.join("env").join(&created[0])).unwrap();
    for var in [
        "FARMER_HOSTNAME=",
        "FARMER_HOST_TYPE=host-elastic",
        "FARMER_COORDINATOR=127.0.0.1:",
        "FARMER_TLS_PIN=",
        "FARMER_KEY_FILE=",
    ] {
        assert!(env.contains(var), "{var} missing from:\n{env}");
    }
    assert!(
        !env.contains("FARMER_LOG="),
        "the coordinator's environment leaked:\n{env}"
    );
    let mode = std::fs::read_to_string(
        hooks
            .dir
            .join("env")
            .join(format!("{}.keymode", created[0])),
    )
    .unwrap();
    assert_eq!(mode.trim(), "600");
    // The page and metrics say what the pool does.
    let metrics = c.get_text("/metrics");
    assert!(
        metrics.contains("farmer_exec_machines{host_type=\"host-elastic\",state=\"registered\"} 1"),
        "{metrics}"
    );
}

#[test]
fn ephemeral_machines_serve_one_build_each() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = Hooks::new(&dir.path().join("hooks"));
    let cfg = exec_farm(
        dir.path(),
        &hooks,
        3,
        "host-once",
        "max = 2\nephemeral = true",
        "test ! -e ../leftover && touch ../leftover && echo fresh",
    );
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let builds = c.wait_builds_done(3, Duration::from_secs(120));
    assert!(builds.iter().all(|b| b["status"] == "passed"), "{builds:?}");
    let used = attempt_machines(&c, &builds);
    let distinct: BTreeSet<&String> = used.iter().collect();
    assert_eq!(used.len(), 3, "{used:?}");
    assert_eq!(distinct.len(), 3, "a fresh machine per build: {used:?}");
    c.wait(
        "every used machine destroyed",
        Duration::from_secs(30),
        |_| {
            let destroyed: BTreeSet<String> =
                hooks.names("destroy", "host-once").into_iter().collect();
            used.iter().all(|m| destroyed.contains(m)).then_some(())
        },
    );
    assert_eq!(
        hooks.names("create", "host-once").len(),
        3,
        "no more machines than requests: {:?}",
        hooks.events()
    );
    c.wait("no exec machine left", Duration::from_secs(30), |c| {
        (source(c, "host-once")["instances"]
            .as_array()
            .unwrap()
            .is_empty()
            && hooks.live_pids().is_empty())
        .then_some(())
    });
}

#[test]
fn failing_hanging_and_silent_hooks_are_destroyed_counted_and_backed_off() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = Hooks::new(&dir.path().join("hooks"));
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    repo.commit("one", &[("x", "1")]);
    let destroy = hooks.logging("destroy", "true");
    let pids = hooks.dir.join("pids").display().to_string();
    let mut rest = String::new();
    for (ht, create, extra) in [
        (
            "host-fail",
            hooks.logging("create", "echo boom >&2; exit 3"),
            "",
        ),
        (
            "host-hang",
            hooks.logging(
                "create",
                &format!("echo $$ > {pids}/hang-$FARMER_HOSTNAME; exec sleep 600"),
            ),
            "create_timeout = \"1s\"",
        ),
        (
            "host-silent",
            hooks.logging("create", "true"),
            "register_timeout = \"1s\"",
        ),
    ] {
        rest.push_str(&format!(
            r#"
[hosts.{ht}]
pool = "exec"
create = {create}
destroy = {destroy}
max = 2
{extra}

[builders.b-{ht}]
host = "{ht}"
[[builders.b-{ht}.steps]]
name = "work"
run = "true"
"#
        ));
    }
    let cfg = dir.path().join("farm.toml");
    std::fs::write(&cfg, farm_config(&repo.path, &rest)).unwrap();
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    for ht in ["host-fail", "host-hang", "host-silent"] {
        c.wait(
            &format!("three failed machines of {ht}, each destroyed"),
            Duration::from_secs(60),
            |_| {
                (hooks.names("create", ht).len() >= 3 && hooks.names("destroy", ht).len() >= 2)
                    .then_some(())
            },
        );
    }
    // Each failure pauses creation: 1 s after the first, 2 s after the second.
    for ht in ["host-fail", "host-hang", "host-silent"] {
        let t = hooks.times("create", ht);
        assert!(
            t[1] - t[0] >= 0.99,
            "{ht}: no backoff after a failure: {t:?}"
        );
        assert!(t[2] - t[1] >= 1.98, "{ht}: backoff does not grow: {t:?}");
    }
    // Every created machine was destroyed (or is about to be).
    for ht in ["host-fail", "host-hang", "host-silent"] {
        let created = hooks.names("create", ht);
        c.wait(&format!("{ht} destroys"), Duration::from_secs(30), |_| {
            let destroyed: BTreeSet<String> = hooks.names("destroy", ht).into_iter().collect();
            created[..2]
                .iter()
                .all(|n| destroyed.contains(n))
                .then_some(())
        });
    }
    // The hung hooks were killed (each wrote its pid before it hung).
    let destroyed = hooks.names("destroy", "host-hang");
    let hung: Vec<u32> = hooks
        .live_pids()
        .into_iter()
        .filter(|(name, _)| {
            name.strip_prefix("hang-")
                .is_some_and(|h| destroyed.iter().any(|d| d == h))
        })
        .map(|(_, pid)| pid)
        .collect();
    assert!(hung.len() >= 2, "{:?}", hooks.live_pids());
    for pid in hung {
        c.wait(
            "the hung create to be killed",
            Duration::from_secs(10),
            |_| (!alive(pid)).then_some(()),
        );
    }
    // Counted by reason, with the hook's words.
    let metrics = c.get_text("/metrics");
    for (ht, reason) in [
        ("host-fail", "create-failed"),
        ("host-hang", "create-timeout"),
        ("host-silent", "register-timeout"),
    ] {
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "farmer_exec_failures_total{{host_type=\"{ht}\",reason=\"{reason}\"}}"
                ))
            })
            .unwrap_or_else(|| panic!("no {reason} count for {ht}:\n{metrics}"));
        let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n >= 2, "{line}");
    }
    // The status page shows the pools and their failures.
    let page = c.get_text("/status");
    assert!(page.contains("<h2>Exec pools</h2>"), "{page}");
    for needle in ["host-hang", "create-timeout", "register-timeout", "boom"] {
        assert!(page.contains(needle), "{needle} not on /status");
    }
    let fail = source(&c, "host-fail");
    let detail = fail["recent_failures"][0]["detail"].as_str().unwrap();
    assert!(detail.contains("boom"), "{detail}");
    assert!(detail.contains("exit status: 3"), "{detail}");
    // The builds wait; they do not fail because machines could not be made.
    let builds = c.get("/api/builds");
    assert!(
        builds
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["status"] == "queued"),
        "{builds}"
    );
    let queue = c.get("/api/queue");
    let fail_q = queue
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["host_type"] == "host-fail")
        .unwrap();
    assert!(
        fail_q["reason"].as_str().unwrap().contains("exec pool"),
        "{fail_q}"
    );
}

#[test]
fn exec_machines_left_by_a_killed_coordinator_are_destroyed_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = Hooks::new(&dir.path().join("hooks"));
    // No commit, so no build: the only demand is min_idle.
    let cfg = exec_farm(
        dir.path(),
        &hooks,
        0,
        "host-warm",
        "max = 4\nmin_idle = 2",
        "true",
    );
    let data = dir.path().join("data");
    let mut c = Coordinator::start(&data, &cfg);
    c.wait("two warm machines", Duration::from_secs(60), |c| {
        (instances(c, "host-warm", "registered").len() == 2).then_some(())
    });
    // Exactly min_idle: a machine that just registered counts as idle,
    // not as a reason to create another. Watched for a few ticks.
    for _ in 0..10 {
        assert_eq!(
            hooks.names("create", "host-warm").len(),
            2,
            "{:?}",
            hooks.events()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let first: Vec<String> = hooks.names("create", "host-warm");
    c.kill();
    let leaked = hooks.live_pids();
    assert_eq!(leaked.len(), 2, "SIGKILL leaves the machines running");
    let mut c = Coordinator::start(&data, &cfg);
    c.wait(
        "the old machines destroyed",
        Duration::from_secs(60),
        |_| {
            let destroyed = hooks.names("destroy", "host-warm");
            first.iter().all(|n| destroyed.contains(n)).then_some(())
        },
    );
    for (name, pid) in &leaked {
        c.wait(
            &format!("{name}'s buildlet gone"),
            Duration::from_secs(10),
            |_| (!alive(*pid)).then_some(()),
        );
    }
    // New warm machines replace them; the old names are not admitted.
    c.wait("two new warm machines", Duration::from_secs(60), |c| {
        let reg = instances(c, "host-warm", "registered");
        (reg.len() == 2 && reg.iter().all(|n| !first.contains(n))).then_some(())
    });
    // A reload that raises min_idle applies in place: one more machine,
    // none of the running ones destroyed.
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("min_idle = 2", "min_idle = 3")).unwrap();
    let destroyed_before = hooks.names("destroy", "host-warm").len();
    signal(&c, "-HUP");
    c.wait("a third warm machine", Duration::from_secs(60), |c| {
        (instances(c, "host-warm", "registered").len() == 3).then_some(())
    });
    assert_eq!(
        hooks.names("destroy", "host-warm").len(),
        destroyed_before,
        "a settings change destroyed machines: {:?}",
        hooks.events()
    );
    // A graceful stop destroys what is running.
    let second: Vec<String> = hooks
        .names("create", "host-warm")
        .into_iter()
        .filter(|n| !first.contains(n))
        .collect();
    assert_eq!(second.len(), 3);
    terminate(&mut c, Duration::from_secs(60));
    let destroyed = hooks.names("destroy", "host-warm");
    assert!(
        second.iter().all(|n| destroyed.contains(n)),
        "{:?}",
        hooks.events()
    );
    assert!(hooks.live_pids().is_empty(), "{:?}", hooks.live_pids());
}

#[test]
fn reload_polls_added_repos_and_drains_removed_host_types() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    repo.commit("one", &[("x", "1")]);
    let mut other = TestRepo::new(&dir.path().join("other"));
    other.commit("first of other", &[("y", "1")]);
    let base = |extra: &str| {
        format!(
            r#"{}
[hosts.host-a]
pool = "reverse"
{extra}
[builders.b]
host = "host-a"
[[builders.b.steps]]
name = "work"
run = "true"
"#,
            farm_config(&repo.path, "")
        )
    };
    let cfg = dir.path().join("farm.toml");
    std::fs::write(&cfg, base("[hosts.host-gone]\npool = \"reverse\"\n")).unwrap();
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let bots = dir.path().join("bots");
    let _a = Bot::start(&c, &bots, "host-a", "a-1", Some(&c.key("host-a")));
    let _g = Bot::start(&c, &bots, "host-gone", "gone-1", Some(&c.key("host-gone")));
    c.wait_connected(2);
    c.wait_builds_done(1, Duration::from_secs(60));
    // Add a repo, remove a host type.
    let added = format!(
        "{}\n[repos.other]\nurl = \"{}\"\nbranches = [\"main\"]\npoll_interval = \"300ms\"\n",
        base(""),
        other.path.display()
    );
    std::fs::write(&cfg, added).unwrap();
    signal(&c, "-HUP");
    let builds = c.wait_builds_done(2, Duration::from_secs(60));
    assert!(
        builds
            .iter()
            .any(|b| b["repo"] == "other" && b["status"] == "passed"),
        "{builds:?}"
    );
    c.wait(
        "the removed host type's machine gone",
        Duration::from_secs(30),
        |c| (c.connected() == vec!["a-1".to_string()]).then_some(()),
    );
    assert!(
        c.err
            .wait_for("host type host-gone removed", Duration::from_secs(5)),
        "{}",
        c.err.all()
    );
    assert!(c.err.all().contains("repo other polled"), "{}", c.err.all());
}

#[test]
fn queued_requests_are_listed_and_a_cancelled_one_takes_no_machine() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    repo.commit("one", &[("x", "1")]);
    repo.commit("two", &[("x", "2")]);
    let cfg = dir.path().join("farm.toml");
    std::fs::write(
        &cfg,
        farm_config(
            &repo.path,
            r#"[hosts.host-q]
pool = "reverse"
expected = 1

[builders.b]
host = "host-q"
[[builders.b.steps]]
name = "work"
run = "true"
"#,
        ),
    )
    .unwrap();
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let q = c.wait("two waiting requests", Duration::from_secs(30), |c| {
        let q = c.get("/api/queue");
        let first = q.as_array()?.first()?.clone();
        (first["waiting"] == 2).then_some(first)
    });
    let reqs = q["requests"].as_array().unwrap();
    assert_eq!(reqs[0]["holder"], "build", "{q}");
    assert_eq!(reqs[0]["priority"], "post-submit", "{q}");
    assert!(
        q["reason"]
            .as_str()
            .unwrap()
            .contains("no machine of host-q connected"),
        "{q}"
    );
    // Newest commit first: the second build is first in line.
    let ids: Vec<i64> = reqs
        .iter()
        .map(|r| r["build_id"].as_i64().unwrap())
        .collect();
    assert!(ids[0] > ids[1], "{q}");
    let (status, _) = c.post(
        &format!("/api/builds/{}/cancel", ids[1]),
        "",
        Some(&c.token),
    );
    assert_eq!(status, 200);
    let q = c.get("/api/queue");
    assert_eq!(q[0]["waiting"], 1, "{q}");
    let _bot = Bot::start(
        &c,
        &dir.path().join("bots"),
        "host-q",
        "q-1",
        Some(&c.key("host-q")),
    );
    let builds = c.wait_builds_done(2, Duration::from_secs(60));
    let by_id: BTreeMap<i64, String> = builds
        .iter()
        .map(|b| {
            (
                b["id"].as_i64().unwrap(),
                b["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(by_id[&ids[0]], "passed");
    assert_eq!(by_id[&ids[1]], "cancelled");
    let detail = c.get(&format!("/api/builds/{}", ids[1]));
    assert!(
        detail["attempts"].as_array().unwrap().is_empty(),
        "{detail}"
    );
    c.wait("the machine idle again", Duration::from_secs(30), |c| {
        (c.get("/api/machines")["connected"][0]["state"] == "idle").then_some(())
    });
    assert!(c.get("/api/queue").as_array().unwrap().is_empty());
}
