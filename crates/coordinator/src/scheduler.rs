//! The scheduler: one queue per host type.
//!
//! Priority classes, most urgent first: release > interactive (gomote) >
//! pre-submit > post-submit. Within a class work is first in, first out,
//! except post-submit, which takes the newest commit first (the state of the
//! branch tip matters more than history). The dispatcher pops from a queue
//! only when a machine of that host type is idle, so a queue that grows says
//! exactly which host type lacks machines.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::Instant;

use serde::Serialize;
use tokio::sync::Notify;

use crate::store::BuildKind;

/// One queued build.
#[derive(Debug, Clone)]
pub struct Entry {
    pub build_id: i64,
    pub host_type: String,
    pub kind: BuildKind,
    pub commit_time: i64,
    pub enqueued: Instant,
    seq: u64,
}

impl Entry {
    fn rank(&self) -> (BuildKind, i64, u64) {
        let newest_first = if self.kind == BuildKind::PostSubmit {
            -self.commit_time
        } else {
            0
        };
        (self.kind, newest_first, self.seq)
    }
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        self.rank() == o.rank()
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    /// BinaryHeap is a max-heap: the most urgent entry must compare greatest.
    fn cmp(&self, o: &Self) -> Ordering {
        o.rank().cmp(&self.rank())
    }
}

/// The state of one host type's queue, for the status page and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct QueueView {
    pub host_type: String,
    pub waiting: usize,
    pub oldest_wait_secs: f64,
    pub by_kind: Vec<(BuildKind, usize)>,
    pub build_ids: Vec<i64>,
}

#[derive(Default)]
pub struct Scheduler {
    queues: Mutex<HashMap<String, BinaryHeap<Entry>>>,
    /// Builds removed (cancelled) while queued; skipped when popped.
    removed: Mutex<HashSet<i64>>,
    seq: AtomicU64,
    /// Signalled on every push.
    pub changed: Notify,
}

impl Scheduler {
    pub fn new() -> Scheduler {
        Scheduler::default()
    }

    pub fn push(&self, build_id: i64, host_type: &str, kind: BuildKind, commit_time: i64) {
        let e = Entry {
            build_id,
            host_type: host_type.to_string(),
            kind,
            commit_time,
            enqueued: Instant::now(),
            seq: self.seq.fetch_add(1, AtomicOrdering::Relaxed),
        };
        self.queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(host_type.to_string())
            .or_default()
            .push(e);
        self.changed.notify_one();
    }

    /// The most urgent entry for a host type.
    pub fn pop(&self, host_type: &str) -> Option<Entry> {
        let mut q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let heap = q.get_mut(host_type)?;
        let mut removed = self.removed.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(e) = heap.pop() {
            if !removed.remove(&e.build_id) {
                return Some(e);
            }
        }
        None
    }

    /// Drops a queued build (cancelled).
    pub fn remove(&self, build_id: i64) {
        let q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        if q.values().any(|h| h.iter().any(|e| e.build_id == build_id)) {
            self.removed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(build_id);
        }
    }

    /// Host types that have queued work.
    pub fn host_types_with_work(&self) -> Vec<String> {
        let q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        q.iter()
            .filter(|(_, h)| !h.is_empty())
            .map(|(k, _)| k.clone())
            .collect()
    }

    pub fn views(&self) -> Vec<QueueView> {
        let q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let removed = self.removed.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<QueueView> = q
            .iter()
            .map(|(ht, heap)| {
                let live: Vec<&Entry> = heap
                    .iter()
                    .filter(|e| !removed.contains(&e.build_id))
                    .collect();
                let mut by_kind: HashMap<BuildKind, usize> = HashMap::new();
                for e in &live {
                    *by_kind.entry(e.kind).or_default() += 1;
                }
                let mut by_kind: Vec<_> = by_kind.into_iter().collect();
                by_kind.sort();
                let mut sorted = live.clone();
                sorted.sort_by(|a, b| b.cmp(a));
                QueueView {
                    host_type: ht.clone(),
                    waiting: live.len(),
                    oldest_wait_secs: live
                        .iter()
                        .map(|e| e.enqueued.elapsed().as_secs_f64())
                        .fold(0.0, f64::max),
                    by_kind,
                    build_ids: sorted.iter().map(|e| e.build_id).collect(),
                }
            })
            .filter(|v| v.waiting > 0)
            .collect();
        out.sort_by(|a, b| a.host_type.cmp(&b.host_type));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_classes_and_newest_first() {
        let s = Scheduler::new();
        s.push(1, "h", BuildKind::PostSubmit, 100);
        s.push(2, "h", BuildKind::PostSubmit, 300);
        s.push(3, "h", BuildKind::PreSubmit, 1);
        s.push(4, "h", BuildKind::Interactive, 1);
        s.push(5, "h", BuildKind::PreSubmit, 999);
        s.push(6, "h", BuildKind::Release, 1);
        s.push(7, "h", BuildKind::PostSubmit, 200);
        s.push(8, "other", BuildKind::Release, 1);
        let order: Vec<i64> = std::iter::from_fn(|| s.pop("h").map(|e| e.build_id)).collect();
        assert_eq!(order, vec![6, 4, 3, 5, 2, 7, 1]);
        assert_eq!(s.pop("other").unwrap().build_id, 8);
    }

    #[test]
    fn removed_entries_are_skipped() {
        let s = Scheduler::new();
        s.push(1, "h", BuildKind::PostSubmit, 1);
        s.push(2, "h", BuildKind::PostSubmit, 2);
        s.remove(2);
        assert_eq!(s.views()[0].waiting, 1);
        assert_eq!(s.pop("h").unwrap().build_id, 1);
        assert!(s.pop("h").is_none());
    }
}
