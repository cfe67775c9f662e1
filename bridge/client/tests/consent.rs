//! Consent against an in-process node: the request queue, allow / deny, the bound, and the
//! private sync across one inbox's installations.

mod common;
use common::node_with_store as node;

use gatehouse_client::Client;
use gatehouse_protocol::consent::{Entity, State};
use gatehouse_protocol::content;

/// Installation `inst` of the inbox owned by wallet `owner`.
async fn client(url: &str, owner: u8, inst: u8) -> Client {
    common::open(url, &common::tree(), owner, inst).await
}

fn texts(r: &[gatehouse_client::Received]) -> Vec<String> {
    r.iter().filter_map(|m| m.text.clone()).collect()
}

fn state_of(c: &Client, inbox: &str) -> Option<State> {
    c.consent_list()
        .unwrap()
        .into_iter()
        .find(|r| r.kind == Entity::InboxId && r.entity == inbox)
        .map(|r| r.state)
}

/// An unknown sender's messages wait in the request queue; allowing releases them in order;
/// a denied sender's messages vanish and the sender sees no difference; the queue is bounded,
/// oldest dropped and counted.
#[tokio::test]
async fn requests_allow_deny_and_bound() {
    let (url, _) = node().await;
    let mut a = client(&url, 1, 1).await;
    a.set_surface_requests(false);
    let mut c = client(&url, 3, 3).await;
    let mut d = client(&url, 4, 4).await;
    let a_inbox = a.inbox_id().to_string();
    let dm_c = c.dm(&a_inbox).await.unwrap();
    for t in ["c1", "c2", "c3"] {
        c.send(&dm_c, &content::text(t), None).await.unwrap();
    }
    assert!(a.sync_all().await.unwrap().is_empty(), "unknown: held");
    assert_eq!(texts(&a.requests().unwrap()), ["c1", "c2", "c3"]);
    a.set_consent(Entity::InboxId, c.inbox_id(), State::Allowed)
        .await
        .unwrap();
    assert_eq!(texts(&a.sync_all().await.unwrap()), ["c1", "c2", "c3"]);
    assert!(a.requests().unwrap().is_empty());
    c.send(&dm_c, &content::text("c4"), None).await.unwrap();
    assert_eq!(texts(&a.sync_all().await.unwrap()), ["c4"]);

    // D is denied: its messages never show, and nothing comes back to D.
    a.set_consent(Entity::InboxId, d.inbox_id(), State::Denied)
        .await
        .unwrap();
    let dm_d = d.dm(&a_inbox).await.unwrap();
    d.send(&dm_d, &content::text("d1"), None).await.unwrap();
    assert!(a.sync_all().await.unwrap().is_empty());
    assert!(a.requests().unwrap().is_empty(), "denied is not a request");
    assert!(
        d.sync_all().await.unwrap().is_empty(),
        "no signal to the sender"
    );
    // Unblocking shows later messages.
    a.set_consent(Entity::InboxId, d.inbox_id(), State::Allowed)
        .await
        .unwrap();
    d.send(&dm_d, &content::text("d2"), None).await.unwrap();
    assert_eq!(texts(&a.sync_all().await.unwrap()), ["d2"]);

    // Surfaced requests: shown once, marked, and still held until a decision.
    a.set_surface_requests(true);
    let mut f = client(&url, 6, 6).await;
    let dm_f = f.dm(&a_inbox).await.unwrap();
    f.send(&dm_f, &content::text("f1"), None).await.unwrap();
    let got = a.sync_all().await.unwrap();
    assert_eq!(
        (texts(&got), got[0].request),
        (vec!["f1".to_string()], true)
    );
    assert!(a.sync_all().await.unwrap().is_empty(), "shown once");
    a.set_consent(Entity::InboxId, f.inbox_id(), State::Denied)
        .await
        .unwrap();
    a.sync_all().await.unwrap();
    assert!(a.requests().unwrap().is_empty(), "deny discards the queue");

    // The bound: 2 held; a third drops the oldest.
    a.set_request_policy(true, 2);
    let mut e = client(&url, 5, 5).await;
    let dm_e = e.dm(&a_inbox).await.unwrap();
    for t in ["e1", "e2", "e3"] {
        e.send(&dm_e, &content::text(t), None).await.unwrap();
    }
    a.sync_all().await.unwrap();
    assert_eq!(texts(&a.requests().unwrap()), ["e2", "e3"]);
    assert_eq!(a.requests_dropped().unwrap(), 1);
}

/// A block on installation 1 reaches installation 2 within one read, a third installation
/// added later gets the whole list, and the node never holds a record in plaintext.
#[tokio::test]
async fn consent_syncs_across_installations_privately() {
    let (url, store) = node().await;
    let mut a1 = client(&url, 7, 71).await;
    let mut a2 = client(&url, 7, 72).await;
    assert_eq!(a1.inbox_id(), a2.inbox_id());
    let blocked = client(&url, 8, 8).await;
    let friend = client(&url, 9, 9).await;
    a1.set_consent(Entity::InboxId, friend.inbox_id(), State::Allowed)
        .await
        .unwrap();
    a1.set_consent(Entity::InboxId, blocked.inbox_id(), State::Denied)
        .await
        .unwrap();
    a2.sync_all().await.unwrap();
    assert_eq!(state_of(&a2, blocked.inbox_id()), Some(State::Denied));
    assert_eq!(state_of(&a2, friend.inbox_id()), Some(State::Allowed));

    // And back: a change on installation 2 reaches installation 1.
    a2.set_consent(Entity::InboxId, friend.inbox_id(), State::Denied)
        .await
        .unwrap();
    a1.sync_all().await.unwrap();
    assert_eq!(state_of(&a1, friend.inbox_id()), Some(State::Denied));

    // A third installation, added later, is given the whole list.
    let mut a3 = client(&url, 7, 73).await;
    a1.sync_all().await.unwrap();
    a3.sync_all().await.unwrap();
    assert_eq!(state_of(&a3, blocked.inbox_id()), Some(State::Denied));
    assert_eq!(state_of(&a3, friend.inbox_id()), Some(State::Denied));

    // The node relayed those records (installation 3 learned them from it) but never held
    // one in plaintext: XMTP's ConsentSave encoding of each record (entity type, state, then
    // the 64-character entity) appears nowhere in its store.
    let dump = store.raw_bytes();
    assert!(!dump.is_empty());
    for (inbox, state) in [(blocked.inbox_id(), 3u8), (friend.inbox_id(), 3u8)] {
        let mut needle = vec![0x08, 0x02, 0x10, state, 0x1a, 64];
        needle.extend_from_slice(inbox.as_bytes());
        assert!(
            !dump.windows(needle.len()).any(|w| w == needle.as_slice()),
            "the node holds a consent record for {inbox} in plaintext"
        );
    }
}

/// A held request whose record no longer parses is set aside when requests are released, with
/// its bytes and where parsing stopped (never its content), not dropped; the others go on.
#[tokio::test]
async fn an_unreadable_held_request_is_set_aside_with_its_bytes() {
    let (url, _) = node().await;
    let tree = common::tree();
    let mut a = common::open(&url, &tree, 10, 10).await;
    a.set_surface_requests(false);
    let mut c = client(&url, 11, 11).await;
    let dm_c = c.dm(a.inbox_id()).await.unwrap();
    for t in ["c1", "c2"] {
        c.send(&dm_c, &content::text(t), None).await.unwrap();
    }
    assert!(a.sync_all().await.unwrap().is_empty(), "unknown: held");
    let (first, _) = tree.scan_prefix(b"req/").next().unwrap().unwrap();
    let damaged: &[u8] = br#"{"received":{"id":"#;
    tree.insert(&first, damaged).unwrap();

    a.set_consent(Entity::InboxId, c.inbox_id(), State::Allowed)
        .await
        .unwrap();
    assert_eq!(texts(&a.sync_all().await.unwrap()), ["c2"]);
    let aside = a.set_aside_records().unwrap();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(aside[0].key, first.to_vec());
    assert_eq!(aside[0].what(), "held request");
    assert_eq!(aside[0].bytes, damaged);
    assert!(
        aside[0].problem.starts_with("cut short at line 1 column"),
        "{}",
        aside[0].problem
    );
    assert!(a.requests().unwrap().is_empty());
    a.forget_set_aside(&aside[0]).unwrap();
    assert!(a.set_aside_records().unwrap().is_empty());
}
