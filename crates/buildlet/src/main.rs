//! `buildlet`: the agent a build machine runs.
//!
//! Direct mode: `buildlet -listen=127.0.0.1:5936 -workdir=/tmp/wd -password-file=pw`.
//! Go-style single-dash flags work as well as `--long` ones.

use std::path::PathBuf;

use anyhow::{Context, bail};
use buildlet::server::{Buildlet, Config};
use clap::Parser;

/// The farmer build agent.
///
/// It serves a work dir over HTTP for the coordinator (or you, with curl):
/// unpack a tar.gz into it, write files, run commands with their output
/// streamed back, list and tar up directories, empty it, halt.
///
/// The work dir is emptied at start. Every path a request names stays inside
/// it. In direct mode, set a password: anyone who can reach the port and knows
/// it can run any command as this user.
#[derive(Parser, Debug)]
#[command(version, about, long_about, after_help = EXAMPLES)]
struct Cli {
    /// Address to listen on (direct mode). Port 0 picks a free port; the
    /// address actually bound is printed on stdout as `listening on ADDR`.
    #[arg(long, default_value = "127.0.0.1:5936", value_name = "ADDR")]
    listen: String,

    /// Work dir; created if missing and emptied at start. Default: a
    /// `farmer-buildlet` directory under the system temp dir.
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,

    /// File holding the HTTP Basic password clients must send (user name is
    /// ignored). Required when listening on a non-loopback address.
    #[arg(long = "password-file", value_name = "FILE")]
    password_file: Option<PathBuf>,

    /// Reboot the machine after /halt instead of only exiting.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, value_name = "BOOL")]
    reboot: bool,

    /// Largest accepted request body for /writetgz and /write, in bytes.
    #[arg(long = "max-body", default_value_t = buildlet::proto::DEFAULT_MAX_BODY, value_name = "BYTES")]
    max_body: u64,

    /// Host name reported in /status. Default: the machine's.
    #[arg(long, value_name = "NAME")]
    hostname: Option<String>,
}

const EXAMPLES: &str = "\
Examples:
  buildlet -listen=127.0.0.1:5936 -workdir=/tmp/wd
  buildlet -listen=0.0.0.0:5936 -workdir=/var/buildlet -password-file=/etc/buildlet.pw
  curl -s -u x:PASS http://HOST:5936/status
  curl -s -u x:PASS -H 'TE: trailers' --raw -d cmd=uname -d args=-a http://HOST:5936/exec";

fn main() -> anyhow::Result<()> {
    let cli: Cli = goflags::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BUILDLET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let password = match &cli.password_file {
        Some(f) => {
            let p = std::fs::read_to_string(f)
                .with_context(|| format!("reading -password-file {}", f.display()))?;
            let p = p.trim().to_string();
            if p.is_empty() {
                bail!("-password-file {} is empty", f.display());
            }
            Some(p)
        }
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(&cli.listen)
        .await
        .with_context(|| format!("-listen={}: cannot listen", cli.listen))?;
    let addr = listener.local_addr()?;
    if password.is_none() && !addr.ip().is_loopback() {
        bail!(
            "-listen={addr} is reachable from other machines but no -password-file is set; \
             anyone could run commands here. Set -password-file or listen on 127.0.0.1"
        );
    }
    let workdir = cli
        .workdir
        .unwrap_or_else(|| std::env::temp_dir().join("farmer-buildlet"));
    let mut cfg = Config::new(workdir);
    cfg.password = password;
    cfg.reboot = cli.reboot;
    cfg.max_body = cli.max_body;
    if let Some(h) = cli.hostname {
        cfg.hostname = h;
    }
    let buildlet = Buildlet::new(cfg)?;
    tracing::info!(
        workdir = %buildlet.workdir().display(),
        version = buildlet::proto::VERSION,
        "buildlet serving on http://{addr}"
    );
    println!("listening on {addr}");
    let server = buildlet.clone().serve(listener);
    tokio::select! {
        r = server => r?,
        _ = shutdown_signal() => {
            tracing::info!("signal received, stopping");
            buildlet.halt();
            return Ok(());
        }
    }
    tracing::info!("halted by /halt");
    if cli.reboot {
        reboot();
    }
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn reboot() {
    let (prog, args): (&str, &[&str]) = if cfg!(windows) {
        ("shutdown", &["/r", "/t", "0"])
    } else {
        ("shutdown", &["-r", "now"])
    };
    match std::process::Command::new(prog).args(args).status() {
        Ok(s) if s.success() => {}
        Ok(s) => tracing::error!("reboot command {prog} exited with {s}"),
        Err(e) => tracing::error!("cannot run {prog} to reboot: {e}"),
    }
}
