//! Test results and whole attempt logs. Only this file speaks SQL about
//! them.

use std::collections::HashMap;

use serde::Serialize;
use sqlx::Row;

use super::{Result, Store, now_ms, text};
use crate::results::TestResult;

/// Most rows a listing of tests returns.
pub const MAX_TEST_ROWS: i64 = 5000;

/// Where a step's test results come from.
#[derive(Debug, Clone)]
pub struct TestsOf {
    pub build_id: i64,
    pub attempt_id: i64,
    pub step_id: i64,
    pub builder: String,
    pub repo: String,
    pub commit: String,
    pub commit_time: i64,
}

/// One stored test result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct TestRow {
    pub id: i64,
    pub build_id: i64,
    pub attempt_id: i64,
    pub step_id: i64,
    pub builder: String,
    #[sqlx(rename = "commit_hash")]
    pub commit: String,
    pub commit_time: i64,
    pub name: String,
    pub outcome: String,
    pub duration_ms: Option<i64>,
    pub failure: String,
    pub log_line: Option<i64>,
}

/// How often a test was flaky on a builder over its recent builds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlakeRow {
    pub builder: String,
    pub name: String,
    /// Builds among the recent ones that ran it.
    pub runs: i64,
    pub flaky: i64,
    pub failed: i64,
    /// `flaky / runs`.
    pub rate: f64,
    /// The newest build where it was flaky.
    pub last_flaky_build: i64,
}

/// Marks a build as passed only after re-runs (not one already final).
pub(super) const SET_FLAKY: &str =
    "UPDATE builds SET flaky = 1 WHERE id = $1 AND status IN ('queued', 'running')";

/// The last attempt of build `$1` that recorded results.
const LAST_ATTEMPT: &str = "SELECT MAX(attempt_id) FROM test_results WHERE build_id = $1";

const TEST_COLS: &str = "id, build_id, attempt_id, step_id, builder, commit_hash, commit_time, name, outcome, duration_ms, failure, log_line";

impl Store {
    /// Records a step's test results in one transaction.
    pub async fn record_tests(&self, of: &TestsOf, tests: &[TestResult]) -> Result<()> {
        let mut w = self.writer().acquire().await?;
        let mut tx = w.begin().await?;
        let now = now_ms();
        for t in tests {
            sqlx::query(
                "INSERT INTO test_results (build_id, attempt_id, step_id, builder, repo, commit_hash, commit_time, name, outcome, duration_ms, failure, log_line, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            )
            .bind(of.build_id)
            .bind(of.attempt_id)
            .bind(of.step_id)
            .bind(text(&of.builder))
            .bind(text(&of.repo))
            .bind(text(&of.commit))
            .bind(of.commit_time)
            .bind(text(&t.name))
            .bind(t.outcome.as_str())
            .bind(t.duration_ms)
            .bind(text(&t.failure))
            .bind(t.line.map(|l| l as i64))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Turns a step's failed results of `names` into flaky ones (they
    /// passed when run again).
    pub async fn mark_flaky(&self, step_id: i64, names: &[String]) -> Result<()> {
        let mut w = self.writer().acquire().await?;
        let mut tx = w.begin().await?;
        for n in names {
            sqlx::query(
                "UPDATE test_results SET outcome = 'flaky' WHERE step_id = $1 AND name = $2 AND outcome = 'fail'",
            )
            .bind(step_id)
            .bind(text(n))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A build's test results (of its last attempt that recorded any: a
    /// build retried after a broken machine is not counted twice):
    /// failing first (then flaky, skipped, passed), each group in the
    /// order recorded; at most `limit`.
    pub async fn build_tests(&self, build_id: i64, limit: i64) -> Result<Vec<TestRow>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {TEST_COLS} FROM test_results WHERE build_id = $1 AND attempt_id = ({LAST_ATTEMPT}) \
             ORDER BY CASE outcome WHEN 'fail' THEN 0 WHEN 'flaky' THEN 1 WHEN 'skip' THEN 2 ELSE 3 END, id LIMIT $2"
        ))
        .bind(build_id)
        .bind(limit.min(MAX_TEST_ROWS))
        .fetch_all(self.pool())
        .await?)
    }

    /// Counts of a build's results by outcome (its last attempt's).
    pub async fn build_test_counts(&self, build_id: i64) -> Result<HashMap<String, i64>> {
        let rows = sqlx::query(&format!(
            "SELECT outcome, COUNT(*) AS n FROM test_results WHERE build_id = $1 AND attempt_id = ({LAST_ATTEMPT}) GROUP BY outcome"
        ))
        .bind(build_id)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("outcome")?, r.try_get("n")?)))
            .collect()
    }

    /// The names of the failing tests of each of `build_ids`, at most
    /// `per_build` each (the grid's tooltips).
    pub async fn failing_test_names(
        &self,
        build_ids: &[i64],
        per_build: usize,
    ) -> Result<HashMap<i64, Vec<String>>> {
        // One query per 500 builds, each build's first few failures by
        // window (a build with thousands of failing tests cannot crowd the
        // others out); names repeated by a retried attempt are dropped.
        let mut out: HashMap<i64, Vec<String>> = HashMap::new();
        for chunk in build_ids.chunks(500) {
            let sql = format!(
                "SELECT build_id, name FROM ( \
                   SELECT build_id, name, ROW_NUMBER() OVER (PARTITION BY build_id ORDER BY id) AS rn \
                   FROM test_results WHERE outcome = 'fail' AND build_id IN ({})) firsts \
                 WHERE rn <= $1 ORDER BY build_id, rn",
                super::params(2, chunk.len())
            );
            let mut q = sqlx::query(&sql).bind((per_build * 2) as i64);
            for id in chunk {
                q = q.bind(id);
            }
            for r in q.fetch_all(self.pool()).await? {
                let name: String = r.try_get("name")?;
                let v = out.entry(r.try_get("build_id")?).or_default();
                if v.len() < per_build && !v.contains(&name) {
                    v.push(name);
                }
            }
        }
        Ok(out)
    }

    /// The results of the test `name` across builders, newest commits
    /// first; at most `limit`.
    pub async fn test_history(&self, name: &str, limit: i64) -> Result<Vec<TestRow>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {TEST_COLS} FROM test_results WHERE name = $1 ORDER BY commit_time DESC, id DESC LIMIT $2"
        ))
        .bind(text(name))
        .bind(limit.min(MAX_TEST_ROWS))
        .fetch_all(self.pool())
        .await?)
    }

    /// Tests by flake rate over each builder's `builds` newest finished
    /// builds (counted in builds, however often a test ran in one); at
    /// most `limit` rows, the flakiest first.
    pub async fn flake_rates(&self, builds: i64, limit: i64) -> Result<Vec<FlakeRow>> {
        let rows = sqlx::query(
            "WITH recent AS (
               SELECT id FROM (
                 SELECT id, ROW_NUMBER() OVER (PARTITION BY builder ORDER BY id DESC) AS rn
                 FROM builds WHERE status IN ('passed', 'failed')) numbered
               WHERE rn <= $1),
             rates AS (
               SELECT t.builder, t.name, COUNT(DISTINCT t.build_id) AS runs,
                      COUNT(DISTINCT CASE WHEN t.outcome = 'flaky' THEN t.build_id END) AS flaky,
                      COUNT(DISTINCT CASE WHEN t.outcome = 'fail' THEN t.build_id END) AS failed,
                      MAX(CASE WHEN t.outcome = 'flaky' THEN t.build_id END) AS last_flaky
               FROM test_results t JOIN recent r ON r.id = t.build_id
               GROUP BY t.builder, t.name)
             SELECT builder, name, runs, flaky, failed, last_flaky FROM rates WHERE flaky > 0
             ORDER BY CAST(flaky AS REAL) / runs DESC, flaky DESC, name
             LIMIT $2",
        )
        .bind(builds)
        .bind(limit.min(MAX_TEST_ROWS))
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                let runs: i64 = r.try_get("runs")?;
                let flaky: i64 = r.try_get("flaky")?;
                Ok(FlakeRow {
                    builder: r.try_get("builder")?,
                    name: r.try_get("name")?,
                    runs,
                    flaky,
                    failed: r.try_get("failed")?,
                    rate: if runs > 0 {
                        flaky as f64 / runs as f64
                    } else {
                        0.0
                    },
                    last_flaky_build: r.try_get::<Option<i64>, _>("last_flaky")?.unwrap_or(0),
                })
            })
            .collect()
    }
}
