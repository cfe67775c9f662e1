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

/// XMTP's standard content types travel end to end from the CLI, refer to XMTP message ids,
/// and a third member sees each commit as a `group_updated` transcript.
#[test]
fn content_types_and_transcripts() {
    let dir = std::env::temp_dir().join(format!("gatehouse-e2e-content-{}", std::process::id()));
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
        .ok(&["group", "create", "--name", "team", "--member", &ib])
        .trim()
        .to_string();
    let sent: serde_json::Value = serde_json::from_str(
        a.ok(&["send", "--conversation", &gid, "--json", "question?"])
            .trim(),
    )
    .unwrap();
    let got = b.listen(1);
    // Sender and receiver derive the same XMTP message id.
    assert_eq!(got[0]["message_id"], sent["message_id"]);
    let mid = sent["message_id"].as_str().unwrap();

    std::fs::write(dir.join("report.csv"), "t,21.5\n").unwrap();
    for args in [
        vec!["--type", "reply", "--reference", mid, "answer"],
        vec!["--type", "reaction", "--reference", mid, "👍"],
        vec!["--type", "read-receipt"],
        vec![
            "--type",
            "attachment",
            "--file",
            dir.join("report.csv").to_str().unwrap(),
            "--mime",
            "text/csv",
        ],
    ] {
        let mut full = vec!["send", "--conversation", &gid];
        full.extend(args);
        b.ok(&full);
    }
    let got = a.listen(4);
    let pairs: Vec<(String, String)> = got
        .iter()
        .map(|m| {
            (
                m["content_type"].as_str().unwrap().to_string(),
                m["text"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        pairs,
        vec![
            (
                "xmtp.org/reply:1.0".into(),
                format!("(reply to {mid}) answer")
            ),
            (
                "xmtp.org/reaction:2.0".into(),
                format!("(reacted 👍 to {mid})")
            ),
            ("xmtp.org/readReceipt:1.0".into(), "(read)".into()),
            (
                "xmtp.org/attachment:1.0".into(),
                "(attachment report.csv text/csv, 7 bytes)".into()
            ),
        ]
    );
    // A reply without a reference is refused with a readable error.
    let out = b.run(&["send", "--conversation", &gid, "--type", "reply", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--reference"));

    // Commits show as transcripts to the other members (only with --transcripts).
    a.ok(&["group", "add", "--conversation", &gid, "--member", &ic]);
    a.ok(&["group", "set", "--conversation", &gid, "--name", "crew"]);
    let got = b.ok(&[
        "listen",
        "--json",
        "--transcripts",
        "--count",
        "2",
        "--timeout",
        "60",
    ]);
    let texts: Vec<serde_json::Value> = got
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        texts
            .iter()
            .all(|m| m["content_type"] == "xmtp.org/group_updated:1.0")
    );
    assert_eq!(texts[0]["text"], format!("{ia} added {ic}"));
    assert_eq!(texts[1]["text"], format!("{ia} set group_name to \"crew\""));

    // The CLI spellings: --json on group commands, set-admin, conversations --json.
    let info: serde_json::Value = serde_json::from_str(
        a.ok(&[
            "group",
            "set-admin",
            "--conversation",
            &gid,
            "--add",
            &ib,
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    assert_eq!(info["admins"], serde_json::json!([ib]));
    assert_eq!(
        info["ciphersuite"],
        "MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519"
    );
    assert!(info["forked"].is_null());
    let info: serde_json::Value = serde_json::from_str(
        c.ok(&["group", "info", "--conversation", &gid, "--json"])
            .trim(),
    )
    .unwrap();
    assert_eq!(info["name"], "crew");
    let listed = c.ok(&["conversations", "--json"]);
    assert!(listed.lines().any(|l| l.contains(&gid)), "{listed}");
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}
