//! Fuzzes `buildlet::tarball::extract` with hostile archives.
//!
//! Input layout: the first byte selects the mode, the rest is the archive.
//!
//! * bit 0 clear: the rest is fed as-is, i.e. as a tar.gz stream (exercises
//!   the gzip framing and trailing-garbage handling);
//! * bit 0 set: the rest is a raw tar that is gzipped here first, so the
//!   fuzzer can mutate tar headers directly;
//! * bit 1 set: extract into the sub-directory `wd/d` instead of `wd` itself
//!   (links then may climb one level more and must still stay inside `wd`);
//! * bit 2 clear (raw tar only): header checksums are fixed up before
//!   gzipping, so mutations of names, types, link targets and sizes are not
//!   all rejected on the checksum; bit 2 set keeps the checksums as given.
//!
//! The layout on disk for every run is
//!
//! ```text
//! root/             fresh temp dir, canonicalized
//!   wd/             the work dir handed to `extract` (empty before each run)
//!   outside/        a sibling that must never be touched
//!     sentinel      a file whose content, mode and link count must not change
//! ```
//!
//! After `extract` returns (either way) the target checks that nothing was
//! created, removed or changed outside `wd`, and that every symbolic link
//! inside `wd` that resolves at all resolves to a path inside `wd`. When
//! `extract` fails, `wd` must be empty again.

#![no_main]

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;

const SENTINEL: &[u8] = b"do not touch\n";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let stream: Vec<u8> = if mode & 1 == 0 {
        body.to_vec()
    } else {
        let mut body = body.to_vec();
        if mode & 4 == 0 {
            fix_checksums(&mut body);
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&body).unwrap();
        gz.finish().unwrap()
    };
    let dest: Vec<String> = if mode & 2 == 0 {
        Vec::new()
    } else {
        vec!["d".to_string()]
    };


    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().canonicalize().expect("canonicalize root");
    let wd = root.join("wd");
    let outside = root.join("outside");
    let sentinel = outside.join("sentinel");
    fs::create_dir(&wd).unwrap();
    fs::create_dir(&outside).unwrap();
    fs::write(&sentinel, SENTINEL).unwrap();
    let wd = wd.canonicalize().unwrap();
    let before = Snapshot::take(&root, &outside, &sentinel);

    let result = buildlet::tarball::extract(&stream[..], &wd, &dest);

    // 1. Nothing outside wd was created, removed or changed.
    let mut outside_wd = BTreeSet::new();
    walk(&root, &mut |p, _| {
        if !p.starts_with(&wd) {
            outside_wd.insert(p.to_path_buf());
        }
    });
    // (`wd` itself starts_with `wd`, so it is not in the set.)
    let expected: BTreeSet<PathBuf> = [outside.clone(), sentinel.clone()].into_iter().collect();
    assert_eq!(
        outside_wd, expected,
        "extract touched the tree outside wd (result: {result:?})"
    );
    let after = Snapshot::take(&root, &outside, &sentinel);
    assert_eq!(before, after, "sentinel area changed (result: {result:?})");

    // wd itself must still be a real directory (not replaced by a link or file).
    let wd_meta = fs::symlink_metadata(&wd).unwrap();
    assert!(wd_meta.is_dir(), "wd is no longer a directory");

    // 2. Every symlink inside wd that resolves stays inside wd.
    walk(&wd, &mut |p, meta| {
        if meta.file_type().is_symlink()
            && let Ok(real) = fs::canonicalize(p)
        {
            assert!(
                real.starts_with(&wd),
                "symlink {} resolves to {} outside wd (result: {result:?})",
                p.display(),
                real.display()
            );
        }
    });

    // 3. A failed extraction leaves nothing behind.
    if result.is_err() {
        let left: Vec<PathBuf> = fs::read_dir(&wd)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(
            left.is_empty(),
            "extract failed ({result:?}) but left {left:?} behind"
        );
    }
});

/// What must not change outside wd.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    root_mode: u32,
    outside_mode: u32,
    outside_is_dir: bool,
    sentinel_is_file: bool,
    sentinel_mode: u32,
    sentinel_nlink: u64,
    sentinel_ino: u64,
    sentinel_content: Option<Vec<u8>>,
}

impl Snapshot {
    fn take(root: &Path, outside: &Path, sentinel: &Path) -> Snapshot {
        let root_meta = fs::symlink_metadata(root).unwrap();
        let out_meta = fs::symlink_metadata(outside).unwrap();
        let s_meta = fs::symlink_metadata(sentinel).unwrap();
        Snapshot {
            root_mode: root_meta.mode(),
            outside_mode: out_meta.mode(),
            outside_is_dir: out_meta.is_dir(),
            sentinel_is_file: s_meta.is_file(),
            sentinel_mode: s_meta.mode(),
            sentinel_nlink: s_meta.nlink(),
            sentinel_ino: s_meta.ino(),
            sentinel_content: if s_meta.is_file() {
                fs::read(sentinel).ok()
            } else {
                None
            },
        }
    }
}

/// Depth-first walk that never follows symbolic links; calls `f` for every
/// entry below `dir` (not `dir` itself).
fn walk(dir: &Path, f: &mut dyn FnMut(&Path, &fs::Metadata)) {
    let Ok(rd) = fs::read_dir(dir) else {
        return;
    };
    for e in rd {
        let e = e.unwrap();
        let p = e.path();
        let meta = fs::symlink_metadata(&p).unwrap();
        f(&p, &meta);
        if meta.is_dir() {
            walk(&p, f);
        }
    }
}

/// Offsets of the tar headers in `tar`, walking header by header as a reader
/// would (skipping each entry's data by its size field, and all-zero blocks).
fn header_offsets(tar: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut off = 0usize;
    while off + 512 <= tar.len() {
        let block = &tar[off..off + 512];
        if block.iter().all(|&b| b == 0) {
            off += 512;
            continue;
        }
        out.push(off);
        let Some(size) = parse_size(&block[124..136]) else {
            break;
        };
        let Some(next) = size
            .div_ceil(512)
            .checked_mul(512)
            .and_then(|d| d.checked_add(off as u64 + 512))
        else {
            break;
        };
        if next > tar.len() as u64 {
            break;
        }
        off = next as usize;
    }
    out
}

/// Writes a correct checksum into every header, so the fuzzer's mutations
/// reach the extractor instead of the checksum check.
fn fix_checksums(tar: &mut [u8]) {
    for off in header_offsets(tar) {
        let block = &mut tar[off..off + 512];
        block[148..156].fill(b' ');
        let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
        let field = format!("{sum:06o}\0 ");
        block[148..156].copy_from_slice(field.as_bytes());
    }
}


/// The tar size field: octal text, or base-256 when the high bit is set.
fn parse_size(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let text = std::str::from_utf8(field).ok()?;
    let text = text.trim_matches(|c| c == ' ' || c == '\0');
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}
