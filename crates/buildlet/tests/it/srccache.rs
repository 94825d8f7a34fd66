//! `PUT /writesrc` on a real buildlet process: a whole tree, then deltas
//! over it; the tree assembled must be git's, a delta must name the tree
//! the cache holds, and whiteouts obey every path rule.

use bytes::Bytes;
use http::StatusCode;

use buildlet::client::Error;

use crate::common::{Harness, raw, runtime, tgz, tgz_raw};

/// Git's tree id of these files (written to a scratch work tree).
fn tree_of(files: &[(&str, &[u8])]) -> String {
    let d = tempfile::tempdir().unwrap();
    for (name, data) in files {
        let p = d.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    let git = |args: &[&str]| {
        let o = std::process::Command::new("git")
            .current_dir(d.path())
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    };
    git(&["init", "-q"]);
    git(&["add", "-A"]);
    git(&["write-tree"])
}

fn status(e: &Error) -> Option<StatusCode> {
    match e {
        Error::Rejected { status, .. } | Error::Server { status, .. } => Some(*status),
        _ => None,
    }
}

#[test]
fn whole_trees_and_deltas_are_checked_against_git_and_confined() {
    let h = Harness::start();
    runtime().block_on(async {
        let c = h.client();
        let one: &[(&str, &[u8])] = &[("a.txt", b"a\n"), ("d/b.txt", b"b\n")];
        let t1 = tree_of(one);
        let w = c
            .put_src("src", Bytes::from(tgz(one)), &t1, None)
            .await
            .unwrap();
        assert_eq!((w.tree.as_str(), w.files), (t1.as_str(), 2));
        assert_eq!(
            std::fs::read(h.workdir.join("src/d/b.txt")).unwrap(),
            b"b\n"
        );

        // A delta: change a.txt, remove d/ (a whiteout), add c.txt.
        let two: &[(&str, &[u8])] = &[("a.txt", b"A\n"), ("c.txt", b"c\n")];
        let t2 = tree_of(two);
        let delta = tgz(&[("a.txt", b"A\n"), (".wh.d", b""), ("c.txt", b"c\n")]);
        // Against a tree the cache does not hold: 409, and it says what it holds.
        let e = c
            .put_src("src", Bytes::from(delta.clone()), &t2, Some(&t2))
            .await
            .unwrap_err();
        assert_eq!(status(&e), Some(StatusCode::CONFLICT), "{e}");
        assert!(e.to_string().contains(&t1), "{e}");
        let w = c
            .put_src("src", Bytes::from(delta), &t2, Some(&t1))
            .await
            .unwrap();
        assert_eq!(w.tree, t2);
        assert!(!h.workdir.join("src/d").exists());
        assert_eq!(std::fs::read(h.workdir.join("src/c.txt")).unwrap(), b"c\n");

        // Between builds the work dir is emptied (the tree goes back to
        // the cache); the next delta reads only what it brought, and the
        // files its own request wrote in the same tick of the file
        // system's clock (git's racy rule: those once more, next time).
        // A file a step changed is read again and caught.
        let tick = || tokio::time::sleep(std::time::Duration::from_millis(30));
        let three: &[(&str, &[u8])] = &[("a.txt", b"3\n"), ("c.txt", b"c\n")];
        let t3 = tree_of(three);
        let delta_a = |a: &'static [u8]| Bytes::from(tgz(&[("a.txt", a)]));
        tick().await;
        c.remove_all(&["."]).await.unwrap();
        let w = c
            .put_src("src", delta_a(b"3\n"), &t3, Some(&t2))
            .await
            .unwrap();
        assert_eq!(w.tree, t3);
        assert!((1..=2).contains(&w.files_read), "{w:?}");
        tick().await;
        c.remove_all(&["."]).await.unwrap();
        let w = c
            .put_src("src", delta_a(b"A\n"), &t2, Some(&t3))
            .await
            .unwrap();
        assert_eq!((w.tree.as_str(), w.files_read), (t2.as_str(), 1), "{w:?}");
        std::fs::write(h.workdir.join("src/c.txt"), b"changed by a step\n").unwrap();
        c.remove_all(&["."]).await.unwrap();
        let e = c
            .put_src("src", delta_a(b"3\n"), &t3, Some(&t2))
            .await
            .unwrap_err();
        assert_eq!(status(&e), Some(StatusCode::UNPROCESSABLE_ENTITY), "{e}");
        let w = c
            .put_src("src", Bytes::from(tgz(two)), &t2, None)
            .await
            .unwrap();
        assert_eq!((w.tree.as_str(), w.files_read), (t2.as_str(), 2));

        // The build's outputs (files, a nested dir made read-only, a
        // symbolic link out of the work dir) are not part of the tree: they
        // are removed when the tree goes back to the cache, the link not
        // followed, and the next delta builds on the tree.
        let src = h.workdir.join("src");
        std::fs::create_dir_all(src.join("out/deep")).unwrap();
        std::fs::write(src.join("out/deep/obj.o"), b"obj").unwrap();
        std::fs::write(src.join("a.txt.orig"), b"x").unwrap();
        std::os::unix::fs::symlink(h.base.path().join("outside"), src.join("escape")).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(src.join("out"), std::fs::Permissions::from_mode(0o500))
                .unwrap();
        }
        c.remove_all(&["."]).await.unwrap();
        assert!(!src.exists());
        let w = c
            .put_src("src", delta_a(b"3\n"), &t3, Some(&t2))
            .await
            .unwrap();
        assert_eq!(w.tree, t3);
        assert!(!src.join("out").exists() && !src.join("escape").exists());
        assert!(h.base.path().join("outside/sentinel").exists());

        // A name that is not UTF-8 goes like any other output.
        {
            use std::os::unix::ffi::OsStrExt;
            let odd = src.join(std::ffi::OsStr::from_bytes(b"odd-\xff"));
            std::fs::write(&odd, b"x").unwrap();
            c.remove_all(&["src"]).await.unwrap();
            let w = c
                .put_src("src", delta_a(b"A\n"), &t2, Some(&t3))
                .await
                .unwrap();
            assert_eq!(w.tree, t2);
            assert!(!odd.exists());
        }

        // A tree file a step linked to another name (which outlives the
        // tree) is not trusted: the delta fails, a whole tree repairs it.
        std::fs::hard_link(src.join("c.txt"), h.workdir.join("alias")).unwrap();
        c.remove_all(&["src"]).await.unwrap();
        let e = c
            .put_src("src", delta_a(b"3\n"), &t3, Some(&t2))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("another name"), "{e}");
        let w = c
            .put_src("src", Bytes::from(tgz(three)), &t3, None)
            .await
            .unwrap();
        assert_eq!(w.tree, t3);

        // A work dir whose tree was replaced (the dir moved away, another
        // put in its place) gives nothing back: the cache is empty, and the
        // delta is refused for a whole tree.
        std::fs::rename(&src, h.workdir.join("moved")).unwrap();
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("a.txt"), b"3\n").unwrap();
        std::fs::write(src.join("c.txt"), b"c\n").unwrap();
        let e = c
            .put_src(
                "src",
                Bytes::from(tgz(&[("a.txt", b"A\n")])),
                &t2,
                Some(&t3),
            )
            .await
            .unwrap_err();
        assert_eq!(status(&e), Some(StatusCode::CONFLICT), "{e}");
        assert!(e.to_string().contains("holds nothing"), "{e}");
        c.remove_all(&["."]).await.unwrap();
        c.put_src("src", Bytes::from(tgz(two)), &t2, None)
            .await
            .unwrap();

        // A delta that does not make the tree it claims: 422, cache emptied.
        let wrong = tgz(&[("a.txt", b"not what git has\n")]);
        let e = c
            .put_src("src", Bytes::from(wrong), &t1, Some(&t2))
            .await
            .unwrap_err();
        assert_eq!(status(&e), Some(StatusCode::UNPROCESSABLE_ENTITY), "{e}");
        let e = c
            .put_src("src", Bytes::from(tgz(&[])), &t2, Some(&t2))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("holds nothing"), "{e}");

        // Whiteouts are confined like any entry; each bad delta is refused.
        let w = c
            .put_src("src", Bytes::from(tgz(one)), &t1, None)
            .await
            .unwrap();
        assert_eq!(w.tree, t1);
        let before = h.outside_snapshot();
        for bad in [
            tgz_raw(&[raw("../.wh.outside", tar::EntryType::Regular, None, b"")]),
            tgz_raw(&[raw(".wh...", tar::EntryType::Regular, None, b"")]),
            tgz_raw(&[raw("d/.wh.", tar::EntryType::Regular, None, b"")]),
            tgz_raw(&[raw("/etc/.wh.passwd", tar::EntryType::Regular, None, b"")]),
        ] {
            let e = c.put_src("src", Bytes::from(bad), &t1, Some(&t1)).await;
            let e = match e {
                Err(e) => e,
                Ok(w) => panic!("a hostile delta was taken: {w:?}"),
            };
            assert_eq!(status(&e), Some(StatusCode::BAD_REQUEST), "{e}");
            // Refusals leave the cache unknown: the next delta is refused,
            // the next whole tree repairs it.
            c.put_src("src", Bytes::from(tgz(one)), &t1, None)
                .await
                .unwrap();
        }
        assert_eq!(
            h.outside_snapshot()
                .keys()
                .filter(|p| !p.starts_with(h.base.path().join("wd.srccache")))
                .count(),
            before
                .keys()
                .filter(|p| !p.starts_with(h.base.path().join("wd.srccache")))
                .count()
        );
        assert!(h.base.path().join("outside/sentinel").exists());
        // The status says which tree the cache holds; a machine changing
        // hands is emptied, cache included.
        assert_eq!(
            c.status().await.unwrap().src_tree.as_deref(),
            Some(t1.as_str())
        );
        c.clear_all().await.unwrap();
        assert_eq!(c.status().await.unwrap().src_tree, None);
        assert_eq!(
            std::fs::read_dir(h.base.path().join("wd.srccache"))
                .unwrap()
                .count(),
            0
        );
        let e = c
            .put_src("src", Bytes::from(tgz(&[])), &t1, Some(&t1))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("holds nothing"), "{e}");
        // Bad ids are refused before anything is read.
        let e = c
            .put_src("src", Bytes::new(), "HEAD", None)
            .await
            .unwrap_err();
        assert_eq!(status(&e), Some(StatusCode::BAD_REQUEST), "{e}");
        let e = c
            .put_src("../x", Bytes::from(tgz(one)), &t1, None)
            .await
            .unwrap_err();
        assert_eq!(status(&e), Some(StatusCode::BAD_REQUEST), "{e}");
    });
}

/// The names in `dir`, sorted.
fn names(dir: &std::path::Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    n.sort();
    n
}

/// `/exec` with `clean=1` (a build's last command) runs the command, then
/// empties the work dir as `/removeall path=.` does, before it answers:
/// what the command made is gone, `tmp` is there and empty, and the lent
/// source tree is back in the cache, so a delta over it is taken next. A
/// command that fails is cleaned after too; one without the option is not.
#[test]
fn an_exec_that_cleans_after_empties_the_work_dir_and_keeps_the_source() {
    use buildlet::client::{Cleaned, ExecOptions};
    use buildlet::proto::ProcessState;
    let h = Harness::start();
    runtime().block_on(async {
        let c = h.client();
        let one: &[(&str, &[u8])] = &[("a.txt", b"a\n")];
        let t1 = tree_of(one);
        c.put_src("src", Bytes::from(tgz(one)), &t1, None)
            .await
            .unwrap();
        let sh = |script: &str| ExecOptions {
            args: vec!["-c".into(), script.into()],
            ..Default::default()
        };
        let mut out = Vec::new();
        let (state, cleaned) = c
            .exec_then_clean(
                "/bin/sh",
                &sh("echo made > out.txt; mkdir -p d/e; echo x > d/e/f; echo t > tmp/t; cat src/a.txt"),
                &mut out,
            )
            .await
            .unwrap();
        assert_eq!((state, cleaned), (ProcessState::Ok, Cleaned::Emptied));
        assert_eq!(out, b"a\n", "the command ran before the cleaning");
        assert_eq!(names(&h.workdir), ["tmp"]);
        assert!(names(&h.workdir.join("tmp")).is_empty());

        // The tree went back to the cache: a delta over it is taken.
        let two: &[(&str, &[u8])] = &[("a.txt", b"A\n")];
        let t2 = tree_of(two);
        let w = c
            .put_src("src", Bytes::from(tgz(two)), &t2, Some(&t1))
            .await
            .unwrap();
        assert_eq!(w.tree, t2);

        // A failing command: its state, and the work dir emptied all the same.
        let (state, cleaned) = c
            .exec_then_clean("/bin/sh", &sh("touch left; exit 3"), &mut Vec::new())
            .await
            .unwrap();
        assert_eq!((state, cleaned), (ProcessState::Exited(3), Cleaned::Emptied));
        assert_eq!(names(&h.workdir), ["tmp"]);

        // Without the option nothing is removed.
        let st = c
            .exec("/bin/sh", &sh("touch kept"), &mut Vec::new())
            .await
            .unwrap();
        assert_eq!(st, ProcessState::Ok);
        assert_eq!(names(&h.workdir), ["kept", "tmp"]);
    });
}
