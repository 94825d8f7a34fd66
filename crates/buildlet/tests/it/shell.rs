//! `POST /shell`: a session under a real pseudo-terminal (or pipes) on a
//! real buildlet, driven through the client: what the terminal reports,
//! resizes, end of input, and that every process of a session dies when
//! the client goes away or sends garbage.
#![cfg(target_os = "linux")]

use crate::common;
use crate::containment::{Sweep, assert_none_left, marked, marker};

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use buildlet::client::{Error, ShellEvent, ShellInput, ShellOptions, ShellSession};
use buildlet::proto::{self, ProcessState};
use bytes::Bytes;
use common::{Harness, runtime};
use tokio::sync::mpsc;

/// The longest any step of these tests may take; a hang detector.
const STEP: Duration = Duration::from_secs(30);

fn input(s: &str) -> ShellInput {
    ShellInput::Data(Bytes::copy_from_slice(s.as_bytes()))
}

/// Reads output until `needle` appears (returning everything read so far)
/// or the session ends (a failure: the needle never came).
async fn read_until(s: &mut ShellSession, out: &mut Vec<u8>, needle: &str) {
    let found = tokio::time::timeout(STEP, async {
        loop {
            if String::from_utf8_lossy(out).contains(needle) {
                return;
            }
            match s.next().await.expect("session broke off") {
                ShellEvent::Output(b) => out.extend_from_slice(&b),
                ShellEvent::Exit(st) => panic!(
                    "session ended ({st}) before {needle:?}; output {:?}",
                    String::from_utf8_lossy(out)
                ),
            }
        }
    })
    .await;
    assert!(
        found.is_ok(),
        "no {needle:?} within {STEP:?}; output {:?}",
        String::from_utf8_lossy(out)
    );
}

/// Reads the rest of the session: its output and exit state.
async fn finish(s: &mut ShellSession, out: &mut Vec<u8>) -> ProcessState {
    tokio::time::timeout(STEP, async {
        loop {
            match s.next().await.expect("session broke off") {
                ShellEvent::Output(b) => out.extend_from_slice(&b),
                ShellEvent::Exit(st) => return st,
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "session did not end within {STEP:?}; output {:?}",
            String::from_utf8_lossy(out)
        )
    })
}

#[test]
fn pty_session_has_the_size_and_term_given_and_its_exit_status() {
    let h = Harness::start();
    let c = h.client();
    runtime().block_on(async {
        let (tx, rx) = mpsc::channel(4);
        let opts = ShellOptions {
            term: "xterm-farmer-test".into(),
            cols: 101,
            rows: 33,
            // Neither names the terminal nor picks the login's shell: the
            // checked `term` and the buildlet's $SHELL do (a client's
            // /bin/false would end the session with status 1).
            env: vec!["TERM=other".into(), "SHELL=/bin/false".into()],
            ..Default::default()
        };
        let mut s = c.shell(&opts, rx).await.unwrap();
        tx.send(input("stty size; echo \"T=$TERM\"; tty; exit 3\n"))
            .await
            .unwrap();
        let mut out = Vec::new();
        let st = finish(&mut s, &mut out).await;
        let text = String::from_utf8_lossy(&out);
        assert_eq!(st, ProcessState::Exited(3), "{text}");
        // Only the commands' output has these; the echoed input has `$TERM`.
        assert!(text.contains("33 101"), "{text}");
        assert!(text.contains("T=xterm-farmer-test"), "{text}");
        assert!(text.contains("/dev/pts/"), "a real terminal: {text}");
        // The exit state is the last event.
        assert!(matches!(s.next().await, Err(Error::Protocol(_))));
    });
}

#[test]
fn resize_mid_session_changes_the_terminal_size() {
    let h = Harness::start();
    let c = h.client();
    runtime().block_on(async {
        let (tx, rx) = mpsc::channel(4);
        let opts = ShellOptions {
            command: Some(
                "stty size; echo ready; read x; stty size; echo \"got $x\"; exit 0".into(),
            ),
            ..Default::default()
        };
        let mut s = c.shell(&opts, rx).await.unwrap();
        let mut out = Vec::new();
        read_until(&mut s, &mut out, "ready").await;
        assert!(
            String::from_utf8_lossy(&out).contains("24 80"),
            "default size"
        );
        tx.send(ShellInput::Resize {
            cols: 120,
            rows: 40,
        })
        .await
        .unwrap();
        tx.send(input("line\n")).await.unwrap();
        let st = finish(&mut s, &mut out).await;
        let text = String::from_utf8_lossy(&out);
        assert_eq!(st, ProcessState::Ok, "{text}");
        assert!(text.contains("40 120"), "{text}");
        assert!(text.contains("got line"), "{text}");
    });
}

#[test]
fn without_a_terminal_stdin_ends_with_eof_and_stderr_is_merged() {
    let h = Harness::start();
    let c = h.client();
    std::fs::create_dir(h.workdir.join("sub")).unwrap();
    runtime().block_on(async {
        let (tx, rx) = mpsc::channel(4);
        let opts = ShellOptions {
            pty: false,
            command: Some("cat; echo \"err $FOO $(basename \"$PWD\")\" >&2; exit 0".into()),
            env: vec!["FOO=bar".into()],
            dir: Some("sub".into()),
            ..Default::default()
        };
        let mut s = c.shell(&opts, rx).await.unwrap();
        tx.send(input("hello\n")).await.unwrap();
        tx.send(input("world\n")).await.unwrap();
        tx.send(ShellInput::Eof).await.unwrap();
        let mut out = Vec::new();
        let st = finish(&mut s, &mut out).await;
        assert_eq!(st, ProcessState::Ok);
        // No terminal: no echo, no CR, exactly what cat and echo wrote.
        assert_eq!(String::from_utf8_lossy(&out), "hello\nworld\nerr bar sub\n");
    });
}

/// Polls until `n` `sleep`s carrying `marker` run.
fn await_sleeps(marker: &str, n: usize) {
    let deadline = Instant::now() + STEP;
    loop {
        let sleeps = marked(marker)
            .iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == "sleep")
            })
            .count();
        if sleeps >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {sleeps} of {n} sleeps {marker} started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_client_that_goes_away_leaves_no_process() {
    for (mode, flags) in [("default", &[][..]), ("reaper", &["-contain=reaper"][..])] {
        for keep_sender in [false, true] {
            let m = marker();
            let _sweep = Sweep(m.clone());
            let h = Harness::start_with(None, flags);
            let c = h.client();
            let rt = runtime();
            let (tx, rx) = mpsc::channel(4);
            let s = rt.block_on(c.shell(&ShellOptions::default(), rx)).unwrap();
            // A background job the shell does not wait for, a setsid one
            // outside its process group, and one in the foreground.
            rt.block_on(tx.send(input(&format!(
                "sleep {m} & setsid sleep {m} & sleep {m}\n"
            ))))
            .unwrap();
            await_sleeps(&m, 3);
            let what = format!("{mode}, sender kept {keep_sender}");
            if keep_sender {
                // Dropping the session must end it even while the input
                // sender lives on (a caller still holding it).
                drop(s);
                assert_none_left(&m, &what);
                drop(tx);
            } else {
                // The input ending first (`ssh host cmd </dev/null`) ends
                // nothing: the foreground sleep runs on; then the session
                // goes, and everything with it.
                drop(tx);
                await_sleeps(&m, 3);
                drop(s);
                assert_none_left(&m, &what);
            }
        }
    }
}

#[test]
fn halt_kills_sessions() {
    let m = marker();
    let _sweep = Sweep(m.clone());
    let mut h = Harness::start();
    let c = h.client();
    let rt = runtime();
    let (_tx, rx) = mpsc::channel(4);
    let opts = ShellOptions {
        command: Some(format!("setsid sleep {m} & sleep {m}")),
        ..Default::default()
    };
    let mut s = rt.block_on(c.shell(&opts, rx)).unwrap();
    await_sleeps(&m, 2);
    rt.block_on(c.halt()).unwrap();
    assert!(h.wait_exit(STEP).is_some(), "buildlet did not halt");
    assert_none_left(&m, "/halt");
    // The session ended: with its kill signal or, the connection being
    // closed by the halt, broken off; never hanging.
    let res = rt
        .block_on(async {
            tokio::time::timeout(STEP, async {
                loop {
                    match s.next().await {
                        Ok(ShellEvent::Output(_)) => continue,
                        other => return other,
                    }
                }
            })
            .await
        })
        .expect("session hung after /halt");
    match res {
        Ok(ShellEvent::Exit(st)) => assert!(!st.success(), "{st}"),
        Ok(ShellEvent::Output(_)) => unreachable!(),
        Err(e) => assert!(e.is_communication(), "{e}"),
    }
}

#[test]
fn bad_parameters_are_refused_and_nothing_runs() {
    let h = Harness::start();
    let c = h.client();
    let rt = runtime();
    let ran = h.workdir.join("ran");
    let touch = Some("touch ran".to_string());
    let cases: Vec<(&str, ShellOptions)> = vec![
        (
            "cols",
            ShellOptions {
                cols: 0,
                command: touch.clone(),
                ..Default::default()
            },
        ),
        (
            "rows",
            ShellOptions {
                rows: 1001,
                command: touch.clone(),
                ..Default::default()
            },
        ),
        (
            "term",
            ShellOptions {
                term: "xterm\u{1b}]0;pwned\u{7}".into(),
                command: touch.clone(),
                ..Default::default()
            },
        ),
        (
            "term",
            ShellOptions {
                term: "x".repeat(65),
                command: touch.clone(),
                ..Default::default()
            },
        ),
        (
            "dir",
            ShellOptions {
                dir: Some("../outside".into()),
                command: touch.clone(),
                ..Default::default()
            },
        ),
        (
            "env",
            ShellOptions {
                env: vec!["NOEQUALS".into()],
                command: touch.clone(),
                ..Default::default()
            },
        ),
        (
            "cmd",
            ShellOptions {
                command: Some(String::new()),
                ..Default::default()
            },
        ),
    ];
    for (what, opts) in cases {
        let (_tx, rx) = mpsc::channel(1);
        match rt.block_on(c.shell(&opts, rx)) {
            Err(Error::Rejected { status, message }) => {
                assert_eq!(status.as_u16(), 400, "{what}: {message}");
                assert!(message.contains(what), "{what}: {message}");
            }
            other => panic!("{what}: expected a 400, got {other:?}"),
        }
    }
    // A raw request with a pty value that is neither 0 nor 1.
    // It asks to keep the connection, whose body the refusal leaves
    // unread: the answer must close it, or a pooling client (the
    // coordinator's) sends its next request down a connection the buildlet
    // is about to drop and gets no answer.
    let resp = raw_request(&h, "/shell?pty=2&cmd=touch+ran");
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    let head = resp.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
    assert!(head.contains("\r\nconnection: close"), "{resp}");
    assert!(!ran.exists(), "a refused session ran its command");
    // The same command with good parameters does run: the check above
    // would notice.
    let (_tx, rx) = mpsc::channel(1);
    let mut s = rt
        .block_on(c.shell(
            &ShellOptions {
                command: touch,
                ..Default::default()
            },
            rx,
        ))
        .unwrap();
    assert_eq!(
        rt.block_on(finish(&mut s, &mut Vec::new())),
        ProcessState::Ok
    );
    assert!(ran.exists());
    assert!(
        h.outside_snapshot()
            .contains_key(std::path::Path::new("outside/sentinel"))
    );
}

/// Sends one HTTP/1.1 request with a chunked body of `frames` (not ended)
/// and returns everything the buildlet answered until it closed the
/// connection, within [`STEP`].
fn raw_request(h: &Harness, path_and_query: &str) -> String {
    let mut conn = std::net::TcpStream::connect(&h.addr).unwrap();
    conn.set_read_timeout(Some(STEP)).unwrap();
    let req = format!(
        "POST {path_and_query} HTTP/1.1\r\nHost: buildlet\r\nTE: trailers\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    conn.write_all(&req).unwrap();
    // A refusal is complete at its body; a session at its trailer.
    read_answer(&mut conn, "reading the answer", |text| {
        text.starts_with("HTTP/1.1 4") && text.ends_with('\n') && text.contains("\r\n\r\n")
            || text.contains("\r\n0\r\n") && text.ends_with("\r\n\r\n")
    })
}

/// Reads a raw HTTP/1 answer from `conn` until `done` says it is whole,
/// the connection closes, or [`STEP`] passes.
fn read_answer(conn: &mut impl Read, what: &str, done: impl Fn(&str) -> bool) -> String {
    let mut out = Vec::new();
    let deadline = Instant::now() + STEP;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if done(&String::from_utf8_lossy(&out)) {
                    break;
                }
            }
            Err(e) => panic!("{what}: {e}; so far {:?}", String::from_utf8_lossy(&out)),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn a_bad_frame_ends_the_session_with_its_processes_killed() {
    let h = Harness::start();
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("unknown type", vec![9, 0, 0, 0, 0], "type 9"),
        ("oversized", vec![0, 0, 0x10, 0, 0], "larger than"),
        ("short resize", vec![1, 0, 0, 0, 2, 0, 80], "exactly 4"),
    ];
    for (what, frame, needle) in cases {
        let m = marker();
        let _sweep = Sweep(m.clone());
        let cmd = format!("setsid+sleep+{m}+%26+sleep+{m}");
        let path = format!("/shell?pty=0&cmd={cmd}");
        // The sleeps must be running before the bad frame is judged, or
        // the test would pass with a session that never started.
        let watcher = {
            let m = m.clone();
            std::thread::spawn(move || await_sleeps(&m, 2))
        };
        // A good frame first, then the bad one once the sleeps run.
        let answer = {
            let mut conn = std::net::TcpStream::connect(&h.addr).unwrap();
            conn.set_read_timeout(Some(STEP)).unwrap();
            let good = ShellInput::Data(Bytes::from_static(b"x")).encode();
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: buildlet\r\nTE: trailers\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
                good.len()
            );
            conn.write_all(head.as_bytes()).unwrap();
            conn.write_all(&good).unwrap();
            conn.write_all(b"\r\n").unwrap();
            watcher.join().unwrap();
            conn.write_all(format!("{:x}\r\n", frame.len()).as_bytes())
                .unwrap();
            conn.write_all(&frame).unwrap();
            conn.write_all(b"\r\n").unwrap();
            // The last chunk, then the trailer.
            read_answer(&mut conn, &format!("{what}: reading the answer"), |text| {
                let text = text.to_ascii_lowercase();
                text.contains(&format!("\r\n0\r\n{}", proto::PROCESS_STATE_TRAILER))
                    && text.ends_with("\r\n\r\n")
            })
        };
        assert!(answer.starts_with("HTTP/1.1 200"), "{what}: {answer}");
        let lower = answer.to_ascii_lowercase();
        assert!(
            lower.contains("process-state: error bad input"),
            "{what}: {answer}"
        );
        assert!(answer.contains(needle), "{what}: {answer}");
        assert_none_left(&m, what);
    }
}
