//! Webhook deliveries, the outbox and branch states (see migration
//! 0007_forge.sql). Only this file speaks SQL about them.

use serde::Serialize;
use sqlx::Row;

use super::{Result, Store, now_ms, text};

/// Accepted deliveries kept per repo (older ones are deleted as new ones come).
pub const MAX_DELIVERIES: i64 = 150;
/// Refused deliveries kept per repo, apart: a flood of forged requests
/// cannot push the real ones out.
pub const MAX_REFUSED: i64 = 50;
/// Finished outbox messages kept (sent, failed, superseded), farm-wide.
const MAX_DONE_MESSAGES: i64 = 5000;

/// One webhook request as received, accepted or refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Delivery {
    pub id: i64,
    pub repo: String,
    pub forge: String,
    pub event: String,
    /// The forge's delivery id, if it sent one.
    pub delivery: String,
    pub received_at: i64,
    pub accepted: bool,
    /// What was done, or why it was refused.
    pub detail: String,
}

/// A message waiting to go out, or gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub kind: String,
    pub repo: String,
    pub dedupe: String,
    pub payload: String,
    pub created_at: i64,
    pub attempts: i64,
    pub next_at: i64,
    pub state: String,
    pub last_error: String,
    pub done_at: Option<i64>,
}

/// A builder's last known result on a branch.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct BranchState {
    pub state: String,
    pub commit_hash: String,
    pub commit_time: i64,
    pub build_id: i64,
}

const OUTBOX_COLS: &str =
    "id, kind, repo, dedupe, payload, created_at, attempts, next_at, state, last_error, done_at";

impl Store {
    /// Records a webhook delivery; keeps the newest [`MAX_DELIVERIES`] of the repo.
    pub async fn record_delivery(
        &self,
        repo: &str,
        forge: &str,
        event: &str,
        delivery: &str,
        accepted: bool,
        detail: &str,
    ) -> Result<()> {
        let mut w = self.writer().acquire().await?;
        let mut tx = w.begin().await?;
        sqlx::query(
            "INSERT INTO hook_deliveries (repo, forge, event, delivery, received_at, accepted, detail) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(text(repo))
        .bind(text(forge))
        .bind(text(event))
        .bind(text(delivery))
        .bind(now_ms())
        .bind(accepted as i64)
        .bind(text(detail))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM hook_deliveries WHERE repo = $1 AND accepted = $2 AND id <= \
             (SELECT id FROM hook_deliveries WHERE repo = $1 AND accepted = $2 ORDER BY id DESC LIMIT 1 OFFSET $3)",
        )
        .bind(text(repo))
        .bind(accepted as i64)
        .bind(if accepted { MAX_DELIVERIES } else { MAX_REFUSED })
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A repo's deliveries, newest first.
    pub async fn deliveries(&self, repo: &str, limit: i64) -> Result<Vec<Delivery>> {
        let rows = sqlx::query(
            "SELECT id, repo, forge, event, delivery, received_at, accepted, detail FROM hook_deliveries WHERE repo = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(text(repo))
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Delivery {
                    id: r.try_get("id")?,
                    repo: r.try_get("repo")?,
                    forge: r.try_get("forge")?,
                    event: r.try_get("event")?,
                    delivery: r.try_get("delivery")?,
                    received_at: r.try_get("received_at")?,
                    accepted: r.try_get::<i64, _>("accepted")? != 0,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }

    /// Queues a message. An unsent message with the same `dedupe` key is
    /// superseded: only the newest state of a thing is worth sending.
    pub async fn outbox_push(
        &self,
        kind: &str,
        repo: &str,
        dedupe: &str,
        payload: &str,
    ) -> Result<i64> {
        let now = now_ms();
        let mut w = self.writer().acquire().await?;
        let mut tx = w.begin().await?;
        sqlx::query(
            "UPDATE outbox SET state = 'superseded', done_at = $1 WHERE dedupe = $2 AND state = 'pending'",
        )
        .bind(now)
        .bind(text(dedupe))
        .execute(&mut *tx)
        .await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO outbox (kind, repo, dedupe, payload, created_at, next_at) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (dedupe) WHERE state = 'pending' DO UPDATE SET kind = excluded.kind, repo = excluded.repo, \
             payload = excluded.payload, next_at = excluded.next_at, attempts = 0, last_error = '', \
             created_at = CASE WHEN excluded.created_at > outbox.created_at THEN excluded.created_at ELSE outbox.created_at + 1 END \
             RETURNING id",
        )
        .bind(text(kind))
        .bind(text(repo))
        .bind(text(dedupe))
        .bind(text(payload))
        .bind(now)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM outbox WHERE state != 'pending' AND id <= (SELECT id FROM outbox WHERE state != 'pending' ORDER BY id DESC LIMIT 1 OFFSET $1)",
        )
        .bind(MAX_DONE_MESSAGES)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Pending messages due now, oldest first.
    pub async fn outbox_due(&self, limit: i64) -> Result<Vec<OutboxRow>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {OUTBOX_COLS} FROM outbox WHERE state = 'pending' AND next_at <= $1 ORDER BY id LIMIT $2"
        ))
        .bind(now_ms())
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }

    /// When the next pending message is due, if any.
    pub async fn outbox_next_due(&self) -> Result<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT MIN(next_at) FROM outbox WHERE state = 'pending'")
                .fetch_one(self.pool())
                .await?,
        )
    }

    /// Marks the message `row` was sent, unless it was superseded or
    /// rewritten meanwhile (a newer payload of the same key replaces a
    /// pending one in place, with a new `created_at`: it is sent next).
    pub async fn outbox_sent(&self, row: &OutboxRow) -> Result<()> {
        sqlx::query(
            "UPDATE outbox SET state = 'sent', attempts = attempts + 1, done_at = $1, last_error = '' WHERE id = $2 AND state = 'pending' AND created_at = $3",
        )
        .bind(now_ms())
        .bind(row.id)
        .bind(row.created_at)
        .execute(self.writer())
        .await?;
        Ok(())
    }

    /// Records a failed attempt at `row`: tried again at `next_at`, or given
    /// up (unless it was rewritten meanwhile, as for [`Store::outbox_sent`]).
    pub async fn outbox_failed(
        &self,
        row: &OutboxRow,
        error: &str,
        next_at: Option<i64>,
    ) -> Result<()> {
        match next_at {
            Some(at) => sqlx::query(
                "UPDATE outbox SET attempts = attempts + 1, last_error = $1, next_at = $2 WHERE id = $3 AND state = 'pending' AND created_at = $4",
            )
            .bind(text(error))
            .bind(at)
            .bind(row.id)
            .bind(row.created_at),
            None => sqlx::query(
                "UPDATE outbox SET attempts = attempts + 1, last_error = $1, state = 'failed', done_at = $2 WHERE id = $3 AND state = 'pending' AND created_at = $4",
            )
            .bind(text(error))
            .bind(now_ms())
            .bind(row.id)
            .bind(row.created_at),
        }
        .execute(self.writer())
        .await?;
        Ok(())
    }

    /// A repo's messages, newest first.
    pub async fn outbox_for_repo(&self, repo: &str, limit: i64) -> Result<Vec<OutboxRow>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {OUTBOX_COLS} FROM outbox WHERE repo = $1 ORDER BY id DESC LIMIT $2"
        ))
        .bind(text(repo))
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }

    /// A builder's last known state on a branch.
    pub async fn branch_state(
        &self,
        repo: &str,
        branch: &str,
        builder: &str,
    ) -> Result<Option<BranchState>> {
        Ok(sqlx::query_as(
            "SELECT state, commit_hash, commit_time, build_id FROM branch_states WHERE repo = $1 AND branch = $2 AND builder = $3",
        )
        .bind(text(repo))
        .bind(text(branch))
        .bind(text(builder))
        .fetch_optional(self.pool())
        .await?)
    }

    pub async fn set_branch_state(
        &self,
        repo: &str,
        branch: &str,
        builder: &str,
        s: &BranchState,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO branch_states (repo, branch, builder, state, commit_hash, commit_time, build_id) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (repo, branch, builder) DO UPDATE SET state = excluded.state, commit_hash = excluded.commit_hash, \
             commit_time = excluded.commit_time, build_id = excluded.build_id",
        )
        .bind(text(repo))
        .bind(text(branch))
        .bind(text(builder))
        .bind(text(&s.state))
        .bind(text(&s.commit_hash))
        .bind(s.commit_time)
        .bind(s.build_id)
        .execute(self.writer())
        .await?;
        Ok(())
    }
}
