//! Against a real mosquitto started on a free loopback port.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::outbox::Entry;
use super::*;

struct Mosquitto(Child, std::path::PathBuf);

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn mosquitto() -> (Mosquitto, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("gh-mosq-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )
    .unwrap();
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto not found: install the Debian package `mosquitto` (.ci/run does)");
    let broker = Mosquitto(child, dir);
    // Wait until the broker accepts connections (an event, not a fixed sleep).
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (broker, port);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("mosquitto did not start on port {port}");
}

/// A publish through a real broker reaches the driver, and the driver's own publish
/// comes back on its subscription.
#[tokio::test]
async fn publish_and_receive_through_mosquitto() {
    let (_broker, port) = mosquitto();
    let (tx, mut rx) = mpsc::channel(16);
    let (_stop_tx, stop) = watch::channel(false);
    let cfg = MqttConfig {
        port,
        client_id: "t1".into(),
        ..Default::default()
    };
    let mut h = start(&cfg, vec!["devices/+/up".into()], tx, stop, None).unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        h.wait_for(|s| *s == ConnectionState::Connected),
    )
    .await
    .unwrap();
    // The subscription is sent right after CONNACK; a round trip through the broker proves it is active.
    loop {
        h.publish("devices/d1/up", b"x".to_vec(), None)
            .await
            .unwrap();
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
            assert_eq!(m.topic, "devices/d1/up");
            assert_eq!(m.payload, b"x");
            assert_eq!(m.qos, 1);
            h.ack(&m).await.unwrap();
            break;
        }
    }
}

/// QoS 2 through the journalling relay: a key is delivered once even when published again,
/// and what a restart interrupted is finished: a publish the broker never released goes again
/// under its id, one it had answered with PUBREC is only released (not delivered twice).
#[tokio::test]
async fn qos2_journal_delivers_each_key_once_across_restarts() {
    let (_broker, port) = mosquitto();
    let dir = std::env::temp_dir().join(format!("gh-outbox-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = sled::Config::new().temporary(true).open().unwrap();
    let tree = db.open_tree("mqtt-outbox").unwrap();

    // The device: a second connection subscribed to the replies.
    let (dev_tx, mut dev_rx) = mpsc::channel(16);
    let (_dev_stop_tx, dev_stop) = watch::channel(false);
    let dev_cfg = MqttConfig {
        port,
        client_id: "device".into(),
        ..Default::default()
    };
    let mut dev = start(
        &dev_cfg,
        vec!["devices/+/down".into()],
        dev_tx,
        dev_stop,
        None,
    )
    .unwrap();
    dev.wait_for(|s| *s == ConnectionState::Connected).await;

    let cfg = MqttConfig {
        port,
        client_id: "bridge".into(),
        publish_qos: 2,
        ..Default::default()
    };
    let run = |stop| {
        let (tx, _rx) = mpsc::channel(16);
        let ob = Outbox::open(tree.clone(), &dir).unwrap();
        start(&cfg, vec![], tx, stop, Some(ob)).unwrap()
    };
    let wait = |ack: PublishAck| async move {
        tokio::time::timeout(Duration::from_secs(10), ack)
            .await
            .expect("no PUBCOMP within 10 s")
            .expect("driver stopped")
    };
    let (stop_tx, stop) = watch::channel(false);
    let mut h = run(stop);
    h.wait_for(|s| *s == ConnectionState::Connected).await;
    // The subscription may not be active yet: publish distinct keys until one arrives.
    let mut first = 0u8;
    loop {
        first += 1;
        let ack = h
            .publish("devices/d/down", vec![first], Some([first; 32]))
            .await
            .unwrap();
        wait(ack).await;
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), dev_rx.recv()).await {
            assert_eq!(m.payload, vec![first]);
            dev.ack(&m).await.unwrap();
            break;
        }
    }
    // The same key again is answered at once and not delivered.
    wait(
        h.publish("devices/d/down", vec![first], Some([first; 32]))
            .await
            .unwrap(),
    )
    .await;
    stop_tx.send(true).unwrap();
    h.wait_for(|s| *s == ConnectionState::Stopped).await;

    // As a crash would leave it: one publish the broker answered with PUBREC (it never held
    // pkid 7, as if it had released it already: only PUBREL may go) and one not yet sent.
    let ob = Outbox::open(tree.clone(), &dir).unwrap();
    for (pkid, released, payload) in [
        (7u16, true, b"never".to_vec()),
        (8, false, b"resumed".to_vec()),
    ] {
        ob.record(&Entry {
            seq: 1000 + pkid as u64,
            pkid,
            released,
            key: [pkid as u8 + 100; 32],
            topic: "devices/d/down".into(),
            payload,
        })
        .unwrap();
    }
    let (_stop_tx, stop) = watch::channel(false);
    let h = run(stop);
    let last = h
        .publish("devices/d/down", b"new".to_vec(), Some([200; 32]))
        .await
        .unwrap();
    wait(last).await;
    let mut got = Vec::new();
    while got.len() < 2 {
        let m = tokio::time::timeout(Duration::from_secs(10), dev_rx.recv())
            .await
            .expect("device got fewer messages than published")
            .unwrap();
        dev.ack(&m).await.unwrap();
        got.push(String::from_utf8(m.payload).unwrap());
    }
    assert_eq!(got, ["resumed", "new"]);
    assert!(ob.pending().is_empty(), "journal not emptied");
    assert!(ob.is_done(&[108; 32]) && ob.is_done(&[200; 32]));
    // Nothing else arrives: a marker publish sent last is the next message.
    let dev_pub = dev
        .publish("devices/d/down", b"marker".to_vec(), None)
        .await
        .unwrap();
    wait(dev_pub).await;
    let m = tokio::time::timeout(Duration::from_secs(10), dev_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.payload, b"marker", "something was delivered twice");
    let _ = std::fs::remove_dir_all(&dir);
}
