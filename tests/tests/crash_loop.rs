//! A small crash loop: 1,000 QoS 1 messages from 10 devices, 3 SIGKILLs (see
//! [`gatehouse_e2e::crash_loop`]; issue 7's full size is `crash_loop_full.rs`, a binary of its
//! own so that it runs alone).

use std::time::Duration;

use gatehouse_e2e::*;

#[test]
fn small_crash_loop_delivers_every_message_once_in_order() {
    crash_loop("crash-loop", 10, 100, 3, Duration::from_secs(300));
}

/// The other way: the agent sends 1,000 messages to 10 devices while the daemon is SIGKILLed
/// 5 times. Every message reaches its device, and each device sees them in order (a message
/// may come twice: a crash between the broker's PUBACK and marking it done publishes it again,
/// so only first arrivals are checked for order; exactly once needs QoS 2, see README).
#[test]
fn reverse_crash_loop_loses_nothing_and_keeps_order() {
    const DEVICES: u64 = 10;
    const PER_DEVICE: u64 = 100;
    let s = Setup::new("crash-loop-reverse");
    // The node runs on its own, so the agent keeps sending while the daemon is down.
    let node = StandaloneNode::start(&s.dir);
    let a = Agent::at(s.dir.join("agent"), node.url.clone());
    let inbox = a.inbox_id();
    let config = s.write_config_external(&node.url, &[&inbox]);
    let mut d = s.start_daemon(&config);
    a.init();
    let endpoint = s.hello_endpoints(&a, DEVICES);
    let down = s.broker.subscribe("devices/+/down");

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

    let mut first: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    let mut seen = std::collections::BTreeSet::new();
    let mut arrivals = 0u64;
    while seen.len() < (DEVICES * PER_DEVICE) as usize {
        let v: serde_json::Value = serde_json::from_str(&down.next_message()).unwrap();
        let (dev, k) = (v["to"].as_u64().unwrap(), v["k"].as_u64().unwrap());
        arrivals += 1;
        if seen.insert((dev, k)) {
            first.entry(dev).or_default().push(k);
        }
    }
    for dev in 0..DEVICES {
        assert_eq!(
            first[&dev],
            (0..PER_DEVICE).collect::<Vec<_>>(),
            "device {dev}: every message, first arrivals in order"
        );
    }
    eprintln!(
        "reverse crash loop: {} messages, {} arrivals ({} again after a crash)",
        seen.len(),
        arrivals,
        arrivals - seen.len() as u64
    );
}
