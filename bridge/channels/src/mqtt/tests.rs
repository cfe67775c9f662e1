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
        h.publish("devices/d1/up", b"x".to_vec(), None, None)
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

/// QoS 2 through the journal: a key is delivered once even when published again,
/// and what a restart interrupted is finished: a publish the broker never released goes again
/// under its id, one it had answered with PUBREC is only released (not delivered twice).
#[tokio::test]
async fn qos2_journal_delivers_each_key_once_across_restarts() {
    qos2_journal(Protocol::V311).await;
}

/// The same under MQTT 5, where a journalled publish also keeps its properties.
#[tokio::test]
async fn qos2_journal_delivers_each_key_once_across_restarts_v5() {
    qos2_journal(Protocol::V5).await;
}

async fn qos2_journal(protocol: Protocol) {
    let (_broker, port) = mosquitto();
    let db = sled::Config::new().temporary(true).open().unwrap();
    let tree = db.open_tree("mqtt-outbox").unwrap();

    // The device: a second connection subscribed to the replies.
    let (dev_tx, mut dev_rx) = mpsc::channel(16);
    let (_dev_stop_tx, dev_stop) = watch::channel(false);
    let dev_cfg = MqttConfig {
        port,
        client_id: "device".into(),
        protocol,
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

    let cfg = qos2_bridge(port, protocol);
    let run = |stop| {
        let (tx, _rx) = mpsc::channel(16);
        let ob = Outbox::open(tree.clone());
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
            .publish("devices/d/down", vec![first], None, Some([first; 32]))
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
        h.publish("devices/d/down", vec![first], None, Some([first; 32]))
            .await
            .unwrap(),
    )
    .await;
    stop_tx.send(true).unwrap();
    h.wait_for(|s| *s == ConnectionState::Stopped).await;

    // As a crash would leave it: one publish the broker answered with PUBREC (it never held
    // pkid 7, as if it had released it already: only PUBREL may go) and one not yet sent.
    let ob = Outbox::open(tree.clone());
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
            props: Some(Properties {
                user_properties: vec![("journalled".into(), pkid.to_string())],
                ..Default::default()
            }),
        })
        .unwrap();
    }
    let (_stop_tx, stop) = watch::channel(false);
    let h = run(stop);
    let last = h
        .publish("devices/d/down", b"new".to_vec(), None, Some([200; 32]))
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
        if m.payload == b"resumed" {
            // The journal kept the properties (MQTT 5 only carries them).
            let expected = (protocol == Protocol::V5).then(|| Properties {
                user_properties: vec![("journalled".into(), "8".into())],
                ..Default::default()
            });
            assert_eq!(m.props, expected);
        }
        got.push(String::from_utf8(m.payload).unwrap());
    }
    assert_eq!(got, ["resumed", "new"]);
    assert!(ob.pending().is_empty(), "journal not emptied");
    assert!(ob.is_done(&[108; 32]) && ob.is_done(&[200; 32]));
    // Nothing else arrives: a marker publish sent last is the next message.
    wait(
        h.publish("devices/d/down", b"marker".to_vec(), None, Some([201; 32]))
            .await
            .unwrap(),
    )
    .await;
    let m = tokio::time::timeout(Duration::from_secs(10), dev_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.payload, b"marker", "something was delivered twice");
}

/// MQTT 5: content type, correlation data, response topic and user properties travel both
/// ways; a subscription does not get our own publishes back (No Local).
#[tokio::test]
async fn mqtt5_properties_round_trip_and_no_local() {
    let (_broker, port) = mosquitto();
    let v5 = |id: &str| MqttConfig {
        port,
        client_id: id.into(),
        protocol: Protocol::V5,
        ..Default::default()
    };
    let (tx, mut rx) = mpsc::channel(16);
    let (_stop_tx, stop) = watch::channel(false);
    // The bridge subscribes to what it also publishes on.
    let mut bridge = start(
        &v5("bridge"),
        vec!["devices/+/up".into()],
        tx,
        stop.clone(),
        None,
    )
    .unwrap();
    let (dev_tx, _dev_rx) = mpsc::channel(16);
    let mut dev = start(&v5("device"), vec![], dev_tx, stop, None).unwrap();
    bridge.wait_for(|s| *s == ConnectionState::Connected).await;
    dev.wait_for(|s| *s == ConnectionState::Connected).await;
    let props = Properties {
        content_type: Some("application/json".into()),
        response_topic: Some("devices/d1/answers".into()),
        correlation_data: Some(vec![0, 1, 2, 255]),
        user_properties: vec![("site".into(), "hq".into()), ("site".into(), "lab".into())],
        message_expiry_secs: Some(60),
    };
    let mut n = 0u8;
    let m = loop {
        // The bridge's own publish on its subscribed topic never comes back...
        bridge
            .publish("devices/own/up", vec![n], None, None)
            .await
            .unwrap();
        // ...while the device's does, properties and all (retried until the subscription is active).
        dev.publish("devices/d1/up", vec![n], Some(props.clone()), None)
            .await
            .unwrap();
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
            break m;
        }
        n += 1;
    };
    assert_eq!(m.topic, "devices/d1/up", "No Local did not hold");
    let got = m.props.clone().expect("properties lost");
    assert_eq!(got.content_type, props.content_type);
    assert_eq!(got.response_topic, props.response_topic);
    assert_eq!(got.correlation_data, props.correlation_data);
    assert_eq!(got.user_properties, props.user_properties);
    // The broker lowers the expiry by the time the message waited.
    assert!(got.message_expiry_secs.is_some_and(|s| s <= 60));
    bridge.ack(&m).await.unwrap();
}

/// One MQTT packet from a raw stream: its first byte and its body (failing after 10 s
/// without one, so a client that stops sending fails the test instead of hanging it).
async fn read_packet(s: &mut tokio::net::TcpStream) -> (u8, Vec<u8>) {
    tokio::time::timeout(Duration::from_secs(10), read_packet_now(s))
        .await
        .expect("no MQTT packet from the client within 10 s")
}

async fn read_packet_now(s: &mut tokio::net::TcpStream) -> (u8, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let header = s.read_u8().await.expect("the client closed the connection");
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let b = s.read_u8().await.unwrap();
        len |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).await.unwrap();
    (header, body)
}

/// A QoS 2 PUBREC is journalled, and flushed, before the PUBREL answers it, so a crash from
/// then on finishes the exchange with PUBREL alone. The broker here is fault injection: it
/// answers CONNECT and the PUBLISH, then checks the journal when the PUBREL arrives and never
/// completes the exchange.
#[tokio::test]
async fn qos2_pubrec_is_journalled_before_the_pubrel() {
    use tokio::io::AsyncWriteExt;
    for protocol in [Protocol::V311, Protocol::V5] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let ob = Outbox::open(db.open_tree("mqtt-outbox").unwrap());
        let cfg = qos2_bridge(port, protocol);
        let (tx, _rx) = mpsc::channel(16);
        let (_stop_tx, stop) = watch::channel(false);
        let h = start(&cfg, vec![], tx, stop, Some(ob.clone())).unwrap();
        let (mut s, _) = listener.accept().await.unwrap();
        let (connect, _) = read_packet(&mut s).await;
        assert_eq!(connect >> 4, 1, "{protocol:?}: CONNECT first");
        let connack: &[u8] = match protocol {
            Protocol::V311 => &[0x20, 2, 0, 0],
            Protocol::V5 => &[0x20, 3, 0, 0, 0],
        };
        s.write_all(connack).await.unwrap();
        let _ack = h
            .publish("devices/d/down", b"once".to_vec(), None, Some([9; 32]))
            .await
            .unwrap();
        let pkid = loop {
            let (header, body) = read_packet(&mut s).await;
            if header >> 4 == 3 {
                assert_eq!(header & 0x06, 0x04, "{protocol:?}: published at QoS 2");
                let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                break [body[2 + topic_len], body[3 + topic_len]];
            }
        };
        let pending = ob.pending();
        assert_eq!(pending.len(), 1, "{protocol:?}: journalled before it left");
        assert!(!pending[0].released, "{protocol:?}: released before PUBREC");
        s.write_all(&[0x50, 2, pkid[0], pkid[1]]).await.unwrap();
        loop {
            let (header, body) = read_packet(&mut s).await;
            if header == 0x62 {
                assert_eq!(body[..2], pkid, "{protocol:?}: PUBREL for the publish");
                break;
            }
        }
        let pending = ob.pending();
        assert_eq!(pending.len(), 1, "{protocol:?}: exchange not finished");
        assert!(
            pending[0].released,
            "{protocol:?}: PUBREL went out before the PUBREC was journalled"
        );
    }
}

/// The bridge's side of the QoS 2 tests: publishes at QoS 2 to the broker on `port`.
fn qos2_bridge(port: u16, protocol: Protocol) -> MqttConfig {
    MqttConfig {
        port,
        client_id: "bridge".into(),
        publish_qos: 2,
        protocol,
        ..Default::default()
    }
}
