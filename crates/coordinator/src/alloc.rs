//! Giving freed memory back to the OS.
//!
//! The `farmer` binary allocates with jemalloc (see `main.rs`): it keeps
//! allocations of one size together, so the buffers of ended HTTP/2
//! sessions ([`crate::link`]) free whole pages instead of holes between
//! long-lived objects. glibc's malloc left some 20 KB per parked link in
//! free lists that `malloc_trim` could not return.

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
