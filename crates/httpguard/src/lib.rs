//! Bounded HTTP serving, shared by the coordinator and the buildlet.
//!
//! Anyone who can reach a port can open connections and never send a
//! request, send one header byte a minute (slow loris), keep a connection
//! idle forever after one request, or trickle a request body. Each of those
//! pins a task, a socket and a file descriptor; a thousand of them starve a
//! server of descriptors so real machines cannot register. This crate puts
//! a bound on each:
//!
//! * a connection must deliver its first request head within
//!   [`Limits::first_request`] (TLS handshake included), and at most
//!   [`Limits::max_pending`] connections may be waiting for theirs: past
//!   that, the *oldest* waiting one is closed, so a flood of idle
//!   connections cannot lock out a client that sends its request promptly;
//! * a connection with no request in flight is closed after
//!   [`Limits::idle`] (HTTP/1 keep-alive and HTTP/2 alike); a request whose
//!   response is still streaming (a live log) is not idle;
//! * a request body must arrive within [`Limits::request_body`], when set;
//! * at most [`Limits::max_conns`] connections at all;
//! * accept errors (EMFILE) back off instead of spinning, with one log line
//!   per interval rather than one per failure.
//!
//! Connections that are upgraded (the coordinator's `/reverse`) leave the
//! guard's watch when hyper hands the socket over; what happens then is the
//! upgrade's business.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};
use tokio::time::{Instant, Sleep};

/// The bounds one listener enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// From accept to the first complete request head.
    pub first_request: Duration,
    /// With no request in flight, before the connection is closed.
    pub idle: Duration,
    /// Connections still waiting for their first request.
    pub max_pending: usize,
    /// Connections in all.
    pub max_conns: usize,
    /// Time allowed to receive a request body; `None` for servers that take
    /// long uploads (the buildlet's tarballs are bounded by size instead).
    pub request_body: Option<Duration>,
}

impl Limits {
    /// The coordinator's defaults: requests are small and prompt.
    pub const COORDINATOR: Limits = Limits {
        first_request: Duration::from_secs(10),
        idle: Duration::from_secs(90),
        max_pending: 512,
        max_conns: 16_384,
        request_body: Some(Duration::from_secs(60)),
    };
    /// The buildlet's defaults (direct mode): few clients, big uploads.
    pub const BUILDLET: Limits = Limits {
        first_request: Duration::from_secs(10),
        idle: Duration::from_secs(120),
        max_pending: 64,
        max_conns: 1024,
        request_body: None,
    };
}

/// Counts and bounds the connections of one listener.
pub struct Guard {
    limits: Limits,
    live: AtomicUsize,
    next_id: AtomicU64,
    /// Connections waiting for their first request, oldest first; sending
    /// on the channel (or dropping it) closes that connection.
    pending: Mutex<BTreeMap<u64, oneshot::Sender<()>>>,
}

impl Guard {
    pub fn new(limits: Limits) -> Arc<Guard> {
        Arc::new(Guard {
            limits,
            live: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            pending: Mutex::new(BTreeMap::new()),
        })
    }

    /// Accepts the next connection, backing off on errors such as EMFILE.
    pub async fn accept(&self, listener: &TcpListener) -> (TcpStream, std::net::SocketAddr) {
        let mut delay = Duration::from_millis(10);
        loop {
            match listener.accept().await {
                Ok(a) => return a,
                Err(e) => {
                    ACCEPT_ERRORS.note(&e);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Takes a newly accepted connection under watch. `None` means the
    /// server is full of busy connections: drop the stream.
    pub fn admit(self: &Arc<Self>) -> Option<Conn> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().ok()?;
            let full_pending = pending.len() >= self.limits.max_pending;
            let full = self.live.load(Ordering::Relaxed) >= self.limits.max_conns;
            if full_pending || full {
                // Make room by closing the connection that has waited
                // longest (a send closes it; a dropped sender means it
                // made its first request).
                match pending.pop_first() {
                    Some((_, oldest)) => {
                        let _ = oldest.send(());
                    }
                    None if full => return None,
                    None => {}
                }
            }
            pending.insert(id, tx);
        }
        self.live.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState {
            accepted: Instant::now(),
            started: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            last_active: Mutex::new(Instant::now()),
            changed: Notify::new(),
        });
        Some(Conn {
            guard: self.clone(),
            id,
            evicted: Some(rx),
            state,
        })
    }

    fn unpend(&self, id: u64) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&id);
        }
    }
}

/// One log line per 10 s about accept failures, with how many there were.
struct RateLimitedLog {
    last: Mutex<Option<std::time::Instant>>,
    suppressed: AtomicU64,
}

static ACCEPT_ERRORS: RateLimitedLog = RateLimitedLog {
    last: Mutex::new(None),
    suppressed: AtomicU64::new(0),
};

impl RateLimitedLog {
    fn note(&self, e: &std::io::Error) {
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        let now = std::time::Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(10)) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(now);
        let more = self.suppressed.swap(0, Ordering::Relaxed);
        tracing::warn!(
            "accepting connections fails: {e} ({more} more failures since the last report; backing off)"
        );
    }
}

/// The watch over one connection.
pub struct Conn {
    guard: Arc<Guard>,
    id: u64,
    evicted: Option<oneshot::Receiver<()>>,
    state: Arc<ConnState>,
}

struct ConnState {
    accepted: Instant,
    /// A first request has arrived.
    started: AtomicBool,
    inflight: AtomicUsize,
    last_active: Mutex<Instant>,
    changed: Notify,
}

impl ConnState {
    /// When the connection must be closed if nothing changes: the
    /// first-request deadline, or the idle deadline; `None` while a
    /// request is in flight.
    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        if !self.started.load(Ordering::Acquire) {
            return Some(self.accepted + limits.first_request);
        }
        if self.inflight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = self
            .last_active
            .lock()
            .map(|t| *t)
            .unwrap_or_else(|e| *e.into_inner());
        Some(last + limits.idle)
    }

    fn touch(&self) {
        if let Ok(mut t) = self.last_active.lock() {
            *t = Instant::now();
        }
        self.changed.notify_one();
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.guard.unpend(self.id);
        self.guard.live.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Conn {
    /// Runs a step before HTTP starts (a TLS handshake, sniffing the first
    /// byte) under the first-request deadline and eviction; `None` if the
    /// connection must be closed instead.
    pub async fn before<F: Future>(&mut self, fut: F) -> Option<F::Output> {
        let deadline = self.state.accepted + self.guard.limits.first_request;
        let evicted = self.evicted.as_mut()?;
        tokio::select! {
            out = fut => Some(out),
            _ = tokio::time::sleep_until(deadline) => None,
            r = evicted => {
                // Only an eviction sends; no request can have come yet.
                debug_assert!(r.is_ok());
                None
            }
        }
    }

    /// Wraps the connection's service: marks requests in flight, ends the
    /// waiting state at the first request, and bounds request bodies.
    pub fn service<S>(&self, inner: S) -> Tracked<S> {
        Tracked {
            inner,
            state: self.state.clone(),
            guard: self.guard.clone(),
            id: self.id,
            body_deadline: self.guard.limits.request_body,
        }
    }

    /// Drives `conn` (hyper's connection future) until it ends, or until
    /// the connection is evicted, misses its first-request deadline, or
    /// stays idle too long: then it is dropped, which closes the socket.
    pub async fn run<F: Future>(mut self, conn: F) -> Option<F::Output> {
        let mut conn = std::pin::pin!(conn);
        let mut evicted = self.evicted.take();
        let limits = self.guard.limits;
        loop {
            let changed = self.state.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            let deadline = self.state.deadline(&limits);
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let evict = async {
                match &mut evicted {
                    Some(rx) => rx.await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                out = &mut conn => return Some(out),
                _ = changed => {}
                was_evicted = evict => {
                    if was_evicted {
                        tracing::debug!("closing a connection that waited for its first request while others arrived");
                        return None;
                    }
                    // It made its first request: nothing to evict any more.
                    evicted = None;
                }
                _ = sleep => {
                    // Re-checked: a request may have started at the deadline.
                    if self.state.deadline(&limits).is_some_and(|d| d <= Instant::now()) {
                        tracing::debug!("closing a connection that sent no request in time, or stayed idle");
                        return None;
                    }
                }
            }
        }
    }
}

/// A service under a [`Conn`]'s watch (see [`Conn::service`]).
#[derive(Clone)]
pub struct Tracked<S> {
    inner: S,
    state: Arc<ConnState>,
    guard: Arc<Guard>,
    id: u64,
    body_deadline: Option<Duration>,
}

/// Held while a request is in flight, until its response body ends.
struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, ReqB> hyper::service::Service<Request<ReqB>> for Tracked<S>
where
    S: hyper::service::Service<Request<DeadlineBody<ReqB>>, Response = Response<B>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    B: Body + 'static,
    ReqB: Body,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn call(&self, req: Request<ReqB>) -> Self::Future {
        if !self.state.started.swap(true, Ordering::AcqRel) {
            self.guard.unpend(self.id);
        }
        self.state.inflight.fetch_add(1, Ordering::AcqRel);
        self.state.touch();
        let token = InFlight(self.state.clone());
        let close_on_refusal = refusal_closes(&req);
        let control = BodyDeadline::default();
        let mut req = req.map(|b| DeadlineBody::new(b, self.body_deadline, control.clone()));
        req.extensions_mut().insert(control);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            if close_on_refusal && !resp.status().is_success() {
                resp.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            Ok(resp.map(|inner| TrackedBody {
                inner,
                _token: token,
            }))
        })
    }
}

/// Whether a refusal of `req` must close its HTTP/1 connection: the
/// request carries a body the handler may leave unread. hyper then closes
/// the connection after the answer, but notices only after it has written
/// the answer's head without `Connection: close`; a pooling client may send
/// its next request down that connection and get no answer at all. Saying
/// `close` keeps the client from reusing it. (HTTP/2 forbids the header and
/// resets the stream instead.)
fn refusal_closes<B: Body>(req: &Request<B>) -> bool {
    req.version() <= http::Version::HTTP_11 && !req.body().is_end_stream()
}

/// A response body that keeps its request counted as in flight.
pub struct TrackedBody<B> {
    inner: B,
    _token: InFlight,
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body failed to arrive in time.
#[derive(Debug)]
pub struct BodyTimeout(Duration);

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the request body did not arrive within {:?}", self.0)
    }
}

impl std::error::Error for BodyTimeout {}

/// Found in every request's extensions: lets a handler that has
/// authenticated its caller trade the overall body deadline for an idle
/// one ([`BodyDeadline::relax`]), for uploads that may take long but must
/// keep moving (a gomote user's tarball).
#[derive(Clone, Default)]
pub struct BodyDeadline(Arc<AtomicU64>);

impl BodyDeadline {
    /// From now on the body may take as long as it keeps sending: it fails
    /// only after `idle` without a byte.
    pub fn relax(&self, idle: Duration) {
        let ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX).max(1);
        self.0.store(ms, Ordering::Release);
    }

    /// Read on every body frame: an atomic, not a lock.
    fn idle(&self) -> Option<Duration> {
        match self.0.load(Ordering::Acquire) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }
}

/// A request body with an overall deadline (or none), which the handler
/// may relax to an idle deadline.
pub struct DeadlineBody<B> {
    inner: B,
    deadline: Option<(Pin<Box<Sleep>>, Duration)>,
    control: BodyDeadline,
    /// The handler relaxed the deadline and the idle clock runs.
    relaxed: bool,
}

impl<B> DeadlineBody<B> {
    fn new(inner: B, limit: Option<Duration>, control: BodyDeadline) -> Self {
        DeadlineBody {
            inner,
            deadline: limit.map(|d| (Box::pin(tokio::time::sleep(d)), d)),
            control,
            relaxed: false,
        }
    }
}

impl<B> Body for DeadlineBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let idle = this.control.idle();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                // Relaxed: every frame restarts the idle clock.
                if let (Some(idle), Some((sleep, limit))) = (idle, &mut this.deadline) {
                    this.relaxed = true;
                    sleep.as_mut().reset(Instant::now() + idle);
                    *limit = idle;
                }
                return Poll::Ready(r.map(|r| r.map_err(Into::into)));
            }
            Poll::Pending => {}
        }
        if let (Some(idle), Some((sleep, limit))) = (idle, &mut this.deadline)
            && !this.relaxed
        {
            // Just relaxed: the idle clock starts now.
            this.relaxed = true;
            sleep.as_mut().reset(Instant::now() + idle);
            *limit = idle;
        }
        if let Some((sleep, limit)) = &mut this.deadline
            && sleep.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Some(Err(Box::new(BodyTimeout(*limit)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// HTTP/1 settings: a bound on reading a request head.
pub fn http1_builder() -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ);
    b
}

/// HTTP/2 settings: keep-alive pings find dead peers; streams are capped.
pub fn http2_builder() -> hyper::server::conn::http2::Builder<hyper_util::rt::TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    b.timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(256);
    b
}

const HEADER_READ: Duration = Duration::from_secs(30);

/// Both, for connections whose version is told by their first bytes.
pub fn builder() -> hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor> {
    let mut b = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    b.http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ);
    b.http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(256);
    b
}

/// Raises the soft limit on open files to the hard limit: a server that
/// holds thousands of machines needs more than the usual 1024.
pub fn raise_fd_limit() {
    #[cfg(unix)]
    // SAFETY: getrlimit/setrlimit on a valid struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max.min(1 << 20);
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}
