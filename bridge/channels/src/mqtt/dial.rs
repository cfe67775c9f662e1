//! Dialling the broker over TCP (Nagle off), with TLS when configured: shared by the MQTT 5
//! connection and the QoS 2 relay, the two places that open broker connections themselves.

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

    /// A new connection. Publishes and acknowledgements are small writes, so Nagle's algorithm
    /// is off (see `link::network_options`).
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
