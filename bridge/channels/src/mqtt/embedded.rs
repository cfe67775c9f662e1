//! An MQTT broker inside the daemon (rumqttd), for users without one of their own.
//!
//! It keeps everything in memory: sessions, retained messages and queued messages live as
//! long as the daemon. A device's message the broker acknowledged but the bridge had not yet
//! stored is lost if the daemon dies in between, so production setups with delivery
//! guarantees use a broker with persistence (mosquitto `persistence true`).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::Deserialize;

/// `channels.mqtt.embedded_broker`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedBroker {
    /// MQTT 3.1.1 listener (devices and the bridge connect here).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// MQTT 5 listener (rumqttd serves each version on its own port); needed when
    /// `channels.mqtt.protocol` is 5.
    #[serde(default)]
    pub listen_v5: Option<SocketAddr>,
    /// `username: password` accounts devices must use; empty (default): anonymous access,
    /// refused on a non-loopback listener.
    #[serde(default)]
    pub users: BTreeMap<String, String>,
    /// Largest payload the broker takes, bytes.
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: usize,
    /// Most connections at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1883))
}
fn default_max_payload() -> usize {
    1 << 20
}
fn default_max_connections() -> usize {
    1000
}

/// How the bridge reaches the broker that was started.
#[derive(Debug, Clone)]
pub struct Started {
    /// Where the bridge connects: the host (the v5 listener's under MQTT 5)...
    pub host: String,
    /// ...and the port.
    pub port: u16,
    /// The bridge's own account when the broker has `users` (generated at every start).
    pub credentials: Option<(String, String)>,
}

/// Why it did not start.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// Something already listens there (another broker, most likely).
    #[error("{0} is already in use")]
    InUse(SocketAddr),
    /// Anything else: configuration, binding, a build without the feature.
    #[error("{0}")]
    Failed(String),
}

impl EmbeddedBroker {
    /// Checks the settings (without starting anything).
    pub fn validate(&self, protocol: super::Protocol) -> Result<(), String> {
        if protocol == super::Protocol::V5 && self.listen_v5.is_none() {
            return Err(
                "channels.mqtt.protocol is 5, so embedded_broker needs listen_v5 (rumqttd serves MQTT 5 on a port of its own)"
                    .into(),
            );
        }
        for addr in std::iter::once(self.listen).chain(self.listen_v5) {
            if self.users.is_empty() && !addr.ip().is_loopback() {
                return Err(format!(
                    "embedded_broker listens on {addr}, beyond this machine, without users: anyone who reaches it could publish to the devices; add embedded_broker.users or listen on 127.0.0.1"
                ));
            }
        }
        if self.listen_v5 == Some(self.listen) {
            return Err("embedded_broker.listen and listen_v5 must differ".into());
        }
        Ok(())
    }
}

/// Starts the broker on threads of its own and waits until it accepts connections.
///
/// The broker lives as long as the process (rumqttd cannot be stopped): a second start with
/// the same `listen` (the daemon restarting on a reloaded config) gets the running one back.
#[cfg(feature = "embedded-broker")]
pub fn start(cfg: &EmbeddedBroker, protocol: super::Protocol) -> Result<Started, EmbeddedError> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static RUNNING: OnceLock<Mutex<HashMap<SocketAddr, (String, Started)>>> = OnceLock::new();
    cfg.validate(protocol).map_err(EmbeddedError::Failed)?;
    let running = RUNNING.get_or_init(Default::default);
    let mut running = running.lock().unwrap_or_else(|p| p.into_inner());
    let settings = format!("{cfg:?}");
    if let Some((was, started)) = running.get(&cfg.listen) {
        if *was != settings {
            tracing::warn!(listen = %cfg.listen, "embedded_broker settings changed; they apply when the process restarts (the broker keeps running as it was)");
        }
        let mut started = started.clone();
        if protocol == super::Protocol::V5
            && let Some(v5) = cfg.listen_v5
        {
            started.port = v5.port();
        }
        return Ok(started);
    }
    // rumqttd reports a failed bind only in its log, so find out first (a broker already
    // there is the usual reason).
    for addr in std::iter::once(cfg.listen).chain(cfg.listen_v5) {
        match std::net::TcpListener::bind(addr) {
            Ok(l) => drop(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                return Err(EmbeddedError::InUse(addr));
            }
            Err(e) => {
                return Err(EmbeddedError::Failed(format!(
                    "cannot listen on {addr}: {e}"
                )));
            }
        }
    }
    let mut auth: HashMap<String, String> = cfg.users.clone().into_iter().collect();
    let credentials = (!auth.is_empty()).then(|| {
        let user = format!("gatehouse-bridge-{:08x}", rand::random::<u32>());
        let password = hex::encode(rand::random::<[u8; 24]>());
        auth.insert(user.clone(), password.clone());
        (user, password)
    });
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: cfg.max_payload_bytes,
        max_inflight_count: 100,
        auth: (!auth.is_empty()).then_some(auth),
        external_auth: None,
        dynamic_filters: true,
    };
    let server = |name: &str, listen: SocketAddr| {
        HashMap::from([(
            "1".to_string(),
            rumqttd::ServerSettings {
                name: name.into(),
                listen,
                tls: None,
                next_connection_delay_ms: 1,
                connections: connections.clone(),
            },
        )])
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: cfg.max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: 16 << 20,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(server("mqtt-v4", cfg.listen)),
        v5: cfg.listen_v5.map(|a| server("mqtt-v5", a)),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "the embedded MQTT broker stopped");
            }
        })
        .map_err(|e| EmbeddedError::Failed(format!("starting the broker thread: {e}")))?;
    let target = match protocol {
        super::Protocol::V5 => cfg.listen_v5.unwrap_or(cfg.listen),
        super::Protocol::V311 => cfg.listen,
    };
    let dial = if target.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], target.port()))
    } else {
        target
    };
    // Listening within a moment: each server thread binds as it starts.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for addr in std::iter::once(cfg.listen).chain(cfg.listen_v5) {
        let probe = if addr.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], addr.port()))
        } else {
            addr
        };
        while std::net::TcpStream::connect(probe).is_err() {
            if std::time::Instant::now() > deadline {
                return Err(EmbeddedError::Failed(format!(
                    "the embedded broker did not start listening on {addr}"
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    tracing::info!(listen = %cfg.listen, listen_v5 = ?cfg.listen_v5, users = cfg.users.len(), "embedded MQTT broker running");
    let started = Started {
        host: dial.ip().to_string(),
        port: dial.port(),
        credentials,
    };
    running.insert(cfg.listen, (settings, started.clone()));
    Ok(started)
}

/// Without the `embedded-broker` feature there is nothing to start.
#[cfg(not(feature = "embedded-broker"))]
pub fn start(_: &EmbeddedBroker, _: super::Protocol) -> Result<Started, EmbeddedError> {
    Err(EmbeddedError::Failed(
        "this gatehouse was built without the embedded-broker cargo feature (on by default); rebuild with it or point channels.mqtt at a broker".into(),
    ))
}
