//! X-Wing hybrid KEM (draft-connolly-cfrg-xwing-kem-06): ML-KEM-768 (FIPS 203) + X25519.
//!
//! XMTP wraps welcomes with it (`WELCOME_WRAPPER_ALGORITHM_XWING_MLKEM_768_DRAFT_6`). The private
//! key is the 32-byte seed; SHAKE256(seed, 96) expands to ML-KEM's `d ‖ z` and the X25519 secret.

use ml_kem::ml_kem_768::{Ciphertext, DecapsulationKey};
use ml_kem::{Decapsulate, KeyExport, Seed};
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
    let mut m = [0u8; 32];
    rng.fill_bytes(&mut m);
    let mut ek_x = [0u8; 32];
    rng.fill_bytes(&mut ek_x);
    let out = encapsulate_with(pk, m, ek_x);
    zeroize::Zeroize::zeroize(&mut m);
    zeroize::Zeroize::zeroize(&mut ek_x);
    out
}

/// Encapsulates to `pk` with the given randomness: `m` for ML-KEM-768's encapsulation, `ek_x`
/// the ephemeral X25519 secret (the draft's `eseed` is `m ‖ ek_x`).
///
/// ML-KEM is libcrux's here (AVX2 where the CPU has it; decapsulation stays with `ml-kem`): the
/// sending side of the PQ suite's update paths is one encapsulation per member of a copath
/// node's resolution, ≈ 1,000 for adding a member to a fresh 1,000-member group.
pub fn encapsulate_with(
    pk: &[u8],
    mut m: [u8; 32],
    mut ek_x: [u8; 32],
) -> Result<([u8; 32], Vec<u8>)> {
    use libcrux_ml_kem::mlkem768;
    if pk.len() != PUBLIC_KEY_LEN {
        return Err(ProtocolError::malformed(
            "X-Wing public key",
            format!("{} bytes, expected {PUBLIC_KEY_LEN}", pk.len()),
        ));
    }
    let pk_m = mlkem768::MlKem768PublicKey::try_from(&pk[..MLKEM_PK])
        .map_err(|_| ProtocolError::malformed("X-Wing public key", "ML-KEM part"))?;
    // FIPS 203's encapsulation-key check (every coefficient below the modulus).
    if !mlkem768::validate_public_key(&pk_m) {
        return Err(ProtocolError::malformed(
            "X-Wing public key",
            "ML-KEM key fails validation",
        ));
    }
    let mut pk_x = [0u8; 32];
    pk_x.copy_from_slice(&pk[MLKEM_PK..]);
    let (ct_m, mut ss_m) = mlkem768::encapsulate(&pk_m, m);
    let ct_x = PublicKey::from(&StaticSecret::from(ek_x));
    let mut ss_x = x25519(ek_x, pk_x);
    let ss = combine(&ss_m, &ss_x, ct_x.as_bytes(), &pk_x);
    // Best effort: the randomness and the two shared secrets are wiped (the copies a move
    // leaves behind are not in our hands).
    for secret in [&mut m, &mut ek_x, &mut ss_m, &mut ss_x] {
        zeroize::Zeroize::zeroize(secret);
    }
    let mut ct = ct_m.as_slice().to_vec();
    ct.extend_from_slice(ct_x.as_bytes());
    Ok((ss, ct))
}

/// X25519 (RFC 7748) of the scalar `k` and the u-coordinate `u`, as `x25519-dalek`'s
/// `diffie_hellman` computes it, about twice as fast where the CPU has AVX2.
///
/// The Montgomery ladder is curve25519-dalek's serial code; its Edwards variable-base
/// multiplication has an AVX2 backend. For a `u` on the curve, the Edwards point with that `u`
/// (either sign: `[k](-P) = -[k]P` has the same `u`) times the clamped `k` gives the same `u`
/// (clamping makes `k` a multiple of the cofactor and below 2^255, which Edwards multiplication
/// takes unreduced). A `u` on the twist (or -1) has no Edwards point and takes the ladder.
/// Which path runs depends only on `u`, a public key; both are constant time in `k`.
fn x25519(k: [u8; 32], u: [u8; 32]) -> [u8; 32] {
    let point = curve25519_dalek::MontgomeryPoint(u);
    match point.to_edwards(0) {
        Some(p) => p.mul_clamped(k).to_montgomery().0,
        None => point.mul_clamped(k).0,
    }
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

    /// Replays fixed bytes as "randomness", so encapsulation is deterministic.
    struct Fixed(Vec<u8>);

    impl rand_core::RngCore for Fixed {
        fn next_u32(&mut self) -> u32 {
            unimplemented!("only fill_bytes is used")
        }
        fn next_u64(&mut self) -> u64 {
            unimplemented!("only fill_bytes is used")
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            let n = dest.len();
            dest.copy_from_slice(&self.0[..n]);
            self.0.drain(..n);
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }
    impl rand_core::CryptoRng for Fixed {}

    /// Known answer: draft-connolly-cfrg-xwing-kem-08 Appendix C, vector 1 (its key expansion,
    /// combiner and encodings are those of draft 06, which XMTP names): public key from the
    /// seed, ciphertext and shared secret from `eseed`, and decapsulation back to the secret.
    #[test]
    fn xwing_draft_vector_1() {
        let sk: [u8; 32] =
            hex::decode("7f9c2ba4e88f827d616045507605853ed73b8093f6efbc88eb1a6eacfa66ef26")
                .unwrap()
                .try_into()
                .unwrap();
        let pk = hex::decode(
            [
                "e2236b35a8c24b39b10aa1323a96a919a2ced88400633a7b07131713fc14b2b5b19cfc3d",
                "a5fa1a92c49f25513e0fd30d6b1611c9ab9635d7086727a4b7d21d34244e66969cf15b3b",
                "2a785329f61b096b277ea037383479a6b556de7231fe4b7fa9c9ac24c0699a0018a52534",
                "01bacfa905ca816573e56a2d2e067e9b7287533ba13a937dedb31fa44baced4076992361",
                "0034ae31e619a170245199b3c5c39864859fe1b4c9717a07c30495bdfb98a0a002ccf56c",
                "1286cef5041dede3c44cf16bf562c7448518026b3d8b9940680abd38a1575fd27b58da06",
                "3bfac32c39c30869374c05c1aeb1898b6b303cc68be455346ee0af699636224a148ca2ae",
                "a10463111c709f69b69c70ce8538746698c4c60a9aef0030c7924ceec42a5d36816f545e",
                "ae13293460b3acb37ea0e13d70e4aa78686da398a8397c08eaf96882113fe4f7bad4da40",
                "b0501e1c753efe73053c87014e8661c33099afe8bede414a5b1aa27d8392b3e131e9a70c",
                "1055878240cad0f40d5fe3cdf85236ead97e2a97448363b2808caafd516cd25052c5c362",
                "543c2517e4acd0e60ec07163009b6425fc32277acee71c24bab53ed9f29e74c66a0a3564",
                "955998d76b96a9a8b50d1635a4d7a67eb42df5644d330457293a8042f53cc7a69288f17e",
                "d55827e82b28e82665a86a14fbd96645eca8172c044f83bc0d8c0b4c8626985631ca87af",
                "829068f1358963cb333664ca482763ba3b3bb208577f9ba6ac62c25f76592743b64be519",
                "317714cb4102cb7b2f9a25b2b4f0615de31decd9ca55026d6da0b65111b16fe52feed8a4",
                "87e144462a6dba93728f500b6ffc49e515569ef25fed17aff520507368253525860f58be",
                "3be61c964604a6ac814e6935596402a520a4670b3d284318866593d15a4bb01c35e3e587",
                "ee0c67d2880d6f2407fb7a70712b838deb96c5d7bf2b44bcf6038ccbe33fbcf51a54a584",
                "fe90083c91c7a6d43d4fb15f48c60c2fd66e0a8aad4ad64e5c42bb8877c0ebec2b5e387c",
                "8a988fdc23beb9e16c8757781e0a1499c61e138c21f216c29d076979871caa6942bafc09",
                "0544bee99b54b16cb9a9a364d6246d9f42cce53c66b59c45c8f9ae9299a75d15180c3c95",
                "2151a91b7a10772429dc4cbae6fcc622fa8018c63439f890630b9928db6bb7f9438ae406",
                "5ed34d73d486f3f52f90f0807dc88dfdd8c728e954f1ac35c06c000ce41a0582580e3bb5",
                "7b672972890ac5e7988e7850657116f1b57d0809aaedec0bede1ae148148311c6f7e3173",
                "46e5189fb8cd635b986f8c0bdd27641c584b778b3a911a80be1c9692ab8e1bbb12839573",
                "cce19df183b45835bbb55052f9fc66a1678ef2a36dea78411e6c8d60501b4e60592d1369",
                "8a943b509185db912e2ea10be06171236b327c71716094c964a68b03377f513a05bcd99c",
                "1f346583bb052977a10a12adfc758034e5617da4c1276585e5774e1f3b9978b09d0e9c44",
                "d3bc86151c43aad185712717340223ac381d21150a04294e97bb13bbda21b5a182b6da96",
                "9e19a7fd072737fa8e880a53c2428e3d049b7d2197405296ddb361912a7bcf4827ced611",
                "d0c7a7da104dde4322095339f64a61d5bb108ff0bf4d780cae509fb22c256914193ff734",
                "9042581237d522828824ee3bdfd07fb03f1f942d2ea179fe722f06cc03de5b69859edb06",
                "eff389b27dce59844570216223593d4ba32d9abac8cd049040ef6534",
            ]
            .concat(),
        )
        .unwrap();
        let eseed = hex::decode("3cb1eea988004b93103cfb0aeefd2a686e01fa4a58e8a3639ca8a1e3f9ae57e235b8cc873c23dc62b8d260169afa2f75ab916a58d974918835d25e6a435085b2").unwrap();
        let ct = hex::decode(
            [
                "b83aa828d4d62b9a83ceffe1d3d3bb1ef31264643c070c5798927e41fb07914a273f8f96",
                "e7826cd5375a283d7da885304c5de0516a0f0654243dc5b97f8bfeb831f68251219aabdd",
                "723bc6512041acbaef8af44265524942b902e68ffd23221cda70b1b55d776a92d1143ea3",
                "a0c475f63ee6890157c7116dae3f62bf72f60acd2bb8cc31ce2ba0de364f52b8ed38c79d",
                "719715963a5dd3842d8e8b43ab704e4759b5327bf027c63c8fa857c4908d5a8a7b88ac7f",
                "2be394d93c3706ddd4e698cc6ce370101f4d0213254238b4a2e8821b6e414a1cf20f6c12",
                "44b699046f5a01caa0a1a55516300b40d2048c77cc73afba79afeea9d2c0118bdf2adb88",
                "70dc328c5516cc45b1a2058141039e2c90a110a9e16b318dfb53bd49a126d6b73f215787",
                "517b8917cc01cabd107d06859854ee8b4f9861c226d3764c87339ab16c3667d2f49384e5",
                "5456dd40414b70a6af841585f4c90c68725d57704ee8ee7ce6e2f9be582dbee985e038ff",
                "c346ebfb4e22158b6c84374a9ab4a44e1f91de5aac5197f89bc5e5442f51f9a5937b102b",
                "a3beaebf6e1c58380a4a5fedce4a4e5026f88f528f59ffd2db41752b3a3d90efabe46389",
                "9b7d40870c530c8841e8712b733668ed033adbfafb2d49d37a44d4064e5863eb0af0a08d",
                "47b3cc888373bc05f7a33b841bc2587c57eb69554e8a3767b7506917b6b70498727f16ea",
                "c1a36ec8d8cfaf751549f2277db277e8a55a9a5106b23a0206b4721fa9b3048552c5bd5b",
                "594d6e247f38c18c591aea7f56249c72ce7b117afcc3a8621582f9cf71787e183dee0936",
                "7976e98409ad9217a497df888042384d7707a6b78f5f7fb8409e3b535175373461b77600",
                "2d799cbad62860be70573ecbe13b246e0da7e93a52168e0fb6a9756b895ef7f0147a0dc8",
                "1bfa644b088a9228160c0f9acf1379a2941cd28c06ebc80e44e17aa2f8177010afd78a97",
                "ce0868d1629ebb294c5151812c583daeb88685220f4da9118112e07041fcc24d5564a99f",
                "dbde28869fe0722387d7a9a4d16e1cc8555917e09944aa5ebaaaec2cf62693afad42a3f5",
                "18fce67d273cc6c9fb5472b380e8573ec7de06a3ba2fd5f931d725b493026cb0acbd3fe6",
                "2d00e4c790d965d7a03a3c0b4222ba8c2a9a16e2ac658f572ae0e746eafc4feba023576f",
                "08942278a041fb82a70a595d5bacbf297ce2029898a71e5c3b0d1c6228b485b1ade509b3",
                "5fbca7eca97b2132e7cb6bc465375146b7dceac969308ac0c2ac89e7863eb8943015b243",
                "14cafb9c7c0e85fe543d56658c213632599efabfc1ec49dd8c88547bb2cc40c9d38cbd30",
                "99b4547840560531d0188cd1e9c23a0ebee0a03d5577d66b1d2bcb4baaf21cc7fef1e038",
                "06ca96299df0dfbc56e1b2b43e4fc20c37f834c4af62127e7dae86c3c25a2f696ac8b589",
                "dec71d595bfbe94b5ed4bc07d800b330796fda89edb77be0294136139354eb8cd3759157",
                "8f9c600dd9be8ec6219fdd507adf3397ed4d68707b8d13b24ce4cd8fb22851bfe9d63240",
                "7f31ed6f7cb1600de56f17576740ce2a32fc5145030145cfb97e63e0e41d354274a079d3",
                "e6fb2e15",
            ]
            .concat(),
        )
        .unwrap();
        let ss = hex::decode("d2df0522128f09dd8e2c92b1e905c793d8f57a54c3da25861f10bf4ca613e384")
            .unwrap();
        assert_eq!(public_key(&sk), pk);
        let (got_ss, got_ct) = encapsulate(&pk, &mut Fixed(eseed)).unwrap();
        assert_eq!(got_ct, ct);
        assert_eq!(got_ss.to_vec(), ss);
        assert_eq!(decapsulate(&sk, &ct).unwrap().to_vec(), ss);
    }

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

    /// FIPS 203 §7.2 input validation, as C2SP/CCTV's ML-KEM-768 "modulus" vectors exercise
    /// it: an encapsulation key holding any 12-bit coefficient in q..4096 (q = 3329) must be
    /// refused. Every one of the 767 invalid values is tried, each at its own position among
    /// the 768 coefficients (the vectors' recipe, regenerated here from a valid key); q - 1 is
    /// still accepted, and so are the untouched key and no other length.
    #[test]
    fn fips203_modulus_check_refuses_every_out_of_range_coefficient() {
        const Q: u16 = 3329;
        let mut rng = rand::rngs::OsRng;
        let (_, pk) = generate(&mut rng);
        let set = |pk: &mut [u8], i: usize, v: u16| {
            // Coefficients are packed two per three bytes, little-endian 12-bit.
            let at = i / 2 * 3;
            if i.is_multiple_of(2) {
                pk[at] = v as u8;
                pk[at + 1] = (pk[at + 1] & 0xf0) | (v >> 8) as u8;
            } else {
                pk[at + 1] = (pk[at + 1] & 0x0f) | ((v & 0x0f) << 4) as u8;
                pk[at + 2] = (v >> 4) as u8;
            }
        };
        let mut refused = 0;
        for v in Q..4096 {
            let i = (v as usize * 7919) % 768;
            let mut bad = pk.clone();
            set(&mut bad, i, v);
            assert!(
                encapsulate(&bad, &mut rng).is_err(),
                "coefficient {i} = {v} accepted"
            );
            refused += 1;
            let mut edge = pk.clone();
            set(&mut edge, i, Q - 1);
            assert!(
                encapsulate(&edge, &mut rng).is_ok(),
                "coefficient {i} = q - 1 refused"
            );
        }
        assert_eq!(refused, 4096 - Q as usize);
        assert!(encapsulate(&pk, &mut rng).is_ok());
        assert!(encapsulate(&pk[..PUBLIC_KEY_LEN - 1], &mut rng).is_err());
        assert!(encapsulate(&[pk.clone(), vec![0]].concat(), &mut rng).is_err());
    }

    /// The AVX2 route of X25519 agrees with the ladder (`x25519-dalek`): random keys and
    /// u-coordinates (about half on the twist), and the edge cases (0, 1, -1, the order-8
    /// points' u, non-canonical encodings and the ignored top bit).
    #[test]
    fn x25519_matches_the_ladder() {
        use rand_core::{OsRng, RngCore};
        let ladder = |k: [u8; 32], u: [u8; 32]| {
            *StaticSecret::from(k)
                .diffie_hellman(&PublicKey::from(u))
                .as_bytes()
        };
        let p_minus = |d: u8| {
            // p - d, little-endian (p = 2^255 - 19).
            let mut b = [0xffu8; 32];
            b[0] = 0xed - d;
            b[31] = 0x7f;
            b
        };
        let mut edge = vec![[0u8; 32], p_minus(1), p_minus(0), p_minus(0)];
        edge[2][0] = 0xed; // p itself: 0 non-canonically
        edge[3][0] = 0xee; // p + 1: 1 non-canonically
        let mut one = [0u8; 32];
        one[0] = 1;
        edge.push(one);
        // u-coordinates of points of small order (RFC 7748 test material, libsodium's list).
        for hex in [
            "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
            "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        ] {
            edge.push(hex::decode(hex).unwrap().try_into().unwrap());
        }
        for u in edge.clone() {
            let mut top = u;
            top[31] |= 0x80;
            edge.push(top);
        }
        let mut on_curve = 0;
        for i in 0..2000 {
            let mut k = [0u8; 32];
            OsRng.fill_bytes(&mut k);
            let u = if let Some(u) = edge.get(i) {
                *u
            } else {
                let mut u = [0u8; 32];
                OsRng.fill_bytes(&mut u);
                u
            };
            if curve25519_dalek::MontgomeryPoint(u).to_edwards(0).is_some() {
                on_curve += 1;
            }
            assert_eq!(x25519(k, u), ladder(k, u), "k {k:02x?} u {u:02x?}");
        }
        // Both routes were taken many times.
        assert!(
            (500..1500).contains(&on_curve),
            "{on_curve} of 2000 on the curve"
        );
    }
}
