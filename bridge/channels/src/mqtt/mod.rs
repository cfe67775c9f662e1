//! MQTT via rumqttc: QoS 1 subscribe and publish, manual acknowledgement after the daemon's
//! durable write, reconnect with backoff while the broker is away.

mod config;
mod driver;

pub use config::MqttConfig;
pub use driver::{ConnectionState, DriverStopped, Inbound, MqttHandle, PublishAck, start};

#[cfg(test)]
mod tests;
