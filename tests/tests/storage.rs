//! Storage faults: a disk that runs out of room stops the daemon taking in messages (it
//! reports not-ready, says why, and acknowledges nothing it did not store, so the broker keeps
//! them) and it resumes by itself when space returns; a store that cannot be read, or that
//! lost writes it had made durable, is refused at start with an error naming it.

use gatehouse_e2e::*;

fn seq(m: &serde_json::Value) -> u64 {
    let v: serde_json::Value = serde_json::from_str(m["text"].as_str().unwrap()).unwrap();
    v["n"].as_u64().unwrap()
}

#[test]
fn full_disk_stops_intake_and_recovers_losing_nothing() {
    let s = Setup::new("disk-full");
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = s.write_config(&[&inbox]);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("storage: {min_free_mb: 16}\n");
    std::fs::write(&config, text).unwrap();
    // 96 MiB of tmpfs; "full" leaves 8 MiB, under the 16 MiB the config asks for.
    let d = s.spawn_daemon_on_tmpfs(&config, 96, 8);
    a.init();
    s.broker.publish("devices/d1/up", br#"{"n":0}"#);
    assert_eq!(seq(&a.listen(1)[0]), 0);
    assert_eq!(d.get("/ready").0, 200);

    std::fs::write(s.dir.join("fill"), b"").unwrap();
    wait_for("the tmpfs to fill up", || {
        s.dir.join("filled").exists().then_some(())
    });
    let (code, body) = wait_for("the daemon to report not-ready", || {
        let r = d.get("/ready");
        (r.0 == 503).then_some(r)
    });
    assert_eq!(code, 503);
    assert!(body.contains("below storage.min_free_mb"), "{body}");
    assert_eq!(d.status()["ready"], false);
    d.wait_log(&["not ready", "below storage.min_free_mb"]);

    // Devices keep publishing: nothing is taken in (or acknowledged) while the disk is full.
    let line = |n: u64| format!("{{\"n\":{n}}}");
    s.broker
        .publish_lines("devices/d1/up", &(1..=20).map(line).collect::<Vec<_>>());
    let during = a.ok(&["listen", "--json", "--timeout", "3"]);
    assert!(during.trim().is_empty(), "taken in while full: {during}");
    assert_eq!(d.status()["inbox_depth"], 0, "nothing stored while full");

    // Space returns: ready again, and every message arrives once, in order.
    std::fs::remove_file(s.dir.join("fill")).unwrap();
    wait_for("the daemon to be ready again", || {
        (d.get("/ready").0 == 200).then_some(())
    });
    let got: Vec<u64> = a.listen(20).iter().map(seq).collect();
    assert_eq!(got, (1..=20).collect::<Vec<_>>());
    let extra = a.ok(&["listen", "--json", "--timeout", "2"]);
    assert!(extra.trim().is_empty(), "duplicates: {extra}");
    d.wait_log(&["ready: taking in messages again"]);
}

#[test]
fn unreadable_store_is_refused_at_start_with_a_clear_error() {
    let s = Setup::new("corrupt-store");
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = s.write_config(&[&inbox]);
    let mut d = s.start_daemon(&config);
    d.stop();
    // Damage the bridge store's settings block (its checksum no longer matches).
    let conf = s.dir.join("data/bridge/conf");
    let mut bytes = std::fs::read(&conf).unwrap();
    for b in bytes.iter_mut().take(16) {
        *b = !*b;
    }
    std::fs::write(&conf, bytes).unwrap();

    let mut d = s.spawn_daemon(&config);
    assert!(d.wait_exit(), "the daemon refuses to start");
    let log = d.log_text();
    assert!(
        log.contains("the bridge store at") && log.contains("data/bridge is damaged"),
        "{log}"
    );
    assert!(log.contains("Restore it from a backup"), "{log}");
}

/// sled recovers a damaged log by dropping everything after the damage, silently; the seal
/// (`gatehouse.seal`, written after each flush) finds it. Rolling the log back to an older
/// copy is that loss made exact.
#[test]
fn store_that_lost_durable_writes_is_refused_until_the_operator_decides() {
    let s = Setup::new("rolled-back-store");
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = s.write_config(&[&inbox]);
    let line = |n: u64| format!("{{\"n\":{n}}}");
    let bridge = s.dir.join("data/bridge");
    let old = s.dir.join("bridge-before");

    let mut d = s.start_daemon(&config);
    a.init();
    s.broker
        .publish_lines("devices/d1/up", &(1..=5).map(line).collect::<Vec<_>>());
    assert_eq!(
        a.listen(5).iter().map(seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    d.stop();
    std::fs::create_dir_all(&old).unwrap();
    for f in std::fs::read_dir(&bridge).unwrap() {
        let f = f.unwrap();
        if f.file_type().unwrap().is_file() {
            std::fs::copy(f.path(), old.join(f.file_name())).unwrap();
        }
    }

    let mut d = s.start_daemon(&config);
    s.broker
        .publish_lines("devices/d1/up", &(6..=10).map(line).collect::<Vec<_>>());
    assert_eq!(
        a.listen(5).iter().map(seq).collect::<Vec<_>>(),
        [6, 7, 8, 9, 10]
    );
    d.stop();
    // The log goes back to what it held after message 5; the seal stays as it is.
    for f in std::fs::read_dir(&old).unwrap() {
        let f = f.unwrap();
        if f.file_name() != "gatehouse.seal" {
            std::fs::copy(f.path(), bridge.join(f.file_name())).unwrap();
        }
    }

    let mut d = s.spawn_daemon(&config);
    assert!(d.wait_exit(), "the daemon refuses to start");
    let log = d.log_text();
    assert!(log.contains("data/bridge is damaged"), "{log}");
    assert!(log.contains("writes it had made durable are gone"), "{log}");
    assert!(log.contains("data/bridge/gatehouse.seal"), "{log}");
    assert!(!log.contains("gatehouse running"), "{log}");

    // The operator accepts the loss: the daemon starts on what is left, and seals it anew.
    std::fs::remove_file(bridge.join("gatehouse.seal")).unwrap();
    let d = s.start_daemon(&config);
    wait_for("the daemon to be ready", || {
        (d.get("/ready").0 == 200).then_some(())
    });
    assert!(bridge.join("gatehouse.seal").exists());
}

/// A second daemon on the same data directory is refused with a clear error (sled's lock),
/// and the first keeps working.
#[test]
fn a_second_instance_on_the_same_data_dir_is_refused() {
    let s = Setup::new("second-instance");
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = s.write_config(&[&inbox]);
    let first = s.start_daemon(&config);
    let mut second = s.spawn_daemon(&config);
    assert!(second.wait_exit(), "the second instance stops");
    let log = second.log_text();
    assert!(log.contains("is in use by another process"), "{log}");
    assert!(log.contains("data/"), "names the directory: {log}");
    assert_eq!(first.get("/live").0, 200);
    a.init();
    s.broker.publish("devices/d1/up", br#"{"n":1}"#);
    assert_eq!(seq(&a.listen(1)[0]), 1, "the first still works");
}
