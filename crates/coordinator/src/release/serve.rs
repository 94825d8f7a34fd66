//! The release endpoints: `/stage0/manifest`, `/stage0/buildlet`,
//! `/stage0/release-key` (what stage0 on every machine fetches) and
//! `/api/releases`. Apart from the releases' state ([`super`]) because the
//! handlers take the farm (its releases and its config) while the farm holds
//! that state: the state stays below the farm, these handlers above it.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use stage0::Platform;

use super::{blob_key, release_json};
use crate::farm::Farm;

/// The stage0 endpoints and `/api/releases`.
pub fn router(farm: Arc<Farm>) -> Router {
    Router::new()
        .route(stage0::MANIFEST_PATH, get(manifest))
        .route(stage0::BINARY_PATH, get(binary))
        .route(stage0::KEY_PATH, get(release_key))
        .route("/api/releases", get(releases))
        .with_state(farm)
}

#[derive(Deserialize)]
struct PlatformQuery {
    os: Option<String>,
    arch: Option<String>,
    sha256: Option<String>,
}

fn text(status: StatusCode, msg: String) -> Response {
    (status, format!("{msg}\n")).into_response()
}

/// The platform a request asks for (a `400` sentence if it is missing or bad).
fn platform_of(q: &PlatformQuery) -> Result<Platform, String> {
    match (&q.os, &q.arch) {
        (Some(os), Some(arch)) => Platform::parse(os, arch),
        _ => Err("pass ?os=OS&arch=ARCH (like os=linux&arch=x86_64)".into()),
    }
}

fn no_release(p: &Platform) -> Response {
    text(
        StatusCode::NOT_FOUND,
        format!(
            "no buildlet is published for {p}; the farm admin can run `farmer buildlet publish --os {} --arch {} FILE`",
            p.os, p.arch
        ),
    )
}

async fn manifest(State(farm): State<Arc<Farm>>, Query(q): Query<PlatformQuery>) -> Response {
    let p = match platform_of(&q) {
        Ok(p) => p,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    farm.releases.refresh().await;
    match farm.releases.current(&p) {
        Some(m) => ([(header::CACHE_CONTROL, "no-cache")], Json(m)).into_response(),
        None => no_release(&p),
    }
}

async fn binary(State(farm): State<Arc<Farm>>, Query(q): Query<PlatformQuery>) -> Response {
    let p = match platform_of(&q) {
        Ok(p) => p,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    farm.releases.refresh().await;
    let m = match q.sha256.as_deref().filter(|s| !s.is_empty()) {
        Some(sha) => match farm.releases.find(&p, &sha.to_ascii_lowercase()) {
            Some(m) => m,
            None => {
                return text(
                    StatusCode::NOT_FOUND,
                    format!("no buildlet with sha256 {sha} was published for {p}"),
                );
            }
        },
        None => match farm.releases.current(&p) {
            Some(m) => m,
            None => return no_release(&p),
        },
    };
    // Never serve a blob that does not match its manifest: stage0 would
    // refuse it anyway, after downloading it. Checked once per stored
    // version of the blob, not per download.
    if let Err(e) = farm.releases.check_blob(&m, &p).await {
        return text(StatusCode::INTERNAL_SERVER_ERROR, e);
    }
    match farm.releases.store().open(&blob_key(&m.sha256)).await {
        Ok(Some(obj)) => Response::builder()
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, obj.size)
            .header(buildlet::proto::HDR_BINARY_SHA256, &m.sha256)
            .header(
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"buildlet-{}-{}\"", m.os, m.arch),
            )
            .body(Body::from_stream(obj.body))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()),
        Ok(None) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "the binary of buildlet {} for {p} is missing from {}",
                m.version,
                farm.releases.store().describe()
            ),
        ),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading buildlet {} for {p}: {e}", m.version),
        ),
    }
}

async fn release_key(State(farm): State<Arc<Farm>>) -> Response {
    farm.releases.refresh().await;
    match farm.releases.public_key() {
        Some(k) => text(StatusCode::OK, k),
        None => text(
            StatusCode::NOT_FOUND,
            "this farm has no release key yet: `farmer buildlet publish` creates it".into(),
        ),
    }
}

async fn releases(State(farm): State<Arc<Farm>>) -> Json<serde_json::Value> {
    farm.releases.refresh().await;
    let history: Vec<_> = {
        let l = farm
            .releases
            .loaded
            .read()
            .unwrap_or_else(|e| e.into_inner());
        l.index.history.iter().rev().map(release_json).collect()
    };
    Json(json!({
        "release_key": farm.releases.public_key(),
        "current": farm.releases.all_current().iter().map(release_json).collect::<Vec<_>>(),
        "history": history,
        "warnings": farm
            .releases
            .warnings(farm.config().farm.min_buildlet_version),
    }))
}
