//! A real buildlet process on loopback, for integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use buildlet::client::Client;

pub struct Harness {
    pub child: Child,
    pub addr: String,
    /// Parent of the work dir; also holds `outside/`, which must never change.
    pub base: tempfile::TempDir,
    pub workdir: PathBuf,
    pub password: Option<String>,
    /// The extra flags it was started with, for [`Harness::restart`].
    extra: Vec<String>,
}

impl Harness {
    pub fn start() -> Harness {
        Harness::start_with(None, &[])
    }

    pub fn start_with(password: Option<&str>, extra: &[&str]) -> Harness {
        let base = tempfile::tempdir().expect("tempdir");
        let workdir = base.path().join("wd");
        let outside = base.path().join("outside");
        std::fs::create_dir_all(outside.join("sub")).unwrap();
        std::fs::write(outside.join("sentinel"), b"do not touch").unwrap();
        std::fs::write(outside.join("sub/file"), b"nested").unwrap();
        if let Some(p) = password {
            std::fs::write(base.path().join("password"), format!("{p}\n")).unwrap();
        }
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let (child, addr) = spawn(base.path(), &workdir, password.is_some(), &extra);
        let workdir = workdir.canonicalize().unwrap();
        Harness {
            child,
            addr,
            base,
            workdir,
            password: password.map(str::to_string),
            extra,
        }
    }

    /// Starts a new buildlet on the same work dir and flags, as a
    /// supervisor would after the old one died (kill it first).
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (child, addr) = spawn(
            self.base.path(),
            &self.workdir,
            self.password.is_some(),
            &self.extra,
        );
        self.child = child;
        self.addr = addr;
    }

    pub fn client(&self) -> Client {
        Client::new(&self.addr, self.password.as_deref())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Everything under the base dir except the work dir: path → content (or link target).
    pub fn outside_snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut out = BTreeMap::new();
        snapshot(self.base.path(), self.base.path(), &self.workdir, &mut out);
        out
    }

    /// The names in the work dir, sorted.
    pub fn workdir_names(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.workdir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Waits for the process to exit, bounded.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

fn spawn(base: &Path, workdir: &Path, password: bool, extra: &[String]) -> (Child, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_buildlet"));
    cmd.arg("-listen=127.0.0.1:0")
        .arg(format!("-workdir={}", workdir.display()))
        .args(extra)
        .env("BUILDLET_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if password {
        cmd.arg(format!(
            "-password-file={}",
            base.join("password").display()
        ));
    }
    let mut child = cmd.spawn().expect("spawn buildlet");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read listen line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (child, addr)
}

fn snapshot(root: &Path, dir: &Path, skip: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        if p == skip || p.canonicalize().ok().as_deref() == Some(skip) {
            continue;
        }
        let rel = p.strip_prefix(root).unwrap().to_path_buf();
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.file_type().is_symlink() {
            out.insert(
                rel,
                std::fs::read_link(&p)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes(),
            );
        } else if meta.is_dir() {
            out.insert(rel, b"<dir>".to_vec());
            snapshot(root, &p, skip, out);
        } else {
            out.insert(rel, std::fs::read(&p).unwrap());
        }
    }
}

impl Drop for Harness {
    /// SIGTERM first, so the buildlet removes its cgroups; SIGKILL if it
    /// does not exit within a few seconds.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                // SAFETY: kill(2) on our own child.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
            if self.wait_exit(Duration::from_secs(5)).is_some() {
                return;
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds a tar.gz in memory from (name, content) pairs of regular files.
pub fn tgz(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        set_raw_name(&mut h, name);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// Writes a name into a tar header without the tar crate's own checks, so
/// tests can build hostile archives.
pub fn set_raw_name(h: &mut tar::Header, name: &str) {
    let gnu = h.as_gnu_mut().unwrap();
    gnu.name = [0; 100];
    gnu.name[..name.len()].copy_from_slice(name.as_bytes());
}

pub fn set_raw_link(h: &mut tar::Header, target: &str) {
    let gnu = h.as_gnu_mut().unwrap();
    gnu.linkname = [0; 100];
    gnu.linkname[..target.len()].copy_from_slice(target.as_bytes());
}

/// One raw entry for [`tgz_raw`].
pub struct Raw<'a> {
    pub name: &'a str,
    pub kind: tar::EntryType,
    pub link: Option<&'a str>,
    pub data: &'a [u8],
}

pub fn raw<'a>(
    name: &'a str,
    kind: tar::EntryType,
    link: Option<&'a str>,
    data: &'a [u8],
) -> Raw<'a> {
    Raw {
        name,
        kind,
        link,
        data,
    }
}

pub fn tgz_raw(entries: &[Raw<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(e.data.len() as u64);
        h.set_mode(if e.kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_entry_type(e.kind);
        set_raw_name(&mut h, e.name);
        if let Some(l) = e.link {
            set_raw_link(&mut h, l);
        }
        h.set_cksum();
        b.append(&h, e.data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Accepts one connection on `l`, failing the test after `limit` (a
/// client that never connects must not hang the test).
pub fn accept_within(l: &std::net::TcpListener, limit: Duration) -> std::net::TcpStream {
    l.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + limit;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no connection within {limit:?}");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}
