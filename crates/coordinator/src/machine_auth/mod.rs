//! Certificate onboarding on the coordinator: builder requests, approval
//! (signing the CSR and binding the hostname to a host type — the server, not
//! the bot, decides where a machine belongs), revocation, minting machine
//! tokens, and checking the tokens of connected bots.
//!
//! A token request is checked in a fixed order, each failure with its own
//! sentence: timestamp within ±10 min, certificate parses, signature valid,
//! issued by the farm CA, not expired, not revoked, hostname known. A token is
//! `v1.<payload>.<mac>`: base64url JSON naming the hostname and certificate
//! serial with its expiry, MACed with a key derived from the master key. The
//! tokens of connected bots are re-checked every heartbeat, so revocation
//! takes effect at the next refresh at the latest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use botauth::token::{TokenRequest, TokenResponse};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::Row;
use x509_parser::prelude::*;

use crate::ca::Ca;
use crate::farm::Farm;
use crate::keys::hex;
use crate::pool::Refusal;
use crate::store::now_ms;

/// Allowed clock difference of a token request.
pub const MAX_SKEW_SECS: i64 = 600;
/// Default machine token lifetime; `FARMER_MACHINE_TOKEN_TTL_SECS` overrides it.
pub const DEFAULT_TOKEN_TTL_SECS: i64 = 3600;
/// Validity of issued machine certificates.
pub const CERT_DAYS: i64 = 365;

fn token_ttl() -> i64 {
    std::env::var("FARMER_MACHINE_TOKEN_TTL_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v: &i64| *v > 0)
        .unwrap_or(DEFAULT_TOKEN_TTL_SECS)
}

/// The farm's bot domain (`FARMER_BOT_DOMAIN`, default [`botauth::hostname::DEFAULT_BOT_DOMAIN`]).
pub fn bot_domain() -> String {
    std::env::var("FARMER_BOT_DOMAIN")
        .ok()
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| botauth::hostname::DEFAULT_BOT_DOMAIN.to_string())
}

/// The farm's machine-auth state: connected bots that authenticated with a
/// machine token (machine id → hostname), and the CA, loaded once.
#[derive(Default)]
pub struct BotRegistry {
    bots: Mutex<HashMap<u64, String>>,
    ca: Mutex<Option<Arc<Ca>>>,
    /// Builder requests per client address in the current window.
    submits: Mutex<HashMap<std::net::IpAddr, (i64, u32)>>,
}

/// Builder requests one address may submit per [`SUBMIT_WINDOW_MS`].
pub const SUBMITS_PER_ADDRESS: u32 = 10;
const SUBMIT_WINDOW_MS: i64 = 3600 * 1000;
/// Addresses remembered at most; past it, expired windows are forgotten.
const SUBMIT_ADDRESSES: usize = 10_000;
/// Pending builder requests at most; an admin must decide before more come.
pub const MAX_PENDING_REQUESTS: i64 = 500;
/// Field limits of a builder request, in bytes.
pub const MAX_CSR: usize = 16 << 10;
pub const MAX_CONTACT: usize = 256;
pub const MAX_NOTES: usize = 4096;

impl BotRegistry {
    /// Counts a submission from `addr`; false when it is over its limit.
    fn allow_submit(&self, addr: std::net::IpAddr) -> bool {
        let now = now_ms();
        let mut m = self.submits.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= SUBMIT_ADDRESSES && !m.contains_key(&addr) {
            m.retain(|_, (start, _)| now - *start < SUBMIT_WINDOW_MS);
            if m.len() >= SUBMIT_ADDRESSES {
                // Every slot is in use: a flood from many addresses.
                return false;
            }
        }
        let e = m.entry(addr).or_insert((now, 0));
        if now - e.0 >= SUBMIT_WINDOW_MS {
            *e = (now, 0);
        }
        if e.1 >= SUBMITS_PER_ADDRESS {
            return false;
        }
        e.1 += 1;
        true
    }

    pub fn add(&self, id: u64, hostname: &str) {
        self.bots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, hostname.to_string());
    }
    fn all(&self) -> Vec<(u64, String)> {
        self.bots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    }
    fn remove(&self, id: u64) {
        self.bots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
}

/// The claims of a valid machine token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    #[serde(rename = "h")]
    pub hostname: String,
    #[serde(rename = "s")]
    pub serial: String,
    #[serde(rename = "e")]
    pub expiry: i64,
}

fn mac_key(farm: &Farm) -> [u8; 32] {
    farm.master.derive("farmer machine tokens v1")
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

pub fn mint(farm: &Farm, c: &Claims) -> String {
    let payload = b64().encode(serde_json::to_vec(c).unwrap_or_default());
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&mac_key(farm)).expect("any key length");
    mac.update(payload.as_bytes());
    format!("v1.{payload}.{}", b64().encode(mac.finalize().into_bytes()))
}

/// Checks a token's MAC, expiry and revocation.
pub async fn verify_token(farm: &Farm, token: &str) -> Result<Claims, (String, &'static str)> {
    let bad = |m: &str| (m.to_string(), "bad-token");
    let mut parts = token.trim().split('.');
    let (Some("v1"), Some(payload), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(
            "the machine token is malformed; is it a token file written by machine-tokend?",
        ));
    };
    let sig = b64()
        .decode(sig)
        .map_err(|_| bad("the machine token's signature is not base64"))?;
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&mac_key(farm)).expect("any key length");
    mac.update(payload.as_bytes());
    mac.verify_slice(&sig)
        .map_err(|_| bad("the machine token was not issued by this farm"))?;
    let claims: Claims = serde_json::from_slice(
        &b64()
            .decode(payload)
            .map_err(|_| bad("malformed token payload"))?,
    )
    .map_err(|_| bad("malformed token payload"))?;
    let now = now_ms() / 1000;
    if claims.expiry <= now {
        return Err((
            format!(
                "the machine token expired {}s ago; is machine-tokend running (cron every 10 minutes)?",
                now - claims.expiry
            ),
            "expired-token",
        ));
    }
    let revocation = revoked(farm, &claims.serial)
        .await
        .map_err(|e| (format!("refusing: {e}"), "store-error"))?;
    if let Some(reason) = revocation {
        return Err((
            format!(
                "the certificate (serial {}) of {} was revoked: {reason}",
                claims.serial, claims.hostname
            ),
            "revoked",
        ));
    }
    Ok(claims)
}

/// Why `serial` was revoked, if it was. A store error is an error, never
/// "not revoked": callers refuse (fail closed).
async fn revoked(farm: &Farm, serial: &str) -> Result<Option<String>, String> {
    let row = sqlx::query("SELECT reason FROM revoked WHERE serial = ?")
        .bind(serial)
        .fetch_optional(farm.store.pool())
        .await
        .map_err(|e| format!("cannot read the revocation list: {e}"))?;
    Ok(row.map(|r| r.try_get::<String, _>("reason").unwrap_or_default()))
}

/// The host type and certificate serial a bot's hostname is bound to, if
/// approved. A store error is an error (callers refuse), not "unbound".
pub async fn bound_host_type(
    farm: &Farm,
    hostname: &str,
) -> Result<Option<(String, String)>, String> {
    let row = sqlx::query("SELECT host_type, serial FROM bots WHERE hostname = ?")
        .bind(hostname)
        .fetch_optional(farm.store.pool())
        .await
        .map_err(|e| format!("cannot read the bound host names: {e}"))?;
    let Some(r) = row else {
        return Ok(None);
    };
    let get = |c: &str| {
        r.try_get::<String, _>(c)
            .map_err(|e| format!("bad row for {hostname} in bots: {e}"))
    };
    Ok(Some((get("host_type")?, get("serial")?)))
}

pub fn router(farm: Arc<Farm>) -> Router {
    Router::new()
        .route(botauth::token::TOKEN_PATH, post(token))
        .route("/api/requests", get(list_requests).post(submit))
        .route("/api/requests/{id}", get(request_status))
        .route("/api/requests/{id}/approve", post(approve))
        .route("/api/requests/{id}/reject", post(reject))
        .route("/api/ca/revoke", post(revoke))
        .route("/api/ca/cert", get(ca_cert))
        .with_state(farm)
}

type ApiResult<T> = Result<T, (StatusCode, Json<serde_json::Value>)>;

fn err(code: StatusCode, msg: impl Into<String>) -> (StatusCode, Json<serde_json::Value>) {
    (code, Json(json!({ "error": msg.into() })))
}

fn db(e: impl std::fmt::Display) -> (StatusCode, Json<serde_json::Value>) {
    err(StatusCode::INTERNAL_SERVER_ERROR, format!("database: {e}"))
}

fn is_admin(farm: &Farm, headers: &HeaderMap) -> bool {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| {
            bool::from(subtle::ConstantTimeEq::ct_eq(
                t.trim().as_bytes(),
                farm.admin_token.as_bytes(),
            ))
        })
}

fn admin(farm: &Farm, headers: &HeaderMap) -> ApiResult<()> {
    if is_admin(farm, headers) {
        Ok(())
    } else {
        Err(err(
            StatusCode::UNAUTHORIZED,
            "this needs the admin token (Authorization: Bearer TOKEN)",
        ))
    }
}

/// The farm CA, read (or created) on first use and kept.
fn ca(farm: &Farm) -> ApiResult<Arc<Ca>> {
    let mut slot = farm.bots.ca.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(ca) = slot.as_ref() {
        return Ok(ca.clone());
    }
    let ca = Arc::new(Ca::load_or_create(&farm.data_dir).map_err(|e| {
        err(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the farm CA: {e}"),
        )
    })?);
    *slot = Some(ca.clone());
    Ok(ca)
}

async fn ca_cert(State(farm): State<Arc<Farm>>) -> ApiResult<String> {
    Ok(ca(&farm)?.cert_pem().to_string())
}

#[derive(Deserialize)]
struct Submit {
    hostname: String,
    csr_pem: String,
    #[serde(default)]
    contact: String,
    #[serde(default)]
    notes: String,
}

async fn submit(
    State(farm): State<Arc<Farm>>,
    conn: Option<axum::Extension<crate::reverse::ConnInfo>>,
    Json(s): Json<Submit>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let peer = conn.map(|c| c.0.peer.ip());
    let (id, secret) = submit_request(&farm, peer, &s.hostname, &s.csr_pem, &s.contact, &s.notes)
        .await
        .map_err(|(code, msg)| err(code, msg))?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": id, "secret": secret, "status": "pending" })),
    ))
}

/// Records a builder request after checking the hostname and that the CSR
/// names exactly that bot; returns the request id and the owner's secret.
/// Anyone may submit, so every field is bounded, each address may submit
/// [`SUBMITS_PER_ADDRESS`] an hour, and at most [`MAX_PENDING_REQUESTS`]
/// wait for the admin; a refusal stores nothing.
pub async fn submit_request(
    farm: &Farm,
    peer: Option<std::net::IpAddr>,
    hostname: &str,
    csr_pem: &str,
    contact: &str,
    notes: &str,
) -> Result<(i64, String), (StatusCode, String)> {
    // The host name's own rules (length included) come with its validation.
    for (field, value, max) in [
        ("csr_pem", csr_pem, MAX_CSR),
        ("contact", contact, MAX_CONTACT),
        ("notes", notes, MAX_NOTES),
    ] {
        if value.len() > max {
            return Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "{field} is {} bytes; at most {max} are accepted",
                    value.len()
                ),
            ));
        }
    }
    if let Some(addr) = peer
        && !farm.bots.allow_submit(addr)
    {
        return Err((
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many builder requests from {addr}: at most {SUBMITS_PER_ADDRESS} an hour; try again later"
            ),
        ));
    }
    let pending: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM bot_requests WHERE status = 'pending'")
            .fetch_one(farm.store.pool())
            .await
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("database: {e}")))?;
    if pending >= MAX_PENDING_REQUESTS {
        return Err((
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{pending} builder requests already wait for the farm admin; try again after they are decided"
            ),
        ));
    }
    botauth::hostname::validate(hostname).map_err(|e| (StatusCode::BAD_REQUEST, e))?;
    let dns = botauth::hostname::bot_dns_name(hostname, &bot_domain());
    Ca::check_csr(csr_pem, &dns).map_err(|e| (StatusCode::BAD_REQUEST, e))?;
    if contact.trim().is_empty() {
        return Err((
            StatusCode::BAD_REQUEST,
            "a contact (e-mail or name) is required so the admin can reach you".into(),
        ));
    }
    let mut secret = [0u8; 24];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
    let secret = hex(&secret);
    let id = sqlx::query(
        "INSERT INTO bot_requests (hostname, csr_pem, contact, notes, secret_sha256, status, created_at) VALUES (?, ?, ?, ?, ?, 'pending', ?)",
    )
    .bind(hostname)
    .bind(csr_pem)
    .bind(contact)
    .bind(notes)
    .bind(hex(&Sha256::digest(secret.as_bytes())))
    .bind(now_ms())
    .execute(farm.store.pool())
    .await
    .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("database: {e}")))?
    .last_insert_rowid();
    tracing::info!(id, %hostname, "builder request submitted");
    Ok((id, secret))
}

#[derive(Deserialize)]
struct SecretQuery {
    secret: Option<String>,
}

fn request_json(r: &sqlx::sqlite::SqliteRow, with_cert: bool) -> serde_json::Value {
    let g = |c: &str| r.try_get::<String, _>(c).unwrap_or_default();
    let mut v = json!({
        "id": r.try_get::<i64, _>("id").unwrap_or_default(),
        "hostname": g("hostname"),
        "contact": g("contact"),
        "notes": g("notes"),
        "status": g("status"),
        "reason": g("reason"),
        "host_type": g("host_type"),
        "serial": g("serial"),
        "created_at": r.try_get::<i64, _>("created_at").unwrap_or_default(),
    });
    if with_cert {
        v["cert_pem"] = json!(g("cert_pem"));
    }
    v
}

async fn request_status(
    State(farm): State<Arc<Farm>>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Query(q): Query<SecretQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let r = sqlx::query("SELECT * FROM bot_requests WHERE id = ?")
        .bind(id)
        .fetch_optional(farm.store.pool())
        .await
        .map_err(db)?
        .ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no request {id}")))?;
    let stored: String = r.try_get("secret_sha256").unwrap_or_default();
    // The header is preferred (URLs end up in logs); `?secret=` still works.
    let given = headers
        .get(crate::admin_cli::SECRET_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(q.secret)
        .map(|s| hex(&Sha256::digest(s.as_bytes())))
        .unwrap_or_default();
    let owner = bool::from(subtle::ConstantTimeEq::ct_eq(
        stored.as_bytes(),
        given.as_bytes(),
    ));
    if !owner && !is_admin(&farm, &headers) {
        return Err(err(
            StatusCode::FORBIDDEN,
            "wrong secret for this request (use the secret printed when you submitted it)",
        ));
    }
    Ok(Json(request_json(&r, true)))
}

async fn list_requests(
    State(farm): State<Arc<Farm>>,
    headers: HeaderMap,
) -> ApiResult<Json<serde_json::Value>> {
    admin(&farm, &headers)?;
    let rows = sqlx::query("SELECT * FROM bot_requests ORDER BY id DESC LIMIT 500")
        .fetch_all(farm.store.pool())
        .await
        .map_err(db)?;
    Ok(Json(json!(
        rows.iter()
            .map(|r| request_json(r, false))
            .collect::<Vec<_>>()
    )))
}

#[derive(Deserialize)]
struct Approve {
    host_type: String,
}

async fn approve(
    State(farm): State<Arc<Farm>>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Json(a): Json<Approve>,
) -> ApiResult<Json<serde_json::Value>> {
    admin(&farm, &headers)?;
    if !farm.config().hosts.contains_key(&a.host_type) {
        let known: Vec<String> = farm.config().hosts.keys().cloned().collect();
        return Err(err(
            StatusCode::BAD_REQUEST,
            format!(
                "host type {:?} is not in the config (known: {})",
                a.host_type,
                known.join(", ")
            ),
        ));
    }
    let r = sqlx::query("SELECT hostname, csr_pem, status FROM bot_requests WHERE id = ?")
        .bind(id)
        .fetch_optional(farm.store.pool())
        .await
        .map_err(db)?
        .ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no request {id}")))?;
    let status: String = r.try_get("status").map_err(db)?;
    if status != "pending" {
        return Err(err(
            StatusCode::BAD_REQUEST,
            format!("request {id} is already {status}"),
        ));
    }
    let hostname: String = r.try_get("hostname").map_err(db)?;
    let csr: String = r.try_get("csr_pem").map_err(db)?;
    let dns = botauth::hostname::bot_dns_name(&hostname, &bot_domain());
    let issued = ca(&farm)?
        .sign(&csr, &dns, CERT_DAYS)
        .map_err(|e| err(StatusCode::BAD_REQUEST, e))?;
    let now = now_ms();
    let mut tx = farm.store.pool().begin().await.map_err(db)?;
    sqlx::query("UPDATE bot_requests SET status = 'approved', host_type = ?, cert_pem = ?, serial = ?, decided_at = ? WHERE id = ?")
        .bind(&a.host_type)
        .bind(&issued.cert_pem)
        .bind(&issued.serial)
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    sqlx::query(
        "INSERT INTO bots (hostname, host_type, serial, not_after, approved_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (hostname) DO UPDATE SET host_type = excluded.host_type, serial = excluded.serial, not_after = excluded.not_after, approved_at = excluded.approved_at",
    )
    .bind(&hostname)
    .bind(&a.host_type)
    .bind(&issued.serial)
    .bind(issued.not_after)
    .bind(now)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    tx.commit().await.map_err(db)?;
    tracing::info!(id, %hostname, host_type = %a.host_type, serial = %issued.serial, "builder request approved");
    Ok(Json(
        json!({ "id": id, "status": "approved", "hostname": hostname, "host_type": a.host_type, "serial": issued.serial, "cert_pem": issued.cert_pem }),
    ))
}

#[derive(Deserialize)]
struct Reject {
    #[serde(default)]
    reason: String,
}

async fn reject(
    State(farm): State<Arc<Farm>>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Json(r): Json<Reject>,
) -> ApiResult<Json<serde_json::Value>> {
    admin(&farm, &headers)?;
    if r.reason.trim().is_empty() {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "a rejection needs a reason the owner will read",
        ));
    }
    let n = sqlx::query("UPDATE bot_requests SET status = 'rejected', reason = ?, decided_at = ? WHERE id = ? AND status = 'pending'")
        .bind(&r.reason)
        .bind(now_ms())
        .bind(id)
        .execute(farm.store.pool())
        .await
        .map_err(db)?
        .rows_affected();
    if n == 0 {
        return Err(err(
            StatusCode::BAD_REQUEST,
            format!("request {id} does not exist or is not pending"),
        ));
    }
    Ok(Json(
        json!({ "id": id, "status": "rejected", "reason": r.reason }),
    ))
}

#[derive(Deserialize)]
struct Revoke {
    serial: Option<String>,
    hostname: Option<String>,
    #[serde(default)]
    reason: String,
}

async fn revoke(
    State(farm): State<Arc<Farm>>,
    headers: HeaderMap,
    Json(r): Json<Revoke>,
) -> ApiResult<Json<serde_json::Value>> {
    admin(&farm, &headers)?;
    let (serial, hostname) = match (r.serial, r.hostname) {
        (Some(s), _) => {
            let h: Option<String> =
                sqlx::query("SELECT hostname FROM bot_requests WHERE serial = ?")
                    .bind(&s)
                    .fetch_optional(farm.store.pool())
                    .await
                    .map_err(db)?
                    .and_then(|r| r.try_get("hostname").ok());
            let h = h.ok_or_else(|| {
                err(
                    StatusCode::NOT_FOUND,
                    format!("no certificate with serial {s}"),
                )
            })?;
            (s, h)
        }
        (None, Some(h)) => {
            let (_, s) = bound_host_type(&farm, &h)
                .await
                .map_err(|e| err(StatusCode::SERVICE_UNAVAILABLE, e))?
                .ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no approved bot named {h}")))?;
            (s, h)
        }
        (None, None) => return Err(err(StatusCode::BAD_REQUEST, "give a serial or a hostname")),
    };
    let reason = if r.reason.is_empty() {
        "revoked by an admin".to_string()
    } else {
        r.reason
    };
    sqlx::query("INSERT OR IGNORE INTO revoked (serial, hostname, at, reason) VALUES (?, ?, ?, ?)")
        .bind(&serial)
        .bind(&hostname)
        .bind(now_ms())
        .bind(&reason)
        .execute(farm.store.pool())
        .await
        .map_err(db)?;
    tracing::warn!(%serial, %hostname, "certificate revoked");
    Ok(Json(
        json!({ "serial": serial, "hostname": hostname, "revoked": true }),
    ))
}

/// The token endpoint: checks the request in order and mints a token.
async fn token(
    State(farm): State<Arc<Farm>>,
    Json(req): Json<TokenRequest>,
) -> ApiResult<Json<TokenResponse>> {
    let refuse = |code: StatusCode, kind: &str, host: &str, msg: String| {
        farm.pool.refuse(
            Refusal {
                at: now_ms(),
                host_type: String::new(),
                hostname: host.to_string(),
                addr: "token endpoint".into(),
                reason: msg.clone(),
                kind: kind.to_string(),
            },
            false,
        );
        err(code, msg)
    };
    let now = now_ms() / 1000;
    if (now - req.timestamp).abs() > MAX_SKEW_SECS {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "stale-timestamp",
            "",
            format!(
                "the request's timestamp is {}s away from the coordinator's clock (at most {MAX_SKEW_SECS}s allowed); check the machine's clock",
                req.timestamp - now
            ),
        ));
    }
    let der = botauth::token::cert_der(&req.cert_pem).map_err(|e| {
        refuse(
            StatusCode::BAD_REQUEST,
            "bad-cert",
            "",
            format!("the certificate does not parse: {e}"),
        )
    })?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| {
        refuse(
            StatusCode::BAD_REQUEST,
            "bad-cert",
            "",
            format!("the certificate does not parse: {e}"),
        )
    })?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or("")
        .to_string();
    let sig = base64::engine::general_purpose::STANDARD
        .decode(req.signature.trim())
        .map_err(|_| {
            refuse(
                StatusCode::UNAUTHORIZED,
                "bad-signature",
                &cn,
                "the request signature is not base64".into(),
            )
        })?;
    let spki = cert.public_key();
    let alg: &dyn ring::signature::VerificationAlgorithm =
        match spki.algorithm.algorithm.to_id_string().as_str() {
            "1.3.101.112" => &ring::signature::ED25519,
            "1.2.840.10045.2.1" => &ring::signature::ECDSA_P256_SHA256_ASN1,
            other => {
                return Err(refuse(
                    StatusCode::BAD_REQUEST,
                    "bad-cert",
                    &cn,
                    format!("unsupported key algorithm {other}; use Ed25519 or ECDSA P-256"),
                ));
            }
        };
    let msg = botauth::token::signed_message(req.timestamp, &der);
    ring::signature::UnparsedPublicKey::new(alg, &spki.subject_public_key.data)
        .verify(&msg, &sig)
        .map_err(|_| {
            refuse(
                StatusCode::UNAUTHORIZED,
                "bad-signature",
                &cn,
                "the request signature does not match the certificate's key".into(),
            )
        })?;
    let the_ca = ca(&farm)?;
    if !the_ca.issued(&cert) {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "unknown-ca",
            &cn,
            format!("the certificate for {cn} was not issued by this farm's CA"),
        ));
    }
    let not_after = cert.validity().not_after.timestamp();
    if not_after <= now || cert.validity().not_before.timestamp() > now + MAX_SKEW_SECS {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "expired-cert",
            &cn,
            format!(
                "the certificate for {cn} is not valid now (valid until {not_after}); submit a new request"
            ),
        ));
    }
    let serial = hex(cert.raw_serial());
    let revocation = revoked(&farm, &serial).await.map_err(|e| {
        refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "store-error",
            &cn,
            format!("refusing: {e}"),
        )
    })?;
    if let Some(reason) = revocation {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "revoked",
            &cn,
            format!("the certificate for {cn} (serial {serial}) was revoked: {reason}"),
        ));
    }
    let domain = bot_domain();
    let hostname = cn
        .strip_suffix(&format!(".{}", domain.trim_matches('.')))
        .unwrap_or(&cn)
        .to_string();
    let bound = bound_host_type(&farm, &hostname).await.map_err(|e| {
        refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "store-error",
            &hostname,
            format!("refusing: {e}"),
        )
    })?;
    match bound {
        Some((_, bound_serial)) if bound_serial == serial => {}
        Some(_) => {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                "superseded-cert",
                &hostname,
                format!(
                    "{hostname} has a newer certificate; use the one from the latest approved request"
                ),
            ));
        }
        None => {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "unknown-hostname",
                &hostname,
                format!(
                    "hostname {hostname} is not bound to a host type; submit a builder request and wait for approval"
                ),
            ));
        }
    }
    let expiry = now + token_ttl();
    let claims = Claims {
        hostname: hostname.clone(),
        serial,
        expiry,
    };
    Ok(Json(TokenResponse {
        token: mint(&farm, &claims),
        hostname,
        expiry,
    }))
}

/// Runs forever: re-checks the token of every connected bot; a bot whose
/// token expired, was revoked, or names another host is dropped.
pub async fn check_loop(farm: Arc<Farm>) {
    loop {
        let registry = &farm.bots;
        let every = farm.config().farm.heartbeat;
        tokio::time::sleep(every).await;
        for (id, hostname) in registry.all() {
            if !farm.pool.contains(id) {
                registry.remove(id);
                continue;
            }
            let Some(client) = farm.pool.client(id) else {
                continue;
            };
            let f = farm.clone();
            tokio::spawn(async move {
                let reg = &f.bots;
                let token =
                    match tokio::time::timeout(Duration::from_secs(10), client.machine_token())
                        .await
                    {
                        Ok(Ok(t)) => t,
                        Ok(Err(e)) if e.is_communication() => return,
                        Ok(Err(e)) => {
                            drop_bot(
                                &f,
                                reg,
                                id,
                                &hostname,
                                format!("cannot read its machine token: {e}"),
                                "bad-token",
                            );
                            return;
                        }
                        Err(_) => return,
                    };
                match verify_token(&f, &token).await {
                    Ok(c) if c.hostname == hostname => {}
                    Ok(c) => drop_bot(
                        &f,
                        reg,
                        id,
                        &hostname,
                        format!(
                            "its machine token names {} but it registered as {hostname}",
                            c.hostname
                        ),
                        "wrong-hostname",
                    ),
                    Err((msg, kind)) => drop_bot(&f, reg, id, &hostname, msg, kind),
                }
            });
        }
    }
}

fn drop_bot(farm: &Farm, reg: &BotRegistry, id: u64, hostname: &str, reason: String, kind: &str) {
    reg.remove(id);
    farm.pool.refuse(
        Refusal {
            at: now_ms(),
            host_type: String::new(),
            hostname: hostname.to_string(),
            addr: "token check".into(),
            reason: reason.clone(),
            kind: kind.to_string(),
        },
        false,
    );
    farm.pool.remove(id, &format!("dropped: {reason}"));
}
