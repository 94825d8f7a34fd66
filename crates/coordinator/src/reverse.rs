//! Registration of reverse buildlets (`GET /reverse`).
//!
//! The buildlet dials in and asks to upgrade the connection. The coordinator
//! checks, in order: TLS (unless plaintext was allowed), the upgrade token,
//! the registration headers, that the host type is configured, the builder
//! key, and the buildlet version. Each refusal is a status and a sentence the
//! machine owner can act on, and is counted per host type. On success it
//! answers `101`, runs an HTTP/2 *client* over the connection (parked while
//! the machine is idle, see [`crate::link`]), confirms the buildlet with
//! `/status`, and adds it to the pool; when the connection ends (or pings go
//! unanswered), the machine leaves the pool.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use buildlet::client::Client;
use buildlet::proto;
use http::{StatusCode, header};
use hyper_util::rt::TokioIo;

use crate::farm::Farm;
use crate::pool::Refusal;
use crate::store::now_ms;

/// Facts about the TCP connection a request arrived on, set by the server.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
}

fn refuse(
    farm: &Farm,
    status: StatusCode,
    kind: &str,
    host_type: &str,
    hostname: &str,
    peer: SocketAddr,
    reason: String,
) -> Response {
    let configured = farm.config().hosts.contains_key(host_type);
    farm.pool.refuse(
        Refusal {
            at: now_ms(),
            host_type: host_type.to_string(),
            hostname: hostname.to_string(),
            addr: peer.to_string(),
            reason: reason.clone(),
            kind: kind.to_string(),
        },
        configured,
    );
    (status, format!("{reason}\n")).into_response()
}

/// Longest host name or host type a registration may carry.
const MAX_NAME: usize = 253;

/// A credential check could not read the store: refuse (fail closed).
fn refuse_store_error(
    farm: &Farm,
    host_type: &str,
    hostname: &str,
    peer: SocketAddr,
    e: &str,
) -> Response {
    refuse(
        farm,
        StatusCode::SERVICE_UNAVAILABLE,
        "store-error",
        host_type,
        hostname,
        peer,
        format!("refusing for now: {e}"),
    )
}

pub async fn handle(State(farm): State<Arc<Farm>>, mut req: Request) -> Response {
    let info = req
        .extensions()
        .get::<ConnInfo>()
        .copied()
        .unwrap_or(ConnInfo {
            peer: SocketAddr::from(([0, 0, 0, 0], 0)),
            tls: false,
        });
    let (host_type, hostname, token, key, version_header, build, upgrade) = {
        let hv = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .unwrap_or("")
                .to_string()
        };
        let host_type = hv(proto::HDR_HOST_TYPE);
        let hostname = hv(proto::HDR_HOSTNAME);
        let token = hv(proto::HDR_MACHINE_TOKEN);
        let key = hv(proto::HDR_BUILDER_KEY);
        let version_header = hv(proto::HDR_VERSION);
        let build = hv(proto::HDR_BUILD);
        let upgrade = hv(header::UPGRADE.as_str());
        (
            host_type,
            hostname,
            token,
            key,
            version_header,
            build,
            upgrade,
        )
    };
    let peer = info.peer;
    if !info.tls && !farm.allow_plaintext {
        return refuse(&farm, StatusCode::FORBIDDEN, "plaintext", &host_type, &hostname, peer,
            "this coordinator accepts buildlets only over TLS; drop -insecure-plaintext and use -tls-pin or -ca-file".into());
    }
    if !upgrade.eq_ignore_ascii_case(proto::REVERSE_UPGRADE) {
        return refuse(
            &farm,
            StatusCode::BAD_REQUEST,
            "protocol",
            &host_type,
            &hostname,
            peer,
            format!(
                "expected an upgrade to {:?}: this endpoint is for farmer buildlets in reverse mode",
                proto::REVERSE_UPGRADE
            ),
        );
    }
    if hostname.is_empty() || (host_type.is_empty() && token.is_empty()) {
        return refuse(
            &farm,
            StatusCode::BAD_REQUEST,
            "protocol",
            &host_type,
            &hostname,
            peer,
            format!(
                "registration needs the {} and {} headers",
                proto::HDR_HOST_TYPE,
                proto::HDR_HOSTNAME
            ),
        );
    }
    // Host names are shown on every page and stored per machine: a DNS name
    // is at most 253 bytes, and so is one here.
    if hostname.len() > MAX_NAME || host_type.len() > MAX_NAME || build.len() > MAX_NAME {
        return refuse(
            &farm,
            StatusCode::BAD_REQUEST,
            "protocol",
            &host_type,
            &hostname,
            peer,
            format!(
                "the {}, {} and {} headers may be at most {MAX_NAME} bytes",
                proto::HDR_HOST_TYPE,
                proto::HDR_HOSTNAME,
                proto::HDR_BUILD
            ),
        );
    }
    let cfg = farm.config();
    let bot = !token.is_empty();
    let host_type = if bot {
        let claims =
            match crate::machine_auth::verify_token(&farm.master, &farm.store, &token).await {
                Ok(c) => c,
                Err((msg, kind)) => {
                    return refuse(
                        &farm,
                        StatusCode::FORBIDDEN,
                        kind,
                        &host_type,
                        &hostname,
                        peer,
                        msg,
                    );
                }
            };
        if claims.hostname != hostname {
            return refuse(
                &farm,
                StatusCode::FORBIDDEN,
                "wrong-hostname",
                &host_type,
                &hostname,
                peer,
                format!(
                    "this bot says it is {hostname:?} but its machine token was issued to {:?}; run it with -hostname={}",
                    claims.hostname, claims.hostname
                ),
            );
        }
        match crate::machine_auth::bound_host_type(&farm.store, &hostname).await {
            Err(e) => return refuse_store_error(&farm, &host_type, &hostname, peer, &e),
            Ok(Some((ht, serial))) if serial == claims.serial => ht,
            _ => {
                return refuse(
                    &farm,
                    StatusCode::FORBIDDEN,
                    "unknown-hostname",
                    &host_type,
                    &hostname,
                    peer,
                    format!(
                        "{hostname} is not bound to a host type with this certificate; submit a builder request and wait for approval"
                    ),
                );
            }
        }
    } else {
        host_type
    };
    if !cfg.hosts.contains_key(&host_type) {
        // The farm's host types are not told to strangers.
        return refuse(
            &farm,
            StatusCode::FORBIDDEN,
            "unknown-host-type",
            &host_type,
            &hostname,
            peer,
            format!(
                "unknown host type {host_type:?}: the farm's config has no [hosts.{host_type}]; check -reverse-type or ask the farm admin to add it"
            ),
        );
    }
    if !bot && key.is_empty() {
        return refuse(
            &farm,
            StatusCode::UNAUTHORIZED,
            "missing-key",
            &host_type,
            &hostname,
            peer,
            format!(
                "no builder key sent for {host_type}; store the output of `genbuilderkey {host_type}` in ~/.gobuildkey-{host_type}"
            ),
        );
    }
    if !bot && !farm.master.verify(&host_type, &key) {
        return refuse(
            &farm,
            StatusCode::FORBIDDEN,
            "wrong-key",
            &host_type,
            &hostname,
            peer,
            format!(
                "wrong builder key for {host_type}: this key was not issued by this farm for {host_type}; ask the farm admin for `genbuilderkey {host_type}`"
            ),
        );
    }
    // A host name belongs to one identity: a machine of another host type,
    // or one with another kind of credential, cannot take it over. A key
    // machine may not use a name bound to a machine certificate either.
    let held = farm.pool.holder(&hostname);
    let cert_bound = if bot {
        None
    } else {
        match crate::machine_auth::bound_host_type(&farm.store, &hostname).await {
            Ok(b) => b,
            Err(e) => return refuse_store_error(&farm, &host_type, &hostname, peer, &e),
        }
    };
    let conflict = held
        .as_ref()
        .and_then(|(ht, b)| {
            crate::pool::identity_conflict(&hostname, (ht, *b), (&host_type, bot))
        })
        .or_else(|| {
            cert_bound.map(|_| {
                format!(
                    "host name {hostname:?} belongs to a machine with a certificate; a builder key cannot register under it; pick another -hostname"
                )
            })
        });
    if let Some(why) = conflict {
        return refuse(
            &farm,
            StatusCode::CONFLICT,
            "hostname-taken",
            &host_type,
            &hostname,
            peer,
            why,
        );
    }
    // Elastic pools take only the machines they created.
    if let Err(why) = farm.sources.admits(&host_type, &hostname) {
        return refuse(
            &farm,
            StatusCode::FORBIDDEN,
            "not-created",
            &host_type,
            &hostname,
            peer,
            why,
        );
    }
    let version: u32 = match version_header.parse() {
        Ok(v) => v,
        Err(_) => {
            return refuse(
                &farm,
                StatusCode::BAD_REQUEST,
                "protocol",
                &host_type,
                &hostname,
                peer,
                format!("missing or malformed {} header", proto::HDR_VERSION),
            );
        }
    };
    if version < cfg.farm.min_buildlet_version {
        return refuse(
            &farm,
            StatusCode::UPGRADE_REQUIRED,
            "too-old",
            &host_type,
            &hostname,
            peer,
            format!(
                "buildlet protocol version {version} is too old: this farm needs at least {}; update the buildlet (stage0 does it automatically)",
                cfg.farm.min_buildlet_version
            ),
        );
    }
    let accepted = Accepted {
        hostname,
        host_type,
        bot,
        build,
        peer,
        binary: crate::release::Registration::from_headers(req.headers()),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => attach(farm, upgraded, accepted).await,
            Err(e) => tracing::warn!(hostname = %accepted.hostname, "reverse upgrade failed: {e}"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, proto::REVERSE_UPGRADE)
        .body(Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// A registration that passed every check of `GET /reverse`.
pub struct Accepted {
    pub hostname: String,
    pub host_type: String,
    /// Registered with a machine certificate (bot) rather than a builder key.
    pub bot: bool,
    pub build: String,
    pub peer: SocketAddr,
    pub binary: crate::release::Registration,
}

/// Registers an accepted machine: starts its link's task (the coordinator is
/// the HTTP/2 client of the buildlet on it, in sessions, parked while idle:
/// [`crate::link`]), asks `/status`, and adds the machine to the pool. Returns
/// once the machine joined (or failed to); the link's task removes it when
/// the link ends. The link is the upgraded connection of `/reverse`, or any
/// byte stream (the in-process test harness uses a pipe to a real buildlet
/// handler), so both take the same path.
pub async fn attach<IO>(farm: Arc<Farm>, io: IO, a: Accepted)
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let Accepted {
        hostname,
        host_type,
        bot,
        build,
        peer,
        binary,
    } = a;
    let shared = crate::link::Shared::new();
    let membership = Arc::new(std::sync::Mutex::new(Membership::Joining));
    let settings = {
        let farm = farm.clone();
        move || {
            let c = farm.config();
            crate::link::Settings {
                heartbeat: c.farm.heartbeat,
                heartbeat_timeout: c.farm.heartbeat_timeout,
                park_after: c.farm.park_after,
            }
        }
    };
    let idle_for = {
        let farm = farm.clone();
        let membership = membership.clone();
        move |d: Duration| match *lock(&membership) {
            Membership::Member(id) => farm.pool.idle_for(id).is_some_and(|idle| idle >= d),
            _ => false,
        }
    };
    // The link's task outlives this function: it is all a connected
    // machine costs besides its pool entry, and removes the machine when
    // the link ends.
    let link_task = tokio::spawn(serve_link(
        farm.clone(),
        membership.clone(),
        TokioIo::new(io),
        shared.clone(),
        settings,
        idle_for,
    ));
    let client = Client::with_transport(
        Arc::new(crate::link::LinkTransport(shared.clone())),
        "http://buildlet".into(),
        None,
    );
    let status = match tokio::time::timeout(Duration::from_secs(10), client.status()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(%hostname, "buildlet did not answer /status after registering: {e}");
            link_task.abort();
            return;
        }
        Err(_) => {
            tracing::warn!(%hostname, "buildlet did not answer /status within 10s after registering");
            link_task.abort();
            return;
        }
    };
    shared.allow_parking(status.version >= buildlet::link::PARKING_VERSION);
    let id = match farm.pool.add(
        &hostname,
        &host_type,
        bot,
        status.version,
        &build,
        &peer.to_string(),
        crate::release::reported_binary(&status, &binary),
        client,
        link_task.abort_handle(),
    ) {
        Ok(id) => id,
        Err(why) => {
            // Another machine took the name while this one registered.
            tracing::warn!(%hostname, %host_type, "dropping a registration: {why}");
            link_task.abort();
            return;
        }
    };
    {
        let mut m = lock(&membership);
        if matches!(*m, Membership::Ended) {
            drop(m);
            farm.pool
                .remove(id, "the link closed while the machine registered");
            return;
        }
        *m = Membership::Member(id);
    }
    farm.releases
        .machine_joined(&farm.pool, id, &hostname, &status, &binary);
    // What its source cache holds: kept if it is what the farm last sent
    // there (a reconnect), forgotten otherwise (a restarted buildlet).
    if farm.delivery.held(&hostname).map(|h| h.tree) != status.src_tree {
        farm.delivery.set_held(&hostname, None);
    }
    if bot {
        farm.bots.add(id, &hostname);
    }
    tracing::info!(%hostname, %host_type, version = status.version, %peer, bot, "machine joined the pool");
    if let Err(e) = farm
        .store
        .machine_seen(
            &hostname,
            &host_type,
            status.version as i64,
            &build,
            &peer.to_string(),
        )
        .await
    {
        tracing::warn!("recording machine: {e}");
    }
}

/// The link's task: serves the link, then removes the machine.
///
/// An async fn that makes the link's future inside, rather than a block
/// that captures it and awaits it: such a block holds the future twice
/// (as captured and as awaited), and this task lives as long as the
/// machine is connected.
async fn serve_link<T, S, I>(
    farm: Arc<Farm>,
    membership: Arc<std::sync::Mutex<Membership>>,
    io: T,
    shared: Arc<crate::link::Shared>,
    settings: S,
    idle_for: I,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Fn() -> crate::link::Settings + Send,
    I: Fn(Duration) -> bool + Send,
{
    let why = crate::link::run(io, shared, settings, idle_for).await;
    let mut m = lock(&membership);
    if let Membership::Member(id) = *m {
        farm.pool.remove(id, &why);
    }
    *m = Membership::Ended;
}

/// Whether a registering machine is in the pool yet: whoever of the
/// registration and the ending link comes second removes it.
enum Membership {
    Joining,
    Member(u64),
    Ended,
}

fn lock(m: &std::sync::Mutex<Membership>) -> std::sync::MutexGuard<'_, Membership> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
