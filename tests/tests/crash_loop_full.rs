//! Issue 7's acceptance size of the crash loop: 10,000 QoS 1 messages from 50 devices through
//! a real mosquitto, the daemon SIGKILLed at 20 moments; the agent gets each exactly once, in
//! per-device order. A test binary of its own, so it does not share the machine with others.

use std::time::Duration;

use gatehouse_e2e::*;

#[test]
fn full_crash_loop_10000_messages_50_devices_20_kills() {
    crash_loop("crash-loop-full", 50, 200, 20, Duration::from_secs(900));
}
