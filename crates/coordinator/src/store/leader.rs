//! Which coordinator schedules, when several share one PostgreSQL store:
//! the one holding a session-level advisory lock on a connection of its
//! own. The lock goes with that connection, so a leader that dies (or whose
//! link to the database breaks) releases it, and a standby polling for it
//! takes over. A SQLite store is one process's: its coordinator always leads.
//!
//! The lock alone does not stop an old leader that has not yet noticed it
//! lost it (its watchdog checks every 2 s; a paused VM notices later) from
//! writing through its pool. So leadership is fenced on the database: every
//! connection of a coordinator is named `farmer ID` after its process; a new
//! leader ends every other coordinator's connections before it recovers
//! anything, and a leader's *new* connection first checks that the lock is
//! still held by this process's lock connection and fails otherwise. An old
//! leader can then no longer write at all: its connections are gone and it
//! cannot open one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::{AnyConnection, Connection, Executor};

use super::{Engine, Location, Result, Store, StoreError, now_ms};

/// The advisory lock's key (per database, so farms sharing a server do not
/// contend). Below 2^32: `pg_locks` then shows it as `objid`, `classid` 0.
const LOCK_KEY: i64 = 0x6661_726d; // "farm"

/// What a leader writes into its lock connection's `application_name`, for
/// the others' `/status` (read back from `pg_stat_activity`).
const NAME_PREFIX: &str = "farmer-leader";

/// A [`Store::leader`] answer and when it was read.
type LeaderSeen = (std::time::Instant, Option<LeaderInfo>);

/// This process on the database: the name of its connections and whether
/// it leads (its new connections are then checked).
#[derive(Clone)]
pub(super) struct Fence {
    id: String,
    leading: Arc<AtomicBool>,
    /// The last [`Store::leader`] answer and when it was read.
    leader_seen: Arc<std::sync::Mutex<Option<LeaderSeen>>>,
}

impl Fence {
    pub(super) fn new() -> Fence {
        let mut b = [0u8; 6];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
        Fence {
            id: hex::encode(b),
            leading: Arc::new(AtomicBool::new(false)),
            leader_seen: Arc::default(),
        }
    }

    fn connection_name(&self) -> String {
        format!("farmer {}", self.id)
    }

    /// Run on every new pool connection (PostgreSQL).
    pub(super) async fn on_connect(&self, conn: &mut AnyConnection) -> sqlx::Result<()> {
        sqlx::query("SELECT set_config('application_name', $1, false)")
            .bind(self.connection_name())
            .execute(&mut *conn)
            .await?;
        if !self.leading.load(Ordering::Acquire) {
            return Ok(());
        }
        let held: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND CAST(l.objid AS BIGINT) = $1 AND l.objsubid = 1 \
             AND a.application_name LIKE $2",
        )
        .bind(LOCK_KEY)
        .bind(format!("{NAME_PREFIX} % {} %", self.id))
        .fetch_one(&mut *conn)
        .await?;
        if held == 0 {
            tracing::error!(
                "this coordinator no longer holds the leader lock; refusing to use the store"
            );
            return Err(sqlx::Error::Protocol(
                "this coordinator no longer holds the leader lock".into(),
            ));
        }
        Ok(())
    }
}

/// The leader as the others see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LeaderInfo {
    /// Where it serves (its `--listen` address as it reported it).
    pub addr: String,
    /// When it took the lead (ms since the epoch).
    pub since: i64,
}

/// A connection that holds, or tries for, the leader lock.
pub struct LeaderLock {
    /// `None` on SQLite (always the leader).
    conn: Option<AnyConnection>,
    held: bool,
}

impl Store {
    /// A connection of its own for the leader lock (not from the pool: the
    /// pool recycles connections, and the lock lives as long as this one).
    /// The server probes it often, so a leader whose machine vanished is
    /// noticed in about ten seconds rather than after TCP's two hours.
    pub async fn leader_lock(&self) -> Result<LeaderLock> {
        let Location::Postgres(url) = &self.location else {
            return Ok(LeaderLock {
                conn: None,
                held: false,
            });
        };
        let opts: sqlx::any::AnyConnectOptions = url
            .parse()
            .map_err(|e| StoreError::Open(format!("{}: {e}", self.location)))?;
        let mut conn =
            tokio::time::timeout(Duration::from_secs(10), AnyConnection::connect_with(&opts))
                .await
                .map_err(|_| {
                    StoreError::Open(format!("{}: no connection within 10 s", self.location))
                })?
                .map_err(|e| StoreError::Open(format!("{}: {e}", self.location)))?;
        // tcp_user_timeout also covers a leader that vanished while the
        // server still had unacknowledged data for it.
        conn.execute(
            "SET tcp_keepalives_idle = 4; SET tcp_keepalives_interval = 2; SET tcp_keepalives_count = 3",
        )
        .await?;
        // PostgreSQL 12 and later; older servers go on without it.
        if let Err(e) = conn.execute("SET tcp_user_timeout = 10000").await {
            tracing::debug!("tcp_user_timeout not set: {e}");
        }
        Ok(LeaderLock {
            conn: Some(conn),
            held: false,
        })
    }

    /// The coordinator holding the leader lock now, if one does (always
    /// `None` on SQLite, where there are no others).
    /// Read at most once a second: pages, `/api/status` and a standby's
    /// refusals (machines retry a standby every second or so) all ask.
    pub async fn leader(&self) -> Result<Option<LeaderInfo>> {
        if self.engine() != Engine::Postgres {
            return Ok(None);
        }
        let seen = &self.fence.leader_seen;
        if let Some((at, l)) = &*seen.lock().unwrap_or_else(|e| e.into_inner())
            && at.elapsed() < Duration::from_secs(1)
        {
            return Ok(l.clone());
        }
        let name: Option<String> = sqlx::query_scalar(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND CAST(l.classid AS BIGINT) = 0 \
             AND CAST(l.objid AS BIGINT) = $1 AND l.objsubid = 1 \
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) LIMIT 1",
        )
        .bind(LOCK_KEY)
        .fetch_optional(self.pool())
        .await?;
        let l = name.and_then(|n| parse_name(&n));
        *seen.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((std::time::Instant::now(), l.clone()));
        Ok(l)
    }

    /// Called once this coordinator holds the lock, before it recovers
    /// anything: from now on its new connections check the lock, and every
    /// other coordinator's connections are ended (a standby's reads just
    /// reconnect; an old leader's writes fail). Returns how many were ended.
    pub async fn fence_others(&self) -> Result<u64> {
        self.fence.leading.store(true, Ordering::Release);
        if self.engine() != Engine::Postgres {
            return Ok(0);
        }
        // A role may always end its own sessions; ending another role's
        // needs privileges a farm's role should not have. Coordinators of
        // one farm use one role; another role's sessions are named, not
        // ended (an error here would hand the lead back and forth).
        let others: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name LIKE 'farmer %' AND application_name <> $1 AND usename <> current_user",
        )
        .bind(self.fence.connection_name())
        .fetch_one(self.pool())
        .await?;
        if others > 0 {
            tracing::error!(
                others,
                "coordinators of this store connect as another database role; their connections cannot be ended, so an old leader is not fenced: give every coordinator of a farm the same role"
            );
        }
        let ended: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() AND usename = current_user \
             AND application_name LIKE 'farmer %' AND application_name <> $1",
        )
        .bind(self.fence.connection_name())
        .fetch_all(self.pool())
        .await?;
        Ok(ended.into_iter().filter(|e| *e).count() as u64)
    }
}

impl LeaderLock {
    /// Tries once to take the lead, announcing `addr` as the leader's
    /// address. True once held (and from then on).
    pub async fn try_acquire(&mut self, store: &Store, addr: &str) -> Result<bool> {
        let Some(conn) = self.conn.as_mut() else {
            self.held = true;
            return Ok(true);
        };
        if self.held {
            return Ok(true);
        }
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LOCK_KEY)
            .fetch_one(&mut *conn)
            .await?;
        if got {
            // application_name holds at most 63 bytes; the address is cut
            // rather than the time.
            let mut name = format!("{NAME_PREFIX} {} {} {addr}", now_ms(), store.fence.id);
            while name.len() > 63 {
                name.pop();
            }
            sqlx::query("SELECT set_config('application_name', $1, false)")
                .bind(name)
                .execute(&mut *conn)
                .await?;
            self.held = true;
        }
        Ok(got)
    }

    /// Checks, within 5 s, that the lock is still held on a live connection.
    /// An error means another coordinator may lead now: the caller must
    /// stop scheduling at once.
    pub async fn check(&mut self) -> Result<()> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        let held = tokio::time::timeout(
            Duration::from_secs(5),
            sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
                 AND pid = pg_backend_pid() AND CAST(objid AS BIGINT) = $1 AND objsubid = 1",
            )
            .bind(LOCK_KEY)
            .fetch_one(&mut *conn),
        )
        .await
        .map_err(|_| {
            StoreError::Invalid("the leader lock's connection did not answer within 5 s".into())
        })??;
        if held != 1 {
            return Err(StoreError::Invalid(
                "the leader lock is no longer held".into(),
            ));
        }
        Ok(())
    }
}

/// `farmer-leader SINCE ID ADDR` as written by [`LeaderLock::try_acquire`].
fn parse_name(n: &str) -> Option<LeaderInfo> {
    let rest = n.strip_prefix(NAME_PREFIX)?.trim_start();
    let mut f = rest.splitn(3, ' ');
    let since = f.next()?.parse().ok()?;
    let _id = f.next()?;
    Some(LeaderInfo {
        addr: f.next().unwrap_or("").to_string(),
        since,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leader_is_read_back_from_its_connection_name() {
        assert_eq!(
            parse_name("farmer-leader 1765000000000 0a1b2c3d4e5f 10.0.0.5:8443"),
            Some(LeaderInfo {
                addr: "10.0.0.5:8443".into(),
                since: 1_765_000_000_000
            })
        );
        assert_eq!(parse_name("psql"), None);
    }
}
