//! The farmer coordinator: host and build configs, builder keys, the reverse
//! pool, the scheduler, builds, the store, the API and the demo farm.
//! `ARCHITECTURE.md` at the repository root maps each concept to its module.

pub mod admin_cli;
pub mod alloc;
pub mod api;
pub mod artifacts;
pub mod auth;
pub mod bounded;
pub mod build_cli;
pub mod builds;
pub mod ca;
pub mod client;
pub mod config;
pub mod dashboard;
pub mod demo;
pub mod farm;
pub mod forge;
pub mod git;
pub mod gomote;
pub mod history;
pub mod keys;
pub mod leadership;
pub mod link;
pub mod logs;
pub mod machine_auth;
pub mod metrics;
pub mod poller;
pub mod pool;
pub mod release;
pub mod results;
pub mod reverse;
pub mod run;
#[cfg(unix)]
pub mod sandbox;
pub mod scheduler;
pub mod secret_cli;
pub mod secrets;
pub mod server;
pub mod shard;
pub mod sources;
pub mod store;
pub mod store_cli;
pub mod tls;
pub mod view;
