//! Stopping the server ends live subscriptions: a client holding a stream open does not hold
//! the stop up.

mod common;

use gatehouse_wire::mls_api::mls_api_client::MlsApiClient;
use gatehouse_wire::xmtp::mls::api::v1 as mpb;

#[tokio::test]
async fn stop_ends_subscriptions_held_by_clients() {
    let common::Served {
        port,
        stop: stop_tx,
        server,
    } = common::serve(None).await;
    let mut client = MlsApiClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    let mut groups = client
        .subscribe_group_messages(mpb::SubscribeGroupMessagesRequest {
            filters: vec![mpb::subscribe_group_messages_request::Filter {
                group_id: vec![7; 16],
                id_cursor: 0,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let mut welcomes = client
        .subscribe_welcome_messages(mpb::SubscribeWelcomeMessagesRequest {
            filters: vec![mpb::subscribe_welcome_messages_request::Filter {
                installation_key: vec![9; 32],
                id_cursor: 0,
            }],
        })
        .await
        .unwrap()
        .into_inner();

    stop_tx.send(()).unwrap();
    // Both streams end cleanly while the client still holds them, and the server returns.
    // (The timeout only turns a hang into a failure; nothing here is timed.)
    let guard = std::time::Duration::from_secs(60);
    let ended = tokio::time::timeout(guard, async {
        (groups.message().await, welcomes.message().await)
    })
    .await
    .expect("the streams did not end");
    assert!(matches!(ended.0, Ok(None)), "{:?}", ended.0);
    assert!(matches!(ended.1, Ok(None)), "{:?}", ended.1);
    tokio::time::timeout(guard, server)
        .await
        .expect("the server did not stop")
        .unwrap()
        .unwrap();
    drop((groups, welcomes, client));
}

/// A client that stops reading a stream without closing it (its flow-control window full of
/// news it does not take) cannot hold the stop up: the stream's end cannot be sent to it, so
/// its connection is closed after the stop's grace period.
#[tokio::test]
async fn a_client_not_reading_its_stream_does_not_hold_the_stop() {
    let common::Served {
        port,
        stop: stop_tx,
        server,
    } = common::serve(None).await;
    let url = format!("http://127.0.0.1:{port}");
    let mut reader = MlsApiClient::connect(url.clone()).await.unwrap();
    let key = vec![9; 32];
    let welcomes = reader
        .subscribe_welcome_messages(mpb::SubscribeWelcomeMessagesRequest {
            filters: vec![mpb::subscribe_welcome_messages_request::Filter {
                installation_key: key.clone(),
                id_cursor: 0,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    // More than the client's windows hold (HTTP/2: a few MiB), never read.
    let mut sender = MlsApiClient::connect(url).await.unwrap();
    for _ in 0..64 {
        sender
            .send_welcome_messages(mpb::SendWelcomeMessagesRequest {
                messages: (0..4)
                    .map(|_| mpb::WelcomeMessageInput {
                        version: Some(mpb::welcome_message_input::Version::V1(
                            mpb::welcome_message_input::V1 {
                                installation_key: key.clone(),
                                data: vec![0x5a; 64 * 1024],
                                hpke_public_key: vec![1; 32],
                                ..Default::default()
                            },
                        )),
                    })
                    .collect(),
            })
            .await
            .unwrap();
    }

    stop_tx.send(()).unwrap();
    // (The timeout only turns a hang into a failure; nothing here is timed.)
    tokio::time::timeout(std::time::Duration::from_secs(60), server)
        .await
        .expect("the server did not stop while a client held an unread stream")
        .unwrap()
        .unwrap();
    drop((welcomes, reader, sender));
}
