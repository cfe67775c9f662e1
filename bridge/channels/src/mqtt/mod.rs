//! MQTT 3.1.1 and 5 via rumqttc: QoS 1/2 subscribe, QoS 0/1/2 publish (2 exactly-once across crashes), manual acknowledgement after the daemon's
//! durable write, reconnect with backoff while the broker is away.

mod config;
mod conn;
mod dial;
mod driver;
mod embedded;
mod link;
mod outbox;

pub use config::{MqttConfig, MqttTls, Protocol};
pub use driver::{ConnectionState, DriverStopped, Inbound, MqttHandle, PublishAck, Refused, start};
/// Starts the embedded broker (see [`EmbeddedBroker`]).
pub use embedded::start as start_embedded;
pub use embedded::{EmbeddedBroker, EmbeddedError, Started};
pub use link::Properties;
pub use outbox::{Outbox, PublishKey};

#[cfg(test)]
mod tests;
