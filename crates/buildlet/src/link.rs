//! The reverse link below HTTP/2: a session while it is used, parked between.
//!
//! An HTTP/2 connection costs the coordinator some 40 KB whether or not it
//! carries anything (framing buffers, header tables, its task), and a farm of
//! donated machines is mostly idle. So a reverse link (protocol version 2 and
//! later) carries HTTP/2 only while it is used. After a while without work
//! the coordinator lets its HTTP/2 client go (GOAWAY); both ends then agree
//! where that session ended and the link is *parked*: the TLS connection
//! stays, and only single bytes cross it until the coordinator needs the
//! machine again.
//!
//! The bytes of a parked link:
//! * coordinator → buildlet: [`PING`] every heartbeat, or the first byte of
//!   the next session (the HTTP/2 preface starts with `P`);
//! * buildlet → coordinator: [`PONG`] for each `PING`, nothing else.
//!
//! Where a session ends: each end writes [`PARK_MARKER`] after the last
//! frame it sent, then discards what the other sent up to the other's
//! marker. Frames still in flight when the session ended (a PING answer, a
//! GOAWAY) never reach the next session, and neither end speaks before the
//! other has stopped. A peer that breaks any of this loses its link (and
//! reconnects): the rules bound bytes and time, never trust the peer.
//!
//! [`Link`] holds the connection and the bytes read ahead of their use;
//! [`Session`] lends it to an HTTP/2 implementation and gives it back when
//! that lets go, with its shutdown turned into a flush (the link outlives
//! the session).
//!
//! A session's small writes are gathered and put on the connection at a
//! flush, one turn of the scheduler late (see [`Session`]'s `poll_flush`).
//! hyper sends a request's headers and its body from two tasks, each
//! followed by a flush, so without this every request with a body costs
//! two TLS records and two `writev`s, and the peer two reads.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::oneshot;

/// The protocol version from which a buildlet parks its link.
pub const PARKING_VERSION: u32 = 2;

/// A parked link's keepalive, coordinator → buildlet.
pub const PING: u8 = 0;
/// The answer to [`PING`], buildlet → coordinator.
pub const PONG: u8 = 1;

/// Written by each end after the last frame of a session. Neither HTTP/2
/// control frames nor a byte of a parked link look like it.
pub const PARK_MARKER: [u8; 16] = *b"\xff\xfefarmer-parked\n";

/// How long both ends may take to agree that a session ended.
pub const RESYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// Most bytes of an ended session one end discards before the other's
/// marker: leftover control frames are a few dozen bytes, but the data of a
/// stream reset just before the end may still be in flight (up to a
/// stream's window); more is a peer that is not parking.
const MAX_LEFTOVER: usize = 4 << 20;

/// Most bytes a session gathers before they go out unasked: past this a
/// write is large enough to go alone (a source push's frames).
const GATHER_MAX: usize = 64 << 10;

/// A flush of fewer gathered bytes than this waits one turn of the
/// scheduler for more; larger ones go at once.
const WAIT_BELOW: usize = 4 << 10;

/// A reverse link's connection with the bytes read ahead of their use.
pub struct Link<T> {
    io: T,
    /// Read from the connection but not used yet; they come first.
    ahead: Vec<u8>,
    /// The last session ended with the peer's GOAWAY (see
    /// [`Link::served_session`]).
    pub peer_went_away: bool,
    /// Written by a session, not yet on the connection; `out[..out_at]`
    /// went already.
    out: Vec<u8>,
    out_at: usize,
    /// The flush that asked for `out` waited its turn already.
    waited: bool,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Link<T> {
    pub fn new(io: T) -> Link<T> {
        Link {
            io,
            ahead: Vec::new(),
            peer_went_away: false,
            out: Vec::new(),
            out_at: 0,
            waited: false,
        }
    }

    /// Reads what is there (at most `buf.len()` bytes); 0 at the end.
    pub async fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.ahead.is_empty() {
            return self.io.read(buf).await;
        }
        let n = self.ahead.len().min(buf.len());
        buf[..n].copy_from_slice(&self.ahead[..n]);
        self.take_ahead(n);
        Ok(n)
    }

    /// Puts `bytes` back in front of what is read next.
    pub fn unread(&mut self, bytes: &[u8]) {
        let mut v = Vec::with_capacity(bytes.len() + self.ahead.len());
        v.extend_from_slice(bytes);
        v.extend_from_slice(&self.ahead);
        self.ahead = v;
    }

    /// Writes `bytes` and flushes them, after what a session left
    /// gathered.
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_write_out(cx)).await?;
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    /// Puts the gathered bytes on the connection (not flushed).
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_at < self.out.len() {
            let n =
                std::task::ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.out_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_at += n;
        }
        self.out.clear();
        self.out_at = 0;
        self.waited = false;
        Poll::Ready(Ok(()))
    }

    /// After a session ended: marks the end of what this side sent, then
    /// discards what the peer sent up to its mark. Callers bound the time
    /// ([`RESYNC_TIMEOUT`]); the bytes are bounded here.
    pub async fn resync(&mut self) -> io::Result<()> {
        self.send(&PARK_MARKER).await?;
        // A parked link keeps no buffer.
        self.out = Vec::new();
        let mut window = std::mem::take(&mut self.ahead);
        let mut discarded = 0usize;
        // On the heap: the futures of long-lived link tasks stay small.
        let mut buf = vec![0u8; 2048];
        loop {
            if let Some(at) = window
                .windows(PARK_MARKER.len())
                .position(|w| w == PARK_MARKER)
            {
                self.ahead = window.split_off(at + PARK_MARKER.len());
                return Ok(());
            }
            // Keep what could be the start of a marker cut by a read.
            let keep = PARK_MARKER.len() - 1;
            if window.len() > keep {
                discarded += window.len() - keep;
                window.drain(..window.len() - keep);
            }
            if discarded > MAX_LEFTOVER {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the peer sent over {MAX_LEFTOVER} bytes after its session ended"),
                ));
            }
            let n = self.io.read(&mut buf).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            window.extend_from_slice(&buf[..n]);
        }
    }

    /// Lends the link to one session; the receiver gets it back when the
    /// session lets go of it.
    pub fn session(self) -> (Session<T>, oneshot::Receiver<Link<T>>) {
        self.lend(None)
    }

    /// Lends the link to the server side of one session, which reads up to
    /// the client's GOAWAY frame and then sees the end of its input: an
    /// HTTP/2 server would otherwise go on reading after GOAWAY and take
    /// the client's end mark for a frame. Frames are followed by their
    /// headers' lengths, never by their contents, so no payload can end a
    /// session. [`Link::peer_went_away`] tells afterwards.
    pub fn served_session(mut self) -> (Session<T>, oneshot::Receiver<Link<T>>) {
        self.peer_went_away = false;
        self.lend(Some(Frames::default()))
    }

    fn lend(self, frames: Option<Frames>) -> (Session<T>, oneshot::Receiver<Link<T>>) {
        let (tx, rx) = oneshot::channel();
        (
            Session {
                link: Some(self),
                back: Some(tx),
                frames,
            },
            rx,
        )
    }

    fn take_ahead(&mut self, n: usize) {
        if n >= self.ahead.len() {
            // Free it: a parked link keeps no buffer.
            self.ahead = Vec::new();
        } else {
            self.ahead.drain(..n);
        }
    }
}

/// A [`Link`] lent to one HTTP/2 session (see [`Link::session`]).
pub struct Session<T> {
    link: Option<Link<T>>,
    back: Option<oneshot::Sender<Link<T>>>,
    /// The client's frames, followed on the server side.
    frames: Option<Frames>,
}

/// The length of the HTTP/2 client connection preface.
const PREFACE_LEN: usize = 24;
/// The HTTP/2 GOAWAY frame type.
const GOAWAY: u8 = 0x7;

/// Follows the frames a client sends, by their 9-byte headers, to find
/// where its GOAWAY ends.
#[derive(Default)]
struct Frames {
    preface_seen: usize,
    header: [u8; 9],
    header_len: usize,
    payload_left: usize,
    kind: u8,
    /// The GOAWAY passed: the session's input has ended.
    ended: bool,
}

impl Frames {
    /// Walks `bytes`; returns the offset just after a GOAWAY frame that
    /// ends in them.
    fn feed(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < bytes.len() {
            if self.preface_seen < PREFACE_LEN {
                let n = (PREFACE_LEN - self.preface_seen).min(bytes.len() - i);
                self.preface_seen += n;
                i += n;
                continue;
            }
            if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len() - i);
                self.payload_left -= n;
                i += n;
            } else {
                self.header[self.header_len] = bytes[i];
                self.header_len += 1;
                i += 1;
                if self.header_len < self.header.len() {
                    continue;
                }
                self.header_len = 0;
                let h = self.header;
                self.payload_left =
                    usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                self.kind = h[3];
            }
            if self.payload_left == 0 && self.header_len == 0 && self.kind == GOAWAY {
                self.ended = true;
                return Some(i);
            }
        }
        None
    }
}

impl<T> Session<T> {
    fn link(&mut self) -> io::Result<&mut Link<T>> {
        self.link
            .as_mut()
            .ok_or_else(|| io::Error::other("the session's link was given back"))
    }
}

impl<T> Drop for Session<T> {
    fn drop(&mut self) {
        if let (Some(link), Some(back)) = (self.link.take(), self.back.take()) {
            let _ = back.send(link);
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Session<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.frames.as_ref().is_some_and(|f| f.ended) {
            return Poll::Ready(Ok(()));
        }
        let Some(link) = this.link.as_mut() else {
            return Poll::Ready(Err(io::Error::other("the session's link was given back")));
        };
        let before = buf.filled().len();
        if !link.ahead.is_empty() {
            let n = link.ahead.len().min(buf.remaining());
            buf.put_slice(&link.ahead[..n]);
            link.take_ahead(n);
        } else {
            std::task::ready!(Pin::new(&mut link.io).poll_read(cx, buf))?;
        }
        if let Some(frames) = this.frames.as_mut()
            && let Some(end) = frames.feed(&buf.filled()[before..])
        {
            // What follows the GOAWAY is not the session's.
            let rest = buf.filled()[before + end..].to_vec();
            link.unread(&rest);
            buf.set_filled(before + end);
            link.peer_went_away = true;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Session<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    /// Gathers the bytes; past `GATHER_MAX`, what was gathered goes out
    /// first and a large write goes straight to the connection.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let l = match self.get_mut().link() {
            Ok(l) => l,
            Err(e) => return Poll::Ready(Err(e)),
        };
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if l.out.len() + len > GATHER_MAX {
            std::task::ready!(l.poll_write_out(cx))?;
            if len > GATHER_MAX {
                return Pin::new(&mut l.io).poll_write_vectored(cx, bufs);
            }
        }
        for b in bufs {
            l.out.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// A flush of a few gathered bytes first lets the other ready tasks
    /// run once (the task that queues a request's body after its headers
    /// has usually just been woken), then sends all that was gathered
    /// meanwhile as one write.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let l = match self.get_mut().link() {
            Ok(l) => l,
            Err(e) => return Poll::Ready(Err(e)),
        };
        if l.out.is_empty() {
            return Pin::new(&mut l.io).poll_flush(cx);
        }
        if !l.waited && l.out.len() < WAIT_BELOW {
            l.waited = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        std::task::ready!(l.poll_write_out(cx))?;
        Pin::new(&mut l.io).poll_flush(cx)
    }

    /// A session ending does not end the link: only flush.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}

/// What a parked buildlet read: how many pings to answer, and whether the
/// coordinator began a session (its bytes are put back for the session).
pub fn parked_bytes<T: AsyncRead + AsyncWrite + Unpin>(
    link: &mut Link<T>,
    read: &[u8],
) -> (usize, bool) {
    match read.iter().position(|&b| b != PING) {
        Some(at) => {
            link.unread(&read[at..]);
            (at, true)
        }
        None => (read.len(), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resync_discards_leftovers_up_to_the_marker_and_keeps_what_follows() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut a = Link::new(a);
        let mut b = Link::new(b);
        // Leftover frames on both sides, then each side's marker; b also
        // sends the start of what comes after (a PONG) in the same write.
        a.send(b"leftover from a").await.unwrap();
        b.io.write_all(b"leftovers from b, split").await.unwrap();
        let (ra, rb) = tokio::join!(a.resync(), async {
            b.resync().await?;
            b.send(&[PONG]).await
        });
        ra.unwrap();
        rb.unwrap();
        let mut buf = [9u8; 4];
        assert_eq!(a.read_some(&mut buf).await.unwrap(), 1);
        assert_eq!(buf[0], PONG);
        assert!(b.ahead.is_empty());
    }

    #[tokio::test]
    async fn resync_gives_up_on_a_peer_that_never_marks() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut a = Link::new(a);
        let flood = tokio::spawn(async move {
            let junk = vec![7u8; 64 << 10];
            // Past MAX_LEFTOVER (bounded: the reader gives up first).
            for _ in 0..2 * MAX_LEFTOVER / junk.len() {
                if b.write_all(&junk).await.is_err() {
                    break;
                }
            }
            b
        });
        let e = a.resync().await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // Closing our end ends the flood's writes.
        drop(a);
        drop(flood.await);
    }

    #[test]
    fn a_served_session_ends_after_the_goaway_frame_whatever_the_payloads_hold() {
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // A DATA frame whose payload looks like a GOAWAY header.
        let payload = [0, 0, 8, GOAWAY, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        wire.extend_from_slice(&[0, 0, payload.len() as u8, 0x0, 0, 0, 0, 0, 1]);
        wire.extend_from_slice(&payload);
        // An empty SETTINGS frame, then the GOAWAY (8 bytes), then the mark.
        wire.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        wire.extend_from_slice(&[0, 0, 8, GOAWAY, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let end = wire.len();
        wire.extend_from_slice(&PARK_MARKER);
        // Fed whole, or byte by byte: the same end.
        assert_eq!(Frames::default().feed(&wire), Some(end));
        let mut f = Frames::default();
        let at = (0..wire.len()).find(|&i| f.feed(&wire[i..i + 1]).is_some());
        assert_eq!(at, Some(end - 1));
        assert!(f.ended);
    }

    #[tokio::test]
    async fn a_session_gives_the_link_back_with_unread_bytes_first() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut link = Link::new(a);
        link.unread(b"PRI");
        let (mut s, back) = link.session();
        b.write_all(b" *").await.unwrap();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"PRI *");
        // Shutting the session down leaves the link open.
        s.shutdown().await.unwrap();
        drop(s);
        let mut link = back.await.unwrap();
        link.send(b"still open").await.unwrap();
        let mut buf = [0u8; 10];
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"still open");
    }

    /// Counts the writes that reach the connection.
    struct Counted {
        io: tokio::io::DuplexStream,
        writes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let r = Pin::new(&mut this.io).poll_write(cx, buf);
            if let Poll::Ready(Ok(n)) = r
                && n > 0
            {
                this.writes
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            r
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
        }
    }

    /// hyper sends a request's headers and its body from two tasks, each
    /// with its own flush: over a session they still reach the connection
    /// as one write (two without the gathering).
    #[tokio::test]
    async fn a_request_with_a_body_goes_out_in_one_write() {
        use http_body_util::{BodyExt, Full};
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let (a, b) = tokio::io::duplex(1 << 20);
        let writes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let link = Link::new(Counted {
            io: a,
            writes: writes.clone(),
        });
        let (session, _back) = link.session();
        let server = tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async {
                    let body = req.into_body().collect().await?.to_bytes();
                    Ok::<_, hyper::Error>(http::Response::new(Full::new(body)))
                });
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(b), svc)
                .await
        });
        let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake::<_, Full<bytes::Bytes>>(TokioIo::new(session))
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        let post = |body: &'static [u8]| {
            http::Request::post("http://buildlet/exec")
                .body(Full::new(bytes::Bytes::from_static(body)))
                .unwrap()
        };
        // The first request also settles the connection's settings.
        let r = sender.send_request(post(b"first")).await.unwrap();
        r.into_body().collect().await.unwrap();
        for body in [&b"cmd=true"[..], &[b'x'; 1000][..]] {
            let before = writes.load(std::sync::atomic::Ordering::SeqCst);
            let r = sender.send_request(post(body)).await.unwrap();
            let got = r.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(got, body);
            let n = writes.load(std::sync::atomic::Ordering::SeqCst) - before;
            assert_eq!(n, 1, "a {}-byte request went out in {n} writes", body.len());
        }
        drop(sender);
        conn.await.unwrap().unwrap();
        server.abort();
    }

    #[tokio::test]
    async fn bytes_a_dropped_session_gathered_go_before_the_links_next_send() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let (mut s, back) = Link::new(a).session();
        s.write_all(b"GOAWAY").await.unwrap();
        drop(s);
        let mut link = back.await.unwrap();
        link.send(b" then the mark").await.unwrap();
        let mut buf = [0u8; 20];
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"GOAWAY then the mark");
    }

    /// Large writes are not held back, and gathered bytes never pass
    /// [`GATHER_MAX`].
    #[tokio::test]
    async fn a_large_write_goes_through_in_order() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let (mut s, _back) = Link::new(a).session();
        s.write_all(b"head").await.unwrap();
        let big = vec![7u8; GATHER_MAX + 1];
        s.write_all(&big).await.unwrap();
        assert!(s.link.as_ref().unwrap().out.is_empty());
        s.write_all(b"tail").await.unwrap();
        s.flush().await.unwrap();
        let mut got = vec![0u8; big.len() + 8];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..4], b"head");
        assert!(got[4..4 + big.len()].iter().all(|&x| x == 7));
        assert_eq!(&got[4 + big.len()..], b"tail");
    }
}
