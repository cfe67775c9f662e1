//! Listening on the node's streams: with the periodic full read pushed out of reach, a message
//! still arrives — in a conversation a welcome brought, and in one this client started itself
//! after it subscribed — so the streams alone carry it.

mod common;

use std::time::Duration;

use gatehouse_client::{Client, Listener};
use gatehouse_protocol::content;

/// Listens until a message with `text` arrives; fails after `calls` listens that each waited
/// up to 10 s (each returns as soon as the node reports news).
async fn until_text(c: &mut Client, l: &mut Listener, text: &str, calls: usize) {
    let mut seen = Vec::new();
    for _ in 0..calls {
        for m in c.listen(l, Duration::from_secs(10)).await.unwrap() {
            if m.text.as_deref() == Some(text) {
                return;
            }
            seen.push(m.text);
        }
    }
    panic!("{text:?} did not arrive; got {seen:?}");
}

#[tokio::test]
async fn messages_arrive_through_the_streams() {
    let url = common::node().await;
    let mut a = common::client(&url, 1).await;
    let mut b = common::client(&url, 2).await;
    let mut c = common::client(&url, 3).await;
    // No full read after the first ones: only the streams can bring news.
    let mut l = Listener::new().full_read_every(Duration::from_secs(3600));
    assert!(b.listen(&mut l, Duration::ZERO).await.unwrap().is_empty());

    // A new conversation (a welcome), then a message in it.
    let gid = a.dm(b.inbox_id()).await.unwrap();
    a.send(&gid, &content::text("one"), None).await.unwrap();
    until_text(&mut b, &mut l, "one", 4).await;
    let full = l.full_reads();
    a.send(&gid, &content::text("two"), None).await.unwrap();
    until_text(&mut b, &mut l, "two", 2).await;
    assert_eq!(l.full_reads(), full, "\"two\" came from the stream");

    // A conversation b starts itself after subscribing is covered too (it subscribes again).
    let gid_c = b.dm(c.inbox_id()).await.unwrap();
    c.sync_all().await.unwrap();
    assert!(b.listen(&mut l, Duration::ZERO).await.unwrap().is_empty());
    let full = l.full_reads();
    c.send(&gid_c, &content::text("three"), None).await.unwrap();
    until_text(&mut b, &mut l, "three", 2).await;
    assert_eq!(l.full_reads(), full, "\"three\" came from the stream");

    // Nothing is read twice.
    assert!(
        b.listen(&mut l, Duration::from_millis(50))
            .await
            .unwrap()
            .is_empty()
    );
}

/// With our node (its stream leaves nothing out) the streamed messages are read as they come,
/// without asking the node after each news: many single sends, with the listener's own
/// messages in between (streamed back to it, skipped), arrive complete, in order, once.
#[tokio::test]
async fn streamed_messages_are_read_as_they_come() {
    let url = common::node().await;
    let mut a = common::client(&url, 1).await;
    let mut b = common::client(&url, 2).await;
    let gid = a.dm(b.inbox_id()).await.unwrap();
    a.send(&gid, &content::text("start"), None).await.unwrap();
    let mut l = Listener::new().full_read_every(Duration::from_secs(3600));
    until_text(&mut b, &mut l, "start", 4).await;

    let mut want = Vec::new();
    for i in 0..30 {
        let text = format!("m{i}");
        a.send(&gid, &content::text(&text), None).await.unwrap();
        want.push(text);
        if i % 10 == 9 {
            b.send(&gid, &content::text("from b"), None).await.unwrap();
        }
    }
    let mut got = Vec::new();
    for _ in 0..20 {
        if got.len() >= want.len() {
            break;
        }
        let read = b.listen(&mut l, Duration::from_secs(2)).await.unwrap();
        got.extend(read.into_iter().filter_map(|m| m.text));
    }
    assert_eq!(got, want);
    assert!(
        l.streamed_reads() > 0,
        "the streamed messages were read as they came"
    );
    assert!(
        b.listen(&mut l, Duration::from_millis(50))
            .await
            .unwrap()
            .is_empty(),
        "nothing is read twice"
    );
    assert_eq!(texts_of(&a.sync_all().await.unwrap()), ["from b"; 3]);
}

fn texts_of(r: &[gatehouse_client::Received]) -> Vec<String> {
    r.iter().filter_map(|m| m.text.clone()).collect()
}

/// `Client::read_named` takes streamed messages as all that follows the read cursor only when
/// the run starts at or before it; a run that starts past the cursor (a gap) makes it ask.
#[tokio::test]
async fn read_named_trusts_a_streamed_run_only_from_the_cursor() {
    use gatehouse_client::Streamed;
    let url = common::node().await;
    let mut a = common::client(&url, 1).await;
    let mut b = common::client(&url, 2).await;
    let gid = a.dm(b.inbox_id()).await.unwrap();
    a.send(&gid, &content::text("start"), None).await.unwrap();
    assert_eq!(texts_of(&b.sync_all().await.unwrap()), ["start"]);
    a.send(&gid, &content::text("x"), None).await.unwrap();
    a.send(&gid, &content::text("y"), None).await.unwrap();

    // A run from before the cursor that brought nothing new: taken as it is (the node is
    // not asked, so "x" and "y" are not seen yet).
    let empty_from = |from| {
        vec![(
            gid.clone(),
            Some(Streamed {
                from,
                messages: Vec::new(),
            }),
        )]
    };
    let (got, streamed) = b.read_named(empty_from(0)).await.unwrap();
    assert!(got.is_empty());
    assert_eq!(streamed, 1);
    // A run that starts past the cursor leaves a gap: the node is asked.
    let (got, streamed) = b.read_named(empty_from(u64::MAX)).await.unwrap();
    assert_eq!(texts_of(&got), ["x", "y"]);
    assert_eq!(streamed, 0);
    // Without streamed messages the node is asked too; nothing is read twice.
    let (got, streamed) = b.read_named(vec![(gid.clone(), None)]).await.unwrap();
    assert!(got.is_empty());
    assert_eq!(streamed, 0);
}
