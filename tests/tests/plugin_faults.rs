//! Fault isolation in the real daemon: a plugin that loops, allocates 1 GiB, traps, returns
//! 10,000 actions, opens a file or publishes outside its grants is contained — the daemon
//! stays up, the call ends at its deadline, the message is dead-lettered with the right
//! reason, another route keeps delivering meanwhile, and the configured number of faults
//! quarantines the plugin (fail closed: its messages wait; fail open: they pass unmapped)
//! until it is reloaded.

use std::time::Duration;

use gatehouse_e2e::*;

/// The bad plugin's per-call deadline.
const DEADLINE_MS: u64 = 1000;
/// How far past its deadline a call may end, measured: in process the overshoot is under a
/// millisecond (`cargo bench -p gatehouse-host --bench plugin`, `deadline_overshoot-50ms`:
/// 50.6–50.8 ms); in the daemon, where the figure also covers the hop to the blocking pool, it
/// was 20 ms (`call_ms` 1020 for this test's loop on the development machine). The margin is
/// about twelve times that, for a loaded two-core CI machine.
const MARGIN_MS: u64 = 250;
/// Faults within the window that quarantine the plugin: exactly the six below.
const QUARANTINE_AFTER: u64 = 6;

/// A config with a `good` route (the first-party mqtt plugin) and a `bad` one (the misbehaving
/// plugin, with `bad_options`), then `more_routes`.
fn write_config(
    s: &Setup,
    inbox: &str,
    bad_options: &str,
    more_routes: &str,
) -> std::path::PathBuf {
    let config = s.dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "data_dir: data\nnode: {{listen: 127.0.0.1:{node}}}\nadmin: {{listen: 127.0.0.1:{admin}}}\npoll_interval_ms: 100\n\
             channels: {{mqtt: {{port: {mqtt}, client_id: gatehouse-faults}}}}\n\
             plugins:\n  mqtt: {{builtin: mqtt}}\n  bad: {{path: \"{wasm}\", {bad_options}}}\n\
             routes:\n\
             \x20 - {{name: good, channel: mqtt, subscribe: \"devices/{{device}}/up\", reply: \"devices/{{device}}/down\", plugin: mqtt, agents: [\"{inbox}\"]}}\n\
             \x20 - {{name: bad, channel: mqtt, subscribe: \"bad/{{device}}/up\", reply: \"bad/{{device}}/down\", plugin: bad, agents: [\"{inbox}\"]}}\n\
             {more_routes}",
            node = s.node_port,
            admin = s.admin_port,
            mqtt = s.broker.port,
            wasm = misbehave_plugin().display(),
        ),
    )
    .unwrap();
    config
}

#[test]
fn faulty_plugins_are_contained_and_quarantined() {
    let s = Setup::new("faults");
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = write_config(
        &s,
        &inbox,
        &format!(
            "deadline_ms: {DEADLINE_MS}, memory_mb: 32, quarantine_after: {QUARANTINE_AFTER}, fault_window_secs: 3600"
        ),
        &format!(
            "\x20 - {{name: lenient, channel: mqtt, subscribe: \"lenient/{{device}}/up\", reply: \"lenient/{{device}}/down\", plugin: bad, agents: [\"{inbox}\"], fail_open: true}}\n"
        ),
    );
    let d = s.start_daemon(&config);
    a.init();
    let good = |n: u32| {
        s.broker
            .publish("devices/g1/up", format!("{{\"n\":{n}}}").as_bytes());
    };
    let expect_good = |n: u32| {
        let got = a.listen(1);
        assert_eq!(got[0]["text"], format!("{{\"n\":{n}}}"), "{got:?}");
    };

    // Both routes work; the bad plugin echoes ordinary payloads.
    good(0);
    expect_good(0);
    s.broker.publish("bad/b1/up", b"hello");
    let got = a.listen(1);
    assert_eq!(got[0]["text"], "hello");
    let bad_endpoint = got[0]["sender_inbox"].as_str().unwrap().to_string();

    // 1. An endless loop: the good route delivers while the bad call is still running, and
    // the call is stopped at its deadline.
    s.broker.publish("bad/b1/up", b"loop");
    good(1);
    expect_good(1);
    let dl = d.wait_dead_letter("the loop's timeout", |d| d["kind"] == "timeout");
    let log = d.log_text();
    let delivered_good = log
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains("delivered to conversation") && l.contains("route=good"))
        .nth(1)
        .map(|(i, _)| i)
        .expect("second good delivery logged");
    let timed_out = log
        .lines()
        .position(|l| l.contains("plugin fault") && l.contains("timeout"))
        .expect("timeout logged");
    assert!(
        delivered_good < timed_out,
        "the good route delivered while the loop ran"
    );
    let call_ms = dl["call_ms"].as_u64().unwrap();
    assert!(
        (DEADLINE_MS..=DEADLINE_MS + MARGIN_MS).contains(&call_ms),
        "the loop ran {call_ms} ms; deadline {DEADLINE_MS} ms + {MARGIN_MS} ms"
    );
    assert_eq!(dl["route"], "bad");
    assert_eq!(dl["direction"], "inbound");
    assert_eq!(dl["topic"], "bad/b1/up");
    assert!(dl["reason"].as_str().unwrap().contains("deadline"), "{dl}");

    // 2-5. 1 GiB at once, a trap, 10,000 actions, a file read: each dead-lettered with its
    // own reason, within the deadline, while the good route keeps delivering.
    let cases: [(&[u8], &str, &str); 4] = [
        (b"alloc", "memory", "memory cap of 33554432 bytes"),
        (b"trap", "trap", "unreachable"),
        (b"many", "limits", "returned 10000 actions; its limit is 16"),
        (b"open", "denied", "wasi:filesystem/"),
    ];
    for (i, (payload, kind, reason)) in cases.iter().enumerate() {
        s.broker.publish("bad/b1/up", payload);
        let dl = d.wait_dead_letter(kind, |d| d["kind"] == *kind);
        assert!(
            dl["reason"].as_str().unwrap().contains(reason),
            "{kind}: {dl}"
        );
        assert_eq!(dl["bytes"], payload.len(), "{dl}");
        let call_ms = dl["call_ms"].as_u64().unwrap();
        assert!(call_ms <= DEADLINE_MS + MARGIN_MS, "{kind}: {call_ms} ms");
        assert_eq!(d.status()["version"], env!("CARGO_PKG_VERSION"), "still up");
        let n = 2 + i as u32;
        good(n);
        expect_good(n);
    }

    // Five faults: still serving.
    let p = d.plugin("bad");
    assert_eq!(
        (p["faults"].as_u64(), &p["quarantined"]),
        (Some(5), &false.into())
    );

    // 6. A publish outside the grants, from a conversation message: refused, nothing reaches
    // the broker, dead-lettered as outbound.
    let outside = s.broker.subscribe("outside/#");
    a.send(&bad_endpoint, "outside");
    let dl = d.wait_dead_letter("grants", |d| d["kind"] == "grants");
    assert_eq!(dl["direction"], "outbound");
    assert!(
        dl["reason"]
            .as_str()
            .unwrap()
            .contains("outside/grants is outside the plugin's grants"),
        "{dl}"
    );

    // Six faults: quarantined. Nothing escaped, and the hostname never reached anyone.
    let p = wait_for("the quarantine", || {
        let p = d.plugin("bad");
        (p["quarantined"] == true).then_some(p)
    });
    assert_eq!(p["faults"], QUARANTINE_AFTER);
    assert_eq!(d.plugin("mqtt")["quarantined"], false);
    d.wait_log(&["plugin quarantined", "bad"]);
    assert!(outside.drain(Duration::from_millis(200)).is_empty());
    let hostname = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    assert!(hostname.trim().is_empty() || !d.log_text().contains(hostname.trim()));

    // Fail closed: the bad route holds its message in the durable queue...
    s.broker.publish("bad/b1/up", b"held-1");
    wait_for("the held message in the queue", || {
        (d.status()["inbox_by_route"]["bad"] == 1).then_some(())
    });
    // ...and the way back is not read: these wait on the node, to be read in one pass after
    // the reload (mapped together), with a trap among them.
    let down = s.broker.subscribe("bad/b1/down");
    a.send_lines(&bad_endpoint, "back-1\ntrap\nback-2\nback-3\n");
    // ...while the good route delivers, and the fail-open route passes its message unmapped.
    good(9);
    expect_good(9);
    s.broker.publish("lenient/l1/up", b"passed-unmapped");
    let got = a.listen(1);
    assert_eq!(got[0]["text"], "passed-unmapped");
    assert_eq!(got[0]["content_type"], "xmtp.org/text:1.0");

    // A reload lifts the quarantine and the held message goes out, once.
    let out = d.reload("bad");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = a.listen(1);
    assert_eq!(got[0]["text"], "held-1");
    assert_eq!(got[0]["sender_inbox"], bad_endpoint.as_str());
    let p = d.plugin("bad");
    assert_eq!(p["quarantined"], false);
    assert_eq!(p["reloads"], 1);
    assert_eq!(d.status()["inbox_by_route"]["bad"], 0);
    // The held conversation messages: the trap is set apart, the others reach the device once
    // each, in order.
    let got: Vec<String> = (0..3).map(|_| down.next_message()).collect();
    assert_eq!(got, ["back-1", "back-2", "back-3"]);
    let dl = d.wait_dead_letter("the trap on the way back", |d| {
        d["kind"] == "trap" && d["direction"] == "outbound"
    });
    assert_eq!(dl["route"], "bad", "{dl}");
    assert!(
        down.drain(Duration::from_millis(200)).is_empty(),
        "nothing twice"
    );
    // Every faulty message is in the dead-letter store, none twice.
    let kinds: Vec<String> = d
        .dead_letters()
        .iter()
        .map(|d| d["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        kinds,
        [
            "timeout", "memory", "trap", "limits", "denied", "grants", "trap"
        ]
    );
    // The operator drops one; the others stay.
    let timeout_id = d.dead_letters()[0]["id"].to_string();
    let out = d.dlq(&["drop", &timeout_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.dead_letters().len(), 6);
    assert_eq!(d.dead_letters()[0]["kind"], "memory");
}

/// On the way back, each endpoint is read and published in a pass of its own: while one
/// endpoint's plugin call loops (until its deadline), another endpoint's conversation
/// message reaches its device; it does not wait for the looping pass to end.
#[test]
fn a_looping_plugin_on_the_way_back_delays_only_its_own_endpoint() {
    let s = Setup::new("faults-lanes");
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = write_config(&s, &inbox, "deadline_ms: 8000, quarantine_after: 100", "");
    let d = s.start_daemon(&config);
    a.init();
    // Both endpoints say hello: their conversations with the agent exist.
    s.broker.publish("devices/g1/up", b"{\"hello\":1}");
    let got = a.listen(1);
    let good_endpoint = got[0]["sender_inbox"].as_str().unwrap().to_string();
    s.broker.publish("bad/b1/up", b"hello");
    let got = a.listen(1);
    let bad_endpoint = got[0]["sender_inbox"].as_str().unwrap().to_string();
    assert_ne!(good_endpoint, bad_endpoint);

    let good_down = s.broker.subscribe("devices/g1/down");
    let bad_down = s.broker.subscribe("bad/b1/down");
    // The bad endpoint's pass starts on this (the node's stream brings it at once) and loops
    // in the plugin for 8 s...
    a.send(&bad_endpoint, "loop");
    // ...meanwhile the good endpoint's message, sent after, goes out.
    a.send(&good_endpoint, "while it loops");
    assert_eq!(good_down.next_message(), "while it loops");
    assert!(
        d.dead_letters().is_empty(),
        "the good message waited for the loop to time out"
    );
    // The loop ends at its deadline, set apart; the bad endpoint carries on after it.
    let dl = d.wait_dead_letter("the loop's timeout", |d| d["kind"] == "timeout");
    assert_eq!(dl["direction"], "outbound", "{dl}");
    a.send(&bad_endpoint, "after the loop");
    assert_eq!(bad_down.next_message(), "after the loop");
}
