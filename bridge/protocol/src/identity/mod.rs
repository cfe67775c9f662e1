//! XMTP identity: inbox ids, the identity-update log, its signature text and signatures.
//!
//! An inbox is an append-only log of `IdentityUpdate`s; its state is the fold of the log.
//! The rules follow libxmtp `crates/xmtp_id` (association_log.rs): the inbox id is
//! `sha256(identifier ‖ nonce)` in lowercase hex; every signature covers one human-readable
//! text naming the inbox id, the client time (to the second) and every action; a signature
//! used by one update is refused in any later one; only installations may not add
//! installations; each role signs with its own kind; the recovery identifier revokes and
//! hands over recovery; revoking a member removes the installations it added.
//! One deliberate difference: ERC-191 signatures with a high `s` are refused (libxmtp
//! normalises them); signers produce low `s`, so no real client is affected.

mod error;
mod signature;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use gatehouse_wire::associations as pb;
use sha2::{Digest, Sha256};

pub use error::{AssociationError, SignatureError};
pub use signature::{
    INSTALLATION_KEY_SIGNATURE_CONTEXT, InstallationKey, SignatureKind, SoftPasskey, Verified,
    Wallet, eip191_hash, recover_erc191, verify, verify_installation, verify_passkey,
};

use crate::error::Result;

const HEADER: &str = "XMTP : Authenticate to inbox";
const FOOTER: &str = "For more info: https://xmtp.org/signatures";
/// XMTP's cap on live installations per inbox ("already registered 10/10 installations").
pub const MAX_INSTALLATIONS_PER_INBOX: usize = 10;
/// Gatehouse's cap on identity updates per inbox; the node refuses further updates.
pub const MAX_IDENTITY_UPDATES_PER_INBOX: usize = 256;

/// Lowercase-hex inbox id.
pub type InboxId = String;

/// Derives the inbox id of an identifier and nonce, exactly as XMTP does.
pub fn inbox_id(identifier: &str, nonce: u64) -> InboxId {
    hex::encode(Sha256::digest(format!("{identifier}{nonce}")))
}

/// A member of an inbox: one variant per identifier kind (the set is open: add a variant).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Member {
    /// An Ethereum address, lowercase with `0x`.
    Ethereum(String),
    /// An installation's Ed25519 public key.
    Installation(Vec<u8>),
    /// A passkey's SEC1 P-256 public key.
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
    /// The kind's name, as errors show it.
    pub fn kind(&self) -> &'static str {
        match self {
            Member::Ethereum(_) => "ethereum",
            Member::Installation(_) => "installation",
            Member::Passkey(_) => "passkey",
        }
    }

    fn kind_text(&self) -> &'static str {
        match self {
            Member::Ethereum(_) => "Address",
            Member::Installation(_) => "ID",
            Member::Passkey(_) => "Passkey",
        }
    }

    /// Reads a wire `MemberIdentifier`.
    pub fn from_proto(m: &pb::MemberIdentifier) -> Result<Self, AssociationError> {
        use pb::member_identifier::Kind;
        match &m.kind {
            Some(Kind::EthereumAddress(a)) => Ok(Member::Ethereum(normalize_address(a)?)),
            Some(Kind::InstallationPublicKey(k)) => Ok(Member::Installation(k.clone())),
            Some(Kind::Passkey(p)) => Ok(Member::Passkey(p.key.clone())),
            None => Err(AssociationError::BadIdentifier(
                "member identifier without a kind".into(),
            )),
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

    /// The identifier string other XMTP users look this member up by (addresses, passkeys).
    pub fn public_identifier(&self) -> Option<(String, pb::IdentifierKind)> {
        match self {
            Member::Ethereum(a) => Some((a.clone(), pb::IdentifierKind::Ethereum)),
            Member::Passkey(k) => Some((hex::encode(k), pb::IdentifierKind::Passkey)),
            Member::Installation(_) => None,
        }
    }
}

/// Checks and lowercases an Ethereum address (`0x` + 40 hex digits).
pub fn normalize_address(a: &str) -> Result<String, AssociationError> {
    let ok = a.len() == 42 && a.starts_with("0x") && a[2..].chars().all(|c| c.is_ascii_hexdigit());
    if !ok {
        return Err(AssociationError::BadIdentifier(format!(
            "{a:?} is not a 0x-prefixed 20-byte hex address"
        )));
    }
    Ok(a.to_lowercase())
}

/// An action as it appears in the signature text.
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

/// Something that can sign identity updates.
#[derive(Clone, Copy, Debug)]
pub enum SignerRef<'a> {
    /// An Ethereum wallet.
    Wallet(&'a Wallet),
    /// An installation key.
    Installation(&'a InstallationKey),
    /// A passkey.
    Passkey(&'a SoftPasskey),
}

impl SignerRef<'_> {
    /// The member this signer is.
    pub fn member(&self) -> Member {
        match self {
            SignerRef::Wallet(w) => Member::Ethereum(w.address()),
            SignerRef::Installation(k) => Member::Installation(k.public().to_vec()),
            SignerRef::Passkey(p) => Member::Passkey(p.public()),
        }
    }

    fn sign(&self, text: &str) -> pb::Signature {
        match self {
            SignerRef::Wallet(w) => w.signature(text),
            SignerRef::Installation(k) => k.signature(text),
            SignerRef::Passkey(p) => p.signature(text),
        }
    }
}

/// One action to build, with the signers it needs.
#[derive(Clone, Debug)]
pub enum Pending<'a> {
    /// Create the inbox of `owner` (a wallet or a passkey) with `nonce`.
    Create {
        /// The owner.
        owner: SignerRef<'a>,
        /// The nonce.
        nonce: u64,
    },
    /// `existing` associates `new`; both sign.
    Add {
        /// A member (or the recovery identifier).
        existing: SignerRef<'a>,
        /// The new member.
        new: SignerRef<'a>,
    },
    /// The recovery identifier revokes `member`.
    Revoke {
        /// The recovery identifier's signer.
        recovery: SignerRef<'a>,
        /// Who to revoke.
        member: Member,
    },
    /// The recovery identifier hands recovery to `new_recovery`.
    ChangeRecovery {
        /// The recovery identifier's signer.
        recovery: SignerRef<'a>,
        /// The new recovery identifier: a `0x` address or a hex passkey key.
        new_recovery: String,
    },
}

/// Builds and signs an identity update of any number of actions (one signature text for all).
pub fn build_update(
    inbox_id: &str,
    client_timestamp_ns: u64,
    actions: &[Pending<'_>],
) -> pb::IdentityUpdate {
    use pb::identity_action::Kind;
    let unsigned: Vec<UnsignedAction> = actions
        .iter()
        .map(|a| match a {
            Pending::Create { owner, nonce } => UnsignedAction::CreateInbox {
                owner: owner.member().to_string(),
                nonce: *nonce,
            },
            Pending::Add { new, .. } => UnsignedAction::Add(new.member()),
            Pending::Revoke { member, .. } => UnsignedAction::Revoke(member.clone()),
            Pending::ChangeRecovery { new_recovery, .. } => {
                UnsignedAction::ChangeRecovery(new_recovery.to_lowercase())
            }
        })
        .collect();
    let text = signature_text(inbox_id, client_timestamp_ns, &unsigned);
    let actions = actions
        .iter()
        .map(|a| pb::IdentityAction {
            kind: Some(match a {
                Pending::Create { owner, nonce } => Kind::CreateInbox(pb::CreateInbox {
                    initial_identifier: owner.member().to_string(),
                    nonce: *nonce,
                    initial_identifier_signature: Some(owner.sign(&text)),
                    initial_identifier_kind: identifier_kind(&owner.member()) as i32,
                    relying_party: None,
                }),
                Pending::Add { existing, new } => Kind::Add(pb::AddAssociation {
                    new_member_identifier: Some(new.member().to_proto()),
                    existing_member_signature: Some(existing.sign(&text)),
                    new_member_signature: Some(new.sign(&text)),
                    relying_party: None,
                }),
                Pending::Revoke { recovery, member } => Kind::Revoke(pb::RevokeAssociation {
                    member_to_revoke: Some(member.to_proto()),
                    recovery_identifier_signature: Some(recovery.sign(&text)),
                }),
                Pending::ChangeRecovery {
                    recovery,
                    new_recovery,
                } => Kind::ChangeRecoveryAddress(pb::ChangeRecoveryAddress {
                    new_recovery_identifier: new_recovery.to_lowercase(),
                    existing_recovery_identifier_signature: Some(recovery.sign(&text)),
                    new_recovery_identifier_kind: if new_recovery.starts_with("0x") {
                        pb::IdentifierKind::Ethereum
                    } else {
                        pb::IdentifierKind::Passkey
                    } as i32,
                    relying_party: None,
                }),
            }),
        })
        .collect();
    pb::IdentityUpdate {
        actions,
        client_timestamp_ns,
        inbox_id: inbox_id.to_string(),
    }
}

/// XMTP's registration: `CreateInbox` + the installation's `AddAssociation`, one signed update.
pub fn register_inbox(
    wallet: &Wallet,
    nonce: u64,
    installation: &InstallationKey,
    client_timestamp_ns: u64,
) -> pb::IdentityUpdate {
    register_inbox_with(
        SignerRef::Wallet(wallet),
        nonce,
        installation,
        client_timestamp_ns,
    )
}

/// Registration for any owner kind (wallet or passkey).
pub fn register_inbox_with(
    owner: SignerRef<'_>,
    nonce: u64,
    installation: &InstallationKey,
    client_timestamp_ns: u64,
) -> pb::IdentityUpdate {
    let id = inbox_id(&owner.member().to_string(), nonce);
    build_update(
        &id,
        client_timestamp_ns,
        &[
            Pending::Create { owner, nonce },
            Pending::Add {
                existing: owner,
                new: SignerRef::Installation(installation),
            },
        ],
    )
}

fn identifier_kind(m: &Member) -> pb::IdentifierKind {
    match m {
        Member::Passkey(_) => pb::IdentifierKind::Passkey,
        _ => pb::IdentifierKind::Ethereum,
    }
}

/// Reads a public identifier of the given kind (`0x` address, or hex passkey key).
pub fn parse_identifier(identifier: &str, kind: i32) -> Result<Member, AssociationError> {
    if kind == pb::IdentifierKind::Passkey as i32 {
        let key = hex::decode(identifier).map_err(|_| {
            AssociationError::BadIdentifier(format!("passkey {identifier:?} is not hex"))
        })?;
        Ok(Member::Passkey(key))
    } else {
        Ok(Member::Ethereum(normalize_address(identifier)?))
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
    /// Updates folded so far.
    pub updates: usize,
}

impl InboxState {
    /// The recovery identifier as a member (an address or a passkey).
    pub fn recovery_member(&self) -> Member {
        match normalize_address(&self.recovery) {
            Ok(a) => Member::Ethereum(a),
            Err(_) => Member::Passkey(hex::decode(&self.recovery).unwrap_or_default()),
        }
    }

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

    /// Identifiers others resolve to this inbox (addresses and passkeys).
    pub fn public_identifiers(&self) -> Vec<String> {
        self.members
            .keys()
            .filter_map(|m| m.public_identifier().map(|(s, _)| s))
            .collect()
    }
}

fn need(
    sig: Option<&pb::Signature>,
    role: &'static str,
    text: &str,
) -> Result<Verified, AssociationError> {
    Ok(verify(text, sig.ok_or(SignatureError::Missing(role))?)?)
}

fn check_kind(role: &Member, v: &Verified) -> Result<(), AssociationError> {
    if v.kind.allowed_for(role) {
        Ok(())
    } else {
        Err(AssociationError::SignatureNotAllowed {
            role: role.kind(),
            kind: v.kind.name(),
        })
    }
}

/// Applies one update to the state (`None` before the first update). Fails closed: any broken
/// rule rejects the whole update and leaves the state as it was.
pub fn apply_update(
    state: Option<&InboxState>,
    update: &pb::IdentityUpdate,
) -> Result<InboxState, AssociationError> {
    use pb::identity_action::Kind;
    if update.actions.is_empty() {
        return Err(AssociationError::Empty);
    }
    if let Some(s) = state
        && s.updates >= MAX_IDENTITY_UPDATES_PER_INBOX
    {
        return Err(AssociationError::TooManyUpdates(
            MAX_IDENTITY_UPDATES_PER_INBOX,
        ));
    }
    let mut unsigned = Vec::with_capacity(update.actions.len());
    for a in &update.actions {
        unsigned.push(match a.kind.as_ref() {
            Some(Kind::CreateInbox(c)) => UnsignedAction::CreateInbox {
                owner: parse_identifier(&c.initial_identifier, c.initial_identifier_kind)?
                    .to_string(),
                nonce: c.nonce,
            },
            Some(Kind::Add(add)) => UnsignedAction::Add(Member::from_proto(
                add.new_member_identifier.as_ref().ok_or_else(|| {
                    AssociationError::BadIdentifier("add without a new member".into())
                })?,
            )?),
            Some(Kind::Revoke(r)) => UnsignedAction::Revoke(Member::from_proto(
                r.member_to_revoke.as_ref().ok_or_else(|| {
                    AssociationError::BadIdentifier("revoke without a member".into())
                })?,
            )?),
            Some(Kind::ChangeRecoveryAddress(c)) => UnsignedAction::ChangeRecovery(
                parse_identifier(&c.new_recovery_identifier, c.new_recovery_identifier_kind)?
                    .to_string(),
            ),
            None => {
                return Err(AssociationError::BadIdentifier(
                    "action without a kind".into(),
                ));
            }
        });
    }
    let text = signature_text(&update.inbox_id, update.client_timestamp_ns, &unsigned);
    // A signature may cover several actions of one update (registration signs the create and
    // the add with one wallet signature), but never one from an earlier update.
    let prior_seen = state.map(|s| s.seen_signatures.clone()).unwrap_or_default();
    let mut used = Vec::new();
    let mut fresh = |v: &Verified| -> Result<(), AssociationError> {
        if prior_seen.contains(&v.replay_key) {
            return Err(AssociationError::Replay);
        }
        used.push(v.replay_key.clone());
        Ok(())
    };
    let mut st = state.cloned();
    for (action, u) in update.actions.iter().zip(&unsigned) {
        match (action.kind.as_ref(), u) {
            (Some(Kind::CreateInbox(c)), UnsignedAction::CreateInbox { owner, nonce }) => {
                if st.is_some() {
                    return Err(AssociationError::MultipleCreate);
                }
                let v = need(
                    c.initial_identifier_signature.as_ref(),
                    "initial identifier",
                    &text,
                )?;
                let owner_member =
                    parse_identifier(&c.initial_identifier, c.initial_identifier_kind)?;
                if v.signer != owner_member {
                    return Err(AssociationError::MissingExistingMember);
                }
                check_kind(&owner_member, &v)?;
                fresh(&v)?;
                let mut members = BTreeMap::new();
                members.insert(
                    owner_member,
                    MemberRecord {
                        added_by: None,
                        client_timestamp_ns: update.client_timestamp_ns,
                    },
                );
                st = Some(InboxState {
                    inbox_id: inbox_id(owner, *nonce),
                    recovery: owner.clone(),
                    members,
                    seen_signatures: BTreeSet::new(),
                    updates: 0,
                });
            }
            (Some(Kind::Add(add)), UnsignedAction::Add(new_member)) => {
                let s = st.as_mut().ok_or(AssociationError::NotCreated)?;
                let newsig = need(add.new_member_signature.as_ref(), "new member", &text)?;
                let existing = need(
                    add.existing_member_signature.as_ref(),
                    "existing member",
                    &text,
                )?;
                fresh(&newsig)?;
                fresh(&existing)?;
                if &newsig.signer != new_member {
                    return Err(AssociationError::NewMemberIdSignatureMismatch);
                }
                if newsig.signer == existing.signer {
                    return Err(AssociationError::AddSelf);
                }
                check_kind(new_member, &newsig)?;
                // The adder is a member, or else the recovery identifier.
                let adder = if s.members.contains_key(&existing.signer)
                    || existing.signer == s.recovery_member()
                {
                    existing.signer.clone()
                } else {
                    return Err(AssociationError::MissingExistingMember);
                };
                check_kind(&adder, &existing)?;
                if matches!(
                    (&adder, new_member),
                    (Member::Installation(_), Member::Installation(_))
                ) {
                    return Err(AssociationError::MemberNotAllowed {
                        existing: adder.kind(),
                        new: new_member.kind(),
                    });
                }
                if matches!(new_member, Member::Installation(_))
                    && !s.members.contains_key(new_member)
                    && s.installations().count() >= MAX_INSTALLATIONS_PER_INBOX
                {
                    return Err(AssociationError::TooManyInstallations(
                        MAX_INSTALLATIONS_PER_INBOX,
                    ));
                }
                s.members.insert(
                    new_member.clone(),
                    MemberRecord {
                        added_by: Some(adder),
                        client_timestamp_ns: update.client_timestamp_ns,
                    },
                );
            }
            (Some(Kind::Revoke(r)), UnsignedAction::Revoke(member)) => {
                let s = st.as_mut().ok_or(AssociationError::NotCreated)?;
                let v = need(
                    r.recovery_identifier_signature.as_ref(),
                    "recovery identifier",
                    &text,
                )?;
                fresh(&v)?;
                if v.signer != s.recovery_member() {
                    return Err(AssociationError::NotRecoveryIdentifier);
                }
                s.members.remove(member);
                // The installations the revoked member added go with it.
                s.members.retain(|m, rec| {
                    !(matches!(m, Member::Installation(_)) && rec.added_by.as_ref() == Some(member))
                });
            }
            (Some(Kind::ChangeRecoveryAddress(c)), UnsignedAction::ChangeRecovery(new)) => {
                let s = st.as_mut().ok_or(AssociationError::NotCreated)?;
                let v = need(
                    c.existing_recovery_identifier_signature.as_ref(),
                    "recovery identifier",
                    &text,
                )?;
                fresh(&v)?;
                if v.signer != s.recovery_member() {
                    return Err(AssociationError::NotRecoveryIdentifier);
                }
                s.recovery = new.clone();
            }
            _ => unreachable!("each action was paired with its own text above"),
        }
    }
    let mut new = st.ok_or(AssociationError::NotCreated)?;
    if new.inbox_id != update.inbox_id {
        return Err(AssociationError::WrongInboxId);
    }
    new.seen_signatures.extend(used);
    new.updates += 1;
    Ok(new)
}

/// Folds a whole log.
pub fn fold<'a>(
    updates: impl IntoIterator<Item = &'a pb::IdentityUpdate>,
) -> Result<Option<InboxState>, AssociationError> {
    let mut st: Option<InboxState> = None;
    for u in updates {
        st = Some(apply_update(st.as_ref(), u)?);
    }
    Ok(st)
}

#[cfg(test)]
mod tests;
