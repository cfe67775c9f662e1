//! A small crash loop: 1,000 QoS 1 messages from 10 devices, 3 SIGKILLs (see
//! [`gatehouse_e2e::crash_loop`]; issue 7's full size is `crash_loop_full.rs`, a binary of its
//! own so that it runs alone).

use std::time::Duration;

use gatehouse_e2e::*;

#[test]
fn small_crash_loop_delivers_every_message_once_in_order() {
    crash_loop("crash-loop", 10, 100, 3, Duration::from_secs(300));
}
