//! The coordinator's shared state and its background loops: dispatch (queued
//! build + idle machine → running build), machine health checks, and config
//! reloads. Builds themselves run in [`crate::builds`].

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::{self, FarmConfig};
use crate::git;
use crate::keys::MasterKey;
use crate::logs::LiveLog;
use crate::machine_auth::BotRegistry;
use crate::metrics::Metrics;
use crate::pool::{Holder, Lease, MachineState, Pool};
use crate::release::Releases;
use crate::scheduler::Scheduler;
use crate::sources::Sources;
use crate::store::{BuildKind, BuildStatus, NewBuild, Store};

/// A build running in this process.
pub struct RunningBuild {
    pub build_id: i64,
    pub log: Arc<LiveLog>,
    pub cancel: watch::Sender<bool>,
    /// Host name of the machine of the current attempt.
    pub machine: Mutex<String>,
    /// Name of the step running now.
    pub step: Mutex<String>,
    /// How far a sharded step is ("37 of 200 units done on 4 machines");
    /// empty otherwise.
    pub progress: Mutex<String>,
    /// Tests (or units) that failed, then passed when run again.
    pub flaky: Mutex<Vec<String>>,
}

/// Why a request to create a build was refused.
#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Internal(String),
}

pub struct Farm {
    pub data_dir: PathBuf,
    config: RwLock<Arc<FarmConfig>>,
    pub store: Store,
    pub pool: Arc<Pool>,
    /// The lease queue: the one way to get a machine.
    pub scheduler: Arc<Scheduler>,
    pub master: MasterKey,
    pub admin_token: String,
    /// Accept `/reverse` without TLS (loopback demos and tests only).
    pub allow_plaintext: bool,
    pub started: Instant,
    pub started_ms: i64,
    /// The TLS certificate's SHA-256 (plain-hex `-tls-pin`).
    pub tls_fingerprint: Option<String>,
    /// The TLS public key's pin (`spki-sha256:HEX`), which survives renewal.
    pub tls_spki_pin: Option<String>,
    pub metrics: Metrics,
    /// The last hours of queues and machines, for the status page's charts.
    pub history: crate::history::History,
    repos: Mutex<HashMap<String, Arc<git::Repo>>>,
    running: Mutex<HashMap<i64, Arc<RunningBuild>>>,
    /// Source delivery: recent archives and deltas, and what each
    /// machine's source cache holds.
    pub delivery: crate::builds::source::Delivery,
    /// Per-repo last poll error, shown on the status page.
    pub poll_errors: Mutex<HashMap<String, String>>,
    /// Connected bots that authenticated with machine tokens.
    pub bots: BotRegistry,
    /// Published buildlet releases and fleet upgrades (stage0); shared with
    /// the upgrade loop.
    pub releases: Arc<Releases>,
    /// Where each host type's machines come from.
    pub sources: Sources,
    /// One poller per configured repo.
    pollers: Mutex<BTreeMap<String, tokio::task::AbortHandle>>,
    /// Live gomote instances (operations in [`crate::gomote`]).
    pub gomote: crate::gomote::registry::Registry,
    /// Where the gomote SSH server listens, once it does.
    ssh_addr: Mutex<Option<String>>,
    /// Where the API and dashboard listen, once they do (links in statuses
    /// and notifications when `[farm] url` is not set).
    http_addr: Mutex<Option<String>>,
    /// Whether this coordinator schedules (see [`crate::leadership`]); a
    /// standby serves only what reads.
    leading: std::sync::atomic::AtomicBool,
    /// The values of `[secrets]`, read at start and at each reload.
    secrets: RwLock<Arc<crate::secrets::Secrets>>,
    /// Wakes the outbox's sender when a message is queued.
    pub outbox_wake: tokio::sync::Notify,
    /// Wakes a repo's poller at once (a push webhook).
    poll_wake: Mutex<HashMap<String, Arc<tokio::sync::Notify>>>,
}

impl crate::auth::AdminToken for Arc<Farm> {
    fn admin_token(&self) -> &str {
        &self.admin_token
    }
}

impl crate::auth::UserTokens for Arc<Farm> {
    async fn user_by_token_sha256(&self, sha256_hex: String) -> Option<(String, bool)> {
        match self.store.user_by_token(&sha256_hex).await {
            Ok(u) => u,
            Err(e) => {
                tracing::error!("looking up a user token: {e}");
                None
            }
        }
    }
}

/// Options for [`Farm::new`].
pub struct FarmOptions {
    pub data_dir: PathBuf,
    pub config: FarmConfig,
    pub store: Store,
    pub master: MasterKey,
    pub admin_token: String,
    pub allow_plaintext: bool,
    pub tls_fingerprint: Option<String>,
    pub tls_spki_pin: Option<String>,
    /// Where releases, finished logs and build artifacts live (`None`: the
    /// data dir's `artifacts/`).
    pub artifacts: Option<Arc<dyn crate::artifacts::ArtifactStore>>,
}

impl Farm {
    pub fn new(o: FarmOptions) -> Arc<Farm> {
        let releases = Arc::new(match o.artifacts {
            Some(a) => Releases::with_store(&o.data_dir, a),
            None => Releases::local(&o.data_dir),
        });
        let pool = Arc::new(Pool::new());
        let scheduler = Scheduler::new(pool.clone());
        let sources = Sources::new(
            pool.clone(),
            scheduler.clone(),
            o.store.clone(),
            o.master.clone(),
            o.data_dir.clone(),
        );
        let secrets = crate::secrets::Secrets::load(&o.config.secrets, &o.data_dir)
            .unwrap_or_else(|e| {
                tracing::error!("{e}; builds that use it will fail until it is readable and the config is reloaded");
                Default::default()
            });
        Arc::new(Farm {
            secrets: RwLock::new(Arc::new(secrets)),
            outbox_wake: tokio::sync::Notify::new(),
            poll_wake: Mutex::new(HashMap::new()),
            http_addr: Mutex::new(None),
            leading: std::sync::atomic::AtomicBool::new(true),
            data_dir: o.data_dir,
            config: RwLock::new(Arc::new(o.config)),
            store: o.store,
            scheduler,
            pool,
            sources,
            pollers: Mutex::new(BTreeMap::new()),
            master: o.master,
            admin_token: o.admin_token,
            allow_plaintext: o.allow_plaintext,
            started: Instant::now(),
            started_ms: crate::store::now_ms(),
            tls_fingerprint: o.tls_fingerprint,
            tls_spki_pin: o.tls_spki_pin,
            metrics: Metrics::default(),
            history: Default::default(),
            repos: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            delivery: Default::default(),
            poll_errors: Mutex::new(HashMap::new()),
            bots: Default::default(),
            releases,
            gomote: Default::default(),
            ssh_addr: Mutex::new(None),
        })
    }

    /// Where the gomote SSH server listens (`host:port`), if it does.
    pub fn ssh_addr(&self) -> Option<String> {
        self.ssh_addr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records where the gomote SSH server listens.
    pub fn set_ssh_addr(&self, addr: String) {
        *self.ssh_addr.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
    }

    /// Where releases, finished logs and build artifacts live.
    pub fn artifacts(&self) -> &dyn crate::artifacts::ArtifactStore {
        self.releases.store()
    }

    /// Whether this coordinator leads (always, on SQLite).
    pub fn leading(&self) -> bool {
        self.leading.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn set_leading(&self, on: bool) {
        self.leading.store(on, std::sync::atomic::Ordering::Release);
    }

    /// Records where the API and dashboard listen.
    pub fn set_http_addr(&self, addr: String) {
        *self.http_addr.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
    }

    /// The farm's base URL for links sent out of it: `[farm] url`, else
    /// the address `farmer serve` listens on.
    pub fn public_url(&self) -> String {
        if let Some(u) = &self.config().farm.url {
            return u.clone();
        }
        match &*self.http_addr.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(a) => format!("http://{a}"),
            None => "http://127.0.0.1:8080".to_string(),
        }
    }

    /// What wakes `repo`'s poller early.
    pub fn poll_waker(&self, repo: &str) -> Arc<tokio::sync::Notify> {
        self.poll_wake
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(repo.to_string())
            .or_default()
            .clone()
    }

    /// Polls `repo` now instead of at its next interval (a push webhook).
    pub fn poll_now(&self, repo: &str) {
        self.poll_waker(repo).notify_one();
    }

    /// The secrets' values as last read.
    pub fn secrets(&self) -> Arc<crate::secrets::Secrets> {
        self.secrets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn config(&self) -> Arc<FarmConfig> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the config file and applies it: pollers and machine
    /// sources start and stop to match. A broken file keeps the old config
    /// and returns the errors.
    pub fn reload(self: &Arc<Self>) -> Result<Vec<String>, config::ConfigErrors> {
        let new = self.read_config_again()?;
        let changes = self.apply_config();
        if changes.is_empty() {
            tracing::info!(path = %new.path.display(), "config reloaded; nothing to start or stop");
        }
        for c in &changes {
            tracing::info!(path = %new.path.display(), "config reloaded: {c}");
        }
        self.scheduler.changed.notify_one();
        Ok(changes)
    }

    /// Reads the config file and the secrets again and makes them current,
    /// without starting or stopping anything (a standby taking over does
    /// this before it recovers; [`Farm::reload`] then applies).
    pub fn read_config_again(&self) -> Result<Arc<FarmConfig>, config::ConfigErrors> {
        let old = self.config();
        let new = Arc::new(config::load(&old.path)?);
        // A secret that cannot be read refuses the whole reload: the old
        // config and secrets stay, so running builds keep working.
        let secrets = crate::secrets::Secrets::load(&new.secrets, &self.data_dir).map_err(|e| {
            config::ConfigErrors(vec![config::ConfigError {
                file: new.path.clone(),
                line: 0,
                column: 0,
                field: "secrets".into(),
                message: e.to_string(),
            }])
        })?;
        *self.secrets.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(secrets);
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = new.clone();
        // A repo whose URL changed is opened afresh.
        self.repos
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|name, _| {
                // An https remote is reopened too: its secret may have changed.
                let (o, n) = (old.repos.get(name), new.repos.get(name));
                o.map(|r| (&r.url, &r.auth)) == n.map(|r| (&r.url, &r.auth))
                    && !n.is_some_and(|r| {
                        r.url.starts_with("https://") || r.url.starts_with("http://")
                    })
            });
        Ok(new)
    }

    /// Starts and stops repo pollers and machine sources to match the
    /// current config. Returns what changed.
    pub fn apply_config(self: &Arc<Self>) -> Vec<String> {
        let cfg = self.config();
        let mut changes = Vec::new();
        {
            let mut pollers = self.pollers.lock().unwrap_or_else(|e| e.into_inner());
            pollers.retain(|repo, task| {
                let keep = cfg.repos.contains_key(repo);
                if !keep {
                    task.abort();
                    changes.push(format!("repo {repo} removed; no longer polled"));
                }
                keep
            });
            for repo in cfg.repos.keys() {
                if !pollers.contains_key(repo) {
                    let t = tokio::spawn(crate::poller::poll_loop(self.clone(), repo.clone()));
                    pollers.insert(repo.clone(), t.abort_handle());
                    changes.push(format!("repo {repo} polled"));
                }
            }
        }
        changes.extend(self.sources.reconcile(&cfg));
        changes
    }

    /// Stops pollers and machine sources (local buildlets stop, exec
    /// machines are destroyed), waiting at most `limit`.
    pub async fn stop(&self, limit: Duration) {
        for (_, t) in std::mem::take(&mut *self.pollers.lock().unwrap_or_else(|e| e.into_inner())) {
            t.abort();
        }
        self.sources.shutdown(limit).await;
    }

    /// Starts a driver for every queued build in the store (at start).
    pub async fn load_queue(self: &Arc<Self>) -> Result<usize, crate::store::StoreError> {
        let q = self.store.queued_builds().await?;
        let n = q.len();
        for b in q {
            self.enqueue(b);
        }
        Ok(n)
    }

    pub fn running(&self, id: i64) -> Option<Arc<RunningBuild>> {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    pub fn running_builds(&self) -> Vec<Arc<RunningBuild>> {
        let mut v: Vec<_> = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|r| r.build_id);
        v
    }

    pub(crate) fn register_running(&self, build_id: i64) -> Arc<RunningBuild> {
        let mut r = self.running.lock().unwrap_or_else(|e| e.into_inner());
        r.entry(build_id)
            .or_insert_with(|| {
                let (cancel, _) = watch::channel(false);
                let log = LiveLog::with_spill_dir(Some(self.data_dir.join("spill")));
                log.set_mask(self.secrets().mask());
                Arc::new(RunningBuild {
                    build_id,
                    log: Arc::new(log),
                    cancel,
                    machine: Mutex::new(String::new()),
                    step: Mutex::new(String::new()),
                    progress: Mutex::new(String::new()),
                    flaky: Mutex::new(Vec::new()),
                })
            })
            .clone()
    }

    pub(crate) fn unregister_running(&self, build_id: i64) {
        if let Some(rb) = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&build_id)
        {
            rb.log.finish();
        }
    }

    /// The repository handle for a configured repo, opened on first use.
    pub async fn repo(&self, name: &str) -> Result<Arc<git::Repo>, String> {
        if let Some(r) = self
            .repos
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Ok(r.clone());
        }
        let cfg = self.config();
        let rc = cfg
            .repos
            .get(name)
            .ok_or_else(|| format!("repo {name:?} is not in the config"))?;
        let url = rc.url.clone();
        let auth = self.https_auth(rc)?;
        let cache = self.data_dir.join("git").join(name);
        let repo = tokio::task::spawn_blocking(move || git::Repo::open_with(&url, &cache, &auth))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let repo = Arc::new(repo);
        self.repos
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), repo.clone());
        Ok(repo)
    }

    /// The credentials of a repo's `https://` remote, with its secret or
    /// password file read.
    fn https_auth(&self, rc: &config::RepoConfig) -> Result<git::HttpsAuth, String> {
        let password = match (&rc.auth.password, &rc.auth.password_file) {
            (Some(p), _) => Some(
                self.secrets()
                    .resolve(p)
                    .map_err(|e| format!("repo {}: {e}", rc.name))?
                    .to_string(),
            ),
            (None, Some(f)) => Some(
                crate::secrets::read_credential(f)
                    .map_err(|e| format!("repo {}: password_file: {e}", rc.name))?,
            ),
            (None, None) => None,
        };
        Ok(git::HttpsAuth {
            username: rc.auth.username.clone(),
            password,
            ca_file: rc.auth.ca_file.clone(),
        })
    }

    /// Creates and queues a build; checks the builder, the repo and the
    /// pre-submit policy first.
    pub async fn trigger(
        self: &Arc<Self>,
        builder: &str,
        repo: Option<&str>,
        branch: Option<&str>,
        commit: &str,
        kind: BuildKind,
        requested_by: &str,
    ) -> Result<i64, TriggerError> {
        let cfg = self.config();
        let b = cfg
            .builders
            .get(builder)
            .ok_or_else(|| TriggerError::NotFound(format!("no builder named {builder:?}")))?;
        let repo =
            match repo {
                Some(r) => r.to_string(),
                None => match b.repos.first() {
                    Some(r) => r.clone(),
                    None => cfg.repos.keys().next().cloned().ok_or_else(|| {
                        TriggerError::Invalid("the config defines no repo".into())
                    })?,
                },
            };
        let rc = cfg
            .repos
            .get(&repo)
            .ok_or_else(|| TriggerError::NotFound(format!("no repo named {repo:?}")))?;
        let host = cfg.hosts.get(&b.host_type).ok_or_else(|| {
            TriggerError::Invalid(format!(
                "builder {builder:?} uses unknown host type {:?}",
                b.host_type
            ))
        })?;
        if kind == BuildKind::PreSubmit {
            if !b.presubmit {
                return Err(TriggerError::Forbidden(format!(
                    "builder {builder:?} does not take pre-submit work (presubmit = false in its config)"
                )));
            }
            if !host.trusted {
                return Err(TriggerError::Forbidden(format!(
                    "pre-submit work only runs on trusted machines; {} is not trusted",
                    b.host_type
                )));
            }
        }
        let branch = branch
            .map(str::to_string)
            .or_else(|| rc.branches.first().cloned())
            .unwrap_or_else(|| "main".into());
        let r = self.repo(&repo).await.map_err(TriggerError::Internal)?;
        let c = commit.to_string();
        let r2 = r.clone();
        let br = branch.clone();
        // A commit looked up lately needs no git access (nor a blocking
        // thread): most builds are of a commit just built elsewhere.
        let cached = r.cached_commit(commit);
        let found = match cached {
            Some(c) => c,
            None => tokio::task::spawn_blocking(move || {
                let hash = if c.len() == 40 && c.bytes().all(|x| x.is_ascii_hexdigit()) {
                    c.clone()
                } else {
                    match r2.branch_head(&c) {
                        Ok(Some(h)) => h,
                        _ if c.is_empty() => r2.branch_head(&br).ok().flatten().unwrap_or_default(),
                        _ => c.clone(),
                    }
                };
                r2.commit(&hash)
            })
            .await
            .map_err(|e| TriggerError::Internal(e.to_string()))?
            .map_err(|e| {
                TriggerError::NotFound(format!("commit {commit:?} in repo {repo:?}: {e}"))
            })?,
        };
        let row = self
            .store
            .create_build(&NewBuild {
                builder: builder.to_string(),
                host_type: b.host_type.clone(),
                repo: repo.clone(),
                branch,
                commit: found.hash.clone(),
                commit_time: found.time,
                kind,
                requested_by: requested_by.to_string(),
            })
            .await
            .map_err(|e| TriggerError::Internal(e.to_string()))?
            .ok_or_else(|| TriggerError::Invalid("an identical build already exists".into()))?;
        let id = row.id;
        self.enqueue(row);
        Ok(id)
    }

    /// Cancels a queued or running build.
    pub async fn cancel(self: &Arc<Self>, id: i64) -> Result<BuildStatus, TriggerError> {
        let b = self
            .store
            .build(id)
            .await
            .map_err(|e| TriggerError::Internal(e.to_string()))?
            .ok_or_else(|| TriggerError::NotFound(format!("no build {id}")))?;
        // A build leaves the queue only through the store: if it started
        // meanwhile, it is cancelled as a running build.
        let queued_cancelled = b.status == BuildStatus::Queued
            && self
                .store
                .cancel_queued(id, "cancelled while queued")
                .await
                .map_err(|e| TriggerError::Internal(e.to_string()))?;
        if queued_cancelled {
            self.scheduler
                .withdraw_holder(&Holder::Build { build_id: id });
            self.metrics.build_finished(BuildStatus::Cancelled);
            crate::forge::build_changed(self, id);
            return Ok(BuildStatus::Cancelled);
        }
        let status = match b.status {
            BuildStatus::Queued => self
                .store
                .build(id)
                .await
                .map_err(|e| TriggerError::Internal(e.to_string()))?
                .map_or(b.status, |b| b.status),
            s => s,
        };
        match status {
            // Re-queued between two attempts: its driver finds it
            // cancelled when it next gets a machine.
            BuildStatus::Queued | BuildStatus::Running => {
                // The driver registers the running build before it starts
                // an attempt, so a build that runs can be reached here.
                if let Some(rb) = self.running(id) {
                    // Stored even before the build's attempt subscribes.
                    rb.cancel.send_replace(true);
                }
                Ok(BuildStatus::Running)
            }
            s => Err(TriggerError::Invalid(format!(
                "build {id} already finished ({s})"
            ))),
        }
    }

    /// Explains why queued work for a host type waits, in words.
    pub fn wait_reason(&self, host_type: &str) -> String {
        let cfg = self.config();
        let counts = self
            .pool
            .counts()
            .get(host_type)
            .copied()
            .unwrap_or_default();
        let expected = cfg.hosts.get(host_type).map_or(0, |h| h.expected);
        let mut s = if !cfg.hosts.contains_key(host_type) {
            format!(
                "waiting: host type {host_type} is not in the config, so no machine of it can connect"
            )
        } else if counts.connected == 0 {
            format!("waiting: no machine of {host_type} connected, expected {expected}")
        } else {
            format!(
                "waiting: all {} connected machines of {host_type} are busy (expected {expected})",
                counts.connected
            )
        };
        if let Some(d) = self.sources.describe(host_type) {
            s.push_str("; ");
            s.push_str(&d);
        }
        s
    }

    /// Ends a lease: the machine is cleaned and returned to the pool, or
    /// retired when its source wants a fresh one (an ephemeral machine) or
    /// its host type left the config.
    pub async fn end_lease(&self, lease: Lease) {
        if !self.pool.contains(lease.id) {
            return;
        }
        if !self.config().hosts.contains_key(&lease.host_type) {
            self.pool
                .remove(lease.id, "its host type is no longer in the config");
            return;
        }
        // Its source destroys it; it stays connected until then so it
        // cannot come back as a fresh machine.
        if self.sources.one_lease_per_machine(&lease.host_type) {
            self.pool.retire(lease.id);
            return;
        }
        if lease.emptied {
            self.pool.set_state(lease.id, MachineState::Idle);
            return;
        }
        self.pool.set_state(lease.id, MachineState::Cleaning);
        // As long as a buildlet gives `clean=1` after a command.
        let limit = buildlet::proto::CLEAN_LIMIT;
        match tokio::time::timeout(limit, lease.client.remove_all(&["."])).await {
            Ok(Ok(())) => self.pool.set_state(lease.id, MachineState::Idle),
            Ok(Err(e)) => {
                self.pool.remove(lease.id, &format!("cleaning failed: {e}"));
            }
            Err(_) => {
                let why = format!("cleaning took longer than {limit:?}");
                self.pool.remove(lease.id, &why);
            }
        }
    }

    /// Records where every host type stands now (queue, machines).
    pub fn sample(&self) {
        self.history.record(self.current());
    }

    /// Where every host type stands now (queue, machines).
    pub fn current(&self) -> crate::history::Sample {
        let cfg = self.config();
        let queues = self.scheduler.views(0);
        let counts = self.pool.counts();
        let hosts = cfg
            .hosts
            .keys()
            .map(|ht| {
                let q = queues.iter().find(|q| &q.host_type == ht);
                crate::history::HostSample {
                    host_type: ht.clone(),
                    waiting: q.map_or(0, |q| q.waiting),
                    oldest_wait_secs: q.map_or(0.0, |q| q.oldest_wait_secs),
                    connected: counts.get(ht).map_or(0, |c| c.connected as usize),
                }
            })
            .collect();
        crate::history::Sample {
            at: crate::store::now_ms() / 1000,
            hosts,
        }
    }

    /// Runs forever: samples the farm for the status page's charts.
    pub async fn sample_loop(self: Arc<Self>) {
        let mut every = tokio::time::interval(crate::history::EVERY);
        loop {
            every.tick().await;
            self.sample();
        }
    }

    /// Runs forever: dispatches whenever work or a machine appears.
    pub async fn dispatch_loop(self: Arc<Self>) {
        loop {
            self.scheduler.dispatch();
            tokio::select! {
                _ = self.scheduler.changed.notified() => {}
                _ = self.pool.changed.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Runs forever: asks idle machines for `/status`; one that does not
    /// answer within the heartbeat timeout leaves the pool.
    pub async fn health_loop(self: Arc<Self>) {
        loop {
            let (every, timeout) = {
                let c = self.config();
                (c.farm.heartbeat, c.farm.heartbeat_timeout)
            };
            tokio::time::sleep(every).await;
            for (id, client) in self.pool.idle_machines() {
                let me = self.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(timeout, client.status()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            me.pool
                                .remove_if_idle(id, &format!("health check failed: {e}"));
                        }
                        Err(_) => {
                            me.pool.remove_if_idle(
                                id,
                                &format!("health check: no answer within {timeout:?}"),
                            );
                        }
                    }
                });
            }
        }
    }
}
