//! Sharded steps: a step's work split into units (listed by the step's own
//! `shard.list` command) and handed out one at a time to the build's
//! machine and helper machines of the same host type, longest expected
//! first.
//!
//! Why dynamic and not packed: the Go coordinator packed units into fixed
//! shards up front, so one mis-estimated unit left every other machine idle
//! at the end, and a dead helper lost its whole shard. Here a machine takes
//! the next unit when it is free, and a unit whose machine dies goes back
//! to the queue. Longest-first from measured medians keeps the tail short
//! (the classic LPT rule); units never seen before get the median of all
//! units, so a new test is neither first nor last by accident.
//!
//! This file is the pure part (parsing the list, expected durations, the
//! order); `run.rs` runs a step on the farm.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

pub mod report;
pub(crate) mod run;

/// Most units one step may list.
pub const MAX_UNITS: usize = 100_000;
/// Longest unit name, in bytes.
pub const MAX_UNIT_NAME: usize = 1024;
/// Most output the list command may print.
pub const MAX_LIST_OUTPUT: usize = 16 << 20;
/// Past runs of a unit its expected duration is the median of.
pub const HISTORY_PER_UNIT: usize = 9;

/// The units a list command printed: one per line, surrounding blanks
/// trimmed, blank lines skipped, repeats dropped (the first place counts).
/// An error names the problem (and the line), so the step fails with it.
pub fn parse_units(output: &[u8]) -> Result<Vec<String>, String> {
    let text = std::str::from_utf8(output)
        .map_err(|e| format!("the unit list is not UTF-8 text ({e})"))?;
    let mut seen = HashSet::new();
    let mut units = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let unit = line.trim();
        if unit.is_empty() {
            continue;
        }
        if unit.len() > MAX_UNIT_NAME {
            return Err(format!(
                "line {} of the unit list is {} bytes long; a unit name may have at most {MAX_UNIT_NAME}",
                i + 1,
                unit.len()
            ));
        }
        if let Some(c) = unit.chars().find(|c| c.is_control()) {
            return Err(format!(
                "line {} of the unit list holds the control character {:?}; unit names are plain text",
                i + 1,
                c
            ));
        }
        if seen.insert(unit) {
            if units.len() == MAX_UNITS {
                return Err(format!(
                    "the list names more than {MAX_UNITS} units; group them into fewer, larger units"
                ));
            }
            units.push(unit.to_string());
        }
    }
    Ok(units)
}

/// The median of `v` (the mean of the middle two for an even count).
pub fn median(v: &[i64]) -> Option<i64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2
    })
}

/// A unit with the time it is expected to take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub unit: String,
    pub expected: Duration,
    /// Whether the expectation comes from the unit's own past runs.
    pub measured: bool,
    /// Runs that failed so far (re-runs of failed units, `retry_failed`).
    pub failures: u32,
    /// The machine (lease id) it just failed on: another takes it if one
    /// is free.
    pub avoid: Option<u64>,
}

/// The order units are handed out in: longest expected first; ties (and
/// everything when there is no history) keep the list's order. A unit's
/// expectation is the median of its recorded durations; an unknown unit's
/// is the median of the known units' medians.
pub fn plan(units: Vec<String>, history: &HashMap<String, Vec<i64>>) -> Vec<Planned> {
    let medians: Vec<Option<i64>> = units
        .iter()
        .map(|u| history.get(u).and_then(|h| median(h)))
        .collect();
    let known: Vec<i64> = medians.iter().flatten().copied().collect();
    let fallback = median(&known).unwrap_or(0);
    let mut planned: Vec<Planned> = units
        .into_iter()
        .zip(medians)
        .map(|(unit, m)| Planned {
            unit,
            expected: Duration::from_millis(m.unwrap_or(fallback).max(0) as u64),
            measured: m.is_some(),
            failures: 0,
            avoid: None,
        })
        .collect();
    // Stable: equal expectations keep the list's order.
    planned.sort_by_key(|p| std::cmp::Reverse(p.expected));
    planned
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_trimmed_lines_without_blanks_or_repeats() {
        let u = parse_units(b"  a \n\nb\r\na\n c\n").unwrap();
        assert_eq!(u, vec!["a", "b", "c"]);
        assert!(parse_units(&[0xff, b'\n']).unwrap_err().contains("UTF-8"));
        let e = parse_units(b"ok\nbad\x07bell\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("control"), "{e}");
        let long = "x".repeat(MAX_UNIT_NAME + 1);
        assert!(parse_units(long.as_bytes()).unwrap_err().contains("line 1"));
    }

    #[test]
    fn plan_is_longest_first_with_unknowns_at_the_median() {
        let mut h = HashMap::new();
        h.insert("slow".to_string(), vec![900, 1000, 5000]);
        h.insert("mid".to_string(), vec![400]);
        h.insert("fast".to_string(), vec![10, 20]);
        let p = plan(
            ["fast", "new", "slow", "mid"].map(String::from).to_vec(),
            &h,
        );
        let order: Vec<&str> = p.iter().map(|p| p.unit.as_str()).collect();
        // Medians: slow 1000, mid 400, fast 15; new gets the median of
        // those, 400, and keeps its place before mid (list order).
        assert_eq!(order, vec!["slow", "new", "mid", "fast"]);
        assert_eq!(p[1].expected, Duration::from_millis(400));
        assert!(!p[1].measured && p[0].measured);
        // No history at all: the list's order.
        let p = plan(["b", "a", "c"].map(String::from).to_vec(), &HashMap::new());
        let order: Vec<&str> = p.iter().map(|p| p.unit.as_str()).collect();
        assert_eq!(order, vec!["b", "a", "c"]);
    }
}
