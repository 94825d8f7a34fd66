//! Test results and flakes, in process (see `common/inproc.rs`): results
//! read from what real tools print and write (`cargo test`, pytest's JUnit
//! XML), failed tests re-run on another machine, flaky tests and units.

use crate::common::TestRepo;
use crate::common::inproc::{InProc, config, rt};

use std::time::Duration;

use coordinator::pool::MachineState;
use coordinator::store::{BuildKind, BuildStatus};

/// A dashboard page of the in-process farm, through its real router.
async fn page(f: &InProc, path: &str) -> String {
    f.get(path).await
}

/// A libtest-style report: `tests::flaky` fails until `$MARK` exists (its
/// first run creates it), `tests::broken` fails when `$BROKEN` is set.
const LIBTEST_SH: &str = r#"echo "running 3 tests"
echo "test tests::ok ... ok"
if [ -e "$MARK" ]; then flaky=ok; else flaky=FAILED; touch "$MARK"; fi
echo "test tests::flaky ... $flaky"
if [ -n "$BROKEN" ]; then broken=FAILED; else broken=ok; fi
echo "test tests::broken ... $broken"
echo
echo "failures:"
echo
[ $flaky = FAILED ] && { echo "---- tests::flaky stdout ----"; echo "thread 'tests::flaky' panicked at src/lib.rs:7:5:"; echo "timing out on a busy machine"; echo; }
[ $broken = FAILED ] && { echo "---- tests::broken stdout ----"; echo "assertion failed: 1 == 2"; echo; }
echo "retry: [$FARMER_RETRY] $FARMER_RETRY_TESTS"
if [ $flaky = FAILED ] || [ $broken = FAILED ]; then echo "test result: FAILED."; exit 101; fi
echo "test result: ok."
"#;

fn builder(mark: &std::path::Path, broken: bool) -> String {
    format!(
        r#"
[builders.b]
host = "host-a"
retry_failed = 1
env = {{ MARK = "{}"{} }}
[[builders.b.steps]]
name = "test"
run = "sh test.sh"
"#,
        mark.display(),
        if broken { ", BROKEN = \"1\"" } else { "" }
    )
}

#[test]
fn a_test_that_fails_then_passes_on_another_machine_is_flaky_and_the_build_passes_with_flakes() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    let commit = repo.commit("one", &[("test.sh", LIBTEST_SH)]);
    let mark = dir.path().join("flaky-ran-once");
    rt().block_on(async {
        let f = InProc::start(&config(&repo.path, &builder(&mark, false))).await;
        f.machine("host-a", "m1").await;
        f.machine("host-a", "m2").await;
        let b = f.build("b", &commit, BuildKind::PostSubmit).await;
        let id = b.id;
        assert_eq!(b.status, BuildStatus::Passed, "{b:?}");
        assert!(b.flaky, "passed with flakes: {b:?}");
        let tests = f.farm.store.build_tests(id, 100).await.unwrap();
        let outcome = |n: &str| {
            tests
                .iter()
                .find(|t| t.name == n)
                .map(|t| t.outcome.clone())
                .unwrap_or_default()
        };
        assert_eq!(outcome("tests::flaky"), "flaky", "{tests:#?}");
        assert_eq!(outcome("tests::ok"), "pass");
        let flaky = tests.iter().find(|t| t.name == "tests::flaky").unwrap();
        assert!(
            flaky.failure.contains("timing out on a busy machine"),
            "{flaky:?}"
        );
        let steps = f.farm.store.steps(id).await.unwrap();
        assert_eq!(steps[0].result, coordinator::store::RunResult::Passed);
        assert!(steps[0].detail.contains("flaky: tests::flaky"), "{steps:?}");
        let log = f.step_log(id, 0).await;
        // The failure's line in the step's log is the one stored.
        let line = log
            .lines()
            .nth(flaky.log_line.unwrap() as usize - 1)
            .unwrap();
        assert_eq!(line, "---- tests::flaky stdout ----", "{log}");
        // The re-run went to the other machine, told which tests to run.
        let main = &f.farm.store.attempts(id).await.unwrap()[0].machine;
        let other = if main == "m1" { "m2" } else { "m1" };
        assert!(
            log.contains(&format!(
                "re-run 1 of 1 on {other} for 1 failed test: tests::flaky"
            )),
            "{log}"
        );
        assert!(log.contains("retry: [1] tests::flaky"), "{log}");
        f.until("both machines idle", Duration::from_secs(20), || {
            f.farm
                .pool
                .snapshot()
                .iter()
                .all(|m| m.state == MachineState::Idle)
        })
        .await;
        let metrics = coordinator::api::metrics::render(&f.farm).await;
        assert!(
            metrics.contains("farmer_flaky_tests_total{builder=\"b\"} 1"),
            "{metrics}"
        );
        // /flakes lists it: flaky in its one build of b.
        let flakes = page(&f, "/flakes?mode=json").await;
        let flakes: serde_json::Value = serde_json::from_str(&flakes).unwrap();
        let t = &flakes["tests"][0];
        assert_eq!(t["name"], "tests::flaky", "{flakes}");
        assert_eq!(t["builder"], "b");
        assert_eq!(
            (t["flaky"].as_i64(), t["runs"].as_i64()),
            (Some(1), Some(1))
        );
        assert_eq!(t["rate"], 1.0);
        assert_eq!(t["last_flaky_build"], id);
        let html = page(&f, "/flakes").await;
        assert!(
            html.contains("tests::flaky") && html.contains("100%"),
            "{html}"
        );
        let html = page(&f, "/tests/tests::flaky").await;
        assert!(html.contains(">flaky</a>"), "{html}");
        let html = page(&f, &format!("/builds/{id}")).await;
        assert!(html.contains("passed with flakes"), "{html}");
        assert!(html.contains("id=\"first-failure\""), "{html}");
    });
}

#[test]
fn a_test_that_fails_every_time_fails_the_build_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    let commit = repo.commit("one", &[("test.sh", LIBTEST_SH)]);
    let mark = dir.path().join("flaky-ran-once");
    rt().block_on(async {
        let f = InProc::start(&config(&repo.path, &builder(&mark, true))).await;
        f.machine("host-a", "m1").await;
        let b = f.build("b", &commit, BuildKind::PostSubmit).await;
        let id = b.id;
        assert_eq!(b.status, BuildStatus::Failed, "{b:?}");
        assert!(!b.flaky);
        assert!(
            b.error.contains("failing tests: tests::broken"),
            "{}",
            b.error
        );
        let tests = f.farm.store.build_tests(id, 100).await.unwrap();
        // Failing first; the one that passed on the re-run is flaky.
        assert_eq!(tests[0].name, "tests::broken");
        assert_eq!(tests[0].outcome, "fail");
        assert!(tests[0].failure.contains("assertion failed: 1 == 2"));
        assert_eq!(
            tests
                .iter()
                .find(|t| t.name == "tests::flaky")
                .unwrap()
                .outcome,
            "flaky"
        );
        // With one machine the re-run used it.
        let log = f.step_log(id, 0).await;
        assert!(
            log.contains("re-run 1 of 1 on the build's own machine"),
            "{log}"
        );
        // The grid cell's hover text names the failing test (the commit
        // is what the poller would have recorded).
        f.farm
            .store
            .add_commit(
                &coordinator::store::CommitRow {
                    repo: "r".into(),
                    hash: commit.clone(),
                    author: "A".into(),
                    email: "a@example.com".into(),
                    time: 1,
                    subject: "one".into(),
                    parents: Vec::new(),
                },
                "main",
            )
            .await
            .unwrap();
        let grid = page(&f, "/").await;
        assert!(
            grid.contains(&format!(
                "href=\"/builds/{id}\" title=\"failed: tests::broken\""
            )),
            "{grid}"
        );
    });
}

#[test]
fn a_unit_that_fails_then_passes_is_flaky_and_runs_again_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("unit-ran-once");
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    let unit_sh = format!(
        "case \"$1\" in flaky) if [ -e {m} ]; then echo fine now; else touch {m}; echo 'flaked: port in use'; exit 1; fi;; *) true;; esac\n",
        m = mark.display()
    );
    let commit = repo.commit("one", &[("unit.sh", &unit_sh)]);
    let builders = r#"
[builders.b]
host = "host-a"
retry_failed = 2
[[builders.b.steps]]
name = "test"
shard.list = "printf 'flaky\na\nb\n'"
shard.run = "sh unit.sh {unit}"
shard.helpers = 1
"#;
    rt().block_on(async {
        let f = InProc::start(&config(&repo.path, builders)).await;
        f.machine("host-a", "m1").await;
        f.machine("host-a", "m2").await;
        let b = f.build("b", &commit, BuildKind::PostSubmit).await;
        let id = b.id;
        assert_eq!(b.status, BuildStatus::Passed, "{b:?}");
        assert!(b.flaky, "{b:?}");
        let runs = f.farm.store.unit_runs(id).await.unwrap();
        let flaky: Vec<_> = runs.iter().filter(|r| r.unit == "flaky").collect();
        assert_eq!(flaky.len(), 2, "{runs:?}");
        assert_eq!(flaky[0].result.as_str(), "failed");
        assert_eq!(flaky[1].result.as_str(), "passed");
        let tests = f.farm.store.build_tests(id, 100).await.unwrap();
        let t = tests.iter().find(|t| t.name == "flaky").unwrap();
        assert_eq!(t.outcome, "flaky", "{tests:#?}");
        assert!(t.failure.contains("flaked: port in use"), "{t:?}");
        let log = f.step_log(id, 0).await;
        let line = log.lines().nth(t.log_line.unwrap() as usize - 1).unwrap();
        assert!(line.starts_with("--- unit flaky on m"), "{line}");
        assert!(
            log.contains("farmer: flaky (failed, then passed when run again): flaky"),
            "{log}"
        );
    });
}

/// A crate whose `cargo test` has one passing and one failing test.
const CARGO_TOML: &str =
    "[package]\nname = \"sample\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n";
const LIB_RS: &str = r#"pub fn add(a: i32, b: i32) -> i32 {
    a + b
}

#[cfg(test)]
mod tests {
    #[test]
    fn adds() {
        assert_eq!(super::add(1, 2), 3);
    }

    #[test]
    fn breaks() {
        assert_eq!(super::add(2, 2), 5, "two and two");
    }
}
"#;

/// A Python project whose pytest run writes JUnit XML.
const TEST_PY: &str = r#"import pytest

def test_ok():
    assert 1 + 1 == 2

def test_wrong():
    assert {"a": 1} == {"a": 2}, "dicts differ"

@pytest.mark.skip(reason="not today")
def test_later():
    pass
"#;

#[test]
fn results_from_a_real_cargo_test_and_a_real_pytest_junit_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    let commit = repo.commit(
        "one",
        &[
            ("Cargo.toml", CARGO_TOML),
            ("src/lib.rs", LIB_RS),
            ("py/test_sample.py", TEST_PY),
        ],
    );
    let builders = r#"
[builders.rust]
host = "host-a"
timeout = "5m"
env = { CARGO_TARGET_DIR = "target", CARGO_TERM_COLOR = "never" }
[[builders.rust.steps]]
name = "test"
run = "cargo test --offline"
timeout = "4m"

[builders.py]
host = "host-a"
[[builders.py.steps]]
name = "pytest"
dir = "py"
run = "python3 -m pytest -q -p no:cacheprovider --junitxml=out/report.xml"
results = ["junit:out/*.xml", "go-json:missing.json"]
"#;
    rt().block_on(async {
        let f = InProc::start(&config(&repo.path, builders)).await;
        f.machine("host-a", "m1").await;
        let rust = f
            .farm
            .trigger("rust", None, None, &commit, BuildKind::PostSubmit, "test")
            .await
            .unwrap();
        let py = f
            .farm
            .trigger("py", None, None, &commit, BuildKind::PostSubmit, "test")
            .await
            .unwrap();
        let b = f.finished_within(rust, Duration::from_secs(240)).await;
        assert_eq!(b.status, BuildStatus::Failed, "{b:?}");
        assert!(
            b.error.contains("failing tests: tests::breaks"),
            "{}",
            b.error
        );
        let tests = f.farm.store.build_tests(rust, 100).await.unwrap();
        let names: Vec<(&str, &str)> = tests
            .iter()
            .map(|t| (t.name.as_str(), t.outcome.as_str()))
            .collect();
        assert!(names.contains(&("tests::breaks", "fail")), "{names:?}");
        assert!(names.contains(&("tests::adds", "pass")), "{names:?}");
        let breaks = &tests[0];
        assert!(breaks.failure.contains("two and two"), "{breaks:?}");
        let log = f.step_log(rust, 0).await;
        let line = log
            .lines()
            .nth(breaks.log_line.unwrap() as usize - 1)
            .unwrap();
        assert_eq!(line, "---- tests::breaks stdout ----", "{log}");

        let b = f.finished_within(py, Duration::from_secs(120)).await;
        assert_eq!(b.status, BuildStatus::Failed, "{b:?}");
        assert!(
            b.error.contains("failing tests: test_sample.test_wrong"),
            "{}",
            b.error
        );
        let tests = f.farm.store.build_tests(py, 100).await.unwrap();
        let by = |n: &str| tests.iter().find(|t| t.name == n).unwrap();
        assert_eq!(by("test_sample.test_ok").outcome, "pass");
        assert_eq!(by("test_sample.test_later").outcome, "skip");
        let wrong = by("test_sample.test_wrong");
        assert_eq!(wrong.outcome, "fail");
        assert!(wrong.failure.contains("dicts differ"), "{wrong:?}");
        assert!(wrong.duration_ms.is_some());
        // A result file that is not there is said, not fatal.
        let log = f.step_log(py, 0).await;
        assert!(
            log.contains("results \"missing.json\": no file matched"),
            "{log}"
        );
    });
}

/// A re-run that runs nothing (a filter that matches no test) and exits 0
/// clears nothing: the test is not flaky and the build fails.
#[test]
fn a_rerun_that_does_not_report_the_test_passing_does_not_make_it_flaky() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    let script = r#"if [ -n "$FARMER_RETRY" ]; then echo "running 0 tests"; echo "test result: ok."; exit 0; fi
echo "test tests::real ... FAILED"
echo "failures:"
echo "---- tests::real stdout ----"
echo "it is really broken"
exit 101
"#;
    let commit = repo.commit("one", &[("test.sh", script)]);
    let builders = r#"
[builders.b]
host = "host-a"
retry_failed = 2
[[builders.b.steps]]
name = "test"
run = "sh test.sh"
"#;
    rt().block_on(async {
        let f = InProc::start(&config(&repo.path, builders)).await;
        f.machine("host-a", "m1").await;
        let b = f.build("b", &commit, BuildKind::PostSubmit).await;
        let id = b.id;
        assert_eq!(b.status, BuildStatus::Failed, "{b:?}");
        assert!(!b.flaky);
        assert!(
            b.error.contains("failing tests: tests::real"),
            "{}",
            b.error
        );
        let tests = f.farm.store.build_tests(id, 10).await.unwrap();
        assert_eq!(tests[0].outcome, "fail", "{tests:?}");
        let log = f.step_log(id, 0).await;
        assert!(log.contains("re-run 2 of 2"), "both re-runs ran: {log}");
        assert!(log.contains("0 of 1 now pass"), "{log}");
    });
}
