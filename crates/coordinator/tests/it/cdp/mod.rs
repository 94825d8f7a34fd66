//! A small Chrome DevTools Protocol client for the browser tests: starts
//! headless Chromium (Debian's `chromium`) with a fresh profile, talks to
//! it over a loopback websocket (tokio-tungstenite), and drives tabs:
//! navigate, evaluate JavaScript, set the viewport, take screenshots.
//! Every call is bounded in time; dropping the browser kills its whole
//! process group.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

/// Longest wait for one DevTools call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The Chromium binary: `$CHROMIUM`, else Debian's `/usr/bin/chromium`.
pub fn chromium() -> PathBuf {
    let p = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        p.exists(),
        "the browser tests need Chromium at {} (Debian: `apt-get install chromium`; .ci/run installs it), or CHROMIUM=/path/to/chromium",
        p.display()
    );
    p
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    out: mpsc::UnboundedSender<Message>,
    pending: Pending,
    next: AtomicU64,
    pub stderr: Arc<Mutex<Vec<String>>>,
}

/// One tab, attached with its own DevTools session.
pub struct Tab<'a> {
    browser: &'a Browser,
    session: String,
}

impl Browser {
    /// Starts headless Chromium and connects to it.
    pub fn launch() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--mute-audio",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("starting chromium");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let err = child.stderr.take().unwrap();
            let lines = stderr.clone();
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(err).lines() {
                    let Ok(line) = line else { break };
                    if let Some(ws) = line.strip_prefix("DevTools listening on ")
                        && let Some(t) = tx.take()
                    {
                        let _ = t.send(ws.trim().to_string());
                    }
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let ws = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(ws) => ws,
            Err(_) => {
                kill_group(&mut child);
                panic!(
                    "chromium did not start; stderr:\n{}",
                    stderr.lock().unwrap().join("\n")
                );
            }
        };
        assert!(ws.starts_with("ws://127.0.0.1:"), "{ws}");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let pending: Pending = Arc::default();
        let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
        let stream = rt.block_on(async {
            tokio::time::timeout(CALL_TIMEOUT, tokio_tungstenite::connect_async(ws.as_str()))
                .await
                .expect("connecting to chromium timed out")
                .expect("connecting to chromium")
                .0
        });
        let (mut sink, mut source) = stream.split();
        rt.spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
        });
        let p = pending.clone();
        rt.spawn(async move {
            while let Some(Ok(m)) = source.next().await {
                let Message::Text(t) = m else { continue };
                let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else {
                    continue;
                };
                if let Some(id) = v.get("id").and_then(Value::as_u64)
                    && let Some(tx) = p.lock().unwrap().remove(&id)
                {
                    let _ = tx.send(v);
                }
            }
        });
        Browser {
            child,
            _profile: profile,
            rt,
            out,
            pending,
            next: AtomicU64::new(1),
            stderr,
        }
    }

    /// Sends one command (to a tab's session, or to the browser) and waits
    /// for its result.
    pub fn call(&self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        self.out
            .send(Message::Text(msg.to_string().into()))
            .expect("the DevTools connection is gone");
        let reply = self.rt.block_on(async {
            tokio::time::timeout(CALL_TIMEOUT, rx)
                .await
                .unwrap_or_else(|_| panic!("DevTools call {method} timed out"))
                .expect("the DevTools connection closed")
        });
        if let Some(e) = reply.get("error") {
            panic!("DevTools call {method} failed: {e}");
        }
        reply["result"].clone()
    }

    /// Opens a new tab.
    pub fn tab(&self) -> Tab<'_> {
        let target = self.call(None, "Target.createTarget", json!({ "url": "about:blank" }));
        let target = target["targetId"].as_str().unwrap().to_string();
        let attached = self.call(
            None,
            "Target.attachToTarget",
            json!({ "targetId": target, "flatten": true }),
        );
        let tab = Tab {
            browser: self,
            session: attached["sessionId"].as_str().unwrap().to_string(),
        };
        tab.call("Page.enable", json!({}));
        tab.call("Runtime.enable", json!({}));
        tab
    }
}

fn kill_group(child: &mut Child) {
    // Chromium's helpers (zygote, renderers) are in its process group.
    unsafe {
        libc::kill(-(child.id() as i32), libc::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Browser {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

impl Tab<'_> {
    pub fn call(&self, method: &str, params: Value) -> Value {
        self.browser.call(Some(&self.session), method, params)
    }

    /// Evaluates an expression in the page (promises are awaited) and
    /// returns its value.
    pub fn eval(&self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expr}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Polls `expr` until it is truthy; panics with `what` after `limit`.
    pub fn wait_for(&self, what: &str, expr: &str, limit: Duration) -> Value {
        let start = Instant::now();
        loop {
            let v = self.eval(expr);
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return v;
            }
            if start.elapsed() > limit {
                let text = self.eval("document.body ? document.body.innerText : ''");
                panic!("timed out waiting for {what} ({expr}); the page says:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Loads a URL and waits until the document is complete.
    pub fn goto(&self, url: &str) {
        let r = self.call("Page.navigate", json!({ "url": url }));
        if let Some(e) = r.get("errorText") {
            panic!("navigating to {url}: {e}");
        }
        self.wait_for(
            &format!("{url} to load"),
            &format!(
                "document.readyState === 'complete' && location.href === {}",
                json!(url)
            ),
            Duration::from_secs(30),
        );
    }

    /// Sets the viewport: a desktop window or a phone (mobile emulation).
    pub fn viewport(&self, width: u32, height: u32, scale: f64, mobile: bool) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": scale, "mobile": mobile }),
        );
    }

    /// A PNG of the whole page (up to 8000 CSS pixels tall) into `path`.
    pub fn screenshot(&self, path: &Path) {
        use base64::Engine;
        // A tab behind another is not painted, and its capture waits for a
        // frame that never comes.
        self.call("Page.bringToFront", json!({}));
        let m = self.call("Page.getLayoutMetrics", json!({}));
        let size = &m["cssContentSize"];
        let width = size["width"].as_f64().unwrap_or(1280.0);
        let height = size["height"].as_f64().unwrap_or(900.0).min(8000.0);
        let r = self.call(
            "Page.captureScreenshot",
            json!({
                "format": "png",
                "captureBeyondViewport": true,
                "clip": { "x": 0, "y": 0, "width": width, "height": height, "scale": 1 }
            }),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}
