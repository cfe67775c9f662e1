//! Key-package rotation, against an in-process node.

use gatehouse_client::{Client, connect};
use gatehouse_protocol::identity::{InstallationKey, Wallet};

async fn node() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let node = gatehouse_node::Node::new(gatehouse_node::Store::temporary().unwrap());
    tokio::spawn(gatehouse_node::serve(
        listener,
        node,
        None,
        std::future::pending(),
    ));
    url
}

async fn client(url: &str, n: u8) -> Client {
    let db = sled::Config::new().temporary(true).open().unwrap();
    let mut c = Client::open(
        db.open_tree("c").unwrap(),
        connect(url).await.unwrap(),
        Some(Wallet::from_bytes(&[n; 32]).unwrap()),
        Some(InstallationKey::from_seed(&[n; 32])),
    )
    .unwrap();
    c.register().await.unwrap();
    c
}

/// A welcome that used our key package rotates it; the old one stays for the grace period and
/// its private keys are deleted after it; new conversations use the new package.
#[tokio::test]
async fn rotated_after_a_welcome_and_deleted_after_grace() {
    let url = node().await;
    let mut a = client(&url, 1).await;
    let mut b = client(&url, 2).await;
    let mut c = client(&url, 3).await;
    let first = a.current_key_package().unwrap().unwrap();
    b.dm(a.inbox_id()).await.unwrap();
    assert_eq!(a.sync_welcomes().await.unwrap().len(), 1);
    let second = a.current_key_package().unwrap().unwrap();
    assert_ne!(first, second, "rotated after the welcome");
    assert!(a.holds_key_package(&first), "kept during the grace period");
    a.set_key_package_grace(std::time::Duration::ZERO);
    a.sync_welcomes().await.unwrap();
    assert!(
        !a.holds_key_package(&first),
        "deleted after the grace period"
    );
    assert!(a.holds_key_package(&second));
    // The new package works: C's DM reaches A.
    let gid = c.dm(a.inbox_id()).await.unwrap();
    assert_eq!(a.sync_welcomes().await.unwrap(), vec![gid]);
}
