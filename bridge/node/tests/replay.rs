//! Replays libxmtp's recorded calls into our node and compares its answers with the recorded
//! ones (ids, timestamps and cursors are the node's own; payloads must match exactly).
#![cfg(feature = "fixtures")]

use std::path::PathBuf;

use gatehouse_node::{Node, Store};
use gatehouse_wire::Message;
use gatehouse_wire::identity_api::identity_api_server::IdentityApi;
use gatehouse_wire::mls_api::mls_api_server::MlsApi;
use gatehouse_wire::{identity_api as ipb, mls_api as mpb};
use tonic::Request;

fn dir() -> PathBuf {
    let d = std::env::var_os("GATEHOUSE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/testdata/xmtp-v3")
        });
    assert!(
        d.join("index.json").exists(),
        "fixture folder not found at {} (set GATEHOUSE_FIXTURES)",
        d.display()
    );
    d
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn group_data(m: &[mpb::GroupMessage]) -> Vec<Vec<u8>> {
    m.iter()
        .map(|m| match &m.version {
            Some(mpb::group_message::Version::V1(v)) => v.data.clone(),
            None => vec![],
        })
        .collect()
}

fn welcome_data(m: &[mpb::WelcomeMessage]) -> Vec<Vec<u8>> {
    m.iter()
        .map(|m| match &m.version {
            Some(mpb::welcome_message::Version::V1(v)) => v.data.clone(),
            Some(mpb::welcome_message::Version::WelcomePointer(p)) => p.welcome_pointer.clone(),
            None => vec![],
        })
        .collect()
}

/// Every publish and upload is accepted (identity updates and key packages validate), and
/// every recorded query gets the same payloads back from our node.
#[tokio::test]
async fn replay_matches_recording() {
    let node = Node::new(Store::temporary().unwrap());
    let (mls, id) = (node.mls(), node.identity());
    let index: serde_json::Value = serde_json::from_slice(&read("index.json")).unwrap();
    let mut compared = 0;
    for c in index["calls"].as_array().unwrap() {
        let method = c["method"]
            .as_str()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap()
            .to_string();
        let (Some(req), Some(resp)) = (c["request"].as_str(), c["response"].as_str()) else {
            continue;
        };
        let (req, resp) = (read(req), read(resp));
        let seq = c["seq"].clone();
        match method.as_str() {
            "PublishIdentityUpdate" => {
                id.publish_identity_update(Request::new(
                    ipb::PublishIdentityUpdateRequest::decode(req.as_slice()).unwrap(),
                ))
                .await
                .unwrap_or_else(|e| panic!("{seq}: {e}"));
            }
            "UploadKeyPackage" => {
                mls.upload_key_package(Request::new(
                    mpb::UploadKeyPackageRequest::decode(req.as_slice()).unwrap(),
                ))
                .await
                .unwrap_or_else(|e| panic!("{seq}: {e}"));
            }
            "SendGroupMessages" => {
                mls.send_group_messages(Request::new(
                    mpb::SendGroupMessagesRequest::decode(req.as_slice()).unwrap(),
                ))
                .await
                .unwrap_or_else(|e| panic!("{seq}: {e}"));
            }
            "SendWelcomeMessages" => {
                mls.send_welcome_messages(Request::new(
                    mpb::SendWelcomeMessagesRequest::decode(req.as_slice()).unwrap(),
                ))
                .await
                .unwrap_or_else(|e| panic!("{seq}: {e}"));
            }
            "BatchPublishCommitLog" => {
                mls.batch_publish_commit_log(Request::new(
                    mpb::BatchPublishCommitLogRequest::decode(req.as_slice()).unwrap(),
                ))
                .await
                .unwrap();
            }
            "GetInboxIds" => {
                let ours = id
                    .get_inbox_ids(Request::new(
                        ipb::GetInboxIdsRequest::decode(req.as_slice()).unwrap(),
                    ))
                    .await
                    .unwrap()
                    .into_inner();
                let theirs = ipb::GetInboxIdsResponse::decode(resp.as_slice()).unwrap();
                let f = |r: &ipb::GetInboxIdsResponse| {
                    r.responses
                        .iter()
                        .map(|x| x.inbox_id.clone())
                        .collect::<Vec<_>>()
                };
                assert_eq!(f(&ours), f(&theirs), "{seq} GetInboxIds");
                compared += 1;
            }
            "GetIdentityUpdates" => {
                let ours = id
                    .get_identity_updates(Request::new(
                        ipb::GetIdentityUpdatesRequest::decode(req.as_slice()).unwrap(),
                    ))
                    .await
                    .unwrap()
                    .into_inner();
                let theirs = ipb::GetIdentityUpdatesResponse::decode(resp.as_slice()).unwrap();
                let f = |r: &ipb::GetIdentityUpdatesResponse| {
                    r.responses
                        .iter()
                        .map(|x| {
                            (
                                x.inbox_id.clone(),
                                x.updates
                                    .iter()
                                    .map(|u| u.update.clone())
                                    .collect::<Vec<_>>(),
                            )
                        })
                        .collect::<Vec<_>>()
                };
                assert_eq!(f(&ours), f(&theirs), "{seq} GetIdentityUpdates");
                compared += 1;
            }
            "FetchKeyPackages" => {
                let ours = mls
                    .fetch_key_packages(Request::new(
                        mpb::FetchKeyPackagesRequest::decode(req.as_slice()).unwrap(),
                    ))
                    .await
                    .unwrap()
                    .into_inner();
                let theirs = mpb::FetchKeyPackagesResponse::decode(resp.as_slice()).unwrap();
                assert_eq!(ours, theirs, "{seq} FetchKeyPackages");
                compared += 1;
            }
            "QueryGroupMessages" => {
                let ours = mls
                    .query_group_messages(Request::new(
                        mpb::QueryGroupMessagesRequest::decode(req.as_slice()).unwrap(),
                    ))
                    .await
                    .unwrap()
                    .into_inner();
                let theirs = mpb::QueryGroupMessagesResponse::decode(resp.as_slice()).unwrap();
                assert_eq!(
                    group_data(&ours.messages),
                    group_data(&theirs.messages),
                    "{seq} QueryGroupMessages"
                );
                compared += 1;
            }
            "QueryWelcomeMessages" => {
                let ours = mls
                    .query_welcome_messages(Request::new(
                        mpb::QueryWelcomeMessagesRequest::decode(req.as_slice()).unwrap(),
                    ))
                    .await
                    .unwrap()
                    .into_inner();
                let theirs = mpb::QueryWelcomeMessagesResponse::decode(resp.as_slice()).unwrap();
                assert_eq!(
                    welcome_data(&ours.messages),
                    welcome_data(&theirs.messages),
                    "{seq} QueryWelcomeMessages"
                );
                compared += 1;
            }
            "GetNewestGroupMessage" => {
                let ours = mls
                    .get_newest_group_message(Request::new(
                        mpb::GetNewestGroupMessageRequest::decode(req.as_slice()).unwrap(),
                    ))
                    .await
                    .unwrap()
                    .into_inner();
                let theirs = mpb::GetNewestGroupMessageResponse::decode(resp.as_slice()).unwrap();
                let f = |r: &mpb::GetNewestGroupMessageResponse| {
                    r.responses
                        .iter()
                        .map(|x| {
                            x.group_message
                                .as_ref()
                                .map(|m| group_data(std::slice::from_ref(m)))
                        })
                        .collect::<Vec<_>>()
                };
                assert_eq!(f(&ours), f(&theirs), "{seq} GetNewestGroupMessage");
                compared += 1;
            }
            _ => {}
        }
    }
    assert!(compared > 100, "compared only {compared} queries");
}
