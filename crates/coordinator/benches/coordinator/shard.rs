//! 6. **Sharded tests.** 200 units with heavy-tailed durations (4 of 4 s,
//!    12 of 1 s, 184 between 40 and 400 ms; 60 s of sleeps in all), listed
//!    in a shuffled order, each run taking its nominal time ±40 %, on 1
//!    build machine + 3 helpers (four `farmer
//!    buildlet` processes). The same build runs twice: cold (no history:
//!    the list's order) and warm (longest median first). For each: the wall
//!    time from the first unit's start to the last one's end, the ideal
//!    `max(sum / 4, longest unit)` from the run's own unit times, and their
//!    ratio (goal: at most 1.15 warm). Next to them, computed from the warm
//!    run's measured unit times (not run): static packing into 4 shards by
//!    the same medians (what the Go coordinator did: each shard's time is
//!    the sum of its units) and one machine alone (the sum).

use super::*;

const SHARD_MACHINES: usize = 4;

/// The units as (name, seconds), in the order the list prints them.
fn shard_units() -> Vec<(String, f64)> {
    let mut d: Vec<f64> = Vec::new();
    d.extend([4.0; 4]);
    d.extend([1.0; 12]);
    // 184 short ones, spread 40..400 ms, scaled to 32 s in all.
    let raw: Vec<f64> = (0..184).map(|i| 40.0 + ((i * 37) % 361) as f64).collect();
    let scale = 32_000.0 / raw.iter().sum::<f64>();
    d.extend(raw.iter().map(|ms| (ms * scale).round() / 1000.0));
    // A fixed shuffle (an LCG), so the long units sit anywhere in the list.
    let mut seed: u64 = 0x5eed;
    for i in (1..d.len()).rev() {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let j = (seed >> 33) as usize % (i + 1);
        d.swap(i, j);
    }
    d.into_iter()
        .enumerate()
        .map(|(i, s)| (format!("u{i:03}-{s:.3}"), s))
        .collect()
}

pub(super) async fn bench_shard(dir: &Path) -> anyhow::Result<()> {
    let units = shard_units();
    let total: f64 = units.iter().map(|u| u.1).sum();
    println!();
    println!(
        "== sharded tests: {} units, heavy-tailed ({total:.1} s of sleeps, longest 4 s), 1 build machine + {} helpers, cold then warm ==",
        units.len(),
        SHARD_MACHINES - 1
    );
    let repo = dir.join("shard-repo");
    let list: String = units.iter().map(|u| format!("{}\n", u.0)).collect();
    // Each run of a unit takes its nominal time ±40 % (uniform): real
    // tests vary, which is what a plan made in advance cannot follow.
    let unit_sh = "r=$(od -An -N2 -tu2 /dev/urandom)\n\
         exec sleep \"$(awk -v d=\"${1#*-}\" -v r=\"$r\" 'BEGIN { printf \"%.3f\", d * (0.6 + 0.8 * r / 65535) }')\"\n";
    let commit = make_repo_with(&repo, &[("units.txt", &list), ("unit.sh", unit_sh)])?;
    // The first build (the poller's) waits for the gate, so every machine
    // is connected before its units start.
    let gate = dir.join("shard-gate");
    let config = format!(
        r#"[repos.s]
url = "{}"
branches = ["main"]
poll_interval = "1h"

[hosts.host-bench-shard]
pool = "reverse"
expected = {SHARD_MACHINES}
trusted = true

[builders.sharded]
host = "host-bench-shard"
repos = ["s"]
timeout = "10m"
[[builders.sharded.steps]]
name = "test"
shard.list = "i=0; while [ ! -e {gate} ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done; cat units.txt"
shard.run = ["sh", "unit.sh", "{{unit}}"]
shard.helpers = {}
timeout = "5m"
"#,
        repo.display(),
        SHARD_MACHINES - 1,
        gate = gate.display(),
    );
    let c = Coordinator::start(dir, "shard", &config)?;
    let api = Api::new(&c);
    let key = c.key("host-bench-shard")?;
    let bots = start_buildlets(&c, dir, "host-bench-shard", "shard", SHARD_MACHINES, &key)?;
    wait_connected(
        &api,
        "host-bench-shard",
        SHARD_MACHINES,
        Duration::from_secs(30),
    )
    .await?;
    std::fs::write(&gate, "")?;
    wait_builds_done(&api, 1, Duration::from_secs(300)).await?;
    let cold = shard_run(&api, 1).await?;
    for i in 1..=SHARD_MACHINES {
        let t0 = Instant::now();
        while !machine_idle(&api, &format!("shard-{i}")).await? {
            ensure!(t0.elapsed() < Duration::from_secs(30), "shard-{i} not idle");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let id = api.trigger("sharded", &commit).await?;
    wait_builds_done(&api, 2, Duration::from_secs(300)).await?;
    let warm = shard_run(&api, id).await?;
    for (name, r) in [("cold (no history)", &cold), ("warm (medians)", &warm)] {
        let ideal = r.ideal(SHARD_MACHINES);
        println!(
            "shard: {name:<18} wall {:>5.1} s   ideal {:>5.1} s   wall/ideal {:.3}   step {:>5.1} s (listing and helpers joining included)",
            r.wall,
            ideal,
            r.wall / ideal,
            r.step
        );
    }
    // Static packing by the cold run's times (the medians the warm run
    // ordered by), each shard costing its units' warm-run times.
    let expected: HashMap<&str, f64> = cold.times.iter().map(|(u, t)| (u.as_str(), *t)).collect();
    let mut order: Vec<&(String, f64)> = warm.times.iter().collect();
    order.sort_by(|a, b| {
        let ea = expected.get(a.0.as_str()).copied().unwrap_or(0.0);
        let eb = expected.get(b.0.as_str()).copied().unwrap_or(0.0);
        eb.total_cmp(&ea)
    });
    let mut planned = [0.0f64; SHARD_MACHINES];
    let mut actual = [0.0f64; SHARD_MACHINES];
    for (u, t) in order {
        let i = (0..SHARD_MACHINES)
            .min_by(|&a, &b| planned[a].total_cmp(&planned[b]))
            .unwrap_or(0);
        planned[i] += expected.get(u.as_str()).copied().unwrap_or(0.0);
        actual[i] += t;
    }
    let static_wall = actual.iter().copied().fold(0.0, f64::max);
    let ideal = warm.ideal(SHARD_MACHINES);
    println!(
        "shard: static 4 shards       wall {static_wall:>5.1} s   ideal {ideal:>5.1} s   wall/ideal {:.3}   (computed: LPT packing by the cold run's times, costed with the warm run's)",
        static_wall / ideal
    );
    let alone: f64 = warm.times.iter().map(|t| t.1).sum();
    println!(
        "shard: one machine alone     wall {alone:>5.1} s   (computed: the sum of the warm run's unit times)"
    );
    println!(
        "shard: warm speed-up over one machine {:.2}x; goal wall/ideal <= 1.15 warm: {}",
        alone / warm.wall,
        if warm.wall / ideal <= 1.15 {
            "met"
        } else {
            "NOT met"
        }
    );
    drop(bots);
    Ok(())
}

/// One sharded build's figures.
struct ShardRun {
    /// First unit start to last unit end, seconds.
    wall: f64,
    /// The whole step, seconds.
    step: f64,
    /// (unit, seconds) of every passed run.
    times: Vec<(String, f64)>,
}

impl ShardRun {
    fn ideal(&self, machines: usize) -> f64 {
        let sum: f64 = self.times.iter().map(|t| t.1).sum();
        let longest = self.times.iter().map(|t| t.1).fold(0.0, f64::max);
        (sum / machines as f64).max(longest)
    }
}

async fn shard_run(api: &Api, id: i64) -> anyhow::Result<ShardRun> {
    let v = api.get_json(&format!("/api/builds/{id}")).await?;
    ensure!(
        v["build"]["status"] == "passed",
        "sharded build {id} ended {}: {}",
        v["build"]["status"],
        v["build"]["error"]
    );
    let s = &v["shards"][0];
    let runs = s["units"].as_array().context("no unit runs")?;
    let times: Vec<(String, f64)> = runs
        .iter()
        .filter(|r| r["result"] == "passed")
        .map(|r| {
            (
                r["unit"].as_str().unwrap_or_default().to_string(),
                r["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0,
            )
        })
        .collect();
    let step = v["steps"]
        .as_array()
        .and_then(|s| s.last())
        .map(|s| {
            (s["finished_at"].as_f64().unwrap_or(0.0) - s["started_at"].as_f64().unwrap_or(0.0))
                / 1000.0
        })
        .unwrap_or(0.0);
    Ok(ShardRun {
        wall: s["wall_ms"].as_f64().unwrap_or(0.0) / 1000.0,
        step,
        times,
    })
}
