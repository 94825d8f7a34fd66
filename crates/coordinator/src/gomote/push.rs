//! `gomote push`: make a directory on the machine equal to a local tree by
//! content hash. The machine lists the directory with SHA-256 digests
//! (`/ls?digest=1`); only files that are new or differ (content, executable
//! bit, link target) travel, in one tar.gz, and files gone locally are
//! removed. `.git` directories stay home.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

use anyhow::Context;
use buildlet::client::{Client, Error, LsOptions};
use buildlet::proto::{EntryKind, LsEntry};
use sha2::{Digest, Sha256};

/// What one side holds at a relative path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    Dir,
    /// Content digest and whether any execute bit is set.
    File {
        sha256: String,
        exec: bool,
    },
    Link(String),
}

/// What a push did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub sent: usize,
    pub removed: usize,
    pub unchanged: usize,
    /// Compressed bytes uploaded.
    pub bytes: u64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pushed {} changed files ({} compressed), removed {}, {} unchanged",
            self.sent,
            super::cli::human_bytes(self.bytes),
            self.removed,
            self.unchanged
        )
    }
}

/// The plan: paths to send and paths to remove, relative to the destination.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub send: Vec<String>,
    pub remove: Vec<String>,
    pub unchanged: usize,
}

/// Walks a local tree (no symlinks followed; `.git` left out).
pub fn local_tree(root: &Path) -> anyhow::Result<BTreeMap<String, Held>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let rd = std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
        for e in rd {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name == ".git" {
                continue;
            }
            let path = e.path();
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let ft = e.file_type()?;
            if ft.is_dir() {
                out.insert(r.clone(), Held::Dir);
                stack.push((path, r));
            } else if ft.is_symlink() {
                let t = std::fs::read_link(&path)?;
                out.insert(r, Held::Link(t.to_string_lossy().into_owned()));
            } else if ft.is_file() {
                let mut h = Sha256::new();
                let mut f = std::fs::File::open(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
                out.insert(
                    r,
                    Held::File {
                        sha256: hex::encode(h.finalize()),
                        exec: is_exec(&e.metadata()?),
                    },
                );
            }
        }
    }
    Ok(out)
}

#[cfg(unix)]
fn is_exec(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    m.permissions().mode() & 0o111 != 0
}

#[cfg(not(unix))]
fn is_exec(_: &std::fs::Metadata) -> bool {
    false
}

/// The machine's listing as the same map.
pub fn remote_tree(entries: &[LsEntry]) -> BTreeMap<String, Held> {
    let mut out = BTreeMap::new();
    for e in entries {
        let path = e.path.trim_end_matches('/').to_string();
        if path.is_empty() || path == ".git" || path.starts_with(".git/") {
            continue;
        }
        let held = match e.kind {
            EntryKind::Dir => Held::Dir,
            EntryKind::Symlink => Held::Link(e.link.clone().unwrap_or_default()),
            EntryKind::File => Held::File {
                sha256: e.sha256.clone().unwrap_or_default(),
                exec: e.mode & 0o111 != 0,
            },
            EntryKind::Other => continue,
        };
        out.insert(path, held);
    }
    out
}

/// What to send and remove so `remote` becomes `local`.
pub fn plan(local: &BTreeMap<String, Held>, remote: &BTreeMap<String, Held>) -> Plan {
    let mut p = Plan::default();
    for (path, held) in local {
        match (held, remote.get(path)) {
            (Held::Dir, Some(Held::Dir)) => {}
            (Held::Dir, _) => {} // created by the files under it, or sent empty below
            (_, Some(r)) if r == held => p.unchanged += 1,
            _ => p.send.push(path.clone()),
        }
    }
    // Empty local directories missing remotely travel as entries too.
    for (path, held) in local {
        if *held == Held::Dir
            && !matches!(remote.get(path), Some(Held::Dir))
            && !local.keys().any(|k| k.starts_with(&format!("{path}/")))
        {
            p.send.push(path.clone());
        }
    }
    // A path whose kind changed is removed first; a removed directory takes
    // its contents along.
    let mut removed: BTreeSet<String> = BTreeSet::new();
    for (path, held) in remote {
        let gone = match local.get(path) {
            None => true,
            Some(l) => std::mem::discriminant(l) != std::mem::discriminant(held),
        };
        let under_removed = removed.iter().any(|d| path.starts_with(&format!("{d}/")));
        if gone && !under_removed {
            removed.insert(path.clone());
        }
    }
    p.remove = removed.into_iter().collect();
    p.send.sort();
    p
}

/// A tar.gz of `paths` (relative to `root`) in a temporary file.
fn pack(root: &Path, paths: &[String]) -> anyhow::Result<std::fs::File> {
    let tmp = tempfile::tempfile().context("creating a temporary file for the push")?;
    let gz = flate2::write::GzEncoder::new(tmp, flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    b.follow_symlinks(false);
    for p in paths {
        b.append_path_with_name(root.join(p), p)
            .with_context(|| format!("adding {p} to the push"))?;
    }
    let mut f = b.into_inner()?.finish()?;
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(0))?;
    Ok(f)
}

/// Makes `dest` on the machine equal to the local `root`.
pub async fn push(client: &Client, root: &Path, dest: &str) -> anyhow::Result<Summary> {
    let r = root.to_path_buf();
    let local = tokio::task::spawn_blocking(move || local_tree(&r)).await??;
    let listing = match client
        .ls(
            dest,
            &LsOptions {
                recursive: true,
                digest: true,
                skip: vec![".git".into()],
            },
        )
        .await
    {
        Ok(l) => l,
        // Nothing there yet.
        Err(Error::Rejected { status, .. }) if status == http::StatusCode::NOT_FOUND => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let remote = remote_tree(&listing);
    let p = plan(&local, &remote);
    let mut s = Summary {
        unchanged: p.unchanged,
        ..Summary::default()
    };
    if !p.remove.is_empty() {
        let full: Vec<String> = p.remove.iter().map(|x| join(dest, x)).collect();
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        client.remove_all(&refs).await?;
        s.removed = p.remove.len();
    }
    if !p.send.is_empty() {
        let r = root.to_path_buf();
        let send = p.send.clone();
        let f = tokio::task::spawn_blocking(move || pack(&r, &send)).await??;
        let f = tokio::fs::File::from_std(f);
        s.bytes = f.metadata().await?.len();
        let bar = super::cli::Bar::new("push", Some(s.bytes));
        client.put_tgz(dest, f, Some(bar.progress())).await?;
        bar.finish();
        s.sent = p.send.len();
    }
    Ok(s)
}

fn join(dest: &str, rel: &str) -> String {
    let d = dest.trim_end_matches('/');
    if d.is_empty() || d == "." {
        rel.to_string()
    } else {
        format!("{d}/{rel}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(h: &str) -> Held {
        Held::File {
            sha256: h.into(),
            exec: false,
        }
    }

    #[test]
    fn only_differences_travel() {
        let local = BTreeMap::from([
            ("a".to_string(), file("1")),
            ("d".to_string(), Held::Dir),
            ("d/b".to_string(), file("2")),
            ("e".to_string(), Held::Dir),
            (
                "x".to_string(),
                Held::File {
                    sha256: "5".into(),
                    exec: true,
                },
            ),
        ]);
        let remote = BTreeMap::from([
            ("a".to_string(), file("1")),
            ("d".to_string(), Held::Dir),
            ("d/b".to_string(), file("old")),
            ("gone".to_string(), Held::Dir),
            ("gone/f".to_string(), file("3")),
            ("x".to_string(), file("5")),
        ]);
        let p = plan(&local, &remote);
        assert_eq!(p.send, vec!["d/b", "e", "x"]);
        assert_eq!(p.remove, vec!["gone"]);
        assert_eq!(p.unchanged, 1);
    }

    #[test]
    fn a_file_that_became_a_directory_is_replaced() {
        let local = BTreeMap::from([("p".to_string(), Held::Dir), ("p/f".to_string(), file("1"))]);
        let remote = BTreeMap::from([("p".to_string(), file("1"))]);
        let p = plan(&local, &remote);
        assert_eq!(p.remove, vec!["p"]);
        assert_eq!(p.send, vec!["p/f"]);
    }
}
