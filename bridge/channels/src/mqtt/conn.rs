//! The broker connection, either protocol version, with its I/O done here.
//!
//! rumqttc 0.25's event loops send what is queued one request per poll, each after a timer
//! sleep that every incoming packet restarts (rumqtt#814), and the MQTT 5 one keeps its
//! connection to itself, so queued publishes went to the broker at about one per millisecond;
//! and rumqttc answers a PUBREC with PUBREL before the event reaches us, where QoS 2 across
//! crashes needs the PUBREC journalled first. This loop keeps rumqttc's protocol state
//! (`MqttState`: packet ids in flight, QoS 2 exchanges, ping tracking) and its packet encoding,
//! and does the reading and writing itself: whatever is queued goes out together, in one
//! write, and the PUBRECs of a read are journalled (one flush) before they are answered.
//! [`Wire`] is what differs between the two versions.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use rumqttc::v5::mqttbytes::v5 as p5;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

use super::dial::{Broker, Io};
use super::outbox::Outbox;

/// How long dialling and the CONNECT / CONNACK exchange may take (rumqttc's default).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Free space kept in the read buffer before each read.
const READ_CHUNK: usize = 16 * 1024;

/// What a CONNECT says about us.
pub(crate) struct Settings {
    pub client_id: String,
    pub keep_alive: Duration,
    pub clean_start: bool,
    /// MQTT 5: how long the broker keeps the session after we disconnect (`None`: it ends
    /// with the connection).
    pub session_expiry_secs: Option<u32>,
    /// The largest packet we take (announced under MQTT 5, so the broker sends nothing
    /// larger); under MQTT 3.1.1 also the largest we send.
    pub max_packet_bytes: u32,
    pub login: Option<(String, String)>,
}

/// What the broker's CONNACK settled.
pub(crate) struct Accepted {
    /// The broker's keep-alive, when it set one (`Some(None)`: no pings).
    pub keep_alive: Option<Option<Duration>>,
    /// The largest packet the broker takes.
    pub max_outgoing: Option<u32>,
}

/// Why the connection failed or ended.
pub(crate) enum Error {
    /// The broker answered CONNECT with a failure code; `credentials` when it was about them.
    Refused {
        code: String,
        credentials: bool,
    },
    Other(String),
}

impl Error {
    pub fn message(&self) -> String {
        match self {
            Error::Refused { code, .. } => format!("the broker refused the connection: {code}"),
            Error::Other(m) => m.clone(),
        }
    }
}

fn io_error(what: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Other(format!("{what}: {e}"))
}

fn state_error(e: String) -> Error {
    Error::Other(format!("MQTT protocol state: {e}"))
}

/// One protocol version: rumqttc's packets, requests and session state for it.
pub(crate) trait Wire: Send + 'static {
    type Packet: Send + Clone;
    type Request: Send;
    type State: Send;

    /// A session keeping `inflight` of our publishes unacknowledged at most; acknowledgements
    /// of what we receive are left to the driver (sent once a message is stored).
    fn state(inflight: u16) -> Self::State;
    fn encode(packet: &Self::Packet, out: &mut BytesMut, max: Option<u32>) -> Result<(), String>;
    /// The next complete packet in `buf` (`Ok(None)`: more bytes needed, space reserved).
    fn parse(buf: &mut BytesMut, max: u32) -> Result<Option<Self::Packet>, String>;
    fn outgoing(state: &mut Self::State, r: Self::Request) -> Result<Option<Self::Packet>, String>;
    /// A packet from the broker: recorded as an event, and the answer to send, if any.
    fn incoming(state: &mut Self::State, p: Self::Packet) -> Result<Option<Self::Packet>, String>;
    /// The next packet from the broker the state recorded (our own are skipped).
    fn next_event(state: &mut Self::State) -> Option<Self::Packet>;
    /// What the session left unacknowledged, to go again on the next connection (publishes
    /// marked DUP).
    fn unacknowledged(state: &mut Self::State) -> Vec<Self::Request>;
    fn ping() -> Self::Request;
    fn disconnect() -> Self::Request;
    fn connect(s: &Settings) -> Self::Packet;
    /// Checks the answer to CONNECT.
    fn accepted(p: &Self::Packet, s: &Settings) -> Result<Accepted, Error>;
    /// Records the accepted CONNACK, which becomes the connection's first event.
    fn connected(state: &mut Self::State, connack: Self::Packet) -> Result<(), String>;
    fn session_present(connack: &Self::Packet) -> bool;
    /// The packet id, if this is a PUBREC.
    fn pubrec(p: &Self::Packet) -> Option<u16>;
    /// A publish that would be larger than `max` bytes: its packet id, topic and size.
    fn oversized(r: &Self::Request, max: u32) -> Option<(u16, String, usize)>;
    /// What a PUBLISH cut short carries after its packet id before the payload (MQTT 5: an
    /// empty property list).
    const NO_PROPERTIES: &'static [u8];
    /// Hands a packet to the state without it becoming an event.
    fn take_quietly(state: &mut Self::State, p: Self::Packet) -> Result<(), String>;
}

/// What the connection has for the driver.
pub(crate) enum Polled<P> {
    /// A packet from the broker.
    Packet(P),
    /// A publish larger than the broker takes: not sent, and never could be (the broker
    /// would close the connection, and the session would send it again on the next).
    TooLarge {
        pkid: u16,
        topic: String,
        size: usize,
        max: u32,
    },
    /// A publish from the broker larger than `max_packet_bytes`: its payload was skipped as
    /// it arrived (never buffered). `cut` is the publish without payload (topic, packet id,
    /// QoS), for its acknowledgement; `size` the packet's size.
    Oversized { cut: P, size: usize },
}

/// The [`Wire`] methods that only hand over to rumqttc's session state, whose two versions
/// have the same methods under different types.
macro_rules! session_methods {
    ($event:path, $request:path) => {
        fn outgoing(
            state: &mut Self::State,
            r: Self::Request,
        ) -> Result<Option<Self::Packet>, String> {
            state.handle_outgoing_packet(r).map_err(|e| e.to_string())
        }
        fn incoming(
            state: &mut Self::State,
            p: Self::Packet,
        ) -> Result<Option<Self::Packet>, String> {
            state.handle_incoming_packet(p).map_err(|e| e.to_string())
        }
        fn next_event(state: &mut Self::State) -> Option<Self::Packet> {
            use $event as Event;
            while let Some(event) = state.events.pop_front() {
                if let Event::Incoming(p) = event {
                    return Some(p);
                }
            }
            None
        }
        fn take_quietly(state: &mut Self::State, p: Self::Packet) -> Result<(), String> {
            use $event as Event;
            state.handle_incoming_packet(p).map_err(|e| e.to_string())?;
            // The state records the packet as an event first; with manual acknowledgements a
            // PUBLISH adds nothing after it.
            if matches!(state.events.back(), Some(Event::Incoming(_))) {
                state.events.pop_back();
            }
            Ok(())
        }
        fn unacknowledged(state: &mut Self::State) -> Vec<Self::Request> {
            use $request as Request;
            let mut out = state.clean();
            for r in &mut out {
                if let Request::Publish(p) = r {
                    p.dup = true;
                }
            }
            out
        }
    };
}

/// MQTT 3.1.1.
pub(crate) enum V4 {}

impl Wire for V4 {
    type Packet = rumqttc::Packet;
    type Request = rumqttc::Request;
    type State = rumqttc::MqttState;
    const NO_PROPERTIES: &'static [u8] = &[];

    fn state(inflight: u16) -> Self::State {
        rumqttc::MqttState::new(inflight, true)
    }
    fn encode(packet: &Self::Packet, out: &mut BytesMut, max: Option<u32>) -> Result<(), String> {
        let max = max.map_or(usize::MAX, |m| m as usize);
        packet
            .write(out, max)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    fn parse(buf: &mut BytesMut, max: u32) -> Result<Option<Self::Packet>, String> {
        match rumqttc::Packet::read(buf, max as usize) {
            Ok(p) => Ok(Some(p)),
            Err(rumqttc::Error::InsufficientBytes(n)) => {
                buf.reserve(n);
                Ok(None)
            }
            Err(e) => Err(e.to_string()),
        }
    }
    session_methods!(rumqttc::Event, rumqttc::Request);
    fn ping() -> Self::Request {
        rumqttc::Request::PingReq(rumqttc::PingReq)
    }
    fn disconnect() -> Self::Request {
        rumqttc::Request::Disconnect(rumqttc::Disconnect)
    }
    fn connect(s: &Settings) -> Self::Packet {
        let mut c = rumqttc::Connect::new(s.client_id.clone());
        c.keep_alive = s.keep_alive.as_secs().min(u64::from(u16::MAX)) as u16;
        c.clean_session = s.clean_start;
        c.login = s
            .login
            .as_ref()
            .map(|(u, p)| rumqttc::Login::new(u.clone(), p.clone()));
        rumqttc::Packet::Connect(c)
    }
    fn accepted(p: &Self::Packet, s: &Settings) -> Result<Accepted, Error> {
        use rumqttc::ConnectReturnCode as C;
        match p {
            rumqttc::Packet::ConnAck(c) if c.code == C::Success => Ok(Accepted {
                keep_alive: None,
                // MQTT 3.1.1 cannot say; ours is the limit both ways.
                max_outgoing: Some(s.max_packet_bytes),
            }),
            rumqttc::Packet::ConnAck(c) => Err(Error::Refused {
                code: format!("{:?}", c.code),
                credentials: matches!(c.code, C::BadUserNamePassword | C::NotAuthorized),
            }),
            _ => Err(not_connack()),
        }
    }
    fn connected(state: &mut Self::State, connack: Self::Packet) -> Result<(), String> {
        // rumqttc's 3.1.1 state takes no CONNACK (its event loop reports it on its own).
        state.events.push_back(rumqttc::Event::Incoming(connack));
        Ok(())
    }
    fn session_present(connack: &Self::Packet) -> bool {
        matches!(connack, rumqttc::Packet::ConnAck(c) if c.session_present)
    }
    fn pubrec(p: &Self::Packet) -> Option<u16> {
        match p {
            rumqttc::Packet::PubRec(r) => Some(r.pkid),
            _ => None,
        }
    }
    fn oversized(r: &Self::Request, max: u32) -> Option<(u16, String, usize)> {
        match r {
            rumqttc::Request::Publish(p) if p.size() > max as usize => {
                Some((p.pkid, p.topic.clone(), p.size()))
            }
            _ => None,
        }
    }
}

/// MQTT 5.
pub(crate) enum V5 {}

impl Wire for V5 {
    type Packet = p5::Packet;
    type Request = rumqttc::v5::Request;
    type State = rumqttc::v5::MqttState;
    const NO_PROPERTIES: &'static [u8] = &[0];

    fn state(inflight: u16) -> Self::State {
        rumqttc::v5::MqttState::new(inflight, true)
    }
    fn encode(packet: &Self::Packet, out: &mut BytesMut, max: Option<u32>) -> Result<(), String> {
        packet
            .write(out, max)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    fn parse(buf: &mut BytesMut, max: u32) -> Result<Option<Self::Packet>, String> {
        match p5::Packet::read(buf, Some(max)) {
            Ok(p) => Ok(Some(p)),
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(n)) => {
                buf.reserve(n);
                Ok(None)
            }
            Err(e) => Err(e.to_string()),
        }
    }
    session_methods!(rumqttc::v5::Event, rumqttc::v5::Request);
    fn ping() -> Self::Request {
        rumqttc::v5::Request::PingReq
    }
    fn disconnect() -> Self::Request {
        rumqttc::v5::Request::Disconnect
    }
    fn connect(s: &Settings) -> Self::Packet {
        let mut properties = p5::ConnectProperties::new();
        properties.session_expiry_interval = s.session_expiry_secs;
        properties.max_packet_size = Some(s.max_packet_bytes);
        let connect = p5::Connect {
            keep_alive: s.keep_alive.as_secs().min(u64::from(u16::MAX)) as u16,
            client_id: s.client_id.clone(),
            clean_start: s.clean_start,
            properties: Some(properties),
        };
        let login = s
            .login
            .as_ref()
            .map(|(u, p)| p5::Login::new(u.clone(), p.clone()));
        p5::Packet::Connect(connect, None, login)
    }
    fn accepted(p: &Self::Packet, _: &Settings) -> Result<Accepted, Error> {
        use p5::ConnectReturnCode as C;
        match p {
            p5::Packet::ConnAck(c) if c.code == C::Success => {
                let props = c.properties.as_ref();
                Ok(Accepted {
                    // 0: the broker wants no keep-alive.
                    keep_alive: props
                        .and_then(|p| p.server_keep_alive)
                        .map(|k| (k > 0).then(|| Duration::from_secs(k.into()))),
                    max_outgoing: props.and_then(|p| p.max_packet_size),
                })
            }
            p5::Packet::ConnAck(c) => Err(Error::Refused {
                code: format!("{:?}", c.code),
                credentials: matches!(
                    c.code,
                    C::BadUserNamePassword | C::NotAuthorized | C::BadAuthenticationMethod
                ),
            }),
            _ => Err(not_connack()),
        }
    }
    fn connected(state: &mut Self::State, connack: Self::Packet) -> Result<(), String> {
        state
            .handle_incoming_packet(connack)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    fn session_present(connack: &Self::Packet) -> bool {
        matches!(connack, p5::Packet::ConnAck(c) if c.session_present)
    }
    fn pubrec(p: &Self::Packet) -> Option<u16> {
        match p {
            p5::Packet::PubRec(r) => Some(r.pkid),
            _ => None,
        }
    }
    fn oversized(r: &Self::Request, max: u32) -> Option<(u16, String, usize)> {
        match r {
            rumqttc::v5::Request::Publish(p) if p.size() > max as usize => Some((
                p.pkid,
                String::from_utf8_lossy(&p.topic).into_owned(),
                p.size(),
            )),
            _ => None,
        }
    }
}

fn not_connack() -> Error {
    Error::Other("the broker answered CONNECT with something other than CONNACK".into())
}

/// Requests to the connection from other tasks (acknowledgements, subscriptions).
pub(crate) struct Requests<W: Wire>(mpsc::Sender<W::Request>);

impl<W: Wire> Clone for Requests<W> {
    fn clone(&self) -> Self {
        Requests(self.0.clone())
    }
}

impl<W: Wire> Requests<W> {
    pub async fn send(&self, request: W::Request) -> Result<(), String> {
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
    /// The broker's limit (MQTT 5: its Maximum Packet Size, from its CONNACK).
    max_outgoing: Option<u32>,
    /// Bytes still to come of an oversized publish, skipped as they arrive.
    skip: usize,
}

impl Net {
    fn encode<W: Wire>(&mut self, packet: &W::Packet) -> Result<(), Error> {
        W::encode(packet, &mut self.write, self.max_outgoing)
            .map_err(|e| Error::Other(format!("encoding an MQTT packet: {e}")))
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
pub(crate) struct Connection<W: Wire> {
    settings: Settings,
    broker: Broker,
    /// The QoS 2 journal: PUBRECs are recorded in it (flushed) before they are answered.
    journal: Option<Outbox>,
    /// rumqttc's protocol state (kept across reconnections, for the session).
    state: W::State,
    /// Requests to send first, in order (what the last connection left unacknowledged, and
    /// what the driver queues).
    pub pending: VecDeque<W::Request>,
    requests: mpsc::Receiver<W::Request>,
    net: Option<Net>,
    /// Packets read but not yet handed to the state: they wait for the journal's flush.
    held: VecDeque<W::Packet>,
    /// What the driver hears of besides the broker's packets: our publishes the broker would
    /// not take, and the broker's that were too large for us.
    notices: VecDeque<Polled<W::Packet>>,
    /// This connection's keep-alive (the broker may set its own in CONNACK); `None`: no pings.
    keep_alive: Option<Duration>,
    ping: Pin<Box<Sleep>>,
}

/// What one turn of the loop saw.
enum Turn<R> {
    Request(Option<R>),
    Read(Result<(), Error>),
    Ping,
}

impl<W: Wire> Connection<W> {
    /// A connection (not yet dialled) keeping `inflight` of our publishes unacknowledged at
    /// most, and the handle that sends it requests (`capacity` queued at most).
    pub fn new(
        settings: Settings,
        broker: Broker,
        journal: Option<Outbox>,
        inflight: u16,
        capacity: usize,
    ) -> (Requests<W>, Connection<W>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let keep_alive = Some(settings.keep_alive);
        (
            Requests(tx),
            Connection {
                settings,
                broker,
                journal,
                state: W::state(inflight),
                pending: VecDeque::new(),
                requests: rx,
                net: None,
                held: VecDeque::new(),
                notices: VecDeque::new(),
                keep_alive,
                ping: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
            },
        )
    }

    /// The next packet from the broker (CONNACK first after each connection), or a publish
    /// the broker would not take. Dials when not connected; on an error the connection is
    /// dropped, and what it left unacknowledged is queued to go again. Cancel-safe.
    pub async fn poll(&mut self) -> Result<Polled<W::Packet>, Error> {
        if let Some(refused) = self.notices.pop_front() {
            return Ok(refused);
        }
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
            if !W::session_present(&connack) {
                self.pending.clear();
            }
            self.net = Some(net);
            self.reset_ping();
            if let Err(e) = W::connected(&mut self.state, connack) {
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
    pub async fn send_publishes(&mut self, publishes: impl IntoIterator<Item = W::Request>) {
        self.pending.extend(publishes);
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
            && let Ok(Some(packet)) = W::outgoing(&mut self.state, W::disconnect())
            && net.encode::<W>(&packet).is_ok()
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
    async fn connect(&mut self) -> Result<(Net, W::Packet), Error> {
        let s = &self.settings;
        let io = self.broker.dial().await.map_err(Error::Other)?;
        let mut net = Net {
            io,
            read: BytesMut::with_capacity(READ_CHUNK),
            write: BytesMut::with_capacity(READ_CHUNK),
            max_outgoing: None,
            skip: 0,
        };
        net.encode::<W>(&W::connect(s))?;
        net.flush().await?;
        let packet = loop {
            if let Some(p) = W::parse(&mut net.read, s.max_packet_bytes).map_err(malformed)? {
                break p;
            }
            net.fill().await?;
        };
        let accepted = W::accepted(&packet, s)?;
        self.keep_alive = accepted.keep_alive.unwrap_or(Some(s.keep_alive));
        net.max_outgoing = accepted.max_outgoing;
        Ok((net, packet))
    }

    /// Drops the connection; what it left unacknowledged goes again (marked DUP) when the
    /// session resumes.
    fn drop_connection(&mut self) {
        self.net = None;
        // Read but not handed on: the broker sends them again (or the session's resend
        // settles them).
        self.held.clear();
        self.pending.extend(W::unacknowledged(&mut self.state));
        // Requests made before the drop go in their order behind those (rumqttc does the same).
        while let Ok(r) = self.requests.try_recv() {
            self.pending.push_back(r);
        }
    }

    /// Encodes what is queued; a publish larger than the broker takes is set aside for the
    /// driver instead (before the session state records it, so it is not sent again).
    fn write_pending(&mut self) -> Result<(), Error> {
        let Some(net) = self.net.as_mut() else {
            return Ok(());
        };
        while let Some(request) = self.pending.pop_front() {
            if let Some(max) = net.max_outgoing
                && let Some((pkid, topic, size)) = W::oversized(&request, max)
            {
                self.notices.push_back(Polled::TooLarge {
                    pkid,
                    topic,
                    size,
                    max,
                });
                continue;
            }
            if let Some(packet) = W::outgoing(&mut self.state, request).map_err(state_error)? {
                net.encode::<W>(&packet)?;
            }
        }
        Ok(())
    }

    /// Hands what was read to the state, once the PUBRECs among it are journalled, and
    /// writes the answers (PUBREL, PUBCOMP) before the packets are handed on. Cancel-safe:
    /// until the journal's flush is done the packets stay held, and the next poll comes back
    /// here.
    async fn take_held(&mut self) -> Result<(), Error> {
        if let Some(journal) = &self.journal {
            let mut marked = false;
            for pkid in self.held.iter().filter_map(W::pubrec) {
                journal
                    .mark_released(pkid)
                    .map_err(|e| Error::Other(format!("journalling a PUBREC: {e}")))?;
                marked = true;
            }
            if marked {
                journal
                    .flush()
                    .await
                    .map_err(|e| Error::Other(format!("flushing the QoS 2 journal: {e}")))?;
            }
        }
        let net = self.net.as_mut().expect("connected");
        while let Some(packet) = self.held.pop_front() {
            if let Some(reply) = W::incoming(&mut self.state, packet).map_err(state_error)? {
                net.encode::<W>(&reply)?;
            }
        }
        net.flush().await
    }

    /// Runs until the broker sends something: writes what is queued and what other tasks ask
    /// for, reads, answers, pings.
    async fn turns(&mut self) -> Result<Polled<W::Packet>, Error> {
        loop {
            if !self.held.is_empty() {
                self.take_held().await?;
            }
            // Our own packets also make events (outgoing); only the broker's are news.
            if let Some(packet) = W::next_event(&mut self.state) {
                return Ok(Polled::Packet(packet));
            }
            // What other tasks asked for goes behind what is queued, all in one write.
            while let Ok(r) = self.requests.try_recv() {
                self.pending.push_back(r);
            }
            self.write_pending()?;
            let net = self.net.as_mut().expect("connected");
            net.flush().await?;
            if let Some(refused) = self.notices.pop_front() {
                return Ok(refused);
            }
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
                    self.cut_packets()?;
                }
                Turn::Ping => {
                    self.reset_ping();
                    // Fails when the last ping is still unanswered: the broker is gone.
                    self.pending.push_back(W::ping());
                }
            }
        }
    }
}

impl<W: Wire> Connection<W> {
    /// Cuts what was read into packets, held for the state. A PUBLISH over
    /// `max_packet_bytes` (MQTT 3.1.1 cannot tell the broker the limit) is cut short instead:
    /// its topic and packet id go to the state, its payload is skipped as it arrives, and the
    /// driver hears of it to refuse it. Failing on it instead, the connection would get it
    /// again after every reconnection, and nothing behind it.
    fn cut_packets(&mut self) -> Result<(), Error> {
        let max = self.settings.max_packet_bytes;
        let net = self.net.as_mut().expect("connected");
        loop {
            if net.skip > 0 {
                let n = net.skip.min(net.read.len());
                net.read.advance(n);
                net.skip -= n;
                if net.skip > 0 {
                    return Ok(());
                }
            }
            let Some((byte1, header, remaining)) = fixed_header(&net.read)? else {
                return Ok(());
            };
            if remaining <= max as usize || byte1 >> 4 != 3 {
                match W::parse(&mut net.read, max).map_err(malformed)? {
                    Some(packet) => {
                        self.held.push_back(packet);
                        continue;
                    }
                    None => return Ok(()),
                }
            }
            // Topic and packet id (a topic is at most 64 KiB: those are buffered).
            let Some(len) = net.read.get(header..header + 2) else {
                return Ok(());
            };
            let qos = (byte1 >> 1) & 3;
            let kept =
                2 + usize::from(u16::from_be_bytes([len[0], len[1]])) + 2 * usize::from(qos > 0);
            if kept > remaining {
                return Err(malformed("a PUBLISH shorter than its topic".into()));
            }
            if net.read.len() < header + kept {
                return Ok(());
            }
            let head = net.read.split_to(header + kept);
            net.skip = remaining - kept;
            let mut cut = BytesMut::with_capacity(header + kept + 1);
            cut.put_u8(byte1);
            put_length(&mut cut, kept + W::NO_PROPERTIES.len());
            cut.extend_from_slice(&head[header..]);
            cut.extend_from_slice(W::NO_PROPERTIES);
            let cut = W::parse(&mut cut, max)
                .map_err(malformed)?
                .ok_or_else(|| malformed("a PUBLISH cut short did not parse".into()))?;
            // Recorded by the state (a QoS 2 PUBREL for it must be known), but not an event.
            W::take_quietly(&mut self.state, cut.clone()).map_err(state_error)?;
            self.notices.push_back(Polled::Oversized {
                cut,
                size: header + remaining,
            });
        }
    }
}

/// The fixed header at the start of `buf`: the first byte, the header's length and the
/// remaining length (`None` until all of it is there).
fn fixed_header(buf: &[u8]) -> Result<Option<(u8, usize, usize)>, Error> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    let mut remaining = 0usize;
    for (i, &b) in buf.iter().skip(1).take(4).enumerate() {
        remaining |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((byte1, i + 2, remaining)));
        }
    }
    if buf.len() >= 5 {
        return Err(malformed("a remaining length longer than 4 bytes".into()));
    }
    Ok(None)
}

/// Appends an MQTT variable byte integer.
fn put_length(out: &mut BytesMut, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if n == 0 {
            return;
        }
    }
}

fn malformed(e: String) -> Error {
    Error::Other(format!("malformed MQTT packet from the broker: {e}"))
}
