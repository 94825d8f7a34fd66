//! Per-machine credentials for farmer bots — the strict onboarding path.
//!
//! * [`csr`]: `genbotcert` makes a private key and a certificate signing
//!   request for one machine's hostname.
//! * [`token`]: the signed request a machine sends to trade its certificate
//!   for a short-lived machine token, and the token file it keeps.
//! * [`tokend`]: `machine-tokend`, which keeps that token file fresh.
//!
//! The coordinator side (the CA, builder requests, minting and checking
//! tokens) lives in the coordinator crate; both sides share the formats here.

pub mod cli;
pub mod csr;
pub mod hostname;
pub mod token;
pub mod tokend;
