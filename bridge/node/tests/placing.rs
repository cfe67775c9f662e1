//! Published group messages get their ids in order, and the node says where it put them.

use std::collections::BTreeMap;

use gatehouse_node::{Node, Store};
use gatehouse_protocol::placed;
use gatehouse_wire::mls_api as mpb;
use gatehouse_wire::mls_api::mls_api_server::MlsApi;
use tonic::Request;

/// An application message's framing (a PrivateMessage header; the node reads no further).
fn message(group: &[u8], n: u32) -> mpb::GroupMessageInput {
    let mut data = vec![0, 1, 0, 2, group.len() as u8];
    data.extend_from_slice(group);
    data.extend_from_slice(&7u64.to_be_bytes());
    data.push(1);
    data.extend_from_slice(&n.to_be_bytes());
    mpb::GroupMessageInput {
        version: Some(mpb::group_message_input::Version::V1(
            mpb::group_message_input::V1 {
                data,
                sender_hmac: vec![],
                should_push: true,
            },
        )),
    }
}

/// The answer's placement header (where the node put each message).
fn placed_value<T>(answer: &tonic::Response<T>) -> String {
    let value = answer.metadata().get(placed::HEADER);
    value
        .expect("the answer says where the messages went")
        .to_str()
        .unwrap()
        .to_string()
}

/// A group's first 1,000 messages, oldest first, as a reader pages them.
async fn first_page(mls: &impl MlsApi, group: &[u8]) -> mpb::QueryGroupMessagesResponse {
    mls.query_group_messages(Request::new(mpb::QueryGroupMessagesRequest {
        group_id: group.to_vec(),
        paging_info: Some(mpb::PagingInfo {
            direction: mpb::SortDirection::Ascending as i32,
            limit: 1000,
            id_cursor: 0,
        }),
    }))
    .await
    .unwrap()
    .into_inner()
}

fn ids(page: &mpb::QueryGroupMessagesResponse) -> Vec<u64> {
    page.messages
        .iter()
        .filter_map(|m| {
            m.version
                .as_ref()
                .map(|mpb::group_message::Version::V1(v)| v.id)
        })
        .collect()
}

/// Eight publishers at once into two groups, two messages per publish: each answer names,
/// per message, the group's message before it and its id, and those chain without a gap or
/// a fork in the order a reader pages through the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishes_are_placed_in_order_and_said_where() {
    let node = Node::new(Store::temporary().unwrap());
    let groups = [[1u8; 16], [2u8; 16]];
    let mut tasks = Vec::new();
    for publisher in 0..8u32 {
        let mls = node.mls();
        tasks.push(tokio::spawn(async move {
            let mut placed_here = Vec::new();
            for n in 0..25u32 {
                let group = groups[((publisher + n) % 2) as usize];
                let answer = mls
                    .send_group_messages(Request::new(mpb::SendGroupMessagesRequest {
                        messages: vec![message(&group, n * 2), message(&group, n * 2 + 1)],
                    }))
                    .await
                    .unwrap();
                let value = answer
                    .metadata()
                    .get(placed::HEADER)
                    .expect("the answer says where the messages went")
                    .to_str()
                    .unwrap()
                    .to_string();
                let pairs = placed::decode(&value).unwrap();
                assert_eq!(pairs.len(), 2, "{value}");
                // The second follows the first directly: one publish, one group.
                assert_eq!(pairs[1].0, pairs[0].1, "{value}");
                placed_here.extend(pairs.into_iter().map(|p| (group, p)));
            }
            placed_here
        }));
    }
    let mut by_group: BTreeMap<[u8; 16], Vec<(u64, u64)>> = BTreeMap::new();
    for t in tasks {
        for (group, pair) in t.await.unwrap() {
            by_group.entry(group).or_default().push(pair);
        }
    }
    let mls = node.mls();
    for (group, mut pairs) in by_group {
        pairs.sort_by_key(|(_, id)| *id);
        assert_eq!(pairs.len(), 200);
        let mut before = 0;
        for (b, id) in &pairs {
            assert_eq!(
                *b, before,
                "message {id} placed after {b}, but {before} came before it"
            );
            before = *id;
        }
        let page = first_page(&mls, &group).await;
        assert_eq!(
            ids(&page),
            pairs.iter().map(|(_, id)| *id).collect::<Vec<_>>(),
            "what a reader pages through is what the answers said"
        );
    }
}

/// One publish into three groups at once, interleaved (one group's id a prefix of another's):
/// the ids are consecutive in the publish's order, and each message is placed after its own
/// group's previous one, stored earlier or in the same publish.
#[tokio::test]
async fn a_publish_into_several_groups_places_each_after_its_own_group() {
    let node = Node::new(Store::temporary().unwrap());
    let mls = node.mls();
    let (a, b, c) = ([4u8; 16], [5u8; 16], [4u8; 20]);
    let publish = |groups: Vec<&[u8]>| {
        let mls = mls.clone();
        let messages = groups
            .iter()
            .enumerate()
            .map(|(n, g)| message(g, n as u32))
            .collect();
        async move {
            let answer = mls
                .send_group_messages(Request::new(mpb::SendGroupMessagesRequest { messages }))
                .await
                .unwrap();
            placed::decode(&placed_value(&answer)).unwrap()
        }
    };
    let first = publish(vec![&a]).await;
    assert_eq!(first.len(), 1);
    let a0 = first[0].1;
    let pairs = publish(vec![&b, &a, &c, &a, &b, &c, &a]).await;
    let ids: Vec<u64> = pairs.iter().map(|p| p.1).collect();
    assert_eq!(
        ids,
        (a0 + 1..=a0 + 7).collect::<Vec<_>>(),
        "consecutive, in order"
    );
    let befores: Vec<u64> = pairs.iter().map(|p| p.0).collect();
    assert_eq!(
        befores,
        [0, a0, 0, ids[1], ids[0], ids[2], ids[3]],
        "each after its own group's previous message"
    );
    for (group, want) in [
        (&a[..], vec![a0, ids[1], ids[3], ids[6]]),
        (&b[..], vec![ids[0], ids[4]]),
        (&c[..], vec![ids[2], ids[5]]),
    ] {
        assert_eq!(group_ids(&mls, group).await, want);
    }
    // The next publish goes on from there.
    let next = publish(vec![&c]).await;
    assert_eq!(next, vec![(ids[5], a0 + 8)]);
}

async fn group_ids(mls: &impl MlsApi, group: &[u8]) -> Vec<u64> {
    ids(&first_page(mls, group).await)
}

/// A publish of many messages is answered without the header once it would be long (HTTP/2
/// peers bound an answer's headers; a refused answer would look like a failed publish), and
/// the messages are stored all the same.
#[tokio::test]
async fn a_large_publish_gets_no_header_and_is_stored() {
    let node = Node::new(Store::temporary().unwrap());
    let mls = node.mls();
    let group = [3u8; 16];
    let answer = mls
        .send_group_messages(Request::new(mpb::SendGroupMessagesRequest {
            messages: (0..1000).map(|n| message(&group, n)).collect(),
        }))
        .await
        .unwrap();
    assert!(answer.metadata().get(placed::HEADER).is_none());
    let answer = mls
        .send_group_messages(Request::new(mpb::SendGroupMessagesRequest {
            messages: (0..10).map(|n| message(&group, n)).collect(),
        }))
        .await
        .unwrap();
    let value = placed_value(&answer);
    assert_eq!(placed::decode(&value).unwrap().len(), 10);
    assert!(value.len() <= placed::MAX_HEADER_LEN);
    let page = first_page(&mls, &group).await;
    assert_eq!(ids(&page).len(), 1000);
}

/// The id of the next message a subscription streams (within 20 s).
async fn next_id(
    stream: &mut (impl futures::Stream<Item = Result<mpb::GroupMessage, tonic::Status>> + Unpin),
) -> u64 {
    use futures::StreamExt as _;
    let m = tokio::time::timeout(std::time::Duration::from_secs(20), stream.next());
    match m.await.expect("streamed in time").unwrap().unwrap().version {
        Some(mpb::group_message::Version::V1(v)) => v.id,
        None => panic!("no v1 message"),
    }
}

/// A subscriber following a group gets every message of a publish larger than a page (the
/// node announces a publish once per group, and the subscriber reads page after page), in
/// order.
#[tokio::test]
async fn a_subscriber_gets_all_of_a_publish_larger_than_a_page() {
    let node = Node::new(Store::temporary().unwrap());
    let mls = node.mls();
    let group = [5u8; 16];
    let first = mls
        .send_group_messages(Request::new(mpb::SendGroupMessagesRequest {
            messages: vec![message(&group, 0)],
        }))
        .await
        .unwrap();
    let (_, cursor) = placed::decode(&placed_value(&first)).unwrap()[0];
    let mut stream = mls
        .subscribe_group_messages(Request::new(mpb::SubscribeGroupMessagesRequest {
            filters: vec![mpb::subscribe_group_messages_request::Filter {
                group_id: group.to_vec(),
                id_cursor: cursor,
            }],
        }))
        .await
        .unwrap()
        .into_inner();
    // One message through the stream first: the subscriber is following live events.
    mls.send_group_messages(Request::new(mpb::SendGroupMessagesRequest {
        messages: vec![message(&group, 1)],
    }))
    .await
    .unwrap();
    let live = next_id(&mut stream).await;
    assert!(live > cursor);
    const N: u32 = 1500;
    mls.send_group_messages(Request::new(mpb::SendGroupMessagesRequest {
        messages: (0..N).map(|n| message(&group, 2 + n)).collect(),
    }))
    .await
    .unwrap();
    let mut got = Vec::new();
    for _ in 0..N {
        got.push(next_id(&mut stream).await);
    }
    // One publish takes consecutive ids: all of them, in order, none twice.
    assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "in order");
    assert!(got[0] > live);
}
