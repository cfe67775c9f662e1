//! NATS settings (the `channels.nats` section of config.yaml).

use std::path::PathBuf;

use serde::Deserialize;

/// How to reach the NATS servers.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URLs (`nats://host:4222`, `tls://…`); the client moves between them.
    #[serde(default = "default_urls")]
    pub urls: Vec<String>,
    /// Connection name, shown by the server's monitoring.
    #[serde(default = "default_name")]
    pub name: String,
    /// User name (with `password`).
    #[serde(default)]
    pub user: Option<String>,
    /// Password (prefer `${ENV}`).
    #[serde(default)]
    pub password: Option<String>,
    /// A file holding the password (a mounted secret); read at start.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Token authentication.
    #[serde(default)]
    pub token: Option<String>,
    /// A file holding the token.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// An NKey seed (`SU…`).
    #[serde(default)]
    pub nkey: Option<String>,
    /// A file holding the NKey seed.
    #[serde(default)]
    pub nkey_file: Option<PathBuf>,
    /// A `.creds` file (JWT and NKey seed).
    #[serde(default)]
    pub creds_file: Option<PathBuf>,
    /// TLS: CA certificate to trust (PEM).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// TLS client certificate and key (PEM), for servers that verify clients.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's key.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Refuse plaintext connections.
    #[serde(default)]
    pub tls_required: bool,
    /// Largest payload taken in or sent, bytes; larger messages are refused with a log line.
    #[serde(default = "default_max_payload")]
    pub max_payload: usize,
}

fn default_urls() -> Vec<String> {
    vec!["nats://127.0.0.1:4222".into()]
}
fn default_name() -> String {
    "gatehouse".into()
}
fn default_max_payload() -> usize {
    1 << 20
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            urls: default_urls(),
            name: default_name(),
            user: None,
            password: None,
            password_file: None,
            token: None,
            token_file: None,
            nkey: None,
            nkey_file: None,
            creds_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_required: false,
            max_payload: default_max_payload(),
        }
    }
}
