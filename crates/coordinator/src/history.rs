//! The farm over the last hours, for the status page's charts: per host
//! type, the queue's length and oldest wait and the machines connected,
//! sampled every [`EVERY`] and kept for [`KEPT`]. In memory only: a restart
//! starts a fresh chart (the store keeps builds, not gauges).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

/// How often the farm is sampled.
pub const EVERY: Duration = Duration::from_secs(30);
/// How long samples are kept (6 hours).
pub const KEPT: usize = 6 * 60 * 2;

/// One host type at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostSample {
    pub host_type: String,
    pub waiting: usize,
    pub oldest_wait_secs: f64,
    pub connected: usize,
}

/// The farm at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    /// Seconds since the epoch.
    pub at: i64,
    pub hosts: Vec<HostSample>,
}

#[derive(Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    pub fn record(&self, s: Sample) {
        let mut g = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if g.len() == KEPT {
            g.pop_front();
        }
        g.push_back(s);
    }

    /// Every kept sample, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Per host type, `(seconds, value)` points of `value` over time,
    /// ending with `now` when given (a point drawn, not kept).
    pub fn series(
        &self,
        now: Option<&Sample>,
        value: impl Fn(&HostSample) -> f64,
    ) -> Vec<(String, Vec<(i64, f64)>)> {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(String, Vec<(i64, f64)>)> = Vec::new();
        for s in samples.iter().chain(now) {
            for h in &s.hosts {
                let i = match out.iter().position(|(n, _)| *n == h.host_type) {
                    Some(i) => i,
                    None => {
                        out.push((h.host_type.clone(), Vec::new()));
                        out.len() - 1
                    }
                };
                out[i].1.push((s.at, value(h)));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_and_splits_by_host_type() {
        let h = History::default();
        for at in 0..(KEPT as i64 + 5) {
            h.record(Sample {
                at,
                hosts: vec![HostSample {
                    host_type: "host-a".into(),
                    waiting: at as usize,
                    oldest_wait_secs: 0.0,
                    connected: 1,
                }],
            });
        }
        let s = h.samples();
        assert_eq!(s.len(), KEPT);
        assert_eq!(s[0].at, 5);
        let series = h.series(None, |x| x.waiting as f64);
        assert_eq!(series[0].0, "host-a");
        assert_eq!(
            series[0].1.last(),
            Some(&(KEPT as i64 + 4, (KEPT + 4) as f64))
        );
    }
}
