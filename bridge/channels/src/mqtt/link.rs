//! One broker connection in either protocol version behind one face, so the driver's logic
//! (windows, journal, acknowledgements) exists once: rumqttc's protocol state and packets for
//! the version, with our own I/O ([`super::conn`]).

use std::collections::HashSet;

use rumqttc::v5;
use rumqttc::v5::mqttbytes::v5 as p5;
use serde::{Deserialize, Serialize};

use super::conn::{self, Polled, V4, V5};
use super::outbox::Outbox;
use super::{MqttConfig, Protocol};

/// MQTT 5 publish properties the bridge carries (empty under MQTT 3.1.1).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Properties {
    /// `Content Type`: the payload's MIME type, as the publisher declared it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// `Response Topic`: where the publisher wants the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_topic: Option<String>,
    /// `Correlation Data`: goes back unchanged with the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_data: Option<Vec<u8>>,
    /// `User Property` pairs, in order (names may repeat).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_properties: Vec<(String, String)>,
    /// `Message Expiry Interval`, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_expiry_secs: Option<u32>,
}

impl Properties {
    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }

    fn from_v5(p: Option<&p5::PublishProperties>) -> Option<Properties> {
        let p = p?;
        let out = Properties {
            content_type: p.content_type.clone(),
            response_topic: p.response_topic.clone(),
            correlation_data: p.correlation_data.as_ref().map(|b| b.to_vec()),
            user_properties: p.user_properties.clone(),
            message_expiry_secs: p.message_expiry_interval,
        };
        (!out.is_empty()).then_some(out)
    }

    fn to_v5(&self) -> p5::PublishProperties {
        p5::PublishProperties {
            content_type: self.content_type.clone(),
            response_topic: self.response_topic.clone(),
            correlation_data: self.correlation_data.clone().map(Into::into),
            user_properties: self.user_properties.clone(),
            message_expiry_interval: self.message_expiry_secs,
            ..Default::default()
        }
    }
}

/// A publish as the driver keeps it (in flight, journalled, sent again).
#[derive(Clone, Debug)]
pub(crate) struct OutPublish {
    pub pkid: u16,
    pub qos: u8,
    pub dup: bool,
    pub topic: String,
    pub payload: Vec<u8>,
    pub props: Option<Properties>,
}

/// A publish received from the broker, kept for its acknowledgement.
#[derive(Clone, Debug)]
pub(crate) enum RawPublish {
    V4(rumqttc::Publish),
    V5(p5::Publish),
}

impl RawPublish {
    pub fn pkid(&self) -> u16 {
        match self {
            RawPublish::V4(p) => p.pkid,
            RawPublish::V5(p) => p.pkid,
        }
    }
    pub fn qos(&self) -> u8 {
        match self {
            RawPublish::V4(p) => p.qos as u8,
            RawPublish::V5(p) => p.qos as u8,
        }
    }
}

/// What the connection reported.
// Most events are publishes: boxing the large variant would cost an allocation each.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Ev {
    ConnAck {
        session_present: bool,
        /// MQTT 5: how many unacknowledged publishes the broker takes from us.
        receive_max: Option<u16>,
    },
    PubAck {
        pkid: u16,
        /// MQTT 5: the broker refused the publish (reason code and string).
        refused: Option<String>,
    },
    PubRec {
        pkid: u16,
        refused: Option<String>,
    },
    PubComp(u16),
    /// One of our publishes is larger than the broker takes (its Maximum Packet Size under
    /// MQTT 5, our `max_packet_bytes` under 3.1.1): it was not sent.
    TooLarge {
        pkid: u16,
        topic: String,
        size: usize,
        max: u32,
    },
    /// A publish from the broker over our `max_packet_bytes`: its payload was skipped; `raw`
    /// (without payload) is for its refusal.
    Oversized {
        topic: String,
        size: usize,
        raw: RawPublish,
    },
    /// The broker confirmed a subscription.
    SubAck,
    Publish {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
        dup: bool,
        props: Option<Properties>,
        raw: RawPublish,
    },
    Other,
}

/// A connection failure: `refused` when the broker refused the credentials.
pub(crate) struct LinkError {
    pub refused: bool,
    pub message: String,
}

impl From<conn::Error> for LinkError {
    fn from(e: conn::Error) -> LinkError {
        LinkError {
            refused: matches!(
                e,
                conn::Error::Refused {
                    credentials: true,
                    ..
                }
            ),
            message: e.message(),
        }
    }
}

/// Sends requests to the connection (cloneable).
#[derive(Clone)]
pub(crate) enum Client {
    V4(conn::Requests<V4>),
    V5(conn::Requests<V5>),
}

/// The connection itself (polled by the driver task only).
pub(crate) enum Events {
    V4(Box<conn::Connection<V4>>),
    V5(Box<conn::Connection<V5>>),
}

/// Builds the connection for `config` (protocol, session, credentials, limits) and the
/// client that sends it requests; with a `journal`, PUBRECs are journalled before they are
/// answered (QoS 2 across crashes). `inflight` is our publish window (rumqttc's too, so the
/// packet ids we choose are always valid). Fails only on a TLS server name that cannot be one.
pub(crate) fn open(
    config: &MqttConfig,
    tls: Option<(std::sync::Arc<tokio_rustls::rustls::ClientConfig>, String)>,
    journal: Option<Outbox>,
    inflight: u16,
    capacity: usize,
) -> std::io::Result<(Client, Events)> {
    let broker = super::dial::Broker::new(format!("{}:{}", config.host, config.port), tls)?;
    let settings = conn::Settings {
        client_id: config.client_id.clone(),
        keep_alive: std::time::Duration::from_secs(config.keep_alive_secs.max(5)),
        clean_start: config.clean_session,
        // The broker keeps the session (subscriptions, queued messages) this long after we
        // disconnect; without it the session ends with the connection.
        session_expiry_secs: (!config.clean_session).then_some(config.session_expiry_secs),
        // Announced to the broker (MQTT 5), which then never sends us a larger packet.
        max_packet_bytes: config.max_packet_bytes.min(u32::MAX as usize) as u32,
        login: config.username.clone().zip(config.password.clone()),
    };
    Ok(match config.protocol {
        Protocol::V311 => {
            let (c, e) = conn::Connection::new(settings, broker, journal, inflight, capacity);
            (Client::V4(c), Events::V4(Box::new(e)))
        }
        Protocol::V5 => {
            let (c, e) = conn::Connection::new(settings, broker, journal, inflight, capacity);
            (Client::V5(c), Events::V5(Box::new(e)))
        }
    })
}

/// An MQTT 5 PUBLISH under the driver's own packet id.
fn v5_publish(p: &OutPublish) -> p5::Publish {
    let mut out = p5::Publish::new(
        &p.topic,
        qos5(p.qos),
        p.payload.clone(),
        p.props.as_ref().map(Properties::to_v5),
    );
    out.pkid = p.pkid;
    out.dup = p.dup;
    out
}

/// An MQTT 3.1.1 PUBLISH under the driver's own packet id.
fn v4_publish(p: &OutPublish) -> rumqttc::Publish {
    let mut out = rumqttc::Publish::new(&p.topic, qos4(p.qos), p.payload.clone());
    out.pkid = p.pkid;
    out.dup = p.dup;
    out
}

fn qos4(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        2 => rumqttc::QoS::ExactlyOnce,
        _ => rumqttc::QoS::AtLeastOnce,
    }
}

fn qos5(q: u8) -> v5::mqttbytes::QoS {
    match q {
        0 => v5::mqttbytes::QoS::AtMostOnce,
        2 => v5::mqttbytes::QoS::ExactlyOnce,
        _ => v5::mqttbytes::QoS::AtLeastOnce,
    }
}

/// The driver's event for a publish from the broker cut short as too large.
fn oversized(raw: RawPublish, size: usize) -> Ev {
    let topic = match &raw {
        RawPublish::V4(p) => p.topic.clone(),
        RawPublish::V5(p) => String::from_utf8_lossy(&p.topic).into_owned(),
    };
    Ev::Oversized { topic, size, raw }
}

/// The driver's event for a publish of ours the connection set aside as too large.
fn too_large<P>(p: Polled<P>) -> Ev {
    match p {
        Polled::TooLarge {
            pkid,
            topic,
            size,
            max,
        } => Ev::TooLarge {
            pkid,
            topic,
            size,
            max,
        },
        Polled::Packet(_) | Polled::Oversized { .. } => Ev::Other,
    }
}

fn reason_text(code: impl std::fmt::Debug, string: Option<&String>) -> String {
    match string {
        Some(s) => format!("{code:?}: {s}"),
        None => format!("{code:?}"),
    }
}

impl Client {
    /// Acknowledges a received publish (PUBACK / PUBREC).
    pub async fn ack(&self, raw: &RawPublish) -> Result<(), String> {
        match (self, raw) {
            (Client::V4(c), RawPublish::V4(p)) => match p.qos {
                rumqttc::QoS::AtMostOnce => Ok(()),
                rumqttc::QoS::AtLeastOnce => {
                    c.send(rumqttc::Request::PubAck(rumqttc::PubAck::new(p.pkid)))
                        .await
                }
                rumqttc::QoS::ExactlyOnce => {
                    c.send(rumqttc::Request::PubRec(rumqttc::PubRec::new(p.pkid)))
                        .await
                }
            },
            (Client::V5(c), RawPublish::V5(p)) => match p.qos {
                v5::mqttbytes::QoS::AtMostOnce => Ok(()),
                v5::mqttbytes::QoS::AtLeastOnce => {
                    c.send(v5::Request::PubAck(p5::PubAck::new(p.pkid, None)))
                        .await
                }
                v5::mqttbytes::QoS::ExactlyOnce => {
                    c.send(v5::Request::PubRec(p5::PubRec::new(p.pkid, None)))
                        .await
                }
            },
            _ => Err("acknowledgement for the other protocol version".into()),
        }
    }

    /// Subscribes. Under MQTT 5 the subscription is `No Local` (the broker does not send our
    /// own publishes back), except shared ones, where the protocol forbids it.
    pub async fn subscribe(&self, filter: &str, qos: u8) -> Result<(), String> {
        match self {
            Client::V4(c) => {
                c.send(rumqttc::Request::Subscribe(rumqttc::Subscribe::new(
                    filter,
                    qos4(qos),
                )))
                .await
            }
            Client::V5(c) => {
                let mut f = p5::Filter::new(filter, qos5(qos));
                f.nolocal = !filter.starts_with("$share/");
                c.send(v5::Request::Subscribe(p5::Subscribe::new(f, None)))
                    .await
            }
        }
    }

    pub async fn unsubscribe(&self, filter: &str) -> Result<(), String> {
        match self {
            Client::V4(c) => {
                c.send(rumqttc::Request::Unsubscribe(rumqttc::Unsubscribe::new(
                    filter,
                )))
                .await
            }
            Client::V5(c) => {
                c.send(v5::Request::Unsubscribe(p5::Unsubscribe::new(filter, None)))
                    .await
            }
        }
    }
}

impl Events {
    /// The next event; reconnects after an error when polled again.
    pub async fn poll(&mut self) -> Result<Ev, LinkError> {
        match self {
            Events::V4(e) => {
                use rumqttc::Packet;
                let p = match e.poll().await? {
                    Polled::Packet(p) => p,
                    Polled::Oversized {
                        cut: Packet::Publish(p),
                        size,
                    } => return Ok(oversized(RawPublish::V4(p), size)),
                    refused => return Ok(too_large(refused)),
                };
                match p {
                    Packet::ConnAck(c) => Ok(Ev::ConnAck {
                        session_present: c.session_present,
                        receive_max: None,
                    }),
                    Packet::PubAck(a) => Ok(Ev::PubAck {
                        pkid: a.pkid,
                        refused: None,
                    }),
                    Packet::PubRec(r) => Ok(Ev::PubRec {
                        pkid: r.pkid,
                        refused: None,
                    }),
                    Packet::PubComp(c) => Ok(Ev::PubComp(c.pkid)),
                    Packet::SubAck(_) => Ok(Ev::SubAck),
                    Packet::Publish(p) => Ok(Ev::Publish {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        retain: p.retain,
                        dup: p.dup,
                        props: None,
                        raw: RawPublish::V4(p),
                    }),
                    _ => Ok(Ev::Other),
                }
            }
            Events::V5(e) => {
                use p5::{Packet, PubAckReason, PubRecReason};
                let p = match e.poll().await? {
                    Polled::Packet(p) => p,
                    Polled::Oversized {
                        cut: Packet::Publish(p),
                        size,
                    } => return Ok(oversized(RawPublish::V5(p), size)),
                    refused => return Ok(too_large(refused)),
                };
                match p {
                    Packet::ConnAck(c) => Ok(Ev::ConnAck {
                        session_present: c.session_present,
                        receive_max: c.properties.as_ref().and_then(|p| p.receive_max),
                    }),
                    Packet::PubAck(a) => Ok(Ev::PubAck {
                        pkid: a.pkid,
                        refused: (!matches!(
                            a.reason,
                            PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                        ))
                        .then(|| {
                            reason_text(
                                a.reason,
                                a.properties.as_ref().and_then(|p| p.reason_string.as_ref()),
                            )
                        }),
                    }),
                    Packet::PubRec(r) => Ok(Ev::PubRec {
                        pkid: r.pkid,
                        refused: (!matches!(
                            r.reason,
                            PubRecReason::Success | PubRecReason::NoMatchingSubscribers
                        ))
                        .then(|| {
                            reason_text(
                                r.reason,
                                r.properties.as_ref().and_then(|p| p.reason_string.as_ref()),
                            )
                        }),
                    }),
                    Packet::PubComp(c) => Ok(Ev::PubComp(c.pkid)),
                    Packet::SubAck(_) => Ok(Ev::SubAck),
                    Packet::Publish(p) => Ok(Ev::Publish {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload.to_vec(),
                        retain: p.retain,
                        dup: p.dup,
                        props: Properties::from_v5(p.properties.as_ref()),
                        raw: RawPublish::V5(p),
                    }),
                    _ => Ok(Ev::Other),
                }
            }
        }
    }

    /// Packet ids of the publishes and releases already queued for sending.
    pub fn queued_ids(&self) -> HashSet<u16> {
        match self {
            Events::V4(e) => e
                .pending
                .iter()
                .filter_map(|r| match r {
                    rumqttc::Request::Publish(p) => Some(p.pkid),
                    rumqttc::Request::PubRel(r) => Some(r.pkid),
                    _ => None,
                })
                .collect(),
            Events::V5(e) => e
                .pending
                .iter()
                .filter_map(|r| match r {
                    v5::Request::Publish(p) => Some(p.pkid),
                    v5::Request::PubRel(r) => Some(r.pkid),
                    _ => None,
                })
                .collect(),
        }
    }

    /// Queues a publish (under its own packet id).
    pub fn push_publish(&mut self, p: &OutPublish) {
        match self {
            Events::V4(e) => e
                .pending
                .push_back(rumqttc::Request::Publish(v4_publish(p))),
            Events::V5(e) => e.pending.push_back(v5::Request::Publish(v5_publish(p))),
        }
    }

    /// Ends the connection with a DISCONNECT (at shutdown), if it is up: the broker then
    /// knows we left on purpose.
    pub async fn close(&mut self) {
        match self {
            Events::V4(e) => e.close().await,
            Events::V5(e) => e.close().await,
        }
    }

    /// Sends new publishes (each under its own packet id) now, behind anything queued, in one
    /// write when connected; queued like [`Events::push_publish`] otherwise. They go through
    /// rumqttc's session state as a queued request would (kept for a resend until
    /// acknowledged), so a write that fails is sent again after the reconnect.
    pub async fn send_publishes(&mut self, ps: &[OutPublish]) {
        match self {
            Events::V4(e) => {
                e.send_publishes(ps.iter().map(|p| rumqttc::Request::Publish(v4_publish(p))))
                    .await
            }
            Events::V5(e) => {
                e.send_publishes(ps.iter().map(|p| v5::Request::Publish(v5_publish(p))))
                    .await
            }
        }
    }

    /// Queues the PUBREL of a QoS 2 exchange the broker already received.
    pub fn push_pubrel(&mut self, pkid: u16) {
        match self {
            Events::V4(e) => e
                .pending
                .push_back(rumqttc::Request::PubRel(rumqttc::PubRel::new(pkid))),
            Events::V5(e) => e
                .pending
                .push_back(v5::Request::PubRel(p5::PubRel::new(pkid, None))),
        }
    }

    /// Acknowledges a received publish with a refusal: MQTT 5 says why in the reason code
    /// (`Quota exceeded`, for a payload over the limit) and reason string; MQTT 3.1.1 cannot,
    /// so that is a plain acknowledgement.
    pub fn push_refusal(&mut self, raw: &RawPublish, reason: &str) {
        match (self, raw) {
            (Events::V5(e), RawPublish::V5(p)) => {
                let reason_string = Some(reason.to_string());
                match p.qos {
                    v5::mqttbytes::QoS::AtMostOnce => {}
                    v5::mqttbytes::QoS::AtLeastOnce => {
                        e.pending.push_back(v5::Request::PubAck(p5::PubAck {
                            pkid: p.pkid,
                            reason: p5::PubAckReason::QuotaExceeded,
                            properties: Some(p5::PubAckProperties {
                                reason_string,
                                user_properties: Vec::new(),
                            }),
                        }))
                    }
                    v5::mqttbytes::QoS::ExactlyOnce => {
                        e.pending.push_back(v5::Request::PubRec(p5::PubRec {
                            pkid: p.pkid,
                            reason: p5::PubRecReason::QuotaExceeded,
                            properties: Some(p5::PubRecProperties {
                                reason_string,
                                user_properties: Vec::new(),
                            }),
                        }))
                    }
                }
            }
            (Events::V4(e), RawPublish::V4(p)) => match p.qos {
                rumqttc::QoS::AtMostOnce => {}
                rumqttc::QoS::AtLeastOnce => e
                    .pending
                    .push_back(rumqttc::Request::PubAck(rumqttc::PubAck::new(p.pkid))),
                rumqttc::QoS::ExactlyOnce => e
                    .pending
                    .push_back(rumqttc::Request::PubRec(rumqttc::PubRec::new(p.pkid))),
            },
            _ => {}
        }
    }
}
