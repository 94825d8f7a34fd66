//! `stage0`: keeps this machine on the farm's current buildlet. See `stage0 --help`.

fn main() {
    std::process::exit(stage0::cli::main_from(std::env::args_os()));
}
