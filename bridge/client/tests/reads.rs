//! Sends that do not read first, and read passes that ask the node once for many
//! conversations, against an in-process node.

mod common;
use common::{epoch, texts};

use gatehouse_protocol::content;
use gatehouse_protocol::group::MetadataUpdate;

/// As libxmtp does, a send encrypts on the epoch this installation holds, without reading
/// first (after the first send of a process, until membership is due again). A commit
/// published in between leaves the sender an epoch behind, and its message still reads for
/// everyone, who keep past epochs; the sender catches up on its next read and goes on.
#[tokio::test]
async fn a_send_on_the_epoch_it_holds_reads_after_a_commit() {
    let url = common::node().await;
    let mut a = common::client(&url, 1).await;
    let mut b = common::client(&url, 2).await;
    let mut c = common::client(&url, 3).await;
    let gid = a
        .create_group(
            "team",
            "",
            &[b.inbox_id().to_string(), c.inbox_id().to_string()],
        )
        .await
        .unwrap();
    b.sync_all().await.unwrap();
    c.sync_all().await.unwrap();
    // B's first send reads the conversation and looks at its membership.
    b.send(&gid, &content::text("first"), None).await.unwrap();
    assert_eq!(texts(&a.sync_all().await.unwrap()), ["first"]);

    a.update_metadata(
        &gid,
        MetadataUpdate::Attribute("group_name".into(), "renamed".into()),
    )
    .await
    .unwrap();
    let held = epoch(&b, &gid);
    b.send(&gid, &content::text("second"), None).await.unwrap();
    assert!(
        epoch(&b, &gid) < epoch(&a, &gid),
        "the send did not read A's commit first ({} against {})",
        epoch(&b, &gid),
        epoch(&a, &gid)
    );
    assert_eq!(epoch(&b, &gid), held);
    assert_eq!(texts(&a.sync_all().await.unwrap()), ["second"]);
    assert_eq!(texts(&c.sync_all().await.unwrap()), ["first", "second"]);

    // B's next read applies the commit; what it sends then is on the current epoch.
    b.sync_all().await.unwrap();
    assert_eq!(epoch(&b, &gid), epoch(&a, &gid));
    b.send(&gid, &content::text("third"), None).await.unwrap();
    assert_eq!(texts(&a.sync_all().await.unwrap()), ["third"]);
    assert_eq!(texts(&c.sync_all().await.unwrap()), ["third"]);
}

/// `n` peers (owners 10, 11, …), each in a DM with `inbox` where it said "hello N".
async fn peers_saying_hello(
    url: &str,
    inbox: &str,
    n: u8,
) -> Vec<(gatehouse_client::Client, Vec<u8>)> {
    let mut peers = Vec::new();
    for k in 0..n {
        let mut p = common::client(url, 10 + k).await;
        let gid = p.dm(inbox).await.unwrap();
        p.send(&gid, &content::text(&format!("hello {k}")), None)
            .await
            .unwrap();
        peers.push((p, gid));
    }
    peers
}

/// The agent (owner 1, installation 1) on `tree`, keeping what it reads until delivered.
async fn retaining_agent(url: &str, tree: &sled::Tree) -> gatehouse_client::Client {
    let mut agent = common::open(url, tree, 1, 1).await;
    agent.set_retain_deliveries(true);
    agent
}

/// A read pass over more conversations than it asks the node about at once (32) reads every
/// one of them, the first time (no sender known yet) and the next (the senders' identity
/// states asked for in one request, up to date: a sender revoked in between is refused).
#[tokio::test]
async fn a_pass_over_many_conversations_reads_them_all() {
    const PEERS: u8 = 34;
    let url = common::node().await;
    let mut agent = common::client(&url, 1).await;
    let mut peers = peers_saying_hello(&url, agent.inbox_id(), PEERS).await;
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let want = |word: &str| sorted((0..PEERS).map(|n| format!("{word} {n}")).collect());
    let got = agent.sync_all().await.unwrap();
    // Not allowed yet: they come as requests, and are read all the same.
    assert_eq!(sorted(texts(&got)), want("hello"));

    for (n, (p, gid)) in peers.iter_mut().enumerate() {
        p.send(gid, &content::text(&format!("again {n}")), None)
            .await
            .unwrap();
    }
    // The first peer's installation is revoked (by a second one of its inbox) after it sent:
    // the state the pass asks for alongside the pages says so, and its message is refused.
    let mut second = common::open(&url, &common::tree(), 10, 99).await;
    second
        .revoke_installation(&peers[0].0.installation_key())
        .await
        .unwrap();
    let mut again = want("again");
    again.retain(|t| t != "again 0");
    assert_eq!(sorted(texts(&agent.sync_all().await.unwrap())), again);
    assert!(agent.sync_all().await.unwrap().is_empty(), "nothing twice");
}

/// After a send the sender's cursor is past its own messages (it cannot decrypt them; the
/// node's answer says where they went), but never past a message it has not read: B's
/// message between A's cursor and A's next send is still read.
#[tokio::test]
async fn a_send_moves_the_cursor_past_its_own_messages_only() {
    let (url, store) = common::node_with_store().await;
    let tree = common::tree();
    let mut a = common::open(&url, &tree, 1, 1).await;
    let mut b = common::client(&url, 2).await;
    let gid = a.dm(b.inbox_id()).await.unwrap();
    let newest =
        |store: &gatehouse_node::Store| store.group_messages(&gid, 0, true, 1).unwrap()[0].0;
    let items: Vec<_> = ["one", "two", "three"]
        .iter()
        .map(|t| (content::text(t), format!("k-{t}")))
        .collect();
    a.send_batch(&gid, &items).await.unwrap();
    assert_eq!(
        gatehouse_client::stored_group_cursor(&tree, &gid).unwrap(),
        newest(&store),
        "the cursor is past A's own three messages"
    );
    assert_eq!(texts(&b.sync_all().await.unwrap()), ["one", "two", "three"]);

    b.send(&gid, &content::text("from b"), None).await.unwrap();
    let before = gatehouse_client::stored_group_cursor(&tree, &gid).unwrap();
    a.send(&gid, &content::text("four"), None).await.unwrap();
    assert_eq!(
        gatehouse_client::stored_group_cursor(&tree, &gid).unwrap(),
        before,
        "B's message follows A's cursor: the send leaves it to the next read"
    );
    assert_eq!(texts(&a.sync_all().await.unwrap()), ["from b"]);
    assert_eq!(
        gatehouse_client::stored_group_cursor(&tree, &gid).unwrap(),
        newest(&store)
    );
}

/// A pass over many conversations writes what it read once, at its end, and all of it: a
/// process opened afresh on the same store reads none of it again (cursors), still owes it
/// (retained copies) and reads what follows (the MLS state moved with the cursors).
#[tokio::test]
async fn a_pass_writes_every_conversation_it_read() {
    const PEERS: u8 = 40;
    let url = common::node().await;
    let tree = common::tree();
    let mut agent = retaining_agent(&url, &tree).await;
    let mut peers = peers_saying_hello(&url, agent.inbox_id(), PEERS).await;
    assert_eq!(agent.sync_all().await.unwrap().len(), PEERS as usize);
    drop(agent);

    let mut agent = retaining_agent(&url, &tree).await;
    assert_eq!(agent.undelivered().unwrap().len(), PEERS as usize, "owed");
    assert!(agent.sync_all().await.unwrap().is_empty(), "nothing twice");
    for (n, (p, gid)) in peers.iter_mut().enumerate() {
        p.send(gid, &content::text(&format!("again {n}")), None)
            .await
            .unwrap();
    }
    let mut got = texts(&agent.sync_all().await.unwrap());
    got.sort();
    let mut want: Vec<String> = (0..PEERS).map(|n| format!("again {n}")).collect();
    want.sort();
    assert_eq!(got, want);
}

/// A retry (the same idempotency key) that comes a page after its first copy, within one
/// pass whose writes wait for its end, is still recognised.
#[tokio::test]
async fn a_retry_a_page_later_in_the_same_pass_shows_once() {
    let url = common::node().await;
    let mut a = common::client(&url, 1).await;
    let mut b = common::client(&url, 2).await;
    let gid = a.dm(b.inbox_id()).await.unwrap();
    let x = content::text("x");
    a.send(&gid, &x, Some("k1".into())).await.unwrap();
    let filler: Vec<_> = (0..120)
        .map(|n| (content::text(&format!("f{n}")), format!("f{n}")))
        .collect();
    a.send_batch(&gid, &filler).await.unwrap();
    a.send(&gid, &x, Some("k1".into())).await.unwrap();
    let got = texts(&b.sync_all().await.unwrap());
    assert_eq!(got.len(), 121, "{got:?}");
    assert_eq!(got.iter().filter(|t| *t == "x").count(), 1);
}

/// A message signed by another key than its sender's (a member impersonating another) is
/// refused when the page's signatures are checked together (a read of one conversation), and
/// only it: the messages around
/// it are delivered, and it is neither owed nor read again later.
#[tokio::test]
async fn a_forged_message_in_a_page_is_refused_and_the_rest_delivered() {
    let url = common::node().await;
    let tree = common::tree();
    let mut a = common::client(&url, 1).await;
    let mut b = common::open(&url, &tree, 2, 2).await;
    b.set_retain_deliveries(true);
    let gid = a.dm(b.inbox_id()).await.unwrap();
    assert!(b.sync_all().await.unwrap().is_empty(), "joined");
    for n in 0..5 {
        a.send(&gid, &content::text(&format!("before {n}")), None)
            .await
            .unwrap();
    }
    a.send_forged(&gid, &content::text("forged")).await.unwrap();
    for n in 0..5 {
        a.send(&gid, &content::text(&format!("after {n}")), None)
            .await
            .unwrap();
    }
    // One conversation's read (not a pass): the page's signatures are checked at its end.
    let got = texts(&b.sync_group(&gid).await.unwrap());
    let want: Vec<String> = (0..5)
        .map(|n| format!("before {n}"))
        .chain((0..5).map(|n| format!("after {n}")))
        .collect();
    assert_eq!(got, want);
    let owed = texts(&b.undelivered().unwrap());
    assert_eq!(owed, want, "the forged one is not owed");
    assert!(b.sync_all().await.unwrap().is_empty());
}

/// In a pass over several conversations the signatures are checked together at the pass's
/// end: a forged message in one conversation is refused there, everything else of every
/// conversation is delivered, and a process opened afresh on the store neither owes it nor
/// reads anything again.
#[tokio::test]
async fn a_forged_message_in_a_pass_is_refused_and_the_rest_delivered() {
    const PEERS: u8 = 6;
    let url = common::node().await;
    let tree = common::tree();
    let mut agent = retaining_agent(&url, &tree).await;
    let mut peers = peers_saying_hello(&url, agent.inbox_id(), PEERS).await;
    let (p, gid) = &mut peers[2];
    p.send_forged(gid, &content::text("forged")).await.unwrap();
    p.send(gid, &content::text("after the forged one"), None)
        .await
        .unwrap();
    let mut got = texts(&agent.sync_all().await.unwrap());
    got.sort();
    let mut want: Vec<String> = (0..PEERS).map(|n| format!("hello {n}")).collect();
    want.push("after the forged one".into());
    want.sort();
    assert_eq!(got, want);
    drop(agent);

    let mut agent = retaining_agent(&url, &tree).await;
    let mut owed = texts(&agent.undelivered().unwrap());
    owed.sort();
    assert_eq!(owed, want, "the forged one is not owed");
    assert!(agent.sync_all().await.unwrap().is_empty());
}

/// A read pass looks at the memberships of the conversations it reads with one question about
/// all their members' identity logs: a new installation of each of two peers is added to its
/// conversation by the reader's pass, and joins it.
#[tokio::test]
async fn a_pass_adds_each_conversations_new_installations() {
    let url = common::node().await;
    let mut agent = common::client(&url, 1).await;
    let mut peers = peers_saying_hello(&url, agent.inbox_id(), 2).await;
    assert_eq!(agent.sync_all().await.unwrap().len(), 2);
    // A second installation of each peer's inbox (owners 10 and 11).
    let mut seconds = Vec::new();
    for k in 0..2u8 {
        seconds.push(common::open(&url, &common::tree(), 10 + k, 20 + k).await);
    }
    // News in both conversations, so the agent's next full pass reads them both (and looks
    // at their memberships; the peers looked at theirs when they said hello).
    for (p, gid) in &mut peers {
        p.send(gid, &content::text("again"), None).await.unwrap();
    }
    let before: Vec<u64> = peers.iter().map(|(_, g)| epoch(&agent, g)).collect();
    assert_eq!(texts(&agent.sync_all().await.unwrap()), ["again", "again"]);
    for (((_, gid), second), was) in peers.iter().zip(&mut seconds).zip(before) {
        assert_eq!(
            epoch(&agent, gid),
            was + 1,
            "the agent added the installation"
        );
        let joined = second.sync_welcomes().await.unwrap();
        assert_eq!(joined, vec![gid.clone()], "the second installation joined");
    }
}
