//! The MQTT event loop.

use std::time::Duration;

use std::collections::HashMap;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Request};
use tokio::sync::{mpsc, oneshot, watch};

use super::MqttConfig;

/// Requests queued towards the broker; publishers wait when it is full.
const REQUEST_CAPACITY: usize = 1024;
/// First reconnect delay; doubles per failure up to `MAX_BACKOFF`.
const BASE_BACKOFF: Duration = Duration::from_millis(200);
/// Longest wait between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Our publishes in flight (sent, PUBACK not yet received); more wait in `publish`. Also
/// rumqttc's in-flight window, so the packet ids we choose (1..=this) are always valid.
const PUBLISH_WINDOW: u16 = 100;

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
    publishes: mpsc::Sender<Outgoing>,
}

/// A publish handed to the driver, and who waits for its PUBACK.
struct Outgoing {
    topic: String,
    payload: Vec<u8>,
    acked: oneshot::Sender<()>,
}

/// Resolves when the broker has acknowledged a publish (PUBACK): from then on the broker owns
/// it. Fails if the driver stopped first.
pub type PublishAck = oneshot::Receiver<()>;

/// The driver stopped (shutdown).
#[derive(Debug, thiserror::Error)]
#[error("the MQTT driver has stopped")]
pub struct DriverStopped;

impl MqttHandle {
    /// Publishes with QoS 1 and returns what resolves at the broker's PUBACK. Kept (in order)
    /// while disconnected and sent again after reconnecting, until acknowledged.
    pub async fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
    ) -> Result<PublishAck, DriverStopped> {
        let (acked, ack) = oneshot::channel();
        self.publishes
            .send(Outgoing {
                topic: topic.to_string(),
                payload,
                acked,
            })
            .await
            .map_err(|_| DriverStopped)?;
        Ok(ack)
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
    opts.set_inflight(PUBLISH_WINDOW);
    let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_CAPACITY);
    let (state_tx, state_rx) = watch::channel(ConnectionState::Connecting);
    let (publish_tx, mut publish_rx) = mpsc::channel::<Outgoing>(REQUEST_CAPACITY);
    let handle = MqttHandle {
        client: client.clone(),
        state: state_rx,
        publishes: publish_tx,
    };
    let broker = format!("{}:{}", config.host, config.port);
    tokio::spawn(async move {
        let mut failures = 0u32;
        // Publishes read from the broker but not yet taken by the consumer. The event loop is
        // polled all the time (it also carries our acknowledgements and publishes: waiting on
        // a full consumer channel instead would deadlock against an ack waiting on a full
        // request queue). The broker's in-flight window bounds it: it sends no more until
        // these are acknowledged, and they are acknowledged only after the consumer stored them.
        let mut pending: std::collections::VecDeque<Inbound> = std::collections::VecDeque::new();
        // Our publishes awaiting their PUBACK, by the packet id we gave them (rumqttc keeps
        // an id it is given, so the ack can be matched to its publish).
        let mut unacked: HashMap<u16, (u64, rumqttc::Publish, oneshot::Sender<()>)> =
            HashMap::new();
        let mut last_pkid: u16 = 0;
        let mut sent: u64 = 0;
        loop {
            let event = tokio::select! {
                _ = shutdown.changed() => {
                    let _ = client.disconnect().await;
                    let _ = state_tx.send(ConnectionState::Stopped);
                    return;
                }
                out = publish_rx.recv(), if unacked.len() < PUBLISH_WINDOW as usize => {
                    let Some(out) = out else { continue };
                    let pkid = loop {
                        last_pkid = last_pkid % PUBLISH_WINDOW + 1;
                        if !unacked.contains_key(&last_pkid) {
                            break last_pkid;
                        }
                    };
                    let mut publish = rumqttc::Publish::new(out.topic, QoS::AtLeastOnce, out.payload);
                    publish.pkid = pkid;
                    eventloop.pending.push_back(Request::Publish(publish.clone()));
                    sent += 1;
                    unacked.insert(pkid, (sent, publish, out.acked));
                    continue;
                }
                permit = inbound.reserve(), if !pending.is_empty() => {
                    let Ok(permit) = permit else { return };
                    if let Some(msg) = pending.pop_front() {
                        permit.send(msg);
                    }
                    continue;
                }
                e = eventloop.poll() => e,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    failures = 0;
                    // What the last connection delivered is delivered again after a reconnect
                    // (unacknowledged, marked DUP); copies from before it would only be
                    // acknowledged on a connection that no longer knows them.
                    pending.clear();
                    // rumqttc sends again what the last connection left unacknowledged when the
                    // broker kept the session; a new session starts empty, so those go again.
                    let queued: std::collections::HashSet<u16> = eventloop
                        .pending
                        .iter()
                        .filter_map(|r| match r {
                            Request::Publish(p) => Some(p.pkid),
                            _ => None,
                        })
                        .collect();
                    let mut again: Vec<&(u64, rumqttc::Publish, oneshot::Sender<()>)> = unacked
                        .values()
                        .filter(|(_, p, _)| !queued.contains(&p.pkid))
                        .collect();
                    // In the order they were first sent.
                    again.sort_by_key(|(n, _, _)| *n);
                    for (_, p, _) in again {
                        eventloop.pending.push_back(Request::Publish(p.clone()));
                    }
                    // Queued from a task of its own: this loop must keep polling, or a full
                    // request queue would never drain.
                    let (c, fs, b) = (client.clone(), filters.clone(), broker.clone());
                    tokio::spawn(async move {
                        for f in fs {
                            if let Err(e) = c.subscribe(f.clone(), QoS::AtLeastOnce).await {
                                tracing::error!(broker = %b, filter = %f, error = %e, "MQTT subscribe failed");
                            }
                        }
                    });
                    tracing::info!(%broker, "MQTT connected");
                    let _ = state_tx.send(ConnectionState::Connected);
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some((_, _, acked)) = unacked.remove(&ack.pkid) {
                        let _ = acked.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    pending.push_back(Inbound {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        qos: p.qos as u8,
                        retain: p.retain,
                        pkid: p.pkid,
                        dup: p.dup,
                        publish: p,
                    });
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
