//! Shared setup for the client's integration tests: an in-process node and clients on it.
#![allow(dead_code)]

use gatehouse_client::{Client, connect};
use gatehouse_protocol::identity::{InstallationKey, Wallet};

/// A node on a free loopback port (serving until the test ends): its URL and its store.
pub async fn node_with_store() -> (String, gatehouse_node::Store) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let store = gatehouse_node::Store::temporary().unwrap();
    let node = gatehouse_node::Node::new(store.clone());
    tokio::spawn(gatehouse_node::serve(
        listener,
        node,
        None,
        std::future::pending(),
    ));
    (url, store)
}

/// A node's URL.
pub async fn node() -> String {
    node_with_store().await.0
}

/// A temporary client store.
pub fn tree() -> sled::Tree {
    let db = sled::Config::new().temporary(true).open().unwrap();
    db.open_tree("c").unwrap()
}

/// Installation `inst` of the inbox owned by wallet `owner`, on `tree`, registered.
pub async fn open(url: &str, tree: &sled::Tree, owner: u8, inst: u8) -> Client {
    let mut c = Client::open(
        tree.clone(),
        connect(url).await.unwrap(),
        Some(Wallet::from_bytes(&[owner; 32]).unwrap()),
        Some(InstallationKey::from_seed(&[inst; 32])),
    )
    .unwrap();
    c.register().await.unwrap();
    c
}

/// A registered client whose wallet and installation come from `n`.
pub async fn client(url: &str, n: u8) -> Client {
    open(url, &tree(), n, n).await
}

/// The texts of what was read, group changes left out.
pub fn texts(r: &[gatehouse_client::Received]) -> Vec<String> {
    r.iter()
        .filter(|m| !m.is_transcript())
        .filter_map(|m| m.text.clone())
        .collect()
}

/// The conversation's epoch as `c` holds it.
pub fn epoch(c: &Client, gid: &[u8]) -> u64 {
    c.conversation_info(gid).unwrap()["epoch"].as_u64().unwrap()
}
