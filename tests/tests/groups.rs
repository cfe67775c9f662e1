//! Groups end to end: create, send, info, policy-checked remove, re-add — real binary, real node.

use gatehouse_e2e::*;

/// A creates a group with B and C; everyone reads; C (not an admin) may not remove B; A
/// removes C, who reads nothing more; B (any member may add) brings C back.
#[test]
fn group_lifecycle() {
    let dir = std::env::temp_dir().join(format!("gatehouse-e2e-groups-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let node = StandaloneNode::start(&dir);
    let (a, b, c) = (
        Agent::at(dir.join("a"), node.url.clone()),
        Agent::at(dir.join("b"), node.url.clone()),
        Agent::at(dir.join("c"), node.url.clone()),
    );
    let (ia, ib, ic) = (a.init(), b.init(), c.init());

    let gid = a
        .ok(&[
            "group", "create", "--name", "team", "--member", &ib, "--member", &ic,
        ])
        .trim()
        .to_string();
    a.ok(&["send", "--conversation", &gid, "hi team"]);
    for member in [&b, &c] {
        let got = member.listen(1);
        assert_eq!(got[0]["text"], "hi team");
        assert_eq!(got[0]["conversation"], gid.as_str());
        assert_eq!(got[0]["sender_inbox"], ia.as_str());
    }
    let info: serde_json::Value =
        serde_json::from_str(b.ok(&["group", "info", "--conversation", &gid]).trim()).unwrap();
    assert_eq!(info["kind"], "group");
    assert_eq!(info["name"], "team");
    let mut members = vec![ia.clone(), ib.clone(), ic.clone()];
    members.sort();
    assert_eq!(info["members"], serde_json::json!(members));
    assert_eq!(info["super_admins"], serde_json::json!([ia]));
    // Every member is a Gatehouse installation, so the group is post-quantum.
    assert_eq!(
        info["ciphersuite"],
        "MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519"
    );

    // Any member may rename the group; only a super admin may appoint admins.
    b.ok(&["group", "set", "--conversation", &gid, "--name", "renamed"]);
    let out = c.run(&["group", "admin", "--conversation", &gid, "--add", &ic]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("add admins"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value =
        serde_json::from_str(a.ok(&["group", "info", "--conversation", &gid]).trim()).unwrap();
    assert_eq!(info["name"], "renamed");
    assert_eq!(info["admins"], serde_json::json!([]));

    // The default policy lets only admins remove members.
    let out = c.run(&["group", "remove", "--conversation", &gid, "--member", &ib]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("policy"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    a.ok(&["group", "remove", "--conversation", &gid, "--member", &ic]);
    a.ok(&["send", "--conversation", &gid, "without c"]);
    assert_eq!(b.listen(1)[0]["text"], "without c");
    let out = c.run(&["listen", "--json", "--count", "1", "--timeout", "2"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "C must read nothing after removal: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A makes B an admin; now B may remove members (and B's removal of C is accepted by A).
    a.ok(&["group", "admin", "--conversation", &gid, "--add", &ib]);
    let info: serde_json::Value =
        serde_json::from_str(b.ok(&["group", "info", "--conversation", &gid]).trim()).unwrap();
    assert_eq!(info["admins"], serde_json::json!([ib]));

    // Any member may add: B brings C back, and C reads again.
    b.ok(&["group", "add", "--conversation", &gid, "--member", &ic]);
    b.ok(&["send", "--conversation", &gid, "welcome back"]);
    let got = c.listen(1);
    assert_eq!(got[0]["text"], "welcome back");
    assert_eq!(got[0]["conversation"], gid.as_str());
    assert_eq!(a.listen(1)[0]["text"], "welcome back");

    // C asks to leave; A (super admin) carries it out at its next read.
    c.ok(&["group", "leave", "--conversation", &gid]);
    let got = a.listen(1);
    assert_eq!(got[0]["content_type"], "xmtp.org/leave_request:1.0");
    assert_eq!(got[0]["sender_inbox"], ic.as_str());
    let info: serde_json::Value =
        serde_json::from_str(a.ok(&["group", "info", "--conversation", &gid]).trim()).unwrap();
    let mut members = vec![ia.clone(), ib.clone()];
    members.sort();
    assert_eq!(info["members"], serde_json::json!(members));
    let _ = std::fs::remove_dir_all(&dir);
}
