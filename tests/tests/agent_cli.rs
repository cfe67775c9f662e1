//! The agent CLI against a standalone `gatehouse node`: wallet keys from a file, sending by
//! Ethereum address, listening with a count and a timeout.

use gatehouse_e2e::*;
use sha2::Digest;

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
