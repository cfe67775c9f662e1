//! MQTT channel against brokers that want more: a password file (wrong credentials are a
//! state the operator sees, not a crash loop) and shared subscriptions (two bridges on one
//! broker split the devices' messages).

use gatehouse_e2e::*;

#[test]
fn wrong_password_is_reported_as_bad_credentials_and_the_right_one_connects() {
    let s = Setup::new("mqtt-password");
    let broker = Mosquitto::start_with_password(&s.dir, "bridge", "s3cret");
    let a = s.agent("agent");
    let inbox = a.inbox_id();
    let config = s.write_config_for(broker.port, &[&inbox]);
    let text = std::fs::read_to_string(&config).unwrap();
    let with = |password: &str| {
        let t = text.replace(
            "client_id: gatehouse-e2e",
            &format!("client_id: gatehouse-e2e, username: bridge, password: {password}"),
        );
        assert_ne!(t, text, "the harness config changed shape");
        std::fs::write(&config, t).unwrap();
    };
    with("wr0ngpass");
    let mut d = s.spawn_daemon(&config);
    d.wait_log(&["MQTT broker refused the credentials (bad credentials)"]);
    let status = d.status();
    assert!(
        status["mqtt"]
            .as_str()
            .unwrap()
            .starts_with("BadCredentials"),
        "{status}"
    );
    assert_eq!(d.get("/status").0, 200, "the daemon keeps running");
    assert!(
        !d.log_text().contains("s3cret") && !d.log_text().contains("wr0ngpass"),
        "no secrets in the log"
    );
    d.stop();

    with("s3cret");
    let d = s.start_daemon(&config);
    assert_eq!(d.status()["mqtt"], "Connected");
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
