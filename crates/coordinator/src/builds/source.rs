//! Getting a commit's tree onto a machine with as few bytes as its link
//! allows. Each machine keeps the last tree it received (the buildlet's
//! source cache); the farm remembers which tree that is, sends only a delta
//! over it (changed and new files, whiteouts for what is gone) when that is
//! smaller, and the whole tree otherwise. The buildlet checks what it
//! assembled against git's tree id, so a wrong guess or a corrupt cache
//! costs one refusal and a full push, never a wrong build.

use std::sync::Arc;

use buildlet::client::{Client, Error};
use bytes::Bytes;
use http::StatusCode;

use super::SRC_DIR;
use crate::farm::Farm;

/// A commit's whole tree as pushed to machines, and which git tree it is.
#[derive(Debug)]
pub struct Source {
    pub tgz: Bytes,
    pub tree: String,
    /// The tree is exactly git's (no submodule left out), so machines can
    /// cache and verify it.
    pub exact: bool,
}

/// What a machine holds in its source cache, as far as the farm knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub tree: String,
    pub repo: String,
    pub commit: String,
}

/// How one push went, for the build's log and the metrics.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub bytes: u64,
    pub delta_from: Option<String>,
    /// Why a delta was not used, when one was tried.
    pub note: Option<String>,
}

impl Pushed {
    /// One line for the build log: "source: 4 KiB delta from abc123def456".
    pub fn describe(&self, full_bytes: usize) -> String {
        let size = human_bytes(self.bytes);
        let mut s = match &self.delta_from {
            Some(c) => format!(
                "source: {size} delta from {} (the whole tree is {})",
                &c[..12.min(c.len())],
                human_bytes(full_bytes as u64)
            ),
            None => format!("source: {size}, the whole tree"),
        };
        if let Some(n) = &self.note {
            s.push_str(&format!(" ({n})"));
        }
        s
    }
}

fn human_bytes(n: u64) -> String {
    if n < 1024 {
        format!("{n} B")
    } else if n < 1024 * 1024 {
        format!("{} KiB", n.div_ceil(1024))
    } else {
        format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
    }
}

/// Deltas kept for machines at the same tree (most builds of a commit go
/// to machines that held the same previous commit).
pub(crate) const DELTA_CACHE: usize = 32;
/// The largest delta kept for reuse (32 of them at most).
const MAX_KEPT_DELTA: usize = 1 << 20;

impl Farm {
    /// The whole tree of `commit`, archived once and kept for the few most
    /// recent commits (every builder of a commit pushes the same tree).
    pub async fn source(&self, repo: &str, commit: &str) -> Result<Arc<Source>, String> {
        let key = (repo.to_string(), commit.to_string());
        if let Some(s) = self.cached_source(&key) {
            return Ok(s);
        }
        let r = self.repo(repo).await?;
        let c = commit.to_string();
        let (tgz, a) = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            r.source_archive(&c, &mut out).map(|a| (out, a))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let s = Arc::new(Source {
            tgz: Bytes::from(tgz),
            tree: a.tree,
            exact: a.exact,
        });
        self.keep_source(key, s.clone());
        Ok(s)
    }

    /// A delta from tree `base` to `commit`, when one can be made (cached).
    async fn delta(&self, repo: &str, base: &str, commit: &str) -> Option<Bytes> {
        let key = (repo.to_string(), base.to_string(), commit.to_string());
        if let Some(d) = self.cached_delta(&key) {
            return d;
        }
        let r = self.repo(repo).await.ok()?;
        let (b, c) = (base.to_string(), commit.to_string());
        let made = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            match r.delta_tgz(&b, &c, &mut out) {
                Ok(Some(_)) => Ok(Some(Bytes::from(out))),
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await;
        match made {
            Ok(Ok(d)) => {
                // A delta kept in memory must be worth it: none larger
                // than [`MAX_KEPT_DELTA`] (it is nearly a whole tree).
                let kept = d.clone().filter(|d| d.len() <= MAX_KEPT_DELTA);
                self.keep_delta(key, kept);
                d
            }
            // An error is not remembered: the next build tries again.
            Ok(Err(e)) => {
                tracing::warn!("making a source delta: {e}");
                None
            }
            Err(_) => None,
        }
    }

    /// Puts `src` (commit `commit` of `repo`) in the work dir's `src/` of
    /// `hostname`: a delta over the tree its cache holds when that is
    /// smaller, else the whole tree. A communication error is returned as
    /// it is (the machine is broken); any refusal of the cached path falls
    /// back to the whole tree the old way.
    pub async fn push_source(
        &self,
        client: &Client,
        hostname: &str,
        host_type: &str,
        repo: &str,
        commit: &str,
        src: &Source,
    ) -> Result<Pushed, Error> {
        let held = self.held(hostname);
        let mut note = None;
        if src.exact {
            if let Some(h) = held.filter(|h| h.repo == repo)
                && let Some(d) = self.delta(repo, &h.tree, commit).await
                && d.len() < src.tgz.len()
            {
                {
                    match client
                        .put_src(SRC_DIR, d.clone(), &src.tree, Some(&h.tree))
                        .await
                    {
                        Ok(_) => {
                            self.set_held(
                                hostname,
                                Some(Held {
                                    tree: src.tree.clone(),
                                    repo: repo.to_string(),
                                    commit: commit.to_string(),
                                }),
                            );
                            self.metrics.source_sent(host_type, true, d.len() as u64);
                            return Ok(Pushed {
                                bytes: d.len() as u64,
                                delta_from: Some(h.commit),
                                note: None,
                            });
                        }
                        Err(e) if e.is_communication() => {
                            self.set_held(hostname, None);
                            return Err(e);
                        }
                        Err(e) => {
                            note = Some(format!("the delta was refused: {e}; sent the whole tree"))
                        }
                    }
                }
            }
            match client
                .put_src(SRC_DIR, src.tgz.clone(), &src.tree, None)
                .await
            {
                Ok(_) => {
                    self.set_held(
                        hostname,
                        Some(Held {
                            tree: src.tree.clone(),
                            repo: repo.to_string(),
                            commit: commit.to_string(),
                        }),
                    );
                    self.metrics
                        .source_sent(host_type, false, src.tgz.len() as u64);
                    return Ok(Pushed {
                        bytes: src.tgz.len() as u64,
                        delta_from: None,
                        note,
                    });
                }
                Err(e @ (Error::Unreachable(_) | Error::BrokeOff(_))) => {
                    self.set_held(hostname, None);
                    return Err(e);
                }
                // An older buildlet without a source cache.
                Err(Error::Rejected { status, .. }) if status == StatusCode::NOT_FOUND => {}
                Err(e) => {
                    tracing::warn!(%hostname, "the source cache refused a whole tree: {e}");
                    note = Some(format!("the source cache refused it: {e}"));
                }
            }
        }
        self.set_held(hostname, None);
        client.put_tgz_bytes(SRC_DIR, src.tgz.clone()).await?;
        self.metrics
            .source_sent(host_type, false, src.tgz.len() as u64);
        Ok(Pushed {
            bytes: src.tgz.len() as u64,
            delta_from: None,
            note,
        })
    }
}
