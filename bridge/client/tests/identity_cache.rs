//! An inbox's identity state is kept between reads and only the log's new updates are applied:
//! an installation added or revoked later still shows on the next read.

mod common;

#[tokio::test]
async fn later_updates_show_on_the_next_read() {
    let url = common::node().await;
    let mut a1 = common::client(&url, 1).await;
    let mut b = common::client(&url, 2).await;
    let inbox = a1.inbox_id().to_string();
    let (st, seq) = b.inbox_state(&inbox).await.unwrap();
    assert!(st.has_installation(&a1.installation_key()));

    // A second installation of the same inbox (wallet 1, installation key 3).
    let a2 = common::open(&url, &common::tree(), 1, 3).await;
    let (st, seq2) = b.inbox_state(&inbox).await.unwrap();
    assert!(seq2 > seq, "the new update was read");
    assert!(st.has_installation(&a1.installation_key()));
    assert!(st.has_installation(&a2.installation_key()));

    // Revoked: the next read says so.
    a1.revoke_installation(&a2.installation_key())
        .await
        .unwrap();
    let (st, seq3) = b.inbox_state(&inbox).await.unwrap();
    assert!(seq3 > seq2);
    assert!(!st.has_installation(&a2.installation_key()));
    assert!(st.has_installation(&a1.installation_key()));

    // Nothing new: the same state.
    let (st, seq4) = b.inbox_state(&inbox).await.unwrap();
    assert_eq!(seq4, seq3);
    assert!(!st.has_installation(&a2.installation_key()));
}
