//! Living with a forge: webhooks in ([`hooks`]), commit statuses and
//! red/green notifications out, through a durable outbox ([`outbox`]) so
//! that a forge or mail server that is down never blocks a build and a
//! coordinator restart loses no message.
//!
//! Builds tell this module when they are created and when they end
//! ([`build_changed`]); what is sent is decided from the build as stored
//! when the message goes out, so the newest state always wins.

pub mod event;
pub mod hooks;
pub mod notify;
pub mod outbox;
pub mod verify;

use std::sync::Arc;

use crate::farm::Farm;

/// A build was created or finished: queue its commit status and, when it
/// changes a branch from green to red or back, the notifications.
pub fn build_changed(farm: &Arc<Farm>, build_id: i64) {
    let cfg = farm.config();
    let any = cfg.repos.values().any(|r| {
        r.forge.as_ref().is_some_and(|f| f.status_token.is_some()) || !r.notify.is_empty()
    });
    if !any {
        return;
    }
    let farm = farm.clone();
    tokio::spawn(async move {
        if let Err(e) = changed(&farm, build_id).await {
            tracing::error!(
                build = build_id,
                "queuing the build's status and notifications: {e}"
            );
        }
    });
}

async fn changed(farm: &Arc<Farm>, build_id: i64) -> Result<(), crate::store::StoreError> {
    let Some(b) = farm.store.build(build_id).await? else {
        return Ok(());
    };
    let cfg = farm.config();
    let Some(rc) = cfg.repos.get(&b.repo) else {
        return Ok(());
    };
    if rc.forge.as_ref().is_some_and(|f| f.status_token.is_some()) {
        let key = format!("status:{}:{}:{}", b.repo, b.commit, b.builder);
        let payload = serde_json::json!({ "build_id": b.id }).to_string();
        farm.store
            .outbox_push("status", &b.repo, &key, &payload)
            .await?;
    }
    if !rc.notify.is_empty() {
        notify::build_finished(farm, rc, &b).await?;
    }
    farm.outbox_wake.notify_one();
    Ok(())
}
