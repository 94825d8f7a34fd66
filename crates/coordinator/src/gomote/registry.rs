//! The live gomote instances, in memory: who owns each, whether it waits in
//! the lease queue or has its machine, when it expires, and what runs on
//! it now. The store keeps the same facts durably ([`crate::store`]); the
//! operations that change both live in [`super`]. This file knows nothing
//! of the farm, so the farm can own a registry without an import circle.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

use crate::pool::Holder;
use crate::store::InstanceRow;

/// What an instance is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// In the lease queue.
    Waiting,
    /// Its machine is leased to it.
    Ready,
}

/// One live instance.
pub(crate) struct Live {
    pub row: InstanceRow,
    pub phase: Phase,
    /// Calls (commands, transfers, shells) running on it now: while any
    /// runs, it does not expire.
    pub active: u32,
    /// Bytes received for it from the user (uploads), for `list --json`.
    pub bytes_in: u64,
    /// Since when its machine has been missing from the pool (it reconnects,
    /// or the coordinator restarted and waits for it).
    pub missing_since: Option<Instant>,
    /// The expiry last written to the store; renewals are written when
    /// they moved it by a minute or more, not on every call.
    pub stored_expiry: i64,
    /// The task waiting in the lease queue for it.
    pub waiter: Option<tokio::task::AbortHandle>,
}

/// What the API and pages show of an instance.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceView {
    pub name: String,
    pub owner: String,
    pub builder: String,
    pub host_type: String,
    pub hostname: Option<String>,
    pub state: Phase,
    pub created_at: i64,
    pub expires_at: i64,
    pub active_calls: u32,
    pub bytes_received: u64,
    /// Set while the machine is away (reconnecting).
    pub machine_missing: bool,
}

/// The live instances by name.
#[derive(Default)]
pub struct Registry {
    pub(crate) live: Mutex<BTreeMap<String, Live>>,
    /// Serializes naming, so two creates never pick the same name.
    pub(crate) naming: tokio::sync::Mutex<()>,
    /// Calls proxied to machines, for `/metrics`.
    pub calls: AtomicU64,
    /// Signalled when an instance gets its machine or ends (long polls wait on it).
    pub changed: tokio::sync::Notify,
    /// Each user's SSH key fingerprints, kept in step with the store, so the
    /// SSH server decides without a query.
    pub(crate) keys: Mutex<std::collections::HashMap<String, std::collections::HashSet<String>>>,
}

/// The holder a gomote instance leases its machine as.
pub fn holder(name: &str) -> Holder {
    Holder::Interactive {
        session: name.to_string(),
    }
}

impl Live {
    pub(crate) fn view(&self) -> InstanceView {
        InstanceView {
            name: self.row.name.clone(),
            owner: self.row.owner.clone(),
            builder: self.row.builder.clone(),
            host_type: self.row.host_type.clone(),
            hostname: self.row.hostname.clone(),
            state: self.phase,
            created_at: self.row.created_at,
            expires_at: self.row.expires_at,
            active_calls: self.active,
            bytes_received: self.bytes_in,
            machine_missing: self.missing_since.is_some(),
        }
    }
}

impl Registry {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every live instance (of `owner` only, when given), by name.
    pub fn views(&self, owner: Option<&str>) -> Vec<InstanceView> {
        self.lock()
            .values()
            .filter(|l| owner.is_none_or(|o| l.row.owner == o))
            .map(Live::view)
            .collect()
    }

    /// One live instance.
    pub fn view(&self, name: &str) -> Option<InstanceView> {
        self.lock().get(name).map(Live::view)
    }

    /// The instance a machine is leased to, for the status pages:
    /// `(owner, expires_at)`.
    pub fn lease_of(&self, session: &str) -> Option<(String, i64)> {
        self.lock()
            .get(session)
            .map(|l| (l.row.owner.clone(), l.row.expires_at))
    }

    /// Live instances per host type that have their machine, for `/metrics`.
    pub fn leases_by_host_type(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for l in self.lock().values() {
            if l.phase == Phase::Ready {
                *out.entry(l.row.host_type.clone()).or_insert(0) += 1;
            }
        }
        out
    }

    /// How many live instances `owner` has.
    pub fn count_of(&self, owner: &str) -> usize {
        self.lock()
            .values()
            .filter(|l| l.row.owner == owner)
            .count()
    }

    /// Replaces the key cache (at start).
    pub(crate) fn set_keys(&self, pairs: Vec<(String, String)>) {
        let mut k = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        k.clear();
        for (user, fp) in pairs {
            k.entry(user).or_default().insert(fp);
        }
    }

    pub(crate) fn add_key(&self, user: &str, fp: &str) {
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(user.to_string())
            .or_default()
            .insert(fp.to_string());
    }

    pub(crate) fn forget_user(&self, user: &str) {
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(user);
    }

    /// Whether `user` registered the key with this fingerprint.
    pub fn has_key(&self, user: &str, fp: &str) -> bool {
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(user)
            .is_some_and(|k| k.contains(fp))
    }

    pub(crate) fn note_call(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }
}
