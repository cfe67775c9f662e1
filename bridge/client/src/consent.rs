//! Consent: XMTP's allow / deny list, the request queue, and its private sync across this
//! inbox's installations.
//!
//! Records live in the client's tree (`consent/<inbox|conversation>/<id>`) and merge by "latest
//! write wins" (`gatehouse_protocol::consent`). A change is sent, as libxmtp sends it, inside
//! this inbox's device-sync group — an MLS group of its own installations, created when a
//! second installation exists; a newly added installation is sent the whole list. Messages in
//! conversations whose state is `unknown` are held in a bounded request queue (`req/`), oldest
//! dropped first and counted; `allowed` releases them in order (those already shown once as a
//! request, to a person or agent, are not shown again), `denied` discards them and
//! drops every later message without any signal to the sender.

use std::collections::BTreeMap;

use gatehouse_protocol::consent::{self, Entity, Record, State};
use gatehouse_protocol::group;

use crate::{Client, ClientError, Received, Result};

/// Default bound of the request queue (messages, across conversations).
pub const MAX_REQUESTS: usize = 1000;

#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct Held {
    pub(crate) received: Received,
    pub(crate) content: String,
    /// Already shown once as a request: allowing does not show it again.
    #[serde(default)]
    pub(crate) surfaced: bool,
}

pub(crate) fn seq_key(prefix: &[u8], n: u64) -> Vec<u8> {
    [prefix, &n.to_be_bytes()].concat()
}

/// The number at the end of a [`seq_key`].
pub(crate) fn seq_of(key: &[u8]) -> u64 {
    key.len()
        .checked_sub(8)
        .and_then(|at| key[at..].try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

/// How often a full request queue says so in the log: at its first drop, then every this many.
const REQUEST_DROP_LOG_EVERY: u64 = 1000;

impl Client {
    /// A counter kept in the tree (ordering keys of the queues).
    pub(crate) fn next_seq(&self, name: &str) -> Result<u64> {
        let v = self
            .tree
            .update_and_fetch(format!("seq/{name}"), |old| {
                let n = old
                    .and_then(|o| o.try_into().ok())
                    .map(u64::from_be_bytes)
                    .unwrap_or(0);
                Some((n + 1).to_be_bytes().to_vec())
            })?
            .unwrap_or_default();
        Ok(u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])))
    }

    /// The next number of a counter whose use is written in `batch` (the "seen" marks and
    /// retained deliveries of a read): the new value goes into the batch, not into a write of
    /// its own per message. Numbers come from memory after the first; one whose batch was not
    /// written is not handed out again (the counters order keys, gaps do not matter).
    pub(crate) fn next_seq_in(
        &mut self,
        name: &'static str,
        batch: &mut gatehouse_store::Writes,
    ) -> Result<u64> {
        let last = match self.batch_seqs.get(name) {
            Some(n) => *n,
            None => crate::stored_u64(&self.tree, format!("seq/{name}").as_bytes())?,
        };
        let n = last + 1;
        self.batch_seqs.insert(name, n);
        batch.insert(format!("seq/{name}").as_bytes(), &n.to_be_bytes());
        Ok(n)
    }

    /// Every consent record this installation knows.
    pub fn consent_list(&self) -> Result<Vec<Record>> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(b"consent/") {
            let (_, v) = item?;
            if let Ok(r) = serde_json::from_slice::<Record>(&v) {
                out.push(r);
            }
        }
        Ok(out)
    }

    pub(crate) fn consent_record(&self, kind: Entity, entity: &str) -> Result<Option<Record>> {
        Ok(self
            .tree
            .get(format!("consent/{}", consent::key(kind, entity)))?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Merges records under "latest write wins"; returns those that changed the list.
    pub(crate) fn apply_consent(&self, records: Vec<Record>) -> Result<Vec<Record>> {
        let mut changed = Vec::new();
        for r in records {
            let current = self.consent_record(r.kind, &r.entity)?;
            if current.as_ref().is_none_or(|c| r.wins_over(c)) {
                self.tree.insert(
                    format!("consent/{}", r.key()),
                    serde_json::to_vec(&r).unwrap_or_default(),
                )?;
                changed.push(r);
            }
        }
        if !changed.is_empty() {
            self.consent_version
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(changed)
    }

    /// The state recorded for an entity, if any.
    pub fn consent_of(&self, kind: Entity, entity: &str) -> Result<Option<State>> {
        Ok(self.consent_record(kind, entity)?.map(|r| r.state))
    }

    /// Applies policy records (configuration) locally; they reach other installations of this
    /// inbox at the next read.
    pub fn apply_policy(&self, records: Vec<Record>) -> Result<()> {
        self.note_consent(records)
    }

    /// Records a decision made here (now) and sends it to this inbox's other installations.
    pub async fn set_consent(&mut self, kind: Entity, entity: &str, state: State) -> Result<()> {
        self.set_consent_at(kind, entity, state, crate::now_ns() as i64)
            .await
    }

    /// Records a decision with an explicit time (configuration uses its file's time, so a later
    /// CLI decision wins over it and a later config edit wins over that).
    pub async fn set_consent_at(
        &mut self,
        kind: Entity,
        entity: &str,
        state: State,
        at_ns: i64,
    ) -> Result<()> {
        let entity = match kind {
            Entity::InboxId => entity.to_lowercase(),
            Entity::ConversationId => entity.to_ascii_lowercase(),
        };
        self.note_consent(vec![Record {
            kind,
            entity,
            state,
            at_ns,
        }])?;
        self.flush_consent().await?;
        crate::flush_tree(&self.tree).await?;
        Ok(())
    }

    /// Applies records decided here and queues those that changed the list for the device-sync
    /// group (sent by [`Self::flush_consent`], at the latest on the next `sync_all`).
    pub(crate) fn note_consent(&self, records: Vec<Record>) -> Result<()> {
        for r in self.apply_consent(records)? {
            let n = self.next_seq("consent_out")?;
            self.tree.insert(
                seq_key(b"consent_out/", n),
                serde_json::to_vec(&r).unwrap_or_default(),
            )?;
        }
        Ok(())
    }

    /// Sends queued records to this inbox's other installations.
    pub(crate) async fn flush_consent(&mut self) -> Result<()> {
        let mut keys = Vec::new();
        let mut records = Vec::new();
        for item in self.tree.scan_prefix(b"consent_out/") {
            let (k, v) = item?;
            if let Ok(r) = serde_json::from_slice::<Record>(&v) {
                records.push(r);
            }
            keys.push(k);
        }
        if keys.is_empty() {
            return Ok(());
        }
        self.publish_consent(records).await?;
        for k in keys {
            self.tree.remove(k)?;
        }
        Ok(())
    }

    /// The state messages of a conversation get: its own record, else (DMs) the peer's inbox
    /// record, else (groups) the creator's; a conversation this inbox created is allowed.
    pub fn conversation_state(&self, gid: &[u8]) -> Result<State> {
        if let Some(r) = self.consent_record(Entity::ConversationId, &hex::encode(gid))? {
            return Ok(r.state);
        }
        let Some(creator) = self.creator_of(gid)? else {
            return Ok(State::Unknown);
        };
        if creator == self.inbox_id {
            return Ok(State::Allowed);
        }
        let who = self.dm_peer(gid)?.unwrap_or(creator);
        Ok(self
            .consent_record(Entity::InboxId, &who)?
            .map_or(State::Unknown, |r| r.state))
    }

    /// The inbox that created conversation `gid` (`None`: not a conversation of this
    /// installation). A conversation's immutable metadata never changes (a commit that changes
    /// it is refused, here as in libxmtp), so it is read once and kept.
    fn creator_of(&self, gid: &[u8]) -> Result<Option<String>> {
        let cached = self
            .creators
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(gid)
            .cloned();
        if let Some(c) = cached {
            return Ok(Some(c));
        }
        let Some(g) = group::load(&self.provider, gid)? else {
            return Ok(None);
        };
        let creator = group::group_metadata(&g)?.creator_inbox_id;
        let mut creators = self.creators.lock().unwrap_or_else(|p| p.into_inner());
        if creators.len() >= crate::CREATOR_CACHE {
            creators.clear();
        }
        creators.insert(gid.to_vec(), creator.clone());
        Ok(Some(creator))
    }

    /// Sets `max` held messages as the request queue's bound and whether unknown senders are
    /// held (`true`) or dropped like denied ones (`false`).
    pub fn set_request_policy(&mut self, hold_unknown: bool, max: usize) {
        self.hold_unknown = hold_unknown;
        self.max_requests = max.max(1);
    }

    /// Whether a newly held request is also returned once by `sync_all`, marked `request`
    /// (people and agents see who is asking; a bridge keeps requests from its devices).
    pub fn set_surface_requests(&mut self, on: bool) {
        self.surface_requests = on;
    }

    /// Applies consent to freshly read messages: allowed ones pass (after any of the same
    /// conversation released from the queue), unknown ones are queued, denied ones vanish.
    pub(crate) fn gate(&mut self, received: Vec<Received>) -> Result<Vec<Received>> {
        let mut out = self.release_requests()?;
        out.extend(self.gate_only(received)?);
        Ok(out)
    }

    /// The consent decision for each message (without releasing held requests).
    pub(crate) fn gate_only(&mut self, received: Vec<Received>) -> Result<Vec<Received>> {
        let mut out = Vec::new();
        // One state per conversation and one look at each sender's record per read (the list
        // does not change meanwhile).
        let mut states: BTreeMap<String, State> = BTreeMap::new();
        let mut denied: BTreeMap<String, bool> = BTreeMap::new();
        for r in received {
            let sender_denied = match denied.get(&r.sender_inbox) {
                Some(d) => *d,
                None => {
                    let d = self
                        .consent_record(Entity::InboxId, &r.sender_inbox)?
                        .is_some_and(|c| c.state == State::Denied);
                    denied.insert(r.sender_inbox.clone(), d);
                    d
                }
            };
            let state = match states.get(&r.conversation) {
                Some(s) => *s,
                None => {
                    let gid = hex::decode(&r.conversation).unwrap_or_default();
                    let s = self.conversation_state(&gid)?;
                    states.insert(r.conversation.clone(), s);
                    s
                }
            };
            match (sender_denied, state) {
                (true, _) | (false, State::Denied) => {
                    tracing::info!(conversation = %r.conversation, sender = %r.sender_inbox, "dropped a message from a denied sender");
                    self.forget_delivery(&r)?;
                }
                (false, State::Allowed) => out.push(r),
                (false, State::Unknown) if self.hold_unknown => {
                    // Held first, then no longer retained: a crash in between holds it twice
                    // at worst, never loses it.
                    self.hold(
                        Received {
                            delivery: None,
                            ..r.clone()
                        },
                        self.surface_requests,
                    )?;
                    if self.surface_requests {
                        // Shown once as a request: still owed to the reader until it took it
                        // (a `listen --count` that stops first shows it next time), marked as
                        // held so it is not queued twice.
                        let r = Received { request: true, ..r };
                        if let Some(seq) = r.delivery {
                            let held = Held {
                                content: hex::encode(&r.content),
                                received: Received {
                                    content: Vec::new(),
                                    ..r.clone()
                                },
                                surfaced: true,
                            };
                            self.tree.insert(
                                seq_key(b"deliv/", seq),
                                serde_json::to_vec(&held).unwrap_or_default(),
                            )?;
                        }
                        out.push(r);
                    } else {
                        self.forget_delivery(&r)?;
                    }
                }
                (false, State::Unknown) => self.forget_delivery(&r)?,
            }
        }
        Ok(out)
    }

    fn hold(&mut self, r: Received, surfaced: bool) -> Result<()> {
        let n = self.next_seq("req")?;
        let held = Held {
            content: hex::encode(&r.content),
            // The content is kept once, as hex (a byte array in JSON is slow to read back).
            received: Received {
                content: Vec::new(),
                ..r
            },
            surfaced,
        };
        self.tree.insert(
            seq_key(b"req/", n),
            serde_json::to_vec(&held).unwrap_or_default(),
        )?;
        let mut len = match self.held_len {
            Some(l) => l + 1,
            None => self.tree.scan_prefix(b"req/").count(),
        };
        // Bounded: the oldest request goes first, and is counted.
        while len > self.max_requests {
            let Some((k, _)) = self.tree.scan_prefix(b"req/").next().transpose()? else {
                break;
            };
            self.tree.remove(k)?;
            let dropped = self.requests_dropped()? + 1;
            self.tree.insert("req_dropped", &dropped.to_be_bytes())?;
            // Said at the first drop and then once per REQUEST_DROP_LOG_EVERY: a sender that
            // keeps writing would otherwise fill the log with one line per message.
            if dropped == 1 || dropped.is_multiple_of(REQUEST_DROP_LOG_EVERY) {
                tracing::warn!(
                    max = self.max_requests,
                    dropped_so_far = dropped,
                    "request queue full: dropped the oldest held message (said again every {REQUEST_DROP_LOG_EVERY} drops)"
                );
            }
            len -= 1;
        }
        self.held_len = Some(len);
        Ok(())
    }

    /// Messages waiting for a consent decision, oldest first.
    pub fn requests(&self) -> Result<Vec<Received>> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(b"req/") {
            let (_, v) = item?;
            if let Ok(h) = serde_json::from_slice::<Held>(&v) {
                let mut r = h.received;
                r.content = hex::decode(h.content).unwrap_or_default();
                out.push(r);
            }
        }
        Ok(out)
    }

    /// How many held messages the bound has dropped.
    pub fn requests_dropped(&self) -> Result<u64> {
        Ok(self
            .tree
            .get("req_dropped")?
            .map(|v| u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])))
            .unwrap_or(0))
    }

    /// Held messages whose conversation is now allowed, in order (removed from the queue);
    /// those now denied are discarded.
    fn release_requests(&mut self) -> Result<Vec<Received>> {
        let version = self
            .consent_version
            .load(std::sync::atomic::Ordering::Relaxed);
        if version == self.released_version {
            // Nothing decided since the last look: every held message is still waiting.
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let mut states: BTreeMap<String, State> = BTreeMap::new();
        for item in self.tree.scan_prefix(b"req/") {
            let (k, v) = item?;
            let h = match serde_json::from_slice::<Held>(&v) {
                Ok(h) => h,
                Err(e) => {
                    self.set_aside(&k, v, &e)?;
                    continue;
                }
            };
            let conv = h.received.conversation.clone();
            let state = match states.get(&conv) {
                Some(s) => *s,
                None => {
                    let s = self.conversation_state(&hex::decode(&conv).unwrap_or_default())?;
                    states.insert(conv, s);
                    s
                }
            };
            let sender_denied = self
                .consent_record(Entity::InboxId, &h.received.sender_inbox)?
                .is_some_and(|c| c.state == State::Denied);
            match (state, sender_denied) {
                (State::Unknown, false) => {}
                (State::Allowed, false) if !h.surfaced => {
                    let mut r = h.received;
                    r.content = hex::decode(h.content).unwrap_or_default();
                    // Retained as it leaves the request queue (one atomic write).
                    let mut batch = gatehouse_store::Writes::default();
                    self.retain_delivery(&mut r, &mut batch)?;
                    batch.remove(k);
                    batch.apply(&self.tree)?;
                    out.push(r);
                }
                _ => {
                    self.tree.remove(k)?;
                }
            }
        }
        self.held_len = None;
        self.released_version = version;
        Ok(out)
    }

    /// Sends records to every device-sync group of this inbox, creating one if this inbox has
    /// other installations and none exists yet.
    async fn publish_consent(&mut self, records: Vec<Record>) -> Result<()> {
        if self.sync_groups()?.is_empty() {
            // A new sync group is sent the whole list on creation.
            self.ensure_sync_group().await?;
            return Ok(());
        }
        for gid in self.sync_groups()? {
            self.send_to_sync_group(&gid, &records).await?;
        }
        Ok(())
    }

    async fn send_to_sync_group(&mut self, gid: &[u8], records: &[Record]) -> Result<()> {
        let Some(mut g) = group::load(&self.provider, gid)? else {
            return Ok(());
        };
        if !group::is_active(&g) {
            return Ok(());
        }
        self.sync_group_inner(&mut g).await?;
        self.encrypt_and_publish(&mut g, &consent::encode_updates(records), None)
            .await?;
        Ok(())
    }

    /// This inbox's device-sync groups.
    pub(crate) fn sync_groups(&self) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(b"sync/") {
            let (k, _) = item?;
            out.push(k[5..].to_vec());
        }
        Ok(out)
    }

    /// Creates the device-sync group with this inbox's other live installations when there are
    /// any and no group exists, and sends it the whole list.
    pub(crate) async fn ensure_sync_group(&mut self) -> Result<()> {
        if !self.sync_groups()?.is_empty() {
            return Ok(());
        }
        let me = self.inbox_id.clone();
        let (st, seq) = self.inbox_state(&me).await?;
        let mine = self.key.public().to_vec();
        let others: Vec<(String, Vec<u8>)> = st
            .installations()
            .filter(|k| *k != mine.as_slice())
            .map(|k| (me.clone(), k.to_vec()))
            .collect();
        if others.is_empty() {
            return Ok(());
        }
        let (kps, wrappers) = self.usable_key_packages(&others).await?;
        if kps.is_empty() {
            return Ok(());
        }
        let membership: BTreeMap<String, u64> = [(me.clone(), seq)].into();
        let created = group::create_best(
            &self.provider,
            &self.key,
            &me,
            group::Kind::Sync,
            kps,
            &membership,
            &mut rand::rngs::OsRng,
        )?;
        let gid = created.group.group_id().as_slice().to_vec();
        self.announce_created(created, b"", wrappers).await?;
        self.tree.remove([b"conv/".as_slice(), &gid].concat())?;
        self.conversations_gen += 1;
        self.tree
            .insert([b"sync/".as_slice(), &gid].concat(), b"")?;
        tracing::info!(conversation = %hex::encode(&gid), "device-sync group created");
        let all = self.consent_list()?;
        if !all.is_empty() {
            self.send_to_sync_group(&gid, &all).await?;
        }
        Ok(())
    }

    /// Reads the device-sync groups (applying records from our own installations), adds new
    /// installations of this inbox and sends them the whole list.
    pub(crate) async fn sync_consent(&mut self) -> Result<()> {
        let due = self
            .last_sync_group_check
            .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(30));
        if self.sync_groups()?.is_empty() && due {
            self.last_sync_group_check = Some(std::time::Instant::now());
            self.ensure_sync_group().await?;
        }
        for gid in self.sync_groups()? {
            let Some(mut g) = group::load(&self.provider, &gid)? else {
                continue;
            };
            // Application messages here are consent records, applied in handle_message.
            self.sync_group_inner(&mut g).await?;
            let before = group::leaves(&g).len();
            if let Err(e) = self.maintain_membership(&mut g, None).await {
                tracing::warn!(conversation = %hex::encode(&gid), error = %e, "device-sync group membership update failed");
            }
            if group::leaves(&g).len() > before {
                let all = self.consent_list()?;
                if !all.is_empty() {
                    self.send_to_sync_group(&gid, &all).await?;
                }
            }
        }
        self.flush_consent().await
    }

    /// Consent records arrived in a device-sync group from `sender_inbox`.
    pub(crate) fn receive_consent(
        &self,
        gid: &[u8],
        sender_inbox: &str,
        c: &gatehouse_wire::message_contents::EncodedContent,
    ) -> Result<()> {
        if !self
            .tree
            .contains_key([b"sync/".as_slice(), gid].concat())?
        {
            return Ok(());
        }
        if sender_inbox != self.inbox_id {
            tracing::warn!(conversation = %hex::encode(gid), sender = %sender_inbox, "ignored preferences from another inbox in a device-sync group");
            return Ok(());
        }
        let records = consent::decode_updates(c)
            .map_err(|e| ClientError::Peer(format!("bad device-sync message: {e}")))?;
        let changed = self.apply_consent(records)?;
        if !changed.is_empty() {
            tracing::info!(
                records = changed.len(),
                "consent updated from another installation"
            );
        }
        Ok(())
    }
}
