//! The client's way to a node: gRPC over HTTP/2 to a node URL, or straight into a node that
//! runs in the same process.

use std::task::{Context, Poll};

use tonic::body::BoxBody;
use tonic::codegen::{BoxFuture, Service, StdError, http};

/// A connection to an XMTP node. Cheap to clone; clones share it.
///
/// [`connect`](crate::connect) makes one to a node URL: gRPC over HTTP/2, what any XMTP
/// client speaks. [`Channel::in_process`] makes one to a node served by the same process (the
/// daemon's embedded node): the same gRPC requests and answers, protobuf-encoded as on the
/// wire and handled by the node's own services, but handed over in memory, without HTTP/2
/// framing, a socket or a second copy through the kernel.
#[derive(Clone)]
pub struct Channel(Link);

#[derive(Clone)]
enum Link {
    Remote(tonic::transport::Channel),
    Local(tonic::service::Routes),
}

impl Channel {
    /// A channel over the network (see [`connect`](crate::connect)).
    pub fn remote(channel: tonic::transport::Channel) -> Self {
        Self(Link::Remote(channel))
    }

    /// A channel to a node's services in this process (`gatehouse_node::routes`).
    pub fn in_process(routes: tonic::service::Routes) -> Self {
        Self(Link::Local(routes))
    }

    /// Whether this channel reaches its node in memory.
    pub fn is_in_process(&self) -> bool {
        matches!(self.0, Link::Local(_))
    }
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Link::Remote(_) => "Channel(remote)",
            Link::Local(_) => "Channel(in process)",
        })
    }
}

impl Service<http::Request<BoxBody>> for Channel {
    type Response = http::Response<BoxBody>;
    type Error = StdError;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match &mut self.0 {
            Link::Remote(c) => c.poll_ready(cx).map_err(Into::into),
            Link::Local(r) => r.poll_ready(cx),
        }
    }

    fn call(&mut self, request: http::Request<BoxBody>) -> Self::Future {
        match &mut self.0 {
            Link::Remote(c) => {
                let answer = c.call(request);
                Box::pin(async move { answer.await.map_err(Into::into) })
            }
            // The node's handler runs as a task of its own, as it would behind HTTP/2 (one
            // task per stream): requests a caller makes together run in parallel on the
            // runtime's threads rather than all on the caller's. Dropping the answer's future
            // stops the handler, as a reset stream would. Outside a tokio runtime (nothing to
            // spawn on) the handler runs in the caller's future instead.
            Link::Local(r) => {
                let handler = r.call(request);
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    return Box::pin(handler);
                };
                let mut handler = Abort(runtime.spawn(handler));
                Box::pin(async move {
                    match (&mut handler.0).await {
                        Ok(answer) => answer,
                        Err(e) => Err(format!("the in-process node's handler failed: {e}").into()),
                    }
                })
            }
        }
    }
}

/// A spawned task that is stopped when this is dropped.
struct Abort<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Abort<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
