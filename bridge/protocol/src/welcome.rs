//! XMTP's welcome wrapping (libxmtp `829b1f5e`).
//!
//! A welcome travels to each new member as a `WelcomeMessage.V1` whose `data` is a TLS
//! `HPKECiphertext{kem_output, ciphertext}` sealed with HPKE base mode (X-Wing, HKDF-SHA256,
//! ChaCha20-Poly1305), `info` = TLS `EncryptContext{"MLS 1.0 MLS_WELCOME", ""}`, empty aad.
//! The welcome is message 0 of that context and the `WelcomeMetadata` is message 1.
//! Multi-member adds may instead send one `SYMMETRIC_KEY` welcome plus a `WelcomePointer`
//! per member; the pointer (wrapped the same way) carries the ChaCha20-Poly1305 key and nonces.

use gatehouse_wire::Message as _;
use gatehouse_wire::message_contents::{WelcomePointer, welcome_pointer};
use gatehouse_wire::mls_api::WelcomeMetadata;
use rand_core::CryptoRngCore;
use tls_codec::{Deserialize as _, Serialize as _, VLBytes};

use crate::error::{ProtocolError, Result};
use crate::hpke::{self, Context, KEM_XWING};
use crate::xwing;

/// The MLS label of welcome encryption (before openmls's "MLS 1.0 " prefix).
const WELCOME_LABEL: &str = "MLS 1.0 MLS_WELCOME";

fn welcome_info() -> Vec<u8> {
    let mut info = Vec::new();
    // Serialising two in-memory byte vectors cannot fail.
    VLBytes::new(WELCOME_LABEL.as_bytes().to_vec())
        .tls_serialize(&mut info)
        .expect("serialize label");
    VLBytes::new(Vec::new())
        .tls_serialize(&mut info)
        .expect("serialize context");
    info
}

/// A welcome after unwrapping: the inner TLS `MlsMessage` and the metadata.
#[derive(Debug, Clone)]
pub struct Unwrapped {
    /// TLS-serialised `MlsMessage` carrying the MLS `Welcome`.
    pub mls_message: Vec<u8>,
    /// The `WelcomeMetadata` (message cursor), if present.
    pub metadata: Option<WelcomeMetadata>,
}

/// Seals a welcome (and its metadata) to an X-Wing public key.
/// Returns `(data, welcome_metadata)` for `WelcomeMessageInput.V1`.
pub fn wrap(
    mls_message: &[u8],
    metadata: &WelcomeMetadata,
    recipient_pk: &[u8],
    rng: &mut impl CryptoRngCore,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let (ss, kem_output) = xwing::encapsulate(recipient_pk, rng)?;
    let ctx = Context::new(KEM_XWING, &ss, &welcome_info());
    let ct = ctx.seal(0, b"", mls_message);
    let meta = ctx.seal(1, b"", &metadata.encode_to_vec());
    let mut data = Vec::new();
    (VLBytes::new(kem_output), VLBytes::new(ct))
        .tls_serialize(&mut data)
        .map_err(|e| ProtocolError::Internal(e.to_string()))?;
    Ok((data, meta))
}

fn open_context(data: &[u8], seed: &[u8; 32]) -> Result<(Context, Vec<u8>)> {
    let mut r = data;
    let kem_output = VLBytes::tls_deserialize(&mut r)
        .map_err(|e| ProtocolError::malformed("HPKECiphertext", e))?;
    let ct = VLBytes::tls_deserialize(&mut r)
        .map_err(|e| ProtocolError::malformed("HPKECiphertext", e))?;
    let ss = xwing::decapsulate(seed, kem_output.as_slice())?;
    Ok((
        Context::new(KEM_XWING, &ss, &welcome_info()),
        ct.as_slice().to_vec(),
    ))
}

/// Opens an X-Wing wrapped welcome with the recipient's X-Wing seed.
pub fn unwrap(data: &[u8], welcome_metadata: &[u8], seed: &[u8; 32]) -> Result<Unwrapped> {
    let (ctx, ct) = open_context(data, seed)?;
    let mls_message = ctx.open(0, b"", &ct)?;
    let metadata = if welcome_metadata.is_empty() {
        None
    } else {
        let pt = ctx.open(1, b"", welcome_metadata)?;
        Some(
            WelcomeMetadata::decode(pt.as_slice())
                .map_err(|e| ProtocolError::malformed("WelcomeMetadata", e))?,
        )
    };
    Ok(Unwrapped {
        mls_message,
        metadata,
    })
}

/// Opens an X-Wing wrapped `WelcomePointer`.
pub fn unwrap_pointer(data: &[u8], seed: &[u8; 32]) -> Result<welcome_pointer::WelcomeV1Pointer> {
    let (ctx, ct) = open_context(data, seed)?;
    let pt = ctx.open(0, b"", &ct)?;
    let p = WelcomePointer::decode(pt.as_slice())
        .map_err(|e| ProtocolError::malformed("WelcomePointer", e))?;
    match p.version {
        Some(welcome_pointer::Version::WelcomeV1Pointer(v1)) => Ok(v1),
        None => Err(ProtocolError::malformed("WelcomePointer", "no version")),
    }
}

/// Opens a `SYMMETRIC_KEY` welcome with the key and nonces from its pointer.
pub fn unwrap_symmetric(
    data: &[u8],
    welcome_metadata: &[u8],
    pointer: &welcome_pointer::WelcomeV1Pointer,
) -> Result<Unwrapped> {
    let key: [u8; 32] = pointer
        .encryption_key
        .as_slice()
        .try_into()
        .map_err(|_| ProtocolError::malformed("WelcomePointer", "key is not 32 bytes"))?;
    let nonce = |n: &[u8]| -> Result<[u8; 12]> {
        n.try_into()
            .map_err(|_| ProtocolError::malformed("WelcomePointer", "nonce is not 12 bytes"))
    };
    let mls_message = hpke::aead_open(&key, &nonce(&pointer.data_nonce)?, b"", data)?;
    let metadata = if welcome_metadata.is_empty() {
        None
    } else {
        let pt = hpke::aead_open(
            &key,
            &nonce(&pointer.welcome_metadata_nonce)?,
            b"",
            welcome_metadata,
        )?;
        Some(
            WelcomeMetadata::decode(pt.as_slice())
                .map_err(|e| ProtocolError::malformed("WelcomeMetadata", e))?,
        )
    };
    Ok(Unwrapped {
        mls_message,
        metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wrapped welcome opens with the right seed, and its metadata survives.
    #[test]
    fn wrap_unwrap() {
        let mut rng = rand::rngs::OsRng;
        let (seed, pk) = xwing::generate(&mut rng);
        let meta = WelcomeMetadata { message_cursor: 42 };
        let (data, m) = wrap(b"welcome bytes", &meta, &pk, &mut rng).unwrap();
        let u = unwrap(&data, &m, &seed).unwrap();
        assert_eq!(u.mls_message, b"welcome bytes");
        assert_eq!(u.metadata.unwrap().message_cursor, 42);
        let (other, _) = xwing::generate(&mut rng);
        assert!(unwrap(&data, &m, &other).is_err());
    }
}
