//! Live build logs: one growing buffer per running build that any number of
//! viewers follow without copying it per viewer.
//!
//! Writers append; each viewer keeps an offset and waits on a watch channel
//! that carries the current length, so a slow viewer never holds up the
//! build and a thousand viewers cost a thousand offsets.
//!
//! A log stays in memory only while it is small ([`MEM_LIMIT`]); past that
//! it moves to an unlinked file in the spill directory, so a hundred chatty
//! builds cost a hundred small buffers, not gigabytes of memory. Every log
//! is capped at [`MAX_LOG`] (a machine that streams output forever fills
//! that much disk, then is ignored).

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::RwLock;

use bytes::Bytes;
use tokio::sync::watch;

use crate::secrets::{Mask, Masking};

/// Largest live log; past it, output is dropped with a note (the stored
/// per-step logs keep the same cap).
pub const MAX_LOG: usize = 64 << 20;
/// A log larger than this moves from memory to a spill file.
pub const MEM_LIMIT: usize = 256 << 10;
/// Most bytes one follower reads at a time.
const CHUNK: usize = 1 << 20;

const TRUNCATED: &[u8] = b"\n[farmer: log truncated at 64 MiB]\n";

/// Copies a command's output into a live log as it streams, hiding
/// secrets even when one arrives split across writes.
pub struct StreamWriter<'a> {
    live: &'a LiveLog,
    masking: Masking,
}

impl StreamWriter<'_> {
    /// Writes what was held back (the output ended).
    pub fn finish(mut self) {
        let rest = self.masking.finish();
        self.live.append_raw(&rest);
    }
}

impl tokio::io::AsyncWrite for StreamWriter<'_> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let out = self.masking.feed(buf);
        self.live.append_raw(&out);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

pub struct LiveLog {
    inner: RwLock<Inner>,
    /// Where a large log moves; `None`: the system temp dir.
    spill_dir: Option<PathBuf>,
    /// (length, finished)
    state: watch::Sender<(usize, bool)>,
    /// The farm's secrets, hidden in everything appended.
    mask: RwLock<Mask>,
}

#[derive(Default)]
struct Inner {
    mem: Vec<u8>,
    file: Option<File>,
    len: usize,
    /// Writing the spill file failed: the log ends there, with a note.
    broken: bool,
    /// The cap was reached and the note written.
    truncated: bool,
}

impl Default for LiveLog {
    fn default() -> Self {
        LiveLog::new()
    }
}

impl LiveLog {
    pub fn new() -> LiveLog {
        LiveLog::with_spill_dir(None)
    }

    /// A log that spills into `dir` (created if missing) when it grows.
    pub fn with_spill_dir(dir: Option<PathBuf>) -> LiveLog {
        let (state, _) = watch::channel((0, false));
        LiveLog {
            inner: RwLock::new(Inner::default()),
            spill_dir: dir,
            state,
            mask: RwLock::new(Mask::default()),
        }
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held in memory (the rest is in the spill file).
    #[cfg(test)]
    pub fn resident(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .mem
            .capacity()
    }

    /// Hides these secrets in everything appended from now on.
    pub fn set_mask(&self, mask: Mask) {
        *self.mask.write().unwrap_or_else(|e| e.into_inner()) = mask;
    }

    /// What hides secrets in this log.
    pub fn mask(&self) -> Mask {
        self.mask.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `text` with this log's secrets hidden (for copies of output kept
    /// elsewhere, such as a unit's output).
    pub fn masked(&self, text: &[u8]) -> Vec<u8> {
        self.mask().apply(text).into_owned()
    }

    /// A writer for a stream of output: a secret split across two chunks
    /// is hidden too. End it with [`StreamWriter::finish`].
    pub fn stream(&self) -> StreamWriter<'_> {
        StreamWriter {
            masking: Masking::new(self.mask()),
            live: self,
        }
    }

    /// Appends `chunk`, with every whole secret in it hidden.
    pub fn append(&self, chunk: &[u8]) {
        // The mask is cloned (an Arc) so no lock is held while appending.
        self.append_raw(&self.mask().apply(chunk));
    }

    fn append_raw(&self, chunk: &[u8]) {
        let len = {
            let mut d = self.inner.write().unwrap_or_else(|e| e.into_inner());
            if d.truncated || d.broken {
                return;
            }
            let room = MAX_LOG - d.len;
            if chunk.len() > room {
                self.write(&mut d, &chunk[..room]);
                self.write(&mut d, TRUNCATED);
                d.truncated = true;
            } else {
                self.write(&mut d, chunk);
            }
            d.len
        };
        self.state.send_modify(|s| s.0 = len);
    }

    fn write(&self, d: &mut Inner, chunk: &[u8]) {
        if d.file.is_none() && d.mem.len() + chunk.len() > MEM_LIMIT {
            let spilled = self.spill_file().and_then(|mut f| {
                f.write_all(&d.mem)?;
                Ok(f)
            });
            match spilled {
                Ok(f) => {
                    d.file = Some(f);
                    d.mem = Vec::new();
                }
                Err(e) => {
                    tracing::error!("cannot spill a build log to disk: {e}");
                    d.broken = true;
                    let note = format!("\n[farmer: log cut: cannot spill it to disk: {e}]\n");
                    d.mem.extend_from_slice(note.as_bytes());
                    d.len += note.len();
                    return;
                }
            }
        }
        match &mut d.file {
            Some(f) => {
                if let Err(e) = f.write_all(chunk) {
                    tracing::error!("writing a spilled build log: {e}");
                    d.broken = true;
                    return;
                }
            }
            None => d.mem.extend_from_slice(chunk),
        }
        d.len += chunk.len();
    }

    fn spill_file(&self) -> std::io::Result<File> {
        match &self.spill_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                tempfile::tempfile_in(dir)
            }
            None => tempfile::tempfile(),
        }
    }

    /// Bytes `[from, to)` of the log, read off the async threads when they
    /// come from the spill file (up to [`MAX_LOG`] of file reads).
    pub async fn range_async(self: &std::sync::Arc<Self>, from: usize, to: usize) -> Bytes {
        let spilled = self
            .inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .file
            .is_some();
        if !spilled {
            return self.range(from, to);
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.range(from, to))
            .await
            .unwrap_or_default()
    }

    /// Bytes `[from, to)` of the log (clamped to what exists).
    pub fn range(&self, from: usize, to: usize) -> Bytes {
        let d = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let to = to.min(d.len);
        if from >= to {
            return Bytes::new();
        }
        match &d.file {
            None => Bytes::copy_from_slice(&d.mem[from.min(d.mem.len())..to.min(d.mem.len())]),
            Some(f) => {
                let mut buf = vec![0u8; to - from];
                match read_at(f, &mut buf, from as u64) {
                    Ok(()) => Bytes::from(buf),
                    Err(e) => {
                        tracing::error!("reading a spilled build log: {e}");
                        Bytes::new()
                    }
                }
            }
        }
    }

    /// Marks the log complete; followers end after reading the rest.
    pub fn finish(&self) {
        self.state.send_modify(|s| s.1 = true);
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.range(0, usize::MAX).to_vec()
    }

    /// Streams the log from the start, following it until it is finished.
    pub fn follow(self: std::sync::Arc<Self>) -> impl futures_util::Stream<Item = Bytes> + Send {
        let rx = self.state.subscribe();
        futures_util::stream::unfold((self, rx, 0usize), |(log, mut rx, off)| async move {
            loop {
                let (len, done) = *rx.borrow_and_update();
                if len > off {
                    let end = len.min(off + CHUNK);
                    let chunk = log.range(off, end);
                    if chunk.is_empty() {
                        return None;
                    }
                    let next = off + chunk.len();
                    return Some((chunk, (log, rx, next)));
                }
                if done {
                    return None;
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        })
    }
}

#[cfg(unix)]
fn read_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(f, buf, off)
}

#[cfg(not(unix))]
fn read_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = std::os::windows::fs::FileExt::seek_read(f, &mut buf[done..], off + done as u64)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn followers_see_everything_in_order() {
        let log = std::sync::Arc::new(LiveLog::new());
        log.append(b"one\n");
        let follower = tokio::spawn(log.clone().follow().collect::<Vec<_>>());
        let late = log.clone();
        tokio::spawn(async move {
            for i in 0..50 {
                late.append(format!("line {i}\n").as_bytes());
                tokio::task::yield_now().await;
            }
            late.finish();
        });
        let chunks = tokio::time::timeout(std::time::Duration::from_secs(10), follower)
            .await
            .unwrap()
            .unwrap();
        let all: Vec<u8> = chunks.concat();
        let mut want = b"one\n".to_vec();
        for i in 0..50 {
            want.extend_from_slice(format!("line {i}\n").as_bytes());
        }
        assert_eq!(all, want);
    }

    /// A chatty build keeps a small buffer in memory; the rest is on disk,
    /// and followers, ranges and snapshots still see every byte.
    #[tokio::test]
    async fn large_logs_spill_to_disk() {
        let dir = tempfile::tempdir().unwrap();
        let log = std::sync::Arc::new(LiveLog::with_spill_dir(Some(dir.path().into())));
        let follower = tokio::spawn(log.clone().follow().collect::<Vec<_>>());
        let mut want = Vec::new();
        for i in 0..40_000 {
            let line = format!("output line {i} of a chatty build\n");
            log.append(line.as_bytes());
            want.extend_from_slice(line.as_bytes());
        }
        assert!(want.len() > 4 * MEM_LIMIT);
        assert!(
            log.resident() <= MEM_LIMIT,
            "{} bytes in memory",
            log.resident()
        );
        assert_eq!(log.len(), want.len());
        assert_eq!(&log.range(100, 200)[..], &want[100..200]);
        log.finish();
        let chunks = tokio::time::timeout(std::time::Duration::from_secs(10), follower)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(chunks.concat(), want);
        assert_eq!(log.snapshot(), want);
    }

    #[test]
    fn endless_output_stops_at_the_cap() {
        let log = LiveLog::new();
        let block = vec![b'x'; 1 << 20];
        for _ in 0..(MAX_LOG >> 20) + 10 {
            log.append(&block);
        }
        assert_eq!(log.len(), MAX_LOG + TRUNCATED.len());
        assert!(log.resident() <= MEM_LIMIT);
    }
}
