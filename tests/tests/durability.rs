//! Durability of the inbound path with a real mosquitto: the daemon keeps a persistent MQTT
//! session, so messages published while it is down arrive after it starts, in order; a crash
//! between the durable write and the broker acknowledgement delivers the message once (the
//! broker's DUP redelivery is recognised); a sender's retry shows once at the receiver.

use gatehouse_e2e::*;

/// The payload (hex) of the daemon's `corrupt` dead letter, read with payloads.
fn corrupt_payload(d: &Daemon) -> serde_json::Value {
    let (code, body) = d.get("/dead-letters?payloads=true");
    assert_eq!(code, 200, "{body}");
    let kept: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let found = kept.iter().find(|k| k["kind"] == "corrupt");
    found.expect("a corrupt dead letter")["payload"].clone()
}

/// A daemon running with agent `agent` allowed (initialised), after device d1's first message
/// (`{"n":0}`) was published: the setup, the agent, the config file and the daemon.
fn running(name: &str) -> (Setup, Agent, std::path::PathBuf, Daemon) {
    let s = Setup::new(name);
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = s.write_config(&[&inbox]);
    let d = s.start_daemon(&config);
    a.init();
    s.broker.publish("devices/d1/up", br#"{"n":0}"#);
    (s, a, config, d)
}

fn seq(m: &serde_json::Value) -> u64 {
    let v: serde_json::Value = serde_json::from_str(m["text"].as_str().unwrap()).unwrap();
    v["n"].as_u64().unwrap()
}

#[test]
fn crash_before_ack_and_downtime_lose_nothing_and_duplicate_nothing() {
    let (s, a, config, mut d) = running("durability");
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

/// A queue record that no longer parses (a damaged disk, a hand edit) is set aside as a
/// `corrupt` dead letter that keeps its bytes, and the messages queued after it are carried,
/// in order.
#[test]
fn a_corrupt_queue_record_is_dead_lettered_and_the_rest_carried() {
    let (s, a, config, mut d) = running("durability-corrupt");
    assert_eq!(seq(&a.listen(1)[0]), 0);
    d.stop();

    // Down: three messages wait at the broker, and the queue's head is a record cut short.
    let line = |n: u64| format!("{{\"n\":{n}}}");
    s.broker
        .publish_lines("devices/d1/up", &(1..=3).map(line).collect::<Vec<_>>());
    let damaged: &[u8] = br#"{"device":"d1","topic":"devices/d1/up","payl"#;
    {
        let db = sled::open(s.dir.join("data/bridge")).unwrap();
        let mut key = b"devices\0".to_vec();
        key.extend_from_slice(&0u64.to_be_bytes());
        db.open_tree("inbox").unwrap().insert(key, damaged).unwrap();
        db.flush().unwrap();
    }

    let d = s.start_daemon(&config);
    let got: Vec<u64> = a.listen(3).iter().map(seq).collect();
    assert_eq!(got, [1, 2, 3], "the rest of the queue, once each, in order");
    let dl = d.wait_dead_letter("the damaged record", |d| d["kind"] == "corrupt");
    assert_eq!(dl["route"], "devices");
    assert_eq!(dl["bytes"], damaged.len());
    let reason = dl["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("corrupt queue record (cut short at line 1 column"),
        "{reason}"
    );
    assert!(
        !reason.contains("d1"),
        "the reason quotes no content: {reason}"
    );
    d.wait_log(&["message dead-lettered", "kind=\"corrupt\""]);
    assert_eq!(
        corrupt_payload(&d),
        hex::encode(damaged),
        "the bytes are kept as stored"
    );
    assert_eq!(d.status()["inbox_depth"], 0);
    assert_eq!(d.dead_letters().len(), 1, "{:?}", d.dead_letters());
}

/// An owed answer whose record in the endpoint's store no longer parses is set aside as an
/// outbound `corrupt` dead letter that keeps its bytes, and the answers after it still reach
/// the device.
#[test]
fn a_corrupt_owed_answer_is_dead_lettered_and_the_next_ones_published() {
    let (s, a, config, mut d) = running("durability-corrupt-out");
    let endpoint = a.listen(1)[0]["sender_inbox"].as_str().unwrap().to_string();
    d.stop();

    // Down: the endpoint's store owes one answer whose record is cut short.
    let damaged: &[u8] = br#"{"content":"6f6e","received":{"id"#;
    {
        let db = sled::open(s.dir.join("data/bridge")).unwrap();
        let mut key = b"deliv/".to_vec();
        key.extend_from_slice(&0u64.to_be_bytes());
        db.open_tree("ep/mqtt/devices/d1")
            .unwrap()
            .insert(key, damaged)
            .unwrap();
        db.flush().unwrap();
    }

    let down = s.broker.subscribe("devices/d1/down");
    let mut d = s.start_daemon(&config);
    a.send(&endpoint, "after");
    assert_eq!(down.next_message(), "after", "the answers after it go out");
    let dl = d.wait_dead_letter("the damaged answer", |d| d["kind"] == "corrupt");
    assert_eq!(dl["direction"], "outbound");
    assert_eq!(
        (dl["route"].as_str(), dl["device"].as_str()),
        (Some("devices"), Some("d1"))
    );
    assert_eq!(dl["bytes"], damaged.len());
    let reason = dl["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("corrupt owed answer (cut short"),
        "{reason}"
    );
    assert_eq!(
        corrupt_payload(&d),
        hex::encode(damaged),
        "the bytes are kept as stored"
    );

    // Set aside once: after a restart it is not owed, nor dead-lettered, again.
    d.stop();
    let d = s.start_daemon(&config);
    a.send(&endpoint, "later");
    assert_eq!(down.next_message(), "later");
    assert_eq!(d.dead_letters().len(), 1, "{:?}", d.dead_letters());
}

/// A crash after the daemon read an agent's messages from the conversation but before it
/// published them to the device: after the restart they are published, in order, and the
/// conversation's cursor did not skip them.
#[test]
fn crash_before_publish_loses_no_agent_message() {
    let s = Setup::new("durability-out");
    // The node runs on its own, so the agent can write while the daemon is down.
    let node = StandaloneNode::start(&s.dir);
    let a = Agent::at(s.dir.join("agent"), node.url.clone());
    let inbox = a.inbox_id();
    let config = s.write_config_external(&node.url, &[&inbox]);
    let mut d = s.start_daemon(&config);
    a.init();
    s.broker.publish("devices/d1/up", br#"{"n":0}"#);
    let endpoint = a.listen(1)[0]["sender_inbox"].as_str().unwrap().to_string();
    d.stop();

    let down = s.broker.subscribe("devices/d1/down");
    for text in ["one", "two", "three"] {
        a.send(&endpoint, text);
    }
    // Reads the three messages, then dies before publishing any.
    let mut crashing =
        s.spawn_daemon_env(&config, &[("GATEHOUSE_FAULT_CRASH_BEFORE_PUBLISH", "1")]);
    assert!(crashing.wait_exit(), "the fault hook aborts the daemon");
    crashing.wait_log(&["aborting before publishing"]);
    assert!(
        down.drain(std::time::Duration::from_millis(200)).is_empty(),
        "nothing was published before the crash"
    );

    let _d = s.start_daemon(&config);
    let got: Vec<String> = (0..3).map(|_| down.next_message()).collect();
    assert_eq!(got, ["one", "two", "three"]);
    a.send(&endpoint, "four");
    assert_eq!(down.next_message(), "four", "nothing owed twice");
}

/// A route whose reply topic is also its subscribe topic: the bridge's own publishes are not
/// taken back in as device messages, so the counts stay exact.
#[test]
fn own_publishes_do_not_echo() {
    let s = Setup::new("echo");
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = s.dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "data_dir: data\nnode: {{listen: 127.0.0.1:{}}}\nadmin: {{listen: 127.0.0.1:{}}}\npoll_interval_ms: 100\n\
             channels: {{mqtt: {{port: {}, client_id: gatehouse-echo}}}}\nplugins: {{mqtt: {{builtin: mqtt}}}}\n\
             routes:\n  - {{name: loop, channel: mqtt, subscribe: \"loop/{{device}}/io\", reply: \"loop/{{device}}/io\", plugin: mqtt, agents: [\"{inbox}\"]}}\n",
            s.node_port, s.admin_port, s.broker.port
        ),
    )
    .unwrap();
    let d = s.start_daemon(&config);
    a.init();
    let topic = s.broker.subscribe("loop/d1/io");
    s.broker.publish("loop/d1/io", br#"{"n":1}"#);
    let got = a.listen(1);
    assert_eq!(seq(&got[0]), 1);
    let endpoint = got[0]["sender_inbox"].as_str().unwrap().to_string();
    for i in 0..5 {
        a.send(&endpoint, &format!("{{\"cmd\":{i}}}"));
    }
    let mut on_topic: Vec<String> = (0..6).map(|_| topic.next_message()).collect();
    s.broker.publish("loop/d1/io", br#"{"n":2}"#);
    assert_eq!(
        seq(&a.listen(1)[0]),
        2,
        "the next message is the device's, not an echo"
    );
    on_topic.push(topic.next_message());
    assert_eq!(
        on_topic,
        [
            r#"{"n":1}"#,
            r#"{"cmd":0}"#,
            r#"{"cmd":1}"#,
            r#"{"cmd":2}"#,
            r#"{"cmd":3}"#,
            r#"{"cmd":4}"#,
            r#"{"n":2}"#
        ]
    );
    // Nothing more arrives on either side (an echo would loop back to the agent).
    let extra = a.ok(&["listen", "--json", "--timeout", "3"]);
    assert!(extra.trim().is_empty(), "echoed: {extra}");
    assert!(
        topic
            .drain(std::time::Duration::from_millis(300))
            .is_empty()
    );
    assert!(d.dead_letters().is_empty(), "{:?}", d.dead_letters());
}

/// The XMTP node restarts in the middle of a stream of device messages: the daemon retries
/// (the queue waits, in order), and once the node is back every message arrives exactly once.
#[test]
fn node_restart_mid_stream_loses_and_duplicates_nothing() {
    let s = Setup::new("node-restart");
    let node_port = free_port();
    let node = StandaloneNode::start_on(&s.dir, node_port);
    let a = Agent::at(s.dir.join("agent"), node.url.clone());
    let inbox = a.inbox_id();
    let config = s.write_config_external(&node.url, &[&inbox]);
    let d = s.start_daemon(&config);
    a.init();
    let line = |n: u64| format!("{{\"n\":{n}}}");
    s.broker
        .publish_lines("devices/d1/up", &(0..20).map(line).collect::<Vec<_>>());
    let mut got: Vec<u64> = a.listen(20).iter().map(seq).collect();

    // The node goes away; devices keep publishing.
    drop(node);
    s.broker
        .publish_lines("devices/d1/up", &(20..60).map(line).collect::<Vec<_>>());
    d.wait_log(&["delivery failed; will retry"]);
    assert!(
        d.status()["inbox_depth"].as_u64().unwrap() > 0,
        "held in the queue"
    );
    let _node = StandaloneNode::start_on(&s.dir, node_port);
    s.broker
        .publish_lines("devices/d1/up", &(60..80).map(line).collect::<Vec<_>>());
    got.extend(a.listen(60).iter().map(seq));
    assert_eq!(got, (0..80).collect::<Vec<_>>());
    let extra = a.ok(&["listen", "--json", "--timeout", "2"]);
    assert!(extra.trim().is_empty(), "duplicates: {extra}");
    assert_eq!(d.status()["inbox_depth"], 0);
}

/// Issue 7, acceptance 4: the daemon is down while 10 devices publish 1,000 messages (its MQTT
/// session is persistent, so the broker keeps them) and the agent sends 100 (the node keeps
/// them); once it starts, everything arrives, each once, in order per device.
#[test]
fn downtime_catch_up_1000_up_and_100_down_in_order() {
    const DEVICES: u64 = 10;
    let s = Setup::new("downtime");
    let node = StandaloneNode::start(&s.dir);
    let a = Agent::at(s.dir.join("agent"), node.url.clone());
    let inbox = a.inbox_id();
    let config = s.write_config_external(&node.url, &[&inbox]);
    let mut d = s.start_daemon(&config);
    a.init();
    // Each device says hello first, so the agent knows its endpoint.
    let endpoint = s.hello_endpoints(&a, DEVICES);
    let down = s.broker.subscribe("devices/+/down");
    d.stop();

    // Down: devices publish 1,000 (100 each, in parallel) and the agent sends 100 (10 each).
    std::thread::scope(|scope| {
        for dev in 0..DEVICES {
            let broker = &s.broker;
            scope.spawn(move || {
                let lines: Vec<String> = (0..100)
                    .map(|n| format!("{{\"d\":{dev},\"n\":{n}}}"))
                    .collect();
                broker.publish_lines(&format!("devices/dev{dev}/up"), &lines);
            });
        }
        for k in 0..10 {
            for dev in 0..DEVICES {
                a.send(&endpoint[&dev], &format!("{{\"to\":{dev},\"k\":{k}}}"));
            }
        }
    });

    let _d = s.start_daemon(&config);
    let mut up: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for m in a.listen_within(1000, std::time::Duration::from_secs(300)) {
        let v: serde_json::Value = serde_json::from_str(m["text"].as_str().unwrap()).unwrap();
        up.entry(v["d"].as_u64().unwrap())
            .or_default()
            .push(v["n"].as_u64().unwrap());
    }
    let mut downs: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for _ in 0..100 {
        let v: serde_json::Value = serde_json::from_str(&down.next_message()).unwrap();
        downs
            .entry(v["to"].as_u64().unwrap())
            .or_default()
            .push(v["k"].as_u64().unwrap());
    }
    for dev in 0..DEVICES {
        assert_eq!(
            up[&dev],
            (0..100).collect::<Vec<_>>(),
            "device {dev} → agent"
        );
        assert_eq!(
            downs[&dev],
            (0..10).collect::<Vec<_>>(),
            "agent → device {dev}"
        );
    }
    // Nothing more on either side.
    let extra = a.ok(&["listen", "--json", "--timeout", "2"]);
    assert!(extra.trim().is_empty(), "duplicates: {extra}");
    assert!(
        down.drain(std::time::Duration::from_millis(500)).is_empty(),
        "duplicates towards the devices"
    );
}

/// Issue 7, acceptance 2: mosquitto is stopped and restarted (it keeps its sessions on disk)
/// in the middle of a stream; messages published before the restart, to the restarted broker
/// before the daemon is back, and after, all arrive once, in order. The daemon's own
/// publishes towards a device, made while the broker is down, arrive too, in order.
#[test]
fn broker_restart_mid_stream_loses_and_duplicates_nothing() {
    broker_restart_mid_stream("3.1.1");
}

/// The same with the daemon's broker connection on MQTT 5 (its own connection loop).
#[test]
fn broker_restart_mid_stream_loses_and_duplicates_nothing_mqtt5() {
    broker_restart_mid_stream("5");
}

fn broker_restart_mid_stream(protocol: &str) {
    let mut s = Setup::new(&format!("broker-restart-{}", protocol.replace('.', "")));
    s.broker = Mosquitto::start_persistent(&s.dir);
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = s.write_config(&[&inbox]);
    let text = std::fs::read_to_string(&config).unwrap();
    let with_protocol = text.replace(
        "client_id: gatehouse-e2e",
        &format!("client_id: gatehouse-e2e, protocol: \"{protocol}\""),
    );
    assert_ne!(with_protocol, text, "the harness config changed shape");
    std::fs::write(&config, with_protocol).unwrap();
    let d = s.start_daemon(&config);
    a.init();
    let line = |n: u64| format!("{{\"n\":{n}}}");
    s.broker
        .publish_lines("devices/d1/up", &(0..50).map(line).collect::<Vec<_>>());
    let first = a.listen(50);
    let mut got: Vec<u64> = first.iter().map(seq).collect();
    let endpoint = first[0]["sender_inbox"].as_str().unwrap().to_string();

    // The device keeps a session at the broker, so what reaches the broker for it while it is
    // reconnecting waits there.
    let device = s
        .broker
        .subscribe_session("devices/d1/down", "e2e-device-d1");
    a.ok(&["send", "--to", &endpoint, "before 0"]);
    assert_eq!(device.next_message(), "before 0");

    s.broker.stop();
    // Sent while the broker is down: the daemon holds them until it is back.
    let during: Vec<String> = (0..10).map(|k| format!("during {k}")).collect();
    for m in &during {
        a.ok(&["send", "--to", &endpoint, m]);
    }
    s.broker.start_again();
    // Straight away: the daemon has not reconnected yet (its retry waits at least 200 ms).
    s.broker
        .publish_lines("devices/d1/up", &(50..100).map(line).collect::<Vec<_>>());
    wait_for("the daemon to reconnect", || {
        (d.log_text().matches("MQTT connected").count() >= 2).then_some(())
    });
    s.broker
        .publish_lines("devices/d1/up", &(100..150).map(line).collect::<Vec<_>>());
    got.extend(a.listen(100).iter().map(seq));
    assert_eq!(got, (0..150).collect::<Vec<_>>(), "MQTT {protocol}");
    let extra = a.ok(&["listen", "--json", "--timeout", "2"]);
    assert!(extra.trim().is_empty(), "duplicates: {extra}");

    // QoS 1 towards the device: each once at least, in order (a publish the broker took just
    // before it stopped may come again).
    let mut down: Vec<String> = Vec::new();
    while down.len() < during.len() {
        let m = device.next_message();
        if !down.contains(&m) {
            down.push(m);
        }
    }
    assert_eq!(down, during, "MQTT {protocol}: towards the device");
}
