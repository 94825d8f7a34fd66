//! `PUT /writesrc?dir=DIR&tree=TREE[&base=BASE]`: a source tree through the
//! source cache ([`crate::srccache`]). Without `base` the body is the whole
//! tree (a tar.gz); with it, a delta over the tree BASE the cache holds:
//! changed and new entries, and `.wh.NAME` whiteouts for what is gone. The
//! result is checked against git's tree id TREE before it is lent to DIR
//! (emptied first; see [`crate::srccache`]), so a wrong or corrupt cache is
//! never built.
//!
//! Answers: `200` with JSON stats; `409` when the cache does not hold BASE
//! (it says what it holds); `422` when the tree assembled is not TREE (the
//! cache is emptied); `404` when this buildlet keeps no cache.

use std::path::PathBuf;

use http::{Request, Response, StatusCode};
use hyper::body::Body as HttpBody;

use super::files::{BoxError, bad, blocking_reader, content_length, too_large};
use super::{Buildlet, Form, ResponseBody, json, query_pairs, text};
use crate::beneath::Root;
use crate::paths;
use crate::proto::SrcWritten;
use crate::srccache;
use crate::tarball::{self, LimitedReader, TarError};

fn is_tree_id(s: &str) -> bool {
    s.len() == 40
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn dir_failure(dir: &str, e: crate::beneath::DirError) -> Failure {
    match e {
        crate::beneath::DirError::Path(p) => Failure::Tar(TarError::Path(p)),
        crate::beneath::DirError::Io(e) => Failure::Io(format!("{dir}: {e}")),
    }
}

enum Failure {
    Conflict(String),
    Mismatch(String),
    Tar(TarError),
    Io(String),
}

pub(super) async fn write_src<B>(b: &Buildlet, req: Request<B>) -> Response<ResponseBody>
where
    B: HttpBody<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let Some(cache_dir) = b.cfg.src_cache.clone() else {
        return text(
            StatusCode::NOT_FOUND,
            "this buildlet keeps no source cache\n",
        );
    };
    let form = Form(query_pairs(&req));
    let dir = form.get("dir").unwrap_or("").to_string();
    let tree = form.get("tree").unwrap_or("").to_string();
    let base = form.get("base").map(str::to_string);
    if !is_tree_id(&tree) || base.as_deref().is_some_and(|b| !is_tree_id(b)) {
        return bad("tree and base must be 40-digit lowercase hex tree ids");
    }
    let dest = match paths::clean(&dir) {
        Ok(d) if !d.is_empty() => d,
        Ok(_) => return bad("dir must name a directory below the work dir"),
        Err(e) => return bad(e),
    };
    if content_length(&req).is_some_and(|n| n > b.cfg.max_body) {
        return too_large(b.cfg.max_body);
    }
    let work = match b.open_root() {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let cache = b.src_cache.clone();
    let max = b.cfg.max_body;
    let limits = tarball::Limits {
        max_expanded: b.cfg.max_expanded,
        max_entries: b.cfg.max_entries,
    };
    let reader = blocking_reader(req.into_body());
    let result = tokio::task::spawn_blocking(move || {
        let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
        let tree_dir: PathBuf = cache_dir.join(srccache::TREE);
        let io = |what: &str, e: std::io::Error| Failure::Io(format!("{what}: {e}"));
        // The last build's tree comes back from the work dir (what it
        // added is removed; what it changed, the hash catches).
        c.reclaim(&work, &cache_dir);
        match &base {
            Some(want) if c.tree() != Some(want.as_str()) => {
                return Err(Failure::Conflict(format!(
                    "the source cache holds {}, not {want}",
                    c.tree().unwrap_or("nothing")
                )));
            }
            Some(_) => {}
            None => {
                c.clear();
                let cache =
                    Root::open(&cache_dir).map_err(|e| io("opening the source cache", e))?;
                cache
                    .as_dir()
                    .remove_all(srccache::TREE)
                    .map_err(|e| io("emptying the source cache", e))?;
            }
        }
        c.invalidate();
        std::fs::create_dir_all(&tree_dir).map_err(|e| io("creating the source cache", e))?;
        let root = Root::open(&tree_dir).map_err(|e| io("opening the source cache", e))?;
        let input = LimitedReader::new(reader, max);
        let stats = if base.is_some() {
            tarball::extract_delta_in(input, &root, &[], limits)
        } else {
            tarball::extract_in(input, &root, &[], limits)
        }
        .map_err(Failure::Tar)?;
        let got = c
            .hash(&tree_dir)
            .map_err(|e| io("hashing the source cache", e))?;
        if got != tree {
            c.clear();
            let _ = root.as_dir().empty();
            return Err(Failure::Mismatch(format!(
                "the tree assembled is {got}, not {tree}; the source cache was emptied"
            )));
        }
        let files_read = c.files_read();
        c.set_tree(got);
        // DIR is emptied, and the tree is lent to it.
        let (files, bytes) = c
            .lend(&work, &cache_dir, &dir, &dest)
            .map_err(|e| dir_failure(&dir, e))?;
        Ok(SrcWritten {
            tree,
            files,
            bytes,
            delta_entries: if base.is_some() {
                stats.files + stats.links + stats.removed
            } else {
                0
            },
            files_read,
        })
    })
    .await;
    super::release_memory();
    match result {
        Ok(Ok(w)) => json(&w),
        Ok(Err(Failure::Conflict(m))) => text(StatusCode::CONFLICT, format!("{m}\n")),
        Ok(Err(Failure::Mismatch(m))) => text(StatusCode::UNPROCESSABLE_ENTITY, format!("{m}\n")),
        Ok(Err(Failure::Tar(TarError::TooLarge(max)))) => too_large(max),
        Ok(Err(Failure::Tar(e))) if e.is_too_large() => {
            text(StatusCode::PAYLOAD_TOO_LARGE, format!("{e}\n"))
        }
        Ok(Err(Failure::Tar(e))) if e.is_client_error() => bad(e),
        Ok(Err(Failure::Tar(e))) if e.is_disk_full() => {
            text(StatusCode::INSUFFICIENT_STORAGE, format!("{e}\n"))
        }
        Ok(Err(Failure::Tar(e))) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        Ok(Err(Failure::Io(m))) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{m}\n")),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("source task failed: {e}\n"),
        ),
    }
}
