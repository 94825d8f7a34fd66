//! `gomote`: the same as `farmer gomote` (see `gomote --help`).

fn main() {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.is_empty() {
        args.push("gomote".into());
    }
    std::process::exit(coordinator::gomote::cli::main_from(args));
}
