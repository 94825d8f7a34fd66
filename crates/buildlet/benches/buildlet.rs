//! End-to-end figures for the buildlet: throughput, latency and memory.
//!
//! Run with `cargo bench -p buildlet` (set `FARMER_BENCH_MB=50` for a quicker
//! run on a smaller tree; the default is 200). It prints figures and asserts
//! nothing about speed; it only fails when the buildlet answers wrongly.
//!
//! The bench starts the real `buildlet` binary on `127.0.0.1:0` with a fresh
//! work dir and drives it through [`buildlet::client::Client`]:
//!
//! 1. **Data.** It generates a deterministic source-like tree (lines of
//!    identifiers, keywords, numbers and comments; files of 1–64 KB in nested
//!    directories, about 100 files per MB, compressing 3–5x under gzip) and
//!    measures, in MB of source bytes per second:
//!    * *push*: packing the tree to tar.gz (level 1) streamed into
//!      `PUT /writetgz`, until the buildlet has extracted it;
//!    * *pull to sink*: `GET /tgz` of that tree, discarding the bytes;
//!    * *pull + extract*: `GET /tgz` streamed into a local extraction;
//!    * baselines on the same tree with the usual tools:
//!      `tar cf - | gzip | gunzip | tar xf -` (and with `gzip -1`, the level the
//!      buildlet uses), and `tar cf - | gzip -1 >/dev/null` for the pull to sink.
//!      The buildlet figures are printed as ratios to these (above 1x: faster).
//! 2. **Latency.** The round trip of `POST /exec` running the system's `true`
//!    (20 warm-up runs, then 500 measured): p50, p99 and mean.
//! 3. **Memory.** The buildlet's resident set (`VmRSS`, Linux only) when idle
//!    after start, and again one second after the workload ended, against the
//!    target of under 10 MB; plus its peak (`VmHWM`).
//! 4. **Reverse mode.** The same binary as volunteers run it: dialling a
//!    coordinator (a minimal one made by the bench, see `buildlet/reverse.rs`)
//!    over TLS and serving it over HTTP/2. Its resident set 1 s after
//!    registering and once it has been idle long enough to give memory
//!    back (`IDLE_RELEASE`; goal: 5 MiB); then 1 s after the tree was
//!    pushed over that link and `true` run 20 times, and once idle again
//!    (goal: 10 MiB). Heap and stacks (`RssAnon`) are shown beside it: the
//!    rest is the program's code, mapped from its file.
//!
//! MB means 10^6 bytes throughout. Everything lives in one temp dir that is
//! removed at the end; the buildlet is killed at the end, also on a panic.

#[path = "buildlet/reverse.rs"]
mod reverse;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use buildlet::client::{Client, ExecOptions};
use buildlet::proto::ProcessState;
use buildlet::tarball;
use tokio::io::AsyncWriteExt;
use tokio_util::io::SyncIoBridge;

const MB: f64 = 1e6;
const DEFAULT_MB: u64 = 200;
const EXEC_WARMUP: usize = 20;
const EXEC_RUNS: usize = 500;

fn main() {
    let mb = match std::env::var("FARMER_BENCH_MB") {
        Ok(s) => match s.trim().parse::<u64>() {
            Ok(n) if (1..=100_000).contains(&n) => n,
            _ => {
                eprintln!("FARMER_BENCH_MB={s:?}: want a whole number of MB from 1 to 100000");
                std::process::exit(2);
            }
        },
        Err(_) => DEFAULT_MB,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("starting the tokio runtime");
    if let Err(e) = runtime.block_on(run(mb)) {
        eprintln!("buildlet bench failed: {e:#}");
        std::process::exit(1);
    }
}

async fn run(mb: u64) -> anyhow::Result<()> {
    // Declared first so it is dropped last, after the buildlet is killed.
    let base = tempfile::Builder::new()
        .prefix("farmer-buildlet-bench")
        .tempdir()
        .context("creating the temp dir")?;
    let base_path = base
        .path()
        .canonicalize()
        .context("canonicalizing the temp dir")?;
    let src = base_path.join("src");

    println!("farmer buildlet bench ({mb} MB; FARMER_BENCH_MB overrides)");
    let t = Instant::now();
    let tree = {
        let src = src.clone();
        tokio::task::spawn_blocking(move || generate_tree(&src, mb * 1_000_000))
            .await
            .context("tree generator panicked")?
            .context("generating the source tree")?
    };
    let total = tree.bytes as f64;
    println!(
        "source tree             {:.1} MB in {} files, {} dirs (generated in {:.2} s)",
        total / MB,
        tree.files,
        tree.dirs,
        t.elapsed().as_secs_f64()
    );

    let server = Server::start(&base_path.join("workdir"))?;
    let client = Client::new(&server.addr, None);
    client.healthz().await.context("GET /healthz")?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_idle = proc_mem(server.pid(), "VmRSS");
    let workdir = PathBuf::from(client.workdir().await.context("GET /workdir")?);

    // 1a. Push: pack (level 1) streamed into PUT /writetgz.
    let sent = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    push(&client, &src, "src", sent.clone()).await?;
    let push_t = t.elapsed();
    let tgz_len = sent.load(Ordering::Relaxed);
    check_tree(&workdir.join("src"), &tree, "pushed tree on the buildlet")?;

    // 1b. Pull to sink.
    let t = Instant::now();
    let pulled = client
        .get_tgz("src", &mut tokio::io::sink(), None)
        .await
        .context("GET /tgz to sink")?;
    let pull_sink_t = t.elapsed();

    // 1b'. Pull and extract locally.
    let dst = base_path.join("pulled");
    std::fs::create_dir(&dst)?;
    let t = Instant::now();
    let stats = pull_extract(&client, "src", &dst).await?;
    let pull_extract_t = t.elapsed();
    ensure!(
        stats.bytes == tree.bytes && stats.files == tree.files,
        "pulled tree has {} files, {} bytes; want {} files, {} bytes",
        stats.files,
        stats.bytes,
        tree.files,
        tree.bytes
    );
    std::fs::remove_dir_all(&dst)?;

    // 1c. Baselines with the usual tools.
    let pipe6_t = pipe(&base_path, &src, "gzip", true, &tree).await?;
    let pipe1_t = pipe(&base_path, &src, "gzip -1", true, &tree).await?;
    let pack1_t = pipe(&base_path, &src, "gzip -1", false, &tree).await?;

    let rate = |d: Duration| total / MB / d.as_secs_f64();
    let line = |label: &str, d: Duration| {
        format!(
            "{label:<24}{:.1} MB in {:.2} s = {:.1} MB/s",
            total / MB,
            d.as_secs_f64(),
            rate(d)
        )
    };
    let vs_pipes = |d: Duration| {
        format!(
            "({:.2}x the tar|gzip|gunzip|tar pipe, {:.2}x with gzip -1)",
            rate(d) / rate(pipe6_t),
            rate(d) / rate(pipe1_t)
        )
    };
    println!();
    println!(
        "tar.gz level 1          {:.1} MB pushed, {:.1} MB pulled ({:.2}x smaller than the source)",
        tgz_len as f64 / MB,
        pulled as f64 / MB,
        total / tgz_len.max(1) as f64
    );
    println!("{} {}", line("push", push_t), vs_pipes(push_t));
    println!(
        "{} ({:.2}x tar|gzip -1 >/dev/null)",
        line("pull to sink", pull_sink_t),
        rate(pull_sink_t) / rate(pack1_t)
    );
    println!(
        "{} {}",
        line("pull + extract", pull_extract_t),
        vs_pipes(pull_extract_t)
    );
    println!("{}", line("tar|gzip|gunzip|tar", pipe6_t));
    println!("{}", line("tar|gzip -1|gunzip|tar", pipe1_t));
    println!("{}", line("tar|gzip -1 >/dev/null", pack1_t));

    // 2. Latency of exec true.
    let opts = ExecOptions {
        sys: true,
        ..Default::default()
    };
    for _ in 0..EXEC_WARMUP {
        exec_true(&client, &opts).await?;
    }
    let mut times = Vec::with_capacity(EXEC_RUNS);
    for _ in 0..EXEC_RUNS {
        let t = Instant::now();
        exec_true(&client, &opts).await?;
        times.push(t.elapsed());
    }
    times.sort();
    let mean = times.iter().sum::<Duration>() / EXEC_RUNS as u32;
    println!();
    println!(
        "exec true               p50 {}, p99 {}, mean {} ({EXEC_RUNS} runs after {EXEC_WARMUP} warm-up)",
        fmt_dur(percentile(&times, 50)),
        fmt_dur(percentile(&times, 99)),
        fmt_dur(mean)
    );

    // 3. Memory.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = proc_mem(server.pid(), "VmRSS");
    let hwm = proc_mem(server.pid(), "VmHWM");
    println!();
    println!(
        "buildlet RSS            idle after start {}, idle 1 s after the workload {} (target: under 10 MB); peak {}",
        fmt_mem(rss_idle),
        fmt_mem(rss_after),
        fmt_mem(hwm)
    );

    drop(server);

    // 4. Reverse mode. An idle buildlet gives memory back after
    // IDLE_RELEASE without work; both sides of that are shown.
    let settle = buildlet::server::IDLE_RELEASE + Duration::from_secs(2);
    let rev = reverse::start(&base_path).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rev_fresh = proc_mem(rev.pid(), "VmRSS");
    tokio::time::sleep(settle).await;
    let rev_idle = (proc_mem(rev.pid(), "VmRSS"), proc_mem(rev.pid(), "RssAnon"));
    let t = Instant::now();
    push(&rev.client, &src, "src", Arc::new(AtomicU64::new(0))).await?;
    let rev_push_t = t.elapsed();
    let rev_wd = PathBuf::from(
        rev.client
            .workdir()
            .await
            .context("GET /workdir (reverse)")?,
    );
    check_tree(
        &rev_wd.join("src"),
        &tree,
        "tree pushed over the reverse link",
    )?;
    for _ in 0..EXEC_WARMUP {
        exec_true(&rev.client, &opts).await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rev_busy = proc_mem(rev.pid(), "VmRSS");
    tokio::time::sleep(settle).await;
    let rev_after = (proc_mem(rev.pid(), "VmRSS"), proc_mem(rev.pid(), "RssAnon"));
    let rev_hwm = proc_mem(rev.pid(), "VmHWM");
    println!();
    println!(
        "reverse (TLS, HTTP/2)   push {:.1} MB in {:.2} s = {:.1} MB/s",
        total / MB,
        rev_push_t.as_secs_f64(),
        rate(rev_push_t)
    );
    println!(
        "buildlet RSS, reverse   idle {} s after registering {} (heap and stacks {}; goal: 5 MiB); 1 s after registering {}",
        settle.as_secs() + 1,
        fmt_mem(rev_idle.0),
        fmt_mem(rev_idle.1),
        fmt_mem(rev_fresh)
    );
    println!(
        "buildlet RSS, reverse   idle {} s after the push {} (heap and stacks {}; goal: 10 MiB); 1 s after it {}; peak {}",
        settle.as_secs(),
        fmt_mem(rev_after.0),
        fmt_mem(rev_after.1),
        fmt_mem(rev_busy),
        fmt_mem(rev_hwm)
    );
    drop(rev);
    Ok(())
}

/// The buildlet child process, killed when dropped.
struct Server {
    child: Child,
    addr: String,
    // Kept open so the buildlet never writes to a closed pipe.
    _stdout: BufReader<ChildStdout>,
}

impl Server {
    fn start(workdir: &Path) -> anyhow::Result<Server> {
        let bin = env!("CARGO_BIN_EXE_buildlet");
        let mut child = Command::new(bin)
            .arg("-listen=127.0.0.1:0")
            .arg(format!("-workdir={}", workdir.display()))
            .env(
                "BUILDLET_LOG",
                std::env::var("BUILDLET_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        // Guard from here on so a failure below still kills the child.
        let mut server = Server {
            child,
            addr: String::new(),
            _stdout: BufReader::new(stdout),
        };
        let mut first = String::new();
        server
            ._stdout
            .read_line(&mut first)
            .context("reading the buildlet's first line")?;
        match first.trim().strip_prefix("listening on ") {
            Some(a) if !a.is_empty() => server.addr = a.to_string(),
            _ => bail!("buildlet's first line is {first:?}, want \"listening on ADDR\""),
        }
        Ok(server)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Packs `src` at level 1 on a blocking thread, streaming it into `PUT /writetgz`.
async fn push(client: &Client, src: &Path, dir: &str, sent: Arc<AtomicU64>) -> anyhow::Result<()> {
    let (w, r) = tokio::io::duplex(256 * 1024);
    let bridge = SyncIoBridge::new(w);
    let src = src.to_path_buf();
    let packer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let buf = std::io::BufWriter::with_capacity(256 * 1024, bridge);
        let buf = tarball::pack(&src, buf, 1)?;
        let mut bridge = buf.into_inner().map_err(|e| e.into_error())?;
        bridge.shutdown()
    });
    let progress: buildlet::client::Progress = Arc::new(move |n| sent.store(n, Ordering::Relaxed));
    let put = client.put_tgz(dir, r, Some(progress)).await;
    let packed = packer.await.context("packer panicked")?;
    put.context("PUT /writetgz")?;
    packed.context("packing the source tree")?;
    Ok(())
}

/// Streams `GET /tgz?dir=` into a local extraction into `dst` (canonical).
async fn pull_extract(
    client: &Client,
    dir: &str,
    dst: &Path,
) -> anyhow::Result<tarball::ExtractStats> {
    let (mut w, r) = tokio::io::duplex(256 * 1024);
    let reader = SyncIoBridge::new(r);
    let dst = dst.to_path_buf();
    let extractor = tokio::task::spawn_blocking(move || tarball::extract(reader, &dst, &[]));
    let got = async {
        let n = client.get_tgz(dir, &mut w, None).await;
        let _ = w.shutdown().await;
        drop(w);
        n
    }
    .await;
    let stats = extractor.await.context("extractor panicked")?;
    got.context("GET /tgz")?;
    stats.context("extracting the pulled tar.gz")
}

/// Runs `tar cf - | GZIP | gunzip | tar xf -` (or `tar cf - | GZIP >/dev/null`
/// when `extract` is false) on `src` and returns its wall time.
async fn pipe(
    base: &Path,
    src: &Path,
    gzip: &str,
    extract: bool,
    tree: &Tree,
) -> anyhow::Result<Duration> {
    let dst = base.join("pipe-dst");
    let script = if extract {
        std::fs::create_dir(&dst)?;
        format!(r#"tar cf - -C "$1" . | {gzip} | gunzip | tar xf - -C "$2""#)
    } else {
        format!(r#"tar cf - -C "$1" . | {gzip} >/dev/null"#)
    };
    let t = Instant::now();
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .arg("sh")
        .arg(src)
        .arg(&dst)
        .status()
        .await
        .context("running sh")?;
    let elapsed = t.elapsed();
    ensure!(status.success(), "{script:?} failed: {status}");
    if extract {
        check_tree(&dst, tree, &format!("tree extracted by {script:?}"))?;
        std::fs::remove_dir_all(&dst)?;
    }
    Ok(elapsed)
}

async fn exec_true(client: &Client, opts: &ExecOptions) -> anyhow::Result<()> {
    let st = client
        .exec("true", opts, &mut tokio::io::sink())
        .await
        .context("POST /exec true")?;
    ensure!(st == ProcessState::Ok, "exec true ended with {st:?}");
    Ok(())
}

/// Nearest-rank percentile of sorted, non-empty `v`.
fn percentile(v: &[Duration], p: usize) -> Duration {
    let rank = (v.len() * p).div_ceil(100).max(1);
    v[rank.min(v.len()) - 1]
}

fn fmt_dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

/// A `kB` field of `/proc/PID/status`, in bytes.
fn proc_mem(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        let kb = rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
        Some(kb * 1024)
    })
}

fn fmt_mem(b: Option<u64>) -> String {
    match b {
        Some(b) => format!("{:.1} MB", b as f64 / MB),
        None => "n/a (no /proc)".into(),
    }
}

/// What the generator wrote.
#[derive(Debug, Clone, Copy)]
struct Tree {
    files: u64,
    dirs: u64,
    bytes: u64,
}

/// Checks that `dir` holds the generated tree's number of files and bytes.
fn check_tree(dir: &Path, want: &Tree, what: &str) -> anyhow::Result<()> {
    let (mut files, mut bytes) = (0u64, 0u64);
    tarball::walk(dir, Path::new(""), &[], &mut |_, _, m| {
        if m.is_file() {
            files += 1;
            bytes += m.len();
        }
        Ok(())
    })
    .with_context(|| format!("walking {}", dir.display()))?;
    ensure!(
        files == want.files && bytes == want.bytes,
        "{what}: {files} files, {bytes} bytes; want {} files, {} bytes",
        want.files,
        want.bytes
    );
    Ok(())
}

/// SplitMix64: small, fast and deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        (((self.next() >> 32) * n as u64) >> 32) as usize
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn pick<'a>(&mut self, v: &'a [&'a str]) -> &'a str {
        v[self.below(v.len())]
    }
}

const KEYWORDS: &[&str] = &[
    "if", "return", "err", "nil", "func", "for", "range", "var", "let", "fn", "int", "string",
    "self", "else", "struct", "type", "const", "mut", "pub", "match", "true", "false", "len",
    "ctx", "i", "n", "buf", "impl", "use", "break", "continue", "byte", "bool", "error",
];

const SYLLABLES: &[&str] = &[
    "get", "set", "read", "write", "buf", "conn", "file", "path", "name", "size", "count", "index",
    "node", "tree", "list", "map", "key", "value", "data", "byte", "line", "token", "parse",
    "build", "test", "host", "config", "state", "error", "result", "handle", "open", "close",
    "start", "stop", "run", "exec", "cmd", "arg", "env", "dir", "root", "work", "sum", "hash",
    "time", "out", "in", "new", "old", "next", "prev", "first", "last", "max", "min", "total",
    "block", "chunk", "frame", "header", "body", "request", "response", "client", "server",
];

const EXTENSIONS: &[&str] = &[".go", ".go", ".go", ".rs", ".c", ".h", ".s", ".txt", ".md"];

/// Identifiers of one to three syllables in mixed styles; most frequent first.
fn vocabulary(rng: &mut Rng) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..400 {
        let parts: Vec<&str> = (0..1 + rng.below(3)).map(|_| rng.pick(SYLLABLES)).collect();
        let id = match rng.below(3) {
            0 => parts.join("_"),
            1 => parts.concat(),
            _ => {
                let mut s = String::new();
                for (i, p) in parts.iter().enumerate() {
                    if i == 0 {
                        s.push_str(p);
                    } else {
                        s.push_str(&p[..1].to_uppercase());
                        s.push_str(&p[1..]);
                    }
                }
                s
            }
        };
        ids.push(id);
    }
    // Compound names (`conn.readBuf`, `Header::new`): real code repeats whole
    // phrases, not only words.
    let mut phrases = Vec::new();
    for _ in 0..600 {
        let mut p = String::new();
        for i in 0..2 + rng.below(2) {
            if i > 0 {
                p.push_str(rng.pick(&[".", ".", ".", "::", "->", "_"]));
            }
            let u = rng.unit();
            p.push_str(&ids[(u * u * ids.len() as f64) as usize]);
        }
        phrases.push(p);
    }
    let mut v: Vec<String> = KEYWORDS.iter().map(|s| s.to_string()).collect();
    for (i, id) in ids.into_iter().enumerate() {
        v.push(id);
        v.extend(phrases.get(2 * i).cloned());
        v.extend(phrases.get(2 * i + 1).cloned());
    }
    v
}

struct TextGen<'a> {
    rng: &'a mut Rng,
    vocab: &'a [String],
    depth: usize,
    /// Recent lines (without indentation), repeated now and then as real
    /// code repeats itself.
    recent: Vec<Vec<u8>>,
}

impl<'a> TextGen<'a> {
    /// A word, skewed towards the front of the vocabulary (Zipf-like).
    fn word(&mut self) -> &'a str {
        let u = self.rng.unit();
        let i = (u * u * u * u * self.vocab.len() as f64) as usize;
        &self.vocab[i.min(self.vocab.len() - 1)]
    }

    fn indent(&mut self, out: &mut Vec<u8>) {
        out.extend(std::iter::repeat_n(b'\t', self.depth));
    }

    fn expr(&mut self, out: &mut Vec<u8>, nest: usize) {
        match self.rng.below(10) {
            0 => {
                let max = if self.rng.below(4) > 0 { 10 } else { 1000 };
                let n = self.rng.below(max);
                out.extend_from_slice(n.to_string().as_bytes());
            }
            1 => {
                out.push(b'"');
                for i in 0..1 + self.rng.below(4) {
                    if i > 0 {
                        out.push(b' ');
                    }
                    let w = self.word();
                    out.extend_from_slice(w.as_bytes());
                }
                out.push(b'"');
            }
            2..=4 if nest < 2 => {
                let w = self.word();
                out.extend_from_slice(w.as_bytes());
                if self.rng.below(2) == 0 {
                    out.push(b'.');
                    let w = self.word();
                    out.extend_from_slice(w.as_bytes());
                }
                out.push(b'(');
                for i in 0..self.rng.below(4) {
                    if i > 0 {
                        out.extend_from_slice(b", ");
                    }
                    self.expr(out, nest + 1);
                }
                out.push(b')');
            }
            5 if nest < 2 => {
                self.expr(out, nest + 1);
                let op = self
                    .rng
                    .pick(&[" + ", " - ", " == ", " != ", " < ", " && "]);
                out.extend_from_slice(op.as_bytes());
                self.expr(out, nest + 1);
            }
            _ => {
                let w = self.word();
                out.extend_from_slice(w.as_bytes());
            }
        }
    }

    fn line(&mut self, out: &mut Vec<u8>) {
        if !self.recent.is_empty() && self.rng.below(100) < 55 {
            let i = self.rng.below(self.recent.len());
            self.indent(out);
            out.extend_from_slice(&self.recent[i]);
            out.push(b'\n');
            return;
        }
        let start = out.len();
        self.fresh_line(out);
        let body: Vec<u8> = out[start..out.len() - 1]
            .iter()
            .skip_while(|c| **c == b'\t')
            .copied()
            .collect();
        if body.len() > 8 {
            if self.recent.len() < 64 {
                self.recent.push(body);
            } else {
                let i = self.rng.below(64);
                self.recent[i] = body;
            }
        }
    }

    fn fresh_line(&mut self, out: &mut Vec<u8>) {
        match self.rng.below(100) {
            0..=7 => {}
            8..=19 => {
                self.indent(out);
                out.extend_from_slice(b"// ");
                for i in 0..3 + self.rng.below(10) {
                    if i > 0 {
                        out.push(b' ');
                    }
                    let w = self.word();
                    out.extend_from_slice(w.as_bytes());
                }
            }
            20..=31 if self.depth > 0 => {
                self.depth -= 1;
                self.indent(out);
                out.push(b'}');
            }
            32..=43 if self.depth < 5 => {
                self.indent(out);
                let kw = self
                    .rng
                    .pick(&["if ", "for ", "func ", "fn ", "} else if ", "match "]);
                out.extend_from_slice(kw.as_bytes());
                self.expr(out, 0);
                out.extend_from_slice(b" {");
                self.depth += 1;
            }
            _ => {
                self.indent(out);
                let w = self.word();
                out.extend_from_slice(w.as_bytes());
                let op = self.rng.pick(&[" = ", " := ", ", err = ", " += ", "."]);
                out.extend_from_slice(op.as_bytes());
                self.expr(out, 0);
            }
        }
        out.push(b'\n');
    }
}

/// Writes a deterministic source-like tree of about `target` bytes under `root`.
fn generate_tree(root: &Path, target: u64) -> std::io::Result<Tree> {
    let mut rng = Rng(0xfa12_e4b0_e1c4_0001);
    let vocab = vocabulary(&mut rng);
    std::fs::create_dir(root)?;
    // About 100 files per MB (mean size ~10 KB), about 20 files per dir.
    let want_dirs = (target / 200_000).max(1) as usize;
    let mut dirs: Vec<(PathBuf, usize)> = vec![(root.to_path_buf(), 0)];
    let mut taken = std::collections::HashSet::new();
    for _ in 0..want_dirs * 10 {
        if dirs.len() >= want_dirs {
            break;
        }
        let (parent, depth) = dirs[rng.below(dirs.len())].clone();
        if depth >= 6 {
            continue;
        }
        let mut name = rng.pick(SYLLABLES).to_string();
        if rng.below(2) == 0 {
            name.push_str(rng.pick(SYLLABLES));
        }
        let path = parent.join(&name);
        let path = if taken.insert(path.clone()) {
            path
        } else {
            let p = parent.join(format!("{name}{}", dirs.len()));
            taken.insert(p.clone());
            p
        };
        std::fs::create_dir(&path)?;
        dirs.push((path, depth + 1));
    }
    let mut tree = Tree {
        files: 0,
        dirs: dirs.len() as u64,
        bytes: 0,
    };
    let mut content = Vec::with_capacity(70 * 1024);
    let mut recent = Vec::new();
    while tree.bytes < target {
        // 1–64 KB, skewed towards small files.
        let size = (1024.0 * 64f64.powf(rng.unit().powf(1.7))) as u64;
        let size = size.clamp(1024, 64 * 1024).min(target - tree.bytes) as usize;
        let dir = dirs[rng.below(dirs.len())].0.clone();
        let mut name = TextGen {
            rng: &mut rng,
            vocab: &vocab,
            depth: 0,
            recent: Vec::new(),
        }
        .word()
        .to_string();
        name.push_str(rng.pick(EXTENSIONS));
        let mut path = dir.join(&name);
        if !taken.insert(path.clone()) {
            path = dir.join(format!("{}{name}", tree.files));
            taken.insert(path.clone());
        }
        content.clear();
        let mut g = TextGen {
            rng: &mut rng,
            vocab: &vocab,
            depth: 0,
            recent: std::mem::take(&mut recent),
        };
        while content.len() < size {
            g.line(&mut content);
        }
        recent = g.recent;
        content.truncate(size);
        if let Some(last) = content.last_mut() {
            *last = b'\n';
        }
        std::fs::File::create(&path)?.write_all(&content)?;
        tree.files += 1;
        tree.bytes += size as u64;
    }
    Ok(tree)
}
