//! The XMTP v3 protocol core of Gatehouse.
//!
//! Contract: pure logic, no I/O. This crate never opens a socket or a file, never reads the
//! clock and never draws thread randomness: time comes in as arguments, randomness through a
//! `rand_core::CryptoRngCore` argument or the openmls provider the caller hands in. It speaks
//! XMTP exactly as libxmtp `829b1f5e` does (identity log, signature texts, key packages,
//! group-context extensions, X-Wing welcome wrapping, `EncodedContent`), so the node, the
//! client and the daemon can all rely on it and so can a real XMTP peer.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod attestation;
pub mod commit_log;
pub mod consent;
pub mod content;
pub mod error;
pub mod group;
pub mod hpke;
pub mod identity;
pub mod mls;
pub mod mls_crypto;
pub mod mls_store;
pub mod placed;
pub mod tlsread;
pub mod welcome;
pub mod xwing;

pub use error::ProtocolError;

/// Nanoseconds since the Unix epoch, as XMTP timestamps are written.
pub type Nanos = u64;
