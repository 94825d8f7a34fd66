//! Source delivery through the machines' source caches (in process, real
//! buildlet handlers): consecutive builds on one machine get deltas, and
//! whatever changed between commits (contents, new, deleted and renamed
//! files, a mode bit, a symbolic link, a file becoming a directory and back)
//! the work dir holds exactly the commit's tree; a corrupt cache and a lost
//! one are noticed and repaired by sending the whole tree.

use std::path::Path;
use std::process::Command;

use crate::common::inproc::{InProc, config, rt};
use crate::common::{TestRepo, git};

use coordinator::store::{BuildKind, BuildStatus};

/// Prints a tree: directories, files with their exec bit and SHA-1, links
/// with their targets; sorted, so two trees compare as text.
const MANIFEST: &str = r#"find . -mindepth 1 | LC_ALL=C sort | while read -r p; do
  if [ -L "$p" ]; then echo "L $p -> $(readlink "$p")";
  elif [ -d "$p" ]; then echo "D $p";
  else x=-; [ -x "$p" ] && x=x; echo "F $p $x $(sha1sum < "$p" | cut -c1-40)"; fi
done"#;

/// The manifest of `commit` checked out by git itself.
fn expected(repo: &Path, commit: &str, scratch: &Path) -> String {
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch).unwrap();
    let work_tree = scratch.to_str().unwrap();
    git(
        repo,
        &[
            "--work-tree",
            work_tree,
            "checkout",
            "-q",
            commit,
            "--",
            ".",
        ],
    );
    // git checkout into another work tree also updates the index: put it back.
    git(repo, &["reset", "-q"]);
    let out = Command::new("sh")
        .arg("-c")
        .arg(MANIFEST)
        .current_dir(scratch)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    // A manifest that hashed nothing (no sha1sum) would compare equal to
    // an equally empty one: every file line must carry a hash.
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.lines()
            .filter(|l| l.starts_with("F "))
            .all(|l| l.rsplit(' ').next().is_some_and(|h| h.len() == 40))
            && text.lines().any(|l| l.starts_with("F ")),
        "{text}"
    );
    text
}

/// The manifest a build's step printed (its log between the markers).
fn printed(log: &str) -> String {
    let start = log.find("--manifest--\n").expect("the manifest's start") + "--manifest--\n".len();
    let end = log.find("--end--").expect("the manifest's end");
    log[start..end].to_string()
}

#[test]
fn every_change_between_commits_arrives_exactly_and_bad_caches_are_repaired() {
    rt().block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let mut repo = TestRepo::new(&tmp.path().join("repo"));
        let scratch = tmp.path().join("checkout");
        // A tree with some bulk, so a delta is clearly smaller.
        let bulk: String = (0..4000).map(|i| format!("line {i} of the bulk file\n")).collect();
        repo.commit(
            "one",
            &[
                ("a.txt", "first\n"),
                ("dir/b.txt", "b\n"),
                ("run.sh", "#!/bin/sh\necho run\n"),
                ("deep/x/y.txt", "y\n"),
                ("f", "a file that becomes a directory\n"),
                ("g/inner.txt", "a directory that becomes a file\n"),
                ("bulk.txt", &bulk),
            ],
        );
        git(&repo.path, &["update-index", "--chmod=+x", "run.sh"]);
        std::os::unix::fs::symlink("a.txt", repo.path.join("link")).unwrap();
        git(&repo.path, &["add", "link"]);
        let c1 = repo.commit("exec bit and a link", &[]);
        let builders = format!(
            "[builders.show]\nhost = \"host-a\"\n[[builders.show.steps]]\nname = \"manifest\"\nrun = '''\necho --manifest--\n{MANIFEST}\necho --end--\n'''\n\
             [builders.scribble]\nhost = \"host-a\"\n[[builders.scribble.steps]]\nname = \"edit in place\"\nrun = \"echo more >> bulk.txt; chmod +x a.txt\"\n"
        );
        let f = InProc::start(&config(&repo.path, &builders)).await;
        f.machine("host-a", "m1").await;
        let build = |c: String| {
            let f = &f;
            async move {
                let b = f.build("show", &c, BuildKind::PostSubmit).await;
                assert_eq!(b.status, BuildStatus::Passed, "{b:?}");
                let all = f.attempt_log(b.id).await;
                (all, f.step_log(b.id, 0).await)
            }
        };

        let (log, step) = build(c1.clone()).await;
        assert!(log.contains("farmer: source: the whole tree"), "{log}");
        assert_eq!(printed(&step), expected(&repo.path, &c1, &scratch));

        // Everything that can change between two commits.
        git(&repo.path, &["rm", "-q", "dir/b.txt", "f", "-r", "g"]);
        git(&repo.path, &["mv", "deep/x/y.txt", "deep/z.txt"]);
        git(&repo.path, &["update-index", "--chmod=-x", "run.sh"]);
        std::fs::remove_file(repo.path.join("link")).unwrap();
        std::os::unix::fs::symlink("deep/z.txt", repo.path.join("link")).unwrap();
        git(&repo.path, &["add", "link"]);
        let c2 = repo.commit(
            "change everything",
            &[
                ("a.txt", "second\n"),
                ("new/n.txt", "new\n"),
                ("f/inner.txt", "now a directory\n"),
                ("g", "now a file\n"),
            ],
        );
        let (log, step) = build(c2.clone()).await;
        assert!(log.contains(&format!("farmer: source: a delta from {}", &c1[..12])), "{log}");
        assert_eq!(printed(&step), expected(&repo.path, &c2, &scratch));

        // A corrupt cache (a file changed behind the buildlet's back, same
        // size, the mtime put back) is noticed; the whole tree repairs it.
        let cache = f.dir.path().join("machines/m1.srccache/tree");
        let target = std::fs::canonicalize(&cache).unwrap().join("bulk.txt");
        let mtime = std::fs::metadata(&target).unwrap().modified().unwrap();
        let mut changed = std::fs::read(&target).unwrap();
        changed[0] ^= b'L' ^ b'l';
        std::fs::write(&target, &changed).unwrap();
        std::fs::File::options().write(true).open(&target).unwrap().set_modified(mtime).unwrap();
        let c3 = repo.commit("three", &[("a.txt", "third\n")]);
        let (log, step) = build(c3.clone()).await;
        assert!(log.contains("farmer: source: the whole tree") && log.contains("the delta was refused"), "{log}");
        assert_eq!(printed(&step), expected(&repo.path, &c3, &scratch));

        // And the cache works again after the repair.
        let c4 = repo.commit("four", &[("a.txt", "fourth\n")]);
        let (log, step) = build(c4.clone()).await;
        assert!(log.contains(&format!("farmer: source: a delta from {}", &c3[..12])), "{log}");
        assert_eq!(printed(&step), expected(&repo.path, &c4, &scratch));

        // A machine that lost its cache (restarted: work dir and cache
        // emptied) says so when it registers, and gets the whole tree.
        f.machine("host-a", "m1").await;
        f.until("the farm to forget m1's cache", std::time::Duration::from_secs(10), || {
            f.farm.delivery.held("m1").is_none()
        })
        .await;
        let c5 = repo.commit("five", &[("a.txt", "fifth\n")]);
        let (log, step) = build(c5.clone()).await;
        assert!(log.contains("farmer: source: the whole tree") && !log.contains("delta"), "{log}");
        assert_eq!(printed(&step), expected(&repo.path, &c5, &scratch));

        // A step that edits its sources in place (they are linked to the
        // cache) spoils the cache; the next build notices and gets it whole.
        let b = f.build("scribble", &c5, BuildKind::PostSubmit).await;
        assert_eq!(b.status, BuildStatus::Passed, "{b:?}");
        let c6 = repo.commit("six", &[("a.txt", "sixth\n")]);
        let (log, step) = build(c6.clone()).await;
        assert!(log.contains("farmer: source: the whole tree") && log.contains("the delta was refused"), "{log}");
        assert_eq!(printed(&step), expected(&repo.path, &c6, &scratch));

        // Bytes sent, full vs delta, per host type in /metrics.
        let metrics = f.get("/metrics").await;
        assert!(metrics.contains("farmer_source_bytes_total{host_type=\"host-a\",kind=\"delta\"}"), "{metrics}");
        assert!(metrics.contains("farmer_source_pushes_total{host_type=\"host-a\",kind=\"full\"}"), "{metrics}");
    });
}
