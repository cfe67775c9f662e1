//! The node's identity service enforces XMTP's rules and resolves identifiers as the log changes.

use gatehouse_node::{Node, Store};
use gatehouse_protocol::identity::{self, InstallationKey, Member, Pending, SignerRef, Wallet};
use gatehouse_wire::identity_api::identity_api_server::IdentityApi;
use gatehouse_wire::identity_api::{self as ipb, get_inbox_ids_request};
use tonic::{Code, Request};

async fn lookup(node: &Node, who: &str) -> Option<String> {
    let req = ipb::GetInboxIdsRequest {
        requests: vec![get_inbox_ids_request::Request {
            identifier: who.into(),
            identifier_kind: 1,
        }],
    };
    node.identity()
        .get_inbox_ids(Request::new(req))
        .await
        .unwrap()
        .into_inner()
        .responses
        .remove(0)
        .inbox_id
}

async fn publish(
    node: &Node,
    u: gatehouse_wire::associations::IdentityUpdate,
) -> Result<(), tonic::Status> {
    node.identity()
        .publish_identity_update(Request::new(ipb::PublishIdentityUpdateRequest {
            identity_update: Some(u),
        }))
        .await
        .map(|_| ())
}

/// Linking, unlinking and recovery changes are reflected by GetInboxIds; a broken update is
/// refused with INVALID_ARGUMENT and changes nothing.
#[tokio::test]
async fn identifiers_follow_the_log() {
    let node = Node::new(Store::temporary().unwrap());
    let (w1, w2, w3) = (
        Wallet::from_bytes(&[1; 32]).unwrap(),
        Wallet::from_bytes(&[2; 32]).unwrap(),
        Wallet::from_bytes(&[3; 32]).unwrap(),
    );
    let i1 = InstallationKey::from_seed(&[9; 32]);
    let id = identity::inbox_id(&w1.address(), 1);
    let t = 1_700_000_000_000_000_000u64;
    publish(&node, identity::register_inbox(&w1, 1, &i1, t))
        .await
        .unwrap();
    assert_eq!(
        lookup(&node, &w1.address()).await.as_deref(),
        Some(id.as_str())
    );
    assert_eq!(lookup(&node, &w2.address()).await, None);

    publish(
        &node,
        identity::build_update(
            &id,
            t + 1_000_000_000,
            &[Pending::Add {
                existing: SignerRef::Wallet(&w1),
                new: SignerRef::Wallet(&w2),
            }],
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        lookup(&node, &w2.address().to_uppercase().replace("0X", "0x"))
            .await
            .as_deref(),
        Some(id.as_str())
    );

    // Refused: w3 is not a member and not the recovery address.
    let bad = identity::build_update(
        &id,
        t + 2_000_000_000,
        &[Pending::Revoke {
            recovery: SignerRef::Wallet(&w3),
            member: Member::Ethereum(w2.address()),
        }],
    );
    let err = publish(&node, bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("recovery identifier"),
        "{}",
        err.message()
    );
    assert_eq!(
        lookup(&node, &w2.address()).await.as_deref(),
        Some(id.as_str())
    );

    publish(
        &node,
        identity::build_update(
            &id,
            t + 3_000_000_000,
            &[Pending::Revoke {
                recovery: SignerRef::Wallet(&w1),
                member: Member::Ethereum(w2.address()),
            }],
        ),
    )
    .await
    .unwrap();
    assert_eq!(lookup(&node, &w2.address()).await, None);
    // A recovery change does not move the inbox: w1 still resolves to it.
    publish(
        &node,
        identity::build_update(
            &id,
            t + 4_000_000_000,
            &[Pending::ChangeRecovery {
                recovery: SignerRef::Wallet(&w1),
                new_recovery: w3.address(),
            }],
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        lookup(&node, &w1.address()).await.as_deref(),
        Some(id.as_str())
    );
    let log = node.store().inbox_log(&id, 0).unwrap();
    assert_eq!(log.len(), 4);
    assert_eq!(
        identity::fold(log.iter().map(|l| &l.update))
            .unwrap()
            .unwrap()
            .recovery,
        w3.address()
    );
}
