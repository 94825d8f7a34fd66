//! The coordinator's HTTP API as its command-line clients see it: one
//! HTTP(S) client trusting the coordinator by pin or web PKI, JSON calls
//! bounded in time and size whose errors carry the server's sentence, and
//! buildlet clients that reach a gomote instance's machine through the
//! coordinator. `farmer request`, `farmer ca`, `farmer user` and
//! `farmer gomote` all use it.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::Value;

use buildlet::client::{BoxError, ReqBody};

type Http = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    ReqBody,
>;

/// Time for an answer's headers, and again for its body.
const CALL_TIME: Duration = Duration::from_secs(60);
/// Most bytes of a JSON answer.
const MAX_ANSWER: usize = 16 << 20;

/// One coordinator, with the caller's token (if any).
#[derive(Clone)]
pub struct ApiClient {
    base: String,
    auth: Option<http::HeaderValue>,
    http: Http,
}

/// Lets a buildlet [`buildlet::client::Client`] send through this HTTP client.
struct Through(Http);

impl buildlet::client::Transport for Through {
    fn send(
        &self,
        req: http::Request<ReqBody>,
    ) -> Pin<
        Box<
            dyn std::future::Future<
                    Output = Result<http::Response<buildlet::client::Reply>, BoxError>,
                > + Send
                + '_,
        >,
    > {
        Box::pin(async move {
            let resp = self.0.request(req).await?;
            Ok(resp.map(buildlet::client::Reply::new))
        })
    }
}

impl ApiClient {
    /// `coordinator` is a URL (`https://…` or `http://…` on loopback);
    /// `tls_pin` trusts exactly that key or certificate instead of web PKI.
    pub fn new(
        coordinator: &str,
        token: Option<&str>,
        tls_pin: Option<&str>,
    ) -> anyhow::Result<ApiClient> {
        let tls = match tls_pin {
            Some(p) => {
                buildlet::reverse::Tls::Pinned(buildlet::reverse::parse_pin(p).with_context(
                    || format!("-tls-pin={p:?} is not {}", buildlet::reverse::PIN_FORMS),
                )?)
            }
            None => buildlet::reverse::Tls::WebPki,
        };
        let connector = buildlet::reverse::https_connector(&tls)?;
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector);
        let auth = token
            .map(|t| {
                http::HeaderValue::from_str(&format!("Bearer {}", t.trim()))
                    .context("the token has characters a header cannot carry")
            })
            .transpose()?;
        Ok(ApiClient {
            base: coordinator.trim_end_matches('/').to_string(),
            auth,
            http,
        })
    }

    /// The coordinator's URL, without a trailing slash.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// A JSON call; a non-2xx answer becomes an error with its status and
    /// the server's sentence.
    pub async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        self.call_with(method, path, body, None).await
    }

    /// [`ApiClient::call`] with one more header (a builder request's secret).
    pub async fn call_with(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Value>,
        header: Option<(&str, &str)>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let req = self.request(method, &url, body, header)?;
        let resp = tokio::time::timeout(CALL_TIME, self.http.request(req))
            .await
            .with_context(|| format!("{url}: no answer within {CALL_TIME:?}"))?
            .map_err(|e| {
                use std::error::Error as _;
                let cause = e.source().map(|c| format!(": {c}")).unwrap_or_default();
                if e.is_connect() {
                    anyhow::anyhow!("could not connect to {url}{cause}")
                } else {
                    anyhow::anyhow!("{url}: {e}{cause}")
                }
            })?;
        let status = resp.status();
        let bytes = tokio::time::timeout(
            CALL_TIME,
            http_body_util::Limited::new(resp.into_body(), MAX_ANSWER).collect(),
        )
        .await
        .with_context(|| format!("{url}: the answer did not finish within {CALL_TIME:?}"))?
        .map_err(|e| anyhow::anyhow!("{url}: reading the answer: {e}"))?
        .to_bytes();
        let v: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        if !status.is_success() {
            bail!(
                "{status}: {}",
                v["error"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            );
        }
        Ok(v)
    }

    /// A request to `url` with this client's token, a JSON body if any,
    /// and one more header if any.
    fn request(
        &self,
        method: http::Method,
        url: &str,
        body: Option<Value>,
        header: Option<(&str, &str)>,
    ) -> anyhow::Result<http::Request<ReqBody>> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(url)
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(a) = &self.auth {
            req = req.header(http::header::AUTHORIZATION, a.clone());
        }
        if let Some((k, v)) = header {
            req = req.header(k, v);
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        Ok(req.body(
            http_body_util::Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        )?)
    }

    /// `GET path` as a stream: each piece of the answer goes to `out` as it
    /// arrives (a live log that may stay quiet for minutes: no deadline
    /// between pieces, only for the headers). A non-2xx answer is an error
    /// with its status and body.
    pub async fn stream(
        &self,
        path: &str,
        mut out: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> anyhow::Result<()> {
        let url = format!("{}{path}", self.base);
        let req = self.request(http::Method::GET, &url, None, None)?;
        let resp = tokio::time::timeout(CALL_TIME, self.http.request(req))
            .await
            .with_context(|| format!("{url}: no answer within {CALL_TIME:?}"))?
            .with_context(|| format!("could not reach {url}"))?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = http_body_util::Limited::new(body, MAX_ANSWER)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            bail!("{status}: {}", String::from_utf8_lossy(&bytes).trim());
        }
        while let Some(frame) = body.frame().await {
            let frame = frame.with_context(|| format!("{url}: the answer broke off"))?;
            if let Ok(data) = frame.into_data() {
                out(&data).context("writing the answer out")?;
            }
        }
        Ok(())
    }

    /// A buildlet client whose every path goes under `prefix` on the
    /// coordinator (a gomote instance's proxy), with this client's token.
    /// `long`: the answer may come only after a long upload.
    pub fn buildlet(&self, prefix: &str, long: bool) -> buildlet::client::Client {
        let mut c = buildlet::client::Client::with_transport(
            Arc::new(Through(self.http.clone())),
            format!("{}{prefix}", self.base),
            None,
        );
        c.set_authorization(self.auth.clone());
        if long {
            c.set_header_timeout(Duration::from_secs(24 * 3600));
        }
        c
    }
}
