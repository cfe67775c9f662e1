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
