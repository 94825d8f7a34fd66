//! Section 8, scale on both stores: the same farm on SQLite and PostgreSQL with
//! 10,000 queued builds and 1,000 idle reverse connections. Prints the
//! API's latencies (`/api/builds`, `/api/queue`, the grid page, `/metrics`;
//! target p99 < 50 ms each), the coordinator's RSS per idle connection (with
//! HTTP/2 sessions, then parked and settled;
//! target <= 16 KiB), and builds/s with 4 buildlets on each store (target:
//! PostgreSQL within 20 % of SQLite).
//!
//! PostgreSQL is `FARMER_BENCH_POSTGRES` (a server URL whose user may create
//! databases), else a throwaway cluster this bench starts in its temp dir
//! with the system's `initdb` (as the `postgres` user when run as root);
//! without either, the PostgreSQL half says why it did not run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{
    Api, Coordinator, TPUT_CLIENTS, connect_idle, farm_config, parked_rss, percentile, rss_kb,
    throughput_on,
};

const QUEUED: usize = 10_000;
const IDLE: usize = 1_000;
const GETS: usize = 200;

pub async fn bench_scale(dir: &Path, repo: &Path, commit: &str) -> anyhow::Result<()> {
    let pg = match Postgres::get(dir) {
        Ok(pg) => Some(pg),
        Err(e) => {
            println!();
            println!("scale: PostgreSQL half not run: {e:#}");
            None
        }
    };
    scale_on(dir, repo, commit, None).await?;
    if let Some(pg) = &pg {
        scale_on(dir, repo, commit, Some(&pg.database("scale")?)).await?;
    }
    let sqlite = throughput_on(dir, repo, commit, None).await?;
    if let Some(pg) = &pg {
        let postgres = throughput_on(dir, repo, commit, Some(&pg.database("tput")?)).await?;
        let ratio = postgres / sqlite;
        println!(
            "scale: builds/s on PostgreSQL {postgres:.0} vs SQLite {sqlite:.0}: {:.0} %  (target within 20 %: {})",
            ratio * 100.0,
            if ratio >= 0.8 { "met" } else { "NOT met" }
        );
    }
    Ok(())
}

async fn scale_on(
    dir: &Path,
    repo: &Path,
    commit: &str,
    database_url: Option<&str>,
) -> anyhow::Result<()> {
    let engine = if database_url.is_some() {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    let label = format!("scale[{engine}]");
    println!();
    println!(
        "== scale on {engine}: {QUEUED} queued builds, {IDLE} idle reverse connections, {GETS} GETs per endpoint =="
    );
    let config = farm_config(
        Some(repo),
        &[("host-bench-idle", IDLE), ("host-bench-none", 1)],
        &[("waits", "host-bench-none", r#"command = ["true"]"#)],
    );
    let name = if database_url.is_some() {
        "scale-pg"
    } else {
        "scale-sqlite"
    };
    let c = Coordinator::start_on(dir, name, &config, database_url)?;
    let api = Api::new(&c);

    // The queue: builds for a host type with no machine stay queued.
    let t0 = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for k in 0..TPUT_CLIENTS {
        let api = api.clone();
        let commit = commit.to_string();
        let n = (k + 1) * QUEUED / TPUT_CLIENTS - k * QUEUED / TPUT_CLIENTS;
        clients.spawn(async move {
            for _ in 0..n {
                api.trigger("waits", &commit).await?;
            }
            anyhow::Ok(n)
        });
    }
    let mut queued = 0;
    while let Some(r) = clients.join_next().await {
        queued += r.context("a submitting client panicked")??;
    }
    let took = t0.elapsed();
    println!(
        "{label}: queued {queued} builds in {:.2} s ({:.0} POST/s)",
        took.as_secs_f64(),
        queued as f64 / took.as_secs_f64()
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss0 = rss_kb(&format!("/proc/{}/status", c.pid()));
    let (tasks, connected) = connect_idle(
        &c,
        &api,
        IDLE,
        "host-bench-idle",
        &dir.join(format!("{name}-idle")),
        &label,
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1 = rss_kb(&format!("/proc/{}/status", c.pid()));
    let (parked, _, rss2) = parked_rss(&c, &api, "host-bench-idle", connected).await?;
    if let (Some(a), Some(b), Some(p)) = (rss0, rss1, rss2) {
        let per = |kb: u64| (kb as f64 - a as f64) / connected.max(1) as f64;
        println!(
            "{label}: coordinator RSS {a} KB -> {b} KB with HTTP/2 sessions ({:.1} KB per connection) -> {p} KB with {parked} parked: {:.1} KB per idle connection  (target <= 16 KiB = 16.4 KB: {})",
            per(b),
            per(p),
            if per(p) <= 16.384 { "met" } else { "NOT met" }
        );
    }

    for path in ["/api/builds", "/api/queue", "/", "/metrics"] {
        let mut ms = Vec::with_capacity(GETS);
        for _ in 0..GETS {
            let t = Instant::now();
            api.get_text(path).await?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let p99 = percentile(&mut ms, 0.99);
        println!(
            "{label}: GET {path:<12} p50 {:7.2} ms  p99 {:7.2} ms  (target p99 < 50 ms: {})",
            percentile(&mut ms, 0.5),
            p99,
            if p99 < 50.0 { "met" } else { "NOT met" }
        );
    }
    drop(tasks);
    Ok(())
}

/// A PostgreSQL server for the bench: given, or a throwaway cluster.
struct Postgres {
    /// An admin URL (`.../postgres`).
    url: String,
    /// The cluster this bench started, stopped on drop.
    cluster: Option<Cluster>,
}

struct Cluster {
    bin: PathBuf,
    /// The cluster's directory (its data dir and log), removed on drop.
    base: PathBuf,
    data: PathBuf,
    as_postgres: bool,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = run_pg(
            self.as_postgres,
            Command::new(self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "stop"]),
        );
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

fn run_pg(as_postgres: bool, cmd: &mut Command) -> anyhow::Result<()> {
    #[cfg(unix)]
    if as_postgres {
        use std::os::unix::process::CommandExt;
        let pw = nix_user("postgres").context("no postgres user")?;
        cmd.uid(pw.0).gid(pw.1);
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?}: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The uid and gid of `name`, from /etc/passwd.
fn nix_user(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name))
            .then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
    })
}

impl Postgres {
    fn get(dir: &Path) -> anyhow::Result<Postgres> {
        if let Ok(url) = std::env::var("FARMER_BENCH_POSTGRES") {
            return Ok(Postgres { url, cluster: None });
        }
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .context(
                "no FARMER_BENCH_POSTGRES and no /usr/lib/postgresql (apt install postgresql)",
            )?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("initdb").exists())
            .max()
            .context("no initdb under /usr/lib/postgresql")?;
        // SAFETY: geteuid has no preconditions.
        let as_postgres = unsafe { libc::geteuid() } == 0;
        // Under /tmp as root: the postgres user must reach it.
        let base = if as_postgres {
            PathBuf::from(format!("/tmp/farmer-bench-pg-{}", std::process::id()))
        } else {
            dir.join("pg")
        };
        std::fs::create_dir_all(&base)?;
        if as_postgres {
            let (uid, gid) = nix_user("postgres").context("no postgres user")?;
            std::os::unix::fs::chown(&base, Some(uid), Some(gid))?;
        }
        let data = base.join("data");
        run_pg(
            as_postgres,
            Command::new(bin.join("initdb")).arg("-D").arg(&data).args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-locale",
                "-E",
                "UTF8",
            ]),
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let cluster = Cluster {
            bin: bin.clone(),
            base: base.clone(),
            data: data.clone(),
            as_postgres,
        };
        run_pg(
            as_postgres,
            Command::new(bin.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(base.join("server.log"))
                .args(["-w", "-t", "60", "-o"])
                .arg(format!(
                    "-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='' -c max_connections=200"
                ))
                .arg("start"),
        )?;
        println!(
            "scale: a throwaway PostgreSQL cluster on 127.0.0.1:{port} ({})",
            base.display()
        );
        Ok(Postgres {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            cluster: Some(cluster),
        })
    }

    /// A fresh database named after `name` and this process.
    fn database(&self, name: &str) -> anyhow::Result<String> {
        let db = format!("bench_{name}_{}", std::process::id());
        for sql in [
            format!("DROP DATABASE IF EXISTS {db}"),
            format!("CREATE DATABASE {db}"),
        ] {
            let out = Command::new("psql")
                .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", &self.url, "-c", &sql])
                .output()
                .context("running psql")?;
            if !out.status.success() {
                bail!("{sql}: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        let _ = &self.cluster;
        let at = self
            .url
            .rfind('/')
            .context("the server URL names no database")?;
        Ok(format!("{}{db}", &self.url[..=at]))
    }
}
