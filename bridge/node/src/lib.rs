//! An XMTP v3 network node.
//!
//! Contract: serves `xmtp.mls.api.v1.MlsApi` and `xmtp.identity.api.v1.IdentityApi` the way
//! libxmtp calls them, over plaintext HTTP/2 or TLS, storing everything in sled. Like XMTP's
//! own node it validates what it stores (identity updates are folded under XMTP's rules, key
//! packages must be signed by a live installation of the inbox their credential names) and it
//! assigns ids and cursors. It never sees plaintext: group messages and welcomes are opaque
//! ciphertext to it; it reads only the clear MLS header (group id, epoch, content type).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod service;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;

pub use service::{IdentityService, MlsService, Node};
pub use store::Store;

/// XMTP's payload limit per request (25 MiB); larger requests get `RESOURCE_EXHAUSTED`.
pub const MAX_MESSAGE_BYTES: usize = 25 * 1024 * 1024;

/// TLS material for the listener.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Serves the node on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    node: Node,
    tls: Option<TlsFiles>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use gatehouse_wire::identity_api::identity_api_server::IdentityApiServer;
    use gatehouse_wire::mls_api::mls_api_server::MlsApiServer;
    let addr: SocketAddr = listener.local_addr()?;
    let mut builder = tonic::transport::Server::builder()
        // libxmtp pings every 16 s; answer them rather than treat them as abuse.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .tcp_nodelay(true);
    if let Some(tls) = &tls {
        let cert = std::fs::read(&tls.cert)
            .with_context(|| format!("reading TLS certificate {}", tls.cert.display()))?;
        let key = std::fs::read(&tls.key)
            .with_context(|| format!("reading TLS key {}", tls.key.display()))?;
        builder = builder
            .tls_config(
                tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(cert, key)),
            )
            .context("configuring TLS")?;
    }
    tracing::info!(%addr, tls = tls.is_some(), "XMTP node listening");
    // A graceful shutdown waits for every open response to end; subscriptions end only
    // when told to (their clients would otherwise hold the stop up indefinitely).
    let closer = node.clone();
    let shutdown = async move {
        shutdown.await;
        closer.close_streams();
    };
    builder
        .add_service(
            MlsApiServer::new(node.mls())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            IdentityApiServer::new(node.identity())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        // Accepted connections get TCP_NODELAY here: with an incoming stream of our own,
        // tonic's `tcp_nodelay` does not apply, and Nagle's algorithm against the client's
        // delayed ACKs held small answers back ~40 ms each (found with the load harness).
        .serve_with_incoming_shutdown(
            tokio_stream::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                |conn| {
                    if let Ok(c) = &conn {
                        let _ = c.set_nodelay(true);
                    }
                    conn
                },
            ),
            shutdown,
        )
        .await?;
    Ok(())
}
