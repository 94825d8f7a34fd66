//! `farmer`: the coordinator of a farmer build farm. See `farmer --help`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use coordinator::run::{RunOptions, Started};

/// jemalloc rather than glibc's malloc, with HTTP/2 sessions in an arena of
/// their own: see `coordinator::alloc` (a parked reverse link costs half the
/// memory it would).
#[cfg(unix)]
#[global_allocator]
static ALLOC: coordinator::alloc::FarmAlloc = coordinator::alloc::FarmAlloc;

/// farmer: a self-hosted build farm.
///
/// Start with `farmer up`: a demo farm on this machine, with local buildlets
/// and a sample repository, served at http://127.0.0.1:8080.
#[derive(Parser, Debug)]
#[command(name = "farmer", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the demo farm: sample repo, config and local buildlets in the data dir.
    Up {
        /// Where everything lives (created if missing).
        #[arg(long = "data-dir", default_value = "farmer-data")]
        data_dir: PathBuf,
        /// Address for the dashboard, API and buildlet connections.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Address of the gomote SSH server (`ssh -p PORT INSTANCE@HOST`); port 0 picks a free one.
        #[arg(long = "ssh-listen", default_value = "127.0.0.1:0")]
        ssh_listen: String,
    },
    /// Run a coordinator with a config file.
    Serve {
        /// The farm config (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Where keys, tokens and the store live. Default: the config's
        /// `[serve] data_dir`, else ./farmer-data.
        #[arg(long = "data-dir")]
        data_dir: Option<PathBuf>,
        /// Address for the API, the dashboard and machines. Default: the
        /// config's `[serve] listen`, else 127.0.0.1:8080.
        #[arg(long)]
        listen: Option<String>,
        /// TLS certificate (PEM) for buildlet connections; default: self-signed in the data dir.
        #[arg(long = "tls-cert", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// TLS private key (PEM).
        #[arg(long = "tls-key", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Accept reverse buildlets without TLS. Only for loopback tests.
        #[arg(long = "insecure-plaintext-reverse")]
        insecure_plaintext_reverse: bool,
        /// Serve gomote shells over SSH on this address (`ssh -p PORT INSTANCE@HOST`); none by default.
        #[arg(long = "ssh-listen")]
        ssh_listen: Option<String>,
        /// Where the store lives: postgres://USER:PASSWORD@HOST:PORT/DATABASE
        /// (the database must exist; its tables are created) or sqlite:PATH.
        /// Default: the config's `[store] url`, else DATA_DIR/farmer.db.
        /// Prefer the environment variable for a URL with a password: the
        /// command line is visible to every user of the machine.
        #[arg(
            long = "database-url",
            env = "FARMER_DATABASE_URL",
            hide_env_values = true
        )]
        database_url: Option<String>,
    },
    /// Check a config file; prints every error with file, line and field.
    CheckConfig { file: PathBuf },
    /// Print the builder key for a host type (from the data dir's master key).
    Genbuilderkey {
        host_type: String,
        #[arg(long = "data-dir", default_value = "farmer-data")]
        data_dir: PathBuf,
    },
    /// Builder requests for certificate onboarding (submit, status, list, approve, reject).
    #[command(subcommand)]
    Request(coordinator::admin_cli::RequestCmd),
    /// Users who may lease machines with gomote (add, list, remove, add-key).
    #[command(subcommand)]
    User(coordinator::admin_cli::UserCmd),
    /// The farm's secrets: set one (from stdin) or list where they come from.
    #[command(subcommand)]
    Secret(coordinator::secret_cli::SecretCmd),
    /// Builds from a terminal: trigger [--wait], watch, list, cancel, rebuild.
    #[command(subcommand)]
    Build(coordinator::build_cli::BuildCmd),
    /// Lease machines and work on them (same as the `gomote` binary; see `farmer gomote --help`).
    #[command(disable_help_flag = true)]
    Gomote {
        #[arg(allow_hyphen_values = true, trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// The store: copy a farm's history to PostgreSQL (`farmer store migrate --help`).
    #[command(subcommand)]
    Store(coordinator::store_cli::StoreCmd),
    /// The farm's machine certificate authority (revoke).
    #[command(subcommand)]
    Ca(coordinator::admin_cli::CaCmd),
    /// Make a bot's private key and CSR (same as the `genbotcert` binary).
    #[command(disable_help_flag = true)]
    Genbotcert {
        #[arg(allow_hyphen_values = true, trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Keep a machine token fresh (same as the `machine-tokend` binary).
    #[command(name = "machine-tokend", disable_help_flag = true)]
    MachineTokend {
        #[arg(allow_hyphen_values = true, trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Download the bot and keep it running with a machine token (same as the `bootstrapswarm` binary).
    #[command(disable_help_flag = true)]
    Bootstrapswarm {
        #[arg(allow_hyphen_values = true, trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run stage0, which downloads, verifies and runs the published buildlet (see `farmer stage0 --help`).
    #[command(disable_help_flag = true)]
    Stage0 {
        #[arg(allow_hyphen_values = true, trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run a buildlet (same flags as the `buildlet` binary; see `farmer buildlet --help`),
    /// or publish one for stage0: `farmer buildlet publish --os OS --arch ARCH FILE`.
    #[command(disable_help_flag = true)]
    Buildlet {
        #[arg(allow_hyphen_values = true, trailing_var_arg = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    #[cfg(unix)]
    coordinator::alloc::init_session_arena();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // Run as a buildlet when installed under that name (stage0 saves the
    // binary it downloads as `buildlet`, and `farmer up` publishes itself).
    if args
        .first()
        .and_then(|a| std::path::Path::new(a).file_stem())
        .is_some_and(|s| s == "buildlet")
    {
        return buildlet::cli::main_from(args);
    }
    // Internal: how the coordinator starts a local buildlet (see
    // coordinator::sandbox). Runs before any thread exists.
    #[cfg(unix)]
    if args.get(1).is_some_and(|a| a == "sandbox") {
        let rest = coordinator::sandbox::enter(&args[2..]).map_err(anyhow::Error::msg)?;
        if rest.first().is_some_and(|a| a == "buildlet") {
            return buildlet::cli::main_from(rest);
        }
        let Some(program) = rest.first() else {
            anyhow::bail!("sandbox: nothing to run after --");
        };
        use std::os::unix::process::CommandExt;
        let err = std::process::Command::new(program).args(&rest[1..]).exec();
        anyhow::bail!("sandbox: cannot run {program:?}: {err}");
    }
    if args.get(1).is_some_and(|a| a == "buildlet") && args.get(2).is_some_and(|a| a == "publish") {
        let mut rest = vec![std::ffi::OsString::from("farmer buildlet publish")];
        rest.extend(args.into_iter().skip(3));
        init_logging();
        return coordinator::release::publish_main(rest);
    }
    if args.get(1).is_some_and(|a| a == "bootstrapswarm") {
        std::process::exit(stage0::bootstrapswarm::main_from(args.into_iter().skip(1)));
    }
    if args.get(1).is_some_and(|a| a == "gomote") {
        let mut rest = vec![std::ffi::OsString::from("farmer gomote")];
        rest.extend(args.into_iter().skip(2));
        std::process::exit(coordinator::gomote::cli::main_from(rest));
    }
    if args.get(1).is_some_and(|a| a == "stage0") {
        std::process::exit(stage0::cli::main_from(args.into_iter().skip(1)));
    }
    if args.get(1).is_some_and(|a| a == "buildlet") {
        let mut rest = vec![std::ffi::OsString::from("buildlet")];
        rest.extend(args.into_iter().skip(2));
        return buildlet::cli::main_from(rest);
    }
    // The owner-side tools of certificate onboarding, also as subcommands so
    // one binary carries the whole farm.
    if args.get(1).is_some_and(|a| a == "genbotcert") {
        return botauth::cli::genbotcert(args.into_iter().skip(1));
    }
    if args.get(1).is_some_and(|a| a == "machine-tokend") {
        std::process::exit(botauth::cli::machine_tokend(args.into_iter().skip(1)));
    }
    let cli: Cli = goflags::parse_from(args);
    init_logging();
    match cli.cmd {
        Cmd::CheckConfig { file } => match coordinator::config::load(&file) {
            Ok(c) => {
                println!(
                    "{}: ok ({} repos, {} host types, {} builders)",
                    file.display(),
                    c.repos.len(),
                    c.hosts.len(),
                    c.builders.len()
                );
                Ok(())
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        },
        Cmd::Genbuilderkey {
            host_type,
            data_dir,
        } => {
            let m = coordinator::keys::MasterKey::load(&data_dir)
                .with_context(|| format!("no farm master key in {} (start the coordinator once to create it, or pass --data-dir)", data_dir.display()))?;
            println!("{}", m.builder_key(&host_type));
            Ok(())
        }
        Cmd::Buildlet { .. }
        | Cmd::Stage0 { .. }
        | Cmd::Bootstrapswarm { .. }
        | Cmd::Genbotcert { .. }
        | Cmd::MachineTokend { .. }
        | Cmd::Gomote { .. } => {
            unreachable!("handled before parsing")
        }
        Cmd::Request(r) => coordinator::admin_cli::run_request(r),
        Cmd::Ca(c) => coordinator::admin_cli::run_ca(c),
        Cmd::Store(c) => coordinator::store_cli::run_store(c),
        Cmd::User(u) => coordinator::admin_cli::run_user(u),
        Cmd::Secret(c) => coordinator::secret_cli::run_secret(c),
        Cmd::Build(b) => match coordinator::build_cli::run_build(b) {
            Ok(0) => Ok(()),
            Ok(code) => std::process::exit(code),
            // 1 means "the build failed": anything else that went wrong is 2.
            Err(e) => {
                eprintln!("Error: {e:#}");
                std::process::exit(2)
            }
        },
        Cmd::Up {
            data_dir,
            listen,
            ssh_listen,
        } => {
            let config =
                coordinator::demo::prepare(&data_dir).context("preparing the demo farm")?;
            coordinator::release::publish_for_demo(&data_dir)
                .context("publishing this executable as the demo's buildlet")?;
            serve(RunOptions {
                data_dir,
                config,
                listen,
                allow_plaintext: false,
                tls_cert: None,
                tls_key: None,
                local_buildlet: None,
                ssh_listen: Some(ssh_listen),
                store: None,
            })
        }
        Cmd::Serve {
            config,
            data_dir,
            listen,
            tls_cert,
            tls_key,
            insecure_plaintext_reverse,
            ssh_listen,
            database_url,
        } => {
            // A flag wins over the config's [serve]; a config with errors
            // is reported by the start itself.
            let file = coordinator::config::load(&config)
                .map(|c| c.serve)
                .unwrap_or_default();
            let store = match database_url {
                Some(u) => Some(
                    coordinator::store::Location::parse(&u)
                        .map_err(|e| anyhow::anyhow!("--database-url: {e}"))?,
                ),
                None => file.store,
            };
            serve(RunOptions {
                store,
                data_dir: data_dir
                    .or(file.data_dir)
                    .unwrap_or_else(|| PathBuf::from("farmer-data")),
                config,
                listen: listen
                    .or(file.listen)
                    .unwrap_or_else(|| "127.0.0.1:8080".to_string()),
                allow_plaintext: insecure_plaintext_reverse,
                tls_cert,
                tls_key,
                local_buildlet: None,
                ssh_listen: ssh_listen.or(file.ssh_listen),
            })
        }
    }
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FARMER_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,sqlx=warn,hyper=warn")
            }),
        )
        .with_writer(std::io::stderr)
        .try_init()
        .ok();
}

fn serve(opts: RunOptions) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let data_dir = opts.data_dir.clone();
    rt.block_on(coordinator::run::run(
        opts,
        |s: &Started| print_banner(s, &data_dir),
        shutdown_signal(),
    ))
}

/// Prints where everything is. Write errors are ignored: a supervisor or a
/// test may close stdout after reading the first line, and the farm must keep
/// running (println! would panic on the broken pipe).
fn print_banner(s: &Started, data_dir: &std::path::Path) {
    use std::io::Write;
    let url = format!("http://{}", s.addr);
    let mut text = format!("listening on {}\n", s.addr);
    text.push_str("farmer is running:\n");
    text.push_str(&format!("  dashboard     {url}/\n"));
    text.push_str(&format!("  farm status   {url}/status\n"));
    text.push_str(&format!("  API           {url}/api/builds\n"));
    text.push_str(&format!("  metrics       {url}/metrics\n"));
    if let Some(ssh) = s.farm.ssh_addr() {
        text.push_str(&format!(
            "  gomote ssh    ssh -p {} INSTANCE@HOST\n",
            ssh.rsplit_once(':').map_or("22", |(_, p)| p)
        ));
    }
    text.push_str(&format!(
        "  admin token   {}\n",
        data_dir.join(coordinator::run::ADMIN_TOKEN_FILE).display()
    ));
    // The key pin goes in the commands: it keeps working when the
    // certificate is re-issued with the same key. The certificate pin is
    // listed for machines set up with it and for `openssl x509 -fingerprint`.
    if let (Some(spki), Some(cert)) = (&s.farm.tls_spki_pin, &s.farm.tls_fingerprint) {
        text.push_str(&format!(
            "  TLS key pin   {spki}   (for -tls-pin; survives renewal with the same key)\n"
        ));
        text.push_str(&format!(
            "  TLS cert pin  {cert}   (for -tls-pin; changes with every certificate)\n"
        ));
    }
    if let Some(fp) = &s.farm.tls_spki_pin {
        text.push_str(&format!(
            "  buildlets     buildlet -coordinator={} -reverse-type=HOST-TYPE -tls-pin={fp}\n",
            s.addr
        ));
    }
    if let (Some(fp), Some(key)) = (&s.farm.tls_spki_pin, s.farm.releases.public_key()) {
        text.push_str(&format!(
            "  stage0        stage0 -coordinator={} -reverse-type=HOST-TYPE -tls-pin={fp} -release-key={key}\n",
            s.addr
        ));
    }
    text.push_str("Press Ctrl-C to stop.\n");
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
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
