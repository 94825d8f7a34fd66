//! `bootstrapswarm -hostname NAME`: downloads the bot and keeps it running,
//! authenticated by the machine token from `machine-tokend`.

fn main() {
    std::process::exit(stage0::bootstrapswarm::main_from(std::env::args_os()));
}
