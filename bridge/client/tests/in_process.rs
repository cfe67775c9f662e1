//! A client that reaches its node in memory (`Channel::in_process`, what the daemon does with
//! its embedded node) talks with one that reaches the same node over gRPC on HTTP/2: both
//! ways, through the node's streams too, and the node's refusals arrive as refusals.

mod common;

use std::time::Duration;

use gatehouse_client::{Channel, Client, ClientError, Listener};
use gatehouse_protocol::content;
use gatehouse_protocol::identity::{InstallationKey, Wallet};

/// The texts of the first listen (of at most `calls`, each waiting up to 10 s) that brings any.
async fn heard(c: &mut Client, l: &mut Listener, calls: usize) -> Vec<String> {
    for _ in 0..calls {
        let got = common::texts(&c.listen(l, Duration::from_secs(10)).await.unwrap());
        if !got.is_empty() {
            return got;
        }
    }
    Vec::new()
}

#[tokio::test]
async fn in_memory_and_network_clients_talk_through_one_node() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let node = gatehouse_node::Node::new(gatehouse_node::Store::temporary().unwrap());
    let local = Channel::in_process(gatehouse_node::routes(node.clone()));
    assert!(local.is_in_process());
    tokio::spawn(gatehouse_node::serve(
        listener,
        node,
        None,
        std::future::pending(),
    ));

    let mut a = Client::open(
        common::tree(),
        local.clone(),
        Some(Wallet::from_bytes(&[1; 32]).unwrap()),
        Some(InstallationKey::from_seed(&[1; 32])),
    )
    .unwrap();
    a.register().await.unwrap();
    let mut b = common::client(&url, 2).await;
    assert!(
        !gatehouse_client::connect(&url)
            .await
            .unwrap()
            .is_in_process()
    );

    // Over the network to the in-memory client, which hears of it through the node's stream
    // (its periodic full read pushed out of reach).
    let mut l = Listener::new().full_read_every(Duration::from_secs(3600));
    assert!(a.listen(&mut l, Duration::ZERO).await.unwrap().is_empty());
    let gid = b.dm(a.inbox_id()).await.unwrap();
    b.send(&gid, &content::text("over the wire"), None)
        .await
        .unwrap();
    assert_eq!(heard(&mut a, &mut l, 4).await, ["over the wire"]);
    let full = l.full_reads();
    b.send(&gid, &content::text("streamed"), None)
        .await
        .unwrap();
    assert_eq!(heard(&mut a, &mut l, 2).await, ["streamed"]);
    assert_eq!(l.full_reads(), full, "it came from the in-memory stream");

    // And back.
    a.send(&gid, &content::text("in memory"), None)
        .await
        .unwrap();
    assert_eq!(
        common::texts(&b.sync_group(&gid).await.unwrap()),
        ["in memory"]
    );

    // A refusal is the node's answer, not a broken connection.
    use gatehouse_wire::mls_api as mpb;
    let refused = mpb::mls_api_client::MlsApiClient::new(local)
        .send_group_messages(mpb::SendGroupMessagesRequest {
            messages: vec![mpb::GroupMessageInput { version: None }],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
    assert!(refused.message().contains("no v1 payload"), "{refused}");
    assert!(!ClientError::from(refused).is_unreachable());
}

/// Outside a tokio runtime (nothing to spawn the node's handler on) a request is still
/// answered, in the caller's own future.
#[test]
fn in_process_requests_work_outside_a_runtime() {
    use gatehouse_wire::identity_api as ipb;
    let node = gatehouse_node::Node::new(gatehouse_node::Store::temporary().unwrap());
    let channel = Channel::in_process(gatehouse_node::routes(node));
    let answer = futures::executor::block_on(
        ipb::identity_api_client::IdentityApiClient::new(channel).get_inbox_ids(
            ipb::GetInboxIdsRequest {
                requests: vec![ipb::get_inbox_ids_request::Request {
                    identifier: "0x0000000000000000000000000000000000000001".into(),
                    identifier_kind: gatehouse_wire::associations::IdentifierKind::Ethereum as i32,
                }],
            },
        ),
    )
    .unwrap()
    .into_inner();
    assert_eq!(answer.responses.len(), 1);
    assert_eq!(answer.responses[0].inbox_id, None);
}
