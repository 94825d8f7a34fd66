//! `go test -json` (test2json) events, one JSON object per line, found
//! anywhere in the input: other lines are skipped, so a log that mixes
//! them with other output still yields its tests.

use std::collections::HashMap;

use serde::Deserialize;

use super::{MAX_FAILURE, MAX_TESTS, Outcome, TestResult, name, tail};

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Event {
    action: String,
    #[serde(default)]
    package: String,
    #[serde(default)]
    import_path: String,
    #[serde(default)]
    test: String,
    #[serde(default)]
    elapsed: Option<f64>,
    #[serde(default)]
    output: String,
}

/// What is known of a test (or a package, with an empty test name) while
/// its events arrive.
#[derive(Default)]
struct Open {
    output: String,
    /// Line of its `--- FAIL` output, or of its fail event.
    fail_line: Option<usize>,
}

pub fn parse(input: &[u8]) -> Vec<TestResult> {
    let text = String::from_utf8_lossy(input);
    let mut open: HashMap<(String, String), Open> = HashMap::new();
    let mut out: Vec<TestResult> = Vec::new();
    // Packages with a failed test: their own "fail" says nothing new.
    let mut failed_tests_in: HashMap<String, usize> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let l = line.trim_start();
        if !l.starts_with('{') || !l.contains("\"Action\"") {
            continue;
        }
        let Ok(e) = serde_json::from_str::<Event>(l) else {
            continue;
        };
        let package = if e.package.is_empty() {
            e.import_path.clone()
        } else {
            e.package.clone()
        };
        let key = (package.clone(), e.test.clone());
        match e.action.as_str() {
            "run" | "start" if open.len() < MAX_TESTS => {
                open.entry(key).or_default();
            }
            "output" | "build-output" => {
                // Tests still open are bounded like everything else.
                if !open.contains_key(&key) && open.len() >= MAX_TESTS {
                    continue;
                }
                let o = open.entry(key).or_default();
                // Subtests indent theirs: "    --- FAIL: TestA/sub".
                if e.output.trim_start().starts_with("--- FAIL") {
                    o.fail_line.get_or_insert(line_no);
                }
                o.output.push_str(&e.output);
                if o.output.len() > 2 * MAX_FAILURE {
                    o.output = tail(&o.output, MAX_FAILURE);
                }
            }
            "pass" | "fail" | "skip" | "build-fail" => {
                let o = open.remove(&key).unwrap_or_default();
                let outcome = match e.action.as_str() {
                    "pass" => Outcome::Pass,
                    "skip" => Outcome::Skip,
                    _ => Outcome::Fail,
                };
                if e.test.is_empty() {
                    // A package: worth a result only when it failed with
                    // no failing test to show for it (a build error, a
                    // panic outside tests, a timeout).
                    if outcome != Outcome::Fail || failed_tests_in.contains_key(&package) {
                        continue;
                    }
                }
                if outcome == Outcome::Fail && !e.test.is_empty() {
                    *failed_tests_in.entry(package.clone()).or_default() += 1;
                }
                let full = if e.test.is_empty() {
                    package.clone()
                } else if package.is_empty() {
                    e.test.clone()
                } else {
                    format!("{package}.{}", e.test)
                };
                let Some(full) = name(&full) else { continue };
                out.push(TestResult {
                    name: full,
                    outcome,
                    duration_ms: e.elapsed.map(|s| (s * 1000.0).round() as i64),
                    failure: if outcome == Outcome::Fail {
                        tail(&o.output, MAX_FAILURE)
                    } else {
                        String::new()
                    },
                    line: (outcome == Outcome::Fail).then(|| o.fail_line.unwrap_or(line_no)),
                });
                if out.len() >= MAX_TESTS {
                    break;
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: &str = r##"some build noise
{"Time":"2026-01-01T00:00:00Z","Action":"start","Package":"example.com/p"}
{"Action":"run","Package":"example.com/p","Test":"TestOK"}
{"Action":"output","Package":"example.com/p","Test":"TestOK","Output":"=== RUN   TestOK\n"}
{"Action":"pass","Package":"example.com/p","Test":"TestOK","Elapsed":0.25}
{"Action":"run","Package":"example.com/p","Test":"TestBad"}
{"Action":"output","Package":"example.com/p","Test":"TestBad","Output":"    p_test.go:9: want 2, got 3\n"}
{"Action":"output","Package":"example.com/p","Test":"TestBad","Output":"--- FAIL: TestBad (0.00s)\n"}
{"Action":"fail","Package":"example.com/p","Test":"TestBad","Elapsed":0}
{"Action":"output","Package":"example.com/p","Output":"FAIL\n"}
{"Action":"fail","Package":"example.com/p","Elapsed":0.01}
{"Action":"skip","Package":"example.com/q","Test":"TestLater"}
{"Action":"output","Package":"example.com/r","Output":"# example.com/r\nr.go:3:1: syntax error\n"}
{"Action":"fail","Package":"example.com/r","Elapsed":0}
{"Action":"fail","Package":
"##;

    #[test]
    fn tests_outcomes_failure_text_and_lines() {
        let r = parse(RUN.as_bytes());
        let by = |n: &str| r.iter().find(|t| t.name == n).unwrap();
        assert_eq!(r.len(), 4, "{r:#?}");
        assert_eq!(by("example.com/p.TestOK").outcome, Outcome::Pass);
        assert_eq!(by("example.com/p.TestOK").duration_ms, Some(250));
        let bad = by("example.com/p.TestBad");
        assert_eq!(bad.outcome, Outcome::Fail);
        assert!(bad.failure.contains("want 2, got 3"), "{bad:?}");
        assert_eq!(bad.line, Some(8));
        assert_eq!(by("example.com/q.TestLater").outcome, Outcome::Skip);
        // A package that failed without a failing test is itself a result.
        let pkg = by("example.com/r");
        assert_eq!(pkg.outcome, Outcome::Fail);
        assert!(pkg.failure.contains("syntax error"));
    }
}
