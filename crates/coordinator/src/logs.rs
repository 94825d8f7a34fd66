//! Live build logs: one growing buffer per running build that any number of
//! viewers follow without copying it per viewer.
//!
//! Writers append; each viewer keeps an offset and waits on a watch channel
//! that carries the current length, so a slow viewer never holds up the
//! build and a thousand viewers cost a thousand offsets.

use std::sync::RwLock;

use bytes::Bytes;
use tokio::sync::watch;

/// Largest live log kept in memory; past it, output is dropped with a note
/// (the stored per-step logs keep the same cap).
pub const MAX_LOG: usize = 64 << 20;

pub struct LiveLog {
    data: RwLock<Vec<u8>>,
    /// (length, finished)
    state: watch::Sender<(usize, bool)>,
}

impl Default for LiveLog {
    fn default() -> Self {
        LiveLog::new()
    }
}

impl LiveLog {
    pub fn new() -> LiveLog {
        let (state, _) = watch::channel((0, false));
        LiveLog {
            data: RwLock::new(Vec::new()),
            state,
        }
    }

    pub fn append(&self, chunk: &[u8]) {
        let len = {
            let mut d = self.data.write().unwrap_or_else(|e| e.into_inner());
            if d.len() >= MAX_LOG {
                return;
            }
            let room = MAX_LOG - d.len();
            if chunk.len() > room {
                d.extend_from_slice(&chunk[..room]);
                d.extend_from_slice(b"\n[farmer: log truncated at 64 MiB]\n");
            } else {
                d.extend_from_slice(chunk);
            }
            d.len()
        };
        self.state.send_modify(|s| s.0 = len);
    }

    /// Marks the log complete; followers end after reading the rest.
    pub fn finish(&self) {
        self.state.send_modify(|s| s.1 = true);
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Streams the log from the start, following it until it is finished.
    pub fn follow(self: std::sync::Arc<Self>) -> impl futures_util::Stream<Item = Bytes> + Send {
        let rx = self.state.subscribe();
        futures_util::stream::unfold((self, rx, 0usize), |(log, mut rx, off)| async move {
            loop {
                let (len, done) = *rx.borrow_and_update();
                if len > off {
                    let chunk = {
                        let d = log.data.read().unwrap_or_else(|e| e.into_inner());
                        Bytes::copy_from_slice(&d[off..len])
                    };
                    return Some((chunk, (log, rx, len)));
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
}
