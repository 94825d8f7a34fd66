//! The dashboard at the HTML level: every page and the JSON modes, the live
//! event streams, `/metrics`, escaping and errors, against real `farmer
//! serve` and `farmer buildlet` processes over loopback. (The same pages in
//! a real browser: `tests/browser.rs`.)

use crate::common;

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Bot, Coordinator, TestRepo};

fn farm_config(repo: &std::path::Path, builders: &str) -> String {
    format!(
        r#"[farm]
max_attempts = 3
heartbeat = "1s"
heartbeat_timeout = "30s"

[repos.r]
url = "{}"
branches = ["main", "release"]
poll_interval = "300ms"

[hosts.host-test-trusted]
pool = "reverse"
expected = 1
trusted = true
owners = ["owner@example.com"]
notes = "The trusted test machines <b>here</b>."
dimensions = {{ os = "linux", arch = "amd64" }}

[hosts.host-test-untrusted]
pool = "reverse"
expected = 1
trusted = false
owners = ["volunteer@example.com"]
dimensions = {{ os = "plan9", arch = "386" }}

{builders}
"#,
        repo.display()
    )
}

const BUILDERS: &str = r#"
[builders.linux-test]
host = "host-test-trusted"
presubmit = true
notes = "Runs the tests."
[[builders.linux-test.steps]]
name = "build"
run = "sh build.sh"
[[builders.linux-test.steps]]
name = "test"
run = "sh test.sh"

[builders.plan9-sim]
host = "host-test-untrusted"
[[builders.plan9-sim.steps]]
name = "all"
run = "true"

[builders.plan9-release]
host = "host-test-untrusted"
branches = ["release"]
[[builders.plan9-release.steps]]
name = "all"
run = "true"
"#;

/// Status, headers (lowercase names) and body of a GET.
fn fetch(url: &str, headers: &[(&str, &str)]) -> (u16, HashMap<String, String>, String) {
    let a = common::http("GET", url, headers, "");
    (a.status, a.headers, a.body)
}

/// One server-sent event.
#[derive(Debug, Clone, Default)]
struct Sse {
    event: String,
    data: String,
    id: String,
    at: Option<Instant>,
}

/// Reads a server-sent event stream in the background; events arrive on
/// the channel as they are parsed. The reader stops when the receiver is
/// dropped (at its next event) or after `limit`.
fn sse(url: &str, headers: &[(&str, &str)], limit: Duration) -> mpsc::Receiver<Sse> {
    let (tx, rx) = mpsc::channel();
    let url = url.to_string();
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            use http_body_util::BodyExt;
            let _ = tokio::time::timeout(limit, async move {
                let client = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
                let mut req = http::Request::get(&url).header("accept", "text/event-stream");
                for (k, v) in &headers {
                    req = req.header(k.as_str(), v.as_str());
                }
                let resp = client
                    .request(req.body(http_body_util::Empty::new()).unwrap())
                    .await
                    .unwrap();
                assert_eq!(
                    resp.headers()["content-type"].to_str().unwrap(),
                    "text/event-stream"
                );
                let mut body = resp.into_body();
                let mut buf = String::new();
                let mut cur = Sse::default();
                while let Some(frame) = body.frame().await {
                    let Ok(frame) = frame else { return };
                    let Some(data) = frame.data_ref() else {
                        continue;
                    };
                    buf.push_str(&String::from_utf8_lossy(data));
                    while let Some(nl) = buf.find('\n') {
                        let line: String = buf.drain(..=nl).collect();
                        let line = line.trim_end_matches(['\n', '\r']);
                        if line.is_empty() {
                            // As browsers do: an event without data is not one.
                            if cur.data.is_empty() {
                                cur = Sse::default();
                            } else {
                                cur.at = Some(Instant::now());
                                if tx.send(std::mem::take(&mut cur)).is_err() {
                                    return;
                                }
                            }
                        } else if let Some(v) = line.strip_prefix("event:") {
                            cur.event = v.trim_start().to_string();
                        } else if let Some(v) = line.strip_prefix("data:") {
                            if !cur.data.is_empty() {
                                cur.data.push('\n');
                            }
                            cur.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                        } else if let Some(v) = line.strip_prefix("id:") {
                            cur.id = v.trim_start().to_string();
                        }
                    }
                }
            })
            .await;
        });
    });
    rx
}

/// Receives events until `f` returns true for one, bounded.
fn until(rx: &mpsc::Receiver<Sse>, limit: Duration, mut f: impl FnMut(&Sse) -> bool) -> Vec<Sse> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(e) => {
                let done = f(&e);
                seen.push(e);
                if done {
                    return seen;
                }
            }
            Err(_) => panic!("timed out; events so far: {seen:#?}"),
        }
    }
}

/// The `<td>` cells of the grid row of a commit.
fn grid_row<'a>(html: &'a str, hash: &str) -> &'a str {
    let short = &hash[..10];
    let start = html
        .find(&format!("<code title=\"{hash}\">{short}</code>"))
        .unwrap_or_else(|| panic!("no row for {short} in:\n{html}"));
    let end = html[start..].find("</tr>").unwrap() + start;
    &html[start..end]
}

fn build_id(builds: &[serde_json::Value], builder: &str, commit: &str) -> i64 {
    builds
        .iter()
        .find(|b| b["builder"] == builder && b["commit"] == commit)
        .unwrap_or_else(|| panic!("no {builder} build of {commit}: {builds:#?}"))["id"]
        .as_i64()
        .unwrap()
}

#[test]
fn pages_show_the_farm_and_escape_everything() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    let good = repo.commit(
        "Add the thing",
        &[
            ("build.sh", "echo compiled\n"),
            ("test.sh", "echo all tests ok\n"),
        ],
    );
    common::git(&repo.path, &["branch", "release"]);
    let bad = repo.commit(
        "Break it <script>alert(1)</script> & \"quote\"",
        &[("test.sh", "echo 'FAIL TestThing <b>not bold</b>'; exit 1\n")],
    );
    let cfg = dir.path().join("farm.toml");
    std::fs::write(&cfg, farm_config(&repo.path, BUILDERS)).unwrap();
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let key = c.key("host-test-trusted");
    let bots = dir.path().join("bots");
    let _bot = Bot::start(&c, &bots, "host-test-trusted", "bot-1", Some(&key));
    let wrong = Bot::start(
        &c,
        &bots,
        "host-test-trusted",
        "bot-wrong-key",
        Some(&"0".repeat(64)),
    );
    c.wait_connected(1);
    assert!(
        wrong
            .log
            .wait_for("wrong builder key", Duration::from_secs(20)),
        "{}",
        wrong.log.all()
    );
    drop(wrong); // it would retry every 10s or so
    let builds = c.wait("the linux-test builds", Duration::from_secs(60), |c| {
        let v = c.get("/api/builds?builder=linux-test");
        let v = v.as_array().unwrap().clone();
        (v.len() >= 2
            && v.iter()
                .all(|b| matches!(b["status"].as_str(), Some("passed" | "failed"))))
        .then_some(v)
    });
    // plan9-release builds only the release branch, which has `good`.
    let all = c.wait("queued plan9 builds", Duration::from_secs(30), |c| {
        let v = c.get("/api/builds?limit=100");
        let v = v.as_array().unwrap().clone();
        (v.iter().filter(|b| b["status"] == "queued").count() >= 3).then_some(v)
    });
    // The machine is cleaned after each build; wait until it is idle again.
    c.wait("bot-1 to be idle", Duration::from_secs(30), |c| {
        let m = c.get("/api/machines");
        (m["connected"][0]["state"] == "idle").then_some(())
    });
    let good_id = build_id(&builds, "linux-test", &good);
    let bad_id = build_id(&builds, "linux-test", &bad);
    let queued_id = build_id(&all, "plan9-sim", &bad);

    // The grid: newest commit first; builders grouped by OS and arch.
    let (code, headers, grid) = fetch(&c.url("/"), &[]);
    assert_eq!(code, 200);
    assert!(
        headers["content-type"].starts_with("text/html"),
        "{headers:?}"
    );
    assert!(
        headers["content-security-policy"].contains("default-src 'none'"),
        "{headers:?}"
    );
    assert!(grid.find(&bad[..10]).unwrap() < grid.find(&good[..10]).unwrap());
    assert!(grid.contains("<th colspan=\"1\">linux</th>"), "{grid}");
    assert!(grid.contains("<th colspan=\"2\">plan9</th>"), "{grid}");
    assert!(grid.contains("<th colspan=\"2\">386</th>"), "{grid}");
    assert!(grid.find(">linux-test</a>").unwrap() < grid.find(">plan9-release</a>").unwrap());
    let row = grid_row(&grid, &good);
    assert!(
        row.contains(&format!(
            "<td class=\"ok\"><a href=\"/builds/{good_id}\" title=\"passed\">ok</a></td>"
        )),
        "{row}"
    );
    let row = grid_row(&grid, &bad);
    assert!(
        row.contains(&format!(
            "<td class=\"fail\"><a href=\"/builds/{bad_id}\" title=\"failed\">fail</a></td>"
        )),
        "{row}"
    );
    assert!(
        row.contains(&format!(
            "<td class=\"wait\"><a href=\"/builds/{queued_id}\" title=\"queued\">…</a></td>"
        )),
        "{row}"
    );
    assert!(
        row.contains(
            "<td class=\"nb\"><span title=\"does not build this repo/branch\">•</span></td>"
        ),
        "{row}"
    );
    // Every text is escaped.
    assert!(!grid.contains("<script>alert"), "{grid}");
    assert!(
        grid.contains("Break it &#60;script&#62;alert(1)&#60;/script&#62; &#38; &#34;quote&#34;"),
        "{grid}"
    );
    assert!(
        grid.contains("data-live=\"/grid/events?repo=r&#38;branch=main&#38;v="),
        "{grid}"
    );
    assert!(grid.contains("/static/dashboard.css?v=") && grid.contains("/static/dashboard.js?v="));

    // Failures only.
    let (_, _, failures) = fetch(&c.url("/?failures=1"), &[]);
    assert!(failures.contains(&bad[..10]), "{failures}");
    assert!(!failures.contains(&good[..10]), "{failures}");
    assert!(failures.contains("Failures only ✓"), "{failures}");
    // Paging.
    let (_, _, page0) = fetch(&c.url("/?n=1"), &[]);
    assert!(page0.contains(&bad[..10]) && !page0.contains(&good[..10]));
    assert!(page0.contains("n=1&#38;page=1\" rel=\"next\""), "{page0}");
    let (_, _, page1) = fetch(&c.url("/?n=1&page=1"), &[]);
    assert!(page1.contains(&good[..10]) && !page1.contains(&bad[..10]));
    assert!(page1.contains("rel=\"prev\""), "{page1}");
    let (_, _, past) = fetch(&c.url("/?n=1&page=9"), &[]);
    assert!(past.contains("past the end of the history"), "{past}");
    // Per branch: release has only `good`; plan9-release builds it.
    let (_, _, rel) = fetch(&c.url("/?repo=r&branch=release"), &[]);
    assert!(
        rel.contains(&good[..10]) && !rel.contains(&bad[..10]),
        "{rel}"
    );
    assert!(!grid_row(&rel, &good).contains("class=\"nb\""), "{rel}");
    assert!(
        rel.contains("aria-current=\"page\">r · release</a>"),
        "{rel}"
    );
    // Errors.
    let (code, _, nope) = fetch(&c.url("/?repo=nope"), &[]);
    assert_eq!(code, 404);
    assert!(nope.contains("no repo named &#34;nope&#34;"), "{nope}");
    let (code, _, _) = fetch(&c.url("/?branch=nope"), &[]);
    assert_eq!(code, 404);
    let (code, _, _) = fetch(&c.url("/grid/events?repo=nope"), &[]);
    assert_eq!(code, 404, "a stream of a grid that does not exist");
    // JSON mode.
    let j: serde_json::Value = serde_json::from_str(&fetch(&c.url("/?mode=json"), &[]).2).unwrap();
    assert_eq!(j["repo"], "r");
    assert_eq!(j["commits"][0]["hash"], bad.as_str());
    let names: Vec<&str> = j["builders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["linux-test", "plan9-release", "plan9-sim"]);
    assert_eq!(j["commits"][0]["cells"][0]["status"], "failed");
    assert_eq!(j["commits"][0]["cells"][0]["build_id"], bad_id);
    assert_eq!(j["commits"][0]["cells"][1]["builds"], false);
    assert_eq!(j["commits"][1]["cells"][0]["status"], "passed");

    // Farm status.
    let (code, _, status) = fetch(&c.url("/status"), &[]);
    assert_eq!(code, 200);
    for want in [
        "<h2>Health</h2>",
        "host-test-untrusted</a>: 1 missing: 0 of 1 expected machines connected",
        "<h2>Scheduler state</h2>",
        "waiting: no machine of host-test-untrusted connected, expected 1",
        "<h2>Pool summary</h2>",
        "<span class=\"warn-text\">1 missing</span>",
        "<h2>Machine detail</h2>",
        "<a class=\"hostname\" href=\"/machines/bot-1\">bot-1</a>",
        "<h2>Refused registrations</h2>",
        "bot-wrong-key",
        "wrong builder key for host-test-trusted",
        "<h2>Active builds</h2>",
        "<h2>Pending builds</h2>",
        &format!("<a href=\"/builds/{queued_id}\">#{queued_id}</a>"),
        "<h2>Recently finished</h2>",
        &format!("<a href=\"/builds/{bad_id}\">#{bad_id}</a>"),
        "step test failed: exit status 1",
        "data-live=\"/status/events\"",
    ] {
        assert!(
            status.contains(want),
            "status page lacks {want:?}:\n{status}"
        );
    }
    let machines = &status[status.find("<h2>Machine detail</h2>").unwrap()..];
    let machines = &machines[..machines.find("</table>").unwrap()];
    assert!(machines.contains("idle for "), "{machines}");
    assert!(machines.contains("127.0.0.1:"), "{machines}");

    // Builders, and JSON mode.
    let (code, _, b) = fetch(&c.url("/builders"), &[]);
    assert_eq!(code, 200);
    assert!(b.find("<h2>Build configs</h2>").unwrap() < b.find("<h2>Host configs</h2>").unwrap());
    assert!(b.contains("<tr id=\"b-linux-test\">"), "{b}");
    assert!(b.contains("Runs the tests."), "{b}");
    assert!(
        b.contains("The trusted test machines &#60;b&#62;here&#60;/b&#62;."),
        "{b}"
    );
    assert!(b.contains("owner@example.com") && b.contains("volunteer@example.com"));
    assert!(b.contains("<td data-label=\"pool\">reverse</td>"), "{b}");
    let j: serde_json::Value =
        serde_json::from_str(&fetch(&c.url("/builders?mode=json"), &[]).2).unwrap();
    assert_eq!(
        j["builders"]["linux-test"]["host_type"],
        "host-test-trusted"
    );
    assert_eq!(
        j["builders"]["linux-test"]["owners"][0],
        "owner@example.com"
    );
    assert_eq!(j["builders"]["linux-test"]["steps"][1]["name"], "test");
    assert_eq!(j["builders"]["plan9-release"]["branches"][0], "release");
    assert_eq!(j["hosts"]["host-test-trusted"]["pool"], "reverse");
    assert_eq!(j["hosts"]["host-test-trusted"]["expected"], 1);
    assert_eq!(j["hosts"]["host-test-trusted"]["connected"], 1);
    assert_eq!(
        j["hosts"]["host-test-untrusted"]["dimensions"]["os"],
        "plan9"
    );

    // A failed build: steps, attempts, machine, stored log, raw link, admin.
    let (code, _, page) = fetch(&c.url(&format!("/builds/{bad_id}")), &[]);
    assert_eq!(code, 200);
    for want in [
        "<span class=\"badge failed\" id=\"build-status\">failed</span>",
        "<table class=\"list\" id=\"attempts\">",
        "<a href=\"/machines/bot-1\">bot-1</a>",
        "<table class=\"list\" id=\"steps\">",
        "1. build</td>",
        "2. test</td>",
        "exit status 1",
        &format!("<a class=\"small\" href=\"/api/builds/{bad_id}/log\">raw text</a>"),
        "FAIL TestThing &#60;b&#62;not bold&#60;/b&#62;",
        "data-action=\"rebuild\"",
        "data-action=\"cancel\"",
        "id=\"admin-token\"",
    ] {
        assert!(page.contains(want), "build page lacks {want:?}:\n{page}");
    }
    assert!(!page.contains("<b>not bold</b>"));
    // A queued build says why it waits and follows its log live.
    let (_, _, page) = fetch(&c.url(&format!("/builds/{queued_id}")), &[]);
    assert!(page.contains("in the queue for host-test-untrusted; waiting: no machine of host-test-untrusted connected"), "{page}");
    assert!(
        page.contains(&format!("data-log=\"/builds/{queued_id}/events\"")),
        "{page}"
    );
    for bad_path in ["/builds/999999", "/builds/abc"] {
        let (code, _, body) = fetch(&c.url(bad_path), &[]);
        assert_eq!(code, 404, "{bad_path}: {body}");
    }

    // Machine and host type pages.
    let (code, _, m) = fetch(&c.url("/machines/bot-1"), &[]);
    assert_eq!(code, 200);
    assert!(m.contains("connected; idle for"), "{m}");
    assert!(
        m.contains(&format!("/builds/{good_id}\"")) && m.contains(&format!("/builds/{bad_id}\"")),
        "{m}"
    );
    let (code, _, m) = fetch(&c.url("/machines/bot-wrong-key"), &[]);
    assert_eq!(code, 200);
    assert!(m.contains("wrong builder key for host-test-trusted"), "{m}");
    let (code, _, _) = fetch(&c.url("/machines/nobody"), &[]);
    assert_eq!(code, 404);
    let (code, _, h) = fetch(&c.url("/hosts/host-test-trusted"), &[]);
    assert_eq!(code, 200);
    assert!(h.contains("1 connected, 0 in use, 1 expected"), "{h}");
    assert!(
        h.contains("<a class=\"hostname\" href=\"/machines/bot-1\">bot-1</a>"),
        "{h}"
    );
    assert!(h.contains(&format!("/builds/{bad_id}\"")), "{h}");
    assert!(h.contains("wrong builder key"), "{h}");
    let (_, _, h) = fetch(&c.url("/hosts/host-test-untrusted"), &[]);
    assert!(h.contains("3 waiting"), "{h}");
    assert!(h.contains("No machine of this type is connected."), "{h}");
    let (code, _, _) = fetch(&c.url("/hosts/nope"), &[]);
    assert_eq!(code, 404);

    // Embedded assets.
    let (code, headers, css) = fetch(&c.url("/static/dashboard.css"), &[]);
    assert_eq!(code, 200);
    assert!(headers["content-type"].starts_with("text/css"));
    assert!(css.contains("table.grid"));
    let (_, headers, js) = fetch(&c.url("/static/dashboard.js"), &[]);
    assert!(headers["content-type"].starts_with("text/javascript"));
    assert!(js.contains("EventSource"));

    // Metrics: the exposition parses as Prometheus reads it (each family
    // once, its samples right after its HELP and TYPE); the figures match
    // the farm.
    let metrics = c.get_text("/metrics");
    let families = parse_exposition(&metrics).unwrap_or_else(|e| panic!("{e}:\n{metrics}"));
    assert!(metrics.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    for family in [
        "farmer_builds",
        "farmer_builds_recorded",
        "farmer_builds_finished",
        "farmer_queue_length",
        "farmer_queue_oldest_wait_seconds",
        "farmer_machines",
        "farmer_dispatch_latency_seconds",
        "farmer_build_phase_seconds",
        "farmer_flaky_tests",
        "process_cpu_seconds",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(families.contains_key(family), "no family {family}");
    }
    assert_eq!(
        families["farmer_queue_length"].len(),
        2,
        "one per host type"
    );
    for want in [
        "farmer_builds_recorded{status=\"passed\"} 1",
        "farmer_builds_recorded{status=\"failed\"} 1",
        "farmer_builds{status=\"queued\"} 3",
        "farmer_builds_recorded{status=\"infra-error\"} 0",
        "farmer_builds_finished_total{status=\"passed\"} 1",
        "farmer_dispatch_latency_seconds_bucket{le=\"14400.0\"} 2",
        "farmer_queue_length{host_type=\"host-test-untrusted\"} 3",
        "farmer_queue_length{host_type=\"host-test-trusted\"} 0",
        "farmer_machines{host_type=\"host-test-trusted\",state=\"connected\"} 1",
        "farmer_machines{host_type=\"host-test-trusted\",state=\"busy\"} 0",
        "farmer_machines{host_type=\"host-test-untrusted\",state=\"expected\"} 1",
        "farmer_registrations_refused_total{host_type=\"host-test-trusted\",reason=\"wrong-key\"} ",
        "farmer_dispatch_latency_seconds_count 2",
        "farmer_dispatch_latency_seconds_bucket{le=\"+Inf\"} 2",
        "# TYPE farmer_dispatch_latency_seconds histogram",
        "farmer_queue_oldest_wait_seconds{host_type=\"host-test-untrusted\"} ",
    ] {
        assert!(metrics.contains(want), "metrics lack {want:?}:\n{metrics}");
    }
}

const SLOW: &str = r#"
[builders.linux-slow]
host = "host-test-trusted"
[[builders.linux-slow.steps]]
name = "count"
run = "for i in $(seq 1 25); do echo \"line $i ünïcode\"; sleep 0.2; done"
"#;

#[test]
fn live_log_grid_and_status_stream_as_server_sent_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = TestRepo::new(&dir.path().join("repo"));
    let commit = repo.commit("one", &[("README", "x\n")]);
    let cfg = dir.path().join("farm.toml");
    std::fs::write(&cfg, farm_config(&repo.path, SLOW)).unwrap();
    let c = Coordinator::start(&dir.path().join("data"), &cfg);
    let key = c.key("host-test-trusted");

    // The grid page's stream, opened before the build exists.
    let (_, _, grid) = fetch(&c.url("/"), &[]);
    assert!(
        grid.contains("No commits seen on r main yet") || grid.contains(&commit[..10]),
        "{grid}"
    );
    let live = grid
        .split("data-live=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .replace("&#38;", "&");
    let grid_events = sse(&c.url(&live), &[], Duration::from_secs(90));

    let _bot = Bot::start(
        &c,
        &dir.path().join("bots"),
        "host-test-trusted",
        "bot-1",
        Some(&key),
    );
    let id = c.wait("the build to run", Duration::from_secs(30), |c| {
        let v = c.get("/api/builds");
        let b = v.as_array().unwrap().first()?.clone();
        (b["status"] == "running").then(|| b["id"].as_i64().unwrap())
    });

    // The log arrives in pieces while the build runs, as text events whose
    // ids are byte offsets.
    let url = c.url(&format!("/builds/{id}/events"));
    let log = sse(&url, &[], Duration::from_secs(60));
    let mut text = String::new();
    let first = until(&log, Duration::from_secs(30), |e| {
        if e.event == "log" {
            text.push_str(&serde_json::from_str::<String>(&e.data).unwrap());
        }
        text.contains("line 3 ")
    });
    assert!(
        first
            .iter()
            .any(|e| e.event == "html" && e.data.contains("\"target\":\"summary\"")),
        "{first:#?}"
    );
    assert_eq!(
        c.get(&format!("/api/builds/{id}"))["build"]["status"],
        "running",
        "the build should still run after line 3"
    );
    let offset = first
        .iter()
        .rev()
        .find(|e| e.event == "log")
        .unwrap()
        .id
        .clone();
    assert_eq!(
        offset.parse::<usize>().unwrap(),
        text.len(),
        "ids are byte offsets"
    );

    // A reconnecting viewer resumes where it was.
    let resumed = sse(&url, &[("last-event-id", &offset)], Duration::from_secs(60));
    let mut rest = String::new();
    let events = until(&resumed, Duration::from_secs(30), |e| {
        if e.event == "log" {
            rest.push_str(&serde_json::from_str::<String>(&e.data).unwrap());
        }
        e.event == "end"
    });
    assert!(
        !rest.contains("line 1 ") && !rest.contains("line 3 "),
        "{rest}"
    );
    assert!(rest.contains("line 25 ünïcode"), "{rest}");
    assert!(
        events
            .iter()
            .any(|e| e.event == "html" && e.data.contains("badge passed")),
        "{events:#?}"
    );

    // The first viewer saw the same log, in several events over time.
    let later = until(&log, Duration::from_secs(30), |e| {
        if e.event == "log" {
            text.push_str(&serde_json::from_str::<String>(&e.data).unwrap());
        }
        e.event == "end"
    });
    let logs: Vec<&Sse> = first
        .iter()
        .chain(&later)
        .filter(|e| e.event == "log")
        .collect();
    assert!(logs.len() >= 10, "{logs:#?}");
    let spread = logs.last().unwrap().at.unwrap() - logs[0].at.unwrap();
    assert!(spread > Duration::from_secs(2), "{spread:?}");
    assert!(
        text.starts_with(&format!("farmer: build {id} attempt 1")),
        "{text}"
    );
    assert!(text.ends_with(&rest), "{text}\n---\n{rest}");
    let mut pos = 0;
    for i in 1..=25 {
        let line = format!("line {i} ünïcode\n");
        pos += text[pos..]
            .find(&line)
            .unwrap_or_else(|| panic!("{line:?} missing or out of order in:\n{text}"))
            + line.len();
    }

    // A finished build's stream says so at once.
    let done = sse(&url, &[], Duration::from_secs(30));
    let events = until(&done, Duration::from_secs(10), |e| e.event == "end");
    assert!(!events.iter().any(|e| e.event == "log"), "{events:#?}");

    // The grid stream sent the new row, then patched the cell in place.
    let events = until(&grid_events, Duration::from_secs(30), |e| {
        e.event == "cells" && e.data.contains("class=\\\"ok\\\"")
    });
    if !grid.contains(&commit[..10]) {
        // The page was older than the first poll: the row came whole.
        assert!(
            events
                .iter()
                .any(|e| e.event == "html" && e.data.contains(&commit[..10])),
            "{events:#?}"
        );
    }
    let cells = events.last().unwrap();
    let v: serde_json::Value = serde_json::from_str(&cells.data).unwrap();
    assert_eq!(v[0][0], 0);
    assert_eq!(v[0][1], 0);
    assert_eq!(
        v[0][2],
        format!("<td class=\"ok\"><a href=\"/builds/{id}\" title=\"passed\">ok</a></td>")
    );

    // The status page refreshes itself.
    let status = sse(&c.url("/status/events"), &[], Duration::from_secs(30));
    let events = until(&status, Duration::from_secs(10), |e| e.event == "html");
    let last = events.last().unwrap();
    assert!(last.data.contains("\"target\":\"status-live\""), "{last:?}");
    assert!(last.data.contains("bot-1"), "{last:?}");
}

/// The families of a Prometheus text exposition, name → (type, samples).
/// Fails where Prometheus would: a sample outside its family's block, a
/// family declared twice, a bad name or value.
fn parse_exposition(
    text: &str,
) -> Result<std::collections::BTreeMap<String, Vec<(String, f64)>>, String> {
    let mut families: std::collections::BTreeMap<String, Vec<(String, f64)>> = Default::default();
    let mut types: std::collections::BTreeMap<String, String> = Default::default();
    let mut current: Option<String> = None;
    let mut eof = false;
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default().to_string();
            if families.contains_key(&name) {
                return Err(format!("family {name} declared twice"));
            }
            families.insert(name.clone(), Vec::new());
            current = Some(name);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut f = rest.split(' ');
            let (name, kind) = (f.next().unwrap_or_default(), f.next().unwrap_or_default());
            if current.as_deref() != Some(name) {
                return Err(format!("TYPE of {name} away from its HELP"));
            }
            if ![
                "counter",
                "gauge",
                "histogram",
                "summary",
                "info",
                "unknown",
            ]
            .contains(&kind)
            {
                return Err(format!("bad type {kind:?} for {name}"));
            }
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line == "# EOF" {
            eof = true;
            continue;
        }
        if eof {
            return Err(format!("a line after # EOF: {line}"));
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("no value: {line}"))?;
        let value: f64 = value.parse().map_err(|_| format!("bad value: {line}"))?;
        let name = series.split('{').next().unwrap_or_default();
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            || !(name.starts_with("farmer_") || name.starts_with("process_"))
        {
            return Err(format!("bad name: {line}"));
        }
        let Some(family) = current.as_deref() else {
            return Err(format!("sample before any family: {line}"));
        };
        // OpenMetrics suffixes: a counter's samples end in _total, an
        // info's in _info, a histogram's in _bucket, _sum and _count.
        let suffixes: &[&str] = match types.get(family).map(String::as_str) {
            Some("histogram" | "summary") => &["_bucket", "_sum", "_count"],
            Some("counter") => &["_total", "_created"],
            Some("info") => &["_info"],
            _ => &[""],
        };
        let belongs = suffixes.iter().any(|s| format!("{family}{s}") == name);
        if !belongs {
            return Err(format!("sample of {name} inside the block of {family}"));
        }
        families
            .get_mut(family)
            .unwrap()
            .push((series.to_string(), value));
    }
    Ok(families)
}
