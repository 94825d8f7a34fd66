//! The local pool: for host types with `pool = "local"`, the coordinator
//! starts buildlet processes itself. They are ordinary reverse buildlets —
//! real builder keys, TLS over loopback — so the demo farm exercises exactly
//! the path a remote machine takes. Each is supervised: restarted with
//! backoff if it exits (e.g. after `/halt`), and stopped (SIGTERM, then
//! SIGKILL) when the coordinator stops.
//!
//! Their builds run repository code next to the farm's secrets, so each
//! local buildlet starts in a sandbox ([`crate::sandbox`]) that hides the
//! data dir, with its work dir in a private temporary directory outside the
//! data dir, a clean environment, and its builder key passed on standard
//! input (never written where a build could read it).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::task::JoinSet;

use futures_util::future::BoxFuture;

use super::{MachineSource, SourceCtx, SourceView};

/// How the local buildlets reach the coordinator.
#[derive(Clone, Debug)]
pub struct LocalTarget {
    /// `127.0.0.1:PORT` of the coordinator.
    pub addr: String,
    /// SHA-256 of the coordinator's certificate; `None` means plaintext.
    pub pin: Option<String>,
    /// The program and leading arguments that run a buildlet
    /// (`farmer buildlet` by default).
    pub program: Vec<String>,
    /// Files and directories no build may read (the data dir, a TLS key
    /// kept elsewhere, the config).
    pub secrets: Vec<PathBuf>,
}

impl LocalTarget {
    /// Runs buildlets as `<this executable> buildlet ...`.
    pub fn this_exe(
        addr: String,
        pin: Option<String>,
        secrets: Vec<PathBuf>,
    ) -> std::io::Result<LocalTarget> {
        let exe = std::env::current_exe()?;
        Ok(LocalTarget {
            addr,
            pin,
            program: vec![exe.display().to_string(), "buildlet".into()],
            secrets,
        })
    }
}

/// One local buildlet's start recipe.
struct Spec {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    key: String,
    home: PathBuf,
    log: PathBuf,
    #[cfg(unix)]
    sandbox: Option<Arc<crate::sandbox::Sandbox>>,
}

/// The source of a `pool = "local"` host type: `count` supervised buildlets.
pub struct LocalSource {
    ctx: SourceCtx,
    #[cfg(unix)]
    sandbox: Option<Arc<crate::sandbox::Sandbox>>,
    /// Removed when the source is dropped.
    work_root: tempfile::TempDir,
}

impl LocalSource {
    /// Prepares the sandbox and a private work root; starts nothing yet.
    pub fn new(ctx: SourceCtx) -> anyhow::Result<LocalSource> {
        use anyhow::Context;
        let settings = ctx.farm.clone();
        #[cfg(unix)]
        let sandbox = if settings.local_sandbox {
            let s = crate::sandbox::Sandbox::new(
                &std::env::current_exe().context("finding this executable")?,
                &ctx.target.secrets,
                &settings.local_user,
            )
            .context("sandboxing the local buildlets")?;
            Some(Arc::new(s))
        } else {
            tracing::warn!(
                "local_sandbox = false: builds on local buildlets can read the data dir and its secrets"
            );
            None
        };
        #[cfg(not(unix))]
        if settings.local_sandbox {
            anyhow::bail!(
                "local buildlets need a sandbox, which this platform lacks (set `local_sandbox = false` in [farm] to run them unsandboxed)"
            );
        }
        // Work dirs live outside the data dir, in a fresh private directory
        // that only the buildlets' user can enter.
        let work_root = tempfile::Builder::new()
            .prefix("farmer-local-")
            .tempdir()
            .context("creating the local buildlets' work dir")?;
        #[cfg(unix)]
        if let Some(ids) = sandbox.as_ref().and_then(|s| s.user()) {
            crate::sandbox::give_dir(work_root.path(), ids).with_context(|| {
                format!(
                    "giving {} to local_user {:?}",
                    work_root.path().display(),
                    settings.local_user
                )
            })?;
        }
        Ok(LocalSource {
            ctx,
            #[cfg(unix)]
            sandbox,
            work_root,
        })
    }

    fn specs(&self) -> std::io::Result<Vec<Spec>> {
        let target = &self.ctx.target;
        let host_type = &self.ctx.host.name;
        // The host's own buildlet program (another platform's, say), else
        // the coordinator's.
        let program: &[String] = if self.ctx.host.local_program.is_empty() {
            &target.program
        } else {
            &self.ctx.host.local_program
        };
        // The sandbox runs `<this executable> buildlet` in its own process
        // and executes any other program after entering.
        #[cfg(unix)]
        let prepend_program = self.sandbox.is_some() && !runs_this_exe(program);
        let mut out = Vec::new();
        for i in 1..=self.ctx.host.local_count {
            let name = format!("{}-{i}", host_type.trim_start_matches("host-"));
            let dir = self.ctx.data_dir.join("local").join(&name);
            std::fs::create_dir_all(&dir)?;
            // Keys were once written here; a build could read them.
            let _ = std::fs::remove_file(dir.join("builder.key"));
            let home = self.work_root.path().join(&name);
            let mut args: Vec<String> = program[1..].to_vec();
            #[cfg(unix)]
            if prepend_program {
                args.insert(0, program[0].clone());
            }
            args.extend([
                format!("-coordinator={}", target.addr),
                format!("-reverse-type={host_type}"),
                format!("-hostname={name}"),
                "-key-file=-".to_string(),
                format!("-workdir={}", home.join("workdir").display()),
            ]);
            match &target.pin {
                Some(p) => args.push(format!("-tls-pin={p}")),
                None => args.push("-insecure-plaintext".into()),
            }
            out.push(Spec {
                program: PathBuf::from(&program[0]),
                args,
                key: self.ctx.key.clone(),
                home,
                log: dir.join("buildlet.log"),
                #[cfg(unix)]
                sandbox: self.sandbox.clone(),
                name,
            });
        }
        Ok(out)
    }
}

impl MachineSource for LocalSource {
    fn run(self: Arc<Self>, stop: watch::Receiver<bool>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let specs = match self.specs() {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(host_type = %self.ctx.host.name, "cannot prepare local buildlets: {e}");
                    return;
                }
            };
            let mut tasks = JoinSet::new();
            for spec in specs {
                tasks.spawn(supervise(spec, stop.clone()));
            }
            // Each supervisor stops its buildlet when `stop` turns true.
            while tasks.join_next().await.is_some() {}
        })
    }

    /// Its count and the sandbox settings restart it ([`super::Sources`]
    /// checks those); anything else needs nothing from it.
    fn reconfigure(&self, _host: &crate::config::HostConfig) -> bool {
        true
    }

    fn view(&self) -> SourceView {
        SourceView {
            host_type: self.ctx.host.name.clone(),
            kind: "local".into(),
            ..Default::default()
        }
    }
}

async fn supervise(spec: Spec, mut stop: watch::Receiver<bool>) {
    let name = &spec.name;
    let mut backoff = Duration::from_millis(500);
    loop {
        if *stop.borrow() {
            return;
        }
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log);
        let (stdout, stderr) = match out.and_then(|f| Ok((f.try_clone()?, f))) {
            Ok((a, b)) => (Stdio::from(a), Stdio::from(b)),
            Err(_) => (Stdio::null(), Stdio::null()),
        };
        #[cfg(unix)]
        let mut cmd = match &spec.sandbox {
            Some(s) => s.command(&spec.args),
            None => plain(&spec),
        };
        #[cfg(not(unix))]
        let mut cmd = plain(&spec);
        // A clean environment: the coordinator's may hold credentials.
        cmd.env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("HOME", &spec.home)
            .env("LANG", "C.UTF-8")
            .env("BUILDLET_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true);
        let spawned = cmd.spawn();
        let mut child = match spawned {
            Ok(mut c) => {
                // The key goes over a pipe, read once at start.
                if let Some(mut stdin) = c.stdin.take() {
                    let _ = stdin.write_all(spec.key.as_bytes()).await;
                }
                c
            }
            Err(e) => {
                tracing::error!(%name, "cannot start local buildlet {}: {e}", spec.program.display());
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        };
        tracing::debug!(%name, pid = child.id(), "local buildlet started");
        let started = std::time::Instant::now();
        let exited = tokio::select! {
            status = child.wait() => Some(status),
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(status) = exited else {
            terminate(&mut child).await;
            return;
        };
        tracing::info!(
            %name,
            "local buildlet exited ({}); restarting",
            status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())
        );
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(500);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Whether `program` is `<this executable> buildlet`, which the sandbox runs
/// in its own process instead of executing it.
#[cfg(unix)]
fn runs_this_exe(program: &[String]) -> bool {
    let this = std::env::current_exe().ok();
    program.get(1).is_some_and(|a| a == "buildlet")
        && this.is_some_and(|t| std::path::Path::new(&program[0]) == t)
}

fn plain(spec: &Spec) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.args(&spec.args);
    cmd
}

/// SIGTERM (the buildlet then kills its running commands), SIGKILL after 5 s.
async fn terminate(child: &mut tokio::process::Child) {
    #[cfg(unix)]
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}
