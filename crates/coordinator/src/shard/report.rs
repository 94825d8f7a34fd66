//! Where a sharded step's time went, from its recorded unit runs: the units
//! by duration (slowest first) and each machine's timeline (what it ran
//! when), for the build page and `/api/builds/{id}`. An admin reads idle
//! tails and the slowest units here at a glance.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::store::UnitRun;

/// Units listed on the page per step (the slowest); the JSON has all.
pub const UNITS_SHOWN: usize = 50;
/// Spans drawn per machine's lane (its longest); beyond that a chart says
/// nothing more to a reader and costs the browser.
pub const SPANS_DRAWN: usize = 500;

/// One run of a unit, placed in time.
#[derive(Debug, Clone, Serialize)]
pub struct Span {
    pub unit: String,
    pub machine: String,
    /// Milliseconds after the step's first unit started.
    pub offset_ms: i64,
    pub duration_ms: i64,
    pub result: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// One machine's timeline: what it ran when, and how busy it was.
#[derive(Debug, Clone, Serialize)]
pub struct Lane {
    pub machine: String,
    pub units: usize,
    pub busy_ms: i64,
    /// From its last unit's end to the step's last unit's end: the idle tail.
    pub idle_tail_ms: i64,
    /// Its runs in the order they started.
    pub timeline: Vec<Span>,
}

/// One sharded step of a build (one per attempt that ran it).
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub step_id: i64,
    pub step: String,
    /// From the first unit's start to the last unit's end.
    pub wall_ms: i64,
    /// Sum of all runs' durations.
    pub busy_ms: i64,
    pub machines: Vec<Lane>,
    /// Every run, slowest first.
    pub units: Vec<Span>,
}

/// A chart rectangle, in percent of the step's wall time.
pub struct Rect {
    pub x: f64,
    pub width: f64,
    pub result: String,
    pub title: String,
}

impl StepReport {
    /// A lane's runs as rectangles (its longest [`SPANS_DRAWN`]).
    pub fn rects(&self, lane: &Lane) -> Vec<Rect> {
        let wall = self.wall_ms.max(1) as f64;
        let mut spans: Vec<&Span> = lane.timeline.iter().collect();
        if spans.len() > SPANS_DRAWN {
            spans.sort_by_key(|s| std::cmp::Reverse(s.duration_ms));
            spans.truncate(SPANS_DRAWN);
        }
        spans
            .into_iter()
            .map(|s| Rect {
                x: s.offset_ms as f64 / wall * 100.0,
                width: (s.duration_ms as f64 / wall * 100.0).max(0.05),
                result: s.result.clone(),
                title: format!(
                    "{}: {} in {:.1}s, from {:.1}s",
                    s.unit,
                    s.result,
                    s.duration_ms as f64 / 1000.0,
                    s.offset_ms as f64 / 1000.0
                ),
            })
            .collect()
    }

    /// The slowest units, for the page.
    pub fn shown(&self) -> &[Span] {
        &self.units[..self.units.len().min(UNITS_SHOWN)]
    }

    /// Share of the machines' time spent on units, in percent.
    pub fn utilization(&self) -> i64 {
        let capacity = self.wall_ms * self.machines.len() as i64;
        if capacity == 0 {
            0
        } else {
            self.busy_ms * 100 / capacity
        }
    }
}

/// Groups a build's unit runs by step, in the order the steps ran.
pub fn build(runs: &[UnitRun]) -> Vec<StepReport> {
    let mut by_step: BTreeMap<i64, Vec<&UnitRun>> = BTreeMap::new();
    for r in runs {
        by_step.entry(r.step_id).or_default().push(r);
    }
    by_step
        .into_iter()
        .map(|(step_id, runs)| {
            let start = runs.iter().map(|r| r.started_at).min().unwrap_or(0);
            let end = runs
                .iter()
                .map(|r| r.started_at + r.duration_ms)
                .max()
                .unwrap_or(start);
            let span = |r: &UnitRun| Span {
                unit: r.unit.clone(),
                machine: r.machine.clone(),
                offset_ms: r.started_at - start,
                duration_ms: r.duration_ms,
                result: r.result.to_string(),
                detail: r.detail.clone(),
            };
            let mut lanes: BTreeMap<&str, Lane> = BTreeMap::new();
            for r in &runs {
                let l = lanes.entry(r.machine.as_str()).or_insert_with(|| Lane {
                    machine: r.machine.clone(),
                    units: 0,
                    busy_ms: 0,
                    idle_tail_ms: end - start,
                    timeline: Vec::new(),
                });
                l.units += 1;
                l.busy_ms += r.duration_ms;
                l.idle_tail_ms = l.idle_tail_ms.min(end - (r.started_at + r.duration_ms));
                l.timeline.push(span(r));
            }
            let mut machines: Vec<Lane> = lanes.into_values().collect();
            for l in &mut machines {
                l.timeline.sort_by_key(|s| s.offset_ms);
            }
            let mut units: Vec<Span> = runs.iter().map(|r| span(r)).collect();
            units.sort_by_key(|s| std::cmp::Reverse(s.duration_ms));
            StepReport {
                step_id,
                step: runs[0].step.clone(),
                wall_ms: end - start,
                busy_ms: runs.iter().map(|r| r.duration_ms).sum(),
                machines,
                units,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(unit: &str, machine: &str, start: i64, d: i64) -> UnitRun {
        UnitRun {
            build_id: 1,
            step_id: 7,
            builder: "b".into(),
            step: "test".into(),
            unit: unit.into(),
            machine: machine.into(),
            started_at: start,
            duration_ms: d,
            result: crate::store::RunResult::Passed,
            detail: String::new(),
        }
    }

    #[test]
    fn lanes_show_busy_time_and_idle_tails() {
        let r = build(&[
            run("c", "m2", 1300, 100),
            run("a", "m1", 1000, 600),
            run("b", "m2", 1000, 300),
        ]);
        assert_eq!(r.len(), 1);
        let s = &r[0];
        assert_eq!(s.wall_ms, 600);
        assert_eq!(s.units[0].unit, "a");
        assert_eq!(s.machines[0].idle_tail_ms, 0);
        let m2 = &s.machines[1];
        assert_eq!(m2.machine, "m2");
        assert_eq!(m2.busy_ms, 400);
        assert_eq!(m2.idle_tail_ms, 200);
        let order: Vec<&str> = m2.timeline.iter().map(|s| s.unit.as_str()).collect();
        assert_eq!(order, ["b", "c"]);
        assert_eq!(s.utilization(), 1000 * 100 / 1200);
        let rects = s.rects(m2);
        assert_eq!(rects[0].x, 0.0);
        assert_eq!(rects[1].x, 50.0);
        assert!((rects[1].width - 100.0 / 6.0).abs() < 1e-9);
    }
}
