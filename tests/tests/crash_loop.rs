//! A small crash loop: 1,000 QoS 1 messages from 10 devices, 3 SIGKILLs (see
//! [`gatehouse_e2e::crash_loop`]; issue 7's full size is `crash_loop_full.rs`, a binary of its
//! own so that it runs alone).

use std::time::Duration;

use gatehouse_e2e::*;

#[test]
fn small_crash_loop_delivers_every_message_once_in_order() {
    crash_loop("crash-loop", 10, 100, 3, Duration::from_secs(300));
}

/// The other way, exactly once: the agent sends 1,000 messages to 10 devices while the daemon
/// is SIGKILLed 5 times, with `publish_qos: 2` and the devices subscribed with QoS 2. Every
/// message reaches its device once, in order (the QoS 2 journal resends an interrupted publish
/// under its packet id, or only releases it once the broker had it).
#[test]
fn reverse_crash_loop_delivers_every_message_once_in_order() {
    const DEVICES: u64 = 10;
    const PER_DEVICE: u64 = 100;
    let s = Setup::new("crash-loop-reverse");
    // The node runs on its own, so the agent keeps sending while the daemon is down.
    let node = StandaloneNode::start(&s.dir);
    let a = Agent::at(s.dir.join("agent"), node.url.clone());
    let inbox = a.inbox_id();
    let config = s.write_config_external(&node.url, &[&inbox]);
    let text = std::fs::read_to_string(&config).unwrap();
    let qos2 = text.replace(
        "client_id: gatehouse-e2e",
        "client_id: gatehouse-e2e, publish_qos: 2",
    );
    assert_ne!(text, qos2, "the harness config changed shape");
    std::fs::write(&config, qos2).unwrap();
    let mut d = s.start_daemon(&config);
    a.init();
    let endpoint = s.hello_endpoints(&a, DEVICES);
    let down = s.broker.subscribe_qos("devices/+/down", 2);

    std::thread::scope(|scope| {
        let (a, endpoint) = (&a, &endpoint);
        scope.spawn(move || {
            for dev in 0..DEVICES {
                let lines: String = (0..PER_DEVICE)
                    .map(|k| format!("{{\"to\":{dev},\"k\":{k}}}\n"))
                    .collect();
                a.send_lines(&endpoint[&dev], &lines);
            }
        });
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..5 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            std::thread::sleep(std::time::Duration::from_millis(300 + seed % 1500));
            d.kill9();
            d = s.start_daemon(&config);
        }
    });

    let mut got: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for _ in 0..DEVICES * PER_DEVICE {
        let v: serde_json::Value = serde_json::from_str(&down.next_message()).unwrap();
        got.entry(v["to"].as_u64().unwrap())
            .or_default()
            .push(v["k"].as_u64().unwrap());
    }
    for dev in 0..DEVICES {
        assert_eq!(
            got[&dev],
            (0..PER_DEVICE).collect::<Vec<_>>(),
            "device {dev}: every message once, in order"
        );
    }
    // Nothing more is on its way: a marker published now is the next thing the devices see.
    s.broker
        .publish("devices/marker/down", b"{\"marker\":true}");
    assert_eq!(
        down.next_message(),
        "{\"marker\":true}",
        "a message arrived twice"
    );
    let resumed = std::fs::read_dir(&s.dir)
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter(|log| log.contains("resuming QoS 2 publishes a restart interrupted"))
        .count();
    eprintln!(
        "reverse crash loop: 1,000 messages once each; {resumed} restarts resumed journalled QoS 2 publishes"
    );
}
