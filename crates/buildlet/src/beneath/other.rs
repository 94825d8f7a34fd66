//! The fallback off Unix (Windows): operations by path name after
//! [`crate::paths`] checks; no handle-relative guarantee while a step swaps
//! directories for links.

//! Name-based fallback: the checks of `paths::resolve`, then std::fs.
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use super::{DirError, Kind, Stat};
use crate::paths;

pub struct Root {
    dir: Dir,
}

pub struct Dir {
    path: PathBuf,
}

fn stat_of(m: &fs::Metadata) -> Stat {
    let ft = m.file_type();
    let kind = if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File
    } else {
        Kind::Other
    };
    Stat { kind, id: (0, 0) }
}

impl Root {
    pub fn open(path: &Path) -> io::Result<Root> {
        if !fs::metadata(path)?.is_dir() {
            return Err(io::Error::other("not a directory"));
        }
        Ok(Root {
            dir: Dir {
                path: path.to_path_buf(),
            },
        })
    }

    pub fn reopen(path: &Path, _id: (u64, u64)) -> io::Result<Root> {
        Root::open(path)
    }

    pub fn id(&self) -> (u64, u64) {
        (0, 0)
    }

    pub fn as_dir(&self) -> &Dir {
        &self.dir
    }

    pub fn dir(
        &self,
        display: &str,
        comps: &[String],
        created: Option<&mut Vec<Vec<String>>>,
    ) -> Result<Dir, DirError> {
        let path = paths::resolve(&self.dir.path, display, comps, true).map_err(DirError::Path)?;
        if let Some(list) = created {
            let mut missing = Vec::new();
            let mut cur = path.as_path();
            while cur != self.dir.path && fs::symlink_metadata(cur).is_err() {
                missing.push(cur.to_path_buf());
                match cur.parent() {
                    Some(p) => cur = p,
                    None => break,
                }
            }
            for d in missing.into_iter().rev() {
                fs::create_dir(&d).map_err(DirError::Io)?;
                if let Ok(rel) = d.strip_prefix(&self.dir.path) {
                    list.push(
                        rel.components()
                            .map(|c| c.as_os_str().to_string_lossy().into_owned())
                            .collect(),
                    );
                }
            }
        }
        match fs::metadata(&path) {
            Ok(m) if m.is_dir() => Ok(Dir { path }),
            Ok(_) => Err(DirError::Io(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a directory",
            ))),
            Err(e) => Err(DirError::Io(e)),
        }
    }

    pub fn depth(&self, dir: &Dir) -> io::Result<Option<usize>> {
        Ok(dir
            .path
            .strip_prefix(&self.dir.path)
            .ok()
            .map(|r| r.components().count()))
    }
}

/// Clears read-only attributes below `dir` so it can be removed.
fn make_writable(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if let Ok(m) = e.metadata() {
                let mut p = m.permissions();
                #[allow(clippy::permissions_set_readonly_false)]
                p.set_readonly(false);
                let _ = fs::set_permissions(e.path(), p);
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                make_writable(&e.path());
            }
        }
    }
}

impl Dir {
    pub fn lstat(&self, name: &str) -> io::Result<Option<Stat>> {
        self.lstat_os(std::ffi::OsStr::new(name))
    }

    pub fn create_new(&self, name: &str, _mode: u32) -> io::Result<File> {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(self.path.join(name))
    }

    pub fn open_dir(&self, name: &str) -> io::Result<Dir> {
        Ok(Dir {
            path: self.path.join(name),
        })
    }

    pub fn mkdir(&self, name: &str) -> io::Result<()> {
        fs::create_dir(self.path.join(name))
    }

    pub fn symlink(&self, _target: &Path, _name: &str) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "symlinks unsupported",
        ))
    }

    pub fn hard_link(&self, src_dir: &Dir, src_name: &str, name: &str) -> io::Result<()> {
        fs::hard_link(src_dir.path.join(src_name), self.path.join(name))
    }

    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.move_to(from, self, to)
    }

    pub fn move_to(&self, from: &str, dest: &Dir, to: &str) -> io::Result<()> {
        fs::rename(self.path.join(from), dest.path.join(to))
    }

    pub fn unlink(&self, name: &str) -> io::Result<()> {
        fs::remove_file(self.path.join(name))
    }

    pub fn set_mode(&self, _mode: u32) -> io::Result<()> {
        Ok(())
    }

    pub fn names(&self) -> io::Result<Vec<String>> {
        fs::read_dir(&self.path)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect()
    }

    pub fn names_os(&self) -> io::Result<Vec<std::ffi::OsString>> {
        fs::read_dir(&self.path)?
            .map(|e| e.map(|e| e.file_name()))
            .collect()
    }

    pub fn lstat_os(&self, name: &std::ffi::OsStr) -> io::Result<Option<Stat>> {
        match fs::symlink_metadata(self.path.join(name)) {
            Ok(m) => Ok(Some(stat_of(&m))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn open_dir_restored(&self, name: &std::ffi::OsStr) -> io::Result<Dir> {
        Ok(Dir {
            path: self.path.join(name),
        })
    }

    pub fn remove_all(&self, name: &str) -> io::Result<()> {
        self.remove_all_os(std::ffi::OsStr::new(name))
    }

    pub fn remove_all_os(&self, name: &std::ffi::OsStr) -> io::Result<()> {
        let p = self.path.join(name);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&p).or_else(|_| {
                make_writable(&p);
                fs::remove_dir_all(&p)
            }),
            Ok(_) => fs::remove_file(&p),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn empty(&self) -> io::Result<()> {
        for n in self.names_os()? {
            self.remove_all_os(&n)?;
        }
        Ok(())
    }
}
