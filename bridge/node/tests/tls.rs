//! The node serves over TLS when given a certificate.

mod common;

use gatehouse_node::TlsFiles;
use gatehouse_wire::identity_api::{
    GetInboxIdsRequest, get_inbox_ids_request, identity_api_client::IdentityApiClient,
};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// A TLS client that trusts the node's certificate gets answers; a plaintext client does not.
#[tokio::test]
async fn serves_over_tls() {
    let dir = std::env::temp_dir().join(format!("gh-node-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();

    let common::Served {
        port,
        stop: stop_tx,
        server,
    } = common::serve(Some(TlsFiles {
        cert: cert.clone(),
        key,
    }))
    .await;

    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ck.cert.pem()))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let req = GetInboxIdsRequest {
        requests: vec![get_inbox_ids_request::Request {
            identifier: "0x0000000000000000000000000000000000000001".into(),
            identifier_kind: 1,
        }],
    };
    let resp = IdentityApiClient::new(channel)
        .get_inbox_ids(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.responses.len(), 1);
    assert_eq!(resp.responses[0].inbox_id, None);

    let plain = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = plain {
        assert!(
            IdentityApiClient::new(ch).get_inbox_ids(req).await.is_err(),
            "plaintext must not be served on the TLS port"
        );
    }
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
