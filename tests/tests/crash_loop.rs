//! A small crash loop: 1,000 QoS 1 messages from 10 devices, 3 SIGKILLs (see
//! [`gatehouse_e2e::crash_loop`]; issue 7's full size is `crash_loop_full.rs`, a binary of its
//! own so that it runs alone).

use std::time::Duration;

use gatehouse_e2e::*;

#[test]
fn small_crash_loop_delivers_every_message_once_in_order() {
    crash_loop("crash-loop", 10, 100, 3, Duration::from_secs(300));
}

/// The other way, exactly once: the agent sends 1,000 messages to 10 devices while the daemon
/// is SIGKILLed 5 times (see [`gatehouse_e2e::reverse_crash_loop`]).
#[test]
fn reverse_crash_loop_delivers_every_message_once_in_order() {
    reverse_crash_loop("crash-loop-reverse", 10, 100, 5, "3.1.1");
}

/// The same with the daemon's broker connection on MQTT 5 (its own connection loop).
#[test]
fn reverse_crash_loop_on_mqtt5_delivers_every_message_once_in_order() {
    reverse_crash_loop("crash-loop-reverse-5", 10, 100, 5, "5");
}
