//! Each endpoint of the buildlet, against a real buildlet process on loopback.

use crate::common;

use std::time::{Duration, Instant};

use buildlet::client::{Error, ExecOptions, LsOptions};
use buildlet::proto::{EntryKind, ProcessState};
use bytes::Bytes;
use common::{Harness, runtime, tgz};

fn opts(args: &[&str]) -> ExecOptions {
    ExecOptions {
        args: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[test]
fn status_workdir_healthz() {
    let h = Harness::start_with(None, &["-hostname=bot-7"]);
    runtime().block_on(async {
        let c = h.client();
        c.healthz().await.unwrap();
        let st = c.status().await.unwrap();
        assert_eq!(st.version, buildlet::proto::VERSION);
        assert_eq!(st.hostname, "bot-7");
        assert_eq!(st.os, std::env::consts::OS);
        assert_eq!(st.arch, std::env::consts::ARCH);
        assert_eq!(std::path::Path::new(&st.workdir), h.workdir);
        assert_eq!(std::path::Path::new(&c.workdir().await.unwrap()), h.workdir);
        // The work dir starts empty except for tmp/.
        let ls = c.ls("", &LsOptions::default()).await.unwrap();
        assert_eq!(
            ls.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(),
            vec!["tmp/"]
        );
    });
}

#[test]
fn workdir_is_wiped_at_start() {
    let base = tempfile::tempdir().unwrap();
    let wd = base.path().join("wd");
    std::fs::create_dir_all(wd.join("old/deep")).unwrap();
    std::fs::write(wd.join("old/deep/f"), b"stale").unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_buildlet"))
        .arg("-listen=127.0.0.1:0")
        .arg(format!("--workdir={}", wd.display()))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.starts_with("listening on "), "{line}");
    assert!(!wd.join("old").exists(), "stale content survived the start");
    assert!(wd.join("tmp").is_dir());
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn write_ls_digest_and_modes() {
    let h = Harness::start();
    runtime().block_on(async {
        let c = h.client();
        c.put_file(
            "bin/tool.sh",
            0o755,
            Bytes::from_static(b"#!/bin/sh\necho tool ran\n"),
        )
        .await
        .unwrap();
        c.put_file("a/b/c.txt", 0o644, Bytes::from_static(b"hello"))
            .await
            .unwrap();
        // Overwrite replaces content atomically.
        c.put_file("a/b/c.txt", 0o600, Bytes::from_static(b"hello again"))
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(h.workdir.join("a/b/c.txt")).unwrap(),
            b"hello again"
        );

        let ls = c
            .ls(
                "",
                &LsOptions {
                    recursive: true,
                    digest: true,
                    skip: vec!["tmp".into()],
                },
            )
            .await
            .unwrap();
        let names: Vec<_> = ls.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            names,
            vec!["a/", "a/b/", "a/b/c.txt", "bin/", "bin/tool.sh"]
        );
        let c_txt = &ls[2];
        assert_eq!(c_txt.kind, EntryKind::File);
        assert_eq!(c_txt.size, 11);
        assert_eq!(c_txt.mode & 0o777, 0o600);
        let expect = {
            use sha2::Digest;
            let d = sha2::Sha256::digest(b"hello again");
            d.iter().map(|b| format!("{b:02x}")).collect::<String>()
        };
        assert_eq!(c_txt.sha256.as_deref(), Some(expect.as_str()));
        assert_eq!(ls[4].mode & 0o777, 0o755);

        // Non-recursive listing of a subdirectory.
        let ls = c.ls("a", &LsOptions::default()).await.unwrap();
        assert_eq!(ls.len(), 1);
        assert_eq!(ls[0].path, "b/");

        // The written script runs (mode was honoured).
        let (st, out) = c
            .exec_output("bin/tool.sh", &ExecOptions::default())
            .await
            .unwrap();
        assert_eq!(st, ProcessState::Ok);
        assert_eq!(out, b"tool ran\n");

        // A bad mode is refused.
        let err = c.put_file("x", 0o1777, Bytes::new()).await.unwrap_err();
        assert!(matches!(err, Error::Rejected { .. }), "{err}");
    });
}

#[test]
fn writetgz_tgz_round_trip() {
    let h = Harness::start();
    runtime().block_on(async {
        let c = h.client();
        let archive = tgz(&[
            ("src/main.c", b"int main(){return 0;}\n"),
            ("src/lib/util.h", b"#pragma once\n"),
            ("README", b"readme\n"),
        ]);
        c.put_tgz_bytes("go", Bytes::from(archive)).await.unwrap();
        assert_eq!(
            std::fs::read(h.workdir.join("go/src/lib/util.h")).unwrap(),
            b"#pragma once\n"
        );

        // Streaming upload with progress.
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen2 = seen.clone();
        let archive = tgz(&[("x.txt", &[b'x'; 300_000])]);
        let len = archive.len() as u64;
        c.put_tgz(
            "stream",
            std::io::Cursor::new(archive),
            Some(std::sync::Arc::new(move |n| {
                seen2.store(n, std::sync::atomic::Ordering::SeqCst)
            })),
        )
        .await
        .unwrap();
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), len);
        assert_eq!(
            std::fs::metadata(h.workdir.join("stream/x.txt"))
                .unwrap()
                .len(),
            300_000
        );

        // Pull it back and check the content.
        let mut out = Vec::new();
        let n = c.get_tgz("go", &mut out, None).await.unwrap();
        assert_eq!(n as usize, out.len());
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&out[..]));
        let mut names = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            if name == "src/main.c" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut e, &mut s).unwrap();
                assert_eq!(s, "int main(){return 0;}\n");
            }
            names.push(name);
        }
        assert_eq!(
            names,
            vec!["README", "src", "src/lib", "src/lib/util.h", "src/main.c"]
        );

        // A missing directory is a clear 404.
        let err = c.get_tgz("nope", &mut Vec::new(), None).await.unwrap_err();
        assert!(
            matches!(err, Error::Rejected { status, .. } if status == 404),
            "{err}"
        );
    });
}

#[test]
fn writetgz_from_url() {
    // A second buildlet serves the tarball through its own /tgz endpoint.
    let source = Harness::start();
    let h = Harness::start();
    runtime().block_on(async {
        let s = source.client();
        s.put_tgz_bytes("pkg", Bytes::from(tgz(&[("bin/hello", b"hi\n")])))
            .await
            .unwrap();
        let c = h.client();
        c.put_tgz_from_url("fetched", &source.url("/tgz?dir=pkg"))
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(h.workdir.join("fetched/bin/hello")).unwrap(),
            b"hi\n"
        );

        let err = c
            .put_tgz_from_url("x", &source.url("/tgz?dir=missing"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("404"), "{err}");
        let err = c
            .put_tgz_from_url("x", "ftp://example/x.tgz")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Rejected { .. }), "{err}");
        let err = c
            .put_tgz_from_url("x", "http://127.0.0.1:1/x.tgz")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("fetching"), "{err}");
    });
}

#[test]
fn removeall() {
    let h = Harness::start();
    runtime().block_on(async {
        let c = h.client();
        c.put_tgz_bytes(
            "",
            Bytes::from(tgz(&[
                ("a/1", b"1"),
                ("a/2", b"2"),
                ("b/3", b"3"),
                ("c", b"c"),
            ])),
        )
        .await
        .unwrap();
        // Read-only directories are removed too.
        c.exec_output(
            "chmod",
            &ExecOptions {
                args: vec!["0555".into(), "a".into()],
                sys: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        c.remove_all(&["a", "c", "does-not-exist"]).await.unwrap();
        assert!(!h.workdir.join("a").exists());
        assert!(!h.workdir.join("c").exists());
        assert!(h.workdir.join("b/3").exists());
        c.remove_all(&["."]).await.unwrap();
        assert_eq!(h.workdir_names(), ["tmp"]);
        let err = c.remove_all(&[]).await.unwrap_err();
        assert!(matches!(err, Error::Rejected { .. }));
    });
}

/// Emptying the work dir keeps its own `tmp` (the same directory, emptied,
/// its mode given back) instead of removing and making it again; a `tmp`
/// a step replaced with a link is removed, never followed.
#[test]
#[cfg(unix)]
fn removeall_keeps_an_emptied_tmp_and_never_follows_one() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let h = Harness::start();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("keep"), "mine").unwrap();
    runtime().block_on(async {
        let c = h.client();
        let tmp = h.workdir.join("tmp");
        let ino = std::fs::metadata(&tmp).unwrap().ino();
        // The same inode number can come back for a directory made anew;
        // its birth time cannot.
        let born = std::fs::metadata(&tmp).unwrap().created().ok();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::create_dir_all(tmp.join("deep/er")).unwrap();
        std::fs::write(tmp.join("deep/er/f"), "x").unwrap();
        std::fs::write(tmp.join("g"), "y").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o500)).unwrap();
        c.remove_all(&["."]).await.unwrap();
        let meta = std::fs::symlink_metadata(&tmp).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.ino(), ino, "tmp was made anew instead of kept");
        assert_eq!(
            meta.created().ok(),
            born,
            "tmp was made anew instead of kept"
        );
        assert_eq!(meta.permissions().mode() & 0o777, 0o755);
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);

        std::fs::remove_dir(&tmp).unwrap();
        std::os::unix::fs::symlink(outside.path(), &tmp).unwrap();
        c.remove_all(&["."]).await.unwrap();
        assert!(std::fs::symlink_metadata(&tmp).unwrap().is_dir());
        assert_eq!(
            std::fs::read_to_string(outside.path().join("keep")).unwrap(),
            "mine"
        );
        assert_eq!(h.workdir_names(), ["tmp"]);
    });
}

/// A command's output is read by a task of the buildlet's runtime, not a
/// thread made per command, and all of it arrives in order. The threads
/// are looked at while the command is known to run: it says so by a file,
/// and waits for one from the test before it ends.
#[test]
#[cfg(target_os = "linux")]
fn exec_output_is_read_without_a_thread_per_command() {
    let h = Harness::start();
    let pid = h.child.id();
    let (running, go) = (h.workdir.join("running"), h.workdir.join("go"));
    runtime().block_on(async {
        let c = h.client();
        let run = tokio::spawn(async move {
            c.exec_output(
                "sh",
                &ExecOptions {
                    args: vec![
                        "-c".into(),
                        "echo one; touch running; i=0; \
                         while [ ! -e go ] && [ $i -lt 1000 ]; do sleep 0.01; i=$((i+1)); done; \
                         echo two >&2; echo three"
                            .into(),
                    ],
                    sys: true,
                    ..Default::default()
                },
            )
            .await
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !running.exists() {
            assert!(Instant::now() < deadline, "the command did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
            .map(|comm| comm.trim().to_string())
            .collect();
        std::fs::write(&go, "").unwrap();
        let (state, out) = run.await.unwrap().unwrap();
        assert_eq!(state, ProcessState::Ok);
        assert_eq!(String::from_utf8_lossy(&out), "one\ntwo\nthree\n");
        assert!(
            !threads.iter().any(|t| t.starts_with("exec-output")),
            "{threads:?}"
        );
    });
}

#[test]
fn exec_streams_in_order_with_trailer() {
    let h = Harness::start();
    runtime().block_on(async {
        use http_body_util::BodyExt;
        // Raw HTTP to see frames arrive one by one.
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<http_body_util::Full<Bytes>>();
        let req = http::Request::post(h.url("/exec"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("te", "trailers")
            .body(http_body_util::Full::new(Bytes::from(
                "cmd=sh&args=-c&args=echo+one%3B+echo+err+1%3E%262%3B+sleep+0.4%3B+echo+two%3B+exit+3&mode=sys",
            )))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["trailer"], "Process-State");
        let mut body = resp.into_body();
        let mut data = Vec::new();
        let mut first_seen = false;
        let mut trailer = None;
        while let Some(f) = body.frame().await {
            let f = f.unwrap();
            if let Some(d) = f.data_ref() {
                if !first_seen {
                    first_seen = true;
                    assert!(!String::from_utf8_lossy(d).contains("two"), "output was not streamed: {d:?}");
                }
                data.extend_from_slice(d);
            } else if let Some(t) = f.trailers_ref() {
                trailer = Some(t["process-state"].to_str().unwrap().to_string());
            }
        }
        assert_eq!(String::from_utf8(data).unwrap(), "one\nerr\ntwo\n");
        assert_eq!(trailer.as_deref(), Some("exit status 3"));

        // Through the typed client: a failed command is Ok(state), not Err.
        let c = h.client();
        let (st, out) = c.exec_output("sh", &ExecOptions { sys: true, ..opts(&["-c", "echo out; exit 7"]) }).await.unwrap();
        assert_eq!(st, ProcessState::Exited(7));
        assert!(!st.success());
        assert_eq!(out, b"out\n");
    });
}

#[test]
fn exec_environment_dir_and_resolution() {
    let h = Harness::start();
    runtime().block_on(async {
        let c = h.client();
        c.put_file(
            "sub/dir/show.sh",
            0o755,
            Bytes::from_static(b"#!/bin/sh\necho \"pwd=$(pwd) tmp=$TMPDIR foo=$FOO\"\n"),
        )
        .await
        .unwrap();
        c.put_file(
            "true",
            0o755,
            Bytes::from_static(b"#!/bin/sh\necho workdir-true\n"),
        )
        .await
        .unwrap();
        let wd = h.workdir.display().to_string();

        // Relative path with a separator: relative to the work dir; dir defaults to the script's.
        let (st, out) = c
            .exec_output(
                "sub/dir/show.sh",
                &ExecOptions {
                    env: vec!["FOO=bar".into()],
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(st, ProcessState::Ok);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("pwd={wd}/sub/dir tmp={wd}/tmp foo=bar\n")
        );

        // Explicit dir.
        let (_, out) = c
            .exec_output(
                "sub/dir/show.sh",
                &ExecOptions {
                    dir: Some("sub".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert!(
            String::from_utf8(out)
                .unwrap()
                .starts_with(&format!("pwd={wd}/sub "))
        );

        // A bare name is found in the work dir first ...
        let (_, out) = c
            .exec_output("true", &ExecOptions::default())
            .await
            .unwrap();
        assert_eq!(out, b"workdir-true\n");
        // ... but mode=sys uses only the system's.
        let (st, out) = c
            .exec_output(
                "true",
                &ExecOptions {
                    sys: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(st, ProcessState::Ok);
        assert!(out.is_empty());
        // mode=sys refuses work-dir-relative paths.
        let err = c
            .exec_output(
                "sub/dir/show.sh",
                &ExecOptions {
                    sys: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Rejected { .. }), "{err}");

        // path entries rebuild PATH with $WORKDIR and $PATH.
        let (_, out) = c
            .exec_output(
                "sh",
                &ExecOptions {
                    path: vec!["$WORKDIR/sub/dir".into(), "$PATH".into()],
                    sys: true,
                    ..opts(&["-c", "show.sh"])
                },
            )
            .await
            .unwrap();
        assert!(String::from_utf8(out).unwrap().starts_with("pwd="));

        // HOME, TMPDIR and the HOME fallback.
        let (_, out) = c
            .exec_output(
                "sh",
                &ExecOptions {
                    sys: true,
                    ..opts(&["-c", "echo $TMPDIR; test -d $TMPDIR && echo ok"])
                },
            )
            .await
            .unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), format!("{wd}/tmp\nok\n"));

        // Unknown command: a clear refusal, not a communication error.
        let err = c
            .exec_output("no-such-command-xyz", &ExecOptions::default())
            .await
            .unwrap_err();
        assert!(!err.is_communication());
        assert!(err.to_string().contains("no-such-command-xyz"), "{err}");
        let err = c
            .exec_output(
                "sh",
                &ExecOptions {
                    env: vec!["NOEQUALS".into()],
                    sys: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("KEY=VALUE"), "{err}");
    });
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn wait_dead(pid: i32, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if !pid_alive(pid) || is_zombie(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

fn read_pids(path: &std::path::Path, n: usize, limit: Duration) -> Vec<i32> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(s) = std::fs::read_to_string(path) {
            let pids: Vec<i32> = s
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect();
            if pids.len() >= n {
                return pids;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("pids never written to {}", path.display());
}

#[test]
fn exec_client_disconnect_kills_process_tree() {
    let h = Harness::start();
    let rt = runtime();
    let c = h.client();
    // The shell starts a grandchild; both write their pids, then sleep.
    let script = "sleep 60 & echo $! > pids; echo $$ >> pids; echo started; wait";
    let task = rt.spawn(async move {
        let mut sink = Vec::new();
        c.exec(
            "sh",
            &ExecOptions {
                sys: true,
                ..opts(&["-c", script])
            },
            &mut sink,
        )
        .await
    });
    let pids = read_pids(&h.workdir.join("pids"), 2, Duration::from_secs(10));
    for &p in &pids {
        assert!(pid_alive(p), "process {p} should be running");
    }
    task.abort(); // drops the connection
    for &p in &pids {
        assert!(
            wait_dead(p, Duration::from_secs(10)),
            "process {p} survived the client going away"
        );
    }
}

#[test]
fn exec_timeout_kills_tree_and_reports() {
    let h = Harness::start();
    runtime().block_on(async {
        let c = h.client();
        let start = Instant::now();
        let (st, out) = c
            .exec_output(
                "sh",
                &ExecOptions {
                    sys: true,
                    // Long enough for `sh` to start on a loaded machine.
                    timeout: Some(Duration::from_secs(2)),
                    ..opts(&["-c", "sleep 30 & echo $! > pid; echo begun; wait"])
                },
            )
            .await
            .unwrap();
        assert!(
            matches!(st, ProcessState::TimedOut(d) if d == Duration::from_secs(2)),
            "{st:?}"
        );
        assert_eq!(out, b"begun\n");
        assert!(start.elapsed() < Duration::from_secs(20));
        let pid: i32 = std::fs::read_to_string(h.workdir.join("pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            wait_dead(pid, Duration::from_secs(10)),
            "background child survived the timeout"
        );
    });
}

#[test]
fn halt_exits_cleanly() {
    let mut h = Harness::start();
    runtime().block_on(async { h.client().halt().await.unwrap() });
    let st = h
        .wait_exit(Duration::from_secs(10))
        .expect("buildlet did not exit after /halt");
    assert!(st.success(), "{st}");
}

#[test]
fn halt_kills_running_commands() {
    let mut h = Harness::start();
    let rt = runtime();
    let c = h.client();
    let c2 = c.clone();
    let task = rt.spawn(async move {
        let mut sink = Vec::new();
        c2.exec(
            "sh",
            &ExecOptions {
                sys: true,
                ..opts(&["-c", "echo $$ > pid; exec sleep 60"])
            },
            &mut sink,
        )
        .await
    });
    let pid = read_pids(&h.workdir.join("pid"), 1, Duration::from_secs(10))[0];
    rt.block_on(c.halt()).unwrap();
    assert!(h.wait_exit(Duration::from_secs(10)).is_some());
    assert!(wait_dead(pid, Duration::from_secs(10)));
    // The interrupted exec is a communication failure, not a command result.
    let res = rt.block_on(task).unwrap();
    match res {
        Err(e) => assert!(e.is_communication(), "{e}"),
        Ok(st) => assert!(!st.success(), "killed command reported success"),
    }
}

#[test]
fn unreachable_buildlet_is_a_communication_error() {
    runtime().block_on(async {
        let c = buildlet::client::Client::new("127.0.0.1:1", None);
        let err = c.status().await.unwrap_err();
        assert!(matches!(err, Error::Unreachable(_)), "{err}");
        assert!(err.is_communication());
        let err = c
            .exec_output("true", &ExecOptions::default())
            .await
            .unwrap_err();
        assert!(err.is_communication());
    });
}

#[test]
fn buildlet_killed_mid_exec_is_broke_off() {
    let mut h = Harness::start();
    let rt = runtime();
    let c = h.client();
    // The output comes through a pipe the test reads: once "hi" arrived,
    // the reply is streaming, and the buildlet dies mid-reply.
    let (mut sink, mut seen) = tokio::io::duplex(1 << 16);
    let task = rt.spawn(async move {
        c.exec(
            "sh",
            &ExecOptions {
                sys: true,
                ..opts(&["-c", "echo hi; sleep 30"])
            },
            &mut sink,
        )
        .await
    });
    rt.block_on(async {
        use tokio::io::AsyncReadExt;
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while !got.ends_with(b"hi\n") {
            let n = tokio::time::timeout(Duration::from_secs(10), seen.read(&mut buf))
                .await
                .expect("no output within 10 s")
                .unwrap();
            assert!(n > 0, "the output ended early: {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
    });
    h.child.kill().unwrap();
    let res = rt.block_on(task).unwrap();
    let err = res.expect_err("a killed buildlet must not look like a command result");
    assert!(matches!(err, Error::BrokeOff(_)), "{err}");
    assert!(err.is_communication());
}
