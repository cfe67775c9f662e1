//! The walking skeleton, end to end: a device on MQTT and agents on XMTP talk through the real
//! `gatehouse` binary (embedded node), a real mosquitto, and `gatehouse agent` processes.

use std::time::Duration;

use gatehouse_e2e::*;

fn endpoint_inbox(d: &Daemon, device: &str) -> String {
    let eps = d.endpoints();
    let e = eps
        .iter()
        .find(|e| e["device"] == device)
        .unwrap_or_else(|| panic!("no endpoint {device} in {eps:?}"));
    assert_eq!(e["address"], format!("devices/{device}/up"));
    assert!(e["wallet_address"].as_str().unwrap().starts_with("0x"));
    e["inbox_id"].as_str().unwrap().to_string()
}

/// A device publish reaches allowed agent A decrypted; A's reply reaches the device; agent B
/// (not allowed) reaches nothing; bad input is rejected with a reason while the daemon keeps
/// serving; and the node's store never holds a plaintext.
#[test]
fn device_and_agent_talk_end_to_end() {
    let s = Setup::new("skeleton");
    let (a, b) = (s.agent("agent-a"), s.agent("agent-b"));
    let inbox_a = a.inbox_id();
    let config = s.write_config(&[&inbox_a]);
    let d = s.start_daemon(&config);
    assert_eq!(a.init(), inbox_a);
    b.init();

    s.broker.publish("devices/thermo-1/up", br#"{"t":21.5}"#);
    let got = a.listen(1);
    let endpoint = endpoint_inbox(&d, "thermo-1");
    assert_eq!(got[0]["text"], r#"{"t":21.5}"#);
    assert_eq!(got[0]["content_type"], "gatehouse.dev/json:1.0");
    assert_eq!(got[0]["sender_inbox"], endpoint.as_str());
    let conversation = got[0]["conversation"].as_str().unwrap().to_string();
    // The bridge attests where the message comes from, and A verified it.
    let bridge = d.status()["bridge_inbox"].as_str().unwrap().to_string();
    assert_eq!(
        got[0]["sender_endpoint"],
        serde_json::json!({"bridge": bridge, "channel": "mqtt", "address": "devices/thermo-1/up", "verified": true})
    );

    let down = s.broker.subscribe("devices/thermo-1/down");
    // B is not on the route: its message waits in the endpoint's request queue (listed
    // without its text), and nothing reaches the device.
    b.send(&endpoint, "intruder-text");
    let inbox_b = b.inbox_id();
    let held = wait_for("B's request", || {
        let r = d.requests("thermo-1");
        (!r.is_empty()).then_some(r)
    });
    assert_eq!(held[0]["sender_inbox"], inbox_b.as_str());
    assert!(
        !serde_json::to_string(&held)
            .unwrap()
            .contains("intruder-text")
    );
    assert!(!d.log_text().contains("intruder-text"));
    // A is allowed: its reply reaches the device, and it is the first thing that does.
    assert_eq!(
        a.send(&endpoint, "set 19.0"),
        conversation,
        "A replies in the same DM"
    );
    assert_eq!(down.next_message(), "set 19.0");

    // Malformed and oversized payloads are rejected with a logged reason...
    s.broker.publish("devices/thermo-1/up", b"not json{");
    d.wait_log(&["rejected by plugin", "malformed"]);
    s.broker.publish("devices/thermo-1/up", &vec![b'7'; 70_000]);
    d.wait_log(&["rejected", "max_payload", "70000"]);
    // ...and the daemon keeps serving.
    s.broker.publish("devices/thermo-1/up", br#"{"t":22.0}"#);
    let got = a.listen(1);
    assert_eq!(got[0]["text"], r#"{"t":22.0}"#);
    assert_eq!(got[0]["conversation"], conversation.as_str());
    assert!(
        down.drain(Duration::from_millis(300)).is_empty(),
        "nothing else reached the device"
    );

    // The node stored only ciphertext.
    let node_dir = s.dir.join("data/node");
    assert!(node_dir.exists());
    for needle in [&b"21.5"[..], b"22.0", b"set 19.0", b"intruder-text"] {
        let hits = files_containing(&node_dir, needle);
        assert!(
            hits.is_empty(),
            "plaintext {:?} found in {hits:?}",
            String::from_utf8_lossy(needle)
        );
    }
}

/// Stopping and restarting the daemon and the agent between two messages keeps the same DM
/// and loses nothing, in both directions.
#[test]
fn restart_keeps_the_conversation() {
    let s = Setup::new("restart");
    let a = s.agent("agent-a");
    let inbox_a = a.inbox_id();
    let config = s.write_config(&[&inbox_a]);
    let mut d = s.start_daemon(&config);
    a.init();
    s.broker.publish("devices/pump-7/up", br#"{"n":1}"#);
    let first = a.listen(1);
    let endpoint = endpoint_inbox(&d, "pump-7");

    d.stop();
    // (Messages published while the daemon is down are covered by durability.rs.)
    let d = s.start_daemon(&config);
    assert_eq!(
        endpoint_inbox(&d, "pump-7"),
        endpoint,
        "the endpoint keeps its identity"
    );
    s.broker.publish("devices/pump-7/up", br#"{"n":2}"#);
    let second = a.listen(1);
    assert_eq!(second[0]["text"], r#"{"n":2}"#);
    assert_eq!(
        second[0]["conversation"], first[0]["conversation"],
        "same DM after the restart"
    );
    assert_eq!(second[0]["sender_inbox"], endpoint.as_str());

    let down = s.broker.subscribe("devices/pump-7/down");
    a.send(&endpoint, "after restart");
    assert_eq!(down.next_message(), "after restart");
}

/// With no broker the daemon starts, serves its node and says the broker is unreachable; when
/// a broker appears it connects and carries messages.
#[test]
fn daemon_waits_for_the_broker() {
    let s = Setup::new("nobroker");
    let a = s.agent("agent-a");
    let inbox_a = a.inbox_id();
    // Hold the port (a listener that never answers) so no parallel test can take it while the
    // daemon keeps failing to reach a broker there.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = reserved.local_addr().unwrap().port();
    let config = s.write_config_for(port, &[&inbox_a]);
    let d = s.spawn_daemon(&config);
    d.wait_log(&["MQTT broker unreachable", &port.to_string()]);
    // The embedded node works meanwhile.
    a.init();
    drop(reserved);
    let late = Mosquitto::start_on(&s.dir, port);
    d.wait_log(&["MQTT connected"]);
    late.publish("devices/late-1/up", br#"{"ok":true}"#);
    assert_eq!(a.listen(1)[0]["text"], r#"{"ok":true}"#);
}

/// A bridge reinstalled from its seed alone (empty data directory, same external node)
/// re-derives the same endpoint identities and carries on: the seed is the one secret to back up.
#[test]
fn seed_rederives_endpoint_identities() {
    let s = Setup::new("seed");
    let node = StandaloneNode::start(&s.dir);
    let a = Agent::at(s.dir.join("agent-a"), node.url.clone());
    let inbox_a = a.inbox_id();
    a.init();
    let config = s.dir.join("external-node.yaml");
    std::fs::write(
        &config,
        format!(
            "data_dir: data\nnode: {{embedded: false, url: \"{}\"}}\nadmin: {{listen: 127.0.0.1:{}}}\npoll_interval_ms: 100\nchannels: {{mqtt: {{port: {}, client_id: gh-seed}}}}\nplugins: {{mqtt: {{builtin: mqtt}}}}\nroutes:\n  - {{name: devices, channel: mqtt, subscribe: \"devices/{{device}}/up\", plugin: mqtt, agents: [\"{inbox_a}\"]}}\n",
            node.url, s.admin_port, s.broker.port
        ),
    )
    .unwrap();
    let mut d = s.start_daemon(&config);
    s.broker.publish("devices/meter-9/up", br#"{"kwh":1}"#);
    a.listen(1);
    let before = endpoint_inbox(&d, "meter-9");
    let wallet_before = d.endpoints()[0]["wallet_address"].clone();
    d.stop();

    // Reinstall: everything of the bridge but its seed is gone.
    let data = s.dir.join("data");
    let seed = std::fs::read(data.join("seed")).unwrap();
    std::fs::rename(&data, s.dir.join("data-lost")).unwrap();
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("seed"), seed).unwrap();

    let d = s.start_daemon(&config);
    s.broker.publish("devices/meter-9/up", br#"{"kwh":2}"#);
    let got = a.listen(1);
    assert_eq!(got[0]["text"], r#"{"kwh":2}"#);
    assert_eq!(
        endpoint_inbox(&d, "meter-9"),
        before,
        "same inbox id from the same seed"
    );
    assert_eq!(d.endpoints()[0]["wallet_address"], wallet_before);
    assert_eq!(got[0]["sender_inbox"], before.as_str());
    // The reinstalled endpoint started a new DM; the agent answers on the DM the endpoint last
    // wrote on (DM stitching), so the reply reaches the device.
    let down = s.broker.subscribe("devices/meter-9/down");
    assert_eq!(
        a.send(&before, "after reinstall"),
        got[0]["conversation"].as_str().unwrap()
    );
    assert_eq!(down.next_message(), "after reinstall");
}

/// A burst of device messages (stored and acknowledged in batches) all arrive, once each, in
/// the order they were published.
#[test]
fn burst_arrives_complete_and_in_order() {
    let s = Setup::new("burst");
    let a = s.agent("agent-a");
    let inbox_a = a.inbox_id();
    let config = s.write_config(&[&inbox_a]);
    let _d = s.start_daemon(&config);
    a.init();
    let lines: Vec<String> = (0..60).map(|i| format!(r#"{{"n":{i}}}"#)).collect();
    s.broker.publish_lines("devices/burst-1/up", &lines);
    let got = a.listen(lines.len());
    let texts: Vec<String> = got
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(texts, lines);
}

/// Consent at the bridge, both ways: an unknown agent's messages wait in `thermo-1`'s request
/// queue (nothing reaches the device) and survive a restart; the operator's allow sends them
/// to the device in order; a denied agent's messages never arrive and its client sees nothing.
#[test]
fn bridge_consent_gate() {
    let s = Setup::new("consent");
    let (a, c, dd) = (s.agent("agent-a"), s.agent("agent-c"), s.agent("agent-d"));
    let inbox_a = a.inbox_id();
    let config = s.write_config(&[&inbox_a]);
    let mut d = s.start_daemon(&config);
    a.init();
    let inbox_c = c.init();
    let inbox_d = dd.init();
    s.broker.publish("devices/thermo-1/up", br#"{"t":20}"#);
    a.listen(1);
    let endpoint = endpoint_inbox(&d, "thermo-1");
    let down = s.broker.subscribe("devices/thermo-1/down");

    // C is unknown: held, in order, nothing on the down topic.
    for t in ["c-one", "c-two", "c-three"] {
        c.send(&endpoint, t);
    }
    wait_for("C's three requests", || {
        (d.requests("thermo-1").len() == 3).then_some(())
    });
    let leaked = down.drain(Duration::from_millis(200));
    assert!(leaked.is_empty(), "{leaked:?}");

    // The queue survives a restart.
    d.stop();
    let d2 = s.start_daemon(&config);
    d = d2;
    wait_for("requests after restart", || {
        (d.requests("thermo-1").len() == 3).then_some(())
    });

    // Allow: the held messages reach the device, in order.
    let r = d.consent("allow", "thermo-1", &inbox_c);
    assert_eq!(r["state"], "allowed");
    let got: Vec<String> = (0..3).map(|_| down.next_message()).collect();
    assert_eq!(got, ["c-one", "c-two", "c-three"]);
    assert!(d.requests("thermo-1").is_empty());

    // Deny D: its messages never arrive, and D's client shows nothing.
    d.consent("deny", "thermo-1", &inbox_d);
    dd.send(&endpoint, "d-secret");
    d.wait_log(&["dropped a message from a denied sender", &inbox_d]);
    c.send(&endpoint, "c-after");
    assert_eq!(down.next_message(), "c-after", "nothing from D came first");
    assert!(d.requests("thermo-1").is_empty());
    let out = dd.run(&["listen", "--json", "--count", "1", "--timeout", "2"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(out.stdout.is_empty(), "D sees nothing");
    assert!(!d.log_text().contains("d-secret"));

    // After another restart the operator's decisions still stand over the config (which
    // lists only A): C gets through, D stays dropped.
    d.stop();
    let d3 = s.start_daemon(&config);
    d = d3;
    dd.send(&endpoint, "d-again");
    c.send(&endpoint, "c-final");
    assert_eq!(down.next_message(), "c-final");
    d.wait_log(&["dropped a message from a denied sender", &inbox_d]);
    assert!(down.drain(Duration::from_millis(200)).is_empty());

    // A bad decision is refused with a reason.
    let out = std::process::Command::new(gatehouse_bin())
        .args(["consent", "allow", "--endpoint", "nope", &inbox_c])
        .args(["--admin", &format!("127.0.0.1:{}", s.admin_port)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no endpoint named"));
}

/// What queued up while the route could not deliver (its agent had no inbox yet) is mapped as
/// one batch when it can: the malformed messages among it are dead-lettered, each alone, and
/// the others reach the agent once each, in order.
#[test]
fn malformed_messages_in_a_mapped_batch_are_set_apart() {
    let s = Setup::new("batch");
    let a = s.agent("agent-a");
    let inbox_a = a.inbox_id();
    let config = s.write_config(&[&inbox_a]);
    let d = s.start_daemon(&config);
    let lines: Vec<String> = [
        r#"{"n":1}"#,
        "not json{",
        r#"{"n":2}"#,
        "also not json",
        r#"{"n":3}"#,
    ]
    .iter()
    .map(|l| l.to_string())
    .collect();
    s.broker.publish_lines("devices/b1/up", &lines);
    d.wait_log(&["delivery failed; will retry"]);
    a.init();
    let got = a.listen(3);
    let texts: Vec<&str> = got.iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, [r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#]);
    let dead = d.dead_letters();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(dead.iter().all(|x| x["kind"] == "refused"), "{dead:?}");
    let more = a.run(&["listen", "--json", "--count", "1", "--timeout", "1"]);
    assert_eq!(more.status.code(), Some(3), "nothing else, nothing twice");
    assert!(
        more.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&more.stdout)
    );
}
