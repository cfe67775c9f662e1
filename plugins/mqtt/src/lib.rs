//! The first-party MQTT mapper.
//!
//! Up: a device publish becomes conversation content: valid JSON as `gatehouse.dev/json:1.0`
//! (with the JSON text as fallback, so any XMTP client shows it), or UTF-8 text as
//! `xmtp.org/text:1.0` when `format: text`. Anything else is refused as `malformed`.
//! Down: a conversation message is published to the route's reply topic for the endpoint (the
//! host's `reply_topic`), or to `down_topic` when this plugin's config sets one.
//!
//! Config keys: `format` (`json` | `text` | `any`, default `json`), `down_topic`.

use std::cell::RefCell;

wit_bindgen::generate!({ path: "../../wit", world: "mapper" });

use gatehouse::plugin::host::{Level, log};
use gatehouse::plugin::types::{Publish, Send};

struct Config {
    format: String,
    down_topic: String,
    /// `down_topic` came from the plugin's own config (not the route's reply).
    own_down_topic: bool,
}

thread_local! {
    static CONFIG: RefCell<Config> = RefCell::new(Config { format: "json".into(), down_topic: "devices/{device}/down".into(), own_down_topic: false });
}

fn err(code: &str, message: impl Into<String>) -> Error {
    Error {
        code: code.into(),
        message: message.into(),
    }
}

struct Mqtt;

impl Guest for Mqtt {
    fn init(config: Vec<(String, String)>) -> Result<(), Error> {
        CONFIG.with(|c| {
            let mut c = c.borrow_mut();
            for (k, v) in config {
                match k.as_str() {
                    "format" if ["json", "text", "any"].contains(&v.as_str()) => c.format = v,
                    "format" => {
                        return Err(err(
                            "config",
                            format!("format must be json, text or any, not {v}"),
                        ));
                    }
                    "down_topic" => {
                        c.down_topic = v;
                        c.own_down_topic = true;
                    }
                    other => return Err(err("config", format!("unknown key {other}"))),
                }
            }
            Ok(())
        })
    }

    fn on_external(msg: Message) -> Result<Vec<Action>, Error> {
        let format = CONFIG.with(|c| c.borrow().format.clone());
        let json = serde_json::from_slice::<serde_json::Value>(&msg.payload);
        let text = std::str::from_utf8(&msg.payload);
        let send = match (format.as_str(), json, text) {
            ("json" | "any", Ok(v), _) => {
                let canonical = v.to_string();
                Send {
                    content_type: "gatehouse.dev/json:1.0".into(),
                    payload: canonical.clone().into_bytes(),
                    fallback: Some(canonical),
                }
            }
            ("json", Err(e), _) => {
                return Err(err("malformed", format!("payload is not JSON: {e}")));
            }
            (_, _, Ok(t)) => Send {
                content_type: "xmtp.org/text:1.0".into(),
                payload: t.as_bytes().to_vec(),
                fallback: None,
            },
            (_, _, Err(_)) => {
                return Err(err("malformed", "payload is neither JSON nor UTF-8 text"));
            }
        };
        log(
            Level::Debug,
            &format!("mapped {} bytes from {}", msg.payload.len(), msg.endpoint),
        );
        Ok(vec![Action::Send(send)])
    }

    fn on_conversation(msg: Message) -> Result<Vec<Action>, Error> {
        // The host's `reply_topic` (the route's reply with every placeholder filled) unless
        // this plugin was given its own `down_topic`.
        let template = CONFIG.with(|c| c.borrow().down_topic.clone());
        let endpoint = msg.endpoint.clone();
        let topic = match gatehouse_plugin_sdk::meta(&msg.metadata, "reply_topic") {
            Some(t) if CONFIG.with(|c| !c.borrow().own_down_topic) => t.to_string(),
            _ => {
                gatehouse_plugin_sdk::fill(&template, |k| (k == "device").then(|| endpoint.clone()))
                    .map_err(|e| err("config", e))?
            }
        };
        if !msg.content_type.starts_with("xmtp.org/text:")
            && !msg.content_type.starts_with("gatehouse.dev/json:")
        {
            return Ok(vec![Action::Drop(format!(
                "content type {} is not forwarded to devices",
                msg.content_type
            ))]);
        }
        // MQTT 5 carries it as the publish's Content Type (3.1.1 has nowhere to put it).
        let content_type = if msg.content_type.starts_with("xmtp.org/text:") {
            "text/plain; charset=utf-8"
        } else {
            "application/json"
        };
        Ok(vec![Action::Publish(Publish {
            channel: "mqtt".into(),
            address: topic,
            payload: msg.payload,
            metadata: vec![("content_type".into(), content_type.into())],
        })])
    }
}

export!(Mqtt);
