//! No plaintext and no key material in the daemon's log, even at trace level: device payloads,
//! agent messages and mail bodies carry unique markers, and the log of a full round trip at
//! `log.level: trace` (JSON format) must contain none of them, nor the bridge seed.

use gatehouse_e2e::*;

#[test]
fn a_trace_level_log_holds_no_payloads_and_no_keys() {
    let s = Setup::new("log-secrecy");
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = s.write_config(&[&inbox]);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("log: {level: trace, format: json}\n");
    std::fs::write(&config, text).unwrap();
    // Only config.yaml decides the level here.
    let d = s.spawn_daemon_env(&config, &[("GATEHOUSE_LOG", ""), ("RUST_LOG", "")]);
    wait_for("the daemon's MQTT connection", || {
        d.log_text().contains("MQTT connected").then_some(())
    });
    a.init();
    let up = "UPLINK-MARKER-7f3a9c";
    let down = "DOWNLINK-MARKER-b81e44";
    s.broker.publish(
        "devices/t1/up",
        format!("{{\"secret\":\"{up}\"}}").as_bytes(),
    );
    let m = &a.listen(1)[0];
    assert!(
        m["text"].as_str().unwrap().contains(up),
        "round trip broken"
    );
    let endpoint = m["sender_inbox"].as_str().unwrap().to_string();
    let sub = s.broker.subscribe("devices/t1/down");
    a.ok(&["send", "--to", &endpoint, down]);
    assert_eq!(sub.next_message(), down);
    // The log really is at trace level and JSON.
    let log = d.log_text();
    assert!(log.contains(r#""level":"TRACE""#), "not a trace-level log");
    assert!(
        log.lines().take(5).all(|l| l.starts_with('{')),
        "not JSON lines"
    );

    // The bridge seed (every endpoint's identity derives from it), as hex and as bytes.
    let seed_hex = std::fs::read_to_string(s.dir.join("data/seed"))
        .unwrap()
        .trim()
        .to_string();
    let seed = hex::decode(&seed_hex).unwrap();
    let seed_bytes: Vec<String> = seed.iter().take(8).map(|b| b.to_string()).collect();
    let mut secrets = vec![
        up.to_string(),
        down.to_string(),
        seed_hex.clone(),
        seed_hex.to_uppercase(),
        seed_bytes.join(", "),
    ];
    // Byte-list renderings of the payloads (a `Debug` of a Vec<u8>).
    for p in [up, down] {
        let bytes: Vec<String> = p.bytes().take(8).map(|b| b.to_string()).collect();
        secrets.push(bytes.join(", "));
    }
    let hits: Vec<&String> = secrets
        .iter()
        .filter(|x| log.contains(x.as_str()))
        .collect();
    assert!(
        hits.is_empty(),
        "found in the trace log ({} bytes): {hits:?}",
        log.len()
    );
}
