//! After a step ran: its test results (read, summarised in the log and
//! stored) and, when the builder allows it (`retry_failed = N`), re-runs of
//! the step for the tests that failed, on another machine of the host type
//! when one is free right away (else on the build's own). A test that
//! fails and then passes is flaky; a step whose failed tests all pass when
//! run again passes, and its build shows "passed with flakes".
//!
//! The re-run runs the step's own command again with
//! `FARMER_RETRY_TESTS` (the failed tests' names, one per line) and
//! `FARMER_RETRY` (1, 2, ...), so a step can narrow itself down (`go test
//! -run`, `cargo test -- --exact`); a step that ignores them runs whole.

use std::sync::Arc;
use std::time::{Duration, Instant};

use buildlet::client::Client;
use buildlet::proto::ProcessState;
use tokio::sync::watch;

use super::{make_ready, priority, step_dir, step_env, step_exec};
use crate::config::{BuildConfig, Step};
use crate::farm::{Farm, RunningBuild};
use crate::logs::MAX_LOG;
use crate::pool::{Holder, Lease};
use crate::results::collect::collect;
use crate::results::{Outcome, Results};
use crate::scheduler::LeaseRequest;
use crate::store::{BuildRow, TestsOf};

/// How long a re-run waits for a free machine before using the build's own.
const SPARE_WAIT: Duration = Duration::from_millis(300);
/// Failed tests named in one log line.
const NAMES_SHOWN: usize = 10;

/// A step of a running build: what reading its results, re-running it and
/// sharding it need.
pub(crate) struct StepCtx<'a> {
    pub build: &'a BuildRow,
    pub builder: &'a BuildConfig,
    pub step: &'a Step,
    /// The step's place in the builder's steps (earlier ones run on a
    /// second machine before it).
    pub index: usize,
    pub step_id: i64,
    pub attempt_id: i64,
    pub base_env: &'a [String],
    /// The build's source, pushed to a second machine.
    pub source: std::sync::Arc<super::source::Source>,
    /// The build's deadline.
    pub deadline: Instant,
    pub rb: &'a RunningBuild,
}

/// What re-running a step's failed tests found.
pub(crate) struct Rerun {
    /// Failed first, passed when run again.
    pub flaky: Vec<String>,
    /// Not seen passing in any re-run.
    pub still_failing: Vec<String>,
    /// The last re-run exited cleanly and reported no failing test: with
    /// nothing still failing, the step passes (with flakes).
    pub clean: bool,
    /// The re-runs ended the build: its machine broke (`Infra`) or it was
    /// cancelled.
    pub end: Option<super::Outcome>,
}

/// Most bytes of test names `FARMER_RETRY_TESTS` carries: one environment
/// string must stay well under the kernel's 128 KiB.
const RETRY_NAMES_MAX: usize = 64 << 10;

impl StepCtx<'_> {
    pub(crate) fn log(&self, text: &str) {
        self.rb.log.append(text.as_bytes());
    }

    /// Where this step's test results belong.
    pub(crate) fn tests_of(&self) -> TestsOf {
        TestsOf {
            build_id: self.build.id,
            attempt_id: self.attempt_id,
            step_id: self.step_id,
            builder: self.builder.name.clone(),
            repo: self.build.repo.clone(),
            commit: self.build.commit.clone(),
            commit_time: self.build.commit_time,
        }
    }
}

/// "a, b, c and 4 more".
pub(crate) fn names(list: &[String]) -> String {
    let shown: Vec<&str> = list.iter().take(NAMES_SHOWN).map(String::as_str).collect();
    let mut s = shown.join(", ");
    if list.len() > NAMES_SHOWN {
        s.push_str(&format!(" and {} more", list.len() - NAMES_SHOWN));
    }
    s
}

impl Farm {
    /// Reads a step's results (its output `log`, its result files on the
    /// machine), says in the log what was found, and stores them.
    pub(crate) async fn step_results(
        &self,
        ctx: &StepCtx<'_>,
        client: &Client,
        log: &[u8],
    ) -> Results {
        let r = collect(
            client,
            &step_dir(ctx.step),
            &ctx.step.results,
            log,
            &ctx.rb.log.mask(),
        )
        .await;
        for p in &r.problems {
            ctx.log(&format!("farmer: results: {p}\n"));
        }
        if !r.tests.is_empty() {
            let count = |o: Outcome| r.tests.iter().filter(|t| t.outcome == o).count();
            let failed: Vec<String> = r.failed().map(|t| t.name.clone()).collect();
            ctx.log(&format!(
                "farmer: {} tests: {} passed, {} failed, {} skipped{}\n",
                r.tests.len(),
                count(Outcome::Pass),
                failed.len(),
                count(Outcome::Skip),
                if failed.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", names(&failed))
                }
            ));
            if let Err(e) = self.store.record_tests(&ctx.tests_of(), &r.tests).await {
                tracing::warn!(build = ctx.build.id, "recording test results: {e}");
            }
        }
        r
    }

    /// Re-runs a failed step for its `failed` tests, up to the builder's
    /// `retry_failed` times, until they all pass. Marks the ones that
    /// passed as flaky in the store.
    pub(crate) async fn rerun_failed(
        self: &Arc<Self>,
        ctx: &StepCtx<'_>,
        own: &Client,
        failed: Vec<String>,
        cancel: &mut watch::Receiver<bool>,
    ) -> Rerun {
        let mut still = failed.clone();
        let mut clean = false;
        let mut end = None;
        let max = ctx.builder.retry_failed;
        for n in 1..=max {
            if *cancel.borrow() {
                end = Some(super::Outcome::Cancelled);
                break;
            }
            if Instant::now() >= ctx.deadline {
                break;
            }
            let spare = self.spare_machine(ctx).await;
            let (client, on) = match &spare {
                Some(l) => (l.client.clone(), l.hostname.clone()),
                None => (own.clone(), "the build's own machine".to_string()),
            };
            ctx.log(&format!(
                "\n--- step {}: re-run {n} of {max} on {on} for {} failed test{}: {}\n",
                ctx.step.name,
                still.len(),
                if still.len() == 1 { "" } else { "s" },
                names(&still)
            ));
            let mut env = step_env(ctx.base_env, ctx.step, None);
            env.push(format!("FARMER_RETRY_TESTS={}", retry_names(&still)));
            env.push(format!("FARMER_RETRY={n}"));
            let left = ctx.deadline.saturating_duration_since(Instant::now());
            let (cmd, opts) = step_exec(
                &ctx.step.command,
                ctx.step,
                env,
                ctx.step.timeout.min(left).max(Duration::from_millis(1)),
            );
            let from = ctx.rb.log.len();
            let mut w = ctx.rb.log.stream();
            let r = tokio::select! {
                r = client.exec(&cmd, &opts, &mut w) => Some(r),
                _ = cancel.wait_for(|c| *c) => None,
            };
            w.finish();
            let out = ctx.rb.log.range_async(from, from + MAX_LOG).await;
            let state = match r {
                None => {
                    give_back(self, spare);
                    end = Some(super::Outcome::Cancelled);
                    break;
                }
                Some(Ok(s)) => Some(s),
                Some(Err(e)) => {
                    ctx.log(&format!("farmer: re-run {n}: {e}\n"));
                    if e.is_communication() {
                        match &spare {
                            Some(l) => {
                                self.pool
                                    .remove(l.id, &format!("broke re-running tests: {e}"));
                            }
                            // The build's own machine broke: the build goes
                            // elsewhere, as any build whose machine broke.
                            None => {
                                end = Some(super::Outcome::Infra(format!(
                                    "step {} (re-run {n}): {e}",
                                    ctx.step.name
                                )));
                                break;
                            }
                        }
                    }
                    None
                }
            };
            let results = match &state {
                Some(_) => {
                    collect(
                        &client,
                        &step_dir(ctx.step),
                        &ctx.step.results,
                        &out,
                        &ctx.rb.log.mask(),
                    )
                    .await
                }
                None => Results::default(),
            };
            give_back(self, spare);
            let exit_ok = state == Some(ProcessState::Ok);
            // Only a reported pass clears a test: one the re-run did not
            // run (a filter that matched nothing) or skipped did not pass.
            let passed: std::collections::HashSet<&str> = results
                .tests
                .iter()
                .filter(|t| t.outcome == Outcome::Pass)
                .map(|t| t.name.as_str())
                .collect();
            clean = exit_ok && results.failed().next().is_none();
            let before = still.len();
            still.retain(|name| !passed.contains(name.as_str()));
            ctx.log(&format!(
                "farmer: re-run {n}: {} of {before} now pass{}\n",
                before - still.len(),
                if still.is_empty() {
                    String::new()
                } else {
                    format!("; still failing: {}", names(&still))
                }
            ));
            if still.is_empty() && clean {
                break;
            }
        }
        let still_set: std::collections::HashSet<&String> = still.iter().collect();
        let flaky: Vec<String> = failed
            .iter()
            .filter(|f| !still_set.contains(f))
            .cloned()
            .collect();
        if !flaky.is_empty() {
            if let Err(e) = self.store.mark_flaky(ctx.step_id, &flaky).await {
                tracing::warn!(build = ctx.build.id, "recording flaky tests: {e}");
            }
            self.metrics
                .flaky_tests(&ctx.builder.name, flaky.len() as u64);
            ctx.rb
                .flaky
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(flaky.iter().cloned());
        }
        Rerun {
            flaky,
            still_failing: still,
            clean,
            end,
        }
    }

    /// Another machine of the build's host type, free right now and made
    /// ready for the step; `None` when there is none (or it could not be
    /// made ready).
    async fn spare_machine(self: &Arc<Self>, ctx: &StepCtx<'_>) -> Option<Lease> {
        let mut ticket = self.scheduler.request(LeaseRequest {
            host_type: ctx.build.host_type.clone(),
            priority: priority(ctx.build.kind),
            holder: Holder::Helper {
                build_id: ctx.build.id,
            },
            commit_time: ctx.build.commit_time,
        });
        // Dropping the ticket on time-out withdraws the request.
        let lease = tokio::time::timeout(SPARE_WAIT, ticket.lease())
            .await
            .ok()?
            .ok()?;
        drop(ticket);
        let steps = ctx.builder.steps[..ctx.index]
            .iter()
            .filter(|s| s.shard.is_none());
        match make_ready(
            self,
            &lease,
            ctx.build,
            steps,
            ctx.base_env,
            &ctx.source,
            ctx.deadline,
        )
        .await
        {
            Ok(()) => Some(lease),
            Err((why, broken)) => {
                ctx.log(&format!(
                    "farmer: {} could not be made ready for the re-run: {why}\n",
                    lease.hostname
                ));
                if broken {
                    self.pool
                        .remove(lease.id, &format!("broke preparing a re-run: {why}"));
                } else {
                    give_back(self, Some(lease));
                }
                None
            }
        }
    }
}

/// The names for `FARMER_RETRY_TESTS`, one per line, as many as fit in
/// [`RETRY_NAMES_MAX`] bytes.
fn retry_names(names: &[String]) -> String {
    let mut out = String::new();
    for n in names {
        if out.len() + n.len() + 1 > RETRY_NAMES_MAX {
            break;
        }
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(n);
    }
    out
}

/// Gives a spare machine back, cleaned, on its own task.
fn give_back(farm: &Arc<Farm>, lease: Option<Lease>) {
    if let Some(l) = lease {
        let farm = farm.clone();
        tokio::spawn(async move { farm.end_lease(l).await });
    }
}
