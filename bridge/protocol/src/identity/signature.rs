//! Signers and signature verification, one kind per identifier type.
//!
//! - Ethereum wallets: ERC-191 `personal_sign`, address recovered from the signature;
//!   malformed recovery bytes and high-s (malleable) signatures are refused.
//! - Installations: Ed25519ph with XMTP's context `IDENTITY UPDATE SIGNATURE`.
//! - Passkeys: WebAuthn P-256 assertions whose challenge is the base64url signature text.
//! - Smart-contract wallets (ERC-1271/6492): recognised, and refused with "needs a chain RPC".
//!
//! Adding a kind means a new `SignatureKind`, a new arm in [`verify`], and a new `Member`
//! variant; the other kinds are untouched.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use gatehouse_wire::associations as pb;
use k256::ecdsa::{
    RecoveryId, Signature as EcdsaSignature, SigningKey as EcdsaKey,
    VerifyingKey as EcdsaVerifyingKey,
};
use sha2::{Digest, Sha256, Sha512};
use sha3::Keccak256;

use super::Member;
use super::error::SignatureError;

/// Ed25519ph context for installation-key signatures over identity updates (libxmtp
/// `INSTALLATION_KEY_SIGNATURE_CONTEXT`; changing it breaks every signature).
pub const INSTALLATION_KEY_SIGNATURE_CONTEXT: &[u8] = b"IDENTITY UPDATE SIGNATURE";

/// The kind of a verified signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureKind {
    /// ERC-191 from an externally owned account.
    Erc191,
    /// ERC-1271 from a smart-contract wallet.
    Erc1271,
    /// An installation key.
    InstallationKey,
    /// A WebAuthn P-256 passkey.
    P256,
}

impl SignatureKind {
    /// Its name in errors.
    pub fn name(self) -> &'static str {
        match self {
            SignatureKind::Erc191 => "erc-191",
            SignatureKind::Erc1271 => "erc-1271",
            SignatureKind::InstallationKey => "installation-key",
            SignatureKind::P256 => "p256",
        }
    }

    /// Whether this kind of signature may speak for a member of `role`'s kind.
    pub fn allowed_for(self, role: &Member) -> bool {
        matches!(
            (role, self),
            (
                Member::Ethereum(_),
                SignatureKind::Erc191 | SignatureKind::Erc1271
            ) | (Member::Installation(_), SignatureKind::InstallationKey)
                | (Member::Passkey(_), SignatureKind::P256)
        )
    }
}

/// A signature that verified: who signed, how, and the key under which it counts as used.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The signer.
    pub signer: Member,
    /// Its kind.
    pub kind: SignatureKind,
    /// Canonical bytes: two encodings of one signature give one replay key.
    pub replay_key: Vec<u8>,
}

/// Verifies any XMTP signature over `text`.
pub fn verify(text: &str, sig: &pb::Signature) -> Result<Verified, SignatureError> {
    use pb::signature::Signature as S;
    match sig
        .signature
        .as_ref()
        .ok_or(SignatureError::Missing("any"))?
    {
        S::Erc191(s) => {
            let (address, replay_key) = recover_erc191(text, &s.bytes)?;
            Ok(Verified {
                signer: Member::Ethereum(address),
                kind: SignatureKind::Erc191,
                replay_key,
            })
        }
        S::InstallationKey(s) => {
            verify_installation(text, &s.bytes, &s.public_key)?;
            Ok(Verified {
                signer: Member::Installation(s.public_key.clone()),
                kind: SignatureKind::InstallationKey,
                replay_key: s.bytes.clone(),
            })
        }
        S::Passkey(p) => {
            let replay_key = verify_passkey(
                text,
                &p.public_key,
                &p.signature,
                &p.authenticator_data,
                &p.client_data_json,
            )?;
            Ok(Verified {
                signer: Member::Passkey(p.public_key.clone()),
                kind: SignatureKind::P256,
                replay_key,
            })
        }
        S::Erc6492(_) => Err(SignatureError::NeedsChainRpc),
        S::DelegatedErc191(_) => Err(SignatureError::Unsupported(
            "legacy delegated (XMTP v2) signatures",
        )),
    }
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
    pub fn from_bytes(sk: &[u8]) -> crate::error::Result<Self> {
        EcdsaKey::from_slice(sk)
            .map(Wallet)
            .map_err(|_| crate::ProtocolError::malformed("wallet key", "not a secp256k1 scalar"))
    }

    /// The private key bytes (for backup by the owner; never log them).
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes().into()
    }

    /// The lowercase `0x` Ethereum address.
    pub fn address(&self) -> String {
        address_of(self.0.verifying_key())
    }

    /// ERC-191 `personal_sign`: 65 bytes `r ‖ s ‖ v` with low `s` and `v` in {27, 28}.
    pub fn sign_text(&self, text: &str) -> Vec<u8> {
        // Signing a 32-byte prehash with a valid key cannot fail; k256 emits low-s signatures.
        let (sig, recid) = self
            .0
            .sign_prehash_recoverable(&eip191_hash(text))
            .expect("secp256k1 prehash signing");
        let mut out = sig.to_bytes().to_vec();
        out.push(27 + recid.to_byte());
        out
    }

    /// The wire signature.
    pub fn signature(&self, text: &str) -> pb::Signature {
        pb::Signature {
            signature: Some(pb::signature::Signature::Erc191(
                pb::RecoverableEcdsaSignature {
                    bytes: self.sign_text(text),
                },
            )),
        }
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

/// Recovers the signer of an ERC-191 signature: `(address, replay key = r ‖ s ‖ parity)`.
pub fn recover_erc191(text: &str, sig: &[u8]) -> Result<(String, Vec<u8>), SignatureError> {
    let bytes: [u8; 65] = sig.try_into().map_err(|_| SignatureError::Malformed {
        kind: "erc-191",
        detail: format!("{} bytes, expected 65", sig.len()),
    })?;
    let parity = match bytes[64] {
        0 | 27 => 0u8,
        1 | 28 => 1u8,
        other => return Err(SignatureError::BadRecoveryByte(other)),
    };
    let signature =
        EcdsaSignature::from_slice(&bytes[..64]).map_err(|_| SignatureError::Malformed {
            kind: "erc-191",
            detail: "r or s out of range".into(),
        })?;
    if signature.normalize_s().is_some() {
        // Refused rather than normalised: a second encoding of one signature is malleability.
        return Err(SignatureError::HighS);
    }
    let recid = RecoveryId::from_byte(parity).ok_or(SignatureError::BadRecoveryByte(bytes[64]))?;
    let vk = EcdsaVerifyingKey::recover_from_prehash(&eip191_hash(text), &signature, recid)
        .map_err(|_| SignatureError::Invalid("erc-191"))?;
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
        self.sign_prehashed(prehash, INSTALLATION_KEY_SIGNATURE_CONTEXT)
            .to_vec()
    }

    /// Ed25519ph with the given context over a SHA-512 prehash. Panics only on a context
    /// longer than 255 bytes (callers pass constants).
    pub fn sign_prehashed(&self, prehash: Sha512, context: &[u8]) -> [u8; 64] {
        self.0
            .sign_prehashed(prehash, Some(context))
            .expect("Ed25519ph context is short")
            .to_bytes()
    }

    /// A plain Ed25519 signature (as MLS uses it).
    pub fn sign_raw(&self, msg: &[u8]) -> Vec<u8> {
        self.0.sign(msg).to_bytes().to_vec()
    }

    /// The wire signature.
    pub fn signature(&self, text: &str) -> pb::Signature {
        pb::Signature {
            signature: Some(pb::signature::Signature::InstallationKey(
                pb::RecoverableEd25519Signature {
                    bytes: self.sign_text(text),
                    public_key: self.public().to_vec(),
                },
            )),
        }
    }
}

/// Verifies an installation-key signature over a text.
pub fn verify_installation(text: &str, sig: &[u8], public: &[u8]) -> Result<(), SignatureError> {
    let pk: [u8; 32] = public.try_into().map_err(|_| SignatureError::Malformed {
        kind: "installation-key",
        detail: "public key is not 32 bytes".into(),
    })?;
    let vk = VerifyingKey::from_bytes(&pk).map_err(|_| SignatureError::Malformed {
        kind: "installation-key",
        detail: "public key is not a curve point".into(),
    })?;
    let sig = ed25519_dalek::Signature::from_slice(sig).map_err(|_| SignatureError::Malformed {
        kind: "installation-key",
        detail: "not 64 bytes".into(),
    })?;
    let mut prehash = Sha512::new();
    prehash.update(text.as_bytes());
    vk.verify_prehashed_strict(prehash, Some(INSTALLATION_KEY_SIGNATURE_CONTEXT), &sig)
        .map_err(|_| SignatureError::Invalid("installation-key"))
}

#[derive(serde::Deserialize)]
struct ClientData {
    challenge: String,
}

/// Verifies a WebAuthn P-256 assertion as XMTP does: the client data's challenge is the
/// base64url (unpadded) signature text, and the DER signature covers
/// `authenticator_data ‖ SHA-256(client_data_json)`. Returns the replay key (`r ‖ low-s`).
pub fn verify_passkey(
    text: &str,
    public_key: &[u8],
    der: &[u8],
    authenticator_data: &[u8],
    client_data_json: &[u8],
) -> Result<Vec<u8>, SignatureError> {
    use p256::ecdsa::signature::Verifier as _;
    let cd: ClientData =
        serde_json::from_slice(client_data_json).map_err(|_| SignatureError::Malformed {
            kind: "passkey",
            detail: "client data is not JSON".into(),
        })?;
    if cd.challenge != URL_SAFE_NO_PAD.encode(text) {
        return Err(SignatureError::PasskeyChallenge);
    }
    let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(public_key).map_err(|_| {
        SignatureError::Malformed {
            kind: "passkey",
            detail: "public key".into(),
        }
    })?;
    let sig = p256::ecdsa::Signature::from_der(der).map_err(|_| SignatureError::Malformed {
        kind: "passkey",
        detail: "signature is not DER".into(),
    })?;
    let mut data = authenticator_data.to_vec();
    data.extend_from_slice(&Sha256::digest(client_data_json));
    vk.verify(&data, &sig)
        .map_err(|_| SignatureError::Invalid("passkey"))?;
    Ok(sig.normalize_s().unwrap_or(sig).to_bytes().to_vec())
}

/// A software passkey (a P-256 key acting as a WebAuthn authenticator), for agents without
/// hardware authenticators and for tests.
#[derive(Clone)]
pub struct SoftPasskey {
    key: p256::ecdsa::SigningKey,
    origin: String,
}

impl fmt::Debug for SoftPasskey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SoftPasskey({})", hex::encode(self.public()))
    }
}

impl SoftPasskey {
    /// From a 32-byte P-256 scalar and the relying party's origin.
    pub fn from_bytes(sk: &[u8], origin: &str) -> crate::error::Result<Self> {
        let key = p256::ecdsa::SigningKey::from_slice(sk)
            .map_err(|_| crate::ProtocolError::malformed("passkey", "not a P-256 scalar"))?;
        Ok(Self {
            key,
            origin: origin.to_string(),
        })
    }

    /// The private scalar (secret; never log it).
    pub fn to_bytes(&self) -> [u8; 32] {
        self.key.to_bytes().into()
    }

    /// The relying party's origin.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The SEC1 (compressed) public key: the passkey's identifier.
    pub fn public(&self) -> Vec<u8> {
        self.key
            .verifying_key()
            .to_encoded_point(true)
            .as_bytes()
            .to_vec()
    }

    /// A WebAuthn assertion over the text, as the wire signature.
    pub fn signature(&self, text: &str) -> pb::Signature {
        use p256::ecdsa::signature::Signer as _;
        let client_data = serde_json::json!({"type": "webauthn.get", "challenge": URL_SAFE_NO_PAD.encode(text), "origin": self.origin}).to_string();
        // rpIdHash ‖ flags (user present + verified) ‖ sign counter 0.
        let mut authenticator_data = Sha256::digest(self.origin.as_bytes()).to_vec();
        authenticator_data.push(0x05);
        authenticator_data.extend_from_slice(&[0, 0, 0, 0]);
        let mut data = authenticator_data.clone();
        data.extend_from_slice(&Sha256::digest(client_data.as_bytes()));
        let sig: p256::ecdsa::Signature = self.key.sign(&data);
        pb::Signature {
            signature: Some(pb::signature::Signature::Passkey(
                pb::RecoverablePasskeySignature {
                    public_key: self.public(),
                    signature: sig.to_der().as_bytes().to_vec(),
                    authenticator_data,
                    client_data_json: client_data.into_bytes(),
                },
            )),
        }
    }
}
