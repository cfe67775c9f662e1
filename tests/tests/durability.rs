//! Durability of the inbound path with a real mosquitto: the daemon keeps a persistent MQTT
//! session, so messages published while it is down arrive after it starts, in order; a crash
//! between the durable write and the broker acknowledgement delivers the message once (the
//! broker's DUP redelivery is recognised); a sender's retry shows once at the receiver.

use gatehouse_e2e::*;

fn seq(m: &serde_json::Value) -> u64 {
    let v: serde_json::Value = serde_json::from_str(m["text"].as_str().unwrap()).unwrap();
    v["n"].as_u64().unwrap()
}

#[test]
fn crash_before_ack_and_downtime_lose_nothing_and_duplicate_nothing() {
    let s = Setup::new("durability");
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = s.write_config(&[&inbox]);
    let mut d = s.start_daemon(&config);
    a.init();
    s.broker.publish("devices/d1/up", br#"{"n":0}"#);
    assert_eq!(seq(&a.listen(1)[0]), 0);
    d.stop();

    // Down: the broker queues for the daemon's persistent session.
    let line = |n: u64| format!("{{\"n\":{n}}}");
    s.broker
        .publish_lines("devices/d1/up", &(1..=50).map(line).collect::<Vec<_>>());
    s.broker.publish_lines(
        "devices/d2/up",
        &(1001..=1050).map(line).collect::<Vec<_>>(),
    );

    // Up, but crashing right after its first durable write, before acknowledging anything.
    let mut crashing = s.spawn_daemon_env(&config, &[("GATEHOUSE_FAULT_CRASH_BEFORE_ACK", "1")]);
    assert!(crashing.wait_exit(), "the fault hook aborts the daemon");
    crashing.wait_log(&["aborting after the durable write"]);

    // Up again: the broker redelivers what was not acknowledged (DUP) and the rest.
    let d = s.start_daemon(&config);
    let got = a.listen(100);
    let (d1, d2): (Vec<_>, Vec<_>) = got.iter().map(seq).partition(|n| *n < 1000);
    assert_eq!(
        d1,
        (1..=50).collect::<Vec<_>>(),
        "device 1: all, once, in order"
    );
    assert_eq!(
        d2,
        (1001..=1050).collect::<Vec<_>>(),
        "device 2: all, once, in order"
    );
    d.wait_log(&["redelivered message already stored"]);
    // Nothing else was pending: the next message is the next one.
    s.broker.publish("devices/d1/up", br#"{"n":51}"#);
    assert_eq!(seq(&a.listen(1)[0]), 51);
    assert_eq!(d.status()["inbox_depth"], 0);
}
