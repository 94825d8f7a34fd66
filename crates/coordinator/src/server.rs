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

use axum::Router;
use httpguard::Limits;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

use crate::reverse::ConnInfo;

/// Serves `router` on `listener` until the returned future is dropped.
///
/// Every connection is watched by [`httpguard`]: it must send its first
/// request (TLS handshake included) within 10 s, is closed when idle, and
/// at most 512 may wait for their first request at once (the oldest is
/// closed to make room), so a flood of idle or slow connections cannot
/// keep machines from registering.
pub async fn serve(listener: TcpListener, router: Router, tls: Option<Arc<rustls::ServerConfig>>) {
    let guard = httpguard::Guard::new(Limits::COORDINATOR);
    httpguard::raise_fd_limit();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (stream, peer) = guard.accept(&listener).await;
        let Some(mut conn) = guard.admit() else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Some(Ok(is_tls)) = conn.before(peek_tls(&stream)).await else {
                return;
            };
            if is_tls {
                let Some(acceptor) = acceptor else {
                    tracing::debug!(%peer, "TLS connection but TLS is off");
                    return;
                };
                match conn.before(acceptor.accept(stream)).await {
                    Some(Ok(s)) => {
                        let proto = Proto::from_alpn(s.get_ref().1.alpn_protocol());
                        serve_conn(s, router, ConnInfo { peer, tls: true }, proto, conn).await
                    }
                    Some(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                    None => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            } else {
                serve_conn(
                    stream,
                    router,
                    ConnInfo { peer, tls: false },
                    Proto::Sniff,
                    conn,
                )
                .await;
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

async fn serve_conn<S>(
    stream: S,
    router: Router,
    info: ConnInfo,
    proto: Proto,
    conn: httpguard::Conn,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(
        move |mut req: http::Request<httpguard::DeadlineBody<hyper::body::Incoming>>| {
            req.extensions_mut().insert(info);
            let router = router.clone();
            async move { router.oneshot(req.map(axum::body::Body::new)).await }
        },
    );
    let svc = conn.service(svc);
    let io = TokioIo::new(stream);
    // The auto builder's http1_only/http2_only are ignored with upgrades, so
    // an ALPN choice is enforced with the version-specific builders.
    let served = async move {
        match proto {
            Proto::Http1 => httpguard::http1_builder()
                .serve_connection(io, svc)
                .with_upgrades()
                .await
                .map_err(|e| e.to_string()),
            Proto::Http2 => httpguard::http2_builder()
                .serve_connection(io, svc)
                .await
                .map_err(|e| e.to_string()),
            Proto::Sniff => httpguard::builder()
                .serve_connection_with_upgrades(io, svc)
                .await
                .map_err(|e| e.to_string()),
        }
    };
    match conn.run(served).await {
        Some(Err(e)) => tracing::debug!(peer = %info.peer, "connection: {e}"),
        Some(Ok(())) => {}
        None => tracing::debug!(peer = %info.peer, "connection closed by the guard"),
    }
}
