//! Hot reload in the real daemon: a plugin replaced on disk while messages flow is swapped in
//! after validation, nothing is lost or handled twice, and a broken replacement is rejected
//! (on file change and by `gatehouse plugins reload`) while the old version keeps serving.

use std::path::Path;

use gatehouse_e2e::*;

/// Replaces `dest` atomically (write beside it, then rename), as deploy tools do.
fn replace(dest: &Path, bytes: &[u8]) {
    let tmp = dest.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dest).unwrap();
}

fn seqs(messages: &[serde_json::Value]) -> Vec<(u64, String)> {
    messages
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_str(m["text"].as_str().unwrap()).unwrap();
            (
                v["seq"].as_u64().unwrap(),
                m["content_type"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn plugins_reload_while_messages_flow() {
    let (v1, v2) = (misbehave_plugin(), mqtt_plugin());
    let s = Setup::new("reload");
    let plugin = s.dir.join("mapper.wasm");
    std::fs::copy(&v1, &plugin).unwrap();
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = s.dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "data_dir: data\nnode: {{listen: 127.0.0.1:{}}}\nadmin: {{listen: 127.0.0.1:{}}}\npoll_interval_ms: 100\n\
             channels: {{mqtt: {{port: {}, client_id: gatehouse-reload}}}}\n\
             plugins: {{mapper: {{path: \"{}\"}}}}\n\
             routes:\n  - {{name: devices, channel: mqtt, subscribe: \"devices/{{device}}/up\", reply: \"devices/{{device}}/down\", plugin: mapper, agents: [\"{inbox}\"]}}\n",
            s.node_port,
            s.admin_port,
            s.broker.port,
            plugin.display()
        ),
    )
    .unwrap();
    let d = s.start_daemon(&config);
    a.init();
    let v1_sha = d.plugin("mapper")["sha256"].as_str().unwrap().to_string();
    let line = |i: u64| format!("{{\"seq\":{i}}}");
    let mut all = Vec::new();

    // Version 1 (the echo plugin) sends text.
    s.broker
        .publish_lines("devices/d1/up", &(0..20).map(line).collect::<Vec<_>>());
    all.extend(seqs(&a.listen(20)));
    assert!(all.iter().all(|(_, t)| t == "xmtp.org/text:1.0"), "{all:?}");

    // Version 2 (the JSON mapper) replaces it on disk while a publisher keeps sending.
    std::thread::scope(|scope| {
        let publisher = scope.spawn(|| {
            for i in 20..50 {
                s.broker.publish("devices/d1/up", line(i).as_bytes());
            }
        });
        replace(&plugin, &std::fs::read(&v2).unwrap());
        d.wait_log(&["plugin reloaded", "mapper"]);
        publisher.join().unwrap();
    });
    // Sent after the swap is confirmed: certainly version 2.
    s.broker
        .publish_lines("devices/d1/up", &(50..60).map(line).collect::<Vec<_>>());
    let got = seqs(&a.listen(40));
    let switch = got
        .iter()
        .position(|(_, t)| t == "gatehouse.dev/json:1.0")
        .expect("version 2 served");
    assert!(
        got[switch..]
            .iter()
            .all(|(_, t)| t == "gatehouse.dev/json:1.0"),
        "once swapped, only version 2 serves: {got:?}"
    );
    assert!(switch <= 30, "the last ten went through version 2");
    all.extend(got);
    let p = d.plugin("mapper");
    assert_eq!(p["reloads"], 1);
    assert_ne!(p["sha256"], v1_sha.as_str());

    // A broken replacement is rejected, on file change and on command; version 2 serves on.
    replace(&plugin, b"\0asm this is not a component");
    d.wait_log(&["plugin reload rejected", "mapper"]);
    let out = d.reload("mapper");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rejected") && err.contains("previous version keeps serving"),
        "{err}"
    );
    let p = d.plugin("mapper");
    assert!(p["last_reload_error"].as_str().is_some(), "{p}");
    assert_eq!(p["reloads"], 1);
    s.broker
        .publish_lines("devices/d1/up", &(60..65).map(line).collect::<Vec<_>>());
    let got = seqs(&a.listen(5));
    assert!(
        got.iter().all(|(_, t)| t == "gatehouse.dev/json:1.0"),
        "{got:?}"
    );
    all.extend(got);

    // Every message exactly once, in order.
    let order: Vec<u64> = all.iter().map(|(s, _)| *s).collect();
    assert_eq!(order, (0..65).collect::<Vec<_>>());
    assert!(d.dead_letters().is_empty(), "{:?}", d.dead_letters());

    // The operator's loop: version 2 refuses plain text (dead-lettered); putting version 1
    // back and retrying the dead letters delivers it, once.
    s.broker.publish("devices/d1/up", b"plain words");
    let dl = d.wait_dead_letter("the refusal", |d| d["kind"] == "refused");
    assert_eq!(dl["bytes"], 11);
    replace(&plugin, &std::fs::read(&v1).unwrap());
    wait_for("the second reload", || {
        (d.plugin("mapper")["reloads"] == 2).then_some(())
    });
    let out = d.dlq(&["retry", "--all"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["retried"], serde_json::json!([dl["id"]]));
    let got = a.listen(1);
    assert_eq!(got[0]["text"], "plain words");
    assert!(d.dead_letters().is_empty());
    // Nothing left to retry or drop: a clear error.
    let out = d.dlq(&["drop", &dl["id"].to_string()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no dead letter"));
}
