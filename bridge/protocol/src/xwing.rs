//! X-Wing hybrid KEM (draft-connolly-cfrg-xwing-kem-06): ML-KEM-768 (FIPS 203) + X25519.
//!
//! XMTP wraps welcomes with it (`WELCOME_WRAPPER_ALGORITHM_XWING_MLKEM_768_DRAFT_6`). The private
//! key is the 32-byte seed; SHAKE256(seed, 96) expands to ML-KEM's `d ‖ z` and the X25519 secret.

use ml_kem::ml_kem_768::{Ciphertext, DecapsulationKey, EncapsulationKey};
use ml_kem::{B32, Decapsulate, KeyExport, Seed};
use rand_core::CryptoRngCore;
use sha3::digest::{ExtendableOutput, Update, XofReader};
use sha3::{Digest, Sha3_256, Shake256};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::error::{ProtocolError, Result};

/// The X-Wing label, `\.//^\`, the combiner's domain separator.
const LABEL: &[u8; 6] = b"\\.//^\\";
/// Size of an encoded ML-KEM-768 encapsulation key.
const MLKEM_PK: usize = 1184;
/// Size of an ML-KEM-768 ciphertext.
const MLKEM_CT: usize = 1088;
/// Size of an X-Wing public key (ML-KEM-768 key ‖ X25519 key).
pub const PUBLIC_KEY_LEN: usize = MLKEM_PK + 32;
/// Size of an X-Wing ciphertext (ML-KEM-768 ciphertext ‖ X25519 ephemeral key).
pub const CIPHERTEXT_LEN: usize = MLKEM_CT + 32;
/// Size of the private key (a seed).
pub const SECRET_KEY_LEN: usize = 32;

struct Expanded {
    dk: DecapsulationKey,
    sk_x: StaticSecret,
    pk_x: PublicKey,
}

fn expand(seed: &[u8; SECRET_KEY_LEN]) -> Expanded {
    let mut xof = Shake256::default();
    xof.update(seed);
    let mut reader = xof.finalize_xof();
    let mut expanded = [0u8; 96];
    reader.read(&mut expanded);
    // FIPS 203 ML-KEM.KeyGen_internal(d, z) with d ‖ z = expanded[0..64].
    let dk = DecapsulationKey::from_seed(Seed::try_from(&expanded[0..64]).expect("64-byte seed"));
    let mut sk = [0u8; 32];
    sk.copy_from_slice(&expanded[64..96]);
    let sk_x = StaticSecret::from(sk);
    let pk_x = PublicKey::from(&sk_x);
    Expanded { dk, sk_x, pk_x }
}

fn combine(ss_m: &[u8], ss_x: &[u8], ct_x: &[u8], pk_x: &[u8]) -> [u8; 32] {
    let mut h = Sha3_256::new();
    Digest::update(&mut h, ss_m);
    Digest::update(&mut h, ss_x);
    Digest::update(&mut h, ct_x);
    Digest::update(&mut h, pk_x);
    Digest::update(&mut h, LABEL);
    h.finalize().into()
}

/// The public key that belongs to a seed.
pub fn public_key(seed: &[u8; SECRET_KEY_LEN]) -> Vec<u8> {
    let e = expand(seed);
    let mut pk = e.dk.encapsulation_key().to_bytes().to_vec();
    pk.extend_from_slice(e.pk_x.as_bytes());
    pk
}

/// A fresh key pair: `(seed, public key)`.
pub fn generate(rng: &mut impl CryptoRngCore) -> ([u8; SECRET_KEY_LEN], Vec<u8>) {
    let mut seed = [0u8; SECRET_KEY_LEN];
    rng.fill_bytes(&mut seed);
    let pk = public_key(&seed);
    (seed, pk)
}

/// Encapsulates to `pk`: returns `(shared secret, ciphertext)`.
pub fn encapsulate(pk: &[u8], rng: &mut impl CryptoRngCore) -> Result<([u8; 32], Vec<u8>)> {
    if pk.len() != PUBLIC_KEY_LEN {
        return Err(ProtocolError::malformed(
            "X-Wing public key",
            format!("{} bytes, expected {PUBLIC_KEY_LEN}", pk.len()),
        ));
    }
    let encoded = ml_kem::Key::<EncapsulationKey>::try_from(&pk[..MLKEM_PK])
        .map_err(|_| ProtocolError::malformed("X-Wing public key", "ML-KEM part"))?;
    let ek = EncapsulationKey::new(&encoded).map_err(|_| {
        ProtocolError::malformed("X-Wing public key", "ML-KEM key fails validation")
    })?;
    let mut pk_x = [0u8; 32];
    pk_x.copy_from_slice(&pk[MLKEM_PK..]);
    let mut m = B32::default();
    rng.fill_bytes(&mut m);
    let (ct_m, ss_m) = ek.encapsulate_deterministic(&m);
    let mut ek_x = [0u8; 32];
    rng.fill_bytes(&mut ek_x);
    let ek_x = StaticSecret::from(ek_x);
    let ct_x = PublicKey::from(&ek_x);
    let ss_x = ek_x.diffie_hellman(&PublicKey::from(pk_x));
    let ss = combine(&ss_m, ss_x.as_bytes(), ct_x.as_bytes(), &pk_x);
    let mut ct = ct_m.to_vec();
    ct.extend_from_slice(ct_x.as_bytes());
    Ok((ss, ct))
}

/// Decapsulates `ct` with the seed `sk`.
pub fn decapsulate(sk: &[u8; SECRET_KEY_LEN], ct: &[u8]) -> Result<[u8; 32]> {
    if ct.len() != CIPHERTEXT_LEN {
        return Err(ProtocolError::malformed(
            "X-Wing ciphertext",
            format!("{} bytes, expected {CIPHERTEXT_LEN}", ct.len()),
        ));
    }
    let e = expand(sk);
    let ct_m = Ciphertext::try_from(&ct[..MLKEM_CT])
        .map_err(|_| ProtocolError::malformed("X-Wing ciphertext", "ML-KEM part"))?;
    let ss_m = e.dk.decapsulate(&ct_m);
    let mut ct_x = [0u8; 32];
    ct_x.copy_from_slice(&ct[MLKEM_CT..]);
    let ss_x = e.sk_x.diffie_hellman(&PublicKey::from(ct_x));
    Ok(combine(&ss_m, ss_x.as_bytes(), &ct_x, e.pk_x.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encapsulation and decapsulation agree, and a different key disagrees.
    #[test]
    fn round_trip() {
        let mut rng = rand::rngs::OsRng;
        let (sk, pk) = generate(&mut rng);
        assert_eq!(pk.len(), PUBLIC_KEY_LEN);
        let (ss, ct) = encapsulate(&pk, &mut rng).unwrap();
        assert_eq!(ct.len(), CIPHERTEXT_LEN);
        assert_eq!(decapsulate(&sk, &ct).unwrap(), ss);
        let (other, _) = generate(&mut rng);
        assert_ne!(decapsulate(&other, &ct).unwrap(), ss);
    }
}
