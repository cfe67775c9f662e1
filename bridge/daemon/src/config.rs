//! config.yaml: parse, then validate (no I/O), then build.
//!
//! Every struct rejects unknown keys; every field's doc comment is its user documentation.
//! `${NAME}` anywhere in the file is replaced by the environment variable `NAME` before parsing
//! (a missing variable is an error that names it), so secrets need not sit in the file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use gatehouse_channels::mqtt::MqttConfig;
use serde::{Deserialize, Serialize};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// When the config file was last written (ns since the epoch; 0 for text configs).
    #[serde(skip)]
    pub written_at_ns: i64,
    /// Directory for all state (sled databases, the bridge seed). Relative paths are resolved
    /// against the config file's directory.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The XMTP node the bridge uses.
    #[serde(default)]
    pub node: NodeConfig,
    /// The local admin API (`gatehouse endpoints` talks to it).
    #[serde(default)]
    pub admin: AdminConfig,
    /// Channel connections by kind.
    #[serde(default)]
    pub channels: Channels,
    /// Plugins by name.
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginConfig>,
    /// Routes: which channel addresses become which endpoint identities.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// While the node's streams are unavailable: how often every endpoint reads its
    /// conversations, milliseconds (with them, an endpoint is read as soon as it has news).
    /// Also how long an endpoint whose read was put off (backing off, a quarantined plugin)
    /// waits before the next try.
    #[serde(default = "default_poll_ms")]
    pub poll_interval_ms: u64,
    /// With the node's streams up: how often an endpoint not read within this time is read
    /// anyway (a safety net, and the membership checks of quiet conversations), seconds.
    #[serde(default = "default_resync")]
    pub resync_interval_secs: u64,
    /// Limits of the local store.
    #[serde(default)]
    pub storage: StorageConfig,
    /// On SIGTERM / SIGINT: how long in-flight work (a batch being stored, mapped, encrypted,
    /// published) may take to finish before the daemon exits anyway, seconds. What was not
    /// finished stays queued and is carried after the next start.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace_secs: u64,
    /// A route whose deliveries have kept failing this long (the node unreachable, a peer
    /// refusing) makes the daemon not ready (`/ready` 503 with the route and the reason),
    /// seconds.
    #[serde(default = "default_stalled_after")]
    pub stalled_after_secs: u64,
    /// How the daemon logs.
    #[serde(default)]
    pub log: LogConfig,
    /// After a reload in place: the route slots in the file's order (matching order). Empty:
    /// the slots are in file order.
    #[serde(skip)]
    pub route_order: Vec<usize>,
}

impl Config {
    /// The routes in force with their slot index, in matching (file) order.
    pub fn active_routes(&self) -> impl Iterator<Item = (usize, &Route)> {
        let order: Vec<usize> = if self.route_order.is_empty() {
            (0..self.routes.len()).collect()
        } else {
            self.route_order.clone()
        };
        order
            .into_iter()
            .map(|i| (i, &self.routes[i]))
            .filter(|(_, r)| !r.retired)
    }
}

/// `log`: format and levels. `GATEHOUSE_LOG` (the whole filter) and then `RUST_LOG` take
/// precedence over `level`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (default) or `json` (one object per line: timestamp, level, target, fields).
    #[serde(default)]
    pub format: LogFormat,
    /// Levels, as tracing's filter directives: `info` (default), `debug`,
    /// `info,gatehouse::bridge=debug`.
    #[serde(default)]
    pub level: Option<String>,
}

/// `log.format`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// JSON lines.
    Json,
}

fn default_shutdown_grace() -> u64 {
    10
}

fn default_stalled_after() -> u64 {
    60
}

/// Limits of the local store (`data_dir`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Below this much free space (MiB) on `data_dir`'s file system the daemon stops taking
    /// in messages (none is acknowledged to its source, so the source keeps them) and reports
    /// not-ready; it resumes by itself once space returns. Kept well above zero because the
    /// store cannot continue after a write that failed for lack of space.
    #[serde(default = "default_min_free_mb")]
    pub min_free_mb: u64,
    /// Page cache of each store (the bridge's, and the embedded node's), MiB: most of the
    /// daemon's memory beyond its endpoints.
    #[serde(default = "default_cache_mb")]
    pub cache_mb: u64,
    /// How many endpoints keep their protocol state (MLS groups, keys) in memory at once.
    /// The others are loaded from the store when they are used, the least recently used one
    /// closing in exchange; nothing is lost by closing (their state is all in the store).
    #[serde(default = "default_open_endpoints")]
    pub open_endpoints: usize,
    /// How long (ms) the MQTT and NATS intakes may wait for more messages before the flush
    /// that stores a small batch, when messages arrive faster than one per this interval:
    /// at moderate rates one flush then carries several, and every later stage batches with
    /// it, for a little latency (a wait ends at the next tick of tokio's millisecond timer:
    /// with 1, messages arrive 1–2 ms later). 0 flushes at once.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
}

/// `storage.linger_ms` when the config does not set it (also `gatehouse bench`'s default).
pub const DEFAULT_LINGER_MS: u64 = 1;

fn default_linger_ms() -> u64 {
    DEFAULT_LINGER_MS
}

/// The longest `storage.linger_ms` accepted: a wait that long is a misconfiguration, not a
/// batch (MQTT brokers retry an unacknowledged QoS 1 publish after seconds).
pub const MAX_LINGER_MS: u64 = 1000;

fn default_open_endpoints() -> usize {
    1024
}

fn default_cache_mb() -> u64 {
    64
}

fn default_min_free_mb() -> u64 {
    256
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            min_free_mb: default_min_free_mb(),
            cache_mb: default_cache_mb(),
            open_endpoints: default_open_endpoints(),
            linger_ms: default_linger_ms(),
        }
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("gatehouse-data")
}
fn default_resync() -> u64 {
    300
}

fn default_poll_ms() -> u64 {
    250
}

/// Where the XMTP node is.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Run the node inside the daemon (default). When false, `url` must name an XMTP v3 node.
    #[serde(default = "yes")]
    pub embedded: bool,
    /// Listen address of the embedded node.
    #[serde(default = "default_node_listen")]
    pub listen: SocketAddr,
    /// URL of an external node (`http://host:port` or `https://…`) when `embedded` is false.
    #[serde(default)]
    pub url: Option<String>,
}

fn yes() -> bool {
    true
}
fn default_node_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5556))
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            embedded: true,
            listen: default_node_listen(),
            url: None,
        }
    }
}

/// The admin API.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Listen address; must be a loopback address (the API has no authentication).
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5557))
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
        }
    }
}

/// Channel connections.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Channels {
    /// The MQTT broker connection (`host`, `port`, `client_id`, `username`, `password`,
    /// `keep_alive_secs`, `max_packet_bytes`).
    #[serde(default)]
    pub mqtt: Option<MqttConfig>,
    /// The SMTP listener, sender authentication and the outbound relay.
    #[serde(default)]
    pub email: Option<gatehouse_channels::email::EmailConfig>,
    /// The NATS servers.
    #[serde(default)]
    pub nats: Option<gatehouse_channels::nats::NatsConfig>,
}

/// One plugin.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// A first-party plugin shipped in the binary (`mqtt`).
    #[serde(default)]
    pub builtin: Option<String>,
    /// A component file to load instead of a builtin.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// String settings handed to the plugin's `init`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Wall-clock budget per call, milliseconds.
    #[serde(default = "default_deadline")]
    pub deadline_ms: u64,
    /// Memory cap, MiB.
    #[serde(default = "default_memory")]
    pub memory_mb: usize,
    /// Fuel per call (instruction budget); unset = unmetered.
    #[serde(default)]
    pub fuel: Option<u64>,
    /// Most actions one call may return; more and the message is dead-lettered.
    #[serde(default = "default_max_actions")]
    pub max_actions: usize,
    /// Most payload bytes one call may return in total; more and the message is dead-lettered.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// Faults (traps, timeouts, refusals of its grants) within `fault_window_secs` that
    /// quarantine the plugin: its routes stop taking messages (they stay queued) until restart.
    #[serde(default = "default_quarantine_after")]
    pub quarantine_after: usize,
    /// Bytes (keys + values) the plugin's key-value store may hold.
    #[serde(default = "default_kv_quota")]
    pub kv_quota_bytes: u64,
    /// The window for `quarantine_after`, seconds.
    #[serde(default = "default_fault_window")]
    pub fault_window_secs: u64,
    /// What the plugin's actions may do.
    #[serde(default)]
    pub grants: Grants,
    /// Reload the plugin when its `path` file changes (checked every second; the new component
    /// is validated first and a broken one leaves the old one serving).
    #[serde(default = "yes")]
    pub watch: bool,
}

/// A plugin's grants: anything outside them is refused, counted and dead-lettered.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    /// Content types its `send` actions may use.
    #[serde(default = "default_content_types")]
    pub content_types: Vec<String>,
    /// Channels its `publish` actions may target (default: the channels of its routes).
    #[serde(default)]
    pub channels: Option<Vec<String>>,
    /// Address patterns (MQTT-style `+`/`#` wildcards, or `{device}` templates) its `publish`
    /// actions may target (default: each route's `reply` for the message's device).
    #[serde(default)]
    pub addresses: Option<Vec<String>>,
}

impl Default for Grants {
    fn default() -> Self {
        Self {
            content_types: default_content_types(),
            channels: None,
            addresses: None,
        }
    }
}

fn default_content_types() -> Vec<String> {
    vec!["xmtp.org/text:1.0".into(), "gatehouse.dev/json:1.0".into()]
}
fn default_max_actions() -> usize {
    16
}
fn default_max_bytes() -> usize {
    1 << 20
}
fn default_kv_quota() -> u64 {
    1 << 20
}

fn default_quarantine_after() -> usize {
    5
}
fn default_fault_window() -> u64 {
    60
}

/// Whether an MQTT-style pattern (`+` one level, `#` the rest) matches a topic.
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    let mut t = topic.split('/');
    for p in pattern.split('/') {
        match (p, t.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (p, Some(seg)) if p == seg => {}
            _ => return false,
        }
    }
    t.next().is_none()
}

fn default_deadline() -> u64 {
    500
}
fn default_memory() -> usize {
    64
}

/// A route: a channel address pattern bound to endpoint identities, a plugin and peers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Dropped by a configuration reload: its slot stays (route indices held by running work
    /// stay valid) but nothing matches, queues or delivers on it.
    #[serde(skip)]
    pub retired: bool,
    /// Name used in logs.
    pub name: String,
    /// Channel kind (`mqtt`).
    pub channel: String,
    /// Topic template with one `{device}` placeholder, e.g. `devices/{device}/up`. Each
    /// distinct `{device}` is one endpoint identity.
    pub subscribe: String,
    /// Topic template replies are published to (only this pattern is granted to the plugin).
    #[serde(default = "default_reply")]
    pub reply: String,
    /// The plugin that maps messages (a key of `plugins`).
    pub plugin: String,
    /// Agents each endpoint talks to: inbox ids or `0x…` addresses. Every message from a
    /// device goes to a DM with each of them.
    #[serde(default)]
    pub agents: Vec<String>,
    /// Older spelling of `consent.allow`: more senders allowed besides `agents`.
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    /// Largest accepted payload, bytes; larger messages are rejected with a log line.
    #[serde(default = "default_max_payload")]
    pub max_payload: usize,
    /// Consent policy of this route's endpoints (applied as consent records).
    #[serde(default)]
    pub consent: RouteConsent,
    /// What the route does while its plugin is quarantined. `false` (default, fail closed):
    /// messages wait — inbound in the durable queue, outbound unread on the node — until the
    /// plugin is reloaded. `true` (fail open): they pass unmapped — a device's JSON or UTF-8
    /// payload goes to the conversation as JSON or text, a conversation's text or JSON is
    /// published as-is on the `reply` topic; anything else is dead-lettered.
    #[serde(default)]
    pub fail_open: bool,
    /// MQTT: the topic template of the devices' presence (their last will and birth
    /// messages, e.g. `devices/{device}/status`): `online` / `offline` (or `1`/`0`, `true`/
    /// `false`, JSON `{"state": …}`) becomes a `gatehouse.dev/presence:1.0` message to the
    /// endpoint's agents, once per change.
    #[serde(default)]
    pub presence: Option<String>,
    /// MQTT: what a retained message (the broker's stored last value, sent at each
    /// subscription) becomes: `once` (default: delivered like any message, but the same
    /// retained value is not delivered again after a re-subscription), `ignore` (dropped), or
    /// `state` (kept as the endpoint's latest state, shown by `gatehouse endpoints`, not sent).
    #[serde(default)]
    pub retained: RetainedPolicy,
    /// MQTT: a shared subscription group (`$share/GROUP/…`), so several bridges on one
    /// broker share the route's messages (each goes to one of them).
    #[serde(default)]
    pub share_group: Option<String>,
    /// NATS: a queue group, so several bridges share the route's messages (each goes to one).
    #[serde(default)]
    pub queue_group: Option<String>,
    /// NATS: consume from this JetStream stream (a durable consumer, acknowledged after the
    /// durable write) instead of core NATS; replies are published to it with `Nats-Msg-Id`.
    #[serde(default)]
    pub stream: Option<String>,
    /// NATS JetStream: where a new consumer starts: `all` (default), `new`, or an RFC 3339 time.
    #[serde(default)]
    pub deliver: Option<String>,
    /// NATS JetStream: the durable consumer's name (default `gatehouse-<route name>`).
    #[serde(default)]
    pub durable: Option<String>,
    /// NATS request-reply: how long a requester waits for the agent's answer when its request
    /// does not say (`Gatehouse-Timeout-Ms` header), milliseconds; later answers are dropped.
    /// MQTT 5 request-response: how long a response topic stays open when the request has no
    /// Message Expiry Interval; a later answer goes to the route's `reply` instead.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_ms: u64,
    /// MQTT 5: the response topics a device may ask answers to be published on (a topic
    /// filter; `{device}` is the endpoint). Default: any topic not starting with `$`. A
    /// request naming another is answered on the route's `reply`.
    #[serde(default)]
    pub response_topics: Option<String>,
}

fn default_request_timeout() -> u64 {
    30_000
}

/// `routes[].retained`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RetainedPolicy {
    /// Delivered once per retained value.
    #[default]
    Once,
    /// Dropped.
    Ignore,
    /// Kept as the endpoint's state, not sent.
    State,
}

/// What an endpoint does with senders it has not decided about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownSenders {
    /// Hold their messages in the endpoint's request queue for the operator.
    #[default]
    Request,
    /// Drop them, as if denied.
    Deny,
}

/// `routes[].consent`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConsent {
    /// `request` (default) or `deny`.
    #[serde(default)]
    pub default: UnknownSenders,
    /// Inbox ids or 0x addresses allowed (the route's `agents` always are).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Inbox ids or 0x addresses denied.
    #[serde(default)]
    pub deny: Vec<String>,
    /// Most messages an endpoint's request queue holds; the oldest is dropped beyond it.
    #[serde(default = "default_max_requests")]
    pub max_requests: usize,
}

impl Default for RouteConsent {
    fn default() -> Self {
        Self {
            default: UnknownSenders::Request,
            allow: Vec::new(),
            deny: Vec::new(),
            max_requests: default_max_requests(),
        }
    }
}

fn default_max_requests() -> usize {
    gatehouse_client::MAX_REQUESTS
}

fn default_reply() -> String {
    "devices/{device}/down".into()
}
fn default_max_payload() -> usize {
    64 * 1024
}

impl Route {
    /// The MQTT subscription filter for the template (`{x}` becomes `+`), as a shared
    /// subscription when the route has a `share_group`.
    pub fn filter(&self) -> String {
        self.mqtt_filter(&self.subscribe)
    }

    /// The presence subscription filter, if the route has one.
    pub fn presence_filter(&self) -> Option<String> {
        Some(self.mqtt_filter(self.presence.as_ref()?))
    }

    fn mqtt_filter(&self, template: &str) -> String {
        let filter = template
            .split('/')
            .map(|seg| {
                if seg.starts_with('{') && seg.ends_with('}') {
                    "+"
                } else {
                    seg
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        match &self.share_group {
            Some(g) => format!("$share/{g}/{filter}"),
            None => filter,
        }
    }

    /// The `{device}` of a presence topic, if the topic matches the presence template.
    pub fn presence_device_of(&self, topic: &str) -> Option<String> {
        template_device(self.presence.as_deref()?, topic)
    }

    /// The `{device}` of a topic, if the topic matches the template.
    pub fn device_of(&self, topic: &str) -> Option<String> {
        template_device(&self.subscribe, topic)
    }
}

/// The `{device}` of `topic` under an MQTT topic template.
/// With several placeholders (`sites/{site}/{device}/up`) the endpoint is named by all of
/// them, in template order, joined by `/` (`hq/thermo-1`): the same device name at two sites is
/// two endpoints. A topic level cannot contain `/`, so the name splits back unambiguously.
fn template_device(template: &str, topic: &str) -> Option<String> {
    let t: Vec<_> = template.split('/').collect();
    let p: Vec<_> = topic.split('/').collect();
    if t.len() != p.len() {
        return None;
    }
    let mut values = Vec::new();
    for (a, b) in t.iter().zip(&p) {
        if a.starts_with('{') && a.ends_with('}') {
            if b.is_empty() {
                return None;
            }
            values.push(*b);
        } else if a != b {
            return None;
        }
    }
    (!values.is_empty()).then(|| values.join("/"))
}

/// The placeholder names of an MQTT topic template, in order.
fn placeholders(template: &str) -> Vec<&str> {
    template
        .split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .collect()
}

/// `target` with the placeholders of `source` filled from an endpoint name (see
/// [`template_device`]).
fn fill_from(source: &str, target: &str, device: &str) -> String {
    let names = placeholders(source);
    let values: Vec<&str> = if names.len() > 1 {
        device.split('/').collect()
    } else {
        vec![device]
    };
    let mut out = target.to_string();
    for (name, value) in names.iter().zip(values) {
        out = out.replace(&format!("{{{name}}}"), value);
    }
    out
}

impl Route {
    /// The reply address for a device: its topic template filled in (MQTT), or the sender's
    /// own address (email).
    pub fn reply_topic(&self, device: &str) -> String {
        if self.is_email() {
            device.to_string()
        } else if self.is_nats() {
            // The endpoint's token may be named anything (`events.{service}.>`); `{device}`
            // works too.
            let name = self
                .subscribe
                .split('.')
                .find(|t| t.starts_with('{') && t.ends_with('}'))
                .unwrap_or("{device}");
            self.reply.replace(name, device).replace("{device}", device)
        } else {
            fill_from(&self.subscribe, &self.reply, device)
        }
    }

    /// Whether a device may have its answers published on `topic` (MQTT 5 Response Topic).
    pub fn response_topic_allowed(&self, device: &str, topic: &str) -> bool {
        match &self.response_topics {
            Some(filter) => topic_matches(&filter.replace("{device}", device), topic),
            None => !topic.starts_with('$') && !topic.is_empty(),
        }
    }

    /// Whether this is an email route.
    pub fn is_email(&self) -> bool {
        self.channel == "email"
    }

    /// Whether this is a NATS route.
    pub fn is_nats(&self) -> bool {
        self.channel == "nats"
    }

    /// The NATS subscription for the template (`{x}` becomes `*`).
    pub fn nats_filter(&self) -> String {
        self.subscribe
            .split('.')
            .map(|t| {
                if t.starts_with('{') && t.ends_with('}') {
                    "*"
                } else {
                    t
                }
            })
            .collect::<Vec<_>>()
            .join(".")
    }

    /// The endpoint named by a NATS subject, if the subject matches the template.
    pub fn nats_device_of(&self, subject: &str) -> Option<String> {
        let t: Vec<_> = self.subscribe.split('.').collect();
        let p: Vec<_> = subject.split('.').collect();
        let mut device = None;
        for (i, a) in t.iter().enumerate() {
            if *a == ">" {
                return (p.len() > i).then_some(device).flatten();
            }
            let b = p.get(i)?;
            if a.starts_with('{') && a.ends_with('}') {
                if b.is_empty() {
                    return None;
                }
                device = Some(b.to_string());
            } else if *a != "*" && a != b {
                return None;
            }
        }
        (t.len() == p.len()).then_some(device).flatten()
    }

    /// The endpoint's address on its channel: the topic it publishes on (MQTT), or its email
    /// address.
    pub fn endpoint_address(&self, device: &str) -> String {
        if self.is_email() {
            device.to_string()
        } else if self.is_nats() {
            self.subscribe
                .split('.')
                .map(|t| {
                    if t.starts_with('{') && t.ends_with('}') {
                        device
                    } else {
                        t
                    }
                })
                .collect::<Vec<_>>()
                .join(".")
        } else {
            fill_from(&self.subscribe, &self.subscribe, device)
        }
    }
}

fn interpolate(text: &str) -> Result<String, ConfigError> {
    // Comment lines are left alone, so documentation may mention ${NAME}.
    let mut out = String::new();
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with('#') {
            out.push_str(line);
        } else {
            out.push_str(
                &interpolate_line(line).map_err(|(col, message)| ConfigError {
                    pos: Some((i + 1, col)),
                    message,
                })?,
            );
        }
    }
    Ok(out)
}

/// One line with its `${NAME}`s replaced; an error carries the 1-based column.
fn interpolate_line(text: &str) -> Result<String, (usize, String)> {
    let mut out = String::new();
    let mut rest = text;
    let mut offset = 0;
    while let Some(start) = rest.find("${") {
        let col = text[..offset + start].chars().count() + 1;
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .ok_or((col, "unclosed ${ (write ${NAME})".to_string()))?
            + start;
        let name = &rest[start + 2..end];
        let value = std::env::var(name).map_err(|_| {
            (
                col,
                format!("${{{name}}}: the environment variable {name} is not set"),
            )
        })?;
        out.push_str(&value);
        offset += end + 1;
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A config error and where it is (1-based line and column), when known.
#[derive(Debug)]
pub struct ConfigError {
    /// Line and column.
    pub pos: Option<crate::locate::Pos>,
    /// What is wrong, starting with the key path.
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pos {
            Some((line, col)) => write!(f, "{line}:{col}: {}", self.message),
            None => write!(f, "{}", self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// serde_yaml's message without its trailing position, an unknown key turned into its full
/// path with the nearest valid one suggested.
fn serde_message(e: &serde_yaml::Error) -> String {
    let mut m = e.to_string();
    if let Some(at) = m.rfind(" at line ") {
        m.truncate(at);
    }
    if let Some((word, expected)) = crate::locate::unknown_word(&m) {
        let (path, _) = m
            .split_once(": ")
            .filter(|(p, _)| !p.contains(' '))
            .unwrap_or(("", ""));
        let full = if path.is_empty() {
            word.to_string()
        } else {
            format!("{path}.{word}")
        };
        let kind = if m.contains("unknown variant") {
            "value"
        } else {
            "key"
        };
        let hint = match crate::locate::nearest(word, &expected) {
            Some(n) => format!("; did you mean `{n}`?"),
            None => String::new(),
        };
        let valid = if expected.is_empty() {
            String::new()
        } else {
            format!(" (valid: {})", expected.join(", "))
        };
        return format!("{full}: unknown {kind} `{word}`{hint}{valid}");
    }
    m
}

impl Config {
    /// Reads, parses and validates a file. Errors name the file, line and column.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let mut cfg = Self::parse_located(&text, &base).map_err(|e| match e.pos {
            Some((line, col)) => anyhow::anyhow!("{}:{line}:{col}: {}", path.display(), e.message),
            None => anyhow::anyhow!("{}: {}", path.display(), e.message),
        })?;
        // Consent records from the config carry the file's time: a later CLI decision wins over
        // them, a later edit of the file wins over that.
        cfg.written_at_ns = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        if cfg.data_dir.is_relative() {
            let base = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            cfg.data_dir = base.join(&cfg.data_dir);
        }
        if let Some(tls) = cfg.channels.mqtt.as_mut().and_then(|m| m.tls.as_mut()) {
            for p in [&mut tls.ca_file, &mut tls.cert_file, &mut tls.key_file]
                .into_iter()
                .flatten()
            {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        if let Some(tls) = cfg.channels.email.as_mut().and_then(|e| e.tls.as_mut()) {
            for p in [&mut tls.cert, &mut tls.key] {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        Ok(cfg)
    }

    /// Parses and validates config text.
    #[cfg(test)]
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        Ok(Self::parse_located(text, Path::new("."))?)
    }

    /// [`Config::parse`] with the error's line and column: serde's for what does not
    /// deserialize, the named key's for what the checks after it refuse.
    /// `base`: the config file's directory (relative secret files are read from there).
    pub fn parse_located(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let text = interpolate(text)?;
        if let Some((pos, info)) = crate::locate::syntax_error(&text) {
            return Err(ConfigError {
                pos: Some(pos),
                message: format!("not valid YAML: {info}"),
            });
        }
        let cfg: Config = serde_yaml::from_str(&text).map_err(|e| ConfigError {
            pos: e.location().map(|l| (l.line(), l.column())),
            message: serde_message(&e),
        })?;
        let mut cfg = cfg;
        cfg.validate()
            .and_then(|()| cfg.read_secret_files(base))
            .map_err(|e| {
                let message = format!("{e:#}");
                let pos = crate::locate::message_path(&message)
                    .and_then(|p| crate::locate::find(&crate::locate::key_positions(&text), &p));
                ConfigError { pos, message }
            })?;
        Ok(cfg)
    }

    /// `*_file` secrets (`password_file`, `token_file`, `nkey_file`): the file's content
    /// (without a final line break) becomes the value; setting both is an error.
    fn read_secret_files(&mut self, base: &Path) -> anyhow::Result<()> {
        fn read(
            value: &mut Option<String>,
            file: &mut Option<PathBuf>,
            key: &str,
            base: &Path,
        ) -> anyhow::Result<()> {
            let Some(path) = file.take() else {
                return Ok(());
            };
            if value.is_some() {
                bail!("{key}_file: {key} is set as well; keep one of them");
            }
            let full = if path.is_relative() {
                base.join(&path)
            } else {
                path
            };
            let text = std::fs::read_to_string(&full)
                .map_err(|e| anyhow::anyhow!("{key}_file: cannot read {}: {e}", full.display()))?;
            let secret = text.strip_suffix('\n').unwrap_or(&text);
            let secret = secret.strip_suffix('\r').unwrap_or(secret);
            if secret.is_empty() {
                bail!("{key}_file: {} is empty", full.display());
            }
            *value = Some(secret.to_string());
            Ok(())
        }
        if let Some(m) = self.channels.mqtt.as_mut() {
            read(
                &mut m.password,
                &mut m.password_file,
                "channels.mqtt.password",
                base,
            )?;
        }
        if let Some(r) = self.channels.email.as_mut().and_then(|e| e.relay.as_mut()) {
            read(
                &mut r.password,
                &mut r.password_file,
                "channels.email.relay.password",
                base,
            )?;
        }
        if let Some(n) = self.channels.nats.as_mut() {
            read(
                &mut n.password,
                &mut n.password_file,
                "channels.nats.password",
                base,
            )?;
            read(&mut n.token, &mut n.token_file, "channels.nats.token", base)?;
            read(&mut n.nkey, &mut n.nkey_file, "channels.nats.nkey", base)?;
        }
        Ok(())
    }

    fn validate(&self) -> anyhow::Result<()> {
        if let Some(level) = &self.log.level
            && let Err(e) = tracing_subscriber::EnvFilter::try_new(level)
        {
            bail!(
                "log.level: {level:?} is not a level or filter (info, debug, info,gatehouse::bridge=debug): {e}"
            );
        }
        if !self.admin.listen.ip().is_loopback() {
            bail!(
                "admin.listen: {} is not a loopback address; the admin API has no authentication",
                self.admin.listen
            );
        }
        if !self.node.embedded && self.node.url.is_none() {
            bail!("node: embedded is false, so node.url must name an XMTP node");
        }
        if self.storage.open_endpoints == 0 {
            bail!(
                "storage.open_endpoints: must be at least 1 (endpoints kept open in memory; 1024 by default)"
            );
        }
        if self.storage.linger_ms > MAX_LINGER_MS {
            bail!(
                "storage.linger_ms: {} is over {MAX_LINGER_MS} (how long the intake may wait to batch; 1 by default, 0 never waits)",
                self.storage.linger_ms
            );
        }
        if let Some(m) = &self.channels.mqtt {
            if m.publish_qos > 2 {
                bail!(
                    "channels.mqtt.publish_qos: {} is not an MQTT QoS (0, 1 or 2)",
                    m.publish_qos
                );
            }
            if !(1..=2).contains(&m.subscribe_qos) {
                bail!(
                    "channels.mqtt.subscribe_qos: {} must be 1 or 2 (messages are acknowledged after they are stored)",
                    m.subscribe_qos
                );
            }
            if m.publish_qos == 2 && m.clean_session {
                bail!(
                    "channels.mqtt.publish_qos: 2 needs the broker to keep the session across reconnects and restarts; set clean_session: false (the default)"
                );
            }
            if let Some(e) = &m.embedded_broker
                && let Err(reason) = e.validate(m.protocol)
            {
                bail!("channels.mqtt.embedded_broker: {reason}");
            }
        }
        if let Some(e) = &self.channels.email
            && e.require_tls
            && e.tls.is_none()
        {
            bail!(
                "channels.email.require_tls: true needs channels.email.tls (cert and key) to offer STARTTLS"
            );
        }
        for (i, r) in self.routes.iter().enumerate() {
            let at = format!("routes[{i}] ({})", r.name);
            if self.routes[..i].iter().any(|o| o.name == r.name) {
                bail!(
                    "{at}.name: another route is also named {:?}; route names must be unique (queued messages are kept per route name)",
                    r.name
                );
            }
            match r.channel.as_str() {
                "mqtt" => {
                    if self.channels.mqtt.is_none() {
                        bail!("{at}: uses channel mqtt but channels.mqtt is not configured");
                    }
                    if r.subscribe.matches("{device}").count() != 1 {
                        bail!(
                            "{at}.subscribe: {:?} must contain exactly one {{device}}",
                            r.subscribe
                        );
                    }
                    let names = placeholders(&r.subscribe);
                    if let Some(extra) = placeholders(&r.reply)
                        .into_iter()
                        .find(|p| !names.contains(p))
                    {
                        bail!(
                            "{at}.reply: {{{extra}}} is not a placeholder of subscribe {:?}",
                            r.subscribe
                        );
                    }
                    if let Some(p) = &r.presence
                        && p.matches("{device}").count() != 1
                    {
                        bail!("{at}.presence: {p:?} must contain exactly one {{device}}");
                    }
                    if let Some(g) = &r.share_group
                        && (g.is_empty() || g.contains(['/', '+', '#']))
                    {
                        bail!(
                            "{at}.share_group: {g:?} must be a non-empty name without '/', '+' or '#'"
                        );
                    }
                }
                "email" => {
                    if self.channels.email.is_none() {
                        bail!("{at}: uses channel email but channels.email is not configured");
                    }
                    let ok = match r.subscribe.rsplit_once('@') {
                        Some((local, domain)) => {
                            !local.is_empty()
                                && !domain.is_empty()
                                && !r.subscribe.contains(['{', '}', ' '])
                        }
                        None => false,
                    };
                    if !ok {
                        bail!(
                            "{at}.subscribe: {:?} is not a mailbox; an email route serves an address (support@example.org) or a whole domain (*@example.org), and each sender's address becomes an endpoint",
                            r.subscribe
                        );
                    }
                }
                "nats" => {
                    if self.channels.nats.is_none() {
                        bail!("{at}: uses channel nats but channels.nats is not configured");
                    }
                    let placeholders = r
                        .subscribe
                        .split('.')
                        .filter(|t| t.starts_with('{') && t.ends_with('}'))
                        .count();
                    if placeholders != 1 || r.subscribe.matches('{').count() != 1 {
                        bail!(
                            "{at}.subscribe: {:?} must name the endpoint with exactly one whole subject token in braces, e.g. \"events.{{device}}.>\"",
                            r.subscribe
                        );
                    }
                    if r.reply.contains('/') {
                        bail!(
                            "{at}.reply: {:?} is not a NATS subject; set reply to where answers go, e.g. \"replies.{{device}}\"",
                            r.reply
                        );
                    }
                    let token = r
                        .subscribe
                        .split('.')
                        .find(|t| t.starts_with('{') && t.ends_with('}'))
                        .unwrap_or("{device}");
                    if let Some(extra) = r
                        .reply
                        .split('.')
                        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
                        .find(|p| format!("{{{p}}}") != token && *p != "device")
                    {
                        bail!(
                            "{at}.reply: {{{extra}}} is not the placeholder of subscribe {:?} ({token})",
                            r.subscribe
                        );
                    }
                    if let Some(d) = &r.deliver
                        && d != "all"
                        && d != "new"
                        && time::OffsetDateTime::parse(
                            d,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .is_err()
                    {
                        bail!("{at}.deliver: {d:?} is not all, new or an RFC 3339 time");
                    }
                    if r.stream.is_some() && r.queue_group.is_some() {
                        bail!(
                            "{at}: queue_group is for core NATS; a stream route's durable consumer is its own"
                        );
                    }
                }
                other => {
                    bail!("{at}.channel: unknown channel {other:?} (available: mqtt, email, nats)")
                }
            }
            if !self.plugins.contains_key(&r.plugin) {
                bail!(
                    "{at}.plugin: no plugin named {:?} (defined: {:?})",
                    r.plugin,
                    self.plugins.keys().collect::<Vec<_>>()
                );
            }
            if r.consent.max_requests == 0 {
                bail!("{at}.consent.max_requests: must be at least 1");
            }
            for a in r
                .agents
                .iter()
                .chain(r.allow.iter().flatten())
                .chain(&r.consent.allow)
                .chain(&r.consent.deny)
            {
                let ok = (a.starts_with("0x") && a.len() == 42)
                    || (a.len() == 64 && a.chars().all(|c| c.is_ascii_hexdigit()));
                if !ok {
                    bail!("{at}: {a:?} is neither an inbox id (64 hex digits) nor a 0x address");
                }
            }
        }
        for (name, p) in &self.plugins {
            match (&p.builtin, &p.path) {
                (Some(b), None) if b == "mqtt" || b == "email" || b == "nats" => {}
                (Some(b), None) => {
                    bail!(
                        "plugins.{name}.builtin: unknown builtin {b:?} (available: mqtt, email, nats)"
                    )
                }
                (None, Some(_)) => {}
                _ => bail!("plugins.{name}: set exactly one of builtin or path"),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The repository's config.yaml parses and validates.
    #[test]
    fn repo_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config.yaml");
        Config::load(&path).unwrap();
    }

    /// publish_qos is 0..=2, and 2 needs the persistent session.
    #[test]
    fn mqtt_publish_qos() {
        let cfg = |m: &str| Config::parse(&format!("channels: {{mqtt: {{{m}}}}}\n"));
        assert_eq!(cfg("").unwrap().channels.mqtt.unwrap().publish_qos, 1);
        assert_eq!(
            cfg("publish_qos: 2")
                .unwrap()
                .channels
                .mqtt
                .unwrap()
                .publish_qos,
            2
        );
        let e = cfg("publish_qos: 3").unwrap_err().to_string();
        assert!(
            e.contains("channels.mqtt.publish_qos: 3 is not an MQTT QoS"),
            "{e}"
        );
        let e = cfg("publish_qos: 2, clean_session: true")
            .unwrap_err()
            .to_string();
        assert!(e.contains("set clean_session: false"), "{e}");
    }

    /// A route's consent policy parses with defaults; bad entries and keys are named.
    #[test]
    fn route_consent_policy() {
        let base = "plugins: {mqtt: {builtin: mqtt}}\nchannels: {mqtt: {}}\nroutes:\n  - {name: r, channel: mqtt, subscribe: \"d/{device}/up\", plugin: mqtt";
        let cfg = Config::parse(&format!("{base}}}\n")).unwrap();
        assert_eq!(cfg.routes[0].consent.default, UnknownSenders::Request);
        assert_eq!(cfg.routes[0].consent.max_requests, 1000);
        let inbox = "a".repeat(64);
        let cfg = Config::parse(&format!(
            "{base}, consent: {{default: deny, allow: [\"{inbox}\"], deny: [\"0x{}\"], max_requests: 5}}}}\n",
            "b".repeat(40)
        ))
        .unwrap();
        let c = &cfg.routes[0].consent;
        assert_eq!(
            (c.default, c.allow.len(), c.deny.len(), c.max_requests),
            (UnknownSenders::Deny, 1, 1, 5)
        );
        let e = Config::parse(&format!("{base}, consent: {{deny: [\"bob\"]}}}}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"bob\" is neither an inbox id"), "{e}");
        let e = Config::parse(&format!("{base}, consent: {{defualt: deny}}}}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("defualt"), "{e}");
    }

    /// `storage.open_endpoints` defaults to 1024 and must leave room for one.
    #[test]
    fn open_endpoints() {
        assert_eq!(Config::parse("").unwrap().storage.open_endpoints, 1024);
        assert_eq!(
            Config::parse("storage: {open_endpoints: 10}\n")
                .unwrap()
                .storage
                .open_endpoints,
            10
        );
        let e = Config::parse("storage: {open_endpoints: 0}\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("storage.open_endpoints: must be at least 1"),
            "{e}"
        );
    }

    /// `storage.linger_ms` defaults to 1, may be 0, and has a ceiling.
    #[test]
    fn linger_ms() {
        assert_eq!(Config::parse("").unwrap().storage.linger_ms, 1);
        assert_eq!(
            Config::parse("storage: {linger_ms: 0}\n")
                .unwrap()
                .storage
                .linger_ms,
            0
        );
        let e = Config::parse("storage: {linger_ms: 5000}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("storage.linger_ms: 5000 is over 1000"), "{e}");
    }

    /// A NATS route's endpoint token may have any name; the reply fills the same one.
    #[test]
    fn nats_reply_uses_the_subscribe_placeholder() {
        let base = "data_dir: x\nchannels: {nats: {urls: [\"nats://127.0.0.1:4222\"]}}\nplugins: {nats: {builtin: nats}}\nroutes:\n  - {name: s, channel: nats, plugin: nats, subscribe: \"events.{service}.>\", ";
        let cfg = Config::parse(&format!("{base}reply: \"replies.{{service}}\"}}\n")).unwrap();
        assert_eq!(cfg.routes[0].reply_topic("billing"), "replies.billing");
        let e = Config::parse(&format!("{base}reply: \"replies.{{svc}}\"}}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("{svc} is not the placeholder"), "{e}");
    }

    /// `password_file` reads the secret from a file; both forms at once, or a missing file, are
    /// errors that name the key.
    #[test]
    fn secret_files() {
        let dir = std::env::temp_dir().join(format!("gh-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("mqtt.pw"), "s3cret\n").unwrap();
        let parse = |m: &str| {
            Config::parse_located(&format!("channels: {{mqtt: {{{m}}}}}\n"), &dir)
                .map_err(|e| e.to_string())
        };
        let cfg = parse("username: u, password_file: mqtt.pw").unwrap();
        assert_eq!(
            cfg.channels.mqtt.unwrap().password.as_deref(),
            Some("s3cret")
        );
        let e = parse("password: x, password_file: mqtt.pw").unwrap_err();
        assert!(
            e.contains("channels.mqtt.password_file: channels.mqtt.password is set as well"),
            "{e}"
        );
        let e = parse("password_file: missing.pw").unwrap_err();
        assert!(
            e.starts_with("1:19: channels.mqtt.password_file: cannot read"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Every key the config structs accept is in the README's configuration table (the
    /// structs list their keys in serde's "unknown field" error, so this follows them).
    #[test]
    fn readme_documents_every_config_key() {
        let readme =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
                .unwrap();
        let table = readme
            .split("## Configuration")
            .nth(1)
            .and_then(|t| t.split("\n## ").next())
            .unwrap();
        // The first column's keys, braces expanded; `.x` continues the first key's parent.
        let mut documented = std::collections::BTreeSet::new();
        for row in table.lines().filter(|l| l.starts_with("| `")) {
            let cell = row.split('|').nth(1).unwrap();
            let keys: Vec<&str> = cell.split('`').skip(1).step_by(2).collect();
            let first = keys[0];
            let parent = first[..first.find('{').unwrap_or(first.len())]
                .rsplit_once('.')
                .map_or("", |(p, _)| p);
            for k in keys {
                let full = match k.strip_prefix('.') {
                    Some(rest) => format!("{parent}.{rest}"),
                    None => k.to_string(),
                };
                match (full.find('{'), full.find('}')) {
                    (Some(a), Some(b)) => {
                        for part in full[a + 1..b].split(',') {
                            documented.insert(format!("{}{part}{}", &full[..a], &full[b + 1..]));
                        }
                    }
                    _ => {
                        documented.insert(full);
                    }
                }
            }
        }
        let sections: &[(&str, &str)] = &[
            ("", "zzz: 1"),
            ("node", "node: {zzz: 1}"),
            ("admin", "admin: {zzz: 1}"),
            ("log", "log: {zzz: 1}"),
            ("storage", "storage: {zzz: 1}"),
            ("channels.mqtt", "channels: {mqtt: {zzz: 1}}"),
            ("channels.mqtt.tls", "channels: {mqtt: {tls: {zzz: 1}}}"),
            (
                "channels.mqtt.embedded_broker",
                "channels: {mqtt: {embedded_broker: {zzz: 1}}}",
            ),
            ("channels.email", "channels: {email: {zzz: 1}}"),
            ("channels.email.tls", "channels: {email: {tls: {zzz: 1}}}"),
            ("channels.email.dns", "channels: {email: {dns: {zzz: 1}}}"),
            (
                "channels.email.relay",
                "channels: {email: {relay: {zzz: 1}}}",
            ),
            ("channels.nats", "channels: {nats: {zzz: 1}}"),
            ("plugins.NAME", "plugins: {p: {zzz: 1}}"),
            ("plugins.NAME.grants", "plugins: {p: {grants: {zzz: 1}}}"),
            ("routes[]", "routes: [{zzz: 1}]"),
            ("routes[].consent", "routes: [{consent: {zzz: 1}}]"),
        ];
        let mut missing = Vec::new();
        for (section, yaml) in sections {
            let e = Config::parse(yaml).unwrap_err().to_string();
            let keys: Vec<&str> = e
                .split_once("(valid: ")
                .and_then(|(_, rest)| rest.strip_suffix(')'))
                .unwrap_or_else(|| panic!("{section}: no key list in {e:?}"))
                .split(", ")
                .collect();
            for k in keys {
                let full = if section.is_empty() {
                    k.to_string()
                } else {
                    format!("{section}.{k}")
                };
                // Sections are documented by their keys.
                let is_section = documented.iter().any(|d| {
                    d.starts_with(&format!("{full}.")) || d.starts_with(&format!("{full}[]."))
                });
                if !documented.contains(&full) && !is_section {
                    missing.push(full);
                }
            }
        }
        assert!(
            missing.is_empty(),
            "config keys missing from the README's configuration table: {missing:?}"
        );
    }

    /// Unknown keys are rejected with their line.
    #[test]
    fn unknown_key_names_line() {
        let e = Config::parse("data_dir: x\nnodes: {}\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("2:1: nodes: unknown key `nodes`; did you mean `node`?"),
            "{e}"
        );
    }

    /// `${NAME}` takes the environment's value; a missing variable is named; comments are left alone.
    #[test]
    fn env_interpolation() {
        let e = Config::parse(
            "# ${NOT_SET_ANYWHERE} in a comment is fine\ndata_dir: ${GATEHOUSE_TEST_UNSET_VAR}\n",
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("GATEHOUSE_TEST_UNSET_VAR"),
            "{e:#}"
        );
        let path = std::env::var("PATH").unwrap();
        let c = Config::parse("data_dir: \"${PATH}\"\n").unwrap();
        assert_eq!(c.data_dir, PathBuf::from(path));
    }

    /// MQTT-style grant patterns.
    #[test]
    fn patterns() {
        assert!(topic_matches("devices/+/down", "devices/t1/down"));
        assert!(!topic_matches("devices/+/down", "devices/t1/up"));
        assert!(!topic_matches("devices/+/down", "devices/t1/down/x"));
        assert!(topic_matches("devices/#", "devices/t1/down/x"));
        assert!(topic_matches("a/b", "a/b") && !topic_matches("a/b", "a"));
    }

    /// Topic templates match and extract the device.
    #[test]
    fn templates() {
        let r: Route = serde_yaml::from_str(
            "{name: r, channel: mqtt, subscribe: 'devices/{device}/up', plugin: p}",
        )
        .unwrap();
        assert_eq!(r.filter(), "devices/+/up");
        assert_eq!(
            r.device_of("devices/thermo-1/up").as_deref(),
            Some("thermo-1")
        );
        assert_eq!(r.device_of("devices/thermo-1/down"), None);
        assert_eq!(r.reply_topic("thermo-1"), "devices/thermo-1/down");
    }
}
