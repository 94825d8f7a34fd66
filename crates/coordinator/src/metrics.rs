//! The coordinator's own counters for `/metrics`, kept with a maintained
//! Prometheus library (`prometheus-client`): builds finished by status,
//! dispatch latency (buckets up to hours: queue waits are long on a busy
//! farm), where an attempt's time goes, flaky tests per builder. The farm
//! holds a [`Metrics`] and counts into it, so this module knows nothing of
//! the farm; the exposition, with the gauges read from the farm's state at
//! scrape time, is written above the farm by `api::metrics`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::store::BuildStatus;

/// Upper bounds (seconds) of the dispatch latency histogram: from a
/// millisecond (an idle farm) to four hours (a queue behind a slow port).
pub const DISPATCH_BUCKETS: [f64; 19] = [
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0,
    1800.0, 3600.0, 7200.0, 14400.0,
];

/// Upper bounds (seconds) of the phase histograms.
const PHASE_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 1.0, 10.0, 60.0, 600.0, 3600.0,
];

/// The phases of a build attempt that [`Metrics::phase`] times, in the
/// order they happen: what the dispatch bench prints, so the next person
/// knows where a build's first milliseconds go.
pub const PHASES: [&str; 6] = [
    "record-start",
    "source-archive",
    "source-push",
    "steps",
    "record-result",
    "clean",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuilderLabel {
    pub builder: String,
}

/// How a source tree reached a machine.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub host_type: String,
    /// `full` or `delta`.
    pub kind: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn phase_histogram() -> Histogram {
    Histogram::new(PHASE_BUCKETS)
}

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

/// The counters. Each metric is a shared handle: registering it in a
/// scrape's registry reads the same values.
pub struct Metrics {
    finished: Family<StatusLabel, Counter>,
    dispatch: Histogram,
    phases: HistogramFamily<PhaseLabel>,
    flaky: Family<BuilderLabel, Counter>,
    source_bytes: Family<SourceLabel, Counter>,
    source_pushes: Family<SourceLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let m = Metrics {
            finished: Family::default(),
            dispatch: Histogram::new(DISPATCH_BUCKETS),
            phases: Family::new_with_constructor(phase_histogram as fn() -> Histogram),
            flaky: Family::default(),
            source_bytes: Family::default(),
            source_pushes: Family::default(),
        };
        // Every series from the start, zeros included, so none has gaps.
        for s in BuildStatus::ALL.iter().filter(|s| s.is_terminal()) {
            let _ = m.finished.get_or_create(&StatusLabel {
                status: s.as_str().into(),
            });
        }
        for p in PHASES {
            let _ = m.phases.get_or_create(&PhaseLabel { phase: p.into() });
        }
        m
    }
}

impl Metrics {
    pub fn build_finished(&self, s: BuildStatus) {
        self.finished
            .get_or_create(&StatusLabel {
                status: s.as_str().into(),
            })
            .inc();
    }

    /// Time from queueing (or re-queueing) a build to its machine being leased.
    pub fn observe_dispatch(&self, d: Duration) {
        self.dispatch.observe(d.as_secs_f64());
    }

    /// Time spent in one phase of a build attempt (one of [`PHASES`]).
    pub fn observe_phase(&self, phase: &'static str, d: Duration) {
        self.phases
            .get_or_create(&PhaseLabel {
                phase: phase.into(),
            })
            .observe(d.as_secs_f64());
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

    /// Tests of `builder` that failed, then passed when run again.
    pub fn flaky_tests(&self, builder: &str, n: u64) {
        self.flaky
            .get_or_create(&BuilderLabel {
                builder: builder.into(),
            })
            .inc_by(n);
    }

    /// A source tree sent to a machine of `host_type`: `bytes` on the wire,
    /// `delta` or the whole tree.
    pub fn source_sent(&self, host_type: &str, delta: bool, bytes: u64) {
        let l = SourceLabel {
            host_type: host_type.into(),
            kind: if delta { "delta" } else { "full" }.into(),
        };
        self.source_bytes.get_or_create(&l).inc_by(bytes);
        self.source_pushes.get_or_create(&l).inc();
    }

    /// Adds these counters to a scrape's registry.
    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "farmer_builds_finished",
            "Builds that reached a final status since the coordinator started",
            self.finished.clone(),
        );
        reg.register(
            "farmer_dispatch_latency_seconds",
            "From a build queued to its machine leased",
            self.dispatch.clone(),
        );
        reg.register(
            "farmer_build_phase_seconds",
            "Where build attempts spend their time, by phase (record-start, source-archive, source-push, steps, record-result, clean)",
            self.phases.clone(),
        );
        reg.register(
            "farmer_source_bytes",
            "Bytes of source sent to machines, by host type, whole trees (full) or deltas over the machine's cached tree",
            self.source_bytes.clone(),
        );
        reg.register(
            "farmer_source_pushes",
            "Source trees sent to machines, by host type, full or delta",
            self.source_pushes.clone(),
        );
        reg.register(
            "farmer_flaky_tests",
            "Tests (or units of sharded steps) that failed, then passed when run again, by builder",
            self.flaky.clone(),
        );
    }
}
