//! XMTP conversations on openmls: key packages, DMs, welcomes and application messages.
//!
//! Everything here follows what libxmtp `829b1f5e` puts on the wire, read from the recorded
//! fixtures: ciphersuite 3; a basic credential carrying `MlsCredential{inbox_id}`; the
//! installation key as leaf signature key; the inbox id as the leaf's application id;
//! last-resort key packages that advertise an X-Wing welcome-wrapper key (0xff03) and the
//! welcome-pointee AEADs (0xff04); group contexts with immutable metadata (0xf000, a
//! length-prefixed `GroupMetadataV1`), mutable metadata (0xff00), membership (0xff01),
//! permissions (0xff02) and the required-capabilities extension naming them.
//!
//! The provider (crypto + key-value storage) comes from the caller; this module does no I/O.

use std::collections::BTreeMap;

use gatehouse_wire::Message as _;
use gatehouse_wire::message_contents as mc;
use gatehouse_wire::xmtp::identity::MlsCredential;
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use rand_core::CryptoRngCore;

use crate::error::{ProtocolError, Result};
use crate::identity::InstallationKey;
use crate::mls::{
    EXT_GROUP_MEMBERSHIP, EXT_GROUP_PERMISSIONS, EXT_IMMUTABLE_METADATA, EXT_MUTABLE_METADATA,
    EXT_WELCOME_POINTEE_AEAD_TYPES, EXT_WELCOME_WRAPPER_ENCRYPTION,
};

/// XMTP's ciphersuite.
pub const CIPHERSUITE: Ciphersuite =
    Ciphersuite::MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519;
/// Epochs of keys kept after a commit: peers send on the previous epoch right after one.
pub const MAX_PAST_EPOCHS: usize = 3;
/// Out-of-order tolerance of the sender ratchet.
pub const OUT_OF_ORDER_TOLERANCE: u32 = 100;
/// Maximum forward distance of the sender ratchet.
pub const MAXIMUM_FORWARD_DISTANCE: u32 = 1000;

/// Gatehouse's post-quantum suite: ML-KEM-768 + X25519 (X-Wing), AES-128-GCM, SHA-256,
/// Ed25519. Code point 0x004F is provisional (draft-ietf-mls-pq-ciphersuites): keep it named.
pub const PQ_CIPHERSUITE: Ciphersuite =
    Ciphersuite::MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519;
/// Key-package extension carrying a complete second key package on [`PQ_CIPHERSUITE`]
/// (Gatehouse private use; provisional, XMTP clients ignore it).
pub const EXT_PQ_KEY_PACKAGE: u16 = 0xfa01;

/// The openmls provider: RustCrypto plus in-memory key-value storage that the caller persists
/// (see [`crate::mls_store`]).
pub use crate::mls_store::{MlsStore, Provider};

fn mls_err(e: impl std::fmt::Display) -> ProtocolError {
    ProtocolError::Mls(e.to_string())
}

/// The installation key as an openmls signer. It signs with the key as held, expanded once:
/// `SignatureKeyPair` rebuilds the key from its seed for every signature, which doubles the cost
/// of signing a message.
pub fn signer(key: &InstallationKey) -> &InstallationKey {
    key
}

impl openmls_traits::signatures::Signer for InstallationKey {
    fn sign(
        &self,
        payload: &[u8],
    ) -> std::result::Result<Vec<u8>, openmls_traits::signatures::SignerError> {
        Ok(self.sign_raw(payload))
    }

    fn signature_scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

/// XMTP's credential for an inbox.
pub fn credential(inbox_id: &str) -> Credential {
    BasicCredential::new(
        MlsCredential {
            inbox_id: inbox_id.to_string(),
        }
        .encode_to_vec(),
    )
    .into()
}

fn leaf_capabilities() -> Capabilities {
    capabilities_for(CIPHERSUITE)
}

fn capabilities_for(suite: Ciphersuite) -> Capabilities {
    Capabilities::new(
        None,
        Some(&[suite]),
        Some(&[
            ExtensionType::LastResort,
            ExtensionType::ApplicationId,
            ExtensionType::Unknown(EXT_MUTABLE_METADATA),
            ExtensionType::Unknown(EXT_GROUP_MEMBERSHIP),
            ExtensionType::Unknown(EXT_GROUP_PERMISSIONS),
            ExtensionType::Unknown(EXT_IMMUTABLE_METADATA),
            ExtensionType::Unknown(EXT_WELCOME_WRAPPER_ENCRYPTION),
            ExtensionType::Unknown(EXT_WELCOME_POINTEE_AEAD_TYPES),
            // Members can join groups that use app-data updates (libxmtp advertises it).
            ExtensionType::AppDataDictionary,
            // Gatehouse's post-quantum key package (ignored by XMTP clients).
            ExtensionType::Unknown(EXT_PQ_KEY_PACKAGE),
        ]),
        Some(&[
            ProposalType::GroupContextExtensions,
            ProposalType::AppDataUpdate,
        ]),
        None,
    )
}

fn leaf_extensions(inbox_id: &str) -> Result<Extensions<LeafNode>> {
    Extensions::single(Extension::ApplicationId(ApplicationIdExtension::new(
        inbox_id.as_bytes(),
    )))
    .map_err(mls_err)
}

/// A freshly built key package: what to upload, and the X-Wing seed to keep.
pub struct NewKeyPackage {
    /// TLS-serialised `KeyPackage` for `UploadKeyPackage`.
    pub tls: Vec<u8>,
    /// Its `KeyPackageRef`.
    pub reference: Vec<u8>,
    /// The welcome-wrapper (X-Wing) private seed; the public key is in the package.
    pub wrapper_seed: [u8; 32],
}

/// Builds a last-resort key package for an installation; its private keys go to the provider.
pub fn build_key_package(
    provider: &Provider,
    inbox_id: &str,
    key: &InstallationKey,
    rng: &mut impl CryptoRngCore,
) -> Result<NewKeyPackage> {
    let (seed, pk) = crate::xwing::generate(rng);
    let wrapper = mc::WelcomeWrapperEncryption {
        pub_key: pk,
        algorithm: mc::WelcomeWrapperAlgorithm::XwingMlkem768Draft6 as i32,
    };
    let aeads = mc::WelcomePointeeEncryptionAeadTypesExtension {
        supported_aead_types: vec![mc::WelcomePointeeEncryptionAeadType::Chacha20Poly1305 as i32],
    };
    let kp_ext = Extensions::from_vec(vec![
        Extension::LastResort(LastResortExtension::default()),
        Extension::Unknown(
            EXT_WELCOME_POINTEE_AEAD_TYPES,
            UnknownExtension(aeads.encode_to_vec()),
        ),
        Extension::Unknown(
            EXT_WELCOME_WRAPPER_ENCRYPTION,
            UnknownExtension(wrapper.encode_to_vec()),
        ),
    ])
    .map_err(mls_err)?;
    let signer = signer(key);
    // The post-quantum twin: the same installation on the PQ suite, embedded whole so any
    // Gatehouse creator can build a PQ group; its private keys live in the same provider.
    let pq = KeyPackage::builder()
        .leaf_node_capabilities(capabilities_for(PQ_CIPHERSUITE))
        .leaf_node_extensions(leaf_extensions(inbox_id)?)
        .key_package_extensions(
            Extensions::single(Extension::LastResort(LastResortExtension::default()))
                .map_err(mls_err)?,
        )
        .build(
            PQ_CIPHERSUITE,
            provider,
            signer,
            CredentialWithKey {
                credential: credential(inbox_id),
                signature_key: key.public().to_vec().into(),
            },
        )
        .map_err(mls_err)?;
    let mut kp_ext = kp_ext;
    kp_ext
        .add(Extension::Unknown(
            EXT_PQ_KEY_PACKAGE,
            UnknownExtension(pq.key_package().tls_serialize_detached().map_err(mls_err)?),
        ))
        .map_err(mls_err)?;
    let bundle = KeyPackage::builder()
        .leaf_node_capabilities(leaf_capabilities())
        .leaf_node_extensions(leaf_extensions(inbox_id)?)
        .key_package_extensions(kp_ext)
        .build(
            CIPHERSUITE,
            provider,
            signer,
            CredentialWithKey {
                credential: credential(inbox_id),
                signature_key: key.public().to_vec().into(),
            },
        )
        .map_err(mls_err)?;
    let kp = bundle.key_package();
    let reference = kp
        .hash_ref(provider.crypto())
        .map_err(mls_err)?
        .as_slice()
        .to_vec();
    Ok(NewKeyPackage {
        tls: kp.tls_serialize_detached().map_err(mls_err)?,
        reference,
        wrapper_seed: seed,
    })
}

/// What a validated key package says.
#[derive(Debug, Clone)]
pub struct VerifiedKeyPackage {
    /// The inbox id in its credential.
    pub inbox_id: String,
    /// The installation (leaf signature) key.
    pub installation_key: Vec<u8>,
    /// The X-Wing welcome-wrapper public key, if advertised.
    pub wrapper_public_key: Option<Vec<u8>>,
    /// The validated package.
    pub key_package: KeyPackage,
    /// The validated post-quantum twin (same credential and signature key), if advertised.
    pub pq_key_package: Option<KeyPackage>,
}

/// Parses and validates a TLS key package (signature, version, keys) and reads XMTP's fields.
pub fn validate_key_package(provider: &Provider, tls: &[u8]) -> Result<VerifiedKeyPackage> {
    let kp_in = KeyPackageIn::tls_deserialize(&mut &tls[..])
        .map_err(|e| ProtocolError::malformed("KeyPackage", e))?;
    let kp = kp_in
        .validate(provider.crypto(), ProtocolVersion::Mls10)
        .map_err(mls_err)?;
    if kp.ciphersuite() != CIPHERSUITE {
        return Err(ProtocolError::Mls(format!(
            "key package ciphersuite {:?}",
            kp.ciphersuite()
        )));
    }
    let leaf = kp.leaf_node();
    let inbox_id = inbox_of_credential(leaf.credential())?;
    let wrapper_public_key = kp
        .extensions()
        .unknown(EXT_WELCOME_WRAPPER_ENCRYPTION)
        .and_then(|u| mc::WelcomeWrapperEncryption::decode(u.0.as_slice()).ok())
        .filter(|w| w.algorithm == mc::WelcomeWrapperAlgorithm::XwingMlkem768Draft6 as i32)
        .map(|w| w.pub_key);
    // A PQ twin counts only if it validates and speaks for the same installation and inbox.
    let pq_key_package = kp.extensions().unknown(EXT_PQ_KEY_PACKAGE).and_then(|u| {
        let inner = KeyPackageIn::tls_deserialize(&mut u.0.as_slice())
            .ok()?
            .validate(provider.crypto(), ProtocolVersion::Mls10)
            .ok()?;
        let same = inner.ciphersuite() == PQ_CIPHERSUITE
            && inner.leaf_node().signature_key() == leaf.signature_key()
            && inbox_of_credential(inner.leaf_node().credential())
                .ok()
                .as_deref()
                == Some(inbox_id.as_str());
        same.then_some(inner)
    });
    Ok(VerifiedKeyPackage {
        inbox_id,
        installation_key: leaf.signature_key().as_slice().to_vec(),
        wrapper_public_key,
        key_package: kp,
        pq_key_package,
    })
}

/// Reads the inbox id from an XMTP basic credential.
pub fn inbox_of_credential(c: &Credential) -> Result<String> {
    let basic = BasicCredential::try_from(c.clone())
        .map_err(|_| ProtocolError::Mls("credential is not basic".into()))?;
    let mc = MlsCredential::decode(basic.identity())
        .map_err(|e| ProtocolError::malformed("MlsCredential", e))?;
    Ok(mc.inbox_id)
}

/// What kind of conversation to create.
#[derive(Clone, Copy, Debug)]
pub enum Kind<'a> {
    /// A DM with one peer inbox.
    Dm {
        /// The peer's inbox id.
        peer: &'a str,
    },
    /// A group, with libxmtp's default ("all members") policy and the creator as super admin.
    Group {
        /// Its name.
        name: &'a str,
        /// Its description.
        description: &'a str,
    },
    /// XMTP's device-sync group: only the installations of one inbox (consent travels here).
    Sync,
}

/// XMTP's group-context extensions for a new conversation, laid out as libxmtp lays them out
/// (compare the recorded DM A–C and group G1).
fn context_extensions(
    kind: Kind<'_>,
    creator: &str,
    membership: &BTreeMap<String, u64>,
    rng: &mut impl CryptoRngCore,
) -> Result<Extensions<GroupContext>> {
    let metadata = match kind {
        Kind::Dm { peer } => mc::GroupMetadataV1 {
            conversation_type: mc::ConversationType::Dm as i32,
            creator_account_address: String::new(),
            creator_inbox_id: creator.to_string(),
            dm_members: Some(mc::DmMembers {
                dm_member_one: Some(mc::Inbox {
                    inbox_id: creator.to_string(),
                }),
                dm_member_two: Some(mc::Inbox {
                    inbox_id: peer.to_string(),
                }),
            }),
            oneshot_message: None,
        },
        Kind::Sync => mc::GroupMetadataV1 {
            conversation_type: mc::ConversationType::Sync as i32,
            creator_account_address: String::new(),
            creator_inbox_id: creator.to_string(),
            dm_members: None,
            oneshot_message: None,
        },
        Kind::Group { .. } => mc::GroupMetadataV1 {
            conversation_type: mc::ConversationType::Group as i32,
            creator_account_address: String::new(),
            creator_inbox_id: creator.to_string(),
            dm_members: None,
            oneshot_message: None,
        },
    };
    // libxmtp writes the immutable metadata as a TLS opaque<V> around the protobuf.
    let mut immutable = Vec::new();
    crate::tlsread::put_vec(&mut immutable, &metadata.encode_to_vec());
    let mut signer_key = [0u8; 32];
    rng.fill_bytes(&mut signer_key);
    let (name, description, is_group) = match kind {
        Kind::Dm { .. } => ("", "", false),
        Kind::Sync => ("", "", true),
        Kind::Group { name, description } => (name, description, true),
    };
    let mut attributes: Vec<(&str, String)> = vec![
        ("group_name", name.to_string()),
        ("description", description.to_string()),
        ("_commit_log_signer", hex::encode(signer_key)),
        ("group_image_url_square", String::new()),
    ];
    if is_group {
        attributes.push(("app_data", String::new()));
    }
    let mutable = mc::GroupMutableMetadataV1 {
        attributes: attributes
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        admin_list: Some(mc::Inboxes::default()),
        // libxmtp makes a group's creator its super admin; DMs have none.
        super_admin_list: Some(mc::Inboxes {
            inbox_ids: if is_group {
                vec![creator.to_string()]
            } else {
                vec![]
            },
        }),
    };
    let permissions = mc::GroupMutablePermissionsV1 {
        policies: Some(if is_group {
            group_policy()
        } else {
            dm_policy()
        }),
    };
    let members = mc::GroupMembership {
        members: membership.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        failed_installations: vec![],
    };
    let required = RequiredCapabilitiesExtension::new(
        &[
            ExtensionType::Unknown(EXT_GROUP_MEMBERSHIP),
            ExtensionType::Unknown(EXT_MUTABLE_METADATA),
            ExtensionType::Unknown(EXT_GROUP_PERMISSIONS),
            ExtensionType::Unknown(EXT_IMMUTABLE_METADATA),
            ExtensionType::LastResort,
            ExtensionType::ApplicationId,
        ],
        &[ProposalType::GroupContextExtensions],
        &[CredentialType::Basic],
    );
    Extensions::from_vec(vec![
        Extension::Unknown(EXT_IMMUTABLE_METADATA, UnknownExtension(immutable)),
        Extension::Unknown(
            EXT_MUTABLE_METADATA,
            UnknownExtension(mutable.encode_to_vec()),
        ),
        Extension::Unknown(
            EXT_GROUP_PERMISSIONS,
            UnknownExtension(permissions.encode_to_vec()),
        ),
        Extension::RequiredCapabilities(required),
        Extension::Unknown(
            EXT_GROUP_MEMBERSHIP,
            UnknownExtension(members.encode_to_vec()),
        ),
    ])
    .map_err(mls_err)
}

fn metadata_policy(p: mc::metadata_policy::MetadataBasePolicy) -> mc::MetadataPolicy {
    mc::MetadataPolicy {
        kind: Some(mc::metadata_policy::Kind::Base(p as i32)),
    }
}

fn membership_policy(p: mc::membership_policy::BasePolicy) -> mc::MembershipPolicy {
    mc::MembershipPolicy {
        kind: Some(mc::membership_policy::Kind::Base(p as i32)),
    }
}

fn permissions_policy(
    p: mc::permissions_update_policy::PermissionsBasePolicy,
) -> mc::PermissionsUpdatePolicy {
    mc::PermissionsUpdatePolicy {
        kind: Some(mc::permissions_update_policy::Kind::Base(p as i32)),
    }
}

/// libxmtp's DM policy: nobody adds or removes members or changes permissions; metadata is open.
fn dm_policy() -> mc::PolicySet {
    use mc::metadata_policy::MetadataBasePolicy as M;
    let fields = [
        "app_data",
        "description",
        "group_name",
        "minimum_supported_protocol_version",
        "message_disappear_from_ns",
        "message_disappear_in_ns",
        "group_image_url_square",
    ];
    mc::PolicySet {
        add_member_policy: Some(membership_policy(mc::membership_policy::BasePolicy::Deny)),
        remove_member_policy: Some(membership_policy(mc::membership_policy::BasePolicy::Deny)),
        update_metadata_policy: fields
            .iter()
            .map(|f| (f.to_string(), metadata_policy(M::Allow)))
            .collect(),
        add_admin_policy: Some(permissions_policy(
            mc::permissions_update_policy::PermissionsBasePolicy::Deny,
        )),
        remove_admin_policy: Some(permissions_policy(
            mc::permissions_update_policy::PermissionsBasePolicy::Deny,
        )),
        update_permissions_policy: Some(permissions_policy(
            mc::permissions_update_policy::PermissionsBasePolicy::Deny,
        )),
    }
}

/// libxmtp's default group policy ("all members", as recorded in group G1): anyone adds,
/// admins remove, most metadata is open, disappearing settings need an admin, protocol
/// version and admin lists need a super admin.
fn group_policy() -> mc::PolicySet {
    use mc::metadata_policy::MetadataBasePolicy as M;
    use mc::permissions_update_policy::PermissionsBasePolicy as P;
    let fields = [
        ("group_name", M::Allow),
        ("description", M::Allow),
        ("group_image_url_square", M::Allow),
        ("app_data", M::Allow),
        ("message_disappear_from_ns", M::AllowIfAdmin),
        ("message_disappear_in_ns", M::AllowIfAdmin),
        ("minimum_supported_protocol_version", M::AllowIfSuperAdmin),
    ];
    mc::PolicySet {
        add_member_policy: Some(membership_policy(mc::membership_policy::BasePolicy::Allow)),
        remove_member_policy: Some(membership_policy(
            mc::membership_policy::BasePolicy::AllowIfAdminOrSuperAdmin,
        )),
        update_metadata_policy: fields
            .iter()
            .map(|(f, p)| (f.to_string(), metadata_policy(*p)))
            .collect(),
        add_admin_policy: Some(permissions_policy(P::AllowIfSuperAdmin)),
        remove_admin_policy: Some(permissions_policy(P::AllowIfSuperAdmin)),
        update_permissions_policy: Some(permissions_policy(P::AllowIfSuperAdmin)),
    }
}

/// Reads XMTP's mutable metadata (name, admins) from a group.
pub fn mutable_metadata(group: &MlsGroup) -> Result<mc::GroupMutableMetadataV1> {
    let ext = group
        .extensions()
        .unknown(EXT_MUTABLE_METADATA)
        .ok_or_else(|| ProtocolError::Mls("group has no mutable metadata".into()))?;
    mc::GroupMutableMetadataV1::decode(ext.0.as_slice())
        .map_err(|e| ProtocolError::malformed("GroupMutableMetadataV1", e))
}

/// Reads XMTP's permission policies from a group.
pub fn policies(group: &MlsGroup) -> Result<mc::PolicySet> {
    let ext = group
        .extensions()
        .unknown(EXT_GROUP_PERMISSIONS)
        .ok_or_else(|| ProtocolError::Mls("group has no permissions".into()))?;
    mc::GroupMutablePermissionsV1::decode(ext.0.as_slice())
        .map_err(|e| ProtocolError::malformed("GroupMutablePermissionsV1", e))?
        .policies
        .ok_or_else(|| ProtocolError::Mls("group has an empty policy set".into()))
}

/// What a base policy asks of the actor.
#[derive(Clone, Copy)]
enum Need {
    Anyone,
    Nobody,
    Admin,
    SuperAdmin,
}

/// XMTP's three policy trees (membership, metadata, permissions) share one shape: a base
/// policy or an and/any combination.
trait PolicyTree: Sized {
    fn need(&self) -> Option<Need>;
    fn all_of(&self) -> Option<&[Self]>;
    fn any_of(&self) -> Option<&[Self]>;

    fn allows(&self, admin: bool, sup: bool) -> bool {
        if let Some(need) = self.need() {
            return match need {
                Need::Anyone => true,
                Need::Nobody => false,
                Need::Admin => admin || sup,
                Need::SuperAdmin => sup,
            };
        }
        if let Some(all) = self.all_of() {
            return !all.is_empty() && all.iter().all(|p| p.allows(admin, sup));
        }
        self.any_of()
            .is_some_and(|any| any.iter().any(|p| p.allows(admin, sup)))
    }
}

impl PolicyTree for mc::MembershipPolicy {
    fn need(&self) -> Option<Need> {
        use mc::membership_policy::{BasePolicy as B, Kind};
        match &self.kind {
            Some(Kind::Base(b)) => Some(match B::try_from(*b) {
                Ok(B::Allow) => Need::Anyone,
                Ok(B::AllowIfAdminOrSuperAdmin) => Need::Admin,
                Ok(B::AllowIfSuperAdmin) => Need::SuperAdmin,
                _ => Need::Nobody,
            }),
            None => Some(Need::Nobody),
            _ => None,
        }
    }
    fn all_of(&self) -> Option<&[Self]> {
        match &self.kind {
            Some(mc::membership_policy::Kind::AndCondition(c)) => Some(&c.policies),
            _ => None,
        }
    }
    fn any_of(&self) -> Option<&[Self]> {
        match &self.kind {
            Some(mc::membership_policy::Kind::AnyCondition(c)) => Some(&c.policies),
            _ => None,
        }
    }
}

impl PolicyTree for mc::MetadataPolicy {
    fn need(&self) -> Option<Need> {
        use mc::metadata_policy::{Kind, MetadataBasePolicy as B};
        match &self.kind {
            Some(Kind::Base(b)) => Some(match B::try_from(*b) {
                Ok(B::Allow) => Need::Anyone,
                Ok(B::AllowIfAdmin) => Need::Admin,
                Ok(B::AllowIfSuperAdmin) => Need::SuperAdmin,
                _ => Need::Nobody,
            }),
            None => Some(Need::Nobody),
            _ => None,
        }
    }
    fn all_of(&self) -> Option<&[Self]> {
        match &self.kind {
            Some(mc::metadata_policy::Kind::AndCondition(c)) => Some(&c.policies),
            _ => None,
        }
    }
    fn any_of(&self) -> Option<&[Self]> {
        match &self.kind {
            Some(mc::metadata_policy::Kind::AnyCondition(c)) => Some(&c.policies),
            _ => None,
        }
    }
}

impl PolicyTree for mc::PermissionsUpdatePolicy {
    fn need(&self) -> Option<Need> {
        use mc::permissions_update_policy::{Kind, PermissionsBasePolicy as B};
        match &self.kind {
            Some(Kind::Base(b)) => Some(match B::try_from(*b) {
                Ok(B::AllowIfAdmin) => Need::Admin,
                Ok(B::AllowIfSuperAdmin) => Need::SuperAdmin,
                _ => Need::Nobody,
            }),
            None => Some(Need::Nobody),
            _ => None,
        }
    }
    fn all_of(&self) -> Option<&[Self]> {
        match &self.kind {
            Some(mc::permissions_update_policy::Kind::AndCondition(c)) => Some(&c.policies),
            _ => None,
        }
    }
    fn any_of(&self) -> Option<&[Self]> {
        match &self.kind {
            Some(mc::permissions_update_policy::Kind::AnyCondition(c)) => Some(&c.policies),
            _ => None,
        }
    }
}

/// `(is admin, is super admin)` of `actor` per the group's mutable metadata.
fn roles(meta: &mc::GroupMutableMetadataV1, actor: &str) -> (bool, bool) {
    let has = |l: &Option<mc::Inboxes>| {
        l.as_ref()
            .is_some_and(|l| l.inbox_ids.iter().any(|i| i == actor))
    };
    (has(&meta.admin_list), has(&meta.super_admin_list))
}

/// Which membership change a policy is asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MembershipChange {
    /// Adding new member inboxes.
    Add,
    /// Removing member inboxes.
    Remove,
}

/// Whether `actor` may make this membership change under the group's policy (base policies and
/// and/any combinations, with the group's admin and super-admin lists).
pub fn may_change_membership(
    group: &MlsGroup,
    actor: &str,
    change: MembershipChange,
) -> Result<bool> {
    let policies = policies(group)?;
    let (admin, sup) = roles(&mutable_metadata(group)?, actor);
    let policy = match change {
        MembershipChange::Add => policies.add_member_policy,
        MembershipChange::Remove => policies.remove_member_policy,
    };
    Ok(policy.as_ref().is_some_and(|p| p.allows(admin, sup)))
}

/// Checks a commit against the group's membership policy, before it is merged. `added` are
/// the `(inbox, installation)` leaves it adds; `removed_live` the inboxes whose still-live
/// installations it removes (removing revoked installations is maintenance anyone may do).
/// Returns the rule it breaks, if any.
pub fn commit_policy_violation(
    group: &MlsGroup,
    committer: &str,
    added: &[(String, Vec<u8>)],
    removed_live: &[String],
) -> Result<Option<&'static str>> {
    let leaves = leaves(group);
    let adds_member = added
        .iter()
        .any(|(inbox, _)| !leaves.iter().any(|(i, _)| i == inbox));
    if adds_member && !may_change_membership(group, committer, MembershipChange::Add)? {
        return Ok(Some(
            "the group's policy does not let this member add members",
        ));
    }
    let removes_other = removed_live.iter().any(|i| i != committer);
    if removes_other && !may_change_membership(group, committer, MembershipChange::Remove)? {
        return Ok(Some(
            "the group's policy does not let this member remove members",
        ));
    }
    Ok(None)
}

/// A change to a group's mutable metadata or roles.
#[derive(Clone, Debug)]
pub enum MetadataUpdate {
    /// Set an attribute (`group_name`, `description`, `group_image_url_square`, `app_data`, …).
    Attribute(String, String),
    /// Make an inbox an admin.
    AddAdmin(String),
    /// Take admin away from an inbox.
    RemoveAdmin(String),
}

fn with_mutable(
    group: &MlsGroup,
    mutable: &mc::GroupMutableMetadataV1,
) -> Result<Extensions<GroupContext>> {
    let exts: Vec<Extension> = group
        .extensions()
        .iter()
        .map(|e| match e {
            Extension::Unknown(EXT_MUTABLE_METADATA, _) => Extension::Unknown(
                EXT_MUTABLE_METADATA,
                UnknownExtension(mutable.encode_to_vec()),
            ),
            other => other.clone(),
        })
        .collect();
    Extensions::from_vec(exts).map_err(mls_err)
}

/// The group-context extensions after applying `update`.
pub fn updated_extensions(
    group: &MlsGroup,
    update: &MetadataUpdate,
) -> Result<Extensions<GroupContext>> {
    let mut m = mutable_metadata(group)?;
    match update {
        MetadataUpdate::Attribute(k, v) => {
            m.attributes.insert(k.clone(), v.clone());
        }
        MetadataUpdate::AddAdmin(i) => {
            let list = m.admin_list.get_or_insert_with(Default::default);
            if !list.inbox_ids.contains(i) {
                list.inbox_ids.push(i.clone());
            }
        }
        MetadataUpdate::RemoveAdmin(i) => {
            if let Some(list) = m.admin_list.as_mut() {
                list.inbox_ids.retain(|x| x != i);
            }
        }
    }
    with_mutable(group, &m)
}

/// Stages a commit that replaces the group-context extensions (a metadata or role change).
pub fn commit_extensions(
    provider: &Provider,
    key: &InstallationKey,
    group: &mut MlsGroup,
    exts: Extensions<GroupContext>,
) -> Result<MembershipCommit> {
    let signer = signer(key);
    let bundle = group
        .commit_builder()
        .propose_group_context_extensions(exts)
        .map_err(mls_err)?
        .load_psks(provider.storage())
        .map_err(mls_err)?
        .build(provider.rand(), provider.crypto(), signer, |_| true)
        .map_err(mls_err)?
        .stage_commit(provider)
        .map_err(mls_err)?;
    let (commit, _, _) = bundle.into_messages();
    Ok(MembershipCommit {
        commit: commit.tls_serialize_detached().map_err(mls_err)?,
        welcome: None,
    })
}

fn read_mutable(exts: &Extensions<GroupContext>) -> Option<mc::GroupMutableMetadataV1> {
    exts.unknown(EXT_MUTABLE_METADATA)
        .and_then(|u| mc::GroupMutableMetadataV1::decode(u.0.as_slice()).ok())
}

/// Checks new group-context extensions (from a commit) against the group's policies: the
/// immutable metadata must not change; each changed attribute needs its metadata policy;
/// admin-list changes need the add/remove-admin policy; super-admin or permission changes
/// need a super admin. Returns the rule broken, if any.
pub fn extensions_policy_violation(
    group: &MlsGroup,
    committer: &str,
    new: &Extensions<GroupContext>,
) -> Result<Option<String>> {
    let old = group.extensions();
    if old.unknown(EXT_IMMUTABLE_METADATA) != new.unknown(EXT_IMMUTABLE_METADATA) {
        return Ok(Some("the immutable metadata may not change".into()));
    }
    let policies = policies(group)?;
    let before = mutable_metadata(group)?;
    let Some(after) = read_mutable(new) else {
        return Ok(Some("the commit drops the group's metadata".into()));
    };
    let (admin, sup) = roles(&before, committer);
    let perm_ok =
        |p: &Option<mc::PermissionsUpdatePolicy>| p.as_ref().is_some_and(|p| p.allows(admin, sup));
    let keys: std::collections::BTreeSet<&String> = before
        .attributes
        .keys()
        .chain(after.attributes.keys())
        .collect();
    for k in keys {
        // The commit-log signer is rotated by the protocol, not by a user decision.
        if k == "_commit_log_signer" || before.attributes.get(k) == after.attributes.get(k) {
            continue;
        }
        let allowed = policies
            .update_metadata_policy
            .get(k)
            .is_some_and(|p| p.allows(admin, sup));
        if !allowed {
            return Ok(Some(format!(
                "the group's policy does not let this member change {k}"
            )));
        }
    }
    let ids = |l: &Option<mc::Inboxes>| {
        l.as_ref()
            .map(|l| {
                l.inbox_ids
                    .iter()
                    .cloned()
                    .collect::<std::collections::BTreeSet<_>>()
            })
            .unwrap_or_default()
    };
    let (a0, a1) = (ids(&before.admin_list), ids(&after.admin_list));
    if a1.difference(&a0).next().is_some() && !perm_ok(&policies.add_admin_policy) {
        return Ok(Some(
            "the group's policy does not let this member add admins".into(),
        ));
    }
    if a0.difference(&a1).next().is_some() && !perm_ok(&policies.remove_admin_policy) {
        return Ok(Some(
            "the group's policy does not let this member remove admins".into(),
        ));
    }
    let perms_changed = old.unknown(EXT_GROUP_PERMISSIONS) != new.unknown(EXT_GROUP_PERMISSIONS);
    if (ids(&before.super_admin_list) != ids(&after.super_admin_list) || perms_changed)
        && !perm_ok(&policies.update_permissions_policy)
    {
        return Ok(Some(
            "the group's policy does not let this member change permissions or super admins".into(),
        ));
    }
    Ok(None)
}

/// The new group-context extensions a staged commit would install, if it changes them.
pub fn staged_extensions(staged: &StagedCommit) -> Extensions<GroupContext> {
    staged.group_context().extensions().clone()
}

/// Reads XMTP's immutable metadata from a group.
pub fn group_metadata(group: &MlsGroup) -> Result<mc::GroupMetadataV1> {
    let ext = group
        .extensions()
        .unknown(EXT_IMMUTABLE_METADATA)
        .ok_or_else(|| ProtocolError::Mls("group has no XMTP metadata".into()))?;
    let mut r = crate::tlsread::Reader::new(&ext.0, "GroupMetadata");
    mc::GroupMetadataV1::decode(r.vec()?)
        .map_err(|e| ProtocolError::malformed("GroupMetadataV1", e))
}

fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .sender_ratchet_configuration(SenderRatchetConfiguration::new(
            OUT_OF_ORDER_TOLERANCE,
            MAXIMUM_FORWARD_DISTANCE,
        ))
        .use_ratchet_tree_extension(true)
        .build()
}

/// The result of creating a conversation: the group, the commit to publish and the welcome.
pub struct Created {
    /// The new group (already at the post-commit epoch).
    pub group: MlsGroup,
    /// TLS `MlsMessage` of the commit that added the peer.
    pub commit: Vec<u8>,
    /// TLS `MlsMessage` Welcome for every added installation.
    pub welcome: Vec<u8>,
}

/// Creates a DM with `peer`, adding each of the peer's installations (its key packages).
/// `membership` maps both inboxes to their identity-log sequence ids.
pub fn create_dm(
    provider: &Provider,
    key: &InstallationKey,
    creator_inbox: &str,
    peer_inbox: &str,
    peer_key_packages: Vec<KeyPackage>,
    membership: &BTreeMap<String, u64>,
    rng: &mut impl CryptoRngCore,
) -> Result<Created> {
    create(
        provider,
        key,
        creator_inbox,
        Kind::Dm { peer: peer_inbox },
        peer_key_packages,
        membership,
        rng,
        CIPHERSUITE,
    )
}

/// Creates a conversation, on the post-quantum suite when every invitee advertises a PQ twin
/// (and there is at least one), else on XMTP's suite.
pub fn create_best(
    provider: &Provider,
    key: &InstallationKey,
    creator_inbox: &str,
    kind: Kind<'_>,
    invitees: Vec<VerifiedKeyPackage>,
    membership: &BTreeMap<String, u64>,
    rng: &mut impl CryptoRngCore,
) -> Result<Created> {
    let all_pq = !invitees.is_empty() && invitees.iter().all(|v| v.pq_key_package.is_some());
    let (suite, kps) = if all_pq {
        (
            PQ_CIPHERSUITE,
            invitees
                .into_iter()
                .filter_map(|v| v.pq_key_package)
                .collect(),
        )
    } else {
        (
            CIPHERSUITE,
            invitees.into_iter().map(|v| v.key_package).collect(),
        )
    };
    create(
        provider,
        key,
        creator_inbox,
        kind,
        kps,
        membership,
        rng,
        suite,
    )
}

/// The key packages to add `invitees` to `group` with: its own suite's packages (PQ twins for a
/// post-quantum group). Invitees without one are left out, so the group never downgrades.
pub fn key_packages_for(group: &MlsGroup, invitees: Vec<VerifiedKeyPackage>) -> Vec<KeyPackage> {
    let pq = group.ciphersuite() == PQ_CIPHERSUITE;
    invitees
        .into_iter()
        .filter_map(|v| {
            if pq {
                v.pq_key_package
            } else {
                Some(v.key_package)
            }
        })
        .collect()
}

/// Creates a conversation of `kind` on `suite` and adds the installations behind `key_packages`.
// Each argument is a distinct input of one MLS operation; a wrapper struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub fn create(
    provider: &Provider,
    key: &InstallationKey,
    creator_inbox: &str,
    kind: Kind<'_>,
    key_packages: Vec<KeyPackage>,
    membership: &BTreeMap<String, u64>,
    rng: &mut impl CryptoRngCore,
    suite: Ciphersuite,
) -> Result<Created> {
    let mut gid = [0u8; 16];
    rng.fill_bytes(&mut gid);
    let config = MlsGroupCreateConfig::builder()
        .ciphersuite(suite)
        .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .sender_ratchet_configuration(SenderRatchetConfiguration::new(
            OUT_OF_ORDER_TOLERANCE,
            MAXIMUM_FORWARD_DISTANCE,
        ))
        .use_ratchet_tree_extension(true)
        .capabilities(capabilities_for(suite))
        .with_leaf_node_extensions(leaf_extensions(creator_inbox)?)
        .map_err(mls_err)?
        .with_group_context_extensions(context_extensions(kind, creator_inbox, membership, rng)?)
        .build();
    let signer = signer(key);
    let mut group = MlsGroup::new_with_group_id(
        provider,
        signer,
        &config,
        GroupId::from_slice(&gid),
        CredentialWithKey {
            credential: credential(creator_inbox),
            signature_key: key.public().to_vec().into(),
        },
    )
    .map_err(mls_err)?;
    let (commit, welcome, _) = group
        .add_members(provider, signer, &key_packages)
        .map_err(mls_err)?;
    group.merge_pending_commit(provider).map_err(mls_err)?;
    Ok(Created {
        group,
        commit: commit.tls_serialize_detached().map_err(mls_err)?,
        welcome: welcome.tls_serialize_detached().map_err(mls_err)?,
    })
}

/// Joins a group from an unwrapped welcome (`MlsMessage` bytes).
pub fn join(provider: &Provider, welcome_mls: &[u8]) -> Result<MlsGroup> {
    join_replacing(provider, welcome_mls, |_| false)
}

/// [`join`], where `replace_current(group_id)` says whether a welcome may replace a group we
/// are still active in at its epoch or a later one (a forked member being re-added).
pub fn join_replacing(
    provider: &Provider,
    welcome_mls: &[u8],
    replace_current: impl Fn(&[u8]) -> bool,
) -> Result<MlsGroup> {
    let msg = MlsMessageIn::tls_deserialize(&mut &welcome_mls[..])
        .map_err(|e| ProtocolError::malformed("Welcome", e))?;
    let MlsMessageBodyIn::Welcome(welcome) = msg.extract() else {
        return Err(ProtocolError::malformed("Welcome", "not a welcome"));
    };
    // A welcome to a group we already hold (we were removed and re-added) replaces it.
    let staged = StagedWelcome::build_from_welcome(provider, &join_config(), welcome)
        .map_err(mls_err)?
        .replace_old_group()
        .build()
        .map_err(mls_err)?;
    // But a welcome sent again (its sender crashed before it knew the first one had gone
    // out) to a group we are still in, at its epoch or an older one, must not roll it back.
    let context = staged.group_context();
    if !replace_current(context.group_id().as_slice())
        && let Some(held) = load(provider, context.group_id().as_slice())?
        && held.is_active()
        && held.epoch().as_u64() >= context.epoch().as_u64()
    {
        return Err(ProtocolError::Unsupported(format!(
            "a welcome to a conversation this installation is already in (epoch {}, welcome for {})",
            held.epoch().as_u64(),
            context.epoch().as_u64()
        )));
    }
    staged.into_group(provider).map_err(mls_err)
}

/// Encrypts an application plaintext for the group.
pub fn encrypt(
    provider: &Provider,
    key: &InstallationKey,
    group: &mut MlsGroup,
    plaintext: &[u8],
) -> Result<Vec<u8>> {
    let out = group
        .create_message(provider, signer(key), plaintext)
        .map_err(mls_err)?;
    out.tls_serialize_detached().map_err(mls_err)
}

/// What a processed group message was.
#[derive(Debug)]
pub enum Processed {
    /// An application message from `sender_inbox`'s installation `sender_installation`.
    Application {
        /// The sender's inbox id (from its credential).
        sender_inbox: String,
        /// The sender's installation key.
        sender_installation: Vec<u8>,
        /// The decrypted plaintext (a `PlaintextEnvelope`).
        plaintext: Vec<u8>,
    },
    /// A commit from another member, verified by MLS but not yet merged: the caller checks
    /// `new_leaves` (every leaf the commit adds or updates) against the identity logs, then
    /// calls [`merge_commit`] or drops it.
    PendingCommit {
        /// The staged commit.
        staged: Box<StagedCommit>,
        /// `(inbox id, installation key)` of each leaf the commit adds or replaces.
        new_leaves: Vec<(String, Vec<u8>)>,
        /// `(inbox id, installation key)` of each leaf the commit adds (a subset of `new_leaves`).
        added: Vec<(String, Vec<u8>)>,
        /// Installation keys the commit removes.
        removed: Vec<Vec<u8>>,
        /// The committer's inbox id.
        committer: String,
        /// The committer's installation key.
        committer_installation: Vec<u8>,
    },
    /// A proposal was stored; nothing to show.
    Proposal,
    /// One of this installation's own messages came back from the node.
    Own,
}

/// Decrypts and applies one group message (commits are merged at once).
pub fn process(provider: &Provider, group: &mut MlsGroup, mls_message: &[u8]) -> Result<Processed> {
    let msg = MlsMessageIn::tls_deserialize(&mut &mls_message[..])
        .map_err(|e| ProtocolError::malformed("MlsMessage", e))?;
    let pm = msg.try_into_protocol_message().map_err(mls_err)?;
    processed(provider, group, pm)
}

/// [`process`], with the signature of an application message (an encrypted one: its content
/// type is in the clear header, bound to the ciphertext) recorded instead of checked, so that
/// several can be checked in one batch ([`crate::mls_crypto::verify_all`]). **Nothing it
/// returns may be trusted before the check holds**; everything else (commits, proposals) is
/// checked at once, as [`process`] does.
pub fn process_deferring_signature(
    provider: &Provider,
    group: &mut MlsGroup,
    mls_message: &[u8],
) -> (Result<Processed>, Option<crate::mls_crypto::SignatureCheck>) {
    let pm = match MlsMessageIn::tls_deserialize(&mut &mls_message[..])
        .map_err(|e| ProtocolError::malformed("MlsMessage", e))
        .and_then(|m| m.try_into_protocol_message().map_err(mls_err))
    {
        Ok(pm) => pm,
        Err(e) => return (Err(e), None),
    };
    let application = matches!(&pm, ProtocolMessage::PrivateMessage(_))
        && pm.content_type() == ContentType::Application;
    if !application {
        return (processed(provider, group, pm), None);
    }
    let (out, mut checks) = crate::mls_crypto::collecting(|| processed(provider, group, pm));
    match (out, checks.len()) {
        (Ok(p @ Processed::Application { .. }), 1) => (Ok(p), checks.pop()),
        // An application message is signed once; anything else is not trusted.
        (Ok(Processed::Application { .. }), _) => (
            Err(ProtocolError::Mls(
                "an application message without exactly one signature".into(),
            )),
            None,
        ),
        // Not an application message after all: every check done now.
        (out, _) => {
            if checks.iter().all(|c| c.verify()) {
                (out, None)
            } else {
                (
                    Err(ProtocolError::Mls(
                        "the message's signature does not verify".into(),
                    )),
                    None,
                )
            }
        }
    }
}

fn processed(provider: &Provider, group: &mut MlsGroup, pm: ProtocolMessage) -> Result<Processed> {
    let processed = group.process_message(provider, pm).map_err(mls_err)?;
    let sender_installation = processed.credential().clone();
    let sender_inbox = inbox_of_credential(&sender_installation).unwrap_or_default();
    let sender_key = match processed.sender() {
        Sender::Member(idx) => group.member(*idx).map(|_| ()).and_then(|_| {
            group
                .members()
                .find(|m| m.index == *idx)
                .map(|m| m.signature_key.clone())
        }),
        _ => None,
    }
    .unwrap_or_default();
    match processed.into_content() {
        ProcessedMessageContent::ApplicationMessage(a) => Ok(Processed::Application {
            sender_inbox,
            sender_installation: sender_key,
            plaintext: a.into_bytes(),
        }),
        ProcessedMessageContent::StagedCommitMessage(sc) => {
            let mut new_leaves = Vec::new();
            for add in sc.add_proposals() {
                let leaf = add.add_proposal().key_package().leaf_node();
                new_leaves.push((
                    inbox_of_credential(leaf.credential())?,
                    leaf.signature_key().as_slice().to_vec(),
                ));
            }
            let added = new_leaves.clone();
            if let Some(leaf) = sc.update_path_leaf_node() {
                new_leaves.push((
                    inbox_of_credential(leaf.credential())?,
                    leaf.signature_key().as_slice().to_vec(),
                ));
            }
            let removed = sc
                .remove_proposals()
                .filter_map(|r| {
                    group
                        .members()
                        .find(|m| m.index == r.remove_proposal().removed())
                        .map(|m| m.signature_key)
                })
                .collect();
            Ok(Processed::PendingCommit {
                staged: sc,
                new_leaves,
                added,
                removed,
                committer: sender_inbox,
                committer_installation: sender_key,
            })
        }
        ProcessedMessageContent::ProposalMessage(p) => {
            group
                .store_pending_proposal(provider.storage(), *p)
                .map_err(mls_err)?;
            Ok(Processed::Proposal)
        }
        // A message this installation sent, fanned back by the node: it cannot be decrypted by
        // its author and must never be mistaken for someone else's (or for a fork).
        ProcessedMessageContent::OwnPrivateMessage => Ok(Processed::Own),
        ProcessedMessageContent::OwnPendingCommit => Ok(Processed::Own),
        other => Err(ProtocolError::Unsupported(format!(
            "message kind not handled yet: {}",
            match other {
                ProcessedMessageContent::ExternalJoinProposalMessage(_) => "external join proposal",
                _ => "app-data commit",
            }
        ))),
    }
}

/// Merges a commit returned by [`process`] after the caller has checked it.
pub fn merge_commit(provider: &Provider, group: &mut MlsGroup, staged: StagedCommit) -> Result<()> {
    group.merge_staged_commit(provider, staged).map_err(mls_err)
}

/// Whether this installation is still a member (false after a commit removed it).
pub fn is_active(group: &MlsGroup) -> bool {
    group.is_active()
}

/// XMTP's membership extension: inbox id → identity-log sequence id.
pub fn membership(group: &MlsGroup) -> Result<BTreeMap<String, u64>> {
    let ext = group
        .extensions()
        .unknown(EXT_GROUP_MEMBERSHIP)
        .ok_or_else(|| ProtocolError::Mls("group has no membership extension".into()))?;
    let m = mc::GroupMembership::decode(ext.0.as_slice())
        .map_err(|e| ProtocolError::malformed("GroupMembership", e))?;
    Ok(m.members.into_iter().collect())
}

/// What a person sees of a group before a commit (for the transcript).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    members: BTreeMap<String, u64>,
    meta: mc::GroupMutableMetadataV1,
}

/// Captures the membership and metadata the transcript of the next commit is measured from.
pub fn snapshot(group: &MlsGroup) -> Snapshot {
    Snapshot {
        members: membership(group).unwrap_or_default(),
        meta: mutable_metadata(group).unwrap_or_default(),
    }
}

/// XMTP's `GroupUpdated` transcript of a merged commit: inboxes added and removed (those in
/// `left` were removed at their own request), metadata fields changed, admin list changes.
pub fn transcript(
    before: &Snapshot,
    group: &MlsGroup,
    committer: &str,
    left: &[String],
) -> crate::content::GroupUpdated {
    use crate::content::{MetadataFieldChange, UpdatedInbox};
    let after = snapshot(group);
    let inbox = |s: &String| UpdatedInbox {
        inbox_id: s.clone(),
    };
    let diff = |a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>| -> Vec<String> {
        b.keys().filter(|k| !a.contains_key(*k)).cloned().collect()
    };
    let removed = diff(&after.members, &before.members);
    let list = |m: &mc::GroupMutableMetadataV1, admin: bool| -> Vec<String> {
        let l = if admin {
            &m.admin_list
        } else {
            &m.super_admin_list
        };
        l.as_ref().map(|l| l.inbox_ids.clone()).unwrap_or_default()
    };
    let gained = |a: Vec<String>, b: Vec<String>| -> Vec<UpdatedInbox> {
        b.iter().filter(|x| !a.contains(x)).map(inbox).collect()
    };
    let mut keys: Vec<&String> = before
        .meta
        .attributes
        .keys()
        .chain(after.meta.attributes.keys())
        .collect();
    keys.sort();
    keys.dedup();
    let metadata_field_changes = keys
        .into_iter()
        .filter_map(|k| {
            let (old, new) = (before.meta.attributes.get(k), after.meta.attributes.get(k));
            (old != new).then(|| MetadataFieldChange {
                field_name: k.clone(),
                old_value: old.cloned(),
                new_value: new.cloned(),
            })
        })
        .collect();
    crate::content::GroupUpdated {
        initiated_by_inbox_id: committer.to_string(),
        added_inboxes: diff(&before.members, &after.members)
            .iter()
            .map(inbox)
            .collect(),
        removed_inboxes: removed
            .iter()
            .filter(|r| !left.contains(r))
            .map(inbox)
            .collect(),
        left_inboxes: removed
            .iter()
            .filter(|r| left.contains(r))
            .map(inbox)
            .collect(),
        metadata_field_changes,
        added_admin_inboxes: gained(list(&before.meta, true), list(&after.meta, true)),
        removed_admin_inboxes: gained(list(&after.meta, true), list(&before.meta, true)),
        added_super_admin_inboxes: gained(list(&before.meta, false), list(&after.meta, false)),
        removed_super_admin_inboxes: gained(list(&after.meta, false), list(&before.meta, false)),
    }
}

/// A staged membership commit: publish `commit`; once the node has ordered it first, call
/// [`merge_pending`]; if another commit won, [`clear_pending`]. Send `welcome` to added
/// installations only after merging.
pub struct MembershipCommit {
    /// TLS `MlsMessage` of the commit.
    pub commit: Vec<u8>,
    /// TLS `MlsMessage` Welcome, when installations were added.
    pub welcome: Option<Vec<u8>>,
}

/// Stages a commit that adds `adds`, removes the leaves of `remove` (installation keys) and
/// writes `membership` into XMTP's membership extension, as libxmtp does on every membership
/// change.
pub fn commit_membership(
    provider: &Provider,
    key: &InstallationKey,
    group: &mut MlsGroup,
    adds: Vec<KeyPackage>,
    remove: &[Vec<u8>],
    membership: &BTreeMap<String, u64>,
) -> Result<MembershipCommit> {
    let removals: Vec<LeafNodeIndex> = group
        .members()
        .filter(|m| remove.contains(&m.signature_key))
        .map(|m| m.index)
        .collect();
    let members = mc::GroupMembership {
        members: membership.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        failed_installations: vec![],
    };
    let exts: Vec<Extension> = group
        .extensions()
        .iter()
        .map(|e| match e {
            Extension::Unknown(EXT_GROUP_MEMBERSHIP, _) => Extension::Unknown(
                EXT_GROUP_MEMBERSHIP,
                UnknownExtension(members.encode_to_vec()),
            ),
            other => other.clone(),
        })
        .collect();
    let exts = Extensions::from_vec(exts).map_err(mls_err)?;
    let signer = signer(key);
    let bundle = group
        .commit_builder()
        .propose_adds(adds)
        .propose_removals(removals)
        .propose_group_context_extensions(exts)
        .map_err(mls_err)?
        .load_psks(provider.storage())
        .map_err(mls_err)?
        .build(provider.rand(), provider.crypto(), signer, |_| true)
        .map_err(mls_err)?
        .stage_commit(provider)
        .map_err(mls_err)?;
    let (commit, welcome, _) = bundle.into_messages();
    Ok(MembershipCommit {
        commit: commit.tls_serialize_detached().map_err(mls_err)?,
        welcome: welcome
            .map(|w| w.tls_serialize_detached())
            .transpose()
            .map_err(mls_err)?,
    })
}

/// Applies our own staged commit after the node ordered it first.
pub fn merge_pending(provider: &Provider, group: &mut MlsGroup) -> Result<()> {
    group.merge_pending_commit(provider).map_err(mls_err)
}

/// Drops our own staged commit after another commit won the race.
pub fn clear_pending(provider: &Provider, group: &mut MlsGroup) -> Result<()> {
    group
        .clear_pending_commit(provider.storage())
        .map_err(mls_err)
}

/// The leaves of a group: `(inbox id, installation key)` per member.
pub fn leaves(group: &MlsGroup) -> Vec<(String, Vec<u8>)> {
    group
        .members()
        .map(|m| {
            (
                inbox_of_credential(&m.credential).unwrap_or_default(),
                m.signature_key,
            )
        })
        .collect()
}

/// Loads a stored group.
pub fn load(provider: &Provider, group_id: &[u8]) -> Result<Option<MlsGroup>> {
    MlsGroup::load(provider.storage(), &GroupId::from_slice(group_id)).map_err(mls_err)
}

/// Serialises the provider's whole key-value store as one blob (the form earlier versions
/// stored; see [`provider_from_storage`]).
pub fn export_storage(provider: &Provider) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in provider.storage().entries() {
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(&k);
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(&v);
    }
    out
}

/// The entries of an [`export_storage`] blob.
pub fn storage_entries(bytes: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut r = bytes;
    let take = |r: &mut &[u8]| -> Result<Vec<u8>> {
        let bad = || ProtocolError::malformed("stored MLS state", "truncated");
        let len =
            u32::from_be_bytes(r.get(..4).ok_or_else(bad)?.try_into().map_err(|_| bad())?) as usize;
        let v = r.get(4..4 + len).ok_or_else(bad)?.to_vec();
        *r = &r[4 + len..];
        Ok(v)
    };
    let mut out = Vec::new();
    while !r.is_empty() {
        let k = take(&mut r)?;
        let v = take(&mut r)?;
        out.push((k, v));
    }
    Ok(out)
}

/// A provider whose store is restored from `export_storage` bytes.
pub fn provider_from_storage(bytes: &[u8]) -> Result<Provider> {
    Ok(Provider::with_storage(
        crate::mls_store::MlsStore::from_entries(storage_entries(bytes)?),
    ))
}

/// The openmls group type, re-exported so callers need not depend on openmls.
pub type MlsGroupHandle = MlsGroup;

/// A validated MLS key package, re-exported for the same reason.
pub type ValidKeyPackage = KeyPackage;

fn key_package_ref(reference: &[u8]) -> Result<KeyPackageRef> {
    // A KeyPackageRef's wire form is an opaque<V> of the hash.
    let mut tls = Vec::new();
    crate::tlsread::put_vec(&mut tls, reference);
    KeyPackageRef::tls_deserialize(&mut tls.as_slice())
        .map_err(|e| ProtocolError::malformed("KeyPackageRef", e))
}

/// Deletes the private keys of one of our key packages (by `KeyPackageRef`).
pub fn delete_key_package(provider: &Provider, reference: &[u8]) -> Result<()> {
    use openmls_traits::storage::StorageProvider as _;
    provider
        .storage()
        .delete_key_package(&key_package_ref(reference)?)
        .map_err(mls_err)
}

/// Whether the provider holds the private keys of key package `reference`.
pub fn has_key_package(provider: &Provider, reference: &[u8]) -> bool {
    use openmls_traits::storage::StorageProvider as _;
    key_package_ref(reference).is_ok_and(|r| {
        provider
            .storage()
            .key_package::<KeyPackageRef, KeyPackageBundle>(&r)
            .ok()
            .flatten()
            .is_some()
    })
}

/// Deletes a group from the store (after a rejected welcome).
pub fn delete(provider: &Provider, group: &mut MlsGroup) -> Result<()> {
    group.delete(provider.storage()).map_err(mls_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content;

    /// A and B (inboxes `aaaa` and `bbbb`, installation seeds 1 and 2): their providers and
    /// keys, B's key package as A validated it, and the membership of a conversation of two.
    struct Two {
        pa: Provider,
        pb: Provider,
        ka: InstallationKey,
        kb: InstallationKey,
        kp_b: VerifiedKeyPackage,
        membership: BTreeMap<String, u64>,
    }

    fn two() -> Two {
        let (pa, pb) = (Provider::default(), Provider::default());
        let (ka, kb) = (
            InstallationKey::from_seed(&[1; 32]),
            InstallationKey::from_seed(&[2; 32]),
        );
        let kp_b = validate_key_package(
            &pa,
            &build_key_package(&pb, "bbbb", &kb, &mut rand::rngs::OsRng)
                .unwrap()
                .tls,
        )
        .unwrap();
        let membership = [("aaaa".to_string(), 1u64), ("bbbb".to_string(), 2u64)].into();
        Two {
            pa,
            pb,
            ka,
            kb,
            kp_b,
            membership,
        }
    }

    impl Two {
        /// A DM A creates with B, and B's view of it after the welcome.
        fn dm(&self) -> (Created, MlsGroup) {
            let created = create_dm(
                &self.pa,
                &self.ka,
                "aaaa",
                "bbbb",
                vec![self.kp_b.key_package.clone()],
                &self.membership,
                &mut rand::rngs::OsRng,
            )
            .unwrap();
            let gb = join(&self.pb, &created.welcome).unwrap();
            (created, gb)
        }
    }

    /// The installation key signs for openmls exactly as openmls' own Ed25519 key pair does
    /// (same scheme, byte-identical signatures), only without rebuilding the key each time.
    #[test]
    fn signer_matches_openmls_key_pair() {
        use openmls_traits::signatures::Signer as _;
        let key = InstallationKey::from_seed(&[9; 32]);
        let reference = openmls_basic_credential::SignatureKeyPair::from_raw(
            SignatureScheme::ED25519,
            key.seed().to_vec(),
            key.public().to_vec(),
        );
        let ours = signer(&key);
        assert_eq!(ours.signature_scheme(), reference.signature_scheme());
        for payload in [&b""[..], b"MLS 1.0 FramedContentTBS", &[0xab; 1000]] {
            assert_eq!(
                ours.sign(payload).unwrap(),
                reference.sign(payload).unwrap()
            );
        }
    }

    /// A commit that breaks the group's policy is caught by the receiver: in a default group a
    /// non-admin member's commit removing another member is a violation; the creator's is not.
    #[test]
    fn receivers_catch_policy_violations() {
        let mut rng = rand::rngs::OsRng;
        let (pa, pb, pc) = (
            Provider::default(),
            Provider::default(),
            Provider::default(),
        );
        let keys = [
            InstallationKey::from_seed(&[1; 32]),
            InstallationKey::from_seed(&[2; 32]),
            InstallationKey::from_seed(&[3; 32]),
        ];
        let kp = |p: &Provider, inbox: &str, k: &InstallationKey| {
            validate_key_package(
                &pa,
                &build_key_package(p, inbox, k, &mut rand::rngs::OsRng)
                    .unwrap()
                    .tls,
            )
            .unwrap()
        };
        let (kb, kc) = (kp(&pb, "bbbb", &keys[1]), kp(&pc, "cccc", &keys[2]));
        let membership: BTreeMap<String, u64> = [("aaaa", 1u64), ("bbbb", 1), ("cccc", 1)]
            .map(|(k, v)| (k.to_string(), v))
            .into();
        let created = create_best(
            &pa,
            &keys[0],
            "aaaa",
            Kind::Group {
                name: "g",
                description: "",
            },
            vec![kb, kc],
            &membership,
            &mut rng,
        )
        .unwrap();
        let mut gb = join(&pb, &created.welcome).unwrap();
        let mut gc = join(&pc, &created.welcome).unwrap();
        // C (not an admin) removes B.
        let mut without_b = membership.clone();
        without_b.remove("bbbb");
        let staged = commit_membership(
            &pc,
            &keys[2],
            &mut gc,
            vec![],
            &[keys[1].public().to_vec()],
            &without_b,
        )
        .unwrap();
        let mut ga = created.group;
        let Processed::PendingCommit {
            added,
            committer,
            removed,
            ..
        } = process(&pa, &mut ga, &staged.commit).unwrap()
        else {
            panic!("expected a commit")
        };
        assert_eq!(committer, "cccc");
        assert_eq!(removed, vec![keys[1].public().to_vec()]);
        assert_eq!(
            commit_policy_violation(&ga, &committer, &added, &["bbbb".to_string()]).unwrap(),
            Some("the group's policy does not let this member remove members")
        );
        // The same removal by A, the super admin, is within the policy.
        assert_eq!(
            commit_policy_violation(&ga, "aaaa", &added, &["bbbb".to_string()]).unwrap(),
            None
        );
        // Any member may add.
        assert_eq!(
            commit_policy_violation(&gb, "bbbb", &[("dddd".to_string(), vec![9])], &[]).unwrap(),
            None
        );
        // C (not a super admin) makes itself an admin: the receiver refuses it; a rename by
        // any member is within the policy.
        clear_pending(&pc, &mut gc).unwrap();
        let exts = updated_extensions(&gc, &MetadataUpdate::AddAdmin("cccc".into())).unwrap();
        let staged = commit_extensions(&pc, &keys[2], &mut gc, exts).unwrap();
        let Processed::PendingCommit {
            staged: sc,
            committer,
            ..
        } = process(&pb, &mut gb, &staged.commit).unwrap()
        else {
            panic!("expected a commit")
        };
        let rule = extensions_policy_violation(&gb, &committer, &staged_extensions(&sc)).unwrap();
        assert!(rule.unwrap().contains("add admins"));
        let renamed = updated_extensions(
            &ga,
            &MetadataUpdate::Attribute("group_name".into(), "new".into()),
        )
        .unwrap();
        assert_eq!(
            extensions_policy_violation(&ga, "cccc", &renamed).unwrap(),
            None
        );
    }

    /// Gatehouse installations (all with PQ twins) get a post-quantum group; one invitee
    /// without a twin (as an XMTP client's key package) gets XMTP's suite. Both work.
    #[test]
    fn post_quantum_when_everyone_can() {
        let mut rng = rand::rngs::OsRng;
        let Two {
            pa,
            pb,
            ka,
            kp_b,
            membership,
            ..
        } = two();
        assert!(kp_b.pq_key_package.is_some());
        let kind = Kind::Group {
            name: "g",
            description: "",
        };
        let mut pq = create_best(
            &pa,
            &ka,
            "aaaa",
            kind,
            vec![kp_b.clone()],
            &membership,
            &mut rng,
        )
        .unwrap();
        assert_eq!(pq.group.ciphersuite(), PQ_CIPHERSUITE);
        let mut gb = join(&pb, &pq.welcome).unwrap();
        assert_eq!(gb.ciphersuite(), PQ_CIPHERSUITE);
        let ct = encrypt(
            &pa,
            &ka,
            &mut pq.group,
            &content::seal_envelope(&content::text("pq"), "1"),
        )
        .unwrap();
        assert!(matches!(
            process(&pb, &mut gb, &ct).unwrap(),
            Processed::Application { .. }
        ));
        let mut classical_only = kp_b;
        classical_only.pq_key_package = None;
        let xmtp = create_best(
            &pa,
            &ka,
            "aaaa",
            kind,
            vec![classical_only],
            &membership,
            &mut rng,
        )
        .unwrap();
        assert_eq!(xmtp.group.ciphersuite(), CIPHERSUITE);
        assert_eq!(join(&pb, &xmtp.welcome).unwrap().ciphersuite(), CIPHERSUITE);
    }

    /// Two installations make a DM, exchange messages both ways, and state survives a
    /// storage export/import (what the client persists).
    #[test]
    fn dm_round_trip() {
        let t = two();
        assert_eq!(t.kp_b.inbox_id, "bbbb");
        assert_eq!(t.kp_b.installation_key, t.kb.public());
        let (Two { pa, pb, ka, kb, .. }, (mut created, mut gb)) = (&t, t.dm());
        assert_eq!(
            group_metadata(&gb).unwrap().conversation_type,
            mc::ConversationType::Dm as i32
        );
        let ct = encrypt(
            pa,
            ka,
            &mut created.group,
            &content::seal_envelope(&content::text("ping"), "1"),
        )
        .unwrap();
        let Processed::Application {
            sender_inbox,
            plaintext,
            ..
        } = process(pb, &mut gb, &ct).unwrap()
        else {
            panic!()
        };
        assert_eq!(sender_inbox, "aaaa");
        let content::Opened::Content { content, .. } = content::open_envelope(&plaintext).unwrap()
        else {
            panic!()
        };
        assert_eq!(content::display_text(&content).unwrap(), "ping");
        // Restart B from its exported storage and keep talking.
        let pb2 = provider_from_storage(&export_storage(pb)).unwrap();
        let mut gb2 = load(&pb2, gb.group_id().as_slice()).unwrap().unwrap();
        let back = encrypt(
            &pb2,
            kb,
            &mut gb2,
            &content::seal_envelope(&content::text("pong"), "2"),
        )
        .unwrap();
        let Processed::Application { sender_inbox, .. } =
            process(pa, &mut created.group, &back).unwrap()
        else {
            panic!()
        };
        assert_eq!(sender_inbox, "bbbb");
        let h = crate::mls::read_header(&back).unwrap();
        assert_eq!(h.group_id, gb2.group_id().as_slice());
        assert!(!h.is_commit());
    }

    /// A member signing as another (encrypting with its own key under the other's leaf) is
    /// refused: at once by `process`, and by the deferred check — alone or in a batch with
    /// good signatures, which still hold — with `process_deferring_signature`.
    #[test]
    fn a_signature_that_is_not_the_senders_is_refused() {
        use crate::mls_crypto::verify_all;
        let t = two();
        let (Two { pa, pb, ka, .. }, (mut created, mut gb)) = (&t, t.dm());
        let impostor = InstallationKey::from_seed(&[9; 32]);
        let mut sealed = |key: &InstallationKey, text: &str| {
            encrypt(
                pa,
                key,
                &mut created.group,
                &content::seal_envelope(&content::text(text), text),
            )
            .unwrap()
        };
        let (good1, forged, good2, forged_again) = (
            sealed(ka, "1"),
            sealed(&impostor, "2"),
            sealed(ka, "3"),
            sealed(&impostor, "4"),
        );
        assert!(process(pb, &mut gb, &good1).is_ok());
        assert!(process(pb, &mut gb, &forged).is_err(), "refused at once");
        let mut checks = Vec::new();
        for ct in [&good2, &forged_again] {
            let (out, check) = process_deferring_signature(pb, &mut gb, ct);
            assert!(matches!(out, Ok(Processed::Application { .. })));
            checks.push(check.expect("an application message's check"));
        }
        assert_eq!(
            verify_all(&checks.iter().collect::<Vec<_>>()),
            [true, false]
        );
        assert_eq!(verify_all(&[&checks[1]]), [false]);
        assert_eq!(verify_all(&[&checks[0], &checks[0]]), [true, true]);
    }

    /// The store hands out what changed since it was last asked, and only that: after the
    /// setup is taken, a message changes the sender's and the receiver's message secrets and
    /// nothing else; a store rebuilt from the saved entries plus those changes reads on.
    #[test]
    fn store_reports_only_what_changed() {
        let mut rng = rand::rngs::OsRng;
        let Two {
            pa,
            pb,
            ka,
            kp_b,
            membership,
            ..
        } = two();
        let mut created = create_best(
            &pa,
            &ka,
            "aaaa",
            Kind::Dm { peer: "bbbb" },
            vec![kp_b],
            &membership,
            &mut rng,
        )
        .unwrap();
        let mut gb = join(&pb, &created.welcome).unwrap();
        // What a caller saved so far: everything.
        let saved_b: Vec<_> = pb
            .storage()
            .take_changes()
            .into_iter()
            .map(|(k, v)| (k, v.expect("nothing deleted yet")))
            .collect();
        assert_eq!(saved_b.len(), pb.storage().len());
        assert!(pa.storage().take_changes().len() > 3);
        assert!(!pa.storage().has_changes() && !pb.storage().has_changes());

        let ct = encrypt(
            &pa,
            &ka,
            &mut created.group,
            &content::seal_envelope(&content::text("one"), "1"),
        )
        .unwrap();
        process(&pb, &mut gb, &ct).unwrap();
        let label = |k: &[u8]| {
            let end = k.iter().position(|&b| b == b'{').unwrap();
            String::from_utf8_lossy(&k[..end]).into_owned()
        };
        let mut changes_b = Vec::new();
        for p in [&pa, &pb] {
            let changes = p.storage().take_changes();
            let labels: Vec<_> = changes.iter().map(|(k, _)| label(k)).collect();
            assert_eq!(labels, ["MessageSecrets"]);
            changes_b = changes;
        }
        // B restarts from what it saved plus the change: it reads A's next message.
        let mut on_disk: BTreeMap<_, _> = saved_b.into_iter().collect();
        for (k, v) in changes_b {
            on_disk.insert(k, v.expect("changed, not deleted"));
        }
        let pb2 = Provider::with_storage(MlsStore::from_entries(on_disk));
        let mut gb2 = load(&pb2, gb.group_id().as_slice()).unwrap().unwrap();
        let ct = encrypt(
            &pa,
            &ka,
            &mut created.group,
            &content::seal_envelope(&content::text("two"), "2"),
        )
        .unwrap();
        assert!(matches!(
            process(&pb2, &mut gb2, &ct).unwrap(),
            Processed::Application { .. }
        ));
        assert!(pb2.storage().has_changes());
    }

    /// State written as JSON by earlier versions (openmls' own store, then Gatehouse's whole
    /// stored blob) reads with today's store: a conversation goes on across a commit and both
    /// ways, and what is rewritten is rewritten in the binary encoding.
    #[test]
    fn json_state_of_earlier_versions_reads() {
        use crate::mls_store::BINARY;
        let mut rng = rand::rngs::OsRng;
        let pa = Provider::with_storage(MlsStore::writing_json_as_earlier_versions());
        let pb = Provider::default();
        let (ka, kb) = (
            InstallationKey::from_seed(&[1; 32]),
            InstallationKey::from_seed(&[2; 32]),
        );
        let kp_b = validate_key_package(
            &pa,
            &build_key_package(&pb, "bbbb", &kb, &mut rng).unwrap().tls,
        )
        .unwrap();
        let membership = [("aaaa".to_string(), 1u64), ("bbbb".to_string(), 2u64)].into();
        let created = create_best(
            &pa,
            &ka,
            "aaaa",
            Kind::Dm { peer: "bbbb" },
            vec![kp_b],
            &membership,
            &mut rng,
        )
        .unwrap();
        let mut gb = join(&pb, &created.welcome).unwrap();
        let gid = gb.group_id().as_slice().to_vec();
        let old = pa.storage().entries();
        assert!(old.iter().all(|(_, v)| v[0] != BINARY));

        // A restarts on today's store from what the earlier version left.
        let pa = Provider::with_storage(MlsStore::from_entries(old));
        let mut ga = load(&pa, &gid).unwrap().unwrap();
        let exts = updated_extensions(
            &ga,
            &MetadataUpdate::Attribute("group_name".into(), "renamed".into()),
        )
        .unwrap();
        let commit = commit_extensions(&pa, &ka, &mut ga, exts).unwrap();
        merge_pending(&pa, &mut ga).unwrap();
        let Processed::PendingCommit { staged, .. } =
            process(&pb, &mut gb, &commit.commit).unwrap()
        else {
            panic!("not a commit")
        };
        merge_commit(&pb, &mut gb, *staged).unwrap();
        let seal = |t: &str| content::seal_envelope(&content::text(t), t);
        let ct = encrypt(&pa, &ka, &mut ga, &seal("after")).unwrap();
        assert!(matches!(
            process(&pb, &mut gb, &ct).unwrap(),
            Processed::Application { .. }
        ));
        let back = encrypt(&pb, &kb, &mut gb, &seal("back")).unwrap();
        assert!(matches!(
            process(&pa, &mut ga, &back).unwrap(),
            Processed::Application { .. }
        ));
        let secrets: Vec<_> = pa
            .storage()
            .entries()
            .into_iter()
            .filter(|(k, _)| k.starts_with(b"MessageSecrets"))
            .collect();
        assert_eq!(secrets.len(), 1);
        assert_eq!(secrets[0].1[0], BINARY, "rewritten in the binary encoding");
    }
}
