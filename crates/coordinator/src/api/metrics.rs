//! `/metrics`: the farm's state and counters in the OpenMetrics text format,
//! encoded by `prometheus-client`. Part of the API layer because it reads
//! the whole farm (store, lease queue, pool, sources); the counters
//! themselves live below the farm in [`crate::metrics`]. Gauges are read
//! from the farm's state at scrape time into a registry made for the
//! scrape, beside the long-lived counters; then the standard `process_*`
//! metrics.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::farm::Farm;
use crate::store::BuildStatus;

/// The content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;

fn gauges() -> Family<Labels, Gauge> {
    Family::default()
}

fn set(f: &Family<Labels, Gauge>, labels: Labels, v: i64) {
    f.get_or_create(&labels).set(v);
}

fn count(f: &Family<Labels, Counter>, labels: Labels, v: u64) {
    f.get_or_create(&labels).inc_by(v);
}

/// Renders every metric of the farm.
pub async fn render(farm: &Farm) -> String {
    let mut reg = Registry::default();
    let cfg = farm.config();
    reg.register(
        "farmer_build",
        "The coordinator's version",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    let uptime: Gauge = Gauge::default();
    uptime.set(farm.started.elapsed().as_secs() as i64);
    reg.register(
        "farmer_uptime_seconds",
        "Seconds since the coordinator started",
        uptime,
    );

    // Builds now (queued, running) apart from builds ever recorded by final
    // status (the store's, across restarts): a gauge never mixes the two.
    if let Ok(counts) = farm.store.status_counts().await {
        let n = |s: BuildStatus| counts.iter().find(|(x, _)| *x == s).map_or(0, |(_, n)| *n);
        let now = gauges();
        let recorded = gauges();
        for s in BuildStatus::ALL {
            let target = if s.is_terminal() { &recorded } else { &now };
            set(target, vec![("status", s.as_str().into())], n(s));
        }
        reg.register(
            "farmer_builds",
            "Builds queued or running now, by status",
            now,
        );
        reg.register(
            "farmer_builds_recorded",
            "Builds in the store by final status (all time, across restarts)",
            recorded,
        );
    }
    for b in cfg.builders.keys() {
        farm.metrics.flaky_tests(b, 0);
    }
    farm.metrics.register(&mut reg);

    let queues = farm.scheduler.views(0);
    let length = gauges();
    let oldest: Family<Labels, Gauge<f64, AtomicU64>> = Family::default();
    for ht in cfg.hosts.keys() {
        let q = queues.iter().find(|q| &q.host_type == ht);
        set(
            &length,
            vec![("host_type", ht.clone())],
            q.map_or(0, |q| q.waiting as i64),
        );
        oldest
            .get_or_create(&vec![("host_type", ht.clone())])
            .set(q.map_or(0.0, |q| q.oldest_wait_secs));
    }
    reg.register(
        "farmer_queue_length",
        "Lease requests (builds and others) waiting per host type",
        length,
    );
    reg.register(
        "farmer_queue_oldest_wait_seconds",
        "Age of the oldest waiting request per host type",
        oldest,
    );

    let counts = farm.pool.counts();
    let machines = gauges();
    for (ht, h) in &cfg.hosts {
        let c = counts.get(ht).copied().unwrap_or_default();
        for (state, v) in [
            ("connected", c.connected as i64),
            ("busy", c.busy as i64),
            ("parked", c.parked as i64),
            ("expected", h.expected as i64),
        ] {
            set(
                &machines,
                vec![("host_type", ht.clone()), ("state", state.into())],
                v,
            );
        }
    }
    reg.register(
        "farmer_machines",
        "Machines per host type: connected, busy, parked (idle, link parked), expected",
        machines,
    );

    let refused: Family<Labels, Counter> = Family::default();
    for ((ht, kind), n) in farm.pool.refusal_counts() {
        count(&refused, vec![("host_type", ht), ("reason", kind)], n);
    }
    reg.register(
        "farmer_registrations_refused",
        "Refused buildlet registrations by host type and reason",
        refused,
    );
    let parks: Counter = Counter::default();
    parks.inc_by(crate::link::parks_total());
    reg.register(
        "farmer_links_parked",
        "Times a reverse link parked (each wake and park again counts once): a fast rise means links wake often",
        parks,
    );
    let checks: Counter = Counter::default();
    checks.inc_by(farm.bots.checks_passed());
    reg.register(
        "farmer_machine_token_checks_passed",
        "Re-checks of connected bots' machine tokens that passed",
        checks,
    );

    let sources = farm.sources.views();
    let failures: Family<Labels, Counter> = Family::default();
    let exec_machines = gauges();
    for s in sources.iter().filter(|s| s.kind == "exec") {
        // Every reason, zeros included, so a series never has gaps.
        for reason in crate::sources::exec::FAILURE_REASONS {
            let _ = failures.get_or_create(&vec![
                ("host_type", s.host_type.clone()),
                ("reason", reason.to_string()),
            ]);
        }
        for (reason, n) in &s.failures {
            count(
                &failures,
                vec![
                    ("host_type", s.host_type.clone()),
                    ("reason", reason.clone()),
                ],
                *n,
            );
        }
        for state in ["creating", "registering", "registered", "destroying"] {
            let n = s.instances.iter().filter(|i| i.state == state).count();
            set(
                &exec_machines,
                vec![("host_type", s.host_type.clone()), ("state", state.into())],
                n as i64,
            );
        }
    }
    reg.register(
        "farmer_exec_failures",
        "Failed machines of exec pools by host type and reason (create-failed, create-timeout, register-timeout, destroy-failed, destroy-timeout)",
        failures,
    );
    reg.register(
        "farmer_exec_machines",
        "Machines of exec pools by host type and state (creating, registering, registered, destroying)",
        exec_machines,
    );

    let leases = farm.gomote.leases_by_host_type();
    let gomote = gauges();
    for ht in cfg.hosts.keys() {
        set(
            &gomote,
            vec![("host_type", ht.clone())],
            leases.get(ht).copied().unwrap_or(0) as i64,
        );
    }
    reg.register(
        "farmer_gomote_leases",
        "Machines held by gomote instances, by host type",
        gomote,
    );
    let calls: Counter = Counter::default();
    calls.inc_by(farm.gomote.calls.load(std::sync::atomic::Ordering::Relaxed));
    reg.register(
        "farmer_gomote_calls",
        "Calls proxied to gomote instances' machines",
        calls,
    );

    process::register(&mut reg);

    let mut out = String::new();
    if let Err(e) = encode(&mut out, &reg) {
        tracing::error!("encoding /metrics: {e}");
    }
    out
}

/// The standard `process_*` metrics, read from `/proc/self` (Linux).
mod process {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::registry::Registry;
    use std::sync::atomic::AtomicU64;

    #[cfg(unix)]
    fn ticks_per_second() -> f64 {
        // SAFETY: sysconf only reads a configuration value.
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if t > 0 { t as f64 } else { 100.0 }
    }

    #[cfg(not(unix))]
    fn ticks_per_second() -> f64 {
        100.0
    }

    fn status_kb(status: &str, field: &str) -> Option<i64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    }

    pub fn register(reg: &mut Registry) {
        let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
            return;
        };
        // Fields after the command (which may hold spaces) in parentheses.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            return;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let tps = ticks_per_second();
        // utime and stime are fields 14 and 15 of stat; `rest` starts at 3.
        let cpu: Counter<f64, AtomicU64> = Counter::default();
        cpu.inc_by((num(11) + num(12)) / tps);
        reg.register(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            cpu,
        );
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let g = |v: i64| {
            let g: Gauge = Gauge::default();
            g.set(v);
            g
        };
        if let Some(kb) = status_kb(&status, "VmRSS:") {
            reg.register(
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                g(kb * 1024),
            );
        }
        if let Some(kb) = status_kb(&status, "VmSize:") {
            reg.register(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                g(kb * 1024),
            );
        }
        if let Some(n) = status_kb(&status, "Threads:") {
            reg.register("process_threads", "Number of OS threads", g(n));
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            reg.register(
                "process_open_fds",
                "Number of open file descriptors",
                g(fds.count() as i64),
            );
        }
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        if let Some(max) = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse::<i64>().ok())
        {
            reg.register(
                "process_max_fds",
                "Maximum number of open file descriptors",
                g(max),
            );
        }
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        if let Some(boot) = boot {
            // starttime is field 22 of stat.
            let start: Gauge<f64, AtomicU64> = Gauge::default();
            start.set(boot + num(19) / tps);
            reg.register(
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                start,
            );
        }
    }
}
