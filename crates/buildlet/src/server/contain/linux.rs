//! Containment on Linux: a cgroup v2 per command (joined before `exec`,
//! killed with `cgroup.kill`), else the buildlet as child subreaper that
//! kills a command's `/proc` descendants and the processes carrying its
//! marker. Chosen by [`super::Containment::setup`].

use super::{Active, Swept};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How many kill rounds before giving up on a process that keeps forking.
const KILL_ROUNDS: usize = 100;

pub(super) fn setup(mode: super::ContainMode, scope: &str) -> Active {
    use super::ContainMode::*;
    let base = cgroup_base(scope);
    // Whatever the mode now, clean up what any mode left before.
    if let Some(b) = &base
        && b.is_dir()
    {
        kill_cgroup_tree(b);
    }
    kill_marked(&format!("{scope}."));
    match mode {
        Group => Active::Group,
        Reaper => fallback(),
        Auto | Cgroup => {
            // Probe: may we make cgroups here? The base is made for real
            // when a command needs it and removed when none runs.
            let made = base.as_ref().map(|b| match fs::create_dir(b) {
                Ok(()) => fs::remove_dir(b),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
                Err(e) => Err(e),
            });
            match (base, made) {
                (Some(b), Some(Ok(()))) => {
                    // A step can move itself out of its cgroup (into any
                    // cgroup its user may write); as a subreaper the
                    // buildlet keeps such processes among its descendants,
                    // where `kill_escapees` finds them.
                    // SAFETY: prctl with integer arguments only.
                    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
                        tracing::warn!(
                            "cannot become a child subreaper: {}; a process that leaves its command's cgroup and its parent may outlive the command",
                            io::Error::last_os_error()
                        );
                    }
                    Active::Cgroup(b)
                }
                (b, made) => {
                    let why = match (b, made) {
                        (Some(b), Some(Err(e))) => format!("{}: {e}", b.display()),
                        _ => "no cgroup v2 file system".into(),
                    };
                    if mode == Cgroup {
                        tracing::warn!("-contain=cgroup unavailable ({why}); using reaper mode");
                    } else {
                        tracing::debug!("cgroups unavailable ({why}); using reaper mode");
                    }
                    fallback()
                }
            }
        }
    }
}

/// Reaper mode: become a child subreaper so orphans stay visible.
pub(super) fn fallback() -> Active {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if r != 0 {
        tracing::warn!(
            "cannot become a child subreaper: {}; commands are killed by process group and environment marker only",
            io::Error::last_os_error()
        );
    }
    Active::Reaper
}

/// `<cgroup2 mount><own cgroup>/farmer-buildlet-<scope>`, if cgroup v2 is mounted.
fn cgroup_base(scope: &str) -> Option<PathBuf> {
    let own = fs::read_to_string("/proc/self/cgroup").ok()?;
    let own = own.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
    let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = mounts.lines().find_map(|l| {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS... - FSTYPE SOURCE SUPER
        let (pre, post) = l.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut f = pre.split_whitespace();
        let root = f.nth(3)?;
        let point = f.next()?;
        (root == "/").then(|| PathBuf::from(unescape(point)))
    })?;
    let rel = own.trim_start_matches('/');
    // A cgroup path ending in " (deleted)" means ours is gone.
    if rel.ends_with(" (deleted)") {
        return None;
    }
    Some(mount.join(rel).join(format!("farmer-buildlet-{scope}")))
}

/// mountinfo escapes spaces and the like as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// True when `pid` is in the cgroup `dir` (or cannot be checked: it exited).
pub(super) fn in_cgroup(pid: i32, dir: &Path) -> bool {
    let Ok(s) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return true;
    };
    let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    s.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .is_some_and(|p| p.trim_end().ends_with(&format!("/{name}")))
}

/// Creates `base/cmd-<id>` and opens it (for `clone3(CLONE_INTO_CGROUP)`,
/// or to open its `cgroup.procs`: see [`open_procs`]).
pub(super) fn new_cgroup(base: &Path, id: u64) -> io::Result<(PathBuf, OwnedFd)> {
    let dir = base.join(format!("cmd-{id}"));
    let mut tries = 0;
    loop {
        match fs::create_dir(base) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        match fs::create_dir(&dir) {
            Ok(()) => break,
            // A leftover of the same name (an earlier buildlet's): never
            // used, since it may have been `cgroup.kill`ed, which kills
            // whatever `clone3` makes in it later. Emptied, removed, made
            // afresh.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 5 => {
                kill_cgroup(&dir);
                remove_cgroup(&dir);
                tries += 1;
            }
            // The last command's cleanup removed the base meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 5 => tries += 1,
            Err(e) => return Err(e),
        }
    }
    open_cgroup(dir)
}

/// Opens the cgroup directory `dir` (see [`new_cgroup`]).
pub(super) fn open_cgroup(dir: PathBuf) -> io::Result<(PathBuf, OwnedFd)> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(&dir)?;
    Ok((dir, f.into()))
}

/// Whether the cgroup `dir` has no process (its own `cgroup.procs`; a
/// cgroup kept for reuse has no sub-cgroups); `None` when it cannot be
/// read (the cgroup is gone).
pub(super) fn no_members(dir: &Path) -> Option<bool> {
    let procs = fs::read(dir.join("cgroup.procs")).ok()?;
    Some(procs.iter().all(u8::is_ascii_whitespace))
}

/// Whether the cgroup `dir` has no sub-cgroup (one its command made); a
/// cgroup that cannot be read has none to offer.
pub(super) fn no_sub_cgroups(dir: &Path) -> bool {
    fs::read_dir(dir)
        .is_ok_and(|mut rd| !rd.any(|e| e.is_ok_and(|e| e.file_type().is_ok_and(|t| t.is_dir()))))
}

/// `cgroup.procs` of the cgroup whose directory `dir` is, for writing.
pub(super) fn open_procs(dir: &OwnedFd) -> io::Result<OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: openat on a directory we own with a NUL-terminated name; the
    // result is a new descriptor we own.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c"cgroup.procs".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Kills every process in the cgroup `dir` and below; says what it found.
pub(super) fn kill_cgroup(dir: &Path) -> Swept {
    let events = fs::read_to_string(dir.join("cgroup.events")).unwrap_or_default();
    if events.lines().any(|l| l == "populated 0") {
        return Swept::Empty;
    }
    if fs::write(dir.join("cgroup.kill"), b"1").is_ok() {
        return Swept::Killed;
    }
    // Before Linux 5.14: signal members until none is left.
    for _ in 0..KILL_ROUNDS {
        let pids = members(dir);
        if pids.is_empty() {
            return Swept::Signalled;
        }
        for p in pids {
            // SAFETY: kill(2) on a pid read from the cgroup.
            unsafe {
                libc::kill(p, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Swept::Signalled
}

/// Pids in `dir/cgroup.procs` and in every sub-cgroup.
fn members(dir: &Path) -> Vec<i32> {
    let mut out: Vec<i32> = fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(members(&e.path()));
            }
        }
    }
    out
}

/// Kills a leftover base cgroup's processes and removes its sub-cgroups.
fn kill_cgroup_tree(base: &Path) {
    if let Ok(rd) = fs::read_dir(base) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let dir = e.path();
                tracing::info!(
                    "killing leftovers of an earlier buildlet in {}",
                    dir.display()
                );
                kill_cgroup(&dir);
                remove_cgroup(&dir);
            }
        }
    }
}

/// Removes a cgroup (and sub-cgroups a command made) once its killed
/// processes are gone, waiting at most a few seconds.
pub(super) fn remove_cgroup(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_cgroup(&e.path());
                }
            }
        }
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() > deadline => {
                tracing::warn!("cannot remove cgroup {}: {e}", dir.display());
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// One process as `/proc` shows it.
struct Proc {
    ppid: i32,
    zombie: bool,
}

fn processes() -> HashMap<i32, Proc> {
    let mut out = HashMap::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) S ppid ..."; comm may contain spaces and parens.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let state = f.next().unwrap_or("");
        let ppid = f.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        out.insert(
            pid,
            Proc {
                ppid,
                zombie: state == "Z" || state == "X",
            },
        );
    }
    out
}

/// The value of [`super::SCOPE_ENV`] in a process's initial environment.
fn marker_of(pid: i32) -> Option<String> {
    let env = fs::read(format!("/proc/{pid}/environ")).ok()?;
    let key = format!("{}=", super::SCOPE_ENV);
    env.split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(key.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Kills the descendants of `root` and every process whose marker is
/// `marker`, in rounds until none is left (a process may fork while the
/// previous round is being killed).
pub(super) fn kill_tree(root: i32, marker: &str) {
    let me = std::process::id() as i32;
    for _ in 0..KILL_ROUNDS {
        let procs = processes();
        let mut kids: HashMap<i32, Vec<i32>> = HashMap::new();
        for (pid, p) in &procs {
            kids.entry(p.ppid).or_default().push(*pid);
        }
        let mut victims: HashSet<i32> = HashSet::new();
        let mut stack = if root > 0 { vec![root] } else { vec![] };
        while let Some(p) = stack.pop() {
            if let Some(k) = kids.get(&p) {
                for &c in k {
                    if victims.insert(c) {
                        stack.push(c);
                    }
                }
            }
        }
        for pid in procs.keys() {
            if *pid != me && marker_of(*pid).as_deref() == Some(marker) {
                victims.insert(*pid);
                // And their descendants, which may have scrubbed the env.
                let mut stack = vec![*pid];
                while let Some(p) = stack.pop() {
                    for &c in kids.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
                        if victims.insert(c) {
                            stack.push(c);
                        }
                    }
                }
            }
        }
        victims.retain(|p| *p != me && procs.get(p).is_some_and(|p| !p.zombie));
        if victims.is_empty() {
            return;
        }
        for p in victims {
            // SAFETY: kill(2) with a pid found above.
            unsafe {
                libc::kill(p, libc::SIGKILL);
            }
        }
    }
}

/// Kills every process whose marker starts with `prefix` (a scope), as
/// left by an earlier buildlet on the same work dir.
fn kill_marked(prefix: &str) {
    let me = std::process::id() as i32;
    for _ in 0..KILL_ROUNDS {
        let victims: Vec<i32> = processes()
            .into_iter()
            .filter(|(pid, p)| {
                *pid != me && !p.zombie && marker_of(*pid).is_some_and(|m| m.starts_with(prefix))
            })
            .map(|(pid, _)| pid)
            .collect();
        if victims.is_empty() {
            return;
        }
        tracing::info!(
            count = victims.len(),
            "killing processes an earlier buildlet on this work dir left"
        );
        for p in victims {
            // SAFETY: kill(2) with a pid found above.
            unsafe {
                libc::kill(p, libc::SIGKILL);
            }
        }
    }
}

/// The buildlet's descendants, from `/proc/<pid>/task/<tid>/children`
/// where the kernel has it, else from a walk of every process.
fn descendants(me: i32) -> Vec<i32> {
    if !has_children() {
        return Vec::new();
    }
    let children_of = direct_children;
    let mut out = Vec::new();
    let mut stack = vec![me];
    let mut seen = HashSet::new();
    while let Some(p) = stack.pop() {
        let Some(kids) = children_of(p) else {
            // No `children` files: walk every process instead.
            let procs = processes();
            let mut by_parent: HashMap<i32, Vec<i32>> = HashMap::new();
            for (pid, pr) in &procs {
                by_parent.entry(pr.ppid).or_default().push(*pid);
            }
            let mut out = Vec::new();
            let mut stack = vec![me];
            while let Some(p) = stack.pop() {
                for &c in by_parent.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
                    if c != me && !out.contains(&c) {
                        out.push(c);
                        stack.push(c);
                    }
                }
            }
            return out;
        };
        for k in kids {
            if k != me && seen.insert(k) {
                out.push(k);
                stack.push(k);
            }
        }
    }
    out
}

/// Kills the buildlet's descendants that are not in the cgroup of a
/// running command (`running`: names of `base/cmd-<n>` dirs): processes
/// a step moved out of its cgroup, which killing that cgroup missed.
/// Call with no spawn in progress (a child joins its cgroup just before
/// `exec`). Returns how many were killed.
pub(super) fn kill_escapees(base: &Path, running: &HashSet<String>) -> usize {
    let me = std::process::id() as i32;
    let Some(base_name) = base.file_name().and_then(|n| n.to_str()) else {
        return 0;
    };
    let mut killed = 0;
    for pid in descendants(me) {
        let Ok(cg) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            continue;
        };
        let Some(path) = cg.lines().find_map(|l| l.strip_prefix("0::")) else {
            continue;
        };
        let mut comps = path.trim_end().split('/');
        let inside = comps
            .by_ref()
            .find(|c| *c == base_name)
            .and_then(|_| comps.next())
            .is_some_and(|cmd| running.contains(cmd));
        let zombie = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if !inside && !zombie {
            // SAFETY: kill(2) on a descendant of ours found above.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            killed += 1;
        }
    }
    killed
}

/// Reaps zombies reparented to the buildlet, leaving the direct children
/// of running commands to tokio. Looks only at the buildlet's own
/// children (`/proc/self/task/*/children`), not at every process: it runs
/// whenever a child exits.
pub(super) fn reap_orphans(children: &HashSet<i32>) {
    if !has_children() {
        return;
    }
    let me = std::process::id() as i32;
    let kids = match direct_children(me) {
        Some(k) => k,
        None => processes()
            .into_iter()
            .filter(|(_, p)| p.ppid == me)
            .map(|(pid, _)| pid)
            .collect(),
    };
    for pid in kids {
        if children.contains(&pid) {
            continue;
        }
        let zombie = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().starts_with(['Z', 'X']))
            })
            .unwrap_or(false);
        if zombie {
            let mut status = 0;
            // SAFETY: waitpid on a specific zombie child of ours.
            unsafe {
                libc::waitpid(pid, &mut status, libc::WNOHANG);
            }
        }
    }
}

/// Whether the buildlet has any child process, running or a zombie: one
/// `waitid` that says ECHILD when there is none (`WNOWAIT`: it takes no
/// exit status from whoever waits for a child). Most of the time no
/// command runs and the walks of `/proc` (a file per thread) can be
/// skipped.
fn has_children() -> bool {
    // SAFETY: waitid writes only into `info`, a zeroed siginfo_t.
    let r = unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    !(r == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD))
}

/// The direct children of `pid` (of all its threads), if the kernel
/// offers `/proc/PID/task/TID/children`.
fn direct_children(pid: i32) -> Option<Vec<i32>> {
    let mut out = Vec::new();
    for t in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let s = fs::read_to_string(t.path().join("children")).ok()?;
        out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
    }
    Some(out)
}
