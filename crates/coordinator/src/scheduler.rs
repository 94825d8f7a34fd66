//! The lease queue: every user of a machine — a build, a helper of a
//! sharded build, an interactive session — asks here, and nowhere else, for
//! a machine of a host type ([`Scheduler::request`]). The answer is a
//! [`Lease`] on a machine of the [`Pool`], or nothing if the asker gives up
//! first (dropping its [`Ticket`] withdraws the request, and a machine
//! handed to a ticket nobody reads goes back to the pool).
//!
//! Priority classes, most urgent first: release > interactive >
//! pre-submit > post-submit. Within a class requests are served first in,
//! first out, except post-submit, which takes the newest commit first (the
//! state of the branch tip matters more than history). [`Scheduler::dispatch`]
//! only matches waiting requests with idle machines, so a queue that grows
//! says exactly which host type lacks machines — which is also the demand
//! an elastic machine source reads ([`Scheduler::waiting`]).

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{Notify, oneshot};

use crate::pool::{Holder, Lease, Pool};

/// How urgent a request is; first = most urgent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Priority {
    Release,
    Interactive,
    PreSubmit,
    PostSubmit,
}

/// A request for one machine.
#[derive(Debug, Clone)]
pub struct LeaseRequest {
    pub host_type: String,
    pub priority: Priority,
    /// Who will hold the machine; shown as the machine's state.
    pub holder: Holder,
    /// Orders post-submit work newest first (seconds since the epoch).
    pub commit_time: i64,
}

struct Waiting {
    id: u64,
    req: LeaseRequest,
    enqueued: Instant,
    tx: oneshot::Sender<Lease>,
}

impl Waiting {
    fn rank(&self) -> (Priority, i64, u64) {
        let newest_first = if self.req.priority == Priority::PostSubmit {
            -self.req.commit_time
        } else {
            0
        };
        (self.req.priority, newest_first, self.id)
    }
}

impl PartialEq for Waiting {
    fn eq(&self, o: &Self) -> bool {
        self.rank() == o.rank()
    }
}
impl Eq for Waiting {}
impl PartialOrd for Waiting {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Waiting {
    /// BinaryHeap is a max-heap: the most urgent request must compare greatest.
    fn cmp(&self, o: &Self) -> Ordering {
        o.rank().cmp(&self.rank())
    }
}

/// Most requests a [`QueueView`] lists per host type (the most urgent);
/// `waiting` still counts all. `/api/queue` is open to anyone, so its
/// answer must not grow with the queue.
pub const VIEW_LIMIT: usize = 1000;

/// One waiting request, for `/api/queue` and the pages.
#[derive(Debug, Clone, Serialize)]
pub struct RequestView {
    pub id: u64,
    #[serde(flatten)]
    pub holder: Holder,
    pub priority: Priority,
    pub waiting_secs: f64,
}

/// The state of one host type's queue, for the status page and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct QueueView {
    pub host_type: String,
    pub waiting: usize,
    pub oldest_wait_secs: f64,
    pub by_kind: Vec<(Priority, usize)>,
    /// Builds waiting (as the holders of their requests), most urgent
    /// first; at most [`VIEW_LIMIT`].
    pub build_ids: Vec<i64>,
    /// The waiting requests, most urgent first; at most [`VIEW_LIMIT`].
    pub requests: Vec<RequestView>,
}

/// Why a ticket got no machine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the request for a machine was withdrawn")]
pub struct Withdrawn;

/// A waiting request. Await [`Ticket::lease`]; drop it to withdraw.
pub struct Ticket {
    id: u64,
    host_type: String,
    enqueued: Instant,
    rx: Option<oneshot::Receiver<Lease>>,
    scheduler: Arc<Scheduler>,
}

impl Ticket {
    /// Waits for the machine. `Err` when the request was withdrawn by
    /// someone else (e.g. the build was cancelled while it waited).
    pub async fn lease(&mut self) -> Result<Lease, Withdrawn> {
        let rx = self.rx.as_mut().ok_or(Withdrawn)?;
        let r = rx.await.map_err(|_| Withdrawn);
        self.rx = None;
        r
    }

    /// How long the request has waited (so far, or until its lease).
    pub fn waited(&self) -> Duration {
        self.enqueued.elapsed()
    }

    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // A ticket that got its lease left the queue when it was served.
        if let Some(mut rx) = self.rx.take() {
            self.scheduler.withdraw(&self.host_type, self.id);
            rx.close();
            // Handed over but never taken: the machine goes back.
            if let Ok(lease) = rx.try_recv() {
                self.scheduler.pool.release_idle(lease.id);
            }
        }
    }
}

pub struct Scheduler {
    pool: Arc<Pool>,
    queues: Mutex<HashMap<String, BinaryHeap<Waiting>>>,
    seq: AtomicU64,
    /// Signalled on every new request.
    pub changed: Notify,
}

impl Scheduler {
    pub fn new(pool: Arc<Pool>) -> Arc<Scheduler> {
        Arc::new(Scheduler {
            pool,
            queues: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
            changed: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, BinaryHeap<Waiting>>> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks for a machine: the one way anything gets one.
    pub fn request(self: &Arc<Self>, req: LeaseRequest) -> Ticket {
        let id = self.seq.fetch_add(1, AtomicOrdering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        let enqueued = Instant::now();
        let host_type = req.host_type.clone();
        self.lock()
            .entry(host_type.clone())
            .or_default()
            .push(Waiting {
                id,
                req,
                enqueued,
                tx,
            });
        self.changed.notify_one();
        Ticket {
            id,
            host_type,
            enqueued,
            rx: Some(rx),
            scheduler: self.clone(),
        }
    }

    fn withdraw(&self, host_type: &str, id: u64) {
        let mut q = self.lock();
        if let Some(heap) = q.get_mut(host_type) {
            heap.retain(|w| w.id != id);
            if heap.is_empty() {
                q.remove(host_type);
            }
        }
    }

    /// Withdraws every request held for `holder` (its ticket then gets
    /// [`Withdrawn`]). Returns how many there were.
    pub fn withdraw_holder(&self, holder: &Holder) -> usize {
        let mut q = self.lock();
        let mut n = 0;
        for heap in q.values_mut() {
            let before = heap.len();
            heap.retain(|w| w.req.holder != *holder);
            n += before - heap.len();
        }
        q.retain(|_, h| !h.is_empty());
        n
    }

    /// Matches waiting requests with idle machines until one side runs
    /// out. Returns the number of leases handed out.
    pub fn dispatch(&self) -> usize {
        let mut q = self.lock();
        let mut handed = 0;
        for (ht, heap) in q.iter_mut() {
            while let Some(top) = heap.peek() {
                let Some(lease) = self.pool.lease(ht, top.req.holder.clone()) else {
                    break;
                };
                let Some(w) = heap.pop() else { break };
                match w.tx.send(lease) {
                    Ok(()) => handed += 1,
                    // The asker is gone; the machine goes back.
                    Err(lease) => self.pool.release_idle(lease.id),
                }
            }
        }
        q.retain(|_, h| !h.is_empty());
        handed
    }

    /// Requests waiting for a host type: the demand elastic sources read.
    pub fn waiting(&self, host_type: &str) -> usize {
        self.lock().get(host_type).map_or(0, |h| h.len())
    }

    /// Where a holder's request stands: (1-based position, queue length).
    pub fn position(&self, host_type: &str, holder: &Holder) -> Option<(usize, usize)> {
        let q = self.lock();
        let heap = q.get(host_type)?;
        let me = heap.iter().find(|w| w.req.holder == *holder)?;
        // More urgent compares greater (see `Ord for Waiting`).
        let ahead = heap.iter().filter(|w| *w > me).count();
        Some((ahead + 1, heap.len()))
    }

    /// Each host type's queue: counts, the oldest wait, and the `listed`
    /// most urgent requests (at most [`VIEW_LIMIT`]; 0 for counts only,
    /// which sorts nothing).
    pub fn views(&self, listed: usize) -> Vec<QueueView> {
        let listed = listed.min(VIEW_LIMIT);
        let q = self.lock();
        let mut out: Vec<QueueView> = q
            .iter()
            .filter(|(_, h)| !h.is_empty())
            .map(|(ht, heap)| {
                let mut by_kind: BTreeMap<Priority, usize> = BTreeMap::new();
                for w in heap.iter() {
                    *by_kind.entry(w.req.priority).or_default() += 1;
                }
                let oldest_wait_secs = heap
                    .iter()
                    .map(|w| w.enqueued.elapsed().as_secs_f64())
                    .fold(0.0, f64::max);
                let mut sorted: Vec<&Waiting> = if listed == 0 {
                    Vec::new()
                } else {
                    heap.iter().collect()
                };
                if sorted.len() > listed {
                    sorted.select_nth_unstable_by(listed, |a, b| b.cmp(a));
                    sorted.truncate(listed);
                }
                sorted.sort_by(|a, b| b.cmp(a));
                QueueView {
                    host_type: ht.clone(),
                    waiting: heap.len(),
                    oldest_wait_secs,
                    by_kind: by_kind.into_iter().collect(),
                    build_ids: sorted
                        .iter()
                        .filter_map(|w| match w.req.holder {
                            Holder::Build { build_id } => Some(build_id),
                            _ => None,
                        })
                        .collect(),
                    requests: sorted
                        .iter()
                        .map(|w| RequestView {
                            id: w.id,
                            holder: w.req.holder.clone(),
                            priority: w.req.priority,
                            waiting_secs: w.enqueued.elapsed().as_secs_f64(),
                        })
                        .collect(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.host_type.cmp(&b.host_type));
        out
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Priority::Release => "release",
            Priority::Interactive => "interactive",
            Priority::PreSubmit => "pre-submit",
            Priority::PostSubmit => "post-submit",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ht: &str, p: Priority, t: i64, h: Holder) -> LeaseRequest {
        LeaseRequest {
            host_type: ht.into(),
            priority: p,
            holder: h,
            commit_time: t,
        }
    }

    fn build(id: i64) -> Holder {
        Holder::Build { build_id: id }
    }

    #[test]
    fn views_order_by_priority_and_newest_post_submit_first() {
        let s = Scheduler::new(Arc::new(Pool::new()));
        let interactive = Holder::Interactive {
            session: "s1".into(),
        };
        let _tickets: Vec<Ticket> = [
            (Priority::PostSubmit, 100, build(1)),
            (Priority::PostSubmit, 300, build(2)),
            (Priority::PreSubmit, 1, build(3)),
            (Priority::Interactive, 1, interactive),
            (Priority::PreSubmit, 999, build(5)),
            (Priority::Release, 1, build(6)),
            (Priority::PostSubmit, 200, build(7)),
            (Priority::PostSubmit, 1, Holder::Helper { build_id: 7 }),
        ]
        .into_iter()
        .map(|(p, t, h)| s.request(req("h", p, t, h)))
        .collect();
        let v = &s.views(VIEW_LIMIT)[0];
        assert_eq!(v.build_ids, vec![6, 3, 5, 2, 7, 1]);
        assert_eq!(v.waiting, 8);
        assert_eq!(
            v.requests[1].holder,
            Holder::Interactive {
                session: "s1".into()
            }
        );
        assert_eq!(v.requests[7].holder, Holder::Helper { build_id: 7 });
        assert_eq!(s.position("h", &build(2)), Some((5, 8)));
    }

    #[test]
    fn views_list_at_most_the_limit_most_urgent_first() {
        let s = Scheduler::new(Arc::new(Pool::new()));
        let n = VIEW_LIMIT as i64 + 500;
        let _tickets: Vec<Ticket> = (1..=n)
            .map(|i| s.request(req("h", Priority::PostSubmit, i, build(i))))
            .collect();
        let v = &s.views(VIEW_LIMIT)[0];
        assert_eq!(v.waiting, n as usize);
        assert_eq!(v.requests.len(), VIEW_LIMIT);
        assert_eq!(v.build_ids.len(), VIEW_LIMIT);
        // Newest commit first: the listed ones are the most urgent.
        assert_eq!(v.build_ids[0], n);
        assert_eq!(*v.build_ids.last().unwrap(), n - VIEW_LIMIT as i64 + 1);
        // A position past the listed ones is still known.
        assert_eq!(s.position("h", &build(1)), Some((n as usize, n as usize)));
    }

    #[test]
    fn dropped_and_withdrawn_requests_leave_the_queue() {
        let s = Scheduler::new(Arc::new(Pool::new()));
        let a = s.request(req("h", Priority::PostSubmit, 1, build(1)));
        let mut b = s.request(req("h", Priority::PostSubmit, 2, build(2)));
        assert_eq!(s.waiting("h"), 2);
        drop(a);
        assert_eq!(s.waiting("h"), 1);
        assert_eq!(s.withdraw_holder(&build(2)), 1);
        assert_eq!(s.waiting("h"), 0);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(matches!(rt.block_on(b.lease()), Err(Withdrawn)));
        assert!(s.views(VIEW_LIMIT).is_empty());
    }
}
