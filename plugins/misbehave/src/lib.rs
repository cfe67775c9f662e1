//! A deliberately bad plugin for the fault-isolation tests (host and daemon). Its payload says
//! what to do, in either direction:
//!
//! - `loop` spins forever; `alloc` asks for 1 GiB at once; `trap` panics;
//! - `many` returns 10,000 actions; `open` tries to read a file from the host;
//! - `outside` publishes to a topic outside any sensible grant (`outside/grants`);
//! - `count` increments a counter in the key-value store and sends it; `kvfill` writes until
//!   the quota refuses;
//! - anything else is echoed: as a text send from the device, or as a publish on the route's
//!   down topic from a conversation.
//!
//! Never shipped in the binary outside tests.

wit_bindgen::generate!({ path: "../../wit", world: "mapper" });

use std::sync::OnceLock;

use gatehouse::plugin::types::{Publish, Send};

static DOWN_TOPIC: OnceLock<String> = OnceLock::new();

struct Misbehave;

fn send(payload: Vec<u8>) -> Action {
    Action::Send(Send {
        content_type: "xmtp.org/text:1.0".into(),
        payload,
        fallback: None,
    })
}

fn publish(address: String, payload: Vec<u8>) -> Action {
    Action::Publish(Publish {
        channel: "mqtt".into(),
        address,
        payload,
        metadata: vec![],
    })
}

/// The faults and tricks shared by both directions; `None` for an ordinary payload.
fn misbehave(payload: &[u8]) -> Option<Result<Vec<Action>, Error>> {
    Some(match payload {
        b"loop" => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        b"alloc" => {
            let hog = vec![1u8; 1 << 30];
            std::hint::black_box(&hog);
            Ok(vec![])
        }
        b"trap" => panic!("asked to trap"),
        b"many" => Ok((0..10_000)
            .map(|i| send(i.to_string().into_bytes()))
            .collect()),
        b"open" => match std::fs::read("/etc/hostname") {
            // Reaching the host's files would be a sandbox escape: the test looks for this.
            Ok(bytes) => Ok(vec![send(bytes)]),
            Err(e) => Err(Error {
                code: "io".into(),
                message: e.to_string(),
            }),
        },
        b"outside" => Ok(vec![publish("outside/grants".into(), b"escaped".to_vec())]),
        b"count" => {
            use gatehouse::plugin::kv;
            let n = kv::get("count")
                .and_then(|v| String::from_utf8(v).ok())
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
                + 1;
            kv::set("count", n.to_string().as_bytes())
                .map(|()| vec![send(n.to_string().into_bytes())])
                .map_err(|e| Error {
                    code: "kv".into(),
                    message: e,
                })
        }
        b"kvfill" => {
            use gatehouse::plugin::kv;
            for i in 0.. {
                if let Err(e) = kv::set(&format!("fill{i}"), &[0u8; 100]) {
                    return Some(Err(Error {
                        code: "quota".into(),
                        message: e,
                    }));
                }
            }
            unreachable!()
        }
        _ => return None,
    })
}

impl Guest for Misbehave {
    fn init(config: Vec<(String, String)>) -> Result<(), Error> {
        if let Some((_, t)) = config.into_iter().find(|(k, _)| k == "down_topic") {
            let _ = DOWN_TOPIC.set(t);
        }
        Ok(())
    }

    fn on_external(msg: Message) -> Result<Vec<Action>, Error> {
        misbehave(&msg.payload).unwrap_or_else(|| Ok(vec![send(msg.payload)]))
    }

    fn on_conversation(msg: Message) -> Result<Vec<Action>, Error> {
        misbehave(&msg.payload).unwrap_or_else(|| {
            let down = DOWN_TOPIC.get().map_or("{device}/down", String::as_str);
            Ok(vec![publish(
                down.replace("{device}", &msg.endpoint),
                msg.payload,
            )])
        })
    }
}

export!(Misbehave);
