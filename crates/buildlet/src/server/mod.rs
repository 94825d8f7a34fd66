//! The buildlet's HTTP API.
//!
//! [`Buildlet`] owns the work dir and answers the endpoints described in
//! `ARCHITECTURE.md`. It is transport-agnostic: [`Buildlet::handle`] serves one
//! request, whether it arrived on a direct listener ([`Buildlet::serve`]) or, in
//! reverse mode, over the connection the buildlet dialled to the coordinator.

// Handlers return early with a ready error response; boxing it buys nothing.
#![allow(clippy::result_large_err)]

mod body;
mod contain;
mod exec;
mod files;
mod shell;
mod spawn;
mod src;

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Body as HttpBody;
use hyper_util::rt::TokioIo;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use body::ResponseBody;
pub use contain::{ContainMode, SCOPE_ENV};
pub use spawn::SpawnMode;

use crate::proto;

/// How long a halted buildlet lets its connections finish their replies.
pub const HALT_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// How a buildlet is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// The work dir; created and emptied by [`Buildlet::new`].
    pub workdir: PathBuf,
    /// HTTP Basic password for direct mode; `None` disables the check (reverse
    /// mode, where the connection itself is authenticated).
    pub password: Option<String>,
    /// Largest request body accepted by `/writetgz` and `/write`.
    pub max_body: u64,
    /// Most bytes one tarball may expand to (`-max-expanded`).
    pub max_expanded: u64,
    /// Most entries one tarball may hold (`-max-entries`).
    pub max_entries: u64,
    /// Reboot the machine after `/halt` instead of just exiting.
    pub reboot: bool,
    /// How commands' processes are kept together so they die together.
    pub contain: ContainMode,
    /// How commands are started (`-spawn`).
    pub spawn: SpawnMode,
    /// Reported in `/status`.
    pub hostname: String,
    /// Bot mode: the machine token file, served at `/machine-token` so the
    /// coordinator can re-check a connected bot's credentials.
    pub token_file: Option<PathBuf>,
    /// Where the last source tree received is kept (`/writesrc`); emptied
    /// at start like the work dir. Default: `WORKDIR.srccache` beside it.
    pub src_cache: Option<PathBuf>,
}

impl Config {
    pub fn new(workdir: impl Into<PathBuf>) -> Config {
        Config {
            workdir: workdir.into(),
            password: None,
            max_body: proto::DEFAULT_MAX_BODY,
            max_expanded: proto::DEFAULT_MAX_EXPANDED,
            max_entries: proto::DEFAULT_MAX_ENTRIES,
            reboot: false,
            contain: ContainMode::Auto,
            spawn: SpawnMode::Auto,
            hostname: default_hostname(),
            token_file: None,
            src_cache: None,
        }
    }
}

/// The machine's host name, or `buildlet` when it cannot be read.
pub fn default_hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .or_else(|| {
            std::process::Command::new("hostname")
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "buildlet".into())
}

/// Why a buildlet could not start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("work dir {path}: {err}")]
    Workdir { path: PathBuf, err: io::Error },
    #[error(
        "refusing to use {0} as the work dir: it is emptied at start, and this is the file system root, your home directory or one of its parents"
    )]
    DangerousWorkdir(PathBuf),
}

/// A running buildlet: its work dir and the state shared by all requests.
pub struct Buildlet {
    cfg: Config,
    /// Canonical absolute work dir.
    root: PathBuf,
    /// Its device and inode, to notice it being replaced ([`Buildlet::open_root`]).
    root_id: (u64, u64),
    started: Instant,
    halt_tx: watch::Sender<bool>,
    /// Keeps every process of a command together, to kill them together.
    contain: Arc<contain::Containment>,
    /// The source cache's state (its files are under `cfg.src_cache`).
    src_cache: Arc<std::sync::Mutex<crate::srccache::SrcCache>>,
    /// When work last arrived (ms after `started`), for [`release_when_idle`].
    last_work: std::sync::atomic::AtomicU64,
    /// Whether memory was given back since that work.
    released: std::sync::atomic::AtomicBool,
}

/// How long a buildlet goes without work (requests other than status and
/// health checks) before it gives back memory it is not using.
pub const IDLE_RELEASE: Duration = Duration::from_secs(5);

impl Buildlet {
    /// Creates the work dir if needed, empties it, and creates `tmp/` in it.
    pub fn new(cfg: Config) -> Result<Arc<Buildlet>, SetupError> {
        let wd = &cfg.workdir;
        let werr = |err| SetupError::Workdir {
            path: wd.clone(),
            err,
        };
        std::fs::create_dir_all(wd).map_err(werr)?;
        let root = wd.canonicalize().map_err(werr)?;
        if is_dangerous(&root) {
            return Err(SetupError::DangerousWorkdir(root));
        }
        // Before emptying: a leftover process could be writing there.
        let contain = Arc::new(contain::Containment::setup(cfg.contain, cfg.spawn, &root));
        let root_dir = crate::beneath::Root::open(&root).map_err(werr)?;
        root_dir.as_dir().empty().map_err(werr)?;
        root_dir.as_dir().mkdir("tmp").map_err(werr)?;
        let mut cfg = cfg;
        if cfg.src_cache.is_none() {
            let mut name = root.as_os_str().to_owned();
            name.push(".srccache");
            cfg.src_cache = Some(PathBuf::from(name));
        }
        if let Some(cache) = &cfg.src_cache {
            // Emptied with the work dir: what it held may be from anyone.
            let cerr = |err| SetupError::Workdir {
                path: cache.clone(),
                err,
            };
            std::fs::create_dir_all(cache).map_err(cerr)?;
            let c = crate::beneath::Root::open(cache).map_err(cerr)?;
            c.as_dir().empty().map_err(cerr)?;
        }
        let (halt_tx, _) = watch::channel(false);
        Ok(Arc::new(Buildlet {
            src_cache: Default::default(),
            cfg,
            root,
            root_id: root_dir.id(),
            started: Instant::now(),
            halt_tx,
            contain,
            last_work: Default::default(),
            released: Default::default(),
        }))
    }

    /// A handle on the work dir for one request's file operations. Opened
    /// anew each time, so a work dir a step removed and recreated is
    /// refused (500) rather than written into blindly.
    pub(crate) fn open_root(&self) -> Result<crate::beneath::Root, Response<ResponseBody>> {
        self.reopen_root().map_err(|e| {
            io_error(
                format_args!("opening the work dir {}", self.root.display()),
                &e,
            )
        })
    }

    /// The work dir by handle, checked to be the one the buildlet started
    /// with.
    fn reopen_root(&self) -> io::Result<crate::beneath::Root> {
        crate::beneath::Root::reopen(&self.root, self.root_id)
    }

    /// The canonical work dir.
    pub fn workdir(&self) -> &Path {
        &self.root
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Resolves when `/halt` was called.
    pub async fn halted(&self) {
        let mut rx = self.halt_tx.subscribe();
        let _ = rx.wait_for(|h| *h).await;
    }

    /// Asks the buildlet to stop: running commands are killed and
    /// [`Buildlet::halted`] resolves.
    pub fn halt(&self) {
        self.kill_all();
        let _ = self.halt_tx.send(true);
    }

    pub fn status(&self) -> proto::Status {
        proto::Status {
            version: proto::VERSION,
            build: env!("CARGO_PKG_VERSION").to_string(),
            os: std::env::consts::OS.to_string(),
            arch: std::env::consts::ARCH.to_string(),
            hostname: self.cfg.hostname.clone(),
            workdir: self.root.display().to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            // Never waits on a source being written (that holds the lock):
            // then it is not known yet.
            src_tree: self
                .src_cache
                .try_lock()
                .ok()
                .and_then(|c| c.tree().map(str::to_string)),
        }
    }

    /// Serves the API on `listener` until `/halt` is called. Connections
    /// are bounded by [`httpguard`]: a first request within 10 s, idle ones
    /// closed, the oldest of too many waiting ones dropped, accept errors
    /// backed off, so idle or slow-loris connections cannot lock the
    /// coordinator (or you) out.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> io::Result<()> {
        httpguard::raise_fd_limit();
        let guard = httpguard::Guard::new(httpguard::Limits::BUILDLET);
        let mut halted = std::pin::pin!(self.clone().halted_owned());
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let (stream, peer) = tokio::select! {
                accepted = guard.accept(&listener) => accepted,
                _ = &mut halted => break,
            };
            while conns.try_join_next().is_some() {}
            let Some(conn) = guard.admit() else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let me = self.clone();
            conns.spawn(async move { me.serve_conn(stream, peer, conn).await });
        }
        // Halted: no new connection is taken; connections finish what they
        // were answering (the `/halt` reply among them) and close; bounded,
        // then the rest are dropped.
        drop(listener);
        let _ = tokio::time::timeout(HALT_GRACE, async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        Ok(())
    }

    async fn halted_owned(self: Arc<Self>) {
        self.halted().await
    }

    async fn serve_conn(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        conn: httpguard::Conn,
    ) {
        let halted = self.clone().halted_owned();
        let svc = hyper::service::service_fn(move |req| {
            let me = self.clone();
            async move { Ok::<_, std::convert::Infallible>(me.handle(req).await) }
        });
        let svc = conn.service(svc);
        let builder = httpguard::builder();
        let served = builder.serve_connection(TokioIo::new(stream), svc);
        let graceful = async move {
            let mut served = std::pin::pin!(served);
            tokio::select! {
                r = served.as_mut() => r,
                _ = halted => {
                    served.as_mut().graceful_shutdown();
                    served.await
                }
            }
        };
        match conn.run(graceful).await {
            Some(Err(e)) => tracing::debug!(%peer, "connection ended: {e}"),
            Some(Ok(())) => {}
            None => tracing::debug!(%peer, "connection closed by the guard"),
        }
    }

    /// Serves one request of the buildlet API.
    pub async fn handle<B>(self: Arc<Self>, req: Request<B>) -> Response<ResponseBody>
    where
        B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        if path == "/healthz" {
            return text(StatusCode::OK, "ok\n");
        }
        if path == "/" {
            return text(
                StatusCode::OK,
                format!(
                    "buildlet running on {}-{}\n",
                    std::env::consts::OS,
                    std::env::consts::ARCH
                ),
            );
        }
        if let Some(resp) = self.check_auth(&req) {
            return resp;
        }
        if path != "/status" {
            self.worked();
        }
        let resp = match (method.clone(), path.as_str()) {
            (Method::GET, "/status") => json(&self.status()),
            (Method::GET, "/machine-token") => match &self.cfg.token_file {
                Some(f) => match crate::reverse::read_token(f) {
                    Ok(t) => text(StatusCode::OK, t),
                    Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
                },
                None => text(
                    StatusCode::NOT_FOUND,
                    "this buildlet uses no machine token\n",
                ),
            },
            (Method::GET, "/workdir") => text(StatusCode::OK, format!("{}\n", self.root.display())),
            (Method::PUT, "/writetgz") => files::write_tgz_body(&self, req).await,
            (Method::POST, "/writetgz") => files::write_tgz_url(&self, req).await,
            (Method::PUT, "/write") => files::write_file(&self, req).await,
            (Method::PUT, "/writesrc") => src::write_src(&self, req).await,
            (Method::GET, "/tgz") => files::get_tgz(&self, req).await,
            (Method::GET, "/ls") => files::ls(&self, req).await,
            (Method::POST, "/removeall") => files::remove_all(&self, req).await,
            (Method::POST, "/exec") => exec::exec(self.clone(), req).await,
            (Method::POST, proto::SHELL_PATH) => shell::shell(self.clone(), req).await,
            // The connections shut down gracefully, so this reply is
            // delivered before the buildlet stops.
            (Method::POST, "/halt") => {
                self.halt();
                text(StatusCode::OK, "halting\n")
            }
            (
                _,
                "/status" | "/workdir" | "/writetgz" | "/write" | "/writesrc" | "/tgz" | "/ls"
                | "/removeall" | "/exec" | "/shell" | "/halt",
            ) => text(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method {method} not allowed on {path}\n"),
            ),
            _ => text(StatusCode::NOT_FOUND, format!("no such endpoint: {path}\n")),
        };
        if !resp.status().is_success() {
            tracing::info!(%method, %path, status = %resp.status(), "request refused");
        }
        resp
    }

    fn check_auth<B>(&self, req: &Request<B>) -> Option<Response<ResponseBody>> {
        let want = self.cfg.password.as_deref()?;
        let got = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(b.trim())
                    .ok()
            })
            .and_then(|raw| {
                let s = String::from_utf8(raw).ok()?;
                s.split_once(':').map(|(_, p)| p.to_string())
            });
        let ok = got.is_some_and(|p| bool::from(p.as_bytes().ct_eq(want.as_bytes())));
        if ok {
            return None;
        }
        let mut resp = text(
            StatusCode::UNAUTHORIZED,
            "wrong or missing password (HTTP Basic auth, any user name)\n",
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Basic realm=\"buildlet\""),
        );
        Some(resp)
    }

    /// Kills every process of every running command; returns how many
    /// commands were running. Reverse mode calls it when the link to the
    /// coordinator drops: by then the coordinator has given those builds up.
    pub fn kill_all(&self) -> usize {
        self.contain.kill_all()
    }

    /// Kills what is still running and removes this buildlet's cgroups;
    /// for a clean exit (a `SIGKILL`ed buildlet is cleaned up by the next
    /// one on the same work dir instead).
    pub fn shutdown(&self) {
        self.contain.shutdown();
    }

    /// How commands are contained here: `cgroup`, `reaper` or `group`.
    pub fn containment(&self) -> &'static str {
        self.contain.mode_name()
    }
}

fn is_dangerous(root: &Path) -> bool {
    if root.parent().is_none() {
        return true;
    }
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let cwd = std::env::current_dir().ok();
    [home, cwd]
        .into_iter()
        .flatten()
        .filter_map(|p| p.canonicalize().ok())
        .any(|p| p.starts_with(root))
}

/// Returns freed heap memory to the OS after a large transfer, so an idle
/// buildlet stays small (glibc keeps freed arenas otherwise).
pub fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the OS; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Empties the source cache `dir` and forgets what it held.
fn clear_src_cache(
    cache: &std::sync::Mutex<crate::srccache::SrcCache>,
    dir: Option<&Path>,
) -> io::Result<()> {
    let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
    c.clear();
    match dir {
        Some(dir) => crate::beneath::Root::open(dir)?.as_dir().empty(),
        None => Ok(()),
    }
}

impl Buildlet {
    fn worked(&self) {
        use std::sync::atomic::Ordering;
        let now = self.started.elapsed().as_millis() as u64;
        self.last_work.store(now, Ordering::Relaxed);
        self.released.store(false, Ordering::Relaxed);
    }
}

/// Runs until the buildlet halts: once it has had no work for
/// [`IDLE_RELEASE`] (no request but status checks, no command running),
/// gives free heap and its code pages back to the OS, once per idle
/// spell. An idle agent on a volunteer's machine then holds about 4 MB
/// instead of 8; the first request after pays a few page faults.
pub async fn release_when_idle(b: Arc<Buildlet>) {
    use std::sync::atomic::Ordering;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = b.halted() => return,
        }
        if b.contain.running() > 0 {
            b.worked();
            continue;
        }
        let now = b.started.elapsed().as_millis() as u64;
        let idle = now.saturating_sub(b.last_work.load(Ordering::Relaxed));
        if Duration::from_millis(idle) >= IDLE_RELEASE && !b.released.swap(true, Ordering::Relaxed)
        {
            let _ = tokio::task::spawn_blocking(|| {
                release_memory();
                release_code();
            })
            .await;
        }
    }
}

/// Lets the kernel take back the pages of code (this program's and its
/// libraries', the mappings that are readable and executable and not
/// writable) that this process alone maps: an idle buildlet needs only
/// the little code that answers pings and status checks, and faults the
/// rest back in from the file when it works again. Code was 5 of the 8 MB
/// an idle reverse buildlet held; its heap and stacks, under 1 MB. Data
/// mappings are left alone (relocated pages would go to swap).
fn release_code() {
    #[cfg(target_os = "linux")]
    {
        let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
            return;
        };
        for line in maps.lines() {
            let mut f = line.split_ascii_whitespace();
            let (Some(range), Some(perms)) = (f.next(), f.next()) else {
                continue;
            };
            let path = f.nth(3).unwrap_or("");
            if !path.starts_with('/') || !perms.starts_with("r-xp") {
                continue;
            }
            let Some((a, b)) = range.split_once('-') else {
                continue;
            };
            let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
            else {
                continue;
            };
            // SAFETY: MADV_PAGEOUT on a mapping of ours only drops its
            // clean, unshared pages; they are read back on the next access.
            // Kernels before 5.4 answer EINVAL, which changes nothing.
            unsafe {
                libc::madvise(
                    a as *mut libc::c_void,
                    b.saturating_sub(a),
                    libc::MADV_PAGEOUT,
                );
            }
        }
    }
}

/// The answer to a failed file operation: 400 when the request asked for
/// something no machine can do (see [`crate::fault`]), 507 for a full disk,
/// 500 otherwise. `what` says what was being done.
pub(crate) fn io_error(what: impl std::fmt::Display, err: &io::Error) -> Response<ResponseBody> {
    use crate::fault::IoFault;
    match crate::fault::classify(err) {
        IoFault::Request(why) => text(StatusCode::BAD_REQUEST, format!("{what}: {why} ({err})\n")),
        IoFault::DiskFull => text(StatusCode::INSUFFICIENT_STORAGE, format!("{what}: {err}\n")),
        IoFault::Machine => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{what}: {err}\n"),
        ),
    }
}

pub(crate) fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

pub(crate) fn json<T: serde::Serialize>(v: &T) -> Response<ResponseBody> {
    match serde_json::to_vec(v) {
        Ok(b) => {
            let mut resp = Response::new(ResponseBody::full(Bytes::from(b)));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding JSON: {e}\n"),
        ),
    }
}

/// Parses query parameters, keeping repeated keys.
pub(crate) fn query_pairs<B>(req: &Request<B>) -> Vec<(String, String)> {
    req.uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// Simple accessors over a list of form pairs.
pub(crate) struct Form(pub Vec<(String, String)>);

impl Form {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("1" | "true" | "yes" | "on"))
    }
}

/// Largest form body accepted by `/exec` and `/removeall`.
const MAX_FORM: usize = 4 << 20;

/// How long a form body may take to arrive.
const FORM_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// Reads the query string and, for urlencoded bodies, the form body.
pub(crate) async fn read_form<B>(req: Request<B>) -> Result<Form, Response<ResponseBody>>
where
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    let mut pairs = query_pairs(&req);
    let body = http_body_util::Limited::new(req.into_body(), MAX_FORM);
    // A form is at most a few KiB: one trickled byte by byte must not hold
    // the connection (tarball bodies have their own rules).
    let collected = match tokio::time::timeout(FORM_DEADLINE, body.collect()).await {
        Ok(c) => c,
        Err(_) => {
            return Err(text(
                StatusCode::REQUEST_TIMEOUT,
                format!("form body not received within {FORM_DEADLINE:?}\n"),
            ));
        }
    };
    let bytes = match collected {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return Err(text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("form body larger than {MAX_FORM} bytes\n"),
                ));
            }
            return Err(text(
                StatusCode::BAD_REQUEST,
                format!("reading form body: {e}\n"),
            ));
        }
    };
    pairs.extend(form_urlencoded::parse(&bytes).into_owned());
    Ok(Form(pairs))
}
