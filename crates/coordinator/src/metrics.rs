//! Counters the coordinator keeps for `/metrics` (Prometheus text format).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use crate::farm::Farm;
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
    /// Recent dispatch latencies (seconds) for percentiles.
    recent: std::collections::VecDeque<f64>,
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
        g.recent.push_back(s);
        if g.recent.len() > 10_000 {
            g.recent.pop_front();
        }
    }

    /// p50 and p99 of recent dispatch latencies.
    pub fn dispatch_percentiles(&self) -> Option<(Duration, Duration)> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.recent.is_empty() {
            return None;
        }
        let mut v: Vec<f64> = g.recent.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        let p = |q: f64| Duration::from_secs_f64(v[((v.len() - 1) as f64 * q) as usize]);
        Some((p(0.5), p(0.99)))
    }
}

fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders every metric of the farm.
pub async fn render(farm: &Farm) -> String {
    let mut out = String::new();
    let cfg = farm.config();
    let _ = writeln!(
        out,
        "# HELP farmer_build_info The coordinator's version (value 1)."
    );
    let _ = writeln!(out, "# TYPE farmer_build_info gauge");
    let _ = writeln!(
        out,
        "farmer_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(
        out,
        "# HELP farmer_uptime_seconds Seconds since the coordinator started."
    );
    let _ = writeln!(out, "# TYPE farmer_uptime_seconds gauge");
    let _ = writeln!(
        out,
        "farmer_uptime_seconds {}",
        farm.started.elapsed().as_secs()
    );
    let _ = writeln!(
        out,
        "# HELP farmer_builds Builds by status (finished in this process; queued/running are current)."
    );
    let _ = writeln!(out, "# TYPE farmer_builds gauge");
    if let Ok(counts) = farm.store.status_counts().await {
        // Every status, zeros included, so a series never has gaps.
        for s in BuildStatus::ALL {
            let n = counts.iter().find(|(x, _)| *x == s).map_or(0, |(_, n)| *n);
            let _ = writeln!(out, "farmer_builds{{status=\"{s}\"}} {n}");
        }
    }
    {
        let g = farm.metrics.inner.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(
            out,
            "# HELP farmer_builds_finished_total Builds that reached a final status since start."
        );
        let _ = writeln!(out, "# TYPE farmer_builds_finished_total counter");
        for s in BuildStatus::ALL.iter().filter(|s| s.is_terminal()) {
            let n = g.finished.get(s.as_str()).copied().unwrap_or(0);
            let _ = writeln!(out, "farmer_builds_finished_total{{status=\"{s}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP farmer_dispatch_latency_seconds From queued to leased machine."
        );
        let _ = writeln!(out, "# TYPE farmer_dispatch_latency_seconds histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "farmer_dispatch_latency_seconds_bucket{{le=\"{b}\"}} {}",
                g.dispatch_counts[i]
            );
        }
        let _ = writeln!(
            out,
            "farmer_dispatch_latency_seconds_bucket{{le=\"+Inf\"}} {}",
            g.dispatch_n
        );
        let _ = writeln!(
            out,
            "farmer_dispatch_latency_seconds_sum {}",
            g.dispatch_sum
        );
        let _ = writeln!(
            out,
            "farmer_dispatch_latency_seconds_count {}",
            g.dispatch_n
        );
    }
    let queues = farm.scheduler.views();
    let _ = writeln!(
        out,
        "# HELP farmer_queue_length Queued builds per host type."
    );
    let _ = writeln!(out, "# TYPE farmer_queue_length gauge");
    let _ = writeln!(
        out,
        "# HELP farmer_queue_oldest_wait_seconds Age of the oldest queued build per host type."
    );
    let _ = writeln!(out, "# TYPE farmer_queue_oldest_wait_seconds gauge");
    for ht in cfg.hosts.keys() {
        let q = queues.iter().find(|q| &q.host_type == ht);
        let _ = writeln!(
            out,
            "farmer_queue_length{{host_type=\"{}\"}} {}",
            label(ht),
            q.map_or(0, |q| q.waiting)
        );
        let _ = writeln!(
            out,
            "farmer_queue_oldest_wait_seconds{{host_type=\"{}\"}} {}",
            label(ht),
            q.map_or(0.0, |q| q.oldest_wait_secs)
        );
    }
    let counts = farm.pool.counts();
    let _ = writeln!(
        out,
        "# HELP farmer_machines Machines per host type: connected, busy, expected."
    );
    let _ = writeln!(out, "# TYPE farmer_machines gauge");
    for (ht, h) in &cfg.hosts {
        let c = counts.get(ht).copied().unwrap_or_default();
        let l = label(ht);
        let _ = writeln!(
            out,
            "farmer_machines{{host_type=\"{l}\",state=\"connected\"}} {}",
            c.connected
        );
        let _ = writeln!(
            out,
            "farmer_machines{{host_type=\"{l}\",state=\"busy\"}} {}",
            c.busy
        );
        let _ = writeln!(
            out,
            "farmer_machines{{host_type=\"{l}\",state=\"expected\"}} {}",
            h.expected
        );
    }
    let _ = writeln!(
        out,
        "# HELP farmer_registrations_refused_total Refused buildlet registrations by host type and reason."
    );
    let _ = writeln!(out, "# TYPE farmer_registrations_refused_total counter");
    for ((ht, kind), n) in farm.pool.refusal_counts() {
        let _ = writeln!(
            out,
            "farmer_registrations_refused_total{{host_type=\"{}\",reason=\"{}\"}} {n}",
            label(&ht),
            label(&kind)
        );
    }
    let sources = farm.sources.views();
    let _ = writeln!(
        out,
        "# HELP farmer_exec_failures_total Failed machines of exec pools by host type and reason (create-failed, create-timeout, register-timeout, destroy-failed, destroy-timeout)."
    );
    let _ = writeln!(out, "# TYPE farmer_exec_failures_total counter");
    for s in sources.iter().filter(|s| s.kind == "exec") {
        for (reason, n) in &s.failures {
            let _ = writeln!(
                out,
                "farmer_exec_failures_total{{host_type=\"{}\",reason=\"{}\"}} {n}",
                label(&s.host_type),
                label(reason)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP farmer_exec_machines Machines of exec pools by host type and state (creating, registering, registered, destroying)."
    );
    let _ = writeln!(out, "# TYPE farmer_exec_machines gauge");
    for s in sources.iter().filter(|s| s.kind == "exec") {
        for state in ["creating", "registering", "registered", "destroying"] {
            let n = s.instances.iter().filter(|i| i.state == state).count();
            let _ = writeln!(
                out,
                "farmer_exec_machines{{host_type=\"{}\",state=\"{state}\"}} {n}",
                label(&s.host_type)
            );
        }
    }
    out
}
