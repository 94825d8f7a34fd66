//! Builder requests (`/requests`): the machine owner's form for submitting
//! a CSR (answered with the request id and the secret to check it with), and
//! the admin's list with approve and reject, which the page's script calls
//! through the JSON API with the admin token kept in the browser.

use std::sync::Arc;

use askama::Template;
use axum::Form;
use axum::extract::State;

use super::{Layout, PageResult, html};
use crate::farm::Farm;
use crate::machine_auth::Submission;

#[derive(Template)]
#[template(path = "requests.html")]
struct RequestsPage {
    l: Layout,
    host_types: Vec<String>,
    /// Set after a submission.
    submitted: Option<(i64, String)>,
    error: String,
    hostname: String,
    contact: String,
    notes: String,
    bot_domain: String,
}

fn page_for(farm: &Farm) -> RequestsPage {
    RequestsPage {
        l: Layout::new("Builder requests", ""),
        host_types: farm.config().hosts.keys().cloned().collect(),
        submitted: None,
        error: String::new(),
        hostname: String::new(),
        contact: String::new(),
        notes: String::new(),
        bot_domain: crate::machine_auth::bot_domain(),
    }
}

pub async fn page(State(farm): State<Arc<Farm>>) -> PageResult {
    html(&page_for(&farm))
}

pub async fn submit(
    State(farm): State<Arc<Farm>>,
    conn: Option<axum::Extension<crate::reverse::ConnInfo>>,
    Form(mut f): Form<Submission>,
) -> PageResult {
    let mut p = page_for(&farm);
    // A form field picks up stray spaces; the API takes names as sent.
    let typed = std::mem::take(&mut f.hostname);
    f.hostname = typed.trim().to_string();
    let result = crate::machine_auth::submit_request(
        &farm.bots,
        &farm.store,
        conn.map(|c| c.0.peer.ip()),
        &f,
    )
    .await;
    f.hostname = typed;
    match result {
        Ok(r) => p.submitted = Some(r),
        Err((_, msg)) => {
            p.error = msg;
            p.hostname = f.hostname;
            p.contact = f.contact;
            p.notes = f.notes;
        }
    }
    html(&p)
}
