//! The coordinator crate's integration tests, in one binary (one link of the
//! crate's dependencies instead of one per file). Run one group with
//! `cargo test -p coordinator --test it GROUP::`.

/// The `farmer` binary's allocator, so the in-process tests run on it too
/// (and `alloc::` can check it).
#[cfg(unix)]
#[global_allocator]
static ALLOC: coordinator::alloc::FarmAlloc = coordinator::alloc::FarmAlloc;

mod cdp;
mod common;

#[cfg(unix)]
mod alloc;
mod browser;
mod certs;
mod cli;
mod config;
mod dashboard;
mod delivery;
mod farm;
mod forge;
mod git;
mod gomote;
mod hostile;
mod inproc;
mod ports;
mod resilience;
mod results;
mod secrets;
mod shard;
mod sources;
mod ssh;
mod stage0;
mod storage;
mod store;
mod tls;
