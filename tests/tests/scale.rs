//! Issue 12 (scale): endpoints are cheap until used. Past `storage.open_endpoints` the least
//! recently used endpoints close (their protocol state leaves memory) and open again on use,
//! losing nothing; a start with endpoints on disk opens none of them, and still finds what
//! reached them while the daemon was down (messages in their conversations, and a
//! conversation started with one of them).

use gatehouse_e2e::*;

#[test]
fn endpoints_past_open_endpoints_close_and_reopen_losing_nothing() {
    const DEVICES: u64 = 6;
    let s = Setup::new("scale-open");
    let node = StandaloneNode::start(&s.dir);
    let a = Agent::at(s.dir.join("agent"), node.url.clone());
    let inbox = a.inbox_id();
    let config = s.write_config_external(&node.url, &[&inbox]);
    let text = std::fs::read_to_string(&config).unwrap() + "storage: {open_endpoints: 2}\n";
    std::fs::write(&config, text).unwrap();
    let mut d = s.start_daemon(&config);
    a.init();
    let endpoint = s.hello_endpoints(&a, DEVICES);
    let down = s.broker.subscribe("devices/+/down");

    // Round robin over six endpoints with room for two: each is closed and opened again
    // between its messages.
    for k in 0..3 {
        for dev in 0..DEVICES {
            a.send(&endpoint[&dev], &format!("{{\"to\":{dev},\"k\":{k}}}"));
        }
    }
    let mut got: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for _ in 0..3 * DEVICES {
        let v: serde_json::Value = serde_json::from_str(&down.next_message()).unwrap();
        got.entry(v["to"].as_u64().unwrap())
            .or_default()
            .push(v["k"].as_u64().unwrap());
    }
    for dev in 0..DEVICES {
        assert_eq!(got[&dev], vec![0, 1, 2], "agent → device {dev}");
    }
    // And the devices answer through them.
    for dev in 0..DEVICES {
        s.broker.publish(
            &format!("devices/dev{dev}/up"),
            format!("{{\"answer\":{dev}}}").as_bytes(),
        );
    }
    let mut answers: Vec<u64> = a
        .listen(DEVICES as usize)
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_str(m["text"].as_str().unwrap()).unwrap();
            v["answer"].as_u64().unwrap()
        })
        .collect();
    answers.sort();
    assert_eq!(answers, (0..DEVICES).collect::<Vec<_>>());
    let status = wait_for("at most 2 endpoints open in memory", || {
        let v = d.status();
        (v["open_endpoints"].as_u64() <= Some(2)).then_some(v)
    });
    assert_eq!(status["endpoints"], DEVICES, "{status}");

    // While the daemon is down the agent writes to every endpoint and starts a new
    // conversation with one of them (a welcome it has to find at the start).
    d.stop();
    for dev in 0..DEVICES {
        a.send(&endpoint[&dev], &format!("{{\"to\":{dev},\"k\":3}}"));
    }
    let gid = a
        .ok(&[
            "group",
            "create",
            "--name",
            "late",
            "--member",
            &endpoint[&0],
        ])
        .trim()
        .to_string();
    a.ok(&["send", "--conversation", &gid, "{\"to\":0,\"k\":4}"]);
    let mut d = s.start_daemon(&config);
    let mut got: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for _ in 0..DEVICES + 1 {
        let v: serde_json::Value = serde_json::from_str(&down.next_message()).unwrap();
        got.entry(v["to"].as_u64().unwrap())
            .or_default()
            .push(v["k"].as_u64().unwrap());
    }
    // Two conversations: order holds within each, not across them.
    let mut first = got[&0].clone();
    first.sort();
    assert_eq!(first, vec![3, 4], "device 0: its DM and the new group");
    for dev in 1..DEVICES {
        assert_eq!(got[&dev], vec![3], "agent → device {dev} while down");
    }
    assert!(
        down.drain(std::time::Duration::from_millis(500)).is_empty(),
        "duplicates towards the devices"
    );

    // A start with nothing new for them checks them for news and opens none.
    d.stop();
    let d = s.spawn_daemon_env(
        &config,
        &[("GATEHOUSE_LOG", "info,gatehouse::bridge=debug")],
    );
    let line = d.wait_log(&["endpoints newly followed"]);
    assert!(
        line.contains("checked=6") && line.contains("to_read=0"),
        "{line}"
    );
    let status = d.status();
    assert_eq!(status["open_endpoints"], 0, "{status}");
}
