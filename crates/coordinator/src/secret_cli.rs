//! `farmer secret set|list`: putting the farm's secrets where `[secrets]`
//! says they are, without ever printing them.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;

use crate::secrets;

#[derive(Subcommand, Debug)]
pub enum SecretCmd {
    /// Store a secret's value, read from standard input, as
    /// DATA_DIR/secrets/NAME (mode 0600). Declare it in the config with
    /// `[secrets] NAME = {}` and reference it as "secret:NAME"; then reload.
    ///
    /// Example: printf %s "$TOKEN" | farmer secret set pypi-token
    Set {
        /// The secret's name (letters, digits, '-', '_', '.').
        name: String,
        #[arg(long = "data-dir", default_value = "farmer-data")]
        data_dir: PathBuf,
    },
    /// List the secrets a config declares, where each is read from and
    /// whether it can be read now. Never prints a value.
    List {
        /// The farm config (TOML).
        #[arg(long)]
        config: PathBuf,
        #[arg(long = "data-dir", default_value = "farmer-data")]
        data_dir: PathBuf,
    },
}

pub fn run_secret(cmd: SecretCmd) -> anyhow::Result<()> {
    match cmd {
        SecretCmd::Set { name, data_dir } => {
            let mut value = String::new();
            std::io::stdin()
                .take(secrets::MAX_LEN as u64 + 2)
                .read_to_string(&mut value)
                .context("reading the value from standard input")?;
            let path = secrets::store(&data_dir, &name, &value).map_err(anyhow::Error::msg)?;
            println!("stored secret {name} in {} (mode 0600)", path.display());
            Ok(())
        }
        SecretCmd::List { config, data_dir } => {
            let cfg = match crate::config::load(&config) {
                Ok(c) => c,
                Err(e) => bail!("the config has errors:\n{e}"),
            };
            if cfg.secrets.is_empty() {
                println!("no secrets are declared in {}", config.display());
                return Ok(());
            }
            let mut bad = 0;
            for (name, source) in &cfg.secrets {
                let one = std::collections::BTreeMap::from([(name.clone(), source.clone())]);
                let state = match secrets::Secrets::load(&one, &data_dir) {
                    Ok(_) => "ok".to_string(),
                    Err(e) => {
                        bad += 1;
                        format!("NOT READABLE: {e}")
                    }
                };
                let from = source.describe(name, &data_dir);
                println!("{name}\t{from}\t{state}");
            }
            if bad > 0 {
                bail!("{bad} secret(s) cannot be read");
            }
            Ok(())
        }
    }
}
