//! Replacing a file atomically, one way for every farmer program (keys,
//! tokens, manifests, artifacts): readers see the old file or the new one,
//! never half of one, and a private file is never readable by others, not
//! even for a moment.
//!
//! The data goes to a temp file in the same directory whose name no other
//! writer uses (process id, a counter, the clock), created with the final
//! mode (so a secret is never world-readable), synced, then renamed over the
//! target. On any error the temp file is removed and the target is untouched.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `data` to `path` atomically. `mode` (Unix permission bits, e.g.
/// `0o600`) applies to the new file from its creation; `None` leaves the
/// process's default. Creates the parent directory if needed.
pub fn write(path: &Path, data: &[u8], mode: Option<u32>) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(temp_name(path));
    // The directory is made only when missing: most writes go where one
    // went before, and asking first cost two system calls per write.
    let r = match write_new(&tmp, data, mode) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&dir)?;
            write_new(&tmp, data, mode)
        }
        r => r,
    }
    .and_then(|()| std::fs::rename(&tmp, path));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Like [`write`], readable and writable by the owner only.
pub fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    write(path, data, Some(0o600))
}

fn temp_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        ".{name}.{}-{}-{nanos}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn write_new(tmp: &Path, data: &[u8], mode: Option<u32>) -> io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    // A fresh name: never follow or reuse whatever might be there.
    opts.write(true).create_new(true);
    #[cfg(unix)]
    if let Some(m) = mode {
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, m);
    }
    let mut f = opts.open(tmp)?;
    // The umask may have narrowed the mode asked for at creation; set it
    // exactly, before any byte is written.
    #[cfg(unix)]
    if let Some(m) = mode {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(m))?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    f.write_all(data)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_with_mode_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub").join("secret");
        write_private(&p, b"one").unwrap();
        write_private(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            write(&p, b"three", Some(0o644)).unwrap();
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o644);
        }
        let names: Vec<_> = std::fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("secret")]);
    }

    #[test]
    fn a_failed_write_leaves_the_target_alone() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("file");
        write(&p, b"good", None).unwrap();
        // Renaming a file over a directory fails: the old content stays.
        let d = dir.path().join("dir");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("x"), b"x").unwrap();
        assert!(write(&d, b"bad", None).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"good");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    }
}
