//! The bridge runtime: routes, the durable inbound queue, endpoint identities and the way back.
//!
//! Inbound: MQTT publish → route match and size check → durable inbox (sled, flushed, one
//! queue per route) → acknowledge the broker → plugin → endpoint's DM with each agent → remove
//! from the inbox. Mail takes the same path: SMTP DATA → sender authentication and policy →
//! durable inbox → 250; each sender's address is an endpoint. Each route drains its own queue in order, concurrently with the others, so a
//! slow or quarantined plugin holds only its own routes.
//! Outbound: each endpoint reads its conversations → sender must be allowed by the route →
//! plugin → publish on the route's reply topic. Nothing is logged with message content.
//! Whatever cannot be carried goes to the dead-letter store with its reason
//! (`gatehouse dead-letters`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use gatehouse_channels::email;
use gatehouse_channels::mqtt::{self, Inbound, MqttHandle};
use gatehouse_channels::nats;
use gatehouse_client::Channel;
use gatehouse_client::Client;
use gatehouse_host::{Action, Host, Limits, Message, Plugin, PluginError};
use gatehouse_protocol::content;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify, mpsc, oneshot, watch};

use crate::config::{Config, Route};
use crate::identity;

/// Inbound messages buffered between the MQTT driver and the durable write; the driver (and
/// so the broker) waits when it is full.
const INBOUND_CAPACITY: usize = 1024;
/// How often a daemon that is short of space looks again.
const STORAGE_RECHECK: Duration = Duration::from_secs(1);
/// Inbound messages stored with one flush at most; more wait for the next flush.
const ACCEPT_BATCH: usize = 256;
/// Queued device messages mapped and sent together (one MLS write and one publish per
/// endpoint and agent): with many endpoints, the more a batch holds, the more messages each
/// endpoint's send carries.
const DELIVER_BATCH: usize = 16384;
/// … ending where one endpoint has this many in it: with few endpoints, sends of hundreds of
/// messages each would reach the agent in lumps instead of overlapping with the next batch.
const DELIVER_PER_ENDPOINT: usize = 128;
/// … and at most this many bytes of them (at least one record), so large mails or payloads do
/// not pile up in memory.
const DELIVER_BATCH_BYTES: usize = 16 << 20;
/// Wait before retrying queued work after a transient failure (node unreachable).
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// First and longest wait before an endpoint retries publishing a conversation message.
const OUTBOUND_RETRY_BASE: Duration = Duration::from_millis(200);
const OUTBOUND_RETRY_MAX: Duration = Duration::from_secs(30);
/// Endpoints whose conversations are read at the same time.
const OUTBOUND_PARALLEL: usize = 8;
/// Endpoints of a delivery batch sending at the same time: with many endpoints each sends a
/// message or two, and waits mostly on its flush and the node's, which overlap.
const SEND_PARALLEL: usize = 32;
/// How long the bridge remembers a publish to a topic its own routes subscribe to.
const ECHO_WINDOW: Duration = Duration::from_secs(60);
/// How often plugin files are checked for changes (`plugins.NAME.watch`).
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// Most dead letters one `GET /dead-letters` returns (the newest).
const DEAD_LETTER_PAGE: usize = 1000;
/// Thread ids an outbound mail's References carries at most.
const MAIL_REFERENCES: usize = 20;

/// A loaded plugin and where it came from.
struct Loaded {
    plugin: Plugin,
    /// sha256 of the component, hex (shown as the plugin's version).
    sha256: String,
    /// The file's modification time and length when it was read (path plugins).
    stamp: Option<(std::time::SystemTime, u64)>,
}

/// Reads, compiles, validates and instantiates plugin `name` as config.yaml describes it.
/// Blocking (compilation): call from a blocking thread.
fn load_plugin(host: &Host, cfg: &Config, db: &sled::Db, name: &str) -> anyhow::Result<Loaded> {
    use sha2::Digest as _;
    let p = cfg
        .plugins
        .get(name)
        .with_context(|| format!("no plugin named {name:?} in config.yaml"))?;
    let (wasm, stamp) = match (&p.builtin, &p.path) {
        (Some(b), _) if b == "email" => (gatehouse_host::EMAIL_PLUGIN.to_vec(), None),
        (Some(b), _) if b == "nats" => (gatehouse_host::NATS_PLUGIN.to_vec(), None),
        (Some(_), _) => (gatehouse_host::MQTT_PLUGIN.to_vec(), None),
        (None, Some(path)) => {
            let meta = std::fs::metadata(path)
                .with_context(|| format!("plugins.{name}.path: reading {}", path.display()))?;
            let wasm = std::fs::read(path)
                .with_context(|| format!("plugins.{name}.path: reading {}", path.display()))?;
            (wasm, meta.modified().ok().map(|m| (m, meta.len())))
        }
        (None, None) => anyhow::bail!("plugins.{name}: no builtin or path"),
    };
    let mut config: Vec<(String, String)> = p.config.clone().into_iter().collect();
    // The route's reply template is a custom MQTT plugin's down topic (the builtin gets each
    // message's filled-in `reply_topic` instead).
    if let Some(r) = plugin_route(cfg, name)
        && r.channel == "mqtt"
        && p.builtin.is_none()
        && !p.config.contains_key("down_topic")
    {
        config.push(("down_topic".into(), r.reply.clone()));
    }
    if let Some(r) = plugin_route(cfg, name)
        && r.is_nats()
        && !p.config.contains_key("down_subject")
    {
        config.push(("down_subject".into(), r.reply.clone()));
    }
    let limits = Limits {
        deadline: Duration::from_millis(p.deadline_ms),
        memory_bytes: p.memory_mb << 20,
        fuel: p.fuel,
    };
    let kv = Arc::new(gatehouse_host::Kv::new(
        db.open_tree(format!("plugin-kv/{name}"))?,
        p.kv_quota_bytes,
    ));
    let plugin = host
        .load_with_kv(name, &wasm, config, limits, Some(kv))
        .with_context(|| format!("loading plugin {name}"))?;
    Ok(Loaded {
        plugin,
        sha256: hex::encode(sha2::Sha256::digest(&wasm)),
        stamp,
    })
}

/// The first route in force that uses plugin `name` (its reply template configures a custom
/// plugin).
fn plugin_route<'a>(cfg: &'a Config, name: &str) -> Option<&'a Route> {
    cfg.active_routes()
        .map(|(_, r)| r)
        .find(|r| r.plugin == name)
}

/// What a plugin is loaded from: its configuration and what it takes from its route. A
/// reload in place loads the plugin again only when this changed.
fn plugin_inputs(cfg: &Config, name: &str) -> Option<String> {
    let p = cfg.plugins.get(name)?;
    let route = plugin_route(cfg, name).map(|r| (&r.channel, &r.reply));
    Some(format!("{p:?} {route:?}"))
}

/// What the MQTT connection subscribes to for the routes in force.
fn mqtt_filters(cfg: &Config) -> Vec<String> {
    cfg.active_routes()
        .map(|(_, r)| r)
        .filter(|r| r.channel == "mqtt")
        .flat_map(|r| std::iter::once(r.filter()).chain(r.presence_filter()))
        .collect()
}

/// The mailboxes the SMTP server takes mail for, for the routes in force.
fn mailboxes(cfg: &Config) -> Vec<String> {
    cfg.active_routes()
        .map(|(_, r)| r)
        .filter(|r| r.is_email())
        .map(|r| r.subscribe.clone())
        .collect()
}

/// How long the news watcher lets new endpoints and conversations gather before it opens its
/// streams again to cover them.
const REOPEN_DEBOUNCE: Duration = Duration::from_millis(100);

/// How long a reload in place waits for the NATS server to confirm a new subscription.
const NATS_SUBSCRIBE_WAIT: Duration = Duration::from_secs(5);

/// What a reload in place changed.
struct Change {
    /// One line for the log and the operator.
    summary: String,
    /// Slots of the routes it dropped.
    retired: Vec<usize>,
}

/// Why a message could not be carried, as its dead-letter record says.
#[derive(Debug)]
struct Fault {
    /// `refused`, `timeout`, `fuel`, `trap`, `memory`, `denied`, `limits`, `grants`,
    /// `quarantined`, `content`, `config`, `corrupt`, `broker` (the MQTT broker will not take
    /// a publish: over its packet size limit, or refused in its acknowledgement).
    kind: &'static str,
    reason: String,
    /// How long the plugin call took, when a call was made.
    call: Option<Duration>,
}

impl Fault {
    fn new(kind: &'static str, reason: impl Into<String>) -> Self {
        Fault {
            kind,
            reason: reason.into(),
            call: None,
        }
    }
}

/// What identifies an MQTT message across a redelivery besides its packet id.
fn inflight_digest(msg: &Inbound) -> [u8; 32] {
    echo_digest(&msg.topic, &msg.payload)
}

/// Topic and payload, hashed.
/// The idempotency key of the `n`th publish made for one conversation message.
fn publish_key(message_id: &str, n: usize, topic: &str) -> [u8; 32] {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(b"gatehouse/mqtt-publish\0");
    h.update(message_id.as_bytes());
    h.update((n as u64).to_be_bytes());
    h.update(topic.as_bytes());
    h.finalize().into()
}

fn echo_digest(topic: &str, payload: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(topic.as_bytes());
    h.update([0]);
    h.update(payload);
    h.finalize().into()
}

/// Inbox keys: the route's name, a zero byte, then the queue id (big-endian), so each route's
/// messages sit together and in arrival order.
fn inbox_key(route: &str, id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(route.len() + 9);
    k.extend_from_slice(route.as_bytes());
    k.push(0);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn inbox_prefix(route: &str) -> Vec<u8> {
    let mut k = route.as_bytes().to_vec();
    k.push(0);
    k
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A durable inbound record.
#[derive(Serialize, Deserialize)]
struct Queued {
    route: usize,
    device: String,
    topic: String,
    #[serde(with = "base64_bytes")]
    payload: Vec<u8>,
    retain: bool,
    qos: u8,
    /// For mail: the envelope and what sender authentication found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mail: Option<MailMeta>,
    /// For NATS: headers, the requester's reply subject, the stream sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nats: Option<NatsMeta>,
    /// An MQTT presence message (last will / birth): online or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    presence: Option<bool>,
    /// MQTT 5: the publish's properties (content type, response topic, correlation data,
    /// user properties).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mqtt: Option<mqtt::Properties>,
}

/// Bytes in a JSON record as one base64 string: a 100-byte payload takes 136 characters and
/// one decode, where serde's default (an array of numbers, which versions before 2026-12-04
/// wrote) took ≈ 370 parsed number by number. Both are read.
mod base64_bytes {
    use base64::Engine as _;

    pub fn serialize<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Bytes;
        impl<'de> serde::de::Visitor<'de> for Bytes {
            type Value = Vec<u8>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes as base64, or an array of numbers")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
                base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .map_err(E::custom)
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_any(Bytes)
    }
}

/// `online` / `offline` in the shapes devices and brokers use.
fn presence_state(payload: &[u8]) -> Option<bool> {
    let text = std::str::from_utf8(payload).ok()?.trim();
    let word = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) if v.is_object() => v.get("state")?.as_str()?.to_ascii_lowercase(),
        _ => text.to_ascii_lowercase(),
    };
    match word.as_str() {
        "online" | "1" | "true" | "connected" | "up" => Some(true),
        "offline" | "0" | "false" | "disconnected" | "down" | "lost" => Some(false),
        _ => None,
    }
}

/// The idempotency key of inbound queue record `id` (stable across retries).
fn inbound_key(id: u64) -> String {
    format!("gatehouse-in-{id}")
}

/// What a device's (MQTT or NATS) queued message gives its plugin.
fn device_message(rec: &Queued, idempotency_key: &str) -> Message {
    Message {
        payload: rec.payload.clone(),
        content_type: "application/octet-stream".into(),
        metadata: match &rec.nats {
            Some(n) => {
                let mut m = vec![("subject".to_string(), rec.topic.clone())];
                m.extend(
                    n.headers
                        .iter()
                        .map(|(k, v)| (format!("header.{k}"), v.clone())),
                );
                if let Some(r) = &n.reply {
                    m.push(("reply_to".into(), r.clone()));
                }
                if let Some(q) = n.seq {
                    m.push(("stream_seq".into(), q.to_string()));
                }
                m
            }
            None => {
                let mut m = vec![
                    ("topic".into(), rec.topic.clone()),
                    ("qos".into(), rec.qos.to_string()),
                    ("retain".into(), rec.retain.to_string()),
                ];
                if let Some(p) = &rec.mqtt {
                    mqtt_metadata(p, &mut m);
                }
                m
            }
        },
        endpoint: rec.device.clone(),
        conversation: None,
        sender: Some(rec.device.clone()),
        verified: false,
        idempotency_key: idempotency_key.to_string(),
    }
}

/// MQTT 5 properties as plugin metadata: `content_type`, `response_topic`,
/// `correlation_data` (hex) and one `user.NAME` per user property.
fn mqtt_metadata(p: &mqtt::Properties, m: &mut Vec<(String, String)>) {
    if let Some(ct) = &p.content_type {
        m.push(("content_type".into(), ct.clone()));
    }
    if let Some(r) = &p.response_topic {
        m.push(("response_topic".into(), r.clone()));
    }
    if let Some(c) = &p.correlation_data {
        m.push(("correlation_data".into(), hex::encode(c)));
    }
    for (k, v) in &p.user_properties {
        m.push((format!("user.{k}"), v.clone()));
    }
}

/// A plugin's publish metadata as MQTT 5 properties: `content_type`, `user.NAME`, and
/// `correlation_data` (hex); the rest is not carried.
fn mqtt_properties(metadata: &[(String, String)]) -> mqtt::Properties {
    let mut p = mqtt::Properties::default();
    for (k, v) in metadata {
        if k == "content_type" {
            p.content_type = Some(v.clone());
        } else if k == "correlation_data" {
            p.correlation_data = hex::decode(v).ok();
        } else if let Some(name) = k.strip_prefix("user.") {
            p.user_properties.push((name.to_string(), v.clone()));
        }
    }
    p
}

/// What a NATS message brought besides its subject and payload.
#[derive(Clone, Serialize, Deserialize)]
struct NatsMeta {
    headers: Vec<(String, String)>,
    reply: Option<String>,
    seq: Option<u64>,
}

/// What resolves when the broker or server has a publish, and the publish's payload size.
enum Confirmation {
    Mqtt(gatehouse_channels::mqtt::PublishAck, usize),
    Nats(nats::Sent, usize),
}

/// How a publish of a pass ended, once awaited.
enum Confirmed {
    /// The broker has it (channel, bytes).
    Yes(&'static str, usize),
    /// Refused for good: kept as a dead letter with the reason (kind: who refused it).
    Refused(&'static str, String),
    /// Not confirmed, worth retrying: this and what follows stay owed.
    Later(String),
    /// The channel's driver stopped (shutdown): the rest stay owed.
    Stopped,
}

impl Confirmation {
    async fn outcome(self) -> Confirmed {
        match self {
            Confirmation::Mqtt(ack, bytes) => match ack.await {
                Ok(Ok(())) => Confirmed::Yes("mqtt", bytes),
                Ok(Err(why)) => Confirmed::Refused("broker", why.to_string()),
                Err(_) => Confirmed::Stopped,
            },
            Confirmation::Nats(sent, bytes) => match sent.confirmed().await {
                Ok(()) => Confirmed::Yes("nats", bytes),
                Err(nats::PublishError::Refused(why)) => Confirmed::Refused("nats", why),
                Err(nats::PublishError::Failed(why)) => Confirmed::Later(why),
            },
        }
    }
}

/// A request waiting for the agent's answer (a NATS reply subject, or an MQTT 5 response
/// topic with its correlation data).
#[derive(Serialize, Deserialize)]
struct PendingRequest {
    reply: String,
    deadline_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    correlation: Option<Vec<u8>>,
}

/// The header on everything the bridge publishes to NATS (its value: the bridge's inbox id):
/// such a message coming back is not taken in.
const NATS_ORIGIN: &str = "Gatehouse-Origin";
/// A request's own timeout for the agent's answer, milliseconds.
const NATS_TIMEOUT_HEADER: &str = "Gatehouse-Timeout-Ms";

/// What the SMTP session knew about a mail, kept with it.
#[derive(Clone, Serialize, Deserialize)]
struct MailMeta {
    /// The mailbox it was sent to.
    rcpt: String,
    /// Envelope sender.
    mail_from: String,
    /// DKIM/SPF/DMARC.
    auth: email::AuthResult,
}

/// The thread an email endpoint is in: what its replies answer.
#[derive(Default, Serialize, Deserialize)]
struct MailThread {
    subject: String,
    /// The mailbox the sender wrote to (replies come from it).
    mailbox: String,
    /// The last message's id, and the thread before it (oldest first, at most
    /// [`MAIL_REFERENCES`]).
    last_id: Option<String>,
    references: Vec<String>,
    /// Bridge hops of the last message.
    hops: u32,
}

/// What the admin API shows for an endpoint.
#[derive(Clone, Serialize, Deserialize)]
pub struct EndpointInfo {
    /// Route name.
    pub route: String,
    /// Channel kind.
    pub channel: String,
    /// The endpoint's name on its channel (the `{device}`).
    pub device: String,
    /// Its channel address (the topic it publishes on).
    pub address: String,
    /// Its XMTP wallet address.
    pub wallet_address: String,
    /// Its XMTP inbox id.
    pub inbox_id: String,
    /// Its latest retained state (`routes[].retained: state`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<serde_json::Value>,
}

struct Endpoint {
    /// `channel/route/device`: its key in `Bridge::endpoints`.
    name: String,
    route: usize,
    device: String,
    /// Its installation's store: what the news watcher needs (installation key,
    /// conversations, cursors) is read from it without opening the client.
    tree: sled::Tree,
    inbox_id: String,
    installation: [u8; 32],
    /// Its client while open ([`Bridge::client`] opens it on use; the least recently used
    /// close past `storage.open_endpoints`, their state being all in `tree`).
    client: Mutex<Option<Client>>,
    registered: Mutex<bool>,
    /// Outbound retry state: failures in a row, and not before when to try again.
    retry: std::sync::Mutex<(u32, Option<std::time::Instant>)>,
    /// When its conversations were last read through, or checked for news without a read.
    last_checked: std::sync::Mutex<Option<std::time::Instant>>,
    /// When it last had a full read (welcomes, consent, every conversation); between those,
    /// news is read conversation by conversation ([`Due`]).
    last_full: std::sync::Mutex<Option<std::time::Instant>>,
}

/// Per route slot: what wakes its queue worker, whether it is stalled, its NATS subscription.
#[derive(Default)]
struct Slot {
    work: Notify,
    /// Since when its deliveries keep failing, and the last reason.
    stalled: std::sync::Mutex<Option<(std::time::Instant, String)>>,
    /// Its NATS subscription (aborted when a reload drops or changes the route).
    nats: std::sync::Mutex<Option<tokio::task::AbortHandle>>,
}

/// One item of the node's streams.
enum News {
    /// A welcome for this installation.
    Welcome([u8; 32]),
    /// A message or commit.
    Group {
        /// Its conversation.
        gid: Vec<u8>,
        /// Its node id.
        id: u64,
        /// The digest of its bytes ([`gatehouse_client::published_digest`]).
        digest: u64,
        /// The stream it came on, when that stream leaves nothing out (the node said
        /// [`gatehouse_protocol::placed::GAP_FREE`]).
        gap_free: Option<u64>,
        /// The message itself.
        message: gatehouse_wire::mls_api::GroupMessage,
    },
    /// Nothing the bridge follows.
    Other,
    /// The stream ended.
    Ended,
}

fn key32(b: &[u8]) -> Option<[u8; 32]> {
    b.try_into().ok()
}

/// What an endpoint reads on its next outbound pass.
#[derive(Default)]
struct Due {
    /// A full read ([`Client::sync_all`]: welcomes, consent, every conversation), for what
    /// the streams do not say (a poll, a check for news, a retry, an operator's decision).
    full: bool,
    /// Otherwise the conversations with news, in order, each with the messages its gap-free
    /// stream brought after a known position (`None`: the node is asked).
    groups: Vec<(Vec<u8>, Option<Run>)>,
}

impl Due {
    /// The bytes of the streamed messages it holds.
    fn bytes(&self) -> usize {
        self.groups
            .iter()
            .filter_map(|(_, r)| r.as_ref().map(|r| r.bytes))
            .sum()
    }
}

/// Messages one conversation's gap-free stream brought in a row.
struct Run {
    streamed: gatehouse_client::Streamed,
    /// The id of the last one.
    to: u64,
    bytes: usize,
}

/// The endpoints with something to read, and the bytes of streamed messages held for them.
#[derive(Default)]
struct Dirty {
    due: std::collections::HashMap<String, Due>,
    bytes: usize,
}

/// The size of a streamed message, as held.
fn message_size(m: &gatehouse_wire::mls_api::GroupMessage) -> usize {
    gatehouse_wire::Message::encoded_len(m)
}

/// Streamed messages held for the next outbound pass, in all, past which conversations with
/// news are read by asking the node (bounded memory while the pass is slow).
const MAX_STREAMED_BYTES: usize = 64 << 20;

/// How many streams the news watcher holds before it merges them into one.
const MAX_NEWS_STREAMS: usize = 32;

/// Stream filters with their cursors: installations, conversations.
type StreamCursors = (Vec<([u8; 32], u64)>, Vec<(Vec<u8>, u64)>);

/// Conversations per newest-message query when checking endpoints for news.
const PROBE_BATCH: usize = 1000;

/// Welcome queries in flight at once when checking endpoints for news.
const PROBE_PARALLEL: usize = 16;

/// The endpoints whose clients are open, least recently used first.
#[derive(Default)]
struct OpenClients {
    tick: u64,
    /// Endpoint name → the tick of its last use.
    by_name: HashMap<String, u64>,
    /// Tick of last use → endpoint name.
    order: BTreeMap<u64, String>,
}

/// What the node's streams watch (see [`Bridge::watch_news`]).
#[derive(Default)]
struct NewsIndex {
    /// Installation key → endpoint name (welcomes: a conversation was started with it).
    installations: HashMap<[u8; 32], String>,
    /// Conversation → the names of the endpoints in it (a message or commit in it; an agent's
    /// group can hold several devices).
    groups: HashMap<Vec<u8>, Vec<String>>,
}

/// Shared bridge state.
pub struct Bridge {
    /// The configuration in force: swapped whole by a reload in place (work in progress keeps
    /// the snapshot it started with). Route indices are slots: a reload keeps them.
    cfg: std::sync::RwLock<Arc<Config>>,
    seed: [u8; 32],
    /// The bridge store (sealed: damage is found at the next start).
    db: Arc<gatehouse_store::Sealed>,
    inbox: sled::Tree,
    /// The last QoS 1 message stored under each packet id: packet id → digest. Entries are
    /// overwritten when the broker reuses the id, never removed at the ack: the ack is only
    /// queued to the connection when it returns, so a crash can still lose it after the
    /// removal reached disk, and the redelivery would then be stored twice (bounded by the
    /// 65,535 packet ids).
    inflight: sled::Tree,
    /// Why the daemon is not ready (not taking in messages), if it is not.
    not_ready: std::sync::Mutex<Option<String>>,
    /// One per route slot.
    slots: std::sync::RwLock<Vec<Arc<Slot>>>,
    /// What the node's streams watch: installation keys and conversations → endpoint.
    news: std::sync::Mutex<NewsIndex>,
    /// Bumped when `news` gained something (the streams are opened again to cover it).
    topology: watch::Sender<u64>,
    /// Endpoints with news on the node, read by the next outbound pass.
    dirty: std::sync::Mutex<Dirty>,
    /// The endpoints in an outbound pass now (one at a time each).
    outbound_busy: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Outbound passes at once ([`OUTBOUND_PARALLEL`]); all of them taken at shutdown waits
    /// for those in progress.
    outbound_slots: Arc<tokio::sync::Semaphore>,
    /// Wakes the outbound pass (news arrived).
    outbound_wake: Notify,
    /// Digests of the group messages the endpoints published: coming back on the node's
    /// stream they are not news (no read of that endpoint follows).
    published: gatehouse_client::PublishedSink,
    /// Whether the node's streams are up (otherwise every endpoint is read each
    /// `poll_interval_ms`).
    streaming: std::sync::atomic::AtomicBool,
    /// The XMTP node in use.
    node_url: String,
    /// Our recent publishes to topics a route subscribes to (echo prevention).
    own_publishes: std::sync::Mutex<std::collections::VecDeque<([u8; 32], std::time::Instant)>>,
    dead: sled::Tree,
    endpoint_index: sled::Tree,
    channel: Channel,
    host: Host,
    /// Loaded plugins; a reload swaps an entry (calls in flight finish on the old one).
    plugins: std::sync::RwLock<BTreeMap<String, Arc<Loaded>>>,
    /// Per-plugin counters and quarantine state (`gatehouse plugins`).
    plugin_stats: std::sync::Mutex<BTreeMap<String, crate::grants::PluginStats>>,
    mqtt: Option<MqttHandle>,
    /// The NATS connection.
    nats: Option<nats::NatsHandle>,
    /// JetStream routes (by slot; NATS subscriptions are tagged with their route's slot): the
    /// highest stream sequence stored (shared with the driver, which resumes its consumer
    /// after it).
    nats_stored: std::sync::Mutex<HashMap<usize, Arc<std::sync::atomic::AtomicU64>>>,
    /// JetStream routes: route name → that sequence, written with the records.
    nats_js: sled::Tree,
    /// Requests waiting for the agent's answer (`route ‖ device ‖ queue id`).
    /// Requests waiting for the agent's answer (NATS and MQTT 5), by endpoint then arrival
    /// (the tree keeps its first name, `nats-requests`).
    requests: sled::Tree,
    /// Each MQTT endpoint's last presence (`route ‖ device ‖ presence` → online/offline).
    presence: sled::Tree,
    /// Retained messages: the digest of the last one delivered (`… ‖ retained`) and the kept
    /// state (`… ‖ state`) per endpoint.
    retained: sled::Tree,
    /// The outbound mail relay (when `channels.email.relay` is set).
    relay: Option<email::Relay>,
    /// The SMTP server (when an email route was configured at the start).
    smtp: Option<email::EmailHandle>,
    /// Mail already stored, by sender and Message-ID (a client retrying after a lost 250).
    mail_seen: sled::Tree,
    /// Mail threads (`route ‖ device ‖ thread`, the thread named by its first Message-ID):
    /// subject, mailbox, the newest message and its References.
    mail_threads: sled::Tree,
    /// Message-IDs seen or sent → their thread.
    mail_ids: sled::Tree,
    /// Thread → its conversation (group id).
    mail_convs: sled::Tree,
    /// Conversation (hex group id) → the thread it carries.
    mail_gids: sled::Tree,
    endpoints: std::sync::Mutex<HashMap<String, Arc<Endpoint>>>,
    /// Which endpoints' clients are open (bounded by `storage.open_endpoints`).
    open_clients: std::sync::Mutex<OpenClients>,
    /// Set once the news watcher has tried its streams (the outbound pass waits for it, so a
    /// start does not read every endpoint before it knows whether the streams are up).
    news_tried: watch::Sender<bool>,
    resolved: Mutex<HashMap<String, String>>,
    /// The bridge's own XMTP identity: it signs endpoint attestations.
    bridge_identity: Mutex<Client>,
    bridge_key: gatehouse_protocol::identity::InstallationKey,
    bridge_inbox: String,
    bridge_registered: Mutex<bool>,
    /// Signed attestations by statement: an endpoint's statement is the same for each of its
    /// messages (for email, unless the sender checks differ), and Ed25519 is deterministic,
    /// so each is signed once. Emptied when it reaches [`ATTESTATION_CACHE`] entries.
    attestations:
        std::sync::Mutex<HashMap<gatehouse_protocol::attestation::EndpointAttestation, String>>,
    started: std::time::Instant,
}

/// Signed attestations the bridge keeps (see `Bridge::attestations`).
const ATTESTATION_CACHE: usize = 4096;

/// The route's handling of unknown senders, on an endpoint's client (held in memory: set
/// whenever the client is opened, and again when the route changes).
fn configure_client(route: &Route, client: &mut Client) {
    let policy = &route.consent;
    client.set_surface_requests(false);
    client.set_request_policy(
        policy.default == crate::config::UnknownSenders::Request,
        policy.max_requests,
    );
}

fn endpoint_name(route: &Route, device: &str) -> String {
    format!("{}/{}/{}", route.channel, route.name, device)
}

impl Bridge {
    /// Endpoints for the admin API.
    pub fn endpoints(&self) -> Vec<EndpointInfo> {
        self.endpoint_index
            .iter()
            .filter_map(|r| r.ok())
            .filter_map(|(_, v)| serde_json::from_slice::<EndpointInfo>(&v).ok())
            .map(|mut e| {
                if let Some((_, route)) =
                    self.cfg().active_routes().find(|(_, r)| r.name == e.route)
                {
                    e.state = self
                        .retained
                        .get(Self::endpoint_key(route, &e.device, "state"))
                        .ok()
                        .flatten()
                        .and_then(|v| serde_json::from_slice(&v).ok());
                }
                e
            })
            .collect()
    }

    /// Status for the admin API.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_secs": self.started.elapsed().as_secs(),
            "bridge_inbox": self.bridge_inbox,
            "endpoints": self.endpoint_index.len(),
            // Whose protocol state is in memory (at most `storage.open_endpoints`).
            "open_endpoints": self.open_clients.lock().unwrap_or_else(|p| p.into_inner()).by_name.len(),
            "inbox_depth": self.inbox.len(),
            "inbox_by_route": self.cfg().active_routes().map(|(_, r)| (r.name.clone(), self.inbox.scan_prefix(inbox_prefix(&r.name)).count().into())).collect::<serde_json::Map<String, serde_json::Value>>(),
            "dead_letters": self.dead.len(),
            "node": {
                "embedded": self.cfg().node.embedded,
                "url": self.node_url,
                "streaming": self.streaming.load(std::sync::atomic::Ordering::Relaxed),
            },
            "plugins": self.plugin_stats.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(name, s)| (name.clone(), serde_json::json!({
                "calls": s.calls,
                "faults": s.faults,
                "quarantined": s.quarantined,
            }))).collect::<serde_json::Map<String, serde_json::Value>>(),
            "mqtt": self.mqtt.as_ref().map(|m| format!("{:?}", m.state())),
            "nats": self.nats.as_ref().map(|n| serde_json::json!({
                "state": format!("{:?}", n.state()),
                // Windows in which core subjects missed messages (JetStream routes resume).
                "disconnects": n.disconnects(),
            })),
            "ready": self.not_ready().is_none(),
            "not_ready_reason": self.not_ready(),
        })
    }

    /// Why the daemon is not taking in messages, if it is not (admin `GET /ready`): no room
    /// or a failed store, or a channel whose connection is down.
    pub fn not_ready(&self) -> Option<String> {
        let store = self
            .not_ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        store.or_else(|| {
            let live = self.cfg();
            let limit = Duration::from_secs(live.stalled_after_secs);
            for (idx, route) in live.active_routes() {
                let slot = self.slot(idx);
                if let Some((since, reason)) =
                    &*slot.stalled.lock().unwrap_or_else(|p| p.into_inner())
                    && since.elapsed() >= limit
                {
                    return Some(format!(
                        "route {} has not delivered for {} s: {reason}",
                        route.name,
                        since.elapsed().as_secs()
                    ));
                }
            }
            if let Some(m) = &self.mqtt {
                let state = m.state();
                if state != mqtt::ConnectionState::Connected {
                    return Some(format!("MQTT broker not connected: {state:?}"));
                }
            }
            if let Some(n) = &self.nats {
                let state = n.state();
                if state != mqtt::ConnectionState::Connected {
                    return Some(format!("NATS server not connected: {state:?}"));
                }
            }
            None
        })
    }

    /// Routes for the admin API: what config.yaml says, and each one's queue depth.
    pub fn routes(&self) -> serde_json::Value {
        self.cfg()
            .active_routes()
            .map(|(_, r)| {
                serde_json::json!({
                    "name": r.name,
                    "channel": r.channel,
                    "subscribe": r.subscribe,
                    "reply": r.reply,
                    "plugin": r.plugin,
                    "agents": r.agents,
                    "presence": r.presence,
                    "share_group": r.share_group,
                    "queue_group": r.queue_group,
                    "stream": r.stream,
                    "queued": self.inbox.scan_prefix(inbox_prefix(&r.name)).count(),
                })
            })
            .collect()
    }

    /// Prometheus text: the counters and histograms recorded so far, with the levels read now.
    pub fn metrics_text(&self) -> String {
        crate::metrics::render(|| {
            use crate::metrics::gauge;
            for (_, r) in self.cfg().active_routes() {
                gauge(
                    "gatehouse_queue_depth",
                    &[("route", r.name.clone())],
                    self.inbox.scan_prefix(inbox_prefix(&r.name)).count() as f64,
                );
            }
            gauge("gatehouse_dead_letters", &[], self.dead.len() as f64);
            gauge("gatehouse_endpoints", &[], self.endpoint_index.len() as f64);
            gauge(
                "gatehouse_ready",
                &[],
                f64::from(u8::from(self.not_ready().is_none())),
            );
            let connectors = [
                ("mqtt", self.mqtt.as_ref().map(|m| m.state())),
                ("nats", self.nats.as_ref().map(|n| n.state())),
            ];
            for (connector, state) in connectors {
                let Some(state) = state else { continue };
                let name = match state {
                    mqtt::ConnectionState::Connecting => "connecting",
                    mqtt::ConnectionState::Connected => "connected",
                    mqtt::ConnectionState::BackingOff(_) => "backing_off",
                    mqtt::ConnectionState::BadCredentials(_) => "bad_credentials",
                    mqtt::ConnectionState::Stopped => "stopped",
                };
                crate::metrics::connector(
                    connector,
                    name,
                    state == mqtt::ConnectionState::Connected,
                );
            }
            let stats = self.plugin_stats.lock().unwrap_or_else(|p| p.into_inner());
            for name in self.cfg().plugins.keys() {
                let q = stats.get(name).is_some_and(|s| s.quarantined);
                gauge(
                    "gatehouse_plugin_quarantined",
                    &[("plugin", name.clone())],
                    f64::from(u8::from(q)),
                );
            }
        })
    }

    /// Records whether a route's deliveries keep failing (`Some(reason)`) or got through.
    fn set_stalled(&self, idx: usize, reason: Option<String>) {
        let slot = self.slot(idx);
        let mut s = slot.stalled.lock().unwrap_or_else(|p| p.into_inner());
        match (reason, s.as_mut()) {
            (None, _) => *s = None,
            (Some(r), Some((_, last))) => *last = r,
            (Some(r), None) => *s = Some((std::time::Instant::now(), r)),
        }
    }

    /// The configuration in force.
    fn cfg(&self) -> Arc<Config> {
        self.cfg.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A route slot's state (one exists for every index of `cfg().routes`).
    fn slot(&self, idx: usize) -> Arc<Slot> {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        slots.get(idx).cloned().unwrap_or_default()
    }

    /// Starts route `idx`'s NATS subscription (if it is a NATS route in force), tagged with
    /// its slot; a JetStream consumer resumes after the highest sequence stored. The
    /// receiver resolves once the server has the subscription.
    fn subscribe_nats(&self, idx: usize) -> anyhow::Result<Option<oneshot::Receiver<()>>> {
        let live = self.cfg();
        let (Some(r), Some(handle)) = (live.routes.get(idx), &self.nats) else {
            return Ok(None);
        };
        if r.retired || !r.is_nats() {
            return Ok(None);
        }
        let jetstream = match &r.stream {
            Some(stream) => {
                let stored = self
                    .nats_js
                    .get(r.name.as_bytes())?
                    .and_then(|v| v.as_ref().try_into().ok())
                    .map_or(0, u64::from_be_bytes);
                let stored = Arc::new(std::sync::atomic::AtomicU64::new(stored));
                self.nats_stored
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(idx, stored.clone());
                Some(nats::JetStreamSub {
                    stream: stream.clone(),
                    durable: r
                        .durable
                        .clone()
                        .unwrap_or_else(|| format!("gatehouse-{}", r.name)),
                    deliver: match r.deliver.as_deref() {
                        None | Some("all") => nats::Deliver::All,
                        Some("new") => nats::Deliver::New,
                        Some(t) => nats::Deliver::Since(t.to_string()),
                    },
                    stored,
                })
            }
            None => None,
        };
        let (sub, subscribed) = handle.subscribe(
            idx,
            nats::Subscription {
                subject: r.nats_filter(),
                queue_group: r.queue_group.clone(),
                jetstream,
            },
        );
        let old = self
            .slot(idx)
            .nats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(sub);
        if let Some(old) = old {
            old.abort();
        }
        Ok(Some(subscribed))
    }

    /// Stops route `idx`'s NATS subscription, if it has one.
    fn unsubscribe_nats(&self, idx: usize) {
        let sub = self
            .slot(idx)
            .nats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(sub) = sub {
            sub.abort();
        }
        self.nats_stored
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&idx);
    }

    /// Applies a new configuration without stopping what it leaves alone, if the change is
    /// confined to routes, plugins and the settings read as they are used
    /// (`poll_interval_ms`, `stalled_after_secs`, `shutdown_grace_secs`): routes and plugins
    /// that did not change keep running (same connections, same plugin instances, no gap);
    /// a changed route takes its new settings from its next message (its endpoints apply its
    /// consent policy again), a changed plugin is loaded again, an added route starts, a
    /// dropped one stops (the caller stops its worker). Anything else (channels, node,
    /// storage, admin, data_dir; the first route of a channel that had none) needs a restart:
    /// `Err` says why, and nothing was changed.
    async fn reload_config(&self, mut new: Config) -> Result<Change, Reloaded> {
        let restart = |why: String| Reloaded::NeedsRestart(why);
        let old = self.cfg();
        let same =
            |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") == format!("{b:?}");
        for (key, a, b) in [
            (
                "data_dir",
                &old.data_dir as &dyn std::fmt::Debug,
                &new.data_dir as &dyn std::fmt::Debug,
            ),
            ("node", &old.node, &new.node),
            ("admin", &old.admin, &new.admin),
            ("channels", &old.channels, &new.channels),
            ("storage", &old.storage, &new.storage),
        ] {
            if !same(a, b) {
                return Err(restart(format!("{key} changed")));
            }
        }
        let metered = |c: &Config| c.plugins.values().any(|p| p.fuel.is_some());
        if metered(&old) != metered(&new) {
            return Err(restart("plugin fuel metering was turned on or off".into()));
        }
        if !same(&old.log, &new.log) {
            tracing::warn!("log settings changed: they apply from the next start");
        }
        let needs = |channel: &str| new.routes.iter().any(|r| r.channel == channel);
        if needs("mqtt") && self.mqtt.is_none() {
            return Err(restart(
                "the first MQTT route needs the broker connection".into(),
            ));
        }
        if new.routes.iter().any(|r| r.is_email()) && self.smtp.is_none() {
            return Err(restart(
                "the first email route needs the SMTP server".into(),
            ));
        }
        // Route slots: kept (same name and channel) at their index, changed in place, added
        // at the end, dropped ones retired (their index stays taken).
        let mut slots = old.routes.clone();
        let (mut order, mut changed, mut added, mut retired) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for r in std::mem::take(&mut new.routes) {
            let at = slots
                .iter()
                .position(|o| !o.retired && o.name == r.name && o.channel == r.channel);
            match at {
                Some(i) => {
                    if !same(&slots[i], &r) {
                        changed.push(i);
                        slots[i] = r;
                    }
                    order.push(i);
                }
                None => {
                    added.push(slots.len());
                    order.push(slots.len());
                    slots.push(r);
                }
            }
        }
        for (i, r) in slots.iter_mut().enumerate() {
            if !r.retired && !order.contains(&i) {
                r.retired = true;
                retired.push(i);
            }
        }
        new.routes = slots;
        new.route_order = order;
        // Plugins: loaded again only where what they are loaded from changed.
        let reload: Vec<String> = new
            .plugins
            .keys()
            .filter(|n| plugin_inputs(&old, n) != plugin_inputs(&new, n))
            .cloned()
            .collect();
        let dropped: Vec<String> = old
            .plugins
            .keys()
            .filter(|n| !new.plugins.contains_key(*n))
            .cloned()
            .collect();
        let mut loaded = Vec::new();
        for name in &reload {
            let (host, db) = (self.host.clone(), self.db.clone());
            let l = tokio::task::block_in_place(|| load_plugin(&host, &new, &db, name))
                .map_err(|e| format!("{e:#}"))
                .map_err(|e| format!("plugin {name} did not load: {e}"));
            match l {
                Ok(l) => loaded.push((name.clone(), l)),
                // Not a reason to restart: the running configuration stays.
                Err(e) => return Err(Reloaded::Refused(e)),
            }
        }
        // Commit.
        let new = Arc::new(new);
        {
            let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
            while slots.len() < new.routes.len() {
                slots.push(Default::default());
            }
        }
        {
            let mut plugins = self.plugins.write().unwrap_or_else(|p| p.into_inner());
            let mut stats = self.plugin_stats.lock().unwrap_or_else(|p| p.into_inner());
            for name in &dropped {
                plugins.remove(name);
                stats.remove(name);
            }
            for (name, l) in loaded {
                tracing::info!(plugin = %name, sha256 = %l.sha256, "plugin loaded (configuration reload)");
                if plugins.insert(name.clone(), Arc::new(l)).is_some() {
                    stats.entry(name).or_default().reloaded();
                } else {
                    stats.insert(name, Default::default());
                }
            }
        }
        *self.cfg.write().unwrap_or_else(|p| p.into_inner()) = new.clone();
        // Endpoints: a dropped route's stop being read; a changed route's apply its consent
        // policy again (and pick up the new settings) at their next use.
        let endpoints: Vec<Arc<Endpoint>> = {
            let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
            map.retain(|_, e| !retired.contains(&e.route));
            map.values()
                .filter(|e| changed.contains(&e.route))
                .cloned()
                .collect()
        };
        for e in endpoints {
            *e.registered.lock().await = false;
        }
        if let Some(m) = &self.mqtt {
            m.set_filters(mqtt_filters(&new)).await;
        }
        if let Some(smtp) = &self.smtp {
            smtp.set_mailboxes(mailboxes(&new));
        }
        for &i in retired.iter().chain(&changed) {
            self.unsubscribe_nats(i);
        }
        let mut subscribing = Vec::new();
        for &i in changed.iter().chain(&added) {
            match self.subscribe_nats(i) {
                Ok(Some(s)) => subscribing.push((i, s)),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(route = %new.routes[i].name, error = %format!("{e:#}"), "NATS subscription not started")
                }
            }
        }
        // Reported done once the server has them (a disconnected server: they follow on
        // reconnection).
        for (i, s) in subscribing {
            if tokio::time::timeout(NATS_SUBSCRIBE_WAIT, s).await.is_err() {
                tracing::warn!(route = %new.routes[i].name, "NATS subscription not confirmed yet (is the server reachable?); it starts when it is");
            }
        }
        self.wake_all();
        let names = |v: &[usize]| {
            v.iter()
                .map(|&i| new.routes[i].name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut summary = Vec::new();
        for (what, v) in [
            ("added", &added),
            ("changed", &changed),
            ("dropped", &retired),
        ] {
            if !v.is_empty() {
                summary.push(format!("routes {what}: {}", names(v)));
            }
        }
        if !reload.is_empty() {
            summary.push(format!("plugins loaded: {}", reload.join(", ")));
        }
        if !dropped.is_empty() {
            summary.push(format!("plugins dropped: {}", dropped.join(", ")));
        }
        if summary.is_empty() {
            summary.push("no route or plugin changed".into());
        }
        Ok(Change {
            summary: summary.join("; "),
            retired,
        })
    }

    /// Wakes every route's queue worker.
    fn wake_all(&self) {
        for s in self.slots.read().unwrap_or_else(|p| p.into_inner()).iter() {
            s.work.notify_one();
        }
    }

    /// A JetStream route's highest stored stream sequence.
    fn nats_stored(&self, idx: usize) -> Option<Arc<std::sync::atomic::AtomicU64>> {
        let stored = self.nats_stored.lock().unwrap_or_else(|p| p.into_inner());
        stored.get(&idx).cloned()
    }

    /// Records readiness; logs each change once.
    fn set_not_ready(&self, reason: Option<String>) {
        let mut cur = self.not_ready.lock().unwrap_or_else(|p| p.into_inner());
        if *cur == reason {
            return;
        }
        match &reason {
            Some(r) => {
                tracing::error!(reason = %r, "not ready: taking in no messages (sources keep them until this clears)")
            }
            None => tracing::info!("ready: taking in messages again"),
        }
        *cur = reason;
    }

    /// Whether `data_dir` has room for more (at least `storage.min_free_mb` free).
    fn storage_room(&self) -> Result<(), String> {
        let min = self.cfg().storage.min_free_mb.saturating_mul(1 << 20);
        match fs2::available_space(&self.cfg().data_dir) {
            Ok(free) if free >= min => Ok(()),
            Ok(free) => Err(format!(
                "data_dir {} has {} MiB free, below storage.min_free_mb ({} MiB)",
                self.cfg().data_dir.display(),
                free >> 20,
                self.cfg().storage.min_free_mb
            )),
            Err(e) => Err(format!(
                "cannot read the free space of data_dir {}: {e}",
                self.cfg().data_dir.display()
            )),
        }
    }

    /// The endpoint of `device` on route `route_idx`. One known from an earlier run is set up
    /// from the store without opening its client (a start with many endpoints on disk costs
    /// a few reads each); a new one is created (its keys derived from the bridge seed).
    fn endpoint(&self, route_idx: usize, device: &str) -> anyhow::Result<Arc<Endpoint>> {
        let live = self.cfg();
        let route = &live.routes[route_idx];
        let name = endpoint_name(route, device);
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get(&name) {
            return Ok(e.clone());
        }
        let tree = self.db.open_tree(format!("ep/{name}"))?;
        let stored: Option<EndpointInfo> = self
            .endpoint_index
            .get(name.as_bytes())?
            .and_then(|v| serde_json::from_slice(&v).ok());
        let known = match (stored, gatehouse_client::stored_installation_key(&tree)?) {
            (Some(info), Some(key)) => Some((info, key)),
            _ => None,
        };
        let stored_address = known.as_ref().map(|(info, _)| info.address.clone());
        let (client, info, installation) = match known {
            Some((info, key)) => (None, info, key),
            None => {
                let client = self.open_client(route, &name, &tree)?;
                let info = EndpointInfo {
                    route: route.name.clone(),
                    channel: route.channel.clone(),
                    device: device.to_string(),
                    address: route.endpoint_address(device),
                    wallet_address: client.address(),
                    inbox_id: client.inbox_id().to_string(),
                    state: None,
                };
                let key = client.installation_key();
                (Some(client), info, key)
            }
        };
        // Written when new, and when the route's address pattern changed since.
        let fresh = EndpointInfo {
            address: route.endpoint_address(device),
            state: None,
            ..info
        };
        if stored_address.as_ref() != Some(&fresh.address) {
            self.endpoint_index
                .insert(name.as_bytes(), serde_json::to_vec(&fresh)?)?;
        }
        let opened = client.is_some();
        let e = Arc::new(Endpoint {
            name: name.clone(),
            route: route_idx,
            device: device.to_string(),
            tree,
            inbox_id: fresh.inbox_id,
            installation,
            client: Mutex::new(client),
            registered: Mutex::new(false),
            retry: Default::default(),
            // Checked for news when the node's streams first cover it (see `watch_news`).
            last_checked: std::sync::Mutex::new(Some(std::time::Instant::now())),
            last_full: std::sync::Mutex::new(None),
        });
        map.insert(name.clone(), e.clone());
        drop(map);
        if opened {
            self.note_open(&name);
        }
        // Its installation (and conversations from earlier runs) are watched from now on.
        self.note_topology(&e);
        Ok(e)
    }

    /// Opens an endpoint's client from its store, set up as the bridge uses it.
    fn open_client(&self, route: &Route, name: &str, tree: &sled::Tree) -> anyhow::Result<Client> {
        let (wallet, key) = identity::endpoint_keys(&self.seed, name);
        let mut client = Client::open(tree.clone(), self.channel.clone(), Some(wallet), Some(key))?;
        // What an endpoint reads stays owed until it is published (or dead-lettered).
        client.set_retain_deliveries(true);
        client.set_published_sink(self.published.clone());
        configure_client(route, &mut client);
        Ok(client)
    }

    /// The endpoint's client, locked; opened from its store if it was closed.
    async fn client<'a>(
        &self,
        ep: &'a Endpoint,
    ) -> anyhow::Result<tokio::sync::MappedMutexGuard<'a, Client>> {
        let mut slot = ep.client.lock().await;
        let client = match slot.take() {
            Some(c) => c,
            None => {
                let live = self.cfg();
                self.open_client(&live.routes[ep.route], &ep.name, &ep.tree)
                    .with_context(|| format!("opening the store of endpoint {}", ep.name))?
            }
        };
        self.note_open(&ep.name);
        Ok(tokio::sync::MutexGuard::map(slot, |s| s.insert(client)))
    }

    /// Records a use of an endpoint's open client; past `storage.open_endpoints` open ones,
    /// the least recently used that nobody holds are closed.
    fn note_open(&self, name: &str) {
        {
            let mut open = self.open_clients.lock().unwrap_or_else(|p| p.into_inner());
            open.tick += 1;
            let tick = open.tick;
            if let Some(before) = open.by_name.insert(name.to_string(), tick) {
                open.order.remove(&before);
            }
            open.order.insert(tick, name.to_string());
        }
        self.trim_open();
    }

    /// Closes the least recently used open clients that nobody holds, down to
    /// `storage.open_endpoints` (those in use are closed by a later call: after each pass).
    fn trim_open(&self) {
        let cap = self.cfg().storage.open_endpoints.max(1);
        let (excess, oldest) = {
            let open = self.open_clients.lock().unwrap_or_else(|p| p.into_inner());
            let excess = open.by_name.len().saturating_sub(cap);
            if excess == 0 {
                return;
            }
            // Some may be in use: a few more candidates than needed.
            let oldest: Vec<(u64, String)> = open
                .order
                .iter()
                .take(excess + 8)
                .map(|(t, n)| (*t, n.clone()))
                .collect();
            (excess, oldest)
        };
        let mut closed = 0;
        for (tick, victim) in oldest {
            if closed == excess {
                break;
            }
            let ep = self
                .endpoints
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&victim)
                .cloned();
            let done = match &ep {
                // Its route was dropped: only the record is left.
                None => true,
                Some(ep) => match ep.client.try_lock() {
                    Ok(mut slot) => {
                        // Everything it holds is in its store already.
                        slot.take();
                        true
                    }
                    Err(_) => false,
                },
            };
            if done {
                let mut open = self.open_clients.lock().unwrap_or_else(|p| p.into_inner());
                if open.by_name.get(&victim) == Some(&tick) {
                    open.by_name.remove(&victim);
                    open.order.remove(&tick);
                }
                closed += 1;
            }
        }
    }

    async fn resolve(&self, client: &mut Client, who: &str) -> anyhow::Result<String> {
        if let Some(v) = self.resolved.lock().await.get(who) {
            return Ok(v.clone());
        }
        let inbox = client.resolve(who).await?;
        self.resolved
            .lock()
            .await
            .insert(who.to_string(), inbox.clone());
        Ok(inbox)
    }

    /// Stores a batch of inbound messages durably with one flush, then acknowledges them to the
    /// broker (DESIGN §9: no per-message fsync; nothing acknowledged before it is on disk).
    async fn accept(&self, batch: Vec<Inbound>) -> anyhow::Result<()> {
        let mut stored = Vec::with_capacity(batch.len());
        let mut counted: Vec<(usize, usize)> = Vec::with_capacity(batch.len());
        let mut already = Vec::new();
        let mut routes = std::collections::BTreeSet::new();
        // Written together, all or nothing (see below).
        let mut records: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut marks: Vec<([u8; 2], [u8; 32])> = Vec::new();
        let mut requests: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut retained_marks: Vec<(Vec<u8>, [u8; 32])> = Vec::new();
        let live = self.cfg();
        for msg in batch {
            let presence_of = live
                .active_routes()
                .find_map(|(i, r)| r.presence_device_of(&msg.topic).map(|d| (i, r, d)));
            if let Some((_, route, _)) = &presence_of
                && presence_state(&msg.payload).is_none()
            {
                tracing::warn!(route = %route.name, topic = %msg.topic, bytes = msg.payload.len(), "presence message is neither online nor offline; ignored");
                self.ack(&msg).await?;
                continue;
            }
            let Some((idx, route, device)) = presence_of.or_else(|| {
                live.active_routes()
                    .find_map(|(i, r)| r.device_of(&msg.topic).map(|d| (i, r, d)))
            }) else {
                tracing::debug!(topic = %msg.topic, "no route for topic");
                self.ack(&msg).await?;
                continue;
            };
            if self.is_own_echo(&msg) {
                tracing::debug!(route = %route.name, topic = %msg.topic, "our own publish came back; not taken in");
                self.ack(&msg).await?;
                continue;
            }
            if msg.retain && route.presence_device_of(&msg.topic).is_none() {
                use crate::config::RetainedPolicy;
                let digest = echo_digest(&msg.topic, &msg.payload);
                match route.retained {
                    RetainedPolicy::Ignore => {
                        tracing::debug!(route = %route.name, topic = %msg.topic, "retained message ignored (routes[].retained: ignore)");
                        self.ack(&msg).await?;
                        continue;
                    }
                    RetainedPolicy::State => {
                        // The endpoint exists (and is listed) from its first state on.
                        self.endpoint(idx, &device)?;
                        let state = serde_json::json!({
                            "topic": msg.topic,
                            "payload": String::from_utf8(msg.payload.clone()).unwrap_or_else(|_| hex::encode(&msg.payload)),
                            "at_ms": now_ms(),
                        });
                        self.retained.insert(
                            Self::endpoint_key(route, &device, "state"),
                            serde_json::to_vec(&state)?,
                        )?;
                        gatehouse_client::flush_tree(&self.retained).await?;
                        tracing::info!(route = %route.name, %device, "retained message kept as the endpoint's state");
                        self.ack(&msg).await?;
                        continue;
                    }
                    RetainedPolicy::Once => {
                        let key = Self::endpoint_key(route, &device, "retained");
                        if self.retained.get(&key)?.is_some_and(|v| v == digest[..])
                            || retained_marks
                                .iter()
                                .any(|(k, d)| *k == key && *d == digest)
                        {
                            tracing::debug!(route = %route.name, topic = %msg.topic, "retained message delivered before; not again");
                            self.ack(&msg).await?;
                            continue;
                        }
                        retained_marks.push((key, digest));
                    }
                }
            }
            if msg.payload.len() > route.max_payload {
                tracing::warn!(route = %route.name, topic = %msg.topic, bytes = msg.payload.len(), limit = route.max_payload, "rejected: payload over the route's max_payload");
                // MQTT 5 tells the broker why (reason code Quota exceeded); 3.1.1 cannot.
                if let Some(m) = &self.mqtt {
                    m.refuse(
                        &msg,
                        &format!(
                            "payload of {} bytes is over the limit of {} bytes",
                            msg.payload.len(),
                            route.max_payload
                        ),
                    )?;
                }
                continue;
            }
            // A QoS 1 message we stored but could not acknowledge (a crash) comes back marked
            // DUP under the same packet id after the reconnect: acknowledge it, store it once.
            let mark = (msg.qos > 0).then(|| (msg.pkid.to_be_bytes(), inflight_digest(&msg)));
            if msg.dup
                && let Some((pkid, digest)) = &mark
                && self.inflight.get(pkid)?.is_some_and(|v| v == digest[..])
            {
                tracing::info!(route = %route.name, topic = %msg.topic, pkid = msg.pkid, "redelivered message already stored; acknowledging it once more");
                already.push(msg);
                continue;
            }
            let id = self.db.generate_id()?;
            // MQTT 5 request-response: the agent's next answer to this endpoint goes to the
            // response topic, with the correlation data (written before the record: a request
            // without its message is harmless, the reverse would lose the way back).
            let response_topic = msg
                .props
                .as_ref()
                .and_then(|p| p.response_topic.clone())
                .filter(|t| {
                    let ok = route.response_topic_allowed(&device, t);
                    if !ok {
                        tracing::warn!(route = %route.name, %device, response_topic = %t, "response topic outside routes[].response_topics; the answer goes to the route's reply topic");
                    }
                    ok
                });
            if let Some(reply) = response_topic {
                let expiry = msg
                    .props
                    .as_ref()
                    .and_then(|p| p.message_expiry_secs)
                    .map(|s| u64::from(s) * 1000);
                let pending = PendingRequest {
                    reply,
                    deadline_ms: now_ms() + expiry.unwrap_or(route.request_timeout_ms),
                    correlation: msg.props.as_ref().and_then(|p| p.correlation_data.clone()),
                };
                let mut k = Self::endpoint_key(route, &device, "");
                k.extend_from_slice(&id.to_be_bytes());
                requests.push((k, serde_json::to_vec(&pending)?));
            }
            let rec = Queued {
                route: idx,
                device,
                topic: msg.topic.clone(),
                payload: msg.payload.clone(),
                retain: msg.retain,
                qos: msg.qos,
                mail: None,
                nats: None,
                mqtt: msg.props.clone(),
                presence: self
                    .cfg()
                    .routes
                    .get(idx)
                    .and_then(|r| r.presence_device_of(&msg.topic))
                    .and_then(|_| presence_state(&msg.payload)),
            };
            records.push((inbox_key(&route.name, id), serde_json::to_vec(&rec)?));
            if let Some(m) = mark {
                marks.push(m);
            }
            routes.insert(idx);
            counted.push((idx, msg.payload.len()));
            tracing::trace!(route = %route.name, topic = %msg.topic, pkid = msg.pkid, bytes = msg.payload.len(), "MQTT message stored");
            stored.push(msg);
        }
        for msg in &already {
            self.ack(msg).await?;
        }
        if stored.is_empty() {
            return Ok(());
        }
        // The records with their redelivery marks (and MQTT 5 requests, retained-once marks):
        // all or nothing. Written one by one, a crash before the flush could keep a record
        // without its mark (sled may have written part of what followed the last flush), and
        // the broker's redelivery of the unacknowledged message would then be stored again: a
        // duplicate at the agent. A mark without its record would lose the message instead.
        {
            use sled::Transactional as _;
            (&self.inbox, &self.inflight, &self.requests, &self.retained)
                .transaction(|(inbox, inflight, req, retained)| {
                    for (k, v) in &records {
                        inbox.insert(k.as_slice(), v.as_slice())?;
                    }
                    for (pkid, digest) in &marks {
                        inflight.insert(&pkid[..], &digest[..])?;
                    }
                    for (k, v) in &requests {
                        req.insert(k.as_slice(), v.as_slice())?;
                    }
                    for (k, digest) in &retained_marks {
                        retained.insert(k.as_slice(), &digest[..])?;
                    }
                    Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
                })
                .map_err(|e| anyhow::anyhow!("storing MQTT messages: {e:?}"))?;
        }
        // Acknowledge only after the durable write.
        gatehouse_client::flush_tree(&self.inbox).await?;
        if std::env::var_os("GATEHOUSE_FAULT_CRASH_BEFORE_ACK").is_some() {
            // Fault injection for the crash tests: die between the durable write and the ack.
            tracing::error!("GATEHOUSE_FAULT_CRASH_BEFORE_ACK: aborting after the durable write");
            std::process::abort();
        }
        for msg in &stored {
            self.ack(msg).await?;
        }
        for (idx, bytes) in counted {
            crate::metrics::received(&self.cfg().routes[idx].name, "mqtt", bytes);
        }
        for idx in routes {
            self.slot(idx).work.notify_one();
        }
        Ok(())
    }

    /// Publishes to the broker and remembers it for [`ECHO_WINDOW`], so that the bridge does
    /// not take its own publish back in as a device message when a route's `subscribe`
    /// pattern also matches where it publishes (MQTT 3.1.1 has no way to tag a message).
    async fn publish_out(
        &self,
        m: &MqttHandle,
        topic: &str,
        payload: Vec<u8>,
        props: Option<mqtt::Properties>,
        key: gatehouse_channels::mqtt::PublishKey,
    ) -> anyhow::Result<gatehouse_channels::mqtt::PublishAck> {
        if self
            .cfg()
            .active_routes()
            .any(|(_, r)| r.device_of(topic).is_some())
        {
            let digest = echo_digest(topic, &payload);
            let mut own = self.own_publishes.lock().unwrap_or_else(|p| p.into_inner());
            let now = std::time::Instant::now();
            own.retain(|(_, at)| now.duration_since(*at) < ECHO_WINDOW);
            own.push_back((digest, now));
        }
        Ok(m.publish(topic, payload, props, Some(key)).await?)
    }

    /// The endpoint's oldest MQTT 5 request still open (its response topic and correlation
    /// data). Expired ones are removed with a log line: the answer then goes to the route's
    /// reply topic instead.
    fn open_mqtt_request(
        &self,
        route: &Route,
        device: &str,
    ) -> Option<(sled::IVec, PendingRequest)> {
        let prefix = Self::endpoint_key(route, device, "");
        for (k, v) in self.requests.scan_prefix(&prefix).filter_map(|r| r.ok()) {
            let req = match serde_json::from_slice::<PendingRequest>(&v) {
                Ok(req) => req,
                Err(e) => {
                    // It holds no message, only where an answer should go: drop it, say so
                    // (where parsing stopped, never the content), and answer on the reply topic.
                    let _ = self.requests.remove(&k);
                    tracing::warn!(route = %route.name, %device, problem = %gatehouse_client::unreadable(&e), "an MQTT 5 request record could not be read and was dropped; the answer goes to the route's reply topic");
                    continue;
                }
            };
            if now_ms() > req.deadline_ms {
                let _ = self.requests.remove(&k);
                tracing::warn!(route = %route.name, %device, "an MQTT 5 request expired unanswered; the answer goes to the route's reply topic");
                continue;
            }
            return Some((k, req));
        }
        None
    }

    /// Whether an inbound message is one of our own recent publishes (consumed if so).
    fn is_own_echo(&self, msg: &Inbound) -> bool {
        let digest = echo_digest(&msg.topic, &msg.payload);
        let mut own = self.own_publishes.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        own.retain(|(_, at)| now.duration_since(*at) < ECHO_WINDOW);
        match own.iter().position(|(d, _)| *d == digest) {
            Some(i) => {
                own.remove(i);
                true
            }
            None => false,
        }
    }

    async fn ack(&self, msg: &Inbound) -> anyhow::Result<()> {
        if let Some(m) = &self.mqtt {
            m.ack(msg)
                .await
                .map_err(|e| anyhow::anyhow!("acknowledging to the broker: {e}"))?;
        }
        Ok(())
    }

    /// Stores a batch of NATS messages with one flush, then acknowledges the JetStream ones.
    /// Our own publishes (the origin header), messages over the size limits and JetStream
    /// redeliveries of what is stored (by sequence) are acknowledged without being stored.
    async fn accept_nats(&self, batch: Vec<nats::NatsIn>) -> anyhow::Result<()> {
        let limit = self
            .cfg()
            .channels
            .nats
            .as_ref()
            .map_or(usize::MAX, |n| n.max_payload);
        let mut keep = Vec::with_capacity(batch.len());
        let mut done = Vec::new();
        let mut routes = std::collections::BTreeSet::new();
        let mut maxseq: HashMap<usize, u64> = HashMap::new();
        let mut records: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut requests: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut counted: Vec<(usize, usize)> = Vec::new();
        for msg in batch {
            let idx = msg.sub;
            let live = self.cfg();
            let Some(route) = live.routes.get(idx).filter(|r| !r.retired) else {
                // Its route was dropped by a reload: not taken in, not acknowledged
                // (JetStream keeps it for the route's return).
                continue;
            };
            let Some(device) = route.nats_device_of(&msg.subject) else {
                tracing::debug!(subject = %msg.subject, "no endpoint in the subject");
                done.push(msg);
                continue;
            };
            if msg
                .headers
                .iter()
                .any(|(k, v)| k == NATS_ORIGIN && *v == self.bridge_inbox)
            {
                tracing::debug!(route = %route.name, subject = %msg.subject, "our own publish came back; not taken in");
                done.push(msg);
                continue;
            }
            if msg.payload.len() > route.max_payload.min(limit) {
                tracing::warn!(route = %route.name, subject = %msg.subject, bytes = msg.payload.len(), limit = route.max_payload.min(limit), "rejected: payload over the size limit (route max_payload / channels.nats.max_payload)");
                done.push(msg);
                continue;
            }
            let stored = self.nats_stored(idx);
            if let (Some(seq), Some(stored)) = (msg.stream_seq, stored) {
                let floor = maxseq
                    .get(&idx)
                    .copied()
                    .unwrap_or(0)
                    .max(stored.load(std::sync::atomic::Ordering::SeqCst));
                if seq <= floor {
                    tracing::debug!(route = %route.name, seq, "JetStream redelivery of a stored message; acknowledged again");
                    done.push(msg);
                    continue;
                }
                maxseq.insert(idx, seq);
            }
            let id = self.db.generate_id()?;
            if let Some(reply) = &msg.reply {
                let timeout = msg
                    .headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(NATS_TIMEOUT_HEADER))
                    .and_then(|(_, v)| v.trim().parse::<u64>().ok())
                    .unwrap_or(route.request_timeout_ms);
                let pending = PendingRequest {
                    reply: reply.clone(),
                    deadline_ms: now_ms() + timeout,
                    correlation: None,
                };
                let mut k = Self::endpoint_key(route, &device, "");
                k.extend_from_slice(&id.to_be_bytes());
                requests.push((k, serde_json::to_vec(&pending)?));
            }
            let rec = Queued {
                route: idx,
                device,
                topic: msg.subject.clone(),
                payload: msg.payload.clone(),
                retain: false,
                qos: 1,
                mail: None,
                presence: None,
                mqtt: None,
                nats: Some(NatsMeta {
                    headers: msg.headers.clone(),
                    reply: msg.reply.clone(),
                    seq: msg.stream_seq,
                }),
            };
            records.push((inbox_key(&route.name, id), serde_json::to_vec(&rec)?));
            routes.insert(idx);
            counted.push((idx, msg.payload.len()));
            keep.push(msg);
        }
        if !records.is_empty() {
            // The records, the pending requests and the stream positions: all or nothing.
            use sled::Transactional as _;
            let js: Vec<(Vec<u8>, u64)> = maxseq
                .iter()
                .map(|(idx, seq)| (self.cfg().routes[*idx].name.as_bytes().to_vec(), *seq))
                .collect();
            (&self.inbox, &self.requests, &self.nats_js)
                .transaction(|(inbox, req, pos)| {
                    for (k, v) in &records {
                        inbox.insert(k.as_slice(), v.as_slice())?;
                    }
                    for (k, v) in &requests {
                        req.insert(k.as_slice(), v.as_slice())?;
                    }
                    for (k, seq) in &js {
                        pos.insert(k.as_slice(), &seq.to_be_bytes())?;
                    }
                    Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
                })
                .map_err(|e| anyhow::anyhow!("storing NATS messages: {e:?}"))?;
            gatehouse_client::flush_tree(&self.inbox).await?;
            if std::env::var_os("GATEHOUSE_FAULT_CRASH_BEFORE_ACK").is_some() {
                tracing::error!(
                    "GATEHOUSE_FAULT_CRASH_BEFORE_ACK: aborting after the durable write"
                );
                std::process::abort();
            }
            for (idx, seq) in &maxseq {
                if let Some(s) = self.nats_stored(*idx) {
                    s.fetch_max(*seq, std::sync::atomic::Ordering::SeqCst);
                }
            }
            for (idx, bytes) in &counted {
                crate::metrics::received(&self.cfg().routes[*idx].name, "nats", *bytes);
            }
        }
        for msg in keep.iter().chain(&done) {
            if let Err(e) = msg.ack().await {
                // Redelivered later; dropped then by its sequence.
                tracing::debug!(error = %e, "JetStream acknowledgement failed");
            }
        }
        for idx in routes {
            self.slot(idx).work.notify_one();
        }
        Ok(())
    }

    /// Publishes a plugin's `publish` on NATS with the origin header. The oldest open request
    /// of the endpoint gets the answer on its reply subject (or, past its timeout, nothing: a
    /// log line says the answer was late); otherwise it goes where the plugin said. A stream
    /// route publishes to JetStream with `Nats-Msg-Id` (the same on a retry, so the server
    /// keeps one copy). Returns what confirms the publish (the stream's acknowledgement, or
    /// the flush), to be awaited with the pass's others; an answer to a request is confirmed
    /// before this returns (the request is closed once it is), and returns nothing more.
    async fn publish_nats(
        &self,
        route: &Route,
        device: &str,
        p: &gatehouse_host::Publish,
        key: &[u8; 32],
    ) -> Result<Option<nats::Sent>, Carry> {
        let Some(h) = &self.nats else {
            return Err(Carry::Dead(Fault::new(
                "channel",
                "channels.nats is not configured",
            )));
        };
        let mut headers: Vec<(String, String)> = p
            .metadata
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("header.")?.to_string(), v.clone())))
            .collect();
        for (k, v) in &headers {
            if !nats::valid_header_name(k) || !nats::valid_header_value(v) {
                return Err(Carry::Dead(Fault::new(
                    "header",
                    format!("header {k:?} is not a valid NATS header"),
                )));
            }
        }
        headers.push((NATS_ORIGIN.into(), self.bridge_inbox.clone()));
        // Request-reply: answers go to the open requests of this endpoint, oldest first.
        let prefix = Self::endpoint_key(route, device, "");
        let pending = self
            .requests
            .scan_prefix(&prefix)
            .next()
            .and_then(|r| r.ok())
            .and_then(|(k, v)| Some((k, serde_json::from_slice::<PendingRequest>(&v).ok()?)));
        if let Some((k, req)) = pending {
            if now_ms() > req.deadline_ms {
                let _ = self.requests.remove(&k);
                tracing::warn!(route = %route.name, %device, "late reply dropped: the request's timeout had passed");
                return Ok(None);
            }
            h.publish(&req.reply, &headers, p.payload.clone(), None)
                .await
                .map_err(Carry::from)?;
            let _ = self.requests.remove(&k);
            crate::metrics::published(&route.name, "nats", p.payload.len());
            tracing::info!(route = %route.name, %device, "answered a NATS request");
            return Ok(None);
        }
        let msg_id = route.stream.as_ref().map(|_| hex::encode(key));
        h.send(&p.address, &headers, p.payload.clone(), msg_id.as_deref())
            .await
            .map(Some)
            .map_err(Carry::from)
    }

    /// Takes in one received mail: loops, automatic mail and our own mail are answered 250
    /// and dropped (with a log line); unverified senders meet the configured policy; the rest
    /// is stored durably, once per sender and Message-ID, before the client hears 250.
    async fn accept_mail(&self, mail: email::MailIn) -> anyhow::Result<()> {
        let Some(ecfg) = &self.cfg().channels.email else {
            mail.answer(email::Verdict::TryLater("email is not configured".into()));
            return Ok(());
        };
        let peer = mail.peer;
        let Some(parsed) = email::parse(&mail.raw, mail.mail_from.is_empty()) else {
            tracing::warn!(%peer, bytes = mail.raw.len(), "mail refused: not a parseable message");
            mail.answer(email::Verdict::Reject(
                550,
                "5.6.0 Not a parseable message".into(),
            ));
            return Ok(());
        };
        if let Some(why) = &parsed.automatic {
            // Accepted (so nobody bounces a bounce), not a chat message.
            tracing::info!(%why, "automatic mail (auto-reply, bounce, list) not turned into a chat message");
            mail.answer(email::Verdict::Stored);
            return Ok(());
        }
        let Some(from) = parsed.from.clone().filter(|f| f.contains('@')) else {
            tracing::warn!(%peer, "mail refused: no From address");
            mail.answer(email::Verdict::Reject(
                550,
                "5.1.7 The message has no From address".into(),
            ));
            return Ok(());
        };
        let live = self.cfg();
        let found = live.active_routes().find_map(|(i, r)| {
            let rcpt = mail
                .rcpt
                .iter()
                .find(|t| r.is_email() && email::mailbox_matches(&r.subscribe, t))?;
            Some((i, r, rcpt.clone()))
        });
        let Some((idx, route, rcpt)) = found else {
            mail.answer(email::Verdict::Reject(
                550,
                "5.1.1 No such mailbox here".into(),
            ));
            return Ok(());
        };
        if self
            .cfg()
            .active_routes()
            .any(|(_, r)| r.is_email() && email::mailbox_matches(&r.subscribe, &from))
        {
            tracing::info!(route = %route.name, "mail from one of our own mailboxes not taken in (a loop)");
            mail.answer(email::Verdict::Stored);
            return Ok(());
        }
        if parsed.hops >= email::MAX_HOPS {
            tracing::warn!(route = %route.name, hops = parsed.hops, "mail dropped: it went through {} bridges already (a loop)", parsed.hops);
            mail.answer(email::Verdict::Stored);
            return Ok(());
        }
        let meta = MailMeta {
            rcpt: rcpt.clone(),
            mail_from: mail.mail_from.clone(),
            auth: mail.auth.clone(),
        };
        let rec = Queued {
            route: idx,
            device: from.clone(),
            topic: rcpt,
            payload: mail.raw.clone(),
            retain: false,
            qos: 1,
            mail: Some(meta),
            nats: None,
            presence: None,
            mqtt: None,
        };
        if !mail.auth.verified {
            match ecfg.unverified {
                email::Unverified::Accept => {}
                email::Unverified::Reject => {
                    tracing::info!(route = %route.name, results = %mail.auth.summary(), "mail refused: sender not verified (channels.email.unverified: reject)");
                    let summary = mail.auth.summary();
                    mail.answer(email::Verdict::Reject(
                        550,
                        format!("5.7.1 Sender not verified ({summary})"),
                    ));
                    return Ok(());
                }
                email::Unverified::Quarantine => {
                    self.put_dead_letter(serde_json::json!({
                        "direction": "inbound",
                        "route": route.name,
                        "plugin": route.plugin,
                        "device": from,
                        "kind": "unverified",
                        "reason": format!("quarantined: sender not verified ({}); `gatehouse dlq retry` delivers it", mail.auth.summary()),
                        "topic": rec.topic,
                        "bytes": rec.payload.len(),
                        "payload": hex::encode(&rec.payload),
                        "mail": serde_json::to_value(rec.mail.as_ref()).ok(),
                    }));
                    gatehouse_client::flush_tree(&self.dead).await?;
                    mail.answer(email::Verdict::Stored);
                    return Ok(());
                }
            }
        }
        // The same mail again (a client that missed our 250): acknowledged, stored once.
        let seen = {
            use sha2::Digest as _;
            let mut h = sha2::Sha256::new();
            h.update(b"gatehouse/mail\0");
            h.update(from.as_bytes());
            h.update([0]);
            match &parsed.message_id {
                Some(id) => h.update(id.as_bytes()),
                None => h.update(sha2::Sha256::digest(&mail.raw)),
            }
            h.finalize()
        };
        if self.mail_seen.contains_key(seen)? {
            tracing::info!(route = %route.name, "mail already stored (the client sent it again); acknowledged once more");
            mail.answer(email::Verdict::Stored);
            return Ok(());
        }
        if let Err(reason) = self.storage_room() {
            self.set_not_ready(Some(reason.clone()));
            mail.answer(email::Verdict::TryLater(reason));
            return Ok(());
        }
        let id = self.db.generate_id()?;
        // The mail with its seen mark, all or nothing: a crash before the flush could
        // otherwise keep the mail without the mark, and the client's retry (it got no 250)
        // would be stored again.
        let record = serde_json::to_vec(&rec)?;
        {
            use sled::Transactional as _;
            (&self.inbox, &self.mail_seen)
                .transaction(|(inbox, seen_tree)| {
                    inbox.insert(inbox_key(&route.name, id), record.as_slice())?;
                    seen_tree.insert(&seen[..], &id.to_be_bytes())?;
                    Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
                })
                .map_err(|e| anyhow::anyhow!("storing the mail: {e:?}"))?;
        }
        if let Err(e) = gatehouse_client::flush_tree(&self.inbox).await {
            mail.answer(email::Verdict::TryLater("storage failed".into()));
            return Err(e.into());
        }
        if std::env::var_os("GATEHOUSE_FAULT_CRASH_BEFORE_ACK").is_some() {
            tracing::error!("GATEHOUSE_FAULT_CRASH_BEFORE_ACK: aborting after the durable write");
            std::process::abort();
        }
        tracing::info!(route = %route.name, bytes = rec.payload.len(), verified = mail.auth.verified, "mail stored");
        crate::metrics::received(&route.name, "email", rec.payload.len());
        mail.answer(email::Verdict::Stored);
        self.slot(idx).work.notify_one();
        Ok(())
    }

    /// `route ‖ 0 ‖ device ‖ 0 ‖ name`: keys of per-endpoint records (mail threads, NATS
    /// requests, presence, retained state).
    fn endpoint_key(route: &Route, device: &str, name: &str) -> Vec<u8> {
        let mut k = route.name.as_bytes().to_vec();
        k.push(0);
        k.extend_from_slice(device.as_bytes());
        k.push(0);
        k.extend_from_slice(name.as_bytes());
        k
    }

    fn load_thread(&self, route: &Route, device: &str, thread: &str) -> MailThread {
        self.mail_threads
            .get(Self::endpoint_key(route, device, thread))
            .ok()
            .flatten()
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default()
    }

    /// Records that `message_id` belongs to `thread` (a reply naming it joins the thread).
    fn note_mail_id(&self, route: &Route, device: &str, message_id: &str, thread: &str) {
        let _ = self.mail_ids.insert(
            Self::endpoint_key(route, device, message_id),
            thread.as_bytes(),
        );
    }

    /// The plugin's view of a stored mail, and its thread: the thread of the newest message
    /// it answers that we know (In-Reply-To, then References newest first), else a new thread
    /// named by its own Message-ID. The thread's record is updated for the way back. Returns
    /// the thread's key and subject.
    fn mail_message(
        &self,
        route: &Route,
        queue_id: u64,
        rec: &Queued,
        meta: &MailMeta,
        idempotency_key: &str,
    ) -> Result<(Message, (String, String)), Failure> {
        let parsed = email::parse(&rec.payload, meta.mail_from.is_empty()).ok_or_else(|| {
            Failure::Permanent(Fault::new("malformed", "the stored mail no longer parses"))
        })?;
        let device = &rec.device;
        let known = parsed
            .in_reply_to
            .iter()
            .rev()
            .chain(parsed.references.iter().rev())
            .find_map(|id| {
                self.mail_ids
                    .get(Self::endpoint_key(route, device, id))
                    .ok()
                    .flatten()
                    .map(|v| String::from_utf8_lossy(&v).into_owned())
            });
        let reply = known.is_some();
        let own_id = parsed
            .message_id
            .clone()
            .unwrap_or_else(|| format!("queue-{queue_id}@gatehouse"));
        let key = known.unwrap_or_else(|| own_id.clone());
        self.note_mail_id(route, device, &own_id, &key);
        let mut thread = self.load_thread(route, device, &key);
        if thread.subject.is_empty() {
            thread.subject = parsed.subject.clone().unwrap_or_default();
        }
        thread.mailbox = meta.rcpt.clone();
        thread.references = parsed.references.clone();
        thread.references.retain(|r| *r != own_id);
        thread.last_id = Some(own_id);
        let excess = thread.references.len().saturating_sub(MAIL_REFERENCES);
        thread.references.drain(..excess);
        thread.hops = parsed.hops;
        if let Ok(v) = serde_json::to_vec(&thread) {
            let _ = self
                .mail_threads
                .insert(Self::endpoint_key(route, device, &key), v);
        }
        let mut metadata = vec![
            (
                "subject".to_string(),
                parsed.subject.clone().unwrap_or_default(),
            ),
            ("from".into(), rec.device.clone()),
            ("mailbox".into(), meta.rcpt.clone()),
            ("auth".into(), meta.auth.summary()),
            ("verified".into(), meta.auth.verified.to_string()),
            ("reply".into(), reply.to_string()),
            ("thread".into(), key.clone()),
            ("attachments".into(), parsed.attachments.len().to_string()),
        ];
        if let Some(n) = &parsed.from_name {
            metadata.push(("from_name".into(), n.clone()));
        }
        if let Some(id) = &parsed.message_id {
            metadata.push(("message_id".into(), id.clone()));
        }
        let msg = Message {
            payload: parsed.text.into_bytes(),
            content_type: "text/plain".into(),
            metadata,
            endpoint: rec.device.clone(),
            conversation: None,
            sender: Some(rec.device.clone()),
            verified: meta.auth.verified,
            idempotency_key: idempotency_key.to_string(),
        };
        Ok((msg, (key, thread.subject)))
    }

    /// The mail thread a conversation carries, if it carries one.
    fn thread_of_conversation(
        &self,
        route: &Route,
        device: &str,
        conversation: &str,
    ) -> Option<String> {
        self.mail_gids
            .get(Self::endpoint_key(route, device, conversation))
            .ok()
            .flatten()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    /// Sends a plugin's `publish` on the email channel: a reply in the thread the
    /// conversation carries, or (a conversation without one, such as the agent's DM with the
    /// endpoint) the start of a new thread that later replies bring back to it. The
    /// Message-ID is derived from `key`, so a retry sends the same one.
    async fn publish_email(
        &self,
        route: &Route,
        device: &str,
        conversation: Option<&str>,
        p: &gatehouse_host::Publish,
        key: &[u8; 32],
    ) -> Result<(), Carry> {
        let (Some(ecfg), Some(relay)) = (&self.cfg().channels.email, &self.relay) else {
            return Err(Carry::Dead(Fault::new(
                "channel",
                "no outbound relay: set channels.email.relay to send mail",
            )));
        };
        let token = conversation.map(|c| &c[..c.len().min(16)]).unwrap_or("0");
        let message_id = format!("gh.{token}.{}@{}", hex::encode(&key[..12]), ecfg.hostname);
        let existing = conversation.and_then(|c| self.thread_of_conversation(route, device, c));
        let thread_key = existing.clone().unwrap_or_else(|| message_id.clone());
        let thread = match &existing {
            Some(k) => self.load_thread(route, device, k),
            None => MailThread::default(),
        };
        let from = if thread.mailbox.is_empty() {
            // A new thread from the agent: from the route's mailbox (its domain's `noreply@`
            // for a `*@domain` route).
            route.subscribe.replace("*@", "noreply@")
        } else {
            thread.mailbox.clone()
        };
        let subject = p
            .metadata
            .iter()
            .find(|(k, _)| k == "subject")
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| format!("Re: {}", thread.subject));
        let text = String::from_utf8(p.payload.clone())
            .map_err(|_| Carry::Dead(Fault::new("content", "mail text must be UTF-8")))?;
        let mut references = thread.references.clone();
        references.extend(thread.last_id.clone());
        let out = email::OutMail {
            from: from.clone(),
            from_name: None,
            to: p.address.clone(),
            subject: subject.clone(),
            text,
            message_id: message_id.clone(),
            in_reply_to: thread.last_id.clone(),
            references,
            hops: thread.hops,
        };
        // Known before it leaves: a fast answer must find its thread.
        self.note_mail_id(route, device, &message_id, &thread_key);
        if existing.is_none() {
            if let Some(c) = conversation {
                let _ = self
                    .mail_gids
                    .insert(Self::endpoint_key(route, device, c), thread_key.as_bytes());
                if let Ok(gid) = hex::decode(c) {
                    let _ = self
                        .mail_convs
                        .insert(Self::endpoint_key(route, device, &thread_key), gid);
                }
            }
            let new = MailThread {
                subject: subject.trim_start_matches("Re: ").to_string(),
                mailbox: from,
                last_id: None,
                references: Vec::new(),
                hops: 0,
            };
            if let Ok(v) = serde_json::to_vec(&new) {
                let _ = self
                    .mail_threads
                    .insert(Self::endpoint_key(route, device, &thread_key), v);
            }
        }
        let _ = gatehouse_client::flush_tree(&self.mail_ids).await;
        relay.send(&out).await.map_err(|e| match e {
            email::SendError::Permanent(r) => Carry::Dead(Fault::new("relay", r)),
            email::SendError::Transient(r) => Carry::Later(r),
        })
    }

    /// Calls a route's plugin under its limits and accounts for the outcome.
    async fn run_plugin(
        &self,
        route: &Route,
        msg: Message,
        external: bool,
    ) -> Result<Vec<Action>, PluginOutcome> {
        let plugin = self.plugin_for(route)?;
        self.stats(&route.plugin, |s| s.calls += 1);
        let started = std::time::Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            if external {
                plugin.on_external(&msg)
            } else {
                plugin.on_conversation(&msg)
            }
        })
        .await
        .unwrap_or_else(|e| Err(PluginError::Trap(format!("plugin task failed: {e}"))));
        self.plugin_outcome(route, result, started.elapsed())
    }

    /// Maps several messages of a route (`external`: from devices; else conversation messages),
    /// in order, on one blocking thread: a hand-off to the blocking pool per message cost more
    /// than the call itself (≈ 200 µs of waiting for a thread on a busy machine against ≈ 4 µs
    /// of mapping). Each call has its own limits and outcome, as in [`Bridge::run_plugin`]; the
    /// calls stop after the first that did not map, so the results may be fewer than the
    /// messages (map the rest one by one: that sees a quarantine the failure caused). Empty
    /// when the plugin is quarantined or not loaded. A message whose carrying must wait after
    /// its batch was mapped is mapped again when it is retried (its publishes keep their keys).
    async fn run_plugin_batch(
        &self,
        route: &Route,
        msgs: Vec<Message>,
        external: bool,
    ) -> Vec<Result<Vec<Action>, PluginOutcome>> {
        if msgs.is_empty() {
            return Vec::new();
        }
        let Ok(plugin) = self.plugin_for(route) else {
            return Vec::new();
        };
        let results = tokio::task::spawn_blocking(move || {
            let mut out = Vec::with_capacity(msgs.len());
            for msg in &msgs {
                let started = std::time::Instant::now();
                let result = if external {
                    plugin.on_external(msg)
                } else {
                    plugin.on_conversation(msg)
                };
                let stop = result.is_err();
                out.push((result, started.elapsed()));
                if stop {
                    break;
                }
            }
            out
        })
        .await
        .unwrap_or_default();
        self.stats(&route.plugin, |s| s.calls += results.len() as u64);
        let mut out = Vec::with_capacity(results.len());
        for (result, call) in results {
            let outcome = self.plugin_outcome(route, result, call);
            let failed = outcome.is_err();
            out.push(outcome);
            if failed {
                break;
            }
        }
        out
    }

    /// The route's plugin, unless it is quarantined or not loaded.
    fn plugin_for(&self, route: &Route) -> Result<Plugin, PluginOutcome> {
        let name = &route.plugin;
        if self.stats(name, |s| s.quarantined) {
            return Err(PluginOutcome::Quarantined(name.clone()));
        }
        self.plugins
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .map(|l| l.plugin.clone())
            .ok_or_else(|| {
                PluginOutcome::Failed(Fault::new("config", format!("plugin {name} not loaded")))
            })
    }

    /// Accounts for one plugin call that took `call`: metrics, limits, faults (and with them
    /// quarantine), and what it means for the message.
    fn plugin_outcome(
        &self,
        route: &Route,
        result: Result<Vec<Action>, PluginError>,
        call: Duration,
    ) -> Result<Vec<Action>, PluginOutcome> {
        let name = route.plugin.clone();
        let faulted = match &result {
            Ok(actions) => {
                crate::grants::check_limits(&self.cfg().plugins[&name], actions).is_err()
            }
            Err(PluginError::Refused { .. }) => false,
            Err(_) => true,
        };
        crate::metrics::plugin_call(&name, call.as_secs_f64(), faulted);
        let fault = |kind, reason: String| Fault {
            kind,
            reason,
            call: Some(call),
        };
        match result {
            Ok(actions) => {
                match crate::grants::check_limits(&self.cfg().plugins[&name], &actions) {
                    Ok(()) => Ok(actions),
                    Err(reason) => {
                        self.fault(&name, &reason, actions.len() as u64);
                        Err(PluginOutcome::Failed(fault("limits", reason)))
                    }
                }
            }
            // The plugin refused the input (e.g. malformed): the message is bad, not the plugin.
            Err(e @ PluginError::Refused { .. }) => {
                self.stats(&name, |s| s.dead_letters += 1);
                Err(PluginOutcome::Failed(fault("refused", e.to_string())))
            }
            Err(e) => {
                let reason = e.to_string();
                tracing::warn!(plugin = %name, route = %route.name, kind = e.kind(), call_ms = call.as_millis() as u64, error = %reason, "plugin fault");
                self.fault(&name, &reason, 0);
                Err(PluginOutcome::Failed(fault(e.kind(), reason)))
            }
        }
    }

    fn stats<T>(&self, name: &str, f: impl FnOnce(&mut crate::grants::PluginStats) -> T) -> T {
        let mut all = self.plugin_stats.lock().unwrap_or_else(|p| p.into_inner());
        f(all.entry(name.to_string()).or_default())
    }

    /// Counts a fault (and refused actions); quarantines the plugin past its threshold.
    fn fault(&self, name: &str, reason: &str, refused: u64) {
        let cfg = &self.cfg().plugins[name];
        let quarantined = self.stats(name, |s| {
            s.refused_actions += refused;
            s.dead_letters += 1;
            s.fault(reason, cfg, std::time::Instant::now())
        });
        if quarantined {
            tracing::error!(plugin = %name, %reason, "plugin quarantined after repeated faults: its routes hold their messages (or pass them unmapped where fail_open) until `gatehouse plugins reload {name}`");
        }
    }

    /// Plugin states for the admin API.
    pub fn plugins(&self) -> serde_json::Value {
        let versions: BTreeMap<String, String> = self
            .plugins
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, l)| (k.clone(), l.sha256.clone()))
            .collect();
        let all = self.plugin_stats.lock().unwrap_or_else(|p| p.into_inner());
        let list: Vec<serde_json::Value> = self
            .cfg()
            .plugins
            .iter()
            .map(|(name, p)| {
                let mut v =
                    serde_json::to_value(all.get(name).map(|s| s as &crate::grants::PluginStats))
                        .unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("name".into(), name.clone().into());
                    o.insert(
                        "source".into(),
                        match (&p.builtin, &p.path) {
                            (Some(b), _) => format!("builtin:{b}"),
                            (None, Some(path)) => path.display().to_string(),
                            (None, None) => String::new(),
                        }
                        .into(),
                    );
                    o.insert("watch".into(), (p.watch && p.path.is_some()).into());
                    o.insert("sha256".into(), versions.get(name).cloned().into());
                    o.insert("deadline_ms".into(), p.deadline_ms.into());
                    o.insert("memory_mb".into(), p.memory_mb.into());
                    o.insert("max_actions".into(), p.max_actions.into());
                    o.insert(
                        "content_types".into(),
                        p.grants.content_types.clone().into(),
                    );
                }
                v
            })
            .collect();
        serde_json::Value::Array(list)
    }

    /// Processes route `idx`'s queued inbound messages in order. Returns false when it
    /// should retry later.
    async fn drain(&self, idx: usize) -> bool {
        let live = self.cfg();
        let route = &live.routes[idx];
        if route.retired {
            // Dropped by a reload: what it still holds is dead-lettered once its worker stops.
            return true;
        }
        let prefix = inbox_prefix(&route.name);
        loop {
            // A prefix of the queue: at most DELIVER_BATCH records and DELIVER_BATCH_BYTES
            // (at least one), ending after the record that gives one endpoint
            // DELIVER_PER_ENDPOINT.
            let (mut scanned, mut bytes) = (0usize, 0usize);
            let mut per_endpoint: HashMap<String, usize> = HashMap::new();
            let mut records = Vec::new();
            let mut corrupt = Vec::new();
            for (key, value) in self.inbox.scan_prefix(&prefix).filter_map(|r| r.ok()) {
                if scanned > 0
                    && (scanned >= DELIVER_BATCH || bytes + value.len() > DELIVER_BATCH_BYTES)
                {
                    break;
                }
                scanned += 1;
                bytes += value.len();
                let id = key
                    .len()
                    .checked_sub(8)
                    .and_then(|at| key[at..].try_into().ok())
                    .map_or(0, u64::from_be_bytes);
                match serde_json::from_slice::<Queued>(&value) {
                    Ok(rec) => {
                        let n = match per_endpoint.get_mut(rec.device.as_str()) {
                            Some(n) => n,
                            None => per_endpoint.entry(rec.device.clone()).or_default(),
                        };
                        *n += 1;
                        let full = *n >= DELIVER_PER_ENDPOINT;
                        records.push((key, id, rec));
                        if full {
                            break;
                        }
                    }
                    Err(e) => corrupt.push((key, value, e)),
                }
            }
            if scanned == 0 {
                self.set_stalled(idx, None);
                return true;
            }
            for (key, value, e) in corrupt {
                self.dead_letter_corrupt(&key, &value, route, &e);
            }
            // Map each record (in order) until one has to wait; then carry what was mapped.
            let mut ready: Vec<(sled::IVec, String, Vec<Outgoing>)> = Vec::new();
            let mut stop = None;
            // The leading device messages (not presence, not mail) are mapped together.
            let plain = records
                .iter()
                .take_while(|(_, _, r)| r.presence.is_none() && r.mail.is_none())
                .map(|(_, id, r)| device_message(r, &inbound_key(*id)))
                .collect();
            let mut mapped = self.run_plugin_batch(route, plain, true).await.into_iter();
            for (key, id, rec) in records {
                match self.prepare(idx, id, &rec, mapped.next()).await {
                    Ok(out) => ready.push((key, rec.device, out)),
                    Err(Failure::Permanent(fault)) => {
                        self.dead_letter_inbound(&key, route, Some(&rec), fault)
                    }
                    Err(other) => {
                        stop = Some((id, other));
                        break;
                    }
                }
            }
            if !ready.is_empty()
                && std::env::var_os("GATEHOUSE_FAULT_CRASH_BEFORE_DELIVER").is_some()
            {
                // Fault injection for the crash tests: die after mapping, before delivering.
                tracing::error!("GATEHOUSE_FAULT_CRASH_BEFORE_DELIVER: aborting before delivering");
                std::process::abort();
            }
            if let Err(f) = self.send_prepared(idx, &ready).await {
                stop = Some((0, f));
            } else {
                // Delivered: off the queue one record at a time, in order. All or nothing is
                // not needed (a record a crash leaves is sent again, and receivers drop the
                // duplicate), and a sled batch would seal the log first (see
                // `gatehouse_store::Writes`): at moderate rates, a disk write per pass.
                let removed = ready
                    .iter()
                    .try_for_each(|(key, _, _)| self.inbox.remove(key).map(drop));
                if let Err(e) = removed {
                    tracing::error!(route = %route.name, error = %e, "could not mark messages delivered; they will be sent again (receivers drop the duplicates)");
                } else if !ready.is_empty() {
                    crate::metrics::delivered(&route.name, &route.channel, ready.len());
                    self.set_stalled(idx, None);
                }
            }
            match stop {
                None => {}
                Some((id, Failure::Transient(reason))) => {
                    tracing::warn!(route = %route.name, queue_id = id, %reason, "delivery failed; will retry");
                    crate::metrics::retry(&route.name, "inbound");
                    self.set_stalled(idx, Some(reason));
                    return false;
                }
                Some((id, Failure::Held(reason))) => {
                    tracing::debug!(route = %route.name, queue_id = id, %reason, "held in the queue");
                    return false;
                }
                Some((id, Failure::Permanent(fault))) => {
                    // Only from sending (a peer refused): retried like a transient failure.
                    tracing::warn!(route = %route.name, queue_id = id, error = %fault.reason, "delivery failed; will retry");
                    crate::metrics::retry(&route.name, "inbound");
                    self.set_stalled(idx, Some(fault.reason));
                    return false;
                }
            }
        }
    }

    /// Stores a dead-letter record (local store only; nothing of its content is logged).
    /// Stores a dead letter (and logs it); false if the store refused it.
    fn put_dead_letter(&self, mut rec: serde_json::Value) -> bool {
        let Ok(id) = self.db.generate_id() else {
            return false;
        };
        rec["id"] = id.into();
        rec["at_ms"] = now_ms().into();
        tracing::warn!(
            dead_letter = id,
            direction = rec["direction"].as_str().unwrap_or(""),
            route = rec["route"].as_str().unwrap_or(""),
            kind = rec["kind"].as_str().unwrap_or(""),
            reason = rec["reason"].as_str().unwrap_or(""),
            "message dead-lettered"
        );
        crate::metrics::dead_letter(
            rec["route"].as_str().unwrap_or(""),
            rec["direction"].as_str().unwrap_or(""),
        );
        self.dead
            .insert(
                id.to_be_bytes(),
                serde_json::to_vec(&rec).unwrap_or_default(),
            )
            .is_ok()
    }

    /// Keeps a conversation message that could not go out, with the reason.
    fn dead_letter_outbound(
        &self,
        r: &gatehouse_client::Received,
        route: &Route,
        device: &str,
        fault: Fault,
    ) {
        self.put_dead_letter(serde_json::json!({
            "direction": "outbound",
            "route": route.name,
            "plugin": route.plugin,
            "device": device,
            "kind": fault.kind,
            "reason": fault.reason,
            "call_ms": fault.call.map(|c| c.as_millis() as u64),
            "conversation": r.conversation,
            "node_id": r.id,
            "message_id": r.message_id,
            "idempotency_key": r.idempotency_key,
            "sender_inbox": r.sender_inbox,
            "content_type": r.content_type,
            "bytes": r.content.len(),
            "content": hex::encode(&r.content),
        }));
    }

    /// Moves a queued inbound message to the dead-letter store, with the reason.
    fn dead_letter_inbound(&self, key: &[u8], route: &Route, rec: Option<&Queued>, fault: Fault) {
        self.put_dead_letter(serde_json::json!({
            "direction": "inbound",
            "route": route.name,
            "plugin": route.plugin,
            "device": rec.map(|r| r.device.as_str()),
            "kind": fault.kind,
            "reason": fault.reason,
            "call_ms": fault.call.map(|c| c.as_millis() as u64),
            "topic": rec.map(|r| r.topic.as_str()),
            "bytes": rec.map(|r| r.payload.len()),
            "payload": rec.map(|r| hex::encode(&r.payload)),
            "mail": rec.and_then(|r| r.mail.as_ref()).and_then(|m| serde_json::to_value(m).ok()),
            "nats": rec.and_then(|r| r.nats.as_ref()).and_then(|m| serde_json::to_value(m).ok()),
            "mqtt": rec.and_then(|r| r.mqtt.as_ref()).and_then(|m| serde_json::to_value(m).ok()),
        }));
        let _ = self.inbox.remove(key);
    }

    /// Sets aside a queue record that no longer parses (a damaged disk, a hand edit): the raw
    /// bytes are kept as the dead letter's payload. The reason gives only where parsing
    /// failed, since serde's message can quote the record's content.
    fn dead_letter_corrupt(&self, key: &[u8], raw: &[u8], route: &Route, e: &serde_json::Error) {
        let stored = self.put_dead_letter(serde_json::json!({
            "direction": "inbound",
            "route": route.name,
            "plugin": route.plugin,
            "kind": "corrupt",
            "reason": format!(
                "corrupt queue record ({}); kept as it was stored",
                gatehouse_client::unreadable(e)
            ),
            "bytes": raw.len(),
            "payload": hex::encode(raw),
        }));
        if stored {
            let _ = self.inbox.remove(key);
        }
    }

    /// Dead-letters the message records of `ep` (owed answers, held requests) its client set
    /// aside as unreadable (see [`Client::set_aside_records`]), each dropped from the
    /// endpoint's store once its dead letter is written.
    fn dead_letter_set_aside(
        &self,
        route: &Route,
        ep: &Endpoint,
        client: &Client,
    ) -> anyhow::Result<()> {
        for aside in client.set_aside_records()? {
            let stored = self.put_dead_letter(serde_json::json!({
                "direction": "outbound",
                "route": route.name,
                "plugin": route.plugin,
                "device": ep.device,
                "kind": "corrupt",
                "reason": format!(
                    "corrupt {} ({}); kept as it was stored",
                    aside.what(),
                    aside.problem
                ),
                "bytes": aside.bytes.len(),
                "payload": hex::encode(&aside.bytes),
            }));
            if stored {
                client.forget_set_aside(&aside)?;
            }
        }
        Ok(())
    }

    /// The newest dead letters (at most [`DEAD_LETTER_PAGE`]), oldest first; payloads only
    /// when `payloads` is set. `route` filters by route name.
    pub fn dead_letters(&self, route: Option<&str>, payloads: bool) -> serde_json::Value {
        let mut out: Vec<serde_json::Value> = self
            .dead
            .iter()
            .rev()
            .filter_map(|r| r.ok())
            .filter_map(|(_, v)| serde_json::from_slice::<serde_json::Value>(&v).ok())
            .filter(|v| route.is_none_or(|r| v["route"] == r))
            .take(DEAD_LETTER_PAGE)
            .map(|mut v| {
                if !payloads && let Some(o) = v.as_object_mut() {
                    o.remove("payload");
                    o.remove("content");
                }
                v
            })
            .collect();
        out.reverse();
        serde_json::Value::Array(out)
    }

    /// Runs a queued device message through its plugin: checks the actions against the grants,
    /// carries out its publishes, and returns the conversation messages to send (with their
    /// idempotency keys, stable across retries: the queue id and the action's position).
    ///
    /// `mapped` is the plugin's outcome when it was already called for this record (a batch
    /// of device messages is mapped on one blocking thread, `run_plugin_batch`).
    async fn prepare(
        &self,
        idx: usize,
        id: u64,
        rec: &Queued,
        mapped: Option<Result<Vec<Action>, PluginOutcome>>,
    ) -> Result<Vec<Outgoing>, Failure> {
        let live = self.cfg();
        let route = &live.routes[idx];
        let idempotency_key = inbound_key(id);
        if let Some(online) = rec.presence {
            return self
                .prepare_presence(route, idx, rec, online, &idempotency_key)
                .await;
        }
        let mut thread = None;
        let msg = match &rec.mail {
            Some(meta) => {
                let (m, t) = self.mail_message(route, id, rec, meta, &idempotency_key)?;
                thread = Some(t);
                m
            }
            None => device_message(rec, &idempotency_key),
        };
        let mapped = match mapped {
            Some(m) => m,
            None => self.run_plugin(route, msg, true).await,
        };
        let actions = match mapped {
            Ok(a) => a,
            Err(PluginOutcome::Quarantined(name)) if route.fail_open => {
                vec![passthrough_inbound(&rec.payload).map_err(|reason| {
                    Failure::Permanent(Fault::new(
                        "quarantined",
                        format!(
                            "plugin {name} is quarantined and the route fails open, but {reason}"
                        ),
                    ))
                })?]
            }
            Err(PluginOutcome::Quarantined(name)) => {
                return Err(Failure::Held(format!("plugin {name} is quarantined")));
            }
            Err(PluginOutcome::Failed(fault)) => {
                tracing::warn!(route = %route.name, device = %rec.device, topic = %rec.topic, kind = fault.kind, error = %fault.reason, "rejected by plugin");
                return Err(Failure::Permanent(fault));
            }
        };
        // Every action is checked against the grants before any is carried out, so a message
        // is delivered whole or dead-lettered whole.
        for action in &actions {
            if let Action::Publish(p) = action
                && let Err(reason) = crate::grants::check_publish(
                    &self.cfg().plugins[&route.plugin],
                    route,
                    &rec.device,
                    &p.channel,
                    &p.address,
                    None,
                )
            {
                tracing::warn!(route = %route.name, plugin = %route.plugin, %reason, "refused an action outside the plugin's grants");
                self.fault(&route.plugin, &reason, 1);
                return Err(Failure::Permanent(Fault::new("grants", reason)));
            }
            if let Action::Send(s) = action {
                if let Err(reason) =
                    crate::grants::check_send(&self.cfg().plugins[&route.plugin], &s.content_type)
                {
                    tracing::warn!(route = %route.name, plugin = %route.plugin, %reason, "refused an action outside the plugin's grants");
                    self.fault(&route.plugin, &reason, 1);
                    return Err(Failure::Permanent(Fault::new("grants", reason)));
                }
                content::parse_type(&s.content_type).map_err(|e| {
                    Failure::Permanent(Fault::new("content", format!("plugin sent {e}")))
                })?;
            }
        }
        let endpoint = self
            .endpoint(idx, &rec.device)
            .map_err(|e| Failure::Transient(format!("{e:#}")))?;
        let mut out = Vec::new();
        for (n, action) in actions.into_iter().enumerate() {
            match action {
                Action::Send(s) => {
                    let t = content::parse_type(&s.content_type).map_err(|e| {
                        Failure::Permanent(Fault::new("content", format!("plugin sent {e}")))
                    })?;
                    let mut c = if s.content_type.starts_with("xmtp.org/text:") {
                        content::text(&String::from_utf8_lossy(&s.payload))
                    } else {
                        content::with_fallback(t, s.payload.clone(), s.fallback.clone())
                    };
                    self.attest(&mut c, &endpoint, route, rec).await?;
                    out.push(Outgoing {
                        content: c,
                        key: format!("{idempotency_key}-{n}"),
                        thread: thread.clone(),
                    });
                }
                // Within the grants (checked above): for example an acknowledgement to the
                // device on its reply topic.
                Action::Publish(p) if p.channel == "nats" => {
                    let key = publish_key(&idempotency_key, n, &p.address);
                    let confirmed = match self.publish_nats(route, &rec.device, &p, &key).await {
                        Ok(Some(sent)) => {
                            sent.confirmed().await.map(|()| true).map_err(Carry::from)
                        }
                        other => other.map(|_| false),
                    };
                    let confirmed = confirmed.map_err(|c| match c {
                        Carry::Dead(f) => Failure::Permanent(f),
                        Carry::Later(r) => Failure::Transient(r),
                    })?;
                    if confirmed {
                        crate::metrics::published(&route.name, "nats", p.payload.len());
                    }
                    tracing::info!(route = %route.name, device = %rec.device, subject = %p.address, "published by plugin");
                }
                Action::Publish(p) if p.channel == "email" => {
                    let key = publish_key(&idempotency_key, n, &p.address);
                    self.publish_email(route, &rec.device, None, &p, &key)
                        .await
                        .map_err(|c| match c {
                            Carry::Dead(f) => Failure::Permanent(f),
                            Carry::Later(r) => Failure::Transient(r),
                        })?;
                    tracing::info!(route = %route.name, device = %rec.device, "mail sent by plugin");
                }
                Action::Publish(p) => {
                    if let Some(m) = &self.mqtt {
                        // Not awaited: the record stays queued until its sends are done, and
                        // is mapped (and this published) again after a crash before that.
                        let key = publish_key(&idempotency_key, n, &p.address);
                        let _ack = self
                            .publish_out(
                                m,
                                &p.address,
                                p.payload,
                                Some(mqtt_properties(&p.metadata)),
                                key,
                            )
                            .await
                            .map_err(|e| {
                                Failure::Transient(format!("publishing to {}: {e:#}", p.address))
                            })?;
                        tracing::info!(route = %route.name, device = %rec.device, topic = %p.address, "published by plugin");
                    }
                }
                Action::Drop(reason) => {
                    tracing::info!(route = %route.name, device = %rec.device, %reason, "dropped by plugin")
                }
            }
        }
        // A mail's attachments (and, if asked, its HTML) follow the plugin's text as XMTP
        // attachments, within the size cap.
        if let (Some(meta), Some(ecfg), false) =
            (&rec.mail, &self.cfg().channels.email, out.is_empty())
        {
            let parsed = email::parse(&rec.payload, meta.mail_from.is_empty()).unwrap_or_default();
            let mut files: Vec<(String, String, Vec<u8>)> = parsed
                .attachments
                .into_iter()
                .enumerate()
                .map(|(i, a)| {
                    let name = a.name.unwrap_or_else(|| format!("attachment-{}", i + 1));
                    (name, a.content_type, a.bytes)
                })
                .collect();
            if ecfg.keep_html
                && let Some(html) = parsed.html
            {
                files.push(("message.html".into(), "text/html".into(), html.into_bytes()));
            }
            for (i, (name, mime, bytes)) in files.into_iter().enumerate() {
                if bytes.len() > ecfg.max_attachment_bytes {
                    tracing::warn!(route = %route.name, device = %rec.device, attachment = %name, bytes = bytes.len(), limit = ecfg.max_attachment_bytes, "attachment not carried: over channels.email.max_attachment_bytes");
                    continue;
                }
                let mut c = content::attachment(&name, &mime, bytes);
                self.attest(&mut c, &endpoint, route, rec).await?;
                out.push(Outgoing {
                    content: c,
                    key: format!("{idempotency_key}-file{i}"),
                    thread: thread.clone(),
                });
            }
        }
        Ok(out)
    }

    /// A presence change becomes a `gatehouse.dev/presence:1.0` message (no plugin: the bridge
    /// itself vouches for it); a repeat of the endpoint's last state is dropped.
    async fn prepare_presence(
        &self,
        route: &Route,
        idx: usize,
        rec: &Queued,
        online: bool,
        idempotency_key: &str,
    ) -> Result<Vec<Outgoing>, Failure> {
        let key = Self::endpoint_key(route, &rec.device, "presence");
        let state: &[u8] = if online { b"online" } else { b"offline" };
        let last = self
            .presence
            .get(&key)
            .map_err(|e| Failure::Transient(format!("the bridge store: {e}")))?;
        if last.as_deref() == Some(state) {
            tracing::debug!(route = %route.name, device = %rec.device, "presence unchanged; not repeated");
            return Ok(Vec::new());
        }
        let _ = self.presence.insert(&key, state);
        let endpoint = self
            .endpoint(idx, &rec.device)
            .map_err(|e| Failure::Transient(format!("{e:#}")))?;
        let mut c = content::presence(&rec.device, online);
        self.attest(&mut c, &endpoint, route, rec).await?;
        tracing::info!(route = %route.name, device = %rec.device, online, "presence");
        Ok(vec![Outgoing {
            content: c,
            key: format!("{idempotency_key}-presence"),
            thread: None,
        }])
    }

    /// Signs the bridge's attestation of where `c` comes from into its parameters.
    async fn attest(
        &self,
        c: &mut gatehouse_wire::message_contents::EncodedContent,
        endpoint: &Endpoint,
        route: &Route,
        rec: &Queued,
    ) -> Result<(), Failure> {
        self.ensure_bridge_registered().await?;
        let attestation = gatehouse_protocol::attestation::EndpointAttestation {
            bridge: self.bridge_inbox.clone(),
            endpoint: endpoint.inbox_id.clone(),
            channel: route.channel.clone(),
            address: route.endpoint_address(&rec.device),
            sender_auth: rec
                .mail
                .as_ref()
                .map(|m| gatehouse_protocol::attestation::SenderAuth {
                    results: m.auth.summary(),
                    verified: m.auth.verified,
                }),
        };
        let signed = {
            let mut cache = self.attestations.lock().unwrap_or_else(|p| p.into_inner());
            match cache.get(&attestation) {
                Some(s) => s.clone(),
                None => {
                    let s = attestation.sign(&self.bridge_key);
                    if cache.len() >= ATTESTATION_CACHE {
                        cache.clear();
                    }
                    cache.insert(attestation, s.clone());
                    s
                }
            }
        };
        c.parameters
            .insert(gatehouse_protocol::attestation::PARAMETER.into(), signed);
        Ok(())
    }

    /// Sends mapped device messages to each agent's DM with their endpoints: per endpoint and
    /// agent one batch (in queue order), one MLS write and one publish.
    async fn send_prepared(
        &self,
        idx: usize,
        ready: &[(sled::IVec, String, Vec<Outgoing>)],
    ) -> Result<(), Failure> {
        let live = self.cfg();
        let route = &live.routes[idx];
        // Devices in order of first appearance; each device's messages in queue order.
        let mut devices: Vec<(&str, Vec<&Outgoing>)> = Vec::new();
        let mut at: HashMap<&str, usize> = HashMap::new();
        for (_, device, out) in ready {
            if out.is_empty() {
                continue;
            }
            match at.get(device.as_str()) {
                Some(&i) => devices[i].1.extend(out.iter()),
                None => {
                    at.insert(device, devices.len());
                    devices.push((device, out.iter().collect()));
                }
            }
        }
        if !devices.is_empty() && route.agents.is_empty() {
            tracing::warn!(route = %route.name, "route has no agents: message not delivered to anyone");
        }
        // Endpoints in parallel (each has its own client and conversations; order is kept
        // within each): their MLS writes and node round trips overlap.
        use futures::StreamExt as _;
        type Sending<'a> =
            std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Failure>> + Send + 'a>>;
        let mut sends: Vec<Sending<'_>> = Vec::with_capacity(devices.len());
        for (device, items) in devices {
            sends.push(Box::pin(self.send_to_device(idx, device, items)));
        }
        let results: Vec<Result<(), Failure>> = futures::stream::iter(sends)
            .buffer_unordered(SEND_PARALLEL)
            .collect()
            .await;
        self.trim_open();
        results.into_iter().collect::<Result<Vec<()>, Failure>>()?;
        Ok(())
    }

    /// One endpoint's share of a delivery batch, in queue order: its mail threads, then the
    /// DM with each of the route's agents.
    async fn send_to_device(
        &self,
        idx: usize,
        device: &str,
        items: Vec<&Outgoing>,
    ) -> Result<(), Failure> {
        let endpoint = self
            .endpoint(idx, device)
            .map_err(|e| Failure::Transient(format!("{e:#}")))?;
        let mut client = self
            .client(&endpoint)
            .await
            .map_err(|e| Failure::Transient(format!("{e:#}")))?;
        let sent = self
            .send_as_endpoint(idx, device, &endpoint, &mut client, items)
            .await;
        drop(client);
        // Conversations it started are watched from now on.
        self.note_topology(&endpoint);
        sent
    }

    async fn send_as_endpoint(
        &self,
        idx: usize,
        device: &str,
        endpoint: &Endpoint,
        client: &mut Client,
        items: Vec<&Outgoing>,
    ) -> Result<(), Failure> {
        let live = self.cfg();
        let route = &live.routes[idx];
        self.ensure_registered(endpoint, client).await?;
        // Mail threads: each thread is a conversation of its own (a group of the endpoint
        // and the route's agents), created with the thread's first message.
        let mut threads: Vec<(&str, &str, Vec<&Outgoing>)> = Vec::new();
        for o in items.iter().filter(|o| o.thread.is_some()) {
            let (key, subject) = o
                .thread
                .as_ref()
                .map(|(k, s)| (k.as_str(), s.as_str()))
                .unwrap_or_default();
            match threads.iter_mut().find(|(k, _, _)| *k == key) {
                Some((_, _, list)) => list.push(o),
                None => threads.push((key, subject, vec![o])),
            }
        }
        for (key, subject, list) in threads {
            let tkey = Self::endpoint_key(route, device, key);
            let gid = match self
                .mail_convs
                .get(&tkey)
                .map_err(|e| Failure::Transient(format!("the bridge store: {e}")))?
            {
                Some(g) => g.to_vec(),
                None => {
                    let mut members = Vec::new();
                    for agent in &route.agents {
                        let inbox = self
                            .resolve(client, agent)
                            .await
                            .map_err(|e| Failure::Transient(format!("resolving {agent}: {e:#}")))?;
                        if client
                            .consent_of(gatehouse_protocol::consent::Entity::InboxId, &inbox)
                            .ok()
                            .flatten()
                            != Some(gatehouse_protocol::consent::State::Denied)
                        {
                            members.push(inbox);
                        }
                    }
                    if members.is_empty() {
                        tracing::info!(route = %route.name, %device, "not delivered: no agent of the route may receive this endpoint's mail");
                        continue;
                    }
                    let name: String = if subject.is_empty() {
                        "(no subject)"
                    } else {
                        subject
                    }
                    .chars()
                    .take(100)
                    .collect();
                    let gid = client
                        .create_group(&name, &format!("mail from {device}"), &members)
                        .await
                        .map_err(|e| {
                            Failure::Transient(format!("creating the thread's conversation: {e}"))
                        })?;
                    self.mail_convs
                        .insert(&tkey, gid.as_slice())
                        .map_err(|e| Failure::Transient(format!("the bridge store: {e}")))?;
                    self.mail_gids
                        .insert(
                            Self::endpoint_key(route, device, &hex::encode(&gid)),
                            key.as_bytes(),
                        )
                        .map_err(|e| Failure::Transient(format!("the bridge store: {e}")))?;
                    gatehouse_client::flush_tree(&self.mail_convs)
                        .await
                        .map_err(|e| Failure::Transient(format!("the bridge store: {e}")))?;
                    tracing::info!(route = %route.name, %device, conversation = %hex::encode(&gid), "new mail thread: new conversation");
                    gid
                }
            };
            let batch: Vec<_> = list
                .iter()
                .map(|o| (o.content.clone(), format!("{}-thread", o.key)))
                .collect();
            let started = std::time::Instant::now();
            client.send_batch(&gid, &batch).await.map_err(|e| {
                Failure::Transient(format!("sending to the thread's conversation: {e}"))
            })?;
            crate::metrics::encrypt_send(&route.name, started.elapsed().as_secs_f64());
            tracing::info!(route = %route.name, %device, conversation = %hex::encode(&gid), messages = batch.len(), "delivered to conversation");
        }
        let items: Vec<&Outgoing> = items.into_iter().filter(|o| o.thread.is_none()).collect();
        if items.is_empty() {
            return Ok(());
        }
        for agent in &route.agents {
            let inbox = self
                .resolve(client, agent)
                .await
                .map_err(|e| Failure::Transient(format!("resolving {agent}: {e:#}")))?;
            // External messages go only to peers this endpoint allows.
            if client
                .consent_of(gatehouse_protocol::consent::Entity::InboxId, &inbox)
                .ok()
                .flatten()
                == Some(gatehouse_protocol::consent::State::Denied)
            {
                tracing::info!(route = %route.name, %device, agent = %inbox, "not delivered: the agent is denied for this endpoint");
                continue;
            }
            let gid = client
                .dm(&inbox)
                .await
                .map_err(|e| Failure::Transient(format!("DM with {inbox}: {e}")))?;
            let batch: Vec<_> = items
                .iter()
                .map(|o| (o.content.clone(), format!("{}-{inbox}", o.key)))
                .collect();
            let started = std::time::Instant::now();
            client
                .send_batch(&gid, &batch)
                .await
                .map_err(|e| Failure::Transient(format!("sending to {inbox}: {e}")))?;
            crate::metrics::encrypt_send(&route.name, started.elapsed().as_secs_f64());
            tracing::info!(route = %route.name, %device, conversation = %hex::encode(&gid), messages = batch.len(), "delivered to conversation");
        }
        Ok(())
    }

    async fn ensure_bridge_registered(&self) -> Result<(), Failure> {
        let mut reg = self.bridge_registered.lock().await;
        if !*reg {
            self.bridge_identity
                .lock()
                .await
                .register()
                .await
                .map_err(|e| Failure::Transient(format!("registering the bridge identity: {e}")))?;
            *reg = true;
        }
        Ok(())
    }

    async fn ensure_registered(
        &self,
        endpoint: &Endpoint,
        client: &mut Client,
    ) -> Result<(), Failure> {
        let mut reg = endpoint.registered.lock().await;
        if !*reg {
            client.register().await.map_err(|e| {
                Failure::Transient(format!("registering endpoint {}: {e}", endpoint.device))
            })?;
            self.apply_consent_policy(endpoint, client)
                .await
                .map_err(|e| {
                    Failure::Transient(format!(
                        "applying the consent policy of {}: {e:#}",
                        endpoint.device
                    ))
                })?;
            *reg = true;
        }
        Ok(())
    }

    /// The route's consent policy as records on the endpoint (at the config file's time):
    /// agents and `allow` allowed, `deny` denied; unknown senders held or dropped.
    async fn apply_consent_policy(
        &self,
        endpoint: &Endpoint,
        client: &mut Client,
    ) -> anyhow::Result<()> {
        use gatehouse_protocol::consent::{Entity, Record, State};
        let live = self.cfg();
        let route = &live.routes[endpoint.route];
        let policy = &route.consent;
        configure_client(route, client);
        let mut records = Vec::new();
        let allowed = route
            .agents
            .iter()
            .chain(route.allow.iter().flatten())
            .chain(&policy.allow);
        for (who, state) in allowed
            .map(|w| (w, State::Allowed))
            .chain(policy.deny.iter().map(|w| (w, State::Denied)))
        {
            records.push(Record {
                kind: Entity::InboxId,
                entity: self.resolve(client, who).await?,
                state,
                at_ns: self.cfg().written_at_ns,
            });
        }
        client.apply_policy(records)?;
        Ok(())
    }

    /// One JSON object per endpoint (or for the one named `device`): its name, route and
    /// what `describe` reads from its client.
    async fn per_endpoint(
        &self,
        device: Option<&str>,
        describe: impl Fn(&Client) -> serde_json::Value,
    ) -> serde_json::Value {
        let mut out = Vec::new();
        for ep in self.all_endpoints() {
            if device.is_some_and(|d| d != ep.device) {
                continue;
            }
            let mut v = match self.client(&ep).await {
                Ok(client) => describe(&client),
                Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
            };
            v["endpoint"] = ep.device.clone().into();
            v["route"] = self.cfg().routes[ep.route].name.clone().into();
            out.push(v);
        }
        serde_json::Value::Array(out)
    }

    /// The request queue of each endpoint (or of the one named `device`).
    pub async fn requests(&self, device: Option<&str>) -> serde_json::Value {
        self.per_endpoint(device, |client| {
            let held = client.requests().unwrap_or_default();
            serde_json::json!({
                "inbox_id": client.inbox_id(),
                "dropped": client.requests_dropped().unwrap_or(0),
                "requests": held.iter().map(|m| serde_json::json!({
                    "conversation": m.conversation,
                    "sender_inbox": m.sender_inbox,
                    "message_id": m.message_id,
                    "content_type": m.content_type,
                    "bytes": m.content.len(),
                    "sent_at_ns": m.sent_at_ns,
                })).collect::<Vec<_>>(),
            })
        })
        .await
    }

    /// The consent records of each endpoint (or of `device`): who may reach it.
    pub async fn consent_records(&self, device: Option<&str>) -> serde_json::Value {
        self.per_endpoint(
            device,
            |client| serde_json::json!({ "records": client.consent_list().unwrap_or_default() }),
        )
        .await
    }

    /// An operator's decision for one endpoint: `target` is an inbox id, 0x address or
    /// conversation id. Held messages of an allowed sender go out at the next poll, in order.
    pub async fn decide(
        &self,
        device: &str,
        target: &str,
        allow: bool,
    ) -> anyhow::Result<serde_json::Value> {
        use gatehouse_protocol::consent::{Entity, State};
        let ep = self
            .all_endpoints()
            .into_iter()
            .find(|e| e.device == device)
            .ok_or_else(|| {
                anyhow::anyhow!("no endpoint named {device:?} (see `gatehouse endpoints`)")
            })?;
        let mut client = self.client(&ep).await?;
        self.ensure_registered(&ep, &mut client)
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let is_conversation = hex::decode(target).is_ok_and(|gid| {
            client
                .conversations()
                .is_ok_and(|c| c.iter().any(|(g, _)| *g == gid))
        });
        let (kind, entity) = if is_conversation {
            (Entity::ConversationId, target.to_ascii_lowercase())
        } else {
            (Entity::InboxId, self.resolve(&mut client, target).await?)
        };
        let state = if allow { State::Allowed } else { State::Denied };
        client.set_consent(kind, &entity, state).await?;
        tracing::info!(endpoint = %device, %entity, ?state, "consent decided by the operator");
        drop(client);
        // Messages it held as requests are released by the next read, at once.
        self.mark_dirty(&ep.name);
        self.outbound_wake.notify_one();
        Ok(serde_json::json!({"endpoint": device, "entity": entity, "state": state}))
    }

    fn all_endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Files queued records under their route's name: records from before per-route queues
    /// (keyed by id alone) move to their route's queue; records of a route that is no longer
    /// in config.yaml are dead-lettered, not dropped.
    fn adopt_queued(&self) {
        let live = self.cfg();
        let names: std::collections::HashSet<&str> =
            live.active_routes().map(|(_, r)| r.name.as_str()).collect();
        for (key, value) in self.inbox.iter().flatten() {
            let route_name = match key.len() {
                8 => None,
                n if n > 9 && key[n - 9] == 0 => std::str::from_utf8(&key[..n - 9]).ok(),
                _ => None,
            };
            if route_name.is_some_and(|n| names.contains(n)) {
                continue;
            }
            let rec: Option<Queued> = serde_json::from_slice(&value).ok();
            let legacy_route = (key.len() == 8)
                .then(|| rec.as_ref().and_then(|r| live.routes.get(r.route)))
                .flatten();
            match legacy_route {
                Some(route) => {
                    let id = u64::from_be_bytes(key.as_ref().try_into().unwrap_or([0; 8]));
                    let _ = self.inbox.insert(inbox_key(&route.name, id), value);
                    let _ = self.inbox.remove(&key);
                }
                None => {
                    let name = route_name.unwrap_or("?");
                    self.put_dead_letter(serde_json::json!({
                        "direction": "inbound",
                        "route": name,
                        "kind": "config",
                        "reason": format!("queued for route {name:?}, which config.yaml no longer has"),
                        "device": rec.as_ref().map(|r| r.device.as_str()),
                        "topic": rec.as_ref().map(|r| r.topic.as_str()),
                        "payload": rec.as_ref().map(|r| hex::encode(&r.payload)),
                    }));
                    let _ = self.inbox.remove(&key);
                }
            }
        }
    }

    /// The way back: with the node's streams up, endpoints are read when they have news, and
    /// the others checked for news every `resync_interval_secs`; without, all of them are
    /// checked every `poll_interval_ms` (the checks read an endpoint only when it has news).
    /// Returns when `stop` changes (passes in progress go on).
    async fn outbound_loop(self: Arc<Self>, stop: &mut watch::Receiver<bool>) {
        let b = self;
        let mut tried = b.news_tried.subscribe();
        tokio::select! { _ = stop.changed() => return, _ = tried.wait_for(|t| *t) => {} }
        let mut last_full: Option<std::time::Instant> = None;
        loop {
            let live = b.cfg();
            let poll = Duration::from_millis(live.poll_interval_ms.max(20));
            let resync = Duration::from_secs(live.resync_interval_secs.max(1));
            let streaming = b.streaming.load(std::sync::atomic::Ordering::SeqCst);
            if !streaming {
                last_full = None;
                let mut due = b.take_dirty();
                let all = b.all_endpoints();
                match b.probe(&all).await {
                    Ok(found) => Bridge::add_full(&mut due, found),
                    // The node cannot be asked, so reads would fail too (and opening every
                    // endpoint for them would cost the most): the next pass asks again.
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot check the endpoints for news; trying again next poll")
                    }
                }
                b.poll_outbound(due).await;
            } else if last_full.is_none_or(|t| t.elapsed() >= resync) {
                // The safety net: endpoints not read within the interval are checked for news
                // (read if they have some), with the news.
                last_full = Some(std::time::Instant::now());
                let mut due = b.take_dirty();
                let names: std::collections::HashSet<String> =
                    due.iter().map(|(e, _)| e.name.clone()).collect();
                let quiet: Vec<Arc<Endpoint>> = b
                    .all_endpoints()
                    .into_iter()
                    .filter(|e| {
                        e.last_checked
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .is_none_or(|t| t.elapsed() >= resync)
                            && !names.contains(&e.name)
                    })
                    .collect();
                match b.probe(&quiet).await {
                    Ok(found) => {
                        let now = std::time::Instant::now();
                        for e in &quiet {
                            *e.last_checked.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
                        }
                        Bridge::add_full(&mut due, found);
                    }
                    // Left for the next interval (their `last_checked` did not move); the
                    // streams are up meanwhile.
                    Err(e) => {
                        tracing::warn!(error = %e, endpoints = quiet.len(), "checking quiet endpoints for news failed; trying again next resync interval")
                    }
                }
                b.poll_outbound(due).await;
            } else {
                let dirty = b.take_dirty();
                b.poll_outbound(dirty).await;
            }
            let wait = if !streaming
                || !b
                    .dirty
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .due
                    .is_empty()
            {
                poll
            } else {
                resync.saturating_sub(last_full.map_or(Duration::ZERO, |t| t.elapsed()))
            };
            tokio::select! {
                _ = stop.changed() => return,
                _ = b.outbound_wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Starts a pass of the way back for each of these endpoints, [`OUTBOUND_PARALLEL`] at a
    /// time (waiting for a free slot). Each endpoint has one pass at a time, so its
    /// conversations stay in order; the others do not wait for it (a slow plugin or device
    /// delays only its own endpoints), and it is taken again as soon as its pass ends. One in a
    /// pass now is marked for a full read once that ends.
    async fn poll_outbound(self: &Arc<Self>, endpoints: Vec<(Arc<Endpoint>, Due)>) {
        for (ep, due) in endpoints {
            if !self
                .outbound_busy
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(ep.name.clone())
            {
                self.mark_dirty(&ep.name);
                continue;
            }
            let Ok(slot) = self.outbound_slots.clone().acquire_owned().await else {
                // Not reached: the slots are never closed.
                self.outbound_busy
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&ep.name);
                self.mark_dirty(&ep.name);
                return;
            };
            let b = self.clone();
            tokio::spawn(async move {
                match b.poll_endpoint(&ep, due).await {
                    Ok(true) => {}
                    // Not read now (backing off, a quarantined plugin): read it later.
                    Ok(false) => b.mark_dirty(&ep.name),
                    Err(e) => {
                        b.mark_dirty(&ep.name);
                        tracing::warn!(device = %ep.device, error = %format!("{e:#}"), "reading conversations failed");
                    }
                }
                b.outbound_busy
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&ep.name);
                drop(slot);
                b.trim_open();
                // News that came meanwhile waits for it.
                let waiting = b
                    .dirty
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .due
                    .contains_key(&ep.name);
                if waiting {
                    b.outbound_wake.notify_one();
                }
            });
        }
    }

    /// The endpoints with news and what each is to read (taken), but for those in a pass now
    /// (what they have waits for the pass to end).
    fn take_dirty(&self) -> Vec<(Arc<Endpoint>, Due)> {
        let busy = self.outbound_busy.lock().unwrap_or_else(|p| p.into_inner());
        let taken = {
            let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
            let names: Vec<String> = dirty
                .due
                .keys()
                .filter(|n| !busy.contains(*n))
                .cloned()
                .collect();
            let mut taken = Vec::with_capacity(names.len());
            for n in names {
                if let Some(d) = dirty.due.remove(&n) {
                    dirty.bytes = dirty.bytes.saturating_sub(d.bytes());
                    taken.push((n, d));
                }
            }
            taken
        };
        drop(busy);
        let map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        taken
            .into_iter()
            .filter_map(|(n, d)| map.get(&n).map(|e| (e.clone(), d)))
            .collect()
    }

    /// Adds these endpoints, for a full read, to those the pass takes.
    fn add_full(due: &mut Vec<(Arc<Endpoint>, Due)>, eps: Vec<Arc<Endpoint>>) {
        for ep in eps {
            match due.iter_mut().find(|(e, _)| e.name == ep.name) {
                Some((_, d)) => d.full = true,
                None => due.push((
                    ep,
                    Due {
                        full: true,
                        ..Due::default()
                    },
                )),
            }
        }
    }

    /// Marks the endpoint for a full read on the next pass.
    fn mark_dirty(&self, name: &str) {
        let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        let due = dirty.due.entry(name.to_string()).or_default();
        due.full = true;
        let freed = due.bytes();
        due.groups.clear();
        dirty.bytes = dirty.bytes.saturating_sub(freed);
    }

    /// A message in one of the endpoint's conversations came on the node's stream: `prev` is
    /// where that gap-free stream had got before it in this conversation (`None`: not known).
    /// News marks the endpoint for the next pass (returns true: wake it); our own message
    /// coming back does not, but extends the streamed messages held for that conversation, so
    /// they stay a run without gaps. Returns whether to wake the pass.
    fn note_news(
        &self,
        name: &str,
        gid: Vec<u8>,
        prev: Option<u64>,
        id: u64,
        message: gatehouse_wire::mls_api::GroupMessage,
        own: bool,
    ) -> bool {
        let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        let Dirty { due, bytes } = &mut *dirty;
        if own && !due.contains_key(name) {
            return false;
        }
        let due = due.entry(name.to_string()).or_default();
        if due.full {
            return !own;
        }
        let size = message_size(&message);
        let room = *bytes + size <= MAX_STREAMED_BYTES;
        match due.groups.iter_mut().find(|(g, _)| *g == gid) {
            Some((_, run)) => match run {
                Some(r) if prev == Some(r.to) && room => {
                    r.streamed.messages.push(message);
                    r.to = id;
                    r.bytes += size;
                    *bytes += size;
                }
                Some(r) => {
                    // A gap (or no room): the node is asked for this conversation.
                    *bytes = bytes.saturating_sub(r.bytes);
                    *run = None;
                }
                None => {}
            },
            None if own => {}
            None => {
                let run = prev.filter(|_| room).map(|from| {
                    *bytes += size;
                    Run {
                        streamed: gatehouse_client::Streamed {
                            from,
                            messages: vec![message],
                        },
                        to: id,
                        bytes: size,
                    }
                });
                due.groups.push((gid, run));
            }
        }
        !own
    }

    /// Records what the node's streams must watch for this endpoint (its installation and
    /// conversations); new entries make the watcher open its streams again.
    fn note_topology(&self, ep: &Endpoint) {
        let Ok(conversations) = gatehouse_client::stored_conversations(&ep.tree) else {
            return;
        };
        let mut news = self.news.lock().unwrap_or_else(|p| p.into_inner());
        let mut grew = news
            .installations
            .insert(ep.installation, ep.name.clone())
            .is_none();
        // Conversations already followed for other endpoints: their stream's news before now
        // did not name this one, so it reads them once (asking the node).
        let mut joined = Vec::new();
        for (gid, _) in conversations {
            let names = news.groups.entry(gid.clone()).or_default();
            grew |= names.is_empty();
            if !names.contains(&ep.name) {
                if !names.is_empty() {
                    joined.push(gid);
                }
                names.push(ep.name.clone());
            }
        }
        drop(news);
        if grew {
            self.topology.send_modify(|v| *v += 1);
        }
        if !joined.is_empty() {
            let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
            let due = dirty.due.entry(ep.name.clone()).or_default();
            for gid in joined {
                if !due.groups.iter().any(|(g, _)| *g == gid) {
                    due.groups.push((gid, None));
                }
            }
            drop(dirty);
            self.outbound_wake.notify_one();
        }
    }

    /// Follows the node's streams of welcomes (for every endpoint's installation) and
    /// conversation messages (for every endpoint's conversations), marking the endpoint they
    /// concern for the next outbound pass and waking it: endpoints are read when something
    /// arrived, not polled. Endpoints and conversations added later get streams of their own
    /// (what a stream covers for the first time is read once, so nothing falls between);
    /// past [`MAX_NEWS_STREAMS`] they are merged into one (the new one opened before the old
    /// ones close). While the streams are down every endpoint is read each
    /// `poll_interval_ms`, as without them.
    async fn watch_news(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        use futures::StreamExt as _;
        let mut topology = self.topology.subscribe();
        let mut failures = 0u32;
        let mut covered: (
            std::collections::HashSet<[u8; 32]>,
            std::collections::HashSet<Vec<u8>>,
        ) = Default::default();
        let mut streams = futures::stream::SelectAll::new();
        let mut opened = 0usize;
        // Per conversation, the gap-free stream (by tag) and the id it had got to there.
        let mut positions: std::collections::HashMap<Vec<u8>, (u64, u64)> = Default::default();
        let mut tags = 0u64;
        loop {
            topology.borrow_and_update();
            let (fresh_i, fresh_g, all_i, all_g) = {
                let n = self.news.lock().unwrap_or_else(|p| p.into_inner());
                let fresh_i: Vec<[u8; 32]> = n
                    .installations
                    .keys()
                    .filter(|k| !covered.0.contains(*k))
                    .copied()
                    .collect();
                let fresh_g: Vec<Vec<u8>> = n
                    .groups
                    .keys()
                    .filter(|g| !covered.1.contains(*g))
                    .cloned()
                    .collect();
                let merge =
                    opened >= MAX_NEWS_STREAMS && !(fresh_i.is_empty() && fresh_g.is_empty());
                let (all_i, all_g) = if merge {
                    (
                        n.installations.keys().copied().collect(),
                        n.groups.keys().cloned().collect(),
                    )
                } else {
                    (Vec::new(), Vec::new())
                };
                (fresh_i, fresh_g, all_i, all_g)
            };
            if !(fresh_i.is_empty() && fresh_g.is_empty()) {
                let merge = !all_i.is_empty();
                let (open_i, open_g) = if merge {
                    (&all_i, &all_g)
                } else {
                    (&fresh_i, &fresh_g)
                };
                let (cursors_i, cursors_g) = self.stream_cursors(open_i, open_g);
                tags += 1;
                match self.open_news(&cursors_i, &cursors_g, tags).await {
                    Ok((parts, gap_free)) => {
                        if gap_free {
                            // It brings every message after each cursor (0: from the
                            // present, where it starts is not known).
                            for (gid, cursor) in cursors_g.iter().filter(|(_, c)| *c != 0) {
                                positions.insert(gid.clone(), (tags, *cursor));
                            }
                        }
                        // What these streams cover for the first time may have news from
                        // before they opened: our node replays what followed each non-zero
                        // cursor, and those endpoints are checked for news besides (in the
                        // background: the streams are followed meanwhile), which also covers
                        // what was never read (cursor 0: from now on) and nodes that do not
                        // replay.
                        let fresh = {
                            let n = self.news.lock().unwrap_or_else(|p| p.into_inner());
                            let names: Vec<String> = fresh_i
                                .iter()
                                .filter_map(|k| n.installations.get(k))
                                .chain(fresh_g.iter().filter_map(|g| n.groups.get(g)).flatten())
                                .cloned()
                                .collect();
                            drop(n);
                            self.named_endpoints(names.iter())
                        };
                        let b = self.clone();
                        tokio::spawn(async move {
                            let checked = fresh.len();
                            let due = match b.probe(&fresh).await {
                                Ok(due) => due,
                                // Read them: that finds what there is, or retries.
                                Err(_) => fresh,
                            };
                            tracing::debug!(
                                checked,
                                to_read = due.len(),
                                "endpoints newly followed checked for news"
                            );
                            for e in &due {
                                b.mark_dirty(&e.name);
                            }
                            if !due.is_empty() {
                                b.outbound_wake.notify_one();
                            }
                        });
                        if merge {
                            // The old streams close only now.
                            streams = futures::stream::SelectAll::new();
                            opened = 0;
                        }
                        opened += parts.len();
                        for part in parts {
                            streams.push(part);
                        }
                        covered.0.extend(fresh_i);
                        covered.1.extend(fresh_g);
                        if !self
                            .streaming
                            .swap(true, std::sync::atomic::Ordering::SeqCst)
                        {
                            tracing::info!(node = %self.node_url, "following the node's streams: endpoints are read when news arrives");
                        }
                        failures = 0;
                        self.outbound_wake.notify_one();
                    }
                    Err(e) => {
                        if self.streaming.load(std::sync::atomic::Ordering::SeqCst) || failures == 0
                        {
                            tracing::warn!(node = %self.node_url, error = %e, "the node's streams are not available; reading every endpoint each poll_interval_ms meanwhile");
                        }
                        streams = futures::stream::SelectAll::new();
                        (opened, covered) = (0, Default::default());
                        positions.clear();
                        let wait = self.news_down(&mut failures);
                        self.news_tried.send_replace(true);
                        tokio::select! { _ = stop.changed() => return, _ = tokio::time::sleep(wait) => continue }
                    }
                }
            }
            self.news_tried.send_replace(true);
            if streams.is_empty() {
                tokio::select! { _ = stop.changed() => return, _ = topology.changed() => continue }
            }
            let ended = loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = topology.changed() => {
                        // A burst of new endpoints gets one stream.
                        tokio::select! { _ = stop.changed() => return, _ = tokio::time::sleep(REOPEN_DEBOUNCE) => {} }
                        break false;
                    }
                    m = streams.next() => {
                        let wake = match m {
                            Some(News::Welcome(k)) => {
                                let name = self
                                    .news
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .installations
                                    .get(&k)
                                    .cloned();
                                name.inspect(|name| self.mark_dirty(name))
                            }
                            Some(News::Group { gid, id, digest, gap_free, message }) => {
                                // Where this stream had got in the conversation before: known
                                // only on a gap-free stream that brought it there.
                                let prev = match (gap_free, positions.get(&gid)) {
                                    (Some(t), Some((at, p))) if *at == t => Some(*p),
                                    _ => None,
                                };
                                match gap_free {
                                    Some(t) => positions.insert(gid.clone(), (t, id)),
                                    None => positions.remove(&gid),
                                };
                                // One of ours coming back is not news.
                                let own = self
                                    .published
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .remove(&digest);
                                let names = self
                                    .news
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .groups
                                    .get(&gid)
                                    .cloned()
                                    .unwrap_or_default();
                                // Each endpoint in the conversation (our own message is not
                                // news to the others either: they hold it as a request, or it
                                // is read with their next news).
                                let mut woken = None;
                                for name in names {
                                    if self.note_news(&name, gid.clone(), prev, id, message.clone(), own) {
                                        woken = Some(name);
                                    }
                                }
                                woken
                            }
                            Some(News::Other) => None,
                            Some(News::Ended) | None => break true,
                        };
                        if let Some(name) = wake {
                            tracing::debug!(endpoint = %name, "news on the node");
                            self.outbound_wake.notify_one();
                        }
                    }
                }
            };
            if ended {
                tracing::warn!(node = %self.node_url, "the node's streams ended; reading every endpoint each poll_interval_ms until they are back");
                streams = futures::stream::SelectAll::new();
                (opened, covered) = (0, Default::default());
                positions.clear();
                let wait = self.news_down(&mut failures);
                tokio::select! { _ = stop.changed() => return, _ = tokio::time::sleep(wait) => {} }
            }
        }
    }

    /// The node's streams are down: the outbound pass falls back to reading every endpoint
    /// (woken, so it does not sleep out a resync interval first). Returns how long to wait
    /// before opening them again.
    fn news_down(&self, failures: &mut u32) -> Duration {
        self.streaming
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.outbound_wake.notify_one();
        let wait = gatehouse_channels::backoff(
            *failures,
            Duration::from_millis(200),
            Duration::from_secs(10),
        );
        *failures += 1;
        wait
    }

    /// Which of these endpoints have something to read, found without opening them (a read
    /// costs loading the endpoint's protocol state; this costs a few store reads and node
    /// queries): work of their own in their store (messages owed to the device, membership
    /// requests), a conversation whose newest message on the node is past its cursor (one
    /// batched query), a welcome past the welcome cursor (one query per installation: the
    /// API has no batch form). `Err` when the node could not be asked.
    async fn probe(&self, eps: &[Arc<Endpoint>]) -> Result<Vec<Arc<Endpoint>>, String> {
        use futures::StreamExt as _;
        use gatehouse_wire::mls_api as mpb;
        let mut due = vec![false; eps.len()];
        let mut welcomes: Vec<(usize, u64)> = Vec::new();
        let mut groups: Vec<(usize, Vec<u8>, u64)> = Vec::new();
        for (i, ep) in eps.iter().enumerate() {
            if gatehouse_client::stored_work_waiting(&ep.tree).unwrap_or(true) {
                due[i] = true;
                continue;
            }
            welcomes.push((
                i,
                gatehouse_client::stored_welcome_cursor(&ep.tree).unwrap_or(0),
            ));
            for (gid, _) in gatehouse_client::stored_conversations(&ep.tree).unwrap_or_default() {
                let cursor = gatehouse_client::stored_group_cursor(&ep.tree, &gid).unwrap_or(0);
                groups.push((i, gid, cursor));
            }
        }
        let mls = mpb::mls_api_client::MlsApiClient::new(self.channel.clone())
            .max_decoding_message_size(32 << 20);
        for chunk in groups.chunks(PROBE_BATCH) {
            let newest = mls
                .clone()
                .get_newest_group_message(mpb::GetNewestGroupMessageRequest {
                    group_ids: chunk.iter().map(|(_, g, _)| g.clone()).collect(),
                    include_content: false,
                })
                .await
                .map_err(|e| e.to_string())?
                .into_inner()
                .responses;
            for ((i, _, cursor), r) in chunk.iter().zip(newest) {
                let id = r
                    .group_message
                    .and_then(|m| m.version)
                    .map(|mpb::group_message::Version::V1(v)| v.id)
                    .unwrap_or(0);
                due[*i] |= id > *cursor;
            }
        }
        let welcomes: Vec<(usize, u64)> = welcomes.into_iter().filter(|(i, _)| !due[*i]).collect();
        let found: Vec<Result<Option<usize>, String>> = futures::stream::iter(welcomes)
            .map(|(i, cursor)| {
                let mut mls = mls.clone();
                let key = eps[i].installation.to_vec();
                async move {
                    let r = mls
                        .query_welcome_messages(mpb::QueryWelcomeMessagesRequest {
                            installation_key: key,
                            paging_info: Some(mpb::PagingInfo {
                                direction: mpb::SortDirection::Ascending as i32,
                                limit: 1,
                                id_cursor: cursor,
                            }),
                        })
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok((!r.into_inner().messages.is_empty()).then_some(i))
                }
            })
            .buffer_unordered(PROBE_PARALLEL)
            .collect()
            .await;
        for f in found {
            if let Some(i) = f? {
                due[i] = true;
            }
        }
        Ok(eps
            .iter()
            .zip(due)
            .filter(|(_, d)| *d)
            .map(|(e, _)| e.clone())
            .collect())
    }

    /// The endpoints named (those still configured).
    fn named_endpoints<'a>(&self, names: impl Iterator<Item = &'a String>) -> Vec<Arc<Endpoint>> {
        let map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = std::collections::HashSet::new();
        names
            .filter(|n| seen.insert(*n))
            .filter_map(|n| map.get(n).cloned())
            .collect()
    }

    /// Each stream filter's cursor: the last item the endpoint read there (the node replays
    /// what came after it; 0, nothing read yet, starts at the present).
    fn stream_cursors(&self, installations: &[[u8; 32]], groups: &[Vec<u8>]) -> StreamCursors {
        let n = self.news.lock().unwrap_or_else(|p| p.into_inner());
        let map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let tree = |name: Option<&String>| name.and_then(|n| map.get(n)).map(|e| e.tree.clone());
        let i = installations
            .iter()
            .map(|k| {
                let c = tree(n.installations.get(k))
                    .and_then(|t| gatehouse_client::stored_welcome_cursor(&t).ok())
                    .unwrap_or(0);
                (*k, c)
            })
            .collect();
        // A conversation several endpoints are in replays from the earliest of their cursors
        // (0 only if none has read there).
        let g = groups
            .iter()
            .map(|gid| {
                let c = n
                    .groups
                    .get(gid)
                    .into_iter()
                    .flatten()
                    .filter_map(|name| tree(Some(name)))
                    .filter_map(|t| gatehouse_client::stored_group_cursor(&t, gid).ok())
                    .filter(|c| *c != 0)
                    .min()
                    .unwrap_or(0);
                (gid.clone(), c)
            })
            .collect();
        (i, g)
    }

    /// Opens the node's streams for these installations and conversations; each ends with
    /// [`News::Ended`] (an error or the node closing it). The group stream's items carry
    /// `tag` when the node says that stream leaves nothing out; returns whether it did.
    async fn open_news(
        &self,
        installations: &[([u8; 32], u64)],
        groups: &[(Vec<u8>, u64)],
        tag: u64,
    ) -> Result<(Vec<futures::stream::BoxStream<'static, News>>, bool), String> {
        use futures::StreamExt as _;
        use gatehouse_wire::mls_api as mpb;
        let mut mls =
            gatehouse_wire::mls_api::mls_api_client::MlsApiClient::new(self.channel.clone())
                .max_decoding_message_size(32 << 20);
        let ended = || futures::stream::once(async { News::Ended });
        let mut parts = Vec::new();
        let mut gap_free = false;
        if !installations.is_empty() {
            let w = mls
                .subscribe_welcome_messages(mpb::SubscribeWelcomeMessagesRequest {
                    filters: installations
                        .iter()
                        .map(|(k, c)| mpb::subscribe_welcome_messages_request::Filter {
                            installation_key: k.to_vec(),
                            id_cursor: *c,
                        })
                        .collect(),
                })
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            parts.push(
                w.map(|m| match m.map(|m| m.version) {
                    Ok(Some(mpb::welcome_message::Version::V1(v))) => {
                        key32(&v.installation_key).map_or(News::Other, News::Welcome)
                    }
                    Ok(Some(mpb::welcome_message::Version::WelcomePointer(p))) => {
                        key32(&p.installation_key).map_or(News::Other, News::Welcome)
                    }
                    Ok(None) => News::Other,
                    Err(_) => News::Ended,
                })
                .chain(ended())
                .boxed(),
            );
        }
        if !groups.is_empty() {
            let g = mls
                .subscribe_group_messages(mpb::SubscribeGroupMessagesRequest {
                    filters: groups
                        .iter()
                        .map(|(g, c)| mpb::subscribe_group_messages_request::Filter {
                            group_id: g.clone(),
                            id_cursor: *c,
                        })
                        .collect(),
                })
                .await
                .map_err(|e| e.to_string())?;
            gap_free = g
                .metadata()
                .get(gatehouse_protocol::placed::STREAM_HEADER)
                .is_some_and(|v| v == gatehouse_protocol::placed::GAP_FREE);
            let tag = gap_free.then_some(tag);
            parts.push(
                g.into_inner()
                    .map(move |m| match m {
                        Ok(message) => match &message.version {
                            Some(mpb::group_message::Version::V1(v)) => News::Group {
                                gid: v.group_id.clone(),
                                id: v.id,
                                digest: gatehouse_client::published_digest(&v.data),
                                gap_free: tag,
                                message,
                            },
                            None => News::Other,
                        },
                        Err(_) => News::Ended,
                    })
                    .chain(ended())
                    .boxed(),
            );
        }
        Ok((parts, gap_free))
    }

    /// Reads what `due` says of the endpoint's conversations and publishes what is owed to
    /// its device. Returns false when it was not read now (read it later).
    async fn poll_endpoint(&self, ep: &Endpoint, due: Due) -> anyhow::Result<bool> {
        let live = self.cfg();
        let route = &live.routes[ep.route];
        if !route.fail_open && self.stats(&route.plugin, |s| s.quarantined) {
            // Fail closed: the conversations are not read, so their messages wait on the node
            // (the cursors do not move) until the plugin is reloaded.
            return Ok(false);
        }
        if ep
            .retry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .is_some_and(|t| std::time::Instant::now() < t)
        {
            return Ok(false);
        }
        let mut client = self.client(ep).await?;
        if !*ep.registered.lock().await {
            // Endpoints known from before a restart register (and get their policy) here.
            if self.ensure_registered(ep, &mut client).await.is_err() {
                return Ok(false);
            }
        }
        // Consent gates what comes back: only allowed senders' messages are returned; unknown
        // senders wait in the endpoint's request queue, denied ones are dropped. What is
        // returned stays owed (retained in the client's store) until published here, so a
        // crash between reading and publishing loses nothing.
        let started = std::time::Instant::now();
        let full = due.full
            || ep
                .last_full
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_none_or(|t| t.elapsed() >= gatehouse_client::FULL_READ_EVERY);
        let kind = if full {
            client.sync_all().await?;
            *ep.last_full.lock().unwrap_or_else(|p| p.into_inner()) = Some(started);
            "full"
        } else {
            // Only the conversations with news; from their streamed messages where those
            // cover what follows the read cursor.
            let named = due.groups.len();
            let given = due
                .groups
                .into_iter()
                .map(|(gid, run)| (gid, run.map(|r| r.streamed)))
                .collect();
            let (_, streamed) = client.read_named(given).await?;
            if streamed == named {
                "streamed"
            } else {
                "news"
            }
        };
        *ep.last_checked.lock().unwrap_or_else(|p| p.into_inner()) = Some(started);
        crate::metrics::sync_decrypt(&route.name, started.elapsed().as_secs_f64());
        crate::metrics::endpoint_read(&route.name, kind);
        let pending = client.undelivered()?;
        self.dead_letter_set_aside(route, ep, &client)?;
        if pending.is_empty() {
            if !full {
                client.flush().await?;
            }
            drop(client);
            self.note_topology(ep);
            return Ok(true);
        }
        drop(client);
        self.note_topology(ep);
        if std::env::var_os("GATEHOUSE_FAULT_CRASH_BEFORE_PUBLISH").is_some() {
            // Fault injection for the crash tests: die between reading and publishing.
            tracing::error!("GATEHOUSE_FAULT_CRASH_BEFORE_PUBLISH: aborting before publishing");
            std::process::abort();
        }
        // Published in order, then marked done in order once the broker acknowledged each
        // (a crash before the PUBACK publishes it again: at-least-once towards the device).
        let mut carried: Vec<(gatehouse_client::Received, Vec<Confirmation>)> = Vec::new();
        let mut later = false;
        let mut mapped = self.map_outbound(route, ep, &pending).await.into_iter();
        for r in pending {
            let mut acks = Vec::new();
            if !r.is_transcript() {
                match self.carry_outbound(route, ep, &r, mapped.next()).await {
                    Ok(a) => acks = a,
                    Err(Carry::Dead(fault)) => {
                        self.dead_letter_outbound(&r, route, &ep.device, fault)
                    }
                    Err(Carry::Later(reason)) => {
                        self.owe_later(route, ep, &reason);
                        later = true;
                        break;
                    }
                }
            }
            carried.push((r, acks));
        }
        let mut done = 0usize;
        if std::env::var_os("GATEHOUSE_FAULT_CRASH_BEFORE_MARK").is_some()
            && carried.iter().any(|(_, acks)| !acks.is_empty())
        {
            // Fault injection for the crash tests: every publish of the pass confirmed, none
            // marked delivered.
            for ack in carried.into_iter().flat_map(|(_, acks)| acks) {
                ack.outcome().await;
            }
            tracing::error!("GATEHOUSE_FAULT_CRASH_BEFORE_MARK: aborting before marking");
            std::process::abort();
        }
        'marking: for (r, acks) in carried {
            let mut refused = Vec::new();
            for ack in acks {
                match ack.outcome().await {
                    Confirmed::Yes(channel, bytes) => {
                        crate::metrics::published(&route.name, channel, bytes);
                        tracing::trace!(route = %route.name, device = %ep.device, bytes, "publish confirmed by the broker");
                    }
                    // Too large for the broker, or refused by it: kept as a dead letter with
                    // the reason (sending it again would meet the same answer).
                    Confirmed::Refused(kind, why) => refused.push((kind, why)),
                    // No stream acknowledgement: published again later (a stream keeps one
                    // copy, by its `Nats-Msg-Id`).
                    Confirmed::Later(reason) => {
                        self.owe_later(route, ep, &reason);
                        later = true;
                        break 'marking;
                    }
                    // The driver stopped (shutdown): the rest stay owed.
                    Confirmed::Stopped => break 'marking,
                }
            }
            if let Some((kind, _)) = refused.first() {
                let reasons: Vec<&str> = refused.iter().map(|(_, why)| why.as_str()).collect();
                let reason = format!("not published: {}", reasons.join("; "));
                self.dead_letter_outbound(&r, route, &ep.device, Fault::new(kind, reason));
            }
            if let Some(seq) = r.delivery {
                self.client(ep).await?.delivered(seq)?;
            }
            done += 1;
        }
        if done > 0 {
            *ep.retry.lock().unwrap_or_else(|p| p.into_inner()) = (0, None);
        }
        // One flush for the read (`read_named` leaves it to us) and the marking: a crash
        // before it reads those messages again from the node and publishes them again
        // (at-least-once; a QoS 2 publish is recognised by its key in the journal).
        if done > 0 || !full {
            self.client(ep).await?.flush().await?;
        }
        Ok(!later)
    }

    /// A conversation message could not be published yet: it stays owed, and this endpoint
    /// waits (in order) with a growing delay.
    fn owe_later(&self, route: &Route, ep: &Endpoint, reason: &str) {
        let mut retry = ep.retry.lock().unwrap_or_else(|p| p.into_inner());
        let wait = gatehouse_channels::backoff(retry.0, OUTBOUND_RETRY_BASE, OUTBOUND_RETRY_MAX);
        retry.0 = retry.0.saturating_add(1);
        retry.1 = Some(std::time::Instant::now() + wait);
        tracing::warn!(route = %route.name, device = %ep.device, %reason, retry_in_ms = wait.as_millis() as u64, "conversation message not published yet; will retry");
        crate::metrics::retry(&route.name, "outbound");
    }

    /// What the plugin is given for a conversation message, and the endpoint's oldest open
    /// MQTT 5 request when `requests` (its response topic is the message's `reply_topic`).
    fn outbound_message(
        &self,
        route: &Route,
        ep: &Endpoint,
        r: &gatehouse_client::Received,
        requests: bool,
    ) -> (Message, Option<(sled::IVec, PendingRequest)>) {
        let mut request: Option<(sled::IVec, PendingRequest)> = None;
        // A mail thread's subject, for the plugin's `Re:`.
        let metadata = match route
            .is_email()
            .then(|| self.thread_of_conversation(route, &ep.device, &r.conversation))
            .flatten()
        {
            Some(t) => vec![
                ("thread".to_string(), t.clone()),
                (
                    "subject".to_string(),
                    self.load_thread(route, &ep.device, &t).subject,
                ),
            ],
            // Where the route's reply goes for this endpoint (templates with several
            // placeholders are filled by the host, which knows the endpoint's parts), or the
            // response topic of the endpoint's oldest open MQTT 5 request.
            None if route.channel == "mqtt" => {
                if requests {
                    request = self.open_mqtt_request(route, &ep.device);
                }
                let mut m = vec![(
                    "reply_topic".to_string(),
                    request
                        .as_ref()
                        .map_or_else(|| route.reply_topic(&ep.device), |(_, r)| r.reply.clone()),
                )];
                if let Some(c) = request.as_ref().and_then(|(_, r)| r.correlation.as_ref()) {
                    m.push(("correlation_data".into(), hex::encode(c)));
                }
                m
            }
            None => vec![],
        };
        let msg = Message {
            payload: r.content.clone(),
            content_type: r.content_type.clone(),
            metadata,
            endpoint: ep.device.clone(),
            conversation: Some(r.conversation.clone()),
            sender: Some(r.sender_inbox.clone()),
            verified: true,
            idempotency_key: r.idempotency_key.clone(),
        };
        (msg, request)
    }

    /// Maps an endpoint's conversation messages together (one hand-off to the blocking pool,
    /// as on the way in) where what each is given does not depend on the one before: not for
    /// mail (thread subjects) nor while the endpoint has an open MQTT 5 request (each answer
    /// consumes one). Aligned with the messages that are not transcripts; may be shorter.
    async fn map_outbound(
        &self,
        route: &Route,
        ep: &Endpoint,
        pending: &[gatehouse_client::Received],
    ) -> Vec<Result<Vec<Action>, PluginOutcome>> {
        let carried = pending.iter().filter(|r| !r.is_transcript());
        if carried.clone().nth(1).is_none()
            || route.is_email()
            || (route.channel == "mqtt" && self.open_mqtt_request(route, &ep.device).is_some())
        {
            return Vec::new();
        }
        let msgs = carried
            .map(|r| self.outbound_message(route, ep, r, false).0)
            .collect();
        self.run_plugin_batch(route, msgs, false).await
    }

    /// One conversation message through the plugin to the channel; returns what resolves
    /// when the broker has acknowledged each of its publishes. `mapped` is the plugin's
    /// outcome when it was already called for this message ([`Bridge::map_outbound`]).
    async fn carry_outbound(
        &self,
        route: &Route,
        ep: &Endpoint,
        r: &gatehouse_client::Received,
        mapped: Option<Result<Vec<Action>, PluginOutcome>>,
    ) -> Result<Vec<Confirmation>, Carry> {
        let (request, mapped) = match mapped {
            Some(m) => (None, m),
            None => {
                let (msg, request) = self.outbound_message(route, ep, r, true);
                (request, self.run_plugin(route, msg, false).await)
            }
        };
        let actions = match mapped {
            Ok(a) => a,
            Err(PluginOutcome::Quarantined(name)) => {
                let passable = r.content_type.starts_with("xmtp.org/text:")
                    || r.content_type.starts_with("gatehouse.dev/json:");
                if !route.fail_open {
                    // Quarantined in the middle of a batch: the rest wait for the reload.
                    return Err(Carry::Later(format!("plugin {name} is quarantined")));
                }
                if !passable {
                    return Err(Carry::Dead(Fault::new(
                        "quarantined",
                        format!(
                            "plugin {name} is quarantined and the route fails open, but {} is neither text nor JSON",
                            r.content_type
                        ),
                    )));
                }
                vec![Action::Publish(gatehouse_host::Publish {
                    channel: route.channel.clone(),
                    address: route.reply_topic(&ep.device),
                    payload: r.content.clone(),
                    metadata: vec![],
                })]
            }
            Err(PluginOutcome::Failed(fault)) => {
                tracing::warn!(route = %route.name, device = %ep.device, kind = fault.kind, error = %fault.reason, "plugin refused a conversation message");
                return Err(Carry::Dead(fault));
            }
        };
        // All publishes are checked before any goes out.
        for action in &actions {
            if let Action::Publish(p) = action
                && let Err(reason) = crate::grants::check_publish(
                    &self.cfg().plugins[&route.plugin],
                    route,
                    &ep.device,
                    &p.channel,
                    &p.address,
                    request.as_ref().map(|(_, r)| r.reply.as_str()),
                )
            {
                tracing::warn!(route = %route.name, plugin = %route.plugin, %reason, "refused an action outside the plugin's grants");
                self.fault(&route.plugin, &reason, 1);
                return Err(Carry::Dead(Fault::new("grants", reason)));
            }
        }
        let mut acks = Vec::new();
        for (n, action) in actions.into_iter().enumerate() {
            match action {
                Action::Publish(p) if p.channel == "nats" => {
                    // Confirmed (a stream's acknowledgement) with the pass's other publishes.
                    let key = publish_key(&r.message_id, n, &p.address);
                    if let Some(sent) = self.publish_nats(route, &ep.device, &p, &key).await? {
                        acks.push(Confirmation::Nats(sent, p.payload.len()));
                    }
                    tracing::info!(route = %route.name, device = %ep.device, "published reply");
                }
                Action::Publish(p) if p.channel == "email" => {
                    let key = publish_key(&r.message_id, n, &p.address);
                    self.publish_email(route, &ep.device, Some(&r.conversation), &p, &key)
                        .await?;
                    crate::metrics::published(&route.name, "email", p.payload.len());
                    tracing::info!(route = %route.name, device = %ep.device, "mail sent");
                }
                Action::Publish(p) => {
                    if let Some(m) = &self.mqtt {
                        // The same conversation message maps to the same publishes after a
                        // restart: with QoS 2 the driver delivers each key once.
                        let key = publish_key(&r.message_id, n, &p.address);
                        let bytes = p.payload.len();
                        let mut props = mqtt_properties(&p.metadata);
                        // The answer to an MQTT 5 request carries its correlation data.
                        let answers = request
                            .as_ref()
                            .filter(|(_, req)| req.reply == p.address)
                            .map(|(k, req)| (k.clone(), req.correlation.clone()));
                        if let Some((_, Some(c))) = &answers {
                            props.correlation_data = Some(c.clone());
                        }
                        acks.push(Confirmation::Mqtt(
                            self.publish_out(m, &p.address, p.payload, Some(props), key)
                                .await
                                .map_err(|e| {
                                    Carry::Later(format!("publishing to {}: {e:#}", p.address))
                                })?,
                            bytes,
                        ));
                        if let Some((k, _)) = answers {
                            let _ = self.requests.remove(k);
                            tracing::info!(route = %route.name, device = %ep.device, "answered an MQTT 5 request on its response topic");
                        }
                        tracing::info!(route = %route.name, device = %ep.device, topic = %p.address, "published reply");
                    }
                }
                Action::Send(_) => {
                    tracing::warn!(route = %route.name, "refused: a send action in the outbound direction")
                }
                Action::Drop(reason) => {
                    tracing::info!(route = %route.name, device = %ep.device, %reason, "dropped by plugin")
                }
            }
        }
        Ok(acks)
    }

    /// Dead letters by id (`ids`), or all of them.
    fn dead_letter_ids(&self, ids: &[u64], all: bool) -> Vec<u64> {
        if all {
            self.dead
                .iter()
                .keys()
                .filter_map(|k| k.ok())
                .filter_map(|k| k.as_ref().try_into().ok().map(u64::from_be_bytes))
                .collect()
        } else {
            ids.to_vec()
        }
    }

    /// Removes dead letters: `ids`, or all.
    pub fn drop_dead_letters(&self, ids: &[u64], all: bool) -> anyhow::Result<serde_json::Value> {
        let mut dropped = Vec::new();
        let mut missing = Vec::new();
        for id in self.dead_letter_ids(ids, all) {
            match self.dead.remove(id.to_be_bytes())? {
                Some(_) => dropped.push(id),
                None => missing.push(id),
            }
        }
        self.dead.flush()?;
        gatehouse_store::note_flush();
        if !missing.is_empty() && dropped.is_empty() {
            anyhow::bail!("no dead letter with id {missing:?} (see `gatehouse dlq list`)");
        }
        tracing::info!(
            count = dropped.len(),
            "dead letters dropped by the operator"
        );
        Ok(serde_json::json!({"dropped": dropped, "missing": missing}))
    }

    /// Carries dead letters again (`ids`, or all): a device message goes back to its route's
    /// queue (behind what is waiting there); a conversation message goes through the plugin to
    /// the channel at once. A retry that fails again is dead-lettered again, under a new id.
    pub async fn retry_dead_letters(
        &self,
        ids: &[u64],
        all: bool,
    ) -> anyhow::Result<serde_json::Value> {
        let mut retried = Vec::new();
        let mut failed = Vec::new();
        for id in self.dead_letter_ids(ids, all) {
            match self.retry_dead_letter(id).await {
                Ok(()) => retried.push(id),
                Err(e) => failed.push(serde_json::json!({"id": id, "error": format!("{e:#}")})),
            }
        }
        if retried.is_empty() && !failed.is_empty() && !all {
            anyhow::bail!(
                "{}",
                failed
                    .iter()
                    .map(|f| format!("{}: {}", f["id"], f["error"].as_str().unwrap_or("")))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        tracing::info!(
            retried = retried.len(),
            failed = failed.len(),
            "dead letters retried by the operator"
        );
        Ok(serde_json::json!({"retried": retried, "failed": failed}))
    }

    async fn retry_dead_letter(&self, id: u64) -> anyhow::Result<()> {
        let key = id.to_be_bytes();
        let v: serde_json::Value = match self.dead.get(key)? {
            Some(raw) => serde_json::from_slice(&raw)?,
            None => anyhow::bail!("no dead letter with id {id}"),
        };
        let route_name = v["route"].as_str().unwrap_or_default();
        let live = self.cfg();
        let (idx, route) = live
            .active_routes()
            .find(|(_, r)| r.name == route_name)
            .with_context(|| format!("route {route_name:?} is no longer in config.yaml"))?;
        let device = v["device"]
            .as_str()
            .context("the record names no device")?
            .to_string();
        match v["direction"].as_str() {
            Some("inbound") => {
                let payload = hex::decode(v["payload"].as_str().context("no payload kept")?)?;
                let rec = Queued {
                    route: idx,
                    topic: v["topic"]
                        .as_str()
                        .map(String::from)
                        .unwrap_or_else(|| route.subscribe.replace("{device}", &device)),
                    device,
                    payload,
                    retain: false,
                    qos: 1,
                    mail: v
                        .get("mail")
                        .and_then(|m| serde_json::from_value(m.clone()).ok()),
                    nats: v
                        .get("nats")
                        .and_then(|m| serde_json::from_value(m.clone()).ok()),
                    presence: None,
                    mqtt: v
                        .get("mqtt")
                        .and_then(|m| serde_json::from_value(m.clone()).ok()),
                };
                let qid = self.db.generate_id()?;
                self.inbox
                    .insert(inbox_key(&route.name, qid), serde_json::to_vec(&rec)?)?;
                self.dead.remove(key)?;
                gatehouse_client::flush_tree(&self.inbox).await?;
                self.slot(idx).work.notify_one();
            }
            Some("outbound") => {
                let ep = self.endpoint(idx, &device)?;
                let r = gatehouse_client::Received {
                    conversation: v["conversation"].as_str().unwrap_or_default().into(),
                    id: v["node_id"].as_u64().unwrap_or(0),
                    sender_inbox: v["sender_inbox"].as_str().unwrap_or_default().into(),
                    sender_installation: String::new(),
                    content_type: v["content_type"].as_str().unwrap_or_default().into(),
                    text: None,
                    content: hex::decode(v["content"].as_str().context("no content kept")?)?,
                    sent_at_ns: 0,
                    idempotency_key: v["idempotency_key"].as_str().unwrap_or_default().into(),
                    message_id: v["message_id"].as_str().unwrap_or_default().into(),
                    request: false,
                    sender_endpoint: None,
                    delivery: None,
                };
                match self.carry_outbound(route, &ep, &r, None).await {
                    Ok(acks) => {
                        // Kept as a dead letter until the broker has it.
                        for ack in acks {
                            match tokio::time::timeout(Duration::from_secs(30), ack.outcome())
                                .await
                                .map_err(|_| anyhow::anyhow!("published, but the broker has not acknowledged it within 30 s; the dead letter is kept"))?
                            {
                                Confirmed::Yes(channel, bytes) => {
                                    crate::metrics::published(&route.name, channel, bytes)
                                }
                                Confirmed::Refused(_, why) | Confirmed::Later(why) => anyhow::bail!(
                                    "not published: {why}; the dead letter is kept"
                                ),
                                Confirmed::Stopped => anyhow::bail!(
                                    "the MQTT driver stopped; the dead letter is kept"
                                ),
                            }
                        }
                    }
                    Err(Carry::Dead(fault)) => self.dead_letter_outbound(&r, route, &device, fault),
                    Err(Carry::Later(reason)) => anyhow::bail!("not published: {reason}"),
                }
                self.dead.remove(key)?;
                gatehouse_client::flush_tree(&self.dead).await?;
            }
            _ => anyhow::bail!("this record cannot be retried (no direction)"),
        }
        Ok(())
    }

    /// Compiles, validates and swaps in a new version of plugin `name` (from its file, or the
    /// builtin again). Calls in flight finish on the old version; a version that fails to load
    /// leaves the old one serving, and the error says why. A successful reload lifts a
    /// quarantine.
    pub async fn reload(&self, name: &str) -> anyhow::Result<serde_json::Value> {
        if !self.cfg().plugins.contains_key(name) {
            anyhow::bail!(
                "no plugin named {name:?} (configured: {:?})",
                self.cfg().plugins.keys().collect::<Vec<_>>()
            );
        }
        let (host, db, cfg_name) = (self.host.clone(), self.db.clone(), name.to_string());
        let cfg = self.cfg();
        let loaded = tokio::task::block_in_place(|| load_plugin(&host, &cfg, &db, &cfg_name));
        let loaded = match loaded {
            Ok(l) => l,
            Err(e) => {
                let reason = format!("{e:#}");
                self.stats(name, |s| s.last_reload_error = Some(reason.clone()));
                tracing::error!(plugin = %name, error = %reason, "plugin reload rejected; the previous version keeps serving");
                anyhow::bail!(
                    "reload of {name} rejected, the previous version keeps serving: {reason}"
                );
            }
        };
        let sha256 = loaded.sha256.clone();
        let previous = self
            .plugins
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), Arc::new(loaded))
            .map(|l| l.sha256.clone());
        self.stats(name, |s| s.reloaded());
        tracing::info!(plugin = %name, sha256 = %sha256, previous = previous.as_deref().unwrap_or(""), "plugin reloaded");
        self.wake_all();
        Ok(serde_json::json!({"plugin": name, "sha256": sha256, "previous": previous}))
    }

    /// Reloads path plugins whose file changed (`watch`, the default).
    async fn watch_plugins(&self) {
        for (name, p) in &self.cfg().plugins {
            let Some(path) = p.path.as_ref().filter(|_| p.watch) else {
                continue;
            };
            let Ok(meta) = std::fs::metadata(path) else {
                continue;
            };
            let stamp = meta.modified().ok().map(|m| (m, meta.len()));
            let known = self
                .plugins
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(name)
                .and_then(|l| l.stamp);
            let tried = self.stats(name, |s| s.tried_stamp);
            if stamp.is_none() || stamp == known || stamp == tried {
                continue;
            }
            // A rejected file is not tried again until it changes again.
            self.stats(name, |s| s.tried_stamp = stamp);
            tracing::info!(plugin = %name, path = %path.display(), "plugin file changed; reloading");
            let _ = self.reload(name).await;
        }
    }
}

#[derive(Debug)]
enum Failure {
    /// Cannot ever be carried: dead-lettered.
    Permanent(Fault),
    Transient(String),
    /// Held back on purpose (a quarantined plugin): stays queued, retried later, no alarm.
    Held(String),
}

/// A conversation message mapped from a device message, waiting to be sent.
struct Outgoing {
    content: gatehouse_wire::message_contents::EncodedContent,
    /// Idempotency key without the agent (`gatehouse-in-QUEUEID-ACTION`).
    key: String,
    /// For mail: the thread (its root Message-ID) whose conversation it goes to, and the
    /// thread's subject (the conversation's name when it is new).
    thread: Option<(String, String)>,
}

/// Why a conversation message was not carried.
enum Carry {
    /// Never will be: dead-lettered.
    Dead(Fault),
    /// Not now: stays owed and is retried, in order.
    Later(String),
}

impl From<nats::PublishError> for Carry {
    fn from(e: nats::PublishError) -> Self {
        match e {
            nats::PublishError::Refused(r) => Carry::Dead(Fault::new("nats", r)),
            nats::PublishError::Failed(r) => Carry::Later(r),
        }
    }
}

/// Why a plugin call produced no actions.
enum PluginOutcome {
    /// The plugin (named) is quarantined.
    Quarantined(String),
    /// It refused the input (its own error result), faulted (trap, timeout, fuel or memory
    /// exhausted, a capability it lacks) or broke its limits.
    Failed(Fault),
}

/// A device's payload carried without its (quarantined) plugin, on a `fail_open` route:
/// JSON as JSON, other UTF-8 as text.
fn passthrough_inbound(payload: &[u8]) -> Result<Action, String> {
    let content_type = if serde_json::from_slice::<serde_json::Value>(payload).is_ok() {
        "gatehouse.dev/json:1.0"
    } else if std::str::from_utf8(payload).is_ok() {
        "xmtp.org/text:1.0"
    } else {
        return Err("the payload is neither JSON nor UTF-8 text".into());
    };
    Ok(Action::Send(gatehouse_host::Send {
        content_type: content_type.into(),
        payload: payload.to_vec(),
        fallback: None,
    }))
}

/// Starts everything and runs until `shutdown` turns true.
pub async fn run(cfg: Config, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    run_reloadable(cfg, shutdown, None).await
}

/// A configuration to apply while running (SIGHUP), and where the outcome goes.
pub struct Reload {
    /// The new configuration (already validated).
    pub cfg: Config,
    /// The outcome.
    pub done: tokio::sync::oneshot::Sender<Reloaded>,
}

/// What became of a [`Reload`].
#[derive(Debug)]
pub enum Reloaded {
    /// Applied in place; what changed.
    InPlace(String),
    /// Cannot be applied in place (why): the running configuration is untouched, the caller
    /// restarts on the new one.
    NeedsRestart(String),
    /// Refused (why; a plugin that does not load): the running configuration goes on.
    Refused(String),
}

async fn next_reload(reloads: &mut Option<mpsc::Receiver<Reload>>) -> Option<Reload> {
    match reloads {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// A route slot's queue worker.
struct Worker {
    /// Stops it (the route was dropped by a reload).
    retire: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn spawn_worker(bridge: &Arc<Bridge>, idx: usize, shutdown: &watch::Receiver<bool>) -> Worker {
    let (retire, mut retired) = watch::channel(false);
    let (b, mut stop) = (bridge.clone(), shutdown.clone());
    let task = tokio::spawn(async move {
        loop {
            let done = b.drain(idx).await;
            let wait = if done {
                Duration::from_secs(3600)
            } else {
                RETRY_DELAY
            };
            let slot = b.slot(idx);
            tokio::select! {
                _ = stop.changed() => return,
                _ = retired.changed() => return,
                _ = slot.work.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    });
    Worker { retire, task }
}

/// Applies `new` to the running bridge if it can be (see [`Bridge::reload_config`]): starts
/// the workers of added routes, stops those of dropped ones, then dead-letters what was still
/// queued for a dropped route (as a restart would).
async fn reload_in_place(
    bridge: &Arc<Bridge>,
    new: Config,
    workers: &mut Vec<Worker>,
    shutdown: &watch::Receiver<bool>,
) -> Reloaded {
    let change = match bridge.reload_config(new).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    while workers.len() < bridge.cfg().routes.len() {
        let idx = workers.len();
        workers.push(spawn_worker(bridge, idx, shutdown));
    }
    for &idx in &change.retired {
        let w = &mut workers[idx];
        let _ = w.retire.send(true);
        // Whatever it is delivering now finishes first (its records stay queued otherwise).
        let task = std::mem::replace(&mut w.task, tokio::spawn(async {}));
        let _ = task.await;
    }
    if !change.retired.is_empty() {
        bridge.adopt_queued();
    }
    Reloaded::InPlace(change.summary)
}

/// Runs the bridge until `shutdown`; with `reloads`, configurations sent there are applied
/// in place where possible.
pub async fn run_reloadable(
    cfg: Config,
    mut shutdown: watch::Receiver<bool>,
    mut reloads: Option<mpsc::Receiver<Reload>>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data_dir {}", cfg.data_dir.display()))?;
    // What in-flight work needs to finish — the embedded node, the broker and NATS
    // connections — stops only after that work (or the grace period) is over.
    let (late_stop, late) = watch::channel(false);
    let seed = identity::load_or_create_seed(&cfg.data_dir.join("seed"))?;

    let mut node_store = None;
    let mut node_task = None;
    // The bridge's own clients reach an embedded node in memory; agents and other clients
    // reach it through its listener.
    let mut in_process = None;
    let node_url = if cfg.node.embedded {
        let store = gatehouse_node::Store::open_with_cache(
            &cfg.data_dir.join("node"),
            Some(cfg.storage.cache_mb << 20),
        )?;
        node_store = Some(store.clone());
        let listener = tokio::net::TcpListener::bind(cfg.node.listen)
            .await
            .with_context(|| format!("node.listen: cannot bind {}", cfg.node.listen))?;
        let url = format!("http://{}", listener.local_addr()?);
        let node = gatehouse_node::Node::new(store);
        in_process = Some(Channel::in_process(gatehouse_node::routes(node.clone())));
        let mut stop = late.clone();
        node_task = Some(tokio::spawn(async move {
            if let Err(e) = gatehouse_node::serve(listener, node, None, async move {
                let _ = stop.changed().await;
            })
            .await
            {
                tracing::error!(error = %format!("{e:#}"), "embedded node stopped");
            }
        }));
        url
    } else {
        cfg.node.url.clone().context("node.url")?
    };
    let channel = match in_process {
        Some(channel) => channel,
        None => gatehouse_client::connect(&node_url)
            .await
            .with_context(|| format!("connecting to the XMTP node at {node_url}"))?,
    };
    tracing::info!(node = %node_url, in_process = channel.is_in_process(), "using XMTP node");

    let db = gatehouse_store::open(
        sled::Config::new()
            .path(cfg.data_dir.join("bridge"))
            .cache_capacity(cfg.storage.cache_mb << 20)
            .flush_every_ms(Some(200)),
        &cfg.data_dir.join("bridge"),
        "the bridge store",
    )?;
    // Compiled plugins are cached beside the other state, so restarts skip compilation.
    // Fuel metering slows every call a little, so the engine meters only if a plugin asks.
    let host = if cfg.plugins.values().any(|p| p.fuel.is_some()) {
        Host::metered()?
    } else {
        Host::new()?
    }
    .with_cache(cfg.data_dir.join("plugin-cache"));
    let mut plugins = BTreeMap::new();
    for name in cfg.plugins.keys() {
        let loaded = load_plugin(&host, &cfg, &db, name)?;
        tracing::info!(plugin = %name, sha256 = %loaded.sha256, "plugin loaded");
        plugins.insert(name.clone(), Arc::new(loaded));
    }

    let (in_tx, mut in_rx) = mpsc::channel(INBOUND_CAPACITY);
    // The embedded broker first (devices may use it before any route exists); the bridge
    // then connects to it.
    let mut mqtt_cfg = cfg.channels.mqtt.clone();
    if let Some(m) = &mut mqtt_cfg
        && let Some(e) = m.embedded_broker.clone()
    {
        match mqtt::start_embedded(&e, m.protocol) {
            Ok(started) => {
                m.host = started.host;
                m.port = started.port;
                m.tls = None;
                if let Some((user, password)) = started.credentials {
                    m.username = Some(user);
                    m.password = Some(password);
                }
            }
            Err(mqtt::EmbeddedError::InUse(addr)) => {
                let target = match m.protocol {
                    mqtt::Protocol::V5 => e.listen_v5.unwrap_or(e.listen),
                    mqtt::Protocol::V311 => e.listen,
                };
                tracing::warn!(%addr, "embedded MQTT broker not started: the address is in use (another broker?); the bridge connects to what listens there");
                m.host = if target.ip().is_unspecified() {
                    "127.0.0.1".into()
                } else {
                    target.ip().to_string()
                };
                m.port = target.port();
            }
            Err(e) => anyhow::bail!("channels.mqtt.embedded_broker: {e}"),
        }
    }
    let mqtt = match &mqtt_cfg {
        Some(m) if cfg.routes.iter().any(|r| r.channel == "mqtt") => {
            let filters = mqtt_filters(&cfg);
            // QoS 2 publishes are journalled (exactly-once across restarts).
            let outbox = mqtt::Outbox::open(db.open_tree("mqtt-outbox")?);
            Some(
                mqtt::start(m, filters, in_tx, late.clone(), Some(outbox))
                    .context("starting the MQTT connection")?,
            )
        }
        _ => None,
    };
    // NATS: one subscription per route (started below, once the bridge exists); JetStream
    // routes resume after what is stored.
    let nats_js = db.open_tree("nats-js")?;
    let nats_requests = db.open_tree("nats-requests")?;
    let presence = db.open_tree("presence")?;
    let retained_tree = db.open_tree("retained")?;
    let (nats_tx, mut nats_rx) = mpsc::channel::<nats::NatsIn>(INBOUND_CAPACITY);
    let nats_handle = match &cfg.channels.nats {
        Some(n) => Some(
            nats::start(n, Vec::new(), nats_tx, late.clone())
                .await
                .map_err(|e| anyhow::anyhow!("channels.nats: {e}"))?,
        ),
        None => None,
    };
    let (mail_tx, mut mail_rx) = mpsc::channel::<email::MailIn>(64);
    let mut relay = None;
    let mut smtp = None;
    if let Some(e) = &cfg.channels.email {
        let mailboxes = mailboxes(&cfg);
        if !mailboxes.is_empty() {
            smtp = Some(
                email::start(e, mailboxes, mail_tx, shutdown.clone())
                    .await
                    .with_context(|| {
                        format!("channels.email.listen: cannot serve SMTP on {}", e.listen)
                    })?,
            );
        }
        if let Some(r) = &e.relay {
            relay = Some(
                email::Relay::new(r, &e.hostname)
                    .map_err(|e| anyhow::anyhow!("channels.email.relay: {e}"))?,
            );
        }
    }
    let (mail_seen, mail_threads) = (db.open_tree("mail-seen")?, db.open_tree("mail-threads")?);
    let (mail_ids, mail_convs, mail_gids) = (
        db.open_tree("mail-ids")?,
        db.open_tree("mail-convs")?,
        db.open_tree("mail-gids")?,
    );
    let (bridge_wallet, bridge_key) = identity::endpoint_keys(&seed, "gatehouse/bridge");
    let bridge_identity = Client::open(
        db.open_tree("bridge-identity")?,
        channel.clone(),
        Some(bridge_wallet),
        Some(bridge_key.clone()),
    )?;
    let bridge_inbox = bridge_identity.inbox_id().to_string();
    tracing::info!(bridge = %bridge_inbox, "bridge identity (signs endpoint attestations)");
    let bridge = Arc::new(Bridge {
        bridge_identity: Mutex::new(bridge_identity),
        bridge_key,
        bridge_inbox,
        bridge_registered: Mutex::new(false),
        attestations: Default::default(),
        seed,
        inbox: db.open_tree("inbox")?,
        inflight: db.open_tree("mqtt-inflight")?,
        own_publishes: Default::default(),
        not_ready: Default::default(),
        slots: std::sync::RwLock::new(cfg.routes.iter().map(|_| Default::default()).collect()),
        news: Default::default(),
        topology: watch::channel(0).0,
        dirty: Default::default(),
        outbound_busy: Default::default(),
        outbound_slots: Arc::new(tokio::sync::Semaphore::new(OUTBOUND_PARALLEL)),
        outbound_wake: Notify::new(),
        published: Default::default(),
        streaming: Default::default(),
        node_url: node_url.clone(),
        dead: db.open_tree("dead_letters")?,
        endpoint_index: db.open_tree("endpoints")?,
        db,
        channel,
        plugin_stats: std::sync::Mutex::new(
            plugins
                .keys()
                .map(|k| (k.clone(), Default::default()))
                .collect(),
        ),
        host,
        plugins: std::sync::RwLock::new(plugins),
        mqtt,
        relay,
        smtp,
        nats: nats_handle,
        nats_stored: Default::default(),
        nats_js,
        requests: nats_requests,
        presence,
        retained: retained_tree,
        mail_seen,
        mail_threads,
        mail_ids,
        mail_convs,
        mail_gids,
        endpoints: Default::default(),
        open_clients: Default::default(),
        news_tried: watch::channel(false).0,
        resolved: Default::default(),
        started: std::time::Instant::now(),
        cfg: std::sync::RwLock::new(Arc::new(cfg)),
    });
    for idx in 0..bridge.cfg().routes.len() {
        bridge.subscribe_nats(idx)?;
    }
    // Endpoints known from earlier runs resume reading their conversations at once.
    for info in bridge.endpoints() {
        if let Some(idx) = bridge
            .cfg()
            .routes
            .iter()
            .position(|r| r.name == info.route)
        {
            // Registered (and given its consent policy) by its first poll.
            bridge.endpoint(idx, &info.device)?;
        }
    }

    let admin_listen = bridge.cfg().admin.listen;
    let admin = tokio::net::TcpListener::bind(admin_listen)
        .await
        .with_context(|| format!("admin.listen: cannot bind {admin_listen}"))?;
    tokio::spawn(crate::admin::serve(admin, bridge.clone(), shutdown.clone()));

    let b = bridge.clone();
    let mut stop = shutdown.clone();
    let linger = Duration::from_millis(bridge.cfg().storage.linger_ms);
    let mut accept = tokio::spawn(async move {
        let mut linger = crate::linger::Linger::new(linger);
        loop {
            let first = tokio::select! { _ = stop.changed() => return Ok(()), m = in_rx.recv() => match m { Some(m) => m, None => return Ok(()) } };
            // Whatever else is already waiting joins the same flush, and at moderate rates
            // what comes within `storage.linger_ms`.
            let batch = crate::linger::batch(&mut in_rx, first, ACCEPT_BATCH, &mut linger).await;
            // No room: hold the batch unacknowledged (the broker keeps it, and sends no more
            // than its in-flight window meanwhile) until space returns.
            while let Err(reason) = b.storage_room() {
                b.set_not_ready(Some(reason));
                tokio::select! { _ = stop.changed() => return Ok(()), _ = tokio::time::sleep(STORAGE_RECHECK) => {} }
            }
            b.set_not_ready(None);
            if let Err(e) = b.accept(batch).await {
                // Nothing of the batch was acknowledged, so the broker still has it and sends
                // it again after a restart. The store cannot continue after a failed write
                // (sled refuses every later one), so the daemon stops and says why.
                let reason = format!("the bridge store failed: {e:#}");
                b.set_not_ready(Some(reason.clone()));
                return Err(anyhow::anyhow!(
                    "{reason}; stopping without acknowledging the messages it could not store (the broker delivers them again after a restart; check the disk of data_dir)"
                ));
            }
        }
    });
    // NATS: batched like MQTT (one flush per batch, acknowledgements after it).
    let b = bridge.clone();
    let mut stop = shutdown.clone();
    let nats_intake = tokio::spawn(async move {
        let mut linger = crate::linger::Linger::new(linger);
        loop {
            let first = tokio::select! { _ = stop.changed() => return Ok::<(), anyhow::Error>(()), m = nats_rx.recv() => match m { Some(m) => m, None => return Ok(()) } };
            let batch = crate::linger::batch(&mut nats_rx, first, ACCEPT_BATCH, &mut linger).await;
            while let Err(reason) = b.storage_room() {
                b.set_not_ready(Some(reason));
                tokio::select! { _ = stop.changed() => return Ok(()), _ = tokio::time::sleep(STORAGE_RECHECK) => {} }
            }
            b.set_not_ready(None);
            if let Err(e) = b.accept_nats(batch).await {
                let reason = format!("the bridge store failed: {e:#}");
                b.set_not_ready(Some(reason.clone()));
                return Err(anyhow::anyhow!(
                    "{reason}; stopping without acknowledging what it could not store (JetStream delivers it again after a restart)"
                ));
            }
        }
    });
    // Mail: one message at a time per SMTP session; the client waits for our verdict.
    let b = bridge.clone();
    let mut stop = shutdown.clone();
    let mail_intake = tokio::spawn(async move {
        loop {
            let mail = tokio::select! { _ = stop.changed() => return Ok(()), m = mail_rx.recv() => match m { Some(m) => m, None => return Ok(()) } };
            if let Err(e) = b.accept_mail(mail).await {
                let reason = format!("the bridge store failed: {e:#}");
                b.set_not_ready(Some(reason.clone()));
                return Err(anyhow::anyhow!(
                    "{reason}; stopping (the mail was answered 451, so its sender tries again)"
                ));
            }
        }
    });
    bridge.adopt_queued();
    // One worker per route: each drains its own queue in order.
    let mut workers: Vec<Worker> = (0..bridge.cfg().routes.len())
        .map(|idx| spawn_worker(&bridge, idx, &shutdown))
        .collect();
    let b = bridge.clone();
    let mut stop = shutdown.clone();
    let watcher = tokio::spawn(async move {
        loop {
            tokio::select! { _ = stop.changed() => return, _ = tokio::time::sleep(WATCH_INTERVAL) => {} }
            b.watch_plugins().await;
            // Readiness follows the disk even while no message arrives.
            b.set_not_ready(b.storage_room().err());
        }
    });
    let b = bridge.clone();
    let mut stop = shutdown.clone();
    let outbound = tokio::spawn(async move {
        b.clone().outbound_loop(&mut stop).await;
        // The passes in progress finish (their publishes marked done) before the store is
        // sealed.
        let _ = b
            .outbound_slots
            .acquire_many(OUTBOUND_PARALLEL as u32)
            .await;
    });
    tokio::spawn(bridge.clone().watch_news(shutdown.clone()));
    tracing::info!(admin = %admin_listen, routes = bridge.cfg().routes.len(), "gatehouse running");
    // The intake ends on its own only without a channel (fine: wait for the signal) or on a
    // store failure (stop, with the error).
    let mut mail_intake = mail_intake;
    let mut nats_intake = nats_intake;
    let (intake_done, mail_done, nats_done) = loop {
        tokio::select! {
            _ = shutdown.changed() => break (false, false, false),
            r = &mut accept => {
                r??;
                let _ = shutdown.changed().await;
                break (true, false, false);
            }
            r = &mut mail_intake => {
                r??;
                let _ = shutdown.changed().await;
                break (false, true, false);
            }
            r = &mut nats_intake => {
                r??;
                let _ = shutdown.changed().await;
                break (false, false, true);
            }
            Some(req) = next_reload(&mut reloads) => {
                let outcome = reload_in_place(&bridge, req.cfg, &mut workers, &shutdown).await;
                let _ = req.done.send(outcome);
            }
        }
    };
    // Each task stops at its next step; what it is doing now (a batch being stored, mapped,
    // sent) finishes first, within the grace period.
    tracing::info!(
        grace_secs = bridge.cfg().shutdown_grace_secs,
        "finishing in-flight work"
    );
    let drain = async move {
        tokio::join!(
            async {
                if !intake_done {
                    let _ = accept.await;
                }
            },
            async {
                if !mail_done {
                    let _ = mail_intake.await;
                }
            },
            async {
                if !nats_done {
                    let _ = nats_intake.await;
                }
            },
            outbound,
            watcher,
            futures::future::join_all(workers.into_iter().map(|w| w.task))
        )
    };
    match tokio::time::timeout(Duration::from_secs(bridge.cfg().shutdown_grace_secs), drain).await {
        Ok(_) => tracing::info!("in-flight work finished"),
        Err(_) => tracing::warn!(
            grace_secs = bridge.cfg().shutdown_grace_secs,
            "shutdown grace period over with work still running; what it held stays queued and is carried after the next start"
        ),
    }
    let _ = late_stop.send(true);
    // The node's server lets go of its store before it is sealed (and, after a SIGHUP, opened
    // again by the next run). Its connections close as the bridge's clients go away.
    if let Some(task) = node_task
        && tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .is_err()
    {
        tracing::warn!("the embedded node did not stop within 10 s");
    }
    // Seal the bridge store (and the embedded node's, once its server has let go of it):
    // damage to what is durable now is found at the next start.
    let sealed = bridge.db.clone();
    tokio::task::spawn_blocking(move || sealed.seal())
        .await?
        .context("sealing the bridge store")?;
    if let Some(store) = node_store {
        store
            .seal()
            .await
            .context("sealing the embedded node's store")?;
    }
    tracing::info!("gatehouse stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queue record as versions before 2026-12-04 wrote it (the payload an array of numbers).
    const EARLIER: &str = r#"{"route":0,"device":"d1","topic":"devices/d1/up","payload":[123,34,116,34,58,50,49,125,0,255],"retain":false,"qos":1}"#;

    #[test]
    fn queue_records_keep_payloads_as_base64_and_read_earlier_ones() {
        let rec: Queued = serde_json::from_str(EARLIER).unwrap();
        assert_eq!(rec.payload, b"{\"t\":21}\x00\xff");
        assert_eq!((rec.device.as_str(), rec.qos), ("d1", 1));
        let json = serde_json::to_value(&rec).unwrap();
        assert_eq!(json["payload"], "eyJ0IjoyMX0A/w==");
        let again: Queued = serde_json::from_value(json).unwrap();
        assert_eq!(again.payload, rec.payload);
        let empty: Queued =
            serde_json::from_str(&EARLIER.replace("[123,34,116,34,58,50,49,125,0,255]", "\"\""))
                .unwrap();
        assert!(empty.payload.is_empty());
        let bad = serde_json::from_str::<Queued>(
            &EARLIER.replace("[123,34,116,34,58,50,49,125,0,255]", "\"%%\""),
        );
        assert!(bad.is_err());
    }
}
