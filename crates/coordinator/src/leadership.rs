//! A standby coordinator: two `farmer serve` on one PostgreSQL store, one
//! leading (it holds the store's leader lock, schedules, takes machines) and
//! one serving the dashboard and the read API until the leader stops, then
//! taking over as after a restart (attempts that were running are recorded
//! lost, their builds re-queued: none runs twice to its end).
//!
//! Split from `store::leader` (the lock itself) because this part takes the
//! farm: the gate that refuses what a standby must not do, and the loops.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::farm::Farm;
use crate::store::{LeaderLock, Store};

/// How often a standby tries for the lock: with the leader's connection
/// gone, it leads within this (plus its recovery).
const POLL: Duration = Duration::from_secs(1);
/// How often the leader checks it still holds the lock.
const CHECK: Duration = Duration::from_secs(2);

/// Lets a standby serve what only reads: pages, the read API, events.
/// Everything else (new builds, machines registering, tokens, webhooks)
/// gets `503` naming the leader, so a buildlet moves on to its next
/// `-coordinator` address and a person knows where to go.
pub async fn standby_gate(State(farm): State<Arc<Farm>>, req: Request, next: Next) -> Response {
    if farm.leading() {
        return next.run(req).await;
    }
    let reads = matches!(*req.method(), Method::GET | Method::HEAD)
        && !req.headers().contains_key(header::UPGRADE)
        && req.uri().path() != buildlet::proto::REVERSE_PATH;
    if reads {
        return next.run(req).await;
    }
    let leader = match farm.store.leader().await {
        Ok(Some(l)) => format!("the leader is {}", l.addr),
        _ => "no coordinator leads at this moment".to_string(),
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(serde_json::json!({
            "error": format!("this coordinator is a standby ({leader}); it serves pages and reads, and takes over if the leader stops"),
            "standby": true,
        })),
    )
        .into_response()
}

/// Waits until this coordinator holds the leader lock, reconnecting when
/// the database goes away meanwhile.
pub async fn acquire(store: &Store, addr: &str) -> LeaderLock {
    loop {
        let mut lock = match store.leader_lock().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("standby: cannot reach the store for the leader lock: {e}");
                tokio::time::sleep(POLL * 2).await;
                continue;
            }
        };
        loop {
            match lock.try_acquire(store, addr).await {
                Ok(true) => return lock,
                Ok(false) => tokio::time::sleep(POLL).await,
                Err(e) => {
                    tracing::warn!("standby: trying for the leader lock: {e}");
                    tokio::time::sleep(POLL).await;
                    break;
                }
            }
        }
    }
}

/// Checks the lock for as long as the process runs. Once it is lost,
/// another coordinator may already schedule: this one exits at once
/// (exit code 3) rather than run builds twice; a service manager restarts
/// it, and it comes back as the standby.
pub async fn watch(mut lock: LeaderLock) {
    loop {
        tokio::time::sleep(CHECK).await;
        if let Err(e) = lock.check().await {
            tracing::error!(
                "lost the leader lock ({e}); exiting so that two coordinators never schedule at once"
            );
            std::process::exit(3);
        }
    }
}
