//! The buildlet crate's integration tests, in one binary (one link of the
//! crate's dependencies instead of one per file). Run one group with
//! `cargo test -p buildlet --test it GROUP::`.

mod common;

mod api;
mod bad_input;
mod containment;
mod limits;
mod races;
mod shell;
mod srccache;
