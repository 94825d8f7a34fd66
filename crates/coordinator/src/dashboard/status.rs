//! Farm status (`/status`): uptime and version, health lines, scheduler
//! state per host type with why work waits, the pools (summary and machine
//! detail), machines that went away, refused registrations, and active,
//! pending and recently finished builds. `/status/events` re-renders the
//! page body every two seconds while someone looks.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use axum::extract::State;

use super::util::{BuildLine, date_ms, since};
use super::{Layout, PageError, PageResult, html, html_event};
use crate::farm::Farm;
use crate::store::{BuildFilter, BuildStatus, now_ms};

/// Finished builds listed.
const RECENT: usize = 30;
/// Queued and running builds listed.
const LISTED: i64 = 100;

pub struct HealthView {
    pub level: &'static str,
    pub host_type: String,
    pub message: String,
}

pub struct QueueView {
    pub host_type: String,
    pub waiting: usize,
    pub by_kind: String,
    pub oldest: String,
    pub reason: String,
}

pub struct PoolView {
    pub host_type: String,
    pub kind: &'static str,
    pub connected: u32,
    pub busy: u32,
    pub expected: u32,
    pub missing: u32,
}

pub struct MachineLine {
    pub hostname: String,
    pub host_type: String,
    pub addr: String,
    pub version: u32,
    pub build: String,
    /// Which buildlet binary it runs (release label, else a digest prefix)
    /// and how that compares with the current release (`current`,
    /// `outdated`, `upgrading`, `stuck`, `not-managed`, ...).
    pub binary: String,
    pub binary_status: String,
    pub connected_for: String,
    pub connected_at: String,
    /// `idle`, `working`, `leased` or `cleaning`.
    pub state: &'static str,
    pub build_id: i64,
    /// What it works on: builder and step.
    pub work: String,
    pub state_for: String,
}

pub struct GoneLine {
    pub hostname: String,
    pub host_type: String,
    pub addr: String,
    pub last_seen: String,
    pub last_seen_at: String,
}

/// One exec pool's line: its machines by state and failures by reason.
pub struct ElasticLine {
    pub host_type: String,
    pub starting: usize,
    pub running: usize,
    pub destroying: usize,
    pub created: u64,
    pub destroyed: u64,
    /// `reason: n, ...`
    pub failures: String,
    pub describe: String,
}

/// A recent failure of an exec pool's machine.
pub struct ExecFailureLine {
    pub ago: String,
    pub at: String,
    pub host_type: String,
    pub hostname: String,
    pub reason: String,
    pub detail: String,
}

pub struct RefusalLine {
    pub ago: String,
    pub at: String,
    pub host_type: String,
    pub hostname: String,
    pub addr: String,
    pub reason: String,
}

pub struct StatusView {
    pub version: &'static str,
    /// Leader or standby, with the leader and since when (PostgreSQL
    /// stores, which several coordinators can share); empty on SQLite.
    pub role: String,
    pub uptime: String,
    pub started: String,
    pub running: usize,
    pub queued: usize,
    pub connected: usize,
    pub expected: u32,
    pub health: Vec<HealthView>,
    pub queues: Vec<QueueView>,
    pub pools: Vec<PoolView>,
    pub machines: Vec<MachineLine>,
    /// Connected machines not on the current buildlet release.
    pub outdated: usize,
    pub gone: Vec<GoneLine>,
    /// Machines seen before and not connected beyond those in `gone`.
    pub gone_more: usize,
    pub refusals: Vec<RefusalLine>,
    pub elastic: Vec<ElasticLine>,
    pub exec_failures: Vec<ExecFailureLine>,
    pub active: Vec<BuildLine>,
    pub pending: Vec<BuildLine>,
    pub recent: Vec<BuildLine>,
}

/// Machines seen before and not connected that the status page lists.
const GONE_LISTED: usize = 50;

/// "leader since …" or "standby; the leader is … since …".
async fn role(farm: &Farm) -> Result<String, PageError> {
    if farm.store.engine() != crate::store::Engine::Postgres {
        return Ok(String::new());
    }
    let leader = farm.store.leader().await?;
    Ok(match (farm.leading(), leader) {
        (true, Some(l)) => format!("leader since {}", date_ms(l.since)),
        (true, None) => "leader".into(),
        (false, Some(l)) => format!(
            "standby; the leader is {} since {}",
            l.addr,
            date_ms(l.since)
        ),
        (false, None) => "standby; no coordinator leads at this moment".into(),
    })
}

pub async fn load(farm: &Farm) -> Result<StatusView, PageError> {
    let cfg = farm.config();
    let now = now_ms();
    let snapshot = farm.pool.snapshot();
    let counts = farm.pool.counts();
    let running_builds = farm.running_builds();

    let seen = farm.store.machines().await?;
    let health = crate::view::health(farm, &seen)
        .into_iter()
        .map(|h| HealthView {
            level: h.level,
            host_type: h.host_type,
            message: h.message,
        })
        .collect();

    let queues = farm
        .scheduler
        .views(0)
        .into_iter()
        .map(|q| QueueView {
            reason: farm.wait_reason(&q.host_type),
            by_kind: q
                .by_kind
                .iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect::<Vec<_>>()
                .join(", "),
            oldest: super::util::duration_ms((q.oldest_wait_secs * 1000.0) as i64),
            waiting: q.waiting,
            host_type: q.host_type,
        })
        .collect();

    let pools = cfg
        .hosts
        .values()
        .map(|h| {
            let c = counts.get(&h.name).copied().unwrap_or_default();
            PoolView {
                host_type: h.name.clone(),
                kind: h.pool.as_str(),
                connected: c.connected,
                busy: c.busy,
                expected: h.expected,
                missing: h.expected.saturating_sub(c.connected),
            }
        })
        .collect();

    // Running builds, for the builder and step of busy machines.
    let running_rows = farm
        .store
        .builds(&BuildFilter {
            status: Some(BuildStatus::Running),
            limit: LISTED,
            ..Default::default()
        })
        .await?;
    let by_id: HashMap<i64, &crate::store::BuildRow> =
        running_rows.iter().map(|b| (b.id, b)).collect();
    let step_of = |id: i64| {
        running_builds
            .iter()
            .find(|r| r.build_id == id)
            .map(|r| r.step.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default()
    };

    let machines: Vec<MachineLine> = snapshot
        .iter()
        .map(|m| {
            let work = match m.state.build_id() {
                Some(b) => {
                    let step = step_of(b);
                    let builder = by_id.get(&b).map(|r| r.builder.clone()).unwrap_or_default();
                    match (builder.is_empty(), step.is_empty()) {
                        (false, false) => format!("{builder}, step {step}"),
                        (false, true) => builder,
                        (true, false) => format!("step {step}"),
                        (true, true) => String::new(),
                    }
                }
                None => super::machines::lease_text(farm, m),
            };
            super::machines::machine_line(m, now, work)
        })
        .collect();

    let connected_names: std::collections::HashSet<&str> =
        snapshot.iter().map(|m| m.hostname.as_str()).collect();
    let mut gone: Vec<_> = seen
        .into_iter()
        .filter(|m| !connected_names.contains(m.hostname.as_str()))
        .collect();
    // The most recently seen first; a page lists a screenful and counts
    // the rest (the history holds up to a thousand machines).
    gone.sort_by_key(|m| std::cmp::Reverse(m.last_seen));
    let gone_more = gone.len().saturating_sub(GONE_LISTED);
    gone.truncate(GONE_LISTED);
    let gone = gone
        .into_iter()
        .map(|m| GoneLine {
            last_seen: since(m.last_seen, now),
            last_seen_at: date_ms(m.last_seen),
            hostname: m.hostname,
            host_type: m.host_type,
            addr: m.addr,
        })
        .collect();

    let refusals = farm
        .pool
        .recent_refusals()
        .into_iter()
        .take(20)
        .map(|r| RefusalLine {
            ago: since(r.at, now),
            at: date_ms(r.at),
            host_type: r.host_type,
            hostname: r.hostname,
            addr: r.addr,
            reason: r.reason,
        })
        .collect();

    let sources: Vec<_> = farm
        .sources
        .views()
        .into_iter()
        .filter(|v| v.kind == "exec")
        .collect();
    let count = |v: &crate::sources::SourceView, states: &[&str]| {
        v.instances
            .iter()
            .filter(|i| states.contains(&i.state.as_str()))
            .count()
    };
    let elastic = sources
        .iter()
        .map(|v| ElasticLine {
            host_type: v.host_type.clone(),
            starting: count(v, &["creating", "registering"]),
            running: count(v, &["registered"]),
            destroying: count(v, &["destroying"]),
            created: v.created,
            destroyed: v.destroyed,
            failures: v
                .failures
                .iter()
                .map(|(r, n)| format!("{r}: {n}"))
                .collect::<Vec<_>>()
                .join(", "),
            describe: farm.sources.describe(&v.host_type).unwrap_or_default(),
        })
        .collect();
    let mut exec_failures: Vec<ExecFailureLine> = sources
        .iter()
        .flat_map(|v| {
            v.recent_failures.iter().map(|f| ExecFailureLine {
                ago: since(f.at, now),
                at: date_ms(f.at),
                host_type: v.host_type.clone(),
                hostname: f.hostname.clone(),
                reason: f.reason.clone(),
                detail: f.detail.clone(),
            })
        })
        .collect();
    exec_failures.sort_by(|a, b| b.at.cmp(&a.at));
    exec_failures.truncate(20);

    let active: Vec<BuildLine> = running_rows
        .iter()
        .map(|b| {
            let mut l = BuildLine::new(b, now);
            if let Some(rb) = running_builds.iter().find(|r| r.build_id == b.id) {
                l.machine = rb.machine.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let step = rb.step.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if !step.is_empty() {
                    l.detail = format!("step {step}");
                }
            }
            l
        })
        .collect();

    let queued_rows = farm
        .store
        .builds(&BuildFilter {
            status: Some(BuildStatus::Queued),
            limit: LISTED,
            ..Default::default()
        })
        .await?;
    let mut reasons: HashMap<String, String> = HashMap::new();
    let mut pending: Vec<BuildLine> = queued_rows
        .iter()
        .map(|b| {
            let mut l = BuildLine::new(b, now);
            l.detail = reasons
                .entry(b.host_type.clone())
                .or_insert_with(|| farm.wait_reason(&b.host_type))
                .clone();
            l
        })
        .collect();
    pending.reverse(); // oldest first: the order they have waited

    let mut finished = Vec::new();
    for s in [
        BuildStatus::Passed,
        BuildStatus::Failed,
        BuildStatus::InfraError,
        BuildStatus::Cancelled,
    ] {
        finished.extend(
            farm.store
                .builds(&BuildFilter {
                    status: Some(s),
                    limit: RECENT as i64,
                    ..Default::default()
                })
                .await?,
        );
    }
    finished.sort_by_key(|b| std::cmp::Reverse((b.finished_at.unwrap_or(0), b.id)));
    finished.truncate(RECENT);
    let recent = finished.iter().map(|b| BuildLine::new(b, now)).collect();

    let queued = farm.scheduler.views(0).iter().map(|q| q.waiting).sum();
    Ok(StatusView {
        version: env!("CARGO_PKG_VERSION"),
        role: role(farm).await?,
        uptime: since(farm.started_ms, now),
        started: date_ms(farm.started_ms),
        running: running_builds.len(),
        queued,
        connected: snapshot.len(),
        expected: cfg.hosts.values().map(|h| h.expected).sum(),
        health,
        queues,
        pools,
        outdated: snapshot.iter().filter(|m| m.binary.is_outdated()).count(),
        machines,
        gone,
        gone_more,
        refusals,
        elastic,
        exec_failures,
        active,
        pending,
        recent,
    })
}

#[derive(Template)]
#[template(path = "status.html")]
struct StatusPage {
    l: Layout,
    s: StatusView,
    /// Queue waits and machines over the last hours.
    charts: Vec<NamedChart>,
}

/// A chart of the status page.
struct NamedChart {
    title: &'static str,
    id: &'static str,
    unit: &'static str,
    c: super::chart::LineChart,
}

#[derive(Template)]
#[template(path = "status_live.html")]
struct StatusLive {
    s: StatusView,
}

pub async fn page(State(farm): State<Arc<Farm>>) -> PageResult {
    // The charts end at now (a point drawn, not kept: page views do not
    // shorten the hours the samples cover).
    let now = farm.current();
    html(&StatusPage {
        l: Layout::new("Farm status", "status"),
        s: load(&farm).await?,
        charts: vec![
            NamedChart {
                title: "Oldest queue wait per host type",
                id: "wait-chart",
                unit: "s",
                c: super::chart::lines(farm.history.series(Some(&now), |h| h.oldest_wait_secs)),
            },
            NamedChart {
                title: "Machines connected per host type",
                id: "machines-chart",
                unit: "",
                c: super::chart::lines(farm.history.series(Some(&now), |h| h.connected as f64)),
            },
        ],
    })
}

/// Live status: the page body, re-rendered every two seconds.
pub async fn events(State(farm): State<Arc<Farm>>) -> axum::response::Response {
    super::event_stream(move |tx| async move {
        let mut last = String::new();
        loop {
            if !super::tick(&tx, Duration::from_secs(2)).await {
                return;
            }
            let Ok(s) = load(&farm).await else { continue };
            let Ok(body) = (StatusLive { s }).render() else {
                continue;
            };
            if body != last {
                if tx.send(html_event("status-live", &body)).await.is_err() {
                    return;
                }
                last = body;
            }
        }
    })
}
