//! Where machines come from. Every host type has one [`MachineSource`]:
//! reverse (donated machines dial in; nothing to start), local (the
//! coordinator starts buildlets on its own machine) or exec (an admin's
//! command creates a machine when requests wait and destroys it when it is
//! no longer wanted). Whatever the source, a machine joins the pool the same
//! way — it dials in with the host type's builder key — so the pool, the
//! lease queue, builds and pages never ask where a machine came from.
//!
//! [`Sources`] keeps the running sources in step with the config: a reload
//! starts the sources of new host types, stops those of removed ones (whose
//! machines are drained) and restarts those whose settings changed.

pub mod exec;
pub mod local;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{FarmConfig, FarmSettings, HostConfig, PoolKind};
use crate::keys::MasterKey;
use crate::pool::{Drained, Pool};
use crate::scheduler::Scheduler;
use crate::store::Store;

pub use local::LocalTarget;

/// One host type's source of machines.
pub trait MachineSource: Send + Sync + 'static {
    /// Whether a machine may register under `hostname`. Reverse and local
    /// sources take any name; an exec source only the machines it created.
    fn admits(&self, _hostname: &str) -> Result<(), String> {
        Ok(())
    }

    /// Runs until `stop` turns true, then lets go of its machines (stops
    /// local buildlets, destroys exec machines) before returning.
    fn run(self: Arc<Self>, stop: watch::Receiver<bool>) -> BoxFuture<'static, ()>;

    /// Whether each machine serves one lease and is then destroyed
    /// (instead of cleaned for the next): asked when a lease ends.
    fn one_lease_per_machine(&self) -> bool {
        false
    }

    /// Takes new settings of its host type without a restart, if it can.
    /// `false` means the source must be stopped and started anew.
    fn reconfigure(&self, _host: &HostConfig) -> bool {
        false
    }

    /// What it is doing, for `/api/sources`, `/status` and `/metrics`.
    fn view(&self) -> SourceView;

    /// Why requests for its host type may wait, beyond the pool's counts.
    fn describe(&self) -> Option<String> {
        None
    }
}

/// A source's state for pages and metrics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceView {
    pub host_type: String,
    pub kind: String,
    /// Machines it created and has not destroyed yet (exec).
    pub instances: Vec<InstanceView>,
    /// Failures by reason since start (exec: create-failed,
    /// create-timeout, register-timeout, destroy-failed).
    pub failures: BTreeMap<String, u64>,
    pub recent_failures: Vec<Failure>,
    pub created: u64,
    pub destroyed: u64,
    /// Seconds until the next creation may start after failures.
    pub backoff_secs: f64,
}

/// One machine a source manages.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceView {
    pub hostname: String,
    /// creating, registering, registered, destroying.
    pub state: String,
    pub state_secs: f64,
}

/// A failed hook or a machine that never came.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub at: i64,
    pub hostname: String,
    pub reason: String,
    pub detail: String,
}

/// What every source may use: the pool it feeds, the demand it reads, the
/// store that remembers its machines, and how machines reach the coordinator.
#[derive(Clone)]
pub struct SourceCtx {
    pub host: HostConfig,
    pub farm: FarmSettings,
    pub pool: Arc<Pool>,
    pub scheduler: Arc<Scheduler>,
    pub store: Store,
    /// The host type's builder key.
    pub key: String,
    pub data_dir: PathBuf,
    pub target: LocalTarget,
}

/// The source that starts nothing: machines dial in on their own.
struct Reverse {
    host_type: String,
}

impl MachineSource for Reverse {
    /// Nothing to start, so nothing to restart.
    fn reconfigure(&self, _host: &HostConfig) -> bool {
        true
    }

    fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
    }

    fn view(&self) -> SourceView {
        SourceView {
            host_type: self.host_type.clone(),
            kind: "reverse".into(),
            ..Default::default()
        }
    }
}

struct Running {
    host: HostConfig,
    farm: FarmSettings,
    source: Arc<dyn MachineSource>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Whether the `[farm]` settings a local pool starts its buildlets with
/// changed: only those restart it (a new heartbeat or gomote timeout must
/// not kill running builds and leases).
fn local_settings_changed(old: &FarmSettings, new: &FarmSettings) -> bool {
    old.local_sandbox != new.local_sandbox || old.local_user != new.local_user
}

/// The running sources, one per configured host type.
pub struct Sources {
    pool: Arc<Pool>,
    scheduler: Arc<Scheduler>,
    store: Store,
    master: MasterKey,
    data_dir: PathBuf,
    target: OnceLock<LocalTarget>,
    running: Mutex<BTreeMap<String, Running>>,
    /// Sources being stopped (letting go of their machines), by host type:
    /// awaited by a new source of the same host type before it starts (so
    /// two never manage the same machines), and at shutdown.
    stopping: Mutex<Vec<(String, JoinHandle<()>)>>,
}

impl Sources {
    pub fn new(
        pool: Arc<Pool>,
        scheduler: Arc<Scheduler>,
        store: Store,
        master: MasterKey,
        data_dir: PathBuf,
    ) -> Sources {
        Sources {
            pool,
            scheduler,
            store,
            master,
            data_dir,
            target: OnceLock::new(),
            running: Mutex::new(BTreeMap::new()),
            stopping: Mutex::new(Vec::new()),
        }
    }

    /// How machines reach the coordinator; set once its port is bound.
    /// Sources start only after this.
    pub fn set_target(&self, t: LocalTarget) {
        let _ = self.target.set(t);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn make(
        &self,
        host: &HostConfig,
        farm: &FarmSettings,
    ) -> anyhow::Result<Arc<dyn MachineSource>> {
        let Some(target) = self.target.get() else {
            anyhow::bail!("the coordinator's address is not known yet");
        };
        let ctx = SourceCtx {
            host: host.clone(),
            farm: farm.clone(),
            pool: self.pool.clone(),
            scheduler: self.scheduler.clone(),
            store: self.store.clone(),
            key: self.master.builder_key(&host.name),
            data_dir: self.data_dir.clone(),
            target: target.clone(),
        };
        Ok(match host.pool {
            PoolKind::Reverse => Arc::new(Reverse {
                host_type: host.name.clone(),
            }),
            PoolKind::Local => Arc::new(local::LocalSource::new(ctx)?),
            PoolKind::Exec => Arc::new(exec::ExecSource::new(ctx)?),
        })
    }

    /// Starts, stops and restarts sources to match `cfg`: settings a
    /// running source can take are applied in place (an exec pool keeps
    /// its machines); a changed kind of pool, a local pool's count or the
    /// sandbox settings restart it. Returns what changed, in words.
    pub fn reconcile(&self, cfg: &FarmConfig) -> Vec<String> {
        if self.target.get().is_none() {
            return Vec::new();
        }
        let mut changes = Vec::new();
        let mut running = self.lock();
        let mut gone = Vec::new();
        for (ht, r) in running.iter_mut() {
            let Some(new) = cfg.hosts.get(ht) else {
                gone.push(ht.clone());
                continue;
            };
            let local_changed = local_settings_changed(&r.farm, &cfg.farm);
            if *new == r.host && (r.host.pool != PoolKind::Local || !local_changed) {
                continue;
            }
            let restart = new.pool != r.host.pool
                || (new.pool == PoolKind::Local
                    && (new.local_count != r.host.local_count
                        || new.local_program != r.host.local_program
                        || local_changed))
                || !r.source.reconfigure(new);
            if restart {
                gone.push(ht.clone());
            } else {
                r.host = new.clone();
                r.farm = cfg.farm.clone();
                changes.push(format!("host type {ht}: new settings applied"));
            }
        }
        for ht in gone {
            let Some(r) = running.remove(&ht) else {
                continue;
            };
            let _ = r.stop.send(true);
            let mut stopping = self.stopping.lock().unwrap_or_else(|e| e.into_inner());
            // Sources that finished stopping are forgotten: reloads must
            // not pile up handles until shutdown.
            stopping.retain(|(_, t)| !t.is_finished());
            stopping.push((ht.clone(), r.task));
            drop(stopping);
            if cfg.hosts.contains_key(&ht) {
                changes.push(format!(
                    "host type {ht} changed; its {} source restarts",
                    r.host.pool
                ));
            } else {
                changes.push(format!("host type {ht} removed; its machines are drained"));
                self.drain_type(&ht);
            }
        }
        for (ht, host) in &cfg.hosts {
            if running.contains_key(ht) {
                continue;
            }
            let source = match self.make(host, &cfg.farm) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(host_type = %ht, "cannot start the {} source: {e:#}", host.pool);
                    changes.push(format!(
                        "host type {ht}: its {} source failed to start: {e:#}",
                        host.pool
                    ));
                    continue;
                }
            };
            // The previous source of this host type finishes first.
            let before: Vec<JoinHandle<()>> = {
                let mut stopping = self.stopping.lock().unwrap_or_else(|e| e.into_inner());
                let (mine, others): (Vec<_>, Vec<_>) = std::mem::take(&mut *stopping)
                    .into_iter()
                    .partition(|(h, _)| h == ht);
                *stopping = others;
                mine.into_iter().map(|(_, t)| t).collect()
            };
            let (stop, stop_rx) = watch::channel(false);
            let run = source.clone().run(stop_rx);
            let task = tokio::spawn(async move {
                for t in before {
                    let _ = t.await;
                }
                run.await
            });
            changes.push(format!("host type {ht}: {} source started", host.pool));
            running.insert(
                ht.clone(),
                Running {
                    host: host.clone(),
                    farm: cfg.farm.clone(),
                    source,
                    stop,
                    task,
                },
            );
        }
        changes
    }

    /// Idle machines of a removed host type leave now; busy ones after
    /// their lease ([`crate::farm::Farm::end_lease`]).
    fn drain_type(&self, host_type: &str) {
        for m in self.pool.of_type(host_type) {
            if let Some(Drained::Idle(_)) = self.pool.drain(m.id) {
                self.pool
                    .remove(m.id, "its host type was removed from the config");
            }
        }
    }

    /// Whether a machine may register as `hostname` of `host_type`.
    pub fn admits(&self, host_type: &str, hostname: &str) -> Result<(), String> {
        match self.lock().get(host_type) {
            Some(r) => r.source.admits(hostname),
            None => Ok(()),
        }
    }

    /// See [`MachineSource::one_lease_per_machine`].
    pub fn one_lease_per_machine(&self, host_type: &str) -> bool {
        self.lock()
            .get(host_type)
            .is_some_and(|r| r.source.one_lease_per_machine())
    }

    pub fn describe(&self, host_type: &str) -> Option<String> {
        self.lock().get(host_type).and_then(|r| r.source.describe())
    }

    pub fn views(&self) -> Vec<SourceView> {
        self.lock().values().map(|r| r.source.view()).collect()
    }

    /// Stops every source and waits (at most `limit`) until each let go of
    /// its machines.
    pub async fn shutdown(&self, limit: Duration) {
        let mut tasks: Vec<JoinHandle<()>> = {
            let mut running = self.lock();
            std::mem::take(&mut *running)
                .into_values()
                .map(|r| {
                    let _ = r.stop.send(true);
                    r.task
                })
                .collect()
        };
        tasks.extend(
            std::mem::take(&mut *self.stopping.lock().unwrap_or_else(|e| e.into_inner()))
                .into_iter()
                .map(|(_, t)| t),
        );
        let all = futures_util::future::join_all(tasks);
        if tokio::time::timeout(limit, all).await.is_err() {
            tracing::warn!("machine sources did not stop within {limit:?}");
        }
    }
}
