//! Directory handles on Unix: `openat2(RESOLVE_BENEATH)` on Linux kernels
//! that have it, else a walk of `openat(O_NOFOLLOW)` and `readlinkat` that
//! follows only symlinks staying inside; entries are created, replaced and
//! removed with `*at` calls relative to the handle.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::{DirError, Kind, MAX_LINK_HOPS, Stat};
use crate::paths::PathError;

/// The work dir, held open.
pub struct Root {
    dir: Dir,
    id: (u64, u64),
}

/// An open directory inside the work dir.
pub struct Dir {
    fd: OwnedFd,
}

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

const DIR_FLAGS: libc::c_int =
    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;

fn openat(dirfd: libc::c_int, name: &CStr, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: name is NUL-terminated; the returned fd is owned below.
        let fd = unsafe { libc::openat(dirfd, name.as_ptr(), flags, mode as libc::c_uint) };
        if fd >= 0 {
            // SAFETY: fd was just opened and is owned by nobody else.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn fstat(fd: libc::c_int) -> io::Result<libc::stat> {
    // SAFETY: st is written by fstat before being read.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        check(libc::fstat(fd, &mut st))?;
        Ok(st)
    }
}

fn to_stat(st: &libc::stat) -> Stat {
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFREG => Kind::File,
        libc::S_IFLNK => Kind::Symlink,
        _ => Kind::Other,
    };
    #[allow(clippy::unnecessary_cast)]
    Stat {
        kind,
        id: (st.st_dev as u64, st.st_ino as u64),
    }
}

fn outside(display: &str) -> DirError {
    DirError::Path(PathError {
        path: display.to_string(),
        reason: "goes through a symbolic link that leads outside the work dir".into(),
    })
}

fn too_many_links(display: &str) -> DirError {
    DirError::Path(PathError {
        path: display.to_string(),
        reason: "too many levels of symbolic links".into(),
    })
}

impl Root {
    /// Opens the work dir `path` (which must not be a symlink itself).
    pub fn open(path: &Path) -> io::Result<Root> {
        let c = cstr(path.as_os_str())?;
        let fd = openat(libc::AT_FDCWD, &c, DIR_FLAGS, 0)?;
        let id = to_stat(&fstat(fd.as_raw_fd())?).id;
        Ok(Root {
            dir: Dir { fd },
            id,
        })
    }

    /// Opens the work dir again by name for one request, refusing a work
    /// dir that was replaced since the buildlet started (a step could
    /// have put a symlink to `/` in its place).
    pub fn reopen(path: &Path, id: (u64, u64)) -> io::Result<Root> {
        let r = Root::open(path)?;
        if r.id != id {
            return Err(io::Error::other(format!(
                "the work dir {} was replaced since the buildlet started",
                path.display()
            )));
        }
        Ok(r)
    }

    /// Device and inode of the work dir.
    pub fn id(&self) -> (u64, u64) {
        self.id
    }

    /// The work dir itself.
    pub fn as_dir(&self) -> &Dir {
        &self.dir
    }

    /// Opens the directory at `comps` below the root, following symlinks
    /// that stay inside. With `created`, missing directories are made and
    /// their paths (physical, from the root) appended to it.
    pub fn dir(
        &self,
        display: &str,
        comps: &[String],
        created: Option<&mut Vec<Vec<String>>>,
    ) -> Result<Dir, DirError> {
        if comps.is_empty() {
            return self.dir.try_clone().map_err(DirError::Io);
        }
        #[cfg(target_os = "linux")]
        match openat2_beneath(self.dir.fd.as_raw_fd(), comps) {
            Some(Ok(fd)) => return Ok(Dir { fd }),
            Some(Err(e)) => match e.raw_os_error() {
                Some(libc::EXDEV) => return Err(outside(display)),
                Some(libc::ELOOP) => return Err(too_many_links(display)),
                Some(libc::ENOENT) if created.is_some() => {}
                Some(libc::EAGAIN) => {}
                _ => return Err(DirError::Io(e)),
            },
            None => {}
        }
        self.walk(display, comps, created)
    }

    /// The component-by-component walk: each step is `openat` with
    /// `O_NOFOLLOW` relative to the handle of the step before; a symlink
    /// is read and its target walked instead; `..` returns to a handle
    /// already held and fails at the root.
    pub(super) fn walk(
        &self,
        display: &str,
        comps: &[String],
        mut created: Option<&mut Vec<Vec<String>>>,
    ) -> Result<Dir, DirError> {
        let mut pending: std::collections::VecDeque<Vec<u8>> =
            comps.iter().map(|c| c.as_bytes().to_vec()).collect();
        let mut stack: Vec<(OwnedFd, Vec<u8>)> = Vec::new();
        let mut cur = self.dir.try_clone().map_err(DirError::Io)?.fd;
        let mut hops = 0usize;
        let mut retries = 0usize;
        while let Some(part) = pending.pop_front() {
            if part.is_empty() || part == b"." {
                continue;
            }
            if part == b".." {
                match stack.pop() {
                    Some((fd, _)) => cur = fd,
                    None => return Err(outside(display)),
                }
                continue;
            }
            let c = cstr(OsStr::from_bytes(&part)).map_err(DirError::Io)?;
            match openat(cur.as_raw_fd(), &c, DIR_FLAGS, 0) {
                Ok(fd) => {
                    let parent = std::mem::replace(&mut cur, fd);
                    stack.push((parent, part));
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ELOOP | libc::ENOTDIR | libc::EMLINK)
                    ) =>
                {
                    let Ok(target) = readlinkat(cur.as_raw_fd(), &c) else {
                        return Err(DirError::Io(e));
                    };
                    hops += 1;
                    if hops > MAX_LINK_HOPS {
                        return Err(too_many_links(display));
                    }
                    if target.first() == Some(&b'/') {
                        return Err(outside(display));
                    }
                    for p in target.split(|b| *b == b'/').rev() {
                        pending.push_front(p.to_vec());
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) && created.is_some() => {
                    retries += 1;
                    if retries > 100 {
                        return Err(DirError::Io(e));
                    }
                    // SAFETY: c is NUL-terminated.
                    let r = unsafe { libc::mkdirat(cur.as_raw_fd(), c.as_ptr(), 0o777) };
                    if r == 0 {
                        if let Some(list) = created.as_deref_mut() {
                            let mut p: Vec<String> = stack
                                .iter()
                                .map(|(_, n)| String::from_utf8_lossy(n).into_owned())
                                .collect();
                            p.push(String::from_utf8_lossy(&part).into_owned());
                            list.push(p);
                        }
                    } else {
                        let e = io::Error::last_os_error();
                        if e.raw_os_error() != Some(libc::EEXIST) {
                            return Err(DirError::Io(e));
                        }
                    }
                    // Open what is there now (ours, or a racer's: then
                    // the checks above apply to it).
                    pending.push_front(part);
                }
                Err(e) => return Err(DirError::Io(e)),
            }
        }
        Ok(Dir { fd: cur })
    }

    /// How many levels `dir` is below the root, found by walking `..`;
    /// `None` when the walk reaches `/` without meeting the root.
    pub fn depth(&self, dir: &Dir) -> io::Result<Option<usize>> {
        let mut cur = dir.try_clone()?.fd;
        let dotdot = c"..";
        for depth in 0..4096 {
            let st = to_stat(&fstat(cur.as_raw_fd())?);
            if st.id == self.id {
                return Ok(Some(depth));
            }
            let up = openat(cur.as_raw_fd(), dotdot, DIR_FLAGS, 0)?;
            if to_stat(&fstat(up.as_raw_fd())?).id == st.id {
                return Ok(None);
            }
            cur = up;
        }
        Ok(None)
    }
}

fn readlinkat(dirfd: libc::c_int, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: buf is valid for buf.len() bytes.
    let n = unsafe { libc::readlinkat(dirfd, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// `openat2(dirfd, comps, RESOLVE_BENEATH)`; `None` when the kernel has
/// no openat2 (before 5.6) or a sandbox forbids it.
#[cfg(target_os = "linux")]
fn openat2_beneath(dirfd: libc::c_int, comps: &[String]) -> Option<io::Result<OwnedFd>> {
    use std::sync::atomic::{AtomicBool, Ordering};
    static UNSUPPORTED: AtomicBool = AtomicBool::new(false);
    if UNSUPPORTED.load(Ordering::Relaxed) {
        return None;
    }
    let path = match CString::new(comps.join("/")) {
        Ok(p) => p,
        Err(_) => return Some(Err(io::Error::from_raw_os_error(libc::EINVAL))),
    };
    // SAFETY: open_how is plain data; zeroed is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    loop {
        // SAFETY: path and how outlive the call; the size is how's.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dirfd,
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            // SAFETY: a new fd owned by nobody else.
            return Some(Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) }));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ENOSYS | libc::EPERM | libc::E2BIG) => {
                UNSUPPORTED.store(true, Ordering::Relaxed);
                return None;
            }
            _ => return Some(Err(e)),
        }
    }
}

impl Dir {
    fn try_clone(&self) -> io::Result<Dir> {
        Ok(Dir {
            fd: self.fd.try_clone()?,
        })
    }

    /// The entry `name`, not following a symlink; `None` if missing.
    pub fn lstat(&self, name: &str) -> io::Result<Option<Stat>> {
        self.lstat_c(&cstr(OsStr::new(name))?)
    }

    fn lstat_c(&self, c: &CStr) -> io::Result<Option<Stat>> {
        // SAFETY: st is written by fstatat before being read.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            let r = libc::fstatat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            );
            if r < 0 {
                let e = io::Error::last_os_error();
                return if e.kind() == io::ErrorKind::NotFound {
                    Ok(None)
                } else {
                    Err(e)
                };
            }
            Ok(Some(to_stat(&st)))
        }
    }

    /// Creates the regular file `name`, failing if anything (even a
    /// dangling symlink) is there.
    pub fn create_new(&self, name: &str, mode: u32) -> io::Result<File> {
        let c = cstr(OsStr::new(name))?;
        let fd = openat(
            self.fd.as_raw_fd(),
            &c,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode,
        )?;
        Ok(File::from(fd))
    }

    /// Opens the sub-directory `name`, which must not be a symlink.
    pub fn open_dir(&self, name: &str) -> io::Result<Dir> {
        let c = cstr(OsStr::new(name))?;
        Ok(Dir {
            fd: openat(self.fd.as_raw_fd(), &c, DIR_FLAGS, 0)?,
        })
    }

    pub fn mkdir(&self, name: &str) -> io::Result<()> {
        let c = cstr(OsStr::new(name))?;
        // SAFETY: c is NUL-terminated.
        check(unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), 0o777) }).map(drop)
    }

    pub fn symlink(&self, target: &Path, name: &str) -> io::Result<()> {
        let t = cstr(target.as_os_str())?;
        let c = cstr(OsStr::new(name))?;
        // SAFETY: both strings are NUL-terminated.
        check(unsafe { libc::symlinkat(t.as_ptr(), self.fd.as_raw_fd(), c.as_ptr()) }).map(drop)
    }

    /// Hard-links `src_dir/src_name` (a symlink is linked as itself,
    /// never followed) as `name` here.
    pub fn hard_link(&self, src_dir: &Dir, src_name: &str, name: &str) -> io::Result<()> {
        let s = cstr(OsStr::new(src_name))?;
        let c = cstr(OsStr::new(name))?;
        // SAFETY: both strings are NUL-terminated.
        check(unsafe {
            libc::linkat(
                src_dir.fd.as_raw_fd(),
                s.as_ptr(),
                self.fd.as_raw_fd(),
                c.as_ptr(),
                0,
            )
        })
        .map(drop)
    }

    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.move_to(from, self, to)
    }

    /// Moves `from` (here) to `to` in the directory `dest` (same file
    /// system, else `EXDEV`), never following a symlink in either name.
    pub fn move_to(&self, from: &str, dest: &Dir, to: &str) -> io::Result<()> {
        let f = cstr(OsStr::new(from))?;
        let t = cstr(OsStr::new(to))?;
        // SAFETY: both strings are NUL-terminated.
        check(unsafe {
            libc::renameat(
                self.fd.as_raw_fd(),
                f.as_ptr(),
                dest.fd.as_raw_fd(),
                t.as_ptr(),
            )
        })
        .map(drop)
    }

    /// Removes the file or symlink `name`.
    pub fn unlink(&self, name: &str) -> io::Result<()> {
        let c = cstr(OsStr::new(name))?;
        // SAFETY: c is NUL-terminated.
        check(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) }).map(drop)
    }

    /// Sets this directory's permission bits.
    pub fn set_mode(&self, mode: u32) -> io::Result<()> {
        // SAFETY: fchmod on an fd we own.
        check(unsafe { libc::fchmod(self.fd.as_raw_fd(), mode as libc::mode_t) }).map(drop)
    }

    /// Names in this directory, without `.` and `..` (names that are not
    /// UTF-8 come out lossy: use them to show, not to open).
    pub fn names(&self) -> io::Result<Vec<String>> {
        Ok(self
            .raw_names()?
            .iter()
            .map(|n| String::from_utf8_lossy(n.to_bytes()).into_owned())
            .collect())
    }

    /// Names in this directory as the file system has them.
    pub fn names_os(&self) -> io::Result<Vec<std::ffi::OsString>> {
        use std::os::unix::ffi::OsStringExt;
        Ok(self
            .raw_names()?
            .into_iter()
            .map(|c| std::ffi::OsString::from_vec(c.into_bytes()))
            .collect())
    }

    /// [`Dir::lstat`] for any name.
    pub fn lstat_os(&self, name: &OsStr) -> io::Result<Option<Stat>> {
        self.lstat_c(&cstr(name)?)
    }

    /// [`Dir::remove_all`] for any name.
    pub fn remove_all_os(&self, name: &OsStr) -> io::Result<()> {
        self.remove_all_c(&cstr(name)?)
    }

    /// Opens the directory `name` (never through a symlink) and gives it
    /// mode 0755, first making it usable if a step took its permissions.
    pub fn open_dir_restored(&self, name: &OsStr) -> io::Result<Dir> {
        let d = self.open_dir_usable(&cstr(name)?)?;
        d.set_mode(0o755)?;
        Ok(d)
    }

    /// Opens the directory `c` (never through a symlink), first making it
    /// usable if a step took its permissions.
    fn open_dir_usable(&self, c: &CStr) -> io::Result<Dir> {
        let fd = match openat(self.fd.as_raw_fd(), c, DIR_FLAGS, 0) {
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                self.make_usable(c)?;
                openat(self.fd.as_raw_fd(), c, DIR_FLAGS, 0)?
            }
            r => r?,
        };
        Ok(Dir { fd })
    }

    fn raw_names(&self) -> io::Result<Vec<CString>> {
        // A fresh open file description, so the read position is ours.
        let fd = openat(self.fd.as_raw_fd(), c".", DIR_FLAGS, 0)?;
        // SAFETY: fdopendir takes ownership of the fd on success.
        let dirp = unsafe { libc::fdopendir(fd.as_raw_fd()) };
        if dirp.is_null() {
            return Err(io::Error::last_os_error());
        }
        std::mem::forget(fd);
        let mut out = Vec::new();
        loop {
            // SAFETY: dirp is a valid DIR* until closedir below.
            let ent = unsafe { libc::readdir(dirp) };
            if ent.is_null() {
                break;
            }
            // SAFETY: d_name is NUL-terminated within the dirent.
            let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
            let b = name.to_bytes();
            if b != b"." && b != b".." {
                out.push(name.to_owned());
            }
        }
        // SAFETY: dirp came from fdopendir; closes the fd too.
        unsafe { libc::closedir(dirp) };
        Ok(out)
    }

    /// Removes `name` and, for a directory, everything below it, never
    /// following a symlink. Directories a step made unreadable or
    /// read-only are made usable first. A missing entry is not an error.
    pub fn remove_all(&self, name: &str) -> io::Result<()> {
        self.remove_all_c(&cstr(OsStr::new(name))?)
    }

    fn remove_all_c(&self, c: &CStr) -> io::Result<()> {
        let fd = self.fd.as_raw_fd();
        match self.lstat_c(c)? {
            None => Ok(()),
            Some(st) if st.kind == Kind::Dir => {
                let sub = self.open_dir_usable(c)?;
                let _ = sub.set_mode(0o700);
                sub.empty()?;
                // SAFETY: c is NUL-terminated.
                let r = unsafe { libc::unlinkat(fd, c.as_ptr(), libc::AT_REMOVEDIR) };
                match check(r) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    r => r.map(drop),
                }
            }
            // SAFETY: c is NUL-terminated.
            Some(_) => match check(unsafe { libc::unlinkat(fd, c.as_ptr(), 0) }) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                r => r.map(drop),
            },
        }
    }

    /// Gives the directory `c` (ours; a step took its permissions away)
    /// owner read, write and search, without following a symlink: on
    /// Linux it is opened as a path, which needs no permission, and
    /// changed through that handle.
    fn make_usable(&self, c: &CStr) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        {
            let fd = openat(
                self.fd.as_raw_fd(),
                c,
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_DIRECTORY | libc::O_CLOEXEC,
                0,
            )?;
            let p = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .map_err(io::Error::other)?;
            // SAFETY: p is NUL-terminated; the path is our own handle.
            check(unsafe { libc::chmod(p.as_ptr(), 0o700) }).map(drop)
        }
        #[cfg(not(target_os = "linux"))]
        {
            // A swap for a symlink in between could reach only a file of
            // the buildlet's own user, which the step could chmod itself.
            // SAFETY: c is NUL-terminated.
            check(unsafe { libc::fchmodat(self.fd.as_raw_fd(), c.as_ptr(), 0o700, 0) }).map(drop)
        }
    }

    /// Removes everything in this directory, whatever the names.
    pub fn empty(&self) -> io::Result<()> {
        for n in self.raw_names()? {
            self.remove_all_c(&n)?;
        }
        Ok(())
    }
}
