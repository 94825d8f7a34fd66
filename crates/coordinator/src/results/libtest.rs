//! libtest's report (`cargo test`, any Rust test binary): `test NAME ...
//! ok|FAILED|ignored` lines, and the `---- NAME stdout ----` sections that
//! hold what a failed test printed. Several binaries' reports may follow
//! each other in one log.

use std::collections::HashMap;

use super::{MAX_FAILURE, MAX_TESTS, Outcome, TestResult, name, tail};

static RESULT_LINE: std::sync::LazyLock<regex_lite::Regex> = std::sync::LazyLock::new(|| {
    regex_lite::Regex::new(r"^test (.+?) \.\.\. (ok|FAILED|ignored)(?:, .*)?(?: <([0-9.]+)s>)?\s*$")
        .expect("a valid pattern")
});

pub fn parse(input: &[u8]) -> Vec<TestResult> {
    let text = String::from_utf8_lossy(input);
    let result_line = &*RESULT_LINE;
    let mut out: Vec<TestResult> = Vec::new();
    // Failed tests of the current binary's report, by name.
    let mut failed: HashMap<String, usize> = HashMap::new();
    // The failure section being read: (index in `out`, text so far).
    let mut section: Option<(usize, String)> = None;
    let close = |section: &mut Option<(usize, String)>, out: &mut Vec<TestResult>| {
        if let Some((i, text)) = section.take() {
            let text = text.trim_matches('\n');
            if !text.trim().is_empty() {
                out[i].failure = tail(text, MAX_FAILURE);
            }
        }
    };
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.starts_with("running ") && line.ends_with(" tests")
            || line.starts_with("running 1 test")
        {
            close(&mut section, &mut out);
            failed.clear();
            continue;
        }
        if let Some(c) = result_line.captures(line) {
            close(&mut section, &mut out);
            if out.len() >= MAX_TESTS {
                continue;
            }
            let Some(n) = name(&c[1]) else { continue };
            let outcome = match &c[2] {
                "ok" => Outcome::Pass,
                "ignored" => Outcome::Skip,
                _ => Outcome::Fail,
            };
            let duration_ms = c
                .get(3)
                .and_then(|d| d.as_str().parse::<f64>().ok())
                .map(|s| (s * 1000.0).round() as i64);
            if outcome == Outcome::Fail {
                failed.insert(n.clone(), out.len());
            }
            out.push(TestResult {
                name: n,
                outcome,
                duration_ms,
                failure: String::new(),
                line: (outcome == Outcome::Fail).then_some(line_no),
            });
            continue;
        }
        if let Some(rest) = line.strip_prefix("---- ")
            && let Some(n) = rest
                .strip_suffix(" stdout ----")
                .or_else(|| rest.strip_suffix(" stderr ----"))
        {
            close(&mut section, &mut out);
            if let Some(&idx) = failed.get(n.trim()) {
                out[idx].line = Some(line_no);
                section = Some((idx, String::new()));
            }
            continue;
        }
        if line == "failures:" || line.starts_with("test result: ") || line == "successes:" {
            close(&mut section, &mut out);
            continue;
        }
        if let Some((_, text)) = section.as_mut() {
            text.push_str(line);
            text.push('\n');
            if text.len() > 2 * MAX_FAILURE {
                *text = tail(text, MAX_FAILURE);
            }
        }
    }
    close(&mut section, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "   Compiling demo v0.1.0
     Running unittests src/lib.rs (target/debug/deps/demo-1)

running 3 tests
test tests::adds ... ok
test tests::breaks ... FAILED
test tests::later ... ignored, not today

failures:

---- tests::breaks stdout ----

thread 'tests::breaks' panicked at src/lib.rs:12:9:
assertion `left == right` failed
  left: 3
 right: 4
note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace


failures:
    tests::breaks

test result: FAILED. 1 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s
";

    #[test]
    fn tests_their_outcomes_and_the_failure_section() {
        let r = parse(REPORT.as_bytes());
        assert_eq!(r.len(), 3, "{r:#?}");
        assert_eq!(r[0].name, "tests::adds");
        assert_eq!(r[0].outcome, Outcome::Pass);
        assert_eq!(r[2].outcome, Outcome::Skip);
        let bad = &r[1];
        assert_eq!(bad.outcome, Outcome::Fail);
        assert_eq!(bad.line, Some(11), "the line of its stdout section");
        assert!(bad.failure.contains("left: 3"), "{bad:?}");
        assert!(
            bad.failure.starts_with("thread 'tests::breaks' panicked"),
            "{bad:?}"
        );
        assert!(!bad.failure.contains("test result"), "{bad:?}");
    }
}
