//! A first, plain dashboard: the build grid (`/`), farm status (`/status`)
//! and a build page with its log following live (`/builds/{id}`). Rendered
//! on the server, no external assets.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::response::Html;
use axum::routing::get;

use crate::farm::Farm;
use crate::store::{BuildFilter, BuildRow};

pub fn router(farm: Arc<Farm>) -> Router {
    Router::new()
        .route("/", get(grid))
        .route("/status", get(status))
        .route("/builds/{id}", get(build_page))
        .with_state(farm)
}

pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}\
.passed{background:#8c8}.failed{background:#e88}.infra-error{background:#fc8}.running{background:#8bf}.queued{background:#eee}.cancelled{background:#bbb}\
pre{background:#111;color:#eee;padding:8px;white-space:pre-wrap}";

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html><head><meta charset=utf-8><meta name=viewport content='width=device-width'><title>{}</title><style>{STYLE}</style></head><body><nav><a href='/'>grid</a> · <a href='/status'>status</a> · <a href='/api/builders'>builders</a></nav>{body}</body></html>",
        esc(title)
    ))
}

async fn grid(State(farm): State<Arc<Farm>>) -> Html<String> {
    let cfg = farm.config();
    let mut body = String::from("<h1>Builds</h1>");
    for (name, repo) in &cfg.repos {
        for branch in &repo.branches {
            let commits = farm
                .store
                .commits(name, branch, 30, 0)
                .await
                .unwrap_or_default();
            let builders = cfg.builders_for(name, branch);
            let _ = write!(
                body,
                "<h2>{} · {}</h2><table><tr><th>commit</th><th>author</th><th>subject</th>",
                esc(name),
                esc(branch)
            );
            for b in &builders {
                let _ = write!(body, "<th>{}</th>", esc(&b.name));
            }
            body.push_str("</tr>");
            for c in &commits {
                let builds = farm
                    .store
                    .builds(&BuildFilter {
                        repo: Some(name.clone()),
                        commit: Some(c.hash.clone()),
                        limit: 1000,
                        ..Default::default()
                    })
                    .await
                    .unwrap_or_default();
                let mut latest: HashMap<&str, &BuildRow> = HashMap::new();
                for b in &builds {
                    latest.entry(b.builder.as_str()).or_insert(b);
                }
                let _ = write!(
                    body,
                    "<tr><td><code>{}</code></td><td>{}</td><td>{}</td>",
                    &c.hash[..c.hash.len().min(10)],
                    esc(&c.author),
                    esc(&c.subject)
                );
                for b in &builders {
                    match latest.get(b.name.as_str()) {
                        Some(r) => {
                            let _ = write!(
                                body,
                                "<td class='{s}'><a href='/builds/{id}'>{s}</a></td>",
                                s = r.status,
                                id = r.id
                            );
                        }
                        None => body.push_str("<td></td>"),
                    }
                }
                body.push_str("</tr>");
            }
            body.push_str("</table>");
        }
    }
    page("farmer", &body)
}

async fn status(State(farm): State<Arc<Farm>>) -> Html<String> {
    let cfg = farm.config();
    let mut body = format!(
        "<h1>Farm status</h1><p>up {}</p>",
        crate::api::human_duration(farm.started.elapsed().as_secs() as i64)
    );
    body.push_str("<h2>Health</h2><ul>");
    for h in crate::api::health(&farm).await {
        let _ = write!(
            body,
            "<li>{}: {} {}</li>",
            h.level,
            esc(&h.host_type),
            esc(&h.message)
        );
    }
    body.push_str("</ul><h2>Queues</h2><ul>");
    for q in farm.scheduler.views() {
        let _ = write!(
            body,
            "<li>{}: {} waiting, oldest {:.0}s — {}</li>",
            esc(&q.host_type),
            q.waiting,
            q.oldest_wait_secs,
            esc(&farm.wait_reason(&q.host_type))
        );
    }
    body.push_str("</ul><h2>Reverse pool</h2><table><tr><th>host type</th><th>connected</th><th>busy</th><th>expected</th></tr>");
    let counts = farm.pool.counts();
    for (ht, h) in &cfg.hosts {
        let c = counts.get(ht).copied().unwrap_or_default();
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(ht),
            c.connected,
            c.busy,
            h.expected
        );
    }
    body.push_str("</table><h2>Machines</h2><table><tr><th>hostname</th><th>host type</th><th>address</th><th>version</th><th>state</th></tr>");
    for m in farm.pool.snapshot() {
        let state = match &m.state {
            crate::pool::MachineState::Idle => "idle".to_string(),
            crate::pool::MachineState::Busy { build_id: Some(b) } => {
                format!("building <a href='/builds/{b}'>#{b}</a>")
            }
            crate::pool::MachineState::Busy { build_id: None } => "leased".into(),
            crate::pool::MachineState::Cleaning => "cleaning".into(),
        };
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{} ({})</td><td>{state}</td></tr>",
            esc(&m.hostname),
            esc(&m.host_type),
            esc(&m.addr),
            m.version,
            esc(&m.build)
        );
    }
    body.push_str("</table><h2>Refused registrations</h2><ul>");
    for r in farm.pool.recent_refusals().iter().take(20) {
        let _ = write!(
            body,
            "<li>{} {} from {}: {}</li>",
            esc(&r.host_type),
            esc(&r.hostname),
            esc(&r.addr),
            esc(&r.reason)
        );
    }
    body.push_str("</ul>");
    page("farmer status", &body)
}

async fn build_page(State(farm): State<Arc<Farm>>, Path(id): Path<i64>) -> Html<String> {
    let Ok(Some(b)) = farm.store.build(id).await else {
        return page("not found", &format!("<h1>No build {id}</h1>"));
    };
    let mut body = format!(
        "<h1>Build {id}: {} <span class='{s}'>{s}</span></h1><p>{}@<code>{}</code> on {}</p><p>{}</p>",
        esc(&b.builder),
        esc(&b.repo),
        esc(&b.commit),
        esc(&b.host_type),
        esc(&b.error),
        s = b.status
    );
    body.push_str("<h2>Attempts</h2><ul>");
    for a in farm.store.attempts(id).await.unwrap_or_default() {
        let _ = write!(
            body,
            "<li>#{} on {}: {} {}</li>",
            a.number,
            esc(&a.machine),
            esc(&a.result),
            esc(&a.error)
        );
    }
    let _ = write!(
        body,
        "</ul><h2>Log</h2><p><a href='/api/builds/{id}/log'>raw</a></p><pre id=log></pre>\
<script>(async()=>{{const r=await fetch('/api/builds/{id}/log');const d=new TextDecoder();const rd=r.body.getReader();const el=document.getElementById('log');for(;;){{const x=await rd.read();if(x.done)break;el.textContent+=d.decode(x.value,{{stream:true}});}}}})();</script>"
    );
    page(&format!("build {id}"), &body)
}
