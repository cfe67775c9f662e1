//! XMTP's commit log (fork detection, XIP-68): after each commit it processes, a member notes
//! the commit's node sequence id, the epoch authenticator before, the result and the epoch
//! authenticator after. The group's publisher (a super admin) uploads its entries signed with
//! the group's commit-log key — an Ed25519 key kept in the group's own (encrypted) mutable
//! metadata, so only members can sign or check. Every member compares the published
//! authenticators with its own: two members that merged different commits for one epoch hold
//! different authenticators for the next one, and that is a fork.

use std::collections::BTreeMap;

use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use gatehouse_wire::Message as _;
use gatehouse_wire::associations::RecoverableEd25519Signature;
use gatehouse_wire::message_contents::{CommitLogEntry, CommitResult, PlaintextCommitLogEntry};
use openmls::group::MlsGroup;

use crate::error::{ProtocolError, Result};

/// The mutable-metadata attribute holding the commit-log signing key (hex, 32 bytes).
pub const SIGNER_ATTRIBUTE: &str = "_commit_log_signer";

/// The group's commit-log signing key, if its metadata has one.
pub fn signer(group: &MlsGroup) -> Option<SigningKey> {
    let meta = crate::group::mutable_metadata(group).ok()?;
    let bytes = hex::decode(meta.attributes.get(SIGNER_ATTRIBUTE)?).ok()?;
    Some(SigningKey::from_bytes(&bytes.try_into().ok()?))
}

/// The group's current epoch authenticator (RFC 9420 §8.7).
pub fn authenticator(group: &MlsGroup) -> Vec<u8> {
    group.epoch_authenticator().as_slice().to_vec()
}

/// A local entry for the commit at node sequence id `seq`.
pub fn entry(
    group_id: &[u8],
    seq: u64,
    before: &[u8],
    result: CommitResult,
    after: Option<(u64, Vec<u8>)>,
) -> PlaintextCommitLogEntry {
    let (applied_epoch_number, applied_epoch_authenticator) = after.unwrap_or_default();
    PlaintextCommitLogEntry {
        group_id: group_id.to_vec(),
        commit_sequence_id: seq,
        last_epoch_authenticator: before.to_vec(),
        commit_result: result as i32,
        applied_epoch_number,
        applied_epoch_authenticator,
    }
}

/// Signs an entry as libxmtp does: Ed25519 over the serialised `PlaintextCommitLogEntry`.
pub fn sign(
    entry: &PlaintextCommitLogEntry,
    key: &SigningKey,
) -> (Vec<u8>, RecoverableEd25519Signature) {
    let bytes = entry.encode_to_vec();
    let sig = key.sign(&bytes);
    (
        bytes,
        RecoverableEd25519Signature {
            bytes: sig.to_bytes().to_vec(),
            public_key: key.verifying_key().to_bytes().to_vec(),
        },
    )
}

/// Checks a published entry against the group's key and decodes it. Entries signed by any
/// other key (the node could insert them) are refused.
pub fn verify(e: &CommitLogEntry, key: &VerifyingKey) -> Result<PlaintextCommitLogEntry> {
    let sig = e
        .signature
        .as_ref()
        .ok_or_else(|| ProtocolError::malformed("CommitLogEntry", "unsigned"))?;
    if sig.public_key != key.to_bytes() {
        return Err(ProtocolError::malformed(
            "CommitLogEntry",
            "signed by a key that is not the group's commit-log key",
        ));
    }
    let s = ed25519_dalek::Signature::from_slice(&sig.bytes)
        .map_err(|e| ProtocolError::malformed("CommitLogEntry signature", e))?;
    key.verify(&e.serialized_commit_log_entry, &s)
        .map_err(|_| ProtocolError::malformed("CommitLogEntry", "bad signature"))?;
    PlaintextCommitLogEntry::decode(e.serialized_commit_log_entry.as_slice())
        .map_err(|e| ProtocolError::malformed("PlaintextCommitLogEntry", e))
}

/// A disagreement between this member and the published log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fork {
    /// The epoch both sides reached by different commits.
    pub epoch: u64,
    /// The node sequence id of the published commit.
    pub commit_sequence_id: u64,
    /// This member's authenticator for that epoch.
    pub ours: Vec<u8>,
    /// The published authenticator.
    pub theirs: Vec<u8>,
}

/// Compares published entries (already verified, for one group) with this member's
/// authenticators per epoch (`ours`: epoch → authenticator). The first applied entry whose
/// epoch this member also reached with a different authenticator is a fork. Epochs this member
/// never held (before it joined, or not reached yet) say nothing.
pub fn find_fork(
    published: &[PlaintextCommitLogEntry],
    ours: &BTreeMap<u64, Vec<u8>>,
) -> Option<Fork> {
    published
        .iter()
        .filter(|e| e.commit_result == CommitResult::Applied as i32)
        .find_map(|e| {
            let mine = ours.get(&e.applied_epoch_number)?;
            (*mine != e.applied_epoch_authenticator).then(|| Fork {
                epoch: e.applied_epoch_number,
                commit_sequence_id: e.commit_sequence_id,
                ours: mine.clone(),
                theirs: e.applied_epoch_authenticator.clone(),
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(seq: u64, epoch: u64, auth: &[u8]) -> PlaintextCommitLogEntry {
        entry(
            b"g",
            seq,
            b"x",
            CommitResult::Applied,
            Some((epoch, auth.to_vec())),
        )
    }

    /// Signed entries verify only under the group's key; a different authenticator for an
    /// epoch this member holds is a fork, anything else is not.
    #[test]
    fn sign_verify_and_compare() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let e = applied(5, 2, b"auth-2");
        let (bytes, signature) = sign(&e, &key);
        let published = CommitLogEntry {
            sequence_id: 1,
            serialized_commit_log_entry: bytes.clone(),
            signature: Some(signature.clone()),
        };
        assert_eq!(verify(&published, &key.verifying_key()).unwrap(), e);
        // Another key (a node forging entries) is refused, and so is a changed entry.
        let other = SigningKey::from_bytes(&[8; 32]);
        assert!(verify(&published, &other.verifying_key()).is_err());
        let mut tampered = published.clone();
        tampered.serialized_commit_log_entry = applied(5, 2, b"evil").encode_to_vec();
        assert!(verify(&tampered, &key.verifying_key()).is_err());

        let ours: BTreeMap<u64, Vec<u8>> =
            [(1, b"auth-1".to_vec()), (2, b"auth-2".to_vec())].into();
        assert_eq!(find_fork(std::slice::from_ref(&e), &ours), None);
        // An epoch we never held, or a failed commit, says nothing.
        assert_eq!(find_fork(&[applied(9, 7, b"zz")], &ours), None);
        let failed = entry(b"g", 6, b"x", CommitResult::WrongEpoch, None);
        assert_eq!(find_fork(&[failed], &ours), None);
        let fork = find_fork(&[applied(6, 2, b"other")], &ours).unwrap();
        assert_eq!((fork.epoch, fork.commit_sequence_id), (2, 6));
        assert_eq!(fork.ours, b"auth-2");
    }
}
