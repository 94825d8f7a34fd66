//! `genbuilderkey HOST-TYPE`: prints the builder key a machine of that host
//! type presents to this farm. Reads the master key from the data dir.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Print the builder key for a host type.
///
/// The owner stores it in ~/.gobuildkey-HOST-TYPE (or ~/.gobuildkey, or the
/// file named by $GO_BUILD_KEY_PATH) on the machine.
#[derive(Parser, Debug)]
#[command(name = "genbuilderkey", version, about, long_about)]
struct Cli {
    /// The host type, e.g. host-linux-amd64-alice.
    host_type: String,
    /// The coordinator's data dir (holds master.key).
    #[arg(
        long = "data-dir",
        env = "FARMER_DATA_DIR",
        default_value = "farmer-data"
    )]
    data_dir: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli: Cli = goflags::parse();
    let m = coordinator::keys::MasterKey::load(&cli.data_dir).with_context(|| {
        format!(
            "no farm master key in {} (start the coordinator once to create it, or pass -data-dir)",
            cli.data_dir.display()
        )
    })?;
    println!("{}", m.builder_key(&cli.host_type));
    Ok(())
}
