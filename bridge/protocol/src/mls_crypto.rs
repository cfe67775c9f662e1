//! openmls' crypto provider: RustCrypto, keeping the decoded Ed25519 keys of the signers it
//! checks.
//!
//! RustCrypto decodes the signer's public key (a point decompression, a field square root) for
//! every signature it verifies; an installation checks the same few peers' signatures on every
//! message. Everything else is RustCrypto's own, unchanged.

use std::collections::HashMap;
use std::sync::Mutex;

use openmls_rust_crypto::RustCrypto;
use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::types::{
    AeadType, Ciphersuite, CryptoError, ExporterSecret, HashType, HpkeCiphertext, HpkeConfig,
    HpkeKeyPair, KemOutput, SignatureScheme,
};
use tls_codec::SecretVLBytes;

/// Decoded signer keys kept at most (the cache starts over when full).
const KEYS_KEPT: usize = 4096;

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
        key.verify_strict(data, &ed25519_dalek::Signature::from(signature))
            .map_err(|_| CryptoError::InvalidSignature)
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
        self.inner.hpke_seal(config, pk_r, info, aad, ptxt)
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
}
