//! Identity end to end: a second installation, revocation, and `whois`, against the real binary.

use gatehouse_e2e::*;

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("{e}: {s}"))
}

/// Agent A adds a second installation and revokes the first: the first can no longer reach B,
/// B's next message goes to the second, the second continues the same conversation, and
/// `whois` follows the change.
#[test]
fn second_installation_and_revocation() {
    let dir = std::env::temp_dir().join(format!("gatehouse-e2e-identity-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let node = StandaloneNode::start(&dir);
    let key_file = dir.join("a.key");
    std::fs::write(
        &key_file,
        "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318",
    )
    .unwrap();
    let key = key_file.to_str().unwrap();
    let (a1, a2, b) = (
        Agent::at(dir.join("a1"), node.url.clone()),
        Agent::at(dir.join("a2"), node.url.clone()),
        Agent::at(dir.join("b"), node.url.clone()),
    );

    let inbox_a = a1.ok(&["init", "--wallet-key", key]).trim().to_string();
    let inbox_b = b.init();
    let conv = b.send(&inbox_a, "one");
    assert_eq!(a1.listen(1)[0]["text"], "one");

    // The same wallet in another home is a second installation of the same inbox.
    let added = a2
        .ok(&["identity", "add-installation", "--wallet-key", key])
        .trim()
        .to_string();
    assert_eq!(
        json(&a2.ok(&["id", "--json"]))["inbox_id"],
        inbox_a.as_str()
    );
    assert_eq!(
        json(&a2.ok(&["id", "--json"]))["installation_key"],
        added.as_str()
    );
    let key1 = json(&a1.ok(&["id", "--json"]))["installation_key"]
        .as_str()
        .unwrap()
        .to_string();
    let key2 = json(&a2.ok(&["id", "--json"]))["installation_key"]
        .as_str()
        .unwrap()
        .to_string();
    let shown = json(&a2.ok(&["identity", "show", "--json"]));
    let installs: Vec<&str> = shown["installations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        installs.contains(&key1.as_str()) && installs.contains(&key2.as_str()),
        "{shown}"
    );

    // Revoke the first installation from the second (the wallet is the recovery address).
    a2.ok(&["identity", "revoke-installation", &key1]);
    let who = json(&b.ok(&[
        "whois",
        "0x2c7536e3605d9c16a7a3d7b1898e529396a65c23",
        "--json",
    ]));
    assert_eq!(who["inbox_id"], inbox_a.as_str());
    assert_eq!(who["installations"], serde_json::json!([key2]));

    // The revoked installation cannot send any more.
    let out = a1.run(&["send", "--to", &inbox_b, "from the revoked one"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("revoked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // B's next message reaches the second installation, in the same conversation.
    assert_eq!(b.send(&inbox_a, "two"), conv);
    let got = a2.listen(1);
    assert_eq!(got[0]["text"], "two");
    assert_eq!(got[0]["conversation"], conv.as_str());
    // The second installation continues the conversation; B sees it come from installation 2.
    assert_eq!(a2.send(&inbox_b, "three"), conv);
    let got = b.listen(1);
    assert_eq!(got[0]["text"], "three");
    assert_eq!(got[0]["sender_installation"], key2.as_str());
    // Nothing from the revoked installation ever reached B.
    let out = b.run(&["listen", "--json", "--count", "1", "--timeout", "1"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
