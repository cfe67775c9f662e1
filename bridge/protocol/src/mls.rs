//! XMTP's MLS conventions on openmls.
//!
//! XMTP uses ciphersuite 3 (`MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519`), a basic
//! credential whose identity is the protobuf `MlsCredential{inbox_id}`, the installation key as
//! the leaf signature key, and private-use extensions for its metadata. This module also reads
//! the clear parts of MLS messages that the node needs (group id, epoch, content type) and
//! opens recorded welcomes far enough to name their group.

use hkdf::Hkdf;
use sha2::Sha256;

use crate::error::{ProtocolError, Result};
use crate::hpke;
use crate::tlsread::{Reader, put_vec};

/// XMTP's classical ciphersuite id.
pub const CIPHERSUITE_XMTP: u16 = 0x0003;
/// XMTP's immutable group metadata (`GroupMetadataV1`), in the group context.
pub const EXT_IMMUTABLE_METADATA: u16 = 0xf000;
/// `GroupMutableMetadataV1`.
pub const EXT_MUTABLE_METADATA: u16 = 0xff00;
/// `GroupMembership`: inbox id → identity-log sequence id.
pub const EXT_GROUP_MEMBERSHIP: u16 = 0xff01;
/// `GroupMutablePermissionsV1`.
pub const EXT_GROUP_PERMISSIONS: u16 = 0xff02;
/// Key-package extension: the post-quantum welcome wrapper key (`WelcomeWrapperEncryption`).
pub const EXT_WELCOME_WRAPPER_ENCRYPTION: u16 = 0xff03;
/// Key-package extension: AEADs accepted for welcome pointees.
pub const EXT_WELCOME_POINTEE_AEAD_TYPES: u16 = 0xff04;
/// Proposal-support extension.
pub const EXT_PROPOSAL_SUPPORT: u16 = 0xff05;

/// MLS wire formats.
pub mod wire_format {
    /// PublicMessage.
    pub const PUBLIC: u16 = 1;
    /// PrivateMessage.
    pub const PRIVATE: u16 = 2;
    /// Welcome.
    pub const WELCOME: u16 = 3;
    /// GroupInfo.
    pub const GROUP_INFO: u16 = 4;
    /// KeyPackage.
    pub const KEY_PACKAGE: u16 = 5;
}

/// The clear header of a group message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageHeader {
    /// Wire format (1 public, 2 private).
    pub wire_format: u16,
    /// The MLS group id.
    pub group_id: Vec<u8>,
    /// The epoch it was sent in.
    pub epoch: u64,
    /// Content type: 1 application, 2 proposal, 3 commit.
    pub content_type: u8,
}

impl MessageHeader {
    /// Whether this message is a commit.
    pub fn is_commit(&self) -> bool {
        self.content_type == 3
    }
}

/// Reads the unencrypted header of a group `MlsMessage` (Public or PrivateMessage).
pub fn read_header(mls_message: &[u8]) -> Result<MessageHeader> {
    let mut r = Reader::new(mls_message, "MlsMessage");
    let version = r.u16()?;
    if version != 1 {
        return Err(ProtocolError::malformed(
            "MlsMessage",
            format!("version {version}"),
        ));
    }
    let wire_format = r.u16()?;
    match wire_format {
        wire_format::PRIVATE => {
            let group_id = r.vec()?.to_vec();
            let epoch = r.u64()?;
            let content_type = r.u8()?;
            Ok(MessageHeader {
                wire_format,
                group_id,
                epoch,
                content_type,
            })
        }
        wire_format::PUBLIC => {
            let group_id = r.vec()?.to_vec();
            let epoch = r.u64()?;
            // Sender: type + body.
            let sender_type = r.u8()?;
            match sender_type {
                1 | 2 => {
                    r.u32()?;
                }
                3 | 4 => {}
                _ => return Err(ProtocolError::malformed("PublicMessage", "sender type")),
            }
            r.vec()?; // authenticated_data
            let content_type = r.u8()?;
            Ok(MessageHeader {
                wire_format,
                group_id,
                epoch,
                content_type,
            })
        }
        other => Err(ProtocolError::malformed(
            "group message",
            format!("wire format {other}"),
        )),
    }
}

fn expand_with_label(secret: &[u8], label: &str, context: &[u8], len: usize) -> Result<Vec<u8>> {
    let mut info = (len as u16).to_be_bytes().to_vec();
    put_vec(&mut info, format!("MLS 1.0 {label}").as_bytes());
    put_vec(&mut info, context);
    let hk = Hkdf::<Sha256>::from_prk(secret)
        .map_err(|_| ProtocolError::malformed("MLS secret", "length"))?;
    let mut out = vec![0u8; len];
    hk.expand(&info, &mut out)
        .map_err(|_| ProtocolError::Internal("HKDF expand length".into()))?;
    Ok(out)
}

/// An MLS extension: type and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawExtension {
    /// Extension type.
    pub ext_type: u16,
    /// Extension data.
    pub data: Vec<u8>,
}

fn read_extensions(r: &mut Reader<'_>) -> Result<Vec<RawExtension>> {
    let mut inner = Reader::new(r.vec()?, "extensions");
    let mut out = Vec::new();
    loop {
        let rest = inner.rest();
        if rest.is_empty() {
            break;
        }
        let mut e = Reader::new(rest, "extension");
        let ext_type = e.u16()?;
        let data = e.vec()?.to_vec();
        out.push(RawExtension { ext_type, data });
        inner = Reader::new(e.rest(), "extensions");
    }
    Ok(out)
}

/// What a welcome's `GroupInfo` says about the group.
#[derive(Debug, Clone)]
pub struct GroupInfoSummary {
    /// The MLS group id.
    pub group_id: Vec<u8>,
    /// The epoch the new member joins at.
    pub epoch: u64,
    /// The group's ciphersuite.
    pub ciphersuite: u16,
    /// The group-context extensions.
    pub context_extensions: Vec<RawExtension>,
    /// The GroupInfo's own extensions (ratchet tree, external pub).
    pub info_extensions: Vec<RawExtension>,
}

/// Opens a TLS `MlsMessage` carrying a `Welcome` far enough to read its `GroupInfo`, acting as
/// the key package `key_package_ref` whose HPKE init private key is `init_private`
/// (ciphersuite 3 only). This does not validate the group; joining does.
pub fn read_welcome(
    mls_message: &[u8],
    key_package_ref: &[u8],
    init_private: &[u8; 32],
) -> Result<GroupInfoSummary> {
    let mut r = Reader::new(mls_message, "Welcome");
    let _version = r.u16()?;
    let wf = r.u16()?;
    if wf != wire_format::WELCOME {
        return Err(ProtocolError::malformed(
            "Welcome",
            format!("wire format {wf}"),
        ));
    }
    let suite = r.u16()?;
    if suite != CIPHERSUITE_XMTP {
        return Err(ProtocolError::Unsupported(format!(
            "welcome on ciphersuite {suite:#06x}"
        )));
    }
    let secrets = r.vec()?;
    let encrypted_group_info = r.vec()?;
    let mut s = Reader::new(secrets, "EncryptedGroupSecrets");
    let mut mine = None;
    loop {
        let rest = s.rest();
        if rest.is_empty() {
            break;
        }
        let mut e = Reader::new(rest, "EncryptedGroupSecrets");
        let new_member = e.vec()?;
        let kem_output = e.vec()?;
        let ct = e.vec()?;
        if new_member == key_package_ref {
            mine = Some((kem_output, ct));
        }
        s = Reader::new(e.rest(), "EncryptedGroupSecrets");
    }
    let (kem_output, ct) = mine
        .ok_or_else(|| ProtocolError::Mls("welcome has no secrets for this key package".into()))?;
    let ss = hpke::dhkem_x25519_decap(init_private, kem_output)?;
    let mut info = Vec::new();
    put_vec(&mut info, b"MLS 1.0 Welcome");
    put_vec(&mut info, encrypted_group_info);
    let group_secrets = hpke::Context::new(hpke::KEM_X25519, &ss, &info).open(0, b"", ct)?;
    let joiner_secret = Reader::new(&group_secrets, "GroupSecrets").vec()?.to_vec();
    let (intermediate, _) = Hkdf::<Sha256>::extract(Some(&joiner_secret), &[0u8; 32]);
    let welcome_secret = expand_with_label(&intermediate, "welcome", b"", 32)?;
    let key: [u8; 32] = expand_with_label(&welcome_secret, "key", b"", 32)?
        .try_into()
        .map_err(|_| ProtocolError::Internal("key length".into()))?;
    let nonce: [u8; 12] = expand_with_label(&welcome_secret, "nonce", b"", 12)?
        .try_into()
        .map_err(|_| ProtocolError::Internal("nonce length".into()))?;
    let group_info = hpke::aead_open(&key, &nonce, b"", encrypted_group_info)?;
    let mut g = Reader::new(&group_info, "GroupInfo");
    let _v = g.u16()?;
    let ciphersuite = g.u16()?;
    let group_id = g.vec()?.to_vec();
    let epoch = g.u64()?;
    g.vec()?; // tree hash
    g.vec()?; // confirmed transcript hash
    let context_extensions = read_extensions(&mut g)?;
    let info_extensions = read_extensions(&mut g)?;
    Ok(GroupInfoSummary {
        group_id,
        epoch,
        ciphersuite,
        context_extensions,
        info_extensions,
    })
}
