//! HPKE (RFC 9180) base mode, just the suites XMTP and Gatehouse use.
//!
//! - Welcome wrapping: KEM X-Wing (0x647a), HKDF-SHA256, ChaCha20-Poly1305. X-Wing's shared
//!   secret enters the key schedule directly (the KEM does its own combining).
//! - MLS group secrets on ciphersuite 3: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
//!   ChaCha20-Poly1305 (only the receiving side, to read recorded welcomes).
//! - MLS on the post-quantum suite: X-Wing, HKDF-SHA256, AES-128-GCM (only the sending side:
//!   the openmls provider encrypts update paths and welcomes with it, see `mls_crypto`).

use aes_gcm::Aes128Gcm;
use chacha20poly1305::aead::{Aead as _, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroize;

use crate::error::{ProtocolError, Result};

/// KEM id of X-Wing in XMTP's HPKE suite.
pub const KEM_XWING: u16 = 0x647a;
/// KEM id of DHKEM(X25519, HKDF-SHA256).
pub const KEM_X25519: u16 = 0x0020;
/// KDF id of HKDF-SHA256.
pub const KDF_HKDF_SHA256: u16 = 0x0001;
/// AEAD id of ChaCha20-Poly1305.
pub const AEAD_CHACHA20POLY1305: u16 = 0x0003;
/// AEAD id of AES-128-GCM.
pub const AEAD_AES128GCM: u16 = 0x0001;

/// The AEADs this HPKE speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aead {
    /// AES-128-GCM (`Nk` = 16).
    Aes128Gcm,
    /// ChaCha20-Poly1305 (`Nk` = 32).
    ChaCha20Poly1305,
}

impl Aead {
    fn id(self) -> u16 {
        match self {
            Aead::Aes128Gcm => AEAD_AES128GCM,
            Aead::ChaCha20Poly1305 => AEAD_CHACHA20POLY1305,
        }
    }

    fn key_len(self) -> usize {
        match self {
            Aead::Aes128Gcm => 16,
            Aead::ChaCha20Poly1305 => 32,
        }
    }
}

fn suite_id(kem: u16, aead: Aead) -> Vec<u8> {
    let mut s = b"HPKE".to_vec();
    s.extend_from_slice(&kem.to_be_bytes());
    s.extend_from_slice(&KDF_HKDF_SHA256.to_be_bytes());
    s.extend_from_slice(&aead.id().to_be_bytes());
    s
}

fn labeled_extract(suite: &[u8], salt: &[u8], label: &[u8], ikm: &[u8]) -> Vec<u8> {
    let mut input = b"HPKE-v1".to_vec();
    input.extend_from_slice(suite);
    input.extend_from_slice(label);
    input.extend_from_slice(ikm);
    let (prk, _) = Hkdf::<Sha256>::extract(Some(salt), &input);
    prk.to_vec()
}

/// HKDF-SHA256 expands to at most 255 blocks of 32 bytes.
const MAX_EXPAND: usize = 255 * 32;

fn labeled_expand(suite: &[u8], prk: &[u8], label: &[u8], info: &[u8], len: usize) -> Vec<u8> {
    assert!(len <= MAX_EXPAND, "HKDF-SHA256 output of {len} bytes");
    let mut full = (len as u16).to_be_bytes().to_vec();
    full.extend_from_slice(b"HPKE-v1");
    full.extend_from_slice(suite);
    full.extend_from_slice(label);
    full.extend_from_slice(info);
    // A PRK from HKDF-SHA256 extract is always 32 bytes.
    let hk = Hkdf::<Sha256>::from_prk(prk).expect("HKDF-SHA256 PRK is 32 bytes");
    let mut out = vec![0u8; len];
    hk.expand(&full, &mut out)
        .expect("output length is within HKDF-SHA256 bounds");
    out
}

/// An HPKE context after the key schedule: seals or opens messages by sequence number, and
/// exports secrets. Its secrets are wiped when it is dropped.
pub struct Context {
    aead: Aead,
    suite: Vec<u8>,
    key: [u8; 32],
    base_nonce: [u8; 12],
    exporter_secret: Vec<u8>,
}

impl Context {
    /// Runs the base-mode key schedule over a KEM shared secret, for ChaCha20-Poly1305.
    pub fn new(kem: u16, shared_secret: &[u8], info: &[u8]) -> Self {
        Self::with_aead(kem, Aead::ChaCha20Poly1305, shared_secret, info)
    }

    /// Runs the base-mode key schedule over a KEM shared secret.
    pub fn with_aead(kem: u16, aead: Aead, shared_secret: &[u8], info: &[u8]) -> Self {
        let suite = suite_id(kem, aead);
        let psk_id_hash = labeled_extract(&suite, b"", b"psk_id_hash", b"");
        let info_hash = labeled_extract(&suite, b"", b"info_hash", info);
        let mut ctx = vec![0u8];
        ctx.extend_from_slice(&psk_id_hash);
        ctx.extend_from_slice(&info_hash);
        let mut secret = labeled_extract(&suite, shared_secret, b"secret", b"");
        let mut key = [0u8; 32];
        let nk = aead.key_len();
        key[..nk].copy_from_slice(&labeled_expand(&suite, &secret, b"key", &ctx, nk));
        let mut base_nonce = [0u8; 12];
        base_nonce.copy_from_slice(&labeled_expand(&suite, &secret, b"base_nonce", &ctx, 12));
        let exporter_secret = labeled_expand(&suite, &secret, b"exp", &ctx, 32);
        secret.zeroize();
        Self {
            aead,
            suite,
            key,
            base_nonce,
            exporter_secret,
        }
    }

    fn nonce(&self, seq: u64) -> [u8; 12] {
        let mut n = self.base_nonce;
        for (i, b) in seq.to_be_bytes().iter().enumerate() {
            n[4 + i] ^= b;
        }
        n
    }

    fn aes(&self) -> Aes128Gcm {
        Aes128Gcm::new(aes_gcm::Key::<Aes128Gcm>::from_slice(&self.key[..16]))
    }

    /// Encrypts `pt` as message number `seq`.
    pub fn seal(&self, seq: u64, aad: &[u8], pt: &[u8]) -> Vec<u8> {
        let nonce = self.nonce(seq);
        match self.aead {
            Aead::ChaCha20Poly1305 => aead_seal(&self.key, &nonce, aad, pt),
            Aead::Aes128Gcm => self
                .aes()
                .encrypt(aes_gcm::Nonce::from_slice(&nonce), Payload { msg: pt, aad })
                .expect("AES-128-GCM encryption of an in-memory buffer cannot fail"),
        }
    }

    /// Decrypts message number `seq`.
    pub fn open(&self, seq: u64, aad: &[u8], ct: &[u8]) -> Result<Vec<u8>> {
        let nonce = self.nonce(seq);
        match self.aead {
            Aead::ChaCha20Poly1305 => aead_open(&self.key, &nonce, aad, ct),
            Aead::Aes128Gcm => self
                .aes()
                .decrypt(aes_gcm::Nonce::from_slice(&nonce), Payload { msg: ct, aad })
                .map_err(|_| ProtocolError::Decrypt("AEAD tag mismatch")),
        }
    }

    /// `Context.Export(exporter_context, len)`: a secret of `len` bytes bound to this context.
    pub fn export(&self, exporter_context: &[u8], len: usize) -> Result<Vec<u8>> {
        if len > MAX_EXPAND {
            return Err(ProtocolError::Internal(format!(
                "HPKE export of {len} bytes (at most {MAX_EXPAND})"
            )));
        }
        Ok(labeled_expand(
            &self.suite,
            &self.exporter_secret,
            b"sec",
            exporter_context,
            len,
        ))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        self.key.zeroize();
        self.base_nonce.zeroize();
        self.exporter_secret.zeroize();
    }
}

/// Base-mode sender setup to an X-Wing public key: the context and the KEM output (`enc`).
/// `m` and `ek_x` are the encapsulation's randomness (see [`crate::xwing::encapsulate_with`]).
pub fn setup_sender_xwing(
    pk_r: &[u8],
    aead: Aead,
    info: &[u8],
    m: [u8; 32],
    ek_x: [u8; 32],
) -> Result<(Context, Vec<u8>)> {
    let (mut ss, enc) = crate::xwing::encapsulate_with(pk_r, m, ek_x)?;
    let ctx = Context::with_aead(KEM_XWING, aead, &ss, info);
    ss.zeroize();
    Ok((ctx, enc))
}

/// ChaCha20-Poly1305 encryption.
pub fn aead_seal(key: &[u8; 32], nonce: &[u8; 12], aad: &[u8], pt: &[u8]) -> Vec<u8> {
    ChaCha20Poly1305::new(Key::from_slice(key))
        .encrypt(Nonce::from_slice(nonce), Payload { msg: pt, aad })
        .expect("ChaCha20-Poly1305 encryption of an in-memory buffer cannot fail")
}

/// ChaCha20-Poly1305 decryption.
pub fn aead_open(key: &[u8; 32], nonce: &[u8; 12], aad: &[u8], ct: &[u8]) -> Result<Vec<u8>> {
    ChaCha20Poly1305::new(Key::from_slice(key))
        .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
        .map_err(|_| ProtocolError::Decrypt("AEAD tag mismatch"))
}

/// DHKEM(X25519, HKDF-SHA256) decapsulation (RFC 9180 §4.1).
pub fn dhkem_x25519_decap(sk: &[u8; 32], enc: &[u8]) -> Result<[u8; 32]> {
    use x25519_dalek::{PublicKey, StaticSecret};
    let enc: [u8; 32] = enc
        .try_into()
        .map_err(|_| ProtocolError::malformed("DHKEM ciphertext", "not 32 bytes"))?;
    let sk = StaticSecret::from(*sk);
    let pk_r = PublicKey::from(&sk);
    let dh = sk.diffie_hellman(&PublicKey::from(enc));
    let mut kem_suite = b"KEM".to_vec();
    kem_suite.extend_from_slice(&KEM_X25519.to_be_bytes());
    let eae_prk = labeled_extract(&kem_suite, b"", b"eae_prk", dh.as_bytes());
    let mut kem_context = enc.to_vec();
    kem_context.extend_from_slice(pk_r.as_bytes());
    let ss = labeled_expand(&kem_suite, &eae_prk, b"shared_secret", &kem_context, 32);
    let mut out = [0u8; 32];
    out.copy_from_slice(&ss);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 9180 Appendix A.2.1 (DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20Poly1305,
    /// base mode): decapsulation, key schedule and the first sealed message match the RFC.
    #[test]
    fn rfc9180_a21_base_mode() {
        let sk_r: [u8; 32] =
            hex::decode("8057991eef8f1f1af18f4a9491d16a1ce333f695d4db8e38da75975c4478e0fb")
                .unwrap()
                .try_into()
                .unwrap();
        let enc = hex::decode("1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a")
            .unwrap();
        let ss = dhkem_x25519_decap(&sk_r, &enc).unwrap();
        assert_eq!(
            hex::encode(ss),
            "0bbe78490412b4bbea4812666f7916932b828bba79942424abb65244930d69a7"
        );
        let info = hex::decode("4f6465206f6e2061204772656369616e2055726e").unwrap();
        let ctx = Context::new(KEM_X25519, &ss, &info);
        assert_eq!(
            hex::encode(ctx.key),
            "ad2744de8e17f4ebba575b3f5f5a8fa1f69c2a07f6e7500bc60ca6e3e3ec1c91"
        );
        assert_eq!(hex::encode(ctx.base_nonce), "5c4d98150661b848853b547f");
        let aad = hex::decode("436f756e742d30").unwrap();
        let pt = hex::decode("4265617574792069732074727574682c20747275746820626561757479").unwrap();
        assert_eq!(
            hex::encode(ctx.seal(0, &aad, &pt)),
            "1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db21993c62ce81883d2dd1b51a28"
        );
    }

    /// RFC 9180 Appendix A.1.1 (DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, base
    /// mode): the key schedule from the shared secret, the first two sealed messages (and back)
    /// and the exported secrets match the RFC.
    #[test]
    fn rfc9180_a11_base_mode_aes128gcm() {
        let ss = hex::decode("fe0e18c9f024ce43799ae393c7e8fe8fce9d218875e8227b0187c04e7d2ea1fc")
            .unwrap();
        let info = hex::decode("4f6465206f6e2061204772656369616e2055726e").unwrap();
        let ctx = Context::with_aead(KEM_X25519, Aead::Aes128Gcm, &ss, &info);
        assert_eq!(
            hex::encode(&ctx.key[..16]),
            "4531685d41d65f03dc48f6b8302c05b0"
        );
        assert_eq!(hex::encode(ctx.base_nonce), "56d890e5accaaf011cff4b7d");
        assert_eq!(
            hex::encode(&ctx.exporter_secret),
            "45ff1c2e220db587171952c0592d5f5ebe103f1561a2614e38f2ffd47e99e3f8"
        );
        let pt = hex::decode("4265617574792069732074727574682c20747275746820626561757479").unwrap();
        let ct0 = ctx.seal(0, b"Count-0", &pt);
        assert_eq!(
            hex::encode(&ct0),
            "f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a96d8770ac83d07bea87e13c512a"
        );
        assert_eq!(ctx.open(0, b"Count-0", &ct0).unwrap(), pt);
        assert!(ctx.open(1, b"Count-0", &ct0).is_err());
        assert!(ctx.open(0, b"Count-1", &ct0).is_err());
        assert_eq!(
            hex::encode(ctx.export(b"", 32).unwrap()),
            "3853fe2b4035195a573ffc53856e77058e15d9ea064de3e59f4961d0095250ee"
        );
        assert!(ctx.export(b"", MAX_EXPAND + 1).is_err());
    }
}
