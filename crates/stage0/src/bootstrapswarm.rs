//! `bootstrapswarm -hostname linux-riscv64-alice`: the certificate path's
//! bootstrap. It waits for the machine token that `machine-tokend` keeps
//! fresh, then downloads the bot (the buildlet) for this machine from the
//! coordinator, verified exactly as stage0 does, and keeps it running in bot
//! mode, restarting it with backoff. The coordinator decides the bot's host
//! type from its certified hostname. Nothing else to install: no Python, no
//! per-platform packages.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;

/// The environment variable naming the token file (as LUCI's bots use).
pub const TOKEN_ENV: &str = "LUCI_MACHINE_TOKEN";

/// Download the farm's bot and keep it running, authenticated by a machine token.
///
/// Run machine-tokend (from cron or with -loop) first; bootstrapswarm waits
/// until the token file exists.
#[derive(Parser, Debug)]
#[command(name = "bootstrapswarm", version, about, long_about)]
pub struct Cli {
    /// This machine's certified hostname (as given to genbotcert).
    #[arg(long)]
    pub hostname: String,
    /// The coordinator, HOST[:PORT].
    #[arg(long, env = "FARMER_COORDINATOR")]
    pub coordinator: String,
    /// The farm's release public key (hex); only binaries it signed run.
    #[arg(long = "release-key", env = "FARMER_RELEASE_KEY")]
    pub release_key: String,
    /// The machine token file. Default: $LUCI_MACHINE_TOKEN, else ~/.farmer/machine-token.json.
    #[arg(long = "token-file")]
    pub token_file: Option<PathBuf>,
    /// Trust exactly the coordinator key (spki-sha256:HEX) or certificate (HEX) this pin names.
    #[arg(long = "tls-pin")]
    pub tls_pin: Option<String>,
    /// Verify the coordinator against the CA certificates in this PEM file.
    #[arg(long = "ca-file", conflicts_with = "tls_pin")]
    pub ca_file: Option<PathBuf>,
    /// Directory for the bot binary. Default: ~/.farmer-stage0.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Work dir of the bot (emptied at start).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// How long to wait for the token file before giving up (0 = forever).
    #[arg(long = "token-wait", default_value = "0")]
    pub token_wait_secs: u64,
}

/// The default token file path.
pub fn default_token_path() -> PathBuf {
    if let Some(p) = std::env::var_os(TOKEN_ENV).filter(|p| !p.is_empty()) {
        return p.into();
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".farmer")
        .join("machine-token.json")
}

/// Runs bootstrapswarm with explicit arguments; returns the exit code.
pub fn main_from<I, A>(args: I) -> i32
where
    I: IntoIterator<Item = A>,
    A: Into<std::ffi::OsString>,
{
    let cli: Cli = goflags::parse_from(args);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .try_init()
        .ok();
    let token = cli.token_file.clone().unwrap_or_else(default_token_path);
    let start = Instant::now();
    let mut last_log = None::<Instant>;
    while !token_ready(&token) {
        if cli.token_wait_secs > 0 && start.elapsed() > Duration::from_secs(cli.token_wait_secs) {
            eprintln!(
                "bootstrapswarm: no machine token in {} after {}s; run machine-tokend -backend=... -cert-pem=... -pkey-pem=... -token-file={}",
                token.display(),
                cli.token_wait_secs,
                token.display()
            );
            return 2;
        }
        if last_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            tracing::warn!(
                "waiting for the machine token in {} (written by machine-tokend)",
                token.display()
            );
            last_log = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut args = vec![
        "stage0".to_string(),
        format!("-coordinator={}", cli.coordinator),
        format!("-release-key={}", cli.release_key),
        format!("-hostname={}", cli.hostname),
        format!("-token-file={}", token.display()),
        "-loop".to_string(),
    ];
    if let Some(p) = &cli.tls_pin {
        args.push(format!("-tls-pin={p}"));
    }
    if let Some(c) = &cli.ca_file {
        args.push(format!("-ca-file={}", c.display()));
    }
    if let Some(d) = &cli.dir {
        args.push(format!("-dir={}", d.display()));
    }
    if let Some(w) = &cli.workdir {
        args.push(format!("-workdir={}", w.display()));
    }
    crate::cli::main_from(args)
}

/// True when the token file holds a token (a JSON object with `token`).
fn token_ready(path: &std::path::Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["token"].as_str().is_some_and(|t| !t.is_empty()))
}
