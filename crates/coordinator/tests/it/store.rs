//! The store on both engines: a farm with history moved from SQLite to a
//! real PostgreSQL server by `farmer store migrate`, then served from it
//! with every answer unchanged; and the store URL's errors.
//!
//! These need a PostgreSQL server (`FARMER_TEST_POSTGRES`, which
//! scripts/test starts); without one they fail and say so.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::{self, Bot, Coordinator, FARMER, TestRepo, config};

const BUILDER: &str = r#"
[builders.linux-test]
host = "host-test-trusted"
steps = [
  { name = "build", run = "sh build.sh" },
  { name = "test", run = "sh test.sh" },
]
"#;

/// A fresh database on the test server, for one test.
fn database(name: &str) -> String {
    let server = common::postgres_server()
        .or_else(|| std::env::var("FARMER_TEST_POSTGRES").ok())
        .expect("these tests need a PostgreSQL server: run scripts/test (it starts one and sets FARMER_TEST_POSTGRES)");
    let db = format!("{name}_{}", std::process::id());
    let out = Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", &server])
        .args(["-c", &format!("DROP DATABASE IF EXISTS {db}")])
        .args(["-c", &format!("CREATE DATABASE {db}")])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let at = server.rfind('/').unwrap();
    format!("{}{db}", &server[..=at])
}

fn migrate(from: &str, to: &str) -> (bool, String, String) {
    let out = common::output_within(
        Command::new(FARMER).args(["store", "migrate", "--from", from, "--to", to]),
        Duration::from_secs(120),
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What a farm's pages and API answer about its history, with the parts
/// that change by themselves (clocks, connected machines) left out.
fn answers(c: &Coordinator, ids: &[i64]) -> Vec<(String, String)> {
    let mut paths = vec![
        "/api/builds".to_string(),
        "/api/commits?repo=r".to_string(),
        "/".to_string(),
        "/?repo=r&failures=1".to_string(),
        "/builders/linux-test".to_string(),
        "/flakes".to_string(),
        "/machines/bot-1".to_string(),
    ];
    for id in ids {
        paths.push(format!("/api/builds/{id}"));
        paths.push(format!("/api/builds/{id}/log"));
        paths.push(format!("/builds/{id}"));
    }
    let mut out: Vec<(String, String)> = paths
        .into_iter()
        .map(|p| {
            let body = c.get_text(&p);
            (p, scrub(&body))
        })
        .collect();
    let users = common::http(
        "GET",
        &c.url("/api/users"),
        &[("Authorization", &format!("Bearer {}", c.token))],
        "",
    );
    out.push(("/api/users".into(), scrub(&users.body)));
    let requests = common::http(
        "GET",
        &c.url("/api/requests"),
        &[("Authorization", &format!("Bearer {}", c.token))],
        "",
    );
    out.push(("/api/requests".into(), scrub(&requests.body)));
    out
}

/// Drops what differs between two runs of the same farm: relative times
/// ("3s ago"), the listening address, the machines connected now.
fn scrub(body: &str) -> String {
    body.lines()
        .filter(|l| {
            !(l.contains(" ago")
                || l.contains("127.0.0.1:")
                || l.contains("connected")
                || l.contains("idle"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_farm_moved_to_postgres_answers_the_same_and_the_move_can_be_rerun() {
    let pg = database("moved");
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    // Each step prints more than 1 KiB: its log goes to the data dir, not
    // into its row.
    repo.commit(
        "good",
        &[
            ("build.sh", "seq 1 300; echo compiled\n"),
            ("test.sh", "seq 1 300; echo ok\n"),
        ],
    );
    let head = repo.commit(
        "bad",
        &[("test.sh", "seq 1 300; echo FAIL TestThing; exit 1\n")],
    );
    let cfg = dir.path().join("farm.toml");
    std::fs::write(&cfg, config(&repo.path, BUILDER)).unwrap();
    let data = dir.path().join("data");
    let sqlite = format!("sqlite:{}", data.join("farmer.db").display());

    // History on SQLite: two builds with logs, a user, a builder request.
    let ids: Vec<i64>;
    let before;
    {
        let c = Coordinator::start_args(&data, &cfg, &["--database-url", &sqlite]);
        let key = c.key("host-test-trusted");
        let mut bot = Bot::start(
            &c,
            &dir.path().join("bots"),
            "host-test-trusted",
            "bot-1",
            Some(&key),
        );
        c.wait_connected(1);
        let builds = c.wait_builds_done(2, Duration::from_secs(60));
        ids = builds.iter().map(|b| b["id"].as_i64().unwrap()).collect();
        let (code, _) = c.post("/api/users", r#"{"name":"alice"}"#, Some(&c.token));
        assert_eq!(code, 201);
        // A bot's certificate: requested, approved, revoked.
        let owner = dir.path().join("owner");
        let out = Command::new(FARMER)
            .args(["genbotcert", "-bot-hostname=bot-9"])
            .arg(format!("-out-dir={}", owner.display()))
            .output()
            .unwrap();
        assert!(out.status.success());
        let csr = std::fs::read_to_string(owner.join("bot-9.csr")).unwrap();
        let body =
            serde_json::json!({"hostname": "bot-9", "csr_pem": csr, "contact": "bob@example.com"});
        let (code, v) = c.post("/api/requests", &body.to_string(), None);
        assert_eq!(code, 201, "{v}");
        let (code, v) = c.post(
            &format!("/api/requests/{}/approve", v["id"]),
            r#"{"host_type":"host-test-trusted"}"#,
            Some(&c.token),
        );
        assert_eq!(code, 200, "{v}");
        let (code, v) = c.post("/api/ca/revoke", r#"{"hostname":"bot-9"}"#, Some(&c.token));
        assert_eq!(code, 200, "{v}");
        // Compared without the live machine (the moved farm has none yet).
        bot.kill();
        c.wait("the machine to be gone", Duration::from_secs(30), |c| {
            c.connected().is_empty().then_some(())
        });
        before = answers(&c, &ids);
    }

    // Bad input changes nothing and says what is wrong.
    let (ok, _, err) = migrate(&sqlite, "mysql://db/farm");
    assert!(!ok && err.contains("postgres://"), "{err}");
    let (ok, _, err) = migrate(
        &format!("sqlite:{}", dir.path().join("nothing.db").display()),
        &pg,
    );
    assert!(!ok && err.contains("does not exist"), "{err}");
    assert!(!dir.path().join("nothing.db").exists());

    let (ok, out, err) = migrate(&sqlite, &pg);
    assert!(ok, "{out}{err}");
    assert!(out.contains("every count matches"), "{out}");
    let line = |out: &str, table: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{table} ")))
            .unwrap_or_else(|| panic!("no {table} in {out}"))
            .to_string()
    };
    assert!(line(&out, "builds").contains("2 rows (2 new)"), "{out}");
    assert!(line(&out, "steps").contains("4 rows (4 new)"), "{out}");
    // The logs the SQLite farm kept in its data dir are in the rows now.
    let psql = |sql: &str| {
        let out = Command::new("psql")
            .args(["-X", "-A", "-t", &pg, "-c", sql])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(
        psql("SELECT COUNT(*) FROM steps WHERE length(log_gz) > 0"),
        "4"
    );
    assert_eq!(
        psql("SELECT COUNT(*) FROM attempt_logs WHERE length(log_gz) > 0"),
        "2"
    );
    // The logs gone from the source since: the copy says so and fails, and
    // keeps the logs the destination already has; a wrong directory is
    // refused before anything is copied.
    let logs = data.join("artifacts/logs");
    std::fs::rename(&logs, data.join("logs.away")).unwrap();
    let (ok, _, err) = migrate(&sqlite, &pg);
    assert!(
        !ok && err.contains("6 finished logs were not found"),
        "{err}"
    );
    assert_eq!(
        psql("SELECT COUNT(*) FROM steps WHERE length(log_gz) > 0"),
        "4"
    );
    std::fs::rename(data.join("logs.away"), &logs).unwrap();
    let out = common::output_within(
        Command::new(FARMER).args([
            "store",
            "migrate",
            "--from",
            &sqlite,
            "--to",
            &pg,
            "--from-artifacts",
            "/nonexistent",
        ]),
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a directory"));
    // Run again (as after a cut): nothing new, every count still right.
    let (ok, again, err) = migrate(&sqlite, &pg);
    assert!(ok, "{again}{err}");
    assert!(line(&again, "builds").contains("2 rows (0 new)"), "{again}");

    // Served from PostgreSQL: the same answers, and new builds go on
    // after the copied ids.
    let c = Coordinator::start_args(&data, &cfg, &["--database-url", &pg]);
    assert!(
        c.err
            .wait_for("PostgreSQL database", Duration::from_secs(5)),
        "{}",
        c.err.all()
    );
    let after = answers(&c, &ids);
    for ((path, a), (_, b)) in before.iter().zip(&after) {
        eprintln!("{path}: {} bytes compared", a.len());
        assert!(a.len() > 40, "{path} says almost nothing: {a}");
        assert_eq!(a, b, "{path} differs after the move");
    }
    let all: String = after.iter().map(|(_, b)| b.as_str()).collect();
    for want in [
        "FAIL TestThing",
        "compiled",
        "alice",
        "linux-test",
        "bob@example.com",
        "approved",
    ] {
        assert!(all.contains(want), "{want:?} missing from the answers");
    }
    let (code, v) = c.post(
        "/api/builds",
        &format!(r#"{{"builder":"linux-test","commit":"{head}","kind":"interactive"}}"#),
        Some(&c.token),
    );
    assert_eq!(code, 201, "{v}");
    let newest = v["id"].as_i64().unwrap();
    assert!(ids.iter().all(|&id| newest > id), "{v}");
    drop(c);

    // The source changed since (a user removed, a build's error rewritten
    // with a NUL PostgreSQL cannot hold in text), and the destination has
    // a build the source never had: a third run makes it equal again.
    let st = Command::new("python3")
        .arg("-c")
        .arg("import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute(\"DELETE FROM users WHERE name = 'alice'\"); c.execute(\"UPDATE builds SET error = 'bad' || char(0) || 'byte' WHERE id = (SELECT MIN(id) FROM builds)\"); c.commit()")
        .arg(data.join("farmer.db"))
        .status()
        .unwrap();
    assert!(st.success());
    let (ok, third, err) = migrate(&sqlite, &pg);
    assert!(ok, "{third}{err}");
    assert!(
        line(&third, "users").contains("0 rows (0 new, 1 gone from the source removed)"),
        "{third}"
    );
    assert!(
        line(&third, "builds").contains("2 rows (0 new, 1 gone from the source removed)"),
        "{third}"
    );
    assert_eq!(
        psql("SELECT error FROM builds ORDER BY id LIMIT 1"),
        "bad\u{FFFD}byte"
    );
}

#[test]
fn a_bad_store_url_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let repo = TestRepo::new(&dir.path().join("repo"));
    let cfg = dir.path().join("farm.toml");
    std::fs::write(&cfg, config(&repo.path, "")).unwrap();
    let serve = |url: &str| {
        common::output_within(
            Command::new(FARMER)
                .args(["serve", "--listen", "127.0.0.1:0", "--config"])
                .arg(&cfg)
                .arg("--data-dir")
                .arg(dir.path().join("data"))
                .args(["--database-url", url]),
            Duration::from_secs(60),
        )
    };
    let out = serve("mysql://farmer:hunter22@db/farm");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--database-url") && err.contains("postgres://"),
        "{err}"
    );
    assert!(!err.contains("hunter22"), "{err}");
    // Nothing listens there: the error names the server, not the password.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = serve(&format!("postgres://farmer:hunter22@127.0.0.1:{port}/farm"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("PostgreSQL database") && err.contains(&port.to_string()),
        "{err}"
    );
    assert!(!err.contains("hunter22"), "{err}");
    // The config's [store] url is checked with the rest of the config.
    std::fs::write(
        &cfg,
        format!(
            "{}\n[store]\nurl = \"postgres://db\"\n",
            config(&repo.path, "")
        ),
    )
    .unwrap();
    let out = common::output_within(
        Command::new(FARMER).arg("check-config").arg(&cfg),
        Duration::from_secs(30),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("[store] url") && text.contains("no database"),
        "{text}"
    );
}

/// The engine the farms of this run use is the one they report.
#[test]
fn the_farm_runs_on_the_engine_of_this_run() {
    let dir = tempfile::tempdir().unwrap();
    let repo = TestRepo::new(&dir.path().join("repo"));
    let cfg = dir.path().join("farm.toml");
    std::fs::write(&cfg, config(&repo.path, "")).unwrap();
    let data = dir.path().join("data");
    let c = Coordinator::start(&data, &cfg);
    let want = if common::postgres_server().is_some() {
        "PostgreSQL database"
    } else {
        "SQLite database"
    };
    assert!(
        c.err.wait_for(want, Duration::from_secs(5)),
        "{}",
        c.err.all()
    );
    assert_eq!(
        Path::new(&data.join("farmer.db")).exists(),
        common::postgres_server().is_none()
    );
}

/// Two coordinators on one PostgreSQL store: the second stands by (pages
/// and reads, nothing that changes the farm), takes over within 15 s of
/// the leader's SIGKILL, re-runs the build that was running, once, and a
/// leader that loses its lock exits rather than schedule beside another.
#[test]
fn a_standby_takes_over_when_the_leader_dies_and_the_build_finishes_once() {
    let pg = database("failover");
    let dir = tempfile::tempdir().unwrap();
    let marks = dir.path().join("marks");
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    repo.commit(
        "slow",
        &[(
            "run.sh",
            &format!(
                "echo start >> {m}\nsleep 4\necho end >> {m}\n",
                m = marks.display()
            ),
        )],
    );
    let cfg = dir.path().join("farm.toml");
    std::fs::write(
        &cfg,
        config(
            &repo.path,
            "[builders.slow]\nhost = \"host-test-trusted\"\nsteps = [{ name = \"run\", run = \"sh run.sh\" }]\n",
        ),
    )
    .unwrap();
    // One data dir (keys, TLS, CA) for both, as a standby shares its
    // leader's; the store is the shared database.
    let data = dir.path().join("data");
    let mut a = Coordinator::start_args(&data, &cfg, &["--database-url", &pg]);
    let b = Coordinator::start_args(&data, &cfg, &["--database-url", &pg]);
    let status = |c: &Coordinator| c.get("/api/status");
    assert_eq!(status(&a)["leading"], true);
    assert_eq!(status(&b)["leading"], false);
    assert_eq!(status(&b)["leader"]["addr"], a.addr.as_str());
    assert!(
        b.get_text("/status")
            .contains(&format!("standby; the leader is {}", a.addr)),
        "{}",
        b.get_text("/status")
    );
    // A standby changes nothing.
    let (code, v) = b.post("/api/users", r#"{"name":"carol"}"#, Some(&b.token));
    assert_eq!(code, 503, "{v}");
    assert!(v["error"].as_str().unwrap().contains("standby"), "{v}");

    let key = a.key("host-test-trusted");
    let _bot = Bot::start_to(
        &format!("{},{}", a.addr, b.addr),
        &dir.path().join("bots"),
        "host-test-trusted",
        "bot-1",
        Some(&key),
        &a.fingerprint,
        &[],
    );
    // The build runs on the leader; then the leader dies mid-step.
    a.wait("the step to start", Duration::from_secs(60), |_| {
        std::fs::read_to_string(&marks)
            .ok()
            .filter(|m| m.contains("start"))
    });
    let id = a.get("/api/builds")[0]["id"].as_i64().unwrap();
    a.kill();
    let killed = std::time::Instant::now();
    b.wait("the standby to lead", Duration::from_secs(15), |c| {
        (status(c)["leading"] == true).then_some(())
    });
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(15), "{took:?}");
    eprintln!("the standby led {took:?} after the leader's SIGKILL");

    let done = b.wait("the build to finish", Duration::from_secs(90), |c| {
        let v = c.get(&format!("/api/builds/{id}"));
        (v["build"]["status"] != "running" && v["build"]["status"] != "queued").then_some(v)
    });
    assert_eq!(done["build"]["status"], "passed", "{done}");
    let attempts = done["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{done}");
    assert_eq!(attempts[0]["result"], "lost", "{done}");
    let m = std::fs::read_to_string(&marks).unwrap();
    assert_eq!(m.matches("start").count(), 2, "{m}");
    assert_eq!(m.matches("end").count(), 1, "ran to its end once: {m}");
    assert_eq!(b.get("/api/builds").as_array().unwrap().len(), 1);
    assert!(b.get_text(&format!("/builds/{id}")).contains("passed"));
    assert!(b.get_text("/status").contains("leader since"));

    // A leader whose lock connection is cut exits (code 3) rather than
    // keep scheduling beside whoever takes the lock next: here a third
    // coordinator, standing by, which takes over and fences it.
    let c3 = Coordinator::start_args(&data, &cfg, &["--database-url", &pg]);
    assert_eq!(status(&c3)["leading"], false);
    let mut b = b;
    common::store_sql_url(
        &pg,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'farmer-leader%' AND datname = current_database()",
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let exited = loop {
        if let Some(st) = b.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the leader kept running without its lock: {}",
            b.err.all()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(exited.code(), Some(3), "{}", b.err.all());
    assert!(
        b.err.all().contains("lost the leader lock"),
        "{}",
        b.err.all()
    );
    c3.wait(
        "the third coordinator to lead",
        Duration::from_secs(15),
        |c| (status(c)["leading"] == true).then_some(()),
    );
    assert_eq!(status(&c3)["leader"]["addr"], c3.addr.as_str());
    // The build stays passed, once.
    let v = c3.get(&format!("/api/builds/{id}"));
    assert_eq!(v["build"]["status"], "passed", "{v}");
    assert_eq!(v["attempts"].as_array().unwrap().len(), 2, "{v}");
}
