//! Channel drivers: the edges where external protocols meet the daemon.
//!
//! Contract: a driver connects, reconnects with backoff and jitter, reports its connection
//! state, and hands inbound messages to the daemon together with a way to acknowledge them.
//! It acknowledges a source only when the daemon says the message is durably stored. Drivers
//! know nothing about XMTP, plugins or routes.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod email;
pub mod mqtt;
pub mod nats;

/// Exponential backoff with full jitter: `base · 2^attempt`, capped, then a uniform draw.
pub fn backoff(
    attempt: u32,
    base: std::time::Duration,
    cap: std::time::Duration,
) -> std::time::Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(16));
    let ceiling = exp.min(cap);
    let ms = ceiling.as_millis().max(1) as u64;
    std::time::Duration::from_millis(rand::random::<u64>() % ms + 1)
}
