//! The certificate onboarding endpoints: builder requests (`/api/requests`,
//! submit, status, approve, reject), `/api/ca/revoke`, `/api/ca/cert` and the
//! token endpoint. Apart from the checks ([`super`]) because the handlers
//! take the farm (its store, CA, config and admin token), which holds the
//! machine-auth state: the state stays below the farm, these handlers above.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use botauth::token::{TokenRequest, TokenResponse};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use x509_parser::prelude::*;

use super::{
    CERT_DAYS, Claims, MAX_SKEW_SECS, Submission, bot_domain, bound_host_type, mint, revoked,
    submit_request, token_ttl,
};
use crate::auth::Admin;
use crate::ca::Ca;
use crate::farm::Farm;
use crate::pool::Refusal;
use crate::store::{Approval, BotRequestRow, RequestStatus, now_ms};

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
    crate::auth::admin(headers, &farm.admin_token).is_ok()
}

/// The farm CA, read (or created) on first use and kept.
fn ca(farm: &Farm) -> ApiResult<Arc<Ca>> {
    farm.bots
        .ca(&farm.data_dir)
        .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e))
}

async fn ca_cert(State(farm): State<Arc<Farm>>) -> ApiResult<String> {
    Ok(ca(&farm)?.cert_pem().to_string())
}

async fn submit(
    State(farm): State<Arc<Farm>>,
    conn: Option<axum::Extension<crate::reverse::ConnInfo>>,
    crate::api::JsonBody(s): crate::api::JsonBody<Submission>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let peer = conn.map(|c| c.0.peer.ip());
    let (id, secret) = submit_request(&farm.bots, &farm.store, peer, &s)
        .await
        .map_err(|(code, msg)| err(code, msg))?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": id, "secret": secret, "status": "pending" })),
    ))
}

#[derive(Deserialize)]
struct SecretQuery {
    secret: Option<String>,
}

fn request_json(r: &BotRequestRow, with_cert: bool) -> serde_json::Value {
    let mut v = json!({
        "id": r.id,
        "hostname": r.hostname,
        "contact": r.contact,
        "notes": r.notes,
        "status": r.status,
        "reason": r.reason,
        "host_type": r.host_type,
        "serial": r.serial,
        "created_at": r.created_at,
    });
    if with_cert {
        v["cert_pem"] = json!(r.cert_pem);
    }
    v
}

async fn request_status(
    State(farm): State<Arc<Farm>>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Query(q): Query<SecretQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let r = farm
        .store
        .request(id)
        .await
        .map_err(db)?
        .ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no request {id}")))?;
    let stored = &r.secret_sha256;
    // The header is preferred (URLs end up in logs); `?secret=` still works.
    let given = headers
        .get(crate::admin_cli::SECRET_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(q.secret)
        .map(|s| hex::encode(Sha256::digest(s.as_bytes())))
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
    _: Admin,
) -> ApiResult<Json<serde_json::Value>> {
    let rows = farm.store.requests(500).await.map_err(db)?;
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
    _: Admin,
    Path(id): Path<i64>,
    crate::api::JsonBody(a): crate::api::JsonBody<Approve>,
) -> ApiResult<Json<serde_json::Value>> {
    let cfg = farm.config();
    if !cfg.hosts.contains_key(&a.host_type) {
        let known: Vec<String> = cfg.hosts.keys().cloned().collect();
        return Err(err(
            StatusCode::BAD_REQUEST,
            format!(
                "host type {:?} is not in the config (known: {})",
                a.host_type,
                known.join(", ")
            ),
        ));
    }
    let r = farm
        .store
        .request(id)
        .await
        .map_err(db)?
        .ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no request {id}")))?;
    let already = |status: &dyn std::fmt::Display| {
        err(
            StatusCode::BAD_REQUEST,
            format!("request {id} is already {status}"),
        )
    };
    if r.status != RequestStatus::Pending {
        return Err(already(&r.status));
    }
    let hostname = r.hostname;
    let dns = botauth::hostname::bot_dns_name(&hostname, &bot_domain());
    let issued = ca(&farm)?
        .sign(&r.csr_pem, &dns, CERT_DAYS)
        .map_err(|e| err(StatusCode::BAD_REQUEST, e))?;
    let approved = farm
        .store
        .approve_request(&Approval {
            id,
            hostname: &hostname,
            host_type: &a.host_type,
            cert_pem: &issued.cert_pem,
            serial: &issued.serial,
            not_after: issued.not_after,
        })
        .await
        .map_err(db)?;
    if !approved {
        // Decided by another admin while this one's certificate was signed.
        let now = farm.store.request(id).await.map_err(db)?;
        return Err(match now {
            Some(r) => already(&r.status),
            None => err(StatusCode::NOT_FOUND, format!("no request {id}")),
        });
    }
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
    _: Admin,
    Path(id): Path<i64>,
    crate::api::JsonBody(r): crate::api::JsonBody<Reject>,
) -> ApiResult<Json<serde_json::Value>> {
    if r.reason.trim().is_empty() {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "a rejection needs a reason the owner will read",
        ));
    }
    let rejected = farm.store.reject_request(id, &r.reason).await.map_err(db)?;
    if !rejected {
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
    _: Admin,
    crate::api::JsonBody(r): crate::api::JsonBody<Revoke>,
) -> ApiResult<Json<serde_json::Value>> {
    let (serial, hostname) = match (r.serial, r.hostname) {
        (Some(s), _) => {
            let h = farm.store.hostname_of_serial(&s).await.map_err(db)?;
            let h = h.ok_or_else(|| {
                err(
                    StatusCode::NOT_FOUND,
                    format!("no certificate with serial {s}"),
                )
            })?;
            (s, h)
        }
        (None, Some(h)) => {
            let (_, s) = bound_host_type(&farm.store, &h)
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
    farm.store
        .revoke(&serial, &hostname, &reason)
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
    crate::api::JsonBody(req): crate::api::JsonBody<TokenRequest>,
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
    let serial = hex::encode(cert.raw_serial());
    let revocation = revoked(&farm.store, &serial).await.map_err(|e| {
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
    let bound = bound_host_type(&farm.store, &hostname).await.map_err(|e| {
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
        token: mint(&farm.master, &claims),
        hostname,
        expiry,
    }))
}
