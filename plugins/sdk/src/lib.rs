//! The Gatehouse plugin SDK: the `gatehouse:plugin@0.1.0` bindings, generated once here, and
//! helpers. A plugin is a `cdylib` that implements [`Guest`] and calls [`export!`]:
//!
//! ```ignore
//! use gatehouse_plugin_sdk::*;
//!
//! struct Upper;
//! impl Guest for Upper {
//!     fn init(_config: Vec<(String, String)>) -> Result<(), Error> { Ok(()) }
//!     fn on_external(msg: Message) -> Result<Vec<Action>, Error> {
//!         let text = String::from_utf8(msg.payload).map_err(|_| error("malformed", "not UTF-8"))?;
//!         Ok(vec![send_text(&text.to_uppercase())])
//!     }
//!     fn on_conversation(_msg: Message) -> Result<Vec<Action>, Error> { Ok(vec![]) }
//! }
//! export!(Upper);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` and point
//! `plugins.NAME.path` in config.yaml at the `.wasm` file.

#![deny(unsafe_code)]

#[doc(hidden)]
#[allow(unsafe_code, missing_docs)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "mapper",
        pub_export_macro: true,
        export_macro_name: "export",
        default_bindings_module: "gatehouse_plugin_sdk::bindings",
    });
}

pub use bindings::Guest;
pub use bindings::gatehouse::plugin::host::{Level, log, now_ms};
/// The plugin's durable key-value store (`kv::get`, `kv::set`, `kv::delete`), capped by its
/// `kv_quota_bytes`.
pub use bindings::gatehouse::plugin::kv;
pub use bindings::gatehouse::plugin::types::{Action, Error, Message, Publish, Send};
#[doc(hidden)]
pub use bindings::*;

/// An error with a short machine-readable `code` (`malformed`, `unsupported`, …).
pub fn error(code: &str, message: impl Into<String>) -> Error {
    Error {
        code: code.into(),
        message: message.into(),
    }
}

/// Sends UTF-8 text into the conversation (`xmtp.org/text:1.0`).
pub fn send_text(text: &str) -> Action {
    Action::Send(Send {
        content_type: "xmtp.org/text:1.0".into(),
        payload: text.as_bytes().to_vec(),
        fallback: None,
    })
}

/// Sends a JSON document into the conversation (`gatehouse.dev/json:1.0`, the JSON text as
/// the fallback XMTP clients show).
pub fn send_json(json: &str) -> Action {
    Action::Send(Send {
        content_type: "gatehouse.dev/json:1.0".into(),
        payload: json.as_bytes().to_vec(),
        fallback: Some(json.to_string()),
    })
}

/// Publishes `payload` to `address` on `channel` (within the plugin's grants).
pub fn publish(channel: &str, address: &str, payload: Vec<u8>) -> Action {
    Action::Publish(Publish {
        channel: channel.into(),
        address: address.into(),
        payload,
        metadata: vec![],
    })
}

/// Looks a key up in a WIT metadata list.
pub fn meta<'a>(metadata: &'a [(String, String)], key: &str) -> Option<&'a str> {
    metadata
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Fills `{name}` placeholders of a template from a lookup.
pub fn fill(template: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| format!("unclosed '{{' in {template}"))?
            + start;
        let name = &rest[start + 1..end];
        out.push_str(
            &lookup(name).ok_or_else(|| format!("no value for {{{name}}} in {template}"))?,
        );
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn fill_template() {
        let r = super::fill("devices/{device}/down", |k| {
            (k == "device").then(|| "t1".to_string())
        });
        assert_eq!(r.unwrap(), "devices/t1/down");
        assert!(super::fill("x/{nope}", |_| None).is_err());
    }
}
