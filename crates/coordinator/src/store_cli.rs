//! `farmer store`: moving a farm's store between engines.

use anyhow::{Context, bail};
use clap::Subcommand;

use crate::store::{Engine, Location, Store};

#[derive(Subcommand, Debug)]
pub enum StoreCmd {
    /// Copy a farm's whole history (builds, attempts, steps and their logs,
    /// commits, machine certificates, requests, users, gomote, forge state)
    /// from one store to a PostgreSQL database, then check every table's
    /// count. Stop the coordinator first. A copy cut short can be run again:
    /// rows already there are kept. Then start `farmer serve
    /// --database-url postgres://…` (or set `[store] url`).
    ///
    /// Example: farmer store migrate --from sqlite:farmer-data/farmer.db
    ///          --to postgres://farmer@db.example:5432/farm
    Migrate {
        /// The store to copy: sqlite:PATH (the data dir's farmer.db) or postgres://…
        #[arg(long)]
        from: String,
        /// The PostgreSQL database to fill (it must exist; its tables are created).
        /// A password is better given by FARMER_DATABASE_URL or PGPASSWORD.
        #[arg(long, env = "FARMER_DATABASE_URL", hide_env_values = true)]
        to: String,
        /// Where the source farm kept its finished logs: its data dir's
        /// `artifacts/`. Default: `artifacts/` beside the SQLite file.
        #[arg(long = "from-artifacts")]
        from_artifacts: Option<std::path::PathBuf>,
    },
}

pub fn run_store(cmd: StoreCmd) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cmd {
        StoreCmd::Migrate {
            from,
            to,
            from_artifacts,
        } => rt.block_on(migrate(&from, &to, from_artifacts)),
    }
}

async fn migrate(
    from: &str,
    to: &str,
    from_artifacts: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let from = Location::parse(from).map_err(|e| anyhow::anyhow!("--from: {e}"))?;
    let to = Location::parse(to).map_err(|e| anyhow::anyhow!("--to: {e}"))?;
    if to.engine() != Engine::Postgres {
        bail!("--to must be a PostgreSQL database (postgres://USER:PASSWORD@HOST:PORT/DATABASE)");
    }
    if from == to {
        bail!("--from and --to are the same store");
    }
    if let Location::Sqlite(p) = &from
        && !p.is_file()
    {
        bail!(
            "--from: {} does not exist (the SQLite store is DATA_DIR/farmer.db)",
            p.display()
        );
    }
    let mut src = Store::connect(&from)
        .await
        .with_context(|| format!("opening {from}"))?;
    // A SQLite farm keeps its finished logs in its data dir's artifact
    // store (beside farmer.db); they are copied into the destination's rows.
    let artifacts = match (&from_artifacts, &from) {
        (Some(d), _) => {
            if !d.is_dir() {
                bail!("--from-artifacts: {} is not a directory", d.display());
            }
            Some(d.clone())
        }
        (None, Location::Sqlite(p)) => Some(
            p.parent()
                .unwrap_or(std::path::Path::new("."))
                .join(crate::release::ARTIFACTS_DIR),
        )
        .filter(|d| d.is_dir()),
        (None, _) => None,
    };
    if let Some(dir) = &artifacts {
        src = src.with_blobs(
            std::sync::Arc::new(crate::artifacts::LocalDir::new(dir.clone())),
            false,
        );
    }
    let dst = Store::connect(&to)
        .await
        .with_context(|| format!("opening {to}"))?;
    eprintln!("copying {from} to {to}");
    let copied = src
        .copy_to(&dst, |table, n| {
            // Batches are 200 rows: about every 10,000.
            if n > 0 && n % 10_000 < 200 {
                eprintln!("  {table}: {n} rows so far");
            }
        })
        .await
        .context("copying the store")?;
    let mut total = 0;
    for c in &copied {
        let removed = if c.removed > 0 {
            format!(", {} gone from the source removed", c.removed)
        } else {
            String::new()
        };
        println!(
            "{:<22} {:>9} rows ({} new{removed})",
            c.table,
            c.destination,
            c.added()
        );
        total += c.destination;
    }
    println!(
        "done: {total} rows in {} tables; every count matches",
        copied.len()
    );
    let missing: u64 = copied.iter().map(|c| c.missing_logs).sum();
    if missing > 0 {
        bail!(
            "{missing} finished logs were not found in {}: their rows were copied without them (their pages say so). If the old farm kept them elsewhere, run again with --from-artifacts DATA_DIR/artifacts",
            artifacts.map_or("(no artifact directory)".into(), |d| d
                .display()
                .to_string())
        );
    }
    Ok(())
}
