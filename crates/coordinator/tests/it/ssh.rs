//! The gomote SSH server (`gomote::ssh`) driven by the real OpenSSH client,
//! onto a real buildlet (`farmer buildlet` in direct mode) through a test
//! backend: terminals, exit statuses, refusals before anything reaches the
//! machine, a client that vanishes, and a host key that survives restarts.
#![cfg(target_os = "linux")]

use crate::common::{self, FARMER, Lines, Reaped, output_within};

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use buildlet::client::Client;
use coordinator::gomote::ssh::{self, SshBackend, SshOptions};

/// The longest one ssh run may take; a hang detector.
const RUN: Duration = Duration::from_secs(60);

/// Authorizes one key for `inst-1` and counts what it was asked.
struct Backend {
    fingerprint: String,
    client: Client,
    refused: Mutex<Vec<(String, String)>>,
    opened: AtomicUsize,
    /// Guards handed out and not yet dropped.
    live_guards: Arc<AtomicUsize>,
}

struct Guard(Arc<AtomicUsize>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl SshBackend for Backend {
    fn authorize(&self, instance: &str, fingerprint: &str) -> Result<(), String> {
        if instance == "inst-1" && fingerprint == self.fingerprint {
            return Ok(());
        }
        self.refused
            .lock()
            .unwrap()
            .push((instance.to_string(), fingerprint.to_string()));
        Err(format!("{fingerprint} may not use {instance}"))
    }

    fn open(&self, instance: &str) -> Result<(Client, Box<dyn Send + Sync>), String> {
        assert_eq!(instance, "inst-1", "open is only reached after authorize");
        self.opened.fetch_add(1, Ordering::SeqCst);
        self.live_guards.fetch_add(1, Ordering::SeqCst);
        Ok((
            self.client.clone(),
            Box::new(Guard(self.live_guards.clone())),
        ))
    }
}

/// A buildlet, the SSH server in front of it, and two client keys.
struct Farm {
    dir: tempfile::TempDir,
    _buildlet: Reaped,
    rt: tokio::runtime::Runtime,
    stop: tokio::sync::watch::Sender<bool>,
    served: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    port: u16,
    backend: Arc<Backend>,
}

pub(crate) fn keygen(path: &Path) {
    let out = output_within(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "test", "-f"])
            .arg(path),
        RUN,
    );
    assert!(out.status.success(), "ssh-keygen: {out:?}");
}

impl Farm {
    fn start() -> Farm {
        let dir = tempfile::tempdir().unwrap();
        keygen(&dir.path().join("key"));
        keygen(&dir.path().join("other"));
        let line = std::fs::read_to_string(dir.path().join("key.pub")).unwrap();
        let fingerprint = ssh::fingerprint_of_openssh_line(&line).unwrap();
        // The server's fingerprints are OpenSSH's own.
        let keygen_l = output_within(
            Command::new("ssh-keygen")
                .arg("-lf")
                .arg(dir.path().join("key.pub")),
            RUN,
        );
        assert!(
            String::from_utf8_lossy(&keygen_l.stdout).contains(&fingerprint),
            "{fingerprint} vs {keygen_l:?}"
        );

        let mut child = Reaped(
            Command::new(FARMER)
                .arg("buildlet")
                .arg("-listen=127.0.0.1:0")
                .arg(format!("-workdir={}", dir.path().join("wd").display()))
                .env("BUILDLET_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let addr = first
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("buildlet said {first:?}"))
            .to_string();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let backend = Arc::new(Backend {
            fingerprint,
            client: Client::new(&addr, None),
            refused: Mutex::new(Vec::new()),
            opened: AtomicUsize::new(0),
            live_guards: Arc::new(AtomicUsize::new(0)),
        });
        let (stop, _) = tokio::sync::watch::channel(false);
        let mut farm = Farm {
            dir,
            _buildlet: child,
            rt,
            stop,
            served: None,
            port: 0,
            backend,
        };
        farm.serve();
        farm
    }

    fn host_key(&self) -> PathBuf {
        self.dir.path().join("ssh_host_ed25519_key")
    }

    /// (Re)starts the SSH server on a fresh port, same host key.
    fn serve(&mut self) {
        self.serve_with(SshOptions::new(self.host_key()));
    }

    fn serve_with(&mut self, opts: SshOptions) {
        self.stop_serving();
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        self.stop = stop;
        let listener = self
            .rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        self.port = listener.local_addr().unwrap().port();
        let backend: Arc<dyn SshBackend> = self.backend.clone();
        self.served = Some(
            self.rt
                .spawn(async move { ssh::serve(listener, opts, backend, stop_rx).await }),
        );
    }

    fn stop_serving(&mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.served.take() {
            let res = self
                .rt
                .block_on(async { tokio::time::timeout(RUN, task).await })
                .expect("the SSH server did not stop");
            res.unwrap().unwrap();
        }
    }

    /// An `ssh` command line to `user` with `key`, every prompt off.
    fn ssh(&self, key: &str, user: &str, extra: &[&str]) -> Command {
        let mut c = Command::new("ssh");
        c.args(common::SSH_QUIET)
            .args(["-o", "ConnectTimeout=20", "-F", "/dev/null", "-i"])
            .arg(self.dir.path().join(key))
            .arg("-p")
            .arg(self.port.to_string())
            .args(extra)
            .arg(format!("{user}@127.0.0.1"))
            .stdin(Stdio::null());
        c
    }

    /// Polls until every session guard was dropped.
    fn await_guards_released(&self) {
        let deadline = Instant::now() + RUN;
        while self.backend.live_guards.load(Ordering::SeqCst) > 0 {
            assert!(
                Instant::now() < deadline,
                "a session guard (the lease keeper) was never released"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.served.take() {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(RUN, task).await });
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn a_terminal_session_has_the_clients_term_and_exit_status() {
    let farm = Farm::start();
    let out = output_within(
        farm.ssh("key", "inst-1", &["-tt"])
            .arg("stty size; echo \"T=$TERM\"; tty; exit 3")
            .env("TERM", "xterm-256color"),
        RUN,
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(stdout.contains("T=xterm-256color"), "{stdout}");
    assert!(stdout.contains("/dev/pts/"), "a real terminal: {stdout}");
    // A size line: two numbers (ssh without a local terminal asks for
    // 0x0, which the server takes as the default 80x24).
    assert!(
        stdout.lines().any(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.len() == 2 && w.iter().all(|n| n.parse::<u16>().is_ok_and(|n| n > 0))
        }),
        "{stdout}"
    );
    assert_eq!(farm.backend.opened.load(Ordering::SeqCst), 1);
    farm.await_guards_released();
}

#[test]
fn a_command_without_a_terminal_gets_its_output_and_status() {
    let farm = Farm::start();
    let out = output_within(
        farm.ssh("key", "inst-1", &[])
            .arg("echo hi; echo oops >&2; test -t 0 || echo no-tty; exit 7"),
        RUN,
    );
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let stdout = text(&out.stdout);
    // No terminal (stdin is not one), stdout and stderr merged in order.
    assert_eq!(stdout, "hi\noops\nno-tty", "{out:?}");
    farm.await_guards_released();
}

#[test]
fn keys_and_instances_not_authorized_never_reach_the_machine() {
    let farm = Farm::start();
    let other = output_within(farm.ssh("other", "inst-1", &[]).arg("echo ran"), RUN);
    assert_eq!(other.status.code(), Some(255), "{other:?}");
    assert!(!text(&other.stdout).contains("ran"));
    let wrong_instance = output_within(farm.ssh("key", "inst-2", &[]).arg("echo ran"), RUN);
    assert_eq!(
        wrong_instance.status.code(),
        Some(255),
        "{wrong_instance:?}"
    );
    assert_eq!(farm.backend.opened.load(Ordering::SeqCst), 0);
    let refused = farm.backend.refused.lock().unwrap().clone();
    assert!(
        refused.iter().any(|(i, _)| i == "inst-1"),
        "the other key was asked about: {refused:?}"
    );
    assert!(
        refused
            .iter()
            .any(|(i, fp)| i == "inst-2" && *fp == farm.backend.fingerprint),
        "{refused:?}"
    );
    // Subsystems (sftp) are refused with a clear failure, nothing opened.
    let sftp = output_within(farm.ssh("key", "inst-1", &["-s"]).arg("sftp"), RUN);
    assert_ne!(sftp.status.code(), Some(0), "{sftp:?}");
    assert_eq!(farm.backend.opened.load(Ordering::SeqCst), 0);
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
        let is_sleep =
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep");
        if is_sleep
            && String::from_utf8_lossy(&cmdline).contains(marker)
            && crate::common::alive(pid as u32)
        {
            out.push(pid);
        }
    }
    out
}

#[test]
fn a_client_that_vanishes_leaves_no_process_on_the_machine() {
    let farm = Farm::start();
    let marker = format!("1000.{}", std::process::id());
    let mut ssh = Reaped(
        farm.ssh("key", "inst-1", &["-tt"])
            .arg(format!("sleep {marker}; echo done"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let _out = Lines::follow(ssh.stdout.take().unwrap());
    let deadline = Instant::now() + RUN;
    while marked(&marker).is_empty() {
        assert!(
            Instant::now() < deadline,
            "sleep {marker} never started on the machine"
        );
        assert!(ssh.try_wait().unwrap().is_none(), "ssh ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGKILL: the client says nothing, its socket just closes.
    ssh.kill().unwrap();
    ssh.wait().unwrap();
    let deadline = Instant::now() + RUN;
    loop {
        let left = marked(&marker);
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            for p in &left {
                // SAFETY: kill(2) on a process this test started.
                unsafe {
                    libc::kill(*p, libc::SIGKILL);
                }
            }
            panic!("sleep {marker} survived its client: {left:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    farm.await_guards_released();
}

/// The server's host key as `ssh-keyscan` sees it.
fn scan(port: u16) -> String {
    let out = output_within(
        Command::new("ssh-keyscan")
            .args(["-t", "ed25519", "-T", "20", "-p"])
            .arg(port.to_string())
            .arg("127.0.0.1"),
        RUN,
    );
    text(&out.stdout)
        .lines()
        .find(|l| l.contains("ssh-ed25519"))
        .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| panic!("no host key scanned: {out:?}"))
}

#[test]
fn the_host_key_is_created_private_and_kept_across_restarts() {
    let mut farm = Farm::start();
    let first = scan(farm.port);
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(farm.host_key()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // The file's own public half is what the server presents.
    let derived = output_within(
        Command::new("ssh-keygen")
            .arg("-y")
            .arg("-f")
            .arg(farm.host_key()),
        RUN,
    );
    assert!(
        text(&derived.stdout).contains(&first),
        "{first} vs {derived:?}"
    );
    let old_port = farm.port;
    farm.serve();
    assert_ne!(farm.port, old_port);
    assert_eq!(scan(farm.port), first, "a restart changed the host key");
}

/// Reads from `conn` until the server closes it, within `limit`; what it
/// sent. Panics if it stays open.
fn read_until_closed(conn: &mut std::net::TcpStream, limit: Duration) -> Vec<u8> {
    use std::io::Read;
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        conn.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        match conn.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return got,
        }
    }
    panic!("the server kept the connection open for {limit:?}");
}

#[test]
fn unauthenticated_and_surplus_connections_are_closed() {
    let mut farm = Farm::start();
    let mut opts = SshOptions::new(farm.host_key());
    opts.auth_timeout = Duration::from_secs(2);
    opts.max_connections = 2;
    farm.serve_with(opts);
    let addr = format!("127.0.0.1:{}", farm.port);
    let mut idle: Vec<std::net::TcpStream> = (0..2)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    // Both are being served: the server sent its version line.
    for c in &mut idle {
        use std::io::Read;
        c.set_read_timeout(Some(RUN)).unwrap();
        let mut buf = [0u8; 8];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"SSH-2.0-");
    }
    // A third is over the limit: closed without a word (a served one
    // would get the version line first).
    let mut third = std::net::TcpStream::connect(&addr).unwrap();
    assert_eq!(read_until_closed(&mut third, RUN), b"");
    // The idle ones never authenticated: cut at the deadline.
    for c in &mut idle {
        read_until_closed(c, RUN);
    }
    // Their slots are free again: a real login works.
    let out = output_within(farm.ssh("key", "inst-1", &[]).arg("exit 0"), RUN);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    farm.await_guards_released();
}
