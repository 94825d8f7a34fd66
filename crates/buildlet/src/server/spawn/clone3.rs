//! `clone3(CLONE_INTO_CGROUP | CLONE_PIDFD)` and the child it makes (see
//! the parent module).

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;

use tokio::io::unix::AsyncFd;

/// A child made by `clone3`, with its pidfd. Killed when dropped unreaped,
/// like a tokio child with `kill_on_drop`.
pub(crate) struct Born {
    pid: i32,
    pidfd: Option<AsyncFd<OwnedFd>>,
    status: Option<ExitStatus>,
    /// Made sharing the buildlet's memory until its exec (see `shared`).
    shared: bool,
}

impl Born {
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// Whether the child shared the buildlet's memory until its exec
    /// (no page table copied) rather than starting from a copy.
    pub fn shared(&self) -> bool {
        self.shared
    }

    pub(super) async fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let Some(fd) = &self.pidfd else {
            return Err(io::Error::other("no pidfd"));
        };
        loop {
            // A pidfd reads ready once its process has exited.
            let mut guard = fd.readable().await?;
            match reap(fd.as_raw_fd(), libc::WNOHANG)? {
                Some(s) => {
                    self.status = Some(s);
                    self.pidfd = None;
                    return Ok(s);
                }
                None => guard.clear_ready(),
            }
        }
    }

    pub(super) fn start_kill(&mut self) -> io::Result<()> {
        match (&self.status, &self.pidfd) {
            (None, Some(fd)) => kill(fd.as_raw_fd()),
            _ => Ok(()),
        }
    }
}

impl Drop for Born {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        let _ = self.start_kill();
        // Reaped once it is gone, off this thread.
        if let (Some(fd), Ok(rt)) = (self.pidfd.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                while let Ok(mut g) = fd.readable().await {
                    if !matches!(reap(fd.as_raw_fd(), libc::WNOHANG), Ok(None)) {
                        break;
                    }
                    g.clear_ready();
                }
            });
        }
    }
}

/// Reaps our child through its pidfd: its status once exited, `None` if
/// not yet. Never by pid: once the orphan reaper or anyone reaped it, its
/// pid may name another process.
fn reap(pidfd: RawFd, flags: i32) -> io::Result<Option<ExitStatus>> {
    loop {
        // SAFETY: waitid with a valid out pointer; siginfo is plain data.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                pidfd as libc::id_t,
                &mut info,
                libc::WEXITED | flags,
            )
        };
        if r == 0 {
            // SAFETY: filled in by waitid for a child (SIGCHLD) event.
            let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
            if pid == 0 {
                return Ok(None);
            }
            // Back into the status word waitpid gives.
            let raw = match info.si_code {
                libc::CLD_EXITED => (status & 0xff) << 8,
                libc::CLD_KILLED => status & 0x7f,
                libc::CLD_DUMPED => (status & 0x7f) | 0x80,
                _ => status,
            };
            return Ok(Some(ExitStatus::from_raw(raw)));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// SIGKILL to our child through its pidfd (never a reused pid).
fn kill(pidfd: RawFd) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with no siginfo.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd,
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What a command is started with.
pub(crate) struct Spec<'a> {
    pub program: &'a Path,
    pub args: &'a [String],
    /// The whole environment (nothing is inherited).
    pub env: &'a [(OsString, OsString)],
    pub dir: &'a Path,
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Why [`spawn`] did not start the command.
pub(crate) enum Failed {
    /// `clone3` itself was refused (old kernel, seccomp, a cgroup that
    /// takes no processes): nothing ran; the fork path may try. The spec's
    /// descriptors come back for it.
    Refused(io::Error, Box<[OwnedFd; 3]>),
    /// The child ran and could not become the command (no such program,
    /// no such directory...): the command's own error.
    Start(io::Error),
}

// `struct clone_args` of <linux/sched.h>, up to `cgroup` (CLONE_ARGS_SIZE_VER2).
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_PIDFD: u64 = 0x1000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Where the child failed, with its errno, through the error pipe.
const AT_DUP: u32 = 1;
const AT_CHDIR: u32 = 2;
const AT_SETPGID: u32 = 3;
const AT_PDEATHSIG: u32 = 4;
const AT_EXEC: u32 = 5;

fn cstring(what: &str, b: &[u8]) -> Result<CString, io::Error> {
    CString::new(b).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

/// A descriptor the child can `dup2` onto 0, 1 or 2 without clobbering
/// another of them: never itself one of 0, 1, 2.
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: fcntl on a descriptor we own; the result is a new one we own.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: r is a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// Starts `spec` as a child in the cgroup whose directory `cgroup` is, in a
/// process group of its own, with `PR_SET_PDEATHSIG(SIGKILL)`. Call with
/// the containment's `children` lock held (see `exec::spawn_command`).
pub(crate) fn spawn(cgroup: BorrowedFd<'_>, spec: Spec<'_>) -> Result<Born, Failed> {
    // The child is waited for through the runtime: without one, nothing
    // may start (it could be neither waited for nor killed).
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(Failed::Start(io::Error::other(
            "no async runtime to wait for the command on",
        )));
    }
    let prepared = (|| {
        let prog = cstring("the program", spec.program.as_os_str().as_bytes())?;
        let dir = cstring("the directory", spec.dir.as_os_str().as_bytes())?;
        let mut argv = vec![prog.clone()];
        for a in spec.args {
            argv.push(cstring("an argument", a.as_bytes())?);
        }
        let mut envp = Vec::with_capacity(spec.env.len());
        for (k, v) in spec.env {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            envp.push(cstring("the environment", &kv)?);
        }
        Ok::<_, io::Error>((prog, dir, argv, envp))
    })();
    let (prog, dir, argv, envp) = match prepared {
        Ok(p) => p,
        Err(e) => return Err(Failed::Start(e)),
    };
    let argv_p = null_terminated(argv.iter().map(|a| a.as_c_str()));
    // A file without an interpreter line runs with /bin/sh, as execvp (and
    // so the fork path) does it: `/bin/sh PROGRAM ARGS...`.
    let sh_argv_p = null_terminated(
        [SH, prog.as_c_str()]
            .into_iter()
            .chain(argv[1..].iter().map(|a| a.as_c_str())),
    );
    let envp_p = null_terminated(envp.iter().map(|a| a.as_c_str()));
    let fds = (|| {
        Ok::<_, io::Error>([
            above_stdio(spec.stdin)?,
            above_stdio(spec.stdout)?,
            above_stdio(spec.stderr)?,
        ])
    })();
    let fds = match fds {
        Ok(f) => f,
        Err(e) => return Err(Failed::Start(e)),
    };
    let (err_r, err_w) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => return Err(Failed::Start(e)),
    };
    let raw: [RawFd; 3] = [fds[0].as_raw_fd(), fds[1].as_raw_fd(), fds[2].as_raw_fd()];
    let err_fd = err_w.as_raw_fd();
    // SAFETY: getpid and sigemptyset have no preconditions beyond a valid
    // pointer.
    let parent = unsafe { libc::getpid() };
    let mut empty: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe { libc::sigemptyset(&mut empty) };
    let work = ChildWork {
        fds: raw,
        dir: dir.as_ptr(),
        prog: prog.as_ptr(),
        argv: argv_p.as_ptr(),
        sh_argv: sh_argv_p.as_ptr(),
        envp: envp_p.as_ptr(),
        empty: &empty,
        parent,
        err: err_fd,
    };
    let mut pidfd: i32 = -1;
    let mut args = CloneArgs {
        flags: CLONE_PIDFD | CLONE_INTO_CGROUP,
        pidfd: &mut pidfd as *mut i32 as u64,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.as_raw_fd() as u64,
        ..Default::default()
    };
    // Sharing this process's memory until the exec spares copying its
    // page tables and faulting them back in (a quarter of the buildlet's
    // CPU per command when copied); where that is not done, or refused, a
    // copy (like fork).
    let mut shared = true;
    let pid = match shared::clone(&mut args, &work) {
        Some(r) if r >= 0 => r,
        _ => {
            shared = false;
            // SAFETY: clone3 without CLONE_VM makes a copy of this process
            // (like fork); the child runs only `child`, which makes
            // async-signal-safe calls on memory prepared above and never
            // returns.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_clone3,
                    &mut args as *mut CloneArgs,
                    std::mem::size_of::<CloneArgs>(),
                )
            };
            if r == 0 {
                // SAFETY: in the child; see `child`.
                unsafe { child(&work) }
            }
            r
        }
    };
    if pid < 0 {
        let e = io::Error::last_os_error();
        // Out of processes or memory (a build that forks without end): this
        // command cannot start, but clone3 works; anything else says this
        // kernel, profile or cgroup will not take it.
        return Err(match e.raw_os_error() {
            Some(libc::EAGAIN | libc::ENOMEM) => Failed::Start(e),
            _ => Failed::Refused(e, Box::new(fds)),
        });
    }
    let pid = pid as i32;
    drop(err_w);
    drop(fds);
    // SAFETY: the kernel wrote a fresh pidfd there.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // The child closes the pipe's write end by exec (CLOEXEC) or writes
    // where it failed: 8 bytes at most.
    let mut buf = Vec::with_capacity(8);
    let _ = std::io::Read::read_to_end(&mut std::io::Read::take(err_r, 8), &mut buf);
    let n = buf.len();
    if n != 0 {
        buf.resize(8, 0);
        let at = u32::from_ne_bytes(buf[..4].try_into().unwrap_or_default());
        let errno = i32::from_ne_bytes(buf[4..].try_into().unwrap_or_default());
        let _ = reap(pidfd.as_raw_fd(), 0);
        let e = io::Error::from_raw_os_error(if n == 8 { errno } else { libc::EIO });
        let what = match at {
            AT_DUP => "setting up its output",
            AT_CHDIR => "entering its directory",
            AT_SETPGID => "making its process group",
            AT_PDEATHSIG => "tying it to the buildlet",
            _ => "",
        };
        return Err(Failed::Start(if what.is_empty() {
            e
        } else {
            io::Error::new(e.kind(), format!("{what}: {e}"))
        }));
    }
    // SAFETY: an OwnedFd keeps its one descriptor open until dropped.
    let registered =
        unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) };
    let pidfd = match registered {
        Ok(f) => Some(f),
        Err(e) => {
            let (fd, e) = e.into_parts();
            let _ = kill(fd.as_raw_fd());
            let _ = reap(fd.as_raw_fd(), 0);
            return Err(Failed::Start(e));
        }
    };
    Ok(Born {
        pid,
        pidfd,
        status: None,
        shared,
    })
}

/// `execve`'s pointer array: the strings, then a null.
fn null_terminated<'a>(
    strings: impl Iterator<Item = &'a std::ffi::CStr>,
) -> Vec<*const libc::c_char> {
    strings
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// What the child needs, made before the clone: pointers into the parent's
/// memory (the child's copy of it, or, shared, the parent's itself while it
/// waits for the exec).
#[derive(Clone, Copy)]
struct ChildWork {
    fds: [RawFd; 3],
    dir: *const libc::c_char,
    prog: *const libc::c_char,
    argv: *const *const libc::c_char,
    /// `[/bin/sh, prog, args...]`, for a file exec calls no executable.
    sh_argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    empty: *const libc::sigset_t,
    parent: libc::pid_t,
    err: RawFd,
}

/// What runs a file without an interpreter line.
const SH: &std::ffi::CStr = c"/bin/sh";

/// The child of `clone3`: sets up and execs, or reports where it failed.
///
/// # Safety
/// Only in the child of `clone3`. Makes async-signal-safe calls only (no
/// allocation, no locks), on pointers made before the clone.
unsafe fn child(w: &ChildWork) -> ! {
    let ChildWork {
        fds,
        dir,
        prog,
        argv,
        sh_argv,
        envp,
        empty,
        parent,
        err,
    } = *w;
    /// Reports `errno` and where it was set, and ends the child.
    unsafe fn failed(err: RawFd, at: u32) -> ! {
        unsafe {
            let errno = *libc::__errno_location();
            let mut msg = [0u8; 8];
            msg[..4].copy_from_slice(&at.to_ne_bytes());
            msg[4..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(err, msg.as_ptr().cast(), 8);
            libc::_exit(127)
        }
    }
    unsafe {
        let fail = |at: u32| failed(err, at);
        for (i, fd) in fds.iter().enumerate() {
            if libc::dup2(*fd, i as i32) < 0 {
                fail(AT_DUP);
            }
        }
        if libc::chdir(dir) != 0 {
            fail(AT_CHDIR);
        }
        if libc::setpgid(0, 0) != 0 {
            fail(AT_SETPGID);
        }
        // What the buildlet blocks or ignores is not the command's business
        // (Rust ignores SIGPIPE; a command expects the default).
        libc::sigprocmask(libc::SIG_SETMASK, empty, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            fail(AT_PDEATHSIG);
        }
        // The buildlet died between the clone and the prctl: do not run.
        if libc::getppid() != parent {
            libc::_exit(1);
        }
        libc::execve(prog, argv, envp);
        if *libc::__errno_location() == libc::ENOEXEC {
            libc::execve(SH.as_ptr(), sh_argv, envp);
        }
        fail(AT_EXEC)
    }
}

/// `clone3(CLONE_VM | CLONE_VFORK)`, as `posix_spawn` does it: the child
/// runs on a stack of its own in this process's memory while the calling
/// thread waits, until it execs or exits. No page table is copied.
mod shared {
    use super::{ChildWork, CloneArgs, child};

    /// Returns the child's pid, or `None` where this is not done (other
    /// architectures) or was refused: the caller then clones a copy.
    #[cfg(any(
        all(target_arch = "x86_64", target_pointer_width = "64"),
        target_arch = "aarch64"
    ))]
    pub(super) fn clone(args: &mut CloneArgs, work: &ChildWork) -> Option<i64> {
        use std::sync::atomic::{AtomicBool, Ordering};
        /// Set once this kernel or profile refused the shared clone: every
        /// later command goes straight to the copy instead of asking again.
        static REFUSED: AtomicBool = AtomicBool::new(false);
        if REFUSED.load(Ordering::Relaxed) {
            return None;
        }
        const CLONE_VM: u64 = 0x100;
        const CLONE_VFORK: u64 = 0x4000;
        /// The child only sets up and execs: a few frames.
        const STACK: usize = 64 << 10;
        // u128: 16-byte aligned, as both ABIs want the stack. Allocated,
        // not zeroed: the child writes before it reads.
        let mut stack: Vec<u128> = Vec::with_capacity(STACK / 16);
        let mut a = *args;
        a.flags |= CLONE_VM | CLONE_VFORK;
        a.stack = stack.as_mut_ptr() as u64;
        a.stack_size = STACK as u64;
        // No handler of this process may run in the child (it would run
        // in this memory): every signal is blocked until the child has set
        // its handlers to the default (`entry`).
        // SAFETY: sigset and sigmask calls on local sets.
        let r = unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            // SAFETY: the child runs `entry` on `stack`, which outlives it
            // (this thread waits until the child execs or exits), and
            // `work` is only read.
            let r = raw_clone3(
                &mut a,
                std::mem::size_of::<CloneArgs>(),
                entry,
                work as *const ChildWork as *mut libc::c_void,
            );
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            r
        };
        drop(stack);
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // Out of processes or memory says nothing about the clone.
            if !matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ENOMEM)) {
                tracing::info!("the shared-memory clone3 was refused ({e}); copying from now on");
                REFUSED.store(true, Ordering::Relaxed);
            }
            return None;
        }
        Some(r)
    }

    #[cfg(not(any(
        all(target_arch = "x86_64", target_pointer_width = "64"),
        target_arch = "aarch64"
    )))]
    pub(super) fn clone(_: &mut CloneArgs, _: &ChildWork) -> Option<i64> {
        None
    }

    /// The shared child's first frame: handlers back to the default (the
    /// child has its own table; no CLONE_SIGHAND), then [`child`].
    #[cfg(any(
        all(target_arch = "x86_64", target_pointer_width = "64"),
        target_arch = "aarch64"
    ))]
    extern "C" fn entry(arg: *mut libc::c_void) -> ! {
        // SAFETY: in the child; sigaction on its own table, then `child`
        // with the work the parent made.
        unsafe {
            for sig in 1..=64 {
                if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                    continue;
                }
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                    && old.sa_sigaction != libc::SIG_IGN
                    && old.sa_sigaction != libc::SIG_DFL
                {
                    let mut dfl: libc::sigaction = std::mem::zeroed();
                    dfl.sa_sigaction = libc::SIG_DFL;
                    libc::sigaction(sig, &dfl, std::ptr::null_mut());
                }
            }
            child(&*(arg as *const ChildWork))
        }
    }

    /// `clone3`; in the child (on the new stack) calls `f(arg)`, which never
    /// returns. The parent gets the pid, or -1 with errno set.
    #[cfg(all(target_arch = "x86_64", target_pointer_width = "64"))]
    unsafe fn raw_clone3(
        args: *mut CloneArgs,
        size: usize,
        f: extern "C" fn(*mut libc::c_void) -> !,
        arg: *mut libc::c_void,
    ) -> i64 {
        let ret: i64;
        // SAFETY: the syscall preserves every register but rax, rcx and
        // r11; the child starts on its own 16-byte aligned stack, where
        // `call` makes an ordinary first frame.
        unsafe {
            std::arch::asm!(
                "syscall",
                "test rax, rax",
                "jnz 2f",
                "xor ebp, ebp",
                "mov rdi, r12",
                "call r13",
                "ud2",
                "2:",
                inlateout("rax") libc::SYS_clone3 => ret,
                in("rdi") args,
                in("rsi") size,
                in("r12") arg,
                in("r13") f,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        errno(ret)
    }

    /// See the x86-64 version.
    #[cfg(target_arch = "aarch64")]
    unsafe fn raw_clone3(
        args: *mut CloneArgs,
        size: usize,
        f: extern "C" fn(*mut libc::c_void) -> !,
        arg: *mut libc::c_void,
    ) -> i64 {
        let ret: i64;
        // SAFETY: the syscall preserves every register but x0; the child
        // starts on its own 16-byte aligned stack.
        unsafe {
            std::arch::asm!(
                "svc #0",
                "cbnz x0, 2f",
                "mov x29, xzr",
                "mov x30, xzr",
                "mov x0, x10",
                "blr x11",
                "brk #0",
                "2:",
                inlateout("x0") args => ret,
                in("x1") size,
                in("x8") libc::SYS_clone3,
                in("x10") arg,
                in("x11") f,
                options(nostack),
            );
        }
        errno(ret)
    }

    /// A raw syscall's result as libc gives it: -1 with errno set.
    #[cfg(any(
        all(target_arch = "x86_64", target_pointer_width = "64"),
        target_arch = "aarch64"
    ))]
    fn errno(ret: i64) -> i64 {
        if (-4095..0).contains(&ret) {
            // SAFETY: errno is this thread's.
            unsafe { *libc::__errno_location() = (-ret) as i32 };
            return -1;
        }
        ret
    }
}
