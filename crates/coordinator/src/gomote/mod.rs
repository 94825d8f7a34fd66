//! gomote: interactive leases on the farm's machines.
//!
//! A user creates an *instance* of a builder or host type; it asks the
//! lease queue for a machine at interactive priority (after releases,
//! ahead of pre- and post-submit work) and holds it until destroyed or
//! idle past `gomote_idle_timeout` (every call renews it, and nothing
//! expires while a call runs). Calls reach the machine through the
//! coordinator ([`api`]: an authenticated, allow-listed proxy of the
//! buildlet API over the machine's own link; [`ssh`]: a shell over the
//! same link), so machines behind NAT work and need no inbound port.
//!
//! Instances live in the [`registry`] and in the store: after a
//! coordinator restart an instance whose machine reconnects keeps it, and
//! one whose machine stays away ends with that reason. A call on an ended
//! instance says when and why it ended.

pub mod api;
pub mod cli;
pub mod push;
pub mod registry;
pub mod ssh;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;

use crate::api::ApiError;
use crate::auth::Caller;
use crate::farm::Farm;
use crate::pool::Lease;
use crate::scheduler::{LeaseRequest, Priority};
use crate::store::{InstanceRow, now_ms};
use registry::{InstanceView, Live, Phase, holder};

/// How long an instance waits for its machine to come back (a reconnect,
/// a coordinator restart) before it ends.
pub const MACHINE_GRACE: Duration = Duration::from_secs(120);

/// A renewal is written to the store when it moved the expiry this far.
const STORE_RENEWAL: i64 = 60_000;

/// `2026-12-01 01:23:45 UTC`.
pub fn utc(ms: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{ms} ms after the epoch"),
    }
}

fn err(code: StatusCode, msg: impl Into<String>) -> ApiError {
    ApiError(code, msg.into())
}

/// Whether `name` is a valid user, group or instance name: it becomes an
/// SSH user name and a URL segment.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// Creates an instance of `what` (a builder or a host type) for `caller`
/// and queues its lease request. Refusals name the rule that refused.
pub async fn create(
    farm: &Arc<Farm>,
    caller: &Caller,
    what: &str,
) -> Result<InstanceView, ApiError> {
    let cfg = farm.config();
    let host_type = if let Some(b) = cfg.builders.get(what) {
        b.host_type.clone()
    } else if cfg.hosts.contains_key(what) {
        what.to_string()
    } else {
        return Err(err(
            StatusCode::NOT_FOUND,
            format!(
                "no builder or host type named {what:?}; see /builders and /status for the names"
            ),
        ));
    };
    let host = cfg.hosts.get(&host_type).ok_or_else(|| {
        err(
            StatusCode::NOT_FOUND,
            format!("host type {host_type} is not configured"),
        )
    })?;
    if !host.gomote.allows(&caller.name, caller.admin) {
        return Err(err(
            StatusCode::FORBIDDEN,
            format!(
                "{host_type} refuses interactive leases for {}: its config says {}",
                caller.name,
                host.gomote.describe()
            ),
        ));
    }
    let max = cfg.farm.gomote_max_instances as usize;
    let _naming = farm.gomote.naming.lock().await;
    let have = farm.gomote.count_of(&caller.name);
    if have >= max && !caller.admin {
        return Err(err(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{} has {have} instances and the most per user is {max} (gomote_max_instances); destroy one first with `farmer gomote destroy INSTANCE`",
                caller.name
            ),
        ));
    }
    let short: String = what
        .trim_start_matches("host-")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let prefix = format!("{}-{short}", caller.name);
    let mut n = farm.store.instance_last_number(&prefix).await? + 1;
    // User names may hold dashes: "al-x" + "y" and "al" + "x-y" share a
    // prefix, so a name can be taken by another user's builder.
    while farm
        .store
        .instance(&format!("{prefix}-{n}"))
        .await?
        .is_some()
    {
        n += 1;
    }
    let name = format!("{prefix}-{n}");
    let now = now_ms();
    let row = InstanceRow {
        name: name.clone(),
        owner: caller.name.clone(),
        builder: what.to_string(),
        host_type: host_type.clone(),
        hostname: None,
        created_at: now,
        expires_at: now + cfg.farm.gomote_idle_timeout.as_millis() as i64,
        ended_at: None,
        end_reason: None,
    };
    farm.store.instance_add(&row).await?;
    let view = insert_waiting(farm, row);
    tracing::info!(instance = %name, owner = %caller.name, %host_type, "gomote instance created");
    Ok(view)
}

/// Puts an instance in the registry and starts waiting for its machine.
fn insert_waiting(farm: &Arc<Farm>, row: InstanceRow) -> InstanceView {
    let name = row.name.clone();
    let mut ticket = farm.scheduler.request(LeaseRequest {
        host_type: row.host_type.clone(),
        priority: Priority::Interactive,
        holder: holder(&name),
        commit_time: 0,
    });
    let live = Live {
        stored_expiry: row.expires_at,
        row,
        phase: Phase::Waiting,
        active: 0,
        bytes_in: 0,
        missing_since: None,
        waiter: None,
    };
    let view = live.view();
    farm.gomote.lock().insert(name.clone(), live);
    let f = farm.clone();
    let n = name.clone();
    let task = tokio::spawn(async move {
        let Ok(lease) = ticket.lease().await else {
            return;
        };
        granted(&f, &n, lease).await;
    });
    if let Some(l) = farm.gomote.lock().get_mut(&name) {
        l.waiter = Some(task.abort_handle());
    }
    view
}

/// The lease queue gave an instance its machine.
async fn granted(farm: &Arc<Farm>, name: &str, lease: Lease) {
    // The last build's source (the machine's source cache) is not the
    // instance's user's to read.
    if let Err(e) = lease.client.clear_all().await {
        tracing::warn!(instance = %name, "emptying the machine's source cache: {e}");
    }
    farm.delivery.set_held(&lease.hostname, None);
    let ok = {
        let mut live = farm.gomote.lock();
        match live.get_mut(name) {
            Some(l) => {
                l.phase = Phase::Ready;
                l.row.hostname = Some(lease.hostname.clone());
                l.waiter = None;
                true
            }
            None => false,
        }
    };
    if !ok {
        // Destroyed while the lease was on its way.
        farm.end_lease(lease).await;
        return;
    }
    farm.gomote.changed.notify_waiters();
    tracing::info!(instance = %name, hostname = %lease.hostname, "gomote instance has its machine");
    if let Err(e) = farm.store.instance_set_machine(name, &lease.hostname).await {
        tracing::error!(instance = %name, "recording the instance's machine: {e}");
    }
}

/// The caller's live instance `name`, or why not: `404` for a name never
/// used, `410` with when and why for an ended one, `403` for another
/// user's (without a word about it beyond the rule).
pub async fn owned(
    farm: &Arc<Farm>,
    caller: &Caller,
    name: &str,
) -> Result<InstanceView, ApiError> {
    if let Some(v) = farm.gomote.view(name) {
        if v.owner != caller.name && !caller.admin {
            return Err(err(
                StatusCode::FORBIDDEN,
                format!(
                    "instance {name} is not yours: a user sees and touches only their own instances (admins see all)"
                ),
            ));
        }
        return Ok(v);
    }
    match farm.store.instance(name).await? {
        Some(r) if r.owner == caller.name || caller.admin => {
            let when = utc(r.ended_at.unwrap_or(r.expires_at));
            let reason = r.end_reason.unwrap_or_default();
            Err(err(StatusCode::GONE, ended_message(name, &when, &reason)))
        }
        Some(_) => Err(err(
            StatusCode::FORBIDDEN,
            format!(
                "instance {name} is not yours: a user sees and touches only their own instances (admins see all)"
            ),
        )),
        None => Err(err(
            StatusCode::NOT_FOUND,
            format!("no instance named {name}; `farmer gomote list` shows yours"),
        )),
    }
}

/// "instance X expired at T" and its siblings.
fn ended_message(name: &str, when: &str, reason: &str) -> String {
    if let Some(why) = reason.strip_prefix("expired: ") {
        format!("instance {name} expired at {when} ({why})")
    } else if let Some(who) = reason.strip_prefix("destroyed ") {
        format!("instance {name} was destroyed at {when} {who}")
    } else {
        format!("instance {name} ended at {when}: {reason}")
    }
}

/// Renews an instance's idle expiry.
pub async fn touch(farm: &Arc<Farm>, name: &str) {
    let timeout = farm.config().farm.gomote_idle_timeout.as_millis() as i64;
    let now = now_ms();
    let write = {
        let mut live = farm.gomote.lock();
        let Some(l) = live.get_mut(name) else { return };
        l.row.expires_at = now + timeout;
        if l.row.expires_at - l.stored_expiry >= STORE_RENEWAL {
            l.stored_expiry = l.row.expires_at;
            Some(l.row.expires_at)
        } else {
            None
        }
    };
    if let Some(at) = write
        && let Err(e) = farm.store.instance_set_expiry(name, at).await
    {
        tracing::warn!(instance = %name, "recording a renewal: {e}");
    }
}

/// Keeps an instance from expiring while a call runs on it; renews it when
/// the call ends.
pub struct Active {
    farm: Arc<Farm>,
    name: String,
}

impl Active {
    fn new(farm: &Arc<Farm>, name: &str) -> Active {
        if let Some(l) = farm.gomote.lock().get_mut(name) {
            l.active += 1;
        }
        farm.gomote.note_call();
        Active {
            farm: farm.clone(),
            name: name.to_string(),
        }
    }

    /// Counts bytes received from the user for this instance.
    pub fn received(&self, n: u64) {
        if let Some(l) = self.farm.gomote.lock().get_mut(&self.name) {
            l.bytes_in += n;
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        if let Some(l) = self.farm.gomote.lock().get_mut(&self.name) {
            l.active = l.active.saturating_sub(1);
        }
        let farm = self.farm.clone();
        let name = std::mem::take(&mut self.name);
        tokio::spawn(async move { touch(&farm, &name).await });
    }
}

/// The machine of the caller's instance, with a guard that keeps the
/// instance alive while the call runs. `409` while it still waits in the
/// queue (with its place), `503` while its machine is away.
pub async fn machine(
    farm: &Arc<Farm>,
    caller: &Caller,
    name: &str,
) -> Result<(Lease, Active), ApiError> {
    let v = owned(farm, caller, name).await?;
    if v.state == Phase::Waiting {
        let place = farm
            .scheduler
            .position(&v.host_type, &holder(name))
            .map(|(p, n)| format!(" (place {p} of {n} in the queue for {})", v.host_type))
            .unwrap_or_default();
        return Err(err(
            StatusCode::CONFLICT,
            format!("instance {name} is still waiting for a machine{place}"),
        ));
    }
    let Some(lease) = farm.pool.leased_to(&holder(name)) else {
        return Err(err(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "instance {name}'s machine {} is not connected right now; it has {} to come back",
                v.hostname.unwrap_or_default(),
                crate::config::human_duration(MACHINE_GRACE.as_secs() as i64)
            ),
        ));
    };
    touch(farm, name).await;
    Ok((lease, Active::new(farm, name)))
}

/// Ends an instance: out of the queue or off its machine (which is cleaned,
/// or destroyed for an ephemeral source, and goes back to the pool), and
/// recorded as ended with `reason`.
pub async fn end(farm: &Arc<Farm>, name: &str, reason: &str) {
    let Some(live) = farm.gomote.lock().remove(name) else {
        return;
    };
    if let Some(w) = live.waiter {
        w.abort();
    }
    let h = holder(name);
    farm.scheduler.withdraw_holder(&h);
    farm.pool.unreserve(&h);
    if let Some(lease) = farm.pool.leased_to(&h) {
        let f = farm.clone();
        tokio::spawn(async move { f.end_lease(lease).await });
    }
    farm.gomote.changed.notify_waiters();
    tracing::info!(instance = %name, "gomote instance ended: {reason}");
    if let Err(e) = farm.store.instance_end(name, reason).await {
        tracing::error!(instance = %name, "recording the end of an instance: {e}");
    }
}

/// Runs forever: ends instances idle past their expiry and those whose
/// machine stayed away longer than [`MACHINE_GRACE`]; reserves a missing
/// machine so it comes back to its instance when it reconnects.
pub async fn expiry_loop(farm: Arc<Farm>) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        sweep(&farm).await;
    }
}

async fn sweep(farm: &Arc<Farm>) {
    let now = now_ms();
    let timeout = farm.config().farm.gomote_idle_timeout;
    let held = farm.pool.interactive_sessions();
    let mut ending = Vec::new();
    // Reservations are made under the registry lock, so `end` (which
    // removes the instance, then its reservation) cannot run in between
    // and leave a reservation for an instance that is gone.
    for (name, l) in farm.gomote.lock().iter_mut() {
        if l.active == 0 && now > l.row.expires_at {
            let idle = crate::config::human_duration(timeout.as_secs() as i64);
            ending.push((name.clone(), format!("expired: unused for {idle}")));
        } else if l.phase != Phase::Ready || held.contains(name) {
            l.missing_since = None;
        } else {
            let since = *l.missing_since.get_or_insert_with(Instant::now);
            let hostname = l.row.hostname.clone().unwrap_or_default();
            if since.elapsed() > MACHINE_GRACE {
                let grace = crate::config::human_duration(MACHINE_GRACE.as_secs() as i64);
                ending.push((
                    name.clone(),
                    format!(
                        "its machine {hostname} disconnected and did not come back within {grace}"
                    ),
                ));
            } else {
                farm.pool.reserve(&l.row.host_type, &hostname, holder(name));
            }
        }
    }
    for (name, reason) in ending {
        end(farm, &name, &reason).await;
    }
}

/// Resumes the instances a previous coordinator left: one with a machine
/// waits for it to reconnect ([`MACHINE_GRACE`]), one without queues again.
pub async fn resume(farm: &Arc<Farm>) -> Result<usize, crate::store::StoreError> {
    farm.gomote.set_keys(farm.store.user_keys().await?);
    let rows = farm.store.instances_active().await?;
    let n = rows.len();
    for row in rows {
        if !farm.config().hosts.contains_key(&row.host_type) {
            farm.store
                .instance_end(&row.name, "its host type is no longer in the config")
                .await?;
            continue;
        }
        let mut row = row;
        // The time the coordinator was away does not count against it.
        row.expires_at = row
            .expires_at
            .max(now_ms() + MACHINE_GRACE.as_millis() as i64);
        match row.hostname.clone() {
            Some(hostname) => {
                farm.pool
                    .reserve(&row.host_type, &hostname, holder(&row.name));
                farm.gomote.lock().insert(
                    row.name.clone(),
                    Live {
                        stored_expiry: row.expires_at,
                        row,
                        phase: Phase::Ready,
                        active: 0,
                        bytes_in: 0,
                        missing_since: Some(Instant::now()),
                        waiter: None,
                    },
                );
            }
            None => {
                insert_waiting(farm, row);
            }
        }
    }
    Ok(n)
}

/// The SSH server's view of the farm: the instance's owner's keys decide,
/// and a session runs on the instance's machine, holding the instance
/// alive while it lasts.
pub struct SshGate(pub Arc<Farm>);

impl ssh::SshBackend for SshGate {
    fn authorize(&self, instance: &str, fingerprint: &str) -> Result<(), String> {
        let Some((owner, _)) = self.0.gomote.lease_of(instance) else {
            return Err(format!("no live instance named {instance}"));
        };
        if self.0.gomote.has_key(&owner, fingerprint) {
            Ok(())
        } else {
            Err(format!(
                "key {fingerprint} is not registered for {owner}, the owner of instance {instance}"
            ))
        }
    }

    fn open(
        &self,
        instance: &str,
    ) -> Result<(buildlet::client::Client, Box<dyn Send + Sync>), String> {
        let farm = &self.0;
        let Some(v) = farm.gomote.view(instance) else {
            return Err(format!("instance {instance} has ended"));
        };
        if v.state == Phase::Waiting {
            return Err(format!(
                "instance {instance} is still waiting for a machine"
            ));
        }
        let Some(lease) = farm.pool.leased_to(&holder(instance)) else {
            return Err(format!(
                "instance {instance}'s machine {} is not connected right now",
                v.hostname.unwrap_or_default()
            ));
        };
        Ok((lease.client, Box::new(Active::new(farm, instance))))
    }
}
