//! Retained deliveries: for a consumer that must not lose a message between reading it and
//! acting on it (the bridge publishing to a device). With [`Client::set_retain_deliveries`],
//! every message a read returns is also kept in the tree (`deliv/SEQ`, written in one batch
//! with the conversation's cursor) until the consumer calls [`Client::delivered`];
//! [`Client::undelivered`] lists what is still owed, re-checked against consent. A message
//! shown as a request stays owed too (marked as already held, so it is not queued twice).

use crate::consent::{Held, seq_key, seq_of};
use crate::{Client, Received, Result};

/// Where message records that cannot be read are kept: `unreadable/` and the record's own
/// key (`deliv/SEQ`, an owed message; `req/SEQ`, one held for a consent decision).
const SET_ASIDE: &[u8] = b"unreadable/";

/// A message record (owed, or held as a request) that could not be read.
#[derive(Debug, Clone)]
pub struct SetAside {
    /// Its key where it was kept (`deliv/SEQ` or `req/SEQ`): what it was.
    pub key: Vec<u8>,
    /// The record as stored.
    pub bytes: Vec<u8>,
    /// Where reading it failed (never its content).
    pub problem: String,
}

impl SetAside {
    /// `owed answer` or `held request`.
    pub fn what(&self) -> &'static str {
        if self.key.starts_with(b"req/") {
            "held request"
        } else {
            "owed answer"
        }
    }

    /// Its key as text: `deliv/SEQ` or `req/SEQ`.
    pub fn name(&self) -> String {
        let (kind, _) = self.key.split_at(self.key.len().saturating_sub(8));
        format!("{}{}", String::from_utf8_lossy(kind), seq_of(&self.key))
    }
}

/// Where a JSON record failed to parse, without quoting it (serde's own message can).
pub fn unreadable(e: &serde_json::Error) -> String {
    let what = match e.classify() {
        serde_json::error::Category::Io => "read error",
        serde_json::error::Category::Syntax => "not JSON",
        serde_json::error::Category::Data => "not the expected record",
        serde_json::error::Category::Eof => "cut short",
    };
    format!("{what} at line {} column {}", e.line(), e.column())
}

impl Client {
    /// Keep every returned message until [`Client::delivered`] (off by default).
    pub fn set_retain_deliveries(&mut self, on: bool) {
        self.retain = on;
    }

    /// Retains `r` (when retention is on) and numbers it; the record goes into `batch`, which
    /// the caller applies together with what makes the message leave its source (a cursor
    /// move, a removal from the request queue), so a crash keeps both or neither.
    pub(crate) fn retain_delivery(
        &mut self,
        r: &mut Received,
        batch: &mut gatehouse_store::Writes,
    ) -> Result<()> {
        if !self.retain {
            return Ok(());
        }
        let seq = self.next_seq_in("deliv", batch)?;
        r.delivery = Some(seq);
        let held = Held {
            content: hex::encode(&r.content),
            received: Received {
                content: Vec::new(),
                ..r.clone()
            },
            surfaced: false,
        };
        batch.insert(
            seq_key(b"deliv/", seq),
            serde_json::to_vec(&held).unwrap_or_default(),
        );
        Ok(())
    }

    /// Drops the retained copy of a message the gate did not deliver.
    pub(crate) fn forget_delivery(&mut self, r: &Received) -> Result<()> {
        if let Some(seq) = r.delivery {
            self.tree.remove(seq_key(b"deliv/", seq))?;
        }
        Ok(())
    }

    /// Retained messages not yet marked delivered, oldest first, each checked against consent
    /// again (a decision taken since may hold or drop it).
    pub fn undelivered(&mut self) -> Result<Vec<Received>> {
        // In order; requests already held (shown once, not yet taken) come back as they were.
        let mut out = Vec::new();
        let mut pending = Vec::new();
        for item in self.tree.scan_prefix(b"deliv/") {
            let (k, v) = item?;
            match serde_json::from_slice::<Held>(&v) {
                Ok(h) => {
                    let mut r = h.received;
                    r.content = hex::decode(h.content).unwrap_or_default();
                    if h.surfaced {
                        out.extend(self.gate_only(std::mem::take(&mut pending))?);
                        let denied = self
                            .consent_record(
                                gatehouse_protocol::consent::Entity::InboxId,
                                &r.sender_inbox,
                            )?
                            .is_some_and(|c| c.state == gatehouse_protocol::consent::State::Denied);
                        if denied {
                            self.forget_delivery(&r)?;
                        } else {
                            out.push(r);
                        }
                    } else {
                        pending.push(r);
                    }
                }
                Err(e) => self.set_aside(&k, v, &e)?,
            }
        }
        out.extend(self.gate_only(pending)?);
        Ok(out)
    }

    /// Moves a message record that cannot be read out of its queue, in one write: kept, not
    /// dropped, for the consumer to report ([`Client::set_aside_records`]).
    pub(crate) fn set_aside(
        &self,
        key: &[u8],
        value: sled::IVec,
        e: &serde_json::Error,
    ) -> Result<()> {
        let what = String::from_utf8_lossy(&key[..key.len().saturating_sub(8)]).into_owned();
        tracing::warn!(
            record = %what,
            number = seq_of(key),
            problem = %unreadable(e),
            "a message record in the store cannot be read: set aside"
        );
        let mut batch = sled::Batch::default();
        batch.remove(key);
        batch.insert([SET_ASIDE, key].concat(), value);
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Message records that could not be read (a damaged disk, a hand edit), set aside by
    /// [`Client::undelivered`] and the release of held requests: what each was, the stored
    /// bytes and where reading failed. They stay until [`Client::forget_set_aside`].
    pub fn set_aside_records(&self) -> Result<Vec<SetAside>> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(SET_ASIDE) {
            let (k, v) = item?;
            let problem = match serde_json::from_slice::<Held>(&v) {
                Ok(_) => "readable again".to_string(),
                Err(e) => unreadable(&e),
            };
            out.push(SetAside {
                key: k[SET_ASIDE.len()..].to_vec(),
                bytes: v.to_vec(),
                problem,
            });
        }
        Ok(out)
    }

    /// Drops a set-aside record once the consumer has kept it elsewhere.
    pub fn forget_set_aside(&self, aside: &SetAside) -> Result<()> {
        self.tree.remove([SET_ASIDE, &aside.key].concat())?;
        Ok(())
    }

    /// Marks a retained message delivered (its `delivery` number): it is no longer owed.
    pub fn delivered(&mut self, delivery: u64) -> Result<()> {
        self.tree.remove(seq_key(b"deliv/", delivery))?;
        Ok(())
    }

    /// Writes retained state to disk (call after marking a batch delivered).
    pub async fn flush(&self) -> Result<()> {
        crate::flush_tree(&self.tree).await?;
        Ok(())
    }
}
