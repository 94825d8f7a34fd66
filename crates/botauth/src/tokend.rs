//! `machine-tokend`: keeps a machine token file fresh.
//!
//! Meant to run from cron every 10 minutes (or with `-loop`). A run does
//! nothing while the token is younger than half its life and the certificate
//! is unchanged; otherwise it signs a token request, asks the coordinator,
//! and writes the token file atomically. Every run records its outcome in a
//! status file next to the token (`<token-file>.status`), so a machine owner
//! can read why refreshing fails without digging through cron mail.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};

use crate::token::{self, TokenFile, TokenResponse};

#[derive(Debug, Clone)]
pub struct Options {
    /// Coordinator base URL, e.g. `https://farm.example:8080`.
    pub backend: String,
    pub cert_pem: PathBuf,
    pub pkey_pem: PathBuf,
    pub token_file: PathBuf,
    pub tls: buildlet::reverse::Tls,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The token is still fresh; nothing was written.
    Fresh { next_update: i64 },
    /// A new token was written.
    Refreshed { expiry: i64, next_update: i64 },
}

/// The status file an owner reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub ok: bool,
    /// Unix seconds of this run.
    pub at: i64,
    pub message: String,
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

pub fn status_path(token_file: &Path) -> PathBuf {
    let mut s = token_file.as_os_str().to_owned();
    s.push(".status");
    PathBuf::from(s)
}

/// One run: refresh if needed, and record the outcome in the status file.
pub async fn run_once(o: &Options) -> Result<Outcome, String> {
    let result = refresh(o).await;
    let status = match &result {
        Ok(Outcome::Fresh { next_update }) => Status {
            ok: true,
            at: now(),
            message: format!("token still fresh; next refresh after {next_update}"),
        },
        Ok(Outcome::Refreshed { expiry, .. }) => Status {
            ok: true,
            at: now(),
            message: format!("token refreshed; expires at {expiry}"),
        },
        Err(e) => Status {
            ok: false,
            at: now(),
            message: e.clone(),
        },
    };
    if let Ok(data) = serde_json::to_vec_pretty(&status) {
        let _ = atomicfile::write(&status_path(&o.token_file), &data, Some(0o644));
    }
    result
}

async fn refresh(o: &Options) -> Result<Outcome, String> {
    let cert_pem = std::fs::read_to_string(&o.cert_pem)
        .map_err(|e| format!("-cert-pem {}: {e}", o.cert_pem.display()))?;
    let key_pem = std::fs::read_to_string(&o.pkey_pem)
        .map_err(|e| format!("-pkey-pem {}: {e}", o.pkey_pem.display()))?;
    let der = token::cert_der(&cert_pem)
        .map_err(|e| format!("-cert-pem {}: {e}", o.cert_pem.display()))?;
    let cert_sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&der))
    };
    let t = now();
    if let Ok(existing) = TokenFile::read(&o.token_file)
        && existing.cert_sha256 == cert_sha
        && t < existing.next_update
        && t < existing.expiry
    {
        return Ok(Outcome::Fresh {
            next_update: existing.next_update,
        });
    }
    let req = token::sign_request(&cert_pem, &key_pem, t)?;
    let resp = post_json(
        o,
        token::TOKEN_PATH,
        &serde_json::to_vec(&req).map_err(|e| e.to_string())?,
    )
    .await?;
    let life = (resp.expiry - t).max(2);
    let file = TokenFile {
        token: resp.token,
        hostname: resp.hostname,
        expiry: resp.expiry,
        last_update: t,
        next_update: t + life / 2,
        cert_sha256: cert_sha,
    };
    file.write(&o.token_file)
        .map_err(|e| format!("writing {}: {e}", o.token_file.display()))?;
    Ok(Outcome::Refreshed {
        expiry: file.expiry,
        next_update: file.next_update,
    })
}

async fn post_json(o: &Options, path: &str, body: &[u8]) -> Result<TokenResponse, String> {
    let url = format!("{}{path}", o.backend.trim_end_matches('/'));
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("-backend {:?}: {e}", o.backend))?;
    let connector = buildlet::reverse::https_connector(&o.tls).map_err(|e| e.to_string())?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, http_body_util::Full<Bytes>>(connector);
    let req = http::Request::post(uri)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(Bytes::copy_from_slice(body)))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .map_err(|_| format!("{url}: no answer within 30s"))?
        .map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{url}: {e}"))?
        .to_bytes();
    if !status.is_success() {
        let msg = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_string());
        return Err(format!(
            "the coordinator refused the token request ({status}): {msg}"
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("{url}: unexpected answer: {e}"))
}
