//! Plugin grants, per-call limits and fault accounting (quarantine).
//!
//! A plugin only returns actions; the daemon carries them out only within the plugin's grants
//! (config.yaml `plugins.NAME.grants`) and limits. Anything outside is refused, counted, and the
//! message goes to the dead-letter store with the reason. Faults (traps, timeouts, running out
//! of fuel or memory, broken limits or grants) are counted; `quarantine_after` of them within
//! `fault_window_secs` quarantine the plugin: its routes stop taking messages, which stay
//! queued (fail closed) or pass unmapped (a route's `fail_open`), until the plugin is reloaded.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use gatehouse_host::Action;
use serde::Serialize;

use crate::config::{PluginConfig, Route, topic_matches};

/// Checks a call's actions against the per-call limits.
pub fn check_limits(cfg: &PluginConfig, actions: &[Action]) -> Result<(), String> {
    if actions.len() > cfg.max_actions {
        return Err(format!(
            "plugin returned {} actions; its limit is {}",
            actions.len(),
            cfg.max_actions
        ));
    }
    let bytes: usize = actions
        .iter()
        .map(|a| match a {
            Action::Send(s) => s.payload.len(),
            Action::Publish(p) => p.payload.len(),
            Action::Drop(r) => r.len(),
        })
        .sum();
    if bytes > cfg.max_bytes {
        return Err(format!(
            "plugin returned {bytes} bytes; its limit is {}",
            cfg.max_bytes
        ));
    }
    Ok(())
}

/// Whether a `send` of `content_type` is within the grants.
pub fn check_send(cfg: &PluginConfig, content_type: &str) -> Result<(), String> {
    if cfg
        .grants
        .content_types
        .iter()
        .any(|t| t == content_type || t == "*")
    {
        Ok(())
    } else {
        Err(format!(
            "send of content type {content_type} is outside the plugin's grants"
        ))
    }
}

/// Whether a `publish` to `channel`/`address` for `device` on `route` is within the grants.
/// `answer_to`: the response topic of the MQTT 5 request being answered (the route allowed
/// it when the request came in); publishing there is the route's reply.
pub fn check_publish(
    cfg: &PluginConfig,
    route: &Route,
    device: &str,
    channel: &str,
    address: &str,
    answer_to: Option<&str>,
) -> Result<(), String> {
    let channel_ok = match &cfg.grants.channels {
        Some(list) => list.iter().any(|c| c == channel),
        None => channel == route.channel,
    };
    let address_ok = match &cfg.grants.addresses {
        Some(patterns) => patterns
            .iter()
            .any(|p| topic_matches(&p.replace("{device}", device), address)),
        None => address == route.reply_topic(device),
    } || (channel == route.channel && answer_to == Some(address));
    if channel_ok && address_ok {
        Ok(())
    } else {
        Err(format!(
            "publish to {channel}:{address} is outside the plugin's grants"
        ))
    }
}

/// A plugin's counters, as `gatehouse plugins` shows them.
#[derive(Debug, Default, Serialize)]
pub struct PluginStats {
    /// Calls made.
    pub calls: u64,
    /// Faults: traps, timeouts, fuel or memory exhausted, broken limits or grants.
    pub faults: u64,
    /// Actions refused for being outside the grants or limits.
    pub refused_actions: u64,
    /// Messages sent to the dead-letter store because of this plugin.
    pub dead_letters: u64,
    /// Whether the plugin is quarantined.
    pub quarantined: bool,
    /// The last fault's reason.
    pub last_fault: Option<String>,
    /// Successful reloads since start.
    pub reloads: u64,
    /// Why the last reload was rejected (cleared by a successful one).
    pub last_reload_error: Option<String>,
    #[serde(skip)]
    recent: VecDeque<Instant>,
    /// The plugin file's (mtime, length) last tried by the watcher.
    #[serde(skip)]
    pub tried_stamp: Option<(std::time::SystemTime, u64)>,
}

impl PluginStats {
    /// A new version was loaded: the quarantine and the fault window start over.
    pub fn reloaded(&mut self) {
        self.quarantined = false;
        self.recent.clear();
        self.reloads += 1;
        self.last_reload_error = None;
    }

    /// Records a fault; returns true when it tips the plugin into quarantine.
    pub fn fault(&mut self, reason: &str, cfg: &PluginConfig, now: Instant) -> bool {
        self.faults += 1;
        self.last_fault = Some(reason.to_string());
        self.recent.push_back(now);
        let window = Duration::from_secs(cfg.fault_window_secs);
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            self.recent.pop_front();
        }
        if !self.quarantined && self.recent.len() >= cfg.quarantine_after {
            self.quarantined = true;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatehouse_host::Send;

    fn plugin(yaml: &str) -> PluginConfig {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn route() -> Route {
        serde_yaml::from_str(
            "{name: r, channel: mqtt, subscribe: 'devices/{device}/up', plugin: p}",
        )
        .unwrap()
    }

    fn send(t: &str, n: usize) -> Action {
        Action::Send(Send {
            content_type: t.into(),
            payload: vec![0; n],
            fallback: None,
        })
    }

    /// Action counts and byte totals over the limits are refused with the numbers.
    #[test]
    fn limits() {
        let p = plugin("{builtin: mqtt, max_actions: 2, max_bytes: 10}");
        assert!(check_limits(&p, &[send("a", 1), send("a", 1)]).is_ok());
        assert!(
            check_limits(&p, &[send("a", 1), send("a", 1), send("a", 1)])
                .unwrap_err()
                .contains("3 actions")
        );
        assert!(
            check_limits(&p, &[send("a", 11)])
                .unwrap_err()
                .contains("11 bytes")
        );
    }

    /// Content types and publish targets outside the grants are refused; defaults allow text,
    /// JSON and the route's own reply topic.
    #[test]
    fn grants() {
        let p = plugin("{builtin: mqtt}");
        let r = route();
        assert!(check_send(&p, "gatehouse.dev/json:1.0").is_ok());
        assert!(check_send(&p, "evil.example/exec:1.0").is_err());
        assert!(check_publish(&p, &r, "t1", "mqtt", "devices/t1/down", None).is_ok());
        assert!(
            check_publish(&p, &r, "t1", "mqtt", "devices/t2/down", None).is_err(),
            "another device's topic"
        );
        assert!(
            check_publish(&p, &r, "t1", "nats", "devices/t1/down", None).is_err(),
            "another channel"
        );
        let wide =
            plugin("{builtin: mqtt, grants: {addresses: ['alerts/#', 'devices/{device}/cmd']}}");
        assert!(check_publish(&wide, &r, "t1", "mqtt", "alerts/fire/east", None).is_ok());
        assert!(check_publish(&wide, &r, "t1", "mqtt", "devices/t1/cmd", None).is_ok());
        assert!(check_publish(&wide, &r, "t1", "mqtt", "devices/t2/cmd", None).is_err());
        // The response topic of the request being answered is the route's reply.
        assert!(check_publish(&p, &r, "t1", "mqtt", "replies/x", Some("replies/x")).is_ok());
        assert!(check_publish(&p, &r, "t1", "mqtt", "replies/y", Some("replies/x")).is_err());
    }

    /// `quarantine_after` faults within the window quarantine; older faults age out.
    #[test]
    fn quarantine() {
        let p = plugin("{builtin: mqtt, quarantine_after: 3, fault_window_secs: 10}");
        let mut s = PluginStats::default();
        let t0 = Instant::now();
        assert!(!s.fault("x", &p, t0));
        assert!(
            !s.fault("x", &p, t0 + Duration::from_secs(20)),
            "the first fault aged out"
        );
        assert!(!s.fault("x", &p, t0 + Duration::from_secs(21)));
        assert!(s.fault("x", &p, t0 + Duration::from_secs(22)));
        assert!(s.quarantined);
        assert_eq!(s.faults, 4);
    }
}
