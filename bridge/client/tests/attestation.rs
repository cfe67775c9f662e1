//! Attestations as a receiving client checks them, against an in-process node.

mod common;
use common::node;

use gatehouse_client::Client;
use gatehouse_protocol::attestation::{EndpointAttestation, PARAMETER};
use gatehouse_protocol::content;
use gatehouse_protocol::identity::InstallationKey;

async fn client(url: &str, n: u8) -> (Client, InstallationKey) {
    (
        common::client(url, n).await,
        InstallationKey::from_seed(&[n; 32]),
    )
}

/// Only an attestation signed by a live installation of the named bridge, about the actual
/// sender, is marked verified; a key that is not the bridge's, or a claim about another
/// endpoint, is shown as unverified.
#[tokio::test]
async fn only_the_bridges_attestation_verifies() {
    let url = node().await;
    let (bridge, bridge_key) = client(&url, 1).await;
    let (mut endpoint, endpoint_key) = client(&url, 2).await;
    let (mut agent, _) = client(&url, 3).await;
    let claim = |endpoint_inbox: &str| EndpointAttestation {
        bridge: bridge.inbox_id().to_string(),
        endpoint: endpoint_inbox.to_string(),
        channel: "mqtt".into(),
        address: "devices/t1/up".into(),
        sender_auth: None,
    };
    let gid = endpoint.dm(agent.inbox_id()).await.unwrap();
    let me = endpoint.inbox_id().to_string();
    for (text, signer, about) in [
        ("good", &bridge_key, me.clone()),
        ("forged key", &endpoint_key, me.clone()),
        ("other endpoint", &bridge_key, agent.inbox_id().to_string()),
    ] {
        let mut c = content::text(text);
        c.parameters
            .insert(PARAMETER.into(), claim(&about).sign(signer));
        endpoint.send(&gid, &c, None).await.unwrap();
    }
    let got = agent.sync_all().await.unwrap();
    let verdicts: Vec<(String, bool)> = got
        .iter()
        .map(|r| {
            (
                r.text.clone().unwrap(),
                r.sender_endpoint.as_ref().unwrap().verified,
            )
        })
        .collect();
    assert_eq!(
        verdicts,
        vec![
            ("good".into(), true),
            ("forged key".into(), false),
            ("other endpoint".into(), false)
        ]
    );
    assert_eq!(
        got[0].sender_endpoint.as_ref().unwrap().bridge,
        bridge.inbox_id()
    );
}
