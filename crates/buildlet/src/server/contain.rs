//! Making every process of a command die with it.
//!
//! Killing a command's process group misses any descendant that called
//! `setsid` (or `setpgid`), and nothing at all happens to a step whose
//! buildlet was `SIGKILL`ed. A build machine must not keep running work the
//! coordinator has written off: it would hold the CPU, the disk and maybe
//! locks the next build needs. So, on Linux:
//!
//! * **cgroup** (preferred): each command runs in its own cgroup v2, created
//!   below the buildlet's own cgroup as `farmer-buildlet-<scope>/cmd-<n>`.
//!   The child joins it before `exec`, so every descendant, `setsid` or not,
//!   is inside; killing writes `cgroup.kill` (or, before Linux 5.14,
//!   `SIGKILL`s every member until none is left). A cgroup its command
//!   left empty is kept for the next commands for a while ([`SPARE_MAX`]).
//!   A step may still move itself into another cgroup its user can write
//!   (the buildlet's own);
//!   the buildlet is a child subreaper here too, so such a process stays
//!   its descendant, and every descendant found in no running command's
//!   cgroup is killed when a command ends ([`Containment::kill`]).
//! * **reaper** (no writable cgroup v2): the buildlet is a child subreaper,
//!   so orphans of a command are reparented to it instead of to init; each
//!   command carries `FARMER_BUILDLET_SCOPE=<scope>.<n>` in its environment.
//!   Killing walks `/proc` for descendants of the command and for processes
//!   carrying its marker. A process that both leaves the tree and scrubs
//!   its environment escapes this mode; cgroups have no such hole.
//! * **group** (other Unix, or by choice): the process group, as before.
//!
//! In every Linux mode the direct child has `PR_SET_PDEATHSIG(SIGKILL)`, so
//! it dies the moment the buildlet does. Its `setsid`ed descendants may
//! survive a `SIGKILL`ed buildlet; the next buildlet on the same work dir
//! kills them at start ([`Containment::setup`]): the leftover cgroup is
//! found by its name, which is derived from the work dir (`<scope>`), and
//! the environment marker finds the rest. So a machine that comes back
//! after being declared dead runs nothing from before.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The environment variable every command gets: `<scope>.<n>`.
pub const SCOPE_ENV: &str = "FARMER_BUILDLET_SCOPE";

/// How commands are contained; `-contain` on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContainMode {
    /// The best the platform offers: cgroup, else reaper, else group.
    #[default]
    Auto,
    /// One cgroup v2 per command (Linux).
    Cgroup,
    /// Child subreaper plus a `/proc` walk (Linux).
    Reaper,
    /// Process group only.
    Group,
}

impl std::str::FromStr for ContainMode {
    type Err = String;
    fn from_str(s: &str) -> Result<ContainMode, String> {
        match s {
            "auto" => Ok(ContainMode::Auto),
            "cgroup" => Ok(ContainMode::Cgroup),
            "reaper" => Ok(ContainMode::Reaper),
            "group" => Ok(ContainMode::Group),
            _ => Err(format!("{s:?} is not one of auto, cgroup, reaper, group")),
        }
    }
}

impl std::fmt::Display for ContainMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ContainMode::Auto => "auto",
            ContainMode::Cgroup => "cgroup",
            ContainMode::Reaper => "reaper",
            ContainMode::Group => "group",
        })
    }
}

/// The mode in effect after [`Containment::setup`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Active {
    /// The directory holding one cgroup per command.
    Cgroup(PathBuf),
    Reaper,
    Group,
}

/// Per-buildlet containment state.
pub(crate) struct Containment {
    active: Mutex<Active>,
    /// Derived from the work dir: names the cgroup and the env marker, so a
    /// later buildlet on the same work dir finds what this one left.
    scope: String,
    next: AtomicU64,
    /// Commands running now, by id.
    running: Mutex<HashMap<u64, Arc<Shared>>>,
    /// Direct children of running commands, which tokio reaps; the orphan
    /// reaper must leave them alone. Held across spawn and registration.
    pub(crate) children: Mutex<std::collections::HashSet<i32>>,
    reaper_started: AtomicBool,
    /// `-spawn`: whether commands may be made in their cgroup by `clone3`.
    spawn: super::spawn::SpawnMode,
    /// Set once `clone3` was refused here: the fork path from then on.
    clone3_off: AtomicBool,
    /// Emptied command cgroups kept for the next commands, with when each
    /// came back (see [`SPARE_MAX`]).
    spare: Mutex<Vec<(PathBuf, Instant)>>,
    /// Whether the task that removes spares unused for [`SPARE_LINGER`]
    /// (and then the base) is armed.
    janitor: AtomicBool,
}

/// How many emptied command cgroups are kept for reuse. Making a cgroup
/// (`mkdir`: the kernel sets up every controller's state) and removing it
/// cost the buildlet a tenth of its CPU per command, on the path to the
/// command's start; a removed memory cgroup also lingers in the kernel
/// while pages are charged to it. A kept one is reused once it is empty.
const SPARE_MAX: usize = 4;

/// How long a kept cgroup stays unused before it is removed: an idle
/// buildlet leaves no cgroups behind.
const SPARE_LINGER: Duration = Duration::from_secs(2);

/// What kill needs to know about one command; shared with `kill_all`.
#[derive(Debug)]
struct Shared {
    /// The direct child, 0 before spawn.
    pid: AtomicI32,
    /// Set once tokio reaped the direct child: its pid may be reused, so
    /// only the cgroup, the process group and the marker are used then.
    exited: AtomicBool,
    marker: String,
    cgroup: Mutex<Option<PathBuf>>,
    /// Set once `cgroup.kill` was written to its cgroup: such a cgroup is
    /// not reused, since Linux (6.18 here) kills every process later made
    /// in it by `clone3` (its kill count no longer matches the parent's).
    cgroup_killed: AtomicBool,
    /// The last kill found its cgroup empty (`populated 0`).
    cgroup_empty: AtomicBool,
}

/// One command's containment, from before spawn until it is cleaned up.
pub(crate) struct Jail {
    id: u64,
    /// `<scope>.<id>`, the value of [`SCOPE_ENV`] in the command's environment.
    pub marker: String,
    shared: Arc<Shared>,
    /// The command's cgroup directory, opened before the spawn: the child
    /// is made in it (`clone3`), or the fork path opens its `cgroup.procs`
    /// so the child only has to `write` to it.
    #[cfg(target_os = "linux")]
    cgroup_fd: Option<std::os::fd::OwnedFd>,
}

impl Jail {
    fn new(id: u64, marker: String, cgroup: Option<PathBuf>) -> Jail {
        Jail {
            id,
            shared: Arc::new(Shared {
                pid: AtomicI32::new(0),
                exited: AtomicBool::new(false),
                marker: marker.clone(),
                cgroup: Mutex::new(cgroup),
                cgroup_killed: AtomicBool::new(false),
                cgroup_empty: AtomicBool::new(false),
            }),
            marker,
            #[cfg(target_os = "linux")]
            cgroup_fd: None,
        }
    }
}

impl Containment {
    /// Picks the mode and kills whatever an earlier buildlet on the same
    /// work dir (`root`) left running. Call before emptying the work dir.
    pub fn setup(
        mode: ContainMode,
        spawn: super::spawn::SpawnMode,
        root: &std::path::Path,
    ) -> Containment {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(root.as_os_str().as_encoded_bytes());
        let scope = hex::encode(&digest[..8]);
        let active = platform::setup(mode, &scope);
        tracing::debug!(?active, %scope, "process containment");
        Containment {
            active: Mutex::new(active),
            scope,
            next: AtomicU64::new(1),
            running: Mutex::new(HashMap::new()),
            children: Mutex::new(Default::default()),
            reaper_started: AtomicBool::new(false),
            spawn,
            clone3_off: AtomicBool::new(false),
            spare: Mutex::new(Vec::new()),
            janitor: AtomicBool::new(false),
        }
    }

    /// The cgroup `jail`'s command can be made in by `clone3`, when that
    /// is how commands start here (see `super::spawn`).
    #[cfg(target_os = "linux")]
    pub fn clone3_target<'j>(&self, jail: &'j Jail) -> Option<std::os::fd::BorrowedFd<'j>> {
        use std::os::fd::AsFd;
        if self.spawn == super::spawn::SpawnMode::Fork || self.clone3_off.load(Ordering::Relaxed) {
            return None;
        }
        jail.cgroup_fd.as_ref().map(|f| f.as_fd())
    }

    /// `clone3` into a cgroup was refused: commands fork from now on.
    pub fn clone3_refused(&self, e: &std::io::Error) {
        if !self.clone3_off.swap(true, Ordering::Relaxed) {
            tracing::info!(
                "starting a command inside its cgroup (clone3) was refused: {e}; commands are forked and join their cgroup from now on"
            );
        }
    }

    /// The mode in effect, for logs and `/status`.
    pub fn mode_name(&self) -> &'static str {
        match &*lock(&self.active) {
            Active::Cgroup(_) => "cgroup",
            Active::Reaper => "reaper",
            Active::Group => "group",
        }
    }

    /// Prepares containment for a command about to be spawned.
    pub fn prepare(&self) -> Jail {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let marker = format!("{}.{id}", self.scope);
        let active = lock(&self.active).clone();
        #[cfg(target_os = "linux")]
        {
            if let Active::Cgroup(base) = &active {
                let made = match self.take_spare() {
                    Some(dir) => platform::open_cgroup(dir),
                    None => platform::new_cgroup(base, id),
                };
                match made {
                    Ok((dir, fd)) => {
                        let mut j = Jail::new(id, marker, Some(dir));
                        j.cgroup_fd = Some(fd);
                        return j;
                    }
                    Err(e) => {
                        tracing::warn!(
                            "cannot create a cgroup in {}: {e}; falling back to reaper mode",
                            base.display()
                        );
                        self.degrade();
                    }
                }
            }
            Jail::new(id, marker, None)
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = active;
            Jail::new(id, marker, None)
        }
    }

    /// In cgroup mode, kills the buildlet's descendants that are in no
    /// running command's cgroup: a step can write its pid into any
    /// `cgroup.procs` its user may write (its parent's, the buildlet's
    /// own), which `cgroup.kill` of its command then misses.
    fn kill_escapees(&self) {
        #[cfg(target_os = "linux")]
        {
            let base = match &*lock(&self.active) {
                Active::Cgroup(b) => b.clone(),
                _ => return,
            };
            // Held so that no child is between its fork and its cgroup.
            let _spawning = lock(&self.children);
            let running: std::collections::HashSet<String> = lock(&self.running)
                .values()
                .filter_map(|s| {
                    lock(&s.cgroup)
                        .as_ref()
                        .and_then(|d| d.file_name())
                        .and_then(|n| n.to_str())
                        .map(str::to_string)
                })
                .collect();
            let n = platform::kill_escapees(&base, &running);
            if n > 0 {
                tracing::warn!(
                    killed = n,
                    "killed processes that had left their command's cgroup"
                );
            }
        }
    }

    /// Gives up on cgroups (a spawn into one failed) for reaper mode.
    pub fn degrade(&self) {
        let mut a = lock(&self.active);
        if matches!(*a, Active::Cgroup(_)) {
            *a = platform::fallback();
        }
    }

    /// Records a spawned command so [`Containment::kill_all`] reaches it.
    /// Call with [`Containment::children`] held since before the spawn.
    /// `born_in` says the child was made in its cgroup (`clone3`).
    ///
    /// A child that did not land in its cgroup (the write in the pre-exec
    /// hook failed: a cgroup file system that refuses us) switches the
    /// buildlet to reaper mode instead of failing the command.
    pub fn started(&self, jail: &mut Jail, pid: u32, born_in: bool) {
        let pid = i32::try_from(pid).unwrap_or(0);
        jail.shared.pid.store(pid, Ordering::SeqCst);
        lock(&self.running).insert(jail.id, jail.shared.clone());
        #[cfg(target_os = "linux")]
        {
            jail.cgroup_fd = None;
            let mut cg = lock(&jail.shared.cgroup);
            if let Some(dir) = cg.clone()
                && !born_in
                && !platform::in_cgroup(pid, &dir)
            {
                tracing::warn!(
                    pid,
                    "command did not join its cgroup {}; falling back to reaper mode",
                    dir.display()
                );
                *cg = None;
                drop(cg);
                self.degrade();
                platform::remove_cgroup(&dir);
            }
        }
    }

    /// Notes that tokio reaped the command's direct child.
    pub fn exited(&self, jail: &Jail) {
        jail.shared.exited.store(true, Ordering::SeqCst);
        lock(&self.children).remove(&jail.shared.pid.load(Ordering::SeqCst));
    }

    /// Kills every process of the command, also those that left its
    /// cgroup.
    pub fn kill(&self, jail: &Jail) {
        kill_shared(&jail.shared);
        self.kill_escapees();
    }

    /// Kills every process of the command and forgets it; its cgroup is
    /// kept for a next command once empty (see [`SPARE_MAX`]), or removed.
    pub fn finish(self: &Arc<Self>, jail: Jail) {
        self.kill(&jail);
        lock(&self.running).remove(&jail.id);
        lock(&self.children).remove(&jail.shared.pid.load(Ordering::SeqCst));
        if let Some(dir) = lock(&jail.shared.cgroup).take() {
            // The kill just above found it empty and it was never
            // `cgroup.kill`ed: kept now, before the command's end is
            // answered, so the next command finds it.
            if jail.shared.cgroup_empty.load(Ordering::SeqCst)
                && !jail.shared.cgroup_killed.load(Ordering::SeqCst)
                && platform::no_sub_cgroups(&dir)
                && self.keep(&dir)
            {
                return;
            }
            let me = self.clone();
            in_background(move || {
                platform::remove_cgroup(&dir);
                me.remove_base_if_idle();
            });
        }
    }

    /// Puts the empty cgroup `dir` among the kept ones, if there is room.
    fn keep(self: &Arc<Self>, dir: &std::path::Path) -> bool {
        let mut spare = lock(&self.spare);
        if spare.len() >= SPARE_MAX {
            return false;
        }
        spare.push((dir.to_path_buf(), Instant::now()));
        drop(spare);
        self.arm_janitor();
        true
    }

    /// A kept cgroup, if one is empty still (a process of another command
    /// may have moved itself into it: then it is killed and the cgroup
    /// removed).
    fn take_spare(&self) -> Option<PathBuf> {
        loop {
            let (dir, _) = lock(&self.spare).pop()?;
            match platform::no_members(&dir) {
                Some(true) => return Some(dir),
                // Gone (removed from outside): forgotten.
                None => {}
                Some(false) => {
                    tracing::warn!(
                        "a process moved itself into the unused cgroup {}; killed",
                        dir.display()
                    );
                    platform::kill_cgroup(&dir);
                    in_background(move || platform::remove_cgroup(&dir));
                }
            }
        }
    }

    /// Removes, every [`SPARE_LINGER`], the kept cgroups unused since the
    /// last round, until none is kept; then the base, when no command runs.
    fn arm_janitor(self: &Arc<Self>) {
        if self.janitor.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = self.clone();
        let run = move || {
            loop {
                std::thread::sleep(SPARE_LINGER);
                let old: Vec<PathBuf> = {
                    let mut spare = lock(&me.spare);
                    let (old, keep): (Vec<_>, Vec<_>) = spare
                        .drain(..)
                        .partition(|(_, at)| at.elapsed() >= SPARE_LINGER);
                    *spare = keep;
                    old.into_iter().map(|(d, _)| d).collect()
                };
                for dir in &old {
                    platform::remove_cgroup(dir);
                }
                let spare = lock(&me.spare);
                if spare.is_empty() {
                    me.janitor.store(false, Ordering::SeqCst);
                    drop(spare);
                    me.remove_base_if_idle();
                    return;
                }
            }
        };
        // Its own thread: it sleeps, which a blocking-pool thread should not.
        if std::thread::Builder::new()
            .name("cgroup-janitor".into())
            .spawn(run)
            .is_err()
        {
            self.janitor.store(false, Ordering::SeqCst);
        }
    }

    /// The base goes when no command runs and no cgroup is kept (the rmdir
    /// fails otherwise), so an idle buildlet leaves no cgroups; the next
    /// command makes it again.
    fn remove_base_if_idle(&self) {
        if let Active::Cgroup(base) = &*lock(&self.active)
            && lock(&self.spare).is_empty()
        {
            let _ = std::fs::remove_dir(base);
        }
    }

    /// How many commands are running.
    pub fn running(&self) -> usize {
        lock(&self.running).len()
    }

    /// Kills every process of every running command; returns how many
    /// commands there were.
    pub fn kill_all(&self) -> usize {
        let all: Vec<Arc<Shared>> = lock(&self.running).values().cloned().collect();
        for j in &all {
            kill_shared(j);
        }
        all.len()
    }

    /// Kills every command and removes this buildlet's cgroups, waiting a
    /// few seconds at most for killed processes to go.
    pub fn shutdown(&self) {
        self.kill_all();
        #[cfg(target_os = "linux")]
        if let Active::Cgroup(base) = &*lock(&self.active)
            && base.exists()
        {
            platform::remove_cgroup(base);
        }
    }

    /// In reaper mode, starts the task that reaps orphans reparented to the
    /// buildlet (they would stay zombies otherwise). Idempotent.
    pub fn start_reaper(self: &std::sync::Arc<Self>) {
        // Cgroup mode too: the buildlet is a subreaper there as well.
        if matches!(*lock(&self.active), Active::Group)
            || self.reaper_started.swap(true, Ordering::SeqCst)
        {
            return;
        }
        #[cfg(target_os = "linux")]
        {
            let me = self.clone();
            tokio::spawn(async move {
                use tokio::signal::unix::{SignalKind, signal};
                let mut sigchld = signal(SignalKind::child()).ok();
                loop {
                    match &mut sigchld {
                        Some(s) => {
                            tokio::select! {
                                _ = s.recv() => {}
                                _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                            }
                        }
                        None => tokio::time::sleep(std::time::Duration::from_secs(1)).await,
                    }
                    let children = lock(&me.children);
                    platform::reap_orphans(&children);
                }
            });
        }
    }
}

impl Jail {
    /// Runs in the forked child before `exec`; only async-signal-safe calls.
    /// Returns the hook for `Command::pre_exec`.
    #[cfg(unix)]
    pub fn pre_exec_hook(&self) -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
        // Owned by the hook, so closed when the command is dropped. A
        // failure to open it shows as a child outside its cgroup (see
        // `Containment::started`).
        #[cfg(target_os = "linux")]
        let procs = self
            .cgroup_fd
            .as_ref()
            .and_then(|d| platform::open_procs(d).ok());
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        move || {
            #[cfg(target_os = "linux")]
            {
                // SAFETY: prctl, getppid and write are async-signal-safe and
                // touch only the memory passed (a static byte string).
                unsafe {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The buildlet died between fork and prctl: do not run.
                    if libc::getppid() != parent {
                        libc::_exit(1);
                    }
                    // Join the command's cgroup. A failure is not fatal
                    // here: `Containment::started` notices and falls back.
                    if let Some(fd) = &procs {
                        use std::os::fd::AsRawFd;
                        libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1);
                    }
                }
            }
            #[cfg(not(target_os = "linux"))]
            let _ = parent;
            Ok(())
        }
    }

    /// The command's cgroup directory, if it has one.
    #[cfg(test)]
    pub(crate) fn cgroup_dir(&self) -> Option<PathBuf> {
        lock(&self.shared.cgroup).clone()
    }

    /// The direct child's pid (0 before spawn).
    pub fn pid(&self) -> u32 {
        self.shared.pid.load(Ordering::SeqCst).max(0) as u32
    }
}

fn kill_shared(j: &Shared) {
    let pid = j.pid.load(Ordering::SeqCst);
    #[cfg(unix)]
    if pid > 0 {
        // SAFETY: kill(2) with a negative pid signals a process group. The
        // group outlives its leader while members remain, so this is safe
        // to repeat after the leader exited.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    #[cfg(target_os = "linux")]
    {
        let cgroup = lock(&j.cgroup).clone();
        match cgroup {
            Some(dir) => {
                let swept = platform::kill_cgroup(&dir);
                if swept == Swept::Killed {
                    j.cgroup_killed.store(true, Ordering::SeqCst);
                }
                j.cgroup_empty
                    .store(swept == Swept::Empty, Ordering::SeqCst);
            }
            None => {
                let root = if j.exited.load(Ordering::SeqCst) {
                    0
                } else {
                    pid
                };
                platform::kill_tree(root, &j.marker)
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = &j.marker;
}

/// What killing a command's cgroup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Swept {
    /// No process was left in it or below (`populated 0`): nothing done.
    Empty,
    /// `cgroup.kill` was written.
    Killed,
    /// Its members were signalled (before Linux 5.14), or it could not
    /// be told.
    Signalled,
}

/// Runs `f` on a thread of the runtime's blocking pool (reused, not made
/// and ended per command); on a thread of its own outside a runtime.
fn in_background(f: impl FnOnce() + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(f)),
        Err(_) => drop(
            std::thread::Builder::new()
                .name("cgroup-rmdir".into())
                .spawn(f),
        ),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(target_os = "linux")]
#[path = "contain/linux.rs"]
mod platform;

#[cfg(not(target_os = "linux"))]
#[path = "contain/other.rs"]
mod platform;
