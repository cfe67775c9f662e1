//! Exactly-once into a conversation: a sender that retries with the same idempotency key (an
//! ambiguous publish) shows once at the receiver, even after the receiver restarts; the same
//! text under another key is another message.

mod common;

use gatehouse_protocol::content;

#[tokio::test]
async fn retries_with_the_same_key_show_once() {
    let url = common::node().await;
    let mut a = common::client(&url, 1).await;
    let b_tree = common::tree();
    let mut b = common::open(&url, &b_tree, 2, 2).await;
    let gid = a.dm(b.inbox_id()).await.unwrap();
    let send = |text: &str, key: &str| (content::text(text), Some(key.to_string()));
    let (x, k1) = send("x", "k1");
    let first = a.send(&gid, &x, k1.clone()).await.unwrap();
    let retry = a.send(&gid, &x, k1.clone()).await.unwrap();
    assert_eq!(
        first.message_id, retry.message_id,
        "XMTP's id covers key and content"
    );
    let (x2, k2) = send("x", "k2");
    a.send(&gid, &x2, k2).await.unwrap();
    let (y, k1b) = send("y", "k1");
    a.send(&gid, &y, k1b).await.unwrap();
    let got = b.sync_all().await.unwrap();
    let texts: Vec<_> = got.iter().filter_map(|m| m.text.clone()).collect();
    assert_eq!(texts, ["x", "x", "y"]);
    assert_eq!(got[0].message_id, first.message_id);

    // A retry that arrives after the receiver restarted is still recognised.
    drop(b);
    a.send(&gid, &x, k1).await.unwrap();
    let (z, k3) = send("z", "k3");
    a.send(&gid, &z, k3).await.unwrap();
    let mut b = common::open(&url, &b_tree, 2, 2).await;
    let texts: Vec<_> = b
        .sync_all()
        .await
        .unwrap()
        .iter()
        .filter_map(|m| m.text.clone())
        .collect();
    assert_eq!(texts, ["z"]);
    // The "seen" marks are numbered on from where the last process left off (the counter is
    // written with each read's batch): four keyed messages, four marks, none overwritten.
    let counter = b_tree
        .get("seq/seen")
        .unwrap()
        .expect("the counter is stored");
    assert_eq!(u64::from_be_bytes(counter.as_ref().try_into().unwrap()), 4);
    assert_eq!(b_tree.scan_prefix("seenq/").count(), 4);
    assert_eq!(b_tree.scan_prefix("seen/").count(), 4);
}

/// The MLS state is stored entry by entry, in the binary encoding. A state stored whole by an
/// earlier version is split into entries when the store opens, and the conversation goes on
/// both ways from there. (That JSON values of earlier versions read: `gatehouse-protocol`'s
/// `group::tests::json_state_of_earlier_versions_reads`.)
#[tokio::test]
async fn mls_state_is_stored_per_entry_and_an_earlier_whole_state_is_migrated() {
    let url = common::node().await;
    let mut a = common::client(&url, 1).await;
    let b_tree = common::tree();
    let mut b = common::open(&url, &b_tree, 2, 2).await;
    let gid = a.dm(b.inbox_id()).await.unwrap();
    a.send(&gid, &content::text("before"), None).await.unwrap();
    let texts = |got: Vec<gatehouse_client::Received>| -> Vec<String> {
        got.into_iter().filter_map(|m| m.text).collect()
    };
    assert_eq!(texts(b.sync_all().await.unwrap()), ["before"]);
    drop(b);
    let zstd_magic = [0x28, 0xb5, 0x2f, 0xfd];
    let entries: Vec<(Vec<u8>, Vec<u8>)> = b_tree
        .scan_prefix(b"mlsk/")
        .map(|item| {
            let (k, v) = item.unwrap();
            (k[5..].to_vec(), v.to_vec())
        })
        .collect();
    assert!(b_tree.get(b"mls").unwrap().is_none());
    assert!(
        entries
            .iter()
            .any(|(k, _)| k.starts_with(b"MessageSecrets"))
    );
    // Binary (first byte 0) but for the join configuration, which is short JSON.
    for (k, v) in &entries {
        assert!(
            v[0] == 0 || (k.starts_with(b"MlsGroupJoinConfig") && v[0] == b'{'),
            "{}",
            String::from_utf8_lossy(k)
        );
    }

    // As an earlier version left it: one compressed blob of (length, key, length, value).
    let mut whole = Vec::new();
    for (k, v) in &entries {
        let v = if v.starts_with(&zstd_magic) {
            zstd::stream::decode_all(v.as_slice()).unwrap()
        } else {
            v.clone()
        };
        for part in [k, &v] {
            whole.extend_from_slice(&(part.len() as u32).to_be_bytes());
            whole.extend_from_slice(part);
        }
    }
    for (k, _) in &entries {
        b_tree.remove([b"mlsk/".as_slice(), k].concat()).unwrap();
    }
    b_tree
        .insert(b"mls", zstd::bulk::compress(&whole, 1).unwrap())
        .unwrap();
    // An entry the earlier version's state does not have is dropped.
    b_tree.insert(b"mlsk/stale", b"{}".as_slice()).unwrap();

    let mut b = common::open(&url, &b_tree, 2, 2).await;
    assert!(b_tree.get(b"mls").unwrap().is_none(), "migrated");
    assert!(b_tree.get(b"mlsk/stale").unwrap().is_none());
    assert_eq!(b_tree.scan_prefix(b"mlsk/").count(), entries.len());
    a.send(&gid, &content::text("after"), None).await.unwrap();
    assert_eq!(texts(b.sync_all().await.unwrap()), ["after"]);
    b.send(&gid, &content::text("reply"), None).await.unwrap();
    assert_eq!(texts(a.sync_all().await.unwrap()), ["reply"]);
    drop(b);
    // And from the entries as now stored.
    let mut b = common::open(&url, &b_tree, 2, 2).await;
    a.send(&gid, &content::text("again"), None).await.unwrap();
    assert_eq!(texts(b.sync_all().await.unwrap()), ["again"]);
}
