//! Where a sharded step's time went, from its recorded unit runs: the units
//! by duration (slowest first) and each machine's timeline, for the build
//! page and `/api/builds/{id}`. An admin reads idle tails and the slowest
//! units here at a glance.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::store::UnitRun;

/// Units listed on the page per step (the slowest); the JSON has all.
pub const UNITS_SHOWN: usize = 50;
/// Spans drawn per step's chart (the longest); beyond that a chart says
/// nothing more to a reader and costs the browser.
pub const SPANS_DRAWN: usize = 2000;
/// Width of the chart in SVG units.
const CHART_WIDTH: f64 = 1000.0;
/// Height of one machine's lane in SVG units.
pub const LANE_HEIGHT: i64 = 18;

/// One run of a unit, placed on its machine's timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Span {
    pub unit: String,
    pub machine: String,
    /// Milliseconds after the step's first unit started.
    pub offset_ms: i64,
    pub duration_ms: i64,
    pub result: String,
    pub detail: String,
}

/// One machine's lane: what it ran when, and how busy it was.
#[derive(Debug, Clone, Serialize)]
pub struct Lane {
    pub machine: String,
    pub units: usize,
    pub busy_ms: i64,
    /// From its last unit's end to the step's end: the idle tail.
    pub idle_tail_ms: i64,
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
    pub lanes: Vec<Lane>,
    /// Every run, slowest first.
    pub runs: Vec<Span>,
}

/// A chart rectangle, in SVG units.
pub struct Rect {
    pub x: f64,
    pub y: i64,
    pub width: f64,
    pub result: String,
    pub title: String,
}

impl StepReport {
    /// The lanes and spans as SVG rectangles (at most [`SPANS_DRAWN`]).
    pub fn rects(&self) -> Vec<Rect> {
        let wall = self.wall_ms.max(1) as f64;
        let lane_of: BTreeMap<&str, i64> = self
            .lanes
            .iter()
            .enumerate()
            .map(|(i, l)| (l.machine.as_str(), i as i64))
            .collect();
        self.runs
            .iter()
            .take(SPANS_DRAWN)
            .map(|s| Rect {
                x: s.offset_ms as f64 / wall * CHART_WIDTH,
                y: lane_of.get(s.machine.as_str()).copied().unwrap_or(0) * LANE_HEIGHT,
                width: (s.duration_ms as f64 / wall * CHART_WIDTH).max(0.5),
                result: s.result.clone(),
                title: format!(
                    "{} on {}: {} in {:.1}s",
                    s.unit,
                    s.machine,
                    s.result,
                    s.duration_ms as f64 / 1000.0
                ),
            })
            .collect()
    }

    pub fn chart_height(&self) -> i64 {
        self.lanes.len() as i64 * LANE_HEIGHT
    }

    pub fn shown(&self) -> &[Span] {
        &self.runs[..self.runs.len().min(UNITS_SHOWN)]
    }

    /// Share of the machines' time spent on units, in percent.
    pub fn utilization(&self) -> i64 {
        let capacity = self.wall_ms * self.lanes.len() as i64;
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
            let mut lanes: BTreeMap<&str, Lane> = BTreeMap::new();
            for r in &runs {
                let l = lanes.entry(r.machine.as_str()).or_insert_with(|| Lane {
                    machine: r.machine.clone(),
                    units: 0,
                    busy_ms: 0,
                    idle_tail_ms: end - start,
                });
                l.units += 1;
                l.busy_ms += r.duration_ms;
                l.idle_tail_ms = l.idle_tail_ms.min(end - (r.started_at + r.duration_ms));
            }
            let mut spans: Vec<Span> = runs
                .iter()
                .map(|r| Span {
                    unit: r.unit.clone(),
                    machine: r.machine.clone(),
                    offset_ms: r.started_at - start,
                    duration_ms: r.duration_ms,
                    result: r.result.clone(),
                    detail: r.detail.clone(),
                })
                .collect();
            spans.sort_by_key(|s| std::cmp::Reverse(s.duration_ms));
            StepReport {
                step_id,
                step: runs[0].step.clone(),
                wall_ms: end - start,
                busy_ms: runs.iter().map(|r| r.duration_ms).sum(),
                lanes: lanes.into_values().collect(),
                runs: spans,
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
            result: "passed".into(),
            detail: String::new(),
        }
    }

    #[test]
    fn lanes_show_busy_time_and_idle_tails() {
        let r = build(&[
            run("a", "m1", 1000, 600),
            run("b", "m2", 1000, 300),
            run("c", "m2", 1300, 100),
        ]);
        assert_eq!(r.len(), 1);
        let s = &r[0];
        assert_eq!(s.wall_ms, 600);
        assert_eq!(s.runs[0].unit, "a");
        assert_eq!(s.lanes[0].idle_tail_ms, 0);
        assert_eq!(s.lanes[1].machine, "m2");
        assert_eq!(s.lanes[1].busy_ms, 400);
        assert_eq!(s.lanes[1].idle_tail_ms, 200);
        assert_eq!(s.utilization(), 1000 * 100 / 1200);
        let rects = s.rects();
        assert_eq!(rects[0].width, 1000.0);
        assert_eq!(rects[2].y, LANE_HEIGHT);
    }
}
