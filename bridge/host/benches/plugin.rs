//! Plugin costs: one `on-external` call of a trivial plugin (echo) and of the first-party MQTT
//! mapper (JSON parse and re-encode), instantiating a fresh instance, loading a component
//! compiled vs from the cache, and how far past its deadline a looping call is stopped.
//! `cargo bench -p gatehouse-host --bench plugin`.

use criterion::{Criterion, criterion_group, criterion_main};
use std::time::Duration;

use gatehouse_host::{Host, Limits, MISBEHAVE_PLUGIN, MQTT_PLUGIN, Message, PluginError};

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
    let echo = host
        .load("echo", MISBEHAVE_PLUGIN, vec![], Limits::default())
        .unwrap();
    c.bench_function("plugin/on-external-call-trivial", |b| {
        b.iter(|| echo.on_external(&msg).unwrap())
    });
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

    // A 50 ms deadline: the reported time minus 50 ms is the overshoot.
    let mut g = c.benchmark_group("plugin-deadline");
    g.sample_size(10);
    let limits = Limits {
        deadline: Duration::from_millis(50),
        ..Limits::default()
    };
    let looping = host.load("loop", MISBEHAVE_PLUGIN, vec![], limits).unwrap();
    let mut spin = message();
    spin.payload = b"loop".to_vec();
    g.bench_function("deadline_overshoot-50ms", |b| {
        b.iter(|| {
            assert!(matches!(
                looping.on_external(&spin),
                Err(PluginError::Timeout(_))
            ))
        })
    });
    g.finish();
}

criterion_group!(benches, plugin);
criterion_main!(benches);
