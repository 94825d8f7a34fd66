//! A minimal HTTP(S) client for talking to the coordinator: one connection
//! per request (stage0 makes a handful), TLS verified by a pinned
//! certificate, a CA file or the web PKI, with timeouts on every step.
//!
//! Certificate checks (pin, CA file, web PKI) come from the `farmtls` crate,
//! shared with the buildlet; stage0 does not depend on the buildlet crate.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

pub use farmtls::Tls;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot connect to {addr}: {err}")]
    Connect { addr: String, err: String },
    #[error("TLS with {addr}: {err}")]
    Tls { addr: String, err: String },
    #[error("{0}")]
    Protocol(String),
    #[error("bad TLS configuration: {0}")]
    Config(String),
}

/// Talks to one coordinator.
#[derive(Clone)]
pub struct Client {
    addr: String,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Client {
    /// `addr` is `HOST:PORT` (port 443 is added when missing).
    pub fn new(addr: &str, tls: &Tls) -> Result<Client, HttpError> {
        Ok(Client {
            addr: with_port(addr),
            tls: client_config(tls)?.map(tokio_rustls::TlsConnector::from),
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends `GET path` and returns the response once its headers arrived.
    pub async fn get(&self, path: &str) -> Result<Response<Incoming>, HttpError> {
        let addr = self.addr.clone();
        let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&addr))
            .await
            .map_err(|_| HttpError::Connect {
                addr: addr.clone(),
                err: "no answer within 10s".into(),
            })?
            .map_err(|e| HttpError::Connect {
                addr: addr.clone(),
                err: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => send(tcp, &addr, path).await,
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from(host_part(&addr).to_string())
                    .map_err(|e| HttpError::Config(format!("coordinator host {addr:?}: {e}")))?;
                let stream =
                    tokio::time::timeout(Duration::from_secs(30), connector.connect(name, tcp))
                        .await
                        .map_err(|_| HttpError::Tls {
                            addr: addr.clone(),
                            err: "handshake took longer than 30s".into(),
                        })?
                        .map_err(|e| HttpError::Tls {
                            addr: addr.clone(),
                            err: e.to_string(),
                        })?;
                send(stream, &addr, path).await
            }
        }
    }

    /// `GET path` and the whole body (at most `limit` bytes), for small answers.
    pub async fn get_small(
        &self,
        path: &str,
        limit: usize,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        let resp = self.get(path).await?;
        let status = resp.status();
        Ok((status, read_small(resp, limit, path).await?))
    }
}

/// The body of a small answer: at most `limit` bytes within 30 s, so a
/// server that trickles or floods cannot stall or fill the caller.
pub async fn read_small(
    resp: Response<Incoming>,
    limit: usize,
    what: &str,
) -> Result<Bytes, HttpError> {
    Ok(tokio::time::timeout(
        Duration::from_secs(30),
        http_body_util::Limited::new(resp.into_body(), limit).collect(),
    )
    .await
    .map_err(|_| HttpError::Protocol(format!("GET {what}: the body took longer than 30s")))?
    .map_err(|e| HttpError::Protocol(format!("GET {what}: {e}")))?
    .to_bytes())
}

async fn send<S>(stream: S, addr: &str, path: &str) -> Result<Response<Incoming>, HttpError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| HttpError::Protocol(format!("HTTP handshake with {addr}: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::get(path)
        .header(header::HOST, addr)
        .header(
            header::USER_AGENT,
            concat!("farmer-stage0/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| HttpError::Protocol(format!("GET {path}: {e}")))?;
    tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
        .await
        .map_err(|_| HttpError::Protocol(format!("GET {path}: no answer within 30s")))?
        .map_err(|e| HttpError::Protocol(format!("GET {path}: {e}")))
}

/// Adds `:443` when `addr` has no port.
pub fn with_port(addr: &str) -> String {
    let has_port = addr
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !addr.ends_with(']');
    if has_port {
        addr.to_string()
    } else {
        format!("{addr}:443")
    }
}

use farmtls::host_part;

/// Parses a `-tls-pin` (see [`farmtls::parse_pin`]).
pub fn parse_pin(s: &str) -> Option<farmtls::Pin> {
    farmtls::parse_pin(s)
}

fn client_config(tls: &Tls) -> Result<Option<Arc<rustls::ClientConfig>>, HttpError> {
    farmtls::client_config(tls).map_err(|e| HttpError::Config(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_pins() {
        assert_eq!(with_port("farm.example"), "farm.example:443");
        assert_eq!(with_port("farm.example:8080"), "farm.example:8080");
        assert_eq!(with_port("[::1]"), "[::1]:443");
        assert_eq!(with_port("[::1]:80"), "[::1]:80");
        assert_eq!(host_part("[::1]:80"), "::1");
        assert_eq!(
            parse_pin(&vec!["AB"; 32].join(":")),
            Some(farmtls::Pin::Cert([0xab; 32]))
        );
        assert_eq!(parse_pin("abc"), None);
    }
}
