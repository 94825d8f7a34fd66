//! Platform names: which buildlet binary a machine needs.
//!
//! A platform is `os/arch` with Rust's names (`std::env::consts::OS` and
//! `ARCH`), except that the architectures Rust names the same for both byte
//! orders get the target-triple spelling of their little-endian variant
//! (`powerpc64le`, `mips64el`, `mipsel`): a big-endian and a little-endian
//! machine cannot run each other's binaries. Go's names (`darwin`, `amd64`,
//! `arm64`, `386`, `ppc64le`, `loong64`, ...) are accepted as aliases
//! everywhere a platform is typed, since the farm's admins come from there.

use std::fmt;

/// An operating system and CPU architecture, normalized.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Platform {
    pub os: String,
    pub arch: String,
}

impl Platform {
    /// The platform this program was compiled for.
    pub fn current() -> Platform {
        let arch = match (std::env::consts::ARCH, cfg!(target_endian = "little")) {
            ("powerpc64", true) => "powerpc64le",
            ("mips64", true) => "mips64el",
            ("mips", true) => "mipsel",
            (a, _) => a,
        };
        Platform {
            os: std::env::consts::OS.to_string(),
            arch: arch.to_string(),
        }
    }

    /// Normalizes an OS and an architecture (Go or Rust spelling).
    pub fn parse(os: &str, arch: &str) -> Result<Platform, String> {
        Ok(Platform {
            os: normalize_os(os)?,
            arch: normalize_arch(arch)?,
        })
    }

    /// Parses `os/arch`.
    pub fn parse_pair(s: &str) -> Result<Platform, String> {
        let (os, arch) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not OS/ARCH (like linux/x86_64)"))?;
        Platform::parse(os, arch)
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)
    }
}

fn check_name(kind: &str, s: &str) -> Result<String, String> {
    let s = s.trim().to_ascii_lowercase();
    if s.is_empty()
        || s.len() > 32
        || !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(format!(
            "{s:?} is not a valid {kind} name (lowercase letters, digits and _; e.g. linux, x86_64)"
        ));
    }
    Ok(s)
}

/// `darwin` → `macos`; other names are kept (after checking their spelling).
pub fn normalize_os(s: &str) -> Result<String, String> {
    let s = check_name("OS", s)?;
    Ok(match s.as_str() {
        "darwin" | "osx" | "macosx" => "macos".into(),
        _ => s,
    })
}

/// Go and triple spellings → the names [`Platform::current`] uses.
pub fn normalize_arch(s: &str) -> Result<String, String> {
    let s = check_name("architecture", s)?;
    Ok(match s.as_str() {
        "amd64" | "x64" => "x86_64",
        "386" | "i386" | "i686" => "x86",
        "arm64" => "aarch64",
        "ppc64" => "powerpc64",
        "ppc64le" => "powerpc64le",
        "ppc" => "powerpc",
        "mipsle" => "mipsel",
        "mips64le" => "mips64el",
        "loong64" => "loongarch64",
        "wasm" => "wasm32",
        _ => return Ok(s),
    }
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_names_are_aliases() {
        assert_eq!(
            Platform::parse("linux", "amd64").unwrap(),
            Platform::parse("linux", "x86_64").unwrap()
        );
        assert_eq!(
            Platform::parse("darwin", "arm64").unwrap().to_string(),
            "macos/aarch64"
        );
        assert_eq!(
            Platform::parse_pair("linux/ppc64le").unwrap().arch,
            "powerpc64le"
        );
        assert_eq!(Platform::parse("linux", "386").unwrap().arch, "x86");
        assert!(Platform::parse("linux", "x86-64").is_err());
        assert!(Platform::parse("", "amd64").is_err());
        assert!(Platform::parse_pair("linux").is_err());
    }

    #[test]
    fn current_is_normalized() {
        let p = Platform::current();
        assert_eq!(Platform::parse(&p.os, &p.arch).unwrap(), p);
    }
}
