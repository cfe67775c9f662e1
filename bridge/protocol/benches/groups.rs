//! Group operations on both suites: create a 1,000-member group, add one member to it, and
//! encrypt / decrypt a 100-byte message. `cargo bench -p gatehouse-protocol --bench groups`.

use std::collections::BTreeMap;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use gatehouse_protocol::group::{self, CIPHERSUITE, Kind, PQ_CIPHERSUITE, Provider};
use gatehouse_protocol::identity::InstallationKey;
use openmls::prelude::Ciphersuite;

struct Member {
    inbox: String,
    key: InstallationKey,
    provider: Provider,
}

fn member(i: u32) -> Member {
    let mut seed = [0u8; 32];
    seed[..4].copy_from_slice(&i.to_be_bytes());
    seed[4] = 1;
    Member {
        inbox: format!("{i:064x}"),
        key: InstallationKey::from_seed(&seed),
        provider: Provider::default(),
    }
}

fn key_packages(
    reader: &Provider,
    members: &[Member],
    suite: Ciphersuite,
) -> Vec<openmls::prelude::KeyPackage> {
    members
        .iter()
        .map(|m| {
            let kp =
                group::build_key_package(&m.provider, &m.inbox, &m.key, &mut rand::rngs::OsRng)
                    .unwrap();
            let v = group::validate_key_package(reader, &kp.tls).unwrap();
            if suite == PQ_CIPHERSUITE {
                v.pq_key_package.unwrap()
            } else {
                v.key_package
            }
        })
        .collect()
}

fn create(
    creator: &Member,
    kps: Vec<openmls::prelude::KeyPackage>,
    suite: Ciphersuite,
) -> group::Created {
    let membership: BTreeMap<String, u64> = [(creator.inbox.clone(), 1)].into();
    group::create(
        &creator.provider,
        &creator.key,
        &creator.inbox,
        Kind::Group {
            name: "bench",
            description: "",
        },
        kps,
        &membership,
        &mut rand::rngs::OsRng,
        suite,
    )
    .unwrap()
}

fn suites() -> [(&'static str, Ciphersuite); 2] {
    [("xmtp", CIPHERSUITE), ("pq", PQ_CIPHERSUITE)]
}

fn large_groups(c: &mut Criterion) {
    const N: u32 = 1000;
    let mut g = c.benchmark_group("group-1000");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    for (name, suite) in suites() {
        let creator = member(0);
        let others: Vec<Member> = (1..N).map(member).collect();
        let kps = key_packages(&creator.provider, &others, suite);
        g.bench_function(format!("create-{name}"), |b| {
            b.iter_batched(
                || kps.clone(),
                |kps| create(&creator, kps, suite),
                BatchSize::PerIteration,
            )
        });
        // Add one member to the 1,000-member group: stage the commit and its welcome (then
        // drop it, so every iteration starts from the same group).
        let mut grp = create(&creator, kps, suite).group;
        let newcomer = member(N + 1);
        let membership = group::membership(&grp).unwrap();
        g.bench_function(format!("add-one-{name}"), |b| {
            b.iter_batched(
                || key_packages(&creator.provider, std::slice::from_ref(&newcomer), suite),
                |kp| {
                    let staged = group::commit_membership(
                        &creator.provider,
                        &creator.key,
                        &mut grp,
                        kp,
                        &[],
                        &membership,
                    )
                    .unwrap();
                    group::clear_pending(&creator.provider, &mut grp).unwrap();
                    staged
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn messages(c: &mut Criterion) {
    let mut g = c.benchmark_group("message-100B");
    let plaintext = gatehouse_protocol::content::seal_envelope(
        &gatehouse_protocol::content::text(&"x".repeat(100)),
        "bench",
    );
    for (name, suite) in suites() {
        let (a, b) = (member(0), member(1));
        let pair = || {
            let kps = key_packages(&a.provider, std::slice::from_ref(&b), suite);
            let created = create(&a, kps, suite);
            let gb = group::join(&b.provider, &created.welcome).unwrap();
            (created.group, gb)
        };
        let (mut ga, _) = pair();
        g.bench_function(format!("encrypt-{name}"), |bch| {
            bch.iter(|| group::encrypt(&a.provider, &a.key, &mut ga, &plaintext).unwrap())
        });
        // A fresh pair: the receiver reads every message the sender encrypts, in order.
        let (mut ga, mut gb) = pair();
        g.bench_function(format!("decrypt-{name}"), |bch| {
            bch.iter_batched(
                || group::encrypt(&a.provider, &a.key, &mut ga, &plaintext).unwrap(),
                |ct| group::process(&b.provider, &mut gb, &ct).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, messages, large_groups);
criterion_main!(benches);
