//! Farm config parsing and validation: values, defaults, and errors that point
//! at the right line and field.

use std::path::{Path, PathBuf};
use std::time::Duration;

use coordinator::config::{self, ConfigError, FarmConfig, PoolKind};

const EXAMPLE: &str = r#"[farm]
min_buildlet_version = 1
max_attempts = 3

[repos.sample]
url = "sample-repo"          # relative to the config file
branches = ["main"]
poll_interval = "5s"

[hosts.host-linux-amd64-local]
pool = "local"
count = 2
expected = 2
owners = ["farm-admin@example.com"]
notes = "Two local buildlets started by the coordinator."
trusted = true
env = { CC = "cc" }
dimensions = { os = "linux", arch = "amd64" }

[builders.linux-amd64]
host = "host-linux-amd64-local"
repos = ["sample"]
timeout = "10m"
presubmit = true
env = { GOFLAGS = "-v" }
[[builders.linux-amd64.steps]]
name = "build"
run = "sh build.sh"
timeout = "2m"
[[builders.linux-amd64.steps]]
name = "test"
command = ["sh", "test.sh", "-v"]
dir = "."
"#;

const FILE: &str = "/etc/farm/farm.toml";

fn parse(text: &str) -> Result<FarmConfig, Vec<ConfigError>> {
    config::parse(Path::new(FILE), text).map_err(|e| e.0)
}

fn errors(text: &str) -> Vec<ConfigError> {
    match parse(text) {
        Ok(c) => panic!("expected errors, parsed {c:#?}"),
        Err(errors) => errors,
    }
}

/// The only error of `text`, as (line, column, field, message).
fn only(text: &str) -> (usize, usize, String, String) {
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
    let e = errs.into_iter().next().unwrap();
    assert_eq!(e.file, Path::new(FILE));
    (e.line, e.column, e.field, e.message)
}

/// (line, field) of every error, for tests about many errors.
fn lines_and_fields(text: &str) -> Vec<(usize, String)> {
    errors(text)
        .into_iter()
        .map(|e| (e.line, e.field))
        .collect()
}

/// A minimal valid farm that tests extend with one broken piece.
const BASE: &str = r#"[repos.sample]
url = "https://example.com/sample.git"
branches = ["main", "release"]

[hosts.host-linux-amd64-local]
pool = "local"
trusted = true

[builders.linux-amd64]
host = "host-linux-amd64-local"
[[builders.linux-amd64.steps]]
name = "build"
run = "make"
"#;

#[test]
fn example_parses_with_the_right_values() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("farm.toml");
    std::fs::write(&file, EXAMPLE).unwrap();
    let c = config::load(&file).unwrap();

    assert_eq!(c.path, file);
    assert_eq!(c.farm.min_buildlet_version, 1);
    assert_eq!(c.farm.max_attempts, 3);
    assert_eq!(c.farm.heartbeat, Duration::from_secs(10));
    assert_eq!(c.farm.heartbeat_timeout, Duration::from_secs(30));

    let repo = &c.repos["sample"];
    assert_eq!(repo.name, "sample");
    assert_eq!(PathBuf::from(&repo.url), dir.path().join("sample-repo"));
    assert!(Path::new(&repo.url).is_absolute());
    assert_eq!(repo.branches, ["main"]);
    assert_eq!(repo.poll_interval, Duration::from_secs(5));

    let host = &c.hosts["host-linux-amd64-local"];
    assert_eq!(host.name, "host-linux-amd64-local");
    assert_eq!(host.pool, PoolKind::Local);
    assert_eq!(host.expected, 2);
    assert_eq!(host.local_count, 2);
    assert_eq!(host.owners, ["farm-admin@example.com"]);
    assert_eq!(
        host.notes,
        "Two local buildlets started by the coordinator."
    );
    assert!(host.trusted);
    assert_eq!(host.env, [("CC".to_owned(), "cc".to_owned())]);
    assert_eq!(host.dimensions["os"], "linux");
    assert_eq!(host.dimensions["arch"], "amd64");

    let b = &c.builders["linux-amd64"];
    assert_eq!(b.name, "linux-amd64");
    assert_eq!(b.host_type, "host-linux-amd64-local");
    assert_eq!(b.repos, ["sample"]);
    assert!(b.branches.is_empty());
    assert_eq!(b.timeout, Duration::from_secs(600));
    assert!(b.presubmit);
    assert_eq!(b.env, [("GOFLAGS".to_owned(), "-v".to_owned())]);
    assert_eq!(b.notes, "");
    assert_eq!(b.steps.len(), 2);
    assert_eq!(b.steps[0].name, "build");
    assert_eq!(b.steps[0].command, ["sh", "-c", "sh build.sh"]);
    assert_eq!(b.steps[0].timeout, Duration::from_secs(120));
    assert_eq!(b.steps[0].dir, None);
    assert_eq!(b.steps[1].name, "test");
    assert_eq!(b.steps[1].command, ["sh", "test.sh", "-v"]);
    assert_eq!(b.steps[1].dir.as_deref(), Some("."));
    assert_eq!(b.steps[1].timeout, Duration::from_secs(600));
    assert!(b.steps[1].env.is_empty());
}

#[test]
fn relative_urls_resolve_against_the_config_dir_and_urls_are_kept() {
    let text = r#"
[repos.a]
url = "repos/a"
[repos.b]
url = "../b"
[repos.c]
url = "/srv/git/c"
[repos.d]
url = "https://example.com/d.git"
[repos.e]
url = "git@example.com:org/e.git"
[repos.f]
url = "file:///srv/git/f"
"#;
    let c = parse(text).unwrap();
    assert_eq!(c.repos["a"].url, "/etc/farm/repos/a");
    assert_eq!(c.repos["b"].url, "/etc/farm/../b");
    assert_eq!(c.repos["c"].url, "/srv/git/c");
    assert_eq!(c.repos["d"].url, "https://example.com/d.git");
    assert_eq!(c.repos["e"].url, "git@example.com:org/e.git");
    assert_eq!(c.repos["f"].url, "file:///srv/git/f");

    // A config path without a directory resolves against the working directory.
    let c = config::parse(Path::new("farm.toml"), "[repos.a]\nurl = \"a\"\n").unwrap();
    assert_eq!(
        PathBuf::from(&c.repos["a"].url),
        std::env::current_dir().unwrap().join("a")
    );
}

#[test]
fn empty_file_is_an_empty_farm_with_defaults() {
    let c = parse("").unwrap();
    assert!(c.repos.is_empty() && c.hosts.is_empty() && c.builders.is_empty());
    assert_eq!(c.farm, config::FarmSettings::default());
    assert_eq!(c.farm.min_buildlet_version, 1);
    assert_eq!(c.farm.max_attempts, 3);
    assert_eq!(c.farm.heartbeat, Duration::from_secs(10));
    assert_eq!(c.farm.heartbeat_timeout, Duration::from_secs(30));
    assert_eq!(c.path, Path::new(FILE));
}

#[test]
fn defaults_fill_in_omitted_fields() {
    let text = r#"
[repos.r]
url = "https://example.com/r.git"
[hosts.host-freebsd-amd64-bob]
pool = "reverse"
[hosts.host-linux-amd64-local]
pool = "local"
expected = 3
[builders.b]
host = "host-freebsd-amd64-bob"
steps = [{ name = "all", command = ["./all.bash"] }]
"#;
    let c = parse(text).unwrap();
    assert_eq!(c.repos["r"].branches, ["main"]);
    assert_eq!(c.repos["r"].poll_interval, Duration::from_secs(30));
    let rev = &c.hosts["host-freebsd-amd64-bob"];
    assert_eq!(
        (rev.pool, rev.expected, rev.local_count, rev.trusted),
        (PoolKind::Reverse, 1, 0, false)
    );
    assert!(rev.owners.is_empty() && rev.env.is_empty() && rev.dimensions.is_empty());
    let local = &c.hosts["host-linux-amd64-local"];
    assert_eq!((local.expected, local.local_count), (3, 3));
    let b = &c.builders["b"];
    assert_eq!(b.timeout, Duration::from_secs(30 * 60));
    assert!(!b.presubmit);
    assert_eq!(b.steps[0].timeout, Duration::from_secs(10 * 60));
    assert_eq!(b.steps[0].command, ["./all.bash"]);
}

#[test]
fn durations_accept_strings_and_seconds() {
    let text = r#"
[farm]
heartbeat = "500ms"
heartbeat_timeout = 45
[repos.r]
url = "r"
poll_interval = "1h30m"
"#;
    let c = parse(text).unwrap();
    assert_eq!(c.farm.heartbeat, Duration::from_millis(500));
    assert_eq!(c.farm.heartbeat_timeout, Duration::from_secs(45));
    assert_eq!(c.repos["r"].poll_interval, Duration::from_secs(5400));
}

#[test]
fn env_keeps_file_order() {
    let text = BASE.replace(
        "trusted = true",
        "trusted = true\nenv = { ZED = \"1\", ALPHA = \"2\", GOMAXPROCS = 4 }",
    );
    let c = parse(&text).unwrap();
    let env = &c.hosts["host-linux-amd64-local"].env;
    let keys: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["ZED", "ALPHA", "GOMAXPROCS"]);
    assert_eq!(env[2].1, "4");
}

#[test]
fn builds_matches_repos_and_branches() {
    let text = format!(
        "{BASE}{}",
        r#"
[repos.other]
url = "https://example.com/other.git"

[builders.release-only]
host = "host-linux-amd64-local"
repos = ["sample"]
branches = ["release"]
steps = [{ name = "s", run = "true" }]
"#
    );
    let c = parse(&text).unwrap();
    let all = &c.builders["linux-amd64"];
    assert!(all.builds("sample", "main") && all.builds("other", "main"));
    let rel = &c.builders["release-only"];
    assert!(rel.builds("sample", "release"));
    assert!(!rel.builds("sample", "main"));
    assert!(!rel.builds("other", "release"));

    let names = |repo, branch| {
        c.builders_for(repo, branch)
            .iter()
            .map(|b| b.name.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(names("sample", "release"), ["linux-amd64", "release-only"]);
    assert_eq!(names("sample", "main"), ["linux-amd64"]);
    assert!(
        names("other", "release").is_empty(),
        "other does not watch release"
    );
    assert!(names("nope", "main").is_empty());
}

// ---- errors -------------------------------------------------------------

#[test]
fn syntax_error_has_line_and_column() {
    let (line, column, field, message) = only("[farm]\nmax_attempts = 3\nheartbeat = \"10s\n");
    assert_eq!((line, field.as_str()), (3, ""));
    assert!(column >= 1);
    assert!(message.starts_with("invalid TOML: "), "{message}");

    let (line, _, _, message) = only("[hosts.host-a]\npool = \"local\"\npool = \"reverse\"\n");
    assert_eq!(line, 3);
    assert!(message.contains("duplicate key"), "{message}");
}

#[test]
fn dates_are_rejected_plainly() {
    let (line, _, _, message) = only("[farm]\n\nheartbeat = 1979-05-27\n");
    assert_eq!(line, 3);
    assert!(
        message.contains("dates and times are not used"),
        "{message}"
    );
}

#[test]
fn unknown_keys_everywhere_are_all_reported() {
    let text = r#"colour = "blue"
[farm]
max_attempt = 3
[repos.sample]
url = "x"
brnaches = ["main"]
[hosts.host-linux-amd64-local]
pool = "local"
expect = 2
[builders.linux-amd64]
host = "host-linux-amd64-local"
timout = "1m"
[[builders.linux-amd64.steps]]
name = "build"
run = "make"
cwd = "src"
"#;
    let errs = errors(text);
    let got: Vec<(usize, usize, &str)> = errs
        .iter()
        .map(|e| (e.line, e.column, e.field.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (1, 1, "colour"),
            (3, 1, "farm.max_attempt"),
            (6, 1, "repos.sample.brnaches"),
            (9, 1, "hosts.host-linux-amd64-local.expect"),
            (12, 1, "builders.linux-amd64.timout"),
            (16, 1, "builders.linux-amd64.steps[0].cwd"),
        ]
    );
    assert_eq!(
        errs[2].message,
        "unknown key \"brnaches\" in repo \"sample\"; did you mean \"branches\"? known keys: url, branches, poll_interval, backfill, username, password, password_file, ca_file, forge, notify"
    );
    assert!(
        errs[0]
            .message
            .contains("known keys: farm, serve, repos, hosts, builders"),
        "{}",
        errs[0].message
    );
    assert!(
        errs[5]
            .message
            .starts_with("unknown key \"cwd\" in builder \"linux-amd64\": step \"build\"")
    );
}

#[test]
fn undefined_host_lists_the_defined_ones() {
    let text = BASE.replace(
        "host = \"host-linux-amd64-local\"",
        "host = \"host-linux-arm\"",
    );
    let (line, column, field, message) = only(&text);
    assert_eq!((line, column), (10, 8));
    assert_eq!(field, "builders.linux-amd64.host");
    assert_eq!(
        message,
        "builder \"linux-amd64\": host \"host-linux-arm\" is not defined (defined: host-linux-amd64-local)"
    );
}

#[test]
fn undefined_host_when_no_host_is_defined() {
    let text = "\n[builders.b]\nhost = \"host-x\"\nsteps = [{ name = \"s\", run = \"true\" }]\n";
    let (line, _, field, message) = only(text);
    assert_eq!((line, field.as_str()), (3, "builders.b.host"));
    assert!(message.contains("no hosts are defined"), "{message}");
}

#[test]
fn missing_host_points_at_the_builder() {
    let text = BASE.replace("host = \"host-linux-amd64-local\"\n", "");
    let (line, column, field, message) = only(&text);
    assert_eq!(
        (line, column, field.as_str()),
        (9, 11, "builders.linux-amd64.host")
    );
    assert!(
        message.contains("host is required") && message.contains("defined: host-linux-amd64-local"),
        "{message}"
    );
}

#[test]
fn host_and_builder_names_are_checked() {
    let text = r#"
[hosts.linux-amd64]
pool = "reverse"
[hosts.host-Linux]
pool = "reverse"
[hosts.host-ok]
pool = "reverse"
[builders."Linux AMD64"]
host = "host-ok"
steps = [{ name = "s", run = "true" }]
[builders."linux-amd64.go1_22"]
host = "host-ok"
steps = [{ name = "s", run = "true" }]
"#;
    let errs = errors(text);
    let got: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.field.as_str())).collect();
    assert_eq!(
        got,
        [
            (2, "hosts.linux-amd64"),
            (4, "hosts.host-Linux"),
            (8, "builders.\"Linux AMD64\"")
        ]
    );
    assert!(
        errs[0].message.contains("start with \"host-\""),
        "{}",
        errs[0].message
    );
    assert!(
        errs[2]
            .message
            .contains("lowercase letters, digits, dashes, dots and underscores")
    );
}

#[test]
fn builder_repos_and_branches_must_exist() {
    let text = format!(
        "{BASE}{}",
        r#"
[builders.x]
host = "host-linux-amd64-local"
repos = [
  "sample",
  "missing",
]
branches = ["main", "dev"]
steps = [{ name = "s", run = "true" }]
[builders.y]
host = "host-linux-amd64-local"
branches = ["feature"]
steps = [{ name = "s", run = "true" }]
"#
    );
    let errs = errors(&text);
    let got: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.field.as_str())).collect();
    assert_eq!(
        got,
        [
            (19, "builders.x.repos[1]"),
            (21, "builders.x.branches[1]"),
            (25, "builders.y.branches[0]")
        ]
    );
    assert_eq!(
        errs[0].message,
        "builder \"x\": repo \"missing\" is not defined (defined: sample)"
    );
    assert!(
        errs[1]
            .message
            .contains("branch \"dev\" is not watched by its repos (sample: main, release)")
    );
    assert!(
        errs[2]
            .message
            .contains("branch \"feature\" is not watched by any repo")
    );
}

#[test]
fn builder_needs_steps() {
    let text = "[hosts.host-a]\npool = \"reverse\"\n\n[builders.b]\nhost = \"host-a\"\n";
    let (line, _, field, message) = only(text);
    assert_eq!((line, field.as_str()), (4, "builders.b.steps"));
    assert!(message.contains("has no steps"), "{message}");

    let text =
        "[hosts.host-a]\npool = \"reverse\"\n\n[builders.b]\nhost = \"host-a\"\nsteps = []\n";
    let (line, column, field, _) = only(text);
    assert_eq!((line, column, field.as_str()), (6, 9, "builders.b.steps"));
}

#[test]
fn step_errors() {
    let text = r#"[hosts.host-a]
pool = "reverse"
[builders.b]
host = "host-a"
[[builders.b.steps]]
name = "build"
run = "make"
[[builders.b.steps]]
name = "build"
command = ["make", "test"]
[[builders.b.steps]]
run = "x"
[[builders.b.steps]]
name = ""
run = "x"
[[builders.b.steps]]
name = "both"
run = "x"
command = ["x"]
[[builders.b.steps]]
name = "neither"
[[builders.b.steps]]
name = "empty-command"
command = []
[[builders.b.steps]]
name = "empty-run"
run = "  "
[[builders.b.steps]]
name = "abs"
run = "x"
dir = "/tmp"
[[builders.b.steps]]
name = "escape"
run = "x"
dir = "src/../../etc"
[[builders.b.steps]]
name = "zero"
run = "x"
timeout = "0s"
"#;
    let errs = errors(text);
    let got: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.field.as_str())).collect();
    assert_eq!(
        got,
        [
            (9, "builders.b.steps[1].name"),
            (11, "builders.b.steps[2].name"),
            (14, "builders.b.steps[3].name"),
            (19, "builders.b.steps[4].command"),
            (20, "builders.b.steps[5]"),
            (24, "builders.b.steps[6].command"),
            (27, "builders.b.steps[7].run"),
            (31, "builders.b.steps[8].dir"),
            (35, "builders.b.steps[9].dir"),
            (39, "builders.b.steps[10].timeout"),
        ]
    );
    let messages: Vec<&str> = errs.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(
        messages[0],
        "builder \"b\": step name \"build\" is already used (line 6); step names must be unique within a builder"
    );
    assert!(
        messages[1].contains("step #3: name is required"),
        "{}",
        messages[1]
    );
    assert!(
        messages[2].contains("step #4: name must not be empty"),
        "{}",
        messages[2]
    );
    assert!(messages[3].contains("set either run or command, not both"));
    assert!(messages[4].contains("step \"neither\": needs run"));
    assert!(messages[5].contains("command is empty"));
    assert!(messages[6].contains("run must not be empty"));
    assert!(messages[7].contains("must be relative"));
    assert!(messages[8].contains("must not contain \"..\""));
    assert!(messages[9].contains("greater than zero"));
}

#[test]
fn duration_errors() {
    let text = r#"[farm]
heartbeat = "10 seconds"
heartbeat_timeout = -5
[repos.r]
url = "r"
poll_interval = 1.5
[repos.s]
url = "s"
poll_interval = "15"
"#;
    let errs = errors(text);
    let got: Vec<(usize, usize, &str)> = errs
        .iter()
        .map(|e| (e.line, e.column, e.field.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (2, 13, "farm.heartbeat"),
            (3, 21, "farm.heartbeat_timeout"),
            (6, 17, "repos.r.poll_interval"),
            (9, 17, "repos.s.poll_interval"),
        ]
    );
    assert!(
        errs[0].message.starts_with("duration \"10 seconds\" "),
        "{}",
        errs[0].message
    );
    assert!(errs[0].message.contains("e.g. \"90s\""));
    assert!(errs[1].message.contains("negative"));
    assert_eq!(
        errs[2].message,
        "expected a duration like \"10m\" or a number of seconds, found a float"
    );
    assert!(errs[3].message.contains("without a unit"));
}

#[test]
fn farm_settings_errors() {
    let (line, _, field, message) = only("[farm]\nmax_attempts = 0\n");
    assert_eq!((line, field.as_str()), (2, "farm.max_attempts"));
    assert!(message.contains("at least 1"));

    let (line, _, field, message) =
        only("[farm]\nheartbeat = \"30s\"\nheartbeat_timeout = \"20s\"\n");
    assert_eq!((line, field.as_str()), (3, "farm.heartbeat_timeout"));
    assert_eq!(
        message,
        "heartbeat_timeout (20s) must be longer than heartbeat (30s), or every buildlet would time out between two heartbeats"
    );

    let (line, _, field, message) = only("[farm]\n\nheartbeat = \"1m\"\n");
    assert_eq!((line, field.as_str()), (3, "farm.heartbeat"));
    assert!(message.contains("(30s, the default)"), "{message}");

    // A rejected heartbeat is not compared with the timeout again.
    let (line, _, field, _) = only("[farm]\nheartbeat = \"forever\"\nheartbeat_timeout = \"5s\"\n");
    assert_eq!((line, field.as_str()), (2, "farm.heartbeat"));

    let (line, _, field, message) = only("[farm]\nmin_buildlet_version = -1\n");
    assert_eq!((line, field.as_str()), (2, "farm.min_buildlet_version"));
    assert!(message.contains("out of range"));
}

#[test]
fn host_errors() {
    let text = r#"[hosts.host-a]
pool = "cloud"
[hosts.host-b]
notes = "no pool"
[hosts.host-c]
pool = "local"
count = 0
[hosts.host-d]
pool = "local"
expected = 0
[hosts.host-e]
pool = "reverse"
count = 2
env = { "A=B" = "x", "" = "y" }
[hosts.host-f]
pool = "reverse"
trusted = "yes"
owners = ["ok@example.com", 7]
"#;
    let errs = errors(text);
    let got: Vec<(usize, usize, &str)> = errs
        .iter()
        .map(|e| (e.line, e.column, e.field.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (2, 8, "hosts.host-a.pool"),
            (3, 8, "hosts.host-b.pool"),
            (7, 9, "hosts.host-c.count"),
            (10, 12, "hosts.host-d.expected"),
            (13, 1, "hosts.host-e.count"),
            (14, 9, "hosts.host-e.env.\"A=B\""),
            (14, 22, "hosts.host-e.env.\"\""),
            (17, 11, "hosts.host-f.trusted"),
            (18, 29, "hosts.host-f.owners[1]"),
        ]
    );
    assert_eq!(
        errs[0].message,
        "host \"host-a\": pool \"cloud\" is not supported; use \"reverse\", \"local\" or \"exec\""
    );
    assert!(errs[1].message.contains("pool is required"));
    assert!(errs[2].message.contains("at least one buildlet"));
    assert!(
        errs[4]
            .message
            .contains("count only applies to pool = \"local\"")
    );
    assert!(errs[5].message.contains("must not contain '='"));
    assert!(errs[6].message.contains("must not be empty"));
    assert_eq!(errs[7].message, "expected true or false, found a string");
    assert_eq!(errs[8].message, "expected a string, found an integer");
}

#[test]
fn exec_host_errors() {
    let text = r#"[hosts.host-a]
pool = "exec"
[hosts.host-b]
pool = "exec"
create = ""
destroy = []
max = 0
[hosts.host-c]
pool = "exec"
create = "podman run x"
destroy = ["podman", "rm", "-f"]
max = 2
min_idle = 3
idle_timeout = "soon"
[hosts.host-d]
pool = "reverse"
max = 2
ephemeral = true
"#;
    let errs = errors(text);
    let got: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.field.as_str())).collect();
    assert_eq!(
        got,
        [
            (1, "hosts.host-a.create"),
            (1, "hosts.host-a.destroy"),
            (1, "hosts.host-a.max"),
            (5, "hosts.host-b.create"),
            (6, "hosts.host-b.destroy"),
            (7, "hosts.host-b.max"),
            (13, "hosts.host-c.min_idle"),
            (14, "hosts.host-c.idle_timeout"),
            (17, "hosts.host-d.max"),
            (18, "hosts.host-d.ephemeral"),
        ],
        "{errs:#?}"
    );
    assert!(errs[0].message.contains("needs create = \"shell command\""));
    assert!(errs[2].message.contains("max = N"));
    assert!(errs[3].message.contains("create must not be empty"));
    assert!(errs[4].message.contains("must start with the program"));
    assert!(errs[5].message.contains("at least 1"));
    assert!(
        errs[6]
            .message
            .contains("min_idle (3) must not exceed max (2)")
    );
    assert!(
        errs[8]
            .message
            .contains("max only applies to pool = \"exec\"")
    );

    // A good one: strings run with sh -c, lists as they are, defaults.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("farm.toml");
    std::fs::write(
        &path,
        r#"[hosts.host-e]
pool = "exec"
create = "podman run --rm x"
destroy = ["podman", "rm", "-f", "x"]
max = 4
ephemeral = true
"#,
    )
    .unwrap();
    let cfg = coordinator::config::load(&path).unwrap();
    let e = cfg.hosts["host-e"].exec.clone().unwrap();
    assert_eq!(e.create, ["sh", "-c", "podman run --rm x"]);
    assert_eq!(e.destroy, ["podman", "rm", "-f", "x"]);
    assert_eq!((e.max, e.min_idle, e.ephemeral), (4, 0, true));
    assert_eq!(e.idle_timeout, std::time::Duration::from_secs(600));
    assert_eq!(
        cfg.hosts["host-e"].pool,
        coordinator::config::PoolKind::Exec
    );
}

#[test]
fn repo_errors() {
    let text = r#"[repos.a]
url = ""
[repos.b]
branches = ["main"]
[repos.c]
url = "c"
branches = []
[repos.d]
url = "d"
branches = ["main", "main"]
"#;
    let got = lines_and_fields(text);
    assert_eq!(
        got,
        [
            (2, "repos.a.url".to_owned()),
            (3, "repos.b.url".to_owned()),
            (7, "repos.c.branches".to_owned()),
            (10, "repos.d.branches[1]".to_owned()),
        ]
    );
}

#[test]
fn presubmit_on_an_untrusted_host_is_left_to_the_scheduler() {
    // Trust is enforced when pre-submit work is requested; the config only records intent.
    let text = BASE.replace("trusted = true\n", "").replace(
        "host = \"host-linux-amd64-local\"\n",
        "host = \"host-linux-amd64-local\"\npresubmit = true\n",
    );
    let c = parse(&text).unwrap();
    assert!(c.builders["linux-amd64"].presubmit);
    assert!(!c.hosts["host-linux-amd64-local"].trusted);

    let (line, column, field, message) =
        only(&text.replace("presubmit = true", "presubmit = \"yes\""));
    assert_eq!(
        (line, column, field.as_str()),
        (10, 13, "builders.linux-amd64.presubmit")
    );
    assert_eq!(message, "expected true or false, found a string");
}

#[test]
fn wrong_types_are_reported_per_field() {
    let text = r#"repos = 3
hosts = "x"
[builders.b]
host = 5
repos = "sample"
steps = { name = "s" }
"#;
    let errs = errors(text);
    let got: Vec<(usize, &str, &str)> = errs
        .iter()
        .map(|e| (e.line, e.field.as_str(), e.message.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (1, "repos", "expected a table, found an integer"),
            (2, "hosts", "expected a table, found a string"),
            (4, "builders.b.host", "expected a string, found an integer"),
            (
                5,
                "builders.b.repos",
                "expected an array of strings, found a string"
            ),
            (
                6,
                "builders.b.steps",
                "expected an array of tables, found a table"
            ),
        ]
    );
}

#[test]
fn many_errors_are_all_reported_in_file_order() {
    let text = r#"[builders.linux-amd64]
host = "host-linux-arm"
repos = ["nope"]
timeout = "forever"

[hosts.bad_name]
pool = "reverse"

[farm]
max_attempts = 0
"#;
    let got = lines_and_fields(text);
    assert_eq!(
        got,
        [
            (1, "builders.linux-amd64.steps".to_owned()),
            (2, "builders.linux-amd64.host".to_owned()),
            (3, "builders.linux-amd64.repos[0]".to_owned()),
            (4, "builders.linux-amd64.timeout".to_owned()),
            (6, "hosts.bad_name".to_owned()),
            (10, "farm.max_attempts".to_owned()),
        ]
    );
}

#[test]
fn display_is_file_line_column_field_message() {
    let text = BASE.replace(
        "host = \"host-linux-amd64-local\"",
        "host = \"host-linux-arm\"",
    );
    let err = config::parse(Path::new("farm.toml"), &text).unwrap_err();
    assert_eq!(
        err.to_string(),
        "farm.toml:10:8: builders.linux-amd64.host: builder \"linux-amd64\": host \"host-linux-arm\" is not defined (defined: host-linux-amd64-local)"
    );

    let err = config::parse(
        Path::new("farm.toml"),
        "[farm]\nmax_attempts = 0\nheartbeat = 0\n",
    )
    .unwrap_err();
    let lines: Vec<String> = err.to_string().lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].starts_with("farm.toml:2:16: farm.max_attempts: "));
    assert!(lines[1].starts_with("farm.toml:3:13: farm.heartbeat: "));
}

#[test]
fn load_missing_file_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nope.toml");
    let err = config::load(&file).unwrap_err();
    assert_eq!(err.0.len(), 1);
    let e = &err.0[0];
    assert_eq!(
        (e.file.as_path(), e.line, e.column, e.field.as_str()),
        (file.as_path(), 0, 0, "")
    );
    assert!(
        e.message.contains(&file.display().to_string()),
        "{}",
        e.message
    );
    assert!(err.to_string().starts_with(&format!(
        "{}:0:0: cannot read the farm config",
        file.display()
    )));
}

#[test]
fn load_reports_errors_with_the_file_name() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("farm.toml");
    std::fs::write(&file, "[farm]\nmax_attempts = 0\n").unwrap();
    let err = config::load(&file).unwrap_err();
    assert_eq!(err.0[0].file, file);
    assert_eq!(err.0[0].line, 2);
}

#[test]
fn a_local_host_may_name_its_buildlet_program() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("farm.toml");
    std::fs::write(
        &path,
        r#"[hosts.host-a]
pool = "local"
buildlet = ["qemu-aarch64-static", "/opt/arm64/buildlet"]
[hosts.host-b]
pool = "local"
buildlet = "/opt/arm64/buildlet"
[hosts.host-c]
pool = "local"
"#,
    )
    .unwrap();
    let cfg = coordinator::config::load(&path).unwrap();
    assert_eq!(
        cfg.hosts["host-a"].local_program,
        ["qemu-aarch64-static", "/opt/arm64/buildlet"]
    );
    assert_eq!(cfg.hosts["host-b"].local_program, ["/opt/arm64/buildlet"]);
    assert!(cfg.hosts["host-c"].local_program.is_empty());
    let errs = errors(
        "[hosts.host-r]\npool = \"reverse\"\nbuildlet = \"/x\"\n[hosts.host-e]\npool = \"local\"\nbuildlet = []\n",
    );
    let got: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.field.as_str())).collect();
    assert_eq!(
        got,
        [(3, "hosts.host-r.buildlet"), (6, "hosts.host-e.buildlet")],
        "{errs:#?}"
    );
    assert!(errs[0].message.contains("only applies to pool = \"local\""));
    assert!(errs[1].message.contains("must start with the program"));
}

const SHARDED: &str = r#"
[hosts.host-h]
pool = "reverse"
[builders.b]
host = "host-h"
[[builders.b.steps]]
name = "build"
run = "make"
[[builders.b.steps]]
name = "test"
shard.list = "go tool dist test -list"
shard.run = "go tool dist test -run ^{unit}$"
shard.helpers = 3
"#;

#[test]
fn sharded_steps_parse_and_quote_the_unit_for_the_shell() {
    let c = parse(SHARDED).unwrap();
    let step = &c.builders["b"].steps[1];
    assert!(step.command.is_empty());
    let s = step.shard.as_ref().unwrap();
    assert_eq!(s.list, ["sh", "-c", "go tool dist test -list"]);
    assert_eq!(
        (s.helpers, s.try_helpers),
        (3, 3),
        "try_helpers defaults to helpers"
    );
    assert_eq!(s.helpers_for(true), 3);
    assert_eq!(
        s.command_for("go_test:fmt")[2],
        "go tool dist test -run ^go_test:fmt$"
    );
    // A name the shell would split or interpret stays one word.
    assert_eq!(
        s.command_for("a b;rm x'y")[2],
        r#"go tool dist test -run ^'a b;rm x'\''y'$"#
    );
    // The list form substitutes the name as it is.
    let c = parse(&SHARDED.replace(
        r#"shard.run = "go tool dist test -run ^{unit}$""#,
        r#"shard.run = ["t", "-run", "^{unit}$"]
shard.try_helpers = 0"#,
    ))
    .unwrap();
    let s = c.builders["b"].steps[1].shard.clone().unwrap();
    assert_eq!(s.command_for("a b"), ["t", "-run", "^a b$"]);
    assert_eq!((s.helpers_for(false), s.helpers_for(true)), (3, 0));
}

#[test]
fn sharded_step_errors_name_the_field() {
    let (line, _, field, msg) = only(&SHARDED.replace("shard.helpers = 3", "shard.helpers = 65"));
    assert_eq!(line, 13);
    assert_eq!(field, "builders.b.steps[1].shard.helpers");
    assert!(msg.contains("at most 64"), "{msg}");

    let (_, _, field, msg) =
        only(&SHARDED.replace("shard.list = \"go tool dist test -list\"\n", ""));
    assert_eq!(field, "builders.b.steps[1].shard.list");
    assert!(msg.contains("shard.list is required"), "{msg}");

    let (_, _, field, msg) =
        only(&SHARDED.replace("shard.helpers = 3", "shard.helpers = 3\nrun = \"x\""));
    assert_eq!(field, "builders.b.steps[1].run");
    assert!(msg.contains("remove run or shard"), "{msg}");

    let (_, _, field, msg) = only(&SHARDED.replace("shard.helpers = 3", "shard.helper = 3"));
    assert_eq!(field, "builders.b.steps[1].shard.helper");
    assert!(msg.contains("helpers"), "did you mean: {msg}");

    let (_, _, field, _) = only(&SHARDED.replace(
        "shard.run = \"go tool dist test -run ^{unit}$\"",
        "shard.run = \"\"",
    ));
    assert_eq!(field, "builders.b.steps[1].shard.run");
}

#[test]
fn a_shell_in_list_form_quotes_the_unit_and_quotes_around_it_are_refused() {
    let c = parse(&SHARDED.replace(
        r#"shard.run = "go tool dist test -run ^{unit}$""#,
        r#"shard.run = ["/bin/bash", "-c", "t -run ^{unit}$"]"#,
    ))
    .unwrap();
    let s = c.builders["b"].steps[1].shard.clone().unwrap();
    assert_eq!(s.command_for("x;y")[2], "t -run ^'x;y'$");
    for quoted in [
        r#"shard.run = "t -run '^{unit}$'""#,
        r#"shard.run = "t -run \"^{unit}$\"""#,
        r#"shard.run = ["sh", "-c", "t \"{unit}\""]"#,
    ] {
        let (_, _, field, msg) =
            only(&SHARDED.replace(r#"shard.run = "go tool dist test -run ^{unit}$""#, quoted));
        assert_eq!(field, "builders.b.steps[1].shard.run", "{quoted}");
        assert!(msg.contains("inside quotes"), "{quoted}: {msg}");
    }
    // Quotes elsewhere in the script are fine.
    parse(&SHARDED.replace(
        r#"shard.run = "go tool dist test -run ^{unit}$""#,
        r#"shard.run = "echo 'it''s' \"a\\\" b\" && t -run ^{unit}$""#,
    ))
    .unwrap();
}

#[test]
fn results_and_retry_failed_are_checked() {
    let base = r#"
[hosts.host-h]
pool = "reverse"
[builders.b]
host = "host-h"
[[builders.b.steps]]
name = "test"
run = "make test"
"#;
    let c = parse(&format!(
        "{base}results = [\"junit:out/**/*.xml\", \"go-json:t.json\"]\n"
    ))
    .unwrap();
    let r = &c.builders["b"].steps[0].results;
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].glob, "out/**/*.xml");
    for (bad, field, says) in [
        (
            "results = \"xml:out/*.xml\"",
            "builders.b.steps[0].results",
            "format \"xml\" is unknown",
        ),
        (
            "results = \"out/*.xml\"",
            "builders.b.steps[0].results",
            "needs a format",
        ),
        (
            "results = \"junit:/etc/*.xml\"",
            "builders.b.steps[0].results",
            "must be relative",
        ),
        (
            "results = \"junit:../x.xml\"",
            "builders.b.steps[0].results",
            "\"..\"",
        ),
    ] {
        let (_, _, f, msg) = only(&format!("{base}{bad}\n"));
        assert_eq!(f, field, "{bad}");
        assert!(msg.contains(says), "{bad}: {msg}");
    }
    let with_retry = base.replace(
        "host = \"host-h\"\n",
        "host = \"host-h\"\nretry_failed = 2\n",
    );
    assert_eq!(parse(&with_retry).unwrap().builders["b"].retry_failed, 2);
    let (_, _, f, msg) = only(&base.replace(
        "host = \"host-h\"\n",
        "host = \"host-h\"\nretry_failed = 9\n",
    ));
    assert_eq!(f, "builders.b.retry_failed");
    assert!(msg.contains("at most 5"), "{msg}");
    // A sharded step's units report through their output.
    let (_, _, f, msg) = only(&SHARDED.replace(
        "shard.helpers = 3",
        "shard.helpers = 3\nresults = \"junit:x.xml\"",
    ));
    assert_eq!(f, "builders.b.steps[1].results");
    assert!(msg.contains("not read for a sharded step"), "{msg}");
}

#[test]
fn serve_settings_live_in_the_config_too() {
    let c = parse("[serve]\nlisten = \"0.0.0.0:8443\"\ndata_dir = \"state\"\nssh_listen = \"127.0.0.1:2222\"\n")
        .unwrap();
    assert_eq!(c.serve.listen.as_deref(), Some("0.0.0.0:8443"));
    assert_eq!(c.serve.ssh_listen.as_deref(), Some("127.0.0.1:2222"));
    assert_eq!(
        c.serve.data_dir,
        Some(PathBuf::from("/etc/farm/state")),
        "relative to the config file"
    );
    let (_, _, field, msg) = only("[serve]\nlisten = \"8443\"\n");
    assert_eq!(field, "serve.listen");
    assert!(msg.contains("HOST:PORT"), "{msg}");
    let (_, _, field, _) = only("[serve]\nlistn = \"0.0.0.0:1\"\n");
    assert_eq!(field, "serve.listn");
    assert_eq!(parse("").unwrap().serve, Default::default());
}

const FORGE: &str = r#"[farm]
url = "https://farm.example.com/"

[secrets]
forge-token = {}
hook = { env = "FARMER_TEST_HOOK" }
gh = { file = "gh.token" }
smtp-pass = {}
pypi = {}

[smtp]
server = "smtp+starttls://mail.example.com:587"
from = "Farmer <farmer@example.com>"
username = "farmer"
password = "secret:smtp-pass"

[repos.app]
url = "https://git.example.com/org/app.git"
username = "farmer-bot"
password = "secret:forge-token"
ca_file = "ca.pem"
[repos.app.forge]
type = "forgejo"
repository = "org/app"
api = "https://git.example.com/api/v1/"
webhook_secret = "secret:hook"
status_token = "secret:gh"
[repos.app.notify]
webhook = "https://chat.example.com/hooks/abc"
email = ["team@example.com"]

[hosts.host-a]
pool = "reverse"
trusted = true

[builders.upload]
host = "host-a"
env = { TOKEN = "secret:pypi" }
[[builders.upload.steps]]
name = "upload"
run = "true"
env = { AGAIN = "secret:pypi" }
"#;

#[test]
fn forge_secrets_and_notify_settings_parse() {
    let c = parse(FORGE).unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!(c.farm.url.as_deref(), Some("https://farm.example.com"));
    let app = &c.repos["app"];
    assert_eq!(app.auth.username, "farmer-bot");
    assert_eq!(app.auth.password.as_deref(), Some("secret:forge-token"));
    assert_eq!(
        app.auth.ca_file,
        Some(Path::new(FILE).parent().unwrap().join("ca.pem"))
    );
    let f = app.forge.as_ref().unwrap();
    assert_eq!(f.kind, config::ForgeKind::Gitea);
    assert_eq!(f.api, "https://git.example.com/api/v1");
    assert_eq!(f.repository, "org/app");
    assert_eq!(app.notify.email, vec!["team@example.com".to_string()]);
    assert_eq!(
        c.secrets["hook"],
        coordinator::secrets::Source::Env("FARMER_TEST_HOOK".into())
    );
    assert_eq!(
        c.secrets["gh"],
        coordinator::secrets::Source::File(Path::new(FILE).parent().unwrap().join("gh.token"))
    );
    assert_eq!(c.secrets["pypi"], coordinator::secrets::Source::DataDir);
    assert_eq!(c.smtp.as_ref().unwrap().username.as_deref(), Some("farmer"));
    // GitHub's API is the default.
    let gh = FORGE
        .replace("type = \"forgejo\"", "type = \"github\"")
        .replace("api = \"https://git.example.com/api/v1/\"\n", "");
    let c = parse(&gh).unwrap();
    assert_eq!(
        c.repos["app"].forge.as_ref().unwrap().api,
        "https://api.github.com"
    );
}

#[test]
fn forge_settings_errors_point_at_the_field() {
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "type = \"forgejo\"",
            "type = \"bitbucket\"",
            "repos.app.forge.type",
            "unknown",
        ),
        (
            "repository = \"org/app\"",
            "repository = \"org\"",
            "repos.app.forge.repository",
            "OWNER/NAME",
        ),
        (
            "webhook_secret = \"secret:hook\"",
            "webhook_secret = \"plain-text\"",
            "repos.app.forge.webhook_secret",
            "must name a secret",
        ),
        (
            "password = \"secret:forge-token\"",
            "password = \"secret:nope\"",
            "repos.app.password",
            "not declared",
        ),
        (
            "webhook = \"https://chat.example.com/hooks/abc\"",
            "webhook = \"chat\"",
            "repos.app.notify.webhook",
            "http(s) URL",
        ),
        (
            "email = [\"team@example.com\"]",
            "email = [\"not an address\"]",
            "repos.app.notify.email[0]",
            "not an email address",
        ),
        (
            "server = \"smtp+starttls://mail.example.com:587\"",
            "server = \"mail.example.com\"",
            "smtp.server",
            "smtp://",
        ),
        (
            "url = \"https://farm.example.com/\"",
            "url = \"farm.example.com\"",
            "farm.url",
            "public http(s) URL",
        ),
        (
            "gh = { file = \"gh.token\" }",
            "gh = { file = \"gh.token\", env = \"X\" }",
            "secrets.gh",
            "not both",
        ),
        (
            "trusted = true",
            "trusted = false",
            "builders.upload.env.TOKEN",
            "not trusted",
        ),
    ];
    for (from, to, field, message) in cases {
        assert!(FORGE.contains(from), "{from}");
        let errs = errors(&FORGE.replacen(from, to, 1));
        let hit = errs.iter().find(|e| e.field == *field);
        let e = hit.unwrap_or_else(|| panic!("{to}: no error at {field}: {errs:#?}"));
        assert!(e.message.contains(message), "{to}: {}", e.message);
        assert!(e.line > 0 || *field == "smtp.server", "{to}: {e:?}");
    }
    // The untrusted host is refused for the step's env too.
    let errs = errors(&FORGE.replace("trusted = true", "trusted = false"));
    assert!(
        errs.iter()
            .any(|e| e.field == "builders.upload.steps[0].env.AGAIN"),
        "{errs:#?}"
    );
    // Credentials are for https remotes; email needs [smtp].
    let e = errors(&FORGE.replace(
        "https://git.example.com/org/app.git",
        "ssh://git@example.com/org/app.git",
    ));
    assert!(
        e.iter()
            .any(|e| e.message.contains("is for https:// remotes")),
        "{e:#?}"
    );
    let start = FORGE.find("[smtp]").unwrap();
    let end = FORGE.find("[repos.app]").unwrap();
    let no_smtp = format!("{}{}", &FORGE[..start], &FORGE[end..])
        .replace("password = \"secret:smtp-pass\"\n", "");
    let e = errors(&no_smtp);
    assert!(
        e.iter()
            .any(|e| e.field == "repos.app.notify.email" && e.message.contains("[smtp]")),
        "{e:#?}"
    );
}
