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
//!
//! This module is the state and the checks, which need no farm: the
//! [`BotRegistry`] (which the farm holds), minting and verifying tokens with
//! the master key, and the store's requests, bindings and revocations. The
//! parts that take the farm sit above it: [`serve`], the HTTP endpoints, and
//! [`check`], the loop re-checking connected bots.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ca::Ca;
use crate::keys::MasterKey;
use crate::store::{Store, now_ms};

pub mod check;
pub mod serve;

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
    /// Token checks of connected bots that passed (`/metrics`).
    checks_passed: std::sync::atomic::AtomicU64,
}

/// Builder requests one address may submit per `SUBMIT_WINDOW_MS`.
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
    /// Counts a connected bot's token check that passed.
    pub fn check_passed(&self) {
        self.checks_passed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Token checks of connected bots that passed since start.
    pub fn checks_passed(&self) -> u64 {
        self.checks_passed
            .load(std::sync::atomic::Ordering::Relaxed)
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

    /// The farm CA in `data_dir`, read (or created) on first use and kept.
    /// The error is a sentence for a `500` answer.
    pub fn ca(&self, data_dir: &Path) -> Result<Arc<Ca>, String> {
        let mut slot = self.ca.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ca) = slot.as_ref() {
            return Ok(ca.clone());
        }
        let ca = Arc::new(Ca::load_or_create(data_dir).map_err(|e| format!("the farm CA: {e}"))?);
        *slot = Some(ca.clone());
        Ok(ca)
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

fn mac_key(master: &MasterKey) -> [u8; 32] {
    master.derive("farmer machine tokens v1")
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

/// A machine token for `c`, MACed with a key derived from the master key.
pub fn mint(master: &MasterKey, c: &Claims) -> String {
    let payload = b64().encode(serde_json::to_vec(c).unwrap_or_default());
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&mac_key(master)).expect("any key length");
    mac.update(payload.as_bytes());
    format!("v1.{payload}.{}", b64().encode(mac.finalize().into_bytes()))
}

/// Checks a token's MAC, expiry and revocation.
pub async fn verify_token(
    master: &MasterKey,
    store: &Store,
    token: &str,
) -> Result<Claims, (String, &'static str)> {
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
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&mac_key(master)).expect("any key length");
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
    let revocation = revoked(store, &claims.serial)
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

/// What can be checked of a bot whose link is parked without waking it
/// (its token would have to come over a session): its host name is still
/// bound to a certificate that is not revoked. The token itself, expiry
/// included, is checked again within a heartbeat of the link waking.
pub async fn binding_holds(store: &Store, hostname: &str) -> Result<(), (String, &'static str)> {
    let serial = match bound_host_type(store, hostname).await {
        Ok(Some((_, serial))) => serial,
        Ok(None) => {
            return Err((
                format!("{hostname} is no longer bound to a host type"),
                "unknown-hostname",
            ));
        }
        Err(e) => return Err((format!("refusing: {e}"), "store-error")),
    };
    match revoked(store, &serial).await {
        Ok(None) => Ok(()),
        Ok(Some(reason)) => Err((
            format!("the certificate (serial {serial}) of {hostname} was revoked: {reason}"),
            "revoked",
        )),
        Err(e) => Err((format!("refusing: {e}"), "store-error")),
    }
}

/// Why `serial` was revoked, if it was. A store error is an error, never
/// "not revoked": callers refuse (fail closed).
async fn revoked(store: &Store, serial: &str) -> Result<Option<String>, String> {
    store
        .revocation_reason(serial)
        .await
        .map_err(|e| format!("cannot read the revocation list: {e}"))
}

/// The host type and certificate serial a bot's hostname is bound to, if
/// approved. A store error is an error (callers refuse), not "unbound".
pub async fn bound_host_type(
    store: &Store,
    hostname: &str,
) -> Result<Option<(String, String)>, String> {
    store
        .bot_binding(hostname)
        .await
        .map_err(|e| format!("cannot read the bound host names: {e}"))
}

/// A builder request as an owner sends it: JSON to `POST /api/requests`,
/// or the `/requests` form.
#[derive(Debug, serde::Deserialize)]
pub struct Submission {
    pub hostname: String,
    pub csr_pem: String,
    #[serde(default)]
    pub contact: String,
    #[serde(default)]
    pub notes: String,
}

/// Records a builder request after checking the hostname and that the CSR
/// names exactly that bot; returns the request id and the owner's secret.
/// Anyone may submit, so every field is bounded, each address may submit
/// [`SUBMITS_PER_ADDRESS`] an hour, and at most [`MAX_PENDING_REQUESTS`]
/// wait for the admin; a refusal stores nothing.
pub async fn submit_request(
    bots: &BotRegistry,
    store: &Store,
    peer: Option<std::net::IpAddr>,
    s: &Submission,
) -> Result<(i64, String), (StatusCode, String)> {
    let (hostname, csr_pem, contact, notes) = (
        s.hostname.as_str(),
        s.csr_pem.as_str(),
        s.contact.as_str(),
        s.notes.as_str(),
    );
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
        && !bots.allow_submit(addr)
    {
        return Err((
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many builder requests from {addr}: at most {SUBMITS_PER_ADDRESS} an hour; try again later"
            ),
        ));
    }
    let pending = store
        .pending_requests()
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
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
    let secret = hex::encode(secret);
    let id = store
        .add_request(
            hostname,
            csr_pem,
            contact,
            notes,
            &hex::encode(Sha256::digest(secret.as_bytes())),
        )
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    tracing::info!(id, %hostname, "builder request submitted");
    Ok((id, secret))
}
