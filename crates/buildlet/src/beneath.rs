//! File operations confined to the work dir by construction.
//!
//! Checking a path and then using it by name is a race: a step running in
//! the work dir can swap a directory for a symlink to `/` between the check
//! and the write. So on Unix every write goes through directory handles:
//! [`Root::dir`] opens a directory below the root without ever leaving it,
//! and entries are then created, replaced and removed with the `*at` calls
//! relative to that handle, never following a symlink in the last component.
//! A concurrent swap can make an operation fail; it cannot make it land
//! outside.
//!
//! [`Root::dir`] follows symlinks that stay inside the root, as
//! [`crate::paths::resolve`] does. On Linux it asks the kernel
//! (`openat2` with `RESOLVE_BENEATH`); on older kernels and other Unix it
//! walks one component at a time with `openat(O_NOFOLLOW)`, reading each
//! symlink with `readlinkat` and resolving `..` against the handles it
//! holds. Other platforms keep the name-based checks of [`crate::paths`].

use std::io;

use crate::paths::PathError;

/// Why a directory could not be opened.
#[derive(Debug)]
pub enum DirError {
    /// The path leads outside the work dir or loops; the request's fault.
    Path(PathError),
    /// The file system said no (missing, not a directory, name too long...).
    Io(io::Error),
}

/// What an entry is, without following a symlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Other,
}

/// An entry's type and identity (device and inode where there are such).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub kind: Kind,
    pub id: (u64, u64),
}

pub use imp::{Dir, Root};

/// The longest symlink chain followed, as Linux does.
const MAX_LINK_HOPS: usize = 40;

#[cfg(unix)]
#[path = "beneath/unix.rs"]
mod imp;

#[cfg(not(unix))]
#[path = "beneath/other.rs"]
mod imp;

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn comps(p: &str) -> Vec<String> {
        crate::paths::clean(p).unwrap()
    }

    /// The kernel's openat2 and the component walk agree, and both refuse
    /// every way out.
    #[test]
    fn dir_follows_inner_links_and_refuses_outer() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().canonicalize().unwrap();
        let wd = base.join("wd");
        std::fs::create_dir_all(wd.join("real/sub")).unwrap();
        std::fs::create_dir_all(base.join("outside")).unwrap();
        symlink("real", wd.join("inner")).unwrap();
        symlink("..", wd.join("real/up")).unwrap();
        symlink("../..", wd.join("real/out")).unwrap();
        symlink("/etc", wd.join("abs")).unwrap();
        symlink("loop2", wd.join("loop1")).unwrap();
        symlink("loop1", wd.join("loop2")).unwrap();
        std::fs::write(wd.join("file"), b"x").unwrap();
        let root = Root::open(&wd).unwrap();
        let walk = |p: &str| root.walk(p, &comps(p), None);
        for p in ["inner/sub", "real/up/real", "real/up/inner/sub"] {
            let a = root.dir(p, &comps(p), None).unwrap();
            let b = walk(p).unwrap();
            assert_eq!(root.depth(&a).unwrap(), root.depth(&b).unwrap(), "{p}");
        }
        assert_eq!(root.depth(&walk("inner/sub").unwrap()).unwrap(), Some(2));
        for p in ["real/out", "real/out/outside", "abs", "real/up/real/out"] {
            assert!(
                matches!(root.dir(p, &comps(p), None), Err(DirError::Path(_))),
                "openat2 {p}"
            );
            assert!(matches!(walk(p), Err(DirError::Path(_))), "walk {p}");
        }
        assert!(matches!(walk("loop1"), Err(DirError::Path(_))));
        assert!(matches!(walk("file"), Err(DirError::Io(_))));
        // Creation through an inner link lands inside, recorded physically.
        let mut created = Vec::new();
        root.walk(
            "inner/new/deeper",
            &comps("inner/new/deeper"),
            Some(&mut created),
        )
        .unwrap();
        assert!(wd.join("real/new/deeper").is_dir());
        assert_eq!(created, vec![comps("real/new"), comps("real/new/deeper")]);
        // remove_all never follows a link.
        root.as_dir().remove_all("real").unwrap();
        assert!(base.join("outside").is_dir());
    }
}
