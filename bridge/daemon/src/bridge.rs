//! The bridge runtime: routes, the durable inbound queue, endpoint identities and the way back.
//!
//! Inbound: MQTT publish → route match and size check → durable inbox (sled, flushed) →
//! acknowledge the broker → plugin → endpoint's DM with each agent → remove from the inbox.
//! Outbound: each endpoint reads its conversations → sender must be allowed by the route →
//! plugin → publish on the route's reply topic. Nothing is logged with message content.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use gatehouse_channels::mqtt::{self, Inbound, MqttHandle};
use gatehouse_client::Channel;
use gatehouse_client::Client;
use gatehouse_host::{Action, Host, Limits, Message, Plugin, PluginError};
use gatehouse_protocol::content;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify, mpsc, watch};

use crate::config::{Config, Route};
use crate::identity;

/// Inbound messages buffered between the MQTT driver and the durable write; the driver (and
/// so the broker) waits when it is full.
const INBOUND_CAPACITY: usize = 1024;
/// Inbound messages stored with one flush at most; more wait for the next flush.
const ACCEPT_BATCH: usize = 256;
/// Wait before retrying queued work after a transient failure (node unreachable).
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// A durable inbound record.
#[derive(Serialize, Deserialize)]
struct Queued {
    route: usize,
    device: String,
    topic: String,
    payload: Vec<u8>,
    retain: bool,
    qos: u8,
}

/// What the admin API shows for an endpoint.
#[derive(Clone, Serialize, Deserialize)]
pub struct EndpointInfo {
    /// Route name.
    pub route: String,
    /// Channel kind.
    pub channel: String,
    /// The endpoint's name on its channel (the `{device}`).
    pub device: String,
    /// Its channel address (the topic it publishes on).
    pub address: String,
    /// Its XMTP wallet address.
    pub wallet_address: String,
    /// Its XMTP inbox id.
    pub inbox_id: String,
}

struct Endpoint {
    route: usize,
    device: String,
    client: Mutex<Client>,
    registered: Mutex<bool>,
}

/// Shared bridge state.
pub struct Bridge {
    cfg: Config,
    seed: [u8; 32],
    db: sled::Db,
    inbox: sled::Tree,
    dead: sled::Tree,
    endpoint_index: sled::Tree,
    channel: Channel,
    plugins: BTreeMap<String, Plugin>,
    /// Per-plugin counters and quarantine state (`gatehouse plugins`).
    plugin_stats: std::sync::Mutex<BTreeMap<String, crate::grants::PluginStats>>,
    mqtt: Option<MqttHandle>,
    endpoints: std::sync::Mutex<HashMap<String, Arc<Endpoint>>>,
    resolved: Mutex<HashMap<String, String>>,
    /// The bridge's own XMTP identity: it signs endpoint attestations.
    bridge_identity: Mutex<Client>,
    bridge_key: gatehouse_protocol::identity::InstallationKey,
    bridge_inbox: String,
    bridge_registered: Mutex<bool>,
    work: Notify,
    started: std::time::Instant,
}

fn endpoint_name(route: &Route, device: &str) -> String {
    format!("{}/{}/{}", route.channel, route.name, device)
}

impl Bridge {
    /// Endpoints for the admin API.
    pub fn endpoints(&self) -> Vec<EndpointInfo> {
        self.endpoint_index
            .iter()
            .filter_map(|r| r.ok())
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect()
    }

    /// Status for the admin API.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_secs": self.started.elapsed().as_secs(),
            "bridge_inbox": self.bridge_inbox,
            "endpoints": self.endpoint_index.len(),
            "inbox_depth": self.inbox.len(),
            "dead_letters": self.dead.len(),
            "mqtt": self.mqtt.as_ref().map(|m| format!("{:?}", m.state())),
        })
    }

    fn endpoint(&self, route_idx: usize, device: &str) -> anyhow::Result<Arc<Endpoint>> {
        let route = &self.cfg.routes[route_idx];
        let name = endpoint_name(route, device);
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get(&name) {
            return Ok(e.clone());
        }
        let (wallet, key) = identity::endpoint_keys(&self.seed, &name);
        let tree = self.db.open_tree(format!("ep/{name}"))?;
        let client = Client::open(tree, self.channel.clone(), Some(wallet), Some(key))?;
        let info = EndpointInfo {
            route: route.name.clone(),
            channel: route.channel.clone(),
            device: device.to_string(),
            address: route.subscribe.replace("{device}", device),
            wallet_address: client.address(),
            inbox_id: client.inbox_id().to_string(),
        };
        self.endpoint_index
            .insert(name.as_bytes(), serde_json::to_vec(&info)?)?;
        let e = Arc::new(Endpoint {
            route: route_idx,
            device: device.to_string(),
            client: Mutex::new(client),
            registered: Mutex::new(false),
        });
        map.insert(name, e.clone());
        Ok(e)
    }

    async fn resolve(&self, client: &mut Client, who: &str) -> anyhow::Result<String> {
        if let Some(v) = self.resolved.lock().await.get(who) {
            return Ok(v.clone());
        }
        let inbox = client.resolve(who).await?;
        self.resolved
            .lock()
            .await
            .insert(who.to_string(), inbox.clone());
        Ok(inbox)
    }

    /// Stores a batch of inbound messages durably with one flush, then acknowledges them to the
    /// broker (DESIGN §9: no per-message fsync; nothing acknowledged before it is on disk).
    async fn accept(&self, batch: Vec<Inbound>) -> anyhow::Result<()> {
        let mut stored = Vec::with_capacity(batch.len());
        for msg in batch {
            let Some((idx, route, device)) = self
                .cfg
                .routes
                .iter()
                .enumerate()
                .find_map(|(i, r)| r.device_of(&msg.topic).map(|d| (i, r, d)))
            else {
                tracing::debug!(topic = %msg.topic, "no route for topic");
                self.ack(&msg).await?;
                continue;
            };
            if msg.payload.len() > route.max_payload {
                tracing::warn!(route = %route.name, topic = %msg.topic, bytes = msg.payload.len(), limit = route.max_payload, "rejected: payload over the route's max_payload");
                self.ack(&msg).await?;
                continue;
            }
            let id = self.db.generate_id()?;
            let rec = Queued {
                route: idx,
                device,
                topic: msg.topic.clone(),
                payload: msg.payload.clone(),
                retain: msg.retain,
                qos: msg.qos,
            };
            self.inbox
                .insert(id.to_be_bytes(), serde_json::to_vec(&rec)?)?;
            stored.push(msg);
        }
        if stored.is_empty() {
            return Ok(());
        }
        // Acknowledge only after the durable write.
        self.inbox.flush_async().await?;
        for msg in &stored {
            self.ack(msg).await?;
        }
        self.work.notify_one();
        Ok(())
    }

    async fn ack(&self, msg: &Inbound) -> anyhow::Result<()> {
        if let Some(m) = &self.mqtt {
            m.ack(msg).await.context("acknowledging to the broker")?;
        }
        Ok(())
    }

    /// Calls a route's plugin under its limits and accounts for the outcome.
    async fn run_plugin(
        &self,
        route: &Route,
        msg: Message,
        external: bool,
    ) -> Result<Vec<Action>, PluginOutcome> {
        let name = route.plugin.clone();
        let plugin = self
            .plugins
            .get(&name)
            .cloned()
            .ok_or_else(|| PluginOutcome::Fault(format!("plugin {name} not loaded")))?;
        if self.stats(&name, |s| s.quarantined) {
            return Err(PluginOutcome::Quarantined(name));
        }
        self.stats(&name, |s| s.calls += 1);
        let result = tokio::task::spawn_blocking(move || {
            if external {
                plugin.on_external(&msg)
            } else {
                plugin.on_conversation(&msg)
            }
        })
        .await
        .unwrap_or_else(|e| Err(PluginError::Trap(format!("plugin task failed: {e}"))));
        match result {
            Ok(actions) => match crate::grants::check_limits(&self.cfg.plugins[&name], &actions) {
                Ok(()) => Ok(actions),
                Err(reason) => {
                    self.fault(&name, &reason, actions.len() as u64);
                    Err(PluginOutcome::Fault(reason))
                }
            },
            // The plugin refused the input (e.g. malformed): the message is bad, not the plugin.
            Err(PluginError::Refused { code, message }) => Err(PluginOutcome::Refused(format!(
                "plugin refused: {code}: {message}"
            ))),
            Err(e) => {
                let reason = e.to_string();
                self.fault(&name, &reason, 0);
                Err(PluginOutcome::Fault(reason))
            }
        }
    }

    fn stats<T>(&self, name: &str, f: impl FnOnce(&mut crate::grants::PluginStats) -> T) -> T {
        let mut all = self.plugin_stats.lock().unwrap_or_else(|p| p.into_inner());
        f(all.entry(name.to_string()).or_default())
    }

    /// Counts a fault (and refused actions); quarantines the plugin past its threshold.
    fn fault(&self, name: &str, reason: &str, refused: u64) {
        let cfg = &self.cfg.plugins[name];
        let quarantined = self.stats(name, |s| {
            s.refused_actions += refused;
            s.dead_letters += 1;
            s.fault(reason, cfg, std::time::Instant::now())
        });
        if quarantined {
            tracing::error!(plugin = %name, %reason, "plugin quarantined after repeated faults: its routes hold their messages until restart");
        }
    }

    /// Plugin states for the admin API.
    pub fn plugins(&self) -> serde_json::Value {
        let all = self.plugin_stats.lock().unwrap_or_else(|p| p.into_inner());
        let list: Vec<serde_json::Value> = self
            .cfg
            .plugins
            .iter()
            .map(|(name, p)| {
                let mut v =
                    serde_json::to_value(all.get(name).map(|s| s as &crate::grants::PluginStats))
                        .unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("name".into(), name.clone().into());
                    o.insert("deadline_ms".into(), p.deadline_ms.into());
                    o.insert("memory_mb".into(), p.memory_mb.into());
                    o.insert("max_actions".into(), p.max_actions.into());
                    o.insert(
                        "content_types".into(),
                        p.grants.content_types.clone().into(),
                    );
                }
                v
            })
            .collect();
        serde_json::Value::Array(list)
    }

    /// Processes queued inbound messages in order. Returns false when it should retry later.
    async fn drain(&self) -> bool {
        while let Some(Ok((key, value))) = self.inbox.first().transpose() {
            let id = u64::from_be_bytes(key.as_ref().try_into().unwrap_or([0; 8]));
            let rec: Queued = match serde_json::from_slice(&value) {
                Ok(r) => r,
                Err(e) => {
                    self.dead_letter(&key, &value, &format!("corrupt queue record: {e}"));
                    continue;
                }
            };
            match self.deliver(id, &rec).await {
                Ok(()) => {
                    let _ = self.inbox.remove(&key);
                }
                Err(Failure::Permanent(reason)) => self.dead_letter(&key, &value, &reason),
                Err(Failure::Transient(reason)) => {
                    tracing::warn!(queue_id = id, %reason, "delivery failed; will retry");
                    return false;
                }
                Err(Failure::Held(reason)) => {
                    tracing::debug!(queue_id = id, %reason, "held in the queue");
                    return false;
                }
            }
        }
        true
    }

    /// Keeps a conversation message that could not go out, with the reason (local store only;
    /// nothing of its content is logged).
    fn dead_letter_outbound(&self, r: &gatehouse_client::Received, device: &str, reason: &str) {
        let rec = serde_json::json!({
            "reason": reason,
            "direction": "outbound",
            "device": device,
            "conversation": r.conversation,
            "message_id": r.id,
            "sender_inbox": r.sender_inbox,
            "content_type": r.content_type,
            "content": hex::encode(&r.content),
        });
        if let Ok(id) = self.db.generate_id() {
            let _ = self.dead.insert(
                id.to_be_bytes(),
                serde_json::to_vec(&rec).unwrap_or_default(),
            );
        }
    }

    fn dead_letter(&self, key: &[u8], value: &[u8], reason: &str) {
        let rec = serde_json::json!({ "reason": reason, "record": String::from_utf8_lossy(value) });
        let _ = self
            .dead
            .insert(key, serde_json::to_vec(&rec).unwrap_or_default());
        let _ = self.inbox.remove(key);
    }

    async fn deliver(&self, id: u64, rec: &Queued) -> Result<(), Failure> {
        let route = self
            .cfg
            .routes
            .get(rec.route)
            .ok_or_else(|| Failure::Permanent("route no longer exists".into()))?;
        let idempotency_key = format!("gatehouse-in-{id}");
        let msg = Message {
            payload: rec.payload.clone(),
            content_type: "application/octet-stream".into(),
            metadata: vec![
                ("topic".into(), rec.topic.clone()),
                ("qos".into(), rec.qos.to_string()),
                ("retain".into(), rec.retain.to_string()),
            ],
            endpoint: rec.device.clone(),
            conversation: None,
            sender: Some(rec.device.clone()),
            verified: false,
            idempotency_key: idempotency_key.clone(),
        };
        let actions = match self.run_plugin(route, msg, true).await {
            Ok(a) => a,
            Err(PluginOutcome::Quarantined(name)) => {
                return Err(Failure::Held(format!("plugin {name} is quarantined")));
            }
            Err(PluginOutcome::Refused(reason) | PluginOutcome::Fault(reason)) => {
                tracing::warn!(route = %route.name, device = %rec.device, topic = %rec.topic, error = %reason, "rejected by plugin");
                return Err(Failure::Permanent(reason));
            }
        };
        let endpoint = self
            .endpoint(rec.route, &rec.device)
            .map_err(|e| Failure::Transient(format!("{e:#}")))?;
        for action in actions {
            match action {
                Action::Send(s) => {
                    if let Err(reason) =
                        crate::grants::check_send(&self.cfg.plugins[&route.plugin], &s.content_type)
                    {
                        tracing::warn!(route = %route.name, plugin = %route.plugin, %reason, "refused an action outside the plugin's grants");
                        self.fault(&route.plugin, &reason, 1);
                        return Err(Failure::Permanent(reason));
                    }
                    let t = content::parse_type(&s.content_type)
                        .map_err(|e| Failure::Permanent(format!("plugin sent {e}")))?;
                    let mut c = if s.content_type.starts_with("xmtp.org/text:") {
                        content::text(&String::from_utf8_lossy(&s.payload))
                    } else {
                        content::with_fallback(t, s.payload.clone(), s.fallback.clone())
                    };
                    self.ensure_bridge_registered().await?;
                    let attestation = gatehouse_protocol::attestation::EndpointAttestation {
                        bridge: self.bridge_inbox.clone(),
                        endpoint: endpoint.client.lock().await.inbox_id().to_string(),
                        channel: route.channel.clone(),
                        address: route.subscribe.replace("{device}", &rec.device),
                    };
                    c.parameters.insert(
                        gatehouse_protocol::attestation::PARAMETER.into(),
                        attestation.sign(&self.bridge_key),
                    );
                    let mut client = endpoint.client.lock().await;
                    self.ensure_registered(&endpoint, &mut client).await?;
                    if route.agents.is_empty() {
                        tracing::warn!(route = %route.name, "route has no agents: message not delivered to anyone");
                    }
                    for agent in &route.agents {
                        let inbox = self
                            .resolve(&mut client, agent)
                            .await
                            .map_err(|e| Failure::Transient(format!("resolving {agent}: {e:#}")))?;
                        // External messages go only to peers this endpoint allows.
                        if client
                            .consent_of(gatehouse_protocol::consent::Entity::InboxId, &inbox)
                            .ok()
                            .flatten()
                            == Some(gatehouse_protocol::consent::State::Denied)
                        {
                            tracing::info!(route = %route.name, device = %rec.device, agent = %inbox, "not delivered: the agent is denied for this endpoint");
                            continue;
                        }
                        let gid = client
                            .dm(&inbox)
                            .await
                            .map_err(|e| Failure::Transient(format!("DM with {inbox}: {e}")))?;
                        client
                            .send(&gid, &c, Some(format!("{idempotency_key}-{inbox}")))
                            .await
                            .map_err(|e| Failure::Transient(format!("sending to {inbox}: {e}")))?;
                        tracing::info!(route = %route.name, device = %rec.device, conversation = %hex::encode(&gid), "delivered to conversation");
                    }
                }
                Action::Publish(p) => {
                    tracing::warn!(route = %route.name, address = %p.address, "refused: a publish action in the inbound direction")
                }
                Action::Drop(reason) => {
                    tracing::info!(route = %route.name, device = %rec.device, %reason, "dropped by plugin")
                }
            }
        }
        Ok(())
    }

    async fn ensure_bridge_registered(&self) -> Result<(), Failure> {
        let mut reg = self.bridge_registered.lock().await;
        if !*reg {
            self.bridge_identity
                .lock()
                .await
                .register()
                .await
                .map_err(|e| Failure::Transient(format!("registering the bridge identity: {e}")))?;
            *reg = true;
        }
        Ok(())
    }

    async fn ensure_registered(
        &self,
        endpoint: &Endpoint,
        client: &mut Client,
    ) -> Result<(), Failure> {
        let mut reg = endpoint.registered.lock().await;
        if !*reg {
            client.register().await.map_err(|e| {
                Failure::Transient(format!("registering endpoint {}: {e}", endpoint.device))
            })?;
            self.apply_consent_policy(endpoint, client)
                .await
                .map_err(|e| {
                    Failure::Transient(format!(
                        "applying the consent policy of {}: {e:#}",
                        endpoint.device
                    ))
                })?;
            *reg = true;
        }
        Ok(())
    }

    /// The route's consent policy as records on the endpoint (at the config file's time):
    /// agents and `allow` allowed, `deny` denied; unknown senders held or dropped.
    async fn apply_consent_policy(
        &self,
        endpoint: &Endpoint,
        client: &mut Client,
    ) -> anyhow::Result<()> {
        use gatehouse_protocol::consent::{Entity, Record, State};
        let route = &self.cfg.routes[endpoint.route];
        let policy = &route.consent;
        client.set_surface_requests(false);
        client.set_request_policy(
            policy.default == crate::config::UnknownSenders::Request,
            policy.max_requests,
        );
        let mut records = Vec::new();
        let allowed = route
            .agents
            .iter()
            .chain(route.allow.iter().flatten())
            .chain(&policy.allow);
        for (who, state) in allowed
            .map(|w| (w, State::Allowed))
            .chain(policy.deny.iter().map(|w| (w, State::Denied)))
        {
            records.push(Record {
                kind: Entity::InboxId,
                entity: self.resolve(client, who).await?,
                state,
                at_ns: self.cfg.written_at_ns,
            });
        }
        client.apply_policy(records)?;
        Ok(())
    }

    /// The request queue of each endpoint (or of the one named `device`).
    pub async fn requests(&self, device: Option<&str>) -> serde_json::Value {
        let mut out = Vec::new();
        for ep in self.all_endpoints() {
            if device.is_some_and(|d| d != ep.device) {
                continue;
            }
            let client = ep.client.lock().await;
            let held = client.requests().unwrap_or_default();
            out.push(serde_json::json!({
                "endpoint": ep.device,
                "route": self.cfg.routes[ep.route].name,
                "inbox_id": client.inbox_id(),
                "dropped": client.requests_dropped().unwrap_or(0),
                "requests": held.iter().map(|m| serde_json::json!({
                    "conversation": m.conversation,
                    "sender_inbox": m.sender_inbox,
                    "message_id": m.message_id,
                    "content_type": m.content_type,
                    "bytes": m.content.len(),
                    "sent_at_ns": m.sent_at_ns,
                })).collect::<Vec<_>>(),
            }));
        }
        serde_json::Value::Array(out)
    }

    /// An operator's decision for one endpoint: `target` is an inbox id, 0x address or
    /// conversation id. Held messages of an allowed sender go out at the next poll, in order.
    pub async fn decide(
        &self,
        device: &str,
        target: &str,
        allow: bool,
    ) -> anyhow::Result<serde_json::Value> {
        use gatehouse_protocol::consent::{Entity, State};
        let ep = self
            .all_endpoints()
            .into_iter()
            .find(|e| e.device == device)
            .ok_or_else(|| {
                anyhow::anyhow!("no endpoint named {device:?} (see `gatehouse endpoints`)")
            })?;
        let mut client = ep.client.lock().await;
        self.ensure_registered(&ep, &mut client)
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let is_conversation = hex::decode(target).is_ok_and(|gid| {
            client
                .conversations()
                .is_ok_and(|c| c.iter().any(|(g, _)| *g == gid))
        });
        let (kind, entity) = if is_conversation {
            (Entity::ConversationId, target.to_ascii_lowercase())
        } else {
            (Entity::InboxId, self.resolve(&mut client, target).await?)
        };
        let state = if allow { State::Allowed } else { State::Denied };
        client.set_consent(kind, &entity, state).await?;
        tracing::info!(endpoint = %device, %entity, ?state, "consent decided by the operator");
        drop(client);
        self.work.notify_one();
        Ok(serde_json::json!({"endpoint": device, "entity": entity, "state": state}))
    }

    fn all_endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// One pass of the way back for every endpoint.
    async fn poll_outbound(&self) {
        let endpoints: Vec<Arc<Endpoint>> = self
            .endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for ep in endpoints {
            if let Err(e) = self.poll_endpoint(&ep).await {
                tracing::warn!(device = %ep.device, error = %format!("{e:#}"), "reading conversations failed");
            }
        }
    }

    async fn poll_endpoint(&self, ep: &Endpoint) -> anyhow::Result<()> {
        let route = &self.cfg.routes[ep.route];
        let mut client = ep.client.lock().await;
        if !*ep.registered.lock().await {
            // Endpoints known from before a restart register (and get their policy) here.
            if self.ensure_registered(ep, &mut client).await.is_err() {
                return Ok(());
            }
        }
        // Consent gates what comes back: only allowed senders' messages are returned; unknown
        // senders wait in the endpoint's request queue, denied ones are dropped.
        let received = client.sync_all().await?;
        if received.is_empty() {
            return Ok(());
        }
        drop(client);
        for r in received {
            if r.is_transcript() {
                continue;
            }
            let msg = Message {
                payload: r.content.clone(),
                content_type: r.content_type.clone(),
                metadata: vec![],
                endpoint: ep.device.clone(),
                conversation: Some(r.conversation.clone()),
                sender: Some(r.sender_inbox.clone()),
                verified: true,
                idempotency_key: r.idempotency_key.clone(),
            };
            let actions = match self.run_plugin(route, msg, false).await {
                Ok(a) => a,
                Err(PluginOutcome::Quarantined(name)) => {
                    self.dead_letter_outbound(
                        &r,
                        &ep.device,
                        &format!("plugin {name} is quarantined"),
                    );
                    continue;
                }
                Err(PluginOutcome::Refused(reason) | PluginOutcome::Fault(reason)) => {
                    tracing::warn!(route = %route.name, device = %ep.device, error = %reason, "plugin refused a conversation message");
                    self.dead_letter_outbound(&r, &ep.device, &reason);
                    continue;
                }
            };
            for action in actions {
                match action {
                    Action::Publish(p) => {
                        if let Err(reason) = crate::grants::check_publish(
                            &self.cfg.plugins[&route.plugin],
                            route,
                            &ep.device,
                            &p.channel,
                            &p.address,
                        ) {
                            tracing::warn!(route = %route.name, plugin = %route.plugin, %reason, "refused an action outside the plugin's grants");
                            self.fault(&route.plugin, &reason, 1);
                            self.dead_letter_outbound(&r, &ep.device, &reason);
                            continue;
                        }
                        if let Some(m) = &self.mqtt {
                            m.publish(&p.address, p.payload)
                                .await
                                .context("publishing to MQTT")?;
                            tracing::info!(route = %route.name, device = %ep.device, topic = %p.address, "published reply");
                        }
                    }
                    Action::Send(_) => {
                        tracing::warn!(route = %route.name, "refused: a send action in the outbound direction")
                    }
                    Action::Drop(reason) => {
                        tracing::info!(route = %route.name, device = %ep.device, %reason, "dropped by plugin")
                    }
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
enum Failure {
    Permanent(String),
    Transient(String),
    /// Held back on purpose (a quarantined plugin): stays queued, retried later, no alarm.
    Held(String),
}

/// Why a plugin call produced no actions.
enum PluginOutcome {
    /// The plugin is quarantined; the message stays queued.
    Quarantined(String),
    /// The plugin refused the input (its own error result).
    Refused(String),
    /// A fault: trap, timeout, fuel or memory exhausted, limits broken.
    Fault(String),
}

/// Starts everything and runs until `shutdown` turns true.
pub async fn run(cfg: Config, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data_dir {}", cfg.data_dir.display()))?;
    let seed = identity::load_or_create_seed(&cfg.data_dir.join("seed"))?;

    let node_url = if cfg.node.embedded {
        let store = gatehouse_node::Store::open(&cfg.data_dir.join("node"))
            .context("opening the embedded node's store")?;
        let listener = tokio::net::TcpListener::bind(cfg.node.listen)
            .await
            .with_context(|| format!("node.listen: cannot bind {}", cfg.node.listen))?;
        let url = format!("http://{}", listener.local_addr()?);
        let node = gatehouse_node::Node::new(store);
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = gatehouse_node::serve(listener, node, None, async move {
                let _ = stop.changed().await;
            })
            .await
            {
                tracing::error!(error = %format!("{e:#}"), "embedded node stopped");
            }
        });
        url
    } else {
        cfg.node.url.clone().context("node.url")?
    };
    let channel = gatehouse_client::connect(&node_url)
        .await
        .with_context(|| format!("connecting to the XMTP node at {node_url}"))?;
    tracing::info!(node = %node_url, "using XMTP node");

    let db = sled::Config::new()
        .path(cfg.data_dir.join("bridge"))
        .flush_every_ms(Some(200))
        .open()
        .context("opening the bridge store")?;
    // Compiled plugins are cached beside the other state, so restarts skip compilation.
    let host = Host::new()?.with_cache(cfg.data_dir.join("plugin-cache"));
    let mut plugins = BTreeMap::new();
    for (name, p) in &cfg.plugins {
        let wasm = match (&p.builtin, &p.path) {
            (Some(_), _) => gatehouse_host::MQTT_PLUGIN.to_vec(),
            (None, Some(path)) => std::fs::read(path)
                .with_context(|| format!("plugins.{name}.path: reading {}", path.display()))?,
            (None, None) => anyhow::bail!("plugins.{name}: no builtin or path"),
        };
        let mut config: Vec<(String, String)> = p.config.clone().into_iter().collect();
        // The route's reply template is the plugin's down topic.
        if let Some(r) = cfg.routes.iter().find(|r| &r.plugin == name)
            && !p.config.contains_key("down_topic")
        {
            config.push(("down_topic".into(), r.reply.clone()));
        }
        let limits = Limits {
            deadline: Duration::from_millis(p.deadline_ms),
            memory_bytes: p.memory_mb << 20,
            fuel: p.fuel,
        };
        let kv = std::sync::Arc::new(gatehouse_host::Kv::new(
            db.open_tree(format!("plugin-kv/{name}"))?,
            p.kv_quota_bytes,
        ));
        let plugin = host
            .load_with_kv(name, &wasm, config, limits, Some(kv))
            .with_context(|| format!("loading plugin {name}"))?;
        tracing::info!(plugin = %name, "plugin loaded");
        plugins.insert(name.clone(), plugin);
    }

    let (in_tx, mut in_rx) = mpsc::channel(INBOUND_CAPACITY);
    let mqtt = match &cfg.channels.mqtt {
        Some(m) if !cfg.routes.is_empty() => {
            let filters = cfg.routes.iter().map(Route::filter).collect();
            Some(mqtt::start(m, filters, in_tx, shutdown.clone()))
        }
        _ => None,
    };
    let (bridge_wallet, bridge_key) = identity::endpoint_keys(&seed, "gatehouse/bridge");
    let bridge_identity = Client::open(
        db.open_tree("bridge-identity")?,
        channel.clone(),
        Some(bridge_wallet),
        Some(bridge_key.clone()),
    )?;
    let bridge_inbox = bridge_identity.inbox_id().to_string();
    tracing::info!(bridge = %bridge_inbox, "bridge identity (signs endpoint attestations)");
    let bridge = Arc::new(Bridge {
        bridge_identity: Mutex::new(bridge_identity),
        bridge_key,
        bridge_inbox,
        bridge_registered: Mutex::new(false),
        seed,
        inbox: db.open_tree("inbox")?,
        dead: db.open_tree("dead_letters")?,
        endpoint_index: db.open_tree("endpoints")?,
        db,
        channel,
        plugin_stats: std::sync::Mutex::new(
            plugins
                .keys()
                .map(|k| (k.clone(), Default::default()))
                .collect(),
        ),
        plugins,
        mqtt,
        endpoints: Default::default(),
        resolved: Default::default(),
        work: Notify::new(),
        started: std::time::Instant::now(),
        cfg,
    });
    // Endpoints known from earlier runs resume reading their conversations at once.
    for info in bridge.endpoints() {
        if let Some(idx) = bridge.cfg.routes.iter().position(|r| r.name == info.route) {
            // Registered (and given its consent policy) by its first poll.
            bridge.endpoint(idx, &info.device)?;
        }
    }

    let admin = tokio::net::TcpListener::bind(bridge.cfg.admin.listen)
        .await
        .with_context(|| format!("admin.listen: cannot bind {}", bridge.cfg.admin.listen))?;
    tokio::spawn(crate::admin::serve(admin, bridge.clone(), shutdown.clone()));

    let b = bridge.clone();
    let mut stop = shutdown.clone();
    let accept = tokio::spawn(async move {
        loop {
            let first = tokio::select! { _ = stop.changed() => return, m = in_rx.recv() => match m { Some(m) => m, None => return } };
            // Whatever else is already waiting joins the same flush.
            let mut batch = vec![first];
            while batch.len() < ACCEPT_BATCH {
                match in_rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            if let Err(e) = b.accept(batch).await {
                // Not acknowledged: the broker redelivers after reconnecting.
                tracing::error!(error = %format!("{e:#}"), "could not store an inbound message");
            }
        }
    });
    let b = bridge.clone();
    let mut stop = shutdown.clone();
    let worker = tokio::spawn(async move {
        loop {
            let done = b.drain().await;
            let wait = if done {
                Duration::from_secs(3600)
            } else {
                RETRY_DELAY
            };
            tokio::select! { _ = stop.changed() => return, _ = b.work.notified() => {}, _ = tokio::time::sleep(wait) => {} }
        }
    });
    let b = bridge.clone();
    let mut stop = shutdown.clone();
    let poll = Duration::from_millis(b.cfg.poll_interval_ms.max(20));
    let outbound = tokio::spawn(async move {
        loop {
            b.poll_outbound().await;
            tokio::select! { _ = stop.changed() => return, _ = tokio::time::sleep(poll) => {} }
        }
    });
    tracing::info!(admin = %bridge.cfg.admin.listen, routes = bridge.cfg.routes.len(), "gatehouse running");
    let _ = shutdown.changed().await;
    let _ = tokio::join!(accept, worker, outbound);
    bridge.db.flush_async().await?;
    tracing::info!("gatehouse stopped");
    Ok(())
}
