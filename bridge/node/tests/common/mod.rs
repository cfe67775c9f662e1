//! A node served on a free loopback port, for the integration tests.

use gatehouse_node::{Node, Store, TlsFiles};

/// A node on a temporary store; stops when `stop` is sent (or dropped).
pub struct Served {
    pub port: u16,
    pub stop: tokio::sync::oneshot::Sender<()>,
    pub server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub async fn serve(tls: Option<TlsFiles>) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(gatehouse_node::serve(
        listener,
        Node::new(Store::temporary().unwrap()),
        tls,
        async move {
            let _ = stopped.await;
        },
    ));
    Served { port, stop, server }
}
