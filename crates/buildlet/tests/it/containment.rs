//! Every process of a command dies with it: on disconnect, timeout, /halt,
//! normal exit, and when the buildlet itself is SIGKILLed (then the direct
//! child dies at once and the next buildlet on the work dir kills the rest).
//!
//! Commands start `setsid`ed grandchildren and double-forked daemons, which
//! a process-group kill misses. Each test gives its sleeps a unique duration
//! (the marker) and finds them through `/proc/*/cmdline`. Each scenario runs
//! in the default mode (cgroup where the machine allows) and in reaper mode.
#![cfg(target_os = "linux")]

use crate::common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use buildlet::client::{Error, ExecOptions};
use buildlet::proto::ProcessState;
use common::{Harness, runtime};

/// A unique `sleep` duration for one test, e.g. `7000123.4567`.
pub(crate) fn marker() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}.{}",
        7_000_000 + N.fetch_add(1, Ordering::SeqCst),
        std::process::id()
    )
}

/// Live (non-zombie) processes whose command line mentions `marker`.
pub(crate) fn marked(marker: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if !String::from_utf8_lossy(&cmdline).contains(marker) {
            continue;
        }
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if !zombie {
            out.push(pid);
        }
    }
    out
}

/// Polls until the script's three `sleep`s (the setsid grandchild, the
/// orphaned daemon and the plain child) run; returns every marked process.
/// Counting marked processes alone would also count the shells that carry
/// the marker before they exec, and could return before the daemon exists.
fn await_sleepers(marker: &str) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found = marked(marker);
        let sleeps = found
            .iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == "sleep")
            })
            .count();
        if sleeps >= 3 {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "only {sleeps} of the 3 sleeps marked {marker} started ({found:?})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls until no marked process is left; panics naming the survivors.
pub(crate) fn assert_none_left(marker: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = marked(marker);
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            let names: Vec<String> = left
                .iter()
                .map(|p| {
                    let c = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                    format!("{p}: {}", String::from_utf8_lossy(&c).replace('\0', " "))
                })
                .collect();
            panic!("{what}: processes survived: {names:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills whatever a failed test left behind, so no sleep outlives the run.
pub(crate) struct Sweep(pub(crate) String);

impl Drop for Sweep {
    fn drop(&mut self) {
        for p in marked(&self.0) {
            // SAFETY: kill(2) on a process this test started.
            unsafe {
                libc::kill(p, libc::SIGKILL);
            }
        }
    }
}

/// A shell script that starts, all with the marker in their argv:
/// a `setsid`ed grandchild, a double-forked `setsid` daemon (its parent
/// exits at once, so it is orphaned), and a plain background child; then
/// writes `started` and waits (or exits, with `exit_now`).
fn script(marker: &str, exit_now: bool) -> String {
    let tail = if exit_now { "exit 0" } else { "wait" };
    format!(
        "setsid sh -c 'sleep {marker}' & \
         ( ( setsid sleep {marker} & ) & ) ; \
         sleep {marker} & \
         echo $$ > started; echo started; {tail}"
    )
}

fn opts(script: &str) -> ExecOptions {
    ExecOptions {
        args: vec!["-c".into(), script.into()],
        sys: true,
        ..Default::default()
    }
}

/// The default (cgroup where the machine allows, commands made inside it
/// by clone3), cgroup with forked commands that join it (where clone3 is
/// refused), and reaper mode.
fn modes() -> [(&'static str, &'static [&'static str]); 3] {
    [
        ("default", &[]),
        ("fork", &["-spawn=fork"]),
        ("reaper", &["-contain=reaper"]),
    ]
}

#[test]
fn disconnect_kills_setsid_grandchildren_and_daemons() {
    for (mode, flags) in modes() {
        let m = marker();
        let _sweep = Sweep(m.clone());
        let h = Harness::start_with(None, flags);
        let rt = runtime();
        let c = h.client();
        let s = script(&m, false);
        let task = rt.spawn(async move {
            let mut sink = Vec::new();
            c.exec("sh", &opts(&s), &mut sink).await
        });
        await_sleepers(&m);
        task.abort(); // drops the connection
        assert_none_left(&m, &format!("{mode}: client went away"));
    }
}

#[test]
fn timeout_kills_setsid_grandchildren_and_daemons() {
    for (mode, flags) in modes() {
        let m = marker();
        let _sweep = Sweep(m.clone());
        let h = Harness::start_with(None, flags);
        let c = h.client();
        let s = script(&m, false);
        let watcher = {
            let m = m.clone();
            std::thread::spawn(move || await_sleepers(&m).len())
        };
        let (st, _) = runtime()
            .block_on(c.exec_output(
                "sh",
                &ExecOptions {
                    timeout: Some(Duration::from_secs(2)),
                    ..opts(&s)
                },
            ))
            .unwrap();
        assert!(matches!(st, ProcessState::TimedOut(_)), "{mode}: {st:?}");
        assert!(watcher.join().unwrap() >= 3);
        assert_none_left(&m, &format!("{mode}: timeout"));
    }
}

#[test]
fn halt_kills_setsid_grandchildren_and_daemons() {
    for (mode, flags) in modes() {
        let m = marker();
        let _sweep = Sweep(m.clone());
        let mut h = Harness::start_with(None, flags);
        let rt = runtime();
        let c = h.client();
        let c2 = c.clone();
        let s = script(&m, false);
        let task = rt.spawn(async move {
            let mut sink = Vec::new();
            c2.exec("sh", &opts(&s), &mut sink).await
        });
        await_sleepers(&m);
        rt.block_on(c.halt()).unwrap();
        assert!(h.wait_exit(Duration::from_secs(10)).is_some(), "{mode}");
        assert_none_left(&m, &format!("{mode}: /halt"));
        let res = rt.block_on(task).unwrap();
        if let Err(e) = res {
            assert!(e.is_communication(), "{mode}: {e}");
        }
    }
}

#[test]
fn command_exit_kills_what_it_left_running() {
    for (mode, flags) in modes() {
        let m = marker();
        let _sweep = Sweep(m.clone());
        let h = Harness::start_with(None, flags);
        let c = h.client();
        // The daemons keep the output pipe open; the exec must still end,
        // with the command's own status. Without the kill it would wait for
        // the daemons' sleeps (months): the bound is a hang detector.
        let (st, out) = runtime()
            .block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(120),
                    c.exec_output("sh", &opts(&script(&m, true))),
                )
                .await
            })
            .unwrap_or_else(|_| panic!("{mode}: the exec hung; the daemons kept it open"))
            .unwrap();
        assert_eq!(st, ProcessState::Ok, "{mode}");
        // A shell of the script may report the daemon it lost ("Killed");
        // what the command itself printed comes first.
        assert!(
            out.starts_with(b"started\n"),
            "{mode}: {}",
            String::from_utf8_lossy(&out)
        );
        assert_none_left(&m, &format!("{mode}: after the command exited"));
    }
}

#[test]
fn killed_buildlet_leaves_nothing_once_restarted() {
    for (mode, flags) in modes() {
        let m = marker();
        let _sweep = Sweep(m.clone());
        let mut h = Harness::start_with(None, flags);
        let rt = runtime();
        let c = h.client();
        let s = script(&m, false);
        let task = rt.spawn(async move {
            let mut sink = Vec::new();
            c.exec("sh", &opts(&s), &mut sink).await
        });
        await_sleepers(&m);
        let sh: i32 = std::fs::read_to_string(h.workdir.join("started"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        h.child.kill().unwrap(); // SIGKILL: no cleanup of its own
        h.child.wait().unwrap();
        // The direct child dies with the buildlet (PR_SET_PDEATHSIG).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !gone(sh) {
            assert!(
                Instant::now() < deadline,
                "{mode}: the command's shell survived its buildlet"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let res = rt.block_on(task).unwrap();
        assert!(
            matches!(res, Err(Error::BrokeOff(_))),
            "{mode}: {:?}",
            res.map_err(|e| e.to_string())
        );
        // The supervisor starts a new buildlet on the same work dir: it
        // kills what the old one's commands left.
        h.restart();
        assert_none_left(&m, &format!("{mode}: after restart"));
        runtime().block_on(h.client().status()).unwrap();
    }
}

fn gone(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// The buildlet's cgroup v2 directory (the test's own, which it inherits),
/// if cgroup v2 is mounted and we may create cgroups in it, with the mount.
fn writable_cgroup() -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))?
        .trim()
        .to_string();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = mounts.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next()? == "cgroup2").then(|| pre.split_whitespace().nth(4))?
    })?;
    let dir = std::path::Path::new(mount).join(own.trim_start_matches('/'));
    let probe = dir.join(format!("farmer-test-probe-{}", std::process::id()));
    std::fs::create_dir(&probe).ok()?;
    std::fs::remove_dir(&probe).ok()?;
    Some((std::path::PathBuf::from(mount), dir))
}

#[test]
fn commands_run_in_their_own_cgroup_where_possible() {
    let h = Harness::start_with(None, &["-contain=cgroup"]);
    let (st, out) = runtime()
        .block_on(h.client().exec_output(
            "sh",
            &opts("grep ^0:: /proc/self/cgroup; echo scope=$FARMER_BUILDLET_SCOPE"),
        ))
        .unwrap();
    assert_eq!(st, ProcessState::Ok);
    let out = String::from_utf8_lossy(&out);
    // Every command carries its scope marker `<scope>.<n>`, which the
    // reaper fallback relies on.
    let scope = out
        .lines()
        .find_map(|l| l.strip_prefix("scope="))
        .unwrap_or_default();
    assert!(scope.contains('.') && !scope.starts_with('.'), "{out}");
    match writable_cgroup() {
        Some((mount, dir)) => {
            assert!(
                out.contains("/farmer-buildlet-") && out.contains("/cmd-"),
                "cgroup v2 is writable at {} but the command ran in: {out}",
                dir.display()
            );
            // Once no command runs, the buildlet's cgroups are gone.
            let line = out.lines().find(|l| l.starts_with("0::")).unwrap();
            let cmd = std::path::Path::new(line.trim_start_matches("0::").trim_start_matches('/'));
            assert_gone_when_idle(&mount.join(cmd.parent().unwrap()));
            drop(h);
        }
        None => eprintln!("cgroup v2 not writable here; the command ran in: {out}"),
    }
}

/// Runs `script` (which prints its `/proc/self/cgroup` line) and returns
/// the cgroup it ran in.
fn cgroup_of(h: &Harness, script: &str) -> String {
    let (st, out) = runtime()
        .block_on(h.client().exec_output("sh", &opts(script)))
        .unwrap();
    let out = String::from_utf8_lossy(&out).into_owned();
    assert_eq!(st, ProcessState::Ok, "{script}: {out}");
    out.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_else(|| panic!("no cgroup in {out}"))
        .to_string()
}

/// A command that ended with nothing left running leaves its cgroup to
/// the next command; one whose leftovers had to be killed does not (Linux
/// kills every process later made in a cgroup that was `cgroup.kill`ed),
/// and the command after it runs normally. Idle, the buildlet still
/// removes them all.
#[test]
fn an_emptied_cgroup_is_reused_and_a_killed_one_is_not() {
    let Some((mount, _)) = writable_cgroup() else {
        eprintln!("cgroup v2 not writable here; nothing to reuse");
        return;
    };
    let h = Harness::start_with(None, &["-contain=cgroup"]);
    let m = marker();
    let run = |script: String| cgroup_of(&h, &script);
    let first = run("grep ^0:: /proc/self/cgroup".into());
    let second = run("grep ^0:: /proc/self/cgroup".into());
    assert_eq!(first, second, "the emptied cgroup was not reused");
    // Leaves a process behind: killed with its cgroup, which goes.
    let third = run(format!("setsid sleep {m} & grep ^0:: /proc/self/cgroup"));
    assert_eq!(third, second);
    let fourth = run("grep ^0:: /proc/self/cgroup".into());
    assert_ne!(fourth, third, "a killed cgroup was reused");
    assert_none_left(&m, "after the command that left it ended");
    assert_gone_when_idle(mount.join(fourth.trim_start_matches('/')).parent().unwrap());
}

/// Waits (at most 10 s) for an idle buildlet to remove its base cgroup.
fn assert_gone_when_idle(base: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while base.exists() {
        assert!(
            Instant::now() < deadline,
            "{} left behind by an idle buildlet",
            base.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process that moved itself into a kept (unused) cgroup is killed when
/// a command would get that cgroup, and the command gets another.
#[test]
fn a_process_in_a_kept_cgroup_is_killed_and_the_cgroup_not_used() {
    let Some((mount, _)) = writable_cgroup() else {
        eprintln!("cgroup v2 not writable here; nothing to reuse");
        return;
    };
    let h = Harness::start_with(None, &["-contain=cgroup"]);
    let run = || cgroup_of(&h, "grep ^0:: /proc/self/cgroup");
    // Kept before the command's end is answered.
    let kept = run();
    let dir = mount.join(kept.trim_start_matches('/'));
    let mut intruder = std::process::Command::new("sleep")
        .arg(marker())
        .spawn()
        .unwrap();
    std::fs::write(dir.join("cgroup.procs"), intruder.id().to_string()).unwrap();
    let next = run();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = intruder.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Never left running by a failed test.
    let _ = intruder.kill();
    let _ = intruder.wait();
    assert_ne!(next, kept, "a cgroup with a process in it was used");
    let status = status.expect("the intruder still ran 10 s later");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
}

/// A step that moves itself out of its command's cgroup (into the
/// buildlet's own, which its user may write) and out of its process group
/// is still killed when its command ends.
#[test]
fn a_process_that_leaves_its_cgroup_still_dies_with_the_command() {
    let Some((_mount, own)) = writable_cgroup() else {
        eprintln!("cgroup v2 not writable here; nothing to escape from");
        return;
    };
    let m = marker();
    let _sweep = Sweep(m.clone());
    let h = Harness::start_with(None, &["-contain=cgroup"]);
    let procs = own.join("cgroup.procs");
    let script = format!(
        "( setsid sh -c 'echo $$ > {procs} && touch moved && exec sleep {m}' & ) ; \
         i=0; while [ ! -e moved ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done; \
         test -e moved && echo escaped",
        procs = procs.display()
    );
    let (st, out) = runtime()
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(60),
                h.client().exec_output("sh", &opts(&script)),
            )
            .await
        })
        .expect("the exec hung")
        .unwrap();
    assert_eq!(st, ProcessState::Ok);
    assert_eq!(String::from_utf8_lossy(&out).trim(), "escaped");
    assert_none_left(&m, "after the command whose step left its cgroup exited");
}

/// The buildlet's zombie children (of all its threads), by `/proc`.
fn zombie_children(pid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        for k in kids
            .split_whitespace()
            .filter_map(|k| k.parse::<i32>().ok())
        {
            let zombie = std::fs::read_to_string(format!("/proc/{k}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, r)| r.trim_start().starts_with('Z'))
                })
                .unwrap_or(false);
            if zombie {
                out.push(k);
            }
        }
    }
    out
}

/// A process orphaned while its command runs is reparented to the buildlet
/// (a subreaper) and, once it exits, reaped by it: no zombie of the
/// buildlet is left once the command has ended.
#[test]
fn orphans_that_exit_are_reaped_not_left_as_zombies() {
    for (mode, flags) in modes() {
        let m = marker();
        let _sweep = Sweep(m.clone());
        let h = Harness::start_with(None, flags);
        let pid = h.child.id();
        // The subshell exits at once, so the inner `sh` becomes the
        // buildlet's child; it writes its pid and exits while the command
        // still runs. A zombie still answers `kill -0`: the command waits
        // (bounded) until the buildlet has reaped it, and says if not.
        let s = format!(
            "(sh -c 'echo $$ > orphan' &); \
             i=0; while [ ! -s orphan ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done; \
             p=$(cat orphan); i=0; \
             while kill -0 $p 2>/dev/null && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done; \
             kill -0 $p 2>/dev/null && echo unreaped; echo orphan $p; : {m}"
        );
        let (st, out) = runtime()
            .block_on(h.client().exec_output("sh", &opts(&s)))
            .unwrap();
        let out = String::from_utf8_lossy(&out);
        assert_eq!(st, ProcessState::Ok, "{mode}: {out}");
        assert!(
            out.contains("orphan ") && !out.contains("unreaped"),
            "{mode}: {out}"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut left = zombie_children(pid);
        while !left.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            left = zombie_children(pid);
        }
        assert!(left.is_empty(), "{mode}: zombies of the buildlet: {left:?}");
    }
}
