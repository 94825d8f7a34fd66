//! stage0: the bootstrap a machine owner installs once and never touches
//! again. It keeps the machine on the buildlet the farm admin published:
//!
//! 1. waits for the network (bounded, a log line every few seconds);
//! 2. fetches the signed manifest for its own platform from the coordinator
//!    (`/stage0/manifest?os=&arch=`) and verifies its Ed25519 signature
//!    against the release public key it was installed with;
//! 3. downloads the binary only when its SHA-256 differs from the one on
//!    disk (with a progress line for slow links), and checks digest and size
//!    before it replaces anything;
//! 4. keeps the last good binary when the coordinator cannot be reached or
//!    offers something that does not verify;
//! 5. runs the buildlet with flags derived from its [`Config`], and exits
//!    with its status ([`run_once`], for a supervisor such as systemd or
//!    launchd) or starts over ([`run_loop`], `-loop`).
//!
//! Retries use jittered exponential backoff in seconds ([`Backoff`]).
//!
//! Other bootstraps reuse the same steps: [`ensure_buildlet`] (download and
//! verify, with retries and the last-good fallback) and [`run_buildlet`]
//! (run it, forwarding SIGTERM/SIGINT). `bootstrapswarm` of the certificate
//! path is such a caller.

pub mod bootstrapswarm;
pub mod cli;
pub mod http;
pub mod manifest;
pub mod platform;

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use sha2::Digest;
use tokio::io::AsyncWriteExt;

pub use http::Tls;
pub use manifest::{Manifest, ReleaseKey, VerifyError};
pub use platform::Platform;

/// Coordinator endpoint with the signed manifest (`?os=OS&arch=ARCH`).
pub const MANIFEST_PATH: &str = "/stage0/manifest";
/// Coordinator endpoint with the binary (`?os=OS&arch=ARCH[&sha256=HEX]`).
pub const BINARY_PATH: &str = "/stage0/buildlet";
/// Coordinator endpoint with the release public key (hex, one line).
pub const KEY_PATH: &str = "/stage0/release-key";
/// Environment variable stage0 sets for the buildlet it runs: the platform
/// (`os/arch`) it fetched. The buildlet reports it when registering, which
/// tells the coordinator the machine is upgraded by halting it.
pub const ENV_STAGE0: &str = "FARMER_STAGE0";
/// Environment variable with the version label of the release being run.
pub const ENV_RELEASE: &str = "FARMER_STAGE0_RELEASE";

/// File name of the installed buildlet inside [`Config::dir`].
pub const BINARY_NAME: &str = if cfg!(windows) {
    "buildlet.exe"
} else {
    "buildlet"
};
/// The verified manifest of the installed buildlet, next to it.
pub const MANIFEST_NAME: &str = "buildlet.json";
const DOWNLOAD_NAME: &str = "buildlet.download";

/// Largest manifest accepted.
const MAX_MANIFEST: usize = 64 * 1024;

/// Everything stage0 needs: where the coordinator is and how to trust it,
/// the release key, where the binary lives, and how to run the buildlet.
#[derive(Debug, Clone)]
pub struct Config {
    /// `HOST[:PORT]` of the coordinator (port 443 if omitted), or several
    /// comma-separated (a leader and its standby): downloads come from the
    /// first that answers, and the buildlet gets them all.
    pub coordinator: String,
    pub tls: Tls,
    /// The farm's release public key; nothing else is ever run.
    pub release_key: ReleaseKey,
    /// Directory holding the buildlet binary and its manifest.
    pub dir: PathBuf,
    /// Which binary to fetch (default: this machine's).
    pub platform: Platform,
    /// How long to wait for the network at start.
    pub network_wait: Duration,
    /// How many times an unreachable coordinator is retried before the last
    /// good binary is run instead (without one, stage0 retries forever).
    pub tries_before_last_good: u32,
    /// Buildlet flags: `-reverse-type`.
    pub reverse_type: Option<String>,
    /// `-hostname`.
    pub hostname: Option<String>,
    /// `-workdir`.
    pub workdir: Option<PathBuf>,
    /// `-key-file` (builder key path).
    pub key_file: Option<PathBuf>,
    /// `-token-file` (machine token, certificate path).
    pub token_file: Option<PathBuf>,
    /// More arguments for the buildlet, appended last.
    pub extra_args: Vec<String>,
}

impl Config {
    /// A config with defaults for everything but the essentials.
    pub fn new(coordinator: &str, tls: Tls, release_key: ReleaseKey, dir: PathBuf) -> Config {
        Config {
            coordinator: coordinator
                .split(',')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(http::with_port)
                .collect::<Vec<_>>()
                .join(","),
            tls,
            release_key,
            dir,
            platform: Platform::current(),
            network_wait: Duration::from_secs(60),
            tries_before_last_good: 3,
            reverse_type: None,
            hostname: None,
            workdir: None,
            key_file: None,
            token_file: None,
            extra_args: Vec::new(),
        }
    }

    /// Path of the installed buildlet.
    pub fn binary_path(&self) -> PathBuf {
        self.dir.join(BINARY_NAME)
    }

    /// The buildlet's command line (without the program).
    pub fn buildlet_args(&self) -> Vec<String> {
        let mut a = vec![format!("-coordinator={}", self.coordinator)];
        if let Some(t) = &self.reverse_type {
            a.push(format!("-reverse-type={t}"));
        }
        if let Some(h) = &self.hostname {
            a.push(format!("-hostname={h}"));
        }
        if let Some(w) = &self.workdir {
            a.push(format!("-workdir={}", w.display()));
        }
        if let Some(k) = &self.key_file {
            a.push(format!("-key-file={}", k.display()));
        }
        if let Some(t) = &self.token_file {
            a.push(format!("-token-file={}", t.display()));
        }
        match &self.tls {
            Tls::Plaintext => a.push("-insecure-plaintext".into()),
            Tls::Pinned(p) => a.push(format!("-tls-pin={p}")),
            Tls::CaFile(f) => a.push(format!("-ca-file={}", f.display())),
            Tls::WebPki => {}
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }

    fn query(&self) -> String {
        format!("os={}&arch={}", self.platform.os, self.platform.arch)
    }
}

/// A verified buildlet on disk.
#[derive(Debug, Clone)]
pub struct Installed {
    pub path: PathBuf,
    pub manifest: Manifest,
}

/// Why getting a verified buildlet failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The coordinator could not be reached or answered with a server error: retry.
    #[error("{0}")]
    Unreachable(String),
    /// The coordinator has no release for this platform.
    #[error("{0}")]
    NoRelease(String),
    /// What was offered does not verify; the text says why.
    #[error("{0}")]
    Refused(String),
    /// This machine could not store it (disk, permissions).
    #[error("{0}")]
    Local(String),
    /// The configuration is unusable (e.g. the CA file); retrying will not help.
    #[error("{0}")]
    Config(String),
}

/// Jittered exponential backoff: each delay is uniform in [d/2, d], d
/// doubling from `min` up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    cur: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max, cur: min }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.cur;
        self.cur = (self.cur * 2).min(self.max);
        jitter(d)
    }

    /// Starts again from the minimum (after a success).
    pub fn reset(&mut self) {
        self.cur = self.min;
    }
}

/// A delay uniformly in [d/2, d], from the OS-seeded generator (as the
/// buildlet's reconnect jitter): machines restarted together spread out.
pub fn jitter(d: Duration) -> Duration {
    use rand::Rng;
    d.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
}

/// Polls the coordinators until one answers anything over HTTP (even an
/// error status), at most `limit`. Logs every 5 s while it waits. Returns
/// whether one answered.
pub async fn wait_for_network(clients: &[http::Client], limit: Duration) -> bool {
    let start = Instant::now();
    let mut last_log = Instant::now();
    loop {
        let mut err = String::from("no coordinator address");
        for client in clients {
            err = match tokio::time::timeout(Duration::from_secs(5), client.get("/healthz")).await {
                Ok(Ok(_)) => {
                    if start.elapsed() > Duration::from_secs(1) {
                        tracing::info!(
                            "the coordinator at {} answered after {:.0?}",
                            client.addr(),
                            start.elapsed()
                        );
                    }
                    return true;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("{}: no answer within 5s", client.addr()),
            };
        }
        let waited = start.elapsed();
        if waited >= limit {
            tracing::warn!("gave up waiting for the network after {waited:.0?}: {err}");
            return false;
        }
        if last_log.elapsed() >= Duration::from_secs(5) || waited < Duration::from_millis(10) {
            tracing::info!(
                "waiting for the network: {err} (waited {}s of {}s)",
                waited.as_secs(),
                limit.as_secs()
            );
            last_log = Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(1).min(limit.saturating_sub(waited))).await;
    }
}

fn status_error(what: &str, status: ::http::StatusCode, body: &[u8]) -> Error {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let msg = format!("{what}: the coordinator answered {status}: {text}");
    if status == ::http::StatusCode::NOT_FOUND {
        Error::NoRelease(msg)
    } else if status.is_server_error() {
        Error::Unreachable(msg)
    } else {
        Error::Refused(msg)
    }
}

/// Fetches and verifies the current manifest for `cfg.platform`.
pub async fn fetch_manifest(client: &http::Client, cfg: &Config) -> Result<Manifest, Error> {
    let path = format!("{MANIFEST_PATH}?{}", cfg.query());
    let (status, body) = client
        .get_small(&path, MAX_MANIFEST)
        .await
        .map_err(|e| match e {
            http::HttpError::Config(m) => Error::Config(m),
            e => Error::Unreachable(e.to_string()),
        })?;
    if !status.is_success() {
        return Err(status_error(
            &format!("the manifest for {}", cfg.platform),
            status,
            &body,
        ));
    }
    let m: Manifest = serde_json::from_slice(&body).map_err(|e| {
        Error::Refused(format!(
            "the manifest for {} is not valid JSON: {e}",
            cfg.platform
        ))
    })?;
    m.verify(&cfg.release_key, &cfg.platform).map_err(|e| {
        Error::Refused(format!(
            "manifest for {} (version {:?}): {e}",
            cfg.platform, m.version
        ))
    })?;
    Ok(m)
}

/// The verified buildlet on disk: its saved manifest must carry a valid
/// signature by the release key for this platform, and the binary must
/// match it. Anything else is not run.
pub fn installed(cfg: &Config) -> Result<Installed, String> {
    let mpath = cfg.dir.join(MANIFEST_NAME);
    let text = std::fs::read(&mpath).map_err(|e| format!("{}: {e}", mpath.display()))?;
    let m: Manifest =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", mpath.display()))?;
    m.verify(&cfg.release_key, &cfg.platform)
        .map_err(|e| format!("{}: {e}", mpath.display()))?;
    let path = cfg.binary_path();
    m.check_file(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Installed { path, manifest: m })
}

fn save_manifest(cfg: &Config, m: &Manifest) -> Result<(), Error> {
    let path = cfg.dir.join(MANIFEST_NAME);
    let json = serde_json::to_vec_pretty(m).map_err(|e| Error::Local(e.to_string()))?;
    atomicfile::write(&path, &json, None)
        .map_err(|e| Error::Local(format!("{}: {e}", path.display())))
}

fn mib(n: u64) -> f64 {
    n as f64 / (1024.0 * 1024.0)
}

/// Downloads the binary `m` describes into `cfg.dir`, checks its size and
/// SHA-256 while streaming, and only then replaces the installed one.
pub async fn download(
    client: &http::Client,
    cfg: &Config,
    m: &Manifest,
) -> Result<Installed, Error> {
    std::fs::create_dir_all(&cfg.dir)
        .map_err(|e| Error::Local(format!("creating {}: {e}", cfg.dir.display())))?;
    let path = format!("{BINARY_PATH}?{}&sha256={}", cfg.query(), m.sha256);
    let resp = client.get(&path).await.map_err(|e| match e {
        http::HttpError::Config(m) => Error::Config(m),
        e => Error::Unreachable(e.to_string()),
    })?;
    let what = format!("buildlet {} for {}", m.version, cfg.platform);
    if !resp.status().is_success() {
        let status = resp.status();
        let body = http::read_small(resp, 4096, &path)
            .await
            .unwrap_or_default();
        return Err(status_error(&format!("downloading {what}"), status, &body));
    }
    tracing::info!(
        "downloading {what} ({:.1} MiB, sha256 {})",
        mib(m.size),
        &m.sha256[..16]
    );
    let tmp = cfg.dir.join(DOWNLOAD_NAME);
    let local = |e: std::io::Error| Error::Local(format!("{}: {e}", tmp.display()));
    let mut file = tokio::fs::File::create(&tmp).await.map_err(local)?;
    let mut hasher = sha2::Sha256::new();
    let mut body = resp.into_body();
    let mut got: u64 = 0;
    let started = Instant::now();
    let mut last_log = Instant::now();
    let result: Result<(), Error> = async {
        loop {
            let frame = match tokio::time::timeout(Duration::from_secs(60), body.frame()).await {
                Err(_) => {
                    return Err(Error::Unreachable(format!(
                        "downloading {what}: no data for 60s after {:.1} MiB",
                        mib(got)
                    )));
                }
                Ok(None) => return Ok(()),
                Ok(Some(Err(e))) => {
                    return Err(Error::Unreachable(format!(
                        "downloading {what}: broke off after {:.1} MiB: {e}",
                        mib(got)
                    )));
                }
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else { continue };
            got += data.len() as u64;
            if got > m.size {
                return Err(Error::Refused(format!(
                    "downloading {what}: the coordinator sent more than the {} bytes the signed manifest says: refusing it",
                    m.size
                )));
            }
            hasher.update(&data);
            file.write_all(&data).await.map_err(local)?;
            if last_log.elapsed() >= Duration::from_secs(5) {
                let secs = started.elapsed().as_secs_f64().max(0.001);
                tracing::info!(
                    "downloading {what}: {:.1} of {:.1} MiB ({:.0}%), {:.2} MiB/s",
                    mib(got),
                    mib(m.size),
                    100.0 * got as f64 / m.size.max(1) as f64,
                    mib(got) / secs
                );
                last_log = Instant::now();
            }
        }
    }
    .await;
    let finish = async {
        result?;
        file.flush().await.map_err(local)?;
        file.sync_all().await.map_err(local)?;
        drop(file);
        let digest = hex::encode(hasher.finalize());
        m.check_digest(&digest, got)
            .map_err(|e| Error::Refused(format!("downloaded {what}: {e}")))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
                .map_err(local)?;
        }
        let dest = cfg.binary_path();
        std::fs::rename(&tmp, &dest)
            .map_err(|e| Error::Local(format!("installing {}: {e}", dest.display())))?;
        save_manifest(cfg, m)?;
        tracing::info!(
            "downloaded and verified {what} in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        Ok(Installed {
            path: dest,
            manifest: m.clone(),
        })
    }
    .await;
    if finish.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    finish
}

/// One try: fetch and verify the manifest; if the binary on disk already
/// has that digest, keep it (no download); otherwise download and verify.
pub async fn update_once(client: &http::Client, cfg: &Config) -> Result<Installed, Error> {
    let m = fetch_manifest(client, cfg).await?;
    let good = installed(cfg).ok();
    if let Some(g) = &good
        && m.published_at < g.manifest.published_at
        && m.sha256 != g.manifest.sha256
    {
        return Err(Error::Refused(
            VerifyError::Rollback {
                offered: m.version.clone(),
                offered_at: m.published_at,
                installed: g.manifest.version.clone(),
                installed_at: g.manifest.published_at,
            }
            .to_string(),
        ));
    }
    let path = cfg.binary_path();
    let on_disk = match &good {
        Some(g) => Some((g.manifest.sha256.clone(), g.manifest.size)),
        None if path.exists() => {
            let p = path.clone();
            tokio::task::spawn_blocking(move || manifest::sha256_file(&p))
                .await
                .ok()
                .and_then(Result::ok)
        }
        None => None,
    };
    if on_disk.is_some_and(|(d, n)| d == m.sha256 && n == m.size) {
        if good.as_ref().map(|g| &g.manifest) != Some(&m) {
            save_manifest(cfg, &m)?;
        }
        tracing::info!(
            "buildlet {} for {} is up to date (sha256 {})",
            m.version,
            cfg.platform,
            &m.sha256[..16]
        );
        return Ok(Installed { path, manifest: m });
    }
    download(client, cfg, &m).await
}

/// Gets a verified buildlet for this machine: waits for the network, then
/// tries [`update_once`] with jittered backoff. A release that does not
/// verify, or a coordinator unreachable for `tries_before_last_good` tries,
/// falls back to the last good binary on disk; without one it keeps trying
/// (an error is returned only for a configuration that can never work).
pub async fn ensure_buildlet(cfg: &Config) -> Result<Installed, Error> {
    let clients = cfg
        .coordinator
        .split(',')
        .map(|a| http::Client::new(a, &cfg.tls).map_err(|e| Error::Config(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut tries = 0u32;
    wait_for_network(&clients, cfg.network_wait).await;
    loop {
        tries += 1;
        // Each address in turn until one gives a verified release (a
        // leader down, or a standby without this farm's releases); the
        // error kept is the first that says more than "unreachable".
        let mut err: Option<Error> = None;
        for client in &clients {
            match update_once(client, cfg).await {
                Ok(i) => return Ok(i),
                Err(Error::Config(m)) => return Err(Error::Config(m)),
                Err(e) => {
                    if err
                        .as_ref()
                        .is_none_or(|k| matches!(k, Error::Unreachable(_)))
                    {
                        err = Some(e);
                    }
                }
            }
        }
        let Some(err) = err else {
            return Err(Error::Config("no coordinator address".into()));
        };
        let give_up_now =
            !matches!(err, Error::Unreachable(_)) || tries >= cfg.tries_before_last_good;
        match installed(cfg) {
            Ok(good) if give_up_now => {
                tracing::error!(
                    "{err}; keeping the last good buildlet {} (sha256 {})",
                    good.manifest.version,
                    &good.manifest.sha256[..16]
                );
                return Ok(good);
            }
            Ok(_) => tracing::warn!("{err}"),
            Err(why) if tries == 1 => {
                tracing::error!("{err}; no verified buildlet to fall back to ({why})")
            }
            Err(_) => tracing::error!("{err}"),
        }
        let wait = backoff.next_delay();
        tracing::info!("trying again in {:.1}s", wait.as_secs_f64());
        tokio::time::sleep(wait).await;
    }
}

/// How a buildlet run ended.
#[derive(Debug)]
pub enum RunEnd {
    /// The buildlet exited by itself (after `/halt`, or an error).
    Exited(ExitStatus),
    /// stage0 got SIGTERM/SIGINT, passed it on, and the buildlet exited.
    Stopped(ExitStatus),
}

impl RunEnd {
    /// A process exit code for the status (128 + signal when killed).
    pub fn code(&self) -> i32 {
        let s = match self {
            RunEnd::Exited(s) | RunEnd::Stopped(s) => s,
        };
        if let Some(c) = s.code() {
            return c;
        }
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            if let Some(sig) = s.signal() {
                return 128 + sig;
            }
        }
        1
    }
}

/// Runs the installed buildlet with `cfg`'s flags in the foreground
/// (stdout and stderr are this process's) and waits for it. SIGTERM and
/// SIGINT are passed on to it, so the buildlet can kill its commands.
pub async fn run_buildlet(i: &Installed, cfg: &Config) -> std::io::Result<RunEnd> {
    let args = cfg.buildlet_args();
    tracing::info!(
        "running buildlet {} (sha256 {}): {} {}",
        i.manifest.version,
        &i.manifest.sha256[..16],
        i.path.display(),
        args.join(" ")
    );
    let mut cmd = tokio::process::Command::new(&i.path);
    cmd.args(&args)
        .env(ENV_STAGE0, cfg.platform.to_string())
        .env(ENV_RELEASE, &i.manifest.version)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    #[cfg(unix)]
    {
        // As root under a bare supervisor, HOME and USER may be missing
        // (Go's stage0 had the same fix); the buildlet looks for keys in HOME.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            if std::env::var_os("HOME").is_none() {
                cmd.env("HOME", "/root");
            }
            if std::env::var_os("USER").is_none() {
                cmd.env("USER", "root");
            }
        }
    }
    let mut child = cmd.spawn()?;
    let stopped = tokio::select! {
        s = child.wait() => return Ok(RunEnd::Exited(s?)),
        sig = stop_signal() => sig,
    };
    tracing::info!("signal {stopped} received: stopping the buildlet");
    #[cfg(unix)]
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(pid, stopped);
        }
    }
    match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
        Ok(s) => Ok(RunEnd::Stopped(s?)),
        Err(_) => {
            tracing::warn!("the buildlet did not stop within 30s; killing it");
            child.kill().await?;
            Ok(RunEnd::Stopped(child.wait().await?))
        }
    }
}

/// Resolves with the signal number of the first SIGTERM or SIGINT.
async fn stop_signal() -> i32 {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            tokio::select! {
                _ = term.recv() => return libc::SIGTERM,
                _ = int.recv() => return libc::SIGINT,
            }
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    2
}

/// Gets a verified buildlet, runs it once and returns its exit code (what
/// a supervisor expects: systemd's `Restart=always`, launchd's `KeepAlive`).
pub async fn run_once(cfg: &Config) -> i32 {
    let installed = match ensure_buildlet(cfg).await {
        Ok(i) => i,
        Err(e) => {
            tracing::error!("{e}");
            return 2;
        }
    };
    match run_buildlet(&installed, cfg).await {
        Ok(end) => {
            let code = end.code();
            tracing::info!("buildlet exited with status {code}");
            code
        }
        Err(e) => {
            tracing::error!("cannot run {}: {e}", installed.path.display());
            1
        }
    }
}

/// Like [`run_once`], forever: after the buildlet exits (e.g. halted by the
/// coordinator for an upgrade), checks for a new version and runs again.
/// Quick failures back off (jittered, up to a minute); a clean exit comes
/// back within a second or two. Returns when stage0 is told to stop.
pub async fn run_loop(cfg: &Config) -> i32 {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        let installed = match ensure_buildlet(cfg).await {
            Ok(i) => i,
            Err(e) => {
                tracing::error!("{e}");
                return 2;
            }
        };
        let started = Instant::now();
        let end = match run_buildlet(&installed, cfg).await {
            Ok(RunEnd::Stopped(s)) => return RunEnd::Stopped(s).code(),
            Ok(RunEnd::Exited(s)) => s,
            Err(e) => {
                tracing::error!("cannot run {}: {e}", installed.path.display());
                let wait = backoff.next_delay();
                tracing::info!("trying again in {:.1}s", wait.as_secs_f64());
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        if started.elapsed() > Duration::from_secs(60) {
            backoff.reset();
        }
        let wait = if end.success() {
            backoff.reset();
            jitter(Duration::from_secs(2))
        } else {
            backoff.next_delay()
        };
        tracing::info!(
            "buildlet exited ({end}); checking for a new version in {:.1}s",
            wait.as_secs_f64()
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            sig = stop_signal() => {
                tracing::info!("signal {sig} received: stopping");
                return 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        let mut ds = Vec::new();
        for _ in 0..6 {
            ds.push(b.next_delay());
        }
        let caps = [1, 2, 4, 8, 8, 8];
        for (d, cap) in ds.iter().zip(caps) {
            let cap = Duration::from_secs(cap);
            assert!(
                *d >= cap / 2 && *d <= cap,
                "{d:?} not in [{:?}, {cap:?}]",
                cap / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
        // Jitter actually varies.
        let js: std::collections::HashSet<_> =
            (0..20).map(|_| jitter(Duration::from_secs(10))).collect();
        assert!(js.len() > 10);
    }

    #[test]
    fn several_coordinators_each_get_a_port_and_all_reach_the_buildlet() {
        let k = ReleaseKey::from_signing(&ed25519_dalek::SigningKey::from_bytes(&[1; 32]));
        let c = Config::new(
            " a.example, b.example:8443 ,",
            Tls::Pinned(farmtls::Pin::Cert([0xab; 32])),
            k,
            "/x".into(),
        );
        assert_eq!(c.coordinator, "a.example:443,b.example:8443");
        assert_eq!(
            c.buildlet_args()[0],
            "-coordinator=a.example:443,b.example:8443"
        );
    }

    #[test]
    fn buildlet_flags_follow_the_config() {
        let k = ReleaseKey::parse(&"11".repeat(32));
        // Not every 32 bytes are a valid point; use a real key instead.
        let k = k.unwrap_or_else(|_| {
            ReleaseKey::from_signing(&ed25519_dalek::SigningKey::from_bytes(&[1; 32]))
        });
        let mut c = Config::new(
            "farm.example",
            Tls::Pinned(farmtls::Pin::Cert([0xab; 32])),
            k,
            "/x".into(),
        );
        c.reverse_type = Some("host-linux-amd64-alice".into());
        c.hostname = Some("alice-1".into());
        c.workdir = Some("/var/wd".into());
        c.key_file = Some("/etc/key".into());
        c.extra_args = vec!["-max-body=10".into()];
        assert_eq!(
            c.buildlet_args(),
            vec![
                "-coordinator=farm.example:443".to_string(),
                "-reverse-type=host-linux-amd64-alice".into(),
                "-hostname=alice-1".into(),
                "-workdir=/var/wd".into(),
                "-key-file=/etc/key".into(),
                format!("-tls-pin={}", "ab".repeat(32)),
                "-max-body=10".into(),
            ]
        );
        // A key pin is passed on with its prefix, so the buildlet pins the key too.
        c.tls = Tls::Pinned(farmtls::Pin::Spki([0xcd; 32]));
        assert!(
            c.buildlet_args()
                .contains(&format!("-tls-pin=spki-sha256:{}", "cd".repeat(32)))
        );
        c.tls = Tls::Plaintext;
        assert!(
            c.buildlet_args()
                .contains(&"-insecure-plaintext".to_string())
        );
    }
}
