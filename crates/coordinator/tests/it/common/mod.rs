//! Real coordinator and buildlet processes on loopback, and real git
//! repositories, for the coordinator's integration tests.
#![allow(dead_code)]

pub mod gitserver;
pub mod inproc;
pub mod recorder;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const FARMER: &str = env!("CARGO_BIN_EXE_farmer");

/// A git repository made with the git CLI, for tests.
pub struct TestRepo {
    pub path: PathBuf,
    n: u32,
}

impl TestRepo {
    pub fn new(path: &Path) -> TestRepo {
        std::fs::create_dir_all(path).unwrap();
        git(path, &["init", "-q", "-b", "main"]);
        TestRepo {
            path: path.to_path_buf(),
            n: 0,
        }
    }

    /// Writes files and commits them; returns the commit hash.
    pub fn commit(&mut self, msg: &str, files: &[(&str, &str)]) -> String {
        for (p, c) in files {
            let full = self.path.join(p);
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            std::fs::write(&full, c).unwrap();
        }
        self.n += 1;
        git(&self.path, &["add", "-A"]);
        let date = format!("{} +0000", 1_700_000_000 + self.n as i64 * 60);
        let out = Command::new("git")
            .current_dir(&self.path)
            .args([
                "-c",
                "user.name=Test Author",
                "-c",
                "user.email=test@example.com",
                "commit",
                "-q",
                "-m",
                msg,
            ])
            .env("GIT_AUTHOR_DATE", &date)
            .env("GIT_COMMITTER_DATE", &date)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git commit: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        git(&self.path, &["rev-parse", "HEAD"]).trim().to_string()
    }
}

pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Collects a child's output lines in the background.
#[derive(Clone, Default)]
pub struct Lines(pub Arc<Mutex<Vec<String>>>);

impl Lines {
    /// Collects the lines of `r` (a child's stdout or stderr) in the background.
    pub fn follow<R: std::io::Read + Send + 'static>(r: R) -> Lines {
        let lines = Lines::default();
        collect(r, lines.clone(), None);
        lines
    }

    /// Collects the lines of `r` as well (a child's other stream).
    pub fn also<R: std::io::Read + Send + 'static>(&self, r: R) {
        collect(r, self.clone(), None);
    }

    /// Like [`Lines::follow`], and sends the `listening on ADDR` line's
    /// address when it comes (what `farmer serve` and `farmer up` print).
    pub fn follow_announcing<R: std::io::Read + Send + 'static>(
        r: R,
    ) -> (Lines, std::sync::mpsc::Receiver<String>) {
        let lines = Lines::default();
        let (tx, rx) = std::sync::mpsc::channel();
        collect(r, lines.clone(), Some(tx));
        (lines, rx)
    }

    pub fn all(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }
    pub fn wait_for(&self, needle: &str, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.all().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

fn collect<R: std::io::Read + Send + 'static>(
    r: R,
    lines: Lines,
    first: Option<std::sync::mpsc::Sender<String>>,
) {
    std::thread::spawn(move || {
        let mut first = first;
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if let Some(tx) = &first
                && line.starts_with("listening on ")
            {
                let _ = tx.send(line.clone());
                first = None;
            }
            lines.0.lock().unwrap().push(line);
        }
    });
}

/// The PostgreSQL server the farms of this run use, if any:
/// `FARMER_TEST_STORE=postgres` runs every farm these tests start on
/// PostgreSQL (`FARMER_TEST_POSTGRES` names the server; scripts/test starts
/// one and sets both); unset or `sqlite`, farms keep SQLite in their data dir.
pub fn postgres_server() -> Option<String> {
    match std::env::var("FARMER_TEST_STORE").as_deref() {
        Ok("postgres") => Some(std::env::var("FARMER_TEST_POSTGRES").expect(
            "FARMER_TEST_STORE=postgres needs FARMER_TEST_POSTGRES=postgres://USER@HOST:PORT/DB (scripts/test sets both)",
        )),
        Ok("sqlite") | Ok("") | Err(_) => None,
        Ok(other) => panic!("FARMER_TEST_STORE={other:?}: use sqlite or postgres"),
    }
}

/// The store URL of the farm whose data dir is `data_dir`, on PostgreSQL
/// runs: a database of its own per data dir, created on first use, so a
/// restarted coordinator finds its state again. `None` on SQLite runs.
pub fn store_url(data_dir: &Path) -> Option<String> {
    use std::hash::{Hash, Hasher};
    let server = postgres_server()?;
    let mut h = std::hash::DefaultHasher::new();
    std::path::absolute(data_dir).unwrap().hash(&mut h);
    let name = format!("farm_{:016x}", h.finish());
    let out = Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", &server, "-c"])
        .arg(format!("CREATE DATABASE {name}"))
        .output()
        .expect("psql (scripts/test installs PostgreSQL)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || err.contains("already exists"),
        "creating database {name}: {err}"
    );
    let mut url = server.clone();
    let at = url
        .rfind('/')
        .expect("FARMER_TEST_POSTGRES ends with /DATABASE");
    url.truncate(at + 1);
    url.push_str(&name);
    Some(url)
}

/// Runs `sql` on the PostgreSQL database at `url`.
pub fn store_sql_url(url: &str, sql: &str) {
    let out = Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", url, "-c", sql])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `sql` on the store of the farm whose data dir is `data_dir`,
/// whichever engine holds it (to break or inspect a farm under test).
pub fn store_sql(data_dir: &Path, sql: &str) {
    if let Some(url) = store_url(data_dir) {
        return store_sql_url(&url, sql);
    }
    let out = Command::new("python3")
            .arg("-c")
            .arg("import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.executescript(sys.argv[2]); c.commit()")
            .arg(data_dir.join("farmer.db"))
            .arg(sql)
            .output()
            .unwrap();
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `farmer serve` process.
pub struct Coordinator {
    pub child: Child,
    pub addr: String,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub out: Lines,
    pub err: Lines,
    /// The `-tls-pin` the banner's commands use (the key pin, `spki-sha256:HEX`).
    pub fingerprint: String,
    /// The certificate's SHA-256 (plain hex), the banner's "TLS cert pin".
    pub cert_pin: String,
    pub token: String,
}

impl Coordinator {
    pub fn start(data_dir: &Path, config: &Path) -> Coordinator {
        Coordinator::start_on(data_dir, config, "127.0.0.1:0")
    }

    pub fn start_on(data_dir: &Path, config: &Path, listen: &str) -> Coordinator {
        Coordinator::start_full(data_dir, config, listen, &[], &[])
    }

    /// `farmer serve` with extra flags.
    pub fn start_args(data_dir: &Path, config: &Path, extra: &[&str]) -> Coordinator {
        Coordinator::start_full(data_dir, config, "127.0.0.1:0", extra, &[])
    }

    /// `farmer serve` with extra flags and environment variables.
    pub fn start_env(
        data_dir: &Path,
        config: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Coordinator {
        Coordinator::start_full(data_dir, config, "127.0.0.1:0", extra, env)
    }

    fn start_full(
        data_dir: &Path,
        config: &Path,
        listen: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Coordinator {
        let mut cmd = Command::new(FARMER);
        cmd.envs(env.iter().copied());
        if let Some(url) = store_url(data_dir) {
            // An explicit --database-url in `extra` wins over this.
            cmd.env("FARMER_DATABASE_URL", url);
        }
        let mut child = cmd
            .args(["serve", "--config"])
            .arg(config)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", listen])
            .args(extra)
            .env("FARMER_LOG", "info,sqlx=warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = Lines::default();
        let err = Lines::default();
        let (tx, rx) = std::sync::mpsc::channel();
        collect(child.stdout.take().unwrap(), out.clone(), Some(tx));
        collect(child.stderr.take().unwrap(), err.clone(), None);
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("coordinator did not start; stderr:\n{}", err.all());
            }
        };
        let addr = line.trim_start_matches("listening on ").trim().to_string();
        assert!(out.wait_for("-tls-pin=", Duration::from_secs(10)));
        let fingerprint = out
            .all()
            .split("-tls-pin=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        let cert_pin = out
            .all()
            .split("TLS cert pin")
            .nth(1)
            .expect("the banner prints the certificate pin")
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        let token = std::fs::read_to_string(data_dir.join("admin.token"))
            .unwrap()
            .trim()
            .to_string();
        Coordinator {
            child,
            addr,
            data_dir: data_dir.to_path_buf(),
            config: config.to_path_buf(),
            out,
            err,
            fingerprint,
            cert_pin,
            token,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn key(&self, host_type: &str) -> String {
        let out = Command::new(FARMER)
            .args(["genbuilderkey", host_type, "--data-dir"])
            .arg(&self.data_dir)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    pub fn get(&self, path: &str) -> serde_json::Value {
        let body = http_get(&self.url(path));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    pub fn get_text(&self, path: &str) -> String {
        http_get(&self.url(path))
    }

    pub fn post(&self, path: &str, body: &str, token: Option<&str>) -> (u16, serde_json::Value) {
        http_post(&self.url(path), body, token)
    }

    /// Polls `f` on `/api/...` JSON until it returns Some, bounded.
    pub fn wait<T>(
        &self,
        what: &str,
        limit: Duration,
        mut f: impl FnMut(&Coordinator) -> Option<T>,
    ) -> T {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(v) = f(self) {
                return v;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "timed out waiting for {what}; coordinator stderr:\n{}",
            self.err.all()
        );
    }

    pub fn connected(&self) -> Vec<String> {
        self.get("/api/machines")["connected"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["hostname"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn wait_connected(&self, n: usize) {
        self.wait(&format!("{n} machines"), Duration::from_secs(30), |c| {
            (c.connected().len() >= n).then_some(())
        });
    }

    /// Waits until every build has a final status; returns them.
    pub fn wait_builds_done(&self, n: usize, limit: Duration) -> Vec<serde_json::Value> {
        self.wait(&format!("{n} finished builds"), limit, |c| {
            let b = c.get("/api/builds?limit=1000");
            let v = b.as_array().unwrap().clone();
            let done = v
                .iter()
                .filter(|b| !matches!(b["status"].as_str(), Some("queued" | "running")))
                .count();
            (v.len() >= n && done == v.len()).then_some(v)
        })
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `farmer buildlet` in reverse mode.
pub struct Bot {
    pub child: Child,
    pub log: Lines,
    pub workdir: PathBuf,
}

impl Bot {
    pub fn start(
        c: &Coordinator,
        dir: &Path,
        host_type: &str,
        hostname: &str,
        key: Option<&str>,
    ) -> Bot {
        Bot::start_args(c, dir, host_type, hostname, key, &[])
    }

    pub fn start_args(
        c: &Coordinator,
        dir: &Path,
        host_type: &str,
        hostname: &str,
        key: Option<&str>,
        extra: &[&str],
    ) -> Bot {
        Bot::start_pinned(c, dir, host_type, hostname, key, &c.fingerprint, extra)
    }

    /// A bot that trusts the coordinator by `pin` instead of the banner's pin.
    pub fn start_pinned(
        c: &Coordinator,
        dir: &Path,
        host_type: &str,
        hostname: &str,
        key: Option<&str>,
        pin: &str,
        extra: &[&str],
    ) -> Bot {
        Bot::start_to(&c.addr, dir, host_type, hostname, key, pin, extra)
    }

    /// A bot dialling `coordinators` (`-coordinator=`: one address, or
    /// several comma-separated) and trusting `pin`.
    pub fn start_to(
        coordinators: &str,
        dir: &Path,
        host_type: &str,
        hostname: &str,
        key: Option<&str>,
        pin: &str,
        extra: &[&str],
    ) -> Bot {
        std::fs::create_dir_all(dir).unwrap();
        let workdir = dir.join(format!("wd-{hostname}"));
        let mut cmd = Command::new(FARMER);
        cmd.arg("buildlet")
            .arg(format!("-coordinator={coordinators}"))
            .arg(format!("-reverse-type={host_type}"))
            .arg(format!("-hostname={hostname}"))
            .arg(format!("-workdir={}", workdir.display()))
            .arg(format!("-tls-pin={pin}"))
            .arg("-reboot=false")
            .args(extra)
            .env("HOME", dir)
            .env_remove("GO_BUILD_KEY_PATH")
            .env("BUILDLET_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(k) = key {
            let kf = dir.join(format!("key-{hostname}"));
            std::fs::write(&kf, k).unwrap();
            cmd.arg(format!("-key-file={}", kf.display()));
        }
        let mut child = cmd.spawn().unwrap();
        let log = Lines::default();
        collect(child.stdout.take().unwrap(), log.clone(), None);
        collect(child.stderr.take().unwrap(), log.clone(), None);
        Bot {
            child,
            log,
            workdir,
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Bot {
    fn drop(&mut self) {
        self.kill();
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A child process killed (and reaped) when dropped, so a failing test
/// leaves nothing running. Derefs to the [`Child`].
pub struct Reaped(pub Child);

impl std::ops::Deref for Reaped {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A parent process (`farmer up`, `farmer serve`, stage0, bootstrapswarm)
/// started in its own process group (`process_group(0)`), stopped when
/// dropped: SIGTERM so it stops its own children cleanly, at most 10 s,
/// then SIGKILL to the whole group, so a failing test leaves no buildlet
/// behind. Derefs to the [`Child`].
pub struct Stopped(pub Child);

impl std::ops::Deref for Stopped {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Stopped {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let pid = self.0.id() as i32;
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: kill(2) on a child this test started.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = self.0.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // SAFETY: the group this test's child leads (ESRCH when it is gone).
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether a process runs (a zombie counts as dead).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// Runs the openssl CLI with `stdin`; its stdout, asserting it succeeded.
/// The certificate tests check farmer's output with it, not with farmer.
pub fn openssl(args: &[&str], stdin: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("these tests need the openssl CLI (scripts/test installs it)");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// What an HTTP exchange returned: status, headers (lowercase names), body.
pub struct Answer {
    pub status: u16,
    pub headers: std::collections::HashMap<String, String>,
    pub body: String,
}

/// One HTTP/1.1 request over loopback, bounded in time: the one client of
/// the integration tests (GET and POST helpers below wrap it).
pub fn http(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    rt().block_on(async {
        use http_body_util::BodyExt;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<bytes::Bytes>>();
        let mut req = http::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
            .await
            .unwrap_or_else(|_| panic!("{method} {url} timed out"))
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let body = tokio::time::timeout(Duration::from_secs(60), resp.into_body().collect())
            .await
            .unwrap_or_else(|_| panic!("{method} {url}: the body timed out"))
            .unwrap()
            .to_bytes();
        Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    })
}

pub fn http_get(url: &str) -> String {
    http("GET", url, &[], "").body
}

/// A JSON POST, with the admin token if given; the answer as JSON (or as a
/// JSON string when it is not JSON).
pub fn http_post(url: &str, body: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    let a = http("POST", url, &headers, body);
    let v = serde_json::from_str(&a.body).unwrap_or(serde_json::Value::String(a.body));
    (a.status, v)
}

/// A config with one reverse host type (and optionally an untrusted one),
/// pointing at `repo`.
///
/// Heartbeats go every second (token checks and health checks are quick to
/// observe), but a machine is dropped only after 30 s of silence: a debug
/// buildlet stalled on a loaded 2-core runner must not lose its build.
/// Tests about dropping a silent machine shorten it themselves. Idle links
/// park after a second, so every test that pauses between builds also
/// crosses parked links (over TLS, with the real buildlet).
pub fn config(repo: &Path, builders: &str) -> String {
    format!(
        r#"[farm]
max_attempts = 3
heartbeat = "1s"
heartbeat_timeout = "30s"
park_after = "1s"

[repos.r]
url = "{}"
branches = ["main"]
poll_interval = "300ms"

[hosts.host-test-trusted]
pool = "reverse"
expected = 2
trusted = true
owners = ["owner@example.com"]

[hosts.host-test-untrusted]
pool = "reverse"
expected = 1
trusted = false

{builders}
"#,
        repo.display()
    )
}

/// Accepts one connection on `l`, failing the test after `limit` (a
/// client that never connects must not hang the test).
pub fn accept_within(l: &std::net::TcpListener, limit: Duration) -> std::net::TcpStream {
    l.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + limit;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no connection within {limit:?}");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Runs `cmd` to its end like `Command::output`, but kills it and fails
/// the test after `limit` (a command expected to fail must not hang the
/// test by succeeding and serving forever).
pub fn output_within(cmd: &mut Command, limit: Duration) -> std::process::Output {
    let mut child = Reaped(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (out, err) = (
        Lines::follow(child.stdout.take().unwrap()),
        Lines::follow(child.stderr.take().unwrap()),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "{cmd:?} still ran after {limit:?}:\n{}",
            err.all()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // The followers finish once the pipes close.
    let drained = Instant::now() + Duration::from_secs(5);
    while Instant::now() < drained
        && (Arc::strong_count(&out.0) > 1 || Arc::strong_count(&err.0) > 1)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::process::Output {
        status,
        stdout: out.all().into_bytes(),
        stderr: err.all().into_bytes(),
    }
}

/// `ssh` options that keep it from asking, remembering or chattering: a
/// test's host keys are new every run.
pub const SSH_QUIET: &[&str] = &[
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "BatchMode=yes",
    "-o",
    "IdentitiesOnly=yes",
    "-o",
    "LogLevel=ERROR",
];
