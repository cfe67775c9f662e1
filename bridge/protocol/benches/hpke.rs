//! HPKE encryption of a 32-byte secret to one member's key, as an MLS update path does once per
//! member of a copath node's resolution: both suites' KEMs, through Gatehouse's provider and
//! through RustCrypto's. `cargo bench -p gatehouse-protocol --bench hpke`.

use criterion::{Criterion, criterion_group, criterion_main};
use gatehouse_protocol::group::{CIPHERSUITE, PQ_CIPHERSUITE};
use gatehouse_protocol::mls_crypto::Crypto;
use openmls_traits::crypto::OpenMlsCrypto;

fn seal(c: &mut Criterion) {
    let crypto = Crypto::default();
    let secret = [7u8; 32];
    let mut g = c.benchmark_group("hpke-seal");
    for (name, suite) in [("x25519", CIPHERSUITE), ("xwing", PQ_CIPHERSUITE)] {
        let kp = crypto
            .derive_hpke_keypair(suite.hpke_config(), &[3u8; 32])
            .unwrap();
        g.bench_function(name, |b| {
            b.iter(|| {
                crypto
                    .hpke_seal(suite.hpke_config(), &kp.public, b"info", b"", &secret)
                    .unwrap()
            })
        });
        g.bench_function(format!("{name}-rustcrypto"), |b| {
            b.iter(|| {
                crypto
                    .rust_crypto()
                    .hpke_seal(suite.hpke_config(), &kp.public, b"info", b"", &secret)
                    .unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, seal);
criterion_main!(benches);
