//! Reverse mode: the buildlet dials the coordinator and serves its API over
//! the connection it opened, so machines behind NAT and firewalls need no
//! inbound port.
//!
//! The buildlet sends `GET /reverse` with `Upgrade: farmer-buildlet` and its
//! host type, host name, version and builder key. On `101 Switching
//! Protocols` the roles turn around: the coordinator runs an HTTP/2 client on
//! the connection and the buildlet an HTTP/2 server ([`Buildlet::handle`]),
//! in sessions that end when the link is idle ([`serve_link`], see
//! [`crate::link`]). HTTP/2 PINGs in a session, one-byte pings while parked
//! and TCP keepalives keep NAT mappings alive and detect a dead peer. When
//! the link drops, the buildlet reconnects with jittered exponential
//! backoff; a refusal is logged with the coordinator's reason, which names
//! what the owner must fix.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::link::{self, Link};
use crate::proto;
use crate::server::Buildlet;

pub use farmtls::{PIN_FORMS, Pin, Tls, parse_pin};

/// Where and as whom to register.
#[derive(Debug, Clone)]
pub struct ReverseConfig {
    /// `HOST:PORT` of each coordinator, tried in turn (a leader and its
    /// standbys); at least one.
    pub coordinators: Vec<String>,
    pub host_type: String,
    pub hostname: String,
    /// The builder key for `host_type` (empty when a machine token is used).
    pub key: String,
    /// Bot mode: authenticate with the machine token in this file (written by
    /// `machine-tokend`), re-read at every connection, instead of a key.
    pub token_file: Option<PathBuf>,
    pub tls: Tls,
}

/// Reads the token from a machine token file (JSON with a `token` field).
pub fn read_token(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("machine token file {}: {e}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("machine token file {}: {e}", path.display()))?;
    v["token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .ok_or_else(|| {
            format!(
                "machine token file {} has no token; is machine-tokend running?",
                path.display()
            )
        })
}

/// Why one connection attempt ended.
#[derive(Debug, thiserror::Error)]
pub enum ReverseError {
    #[error("cannot connect to {addr}: {err}")]
    Connect { addr: String, err: io::Error },
    #[error("TLS with {addr}: {err}")]
    Tls { addr: String, err: String },
    #[error("the coordinator refused this buildlet ({status}): {message}")]
    Refused { status: StatusCode, message: String },
    #[error("reverse connection: {0}")]
    Protocol(String),
    #[error("bad configuration: {0}")]
    Config(String),
}

/// Finds the builder key: `key_file` if given, else `$GO_BUILD_KEY_PATH`,
/// else `~/.gobuildkey-<host-type>`, else `~/.gobuildkey`. The error lists
/// every place that was tried.
pub fn find_key(key_file: Option<&Path>, host_type: &str) -> Result<(String, PathBuf), String> {
    let mut tried = Vec::new();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(f) = key_file {
        candidates.push(f.to_path_buf());
    } else {
        if let Some(p) = std::env::var_os("GO_BUILD_KEY_PATH").filter(|p| !p.is_empty()) {
            candidates.push(PathBuf::from(p));
        }
        if let Some(home) = home_dir() {
            candidates.push(home.join(format!(".gobuildkey-{host_type}")));
            candidates.push(home.join(".gobuildkey"));
        }
    }
    for c in candidates {
        if c.as_os_str() == "-" {
            // `-key-file=-`: the key arrives on standard input (how the
            // coordinator hands keys to its local buildlets, so no build
            // can read them from a file).
            // A key is a few dozen bytes; whatever feeds stdin is bounded.
            let mut s = String::new();
            let mut stdin = std::io::Read::take(std::io::stdin(), 64 << 10);
            return match std::io::Read::read_to_string(&mut stdin, &mut s) {
                Ok(_) if !s.trim().is_empty() => Ok((s.trim().to_string(), c)),
                Ok(_) => Err("-key-file=-: standard input held no builder key".into()),
                Err(e) => Err(format!("-key-file=-: reading standard input: {e}")),
            };
        }
        match std::fs::read_to_string(&c) {
            Ok(s) if !s.trim().is_empty() => return Ok((s.trim().to_string(), c)),
            Ok(_) => tried.push(format!("{} (empty)", c.display())),
            Err(e) => tried.push(format!("{} ({e})", c.display())),
        }
    }
    Err(format!(
        "no builder key for {host_type}; tried: {}. Ask the farm admin for `genbuilderkey {host_type}` and store it in ~/.gobuildkey-{host_type}",
        tried.join(", ")
    ))
}

fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .or_else(|| std::env::var_os("USERPROFILE"))
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

/// Registers with the coordinator and serves it until `/halt`, reconnecting
/// whenever the link drops.
pub async fn run(b: Arc<Buildlet>, cfg: ReverseConfig) -> Result<(), ReverseError> {
    let connector = tls_connector(&cfg.tls)?;
    // Hash the executable once, off the async threads, before registering.
    let _ = tokio::task::spawn_blocking(binary_sha256).await;
    let mut backoff = Duration::from_secs(1);
    let max_backoff = Duration::from_secs(60);
    let n = cfg.coordinators.len().max(1);
    // The address tried now, and how many have failed in a row since one
    // last served: the next address is tried at once until all have.
    let mut at = 0;
    let mut failed = 0;
    // Whether a coordinator of this round said it is a standby (one of them
    // is about to lead: come back soon, though less often while it lasts).
    let mut standby_seen = false;
    let mut standby_wait = Duration::from_secs(1);
    loop {
        let addr = cfg.coordinators.get(at).map_or("", String::as_str);
        let attempt = connect_once(&b, &cfg, addr, connector.as_ref());
        let mut attempt = std::pin::pin!(attempt);
        let result = tokio::select! {
            r = attempt.as_mut() => r,
            _ = b.halted() => {
                // While serving, the link delivers its replies (the `/halt`
                // one among them) before it closes (bounded by the grace).
                let _ = tokio::time::timeout(crate::server::HALT_GRACE, attempt).await;
                return Ok(());
            }
        };
        // The coordinator writes off a machine whose link dropped and runs
        // its builds elsewhere; nothing from before may keep running here.
        let killed = b.kill_all();
        if killed > 0 {
            tracing::warn!(killed, "link lost: killed the commands it was running");
        }
        match result {
            Ok(served_for) => {
                tracing::warn!(
                    coordinator = addr,
                    "connection to the coordinator closed after {served_for:?}; reconnecting"
                );
                if served_for > Duration::from_secs(30) {
                    backoff = Duration::from_secs(1);
                }
                failed = 0;
                standby_seen = false;
                standby_wait = Duration::from_secs(1);
            }
            Err(e @ ReverseError::Refused { .. }) if e.upgrade_required() && under_stage0() => {
                // stage0 fetches the current release when we exit.
                tracing::error!("{e}; exiting so stage0 can fetch the current buildlet");
                return Err(e);
            }
            Err(e) if e.standby() => {
                tracing::info!(coordinator = addr, "{e}");
                standby_seen = true;
                failed += 1;
            }
            Err(e @ ReverseError::Refused { .. }) => {
                tracing::error!("{e}");
                backoff = backoff.max(Duration::from_secs(10));
                failed += 1;
            }
            Err(e) => {
                tracing::warn!("{e}");
                failed += 1;
            }
        }
        if n > 1 && failed > 0 {
            at = (at + 1) % n;
            if failed % n != 0 {
                continue;
            }
        }
        let wait = if standby_seen {
            let w = jitter(standby_wait);
            standby_wait = (standby_wait * 2).min(Duration::from_secs(8));
            w
        } else {
            jitter(backoff)
        };
        standby_seen = false;
        tracing::info!("reconnecting in {wait:?}");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = b.halted() => return Ok(()),
        }
        backoff = (backoff * 2).min(max_backoff);
    }
}

/// Hex SHA-256 of the running executable (empty if it cannot be read),
/// computed once. On Linux `/proc/self/exe` is read, which is the running
/// image even if the file was replaced since.
pub fn binary_sha256() -> &'static str {
    static DIGEST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DIGEST.get_or_init(|| {
        use sha2::Digest;
        use std::io::Read;
        let open = || {
            #[cfg(target_os = "linux")]
            if let Ok(f) = std::fs::File::open("/proc/self/exe") {
                return Ok(f);
            }
            std::fs::File::open(std::env::current_exe()?)
        };
        let hash = || -> io::Result<String> {
            let mut f = open()?;
            let mut h = sha2::Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            Ok(hex::encode(h.finalize()))
        };
        hash().unwrap_or_else(|e| {
            tracing::warn!("cannot hash this executable to report its version: {e}");
            String::new()
        })
    })
}

/// The platform stage0 fetched this binary for, when stage0 started it.
fn stage0_platform() -> String {
    std::env::var(proto::ENV_STAGE0)
        .ok()
        .filter(|v| v.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or_default()
}

fn under_stage0() -> bool {
    !stage0_platform().is_empty()
}

impl ReverseError {
    /// The coordinator is a standby (`503` saying so): another leads.
    pub fn standby(&self) -> bool {
        matches!(self, ReverseError::Refused { status, message } if *status == StatusCode::SERVICE_UNAVAILABLE && message.contains("standby"))
    }

    /// The coordinator refused this buildlet as too old (`426 Upgrade Required`).
    pub fn upgrade_required(&self) -> bool {
        matches!(self, ReverseError::Refused { status, .. } if *status == StatusCode::UPGRADE_REQUIRED)
    }
}

/// Spreads reconnects of many machines: a delay uniformly in [d/2, d],
/// from the OS-seeded generator (a clock with microsecond resolution would
/// give every machine restarted together the same delay).
fn jitter(d: Duration) -> Duration {
    use rand::Rng;
    d.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
}

fn tls_connector(tls: &Tls) -> Result<Option<tokio_rustls::TlsConnector>, ReverseError> {
    Ok(client_config(tls)?.map(tokio_rustls::TlsConnector::from))
}

/// The TLS client configuration for talking to the coordinator (`None` for
/// plaintext); other farm tools (the token daemon) reuse it.
pub fn client_config(tls: &Tls) -> Result<Option<Arc<rustls::ClientConfig>>, ReverseError> {
    farmtls::client_config(tls).map_err(|e| ReverseError::Config(e.to_string()))
}

/// An HTTP/1 connector for the farm's other HTTP clients (the token daemon,
/// the coordinator's CLIs): `https://` trusted as `tls` says (web PKI when
/// it pins nothing), `http://` as it is.
pub fn https_connector(
    tls: &Tls,
) -> Result<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    ReverseError,
> {
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    Ok(match client_config(tls)? {
        Some(c) => builder
            .with_tls_config(Arc::unwrap_or_clone(c))
            .https_or_http()
            .enable_http1()
            .build(),
        None => builder
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build(),
    })
}

use farmtls::host_part;

/// One connection: dial, register, serve until the link drops. Returns how
/// long the buildlet was registered.
async fn connect_once(
    b: &Arc<Buildlet>,
    cfg: &ReverseConfig,
    addr: &str,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Result<Duration, ReverseError> {
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .map_err(|_| ReverseError::Connect {
            addr: addr.to_string(),
            err: io::Error::new(io::ErrorKind::TimedOut, "no answer within 10s"),
        })?
        .map_err(|err| ReverseError::Connect {
            addr: addr.to_string(),
            err,
        })?;
    let _ = tcp.set_nodelay(true);
    keep_alive(&tcp);
    match tls {
        None => register_and_serve(b, cfg, addr, tcp).await,
        Some(connector) => {
            let name = rustls::pki_types::ServerName::try_from(host_part(addr).to_string())
                .map_err(|e| ReverseError::Config(format!("coordinator host {addr:?}: {e}")))?;
            let stream =
                tokio::time::timeout(Duration::from_secs(30), connector.connect(name, tcp))
                    .await
                    .map_err(|_| ReverseError::Tls {
                        addr: addr.to_string(),
                        err: "handshake took longer than 30s".into(),
                    })?
                    .map_err(|e| ReverseError::Tls {
                        addr: addr.to_string(),
                        err: e.to_string(),
                    })?;
            register_and_serve(b, cfg, addr, stream).await
        }
    }
}

/// TCP keepalives: while the link is parked no HTTP/2 PING crosses it, so
/// the kernel notices a coordinator whose machine or network died (about
/// 40 s) and keeps NAT mappings open. Keepalives stop while sent data waits
/// for its acknowledgement (an answer to a ping, say), so on Linux such
/// data also has a time limit instead of the kernel's 15 minutes of
/// retransmissions.
fn keep_alive(tcp: &TcpStream) {
    let sock = socket2::SockRef::from(tcp);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(20))
        .with_interval(Duration::from_secs(5));
    #[cfg(any(target_os = "linux", target_os = "macos", target_os = "freebsd"))]
    let ka = ka.with_retries(4);
    if let Err(e) = sock.set_tcp_keepalive(&ka) {
        tracing::debug!("TCP keepalive: {e}");
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = sock.set_tcp_user_timeout(Some(Duration::from_secs(60))) {
        tracing::debug!("TCP user timeout: {e}");
    }
}

async fn register_and_serve<S>(
    b: &Arc<Buildlet>,
    cfg: &ReverseConfig,
    addr: &str,
    stream: S,
) -> Result<Duration, ReverseError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| ReverseError::Protocol(format!("HTTP handshake: {e}")))?;
    let conn = tokio::spawn(conn.with_upgrades());
    let mut req = Request::get(proto::REVERSE_PATH);
    if let Some(tf) = &cfg.token_file {
        let token = read_token(tf).map_err(ReverseError::Config)?;
        req = req.header(proto::HDR_MACHINE_TOKEN, token);
    }
    let req = req
        .header(header::HOST, addr)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, proto::REVERSE_UPGRADE)
        .header(proto::HDR_HOST_TYPE, cfg.host_type.as_str())
        .header(proto::HDR_HOSTNAME, cfg.hostname.as_str())
        .header(proto::HDR_VERSION, proto::VERSION.to_string())
        .header(proto::HDR_BUILD, env!("CARGO_PKG_VERSION"))
        .header(proto::HDR_BINARY_SHA256, binary_sha256())
        .header(proto::HDR_STAGE0, stage0_platform())
        .header(proto::HDR_BUILDER_KEY, cfg.key.as_str())
        .body(Empty::new())
        .map_err(|e| ReverseError::Config(format!("registration headers: {e}")))?;
    let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
        .await
        .map_err(|_| ReverseError::Protocol("no answer to the registration within 30s".into()))?
        .map_err(|e| ReverseError::Protocol(format!("registration: {e}")))?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = resp.status();
        // A coordinator that trickles its reason must not stall the
        // reconnect loop.
        let body = tokio::time::timeout(
            Duration::from_secs(30),
            http_body_util::Limited::new(resp.into_body(), 64 * 1024).collect(),
        )
        .await;
        let message = match body {
            Ok(Ok(b)) => String::from_utf8_lossy(&b.to_bytes()).trim().to_string(),
            Ok(Err(e)) => format!("(unreadable reason: {e})"),
            Err(_) => "(the reason did not arrive within 30s)".to_string(),
        };
        conn.abort();
        return Err(ReverseError::Refused { status, message });
    }
    let upgraded = hyper::upgrade::on(resp)
        .await
        .map_err(|e| ReverseError::Protocol(format!("taking over the connection: {e}")))?;
    tracing::info!(
        coordinator = %addr,
        host_type = %cfg.host_type,
        hostname = %cfg.hostname,
        "registered with the coordinator"
    );
    let started = std::time::Instant::now();
    if let Err(e) = serve_link(b, TokioIo::new(upgraded)).await {
        tracing::debug!("reverse connection ended: {e}");
    }
    Ok(started.elapsed())
}

/// Serves the coordinator over a reverse link (the upgraded connection of
/// `/reverse`, or any byte stream) until the link ends or the buildlet
/// halts: an HTTP/2 session whenever the coordinator begins one, parked in
/// between (see [`crate::link`]). Returns why the link ended.
pub async fn serve_link<T>(b: &Arc<Buildlet>, io: T) -> Result<(), String>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut link = Link::new(io);
    let mut buf = [0u8; 64];
    loop {
        // Parked (or just connected): answer pings until the coordinator
        // begins a session.
        loop {
            let n = tokio::select! {
                r = link.read_some(&mut buf) => r.map_err(|e| format!("reading the link: {e}"))?,
                _ = b.halted() => return Ok(()),
            };
            if n == 0 {
                return Err("the coordinator closed the link".into());
            }
            let (pings, begun) = link::parked_bytes(&mut link, &buf[..n]);
            if pings > 0 {
                // A coordinator that stops reading must not hang us here.
                tokio::time::timeout(link::RESYNC_TIMEOUT, link.send(&[link::PONG; 64][..pings]))
                    .await
                    .map_err(|_| "answering a ping: the coordinator reads nothing".to_string())?
                    .map_err(|e| format!("answering a ping: {e}"))?;
            }
            if begun {
                break;
            }
        }
        let (session, back) = link.served_session();
        let me = b.clone();
        let svc = hyper::service::service_fn(move |req| {
            let me = me.clone();
            async move { Ok::<_, std::convert::Infallible>(me.handle(req).await) }
        });
        let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(15)))
            .keep_alive_timeout(Duration::from_secs(20))
            .serve_connection(TokioIo::new(session), svc);
        // Boxed so that dropping it gives the link back.
        let mut served = Box::pin(served);
        let ended = tokio::select! {
            r = served.as_mut() => r,
            _ = b.halted() => {
                // GOAWAY: streams in flight (the `/halt` reply) complete.
                served.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(crate::server::HALT_GRACE, served).await;
                return Ok(());
            }
        };
        drop(served);
        link = tokio::time::timeout(link::RESYNC_TIMEOUT, back)
            .await
            .map_err(|_| "the ended session kept the link".to_string())?
            .map_err(|_| "the ended session dropped the link".to_string())?;
        if !link.peer_went_away {
            return Err(match ended {
                Ok(()) => "the session ended".to_string(),
                Err(e) => format!("HTTP/2: {e}"),
            });
        }
        // The coordinator let the session go: park.
        tokio::time::timeout(link::RESYNC_TIMEOUT, link.resync())
            .await
            .map_err(|_| "parking: no end mark from the coordinator in time".to_string())?
            .map_err(|e| format!("parking: {e}"))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_is_within_bounds_and_spread() {
        let js: Vec<Duration> = (0..200).map(|_| jitter(Duration::from_secs(10))).collect();
        assert!(
            js.iter()
                .all(|j| *j >= Duration::from_secs(5) && *j <= Duration::from_secs(10))
        );
        // Not a constant: the delays cover both halves of the range.
        assert!(js.iter().any(|j| *j < Duration::from_millis(7500)));
        assert!(js.iter().any(|j| *j > Duration::from_millis(7500)));
        let distinct: std::collections::BTreeSet<_> = js.iter().collect();
        assert!(distinct.len() > 150, "{} distinct delays", distinct.len());
    }
}
