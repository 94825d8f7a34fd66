//! The source cache: the last source tree this machine received, kept
//! beside the work dir (`WORKDIR.srccache/`), so the next build of a
//! nearby commit needs only what changed (`/writesrc` with `base=`).
//!
//! Correctness never depends on the cache. Every tree is assembled in the
//! cache, then hashed exactly as git hashes a tree (blobs, modes, symbolic
//! links, nested trees) and compared with the tree the coordinator says it
//! sent; a mismatch empties the cache and fails the request, and the
//! coordinator sends the whole tree. Only a verified tree is put into the
//! work dir (hard-linked: see [`link_tree`]).
//!
//! Hashing 100 MB on every build would cost more than the delta saves, so
//! each file's blob id is remembered with its inode, size, mtime and ctime
//! (as git's index does): an unchanged file is not read again, and any
//! change to it (contents, mode, or an mtime put back) moves its ctime,
//! which user code cannot set.
//!
//! Linking a cached file into the work dir and removing that link move its
//! ctime too. The buildlet's own links and removals therefore go through
//! [`SrcCache::across`], which carries a file's key over them only when the
//! file was unchanged just before (no command runs meanwhile: the work dir
//! is emptied between builds, when the last build's processes are gone).
//! Without it every build after the first would read the whole tree again.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha1::Digest;

/// What is remembered of one cached file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileKey {
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    mode: u32,
}

/// The cache's state (kept in memory: a restarted buildlet starts empty).
#[derive(Debug, Default)]
pub struct SrcCache {
    /// The verified tree the cache holds, if any.
    tree: Option<String>,
    /// Blob ids of cached files, by path below the cache's tree dir.
    blobs: HashMap<PathBuf, (FileKey, [u8; 20])>,
    /// Files the last [`SrcCache::hash`] had to read.
    read: u64,
}

/// Git's id of an empty tree.
pub const EMPTY_TREE: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";

impl SrcCache {
    /// The verified tree held, if any.
    pub fn tree(&self) -> Option<&str> {
        self.tree.as_deref()
    }

    /// Forgets the held tree (before changing the files, and on any failure).
    pub fn invalidate(&mut self) {
        self.tree = None;
    }

    /// Marks `tree` as held (after [`SrcCache::hash`] returned it).
    pub fn set_tree(&mut self, tree: String) {
        self.tree = Some(tree);
    }

    /// Empties the cache completely.
    pub fn clear(&mut self) {
        self.tree = None;
        self.blobs.clear();
    }

    /// Runs `op`, the buildlet's own change to the links of the cache's
    /// files under `dir` (linking them into the work dir, or emptying it),
    /// and keeps the keys of the files `op` alone touched. A file whose key
    /// did not match just before is left stale, so it is read again; one
    /// whose inode, size, mtime or mode moved during `op` too.
    pub fn across<T>(&mut self, dir: &Path, op: impl FnOnce() -> T) -> T {
        if self.tree.is_none() || self.blobs.is_empty() {
            return op();
        }
        let unchanged: Vec<PathBuf> = self
            .blobs
            .iter()
            .filter(|(p, (k, _))| {
                fs::symlink_metadata(dir.join(p)).is_ok_and(|m| file_key(&m) == *k)
            })
            .map(|(p, _)| p.clone())
            .collect();
        let out = op();
        for p in unchanged {
            let Ok(m) = fs::symlink_metadata(dir.join(&p)) else {
                continue;
            };
            let now = file_key(&m);
            if let Some((k, _)) = self.blobs.get_mut(&p)
                && now.ino == k.ino
                && now.size == k.size
                && now.mtime == k.mtime
                && now.mode == k.mode
            {
                *k = now;
            }
        }
        out
    }

    /// Git's tree id of the directory `dir`, reusing remembered blob ids of
    /// files whose inode, size, mtime and ctime did not change. Files that
    /// are not regular files, directories or symbolic links make it fail.
    pub fn hash(&mut self, dir: &Path) -> io::Result<String> {
        let mut seen = HashMap::with_capacity(self.blobs.len());
        let mut read = 0;
        let id = self.hash_dir(dir, Path::new(""), &mut seen, &mut read)?;
        self.blobs = seen;
        self.read = read;
        Ok(hex::encode(id))
    }

    /// How many files the last [`SrcCache::hash`] read (the others were
    /// known unchanged).
    pub fn files_read(&self) -> u64 {
        self.read
    }

    fn hash_dir(
        &self,
        base: &Path,
        rel: &Path,
        seen: &mut HashMap<PathBuf, (FileKey, [u8; 20])>,
        read: &mut u64,
    ) -> io::Result<[u8; 20]> {
        let mut entries: Vec<(Vec<u8>, &'static str, [u8; 20], bool)> = Vec::new();
        for e in fs::read_dir(base.join(rel))? {
            let e = e?;
            let name = e.file_name();
            let name_bytes = name.as_encoded_bytes().to_vec();
            let path = rel.join(&name);
            let meta = fs::symlink_metadata(base.join(&path))?;
            let ft = meta.file_type();
            if ft.is_dir() {
                let id = self.hash_dir(base, &path, seen, read)?;
                entries.push((name_bytes, "40000", id, true));
            } else if ft.is_symlink() {
                let target = fs::read_link(base.join(&path))?;
                let id = blob_id(target.as_os_str().as_encoded_bytes());
                entries.push((name_bytes, "120000", id, false));
            } else if ft.is_file() {
                // The work dir's files are these inodes: their permission
                // bits must be exactly what a checkout gives (a step's
                // `chmod a-w` would otherwise reach the next build).
                #[cfg(unix)]
                let meta = {
                    use std::os::unix::fs::PermissionsExt;
                    let perm = meta.permissions().mode() & 0o7777;
                    let want = if perm & 0o100 != 0 { 0o755 } else { 0o644 };
                    if perm != want {
                        fs::set_permissions(base.join(&path), fs::Permissions::from_mode(want))?;
                        fs::symlink_metadata(base.join(&path))?
                    } else {
                        meta
                    }
                };
                let key = file_key(&meta);
                let id = match self.blobs.get(&path) {
                    Some((k, id)) if *k == key => *id,
                    _ => {
                        *read += 1;
                        hash_file(&base.join(&path), meta.len())?
                    }
                };
                seen.insert(path, (key, id));
                let mode = if key.mode & 0o100 != 0 {
                    "100755"
                } else {
                    "100644"
                };
                entries.push((name_bytes, mode, id, false));
            } else {
                return Err(io::Error::other(format!(
                    "{} is not a file, directory or symbolic link",
                    path.display()
                )));
            }
        }
        // Git's order: by name, a directory's name as if it ended in '/'.
        entries.sort_by(|a, b| {
            let ka = sort_key(&a.0, a.3);
            let kb = sort_key(&b.0, b.3);
            ka.cmp(&kb)
        });
        let mut body = Vec::new();
        for (name, mode, id, _) in &entries {
            body.extend_from_slice(mode.as_bytes());
            body.push(b' ');
            body.extend_from_slice(name);
            body.push(0);
            body.extend_from_slice(id);
        }
        let mut h = sha1::Sha1::new();
        h.update(format!("tree {}\0", body.len()).as_bytes());
        h.update(&body);
        Ok(h.finalize().into())
    }
}

fn sort_key(name: &[u8], dir: bool) -> Vec<u8> {
    let mut k = name.to_vec();
    if dir {
        k.push(b'/');
    }
    k
}

#[cfg(unix)]
fn file_key(m: &fs::Metadata) -> FileKey {
    use std::os::unix::fs::MetadataExt;
    FileKey {
        ino: m.ino(),
        size: m.size(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
        mode: m.mode(),
    }
}

#[cfg(not(unix))]
fn file_key(m: &fs::Metadata) -> FileKey {
    // Without inode and ctime nothing proves a file unchanged: a key that
    // never matches makes every file be read again.
    FileKey {
        ino: 0,
        size: m.len(),
        mtime: (i64::MIN, 0),
        ctime: (i64::MIN, 0),
        mode: 0,
    }
}

/// Git's blob id of `data`.
pub fn blob_id(data: &[u8]) -> [u8; 20] {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", data.len()).as_bytes());
    h.update(data);
    h.finalize().into()
}

fn hash_file(path: &Path, len: u64) -> io::Result<[u8; 20]> {
    let mut f = fs::File::open(path)?;
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {len}\0").as_bytes());
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        h.update(&buf[..n]);
    }
    if total != len {
        return Err(io::Error::other(format!(
            "{} changed while it was read",
            path.display()
        )));
    }
    Ok(h.finalize().into())
}

/// Puts the tree at `src` (the cache's, verified) into `dest`, a
/// directory handle beneath the work dir: directories made, symbolic links
/// made, files hard-linked to the cache's (a copy where the file system
/// cannot link, e.g. another device). Linking costs no data written: on a
/// slow disk, copying 100 MB per build took longer than sending the delta
/// saved. A step that changes a linked file in place changes the cache's
/// too; its ctime moves, the next delta's check fails, and the whole tree
/// is sent again. Returns (files, bytes).
pub fn link_tree(src: &Path, dest: &crate::beneath::Dir) -> io::Result<(u64, u64)> {
    let src_dir = crate::beneath::Root::open(src)?;
    let mut files = 0;
    let mut bytes = 0;
    for e in fs::read_dir(src)? {
        let e = e?;
        let name = e.file_name();
        let Some(name_str) = name.to_str() else {
            return Err(io::Error::other("a cached name is not UTF-8"));
        };
        let path = src.join(&name);
        let meta = fs::symlink_metadata(&path)?;
        let ft = meta.file_type();
        if ft.is_dir() {
            dest.mkdir(name_str)?;
            let sub = dest.open_dir(name_str)?;
            let (f, b) = link_tree(&path, &sub)?;
            files += f;
            bytes += b;
        } else if ft.is_symlink() {
            let target = fs::read_link(&path)?;
            dest.symlink(&target, name_str)?;
        } else if ft.is_file() {
            if dest
                .hard_link(src_dir.as_dir(), name_str, name_str)
                .is_err()
            {
                copy_file(&path, &meta, name_str, dest)?;
            }
            bytes += meta.len();
            files += 1;
        }
    }
    Ok((files, bytes))
}

fn copy_file(
    path: &Path,
    meta: &fs::Metadata,
    name: &str,
    dest: &crate::beneath::Dir,
) -> io::Result<()> {
    #[cfg(unix)]
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o100 != 0 {
            0o755
        } else {
            0o644
        }
    };
    #[cfg(not(unix))]
    let mode = {
        let _ = meta;
        0o644
    };
    let mut out = dest.create_new(name, mode)?;
    let mut input = fs::File::open(path)?;
    io::copy(&mut input, &mut out)?;
    out.flush()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        out.set_permissions(fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("git");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// The hash is git's own, for files, an executable, a symbolic link,
    /// nested and oddly named directories (git's sort order), and it notices
    /// a change that keeps the size and puts the mtime back.
    #[test]
    fn tree_ids_match_git() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let w = d.path();
        fs::create_dir_all(w.join("a/b")).unwrap();
        fs::create_dir_all(w.join("a.b")).unwrap();
        fs::write(w.join("a/b/c.txt"), "c\n").unwrap();
        fs::write(w.join("a.b/x"), "x").unwrap();
        fs::write(w.join("a-"), "dash").unwrap();
        fs::write(w.join("run.sh"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(w.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("a/b/c.txt", w.join("link")).unwrap();
        git(w, &["init", "-q"]);
        git(w, &["add", "-A"]);
        let want = git(w, &["write-tree"]);
        fs::remove_dir_all(w.join(".git")).unwrap();
        let mut c = SrcCache::default();
        assert_eq!(c.hash(w).unwrap(), want);
        // Same size, mtime put back: the ctime gives it away.
        let meta = fs::metadata(w.join("a/b/c.txt")).unwrap();
        let mtime = meta.modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(w.join("a/b/c.txt"), "C\n").unwrap();
        fs::File::options()
            .write(true)
            .open(w.join("a/b/c.txt"))
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_ne!(c.hash(w).unwrap(), want);
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(SrcCache::default().hash(empty.path()).unwrap(), EMPTY_TREE);
    }

    /// The buildlet's own links and removals (through `across`) keep the
    /// files known, so the next hash reads nothing; a change made through a
    /// link outside it (a build step) is still read again, and so is one
    /// made before `across` that `across` would otherwise have hidden.
    #[test]
    fn own_links_keep_files_known() {
        let cache = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let (c_dir, w_dir) = (cache.path(), work.path());
        for n in ["a", "b", "c"] {
            fs::write(c_dir.join(n), n).unwrap();
        }
        let mut c = SrcCache::default();
        let tree = c.hash(c_dir).unwrap();
        assert_eq!(c.files_read(), 3);
        c.set_tree(tree.clone());
        let link = |c: &mut SrcCache| {
            c.across(c_dir, || {
                for n in ["a", "b", "c"] {
                    fs::hard_link(c_dir.join(n), w_dir.join(n)).unwrap();
                }
            })
        };
        let unlink = |c: &mut SrcCache| {
            c.across(c_dir, || {
                for n in ["a", "b", "c"] {
                    fs::remove_file(w_dir.join(n)).unwrap();
                }
            })
        };
        link(&mut c);
        std::thread::sleep(std::time::Duration::from_millis(20));
        unlink(&mut c);
        assert_eq!(c.hash(c_dir).unwrap(), tree);
        assert_eq!(c.files_read(), 0, "unchanged files were read again");
        // Without `across`, a link is a change like any other.
        fs::hard_link(c_dir.join("a"), w_dir.join("a")).unwrap();
        assert_eq!(c.hash(c_dir).unwrap(), tree);
        assert_eq!(c.files_read(), 1);
        // A step writes through a work-dir link: read again, seen.
        link_one_and_write(&mut c, c_dir, w_dir);
        unlink_all(&mut c, c_dir, w_dir);
        assert_ne!(c.hash(c_dir).unwrap(), tree);
        assert_eq!(c.files_read(), 1);
    }

    fn link_one_and_write(c: &mut SrcCache, c_dir: &Path, w_dir: &Path) {
        c.across(c_dir, || {
            for n in ["b", "c"] {
                fs::hard_link(c_dir.join(n), w_dir.join(n)).unwrap();
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(w_dir.join("b"), "B").unwrap();
    }

    fn unlink_all(c: &mut SrcCache, c_dir: &Path, w_dir: &Path) {
        c.across(c_dir, || {
            for n in ["a", "b", "c"] {
                fs::remove_file(w_dir.join(n)).unwrap();
            }
        });
    }
}
