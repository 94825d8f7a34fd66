//! "Nothing outside the work dir" holds against a step that races the
//! buildlet: while a command keeps swapping a directory for a symlink to
//! outside, the client writes, extracts into and removes below that
//! directory. Requests may fail; nothing outside may change.
#![cfg(unix)]

use crate::common;

use std::time::{Duration, Instant};

use buildlet::client::ExecOptions;
use bytes::Bytes;
use common::{Harness, runtime, tgz};

#[test]
fn symlink_swaps_during_writes_never_reach_outside() {
    let h = Harness::start();
    let before = h.outside_snapshot();
    let rt = runtime();
    let c = h.client();
    // The racer: bounded in iterations and by a stop file, and by a timeout.
    let racer = "i=0; while [ $i -lt 20000 ] && [ ! -e stop ]; do \
                   rm -rf d; ln -s ../outside d; rm -f d; mkdir d; i=$((i+1)); \
                 done 2>/dev/null; echo swapped $i times";
    let c2 = c.clone();
    let race = rt.spawn(async move {
        c2.exec_output(
            "sh",
            &ExecOptions {
                args: vec!["-c".into(), racer.into()],
                sys: true,
                timeout: Some(Duration::from_secs(60)),
                ..Default::default()
            },
        )
        .await
    });
    let small = Bytes::from(tgz(&[("x", b"pwned"), ("sub/file", b"pwned")]));
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut attempts = 0;
    let mut ok = 0;
    rt.block_on(async {
        for i in 0..3000 {
            if Instant::now() > deadline {
                break;
            }
            attempts += 1;
            let r = match i % 4 {
                0 | 1 => {
                    c.put_file(&format!("d/f{i}"), 0o644, Bytes::from_static(b"pwned"))
                        .await
                }
                2 => c.put_tgz_bytes("d", small.clone()).await,
                _ => c.remove_all(&["d/sub", "d/sentinel"]).await,
            };
            if r.is_ok() {
                ok += 1;
            }
        }
        c.put_file("stop", 0o644, Bytes::new()).await.unwrap();
    });
    let (st, out) = rt.block_on(race).unwrap().unwrap();
    assert!(st.success(), "{st:?}: {}", String::from_utf8_lossy(&out));
    eprintln!(
        "{attempts} requests ({ok} succeeded) against a racer that {}",
        String::from_utf8_lossy(&out).trim()
    );
    assert_eq!(
        h.outside_snapshot(),
        before,
        "a write landed outside the work dir"
    );
}
