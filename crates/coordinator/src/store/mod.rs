//! The coordinator's durable state: repos' commits, builds, attempts, steps
//! with their (compressed) logs, and machines seen, in SQLite (WAL; the
//! default, nothing to run) or PostgreSQL (a farm that needs backups,
//! replication and a standby coordinator).
//!
//! All SQL of the coordinator lives in this module and its children, written
//! once for both engines through sqlx's `Any` driver: `$N` parameters (SQLite
//! takes them too), `ON CONFLICT`, `RETURNING`, `string_agg`, no bare columns
//! beside aggregates, every integer a 64-bit one. What differs is only the
//! schema's spelling: `migrations/sqlite` and `migrations/postgres`.
//!
//! Everything a restart must not lose is written here before it is acted on:
//! a build exists in the store before it is queued, an attempt before the
//! machine is used, and a build's final status is written exactly once (the
//! update is guarded by the running state). [`Store::recover`] turns what a
//! killed coordinator left running into recorded lost attempts and re-queued
//! builds.

use std::path::Path;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::artifacts::ArtifactStore;
use std::sync::Arc;

use sqlx::Row;
use sqlx::any::AnyRow;

mod build_artifacts;
mod certs;
mod conns;
mod copy;
mod engine;
mod forge;
mod gomote;
mod leader;
mod logs;
pub use logs::StepEnd;
mod results;
mod units;

pub use build_artifacts::{BuildArtifact, MAX_BUILD_ARTIFACTS};
pub use certs::{Approval, BotRequestRow, RequestStatus};
pub use copy::{TABLES, TableCopy};
pub use engine::{Engine, Location};
pub use forge::{BranchState, Delivery, MAX_DELIVERIES, OutboxRow};
pub use gomote::{GroupRow, InstanceRow, UserRow};
pub use leader::{LeaderInfo, LeaderLock};
pub use results::{FlakeRow, TestRow, TestsOf};
pub use units::UnitRun;

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Invalid(String),
    /// Opening the store failed; names the file and, for a lock, says so.
    #[error("{0}")]
    Open(String),
}

/// Milliseconds since the Unix epoch.
/// Most machines [`Store::machines`] returns.
pub const MAX_MACHINES: i64 = 1000;

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Where a build stands. Terminal states never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BuildStatus {
    Queued,
    Running,
    Passed,
    Failed,
    InfraError,
    Cancelled,
}

impl BuildStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Queued => "queued",
            BuildStatus::Running => "running",
            BuildStatus::Passed => "passed",
            BuildStatus::Failed => "failed",
            BuildStatus::InfraError => "infra-error",
            BuildStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, BuildStatus::Queued | BuildStatus::Running)
    }

    pub const ALL: [BuildStatus; 6] = [
        BuildStatus::Queued,
        BuildStatus::Running,
        BuildStatus::Passed,
        BuildStatus::Failed,
        BuildStatus::InfraError,
        BuildStatus::Cancelled,
    ];
}

impl FromStr for BuildStatus {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        BuildStatus::ALL
            .into_iter()
            .find(|b| b.as_str() == s)
            .ok_or_else(|| format!("unknown build status {s:?}"))
    }
}

impl std::fmt::Display for BuildStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a build exists; also its scheduling priority class (first = most urgent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BuildKind {
    Release,
    Interactive,
    PreSubmit,
    PostSubmit,
}

impl BuildKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BuildKind::Release => "release",
            BuildKind::Interactive => "interactive",
            BuildKind::PreSubmit => "pre-submit",
            BuildKind::PostSubmit => "post-submit",
        }
    }
}

impl FromStr for BuildKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        [
            BuildKind::Release,
            BuildKind::Interactive,
            BuildKind::PreSubmit,
            BuildKind::PostSubmit,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
        .ok_or_else(|| {
            format!("unknown build kind {s:?} (release, interactive, pre-submit, post-submit)")
        })
    }
}

/// How an attempt or a step ended (or that it is still running).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunResult {
    Running,
    Passed,
    Failed,
    Cancelled,
    /// The machine or the farm broke, not the work.
    InfraError,
    /// The coordinator stopped (or its machine went away) while it ran.
    Lost,
}

impl RunResult {
    pub const ALL: [RunResult; 6] = [
        RunResult::Running,
        RunResult::Passed,
        RunResult::Failed,
        RunResult::Cancelled,
        RunResult::InfraError,
        RunResult::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunResult::Running => "running",
            RunResult::Passed => "passed",
            RunResult::Failed => "failed",
            RunResult::Cancelled => "cancelled",
            RunResult::InfraError => "infra-error",
            RunResult::Lost => "lost",
        }
    }
}

impl std::fmt::Display for RunResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<String> for RunResult {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        RunResult::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown attempt or step result {s:?}"))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CommitRow {
    pub repo: String,
    pub hash: String,
    pub author: String,
    pub email: String,
    pub time: i64,
    pub subject: String,
    pub parents: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BuildRow {
    pub id: i64,
    pub builder: String,
    pub host_type: String,
    pub repo: String,
    pub branch: String,
    pub commit: String,
    pub commit_time: i64,
    pub kind: BuildKind,
    pub status: BuildStatus,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub attempts: i64,
    pub error: String,
    /// Passed only after re-running tests that failed first.
    pub flaky: bool,
    /// Who asked for it: "" for the poller, `admin`, a user's name, a
    /// forge's pull request, `rebuild of N`.
    pub requested_by: String,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AttemptRow {
    pub id: i64,
    pub build_id: i64,
    pub number: i64,
    pub machine: String,
    pub host_type: String,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    #[sqlx(try_from = "String")]
    pub result: RunResult,
    pub error: String,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct StepRow {
    pub id: i64,
    pub build_id: i64,
    pub attempt_id: i64,
    pub number: i64,
    pub name: String,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    #[sqlx(try_from = "String")]
    pub result: RunResult,
    pub detail: String,
    pub log_size: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MachineRow {
    pub hostname: String,
    pub host_type: String,
    pub version: i64,
    pub build: String,
    pub addr: String,
    pub first_seen: i64,
    pub last_seen: i64,
}

/// The newest build of a builder at a commit (see [`Store::latest_builds`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatestBuild {
    pub commit: String,
    pub builder: String,
    pub status: BuildStatus,
    /// Passed only after re-running tests that failed first.
    pub flaky: bool,
    pub id: i64,
}

/// A build to create.
#[derive(Debug, Clone)]
pub struct NewBuild {
    pub builder: String,
    pub host_type: String,
    pub repo: String,
    pub branch: String,
    pub commit: String,
    pub commit_time: i64,
    pub kind: BuildKind,
    pub requested_by: String,
}

/// What [`Store::recover`] found after an unclean stop.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub lost_attempts: u64,
    pub requeued_builds: u64,
}

/// Filter for [`Store::builds`].
#[derive(Debug, Default, Clone)]
pub struct BuildFilter {
    pub builder: Option<String>,
    pub repo: Option<String>,
    pub commit: Option<String>,
    pub status: Option<BuildStatus>,
    pub machine: Option<String>,
    pub host_type: Option<String>,
    /// Only builds older than this id: the next page after a page whose
    /// last build had it.
    pub before: Option<i64>,
    pub limit: i64,
}

#[derive(Clone)]
pub struct Store {
    /// For reading.
    pool: conns::Conns,
    /// For writing: on SQLite one connection, so writes queue rather than
    /// race for the file lock (see `engine::Pools`).
    writer: conns::Conns,
    /// Where finished logs go (see `logs.rs`); in the rows without one.
    blobs: Option<Arc<dyn ArtifactStore>>,
    /// Whether new finished logs go to `blobs`.
    write_blobs: bool,
    /// Where it is: the leader lock opens a connection of its own there.
    location: Location,
    /// This process's name on the database, and whether it leads.
    fence: leader::Fence,
}

/// An attempt's end, written once (only over a running attempt).
const FINISH_ATTEMPT: &str = "UPDATE attempts SET result = $1, error = $2, finished_at = $3 WHERE id = $4 AND result = 'running'";

/// [`FINISH_ATTEMPT`] as a statement of a batch.
fn finish_attempt_stmt(attempt_id: i64, result: RunResult, error: &str, now: i64) -> conns::Stmt {
    use conns::Arg;
    conns::Stmt::new(
        FINISH_ATTEMPT,
        vec![
            Arg::Text(result.as_str().into()),
            Arg::Text(text(error)),
            Arg::Int(now),
            Arg::Int(attempt_id),
        ],
    )
}

/// Read through `builds_by_requester`, which holds only the builds in
/// flight: its condition must stay the index's.
const ACTIVE_BUILDS_OF: &str =
    "SELECT COUNT(*) FROM builds WHERE requested_by = $1 AND status IN ('queued', 'running')";

/// A build's final status, written once (only over queued or running):
/// a row comes back when it was written.
const FINISH_BUILD: &str = "UPDATE builds SET status = $1, error = $2, finished_at = $3 WHERE id = $4 AND status IN ('queued', 'running') RETURNING id";

const BUILD_COLS: &str = "id, builder, host_type, repo, branch, commit_hash, commit_time, kind, status, created_at, started_at, finished_at, attempts, error, flaky, requested_by";

fn build_row(r: &AnyRow) -> Result<BuildRow> {
    let kind: String = r.try_get("kind")?;
    let status: String = r.try_get("status")?;
    Ok(BuildRow {
        id: r.try_get("id")?,
        builder: r.try_get("builder")?,
        host_type: r.try_get("host_type")?,
        repo: r.try_get("repo")?,
        branch: r.try_get("branch")?,
        commit: r.try_get("commit_hash")?,
        commit_time: r.try_get("commit_time")?,
        kind: kind.parse().map_err(StoreError::Invalid)?,
        status: status.parse().map_err(StoreError::Invalid)?,
        created_at: r.try_get("created_at")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        attempts: r.try_get("attempts")?,
        error: r.try_get("error")?,
        flaky: r.try_get::<i64, _>("flaky")? != 0,
        requested_by: r.try_get("requested_by")?,
    })
}

/// Text as both engines take it: PostgreSQL refuses NUL in text, which
/// outside input (step output, test failures, forms, commit messages,
/// headers) can carry; it becomes U+FFFD, as invalid UTF-8 already does.
pub(crate) fn text(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s.to_string()
    }
}

/// `$from, $from+1, ...`: `n` numbered parameters, for an `IN (...)` list.
fn params(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Store {
    /// Opens (creating if missing) and migrates the SQLite store at `path`.
    /// Errors name the file; a database locked by another process is
    /// reported within a second instead of after the usual 10 s wait.
    pub async fn open(path: &Path) -> Result<Store> {
        Store::connect(&Location::Sqlite(path.to_path_buf())).await
    }

    /// Opens and migrates the store at `location`: a SQLite file (created
    /// if missing) or a PostgreSQL database (which must exist).
    pub async fn connect(location: &Location) -> Result<Store> {
        let fence = leader::Fence::new();
        let pools = engine::connect(location, &fence).await?;
        Ok(Store {
            pool: pools.read,
            writer: pools.write,
            blobs: None,
            write_blobs: false,
            location: location.clone(),
            fence,
        })
    }

    /// Which engine holds the store.
    pub fn engine(&self) -> Engine {
        self.location.engine()
    }

    /// The connections for reading, for the store's own modules.
    fn pool(&self) -> &conns::Conns {
        &self.pool
    }

    /// The connection for writing (a transaction that writes included),
    /// for the store's own modules. Nothing may wait on another write
    /// while it holds this one: on SQLite it is the only one.
    fn writer(&self) -> &conns::Conns {
        &self.writer
    }

    /// Marks attempts left running by a previous process as lost and puts
    /// their builds back in the queue. Run once at start, before scheduling.
    pub async fn recover(&self) -> Result<Recovery> {
        let now = now_ms();
        let mut w = self.writer().acquire().await?;
        let mut tx = w.begin().await?;
        let lost = sqlx::query(
            "UPDATE attempts SET result = 'lost', finished_at = $1, error = 'the coordinator stopped while this attempt ran; the build was re-queued' WHERE result = 'running'",
        )
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("UPDATE steps SET result = 'lost', finished_at = $1 WHERE result = 'running'")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let requeued = sqlx::query("UPDATE builds SET status = 'queued' WHERE status = 'running'")
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(Recovery {
            lost_attempts: lost,
            requeued_builds: requeued,
        })
    }

    /// Records a commit and its branch; returns true if the commit was new.
    pub async fn add_commit(&self, c: &CommitRow, branch: &str) -> Result<bool> {
        let mut w = self.writer().acquire().await?;
        let mut tx = w.begin().await?;
        let new = sqlx::query(
            "INSERT INTO commits (repo, hash, author, email, time, subject, parents, seen_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
        )
        .bind(text(&c.repo))
        .bind(text(&c.hash))
        .bind(text(&c.author))
        .bind(text(&c.email))
        .bind(c.time)
        .bind(text(&c.subject))
        .bind(c.parents.join(" "))
        .bind(now_ms())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        sqlx::query(
            "INSERT INTO commit_branches (repo, branch, hash) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
            .bind(text(&c.repo))
            .bind(text(branch))
            .bind(text(&c.hash))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(new)
    }

    /// Hashes of every commit already seen on a repo's branch.
    pub async fn known_commits(&self, repo: &str, branch: &str) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT hash FROM commit_branches WHERE repo = $1 AND branch = $2")
            .bind(text(repo))
            .bind(text(branch))
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| r.try_get("hash").map_err(Into::into))
            .collect()
    }

    pub async fn commit(&self, repo: &str, hash: &str) -> Result<Option<CommitRow>> {
        let r = sqlx::query("SELECT repo, hash, author, email, time, subject, parents FROM commits WHERE repo = $1 AND hash = $2")
            .bind(text(repo))
            .bind(text(hash))
            .fetch_optional(self.pool())
            .await?;
        r.map(|r| commit_row(&r)).transpose()
    }

    /// Commits of a repo branch, newest first.
    pub async fn commits(
        &self,
        repo: &str,
        branch: &str,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<CommitRow>> {
        let rows = sqlx::query(
            "SELECT c.repo, c.hash, c.author, c.email, c.time, c.subject, c.parents FROM commits c JOIN commit_branches b ON b.repo = c.repo AND b.hash = c.hash WHERE c.repo = $1 AND b.branch = $2 ORDER BY c.time DESC, c.seen_at DESC, c.hash LIMIT $3 OFFSET $4",
        )
        .bind(text(repo))
        .bind(text(branch))
        .bind(limit)
        .bind(offset)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(commit_row).collect()
    }

    /// Stores a build in state `queued` and returns its row. A post-submit
    /// build of a (builder, commit) that already exists is not created
    /// again: `None`. The row comes back from the insert itself, so its
    /// driver need not read it.
    pub async fn create_build(&self, b: &NewBuild) -> Result<Option<BuildRow>> {
        let r = sqlx::query(&format!(
            "INSERT INTO builds (builder, host_type, repo, branch, commit_hash, commit_time, kind, status, created_at, requested_by) VALUES ($1, $2, $3, $4, $5, $6, $7, 'queued', $8, $9) ON CONFLICT DO NOTHING RETURNING {BUILD_COLS}",
        ))
        .bind(text(&b.builder))
        .bind(text(&b.host_type))
        .bind(text(&b.repo))
        .bind(text(&b.branch))
        .bind(text(&b.commit))
        .bind(b.commit_time)
        .bind(b.kind.as_str())
        .bind(now_ms())
        .bind(text(&b.requested_by))
        .fetch_optional(self.writer())
        .await?;
        r.as_ref().map(build_row).transpose()
    }

    /// Builds `requested_by` has queued or running.
    pub async fn active_builds_of(&self, requested_by: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(ACTIVE_BUILDS_OF)
            .bind(text(requested_by))
            .fetch_one(self.pool())
            .await?)
    }

    /// Who asked for build `id` ("" for the poller).
    pub async fn requested_by(&self, id: i64) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT requested_by FROM builds WHERE id = $1")
                .bind(id)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    pub async fn build(&self, id: i64) -> Result<Option<BuildRow>> {
        let r = sqlx::query(&format!("SELECT {BUILD_COLS} FROM builds WHERE id = $1"))
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        r.as_ref().map(build_row).transpose()
    }

    /// Builds matching a filter, newest first.
    pub async fn builds(&self, f: &BuildFilter) -> Result<Vec<BuildRow>> {
        let mut sql = format!("SELECT {BUILD_COLS} FROM builds WHERE 1=1");
        let mut texts: Vec<&str> = Vec::new();
        for (cond, v) in [
            ("builder", f.builder.as_deref()),
            ("repo", f.repo.as_deref()),
            ("commit_hash", f.commit.as_deref()),
            ("status", f.status.map(BuildStatus::as_str)),
            ("host_type", f.host_type.as_deref()),
        ] {
            if let Some(v) = v {
                texts.push(v);
                sql.push_str(&format!(" AND {cond} = ${}", texts.len()));
            }
        }
        if let Some(v) = &f.machine {
            texts.push(v);
            sql.push_str(&format!(
                " AND id IN (SELECT build_id FROM attempts WHERE machine = ${})",
                texts.len()
            ));
        }
        let mut n = texts.len();
        if f.before.is_some() {
            n += 1;
            sql.push_str(&format!(" AND id < ${n}"));
        }
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", n + 1));
        let mut q = sqlx::query(&sql);
        for t in texts {
            q = q.bind(text(t));
        }
        if let Some(before) = f.before {
            q = q.bind(before);
        }
        let limit = if f.limit <= 0 {
            100
        } else {
            f.limit.min(10_000)
        };
        let rows = q.bind(limit).fetch_all(self.pool()).await?;
        rows.iter().map(build_row).collect()
    }

    /// Queued builds, oldest first, for filling the scheduler at start.
    pub async fn queued_builds(&self) -> Result<Vec<BuildRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {BUILD_COLS} FROM builds WHERE status = 'queued' ORDER BY id"
        ))
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(build_row).collect()
    }

    /// Counts builds per status.
    pub async fn status_counts(&self) -> Result<Vec<(BuildStatus, i64)>> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM builds GROUP BY status")
            .fetch_all(self.pool())
            .await?;
        let mut out = Vec::new();
        for r in rows {
            let s: String = r.try_get("status")?;
            out.push((s.parse().map_err(StoreError::Invalid)?, r.try_get("n")?));
        }
        Ok(out)
    }

    /// Starts an attempt: the build becomes `running` on `machine`. Returns
    /// `None` if the build is no longer queued (cancelled meanwhile).
    pub async fn start_attempt(
        &self,
        build_id: i64,
        machine: &str,
        host_type: &str,
    ) -> Result<Option<(i64, i64)>> {
        use conns::{Arg, Stmt};
        let now = now_ms();
        // One transaction (on SQLite one trip to its thread). The attempt
        // is inserted only if the update made the build running just now:
        // a running build already has the row of its current attempt.
        let rows = self
            .writer()
            .batch(&[
                Stmt::new(
                    "UPDATE builds SET status = 'running', attempts = attempts + 1, started_at = COALESCE(started_at, $1) WHERE id = $2 AND status = 'queued'",
                    vec![Arg::Int(now), Arg::Int(build_id)],
                ),
                Stmt::new(
                    "INSERT INTO attempts (build_id, number, machine, host_type, started_at, result) \
                     SELECT id, attempts, $2, $3, $4, 'running' FROM builds WHERE id = $1 AND status = 'running' \
                     AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.build_id = $1 AND a.number = builds.attempts) \
                     RETURNING id, number",
                    vec![
                        Arg::Int(build_id),
                        Arg::Text(text(machine)),
                        Arg::Text(text(host_type)),
                        Arg::Int(now),
                    ],
                ),
            ])
            .await?;
        let Some(r) = rows.get(1).and_then(|r| r.first()) else {
            return Ok(None);
        };
        Ok(Some((r.try_get("id")?, r.try_get("number")?)))
    }

    pub async fn finish_attempt(
        &self,
        attempt_id: i64,
        result: RunResult,
        error: &str,
    ) -> Result<()> {
        let stmt = finish_attempt_stmt(attempt_id, result, error, now_ms());
        self.writer().batch(&[stmt]).await?;
        Ok(())
    }

    /// Ends a build's last attempt and its last step (`step`, when not
    /// recorded yet), ends the build with it as `build` says (status,
    /// message, passed with flakes), and keeps the attempt's log: one
    /// transaction, after the logs' bytes are in the artifact store.
    /// Returns whether the build's status changed (`false`: it was final
    /// already, e.g. cancelled meanwhile).
    pub async fn end_attempt(
        &self,
        attempt: (i64, i64),
        result: RunResult,
        error: &str,
        build: (BuildStatus, &str, bool),
        (log, step): (&[u8], Option<&StepEnd>),
    ) -> Result<bool> {
        use conns::{Arg, Stmt};
        let (attempt_id, build_id) = attempt;
        let now = now_ms();
        let (put_log, step) = tokio::join!(
            self.put_attempt_log_stmt(attempt_id, build_id, log),
            futures_util::future::OptionFuture::from(
                step.map(|end| self.finish_step_stmt(end, now))
            )
        );
        let mut stmts: Vec<Stmt> = step.into_iter().collect();
        stmts.push(finish_attempt_stmt(attempt_id, result, error, now));
        let (status, msg, flaky) = build;
        debug_assert!(status.is_terminal());
        if flaky {
            stmts.push(Stmt::new(results::SET_FLAKY, vec![Arg::Int(build_id)]));
        }
        stmts.push(Stmt::new(
            FINISH_BUILD,
            vec![
                Arg::Text(status.as_str().into()),
                Arg::Text(text(msg)),
                Arg::Int(now),
                Arg::Int(build_id),
            ],
        ));
        stmts.push(put_log);
        let rows = self.writer().batch(&stmts).await?;
        // FINISH_BUILD's row, if it wrote one: the last statement but one.
        Ok(rows.get(stmts.len() - 2).is_some_and(|r| !r.is_empty()))
    }

    /// Puts a running build back in the queue after a lost attempt.
    pub async fn requeue(&self, build_id: i64) -> Result<bool> {
        let n =
            sqlx::query("UPDATE builds SET status = 'queued' WHERE id = $1 AND status = 'running'")
                .bind(build_id)
                .execute(self.writer())
                .await?
                .rows_affected();
        Ok(n > 0)
    }

    /// Cancels a build only while it is queued: returns false if it has
    /// started (or ended) meanwhile.
    pub async fn cancel_queued(&self, build_id: i64, error: &str) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE builds SET status = 'cancelled', error = $1, finished_at = $2 WHERE id = $3 AND status = 'queued'",
        )
        .bind(text(error))
        .bind(now_ms())
        .bind(build_id)
        .execute(self.writer())
        .await?
        .rows_affected();
        Ok(n > 0)
    }

    /// Records a build's final status, once: returns false if it was already final.
    pub async fn finish_build(
        &self,
        build_id: i64,
        status: BuildStatus,
        error: &str,
    ) -> Result<bool> {
        debug_assert!(status.is_terminal());
        let changed = sqlx::query(FINISH_BUILD)
            .bind(status.as_str())
            .bind(text(error))
            .bind(now_ms())
            .bind(build_id)
            .fetch_optional(self.writer())
            .await?;
        Ok(changed.is_some())
    }

    pub async fn start_step(
        &self,
        build_id: i64,
        attempt_id: i64,
        number: i64,
        name: &str,
    ) -> Result<i64> {
        let id = sqlx::query_scalar(
            "INSERT INTO steps (build_id, attempt_id, number, name, started_at, result) VALUES ($1, $2, $3, $4, $5, 'running') RETURNING id",
        )
        .bind(build_id)
        .bind(attempt_id)
        .bind(number)
        .bind(text(name))
        .bind(now_ms())
        .fetch_one(self.writer())
        .await?;
        Ok(id)
    }

    pub async fn attempts(&self, build_id: i64) -> Result<Vec<AttemptRow>> {
        Ok(sqlx::query_as(
            "SELECT id, build_id, number, machine, host_type, started_at, finished_at, result, error FROM attempts WHERE build_id = $1 ORDER BY number",
        )
        .bind(build_id)
        .fetch_all(self.pool())
        .await?)
    }

    pub async fn steps(&self, build_id: i64) -> Result<Vec<StepRow>> {
        Ok(sqlx::query_as(
            "SELECT id, build_id, attempt_id, number, name, started_at, finished_at, result, detail, log_size FROM steps WHERE build_id = $1 ORDER BY attempt_id, number",
        )
        .bind(build_id)
        .fetch_all(self.pool())
        .await?)
    }

    pub async fn machine_seen(
        &self,
        hostname: &str,
        host_type: &str,
        version: i64,
        build: &str,
        addr: &str,
    ) -> Result<()> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO machines (hostname, host_type, version, build, addr, first_seen, last_seen) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (hostname) DO UPDATE SET host_type = excluded.host_type, version = excluded.version, build = excluded.build, addr = excluded.addr, last_seen = excluded.last_seen",
        )
        .bind(text(hostname))
        .bind(text(host_type))
        .bind(version)
        .bind(text(build))
        .bind(text(addr))
        .bind(now)
        .bind(now)
        .execute(self.writer())
        .await?;
        Ok(())
    }

    /// The newest build of each builder at each of some commits of a repo:
    /// the cells of the build grid. The database picks the newest build and
    /// packs each commit's cells into one string (as the Go dashboard's per-commit
    /// `ResultData`), so a page of 50 commits × 100 builders is 50 rows.
    pub async fn latest_builds(&self, repo: &str, hashes: &[String]) -> Result<Vec<LatestBuild>> {
        let mut out = Vec::new();
        for chunk in hashes.chunks(500) {
            // The newest build per (commit, builder) by id, then one row
            // per commit with its cells packed as `builder US status US
            // flaky US id`, cells apart by RS.
            let sql = format!(
                "SELECT b.commit_hash, string_agg(b.builder || $1 || b.status || $1 || b.flaky || $1 || b.id, $2) AS cells \
                 FROM builds b JOIN (SELECT MAX(id) AS id FROM builds WHERE repo = $3 AND commit_hash IN ({}) GROUP BY commit_hash, builder) m ON m.id = b.id \
                 GROUP BY b.commit_hash",
                params(4, chunk.len())
            );
            let mut q = sqlx::query(&sql)
                .bind("\u{1f}")
                .bind("\u{1e}")
                .bind(text(repo));
            for h in chunk {
                q = q.bind(text(h));
            }
            for r in q.fetch_all(self.pool()).await? {
                let commit: String = r.try_get("commit_hash")?;
                let cells: String = r.try_get("cells")?;
                for cell in cells.split('\u{1e}') {
                    let mut f = cell.rsplitn(4, '\u{1f}');
                    let (Some(id), Some(flaky), Some(status), Some(builder)) =
                        (f.next(), f.next(), f.next(), f.next())
                    else {
                        continue;
                    };
                    out.push(LatestBuild {
                        commit: commit.clone(),
                        builder: builder.to_string(),
                        status: status.parse().map_err(StoreError::Invalid)?,
                        flaky: flaky == "1",
                        id: id
                            .parse()
                            .map_err(|_| StoreError::Invalid(format!("bad build id {id:?}")))?,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Commits of a repo branch, newest first, whose latest build on some
    /// builder failed or hit an infrastructure error (the grid's
    /// failures-only view).
    pub async fn failing_commits(
        &self,
        repo: &str,
        branch: &str,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<CommitRow>> {
        let rows = sqlx::query(
            "SELECT c.repo, c.hash, c.author, c.email, c.time, c.subject, c.parents FROM commits c JOIN commit_branches b ON b.repo = c.repo AND b.hash = c.hash \
             WHERE c.repo = $1 AND b.branch = $2 AND EXISTS (SELECT 1 FROM builds x WHERE x.repo = c.repo AND x.commit_hash = c.hash AND x.status IN ('failed', 'infra-error') \
             AND NOT EXISTS (SELECT 1 FROM builds y WHERE y.repo = x.repo AND y.commit_hash = x.commit_hash AND y.builder = x.builder AND y.id > x.id)) \
             ORDER BY c.time DESC, c.seen_at DESC, c.hash LIMIT $3 OFFSET $4",
        )
        .bind(text(repo))
        .bind(text(branch))
        .bind(limit)
        .bind(offset)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(commit_row).collect()
    }

    /// Records (or updates) a machine an exec source created.
    pub async fn exec_instance_put(
        &self,
        hostname: &str,
        host_type: &str,
        state: &str,
        detail: &str,
    ) -> Result<()> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO exec_instances (hostname, host_type, state, detail, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (hostname) DO UPDATE SET state = excluded.state, detail = excluded.detail, updated_at = excluded.updated_at",
        )
        .bind(text(hostname))
        .bind(text(host_type))
        .bind(text(state))
        .bind(text(detail))
        .bind(now)
        .bind(now)
        .execute(self.writer())
        .await?;
        Ok(())
    }

    /// Forgets a destroyed exec machine, and its machine history: its
    /// name is never used again, and an ephemeral pool would otherwise add
    /// a row per build.
    pub async fn exec_instance_delete(&self, hostname: &str) -> Result<()> {
        let mut w = self.writer().acquire().await?;
        let mut tx = w.begin().await?;
        for table in ["exec_instances", "machines"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE hostname = $1"))
                .bind(text(hostname))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Exec machines recorded for a host type (all of them: a restarted
    /// coordinator destroys each).
    pub async fn exec_instances(&self, host_type: &str) -> Result<Vec<ExecInstanceRow>> {
        let rows = sqlx::query(
            "SELECT hostname, state FROM exec_instances WHERE host_type = $1 ORDER BY created_at LIMIT 10000",
        )
        .bind(text(host_type))
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ExecInstanceRow {
                    hostname: r.try_get("hostname")?,
                    state: r.try_get("state")?,
                })
            })
            .collect()
    }

    /// The machines seen, at most [`MAX_MACHINES`] (the most recently
    /// seen), by host type and name. Pages and the open API list them.
    pub async fn machines(&self) -> Result<Vec<MachineRow>> {
        let rows = sqlx::query("SELECT hostname, host_type, version, build, addr, first_seen, last_seen FROM (SELECT * FROM machines ORDER BY last_seen DESC LIMIT $1) recent ORDER BY host_type, hostname")
            .bind(MAX_MACHINES)
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| {
                Ok(MachineRow {
                    hostname: r.try_get("hostname")?,
                    host_type: r.try_get("host_type")?,
                    version: r.try_get("version")?,
                    build: r.try_get("build")?,
                    addr: r.try_get("addr")?,
                    first_seen: r.try_get("first_seen")?,
                    last_seen: r.try_get("last_seen")?,
                })
            })
            .collect()
    }
}

/// A machine an exec source created (see `sources::exec`).
#[derive(Debug, Clone)]
pub struct ExecInstanceRow {
    pub hostname: String,
    /// creating, registered or destroying (with why in the `detail` column,
    /// for whoever reads the database after a crash).
    pub state: String,
}

fn commit_row(r: &AnyRow) -> Result<CommitRow> {
    let parents: String = r.try_get("parents")?;
    Ok(CommitRow {
        repo: r.try_get("repo")?,
        hash: r.try_get("hash")?,
        author: r.try_get("author")?,
        email: r.try_get("email")?,
        time: r.try_get("time")?,
        subject: r.try_get("subject")?,
        parents: parents.split_whitespace().map(str::to_string).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_build(n: usize) -> NewBuild {
        NewBuild {
            builder: "b".into(),
            host_type: "h".into(),
            repo: "r".into(),
            branch: "main".into(),
            commit: format!("{n:040x}"),
            commit_time: 0,
            kind: BuildKind::PostSubmit,
            requested_by: String::new(),
        }
    }

    /// A short log stays in its row, a longer one goes to the artifact
    /// store; both read back whole, from where they went.
    #[tokio::test]
    async fn short_logs_stay_in_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let objects = dir.path().join("artifacts");
        let blobs: Arc<dyn ArtifactStore> = Arc::new(crate::artifacts::LocalDir::new(&objects));
        let store = Store::open(&dir.path().join("farmer.db"))
            .await
            .unwrap()
            .with_blobs(blobs, true);
        let short = b"ok\n".repeat(1023 / 3);
        let long = b"ok\n".repeat(1023 / 3 + 1);
        let mut attempts = Vec::new();
        for (n, log) in [&short, &long].into_iter().enumerate() {
            let id = store.create_build(&new_build(n)).await.unwrap().unwrap().id;
            let (attempt, _) = store.start_attempt(id, "m", "h").await.unwrap().unwrap();
            store.put_attempt_log(attempt, id, log).await.unwrap();
            assert_eq!(store.attempt_logs(id).await.unwrap()[&attempt], *log);
            attempts.push(attempt);
        }
        let names: Vec<_> = std::fs::read_dir(objects.join("logs/attempts"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [format!("{}.log.gz", attempts[1])]);
    }

    /// A user's builds in flight are counted from an index that holds
    /// only builds in flight: finished builds leave it.
    #[tokio::test]
    async fn the_per_user_cap_counts_from_the_index_of_builds_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("farmer.db")).await.unwrap();
        let mut ids = Vec::new();
        for n in 0..3 {
            let b = NewBuild {
                requested_by: "ann".into(),
                kind: BuildKind::PreSubmit,
                ..new_build(n)
            };
            ids.push(store.create_build(&b).await.unwrap().unwrap().id);
        }
        store
            .start_attempt(ids[1], "m", "h")
            .await
            .unwrap()
            .unwrap();
        store
            .start_attempt(ids[2], "m", "h")
            .await
            .unwrap()
            .unwrap();
        assert!(
            store
                .finish_build(ids[2], BuildStatus::Passed, "")
                .await
                .unwrap()
        );
        assert_eq!(store.active_builds_of("ann").await.unwrap(), 2);
        assert_eq!(store.active_builds_of("bob").await.unwrap(), 0);
        let plan: Vec<(i64, i64, i64, String)> =
            sqlx::query_as(&format!("EXPLAIN QUERY PLAN {ACTIVE_BUILDS_OF}"))
                .bind("ann")
                .fetch_all(store.pool())
                .await
                .unwrap();
        assert!(
            plan.iter()
                .any(|p| p.3.contains("USING COVERING INDEX builds_by_requester")
                    || p.3.contains("USING INDEX builds_by_requester")),
            "{plan:?}"
        );
        // The index holds no finished build, so SQLite cannot answer for
        // all of a user's builds from it (an index of every build could).
        let e = sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM builds INDEXED BY builds_by_requester WHERE requested_by = 'ann'",
        )
        .fetch_one(store.pool())
        .await
        .unwrap_err();
        assert!(e.to_string().contains("no query solution"), "{e}");
    }

    /// On SQLite every write goes through one connection while reads have
    /// their own, which refuse to write: many concurrent builds' writes all
    /// land, each exactly once, with reads between them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sqlite_writes_queue_on_one_connection_and_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("farmer.db")).await.unwrap();
        assert_eq!(store.writer().size(), 1);
        assert!(store.pool().size() > 1);
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..64 {
            let store = store.clone();
            tasks.spawn(async move {
                let id = store.create_build(&new_build(n)).await?.expect("new").id;
                let (attempt, number) = store.start_attempt(id, "m", "h").await?.expect("queued");
                let step = store.start_step(id, attempt, 1, "s").await?;
                let end = StepEnd {
                    step_id: step,
                    result: RunResult::Passed,
                    detail: String::new(),
                    log: bytes::Bytes::from_static(b"ok\n"),
                };
                store.finish_step(&end).await?;
                store.finish_attempt(attempt, RunResult::Passed, "").await?;
                assert!(store.finish_build(id, BuildStatus::Passed, "").await?);
                // A read in between writes sees them.
                let b = store.build(id).await?.expect("stored");
                Ok::<_, StoreError>((b.status, number))
            });
        }
        while let Some(r) = tasks.join_next().await {
            assert_eq!(r.unwrap().unwrap(), (BuildStatus::Passed, 1));
        }
        let counts = store.status_counts().await.unwrap();
        assert_eq!(counts, vec![(BuildStatus::Passed, 64)]);
        // A write on a reader fails loudly and changes nothing.
        let e = sqlx::query("UPDATE builds SET error = 'x'")
            .execute(store.pool())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("readonly"), "{e}");
        let b = store.builds(&BuildFilter::default()).await.unwrap();
        assert!(b.iter().all(|b| b.error.is_empty()));
    }

    /// An attempt starts only on a queued build, in one write that makes
    /// the build running and records the attempt (never twice, never on a
    /// cancelled build); it ends with its build and its log in one write,
    /// which changes a final build no more.
    #[tokio::test]
    async fn attempts_start_and_end_with_their_builds() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("farmer.db")).await.unwrap();
        let cancelled = store.create_build(&new_build(1)).await.unwrap().unwrap().id;
        assert!(store.cancel_queued(cancelled, "no").await.unwrap());
        assert_eq!(
            store.start_attempt(cancelled, "m", "h").await.unwrap(),
            None
        );
        assert!(store.attempts(cancelled).await.unwrap().is_empty());

        let id = store.create_build(&new_build(2)).await.unwrap().unwrap().id;
        let (attempt, number) = store.start_attempt(id, "m1", "h").await.unwrap().unwrap();
        assert_eq!(number, 1);
        // Running already: no second attempt.
        assert_eq!(store.start_attempt(id, "m2", "h").await.unwrap(), None);
        let b = store.build(id).await.unwrap().unwrap();
        assert_eq!((b.status, b.attempts), (BuildStatus::Running, 1));
        let a = store.attempts(id).await.unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!((a[0].id, a[0].machine.as_str()), (attempt, "m1"));

        // The last step ends with its attempt.
        let step = store.start_step(id, attempt, 1, "s").await.unwrap();
        let step_end = StepEnd {
            step_id: step,
            result: RunResult::Failed,
            detail: "exit status 1".into(),
            log: bytes::Bytes::from_static(b"the step's log\n"),
        };
        let ended = store
            .end_attempt(
                (attempt, id),
                RunResult::Passed,
                "",
                (BuildStatus::Passed, "", true),
                (b"the whole log\n", Some(&step_end)),
            )
            .await
            .unwrap();
        assert!(ended);
        let s = &store.steps(id).await.unwrap()[0];
        assert_eq!(
            (s.result, s.detail.as_str(), s.log_size),
            (RunResult::Failed, "exit status 1", 15)
        );
        assert!(s.finished_at.is_some());
        assert_eq!(
            store.step_log(step).await.unwrap().unwrap(),
            b"the step's log\n"
        );
        let b = store.build(id).await.unwrap().unwrap();
        assert_eq!((b.status, b.flaky), (BuildStatus::Passed, true));
        let a = store.attempts(id).await.unwrap();
        assert_eq!(a[0].result, RunResult::Passed);
        assert!(a[0].finished_at.is_some());
        assert_eq!(
            store
                .attempt_logs(id)
                .await
                .unwrap()
                .get(&attempt)
                .map(Vec::as_slice),
            Some(&b"the whole log\n"[..])
        );
        // Final already: the build keeps its status, the log is replaced.
        let again = store
            .end_attempt(
                (attempt, id),
                RunResult::Failed,
                "late",
                (BuildStatus::Failed, "late", false),
                (b"later\n", None),
            )
            .await
            .unwrap();
        assert!(!again);
        let b = store.build(id).await.unwrap().unwrap();
        assert_eq!((b.status, b.error.as_str()), (BuildStatus::Passed, ""));
        // Cancelled while it ran: the end neither passes it nor marks it
        // flaky, but keeps the attempt's end and log.
        let id4 = store.create_build(&new_build(4)).await.unwrap().unwrap().id;
        let (a4, _) = store.start_attempt(id4, "m", "h").await.unwrap().unwrap();
        assert!(
            store
                .finish_build(id4, BuildStatus::Cancelled, "by an admin")
                .await
                .unwrap()
        );
        let ended = store
            .end_attempt(
                (a4, id4),
                RunResult::Passed,
                "",
                (BuildStatus::Passed, "", true),
                (b"x\n", None),
            )
            .await
            .unwrap();
        assert!(!ended);
        let b = store.build(id4).await.unwrap().unwrap();
        assert_eq!((b.status, b.flaky), (BuildStatus::Cancelled, false));
        assert_eq!(
            store.attempts(id4).await.unwrap()[0].result,
            RunResult::Passed
        );
        assert!(store.attempt_logs(id4).await.unwrap().contains_key(&a4));
        assert_eq!(
            store.attempts(id).await.unwrap()[0].result,
            RunResult::Passed
        );

        // A lost attempt, re-queued: the next one is number 2.
        let id = store.create_build(&new_build(3)).await.unwrap().unwrap().id;
        let (first, _) = store.start_attempt(id, "m", "h").await.unwrap().unwrap();
        store
            .finish_attempt(first, RunResult::InfraError, "gone")
            .await
            .unwrap();
        assert!(store.requeue(id).await.unwrap());
        let (second, number) = store.start_attempt(id, "m", "h").await.unwrap().unwrap();
        assert_ne!(first, second);
        assert_eq!(number, 2);
    }
}
