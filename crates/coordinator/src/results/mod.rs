//! Test results: which tests a step ran, which failed, how long they took
//! and what they printed when they failed, read from the formats tools
//! already produce. From a step's output farmer recognises `go test -json`
//! lines and libtest's (`cargo test`) report; a step may also name result
//! files (`results = "junit:target/*.xml"`, `"go-json:test.json"`), which
//! are fetched from the machine after the step.
//!
//! Everything here is bounded: names, failure texts, tests per step. A
//! malformed or oversized input is reported as a problem, never fatal to
//! the build.

use std::collections::HashMap;

pub mod collect;
mod gojson;
mod junit;
mod libtest;

/// Most tests recorded per step.
pub const MAX_TESTS: usize = 100_000;
/// Longest test name kept, in bytes.
pub const MAX_NAME: usize = 1024;
/// Failure text kept per test: its end, where the assertion usually is.
pub const MAX_FAILURE: usize = 16 << 10;
/// Largest result file read.
pub const MAX_FILE: usize = 16 << 20;
/// Most result files read per step.
pub const MAX_FILES: usize = 100;

/// How a test ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail,
    Skip,
    /// Failed, then passed when run again.
    Flaky,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::Skip => "skip",
            Outcome::Flaky => "flaky",
        }
    }
}

/// One test's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestResult {
    pub name: String,
    pub outcome: Outcome,
    pub duration_ms: Option<i64>,
    /// What it printed when it failed (its end, at most [`MAX_FAILURE`]).
    pub failure: String,
    /// 1-based line of the step's log where the failure is printed.
    pub line: Option<usize>,
}

/// The results of one step, and what could not be read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Results {
    pub tests: Vec<TestResult>,
    /// Sentences about inputs that were skipped or cut short.
    pub problems: Vec<String>,
}

impl Results {
    /// Adds `more`, keeping at most [`MAX_TESTS`]; a test already present
    /// under the same name keeps its worse outcome.
    pub fn extend(&mut self, more: Vec<TestResult>) {
        let mut index: HashMap<String, usize> = self
            .tests
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let mut dropped = 0usize;
        for t in more {
            match index.get(&t.name) {
                Some(&i) => {
                    let old = &mut self.tests[i];
                    if old.outcome != Outcome::Fail && t.outcome == Outcome::Fail {
                        *old = t;
                    }
                }
                None if self.tests.len() < MAX_TESTS => {
                    index.insert(t.name.clone(), self.tests.len());
                    self.tests.push(t);
                }
                None => dropped += 1,
            }
        }
        if dropped > 0 {
            self.problems.push(format!(
                "{dropped} test results beyond the first {MAX_TESTS} were not recorded"
            ));
        }
    }

    pub fn failed(&self) -> impl Iterator<Item = &TestResult> {
        self.tests.iter().filter(|t| t.outcome == Outcome::Fail)
    }
}

/// A result file a step declares: its format and a glob relative to the
/// step's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultFiles {
    pub format: Format,
    pub glob: String,
}

/// Formats of result files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Junit,
    GoJson,
    Libtest,
}

impl Format {
    pub const NAMES: &[&str] = &["junit", "go-json", "libtest"];

    pub fn parse(s: &str) -> Option<Format> {
        Some(match s {
            "junit" => Format::Junit,
            "go-json" => Format::GoJson,
            "libtest" => Format::Libtest,
            _ => return None,
        })
    }

    /// Reads one file of this format.
    pub fn read(self, bytes: &[u8]) -> Result<Vec<TestResult>, String> {
        match self {
            Format::Junit => junit::parse(bytes),
            Format::GoJson => Ok(gojson::parse(bytes)),
            Format::Libtest => Ok(libtest::parse(bytes)),
        }
    }
}

/// The results a step printed: `go test -json` lines and libtest reports,
/// wherever they appear in `log`, with the log lines failures are on.
pub fn from_output(log: &[u8]) -> Vec<TestResult> {
    let mut out = gojson::parse(log);
    out.extend(libtest::parse(log));
    out
}

/// `s` cut to at most `max` bytes on a character boundary.
pub(crate) fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The end of `s`, at most `max` bytes, starting on a line when it can.
pub(crate) fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    let t = &s[start..];
    match t.find('\n') {
        Some(nl) if nl + 1 < t.len() => t[nl + 1..].to_string(),
        _ => t.to_string(),
    }
}

/// A name as stored: trimmed, without control characters, bounded.
pub(crate) fn name(s: &str) -> Option<String> {
    let cleaned: String = s
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    (!cleaned.is_empty()).then(|| clip(&cleaned, MAX_NAME))
}

/// Whether `path` (relative, `/`-separated) matches `glob`: `*` and `?`
/// within one segment, `**` for any number of segments.
pub fn glob_match(glob: &str, path: &str) -> bool {
    fn segs(pattern: &[&str], path: &[&str]) -> bool {
        match pattern.split_first() {
            None => path.is_empty(),
            Some((&"**", rest)) => (0..=path.len()).any(|i| segs(rest, &path[i..])),
            Some((p, rest)) => path
                .split_first()
                .is_some_and(|(s, more)| seg(p.as_bytes(), s.as_bytes()) && segs(rest, more)),
        }
    }
    fn seg(p: &[u8], s: &[u8]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some((b'*', rest)) => (0..=s.len()).any(|i| seg(rest, &s[i..])),
            Some((b'?', rest)) => !s.is_empty() && seg(rest, &s[1..]),
            Some((c, rest)) => s.first() == Some(c) && seg(rest, &s[1..]),
        }
    }
    let pattern: Vec<&str> = glob
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect();
    let path: Vec<&str> = path
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect();
    segs(&pattern, &path)
}

/// The directory a glob's matches all live under (its leading literal
/// segments), so only that part of the tree is listed.
pub fn glob_base(glob: &str) -> String {
    let segs: Vec<&str> = glob
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect();
    let literal = segs.iter().take_while(|s| !s.contains(['*', '?'])).count();
    // A glob without wildcards names a file: its directory is the base.
    let keep = if literal == segs.len() {
        literal.saturating_sub(1)
    } else {
        literal
    };
    segs[..keep].join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_segments() {
        assert!(glob_match("target/*.xml", "target/a.xml"));
        assert!(!glob_match("target/*.xml", "target/sub/a.xml"));
        assert!(glob_match("target/**/*.xml", "target/sub/deep/a.xml"));
        assert!(glob_match("target/**/*.xml", "target/a.xml"));
        assert!(glob_match("./test.json", "test.json"));
        assert!(glob_match("report-?.xml", "report-1.xml"));
        assert!(!glob_match("report-?.xml", "report-12.xml"));
        assert_eq!(glob_base("target/reports/*.xml"), "target/reports");
        assert_eq!(glob_base("target/**/x.xml"), "target");
        assert_eq!(glob_base("test.json"), "");
        assert_eq!(glob_base("out/test.json"), "out");
    }

    #[test]
    fn a_failure_wins_over_a_pass_of_the_same_name_and_the_count_is_bounded() {
        let t = |n: &str, o| TestResult {
            name: n.into(),
            outcome: o,
            duration_ms: None,
            failure: String::new(),
            line: None,
        };
        let mut r = Results::default();
        r.extend(vec![t("a", Outcome::Pass), t("b", Outcome::Fail)]);
        r.extend(vec![t("a", Outcome::Fail), t("b", Outcome::Pass)]);
        assert_eq!(r.tests.len(), 2);
        assert!(r.tests.iter().all(|t| t.outcome == Outcome::Fail));
        let many: Vec<TestResult> = (0..MAX_TESTS + 3)
            .map(|i| t(&format!("t{i}"), Outcome::Pass))
            .collect();
        r.extend(many);
        assert_eq!(r.tests.len(), MAX_TESTS);
        assert!(
            r.problems[0].contains("beyond the first"),
            "{:?}",
            r.problems
        );
    }

    #[test]
    fn tails_start_on_a_line_and_clips_on_a_character() {
        assert_eq!(tail("one\ntwo\nthree\n", 8), "three\n");
        assert_eq!(clip("héllo", 2), "h");
        assert_eq!(name("  a\tb \n"), Some("a b".into()));
        assert_eq!(name(" \n"), None);
    }
}
