//! Hostile clients and hostile machines against a real coordinator: floods
//! of idle connections, made-up host types, builder-request spam, a machine
//! that answers forever, a host name claimed across identities, and the
//! bounds on what the API lists.

use crate::common;

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Bot, Coordinator, TestRepo, config};

fn farm(builders: &str) -> (tempfile::TempDir, Coordinator) {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    repo.commit("one", &[("x", "x")]);
    let cfg = dir.path().join("farm.toml");
    std::fs::write(&cfg, config(&repo.path, builders)).unwrap();
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    (dir, c)
}

/// Opens `n` connections that never finish a request: half send nothing,
/// half send the start of a request head and stall (slow loris).
fn flood(addr: &str, n: usize) -> Vec<TcpStream> {
    (0..n)
        .filter_map(|i| {
            let mut s = TcpStream::connect(addr).ok()?;
            if i % 2 == 1 {
                let _ = s.write_all(b"GET /api/status HTTP/1.1\r\nHost: x\r\nX-Slow: ");
            }
            Some(s)
        })
        .collect()
}

#[test]
fn idle_and_slow_connections_do_not_lock_machines_or_users_out() {
    let (dir, c) = farm("");
    let conns = flood(&c.addr, 1000);
    assert!(conns.len() >= 990, "opened only {}", conns.len());
    // A real machine registers, over TLS, while the flood holds on.
    let key = c.key("host-test-trusted");
    let _bot = Bot::start(&c, dir.path(), "host-test-trusted", "real-1", Some(&key));
    c.wait_connected(1);
    // And the API answers.
    let status = c.get("/api/status");
    assert!(status.is_object(), "{status}");
    // The flood's connections were closed by the coordinator (the oldest
    // waiting ones made room, the rest missed their first-request deadline).
    let start = Instant::now();
    let mut closed = 0;
    for mut s in conns {
        s.set_read_timeout(Some(
            Duration::from_secs(15)
                .saturating_sub(start.elapsed())
                .max(Duration::from_millis(10)),
        ))
        .unwrap();
        let mut b = [0u8; 256];
        // End of stream (or a last answer before it): closed by the server.
        // A reset (the server closed with our bytes unread) is closed too.
        if std::io::Read::read(&mut s, &mut b).map_or_else(
            |e| {
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            },
            |_| true,
        ) {
            closed += 1;
        }
    }
    assert!(
        closed >= 990,
        "only {closed} of the idle connections were closed"
    );
}

#[test]
fn made_up_host_types_count_as_unknown_and_the_farm_is_not_listed() {
    let (dir, c) = farm("");
    let mut bots = Vec::new();
    for i in 0..5 {
        let ht = format!("host-made-up-{i}");
        bots.push(Bot::start(&c, dir.path(), &ht, &format!("m{i}"), Some("k")));
    }
    let b = &bots[0];
    assert!(
        b.log.wait_for("unknown host type", Duration::from_secs(30)),
        "{}",
        b.log.all()
    );
    // The refusal does not tell a stranger which host types exist.
    assert!(
        !b.log.all().contains("host-test-trusted"),
        "{}",
        b.log.all()
    );
    c.wait("five refusals", Duration::from_secs(30), |c| {
        let m = c.get_text("/metrics");
        m.lines()
            .find(|l| {
                l.starts_with("farmer_registrations_refused_total{")
                    && l.contains("host_type=\"unknown\"")
                    && l.contains("unknown-host-type")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .filter(|n| *n >= 5)
    });
    let metrics = c.get_text("/metrics");
    assert!(!metrics.contains("host-made-up"), "{metrics}");
}

fn submit(c: &Coordinator, hostname: &str, contact: &str) -> (u16, serde_json::Value) {
    let body = serde_json::json!({
        "hostname": hostname,
        "csr_pem": "-----BEGIN CERTIFICATE REQUEST-----\nnot really\n-----END CERTIFICATE REQUEST-----\n",
        "contact": contact,
        "notes": "",
    });
    c.post("/api/requests", &body.to_string(), None)
}

#[test]
fn builder_requests_are_bounded_in_size_and_rate() {
    let (_dir, c) = farm("");
    let stored = |c: &Coordinator| {
        let auth = format!("Bearer {}", c.token);
        let a = common::http(
            "GET",
            &c.url("/api/requests"),
            &[("authorization", &auth)],
            "",
        );
        assert_eq!(a.status, 200, "{}", a.body);
        a.body.matches("\"hostname\"").count()
    };
    // An oversize field on an otherwise valid request: 413 naming it, and
    // nothing stored.
    let g = botauth::csr::generate(
        "linux-amd64-x",
        botauth::hostname::DEFAULT_BOT_DOMAIN,
        botauth::csr::KeyType::Ed25519,
    )
    .unwrap();
    let body = serde_json::json!({
        "hostname": "linux-amd64-x",
        "csr_pem": g.csr_pem,
        "contact": "c".repeat(10_000),
        "notes": "",
    });
    let (code, v) = c.post("/api/requests", &body.to_string(), None);
    assert_eq!(code, 413, "{v}");
    assert!(v.to_string().contains("contact"), "{v}");
    assert_eq!(stored(&c), 0);
    // A body past the coordinator's limit is refused before it is parsed.
    let (code, _) = c.post("/api/requests", &"x".repeat(1 << 20), None);
    assert_eq!(code, 413);
    // Bad requests from one address count toward its hourly limit; past
    // it the coordinator answers 429 without looking further.
    let mut codes = Vec::new();
    for i in 0..12 {
        codes.push(submit(&c, &format!("linux-amd64-{i}"), "me@example.com").0);
    }
    assert!(codes[..9].iter().all(|c| *c == 400), "{codes:?}");
    assert_eq!(codes[11], 429, "{codes:?}");
    let (code, v) = submit(&c, "linux-amd64-z", "me@example.com");
    assert_eq!(code, 429);
    assert!(v.to_string().contains("too many builder requests"), "{v}");
}

#[test]
fn a_host_name_belongs_to_one_identity() {
    let (dir, c) = farm("");
    let trusted = c.key("host-test-trusted");
    let untrusted = c.key("host-test-untrusted");
    let first = Bot::start(
        &c,
        &dir.path().join("a"),
        "host-test-trusted",
        "shared",
        Some(&trusted),
    );
    c.wait_connected(1);
    let id_of = |c: &Coordinator| {
        c.get("/api/machines")["connected"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["hostname"] == "shared")
            .map(|m| {
                (
                    m["id"].as_u64().unwrap(),
                    m["host_type"].as_str().unwrap().to_string(),
                )
            })
    };
    let (id, ht) = id_of(&c).unwrap();
    assert_eq!(ht, "host-test-trusted");
    // Another host type claiming the name is refused, and cannot evict it.
    let thief = Bot::start(
        &c,
        &dir.path().join("b"),
        "host-test-untrusted",
        "shared",
        Some(&untrusted),
    );
    assert!(
        thief.log.wait_for(
            "in use by a connected machine of another host type",
            Duration::from_secs(30)
        ),
        "{}",
        thief.log.all()
    );
    assert_eq!(id_of(&c), Some((id, "host-test-trusted".to_string())));
    drop(thief);
    // The same identity reconnecting replaces its stale connection.
    let again = Bot::start(
        &c,
        &dir.path().join("c"),
        "host-test-trusted",
        "shared",
        Some(&trusted),
    );
    let (new_id, _) = c.wait(
        "the reconnect to replace the old entry",
        Duration::from_secs(30),
        |c| id_of(c).filter(|(i, _)| *i != id),
    );
    assert_ne!(new_id, id);
    drop(first);
    drop(again);
}

#[test]
fn api_lists_are_clamped() {
    let builders = r#"
[builders.b]
host = "host-test-trusted"
repos = ["r"]
[[builders.b.steps]]
name = "s"
run = "true"
"#;
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    repo.commit("one", &[("x", "1")]);
    repo.commit("two", &[("x", "2")]);
    let cfg = dir.path().join("farm.toml");
    std::fs::write(&cfg, config(&repo.path, builders)).unwrap();
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let n = |c: &Coordinator, q: &str| {
        c.get(&format!("/api/builds?{q}"))
            .as_array()
            .map_or(0, |a| a.len())
    };
    c.wait("two queued builds", Duration::from_secs(30), |c| {
        (n(c, "") == 2).then_some(())
    });
    // A negative limit would mean "every row" to SQLite; zero, none.
    assert_eq!(n(&c, "limit=-1"), 1);
    assert_eq!(n(&c, "limit=0"), 1);
    assert_eq!(n(&c, "limit=99999999"), 2);
}

/// A machine with a valid key that answers `/status` with an endless body
/// is dropped after a bounded read, and never joins the pool.
#[test]
fn a_machine_that_answers_forever_is_dropped_without_growing_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    repo.commit("one", &[("x", "x")]);
    let cfg = dir.path().join("farm.toml");
    std::fs::write(&cfg, config(&repo.path, "")).unwrap();
    let c = Coordinator::start_args(
        &dir.path().join("data"),
        &cfg,
        &["--insecure-plaintext-reverse"],
    );
    let key = c.key("host-test-trusted");
    // A name no DNS name could be is refused before anything else.
    let mut s = TcpStream::connect(&c.addr).unwrap();
    write!(
        s,
        "GET /reverse HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: farmer-buildlet\r\n\
         x-farmer-host-type: host-test-trusted\r\nx-farmer-hostname: {}\r\nx-farmer-builder-key: {key}\r\n\r\n",
        "h".repeat(300)
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut answer = vec![0u8; 4096];
    let n = std::io::Read::read(&mut s, &mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("at most 253 bytes"), "{answer}");
    let sent = Arc::new(AtomicU64::new(0));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ended = rt.block_on(hostile_machine(c.addr.clone(), key, sent.clone()));
    assert!(ended, "the coordinator kept the endless connection open");
    let sent = sent.load(Ordering::Relaxed);
    assert!(
        sent < 32 << 20,
        "the coordinator read {sent} bytes of an endless /status"
    );
    assert!(
        c.connected().is_empty(),
        "a machine that never finished /status joined the pool"
    );
    // Its memory stayed small.
    let rss = std::fs::read_to_string(format!("/proc/{}/status", c.child.id()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap();
    assert!(rss < 200 * 1024, "coordinator RSS is {rss} kB");
}

/// Registers as a buildlet over plaintext and serves HTTP/2 whose `/status`
/// never ends. Returns whether the coordinator closed the link in time.
async fn hostile_machine(addr: String, key: String, sent: Arc<AtomicU64>) -> bool {
    use buildlet::proto;
    use http_body_util::{BodyExt, StreamBody};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    let req = http::Request::get(proto::REVERSE_PATH)
        .header("host", &addr)
        .header("connection", "upgrade")
        .header("upgrade", proto::REVERSE_UPGRADE)
        .header(proto::HDR_HOST_TYPE, "host-test-trusted")
        .header(proto::HDR_HOSTNAME, "endless")
        .header(proto::HDR_BUILDER_KEY, key)
        .header(proto::HDR_VERSION, proto::VERSION.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 101, "registration refused");
    let upgraded = hyper::upgrade::on(resp).await.unwrap();
    let svc = hyper::service::service_fn(move |_req: http::Request<hyper::body::Incoming>| {
        let sent = sent.clone();
        async move {
            let chunk = bytes::Bytes::from(vec![b' '; 64 << 10]);
            let stream = futures_util::stream::repeat_with(move || {
                sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(chunk.clone()))
            });
            let body = StreamBody::new(stream).boxed();
            Ok::<_, std::convert::Infallible>(http::Response::new(body))
        }
    });
    let server = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(upgraded, svc);
    tokio::time::timeout(Duration::from_secs(20), server)
        .await
        .is_ok()
}

/// `farmer request status` sends the secret in a header, never the URL,
/// and says plainly when it cannot connect.
#[test]
fn request_status_keeps_the_secret_out_of_urls() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::thread::spawn(move || {
        let mut s = common::accept_within(&listener, Duration::from_secs(60));
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = Vec::new();
        let mut b = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = std::io::Read::read(&mut s, &mut b).unwrap();
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&b[..n]);
        }
        let _ = s.write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\n\r\n{}");
        String::from_utf8_lossy(&buf).into_owned()
    });
    let status = |addr: std::net::SocketAddr| {
        Command::new(common::FARMER)
            .args([
                "request",
                "status",
                "7",
                "--secret",
                "s3cr3t-value",
                "--coordinator",
            ])
            .arg(format!("http://{addr}"))
            .output()
            .unwrap()
    };
    let out = status(addr);
    let head = seen.join().unwrap();
    let request_line = head.lines().next().unwrap_or_default().to_string();
    assert!(
        request_line.starts_with("GET /api/requests/7 "),
        "{request_line}"
    );
    assert!(!request_line.contains("s3cr3t"), "{request_line}");
    assert!(
        head.to_ascii_lowercase()
            .contains("x-farmer-request-secret: s3cr3t-value"),
        "{head}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!err.contains("s3cr3t"), "{err}");
    // Nothing listening: "could not connect to".
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let out = status(dead);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("could not connect to"), "{err}");
    assert!(!err.contains("s3cr3t"), "{err}");
}

/// A store that cannot be opened names its file; one locked by another
/// process says so within seconds, not after a long wait.
#[test]
fn store_errors_at_start_name_the_file_and_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    repo.commit("one", &[("x", "x")]);
    let cfg = dir.path().join("farm.toml");
    std::fs::write(&cfg, config(&repo.path, "")).unwrap();
    let start = |data: &std::path::Path| {
        common::output_within(
            Command::new(common::FARMER)
                .args(["serve", "--listen", "127.0.0.1:0", "--config"])
                .arg(&cfg)
                .arg("--data-dir")
                .arg(data),
            Duration::from_secs(60),
        )
    };
    // Not a database.
    let garbage = dir.path().join("garbage");
    std::fs::create_dir_all(&garbage).unwrap();
    std::fs::write(garbage.join("farmer.db"), vec![0x42u8; 8192]).unwrap();
    let out = start(&garbage);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("farmer.db"), "{err}");
    // Locked by another process (an exclusive transaction held open).
    let locked = dir.path().join("locked");
    std::fs::create_dir_all(&locked).unwrap();
    let db = locked.join("farmer.db");
    let mut holder = common::Reaped(
        Command::new("python3")
            .arg("-c")
            .arg(
                "import sqlite3,sys,time\n\
             c=sqlite3.connect(sys.argv[1],isolation_level=None)\n\
             c.execute('BEGIN EXCLUSIVE')\n\
             c.execute('CREATE TABLE IF NOT EXISTS hold(x)')\n\
             print('locked',flush=True)\n\
             time.sleep(60)\n",
            )
            .arg(&db)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "locked");
    let out = start(&locked);
    let _ = holder.kill();
    let _ = holder.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("farmer.db") && err.contains("locked"), "{err}");
    assert!(err.contains("another farmer"), "{err}");
}

/// Kills (SIGKILL) every process whose pid a test's steps wrote to the
/// file, when dropped: detached daemons outlive their buildlet otherwise.
struct KillListed(std::path::PathBuf);

impl Drop for KillListed {
    fn drop(&mut self) {
        let pids = std::fs::read_to_string(&self.0).unwrap_or_default();
        for p in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: kill(2) with a pid this test's steps recorded.
            unsafe {
                libc::kill(p, libc::SIGKILL);
            }
        }
    }
}

/// A machine declared dead (frozen past the heartbeat timeout) that comes
/// back runs nothing from before: its buildlet kills what the lost build
/// started, `setsid` daemons included, so a re-run never races a stale copy.
#[test]
fn a_machine_back_from_the_dead_runs_nothing_from_before() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    let script = format!(
        "cp /bin/sleep ./sleeper\nsetsid ./sleeper 1000 &\necho $! >> {p}\n./sleeper 1000 &\necho $! >> {p}\nwait\n",
        p = pids.display()
    );
    repo.commit("one", &[("forever.sh", &script)]);
    let cfg = dir.path().join("farm.toml");
    let builders = r#"
[builders.forever]
host = "host-test-trusted"
repos = ["r"]
timeout = "10m"
[[builders.forever.steps]]
name = "run"
run = "sh forever.sh"
"#;
    // About dropping a silent machine: a short heartbeat timeout.
    let text = config(&repo.path, builders)
        .replace("heartbeat_timeout = \"30s\"", "heartbeat_timeout = \"5s\"");
    std::fs::write(&cfg, text).unwrap();
    // Whatever the steps started dies with the test, also when it fails.
    let _kill = KillListed(pids.clone());
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let bot = Bot::start(
        &c,
        &dir.path().join("bots"),
        "host-test-trusted",
        "lazarus",
        Some(&c.key("host-test-trusted")),
    );
    let read_pids = || -> Vec<u32> {
        std::fs::read_to_string(&pids)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    c.wait("the step's processes", Duration::from_secs(60), |_| {
        (read_pids().len() >= 2).then_some(())
    });
    let before: Vec<u32> = read_pids()[..2].to_vec();
    let alive = common::alive;
    assert!(before.iter().all(|p| alive(*p)));
    let signal = |sig: &str| {
        Command::new("kill")
            .args([sig, &bot.child.id().to_string()])
            .status()
            .unwrap()
    };
    assert!(signal("-STOP").success());
    c.wait(
        "the frozen machine to be declared dead",
        Duration::from_secs(60),
        |c| c.connected().is_empty().then_some(()),
    );
    assert!(signal("-CONT").success());
    c.wait("the machine to come back", Duration::from_secs(60), |c| {
        (!c.connected().is_empty()).then_some(())
    });
    // Checked without panicking, so the processes are stopped either way.
    let deadline = Instant::now() + Duration::from_secs(30);
    while before.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let survivors: Vec<u32> = before.iter().copied().filter(|p| alive(*p)).collect();
    drop(bot);
    assert!(
        survivors.is_empty(),
        "processes of the lost build survived: {survivors:?}"
    );
}
