//! The wire contract between the buildlet and its clients.
//!
//! Everything both sides must agree on lives here, so the server and the
//! [`client`](crate::client) cannot drift apart: endpoint paths, header and
//! trailer names, the JSON shapes of `/status` and `/ls`, and how the exit state
//! of a command is spelled in the `/exec` trailer.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The buildlet protocol version. Bumped whenever the API changes in a way a
/// coordinator may need to know about (it can refuse buildlets that are too old).
pub const VERSION: u32 = 1;

/// The trailer of `/exec` that carries the exit state. Its absence means the
/// stream broke off: a communication failure, never a failed command.
pub const PROCESS_STATE_TRAILER: &str = "process-state";

/// Path of the coordinator endpoint a reverse buildlet dials.
pub const REVERSE_PATH: &str = "/reverse";

/// `Upgrade` protocol token of the reverse connection: after `101`, the
/// coordinator speaks HTTP/2 as the client and the buildlet serves its API.
pub const REVERSE_UPGRADE: &str = "farmer-buildlet";

/// Registration headers sent by a reverse buildlet.
pub const HDR_HOST_TYPE: &str = "x-farmer-host-type";
pub const HDR_HOSTNAME: &str = "x-farmer-hostname";
pub const HDR_VERSION: &str = "x-farmer-buildlet-version";
pub const HDR_BUILDER_KEY: &str = "x-farmer-builder-key";
/// Bot mode: a machine token (from `machine-tokend`) instead of a builder key.
pub const HDR_MACHINE_TOKEN: &str = "x-farmer-machine-token";
/// The buildlet's build (crate version), shown on the status page.
pub const HDR_BUILD: &str = "x-farmer-buildlet-build";
/// Hex SHA-256 of the running buildlet executable: tells the coordinator
/// which published release the machine runs (see `crates/stage0`).
pub const HDR_BINARY_SHA256: &str = "x-farmer-buildlet-sha256";
/// Set when stage0 started the buildlet: the platform (`os/arch`) stage0
/// fetched. Only such machines are halted to upgrade them.
pub const HDR_STAGE0: &str = "x-farmer-stage0";
/// The environment variable stage0 sets for the buildlet (its value goes
/// into [`HDR_STAGE0`]); the same name as `stage0::ENV_STAGE0`.
pub const ENV_STAGE0: &str = "FARMER_STAGE0";

/// Embedded in every buildlet executable (the CLI references it), so
/// `farmer buildlet publish` can read the protocol version of a binary built
/// for any platform without running it. Keep the number equal to [`VERSION`]
/// (a test checks).
pub static BINARY_INFO: &str = concat!(
    "\nFARMER_BUILDLET_INFO protocol=1 build=",
    env!("CARGO_PKG_VERSION"),
    "\n"
);

/// Default cap on request bodies (`/writetgz`, `/write`): 4 GiB.
pub const DEFAULT_MAX_BODY: u64 = 4 << 30;

/// Default cap on what one tarball expands to (the uncompressed tar stream:
/// headers and contents): 8 GiB. `-max-body` bounds only compressed bytes,
/// and gzip reaches ratios near 1000:1, so without this a 1 MB body could
/// fill the disk. Twice the default body limit leaves room for ordinary
/// source trees, which compress 2-5x.
pub const DEFAULT_MAX_EXPANDED: u64 = 8 << 30;

/// Default cap on the number of entries in one tarball: a million. Tiny
/// entries cost inodes and metadata writes far beyond their bytes; the
/// largest source trees pushed to builders have a few hundred thousand.
pub const DEFAULT_MAX_ENTRIES: u64 = 1_000_000;

/// What `GET /status` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Protocol version ([`VERSION`]) of the buildlet.
    pub version: u32,
    /// The crate version the buildlet binary was built from.
    pub build: String,
    /// Operating system, as Rust spells it (`linux`, `macos`, `windows`, ...).
    pub os: String,
    /// CPU architecture, as Rust spells it (`x86_64`, `aarch64`, ...).
    pub arch: String,
    pub hostname: String,
    /// Absolute path of the work dir on the machine.
    pub workdir: String,
    /// Seconds since the buildlet started.
    pub uptime_secs: u64,
}

/// One line of `GET /ls` (the response is JSON lines, one entry each).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LsEntry {
    /// Path relative to the listed directory, `/`-separated; directories end in `/`.
    pub path: String,
    /// Unix permission bits (0 on systems without them).
    pub mode: u32,
    pub kind: EntryKind,
    pub size: u64,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: i64,
    /// Hex SHA-256 of a regular file's content, when `digest=1` was asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Target of a symbolic link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// How a command run by `/exec` ended, as carried by the `Process-State` trailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessState {
    /// Exit status 0.
    Ok,
    /// Non-zero exit status.
    Exited(i32),
    /// Killed by a signal (Unix).
    Signaled(i32),
    /// Killed because the request's timeout passed.
    TimedOut(Duration),
    /// The buildlet could not start or wait for the command; the text says why.
    Error(String),
}

impl ProcessState {
    pub fn success(&self) -> bool {
        matches!(self, ProcessState::Ok)
    }

    /// Renders the trailer value.
    pub fn to_trailer(&self) -> String {
        match self {
            ProcessState::Ok => "ok".into(),
            ProcessState::Exited(c) => format!("exit status {c}"),
            ProcessState::Signaled(s) => format!("signal {s}"),
            ProcessState::TimedOut(d) => format!("timeout {}ms", d.as_millis()),
            ProcessState::Error(e) => format!("error {e}"),
        }
    }

    /// Parses a trailer value; unknown shapes become [`ProcessState::Error`].
    pub fn from_trailer(s: &str) -> ProcessState {
        let s = s.trim();
        if s == "ok" {
            return ProcessState::Ok;
        }
        if let Some(c) = s.strip_prefix("exit status ").and_then(|c| c.parse().ok()) {
            return ProcessState::Exited(c);
        }
        if let Some(c) = s.strip_prefix("signal ").and_then(|c| c.parse().ok()) {
            return ProcessState::Signaled(c);
        }
        if let Some(ms) = s
            .strip_prefix("timeout ")
            .and_then(|m| m.strip_suffix("ms"))
            .and_then(|m| m.parse().ok())
        {
            return ProcessState::TimedOut(Duration::from_millis(ms));
        }
        ProcessState::Error(s.strip_prefix("error ").unwrap_or(s).to_string())
    }
}

impl std::fmt::Display for ProcessState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProcessState::Ok => write!(f, "exit status 0"),
            ProcessState::Exited(c) => write!(f, "exit status {c}"),
            ProcessState::Signaled(s) => write!(f, "killed by signal {s}"),
            ProcessState::TimedOut(d) => write!(f, "killed after timeout of {d:?}"),
            ProcessState::Error(e) => write!(f, "{e}"),
        }
    }
}

/// The longest `timeout` an exec accepts (a year); longer is refused.
pub const MAX_EXEC_TIMEOUT: Duration = Duration::from_secs(366 * 24 * 3600);

/// Parses a duration the way Go's `time.ParseDuration` spells it (`90s`,
/// `1m30s`, `500ms`, `2h`), or a bare number of seconds (the shared
/// parser, [`goflags::duration::parse_lenient`]).
pub fn parse_duration(s: &str) -> Option<Duration> {
    goflags::duration::parse_lenient(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_state_round_trips() {
        for st in [
            ProcessState::Ok,
            ProcessState::Exited(3),
            ProcessState::Signaled(9),
            ProcessState::TimedOut(Duration::from_millis(1500)),
            ProcessState::Error("no such file".into()),
        ] {
            assert_eq!(ProcessState::from_trailer(&st.to_trailer()), st);
        }
    }

    #[test]
    fn binary_info_matches_the_version() {
        let protocol = BINARY_INFO
            .split_whitespace()
            .find_map(|w| w.strip_prefix("protocol="))
            .and_then(|v| v.parse::<u32>().ok());
        assert_eq!(protocol, Some(VERSION));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("abc"), None);
        assert_eq!(parse_duration("-1"), None);
        assert_eq!(parse_duration("5x"), None);
    }
}
