//! Why an identity update or a signature was refused. One variant per rule, so callers and
//! tests can tell exactly which rule an update broke.

use thiserror::Error;

/// A broken signature.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SignatureError {
    /// The signature bytes are not of the expected shape (length, encoding).
    #[error("malformed {kind} signature: {detail}")]
    Malformed {
        /// Signature kind.
        kind: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// ERC-191 recovery byte other than 0, 1, 27 or 28.
    #[error("ERC-191 recovery byte {0} is not 0, 1, 27 or 28")]
    BadRecoveryByte(u8),
    /// ERC-191 signature with `s` in the upper half of the curve order (malleable form).
    #[error("ERC-191 signature has a high s value")]
    HighS,
    /// The signature does not verify against the key or text.
    #[error("{0} signature does not verify")]
    Invalid(&'static str),
    /// A passkey assertion whose challenge is not the signature text.
    #[error("passkey client data does not carry the signature text as its challenge")]
    PasskeyChallenge,
    /// Smart-contract wallets are verified by a chain RPC, and none is configured.
    #[error("smart-contract wallet signatures need a chain RPC, and none is configured")]
    NeedsChainRpc,
    /// A signature kind XMTP defines but this implementation refuses.
    #[error("unsupported signature kind: {0}")]
    Unsupported(&'static str),
    /// An action lacks a signature it needs.
    #[error("missing {0} signature")]
    Missing(&'static str),
}

/// A broken association rule (libxmtp's `AssociationError`, one variant per rule).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AssociationError {
    /// A signature failed.
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// `CreateInbox` on an inbox that already exists.
    #[error("the inbox already exists")]
    MultipleCreate,
    /// An action on an inbox that was never created.
    #[error("the inbox does not exist")]
    NotCreated,
    /// The update names an inbox id that its `CreateInbox` does not derive.
    #[error("the update's inbox id is not the one its actions derive")]
    WrongInboxId,
    /// A signature that an earlier update already used.
    #[error("signature replayed: it was used by an earlier update")]
    Replay,
    /// The existing-member (or recovery) signature is not from a member or the recovery identifier.
    #[error("the signer is not a member of the inbox (nor its recovery identifier)")]
    MissingExistingMember,
    /// The new member's signature is from someone else.
    #[error("the new member did not sign its own association")]
    NewMemberIdSignatureMismatch,
    /// A member tried to associate itself.
    #[error("a member cannot add itself")]
    AddSelf,
    /// A kind of member may not add that kind (XMTP: installations never add installations).
    #[error("a member of kind {existing} may not add a member of kind {new}")]
    MemberNotAllowed {
        /// The adder's kind.
        existing: &'static str,
        /// The added kind.
        new: &'static str,
    },
    /// The signature kind does not fit the signer's role.
    #[error("a {kind} signature is not allowed for a {role}")]
    SignatureNotAllowed {
        /// The member kind.
        role: &'static str,
        /// The signature kind.
        kind: &'static str,
    },
    /// Revocation or recovery change not signed by the recovery identifier.
    #[error("only the recovery identifier may sign this action")]
    NotRecoveryIdentifier,
    /// The inbox would exceed XMTP's installation cap.
    #[error("the inbox already has {0} installations (XMTP's limit)")]
    TooManyInstallations(usize),
    /// The log would exceed the update cap.
    #[error("the inbox already has {0} identity updates (the limit)")]
    TooManyUpdates(usize),
    /// An update without actions.
    #[error("the update has no actions")]
    Empty,
    /// An identifier that is not well formed.
    #[error("malformed identifier: {0}")]
    BadIdentifier(String),
}
