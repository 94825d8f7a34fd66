//! Machine (`/machines/{hostname}`) and host type (`/hosts/{host_type}`)
//! pages, so an owner sees what their machine did: connected or when last
//! seen, what it does now, why it was refused, and its recent builds.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, State};

use super::status::{GoneLine, MachineLine, RefusalLine};
use super::util::{BuildLine, date_ms, since};
use super::{Layout, PageError, PageResult, html};
use crate::farm::Farm;
use crate::pool::{Holder, MachineState};
use crate::store::{BuildFilter, now_ms};

/// Builds listed on a machine or host type page.
const RECENT: i64 = 50;

/// One machine's line on the status, machine and host pages; `work` says
/// what a working machine builds.
pub(super) fn machine_line(m: &crate::pool::MachineView, now: i64, work: String) -> MachineLine {
    let (state, build_id) = match &m.state {
        MachineState::Idle => ("idle", 0),
        MachineState::Leased {
            holder: Holder::Build { build_id },
        } => ("working", *build_id),
        MachineState::Leased {
            holder: Holder::Helper { build_id },
        } => ("helping", *build_id),
        MachineState::Leased {
            holder: Holder::Interactive { .. },
        } => ("interactive", 0),
        MachineState::Cleaning => ("cleaning", 0),
        MachineState::Draining => ("draining", 0),
    };
    MachineLine {
        hostname: m.hostname.clone(),
        host_type: m.host_type.clone(),
        addr: m.addr.clone(),
        version: m.version,
        build: m.build.clone(),
        binary: m
            .binary
            .release
            .clone()
            .unwrap_or_else(|| m.binary.sha256.chars().take(12).collect()),
        binary_status: m.binary.status.clone(),
        connected_for: since(m.connected_at, now),
        connected_at: date_ms(m.connected_at),
        state,
        build_id,
        work,
        state_for: since(m.state_since, now),
    }
}

/// "leased to alice until 2026-12-01 01:23:45 UTC" for a machine a gomote
/// instance holds; empty otherwise.
pub(super) fn lease_text(farm: &Farm, m: &crate::pool::MachineView) -> String {
    match &m.state {
        MachineState::Leased {
            holder: Holder::Interactive { session },
        } => match farm.gomote.lease_of(session) {
            Some((owner, until)) => format!(
                "leased to {owner} until {} (instance {session})",
                crate::gomote::utc(until)
            ),
            None => format!("leased to instance {session}"),
        },
        _ => String::new(),
    }
}

fn refusals(farm: &Farm, f: impl Fn(&crate::pool::Refusal) -> bool, now: i64) -> Vec<RefusalLine> {
    farm.pool
        .recent_refusals()
        .into_iter()
        .filter(|r| f(r))
        .take(20)
        .map(|r| RefusalLine {
            ago: since(r.at, now),
            at: date_ms(r.at),
            host_type: r.host_type,
            hostname: r.hostname,
            addr: r.addr,
            reason: r.reason,
        })
        .collect()
}

#[derive(Template)]
#[template(path = "machine.html")]
struct MachinePage {
    l: Layout,
    hostname: String,
    connected: Option<MachineLine>,
    seen: Option<GoneLine>,
    first_seen: String,
    refusals: Vec<RefusalLine>,
    builds: Vec<BuildLine>,
}

pub async fn machine_page(
    State(farm): State<Arc<Farm>>,
    Path(hostname): Path<String>,
) -> PageResult {
    let now = now_ms();
    let connected = farm
        .pool
        .snapshot()
        .iter()
        .find(|m| m.hostname == hostname)
        .map(|m| machine_line(m, now, lease_text(&farm, m)));
    let row = farm
        .store
        .machines()
        .await?
        .into_iter()
        .find(|m| m.hostname == hostname);
    let refusals = refusals(&farm, |r| r.hostname == hostname, now);
    if connected.is_none() && row.is_none() && refusals.is_empty() {
        return Err(PageError::NotFound(format!(
            "No machine named {hostname:?} has connected to this coordinator."
        )));
    }
    let builds = farm
        .store
        .builds(&BuildFilter {
            machine: Some(hostname.clone()),
            limit: RECENT,
            ..Default::default()
        })
        .await?
        .iter()
        .map(|b| BuildLine::new(b, now))
        .collect();
    html(&MachinePage {
        l: Layout::new(format!("Machine {hostname}"), ""),
        first_seen: row
            .as_ref()
            .map(|r| date_ms(r.first_seen))
            .unwrap_or_default(),
        seen: row.map(|m| GoneLine {
            last_seen: since(m.last_seen, now),
            last_seen_at: date_ms(m.last_seen),
            hostname: m.hostname,
            host_type: m.host_type,
            addr: m.addr,
        }),
        hostname,
        connected,
        refusals,
        builds,
    })
}

#[derive(Template)]
#[template(path = "host.html")]
struct HostPage {
    l: Layout,
    host: super::builders::HostView,
    waiting: usize,
    oldest: String,
    reason: String,
    machines: Vec<MachineLine>,
    gone: Vec<GoneLine>,
    refusals: Vec<RefusalLine>,
    builds: Vec<BuildLine>,
}

pub async fn host_page(State(farm): State<Arc<Farm>>, Path(host_type): Path<String>) -> PageResult {
    let now = now_ms();
    let mut all = super::builders::load(&farm);
    let Some(host) = all.hosts.remove(&host_type) else {
        return Err(PageError::NotFound(format!(
            "The farm config has no host type {host_type:?}."
        )));
    };
    let snapshot = farm.pool.snapshot();
    let machines: Vec<MachineLine> = snapshot
        .iter()
        .filter(|m| m.host_type == host_type)
        .map(|m| machine_line(m, now, lease_text(&farm, m)))
        .collect();
    let gone = farm
        .store
        .machines()
        .await?
        .into_iter()
        .filter(|m| m.host_type == host_type && !snapshot.iter().any(|c| c.hostname == m.hostname))
        .map(|m| GoneLine {
            last_seen: since(m.last_seen, now),
            last_seen_at: date_ms(m.last_seen),
            hostname: m.hostname,
            host_type: m.host_type,
            addr: m.addr,
        })
        .collect();
    let queue = farm
        .scheduler
        .views(0)
        .into_iter()
        .find(|q| q.host_type == host_type);
    let builds = farm
        .store
        .builds(&BuildFilter {
            host_type: Some(host_type.clone()),
            limit: RECENT,
            ..Default::default()
        })
        .await?
        .iter()
        .map(|b| BuildLine::new(b, now))
        .collect();
    html(&HostPage {
        l: Layout::new(format!("Host type {host_type}"), ""),
        waiting: queue.as_ref().map_or(0, |q| q.waiting),
        oldest: queue
            .as_ref()
            .map(|q| super::util::duration_ms((q.oldest_wait_secs * 1000.0) as i64))
            .unwrap_or_default(),
        reason: if queue.is_some() {
            farm.wait_reason(&host_type)
        } else {
            String::new()
        },
        refusals: refusals(&farm, |r| r.host_type == host_type, now),
        host,
        machines,
        gone,
        builds,
    })
}
