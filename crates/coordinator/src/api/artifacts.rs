//! A build's artifacts over the API: the list, and each file streamed from
//! the artifact store (never read whole into memory).

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{ApiError, ApiResult};
use crate::builds::artifacts::key;
use crate::farm::Farm;

/// `GET /api/builds/{id}/artifacts`: name, size, SHA-256, step and a
/// download URL of each file the build kept.
pub async fn list(
    State(farm): State<Arc<Farm>>,
    Path(id): Path<i64>,
) -> ApiResult<Json<serde_json::Value>> {
    if farm.store.build(id).await?.is_none() {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no build {id}")));
    }
    Ok(Json(json!(listing(
        id,
        &farm.store.build_artifacts(id).await?
    ))))
}

/// A build's kept files as the API shows them (the list and the build's
/// detail): name, size, SHA-256, attempt, step and download URL.
pub fn listing(build: i64, files: &[crate::store::BuildArtifact]) -> Vec<serde_json::Value> {
    files
        .iter()
        .map(|f| {
            json!({
                "name": f.name,
                "size": f.size,
                "sha256": f.sha256,
                "attempt_id": f.attempt_id,
                "step_id": f.step_id,
                "url": download_path(build, &f.name),
            })
        })
        .collect()
}

/// Where a build's file downloads: each path segment percent-encoded.
pub fn download_path(build: i64, name: &str) -> String {
    let segs: Vec<String> = name
        .split('/')
        .map(|s| {
            form_urlencoded::byte_serialize(s.as_bytes())
                .collect::<String>()
                .replace('+', "%20")
        })
        .collect();
    format!("/api/builds/{build}/artifacts/{}", segs.join("/"))
}

/// `GET /api/builds/{id}/artifacts/{name}`: the file, streamed.
pub async fn download(
    State(farm): State<Arc<Farm>>,
    Path((id, name)): Path<(i64, String)>,
) -> Result<Response, ApiError> {
    let Some(f) = farm.store.build_artifact(id, &name).await? else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("build {id} kept no file {name:?}"),
        ));
    };
    let store = farm.artifacts();
    let obj = store
        .open(&key(&f.sha256))
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading {name}: {e}"),
            )
        })?
        .ok_or_else(|| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "{name} of build {id} is missing from the {}",
                    store.describe()
                ),
            )
        })?;
    // The file name as a browser saves it: its last segment, quoted safely.
    let base: String = f
        .name
        .rsplit('/')
        .next()
        .unwrap_or("artifact")
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' {
                c
            } else {
                '_'
            }
        })
        .collect();
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, obj.size)
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{base}\""),
        )
        .header("x-content-sha256", &f.sha256)
        .body(Body::from_stream(obj.body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}
