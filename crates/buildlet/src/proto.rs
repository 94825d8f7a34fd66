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
/// 2: reverse links park between HTTP/2 sessions ([`crate::link`]).
pub const VERSION: u32 = 2;

/// The trailer of `/exec` that carries the exit state. Its absence means the
/// stream broke off: a communication failure, never a failed command.
pub const PROCESS_STATE_TRAILER: &str = "process-state";

/// The trailer of `/exec` with `clean=1`: `ok` when the work dir was
/// emptied after the command (as `/removeall path=.` does), else why not.
/// A buildlet that does not know `clean=1` sends no such trailer, and its
/// client empties the work dir itself.
pub const CLEAN_STATE_TRAILER: &str = "clean-state";

/// How long `clean=1` may hold an `/exec` answer after its command: as
/// long as a coordinator gives a `/removeall`.
pub const CLEAN_LIMIT: Duration = Duration::from_secs(120);

/// How long after its `timeout` (and [`CLEAN_LIMIT`], with `clean=1`) an
/// `/exec` answer may still be open: the buildlet kills the command at the
/// timeout and drains its output for a few seconds more. A client gives up
/// on an answer open past that: the machine is not keeping its word, and
/// waiting for it would hold a build forever.
pub const EXEC_ANSWER_GRACE: Duration = Duration::from_secs(30);

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
    "\nFARMER_BUILDLET_INFO protocol=2 build=",
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
    /// The git tree its source cache holds (`/writesrc`), if any: what a
    /// delta can be made against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_tree: Option<String>,
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

/// Path of the interactive session endpoint (`POST`): a shell or command
/// under a pseudo-terminal (or plain pipes), streamed both ways over one
/// request. The request body is a stream of [`ShellInput`] frames; the
/// response body is the raw output, then the [`PROCESS_STATE_TRAILER`].
///
/// Query parameters: `term` ([`SHELL_DEFAULT_TERM`]; see [`valid_term`]),
/// `cols` and `rows` ([`SHELL_DEFAULT_SIZE`], each `1..=`[`SHELL_MAX_DIM`]),
/// `pty` (`1`, the default, or `0`: no terminal, stdout and stderr merged on
/// one pipe, for `ssh host cmd` without `-t`), `cmd` (run by the shell as
/// `$SHELL -c CMD`; absent: an interactive login shell `$SHELL -l`; `$SHELL`
/// is the buildlet's, `/bin/sh` when unset or not an absolute executable),
/// `dir` (relative to the work dir, like `/exec`'s) and repeated
/// `env=KEY=VALUE`. The environment is `/exec`'s (`WORKDIR`, `TMPDIR`,
/// `HOME`) plus `TERM` (with a terminal, or when `term` was given).
pub const SHELL_PATH: &str = "/shell";

/// `TERM` of a session that names none: what most terminals emulate.
pub const SHELL_DEFAULT_TERM: &str = "xterm";

/// Window size (columns, rows) of a session that names none.
pub const SHELL_DEFAULT_SIZE: (u16, u16) = (80, 24);

/// Largest column or row count a session accepts: larger is a garbled
/// request, not a screen.
pub const SHELL_MAX_DIM: u16 = 1000;

/// Longest `TERM` value accepted.
pub const SHELL_MAX_TERM: usize = 64;

/// Largest payload of one input frame. Bounds what the buildlet buffers
/// per session: it reads the next frame only once the last was written.
pub const SHELL_MAX_FRAME: usize = 64 << 10;

/// Frame type: input bytes for the terminal (or stdin).
pub const SHELL_FRAME_DATA: u8 = 0;
/// Frame type: window size, payload `cols: u16, rows: u16` big-endian.
pub const SHELL_FRAME_RESIZE: u8 = 1;
/// Frame type: end of input (stdin closed; with a terminal, no more writes).
pub const SHELL_FRAME_EOF: u8 = 2;
/// Bytes before a frame's payload: its type and its big-endian `u32` length.
pub const SHELL_FRAME_HEADER: usize = 5;

/// Whether `term` may become a session's `TERM`: 1 to [`SHELL_MAX_TERM`]
/// visible ASCII characters. Anything else (control characters above all)
/// could reach terminal databases and shell start-up files as garbage.
pub fn valid_term(term: &str) -> bool {
    !term.is_empty() && term.len() <= SHELL_MAX_TERM && term.bytes().all(|b| b.is_ascii_graphic())
}

/// Whether `n` is a usable column or row count.
pub fn valid_dim(n: u16) -> bool {
    (1..=SHELL_MAX_DIM).contains(&n)
}

/// One frame of a `/shell` request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShellInput {
    /// Bytes typed (or piped) into the session; at most
    /// [`SHELL_MAX_FRAME`] per frame ([`ShellInput::encode`] splits longer).
    Data(bytes::Bytes),
    /// The client's window changed size; the session gets `SIGWINCH`.
    Resize { cols: u16, rows: u16 },
    /// No more input: stdin is closed (with a terminal, writing just stops,
    /// as closing the terminal would hang up the session).
    Eof,
}

impl ShellInput {
    /// The wire form: one frame, or several for data longer than
    /// [`SHELL_MAX_FRAME`].
    pub fn encode(&self) -> bytes::Bytes {
        use bytes::BufMut;
        let mut out = bytes::BytesMut::new();
        let mut put = |ty: u8, payload: &[u8]| {
            out.put_u8(ty);
            // Lengths are at most SHELL_MAX_FRAME, well within u32.
            out.put_u32(payload.len() as u32);
            out.put_slice(payload);
        };
        match self {
            ShellInput::Data(d) => {
                for chunk in d.chunks(SHELL_MAX_FRAME) {
                    put(SHELL_FRAME_DATA, chunk);
                }
            }
            ShellInput::Resize { cols, rows } => {
                let mut p = [0u8; 4];
                p[..2].copy_from_slice(&cols.to_be_bytes());
                p[2..].copy_from_slice(&rows.to_be_bytes());
                put(SHELL_FRAME_RESIZE, &p);
            }
            ShellInput::Eof => put(SHELL_FRAME_EOF, &[]),
        }
        out.freeze()
    }
}

/// Why a `/shell` request body was refused; the session ends with its
/// processes killed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("input frame of type {0} is not one of 0 (data), 1 (resize), 2 (end of input)")]
    UnknownType(u8),
    #[error("input frame of {0} bytes is larger than {SHELL_MAX_FRAME}")]
    TooLarge(u32),
    #[error("resize frame of {0} bytes; it has exactly 4 (cols, rows)")]
    ResizeLength(u32),
    #[error("resize to {cols}x{rows}; each must be 1..={SHELL_MAX_DIM}")]
    ResizeRange { cols: u16, rows: u16 },
    #[error("end-of-input frame with a {0}-byte payload; it has none")]
    EofLength(u32),
}

/// Splits a `/shell` request body into [`ShellInput`]s as it arrives.
///
/// It holds at most one partial frame plus the chunk last pushed: push the
/// next chunk only once [`FrameDecoder::next_frame`] returned `Ok(None)`.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: bytes::BytesMut,
}

impl FrameDecoder {
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Adds bytes received.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes held that do not yet form a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed. A
    /// header is judged as soon as it is complete, so an oversized or
    /// unknown frame is refused before its payload is buffered.
    pub fn next_frame(&mut self) -> Result<Option<ShellInput>, FrameError> {
        use bytes::Buf;
        if self.buf.len() < SHELL_FRAME_HEADER {
            return Ok(None);
        }
        let ty = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        match ty {
            SHELL_FRAME_DATA if len as usize > SHELL_MAX_FRAME => {
                return Err(FrameError::TooLarge(len));
            }
            SHELL_FRAME_DATA => {}
            SHELL_FRAME_RESIZE if len != 4 => return Err(FrameError::ResizeLength(len)),
            SHELL_FRAME_RESIZE => {}
            SHELL_FRAME_EOF if len != 0 => return Err(FrameError::EofLength(len)),
            SHELL_FRAME_EOF => {}
            other => return Err(FrameError::UnknownType(other)),
        }
        let total = SHELL_FRAME_HEADER + len as usize;
        if self.buf.len() < total {
            return Ok(None);
        }
        self.buf.advance(SHELL_FRAME_HEADER);
        let payload = self.buf.split_to(len as usize).freeze();
        Ok(Some(match ty {
            SHELL_FRAME_DATA => ShellInput::Data(payload),
            SHELL_FRAME_RESIZE => {
                let cols = u16::from_be_bytes([payload[0], payload[1]]);
                let rows = u16::from_be_bytes([payload[2], payload[3]]);
                if !valid_dim(cols) || !valid_dim(rows) {
                    return Err(FrameError::ResizeRange { cols, rows });
                }
                ShellInput::Resize { cols, rows }
            }
            _ => ShellInput::Eof,
        }))
    }
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

    #[test]
    fn shell_frames_round_trip_in_any_split() {
        let inputs = [
            ShellInput::Data(bytes::Bytes::from_static(b"echo hi\n")),
            ShellInput::Resize {
                cols: 101,
                rows: 33,
            },
            ShellInput::Data(bytes::Bytes::from(vec![7u8; SHELL_MAX_FRAME + 10])),
            ShellInput::Eof,
        ];
        let wire: Vec<u8> = inputs.iter().flat_map(|i| i.encode().to_vec()).collect();
        for step in [1, 3, 4096, wire.len()] {
            let mut d = FrameDecoder::new();
            let mut got = Vec::new();
            for chunk in wire.chunks(step) {
                d.push(chunk);
                while let Some(i) = d.next_frame().unwrap() {
                    got.push(i);
                }
            }
            assert_eq!(d.buffered(), 0);
            // The long data arrives as two frames, split at the cap.
            let want = vec![
                inputs[0].clone(),
                inputs[1].clone(),
                ShellInput::Data(bytes::Bytes::from(vec![7u8; SHELL_MAX_FRAME])),
                ShellInput::Data(bytes::Bytes::from(vec![7u8; 10])),
                ShellInput::Eof,
            ];
            assert_eq!(got, want, "step {step}");
        }
    }

    #[test]
    fn bad_shell_frames_are_refused_from_the_header() {
        let cases: [(&[u8], FrameError); 5] = [
            (&[9, 0, 0, 0, 0], FrameError::UnknownType(9)),
            (&[0, 0, 1, 0, 1], FrameError::TooLarge(65537)),
            (&[1, 0, 0, 0, 3], FrameError::ResizeLength(3)),
            (&[2, 0, 0, 0, 1], FrameError::EofLength(1)),
            (
                &[1, 0, 0, 0, 4, 0, 0, 0, 24],
                FrameError::ResizeRange { cols: 0, rows: 24 },
            ),
        ];
        for (wire, want) in cases {
            let mut d = FrameDecoder::new();
            d.push(wire);
            assert_eq!(d.next_frame(), Err(want));
        }
        assert!(valid_term("xterm-256color"));
        assert!(!valid_term("xterm\u{1b}[2J"));
        assert!(!valid_term(""));
        assert!(!valid_term(&"x".repeat(65)));
    }
}

/// What `PUT /writesrc` answers: the tree now in the source cache and the
/// work dir.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SrcWritten {
    /// Git's tree id, verified.
    pub tree: String,
    /// Files copied into the work dir, and their bytes.
    pub files: u64,
    pub bytes: u64,
    /// Entries the delta carried (files, links, whiteouts); 0 for a whole tree.
    pub delta_entries: u64,
    /// Files the cache had to read to check the tree (the others were
    /// known unchanged since it last read them).
    #[serde(default)]
    pub files_read: u64,
}
