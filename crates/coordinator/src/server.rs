//! The coordinator's one listening port: HTTP and HTTPS on the same socket.
//!
//! The first byte of a connection tells them apart (a TLS handshake starts
//! with 0x16), so browsers can use plain HTTP on loopback while buildlets
//! dial in over TLS on the same address. Connections support HTTP/1.1
//! upgrades (for `/reverse`) and HTTP/2.
//!
//! Over TLS the ALPN result decides the protocol: `h2` gets HTTP/2 only,
//! `http/1.1` gets HTTP/1.1 only (so a client that asked for HTTP/1.1, like
//! the buildlet's `/reverse` upgrade, never sees an HTTP/2 preface check),
//! and no ALPN keeps sniffing the connection preface as plaintext does.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

use crate::reverse::ConnInfo;

/// Serves `router` on `listener` until the returned future is dropped.
pub async fn serve(listener: TcpListener, router: Router, tls: Option<Arc<rustls::ServerConfig>>) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let is_tls =
                match tokio::time::timeout(Duration::from_secs(10), peek_tls(&stream)).await {
                    Ok(Ok(t)) => t,
                    _ => return,
                };
            if is_tls {
                let Some(acceptor) = acceptor else {
                    tracing::debug!(%peer, "TLS connection but TLS is off");
                    return;
                };
                match tokio::time::timeout(Duration::from_secs(30), acceptor.accept(stream)).await {
                    Ok(Ok(s)) => {
                        let proto = Proto::from_alpn(s.get_ref().1.alpn_protocol());
                        serve_conn(s, router, ConnInfo { peer, tls: true }, proto).await
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            } else {
                serve_conn(stream, router, ConnInfo { peer, tls: false }, Proto::Sniff).await;
            }
        });
    }
}

async fn peek_tls(stream: &TcpStream) -> std::io::Result<bool> {
    let mut b = [0u8; 1];
    let n = stream.peek(&mut b).await?;
    Ok(n == 1 && b[0] == 0x16)
}

/// Which HTTP versions a connection is served with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Http1,
    Http2,
    /// Decide by the first bytes (the HTTP/2 preface or not).
    Sniff,
}

impl Proto {
    fn from_alpn(alpn: Option<&[u8]>) -> Proto {
        match alpn {
            Some(b"h2") => Proto::Http2,
            Some(b"http/1.1") => Proto::Http1,
            _ => Proto::Sniff,
        }
    }
}

async fn serve_conn<S>(stream: S, router: Router, info: ConnInfo, proto: Proto)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(info);
        let router = router.clone();
        async move { router.oneshot(req).await }
    });
    let io = TokioIo::new(stream);
    // The auto builder's http1_only/http2_only are ignored with upgrades, so
    // an ALPN choice is enforced with the version-specific builders.
    let served = match proto {
        Proto::Http1 => hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .with_upgrades()
            .await
            .map_err(|e| e.to_string()),
        Proto::Http2 => hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, svc)
            .await
            .map_err(|e| e.to_string()),
        Proto::Sniff => hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection_with_upgrades(io, svc)
            .await
            .map_err(|e| e.to_string()),
    };
    if let Err(e) = served {
        tracing::debug!(peer = %info.peer, "connection: {e}");
    }
}
