//! What a pushed tarball may expand to, the times extracted files get, and
//! which status a request the file system cannot satisfy earns.

use crate::common;

use std::io::Write;
use std::time::{Duration, SystemTime};

use buildlet::client::Error;
use bytes::Bytes;
use common::{Harness, accept_within, runtime};

fn rejected(err: &Error, status: u16, needle: &str) {
    match err {
        Error::Rejected { status: s, message } => {
            assert_eq!(s.as_u16(), status, "{err}");
            assert!(
                message.contains(needle),
                "message {message:?} should mention {needle:?}"
            );
        }
        other => panic!("expected a {status} refusal, got {other}"),
    }
}

/// Names in the work dir besides `tmp`.
fn left_behind(h: &Harness) -> Vec<String> {
    let mut v = h.workdir_names();
    v.retain(|n| n != "tmp");
    v
}

/// A tar.gz holding `name` of `size` zero bytes: a few KB that expand a
/// thousandfold, the shape of a gzip bomb.
fn zeros_tgz(name: &str, size: u64) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    b.append_data(&mut h, name, std::io::repeat(0).take_exact(size))
        .unwrap();
    b.into_inner().unwrap().finish().unwrap()
}

trait TakeExact: std::io::Read + Sized {
    fn take_exact(self, n: u64) -> std::io::Take<Self> {
        self.take(n)
    }
}
impl<R: std::io::Read> TakeExact for R {}

#[test]
fn gzip_bomb_is_refused_with_413_and_leaves_nothing() {
    const LIMIT: u64 = 4 << 20;
    let h = Harness::start_with(None, &[&format!("-max-expanded={LIMIT}")]);
    let c = h.client();
    let bomb = zeros_tgz("bomb", 20 << 20);
    assert!(bomb.len() < 256 << 10, "bomb is {} bytes", bomb.len());
    let before = h.outside_snapshot();
    runtime().block_on(async {
        // A small first file, so there is something to clean up.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        {
            let mut b = tar::Builder::new(&mut gz);
            let mut hd = tar::Header::new_gnu();
            hd.set_size(2);
            hd.set_mode(0o644);
            hd.set_cksum();
            b.append_data(&mut hd, "first", &b"ok"[..]).unwrap();
            let mut hd = tar::Header::new_gnu();
            hd.set_size(20 << 20);
            hd.set_mode(0o644);
            hd.set_cksum();
            b.append_data(&mut hd, "d/bomb", std::io::repeat(0).take_exact(20 << 20))
                .unwrap();
            b.finish().unwrap();
        }
        let two = gz.finish().unwrap();
        for (what, tgz) in [("single", bomb), ("after a file", two)] {
            let err = c.put_tgz_bytes("x", Bytes::from(tgz)).await.unwrap_err();
            rejected(
                &err,
                413,
                &format!("tarball expands past -max-expanded={LIMIT} bytes"),
            );
            assert!(!err.is_communication(), "{what}: {err}");
            assert_eq!(left_behind(&h), Vec::<String>::new(), "{what}");
        }
        // An archive under the limit still extracts.
        c.put_tgz_bytes("ok", Bytes::from(zeros_tgz("small", 1 << 20)))
            .await
            .unwrap();
        assert_eq!(
            std::fs::metadata(h.workdir.join("ok/small")).unwrap().len(),
            1 << 20
        );
    });
    assert_eq!(h.outside_snapshot(), before);
}

#[test]
fn too_many_entries_are_refused_with_413() {
    let h = Harness::start_with(None, &["-max-entries=100"]);
    let c = h.client();
    let names: Vec<String> = (0..150).map(|i| format!("f{i}")).collect();
    let files: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b""[..])).collect();
    let many = common::tgz(&files);
    let enough = common::tgz(&files[..100]);
    runtime().block_on(async {
        let err = c.put_tgz_bytes("x", Bytes::from(many)).await.unwrap_err();
        rejected(&err, 413, "tarball has more than -max-entries=100 entries");
        assert_eq!(left_behind(&h), Vec::<String>::new());
        c.put_tgz_bytes("x", Bytes::from(enough)).await.unwrap();
        assert_eq!(std::fs::read_dir(h.workdir.join("x")).unwrap().count(), 100);
    });
}

#[test]
fn limits_apply_to_writetgz_from_url() {
    const LIMIT: u64 = 4 << 20;
    let h = Harness::start_with(None, &[&format!("-max-expanded={LIMIT}")]);
    let bomb = zeros_tgz("bomb", 12 << 20);
    // A one-shot HTTP server on loopback serving the bomb.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/bomb.tgz", listener.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        let mut s = accept_within(&listener, std::time::Duration::from_secs(60));
        let mut req = [0u8; 4096];
        let _ = std::io::Read::read(&mut s, &mut req);
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            bomb.len()
        );
        let _ = s.write_all(&bomb);
    });
    runtime().block_on(async {
        let err = h.client().put_tgz_from_url("u", &url).await.unwrap_err();
        rejected(&err, 413, &format!("-max-expanded={LIMIT}"));
        assert_eq!(left_behind(&h), Vec::<String>::new());
    });
    server.join().unwrap();
}

#[test]
fn extracted_files_get_the_time_of_extraction() {
    let h = Harness::start();
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let mut hd = tar::Header::new_gnu();
    hd.set_size(3);
    hd.set_mode(0o644);
    hd.set_mtime(631_152_000); // 1990-01-01
    hd.set_cksum();
    b.append_data(&mut hd, "src/old.go", &b"old"[..]).unwrap();
    let tgz = b.into_inner().unwrap().finish().unwrap();
    let before = SystemTime::now() - Duration::from_secs(2);
    runtime()
        .block_on(h.client().put_tgz_bytes("", Bytes::from(tgz)))
        .unwrap();
    let mtime = std::fs::metadata(h.workdir.join("src/old.go"))
        .unwrap()
        .modified()
        .unwrap();
    assert!(
        mtime >= before,
        "extracted file has mtime {mtime:?}, older than the extraction"
    );
}

#[test]
fn names_too_long_are_the_requests_fault() {
    let h = Harness::start();
    let c = h.client();
    let long = "n".repeat(300);
    let before = h.outside_snapshot();
    runtime().block_on(async {
        let err = c
            .put_file(&long, 0o644, Bytes::from_static(b"x"))
            .await
            .unwrap_err();
        rejected(&err, 400, "too long");
        assert!(!err.is_communication(), "{err}");

        let err = c
            .put_file(&format!("{long}/f"), 0o644, Bytes::from_static(b"x"))
            .await
            .unwrap_err();
        rejected(&err, 400, "too long");

        // The same in a tarball (GNU long-name entry).
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        let mut hd = tar::Header::new_gnu();
        hd.set_size(1);
        hd.set_mode(0o644);
        hd.set_cksum();
        b.append_data(&mut hd, "ok", &b"1"[..]).unwrap();
        let mut hd = tar::Header::new_gnu();
        hd.set_size(1);
        hd.set_mode(0o644);
        hd.set_cksum();
        b.append_data(&mut hd, format!("d/{long}"), &b"x"[..])
            .unwrap();
        let tgz = b.into_inner().unwrap().finish().unwrap();
        let err = c.put_tgz_bytes("", Bytes::from(tgz)).await.unwrap_err();
        rejected(&err, 400, "too long");
        assert!(!err.is_communication(), "{err}");
        assert_eq!(left_behind(&h), Vec::<String>::new());
    });
    assert_eq!(h.outside_snapshot(), before);
}

/// A thousand connections that never finish a request (idle, or a request
/// head left half sent) do not keep the buildlet from serving its client,
/// and are closed by the buildlet.
#[test]
fn idle_and_slow_connections_do_not_lock_the_client_out() {
    use std::io::{Read, Write};
    let h = Harness::start();
    let conns: Vec<std::net::TcpStream> = (0..1000)
        .filter_map(|i| {
            let mut s = std::net::TcpStream::connect(&h.addr).ok()?;
            if i % 2 == 1 {
                let _ = s.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\nX-Slow: ");
            }
            Some(s)
        })
        .collect();
    assert!(conns.len() >= 990, "opened only {}", conns.len());
    let rt = common::runtime();
    let st = rt
        .block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(30), h.client().status()).await
        })
        .expect("/status did not answer while idle connections were open")
        .unwrap();
    assert_eq!(st.version, buildlet::proto::VERSION);
    let mut closed = 0;
    // One deadline for all of them: a server that never closes idle
    // connections fails in 30 s, not 1,000 times 20 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    for mut s in conns {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        s.set_read_timeout(Some(left.max(std::time::Duration::from_millis(1))))
            .unwrap();
        let mut b = [0u8; 64];
        // A reset (the server closed with our bytes unread) is closed too.
        if s.read(&mut b).map_or_else(
            |e| {
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            },
            |_| true,
        ) {
            closed += 1;
        }
    }
    assert!(closed >= 990, "only {closed} idle connections were closed");
}

/// A machine that never ends a command's answer (it says the command
/// runs, then nothing, forever) is given up on at the command's timeout
/// plus `proto::EXEC_ANSWER_GRACE`: a broken-off answer, which a
/// coordinator counts as a broken machine, not a build held forever. Not
/// before: a buildlet may drain output that long after the timeout.
#[test]
fn an_exec_answer_that_never_ends_is_given_up_after_its_timeout_and_grace() {
    use buildlet::client::{Client, ExecOptions};
    use buildlet::proto::EXEC_ANSWER_GRACE;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let mut s = accept_within(&listener, Duration::from_secs(60));
        let mut req = [0u8; 4096];
        let _ = std::io::Read::read(&mut s, &mut req);
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: Process-State\r\n\r\n3\r\nhi\n\r\n"
        );
        // Silent until the client hangs up (or two minutes pass).
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        while matches!(std::io::Read::read(&mut s, &mut req), Ok(n) if n > 0) {}
    });
    let timeout = Duration::from_secs(1);
    runtime().block_on(async {
        let c = Client::new(&addr, None);
        let opts = ExecOptions {
            timeout: Some(timeout),
            ..Default::default()
        };
        let started = std::time::Instant::now();
        let mut out = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(120), c.exec("true", &opts, &mut out))
            .await
            .expect("the client waited for the endless answer for two minutes");
        let took = started.elapsed();
        let err = r.unwrap_err();
        assert!(matches!(err, Error::BrokeOff(_)), "{err}");
        assert!(err.is_communication());
        assert!(
            err.to_string().contains("did not end the command within"),
            "{err}"
        );
        assert_eq!(out, b"hi\n", "the output before it went silent");
        assert!(
            took >= timeout + EXEC_ANSWER_GRACE,
            "gave up after {took:?}, before the timeout and its grace"
        );
    });
    server.join().unwrap();
}
