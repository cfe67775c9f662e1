//! Operations: Prometheus metrics move by exactly what was carried; `/ready` follows the
//! broker connection.

use gatehouse_e2e::*;

#[test]
fn metrics_count_exactly_and_ready_follows_the_broker() {
    let mut s = Setup::new("ops-metrics");
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = s.write_config(&[&inbox]);
    let d = s.start_daemon(&config);
    a.init();
    let scrape = || {
        let (code, body) = d.get("/metrics");
        assert_eq!(code, 200, "{body}");
        body
    };
    let route = [("route", "devices"), ("channel", "mqtt")];
    let m = scrape();
    assert_eq!(
        metric(&m, "gatehouse_connector_up", &[("connector", "mqtt")]),
        1.0
    );
    assert_eq!(metric(&m, "gatehouse_ready", &[]), 1.0);

    // 25 device messages in: received, delivered, one plugin call each.
    let lines: Vec<String> = (0..25).map(|n| format!("{{\"n\":{n}}}")).collect();
    let bytes: usize = lines.iter().map(String::len).sum();
    s.broker.publish_lines("devices/t1/up", &lines);
    let got = a.listen(25);
    assert_eq!(got.len(), 25);
    let m = wait_for("the delivered counter", || {
        let m = scrape();
        (metric(&m, "gatehouse_messages_delivered_total", &route) == 25.0).then_some(m)
    });
    assert_eq!(
        metric(&m, "gatehouse_messages_received_total", &route),
        25.0
    );
    assert_eq!(
        metric(&m, "gatehouse_received_bytes_total", &route),
        bytes as f64
    );
    assert_eq!(
        metric(&m, "gatehouse_plugin_calls_total", &[("plugin", "mqtt")]),
        25.0
    );
    assert_eq!(
        metric(
            &m,
            "gatehouse_plugin_call_seconds_count",
            &[("plugin", "mqtt")]
        ),
        25.0
    );
    assert_eq!(
        metric(&m, "gatehouse_queue_depth", &[("route", "devices")]),
        0.0
    );
    assert_eq!(metric(&m, "gatehouse_dead_letters", &[]), 0.0);
    assert_eq!(metric(&m, "gatehouse_endpoints", &[]), 1.0);
    // Every message was made durable before its acknowledgement: the flushes are timed.
    assert!(
        metric(&m, "gatehouse_store_flush_seconds_count", &[]) >= 1.0,
        "no timed flush"
    );

    // 7 agent messages out: 7 publishes confirmed by the broker.
    let endpoint = got[0]["sender_inbox"].as_str().unwrap().to_string();
    let down = s.broker.subscribe("devices/t1/down");
    for n in 0..7 {
        a.ok(&["send", "--to", &endpoint, &format!("cmd {n}")]);
        assert_eq!(down.next_message(), format!("cmd {n}"));
    }
    let m = wait_for("the publish counter", || {
        let m = scrape();
        (metric(&m, "gatehouse_publishes_total", &route) == 7.0).then_some(m)
    });
    assert_eq!(
        metric(&m, "gatehouse_published_bytes_total", &route),
        (0..7).map(|n| format!("cmd {n}").len()).sum::<usize>() as f64
    );
    // The way back reads the messages the node's gap-free stream brought, without asking
    // the node again: after the endpoint's first (full) read, the agent's messages, sent one
    // at a time, are read from the stream (one pass each; the count allows for a stream
    // opened again in between, which makes a pass ask).
    let reads = |kind: &str| {
        metric(
            &m,
            "gatehouse_endpoint_reads_total",
            &[("route", "devices"), ("read", kind)],
        )
    };
    assert!(
        reads("streamed") >= 3.0 && reads("full") >= 1.0,
        "reads: full {}, news {}, streamed {}",
        reads("full"),
        reads("news"),
        reads("streamed")
    );
    assert_eq!(
        metric(&m, "gatehouse_plugin_calls_total", &[("plugin", "mqtt")]),
        32.0
    );
    // A malformed payload (the plugin wants JSON) is one dead letter.
    s.broker.publish("devices/t1/up", b"not json");
    let m = wait_for("the dead-letter counter", || {
        let m = scrape();
        (metric(&m, "gatehouse_dead_letters", &[]) == 1.0).then_some(m)
    });
    assert_eq!(
        metric(
            &m,
            "gatehouse_dead_letters_total",
            &[("route", "devices"), ("direction", "inbound")]
        ),
        1.0
    );
    assert_eq!(
        metric(&m, "gatehouse_messages_received_total", &route),
        26.0
    );

    // The CLI: `status` for people, `routes` as a table and as JSON.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(gatehouse_bin())
            .args(args)
            .args(["--admin", &d.admin])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let status = cli(&["status"]);
    assert!(status.contains("ready          yes"), "{status}");
    assert!(status.contains("mqtt           Connected"), "{status}");
    assert!(status.contains("dead letters   1"), "{status}");
    let table = cli(&["routes"]);
    assert!(
        table
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("devices") && l.contains("devices/{device}/up")),
        "{table}"
    );
    let routes: serde_json::Value = serde_json::from_str(&cli(&["routes", "--json"])).unwrap();
    assert_eq!(routes[0]["name"], "devices");
    assert_eq!(routes[0]["queued"], 0);
    assert_eq!(routes[0]["agents"][0], inbox.as_str());
    // The endpoint's consent records: the route's agent is allowed.
    let consent: serde_json::Value =
        serde_json::from_str(&cli(&["consent", "list", "--json", "--endpoint", "t1"])).unwrap();
    assert_eq!(consent[0]["endpoint"], "t1");
    assert!(
        consent[0]["records"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["entity"] == inbox.as_str() && r["state"] == "allowed"),
        "{consent}"
    );
    let table = cli(&["consent", "list"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("t1") && l.contains("allowed") && l.contains(&inbox)),
        "{table}"
    );

    // The broker goes away: not ready (503, with the reason), connector down; back: ready.
    s.broker.stop();
    let (code, body) = wait_for("/ready to turn 503", || {
        let r = d.get("/ready");
        (r.0 == 503).then_some(r)
    });
    assert_eq!(code, 503);
    assert!(body.contains("MQTT broker not connected"), "{body}");
    let m = scrape();
    assert_eq!(
        metric(&m, "gatehouse_connector_up", &[("connector", "mqtt")]),
        0.0
    );
    assert_eq!(metric(&m, "gatehouse_ready", &[]), 0.0);
    assert_eq!(d.status()["ready"], false);
    s.broker.start_again();
    wait_for("/ready to turn 200 again", || {
        (d.get("/ready").0 == 200).then_some(())
    });
    let m = scrape();
    assert_eq!(
        metric(&m, "gatehouse_connector_up", &[("connector", "mqtt")]),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "gatehouse_connector_state",
            &[("connector", "mqtt"), ("state", "connected")]
        ),
        1.0
    );
}

fn seq(m: &serde_json::Value) -> u64 {
    let v: serde_json::Value = serde_json::from_str(m["text"].as_str().unwrap()).unwrap();
    v["n"].as_u64().unwrap()
}

/// SIGTERM in the middle of a 1,000-message stream: the daemon finishes what it holds and exits
/// 0 within its grace period; after a restart every message reaches the agent exactly once, in
/// order.
#[test]
fn sigterm_mid_stream_exits_0_and_loses_and_duplicates_nothing() {
    let s = Setup::new("ops-sigterm");
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = s.write_config(&[&inbox]);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("shutdown_grace_secs: 5\n");
    std::fs::write(&config, text).unwrap();
    let mut d = s.start_daemon(&config);
    a.init();
    let lines: Vec<String> = (0..1000).map(|n| format!("{{\"n\":{n}}}")).collect();
    s.broker.publish_lines("devices/t1/up", &lines);
    // Mid-stream: the agent has some, the rest are on their way.
    let mut got: Vec<u64> = a.listen(100).iter().map(seq).collect();
    let (status, took) = d.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(
        took < std::time::Duration::from_secs(5 + 5),
        "the daemon took {took:?} to stop; its grace period is 5 s"
    );
    let log = d.log_text();
    assert!(
        log.contains("in-flight work finished") && log.contains("gatehouse stopped"),
        "{log}"
    );
    let before = got.len();
    let _d = s.start_daemon(&config);
    while got.len() < 1000 {
        let more = a.listen(1000 - got.len());
        assert!(!more.is_empty(), "stalled at {} of 1000", got.len());
        got.extend(more.iter().map(seq));
    }
    assert_eq!(
        got,
        (0..1000).collect::<Vec<_>>(),
        "lost, duplicated or reordered"
    );
    let extra = a.ok(&["listen", "--json", "--timeout", "2"]);
    assert!(
        extra.trim().is_empty(),
        "duplicates after the 1,000: {extra}"
    );
    assert!(before < 1000, "the stream was over before SIGTERM");
}

/// SIGHUP: an invalid config is refused (file:line:column in the log) and the daemon goes on
/// with the old one; a valid one with a new route is applied (graceful restart in the
/// process) and both the old and the new route carry messages.
#[test]
fn sighup_refuses_a_broken_config_and_applies_route_changes_in_place() {
    let s = Setup::new("ops-sighup");
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = s.write_config(&[&inbox]);
    let original = std::fs::read_to_string(&config).unwrap();
    let d = s.start_daemon(&config);
    a.init();
    s.broker.publish("devices/t1/up", br#"{"n":1}"#);
    assert_eq!(a.listen(1)[0]["text"], r#"{"n":1}"#);

    // Broken: refused with its position; the daemon keeps serving on the old config.
    std::fs::write(
        &config,
        original.replace(
            "client_id: gatehouse-e2e",
            "client_id: gatehouse-e2e, publish_qos: 7",
        ),
    )
    .unwrap();
    d.signal("HUP");
    d.wait_log(&[
        "SIGHUP: the new configuration is not valid",
        "publish_qos: 7 is not an MQTT QoS",
    ]);
    assert!(
        d.log_text().contains(&format!("{}:5:", config.display())),
        "no position in the log"
    );
    s.broker.publish("devices/t1/up", br#"{"n":2}"#);
    assert_eq!(a.listen(1)[0]["text"], r#"{"n":2}"#);

    // Valid, with a second route and its own plugin, sent while the first route is carrying
    // a stream: applied in place. The unchanged route and plugin run straight through (the
    // same broker connection, the same plugin instance, its call counter going on); the new
    // route and plugin start.
    let sensors = "  - {name: sensors, channel: mqtt, subscribe: \"sensors/{device}/up\", reply: \"sensors/{device}/down\", plugin: mqtt2, agents: [\"INBOX\"]}\n".replace("INBOX", &inbox);
    let with_sensors = original.replace(
        "plugins: {mqtt: {builtin: mqtt}}",
        "plugins: {mqtt: {builtin: mqtt}, mqtt2: {builtin: mqtt}}",
    ) + &sensors;
    let lines: Vec<String> = (0..300).map(|n| format!("{{\"s\":{n}}}")).collect();
    std::thread::scope(|scope| {
        scope.spawn(|| s.broker.publish_lines("devices/t1/up", &lines));
        std::fs::write(&config, &with_sensors).unwrap();
        d.signal("HUP");
        d.wait_log(&[
            "configuration reloaded in place",
            "routes added: sensors; plugins loaded: mqtt2",
        ]);
    });
    let got: Vec<String> = a
        .listen(300)
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        got, lines,
        "the unchanged route lost, repeated or reordered messages"
    );
    let log = d.log_text();
    assert_eq!(
        log.matches("gatehouse running").count(),
        1,
        "restarted: {log}"
    );
    assert_eq!(
        log.matches("MQTT connected").count(),
        1,
        "reconnected: {log}"
    );
    let mqtt = d.plugin("mqtt");
    assert_eq!(mqtt["reloads"], 0, "{mqtt}");
    assert_eq!(
        mqtt["calls"], 302,
        "the unchanged plugin was replaced: {mqtt}"
    );
    let routes = d.routes();
    assert_eq!(routes.len(), 2, "{routes:?}");
    s.broker.publish("sensors/s1/up", br#"{"n":3}"#);
    let m = &a.listen(1)[0];
    assert_eq!(m["text"], r#"{"n":3}"#);
    assert_eq!(m["sender_endpoint"]["address"], "sensors/s1/up");
    assert_eq!(d.plugin("mqtt2")["calls"], 1);

    // The new route's plugin changed: loaded again; the other one stays.
    std::fs::write(
        &config,
        with_sensors.replace(
            "mqtt2: {builtin: mqtt}",
            "mqtt2: {builtin: mqtt, deadline_ms: 400}",
        ),
    )
    .unwrap();
    d.signal("HUP");
    wait_for("the plugin change to be applied", || {
        (d.log_text().matches("plugins loaded: mqtt2").count() == 2).then_some(())
    });
    assert_eq!(d.plugin("mqtt2")["reloads"], 1);
    assert_eq!(d.plugin("mqtt")["reloads"], 0);

    // The route dropped: its topics are no longer taken in; the first route goes on.
    std::fs::write(&config, &original).unwrap();
    d.signal("HUP");
    d.wait_log(&["routes dropped: sensors; plugins dropped: mqtt2"]);
    assert_eq!(d.routes().len(), 1);
    s.broker.publish("sensors/s1/up", br#"{"n":5}"#);
    s.broker.publish("devices/t1/up", br#"{"n":4}"#);
    let m = a.listen(1);
    assert_eq!(m[0]["text"], r#"{"n":4}"#, "{m:?}");
    let extra = a.ok(&["listen", "--json", "--timeout", "2"]);
    assert!(
        extra.trim().is_empty(),
        "duplicates or a dropped route's message: {extra}"
    );

    // A channel setting changed: that needs a restart inside the process, which it gets.
    std::fs::write(
        &config,
        original.replace("client_id: gatehouse-e2e", "client_id: gatehouse-e2e-2"),
    )
    .unwrap();
    d.signal("HUP");
    d.wait_log(&["needs a restart", "channels changed"]);
    wait_for("the daemon to run on the new configuration", || {
        (d.log_text().matches("gatehouse running").count() == 2).then_some(())
    });
    s.broker.publish("devices/t1/up", br#"{"n":6}"#);
    assert_eq!(a.listen(1)[0]["text"], r#"{"n":6}"#);
}

/// The load harness works (tiny runs; their figures are not judged here): every path carries
/// every message, with the defaults, with the daemon on MQTT 5 at QoS 2, over NATS, over NATS
/// through a JetStream stream (which then holds every message of both ways), and in open loop
/// for a duration.
#[test]
fn the_load_harness_runs() {
    require("mosquitto", "mosquitto");
    require("nats-server", "nats-server");
    for (extra, version, qos, channel) in [
        (&[][..], Some(3), Some(1), "mqtt"),
        (&["--mqtt5", "--qos", "2"][..], Some(5), Some(2), "mqtt"),
        (&["--nats"][..], None, None, "nats"),
        (&["--nats", "--jetstream"][..], None, None, "nats-jetstream"),
    ] {
        let r = bench_json(
            &[
                &["--devices", "2", "--messages", "50", "--agent-batch", "7"][..],
                extra,
            ]
            .concat(),
        );
        for path in [
            "broker_hop",
            "crypto_bound",
            "device_to_agent",
            "agent_to_device",
            "device_to_node",
            "node_to_agent",
            "agent_to_node",
            "node_to_device",
        ] {
            assert_eq!(r[path]["messages"], 50, "{path}: {r}");
            assert!(
                r[path]["msg_per_sec"].as_f64().unwrap() > 0.0,
                "{path}: {r}"
            );
        }
        assert!(r["device_to_agent"]["p99_ms"].as_f64().is_some(), "{r}");
        // The end-to-end paths say what CPU they took (10 ms resolution: a tiny run may read 0).
        for path in ["device_to_agent", "agent_to_device"] {
            let us = r[path]["cpu_us_per_msg"].as_f64();
            let busy = r[path]["cpu_busy"].as_f64();
            assert!(us.is_some_and(|v| v >= 0.0), "{path}: {r}");
            assert!(busy.is_some_and(|v| v >= 0.0), "{path}: {r}");
        }
        assert!(r["broker_hop"]["cpu_us_per_msg"].is_null(), "{r}");
        // The way back went out 7 messages per publish, all 50 of them (checked above).
        assert_eq!(r["agent_batch"], 7, "{r}");
        assert_eq!(r["mqtt_version"], serde_json::json!(version), "{r}");
        assert_eq!(r["qos"], serde_json::json!(qos), "{r}");
        assert_eq!(r["channel"], channel, "{r}");
        assert!(r["e2e_over_crypto"].as_f64().unwrap() > 0.0, "{r}");
        if channel == "nats-jetstream" {
            // The 2 hellos, then 50 each way, all through the stream; the daemon's consumer.
            assert_eq!(r["jetstream"]["messages"], 2 + 50 + 50, "{r}");
            assert_eq!(r["jetstream"]["consumers"], 1, "{r}");
        } else {
            assert!(r["jetstream"].is_null(), "{r}");
        }
    }
    // Open loop for a duration: rate × seconds messages per path; the daemon's linger as asked.
    let r = bench_json(&[
        "--devices",
        "2",
        "--rate",
        "60",
        "--duration",
        "1",
        "--linger-ms",
        "0",
    ]);
    for path in ["device_to_agent", "agent_to_device"] {
        assert_eq!(r[path]["messages"], 60, "{path}: {r}");
    }
    assert_eq!(r["linger_ms"], 0, "{r}");
    assert!(r["mode"].as_str().unwrap().contains("60 msg/s"), "{r}");
    // A duration needs a rate: closed loop runs a message count.
    let out = std::process::Command::new(gatehouse_bin())
        .args(["bench", "--duration", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--rate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `gatehouse bench ARGS --json`, which must succeed, and returns its report.
fn bench_json(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(gatehouse_bin())
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bench {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A route whose deliveries keep failing (its XMTP node gone) makes the daemon not ready
/// after `stalled_after_secs`, with the route and the reason; it is ready again once the node
/// is back and the queue drains.
#[test]
fn a_stalled_route_makes_the_daemon_not_ready() {
    let s = Setup::new("ops-stalled");
    let node_port = free_port();
    let node = StandaloneNode::start_on(&s.dir, node_port);
    let a = Agent::at(s.dir.join("agent"), node.url.clone());
    let inbox = a.inbox_id();
    let config = s.write_config_external(&node.url, &[&inbox]);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("stalled_after_secs: 1\n");
    std::fs::write(&config, text).unwrap();
    let d = s.start_daemon(&config);
    a.init();
    s.broker.publish("devices/d1/up", br#"{"n":1}"#);
    assert_eq!(a.listen(1).len(), 1);
    assert_eq!(d.get("/ready").0, 200);

    drop(node);
    s.broker.publish("devices/d1/up", br#"{"n":2}"#);
    let (code, body) = wait_for("/ready to report the stalled route", || {
        let r = d.get("/ready");
        (r.0 == 503).then_some(r)
    });
    assert_eq!(code, 503);
    assert!(body.contains("route devices has not delivered"), "{body}");

    let _node = StandaloneNode::start_on(&s.dir, node_port);
    wait_for("/ready to turn 200 again", || {
        (d.get("/ready").0 == 200).then_some(())
    });
    let m = &a.listen(1)[0];
    assert_eq!(m["text"], r#"{"n":2}"#);
}

/// Pushes polling and the periodic check for news to ten minutes: only the node's streams can
/// bring the way back's news in time.
fn streams_only(config: &std::path::Path) {
    let text = std::fs::read_to_string(config)
        .unwrap()
        .replace("poll_interval_ms: 100", "poll_interval_ms: 600000")
        + "resync_interval_secs: 600\n";
    std::fs::write(config, text).unwrap();
}

/// The way back is driven by the node's streams, not by polling: with polling and the
/// periodic full read both set to ten minutes, an agent's messages still reach the device at
/// once — also after the node went away and came back (the streams are opened again and
/// what was sent meanwhile is read).
#[test]
fn agent_messages_reach_the_device_by_the_nodes_streams_not_by_polling() {
    let s = Setup::new("ops-streams");
    let node_port = free_port();
    let node = StandaloneNode::start_on(&s.dir, node_port);
    let a = Agent::at(s.dir.join("agent"), node.url.clone());
    let inbox = a.inbox_id();
    let config = s.write_config_external(&node.url, &[&inbox]);
    streams_only(&config);
    let d = s.start_daemon(&config);
    a.init();
    s.broker.publish("devices/d1/up", br#"{"n":1}"#);
    let endpoint = a.listen(1)[0]["sender_inbox"].as_str().unwrap().to_string();
    wait_for("the daemon to follow the node's streams", || {
        (d.status()["node"]["streaming"] == true).then_some(())
    });
    let down = s.broker.subscribe("devices/d1/down");
    for n in 0..3 {
        a.send(&endpoint, &format!("cmd {n}"));
    }
    for n in 0..3 {
        assert_eq!(down.next_message(), format!("cmd {n}"));
    }

    // The node goes away and comes back: the streams follow it.
    drop(node);
    wait_for("the daemon to notice the streams ended", || {
        (d.status()["node"]["streaming"] == false).then_some(())
    });
    let _node = StandaloneNode::start_on(&s.dir, node_port);
    wait_for("the streams to be followed again", || {
        (d.status()["node"]["streaming"] == true).then_some(())
    });
    a.send(&endpoint, "after the restart");
    assert_eq!(down.next_message(), "after the restart");
}

/// One conversation can hold several endpoints of this bridge (an agent's group with two
/// devices): the node's stream wakes each of them, not only the one noted last — with polling
/// and the periodic check at ten minutes, the agent's message reaches both devices at once.
#[test]
fn a_group_with_two_devices_reaches_both_by_the_streams() {
    let s = Setup::new("ops-group-two");
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = s.write_config(&[&inbox]);
    streams_only(&config);
    let d = s.start_daemon(&config);
    a.init();
    let mut endpoints = Vec::new();
    for dev in ["d1", "d2"] {
        s.broker
            .publish(&format!("devices/{dev}/up"), br#"{"hello":1}"#);
        endpoints.push(a.listen(1)[0]["sender_inbox"].as_str().unwrap().to_string());
    }
    wait_for("the daemon to follow the node's streams", || {
        (d.status()["node"]["streaming"] == true).then_some(())
    });
    let downs: Vec<_> = ["d1", "d2"]
        .iter()
        .map(|dev| s.broker.subscribe(&format!("devices/{dev}/down")))
        .collect();
    let gid = a
        .ok(&[
            "group",
            "create",
            "--name",
            "both",
            "--member",
            &endpoints[0],
            "--member",
            &endpoints[1],
        ])
        .trim()
        .to_string();
    for n in 0..3 {
        a.ok(&["send", "--conversation", &gid, &format!("to both {n}")]);
    }
    for down in &downs {
        for n in 0..3 {
            assert_eq!(down.next_message(), format!("to both {n}"));
        }
    }
}
