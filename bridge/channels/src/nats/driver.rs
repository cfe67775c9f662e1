//! The NATS connection: core subscriptions (with queue groups), JetStream durable pull
//! consumers acknowledged only after the daemon stored a message, and publishing (core, or to
//! a stream with a publish acknowledgement and `Nats-Msg-Id` for the server's deduplication).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;
use tokio::sync::{mpsc, oneshot, watch};

use super::config::NatsConfig;
use crate::mqtt::ConnectionState;

const BASE_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Where a JetStream subscription starts when the daemon has stored nothing from it yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Deliver {
    /// Everything the stream holds.
    All,
    /// Only what arrives after the consumer is created.
    New,
    /// From a point in time (RFC 3339).
    Since(String),
}

/// A JetStream side of a subscription.
#[derive(Clone, Debug)]
pub struct JetStreamSub {
    /// The stream.
    pub stream: String,
    /// The durable consumer's name.
    pub durable: String,
    /// Where a new consumer starts.
    pub deliver: Deliver,
    /// The highest stream sequence the daemon has stored (0: none). The consumer is
    /// (re)created from just after it at every (re)connection, so what the daemon holds is
    /// never delivered again and nothing after it is skipped or reordered.
    pub stored: Arc<AtomicU64>,
}

/// One subscription.
#[derive(Clone, Debug)]
pub struct Subscription {
    /// Subject filter (`*`, `>`).
    pub subject: String,
    /// Queue group: the servers hand each message to one member.
    pub queue_group: Option<String>,
    /// Consume from a stream instead (durable, acknowledged).
    pub jetstream: Option<JetStreamSub>,
}

/// A message from NATS.
pub struct NatsIn {
    /// Which subscription (index into those given to [`start`]).
    pub sub: usize,
    /// Its subject.
    pub subject: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Headers (a name may repeat).
    pub headers: Vec<(String, String)>,
    /// The requester's reply subject (request-reply).
    pub reply: Option<String>,
    /// Stream sequence, for JetStream messages.
    pub stream_seq: Option<u64>,
    js: Option<jetstream::Message>,
}

impl std::fmt::Debug for NatsIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsIn")
            .field("sub", &self.sub)
            .field("subject", &self.subject)
            .field("bytes", &self.payload.len())
            .field("stream_seq", &self.stream_seq)
            .finish()
    }
}

impl NatsIn {
    /// Acknowledges a JetStream message (after the durable write); core messages have nothing
    /// to acknowledge.
    pub async fn ack(&self) -> Result<(), String> {
        match &self.js {
            Some(m) => m.ack().await.map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
}

/// Why a publish failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Refused for good (too large, a bad header).
    #[error("{0}")]
    Refused(String),
    /// Worth retrying (not connected, no publish acknowledgement).
    #[error("{0}")]
    Failed(String),
}

/// The running connection.
#[derive(Clone)]
pub struct NatsHandle {
    client: async_nats::Client,
    js: jetstream::Context,
    state: watch::Receiver<ConnectionState>,
    max_payload: usize,
    disconnects: Arc<AtomicU64>,
    inbound: mpsc::Sender<NatsIn>,
    shutdown: watch::Receiver<bool>,
}

/// Whether `name` can be a NATS header name (visible ASCII, no colon).
pub fn valid_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| (33..=126).contains(&b) && b != b':')
}

/// Whether `value` can be a NATS header value (no line breaks).
pub fn valid_header_value(value: &str) -> bool {
    !value.contains(['\r', '\n'])
}

impl NatsHandle {
    /// The connection state.
    pub fn state(&self) -> ConnectionState {
        self.state.borrow().clone()
    }

    /// Connections lost since the start. Each is a window in which core NATS messages were
    /// not received (core NATS keeps nothing for an absent subscriber); JetStream routes
    /// resume where they were.
    pub fn disconnects(&self) -> u64 {
        self.disconnects.load(Ordering::Relaxed)
    }

    /// Publishes and waits until the server has it: see [`NatsHandle::send`].
    pub async fn publish(
        &self,
        subject: &str,
        headers: &[(String, String)],
        payload: Vec<u8>,
        msg_id: Option<&str>,
    ) -> Result<(), PublishError> {
        self.send(subject, headers, payload, msg_id)
            .await?
            .confirmed()
            .await
    }

    /// Hands a publish to the connection and returns what resolves once the server has it.
    /// With `msg_id`, to a stream: the server deduplicates on `Nats-Msg-Id` and the
    /// confirmation is its publish acknowledgement (so several publishes can await theirs
    /// together); without, core NATS (at most once), confirmed once the bytes are flushed to
    /// the server.
    pub async fn send(
        &self,
        subject: &str,
        headers: &[(String, String)],
        payload: Vec<u8>,
        msg_id: Option<&str>,
    ) -> Result<Sent, PublishError> {
        if payload.len() > self.max_payload {
            return Err(PublishError::Refused(format!(
                "{} bytes is over channels.nats.max_payload ({})",
                payload.len(),
                self.max_payload
            )));
        }
        let mut h = async_nats::HeaderMap::new();
        for (k, v) in headers {
            if !valid_header_name(k) || !valid_header_value(v) {
                return Err(PublishError::Refused(format!(
                    "header {k:?} is not a valid NATS header"
                )));
            }
            h.append(k.as_str(), v.as_str());
        }
        let how = match msg_id {
            Some(id) => {
                h.insert("Nats-Msg-Id", id);
                let ack = self
                    .js
                    .publish_with_headers(subject.to_string(), h, payload.into())
                    .await
                    .map_err(|e| stream_error(subject, &e))?;
                Confirm::Stream(ack)
            }
            None => {
                self.client
                    .publish_with_headers(subject.to_string(), h, payload.into())
                    .await
                    .map_err(|e| PublishError::Failed(format!("{subject}: {e}")))?;
                Confirm::Flush(self.client.clone())
            }
        };
        Ok(Sent {
            subject: subject.to_string(),
            how,
        })
    }
}

/// A publish handed to the connection ([`NatsHandle::send`]), not yet confirmed.
pub struct Sent {
    subject: String,
    how: Confirm,
}

enum Confirm {
    Stream(jetstream::context::PublishAckFuture),
    Flush(async_nats::Client),
}

impl std::fmt::Debug for Sent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = match self.how {
            Confirm::Stream(_) => "stream acknowledgement",
            Confirm::Flush(_) => "flush",
        };
        f.debug_struct("Sent")
            .field("subject", &self.subject)
            .field("awaits", &how)
            .finish()
    }
}

impl Sent {
    /// Resolves once the server has the publish: the stream's acknowledgement, or (core
    /// NATS) the connection's flush.
    pub async fn confirmed(self) -> Result<(), PublishError> {
        let subject = self.subject;
        match self.how {
            Confirm::Stream(ack) => ack
                .await
                .map(|_| ())
                .map_err(|e| stream_error(&subject, &e)),
            Confirm::Flush(client) => client
                .flush()
                .await
                .map_err(|e| PublishError::Failed(format!("{subject}: {e}"))),
        }
    }
}

/// A stream publish's error: no stream for the subject is for good, the rest worth retrying.
fn stream_error(subject: &str, e: &jetstream::context::PublishError) -> PublishError {
    if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound {
        PublishError::Refused(format!(
            "{subject}: {e} (this route publishes to JetStream; add the subject to a stream)"
        ))
    } else {
        PublishError::Failed(format!("{subject}: {e}"))
    }
}

fn headers_of(h: Option<&async_nats::HeaderMap>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(h) = h {
        for (k, vs) in h.iter() {
            for v in vs {
                out.push((k.to_string(), v.as_str().to_string()));
            }
        }
    }
    out
}

/// Connects (in the background: the daemon starts while the servers are away) and starts one
/// task per subscription (tagged with the id it comes with); messages go to `inbound`.
pub async fn start(
    cfg: &NatsConfig,
    subs: Vec<(usize, Subscription)>,
    inbound: mpsc::Sender<NatsIn>,
    shutdown: watch::Receiver<bool>,
) -> Result<NatsHandle, String> {
    let (state_tx, state_rx) = watch::channel(ConnectionState::Connecting);
    let servers = cfg.urls.join(",");
    let disconnects = Arc::new(AtomicU64::new(0));
    let events = {
        let servers = servers.clone();
        let disconnects = disconnects.clone();
        move |event: async_nats::Event| {
            let (state_tx, servers, disconnects) =
                (state_tx.clone(), servers.clone(), disconnects.clone());
            async move {
                match &event {
                    async_nats::Event::Connected => {
                        tracing::info!(%servers, "NATS connected");
                        let _ = state_tx.send(ConnectionState::Connected);
                    }
                    async_nats::Event::Disconnected => {
                        disconnects.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%servers, "NATS disconnected; reconnecting (core subjects miss what is published meanwhile)");
                        let _ = state_tx.send(ConnectionState::BackingOff("disconnected".into()));
                    }
                    async_nats::Event::ClientError(e) => {
                        tracing::warn!(%servers, error = %e, "NATS client error");
                    }
                    async_nats::Event::ServerError(e) => {
                        let text = e.to_string();
                        if text.to_ascii_lowercase().contains("authorization") {
                            tracing::error!(%servers, error = %text, "NATS refused the credentials (bad credentials)");
                            let _ = state_tx.send(ConnectionState::BadCredentials(text.clone()));
                        } else {
                            tracing::warn!(%servers, error = %text, "NATS server error");
                        }
                    }
                    other => tracing::info!(%servers, event = %other, "NATS"),
                }
            }
        }
    };
    let mut opts = async_nats::ConnectOptions::new()
        .name(&cfg.name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .reconnect_delay_callback(|attempts| {
            crate::backoff(attempts as u32, BASE_BACKOFF, MAX_BACKOFF)
        })
        .event_callback(events);
    if let (Some(u), Some(p)) = (&cfg.user, &cfg.password) {
        opts = opts.user_and_password(u.clone(), p.clone());
    }
    if let Some(t) = &cfg.token {
        opts = opts.token(t.clone());
    }
    if let Some(seed) = &cfg.nkey {
        opts = opts.nkey(seed.clone());
    }
    if let Some(f) = &cfg.creds_file {
        opts = opts
            .credentials_file(f)
            .await
            .map_err(|e| format!("channels.nats.creds_file {}: {e}", f.display()))?;
    }
    if let Some(ca) = &cfg.tls_ca {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(c), Some(k)) = (&cfg.tls_cert, &cfg.tls_key) {
        opts = opts.add_client_certificate(c.clone(), k.clone());
    }
    if cfg.tls_required {
        opts = opts.require_tls(true);
    }
    let urls: Vec<async_nats::ServerAddr> = cfg
        .urls
        .iter()
        .map(|u| {
            u.parse()
                .map_err(|e| format!("channels.nats.urls: {u:?}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let client = opts
        .connect(urls)
        .await
        .map_err(|e| format!("NATS {servers}: {e}"))?;
    let js = jetstream::new(client.clone());
    let handle = NatsHandle {
        client,
        js,
        state: state_rx,
        max_payload: cfg.max_payload,
        disconnects,
        inbound,
        shutdown,
    };
    for (id, s) in subs {
        handle.subscribe(id, s);
    }
    Ok(handle)
}

impl NatsHandle {
    /// Starts one subscription; its messages reach the inbound channel tagged `id`. Runs until
    /// the shutdown signal, or until the returned handle aborts it (a configuration reload
    /// dropping the route: the server is told to unsubscribe; JetStream keeps what was not
    /// acknowledged). The receiver resolves once the server has the subscription (or the
    /// JetStream consumer is ready).
    pub fn subscribe(
        &self,
        id: usize,
        s: Subscription,
    ) -> (tokio::task::AbortHandle, oneshot::Receiver<()>) {
        let (client, js, inbound, stop) = (
            self.client.clone(),
            self.js.clone(),
            self.inbound.clone(),
            self.shutdown.clone(),
        );
        let (ready, subscribed) = oneshot::channel();
        let task = match s.jetstream.clone() {
            None => tokio::spawn(core_subscription(id, s, client, inbound, stop, ready)),
            Some(j) => tokio::spawn(jetstream_subscription(
                id, s.subject, j, js, inbound, stop, ready,
            )),
        };
        (task.abort_handle(), subscribed)
    }
}

/// Returns once the server has processed everything this connection sent before (or after
/// `SERVER_ROUND_TRIP`): async-nats' `flush` only writes the socket, so a SUB could still be
/// unprocessed when another connection publishes to it — and core NATS drops a message that
/// no subscription matched. A message to a fresh inbox of our own, received back, proves the
/// server is past our SUB (it handles a connection's operations in order).
async fn server_has_seen_our_ops(client: &async_nats::Client) {
    let probe = client.new_inbox();
    let Ok(mut echo) = client.subscribe(probe.clone()).await else {
        return;
    };
    if client.publish(probe, Default::default()).await.is_ok() {
        let _ = tokio::time::timeout(SERVER_ROUND_TRIP, echo.next()).await;
    }
    let _ = echo.unsubscribe().await;
}

/// The longest [`server_has_seen_our_ops`] waits.
const SERVER_ROUND_TRIP: Duration = Duration::from_secs(5);

async fn core_subscription(
    i: usize,
    s: Subscription,
    client: async_nats::Client,
    inbound: mpsc::Sender<NatsIn>,
    mut stop: watch::Receiver<bool>,
    ready: oneshot::Sender<()>,
) {
    let mut failures = 0u32;
    let mut ready = Some(ready);
    loop {
        let sub = match &s.queue_group {
            Some(g) => client.queue_subscribe(s.subject.clone(), g.clone()).await,
            None => client.subscribe(s.subject.clone()).await,
        };
        let mut sub = match sub {
            Ok(sub) => sub,
            Err(e) => {
                let wait = crate::backoff(failures, BASE_BACKOFF, MAX_BACKOFF);
                failures += 1;
                tracing::warn!(subject = %s.subject, error = %e, "NATS subscribe failed; retrying");
                tokio::select! { _ = stop.changed() => return, _ = tokio::time::sleep(wait) => continue }
            }
        };
        if let Some(r) = ready.take() {
            server_has_seen_our_ops(&client).await;
            let _ = r.send(());
        }
        loop {
            let m = tokio::select! { _ = stop.changed() => return, m = sub.next() => m };
            let Some(m) = m else { break };
            let msg = NatsIn {
                sub: i,
                subject: m.subject.to_string(),
                payload: m.payload.to_vec(),
                headers: headers_of(m.headers.as_ref()),
                reply: m.reply.as_ref().map(|r| r.to_string()),
                stream_seq: None,
                js: None,
            };
            if inbound.send(msg).await.is_err() {
                return;
            }
        }
    }
}

async fn consumer_for(
    js: &jetstream::Context,
    subject: &str,
    j: &JetStreamSub,
) -> Result<consumer::PullConsumer, String> {
    let stream = js
        .get_stream(&j.stream)
        .await
        .map_err(|e| format!("stream {}: {e}", j.stream))?;
    let stored = j.stored.load(Ordering::SeqCst);
    let deliver_policy = if stored > 0 {
        consumer::DeliverPolicy::ByStartSequence {
            start_sequence: stored + 1,
        }
    } else {
        match &j.deliver {
            Deliver::All => consumer::DeliverPolicy::All,
            Deliver::New => consumer::DeliverPolicy::New,
            Deliver::Since(t) => consumer::DeliverPolicy::ByStartTime {
                start_time: time::OffsetDateTime::parse(
                    t,
                    &time::format_description::well_known::Rfc3339,
                )
                .map_err(|e| format!("deliver {t:?}: {e}"))?,
            },
        }
    };
    let config = consumer::pull::Config {
        durable_name: Some(j.durable.clone()),
        deliver_policy,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        filter_subject: subject.to_string(),
        ..Default::default()
    };
    // The consumer starts where the daemon's store ends: recreated at every connection.
    let _ = stream.delete_consumer(&j.durable).await;
    stream
        .create_consumer(config)
        .await
        .map_err(|e| format!("consumer {} on {}: {e}", j.durable, j.stream))
}

async fn jetstream_subscription(
    i: usize,
    subject: String,
    j: JetStreamSub,
    js: jetstream::Context,
    inbound: mpsc::Sender<NatsIn>,
    mut stop: watch::Receiver<bool>,
    ready: oneshot::Sender<()>,
) {
    let mut failures = 0u32;
    let mut ready = Some(ready);
    loop {
        let messages = match consumer_for(&js, &subject, &j).await {
            Ok(c) => c.messages().await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        let mut messages = match messages {
            Ok(m) => {
                failures = 0;
                tracing::info!(stream = %j.stream, consumer = %j.durable, after = j.stored.load(Ordering::SeqCst), "JetStream consumer ready");
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
                m
            }
            Err(e) => {
                let wait = crate::backoff(failures, BASE_BACKOFF, MAX_BACKOFF);
                if failures.is_multiple_of(10) {
                    tracing::warn!(stream = %j.stream, error = %e, retry_in_ms = wait.as_millis() as u64, "JetStream consumer not ready; retrying");
                }
                failures += 1;
                tokio::select! { _ = stop.changed() => return, _ = tokio::time::sleep(wait) => continue }
            }
        };
        loop {
            let m = tokio::select! { _ = stop.changed() => return, m = messages.next() => m };
            let m = match m {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::warn!(stream = %j.stream, error = %e, "JetStream consumer interrupted; resuming from what is stored");
                    break;
                }
                None => break,
            };
            let seq = m.info().map(|i| i.stream_sequence).ok();
            let msg = NatsIn {
                sub: i,
                subject: m.subject.to_string(),
                payload: m.payload.to_vec(),
                headers: headers_of(m.headers.as_ref()),
                reply: None,
                stream_seq: seq,
                js: Some(m),
            };
            if inbound.send(msg).await.is_err() {
                return;
            }
        }
        // Messages in the channel but not yet stored are delivered again by the new consumer;
        // the daemon drops those it stored meanwhile (by sequence).
        tokio::select! { _ = stop.changed() => return, _ = tokio::time::sleep(BASE_BACKOFF) => {} }
    }
}
