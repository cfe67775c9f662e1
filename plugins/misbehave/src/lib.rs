//! A deliberately bad plugin for the host's fault-isolation tests. Its payload says what to do:
//! `loop` spins forever, `alloc` grows memory without bound, `trap` panics, `count` increments a
//! counter in the key-value store and sends it, `kvfill` writes until the quota refuses;
//! anything else is echoed back as a send. Never shipped in the binary outside tests.

wit_bindgen::generate!({ path: "../../wit", world: "mapper" });

use gatehouse::plugin::types::Send;

struct Misbehave;

impl Guest for Misbehave {
    fn init(_config: Vec<(String, String)>) -> Result<(), Error> {
        Ok(())
    }

    fn on_external(msg: Message) -> Result<Vec<Action>, Error> {
        match msg.payload.as_slice() {
            b"loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            b"alloc" => {
                let mut hog: Vec<Vec<u8>> = Vec::new();
                loop {
                    hog.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hog);
                }
            }
            b"trap" => panic!("asked to trap"),
            b"count" => {
                use gatehouse::plugin::kv;
                let n = kv::get("count")
                    .and_then(|v| String::from_utf8(v).ok())
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0)
                    + 1;
                kv::set("count", n.to_string().as_bytes()).map_err(|e| Error {
                    code: "kv".into(),
                    message: e,
                })?;
                Ok(vec![Action::Send(Send {
                    content_type: "xmtp.org/text:1.0".into(),
                    payload: n.to_string().into_bytes(),
                    fallback: None,
                })])
            }
            b"kvfill" => {
                use gatehouse::plugin::kv;
                for i in 0.. {
                    if let Err(e) = kv::set(&format!("fill{i}"), &[0u8; 100]) {
                        return Err(Error {
                            code: "quota".into(),
                            message: e,
                        });
                    }
                }
                unreachable!()
            }
            other => Ok(vec![Action::Send(Send {
                content_type: "xmtp.org/text:1.0".into(),
                payload: other.to_vec(),
                fallback: None,
            })]),
        }
    }

    fn on_conversation(_msg: Message) -> Result<Vec<Action>, Error> {
        Ok(vec![])
    }
}

export!(Misbehave);
