//! A minimal HTTP(S) client for talking to the coordinator: one connection
//! per request (stage0 makes a handful), TLS verified by a pinned
//! certificate, a CA file or the web PKI, with timeouts on every step.
//!
//! The pin verifier mirrors the buildlet's (`buildlet::reverse`): stage0
//! does not depend on the buildlet crate, to stay small.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How the coordinator's certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    /// No TLS (loopback tests and demos only).
    Plaintext,
    /// Exactly the certificate with this SHA-256 of its DER (`-tls-pin`).
    Pinned([u8; 32]),
    /// The CA certificates in this PEM file (`-ca-file`).
    CaFile(PathBuf),
    /// The public web PKI roots.
    WebPki,
}

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
        let body = tokio::time::timeout(
            Duration::from_secs(30),
            http_body_util::Limited::new(resp.into_body(), limit).collect(),
        )
        .await
        .map_err(|_| HttpError::Protocol(format!("GET {path}: the body took longer than 30s")))?
        .map_err(|e| HttpError::Protocol(format!("GET {path}: {e}")))?
        .to_bytes();
        Ok((status, body))
    }
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

fn host_part(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

/// Parses a hex SHA-256 pin (colons allowed).
pub fn parse_pin(s: &str) -> Option<[u8; 32]> {
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    crate::manifest::unhex(&hex)?.try_into().ok()
}

fn client_config(tls: &Tls) -> Result<Option<Arc<rustls::ClientConfig>>, HttpError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpError::Config(e.to_string()))?;
    let config = match tls {
        Tls::Plaintext => return Ok(None),
        Tls::Pinned(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                pin: *pin,
                provider,
            }))
            .with_no_client_auth(),
        Tls::CaFile(path) => {
            use rustls::pki_types::{CertificateDer, pem::PemObject};
            let err = |e: String| HttpError::Config(format!("CA file {}: {e}", path.display()));
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(path).map_err(|e| err(e.to_string()))? {
                roots
                    .add(c.map_err(|e| err(e.to_string()))?)
                    .map_err(|e| err(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(err("holds no certificate".into()));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Tls::WebPki => {
            let roots =
                rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(Some(Arc::new(config)))
}

#[derive(Debug)]
struct PinVerifier {
    pin: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use sha2::Digest;
        let got: [u8; 32] = sha2::Sha256::digest(end_entity.as_ref()).into();
        if bool::from(subtle::ConstantTimeEq::ct_eq(&got[..], &self.pin[..])) {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the coordinator's certificate does not match the pinned SHA-256 (-tls-pin)".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
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
        assert_eq!(parse_pin(&vec!["AB"; 32].join(":")), Some([0xab; 32]));
        assert_eq!(parse_pin("abc"), None);
    }
}
