//! The buildlet in reverse mode, as a volunteer's machine runs it: the real
//! `buildlet` binary dials a minimal coordinator made here (TLS with a
//! self-signed certificate it pins, the `/reverse` upgrade, an HTTP/2
//! client over the connection it opened) and is driven through
//! [`buildlet::client::Client`] over that link.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use buildlet::client::{BoxError, Client, Reply, ReqBody, Transport};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// A `buildlet` child in reverse mode, killed when dropped.
pub struct ReverseBuildlet {
    child: Kill,
    pub client: Client,
}

impl ReverseBuildlet {
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }
}

/// Kills the child when dropped (also when starting fails half-way).
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct H2(hyper::client::conn::http2::SendRequest<ReqBody>);

impl Transport for H2 {
    fn send(
        &self,
        req: Request<ReqBody>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Reply>, BoxError>> + Send + '_>> {
        let mut sender = self.0.clone();
        Box::pin(async move { Ok(sender.send_request(req).await?.map(Reply::new)) })
    }
}

/// Starts `buildlet -coordinator=...` with a work dir under `base` and
/// returns once it has registered and its link carries HTTP/2.
pub async fn start(base: &Path) -> anyhow::Result<ReverseBuildlet> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let cert = ck.cert.der().to_vec();
    let key = ck.signing_key.serialize_der();
    let pin = hex::encode(farmtls::cert_sha256(&cert));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.into()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()),
        )?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let key_file = base.join("reverse.key");
    std::fs::write(&key_file, "bench-builder-key\n")?;

    let bin = env!("CARGO_BIN_EXE_buildlet");
    let child = Command::new(bin)
        .arg(format!("-coordinator=localhost:{}", addr.port()))
        .arg("-reverse-type=host-bench-reverse")
        .arg("-hostname=bench-reverse")
        .arg(format!("-tls-pin={pin}"))
        .arg(format!("-key-file={}", key_file.display()))
        .arg(format!("-workdir={}", base.join("reverse-wd").display()))
        .env(
            "BUILDLET_LOG",
            std::env::var("BUILDLET_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {bin}"))?;
    let child = Kill(child);

    let link = tokio::time::timeout(Duration::from_secs(30), async {
        let (tcp, _) = listener.accept().await?;
        let tls = acceptor.accept(tcp).await?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = std::sync::Mutex::new(Some(tx));
        let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let tx = tx.lock().unwrap().take();
            async move {
                if req.uri().path() != buildlet::proto::REVERSE_PATH {
                    let mut r = Response::new(String::new());
                    *r.status_mut() = StatusCode::NOT_FOUND;
                    return Ok::<_, std::convert::Infallible>(r);
                }
                let on = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    if let (Ok(up), Some(tx)) = (on.await, tx) {
                        let _ = tx.send(up);
                    }
                });
                let mut r = Response::new(String::new());
                *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                r.headers_mut()
                    .insert(http::header::CONNECTION, "upgrade".parse().unwrap());
                r.headers_mut().insert(
                    http::header::UPGRADE,
                    buildlet::proto::REVERSE_UPGRADE.parse().unwrap(),
                );
                Ok(r)
            }
        });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .with_upgrades(),
        );
        let up = rx
            .await
            .map_err(|_| anyhow!("the buildlet never upgraded"))?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake::<_, ReqBody>(up)
            .await?;
        tokio::spawn(conn);
        anyhow::Ok(sender)
    })
    .await
    .map_err(|_| anyhow!("the reverse buildlet did not connect within 30 s"))??;
    let mut client = Client::with_transport(Arc::new(H2(link)), "http://buildlet".into(), None);
    client.set_header_timeout(Duration::from_secs(600));
    client
        .status()
        .await
        .context("GET /status over the reverse link")?;
    Ok(ReverseBuildlet { child, client })
}
