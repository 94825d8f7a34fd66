//! Fuzzes `buildlet::paths::{clean, resolve, check_link_target}`.
//!
//! Input layout: the first byte holds flags, the rest is the path (UTF-8;
//! invalid sequences are replaced, so every input is used).
//!
//! * `clean` must not panic, and when it succeeds no component may be `..`,
//!   `.`, empty, or contain `/`, `\` or NUL.
//! * `resolve` of the cleaned components below a work dir prepared with
//!   symbolic links (some pointing inside, some outside) must either fail or
//!   return a path that starts with the work dir. When it succeeds and the
//!   OS can resolve the same path, both must agree (`resolve` claims to
//!   follow links exactly as the kernel does, only refusing escapes).
//! * `check_link_target` must not panic, and a target it accepts, taken
//!   lexically from the link's directory, must not climb above the work dir.

#![no_main]

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use buildlet::paths::{check_link_target, clean, resolve};
use libfuzzer_sys::fuzz_target;

struct Fixture {
    _tmp: tempfile::TempDir,
    /// The work dir (`root/wd`), canonical.
    wd: PathBuf,
}

/// Layout (created once; `resolve` only reads the disk):
///
/// ```text
/// root/
///   outside/secret
///   wd/
///     real/sub/file
///     real/up      -> ..            (inside: wd)
///     real/out     -> ../..         (outside: root)
///     real/sub/upup -> ../..        (inside: wd)
///     real/sub/up3  -> ../../..     (outside: root)
///     inner        -> real          (inside)
///     chain        -> inner/sub     (inside, through another link)
///     self         -> .             (inside, loops on itself)
///     abs          -> /etc          (absolute, outside)
///     absin        -> <wd>/real     (absolute, refused even though inside)
///     esc          -> ../outside    (outside sibling)
///     escfile      -> ../outside/secret
///     loop1 -> loop2, loop2 -> loop1
///     dangling     -> nothere/x     (inside, does not exist)
///     tofile       -> real/sub/file
///     mid          -> real/sub/../.. (inside: wd, '..' after names)
///     midout       -> inner/../..   (outside)
///     real/sub/side -> ../../inner/sub (inside)
/// ```
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().canonicalize().unwrap();
        fs::create_dir(root.join("outside")).unwrap();
        fs::write(root.join("outside/secret"), b"secret").unwrap();
        let wd = root.join("wd");
        fs::create_dir_all(wd.join("real/sub")).unwrap();
        fs::write(wd.join("real/sub/file"), b"x").unwrap();
        let links: &[(&str, &str)] = &[
            ("real/up", ".."),
            ("real/out", "../.."),
            ("real/sub/upup", "../.."),
            ("real/sub/up3", "../../.."),
            ("real/sub/side", "../../inner/sub"),
            ("inner", "real"),
            ("chain", "inner/sub"),
            ("self", "."),
            ("abs", "/etc"),
            ("esc", "../outside"),
            ("escfile", "../outside/secret"),
            ("loop1", "loop2"),
            ("loop2", "loop1"),
            ("dangling", "nothere/x"),
            ("tofile", "real/sub/file"),
            ("mid", "real/sub/../.."),
            ("midout", "inner/../.."),
        ];
        for (link, target) in links {
            symlink(target, wd.join(link)).unwrap();
        }
        symlink(wd.join("real"), wd.join("absin")).unwrap();
        let wd = wd.canonicalize().unwrap();
        Fixture { _tmp: tmp, wd }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let s = String::from_utf8_lossy(rest);
    let s: &str = &s;
    let follow_last = flags & 1 == 1;

    // clean
    let Ok(comps) = clean(s) else {
        check_link(flags, s);
        return;
    };
    for c in &comps {
        assert!(
            !matches!(c.as_str(), "" | "." | "..")
                && !c.contains('/')
                && !c.contains('\\')
                && !c.contains('\0'),
            "clean({s:?}) returned bad component {c:?} in {comps:?}"
        );
    }
    assert!(!s.starts_with('/'), "clean accepted absolute {s:?}");

    // resolve
    let fx = fixture();
    let wd = &fx.wd;
    if let Ok(p) = resolve(wd, s, &comps, follow_last) {
        assert!(
            p.starts_with(wd),
            "resolve({s:?}, follow_last={follow_last}) = {} is outside {}",
            p.display(),
            wd.display()
        );
        // What the OS makes of it must be inside too, and agree with resolve.
        let joined = comps.iter().fold(wd.clone(), |acc, c| acc.join(c));
        if follow_last {
            if let Ok(real) = fs::canonicalize(&joined) {
                assert!(
                    real.starts_with(wd),
                    "resolve({s:?}) succeeded but the OS resolves it to {} outside wd",
                    real.display()
                );
                assert_eq!(
                    fs::canonicalize(&p).ok().as_ref(),
                    Some(&real),
                    "resolve({s:?}) = {} disagrees with the OS ({})",
                    p.display(),
                    real.display()
                );
            }
        } else if !comps.is_empty()
            && let Some(parent) = joined.parent()
            && let Ok(real) = fs::canonicalize(parent)
        {
            assert!(
                real.starts_with(wd),
                "resolve({s:?}, follow_last=false): parent resolves to {} outside wd",
                real.display()
            );
        }
    }

    check_link(flags, s);
});

/// `check_link_target` with `s` as the link target, from one of a few link
/// directories chosen by `flags`.
fn check_link(flags: u8, s: &str) {
    let wd = Path::new("/w");
    let dirs = ["/w", "/w/a", "/w/a/b", "/w/a/b/c"];
    let link_dir = PathBuf::from(dirs[usize::from((flags >> 1) & 3)]);
    if check_link_target(wd, "entry", &link_dir, Path::new(s)).is_ok() {
        // Lexically from the link's directory, the target must stay in /w.
        let mut cur = link_dir.clone();
        for c in Path::new(s).components() {
            match c {
                Component::ParentDir => {
                    assert!(
                        cur != wd && cur.pop(),
                        "check_link_target accepted {s:?} from {} but it climbs out",
                        link_dir.display()
                    );
                }
                Component::Normal(n) => cur.push(n),
                Component::CurDir => {}
                Component::RootDir | Component::Prefix(_) => {
                    panic!("check_link_target accepted absolute {s:?}")
                }
            }
        }
        assert!(cur.starts_with(wd));
    }
}
