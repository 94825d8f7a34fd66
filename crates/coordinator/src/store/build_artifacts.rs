//! Build artifacts, the files builds kept (`build_artifacts`): which build, attempt and
//! step, the name, size and SHA-256 (the bytes are in the artifact store,
//! see `crate::builds::artifacts`). Only this file speaks SQL about them.

use serde::Serialize;

use super::{Result, Store, now_ms, text};

/// Most files listed for one build.
pub const MAX_BUILD_ARTIFACTS: i64 = 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct BuildArtifact {
    pub id: i64,
    pub build_id: i64,
    pub attempt_id: i64,
    pub step_id: i64,
    pub name: String,
    pub size: i64,
    pub sha256: String,
    pub created_at: i64,
}

const COLS: &str = "id, build_id, attempt_id, step_id, name, size, sha256, created_at";

/// The latest attempt of build `$1` that kept files.
const LAST: &str = "(SELECT MAX(attempt_id) FROM build_artifacts WHERE build_id = $1)";

impl Store {
    /// Records a file a step kept.
    pub async fn add_build_artifact(
        &self,
        build_id: i64,
        attempt_id: i64,
        step_id: i64,
        name: &str,
        size: i64,
        sha256: &str,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO build_artifacts (build_id, attempt_id, step_id, name, size, sha256, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(build_id)
        .bind(attempt_id)
        .bind(step_id)
        .bind(text(name))
        .bind(size)
        .bind(text(sha256))
        .bind(now_ms())
        .execute(self.writer())
        .await?;
        Ok(())
    }

    /// The files a build's latest attempt that kept any kept, one per
    /// name, by name (an earlier attempt's files, maybe from another
    /// machine, are not mixed in).
    pub async fn build_artifacts(&self, build_id: i64) -> Result<Vec<BuildArtifact>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {COLS} FROM build_artifacts WHERE id IN \
             (SELECT MAX(id) FROM build_artifacts WHERE build_id = $1 AND attempt_id = {LAST} GROUP BY name) ORDER BY name LIMIT $2"
        ))
        .bind(build_id)
        .bind(MAX_BUILD_ARTIFACTS)
        .fetch_all(self.pool())
        .await?)
    }

    /// One kept file of a build by name (of the attempt listed).
    pub async fn build_artifact(&self, build_id: i64, name: &str) -> Result<Option<BuildArtifact>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {COLS} FROM build_artifacts WHERE build_id = $1 AND name = $2 AND attempt_id = {LAST} ORDER BY id DESC LIMIT 1"
        ))
        .bind(build_id)
        .bind(text(name))
        .fetch_optional(self.pool())
        .await?)
    }
}
