//! Starting a command's process straight inside its cgroup.
//!
//! The portable way into a cgroup is for the forked child to write its pid
//! to the cgroup's `cgroup.procs` before `exec`. The kernel then takes the
//! cgroup threadgroup lock for writing, which waits for an RCU grace period
//! unless another migration happened moments before: on an idle machine
//! each command's first instruction came 10-15 ms late (measured: 12 ms per
//! spawn at one spawn per 50 ms, against 0.05 ms when spawns follow each
//! other closely). Linux 5.7's `clone3(CLONE_INTO_CGROUP)` makes the child
//! in the cgroup from the start, with no migration at all.
//!
//! The child also shares the buildlet's memory, on a stack of its own,
//! until it execs (`CLONE_VM | CLONE_VFORK`, as `posix_spawn` does; x86-64
//! and arm64): copying the buildlet's page tables for a child that
//! replaces them at once, and the faults that follow in the buildlet, were
//! a quarter of the buildlet's CPU per command.
//!
//! [`clone3::spawn`] does that where it can: the exec path (`/exec`) comes here;
//! a kernel, seccomp profile or cgroup that refuses `clone3` makes the
//! caller fall back to the fork path (`Command` with the pre-exec hook of
//! [`super::contain::Jail`]), once and for all (`-spawn=fork` asks for it).
//! The child of `clone3` runs only async-signal-safe calls on memory made
//! before the clone, as a `pre_exec` hook must.

use std::io;
use std::process::ExitStatus;

#[cfg(target_os = "linux")]
pub(super) mod clone3;

/// How commands are started; `-spawn` on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SpawnMode {
    /// `clone3` straight into the command's cgroup where the kernel takes
    /// it, else `fork`.
    #[default]
    Auto,
    /// Always `fork`; the child joins its cgroup itself.
    Fork,
}

impl std::str::FromStr for SpawnMode {
    type Err = String;
    fn from_str(s: &str) -> Result<SpawnMode, String> {
        match s {
            "auto" => Ok(SpawnMode::Auto),
            "fork" => Ok(SpawnMode::Fork),
            _ => Err(format!("{s:?} is not one of auto, fork")),
        }
    }
}

impl std::fmt::Display for SpawnMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SpawnMode::Auto => "auto",
            SpawnMode::Fork => "fork",
        })
    }
}

/// A started command: by `clone3` (waited for through its pidfd) or by the
/// fork path (a tokio child).
pub(super) enum Child {
    Tokio(tokio::process::Child),
    #[cfg(target_os = "linux")]
    Born(clone3::Born),
}

impl Child {
    /// Waits for the command's exit and reaps it.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        match self {
            Child::Tokio(c) => c.wait().await,
            #[cfg(target_os = "linux")]
            Child::Born(b) => b.wait().await,
        }
    }

    /// Sends SIGKILL to the direct child (not reaped yet: its pid is ours).
    pub fn start_kill(&mut self) -> io::Result<()> {
        match self {
            Child::Tokio(c) => c.start_kill(),
            #[cfg(target_os = "linux")]
            Child::Born(b) => b.start_kill(),
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::clone3::{Born, Failed, Spec, spawn};
    use crate::server::contain::Containment;
    use crate::server::{ContainMode, SpawnMode};
    use std::ffi::OsString;
    use std::io::Read;
    use std::os::fd::{AsFd, BorrowedFd};
    use std::os::unix::process::ExitStatusExt;
    use std::path::Path;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Containment in cgroup mode, where this machine allows it.
    fn cgroup_mode(root: &Path) -> Option<Containment> {
        let c = Containment::setup(ContainMode::Cgroup, SpawnMode::Auto, root);
        if c.mode_name() != "cgroup" {
            eprintln!("cgroup v2 is not writable here: nothing to make a command in");
            return None;
        }
        Some(c)
    }

    /// Starts `program args` in `dir` with `env`, stdin /dev/null and its
    /// output into the pipe whose reader comes back. Needs a runtime.
    fn start(
        cgroup: BorrowedFd<'_>,
        program: &str,
        args: &[String],
        env: &[(OsString, OsString)],
        dir: &Path,
    ) -> (Result<Born, Failed>, std::io::PipeReader) {
        let (r, w) = std::io::pipe().unwrap();
        let w2 = w.try_clone().unwrap();
        let spec = Spec {
            program: Path::new(program),
            args,
            env,
            dir,
            stdin: std::fs::File::open("/dev/null").unwrap().into(),
            stdout: w.into(),
            stderr: w2.into(),
        };
        (spawn(cgroup, spec), r)
    }

    fn started(r: Result<Born, Failed>) -> Born {
        match r {
            Ok(b) => b,
            Err(Failed::Refused(e, _)) => panic!("clone3 refused: {e}"),
            Err(Failed::Start(e)) => panic!("start failed: {e}"),
        }
    }

    fn start_error(r: Result<Born, Failed>) -> std::io::Error {
        match r {
            Err(Failed::Start(e)) => e,
            Err(Failed::Refused(e, _)) => panic!("clone3 refused: {e}"),
            Ok(b) => panic!("started (pid {})", b.pid()),
        }
    }

    /// The command is made in its cgroup, with exactly its arguments,
    /// environment and directory, stdin empty, a process group of its own,
    /// SIGPIPE at its default, and its exit status comes back.
    #[test]
    fn a_command_is_made_in_its_cgroup_as_asked() {
        let root = tempfile::tempdir().unwrap();
        let Some(contain) = cgroup_mode(root.path()) else {
            return;
        };
        let jail = contain.prepare();
        let cgroup = contain.clone3_target(&jail).expect("a cgroup to start in");
        let script = "grep ^0:: /proc/self/cgroup; echo \"args=$# $1 env=$ONLY path=$PATH\"; \
                      pwd; echo pgid=$(cut -d' ' -f5 /proc/self/stat) pid=$$; \
                      grep ^SigIgn /proc/self/status; grep ^SigBlk /proc/self/status; \
                      echo stdin=$(cat | wc -c); exit 3";
        let args: Vec<String> = ["-c", script, "zero", "one two"].map(String::from).into();
        let env = vec![
            ("ONLY".into(), "this".into()),
            ("PATH".into(), "/usr/bin:/bin".into()),
        ];
        let (status, mut out) = rt().block_on(async {
            let (born, out) = start(cgroup, "/bin/sh", &args, &env, root.path());
            let mut born = started(born);
            // Where it is done, the child shares the buildlet's memory
            // until its exec instead of starting from a copy.
            if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
                assert!(born.shared(), "the child was made from a copy");
            }
            (born.wait().await.unwrap(), out)
        });
        assert_eq!(status.code(), Some(3));
        let mut text = String::new();
        out.read_to_string(&mut text).unwrap();
        let line = text.lines().next().unwrap_or_default();
        assert!(
            line.contains("/farmer-buildlet-") && line.ends_with("/cmd-1"),
            "{text}"
        );
        assert!(
            text.contains("args=1 one two env=this path=/usr/bin:/bin"),
            "{text}"
        );
        assert!(
            text.contains(&format!("\n{}\n", root.path().display())),
            "{text}"
        );
        let pgid = text.split("pgid=").nth(1).and_then(|s| s.split(' ').next());
        let pid = text.split(" pid=").nth(1).and_then(|s| s.lines().next());
        assert!(pgid.is_some() && pgid == pid, "{text}");
        let ignored = text
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:\t"))
            .and_then(|h| u64::from_str_radix(h, 16).ok());
        assert_eq!(
            ignored.map(|m| m & (1 << (libc::SIGPIPE - 1))),
            Some(0),
            "SIGPIPE ignored: {text}"
        );
        assert!(text.contains("SigBlk:\t0000000000000000"), "{text}");
        assert!(text.contains("stdin=0"), "{text}");
        drop(jail);
        contain.shutdown();
    }

    /// A leftover cgroup with the name a command is to get (an earlier
    /// buildlet's) is made afresh, not used: after a `cgroup.kill` Linux
    /// kills every process `clone3` makes in that cgroup.
    #[test]
    fn a_killed_leftover_cgroup_is_made_afresh() {
        let root = tempfile::tempdir().unwrap();
        let Some(contain) = cgroup_mode(root.path()) else {
            return;
        };
        let first = contain.prepare();
        let next = first.cgroup_dir().unwrap().with_file_name("cmd-2");
        std::fs::create_dir(&next).unwrap();
        std::fs::write(next.join("cgroup.kill"), "1").unwrap();
        let jail = contain.prepare();
        assert_eq!(jail.cgroup_dir().as_ref(), Some(&next));
        let cgroup = contain.clone3_target(&jail).unwrap();
        let status = rt().block_on(async {
            let (born, _out) = start(cgroup, "/bin/true", &[], &[], root.path());
            started(born).wait().await.unwrap()
        });
        assert_eq!(status.code(), Some(0), "{status:?}");
        drop((first, jail));
        contain.shutdown();
    }

    /// A start that fails in the child says where.
    #[test]
    fn a_start_that_fails_says_why() {
        let root = tempfile::tempdir().unwrap();
        let Some(contain) = cgroup_mode(root.path()) else {
            return;
        };
        let jail = contain.prepare();
        let cgroup = contain.clone3_target(&jail).unwrap();
        let rt = rt();
        let _g = rt.enter();
        let missing = root.path().join("no-such-program");
        let (r, _) = start(cgroup, missing.to_str().unwrap(), &[], &[], root.path());
        assert_eq!(start_error(r).kind(), std::io::ErrorKind::NotFound);
        let (r, _) = start(cgroup, "/bin/true", &[], &[], &root.path().join("gone"));
        let e = start_error(r);
        assert!(e.to_string().contains("entering its directory"), "{e}");
        let (r, _) = start(cgroup, "/bin/true", &["a\0b".into()], &[], root.path());
        let e = start_error(r);
        assert!(e.to_string().contains("NUL"), "{e}");
        drop(jail);
        contain.shutdown();
    }

    /// A file without an interpreter line runs with /bin/sh, as it does on
    /// the fork path (execvp).
    #[test]
    fn a_script_without_an_interpreter_line_runs_with_sh() {
        let root = tempfile::tempdir().unwrap();
        let Some(contain) = cgroup_mode(root.path()) else {
            return;
        };
        let jail = contain.prepare();
        let cgroup = contain.clone3_target(&jail).unwrap();
        let script = root.path().join("plain");
        std::fs::write(&script, "echo plain script ran with \"$1\"\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let env = vec![("PATH".into(), "/usr/bin:/bin".into())];
        let (status, mut out) = rt().block_on(async {
            let (r, out) = start(
                cgroup,
                script.to_str().unwrap(),
                &["one".into()],
                &env,
                root.path(),
            );
            (started(r).wait().await.unwrap(), out)
        });
        let mut text = String::new();
        out.read_to_string(&mut text).unwrap();
        assert!(status.success(), "{status:?}: {text}");
        assert_eq!(text, "plain script ran with one\n");
        drop(jail);
        contain.shutdown();
    }

    /// A directory that is no cgroup is refused before anything runs, and
    /// the descriptors come back for the fork path.
    #[test]
    fn no_cgroup_is_refused_and_nothing_runs() {
        let root = tempfile::tempdir().unwrap();
        let marker = root.path().join("ran");
        let dir = std::fs::File::open(root.path()).unwrap();
        let rt = rt();
        let _g = rt.enter();
        let args = vec!["-c".to_string(), format!("touch {}", marker.display())];
        match start(dir.as_fd(), "/bin/sh", &args, &[], root.path()).0 {
            Err(Failed::Refused(_, fds)) => assert_eq!(fds.len(), 3),
            _ => panic!("clone3 into a plain directory was not refused"),
        }
        assert!(!marker.exists());
    }

    /// A killed command reports the signal, and is reaped.
    #[test]
    fn a_killed_command_reports_its_signal() {
        let root = tempfile::tempdir().unwrap();
        let Some(contain) = cgroup_mode(root.path()) else {
            return;
        };
        let jail = contain.prepare();
        let cgroup = contain.clone3_target(&jail).unwrap();
        let (status, pid) = rt().block_on(async {
            let (r, _) = start(cgroup, "/bin/sleep", &["1000".into()], &[], root.path());
            let mut born = started(r);
            born.start_kill().unwrap();
            (born.wait().await.unwrap(), born.pid())
        });
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        // Reaped: no such process any more (not even a zombie).
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        drop(jail);
        contain.shutdown();
    }
}
