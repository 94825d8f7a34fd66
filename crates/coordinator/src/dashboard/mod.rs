//! The dashboard: what people look at all day.
//!
//! Pages are rendered on the server from askama templates
//! (`crates/coordinator/templates/`, compiled into the binary and checked
//! at build time, every value HTML-escaped). The stylesheet and the small
//! script (`crates/coordinator/static/`) are embedded with `include_str!`
//! and served under `/static/`, so the dashboard needs nothing from outside.
//! Live updates are server-sent events: each page that changes opens one
//! stream, and the script swaps in server-rendered fragments or appends log
//! text.
//!
//! | route | page | module |
//! | --- | --- | --- |
//! | `/` | build grid (`?repo=&branch=&page=&n=&failures=1&mode=json`) | [`grid`] |
//! | `/status` | farm status | `status` |
//! | `/builders` | build and host configs (`?mode=json`) | `builders` |
//! | `/builders/{name}` | one builder: duration chart of its last builds, its builds (`?mode=json`) | `builders` |
//! | `/tests/{name}` | one test across builders and commits, where it started failing (`?mode=json`) | `testpages` |
//! | `/flakes` | tests by flake rate over recent builds (`?builds=N&mode=json`) | `testpages` |
//! | `/builds/{id}` | one build: steps, attempts, live log, admin actions | `build` |
//! | `/machines/{hostname}`, `/hosts/{host_type}` | what a machine / host type did | `machines` |
//! | `/repos/{name}` | one repo: url, forge, webhook deliveries, messages sent (`?mode=json`) | `repos` |
//! | `/requests` | builder requests: the owner's form, the admin's list | `requests` |

mod build;
mod builders;
mod chart;
pub mod grid;
mod machines;
mod repos;
mod requests;
mod status;
mod testpages;
mod util;

use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use askama::Template;
use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use futures_util::Stream;
use tokio::sync::mpsc;

use crate::farm::Farm;

pub fn router(farm: Arc<Farm>) -> Router {
    Router::new()
        .route("/", get(grid::page))
        .route("/grid/events", get(grid::events))
        .route("/status", get(status::page))
        .route("/status/events", get(status::events))
        .route("/builders", get(builders::page))
        .route("/builders/{name}", get(builders::builder_page))
        .route("/tests/{*name}", get(testpages::test_page))
        .route("/flakes", get(testpages::flakes_page))
        .route("/builds/{id}", get(build::page))
        .route("/builds/{id}/events", get(build::events))
        .route("/machines/{hostname}", get(machines::machine_page))
        .route("/hosts/{host_type}", get(machines::host_page))
        .route("/repos/{name}", get(repos::repo_page))
        .route("/requests", get(requests::page))
        .route("/requests/submit", axum::routing::post(requests::submit))
        .route("/static/dashboard.css", get(css))
        .route("/static/dashboard.js", get(js))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(farm)
}

const CSS: &str = include_str!("../../static/dashboard.css");
const JS: &str = include_str!("../../static/dashboard.js");

/// FNV-1a of an asset, so its URL changes with its content and browsers
/// may cache it forever.
const fn fnv(s: &str) -> u64 {
    let b = s.as_bytes();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < b.len() {
        h ^= b[i] as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
}

static CSS_URL: LazyLock<String> =
    LazyLock::new(|| format!("/static/dashboard.css?v={:016x}", fnv(CSS)));
static JS_URL: LazyLock<String> =
    LazyLock::new(|| format!("/static/dashboard.js?v={:016x}", fnv(JS)));

async fn css() -> Response {
    asset("text/css; charset=utf-8", CSS)
}

async fn js() -> Response {
    asset("text/javascript; charset=utf-8", JS)
}

fn asset(ty: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, ty),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        body,
    )
        .into_response()
}

/// Pages load nothing from elsewhere and run no inline script.
async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    r
}

/// What every page's frame (`base.html`) needs.
pub struct Layout {
    pub title: String,
    /// Which top navigation entry is current ("grid", "status", "builders", or "").
    pub nav: &'static str,
}

impl Layout {
    pub fn new(title: impl Into<String>, nav: &'static str) -> Layout {
        Layout {
            title: title.into(),
            nav,
        }
    }
    pub fn css_url(&self) -> &str {
        &CSS_URL
    }
    pub fn js_url(&self) -> &str {
        &JS_URL
    }
    pub fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }
}

/// A page that could not be shown.
#[derive(Debug)]
pub enum PageError {
    NotFound(String),
    Internal(String),
}

impl From<crate::store::StoreError> for PageError {
    fn from(e: crate::store::StoreError) -> Self {
        PageError::Internal(e.to_string())
    }
}

impl From<askama::Error> for PageError {
    fn from(e: askama::Error) -> Self {
        PageError::Internal(format!("rendering the page: {e}"))
    }
}

impl std::fmt::Display for PageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PageError::NotFound(m) | PageError::Internal(m) => f.write_str(m),
        }
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    l: Layout,
    message: String,
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let (code, title) = match &self {
            PageError::NotFound(_) => (StatusCode::NOT_FOUND, "Not found"),
            PageError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "Error"),
        };
        if code == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!("dashboard: {self}");
        }
        let page = ErrorPage {
            l: Layout::new(title, ""),
            message: self.to_string(),
        };
        match page.render() {
            Ok(body) => (code, Html(body)).into_response(),
            Err(_) => (code, self.to_string()).into_response(),
        }
    }
}

pub type PageResult = Result<Response, PageError>;

/// Renders a page template into a response.
fn html(t: &impl Template) -> PageResult {
    Ok(Html(t.render()?).into_response())
}

/// A JSON response (the pages' `?mode=json`).
fn json(v: &impl serde::Serialize) -> PageResult {
    Ok(
        axum::Json(serde_json::to_value(v).map_err(|e| PageError::Internal(e.to_string()))?)
            .into_response(),
    )
}

/// An event that replaces the inside of the element with id `target`.
fn html_event(target: &str, html: &str) -> Event {
    Event::default()
        .event("html")
        .data(serde_json::json!({ "target": target, "html": html }).to_string())
}

/// A server-sent event stream fed by a task. The task gets the sending
/// side and should stop once it is closed (the viewer went away); it is
/// dropped at the latest on its next send.
fn event_stream<F, Fut>(task: F) -> Response
where
    F: FnOnce(mpsc::Sender<Event>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Event>(64);
    tokio::spawn(task(tx));
    let stream =
        futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
        );
    let stream: std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>> =
        Box::pin(stream);
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// Sleeps `d`, or returns false early when the viewer has gone.
async fn tick(tx: &mpsc::Sender<Event>, d: Duration) -> bool {
    tokio::select! {
        _ = tx.closed() => false,
        _ = tokio::time::sleep(d) => true,
    }
}
