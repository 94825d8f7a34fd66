//! Hostile and broken input: every refusal names the problem, and nothing
//! outside the work dir (nor, for a refused tarball, inside it) changes.

use crate::common;

use buildlet::client::{Error, ExecOptions, LsOptions};
use bytes::Bytes;
use common::{Harness, raw, runtime, tgz, tgz_raw};
use tar::EntryType;

fn rejected(err: &Error, status: u16, needle: &str) {
    match err {
        Error::Rejected { status: s, message } => {
            assert_eq!(s.as_u16(), status, "{err}");
            let quoted = format!("{needle:?}");
            let escaped = &quoted[1..quoted.len() - 1];
            assert!(
                message.contains(escaped),
                "message {message:?} should mention {needle:?}"
            );
        }
        other => panic!("expected a {status} refusal, got {other}"),
    }
}

/// Lists the work dir (minus tmp/) so tests can check a refusal changed nothing.
fn inside(h: &Harness) -> Vec<String> {
    let mut v = Vec::new();
    for e in walk(&h.workdir) {
        let rel = e
            .strip_prefix(&h.workdir)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if rel != "tmp" {
            v.push(rel);
        }
    }
    v.sort();
    v
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        out.push(p.clone());
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&p));
        }
    }
    out
}

#[test]
fn tar_entries_that_escape_are_refused_and_cleaned_up() {
    let h = Harness::start();
    let before = h.outside_snapshot();
    let rt = runtime();
    let c = h.client();
    // Pre-existing content that must survive every refused tarball.
    rt.block_on(c.put_tgz_bytes("keep", Bytes::from(tgz(&[("k", b"keep")]))))
        .unwrap();
    let baseline = inside(&h);

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dotdot",
            tgz_raw(&[
                raw("ok1", EntryType::Regular, None, b"1"),
                raw("../outside/sentinel", EntryType::Regular, None, b"pwned"),
            ]),
            "../outside/sentinel",
        ),
        (
            "nested dotdot",
            tgz_raw(&[raw("a/b/../../../x", EntryType::Regular, None, b"x")]),
            "a/b/../../../x",
        ),
        (
            "absolute",
            tgz_raw(&[raw(
                "/tmp/farmer-abs-escape",
                EntryType::Regular,
                None,
                b"x",
            )]),
            "/tmp/farmer-abs-escape",
        ),
        (
            "backslash",
            tgz_raw(&[raw("..\\..\\x", EntryType::Regular, None, b"x")]),
            "backslash",
        ),
        (
            "symlink absolute",
            tgz_raw(&[
                raw("dir/", EntryType::Directory, None, b""),
                raw("dir/link", EntryType::Symlink, Some("/etc"), b""),
            ]),
            "dir/link",
        ),
        (
            "symlink up",
            tgz_raw(&[raw("link", EntryType::Symlink, Some("../../outside"), b"")]),
            "link",
        ),
        (
            "symlink dot-dot after name",
            tgz_raw(&[
                raw("b", EntryType::Symlink, Some("."), b""),
                raw("a", EntryType::Symlink, Some("b/.."), b""),
            ]),
            "a",
        ),
        (
            "write through planted symlink",
            tgz_raw(&[
                raw("d/", EntryType::Directory, None, b""),
                raw("d/up", EntryType::Symlink, Some(".."), b""),
                raw("d/up/up2", EntryType::Symlink, Some(".."), b""),
                raw("d/up/up2/up3", EntryType::Symlink, Some(".."), b""),
            ]),
            "d/up/up2/up3",
        ),
        (
            "hardlink outside",
            tgz_raw(&[raw("h", EntryType::Link, Some("../outside/sentinel"), b"")]),
            "h",
        ),
        (
            "hardlink absolute",
            tgz_raw(&[raw("h", EntryType::Link, Some("/etc/passwd"), b"")]),
            "h",
        ),
        (
            "char device",
            tgz_raw(&[raw("dev", EntryType::Char, None, b"")]),
            "device",
        ),
        (
            "block device",
            tgz_raw(&[raw("blk", EntryType::Block, None, b"")]),
            "device",
        ),
        (
            "fifo",
            tgz_raw(&[raw("pipe", EntryType::Fifo, None, b"")]),
            "named pipe",
        ),
    ];
    for (what, archive, needle) in cases {
        let err = rt
            .block_on(c.put_tgz_bytes("x", Bytes::from(archive)))
            .expect_err(what);
        rejected(&err, 400, needle);
        assert_eq!(
            inside(&h),
            baseline,
            "{what}: partial extraction left behind"
        );
    }
    // The same archives aimed at an escaping dir parameter.
    for dir in ["..", "../outside", "/tmp", "keep/../.."] {
        let err = rt
            .block_on(c.put_tgz_bytes(dir, Bytes::from(tgz(&[("f", b"f")]))))
            .unwrap_err();
        rejected(&err, 400, dir);
    }
    assert_eq!(
        h.outside_snapshot(),
        before,
        "something outside the work dir changed"
    );
    assert!(!std::path::Path::new("/tmp/farmer-abs-escape").exists());
}

#[test]
fn symlinks_inside_the_tree_are_kept() {
    let h = Harness::start();
    let c = h.client();
    runtime().block_on(async {
        let archive = tgz_raw(&[
            raw("a/", EntryType::Directory, None, b""),
            raw("a/file", EntryType::Regular, None, b"data"),
            raw("a/link", EntryType::Symlink, Some("file"), b""),
            raw("b/", EntryType::Directory, None, b""),
            raw("b/up", EntryType::Symlink, Some("../a/file"), b""),
            raw("hard", EntryType::Link, Some("a/file"), b""),
        ]);
        c.put_tgz_bytes("t", Bytes::from(archive)).await.unwrap();
        assert_eq!(std::fs::read(h.workdir.join("t/a/link")).unwrap(), b"data");
        assert_eq!(std::fs::read(h.workdir.join("t/b/up")).unwrap(), b"data");
        assert_eq!(std::fs::read(h.workdir.join("t/hard")).unwrap(), b"data");
        let ls = c
            .ls(
                "t",
                &LsOptions {
                    recursive: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let link = ls.iter().find(|e| e.path == "a/link").unwrap();
        assert_eq!(link.link.as_deref(), Some("file"));
        // A symlink written by a build pointing outside is never followed by file operations.
        c.exec_output(
            "ln",
            &ExecOptions {
                args: vec!["-s".into(), "/etc".into(), "evil".into()],
                sys: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let err = c
            .put_file("evil/farmer-test", 0o644, Bytes::from_static(b"x"))
            .await
            .unwrap_err();
        rejected(&err, 400, "evil/farmer-test");
        let err = c.ls("evil", &LsOptions::default()).await.unwrap_err();
        rejected(&err, 400, "evil");
        let err = c.get_tgz("evil", &mut Vec::new(), None).await.unwrap_err();
        rejected(&err, 400, "evil");
        // Removing the link removes the link, not its target.
        c.remove_all(&["evil"]).await.unwrap();
        assert!(std::fs::symlink_metadata(h.workdir.join("evil")).is_err());
        assert!(std::path::Path::new("/etc").is_dir());
    });
}

#[test]
fn path_parameters_that_escape_are_refused() {
    let h = Harness::start();
    let before = h.outside_snapshot();
    let c = h.client();
    runtime().block_on(async {
        for p in [
            "../outside/sentinel",
            "/etc/passwd",
            "a/../../outside/x",
            "..",
            "C:/x",
            "a\\..\\b",
        ] {
            let err = c
                .put_file(p, 0o644, Bytes::from_static(b"pwned"))
                .await
                .unwrap_err();
            rejected(&err, 400, p);
            let err = c.ls(p, &LsOptions::default()).await.unwrap_err();
            rejected(&err, 400, p);
            let err = c.get_tgz(p, &mut Vec::new(), None).await.unwrap_err();
            rejected(&err, 400, p);
            let err = c.remove_all(&["keep-me-not", p]).await.unwrap_err();
            rejected(&err, 400, p);
            let err = c
                .exec_output(
                    "true",
                    &ExecOptions {
                        dir: Some(p.into()),
                        sys: true,
                        ..Default::default()
                    },
                )
                .await
                .unwrap_err();
            rejected(&err, 400, p);
            let err = c
                .ls(
                    "",
                    &LsOptions {
                        skip: vec![p.into()],
                        ..Default::default()
                    },
                )
                .await
                .unwrap_err();
            rejected(&err, 400, p);
        }
        // Relative commands must stay inside too.
        let err = c
            .exec_output("../outside/sentinel", &ExecOptions::default())
            .await
            .unwrap_err();
        rejected(&err, 400, "../outside/sentinel");
        let err = c.put_file("", 0o644, Bytes::new()).await.unwrap_err();
        rejected(&err, 400, "path");
    });
    assert_eq!(h.outside_snapshot(), before);
}

#[test]
fn oversize_bodies_get_413_and_leave_nothing() {
    let h = Harness::start_with(None, &["-max-body=65536"]);
    let c = h.client();
    runtime().block_on(async {
        // Declared too large: refused before reading.
        let err = c
            .put_file("big", 0o644, Bytes::from(vec![b'x'; 70_000]))
            .await
            .unwrap_err();
        rejected(&err, 413, "65536");
        assert!(!h.workdir.join("big").exists());
        // Streamed without a length: refused while reading, partial output removed.
        let mut rng = 12345u64;
        let noise: Vec<u8> = (0..200_000)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng as u8
            })
            .collect();
        let archive = tgz(&[("first", b"small"), ("noise", &noise)]);
        assert!(archive.len() > 65536);
        let err = c
            .put_tgz("x", std::io::Cursor::new(archive), None)
            .await
            .unwrap_err();
        rejected(&err, 413, "65536");
        assert_eq!(h.workdir_names(), ["tmp"], "partial extraction left behind");
        // Small bodies still work.
        c.put_file("small", 0o644, Bytes::from_static(b"ok"))
            .await
            .unwrap();
    });
}

#[test]
fn broken_gzip_and_truncated_tar_get_400() {
    let h = Harness::start();
    let c = h.client();
    runtime().block_on(async {
        let err = c
            .put_tgz_bytes("x", Bytes::from_static(b"this is not gzip at all"))
            .await
            .unwrap_err();
        rejected(&err, 400, "tar.gz");
        let mut archive = tgz(&[("a", &[b'a'; 10_000]), ("b", &[b'b'; 10_000])]);
        archive.truncate(archive.len() / 2);
        let err = c
            .put_tgz_bytes("x", Bytes::from(archive))
            .await
            .unwrap_err();
        rejected(&err, 400, "tar.gz");
        let mut archive = tgz(&[("a", b"aaaa")]);
        let n = archive.len();
        archive[n - 6] ^= 0xff; // corrupt the CRC
        let err = c
            .put_tgz_bytes("x", Bytes::from(archive))
            .await
            .unwrap_err();
        rejected(&err, 400, "tar.gz");
        assert_eq!(h.workdir_names(), ["tmp"]);
    });
}

#[test]
fn wrong_or_missing_password_is_refused() {
    let h = Harness::start_with(Some("s3cret"), &[]);
    let rt = runtime();
    rt.block_on(async {
        // Right password works.
        h.client().status().await.unwrap();
        for pw in [None, Some("wrong"), Some("s3cre"), Some("s3cret2")] {
            let c = buildlet::client::Client::new(&h.addr, pw);
            let err = c.status().await.unwrap_err();
            rejected(&err, 401, "password");
            assert!(!err.is_communication());
            let err = c
                .put_file("x", 0o644, Bytes::from_static(b"x"))
                .await
                .unwrap_err();
            rejected(&err, 401, "password");
            let err = c
                .exec_output(
                    "true",
                    &ExecOptions {
                        sys: true,
                        ..Default::default()
                    },
                )
                .await
                .unwrap_err();
            rejected(&err, 401, "password");
        }
        // /healthz is the one unauthenticated endpoint.
        buildlet::client::Client::new(&h.addr, None)
            .healthz()
            .await
            .unwrap();
    });
    assert!(!h.workdir.join("x").exists());
}

#[test]
fn refuses_to_listen_publicly_without_password() {
    let base = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_buildlet"))
        .arg("-listen=0.0.0.0:0")
        .arg(format!("-workdir={}", base.path().join("wd").display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("-password-file"), "{err}");
}

#[test]
fn refuses_dangerous_workdir() {
    // $HOME itself, a parent of $HOME, and the file system root: each is
    // refused before anything in it is touched.
    let top = tempfile::tempdir().unwrap();
    let home = top.path().join("users").join("alice");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("precious"), b"keep").unwrap();
    std::fs::write(top.path().join("also-precious"), b"keep").unwrap();
    for workdir in [
        home.clone(),
        home.parent().unwrap().to_path_buf(),
        top.path().to_path_buf(),
        std::path::PathBuf::from("/"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_buildlet"))
            .arg("-listen=127.0.0.1:0")
            .arg(format!("-workdir={}", workdir.display()))
            .env("HOME", &home)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}: {err}", workdir.display());
        assert!(
            err.contains("refusing") && err.contains("work dir"),
            "{}: {err}",
            workdir.display()
        );
        assert!(home.join("precious").exists());
        assert!(top.path().join("also-precious").exists());
    }
}

#[test]
fn unknown_endpoints_and_methods() {
    let h = Harness::start();
    runtime().block_on(async {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<Bytes>>();
        let r = client.get(h.url("/nope").parse().unwrap()).await.unwrap();
        assert_eq!(r.status(), 404);
        let r = client.get(h.url("/exec").parse().unwrap()).await.unwrap();
        assert_eq!(r.status(), 405);
        let r = client.get(h.url("/halt").parse().unwrap()).await.unwrap();
        assert_eq!(r.status(), 405);
    });
}

#[test]
fn absurd_exec_timeouts_are_refused_not_a_crash() {
    let h = Harness::start();
    runtime().block_on(async {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<Bytes>>();
        for t in [
            "99999999999h",
            "340282366920938463463374607431.999999999s",
            "1e3",
        ] {
            let url = format!(
                "{}?cmd=true&mode=sys&timeout={}",
                h.url("/exec"),
                form_urlencoded::byte_serialize(t.as_bytes()).collect::<String>()
            );
            let req = http::Request::post(url)
                .body(http_body_util::Empty::new())
                .unwrap();
            let r = client.request(req).await.unwrap();
            assert_eq!(r.status(), 400, "timeout {t:?}");
        }
        // Still serving.
        let (st, out) = h
            .client()
            .exec_output(
                "echo",
                &ExecOptions {
                    args: vec!["alive".into()],
                    sys: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(st, buildlet::proto::ProcessState::Ok);
        assert_eq!(out, b"alive\n");
    });
}
