//! Tar.gz in and out of the work dir, with every entry checked.
//!
//! Extraction ([`extract`]) accepts regular files, directories, hard links to
//! files already inside the tree and symbolic links that stay inside it; it
//! refuses device files, named pipes and anything that would land outside the
//! work dir, naming the offending entry. Whatever it created before an error is
//! removed again, so a refused tarball leaves no half-written tree behind.
//!
//! Packing ([`pack`]) streams a directory without following symbolic links.

use crate::beneath::{Dir, DirError, Kind, Root};
use crate::fault::{self, IoFault};
use crate::paths::{self, PathError};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Why an archive could not be extracted.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    /// The body was larger than the configured limit.
    #[error("request body is larger than the limit of {0} bytes")]
    TooLarge(u64),
    /// The uncompressed tar stream passed [`Limits::max_expanded`].
    #[error("tarball expands past -max-expanded={0} bytes")]
    ExpandsTooFar(u64),
    /// The archive has more than [`Limits::max_entries`] entries.
    #[error("tarball has more than -max-entries={0} entries")]
    TooManyEntries(u64),
    /// The gzip or tar framing is broken (or the stream ended early).
    #[error("bad tar.gz stream: {0}")]
    Format(io::Error),
    /// An entry was refused; the message names it.
    #[error("tar entry {entry:?}: {reason}")]
    Entry { entry: String, reason: String },
    #[error(transparent)]
    Path(#[from] PathError),
    /// The file system refused an entry: the machine's fault (disk full,
    /// permissions) or, for names no file system takes, the request's
    /// ([`TarError::is_client_error`]). `path` is the entry's name.
    #[error("writing {path}: {err}")]
    Io { path: PathBuf, err: io::Error },
}

impl TarError {
    /// True when the fault lies with the archive or the request, not the
    /// machine. An OS error counts as the request's when no machine could
    /// do better (a name too long for any file system, see [`fault`]).
    pub fn is_client_error(&self) -> bool {
        match self {
            TarError::Io { err, .. } => matches!(fault::classify(err), IoFault::Request(_)),
            _ => true,
        }
    }

    /// True when an extraction limit was hit (answered with 413).
    pub fn is_too_large(&self) -> bool {
        matches!(
            self,
            TarError::TooLarge(_) | TarError::ExpandsTooFar(_) | TarError::TooManyEntries(_)
        )
    }

    /// True when the machine's disk or quota is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, TarError::Io { err, .. } if fault::classify(err) == IoFault::DiskFull)
    }
}

/// Bounds on what one archive may expand to. The compressed size is bounded
/// separately, by the caller's [`LimitedReader`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes of uncompressed tar stream (headers, contents, padding).
    pub max_expanded: u64,
    /// Most entries, of any type.
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_expanded: crate::proto::DEFAULT_MAX_EXPANDED,
            max_entries: crate::proto::DEFAULT_MAX_ENTRIES,
        }
    }
}

/// Marker error for the uncompressed stream passing [`Limits::max_expanded`].
#[derive(Debug)]
struct ExpandedTooFar(u64);

impl std::fmt::Display for ExpandedTooFar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "uncompressed stream larger than {} bytes", self.0)
    }
}

impl std::error::Error for ExpandedTooFar {}

/// Counts the decompressed bytes and fails once more than `max` passed, so
/// a gzip bomb stops after `max` bytes of work, not when the disk is full.
struct ExpandLimit<R> {
    inner: R,
    read: u64,
    max: u64,
}

impl<R: Read> Read for ExpandLimit<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.max {
            return Err(io::Error::other(ExpandedTooFar(self.max)));
        }
        Ok(n)
    }
}

/// Marker error a body reader returns when the body exceeds its limit.
#[derive(Debug)]
pub struct BodyTooLarge(pub u64);

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "body larger than {} bytes", self.0)
    }
}

impl std::error::Error for BodyTooLarge {}

/// A reader that fails with [`BodyTooLarge`] once more than `max` bytes passed.
pub struct LimitedReader<R> {
    inner: R,
    read: u64,
    max: u64,
}

impl<R> LimitedReader<R> {
    pub fn new(inner: R, max: u64) -> Self {
        LimitedReader {
            inner,
            read: 0,
            max,
        }
    }
}

impl<R: Read> Read for LimitedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.max {
            return Err(io::Error::other(BodyTooLarge(self.max)));
        }
        Ok(n)
    }
}

/// What an extraction wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ExtractStats {
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    pub bytes: u64,
    /// Paths a delta's whiteouts removed.
    pub removed: u64,
}

fn classify_read_error(err: io::Error) -> TarError {
    if let Some(too_large) = err.get_ref().and_then(|e| e.downcast_ref::<BodyTooLarge>()) {
        return TarError::TooLarge(too_large.0);
    }
    if let Some(too_far) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<ExpandedTooFar>())
    {
        return TarError::ExpandsTooFar(too_far.0);
    }
    TarError::Format(err)
}

/// Extracts a gzip-compressed tar stream into `root/dest` with the default
/// [`Limits`].
///
/// `root` must be the canonical work dir; `dest` a path already passed through
/// [`paths::clean`]. On error, everything this call created is removed.
pub fn extract<R: Read>(reader: R, root: &Path, dest: &[String]) -> Result<ExtractStats, TarError> {
    extract_with(reader, root, dest, Limits::default())
}

/// [`extract`] with explicit limits on what the archive expands to.
///
/// Files get the time of extraction as their modification time, not the
/// one in the archive: sources of an older commit pushed after a newer one
/// must still look newer than build outputs cached in the work dir, or
/// incremental tools (make, go build's cache keyed on mtimes) skip work.
pub fn extract_with<R: Read>(
    reader: R,
    root: &Path,
    dest: &[String],
    limits: Limits,
) -> Result<ExtractStats, TarError> {
    let root = Root::open(root).map_err(|err| io_err(root, err))?;
    extract_in(reader, &root, dest, limits)
}

/// [`extract_with`] into an already open work dir. Every entry is created
/// relative to a handle on its parent directory ([`crate::beneath`]), so a
/// step swapping a directory for a symlink meanwhile cannot redirect it.
pub fn extract_in<R: Read>(
    reader: R,
    root: &Root,
    dest: &[String],
    limits: Limits,
) -> Result<ExtractStats, TarError> {
    run_extractor(reader, root, dest, limits, false)
}

/// The prefix of a whiteout entry in a delta (`dir/.wh.name` removes
/// `dir/name`), as in OCI image layers.
pub const WHITEOUT: &str = ".wh.";

/// [`extract_in`] for a delta over a tree already in `dest`: an entry
/// `dir/.wh.NAME` removes `dir/NAME` (file, link or whole directory)
/// instead of being written. Whiteouts are confined like every entry.
pub fn extract_delta_in<R: Read>(
    reader: R,
    root: &Root,
    dest: &[String],
    limits: Limits,
) -> Result<ExtractStats, TarError> {
    run_extractor(reader, root, dest, limits, true)
}

fn run_extractor<R: Read>(
    reader: R,
    root: &Root,
    dest: &[String],
    limits: Limits,
    whiteouts: bool,
) -> Result<ExtractStats, TarError> {
    let mut ex = Extractor {
        root,
        created: Vec::new(),
        stats: ExtractStats::default(),
        limits,
        entries: 0,
        whiteouts,
    };
    match ex.run(reader, dest) {
        Ok(()) => Ok(ex.stats),
        Err(e) => {
            ex.undo();
            Err(e)
        }
    }
}

struct Extractor<'a> {
    root: &'a Root,
    /// Paths (components below the root) this extraction created, in
    /// creation order, for cleanup on error.
    created: Vec<Vec<String>>,
    stats: ExtractStats,
    limits: Limits,
    /// Entries seen so far, of any type.
    entries: u64,
    /// `.wh.NAME` entries remove NAME (deltas).
    whiteouts: bool,
}

impl Extractor<'_> {
    fn run<R: Read>(&mut self, reader: R, dest: &[String]) -> Result<(), TarError> {
        self.dir(&dest.join("/"), dest)?;
        let gz = ExpandLimit {
            inner: flate2::read::GzDecoder::new(reader),
            read: 0,
            max: self.limits.max_expanded,
        };
        let mut archive = tar::Archive::new(gz);
        let entries = archive.entries().map_err(classify_read_error)?;
        for entry in entries {
            let mut entry = entry.map_err(classify_read_error)?;
            self.entries += 1;
            if self.entries > self.limits.max_entries {
                return Err(TarError::TooManyEntries(self.limits.max_entries));
            }
            self.entry(&mut entry, dest)?;
        }
        // Drain trailing bytes so a truncated or corrupt gzip tail is noticed
        // and a body limit still applies after the tar end-of-archive marker.
        let mut gz = archive.into_inner();
        io::copy(&mut gz, &mut io::sink()).map_err(classify_read_error)?;
        Ok(())
    }

    /// Opens (creating as needed) the directory at `comps`.
    fn dir(&mut self, name: &str, comps: &[String]) -> Result<Dir, TarError> {
        self.root
            .dir(name, comps, Some(&mut self.created))
            .map_err(|e| dir_err(name, e))
    }

    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        dest: &[String],
    ) -> Result<(), TarError> {
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8(raw).map_err(|e| TarError::Entry {
            entry: String::from_utf8_lossy(e.as_bytes()).into_owned(),
            reason: "name is not valid UTF-8".into(),
        })?;
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(());
        }
        let bad = |reason: &str| TarError::Entry {
            entry: name.clone(),
            reason: reason.to_string(),
        };
        let rel = paths::clean(&name)?;
        let mut comps = dest.to_vec();
        comps.extend(rel.iter().cloned());
        if rel.is_empty() && !kind.is_dir() {
            return Err(bad("names the destination directory itself"));
        }
        if kind.is_dir() {
            let dir = self.dir(&name, &comps)?;
            // The destination directory itself keeps its permissions.
            if !rel.is_empty()
                && let Ok(mode) = entry.header().mode()
            {
                let _ = dir.set_mode((mode & 0o777) | 0o700);
            }
            self.stats.dirs += 1;
            return Ok(());
        }
        let (parent_comps, last) = comps.split_at(comps.len() - 1);
        let last = &last[0];
        let parent = self.dir(&name, parent_comps)?;
        let ioe = |err| io_err(Path::new(&name), err);
        if self.whiteouts
            && let Some(gone) = last.strip_prefix(WHITEOUT)
        {
            if gone.is_empty() || gone == "." || gone == ".." || gone.contains('/') {
                return Err(bad("whiteout without a name"));
            }
            match parent.lstat(gone) {
                Ok(Some(_)) => parent.remove_all(gone).map_err(ioe)?,
                Ok(None) => {}
                Err(err) => return Err(ioe(err)),
            }
            self.stats.removed += 1;
            return Ok(());
        }
        if kind.is_file() || kind == tar::EntryType::Continuous {
            self.make_room(&parent, last, &name)?;
            let mut f = parent.create_new(last, 0o600).map_err(ioe)?;
            self.created.push(comps.clone());
            let n = copy_entry(entry, &mut f, Path::new(&name))?;
            // The header's mtime is ignored on purpose; see `extract_with`.
            if let Ok(mode) = entry.header().mode() {
                set_file_mode(&f, mode & 0o777);
            }
            drop(f);
            self.stats.files += 1;
            self.stats.bytes += n;
            Ok(())
        } else if kind.is_symlink() {
            let link = entry
                .link_name()
                .map_err(classify_read_error)?
                .ok_or_else(|| bad("symbolic link without a target"))?
                .into_owned();
            let depth = self
                .root
                .depth(&parent)
                .map_err(ioe)?
                .ok_or_else(|| bad("link directory is outside the work dir"))?;
            paths::check_link_depth(&name, depth, &link)?;
            self.make_room(&parent, last, &name)?;
            parent
                .symlink(&link, last)
                .map_err(|err| match err.kind() {
                    io::ErrorKind::Unsupported => {
                        bad("symbolic links are not supported on this system")
                    }
                    _ => ioe(err),
                })?;
            self.created.push(comps.clone());
            self.stats.links += 1;
            Ok(())
        } else if kind.is_hard_link() {
            let link = entry
                .link_name_bytes()
                .ok_or_else(|| bad("hard link without a target"))?
                .into_owned();
            let link =
                String::from_utf8(link).map_err(|_| bad("hard link target is not valid UTF-8"))?;
            let link_rel =
                paths::clean(&link).map_err(|e| bad(&format!("hard link target {e}")))?;
            let mut link_comps = dest.to_vec();
            link_comps.extend(link_rel);
            let not_file = || {
                bad(&format!(
                    "hard link target {link:?} is not a regular file already in the tree"
                ))
            };
            let Some((src_name, src_parent_comps)) = link_comps.split_last() else {
                return Err(not_file());
            };
            let src_dir = match self.root.dir(&link, src_parent_comps, None) {
                Ok(d) => d,
                Err(DirError::Path(e)) => return Err(bad(&format!("hard link target {e}"))),
                Err(DirError::Io(_)) => return Err(not_file()),
            };
            let src = match src_dir.lstat(src_name) {
                Ok(Some(st)) if st.kind == Kind::File => st,
                _ => return Err(not_file()),
            };
            if let Ok(Some(existing)) = parent.lstat(last)
                && existing.id == src.id
                && src.id != (0, 0)
            {
                return Err(bad("hard link points to itself"));
            }
            if src_parent_comps == parent_comps && src_name == last {
                return Err(bad("hard link points to itself"));
            }
            self.make_room(&parent, last, &name)?;
            parent.hard_link(&src_dir, src_name, last).map_err(ioe)?;
            self.created.push(comps.clone());
            self.stats.links += 1;
            Ok(())
        } else if kind.is_character_special() || kind.is_block_special() {
            Err(bad("device files are not allowed"))
        } else if kind.is_fifo() {
            Err(bad("named pipes are not allowed"))
        } else {
            Err(bad(&format!(
                "unsupported entry type {:?}",
                kind.as_byte() as char
            )))
        }
    }

    /// Removes a file or link that an entry replaces; refuses to replace a directory.
    fn make_room(&mut self, parent: &Dir, last: &str, name: &str) -> Result<(), TarError> {
        match parent.lstat(last) {
            Ok(Some(st)) if st.kind == Kind::Dir => Err(TarError::Entry {
                entry: name.to_string(),
                reason: "a directory already exists at this path".into(),
            }),
            Ok(Some(_)) => parent
                .unlink(last)
                .map_err(|err| io_err(Path::new(name), err)),
            Ok(None) => Ok(()),
            Err(err) => Err(io_err(Path::new(name), err)),
        }
    }

    /// Removes what this extraction created, newest first. Each path is
    /// opened through the root again, so the cleanup is confined as well.
    fn undo(&mut self) {
        for p in self.created.drain(..).rev() {
            let Some((last, parent)) = p.split_last() else {
                continue;
            };
            if let Ok(dir) = self.root.dir("", parent, None) {
                let _ = dir.remove_all(last);
            }
        }
    }
}

fn dir_err(name: &str, e: DirError) -> TarError {
    match e {
        DirError::Path(p) => TarError::Path(p),
        DirError::Io(err) => io_err(Path::new(name), err),
    }
}

#[cfg(unix)]
fn set_file_mode(f: &fs::File, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = f.set_permissions(fs::Permissions::from_mode(mode));
}

#[cfg(not(unix))]
fn set_file_mode(_f: &fs::File, _mode: u32) {}

fn copy_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    f: &mut fs::File,
    path: &Path,
) -> Result<u64, TarError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(classify_read_error(e)),
        };
        f.write_all(&buf[..n]).map_err(|err| io_err(path, err))?;
        total += n as u64;
    }
    let want = entry.header().size().unwrap_or(total);
    if total != want {
        return Err(TarError::Format(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "entry {} ended after {total} of {want} bytes",
                path.display()
            ),
        )));
    }
    Ok(total)
}

fn io_err(path: &Path, err: io::Error) -> TarError {
    TarError::Io {
        path: path.to_path_buf(),
        err,
    }
}

/// Writes a gzip-compressed tar of `dir` to `out`, entries named relative to
/// `dir` and sorted, symbolic links stored as links. Sockets and other special
/// files are skipped.
pub fn pack<W: Write>(dir: &Path, out: W, level: u32) -> io::Result<W> {
    let mut builder = packer(out, level);
    walk(dir, Path::new(""), &[], &mut |full, rel, meta| {
        let ft = meta.file_type();
        if ft.is_dir() || ft.is_file() || ft.is_symlink() {
            builder.append_path_with_name(full, rel)?;
        }
        Ok(())
    })?;
    builder.into_inner()?.finish()
}

/// A tar.gz writer that stores symlinks as links: following one would
/// archive whatever it points at, outside the work dir too (a build may
/// swap a file for a link between the check and the packing).
fn packer<W: Write>(out: W, level: u32) -> tar::Builder<flate2::write::GzEncoder<W>> {
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::new(level.min(9)));
    let mut builder = tar::Builder::new(gz);
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    builder
}

/// Writes a tar.gz of the one regular file `path`, named by its file name.
pub fn pack_file<W: Write>(path: &Path, out: W, level: u32) -> io::Result<W> {
    let mut builder = packer(out, level);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "a file has a name"))?;
    builder.append_path_with_name(path, name)?;
    builder.into_inner()?.finish()
}

/// Walks `dir` depth-first in name order without following links, calling `f`
/// with each entry's full path, relative path and metadata. Relative paths in
/// `skip` (and everything below them) are left out.
pub fn walk(
    dir: &Path,
    rel: &Path,
    skip: &[PathBuf],
    f: &mut dyn FnMut(&Path, &Path, &fs::Metadata) -> io::Result<()>,
) -> io::Result<()> {
    let mut names: Vec<_> = fs::read_dir(dir)?.collect::<io::Result<Vec<_>>>()?;
    names.sort_by_key(|e| e.file_name());
    for e in names {
        let full = e.path();
        let rel = rel.join(e.file_name());
        if skip.iter().any(|s| s == &rel) {
            continue;
        }
        let meta = fs::symlink_metadata(&full)?;
        f(&full, &rel, &meta)?;
        if meta.is_dir() {
            walk(&full, &rel, skip, f)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex_bytes(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// Found by the tar_extract fuzz target: a base-256 mtime of 2^63+
    /// overflowed `SystemTime` and panicked, skipping the cleanup. (Header
    /// mtimes are now ignored altogether.)
    #[test]
    fn huge_mtime_is_not_a_panic() {
        let tgz = hex_bytes(
            "1f8b08008e9a046b02ff4b63a03d300002331313300d04e83498ddf01f010c0c8dcc4c0d18140ce8e03686d2e292c422a0531846c1281805a360640100d4b4f72a00060000",
        );
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let stats = extract(&tgz[..], &root, &[]).unwrap();
        assert_eq!(stats.files, 1);
        let mtime = fs::metadata(root.join("f")).unwrap().modified().unwrap();
        assert!(mtime <= std::time::SystemTime::now());
    }

    #[test]
    fn hard_link_to_itself_is_refused() {
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(1);
        h.set_path("a").unwrap();
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Link);
        h.set_size(0);
        h.set_path("a").unwrap();
        h.set_link_name("a").unwrap();
        h.set_cksum();
        b.append(&h, &b""[..]).unwrap();
        let tgz = b.into_inner().unwrap().finish().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let err = extract(&tgz[..], &root, &[]).unwrap_err();
        assert!(err.is_client_error(), "{err}");
        assert!(err.to_string().contains("itself"), "{err}");
        assert_eq!(
            fs::read_dir(&root).unwrap().count(),
            0,
            "partial extraction left behind"
        );
    }

    #[cfg(unix)]
    #[test]
    fn dot_entry_keeps_destination_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o777);
        h.set_path("./").unwrap();
        h.set_cksum();
        b.append(&h, &b""[..]).unwrap();
        let tgz = b.into_inner().unwrap().finish().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        extract(&tgz[..], &root, &[]).unwrap();
        assert_eq!(
            fs::metadata(&root).unwrap().permissions().mode() & 0o777,
            0o755
        );
    }
}
