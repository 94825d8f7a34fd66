//! Getting a commit's tree onto a machine with as few bytes as its link
//! allows. Each machine keeps the last tree it received (the buildlet's
//! source cache); the farm remembers which tree that is, sends only a delta
//! over it (changed and new files, whiteouts for what is gone) when that is
//! smaller, and the whole tree otherwise. The buildlet checks what it
//! assembled against git's tree id, so a wrong guess or a corrupt cache
//! costs one refusal and a full push, never a wrong build.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use buildlet::client::{Client, Error};
use bytes::Bytes;
use http::StatusCode;

use super::SRC_DIR;
use crate::farm::Farm;
use crate::view::human_bytes;

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
    /// One line for the build log: "source: a delta from abc123def456
    /// (4096 bytes; the whole tree is 30.1 MiB)" or "source: the whole
    /// tree (30.1 MiB)".
    pub fn describe(&self, full_bytes: usize) -> String {
        let size = human_bytes(self.bytes);
        let mut s = match &self.delta_from {
            Some(c) => format!(
                "source: a delta from {} ({size}; the whole tree is {})",
                &c[..12.min(c.len())],
                human_bytes(full_bytes as u64)
            ),
            None => format!("source: the whole tree ({size})"),
        };
        if let Some(n) = &self.note {
            s.push_str(&format!("; {n}"));
        }
        s
    }
}

/// The few most recent values by key, oldest dropped first: caches where a
/// handful of entries serve every machine (the builders of one commit).
struct Recent<K, V> {
    cap: usize,
    items: Mutex<VecDeque<(K, V)>>,
}

impl<K: PartialEq, V: Clone> Recent<K, V> {
    fn new(cap: usize) -> Self {
        Recent {
            cap,
            items: Mutex::new(VecDeque::new()),
        }
    }

    fn get(&self, key: &K) -> Option<V> {
        self.items
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    fn put(&self, key: K, value: V) {
        let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        items.push_back((key, value));
        while items.len() > self.cap {
            items.pop_front();
        }
    }
}

/// Whole trees kept, by (repo, commit).
const SOURCES_KEPT: usize = 16;
/// Deltas kept, by (repo, base tree, commit): most builds of a commit go
/// to machines that held the same previous commit.
const DELTAS_KEPT: usize = 32;
/// The largest delta kept for reuse.
const MAX_KEPT_DELTA: usize = 1 << 20;

/// The farm's side of source delivery: recent archives and deltas, and
/// which tree each machine's source cache holds.
pub struct Delivery {
    sources: Recent<(String, String), Arc<Source>>,
    /// `None`: no delta can be made for that key.
    deltas: Recent<(String, String, String), Option<Bytes>>,
    held: Mutex<HashMap<String, Held>>,
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            sources: Recent::new(SOURCES_KEPT),
            deltas: Recent::new(DELTAS_KEPT),
            held: Mutex::new(HashMap::new()),
        }
    }
}

impl Delivery {
    /// The tree a machine's source cache holds, as far as the farm knows.
    pub fn held(&self, hostname: &str) -> Option<Held> {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(hostname)
            .cloned()
    }

    /// Records what a machine's cache holds (`None`: nothing known).
    pub fn set_held(&self, hostname: &str, h: Option<Held>) {
        let mut m = self.held.lock().unwrap_or_else(|e| e.into_inner());
        match h {
            Some(h) => m.insert(hostname.to_string(), h),
            None => m.remove(hostname),
        };
    }
}

/// The link to the machine broke (as opposed to a refusal or a failure
/// there, which the whole tree, or `/writetgz`, may still get past).
fn link_broke(e: &Error) -> bool {
    matches!(e, Error::Unreachable(_) | Error::BrokeOff(_))
}

impl Farm {
    /// The whole tree of `commit`, archived once and kept for the few most
    /// recent commits (every builder of a commit pushes the same tree).
    pub async fn source(&self, repo: &str, commit: &str) -> Result<Arc<Source>, String> {
        let key = (repo.to_string(), commit.to_string());
        if let Some(s) = self.delivery.sources.get(&key) {
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
        self.delivery.sources.put(key, s.clone());
        Ok(s)
    }

    /// A delta from tree `base` to `commit`, when one can be made (kept
    /// when small; an error is not kept, so the next build tries again).
    async fn delta(&self, repo: &str, base: &str, commit: &str) -> Option<Bytes> {
        let key = (repo.to_string(), base.to_string(), commit.to_string());
        if let Some(d) = self.delivery.deltas.get(&key) {
            return d;
        }
        let r = self.repo(repo).await.ok()?;
        let (b, c) = (base.to_string(), commit.to_string());
        let made = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            r.delta_tgz(&b, &c, &mut out)
                .map(|made| made.map(|_| Bytes::from(out)))
        })
        .await
        .ok()?;
        match made {
            Ok(d) => {
                // "No delta" is kept too; a large delta is not kept at all
                // (kept as "none", it would send others the whole tree).
                if d.as_ref().is_none_or(|d| d.len() <= MAX_KEPT_DELTA) {
                    self.delivery.deltas.put(key, d.clone());
                }
                d
            }
            Err(e) => {
                tracing::warn!("making a source delta: {e}");
                None
            }
        }
    }

    /// Puts `src` (commit `commit` of `repo`) in the work dir's `src/` of
    /// `hostname`: a delta over the tree its cache holds when that is
    /// smaller, else the whole tree through the cache, else the whole tree
    /// the old way (`/writetgz`). Only a broken link is an error (the
    /// machine is lost); a refusal or a failure of the cached path falls
    /// back to the next way.
    pub async fn push_source(
        &self,
        client: &Client,
        hostname: &str,
        host_type: &str,
        repo: &str,
        commit: &str,
        src: &Source,
    ) -> Result<Pushed, Error> {
        let whole = src.tgz.len();
        let mut note = None;
        if src.exact {
            if let Some(h) = self.delivery.held(hostname).filter(|h| h.repo == repo)
                && let Some(d) = self.delta(repo, &h.tree, commit).await
                && d.len() < whole
            {
                let bytes = d.len();
                match self
                    .put_cached(client, hostname, repo, commit, src, d, Some(&h.tree))
                    .await
                {
                    Ok(()) => return Ok(self.sent(host_type, bytes, Some(h.commit), None)),
                    Err(e) if link_broke(&e) => return Err(e),
                    Err(e) => note = Some(format!("the delta was refused: {e}")),
                }
            }
            match self
                .put_cached(client, hostname, repo, commit, src, src.tgz.clone(), None)
                .await
            {
                Ok(()) => return Ok(self.sent(host_type, whole, None, note)),
                Err(e) if link_broke(&e) => return Err(e),
                // An older buildlet without a source cache.
                Err(Error::Rejected { status, .. }) if status == StatusCode::NOT_FOUND => {}
                Err(e) => {
                    tracing::warn!(%hostname, "the source cache refused a whole tree: {e}");
                    note = Some(format!("the source cache refused it: {e}"));
                }
            }
        }
        client.put_tgz_bytes(SRC_DIR, src.tgz.clone()).await?;
        Ok(self.sent(host_type, whole, None, note))
    }

    /// One `/writesrc`; what the machine's cache holds afterwards is
    /// recorded (nothing known, when it failed).
    #[allow(clippy::too_many_arguments)]
    async fn put_cached(
        &self,
        client: &Client,
        hostname: &str,
        repo: &str,
        commit: &str,
        src: &Source,
        body: Bytes,
        base: Option<&str>,
    ) -> Result<(), Error> {
        let r = client.put_src(SRC_DIR, body, &src.tree, base).await;
        self.delivery.set_held(
            hostname,
            r.as_ref().ok().map(|_| Held {
                tree: src.tree.clone(),
                repo: repo.to_string(),
                commit: commit.to_string(),
            }),
        );
        r.map(drop)
    }

    fn sent(
        &self,
        host_type: &str,
        bytes: usize,
        delta_from: Option<String>,
        note: Option<String>,
    ) -> Pushed {
        self.metrics
            .source_sent(host_type, delta_from.is_some(), bytes as u64);
        Pushed {
            bytes: bytes as u64,
            delta_from,
            note,
        }
    }
}
