//! Whose fault an I/O error is: the request's or the machine's.
//!
//! The coordinator retries a build elsewhere when a buildlet answers 5xx
//! (`client::Error::is_communication`) and reports 4xx as a failed build. A
//! name the file system cannot hold fails the same way on every machine, so
//! retrying it elsewhere only burns machines: that is a 400 naming the
//! problem. A full disk is this machine's problem: 507, and another machine
//! may well succeed.

use std::io;

/// The classification of one I/O error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoFault {
    /// The request asked for something no machine can do; the text says what.
    Request(&'static str),
    /// The disk (or the user's quota) is full.
    DiskFull,
    /// Anything else: permissions, I/O errors, a broken machine.
    Machine,
}

/// Classifies `err` by its OS error code where there is one.
pub fn classify(err: &io::Error) -> IoFault {
    #[cfg(unix)]
    if let Some(code) = err.raw_os_error() {
        return match code {
            libc::ENAMETOOLONG => IoFault::Request("file name too long"),
            libc::ELOOP => IoFault::Request("too many levels of symbolic links"),
            libc::EILSEQ => IoFault::Request("invalid file name for this file system"),
            libc::ENOTDIR => IoFault::Request("a component of the path is not a directory"),
            libc::EISDIR => IoFault::Request("a directory exists at this path"),
            libc::EXDEV => {
                IoFault::Request("goes through a symbolic link that leads outside the work dir")
            }
            libc::ENOSPC | libc::EDQUOT => IoFault::DiskFull,
            _ => IoFault::Machine,
        };
    }
    match err.kind() {
        io::ErrorKind::InvalidFilename => IoFault::Request("invalid or too long file name"),
        io::ErrorKind::NotADirectory => {
            IoFault::Request("a component of the path is not a directory")
        }
        io::ErrorKind::IsADirectory => IoFault::Request("a directory exists at this path"),
        io::ErrorKind::StorageFull => IoFault::DiskFull,
        _ => IoFault::Machine,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn errno_classes() {
        let e = |c| io::Error::from_raw_os_error(c);
        assert!(matches!(
            classify(&e(libc::ENAMETOOLONG)),
            IoFault::Request(_)
        ));
        assert!(matches!(classify(&e(libc::ELOOP)), IoFault::Request(_)));
        assert_eq!(classify(&e(libc::ENOSPC)), IoFault::DiskFull);
        assert_eq!(classify(&e(libc::EDQUOT)), IoFault::DiskFull);
        assert_eq!(classify(&e(libc::EIO)), IoFault::Machine);
        assert_eq!(classify(&e(libc::EACCES)), IoFault::Machine);
    }
}
