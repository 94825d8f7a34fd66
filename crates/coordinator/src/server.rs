//! The coordinator's one listening port: HTTP and HTTPS on the same socket.
//!
//! The first byte of a connection tells them apart (a TLS handshake starts
//! with 0x16), so browsers can use plain HTTP on loopback while buildlets
//! dial in over TLS on the same address. Connections support HTTP/1.1
//! upgrades (for `/reverse`) and HTTP/2.

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
    serve_with(
        listener,
        router,
        tls,
        httpguard::Guard::new(Limits::COORDINATOR),
    )
    .await
}

/// [`serve`] with explicit limits (tests use small ones).
pub async fn serve_with(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    guard: Arc<httpguard::Guard>,
) {
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
                    Some(Ok(s)) => serve_conn(s, router, ConnInfo { peer, tls: true }, conn).await,
                    Some(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                    None => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            } else {
                serve_conn(stream, router, ConnInfo { peer, tls: false }, conn).await;
            }
        });
    }
}

async fn peek_tls(stream: &TcpStream) -> std::io::Result<bool> {
    let mut b = [0u8; 1];
    let n = stream.peek(&mut b).await?;
    Ok(n == 1 && b[0] == 0x16)
}

async fn serve_conn<S>(stream: S, router: Router, info: ConnInfo, conn: httpguard::Conn)
where
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
    let builder = httpguard::builder();
    let served = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
    match conn.run(served).await {
        Some(Err(e)) => tracing::debug!(peer = %info.peer, "connection: {e}"),
        Some(Ok(())) => {}
        None => tracing::debug!(peer = %info.peer, "connection closed by the guard"),
    }
}
