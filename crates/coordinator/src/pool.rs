//! The reverse pool: every connected buildlet, by host type.
//!
//! Machines register through [`crate::reverse`]; the pool leases them one
//! build at a time, and knows at every moment what each machine does and
//! since when, so the status page can say why work waits. A machine that
//! reconnects under the same host name replaces its old entry. Refused
//! registrations are counted per host type with their reason, because a
//! machine owner's first question is "why is my machine not there?".

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use buildlet::client::Client;
use serde::Serialize;
use tokio::sync::Notify;

use crate::store::now_ms;

/// Who holds a leased machine (and who asks for one in the lease queue).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "holder", rename_all = "kebab-case")]
pub enum Holder {
    /// A build runs on it.
    Build { build_id: i64 },
    /// It runs a shard of a build's tests for that build.
    Helper { build_id: i64 },
    /// Someone works on it interactively (gomote).
    Interactive { session: String },
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Build { build_id } => write!(f, "build {build_id}"),
            Holder::Helper { build_id } => write!(f, "helper of build {build_id}"),
            Holder::Interactive { session } => write!(f, "interactive session {session}"),
        }
    }
}

/// What a machine is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum MachineState {
    Idle,
    /// Leased; the holder says to whom.
    Leased {
        #[serde(flatten)]
        holder: Holder,
    },
    /// Being emptied (`removeall .`) after a lease.
    Cleaning,
    /// Taken out of service (to be halted or destroyed); no new lease.
    Draining,
}

impl MachineState {
    /// The build a machine works for, if any.
    pub fn build_id(&self) -> Option<i64> {
        match self {
            MachineState::Leased {
                holder: Holder::Build { build_id } | Holder::Helper { build_id },
            } => Some(*build_id),
            _ => None,
        }
    }
}

/// A connected machine, as shown on the status page and in `/api/machines`.
#[derive(Debug, Clone, Serialize)]
pub struct MachineView {
    pub id: u64,
    pub hostname: String,
    pub host_type: String,
    pub version: u32,
    pub build: String,
    pub addr: String,
    pub connected_at: i64,
    #[serde(flatten)]
    pub state: MachineState,
    /// When the current state began (ms since the epoch).
    pub state_since: i64,
    /// Takes no new lease (to be halted or destroyed after the current one).
    pub draining: bool,
    /// Which buildlet binary it runs, and whether that is the current release.
    pub binary: MachineBinary,
}

struct Machine {
    view: MachineView,
    client: Client,
    /// Aborts the connection task (closing the link) when the machine is dropped.
    conn: tokio::task::AbortHandle,
    /// Registered with a machine certificate (bot) rather than a builder key.
    bot: bool,
}

/// Who may take over a host name: the same host type with the same kind of
/// credential. Anything else would let one machine evict another.
pub fn identity_conflict(
    hostname: &str,
    held: (&str, bool),
    claimed: (&str, bool),
) -> Option<String> {
    let kind = |bot: bool| {
        if bot {
            "a machine certificate"
        } else {
            "a builder key"
        }
    };
    if held.0 != claimed.0 {
        return Some(format!(
            "host name {hostname:?} is in use by a connected machine of another host type; pick a unique -hostname"
        ));
    }
    if held.1 != claimed.1 {
        return Some(format!(
            "host name {hostname:?} is in use by a machine that registered with {}, and this one used {}; pick a unique -hostname",
            kind(held.1),
            kind(claimed.1)
        ));
    }
    None
}

/// What [`Pool::drain`] found.
pub enum Drained {
    /// It was idle and is now taken (not leasable); the caller halts it.
    Idle(Client),
    /// It is busy; it takes no new builds. Call again when it is idle.
    Busy,
}

/// A machine leased to one holder.
#[derive(Clone, Debug)]
pub struct Lease {
    pub id: u64,
    pub hostname: String,
    pub host_type: String,
    pub client: Client,
    /// The machine's work dir is known empty: its last command cleaned it
    /// ([`Client::exec_then_clean`]), so ending the lease needs no
    /// `/removeall`.
    pub emptied: bool,
}

impl MachineView {
    /// Draining from now on: no new lease.
    fn take_out_of_service(&mut self) {
        self.draining = true;
        self.state = MachineState::Draining;
        self.state_since = now_ms();
    }
}

/// Which binary a machine runs, and whether it is the current release
/// (filled in by [`crate::release`], which knows the releases).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MachineBinary {
    /// `os/arch` (what stage0 fetched, else from `/status`).
    pub platform: String,
    /// SHA-256 of its executable (empty if it did not say).
    pub sha256: String,
    /// The release label of that binary, if it was published here.
    pub release: Option<String>,
    /// Started by stage0 (so halting it upgrades it).
    pub stage0: bool,
    /// `current`, `outdated` (will be upgraded), `upgrading` (asked to
    /// halt), `stuck` (asked, came back on the old binary), `not-managed`
    /// (not under stage0), `no-release` (nothing published for its
    /// platform), or `unknown`.
    pub status: String,
    /// A sentence for the status page when something needs attention.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
}

impl MachineBinary {
    /// Runs something other than its platform's current release.
    pub fn is_outdated(&self) -> bool {
        !matches!(
            self.status.as_str(),
            "current" | "no-release" | "unknown" | ""
        )
    }
}

/// A refused registration, kept for the status page.
#[derive(Debug, Clone, Serialize)]
pub struct Refusal {
    pub at: i64,
    pub host_type: String,
    pub hostname: String,
    pub addr: String,
    pub reason: String,
    /// Short machine-readable reason, the label of the refusal metrics.
    pub kind: String,
}

#[derive(Default)]
struct Refusals {
    recent: VecDeque<Refusal>,
    counts: BTreeMap<(String, String), u64>,
}

/// Connected and busy counts of one host type.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Counts {
    pub connected: u32,
    pub busy: u32,
    /// Idle with their links parked ([`crate::link`]).
    pub parked: u32,
}

#[derive(Default)]
pub struct Pool {
    machines: Mutex<HashMap<u64, Machine>>,
    refusals: Mutex<Refusals>,
    next_id: AtomicU64,
    /// Host names (with host type) promised to a holder: when that machine
    /// (re)connects it is leased to the holder at once, never idle. Keeps a
    /// gomote instance's machine across a coordinator restart or a
    /// reconnect.
    reserved: Mutex<HashMap<(String, String), Holder>>,
    /// Signalled whenever a machine becomes idle or joins.
    pub changed: Notify,
}

const RECENT_REFUSALS: usize = 100;

/// At most `max` characters of `s`, marked when cut.
fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

impl Pool {
    pub fn new() -> Pool {
        Pool::default()
    }

    /// The host type and credential kind (bot or not) of the connected
    /// machine called `hostname`, if any.
    pub fn holder(&self, hostname: &str) -> Option<(String, bool)> {
        let m = self.machines.lock().unwrap_or_else(|e| e.into_inner());
        m.values()
            .find(|x| x.view.hostname == hostname)
            .map(|x| (x.view.host_type.clone(), x.bot))
    }

    /// Adds a registered machine (idle). An older entry with the same host
    /// name and the same identity (host type and kind of credential) is
    /// dropped and its connection closed: that is the machine reconnecting.
    /// A different identity is refused with the reason. Returns the new id.
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &self,
        hostname: &str,
        host_type: &str,
        bot: bool,
        version: u32,
        build: &str,
        addr: &str,
        binary: MachineBinary,
        client: Client,
        conn: tokio::task::AbortHandle,
    ) -> Result<u64, String> {
        let now = now_ms();
        let mut m = self.machines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = m
            .values()
            .filter(|x| x.view.hostname == hostname)
            .find_map(|x| identity_conflict(hostname, (&x.view.host_type, x.bot), (host_type, bot)))
        {
            return Err(why);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let old: Vec<u64> = m
            .values()
            .filter(|x| x.view.hostname == hostname)
            .map(|x| x.view.id)
            .collect();
        // An interactive lease survives a reconnect: the person working on
        // the machine keeps it (a build sees its link break and retries).
        // A machine taken out of service (to be halted, or an ephemeral one
        // to be destroyed) stays out of service.
        let mut state = MachineState::Idle;
        let mut draining = false;
        for o in old {
            if let Some(old) = m.remove(&o) {
                tracing::info!(
                    hostname,
                    "machine reconnected; dropping its previous connection"
                );
                old.conn.abort();
                draining |= old.view.draining;
                match old.view.state {
                    MachineState::Leased {
                        holder: h @ Holder::Interactive { .. },
                    } => state = MachineState::Leased { holder: h },
                    MachineState::Draining => state = MachineState::Draining,
                    _ => {}
                }
            }
        }
        if draining && state == MachineState::Idle {
            state = MachineState::Draining;
        }
        if let Some(h) = self
            .reserved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(host_type.to_string(), hostname.to_string()))
        {
            tracing::info!(hostname, holder = %h, "reserved machine connected; leased to its holder");
            state = MachineState::Leased { holder: h };
        }
        m.insert(
            id,
            Machine {
                view: MachineView {
                    id,
                    hostname: hostname.into(),
                    host_type: host_type.into(),
                    version,
                    build: build.into(),
                    addr: addr.into(),
                    connected_at: now,
                    state,
                    state_since: now,
                    draining,
                    binary,
                },
                client,
                conn,
                bot,
            },
        );
        drop(m);
        self.changed.notify_one();
        Ok(id)
    }

    /// Removes a machine and closes its connection. Returns whether it was there.
    pub fn remove(&self, id: u64, reason: &str) -> bool {
        let removed = self
            .machines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        match removed {
            Some(m) => {
                tracing::info!(hostname = %m.view.hostname, host_type = %m.view.host_type, "machine left the pool: {reason}");
                m.conn.abort();
                true
            }
            None => false,
        }
    }

    /// Leases the idle machine of `host_type` that has been idle longest
    /// to `holder`. Only the lease queue calls this
    /// ([`crate::scheduler::Scheduler::dispatch`]).
    pub(crate) fn lease(&self, host_type: &str, holder: Holder) -> Option<Lease> {
        let mut m = self.machines.lock().unwrap_or_else(|e| e.into_inner());
        let best = m
            .values_mut()
            .filter(|x| {
                x.view.host_type == host_type
                    && x.view.state == MachineState::Idle
                    && !x.view.draining
            })
            .min_by_key(|x| (x.view.state_since, x.view.id))?;
        best.view.state = MachineState::Leased { holder };
        best.view.state_since = now_ms();
        Some(Lease {
            id: best.view.id,
            hostname: best.view.hostname.clone(),
            host_type: best.view.host_type.clone(),
            client: best.client.clone(),
            emptied: false,
        })
    }

    /// The machine currently leased to `holder`, if it is connected.
    pub fn leased_to(&self, holder: &Holder) -> Option<Lease> {
        let m = self.machines.lock().unwrap_or_else(|e| e.into_inner());
        m.values()
            .find(|x| matches!(&x.view.state, MachineState::Leased { holder: h } if h == holder))
            .map(|x| Lease {
                id: x.view.id,
                hostname: x.view.hostname.clone(),
                host_type: x.view.host_type.clone(),
                client: x.client.clone(),
                emptied: false,
            })
    }

    /// The sessions holding a connected machine, for one pass over every
    /// gomote instance.
    pub fn interactive_sessions(&self) -> std::collections::HashSet<String> {
        let m = self.machines.lock().unwrap_or_else(|e| e.into_inner());
        m.values()
            .filter_map(|x| match &x.view.state {
                MachineState::Leased {
                    holder: Holder::Interactive { session },
                } => Some(session.clone()),
                _ => None,
            })
            .collect()
    }

    /// Promises the machine `hostname` of `host_type` to `holder`: leased
    /// now if it is connected and idle, else as soon as it connects.
    pub fn reserve(&self, host_type: &str, hostname: &str, holder: Holder) {
        let mut m = self.machines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(x) = m.values_mut().find(|x| {
            x.view.hostname == hostname
                && x.view.host_type == host_type
                && x.view.state == MachineState::Idle
                && !x.view.draining
        }) {
            x.view.state = MachineState::Leased { holder };
            x.view.state_since = now_ms();
            return;
        }
        // Still under the machines lock, as `add` reads it: a machine that
        // connects now cannot slip past the reservation.
        self.reserved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((host_type.to_string(), hostname.to_string()), holder);
    }

    /// Withdraws every reservation for `holder`.
    pub fn unreserve(&self, holder: &Holder) {
        self.reserved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, h| h != holder);
    }

    /// Gives a leased machine back as idle (a lease nobody took).
    pub fn release_idle(&self, id: u64) {
        self.set_state(id, MachineState::Idle);
    }

    /// Records what a machine does now.
    pub fn set_state(&self, id: u64, state: MachineState) {
        let mut m = self.machines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(x) = m.get_mut(&id) {
            let idle = state == MachineState::Idle;
            x.view.state = state;
            x.view.state_since = now_ms();
            drop(m);
            if idle {
                self.changed.notify_one();
            }
        }
    }

    /// Removes a machine only if it is still idle (a health check that failed
    /// while the machine was leased meanwhile leaves it to its build, which
    /// notices a broken machine on its own).
    pub fn remove_if_idle(&self, id: u64, reason: &str) -> bool {
        let idle = self
            .machines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .is_some_and(|m| m.view.state == MachineState::Idle);
        idle && self.remove(id, reason)
    }

    /// Idle machines' clients, for health checks; parked links are left
    /// out (their own pings check them, and a check would wake them).
    pub fn idle_machines(&self) -> Vec<(u64, Client)> {
        let m = self.machines.lock().unwrap_or_else(|e| e.into_inner());
        m.values()
            .filter(|x| x.view.state == MachineState::Idle && !x.client.parked())
            .map(|x| (x.view.id, x.client.clone()))
            .collect()
    }

    /// How long a machine has been idle (`None` if it is not idle or gone).
    pub fn idle_for(&self, id: u64) -> Option<std::time::Duration> {
        let m = self.machines.lock().unwrap_or_else(|e| e.into_inner());
        let x = m.get(&id)?;
        (x.view.state == MachineState::Idle && !x.view.draining).then(|| {
            std::time::Duration::from_millis((now_ms() - x.view.state_since).max(0) as u64)
        })
    }

    /// The client of a connected machine.
    pub fn client(&self, id: u64) -> Option<Client> {
        self.machines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .map(|m| m.client.clone())
    }

    /// Records which binary a machine runs (see [`crate::release`]).
    pub fn set_binary(&self, id: u64, b: MachineBinary) {
        if let Some(x) = self
            .machines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&id)
        {
            x.view.binary = b;
        }
    }

    /// Takes an idle machine out of service (to destroy it); does nothing
    /// and returns false if it is leased or already draining, so a
    /// machine leased a moment ago keeps working.
    pub fn take_if_idle(&self, id: u64) -> bool {
        let mut m = self.machines.lock().unwrap_or_else(|e| e.into_inner());
        match m.get_mut(&id) {
            Some(x) if x.view.state == MachineState::Idle && !x.view.draining => {
                x.view.take_out_of_service();
                true
            }
            _ => false,
        }
    }

    /// Takes a machine out of service for good (an ephemeral machine after
    /// its lease): it keeps its link, so it cannot dial in again as new,
    /// until its source destroys it.
    pub fn retire(&self, id: u64) {
        let mut m = self.machines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(x) = m.get_mut(&id) {
            x.view.take_out_of_service();
        }
    }

    /// Stops leasing a machine. An idle one is taken at once (marked busy)
    /// and its client returned; a busy one finishes its build first. `None`
    /// if it left the pool.
    pub fn drain(&self, id: u64) -> Option<Drained> {
        let mut m = self.machines.lock().unwrap_or_else(|e| e.into_inner());
        let x = m.get_mut(&id)?;
        if x.view.state == MachineState::Idle {
            x.view.take_out_of_service();
            Some(Drained::Idle(x.client.clone()))
        } else {
            x.view.draining = true;
            Some(Drained::Busy)
        }
    }

    /// The connected machine of `host_type` called `hostname`.
    pub fn find(&self, host_type: &str, hostname: &str) -> Option<MachineView> {
        let m = self.machines.lock().unwrap_or_else(|e| e.into_inner());
        m.values()
            .find(|x| x.view.hostname == hostname && x.view.host_type == host_type)
            .map(|x| x.view.clone())
    }

    /// Connected machines of one host type.
    pub fn of_type(&self, host_type: &str) -> Vec<MachineView> {
        let m = self.machines.lock().unwrap_or_else(|e| e.into_inner());
        m.values()
            .filter(|x| x.view.host_type == host_type)
            .map(|x| x.view.clone())
            .collect()
    }

    pub fn contains(&self, id: u64) -> bool {
        self.machines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&id)
    }

    pub fn snapshot(&self) -> Vec<MachineView> {
        let m = self.machines.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = m.values().map(|x| x.view.clone()).collect();
        v.sort_by(|a, b| (&a.host_type, &a.hostname).cmp(&(&b.host_type, &b.hostname)));
        v
    }

    pub fn counts(&self) -> HashMap<String, Counts> {
        let m = self.machines.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: HashMap<String, Counts> = HashMap::new();
        for x in m.values() {
            let c = out.entry(x.view.host_type.clone()).or_default();
            c.connected += 1;
            if x.view.state != MachineState::Idle {
                c.busy += 1;
            }
            if x.client.parked() {
                c.parked += 1;
            }
        }
        out
    }

    /// Records a refused registration. Counts are keyed by configured host
    /// types only (`configured` says whether this one is); anything a
    /// stranger makes up counts under `unknown`, so refusals cannot grow
    /// the metrics without bound. Long names are cut.
    pub fn refuse(&self, mut r: Refusal, configured: bool) {
        r.host_type = clip(&r.host_type, 100);
        r.hostname = clip(&r.hostname, 100);
        r.reason = clip(&r.reason, 1000);
        tracing::warn!(host_type = %r.host_type, hostname = %r.hostname, addr = %r.addr, "refused a buildlet: {}", r.reason);
        let label = if configured {
            r.host_type.clone()
        } else {
            "unknown".to_string()
        };
        let mut g = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        *g.counts.entry((label, r.kind.clone())).or_default() += 1;
        g.recent.push_front(r);
        g.recent.truncate(RECENT_REFUSALS);
    }

    pub fn recent_refusals(&self) -> Vec<Refusal> {
        let g = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        g.recent.iter().cloned().collect()
    }

    /// Refusal counts by (host type, reason kind).
    pub fn refusal_counts(&self) -> BTreeMap<(String, String), u64> {
        self.refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .counts
            .clone()
    }
}
