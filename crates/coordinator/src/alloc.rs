//! The coordinator's memory: jemalloc, a separate arena for HTTP/2
//! sessions, and giving freed memory back to the OS.
//!
//! The `farmer` binary allocates with [`FarmAlloc`] (see `main.rs`), which
//! is jemalloc: it keeps allocations of one size together, so freed buffers
//! free whole pages instead of holes between long-lived objects (glibc's
//! malloc left some 20 KB per parked link in free lists that `malloc_trim`
//! could not return).
//!
//! Why a session arena: a reverse link lives for days and its HTTP/2
//! sessions for minutes ([`crate::link`]). Allocated side by side, the
//! objects of ended sessions leave their slabs part-full, held by the
//! link's own objects of the same size: about 8 KB per parked link was such
//! holes. Code that runs a session runs inside [`InSession`] (or
//! [`in_session`]), and what it allocates comes from an arena of its own,
//! bypassing the thread caches; once the sessions end, that arena's pages
//! are wholly free and [`release_free_memory`] returns them.
//!
//! Not airtight: session memory freed outside a session (a task cell
//! tokio frees after the session's future, a body chunk the caller drops)
//! goes to that thread's cache, which does not look at arenas, and can be
//! handed to a long-lived object, pinning a session page. Routing frees by
//! address would close it; measured, the arena still takes a parked link
//! from 24 to about 15 KB.

use std::cell::Cell;
use std::future::Future;
use std::mem::ManuallyDrop;
use std::pin::Pin;
use std::task::{Context, Poll};

thread_local! {
    /// This thread runs session code now (see [`InSession`]).
    static SESSION: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with session allocation (see the module doc), restoring this
/// thread's mode afterwards, also when `f` panics.
pub fn in_session<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            let was = self.0;
            SESSION.with(|s| s.set(was));
        }
    }
    let _restore = Restore(SESSION.with(|s| s.replace(true)));
    f()
}

/// A future whose polls (and drop) allocate in the session arena.
pub struct InSession<F>(ManuallyDrop<F>);

impl<F> InSession<F> {
    pub fn new(f: F) -> InSession<F> {
        InSession(ManuallyDrop::new(f))
    }
}

impl<F: Future> Future for InSession<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: the inner future is never moved out of its pinned place
        // (it is dropped in place, in `drop`).
        let inner = unsafe { self.map_unchecked_mut(|s| &mut *s.0) };
        in_session(|| inner.poll(cx))
    }
}

impl<F> Drop for InSession<F> {
    fn drop(&mut self) {
        // SAFETY: dropped exactly once, here, in place.
        in_session(|| unsafe { ManuallyDrop::drop(&mut self.0) });
    }
}

/// Spawns the tasks hyper starts for a session (request bodies, the
/// connection) inside the session arena.
#[derive(Clone, Copy, Debug, Default)]
pub struct SessionExecutor;

impl<F> hyper::rt::Executor<F> for SessionExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        in_session(|| {
            tokio::spawn(InSession::new(fut));
        });
    }
}

#[cfg(unix)]
pub use self::jemalloc::{FarmAlloc, arena_of, init_session_arena, session_arena};

#[cfg(unix)]
mod jemalloc {
    use std::alloc::{GlobalAlloc, Layout};
    use std::sync::atomic::{AtomicU32, Ordering};

    use tikv_jemalloc_sys as ffi;
    use tikv_jemallocator::Jemalloc;

    use super::SESSION;

    /// `alignof(max_align_t)`, what jemalloc's plain malloc aligns to: as
    /// tikv-jemallocator has it, so that both sides agree on the flags.
    #[cfg(any(target_arch = "arm", target_arch = "mips", target_arch = "powerpc"))]
    const MAX_ALIGN_T: usize = 8;
    #[cfg(not(any(target_arch = "arm", target_arch = "mips", target_arch = "powerpc")))]
    const MAX_ALIGN_T: usize = 16;

    /// The session arena's index plus one, or 0 before
    /// [`init_session_arena`] (then sessions allocate as everything else).
    static SESSION_ARENA: AtomicU32 = AtomicU32::new(0);

    /// jemalloc, with session code's allocations in their own arena.
    pub struct FarmAlloc;

    /// Creates the session arena (once; later calls do nothing). Call it
    /// at start in a binary whose global allocator is [`FarmAlloc`]; until
    /// then, sessions allocate as everything else.
    pub fn init_session_arena() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let mut index: libc::c_uint = 0;
            let mut len = std::mem::size_of::<libc::c_uint>();
            // SAFETY: `arenas.create` writes an unsigned int to `index`.
            let r = unsafe {
                ffi::mallctl(
                    c"arenas.create".as_ptr(),
                    (&mut index as *mut libc::c_uint).cast(),
                    &mut len,
                    std::ptr::null_mut(),
                    0,
                )
            };
            if r == 0 {
                SESSION_ARENA.store(index + 1, Ordering::Relaxed);
            }
        });
    }

    /// The session arena's index, once created.
    pub fn session_arena() -> Option<u32> {
        SESSION_ARENA.load(Ordering::Relaxed).checked_sub(1)
    }

    /// The jemalloc arena that `ptr`, a live allocation of jemalloc's, came
    /// from (to check where memory goes).
    pub fn arena_of(ptr: *const u8) -> Option<u32> {
        let mut index: libc::c_uint = 0;
        let mut len = std::mem::size_of::<libc::c_uint>();
        let mut p = ptr.cast::<libc::c_void>();
        // SAFETY: `arenas.lookup` reads a pointer and writes an unsigned int.
        let r = unsafe {
            ffi::mallctl(
                c"arenas.lookup".as_ptr(),
                (&mut index as *mut libc::c_uint).cast(),
                &mut len,
                (&mut p as *mut *const libc::c_void).cast(),
                std::mem::size_of::<*const libc::c_void>(),
            )
        };
        (r == 0).then_some(index)
    }

    /// The flags for a session allocation (or free) now, or `None`
    /// outside sessions. Session memory skips the thread caches: freed, it
    /// would be handed out again to a long-lived object.
    #[inline]
    fn session_flags(layout: &Layout, size: usize) -> Option<libc::c_int> {
        if !SESSION.with(|s| s.get()) {
            return None;
        }
        let arena = SESSION_ARENA.load(Ordering::Relaxed);
        if arena == 0 {
            return None;
        }
        // As tikv-jemallocator does (the same flags for the same layout:
        // a sized free computes the size class from them, whichever side
        // frees): alignment beyond malloc's own is asked.
        let align = if layout.align() <= MAX_ALIGN_T && layout.align() <= size {
            0
        } else {
            ffi::MALLOCX_ALIGN(layout.align())
        };
        Some(ffi::MALLOCX_ARENA(arena as usize - 1) | ffi::MALLOCX_TCACHE_NONE | align)
    }

    // SAFETY: every path is jemalloc's, which meets `GlobalAlloc`'s
    // contract; a pointer from one arena may be freed or reallocated with
    // any flags (jemalloc finds its arena from the pointer).
    unsafe impl GlobalAlloc for FarmAlloc {
        #[inline]
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            match session_flags(&layout, layout.size()) {
                Some(f) => unsafe { ffi::mallocx(layout.size(), f).cast() },
                None => unsafe { Jemalloc.alloc(layout) },
            }
        }

        #[inline]
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            match session_flags(&layout, layout.size()) {
                Some(f) => unsafe { ffi::mallocx(layout.size(), f | ffi::MALLOCX_ZERO).cast() },
                None => unsafe { Jemalloc.alloc_zeroed(layout) },
            }
        }

        #[inline]
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            match session_flags(&layout, layout.size()) {
                Some(f) => unsafe { ffi::sdallocx(ptr.cast(), layout.size(), f) },
                None => unsafe { Jemalloc.dealloc(ptr, layout) },
            }
        }

        #[inline]
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            match session_flags(&layout, new_size) {
                Some(f) => unsafe { ffi::rallocx(ptr.cast(), new_size, f).cast() },
                None => unsafe { Jemalloc.realloc(ptr, layout, new_size) },
            }
        }
    }
}

/// Returns the pages free allocations hold: jemalloc's now rather than
/// after its decay time (which only advances while something allocates,
/// and an idle farm allocates little), and glibc's (SQLite and other C code
/// allocate there). Cheap enough for every few seconds; call it off the
/// async threads.
pub fn release_free_memory() {
    // `arena.<MALLCTL_ARENAS_ALL>.purge`, MALLCTL_ARENAS_ALL being 4096.
    // SAFETY: a valid NUL-terminated name, no value read or written; when
    // jemalloc is not the allocator (tests) it purges its empty arenas.
    #[cfg(unix)]
    unsafe {
        tikv_jemalloc_sys::mallctl(
            c"arena.4096.purge".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
    buildlet::server::release_memory();
}
