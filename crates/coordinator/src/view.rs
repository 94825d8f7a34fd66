//! Shared views of the farm's state for the JSON API, the dashboard and
//! `/metrics`: one wording of health and of durations, whichever page
//! shows them.

use serde::Serialize;

pub use crate::config::human_duration;
use crate::farm::Farm;

#[derive(Serialize)]
pub struct HealthLine {
    pub level: &'static str,
    pub host_type: String,
    pub message: String,
}

/// Warnings for host types with fewer machines than expected; `seen` is
/// the store's machine history, which the caller reads once per page.
/// Missing machines a health line names before it counts the rest.
const GONE_NAMED: usize = 5;

pub fn health(farm: &Farm, seen: &[crate::store::MachineRow]) -> Vec<HealthLine> {
    let cfg = farm.config();
    let counts = farm.pool.counts();
    let connected: std::collections::HashSet<String> = farm
        .pool
        .snapshot()
        .into_iter()
        .map(|m| m.hostname)
        .collect();
    let now = crate::store::now_ms();
    let mut out = Vec::new();
    for (ht, h) in &cfg.hosts {
        let c = counts.get(ht).copied().unwrap_or_default();
        if c.connected < h.expected {
            let missing = h.expected - c.connected;
            let gone: Vec<String> = seen
                .iter()
                .filter(|m| &m.host_type == ht && !connected.contains(&m.hostname))
                .map(|m| {
                    format!(
                        "{} (not seen for {})",
                        m.hostname,
                        human_duration((now - m.last_seen).max(0) / 1000)
                    )
                })
                .collect();
            let level = if c.connected == 0 { "error" } else { "warning" };
            let mut message = format!(
                "{missing} missing: {} of {} expected machines connected",
                c.connected, h.expected
            );
            if !gone.is_empty() {
                // A line to read, not a list: the first few, then a count.
                let shown = gone.len().min(GONE_NAMED);
                message.push_str(&format!("; last seen: {}", gone[..shown].join(", ")));
                if gone.len() > shown {
                    message.push_str(&format!(" and {} more", gone.len() - shown));
                }
            }
            out.push(HealthLine {
                level,
                host_type: ht.clone(),
                message,
            });
        }
    }
    for (repo, err) in farm
        .poll_errors
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        out.push(HealthLine {
            level: "error",
            host_type: String::new(),
            message: format!("repo {repo}: {err}"),
        });
    }
    out
}

/// A size for people: `850 bytes`, `12.3 KiB`, `30.1 MiB`.
pub fn human_bytes(n: u64) -> String {
    if n >= 10 << 20 {
        format!("{:.1} MiB", n as f64 / (1 << 20) as f64)
    } else if n >= 10 << 10 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} bytes")
    }
}
