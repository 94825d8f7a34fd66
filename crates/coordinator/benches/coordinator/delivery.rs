//! 7. **Source delivery.** A generated repository of 20,000 files (about
//!    100 MB: text that compresses as source does) and 20 commits after it,
//!    each changing one file, sent to one buildlet (in this process, direct
//!    mode) through a proxy that limits the link to 10 MB/s, as a home
//!    uplink would. First every commit's whole tree (what every build cost
//!    before), then the same commits as deltas over the previous tree. For
//!    each build: bytes on the wire and the source-ready time (archive or
//!    delta made, sent, assembled and verified in the source cache, copied
//!    into the work dir). Goals: delta ≤ 1 % of the full push's bytes, ≥ 10×
//!    faster.

use super::*;

use std::sync::Arc;

const FILES: usize = 20_000;
const FILE_BYTES: usize = 5_000;
const COMMITS: usize = 20;

fn commit_count() -> usize {
    std::env::var("FARMER_BENCH_COMMITS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(COMMITS)
}
/// The link's speed, bytes per second.
const LINK: u64 = 10_000_000;

/// Text like source code: words from a small vocabulary, lines of varying
/// length, so gzip gets a source-like ratio.
fn text(seed: u64, bytes: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "fn", "let", "mut", "if", "else", "return", "match", "impl", "struct", "pub", "use",
        "self", "Some", "None", "Ok", "Err", "for", "in", "while", "loop", "const", "static",
        "u64", "usize", "String", "Vec", "Option", "Result", "=>", "{", "}", "(", ")", ";", "&",
        "value", "count", "buffer", "index", "config", "error", "reader", "writer", "farm",
    ];
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(bytes + 64);
    while out.len() < bytes {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let n = (s % 12) as usize + 1;
        out.extend_from_slice(&b"    "[..(s >> 8) as usize % 4]);
        for i in 0..n {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            if i > 0 {
                out.push(b' ');
            }
            out.extend_from_slice(WORDS[(s % WORDS.len() as u64) as usize].as_bytes());
            if s.is_multiple_of(7) {
                out.extend_from_slice(format!("{}", s % 1000).as_bytes());
            }
        }
        out.push(b'\n');
    }
    out.truncate(bytes);
    out
}

/// A TCP proxy to `upstream` that sends at most `rate` bytes per second
/// each way. Returns its address.
async fn throttled_proxy(upstream: std::net::SocketAddr, rate: u64) -> anyhow::Result<String> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?.to_string();
    tokio::spawn(async move {
        while let Ok((down, _)) = l.accept().await {
            let Ok(up) = tokio::net::TcpStream::connect(upstream).await else {
                continue;
            };
            let (dr, dw) = down.into_split();
            let (ur, uw) = up.into_split();
            tokio::spawn(pump(dr, uw, rate));
            tokio::spawn(pump(ur, dw, rate));
        }
    });
    Ok(addr)
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    rate: u64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    // When the link is free again. An idle link earns no credit: a
    // keep-alive connection reused after a pause is as slow as a new one.
    let mut free = Instant::now();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        free = free.max(Instant::now()) + Duration::from_secs_f64(n as f64 / rate as f64);
        tokio::time::sleep_until(free.into()).await;
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Waits until the file systems have written back what is dirty.
async fn settle() -> anyhow::Result<()> {
    let st = tokio::process::Command::new("sync").status().await?;
    ensure!(st.success(), "sync failed: {st}");
    Ok(())
}

pub async fn bench_delivery(dir: &Path) -> anyhow::Result<()> {
    println!(
        "\n== source delivery: {FILES} files (~{} MB), {COMMITS} commits changing one file each, 1 buildlet behind a {} MB/s link ==",
        FILES * FILE_BYTES / 1_000_000,
        LINK / 1_000_000
    );
    let repo_dir = dir.join("delivery-repo.git");
    let t = Instant::now();
    let base = coordinator::git::NewCommit {
        message: "the tree".into(),
        author: "bench".into(),
        email: "bench@example.com".into(),
        time: 1_700_000_000,
        files: (0..FILES)
            .map(|i| {
                (
                    format!("pkg{:03}/sub{:02}/file{i:05}.rs", i % 200, i % 17),
                    text(i as u64, FILE_BYTES),
                    false,
                )
            })
            .collect(),
    };
    let mut commits = vec![coordinator::git::write_history(&repo_dir, "main", &[base])?];
    for c in 1..=commit_count() {
        let i = (c * 997) % FILES;
        let change = coordinator::git::NewCommit {
            message: format!("change {c}"),
            author: "bench".into(),
            email: "bench@example.com".into(),
            time: 1_700_000_000 + c as i64,
            files: vec![(
                format!("pkg{:03}/sub{:02}/file{i:05}.rs", i % 200, i % 17),
                text((i + 1_000_000 * c) as u64, FILE_BYTES),
                false,
            )],
        };
        commits.push(coordinator::git::write_history(
            &repo_dir,
            "main",
            &[change],
        )?);
    }
    println!(
        "delivery: repository generated in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let repo = Arc::new(coordinator::git::Repo::open(
        repo_dir.to_str().unwrap(),
        &dir.join("cache"),
    )?);

    let mut cfg = buildlet::server::Config::new(dir.join("delivery-wd"));
    cfg.contain = buildlet::server::ContainMode::Group;
    let b = buildlet::server::Buildlet::new(cfg)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let upstream = listener.local_addr()?;
    let serving = tokio::spawn(b.clone().serve(listener));
    let link = std::env::var("FARMER_BENCH_LINK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(LINK);
    let proxy = throttled_proxy(upstream, link).await?;
    let mut client = buildlet::client::Client::new(&proxy, None);
    // A whole tree on a slow link takes a while to send.
    client.set_header_timeout(Duration::from_secs(600));

    // The archive of a commit, as the farm makes it.
    let archive = |c: String| {
        let repo = repo.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let mut out = Vec::new();
                repo.source_archive(&c, &mut out)
                    .map(|a| (Bytes::from(out), a.tree))
            })
            .await?
            .map_err(anyhow::Error::from)
        }
    };

    // Whole trees, as every build cost before. Between builds the work
    // dir is emptied, as the farm does when a build ends, and the disk is
    // let settle (neither timed): each build starts on a quiet disk, so
    // the writeback of the last build's 100 MB is not charged to it.
    let mut full = Vec::new();
    for c in &commits[1..] {
        client.remove_all(&["src"]).await?;
        settle().await?;
        let t = Instant::now();
        let (tgz, tree) = archive(c.clone()).await?;
        let made = t.elapsed();
        let w = client.put_src("src", tgz.clone(), &tree, None).await?;
        ensure!(w.tree == tree, "the buildlet assembled another tree");
        if full.is_empty() {
            println!(
                "delivery: first whole tree: {:.1} MB compressed, archived in {:.2} s, sent and assembled in {:.2} s",
                tgz.len() as f64 / 1e6,
                made.as_secs_f64(),
                (t.elapsed() - made).as_secs_f64()
            );
        }
        full.push((tgz.len() as u64, t.elapsed()));
    }
    // Deltas over the previous commit's tree.
    let (tgz, mut prev) = archive(commits[0].clone()).await?;
    client.put_src("src", tgz, &prev, None).await?;
    let mut delta = Vec::new();
    for c in &commits[1..] {
        client.remove_all(&["src"]).await?;
        settle().await?;
        let t = Instant::now();
        let (repo2, base, c2) = (repo.clone(), prev.clone(), c.clone());
        let (d, info) = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            repo2
                .delta_tgz(&base, &c2, &mut out)
                .map(|d| (Bytes::from(out), d))
        })
        .await??;
        let info: String = info.ok_or_else(|| anyhow!("no delta could be made"))?;
        let w = client.put_src("src", d.clone(), &info, Some(&prev)).await?;
        ensure!(w.tree == info, "the buildlet assembled another tree");
        delta.push((d.len() as u64, t.elapsed()));
        prev = info;
    }
    serving.abort();

    let mean = |v: &[(u64, Duration)]| {
        let n = v.len() as f64;
        (
            v.iter().map(|x| x.0 as f64).sum::<f64>() / n,
            v.iter().map(|x| x.1.as_secs_f64()).sum::<f64>() / n,
        )
    };
    for (i, (f, d)) in full.iter().zip(&delta).enumerate() {
        println!(
            "delivery: build {:2}: full {:8.1} KB in {:7.1} ms   delta {:6.1} KB in {:6.1} ms",
            i + 1,
            f.0 as f64 / 1024.0,
            f.1.as_secs_f64() * 1000.0,
            d.0 as f64 / 1024.0,
            d.1.as_secs_f64() * 1000.0
        );
    }
    let (fb, ft) = mean(&full);
    let (db, dt) = mean(&delta);
    let ratio = db / fb * 100.0;
    let speedup = ft / dt;
    println!(
        "delivery: mean full {:.1} MB in {:.2} s; mean delta {:.1} KB in {:.0} ms: {ratio:.3} % of the bytes (goal <= 1 %: {}), {speedup:.1}x faster (goal >= 10x: {})",
        fb / 1e6,
        ft,
        db / 1024.0,
        dt * 1000.0,
        if ratio <= 1.0 { "met" } else { "NOT met" },
        if speedup >= 10.0 { "met" } else { "NOT met" },
    );
    Ok(())
}
