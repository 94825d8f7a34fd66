//! The git module against real repositories made with the `git` CLI.
#![cfg(unix)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use coordinator::git::{self, Commit, GitError, NewCommit, Repo};

const T0: i64 = 1_700_000_000;

/// Runs git in `dir` with an isolated config; `time` sets both dates.
fn git_at(dir: &Path, time: Option<(i64, i64)>, args: &[&str]) -> String {
    let mut cmd = Command::new("git");
    cmd.current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "Alice Gopher")
        .env("GIT_AUTHOR_EMAIL", "alice@example.com")
        .env("GIT_COMMITTER_NAME", "Carol Committer")
        .env("GIT_COMMITTER_EMAIL", "carol@example.com")
        .args([
            "-c",
            "core.symlinks=true",
            "-c",
            "commit.gpgsign=false",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args);
    if let Some((author, committer)) = time {
        cmd.env("GIT_AUTHOR_DATE", format!("@{author} +0000"))
            .env("GIT_COMMITTER_DATE", format!("@{committer} +0000"));
    }
    let out = cmd.output().expect("running git");
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn git(dir: &Path, args: &[&str]) -> String {
    git_at(dir, None, args)
}

/// Commits everything in the work tree; the committer time is 50s after
/// the author time so the two can be told apart.
fn commit_all(dir: &Path, time: i64, message: &str) -> String {
    git(dir, &["add", "-A"]);
    git_at(
        dir,
        Some((time, time + 50)),
        &["commit", "-q", "-m", message],
    );
    git(dir, &["rev-parse", "HEAD"])
}

fn write(dir: &Path, rel: &str, content: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

fn make_executable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    work: PathBuf,
    cache: PathBuf,
    /// main: c1 <- c2 <- c3; dev: c2 <- d1.
    c1: String,
    c2: String,
    c3: String,
    d1: String,
}

/// A work-tree repository: an executable script, nested dirs, a symlink,
/// a submodule (gitlink), a multi-line message, two branches.
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let work = root.join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    write(&work, "README", "hello\n");
    write(&work, "run.sh", "#!/bin/sh\necho hi\n");
    make_executable(&work.join("run.sh"));
    write(&work, "src/b.txt", "bee\n");
    write(&work, "src/lib/a.txt", "a\n");
    std::os::unix::fs::symlink("src/lib/a.txt", work.join("link")).unwrap();
    let c1 = commit_all(
        &work,
        T0,
        "Initial import\n\nWith a body\nthat spans lines.",
    );
    write(&work, "README", "hello, world\n");
    let c2 = commit_all(&work, T0 + 100, "Update the README");
    git(&work, &["branch", "dev"]);
    write(&work, "docs/guide.md", "# Guide\n");
    git(&work, &["add", "-A"]);
    git(
        &work,
        &[
            "update-index",
            "--add",
            "--cacheinfo",
            &format!("160000,{c1},vendor/sub"),
        ],
    );
    git_at(
        &work,
        Some((T0 + 200, T0 + 250)),
        &["commit", "-q", "-m", "Add the guide and a submodule"],
    );
    let c3 = git(&work, &["rev-parse", "HEAD"]);
    assert!(git(&work, &["ls-tree", "-r", &c3]).contains("160000 commit"));
    git(&work, &["checkout", "-q", "dev"]);
    write(&work, "dev.txt", "dev\n");
    let d1 = commit_all(&work, T0 + 150, "Dev work");
    git(&work, &["checkout", "-q", "main"]);
    let cache = root.join("cache");
    Fixture {
        _tmp: tmp,
        root,
        work,
        cache,
        c1,
        c2,
        c3,
        d1,
    }
}

fn hashes(commits: &[Commit]) -> Vec<&str> {
    commits.iter().map(|c| c.hash.as_str()).collect()
}

#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Dir { mode: u32 },
    File { mode: u32, content: Vec<u8> },
    Symlink { target: String },
}

/// Extracts a tar.gz into (path, entry) in archive order, checking the
/// common header fields on the way.
fn untar(tgz: &[u8], mtime: u64) -> Vec<(String, Entry)> {
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(tgz));
    let mut out = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_str().unwrap().to_string();
        let raw = String::from_utf8(e.path_bytes().to_vec()).unwrap();
        assert!(
            !raw.starts_with("./") && !raw.starts_with('/'),
            "entry name {raw:?}"
        );
        let h = e.header();
        assert_eq!(h.mtime().unwrap(), mtime, "mtime of {path}");
        assert_eq!(
            (h.uid().unwrap(), h.gid().unwrap()),
            (0, 0),
            "owner of {path}"
        );
        let mode = h.mode().unwrap();
        let entry = match h.entry_type() {
            tar::EntryType::Directory => Entry::Dir { mode },
            tar::EntryType::Regular => {
                let mut content = Vec::new();
                e.read_to_end(&mut content).unwrap();
                Entry::File { mode, content }
            }
            tar::EntryType::Symlink => Entry::Symlink {
                target: e
                    .link_name()
                    .unwrap()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string(),
            },
            other => panic!("unexpected entry type {other:?} for {path}"),
        };
        out.push((path, entry));
    }
    out
}

fn file(mode: u32, content: &str) -> Entry {
    Entry::File {
        mode,
        content: content.as_bytes().to_vec(),
    }
}

#[test]
fn repo_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<Repo>();
    assert_send_sync::<GitError>();
}

#[test]
fn branch_heads() {
    let f = fixture();
    let repo = Repo::open(f.work.to_str().unwrap(), &f.cache).unwrap();
    assert!(!repo.is_clone());
    assert_eq!(
        repo.branch_head("main").unwrap().as_deref(),
        Some(f.c3.as_str())
    );
    assert_eq!(
        repo.branch_head("dev").unwrap().as_deref(),
        Some(f.d1.as_str())
    );
    assert_eq!(repo.branch_head("nope").unwrap(), None);
    // A local repository is read in place: a new commit shows at once, and
    // fetch is a no-op.
    write(&f.work, "new.txt", "new\n");
    let c4 = commit_all(&f.work, T0 + 300, "Another");
    repo.fetch().unwrap();
    assert_eq!(repo.branch_head("main").unwrap(), Some(c4));
    assert!(!f.cache.exists(), "nothing is cloned for a local path");

    let err = repo.branch_head("a..b").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, GitError::Invalid { .. }), "{err:?}");
    assert!(
        msg.contains("\"a..b\"") && msg.contains(f.work.to_str().unwrap()),
        "{msg}"
    );
}

#[test]
fn new_commits_order_known_and_limit() {
    let f = fixture();
    let repo = Repo::open(f.work.to_str().unwrap(), &f.cache).unwrap();
    let none = |_: &str| false;
    let all = repo.new_commits(&f.c3, &none, 100).unwrap();
    assert_eq!(hashes(&all), [&f.c3, &f.c2, &f.c1]);
    let known = |h: &str| h == f.c2;
    assert_eq!(
        hashes(&repo.new_commits(&f.c3, &known, 100).unwrap()),
        [&f.c3]
    );
    assert_eq!(
        hashes(&repo.new_commits(&f.c3, &none, 2).unwrap()),
        [&f.c3, &f.c2]
    );
    assert!(repo.new_commits(&f.c3, &none, 0).unwrap().is_empty());
    let head_known = |h: &str| h == f.c3;
    assert!(
        repo.new_commits(&f.c3, &head_known, 100)
            .unwrap()
            .is_empty()
    );
    // The dev branch shares c2 and c1 with main.
    let known_main = |h: &str| [&f.c1, &f.c2, &f.c3].contains(&&h.to_string());
    assert_eq!(
        hashes(&repo.new_commits(&f.d1, &known_main, 100).unwrap()),
        [&f.d1]
    );
    // Branch names and abbreviated hashes work as heads too.
    assert_eq!(
        hashes(&repo.new_commits("main", &known, 100).unwrap()),
        [&f.c3]
    );
    assert_eq!(
        hashes(&repo.new_commits(&f.c3[..10], &known, 100).unwrap()),
        [&f.c3]
    );
}

#[test]
fn new_commits_follow_git_log_order_through_merges() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    git(dir, &["init", "-q", "-b", "main"]);
    write(dir, "a", "1");
    let m1 = commit_all(dir, 1000, "m1");
    git(dir, &["checkout", "-q", "-b", "feature"]);
    write(dir, "f", "1");
    let f1 = commit_all(dir, 1100, "f1");
    git(dir, &["checkout", "-q", "main"]);
    write(dir, "a", "2");
    let m2 = commit_all(dir, 1200, "m2");
    git(dir, &["checkout", "-q", "feature"]);
    write(dir, "f", "2");
    let f2 = commit_all(dir, 1300, "f2");
    git(dir, &["checkout", "-q", "main"]);
    git_at(
        dir,
        Some((1400, 1450)),
        &["merge", "-q", "--no-ff", "-m", "Merge feature", "feature"],
    );
    let merge = git(dir, &["rev-parse", "HEAD"]);
    write(dir, "a", "3");
    let m3 = commit_all(dir, 1500, "m3");

    let repo = Repo::open(dir.to_str().unwrap(), &dir.join("cache")).unwrap();
    let got = repo.new_commits("main", &|_| false, 100).unwrap();
    let want = git(dir, &["log", "--format=%H", "main"]);
    assert_eq!(hashes(&got), want.lines().collect::<Vec<_>>());
    assert_eq!(hashes(&got), [&m3, &merge, &f2, &m2, &f1, &m1]);

    let merge_commit = repo.commit(&merge).unwrap();
    assert_eq!(merge_commit.parents, [m2.as_str(), f2.as_str()]);
    assert_eq!(merge_commit.subject, "Merge feature");

    // Everything up to m2 was seen on an earlier poll: the merge brings f2
    // and f1, which are not reachable through any known commit.
    let known = |h: &str| h == m2 || h == m1;
    assert_eq!(
        hashes(&repo.new_commits(&m3, &known, 100).unwrap()),
        [&m3, &merge, &f2, &f1]
    );
    assert_eq!(
        hashes(&repo.new_commits(&m3, &known, 3).unwrap()),
        [&m3, &merge, &f2]
    );
}

#[test]
fn commit_fields() {
    let f = fixture();
    let repo = Repo::open(f.work.to_str().unwrap(), &f.cache).unwrap();
    let c1 = repo.commit(&f.c1).unwrap();
    assert_eq!(
        c1,
        Commit {
            hash: f.c1.clone(),
            parents: vec![],
            author: "Alice Gopher".into(),
            email: "alice@example.com".into(),
            time: T0,
            subject: "Initial import".into(),
        }
    );
    let c3 = repo.commit(&f.c3).unwrap();
    assert_eq!(c3.parents, [f.c2.as_str()]);
    assert_eq!(c3.time, T0 + 200, "author time, not committer time");
    assert_eq!(c3.subject, "Add the guide and a submodule");
    // Abbreviated hashes and branch names resolve to the full hash.
    assert_eq!(repo.commit(&f.c3[..8]).unwrap(), c3);
    assert_eq!(repo.commit("main").unwrap(), c3);
    assert_eq!(repo.commit(&f.c3.to_uppercase()).unwrap(), c3);
    // Serializes with the field names the API uses.
    let json = serde_json::to_value(&c3).unwrap();
    assert_eq!(json["hash"], f.c3.as_str());
    assert_eq!(json["time"], T0 + 200);
}

#[test]
fn unknown_commits_and_branches_are_named_in_errors() {
    let f = fixture();
    let repo = Repo::open(f.work.to_str().unwrap(), &f.cache).unwrap();
    let path = f.work.to_str().unwrap();
    let missing = "0123456789abcdef0123456789abcdef01234567";
    for rev in [missing, "nosuchbranch", "deadbeef"] {
        let err = repo.commit(rev).unwrap_err();
        assert!(matches!(err, GitError::NotFound { .. }), "{rev}: {err:?}");
        let msg = err.to_string();
        assert!(msg.contains(rev) && msg.contains(path), "{msg}");
        let msg = repo.archive_tgz(rev, Vec::new()).unwrap_err().to_string();
        assert!(msg.contains(rev) && msg.contains(path), "{msg}");
        let msg = repo
            .new_commits(rev, &|_| false, 10)
            .unwrap_err()
            .to_string();
        assert!(msg.contains(rev) && msg.contains(path), "{msg}");
    }
    let err = repo.commit("").unwrap_err();
    assert!(matches!(err, GitError::Invalid { .. }), "{err:?}");
    // A tree is not a commit.
    let tree = git(&f.work, &["rev-parse", "HEAD^{tree}"]);
    let err = repo.commit(&tree).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, GitError::Invalid { .. }), "{err:?}");
    assert!(msg.contains(&tree) && msg.contains("not a commit"), "{msg}");
}

#[test]
fn open_errors_name_the_repository() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let missing = tmp.path().join("no-such-repo");
    let err = Repo::open(missing.to_str().unwrap(), &cache).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, GitError::Open { .. }), "{err:?}");
    assert!(msg.contains(missing.to_str().unwrap()), "{msg}");

    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let msg = Repo::open(empty.to_str().unwrap(), &cache)
        .unwrap_err()
        .to_string();
    assert!(msg.contains(empty.to_str().unwrap()), "{msg}");

    let err = Repo::open("", &cache).unwrap_err();
    assert!(matches!(err, GitError::Open { .. }), "{err:?}");

    // https:// goes through the system's git; a remote that refuses the
    // connection is a clone error that names the URL, without its password.
    for url in [
        "https://user:s3cret@127.0.0.1:1/repo.git",
        "http://127.0.0.1:1/repo.git",
    ] {
        let err = Repo::open(url, &cache).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, GitError::Clone { .. }), "{err:?}");
        assert!(
            msg.contains("127.0.0.1:1/repo.git") && !msg.contains("s3cret"),
            "{msg}"
        );
    }
    let err = Repo::open("svn://example.com/repo", &cache).unwrap_err();
    assert!(matches!(err, GitError::Unsupported { .. }), "{err:?}");

    // A file:// URL is cloned; a failed clone names the URL and leaves
    // nothing behind.
    let url = format!("file://{}", missing.display());
    let err = Repo::open(&url, &cache).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, GitError::Clone { .. }), "{err:?}");
    assert!(msg.contains(&url), "{msg}");
    assert_eq!(
        std::fs::read_dir(&cache).unwrap().count(),
        0,
        "no partial clone left"
    );
}

#[test]
fn archive_contents_modes_and_symlinks() {
    let f = fixture();
    let repo = Repo::open(f.work.to_str().unwrap(), &f.cache).unwrap();
    let mut tgz = Vec::new();
    let bytes = repo.archive_tgz(&f.c3, &mut tgz).unwrap();
    let mtime = (T0 + 200 + 50) as u64; // the committer time
    let entries = untar(&tgz, mtime);

    // Tree order, as `git ls-tree -r -t` lists it, without the submodule.
    let want_order: Vec<String> = git(&f.work, &["ls-tree", "-r", "-t", "--name-only", &f.c3])
        .lines()
        .filter(|p| *p != "vendor/sub")
        .map(str::to_string)
        .collect();
    let got_order: Vec<String> = entries.iter().map(|(p, _)| p.clone()).collect();
    assert_eq!(got_order, want_order);

    let got: BTreeMap<String, Entry> = entries.into_iter().collect();
    let want: BTreeMap<String, Entry> = [
        ("README", file(0o644, "hello, world\n")),
        ("docs", Entry::Dir { mode: 0o755 }),
        ("docs/guide.md", file(0o644, "# Guide\n")),
        (
            "link",
            Entry::Symlink {
                target: "src/lib/a.txt".into(),
            },
        ),
        ("run.sh", file(0o755, "#!/bin/sh\necho hi\n")),
        ("src", Entry::Dir { mode: 0o755 }),
        ("src/b.txt", file(0o644, "bee\n")),
        ("src/lib", Entry::Dir { mode: 0o755 }),
        ("src/lib/a.txt", file(0o644, "a\n")),
        ("vendor", Entry::Dir { mode: 0o755 }),
    ]
    .into_iter()
    .map(|(p, e)| (p.to_string(), e))
    .collect();
    assert_eq!(got, want);
    let content: usize = [
        "hello, world\n",
        "# Guide\n",
        "#!/bin/sh\necho hi\n",
        "bee\n",
        "a\n",
    ]
    .iter()
    .map(|s| s.len())
    .sum();
    assert_eq!(bytes, content as u64);

    // Deterministic: the same commit gives the same bytes.
    let mut again = Vec::new();
    repo.archive_tgz(&f.c3[..12], &mut again).unwrap();
    assert_eq!(again, tgz);

    // An older commit has the older tree.
    let mut old = Vec::new();
    repo.archive_tgz(&f.c1, &mut old).unwrap();
    let old: BTreeMap<String, Entry> = untar(&old, (T0 + 50) as u64).into_iter().collect();
    assert_eq!(old["README"], file(0o644, "hello\n"));
    assert!(!old.contains_key("docs"));

    // Extracting with the tar crate recreates the tree, symlink included.
    let dest = f.root.join("extracted");
    tar::Archive::new(flate2::read::GzDecoder::new(tgz.as_slice()))
        .unpack(&dest)
        .unwrap();
    assert_eq!(std::fs::read_to_string(dest.join("link")).unwrap(), "a\n");
    assert_eq!(
        std::fs::read_link(dest.join("link")).unwrap(),
        Path::new("src/lib/a.txt")
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dest.join("run.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111, "run.sh is executable");
    }
}

#[test]
fn archive_write_errors_are_reported() {
    struct Broken;
    impl std::io::Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("disk on fire"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let f = fixture();
    let repo = Repo::open(f.work.to_str().unwrap(), &f.cache).unwrap();
    let err = repo.archive_tgz(&f.c3, Broken).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, GitError::Archive { .. }), "{err:?}");
    assert!(msg.contains("disk on fire") && msg.contains(&f.c3), "{msg}");
}

#[test]
fn bare_repository() {
    let f = fixture();
    let bare = f.root.join("bare.git");
    git(&f.root, &["clone", "-q", "--bare", "work", "bare.git"]);
    let repo = Repo::open(bare.to_str().unwrap(), &f.cache).unwrap();
    assert!(!repo.is_clone());
    assert_eq!(repo.branch_head("main").unwrap(), Some(f.c3.clone()));
    assert_eq!(repo.branch_head("dev").unwrap(), Some(f.d1.clone()));
    assert_eq!(
        hashes(&repo.new_commits("main", &|_| false, 10).unwrap()),
        [&f.c3, &f.c2, &f.c1]
    );
    // Packed objects (clone --bare packs them) archive to the same bytes.
    let work = Repo::open(f.work.to_str().unwrap(), &f.cache).unwrap();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    repo.archive_tgz(&f.c3, &mut a).unwrap();
    work.archive_tgz(&f.c3, &mut b).unwrap();
    assert_eq!(a, b);
}

#[test]
fn file_url_is_cloned_fetched_and_reopened() {
    let f = fixture();
    let bare = f.root.join("origin.git");
    git(&f.root, &["clone", "-q", "--bare", "work", "origin.git"]);
    let url = format!("file://{}", bare.display());

    let repo = Repo::open(&url, &f.cache).unwrap();
    assert!(repo.is_clone());
    assert!(
        repo.git_dir().starts_with(&f.cache),
        "{}",
        repo.git_dir().display()
    );
    assert_eq!(repo.branch_head("main").unwrap(), Some(f.c3.clone()));
    assert_eq!(repo.branch_head("dev").unwrap(), Some(f.d1.clone()));
    assert_eq!(repo.commit(&f.c1).unwrap().subject, "Initial import");
    let mut tgz = Vec::new();
    repo.archive_tgz(&f.c3, &mut tgz).unwrap();
    assert!(
        untar(&tgz, (T0 + 250) as u64)
            .iter()
            .any(|(p, _)| p == "run.sh")
    );

    // Upstream moves on: nothing changes until fetch.
    write(&f.work, "more.txt", "more\n");
    let c4 = commit_all(&f.work, T0 + 400, "More");
    git(&f.work, &["push", "-q", bare.to_str().unwrap(), "main"]);
    assert_eq!(repo.branch_head("main").unwrap(), Some(f.c3.clone()));
    repo.fetch().unwrap();
    assert_eq!(repo.branch_head("main").unwrap(), Some(c4.clone()));
    let known = |h: &str| h == f.c3;
    let new = repo.new_commits("main", &known, 10).unwrap();
    assert_eq!(hashes(&new), [&c4]);
    assert_eq!(new[0].subject, "More");
    repo.fetch().unwrap(); // nothing new

    // A new branch and a force-push are followed.
    git(&f.work, &["branch", "release"]);
    git(&f.work, &["reset", "-q", "--hard", &f.c2]);
    write(&f.work, "rewritten.txt", "x\n");
    let rewritten = commit_all(&f.work, T0 + 500, "Rewritten history");
    git(
        &f.work,
        &[
            "push",
            "-q",
            "-f",
            bare.to_str().unwrap(),
            "main",
            "release",
        ],
    );
    repo.fetch().unwrap();
    assert_eq!(repo.branch_head("main").unwrap(), Some(rewritten.clone()));
    assert_eq!(repo.branch_head("release").unwrap(), Some(c4.clone()));

    // Opening the same URL again reuses the clone (already up to date).
    let entries = || std::fs::read_dir(&f.cache).unwrap().count();
    assert_eq!(entries(), 1);
    let again = Repo::open(&url, &f.cache).unwrap();
    assert_eq!(entries(), 1);
    assert_eq!(again.git_dir(), repo.git_dir());
    assert_eq!(again.branch_head("main").unwrap(), Some(rewritten));

    // Another URL gets its own clone.
    let other = Repo::open(&format!("file://{}", f.work.display()), &f.cache).unwrap();
    assert_eq!(entries(), 2);
    assert_ne!(other.git_dir(), repo.git_dir());

    // A remote that went away: fetch fails naming the URL.
    std::fs::remove_dir_all(&bare).unwrap();
    let err = repo.fetch().unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, GitError::Fetch { .. }), "{err:?}");
    assert!(msg.contains(&url), "{msg}");
}

#[test]
fn shared_between_threads() {
    let f = fixture();
    let repo = Arc::new(Repo::open(f.work.to_str().unwrap(), &f.cache).unwrap());
    let mut want = Vec::new();
    repo.archive_tgz(&f.c3, &mut want).unwrap();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let repo = repo.clone();
            let c3 = f.c3.clone();
            std::thread::spawn(move || {
                let mut out = Vec::new();
                for _ in 0..10 {
                    out.clear();
                    repo.archive_tgz(&c3, &mut out).unwrap();
                    assert_eq!(repo.new_commits(&c3, &|_| false, 10).unwrap().len(), 3);
                }
                out
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), want);
    }
}

#[test]
fn write_history_creates_a_repository_without_git() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("sample.git");
    let commits = vec![
        NewCommit {
            message: "First".into(),
            author: "Alice Gopher".into(),
            email: "alice@example.com".into(),
            time: T0,
            files: vec![
                ("build.sh".into(), b"#!/bin/sh\nexit 0\n".to_vec(), true),
                ("src/deep/x.txt".into(), b"x\n".to_vec(), false),
            ],
        },
        NewCommit {
            message: "Second\n\nbody".into(),
            author: "Bob Builder".into(),
            email: "bob@example.com".into(),
            time: T0 + 60,
            files: vec![("src/deep/x.txt".into(), b"y\n".to_vec(), false)],
        },
    ];
    let head = git::write_history(&path, "main", &commits).unwrap();
    let repo = Repo::open(path.to_str().unwrap(), &tmp.path().join("cache")).unwrap();
    assert_eq!(repo.branch_head("main").unwrap(), Some(head.clone()));
    let log = repo.new_commits(&head, &|_| false, 10).unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].parents, [log[1].hash.as_str()]);
    assert_eq!(
        (
            log[0].author.as_str(),
            log[0].email.as_str(),
            log[0].time,
            log[0].subject.as_str()
        ),
        ("Bob Builder", "bob@example.com", T0 + 60, "Second")
    );
    assert_eq!(log[1].subject, "First");
    let mut tgz = Vec::new();
    repo.archive_tgz(&head, &mut tgz).unwrap();
    let got: BTreeMap<String, Entry> = untar(&tgz, (T0 + 60) as u64).into_iter().collect();
    assert_eq!(got["build.sh"], file(0o755, "#!/bin/sh\nexit 0\n"));
    assert_eq!(got["src/deep/x.txt"], file(0o644, "y\n"));
    assert_eq!(got["src/deep"], Entry::Dir { mode: 0o755 });

    // git agrees: a valid repository, HEAD on main.
    git(&path, &["fsck", "--strict", "--no-progress"]);
    assert_eq!(git(&path, &["symbolic-ref", "HEAD"]), "refs/heads/main");
    assert_eq!(
        git(&path, &["log", "--format=%H %an <%ae> %at %s", "main"]),
        format!(
            "{} Bob Builder <bob@example.com> {} Second\n{} Alice Gopher <alice@example.com> {T0} First",
            log[0].hash,
            T0 + 60,
            log[1].hash
        )
    );

    // Appending to an existing repository continues the branch.
    let more = vec![NewCommit {
        message: "Third".into(),
        author: "Carol".into(),
        email: "carol@example.com".into(),
        time: T0 + 120,
        files: vec![("new.txt".into(), b"n".to_vec(), false)],
    }];
    let head3 = git::write_history(&path, "main", &more).unwrap();
    assert_eq!(repo.commit(&head3).unwrap().parents, [head]);
    let err = git::write_history(&path, "bad..name", &more).unwrap_err();
    assert!(err.to_string().contains("bad..name"), "{err}");
}

/// A commit looked up by its full hash is answered from memory afterwards
/// (every triggered build looks its commit up): its object may even be
/// gone from disk. A branch name, a short hash, and a commit never looked
/// up still go to the repository.
#[test]
fn commits_by_full_hash_are_remembered() {
    let f = fixture();
    let repo = Repo::open(f.work.to_str().unwrap(), &f.cache).unwrap();
    assert!(repo.cached_commit(&f.c2).is_none(), "nothing looked up yet");
    let c2 = repo.commit(&f.c2).unwrap();
    assert_eq!(repo.cached_commit(&f.c2), Some(c2.clone()));
    assert_eq!(repo.cached_commit(&f.c2.to_uppercase()), Some(c2.clone()));
    assert_eq!(
        repo.cached_commit(&f.c2[..12]),
        None,
        "short hashes may grow ambiguous"
    );
    assert_eq!(repo.cached_commit("main"), None, "branches move");
    // Unpacked loose objects: remove both commits' files.
    let loose = |h: &str| f.work.join(".git/objects").join(&h[..2]).join(&h[2..]);
    for h in [&f.c1, &f.c2] {
        assert!(loose(h).exists(), "{h} is a loose object in the fixture");
        std::fs::remove_file(loose(h)).unwrap();
    }
    assert_eq!(repo.commit(&f.c2).unwrap(), c2, "served from memory");
    let gone = repo.commit(&f.c1).unwrap_err();
    assert!(
        matches!(gone, GitError::NotFound { .. } | GitError::Read { .. }),
        "{gone:?}"
    );
}
