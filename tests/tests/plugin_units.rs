//! The first-party plugins' own unit tests (their pure logic, natively), so that
//! `cargo test --workspace` runs them too: `plugins/` is a separate workspace built for
//! wasm32-wasip2.

use std::path::Path;
use std::process::Command;

fn plugin_unit_tests(package: &str, passed: usize) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["test", "--manifest-path"])
        .arg(root.join("plugins/Cargo.toml"))
        .args(["-p", package])
        .env("CARGO_TARGET_DIR", root.join("target/plugin-units"))
        .output()
        .expect("running cargo");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("test result: ok. {passed} passed")),
        "{text}"
    );
}

#[test]
fn email_plugin_unit_tests_pass() {
    plugin_unit_tests("gatehouse-plugin-email", 2);
}

#[test]
fn nats_plugin_unit_tests_pass() {
    plugin_unit_tests("gatehouse-plugin-nats", 2);
}
