//! The gomote tables: users (hashed tokens), their SSH keys, instances and
//! groups. Only this file speaks SQL about them.

use serde::Serialize;
use sqlx::Row;

use super::{Result, Store, now_ms, text};

/// Most rows any listing here returns: pages and the CLI show them whole.
pub const MAX_ROWS: i64 = 1000;

/// A person who may lease machines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserRow {
    pub name: String,
    pub admin: bool,
    pub created_at: i64,
    /// Fingerprints of the registered SSH keys.
    pub keys: Vec<String>,
}

/// An instance as stored: a lease request and, once granted, its machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct InstanceRow {
    pub name: String,
    pub owner: String,
    pub builder: String,
    pub host_type: String,
    pub hostname: Option<String>,
    pub created_at: i64,
    pub expires_at: i64,
    pub ended_at: Option<i64>,
    pub end_reason: Option<String>,
}

/// A named set of instances a command can be broadcast to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupRow {
    pub name: String,
    pub owner: String,
    pub created_at: i64,
    pub instances: Vec<String>,
}

const INSTANCE_COLS: &str =
    "name, owner, builder, host_type, hostname, created_at, expires_at, ended_at, end_reason";

impl Store {
    /// Adds a user; false when the name is taken.
    pub async fn user_add(&self, name: &str, token_sha256: &str, admin: bool) -> Result<bool> {
        let r = sqlx::query(
            "INSERT INTO users (name, token_sha256, admin, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(text(name))
        .bind(text(token_sha256))
        .bind(admin as i64)
        .bind(now_ms())
        .execute(self.writer())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Removes a user and their keys; false when there was none.
    pub async fn user_remove(&self, name: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM users WHERE name = $1")
            .bind(text(name))
            .execute(self.writer())
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// The user a token (by its hash) belongs to: `(name, admin)`.
    pub async fn user_by_token(&self, token_sha256: &str) -> Result<Option<(String, bool)>> {
        let r = sqlx::query("SELECT name, admin FROM users WHERE token_sha256 = $1")
            .bind(text(token_sha256))
            .fetch_optional(self.pool())
            .await?;
        Ok(match r {
            Some(r) => Some((r.try_get("name")?, r.try_get::<i64, _>("admin")? != 0)),
            None => None,
        })
    }

    /// Every user with their key fingerprints, by name.
    pub async fn users(&self) -> Result<Vec<UserRow>> {
        let rows = sqlx::query(
            "SELECT u.name, u.admin, u.created_at, string_agg(k.fingerprint, ' ' ORDER BY k.fingerprint) AS keys FROM users u LEFT JOIN user_keys k ON k.\"user\" = u.name GROUP BY u.name ORDER BY u.name LIMIT $1",
        )
        .bind(MAX_ROWS)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                let keys: Option<String> = r.try_get("keys")?;
                Ok(UserRow {
                    name: r.try_get("name")?,
                    admin: r.try_get::<i64, _>("admin")? != 0,
                    created_at: r.try_get("created_at")?,
                    keys: keys
                        .unwrap_or_default()
                        .split_whitespace()
                        .map(str::to_string)
                        .collect(),
                })
            })
            .collect()
    }

    /// Registers an SSH key of a user; false when the user does not exist.
    pub async fn user_key_add(&self, user: &str, fingerprint: &str, line: &str) -> Result<bool> {
        let r = sqlx::query(
            "INSERT INTO user_keys (\"user\", fingerprint, key_line, added_at) SELECT name, $1, $2, $3 FROM users WHERE name = $4 ON CONFLICT (\"user\", fingerprint) DO UPDATE SET key_line = excluded.key_line",
        )
        .bind(text(fingerprint))
        .bind(text(line))
        .bind(now_ms())
        .bind(text(user))
        .execute(self.writer())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Every `(user, fingerprint)` pair, for the SSH server's cache.
    pub async fn user_keys(&self) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query("SELECT \"user\", fingerprint FROM user_keys LIMIT 100000")
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("user")?, r.try_get("fingerprint")?)))
            .collect()
    }

    /// Records a new instance.
    pub async fn instance_add(&self, i: &InstanceRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO gomote_instances (name, owner, builder, host_type, hostname, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(text(&i.name))
        .bind(text(&i.owner))
        .bind(text(&i.builder))
        .bind(text(&i.host_type))
        .bind(&i.hostname)
        .bind(i.created_at)
        .bind(i.expires_at)
        .execute(self.writer())
        .await?;
        Ok(())
    }

    /// The highest instance number used so far for names `PREFIX-N`, so a
    /// restarted coordinator never reuses the name of an ended instance.
    /// One row comes back, however long the history.
    pub async fn instance_last_number(&self, prefix: &str) -> Result<u64> {
        let dashed = format!("{prefix}-");
        let n: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(CAST(substr(name, CAST($1 AS INTEGER) + 1) AS BIGINT)) FROM gomote_instances \
             WHERE substr(name, 1, CAST($1 AS INTEGER)) = $2 AND length(name) BETWEEN $1 + 1 AND $1 + 18 \
             AND ltrim(substr(name, CAST($1 AS INTEGER) + 1), '0123456789') = ''",
        )
        .bind(dashed.chars().count() as i64)
        .bind(text(&dashed))
        .fetch_one(self.pool())
        .await?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    /// Notes the machine an instance got.
    pub async fn instance_set_machine(&self, name: &str, hostname: &str) -> Result<()> {
        sqlx::query("UPDATE gomote_instances SET hostname = $1 WHERE name = $2")
            .bind(text(hostname))
            .bind(text(name))
            .execute(self.writer())
            .await?;
        Ok(())
    }

    /// Notes a renewal.
    pub async fn instance_set_expiry(&self, name: &str, expires_at: i64) -> Result<()> {
        sqlx::query(
            "UPDATE gomote_instances SET expires_at = $1 WHERE name = $2 AND ended_at IS NULL",
        )
        .bind(expires_at)
        .bind(text(name))
        .execute(self.writer())
        .await?;
        Ok(())
    }

    /// Ends an instance with the reason; its group memberships go too.
    pub async fn instance_end(&self, name: &str, reason: &str) -> Result<()> {
        let mut w = self.writer().acquire().await?;
        let mut tx = w.begin().await?;
        sqlx::query(
            "UPDATE gomote_instances SET ended_at = $1, end_reason = $2 WHERE name = $3 AND ended_at IS NULL",
        )
        .bind(now_ms())
        .bind(text(reason))
        .bind(text(name))
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM gomote_group_members WHERE instance = $1")
            .bind(text(name))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// One instance, live or ended.
    pub async fn instance(&self, name: &str) -> Result<Option<InstanceRow>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {INSTANCE_COLS} FROM gomote_instances WHERE name = $1"
        ))
        .bind(text(name))
        .fetch_optional(self.pool())
        .await?)
    }

    /// The instances that have not ended (a restarted coordinator resumes them).
    pub async fn instances_active(&self) -> Result<Vec<InstanceRow>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {INSTANCE_COLS} FROM gomote_instances WHERE ended_at IS NULL ORDER BY created_at LIMIT $1"
        ))
        .bind(MAX_ROWS * 10)
        .fetch_all(self.pool())
        .await?)
    }

    /// Creates a group; false when the name is taken.
    pub async fn group_add(&self, name: &str, owner: &str) -> Result<bool> {
        let r = sqlx::query(
            "INSERT INTO gomote_groups (name, owner, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(text(name))
        .bind(text(owner))
        .bind(now_ms())
        .execute(self.writer())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Deletes a group (not its instances).
    pub async fn group_remove(&self, name: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM gomote_groups WHERE name = $1")
            .bind(text(name))
            .execute(self.writer())
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Adds (`true`) or removes an instance from a group.
    pub async fn group_member(&self, group: &str, instance: &str, add: bool) -> Result<()> {
        let sql = if add {
            "INSERT INTO gomote_group_members (grp, instance) VALUES ($1, $2) ON CONFLICT DO NOTHING"
        } else {
            "DELETE FROM gomote_group_members WHERE grp = $1 AND instance = $2"
        };
        sqlx::query(sql)
            .bind(text(group))
            .bind(text(instance))
            .execute(self.writer())
            .await?;
        Ok(())
    }

    /// One group with its members.
    pub async fn group(&self, name: &str) -> Result<Option<GroupRow>> {
        Ok(self.groups_where(Some(name)).await?.pop())
    }

    /// Every group with its members, by name.
    pub async fn groups(&self) -> Result<Vec<GroupRow>> {
        self.groups_where(None).await
    }

    async fn groups_where(&self, name: Option<&str>) -> Result<Vec<GroupRow>> {
        let rows = sqlx::query(
            "SELECT g.name, g.owner, g.created_at, string_agg(m.instance, ' ' ORDER BY m.instance) AS members FROM gomote_groups g LEFT JOIN gomote_group_members m ON m.grp = g.name WHERE CAST($1 AS TEXT) IS NULL OR g.name = $1 GROUP BY g.name ORDER BY g.name LIMIT $2",
        )
        .bind(name)
        .bind(MAX_ROWS)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                let members: Option<String> = r.try_get("members")?;
                let mut instances: Vec<String> = members
                    .unwrap_or_default()
                    .split_whitespace()
                    .map(str::to_string)
                    .collect();
                instances.sort();
                Ok(GroupRow {
                    name: r.try_get("name")?,
                    owner: r.try_get("owner")?,
                    created_at: r.try_get("created_at")?,
                    instances,
                })
            })
            .collect()
    }
}
