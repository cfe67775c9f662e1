//! `gatehouse check` on broken configs (tests/fixtures/config): each error names the file,
//! line and column, the key, and what is wrong — with the nearest valid key for a misspelt one.

use gatehouse_e2e::*;

#[test]
fn each_broken_config_is_reported_at_its_line_and_column() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/config");
    let cases = [
        (
            "01-misspelt-key.yaml",
            "4:5: channels.mqtt.hots: unknown key `hots`; did you mean `host`? (valid: host, port, client_id, username, password, password_file, keep_alive_secs, max_packet_bytes, clean_session, publish_qos, subscribe_qos, tls, protocol, session_expiry_secs, embedded_broker)",
        ),
        (
            "02-unknown-top-level.yaml",
            "4:1: rotes: unknown key `rotes`; did you mean `routes`? (valid: data_dir, node, admin, channels, plugins, routes, poll_interval_ms, resync_interval_secs, storage, shutdown_grace_secs, stalled_after_secs, log)",
        ),
        (
            "03-wrong-type.yaml",
            "4:11: channels.mqtt.port: invalid type: string \"eighteen-eighty-three\", expected u16",
        ),
        (
            "04-qos-out-of-range.yaml",
            "5:5: channels.mqtt.publish_qos: 3 is not an MQTT QoS (0, 1 or 2)",
        ),
        (
            "05-admin-not-loopback.yaml",
            "3:3: admin.listen: 0.0.0.0:5557 is not a loopback address; the admin API has no authentication",
        ),
        (
            "06-unknown-plugin.yaml",
            "8:5: routes[0] (devices).plugin: no plugin named \"thermostat\" (defined: [\"mqtt\"])",
        ),
        (
            "07-duplicate-route.yaml",
            "6:6: routes[1] (devices).name: another route is also named \"devices\"; route names must be unique (queued messages are kept per route name)",
        ),
        (
            "08-bad-yaml.yaml",
            "4:7: not valid YAML: while parsing a flow mapping, did not find expected ',' or '}'",
        ),
        (
            "09-missing-env.yaml",
            "5:16: ${GATEHOUSE_FIXTURE_UNSET_PASSWORD}: the environment variable GATEHOUSE_FIXTURE_UNSET_PASSWORD is not set",
        ),
        (
            "10-template-without-device.yaml",
            "7:5: routes[0] (devices).subscribe: \"devices/+/up\" must contain exactly one {device}",
        ),
        (
            "11-bad-protocol.yaml",
            "4:5: channels.mqtt: protocol must be 3.1.1 or 5, not \"4.5\"",
        ),
        (
            "12-missing-route-field.yaml",
            "5:5: routes[0]: missing field `channel`",
        ),
    ];
    let mut wrong = Vec::new();
    for (file, expected) in cases {
        let path = root.join(file);
        let out = std::process::Command::new(gatehouse_bin())
            .args(["check", "--config"])
            .arg(&path)
            .env_remove("GATEHOUSE_FIXTURE_UNSET_PASSWORD")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let want = format!("error: {}:{expected}", path.display());
        if out.status.code() != Some(1) || stderr != want {
            wrong.push(format!(
                "{file}: exit {:?}\n  got:  {stderr}\n  want: {want}",
                out.status.code()
            ));
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
    // Every fixture is covered.
    let fixtures = std::fs::read_dir(&root).unwrap().count();
    assert_eq!(fixtures, cases.len(), "a fixture without an expectation");

    // And the repository's own config passes.
    let ok = std::process::Command::new(gatehouse_bin())
        .args(["check", "--config"])
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config.yaml"))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}
