//! `/metrics`: the farm's state and counters in the Prometheus text format.
//! Part of the API layer because it reads the whole farm (store, lease
//! queue, pool, sources); the counters themselves live below the farm in
//! [`crate::metrics`].

use std::fmt::Write;

use crate::farm::Farm;
use crate::store::BuildStatus;

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
        let g = farm.metrics.snapshot();
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
        for (b, n) in &g.dispatch_buckets {
            let _ = writeln!(
                out,
                "farmer_dispatch_latency_seconds_bucket{{le=\"{b}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "farmer_dispatch_latency_seconds_bucket{{le=\"+Inf\"}} {}",
            g.dispatch_count
        );
        let _ = writeln!(
            out,
            "farmer_dispatch_latency_seconds_sum {}",
            g.dispatch_sum
        );
        let _ = writeln!(
            out,
            "farmer_dispatch_latency_seconds_count {}",
            g.dispatch_count
        );
        let _ = writeln!(
            out,
            "# HELP farmer_build_phase_seconds Where build attempts spend their time, by phase (record-start, source-archive, source-push, steps, record-result, clean)."
        );
        let _ = writeln!(out, "# TYPE farmer_build_phase_seconds summary");
        for (phase, sum, _) in &g.phases {
            let _ = writeln!(
                out,
                "farmer_build_phase_seconds_sum{{phase=\"{phase}\"}} {sum}"
            );
        }
        for (phase, _, n) in &g.phases {
            let _ = writeln!(
                out,
                "farmer_build_phase_seconds_count{{phase=\"{phase}\"}} {n}"
            );
        }
    }
    let queues = farm.scheduler.views(0);
    // One family at a time: Prometheus reads a family's samples only
    // right after its HELP and TYPE lines.
    let _ = writeln!(
        out,
        "# HELP farmer_queue_length Lease requests (builds and others) waiting per host type."
    );
    let _ = writeln!(out, "# TYPE farmer_queue_length gauge");
    for ht in cfg.hosts.keys() {
        let q = queues.iter().find(|q| &q.host_type == ht);
        let _ = writeln!(
            out,
            "farmer_queue_length{{host_type=\"{}\"}} {}",
            label(ht),
            q.map_or(0, |q| q.waiting)
        );
    }
    let _ = writeln!(
        out,
        "# HELP farmer_queue_oldest_wait_seconds Age of the oldest waiting request per host type."
    );
    let _ = writeln!(out, "# TYPE farmer_queue_oldest_wait_seconds gauge");
    for ht in cfg.hosts.keys() {
        let q = queues.iter().find(|q| &q.host_type == ht);
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
    let _ = writeln!(
        out,
        "# HELP farmer_machine_token_checks_passed_total Re-checks of connected bots' machine tokens that passed."
    );
    let _ = writeln!(
        out,
        "# TYPE farmer_machine_token_checks_passed_total counter"
    );
    let _ = writeln!(
        out,
        "farmer_machine_token_checks_passed_total {}",
        farm.bots.checks_passed()
    );
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
    let _ = writeln!(
        out,
        "# HELP farmer_gomote_leases Machines held by gomote instances, by host type."
    );
    let _ = writeln!(out, "# TYPE farmer_gomote_leases gauge");
    let leases = farm.gomote.leases_by_host_type();
    for ht in cfg.hosts.keys() {
        let _ = writeln!(
            out,
            "farmer_gomote_leases{{host_type=\"{}\"}} {}",
            label(ht),
            leases.get(ht).copied().unwrap_or(0)
        );
    }
    let _ = writeln!(
        out,
        "# HELP farmer_gomote_calls_total Calls proxied to gomote instances' machines."
    );
    let _ = writeln!(out, "# TYPE farmer_gomote_calls_total counter");
    let _ = writeln!(
        out,
        "farmer_gomote_calls_total {}",
        farm.gomote.calls.load(std::sync::atomic::Ordering::Relaxed)
    );
    out
}
