//! MQTT connection settings (the `channels.mqtt` section of config.yaml).

use serde::Deserialize;

/// How to reach the broker.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Broker host name or address.
    #[serde(default = "default_host")]
    pub host: String,
    /// Broker port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Client id; stable, so the broker can keep the session.
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// Username, if the broker wants one.
    #[serde(default)]
    pub username: Option<String>,
    /// Password (prefer `${ENV}` in config.yaml over a literal).
    #[serde(default)]
    pub password: Option<String>,
    /// Keep-alive interval, seconds.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
    /// Largest packet accepted from the broker, bytes.
    #[serde(default = "default_max_packet")]
    pub max_packet_bytes: usize,
    /// Start a fresh session at every connect. `false` (default): the broker keeps the
    /// daemon's subscriptions and queues QoS 1 messages while it is down (a persistent
    /// session under `client_id`), and redelivers what was not acknowledged.
    #[serde(default)]
    pub clean_session: bool,
    /// QoS of the bridge's own publishes (replies towards devices): 0, 1 (default:
    /// at-least-once) or 2 (exactly-once, also across a crash of the daemon: needs the
    /// persistent session, `clean_session: false`).
    #[serde(default = "default_publish_qos")]
    pub publish_qos: u8,
}

fn default_publish_qos() -> u8 {
    1
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    1883
}
fn default_client_id() -> String {
    "gatehouse".into()
}
fn default_keep_alive() -> u64 {
    30
}
fn default_max_packet() -> usize {
    1 << 20
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            host: default_host(),
            port: default_port(),
            client_id: default_client_id(),
            username: None,
            password: None,
            keep_alive_secs: default_keep_alive(),
            max_packet_bytes: default_max_packet(),
            clean_session: false,
            publish_qos: default_publish_qos(),
        }
    }
}
