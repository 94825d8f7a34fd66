//! Keeping every path inside the work dir.
//!
//! The buildlet runs whatever the coordinator asks, but file operations must
//! never touch anything outside its work dir, whatever a request or a tar
//! entry says. Two layers enforce that:
//!
//! * [`clean`] rejects a client-supplied path unless it is relative and free of
//!   `..`, absolute roots, drive prefixes, backslashes and NUL bytes.
//! * [`resolve`] walks the cleaned path on disk one component at a time,
//!   following symbolic links *inside* the work dir and failing as soon as a
//!   link would lead out of it, so a link planted earlier cannot redirect a
//!   later write.
//!
//! Symbolic links created from tarballs are limited by [`check_link_target`].

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

/// Why a path was refused; the message names the path.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("path {path:?}: {reason}")]
pub struct PathError {
    pub path: String,
    pub reason: String,
}

impl PathError {
    fn new(path: &str, reason: impl Into<String>) -> PathError {
        PathError {
            path: path.to_string(),
            reason: reason.into(),
        }
    }
}

/// The longest symlink chain [`resolve`] follows, as Linux does.
const MAX_LINK_HOPS: usize = 40;

/// Validates a relative, `/`-separated path from a request or tar entry and
/// returns its components (`.` removed). An empty path or `.` yields no
/// components, meaning the base directory itself.
pub fn clean(path: &str) -> Result<Vec<String>, PathError> {
    if path.contains('\0') {
        return Err(PathError::new(path, "contains a NUL byte"));
    }
    if path.contains('\\') {
        return Err(PathError::new(
            path,
            "contains a backslash; use / as the separator",
        ));
    }
    if path.starts_with('/') {
        return Err(PathError::new(
            path,
            "is absolute; paths must be relative to the work dir",
        ));
    }
    let bytes = path.as_bytes();
    if bytes.len() >= 2 && bytes[1] == b':' && bytes[0].is_ascii_alphabetic() {
        return Err(PathError::new(path, "has a drive prefix"));
    }
    let mut out = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(PathError::new(
                    path,
                    "contains '..' and would escape the work dir",
                ));
            }
            p => out.push(p.to_string()),
        }
    }
    Ok(out)
}

/// Resolves `components` below `root` on disk, following symlinks that stay
/// inside `root`. With `follow_last == false` a final symlink is not followed
/// (the caller wants the link itself, e.g. to replace or remove it).
///
/// `root` must be an absolute, canonical directory. The returned path is
/// absolute and inside `root`; components that do not exist yet are appended
/// as given.
pub fn resolve(
    root: &Path,
    display: &str,
    components: &[String],
    follow_last: bool,
) -> Result<PathBuf, PathError> {
    let mut stack: Vec<OsString> = Vec::new();
    let mut pending: std::collections::VecDeque<OsString> =
        components.iter().map(OsString::from).collect();
    let mut hops = 0usize;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            if stack.pop().is_none() {
                return Err(PathError::new(
                    display,
                    "goes through a symbolic link that leads outside the work dir",
                ));
            }
            continue;
        }
        let is_last = pending.is_empty();
        let mut candidate = root.to_path_buf();
        candidate.extend(stack.iter());
        candidate.push(&part);
        if is_last && !follow_last {
            stack.push(part);
            break;
        }
        match std::fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_LINK_HOPS {
                    return Err(PathError::new(display, "too many levels of symbolic links"));
                }
                let target = std::fs::read_link(&candidate).map_err(|e| {
                    PathError::new(display, format!("cannot read symbolic link: {e}"))
                })?;
                let mut prefix = Vec::new();
                for c in target.components() {
                    match c {
                        Component::Normal(n) => prefix.push(n.to_os_string()),
                        Component::ParentDir => prefix.push(OsString::from("..")),
                        Component::CurDir => {}
                        Component::RootDir | Component::Prefix(_) => {
                            return Err(PathError::new(
                                display,
                                "goes through a symbolic link to an absolute path outside the work dir",
                            ));
                        }
                    }
                }
                for p in prefix.into_iter().rev() {
                    pending.push_front(p);
                }
            }
            _ => stack.push(part),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(stack);
    Ok(out)
}

/// Checks a symlink target from a tar entry: it must be relative, may climb
/// with leading `..` no higher than the link's own directory depth below
/// `root`, and must not contain `..` after a normal component (such a target's
/// meaning could later change when that component becomes a link itself).
///
/// `link_dir` is the resolved, physical directory the link is created in.
pub fn check_link_target(
    root: &Path,
    entry: &str,
    link_dir: &Path,
    target: &Path,
) -> Result<(), PathError> {
    let depth = link_dir
        .strip_prefix(root)
        .map_err(|_| PathError::new(entry, "link directory is outside the work dir"))?
        .components()
        .count();
    check_link_depth(entry, depth, target)
}

/// [`check_link_target`] for a link created `depth` directories below the
/// work dir (as measured on an open directory handle).
pub fn check_link_depth(entry: &str, depth: usize, target: &Path) -> Result<(), PathError> {
    let mut ups = 0usize;
    let mut seen_normal = false;
    for c in target.components() {
        match c {
            Component::ParentDir if !seen_normal => ups += 1,
            Component::ParentDir => {
                return Err(PathError::new(
                    entry,
                    format!(
                        "symbolic link target {:?} has '..' after a name",
                        target.display()
                    ),
                ));
            }
            Component::Normal(_) => seen_normal = true,
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(PathError::new(
                    entry,
                    format!(
                        "symbolic link target {:?} is absolute and points outside the work dir",
                        target.display()
                    ),
                ));
            }
        }
    }
    if ups > depth {
        return Err(PathError::new(
            entry,
            format!(
                "symbolic link target {:?} points outside the work dir",
                target.display()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_accepts_relative() {
        assert_eq!(clean("a/b/./c").unwrap(), vec!["a", "b", "c"]);
        assert_eq!(clean("").unwrap(), Vec::<String>::new());
        assert_eq!(clean(".").unwrap(), Vec::<String>::new());
        assert_eq!(clean("a//b/").unwrap(), vec!["a", "b"]);
    }

    #[test]
    fn clean_rejects_escapes() {
        for bad in [
            "/etc", "..", "a/../..", "a/..", "../x", "C:/x", "a\\b", "a\0b",
        ] {
            let err = clean(bad).unwrap_err();
            assert_eq!(err.path, bad, "{err}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn resolve_follows_inner_links_and_refuses_outer() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("real/sub")).unwrap();
        std::os::unix::fs::symlink("real", root.join("inner")).unwrap();
        std::os::unix::fs::symlink("..", root.join("real/up")).unwrap();
        std::os::unix::fs::symlink("../..", root.join("real/out")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("abs")).unwrap();

        let p = resolve(&root, "inner/sub", &clean("inner/sub").unwrap(), true).unwrap();
        assert_eq!(p, root.join("real/sub"));
        let p = resolve(&root, "real/up/x", &clean("real/up/x").unwrap(), true).unwrap();
        assert_eq!(p, root.join("x"));
        assert!(resolve(&root, "real/out/x", &clean("real/out/x").unwrap(), true).is_err());
        assert!(resolve(&root, "abs/passwd", &clean("abs/passwd").unwrap(), true).is_err());
        let p = resolve(&root, "abs", &clean("abs").unwrap(), false).unwrap();
        assert_eq!(p, root.join("abs"));
    }

    #[test]
    fn link_targets() {
        let root = Path::new("/w");
        assert!(check_link_target(root, "e", Path::new("/w/a/b"), Path::new("../../x")).is_ok());
        assert!(
            check_link_target(root, "e", Path::new("/w/a/b"), Path::new("../../../x")).is_err()
        );
        assert!(check_link_target(root, "e", Path::new("/w"), Path::new("x/../..")).is_err());
        assert!(check_link_target(root, "e", Path::new("/w"), Path::new("x/..")).is_err());
        assert!(check_link_target(root, "e", Path::new("/w"), Path::new("/etc")).is_err());
        assert!(check_link_target(root, "e", Path::new("/w"), Path::new("./x/y")).is_ok());
    }
}
