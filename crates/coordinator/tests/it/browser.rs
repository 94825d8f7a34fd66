//! The dashboard in a real browser: `farmer up` (the demo farm: three local
//! buildlets, the sample repository) driven with headless Chromium over the
//! DevTools protocol, all on loopback.
//!
//! Checks: the grid shows the demo's green and red cells; a running
//! build's log page gains lines without a reload, and the grid turns its
//! cell from running to passed in place; the status page lists the
//! connected machines. Every page is kept as a screenshot at desktop and
//! phone widths under `test-artifacts/dashboard/` (gitignored).

use crate::cdp;
use crate::common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A `farmer up` process (in its own process group, with its buildlets).
struct Up {
    child: common::Stopped,
    addr: String,
    data_dir: PathBuf,
    log: common::Lines,
}

impl Up {
    fn start(data_dir: &Path) -> Up {
        let mut child = common::Stopped(
            Command::new(common::FARMER)
                .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
                .arg(data_dir)
                .env("FARMER_LOG", "info,sqlx=warn")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0)
                .spawn()
                .unwrap(),
        );
        let (log, rx) = common::Lines::follow_announcing(child.stdout.take().unwrap());
        log.also(child.stderr.take().unwrap());
        let mut up = Up {
            child,
            addr: String::new(),
            data_dir: data_dir.to_path_buf(),
            log,
        };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => up.addr = line.trim_start_matches("listening on ").trim().to_string(),
            Err(_) => panic!("farmer up did not start:\n{}", up.log()),
        }
        up
    }

    fn log(&self) -> String {
        self.log.all()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn get(&self, path: &str) -> Value {
        let body = common::http_get(&self.url(path));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin.token"))
            .unwrap()
            .trim()
            .to_string()
    }

    fn wait<T>(&self, what: &str, limit: Duration, mut f: impl FnMut(&Up) -> Option<T>) -> T {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(v) = f(self) {
                return v;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("timed out waiting for {what}; farmer says:\n{}", self.log());
    }
}

fn artifacts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../test-artifacts/dashboard")
}

/// Screenshots of the current page at desktop and phone widths. At phone
/// width nothing may be cut off: wide tables scroll in their own box, so
/// the page itself is never wider than the screen.
fn shoot(tab: &cdp::Tab, name: &str) {
    let dir = artifacts();
    tab.viewport(390, 844, 2.0, true);
    std::thread::sleep(Duration::from_millis(300));
    tab.screenshot(&dir.join(format!("{name}-phone.png")));
    let overflow = tab.eval(
        "(() => { const w = document.documentElement.clientWidth; \
         if (document.documentElement.scrollWidth <= w + 1) return ''; \
         const wide = [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > w + 1 && !e.closest('.scroll')); \
         return document.documentElement.scrollWidth + ' > ' + w + ': ' + wide.slice(0, 5).map(e => e.tagName + '.' + e.className).join(', '); })()",
    );
    assert_eq!(
        overflow,
        json!(""),
        "{name}: at 390 px the page is wider than the screen"
    );
    tab.viewport(1280, 900, 1.0, false);
    std::thread::sleep(Duration::from_millis(300));
    tab.screenshot(&dir.join(format!("{name}-desktop.png")));
}

const SLOW_BUILDER: &str = r#"
# Added by the browser test: a build that prints a line every 250 ms.
[builders.linux-amd64-slow]
host = "host-linux-amd64-local"
repos = ["sample"]
timeout = "5m"
notes = "Prints a line every 250 ms (browser test)."
[[builders.linux-amd64-slow.steps]]
name = "count"
run = "for i in $(seq 1 48); do echo \"slow line $i\"; sleep 0.25; done"
"#;

#[test]
fn grid_live_log_and_status_in_headless_chromium() {
    let chromium = cdp::chromium();
    eprintln!("browser: {}", chromium.display());
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(&dir.path().join("farm"));

    // The demo builds 4 commits on 3 builders: 8 pass, 4 fail.
    let builds = up.wait("the demo builds", Duration::from_secs(120), |up| {
        let v = up.get("/api/builds?limit=100");
        let v = v.as_array().unwrap().clone();
        (v.len() == 12
            && v.iter()
                .all(|b| matches!(b["status"].as_str(), Some("passed" | "failed"))))
        .then_some(v)
    });
    let passed = builds.iter().filter(|b| b["status"] == "passed").count();
    assert_eq!((passed, builds.len() - passed), (8, 4), "{builds:#?}");
    // `farmer up` published itself as the buildlet release for this
    // platform, so stage0 can be tried against the demo.
    let releases = up.get("/api/releases");
    let current = releases["current"].as_array().unwrap();
    assert_eq!(current.len(), 1, "{releases}");
    let exe_size = std::fs::metadata(common::FARMER).unwrap().len();
    assert_eq!(current[0]["size"], exe_size, "{releases}");
    assert!(
        releases["release_key"]
            .as_str()
            .is_some_and(|k| k.len() == 64),
        "{releases}"
    );

    let browser = cdp::Browser::launch();
    let tab = browser.tab();
    tab.viewport(1280, 900, 1.0, false);

    // Each part is checked on its own: a failure is reported with the
    // others, not instead of them.
    let mut failed_parts: Vec<String> = Vec::new();

    part(&mut failed_parts, "grid", || {
        // The grid: green and red cells where the demo put them.
        tab.goto(&up.url("/"));
        tab.wait_for(
            "four commit rows",
            "document.querySelectorAll('table.grid tbody tr').length === 4",
            Duration::from_secs(10),
        );
        let cells = tab.eval(
        "[...document.querySelectorAll('table.grid tbody tr')].map(r => [...r.querySelectorAll('td.ok, td.fail')].map(td => td.className))",
    );
        assert_eq!(
            cells,
            json!([
                ["ok", "ok", "fail"],
                ["fail", "fail", "fail"],
                ["ok", "ok", "ok"],
                ["ok", "ok", "ok"]
            ]),
            "rows newest first; columns linux/amd64 (2), linux/arm64"
        );
        // Green is green and red is red, as the browser paints them.
        let colors = tab.eval(
        "['td.ok', 'td.fail'].map(s => getComputedStyle(document.querySelector(s)).backgroundColor.match(/\\d+/g).map(Number))",
    );
        let (ok, fail) = (&colors[0], &colors[1]);
        assert!(
            ok[1].as_u64() > ok[0].as_u64(),
            "passed cells are not green: {colors}"
        );
        assert!(
            fail[0].as_u64() > fail[1].as_u64(),
            "failed cells are not red: {colors}"
        );
        let heads = tab.eval("[...document.querySelectorAll('table.grid thead tr.os th:not(.lead), table.grid thead tr.arch th')].map(th => th.textContent + ':' + th.colSpan)");
        assert_eq!(heads, json!(["linux:3", "amd64:2", "arm64:1"]));
        shoot(&tab, "grid");
        tab.goto(&up.url("/?failures=1"));
        assert_eq!(
            tab.eval("document.querySelectorAll('table.grid tbody tr').length"),
            json!(2)
        );
    });

    // The status page lists the connected machines.
    let machines: Vec<String> = up.get("/api/machines")["connected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["hostname"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(machines.len(), 3, "{machines:?}");
    part(&mut failed_parts, "status page", || {
        tab.goto(&up.url("/status"));
        let listed = tab
            .eval("[...document.querySelectorAll('#machines a.hostname')].map(a => a.textContent)");
        let mut listed: Vec<String> = serde_json::from_value(listed).unwrap();
        listed.sort();
        let mut want = machines.clone();
        want.sort();
        assert_eq!(listed, want);
        let text = tab.eval("document.body.innerText").to_string();
        assert!(
            text.contains("All host types have their expected machines"),
            "{text}"
        );
        assert!(text.contains("3 connected / 3 expected"), "{text}");
        // It refreshes itself: the uptime changes without a reload.
        tab.eval("window.farmerMarker = 'status'");
        let before = tab.eval("document.querySelector('#status-live dd').textContent");
        tab.wait_for(
        "the status page to refresh",
        &format!(
            "document.querySelector('#status-live dd').textContent !== {before} && window.farmerMarker === 'status'"
        ),
        Duration::from_secs(10),
    );
        shoot(&tab, "status");
    });

    let failed = builds
        .iter()
        .find(|b| b["status"] == "failed" && b["builder"] == "linux-arm64-sim")
        .unwrap()["id"]
        .clone();
    part(
        &mut failed_parts,
        "builders, build, machine and host pages",
        || {
            // Builders, a finished failed build, a machine and a host type.
            tab.goto(&up.url("/builders"));
            assert_eq!(
                tab.eval("document.querySelectorAll('#build-configs tbody tr').length"),
                json!(3)
            );
            shoot(&tab, "builders");
            tab.goto(&up.url(&format!("/builds/{failed}")));
            let log = tab
                .eval("[...document.querySelectorAll('pre.log')].map(p => p.textContent).join('')");
            assert!(log.as_str().unwrap().contains("FAIL"), "{log}");
            shoot(&tab, "build-failed");
            tab.goto(&up.url(&format!("/machines/{}", machines[0])));
            tab.wait_for(
                "recent builds",
                "document.querySelectorAll('table.list tbody tr').length > 0",
                Duration::from_secs(5),
            );
            shoot(&tab, "machine");
            tab.goto(&up.url("/hosts/host-linux-amd64-local"));
            shoot(&tab, "host");
        },
    );

    part(
        &mut failed_parts,
        "a running build's log and grid cell",
        || {
            // A running build: add a slow builder (config reload on SIGHUP), start
            // it, and watch its log page and the grid in two tabs.
            let cfg = up.data_dir.join("farmer.toml");
            let mut text = std::fs::read_to_string(&cfg).unwrap();
            text.push_str(SLOW_BUILDER);
            std::fs::write(&cfg, text).unwrap();
            unsafe {
                libc::kill(up.child.id() as i32, libc::SIGHUP);
            }
            up.wait("the slow builder", Duration::from_secs(10), |up| {
                up.get("/api/builders")
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|b| b["name"] == "linux-amd64-slow")
                    .then_some(())
            });
            let grid_tab = browser.tab();
            grid_tab.viewport(1280, 900, 1.0, false);
            grid_tab.goto(&up.url("/"));
            grid_tab.eval("window.farmerMarker = 'grid'");
            let (code, created) = common::http_post(
                &up.url("/api/builds"),
                r#"{"builder": "linux-amd64-slow", "commit": "main"}"#,
                Some(&up.token()),
            );
            assert_eq!(code, 201, "{created}");
            let id = created["id"].as_i64().unwrap();

            tab.goto(&up.url(&format!("/builds/{id}")));
            tab.eval("window.farmerMarker = 'log'");
            let lines = "(document.getElementById('log') || {textContent: ''}).textContent.split('\\n').filter(l => l.startsWith('slow line')).length";
            let start = Instant::now();
            let mut seen: Vec<u64> = Vec::new();
            while start.elapsed() < Duration::from_secs(30) {
                let n = tab.eval(lines).as_u64().unwrap();
                if seen.last() != Some(&n) {
                    seen.push(n);
                }
                if n >= 12 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            assert!(
                seen.len() >= 4
                    && seen.windows(2).all(|w| w[0] < w[1])
                    && *seen.last().unwrap() >= 12,
                "the log should gain lines while the build runs; line counts seen: {seen:?}"
            );
            assert_eq!(
                tab.eval("window.farmerMarker"),
                json!("log"),
                "the page was reloaded"
            );
            let status = tab.eval("document.getElementById('build-status').textContent");
            assert_eq!(status, json!("running"));
            shoot(&tab, "build-running");

            // Meanwhile the grid shows the running build as a live link...
            let newest_slow = "document.querySelector('table.grid tbody tr').cells[4 + [...document.querySelectorAll('table.grid tr.names th')].findIndex(th => th.textContent === 'linux-amd64-slow')]";
            grid_tab.wait_for(
                "the running cell",
                &format!("{newest_slow}.className === 'run'"),
                Duration::from_secs(15),
            );
            assert_eq!(
                grid_tab.eval(&format!(
                    "{newest_slow}.querySelector('a').getAttribute('href')"
                )),
                json!(format!("/builds/{id}"))
            );
            shoot(&grid_tab, "grid-running");
            // ... and turns it green when it passes, both without a reload.
            grid_tab.wait_for(
                "the cell to pass",
                &format!("{newest_slow}.className === 'ok'"),
                Duration::from_secs(30),
            );
            assert_eq!(grid_tab.eval("window.farmerMarker"), json!("grid"));
            tab.wait_for(
        "the log to end",
        "document.getElementById('log').getAttribute('data-ended') === '1' && document.getElementById('build-status').textContent === 'passed'",
        Duration::from_secs(15),
    );
            assert_eq!(tab.eval(lines), json!(48));
            assert_eq!(tab.eval("window.farmerMarker"), json!("log"));
        },
    );

    part(
        &mut failed_parts,
        "test results, failures first, charts",
        || {
            // The build page opens on the failing test: its text, and its
            // line shown in the open step log.
            let failed_amd64 = builds
                .iter()
                .find(|b| b["status"] == "failed" && b["builder"] == "linux-amd64")
                .unwrap()["id"]
                .clone();
            tab.goto(&up.url(&format!("/builds/{failed_amd64}")));
            tab.wait_for(
                "the failure shown",
                "!!document.querySelector('#first-failure[open]') && !!document.querySelector('pre.log .hit')",
                Duration::from_secs(5),
            );
            let first = tab.eval("document.querySelector('#first-failure').textContent");
            assert!(first.as_str().unwrap().contains("hello"), "{first}");
            assert!(
                first
                    .as_str()
                    .unwrap()
                    .contains("FAIL hello: got 'HOWDY', want 'HELLO'"),
                "{first}"
            );
            assert_eq!(
                tab.eval("document.querySelector('pre.log .hit').textContent.trim()"),
                json!("---- hello stdout ----")
            );
            assert_eq!(
                tab.eval("document.querySelector('pre.log .hit').closest('details').open"),
                json!(true)
            );
            let api = up.get(&format!("/api/builds/{failed_amd64}"));
            assert_eq!(api["test_counts"]["fail"], 1, "{api}");
            assert_eq!(api["tests"][0]["name"], "hello", "{api}");
            shoot(&tab, "build-failures-first");

            // The test across builders: failing on the third commit everywhere.
            tab.goto(&up.url("/tests/hello"));
            assert_eq!(
                tab.eval("document.querySelectorAll('#test-grid td.fail').length"),
                json!(3)
            );
            shoot(&tab, "test");

            // A builder's duration chart: one bar per finished build, the
            // longest as tall as the API's longest.
            tab.goto(&up.url("/builders/linux-amd64"));
            let finished: Vec<Value> = up
                .get("/api/builds?builder=linux-amd64&limit=100")
                .as_array()
                .unwrap()
                .iter()
                .filter(|b| b["finished_at"].is_number() && b["started_at"].is_number())
                .cloned()
                .collect();
            assert_eq!(
                tab.eval("document.getElementById('duration-chart').getAttribute('data-bars')"),
                json!(finished.len().to_string())
            );
            let longest = finished
                .iter()
                .map(|b| {
                    (b["finished_at"].as_i64().unwrap() - b["started_at"].as_i64().unwrap()) as f64
                        / 1000.0
                })
                .fold(0.0, f64::max);
            let drawn: f64 = tab
                .eval("document.getElementById('duration-chart').getAttribute('data-max')")
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((drawn - longest).abs() < 0.01, "{drawn} vs {longest}");
            assert_eq!(
                tab.eval("document.querySelectorAll('#duration-chart rect.fail').length"),
                json!(1)
            );
            shoot(&tab, "builder");

            // The status page's charts draw what /api/history holds.
            tab.goto(&up.url("/status"));
            let history = up.get("/api/history");
            assert!(
                !history["samples"].as_array().unwrap().is_empty(),
                "{history}"
            );
            // The charts end at now, as /api/history's `now` does.
            let hosts = history["now"]["hosts"].as_array().unwrap();
            assert_eq!(
                tab.eval("document.getElementById('machines-chart').getAttribute('data-series')"),
                json!(hosts.len().to_string())
            );
            assert!(
                tab.eval("document.querySelectorAll('#wait-chart polyline').length")
                    .as_u64()
                    .unwrap()
                    >= 1
            );
            let local = hosts
                .iter()
                .find(|h| h["host_type"] == "host-linux-amd64-local")
                .unwrap();
            let drawn = tab.eval(
                "document.querySelector('#machines-chart polyline[data-host-type=\"host-linux-amd64-local\"]').getAttribute('data-last')",
            );
            assert_eq!(drawn, json!(local["connected"].to_string()), "{history}");
            shoot(&tab, "status-charts");
        },
    );

    part(&mut failed_parts, "rebuild from the build page", || {
        // An admin rebuilds the failed build from its page: a wrong token is
        // refused with the API's reason; the right one is kept in the
        // browser's local storage and leads to the new build's page.
        tab.goto(&up.url(&format!("/builds/{failed}")));
        let click = |token: &str| {
            tab.eval(&format!(
                "(() => {{ document.getElementById('admin').open = true; \
             const i = document.getElementById('admin-token'); i.value = {}; \
             i.dispatchEvent(new Event('change')); \
             document.querySelector('#admin [data-action=rebuild]').click(); return true; }})()",
                json!(token)
            ));
        };
        click("not-the-token");
        tab.wait_for(
        "the refusal",
        "document.getElementById('admin-msg').textContent.includes('Refused (403): wrong admin token')",
        Duration::from_secs(10),
    );
        let token = up.token();
        click(&token);
        let rebuilt = tab.wait_for(
        "the rebuild's page",
        &format!(
            "location.pathname !== '/builds/{failed}' && document.readyState === 'complete' && location.pathname"
        ),
        Duration::from_secs(15),
    );
        let new_id: i64 = rebuilt
            .as_str()
            .unwrap()
            .trim_start_matches("/builds/")
            .parse()
            .unwrap();
        let b = up.get(&format!("/api/builds/{new_id}"));
        assert_eq!(b["build"]["builder"], "linux-arm64-sim", "{b}");
        assert_eq!(
            tab.eval("localStorage.getItem('farmer-admin-token')"),
            json!(token)
        );
        assert_eq!(
            tab.eval("document.getElementById('admin-token').value"),
            json!(token),
            "the token is filled in on the next page"
        );
    });

    part(
        &mut failed_parts,
        "builder requests approved and rejected on /requests",
        || {
            // Two owners ask for machines.
            for host in ["bot-ok", "bot-no"] {
                let g = botauth::csr::generate(
                    host,
                    botauth::hostname::DEFAULT_BOT_DOMAIN,
                    botauth::csr::KeyType::Ed25519,
                )
                .unwrap();
                let body = json!({
                    "hostname": host,
                    "csr_pem": g.csr_pem,
                    "contact": format!("{host}@example.com"),
                    "notes": "",
                });
                let (code, v) =
                    common::http_post(&up.url("/api/requests"), &body.to_string(), None);
                assert!(code == 200 || code == 201, "{code} {v}");
            }
            // The admin lists them with the token and decides on the page.
            tab.goto(&up.url("/requests"));
            tab.eval(&format!(
            "(() => {{ document.getElementById('requests-token').value = {}; document.getElementById('requests-load').click(); return true; }})()",
            json!(up.token())
        ));
            tab.wait_for(
                "the two requests listed",
                "document.querySelectorAll('#requests-rows tr').length === 2",
                Duration::from_secs(10),
            );
            let row = |host: &str| {
                format!(
                    "[...document.querySelectorAll('#requests-rows tr')].find(tr => tr.cells[2].textContent === '{host}')"
                )
            };
            tab.eval(&format!(
            "(() => {{ const tr = {}; tr.querySelector('select').value = 'host-linux-arm64-sim'; [...tr.querySelectorAll('button')].find(b => b.textContent === 'Approve').click(); return true; }})()",
            row("bot-ok")
        ));
            tab.wait_for(
                "the approval shown",
                &format!(
                    "{}.cells[1].textContent.startsWith('approved (host-linux-arm64-sim)')",
                    row("bot-ok")
                ),
                Duration::from_secs(10),
            );
            tab.eval(&format!(
            "(() => {{ const tr = {}; tr.querySelector('input').value = 'not one of ours'; [...tr.querySelectorAll('button')].find(b => b.textContent === 'Reject').click(); return true; }})()",
            row("bot-no")
        ));
            tab.wait_for(
                "the rejection shown",
                &format!(
                    "{}.cells[1].textContent.includes('not one of ours')",
                    row("bot-no")
                ),
                Duration::from_secs(10),
            );
            shoot(&tab, "requests");
            // The farm recorded both decisions.
            let auth = format!("Bearer {}", up.token());
            let list = common::http(
                "GET",
                &up.url("/api/requests"),
                &[("authorization", &auth)],
                "",
            );
            let list: Value = serde_json::from_str(&list.body).unwrap();
            let by_host = |h: &str| {
                list.as_array()
                    .unwrap()
                    .iter()
                    .find(|q| q["hostname"] == h)
                    .cloned()
                    .unwrap()
            };
            assert_eq!(by_host("bot-ok")["status"], "approved", "{list}");
            assert_eq!(
                by_host("bot-ok")["host_type"],
                "host-linux-arm64-sim",
                "{list}"
            );
            assert_eq!(by_host("bot-no")["status"], "rejected", "{list}");
            assert_eq!(by_host("bot-no")["reason"], "not one of ours", "{list}");
        },
    );

    assert!(
        failed_parts.is_empty(),
        "{} part(s) failed:\n\n{}",
        failed_parts.len(),
        failed_parts.join("\n\n")
    );
}

/// Runs one part of the browser test, recording its failure (with the
/// panic message) instead of stopping the test.
fn part(failed: &mut Vec<String>, name: &str, f: impl FnOnce()) {
    if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "(no message)".into());
        failed.push(format!("{name}: {msg}"));
    }
}
