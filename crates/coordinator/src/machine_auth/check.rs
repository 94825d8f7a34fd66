//! The loop that re-checks the machine token of every connected bot, so a
//! revocation or an expired token takes effect within a heartbeat (for a
//! bot whose link is parked, the binding and revocation only: see
//! [`super::binding_holds`]). Apart
//! from the checks ([`super`]) because it follows the farm's config and
//! pool, while the farm holds the bot registry: it sits above the farm.

use std::sync::Arc;
use std::time::Duration;

use super::{BotRegistry, verify_token};
use crate::farm::Farm;
use crate::pool::Refusal;
use crate::store::now_ms;

/// Runs forever: re-checks the token of every connected bot; a bot whose
/// token expired, was revoked, or names another host is dropped.
pub async fn check_loop(farm: Arc<Farm>) {
    loop {
        let registry = &farm.bots;
        let every = farm.config().farm.heartbeat;
        tokio::time::sleep(every).await;
        for (id, hostname) in registry.all() {
            if !farm.pool.contains(id) {
                registry.remove(id);
                continue;
            }
            let Some(client) = farm.pool.client(id) else {
                continue;
            };
            let f = farm.clone();
            tokio::spawn(async move {
                let reg = &f.bots;
                if client.parked() {
                    // Asking a parked machine for its token would wake its
                    // link every heartbeat: check what the store says.
                    match super::binding_holds(&f.store, &hostname).await {
                        Ok(()) => reg.check_passed(),
                        Err((msg, kind)) => drop_bot(&f, reg, id, &hostname, msg, kind),
                    }
                    return;
                }
                let token =
                    match tokio::time::timeout(Duration::from_secs(10), client.machine_token())
                        .await
                    {
                        Ok(Ok(t)) => t,
                        Ok(Err(e)) if e.is_communication() => return,
                        Ok(Err(e)) => {
                            drop_bot(
                                &f,
                                reg,
                                id,
                                &hostname,
                                format!("cannot read its machine token: {e}"),
                                "bad-token",
                            );
                            return;
                        }
                        Err(_) => return,
                    };
                match verify_token(&f.master, &f.store, &token).await {
                    Ok(c) if c.hostname == hostname => reg.check_passed(),
                    Ok(c) => drop_bot(
                        &f,
                        reg,
                        id,
                        &hostname,
                        format!(
                            "its machine token names {} but it registered as {hostname}",
                            c.hostname
                        ),
                        "wrong-hostname",
                    ),
                    Err((msg, kind)) => drop_bot(&f, reg, id, &hostname, msg, kind),
                }
            });
        }
    }
}

fn drop_bot(farm: &Farm, reg: &BotRegistry, id: u64, hostname: &str, reason: String, kind: &str) {
    reg.remove(id);
    farm.pool.refuse(
        Refusal {
            at: now_ms(),
            host_type: String::new(),
            hostname: hostname.to_string(),
            addr: "token check".into(),
            reason: reason.clone(),
            kind: kind.to_string(),
        },
        false,
    );
    farm.pool.remove(id, &format!("dropped: {reason}"));
}
