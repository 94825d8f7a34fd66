//! Output sinks bounded in memory, for output that comes from machines:
//! one keeps the end (where failures are), one keeps the start and says
//! whether more came (for output that must be read whole).

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;

/// An output sink that keeps only the last `cap` bytes (where failures
/// are) and counts what it dropped, so a unit printing without end costs
/// bounded memory.
pub struct TailBuffer {
    cap: usize,
    buf: std::collections::VecDeque<u8>,
    dropped: u64,
}

impl TailBuffer {
    pub fn new(cap: usize) -> TailBuffer {
        TailBuffer {
            cap,
            buf: std::collections::VecDeque::new(),
            dropped: 0,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        let data = if data.len() > self.cap {
            self.dropped += (data.len() - self.cap) as u64;
            &data[data.len() - self.cap..]
        } else {
            data
        };
        let over = (self.buf.len() + data.len()).saturating_sub(self.cap);
        self.buf.drain(..over);
        self.dropped += over as u64;
        self.buf.extend(data);
    }

    /// The kept text, preceded by a line saying how much was left out.
    pub fn text(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.buf.len() + 64);
        if self.dropped > 0 {
            out.extend_from_slice(
                format!("[... {} earlier bytes left out ...]\n", self.dropped).as_bytes(),
            );
        }
        out.extend(self.buf.iter());
        out
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

impl AsyncWrite for TailBuffer {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// An output sink that keeps at most `cap` bytes and remembers that more
/// came, for output that must be read whole (the unit list, a fetched file).
pub struct CappedBuffer {
    pub cap: usize,
    pub bytes: Vec<u8>,
    pub overflowed: bool,
    /// Past the cap, fail the transfer (a machine sending more is cut off)
    /// instead of draining the rest.
    pub stop: bool,
}

impl AsyncWrite for CappedBuffer {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let room = self.cap - self.bytes.len();
        if buf.len() > room {
            self.overflowed = true;
            if self.stop {
                return Poll::Ready(Err(std::io::Error::other("more than the cap")));
            }
        }
        let n = buf.len().min(room);
        self.bytes.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_buffer_keeps_the_end() {
        let mut t = TailBuffer::new(4);
        t.push(b"abc");
        t.push(b"defgh");
        assert_eq!(t.text(), b"[... 4 earlier bytes left out ...]\nefgh");
        t.push(b"0123456789");
        assert!(t.text().ends_with(b"6789"));
    }
}
