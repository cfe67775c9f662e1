//! MQTT connection settings (the `channels.mqtt` section of config.yaml).

use serde::Deserialize;
use tokio_rustls::rustls;

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
    /// A file holding the password (a mounted secret); read at start.
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
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
    /// QoS of the bridge's subscriptions: 1 (default) or 2 (the broker delivers each message
    /// once; acknowledged — PUBREC — only after the durable write, like QoS 1's PUBACK).
    #[serde(default = "default_publish_qos")]
    pub subscribe_qos: u8,
    /// TLS to the broker (`tls: {}` trusts the usual public CAs).
    #[serde(default)]
    pub tls: Option<MqttTls>,
    /// Protocol version: `3.1.1` (default) or `5` (user properties, content type,
    /// correlation data and response topics carried; reason codes on refusals; session expiry).
    #[serde(default)]
    pub protocol: Protocol,
    /// MQTT 5: how long the broker keeps the session after the daemon disconnects, seconds
    /// (default 4294967295: never expires, like a 3.1.1 persistent session). Ignored with
    /// `clean_session: true`.
    #[serde(default = "default_session_expiry")]
    pub session_expiry_secs: u32,
    /// Run an MQTT broker inside the daemon and connect to it (`host` and `port` are then
    /// where it listens).
    #[serde(default)]
    pub embedded_broker: Option<super::EmbeddedBroker>,
}

/// `channels.mqtt.protocol`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 3.1.1.
    #[default]
    V311,
    /// MQTT 5.0.
    V5,
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // YAML gives `5` as a number, `5.0` as a float and `3.1.1` as a string.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            F(f64),
            S(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::N(n) => n.to_string(),
            Raw::F(f) => f.to_string(),
            Raw::S(s) => s,
        };
        match text.trim().to_ascii_lowercase().trim_start_matches('v') {
            "5" | "5.0" => Ok(Protocol::V5),
            "3.1.1" | "311" | "4" => Ok(Protocol::V311),
            other => Err(serde::de::Error::custom(format!(
                "protocol must be 3.1.1 or 5, not {other:?}"
            ))),
        }
    }
}

fn default_session_expiry() -> u32 {
    u32::MAX
}

/// TLS settings for the broker connection (PEM files; relative paths are relative to the
/// config file).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttTls {
    /// CA certificate(s) to trust instead of the public web PKI roots.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// Client certificate chain, for brokers that verify clients (mutual TLS).
    #[serde(default)]
    pub cert_file: Option<std::path::PathBuf>,
    /// The client certificate's private key.
    #[serde(default)]
    pub key_file: Option<std::path::PathBuf>,
    /// The name to verify the broker's certificate against (default: `host`).
    #[serde(default)]
    pub server_name: Option<String>,
}

impl MqttTls {
    /// The rustls client configuration (ring provider).
    pub fn client_config(&self) -> std::io::Result<tokio_rustls::rustls::ClientConfig> {
        use std::io::{Error, ErrorKind};
        let read = |p: &std::path::Path| {
            std::fs::File::open(p)
                .map(std::io::BufReader::new)
                .map_err(|e| Error::new(e.kind(), format!("{}: {e}", p.display())))
        };
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(ca) => {
                for cert in rustls_pemfile::certs(&mut read(ca)?) {
                    let cert =
                        cert.map_err(|e| Error::new(e.kind(), format!("{}: {e}", ca.display())))?;
                    roots.add(cert).map_err(|e| {
                        Error::new(ErrorKind::InvalidData, format!("{}: {e}", ca.display()))
                    })?;
                }
                if roots.is_empty() {
                    return Err(Error::new(
                        ErrorKind::InvalidData,
                        format!("{}: no PEM certificate in it", ca.display()),
                    ));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(Error::other)?
            .with_root_certificates(roots);
        let config = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => {
                let certs = rustls_pemfile::certs(&mut read(c)?)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| Error::new(e.kind(), format!("{}: {e}", c.display())))?;
                let key = rustls_pemfile::private_key(&mut read(k)?)?.ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidData,
                        format!("{}: no PEM private key", k.display()),
                    )
                })?;
                builder.with_client_auth_cert(certs, key).map_err(|e| {
                    Error::new(ErrorKind::InvalidData, format!("client certificate: {e}"))
                })
            }
            (None, None) => Ok(builder.with_no_client_auth()),
            _ => Err(Error::new(
                ErrorKind::InvalidInput,
                "tls: cert_file and key_file go together",
            )),
        }?;
        Ok(config)
    }
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
            password_file: None,
            keep_alive_secs: default_keep_alive(),
            max_packet_bytes: default_max_packet(),
            clean_session: false,
            publish_qos: default_publish_qos(),
            subscribe_qos: default_publish_qos(),
            tls: None,
            protocol: Protocol::V311,
            session_expiry_secs: default_session_expiry(),
            embedded_broker: None,
        }
    }
}
