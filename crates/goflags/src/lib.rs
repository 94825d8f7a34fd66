//! Go-style flags for clap CLIs.
//!
//! The commands machine owners copy from the Go wiki are written with Go's flag
//! syntax: a single dash before long names (`-coordinator=HOST`,
//! `-reverse-type=host-foo-bar`, `-reboot=false`). clap only accepts `--long`.
//! [`normalize`] rewrites `-name[=value]` into `--name[=value]` for every long
//! flag the clap command actually defines, so both spellings work and nothing
//! else on the command line (negative numbers, a command's own arguments after
//! `--`, unknown single-dash words) is touched.
//!
//! Boolean flags that should accept Go's `-flag`, `-flag=true` and
//! `-flag=false` forms are declared with [`go_bool`].

pub mod duration;

use std::collections::HashSet;
use std::ffi::OsString;

use clap::{ArgAction, CommandFactory, FromArgMatches};

/// Parses the process arguments into `T`, accepting Go-style single-dash long flags.
pub fn parse<T: CommandFactory + FromArgMatches>() -> T {
    parse_from(std::env::args_os())
}

/// Like [`parse`], from an explicit argument list (the first item is the program name).
pub fn parse_from<T, I, A>(args: I) -> T
where
    T: CommandFactory + FromArgMatches,
    I: IntoIterator<Item = A>,
    A: Into<OsString>,
{
    let mut cmd = T::command();
    let args = normalize(args, &cmd);
    let matches = cmd.clone().get_matches_from(args);
    T::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut cmd).exit())
}

/// Rewrites `-name` / `-name=value` into `--name` / `--name=value` when `name` is
/// a long flag of `cmd` or of any of its subcommands. Stops at `--`.
pub fn normalize<I, A>(args: I, cmd: &clap::Command) -> Vec<OsString>
where
    I: IntoIterator<Item = A>,
    A: Into<OsString>,
{
    let mut names = HashSet::new();
    collect_long_names(cmd, &mut names);
    let mut out = Vec::new();
    let mut done = false;
    for (i, arg) in args.into_iter().enumerate() {
        let arg: OsString = arg.into();
        if i == 0 || done {
            out.push(arg);
            continue;
        }
        if arg == "--" {
            done = true;
            out.push(arg);
            continue;
        }
        out.push(rewrite(arg, &names));
    }
    out
}

fn rewrite(arg: OsString, names: &HashSet<String>) -> OsString {
    let Some(s) = arg.to_str() else { return arg };
    let Some(rest) = s.strip_prefix('-') else {
        return arg;
    };
    if rest.starts_with('-') {
        return arg;
    }
    let name = rest.split_once('=').map_or(rest, |(n, _)| n);
    if name.len() > 1 && names.contains(name) {
        OsString::from(format!("-{s}"))
    } else {
        arg
    }
}

fn collect_long_names(cmd: &clap::Command, names: &mut HashSet<String>) {
    for arg in cmd.get_arguments() {
        if let Some(long) = arg.get_long() {
            names.insert(long.to_string());
        }
        if let Some(aliases) = arg.get_all_aliases() {
            names.extend(aliases.into_iter().map(str::to_string));
        }
    }
    names.insert("help".into());
    names.insert("version".into());
    for sub in cmd.get_subcommands() {
        collect_long_names(sub, names);
    }
}

/// Configures a boolean flag the way Go's `flag` package reads it: `-x` and
/// `-x=true` set it, `-x=false` clears it. Use as `#[arg(long, default_value_t = D)]`
/// plus `#[arg(num_args = 0..=1, require_equals = true, default_missing_value = "true")]`,
/// or build the arg with this helper when constructing commands by hand.
pub fn go_bool(arg: clap::Arg, default: bool) -> clap::Arg {
    arg.action(ArgAction::Set)
        .num_args(0..=1)
        .require_equals(true)
        .default_missing_value("true")
        .default_value(if default { "true" } else { "false" })
        .value_parser(clap::value_parser!(bool))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[arg(long)]
        coordinator: Option<String>,
        #[arg(long = "reverse-type")]
        reverse_type: Option<String>,
        #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = true)]
        reboot: bool,
        #[arg(short = 'n', allow_negative_numbers = true)]
        n: Option<i64>,
        rest: Vec<String>,
    }

    #[test]
    fn single_and_double_dash_are_equivalent() {
        let a: Cli = parse_from([
            "buildlet",
            "-coordinator=farm:443",
            "-reverse-type=host-foo-bar",
            "-reboot=false",
        ]);
        let b: Cli = parse_from([
            "buildlet",
            "--coordinator",
            "farm:443",
            "--reverse-type=host-foo-bar",
            "--reboot=false",
        ]);
        assert_eq!(a.coordinator.as_deref(), Some("farm:443"));
        assert_eq!(a.reverse_type, b.reverse_type);
        assert!(!a.reboot && !b.reboot);
    }

    #[test]
    fn go_bool_forms() {
        let c: Cli = parse_from(["x", "-reboot"]);
        assert!(c.reboot);
        let c: Cli = parse_from(["x"]);
        assert!(c.reboot);
        let c: Cli = parse_from(["x", "-reboot=false"]);
        assert!(!c.reboot);
    }

    #[test]
    fn leaves_other_words_alone() {
        let c: Cli = parse_from(["x", "-n", "-5", "--", "-coordinator=zzz", "-unknown"]);
        assert_eq!(c.n, Some(-5));
        assert_eq!(c.rest, vec!["-coordinator=zzz", "-unknown"]);
        assert!(c.coordinator.is_none());
    }
}
