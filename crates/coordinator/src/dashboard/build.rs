//! One build (`/builds/{id}`): what it builds, its attempts and the machine
//! each ran on, its steps with durations and results, and its log: for a
//! finished build the stored log of each step; for a queued or running one,
//! the live log, streamed by `/builds/{id}/events` while it runs (resuming
//! at the byte offset the browser last saw if the stream reconnects). An
//! admin can rebuild or cancel it: the page calls the JSON API with the
//! admin token the admin pasted (kept in the browser's localStorage).

use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::Event;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::util::{date_ms, date_secs, duration_ms, short};
use super::{Layout, PageError, PageResult, html, html_event};
use crate::farm::Farm;
use crate::shard::report::StepReport;
use crate::store::{BuildStatus, RunResult, now_ms};

/// Most of one step's stored log shown on the page (its end: that is where
/// failures are); the raw log link has everything.
const STEP_LOG_SHOWN: usize = 512 << 10;
/// A viewer joining a long live log gets its end only.
const LIVE_TAIL: usize = 1 << 20;
/// Largest piece of log text in one event.
const EVENT_CHUNK: usize = 256 << 10;

pub struct AttemptView {
    pub number: i64,
    pub machine: String,
    pub host_type: String,
    pub started: String,
    pub took: String,
    pub result: String,
    pub error: String,
}

pub struct StepView {
    pub attempt: i64,
    pub number: i64,
    pub name: String,
    pub result: String,
    pub took: String,
    pub detail: String,
    pub log_size: i64,
}

pub struct StepLog {
    pub step_id: i64,
    pub attempt: i64,
    pub name: String,
    pub result: String,
    pub took: String,
    pub open: bool,
    /// The shown lines with their 1-based numbers in the step's log, so
    /// failures can link to them (`#l-STEP-LINE`).
    pub lines: Vec<(usize, String)>,
    /// Bytes left out at the start.
    pub skipped: usize,
}

/// A failing (or flaky) test on the build page.
pub struct FailureView {
    pub name: String,
    pub outcome: String,
    pub step: String,
    pub failure: String,
    /// `#l-STEP-LINE` when the log shows where it failed.
    pub anchor: Option<String>,
    pub line: i64,
}

/// The build's tests: counts and the ones worth reading.
#[derive(Default)]
pub struct TestsView {
    pub total: i64,
    pub passed: i64,
    pub failed: i64,
    pub flaky: i64,
    pub skipped: i64,
    /// Failing first, then flaky; at most [`FAILURES_SHOWN`].
    pub failures: Vec<FailureView>,
}

/// Failing and flaky tests shown with their text on the build page.
const FAILURES_SHOWN: i64 = 50;

pub struct BuildView {
    pub id: i64,
    pub builder: String,
    pub host_type: String,
    pub repo: String,
    pub branch: String,
    pub commit: String,
    pub short: String,
    pub subject: String,
    pub author: String,
    pub commit_date: String,
    pub kind: &'static str,
    pub status: &'static str,
    pub terminal: bool,
    pub created: String,
    pub started: String,
    pub finished: String,
    /// Waiting time before the first attempt.
    pub waited: String,
    /// Running time so far or in total.
    pub ran: String,
    pub error: String,
    /// Machine and step now (running builds).
    pub machine: String,
    pub step: String,
    /// Why it waits and where it is in the queue (queued builds).
    pub wait: String,
    pub attempts: Vec<AttemptView>,
    pub steps: Vec<StepView>,
    /// A running sharded step's progress.
    pub progress: String,
    /// Passed only after re-running failed tests.
    pub flaky: bool,
    pub tests: TestsView,
    /// Where the time of each sharded step went.
    pub shards: Vec<StepReport>,
    /// The files the build kept.
    pub artifacts: Vec<ArtifactView>,
}

/// A file a build kept, with its download link.
pub struct ArtifactView {
    pub name: String,
    pub size: String,
    pub sha256: String,
    pub url: String,
}

async fn load(farm: &Farm, id: i64) -> Result<BuildView, PageError> {
    let b = farm
        .store
        .build(id)
        .await?
        .ok_or_else(|| PageError::NotFound(format!("There is no build {id}.")))?;
    let now = now_ms();
    let commit = farm.store.commit(&b.repo, &b.commit).await?;
    let attempts_rows = farm.store.attempts(id).await?;
    let steps_rows = farm.store.steps(id).await?;
    let rb = farm.running(id);
    let lock = |m: &std::sync::Mutex<String>| m.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let (machine, step, progress) = match (&rb, b.status) {
        (Some(r), BuildStatus::Running) => (lock(&r.machine), lock(&r.step), lock(&r.progress)),
        _ => (String::new(), String::new(), String::new()),
    };
    let shards = crate::shard::report::build(&farm.store.unit_runs(id).await?);
    let tests = tests_view(farm, id, &steps_rows).await?;
    let wait = if b.status == BuildStatus::Queued {
        let pos = farm
            .scheduler
            .position(&b.host_type, &crate::pool::Holder::Build { build_id: id });
        let reason = farm.wait_reason(&b.host_type);
        match pos {
            Some((p, n)) => format!(
                "number {p} of {n} in the queue for {}; {reason}",
                b.host_type
            ),
            None => reason,
        }
    } else {
        String::new()
    };
    let attempt_no = |aid: i64| {
        attempts_rows
            .iter()
            .find(|a| a.id == aid)
            .map_or(0, |a| a.number)
    };
    let artifacts = farm
        .store
        .build_artifacts(id)
        .await?
        .into_iter()
        .map(|f| ArtifactView {
            url: crate::api::artifacts::download_path(id, &f.name),
            size: crate::view::human_bytes(f.size.max(0) as u64),
            name: f.name,
            sha256: f.sha256,
        })
        .collect();
    Ok(BuildView {
        artifacts,
        id,
        short: short(&b.commit).to_string(),
        subject: commit
            .as_ref()
            .map(|c| c.subject.clone())
            .unwrap_or_default(),
        author: commit
            .as_ref()
            .map(|c| c.author.clone())
            .unwrap_or_default(),
        commit_date: commit
            .as_ref()
            .map(|c| date_secs(c.time))
            .unwrap_or_default(),
        kind: b.kind.as_str(),
        status: b.status.as_str(),
        terminal: b.status.is_terminal(),
        created: date_ms(b.created_at),
        started: b.started_at.map(date_ms).unwrap_or_default(),
        finished: b.finished_at.map(date_ms).unwrap_or_default(),
        waited: duration_ms(b.started_at.unwrap_or(now) - b.created_at),
        ran: match (b.started_at, b.finished_at) {
            (Some(s), Some(f)) => duration_ms(f - s),
            (Some(s), None) => duration_ms(now - s),
            _ => String::new(),
        },
        error: b.error.clone(),
        machine,
        step,
        progress,
        flaky: b.flaky,
        tests,
        shards,
        wait,
        attempts: attempts_rows
            .iter()
            .map(|a| AttemptView {
                number: a.number,
                machine: a.machine.clone(),
                host_type: a.host_type.clone(),
                started: date_ms(a.started_at),
                took: duration_ms(a.finished_at.unwrap_or(now) - a.started_at),
                result: a.result.to_string(),
                error: a.error.clone(),
            })
            .collect(),
        steps: steps_rows
            .iter()
            .map(|s| StepView {
                attempt: attempt_no(s.attempt_id),
                number: s.number,
                name: s.name.clone(),
                result: s.result.to_string(),
                took: duration_ms(s.finished_at.unwrap_or(now) - s.started_at),
                detail: s.detail.clone(),
                log_size: s.log_size,
            })
            .collect(),
        builder: b.builder,
        host_type: b.host_type,
        repo: b.repo,
        branch: b.branch,
        commit: b.commit,
    })
}

async fn tests_view(
    farm: &Farm,
    id: i64,
    steps: &[crate::store::StepRow],
) -> Result<TestsView, PageError> {
    let counts = farm.store.build_test_counts(id).await?;
    let n = |k: &str| counts.get(k).copied().unwrap_or(0);
    let rows = if n("fail") + n("flaky") > 0 {
        farm.store.build_tests(id, FAILURES_SHOWN).await?
    } else {
        Vec::new()
    };
    let failures = rows
        .into_iter()
        .filter(|t| t.outcome == "fail" || t.outcome == "flaky")
        .map(|t| FailureView {
            step: steps
                .iter()
                .find(|s| s.id == t.step_id)
                .map(|s| s.name.clone())
                .unwrap_or_default(),
            anchor: t.log_line.map(|l| format!("l-{}-{l}", t.step_id)),
            line: t.log_line.unwrap_or(0),
            name: t.name,
            outcome: t.outcome,
            failure: t.failure,
        })
        .collect();
    Ok(TestsView {
        total: counts.values().sum(),
        passed: n("pass"),
        failed: n("fail"),
        flaky: n("flaky"),
        skipped: n("skip"),
        failures,
    })
}

/// The stored logs of a finished build, step by step.
async fn step_logs(farm: &Farm, v: &BuildView) -> Result<Vec<StepLog>, PageError> {
    let rows = farm.store.steps(v.id).await?;
    let mut out = Vec::new();
    for (s, view) in rows.iter().zip(&v.steps) {
        let log = farm.store.step_log(s.id).await?.unwrap_or_default();
        let mut skipped = log.len().saturating_sub(STEP_LOG_SHOWN);
        // Start on a line (and so on a character) boundary.
        if skipped > 0
            && let Some(nl) = log[skipped..].iter().position(|&c| c == b'\n')
        {
            skipped += nl + 1;
        }
        let first = log[..skipped].iter().filter(|&&b| b == b'\n').count() + 1;
        let text = String::from_utf8_lossy(&log[skipped..]);
        out.push(StepLog {
            step_id: s.id,
            attempt: view.attempt,
            name: s.name.clone(),
            open: s.result != RunResult::Passed,
            result: s.result.to_string(),
            took: view.took.clone(),
            lines: text
                .lines()
                .enumerate()
                .map(|(i, l)| (first + i, l.to_string()))
                .collect(),
            skipped,
        });
    }
    Ok(out)
}

#[derive(Template)]
#[template(path = "build.html")]
struct BuildPage {
    l: Layout,
    v: BuildView,
    logs: Vec<StepLog>,
}

#[derive(Template)]
#[template(path = "build_summary.html")]
struct BuildSummary<'a> {
    v: &'a BuildView,
}

fn parse_id(id: &str) -> Result<i64, PageError> {
    id.parse()
        .map_err(|_| PageError::NotFound(format!("{id:?} is not a build number.")))
}

pub async fn page(State(farm): State<Arc<Farm>>, Path(id): Path<String>) -> PageResult {
    let id = parse_id(&id)?;
    let v = load(&farm, id).await?;
    let logs = if v.terminal {
        step_logs(&farm, &v).await?
    } else {
        Vec::new()
    };
    html(&BuildPage {
        l: Layout::new(format!("Build {id} {} {}", v.builder, v.status), ""),
        v,
        logs,
    })
}

async fn send_summary(farm: &Farm, id: i64, tx: &mpsc::Sender<Event>, last: &mut String) -> bool {
    let Ok(v) = load(farm, id).await else {
        return true;
    };
    let Ok(h) = (BuildSummary { v: &v }).render() else {
        return true;
    };
    if h == *last {
        return true;
    }
    let ok = tx.send(html_event("summary", &h)).await.is_ok();
    *last = h;
    ok
}

/// Takes the longest prefix of `buf` that is whole UTF-8 (invalid bytes
/// become U+FFFD), leaving a split character's first bytes for later.
fn take_text(buf: &mut Vec<u8>) -> String {
    let cut = match std::str::from_utf8(buf) {
        Ok(_) => buf.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => buf.len(),
    };
    let rest = buf.split_off(cut);
    let text = String::from_utf8_lossy(buf).into_owned();
    *buf = rest;
    text
}

fn log_event(text: &str, offset: usize) -> Event {
    Event::default()
        .event("log")
        .id(offset.to_string())
        .data(serde_json::Value::from(text).to_string())
}

/// The live build: `summary` (status, attempts, steps) when it changes,
/// `log` text as it arrives (event id = byte offset), `end` when done.
pub async fn events(
    State(farm): State<Arc<Farm>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> axum::response::Response {
    let id = id.parse::<i64>().unwrap_or(-1);
    // A reconnecting browser says how far it got.
    let resume: usize = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    super::event_stream(move |tx| async move {
        let _ = tx
            .send(Event::default().retry(Duration::from_secs(1)))
            .await;
        let mut summary = String::new();
        // Wait for the build to run (or to be over).
        let rb = loop {
            match farm.store.build(id).await {
                Ok(Some(b)) if b.status.is_terminal() => {
                    send_summary(&farm, id, &tx, &mut summary).await;
                    let _ = tx.send(Event::default().event("end").data("done")).await;
                    return;
                }
                Ok(Some(_)) => {}
                _ => {
                    let _ = tx.send(Event::default().event("end").data("done")).await;
                    return;
                }
            }
            if let Some(rb) = farm.running(id) {
                break rb;
            }
            if !send_summary(&farm, id, &tx, &mut summary).await
                || !super::tick(&tx, Duration::from_millis(300)).await
            {
                return;
            }
        };
        if !send_summary(&farm, id, &tx, &mut summary).await {
            return;
        }
        let mut log = Box::pin(rb.log.clone().follow());
        drop(rb);
        let mut read = 0usize; // bytes of the log read so far
        let mut sent = resume; // bytes of the log the viewer has
        let mut carry: Vec<u8> = Vec::new();
        let mut first = true;
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = every.tick() => {
                    if !send_summary(&farm, id, &tx, &mut summary).await {
                        return;
                    }
                }
                chunk = log.next() => {
                    let Some(chunk) = chunk else { break };
                    let start = read;
                    read += chunk.len();
                    if read <= sent {
                        continue;
                    }
                    let mut new = &chunk[sent.saturating_sub(start)..];
                    if first && sent == 0 && new.len() > LIVE_TAIL {
                        let mut skip = new.len() - LIVE_TAIL;
                        if let Some(nl) = new[skip..].iter().position(|&c| c == b'\n') {
                            skip += nl + 1;
                        }
                        let note = format!("[farmer: the first {skip} bytes of this log are not shown here; the raw log has them]\n");
                        if tx.send(log_event(&note, sent)).await.is_err() {
                            return;
                        }
                        new = &new[skip..];
                        sent += skip;
                    }
                    first = false;
                    for piece in new.chunks(EVENT_CHUNK) {
                        carry.extend_from_slice(piece);
                        sent += piece.len();
                        let text = take_text(&mut carry);
                        if !text.is_empty() && tx.send(log_event(&text, sent - carry.len())).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
        if !carry.is_empty() {
            let text = String::from_utf8_lossy(&carry).into_owned();
            let _ = tx.send(log_event(&text, sent)).await;
        }
        // The log ends after the final status is stored.
        send_summary(&farm, id, &tx, &mut summary).await;
        let _ = tx.send(Event::default().event("end").data("done")).await;
    })
}

#[cfg(test)]
mod tests {
    use super::take_text;

    #[test]
    fn split_characters_wait_for_their_end() {
        let mut b = "héllo".as_bytes().to_vec();
        let tail = b.split_off(2); // inside the é
        let mut buf = b;
        assert_eq!(take_text(&mut buf), "h");
        buf.extend_from_slice(&tail);
        assert_eq!(take_text(&mut buf), "éllo");
        assert!(buf.is_empty());
        let mut bad = vec![b'a', 0xff, b'b'];
        assert_eq!(take_text(&mut bad), "a\u{fffd}b");
    }
}
