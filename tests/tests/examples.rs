//! The README's walkthrough script and each example in `examples/` run and do what their READMEs
//! say, so they cannot go stale.

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

/// Runs `examples/NAME/run.sh` as its README says and returns what it printed.
fn run_example(name: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("bash")
        .arg(root.join(format!("examples/{name}/run.sh")))
        .env("GATEHOUSE", gatehouse_bin())
        .current_dir(&root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "examples/{name}/run.sh failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `examples/thermostat`: three readings reach the agent; its setpoint reaches the thermostat.
#[test]
fn thermostat_example_runs() {
    require("mosquitto_pub", "mosquitto-clients");
    let out = run_example("thermostat");
    assert!(out.contains("average 17.87 °C: setpoint 21.0"), "{out}");
    assert!(
        out.contains(r#"thermostat received: {"setpoint":21.0}"#),
        "{out}"
    );
}

/// `examples/helpdesk`: a mail reaches the agent; its answer arrives threaded at the relay.
#[test]
fn helpdesk_example_runs() {
    require("swaks", "swaks");
    let out = run_example("helpdesk");
    assert!(out.contains("agent got: Subject: Printer jam"), "{out}");
    assert!(
        out.contains(r#"customer got: Subject: Re: Printer jam / 1 In-Reply-To header / "A technician is on the way.""#),
        "{out}"
    );
}

/// `examples/nats-feed`: three events reach the agent; its total reaches the service.
#[test]
fn nats_feed_example_runs() {
    require("nats-server", "nats-server");
    let out = run_example("nats-feed");
    assert!(out.contains("total 60.0"), "{out}");
    assert!(
        out.contains(r#"billing received: {"invoices":3,"total":60.0}"#),
        "{out}"
    );
}
