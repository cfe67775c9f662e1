//! Shared access to the conformance fixtures (`../shared/testdata/xmtp-v3`, read in place).
#![allow(dead_code)]

use std::path::PathBuf;

/// The fixture folder: `GATEHOUSE_FIXTURES`, or beside the checkout. Fails and says where it
/// looked when it is missing.
pub fn dir() -> PathBuf {
    let d = std::env::var_os("GATEHOUSE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/testdata/xmtp-v3")
        });
    assert!(
        d.join("index.json").exists(),
        "fixture folder not found at {} (set GATEHOUSE_FIXTURES)",
        d.display()
    );
    d
}

/// One fixture file's bytes.
pub fn read(name: &str) -> Vec<u8> {
    std::fs::read(dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A JSON fixture file.
pub fn json(name: &str) -> serde_json::Value {
    serde_json::from_slice(&read(name)).unwrap()
}

/// The recorded calls, in order.
pub fn calls() -> Vec<serde_json::Value> {
    json("index.json")["calls"].as_array().unwrap().clone()
}

/// `keys.json`.
pub fn keys() -> serde_json::Value {
    json("keys.json")
}

/// A hex string field as bytes.
pub fn hexval(v: &serde_json::Value) -> Vec<u8> {
    hex::decode(v.as_str().unwrap()).unwrap()
}

/// The response file of a recorded call number (`"151"` → `151-…resp.bin`).
pub fn response_of(seq: &str) -> String {
    std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|n| n.starts_with(seq) && n.ends_with(".resp.bin"))
        .unwrap_or_else(|| panic!("no response file for call {seq}"))
}
