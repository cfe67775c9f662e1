//! XMTP identity: inbox ids, the identity-update log, its signature text and signatures.
//!
//! An inbox is an append-only log of `IdentityUpdate`s; its state is the fold of the log.
//! Every rule here follows libxmtp `crates/xmtp_id` at the target revision: the inbox id is
//! `sha256(identifier ‖ nonce)` in lowercase hex; every signature covers one human-readable
//! text naming the inbox id, the client time and every action; a signature is accepted once.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use gatehouse_wire::associations as pb;
use k256::ecdsa::{
    RecoveryId, Signature as EcdsaSignature, SigningKey as EcdsaKey,
    VerifyingKey as EcdsaVerifyingKey,
};
use sha2::{Digest, Sha256, Sha512};
use sha3::Keccak256;

use crate::error::{ProtocolError, Result};

/// Ed25519ph context for installation-key signatures over identity updates.
pub const INSTALLATION_KEY_SIGNATURE_CONTEXT: &[u8] = b"IDENTITY UPDATE SIGNATURE";
const HEADER: &str = "XMTP : Authenticate to inbox";
const FOOTER: &str = "For more info: https://xmtp.org/signatures";
/// XMTP's cap on installations per inbox (libxmtp `MAX_INSTALLATIONS_PER_INBOX`).
pub const MAX_INSTALLATIONS_PER_INBOX: usize = 10;

/// Lowercase-hex inbox id.
pub type InboxId = String;

/// Derives the inbox id of an identifier and nonce, exactly as XMTP does.
pub fn inbox_id(identifier: &str, nonce: u64) -> InboxId {
    hex::encode(Sha256::digest(format!("{identifier}{nonce}")))
}

/// A member of an inbox: one kind per identifier type (the set is open: add a variant).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Member {
    /// An Ethereum address, lowercase with `0x`.
    Ethereum(String),
    /// An installation's Ed25519 public key.
    Installation(Vec<u8>),
    /// A passkey (P-256) public key.
    Passkey(Vec<u8>),
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Member::Ethereum(a) => f.write_str(a),
            Member::Installation(k) | Member::Passkey(k) => f.write_str(&hex::encode(k)),
        }
    }
}

impl Member {
    fn kind_text(&self) -> &'static str {
        match self {
            Member::Ethereum(_) => "Address",
            Member::Installation(_) => "ID",
            Member::Passkey(_) => "Passkey",
        }
    }

    /// Reads a wire `MemberIdentifier`.
    pub fn from_proto(m: &pb::MemberIdentifier) -> Result<Self> {
        use pb::member_identifier::Kind;
        match &m.kind {
            Some(Kind::EthereumAddress(a)) => Ok(Member::Ethereum(normalize_address(a)?)),
            Some(Kind::InstallationPublicKey(k)) => Ok(Member::Installation(k.clone())),
            Some(Kind::Passkey(p)) => Ok(Member::Passkey(p.key.clone())),
            None => Err(ProtocolError::malformed("MemberIdentifier", "no kind")),
        }
    }

    /// Writes a wire `MemberIdentifier`.
    pub fn to_proto(&self) -> pb::MemberIdentifier {
        use pb::member_identifier::Kind;
        pb::MemberIdentifier {
            kind: Some(match self {
                Member::Ethereum(a) => Kind::EthereumAddress(a.clone()),
                Member::Installation(k) => Kind::InstallationPublicKey(k.clone()),
                Member::Passkey(k) => Kind::Passkey(pb::Passkey {
                    key: k.clone(),
                    relying_party: None,
                }),
            }),
        }
    }
}

/// Checks and lowercases an Ethereum address (`0x` + 40 hex digits).
pub fn normalize_address(a: &str) -> Result<String> {
    let hexpart = a
        .strip_prefix("0x")
        .ok_or_else(|| ProtocolError::malformed("Ethereum address", "missing 0x"))?;
    if hexpart.len() != 40 || !hexpart.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ProtocolError::malformed("Ethereum address", a));
    }
    Ok(a.to_lowercase())
}

/// An Ethereum wallet key (secp256k1) that signs ERC-191 `personal_sign` messages.
#[derive(Clone)]
pub struct Wallet(EcdsaKey);

impl fmt::Debug for Wallet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Wallet({})", self.address())
    }
}

impl Wallet {
    /// A wallet from its 32-byte private key.
    pub fn from_bytes(sk: &[u8]) -> Result<Self> {
        EcdsaKey::from_slice(sk)
            .map(Wallet)
            .map_err(|_| ProtocolError::malformed("wallet key", "not a secp256k1 scalar"))
    }

    /// The private key bytes (for backup by the owner; never log them).
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes().into()
    }

    /// The lowercase `0x` Ethereum address.
    pub fn address(&self) -> String {
        address_of(self.0.verifying_key())
    }

    /// ERC-191 `personal_sign`: 65 bytes `r ‖ s ‖ v` with `v` in {27, 28}.
    pub fn sign_text(&self, text: &str) -> Vec<u8> {
        let hash = eip191_hash(text);
        // Signing a 32-byte prehash with a valid key cannot fail.
        let (sig, recid) = self
            .0
            .sign_prehash_recoverable(&hash)
            .expect("secp256k1 prehash signing");
        let mut out = sig.to_bytes().to_vec();
        out.push(27 + recid.to_byte());
        out
    }
}

fn address_of(vk: &EcdsaVerifyingKey) -> String {
    let point = vk.to_encoded_point(false);
    let hash = Keccak256::digest(&point.as_bytes()[1..]);
    format!("0x{}", hex::encode(&hash[12..]))
}

/// The ERC-191 (`personal_sign`) hash of a text.
pub fn eip191_hash(text: &str) -> [u8; 32] {
    let mut h = Keccak256::new();
    h.update(format!("\x19Ethereum Signed Message:\n{}", text.len()).as_bytes());
    h.update(text.as_bytes());
    h.finalize().into()
}

/// Recovers the signer of an ERC-191 signature. Returns `(address, replay key)`; the replay key
/// is `r ‖ low-s ‖ parity`, so every accepted encoding of one signature counts once.
pub fn recover_erc191(text: &str, sig: &[u8]) -> Result<(String, Vec<u8>)> {
    let bytes: [u8; 65] = sig
        .try_into()
        .map_err(|_| ProtocolError::InvalidSignature("ERC-191 signature is not 65 bytes".into()))?;
    let v = match bytes[64] {
        0 | 27 => 0u8,
        1 | 28 => 1u8,
        other => {
            return Err(ProtocolError::InvalidSignature(format!(
                "ERC-191 recovery byte {other} is not 0, 1, 27 or 28"
            )));
        }
    };
    let mut signature = EcdsaSignature::from_slice(&bytes[..64])
        .map_err(|_| ProtocolError::InvalidSignature("ERC-191 r or s out of range".into()))?;
    let mut parity = v;
    if let Some(low) = signature.normalize_s() {
        signature = low;
        parity ^= 1;
    }
    let recid = RecoveryId::from_byte(parity)
        .ok_or_else(|| ProtocolError::InvalidSignature("bad recovery id".into()))?;
    let vk = EcdsaVerifyingKey::recover_from_prehash(&eip191_hash(text), &signature, recid)
        .map_err(|_| ProtocolError::InvalidSignature("ERC-191 recovery failed".into()))?;
    let mut replay = signature.to_bytes().to_vec();
    replay.push(parity);
    Ok((address_of(&vk), replay))
}

/// An installation key: one device or process. Signs identity updates and MLS leaves.
#[derive(Clone)]
pub struct InstallationKey(SigningKey);

impl fmt::Debug for InstallationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InstallationKey({})", hex::encode(self.public()))
    }
}

impl InstallationKey {
    /// From the 32-byte Ed25519 seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self(SigningKey::from_bytes(seed))
    }

    /// The seed (secret; never log it).
    pub fn seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The Ed25519 public key: the installation id on the network.
    pub fn public(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }

    /// Ed25519ph with XMTP's installation-key context over a text.
    pub fn sign_text(&self, text: &str) -> Vec<u8> {
        let mut prehash = Sha512::new();
        prehash.update(text.as_bytes());
        // The context is a constant shorter than 255 bytes, so signing cannot fail.
        self.0
            .sign_prehashed(prehash, Some(INSTALLATION_KEY_SIGNATURE_CONTEXT))
            .expect("Ed25519ph context is short")
            .to_bytes()
            .to_vec()
    }

    /// A plain Ed25519 signature (as MLS uses it).
    pub fn sign_raw(&self, msg: &[u8]) -> Vec<u8> {
        self.0.sign(msg).to_bytes().to_vec()
    }
}

/// Verifies an installation-key signature over a text.
pub fn verify_installation(text: &str, sig: &[u8], public: &[u8]) -> Result<()> {
    let pk: [u8; 32] = public
        .try_into()
        .map_err(|_| ProtocolError::InvalidSignature("installation key is not 32 bytes".into()))?;
    let vk = VerifyingKey::from_bytes(&pk)
        .map_err(|_| ProtocolError::InvalidSignature("installation key is not a point".into()))?;
    let sig = ed25519_dalek::Signature::from_slice(sig)
        .map_err(|_| ProtocolError::InvalidSignature("Ed25519 signature is not 64 bytes".into()))?;
    let mut prehash = Sha512::new();
    prehash.update(text.as_bytes());
    vk.verify_prehashed_strict(prehash, Some(INSTALLATION_KEY_SIGNATURE_CONTEXT), &sig)
        .map_err(|_| ProtocolError::InvalidSignature("installation-key signature".into()))
}

/// An action before signing, as it appears in the signature text.
#[derive(Clone, Debug)]
pub enum UnsignedAction {
    /// Create an inbox owned by an address.
    CreateInbox {
        /// The owner (recovery) address.
        owner: String,
        /// The nonce that, with the owner, derives the inbox id.
        nonce: u64,
    },
    /// Associate a new member.
    Add(Member),
    /// Revoke a member.
    Revoke(Member),
    /// Change the recovery address.
    ChangeRecovery(String),
}

impl UnsignedAction {
    fn text(&self) -> String {
        match self {
            UnsignedAction::CreateInbox { owner, .. } => {
                format!("- Create inbox\n  (Owner: {owner})")
            }
            UnsignedAction::Add(m) => {
                let prefix = match m {
                    Member::Installation(_) => "Grant messaging access to app",
                    Member::Ethereum(_) => "Link address to inbox",
                    Member::Passkey(_) => "Link passkey to inbox",
                };
                format!("- {prefix}\n  ({}: {m})", m.kind_text())
            }
            UnsignedAction::Revoke(m) => {
                let prefix = match m {
                    Member::Installation(_) => "Revoke messaging access from app",
                    Member::Ethereum(_) => "Unlink address from inbox",
                    Member::Passkey(_) => "Unlink passkey from inbox",
                };
                format!("- {prefix}\n  ({}: {m})", m.kind_text())
            }
            UnsignedAction::ChangeRecovery(a) => {
                format!("- Change inbox recovery address\n  (Address: {a})")
            }
        }
    }
}

/// XMTP's signature text for an identity update.
pub fn signature_text(
    inbox_id: &str,
    client_timestamp_ns: u64,
    actions: &[UnsignedAction],
) -> String {
    let lines: Vec<String> = actions.iter().map(UnsignedAction::text).collect();
    format!(
        "{HEADER}\n\nInbox ID: {inbox_id}\nCurrent time: {}\n\n{}\n\n{FOOTER}",
        rfc3339_secs(client_timestamp_ns),
        lines.join("\n")
    )
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a nanosecond timestamp (chrono's `to_rfc3339_opts(Secs, true)`).
pub fn rfc3339_secs(ns: u64) -> String {
    let secs = (ns / 1_000_000_000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

/// Builds the identity update that creates an inbox for `wallet` and registers `installation`
/// on it (XMTP's registration: `CreateInbox` + `AddAssociation` in one signed update).
pub fn register_inbox(
    wallet: &Wallet,
    nonce: u64,
    installation: &InstallationKey,
    client_timestamp_ns: u64,
) -> pb::IdentityUpdate {
    let owner = wallet.address();
    let id = inbox_id(&owner, nonce);
    let new_member = Member::Installation(installation.public().to_vec());
    let text = signature_text(
        &id,
        client_timestamp_ns,
        &[
            UnsignedAction::CreateInbox {
                owner: owner.clone(),
                nonce,
            },
            UnsignedAction::Add(new_member.clone()),
        ],
    );
    let wallet_sig = wallet.sign_text(&text);
    let erc191 = |bytes: Vec<u8>| pb::Signature {
        signature: Some(pb::signature::Signature::Erc191(
            pb::RecoverableEcdsaSignature { bytes },
        )),
    };
    let create = pb::IdentityAction {
        kind: Some(pb::identity_action::Kind::CreateInbox(pb::CreateInbox {
            initial_identifier: owner,
            nonce,
            initial_identifier_signature: Some(erc191(wallet_sig.clone())),
            initial_identifier_kind: pb::IdentifierKind::Ethereum as i32,
            relying_party: None,
        })),
    };
    let add = pb::IdentityAction {
        kind: Some(pb::identity_action::Kind::Add(pb::AddAssociation {
            new_member_identifier: Some(new_member.to_proto()),
            existing_member_signature: Some(erc191(wallet_sig)),
            new_member_signature: Some(pb::Signature {
                signature: Some(pb::signature::Signature::InstallationKey(
                    pb::RecoverableEd25519Signature {
                        bytes: installation.sign_text(&text),
                        public_key: installation.public().to_vec(),
                    },
                )),
            }),
            relying_party: None,
        })),
    };
    pb::IdentityUpdate {
        actions: vec![create, add],
        client_timestamp_ns,
        inbox_id: id,
    }
}

/// One member's record in an inbox state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberRecord {
    /// Who added this member (none for the inbox's creator).
    pub added_by: Option<Member>,
    /// The client time of the update that added it.
    pub client_timestamp_ns: u64,
}

/// The state of an inbox: the fold of its identity log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboxState {
    /// The inbox id.
    pub inbox_id: InboxId,
    /// The recovery address (signs revocations and recovery changes).
    pub recovery: String,
    /// The live members.
    pub members: BTreeMap<Member, MemberRecord>,
    /// Replay keys of every signature already used.
    pub seen_signatures: BTreeSet<Vec<u8>>,
}

impl InboxState {
    /// The live installation keys.
    pub fn installations(&self) -> impl Iterator<Item = &[u8]> {
        self.members.keys().filter_map(|m| match m {
            Member::Installation(k) => Some(k.as_slice()),
            _ => None,
        })
    }

    /// Whether `key` is a live installation of this inbox.
    pub fn has_installation(&self, key: &[u8]) -> bool {
        self.members
            .contains_key(&Member::Installation(key.to_vec()))
    }

    /// The Ethereum addresses associated with this inbox.
    pub fn addresses(&self) -> impl Iterator<Item = &str> {
        self.members.keys().filter_map(|m| match m {
            Member::Ethereum(a) => Some(a.as_str()),
            _ => None,
        })
    }
}

/// A verified signature: who signed, and its replay key.
struct Verified {
    signer: Member,
    replay: Vec<u8>,
}

fn verify_signature(text: &str, sig: Option<&pb::Signature>) -> Result<Verified> {
    use pb::signature::Signature as S;
    let sig = sig
        .and_then(|s| s.signature.as_ref())
        .ok_or_else(|| ProtocolError::malformed("Signature", "missing"))?;
    match sig {
        S::Erc191(s) => {
            let (address, replay) = recover_erc191(text, &s.bytes)?;
            Ok(Verified {
                signer: Member::Ethereum(address),
                replay,
            })
        }
        S::InstallationKey(s) => {
            verify_installation(text, &s.bytes, &s.public_key)?;
            Ok(Verified {
                signer: Member::Installation(s.public_key.clone()),
                replay: s.bytes.clone(),
            })
        }
        S::Erc6492(_) => Err(ProtocolError::Unsupported(
            "smart-contract wallet signatures need a chain RPC, and none is configured".into(),
        )),
        S::Passkey(_) => Err(ProtocolError::Unsupported(
            "passkey signatures are not supported yet".into(),
        )),
        S::DelegatedErc191(_) => Err(ProtocolError::Unsupported(
            "legacy delegated signatures".into(),
        )),
    }
}

/// Which existing member kinds may associate which new member kinds (XMTP's rules).
fn may_associate(existing: &Member, new: &Member) -> bool {
    match (existing, new) {
        // Installations never add further installations.
        (Member::Installation(_), Member::Installation(_)) => false,
        (Member::Installation(_), _) => true,
        (Member::Ethereum(_) | Member::Passkey(_), _) => true,
    }
}

/// Applies one update to the state (`None` before the first update). Fails closed: any broken
/// rule rejects the whole update and leaves the state as it was.
pub fn apply_update(state: Option<&InboxState>, update: &pb::IdentityUpdate) -> Result<InboxState> {
    use pb::identity_action::Kind;
    if update.actions.is_empty() {
        return Err(ProtocolError::IdentityRule("update has no actions".into()));
    }
    let mut unsigned = Vec::with_capacity(update.actions.len());
    for a in &update.actions {
        unsigned.push(match a.kind.as_ref() {
            Some(Kind::CreateInbox(c)) => UnsignedAction::CreateInbox {
                owner: normalize_address(&c.initial_identifier)?,
                nonce: c.nonce,
            },
            Some(Kind::Add(add)) => UnsignedAction::Add(Member::from_proto(
                add.new_member_identifier
                    .as_ref()
                    .ok_or_else(|| ProtocolError::malformed("AddAssociation", "no new member"))?,
            )?),
            Some(Kind::Revoke(r)) => UnsignedAction::Revoke(Member::from_proto(
                r.member_to_revoke
                    .as_ref()
                    .ok_or_else(|| ProtocolError::malformed("RevokeAssociation", "no member"))?,
            )?),
            Some(Kind::ChangeRecoveryAddress(c)) => {
                UnsignedAction::ChangeRecovery(normalize_address(&c.new_recovery_identifier)?)
            }
            None => return Err(ProtocolError::malformed("IdentityAction", "no kind")),
        });
    }
    let text = signature_text(&update.inbox_id, update.client_timestamp_ns, &unsigned);
    let mut st = state.cloned();
    // A signature may cover several actions of one update (registration signs the create and
    // the add with one wallet signature), but it must not appear in any earlier update.
    let prior_seen = state.map(|s| s.seen_signatures.clone()).unwrap_or_default();
    let use_sig = |_: &InboxState, v: &Verified| -> Result<()> {
        if prior_seen.contains(&v.replay) {
            return Err(ProtocolError::IdentityRule("signature already used".into()));
        }
        Ok(())
    };
    for (action, u) in update.actions.iter().zip(&unsigned) {
        match (action.kind.as_ref(), u) {
            (Some(Kind::CreateInbox(c)), UnsignedAction::CreateInbox { owner, nonce }) => {
                if st.is_some() {
                    return Err(ProtocolError::IdentityRule("inbox already exists".into()));
                }
                let expected = inbox_id(owner, *nonce);
                if expected != update.inbox_id {
                    return Err(ProtocolError::IdentityRule(format!(
                        "inbox id {} does not derive from {owner} and nonce {nonce}",
                        update.inbox_id
                    )));
                }
                let v = verify_signature(&text, c.initial_identifier_signature.as_ref())?;
                if v.signer != Member::Ethereum(owner.clone()) {
                    return Err(ProtocolError::InvalidSignature(
                        "create-inbox not signed by its owner".into(),
                    ));
                }
                let mut new = InboxState {
                    inbox_id: expected,
                    recovery: owner.clone(),
                    members: BTreeMap::new(),
                    seen_signatures: BTreeSet::new(),
                };
                use_sig(&new, &v)?;
                new.seen_signatures.insert(v.replay);
                new.members.insert(
                    Member::Ethereum(owner.clone()),
                    MemberRecord {
                        added_by: None,
                        client_timestamp_ns: update.client_timestamp_ns,
                    },
                );
                st = Some(new);
            }
            (Some(Kind::Add(add)), UnsignedAction::Add(new_member)) => {
                let s = st
                    .as_mut()
                    .ok_or_else(|| ProtocolError::IdentityRule("inbox does not exist".into()))?;
                let existing = verify_signature(&text, add.existing_member_signature.as_ref())?;
                let newsig = verify_signature(&text, add.new_member_signature.as_ref())?;
                if !s.members.contains_key(&existing.signer) {
                    return Err(ProtocolError::IdentityRule(
                        "existing-member signature is not from a member".into(),
                    ));
                }
                if &newsig.signer != new_member {
                    return Err(ProtocolError::InvalidSignature(
                        "new member did not sign".into(),
                    ));
                }
                if !may_associate(&existing.signer, new_member) {
                    return Err(ProtocolError::IdentityRule(
                        "this member kind may not add that one".into(),
                    ));
                }
                if matches!(new_member, Member::Installation(_))
                    && s.installations().count() >= MAX_INSTALLATIONS_PER_INBOX
                {
                    return Err(ProtocolError::IdentityRule(format!(
                        "inbox already has {MAX_INSTALLATIONS_PER_INBOX} installations"
                    )));
                }
                use_sig(s, &existing)?;
                use_sig(s, &newsig)?;
                s.seen_signatures.insert(existing.replay);
                s.seen_signatures.insert(newsig.replay);
                s.members.insert(
                    new_member.clone(),
                    MemberRecord {
                        added_by: Some(existing.signer),
                        client_timestamp_ns: update.client_timestamp_ns,
                    },
                );
            }
            (Some(Kind::Revoke(r)), UnsignedAction::Revoke(member)) => {
                let s = st
                    .as_mut()
                    .ok_or_else(|| ProtocolError::IdentityRule("inbox does not exist".into()))?;
                let v = verify_signature(&text, r.recovery_identifier_signature.as_ref())?;
                if v.signer != Member::Ethereum(s.recovery.clone()) {
                    return Err(ProtocolError::IdentityRule(
                        "revocation not signed by the recovery address".into(),
                    ));
                }
                use_sig(s, &v)?;
                s.seen_signatures.insert(v.replay);
                s.members.remove(member);
                // Whatever the revoked member added goes with it.
                s.members
                    .retain(|_, rec| rec.added_by.as_ref() != Some(member));
            }
            (Some(Kind::ChangeRecoveryAddress(c)), UnsignedAction::ChangeRecovery(new)) => {
                let s = st
                    .as_mut()
                    .ok_or_else(|| ProtocolError::IdentityRule("inbox does not exist".into()))?;
                let v = verify_signature(&text, c.existing_recovery_identifier_signature.as_ref())?;
                if v.signer != Member::Ethereum(s.recovery.clone()) {
                    return Err(ProtocolError::IdentityRule(
                        "recovery change not signed by the recovery address".into(),
                    ));
                }
                use_sig(s, &v)?;
                s.seen_signatures.insert(v.replay);
                s.recovery = new.clone();
            }
            _ => {
                return Err(ProtocolError::Internal(
                    "action and its text disagree".into(),
                ));
            }
        }
    }
    st.ok_or_else(|| ProtocolError::Internal("no state after update".into()))
}

/// Folds a whole log.
pub fn fold<'a>(
    updates: impl IntoIterator<Item = &'a pb::IdentityUpdate>,
) -> Result<Option<InboxState>> {
    let mut st: Option<InboxState> = None;
    for u in updates {
        st = Some(apply_update(st.as_ref(), u)?);
    }
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libxmtp's published signature-text example (unsigned_actions.rs) is reproduced exactly.
    #[test]
    fn signature_text_matches_libxmtp() {
        let owner = "0x1234567890abcdef1234567890abcdef12345678".to_string();
        let id = inbox_id(&owner, 0);
        assert_eq!(
            id,
            "fcd18d86276d7a99fe522dba9660c420f03c8648785ada7c5daae232a3df77a9"
        );
        let addr = Member::Ethereum("0x4567890abcdef1234567890abcdef12345678123".into());
        let inst = Member::Installation(vec![1, 2, 3]);
        let text = signature_text(
            &id,
            12,
            &[
                UnsignedAction::CreateInbox { owner, nonce: 0 },
                UnsignedAction::Add(addr.clone()),
                UnsignedAction::Add(inst.clone()),
                UnsignedAction::Revoke(addr),
                UnsignedAction::Revoke(inst),
                UnsignedAction::ChangeRecovery("0x7890abcdef1234567890abcdef12345678123456".into()),
            ],
        );
        let expected = "XMTP : Authenticate to inbox\n\nInbox ID: fcd18d86276d7a99fe522dba9660c420f03c8648785ada7c5daae232a3df77a9\nCurrent time: 1970-01-01T00:00:00Z\n\n- Create inbox\n  (Owner: 0x1234567890abcdef1234567890abcdef12345678)\n- Link address to inbox\n  (Address: 0x4567890abcdef1234567890abcdef12345678123)\n- Grant messaging access to app\n  (ID: 010203)\n- Unlink address from inbox\n  (Address: 0x4567890abcdef1234567890abcdef12345678123)\n- Revoke messaging access from app\n  (ID: 010203)\n- Change inbox recovery address\n  (Address: 0x7890abcdef1234567890abcdef12345678123456)\n\nFor more info: https://xmtp.org/signatures";
        assert_eq!(text, expected);
    }

    /// EIP-191 known answer: the address of private key 0x…01 is the well-known
    /// 0x7e5f4552091a69125d5dfcb7b8c2659029395bdf, and recovery returns it.
    #[test]
    fn erc191_sign_and_recover() {
        let mut sk = [0u8; 32];
        sk[31] = 1;
        let w = Wallet::from_bytes(&sk).unwrap();
        assert_eq!(w.address(), "0x7e5f4552091a69125d5dfcb7b8c2659029395bdf");
        let sig = w.sign_text("hello");
        let (addr, _) = recover_erc191("hello", &sig).unwrap();
        assert_eq!(addr, w.address());
        let (other, _) = recover_erc191("hellO", &sig).unwrap();
        assert_ne!(other, w.address());
        let mut bad = sig.clone();
        bad[64] = 29;
        assert!(recover_erc191("hello", &bad).is_err());
    }

    /// A registration folds to an inbox with the wallet and the installation; replaying it fails.
    #[test]
    fn register_and_fold() {
        let w = Wallet::from_bytes(&[7u8; 32]).unwrap();
        let inst = InstallationKey::from_seed(&[9u8; 32]);
        let u = register_inbox(&w, 1, &inst, 1_700_000_000_000_000_000);
        let st = apply_update(None, &u).unwrap();
        assert_eq!(st.inbox_id, inbox_id(&w.address(), 1));
        assert!(st.has_installation(&inst.public()));
        assert_eq!(
            st.addresses().collect::<Vec<_>>(),
            vec![w.address().as_str()]
        );
        assert!(apply_update(Some(&st), &u).is_err());
        let mut forged = u.clone();
        forged.client_timestamp_ns += 1_000_000_000;
        assert!(apply_update(None, &forged).is_err());
    }

    /// Civil dates come out right around leap years.
    #[test]
    fn rfc3339() {
        assert_eq!(rfc3339_secs(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339_secs(951_782_400 * 1_000_000_000),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            rfc3339_secs(1_795_506_939_986_000_000),
            "2026-11-24T07:55:39Z"
        );
    }
}
