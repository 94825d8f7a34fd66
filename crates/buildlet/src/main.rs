//! `buildlet`: the agent a build machine runs. See `buildlet --help`.

fn main() -> anyhow::Result<()> {
    buildlet::cli::main()
}
