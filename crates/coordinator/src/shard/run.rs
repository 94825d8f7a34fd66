//! Running one sharded step on the farm: list the units on the build's
//! machine, ask the lease queue for helpers (never waiting for them: the
//! build's machine starts at once and helpers join as they come), make each
//! helper ready (the same source, the step's earlier steps), and hand out
//! units one at a time until all passed, one failed, the build is
//! cancelled or the step's time is up. Then every helper goes back.
//!
//! A machine that breaks mid-unit (unreachable, link cut, `5xx`) is
//! dropped from the pool and its unit goes back to the front of the queue
//! for another machine. The step fails only when a unit fails, or when no
//! machine is left. If the build's own machine is lost and later steps
//! follow, one helper stays on to carry the build on.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use buildlet::proto::ProcessState;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{Notify, watch};

use super::{HISTORY_PER_UNIT, MAX_LIST_OUTPUT, Planned, parse_units, plan};
use crate::bounded::{CappedBuffer, TailBuffer};
use crate::builds::{Outcome, StepCtx, priority, step_env, step_exec};
use crate::config::{Shard, Step, human_duration};
use crate::farm::Farm;
use crate::logs::MAX_LOG;
use crate::pool::{Holder, Lease};
use crate::results::{Outcome as TestOutcome, TestResult};
use crate::scheduler::{LeaseRequest, Ticket};
use crate::store::{BuildKind, RunResult, StepEnd, UnitRun, now_ms};

/// Output of one unit kept for the log: its end, where failures are.
const UNIT_OUTPUT: usize = 256 << 10;
/// Units named in the log line that shows the order.
const ORDER_SHOWN: usize = 5;
/// A unit that loses this many machines fails the step: it is what breaks
/// them (it kills its buildlet, eats the memory, fills the disk), and
/// going on would empty the pool one machine at a time.
const MAX_LOSSES: u32 = 2;

/// What a sharded step needs: its step in the build (what every step
/// has, [`StepCtx`], which it derefs to) and how it is split.
pub(crate) struct StepRun<'a> {
    pub ctx: StepCtx<'a>,
    pub shard: &'a Shard,
}

impl<'a> std::ops::Deref for StepRun<'a> {
    type Target = StepCtx<'a>;
    fn deref(&self) -> &StepCtx<'a> {
        &self.ctx
    }
}

struct Running {
    unit: String,
    since: Instant,
    /// Its result is being written: the step's end must not record it again.
    recorded: bool,
}

/// The step's shared state; every change is followed by `changed`.
#[derive(Default)]
struct Queue {
    pending: VecDeque<Planned>,
    /// By lease id.
    running: HashMap<u64, Running>,
    passed: usize,
    /// (unit, what happened), in the order they failed.
    failures: Vec<(String, String)>,
    /// A unit failed: nothing more is handed out, running units are stopped.
    stop: bool,
    /// Machines taking units (the build's own and ready helpers).
    workers: usize,
    /// Helpers leased and being made ready.
    preparing: usize,
    main_lost: bool,
    /// The helper kept to carry the build on after its machine was lost.
    survivor: Option<Lease>,
    machines: BTreeSet<String>,
    /// Helper requests still waiting in the lease queue.
    asking: usize,
    /// The one helper that stays, idle, while others still run units: a
    /// unit that comes back from a lost machine (the build's own too)
    /// finds a machine at once. Other idle helpers go back.
    standby: Option<u64>,
    /// How often each unit lost its machine.
    losses: HashMap<String, u32>,
    /// Workers waiting for a unit now.
    idle: usize,
    /// Units that failed, then passed when run again.
    flaky: Vec<String>,
    /// Test names each failed unit's run reported (the unit's own name when
    /// it reported none), to mark flaky when the unit passes again.
    failed_tests: HashMap<String, Vec<String>>,
}

struct Shared<'r> {
    run: &'r StepRun<'r>,
    q: Mutex<Queue>,
    changed: Notify,
    abort: watch::Sender<bool>,
    /// Helper leases not yet given back, by lease id.
    helpers: Mutex<HashMap<u64, Lease>>,
    total: usize,
    step_deadline: Instant,
    /// Later steps need a machine: keep a helper if the build's own is lost.
    need_survivor: bool,
    /// Lines of the step's log so far; appends go through [`Shared::append`]
    /// so a unit's section knows the line it starts on.
    lines: Mutex<usize>,
}

impl Shared<'_> {
    fn q(&self) -> MutexGuard<'_, Queue> {
        self.q.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn helpers(&self) -> MutexGuard<'_, HashMap<u64, Lease>> {
        self.helpers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn log(&self, text: &str) {
        self.append(text.as_bytes());
    }

    /// Appends to the live log; returns how many lines of the step's log
    /// came before.
    fn append(&self, bytes: &[u8]) -> usize {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let before = *lines;
        self.run.rb.log.append(bytes);
        *lines += bytes.iter().filter(|&&b| b == b'\n').count();
        before
    }

    /// Publishes progress for the build page and wakes every waiter.
    fn changed(&self) {
        let progress = {
            let q = self.q();
            let done = q.passed + q.failures.len();
            format!(
                "{done} of {} units done, {} running, on {} machine{}",
                self.total,
                q.running.len(),
                q.workers,
                if q.workers == 1 { "" } else { "s" }
            )
        };
        *self
            .run
            .rb
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = progress;
        self.changed.notify_waiters();
    }
}

type StepFuture<'f> = Pin<Box<dyn Future<Output = ()> + Send + 'f>>;

/// On drop, gives back every helper lease the step still holds (and the
/// survivor, unless it was taken): each cleaned on its own task, so
/// nothing interrupts the cleaning. The one way helpers go back when the
/// step ends, however it ends.
struct GiveBack<'r> {
    farm: Arc<Farm>,
    sh: &'r Shared<'r>,
}

impl Drop for GiveBack<'_> {
    fn drop(&mut self) {
        let mut leases: Vec<Lease> = self.sh.helpers().drain().map(|(_, l)| l).collect();
        leases.extend(self.sh.q().survivor.take());
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        for l in leases {
            let farm = self.farm.clone();
            rt.spawn(async move { farm.end_lease(l).await });
        }
    }
}

impl Farm {
    /// Runs a sharded step with `main`, the build's machine, and stores the
    /// step's result and log. Returns the outcome and, when `main` was lost
    /// and later steps follow, the helper that takes its place.
    pub(crate) async fn run_sharded(
        self: &Arc<Self>,
        run: &StepRun<'_>,
        main: &Lease,
        cancel: &mut watch::Receiver<bool>,
    ) -> (Outcome, Option<Lease>) {
        let log = &run.rb.log;
        let step_start = log.len();
        let started = Instant::now();
        log.append(
            format!(
                "\n--- step {} (sharded): listing units with {}\n",
                run.step.name,
                run.shard.list.join(" ").replace('\n', "\\n")
            )
            .as_bytes(),
        );
        let step_deadline = run.deadline.min(started + run.step.timeout);
        let (outcome, survivor, units, machines) = self
            .sharded(run, main, cancel, step_deadline, step_start)
            .await;
        *run.rb.progress.lock().unwrap_or_else(|e| e.into_inner()) = String::new();
        if let Some(s) = &survivor {
            log.append(
                format!(
                    "farmer: {} was lost; the build goes on on helper {}\n",
                    main.hostname, s.hostname
                )
                .as_bytes(),
            );
        }
        let (result, detail) = match &outcome {
            Outcome::Passed => (RunResult::Passed, String::new()),
            Outcome::Failed(m) => (RunResult::Failed, m.clone()),
            Outcome::Cancelled => (RunResult::Cancelled, "cancelled by an admin".to_string()),
            Outcome::Infra(m) | Outcome::CoordinatorError(m) => (RunResult::InfraError, m.clone()),
        };
        log.append(
            format!(
                "--- step {} {result} in {:.1}s ({units} units on {machines} machine{})\n",
                run.step.name,
                started.elapsed().as_secs_f64(),
                if machines == 1 { "" } else { "s" }
            )
            .as_bytes(),
        );
        let end = StepEnd {
            step_id: run.step_id,
            result,
            detail,
            log: log.range_async(step_start, step_start + MAX_LOG).await,
        };
        if let Err(e) = self.store.finish_step(&end).await {
            tracing::error!(build = run.build.id, "recording step: {e}");
        }
        (outcome, survivor)
    }

    /// The step itself: (outcome, survivor, units listed, machines used).
    async fn sharded(
        self: &Arc<Self>,
        run: &StepRun<'_>,
        main: &Lease,
        cancel: &mut watch::Receiver<bool>,
        step_deadline: Instant,
        step_start: usize,
    ) -> (Outcome, Option<Lease>, usize, usize) {
        let step = run.step;
        let name = &step.name;
        let limit = step_deadline.saturating_duration_since(Instant::now());
        let planned = match self.list_units(run, main, cancel, step_deadline).await {
            Ok(p) => p,
            Err(o) => return (o, None, 0, 1),
        };
        let total = planned.len();
        if total == 0 {
            run.rb
                .log
                .append(b"farmer: the list named no units; nothing to run\n");
            return (Outcome::Passed, None, 0, 1);
        }
        let want = run
            .shard
            .helpers_for(run.build.kind == BuildKind::PreSubmit)
            .min(total.saturating_sub(1) as u32);
        let shared = Shared {
            run,
            q: Mutex::new(Queue {
                pending: planned.into(),
                workers: 1,
                machines: BTreeSet::from([main.hostname.clone()]),
                asking: want as usize,
                ..Default::default()
            }),
            changed: Notify::new(),
            abort: watch::channel(false).0,
            helpers: Mutex::new(HashMap::new()),
            total,
            step_deadline,
            need_survivor: run.builder.steps.len() > run.index + 1,
            lines: Mutex::new({
                let so_far = run
                    .rb
                    .log
                    .range_async(step_start, step_start + MAX_LOG)
                    .await;
                so_far.iter().filter(|&&b| b == b'\n').count()
            }),
        };
        shared.log(&format!(
            "farmer: running {total} units on {}{}\n",
            main.hostname,
            match want {
                0 => String::new(),
                n => format!(
                    "; asked for {n} helper machine{} of {}, which join as they come",
                    if n == 1 { "" } else { "s" },
                    run.build.host_type
                ),
            }
        ));
        shared.changed();
        // Gives back whatever helper is left however this function ends
        // (a panic in a worker, the build's task dropped).
        let give_back = GiveBack {
            farm: self.clone(),
            sh: &shared,
        };
        let futs: FuturesUnordered<StepFuture<'_>> = FuturesUnordered::new();
        futs.push(Box::pin(self.worker(&shared, main.clone(), true)));
        for _ in 0..want {
            let ticket = self.scheduler.request(LeaseRequest {
                host_type: run.build.host_type.clone(),
                priority: priority(run.build.kind),
                holder: Holder::Helper {
                    build_id: run.build.id,
                },
                commit_time: run.build.commit_time,
            });
            futs.push(Box::pin(self.helper(&shared, ticket)));
        }
        let mut futs = futs;
        let outcome = loop {
            let notified = shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let q = shared.q();
                if q.running.is_empty() {
                    if q.stop {
                        break Outcome::Failed(failure_message(name, &q.failures));
                    }
                    if q.pending.is_empty() {
                        break Outcome::Passed;
                    }
                    if q.workers == 0 && q.preparing == 0 && q.asking == 0 {
                        break Outcome::Infra(format!(
                            "step {name}: every machine was lost with {} of {total} units left",
                            q.pending.len()
                        ));
                    }
                }
            }
            tokio::select! {
                Some(()) = futs.next(), if !futs.is_empty() => {}
                _ = &mut notified => {}
                _ = cancel.wait_for(|c| *c) => break Outcome::Cancelled,
                _ = tokio::time::sleep_until(step_deadline.into()) => {
                    let q = shared.q();
                    let running: Vec<&str> = q.running.values().map(|r| r.unit.as_str()).take(5).collect();
                    break Outcome::Failed(format!(
                        "step {name} timed out after {} with {} of {total} units unfinished (running: {})",
                        human_duration(limit.as_secs() as i64),
                        q.pending.len() + q.running.len(),
                        running.join(", ")
                    ));
                }
            }
        };
        // Stop what still runs: dropping a command's request kills it on
        // its machine; a dropped ticket withdraws its request.
        shared.abort.send_replace(true);
        drop(futs);
        let (survivor, machines, cut_short) = {
            let mut q = shared.q();
            let cut: Vec<(u64, Running)> = q.running.drain().filter(|(_, r)| !r.recorded).collect();
            let survivor = match outcome {
                Outcome::Passed => q.survivor.take(),
                _ => None,
            };
            (survivor, q.machines.len(), cut)
        };
        for (lease_id, r) in cut_short {
            let machine = if lease_id == main.id {
                main.hostname.clone()
            } else {
                shared
                    .helpers()
                    .get(&lease_id)
                    .map(|l| l.hostname.clone())
                    .unwrap_or_default()
            };
            self.record_unit(
                run,
                &r.unit,
                &machine,
                r.since,
                RunResult::Cancelled,
                "the step ended",
            )
            .await;
        }
        let flaky = std::mem::take(&mut shared.q().flaky);
        if matches!(outcome, Outcome::Passed) && !flaky.is_empty() {
            shared.log(&format!(
                "farmer: flaky (failed, then passed when run again): {}\n",
                crate::builds::names(&flaky)
            ));
            self.metrics
                .flaky_tests(&run.builder.name, flaky.len() as u64);
            run.rb
                .flaky
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(flaky);
        }
        // Every other helper goes back at once, cleaned for reuse.
        drop(give_back);
        let main_lost = shared.q().main_lost;
        let outcome = match outcome {
            Outcome::Passed if main_lost && shared.need_survivor && survivor.is_none() => {
                Outcome::Infra(format!(
                    "step {name}: {} was lost and no helper was left to run the later steps",
                    main.hostname
                ))
            }
            o => o,
        };
        (outcome, survivor, total, machines)
    }

    /// Runs the list command on the build's machine and orders its units.
    async fn list_units(
        &self,
        run: &StepRun<'_>,
        main: &Lease,
        cancel: &mut watch::Receiver<bool>,
        step_deadline: Instant,
    ) -> Result<Vec<Planned>, Outcome> {
        let step = run.step;
        let name = &step.name;
        let (cmd, opts) = step_exec(
            &run.shard.list,
            step,
            step_env(run.base_env, step, None),
            remaining(step_deadline),
        );
        let mut out = CappedBuffer {
            cap: MAX_LIST_OUTPUT,
            bytes: Vec::new(),
            overflowed: false,
            stop: false,
        };
        let r = tokio::select! {
            r = main.client.exec(&cmd, &opts, &mut out) => r,
            _ = cancel.wait_for(|c| *c) => return Err(Outcome::Cancelled),
        };
        let failed = |what: String| {
            run.rb.log.append(&out.bytes);
            Err(Outcome::Failed(format!(
                "step {name}: listing the units {what}"
            )))
        };
        match r {
            Ok(ProcessState::Ok) => {}
            Ok(state) => return failed(format!("failed: {state}")),
            Err(e) if e.is_communication() => {
                return Err(Outcome::Infra(format!(
                    "step {name}: listing the units: {e}"
                )));
            }
            Err(e) => return failed(format!("failed: {e}")),
        }
        if out.overflowed {
            return failed(format!(
                "printed more than {} MiB; one unit per line, please",
                MAX_LIST_OUTPUT >> 20
            ));
        }
        let units = match parse_units(&out.bytes) {
            Ok(u) => u,
            Err(e) => return failed(format!("failed: {e}")),
        };
        let history = self
            .store
            .unit_durations(&run.builder.name, name, HISTORY_PER_UNIT)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(build = run.build.id, "reading unit durations: {e}");
                HashMap::new()
            });
        let planned = plan(units, &history);
        let measured = planned.iter().filter(|p| p.measured).count();
        let first: Vec<String> = planned
            .iter()
            .take(ORDER_SHOWN)
            .map(|p| format!("{} ({:.1}s)", p.unit, p.expected.as_secs_f64()))
            .collect();
        let order = if measured == 0 {
            "no past durations, so in the list's order".to_string()
        } else {
            format!(
                "{measured} with past durations; longest expected first: {}{}",
                first.join(", "),
                if planned.len() > ORDER_SHOWN {
                    ", ..."
                } else {
                    ""
                }
            )
        };
        run.rb
            .log
            .append(format!("farmer: {} units listed, {order}\n", planned.len()).as_bytes());
        Ok(planned)
    }

    /// A helper: waits for its lease, makes the machine ready, then takes
    /// units like the build's own machine.
    async fn helper(self: &Arc<Self>, sh: &Shared<'_>, mut ticket: Ticket) {
        let asked = Instant::now();
        let leased = ticket.lease().await;
        drop(ticket);
        let Ok(lease) = leased else {
            sh.q().asking -= 1;
            sh.changed();
            return;
        };
        {
            let mut q = sh.q();
            q.asking -= 1;
            if q.stop || q.pending.is_empty() {
                // Nothing left for it: straight back, untouched.
                drop(q);
                self.pool.release_idle(lease.id);
                sh.changed();
                return;
            }
            q.preparing += 1;
        }
        sh.helpers().insert(lease.id, lease.clone());
        sh.log(&format!(
            "farmer: helper {} joins after {:.1}s; pushing the source{}\n",
            lease.hostname,
            asked.elapsed().as_secs_f64(),
            earlier_steps(sh.run)
        ));
        let t0 = Instant::now();
        let prepared = crate::builds::make_ready(
            self,
            &lease,
            sh.run.build,
            run_steps(sh.run),
            sh.run.base_env,
            &sh.run.source,
            sh.step_deadline,
        )
        .await;
        sh.q().preparing -= 1;
        match prepared {
            Ok(()) => {
                {
                    let mut q = sh.q();
                    q.workers += 1;
                    q.machines.insert(lease.hostname.clone());
                }
                sh.log(&format!(
                    "farmer: helper {} ready in {:.1}s\n",
                    lease.hostname,
                    t0.elapsed().as_secs_f64()
                ));
                sh.changed();
                self.worker(sh, lease, false).await;
            }
            Err((msg, broken)) => {
                sh.log(&format!(
                    "farmer: helper {} could not be made ready, so it is not used: {msg}\n",
                    lease.hostname
                ));
                let l = sh.helpers().remove(&lease.id);
                if broken {
                    self.pool.remove(
                        lease.id,
                        &format!("broke preparing for build {}: {msg}", sh.run.build.id),
                    );
                } else if let Some(l) = l {
                    let me = self.clone();
                    tokio::spawn(async move { me.end_lease(l).await });
                }
                sh.changed();
            }
        }
    }

    /// Takes units from the queue and runs them on `lease` until nothing is
    /// left for it (or the machine breaks).
    async fn worker(self: &Arc<Self>, sh: &Shared<'_>, lease: Lease, main: bool) {
        let run = sh.run;
        let mut abort = sh.abort.subscribe();
        let mut lost = false;
        loop {
            let unit = loop {
                let notified = sh.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                {
                    let mut q = sh.q();
                    if q.stop {
                        break None;
                    }
                    // A unit that just failed here goes to another machine
                    // when one is waiting for work; else it runs here again.
                    let pick = q
                        .pending
                        .iter()
                        .position(|u| u.avoid != Some(lease.id))
                        .or_else(|| (q.idle == 0 && !q.pending.is_empty()).then_some(0));
                    if let Some(u) = pick.and_then(|i| q.pending.remove(i)) {
                        if q.standby == Some(lease.id) {
                            q.standby = None;
                        }
                        q.running.insert(
                            lease.id,
                            Running {
                                unit: u.unit.clone(),
                                since: Instant::now(),
                                recorded: false,
                            },
                        );
                        break Some(u);
                    }
                    // Nothing to hand out. Once nothing runs, everyone
                    // leaves. Until then the build's machine waits (a unit
                    // may come back), and so does one helper, the standby,
                    // or every helper once the build's machine is lost.
                    if q.running.is_empty() && q.pending.is_empty() {
                        break None;
                    }
                    if !main && !q.main_lost {
                        match q.standby {
                            None => q.standby = Some(lease.id),
                            Some(id) if id == lease.id => {}
                            Some(_) => break None,
                        }
                    }
                    q.idle += 1;
                }
                notified.await;
                sh.q().idle -= 1;
            };
            let Some(unit) = unit else { break };
            sh.changed();
            let since = Instant::now();
            let (cmd, opts) = step_exec(
                &run.shard.command_for(&unit.unit),
                run.step,
                step_env(run.base_env, run.step, Some(&unit.unit)),
                remaining(sh.step_deadline),
            );
            let mut out = TailBuffer::new(UNIT_OUTPUT);
            let r = tokio::select! {
                r = lease.client.exec(&cmd, &opts, &mut out) => Some(r),
                _ = abort.wait_for(|a| *a) => None,
            };
            let took = since.elapsed();
            let (result, detail) = match r {
                None => (
                    RunResult::Cancelled,
                    "stopped: another unit failed".to_string(),
                ),
                Some(Ok(ProcessState::Ok)) => (RunResult::Passed, String::new()),
                Some(Ok(state)) => (RunResult::Failed, state.to_string()),
                Some(Err(e)) if e.is_communication() => (RunResult::Lost, e.to_string()),
                Some(Err(e)) => (RunResult::Failed, e.to_string()),
            };
            let mut section = format!(
                "\n--- unit {} on {}: {result} in {:.1}s{}{detail}\n",
                unit.unit,
                lease.hostname,
                took.as_secs_f64(),
                if detail.is_empty() { "" } else { ": " }
            )
            .into_bytes();
            // Lines before the unit's output within its section.
            let header_lines = section.iter().filter(|&&b| b == b'\n').count();
            let output = run.rb.log.masked(&out.text());
            if !output.is_empty() {
                section.extend(&output);
                if section.last() != Some(&b'\n') {
                    section.push(b'\n');
                }
            }
            if result == RunResult::Lost {
                let again = sh.q().losses.get(&unit.unit).copied().unwrap_or(0) + 1 < MAX_LOSSES;
                section.extend(if again {
                    &b"farmer: the unit goes back to the queue\n"[..]
                } else {
                    &b"farmer: the unit has now broken two machines; it fails the step\n"[..]
                });
            }
            let retry = result == RunResult::Failed && unit.failures < run.builder.retry_failed;
            if retry {
                section.extend(
                    format!(
                        "farmer: the unit runs again (re-run {} of {}), on another machine if one is free\n",
                        unit.failures + 1,
                        run.builder.retry_failed
                    )
                    .as_bytes(),
                );
            }
            let before = sh.append(&section);
            // The section starts with an empty line, then its header.
            let unit_tests = unit_results(
                &unit.unit,
                result,
                took,
                &output,
                before + 2,
                before + header_lines,
            );
            if let Some(r) = sh.q().running.get_mut(&lease.id) {
                r.recorded = true;
            }
            if !unit_tests.is_empty()
                && let Err(e) = self.store.record_tests(&run.tests_of(), &unit_tests).await
            {
                tracing::warn!(build = run.build.id, "recording test results: {e}");
            }
            self.record_unit(run, &unit.unit, &lease.hostname, since, result, &detail)
                .await;
            // Marked while the unit still counts as running, so the step
            // cannot end (and drop this worker) before it is written.
            if result == RunResult::Passed && unit.failures > 0 {
                let names = sh.q().failed_tests.remove(&unit.unit).unwrap_or_default();
                if let Err(e) = self.store.mark_flaky(run.step_id, &names).await {
                    tracing::warn!(build = run.build.id, "recording flaky tests: {e}");
                }
            }
            {
                let mut q = sh.q();
                q.running.remove(&lease.id);
                if main && result == RunResult::Lost {
                    q.main_lost = true;
                }
                let lost_too_often = result == RunResult::Lost && {
                    let n = q.losses.entry(unit.unit.clone()).or_default();
                    *n += 1;
                    *n >= MAX_LOSSES
                };
                match result {
                    RunResult::Passed => {
                        q.passed += 1;
                        if unit.failures > 0 {
                            q.flaky.push(unit.unit.clone());
                        }
                    }
                    RunResult::Failed if retry => {
                        let names: Vec<String> = unit_tests
                            .iter()
                            .filter(|t| t.outcome == TestOutcome::Fail)
                            .map(|t| t.name.clone())
                            .collect();
                        q.failed_tests
                            .entry(unit.unit.clone())
                            .or_default()
                            .extend(names);
                        q.pending.push_back(Planned {
                            failures: unit.failures + 1,
                            avoid: Some(lease.id),
                            ..unit
                        });
                    }
                    RunResult::Lost if !lost_too_often => q.pending.push_front(unit),
                    RunResult::Failed | RunResult::Lost => {
                        let what = if result == RunResult::Lost {
                            format!("it lost its machine {MAX_LOSSES} times (last: {detail})")
                        } else {
                            detail.clone()
                        };
                        q.failures.push((unit.unit.clone(), what));
                        q.stop = true;
                        sh.abort.send_replace(true);
                    }
                    _ => {}
                }
            }
            if result == RunResult::Lost {
                lost = true;
                self.pool.remove(
                    lease.id,
                    &format!("broke during a unit of build {}: {detail}", run.build.id),
                );
                if !main {
                    sh.helpers().remove(&lease.id);
                }
                break;
            }
            sh.changed();
        }
        {
            let mut q = sh.q();
            q.workers -= 1;
            if q.standby == Some(lease.id) {
                q.standby = None;
            }
            if !main && !lost {
                // Done with this helper: back now, unless it must carry the
                // build on in place of the lost machine.
                let keep = q.main_lost && sh.need_survivor && q.survivor.is_none() && !q.stop;
                if let Some(l) = sh.helpers().remove(&lease.id) {
                    if keep {
                        q.survivor = Some(l);
                    } else {
                        let me = self.clone();
                        tokio::spawn(async move { me.end_lease(l).await });
                    }
                }
            }
        }
        sh.changed();
    }

    async fn record_unit(
        &self,
        run: &StepRun<'_>,
        unit: &str,
        machine: &str,
        since: Instant,
        result: RunResult,
        detail: &str,
    ) {
        let took = since.elapsed();
        let r = UnitRun {
            build_id: run.build.id,
            step_id: run.step_id,
            builder: run.builder.name.clone(),
            step: run.step.name.clone(),
            unit: unit.to_string(),
            machine: machine.to_string(),
            started_at: now_ms() - took.as_millis() as i64,
            duration_ms: took.as_millis() as i64,
            result,
            detail: detail.to_string(),
        };
        if let Err(e) = self.store.record_unit_run(&r).await {
            tracing::warn!(build = run.build.id, unit, "recording a unit run: {e}");
        }
    }
}

/// The test results of one unit's run: what its output reports (`go test
/// -json`, libtest), its lines placed in the step's log (the output starts
/// after line `output_at`); a unit that reports none is itself the test.
fn unit_results(
    unit: &str,
    result: RunResult,
    took: Duration,
    output: &[u8],
    header_line: usize,
    output_at: usize,
) -> Vec<TestResult> {
    let outcome = match result {
        RunResult::Passed => TestOutcome::Pass,
        RunResult::Failed => TestOutcome::Fail,
        // Cut short: says nothing about the unit.
        _ => return Vec::new(),
    };
    let mut reported = crate::results::from_output(output);
    for t in &mut reported {
        t.line = t.line.map(|l| output_at + l);
    }
    // A failed unit whose tests all passed (a crash, a timeout) still
    // failed: then the unit itself is a failing result too.
    let any_failed = reported.iter().any(|t| t.outcome == TestOutcome::Fail);
    if !reported.is_empty() && (outcome == TestOutcome::Pass || any_failed) {
        return reported;
    }
    let Some(name) = crate::results::name(unit) else {
        return reported;
    };
    reported.push(TestResult {
        name,
        outcome,
        duration_ms: Some(took.as_millis() as i64),
        failure: if outcome == TestOutcome::Fail {
            crate::results::tail(
                &String::from_utf8_lossy(output),
                crate::results::MAX_FAILURE,
            )
        } else {
            String::new()
        },
        line: (outcome == TestOutcome::Fail).then_some(header_line),
    });
    reported
}

/// Time left until `deadline`, at least a millisecond (a zero timeout
/// would mean none to the buildlet).
fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// The steps a helper runs before it takes units: the earlier unsharded ones.
fn run_steps<'s>(run: &StepRun<'s>) -> impl Iterator<Item = &'s Step> {
    run.builder.steps[..run.index]
        .iter()
        .filter(|s| s.shard.is_none())
}

/// " and running steps a, b" for the helper's log line.
fn earlier_steps(run: &StepRun<'_>) -> String {
    let names: Vec<&str> = run_steps(run).map(|s| s.name.as_str()).collect();
    match names.len() {
        0 => String::new(),
        1 => format!(" and running step {}", names[0]),
        _ => format!(" and running steps {}", names.join(", ")),
    }
}

/// The build's error for failed units: the first by name, the rest counted.
fn failure_message(step: &str, failures: &[(String, String)]) -> String {
    match failures {
        [] => format!("step {step}: stopped"),
        [(unit, what)] => format!("step {step}: unit {unit} failed: {what}"),
        [(unit, what), rest @ ..] => {
            let others: Vec<&str> = rest.iter().take(5).map(|(u, _)| u.as_str()).collect();
            format!(
                "step {step}: unit {unit} failed: {what}; also failed: {}{}",
                others.join(", "),
                if rest.len() > 5 { ", ..." } else { "" }
            )
        }
    }
}
