//! The local pool: for host types with `pool = "local"`, the coordinator
//! starts buildlet processes itself. They are ordinary reverse buildlets —
//! own work dirs, real builder keys, TLS over loopback — so the demo farm
//! exercises exactly the path a remote machine takes. Each is supervised:
//! restarted with backoff if it exits (e.g. after `/halt`), and stopped
//! (SIGTERM, then SIGKILL) when the coordinator stops.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::farm::Farm;
use crate::keys::write_private;

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
}

impl LocalTarget {
    /// Runs buildlets as `<this executable> buildlet ...`.
    pub fn this_exe(addr: String, pin: Option<String>) -> std::io::Result<LocalTarget> {
        let exe = std::env::current_exe()?;
        Ok(LocalTarget {
            addr,
            pin,
            program: vec![exe.display().to_string(), "buildlet".into()],
        })
    }
}

pub struct LocalPool {
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl LocalPool {
    /// Starts `count` buildlets for every local host type of the farm.
    pub fn start(farm: &Arc<Farm>, target: LocalTarget) -> std::io::Result<LocalPool> {
        let (stop, _) = watch::channel(false);
        let mut tasks = JoinSet::new();
        for (host_type, count) in farm.local_host_types() {
            for i in 1..=count {
                let name = format!("{}-{i}", host_type.trim_start_matches("host-"));
                let dir = farm.data_dir.join("local").join(&name);
                std::fs::create_dir_all(&dir)?;
                let key_file = dir.join("builder.key");
                write_private(&key_file, farm.master.builder_key(&host_type).as_bytes())?;
                let mut args: Vec<String> = target.program[1..].to_vec();
                args.extend([
                    format!("-coordinator={}", target.addr),
                    format!("-reverse-type={host_type}"),
                    format!("-hostname={name}"),
                    format!("-key-file={}", key_file.display()),
                    format!("-workdir={}", dir.join("workdir").display()),
                ]);
                match &target.pin {
                    Some(p) => args.push(format!("-tls-pin={p}")),
                    None => args.push("-insecure-plaintext".into()),
                }
                let program = PathBuf::from(&target.program[0]);
                let log = dir.join("buildlet.log");
                let stop_rx = stop.subscribe();
                tasks.spawn(supervise(name, program, args, log, stop_rx));
            }
        }
        Ok(LocalPool { stop, tasks })
    }

    /// Stops every buildlet and waits until all have exited.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

async fn supervise(
    name: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(500);
    loop {
        if *stop.borrow() {
            return;
        }
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log);
        let (stdout, stderr) = match out.and_then(|f| Ok((f.try_clone()?, f))) {
            Ok((a, b)) => (Stdio::from(a), Stdio::from(b)),
            Err(_) => (Stdio::null(), Stdio::null()),
        };
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .env("BUILDLET_LOG", "info")
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(%name, "cannot start local buildlet {}: {e}", program.display());
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
