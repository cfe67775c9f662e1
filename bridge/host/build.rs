//! Builds the first-party plugins in `plugins/` for `wasm32-wasip2` and puts the components in
//! OUT_DIR for `include_bytes!`. Installs the target with rustup when it is missing, so a fresh
//! checkout needs nothing by hand.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let plugins = manifest.join("../../plugins");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed={}", plugins.join("mqtt").display());
    println!("cargo:rerun-if-changed={}", plugins.join("email").display());
    println!("cargo:rerun-if-changed={}", plugins.join("nats").display());
    println!("cargo:rerun-if-changed={}", plugins.join("sdk").display());
    println!(
        "cargo:rerun-if-changed={}",
        plugins.join("misbehave").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        plugins.join("Cargo.toml").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        manifest.join("../../wit").display()
    );

    // Whether the toolchain building us has the target: its sysroot holds the target's
    // standard library (asking `rustup target list` from inside cargo can name another
    // toolchain).
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let missing = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .map(|o| {
            let sysroot = String::from_utf8_lossy(&o.stdout).trim().to_string();
            !PathBuf::from(sysroot)
                .join("lib/rustlib/wasm32-wasip2")
                .exists()
        })
        .unwrap_or(true);
    if missing {
        println!(
            "cargo:warning=installing the wasm32-wasip2 target with rustup (needed to build plugins)"
        );
        let ok = Command::new("rustup")
            .args(["target", "add", "wasm32-wasip2"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "the wasm32-wasip2 target is missing and `rustup target add wasm32-wasip2` failed; install it and build again"
        );
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_dir = out.join("plugins-target");
    let status = Command::new(cargo)
        .current_dir(&plugins)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
        ])
        .arg(&target_dir)
        // The host build's flags are for the host, not for the guest.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .status()
        .expect("running cargo to build plugins/");
    assert!(
        status.success(),
        "building plugins/ for wasm32-wasip2 failed (see the output above)"
    );
    // One entry per first-party plugin crate in plugins/.
    const PLUGINS: &[&str] = &[
        "gatehouse_plugin_mqtt",
        "gatehouse_plugin_email",
        "gatehouse_plugin_nats",
        "gatehouse_plugin_misbehave",
    ];
    for name in PLUGINS {
        let wasm = target_dir
            .join("wasm32-wasip2/release")
            .join(format!("{name}.wasm"));
        std::fs::copy(&wasm, out.join(format!("{name}.wasm")))
            .unwrap_or_else(|e| panic!("{}: {e}", wasm.display()));
    }
}
