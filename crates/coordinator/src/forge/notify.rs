//! Telling people when a branch goes red, and when it is green again — not
//! on every failure. Each builder's last post-submit result per branch is
//! kept (`branch_states`); a result for a newer commit that flips it queues
//! the repo's notifications (a JSON webhook, email through `[smtp]`).

use serde_json::json;

use crate::config::RepoConfig;
use crate::farm::Farm;
use crate::store::{BranchState, BuildKind, BuildRow, BuildStatus, StoreError};

/// Serializes state changes: two builds finishing at once must not both
/// see the old state.
static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub(super) async fn build_finished(
    farm: &Farm,
    rc: &RepoConfig,
    b: &BuildRow,
) -> Result<(), StoreError> {
    // The branch's own builds only: what the farm chose to build, not a
    // commit someone picked (see `builds::gets_secrets`).
    if b.kind != BuildKind::PostSubmit || !crate::builds::gets_secrets(b) {
        return Ok(());
    }
    // An infrastructure error or a cancel says nothing about the code.
    let state = match b.status {
        BuildStatus::Passed => "passed",
        BuildStatus::Failed => "failed",
        _ => return Ok(()),
    };
    let _one = LOCK.lock().await;
    let prev = farm
        .store
        .branch_state(&b.repo, &b.branch, &b.builder)
        .await?;
    if let Some(p) = &prev
        && (b.commit_time < p.commit_time || p.build_id == b.id)
    {
        // An older commit that finished late does not decide the color.
        return Ok(());
    }
    farm.store
        .set_branch_state(
            &b.repo,
            &b.branch,
            &b.builder,
            &BranchState {
                state: state.to_string(),
                commit_hash: b.commit.clone(),
                commit_time: b.commit_time,
                build_id: b.id,
            },
        )
        .await?;
    // The first result known is where the farm starts, not a change.
    let Some(prev) = prev else { return Ok(()) };
    if prev.state == state {
        return Ok(());
    }
    let broke = state == "failed";
    let short = &b.commit[..12.min(b.commit.len())];
    let url = format!("{}/builds/{}", farm.public_url(), b.id);
    let subject = if broke {
        format!(
            "[farmer] {} broke {}/{} at {short}",
            b.builder, b.repo, b.branch
        )
    } else {
        format!(
            "[farmer] {} is green again on {}/{} at {short}",
            b.builder, b.repo, b.branch
        )
    };
    let mut text = format!(
        "{subject}\n\nBuilder: {}\nRepository: {} (branch {})\nCommit: {}\nBuild: {url}\n",
        b.builder, b.repo, b.branch, b.commit
    );
    if broke && !b.error.is_empty() {
        text.push_str(&format!("Why: {}\n", b.error));
    }
    text.push_str(&format!(
        "Previous result: {} at {} (build {})\n",
        prev.state,
        &prev.commit_hash[..12.min(prev.commit_hash.len())],
        prev.build_id
    ));
    let key = format!("notify:{}:{}:{}:{}", b.repo, b.branch, b.builder, b.id);
    if let Some(hook) = &rc.notify.webhook {
        let body = json!({
            "event": if broke { "broken" } else { "fixed" },
            "repo": b.repo,
            "branch": b.branch,
            "builder": b.builder,
            "commit": b.commit,
            "build_id": b.id,
            "url": url,
            "error": b.error,
            "previous": { "state": prev.state, "commit": prev.commit_hash, "build_id": prev.build_id },
            "text": subject,
        });
        let payload = json!({ "url": hook, "body": body }).to_string();
        farm.store
            .outbox_push("webhook", &b.repo, &format!("{key}:webhook"), &payload)
            .await?;
    }
    if !rc.notify.email.is_empty() {
        let payload =
            json!({ "to": rc.notify.email, "subject": subject, "text": text }).to_string();
        farm.store
            .outbox_push("email", &b.repo, &format!("{key}:email"), &payload)
            .await?;
    }
    Ok(())
}
