//! Against a real mosquitto started on a free loopback port.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

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
    let mut h = start(&cfg, vec!["devices/+/up".into()], tx, stop);
    tokio::time::timeout(
        Duration::from_secs(10),
        h.wait_for(|s| *s == ConnectionState::Connected),
    )
    .await
    .unwrap();
    // The subscription is sent right after CONNACK; a round trip through the broker proves it is active.
    loop {
        h.publish("devices/d1/up", b"x".to_vec()).await.unwrap();
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
            assert_eq!(m.topic, "devices/d1/up");
            assert_eq!(m.payload, b"x");
            assert_eq!(m.qos, 1);
            h.ack(&m).await.unwrap();
            break;
        }
    }
}
