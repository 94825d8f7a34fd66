//! The farmer buildlet: the small agent every build machine runs.
//!
//! The buildlet knows nothing about builds. It exposes a work dir over HTTP:
//! unpack a tarball into it, write a file, run a command with its output
//! streamed back, list or tar up a directory, empty it, halt. The coordinator
//! (and `gomote`) drive it through [`client::Client`].
//!
//! * [`server`] — the HTTP API ([`server::Buildlet`]).
//! * [`client`] — the typed client used by the coordinator and gomote.
//! * [`proto`] — the wire contract both share.
//! * [`paths`] and [`tarball`] — the rules that keep every write inside the
//!   work dir.

pub mod beneath;
pub mod cli;
pub mod client;
pub mod fault;
pub mod link;
pub mod paths;
pub mod proto;
pub mod reverse;
pub mod server;
pub mod srccache;
pub mod tarball;
