//! One error type for the protocol core, grouped by cause (as rustls does): the peer sent
//! something invalid, the caller misused the API, or the core itself has a bug.

use thiserror::Error;

/// Everything the protocol core can refuse.
#[derive(Debug, Error)]
pub enum ProtocolError {
    /// Bytes from the network did not decode as the message they claim to be.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// The message kind that failed to decode.
        what: &'static str,
        /// What was wrong with it.
        detail: String,
    },
    /// An identity update or signature breaks XMTP's identity rules.
    #[error("identity update rejected: {0}")]
    Identity(#[from] crate::identity::AssociationError),
    /// A key package, welcome or commit failed MLS validation or XMTP's conventions.
    #[error("MLS: {0}")]
    Mls(String),
    /// Decryption failed: wrong key, or the ciphertext was tampered with.
    #[error("decryption failed: {0}")]
    Decrypt(&'static str),
    /// The caller asked for something this core does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A bug in this crate: an invariant that should hold did not.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ProtocolError {
    pub(crate) fn malformed(what: &'static str, detail: impl ToString) -> Self {
        Self::Malformed {
            what,
            detail: detail.to_string(),
        }
    }
}

/// Result alias for the protocol core.
pub type Result<T, E = ProtocolError> = std::result::Result<T, E>;
