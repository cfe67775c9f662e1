//! MQTT channel against brokers that want more: a password file (wrong credentials are a
//! state the operator sees, not a crash loop), TLS (at QoS 1 and 2),
//! and shared subscriptions (two bridges on one broker split the devices' messages).

use gatehouse_e2e::*;

#[test]
fn wrong_password_is_reported_as_bad_credentials_and_the_right_one_connects() {
    let s = Setup::new("mqtt-password");
    let broker = Mosquitto::start_with_password(&s.dir, &[("bridge", "s3cret")]);
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = s.write_config_for(broker.port, &[&inbox]);
    let text = std::fs::read_to_string(&config).unwrap();
    let with = |password: &str, protocol: &str| {
        let t = text.replace(
            "client_id: gatehouse-e2e",
            &format!(
                "client_id: gatehouse-e2e, username: bridge, password: {password}, protocol: \"{protocol}\""
            ),
        );
        assert_ne!(t, text, "the harness config changed shape");
        std::fs::write(&config, t).unwrap();
    };
    // MQTT 3.1.1 refuses with a CONNACK return code, MQTT 5 with a reason code.
    for protocol in ["3.1.1", "5"] {
        with("wr0ngpass", protocol);
        let mut d = s.spawn_daemon(&config);
        d.wait_log(&["MQTT broker refused the credentials (bad credentials)"]);
        let status = d.status();
        assert!(
            status["mqtt"]
                .as_str()
                .unwrap()
                .starts_with("BadCredentials"),
            "MQTT {protocol}: {status}"
        );
        assert_eq!(d.get("/status").0, 200, "the daemon keeps running");
        assert!(
            !d.log_text().contains("s3cret") && !d.log_text().contains("wr0ngpass"),
            "no secrets in the log"
        );
        d.stop();

        with("s3cret", protocol);
        let d = s.start_daemon(&config);
        assert_eq!(d.status()["mqtt"], "Connected", "MQTT {protocol}");
    }
}

#[test]
fn two_bridges_share_a_subscription_and_split_1000_messages() {
    let s1 = Setup::new("mqtt-share-1");
    let s2 = Setup::new("mqtt-share-2");
    let node = StandaloneNode::start(&s1.dir);
    let a = Agent::at(s1.dir.join("agent"), node.url.clone());
    let inbox = a.inbox_id();
    let c1 = s1.write_config_external(&node.url, &[&inbox]);
    let shared = std::fs::read_to_string(&c1).unwrap().replace(
        "max_payload: 65536}",
        "max_payload: 65536, share_group: bridges}",
    );
    assert!(
        shared.contains("share_group"),
        "the harness config changed shape"
    );
    std::fs::write(&c1, &shared).unwrap();
    let c2 = s2.dir.join("config.yaml");
    std::fs::write(
        &c2,
        shared
            .replace(
                &format!("127.0.0.1:{}", s1.admin_port),
                &format!("127.0.0.1:{}", s2.admin_port),
            )
            .replace("client_id: gatehouse-e2e", "client_id: gatehouse-e2e-2"),
    )
    .unwrap();
    let d1 = s1.start_daemon(&c1);
    let d2 = s2.start_daemon(&c2);
    a.init();
    for dev in 0..10 {
        let lines: Vec<String> = (0..100)
            .map(|k| format!("{{\"n\":{}}}", dev * 100 + k))
            .collect();
        s1.broker
            .publish_lines(&format!("devices/d{dev}/up"), &lines);
    }
    let mut got: Vec<u64> = a
        .listen(1000)
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_str(m["text"].as_str().unwrap()).unwrap();
            v["n"].as_u64().unwrap()
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        (0..1000).collect::<Vec<_>>(),
        "each message exactly once"
    );
    let extra = a.ok(&["listen", "--json", "--timeout", "2"]);
    assert!(extra.trim().is_empty(), "duplicates: {extra}");
    let share = |d: &Daemon| d.log_text().matches("delivered to conversation").count();
    assert!(
        share(&d1) > 0 && share(&d2) > 0,
        "{} / {}",
        share(&d1),
        share(&d2)
    );
}

/// A device's `mosquitto_pub` / `mosquitto_sub` over TLS with a password.
fn tls_client(tool: &str, port: u16, ca: &std::path::Path, args: &[&str]) -> std::process::Command {
    require(tool, "mosquitto-clients");
    let mut c = std::process::Command::new(tool);
    c.args(["-h", "127.0.0.1", "-p", &port.to_string(), "--cafile"])
        .arg(ca)
        .args(["--insecure", "-u", "device", "-P", "devpass"])
        .args(args);
    c
}

/// A mosquitto with a TLS listener and these accounts, its certificate self-signed for
/// `localhost` only (not for 127.0.0.1, the address the bridge dials), written to
/// `broker.pem` in the setup's directory (returned).
fn tls_broker(s: &Setup, users: &[(&str, &str)]) -> (Mosquitto, std::path::PathBuf) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_pem, key_pem) = (s.dir.join("broker.pem"), s.dir.join("broker.key"));
    std::fs::write(&cert_pem, cert.cert.pem()).unwrap();
    std::fs::write(&key_pem, cert.key_pair.serialize_pem()).unwrap();
    let broker = Mosquitto::start_tls_with_password(&s.dir, &cert_pem, &key_pem, users);
    (broker, cert_pem)
}

#[test]
fn tls_with_a_password_both_ways_at_qos_1_and_2() {
    // (bridge protocol, publish QoS, the device's protocol): 3.1.1 and 5 on both sides.
    for (protocol, qos, device) in [
        ("3.1.1", 1, "mqttv311"),
        ("3.1.1", 2, "mqttv5"),
        ("5", 2, "mqttv5"),
        ("5", 1, "mqttv311"),
    ] {
        let case = format!("bridge MQTT {protocol}, QoS {qos}, device {device}");
        let s = Setup::new(&format!("mqtt-tls-{}-q{qos}", protocol.replace('.', "")));
        let (broker, cert_pem) = tls_broker(&s, &[("bridge", "s3cret"), ("device", "devpass")]);
        let a = s.agent("agent");
        let inbox = a.inbox_id();
        let config = s.write_config_for(broker.port, &[&inbox]);
        let text = std::fs::read_to_string(&config).unwrap();
        let tls = text.replace(
            "client_id: gatehouse-e2e",
            &format!(
                "client_id: gatehouse-e2e, username: bridge, password: s3cret, publish_qos: {qos}, \
                 protocol: \"{protocol}\", tls: {{ca_file: broker.pem, server_name: localhost}}"
            ),
        );
        assert_ne!(tls, text);
        std::fs::write(&config, tls).unwrap();
        let _d = s.start_daemon(&config);
        a.init();

        let st = tls_client(
            "mosquitto_pub",
            broker.port,
            &cert_pem,
            &[
                "-V",
                device,
                "-q",
                "1",
                "-t",
                "devices/t1/up",
                "-m",
                r#"{"t":21.5}"#,
            ],
        )
        .output()
        .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        let m = &a.listen(1)[0];
        assert_eq!(m["text"], r#"{"t":21.5}"#, "{case}");
        let endpoint = m["sender_inbox"].as_str().unwrap().to_string();

        let sub = tls_client(
            "mosquitto_sub",
            broker.port,
            &cert_pem,
            &[
                "-V",
                device,
                "-q",
                &qos.to_string(),
                "-t",
                "devices/t1/down",
                "-C",
                "1",
                "-W",
                "60",
            ],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
        // The subscriber is in place once the broker logged its subscription.
        wait_for("the device's subscription", || {
            std::fs::read_dir(&s.dir)
                .unwrap()
                .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
                .any(|l| l.contains("devices/t1/down (QoS"))
                .then_some(())
        });
        a.ok(&["send", "--to", &endpoint, "set 19.0"]);
        let out = sub.wait_with_output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "set 19.0",
            "{case}"
        );
    }
}

/// `tls.server_name` is the name the broker's certificate is checked against, under both
/// protocol versions (with MQTT 3.1.1 at QoS 1 rumqttc dials and would check `host`): a name
/// the certificate carries connects (above, where `host` is an address the certificate does
/// not name), one it does not carry is refused with the reason in the log.
#[test]
fn tls_refuses_a_certificate_that_does_not_carry_server_name() {
    for protocol in ["3.1.1", "5"] {
        let s = Setup::new(&format!("mqtt-tls-name-{}", protocol.replace('.', "")));
        let (broker, _) = tls_broker(&s, &[("bridge", "s3cret")]);
        let a = s.agent("agent");
        let config = s.write_config_for(broker.port, &[&a.inbox_id()]);
        let text = std::fs::read_to_string(&config).unwrap();
        let tls = text.replace(
            "client_id: gatehouse-e2e",
            &format!(
                "client_id: gatehouse-e2e, username: bridge, password: s3cret, \
                 protocol: \"{protocol}\", tls: {{ca_file: broker.pem, server_name: broker.invalid}}"
            ),
        );
        assert_ne!(tls, text);
        std::fs::write(&config, tls).unwrap();
        let mut d = s.spawn_daemon(&config);
        let line = d.wait_log(&["MQTT broker unreachable"]);
        assert!(
            line.contains("NotValidForName") || line.contains("not valid for name"),
            "MQTT {protocol}: {line}"
        );
        assert!(
            d.status()["mqtt"]
                .as_str()
                .unwrap()
                .starts_with("BackingOff"),
            "MQTT {protocol}: {}",
            d.status()
        );
        d.stop();
    }
}

/// MQTT 5 request-response through the bridge: the device's response topic and correlation
/// data come back on the agent's answer (with a content type), user properties reach the
/// plugin, and a payload over the limit is refused with a reason code the broker sees.
#[test]
fn mqtt5_response_topic_correlation_and_refusal_reason_codes() {
    let s = Setup::new("mqtt5-request");
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = s.write_config(&[&inbox]);
    let text = std::fs::read_to_string(&config).unwrap();
    let v5 = text
        .replace(
            "client_id: gatehouse-e2e",
            "client_id: gatehouse-e2e, protocol: 5",
        )
        .replace("max_payload: 65536", "max_payload: 64");
    assert_ne!(v5, text);
    std::fs::write(&config, v5).unwrap();
    let d = s.start_daemon(&config);
    a.init();
    require("mosquitto_sub", "mosquitto-clients");
    // The device waits for its answer on a topic of its own choosing.
    let port = s.broker.port.to_string();
    let answers = std::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-V", "mqttv5", "-q", "1"])
        .args([
            "-t",
            "replies/t1/42",
            "-C",
            "1",
            "-W",
            "60",
            "-F",
            "%t|%p|%D|%C",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the device's subscription", || {
        std::fs::read_to_string(s.broker.log())
            .ok()?
            .contains("replies/t1/42 (QoS")
            .then_some(())
    });
    let st = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-V", "mqttv5", "-q", "1"])
        .args(["-t", "devices/t1/up", "-m", r#"{"q":"setpoint?"}"#])
        .args(["-D", "publish", "response-topic", "replies/t1/42"])
        .args(["-D", "publish", "correlation-data", "req-0042"])
        .args(["-D", "publish", "user-property", "site", "hq"])
        .status()
        .unwrap();
    assert!(st.success());
    let m = &a.listen(1)[0];
    assert_eq!(m["text"], r#"{"q":"setpoint?"}"#);
    let endpoint = m["sender_inbox"].as_str().unwrap().to_string();
    a.ok(&["send", "--to", &endpoint, "19.5"]);
    let out = answers.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "replies/t1/42|19.5|req-0042|text/plain; charset=utf-8",
        "the answer went to the response topic with the correlation data"
    );
    // Answered: the next message goes to the route's reply topic again.
    let down = s.broker.subscribe("devices/t1/down");
    a.ok(&["send", "--to", &endpoint, "and another"]);
    assert_eq!(down.next_message(), "and another");

    // Over max_payload (64 bytes): refused with reason code 0x97 (Quota exceeded, 151).
    let big = format!(r#"{{"blob":"{}"}}"#, "x".repeat(100));
    let st = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-V", "mqttv5", "-q", "1"])
        .args(["-t", "devices/t1/up", "-m", &big])
        .status()
        .unwrap();
    assert!(st.success());
    d.wait_log(&["rejected: payload over the route's max_payload"]);
    wait_for("the broker to log the refusal", || {
        std::fs::read_to_string(s.broker.log())
            .ok()?
            .lines()
            .any(|l| l.contains("Received PUBACK from gatehouse-e2e") && l.contains("RC:151"))
            .then_some(())
    });
}

#[test]
fn a_device_whose_connection_dies_is_reported_offline_once() {
    let s = Setup::new("mqtt-presence");
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = s.write_config(&[&inbox]);
    let text = std::fs::read_to_string(&config).unwrap();
    let with_presence = text.replace(
        "max_payload: 65536}",
        "max_payload: 65536, presence: \"devices/{device}/status\"}",
    );
    assert_ne!(with_presence, text, "the harness config changed shape");
    std::fs::write(&config, with_presence).unwrap();
    let d = s.start_daemon(&config);
    a.init();

    // A device with a last will, as devices do.
    require("mosquitto_sub", "mosquitto-clients");
    let mut device = std::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &s.broker.port.to_string(),
            "-i",
            "thermo-1",
        ])
        .args(["-t", "devices/t1/down", "--will-topic", "devices/t1/status"])
        .args(["--will-payload", "offline", "--will-qos", "1"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the device to connect", || {
        std::fs::read_dir(&s.dir)
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
            .any(|l| l.contains("as thermo-1"))
            .then_some(())
    });
    s.broker.publish("devices/t1/status", b"online"); // its birth message
    s.broker.publish("devices/t1/up", br#"{"t":1}"#);
    let got = a.listen(2);
    assert_eq!(got[0]["content_type"], "gatehouse.dev/presence:1.0");
    assert!(
        got[0]["text"].as_str().unwrap().contains("online"),
        "{}",
        got[0]
    );
    assert_eq!(got[1]["text"], r#"{"t":1}"#);

    // The connection dies without a goodbye: the broker publishes the will.
    device.kill().unwrap();
    device.wait().unwrap();
    let m = &a.listen(1)[0];
    assert_eq!(m["content_type"], "gatehouse.dev/presence:1.0");
    assert!(m["text"].as_str().unwrap().contains("offline"), "{m}");
    assert_eq!(m["sender_endpoint"]["verified"], true);
    // Once per change: a repeated "offline" is not another message.
    s.broker.publish("devices/t1/status", b"offline");
    s.broker.publish("devices/t1/up", br#"{"t":2}"#);
    let next = &a.listen(1)[0];
    assert_eq!(
        next["text"], r#"{"t":2}"#,
        "one presence message per change"
    );
    let extra = a.ok(&["listen", "--json", "--timeout", "2"]);
    assert!(extra.trim().is_empty(), "{extra}");
    let _ = d;
}

#[test]
fn retained_messages_once_ignored_or_kept_as_state() {
    for policy in ["once", "ignore", "state"] {
        let s = Setup::new(&format!("mqtt-retained-{policy}"));
        // The agent is registered before the bridge starts (the retained value is delivered
        // at once).
        let node = StandaloneNode::start(&s.dir);
        let a = Agent::at(s.dir.join("agent"), node.url.clone());
        let inbox = a.inbox_id();
        a.init();
        let config = s.write_config_external(&node.url, &[&inbox]);
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(
            &config,
            text.replace(
                "max_payload: 65536}",
                &format!("max_payload: 65536, retained: {policy}}}"),
            ),
        )
        .unwrap();
        // The broker holds a retained value before the bridge subscribes.
        s.broker.publish_retained("devices/t1/up", br#"{"r":1}"#);
        let mut d = s.start_daemon(&config);
        s.broker.publish("devices/t1/up", br#"{"n":2}"#);
        let first = a.listen(1)[0]["text"].as_str().unwrap().to_string();
        match policy {
            "once" => {
                assert_eq!(first, r#"{"r":1}"#);
                assert_eq!(a.listen(1)[0]["text"], r#"{"n":2}"#);
                // A restart subscribes again and the broker sends the retained value again:
                // not delivered a second time.
                d.stop();
                d = s.start_daemon(&config);
                s.broker.publish("devices/t1/up", br#"{"n":3}"#);
                assert_eq!(a.listen(1)[0]["text"], r#"{"n":3}"#, "{policy}");
            }
            "ignore" => assert_eq!(first, r#"{"n":2}"#, "{policy}"),
            _ => {
                assert_eq!(first, r#"{"n":2}"#, "{policy}");
                let endpoints = d.endpoints();
                let t1 = endpoints.iter().find(|e| e["device"] == "t1").unwrap();
                assert_eq!(t1["state"]["payload"], r#"{"r":1}"#, "{t1}");
            }
        }
        let extra = a.ok(&["listen", "--json", "--timeout", "2"]);
        assert!(extra.trim().is_empty(), "{policy}: {extra}");
        drop(d);
    }
}

/// QoS 2 from the devices to the bridge (`subscribe_qos: 2`): the PUBREC goes out only after
/// the durable write; a crash between the two, and the broker's DUP redelivery, still give the
/// agent each message once, in order. Under both protocol versions of the bridge's connection.
#[test]
fn qos2_subscriptions_deliver_each_message_once_across_a_crash() {
    for protocol in ["3.1.1", "5"] {
        qos2_subscription_across_a_crash(protocol);
    }
}

fn qos2_subscription_across_a_crash(protocol: &str) {
    let s = Setup::new(&format!("mqtt-qos2-in-{}", protocol.replace('.', "")));
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = s.write_config(&[&inbox]);
    let text = std::fs::read_to_string(&config).unwrap();
    let q2 = text.replace(
        "client_id: gatehouse-e2e",
        &format!("client_id: gatehouse-e2e, subscribe_qos: 2, protocol: \"{protocol}\""),
    );
    assert_ne!(q2, text);
    std::fs::write(&config, q2).unwrap();
    let mut d = s.start_daemon(&config);
    a.init();
    s.broker
        .publish_lines_qos("devices/d1/up", &[r#"{"n":0}"#.to_string()], 2);
    assert_eq!(a.listen(1)[0]["text"], r#"{"n":0}"#);
    d.stop();
    let lines: Vec<String> = (1..=50).map(|n| format!("{{\"n\":{n}}}")).collect();
    s.broker.publish_lines_qos("devices/d1/up", &lines, 2);
    let mut crashing = s.spawn_daemon_env(&config, &[("GATEHOUSE_FAULT_CRASH_BEFORE_ACK", "1")]);
    assert!(crashing.wait_exit(), "the fault hook aborts the daemon");
    let d = s.start_daemon(&config);
    let got: Vec<String> = a
        .listen(50)
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, lines, "MQTT {protocol}: each once, in order");
    s.broker
        .publish_lines_qos("devices/d1/up", &[r#"{"n":51}"#.to_string()], 2);
    assert_eq!(
        a.listen(1)[0]["text"],
        r#"{"n":51}"#,
        "nothing else was on its way"
    );
    let log = std::fs::read_dir(&s.dir)
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .collect::<String>();
    assert!(
        log.contains("devices/+/up (QoS 2)"),
        "the bridge subscribed with QoS 2"
    );
    drop(d);
}

/// Templates with several placeholders: each combination is its own endpoint, and replies go
/// to the matching filled-in topic.
#[test]
fn templates_with_several_placeholders_name_endpoints_by_all_of_them() {
    let s = Setup::new("mqtt-templates");
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = s.write_config(&[&inbox]);
    let text = std::fs::read_to_string(&config).unwrap();
    let t = text
        .replace("\"devices/{device}/up\"", "\"sites/{site}/{device}/up\"")
        .replace(
            "\"devices/{device}/down\"",
            "\"sites/{site}/{device}/down\"",
        );
    assert_ne!(t, text, "the harness config changed shape");
    std::fs::write(&config, t).unwrap();
    let d = s.start_daemon(&config);
    a.init();
    let hq = s.broker.subscribe("sites/hq/t1/down");
    let lab = s.broker.subscribe("sites/lab/t1/down");
    s.broker.publish("sites/hq/t1/up", br#"{"at":"hq"}"#);
    s.broker.publish("sites/lab/t1/up", br#"{"at":"lab"}"#);
    let got = a.listen(2);
    let by_site: std::collections::BTreeMap<String, String> = got
        .iter()
        .map(|m| {
            (
                m["text"].as_str().unwrap().to_string(),
                m["sender_inbox"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let (hq_inbox, lab_inbox) = (&by_site[r#"{"at":"hq"}"#], &by_site[r#"{"at":"lab"}"#]);
    assert_ne!(hq_inbox, lab_inbox, "t1 at two sites is two endpoints");
    let names: Vec<String> = d
        .endpoints()
        .iter()
        .map(|e| e["device"].as_str().unwrap().to_string())
        .collect();
    assert!(
        names.contains(&"hq/t1".to_string()) && names.contains(&"lab/t1".to_string()),
        "{names:?}"
    );
    a.ok(&["send", "--to", hq_inbox, "to hq"]);
    a.ok(&["send", "--to", lab_inbox, "to lab"]);
    assert_eq!(hq.next_message(), "to hq");
    assert_eq!(lab.next_message(), "to lab");
}

/// The embedded broker (`channels.mqtt.embedded_broker`): devices with `mosquitto_pub` /
/// `mosquitto_sub` talk to the daemon's own broker, on its 3.1.1 and 5 listeners, with a
/// password; a wrong one is refused by the broker.
#[test]
fn the_embedded_broker_carries_devices_both_ways() {
    let s = Setup::new("mqtt-embedded");
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = s.write_config(&[&inbox]);
    let text = std::fs::read_to_string(&config).unwrap();
    let (v4, v5) = (free_port(), free_port());
    let embedded = text.replace(
        &format!(
            "mqtt: {{port: {}, client_id: gatehouse-e2e}}",
            s.broker.port
        ),
        &format!(
            "mqtt: {{client_id: gatehouse-e2e, embedded_broker: {{listen: 127.0.0.1:{v4}, \
             listen_v5: 127.0.0.1:{v5}, users: {{device: devpass}}}}}}"
        ),
    );
    assert_ne!(embedded, text, "the harness config changed shape");
    std::fs::write(&config, embedded).unwrap();
    let d = s.start_daemon(&config);
    d.wait_log(&["embedded MQTT broker running"]);
    wait_for("the bridge to connect", || {
        (d.status()["mqtt"] == "Connected").then_some(())
    });
    a.init();
    require("mosquitto_pub", "mosquitto-clients");
    let client = |tool: &str, port: u16, args: &[&str]| {
        let mut c = std::process::Command::new(tool);
        c.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-u", "device"])
            .args(args);
        c
    };
    // A wrong password is refused by the broker.
    let bad = client(
        "mosquitto_pub",
        v4,
        &["-P", "nope", "-t", "devices/t1/up", "-m", "{}"],
    )
    .output()
    .unwrap();
    assert!(
        !bad.status.success(),
        "the embedded broker took a wrong password"
    );

    let up = |port: u16, version: &str, body: &str| {
        let st = client(
            "mosquitto_pub",
            port,
            &[
                "-P",
                "devpass",
                "-V",
                version,
                "-q",
                "1",
                "-t",
                "devices/t1/up",
                "-m",
                body,
            ],
        )
        .output()
        .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
    };
    up(v4, "mqttv311", r#"{"t":20.5}"#);
    up(v5, "mqttv5", r#"{"t":21.0}"#);
    let got = a.listen(2);
    let texts: Vec<&str> = got.iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, [r#"{"t":20.5}"#, r#"{"t":21.0}"#]);
    let endpoint = got[0]["sender_inbox"].as_str().unwrap().to_string();
    assert_eq!(got[1]["sender_inbox"], endpoint.as_str(), "one endpoint");

    // Down: a device subscribed on the MQTT 5 listener gets the agent's message.
    // stdbuf: mosquitto_sub flushes each line into the pipe as it happens.
    let sub = std::process::Command::new("stdbuf")
        .args([
            "-oL",
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            &v5.to_string(),
        ])
        .args(["-u", "device", "-P", "devpass", "-V", "mqttv5", "-q", "1"])
        .args(["-t", "devices/t1/down", "-C", "1", "-W", "60", "-d"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut sub = sub;
    let mut out = std::io::BufReader::new(sub.stdout.take().unwrap());
    // `-d` prints SUBACK once the subscription is in place.
    let mut line = String::new();
    while !line.contains("SUBACK") {
        line.clear();
        assert!(
            std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0,
            "mosquitto_sub ended before subscribing"
        );
    }
    a.ok(&["send", "--to", &endpoint, "set 19.0"]);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let _ = sub.wait();
    assert!(
        rest.lines().any(|l| l == "set 19.0"),
        "the device did not get the message: {rest}"
    );
}

/// Packets over `max_packet_bytes` (under MQTT 3.1.1 the limit both ways; it cannot learn the
/// broker's, nor tell its own), both ways, neither stalling the connection: a device's
/// oversized publish is refused with a log line and the next message arrives (it used to come
/// back after every reconnection, with nothing behind it); an answer too large is kept as a
/// dead letter saying why instead of being sent again on every reconnection, the next answer
/// goes out, and the operator's retry meets the same reason and keeps the dead letter. The
/// answers at QoS 2, through the journal.
#[test]
fn messages_over_the_packet_limit_are_refused_both_ways_and_the_next_go_through() {
    let s = Setup::new("mqtt-too-large");
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = s.write_config(&[&inbox]);
    let text = std::fs::read_to_string(&config).unwrap();
    let limited = text.replace(
        "client_id: gatehouse-e2e",
        "client_id: gatehouse-e2e, publish_qos: 2, max_packet_bytes: 1024",
    );
    assert_ne!(limited, text, "the harness config changed shape");
    std::fs::write(&config, limited).unwrap();
    let d = s.start_daemon(&config);
    a.init();
    let big = format!(r#"{{"blob":"{}"}}"#, "x".repeat(5000));
    s.broker.publish("devices/t1/up", big.as_bytes());
    s.broker.publish("devices/t1/up", br#"{"hello":1}"#);
    let first = &a.listen(1)[0];
    assert_eq!(
        first["text"], r#"{"hello":1}"#,
        "the message after the big one"
    );
    d.wait_log(&["rejected: an incoming publish is over channels.mqtt.max_packet_bytes"]);
    let endpoint = first["sender_inbox"].as_str().unwrap().to_string();
    let down = s.broker.subscribe("devices/t1/down");

    a.ok(&["send", "--to", &endpoint, &"x".repeat(2000)]);
    let dl = d.wait_dead_letter("the oversized answer", |d| d["kind"] == "broker");
    let reason = dl["reason"].as_str().unwrap();
    assert!(
        reason.contains("devices/t1/down") && reason.contains("over the limit of 1024 bytes"),
        "the reason says what and why: {reason}"
    );
    assert_eq!(dl["direction"], "outbound");
    assert_eq!(dl["bytes"], 2000);
    d.wait_log(&["a publish is larger than the broker takes; it is not sent"]);

    // The connection carries on: the next answer is the first thing the device gets.
    a.ok(&["send", "--to", &endpoint, "after"]);
    assert_eq!(down.next_message(), "after");

    // Retrying meets the same limit: a clear error, and the dead letter stays.
    let out = d.dlq(&["retry", &dl["id"].to_string()]);
    assert!(!out.status.success(), "a retry over the limit succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("over the limit of 1024 bytes") && err.contains("dead letter is kept"),
        "{err}"
    );
    let kept = d.dead_letters();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0]["id"], dl["id"]);
    assert_eq!(d.status()["mqtt"], "Connected");
}

/// Another client on the daemon's client id: the broker hands the session from one to the
/// other at every connection. The daemon names the likely cause in its log (instead of a lost
/// connection several times a second at the base delay), backs off, and is connected and
/// carrying messages again once the other client is gone.
#[test]
fn another_client_on_the_same_client_id_is_named_and_the_daemon_recovers() {
    let s = Setup::new("mqtt-same-id");
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = s.write_config(&[&inbox]);
    let d = s.start_daemon(&config);
    a.init();
    require("mosquitto_sub", "mosquitto-clients");
    let port = s.broker.port.to_string();
    // The other client, started again whenever the broker hands the session back to the
    // daemon and it exits.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rogue = {
        let (stop, port) = (stop.clone(), port.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let mut c = std::process::Command::new("mosquitto_sub")
                    .args(["-h", "127.0.0.1", "-p", &port, "-i", "gatehouse-e2e"])
                    .args(["-t", "nothing/here"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap();
                while !stop.load(std::sync::atomic::Ordering::SeqCst)
                    && c.try_wait().unwrap().is_none()
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        })
    };
    d.wait_log(&["keeps ending the connection soon after accepting it: is another client connected with the same client id?"]);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    rogue.join().unwrap();
    wait_for("the daemon connected again", || {
        (d.status()["mqtt"] == "Connected").then_some(())
    });
    s.broker.publish("devices/t1/up", br#"{"after":1}"#);
    assert_eq!(a.listen(1)[0]["text"], r#"{"after":1}"#);
}
