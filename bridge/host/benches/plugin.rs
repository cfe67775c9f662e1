//! Plugin costs: one `on-external` call of the first-party MQTT mapper (JSON passthrough),
//! instantiating a fresh instance, and loading a component compiled vs from the cache.
//! `cargo bench -p gatehouse-host --bench plugin`.

use criterion::{Criterion, criterion_group, criterion_main};
use gatehouse_host::{Host, Limits, MQTT_PLUGIN, Message};

fn message() -> Message {
    Message {
        payload: br#"{"t":21.5,"rh":40}"#.to_vec(),
        content_type: "application/json".into(),
        metadata: vec![("topic".into(), "devices/thermo-1/up".into())],
        endpoint: "thermo-1".into(),
        conversation: None,
        sender: Some("devices/thermo-1/up".into()),
        verified: false,
        idempotency_key: "k".into(),
    }
}

fn plugin(c: &mut Criterion) {
    let host = Host::new().unwrap();
    let p = host
        .load("mqtt", MQTT_PLUGIN, vec![], Limits::default())
        .unwrap();
    let msg = message();
    c.bench_function("plugin/on-external-call", |b| {
        b.iter(|| p.on_external(&msg).unwrap())
    });
    c.bench_function("plugin/instantiate-and-call", |b| {
        b.iter(|| {
            p.reset();
            p.on_external(&msg).unwrap()
        })
    });
    let mut g = c.benchmark_group("plugin-load");
    g.sample_size(10);
    g.bench_function("compile", |b| {
        b.iter(|| {
            host.load("mqtt", MQTT_PLUGIN, vec![], Limits::default())
                .unwrap()
        })
    });
    let dir = std::env::temp_dir().join(format!("gh-bench-cache-{}", std::process::id()));
    let cached = Host::new().unwrap().with_cache(&dir);
    cached
        .load("mqtt", MQTT_PLUGIN, vec![], Limits::default())
        .unwrap();
    g.bench_function("cached", |b| {
        b.iter(|| {
            cached
                .load("mqtt", MQTT_PLUGIN, vec![], Limits::default())
                .unwrap()
        })
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, plugin);
criterion_main!(benches);
