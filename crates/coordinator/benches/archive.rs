//! How fast the coordinator turns a commit into the tar.gz it pushes to
//! machines (`git::Repo::archive_tgz`): a tree of 2,000 files (~11 MB of
//! text) made with the git CLI, archived three times after a warm-up.
//!
//! Run with `cargo bench -p coordinator --bench archive`. It prints figures
//! and asserts nothing about speed; it fails only if the archive holds a
//! different number of bytes than the tree.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use coordinator::git::Repo;

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_AUTHOR_DATE", "1700000000 +0000")
        .env("GIT_COMMITTER_DATE", "1700000000 +0000")
        .output()
        .expect("running git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("git output is UTF-8")
}

fn main() {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let dir = tmp.path();
    git(dir, &["init", "-q", "-b", "main"]);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let words = [
        "func", "return", "if", "err", "nil", "package", "import", "struct", "{", "}", "\n", "x",
        "y",
    ];
    let mut total = 0usize;
    for d in 0..50 {
        for i in 0..40 {
            let mut s = String::new();
            let len = 1000 + (i * 397 % 9000);
            while s.len() < len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                s.push_str(words[(seed % words.len() as u64) as usize]);
                s.push(' ');
            }
            total += s.len();
            let path = dir.join(format!("pkg{d}/sub{}/file{i}.go", i % 4));
            std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
            std::fs::write(&path, &s).expect("writing a file");
        }
    }
    git(dir, &["add", "-A"]);
    git(
        dir,
        &[
            "-c",
            "user.name=Bench",
            "-c",
            "user.email=bench@example.com",
            "commit",
            "-q",
            "-m",
            "Many files",
        ],
    );
    let head = git(dir, &["rev-parse", "HEAD"]).trim().to_string();
    git(dir, &["gc", "-q"]);
    let repo = Repo::open(dir.to_str().expect("a UTF-8 path"), &dir.join("cache"))
        .expect("opening the repo");
    let mut out = Vec::with_capacity(total);
    repo.archive_tgz(&head, &mut out).expect("archiving"); // warm up
    let start = Instant::now();
    let rounds = 3;
    let mut bytes = 0;
    for _ in 0..rounds {
        out.clear();
        bytes = repo.archive_tgz(&head, &mut out).expect("archiving");
    }
    let secs = start.elapsed().as_secs_f64() / rounds as f64;
    assert_eq!(
        bytes, total as u64,
        "the archive holds every byte of the tree"
    );
    println!(
        "archive_tgz: 2000 files, {:.1} MB in {:.1} ms ({:.0} MB/s, {:.0} files/s), compressed to {:.1} MB",
        bytes as f64 / 1e6,
        secs * 1e3,
        bytes as f64 / 1e6 / secs,
        2000.0 / secs,
        out.len() as f64 / 1e6
    );
}
