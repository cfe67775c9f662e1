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
}

/// The MLS state is stored compressed; one stored uncompressed by an earlier version is read
/// as it is, and the conversation goes on both ways from there.
#[tokio::test]
async fn mls_state_is_stored_compressed_and_an_uncompressed_one_still_reads() {
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
    let stored = b_tree.get(b"mls").unwrap().unwrap();
    assert!(
        stored.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]),
        "a zstd frame"
    );
    let raw = zstd::stream::decode_all(stored.as_ref()).unwrap();
    assert!(
        raw.len() > 3 * stored.len(),
        "{} bytes stored for {} raw",
        stored.len(),
        raw.len()
    );

    // As an earlier version left it: uncompressed.
    b_tree.insert(b"mls", raw).unwrap();
    let mut b = common::open(&url, &b_tree, 2, 2).await;
    a.send(&gid, &content::text("after"), None).await.unwrap();
    assert_eq!(texts(b.sync_all().await.unwrap()), ["after"]);
    b.send(&gid, &content::text("reply"), None).await.unwrap();
    assert_eq!(texts(a.sync_all().await.unwrap()), ["reply"]);
    assert!(
        b_tree
            .get(b"mls")
            .unwrap()
            .unwrap()
            .starts_with(&[0x28, 0xb5, 0x2f, 0xfd]),
        "written back compressed"
    );
}
