//! Issue 7's acceptance size of the crash loop: 10,000 QoS 1 messages from 50 devices through
//! a real mosquitto, the daemon SIGKILLed at 20 moments; the agent gets each exactly once, in
//! per-device order; and the reverse: 10,000 messages from the agent to 50 devices with 20
//! SIGKILLs, each reaching its device exactly once, in order. A test binary of its own, so it
//! does not share the machine with other tests (its two tests run one after the other).

use std::sync::Mutex;
use std::time::Duration;

use gatehouse_e2e::*;

/// One loop at a time.
static ALONE: Mutex<()> = Mutex::new(());

#[test]
fn full_crash_loop_10000_messages_50_devices_20_kills() {
    let _alone = ALONE.lock().unwrap_or_else(|p| p.into_inner());
    crash_loop("crash-loop-full", 50, 200, 20, Duration::from_secs(900));
}

#[test]
fn full_reverse_crash_loop_10000_messages_50_devices_20_kills() {
    let _alone = ALONE.lock().unwrap_or_else(|p| p.into_inner());
    reverse_crash_loop("crash-loop-full-reverse", 50, 200, 20, "3.1.1");
}
