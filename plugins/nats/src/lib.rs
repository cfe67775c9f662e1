//! The first-party NATS mapper.
//!
//! In: a message's payload becomes conversation content: JSON passes through as
//! `gatehouse.dev/json:1.0`; UTF-8 text as `xmtp.org/text:1.0` (`format: text`, or `any` when
//! it is not JSON); other bytes as JSON `{"subject":…,"base64":…}` (`format: bytes`, or `any`).
//! Headers reach the plugin as `header.NAME` metadata and are not forwarded.
//! Out: conversation text or JSON is published to `down_subject` (the route's `reply`, with
//! `{device}` or the route's placeholder filled in); the host sends it to a waiting request's
//! reply subject instead when there is one.
//!
//! Config keys: `format` (`json` | `text` | `bytes` | `any`, default `any`), `down_subject`.

use std::cell::RefCell;

use gatehouse_plugin_sdk::*;

struct Config {
    format: String,
    down_subject: String,
}

thread_local! {
    static CONFIG: RefCell<Config> = RefCell::new(Config { format: "any".into(), down_subject: String::new() });
}

/// Base64 (standard alphabet, padded).
pub fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = c
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The conversation content for a payload under `format`.
pub fn map_in(format: &str, subject: &str, payload: &[u8]) -> Result<Action, Error> {
    let json = serde_json::from_slice::<serde_json::Value>(payload);
    let text = std::str::from_utf8(payload);
    let bytes = || {
        let doc = serde_json::json!({ "subject": subject, "base64": base64(payload) }).to_string();
        send_json(&doc)
    };
    Ok(match (format, json, text) {
        ("json" | "any", Ok(v), _) => send_json(&v.to_string()),
        ("json", Err(e), _) => return Err(error("malformed", format!("payload is not JSON: {e}"))),
        ("text" | "any", _, Ok(t)) => send_text(t),
        ("text", _, Err(_)) => return Err(error("malformed", "payload is not UTF-8 text")),
        _ => bytes(),
    })
}

struct Nats;

impl Guest for Nats {
    fn init(config: Vec<(String, String)>) -> Result<(), Error> {
        CONFIG.with(|c| {
            let mut c = c.borrow_mut();
            for (k, v) in config {
                match k.as_str() {
                    "format" if ["json", "text", "bytes", "any"].contains(&v.as_str()) => {
                        c.format = v
                    }
                    "format" => {
                        return Err(error(
                            "config",
                            format!("format must be json, text, bytes or any, not {v}"),
                        ));
                    }
                    "down_subject" => c.down_subject = v,
                    other => return Err(error("config", format!("unknown key {other}"))),
                }
            }
            Ok(())
        })
    }

    fn on_external(msg: Message) -> Result<Vec<Action>, Error> {
        let format = CONFIG.with(|c| c.borrow().format.clone());
        let subject = meta(&msg.metadata, "subject").unwrap_or("");
        Ok(vec![map_in(&format, subject, &msg.payload)?])
    }

    fn on_conversation(msg: Message) -> Result<Vec<Action>, Error> {
        if !msg.content_type.starts_with("xmtp.org/text:")
            && !msg.content_type.starts_with("gatehouse.dev/json:")
        {
            return Ok(vec![Action::Drop(format!(
                "content type {} is not published to NATS",
                msg.content_type
            ))]);
        }
        let template = CONFIG.with(|c| c.borrow().down_subject.clone());
        if template.is_empty() {
            return Ok(vec![Action::Drop(
                "no down_subject (route reply) set".into(),
            )]);
        }
        let endpoint = msg.endpoint.clone();
        // Any `{name}` token is the endpoint (routes may call it {device}, {service}, …).
        let subject =
            fill(&template, |_| Some(endpoint.clone())).map_err(|e| error("config", e))?;
        Ok(vec![publish("nats", &subject, msg.payload)])
    }
}

export!(Nats);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn payloads_map_by_format() {
        let kind = |a: Action| match a {
            Action::Send(s) => (s.content_type, String::from_utf8(s.payload).unwrap()),
            _ => panic!("not a send"),
        };
        assert_eq!(
            kind(map_in("any", "s", b"{\"a\": 1}").unwrap()).0,
            "gatehouse.dev/json:1.0"
        );
        assert_eq!(
            kind(map_in("any", "s", b"hello").unwrap()),
            ("xmtp.org/text:1.0".into(), "hello".into())
        );
        let (t, body) = kind(map_in("any", "s.x", &[0xff, 0x00]).unwrap());
        assert_eq!(t, "gatehouse.dev/json:1.0");
        assert_eq!(body, r#"{"base64":"/wA=","subject":"s.x"}"#);
        assert!(map_in("json", "s", b"nope").is_err());
        assert!(map_in("text", "s", &[0xff]).is_err());
    }
}
