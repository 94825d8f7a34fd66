//! Sending what the farm tells the outside world: commit statuses to the
//! forge, notification webhooks, email. Messages wait in the store's
//! outbox; this loop sends the due ones, retries failures with growing
//! delays (1 s, 2 s, 4 s … at most 15 min, [`MAX_ATTEMPTS`] in all), and
//! gives up at once on an answer that retrying cannot change (a 4xx other
//! than 408 and 429). Nothing here ever waits on a build or holds one up.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use crate::config::ForgeKind;
use crate::farm::Farm;
use crate::store::{BuildStatus, OutboxRow, now_ms};

/// Attempts per message before it is marked failed.
pub const MAX_ATTEMPTS: i64 = 15;
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(15 * 60);
/// The longest one send may take.
const SEND_LIMIT: Duration = Duration::from_secs(20);
/// Messages taken per round.
const BATCH: i64 = 20;
/// Most bytes of an answer kept for an error message.
const MAX_ANSWER: usize = 4 << 10;

/// Why one attempt failed, and whether another could succeed.
struct SendError {
    message: String,
    permanent: bool,
}

impl SendError {
    fn retry(message: impl Into<String>) -> SendError {
        SendError {
            message: message.into(),
            permanent: false,
        }
    }
    fn permanent(message: impl Into<String>) -> SendError {
        SendError {
            message: message.into(),
            permanent: true,
        }
    }
}

/// Sends due messages forever; woken early by `farm.outbox_wake`.
pub async fn deliver_loop(farm: Arc<Farm>) {
    let client = match buildlet::reverse::https_connector(&buildlet::reverse::Tls::WebPki) {
        Ok(c) => hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(c),
        Err(e) => {
            tracing::error!("the outbox cannot make an HTTPS client: {e}; nothing will be sent");
            return;
        }
    };
    loop {
        match farm.store.outbox_due(BATCH).await {
            Ok(rows) => {
                for row in rows {
                    deliver(&farm, &client, &row).await;
                }
            }
            Err(e) => tracing::error!("reading the outbox: {e}"),
        }
        let wait = match farm.store.outbox_next_due().await {
            Ok(Some(at)) => Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0)),
            _ => Duration::from_secs(30),
        }
        .clamp(Duration::from_millis(20), Duration::from_secs(30));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = farm.outbox_wake.notified() => {}
        }
    }
}

type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<bytes::Bytes>,
>;

async fn deliver(farm: &Arc<Farm>, client: &Client, row: &OutboxRow) {
    let r = match tokio::time::timeout(SEND_LIMIT, send(farm, client, row)).await {
        Ok(r) => r,
        Err(_) => Err(SendError::retry(format!("no answer within {SEND_LIMIT:?}"))),
    };
    let stored = match r {
        Ok(()) => {
            tracing::debug!(id = row.id, kind = %row.kind, repo = %row.repo, "outbox: sent");
            farm.store.outbox_sent(row).await
        }
        Err(e) => {
            let attempts = row.attempts + 1;
            let next = (!e.permanent && attempts < MAX_ATTEMPTS).then(|| {
                let delay =
                    Duration::from_secs(1u64 << (attempts - 1).clamp(0, 20)).min(MAX_BACKOFF);
                now_ms() + delay.as_millis() as i64
            });
            let message = farm
                .secrets()
                .mask()
                .apply(e.message.as_bytes())
                .into_owned();
            let message = String::from_utf8_lossy(&message).into_owned();
            tracing::warn!(
                id = row.id,
                kind = %row.kind,
                repo = %row.repo,
                attempts,
                "outbox: sending failed{}: {message}",
                if next.is_some() { "; will retry" } else { "; giving up" }
            );
            farm.store.outbox_failed(row, &message, next).await
        }
    };
    if let Err(e) = stored {
        tracing::error!(id = row.id, "recording an outbox attempt: {e}");
    }
}

async fn send(farm: &Arc<Farm>, client: &Client, row: &OutboxRow) -> Result<(), SendError> {
    let p: Value = serde_json::from_str(&row.payload)
        .map_err(|e| SendError::permanent(format!("the stored message is not JSON: {e}")))?;
    match row.kind.as_str() {
        "status" => send_status(farm, client, &p).await,
        "webhook" => {
            let url = p["url"]
                .as_str()
                .ok_or_else(|| SendError::permanent("no url"))?;
            post(client, url, &[], &p["body"]).await
        }
        "email" => send_email(farm, &p).await,
        other => Err(SendError::permanent(format!(
            "unknown message kind {other:?}"
        ))),
    }
}

/// A commit status for a build, as the build stands now.
async fn send_status(farm: &Arc<Farm>, client: &Client, p: &Value) -> Result<(), SendError> {
    let id = p["build_id"]
        .as_i64()
        .ok_or_else(|| SendError::permanent("no build_id"))?;
    let b = farm
        .store
        .build(id)
        .await
        .map_err(|e| SendError::retry(e.to_string()))?
        .ok_or_else(|| SendError::permanent(format!("build {id} no longer exists")))?;
    let cfg = farm.config();
    let forge = cfg
        .repos
        .get(&b.repo)
        .and_then(|r| r.forge.clone())
        .filter(|f| f.status_token.is_some() && !f.repository.is_empty())
        .ok_or_else(|| {
            SendError::permanent(format!("repo {} no longer sends commit statuses", b.repo))
        })?;
    let token = farm
        .secrets()
        .resolve(forge.status_token.as_deref().unwrap_or_default())
        .map_err(|e| SendError::retry(e.to_string()))?
        .to_string();
    let (state, description) = match b.status {
        BuildStatus::Queued => ("pending", "queued".to_string()),
        BuildStatus::Running => ("pending", "running".to_string()),
        BuildStatus::Passed => ("success", "passed".to_string()),
        BuildStatus::Failed => ("failure", format!("failed: {}", b.error)),
        BuildStatus::InfraError => ("error", format!("infrastructure error: {}", b.error)),
        BuildStatus::Cancelled => ("error", "cancelled".to_string()),
    };
    // The forges cap the description at 140 characters.
    let description: String = description.chars().take(140).collect();
    let body = json!({
        "state": state,
        "target_url": format!("{}/builds/{}", farm.public_url(), b.id),
        "description": description,
        "context": format!("farmer/{}", b.builder),
    });
    let url = format!(
        "{}/repos/{}/statuses/{}",
        forge.api, forge.repository, b.commit
    );
    let headers: Vec<(&str, String)> = match forge.kind {
        ForgeKind::GitHub => vec![
            ("authorization", format!("Bearer {token}")),
            ("accept", "application/vnd.github+json".into()),
            ("x-github-api-version", "2022-11-28".into()),
        ],
        _ => vec![
            ("authorization", format!("token {token}")),
            ("accept", "application/json".into()),
        ],
    };
    post(client, &url, &headers, &body).await
}

/// `scheme://host[:port]/…`: how errors name a URL, since a chat webhook's
/// path or query is its credential.
fn shown(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.split(['/', '?', '#']).next().unwrap_or("");
            let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
            format!("{scheme}://{host}/…")
        }
        None => "(a URL)".to_string(),
    }
}

async fn post(
    client: &Client,
    url: &str,
    headers: &[(&str, String)],
    body: &Value,
) -> Result<(), SendError> {
    let named = shown(url);
    let mut req = http::Request::post(url)
        .header("content-type", "application/json")
        .header("user-agent", concat!("farmer/", env!("CARGO_PKG_VERSION")));
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let req = req
        .body(Full::new(bytes::Bytes::from(body.to_string())))
        .map_err(|e| SendError::permanent(format!("{named}: {e}")))?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| SendError::retry(format!("{named}: {e}")))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let answer = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
        .unwrap_or_default();
    let message = format!("{named} answered {status}: {answer}");
    let code = status.as_u16();
    if status.is_client_error() && code != 408 && code != 429 {
        Err(SendError::permanent(message))
    } else {
        Err(SendError::retry(message))
    }
}

async fn send_email(farm: &Arc<Farm>, p: &Value) -> Result<(), SendError> {
    use lettre::AsyncTransport;
    let cfg = farm.config();
    let smtp = cfg
        .smtp
        .clone()
        .ok_or_else(|| SendError::permanent("the config has no [smtp] section any more"))?;
    let from: lettre::message::Mailbox = smtp
        .from
        .parse()
        .map_err(|e| SendError::permanent(format!("[smtp] from: {e}")))?;
    let mut m = lettre::Message::builder()
        .from(from)
        .subject(p["subject"].as_str().unwrap_or("farmer"));
    for to in p["to"].as_array().into_iter().flatten() {
        let to = to.as_str().unwrap_or_default();
        m = m.to(to
            .parse()
            .map_err(|e| SendError::permanent(format!("address {to:?}: {e}")))?);
    }
    let message = m
        .body(p["text"].as_str().unwrap_or_default().to_string())
        .map_err(|e| SendError::permanent(format!("composing the mail: {e}")))?;
    let (scheme, rest) = smtp
        .server
        .split_once("://")
        .unwrap_or(("smtp", &smtp.server));
    let (host, port) = match rest.trim_end_matches('/').rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse::<u16>().ok()),
        None => (rest.trim_end_matches('/').to_string(), None),
    };
    let transport_err =
        |e: lettre::transport::smtp::Error| SendError::retry(format!("{}: {e}", smtp.server));
    type Smtp = lettre::AsyncSmtpTransport<lettre::Tokio1Executor>;
    let mut b = match scheme {
        "smtps" => Smtp::relay(&host)
            .map_err(transport_err)?
            .port(port.unwrap_or(465)),
        "smtp+starttls" => Smtp::starttls_relay(&host)
            .map_err(transport_err)?
            .port(port.unwrap_or(587)),
        _ => Smtp::builder_dangerous(&host).port(port.unwrap_or(25)),
    };
    if let (Some(user), Some(pass)) = (&smtp.username, &smtp.password) {
        let pass = farm
            .secrets()
            .resolve(pass)
            .map_err(|e| SendError::retry(e.to_string()))?
            .to_string();
        b = b.credentials(lettre::transport::smtp::authentication::Credentials::new(
            user.clone(),
            pass,
        ));
    }
    let transport = b.timeout(Some(SEND_LIMIT)).build();
    transport.send(message).await.map_err(transport_err)?;
    Ok(())
}
