//! The coordinator's allocator (`coordinator::alloc`): what session code
//! allocates comes from the session arena, and nothing else does. This
//! binary's global allocator is `FarmAlloc`, as the `farmer` binary's is.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use coordinator::alloc::{InSession, arena_of, in_session, init_session_arena, session_arena};

/// A fresh heap buffer of `n` bytes.
fn heap(n: usize) -> Vec<u8> {
    vec![0u8; n]
}

fn arena(v: &[u8]) -> u32 {
    arena_of(v.as_ptr()).expect("jemalloc knows its own allocation")
}

#[test]
fn session_code_allocates_in_its_own_arena_and_nothing_else_does() {
    init_session_arena();
    let session = session_arena().expect("the session arena exists");
    for size in [24usize, 640, 1800, 4096, 9000, 100_000] {
        assert_ne!(
            arena(&heap(size)),
            session,
            "{size} bytes outside a session"
        );
        let inside = in_session(|| heap(size));
        assert_eq!(arena(&inside), session, "{size} bytes in a session");
    }
    // Nested, and back to ordinary allocation once the session code ends.
    in_session(|| {
        in_session(|| assert_eq!(arena(&heap(64)), session));
        assert_eq!(arena(&heap(64)), session);
    });
    assert_ne!(arena(&heap(64)), session);
}

/// Allocates a buffer each time it is polled; ready on the third poll.
struct Allocating {
    polls: usize,
    made: Vec<Vec<u8>>,
}

impl Future for Allocating {
    type Output = Vec<Vec<u8>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.polls += 1;
        self.made.push(vec![7u8; 700]);
        if self.polls < 3 {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(std::mem::take(&mut self.made))
    }
}

#[test]
fn a_future_in_a_session_allocates_in_the_session_arena_on_every_poll() {
    init_session_arena();
    let session = session_arena().expect("the session arena exists");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let made = rt.block_on(InSession::new(Allocating {
        polls: 0,
        made: Vec::new(),
    }));
    assert_eq!(made.len(), 3);
    for v in &made {
        assert_eq!(arena(v), session);
    }
    // The caller's own allocations, between polls and after, are not.
    assert_ne!(arena(&heap(700)), session);
}
