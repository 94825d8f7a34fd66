//! An in-process farm for fast tests of the coordinator's logic: the real
//! `Farm` (lease queue, pool, builds, a real SQLite file in a temp dir)
//! with machines that are the real buildlet handler, each joined to the
//! farm over an in-memory pipe through the same code a `/reverse`
//! registration takes ([`coordinator::reverse::attach`]). No processes, no
//! sockets, no TLS: the scheduler, pool and builds get tests that take
//! milliseconds. The process-level tests stay for everything end to end.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use buildlet::server::{Buildlet, ContainMode};
use coordinator::farm::{Farm, FarmOptions};
use coordinator::reverse::{Accepted, attach};
use hyper_util::rt::TokioIo;

/// A machine's link seen from the middle (see [`InProc::tapped_machine`]).
pub struct Tap {
    /// Drop what the machine sends (it seems to hang).
    pub mute: Arc<std::sync::atomic::AtomicBool>,
    /// Bytes to send to the coordinator as if the machine sent them.
    pub inject: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
}

/// How a [`InProc::recorded_machine`] departs from the real buildlet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Quirk {
    None,
    /// Its `/exec` never hears of `clean=1`, as a buildlet released before
    /// the option.
    PredatesClean,
    /// Its `/exec` says the command runs, then nothing, forever: a machine
    /// that does not keep the command's timeout.
    ExecNeverEnds,
}

pub struct InProc {
    pub farm: Arc<Farm>,
    pub dir: tempfile::TempDir,
    dispatch: tokio::task::JoinHandle<()>,
    outbox: tokio::task::JoinHandle<()>,
}

impl InProc {
    /// A farm with `config` (TOML, paths relative to the temp dir) and its
    /// dispatcher running; no pollers, no machine sources.
    pub async fn start(config: &str) -> InProc {
        InProc::start_with_secrets(config, &[]).await
    }

    /// [`InProc::start`] with these `[secrets]` stored in the data dir
    /// first, as `farmer secret set` stores them.
    pub async fn start_with_secrets(config: &str, secrets: &[(&str, &str)]) -> InProc {
        let dir = tempfile::tempdir().unwrap();
        for (name, value) in secrets {
            coordinator::secrets::store(&dir.path().join("data"), name, value).unwrap();
        }
        std::fs::write(dir.path().join("farm.toml"), config).unwrap();
        let (farm, dispatch, outbox) = InProc::farm_in(dir.path()).await;
        InProc {
            farm,
            dir,
            dispatch,
            outbox,
        }
    }

    /// A farm on the config and data in `dir`, with its loops running.
    async fn farm_in(
        dir: &Path,
    ) -> (
        Arc<Farm>,
        tokio::task::JoinHandle<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let path = dir.join("farm.toml");
        let cfg = coordinator::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let location = match super::store_url(&data) {
            Some(url) => coordinator::store::Location::parse(&url).unwrap(),
            None => coordinator::store::Location::Sqlite(data.join("farmer.db")),
        };
        let store = coordinator::store::Store::connect(&location).await.unwrap();
        let master = coordinator::keys::MasterKey::load_or_create(&data).unwrap();
        let farm = Farm::new(FarmOptions {
            data_dir: data,
            config: cfg,
            store,
            master,
            admin_token: "test-admin-token".into(),
            allow_plaintext: true,
            tls_fingerprint: None,
            tls_spki_pin: None,
            artifacts: None,
        });
        let dispatch = tokio::spawn(farm.clone().dispatch_loop());
        let outbox = tokio::spawn(coordinator::forge::outbox::deliver_loop(farm.clone()));
        (farm, dispatch, outbox)
    }

    /// Stops this farm's loops and starts a new farm on the same data dir
    /// and store, as a coordinator restart would (machines must join again).
    pub async fn restart(&mut self) {
        self.dispatch.abort();
        self.outbox.abort();
        let (farm, dispatch, outbox) = InProc::farm_in(self.dir.path()).await;
        self.farm = farm;
        self.dispatch = dispatch;
        self.outbox = outbox;
    }

    /// A machine of `host_type` called `hostname`: a real buildlet handler
    /// with its own work dir, joined over a pipe. Returns once it is in the
    /// pool.
    pub async fn machine(&self, host_type: &str, hostname: &str) -> Arc<Buildlet> {
        let (coordinator_end, machine_end) = tokio::io::duplex(1 << 20);
        self.join(host_type, hostname, coordinator_end, machine_end)
            .await
    }

    /// [`InProc::machine`] with a [`Tap`] on its link, through which a test
    /// silences the machine or makes it say what it should not.
    pub async fn tapped_machine(&self, host_type: &str, hostname: &str) -> (Arc<Buildlet>, Tap) {
        let (coordinator_end, mut tap_coordinator_side) = tokio::io::duplex(1 << 20);
        let (mut tap_machine_side, machine_end) = tokio::io::duplex(1 << 20);
        let (inject, mut injected) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let tap = Tap {
            mute: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            inject,
        };
        let mute = tap.mute.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut from_machine, mut to_machine) = tokio::io::split(&mut tap_machine_side);
            let (mut from_coord, mut to_coord) = tokio::io::split(&mut tap_coordinator_side);
            let down = tokio::io::copy(&mut from_coord, &mut to_machine);
            let up = async {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    tokio::select! {
                        r = from_machine.read(&mut buf) => {
                            let n = match r { Ok(0) | Err(_) => return, Ok(n) => n };
                            if !mute.load(std::sync::atomic::Ordering::SeqCst)
                                && to_coord.write_all(&buf[..n]).await.is_err()
                            {
                                return;
                            }
                        }
                        Some(bytes) = injected.recv() => {
                            if to_coord.write_all(&bytes).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            };
            tokio::select! {
                _ = down => {}
                _ = up => {}
            }
        });
        let b = self
            .join(host_type, hostname, coordinator_end, machine_end)
            .await;
        (b, tap)
    }

    /// A machine of buildlet protocol 1, as released before links parked:
    /// plain HTTP/2 on its pipe from the start, and `/status` says 1.
    pub async fn protocol_1_machine(&self, host_type: &str, hostname: &str) -> Arc<Buildlet> {
        self.recorded_machine(host_type, hostname, Quirk::None)
            .await
            .0
    }

    /// A machine of protocol 1 whose requests' paths are recorded in order
    /// (`/status` included); each request's body is read whole before it
    /// is served, unless `quirk` says otherwise.
    pub async fn recorded_machine(
        &self,
        host_type: &str,
        hostname: &str,
        quirk: Quirk,
    ) -> (Arc<Buildlet>, Arc<std::sync::Mutex<Vec<String>>>) {
        use http_body_util::BodyExt;
        type Body = http_body_util::combinators::BoxBody<bytes::Bytes, buildlet::client::BoxError>;
        let (coordinator_end, machine_end) = tokio::io::duplex(1 << 20);
        let b = self.buildlet(hostname);
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (me, log) = (b.clone(), seen.clone());
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (me, log) = (me.clone(), log.clone());
                    async move {
                        let (mut parts, body) = req.into_parts();
                        let path = parts.uri.path().to_string();
                        log.lock().unwrap().push(path.clone());
                        if path == "/status" {
                            // Protocol 1: a plain HTTP/2 session, no parking.
                            let mut st = me.status();
                            st.version = 1;
                            let json = serde_json::to_vec(&st).unwrap();
                            let body: Body = http_body_util::Full::new(bytes::Bytes::from(json))
                                .map_err(|e| match e {})
                                .boxed();
                            return Ok(http::Response::new(body));
                        }
                        if quirk == Quirk::ExecNeverEnds && path == "/exec" {
                            use futures_util::StreamExt;
                            let first: Result<_, buildlet::client::BoxError> =
                                Ok(hyper::body::Frame::data(bytes::Bytes::from("running\n")));
                            let endless = futures_util::stream::iter([first])
                                .chain(futures_util::stream::pending());
                            let body: Body =
                                BodyExt::boxed(http_body_util::StreamBody::new(endless));
                            return Ok(http::Response::new(body));
                        }
                        let mut bytes = body.collect().await.unwrap().to_bytes();
                        if quirk == Quirk::PredatesClean && path == "/exec" {
                            let form: Vec<(String, String)> =
                                url::form_urlencoded::parse(&bytes).into_owned().collect();
                            let kept = url::form_urlencoded::Serializer::new(String::new())
                                .extend_pairs(form.iter().filter(|(k, _)| k != "clean"))
                                .finish();
                            bytes = bytes::Bytes::from(kept);
                            parts.headers.remove(http::header::CONTENT_LENGTH);
                        }
                        let req =
                            http::Request::from_parts(parts, http_body_util::Full::new(bytes));
                        let resp = me.handle(req).await;
                        Ok::<_, std::convert::Infallible>(
                            resp.map(|b| b.map_err(Into::into).boxed() as Body),
                        )
                    }
                });
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(TokioIo::new(machine_end), svc)
                .await;
        });
        self.attach(host_type, hostname, coordinator_end).await;
        (b, seen)
    }

    fn buildlet(&self, hostname: &str) -> Arc<Buildlet> {
        let mut cfg =
            buildlet::server::Config::new(self.dir.path().join("machines").join(hostname));
        cfg.hostname = hostname.to_string();
        // The process group is enough here, and leaves the test process's
        // cgroup and reaper settings alone.
        cfg.contain = ContainMode::Group;
        Buildlet::new(cfg).unwrap()
    }

    async fn join(
        &self,
        host_type: &str,
        hostname: &str,
        coordinator_end: tokio::io::DuplexStream,
        machine_end: tokio::io::DuplexStream,
    ) -> Arc<Buildlet> {
        let b = self.buildlet(hostname);
        let me = b.clone();
        tokio::spawn(async move {
            let _ = buildlet::reverse::serve_link(&me, machine_end).await;
        });
        self.attach(host_type, hostname, coordinator_end).await;
        b
    }

    /// Registers the machine at the other end of `coordinator_end` through
    /// [`attach`]; returns once it is in the pool.
    async fn attach(
        &self,
        host_type: &str,
        hostname: &str,
        coordinator_end: tokio::io::DuplexStream,
    ) {
        tokio::spawn(attach(
            self.farm.clone(),
            TokioIo::new(coordinator_end),
            Accepted {
                hostname: hostname.to_string(),
                host_type: host_type.to_string(),
                bot: false,
                build: "in-process".into(),
                peer: ([127, 0, 0, 1], 0).into(),
                binary: Default::default(),
            },
        ));
        self.until("the machine in the pool", Duration::from_secs(10), || {
            self.farm.pool.find(host_type, hostname).is_some()
        })
        .await;
    }

    /// A request through the farm's real routers (API, dashboard, hooks):
    /// the status and the body as text.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (u16, String) {
        use tower::ServiceExt;
        let app = coordinator::forge::hooks::router(self.farm.clone())
            .merge(coordinator::api::router(self.farm.clone()))
            .merge(coordinator::dashboard::router(self.farm.clone()));
        let mut req = axum::http::Request::builder().method(method).uri(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = app
            .oneshot(req.body(axum::body::Body::from(body)).unwrap())
            .await
            .unwrap();
        let code = r.status().as_u16();
        let body = axum::body::to_bytes(r.into_body(), 16 << 20).await.unwrap();
        (code, String::from_utf8_lossy(&body).into_owned())
    }

    /// A page or API answer that must be `200`, as text.
    pub async fn get(&self, path: &str) -> String {
        let (code, body) = self.request("GET", path, &[], Vec::new()).await;
        assert_eq!(code, 200, "{path}: {body}");
        body
    }

    /// Waits (bounded) until `f` holds.
    pub async fn until(&self, what: &str, limit: Duration, f: impl Fn() -> bool) {
        let start = Instant::now();
        while !f() {
            assert!(start.elapsed() < limit, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Triggers a build of `builder` at `commit` and waits (bounded) for
    /// its end.
    pub async fn build(
        &self,
        builder: &str,
        commit: &str,
        kind: coordinator::store::BuildKind,
    ) -> coordinator::store::BuildRow {
        let id = self
            .farm
            .trigger(builder, None, None, commit, kind, "test")
            .await
            .unwrap();
        self.finished(id).await
    }

    /// The stored log of step `n` (0-based, in the order steps ran) of
    /// build `id`, as text.
    pub async fn step_log(&self, id: i64, n: usize) -> String {
        let steps = self.farm.store.steps(id).await.unwrap();
        let step = steps
            .get(n)
            .unwrap_or_else(|| panic!("build {id} has no step {n}: {steps:?}"));
        let log = self.farm.store.step_log(step.id).await.unwrap().unwrap();
        String::from_utf8_lossy(&log).into_owned()
    }

    /// The stored log of build `id`'s first attempt, as text; waits
    /// (bounded) for it, since it is stored just after the build's result.
    pub async fn attempt_log(&self, id: i64) -> String {
        let start = Instant::now();
        loop {
            let logs = self.farm.store.attempt_logs(id).await.unwrap();
            if let Some(l) = logs.into_iter().min_by_key(|(a, _)| *a).map(|(_, l)| l) {
                return String::from_utf8_lossy(&l).into_owned();
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no attempt log for build {id}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits (bounded) until build `id` has a final status; returns it.
    pub async fn finished(&self, id: i64) -> coordinator::store::BuildRow {
        self.finished_within(id, Duration::from_secs(30)).await
    }

    /// [`InProc::finished`] with its own bound (a build that compiles).
    pub async fn finished_within(&self, id: i64, limit: Duration) -> coordinator::store::BuildRow {
        let start = Instant::now();
        loop {
            let b = self.farm.store.build(id).await.unwrap().unwrap();
            if b.status.is_terminal() {
                return b;
            }
            assert!(start.elapsed() < limit, "build {id} did not finish: {b:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        self.dispatch.abort();
        self.outbox.abort();
    }
}

/// The runtime the in-process tests run on: two workers, as CI has cores.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A config for the in-process farm: one repo at `repo`, host types
/// `host-a` (trusted), and builders given as TOML.
pub fn config(repo: &Path, builders: &str) -> String {
    format!(
        r#"[farm]
heartbeat = "1s"
heartbeat_timeout = "30s"

[repos.r]
url = "{}"
branches = ["main"]

[hosts.host-a]
pool = "reverse"
trusted = true

{builders}
"#,
        repo.display()
    )
}
