//! Finished logs, gzip-compressed: in the artifact store (`logs/steps/ID`,
//! `logs/attempts/ID`) when it is one every coordinator of the farm reads
//! (a bucket, or the data dir of a farm on SQLite, which has one
//! coordinator); in the database row otherwise (PostgreSQL with the artifact
//! store in one coordinator's data dir: a standby could not read it), and
//! whenever the artifact store fails (a log is never lost to an outage).
//! A short log (under [`STORED_BELOW`]) is always kept in its row: an object
//! of its own would cost more than it holds (a file's inode and block, or a
//! bucket's PUT), and writing it was a tenth of the coordinator's CPU for a
//! build of one short step.
//! Logs are read from where they were written: the row when it holds them,
//! else the artifact store. Live logs stream from memory (`crate::logs`)
//! while a build runs.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use sqlx::Row;

use super::conns::{Arg, Stmt};
use super::{Result, RunResult, Store, now_ms, text};
use crate::artifacts::ArtifactStore;

pub(super) fn step_key(id: i64) -> String {
    format!("logs/steps/{id}.log.gz")
}

pub(super) fn attempt_key(id: i64) -> String {
    format!("logs/attempts/{id}.log.gz")
}

/// Keeps an attempt's whole log (replacing one kept before); the row's
/// blob is empty when the log is in the artifact store.
const PUT_ATTEMPT_LOG: &str = "INSERT INTO attempt_logs (attempt_id, build_id, log_gz, log_size) VALUES ($1, $2, $3, $4) \
     ON CONFLICT (attempt_id) DO UPDATE SET log_gz = excluded.log_gz, log_size = excluded.log_size";

/// Ends a step: its result, why, when, and its log (the blob `NULL` when
/// the log is in the artifact store).
const FINISH_STEP: &str = "UPDATE steps SET result = $1, detail = $2, finished_at = $3, log_gz = $4, log_size = $5 WHERE id = $6";

/// A step's end not recorded yet: the last step's is recorded with its
/// attempt's ([`Store::end_attempt`]), in the same write.
#[derive(Debug)]
pub struct StepEnd {
    pub step_id: i64,
    pub result: RunResult,
    pub detail: String,
    pub log: Bytes,
}

/// Logs shorter than this are kept as a gzip member of one stored
/// (uncompressed) block. Compressing a few hundred bytes saves a few
/// hundred bytes, and setting up a compressor (zeroing its ~300 KiB of
/// tables) cost more than the rest of keeping such a log: a build of one
/// short step spent 5 % of the coordinator's CPU in that `memset`.
const STORED_BELOW: usize = 1024;

/// A log as kept: a gzip member (RFC 1952), which any gzip reader opens.
fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    if let Ok(len) = u16::try_from(data.len())
        && usize::from(len) < STORED_BELOW
    {
        return gzip_stored(data, len);
    }
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = e.write_all(data);
    e.finish().unwrap_or_default()
}

/// `data`, `len` bytes (a stored block holds at most 65535), in a gzip
/// member whose deflate stream is one final stored block (RFC 1951,
/// 3.2.4).
fn gzip_stored(data: &[u8], len: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 23);
    // Magic, deflate, no flags, no time, no extra flags, OS unknown.
    out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]);
    // BFINAL = 1, BTYPE = 00 (stored), then LEN and its complement.
    out.push(1);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(data);
    let mut crc = flate2::Crc::new();
    crc.update(data);
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// Decompresses a stored log off the async threads when it is large.
async fn gunzip_async(gz: Vec<u8>) -> Vec<u8> {
    if gz.len() < 64 << 10 {
        return gunzip(&gz);
    }
    tokio::task::spawn_blocking(move || gunzip(&gz))
        .await
        .unwrap_or_default()
}

/// Decompresses a stored log, at most a little more than the longest log
/// ever kept (`logs::MAX_LOG`): a damaged object cannot balloon.
fn gunzip(gz: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    let limit = (crate::logs::MAX_LOG + (1 << 20)) as u64;
    let _ = flate2::read::GzDecoder::new(gz)
        .take(limit)
        .read_to_end(&mut out);
    out
}

impl Store {
    /// Finished logs are read from `blobs` (when their row does not hold
    /// them) and, if `write`, written there from now on.
    pub fn with_blobs(mut self, blobs: Arc<dyn ArtifactStore>, write: bool) -> Store {
        self.blobs = Some(blobs);
        self.write_blobs = write;
        self
    }

    /// Compresses `log` and puts it in the artifact store; the compressed
    /// bytes come back for the row when the log is short, there is no
    /// artifact store, or it failed.
    pub(super) async fn keep_log(&self, key: &str, log: &[u8]) -> Option<Vec<u8>> {
        let gz = if log.len() > 1 << 20 {
            let owned = log.to_vec();
            tokio::task::spawn_blocking(move || gzip(&owned))
                .await
                .unwrap_or_else(|_| gzip(log))
        } else {
            gzip(log)
        };
        let Some(blobs) = self
            .blobs
            .as_ref()
            .filter(|_| self.write_blobs && log.len() >= STORED_BELOW)
        else {
            return Some(gz);
        };
        let data = Bytes::from(gz);
        match blobs.put(key, data.clone()).await {
            Ok(()) => None,
            Err(e) => {
                tracing::warn!(
                    key,
                    "cannot write a finished log to the {}: {e}; keeping it in the database",
                    blobs.describe()
                );
                Some(data.to_vec())
            }
        }
    }

    /// A log as kept: from its row, else from the artifact store. A log the
    /// artifact store lost or cannot give reads as a line saying so (and a
    /// warning): never silently empty, and one lost log does not take the
    /// rest of its build's page with it.
    async fn read_log(&self, key: &str, row: Option<Vec<u8>>, size: i64) -> Result<Vec<u8>> {
        if let Some(gz) = row.filter(|g| !g.is_empty()) {
            return Ok(gunzip_async(gz).await);
        }
        if size == 0 {
            return Ok(Vec::new());
        }
        let why = match &self.blobs {
            None => "it is in an artifact store this coordinator does not have".to_string(),
            Some(blobs) => match blobs.get(key).await {
                Ok(Some(gz)) => return Ok(gunzip_async(gz.to_vec()).await),
                Ok(None) => format!("it is missing from the {}", blobs.describe()),
                Err(e) => format!("reading it from the {}: {e}", blobs.describe()),
            },
        };
        tracing::warn!(key, "a finished log cannot be read: {why}");
        Ok(format!("farmer: this log ({size} bytes) cannot be read: {why}\n").into_bytes())
    }

    /// Finishes a step and keeps its log.
    pub async fn finish_step(&self, end: &StepEnd) -> Result<()> {
        let stmt = self.finish_step_stmt(end, now_ms()).await;
        self.writer().batch(&[stmt]).await?;
        Ok(())
    }

    /// [`FINISH_STEP`] for `end` as a statement of a batch, its log kept
    /// first.
    pub(super) async fn finish_step_stmt(&self, end: &StepEnd, now: i64) -> Stmt {
        let row = self.keep_log(&step_key(end.step_id), &end.log).await;
        Stmt::new(
            FINISH_STEP,
            vec![
                Arg::Text(end.result.as_str().into()),
                Arg::Text(text(&end.detail)),
                Arg::Int(now),
                Arg::Bytes(row),
                Arg::Int(end.log.len() as i64),
                Arg::Int(end.step_id),
            ],
        )
    }

    /// The kept (finished) log of one step, decompressed.
    pub async fn step_log(&self, step_id: i64) -> Result<Option<Vec<u8>>> {
        let r = sqlx::query("SELECT log_gz, log_size FROM steps WHERE id = $1")
            .bind(step_id)
            .fetch_optional(self.pool())
            .await?;
        let Some(r) = r else { return Ok(None) };
        let row: Option<Vec<u8>> = r.try_get("log_gz")?;
        let size: i64 = r.try_get("log_size")?;
        Ok(Some(self.read_log(&step_key(step_id), row, size).await?))
    }

    /// Keeps the whole log of an attempt (replacing one kept before).
    pub async fn put_attempt_log(&self, attempt_id: i64, build_id: i64, log: &[u8]) -> Result<()> {
        let stmt = self.put_attempt_log_stmt(attempt_id, build_id, log).await;
        self.writer().batch(&[stmt]).await?;
        Ok(())
    }

    /// [`PUT_ATTEMPT_LOG`] as a statement of a batch, the log kept first.
    pub(super) async fn put_attempt_log_stmt(
        &self,
        attempt_id: i64,
        build_id: i64,
        log: &[u8],
    ) -> Stmt {
        // The row's blob is empty when the log is in the artifact store.
        let row = self
            .keep_log(&attempt_key(attempt_id), log)
            .await
            .unwrap_or_default();
        Stmt::new(
            PUT_ATTEMPT_LOG,
            vec![
                Arg::Int(attempt_id),
                Arg::Int(build_id),
                Arg::Bytes(Some(row)),
                Arg::Int(log.len() as i64),
            ],
        )
    }

    /// The kept whole logs of a build's attempts, by attempt id.
    pub async fn attempt_logs(&self, build_id: i64) -> Result<HashMap<i64, Vec<u8>>> {
        let rows = sqlx::query(
            "SELECT attempt_id, log_gz, log_size FROM attempt_logs WHERE build_id = $1 LIMIT 1000",
        )
        .bind(build_id)
        .fetch_all(self.pool())
        .await?;
        let mut out = HashMap::new();
        for r in rows {
            let id: i64 = r.try_get("attempt_id")?;
            let row: Vec<u8> = r.try_get("log_gz")?;
            let size: i64 = r.try_get("log_size")?;
            out.insert(id, self.read_log(&attempt_key(id), Some(row), size).await?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Short logs are stored, longer ones compressed; both read back
    /// exactly, here and with the system's `gzip -d`.
    #[test]
    fn logs_of_every_size_read_back() {
        let long: Vec<u8> = b"ok  \tpkg/thing\t0.01s\n".repeat(200);
        for log in [&b""[..], b"x\n", &long[..STORED_BELOW - 1], &long[..]] {
            let gz = gzip(log);
            assert_eq!(gunzip(&gz), log, "{} bytes", log.len());
            let mut child = std::process::Command::new("gzip")
                .arg("-dc")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("gzip");
            {
                use std::io::Write;
                let mut stdin = child.stdin.take().unwrap();
                stdin.write_all(&gz).unwrap();
            }
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "gzip -d refused {} bytes", log.len());
            assert_eq!(out.stdout, log);
        }
        // Stored below the threshold (the bytes show through), compressed above.
        let short = gzip(b"hello, log\n");
        assert!(short.windows(11).any(|w| w == b"hello, log\n"));
        assert!(gzip(&long).len() < long.len() / 4);
    }
}
