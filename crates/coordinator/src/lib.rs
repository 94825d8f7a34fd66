//! The farmer coordinator.

pub mod config;
pub mod git;
