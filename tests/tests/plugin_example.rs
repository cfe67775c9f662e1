//! The custom plugin in `examples/plugins/sensor-frame`, built with the SDK for
//! wasm32-wasip2, loaded by the real daemon from its file, end to end with a real mosquitto.

use gatehouse_e2e::*;

/// A 6-byte frame becomes JSON in the agent's conversation; a malformed frame is refused with
/// the plugin's reason; the agent's reply is published to the device's down topic.
#[test]
fn sensor_frame_plugin_end_to_end() {
    let wasm = build_plugin(
        "examples/plugins/sensor-frame/Cargo.toml",
        None,
        "sensor_frame.wasm",
    );
    let s = Setup::new("example-plugin");
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = s.dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "data_dir: data\nnode: {{listen: 127.0.0.1:{}}}\nadmin: {{listen: 127.0.0.1:{}}}\npoll_interval_ms: 100\n\
             channels: {{mqtt: {{port: {}, client_id: gatehouse-example}}}}\n\
             plugins: {{frames: {{path: \"{}\"}}}}\n\
             routes:\n  - {{name: sensors, channel: mqtt, subscribe: \"sensors/{{device}}/up\", reply: \"sensors/{{device}}/down\", plugin: frames, agents: [\"{inbox}\"]}}\n",
            s.node_port,
            s.admin_port,
            s.broker.port,
            wasm.display()
        ),
    )
    .unwrap();
    let d = s.start_daemon(&config);
    a.init();

    // version 1, sensor 258, 21.50 °C, battery 87 %
    s.broker
        .publish("sensors/boiler/up", &[1, 0x01, 0x02, 0x08, 0x66, 87]);
    let got = a.listen(1);
    assert_eq!(got[0]["content_type"], "gatehouse.dev/json:1.0");
    let v: serde_json::Value = serde_json::from_str(got[0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"sensor": 258, "temperature_c": 21.5, "battery_pct": 87, "frame": 1})
    );
    // The plugin's key-value store counts frames per device: -3.25 °C, 5 %, second frame.
    s.broker
        .publish("sensors/boiler/up", &[1, 0x01, 0x02, 0xfe, 0xbb, 5]);
    let v: serde_json::Value =
        serde_json::from_str(a.listen(1)[0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"sensor": 258, "temperature_c": -3.25, "battery_pct": 5, "frame": 2})
    );

    s.broker.publish("sensors/boiler/up", b"\x02short");
    d.wait_log(&["rejected by plugin", "malformed", "6-byte"]);

    let down = s.broker.subscribe("sensors/boiler/down");
    let endpoint = got[0]["sender_inbox"].as_str().unwrap().to_string();
    a.send(&endpoint, "interval 60");
    assert_eq!(down.next_message(), "interval 60");
}
