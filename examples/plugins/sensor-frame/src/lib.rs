//! Decodes a binary sensor frame into JSON, and passes text commands back down.
//!
//! Frame (6 bytes, big-endian): version (1), sensor id (u16), temperature in 1/100 °C (i16),
//! battery percent (u8). Anything else is refused as `malformed` (and dead-lettered by the host).
//! Each JSON carries `frame`: how many frames this device has sent (kept in the plugin's
//! key-value store, so it survives restarts).
//! Config: `down_topic` (default `devices/{device}/down`).

use gatehouse_plugin_sdk::*;
use std::cell::RefCell;

thread_local!(static DOWN: RefCell<String> = RefCell::new("devices/{device}/down".into()));

struct SensorFrame;

impl Guest for SensorFrame {
    fn init(config: Vec<(String, String)>) -> Result<(), Error> {
        if let Some((_, t)) = config.into_iter().find(|(k, _)| k == "down_topic") {
            DOWN.with(|d| *d.borrow_mut() = t);
        }
        Ok(())
    }

    fn on_external(msg: Message) -> Result<Vec<Action>, Error> {
        let [1, id_hi, id_lo, t_hi, t_lo, battery] = msg.payload[..] else {
            return Err(error(
                "malformed",
                format!(
                    "expected a 6-byte v1 frame, got {} bytes",
                    msg.payload.len()
                ),
            ));
        };
        let temperature = i16::from_be_bytes([t_hi, t_lo]) as f64 / 100.0;
        // Frames seen from this device, kept in the plugin's durable key-value store.
        let key = format!("frames/{}", msg.endpoint);
        let frame = kv::get(&key)
            .and_then(|v| Some(u64::from_be_bytes(v.try_into().ok()?)))
            .unwrap_or(0)
            + 1;
        kv::set(&key, &frame.to_be_bytes()).map_err(|e| error("kv", e))?;
        let json = format!(
            r#"{{"sensor":{},"temperature_c":{temperature},"battery_pct":{battery},"frame":{frame}}}"#,
            u16::from_be_bytes([id_hi, id_lo])
        );
        Ok(vec![send_json(&json)])
    }

    fn on_conversation(msg: Message) -> Result<Vec<Action>, Error> {
        let topic = DOWN.with(|d| d.borrow().replace("{device}", &msg.endpoint));
        Ok(vec![publish("mqtt", &topic, msg.payload)])
    }
}

export!(SensorFrame);
