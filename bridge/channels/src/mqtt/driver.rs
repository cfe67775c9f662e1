//! The MQTT event loop.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, watch};

use super::MqttConfig;

/// Requests queued towards the broker; publishers wait when it is full.
const REQUEST_CAPACITY: usize = 1024;
/// First reconnect delay; doubles per failure up to `MAX_BACKOFF`.
const BASE_BACKOFF: Duration = Duration::from_millis(200);
/// Longest wait between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Where the connection stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectionState {
    /// Dialling.
    Connecting,
    /// Connected and subscribed.
    Connected,
    /// Waiting before the next attempt, with the last error.
    BackingOff(String),
    /// Stopped by shutdown.
    Stopped,
}

/// One message from the broker. Acknowledge it with [`MqttHandle::ack`] once it is durable.
#[derive(Debug)]
pub struct Inbound {
    /// Topic it was published on.
    pub topic: String,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// QoS it arrived with.
    pub qos: u8,
    /// Retained flag.
    pub retain: bool,
    /// Packet id (0 for QoS 0): with the client session, the source's idempotency key.
    pub pkid: u16,
    /// Set when the broker redelivers a message it sent before without getting our
    /// acknowledgement (after a reconnect).
    pub dup: bool,
    publish: rumqttc::Publish,
}

/// Talks to the running driver.
#[derive(Clone)]
pub struct MqttHandle {
    client: AsyncClient,
    state: watch::Receiver<ConnectionState>,
}

impl MqttHandle {
    /// Publishes with QoS 1. Queued while disconnected; sent after reconnecting.
    pub async fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), rumqttc::ClientError> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
    }

    /// Acknowledges an inbound message to the broker (call after the durable write).
    pub async fn ack(&self, msg: &Inbound) -> Result<(), rumqttc::ClientError> {
        self.client.ack(&msg.publish).await
    }

    /// The current connection state.
    pub fn state(&self) -> ConnectionState {
        self.state.borrow().clone()
    }

    /// Waits until the state satisfies `f`.
    pub async fn wait_for(&mut self, f: impl Fn(&ConnectionState) -> bool) {
        let _ = self.state.wait_for(|s| f(s)).await;
    }
}

/// Starts the driver: connects, subscribes to `filters` with QoS 1, and forwards every publish
/// to `inbound` (the driver waits when that channel is full, which holds back the broker).
/// Stops when `shutdown` changes to true.
pub fn start(
    config: &MqttConfig,
    filters: Vec<String>,
    inbound: mpsc::Sender<Inbound>,
    mut shutdown: watch::Receiver<bool>,
) -> MqttHandle {
    let mut opts = MqttOptions::new(config.client_id.clone(), config.host.clone(), config.port);
    opts.set_keep_alive(Duration::from_secs(config.keep_alive_secs.max(5)));
    opts.set_manual_acks(true);
    opts.set_clean_session(config.clean_session);
    opts.set_max_packet_size(config.max_packet_bytes, config.max_packet_bytes);
    if let (Some(u), Some(p)) = (&config.username, &config.password) {
        opts.set_credentials(u.clone(), p.clone());
    }
    let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_CAPACITY);
    let (state_tx, state_rx) = watch::channel(ConnectionState::Connecting);
    let handle = MqttHandle {
        client: client.clone(),
        state: state_rx,
    };
    let broker = format!("{}:{}", config.host, config.port);
    tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            let event = tokio::select! {
                _ = shutdown.changed() => {
                    let _ = client.disconnect().await;
                    let _ = state_tx.send(ConnectionState::Stopped);
                    return;
                }
                e = eventloop.poll() => e,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    failures = 0;
                    for f in &filters {
                        if let Err(e) = client.subscribe(f.clone(), QoS::AtLeastOnce).await {
                            tracing::error!(%broker, filter = %f, error = %e, "MQTT subscribe failed");
                        }
                    }
                    tracing::info!(%broker, "MQTT connected");
                    let _ = state_tx.send(ConnectionState::Connected);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let msg = Inbound {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        qos: p.qos as u8,
                        retain: p.retain,
                        pkid: p.pkid,
                        dup: p.dup,
                        publish: p,
                    };
                    if inbound.send(msg).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let wait = crate::backoff(failures, BASE_BACKOFF, MAX_BACKOFF);
                    // Say so at once, then once per ten attempts, so a long outage stays visible
                    // without flooding the log.
                    if failures.is_multiple_of(10) {
                        tracing::warn!(%broker, error = %e, attempt = failures + 1, retry_in_ms = wait.as_millis() as u64, "MQTT broker unreachable; retrying");
                    } else {
                        tracing::debug!(%broker, error = %e, attempt = failures + 1, retry_in_ms = wait.as_millis() as u64, "MQTT broker unreachable; retrying");
                    }
                    failures = failures.saturating_add(1);
                    let _ = state_tx.send(ConnectionState::BackingOff(e.to_string()));
                    tokio::select! {
                        _ = shutdown.changed() => { let _ = state_tx.send(ConnectionState::Stopped); return; }
                        _ = tokio::time::sleep(wait) => {}
                    }
                    let _ = state_tx.send(ConnectionState::Connecting);
                }
            }
        }
    });
    handle
}
