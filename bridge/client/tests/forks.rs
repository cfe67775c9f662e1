//! Forks and crashes around commits, against an in-process node.

mod common;
use common::{epoch, node, texts, tree};

use gatehouse_client::Client;
use gatehouse_protocol::content;
use gatehouse_protocol::group::MetadataUpdate;

async fn open(url: &str, tree: &sled::Tree, n: u8) -> Client {
    common::open(url, tree, n, n).await
}

/// Two members merge different commits for the same epoch. The forked one finds out from the
/// published commit log on its next read, reports it, refuses to send into the fork, asks the
/// super admin to re-add it, and after the re-add reads and sends new messages again.
#[tokio::test]
async fn forced_fork_is_detected_and_recovered() {
    let url = node().await;
    let (ta, tb) = (tree(), tree());
    let mut a = open(&url, &ta, 1).await;
    let mut b = open(&url, &tb, 2).await;
    let gid = a
        .create_group("team", "", &[b.inbox_id().to_string()])
        .await
        .unwrap();
    b.sync_all().await.unwrap();
    a.send(&gid, &content::text("before"), None).await.unwrap();
    assert_eq!(texts(&b.sync_all().await.unwrap()), ["before"]);

    // B merges a commit the group never saw; A's different commit is the group's next epoch.
    b.inject_fork(&gid, "b's name").await.unwrap();
    a.update_metadata(
        &gid,
        MetadataUpdate::Attribute("group_name".into(), "a's name".into()),
    )
    .await
    .unwrap();
    assert_eq!(
        epoch(&a, &gid),
        epoch(&b, &gid),
        "same epoch number, different state"
    );

    // One read: B sees A's commit, compares with the published log, and reports the fork.
    b.sync_all().await.unwrap();
    let fork = b.conversation_info(&gid).unwrap()["forked"].clone();
    assert_eq!(fork["epoch"], epoch(&a, &gid), "fork reported: {fork}");
    assert_eq!(fork["readd_requested_from"], a.inbox_id());
    let err = b
        .send(&gid, &content::text("into the fork"), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("forked"), "{err}");
    // A is not forked: the log agrees with it.
    assert!(a.conversation_info(&gid).unwrap()["forked"].is_null());

    // A's client re-adds B (its DM carries the request); B's welcome replaces the fork.
    let mut rounds = 0;
    while !b.conversation_info(&gid).unwrap()["forked"].is_null() {
        rounds += 1;
        assert!(rounds <= 4, "not recovered after {rounds} rounds");
        a.sync_all().await.unwrap();
        b.sync_all().await.unwrap();
    }
    let info = b.conversation_info(&gid).unwrap();
    assert_eq!(info["name"], "a's name");
    assert_eq!(info["epoch"], epoch(&a, &gid));

    // Both ways again.
    a.send(&gid, &content::text("after"), None).await.unwrap();
    assert_eq!(texts(&b.sync_all().await.unwrap()), ["after"]);
    b.send(&gid, &content::text("back"), None).await.unwrap();
    let got = a.sync_all().await.unwrap();
    assert_eq!(texts(&got), ["back"]);
}

/// A stops between publishing a commit (adding C) and merging it. After a restart from its
/// store, its next read merges the commit the node ordered and sends C the welcome it owed:
/// nobody forks and everyone reads the next message.
#[tokio::test]
async fn crash_between_publishing_and_merging_a_commit() {
    let url = node().await;
    let (ta, tb, tc) = (tree(), tree(), tree());
    let mut a = open(&url, &ta, 11).await;
    let mut b = open(&url, &tb, 12).await;
    let mut c = open(&url, &tc, 13).await;
    let gid = a
        .create_group("team", "", &[b.inbox_id().to_string()])
        .await
        .unwrap();
    b.sync_all().await.unwrap();
    let before = epoch(&a, &gid);

    a.crash_after_commit_publish(true);
    let err = a
        .add_members(&gid, &[c.inbox_id().to_string()])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("fault injection"), "{err}");
    drop(a);
    assert!(
        c.sync_welcomes().await.unwrap().is_empty(),
        "no welcome yet"
    );

    let mut a = open(&url, &ta, 11).await;
    assert_eq!(epoch(&a, &gid), before, "restarted before the merge");
    a.sync_all().await.unwrap();
    assert_eq!(epoch(&a, &gid), before + 1, "merged on restart");
    assert_eq!(c.sync_welcomes().await.unwrap(), vec![gid.clone()]);
    b.sync_all().await.unwrap();
    for other in [&b, &c] {
        assert_eq!(epoch(other, &gid), before + 1);
    }
    a.send(&gid, &content::text("all here"), None)
        .await
        .unwrap();
    assert_eq!(texts(&b.sync_all().await.unwrap()), ["all here"]);
    assert_eq!(texts(&c.sync_all().await.unwrap()), ["all here"]);
    assert!(b.conversation_info(&gid).unwrap()["forked"].is_null());
}
