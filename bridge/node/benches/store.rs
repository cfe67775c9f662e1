//! The durable writes on the hot path, on a real disk: the node storing a batch of envelopes
//! (what one `send_batch` publishes) and the bridge storing a batch of device messages (its
//! inbox), each with the flush that makes it durable, against one message per flush.
//! `cargo bench -p gatehouse-node --bench store`.

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("gh-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn stores(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let envelope = vec![7u8; 400]; // a 100-byte message after MLS framing and envelope
    let mut g = c.benchmark_group("durable-writes");
    g.sample_size(20).measurement_time(Duration::from_secs(10));

    // Envelope publish batch: 64 group messages, one flush (the node's answer waits for it).
    let node_dir = dir("node");
    let store = gatehouse_node::Store::open(&node_dir).unwrap();
    let group = [1u8; 16];
    for n in [1usize, 64] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("node-publish-batch-{n}"), |b| {
            b.iter(|| {
                for _ in 0..n {
                    let id = store.next_message_id().unwrap();
                    store.put_group_message(&group, id, &envelope).unwrap();
                }
                rt.block_on(store.flush()).unwrap();
            })
        });
    }

    // Inbox write batch: 256 device messages in one sled batch and one flush (the bridge
    // acknowledges the batch to the broker after it).
    let inbox_dir = dir("inbox");
    let db = sled::Config::new().path(&inbox_dir).open().unwrap();
    let inbox = db.open_tree("inbox").unwrap();
    let record = vec![9u8; 200];
    let mut next = 0u64;
    for n in [1usize, 256] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("inbox-write-batch-{n}"), |b| {
            b.iter(|| {
                let mut batch = sled::Batch::default();
                for _ in 0..n {
                    next += 1;
                    batch.insert(&next.to_be_bytes(), record.as_slice());
                }
                inbox.apply_batch(batch).unwrap();
                db.flush().unwrap();
            })
        });
    }
    g.finish();
    drop(store);
    let _ = std::fs::remove_dir_all(&node_dir);
    let _ = std::fs::remove_dir_all(&inbox_dir);
}

criterion_group!(benches, stores);
criterion_main!(benches);
