//! The exec source: elastic machines from any command. When lease requests
//! wait for its host type, the coordinator runs the admin's `create`
//! command for each machine it wants; when a machine is no longer wanted
//! (idle past `idle_timeout`, used once when `ephemeral`, broken, never
//! dialled in) it runs `destroy`. One seam covers a container, a cloud VM,
//! `kubectl run` or an ssh to a spare box, as Buildbot's latent workers
//! and GitLab's fleeting plugins do, without a driver per cloud.
//!
//! Both hooks run with a clean environment plus `FARMER_HOSTNAME`,
//! `FARMER_HOST_TYPE`, `FARMER_COORDINATOR`, `FARMER_TLS_PIN` and
//! `FARMER_KEY_FILE` (the builder key in a 0600 file). The machine must then
//! dial in as a reverse buildlet under that host name; only names this
//! source created are admitted for its host type.
//!
//! Every machine is recorded in the store while it exists, so a coordinator
//! that restarts destroys what the previous run left (it cannot know what
//! a machine did while nobody watched). Failures (a hook that exits
//! non-zero or hangs, a machine that never registers) are destroyed,
//! counted by reason, and pause creation with a doubling backoff, so a
//! broken hook never becomes a hot loop.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, watch};

use super::{Failure, InstanceView, MachineSource, SourceCtx, SourceView};
use crate::config::ExecConfig;
use crate::pool::MachineState;
use crate::store::now_ms;

/// How often the source compares demand with its machines.
const TICK: Duration = Duration::from_millis(200);
/// First pause after a failure; doubles per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Failures kept for the status page.
const RECENT_FAILURES: usize = 20;
/// Bytes of a failed hook's output quoted in its failure.
const OUTPUT_TAIL: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// `create` runs.
    Creating,
    /// `create` succeeded; the machine has until `deadline` to dial in.
    Registering { deadline: Instant },
    /// In the pool (or it was, and is about to be destroyed).
    Registered,
    /// `destroy` runs, or waits for its retry.
    Destroying,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Creating => "creating",
            Phase::Registering { .. } => "registering",
            Phase::Registered => "registered",
            Phase::Destroying => "destroying",
        }
    }
}

struct Instance {
    phase: Phase,
    since: Instant,
    /// A hook runs for it now.
    busy: bool,
    /// When a failed `destroy` is tried again.
    retry_at: Option<Instant>,
    destroy_failures: u32,
}

#[derive(Default)]
struct State {
    instances: BTreeMap<String, Instance>,
    failures: BTreeMap<String, u64>,
    recent: VecDeque<Failure>,
    created: u64,
    destroyed: u64,
    backoff: Duration,
    /// No creation before this (after failures).
    paused_until: Option<Instant>,
    last_failure: String,
}

enum Event {
    Created(String, Result<(), HookError>),
    Destroyed(String, Result<(), HookError>),
}

/// Why an exec pool's machine failed: the labels of its failure counts.
pub const FAILURE_REASONS: [&str; 5] = [
    "create-failed",
    "create-timeout",
    "register-timeout",
    "destroy-failed",
    "destroy-timeout",
];

#[derive(Debug)]
struct HookError {
    /// Metric label: one of [`FAILURE_REASONS`].
    reason: String,
    detail: String,
}

pub struct ExecSource {
    ctx: SourceCtx,
    /// Replaced in place by a reload ([`MachineSource::reconfigure`]).
    cfg: Mutex<ExecConfig>,
    dir: PathBuf,
    state: Mutex<State>,
}

impl ExecSource {
    pub fn new(ctx: SourceCtx) -> anyhow::Result<ExecSource> {
        let Some(cfg) = ctx.host.exec.clone() else {
            anyhow::bail!("host type {} has no exec settings", ctx.host.name);
        };
        let dir = ctx.data_dir.join("exec");
        std::fs::create_dir_all(&dir)?;
        Ok(ExecSource {
            ctx,
            cfg: Mutex::new(cfg),
            dir,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cfg(&self) -> ExecConfig {
        self.cfg.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn host_type(&self) -> &str {
        &self.ctx.host.name
    }

    /// A fresh host name: the host type without `host-`, and random hex.
    fn new_hostname(&self) -> String {
        let mut b = [0u8; 5];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut b);
        let base: String = self
            .host_type()
            .trim_start_matches("host-")
            .chars()
            .take(40)
            .collect();
        let hex = hex::encode(b);
        format!("{base}-{hex}")
    }

    fn key_file(&self, hostname: &str) -> PathBuf {
        self.dir.join(format!("{hostname}.key"))
    }

    fn env(&self, hostname: &str) -> Vec<(String, String)> {
        let t = &self.ctx.target;
        vec![
            ("FARMER_HOSTNAME".into(), hostname.into()),
            ("FARMER_HOST_TYPE".into(), self.host_type().into()),
            ("FARMER_COORDINATOR".into(), t.addr.clone()),
            ("FARMER_TLS_PIN".into(), t.pin.clone().unwrap_or_default()),
            (
                "FARMER_KEY_FILE".into(),
                self.key_file(hostname).display().to_string(),
            ),
        ]
    }

    fn fail(&self, st: &mut State, hostname: &str, e: &HookError) {
        tracing::warn!(host_type = %self.host_type(), %hostname, reason = %e.reason, "exec machine failed: {}", e.detail);
        *st.failures.entry(e.reason.clone()).or_default() += 1;
        st.recent.push_front(Failure {
            at: now_ms(),
            hostname: hostname.into(),
            reason: e.reason.clone(),
            detail: e.detail.clone(),
        });
        st.recent.truncate(RECENT_FAILURES);
        st.backoff = (st.backoff * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF);
        st.paused_until = Some(Instant::now() + st.backoff);
        st.last_failure = format!("{}: {}", e.reason, e.detail);
    }

    /// Starts `create` for a new machine.
    fn create(self: &Arc<Self>, st: &mut State, tx: &mpsc::UnboundedSender<Event>) {
        let hostname = self.new_hostname();
        st.instances.insert(
            hostname.clone(),
            Instance {
                phase: Phase::Creating,
                since: Instant::now(),
                busy: true,
                retry_at: None,
                destroy_failures: 0,
            },
        );
        st.created += 1;
        let me = self.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let r = me.run_create(&hostname).await;
            let _ = tx.send(Event::Created(hostname, r));
        });
    }

    async fn run_create(&self, hostname: &str) -> Result<(), HookError> {
        let err = |detail: String| HookError {
            reason: "create-failed".into(),
            detail,
        };
        self.ctx
            .store
            .exec_instance_put(hostname, self.host_type(), "creating", "")
            .await
            .map_err(|e| err(format!("recording the machine: {e}")))?;
        crate::keys::write_private(&self.key_file(hostname), self.ctx.key.as_bytes())
            .map_err(|e| err(format!("writing the key file: {e}")))?;
        let cfg = self.cfg();
        run_hook(
            &cfg.create,
            &self.env(hostname),
            cfg.create_timeout,
            "create",
        )
        .await
    }

    /// Takes a machine out of service and starts `destroy` for it.
    fn destroy(
        self: &Arc<Self>,
        st: &mut State,
        hostname: &str,
        why: &str,
        tx: &mpsc::UnboundedSender<Event>,
    ) {
        let Some(inst) = st.instances.get_mut(hostname) else {
            return;
        };
        if inst.phase != Phase::Destroying {
            inst.phase = Phase::Destroying;
            inst.since = Instant::now();
            tracing::info!(host_type = %self.ctx.host.name, %hostname, "destroying exec machine: {why}");
        }
        if inst.busy {
            return;
        }
        inst.busy = true;
        inst.retry_at = None;
        if let Some(m) = self.ctx.pool.find(self.host_type(), hostname) {
            self.ctx.pool.remove(m.id, why);
        }
        let me = self.clone();
        let tx = tx.clone();
        let hostname = hostname.to_string();
        let why = why.to_string();
        tokio::spawn(async move {
            let _ = me
                .ctx
                .store
                .exec_instance_put(&hostname, me.host_type(), "destroying", &why)
                .await;
            let cfg = me.cfg();
            let r = run_hook(
                &cfg.destroy,
                &me.env(&hostname),
                cfg.destroy_timeout,
                "destroy",
            )
            .await;
            let _ = tx.send(Event::Destroyed(hostname, r));
        });
    }

    async fn on_event(self: &Arc<Self>, ev: Event, tx: &mpsc::UnboundedSender<Event>) {
        match ev {
            Event::Created(hostname, r) => {
                let mut st = self.lock();
                let Some(inst) = st.instances.get_mut(&hostname) else {
                    return;
                };
                inst.busy = false;
                match r {
                    Ok(()) if inst.phase == Phase::Creating => {
                        inst.phase = Phase::Registering {
                            deadline: Instant::now() + self.cfg().register_timeout,
                        };
                        inst.since = Instant::now();
                    }
                    // Stopped meanwhile: destroy what was created.
                    Ok(()) => self.destroy(&mut st, &hostname, "no longer wanted", tx),
                    Err(e) => {
                        self.fail(&mut st, &hostname, &e);
                        let why = format!("{}: {}", e.reason, e.detail);
                        self.destroy(&mut st, &hostname, &why, tx);
                    }
                }
            }
            Event::Destroyed(hostname, r) => {
                let done = {
                    let mut st = self.lock();
                    match r {
                        Ok(()) => {
                            st.instances.remove(&hostname);
                            st.destroyed += 1;
                            true
                        }
                        Err(e) => {
                            self.fail(&mut st, &hostname, &e);
                            if let Some(inst) = st.instances.get_mut(&hostname) {
                                inst.busy = false;
                                inst.destroy_failures += 1;
                                let wait = FIRST_BACKOFF
                                    .saturating_mul(1 << inst.destroy_failures.min(6))
                                    .min(MAX_BACKOFF);
                                inst.retry_at = Some(Instant::now() + wait);
                            }
                            false
                        }
                    }
                };
                if done {
                    let _ = std::fs::remove_file(self.key_file(&hostname));
                    if let Err(e) = self.ctx.store.exec_instance_delete(&hostname).await {
                        tracing::warn!(%hostname, "forgetting a destroyed machine: {e}");
                    }
                }
            }
        }
    }

    /// One comparison of demand and machines. Returns the machines that
    /// registered since the last step (the caller records them).
    fn step(self: &Arc<Self>, tx: &mpsc::UnboundedSender<Event>) -> Vec<String> {
        let cfg = self.cfg();
        let now = Instant::now();
        let ht = self.host_type().to_string();
        let machines = self.ctx.pool.of_type(&ht);
        let mut st = self.lock();
        // (reason for the metrics or "" when none is a failure, detail)
        let mut to_destroy: Vec<(String, &str, String)> = Vec::new();
        let mut idle: Vec<(i64, u64, String)> = Vec::new();
        let mut newly: Vec<String> = Vec::new();
        for (name, inst) in st.instances.iter_mut() {
            let m = machines.iter().find(|m| m.hostname == *name);
            if let Phase::Registering { deadline } = inst.phase {
                if m.is_some() {
                    inst.phase = Phase::Registered;
                    inst.since = now;
                    newly.push(name.clone());
                } else if now >= deadline {
                    to_destroy.push((
                        name.clone(),
                        "register-timeout",
                        format!(
                            "did not dial in within {:?} of its creation",
                            cfg.register_timeout
                        ),
                    ));
                }
            }
            match inst.phase {
                Phase::Registered => match m {
                    None => {
                        to_destroy.push((name.clone(), "", "left the pool (disconnected)".into()))
                    }
                    Some(m) if m.state == MachineState::Idle && !m.draining => {
                        idle.push((m.state_since, m.id, name.clone()));
                    }
                    // Retired after its lease (ephemeral), or drained (an
                    // outdated buildlet) and now idle.
                    Some(m)
                        if m.state == MachineState::Draining
                            || (m.draining && m.state == MachineState::Idle) =>
                    {
                        to_destroy.push((
                            name.clone(),
                            "",
                            "taken out of service (used once, or outdated)".into(),
                        ))
                    }
                    Some(_) => {}
                },
                Phase::Destroying => {
                    if !inst.busy && inst.retry_at.is_some_and(|t| now >= t) {
                        to_destroy.push((name.clone(), "", "retrying destroy".into()));
                    }
                }
                Phase::Creating | Phase::Registering { .. } => {}
            }
        }
        // A machine came: creation works again.
        if !newly.is_empty() {
            st.backoff = Duration::ZERO;
            st.paused_until = None;
        }
        for (name, reason, detail) in to_destroy {
            if !reason.is_empty() {
                let e = HookError {
                    reason: reason.into(),
                    detail: detail.clone(),
                };
                self.fail(&mut st, &name, &e);
            }
            self.destroy(&mut st, &name, &detail, tx);
        }
        // Idle beyond min_idle for longer than idle_timeout: longest idle
        // first. A machine leased since the snapshot is left alone.
        idle.sort();
        let idle_timeout_ms = cfg.idle_timeout.as_millis() as i64;
        let mut idle_count = idle.len();
        let now_ms = now_ms();
        for (since, id, name) in &idle {
            if idle_count <= cfg.min_idle as usize || now_ms - since < idle_timeout_ms {
                break;
            }
            if self.ctx.pool.take_if_idle(*id) {
                idle_count -= 1;
                let why = format!("idle for longer than {:?}", cfg.idle_timeout);
                self.destroy(&mut st, name, &why, tx);
            }
        }
        // Demand: waiting requests and the warm minimum, against idle
        // machines and machines on their way.
        let waiting = self.ctx.scheduler.waiting(&ht);
        let in_flight = st
            .instances
            .values()
            .filter(|i| matches!(i.phase, Phase::Creating | Phase::Registering { .. }))
            .count();
        let existing = st.instances.len();
        let need = (waiting + cfg.min_idle as usize).saturating_sub(idle_count + in_flight);
        let room = (cfg.max as usize).saturating_sub(existing);
        let n = need.min(room);
        if n > 0 && st.paused_until.is_none_or(|t| now >= t) {
            for _ in 0..n {
                self.create(&mut st, tx);
            }
        }
        newly
    }

    /// Machines recorded by an earlier run: destroy each.
    async fn adopt_leftovers(self: &Arc<Self>, tx: &mpsc::UnboundedSender<Event>) {
        let rows = match self.ctx.store.exec_instances(self.host_type()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(host_type = %self.host_type(), "reading exec machines: {e}");
                return;
            }
        };
        let mut st = self.lock();
        for row in rows {
            if st.instances.contains_key(&row.hostname) {
                continue;
            }
            st.instances.insert(
                row.hostname.clone(),
                Instance {
                    phase: Phase::Destroying,
                    since: Instant::now(),
                    busy: false,
                    retry_at: None,
                    destroy_failures: 0,
                },
            );
            self.destroy(
                &mut st,
                &row.hostname,
                &format!("left {} by an earlier run of the coordinator", row.state),
                tx,
            );
        }
    }

    async fn run_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.adopt_leftovers(&tx).await;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    // Recorded here, in order with the deletes of on_event.
                    for n in self.step(&tx) {
                        if let Err(e) = self.ctx.store.exec_instance_put(&n, self.host_type(), "registered", "").await {
                            tracing::warn!(hostname = %n, "recording an exec machine: {e}");
                        }
                    }
                }
                Some(ev) = rx.recv() => self.on_event(ev, &tx).await,
                _ = stopped(&mut stop) => break,
            }
        }
        // Stopping: every machine goes; wait for the hooks (bounded by
        // their timeouts), retrying failed destroys a few times.
        let cfg = self.cfg();
        let limit =
            Instant::now() + cfg.destroy_timeout.max(cfg.create_timeout) + Duration::from_secs(5);
        loop {
            {
                let mut st = self.lock();
                let names: Vec<String> = st
                    .instances
                    .iter()
                    .filter(|(_, i)| {
                        !i.busy
                            && (i.phase != Phase::Destroying
                                || i.retry_at.is_some_and(|t| Instant::now() >= t))
                    })
                    .map(|(n, _)| n.clone())
                    .collect();
                for n in names {
                    self.destroy(&mut st, &n, "its source stopped", &tx);
                }
                if st.instances.is_empty() {
                    return;
                }
            }
            let left = limit.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(host_type = %self.host_type(), "stopping with exec machines not destroyed; the next start destroys them");
                return;
            }
            match tokio::time::timeout(left.min(TICK * 5), rx.recv()).await {
                Ok(Some(ev)) => self.on_event(ev, &tx).await,
                Ok(None) => return,
                Err(_) => {}
            }
        }
    }
}

impl MachineSource for ExecSource {
    fn admits(&self, hostname: &str) -> Result<(), String> {
        match self.lock().instances.get(hostname).map(|i| i.phase) {
            Some(Phase::Destroying) => Err(format!(
                "{hostname:?} is being destroyed by the {} exec pool",
                self.host_type()
            )),
            Some(_) => Ok(()),
            None => Err(format!(
                "{hostname:?} is not a machine the coordinator created for the exec pool {}; its machines are started by its create command",
                self.host_type()
            )),
        }
    }

    fn run(self: Arc<Self>, stop: watch::Receiver<bool>) -> BoxFuture<'static, ()> {
        Box::pin(self.run_loop(stop))
    }

    fn one_lease_per_machine(&self) -> bool {
        self.cfg().ephemeral
    }

    /// New settings apply at once: new machines use the new hooks, `max`
    /// and `min_idle` are the new targets; machines are not restarted.
    fn reconfigure(&self, host: &crate::config::HostConfig) -> bool {
        match &host.exec {
            Some(e) => {
                *self.cfg.lock().unwrap_or_else(|e| e.into_inner()) = e.clone();
                true
            }
            None => false,
        }
    }

    fn view(&self) -> SourceView {
        let st = self.lock();
        let now = Instant::now();
        SourceView {
            host_type: self.host_type().into(),
            kind: "exec".into(),
            instances: st
                .instances
                .iter()
                .map(|(n, i)| InstanceView {
                    hostname: n.clone(),
                    state: i.phase.name().into(),
                    state_secs: now.duration_since(i.since).as_secs_f64(),
                })
                .collect(),
            failures: st.failures.clone(),
            recent_failures: st.recent.iter().cloned().collect(),
            created: st.created,
            destroyed: st.destroyed,
            backoff_secs: st
                .paused_until
                .map_or(0.0, |t| t.saturating_duration_since(now).as_secs_f64()),
        }
    }

    fn describe(&self) -> Option<String> {
        let st = self.lock();
        let count = |p: fn(&Phase) -> bool| st.instances.values().filter(|i| p(&i.phase)).count();
        let starting = count(|p| matches!(p, Phase::Creating | Phase::Registering { .. }));
        let mut s = format!(
            "exec pool: {starting} starting, {} running, max {}",
            count(|p| *p == Phase::Registered),
            self.cfg().max
        );
        if let Some(t) = st.paused_until {
            let left = t.saturating_duration_since(Instant::now());
            if !left.is_zero() {
                s.push_str(&format!(
                    "; creation paused {:.0}s after a failure ({})",
                    left.as_secs_f64().ceil(),
                    st.last_failure
                ));
            }
        }
        Some(s)
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Runs a hook with a clean environment and its own process group, killed
/// with that group after `timeout`. Its output is read through pipes and
/// only the last [`OUTPUT_TAIL`] bytes are kept, for the failure message;
/// what it leaves running (the machine it started) may keep writing: the
/// pipes are drained, and discarded, until they close.
async fn run_hook(
    cmd: &[String],
    env: &[(String, String)],
    timeout: Duration,
    what: &str,
) -> Result<(), HookError> {
    let failed = |detail: String| HookError {
        reason: format!("{what}-failed"),
        detail,
    };
    let Some((program, args)) = cmd.split_first() else {
        return Err(failed(format!("no {what} command")));
    };
    let mut c = tokio::process::Command::new(program);
    c.args(args)
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        )
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(home) = std::env::var_os("HOME") {
        c.env("HOME", home);
    }
    #[cfg(unix)]
    c.process_group(0);
    let mut child = c
        .spawn()
        .map_err(|e| failed(format!("cannot run {program:?}: {e}")))?;
    let pid = child.id();
    let output = Arc::new(Mutex::new(VecDeque::<u8>::new()));
    let mut readers = Vec::new();
    if let Some(r) = child.stdout.take() {
        readers.push(tokio::spawn(drain(r, output.clone())));
    }
    if let Some(r) = child.stderr.take() {
        readers.push(tokio::spawn(drain(r, output.clone())));
    }
    let waited = tokio::time::timeout(timeout, child.wait()).await;
    if waited.is_err() {
        #[cfg(unix)]
        if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: signals the process group our own child leads.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        let _ = child.kill().await;
    }
    // Let the readers catch up with what was written before the exit.
    let _ = tokio::time::timeout(
        Duration::from_millis(200),
        futures_util::future::join_all(&mut readers),
    )
    .await;
    let tail = {
        let buf = output.lock().unwrap_or_else(|e| e.into_inner());
        let (a, b) = buf.as_slices();
        let text = String::from_utf8_lossy(&[a, b].concat()).trim().to_string();
        if text.is_empty() {
            String::new()
        } else {
            format!("; output: {text}")
        }
    };
    match waited {
        Ok(Ok(s)) if s.success() => Ok(()),
        Ok(Ok(s)) => Err(failed(format!("{what} exited with {s}{tail}"))),
        Ok(Err(e)) => Err(failed(format!("waiting for {what}: {e}"))),
        Err(_) => Err(HookError {
            reason: format!("{what}-timeout"),
            detail: format!("{what} still ran after {timeout:?}; killed{tail}"),
        }),
    }
}

/// Reads a hook's pipe to its end, keeping the last [`OUTPUT_TAIL`] bytes.
async fn drain(mut r: impl tokio::io::AsyncRead + Unpin, keep: Arc<Mutex<VecDeque<u8>>>) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let mut k = keep.lock().unwrap_or_else(|e| e.into_inner());
                k.extend(&buf[..n]);
                let excess = k.len().saturating_sub(OUTPUT_TAIL);
                k.drain(..excess);
            }
        }
    }
}
