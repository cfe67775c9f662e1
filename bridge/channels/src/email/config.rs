//! Email settings (the `channels.email` section of config.yaml).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::Deserialize;

/// The SMTP listener, sender authentication and the outbound relay.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// Where the SMTP listener accepts connections.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// This bridge's mail host name: in the SMTP greeting and in the Message-IDs it writes.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// Largest message accepted, bytes; a larger one is answered 552 and not stored.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// Connections served at once; more are answered 421.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Messages one client address may send per minute; more are answered 451 (try later).
    #[serde(default = "default_rate")]
    pub max_messages_per_minute: u32,
    /// Seconds a client may stay silent before the connection is closed.
    #[serde(default = "default_idle")]
    pub idle_timeout_secs: u64,
    /// STARTTLS on the listener: a certificate chain and its key (PEM files). Relative paths
    /// are relative to the config file.
    #[serde(default)]
    pub tls: Option<ListenerTls>,
    /// Refuse mail on connections that did not STARTTLS first (needs `tls`).
    #[serde(default)]
    pub require_tls: bool,
    /// Largest attachment carried into the conversation (as an XMTP attachment), bytes; larger
    /// ones are left out with a log line. 0: none.
    #[serde(default = "default_max_attachment")]
    pub max_attachment_bytes: usize,
    /// Also carry a mail's HTML part, as the attachment `message.html` (the conversation gets
    /// the text either way).
    #[serde(default)]
    pub keep_html: bool,
    /// What happens to mail whose sender could not be verified (DKIM/SPF/DMARC).
    #[serde(default)]
    pub unverified: Unverified,
    /// DNS answers for sender authentication.
    #[serde(default)]
    pub dns: DnsConfig,
    /// The SMTP relay replies go out through (none: replies to email endpoints are
    /// dead-lettered with that reason).
    #[serde(default)]
    pub relay: Option<RelayConfig>,
}

/// The listener's certificate.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// PEM certificate chain.
    pub cert: std::path::PathBuf,
    /// PEM private key.
    pub key: std::path::PathBuf,
}

/// Policy for senders that are not verified.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unverified {
    /// Deliver, marked `verified: false` (default).
    #[default]
    Accept,
    /// Keep it out of the conversation: stored as a dead letter with the reason, for the
    /// operator to retry (`gatehouse dlq retry`) or drop.
    Quarantine,
    /// Refuse it at the SMTP level (550 5.7.1), nothing stored.
    Reject,
}

/// Where DNS answers come from.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// TXT records by name (`sel._domainkey.example.org`, `example.org`,
    /// `_dmarc.example.org`), answered before (or instead of) DNS: for air-gapped
    /// deployments and tests.
    #[serde(default)]
    pub records: BTreeMap<String, Vec<String>>,
    /// Also ask the system's resolver (`/etc/resolv.conf`) for names not in `records`.
    /// `false`: a name not in `records` does not exist.
    #[serde(default = "yes")]
    pub system: bool,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            records: BTreeMap::new(),
            system: true,
        }
    }
}

/// The SMTP relay for outbound mail.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Relay host.
    pub host: String,
    /// Relay port.
    #[serde(default = "default_relay_port")]
    pub port: u16,
    /// `none`, `opportunistic` (STARTTLS when offered; default), `starttls` (required) or
    /// `tls` (implicit TLS, usually port 465).
    #[serde(default)]
    pub tls: RelayTls,
    /// User name for SMTP AUTH.
    #[serde(default)]
    pub username: Option<String>,
    /// Password for SMTP AUTH (prefer `${ENV}`).
    #[serde(default)]
    pub password: Option<String>,
    /// A file holding the password (a mounted secret); read at start.
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
    /// Seconds to wait for the relay.
    #[serde(default = "default_relay_timeout")]
    pub timeout_secs: u64,
}

/// Transport security towards the relay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayTls {
    /// Plain SMTP.
    None,
    /// STARTTLS when the relay offers it.
    #[default]
    Opportunistic,
    /// STARTTLS, required.
    Starttls,
    /// Implicit TLS.
    Tls,
}

fn yes() -> bool {
    true
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 2525))
}
fn default_hostname() -> String {
    "gatehouse.localhost".into()
}
fn default_max_message() -> usize {
    10 << 20
}
fn default_max_attachment() -> usize {
    1 << 20
}
fn default_max_connections() -> usize {
    64
}
fn default_rate() -> u32 {
    600
}
fn default_idle() -> u64 {
    300
}
fn default_relay_port() -> u16 {
    25
}
fn default_relay_timeout() -> u64 {
    30
}

impl Default for EmailConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            hostname: default_hostname(),
            max_message_bytes: default_max_message(),
            max_connections: default_max_connections(),
            max_messages_per_minute: default_rate(),
            idle_timeout_secs: default_idle(),
            tls: None,
            require_tls: false,
            max_attachment_bytes: default_max_attachment(),
            keep_html: false,
            unverified: Unverified::default(),
            dns: DnsConfig::default(),
            relay: None,
        }
    }
}
