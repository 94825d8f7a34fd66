//! The coordinator's one listening port: HTTP and HTTPS on the same socket.
//!
//! The first byte of a connection tells them apart (a TLS handshake starts
//! with 0x16), so browsers can use plain HTTP on loopback while buildlets
//! dial in over TLS on the same address. Connections support HTTP/1.1
//! upgrades (for `/reverse`) and HTTP/2.

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
                    Ok(Ok(s)) => serve_conn(s, router, ConnInfo { peer, tls: true }).await,
                    Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            } else {
                serve_conn(stream, router, ConnInfo { peer, tls: false }).await;
            }
        });
    }
}

async fn peek_tls(stream: &TcpStream) -> std::io::Result<bool> {
    let mut b = [0u8; 1];
    let n = stream.peek(&mut b).await?;
    Ok(n == 1 && b[0] == 0x16)
}

async fn serve_conn<S>(stream: S, router: Router, info: ConnInfo)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(info);
        let router = router.clone();
        async move { router.oneshot(req).await }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
        .await
    {
        tracing::debug!(peer = %info.peer, "connection: {e}");
    }
}
