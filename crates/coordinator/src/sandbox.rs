//! What a local buildlet (and so every build step it runs) may see of the
//! coordinator's machine.
//!
//! Local buildlets run repository code on the coordinator's own machine, next
//! to the farm's secrets (master key, admin token, TLS and CA keys, release
//! key, the store). A build on an untrusted host type must not be able to
//! print them into its public log, so each local buildlet starts in a
//! sandbox, set up by a fresh process of our own executable (`farmer
//! sandbox`, see [`Sandbox`]) before it becomes the buildlet:
//!
//! * a private mount namespace in which the data dir (and any secret file
//!   kept outside it, such as `--tls-key`) is covered by an empty read-only
//!   tmpfs or by `/dev/null`;
//! * as root: the buildlet then drops to an unprivileged user (`[farm]
//!   local_user`, `nobody` by default), so it cannot undo those mounts or
//!   read root's files; as any other user: a user namespace first (mapping the
//!   user to itself only, so the buildlet holds no capability after `exec`
//!   and cannot unmount the covers; mounts it inherits into any namespace it
//!   makes itself are locked by the kernel);
//! * `PR_SET_PDEATHSIG`, so a coordinator that dies takes its local
//!   buildlets with it.
//!
//! The coordinator itself is made non-dumpable ([`protect_self`]), so a step
//! running as the same user cannot read its memory, environment or root
//! directory through `/proc/PID/…`.
//!
//! The program is executed through a descriptor opened beforehand
//! (`/proc/self/fd/N`), so the unprivileged user need not be able to walk
//! the directories that lead to the coordinator's executable (cargo's target
//! dir under `/root`, say).

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Why a local buildlet cannot be sandboxed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "local buildlets need a sandbox, which needs Linux namespaces; this platform has none (set `local_sandbox = false` in [farm] to run them unsandboxed: their builds can then read the data dir)"
    )]
    Unsupported,
    #[error("unknown local_user {0:?}: no such user on this machine")]
    NoUser(String),
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
}

/// A user to run local buildlets as (root only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
}

/// Looks up `name` in the user database.
pub fn lookup_user(name: &str) -> Result<Ids, SandboxError> {
    let c = CString::new(name).map_err(|_| SandboxError::NoUser(name.into()))?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: all-zero is a valid `passwd` (null pointers, zero ids).
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf` outlives it.
    let rc = unsafe {
        libc::getpwnam_r(
            c.as_ptr(),
            &mut pw,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        )
    };
    if rc != 0 || out.is_null() {
        return Err(SandboxError::NoUser(name.into()));
    }
    Ok(Ids {
        uid: pw.pw_uid,
        gid: pw.pw_gid,
    })
}

/// How to start local buildlets inside the sandbox.
///
/// The coordinator's memory holds the farm's secrets and it is
/// non-dumpable, so nothing is set up between `fork` and `exec` beyond the
/// parent-death signal: the child execs our executable again as `farmer
/// sandbox --hide PATH… [--user UID:GID] -- buildlet ARGS…`, a fresh
/// single-threaded process that enters the namespaces ([`enter`]) and then
/// becomes the buildlet.
pub struct Sandbox {
    hide: Vec<PathBuf>,
    /// `Some` when the coordinator is root: the user to become.
    drop_to: Option<Ids>,
    /// The executable, opened so it can be run without walking its path.
    exe: OwnedFd,
    exe_path: PathBuf,
}

impl Sandbox {
    /// Prepares a sandbox that hides `secret_paths` (directories and files;
    /// missing ones are skipped) and runs `exe`.
    pub fn new(
        exe: &Path,
        secret_paths: &[PathBuf],
        local_user: &str,
    ) -> Result<Sandbox, SandboxError> {
        if !cfg!(target_os = "linux") {
            return Err(SandboxError::Unsupported);
        }
        let exe_file = std::fs::File::open(exe).map_err(|err| SandboxError::Io {
            path: exe.to_path_buf(),
            err,
        })?;
        let mut hide = Vec::new();
        for p in secret_paths {
            if let Ok(r) = std::fs::canonicalize(p)
                && !hide.contains(&r)
            {
                hide.push(r);
            }
        }
        // SAFETY: getuid cannot fail.
        let drop_to = if unsafe { libc::getuid() } == 0 {
            Some(lookup_user(local_user)?)
        } else {
            None
        };
        Ok(Sandbox {
            hide,
            drop_to,
            exe: exe_file.into(),
            exe_path: exe.to_path_buf(),
        })
    }

    /// The user local buildlets run as, if it differs from ours.
    pub fn user(&self) -> Option<Ids> {
        self.drop_to
    }

    /// A command that runs `farmer buildlet ARGS` (`buildlet_args` starts
    /// with `buildlet`) inside the sandbox.
    pub fn command(&self, buildlet_args: &[String]) -> tokio::process::Command {
        let mut cmd =
            tokio::process::Command::new(format!("/proc/self/fd/{}", self.exe.as_raw_fd()));
        cmd.arg0(&self.exe_path).arg("sandbox");
        for h in &self.hide {
            cmd.arg("--hide").arg(h);
        }
        if let Some(ids) = self.drop_to {
            cmd.arg("--user").arg(format!("{}:{}", ids.uid, ids.gid));
        }
        cmd.arg("--").args(buildlet_args);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl and getppid are async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                let parent = libc::getppid();
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("the coordinator is exiting"));
                }
                Ok(())
            });
        }
        cmd
    }
}

/// `farmer sandbox --hide PATH… [--user UID:GID] -- buildlet ARGS…`: enters
/// the sandbox, then returns the buildlet's arguments for the caller to run
/// in this process. Must run before any thread is started (a user namespace
/// can only be entered by a single-threaded process).
pub fn enter(args: &[std::ffi::OsString]) -> Result<Vec<std::ffi::OsString>, String> {
    let mut hide = Vec::new();
    let mut user = None;
    let mut it = args.iter();
    let mut rest = Vec::new();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--hide") => hide.push(PathBuf::from(it.next().ok_or("--hide needs a path")?)),
            Some("--user") => {
                let v = it
                    .next()
                    .and_then(|v| v.to_str())
                    .ok_or("--user needs UID:GID")?;
                let (u, g) = v.split_once(':').ok_or("--user needs UID:GID")?;
                user = Some(Ids {
                    uid: u.parse().map_err(|_| "--user: bad uid")?,
                    gid: g.parse().map_err(|_| "--user: bad gid")?,
                });
            }
            Some("--") => {
                rest.extend(it.by_ref().cloned());
                break;
            }
            _ => return Err(format!("sandbox: unexpected argument {a:?}")),
        }
    }
    enter_namespaces(&hide, user)
        .map_err(|e| format!("entering the local buildlet sandbox: {e}"))?;
    Ok(rest)
}

#[cfg(not(target_os = "linux"))]
fn enter_namespaces(_: &[PathBuf], _: Option<Ids>) -> std::io::Result<()> {
    Err(std::io::Error::other("no namespaces on this platform"))
}

#[cfg(target_os = "linux")]
fn enter_namespaces(hide: &[PathBuf], user: Option<Ids>) -> std::io::Result<()> {
    use std::io::Error;
    let check = |what: &str, rc: libc::c_int| {
        if rc < 0 {
            let e = Error::last_os_error();
            Err(Error::new(e.kind(), format!("{what}: {e}")))
        } else {
            Ok(())
        }
    };
    let cstr = |p: &Path| {
        CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::other(format!("{} has a NUL byte", p.display())))
    };
    // Covering a directory hides everything below it, and a path below a
    // covered directory no longer exists to be covered: outermost first,
    // skipping what is already hidden.
    let mut paths: Vec<(PathBuf, bool)> = hide
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok().map(|m| (p.clone(), m.is_dir())))
        .collect();
    paths.sort_by_key(|(p, _)| p.components().count());
    // SAFETY (whole block): plain system calls with NUL-terminated strings
    // that outlive each call.
    unsafe {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = (libc::getuid(), libc::getgid());
        let parent = libc::getppid();
        if uid == 0 {
            check("unshare(mount namespace)", libc::unshare(libc::CLONE_NEWNS))?;
        } else {
            check(
                "unshare(user and mount namespaces)",
                libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS),
            )?;
            std::fs::write("/proc/self/setgroups", "deny")?;
            std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1"))?;
            std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1"))?;
        }
        check(
            "making mounts private",
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
        )?;
        let mut covered: Vec<&Path> = Vec::new();
        for (p, is_dir) in &paths {
            if covered.iter().any(|c| p.starts_with(c)) {
                continue;
            }
            let target = cstr(p)?;
            if *is_dir {
                check(
                    &format!("hiding {}", p.display()),
                    libc::mount(
                        c"farmer-hidden".as_ptr(),
                        target.as_ptr(),
                        c"tmpfs".as_ptr(),
                        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                        c"size=4k,mode=000".as_ptr().cast(),
                    ),
                )?;
                covered.push(p);
            } else {
                check(
                    &format!("hiding {}", p.display()),
                    libc::mount(
                        c"/dev/null".as_ptr(),
                        target.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ),
                )?;
            }
        }
        if let Some(ids) = user {
            check("setgroups", libc::setgroups(0, std::ptr::null()))?;
            check("setresgid", libc::setresgid(ids.gid, ids.gid, ids.gid))?;
            check("setresuid", libc::setresuid(ids.uid, ids.uid, ids.uid))?;
        }
        // A user change clears the parent-death signal; ask again, and
        // leave if the coordinator is already gone.
        check(
            "PR_SET_PDEATHSIG",
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0),
        )?;
        if libc::getppid() != parent {
            return Err(Error::other("the coordinator has exited"));
        }
    }
    Ok(())
}

/// Makes the coordinator non-dumpable: processes of the same user (a build
/// step on the local pool) can then not read its memory, environment, open
/// files or root directory through `/proc`.
pub fn protect_self() {
    #[cfg(target_os = "linux")]
    // SAFETY: a prctl on our own process.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
}

/// Restricts the data dir to its owner (0700): secrets inside are then
/// unreadable to every other user whatever their own modes.
pub fn restrict_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Gives `dir` to `ids` (the local buildlets' user), mode 0700.
pub fn give_dir(dir: &Path, ids: Ids) -> std::io::Result<()> {
    std::os::unix::fs::chown(dir, Some(ids.uid), Some(ids.gid))?;
    restrict_dir(dir)
}
