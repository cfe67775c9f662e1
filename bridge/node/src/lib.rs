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

/// How long a stopping node waits for its connections to finish what they are doing (answers
/// in flight) before it closes them: a client that stops reading a stream without closing it
/// would otherwise hold the stop up for as long as it lives (its flow-control window is full,
/// so the stream's end cannot be sent).
pub const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// TLS material for the listener.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// The node's two gRPC services (`MlsApi`, `IdentityApi`) with XMTP's size limits, routed by
/// path: what [`serve`] puts behind its listener, and what a process that embeds the node calls
/// directly, without HTTP/2 or a socket in between (`gatehouse_client::Channel::in_process`).
/// Requests and answers are still the protobuf messages of the wire, and the node still sees
/// only what it would see over the network.
pub fn routes(node: Node) -> tonic::service::Routes {
    use gatehouse_wire::identity_api::identity_api_server::IdentityApiServer;
    use gatehouse_wire::mls_api::mls_api_server::MlsApiServer;
    tonic::service::Routes::new(
        MlsApiServer::new(node.mls())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
    .add_service(
        IdentityApiServer::new(node.identity())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
    .prepare()
}

/// Serves the node on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    node: Node,
    tls: Option<TlsFiles>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
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
    // when told to (their clients would otherwise hold the stop up indefinitely), and
    // connections still open `STOP_GRACE` later are closed.
    let open = Connections::default();
    let (stopping, mut stopped) = tokio::sync::watch::channel(false);
    let closer = node.clone();
    let shutdown = async move {
        shutdown.await;
        closer.close_streams();
        stopping.send_replace(true);
    };
    let cut = {
        let open = open.clone();
        tokio::spawn(async move {
            if stopped.wait_for(|&s| s).await.is_err() {
                return;
            }
            tokio::time::sleep(STOP_GRACE).await;
            let n = open.close_all();
            if n > 0 {
                tracing::warn!(
                    connections = n,
                    grace_ms = STOP_GRACE.as_millis() as u64,
                    "closed connections still open after the stop's grace period (a client not reading its stream)"
                );
            }
        })
    };
    let served = builder
        .add_routes(routes(node))
        // Accepted connections get TCP_NODELAY here: with an incoming stream of our own,
        // tonic's `tcp_nodelay` does not apply, and Nagle's algorithm against the client's
        // delayed ACKs held small answers back ~40 ms each (found with the load harness).
        .serve_with_incoming_shutdown(
            accepting(listener, move |conn| {
                let _ = conn.set_nodelay(true);
                open.track(conn)
            }),
            shutdown,
        )
        .await;
    cut.abort();
    served?;
    Ok(())
}

/// The listener's connections, each passed through `wrap`. A failed accept pauses accepting
/// (`gatehouse_store::accept::Pause`: 5 ms doubling to 1 s while it keeps failing); tonic's own
/// loop ended the server at the first accept error it does not list (out of file descriptors),
/// so this stream never yields one.
fn accepting<T>(
    listener: tokio::net::TcpListener,
    wrap: impl FnMut(tokio::net::TcpStream) -> T,
) -> impl futures::Stream<Item = std::io::Result<T>> {
    let state = (listener, wrap, gatehouse_store::accept::Pause::default());
    futures::stream::unfold(state, |(listener, mut wrap, mut pause)| async move {
        let (conn, _) = pause.accept("XMTP node", || listener.accept()).await;
        let item = Ok(wrap(conn));
        Some((item, (listener, wrap, pause)))
    })
}

/// The node's open connections, so that a stop can close those its grace period did not end.
#[derive(Clone, Default)]
struct Connections(std::sync::Arc<std::sync::Mutex<Open>>);

#[derive(Default)]
struct Open {
    next: u64,
    cuts: std::collections::HashMap<u64, std::sync::Arc<Cut>>,
}

/// Closing one connection under the server's feet: once `closed`, its reads see the end and
/// its writes fail, and whatever waits on either is woken to see it.
#[derive(Default)]
struct Cut {
    closed: std::sync::atomic::AtomicBool,
    read: futures::task::AtomicWaker,
    write: futures::task::AtomicWaker,
}

impl Cut {
    /// Whether the connection is closed; if not, `waker` is woken when it is.
    fn closed(&self, waker: &futures::task::AtomicWaker, cx: &std::task::Context<'_>) -> bool {
        use std::sync::atomic::Ordering;
        if self.closed.load(Ordering::Acquire) {
            return true;
        }
        waker.register(cx.waker());
        self.closed.load(Ordering::Acquire)
    }
}

impl Connections {
    fn track(&self, io: tokio::net::TcpStream) -> Connection {
        let cut = std::sync::Arc::new(Cut::default());
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let id = open.next;
        open.next += 1;
        open.cuts.insert(id, cut.clone());
        Connection {
            io,
            id,
            cut,
            open: self.clone(),
        }
    }

    /// Closes every open connection; how many there were.
    fn close_all(&self) -> usize {
        let open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for cut in open.cuts.values() {
            cut.closed.store(true, std::sync::atomic::Ordering::Release);
            cut.read.wake();
            cut.write.wake();
        }
        open.cuts.len()
    }
}

/// An accepted connection, known to [`Connections`] until it is dropped.
struct Connection {
    io: tokio::net::TcpStream,
    id: u64,
    cut: std::sync::Arc<Cut>,
    open: Connections,
}

/// What a write to a closed connection returns.
fn stopping() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the node is stopping")
}

impl Drop for Connection {
    fn drop(&mut self) {
        let mut open = self.open.0.lock().unwrap_or_else(|p| p.into_inner());
        open.cuts.remove(&self.id);
    }
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl tokio::io::AsyncRead for Connection {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.cut.closed(&self.cut.read, cx) {
            // The end of the stream, as if the client had gone.
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Connection {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.cut.closed(&self.cut.write, cx) {
            return std::task::Poll::Ready(Err(stopping()));
        }
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.cut.closed(&self.cut.write, cx) {
            return std::task::Poll::Ready(Err(stopping()));
        }
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.cut.closed(&self.cut.write, cx) {
            return std::task::Poll::Ready(Err(stopping()));
        }
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
