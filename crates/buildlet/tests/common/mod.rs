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
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_buildlet"));
        cmd.arg("-listen=127.0.0.1:0")
            .arg(format!("-workdir={}", workdir.display()))
            .args(extra)
            .env("BUILDLET_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(p) = password {
            let pf = base.path().join("password");
            std::fs::write(&pf, format!("{p}\n")).unwrap();
            cmd.arg(format!("-password-file={}", pf.display()));
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
        let workdir = workdir.canonicalize().unwrap();
        Harness {
            child,
            addr,
            base,
            workdir,
            password: password.map(str::to_string),
        }
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
    fn drop(&mut self) {
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
