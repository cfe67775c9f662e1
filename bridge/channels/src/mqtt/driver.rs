//! The MQTT event loop.

use std::time::Duration;

use std::collections::HashMap;
use std::sync::Arc;

use futures::FutureExt;
use tokio::sync::{mpsc, oneshot, watch};

use super::link::{self, Client, Ev, OutPublish, RawPublish};
use super::outbox::{Entry, Outbox, PublishKey};
use super::{MqttConfig, Properties, Protocol};

/// Requests queued towards the broker; publishers wait when it is full.
const REQUEST_CAPACITY: usize = 1024;
/// First reconnect delay; doubles per failure up to `MAX_BACKOFF`.
const BASE_BACKOFF: Duration = Duration::from_millis(200);
/// Longest wait between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Our publishes in flight (sent, PUBACK not yet received); more wait in `publish`. Also
/// rumqttc's in-flight window, so the packet ids we choose (1..=this) are always valid.
const PUBLISH_WINDOW: u16 = 100;

/// Our QoS 2 publishes unfinished at once. The broker keeps each until our PUBREL, and
/// refuses more than its in-flight maximum (mosquitto: `max_inflight_messages`, 20 by
/// default; MQTT 3.1.1 has no way to learn it, and the refusal closes the connection).
const QOS2_WINDOW: usize = 20;

/// Events the driver takes from the connection in a row without waiting on anything else.
const DRAIN_MAX: usize = 256;

/// A connection the broker ends sooner than this after accepting it does not reset the
/// backoff: when two clients share a client id, the broker hands the session from one to the
/// other at every connection, and resetting would make that a loop at the base delay.
const SHORT_LIVED: Duration = Duration::from_secs(5);

/// Short-lived connections in a row before the log says what they look like.
const FLAPPING_AFTER: u32 = 3;

/// How long to wait before trying credentials the broker refused again.
const BAD_CREDENTIALS_RETRY: Duration = Duration::from_secs(30);

/// Where the connection stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectionState {
    /// Dialling.
    Connecting,
    /// Connected and subscribed.
    Connected,
    /// Waiting before the next attempt, with the last error.
    BackingOff(String),
    /// The server refused the credentials.
    BadCredentials(String),
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
    /// MQTT 5 properties (content type, response topic, correlation data, user properties).
    pub props: Option<Properties>,
    raw: RawPublish,
}

/// How long a filter change waits for the broker to confirm new subscriptions.
const SUBACK_WAIT: Duration = Duration::from_secs(5);

/// Talks to the running driver.
#[derive(Clone)]
pub struct MqttHandle {
    client: Client,
    state: watch::Receiver<ConnectionState>,
    publishes: mpsc::Sender<Outgoing>,
    refusals: mpsc::UnboundedSender<(RawPublish, String)>,
    protocol: Protocol,
    /// What the connection subscribes to (again after every reconnect).
    filters: Arc<std::sync::Mutex<Vec<String>>>,
    sub_qos: u8,
    /// SUBACKs received so far (a filter change waits for its own).
    subacks: watch::Receiver<u64>,
}

/// A publish handed to the driver, and who waits for its acknowledgement.
struct Outgoing {
    topic: String,
    payload: Vec<u8>,
    props: Option<Properties>,
    key: Option<PublishKey>,
    acked: oneshot::Sender<Result<(), Refused>>,
}

/// One of our publishes the broker has not finished acknowledging.
struct InFlight {
    /// Order of first sending (kept across restarts for journalled publishes).
    seq: u64,
    publish: OutPublish,
    /// QoS 2: the broker sent PUBREC, so only PUBREL may follow.
    released: bool,
    key: Option<PublishKey>,
    acked: Vec<oneshot::Sender<Result<(), Refused>>>,
}

impl InFlight {
    fn done(self) {
        for a in self.acked {
            let _ = a.send(Ok(()));
        }
    }

    /// The broker will not take it: whoever waits hears why.
    fn refuse(self, reason: &str) {
        let refused = Refused(format!("{}: {reason}", self.publish.topic));
        for a in self.acked {
            let _ = a.send(Err(refused.clone()));
        }
    }
}

/// A publish the broker will not take (refused in its acknowledgement under MQTT 5, or larger
/// than the broker's packet size limit): it was not delivered, and sending it again would meet
/// the same answer. Says the topic and why.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Resolves when the broker has taken over a publish (PUBACK for QoS 1, PUBCOMP for QoS 2, at
/// once for QoS 0), or with [`Refused`] when it will not. Fails if the driver stopped first,
/// or could not journal a QoS 2 publish.
pub type PublishAck = oneshot::Receiver<Result<(), Refused>>;

/// The driver stopped (shutdown).
#[derive(Debug, thiserror::Error)]
#[error("the MQTT driver has stopped")]
pub struct DriverStopped;

impl MqttHandle {
    /// Publishes with the configured QoS and returns what resolves when the broker has it.
    /// Kept (in order) while disconnected and sent again after reconnecting, until
    /// acknowledged. With QoS 2 and a journal, `key` identifies the message across restarts:
    /// publishing a key again that is in flight or done does not deliver it twice.
    /// `props` go out under MQTT 5 and are dropped under 3.1.1.
    pub async fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        props: Option<Properties>,
        key: Option<PublishKey>,
    ) -> Result<PublishAck, DriverStopped> {
        let (acked, ack) = oneshot::channel();
        self.publishes
            .send(Outgoing {
                topic: topic.to_string(),
                payload,
                props: props.filter(|p| !p.is_empty() && self.protocol == Protocol::V5),
                key,
                acked,
            })
            .await
            .map_err(|_| DriverStopped)?;
        Ok(ack)
    }

    /// Acknowledges an inbound message to the broker (call after the durable write).
    pub async fn ack(&self, msg: &Inbound) -> Result<(), String> {
        self.client.ack(&msg.raw).await
    }

    /// Acknowledges an inbound message the bridge will not take (over the size limit): under
    /// MQTT 5 with a refusal reason code (`Quota exceeded`) and `reason` as the reason string,
    /// under 3.1.1 as a plain acknowledgement.
    pub fn refuse(&self, msg: &Inbound, reason: &str) -> Result<(), DriverStopped> {
        self.refusals
            .send((msg.raw.clone(), reason.to_string()))
            .map_err(|_| DriverStopped)
    }

    /// Changes what the connection subscribes to (a configuration reload): subscribes to the
    /// new filters and unsubscribes from those no longer wanted, on the same connection (the
    /// routes that keep their filters see no gap). Reconnects subscribe to the new set.
    pub async fn set_filters(&self, filters: Vec<String>) {
        let mut subacks = self.subacks.clone();
        let before = *subacks.borrow_and_update();
        let (added, removed) = {
            let mut current = self.filters.lock().unwrap_or_else(|p| p.into_inner());
            let added: Vec<String> = filters
                .iter()
                .filter(|f| !current.contains(f))
                .cloned()
                .collect();
            let removed: Vec<String> = current
                .iter()
                .filter(|f| !filters.contains(f))
                .cloned()
                .collect();
            *current = filters;
            (added, removed)
        };
        for f in &added {
            if let Err(e) = self.client.subscribe(f, self.sub_qos).await {
                tracing::error!(filter = %f, error = %e, "MQTT subscribe failed");
            }
        }
        for f in &removed {
            if let Err(e) = self.client.unsubscribe(f).await {
                tracing::error!(filter = %f, error = %e, "MQTT unsubscribe failed");
            }
        }
        // Done once the broker confirmed the new subscriptions (or, disconnected, they follow
        // with the reconnection).
        if !added.is_empty() {
            let want = before + added.len() as u64;
            if tokio::time::timeout(SUBACK_WAIT, subacks.wait_for(|n| *n >= want))
                .await
                .is_err()
            {
                tracing::warn!(filters = ?added, "the broker has not confirmed the new subscriptions yet; they take effect when it does");
            }
        }
    }

    /// The filters subscribed to.
    pub fn filters(&self) -> Vec<String> {
        self.filters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The protocol version in use.
    pub fn protocol(&self) -> Protocol {
        self.protocol
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

/// Starts the driver: connects, subscribes to `filters` (QoS `subscribe_qos`), and forwards
/// every publish to `inbound` (held back, and so the broker, while the consumer is behind).
/// With `publish_qos: 2` and an `outbox`, our publishes are exactly-once across crashes (see
/// [`Outbox`]). Stops when `shutdown` changes to true. Fails only on TLS settings that cannot
/// be used (unreadable files, a server name that cannot be one).
pub fn start(
    config: &MqttConfig,
    filters: Vec<String>,
    inbound: mpsc::Sender<Inbound>,
    mut shutdown: watch::Receiver<bool>,
    outbox: Option<Outbox>,
) -> std::io::Result<MqttHandle> {
    let broker = format!("{}:{}", config.host, config.port);
    let protocol = config.protocol;
    let max_packet = config.max_packet_bytes;
    let qos = config.publish_qos.min(2);
    let outbox = outbox.filter(|_| qos == 2);
    let tls = match &config.tls {
        Some(t) => {
            let name = t.server_name.clone().unwrap_or_else(|| config.host.clone());
            Some((std::sync::Arc::new(t.client_config()?), name))
        }
        None => None,
    };
    let (client, mut eventloop) = link::open(
        config,
        tls,
        outbox.clone(),
        PUBLISH_WINDOW,
        REQUEST_CAPACITY,
    )?;
    let (state_tx, state_rx) = watch::channel(ConnectionState::Connecting);
    let (publish_tx, mut publish_rx) = mpsc::channel::<Outgoing>(REQUEST_CAPACITY);
    let (refusal_tx, mut refusal_rx) = mpsc::unbounded_channel::<(RawPublish, String)>();
    let sub_qos = if config.subscribe_qos == 2 { 2 } else { 1 };
    let filters = Arc::new(std::sync::Mutex::new(filters));
    let (suback_tx, subacks) = watch::channel(0u64);
    let handle = MqttHandle {
        client: client.clone(),
        state: state_rx,
        publishes: publish_tx,
        refusals: refusal_tx,
        protocol: config.protocol,
        filters: filters.clone(),
        sub_qos,
        subacks,
    };
    // Journalled publishes a crash interrupted go first, in their order, under their ids.
    let mut unacked: HashMap<u16, InFlight> = HashMap::new();
    let mut sent: u64 = 0;
    if let Some(ob) = &outbox {
        sent = ob.last_seq();
        for e in ob.pending() {
            unacked.insert(
                e.pkid,
                InFlight {
                    seq: e.seq,
                    publish: OutPublish {
                        pkid: e.pkid,
                        qos: 2,
                        dup: true,
                        topic: e.topic,
                        payload: e.payload,
                        props: e.props,
                    },
                    released: e.released,
                    key: Some(e.key),
                    acked: Vec::new(),
                },
            );
        }
        if !unacked.is_empty() {
            tracing::info!(%broker, publishes = unacked.len(), "resuming QoS 2 publishes a restart interrupted");
        }
        // Sent by the first CONNACK's resend below (one path only: queued here as well, a
        // PUBLISH could go out twice, the second after its exchange completed, and the broker
        // would then take it as new and the next publish under that id as its duplicate).
    }
    let base_window = if qos == 2 {
        QOS2_WINDOW
    } else {
        PUBLISH_WINDOW as usize
    };
    let client_id = config.client_id.clone();
    tokio::spawn(async move {
        let mut failures = 0u32;
        // When the current connection was accepted, and how many in a row ended soon after.
        let mut connected_at: Option<std::time::Instant> = None;
        let mut short_lived = 0u32;
        // MQTT 5: the broker's Receive Maximum may narrow the window.
        let mut window = base_window;
        // Publishes read from the broker but not yet taken by the consumer. The event loop is
        // polled all the time (it also carries our acknowledgements and publishes: waiting on
        // a full consumer channel instead would deadlock against an ack waiting on a full
        // request queue). The broker's in-flight window bounds it: it sends no more until
        // these are acknowledged, and they are acknowledged only after the consumer stored them.
        let mut pending: std::collections::VecDeque<Inbound> = std::collections::VecDeque::new();
        // `unacked`: our publishes awaiting their acknowledgement, by the packet id we gave
        // them (rumqttc keeps an id it is given, so the ack can be matched to its publish).
        let mut last_pkid: u16 = 0;
        // New publishes wait for the first connection, so what a restart interrupted goes
        // first, in its order.
        let mut connected_once = false;
        // Events taken from the connection without waiting, since the last wait (see below).
        let mut drained: Option<usize> = None;
        // QoS 2 publishes whose PUBCOMP arrived in the current run of events: journalled as
        // done together when it ends (see `complete`).
        let mut finished: Vec<(u16, InFlight)> = Vec::new();
        loop {
            // While publishes wait, what the connection has already read (acknowledgements
            // arrive in bursts) is taken before anything else: the window frees in one go, and
            // the waiting publishes then go out, journalled with one flush under QoS 2, as one
            // batch instead of one each. Only while connected (after an event), and bounded,
            // so the other branches get their turn.
            let ready = match drained {
                Some(n) if n < DRAIN_MAX && !publish_rx.is_empty() => {
                    drained = Some(n + 1);
                    eventloop.poll().now_or_never()
                }
                _ => None,
            };
            let event = if let Some(e) = ready {
                e
            } else {
                drained = None;
                complete(&outbox, &broker, &mut finished);
                tokio::select! {
                    _ = shutdown.changed() => {
                        eventloop.close().await;
                        let _ = state_tx.send(ConnectionState::Stopped);
                        return;
                    }
                    Some((raw, reason)) = refusal_rx.recv() => {
                        eventloop.push_refusal(&raw, &reason);
                        continue;
                    }
                    out = publish_rx.recv(), if connected_once && unacked.len() < window => {
                        let Some(out) = out else { continue };
                        let mut batch = vec![out];
                        while unacked.len() + batch.len() < window {
                            match publish_rx.try_recv() {
                                Ok(o) => batch.push(o),
                                Err(_) => break,
                            }
                        }
                        let mut ready = Vec::new();
                        let mut journalled = Vec::new();
                        let mut entries = Vec::new();
                        let mut at_most_once = Vec::new();
                        for out in batch {
                            if qos == 0 {
                                at_most_once.push(OutPublish { pkid: 0, qos, dup: false, topic: out.topic, payload: out.payload, props: out.props });
                                let _ = out.acked.send(Ok(()));
                                continue;
                            }
                            let journal = outbox.as_ref().zip(out.key);
                            if let Some((ob, key)) = journal {
                                if ob.is_done(&key) {
                                    let _ = out.acked.send(Ok(()));
                                    continue;
                                }
                                if let Some(f) = unacked.values_mut().find(|f| f.key == Some(key)) {
                                    // Sent before a restart: its acknowledgement answers this too.
                                    f.acked.push(out.acked);
                                    continue;
                                }
                            }
                            let pkid = loop {
                                last_pkid = last_pkid % PUBLISH_WINDOW + 1;
                                if !unacked.contains_key(&last_pkid) {
                                    break last_pkid;
                                }
                            };
                            sent += 1;
                            let publish = OutPublish { pkid, qos, dup: false, topic: out.topic, payload: out.payload, props: out.props };
                            if let Some((_, key)) = journal {
                                entries.push(Entry { seq: sent, pkid, released: false, key, topic: publish.topic.clone(), payload: publish.payload.clone(), props: publish.props.clone() });
                                journalled.push(pkid);
                            }
                            ready.push(pkid);
                            unacked.insert(pkid, InFlight { seq: sent, publish, released: false, key: out.key, acked: vec![out.acked] });
                        }
                        // The batch's journal entries in one write, then one flush.
                        if let (Some(ob), false) = (&outbox, journalled.is_empty()) {
                            let stored = match ob.record_all(&entries) {
                                Ok(()) => ob.flush().await,
                                Err(e) => Err(e),
                            };
                            if let Err(e) = stored {
                                // Not on disk, so not sent: the callers see the failure and keep them.
                                tracing::error!(%broker, error = %e, "could not journal QoS 2 publishes; they stay with the caller");
                                for pkid in journalled {
                                    unacked.remove(&pkid);
                                }
                            }
                        }
                        // One write for the batch (not one poll each: see `send_publishes`).
                        let mut now: Vec<OutPublish> = at_most_once;
                        now.extend(ready.iter().filter_map(|pkid| unacked.get(pkid).map(|f| f.publish.clone())));
                        eventloop.send_publishes(&now).await;
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
                }
            };
            drained = event.is_ok().then_some(drained.unwrap_or(0));
            match event {
                Ok(Ev::ConnAck {
                    session_present,
                    receive_max,
                }) => {
                    connected_at = Some(std::time::Instant::now());
                    connected_once = true;
                    window = base_window.min(receive_max.map_or(usize::MAX, usize::from));
                    // What the last connection delivered is delivered again after a reconnect
                    // (unacknowledged, marked DUP); copies from before it would only be
                    // acknowledged on a connection that no longer knows them.
                    pending.clear();
                    // rumqttc sends again what the last connection left unacknowledged when the
                    // broker kept the session; a new session starts empty, so those go again.
                    // Journalled QoS 2 publishes from before a restart go the same way: a PUBLISH
                    // again under its id, or only the PUBREL once the broker had sent PUBREC.
                    let queued = eventloop.queued_ids();
                    let mut again: Vec<&mut InFlight> = unacked
                        .values_mut()
                        .filter(|f| !queued.contains(&f.publish.pkid))
                        .collect();
                    // In the order they were first sent.
                    again.sort_by_key(|f| f.seq);
                    for f in again {
                        if f.released && session_present {
                            eventloop.push_pubrel(f.publish.pkid);
                        } else {
                            if f.released {
                                tracing::warn!(%broker, "the broker lost the session during a QoS 2 exchange; publishing again (the device may get this message twice)");
                                // Not released until its new PUBREC, in the journal too: after
                                // a restart it must be published again, not only released (the
                                // broker may never have had this PUBLISH, and would complete a
                                // PUBREL for an id it does not know without delivering).
                                f.released = false;
                                if let (Some(ob), Some(key)) = (&outbox, f.key) {
                                    let entry = Entry {
                                        seq: f.seq,
                                        pkid: f.publish.pkid,
                                        released: false,
                                        key,
                                        topic: f.publish.topic.clone(),
                                        payload: f.publish.payload.clone(),
                                        props: f.publish.props.clone(),
                                    };
                                    if let Err(e) = ob.record(&entry) {
                                        tracing::error!(%broker, error = %e, "could not journal a QoS 2 publish sent again");
                                    }
                                }
                            }
                            eventloop.push_publish(&f.publish);
                        }
                    }
                    // Queued from a task of its own: this loop must keep polling, or a full
                    // request queue would never drain.
                    let fs = filters.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    let (c, b) = (client.clone(), broker.clone());
                    tokio::spawn(async move {
                        for f in fs {
                            if let Err(e) = c.subscribe(&f, sub_qos).await {
                                tracing::error!(broker = %b, filter = %f, error = %e, "MQTT subscribe failed");
                            }
                        }
                    });
                    tracing::info!(%broker, session_present, "MQTT connected");
                    let _ = state_tx.send(ConnectionState::Connected);
                }
                Ok(Ev::PubAck { pkid, refused }) => {
                    if let Some(f) = unacked.remove(&pkid) {
                        match refused {
                            // MQTT 5 only; the broker will not deliver it, and sending it
                            // again would meet the same answer.
                            Some(reason) => {
                                tracing::error!(%broker, topic = %f.publish.topic, %reason, "the broker refused a publish; it is not delivered");
                                f.refuse(&format!("the broker refused it ({reason})"));
                            }
                            None => f.done(),
                        }
                    }
                }
                Ok(Ev::PubRec { pkid, refused }) => {
                    if let Some(reason) = refused {
                        // The exchange ends here (no PUBREL follows a refusal).
                        if let Some(f) = unacked.remove(&pkid) {
                            tracing::error!(%broker, topic = %f.publish.topic, %reason, "the broker refused a publish; it is not delivered");
                            forget(&outbox, &broker, pkid);
                            f.refuse(&format!("the broker refused it ({reason})"));
                        }
                    } else if let Some(f) = unacked.get_mut(&pkid) {
                        f.released = true;
                    }
                }
                Ok(Ev::PubComp(pkid)) => {
                    // Recorded with the others of this run of events, before the driver waits
                    // again or sends anything (a packet id is not used again before then).
                    if let Some(f) = unacked.remove(&pkid) {
                        finished.push((pkid, f));
                    }
                }
                Ok(Ev::Publish {
                    topic,
                    payload,
                    retain,
                    dup,
                    props,
                    raw,
                }) => {
                    pending.push_back(Inbound {
                        topic,
                        payload,
                        qos: raw.qos(),
                        retain,
                        pkid: raw.pkid(),
                        dup,
                        props,
                        raw,
                    });
                }
                Ok(Ev::TooLarge {
                    pkid,
                    topic,
                    size,
                    max,
                }) => {
                    let limit = match protocol {
                        Protocol::V311 => {
                            "channels.mqtt.max_packet_bytes (MQTT 3.1.1 cannot learn the broker's limit)"
                        }
                        Protocol::V5 => "the Maximum Packet Size the broker announced",
                    };
                    tracing::error!(%broker, %topic, size, max, limit, "a publish is larger than the broker takes; it is not sent");
                    // QoS 0 (packet id 0) is never in flight: the log line is all there is.
                    if let Some(f) = unacked.remove(&pkid) {
                        forget(&outbox, &broker, pkid);
                        f.refuse(&format!(
                            "the publish is {size} bytes, over the limit of {max} bytes ({limit})"
                        ));
                    }
                }
                Ok(Ev::Oversized { topic, size, raw }) => {
                    // Acknowledged (MQTT 5: with Quota exceeded), so the broker does not send it
                    // again on every reconnection; not carried, like a payload over a route's
                    // max_payload.
                    tracing::warn!(%broker, %topic, bytes = size, limit = max_packet, "rejected: an incoming publish is over channels.mqtt.max_packet_bytes; acknowledged and not carried");
                    eventloop.push_refusal(
                        &raw,
                        &format!("packet of {size} bytes is over the limit of {max_packet} bytes"),
                    );
                }
                Ok(Ev::SubAck) => suback_tx.send_modify(|n| *n += 1),
                Ok(Ev::Other) => {}
                Err(e) => {
                    let message = e.message;
                    if e.refused {
                        // Retrying fast cannot help: the operator has to fix the credentials.
                        // Said at every attempt (they are BAD_CREDENTIALS_RETRY apart).
                        tracing::error!(%broker, error = %message, retry_in_secs = BAD_CREDENTIALS_RETRY.as_secs(), "MQTT broker refused the credentials (bad credentials): check channels.mqtt.username and password");
                        let _ = state_tx.send(ConnectionState::BadCredentials(message));
                        tokio::select! {
                            _ = shutdown.changed() => { let _ = state_tx.send(ConnectionState::Stopped); return; }
                            _ = tokio::time::sleep(BAD_CREDENTIALS_RETRY) => {}
                        }
                        let _ = state_tx.send(ConnectionState::Connecting);
                        continue;
                    }
                    // A connection that lasted starts the backoff again; one the broker ended
                    // soon after accepting it does not.
                    let lost = connected_at.take().map(|at| at.elapsed());
                    match lost {
                        Some(up) if up >= SHORT_LIVED => {
                            failures = 0;
                            short_lived = 0;
                        }
                        Some(_) => short_lived = short_lived.saturating_add(1),
                        None => {}
                    }
                    let wait = crate::backoff(failures, BASE_BACKOFF, MAX_BACKOFF);
                    let retry_in_ms = wait.as_millis() as u64;
                    // Say so at once, then once per ten attempts, so a long outage stays visible
                    // without flooding the log.
                    if lost.is_some() && short_lived >= FLAPPING_AFTER {
                        if (short_lived - FLAPPING_AFTER).is_multiple_of(10) {
                            tracing::warn!(%broker, error = %message, %client_id, in_a_row = short_lived, retry_in_ms, "the MQTT broker keeps ending the connection soon after accepting it: is another client connected with the same client id? Each takes the session from the other (mosquitto logs `already connected, closing old connection`); give every bridge its own channels.mqtt.client_id, and a share_group to split subscriptions");
                        }
                    } else if lost.is_some() && failures == 0 {
                        tracing::warn!(%broker, error = %message, retry_in_ms, "MQTT connection lost; reconnecting");
                    } else if failures.is_multiple_of(10) {
                        tracing::warn!(%broker, error = %message, attempt = failures + 1, retry_in_ms, "MQTT broker unreachable; retrying");
                    } else {
                        tracing::debug!(%broker, error = %message, attempt = failures + 1, retry_in_ms, "MQTT broker unreachable; retrying");
                    }
                    failures = failures.saturating_add(1);
                    let _ = state_tx.send(ConnectionState::BackingOff(message));
                    tokio::select! {
                        _ = shutdown.changed() => { let _ = state_tx.send(ConnectionState::Stopped); return; }
                        _ = tokio::time::sleep(wait) => {}
                    }
                    let _ = state_tx.send(ConnectionState::Connecting);
                }
            }
        }
    });
    Ok(handle)
}

/// Removes a refused QoS 2 publish from the journal, its key not done: the message was not
/// delivered, so publishing it again (a restart before the caller recorded the refusal, or
/// the operator's retry) tries again rather than counting it as delivered.
fn forget(outbox: &Option<Outbox>, broker: &str, pkid: u16) {
    if let Some(ob) = outbox
        && let Err(e) = ob.forget(pkid)
    {
        tracing::error!(%broker, error = %e, "could not remove a refused QoS 2 publish from the journal");
    }
}

/// Records finished QoS 2 publishes (PUBCOMP: packet id, publish) in the journal, their
/// keys done and their entries gone, in one write; then tells whoever waits for them.
fn complete(outbox: &Option<Outbox>, broker: &str, finished: &mut Vec<(u16, InFlight)>) {
    if finished.is_empty() {
        return;
    }
    if let Some(ob) = outbox {
        let entries: Vec<Entry> = finished
            .iter()
            .filter_map(|(pkid, f)| {
                Some(Entry {
                    seq: f.seq,
                    pkid: *pkid,
                    released: true,
                    key: f.key?,
                    topic: String::new(),
                    payload: Vec::new(),
                    props: None,
                })
            })
            .collect();
        if let Err(e) = ob.complete_all(&entries) {
            tracing::error!(%broker, error = %e, publishes = entries.len(), "could not record finished QoS 2 publishes");
        }
    }
    for (_, f) in finished.drain(..) {
        f.done();
    }
}
