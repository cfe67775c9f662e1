//! Prometheus metrics (`GET /metrics` on the admin API).
//!
//! Counters and histograms are recorded where things happen (the `metrics` crate's global
//! recorder, installed by `gatehouse run`); levels — queue depths, dead letters, connector
//! states — are read when scraped. Labels are route, channel, plugin and direction names from
//! config.yaml, never message content or endpoint addresses (unbounded, and personal).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Seconds: plugin calls are micro- to milliseconds, MLS sends and syncs milliseconds to seconds.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];

/// Installs the recorder (once per process).
pub fn install() {
    if HANDLE.get().is_some() {
        return;
    }
    match PrometheusBuilder::new()
        .set_buckets(BUCKETS)
        .and_then(|b| b.install_recorder())
    {
        Ok(h) => {
            let _ = HANDLE.set(h);
            describe();
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics are off: the recorder could not be installed")
        }
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "gatehouse_messages_received_total",
        "External messages stored durably (then acknowledged to their source)"
    );
    describe_counter!(
        "gatehouse_received_bytes_total",
        "Payload bytes of the external messages stored"
    );
    describe_counter!(
        "gatehouse_messages_delivered_total",
        "External messages delivered into their conversations"
    );
    describe_counter!(
        "gatehouse_publishes_total",
        "Conversation messages published to a channel and confirmed by it"
    );
    describe_counter!(
        "gatehouse_published_bytes_total",
        "Payload bytes published to channels"
    );
    describe_counter!(
        "gatehouse_retries_total",
        "Deliveries or publishes that failed for now and wait to be retried"
    );
    describe_counter!(
        "gatehouse_dead_letters_total",
        "Messages moved to the dead-letter store"
    );
    describe_counter!("gatehouse_plugin_calls_total", "Plugin calls");
    describe_counter!(
        "gatehouse_plugin_faults_total",
        "Plugin faults: traps, timeouts, fuel or memory exhausted, limits or grants broken"
    );
    describe_histogram!(
        "gatehouse_plugin_call_seconds",
        metrics::Unit::Seconds,
        "Duration of plugin calls"
    );
    describe_histogram!(
        "gatehouse_encrypt_send_seconds",
        metrics::Unit::Seconds,
        "Encrypting (MLS) and publishing a batch of messages to a conversation"
    );
    describe_histogram!(
        "gatehouse_store_flush_seconds",
        metrics::Unit::Seconds,
        "Making a store's writes durable (sled flush: write and fsync), every store of the process"
    );
    describe_histogram!(
        "gatehouse_sync_decrypt_seconds",
        metrics::Unit::Seconds,
        "Reading and decrypting an endpoint's conversations"
    );
    describe_counter!(
        "gatehouse_endpoint_reads_total",
        "Reads of an endpoint's conversations: `full` (welcomes, consent, every conversation), `news` (the conversations the node's streams named, the node asked), `streamed` (those, from the streamed messages alone)"
    );
    describe_counter!(
        "gatehouse_consent_decisions_total",
        "Consent decisions taken through the admin API"
    );
    describe_gauge!(
        "gatehouse_queue_depth",
        "External messages stored and not yet delivered, per route"
    );
    describe_gauge!(
        "gatehouse_dead_letters",
        "Messages in the dead-letter store"
    );
    describe_gauge!("gatehouse_endpoints", "Endpoint identities");
    describe_gauge!(
        "gatehouse_connector_up",
        "1 when the channel's connection is up"
    );
    describe_gauge!(
        "gatehouse_connector_state",
        "1 for the connector's current state (connecting, connected, backing_off, bad_credentials, stopped)"
    );
    describe_gauge!(
        "gatehouse_ready",
        "1 when the daemon takes in messages (see /ready)"
    );
    describe_gauge!(
        "gatehouse_plugin_quarantined",
        "1 while the plugin is quarantined"
    );
}

/// The text exposition (after `levels` has set the gauges); empty when not installed.
pub fn render(levels: impl FnOnce()) -> String {
    match HANDLE.get() {
        Some(h) => {
            levels();
            h.render()
        }
        None => String::new(),
    }
}

/// An external message stored.
pub fn received(route: &str, channel: &str, bytes: usize) {
    let labels = [
        ("route", route.to_string()),
        ("channel", channel.to_string()),
    ];
    metrics::counter!("gatehouse_messages_received_total", &labels).increment(1);
    metrics::counter!("gatehouse_received_bytes_total", &labels).increment(bytes as u64);
}

/// External messages delivered into their conversations.
pub fn delivered(route: &str, channel: &str, n: usize) {
    metrics::counter!("gatehouse_messages_delivered_total", "route" => route.to_string(), "channel" => channel.to_string())
        .increment(n as u64);
}

/// A publish to a channel, confirmed.
pub fn published(route: &str, channel: &str, bytes: usize) {
    let labels = [
        ("route", route.to_string()),
        ("channel", channel.to_string()),
    ];
    metrics::counter!("gatehouse_publishes_total", &labels).increment(1);
    metrics::counter!("gatehouse_published_bytes_total", &labels).increment(bytes as u64);
}

/// A failure that will be retried (`direction`: inbound or outbound).
pub fn retry(route: &str, direction: &'static str) {
    metrics::counter!("gatehouse_retries_total", "route" => route.to_string(), "direction" => direction)
        .increment(1);
}

/// A dead letter.
pub fn dead_letter(route: &str, direction: &str) {
    metrics::counter!("gatehouse_dead_letters_total", "route" => route.to_string(), "direction" => direction.to_string())
        .increment(1);
}

/// A plugin call and how long it took; `fault` when it faulted.
pub fn plugin_call(plugin: &str, seconds: f64, fault: bool) {
    metrics::counter!("gatehouse_plugin_calls_total", "plugin" => plugin.to_string()).increment(1);
    metrics::histogram!("gatehouse_plugin_call_seconds", "plugin" => plugin.to_string())
        .record(seconds);
    if fault {
        metrics::counter!("gatehouse_plugin_faults_total", "plugin" => plugin.to_string())
            .increment(1);
    }
}

/// Encrypting and sending a batch to a conversation.
pub fn encrypt_send(route: &str, seconds: f64) {
    metrics::histogram!("gatehouse_encrypt_send_seconds", "route" => route.to_string())
        .record(seconds);
}

/// Reading and decrypting an endpoint's conversations.
pub fn sync_decrypt(route: &str, seconds: f64) {
    metrics::histogram!("gatehouse_sync_decrypt_seconds", "route" => route.to_string())
        .record(seconds);
}

/// A read of an endpoint's conversations, of this kind (`full`, `news`, `streamed`).
pub fn endpoint_read(route: &str, kind: &'static str) {
    metrics::counter!("gatehouse_endpoint_reads_total", "route" => route.to_string(), "read" => kind)
        .increment(1);
}

/// A consent decision (`allow` / `deny`).
pub fn consent(decision: &str) {
    metrics::counter!("gatehouse_consent_decisions_total", "decision" => decision.to_string())
        .increment(1);
}

/// A level.
pub fn gauge(name: &'static str, labels: &[(&'static str, String)], value: f64) {
    metrics::gauge!(name, labels).set(value);
}

/// The connector's state as `gatehouse_connector_up` and one-hot `gatehouse_connector_state`.
pub fn connector(connector: &'static str, state: &str, up: bool) {
    gauge(
        "gatehouse_connector_up",
        &[("connector", connector.into())],
        f64::from(u8::from(up)),
    );
    for s in [
        "connecting",
        "connected",
        "backing_off",
        "bad_credentials",
        "stopped",
    ] {
        gauge(
            "gatehouse_connector_state",
            &[("connector", connector.into()), ("state", s.into())],
            f64::from(u8::from(s == state)),
        );
    }
}
