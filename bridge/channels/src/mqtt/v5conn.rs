//! The MQTT 5 broker connection, with its I/O done here.
//!
//! rumqttc 0.25's MQTT 5 event loop sends what is queued one request per poll, each after a
//! timer sleep that every incoming packet restarts (rumqtt#814), and it keeps its connection to
//! itself, so queued publishes went to the broker at about one per millisecond. This loop keeps
//! rumqttc's protocol state ([`MqttState`]: packet ids in flight, QoS 2 exchanges, ping
//! tracking) and its packet encoding, and does the reading and writing itself: whatever is
//! queued goes out together, in one write.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5::{self as p5, Packet};
use rumqttc::v5::{Event, MqttState, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

use super::dial::{Broker, Io};

/// How long dialling and the CONNECT / CONNACK exchange may take (rumqttc's default).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Free space kept in the read buffer before each read.
const READ_CHUNK: usize = 16 * 1024;

/// Where the connection goes: the QoS 2 relay's Unix socket, or the broker itself.
pub(crate) enum Target {
    Unix(String),
    Tcp(Broker),
}

/// What a CONNECT says about us.
pub(crate) struct Settings {
    pub client_id: String,
    pub keep_alive: Duration,
    pub clean_start: bool,
    /// How long the broker keeps the session after we disconnect (`None`: it ends with the
    /// connection).
    pub session_expiry_secs: Option<u32>,
    /// The largest packet we take; announced, so the broker sends nothing larger.
    pub max_packet_bytes: u32,
    pub login: Option<p5::Login>,
    pub target: Target,
}

/// Why the connection failed or ended.
pub(crate) enum Error {
    /// The broker answered CONNECT with a failure code.
    Refused(p5::ConnectReturnCode),
    Other(String),
}

impl Error {
    pub fn message(&self) -> String {
        match self {
            Error::Refused(code) => format!("the broker refused the connection: {code:?}"),
            Error::Other(m) => m.clone(),
        }
    }
}

fn io_error(what: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Other(format!("{what}: {e}"))
}

fn state_error(e: rumqttc::v5::StateError) -> Error {
    Error::Other(format!("MQTT protocol state: {e}"))
}

/// Requests to the connection from other tasks (acknowledgements, subscriptions).
#[derive(Clone)]
pub(crate) struct Requests(mpsc::Sender<Request>);

impl Requests {
    pub async fn send(&self, request: Request) -> Result<(), String> {
        self.0
            .send(request)
            .await
            .map_err(|_| "the MQTT connection has stopped".to_string())
    }
}

/// One open connection: the stream and its buffers.
struct Net {
    io: Box<dyn Io>,
    read: BytesMut,
    write: BytesMut,
    max_incoming: u32,
    /// The broker's Maximum Packet Size, from its CONNACK.
    max_outgoing: Option<u32>,
}

impl Net {
    fn encode(&mut self, packet: &Packet) -> Result<(), Error> {
        packet
            .write(&mut self.write, self.max_outgoing)
            .map(|_| ())
            .map_err(|e| Error::Other(format!("encoding an MQTT packet: {e}")))
    }

    /// The next complete packet already read, if any.
    fn parse(&mut self) -> Result<Option<Packet>, Error> {
        match Packet::read(&mut self.read, Some(self.max_incoming)) {
            Ok(p) => Ok(Some(p)),
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(n)) => {
                self.read.reserve(n);
                Ok(None)
            }
            Err(e) => Err(Error::Other(format!(
                "malformed MQTT packet from the broker: {e}"
            ))),
        }
    }

    /// Reads more bytes (cancel-safe: nothing is lost if another branch wins).
    async fn fill(&mut self) -> Result<(), Error> {
        if self.read.capacity() - self.read.len() < READ_CHUNK {
            self.read.reserve(READ_CHUNK);
        }
        match self.io.read_buf(&mut self.read).await {
            Ok(0) => Err(Error::Other("the broker closed the connection".into())),
            Ok(_) => Ok(()),
            Err(e) => Err(io_error("reading from the broker")(e)),
        }
    }

    /// Writes out what is encoded (cancel-safe: what was written is gone from the buffer, the
    /// rest goes with the next flush).
    async fn flush(&mut self) -> Result<(), Error> {
        while !self.write.is_empty() {
            self.io
                .write_buf(&mut self.write)
                .await
                .map_err(io_error("writing to the broker"))?;
        }
        self.io
            .flush()
            .await
            .map_err(io_error("writing to the broker"))
    }
}

/// The connection: polled by the driver task only. Reconnects when polled after an error.
pub(crate) struct Connection {
    settings: Settings,
    /// rumqttc's protocol state (kept across reconnections, for the session).
    pub state: MqttState,
    /// Requests to send first, in order (what the last connection left unacknowledged, and
    /// what the driver queues).
    pub pending: VecDeque<Request>,
    requests: mpsc::Receiver<Request>,
    net: Option<Net>,
    /// This connection's keep-alive (the broker may set its own in CONNACK); `None`: no pings.
    keep_alive: Option<Duration>,
    ping: Pin<Box<Sleep>>,
}

/// What one turn of the loop saw.
enum Turn {
    Request(Option<Request>),
    Read(Result<(), Error>),
    Ping,
}

impl Connection {
    /// A connection (not yet dialled) keeping `inflight` of our publishes unacknowledged at
    /// most, and the handle that sends it requests (`capacity` queued at most).
    pub fn new(settings: Settings, inflight: u16, capacity: usize) -> (Requests, Connection) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let keep_alive = Some(settings.keep_alive);
        (
            Requests(tx),
            Connection {
                settings,
                // Acknowledgements are sent by the driver once a message is stored.
                state: MqttState::new(inflight, true),
                pending: VecDeque::new(),
                requests: rx,
                net: None,
                keep_alive,
                ping: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
            },
        )
    }

    /// The next packet from the broker (CONNACK first after each connection). Dials when not
    /// connected; on an error the connection is dropped, and what it left unacknowledged is
    /// queued to go again.
    pub async fn poll(&mut self) -> Result<Packet, Error> {
        if self.net.is_none() {
            let (net, connack) = match tokio::time::timeout(CONNECT_TIMEOUT, self.connect()).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(Error::Other(format!(
                        "no CONNACK within {} s",
                        CONNECT_TIMEOUT.as_secs()
                    )));
                }
            };
            // A new session knows none of what the last one left: the driver decides what goes
            // again.
            if !connack.session_present {
                self.pending.clear();
            }
            self.net = Some(net);
            self.reset_ping();
            if let Err(e) = self.state.handle_incoming_packet(Packet::ConnAck(connack)) {
                self.drop_connection();
                return Err(state_error(e));
            }
        }
        match self.turns().await {
            Ok(p) => Ok(p),
            Err(e) => {
                self.drop_connection();
                Err(e)
            }
        }
    }

    /// Sends `publishes` now, behind anything queued, in one write; queued for the next
    /// connection when there is none.
    pub async fn send_publishes(&mut self, publishes: Vec<p5::Publish>) {
        self.pending
            .extend(publishes.into_iter().map(Request::Publish));
        if self.net.is_none() {
            return;
        }
        if let Err(e) = self.write_pending() {
            tracing::debug!(error = %e.message(), "MQTT write failed; the session resends after the reconnect");
            self.drop_connection();
            return;
        }
        if let Some(net) = self.net.as_mut()
            && let Err(e) = net.flush().await
        {
            tracing::debug!(error = %e.message(), "MQTT write failed; the session resends after the reconnect");
            self.drop_connection();
        }
    }

    /// Ends the connection with a DISCONNECT (normal disconnection), if it is up.
    pub async fn close(&mut self) {
        if let Some(net) = self.net.as_mut()
            && let Ok(Some(packet)) = self.state.handle_outgoing_packet(Request::Disconnect)
            && net.encode(&packet).is_ok()
        {
            let _ = tokio::time::timeout(Duration::from_secs(1), net.flush()).await;
        }
        self.net = None;
    }

    fn reset_ping(&mut self) {
        let wait = self.keep_alive.unwrap_or(Duration::from_secs(3600));
        self.ping.as_mut().reset(Instant::now() + wait);
    }

    /// Dials, sends CONNECT and reads the CONNACK.
    async fn connect(&mut self) -> Result<(Net, p5::ConnAck), Error> {
        let s = &self.settings;
        let io: Box<dyn Io> = match &s.target {
            Target::Unix(path) => Box::new(
                tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(io_error(path))?,
            ),
            Target::Tcp(broker) => broker.dial().await.map_err(Error::Other)?,
        };
        let mut net = Net {
            io,
            read: BytesMut::with_capacity(READ_CHUNK),
            write: BytesMut::with_capacity(READ_CHUNK),
            max_incoming: s.max_packet_bytes,
            max_outgoing: None,
        };
        let mut properties = p5::ConnectProperties::new();
        properties.session_expiry_interval = s.session_expiry_secs;
        properties.max_packet_size = Some(s.max_packet_bytes);
        let connect = p5::Connect {
            keep_alive: s.keep_alive.as_secs().min(u64::from(u16::MAX)) as u16,
            client_id: s.client_id.clone(),
            clean_start: s.clean_start,
            properties: Some(properties),
        };
        net.encode(&Packet::Connect(connect, None, s.login.clone()))?;
        net.flush().await?;
        let packet = loop {
            if let Some(p) = net.parse()? {
                break p;
            }
            net.fill().await?;
        };
        match packet {
            Packet::ConnAck(c) if c.code == p5::ConnectReturnCode::Success => {
                self.keep_alive = Some(self.settings.keep_alive);
                if let Some(props) = &c.properties {
                    if let Some(k) = props.server_keep_alive {
                        // 0: the broker wants no keep-alive.
                        self.keep_alive = (k > 0).then(|| Duration::from_secs(k.into()));
                    }
                    net.max_outgoing = props.max_packet_size;
                }
                Ok((net, c))
            }
            Packet::ConnAck(c) => Err(Error::Refused(c.code)),
            _ => Err(Error::Other(
                "the broker answered CONNECT with something other than CONNACK".into(),
            )),
        }
    }

    /// Drops the connection; what it left unacknowledged goes again (marked DUP) when the
    /// session resumes.
    fn drop_connection(&mut self) {
        self.net = None;
        for request in self.state.clean() {
            self.pending.push_back(match request {
                Request::Publish(mut p) => {
                    p.dup = true;
                    Request::Publish(p)
                }
                other => other,
            });
        }
        // Requests made before the drop go in their order behind those (rumqttc does the same).
        while let Ok(r) = self.requests.try_recv() {
            self.pending.push_back(r);
        }
    }

    /// Encodes what is queued.
    fn write_pending(&mut self) -> Result<(), Error> {
        let Some(net) = self.net.as_mut() else {
            return Ok(());
        };
        while let Some(request) = self.pending.pop_front() {
            if let Some(packet) = self
                .state
                .handle_outgoing_packet(request)
                .map_err(state_error)?
            {
                net.encode(&packet)?;
            }
        }
        Ok(())
    }

    /// Runs until the broker sends something: writes what is queued and what other tasks ask
    /// for, reads, answers, pings.
    async fn turns(&mut self) -> Result<Packet, Error> {
        loop {
            // Our own packets also make events (outgoing); only the broker's are news.
            while let Some(event) = self.state.events.pop_front() {
                if let Event::Incoming(packet) = event {
                    return Ok(packet);
                }
            }
            // What other tasks asked for goes behind what is queued, all in one write.
            while let Ok(r) = self.requests.try_recv() {
                self.pending.push_back(r);
            }
            self.write_pending()?;
            let net = self.net.as_mut().expect("connected");
            net.flush().await?;
            let turn = tokio::select! {
                r = self.requests.recv() => Turn::Request(r),
                r = net.fill() => Turn::Read(r),
                _ = self.ping.as_mut() => Turn::Ping,
            };
            match turn {
                Turn::Request(Some(r)) => self.pending.push_back(r),
                Turn::Request(None) => {
                    return Err(Error::Other("the MQTT client handle was dropped".into()));
                }
                Turn::Read(r) => {
                    r?;
                    let net = self.net.as_mut().expect("connected");
                    while let Some(packet) = net.parse()? {
                        if let Some(reply) = self
                            .state
                            .handle_incoming_packet(packet)
                            .map_err(state_error)?
                        {
                            net.encode(&reply)?;
                        }
                    }
                    // The answers (PUBREL, PUBCOMP) go before the packets are handed on.
                    net.flush().await?;
                }
                Turn::Ping => {
                    self.reset_ping();
                    // Fails when the last ping is still unanswered: the broker is gone.
                    self.pending.push_back(Request::PingReq);
                }
            }
        }
    }
}
