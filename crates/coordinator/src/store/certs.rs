//! The certificate onboarding tables: builder requests, bots bound to host
//! types, revoked serials. Only this file speaks SQL about them; the checks
//! and handlers live in `machine_auth`.

use serde::Serialize;
use sqlx::Row;

use super::{Result, Store, StoreError, now_ms, text};

/// Where a builder request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestStatus {
    Pending,
    Approved,
    Rejected,
}

impl RequestStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Pending => "pending",
            RequestStatus::Approved => "approved",
            RequestStatus::Rejected => "rejected",
        }
    }

    fn parse(s: &str) -> Result<RequestStatus> {
        match s {
            "pending" => Ok(RequestStatus::Pending),
            "approved" => Ok(RequestStatus::Approved),
            "rejected" => Ok(RequestStatus::Rejected),
            _ => Err(StoreError::Invalid(format!(
                "unknown builder request status {s:?}"
            ))),
        }
    }
}

impl std::fmt::Display for RequestStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A builder request as stored.
#[derive(Debug, Clone)]
pub struct BotRequestRow {
    pub id: i64,
    pub hostname: String,
    pub csr_pem: String,
    pub contact: String,
    pub notes: String,
    /// Hex SHA-256 of the owner's secret (the secret itself is shown once).
    pub secret_sha256: String,
    pub status: RequestStatus,
    pub reason: String,
    pub host_type: String,
    pub cert_pem: String,
    pub serial: String,
    pub created_at: i64,
}

/// A request just approved: what the bot's binding and the request record.
pub struct Approval<'a> {
    pub id: i64,
    pub hostname: &'a str,
    pub host_type: &'a str,
    pub cert_pem: &'a str,
    pub serial: &'a str,
    pub not_after: i64,
}

const REQUEST_COLS: &str = "id, hostname, csr_pem, contact, notes, secret_sha256, status, reason, host_type, cert_pem, serial, created_at";

fn request_row(r: &sqlx::any::AnyRow) -> Result<BotRequestRow> {
    Ok(BotRequestRow {
        id: r.try_get("id")?,
        hostname: r.try_get("hostname")?,
        csr_pem: r.try_get("csr_pem")?,
        contact: r.try_get("contact")?,
        notes: r.try_get("notes")?,
        secret_sha256: r.try_get("secret_sha256")?,
        status: RequestStatus::parse(&r.try_get::<String, _>("status")?)?,
        reason: r.try_get("reason")?,
        host_type: r.try_get("host_type")?,
        cert_pem: r.try_get("cert_pem")?,
        serial: r.try_get("serial")?,
        created_at: r.try_get("created_at")?,
    })
}

impl Store {
    /// Why `serial` was revoked, if it was.
    pub async fn revocation_reason(&self, serial: &str) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT reason FROM revoked WHERE serial = $1")
                .bind(text(serial))
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// The host type and certificate serial an approved bot is bound to.
    pub async fn bot_binding(&self, hostname: &str) -> Result<Option<(String, String)>> {
        let r = sqlx::query("SELECT host_type, serial FROM bots WHERE hostname = $1")
            .bind(text(hostname))
            .fetch_optional(self.pool())
            .await?;
        r.map(|r| Ok((r.try_get("host_type")?, r.try_get("serial")?)))
            .transpose()
    }

    /// Builder requests waiting for the admin.
    pub async fn pending_requests(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM bot_requests WHERE status = 'pending'")
                .fetch_one(self.pool())
                .await?,
        )
    }

    /// Records a pending builder request; returns its id.
    pub async fn add_request(
        &self,
        hostname: &str,
        csr_pem: &str,
        contact: &str,
        notes: &str,
        secret_sha256: &str,
    ) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "INSERT INTO bot_requests (hostname, csr_pem, contact, notes, secret_sha256, status, created_at) VALUES ($1, $2, $3, $4, $5, 'pending', $6) RETURNING id",
        )
        .bind(text(hostname))
        .bind(text(csr_pem))
        .bind(text(contact))
        .bind(text(notes))
        .bind(text(secret_sha256))
        .bind(now_ms())
        .fetch_one(self.writer())
        .await?)
    }

    pub async fn request(&self, id: i64) -> Result<Option<BotRequestRow>> {
        let r = sqlx::query(&format!(
            "SELECT {REQUEST_COLS} FROM bot_requests WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        r.as_ref().map(request_row).transpose()
    }

    /// The newest `limit` requests, newest first.
    pub async fn requests(&self, limit: i64) -> Result<Vec<BotRequestRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {REQUEST_COLS} FROM bot_requests ORDER BY id DESC LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(request_row).collect()
    }

    /// Marks a pending request approved and binds its bot to the host type,
    /// in one transaction; false (nothing changed) if it was no longer pending.
    pub async fn approve_request(&self, a: &Approval<'_>) -> Result<bool> {
        let now = now_ms();
        let mut w = self.writer().acquire().await?;
        let mut tx = w.begin().await?;
        let n = sqlx::query("UPDATE bot_requests SET status = 'approved', host_type = $1, cert_pem = $2, serial = $3, decided_at = $4 WHERE id = $5 AND status = 'pending'")
            .bind(text(a.host_type))
            .bind(text(a.cert_pem))
            .bind(text(a.serial))
            .bind(now)
            .bind(a.id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO bots (hostname, host_type, serial, not_after, approved_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (hostname) DO UPDATE SET host_type = excluded.host_type, serial = excluded.serial, not_after = excluded.not_after, approved_at = excluded.approved_at",
        )
        .bind(text(a.hostname))
        .bind(text(a.host_type))
        .bind(text(a.serial))
        .bind(a.not_after)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Rejects a pending request; false if it does not exist or is decided.
    pub async fn reject_request(&self, id: i64, reason: &str) -> Result<bool> {
        let n = sqlx::query("UPDATE bot_requests SET status = 'rejected', reason = $1, decided_at = $2 WHERE id = $3 AND status = 'pending'")
            .bind(text(reason))
            .bind(now_ms())
            .bind(id)
            .execute(self.writer())
            .await?
            .rows_affected();
        Ok(n > 0)
    }

    /// The bot a certificate serial was issued to.
    pub async fn hostname_of_serial(&self, serial: &str) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT hostname FROM bot_requests WHERE serial = $1")
                .bind(text(serial))
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// Revokes a serial (again is a no-op that keeps the first reason).
    pub async fn revoke(&self, serial: &str, hostname: &str, reason: &str) -> Result<()> {
        sqlx::query("INSERT INTO revoked (serial, hostname, at, reason) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
            .bind(text(serial))
            .bind(text(hostname))
            .bind(now_ms())
            .bind(text(reason))
            .execute(self.writer())
            .await?;
        Ok(())
    }
}
