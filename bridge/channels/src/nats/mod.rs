//! NATS via async-nats: core subjects with queue groups and request-reply, JetStream durable
//! pull consumers acknowledged after the daemon's durable write, publishing with headers (to
//! a stream with `Nats-Msg-Id` and a publish acknowledgement).

mod config;
mod driver;

pub use config::NatsConfig;
pub use driver::{
    Deliver, JetStreamSub, NatsHandle, NatsIn, PublishError, Sent, Subscription, start,
    valid_header_name, valid_header_value,
};
