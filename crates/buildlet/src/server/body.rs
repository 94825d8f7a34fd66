//! The response body type: either a complete buffer or a stream fed by a
//! channel (for `/exec` output with its trailer, and `/tgz`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

/// A frame sent into a streaming body; an `Err` aborts the response so the
/// client sees a broken stream instead of a truncated-but-valid one.
pub type BodyFrame = Result<Frame<Bytes>, io::Error>;

pub enum ResponseBody {
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<BodyFrame>),
}

impl ResponseBody {
    pub fn full(b: Bytes) -> ResponseBody {
        ResponseBody::Full(Some(b))
    }

    /// A streaming body and the sender that feeds it. Dropping the sender ends
    /// the body; `Sender::closed` resolves when the client went away.
    pub fn channel(depth: usize) -> (mpsc::Sender<BodyFrame>, ResponseBody) {
        let (tx, rx) = mpsc::channel(depth);
        (tx, ResponseBody::Channel(rx))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            ResponseBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Channel(rx) => rx.poll_recv(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ResponseBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ResponseBody::Full(None) => SizeHint::with_exact(0),
            ResponseBody::Channel(_) => SizeHint::default(),
        }
    }
}
