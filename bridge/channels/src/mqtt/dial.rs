//! Dialling the broker over TCP (Nagle off), with TLS when configured.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::pki_types::ServerName;

/// A byte stream to the broker.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Where and how to dial: `host:port`, and TLS with the name the certificate must carry.
pub(crate) struct Broker {
    addr: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl Broker {
    /// Fails only on a TLS server name that is not a valid DNS name or address.
    pub fn new(
        addr: String,
        tls: Option<(Arc<tokio_rustls::rustls::ClientConfig>, String)>,
    ) -> std::io::Result<Broker> {
        let tls = match tls {
            Some((cfg, name)) => Some((
                tokio_rustls::TlsConnector::from(cfg),
                ServerName::try_from(name.clone()).map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("TLS server name {name:?}: {e}"),
                    )
                })?,
            )),
            None => None,
        };
        Ok(Broker { addr, tls })
    }

    /// A new connection, with Nagle's algorithm off. Publishes and acknowledgements are small
    /// writes; with it, one can wait for the TCP acknowledgement of the one before, which the
    /// peer's delayed ACK holds back up to 40 ms. (The broker's side has the same choice:
    /// mosquitto's `set_tcp_nodelay true`, without which our PUBACKs were measured arriving
    /// 40–45 ms late.)
    pub async fn dial(&self) -> Result<Box<dyn Io>, String> {
        let tcp = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|e| format!("{}: {e}", self.addr))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            Some((connector, name)) => Ok(Box::new(
                connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS with {}: {e}", self.addr))?,
            )),
            None => Ok(Box::new(tcp)),
        }
    }
}
