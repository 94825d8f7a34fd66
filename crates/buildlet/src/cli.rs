//! The `buildlet` command line, shared by the `buildlet` binary and the
//! `farmer buildlet` subcommand (so the demo farm needs only one binary).
//!
//! Direct mode: `buildlet -listen=127.0.0.1:5936 -workdir=/tmp/wd -password-file=pw`.
//! Reverse mode: `buildlet -coordinator=farm.example:443 -reverse-type=host-foo-bar -reboot=false`.
//! Go-style single-dash flags work as well as `--long` ones.

use std::path::PathBuf;

use crate::server::{Buildlet, Config};
use anyhow::{Context, bail};
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
#[command(name = "buildlet", version, about, long_about, after_help = EXAMPLES)]
pub struct Cli {
    /// Address to listen on (direct mode; default 127.0.0.1:5936). Port 0
    /// picks a free port; the address bound is printed on stdout as
    /// `listening on ADDR`.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,

    /// Reverse mode: dial the coordinator at HOST[:PORT] (port 443 if
    /// omitted) instead of listening, and serve it over that connection.
    /// Several, comma-separated (a leader and its standby): the first that
    /// accepts the machine serves it; when the link drops or a coordinator
    /// answers that it is a standby, the next one is tried.
    #[arg(long, value_name = "HOST[:PORT][,HOST[:PORT]...]")]
    coordinator: Option<String>,

    /// Reverse mode: the host type this machine is (e.g. host-linux-amd64-alice).
    #[arg(long = "reverse-type", value_name = "HOST-TYPE")]
    reverse_type: Option<String>,

    /// Bot mode: authenticate with the machine token in this file (kept
    /// fresh by machine-tokend) instead of a builder key; the coordinator
    /// decides the host type from the certified hostname.
    #[arg(long = "token-file", value_name = "FILE")]
    token_file: Option<PathBuf>,

    /// Reverse mode: file with the builder key (`-` reads it from standard
    /// input). Default: $GO_BUILD_KEY_PATH, then `~/.gobuildkey-<host-type>`,
    /// then ~/.gobuildkey.
    #[arg(long = "key-file", value_name = "FILE")]
    key_file: Option<PathBuf>,

    /// Reverse mode: trust exactly the coordinator key (spki-sha256:HEX) or
    /// certificate (plain HEX SHA-256) this pin names, as the coordinator
    /// prints at start. The key pin survives certificate renewal.
    #[arg(long = "tls-pin", value_name = "PIN")]
    tls_pin: Option<String>,

    /// Reverse mode: verify the coordinator against the CA certificates in this PEM file.
    #[arg(long = "ca-file", value_name = "FILE", conflicts_with = "tls_pin")]
    ca_file: Option<PathBuf>,

    /// Reverse mode: talk to the coordinator without TLS. Only for loopback
    /// demos and tests; the coordinator must allow it as well.
    #[arg(long = "insecure-plaintext", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, value_name = "BOOL")]
    insecure_plaintext: bool,

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
    #[arg(long = "max-body", default_value_t = crate::proto::DEFAULT_MAX_BODY, value_name = "BYTES")]
    max_body: u64,

    /// Largest size a tarball pushed to /writetgz may expand to (the
    /// uncompressed tar stream), in bytes. Bounds gzip bombs, which
    /// -max-body cannot.
    #[arg(long = "max-expanded", default_value_t = crate::proto::DEFAULT_MAX_EXPANDED, value_name = "BYTES")]
    max_expanded: u64,

    /// Most entries (files, directories, links) one tarball may hold.
    #[arg(long = "max-entries", default_value_t = crate::proto::DEFAULT_MAX_ENTRIES, value_name = "N")]
    max_entries: u64,

    /// How the processes of a command are kept together so that they all
    /// die with it (disconnect, timeout, /halt): `cgroup` (Linux, a cgroup v2
    /// per command), `reaper` (Linux, child subreaper and a /proc walk),
    /// `group` (process group only; other Unix), or `auto` for the best
    /// available.
    #[arg(long, default_value_t = crate::server::ContainMode::Auto, value_name = "MODE")]
    contain: crate::server::ContainMode,

    /// How a command's process is started (Linux, cgroup containment):
    /// `auto` makes it inside its cgroup at once (clone3 CLONE_INTO_CGROUP,
    /// Linux 5.7+), which spares each command on an idle machine the ~10 ms
    /// the kernel takes to move a process between cgroups; where the kernel
    /// or a seccomp profile refuses, it falls back to `fork` by itself.
    /// `fork` always forks, and the child joins its cgroup before exec.
    #[arg(long, default_value_t = crate::server::SpawnMode::Auto, value_name = "HOW")]
    spawn: crate::server::SpawnMode,

    /// Host name reported in /status. Default: the machine's.
    #[arg(long, value_name = "NAME")]
    hostname: Option<String>,
}

const EXAMPLES: &str = "\
Examples:
  buildlet -listen=127.0.0.1:5936 -workdir=/tmp/wd
  buildlet -listen=0.0.0.0:5936 -workdir=/var/buildlet -password-file=/etc/buildlet.pw
  buildlet -coordinator=farm.example:443 -reverse-type=host-linux-amd64-alice -reboot=false
  curl -s -u x:PASS http://HOST:5936/status
  curl -s -u x:PASS -H 'TE: trailers' --raw -d cmd=uname -d args=-a http://HOST:5936/exec";

/// Runs the buildlet with the process arguments.
pub fn main() -> anyhow::Result<()> {
    main_from(std::env::args_os())
}

/// Runs the buildlet with explicit arguments (the first is the program name).
pub fn main_from<I, A>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = A>,
    A: Into<std::ffi::OsString>,
{
    // Keeps the protocol marker in every executable that can be a buildlet.
    std::hint::black_box(crate::proto::BINARY_INFO.as_ptr());
    let cli: Cli = goflags::parse_from(args);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BUILDLET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init()
        .ok();
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
    if let Some(coordinator) = cli.coordinator.clone() {
        return run_reverse(cli, coordinator).await;
    }
    let listen = cli
        .listen
        .clone()
        .unwrap_or_else(|| "127.0.0.1:5936".into());
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("-listen={listen}: cannot listen"))?;
    let addr = listener.local_addr()?;
    if password.is_none() && !addr.ip().is_loopback() {
        bail!(
            "-listen={addr} is reachable from other machines but no -password-file is set; \
             anyone could run commands here. Set -password-file or listen on 127.0.0.1"
        );
    }
    let workdir = cli
        .workdir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("farmer-buildlet"));
    let mut cfg = Config::new(workdir);
    cfg.password = password;
    cfg.reboot = cli.reboot;
    cfg.max_body = cli.max_body;
    cfg.max_expanded = cli.max_expanded;
    cfg.max_entries = cli.max_entries;
    cfg.contain = cli.contain;
    cfg.spawn = cli.spawn;
    if let Some(h) = cli.hostname {
        cfg.hostname = h;
    }
    let buildlet = Buildlet::new(cfg)?;
    tracing::info!(
        workdir = %buildlet.workdir().display(),
        version = crate::proto::VERSION,
        contain = buildlet.containment(),
        "buildlet serving on http://{addr}"
    );
    {
        // A caller may close stdout after reading this line; never panic on it.
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {addr}");
        let _ = out.flush();
    }
    tokio::spawn(crate::server::release_when_idle(buildlet.clone()));
    let server = buildlet.clone().serve(listener);
    tokio::select! {
        r = server => r?,
        _ = shutdown_signal() => {
            tracing::info!("signal received, stopping");
            buildlet.halt();
            buildlet.shutdown();
            return Ok(());
        }
    }
    tracing::info!("halted by /halt");
    buildlet.shutdown();
    if cli.reboot {
        reboot();
    }
    Ok(())
}

async fn run_reverse(cli: Cli, coordinator: String) -> anyhow::Result<()> {
    use crate::reverse::{self, ReverseConfig, Tls};
    let host_type = match (&cli.reverse_type, &cli.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(_)) => String::new(),
        (None, None) => bail!(
            "-coordinator needs -reverse-type=HOST-TYPE (or -token-file=FILE for a bot with a machine certificate)"
        ),
    };
    let coordinators: Vec<String> = coordinator
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            if c.rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
                && !c.ends_with(']')
            {
                c.to_string()
            } else {
                format!("{c}:443")
            }
        })
        .collect();
    if coordinators.is_empty() {
        bail!("-coordinator names no address (HOST[:PORT], or several comma-separated)");
    }
    let (key, key_path) = if cli.token_file.is_some() {
        (String::new(), PathBuf::from("(machine token)"))
    } else {
        reverse::find_key(cli.key_file.as_deref(), &host_type).map_err(anyhow::Error::msg)?
    };
    let tls = if cli.insecure_plaintext {
        Tls::Plaintext
    } else if let Some(pin) = &cli.tls_pin {
        Tls::Pinned(
            reverse::parse_pin(pin)
                .with_context(|| format!("-tls-pin={pin:?} is not {}", reverse::PIN_FORMS))?,
        )
    } else if let Some(ca) = &cli.ca_file {
        Tls::CaFile(ca.clone())
    } else {
        Tls::WebPki
    };
    let workdir = cli
        .workdir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("farmer-buildlet-{host_type}")));
    let mut cfg = Config::new(workdir);
    cfg.token_file = cli.token_file.clone();
    cfg.reboot = cli.reboot;
    cfg.max_body = cli.max_body;
    cfg.max_expanded = cli.max_expanded;
    cfg.max_entries = cli.max_entries;
    cfg.contain = cli.contain;
    cfg.spawn = cli.spawn;
    if let Some(h) = &cli.hostname {
        cfg.hostname = h.clone();
    }
    let hostname = cfg.hostname.clone();
    let buildlet = Buildlet::new(cfg)?;
    tracing::info!(
        coordinator = %coordinators.join(","), %host_type, %hostname, key = %key_path.display(),
        workdir = %buildlet.workdir().display(),
        "reverse mode"
    );
    let rcfg = ReverseConfig {
        coordinators,
        host_type,
        hostname,
        key,
        token_file: cli.token_file.clone(),
        tls,
    };
    tokio::spawn(crate::server::release_when_idle(buildlet.clone()));
    tokio::select! {
        r = reverse::run(buildlet.clone(), rcfg) => r?,
        _ = shutdown_signal() => {
            tracing::info!("signal received, stopping");
            buildlet.halt();
            buildlet.shutdown();
            return Ok(());
        }
    }
    tracing::info!("halted by /halt");
    buildlet.shutdown();
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
