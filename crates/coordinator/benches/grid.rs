//! How long the coordinator takes to render the build grid of 50 commits ×
//! 100 builders (the dashboard's quality bar: under 20 ms on the server).
//!
//! Run with `cargo bench -p coordinator --bench grid`. It builds a farm in
//! this process: a config with 100 builders on 20 host types (10 OSes, so
//! the columns group by OS and arch; every tenth builder does not build the
//! branch), a SQLite store in a temp dir holding 50 commits and about 4,800
//! builds in every state (passed, failed, infra-error, running, queued,
//! cancelled; some cells have no build), then times:
//!
//! 1. `dashboard::grid::render`: the two store queries (commits, and the
//!    newest build per cell), building the grid and rendering the askama
//!    template to HTML; also split into its two halves;
//! 2. `GET /?n=50` through the dashboard's axum router (adds routing,
//!    headers and the body), as the server answers a browser.
//!
//! It prints the median, p90, p99 and maximum of each, and exits non-zero
//! if the p90 of (2) is 20 ms or more.

use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator::config;
use coordinator::dashboard::grid::{GridQuery, load, render, render_view};
use coordinator::farm::{Farm, FarmOptions};
use coordinator::keys::MasterKey;
use coordinator::store::{BuildKind, BuildStatus, CommitRow, NewBuild, Store};
use tower::ServiceExt;

const COMMITS: usize = 50;
const BUILDERS: usize = 100;
const HOST_TYPES: usize = 20;
const WARMUP: usize = 20;
const RUNS: usize = 200;
const LIMIT: Duration = Duration::from_millis(20);

const PLATFORMS: [(&str, &str); 10] = [
    ("linux", "amd64"),
    ("linux", "arm64"),
    ("darwin", "arm64"),
    ("windows", "amd64"),
    ("freebsd", "amd64"),
    ("openbsd", "arm64"),
    ("netbsd", "386"),
    ("plan9", "amd64"),
    ("aix", "ppc64"),
    ("illumos", "amd64"),
];

fn farm_config() -> String {
    let mut s = String::from(
        "[repos.bench]\nurl = \"/nonexistent/bench\"\nbranches = [\"main\", \"release\"]\n\n",
    );
    for h in 0..HOST_TYPES {
        let (os, arch) = PLATFORMS[h % PLATFORMS.len()];
        s.push_str(&format!(
            "[hosts.host-{os}-{arch}-{h}]\npool = \"reverse\"\nexpected = 1\nowners = [\"owner{h}@example.com\"]\ndimensions = {{ os = \"{os}\", arch = \"{arch}\" }}\n\n"
        ));
    }
    for b in 0..BUILDERS {
        let h = b % HOST_TYPES;
        let (os, arch) = PLATFORMS[h % PLATFORMS.len()];
        // Every tenth builder builds another branch only: a "•" column.
        let branches = if b % 10 == 9 {
            "branches = [\"release\"]\n"
        } else {
            ""
        };
        s.push_str(&format!(
            "[builders.{os}-{arch}-b{b:03}]\nhost = \"host-{os}-{arch}-{h}\"\n{branches}[[builders.{os}-{arch}-b{b:03}.steps]]\nname = \"all\"\nrun = \"true\"\n\n"
        ));
    }
    s
}

async fn fill(store: &Store, cfg: &config::FarmConfig) -> anyhow::Result<usize> {
    let base = 1_767_225_600;
    let mut n = 0;
    for c in 0..COMMITS {
        let hash = format!("{:040x}", 0xc0ffee_u64 * 1000 + c as u64);
        store
            .add_commit(
                &CommitRow {
                    repo: "bench".into(),
                    hash: hash.clone(),
                    author: format!("Author <{c}> & Co"),
                    email: format!("a{c}@example.com"),
                    time: base + c as i64 * 600,
                    subject: format!("commit {c}: fix the <thing> & \"other\" thing"),
                    parents: vec![],
                },
                "main",
            )
            .await?;
        for (i, b) in cfg.builders.values().enumerate() {
            let k = (c * 7 + i * 3) % 23;
            if k == 22 {
                continue; // no build yet
            }
            let id = store
                .create_build(&NewBuild {
                    builder: b.name.clone(),
                    host_type: b.host_type.clone(),
                    repo: "bench".into(),
                    branch: "main".into(),
                    commit: hash.clone(),
                    commit_time: base + c as i64 * 600,
                    kind: BuildKind::PostSubmit,
                    requested_by: String::new(),
                })
                .await?
                .expect("new build")
                .id;
            n += 1;
            let end = match k {
                0..=14 => Some(BuildStatus::Passed),
                15..=17 => Some(BuildStatus::Failed),
                18 => Some(BuildStatus::InfraError),
                19 => Some(BuildStatus::Cancelled),
                20 => None,    // running
                _ => continue, // queued
            };
            store
                .start_attempt(id, "bench-machine", &b.host_type)
                .await?;
            if let Some(s) = end {
                store.finish_build(id, s, "").await?;
            }
        }
    }
    Ok(n)
}

struct Stats(Vec<Duration>);

impl Stats {
    fn pct(&self, q: f64) -> Duration {
        let mut v = self.0.clone();
        v.sort();
        v[((v.len() - 1) as f64 * q).round() as usize]
    }
    fn line(&self) -> String {
        let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
        format!(
            "median {}, p90 {}, p99 {}, max {}",
            ms(self.pct(0.5)),
            ms(self.pct(0.9)),
            ms(self.pct(0.99)),
            ms(self.pct(1.0))
        )
    }
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg_path = dir.path().join("farm.toml");
    let text = farm_config();
    std::fs::write(&cfg_path, &text)?;
    let cfg = config::parse(&cfg_path, &text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = Store::open(&dir.path().join("farmer.db")).await?;
    let t = Instant::now();
    let builds = fill(&store, &cfg).await?;
    println!(
        "grid: setup: {} commits x {} builders, {builds} builds in the store ({:.1}s)",
        COMMITS,
        cfg.builders.len(),
        t.elapsed().as_secs_f64()
    );
    let farm: Arc<Farm> = Farm::new(FarmOptions {
        data_dir: dir.path().to_path_buf(),
        config: cfg,
        store,
        master: MasterKey::load_or_create(dir.path())?,
        admin_token: "bench".into(),
        allow_plaintext: false,
        tls_fingerprint: None,
        tls_spki_pin: None,
        artifacts: None,
    });
    let q = GridQuery {
        n: Some(COMMITS.to_string()),
        ..Default::default()
    };

    // 1. Load and render.
    let html = render(&farm, &q)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let cells = html.matches("<td class=").count();
    anyhow::ensure!(
        html.contains("<td class=\"fail\">") && html.contains("<td class=\"nb\">"),
        "the grid lacks expected cells"
    );
    for _ in 0..WARMUP {
        render(&farm, &q)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let mut direct = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let t = Instant::now();
        let h = render(&farm, &q)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        direct.push(t.elapsed());
        std::hint::black_box(h);
    }
    let direct = Stats(direct);
    let (mut loads, mut htmls) = (Vec::with_capacity(RUNS), Vec::with_capacity(RUNS));
    for _ in 0..RUNS {
        let t = Instant::now();
        let g = load(&farm, &q).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        loads.push(t.elapsed());
        let t = Instant::now();
        let h = render_view(&g).map_err(|e| anyhow::anyhow!("{e}"))?;
        htmls.push(t.elapsed());
        std::hint::black_box(h);
    }
    println!(
        "grid: of which the store queries and the grid: {}",
        Stats(loads).line()
    );
    println!(
        "grid: of which the HTML:                       {}",
        Stats(htmls).line()
    );
    println!(
        "grid: render {COMMITS} commits x {BUILDERS} builders ({cells} cells, {} KiB of HTML): {}",
        html.len() / 1024,
        direct.line()
    );

    // 2. Through the router, as a browser's GET.
    let router = coordinator::dashboard::router(farm.clone());
    let get = || {
        let router = router.clone();
        async move {
            let req = http::Request::get(format!("/?n={COMMITS}"))
                .body(axum::body::Body::empty())
                .unwrap();
            let resp = router.oneshot(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .unwrap()
        }
    };
    for _ in 0..WARMUP {
        get().await;
    }
    let mut routed = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let t = Instant::now();
        let body = get().await;
        routed.push(t.elapsed());
        std::hint::black_box(body);
    }
    let routed = Stats(routed);
    let p90 = routed.pct(0.9);
    println!(
        "grid: GET /?n={COMMITS} through the router: {}",
        routed.line()
    );
    println!(
        "grid: target: under {} ms (p90): {}",
        LIMIT.as_millis(),
        if p90 < LIMIT { "met" } else { "NOT met" }
    );
    anyhow::ensure!(
        p90 < LIMIT,
        "rendering the grid took {p90:?} (p90), not under {LIMIT:?}"
    );
    Ok(())
}
