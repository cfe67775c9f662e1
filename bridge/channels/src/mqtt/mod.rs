//! MQTT via rumqttc: QoS 1 subscribe, QoS 0/1/2 publish (2 exactly-once across crashes), manual acknowledgement after the daemon's
//! durable write, reconnect with backoff while the broker is away.

mod config;
mod driver;
mod outbox;

pub use config::{MqttConfig, MqttTls};
pub use driver::{ConnectionState, DriverStopped, Inbound, MqttHandle, PublishAck, start};
pub use outbox::{Outbox, PublishKey};

#[cfg(test)]
mod tests;
