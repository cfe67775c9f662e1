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
    mosquitto_with("")
}

/// A mosquitto with `extra` lines in its configuration.
fn mosquitto_with(extra: &str) -> (Mosquitto, u16) {
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
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{extra}"),
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

/// The device of the QoS 2 tests: a second connection subscribed to the replies (keep the
/// stop sender alive as long as it is used).
async fn qos2_device(
    port: u16,
    protocol: Protocol,
) -> (MqttHandle, mpsc::Receiver<Inbound>, watch::Sender<bool>) {
    let (dev_tx, dev_rx) = mpsc::channel(16);
    let (dev_stop_tx, dev_stop) = watch::channel(false);
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
    (dev, dev_rx, dev_stop_tx)
}

/// Waits for a QoS 2 publish's PUBCOMP.
async fn qos2_done(ack: PublishAck) {
    tokio::time::timeout(Duration::from_secs(10), ack)
        .await
        .expect("no PUBCOMP within 10 s")
        .expect("driver stopped")
        .expect("the broker refused the publish")
}

/// The device's subscription may not be active yet: publishes distinct keys (1, 2, …) until
/// one arrives; the last key used.
async fn qos2_until_subscribed(
    h: &MqttHandle,
    dev: &MqttHandle,
    dev_rx: &mut mpsc::Receiver<Inbound>,
) -> u8 {
    let mut first = 0u8;
    loop {
        first += 1;
        let ack = h
            .publish("devices/d/down", vec![first], None, Some([first; 32]))
            .await
            .unwrap();
        qos2_done(ack).await;
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), dev_rx.recv()).await {
            assert_eq!(m.payload, vec![first]);
            dev.ack(&m).await.unwrap();
            return first;
        }
    }
}

async fn qos2_journal(protocol: Protocol) {
    let (_broker, port) = mosquitto();
    let db = sled::Config::new().temporary(true).open().unwrap();
    let tree = db.open_tree("mqtt-outbox").unwrap();
    let (dev, mut dev_rx, _dev_stop) = qos2_device(port, protocol).await;

    let cfg = qos2_bridge(port, protocol);
    let run = |stop| {
        let (tx, _rx) = mpsc::channel(16);
        let ob = Outbox::open(tree.clone());
        start(&cfg, vec![], tx, stop, Some(ob)).unwrap()
    };
    let wait = qos2_done;
    let (stop_tx, stop) = watch::channel(false);
    let mut h = run(stop);
    h.wait_for(|s| *s == ConnectionState::Connected).await;
    let first = qos2_until_subscribed(&h, &dev, &mut dev_rx).await;
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
    qos2_marker_is_next(&h, &mut dev_rx, [201; 32], "something was delivered twice").await;
}

/// Publishes a marker under `key` and checks it is the next message the device gets.
async fn qos2_marker_is_next(
    h: &MqttHandle,
    dev_rx: &mut mpsc::Receiver<Inbound>,
    key: PublishKey,
    why: &str,
) {
    qos2_done(
        h.publish("devices/d/down", b"marker".to_vec(), None, Some(key))
            .await
            .unwrap(),
    )
    .await;
    let m = tokio::time::timeout(Duration::from_secs(10), dev_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.payload, b"marker", "{why}");
}

/// A burst of QoS 2 publishes, five times the window of open exchanges: journalled a batch
/// at a time and recorded as done a run of PUBCOMPs at a time (one write each), every one
/// arrives once and in order, the journal ends empty with every key done, and a key published
/// again is answered without being delivered again.
#[tokio::test]
async fn qos2_burst_arrives_once_and_leaves_the_journal_empty() {
    let (_broker, port) = mosquitto();
    let db = sled::Config::new().temporary(true).open().unwrap();
    let ob = Outbox::open(db.open_tree("mqtt-outbox").unwrap());
    let (dev, mut dev_rx, _dev_stop) = qos2_device(port, Protocol::V311).await;
    let (tx, _rx) = mpsc::channel(16);
    let (_stop_tx, stop) = watch::channel(false);
    let mut h = start(
        &qos2_bridge(port, Protocol::V311),
        vec![],
        tx,
        stop,
        Some(ob.clone()),
    )
    .unwrap();
    h.wait_for(|s| *s == ConnectionState::Connected).await;
    qos2_until_subscribed(&h, &dev, &mut dev_rx).await;

    let n: usize = 5 * 20; // mosquitto's and the driver's window: 20 open exchanges
    let key = |i: usize| {
        let mut k = [0u8; 32];
        k[..3].copy_from_slice(&[0x80, (i >> 8) as u8, i as u8]);
        k
    };
    let mut acks = Vec::new();
    for i in 0..n {
        acks.push(
            h.publish(
                "devices/d/down",
                i.to_be_bytes().to_vec(),
                None,
                Some(key(i)),
            )
            .await
            .unwrap(),
        );
    }
    for ack in acks {
        qos2_done(ack).await;
    }
    let mut got = Vec::new();
    while got.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(10), dev_rx.recv())
            .await
            .expect("the device got fewer messages than published")
            .unwrap();
        dev.ack(&m).await.unwrap();
        got.push(usize::from_be_bytes(m.payload.try_into().unwrap()));
    }
    assert_eq!(got, (0..n).collect::<Vec<_>>());
    assert!(ob.pending().is_empty(), "journal not emptied");
    for i in 0..n {
        assert!(ob.is_done(&key(i)), "key {i} not done");
    }
    // Published again: answered at once, not delivered (the marker sent next is what comes).
    qos2_done(
        h.publish("devices/d/down", b"again".to_vec(), None, Some(key(0)))
            .await
            .unwrap(),
    )
    .await;
    qos2_marker_is_next(
        &h,
        &mut dev_rx,
        [0x7f; 32],
        "a done key was delivered again",
    )
    .await;
}

/// A publish larger than the broker takes is refused, with the reason, instead of sent: the
/// broker would close the connection on it, and the session would send it again on the next,
/// forever. The connection carries on, and a refused QoS 2 key is not counted as delivered
/// (publishing it again tries again). The limit is the broker's under MQTT 5 (announced in its
/// CONNACK), our `max_packet_bytes` under 3.1.1 (which cannot learn the broker's).
#[tokio::test]
async fn an_oversized_publish_is_refused_and_the_connection_carries_on() {
    let (_broker, port) = mosquitto_with("max_packet_size 2000\n");
    let (dev_tx, mut dev_rx) = mpsc::channel(16);
    let (_stop_tx, stop) = watch::channel(false);
    let dev_cfg = MqttConfig {
        port,
        client_id: "device".into(),
        ..Default::default()
    };
    let mut dev = start(
        &dev_cfg,
        vec!["big/+/down".into()],
        dev_tx,
        stop.clone(),
        None,
    )
    .unwrap();
    dev.wait_for(|s| *s == ConnectionState::Connected).await;
    let wait = |ack: PublishAck| async move {
        tokio::time::timeout(Duration::from_secs(10), ack)
            .await
            .expect("no answer within 10 s: the oversized publish is stuck")
            .expect("driver stopped")
    };
    let mut n = 0u8;
    for protocol in [Protocol::V311, Protocol::V5] {
        for qos in [1u8, 2] {
            let db = sled::Config::new().temporary(true).open().unwrap();
            let ob = Outbox::open(db.open_tree("mqtt-outbox").unwrap());
            let cfg = MqttConfig {
                port,
                client_id: format!("bridge-{protocol:?}-{qos}"),
                publish_qos: qos,
                protocol,
                max_packet_bytes: match protocol {
                    Protocol::V311 => 2000,
                    Protocol::V5 => MqttConfig::default().max_packet_bytes,
                },
                ..Default::default()
            };
            let (tx, _rx) = mpsc::channel(16);
            let mut h = start(&cfg, vec![], tx, stop.clone(), Some(ob.clone())).unwrap();
            h.wait_for(|s| *s == ConnectionState::Connected).await;
            let topic = format!("big/{protocol:?}-{qos}/down");
            let big = || h.publish(&topic, vec![b'x'; 5000], None, Some([qos; 32]));
            let refused = wait(big().await.unwrap())
                .await
                .expect_err("an oversized publish was taken");
            let why = refused.to_string();
            assert!(
                why.contains(&topic) && why.contains("over the limit of 2000 bytes"),
                "{protocol:?} QoS {qos}: the reason does not say what and why: {why}"
            );
            if qos == 2 {
                assert!(
                    ob.pending().is_empty(),
                    "{protocol:?}: refused publish left in the journal"
                );
                assert!(
                    !ob.is_done(&[qos; 32]),
                    "{protocol:?}: refused publish counted as delivered"
                );
                wait(big().await.unwrap())
                    .await
                    .expect_err("the same key again was answered as delivered");
            }
            // The connection carries on: small publishes get through (repeated until the
            // device's subscription is active), and nothing of the big one arrives.
            let m = loop {
                n += 1;
                wait(
                    h.publish(&topic, vec![n], None, Some([n; 32]))
                        .await
                        .unwrap(),
                )
                .await
                .expect("a small publish was refused");
                if let Ok(Some(m)) =
                    tokio::time::timeout(Duration::from_millis(500), dev_rx.recv()).await
                {
                    break m;
                }
            };
            assert_eq!((m.topic.as_str(), m.payload.len()), (topic.as_str(), 1));
            dev.ack(&m).await.unwrap();
            assert_eq!(
                h.state(),
                ConnectionState::Connected,
                "{protocol:?}: the connection dropped"
            );
        }
    }
}

/// MQTT 5: a publish the broker refuses in its acknowledgement (here mosquitto's ACL: Not
/// authorized) resolves with the reason, at QoS 1 and 2; a refused QoS 2 key is not counted as
/// delivered, and the journal keeps nothing of it. (MQTT 3.1.1 brokers drop such a publish
/// without saying so.)
#[tokio::test]
async fn mqtt5_a_publish_the_broker_refuses_says_why() {
    let dir = std::env::temp_dir().join(format!("gh-acl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let acl = dir.join("acl");
    std::fs::write(&acl, "topic readwrite open/#\ntopic read closed/#\n").unwrap();
    let (_broker, port) = mosquitto_with(&format!("acl_file {}\n", acl.display()));
    for qos in [1u8, 2] {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let ob = Outbox::open(db.open_tree("mqtt-outbox").unwrap());
        let cfg = MqttConfig {
            port,
            client_id: format!("acl-{qos}"),
            protocol: Protocol::V5,
            publish_qos: qos,
            ..Default::default()
        };
        let (tx, _rx) = mpsc::channel(16);
        let (_stop_tx, stop) = watch::channel(false);
        let mut h = start(&cfg, vec![], tx, stop, Some(ob.clone())).unwrap();
        h.wait_for(|s| *s == ConnectionState::Connected).await;
        let answer = |topic: &'static str, key: u8| {
            let h = h.clone();
            async move {
                let ack = h
                    .publish(topic, b"x".to_vec(), None, Some([key; 32]))
                    .await
                    .unwrap();
                tokio::time::timeout(Duration::from_secs(10), ack)
                    .await
                    .expect("no acknowledgement within 10 s")
                    .expect("driver stopped")
            }
        };
        let why = answer("closed/d/down", 1)
            .await
            .expect_err("a publish the ACL forbids was taken")
            .to_string();
        assert!(
            why.contains("closed/d/down") && why.contains("NotAuthorized"),
            "QoS {qos}: {why}"
        );
        answer("open/d/down", 2)
            .await
            .unwrap_or_else(|e| panic!("QoS {qos}: an allowed publish was refused: {e}"));
        if qos == 2 {
            assert!(
                ob.pending().is_empty(),
                "the refused publish stayed in the journal"
            );
            assert!(
                !ob.is_done(&[1; 32]),
                "the refused publish counted as delivered"
            );
            assert!(ob.is_done(&[2; 32]));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
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

/// Keep-alive, both versions: CONNECT carries `keep_alive_secs`; with nothing else to send the
/// connection pings, and pings again after the answer; when the broker stops answering, the
/// connection is given up and a new one made, instead of waiting on a dead one. The broker is
/// a raw socket (fault injection: it stops answering pings).
#[tokio::test]
async fn keep_alive_pings_and_a_broker_that_stops_answering_is_left() {
    use tokio::io::AsyncWriteExt;
    let run = |protocol: Protocol| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cfg = MqttConfig {
            port,
            client_id: format!("ka-{protocol:?}"),
            protocol,
            keep_alive_secs: 5,
            ..Default::default()
        };
        let (tx, _rx) = mpsc::channel(16);
        let (_stop_tx, stop) = watch::channel(false);
        let mut h = start(&cfg, vec![], tx, stop, None).unwrap();
        let connack: &[u8] = match protocol {
            Protocol::V311 => &[0x20, 2, 0, 0],
            Protocol::V5 => &[0x20, 3, 0, 0, 0],
        };
        let (mut s, _) = listener.accept().await.unwrap();
        let (connect, body) = read_packet(&mut s).await;
        assert_eq!(connect >> 4, 1, "{protocol:?}: CONNECT first");
        // Protocol name (2 + 4 bytes), level, flags, then the keep-alive.
        assert_eq!(body[8..10], [0, 5], "{protocol:?}: keep-alive in CONNECT");
        s.write_all(connack).await.unwrap();
        h.wait_for(|s| *s == ConnectionState::Connected).await;
        let (ping, _) = read_packet(&mut s).await;
        assert_eq!(ping, 0xC0, "{protocol:?}: PINGREQ while idle");
        s.write_all(&[0xD0, 0]).await.unwrap();
        let (ping, _) = read_packet(&mut s).await;
        assert_eq!(ping, 0xC0, "{protocol:?}: PINGREQ again after the answer");
        // No PINGRESP this time: the connection is given up and made again.
        let (mut again, _) = tokio::time::timeout(Duration::from_secs(20), listener.accept())
            .await
            .unwrap_or_else(|_| panic!("{protocol:?}: still on a broker that stopped answering"))
            .unwrap();
        let (connect, _) = read_packet(&mut again).await;
        assert_eq!(
            connect >> 4,
            1,
            "{protocol:?}: CONNECT on the new connection"
        );
        drop(s);
    };
    tokio::join!(run(Protocol::V311), run(Protocol::V5));
}

/// A device's publish larger than `max_packet_bytes` (which MQTT 3.1.1 cannot tell the
/// broker; MQTT 5 announces it, and the broker then drops such a publish itself) is skipped
/// without being buffered, acknowledged so the broker does not send it again, and reported;
/// the messages after it arrive. Without that, the connection failed on it, and the broker
/// sent it again on every reconnection: nothing behind it ever arrived.
#[tokio::test]
async fn an_oversized_incoming_publish_is_skipped_and_the_next_arrives() {
    let (_broker, port) = mosquitto();
    // QoS 2 too: the PUBREL that follows the refusal must be known to the session.
    for (protocol, qos) in [
        (Protocol::V311, 1),
        (Protocol::V311, 2),
        (Protocol::V5, 1),
        (Protocol::V5, 2),
    ] {
        let cfg = MqttConfig {
            port,
            client_id: format!("small-{protocol:?}-{qos}"),
            protocol,
            max_packet_bytes: 1000,
            subscribe_qos: qos,
            ..Default::default()
        };
        let (tx, mut rx) = mpsc::channel(16);
        let (_stop_tx, stop) = watch::channel(false);
        let mut h = start(
            &cfg,
            vec![format!("in/{protocol:?}{qos}/+")],
            tx,
            stop.clone(),
            None,
        )
        .unwrap();
        h.wait_for(|s| *s == ConnectionState::Connected).await;
        let dev_cfg = MqttConfig {
            port,
            client_id: format!("sender-{protocol:?}-{qos}"),
            publish_qos: qos,
            ..Default::default()
        };
        let (dev_tx, _dev_rx) = mpsc::channel(16);
        let mut dev = start(&dev_cfg, vec![], dev_tx, stop, None).unwrap();
        dev.wait_for(|s| *s == ConnectionState::Connected).await;
        // Until the subscription is active, publishes are lost: repeat a small one first.
        // (QoS 2 needs the journal for publishing.)
        let first = loop {
            dev.publish(
                &format!("in/{protocol:?}{qos}/probe"),
                b"p".to_vec(),
                None,
                None,
            )
            .await
            .unwrap();
            if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
                break m;
            }
        };
        h.ack(&first).await.unwrap();
        let big = dev
            .publish(
                &format!("in/{protocol:?}{qos}/big"),
                vec![b'x'; 5000],
                None,
                None,
            )
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), big)
            .await
            .expect("the broker did not take the big publish")
            .unwrap()
            .unwrap();
        dev.publish(
            &format!("in/{protocol:?}{qos}/after"),
            b"after".to_vec(),
            None,
            None,
        )
        .await
        .unwrap();
        let m = loop {
            let m = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!("{protocol:?} QoS {qos}: nothing arrived after the oversized publish")
                })
                .unwrap();
            h.ack(&m).await.unwrap();
            // A probe repeated before the subscription answered may still come.
            if !m.topic.ends_with("/probe") {
                break m;
            }
        };
        assert_eq!(
            (m.topic.as_str(), m.payload.as_slice()),
            (
                format!("in/{protocol:?}{qos}/after").as_str(),
                &b"after"[..]
            ),
            "{protocol:?}"
        );
        assert_eq!(h.state(), ConnectionState::Connected, "{protocol:?}");
    }
}

/// The same against a broker that ignores the limit (fault injection on a raw socket; under
/// MQTT 5 we announce it, and mosquitto keeps to it): an oversized PUBLISH, written in pieces,
/// is refused (MQTT 5: reason code 0x97 Quota exceeded) and the one after it arrives.
#[tokio::test]
async fn an_oversized_publish_from_a_broker_that_ignores_the_limit_is_refused() {
    use tokio::io::AsyncWriteExt;
    for protocol in [Protocol::V311, Protocol::V5] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cfg = MqttConfig {
            port,
            client_id: "cut".into(),
            protocol,
            max_packet_bytes: 1000,
            ..Default::default()
        };
        let (tx, mut rx) = mpsc::channel(16);
        let (_stop_tx, stop) = watch::channel(false);
        let h = start(&cfg, vec![], tx, stop, None).unwrap();
        let (mut s, _) = listener.accept().await.unwrap();
        let (connect, _) = read_packet(&mut s).await;
        assert_eq!(connect >> 4, 1, "{protocol:?}: CONNECT first");
        let (connack, props): (&[u8], &[u8]) = match protocol {
            Protocol::V311 => (&[0x20, 2, 0, 0], &[]),
            Protocol::V5 => (&[0x20, 3, 0, 0, 0], &[0]),
        };
        s.write_all(connack).await.unwrap();
        // QoS 1 PUBLISHes: topic "t/big" or "t/ok", packet id, (MQTT 5: no properties), payload.
        let publish = |topic: &str, pkid: u16, payload: &[u8]| {
            let mut body = (topic.len() as u16).to_be_bytes().to_vec();
            body.extend_from_slice(topic.as_bytes());
            body.extend_from_slice(&pkid.to_be_bytes());
            body.extend_from_slice(props);
            body.extend_from_slice(payload);
            let mut p = vec![0x32];
            let mut n = body.len();
            loop {
                let b = (n % 128) as u8;
                n /= 128;
                p.push(if n > 0 { b | 0x80 } else { b });
                if n == 0 {
                    break;
                }
            }
            p.extend(body);
            p
        };
        let big = publish("t/big", 7, &[b'x'; 50_000]);
        for piece in big.chunks(7_000) {
            s.write_all(piece).await.unwrap();
            s.flush().await.unwrap();
        }
        s.write_all(&publish("t/ok", 8, b"fine")).await.unwrap();
        let m = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("nothing arrived after the oversized publish")
            .unwrap();
        assert_eq!(
            (m.topic.as_str(), m.payload.as_slice(), m.pkid),
            ("t/ok", &b"fine"[..], 8)
        );
        let (header, body) = read_packet(&mut s).await;
        assert_eq!(
            header, 0x40,
            "{protocol:?}: PUBACK for the oversized publish"
        );
        assert_eq!(body[..2], [0, 7], "{protocol:?}: its packet id");
        if protocol == Protocol::V5 {
            assert_eq!(body[2], 0x97, "reason code Quota exceeded");
        }
        h.ack(&m).await.unwrap();
        let (header, body) = read_packet(&mut s).await;
        assert_eq!(
            (header, &body[..2]),
            (0x40, &[0u8, 8][..]),
            "{protocol:?}: then the next one's"
        );
    }
}

/// A broker that loses the session in the middle of a QoS 2 exchange (after its PUBREC) gets
/// the PUBLISH again, and the journal counts the exchange as open again: after a restart
/// before the new PUBREC, the PUBLISH goes once more, instead of only a PUBREL for an id the
/// broker may never have had (it would complete it without delivering). Fault injection: a
/// raw socket as the broker.
#[tokio::test]
async fn a_broker_that_lost_the_session_mid_exchange_gets_the_publish_until_it_answers() {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let db = sled::Config::new().temporary(true).open().unwrap();
    let ob_tree = db.open_tree("mqtt-outbox").unwrap();
    let ob = Outbox::open(ob_tree.clone());
    let cfg = qos2_bridge(port, Protocol::V311);
    let run = |stop| {
        let (tx, _rx) = mpsc::channel(16);
        start(&cfg, vec![], tx, stop, Some(Outbox::open(ob_tree.clone()))).unwrap()
    };
    let (stop_tx, stop) = watch::channel(false);
    let mut h = run(stop);
    // Accepts the next connection and answers its CONNECT (`present`: the session was kept).
    let connect = |present: bool| {
        let listener = &listener;
        async move {
            let (mut s, _) = tokio::time::timeout(Duration::from_secs(20), listener.accept())
                .await
                .expect("no new connection")
                .unwrap();
            let (connect, _) = read_packet(&mut s).await;
            assert_eq!(connect >> 4, 1, "CONNECT first");
            s.write_all(&[0x20, 2, u8::from(present), 0]).await.unwrap();
            s
        }
    };
    let mut s = connect(false).await;
    let _ack = h
        .publish("devices/d/down", b"once".to_vec(), None, Some([5; 32]))
        .await
        .unwrap();
    let (header, pkid) = publish_or_pubrel(&mut s).await;
    assert_eq!(header >> 4, 3, "PUBLISH");
    s.write_all(&[0x50, 2, pkid[0], pkid[1]]).await.unwrap();
    let (header, _) = publish_or_pubrel(&mut s).await;
    assert_eq!(header, 0x62, "PUBREL after the PUBREC");
    drop(s);
    // The session is gone: the PUBLISH goes again (DUP).
    let mut s = connect(false).await;
    let (header, again) = publish_or_pubrel(&mut s).await;
    assert_eq!(
        (header >> 4, again),
        (3, pkid),
        "PUBLISH again to a broker without the session"
    );
    assert!(
        ob.pending().iter().all(|e| !e.released),
        "the journal still says released"
    );
    // A restart before the new PUBREC: even with the session kept, it is published again.
    stop_tx.send(true).unwrap();
    h.wait_for(|s| *s == ConnectionState::Stopped).await;
    drop(s);
    let (_stop_tx, stop) = watch::channel(false);
    let _h = run(stop);
    let mut s = connect(true).await;
    let (header, again) = publish_or_pubrel(&mut s).await;
    assert_eq!(
        (header >> 4, again),
        (3, pkid),
        "only released (PUBREL) though the broker never answered the PUBLISH"
    );
}

/// The next PUBLISH or PUBREL from a raw stream: its first byte and packet id.
async fn publish_or_pubrel(s: &mut tokio::net::TcpStream) -> (u8, [u8; 2]) {
    loop {
        let (header, body) = read_packet(s).await;
        match header >> 4 {
            3 => {
                let topic = usize::from(u16::from_be_bytes([body[0], body[1]]));
                return (header, [body[2 + topic], body[3 + topic]]);
            }
            6 => return (header, [body[0], body[1]]),
            _ => {}
        }
    }
}
