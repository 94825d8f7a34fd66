//! The source cache: the last source tree this machine received, kept
//! beside the work dir (`WORKDIR.srccache/`), so the next build of a
//! nearby commit needs only what changed (`/writesrc` with `base=`).
//!
//! Correctness never depends on the cache. Every tree is assembled in the
//! cache, then hashed exactly as git hashes a tree (blobs, modes, symbolic
//! links, nested trees) and compared with the tree the coordinator says it
//! sent; a mismatch empties the cache and fails the request, and the
//! coordinator sends the whole tree. Only a verified tree is put into the
//! work dir.
//!
//! Hashing 100 MB on every build would cost more than the delta saves, so
//! each file's blob id is remembered with its inode, size, mtime and ctime
//! (as git's index does): an unchanged file is not read again, and any
//! change to it (contents, mode, or an mtime put back) moves its ctime,
//! which user code cannot set.
//!
//! A build uses the cached tree itself: it is *lent* to the work dir, moved
//! there by one rename ([`SrcCache::lend`]), and moved back when the work
//! dir is emptied or the next tree arrives ([`SrcCache::reclaim`]), when
//! whatever the build added to it is removed (build outputs are not part
//! of a git tree). What the build changed in it is caught by the keys; a
//! tree that is gone or was replaced is forgotten. Materializing 20,000
//! files in 3,400 directories per build, even as hard links, took 2 s on a
//! slow disk; a rename costs nothing.
//!
//! Where the cache cannot be moved into the work dir (another file
//! system), its files are copied instead ([`copy_tree`]).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha1::Digest;

use crate::beneath::{Dir, Kind, Root};

/// The cache's tree, inside the cache dir.
pub const TREE: &str = "tree";

/// Where the held tree is while a build uses it: moved into the work dir
/// as this directory (its path components below the work dir, its device
/// and inode).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Lent {
    comps: Vec<String>,
    id: (u64, u64),
}

/// A ctime no file has: a key holding it is never trusted (the file is
/// read again), for files changed too recently (git's racy rule) and on
/// systems without inodes and ctimes.
const UNTRUSTED: (i64, i64) = (i64::MIN, 0);

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
    /// Symbolic links of the tree, by path (what else is in it goes).
    links: HashSet<PathBuf>,
    /// Where the tree is while a build uses it.
    lent: Option<Lent>,
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

    /// Empties the cache completely (its files are the caller's to remove).
    pub fn clear(&mut self) {
        self.tree = None;
        self.blobs.clear();
        self.links.clear();
        self.lent = None;
    }

    /// Whether the tree is lent to the work dir's `comps` or below it (so
    /// removing `comps` must [`SrcCache::reclaim`] it first). An empty
    /// `comps` is the whole work dir.
    pub fn lent_below(&self, comps: &[String]) -> bool {
        self.lent
            .as_ref()
            .is_some_and(|l| l.comps.starts_with(comps))
    }

    /// Puts the work dir's copy of the tree in place at `comps` (its
    /// parents made as needed, what was there removed): the tree itself,
    /// moved out of `cache_dir` (holding [`TREE`]); where it cannot be
    /// moved (another file system), its files copied. Returns the files
    /// and bytes of the tree.
    pub fn lend(
        &mut self,
        work: &Root,
        cache_dir: &Path,
        display: &str,
        comps: &[String],
    ) -> Result<(u64, u64), crate::beneath::DirError> {
        use crate::beneath::DirError;
        let cache = Root::open(cache_dir).map_err(DirError::Io)?;
        let (last, parent) = comps
            .split_last()
            .ok_or_else(|| DirError::Io(io::Error::other("no directory to put the tree in")))?;
        self.lent = None;
        // Until it is in place, the work dir does not hold the tree.
        let held = self.tree.take();
        let files = self.blobs.len() as u64;
        let bytes = self.blobs.values().map(|(k, _)| k.size).sum();
        let parent_dir = work.dir(display, parent, Some(&mut Vec::new()))?;
        parent_dir.remove_all(last).map_err(DirError::Io)?;
        // The tree's identity, from a handle taken before it moves.
        let id = Root::open(&cache_dir.join(TREE))
            .map_err(DirError::Io)?
            .id();
        match cache.as_dir().move_to(TREE, &parent_dir, last) {
            Ok(()) => {
                let there = parent_dir.lstat(last).map_err(DirError::Io)?;
                if there.map(|st| st.id) != Some(id) {
                    return Err(DirError::Io(io::Error::other(
                        "the tree was replaced as it was put in place",
                    )));
                }
                self.lent = Some(Lent {
                    comps: comps.to_vec(),
                    id,
                });
                self.tree = held;
                Ok((files, bytes))
            }
            Err(e) if cross_device(&e) => {
                let out = work.dir(display, comps, Some(&mut Vec::new()))?;
                let r = copy_tree(&cache_dir.join(TREE), &out).map_err(DirError::Io)?;
                self.tree = held;
                Ok(r)
            }
            Err(e) => Err(DirError::Io(e)),
        }
    }

    /// Moves a lent tree back from the work dir into `cache` and removes
    /// what was added to it. A tree that is gone, or whose directory was
    /// replaced, is forgotten (the cache is then empty); so is one that
    /// cannot be taken back whole. What a build changed in it stays, for
    /// the next hash to catch.
    pub fn reclaim(&mut self, work: &Root, cache_dir: &Path) {
        let Some(Lent { comps, id }) = self.lent.clone() else {
            return;
        };
        self.lent = None;
        let cache = match Root::open(cache_dir) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("the source cache {}: {e}", cache_dir.display());
                self.clear();
                return;
            }
        };
        let Some((last, parent)) = comps.split_last() else {
            self.clear();
            return;
        };
        let back = || -> io::Result<bool> {
            let Ok(parent_dir) = work.dir("", parent, None) else {
                return Ok(false);
            };
            match parent_dir.lstat(last)? {
                Some(st) if st.kind == Kind::Dir && st.id == id => {}
                _ => return Ok(false),
            }
            cache.as_dir().remove_all(TREE)?;
            parent_dir.move_to(last, cache.as_dir(), TREE)?;
            let tree = cache
                .as_dir()
                .open_dir_restored(std::ffi::OsStr::new(TREE))?;
            self.prune(&tree, Path::new(""))?;
            Ok(true)
        };
        match back() {
            Ok(true) => {}
            Ok(false) => self.clear(),
            Err(e) => {
                tracing::warn!("the source cache could not take its tree back: {e}");
                self.clear();
                let _ = cache.as_dir().remove_all(TREE);
            }
        }
    }

    /// Removes from `dir` (the tree at `rel`) every entry the tree does
    /// not have, and makes its directories usable again. Returns whether
    /// anything of the tree is left in it.
    fn prune(&self, dir: &Dir, rel: &Path) -> io::Result<bool> {
        let mut kept = false;
        for name in dir.names_os()? {
            let path = rel.join(&name);
            match dir.lstat_os(&name)? {
                None => {}
                Some(st) if st.kind == Kind::Dir => {
                    let sub = dir.open_dir_restored(&name)?;
                    if self.prune(&sub, &path)? {
                        kept = true;
                    } else {
                        dir.remove_all_os(&name)?;
                    }
                }
                Some(st) if st.kind == Kind::File && self.blobs.contains_key(&path) => kept = true,
                Some(st) if st.kind == Kind::Symlink && self.links.contains(&path) => kept = true,
                Some(_) => dir.remove_all_os(&name)?,
            }
        }
        Ok(kept)
    }

    /// Git's tree id of the directory `dir`, reusing remembered blob ids of
    /// files whose inode, size, mtime and ctime did not change. Files that
    /// are not regular files, directories or symbolic links make it fail.
    pub fn hash(&mut self, dir: &Path) -> io::Result<String> {
        let mut seen = HashMap::with_capacity(self.blobs.len());
        let mut links = HashSet::new();
        let mut read = 0;
        let id = self.hash_dir(dir, Path::new(""), &mut seen, &mut links, &mut read)?;
        // Git's "racy" rule: a file changed in the same tick of the file
        // system's clock as now could change again without its times
        // moving; it is not trusted by its key but read next time.
        // Without the file system's now, nothing is trusted (a stamp a
        // step keeps spoiling must not switch the rule off).
        let now = fs_now(dir);
        for (k, _) in seen.values_mut() {
            if now.is_none_or(|now| k.mtime >= now || k.ctime >= now) {
                k.ctime = UNTRUSTED;
            }
        }
        self.blobs = seen;
        self.links = links;
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
        links: &mut HashSet<PathBuf>,
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
                let id = self.hash_dir(base, &path, seen, links, read)?;
                entries.push((name_bytes, "40000", id, true));
            } else if ft.is_symlink() {
                let target = fs::read_link(base.join(&path))?;
                let id = blob_id(target.as_os_str().as_encoded_bytes());
                links.insert(path);
                entries.push((name_bytes, "120000", id, false));
            } else if ft.is_file() {
                let full = base.join(&path);
                let meta = check_file(&full, &meta)?;
                let key = file_key(&meta);
                let id = match self.blobs.get(&path) {
                    Some((k, id)) if *k == key && k.ctime != UNTRUSTED => *id,
                    _ => {
                        *read += 1;
                        hash_file(&full, &meta)?
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

/// Whether a rename failed only because it would cross file systems.
fn cross_device(e: &io::Error) -> bool {
    #[cfg(unix)]
    return e.raw_os_error() == Some(libc::EXDEV);
    #[cfg(not(unix))]
    return e.kind() == io::ErrorKind::CrossesDevices;
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
    // Without inode and ctime nothing proves a file unchanged: every file
    // is read again.
    FileKey {
        ino: 0,
        size: m.len(),
        mtime: (i64::MIN, 0),
        ctime: UNTRUSTED,
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

/// The file system's idea of now, for the racy rule: the times of a
/// stamp file beside `dir` (in its parent, the cache dir) just touched.
/// `None` if there is no stamp of ours to touch (then nothing is trusted).
///
/// One stamp is kept and touched, not a new file made and removed per
/// hash: on ext4 without a journal every inode freed in the last seconds
/// is stepped over, block lookup by block lookup, by each later file
/// creation on the file system, so a file made and removed per build made
/// every process's creations slower.
#[cfg(unix)]
fn fs_now(dir: &Path) -> Option<(i64, i64)> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    // No lock of its own: `SrcCache::hash` takes its cache by `&mut`, so
    // no other touch of this stamp comes between this one and its read.
    let parent = dir.parent()?;
    let path = parent.join(".racy-stamp");
    // Never through a link, never blocking on a fifo; and only our own
    // file with one name (a hard link planted there would have its times
    // changed): anything else by that name is replaced.
    let open = |new: bool| {
        let mut o = fs::OpenOptions::new();
        o.write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
        if new {
            o.create_new(true);
        } else {
            o.create(true);
        }
        let f = o.open(&path).ok()?;
        let m = f.metadata().ok()?;
        (m.is_file() && m.nlink() == 1).then_some(f)
    };
    let f = match open(false) {
        Some(f) => f,
        None => {
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => fs::remove_dir_all(&path).ok()?,
                Ok(_) => fs::remove_file(&path).ok()?,
                Err(_) => {}
            }
            open(true)?
        }
    };
    // SAFETY: a valid fd; a null times pointer means "now" for both times,
    // in the file system's own clock and granularity (ctime moves too).
    if unsafe { libc::futimens(f.as_raw_fd(), std::ptr::null()) } != 0 {
        return None;
    }
    let k = file_key(&f.metadata().ok()?);
    Some(k.mtime.min(k.ctime))
}

/// Without file times to trust (see `file_key`), there is no racy rule.
#[cfg(not(unix))]
fn fs_now(_dir: &Path) -> Option<(i64, i64)> {
    None
}

/// Opens a cached file for reading without following a symbolic link or
/// blocking on a fifo put in its place, and checks it is still the inode
/// `meta` describes.
fn open_cached(path: &Path, meta: &fs::Metadata) -> io::Result<fs::File> {
    let mut o = fs::OpenOptions::new();
    o.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    }
    let f = o.open(path)?;
    let now = f.metadata()?;
    if !now.is_file() || file_key(&now).ino != file_key(meta).ino {
        return Err(io::Error::other(format!(
            "{} was replaced while it was checked",
            path.display()
        )));
    }
    Ok(f)
}

/// Checks a cached file before it is trusted, and returns its metadata:
/// it has no other name (a hard link kept elsewhere by a step could change
/// the next build's source through it), and its permission bits are put
/// back to what a checkout gives (0644 or 0755), through a handle.
fn check_file(path: &Path, meta: &fs::Metadata) -> io::Result<fs::Metadata> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        if meta.nlink() != 1 {
            return Err(io::Error::other(format!(
                "{} has another name (a hard link): it cannot be trusted",
                path.display()
            )));
        }
        let perm = meta.mode() & 0o7777;
        let want = if perm & 0o100 != 0 { 0o755 } else { 0o644 };
        if perm != want {
            let f = open_cached(path, meta)?;
            f.set_permissions(fs::Permissions::from_mode(want))?;
            return f.metadata();
        }
    }
    Ok(meta.clone())
}

fn hash_file(path: &Path, meta: &fs::Metadata) -> io::Result<[u8; 20]> {
    let mut f = open_cached(path, meta)?;
    let len = meta.len();
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

/// Copies the tree at `src` (the cache's, verified) into `dest`, a
/// directory handle beneath the work dir: directories made, symbolic links
/// made, files copied with a checkout's permission bits. Returns (files,
/// bytes).
pub fn copy_tree(src: &Path, dest: &Dir) -> io::Result<(u64, u64)> {
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
            let (f, b) = copy_tree(&path, &sub)?;
            files += f;
            bytes += b;
        } else if ft.is_symlink() {
            let target = fs::read_link(&path)?;
            dest.symlink(&target, name_str)?;
        } else if ft.is_file() {
            copy_file(&path, &meta, name_str, dest)?;
            bytes += meta.len();
            files += 1;
        }
    }
    Ok((files, bytes))
}

fn copy_file(path: &Path, meta: &fs::Metadata, name: &str, dest: &Dir) -> io::Result<()> {
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
        // A dir below the temp dir: the racy stamp goes beside it.
        let d = tempfile::tempdir().unwrap();
        let w = &d.path().join("w");
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
        let empty = d.path().join("empty");
        fs::create_dir(&empty).unwrap();
        assert_eq!(SrcCache::default().hash(&empty).unwrap(), EMPTY_TREE);
    }

    /// The racy rule's clock is one stamp beside the tree, touched in
    /// place: hashing makes and removes no file, and a stamp replaced by a
    /// link or a fifo is neither followed nor waited on.
    #[test]
    fn the_racy_stamp_is_one_file_touched_in_place() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        fs::create_dir(&tree).unwrap();
        fs::write(tree.join("f"), "f").unwrap();
        let mut c = SrcCache::default();
        let id = c.hash(&tree).unwrap();
        let stamp = d.path().join(".racy-stamp");
        let ino = fs::metadata(&stamp).unwrap().ino();
        for _ in 0..3 {
            assert_eq!(c.hash(&tree).unwrap(), id);
        }
        assert_eq!(fs::metadata(&stamp).unwrap().ino(), ino);
        let mut names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, [".racy-stamp", "tree"]);

        // Neither a link nor a second name of another file is touched
        // through: the file keeps its times. A fifo nobody reads does not
        // block the hash.
        let outside = tempfile::NamedTempFile::new().unwrap();
        // Long ago, so a touch through a link would show whatever the
        // clock's granularity.
        let before = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1 << 30);
        outside.as_file().set_modified(before).unwrap();
        let plants: [&dyn Fn(&Path); 3] = [
            &|p| std::os::unix::fs::symlink(outside.path(), p).unwrap(),
            &|p| fs::hard_link(outside.path(), p).unwrap(),
            &|p| {
                let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
                // SAFETY: a NUL-terminated path.
                assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            },
        ];
        for plant in plants {
            fs::remove_file(&stamp).unwrap();
            plant(&stamp);
            assert_eq!(c.hash(&tree).unwrap(), id);
            let m = fs::metadata(outside.path()).unwrap();
            assert_eq!(m.modified().unwrap(), before);
        }
        // A directory in its place goes too. Each time, the stamp is ours
        // again afterwards: a plain file with one name.
        fs::remove_file(&stamp).unwrap();
        fs::create_dir_all(stamp.join("sub")).unwrap();
        assert_eq!(c.hash(&tree).unwrap(), id);
        let m = fs::symlink_metadata(&stamp).unwrap();
        assert!(m.is_file() && m.nlink() == 1, "{m:?}");
    }
}
