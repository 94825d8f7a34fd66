//! `machine-tokend`: trades the machine certificate for a short-lived token
//! and keeps the token file fresh. Run it from cron every 10 minutes, or
//! with `-loop`.

fn main() {
    std::process::exit(botauth::cli::machine_tokend(std::env::args_os()));
}
