//! The build grid (`/`): commits of one repo branch (newest first) by
//! builders grouped by OS and architecture.
//!
//! A cell shows the newest build of that builder at that commit: passed,
//! failed, infra-error, running (a link to the live log), queued,
//! cancelled, nothing yet, or `•` when the builder does not build this
//! repo/branch. Rows come from one commits query and every cell from one
//! builds query, so a page of 50 commits × 100 builders renders in a few
//! milliseconds (`cargo bench -p coordinator --bench grid`).
//!
//! `/grid/events` (same query) streams changes: the cells that changed, or
//! the whole table when rows or columns did.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use axum::extract::{Query, State};
use axum::response::IntoResponse;
use axum::response::sse::Event;
use serde::{Deserialize, Serialize};

use super::util::{date_secs, href, short};
use super::{Layout, PageError, PageResult, html_event, json};
use crate::config::FarmConfig;
use crate::farm::Farm;
use crate::store::{BuildStatus, CommitRow, LatestBuild};

/// Commits per page unless `n` says otherwise.
pub const DEFAULT_ROWS: usize = 30;
/// Most commits one page shows.
pub const MAX_ROWS: usize = 200;
/// Columns before the builders: commit, author, time, subject.
const LEAD_COLUMNS: usize = 4;

/// The grid's query string. Everything is optional and read leniently: a
/// bad number falls back to the default instead of failing the page.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct GridQuery {
    pub repo: Option<String>,
    pub branch: Option<String>,
    /// 0-based page of commits.
    pub page: Option<String>,
    /// Commits per page.
    pub n: Option<String>,
    /// `1` (or any value but `0`): only commits with a failure.
    pub failures: Option<String>,
    /// `json` for the same data as JSON.
    pub mode: Option<String>,
}

/// A repo/branch pair the grid can show.
#[derive(Debug, Clone, Serialize)]
pub struct Tab {
    pub repo: String,
    pub branch: String,
    #[serde(skip)]
    pub href: String,
    #[serde(skip)]
    pub selected: bool,
}

/// A run of columns under one heading (an OS, or an OS/arch pair).
#[derive(Debug, Clone, Serialize)]
pub struct Group {
    pub name: String,
    pub span: usize,
}

/// One builder column.
#[derive(Debug, Clone, Serialize)]
pub struct Column {
    pub name: String,
    pub host_type: String,
    pub os: String,
    pub arch: String,
    /// Whether it builds the shown repo/branch at all.
    pub builds: bool,
}

/// Failing tests a grid cell's hover text names.
const FAILING_NAMED: usize = 5;

/// One cell: the newest build of a builder at a commit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Cell {
    /// `None`: no build (yet).
    pub status: Option<BuildStatus>,
    /// The build shown; 0 when there is none.
    pub build_id: i64,
    /// False: the builder does not build this repo/branch.
    pub builds: bool,
    /// Passed only after re-running tests that failed first.
    pub flaky: bool,
    /// Names of failing tests (a few), for the hover text.
    pub failing: Vec<String>,
}

impl Cell {
    /// CSS class of the cell.
    pub fn cls(&self) -> &'static str {
        if !self.builds {
            return "nb";
        }
        match self.status {
            None => "none",
            Some(BuildStatus::Passed) if self.flaky => "flaky",
            Some(BuildStatus::Passed) => "ok",
            Some(BuildStatus::Failed) => "fail",
            Some(BuildStatus::InfraError) => "infra",
            Some(BuildStatus::Running) => "run",
            Some(BuildStatus::Queued) => "wait",
            Some(BuildStatus::Cancelled) => "canc",
        }
    }
    /// The text in the cell.
    pub fn label(&self) -> &'static str {
        if !self.builds {
            return "•";
        }
        match self.status {
            None => "",
            Some(BuildStatus::Passed) if self.flaky => "flaky",
            Some(BuildStatus::Passed) => "ok",
            Some(BuildStatus::Failed) => "fail",
            Some(BuildStatus::InfraError) => "infra",
            Some(BuildStatus::Running) => "live",
            Some(BuildStatus::Queued) => "…",
            Some(BuildStatus::Cancelled) => "×",
        }
    }
    /// Hover text: for a failed build, the tests that failed.
    pub fn title(&self) -> String {
        if !self.builds {
            return "does not build this repo/branch".into();
        }
        if !self.failing.is_empty() {
            return format!("failed: {}", self.failing.join(", "));
        }
        match self.status {
            None => "no build yet",
            Some(BuildStatus::Passed) if self.flaky => {
                "passed with flakes: tests failed, then passed when run again"
            }
            Some(BuildStatus::Passed) => "passed",
            Some(BuildStatus::Failed) => "failed",
            Some(BuildStatus::InfraError) => "infrastructure error",
            Some(BuildStatus::Running) => "running: follow the log live",
            Some(BuildStatus::Queued) => "queued",
            Some(BuildStatus::Cancelled) => "cancelled",
        }
        .into()
    }
}

/// One commit row.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub hash: String,
    #[serde(skip)]
    pub short: String,
    pub author: String,
    pub email: String,
    /// Seconds since the epoch.
    pub time: i64,
    #[serde(skip)]
    pub date: String,
    pub subject: String,
    /// One per column, in column order.
    pub cells: Vec<Cell>,
}

/// Everything the grid page shows.
#[derive(Debug, Clone, Serialize)]
pub struct GridView {
    pub repo: String,
    pub branch: String,
    pub page: usize,
    pub per_page: usize,
    pub failures_only: bool,
    pub tabs: Vec<Tab>,
    #[serde(skip)]
    pub os_groups: Vec<Group>,
    #[serde(skip)]
    pub arch_groups: Vec<Group>,
    pub builders: Vec<Column>,
    pub commits: Vec<Row>,
    pub has_older: bool,
    #[serde(skip)]
    pub newer_href: String,
    #[serde(skip)]
    pub older_href: String,
    #[serde(skip)]
    pub latest_href: String,
    #[serde(skip)]
    pub failures_href: String,
    #[serde(skip)]
    pub events_href: String,
    /// Shown when there is nothing to show, saying why.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl GridView {
    pub fn lead_columns(&self) -> usize {
        LEAD_COLUMNS
    }

    /// Identifies the rows and columns; cells can be patched in place only
    /// while it stays the same.
    fn shape(&self) -> (Vec<&str>, Vec<&str>) {
        (
            self.commits.iter().map(|r| r.hash.as_str()).collect(),
            self.builders.iter().map(|c| c.name.as_str()).collect(),
        )
    }

    /// A fingerprint of what the grid shows, to tell a viewer's copy from now.
    fn fingerprint(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.shape().hash(&mut h);
        for r in &self.commits {
            r.cells.hash(&mut h);
        }
        h.finish()
    }
}

/// Sort rank of an OS: first-class ports first, as the Go dashboard does.
fn os_rank(os: &str) -> u8 {
    match os {
        "linux" | "darwin" | "windows" => 1,
        "freebsd" | "netbsd" | "openbsd" | "dragonfly" => 3,
        "android" | "ios" => 4,
        "other" => 11,
        _ => 10,
    }
}

/// The builders as columns, grouped by OS then arch (host dimensions first;
/// else the `os-arch-...` convention of the builder's name).
pub fn columns(cfg: &FarmConfig, repo: &str, branch: &str) -> Vec<Column> {
    let wanted: std::collections::HashSet<&str> = cfg
        .builders_for(repo, branch)
        .into_iter()
        .map(|b| b.name.as_str())
        .collect();
    let mut cols: Vec<Column> = cfg
        .builders
        .values()
        .map(|b| {
            let dims = cfg.hosts.get(&b.host_type).map(|h| &h.dimensions);
            let mut parts = b.name.split('-');
            let (n_os, n_arch) = (parts.next(), parts.next());
            let os = dims
                .and_then(|d| d.get("os").cloned())
                .or_else(|| n_os.filter(|_| n_arch.is_some()).map(str::to_string))
                .unwrap_or_else(|| "other".into());
            let arch = dims
                .and_then(|d| d.get("arch").cloned())
                .or_else(|| n_arch.map(str::to_string))
                .unwrap_or_default();
            Column {
                name: b.name.clone(),
                host_type: b.host_type.clone(),
                os,
                arch,
                builds: wanted.contains(b.name.as_str()),
            }
        })
        .collect();
    cols.sort_by(|a, b| {
        (os_rank(&a.os), &a.os, &a.arch, &a.name).cmp(&(os_rank(&b.os), &b.os, &b.arch, &b.name))
    });
    cols
}

fn groups<'a>(keys: impl Iterator<Item = (&'a str, String)>) -> Vec<Group> {
    let mut out: Vec<(&str, Group)> = Vec::new();
    for (key, name) in keys {
        match out.last_mut() {
            Some((k, g)) if *k == key => g.span += 1,
            _ => out.push((key, Group { name, span: 1 })),
        }
    }
    out.into_iter().map(|(_, g)| g).collect()
}

fn parse_num(s: &Option<String>, default: usize, max: usize) -> usize {
    s.as_deref()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(default)
        .min(max)
}

/// Loads the grid for a query.
pub async fn load(farm: &Farm, q: &GridQuery) -> Result<GridView, PageError> {
    let cfg = farm.config();
    let repo = match &q.repo {
        Some(r) if !r.is_empty() => r.clone(),
        _ => cfg.repos.keys().next().cloned().unwrap_or_default(),
    };
    let tabs_src: Vec<(String, String)> = cfg
        .repos
        .values()
        .flat_map(|r| r.branches.iter().map(|b| (r.name.clone(), b.clone())))
        .collect();
    let rc = cfg.repos.get(&repo);
    if rc.is_none() && !repo.is_empty() {
        return Err(PageError::NotFound(format!(
            "no repo named {repo:?} in the farm config"
        )));
    }
    let branch = match &q.branch {
        Some(b) if !b.is_empty() => b.clone(),
        _ => rc
            .and_then(|r| r.branches.first().cloned())
            .unwrap_or_else(|| "main".into()),
    };
    if let Some(rc) = rc
        && !rc.branches.contains(&branch)
    {
        return Err(PageError::NotFound(format!(
            "repo {repo:?} has no watched branch {branch:?} (watched: {})",
            rc.branches.join(", ")
        )));
    }
    let per_page = parse_num(&q.n, DEFAULT_ROWS, MAX_ROWS).max(1);
    let page = parse_num(&q.page, 0, 100_000);
    let failures_only = q
        .failures
        .as_deref()
        .is_some_and(|f| !f.is_empty() && f != "0");

    let cols = columns(&cfg, &repo, &branch);
    let arch_keys: Vec<String> = cols
        .iter()
        .map(|c| format!("{}\u{0}{}", c.os, c.arch))
        .collect();
    let limit = per_page as i64 + 1;
    let offset = (page * per_page) as i64;
    let mut commits: Vec<CommitRow> = if repo.is_empty() {
        Vec::new()
    } else if failures_only {
        farm.store
            .failing_commits(&repo, &branch, limit, offset)
            .await?
    } else {
        farm.store.commits(&repo, &branch, limit, offset).await?
    };
    let has_older = commits.len() > per_page;
    commits.truncate(per_page);
    let hashes: Vec<String> = commits.iter().map(|c| c.hash.clone()).collect();
    let builds: Vec<LatestBuild> = if hashes.is_empty() {
        Vec::new()
    } else {
        farm.store.latest_builds(&repo, &hashes).await?
    };
    let latest: HashMap<(&str, &str), &LatestBuild> = builds
        .iter()
        .map(|b| ((b.commit.as_str(), b.builder.as_str()), b))
        .collect();
    let failed: Vec<i64> = builds
        .iter()
        .filter(|b| b.status == BuildStatus::Failed)
        .map(|b| b.id)
        .collect();
    let failing = farm
        .store
        .failing_test_names(&failed, FAILING_NAMED)
        .await?;
    let rows: Vec<Row> = commits
        .iter()
        .map(|c| Row {
            short: short(&c.hash).to_string(),
            date: date_secs(c.time),
            cells: cols
                .iter()
                .map(
                    |col| match latest.get(&(c.hash.as_str(), col.name.as_str())) {
                        Some(b) => Cell {
                            status: Some(b.status),
                            build_id: b.id,
                            builds: col.builds,
                            flaky: b.flaky,
                            failing: failing.get(&b.id).cloned().unwrap_or_default(),
                        },
                        None => Cell {
                            status: None,
                            build_id: 0,
                            builds: col.builds,
                            flaky: false,
                            failing: Vec::new(),
                        },
                    },
                )
                .collect(),
            hash: c.hash.clone(),
            author: c.author.clone(),
            email: c.email.clone(),
            time: c.time,
            subject: c.subject.clone(),
        })
        .collect();

    let failures = if failures_only { "1" } else { "" };
    let n = if per_page == DEFAULT_ROWS {
        String::new()
    } else {
        per_page.to_string()
    };
    let link = |page: usize, failures: &str| {
        let p = if page == 0 {
            String::new()
        } else {
            page.to_string()
        };
        href(
            "/",
            &[
                ("repo", &repo),
                ("branch", &branch),
                ("failures", failures),
                ("n", &n),
                ("page", &p),
            ],
        )
    };
    let message = if cfg.repos.is_empty() {
        "The farm config defines no repo, so there is nothing to build.".to_string()
    } else if rows.is_empty() && failures_only && page == 0 {
        format!("No failures on {repo} {branch}.")
    } else if rows.is_empty() && page == 0 {
        let every = rc.map(|r| r.poll_interval).unwrap_or_default();
        format!(
            "No commits seen on {repo} {branch} yet; the repository is polled every {}s.",
            every.as_secs()
        )
    } else if rows.is_empty() {
        "No commits on this page: it is past the end of the history.".to_string()
    } else {
        String::new()
    };
    Ok(GridView {
        tabs: tabs_src
            .into_iter()
            .map(|(r, b)| Tab {
                href: href("/", &[("repo", &r), ("branch", &b), ("failures", failures)]),
                selected: r == repo && b == branch,
                repo: r,
                branch: b,
            })
            .collect(),
        os_groups: groups(cols.iter().map(|c| (c.os.as_str(), c.os.clone()))),
        // Keyed on (os, arch) so one arch heading never spans two OSes.
        arch_groups: groups(
            arch_keys
                .iter()
                .zip(&cols)
                .map(|(k, c)| (k.as_str(), c.arch.clone())),
        ),
        builders: cols,
        commits: rows,
        has_older,
        newer_href: if page > 0 {
            link(page - 1, failures)
        } else {
            String::new()
        },
        older_href: if has_older {
            link(page + 1, failures)
        } else {
            String::new()
        },
        latest_href: link(0, failures),
        failures_href: link(0, if failures_only { "" } else { "1" }),
        events_href: href(
            "/grid/events",
            &[
                ("repo", &repo),
                ("branch", &branch),
                ("failures", failures),
                ("n", &n),
                (
                    "page",
                    &if page == 0 {
                        String::new()
                    } else {
                        page.to_string()
                    },
                ),
            ],
        ),
        message,
        repo,
        branch,
        page,
        per_page,
        failures_only,
    })
}

#[derive(Template)]
#[template(path = "grid.html")]
struct GridPage<'a> {
    l: Layout,
    g: &'a GridView,
    /// The live-update stream, told which grid this page shows.
    live: String,
}

#[derive(Template)]
#[template(path = "grid_table.html")]
struct GridTable<'a> {
    g: &'a GridView,
}

#[derive(Template)]
#[template(
    source = "{% import \"macros.html\" as m %}{% call m::cell(c) %}{% endcall %}",
    ext = "html"
)]
struct CellTemplate<'a> {
    c: &'a Cell,
}

/// Renders the grid page to HTML (what `/` serves; also used by the bench).
pub async fn render(farm: &Farm, q: &GridQuery) -> Result<String, PageError> {
    let g = load(farm, q).await?;
    render_view(&g)
}

/// Renders a loaded grid.
pub fn render_view(g: &GridView) -> Result<String, PageError> {
    let title = if g.repo.is_empty() {
        "Builds".to_string()
    } else {
        format!("{} {}", g.repo, g.branch)
    };
    let sep = if g.events_href.contains('?') {
        '&'
    } else {
        '?'
    };
    Ok(GridPage {
        l: Layout::new(title, "grid"),
        g,
        live: format!("{}{sep}v={}", g.events_href, g.fingerprint()),
    }
    .render()?)
}

pub async fn page(State(farm): State<Arc<Farm>>, Query(q): Query<GridQuery>) -> PageResult {
    let g = load(&farm, &q).await?;
    if q.mode.as_deref() == Some("json") {
        return json(&g);
    }
    Ok(axum::response::Html(render_view(&g)?).into_response())
}

#[derive(Deserialize)]
pub struct EventsQuery {
    #[serde(flatten)]
    grid: GridQuery,
    /// The fingerprint of the grid the viewer has.
    v: Option<String>,
}

/// Live grid: every second, the cells that changed (or the whole table).
pub async fn events(
    State(farm): State<Arc<Farm>>,
    Query(q): Query<EventsQuery>,
) -> axum::response::Response {
    let have: Option<u64> = q.v.as_deref().and_then(|v| v.parse().ok());
    // A grid that does not exist is an error, not a stream (the browser's
    // EventSource gives up instead of retrying).
    let mut next = match load(&farm, &q.grid).await {
        Err(e @ PageError::NotFound(_)) => return e.into_response(),
        r => Some(r),
    };
    super::event_stream(move |tx| async move {
        let mut last: Option<GridView> = None;
        let _ = tx
            .send(Event::default().retry(Duration::from_secs(2)))
            .await;
        loop {
            let now = match next.take() {
                Some(r) => r,
                None => load(&farm, &q.grid).await,
            };
            if let Err(PageError::NotFound(_)) = now {
                return; // the config changed under the viewer
            }
            if let Ok(now) = now {
                let ev = match &last {
                    None if have == Some(now.fingerprint()) => None,
                    Some(prev) if prev.shape() == now.shape() => {
                        let mut changed = Vec::new();
                        for (ri, (a, b)) in prev.commits.iter().zip(&now.commits).enumerate() {
                            for (ci, (x, y)) in a.cells.iter().zip(&b.cells).enumerate() {
                                if x != y
                                    && let Ok(h) = (CellTemplate { c: y }).render()
                                {
                                    changed.push(serde_json::json!([ri, ci, h]));
                                }
                            }
                        }
                        (!changed.is_empty()).then(|| {
                            Event::default()
                                .event("cells")
                                .data(serde_json::Value::from(changed).to_string())
                        })
                    }
                    Some(prev) if prev.fingerprint() == now.fingerprint() => None,
                    _ => GridTable { g: &now }
                        .render()
                        .ok()
                        .map(|h| html_event("grid", &h)),
                };
                if let Some(ev) = ev
                    && tx.send(ev).await.is_err()
                {
                    return;
                }
                last = Some(now);
            }
            if !super::tick(&tx, Duration::from_secs(1)).await {
                return;
            }
        }
    })
}
