//! Counters the coordinator keeps for `/metrics`: builds finished by status
//! and the dispatch latency histogram. The farm holds a [`Metrics`] and
//! counts into it, so this module knows nothing of the farm; the Prometheus
//! text is written above the farm, by `api::metrics`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::store::BuildStatus;

/// Upper bounds (seconds) of the dispatch latency histogram.
const BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

#[derive(Default)]
struct Inner {
    finished: BTreeMap<&'static str, u64>,
    dispatch_counts: [u64; BUCKETS.len()],
    dispatch_sum: f64,
    dispatch_n: u64,
    /// Where a build's time goes, by phase: (sum of seconds, count).
    phases: BTreeMap<&'static str, (f64, u64)>,
}

/// The counters at one moment.
pub struct Snapshot {
    /// Builds that reached a final status since start, by status name.
    pub finished: BTreeMap<&'static str, u64>,
    /// Dispatch latency histogram: (upper bound in seconds, dispatches at or
    /// below it), smallest bound first.
    pub dispatch_buckets: Vec<(f64, u64)>,
    /// Sum of all dispatch latencies, in seconds.
    pub dispatch_sum: f64,
    /// Number of dispatches.
    pub dispatch_count: u64,
    /// Time spent per phase of a build attempt: (phase, seconds, count).
    pub phases: Vec<(&'static str, f64, u64)>,
}

/// The phases of a build attempt that [`Metrics::observe_phase`] times, in
/// the order they happen: what the dispatch bench prints, so the next
/// person knows where a build's first milliseconds go.
pub const PHASES: [&str; 6] = [
    "record-start",
    "source-archive",
    "source-push",
    "steps",
    "record-result",
    "clean",
];

/// See [`Metrics::phase`].
pub struct PhaseTimer<'a> {
    metrics: &'a Metrics,
    phase: &'static str,
    start: std::time::Instant,
}

impl Drop for PhaseTimer<'_> {
    fn drop(&mut self) {
        self.metrics.observe_phase(self.phase, self.start.elapsed());
    }
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    pub fn build_finished(&self, s: BuildStatus) {
        *self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .finished
            .entry(s.as_str())
            .or_default() += 1;
    }

    /// Time from queueing (or re-queueing) a build to its machine being leased.
    pub fn observe_dispatch(&self, d: Duration) {
        let s = d.as_secs_f64();
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                g.dispatch_counts[i] += 1;
            }
        }
        g.dispatch_sum += s;
        g.dispatch_n += 1;
    }

    /// Time spent in one phase of a build attempt (one of [`PHASES`]).
    pub fn observe_phase(&self, phase: &'static str, d: Duration) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let e = g.phases.entry(phase).or_default();
        e.0 += d.as_secs_f64();
        e.1 += 1;
    }

    /// Times a phase until the returned guard is dropped (whatever way the
    /// phase ends).
    pub fn phase(&self, phase: &'static str) -> PhaseTimer<'_> {
        PhaseTimer {
            metrics: self,
            phase,
            start: std::time::Instant::now(),
        }
    }

    /// A copy of the counters, for `/metrics`.
    pub fn snapshot(&self) -> Snapshot {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Snapshot {
            finished: g.finished.clone(),
            dispatch_buckets: BUCKETS.iter().copied().zip(g.dispatch_counts).collect(),
            dispatch_sum: g.dispatch_sum,
            dispatch_count: g.dispatch_n,
            phases: PHASES
                .iter()
                .map(|p| {
                    let (s, n) = g.phases.get(p).copied().unwrap_or_default();
                    (*p, s, n)
                })
                .collect(),
        }
    }
}
