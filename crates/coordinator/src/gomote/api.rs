//! The gomote HTTP API: users (admin), instances, groups, and the proxy of
//! the buildlet API for an instance's machine.
//!
//! Every endpoint names its caller with [`Caller`] (401 without a token,
//! 403 with one nobody holds). The proxy forwards only the file and command
//! endpoints of the buildlet (never `/halt` or `/machine-token`); the
//! buildlet checks every path itself, so an escape is refused exactly as
//! the buildlet refuses it.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures_util::TryStreamExt;
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::json;

use super::registry::{InstanceView, Phase, holder};
use super::{err, valid_name};
use crate::api::{ApiError, ApiResult};
use crate::auth::{Admin, Caller};
use crate::farm::Farm;

pub fn router(farm: Arc<Farm>) -> Router {
    Router::new()
        .route("/api/users", get(users).post(user_add))
        .route("/api/users/{name}", delete(user_remove))
        .route("/api/users/{name}/keys", post(user_key_add))
        .route("/api/gomote/info", get(info))
        .route("/api/gomote/instances", get(list).post(create))
        .route("/api/gomote/instances/{name}", get(show).delete(destroy))
        .route("/api/gomote/instances/{name}/ping", post(ping))
        .route(
            "/api/gomote/instances/{name}/buildlet/{*path}",
            axum::routing::any(proxy),
        )
        .route("/api/gomote/groups", get(groups).post(group_create))
        .route("/api/gomote/groups/{name}", delete(group_destroy))
        .route("/api/gomote/groups/{name}/instances", post(group_add))
        .route(
            "/api/gomote/groups/{name}/instances/{instance}",
            delete(group_remove),
        )
        .with_state(farm)
}

/// The prefix of user tokens, so a leaked one is recognizable.
pub const TOKEN_PREFIX: &str = "fgu_";

#[derive(Deserialize)]
struct NewUser {
    name: String,
    #[serde(default)]
    admin: bool,
}

async fn user_add(
    _: Admin,
    State(farm): State<Arc<Farm>>,
    crate::api::JsonBody(u): crate::api::JsonBody<NewUser>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    if !valid_name(&u.name) || u.name == crate::auth::ADMIN_USER {
        return Err(err(
            StatusCode::BAD_REQUEST,
            format!(
                "user name {:?} is not valid: 1 to 64 lowercase letters, digits, '-' and '_', starting with a letter or digit (and not \"admin\", the admin token's name)",
                u.name
            ),
        ));
    }
    let mut raw = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut raw);
    let token = format!("{TOKEN_PREFIX}{}", hex::encode(raw));
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()));
    if !farm.store.user_add(&u.name, &sha, u.admin).await? {
        return Err(err(
            StatusCode::CONFLICT,
            format!("a user named {} exists already", u.name),
        ));
    }
    Ok((
        StatusCode::CREATED,
        Json(json!({ "name": u.name, "admin": u.admin, "token": token })),
    ))
}

async fn users(_: Admin, State(farm): State<Arc<Farm>>) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(json!(farm.store.users().await?)))
}

async fn user_remove(
    _: Admin,
    State(farm): State<Arc<Farm>>,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    if !farm.store.user_remove(&name).await? {
        return Err(err(StatusCode::NOT_FOUND, format!("no user named {name}")));
    }
    farm.gomote.forget_user(&name);
    let mut ended = 0;
    for v in farm.gomote.views(Some(&name)) {
        super::end(&farm, &v.name, "destroyed because its owner was removed").await;
        ended += 1;
    }
    Ok(Json(json!({ "removed": name, "instances_ended": ended })))
}

#[derive(Deserialize)]
struct NewKey {
    key: String,
}

async fn user_key_add(
    caller: Caller,
    State(farm): State<Arc<Farm>>,
    Path(name): Path<String>,
    crate::api::JsonBody(k): crate::api::JsonBody<NewKey>,
) -> ApiResult<Json<serde_json::Value>> {
    if caller.name != name && !caller.admin {
        return Err(err(
            StatusCode::FORBIDDEN,
            "only the user themselves or an admin may add a user's SSH keys",
        ));
    }
    let line = k.key.trim();
    if line.len() > 16 << 10 || line.contains('\n') {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "give one public key line (ssh-ed25519 AAAA... comment), not a file of several",
        ));
    }
    let fp = super::ssh::fingerprint_of_openssh_line(line).map_err(|e| {
        err(
            StatusCode::BAD_REQUEST,
            format!("not an SSH public key: {e}"),
        )
    })?;
    if !farm.store.user_key_add(&name, &fp, line).await? {
        return Err(err(StatusCode::NOT_FOUND, format!("no user named {name}")));
    }
    farm.gomote.add_key(&name, &fp);
    Ok(Json(json!({ "user": name, "fingerprint": fp })))
}

async fn info(caller: Caller, State(farm): State<Arc<Farm>>) -> Json<serde_json::Value> {
    let cfg = farm.config();
    Json(json!({
        "user": caller.name,
        "admin": caller.admin,
        "ssh": farm.ssh_addr(),
        "idle_timeout_secs": cfg.farm.gomote_idle_timeout.as_secs(),
        "max_instances": cfg.farm.gomote_max_instances,
    }))
}

/// An instance with its place in the queue while it waits.
fn with_place(farm: &Farm, v: InstanceView) -> serde_json::Value {
    let mut j = json!(v);
    if v.state == Phase::Waiting
        && let Some((p, n)) = farm.scheduler.position(&v.host_type, &holder(&v.name))
    {
        j["queue_position"] = json!(p);
        j["queue_length"] = json!(n);
        j["waiting_because"] = json!(farm.wait_reason(&v.host_type));
    }
    j
}

#[derive(Deserialize)]
struct NewInstance {
    builder: String,
    #[serde(default)]
    group: Option<String>,
}

async fn create(
    caller: Caller,
    State(farm): State<Arc<Farm>>,
    crate::api::JsonBody(n): crate::api::JsonBody<NewInstance>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    if let Some(g) = &n.group {
        group_owned(&farm, &caller, g).await?;
    }
    let v = super::create(&farm, &caller, &n.builder).await?;
    if let Some(g) = &n.group {
        farm.store.group_member(g, &v.name, true).await?;
    }
    Ok((StatusCode::CREATED, Json(with_place(&farm, v))))
}

async fn list(caller: Caller, State(farm): State<Arc<Farm>>) -> Json<serde_json::Value> {
    let owner = (!caller.admin).then_some(caller.name.as_str());
    let all: Vec<_> = farm
        .gomote
        .views(owner)
        .into_iter()
        .map(|v| with_place(&farm, v))
        .collect();
    Json(json!(all))
}

#[derive(Deserialize, Default)]
struct Wait {
    /// Seconds to wait for a waiting instance to get its machine (at most 30).
    #[serde(default)]
    wait: u64,
}

/// One instance; with `?wait=N` a waiting instance is answered when it gets
/// its machine, or after N seconds with its place in the queue.
async fn show(
    caller: Caller,
    State(farm): State<Arc<Farm>>,
    Path(name): Path<String>,
    axum::extract::Query(w): axum::extract::Query<Wait>,
) -> ApiResult<Json<serde_json::Value>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(w.wait.min(30));
    loop {
        let changed = farm.gomote.changed.notified();
        let v = super::owned(&farm, &caller, &name).await?;
        if v.state == Phase::Ready || tokio::time::Instant::now() >= deadline {
            break;
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            break;
        }
    }
    super::touch(&farm, &name).await;
    let v = super::owned(&farm, &caller, &name).await?;
    Ok(Json(with_place(&farm, v)))
}

async fn ping(
    caller: Caller,
    State(farm): State<Arc<Farm>>,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    super::owned(&farm, &caller, &name).await?;
    super::touch(&farm, &name).await;
    let v = super::owned(&farm, &caller, &name).await?;
    Ok(Json(with_place(&farm, v)))
}

async fn destroy(
    caller: Caller,
    State(farm): State<Arc<Farm>>,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    super::owned(&farm, &caller, &name).await?;
    super::end(&farm, &name, &format!("destroyed by {}", caller.name)).await;
    Ok(Json(json!({ "destroyed": name })))
}

/// The buildlet endpoints a gomote user may call, by method.
fn allowed(method: &Method, path: &str) -> bool {
    matches!(
        (method.as_str(), path),
        ("GET", "status" | "workdir" | "tgz" | "ls")
            | ("PUT", "writetgz" | "write")
            | ("POST", "writetgz" | "removeall" | "exec")
    )
}

/// How long an upload may go without a byte before it is cut.
const UPLOAD_IDLE: Duration = Duration::from_secs(120);

async fn proxy(
    caller: Caller,
    State(farm): State<Arc<Farm>>,
    Path((name, path)): Path<(String, String)>,
    req: Request,
) -> Response {
    match forward(&farm, &caller, &name, &path, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn forward(
    farm: &Arc<Farm>,
    caller: &Caller,
    name: &str,
    path: &str,
    req: Request,
) -> Result<Response, ApiError> {
    if !allowed(req.method(), path) {
        return Err(err(
            StatusCode::NOT_FOUND,
            format!(
                "{} /{path} is not a gomote call: instances take GET status, workdir, tgz, ls; PUT writetgz, write; POST writetgz, removeall, exec",
                req.method()
            ),
        ));
    }
    let (lease, active) = super::machine(farm, caller, name).await?;
    if let Some(d) = req.extensions().get::<httpguard::BodyDeadline>() {
        d.relax(UPLOAD_IDLE);
    }
    let (parts, body) = req.into_parts();
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let active = Arc::new(active);
    let counter = active.clone();
    // The request body crosses to the machine's link through a small
    // channel: axum's body is not `Sync`, the client's must be, and the
    // channel keeps backpressure.
    let (tx, rx) =
        tokio::sync::mpsc::channel::<Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>>(4);
    tokio::spawn(async move {
        let mut data = body.into_data_stream();
        loop {
            let item = match data.try_next().await {
                Ok(Some(chunk)) => {
                    counter.received(chunk.len() as u64);
                    Ok(hyper::body::Frame::data(chunk))
                }
                Ok(None) => break,
                Err(e) => Err(std::io::Error::other(e)),
            };
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                break;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let body = BodyExt::boxed(http_body_util::StreamBody::new(stream));
    let mut out = http::Request::builder()
        .method(parts.method.clone())
        .uri(format!("/{path}{query}"));
    for h in [http::header::CONTENT_TYPE, http::header::TE] {
        if let Some(v) = parts.headers.get(&h) {
            out = out.header(h, v.clone());
        }
    }
    let out = out.body(body).map_err(|e| {
        err(
            StatusCode::BAD_REQUEST,
            format!("cannot forward this request: {e}"),
        )
    })?;
    // Uploads answer after the last byte; everything else at once.
    let wait = if parts.method == Method::PUT || path == "writetgz" {
        Duration::from_secs(24 * 3600)
    } else {
        Duration::from_secs(60)
    };
    let resp = lease.client.forward(out, wait).await.map_err(|e| {
        err(
            StatusCode::BAD_GATEWAY,
            format!(
                "instance {name}'s machine {} did not answer: {e}",
                lease.hostname
            ),
        )
    })?;
    // The guard lives as long as the response body: a command that runs
    // keeps its instance from expiring.
    let (parts, body) = resp.into_parts();
    let body = Guarded {
        body,
        _active: active,
    };
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// A response body that holds an [`super::Active`] guard until it ends.
struct Guarded<B> {
    body: B,
    _active: Arc<super::Active>,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

async fn group_owned(
    farm: &Arc<Farm>,
    caller: &Caller,
    name: &str,
) -> Result<crate::store::GroupRow, ApiError> {
    match farm.store.group(name).await? {
        Some(g) if g.owner == caller.name || caller.admin => Ok(g),
        Some(_) => Err(err(
            StatusCode::FORBIDDEN,
            format!("group {name} is not yours: a user sees and changes only their own groups"),
        )),
        None => Err(err(
            StatusCode::NOT_FOUND,
            format!("no group named {name}; create it with `farmer gomote group create {name}`"),
        )),
    }
}

async fn groups(
    caller: Caller,
    State(farm): State<Arc<Farm>>,
) -> ApiResult<Json<serde_json::Value>> {
    let all: Vec<_> = farm
        .store
        .groups()
        .await?
        .into_iter()
        .filter(|g| caller.admin || g.owner == caller.name)
        .collect();
    Ok(Json(json!(all)))
}

#[derive(Deserialize)]
struct NewGroup {
    name: String,
}

async fn group_create(
    caller: Caller,
    State(farm): State<Arc<Farm>>,
    crate::api::JsonBody(g): crate::api::JsonBody<NewGroup>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    if !valid_name(&g.name) {
        return Err(err(
            StatusCode::BAD_REQUEST,
            format!(
                "group name {:?} is not valid: 1 to 64 lowercase letters, digits, '-' and '_'",
                g.name
            ),
        ));
    }
    if !farm.store.group_add(&g.name, &caller.name).await? {
        return Err(err(
            StatusCode::CONFLICT,
            format!("a group named {} exists already", g.name),
        ));
    }
    Ok((StatusCode::CREATED, Json(json!({ "group": g.name }))))
}

async fn group_destroy(
    caller: Caller,
    State(farm): State<Arc<Farm>>,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    group_owned(&farm, &caller, &name).await?;
    farm.store.group_remove(&name).await?;
    Ok(Json(json!({ "destroyed": name })))
}

#[derive(Deserialize)]
struct Member {
    instance: String,
}

async fn group_add(
    caller: Caller,
    State(farm): State<Arc<Farm>>,
    Path(name): Path<String>,
    crate::api::JsonBody(m): crate::api::JsonBody<Member>,
) -> ApiResult<Json<serde_json::Value>> {
    group_owned(&farm, &caller, &name).await?;
    super::owned(&farm, &caller, &m.instance).await?;
    farm.store.group_member(&name, &m.instance, true).await?;
    Ok(Json(json!(group_owned(&farm, &caller, &name).await?)))
}

async fn group_remove(
    caller: Caller,
    State(farm): State<Arc<Farm>>,
    Path((name, instance)): Path<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    group_owned(&farm, &caller, &name).await?;
    farm.store.group_member(&name, &instance, false).await?;
    Ok(Json(json!(group_owned(&farm, &caller, &name).await?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_file_and_command_calls_pass() {
        for (m, p) in [
            (Method::GET, "ls"),
            (Method::GET, "tgz"),
            (Method::PUT, "writetgz"),
            (Method::POST, "exec"),
            (Method::POST, "removeall"),
        ] {
            assert!(allowed(&m, p), "{m} {p}");
        }
        for (m, p) in [
            (Method::POST, "halt"),
            (Method::GET, "machine-token"),
            (Method::GET, "exec"),
            (Method::DELETE, "ls"),
            (Method::GET, "ls/../halt"),
        ] {
            assert!(!allowed(&m, p), "{m} {p}");
        }
    }
}
