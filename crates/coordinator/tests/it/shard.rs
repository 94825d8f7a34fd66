//! Sharded steps in process (see `common/inproc.rs`): units handed out to
//! the build's machine and helpers, each run once; durations recorded and
//! used to order the next run; a failing unit fails the build by name; a
//! cancel gives every helper back. The helper killed mid-unit is in
//! `resilience.rs` (a real process gets SIGKILL).

use crate::common::TestRepo;
use crate::common::inproc::{InProc, config, rt};

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use coordinator::pool::{Holder, MachineState};
use coordinator::store::{BuildKind, BuildStatus, UnitRun};

/// A unit named `NAME-SECS` sleeps SECS; one starting with `bad` fails.
/// `built.txt` comes from the earlier step, so a helper that skipped it
/// fails every unit.
const UNIT_SH: &str = r#"test -f built.txt || { echo "not built here"; exit 3; }
echo "unit $1 (FARMER_UNIT=$FARMER_UNIT)"
case "$1" in bad*) echo "unit $1 is broken"; exit 1;; esac
exec sleep "${1#*-}"
"#;

fn builders(units: &[&str], helpers: u32, try_helpers: u32) -> String {
    format!(
        r#"
[builders.b]
host = "host-a"
presubmit = true
[[builders.b.steps]]
name = "build"
run = "echo built > built.txt"
[[builders.b.steps]]
name = "test"
shard.list = "printf '{}\n'"
shard.run = "sh unit.sh {{unit}}"
shard.helpers = {helpers}
shard.try_helpers = {try_helpers}
"#,
        units.join("\\n")
    )
}

fn machines(f: &InProc) -> Vec<(String, MachineState)> {
    f.farm
        .pool
        .snapshot()
        .into_iter()
        .map(|m| (m.hostname, m.state))
        .collect()
}

async fn all_idle(f: &InProc, n: usize) {
    f.until("every machine idle", Duration::from_secs(20), || {
        let m = machines(f);
        m.len() == n && m.iter().all(|(_, s)| *s == MachineState::Idle)
    })
    .await;
}

/// Runs per unit: (result, machine) in the order they ended.
fn by_unit(runs: &[UnitRun]) -> BTreeMap<String, Vec<(String, String)>> {
    let mut m: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for r in runs {
        m.entry(r.unit.clone())
            .or_default()
            .push((r.result.to_string(), r.machine.clone()));
    }
    m
}

#[test]
fn units_run_once_each_across_helpers_and_history_puts_the_longest_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    let commit = repo.commit("one", &[("unit.sh", UNIT_SH)]);
    // Listed shortest first, so the list's order and the measured order differ.
    // 80 ms apart at least: far beyond the noise of starting a process.
    let units = [
        "a-0", "b-0.16", "c-0.24", "d-0.32", "e-0.4", "f-0.5", "g-0.6", "h-0.08",
    ];
    rt().block_on(async {
        let f = InProc::start(&config(&repo.path, &builders(&units, 2, 0))).await;
        for m in ["m1", "m2", "m3"] {
            f.machine("host-a", m).await;
        }
        let b = f.build("b", &commit, BuildKind::PostSubmit).await;
        let id = b.id;
        assert_eq!(b.status, BuildStatus::Passed, "{b:?}");
        let runs = f.farm.store.unit_runs(id).await.unwrap();
        let per = by_unit(&runs);
        assert_eq!(per.len(), units.len(), "{runs:?}");
        for (unit, r) in &per {
            assert_eq!(r.len(), 1, "{unit} ran once: {r:?}");
            assert_eq!(r[0].0, "passed", "{unit}: {r:?}");
        }
        let used: BTreeSet<&str> = runs.iter().map(|r| r.machine.as_str()).collect();
        assert!(used.len() >= 2, "helpers took units: {used:?}");
        let log = f.step_log(id, 1).await;
        assert!(log.contains("8 units listed, no past durations"), "{log}");
        assert!(log.contains("unit g-0.6 (FARMER_UNIT=g-0.6)"), "{log}");
        assert!(log.contains("--- unit g-0.6 on m"), "{log}");
        assert!(log.contains("helper m"), "{log}");
        // Every helper went back to the pool, cleaned.
        all_idle(&f, 3).await;

        // A pre-submit build asks for try_helpers = 0: one machine, so the
        // order units start in is the order they were handed out.
        let b = f.build("b", &commit, BuildKind::PreSubmit).await;
        let id2 = b.id;
        assert_eq!(b.status, BuildStatus::Passed, "{b:?}");
        let mut runs = f.farm.store.unit_runs(id2).await.unwrap();
        assert!(
            runs.iter().all(|r| r.machine == runs[0].machine),
            "one machine: {runs:?}"
        );
        runs.sort_by_key(|r| r.started_at);
        let order: Vec<&str> = runs.iter().map(|r| r.unit.as_str()).collect();
        // Longest first by what the first build measured (on a loaded
        // machine a unit's start can cost more than the 80 ms between two
        // units' sleeps), ties in the listed order; the measured order
        // differs from the listed one.
        let past = f.farm.store.unit_runs(id).await.unwrap();
        let took = |u: &str| past.iter().find(|r| r.unit == u).unwrap().duration_ms;
        let mut expected = units.to_vec();
        expected.sort_by_key(|u| std::cmp::Reverse(took(u)));
        assert_eq!(order, expected, "{past:?}");
        assert_ne!(expected, units, "{past:?}");
        let log = f.step_log(id2, 1).await;
        assert!(
            log.contains(&format!(
                "8 units listed, 8 with past durations; longest expected first: {}",
                expected[0]
            )),
            "{log}"
        );
        assert!(!log.contains("helper"), "no helper asked for: {log}");
    });
}

#[test]
fn a_failing_unit_fails_the_build_by_name_and_helpers_go_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    let commit = repo.commit("one", &[("unit.sh", UNIT_SH)]);
    let units = ["ok-0.01", "ok2-0.01", "bad-0.05", "ok3-0.01"];
    rt().block_on(async {
        let f = InProc::start(&config(&repo.path, &builders(&units, 1, 1))).await;
        f.machine("host-a", "m1").await;
        f.machine("host-a", "m2").await;
        let b = f.build("b", &commit, BuildKind::PostSubmit).await;
        let id = b.id;
        assert_eq!(b.status, BuildStatus::Failed, "{b:?}");
        assert!(
            b.error
                .contains("step test: unit bad-0.05 failed: exit status 1"),
            "{}",
            b.error
        );
        let runs = f.farm.store.unit_runs(id).await.unwrap();
        let bad = &by_unit(&runs)["bad-0.05"];
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].0, "failed");
        let steps = f.farm.store.steps(id).await.unwrap();
        assert_eq!(steps[1].result, coordinator::store::RunResult::Failed);
        assert!(
            f.step_log(id, 1).await.contains("unit bad-0.05 is broken"),
            "the unit's output is in its section"
        );
        all_idle(&f, 2).await;
    });
}

#[test]
fn cancelling_a_sharded_build_gives_every_helper_back_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    let commit = repo.commit("one", &[("unit.sh", UNIT_SH)]);
    let units = ["long1-30", "long2-30", "long3-30", "long4-30"];
    rt().block_on(async {
        let f = InProc::start(&config(&repo.path, &builders(&units, 3, 3))).await;
        for m in ["m1", "m2", "m3"] {
            f.machine("host-a", m).await;
        }
        let id = f
            .farm
            .trigger("b", None, None, &commit, BuildKind::PostSubmit, "test")
            .await
            .unwrap();
        // Two helpers hold machines (the third request waits: no machine).
        f.until(
            "all three machines at work",
            Duration::from_secs(20),
            || {
                let m = machines(&f);
                let helpers = m
                    .iter()
                    .filter(|(_, s)| {
                        *s == MachineState::Leased {
                            holder: Holder::Helper { build_id: id },
                        }
                    })
                    .count();
                helpers == 2
                    && f.farm
                        .running(id)
                        .is_some_and(|r| r.progress.lock().unwrap().contains("3 running"))
            },
        )
        .await;
        assert_eq!(
            f.farm.scheduler.waiting("host-a"),
            1,
            "the third helper waits"
        );
        f.farm.cancel(id).await.unwrap();
        let b = f.finished(id).await;
        assert_eq!(b.status, BuildStatus::Cancelled, "{b:?}");
        all_idle(&f, 3).await;
        assert_eq!(
            f.farm.scheduler.waiting("host-a"),
            0,
            "no helper request left"
        );
        // The units cut short are on record as such.
        let runs = f.farm.store.unit_runs(id).await.unwrap();
        assert_eq!(runs.len(), 3, "{runs:?}");
        assert!(
            runs.iter().all(|r| r.result.as_str() == "cancelled"),
            "{runs:?}"
        );
    });
}
