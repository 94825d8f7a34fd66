//! `POST /hooks/github`, `/hooks/gitea` (also Forgejo), `/hooks/gitlab`:
//! a forge telling the farm about a push (the repo is polled at once; the
//! timed poll stays as the safety net) or a pull request (its head is
//! fetched and built on the builders that take pre-submit work).
//!
//! The repo is the one named by `?repo=NAME`, else the one whose
//! `[repos.X.forge] repository` is the payload's repository. Every
//! delivery, accepted or refused, is recorded for the repo's page; a
//! refused one changes nothing else.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::json;

use super::event::{self, Event};
use super::verify;
use crate::config::{ForgeKind, RepoConfig};
use crate::farm::Farm;
use crate::store::{BuildFilter, BuildKind, BuildStatus};

/// Largest payload accepted. GitHub caps its own at 25 MB, but a push
/// that large lists thousands of commits farmer does not read; a few MiB
/// covers real pushes and pull requests.
pub const MAX_PAYLOAD: usize = 4 << 20;
/// How long a delivery's body may take to arrive (forges send it at once).
const BODY_TIME: Duration = Duration::from_secs(10);
/// How long fetching a pull request's head may take before the forge
/// (which waits about 10 s) is answered anyway.
const PULL_FETCH_LIMIT: Duration = Duration::from_secs(8);

pub fn router(farm: Arc<Farm>) -> Router {
    Router::new()
        .route("/hooks/{forge}", post(receive))
        // The body is read (and bounded) by the handler itself, so an
        // oversized delivery is recorded rather than cut by a layer.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(farm)
}

#[derive(Deserialize)]
struct HookQuery {
    repo: Option<String>,
}

/// An answer to the forge, recorded as a delivery when a repo is known.
struct Outcome {
    code: StatusCode,
    accepted: bool,
    detail: String,
}

fn refuse(code: StatusCode, detail: impl Into<String>) -> Outcome {
    Outcome {
        code,
        accepted: false,
        detail: detail.into(),
    }
}

fn accept(detail: impl Into<String>) -> Outcome {
    Outcome {
        code: StatusCode::OK,
        accepted: true,
        detail: detail.into(),
    }
}

impl IntoResponse for Outcome {
    fn into_response(self) -> Response {
        let body = if self.accepted {
            json!({ "accepted": true, "detail": self.detail })
        } else {
            json!({ "accepted": false, "error": self.detail })
        };
        (self.code, Json(body)).into_response()
    }
}

/// Webhook bodies read at once; more wait for a turn (a forge retries a
/// delivery that times out).
const CONCURRENT: usize = 8;
static TURNS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(CONCURRENT);

async fn receive(
    State(farm): State<Arc<Farm>>,
    Path(forge): Path<String>,
    Query(q): Query<HookQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(kind) = ForgeKind::from_name(&forge) else {
        return refuse(
            StatusCode::NOT_FOUND,
            format!("no webhook for forge {forge:?}; use /hooks/github, /hooks/gitea, /hooks/forgejo or /hooks/gitlab"),
        )
        .into_response();
    };
    let cfg = farm.config();
    let named = q.repo.as_deref().map(|r| cfg.repos.get(r).ok_or(r));
    if let Some(Err(r)) = named {
        return refuse(
            StatusCode::NOT_FOUND,
            format!("no repo named {r:?} in the config"),
        )
        .into_response();
    }
    // Taken after the cheap refusals above, so only real deliveries wait.
    let Ok(_turn) = tokio::time::timeout(Duration::from_secs(10), TURNS.acquire()).await else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many webhook deliveries at once; try again",
        )
        .into_response();
    };
    // At most MAX_PAYLOAD bytes are read, within BODY_TIME (a trickled
    // body must not hold a turn); more, or slower, is refused.
    let read = tokio::time::timeout(
        BODY_TIME,
        http_body_util::Limited::new(body, MAX_PAYLOAD).collect(),
    );
    let bytes = match read.await {
        Ok(Ok(b)) => b.to_bytes(),
        Err(_) => {
            return refuse(
                StatusCode::REQUEST_TIMEOUT,
                format!("the payload did not arrive within {BODY_TIME:?}; nothing was done"),
            )
            .into_response();
        }
        Ok(Err(_)) => {
            let o = refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the payload is larger than {} MiB; nothing was done",
                    MAX_PAYLOAD >> 20
                ),
            );
            if let Some(Ok(rc)) = named {
                record(&farm, &rc.name, kind, &headers, &o).await;
            }
            return o.into_response();
        }
    };
    // The repo: named, or the one whose webhook secret signed this body.
    // Nothing is parsed before a signature checks: an unsigned body costs
    // its bytes and an HMAC per configured repo, never a JSON tree.
    let rc: &RepoConfig = match named {
        Some(Ok(rc)) => rc,
        _ => {
            let secrets = farm.secrets();
            let signed_by = cfg.repos.values().find(|r| {
                r.forge.as_ref().is_some_and(|f| {
                    f.kind == kind
                        && f.webhook_secret
                            .as_deref()
                            .and_then(|s| secrets.resolve(s).ok())
                            .is_some_and(|s| verify::check(kind, &headers, &bytes, s).is_ok())
                })
            });
            match signed_by {
                Some(rc) => rc,
                None => {
                    return refuse(
                        StatusCode::UNAUTHORIZED,
                        format!(
                            "no repo with [repos.X.forge] type = {:?} has a webhook secret that verifies this delivery; \
                             name the repo with ?repo=NAME to see why on its page",
                            kind.as_str()
                        ),
                    )
                    .into_response();
                }
            }
        }
    };
    let o = handle(&farm, rc, kind, &headers, &bytes).await;
    record(&farm, &rc.name, kind, &headers, &o).await;
    o.into_response()
}

async fn handle(
    farm: &Arc<Farm>,
    rc: &RepoConfig,
    kind: ForgeKind,
    headers: &HeaderMap,
    body: &[u8],
) -> Outcome {
    let Some(forge) = &rc.forge else {
        return refuse(
            StatusCode::NOT_FOUND,
            format!(
                "repo {} has no [repos.{}.forge] section; webhooks are off for it",
                rc.name, rc.name
            ),
        );
    };
    if forge.kind != kind {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "repo {} is configured for {}, but this is the {} webhook",
                rc.name,
                forge.kind.as_str(),
                kind.as_str()
            ),
        );
    }
    let Some(secret_ref) = &forge.webhook_secret else {
        return refuse(
            StatusCode::FORBIDDEN,
            format!(
                "repo {} has no webhook_secret: unsigned hooks are never trusted",
                rc.name
            ),
        );
    };
    let secret = match farm.secrets().resolve(secret_ref) {
        Ok(s) => s.to_string(),
        Err(e) => {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the webhook secret cannot be read: {e}"),
            );
        }
    };
    if let Err(e) = verify::check(kind, headers, body, &secret) {
        return refuse(StatusCode::UNAUTHORIZED, format!("{e}; nothing was done"));
    }
    let payload: serde_json::Value = match serde_json::from_slice(body) {
        Ok(p) => p,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("the payload is not JSON ({e}); nothing was done"),
            );
        }
    };
    let payload = &payload;
    if let (Some(named), false) = (
        event::repository(kind, payload),
        forge.repository.is_empty(),
    ) && !named.eq_ignore_ascii_case(&forge.repository)
    {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "the payload is about {named}, but repo {} is {}; nothing was done",
                rc.name, forge.repository
            ),
        );
    }
    let ev = match event::parse(kind, &event::name(kind, headers), payload) {
        Ok(e) => e,
        Err(e) => {
            return refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("{e}; nothing was done"),
            );
        }
    };
    match ev {
        Event::Ping => accept("ping: the hook works"),
        Event::Ignored(why) => accept(format!("{why}: nothing to do")),
        Event::Push { branch } => {
            if !rc.branches.contains(&branch) {
                return accept(format!(
                    "push to {branch}, which this repo does not watch: nothing to do"
                ));
            }
            farm.poll_now(&rc.name);
            accept(format!("push to {branch}: polling now"))
        }
        Event::PullRequest {
            number,
            head,
            base,
            author,
        } => match tokio::time::timeout(
            PULL_FETCH_LIMIT,
            presubmit(farm, rc, kind, number, &head, &base, &author),
        )
        .await
        {
            Ok(Ok(detail)) => accept(detail),
            Ok(Err(e)) => refuse(StatusCode::UNPROCESSABLE_ENTITY, e),
            Err(_) => refuse(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "fetching pull request #{number} took over {PULL_FETCH_LIMIT:?}; redeliver the hook to try again"
                ),
            ),
        },
    }
}

/// Fetches a pull request's head and queues pre-submit builds of it on the
/// builders that take them (the trigger refuses untrusted host types).
async fn presubmit(
    farm: &Arc<Farm>,
    rc: &RepoConfig,
    kind: ForgeKind,
    number: u64,
    head: &str,
    base: &str,
    author: &str,
) -> Result<String, String> {
    if head.len() != 40 || !head.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "pull request #{number}: head {head:?} is not a commit hash"
        ));
    }
    let cfg = farm.config();
    let builders: Vec<_> = cfg
        .builders
        .values()
        .filter(|b| b.presubmit && b.builds(&rc.name, base))
        .collect();
    if builders.is_empty() {
        return Ok(format!(
            "pull request #{number} into {base}: no builder with presubmit = true builds {}/{base}; nothing to do",
            rc.name
        ));
    }
    let repo = farm.repo(&rc.name).await?;
    let remote_ref = event::pull_ref(kind, number);
    let local_ref = format!("refs/farmer/pull/{number}");
    let fetched = tokio::task::spawn_blocking(move || repo.fetch_ref(&remote_ref, &local_ref))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("pull request #{number}: {e}"))?;
    if !fetched.eq_ignore_ascii_case(head) {
        // The PR moved on since this delivery: its newer push sends its own.
        return Ok(format!(
            "pull request #{number}: its head is now {} (not {}); that push's hook builds it",
            &fetched[..12.min(fetched.len())],
            &head[..12]
        ));
    }
    let by = if author.is_empty() {
        format!("{} pull request #{number}", kind.as_str())
    } else {
        format!("{} pull request #{number} by {author}", kind.as_str())
    };
    let mut queued = Vec::new();
    let mut skipped = Vec::new();
    for b in builders {
        let existing = farm
            .store
            .builds(&BuildFilter {
                builder: Some(b.name.clone()),
                repo: Some(rc.name.clone()),
                commit: Some(head.to_ascii_lowercase()),
                limit: 50,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        if existing
            .iter()
            .any(|x| x.kind == BuildKind::PreSubmit && x.status != BuildStatus::Cancelled)
        {
            skipped.push(format!("{} (already built)", b.name));
            continue;
        }
        match farm
            .trigger(
                &b.name,
                Some(&rc.name),
                Some(base),
                head,
                BuildKind::PreSubmit,
                &by,
            )
            .await
        {
            Ok(id) => queued.push(format!("{} (build {id})", b.name)),
            Err(e) => skipped.push(format!("{}: {e}", b.name)),
        }
    }
    let mut detail = format!("pull request #{number} at {}:", &head[..12]);
    if !queued.is_empty() {
        detail.push_str(&format!(" queued {}", queued.join(", ")));
    }
    if !skipped.is_empty() {
        detail.push_str(&format!(
            "{} not {}",
            if queued.is_empty() { "" } else { ";" },
            skipped.join(", ")
        ));
    }
    Ok(detail)
}

async fn record(farm: &Farm, repo: &str, kind: ForgeKind, headers: &HeaderMap, o: &Outcome) {
    let id = event::delivery_id(kind, headers);
    let event_name = event::name(kind, headers);
    let detail: String = o.detail.chars().take(2000).collect();
    if o.accepted {
        tracing::info!(%repo, forge = kind.as_str(), event = %event_name, "webhook: {detail}");
    } else {
        tracing::warn!(%repo, forge = kind.as_str(), event = %event_name, "webhook refused: {detail}");
    }
    if let Err(e) = farm
        .store
        .record_delivery(repo, kind.as_str(), &event_name, &id, o.accepted, &detail)
        .await
    {
        tracing::error!("recording a webhook delivery: {e}");
    }
}
