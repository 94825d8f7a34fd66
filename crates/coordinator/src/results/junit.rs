//! JUnit XML, as pytest (`--junitxml`), Maven Surefire, Gradle, jest-junit
//! and most other tools write it: `<testcase classname name time>` with a
//! `<failure>`, `<error>` or `<skipped>` child.

use quick_xml::events::{BytesStart, Event};
use quick_xml::{Reader, XmlVersion};

use super::{MAX_FAILURE, MAX_TESTS, Outcome, TestResult, clip, name, tail};

/// Deepest nesting read; JUnit files are a few levels deep.
const MAX_DEPTH: usize = 64;

fn attr(e: &BytesStart<'_>, key: &str) -> Option<String> {
    e.attributes()
        .flatten()
        .find(|a| a.key.as_ref() == key)
        .map(|a| {
            a.normalized_value(XmlVersion::default())
                .map(|v| v.into_owned())
                .unwrap_or_else(|_| a.value.clone().into_owned())
        })
}

/// The test a `<testcase>` opens.
fn case(e: &BytesStart<'_>) -> Option<TestResult> {
    let n = attr(e, "name")?;
    let full = match attr(e, "classname").filter(|c| !c.is_empty()) {
        Some(c) => format!("{c}.{n}"),
        None => n,
    };
    Some(TestResult {
        name: name(&full)?,
        outcome: Outcome::Pass,
        duration_ms: attr(e, "time")
            .and_then(|t| t.trim().replace(',', "").parse::<f64>().ok())
            .filter(|t| t.is_finite() && *t >= 0.0)
            .map(|t| (t * 1000.0).round() as i64),
        failure: String::new(),
        line: None,
    })
}

/// What a `<failure>`/`<error>` says before its text: its message.
fn outcome_of(e: &BytesStart<'_>, t: &mut TestResult) {
    match e.local_name().as_ref() {
        "failure" | "error" => {
            t.outcome = Outcome::Fail;
            if let Some(m) = attr(e, "message").filter(|m| !m.trim().is_empty()) {
                t.failure = clip(&m, MAX_FAILURE);
                t.failure.push('\n');
            }
        }
        "skipped" if t.outcome == Outcome::Pass => t.outcome = Outcome::Skip,
        _ => {}
    }
}

pub fn parse(input: &[u8]) -> Result<Vec<TestResult>, String> {
    let mut reader = Reader::from_reader(input);
    let mut out = Vec::new();
    let mut current: Option<TestResult> = None;
    // Inside a <failure>/<error> of the current test.
    let mut in_failure = false;
    let mut depth = 0usize;
    let mut saw_root = false;
    let mut buf = Vec::new();
    loop {
        let ev = reader
            .read_event_into(&mut buf)
            .map_err(|e| format!("not JUnit XML: {e} (at byte {})", reader.buffer_position()))?;
        match ev {
            Event::Start(e) => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(format!("not JUnit XML: nested deeper than {MAX_DEPTH}"));
                }
                match e.local_name().as_ref() {
                    "testsuites" | "testsuite" => saw_root = true,
                    "testcase" => current = case(&e),
                    "failure" | "error" => {
                        if let Some(t) = current.as_mut() {
                            outcome_of(&e, t);
                            in_failure = true;
                        }
                    }
                    _ => {
                        if let Some(t) = current.as_mut() {
                            outcome_of(&e, t);
                        }
                    }
                }
            }
            Event::Empty(e) => match e.local_name().as_ref() {
                "testcase" => {
                    if let Some(t) = case(&e) {
                        out.push(t);
                    }
                }
                "testsuites" | "testsuite" => saw_root = true,
                _ => {
                    if let Some(t) = current.as_mut() {
                        outcome_of(&e, t);
                    }
                }
            },
            Event::End(e) => {
                depth = depth.saturating_sub(1);
                match e.local_name().as_ref() {
                    "testcase" => {
                        if let Some(mut t) = current.take() {
                            t.failure = tail(t.failure.trim_end(), MAX_FAILURE);
                            out.push(t);
                        }
                    }
                    "failure" | "error" => in_failure = false,
                    _ => {}
                }
            }
            Event::Text(t) if in_failure => {
                if let Some(c) = current.as_mut() {
                    c.failure.push_str(&t.xml10_content());
                }
            }
            Event::CData(t) if in_failure => {
                if let Some(c) = current.as_mut() {
                    c.failure.push_str(&t.xml10_content());
                }
            }
            Event::GeneralRef(r) if in_failure => {
                if let Some(c) = current.as_mut() {
                    let text = match r.as_ref() {
                        "lt" => "<".to_string(),
                        "gt" => ">".to_string(),
                        "amp" => "&".to_string(),
                        "quot" => "\"".to_string(),
                        "apos" => "'".to_string(),
                        _ => match r.resolve_char_ref() {
                            Ok(Some(ch)) => ch.to_string(),
                            _ => String::new(),
                        },
                    };
                    c.failure.push_str(&text);
                }
            }
            Event::Eof => break,
            _ => {}
        }
        if let Some(c) = current.as_mut()
            && c.failure.len() > 2 * MAX_FAILURE
        {
            c.failure = tail(&c.failure, MAX_FAILURE);
        }
        if out.len() >= MAX_TESTS {
            break;
        }
        buf.clear();
    }
    if !saw_root {
        return Err("not JUnit XML: no <testsuite> or <testsuites> element".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pytest_style_cases_with_failures_errors_and_skips() {
        let xml = br#"<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="4" time="0.05">
<testcase classname="tests.test_math" name="test_add" time="0.001" />
<testcase classname="tests.test_math" name="test_sub" time="0.002"><failure message="assert 1 == 2">def test_sub():
&gt;       assert 1 == 2
E       assert 1 == 2</failure></testcase>
<testcase classname="tests.test_math" name="test_io" time="0.003"><error message="fixture &apos;db&apos; not found"><![CDATA[raw <text>]]></error></testcase>
<testcase classname="tests.test_math" name="test_later" time="0"><skipped type="pytest.skip" message="later" /></testcase>
</testsuite></testsuites>"#;
        let r = parse(xml).unwrap();
        assert_eq!(r.len(), 4, "{r:#?}");
        assert_eq!(r[0].name, "tests.test_math.test_add");
        assert_eq!(r[0].outcome, Outcome::Pass);
        assert_eq!(r[1].outcome, Outcome::Fail);
        assert!(
            r[1].failure.starts_with("assert 1 == 2\n"),
            "{:?}",
            r[1].failure
        );
        assert!(
            r[1].failure.contains(">       assert 1 == 2"),
            "{:?}",
            r[1].failure
        );
        assert_eq!(r[1].duration_ms, Some(2));
        assert_eq!(r[2].outcome, Outcome::Fail);
        assert!(r[2].failure.contains("fixture 'db' not found"));
        assert!(r[2].failure.contains("raw <text>"));
        assert_eq!(r[3].outcome, Outcome::Skip);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(
            parse(b"{\"not\": \"xml\"}")
                .unwrap_err()
                .contains("not JUnit XML")
        );
        assert!(parse(b"<a><b></a>").is_err());
        let deep = "<testsuite>".repeat(100);
        assert!(parse(deep.as_bytes()).unwrap_err().contains("deeper"));
    }
}
