//! `/repos/{name}`: one watched repository — where it comes from (the URL
//! without its password), its branches and last poll error, how its
//! forge's webhooks reach the farm, every webhook delivery (accepted or
//! refused, and why), and the messages sent back (commit statuses,
//! notifications) with their state. `?mode=json` gives the same data.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, State};
use serde::Serialize;

use super::util::date_ms;
use super::{Layout, PageError, PageResult, html, json};
use crate::farm::Farm;

/// Deliveries and messages the page lists.
const ROWS: i64 = 100;

#[derive(serde::Deserialize)]
pub struct ModeQuery {
    mode: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DeliveryLine {
    pub at: String,
    pub forge: String,
    pub event: String,
    pub delivery: String,
    pub accepted: bool,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct MessageLine {
    pub id: i64,
    pub kind: String,
    pub about: String,
    pub created: String,
    pub state: String,
    pub attempts: i64,
    pub last_error: String,
}

#[derive(Debug, Serialize)]
pub struct RepoView {
    pub name: String,
    /// Without any password.
    pub url: String,
    pub branches: Vec<String>,
    pub poll_interval: String,
    pub poll_error: Option<String>,
    pub forge: Option<String>,
    /// The forge's repository (OWNER/NAME).
    pub forge_repository: String,
    /// Where to point the forge's webhook.
    pub hook_url: String,
    pub hooks_signed: bool,
    pub statuses: bool,
    pub notify: Vec<String>,
    pub deliveries: Vec<DeliveryLine>,
    pub messages: Vec<MessageLine>,
}

#[derive(Template)]
#[template(path = "repo.html")]
struct RepoPage {
    l: Layout,
    v: RepoView,
}

pub async fn repo_page(
    State(farm): State<Arc<Farm>>,
    Path(name): Path<String>,
    Query(q): Query<ModeQuery>,
) -> PageResult {
    let cfg = farm.config();
    let rc = cfg
        .repos
        .get(&name)
        .ok_or_else(|| PageError::NotFound(format!("no repo named {name:?} in the config")))?;
    let deliveries = farm
        .store
        .deliveries(&name, ROWS)
        .await?
        .into_iter()
        .map(|d| DeliveryLine {
            at: date_ms(d.received_at),
            forge: d.forge,
            event: d.event,
            delivery: d.delivery,
            accepted: d.accepted,
            detail: d.detail,
        })
        .collect();
    let messages = farm
        .store
        .outbox_for_repo(&name, ROWS)
        .await?
        .into_iter()
        .map(|m| MessageLine {
            id: m.id,
            about: m
                .dedupe
                .split_once(':')
                .map_or("", |(_, rest)| rest)
                .to_string(),
            kind: m.kind,
            created: date_ms(m.created_at),
            state: m.state,
            attempts: m.attempts,
            last_error: m.last_error,
        })
        .collect();
    let forge = rc.forge.as_ref();
    let forge_path = forge.map_or("github", |f| f.kind.as_str());
    let mut notify = Vec::new();
    if let Some(w) = &rc.notify.webhook {
        notify.push(format!("webhook {}", crate::git::redact_url(w)));
    }
    notify.extend(rc.notify.email.iter().map(|e| format!("email {e}")));
    let v = RepoView {
        name: name.clone(),
        url: crate::git::redact_url(&rc.url),
        branches: rc.branches.clone(),
        poll_interval: crate::config::human_duration(rc.poll_interval.as_secs() as i64),
        poll_error: farm
            .poll_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&name)
            .cloned(),
        forge: forge.map(|f| f.kind.as_str().to_string()),
        forge_repository: forge.map(|f| f.repository.clone()).unwrap_or_default(),
        hook_url: format!("{}/hooks/{forge_path}?repo={name}", farm.public_url()),
        hooks_signed: forge.is_some_and(|f| f.webhook_secret.is_some()),
        statuses: forge.is_some_and(|f| f.status_token.is_some()),
        notify,
        deliveries,
        messages,
    };
    if q.mode.as_deref() == Some("json") {
        return json(&v);
    }
    html(&RepoPage {
        l: Layout::new(format!("Repo {name}"), ""),
        v,
    })
}
