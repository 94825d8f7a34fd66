//! Running one build on one leased machine: push the commit's tree, run the
//! steps with the builder's environment and timeouts, stream output to the
//! live log and store it per step, and record the outcome.
//!
//! The outcome decides what happens to the build and to the machine:
//! a failed command fails the build and the machine is cleaned for reuse; a
//! broken machine (unreachable, connection cut) is dropped from the pool and
//! the build is re-queued for another machine, up to `max_attempts`, every
//! attempt recorded.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use buildlet::client::{Cleaned, ExecOptions};
use buildlet::proto::ProcessState;
use bytes::Bytes;

use crate::config::{BuildConfig, HostConfig, Step};
use crate::farm::{Farm, RunningBuild};
use crate::logs::MAX_LOG;
use crate::pool::{Holder, Lease};
use crate::scheduler::{LeaseRequest, Priority, Ticket};
use crate::store::{BuildKind, BuildRow, BuildStatus, RunResult, StepEnd};

pub mod artifacts;
mod rerun;
pub mod source;
pub(crate) use rerun::{StepCtx, names};

/// The directory in the work dir that holds the source tree.
pub const SRC_DIR: &str = "src";

pub(crate) enum Outcome {
    Passed,
    Failed(String),
    Cancelled,
    /// The machine failed: drop it and retry elsewhere.
    Infra(String),
    /// The coordinator itself could not do its part (e.g. read the source).
    CoordinatorError(String),
}

/// What a build's driver does after one turn on a machine.
enum Next {
    /// The build ended (or is no longer this driver's to run).
    Done,
    /// Ask for another machine now (the last one broke).
    Again,
    /// The store failed; ask again after a pause.
    AgainLater,
}

/// A build's place in the lease queue (its helpers' too).
pub fn priority(kind: BuildKind) -> Priority {
    match kind {
        BuildKind::Release => Priority::Release,
        BuildKind::Interactive => Priority::Interactive,
        BuildKind::PreSubmit => Priority::PreSubmit,
        BuildKind::PostSubmit => Priority::PostSubmit,
    }
}

/// What [`Farm::early_source`] did.
enum EarlySource {
    /// The source could not be read.
    Unreadable(String),
    /// The source, and how pushing it to the machine went.
    Pushed(
        Arc<source::Source>,
        Result<source::Pushed, buildlet::client::Error>,
    ),
    /// Pushing took longer than the builder's whole timeout.
    TimedOut,
}

impl Farm {
    /// Starts the driver of a stored, queued build: it asks the lease queue
    /// for a machine, runs the build on it, and asks again after a machine
    /// broke, until the build ends. Withdrawing the build's request
    /// ([`Farm::cancel`]) ends a driver that waits.
    /// `build` is the stored row of a queued build (as stored or read back:
    /// what a driver uses of it never changes once stored).
    pub(crate) fn enqueue(self: &Arc<Self>, build: BuildRow) {
        // The request is queued now, not when the task first runs, so the
        // queue (and `/api/queue`) shows the build as soon as it exists.
        let ticket = self.request_for(&build);
        crate::forge::build_changed(self, build.id);
        let me = self.clone();
        tokio::spawn(async move { me.drive(build, ticket).await });
    }

    fn request_for(&self, q: &BuildRow) -> Ticket {
        self.scheduler.request(LeaseRequest {
            host_type: q.host_type.clone(),
            priority: priority(q.kind),
            holder: Holder::Build { build_id: q.id },
            commit_time: q.commit_time,
        })
    }

    async fn drive(self: Arc<Self>, mut q: BuildRow, first: Ticket) {
        let mut next = Some(first);
        loop {
            let mut ticket = match next.take() {
                Some(t) => t,
                None => {
                    // Between attempts the build may have been cancelled:
                    // then no request is made (it would be demand for nothing).
                    let queued = loop {
                        match self.store.build(q.id).await {
                            Ok(Some(b)) if b.status == BuildStatus::Queued => {
                                q = b;
                                break true;
                            }
                            Ok(_) => break false,
                            // A store that fails now must not strand a
                            // queued build without a driver.
                            Err(e) => {
                                tracing::warn!(
                                    build = q.id,
                                    "reading the build to re-queue it: {e}; retrying"
                                );
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                    };
                    if !queued {
                        self.unregister_running(q.id);
                        return;
                    }
                    self.request_for(&q)
                }
            };
            let Ok(lease) = ticket.lease().await else {
                // Withdrawn: cancelled while it waited.
                self.unregister_running(q.id);
                return;
            };
            self.metrics.observe_dispatch(ticket.waited());
            drop(ticket);
            match self.clone().run_build(&q, lease).await {
                Next::Done => return,
                Next::Again => {}
                Next::AgainLater => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    }

    /// Runs a build on a leased machine, then ends the lease (the machine
    /// is cleaned for reuse, retired, or dropped when broken).
    async fn run_build(self: Arc<Self>, build: &BuildRow, lease: Lease) -> Next {
        let id = build.id;
        let release = |me: &Arc<Farm>| me.pool.release_idle(lease.id);
        // The build is not this driver's to run (any more): the machine
        // goes back untouched.
        let done = |me: &Arc<Farm>| {
            release(me);
            me.unregister_running(id);
            Next::Done
        };
        let phase = self.metrics.phase("record-start");
        // Not read again here: whether it is still queued (not cancelled
        // meanwhile) is what starting the attempt checks, in the same
        // statement that starts it.
        let cfg = self.config();
        let (Some(builder), Some(host)) = (
            cfg.builders.get(&build.builder).cloned(),
            cfg.hosts.get(&build.host_type).cloned(),
        ) else {
            let msg = format!(
                "builder {:?} or its host type is no longer in the config",
                build.builder
            );
            self.end_unstarted(id, BuildStatus::Failed, &msg).await;
            return done(&self);
        };
        if build.kind == BuildKind::PreSubmit && !host.trusted {
            let msg = format!(
                "pre-submit work only runs on trusted machines; {} is not trusted",
                host.name
            );
            self.end_unstarted(id, BuildStatus::Cancelled, &msg).await;
            return done(&self);
        }
        // Registered before the attempt starts, so a cancel that finds the
        // build running can always reach it.
        let rb = self.register_running(id);
        // The source goes to the machine while the attempt is recorded:
        // both must be done before the first step, neither needs the other.
        // The builder's timeout counts from here: the push is part of it.
        let deadline = Instant::now() + builder.timeout;
        let early = self.early_source(build, deadline, &host, &lease, &rb);
        let (started, early) = tokio::join!(
            self.store
                .start_attempt(id, &lease.hostname, &lease.host_type),
            early
        );
        let (attempt_id, number) = match started {
            Ok(Some(a)) => a,
            // The source may be on the machine already: it is cleaned
            // before anyone else gets it, not handed back as it is.
            Ok(None) => {
                self.unregister_running(id);
                self.end_lease(lease).await;
                return Next::Done;
            }
            Err(e) => {
                tracing::error!(build = id, "starting attempt: {e}");
                self.unregister_running(id);
                self.end_lease(lease).await;
                return Next::AgainLater;
            }
        };
        *rb.machine.lock().unwrap_or_else(|e| e.into_inner()) = lease.hostname.clone();
        // Where this attempt's part of the live log starts: the whole of it
        // is stored when the attempt ends.
        let attempt_from = rb.log.len();
        rb.log.append(
            format!(
                "farmer: build {id} attempt {number}: {} on {} ({}), {}@{}\n",
                build.builder,
                lease.hostname,
                lease.host_type,
                build.repo,
                &build.commit[..build.commit.len().min(12)]
            )
            .as_bytes(),
        );
        tracing::info!(build = id, attempt = number, builder = %build.builder, machine = %lease.hostname, "build started");
        drop(phase);
        let mut lease = lease;
        let mut ended = None;
        let outcome = self
            .execute(
                build, &builder, &host, &mut lease, attempt_id, &rb, early, deadline, &mut ended,
            )
            .await;
        let max = cfg.farm.max_attempts as i64;
        let (result, detail) = match &outcome {
            Outcome::Passed => (RunResult::Passed, String::new()),
            Outcome::Failed(m) => (RunResult::Failed, m.clone()),
            Outcome::Cancelled => (RunResult::Cancelled, "cancelled by an admin".to_string()),
            Outcome::Infra(m) => (RunResult::InfraError, m.clone()),
            Outcome::CoordinatorError(m) => (RunResult::InfraError, m.clone()),
        };
        let phase = self.metrics.phase("record-result");
        let attempt_line = format!(
            "farmer: attempt {number} {result}{}{detail}\n",
            if detail.is_empty() { "" } else { ": " }
        );
        let final_status = match outcome {
            Outcome::Passed => (BuildStatus::Passed, String::new()),
            Outcome::Failed(m) => (BuildStatus::Failed, m),
            Outcome::Cancelled => (BuildStatus::Cancelled, "cancelled by an admin".into()),
            Outcome::CoordinatorError(m) => (BuildStatus::InfraError, m),
            Outcome::Infra(m) => {
                self.pool
                    .remove(lease.id, &format!("broke during build {id}: {m}"));
                if number < max {
                    if let Some(end) = &ended
                        && let Err(e) = self.store.finish_step(end).await
                    {
                        tracing::error!(build = id, "recording the step's end: {e}");
                    }
                    if let Err(e) = self.store.finish_attempt(attempt_id, result, &detail).await {
                        tracing::error!(build = id, "recording attempt: {e}");
                    }
                    rb.log.append(attempt_line.as_bytes());
                    return match self.store.requeue(id).await {
                        Ok(true) => {
                            rb.log.append(
                                format!(
                                    "farmer: retrying on another machine (attempt {} of {max})\n",
                                    number + 1
                                )
                                .as_bytes(),
                            );
                            self.store_attempt_log(&rb, attempt_id, id, attempt_from)
                                .await;
                            Next::Again
                        }
                        Ok(false) => {
                            self.unregister_running(id);
                            Next::Done
                        }
                        Err(e) => {
                            // Left running in the store; the next start
                            // recovers it (recorded as lost, re-queued).
                            tracing::error!(build = id, "re-queueing: {e}");
                            self.unregister_running(id);
                            Next::Done
                        }
                    };
                }
                (
                    BuildStatus::InfraError,
                    format!("gave up after {number} attempts; last: {m}"),
                )
            }
        };
        rb.log.append(attempt_line.as_bytes());
        let (status, msg) = final_status;
        let flaky = status == BuildStatus::Passed
            && !rb
                .flaky
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty();
        rb.log.append(
            format!(
                "farmer: build {id} {}{}{}\n",
                if flaky {
                    "passed with flakes"
                } else {
                    status.as_str()
                },
                if msg.is_empty() { "" } else { ": " },
                msg
            )
            .as_bytes(),
        );
        // The last step's end, the attempt's, the build's and the
        // attempt's log: one write.
        let log = rb
            .log
            .range_async(attempt_from, attempt_from + MAX_LOG)
            .await;
        let ended = self
            .store
            .end_attempt(
                (attempt_id, id),
                result,
                &detail,
                (status, &msg, flaky),
                (&log, ended.as_ref()),
            )
            .await;
        match ended {
            Ok(true) => {
                self.metrics.build_finished(status);
                crate::forge::build_changed(&self, id);
            }
            Ok(false) => {}
            Err(e) => tracing::error!(build = id, "recording the attempt's and build's end: {e}"),
        }
        tracing::info!(build = id, %status, "build finished");
        self.unregister_running(id);
        drop(phase);
        let phase = self.metrics.phase("clean");
        self.end_lease(lease).await;
        drop(phase);
        Next::Done
    }

    /// Ends a build that never started an attempt.
    async fn end_unstarted(self: &Arc<Self>, id: i64, status: BuildStatus, msg: &str) {
        if let Ok(true) = self.store.finish_build(id, status, msg).await {
            self.metrics.build_finished(status);
            crate::forge::build_changed(self, id);
        }
    }

    /// Stores what the live log showed of an attempt, from `from` on.
    async fn store_attempt_log(
        &self,
        rb: &RunningBuild,
        attempt_id: i64,
        build_id: i64,
        from: usize,
    ) {
        let log = rb.log.range_async(from, from + MAX_LOG).await;
        if let Err(e) = self.store.put_attempt_log(attempt_id, build_id, &log).await {
            tracing::warn!(build = build_id, "storing the attempt's log: {e}");
        }
    }

    /// Reads the build's source and pushes it to the leased machine (see
    /// `run_build`: this overlaps recording the attempt). Stops early, with
    /// `None`, when the build is cancelled meanwhile.
    async fn early_source(
        self: &Arc<Self>,
        build: &BuildRow,
        deadline: Instant,
        host: &HostConfig,
        lease: &Lease,
        rb: &RunningBuild,
    ) -> Option<EarlySource> {
        let mut cancel = rb.cancel.subscribe();
        let work = async {
            let phase = self.metrics.phase("source-archive");
            let src = self.source(&build.repo, &build.commit).await;
            drop(phase);
            let src = match src {
                Ok(s) => s,
                Err(e) => return EarlySource::Unreadable(e),
            };
            let _phase = self.metrics.phase("source-push");
            let pushed = self
                .push_source(
                    &lease.client,
                    &lease.hostname,
                    &host.name,
                    &build.repo,
                    &build.commit,
                    &src,
                )
                .await;
            EarlySource::Pushed(src, pushed)
        };
        tokio::select! {
            r = work => Some(r),
            _ = cancel.wait_for(|c| *c) => None,
            _ = tokio::time::sleep_until(deadline.into()) => Some(EarlySource::TimedOut),
        }
    }

    /// Runs the steps on `main`, the build's machine. A sharded step may
    /// lose that machine and go on with a helper: then `main` is replaced
    /// by the helper (and the lost machine is out of the pool). `early` is
    /// the source already pushed to `main`, if it was; `deadline` ends the
    /// builder's timeout, which began before that push. The end of the
    /// step that ends the attempt (its last, or the one that failed) is left
    /// in `ended`, for the attempt's end to record with its own.
    #[allow(clippy::too_many_arguments)]
    async fn execute(
        self: &Arc<Self>,
        build: &BuildRow,
        builder: &BuildConfig,
        host: &HostConfig,
        main: &mut Lease,
        attempt_id: i64,
        rb: &RunningBuild,
        early: Option<EarlySource>,
        deadline: Instant,
        ended: &mut Option<StepEnd>,
    ) -> Outcome {
        // One snapshot of the secrets for what is sent and what is masked
        // (a reload between attempts may have changed them).
        let secrets = self.secrets();
        rb.log.set_mask(secrets.mask());
        let allowed = gets_secrets(build);
        let with_secrets = match with_secrets(builder, host, &secrets, allowed) {
            Ok(r) => r,
            Err(e) => return Outcome::CoordinatorError(e),
        };
        if !allowed && matches!(with_secrets.0, Cow::Owned(_)) {
            rb.log.append(
                b"farmer: this build gets no secrets (a pre-submit build, or a user's): the variables that name one are not set\n",
            );
        }
        let (builder, host) = (&*with_secrets.0, &*with_secrets.1);
        let mut client = main.client.clone();
        let mut cancel = rb.cancel.subscribe();
        if *cancel.borrow() {
            return Outcome::Cancelled;
        }
        let (src, push) = match early {
            None => return Outcome::Cancelled,
            Some(EarlySource::Unreadable(e)) => {
                return Outcome::CoordinatorError(format!(
                    "reading the source of {}@{}: {e}",
                    build.repo, build.commit
                ));
            }
            Some(EarlySource::TimedOut) => {
                return Outcome::Failed(format!(
                    "build timed out after {:?} while pushing the source",
                    builder.timeout
                ));
            }
            Some(EarlySource::Pushed(src, push)) => (src, push),
        };
        let tgz = src.tgz.clone();
        match push {
            Ok(p) => rb
                .log
                .append(format!("farmer: {}\n", p.describe(tgz.len())).as_bytes()),
            Err(e) => {
                return if e.is_communication() {
                    Outcome::Infra(format!("pushing the source: {e}"))
                } else {
                    Outcome::Failed(format!("pushing the source: {e}"))
                };
            }
        }
        let _steps = self.metrics.phase("steps");
        let base_env = base_env(build, builder, host);
        for (i, step) in builder.steps.iter().enumerate() {
            // The step's row. A sharded step's comes first (its shards
            // are recorded under it); a plain step's is written while its
            // command starts: both must be done before the step's end is
            // recorded, and neither needs the other.
            let record = async {
                self.store
                    .start_step(build.id, attempt_id, i as i64 + 1, &step.name)
                    .await
                    .map_err(|e| Outcome::CoordinatorError(format!("recording step: {e}")))
            };
            *rb.step.lock().unwrap_or_else(|e| e.into_inner()) = step.name.clone();
            let ctx = |step_id| StepCtx {
                build,
                builder,
                step,
                index: i,
                step_id,
                attempt_id,
                base_env: &base_env,
                source: src.clone(),
                deadline,
                rb,
            };
            if let Some(shard) = &step.shard {
                let ctx = match record.await {
                    Ok(id) => ctx(id),
                    Err(o) => return o,
                };
                let run = crate::shard::run::StepRun { ctx, shard };
                let (end, survivor) = self.run_sharded(&run, main, &mut cancel).await;
                if let Some(s) = survivor {
                    *rb.machine.lock().unwrap_or_else(|e| e.into_inner()) = s.hostname.clone();
                    *main = s;
                    client = main.client.clone();
                }
                match end {
                    Outcome::Passed => continue,
                    other => return other,
                }
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            let Some((cmd, args)) = step.command.split_first() else {
                let why = format!("step {}: empty command", step.name);
                return failed_unstarted(record, ended, "empty command".into(), why).await;
            };
            let header = format!("\n--- step {}: {} {}\n", step.name, cmd, args.join(" "));
            rb.log.append(header.as_bytes());
            if remaining.is_zero() {
                let msg = format!("build timed out after {:?}", builder.timeout);
                return failed_unstarted(record, ended, msg.clone(), msg).await;
            }
            let step_timeout = step.timeout.min(remaining);
            let (cmd, opts) = step_exec(
                &step.command,
                step,
                step_env(&base_env, step, None),
                step_timeout,
            );
            let mut w = rb.log.stream();
            let step_start = rb.log.len();
            // The build's last step ends with its attempt, in one write.
            let last = i + 1 == builder.steps.len();
            // The machine's last command of the build also empties its work
            // dir (one round trip less) when nothing reads the work dir
            // after it: no result files, no artifacts, no re-run of failed
            // tests, and the machine is cleaned for reuse, not retired.
            let clean = last
                && step.results.is_empty()
                && step.artifacts.is_empty()
                && builder.retry_failed == 0
                && !self.sources.one_lease_per_machine(&main.host_type);
            let t0 = Instant::now();
            let run = async {
                let exec = async {
                    if clean {
                        client.exec_then_clean(&cmd, &opts, &mut w).await
                    } else {
                        let r = client.exec(&cmd, &opts, &mut w).await;
                        r.map(|s| (s, Cleaned::Unknown))
                    }
                };
                tokio::select! {
                    r = exec => Some(r),
                    _ = cancel.wait_for(|c| *c) => None,
                }
            };
            let (recorded, r) = tokio::join!(record, run);
            w.finish();
            match &r {
                Some(Ok((_, Cleaned::Emptied))) => main.emptied = true,
                // Tried again, as always, when the lease ends.
                Some(Ok((_, Cleaned::Failed(why)))) => {
                    tracing::warn!(machine = %main.hostname, "cleaning after the last command: {why}");
                }
                _ => {}
            }
            let r = r.map(|r| r.map(|(state, _)| state));
            // A store that failed to record the step cannot record its end.
            let step_id = match recorded {
                Ok(id) => id,
                Err(o) => return o,
            };
            let ctx = ctx(step_id);
            let took = t0.elapsed();
            let log = rb.log.range_async(step_start, step_start + MAX_LOG).await;
            let end = |result, detail: String, log| StepEnd {
                step_id,
                result,
                detail,
                log,
            };
            let Some(r) = r else {
                *ended = Some(end(
                    RunResult::Cancelled,
                    "cancelled by an admin".into(),
                    log,
                ));
                return Outcome::Cancelled;
            };
            // What the step's tests said (a broken machine says nothing).
            let results = match &r {
                Ok(_) => self.step_results(&ctx, &client, &log).await,
                Err(_) => crate::results::Results::default(),
            };
            let failed: Vec<String> = results.failed().map(|t| t.name.clone()).collect();
            match r {
                Ok(ProcessState::Ok) => {
                    self.keep_artifacts(&ctx, &client).await;
                    let log = rb.log.range_async(step_start, step_start + MAX_LOG).await;
                    self.step_passed(end(RunResult::Passed, String::new(), log), last, ended)
                        .await;
                    rb.log.append(
                        format!(
                            "--- step {} passed in {:.1}s\n",
                            step.name,
                            took.as_secs_f64()
                        )
                        .as_bytes(),
                    );
                }
                Ok(ProcessState::TimedOut(d)) => {
                    let msg = if step_timeout < step.timeout {
                        format!(
                            "build timed out after {:?} (in step {})",
                            builder.timeout, step.name
                        )
                    } else {
                        format!("step {} timed out after {d:?}", step.name)
                    };
                    let log = rb.log.range_async(step_start, step_start + MAX_LOG).await;
                    *ended = Some(end(RunResult::Failed, msg.clone(), log));
                    return Outcome::Failed(msg);
                }
                Ok(state) => {
                    if builder.retry_failed > 0 && !failed.is_empty() {
                        let rerun = self.rerun_failed(&ctx, &client, failed, &mut cancel).await;
                        if let Some(stop) = rerun.end {
                            let (result, detail) = match &stop {
                                Outcome::Cancelled => {
                                    (RunResult::Cancelled, "cancelled by an admin".to_string())
                                }
                                Outcome::Infra(m) => (RunResult::InfraError, m.clone()),
                                _ => (RunResult::Failed, state.to_string()),
                            };
                            let log = rb.log.range_async(step_start, step_start + MAX_LOG).await;
                            *ended = Some(end(result, detail, log));
                            return stop;
                        }
                        if rerun.still_failing.is_empty() && rerun.clean {
                            self.keep_artifacts(&ctx, &client).await;
                            let detail = format!("flaky: {}", rerun::names(&rerun.flaky));
                            let log = rb.log.range_async(step_start, step_start + MAX_LOG).await;
                            let line = format!(
                                "--- step {} passed with flakes ({detail}) in {:.1}s\n",
                                step.name,
                                t0.elapsed().as_secs_f64()
                            );
                            self.step_passed(end(RunResult::Passed, detail, log), last, ended)
                                .await;
                            rb.log.append(line.as_bytes());
                            continue;
                        }
                        let why = if rerun.still_failing.is_empty() {
                            "; its failed tests passed when run again, but the re-run did not pass"
                                .to_string()
                        } else {
                            format!("; failing tests: {}", rerun::names(&rerun.still_failing))
                        };
                        let log = rb.log.range_async(step_start, step_start + MAX_LOG).await;
                        *ended = Some(end(RunResult::Failed, state.to_string(), log));
                        return Outcome::Failed(format!("step {} failed: {state}{why}", step.name));
                    }
                    let why = if failed.is_empty() {
                        String::new()
                    } else {
                        format!("; failing tests: {}", rerun::names(&failed))
                    };
                    let log = rb.log.range_async(step_start, step_start + MAX_LOG).await;
                    *ended = Some(end(RunResult::Failed, state.to_string(), log));
                    return Outcome::Failed(format!("step {} failed: {state}{why}", step.name));
                }
                Err(e) if e.is_communication() => {
                    let msg = format!("step {}: {e}", step.name);
                    *ended = Some(end(RunResult::InfraError, e.to_string(), log));
                    return Outcome::Infra(msg);
                }
                Err(e) => {
                    let msg = format!("step {}: {e}", step.name);
                    *ended = Some(end(RunResult::Failed, e.to_string(), log));
                    return Outcome::Failed(msg);
                }
            }
        }
        Outcome::Passed
    }

    /// A passed step's end: recorded now, or, when it is the build's last
    /// step, left in `ended` for the attempt's end.
    async fn step_passed(&self, end: StepEnd, last: bool, ended: &mut Option<StepEnd>) {
        if last {
            *ended = Some(end);
        } else if let Err(e) = self.store.finish_step(&end).await {
            tracing::error!(step = end.step_id, "recording the step's end: {e}");
        }
    }
}

/// Output of a machine's preparation kept to explain why it failed.
const PREPARE_OUTPUT: usize = 64 << 10;

/// Makes a second machine of a build ready to run a step: pushes the
/// build's source and runs `steps` (the ones before it) there, each within
/// its own timeout and `deadline`. `Err((why, the machine broke))`.
pub(crate) async fn make_ready<'s>(
    farm: &Farm,
    lease: &Lease,
    build: &BuildRow,
    steps: impl Iterator<Item = &'s Step>,
    base_env: &[String],
    source: &source::Source,
    deadline: Instant,
) -> Result<(), (String, bool)> {
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    // Through the machine's source cache, as for the build's own machine.
    let push = farm.push_source(
        &lease.client,
        &lease.hostname,
        &lease.host_type,
        &build.repo,
        &build.commit,
        source,
    );
    match tokio::time::timeout(left(), push).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err((format!("pushing the source: {e}"), e.is_communication())),
        Err(_) => return Err(("pushing the source took until the deadline".into(), false)),
    }
    for step in steps {
        let (cmd, opts) = step_exec(
            &step.command,
            step,
            step_env(base_env, step, None),
            step.timeout.min(left()),
        );
        let mut out = crate::bounded::TailBuffer::new(PREPARE_OUTPUT);
        match lease.client.exec(&cmd, &opts, &mut out).await {
            Ok(ProcessState::Ok) => {}
            Ok(state) => {
                return Err((
                    format!(
                        "step {} failed there: {state}\n{}",
                        step.name,
                        String::from_utf8_lossy(&out.text())
                    ),
                    false,
                ));
            }
            Err(e) => return Err((format!("step {}: {e}", step.name), e.is_communication())),
        }
    }
    Ok(())
}

/// How an admin's rebuild records who asked for it: `rebuild of ID`.
pub const REBUILD_OF: &str = "rebuild of ";

/// Whether a build may receive the farm's secrets: only code the farm
/// chose to build — a watched branch's commits (the poller's builds), and
/// what the admin asked for — never a pull request's (anyone can open one)
/// nor a user's build of a commit of their choosing.
pub(crate) fn gets_secrets(build: &BuildRow) -> bool {
    build.kind != BuildKind::PreSubmit
        && (build.requested_by.is_empty()
            || build.requested_by == crate::auth::ADMIN_USER
            || build.requested_by.starts_with(REBUILD_OF))
}

/// The builder and host with every `secret:NAME` in their environments
/// replaced by its value, for this build only; for a build that may not
/// have secrets ([`gets_secrets`]) those variables are left out. Borrowed
/// as they are when they name no secret. Refused
/// for an untrusted host type (the config check refuses it too; this holds
/// if it is bypassed).
fn with_secrets<'a>(
    builder: &'a BuildConfig,
    host: &'a HostConfig,
    secrets: &crate::secrets::Secrets,
    allowed: bool,
) -> Result<(Cow<'a, BuildConfig>, Cow<'a, HostConfig>), String> {
    let names = |env: &[(String, String)]| {
        env.iter()
            .any(|(_, v)| crate::secrets::reference(v).is_some())
    };
    let any =
        names(&host.env) || names(&builder.env) || builder.steps.iter().any(|s| names(&s.env));
    if !any {
        return Ok((Cow::Borrowed(builder), Cow::Borrowed(host)));
    }
    let mut builder = builder.clone();
    let mut host = host.clone();
    let trusted = host.trusted;
    let host_name = host.name.clone();
    let resolve = |env: &mut Vec<(String, String)>| -> Result<(), String> {
        if !allowed {
            env.retain(|(_, v)| crate::secrets::reference(v).is_none());
            return Ok(());
        }
        for (k, v) in env.iter_mut() {
            if let Some(name) = crate::secrets::reference(v) {
                if !trusted {
                    return Err(format!(
                        "{k} names secret {name:?}, but host type {host_name} is not trusted; secrets are only sent to trusted machines"
                    ));
                }
                *v = secrets
                    .get(name)
                    .map_err(|e| format!("{k}: {e}"))?
                    .to_string();
            }
        }
        Ok(())
    };
    resolve(&mut host.env)?;
    resolve(&mut builder.env)?;
    for step in &mut builder.steps {
        resolve(&mut step.env)?;
    }
    Ok((Cow::Owned(builder), Cow::Owned(host)))
}

/// The environment every step of a build gets: the host's and the
/// builder's variables, then what farmer says about the build.
fn base_env(build: &BuildRow, builder: &BuildConfig, host: &HostConfig) -> Vec<String> {
    let mut env: Vec<String> = Vec::new();
    for (k, v) in host.env.iter().chain(builder.env.iter()) {
        env.push(format!("{k}={v}"));
    }
    env.push(format!("FARMER_BUILDER={}", builder.name));
    env.push(format!("GO_BUILDER_NAME={}", builder.name));
    env.push(format!("FARMER_HOST_TYPE={}", host.name));
    env.push(format!("FARMER_REPO={}", build.repo));
    env.push(format!("FARMER_BRANCH={}", build.branch));
    env.push(format!("FARMER_COMMIT={}", build.commit));
    env.push(format!("FARMER_BUILD_ID={}", build.id));
    env
}

/// A step's environment: the build's, the step's own, and for a unit of a
/// sharded step, `FARMER_UNIT`.
pub(crate) fn step_env(base: &[String], step: &Step, unit: Option<&str>) -> Vec<String> {
    let mut env = base.to_vec();
    env.extend(step.env.iter().map(|(k, v)| format!("{k}={v}")));
    if let Some(u) = unit {
        env.push(format!("FARMER_UNIT={u}"));
    }
    env
}

/// Where a step runs, relative to the work dir.
pub(crate) fn step_dir(step: &Step) -> String {
    match step.dir.as_deref() {
        Some(d) if !d.is_empty() && d != "." => format!("{SRC_DIR}/{d}"),
        _ => SRC_DIR.to_string(),
    }
}

/// How `command` of `step` runs on a buildlet: in the step's directory of
/// the source tree, a relative program path taken from the source tree.
/// `command` must not be empty (the config guarantees it).
pub(crate) fn step_exec(
    command: &[String],
    step: &Step,
    env: Vec<String>,
    timeout: Duration,
) -> (String, ExecOptions) {
    let (cmd, args) = command
        .split_first()
        .map_or(("true", &[][..]), |(c, a)| (c.as_str(), a));
    let dir = step_dir(step);
    let cmd = if cmd.contains('/') && !cmd.starts_with('/') {
        format!("{SRC_DIR}/{}", cmd.trim_start_matches("./"))
    } else {
        cmd.to_string()
    };
    let opts = ExecOptions {
        args: args.to_vec(),
        env,
        dir: Some(dir),
        timeout: Some(timeout),
        ..Default::default()
    };
    (cmd, opts)
}

/// Ends a step that failed before its command started (`detail` on the
/// step, `why` for the build) once its row is written: the attempt's end
/// carries it ([`StepEnd`]).
async fn failed_unstarted(
    record: impl std::future::Future<Output = Result<i64, Outcome>>,
    ended: &mut Option<StepEnd>,
    detail: String,
    why: String,
) -> Outcome {
    let step_id = match record.await {
        Ok(id) => id,
        Err(o) => return o,
    };
    *ended = Some(StepEnd {
        step_id,
        result: RunResult::Failed,
        detail,
        log: Bytes::new(),
    });
    Outcome::Failed(why)
}
