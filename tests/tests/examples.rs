//! The README's walkthrough script runs and does what it says, so it cannot go stale.

use gatehouse_e2e::{gatehouse_bin, require};

/// `examples/walkthrough.sh`: a device message reaches the agent, the agent's reply reaches the device.
#[test]
fn walkthrough_script_runs() {
    require("mosquitto", "mosquitto");
    require("mosquitto_pub", "mosquitto-clients");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("bash")
        .arg(root.join("examples/walkthrough.sh"))
        .env("GATEHOUSE", gatehouse_bin())
        .current_dir(&root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "walkthrough failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(r#""text":"{\"t\":21.5}""#), "{stdout}");
    assert!(stdout.contains("device received: set 19.0"), "{stdout}");
}
