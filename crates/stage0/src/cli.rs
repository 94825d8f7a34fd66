//! The `stage0` command line (also `farmer stage0`).
//!
//! Settings come from flags, then environment variables, then a small TOML
//! config file (`-config=FILE` or `$FARMER_STAGE0_CONFIG`), so an image can
//! bake one file and a supervisor unit stays one line. `$GO_BUILDER_ENV`
//! (the Go farm's variable) sets the host type.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use crate::{Config, Platform, ReleaseKey, Tls};

/// stage0: keeps this machine on the farm's current buildlet.
///
/// Downloads the buildlet published for this machine's OS and architecture
/// from the coordinator, checks its SHA-256 and the Ed25519 signature of the
/// farm's release key, and runs it in reverse mode. A new version is only
/// downloaded when its digest differs from the binary on disk; if the
/// coordinator is unreachable or offers something that does not verify, the
/// last good binary is run. Without -loop it exits with the buildlet's
/// status, for a supervisor (systemd, launchd) to start it again.
#[derive(Parser, Debug, Default)]
#[command(name = "stage0", version, about, long_about, after_help = EXAMPLES)]
pub struct Cli {
    /// TOML file with any of these settings (keys as the flags, with _ for -).
    #[arg(long, value_name = "FILE", env = "FARMER_STAGE0_CONFIG")]
    config: Option<PathBuf>,

    /// The coordinator, HOST[:PORT] (port 443 if omitted); several comma-separated (a leader and its standby): releases come from the first that answers, and the buildlet gets them all.
    #[arg(long, value_name = "HOST[:PORT]", env = "FARMER_COORDINATOR")]
    coordinator: Option<String>,

    /// The farm's release public key (hex, printed by `farmer buildlet
    /// publish` and served at /stage0/release-key). Only binaries it signed run.
    #[arg(long = "release-key", value_name = "HEX", env = "FARMER_RELEASE_KEY")]
    release_key: Option<String>,

    /// File holding the release public key (instead of -release-key).
    #[arg(
        long = "release-key-file",
        value_name = "FILE",
        conflicts_with = "release_key"
    )]
    release_key_file: Option<PathBuf>,

    /// Directory for the buildlet binary and its manifest. Default: ~/.farmer-stage0.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,

    /// Host type passed to the buildlet as -reverse-type.
    #[arg(
        long = "reverse-type",
        value_name = "HOST-TYPE",
        env = "GO_BUILDER_ENV"
    )]
    reverse_type: Option<String>,

    /// Host name passed to the buildlet as -hostname.
    #[arg(long, value_name = "NAME")]
    hostname: Option<String>,

    /// Work dir passed to the buildlet as -workdir (it is emptied at start).
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,

    /// Builder key file passed to the buildlet as -key-file.
    #[arg(long = "key-file", value_name = "FILE")]
    key_file: Option<PathBuf>,

    /// Machine token file passed to the buildlet as -token-file (certificate path).
    #[arg(long = "token-file", value_name = "FILE")]
    token_file: Option<PathBuf>,

    /// Trust exactly the coordinator key (spki-sha256:HEX) or certificate
    /// (HEX) this pin names, as printed at its start (also passed to the buildlet).
    #[arg(long = "tls-pin", value_name = "SHA256")]
    tls_pin: Option<String>,

    /// Verify the coordinator against the CA certificates in this PEM file.
    #[arg(long = "ca-file", value_name = "FILE", conflicts_with = "tls_pin")]
    ca_file: Option<PathBuf>,

    /// Talk to the coordinator without TLS (loopback tests and demos only).
    #[arg(long = "insecure-plaintext", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    insecure_plaintext: Option<bool>,

    /// How long to wait for the network at start (e.g. 30s, 5m).
    #[arg(long = "network-wait", value_name = "DURATION")]
    network_wait: Option<String>,

    /// Keep running: after the buildlet exits, check for a new version and
    /// run it again (instead of exiting with its status).
    #[arg(long = "loop", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    run_loop: Option<bool>,

    /// Fetch the binary of another platform (OS/ARCH) than this one, e.g. a
    /// 32-bit userland on a 64-bit kernel.
    #[arg(long, value_name = "OS/ARCH")]
    platform: Option<String>,

    /// Download and verify the buildlet, print its path, and exit without running it.
    #[arg(long = "fetch-only", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    fetch_only: Option<bool>,

    /// More flags for the buildlet, after `--`.
    #[arg(last = true, value_name = "BUILDLET-ARGS")]
    buildlet_args: Vec<String>,
}

const EXAMPLES: &str = "\
Examples:
  stage0 -coordinator=farm.example:443 -reverse-type=host-linux-amd64-alice \\
         -release-key=$(curl -s https://farm.example/stage0/release-key)
  stage0 -config=/etc/farmer/stage0.toml -loop
  GO_BUILDER_ENV=host-linux-amd64-alice stage0 -coordinator=farm.example -release-key-file=/etc/farmer/release.pub

Config file (TOML; flags and environment variables win over it):
  coordinator = \"farm.example:443\"
  release_key = \"<64 hex digits>\"
  reverse_type = \"host-linux-amd64-alice\"
  hostname = \"alice-1\"
  key_file = \"/etc/farmer/builder.key\"
  workdir = \"/var/lib/farmer/workdir\"
  dir = \"/var/lib/farmer/stage0\"
  tls_pin = \"spki-sha256:<hex printed by the coordinator>\"   # or ca_file = \"...\"
  network_wait = \"2m\"
  buildlet_args = [\"-max-body=8589934592\"]";

/// The config file's keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    coordinator: Option<String>,
    release_key: Option<String>,
    release_key_file: Option<PathBuf>,
    dir: Option<PathBuf>,
    reverse_type: Option<String>,
    hostname: Option<String>,
    workdir: Option<PathBuf>,
    key_file: Option<PathBuf>,
    token_file: Option<PathBuf>,
    tls_pin: Option<String>,
    ca_file: Option<PathBuf>,
    insecure_plaintext: Option<bool>,
    network_wait: Option<String>,
    #[serde(rename = "loop")]
    run_loop: Option<bool>,
    platform: Option<String>,
    buildlet_args: Option<Vec<String>>,
}

/// What to do, after reading flags, environment and config file.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub config: Config,
    pub run_loop: bool,
    pub fetch_only: bool,
}

/// Parses `90s`, `1m30s`, `2m`, `1h`, `500ms` or a number of seconds (the
/// parser every farmer program shares).
pub fn parse_duration(s: &str) -> Option<Duration> {
    goflags::duration::parse_lenient(s).ok()
}

fn default_dir() -> PathBuf {
    std::env::var_os("HOME")
        .or_else(|| std::env::var_os("USERPROFILE"))
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".farmer-stage0"))
        .unwrap_or_else(|| PathBuf::from("farmer-stage0"))
}

impl Cli {
    /// Merges flags (and their environment variables) over the config file.
    pub fn resolve(self) -> Result<Resolved, String> {
        let file: FileConfig = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("config file {}: {e}", p.display()))?;
                toml::from_str(&text).map_err(|e| format!("config file {}: {e}", p.display()))?
            }
            None => FileConfig::default(),
        };
        let coordinator = self.coordinator.or(file.coordinator).ok_or(
            "no coordinator: pass -coordinator=HOST[:PORT] (or coordinator = \"...\" in the config file)",
        )?;
        let key_text = match (self.release_key, self.release_key_file) {
            (Some(k), _) => k,
            (None, Some(f)) => std::fs::read_to_string(&f)
                .map_err(|e| format!("-release-key-file {}: {e}", f.display()))?,
            (None, None) => match (file.release_key, file.release_key_file) {
                (Some(k), _) => k,
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .map_err(|e| format!("release_key_file {}: {e}", f.display()))?,
                (None, None) => {
                    return Err("no release key: pass -release-key=HEX (the farm admin has it: `farmer buildlet publish` prints it, and the coordinator serves it at /stage0/release-key); stage0 runs only binaries signed by it".into());
                }
            },
        };
        let release_key = ReleaseKey::parse(&key_text)?;
        let plaintext = self
            .insecure_plaintext
            .or(file.insecure_plaintext)
            .unwrap_or(false);
        let pin = self.tls_pin.or(if self.ca_file.is_some() {
            None
        } else {
            file.tls_pin
        });
        let ca = self.ca_file.or(file.ca_file);
        let tls = if plaintext {
            Tls::Plaintext
        } else if let Some(p) = pin {
            Tls::Pinned(
                crate::http::parse_pin(&p)
                    .ok_or_else(|| format!("-tls-pin={p:?} is not {}", farmtls::PIN_FORMS))?,
            )
        } else if let Some(ca) = ca {
            Tls::CaFile(ca)
        } else {
            Tls::WebPki
        };
        let dir = self.dir.or(file.dir).unwrap_or_else(default_dir);
        let mut config = Config::new(&coordinator, tls, release_key, dir);
        if let Some(p) = self.platform.or(file.platform) {
            config.platform = Platform::parse_pair(&p)?;
        }
        if let Some(w) = self.network_wait.or(file.network_wait) {
            config.network_wait = parse_duration(&w)
                .ok_or_else(|| format!("network wait {w:?} is not a duration like 30s or 5m"))?;
        }
        config.reverse_type = self
            .reverse_type
            .or(file.reverse_type)
            .filter(|s| !s.is_empty());
        config.hostname = self.hostname.or(file.hostname);
        config.workdir = self.workdir.or(file.workdir);
        config.key_file = self.key_file.or(file.key_file);
        config.token_file = self.token_file.or(file.token_file);
        config.extra_args = file.buildlet_args.unwrap_or_default();
        config.extra_args.extend(self.buildlet_args);
        if config.reverse_type.is_none() && config.token_file.is_none() {
            return Err("no host type: pass -reverse-type=HOST-TYPE (or set GO_BUILDER_ENV), or -token-file=FILE for a bot with a machine certificate".into());
        }
        Ok(Resolved {
            config,
            run_loop: self.run_loop.or(file.run_loop).unwrap_or(false),
            fetch_only: self.fetch_only.unwrap_or(false),
        })
    }
}

/// Runs stage0 with explicit arguments (the first is the program name) and
/// returns the process exit code.
pub fn main_from<I, A>(args: I) -> i32
where
    I: IntoIterator<Item = A>,
    A: Into<std::ffi::OsString>,
{
    let cli: Cli = goflags::parse_from(args);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STAGE0_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init()
        .ok();
    let r = match cli.resolve() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("stage0: {e}");
            return 2;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stage0: starting the runtime: {e}");
            return 1;
        }
    };
    tracing::info!(
        coordinator = %r.config.coordinator,
        platform = %r.config.platform,
        dir = %r.config.dir.display(),
        release_key = %r.config.release_key,
        "stage0 {} starting",
        env!("CARGO_PKG_VERSION")
    );
    rt.block_on(async {
        if r.fetch_only {
            return match crate::ensure_buildlet(&r.config).await {
                Ok(i) => {
                    println!("{}", i.path.display());
                    0
                }
                Err(e) => {
                    tracing::error!("{e}");
                    2
                }
            };
        }
        if r.run_loop {
            crate::run_loop(&r.config).await
        } else {
            crate::run_once(&r.config).await
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> String {
        ReleaseKey::from_signing(&ed25519_dalek::SigningKey::from_bytes(&[3; 32])).to_string()
    }

    fn parse(args: &[&str]) -> Result<Resolved, String> {
        let mut v = vec!["stage0".to_string()];
        v.extend(args.iter().map(|s| s.to_string()));
        let cli: Cli = goflags::parse_from(v);
        cli.resolve()
    }

    #[test]
    fn flags_go_style() {
        let k = key();
        let r = parse(&[
            "-coordinator=farm.example:8443",
            &format!("-release-key={k}"),
            "-reverse-type=host-a",
            "-hostname=h1",
            "-insecure-plaintext",
            "-loop",
            "-network-wait=2m",
            "-dir=/tmp/s0",
            "--",
            "-max-body=5",
        ])
        .unwrap();
        assert!(r.run_loop);
        assert_eq!(r.config.tls, Tls::Plaintext);
        assert_eq!(r.config.network_wait, Duration::from_secs(120));
        assert_eq!(r.config.extra_args, vec!["-max-body=5"]);
        assert_eq!(r.config.coordinator, "farm.example:8443");
        assert_eq!(r.config.dir, PathBuf::from("/tmp/s0"));
    }

    #[test]
    fn config_file_and_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s0.toml");
        std::fs::write(
            &f,
            format!(
                "coordinator = \"farm.example\"\nrelease_key = \"{}\"\nreverse_type = \"host-file\"\ntls_pin = \"{}\"\nloop = true\nbuildlet_args = [\"-a\"]\n",
                key(),
                "cd".repeat(32)
            ),
        )
        .unwrap();
        let r = parse(&[
            &format!("-config={}", f.display()),
            "-reverse-type=host-flag",
        ])
        .unwrap();
        assert_eq!(r.config.coordinator, "farm.example:443");
        assert_eq!(r.config.reverse_type.as_deref(), Some("host-flag"));
        assert_eq!(r.config.tls, Tls::Pinned(farmtls::Pin::Cert([0xcd; 32])));
        assert!(r.run_loop);
        assert_eq!(r.config.extra_args, vec!["-a"]);

        std::fs::write(&f, "coordinator = \"x\"\nbogus = 1\n").unwrap();
        let e = parse(&[&format!("-config={}", f.display())]).unwrap_err();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn missing_settings_say_what_to_do() {
        let e = parse(&["-reverse-type=h"]).unwrap_err();
        assert!(e.contains("-coordinator"), "{e}");
        let e = parse(&["-coordinator=x", "-reverse-type=h"]).unwrap_err();
        assert!(e.contains("-release-key"), "{e}");
        let e = parse(&["-coordinator=x", "-reverse-type=h", "-release-key=abc"]).unwrap_err();
        assert!(e.contains("not an Ed25519"), "{e}");
        let e = parse(&[
            "-coordinator=x",
            &format!("-release-key={}", key()),
            "-tls-pin=zz",
            "-reverse-type=h",
        ])
        .unwrap_err();
        assert!(e.contains("-tls-pin"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        // Go's compound form, as the coordinator's config and the buildlet
        // accept it (stage0 once refused it).
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("-1s"), None);
    }
}
