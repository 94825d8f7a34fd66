//! End-to-end figures for the coordinator: dispatch latency, build
//! throughput, and memory per idle reverse connection.
//!
//! Run with `cargo bench -p coordinator`. It prints figures and asserts
//! nothing about speed; it only fails when the farm answers wrongly (a build
//! that does not pass, a refused request, a bounded wait that runs out).
//!
//! Everything is real and over loopback: `farmer serve` child processes with
//! generated configs in a temp dir, a one-file git repository made with the
//! git CLI, and reverse buildlets speaking TLS (pinned to the coordinator's
//! certificate) with real builder keys from `farmer genbuilderkey`.
//!
//! 1. **Dispatch latency.** One idle `farmer buildlet` process; a builder
//!    whose single step is `date +%s%N`. Builds are triggered one at a time
//!    with `POST /api/builds` (kind `interactive`); each is awaited, and the
//!    machine seen idle again (cleaned), before the next. The latency is the step's printed start time (wall clock, ns)
//!    minus the wall clock just before the POST: it covers the API, the
//!    store, the scheduler, the lease, pushing the source tree, and spawning
//!    the command on the buildlet. Also shown: the POST round trip, the time
//!    until the build is seen `passed`, and the coordinator's own
//!    `farmer_dispatch_latency_seconds` histogram (queued → machine leased)
//!    over the measured builds.
//! 2. **Throughput.** Four `farmer buildlet` processes; trivial one-step
//!    builds (`true`). 1,000 builds are submitted by 8 concurrent clients as
//!    fast as the API takes them; the clock stops when `/metrics` counts all
//!    of them finished.
//! 3. **Elastic machines.** An exec pool (`pool = "exec"`, `ephemeral`,
//!    `max = 4`) whose `create` hook starts a `farmer buildlet` process and
//!    whose `destroy` hook kills it. First builds one at a time with no
//!    machine up: POST → attempt started is a lease request → machine
//!    created, registered and leased. Then a burst of builds through fresh
//!    machines (one per build): builds/s and machines created.
//! 4. **Memory.** A fresh coordinator's resident set (`VmRSS`, Linux only)
//!    with no connection, then with 1,000 idle reverse connections. Those run
//!    in this process as tokio tasks of [`buildlet::reverse::run`], each with
//!    its own work dir, doing the real handshake and serving the real
//!    protocol (the coordinator's `/status` confirmation, HTTP/2 PINGs and
//!    health checks). Measured twice: 2 s after connecting (HTTP/2 sessions
//!    open, as while machines work), and once every link has parked
//!    (`park_after`, see `coordinator::link`) and the freed pages were
//!    purged. `RLIMIT_NOFILE` is raised first so the coordinator inherits it.
//! 5. **gomote.** See `bench_gomote`.
//! 6. **Sharded tests.** See `coordinator/shard.rs`.
//! 7. **Source delivery.** Whole trees vs deltas through a 10 MB/s link;
//!    see `coordinator/delivery.rs`.
//! 8. **Scale on both stores.** 10,000 queued builds and 1,000 idle reverse
//!    connections, API latencies, throughput and memory, on SQLite and on a
//!    throwaway PostgreSQL server; see `coordinator/scale.rs`.
//!
//! The coordinators log (`FARMER_LOG=warn`) and the buildlets log
//! (`BUILDLET_LOG=warn`) to files in the temp dir; every child is killed at
//! the end, also on a panic, and the temp dir is removed.

#[path = "coordinator/delivery.rs"]
mod delivery;
#[path = "coordinator/scale.rs"]
mod scale;
#[path = "coordinator/shard.rs"]
mod shard;

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

const FARMER: &str = env!("CARGO_BIN_EXE_farmer");

const DISPATCH_WARMUP: usize = 10;
const DISPATCH_RUNS: usize = 200;
/// Builds started on an idle farm, one every [`IDLE_GAP`]: what a farm
/// whose builds come now and then (most volunteer farms) sees.
const IDLE_RUNS: usize = 20;
const IDLE_GAP: Duration = Duration::from_millis(250);
/// Issue 16's goals: dispatch p50, trivial builds/s with 4 buildlets, and
/// coordinator CPU per build.
const GOAL_DISPATCH_MS: f64 = 1.5;
const GOAL_BUILDS_PER_S: f64 = 1000.0;
const GOAL_CPU_MS: f64 = 0.5;
const TPUT_BUILDLETS: usize = 4;
const TPUT_BUILDS: usize = 1000;
const TPUT_CLIENTS: usize = 8;
/// How long the throughput phase may take before it reports what finished.
const TPUT_LIMIT: Duration = Duration::from_secs(90);
const IDLE_CONNS: usize = 1000;
const ELASTIC_SEQUENTIAL: usize = 20;
const ELASTIC_BURST: usize = 200;
const ELASTIC_MAX: usize = 4;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

fn main() {
    let nofile = raise_nofile();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("starting the tokio runtime");
    let started = Instant::now();
    if let Err(e) = runtime.block_on(run(nofile)) {
        eprintln!("coordinator bench failed: {e:#}");
        std::process::exit(1);
    }
    println!(
        "coordinator bench: done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

async fn run(nofile: Option<String>) -> anyhow::Result<()> {
    // Declared first so it is dropped last, after every child is killed.
    // Under cargo's temp dir for benches, not /tmp: a farm keeps its data
    // (logs are files) on a disk of its own, while /tmp is where every
    // test run creates and deletes files by the thousand, which on some
    // file systems makes each new file cost several times more (ext4
    // without a journal skips recently freed inodes one by one).
    // FARMER_BENCH_DIR puts it elsewhere (e.g. /dev/shm, to take the
    // disk's file system out of the figures).
    let parent = std::env::var_os("FARMER_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    let tmp = tempfile::Builder::new()
        .prefix("farmer-coordinator-bench")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a temp dir in {}", parent.display()))?;
    let dir = tmp
        .path()
        .canonicalize()
        .context("canonicalizing the temp dir")?;
    let repo = dir.join("repo");
    let commit = make_repo(&repo)?;
    println!(
        "coordinator bench: {} CPUs, RLIMIT_NOFILE {}, repo {} at {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        nofile.as_deref().unwrap_or("unknown"),
        repo.display(),
        &commit[..12]
    );
    // FARMER_BENCH=gomote (or a comma list of dispatch, throughput,
    // elastic, memory, gomote, shard, delivery, scale) runs only those
    // sections; FARMER_BENCH_BUILDLET_ARGS adds flags to every buildlet.
    let only = std::env::var("FARMER_BENCH").unwrap_or_default();
    let wanted = |s: &str| only.is_empty() || only.split(',').any(|x| x.trim() == s);
    if wanted("dispatch") {
        bench_dispatch(&dir, &repo, &commit).await?;
    }
    if wanted("throughput") {
        bench_throughput(&dir, &repo, &commit).await?;
    }
    if wanted("elastic") {
        bench_elastic(&dir, &repo, &commit).await?;
    }
    if wanted("memory") {
        bench_memory(&dir).await?;
    }
    if wanted("gomote") {
        bench_gomote(&dir).await?;
    }
    if wanted("shard") {
        shard::bench_shard(&dir).await?;
    }
    if wanted("delivery") {
        delivery::bench_delivery(&dir).await?;
    }
    if wanted("scale") {
        scale::bench_scale(&dir, &repo, &commit).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 1. Dispatch latency

async fn bench_dispatch(dir: &Path, repo: &Path, commit: &str) -> anyhow::Result<()> {
    println!();
    println!(
        "== dispatch latency: 1 idle buildlet, {DISPATCH_RUNS} builds one at a time (+{DISPATCH_WARMUP} warm-up) =="
    );
    let config = farm_config(
        Some(repo),
        &[("host-bench-one", 1)],
        &[("stamp", "host-bench-one", r#"command = ["date", "+%s%N"]"#)],
    );
    let c = Coordinator::start(dir, "dispatch", &config)?;
    let api = Api::new(&c);
    let key = c.key("host-bench-one")?;
    let _bot = start_buildlet(&c, dir, "host-bench-one", "one-1", &key)?;
    wait_connected(&api, "host-bench-one", 1, Duration::from_secs(30)).await?;
    // The poller queues one post-submit build of the commit at start; let it
    // finish (it also warms the source cache) before measuring.
    wait_builds_done(&api, 1, Duration::from_secs(60)).await?;

    for _ in 0..DISPATCH_WARMUP {
        dispatch_one(&api, "stamp", "one-1", commit).await?;
    }
    let before_text = api.get_text("/metrics").await?;
    let before = Histogram::parse(&before_text);
    let ticks0 = cpu_ticks();
    let mut start = Vec::with_capacity(DISPATCH_RUNS);
    let mut post = Vec::with_capacity(DISPATCH_RUNS);
    let mut passed = Vec::with_capacity(DISPATCH_RUNS);
    for _ in 0..DISPATCH_RUNS {
        let s = dispatch_one(&api, "stamp", "one-1", commit).await?;
        start.push(s.start_ms);
        post.push(s.post_ms);
        passed.push(s.passed_ms);
    }
    let after_text = api.get_text("/metrics").await?;
    let after = Histogram::parse(&after_text);
    let p50 = percentile(&mut start, 0.5);
    println!(
        "dispatch: POST -> step command started   {}  (goal p50 <= {GOAL_DISPATCH_MS} ms: {})",
        summary(&mut start),
        if p50 <= GOAL_DISPATCH_MS {
            "met"
        } else {
            "NOT met"
        }
    );
    println!(
        "dispatch: POST round trip (build queued)  {}",
        summary(&mut post)
    );
    println!(
        "dispatch: POST -> build seen passed       {}  (following GET /api/builds/ID/log)",
        summary(&mut passed)
    );
    let h = after.minus(&before);
    let parts = Breakdown::between(&before_text, &after_text, &start, &post, &h);
    println!(
        "dispatch: where an attempt's time goes, mean ms (farmer_build_phase_seconds): {}",
        parts.phases()
    );
    println!(
        "dispatch: coordinator farmer_dispatch_latency_seconds (queued -> machine leased), {} builds: {}",
        h.count,
        h.describe()
    );
    println!("dispatch: one dispatch, mean ms: {}", parts.dispatch());
    // Why the bench follows the log rather than poll the build.
    if let Some(ms) = cpu_per_get(&api, c.pid(), "/api/builds/1").await? {
        println!("dispatch: one poll (GET /api/builds/ID) costs the coordinator {ms:.3} ms of CPU");
    }
    // Builds that come now and then find every CPU asleep and the kernel's
    // caches cold: moving a process into a cgroup, for one, then waits for
    // an RCU grace period (the buildlet makes commands in their cgroup to
    // avoid it).
    let before_text = api.get_text("/metrics").await?;
    let mut idle = Vec::with_capacity(IDLE_RUNS);
    let mut idle_post = Vec::with_capacity(IDLE_RUNS);
    for _ in 0..IDLE_RUNS {
        tokio::time::sleep(IDLE_GAP).await;
        let s = dispatch_one(&api, "stamp", "one-1", commit).await?;
        idle.push(s.start_ms);
        idle_post.push(s.post_ms);
    }
    let after_text = api.get_text("/metrics").await?;
    let h = Histogram::parse(&after_text).minus(&Histogram::parse(&before_text));
    let parts = Breakdown::between(&before_text, &after_text, &idle, &idle_post, &h);
    println!(
        "dispatch: on an idle farm (one build every {} ms, {IDLE_RUNS} builds): POST -> step command started {}",
        IDLE_GAP.as_millis(),
        summary(&mut idle)
    );
    println!(
        "dispatch: on an idle farm, one dispatch, mean ms: {}",
        parts.dispatch()
    );
    if let Some(p) = steal_since(&ticks0) {
        println!(
            "dispatch: the hypervisor took {p:.1} % of the CPUs' time during this section (steal; figures run slower by about that much)"
        );
    }
    Ok(())
}

/// Where the dispatches between two `/metrics` snapshots spent their time.
struct Breakdown {
    /// `farmer_build_phase_seconds` means by phase, ms.
    means: Vec<(String, f64)>,
    /// Mean POST -> command started, POST round trip, queued -> leased, ms.
    total: f64,
    api: f64,
    queue: f64,
}

impl Breakdown {
    fn between(
        before: &str,
        after: &str,
        start: &[f64],
        post: &[f64],
        leased: &Histogram,
    ) -> Breakdown {
        let (p0, p1) = (phases(before), phases(after));
        let means = p1
            .iter()
            .map(|(name, (sum, n))| {
                let (s0, n0) = p0
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or((0.0, 0), |(_, v)| *v);
                let n = n - n0;
                let mean = if n > 0 {
                    (sum - s0) / n as f64 * 1e3
                } else {
                    0.0
                };
                (name.clone(), mean)
            })
            .collect();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let queue = if leased.count > 0 {
            leased.sum / leased.count as f64 * 1e3
        } else {
            0.0
        };
        Breakdown {
            means,
            total: mean(start),
            api: mean(post),
            queue,
        }
    }

    fn phase(&self, n: &str) -> f64 {
        self.means
            .iter()
            .find(|(m, _)| m == n)
            .map_or(0.0, |(_, v)| *v)
    }

    fn phases(&self) -> String {
        let parts: Vec<String> = self
            .means
            .iter()
            .map(|(name, mean)| format!("{name} {mean:.3}"))
            .collect();
        parts.join(", ")
    }

    /// One dispatch, taken apart: what the API, the lease queue and the
    /// attempt's start cost (recording it and pushing the source run side
    /// by side: `record-start` spans both); the rest is recording the step
    /// and starting its command on the buildlet (the exec round trip and
    /// fork+exec).
    fn dispatch(&self) -> String {
        let record = self.phase("record-start");
        let source = self.phase("source-archive") + self.phase("source-push");
        let rest = self.total - self.api - self.queue - record;
        format!(
            "API (POST answered, build stored) {:.3} + queue -> lease {:.3} + attempt recorded while the source is pushed {record:.3} (the push alone {source:.3}) + step recorded and command started {rest:.3} = {:.3}",
            self.api, self.queue, self.total
        )
    }
}

/// The coordinator's CPU milliseconds per `GET path`, over 100 of them.
async fn cpu_per_get(api: &Api, pid: u32, path: &str) -> anyhow::Result<Option<f64>> {
    const N: u32 = 100;
    let before = cpu_secs(pid);
    for _ in 0..N {
        api.get_text(path).await?;
    }
    Ok(cpu_secs(pid)
        .zip(before)
        .map(|(a, b)| (a - b) * 1e3 / f64::from(N)))
}

/// `farmer_build_phase_seconds` sums and counts by phase, in exposition order.
fn phases(metrics: &str) -> Vec<(String, (f64, u64))> {
    let mut out: Vec<(String, (f64, u64))> = Vec::new();
    for line in metrics.lines() {
        let (sum, rest) =
            if let Some(r) = line.strip_prefix("farmer_build_phase_seconds_sum{phase=\"") {
                (true, r)
            } else if let Some(r) = line.strip_prefix("farmer_build_phase_seconds_count{phase=\"") {
                (false, r)
            } else {
                continue;
            };
        let Some((name, value)) = rest.split_once("\"} ") else {
            continue;
        };
        let i = match out.iter().position(|(n, _)| n == name) {
            Some(i) => i,
            None => {
                out.push((name.to_string(), (0.0, 0)));
                out.len() - 1
            }
        };
        if sum {
            out[i].1.0 = value.parse().unwrap_or(0.0);
        } else {
            out[i].1.1 = value.parse().unwrap_or(0);
        }
    }
    out
}

struct DispatchSample {
    start_ms: f64,
    post_ms: f64,
    passed_ms: f64,
}

async fn dispatch_one(
    api: &Api,
    builder: &str,
    machine: &str,
    commit: &str,
) -> anyhow::Result<DispatchSample> {
    let wall = now_ns();
    let t0 = Instant::now();
    let id = api.trigger(builder, commit).await?;
    let post = t0.elapsed();
    // The build's log is followed live once it runs, and ends with the
    // build; before that (queued) it answers at once with one line saying
    // so. One streamed request per build instead of a poll per millisecond:
    // a poll of `/api/builds/ID` costs the coordinator about a millisecond
    // of CPU, which would take one of the two CPUs the dispatch runs on.
    let last_line = format!("farmer: build {id} ");
    let log = loop {
        let log = api.get_text(&format!("/api/builds/{id}/log")).await?;
        let status = log
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(&last_line))
            .unwrap_or("");
        match status.split([' ', ':']).next().unwrap_or("") {
            "passed" => break log,
            "queued" | "running" | "attempt" | "" => {}
            _ => bail!("build {id} ended {status:?}:\n{log}"),
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("build {id} did not pass within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let passed = t0.elapsed();
    let v = api.get_json(&format!("/api/builds/{id}")).await?;
    ensure!(
        v["build"]["status"].as_str() == Some("passed"),
        "build {id}: its log ended passed, its record says {}",
        v["build"]["status"]
    );
    // The machine is cleaned after the build is recorded; the next build
    // should again find it idle.
    let idle_since = Instant::now();
    while !machine_idle(api, machine).await? {
        if idle_since.elapsed() > Duration::from_secs(10) {
            bail!("{machine} did not become idle within 10 s after build {id}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let stamp: i128 = log
        .lines()
        .map(str::trim)
        .find(|l| l.len() >= 18 && l.bytes().all(|b| b.is_ascii_digit()))
        .with_context(|| format!("no `date +%s%N` output in the log of build {id}:\n{log}"))?
        .parse()?;
    Ok(DispatchSample {
        start_ms: (stamp - wall) as f64 / 1e6,
        post_ms: post.as_secs_f64() * 1e3,
        passed_ms: passed.as_secs_f64() * 1e3,
    })
}

// ---------------------------------------------------------------------------
// 2. Throughput

async fn bench_throughput(dir: &Path, repo: &Path, commit: &str) -> anyhow::Result<()> {
    throughput_on(dir, repo, commit, None).await.map(|_| ())
}

/// Throughput with the store at `database_url` (else SQLite).
async fn throughput_on(
    dir: &Path,
    repo: &Path,
    commit: &str,
    database_url: Option<&str>,
) -> anyhow::Result<f64> {
    println!();
    println!(
        "== throughput: {TPUT_BUILDLETS} buildlets, {TPUT_BUILDS} trivial builds (`true`) from {TPUT_CLIENTS} concurrent clients, store on {} ==",
        if database_url.is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        }
    );
    let config = farm_config(
        Some(repo),
        &[("host-bench-four", TPUT_BUILDLETS)],
        &[("nop", "host-bench-four", r#"command = ["true"]"#)],
    );
    let name = if database_url.is_some() {
        "throughput-pg"
    } else {
        "throughput"
    };
    let c = Coordinator::start_on(dir, name, &config, database_url)?;
    let api = Api::new(&c);
    let key = c.key("host-bench-four")?;
    let bots = start_buildlets(&c, dir, "host-bench-four", "four", TPUT_BUILDLETS, &key)?;
    wait_connected(
        &api,
        "host-bench-four",
        TPUT_BUILDLETS,
        Duration::from_secs(30),
    )
    .await?;
    wait_builds_done(&api, 1, Duration::from_secs(60)).await?;

    let finished0 = Finished::parse(&api.get_text("/metrics").await?);
    let cpu0 = cpu_secs(c.pid());
    let bots_cpu = || -> Option<(f64, f64)> {
        bots.iter().try_fold((0.0, 0.0), |(own, kids), b| {
            let (o, k) = cpu_split(b.child.id())?;
            Some((own + o, kids + k))
        })
    };
    let bots0 = bots_cpu();
    let machine0 = machine_cpu();
    let ticks0 = cpu_ticks();
    let t0 = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for k in 0..TPUT_CLIENTS {
        let api = api.clone();
        let commit = commit.to_string();
        let n = (k + 1) * TPUT_BUILDS / TPUT_CLIENTS - k * TPUT_BUILDS / TPUT_CLIENTS;
        clients.spawn(async move {
            for _ in 0..n {
                api.trigger("nop", &commit).await?;
            }
            anyhow::Ok(n)
        });
    }
    let mut submitted = 0;
    while let Some(r) = clients.join_next().await {
        submitted += r.context("a submitting client panicked")??;
    }
    let submit = t0.elapsed();
    let (done_at, last) = loop {
        let now = Finished::parse(&api.get_text("/metrics").await?);
        if now.total - finished0.total >= submitted as u64 {
            break (Some(t0.elapsed()), now);
        }
        if t0.elapsed() > TPUT_LIMIT {
            break (None, now);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let cpu = cpu_secs(c.pid()).zip(cpu0).map(|(a, b)| a - b);
    let bots_used = bots_cpu().zip(bots0).map(|(a, b)| (a.0 - b.0, a.1 - b.1));
    let machine_used = machine_cpu().zip(machine0).map(|(a, b)| a - b);
    let done = last.total - finished0.total;
    let passed = last.passed - finished0.passed;
    println!(
        "throughput: submitted {submitted} builds in {:.2} s ({:.0} POST/s)",
        submit.as_secs_f64(),
        submitted as f64 / submit.as_secs_f64()
    );
    let rate = match done_at {
        Some(t) => done as f64 / t.as_secs_f64(),
        None => done as f64 / TPUT_LIMIT.as_secs_f64(),
    };
    match done_at {
        Some(t) => {
            println!(
                "throughput: all {done} finished {:.2} s after the first POST: {rate:.0} builds/s  (goal >= {GOAL_BUILDS_PER_S}: {})",
                t.as_secs_f64(),
                if rate >= GOAL_BUILDS_PER_S {
                    "met"
                } else {
                    "NOT met"
                }
            );
        }
        None => println!(
            "throughput: only {done} of {submitted} finished within {} s: {:.0} builds/s  (goal >= {GOAL_BUILDS_PER_S}: NOT met)",
            TPUT_LIMIT.as_secs(),
            done as f64 / TPUT_LIMIT.as_secs_f64()
        ),
    }
    println!(
        "throughput: {passed} passed, {} other; coordinator CPU {}",
        done - passed,
        match cpu {
            Some(s) if done > 0 => {
                let per = s * 1e3 / done as f64;
                format!(
                    "{s:.2} s ({per:.2} ms per build; goal <= {GOAL_CPU_MS} ms: {})",
                    if per <= GOAL_CPU_MS { "met" } else { "NOT met" }
                )
            }
            _ => "n/a".to_string(),
        }
    );
    // Where the CPU of a build goes: 1,000 builds/s on 2 CPUs leaves
    // 2 ms per build for everything.
    if let (Some(coord), Some((own, kids)), Some(all)) = (cpu, bots_used, machine_used)
        && done > 0
    {
        let per = |s: f64| s * 1e3 / done as f64;
        println!(
            "throughput: CPU per build, ms: coordinator {:.2}, buildlets {:.2}, their commands (fork, exec, `true`) {:.2}, everything on the machine {:.2} (the bench's clients and the kernel's work included; the hypervisor's steal not)",
            per(coord),
            per(own),
            per(kids),
            per(all)
        );
    }
    if let Some(p) = steal_since(&ticks0) {
        println!(
            "throughput: the hypervisor took {p:.1} % of the CPUs' time during the run (steal; figures run slower by about that much)"
        );
    }
    // The bench watched the run through `/metrics`; what those scrapes
    // cost the coordinator is part of the CPU above.
    if let Some(ms) = cpu_per_get(&api, c.pid(), "/metrics").await? {
        println!(
            "throughput: one /metrics scrape costs the coordinator {ms:.3} ms of CPU; the run above scraped every 20 ms"
        );
    }
    ensure!(
        passed == done,
        "{} builds did not pass; see {}",
        done - passed,
        c.log.display()
    );
    Ok(rate)
}

/// A process's own CPU seconds and those of its reaped children.
#[cfg(unix)]
fn cpu_split(pid: u32) -> Option<(f64, f64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
    let f = |i: usize| fields.get(i)?.parse::<u64>().ok();
    // Fields 14-17 of stat(5) (utime, stime, cutime, cstime); index 0 is field 3.
    let own = f(11)? + f(12)?;
    let kids = f(13)? + f(14)?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (hz > 0.0).then(|| (own as f64 / hz, kids as f64 / hz))
}

#[cfg(not(unix))]
fn cpu_split(_pid: u32) -> Option<(f64, f64)> {
    None
}

/// CPU seconds the whole machine spent busy (all CPUs; /proc/stat).
/// The `cpu` line of `/proc/stat`: user nice system idle iowait irq
/// softirq steal..., in clock ticks.
fn cpu_ticks() -> Option<Vec<u64>> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = s.lines().next()?.strip_prefix("cpu ")?;
    Some(
        cpu.split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect(),
    )
}

/// CPU seconds the machine spent working (idle, iowait and what the
/// hypervisor stole left out).
fn machine_cpu() -> Option<f64> {
    let v = cpu_ticks()?;
    let busy: u64 = v
        .iter()
        .enumerate()
        .filter(|(i, _)| !matches!(i, 3 | 4 | 7))
        .map(|(_, x)| x)
        .sum();
    #[cfg(unix)]
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    #[cfg(not(unix))]
    let hz = 100.0;
    (hz > 0.0).then(|| busy as f64 / hz)
}

/// The share of all CPU time the hypervisor took (steal) since `before`
/// (from [`cpu_ticks`]): on a shared VM the figures of a section are slower
/// by about that much, and it varies from run to run.
fn steal_since(before: &Option<Vec<u64>>) -> Option<f64> {
    let (b, a) = (before.as_ref()?, cpu_ticks()?);
    let total = |v: &[u64]| v.iter().take(8).sum::<u64>();
    let all = total(&a).checked_sub(total(b))?;
    let stolen = a.get(7)?.checked_sub(*b.get(7)?)?;
    (all > 0).then(|| stolen as f64 * 100.0 / all as f64)
}

/// Finished-build counters from `/metrics` (`farmer_builds_finished_total`).
#[derive(Default)]
struct Finished {
    total: u64,
    passed: u64,
}

impl Finished {
    fn parse(metrics: &str) -> Finished {
        let mut f = Finished::default();
        for line in metrics.lines() {
            let Some(rest) = line.strip_prefix("farmer_builds_finished_total{") else {
                continue;
            };
            let Some(n) = rest.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            f.total += n;
            if rest.starts_with("status=\"passed\"") {
                f.passed += n;
            }
        }
        f
    }
}

// ---------------------------------------------------------------------------
// 3. Elastic machines

async fn bench_elastic(dir: &Path, repo: &Path, commit: &str) -> anyhow::Result<()> {
    println!();
    println!(
        "== elastic: exec pool (ephemeral, max {ELASTIC_MAX}) starting `farmer buildlet` per build: {ELASTIC_SEQUENTIAL} builds one at a time, then {ELASTIC_BURST} at once =="
    );
    let hooks = dir.join("elastic-hooks");
    std::fs::create_dir_all(hooks.join("pids"))?;
    let h = hooks.display();
    std::fs::write(
        hooks.join("create.sh"),
        format!(
            "mkdir -p {h}/$FARMER_HOSTNAME\n\
             BUILDLET_LOG=warn {FARMER} buildlet -coordinator=$FARMER_COORDINATOR -reverse-type=$FARMER_HOST_TYPE \
             -hostname=$FARMER_HOSTNAME -key-file=$FARMER_KEY_FILE -tls-pin=$FARMER_TLS_PIN \
             -workdir={h}/$FARMER_HOSTNAME/work -reboot=false > {h}/$FARMER_HOSTNAME/log 2>&1 < /dev/null &\n\
             echo $! > {h}/pids/$FARMER_HOSTNAME\n"
        ),
    )?;
    std::fs::write(
        hooks.join("destroy.sh"),
        format!(
            "kill -9 $(cat {h}/pids/$FARMER_HOSTNAME) 2>/dev/null; rm -f {h}/pids/$FARMER_HOSTNAME; rm -rf {h}/$FARMER_HOSTNAME\n"
        ),
    )?;
    let mut config = farm_config(
        Some(repo),
        &[],
        &[("elastic", "host-bench-elastic", r#"command = ["true"]"#)],
    );
    config.push_str(&format!(
        "[hosts.host-bench-elastic]\npool = \"exec\"\ncreate = [\"sh\", \"{h}/create.sh\"]\n\
         destroy = [\"sh\", \"{h}/destroy.sh\"]\nmax = {ELASTIC_MAX}\nephemeral = true\ntrusted = true\n"
    ));
    let c = Coordinator::start(dir, "elastic", &config)?;
    // Kills what the hooks started, also on a failure.
    let _reap = Reap(hooks.join("pids"));
    let api = Api::new(&c);
    wait_builds_done(&api, 1, Duration::from_secs(60)).await?;

    let mut lease = Vec::with_capacity(ELASTIC_SEQUENTIAL);
    for _ in 0..ELASTIC_SEQUENTIAL {
        let wall_ms = (now_ns() / 1_000_000) as i64;
        let id = api.trigger("elastic", commit).await?;
        let t0 = Instant::now();
        let started = loop {
            let v = api.get_json(&format!("/api/builds/{id}")).await?;
            match v["build"]["status"].as_str() {
                Some("queued" | "running") => {}
                Some("passed") => break v["build"]["started_at"].as_i64().unwrap_or(0),
                other => bail!("elastic build {id} ended {other:?}"),
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(60),
                "elastic build {id} did not pass within 60 s; see {}",
                c.log.display()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        lease.push((started - wall_ms) as f64);
        // Wait until the used machine is gone, so the next build starts cold.
        let t1 = Instant::now();
        while count_connected(&api, "host-bench-elastic").await? > 0 {
            ensure!(
                t1.elapsed() < Duration::from_secs(30),
                "the ephemeral machine of build {id} was not destroyed within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    println!(
        "elastic: lease request -> fresh machine registered and leased  {}  (ms resolution)",
        summary(&mut lease)
    );

    let finished0 = Finished::parse(&api.get_text("/metrics").await?);
    let created0 = created_machines(&api).await?;
    let t0 = Instant::now();
    for _ in 0..ELASTIC_BURST {
        api.trigger("elastic", commit).await?;
    }
    let done_at = loop {
        let now = Finished::parse(&api.get_text("/metrics").await?);
        if now.total - finished0.total >= ELASTIC_BURST as u64 {
            ensure!(
                now.passed - finished0.passed == ELASTIC_BURST as u64,
                "elastic builds did not all pass; see {}",
                c.log.display()
            );
            break t0.elapsed();
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(300),
            "{ELASTIC_BURST} elastic builds did not finish within 300 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let created = created_machines(&api).await? - created0;
    println!(
        "elastic: {ELASTIC_BURST} builds through fresh machines in {:.1} s: {:.1} builds/s, {created} machines created",
        done_at.as_secs_f64(),
        ELASTIC_BURST as f64 / done_at.as_secs_f64()
    );
    Ok(())
}

/// Machines the exec pool created so far (`/api/sources`).
async fn created_machines(api: &Api) -> anyhow::Result<u64> {
    let v = api.get_json("/api/sources").await?;
    Ok(v.as_array()
        .and_then(|a| a.iter().find(|s| s["kind"] == "exec"))
        .and_then(|s| s["created"].as_u64())
        .unwrap_or(0))
}

/// Kills the processes whose pid files are in a directory, when dropped.
struct Reap(PathBuf);

impl Drop for Reap {
    fn drop(&mut self) {
        for e in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            if let Ok(pid) = std::fs::read_to_string(e.path()) {
                let _ = Command::new("kill")
                    .args(["-9", pid.trim()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

// ---------------------------------------------------------------------------
// 4. Memory

async fn bench_memory(dir: &Path) -> anyhow::Result<()> {
    println!();
    println!(
        "== memory: coordinator RSS with 0 and {IDLE_CONNS} idle reverse connections (in-process buildlet tasks) =="
    );
    let config = farm_config(None, &[("host-bench-idle", IDLE_CONNS)], &[]);
    let c = Coordinator::start(dir, "memory", &config)?;
    let api = Api::new(&c);
    // Let the coordinator settle, and touch the API once, before the baseline.
    tokio::time::sleep(Duration::from_secs(1)).await;
    api.get_json("/api/machines").await?;
    let coord0 = rss_kb(&format!("/proc/{}/status", c.pid()));
    let self0 = rss_kb("/proc/self/status");

    let (tasks, connected) = connect_idle(
        &c,
        &api,
        IDLE_CONNS,
        "host-bench-idle",
        &dir.join("idle"),
        "memory",
    )
    .await?;
    // With their HTTP/2 sessions open (as while machines work).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let coord_soon = rss_kb(&format!("/proc/{}/status", c.pid()));
    let (parked, parked_after, coord1) = parked_rss(&c, &api, "host-bench-idle", connected).await?;
    let coord_hwm = hwm_kb(&format!("/proc/{}/status", c.pid()));
    let self1 = rss_kb("/proc/self/status");
    let still = count_connected(&api, "host-bench-idle").await?;
    drop(tasks);

    let per = |kb: u64, base: u64| (kb as f64 - base as f64) / connected.max(1) as f64;
    match (coord0, coord1) {
        (Some(a), Some(b)) => {
            println!("memory: coordinator RSS, 0 connections          {a} KB");
            if let Some(soon) = coord_soon {
                println!(
                    "memory: RSS, {connected} links in HTTP/2 sessions   {soon} KB ({:.1} KB per connection)",
                    per(soon, a)
                );
            }
            println!(
                "memory: {parked} of {connected} links parked {:.0} s after connecting",
                parked_after.as_secs_f64() + 2.0
            );
            println!(
                "memory: RSS, {connected} parked links, settled    {b} KB (peak {} KB)",
                coord_hwm.map_or("n/a".into(), |h| h.to_string())
            );
            let kb = per(b, a);
            println!(
                "memory: coordinator RSS per idle connection      {kb:.1} KB  (goal <= 16 KiB = 16.4 KB: {})",
                if kb <= 16.384 { "met" } else { "NOT met" }
            );
        }
        _ => println!("memory: coordinator RSS n/a (no /proc)"),
    }
    if let (Some(a), Some(b)) = (self0, self1) {
        println!(
            "memory: bench-side RSS per buildlet task         {:.1} KB  ({a} KB -> {b} KB for {connected} tasks)",
            (b as f64 - a as f64) / connected.max(1) as f64
        );
    }
    println!("memory: still connected at the RSS reading       {still}");
    Ok(())
}

/// Waits (at most 90 s) until all `n` idle links of `host_type` are parked
/// (after `park_after`, 15 s by default), then 12 s more for the
/// coordinator's next purge; returns how many parked, when, and the
/// coordinator's RSS then.
pub(crate) async fn parked_rss(
    c: &Coordinator,
    api: &Api,
    host_type: &str,
    n: usize,
) -> anyhow::Result<(usize, Duration, Option<u64>)> {
    let t0 = Instant::now();
    let mut parked = 0;
    while t0.elapsed() < Duration::from_secs(90) {
        parked = count_parked(api, host_type).await?;
        if parked >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let after = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(12)).await;
    Ok((parked, after, rss_kb(&format!("/proc/{}/status", c.pid()))))
}

/// How many machines of `host_type` have their links parked, from `/metrics`.
async fn count_parked(api: &Api, host_type: &str) -> anyhow::Result<usize> {
    let text = api.get_text("/metrics").await?;
    let needle = format!("farmer_machines{{host_type=\"{host_type}\",state=\"parked\"}} ");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}

/// Dials `n` in-process reverse buildlets of `host_type` to `c` (work dirs
/// under `workdirs`) and waits up to a minute for them to be connected;
/// returns their tasks and how many connected.
async fn connect_idle(
    c: &Coordinator,
    api: &Api,
    n: usize,
    host_type: &str,
    workdirs: &Path,
    label: &str,
) -> anyhow::Result<(Tasks, usize)> {
    let key = c.key(host_type)?;
    let pin = buildlet::reverse::parse_pin(&c.pin)
        .with_context(|| format!("the coordinator printed a bad pin {:?}", c.pin))?;
    let t0 = Instant::now();
    let mut tasks = Tasks(Vec::with_capacity(n));
    for i in 0..n {
        let hostname = format!("idle-{i:04}");
        let mut cfg = buildlet::server::Config::new(workdirs.join(&hostname));
        cfg.hostname = hostname.clone();
        let b = buildlet::server::Buildlet::new(cfg)?;
        let rc = buildlet::reverse::ReverseConfig {
            coordinators: vec![c.addr.clone()],
            host_type: host_type.into(),
            hostname,
            key: key.clone(),
            token_file: None,
            tls: buildlet::reverse::Tls::Pinned(pin),
        };
        tasks.0.push(tokio::spawn(async move {
            let _ = buildlet::reverse::run(b, rc).await;
        }));
        if i % 100 == 99 {
            // Pace the dialling a little so the accept backlog never overflows.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let limit = Duration::from_secs(60);
    let mut connected;
    loop {
        connected = count_connected(api, host_type).await?;
        if connected >= n || t0.elapsed() > limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if connected < n {
        println!(
            "{label}: WARNING only {connected} of {n} connected within {} s; figures below are for {connected}",
            limit.as_secs()
        );
    } else {
        println!(
            "{label}: {connected} buildlets connected {:.2} s after the first dial",
            t0.elapsed().as_secs_f64()
        );
    }
    Ok((tasks, connected))
}

/// Aborts the in-process buildlet tasks when dropped (also on a panic).
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

// ---------------------------------------------------------------------------
// Processes

/// A child process, killed when dropped (also on a panic).
struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `farmer serve` process.
struct Coordinator {
    proc: Proc,
    addr: String,
    pin: String,
    token: String,
    data_dir: PathBuf,
    log: PathBuf,
}

impl Coordinator {
    fn start(dir: &Path, name: &str, config: &str) -> anyhow::Result<Coordinator> {
        Coordinator::start_on(dir, name, config, None)
    }

    /// A coordinator whose store is at `database_url` (else SQLite in its
    /// data dir).
    fn start_on(
        dir: &Path,
        name: &str,
        config: &str,
        database_url: Option<&str>,
    ) -> anyhow::Result<Coordinator> {
        let config_path = dir.join(format!("{name}.toml"));
        std::fs::write(&config_path, config)?;
        let data_dir = dir.join(format!("{name}-data"));
        let log = dir.join(format!("{name}-coordinator.log"));
        let err = File::create(&log)?;
        let mut cmd = Command::new(FARMER);
        cmd.args(["serve", "--config"]).arg(&config_path);
        if let Some(u) = database_url {
            cmd.args(["--database-url", u]);
        }
        let child = cmd
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .env("FARMER_LOG", "warn")
            // See `start_buildlet`.
            .env_remove("LD_LIBRARY_PATH")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {FARMER} serve"))?;
        let mut proc = Proc { child };
        let stdout = proc.child.stdout.take().context("no stdout pipe")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Keeps draining stdout after the banner was read.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut addr, mut pin) = (None, None);
        while addr.is_none() || pin.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let why = match proc.child.try_wait() {
                    Ok(Some(st)) => format!("exited ({st})"),
                    _ => "did not print its address and pin within 60 s".into(),
                };
                bail!(
                    "the {name} coordinator {why}; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            };
            if let Some(a) = line.strip_prefix("listening on ") {
                addr = Some(a.trim().to_string());
            }
            if let Some(p) = line.split("-tls-pin=").nth(1) {
                pin = p.split_whitespace().next().map(str::to_string);
            }
        }
        let token = std::fs::read_to_string(data_dir.join("admin.token"))
            .context("reading admin.token")?
            .trim()
            .to_string();
        Ok(Coordinator {
            proc,
            addr: addr.unwrap_or_default(),
            pin: pin.unwrap_or_default(),
            token,
            data_dir,
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    /// A builder key for `host_type`, from `farmer genbuilderkey`.
    fn key(&self, host_type: &str) -> anyhow::Result<String> {
        let out = Command::new(FARMER)
            .args(["genbuilderkey", host_type, "--data-dir"])
            .arg(&self.data_dir)
            .output()?;
        ensure!(
            out.status.success(),
            "genbuilderkey {host_type}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }
}

/// `n` buildlets of `host_type` named `PREFIX-1` … `PREFIX-n`.
fn start_buildlets(
    c: &Coordinator,
    dir: &Path,
    host_type: &str,
    prefix: &str,
    n: usize,
    key: &str,
) -> anyhow::Result<Vec<Proc>> {
    (1..=n)
        .map(|i| start_buildlet(c, dir, host_type, &format!("{prefix}-{i}"), key))
        .collect()
}

/// Starts `farmer buildlet` in reverse mode with a key file and the pin.
fn start_buildlet(
    c: &Coordinator,
    dir: &Path,
    host_type: &str,
    hostname: &str,
    key: &str,
) -> anyhow::Result<Proc> {
    let home = dir.join(format!("bot-{hostname}"));
    std::fs::create_dir_all(&home)?;
    let key_file = home.join("builder.key");
    std::fs::write(&key_file, key)?;
    let log = File::create(home.join("buildlet.log"))?;
    let child = Command::new(FARMER)
        .arg("buildlet")
        .arg(format!("-coordinator={}", c.addr))
        .arg(format!("-reverse-type={host_type}"))
        .arg(format!("-hostname={hostname}"))
        .arg(format!("-key-file={}", key_file.display()))
        .arg(format!("-tls-pin={}", c.pin))
        .arg(format!("-workdir={}", home.join("work").display()))
        .arg("-reboot=false")
        // FARMER_BENCH_BUILDLET_ARGS: more flags for every buildlet, to
        // compare settings (e.g. `-spawn=fork`).
        .args(
            std::env::var("FARMER_BENCH_BUILDLET_ARGS")
                .unwrap_or_default()
                .split_whitespace(),
        )
        .env("HOME", &home)
        .env_remove("GO_BUILD_KEY_PATH")
        .env("BUILDLET_LOG", "warn")
        // Cargo runs the bench with its build dirs in LD_LIBRARY_PATH; a
        // machine's steps would inherit it and the dynamic loader of every
        // command would try each of them first (some 80 failed opens per
        // `true`), which no real machine pays.
        .env_remove("LD_LIBRARY_PATH")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {FARMER} buildlet"))?;
    Ok(Proc { child })
}

/// A one-file repository on branch `main`; returns the commit hash.
fn make_repo(path: &Path) -> anyhow::Result<String> {
    make_repo_with(path, &[("README", "farmer coordinator bench\n")])
}

/// A repository on branch `main` with one commit of `files`; returns the
/// commit hash.
fn make_repo_with(path: &Path, files: &[(&str, &str)]) -> anyhow::Result<String> {
    std::fs::create_dir_all(path)?;
    git(path, &["init", "-q", "-b", "main"])?;
    for (name, text) in files {
        std::fs::write(path.join(name), text)?;
    }
    git(path, &["add", "-A"])?;
    git(
        path,
        &[
            "-c",
            "user.name=Bench",
            "-c",
            "user.email=bench@example.com",
            "commit",
            "-q",
            "-m",
            "bench",
        ],
    )?;
    Ok(git(path, &["rev-parse", "HEAD"])?.trim().to_string())
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .current_dir(dir)
        .args(args)
        .output()
        .context("running git")?;
    ensure!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// A farm config: reverse host types with their expected counts, and
/// one-step builders `(name, host type, step command line)`.
fn farm_config(
    repo: Option<&Path>,
    hosts: &[(&str, usize)],
    builders: &[(&str, &str, &str)],
) -> String {
    let mut s = String::new();
    if let Some(r) = repo {
        // A long poll interval: the only poll that matters is the first.
        s.push_str(&format!(
            "[repos.r]\nurl = \"{}\"\nbranches = [\"main\"]\npoll_interval = \"1h\"\n\n",
            r.display()
        ));
    }
    for (name, expected) in hosts {
        s.push_str(&format!(
            "[hosts.{name}]\npool = \"reverse\"\nexpected = {expected}\ntrusted = true\ngomote = true\n\n"
        ));
    }
    for (name, host, step) in builders {
        s.push_str(&format!(
            "[builders.{name}]\nhost = \"{host}\"\nrepos = [\"r\"]\ntimeout = \"1m\"\n[[builders.{name}.steps]]\nname = \"only\"\n{step}\ntimeout = \"30s\"\n\n"
        ));
    }
    s
}

// ---------------------------------------------------------------------------
// 5. gomote

const GOMOTE_CREATES: usize = 20;
const GOMOTE_RUNS: usize = 200;
const GOMOTE_FILES: usize = 10_000;

async fn bench_gomote(dir: &Path) -> anyhow::Result<()> {
    println!();
    println!(
        "== gomote: 1 idle buildlet; {GOMOTE_CREATES} create -> ready, {GOMOTE_RUNS} `run INST true`, push of {GOMOTE_FILES} files =="
    );
    let config = farm_config(None, &[("host-bench-gomote", 1)], &[]);
    let c = Coordinator::start(dir, "gomote", &config)?;
    let api = Api::new(&c);
    let key = c.key("host-bench-gomote")?;
    let _bot = start_buildlet(&c, dir, "host-bench-gomote", "gomote-1", &key)?;
    wait_connected(&api, "host-bench-gomote", 1, Duration::from_secs(30)).await?;
    let out = Command::new(FARMER)
        .args(["user", "add", "bench", "--coordinator"])
        .arg(format!("http://{}", c.addr))
        .arg("--data-dir")
        .arg(&c.data_dir)
        .output()?;
    ensure!(
        out.status.success(),
        "farmer user add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)?.trim().to_string();
    let g = coordinator::gomote::cli::Coord::new(&coordinator::gomote::cli::Login {
        coordinator: format!("http://{}", c.addr),
        token,
        tls_pin: None,
    })?;
    let post = http::Method::POST;
    let mut ready = Vec::new();
    let mut name = String::new();
    for i in 0..=GOMOTE_CREATES {
        let t = Instant::now();
        let v = g
            .call(
                post.clone(),
                "/api/gomote/instances",
                Some(serde_json::json!({ "builder": "host-bench-gomote" })),
            )
            .await?;
        name = v["name"].as_str().unwrap_or_default().to_string();
        let v = g
            .call(
                http::Method::GET,
                &format!("/api/gomote/instances/{name}?wait=30"),
                None,
            )
            .await?;
        ensure!(v["state"] == "ready", "{name} not ready: {v}");
        ready.push(t.elapsed().as_secs_f64() * 1e3);
        if i == GOMOTE_CREATES {
            break;
        }
        g.call(
            http::Method::DELETE,
            &format!("/api/gomote/instances/{name}"),
            None,
        )
        .await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !machine_idle(&api, "gomote-1").await? {
            ensure!(
                Instant::now() < deadline,
                "the machine never came back idle"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    println!("create -> instance ready     {}", summary(&mut ready));

    let client = g.instance(&name, false);
    let opts = buildlet::client::ExecOptions {
        sys: true,
        ..Default::default()
    };
    let mut runs = Vec::new();
    for _ in 0..GOMOTE_RUNS {
        let t = Instant::now();
        let (st, _) = client.exec_output("true", &opts).await?;
        ensure!(st.success(), "true failed: {st:?}");
        runs.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!("run INST true round trip     {}", summary(&mut runs));

    let tree = dir.join("gomote-tree");
    for i in 0..GOMOTE_FILES {
        let d = tree.join(format!("d{}", i % 100));
        std::fs::create_dir_all(&d)?;
        std::fs::write(
            d.join(format!("f{i}.txt")),
            format!("file {i}\n{}", "x".repeat(300)),
        )?;
    }
    let client = g.instance(&name, true);
    let t = Instant::now();
    let first = coordinator::gomote::push::push(&client, &tree, "tree").await?;
    let full = t.elapsed();
    std::fs::write(tree.join("d7/f7.txt"), "changed\n")?;
    let t = Instant::now();
    let second = coordinator::gomote::push::push(&client, &tree, "tree").await?;
    let incremental = t.elapsed();
    ensure!(
        second.sent == 1,
        "the second push sent {} files",
        second.sent
    );
    println!(
        "push {GOMOTE_FILES} files: first {:.0} ms ({first}); after changing one: {:.0} ms ({second})",
        full.as_secs_f64() * 1e3,
        incremental.as_secs_f64() * 1e3
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// The coordinator's HTTP API

#[derive(Clone)]
struct Api {
    http: HttpClient<HttpConnector, Full<Bytes>>,
    base: String,
    token: String,
}

impl Api {
    fn new(c: &Coordinator) -> Api {
        Api {
            http: HttpClient::builder(TokioExecutor::new()).build_http(),
            base: format!("http://{}", c.addr),
            token: c.token.clone(),
        }
    }

    async fn request(&self, post: Option<String>, path: &str) -> anyhow::Result<(u16, Bytes)> {
        let mut req = http::Request::builder().uri(format!("{}{path}", self.base));
        if post.is_some() {
            req = req
                .method(http::Method::POST)
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(
                    http::header::AUTHORIZATION,
                    format!("Bearer {}", self.token),
                );
        }
        let req = req.body(Full::new(Bytes::from(post.unwrap_or_default())))?;
        let exchange = async {
            let resp = self.http.request(req).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| anyhow!("{path}: no answer within {REQUEST_TIMEOUT:?}"))?
            .with_context(|| format!("request to {path}"))
    }

    async fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let (status, body) = self.request(None, path).await?;
        let text = String::from_utf8_lossy(&body).into_owned();
        ensure!(status == 200, "GET {path}: {status}: {text}");
        Ok(text)
    }

    async fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let text = self.get_text(path).await?;
        serde_json::from_str(&text).with_context(|| format!("GET {path}: not JSON: {text}"))
    }

    /// `POST /api/builds` of an interactive build; returns its id.
    async fn trigger(&self, builder: &str, commit: &str) -> anyhow::Result<i64> {
        let body = serde_json::json!({"builder": builder, "commit": commit, "kind": "interactive"});
        let (status, resp) = self.request(Some(body.to_string()), "/api/builds").await?;
        let v: Value = serde_json::from_slice(&resp).unwrap_or(Value::Null);
        match (status, v["id"].as_i64()) {
            (201, Some(id)) => Ok(id),
            _ => bail!(
                "POST /api/builds: {status}: {}",
                String::from_utf8_lossy(&resp)
            ),
        }
    }
}

async fn count_connected(api: &Api, host_type: &str) -> anyhow::Result<usize> {
    let v = api.get_json("/api/machines").await?;
    Ok(v["connected"].as_array().map_or(0, |a| {
        a.iter().filter(|m| m["host_type"] == host_type).count()
    }))
}

async fn machine_idle(api: &Api, hostname: &str) -> anyhow::Result<bool> {
    let v = api.get_json("/api/machines").await?;
    Ok(v["connected"].as_array().is_some_and(|a| {
        a.iter()
            .any(|m| m["hostname"] == hostname && m["state"] == "idle")
    }))
}

async fn wait_connected(
    api: &Api,
    host_type: &str,
    n: usize,
    limit: Duration,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        let got = count_connected(api, host_type).await?;
        if got >= n {
            return Ok(());
        }
        if t0.elapsed() > limit {
            bail!("only {got} of {n} {host_type} buildlets connected within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until at least `n` builds exist and none is queued or running.
async fn wait_builds_done(api: &Api, n: usize, limit: Duration) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        let v = api.get_json("/api/builds?limit=1000").await?;
        let builds = v.as_array().cloned().unwrap_or_default();
        let open = builds
            .iter()
            .filter(|b| matches!(b["status"].as_str(), Some("queued" | "running")))
            .count();
        if builds.len() >= n && open == 0 {
            return Ok(());
        }
        if t0.elapsed() > limit {
            bail!("{} builds, {open} still open after {limit:?}", builds.len());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `farmer_dispatch_latency_seconds` from `/metrics`.
#[derive(Debug, Clone, Default)]
struct Histogram {
    /// (upper bound in seconds, cumulative count)
    buckets: Vec<(f64, u64)>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn parse(metrics: &str) -> Histogram {
        const NAME: &str = "farmer_dispatch_latency_seconds";
        let mut h = Histogram::default();
        for line in metrics.lines() {
            let Some(rest) = line.strip_prefix(NAME) else {
                continue;
            };
            let Some((key, value)) = rest.rsplit_once(' ') else {
                continue;
            };
            if let Some(le) = key
                .strip_prefix("_bucket{le=\"")
                .and_then(|k| k.strip_suffix("\"}"))
            {
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or(f64::NAN)
                };
                h.buckets.push((le, value.parse().unwrap_or(0)));
            } else if key == "_sum" {
                h.sum = value.parse().unwrap_or(0.0);
            } else if key == "_count" {
                h.count = value.parse().unwrap_or(0);
            }
        }
        h
    }

    fn minus(&self, before: &Histogram) -> Histogram {
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|&(le, n)| {
                    let b = before
                        .buckets
                        .iter()
                        .find(|(l, _)| *l == le)
                        .map_or(0, |(_, n)| *n);
                    (le, n.saturating_sub(b))
                })
                .collect(),
            sum: self.sum - before.sum,
            count: self.count.saturating_sub(before.count),
        }
    }

    /// The upper bound of the bucket holding quantile `q`.
    fn quantile_bound(&self, q: f64) -> Option<f64> {
        let want = (q * self.count as f64).ceil().max(1.0) as u64;
        self.buckets
            .iter()
            .find(|(_, n)| *n >= want)
            .map(|(le, _)| *le)
    }

    fn describe(&self) -> String {
        if self.count == 0 {
            return "no observations".into();
        }
        let ms = |s: Option<f64>| match s {
            Some(s) if s.is_finite() => format!("<= {} ms", s * 1e3),
            Some(_) => "> last bucket".into(),
            None => "n/a".into(),
        };
        let mut below = Vec::new();
        for (le, n) in &self.buckets {
            if le.is_finite() && *le <= 0.01 {
                below.push(format!("<={}ms:{n}", le * 1e3));
            }
        }
        format!(
            "mean {:.3} ms, p50 {}, p99 {} [{}]",
            self.sum / self.count as f64 * 1e3,
            ms(self.quantile_bound(0.5)),
            ms(self.quantile_bound(0.99)),
            below.join(" ")
        )
    }
}

// ---------------------------------------------------------------------------
// Small helpers

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// The `q` quantile (nearest rank) of `v`, sorting it.
fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn summary(v: &mut [f64]) -> String {
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    format!(
        "p50 {:7.3} ms  p99 {:7.3} ms  mean {:7.3} ms  min {:7.3} ms  max {:7.3} ms",
        percentile(v, 0.5),
        percentile(v, 0.99),
        mean,
        percentile(v, 0.0),
        percentile(v, 1.0)
    )
}

fn status_field_kb(status_file: &str, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(status_file).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Resident set (`VmRSS`) in KB, from a `/proc/PID/status` file.
fn rss_kb(status_file: &str) -> Option<u64> {
    status_field_kb(status_file, "VmRSS:")
}

/// Peak resident set (`VmHWM`) in KB.
fn hwm_kb(status_file: &str) -> Option<u64> {
    status_field_kb(status_file, "VmHWM:")
}

/// User + system CPU seconds of a process, from `/proc/PID/stat`.
#[cfg(unix)]
fn cpu_secs(pid: u32) -> Option<f64> {
    cpu_split(pid).map(|(own, _)| own)
}

#[cfg(not(unix))]
fn cpu_secs(_pid: u32) -> Option<f64> {
    None
}

/// Raises the soft open-files limit to the hard one (at most 65,536), so the
/// coordinator started afterwards inherits room for every connection.
#[cfg(unix)]
fn raise_nofile() -> Option<String> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write to / read from a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return None;
        }
        let want = r.rlim_max.min(65_536);
        if r.rlim_cur < want {
            r.rlim_cur = want;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                eprintln!(
                    "coordinator bench: cannot raise RLIMIT_NOFILE: {}",
                    std::io::Error::last_os_error()
                );
            }
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        }
    }
    Some(r.rlim_cur.to_string())
}

#[cfg(not(unix))]
fn raise_nofile() -> Option<String> {
    None
}
