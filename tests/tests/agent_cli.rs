//! The agent CLI against a standalone `gatehouse node`: wallet keys from a file, sending by
//! Ethereum address, listening with a count and a timeout.

use gatehouse_e2e::*;
use sha2::Digest;

/// A fresh directory `gatehouse-e2e-NAME-PID`, a standalone node in it, and agents `a` and `c`
/// on that node (not yet initialised).
fn node_and_two_agents(name: &str) -> (std::path::PathBuf, StandaloneNode, Agent, Agent) {
    let dir = std::env::temp_dir().join(format!("gatehouse-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let node = StandaloneNode::start(&dir);
    let (a, c) = (
        Agent::at(dir.join("a"), node.url.clone()),
        Agent::at(dir.join("c"), node.url.clone()),
    );
    (dir, node, a, c)
}

/// An agent initialised from a wallet-key file gets the address of that key and XMTP's inbox
/// id for it; another agent reaches it by that address.
#[test]
fn wallet_key_and_address_resolution() {
    let dir = std::env::temp_dir().join(format!("gatehouse-e2e-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let node = StandaloneNode::start(&dir);
    // secp256k1 private key 1: its Ethereum address is the well-known 0x7e5f…5bdf.
    let key_file = dir.join("wallet.hex");
    std::fs::write(&key_file, format!("0x{}1\n", "0".repeat(63))).unwrap();
    let c = Agent::at(dir.join("c"), node.url.clone());
    let d = Agent::at(dir.join("d"), node.url.clone());
    let inbox_c = c
        .ok(&["init", "--wallet-key", key_file.to_str().unwrap()])
        .trim()
        .to_string();
    let id: serde_json::Value = serde_json::from_str(&c.ok(&["id", "--json"])).unwrap();
    let address = "0x7e5f4552091a69125d5dfcb7b8c2659029395bdf";
    assert_eq!(id["address"], address);
    // XMTP's inbox id: lowercase hex SHA-256 of the address followed by the nonce (1).
    assert_eq!(
        inbox_c,
        hex::encode(sha2::Sha256::digest(format!("{address}1")))
    );
    assert_eq!(id["inbox_id"], inbox_c.as_str());

    d.init();
    let conv = d.send(address, "hello by address");
    let got = c.listen(1);
    assert_eq!(got[0]["text"], "hello by address");
    assert_eq!(got[0]["conversation"], conv.as_str());
    assert_eq!(got[0]["content_type"], "xmtp.org/text:1.0");

    // JSON content travels as gatehouse.dev/json:1.0; invalid JSON is refused before sending.
    d.ok(&["send", "--to", address, "--type", "json", r#"{"set": 19}"#]);
    let got = c.listen(1);
    assert_eq!(got[0]["content_type"], "gatehouse.dev/json:1.0");
    assert_eq!(got[0]["text"], r#"{"set":19}"#);
    let out = d.run(&["send", "--to", address, "--type", "json", "{nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid JSON"));

    // Nothing more is waiting: a bounded listen times out with status 3.
    let out = c.run(&["listen", "--json", "--count", "1", "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(3));
    // An address with no inbox is a clear error.
    let out = d.run(&[
        "send",
        "--to",
        "0x0000000000000000000000000000000000000bad",
        "x",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no XMTP inbox"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// An agent whose inbox is owned by a (software) passkey registers, is reachable, and shows
/// the passkey as its identifier and recovery.
#[test]
fn passkey_agent() {
    let dir = std::env::temp_dir().join(format!("gatehouse-e2e-passkey-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let node = StandaloneNode::start(&dir);
    let p = Agent::at(dir.join("p"), node.url.clone());
    let other = Agent::at(dir.join("o"), node.url.clone());
    let key_file = dir.join("passkey.hex");
    let inbox = p
        .ok(&["init", "--passkey", key_file.to_str().unwrap()])
        .trim()
        .to_string();
    assert!(key_file.exists(), "the passkey file is created");
    let shown: serde_json::Value =
        serde_json::from_str(&p.ok(&["identity", "show", "--json"])).unwrap();
    let passkey_hex = shown["recovery"].as_str().unwrap().to_string();
    assert_eq!(passkey_hex.len(), 66, "a compressed P-256 key");
    assert_eq!(shown["identifiers"], serde_json::json!([passkey_hex]));
    assert_eq!(
        inbox,
        hex::encode(sha2::Sha256::digest(format!("{passkey_hex}1")))
    );
    other.init();
    other.send(&inbox, "to a passkey inbox");
    assert_eq!(p.listen(1)[0]["text"], "to a passkey inbox");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Consent from the CLI: a stranger's DM is a request (shown once, marked, listed by
/// `requests`); after `consent deny` its messages vanish and the sender sees nothing; the
/// list shows the decision.
#[test]
fn consent_requests_and_deny() {
    let (dir, node, a, c) = node_and_two_agents("consent");
    let (ia, ic) = (a.init(), c.init());
    c.send(&ia, "may I?");
    let got = a.listen(1);
    assert_eq!(got[0]["text"], "may I?");
    assert_eq!(got[0]["request"], true);
    let reqs = a.ok(&["requests", "--json"]);
    assert!(reqs.contains("may I?") && reqs.contains(&ic), "{reqs}");

    a.ok(&["consent", "deny", &ic]);
    c.send(&ia, "hello??");
    let out = a.run(&["listen", "--json", "--count", "1", "--timeout", "3"]);
    assert_eq!(out.status.code(), Some(3), "denied: nothing shown");
    assert!(a.ok(&["requests", "--json"]).trim().is_empty());
    let listed = a.ok(&["consent", "list", "--json"]);
    let rec: serde_json::Value = serde_json::from_str(listed.trim()).unwrap();
    assert_eq!(
        (
            rec["kind"].as_str(),
            rec["entity"].as_str(),
            rec["state"].as_str()
        ),
        (Some("inbox_id"), Some(ic.as_str()), Some("denied"))
    );
    // The sender's view carries no trace of the block.
    let out = c.run(&["listen", "--json", "--count", "1", "--timeout", "2"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(out.stdout.is_empty());

    a.ok(&["consent", "allow", &ic]);
    c.send(&ia, "thanks");
    assert_eq!(a.listen(1)[0]["text"], "thanks");
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `agent listen` waits out a node that goes away and comes back, as `mosquitto_sub` waits out
/// its broker: it says on stderr what it is waiting for, and the message sent after the restart
/// is printed (it used to exit with the connection error).
#[test]
fn listen_waits_out_a_node_restart() {
    use std::io::BufRead as _;
    let (dir, node, a, c) = node_and_two_agents("listen-restart");
    let port: u16 = node.url.rsplit(':').next().unwrap().parse().unwrap();
    let (ia, _) = (a.init(), c.init());
    let stderr = dir.join("listen.err");
    let mut listen = Proc(
        std::process::Command::new(gatehouse_bin())
            .args(["agent", "--home"])
            .arg(&a.home)
            .args(["--node", &node.url, "listen", "--json", "--count", "2"])
            .args(["--timeout", "120"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut lines = std::io::BufReader::new(listen.0.stdout.take().unwrap()).lines();
    let mut next_text = || {
        let line = lines.next().expect("listen ended early").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        v["text"].as_str().unwrap().to_string()
    };
    c.send(&ia, "before");
    assert_eq!(next_text(), "before");

    drop(node);
    wait_for("listen to notice the node is gone", || {
        std::fs::read_to_string(&stderr)
            .unwrap_or_default()
            .contains("the node is unreachable")
            .then_some(())
    });
    let _node = StandaloneNode::start_on(&dir, port);
    c.send(&ia, "after");
    assert_eq!(next_text(), "after");
    let status = listen.0.wait().unwrap();
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(&stderr).unwrap_or_default()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A message record the agent's store can no longer read (a damaged disk, a hand edit) is
/// set aside with its bytes, not dropped: `listen` says so on stderr and still prints the
/// next message, `unreadable` shows the record with its bytes, and `--forget` drops it.
#[test]
fn an_unreadable_owed_message_is_shown_and_can_be_forgotten() {
    let (dir, node, a, c) = node_and_two_agents("unreadable");
    let ia = a.init();
    c.init();
    // An owed message whose record was cut short on disk (the agent is not running).
    let damaged: &[u8] = br#"{"content":"6f6e","received":{"id"#;
    {
        let db = sled::open(dir.join("a/db")).unwrap();
        let mut key = b"deliv/".to_vec();
        key.extend_from_slice(&7u64.to_be_bytes());
        db.open_tree("agent").unwrap().insert(key, damaged).unwrap();
        db.flush().unwrap();
    }

    c.send(&ia, "after the damage");
    let out = a.run(&["listen", "--json", "--count", "1", "--timeout", "20"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let got: serde_json::Value =
        serde_json::from_slice(out.stdout.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(got["text"], "after the damage");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("1 stored message record(s) could not be read"),
        "{stderr}"
    );

    let shown: serde_json::Value =
        serde_json::from_str(a.ok(&["unreadable", "--json"]).trim()).unwrap();
    assert_eq!(shown["record"], "deliv/7");
    assert_eq!(shown["what"], "owed answer");
    assert_eq!(shown["bytes"], damaged.len());
    assert_eq!(shown["payload"], hex::encode(damaged));
    assert!(
        shown["problem"].as_str().unwrap().starts_with("cut short"),
        "{shown}"
    );
    // Shown again until forgotten, then gone.
    assert!(a.ok(&["unreadable", "--forget"]).contains("deliv/7"));
    assert!(a.ok(&["unreadable"]).trim().is_empty());
    let out = a.run(&["listen", "--json", "--count", "1", "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("could not be read"));
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}
