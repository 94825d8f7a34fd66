//! The command lines of `genbotcert` and `machine-tokend`, shared by their
//! own binaries and by `farmer genbotcert` / `farmer machine-tokend`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;

use crate::csr::{self, KeyType};
use crate::tokend::{self, Options, Outcome};

/// Make a private key and a certificate signing request for one bot.
///
/// Submit the CSR with `farmer request submit`; once an admin approves it,
/// the certificate comes back and `machine-tokend` trades it for tokens.
#[derive(Parser, Debug)]
#[command(name = "genbotcert", version, about, long_about)]
pub struct GenbotcertCli {
    /// The machine's hostname: lowercase letters, digits and single dashes, at most 63.
    #[arg(long = "bot-hostname", value_name = "NAME")]
    bot_hostname: String,
    /// DNS domain of bot names in this farm (the CN and SAN become NAME.DOMAIN).
    #[arg(long = "bot-domain", default_value = crate::hostname::DEFAULT_BOT_DOMAIN)]
    bot_domain: String,
    /// Key algorithm: ed25519 or p256.
    #[arg(long = "key-type", default_value = "ed25519")]
    key_type: KeyType,
    /// Directory for the two files.
    #[arg(long = "out-dir", default_value = ".")]
    out_dir: PathBuf,
}

/// Runs genbotcert with explicit arguments (the first is the program name).
pub fn genbotcert<I, A>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = A>,
    A: Into<std::ffi::OsString>,
{
    let cli: GenbotcertCli = goflags::parse_from(args);
    let key_path = cli.out_dir.join(format!("{}.key", cli.bot_hostname));
    let csr_path = cli.out_dir.join(format!("{}.csr", cli.bot_hostname));
    if key_path.exists() {
        bail!(
            "{} already exists; refusing to overwrite a private key",
            key_path.display()
        );
    }
    let g = csr::generate(&cli.bot_hostname, &cli.bot_domain, cli.key_type)
        .map_err(anyhow::Error::msg)?;
    atomicfile::write_private(&key_path, g.key_pem.as_bytes())
        .with_context(|| format!("writing {}", key_path.display()))?;
    std::fs::write(&csr_path, &g.csr_pem)
        .with_context(|| format!("writing {}", csr_path.display()))?;
    println!(
        "wrote {} (private key, keep it on this machine)",
        key_path.display()
    );
    println!(
        "wrote {} (certificate request for {})",
        csr_path.display(),
        g.dns_name
    );
    println!(
        "next: farmer request submit -coordinator=URL -hostname={} -csr={}",
        cli.bot_hostname,
        csr_path.display()
    );
    Ok(())
}

/// Keep a machine token file fresh.
///
/// Each run refreshes only when the token is past half its life or the
/// certificate changed, writes the token file atomically (mode 0644), and
/// records its outcome in TOKEN_FILE.status.
#[derive(Parser, Debug)]
#[command(name = "machine-tokend", version, about, long_about)]
pub struct TokendCli {
    /// Coordinator URL, e.g. https://farm.example:8080.
    #[arg(long)]
    backend: String,
    /// The machine's certificate (PEM), as returned by the approved request.
    #[arg(long = "cert-pem")]
    cert_pem: PathBuf,
    /// The machine's private key (PEM) made by genbotcert.
    #[arg(long = "pkey-pem")]
    pkey_pem: PathBuf,
    /// Where to write the token. Default: $LUCI_MACHINE_TOKEN or ~/.farmer/machine-token.json.
    #[arg(long = "token-file")]
    token_file: Option<PathBuf>,
    /// Trust exactly the coordinator key (spki-sha256:HEX) or certificate (HEX) this pin names.
    #[arg(long = "tls-pin")]
    tls_pin: Option<String>,
    /// Verify the coordinator against the CA certificates in this PEM file.
    #[arg(long = "ca-file", conflicts_with = "tls_pin")]
    ca_file: Option<PathBuf>,
    /// Keep running, refreshing at half-life (for systems without cron).
    #[arg(long = "loop", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false)]
    run_loop: bool,
}

/// Runs machine-tokend with explicit arguments; returns the exit code.
pub fn machine_tokend<I, A>(args: I) -> i32
where
    I: IntoIterator<Item = A>,
    A: Into<std::ffi::OsString>,
{
    let cli: TokendCli = goflags::parse_from(args);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .try_init()
        .ok();
    let tls = if let Some(p) = &cli.tls_pin {
        match buildlet::reverse::parse_pin(p) {
            Some(pin) => buildlet::reverse::Tls::Pinned(pin),
            None => {
                eprintln!(
                    "machine-tokend: -tls-pin={p:?} is not {}",
                    buildlet::reverse::PIN_FORMS
                );
                return 2;
            }
        }
    } else if let Some(ca) = &cli.ca_file {
        buildlet::reverse::Tls::CaFile(ca.clone())
    } else {
        buildlet::reverse::Tls::WebPki
    };
    let opts = Options {
        backend: cli.backend,
        cert_pem: cli.cert_pem,
        pkey_pem: cli.pkey_pem,
        token_file: cli
            .token_file
            .unwrap_or_else(crate::token::default_token_path),
        tls,
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("machine-tokend: {e}");
            return 1;
        }
    };
    rt.block_on(async {
        let mut backoff = Duration::from_secs(5);
        loop {
            let r = tokend::run_once(&opts).await;
            let sleep = match &r {
                Ok(Outcome::Fresh { next_update }) => {
                    println!(
                        "token in {} is fresh until {next_update}",
                        opts.token_file.display()
                    );
                    backoff = Duration::from_secs(5);
                    Duration::from_secs((next_update - tokend::now()).clamp(1, 3600) as u64)
                }
                Ok(Outcome::Refreshed {
                    expiry,
                    next_update,
                }) => {
                    println!(
                        "wrote a new token to {} (expires at {expiry})",
                        opts.token_file.display()
                    );
                    backoff = Duration::from_secs(5);
                    Duration::from_secs((next_update - tokend::now()).clamp(1, 3600) as u64)
                }
                Err(e) => {
                    eprintln!("machine-tokend: {e}");
                    let b = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(300));
                    b
                }
            };
            if !cli.run_loop {
                return i32::from(r.is_err());
            }
            tokio::time::sleep(sleep).await;
        }
    })
}
