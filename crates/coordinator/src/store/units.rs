//! Runs of the units of sharded steps. Only this file speaks SQL about
//! them.

use std::collections::HashMap;

use serde::Serialize;
use sqlx::Row;

use super::{Result, Store, text};

/// Most unit runs one build lists (its page and `/api/builds/{id}`).
pub const MAX_UNIT_ROWS: i64 = 100_000;
/// Most past runs read to estimate a step's durations: the newest ones.
const HISTORY_ROWS: i64 = 200_000;

/// One run of one unit on one machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct UnitRun {
    pub build_id: i64,
    pub step_id: i64,
    pub builder: String,
    pub step: String,
    pub unit: String,
    pub machine: String,
    /// Milliseconds since the epoch.
    pub started_at: i64,
    pub duration_ms: i64,
    /// `passed`, `failed`, `lost` or `cancelled`.
    #[sqlx(try_from = "String")]
    pub result: super::RunResult,
    pub detail: String,
}

impl Store {
    /// Records one run of a unit (after every run, so a restart or a later
    /// failure loses no measurement).
    pub async fn record_unit_run(&self, r: &UnitRun) -> Result<()> {
        sqlx::query(
            "INSERT INTO unit_runs (build_id, step_id, builder, step, unit, machine, started_at, duration_ms, result, detail) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(r.build_id)
        .bind(r.step_id)
        .bind(text(&r.builder))
        .bind(text(&r.step))
        .bind(text(&r.unit))
        .bind(text(&r.machine))
        .bind(r.started_at)
        .bind(r.duration_ms)
        .bind(r.result.as_str())
        .bind(text(&r.detail))
        .execute(self.writer())
        .await?;
        Ok(())
    }

    /// A build's unit runs in the order they ended; at most
    /// `MAX_UNIT_ROWS`.
    pub async fn unit_runs(&self, build_id: i64) -> Result<Vec<UnitRun>> {
        Ok(sqlx::query_as(
            "SELECT build_id, step_id, builder, step, unit, machine, started_at, duration_ms, result, detail \
             FROM unit_runs WHERE build_id = $1 ORDER BY id LIMIT $2",
        )
        .bind(build_id)
        .bind(MAX_UNIT_ROWS)
        .fetch_all(self.pool())
        .await?)
    }

    /// The durations (ms) of the `per_unit` most recent completed runs of
    /// each unit of `step` on `builder`, newest first. Runs cut short (a
    /// lost machine, a cancel) say nothing about a unit's length and are
    /// left out.
    pub async fn unit_durations(
        &self,
        builder: &str,
        step: &str,
        per_unit: usize,
    ) -> Result<HashMap<String, Vec<i64>>> {
        let rows = sqlx::query(
            "SELECT unit, duration_ms FROM unit_runs \
             WHERE builder = $1 AND step = $2 AND result IN ('passed', 'failed') \
             ORDER BY id DESC LIMIT $3",
        )
        .bind(text(builder))
        .bind(text(step))
        .bind(HISTORY_ROWS)
        .fetch_all(self.pool())
        .await?;
        let mut out: HashMap<String, Vec<i64>> = HashMap::new();
        for r in &rows {
            let unit: String = r.try_get("unit")?;
            let d: i64 = r.try_get("duration_ms")?;
            let v = out.entry(unit).or_default();
            if v.len() < per_unit {
                v.push(d);
            }
        }
        Ok(out)
    }
}
