//! `farmer up`: everything the demo farm needs, created in the data dir on
//! first start — a sample git repository with a few commits (one of which
//! breaks a test, and one of which fails on a single builder only), and a
//! config with three builders on two local host types.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::git::{self, NewCommit};

/// File name of the demo config inside the data dir.
pub const CONFIG_FILE: &str = "farmer.toml";
/// Directory of the sample repository inside the data dir.
pub const SAMPLE_REPO: &str = "sample-repo";

const CONFIG: &str = r#"# The demo farm created by `farmer up`. Edit it and send SIGHUP to reload.

[farm]
min_buildlet_version = 1
max_attempts = 3

[repos.sample]
url = "sample-repo"
branches = ["main"]
poll_interval = "2s"

[hosts.host-linux-amd64-local]
pool = "local"
count = 2
expected = 2
owners = ["farm-admin@example.com"]
notes = "Two buildlets started by the coordinator on this machine."
trusted = true
dimensions = { os = "linux", arch = "amd64" }

[hosts.host-linux-arm64-sim]
pool = "local"
count = 1
expected = 1
owners = ["volunteer@example.com"]
notes = "Pretends to be an arm64 board; really a local buildlet."
trusted = false
env = { SIMULATED_ARCH = "arm64" }
dimensions = { os = "linux", arch = "arm64" }

[builders.linux-amd64]
host = "host-linux-amd64-local"
repos = ["sample"]
presubmit = true
timeout = "5m"
notes = "The first-class port."
[[builders.linux-amd64.steps]]
name = "build"
run = "sh build.sh"
timeout = "1m"
[[builders.linux-amd64.steps]]
name = "test"
run = "sh test.sh"
timeout = "2m"

[builders.linux-amd64-race]
host = "host-linux-amd64-local"
repos = ["sample"]
timeout = "5m"
env = { RACE = "1" }
notes = "Its tests are sharded: one unit per test, over its machine and a helper."
[[builders.linux-amd64-race.steps]]
name = "build"
run = "sh build.sh"
timeout = "1m"
[[builders.linux-amd64-race.steps]]
name = "test"
shard.list = "ls tests | sed 's/[.]test$//'"
shard.run = "sh test.sh {unit}"
shard.helpers = 1
timeout = "2m"

[builders.linux-arm64-sim]
host = "host-linux-arm64-sim"
repos = ["sample"]
timeout = "5m"
[[builders.linux-arm64-sim.steps]]
name = "build"
run = "sh build.sh"
timeout = "1m"
[[builders.linux-arm64-sim.steps]]
name = "test"
run = "sh test.sh"
timeout = "2m"
"#;

const BUILD_SH: &str = r#"#!/bin/sh
set -e
echo "building on $FARMER_BUILDER ($(uname -s) $(uname -m))"
mkdir -p out
for f in src/*.txt; do
  echo "compiling $f"
  sleep 0.2
  tr 'a-z' 'A-Z' < "$f" > "out/$(basename "$f" .txt).o"
done
echo "build ok"
"#;

/// The sample's test script. It reports as libtest does (`test NAME ...
/// ok|FAILED`, then a `---- NAME stdout ----` section per failure), so
/// farmer reads its results like a `cargo test` run's.
fn test_sh(extra: &str) -> String {
    format!(
        r#"#!/bin/sh
echo "running tests on $FARMER_BUILDER"
fail=0
failures=""
# One test when named (a unit of a sharded step), else all of them.
for t in tests/${{1:-*}}.test; do
  sleep 0.3
  want=$(cat "$t")
  name=$(basename "$t" .test)
  got=$(cat "out/$name.o" 2>/dev/null)
  if [ "$got" = "$want" ]; then
    echo "test $name ... ok"
  else
    echo "test $name ... FAILED"
    failures="$failures
---- $name stdout ----
FAIL $name: got '$got', want '$want'
"
    fail=1
  fi
done
{extra}
if [ -n "$failures" ]; then echo; echo "failures:"; echo "$failures"; fi
echo "test result: $([ $fail = 0 ] && echo ok || echo FAILED)."
exit $fail
"#
    )
}

fn commits() -> Vec<NewCommit> {
    let base = 1_767_225_600; // 2026-01-01
    let file = |p: &str, c: &str| (p.to_string(), c.as_bytes().to_vec(), false);
    let exe = |p: &str, c: &str| (p.to_string(), c.as_bytes().to_vec(), true);
    vec![
        NewCommit {
            message: "Add the hello program and its test".into(),
            author: "Alice Gopher".into(),
            email: "alice@example.com".into(),
            time: base,
            files: vec![
                exe("build.sh", BUILD_SH),
                exe("test.sh", &test_sh("")),
                file("src/hello.txt", "hello\n"),
                file("tests/hello.test", "HELLO"),
                file("README", "A sample project built by the farmer demo.\n"),
            ],
        },
        NewCommit {
            message: "Add the world module".into(),
            author: "Bob Builder".into(),
            email: "bob@example.com".into(),
            time: base + 3600,
            files: vec![
                file("src/world.txt", "world\n"),
                file("tests/world.test", "WORLD"),
            ],
        },
        NewCommit {
            message: "Change the greeting (breaks the hello test)".into(),
            author: "Carol Coder".into(),
            email: "carol@example.com".into(),
            time: base + 7200,
            files: vec![file("src/hello.txt", "howdy\n")],
        },
        NewCommit {
            message: "Fix the hello test; arm64 still fails on alignment".into(),
            author: "Alice Gopher".into(),
            email: "alice@example.com".into(),
            time: base + 10800,
            files: vec![
                file("tests/hello.test", "HOWDY"),
                exe(
                    "test.sh",
                    &test_sh(
                        r#"if [ "$SIMULATED_ARCH" = "arm64" ] && [ -z "$1" ]; then
  echo "test alignment ... FAILED"
  failures="$failures
---- alignment stdout ----
FAIL alignment: unaligned access on arm64
"
  fail=1
fi"#,
                    ),
                ),
            ],
        },
    ]
}

/// Where `scripts/cross.sh` leaves the arm64 buildlet, from the repository root.
const CROSS_BUILDLET: &str = "target/cross/aarch64-unknown-linux-gnu/release/buildlet";

/// How the demo's arm64 host type can run a real arm64 buildlet: the
/// program line for its `buildlet` key, if an arm64 build (from
/// `scripts/cross.sh`, or `$FARMER_ARM64_BUILDLET`) and a way to run it
/// (binfmt_misc, else `qemu-aarch64-static`) are both here.
pub fn arm64_buildlet() -> Result<Vec<String>, String> {
    let path = match std::env::var_os("FARMER_ARM64_BUILDLET") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(CROSS_BUILDLET),
    };
    let path = std::fs::canonicalize(&path).map_err(|_| {
        format!(
            "no arm64 buildlet at {} (run scripts/cross.sh, or set FARMER_ARM64_BUILDLET)",
            path.display()
        )
    })?;
    let path = path.display().to_string();
    let binfmt = std::fs::read_to_string("/proc/sys/fs/binfmt_misc/qemu-aarch64")
        .is_ok_and(|s| s.starts_with("enabled"));
    if binfmt {
        return Ok(vec![path]);
    }
    let on_path = std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| d.join("qemu-aarch64-static").is_file())
    });
    if on_path {
        return Ok(vec!["qemu-aarch64-static".into(), path]);
    }
    Err("an arm64 buildlet is built but qemu-aarch64-static is missing (scripts/cross.sh installs it)".into())
}

/// Creates the demo config and sample repository if missing; returns the
/// config path. The arm64 host type runs a real arm64 buildlet under
/// emulation when one is available (see [`arm64_buildlet`]), else a
/// simulated one; the log says which.
pub fn prepare(data_dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let repo = data_dir.join(SAMPLE_REPO);
    if !repo.exists() {
        git::write_history(&repo, "main", &commits())
            .with_context(|| format!("creating the sample repository {}", repo.display()))?;
        tracing::info!(path = %repo.display(), "created the sample repository");
    }
    let config = data_dir.join(CONFIG_FILE);
    if !config.exists() {
        let text = match arm64_buildlet() {
            Ok(program) => {
                let line = format!(
                    "buildlet = [{}]\nnotes = \"A real arm64 buildlet, run under qemu on this machine.\"\n",
                    program
                        .iter()
                        .map(|p| format!("{p:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                CONFIG.replace(
                    "notes = \"Pretends to be an arm64 board; really a local buildlet.\"\n",
                    &line,
                )
            }
            Err(_) => CONFIG.to_string(),
        };
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        tracing::info!(path = %config.display(), "wrote the demo config");
    }
    match crate::config::load(&config)
        .ok()
        .and_then(|c| c.hosts.get("host-linux-arm64-sim").cloned())
    {
        Some(h) if !h.local_program.is_empty() => tracing::info!(
            program = %h.local_program.join(" "),
            "the arm64 host type runs a real arm64 buildlet under emulation"
        ),
        Some(_) => tracing::info!(
            "the arm64 host type runs a simulated arm64 buildlet (this machine's own): {}",
            arm64_buildlet().err().unwrap_or_else(|| {
                "the config was written before an arm64 build was here; delete it to regenerate"
                    .into()
            })
        ),
        None => {}
    }
    Ok(config)
}
