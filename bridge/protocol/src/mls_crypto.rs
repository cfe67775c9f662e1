//! openmls' crypto provider: RustCrypto, keeping the decoded Ed25519 keys of the signers it
//! checks, and encrypting to X-Wing keys with Gatehouse's own HPKE.
//!
//! RustCrypto decodes the signer's public key (a point decompression, a field square root) for
//! every signature it verifies; an installation checks the same few peers' signatures on every
//! message. HPKE's sending side on the PQ suite (X-Wing, HKDF-SHA256, AES-128-GCM) is
//! `crate::hpke` over `crate::xwing`, whose ML-KEM is libcrux's: an update path encrypts to
//! every member of a copath node's resolution, ≈ 1,000 X-Wing encapsulations to add a member to
//! a fresh 1,000-member group. Everything else, receiving included, is RustCrypto's own.

use std::collections::HashMap;
use std::sync::Mutex;

use openmls_rust_crypto::RustCrypto;
use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::random::OpenMlsRand;
use openmls_traits::types::{
    AeadType, Ciphersuite, CryptoError, ExporterSecret, HashType, HpkeAeadType, HpkeCiphertext,
    HpkeConfig, HpkeKdfType, HpkeKemType, HpkeKeyPair, KemOutput, SignatureScheme,
};
use tls_codec::SecretVLBytes;
use zeroize::Zeroize;

use crate::hpke;

/// Decoded signer keys kept at most (the cache starts over when full).
const KEYS_KEPT: usize = 4096;

std::thread_local! {
    /// While set ([`collecting`]), Ed25519 checks are recorded here instead of done.
    static COLLECTED: std::cell::RefCell<Option<Vec<SignatureCheck>>> =
        const { std::cell::RefCell::new(None) };
}

/// An Ed25519 signature check recorded to be done later, with others ([`verify_all`]).
#[derive(Clone)]
pub struct SignatureCheck {
    key: ed25519_dalek::VerifyingKey,
    data: Vec<u8>,
    signature: ed25519_dalek::Signature,
}

impl std::fmt::Debug for SignatureCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignatureCheck").finish_non_exhaustive()
    }
}

impl SignatureCheck {
    /// Whether it holds, as `verify_strict` answers.
    pub fn verify(&self) -> bool {
        self.key.verify_strict(&self.data, &self.signature).is_ok()
    }
}

/// Whether each check holds. When they all do, one batch says so (ed25519-dalek's
/// `verify_batch`: about half the cost per signature from 8 on); otherwise each is checked
/// with `verify_strict`, so a bad one is found and the others still count. Weak keys were
/// refused when the checks were recorded.
pub fn verify_all(checks: &[&SignatureCheck]) -> Vec<bool> {
    if checks.len() >= 2 {
        let data: Vec<&[u8]> = checks.iter().map(|c| c.data.as_slice()).collect();
        let signatures: Vec<_> = checks.iter().map(|c| c.signature).collect();
        let keys: Vec<_> = checks.iter().map(|c| c.key).collect();
        if ed25519_dalek::verify_batch(&data, &signatures, &keys).is_ok() {
            return vec![true; checks.len()];
        }
    }
    checks.iter().map(|c| c.verify()).collect()
}

/// Runs `f` with the Ed25519 checks it asks for recorded instead of done (they answer
/// "valid"): the caller must verify what is returned before it trusts anything `f` produced.
pub(crate) fn collecting<R>(f: impl FnOnce() -> R) -> (R, Vec<SignatureCheck>) {
    struct Stop;
    impl Drop for Stop {
        fn drop(&mut self) {
            COLLECTED.with(|c| c.borrow_mut().take());
        }
    }
    COLLECTED.with(|c| *c.borrow_mut() = Some(Vec::new()));
    let stop = Stop;
    let out = f();
    let checks = COLLECTED
        .with(|c| c.borrow_mut().take())
        .unwrap_or_default();
    drop(stop);
    (out, checks)
}

/// RustCrypto with the decoded Ed25519 signer keys kept.
#[derive(Debug, Default)]
pub struct Crypto {
    inner: RustCrypto,
    keys: Mutex<HashMap<[u8; 32], ed25519_dalek::VerifyingKey>>,
}

impl Crypto {
    /// The RustCrypto underneath (also the randomness provider).
    pub fn rust_crypto(&self) -> &RustCrypto {
        &self.inner
    }

    fn ed25519_key(&self, pk: &[u8]) -> Result<ed25519_dalek::VerifyingKey, CryptoError> {
        let bytes: [u8; 32] = pk.try_into().map_err(|_| CryptoError::CryptoLibraryError)?;
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = keys.get(&bytes) {
            return Ok(*k);
        }
        let k = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map_err(|_| CryptoError::CryptoLibraryError)?;
        if keys.len() >= KEYS_KEPT {
            keys.clear();
        }
        keys.insert(bytes, k);
        Ok(k)
    }

    /// HPKE base-mode sender setup to an X-Wing key, if `config` is one this crate's HPKE
    /// speaks (`None`: leave it to RustCrypto).
    fn xwing_sender(
        &self,
        config: &HpkeConfig,
        pk_r: &[u8],
        info: &[u8],
    ) -> Option<Result<(hpke::Context, Vec<u8>), CryptoError>> {
        let aead = match config {
            HpkeConfig(HpkeKemType::XWingKemDraft6, HpkeKdfType::HkdfSha256, aead) => match aead {
                HpkeAeadType::AesGcm128 => hpke::Aead::Aes128Gcm,
                HpkeAeadType::ChaCha20Poly1305 => hpke::Aead::ChaCha20Poly1305,
                _ => return None,
            },
            _ => return None,
        };
        let randomness = self
            .inner
            .random_array::<64>()
            .map_err(|_| CryptoError::InsufficientRandomness);
        Some(randomness.and_then(|mut r| {
            let (m, ek_x) = r.split_at(32);
            let setup = hpke::setup_sender_xwing(
                pk_r,
                aead,
                info,
                m.try_into().expect("32 bytes"),
                ek_x.try_into().expect("32 bytes"),
            )
            .map_err(|_| CryptoError::InvalidLength);
            r.zeroize();
            setup
        }))
    }
}

impl OpenMlsCrypto for Crypto {
    fn supports(&self, ciphersuite: Ciphersuite) -> Result<(), CryptoError> {
        self.inner.supports(ciphersuite)
    }

    fn supported_ciphersuites(&self) -> Vec<Ciphersuite> {
        self.inner.supported_ciphersuites()
    }

    fn hkdf_extract(
        &self,
        hash_type: HashType,
        salt: &[u8],
        ikm: &[u8],
    ) -> Result<SecretVLBytes, CryptoError> {
        self.inner.hkdf_extract(hash_type, salt, ikm)
    }

    fn hmac(
        &self,
        hash_type: HashType,
        key: &[u8],
        message: &[u8],
    ) -> Result<SecretVLBytes, CryptoError> {
        self.inner.hmac(hash_type, key, message)
    }

    fn hkdf_expand(
        &self,
        hash_type: HashType,
        prk: &[u8],
        info: &[u8],
        okm_len: usize,
    ) -> Result<SecretVLBytes, CryptoError> {
        self.inner.hkdf_expand(hash_type, prk, info, okm_len)
    }

    fn hash(&self, hash_type: HashType, data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.inner.hash(hash_type, data)
    }

    fn aead_encrypt(
        &self,
        alg: AeadType,
        key: &[u8],
        data: &[u8],
        nonce: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.inner.aead_encrypt(alg, key, data, nonce, aad)
    }

    fn aead_decrypt(
        &self,
        alg: AeadType,
        key: &[u8],
        ct_tag: &[u8],
        nonce: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.inner.aead_decrypt(alg, key, ct_tag, nonce, aad)
    }

    fn signature_key_gen(&self, alg: SignatureScheme) -> Result<(Vec<u8>, Vec<u8>), CryptoError> {
        self.inner.signature_key_gen(alg)
    }

    /// Ed25519 as RustCrypto checks it (`verify_strict`), with the signer's key decoded once.
    fn verify_signature(
        &self,
        alg: SignatureScheme,
        data: &[u8],
        pk: &[u8],
        signature: &[u8],
    ) -> Result<(), CryptoError> {
        if alg != SignatureScheme::ED25519 {
            return self.inner.verify_signature(alg, data, pk, signature);
        }
        let key = self.ed25519_key(pk)?;
        let signature: [u8; ed25519_dalek::SIGNATURE_LENGTH] = signature
            .try_into()
            .map_err(|_| CryptoError::CryptoLibraryError)?;
        let signature = ed25519_dalek::Signature::from(signature);
        let recorded = COLLECTED.with(|c| match c.borrow_mut().as_mut() {
            // A weak (small-order) key is refused at once, as `verify_strict` refuses it.
            Some(_) if key.is_weak() => Some(Err(CryptoError::InvalidSignature)),
            Some(list) => {
                list.push(SignatureCheck {
                    key,
                    data: data.to_vec(),
                    signature,
                });
                Some(Ok(()))
            }
            None => None,
        });
        match recorded {
            Some(answer) => answer,
            None => key
                .verify_strict(data, &signature)
                .map_err(|_| CryptoError::InvalidSignature),
        }
    }

    fn sign(&self, alg: SignatureScheme, data: &[u8], key: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.inner.sign(alg, data, key)
    }

    fn hpke_seal(
        &self,
        config: HpkeConfig,
        pk_r: &[u8],
        info: &[u8],
        aad: &[u8],
        ptxt: &[u8],
    ) -> Result<HpkeCiphertext, CryptoError> {
        match self.xwing_sender(&config, pk_r, info) {
            Some(setup) => {
                let (ctx, enc) = setup?;
                Ok(HpkeCiphertext {
                    kem_output: enc.into(),
                    ciphertext: ctx.seal(0, aad, ptxt).into(),
                })
            }
            None => self.inner.hpke_seal(config, pk_r, info, aad, ptxt),
        }
    }

    fn hpke_open(
        &self,
        config: HpkeConfig,
        input: &HpkeCiphertext,
        sk_r: &[u8],
        info: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.inner.hpke_open(config, input, sk_r, info, aad)
    }

    fn hpke_setup_sender_and_export(
        &self,
        config: HpkeConfig,
        pk_r: &[u8],
        info: &[u8],
        exporter_context: &[u8],
        exporter_length: usize,
    ) -> Result<(KemOutput, ExporterSecret), CryptoError> {
        if let Some(setup) = self.xwing_sender(&config, pk_r, info) {
            let (ctx, enc) = setup.map_err(|_| CryptoError::SenderSetupError)?;
            let secret = ctx
                .export(exporter_context, exporter_length)
                .map_err(|_| CryptoError::ExporterError)?;
            return Ok((enc, secret.into()));
        }
        self.inner.hpke_setup_sender_and_export(
            config,
            pk_r,
            info,
            exporter_context,
            exporter_length,
        )
    }

    fn hpke_setup_receiver_and_export(
        &self,
        config: HpkeConfig,
        enc: &[u8],
        sk_r: &[u8],
        info: &[u8],
        exporter_context: &[u8],
        exporter_length: usize,
    ) -> Result<ExporterSecret, CryptoError> {
        self.inner.hpke_setup_receiver_and_export(
            config,
            enc,
            sk_r,
            info,
            exporter_context,
            exporter_length,
        )
    }

    fn derive_hpke_keypair(
        &self,
        config: HpkeConfig,
        ikm: &[u8],
    ) -> Result<HpkeKeyPair, CryptoError> {
        self.inner.derive_hpke_keypair(config, ikm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Signer as _;

    /// A key decoded once and kept still rejects what it must: another message, a changed
    /// signature, another key's signature; and accepts the genuine one again.
    #[test]
    fn kept_keys_check_like_fresh_ones() {
        let crypto = Crypto::default();
        let sk = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let other = ed25519_dalek::SigningKey::from_bytes(&[8; 32]);
        let pk = sk.verifying_key().to_bytes();
        let sig = sk.sign(b"hello").to_bytes();
        let verify = |data: &[u8], pk: &[u8], sig: &[u8]| {
            crypto.verify_signature(SignatureScheme::ED25519, data, pk, sig)
        };
        for _ in 0..2 {
            verify(b"hello", &pk, &sig).unwrap();
            assert_eq!(
                verify(b"hellO", &pk, &sig),
                Err(CryptoError::InvalidSignature)
            );
            let mut bad = sig;
            bad[40] ^= 1;
            assert_eq!(
                verify(b"hello", &pk, &bad),
                Err(CryptoError::InvalidSignature)
            );
            let theirs = other.sign(b"hello").to_bytes();
            assert_eq!(
                verify(b"hello", &pk, &theirs),
                Err(CryptoError::InvalidSignature)
            );
        }
        assert_eq!(crypto.keys.lock().unwrap().len(), 1);
        // The same verdicts as RustCrypto's.
        let rust = RustCrypto::default();
        assert!(
            rust.verify_signature(SignatureScheme::ED25519, b"hello", &pk, &sig)
                .is_ok()
        );
        assert_eq!(
            verify(b"hello", &pk[..31], &sig),
            Err(CryptoError::CryptoLibraryError)
        );
        assert_eq!(
            verify(b"hello", &pk, &sig[..63]),
            Err(CryptoError::CryptoLibraryError)
        );
    }

    /// What this provider seals to an X-Wing key, RustCrypto (every receiver's side, ours
    /// included) opens, on both AEADs and with the PQ suite's own config; the exported secret is
    /// the receiver's; a changed ciphertext, AAD or info does not open; a malformed key is an
    /// error; other KEMs still go to RustCrypto.
    #[test]
    fn xwing_sealing_opens_with_rustcrypto() {
        let crypto = Crypto::default();
        let rust = RustCrypto::default();
        let pq = crate::group::PQ_CIPHERSUITE.hpke_config();
        assert_eq!(
            (pq.0, pq.1, pq.2),
            (
                HpkeKemType::XWingKemDraft6,
                HpkeKdfType::HkdfSha256,
                HpkeAeadType::AesGcm128
            )
        );
        for aead in [HpkeAeadType::AesGcm128, HpkeAeadType::ChaCha20Poly1305] {
            let config = || HpkeConfig(HpkeKemType::XWingKemDraft6, HpkeKdfType::HkdfSha256, aead);
            for i in 0..8u8 {
                let kp = rust.derive_hpke_keypair(config(), &[i; 32]).unwrap();
                let pt = vec![i; 32 + usize::from(i)];
                let sealed = crypto
                    .hpke_seal(config(), &kp.public, b"info", b"aad", &pt)
                    .unwrap();
                let opened = rust
                    .hpke_open(config(), &sealed, &kp.private, b"info", b"aad")
                    .unwrap();
                assert_eq!(opened, pt);
                for (info, aad) in [(&b"infO"[..], &b"aad"[..]), (b"info", b"aaD")] {
                    assert!(
                        rust.hpke_open(config(), &sealed, &kp.private, info, aad)
                            .is_err()
                    );
                }
                let mut bad = sealed.clone();
                let mut ct = bad.ciphertext.as_slice().to_vec();
                ct[0] ^= 1;
                bad.ciphertext = ct.into();
                assert!(
                    rust.hpke_open(config(), &bad, &kp.private, b"info", b"aad")
                        .is_err()
                );
                let (enc, secret) = crypto
                    .hpke_setup_sender_and_export(config(), &kp.public, b"info", b"ctx", 32)
                    .unwrap();
                let theirs = rust
                    .hpke_setup_receiver_and_export(
                        config(),
                        &enc,
                        &kp.private,
                        b"info",
                        b"ctx",
                        32,
                    )
                    .unwrap();
                assert_eq!(&*secret, &*theirs);
            }
            let kp = rust.derive_hpke_keypair(config(), &[9; 32]).unwrap();
            assert_eq!(
                crypto
                    .hpke_seal(config(), &kp.public[1..], b"", b"", b"x")
                    .unwrap_err(),
                CryptoError::InvalidLength
            );
            assert_eq!(
                crypto
                    .hpke_setup_sender_and_export(config(), &kp.public[1..], b"", b"", 32)
                    .unwrap_err(),
                CryptoError::SenderSetupError
            );
        }
        let config = || crate::group::CIPHERSUITE.hpke_config();
        let kp = rust.derive_hpke_keypair(config(), &[1; 32]).unwrap();
        let sealed = crypto
            .hpke_seal(config(), &kp.public, b"", b"", b"x")
            .unwrap();
        assert_eq!(sealed.kem_output.as_slice().len(), 32);
        assert_eq!(
            rust.hpke_open(config(), &sealed, &kp.private, b"", b"")
                .unwrap(),
            b"x"
        );
    }
}
