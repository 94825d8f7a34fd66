//! Builders (`/builders`): build configs at the top, host configs at the
//! bottom, with owners, notes, pool kind and expected machine counts.
//! `?mode=json` gives the same data as JSON: `{"builders": {NAME: ...},
//! "hosts": {HOST_TYPE: ...}}`.

use std::collections::BTreeMap;
use std::sync::Arc;

use askama::Template;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};

use super::util::duration_ms;
use super::{Layout, PageResult, html, json};
use crate::farm::Farm;

#[derive(Serialize)]
pub struct StepView {
    pub name: String,
    pub command: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    pub timeout_secs: u64,
    #[serde(skip)]
    pub timeout: String,
    /// "sharded, N helpers" for a sharded step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sharded: Option<String>,
}

#[derive(Serialize)]
pub struct BuilderView {
    pub name: String,
    pub host_type: String,
    pub os: String,
    pub arch: String,
    /// Empty: every repo.
    pub repos: Vec<String>,
    /// Empty: every watched branch.
    pub branches: Vec<String>,
    pub presubmit: bool,
    pub timeout_secs: u64,
    #[serde(skip)]
    pub timeout: String,
    pub steps: Vec<StepView>,
    /// The host type's owners.
    pub owners: Vec<String>,
    pub notes: String,
}

#[derive(Serialize)]
pub struct HostView {
    pub name: String,
    pub pool: &'static str,
    pub expected: u32,
    pub connected: u32,
    pub busy: u32,
    pub trusted: bool,
    pub owners: Vec<String>,
    pub notes: String,
    pub dimensions: BTreeMap<String, String>,
    /// Builders running on this host type.
    pub builders: Vec<String>,
    /// Who may lease these machines with gomote (the owner's rule, in words).
    pub gomote: String,
}

impl HostView {
    pub fn dims(&self) -> String {
        self.dimensions
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[derive(Serialize)]
pub struct BuildersView {
    pub builders: BTreeMap<String, BuilderView>,
    pub hosts: BTreeMap<String, HostView>,
    /// The watched repos, each with its page (`/repos/NAME`).
    pub repos: Vec<String>,
}

pub fn load(farm: &Farm) -> BuildersView {
    let cfg = farm.config();
    let counts = farm.pool.counts();
    let cols = super::grid::columns(&cfg, "", "");
    let builders = cfg
        .builders
        .values()
        .map(|b| {
            let host = cfg.hosts.get(&b.host_type);
            let col = cols.iter().find(|c| c.name == b.name);
            (
                b.name.clone(),
                BuilderView {
                    name: b.name.clone(),
                    host_type: b.host_type.clone(),
                    os: col.map(|c| c.os.clone()).unwrap_or_default(),
                    arch: col.map(|c| c.arch.clone()).unwrap_or_default(),
                    repos: b.repos.clone(),
                    branches: b.branches.clone(),
                    presubmit: b.presubmit,
                    timeout_secs: b.timeout.as_secs(),
                    timeout: duration_ms(b.timeout.as_millis() as i64),
                    steps: b
                        .steps
                        .iter()
                        .map(|s| StepView {
                            name: s.name.clone(),
                            // A sharded step shows how one unit runs.
                            command: match &s.shard {
                                Some(sh) => sh.run.clone(),
                                None => s.command.clone(),
                            },
                            sharded: s
                                .shard
                                .as_ref()
                                .map(|sh| format!("sharded, {} helpers", sh.helpers)),
                            dir: s.dir.clone(),
                            timeout_secs: s.timeout.as_secs(),
                            timeout: duration_ms(s.timeout.as_millis() as i64),
                        })
                        .collect(),
                    owners: host.map(|h| h.owners.clone()).unwrap_or_default(),
                    notes: b.notes.clone(),
                },
            )
        })
        .collect();
    let hosts = cfg
        .hosts
        .values()
        .map(|h| {
            let c = counts.get(&h.name).copied().unwrap_or_default();
            (
                h.name.clone(),
                HostView {
                    name: h.name.clone(),
                    pool: h.pool.as_str(),
                    expected: h.expected,
                    connected: c.connected,
                    busy: c.busy,
                    trusted: h.trusted,
                    gomote: h.gomote.describe(),
                    owners: h.owners.clone(),
                    notes: h.notes.clone(),
                    dimensions: h.dimensions.clone(),
                    builders: cfg
                        .builders
                        .values()
                        .filter(|b| b.host_type == h.name)
                        .map(|b| b.name.clone())
                        .collect(),
                },
            )
        })
        .collect();
    BuildersView {
        builders,
        hosts,
        repos: cfg.repos.keys().cloned().collect(),
    }
}

#[derive(Deserialize)]
pub struct ModeQuery {
    mode: Option<String>,
}

#[derive(Template)]
#[template(path = "builders.html")]
struct BuildersPage {
    l: Layout,
    v: BuildersView,
}

pub async fn page(State(farm): State<Arc<Farm>>, Query(q): Query<ModeQuery>) -> PageResult {
    let v = load(&farm);
    if q.mode.as_deref() == Some("json") {
        return json(&v);
    }
    html(&BuildersPage {
        l: Layout::new("Builders", "builders"),
        v,
    })
}

/// Builds a builder's page charts: its newest ones, at most this many.
const CHARTED: i64 = 100;

/// One builder (`/builders/{name}`): its config, the duration of its last
/// [`CHARTED`] builds as a chart (failures marked), and those builds.
#[derive(Serialize)]
pub struct BuilderPageView {
    pub name: String,
    pub builder: Option<BuilderView>,
    pub chart: super::chart::BarChart,
    /// Median duration of the charted builds, ms.
    pub median_ms: i64,
    pub passed: usize,
    pub failed: usize,
    pub flaky: usize,
    #[serde(skip)]
    pub builds: Vec<super::util::BuildLine>,
}

#[derive(Template)]
#[template(path = "builder.html")]
struct BuilderPage {
    l: Layout,
    v: BuilderPageView,
}

pub async fn builder_page(
    State(farm): State<Arc<Farm>>,
    axum::extract::Path(name): axum::extract::Path<String>,
    Query(q): Query<ModeQuery>,
) -> PageResult {
    let mut all = load(&farm);
    let builder = all.builders.remove(&name);
    let rows = farm
        .store
        .builds(&crate::store::BuildFilter {
            builder: Some(name.clone()),
            limit: CHARTED,
            ..Default::default()
        })
        .await?;
    if builder.is_none() && rows.is_empty() {
        return Err(super::PageError::NotFound(format!(
            "There is no builder {name:?} in the config, and no build of one."
        )));
    }
    let finished: Vec<&crate::store::BuildRow> = rows
        .iter()
        .rev()
        .filter(|b| b.status.is_terminal() && b.started_at.is_some() && b.finished_at.is_some())
        .collect();
    let took = |b: &crate::store::BuildRow| b.finished_at.unwrap_or(0) - b.started_at.unwrap_or(0);
    let mut durations: Vec<i64> = finished.iter().map(|b| took(b)).collect();
    durations.sort_unstable();
    let chart = super::chart::bars(
        finished
            .iter()
            .map(|b| {
                let class = match b.status {
                    crate::store::BuildStatus::Passed if b.flaky => "flaky",
                    crate::store::BuildStatus::Passed => "ok",
                    crate::store::BuildStatus::Failed => "fail",
                    crate::store::BuildStatus::InfraError => "infra",
                    _ => "canc",
                };
                (
                    took(b) as f64 / 1000.0,
                    class,
                    format!(
                        "build {} {}: {}",
                        b.id,
                        if class == "flaky" {
                            "passed with flakes"
                        } else {
                            b.status.as_str()
                        },
                        duration_ms(took(b))
                    ),
                    format!("/builds/{}", b.id),
                )
            })
            .collect(),
    );
    let now = crate::store::now_ms();
    let v = BuilderPageView {
        median_ms: durations.get(durations.len() / 2).copied().unwrap_or(0),
        passed: finished
            .iter()
            .filter(|b| b.status == crate::store::BuildStatus::Passed)
            .count(),
        failed: finished
            .iter()
            .filter(|b| b.status == crate::store::BuildStatus::Failed)
            .count(),
        flaky: finished.iter().filter(|b| b.flaky).count(),
        builds: rows
            .iter()
            .map(|b| super::util::BuildLine::new(b, now))
            .collect(),
        chart,
        builder,
        name,
    };
    if q.mode.as_deref() == Some("json") {
        return json(&v);
    }
    html(&BuilderPage {
        l: Layout::new(format!("Builder {}", v.name), "builders"),
        v,
    })
}
