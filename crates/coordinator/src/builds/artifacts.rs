//! Build artifacts: after a step passes, the files its `artifacts` globs
//! name are fetched from the machine, stored in the artifact store under
//! their SHA-256 (`builds/sha256/HEX`: a file many builds keep is stored
//! once) and recorded with the build (`store::build_artifacts`). Every fetch
//! is bounded; a file that cannot be kept is a line in the log, never a
//! failed build.

use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::StepCtx;
use crate::farm::Farm;
use crate::results::collect::{fetch, list_matching};
use buildlet::client::Client;

/// Largest file kept.
pub const MAX_FILE: usize = 64 << 20;
/// Most files one step keeps.
pub const MAX_FILES: usize = 32;
/// Most bytes one step keeps in all.
pub const MAX_STEP_BYTES: usize = 256 << 20;
/// The longest fetching one step's files may take.
const FETCH_LIMIT: Duration = Duration::from_secs(600);

/// Longest name of a kept file.
const MAX_NAME: usize = 1024;

/// What is wrong with a file name a machine listed, if anything: names go
/// into links, pages and the log, so they are plain relative paths.
fn name_problem(name: &str) -> Option<&'static str> {
    if name.len() > MAX_NAME {
        Some("is longer than 1 KiB")
    } else if name.chars().any(|c| {
        c.is_control() || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    }) {
        Some("has control or direction-changing characters")
    } else if name.starts_with('/')
        || name
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        Some("is not a plain relative path")
    } else {
        None
    }
}

/// Where a kept file's bytes are.
pub fn key(sha256: &str) -> String {
    format!("builds/sha256/{sha256}")
}

impl Farm {
    /// Keeps the files `ctx.step.artifacts` names, saying in the log what
    /// was kept and what was not.
    pub(crate) async fn keep_artifacts(&self, ctx: &StepCtx<'_>, client: &Client) {
        if ctx.step.artifacts.is_empty() {
            return;
        }
        let mask = ctx.rb.log.mask();
        let work = async {
            let dir = super::step_dir(ctx.step);
            let mut names: Vec<String> = Vec::new();
            let mut seen = std::collections::HashSet::new();
            for glob in &ctx.step.artifacts {
                match list_matching(client, &dir, glob).await {
                    Ok(m) if m.is_empty() => {
                        ctx.log(&format!("farmer: artifacts {glob:?}: no file matched\n"))
                    }
                    Ok(m) => {
                        for n in m {
                            // One past the limit is enough to say so.
                            if names.len() > MAX_FILES {
                                break;
                            }
                            if seen.insert(n.clone()) {
                                names.push(n);
                            }
                        }
                    }
                    Err(e) => ctx.log(&format!("farmer: artifacts {glob:?}: {e}\n")),
                }
            }
            if names.len() > MAX_FILES {
                ctx.log(&format!(
                    "farmer: artifacts: more than {MAX_FILES} files matched; only the first {MAX_FILES} are kept\n"
                ));
                names.truncate(MAX_FILES);
            }
            let mut total = 0;
            for name in names {
                if let Some(why) = name_problem(&name) {
                    ctx.log(&format!(
                        "farmer: artifacts: a file name {why}; not kept: {:?}\n",
                        name.chars().take(200).collect::<String>()
                    ));
                    continue;
                }
                let cap = MAX_FILE.min(MAX_STEP_BYTES - total);
                if cap == 0 {
                    ctx.log(&format!(
                        "farmer: artifacts: {name}: not kept, the step's files reached {} MiB\n",
                        MAX_STEP_BYTES >> 20
                    ));
                    continue;
                }
                let data = match fetch(client, &format!("{dir}/{name}"), cap).await {
                    Ok(d) => d,
                    Err(e) => {
                        ctx.log(&format!("farmer: artifacts: {name}: {e}\n"));
                        continue;
                    }
                };
                total += data.len();
                // A secret's value is never published: logs are masked,
                // a kept file cannot be (its bytes are the point). Only the
                // literal value is found (not one compressed or encoded):
                // a guard against accidents. Scanned, and hashed, off the
                // async threads.
                let m = mask.clone();
                let checked = tokio::task::spawn_blocking(move || {
                    let secret = matches!(m.apply(&data), std::borrow::Cow::Owned(_));
                    let sha = hex::encode(Sha256::digest(&data));
                    (secret, sha, data)
                })
                .await;
                let Ok((secret, sha, data)) = checked else {
                    ctx.log(&format!(
                        "farmer: artifacts: {name}: not kept: checking it failed\n"
                    ));
                    continue;
                };
                if secret {
                    ctx.log(&format!(
                        "farmer: artifacts: {name}: not kept: it contains the value of one of the farm's secrets\n"
                    ));
                    continue;
                }
                match self.keep_one(ctx, &name, sha, data).await {
                    Ok(line) => ctx.log(&line),
                    Err(e) => ctx.log(&format!("farmer: artifacts: {name}: not kept: {e}\n")),
                }
            }
        };
        // Within the build's own deadline too.
        let limit = FETCH_LIMIT.min(
            ctx.deadline
                .saturating_duration_since(std::time::Instant::now()),
        );
        if tokio::time::timeout(limit, work).await.is_err() {
            ctx.log(&format!(
                "farmer: artifacts: fetching took over {limit:?}; the rest were not kept\n"
            ));
        }
    }

    async fn keep_one(
        &self,
        ctx: &StepCtx<'_>,
        name: &str,
        sha: String,
        data: Vec<u8>,
    ) -> Result<String, String> {
        let size = data.len();
        let store = self.artifacts();
        let k = key(&sha);
        let have = store.version(&k).await.map_err(|e| e.to_string())?;
        if have.is_none() {
            store
                .put(&k, Bytes::from(data))
                .await
                .map_err(|e| format!("writing it to the {}: {e}", store.describe()))?;
        }
        self.store
            .add_build_artifact(
                ctx.build.id,
                ctx.attempt_id,
                ctx.step_id,
                name,
                size as i64,
                &sha,
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(format!(
            "farmer: artifacts: kept {name} ({})\n",
            crate::view::human_bytes(size as u64)
        ))
    }
}
