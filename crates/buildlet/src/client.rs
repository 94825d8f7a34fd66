//! A typed client for the buildlet API, used by the coordinator and gomote.
//!
//! Every method separates two kinds of failure that a build farm must never
//! confuse: the buildlet answered and the *work* failed (a command exited
//! non-zero: [`ProcessState`] in an `Ok`), and the *machine* failed (it could
//! not be reached, or the stream broke off: [`Error::is_communication`]). The
//! coordinator retries the second kind on another machine and reports the
//! first as a failed build.
//!
//! The HTTP transport is pluggable ([`Transport`]) so the same client drives a
//! buildlet listening on a port and one that dialled in (reverse mode).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::io::ReaderStream;

use crate::proto::{self, LsEntry, ProcessState, Status};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Request body type sent by the client.
pub type ReqBody = BoxBody<Bytes, io::Error>;

/// Called with the cumulative number of bytes moved, for progress displays.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// Why a call to a buildlet failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The buildlet could not be reached or did not answer in time.
    #[error("buildlet unreachable: {0}")]
    Unreachable(BoxError),
    /// The connection broke off mid-response (for `/exec`: no exit state arrived).
    #[error("connection to the buildlet broke off: {0}")]
    BrokeOff(String),
    /// The buildlet refused the request (4xx); the message is the buildlet's.
    #[error("buildlet refused the request ({status}): {message}")]
    Rejected { status: StatusCode, message: String },
    /// The buildlet hit an error of its own (5xx), e.g. its disk is full.
    #[error("buildlet failed ({status}): {message}")]
    Server { status: StatusCode, message: String },
    /// The buildlet answered something this client does not understand.
    #[error("unexpected reply from the buildlet: {0}")]
    Protocol(String),
    /// Reading or writing a local file or writer failed.
    #[error("local I/O: {0}")]
    Local(#[source] io::Error),
}

impl Error {
    /// True when the machine, not the work, is at fault: retry elsewhere.
    pub fn is_communication(&self) -> bool {
        matches!(
            self,
            Error::Unreachable(_) | Error::BrokeOff(_) | Error::Protocol(_) | Error::Server { .. }
        )
    }
}

/// Sends one HTTP request to a buildlet. Implemented for a plain HTTP
/// connection pool ([`HttpTransport`]); reverse mode supplies its own.
pub trait Transport: Send + Sync + 'static {
    fn send(
        &self,
        req: Request<ReqBody>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Reply>, BoxError>> + Send + '_>>;

    /// Whether the connection rests between sessions (a parked reverse
    /// link, see [`crate::link`]): its liveness is the link's own ping, so
    /// health checks leave it alone rather than wake it.
    fn parked(&self) -> bool {
        false
    }
}

/// Talks HTTP/1.1 to a buildlet listening on an address.
pub struct HttpTransport {
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        ReqBody,
    >,
}

impl HttpTransport {
    pub fn new() -> HttpTransport {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .build(connector);
        HttpTransport { client }
    }
}

impl Default for HttpTransport {
    fn default() -> Self {
        HttpTransport::new()
    }
}

impl Transport for HttpTransport {
    fn send(
        &self,
        req: Request<ReqBody>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Reply>, BoxError>> + Send + '_>> {
        Box::pin(async move {
            let resp = self.client.request(req).await?;
            Ok(resp.map(Reply::new))
        })
    }
}

/// A buildlet's answer body, with what its transport keeps alive until the
/// body is dropped: a reverse link counts the request as in flight until
/// then, so it never parks under a body still being read.
pub struct Reply {
    body: Incoming,
    _hold: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl Reply {
    pub fn new(body: Incoming) -> Reply {
        Reply { body, _hold: None }
    }

    /// `body`, keeping `hold` alive as long as it lives.
    pub fn holding(body: Incoming, hold: impl std::any::Any + Send + Sync) -> Reply {
        Reply {
            body,
            _hold: Some(Box::new(hold)),
        }
    }
}

impl http_body::Body for Reply {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Options of [`Client::exec`].
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    pub args: Vec<String>,
    /// `KEY=VALUE` pairs added to the buildlet's environment.
    pub env: Vec<String>,
    /// Directory relative to the work dir.
    pub dir: Option<String>,
    /// Replaces `PATH`; entries may use `$PATH`, `$WORKDIR` and `$EMPTY`.
    pub path: Vec<String>,
    /// Look the command up only on the system, never in the work dir.
    pub sys: bool,
    /// Kill the process tree after this long.
    pub timeout: Option<Duration>,
    /// Have the buildlet print the resolved command first.
    pub debug: bool,
}

/// What [`Client::exec_then_clean`] did with the work dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cleaned {
    /// Emptied, as `remove_all(&["."])` would have.
    Emptied,
    /// The buildlet tried and failed; why.
    Failed(String),
    /// The buildlet did not say: one that predates the option.
    Unknown,
}

/// Options of [`Client::shell`]; the defaults are an interactive login
/// shell on an 80x24 `xterm`.
#[derive(Debug, Clone)]
pub struct ShellOptions {
    /// `TERM` in the session.
    pub term: String,
    pub cols: u16,
    pub rows: u16,
    /// Run under a terminal; without one, stdout and stderr are merged on
    /// one pipe (`ssh host cmd` without `-t`).
    pub pty: bool,
    /// A command line for the machine user's shell (`$SHELL -c`); `None`
    /// for an interactive login shell.
    pub command: Option<String>,
    /// `KEY=VALUE` pairs added to the environment.
    pub env: Vec<String>,
    /// Directory relative to the work dir.
    pub dir: Option<String>,
}

impl Default for ShellOptions {
    fn default() -> ShellOptions {
        let (cols, rows) = proto::SHELL_DEFAULT_SIZE;
        ShellOptions {
            term: proto::SHELL_DEFAULT_TERM.into(),
            cols,
            rows,
            pty: true,
            command: None,
            env: Vec::new(),
            dir: None,
        }
    }
}

pub use crate::proto::ShellInput;

/// What a session sends back ([`ShellSession::next`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShellEvent {
    /// Bytes the session printed (terminal output, or stdout and stderr).
    Output(Bytes),
    /// How the session's main process ended; the last event.
    Exit(ProcessState),
}

/// A running `/shell` session. Dropping it ends the session on the machine:
/// the request is aborted, and the buildlet kills its processes.
pub struct ShellSession {
    body: Reply,
    ended: bool,
    /// Dropped with the session; aborts the request body, so the
    /// connection is torn down even while the input sender lives on.
    _abort: tokio::sync::oneshot::Sender<()>,
}

impl std::fmt::Debug for ShellSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShellSession")
            .field("ended", &self.ended)
            .finish()
    }
}

impl ShellSession {
    /// The next output chunk, or the exit state (the last event; calling
    /// again after it is a [`Error::Protocol`]). A stream that ends without
    /// the `Process-State` trailer is [`Error::BrokeOff`]. Not bounded in
    /// time: an interactive session may sit idle for hours; the transport's
    /// keepalives notice a dead link, and callers bound what they must.
    pub async fn next(&mut self) -> Result<ShellEvent, Error> {
        if self.ended {
            return Err(Error::Protocol("the session already ended".into()));
        }
        loop {
            let Some(frame) = self.body.frame().await else {
                self.ended = true;
                return Err(Error::BrokeOff(
                    "session output ended without a Process-State trailer".into(),
                ));
            };
            let frame = frame.map_err(|e| {
                self.ended = true;
                Error::BrokeOff(e.to_string())
            })?;
            match frame.into_data() {
                Ok(data) if data.is_empty() => continue,
                Ok(data) => return Ok(ShellEvent::Output(data)),
                Err(frame) => {
                    let Ok(trailers) = frame.into_trailers() else {
                        continue;
                    };
                    self.ended = true;
                    return state_from_trailers(&trailers).map(ShellEvent::Exit);
                }
            }
        }
    }
}

/// Options of [`Client::ls`].
#[derive(Debug, Clone, Default)]
pub struct LsOptions {
    pub recursive: bool,
    pub digest: bool,
    pub skip: Vec<String>,
}

/// A handle on one buildlet.
#[derive(Clone)]
pub struct Client {
    transport: Arc<dyn Transport>,
    base: String,
    auth: Option<HeaderValue>,
    header_timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).finish()
    }
}

impl Client {
    /// A client for a buildlet in direct mode at `addr` (`host:port` or an
    /// `http://` URL), with the password it was started with, if any.
    pub fn new(addr: &str, password: Option<&str>) -> Client {
        let base = if addr.contains("://") {
            addr.trim_end_matches('/').to_string()
        } else {
            format!("http://{addr}")
        };
        Client::with_transport(Arc::new(HttpTransport::new()), base, password)
    }

    /// Whether the machine's link is parked ([`Transport::parked`]).
    pub fn parked(&self) -> bool {
        self.transport.parked()
    }

    /// A client over any transport; `base` is the URL prefix put on every path.
    pub fn with_transport(
        transport: Arc<dyn Transport>,
        base: String,
        password: Option<&str>,
    ) -> Client {
        let auth = password.map(|p| {
            use base64::Engine;
            let token = base64::engine::general_purpose::STANDARD.encode(format!("farmer:{p}"));
            HeaderValue::from_str(&format!("Basic {token}"))
                .expect("base64 is a valid header value")
        });
        Client {
            transport,
            base,
            auth,
            header_timeout: Duration::from_secs(30),
        }
    }

    /// How long to wait for response headers before declaring the buildlet
    /// unreachable (default 30 s; `/exec` sends its headers at once).
    pub fn set_header_timeout(&mut self, d: Duration) {
        self.header_timeout = d;
    }

    fn uri(&self, path: &str, query: &[(&str, &str)]) -> Result<Uri, Error> {
        let mut s = format!("{}{}", self.base, path);
        if !query.is_empty() {
            s.push('?');
            s.push_str(
                &form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(query)
                    .finish(),
            );
        }
        s.parse()
            .map_err(|e| Error::Protocol(format!("bad URL {s:?}: {e}")))
    }

    async fn send(
        &self,
        method: Method,
        uri: Uri,
        body: ReqBody,
        content_type: Option<&str>,
    ) -> Result<Response<Reply>, Error> {
        self.send_ext(method, uri, body, content_type, Duration::ZERO)
            .await
    }

    /// [`Client::send`] with `extra` time for the buildlet's work before
    /// it answers.
    async fn send_ext(
        &self,
        method: Method,
        uri: Uri,
        body: ReqBody,
        content_type: Option<&str>,
        extra: Duration,
    ) -> Result<Response<Reply>, Error> {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(a) = &self.auth {
            req = req.header(header::AUTHORIZATION, a.clone());
        }
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        req = req.header(header::TE, "trailers");
        // The answer comes after the whole body is in: a known-size body
        // (a source tree) gets time to cross the slowest link a machine is
        // expected to have, on top of the wait for the answer itself.
        let upload = http_body::Body::size_hint(&body)
            .exact()
            .map_or(Duration::ZERO, |n| Duration::from_secs(n / SLOWEST_LINK));
        let req = req
            .body(body)
            .map_err(|e| Error::Protocol(format!("building request: {e}")))?;
        let resp = self
            .send_within(req, self.header_timeout + upload + extra)
            .await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        // An error body is a sentence; a machine that sends more (or never
        // finishes) gets its first bytes quoted, not our memory.
        let message = match read_limited(resp, MAX_ERROR_BODY, SMALL_BODY_TIME, true).await {
            Ok(b) => String::from_utf8_lossy(&b).trim().to_string(),
            Err(e) => format!("(body unreadable: {e})"),
        };
        if status.is_server_error() {
            Err(Error::Server { status, message })
        } else {
            Err(Error::Rejected { status, message })
        }
    }

    async fn get_bytes(
        &self,
        path: &str,
        query: &[(&str, &str)],
        limit: usize,
    ) -> Result<Bytes, Error> {
        let resp = self
            .send(Method::GET, self.uri(path, query)?, empty(), None)
            .await?;
        read_limited(resp, limit, SMALL_BODY_TIME, false).await
    }

    async fn post_form(&self, path: &str, form: &[(&str, &str)]) -> Result<Response<Reply>, Error> {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        self.send(
            Method::POST,
            self.uri(path, &[])?,
            full(Bytes::from(body)),
            Some("application/x-www-form-urlencoded"),
        )
        .await
    }

    /// `GET /healthz`.
    pub async fn healthz(&self) -> Result<(), Error> {
        self.get_bytes("/healthz", &[], MAX_SMALL_BODY)
            .await
            .map(|_| ())
    }

    /// `GET /status`.
    pub async fn status(&self) -> Result<Status, Error> {
        let b = self.get_bytes("/status", &[], MAX_SMALL_BODY).await?;
        serde_json::from_slice(&b).map_err(|e| Error::Protocol(format!("/status: {e}")))
    }

    /// `GET /machine-token`: the bot's current machine token (bot mode).
    pub async fn machine_token(&self) -> Result<String, Error> {
        let b = self
            .get_bytes("/machine-token", &[], MAX_SMALL_BODY)
            .await?;
        Ok(String::from_utf8_lossy(&b).trim().to_string())
    }

    /// `GET /workdir`: the absolute work dir on the machine.
    pub async fn workdir(&self) -> Result<String, Error> {
        let b = self.get_bytes("/workdir", &[], MAX_SMALL_BODY).await?;
        Ok(String::from_utf8_lossy(&b).trim().to_string())
    }

    /// `PUT /writetgz`: extracts a tar.gz read from `reader` into `dir`.
    pub async fn put_tgz<R>(
        &self,
        dir: &str,
        reader: R,
        progress: Option<Progress>,
    ) -> Result<(), Error>
    where
        R: AsyncRead + Send + Sync + 'static,
    {
        let mut sent = 0u64;
        let stream = ReaderStream::with_capacity(reader, 128 * 1024).map_ok(move |chunk| {
            sent += chunk.len() as u64;
            if let Some(p) = &progress {
                p(sent);
            }
            Frame::data(chunk)
        });
        let body = BodyExt::boxed(StreamBody::new(stream));
        let resp = self
            .send(
                Method::PUT,
                self.uri("/writetgz", &[("dir", dir)])?,
                body,
                Some("application/gzip"),
            )
            .await?;
        read_all(resp).await.map(|_| ())
    }

    /// `PUT /writetgz` with an in-memory tar.gz.
    pub async fn put_tgz_bytes(&self, dir: &str, tgz: Bytes) -> Result<(), Error> {
        let resp = self
            .send(
                Method::PUT,
                self.uri("/writetgz", &[("dir", dir)])?,
                full(tgz),
                Some("application/gzip"),
            )
            .await?;
        read_all(resp).await.map(|_| ())
    }

    /// `PUT /writesrc`: a source tree through the buildlet's source cache,
    /// whole (`base` None) or as a delta over the tree `base` the cache
    /// holds; the buildlet checks the result is git's tree `tree`. A
    /// `409` (cache holds another tree), `422` (tree mismatch) or `404` (no
    /// cache: an older buildlet) is [`Error::Rejected`] with that status.
    pub async fn put_src(
        &self,
        dir: &str,
        tgz: Bytes,
        tree: &str,
        base: Option<&str>,
    ) -> Result<crate::proto::SrcWritten, Error> {
        let mut q = vec![("dir", dir), ("tree", tree)];
        if let Some(b) = base {
            q.push(("base", b));
        }
        // The buildlet hashes and links the whole tree before it answers:
        // on a slow disk, minutes for a large tree, however small the delta.
        let resp = self
            .send_ext(
                Method::PUT,
                self.uri("/writesrc", &q)?,
                full(tgz),
                Some("application/gzip"),
                SOURCE_WORK,
            )
            .await?;
        let body = read_all(resp).await?;
        serde_json::from_slice(&body)
            .map_err(|e| Error::Protocol(format!("/writesrc answered: {e}")))
    }

    /// `POST /writetgz`: the buildlet fetches the tar.gz from `url` itself.
    pub async fn put_tgz_from_url(&self, dir: &str, url: &str) -> Result<(), Error> {
        let resp = self
            .post_form("/writetgz", &[("dir", dir), ("url", url)])
            .await?;
        read_all(resp).await.map(|_| ())
    }

    /// `PUT /write`: writes one file with the given permission bits.
    pub async fn put_file(&self, path: &str, mode: u32, content: Bytes) -> Result<(), Error> {
        let mode = format!("{mode:04o}");
        let resp = self
            .send(
                Method::PUT,
                self.uri("/write", &[("path", path), ("mode", &mode)])?,
                full(content),
                None,
            )
            .await?;
        read_all(resp).await.map(|_| ())
    }

    /// `GET /tgz`: streams a tar.gz of `dir` into `out`; returns bytes written.
    /// A transfer cut short is [`Error::BrokeOff`], never a silently short file.
    pub async fn get_tgz<W>(
        &self,
        dir: &str,
        out: &mut W,
        progress: Option<Progress>,
    ) -> Result<u64, Error>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        let resp = self
            .send(
                Method::GET,
                self.uri("/tgz", &[("dir", dir)])?,
                empty(),
                None,
            )
            .await?;
        let mut body = resp.into_body();
        let mut n = 0u64;
        loop {
            // A machine that stops sending mid-archive is a broken machine.
            let Some(frame) = tokio::time::timeout(FRAME_DEADLINE, body.frame())
                .await
                .map_err(|_| {
                    Error::BrokeOff(format!("/tgz sent nothing for {FRAME_DEADLINE:?}"))
                })?
            else {
                break;
            };
            let frame = frame.map_err(|e| Error::BrokeOff(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                n += data.len() as u64;
                if n > MAX_DOWNLOAD {
                    return Err(Error::Protocol(format!(
                        "/tgz sent more than {MAX_DOWNLOAD} bytes; giving up"
                    )));
                }
                out.write_all(&data).await.map_err(Error::Local)?;
                if let Some(p) = &progress {
                    p(n);
                }
            }
        }
        out.flush().await.map_err(Error::Local)?;
        Ok(n)
    }

    /// `GET /ls`.
    pub async fn ls(&self, dir: &str, opts: &LsOptions) -> Result<Vec<LsEntry>, Error> {
        let mut q = vec![("dir", dir)];
        if opts.recursive {
            q.push(("recursive", "1"));
        }
        if opts.digest {
            q.push(("digest", "1"));
        }
        for s in &opts.skip {
            q.push(("skip", s));
        }
        let resp = self
            .send(Method::GET, self.uri("/ls", &q)?, empty(), None)
            .await?;
        let b = read_limited(resp, MAX_LISTING, LISTING_TIME, false).await?;
        b.split(|c| *c == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).map_err(|e| Error::Protocol(format!("/ls: {e}"))))
            .collect()
    }

    /// Empties the work dir and the source cache (`/removeall` with
    /// `srccache=1`): before a machine changes hands.
    pub async fn clear_all(&self) -> Result<(), Error> {
        let resp = self
            .post_form("/removeall", &[("path", "."), ("srccache", "1")])
            .await?;
        read_all(resp).await.map(|_| ())
    }

    /// `POST /removeall`; `"."` empties the work dir.
    pub async fn remove_all(&self, paths: &[&str]) -> Result<(), Error> {
        let form: Vec<(&str, &str)> = paths.iter().map(|p| ("path", *p)).collect();
        let resp = self.post_form("/removeall", &form).await?;
        read_all(resp).await.map(|_| ())
    }

    /// `POST /halt`.
    pub async fn halt(&self) -> Result<(), Error> {
        let resp = self.post_form("/halt", &[]).await?;
        read_all(resp).await.map(|_| ())
    }

    /// `POST /exec`: runs `cmd`, copying its combined output into `out` as it
    /// arrives. `Ok` carries how the command ended (which may be a failure);
    /// `Err` means the buildlet refused the request or the stream broke off.
    pub async fn exec<W>(
        &self,
        cmd: &str,
        opts: &ExecOptions,
        out: &mut W,
    ) -> Result<ProcessState, Error>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        Ok(self.run_exec(cmd, opts, false, out).await?.0)
    }

    /// [`Client::exec`], then the work dir emptied as
    /// [`Client::remove_all`]`(&["."])` does, in the same request: the
    /// buildlet cleans once the command and all it left are gone, before
    /// it answers. One round trip less for a machine's last command.
    /// Whether it cleaned is the second value; an older buildlet that does
    /// not know the option runs the command alone ([`Cleaned::Unknown`]).
    pub async fn exec_then_clean<W>(
        &self,
        cmd: &str,
        opts: &ExecOptions,
        out: &mut W,
    ) -> Result<(ProcessState, Cleaned), Error>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        self.run_exec(cmd, opts, true, out).await
    }

    async fn run_exec<W>(
        &self,
        cmd: &str,
        opts: &ExecOptions,
        clean: bool,
        out: &mut W,
    ) -> Result<(ProcessState, Cleaned), Error>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        let timeout = opts.timeout.map(|t| format!("{}ms", t.as_millis()));
        let mut form: Vec<(&str, &str)> = vec![("cmd", cmd)];
        form.extend(opts.args.iter().map(|a| ("args", a.as_str())));
        form.extend(opts.env.iter().map(|a| ("env", a.as_str())));
        form.extend(opts.path.iter().map(|a| ("path", a.as_str())));
        if let Some(d) = &opts.dir {
            form.push(("dir", d));
        }
        if opts.sys {
            form.push(("mode", "sys"));
        }
        if let Some(t) = &timeout {
            form.push(("timeout", t));
        }
        if opts.debug {
            form.push(("debug", "1"));
        }
        if clean {
            form.push(("clean", "1"));
        }
        let answer = self.exec_answer(&form, out);
        // A command with a timeout has a bounded answer (see
        // `proto::EXEC_ANSWER_GRACE`), counted from the request.
        let Some(timeout) = opts.timeout else {
            return answer.await;
        };
        let grace = proto::EXEC_ANSWER_GRACE
            + if clean {
                proto::CLEAN_LIMIT
            } else {
                Duration::ZERO
            };
        tokio::time::timeout(timeout + grace, answer)
            .await
            .unwrap_or_else(|_| {
                Err(Error::BrokeOff(format!(
                    "the buildlet did not end the command within {:?} (its timeout and {grace:?} more)",
                    timeout + grace
                )))
            })
    }

    /// Sends an `/exec` form and copies its answer into `out` until the
    /// trailers.
    async fn exec_answer<W>(
        &self,
        form: &[(&str, &str)],
        out: &mut W,
    ) -> Result<(ProcessState, Cleaned), Error>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        let resp = self.post_form("/exec", form).await?;
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| Error::BrokeOff(e.to_string()))?;
            match frame.into_data() {
                Ok(data) => out.write_all(&data).await.map_err(Error::Local)?,
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        out.flush().await.map_err(Error::Local)?;
                        let cleaned = match trailers.get(proto::CLEAN_STATE_TRAILER) {
                            None => Cleaned::Unknown,
                            Some(v) if v == "ok" => Cleaned::Emptied,
                            Some(v) => {
                                Cleaned::Failed(String::from_utf8_lossy(v.as_bytes()).into())
                            }
                        };
                        return Ok((state_from_trailers(&trailers)?, cleaned));
                    }
                }
            }
        }
        Err(Error::BrokeOff(
            "output ended without a Process-State trailer".into(),
        ))
    }

    /// `POST /shell`: opens an interactive session (see
    /// [`proto::SHELL_PATH`]). `input` feeds the request body; when its
    /// sender is dropped, input ends as with [`ShellInput::Eof`]. Dropping
    /// the returned session ends the session on the machine, killing its
    /// processes. Only the response headers are bounded in time (the
    /// header timeout); the session lasts as long as it runs.
    pub async fn shell(
        &self,
        opts: &ShellOptions,
        input: tokio::sync::mpsc::Receiver<ShellInput>,
    ) -> Result<ShellSession, Error> {
        let cols = opts.cols.to_string();
        let rows = opts.rows.to_string();
        let mut q: Vec<(&str, &str)> = vec![
            ("term", &opts.term),
            ("cols", &cols),
            ("rows", &rows),
            ("pty", if opts.pty { "1" } else { "0" }),
        ];
        if let Some(c) = &opts.command {
            q.push(("cmd", c));
        }
        if let Some(d) = &opts.dir {
            q.push(("dir", d));
        }
        q.extend(opts.env.iter().map(|e| ("env", e.as_str())));
        let uri = self.uri(proto::SHELL_PATH, &q)?;
        let (abort_tx, abort_rx) = tokio::sync::oneshot::channel::<()>();
        let stream = futures_util::stream::unfold(Some((input, abort_rx)), |state| async move {
            let (mut input, mut abort) = state?;
            tokio::select! {
                next = input.recv() => {
                    let next = next?;
                    Some((Ok(Frame::data(next.encode())), Some((input, abort))))
                }
                // An error aborts the request (HTTP/2: a reset stream;
                // HTTP/1: a closed connection).
                _ = &mut abort => Some((
                    Err(io::Error::other("shell session dropped")),
                    None,
                )),
            }
        });
        let body = BodyExt::boxed(StreamBody::new(stream));
        let resp = self
            .send(Method::POST, uri, body, Some("application/octet-stream"))
            .await?;
        Ok(ShellSession {
            body: resp.into_body(),
            ended: false,
            _abort: abort_tx,
        })
    }

    /// Like [`Client::exec`], collecting the output in memory.
    pub async fn exec_output(
        &self,
        cmd: &str,
        opts: &ExecOptions,
    ) -> Result<(ProcessState, Vec<u8>), Error> {
        let mut out = Vec::new();
        let st = self.exec(cmd, opts, &mut out).await?;
        Ok((st, out))
    }

    /// Sends `req` as it is to the buildlet, its path and query put after
    /// this client's base URL and its credentials added, and returns the
    /// answer whatever its status, body unread: for a proxy in front of the
    /// buildlet API (gomote). Only the response headers are bounded in
    /// time (`headers_within`); the caller bounds the body.
    pub async fn forward(
        &self,
        req: Request<ReqBody>,
        headers_within: Duration,
    ) -> Result<Response<Reply>, Error> {
        let (mut parts, body) = req.into_parts();
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        parts.uri = format!("{}{pq}", self.base)
            .parse()
            .map_err(|e| Error::Protocol(format!("bad URL {pq:?}: {e}")))?;
        parts.headers.remove(header::AUTHORIZATION);
        if let Some(a) = &self.auth {
            parts.headers.insert(header::AUTHORIZATION, a.clone());
        }
        self.send_within(Request::from_parts(parts, body), headers_within)
            .await
    }

    /// Sends through the transport; no response headers within `limit`
    /// means the buildlet is unreachable.
    async fn send_within(
        &self,
        req: Request<ReqBody>,
        limit: Duration,
    ) -> Result<Response<Reply>, Error> {
        tokio::time::timeout(limit, self.transport.send(req))
            .await
            .map_err(|_| Error::Unreachable(format!("no response within {limit:?}").into()))?
            .map_err(Error::Unreachable)
    }

    /// Replaces the credentials sent with every request (by default the
    /// buildlet password of [`Client::new`]); a gomote client sends its
    /// user token to the coordinator this way.
    pub fn set_authorization(&mut self, value: Option<HeaderValue>) {
        self.auth = value;
    }
}

/// The exit state a streamed command's trailers carry; trailers without it
/// mean the stream was cut.
fn state_from_trailers(trailers: &http::HeaderMap) -> Result<ProcessState, Error> {
    let state = trailers
        .get(proto::PROCESS_STATE_TRAILER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Error::BrokeOff("trailers without Process-State".into()))?;
    Ok(ProcessState::from_trailer(state))
}

fn empty() -> ReqBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

fn full(b: Bytes) -> ReqBody {
    http_body_util::Full::new(b)
        .map_err(|never| match never {})
        .boxed()
}

async fn read_all(resp: Response<Reply>) -> Result<Bytes, Error> {
    read_limited(resp, MAX_SMALL_BODY, SMALL_BODY_TIME, false).await
}

/// Bodies of small answers (`/status`, `/workdir`, acknowledgements).
pub const MAX_SMALL_BODY: usize = 64 << 10;
/// Error messages; longer ones are cut.
pub const MAX_ERROR_BODY: usize = 8 << 10;
/// A `/ls` listing (about 100 bytes a file).
pub const MAX_LISTING: usize = 64 << 20;
/// Most bytes a `/tgz` download may have.
pub const MAX_DOWNLOAD: u64 = 16 << 30;
/// Longest silence within a `/tgz` download before the machine is taken for broken.
const FRAME_DEADLINE: Duration = Duration::from_secs(60);
/// How long a buildlet may work on a source tree before answering.
const SOURCE_WORK: Duration = Duration::from_secs(300);
/// Bytes per second the slowest machine link is expected to carry (a poor
/// home uplink): how long an upload of known size may take.
const SLOWEST_LINK: u64 = 64 * 1024;
const SMALL_BODY_TIME: Duration = Duration::from_secs(60);
const LISTING_TIME: Duration = Duration::from_secs(600);

/// Reads a body of at most `limit` bytes within `time`. Past the limit it
/// is a protocol error, or with `truncate` the first `limit` bytes: a
/// hostile machine must not make the coordinator buffer without bound.
async fn read_limited(
    resp: Response<Reply>,
    limit: usize,
    time: Duration,
    truncate: bool,
) -> Result<Bytes, Error> {
    let mut body = resp.into_body();
    let mut buf = bytes::BytesMut::new();
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| Error::BrokeOff(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if buf.len() + data.len() > limit {
                if truncate {
                    buf.extend_from_slice(&data[..limit - buf.len()]);
                    return Ok(());
                }
                return Err(Error::Protocol(format!(
                    "the answer is larger than {limit} bytes"
                )));
            }
            buf.extend_from_slice(&data);
        }
        Ok(())
    };
    match tokio::time::timeout(time, read).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(Error::BrokeOff(format!(
                "the answer did not finish within {time:?}"
            )));
        }
    }
    Ok(buf.freeze())
}
