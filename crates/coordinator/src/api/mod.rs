//! The JSON API under `/api/`, plus `/metrics`, `/healthz` and `/reverse`.
//!
//! Reads are open; writes (trigger, cancel, rebuild) need the admin token as
//! `Authorization: Bearer TOKEN`. Errors are JSON `{"error": "..."}` with a
//! sentence saying what was wrong. The `/metrics` text is written in
//! [`metrics`].

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;

use crate::auth::Caller;
use crate::farm::{Farm, TriggerError};
use crate::store::{BuildFilter, BuildKind, BuildStatus};

pub mod artifacts;
pub mod metrics;

pub fn router(farm: Arc<Farm>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(buildlet::proto::REVERSE_PATH, get(crate::reverse::handle))
        .route("/metrics", get(metrics_text))
        .route("/api/status", get(status))
        .route("/api/builders", get(builders))
        .route("/api/hosts", get(hosts))
        .route("/api/machines", get(machines))
        .route("/api/queue", get(queue))
        .route("/api/sources", get(sources))
        .route("/api/commits", get(commits))
        .route("/api/builds", get(list_builds).post(trigger))
        .route("/api/history", get(history))
        .route("/api/builds/{id}", get(build))
        .route("/api/builds/{id}/log", get(build_log))
        .route("/api/builds/{id}/artifacts", get(artifacts::list))
        .route(
            "/api/builds/{id}/artifacts/{*name}",
            get(artifacts::download),
        )
        .route("/api/builds/{id}/cancel", post(cancel))
        .route("/api/builds/{id}/rebuild", post(rebuild))
        .with_state(farm)
}

pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl From<TriggerError> for ApiError {
    fn from(e: TriggerError) -> Self {
        let code = match e {
            TriggerError::NotFound(_) => StatusCode::NOT_FOUND,
            TriggerError::Forbidden(_) => StatusCode::FORBIDDEN,
            TriggerError::Invalid(_) => StatusCode::BAD_REQUEST,
            TriggerError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

async fn metrics_text(State(farm): State<Arc<Farm>>) -> Response {
    let body = metrics::render(&farm).await;
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response()
}

/// Test results `/api/builds/{id}` lists (failing first).
const TESTS_LISTED: i64 = 1000;

/// The sampled queues and machines of the last hours (the status page's
/// charts), oldest first.
async fn history(State(farm): State<Arc<Farm>>) -> Json<serde_json::Value> {
    Json(json!({
        "every_secs": crate::history::EVERY.as_secs(),
        "samples": farm.history.samples(),
        // Where things stand as of this answer (the charts' last point).
        "now": farm.current(),
    }))
}

async fn status(State(farm): State<Arc<Farm>>) -> ApiResult<Json<serde_json::Value>> {
    let running: Vec<_> = farm
        .running_builds()
        .iter()
        .map(|r| {
            json!({
                "id": r.build_id,
                "machine": *r.machine.lock().unwrap_or_else(|e| e.into_inner()),
                "step": *r.step.lock().unwrap_or_else(|e| e.into_inner()),
            })
        })
        .collect();
    Ok(Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": farm.started.elapsed().as_secs(),
        "store": farm.store.engine(),
        "leading": farm.leading(),
        "leader": farm.store.leader().await?,
        "health": crate::view::health(&farm, &farm.store.machines().await?),
        "refusals": farm.pool.recent_refusals(),
        "running": running,
        "tls_fingerprint": farm.tls_fingerprint,
        "tls_spki_pin": farm.tls_spki_pin,
        "buildlets": crate::release::status_json(
            &farm.releases,
            &farm.pool,
            farm.config().farm.min_buildlet_version,
        ),
    })))
}

async fn builders(State(farm): State<Arc<Farm>>) -> Json<serde_json::Value> {
    let cfg = farm.config();
    let v: Vec<_> = cfg
        .builders
        .values()
        .map(|b| {
            json!({
                "name": b.name,
                "host_type": b.host_type,
                "repos": b.repos,
                "branches": b.branches,
                "presubmit": b.presubmit,
                "timeout_secs": b.timeout.as_secs(),
                "notes": b.notes,
                "steps": b.steps.iter().map(|s| json!({"name": s.name, "command": s.command, "dir": s.dir, "timeout_secs": s.timeout.as_secs(), "shard": s.shard.as_ref().map(|sh| json!({"list": sh.list, "run": sh.run, "helpers": sh.helpers, "try_helpers": sh.try_helpers}))})).collect::<Vec<_>>(),
            })
        })
        .collect();
    Json(json!(v))
}

async fn hosts(State(farm): State<Arc<Farm>>) -> Json<serde_json::Value> {
    let cfg = farm.config();
    let counts = farm.pool.counts();
    let v: Vec<_> = cfg
        .hosts
        .values()
        .map(|h| {
            let c = counts.get(&h.name).copied().unwrap_or_default();
            json!({
                "name": h.name,
                "pool": h.pool.as_str(),
                "expected": h.expected,
                "connected": c.connected,
                "busy": c.busy,
                "owners": h.owners,
                "notes": h.notes,
                "trusted": h.trusted,
                "dimensions": h.dimensions,
            })
        })
        .collect();
    Json(json!(v))
}

async fn machines(State(farm): State<Arc<Farm>>) -> ApiResult<Json<serde_json::Value>> {
    let connected = farm.pool.snapshot();
    let names: std::collections::HashSet<&str> =
        connected.iter().map(|m| m.hostname.as_str()).collect();
    let seen: Vec<_> = farm
        .store
        .machines()
        .await?
        .into_iter()
        .filter(|m| !names.contains(m.hostname.as_str()))
        .collect();
    Ok(Json(
        json!({ "connected": connected, "disconnected": seen }),
    ))
}

/// Where each host type's machines come from, and what an exec pool is
/// doing: its machines by state and its failures by reason.
async fn sources(State(farm): State<Arc<Farm>>) -> Json<serde_json::Value> {
    Json(json!(farm.sources.views()))
}

async fn queue(State(farm): State<Arc<Farm>>) -> Json<serde_json::Value> {
    let v: Vec<_> = farm
        .scheduler
        .views(crate::scheduler::VIEW_LIMIT)
        .into_iter()
        .map(|q| {
            let reason = farm.wait_reason(&q.host_type);
            json!({
                "host_type": q.host_type,
                "waiting": q.waiting,
                "oldest_wait_secs": q.oldest_wait_secs,
                "by_kind": q.by_kind,
                "build_ids": q.build_ids,
                "requests": q.requests,
                "reason": reason,
            })
        })
        .collect();
    Json(json!(v))
}

#[derive(Deserialize)]
struct CommitsQuery {
    repo: Option<String>,
    branch: Option<String>,
    limit: Option<i64>,
    offset: Option<i64>,
}

async fn commits(
    State(farm): State<Arc<Farm>>,
    Query(q): Query<CommitsQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let cfg = farm.config();
    let repo = q
        .repo
        .or_else(|| cfg.repos.keys().next().cloned())
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "the config defines no repo".into()))?;
    let rc = cfg
        .repos
        .get(&repo)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no repo named {repo:?}")))?;
    let branch = q
        .branch
        .or_else(|| rc.branches.first().cloned())
        .unwrap_or_else(|| "main".into());
    let c = farm
        .store
        .commits(
            &repo,
            &branch,
            q.limit.unwrap_or(50).clamp(1, 1000),
            q.offset.unwrap_or(0).max(0),
        )
        .await?;
    Ok(Json(
        json!({ "repo": repo, "branch": branch, "commits": c }),
    ))
}

#[derive(Deserialize)]
struct BuildsQuery {
    builder: Option<String>,
    repo: Option<String>,
    commit: Option<String>,
    status: Option<String>,
    machine: Option<String>,
    host_type: Option<String>,
    limit: Option<i64>,
    before: Option<i64>,
}

/// The most builds one `/api/builds` answer lists.
pub const MAX_BUILDS_PAGE: i64 = 1000;

async fn list_builds(
    State(farm): State<Arc<Farm>>,
    Query(q): Query<BuildsQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(
            s.parse::<BuildStatus>()
                .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?,
        ),
    };
    let f = BuildFilter {
        builder: q.builder,
        repo: q.repo,
        commit: q.commit,
        status,
        machine: q.machine,
        host_type: q.host_type,
        before: q.before,
        // Bounded: a negative limit would mean "all rows" to SQLite.
        limit: q.limit.unwrap_or(100).clamp(1, MAX_BUILDS_PAGE),
    };
    Ok(Json(json!(farm.store.builds(&f).await?)))
}

async fn build(
    State(farm): State<Arc<Farm>>,
    Path(id): Path<i64>,
) -> ApiResult<Json<serde_json::Value>> {
    let b = farm
        .store
        .build(id)
        .await?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no build {id}")))?;
    let attempts = farm.store.attempts(id).await?;
    let steps = farm.store.steps(id).await?;
    let rb = farm.running(id);
    let lock = |m: &std::sync::Mutex<String>| m.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let current_step = rb.as_ref().map(|r| lock(&r.step));
    let progress = rb
        .as_ref()
        .map(|r| lock(&r.progress))
        .filter(|p| !p.is_empty());
    let shards = crate::shard::report::build(&farm.store.unit_runs(id).await?);
    let test_counts = farm.store.build_test_counts(id).await?;
    let tests = farm.store.build_tests(id, TESTS_LISTED).await?;
    Ok(Json(json!({
        "build": b,
        "attempts": attempts,
        "steps": steps,
        "current_step": current_step,
        "progress": progress,
        "shards": shards,
        "test_counts": test_counts,
        "tests": tests,
        "artifacts": artifacts::listing(id, &farm.store.build_artifacts(id).await?),
    })))
}

/// The full text log of a build: followed live while it runs, as the live
/// log showed it once it is done (from the stored attempt logs).
async fn build_log(State(farm): State<Arc<Farm>>, Path(id): Path<i64>) -> ApiResult<Response> {
    if let Some(rb) = farm.running(id) {
        let stream = rb
            .log
            .clone()
            .follow()
            .map(Ok::<_, std::convert::Infallible>);
        return Ok((
            [
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            Body::from_stream(stream),
        )
            .into_response());
    }
    let b = farm
        .store
        .build(id)
        .await?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no build {id}")))?;
    let attempts = farm.store.attempts(id).await?;
    // Every attempt's whole log, as the live log showed it, when stored.
    let whole = farm.store.attempt_logs(id).await?;
    if !attempts.is_empty() && attempts.iter().all(|a| whole.contains_key(&a.id)) {
        let mut out = Vec::new();
        for a in &attempts {
            out.extend_from_slice(&whole[&a.id]);
        }
        return Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], out).into_response());
    }
    // Older builds (and attempts cut short by a crash): assembled from
    // the step logs.
    let mut out = Vec::new();
    let steps = farm.store.steps(id).await?;
    for a in &attempts {
        out.extend_from_slice(
            format!(
                "farmer: build {id} attempt {} on {} ({}): {}\n",
                a.number, a.machine, a.host_type, a.result
            )
            .as_bytes(),
        );
        for s in steps.iter().filter(|s| s.attempt_id == a.id) {
            out.extend_from_slice(format!("\n--- step {}: {}\n", s.name, s.result).as_bytes());
            if let Some(log) = farm.store.step_log(s.id).await? {
                out.extend_from_slice(&log);
            }
        }
        if !a.error.is_empty() {
            out.extend_from_slice(format!("farmer: {}\n", a.error).as_bytes());
        }
    }
    out.extend_from_slice(
        format!(
            "farmer: build {id} {}{}\n",
            b.status,
            if b.error.is_empty() {
                String::new()
            } else {
                format!(": {}", b.error)
            }
        )
        .as_bytes(),
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], out).into_response())
}

#[derive(Deserialize)]
struct TriggerBody {
    builder: String,
    #[serde(default)]
    commit: String,
    repo: Option<String>,
    branch: Option<String>,
    kind: Option<String>,
}

/// A JSON request body, whatever its `Content-Type` says: `curl -d` sends
/// `application/x-www-form-urlencoded`, and a body that parses as the JSON
/// asked for is what matters. Bounded by the router's body limit; a body
/// that is not that JSON is a `400` that says why.
pub struct JsonBody<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError(e.status(), e.body_text()))?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("the body is not the JSON expected: {e}"),
            )
        })
    }
}

/// Who a build is recorded as requested by: `admin`, or the user's name.
fn requester(c: &Caller) -> String {
    c.name.clone()
}

/// Most builds one user may have queued or running at once.
pub const USER_BUILDS: i64 = 20;

/// A user (not the admin) may queue interactive and pre-submit builds
/// only — a post-submit or release build speaks for a branch — and at most
/// [`USER_BUILDS`] at a time.
async fn user_may_queue(farm: &Farm, caller: &Caller, kind: BuildKind) -> ApiResult<()> {
    if caller.admin {
        return Ok(());
    }
    if !matches!(kind, BuildKind::Interactive | BuildKind::PreSubmit) {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "users may queue interactive and pre-submit builds; a {} build needs the admin token",
                kind.as_str()
            ),
        ));
    }
    let active = farm.store.active_builds_of(&caller.name).await?;
    if active >= USER_BUILDS {
        return Err(ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{} has {active} builds queued or running, the most a user may; wait for some to finish",
                caller.name
            ),
        ));
    }
    Ok(())
}

async fn trigger(
    State(farm): State<Arc<Farm>>,
    caller: Caller,
    JsonBody(t): JsonBody<TriggerBody>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let kind = match t.kind.as_deref() {
        None | Some("") if caller.admin => BuildKind::PostSubmit,
        None | Some("") => BuildKind::Interactive,
        Some(k) => k
            .parse()
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?,
    };
    user_may_queue(&farm, &caller, kind).await?;
    let id = farm
        .trigger(
            &t.builder,
            t.repo.as_deref(),
            t.branch.as_deref(),
            &t.commit,
            kind,
            &requester(&caller),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(json!({ "id": id }))))
}

async fn cancel(
    State(farm): State<Arc<Farm>>,
    caller: Caller,
    Path(id): Path<i64>,
) -> ApiResult<Json<serde_json::Value>> {
    if !caller.admin {
        let by = farm
            .store
            .requested_by(id)
            .await?
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no build {id}")))?;
        if by != caller.name {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!(
                    "build {id} was not queued by {}: only an admin or the user who queued it may cancel it",
                    caller.name
                ),
            ));
        }
    }
    let st = farm.cancel(id).await?;
    Ok(Json(
        json!({ "id": id, "status": st, "message": if st == BuildStatus::Running { "cancelling: the running command is being stopped" } else { "cancelled" } }),
    ))
}

async fn rebuild(
    State(farm): State<Arc<Farm>>,
    caller: Caller,
    Path(id): Path<i64>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let b = farm
        .store
        .build(id)
        .await?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no build {id}")))?;
    // A user's rebuild of a branch's build is theirs: interactive.
    let kind = match b.kind {
        BuildKind::PostSubmit | BuildKind::Release if !caller.admin => BuildKind::Interactive,
        k => k,
    };
    user_may_queue(&farm, &caller, kind).await?;
    let new = farm
        .trigger(
            &b.builder,
            Some(&b.repo),
            Some(&b.branch),
            &b.commit,
            kind,
            &if caller.admin {
                format!("{}{id}", crate::builds::REBUILD_OF)
            } else {
                requester(&caller)
            },
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": new, "rebuild_of": id })),
    ))
}
