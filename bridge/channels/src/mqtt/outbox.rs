//! Exactly-once publishing (QoS 2) that survives a crash of the daemon.
//!
//! QoS 2 is exactly-once only if both ends remember where each exchange stands. The broker
//! keeps its half in the persistent session; this is ours:
//!
//! - a publish is journalled (with the packet id it will carry) and flushed before it leaves,
//!   and sent again with that id after a restart: the broker, still holding the id, answers
//!   PUBREC instead of delivering it twice;
//! - once the broker's PUBREC arrives the exchange may only continue with PUBREL (a PUBLISH
//!   under the same id after the broker released it would be a new message). The connection
//!   journals each PUBREC (flushed) before it answers it (`conn::Connection`). After a
//!   restart those entries are finished with PUBREL alone;
//! - PUBCOMP ends the exchange: the entry is removed and the message's key is remembered as
//!   done, so a caller that publishes it again after a crash (it had not yet recorded the
//!   acknowledgement) is answered at once instead of delivering it twice.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Done markers kept (keys of completed publishes); the oldest half goes beyond twice this.
const DONE_KEPT: usize = 100_000;

/// The idempotency key of one outbound publish (the caller derives it from the message).
pub type PublishKey = [u8; 32];

/// One journalled publish.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub seq: u64,
    pub pkid: u16,
    pub released: bool,
    pub key: PublishKey,
    pub topic: String,
    pub payload: Vec<u8>,
    /// MQTT 5 properties (kept beside the entry, under `q` + packet id).
    pub props: Option<super::Properties>,
}

fn entry_key(pkid: u16) -> [u8; 3] {
    let b = pkid.to_be_bytes();
    [b'p', b[0], b[1]]
}

fn props_key(pkid: u16) -> [u8; 3] {
    let b = pkid.to_be_bytes();
    [b'q', b[0], b[1]]
}

fn done_key(key: &PublishKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(b'd');
    k.extend_from_slice(key);
    k
}

impl Entry {
    fn encode(&self) -> Vec<u8> {
        let topic = self.topic.as_bytes();
        let mut v = Vec::with_capacity(8 + 1 + 32 + 2 + topic.len() + self.payload.len());
        v.extend_from_slice(&self.seq.to_be_bytes());
        v.push(self.released as u8);
        v.extend_from_slice(&self.key);
        v.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        v.extend_from_slice(topic);
        v.extend_from_slice(&self.payload);
        v
    }

    fn decode(pkid: u16, v: &[u8]) -> Option<Entry> {
        let seq = u64::from_be_bytes(v.get(0..8)?.try_into().ok()?);
        let released = *v.get(8)? != 0;
        let key: PublishKey = v.get(9..41)?.try_into().ok()?;
        let tlen = u16::from_be_bytes(v.get(41..43)?.try_into().ok()?) as usize;
        let topic = String::from_utf8(v.get(43..43 + tlen)?.to_vec()).ok()?;
        let payload = v.get(43 + tlen..)?.to_vec();
        Some(Entry {
            seq,
            pkid,
            released,
            key,
            topic,
            payload,
            props: None,
        })
    }
}

/// The QoS 2 journal, in its sled tree.
#[derive(Clone)]
pub struct Outbox {
    tree: sled::Tree,
    done: Arc<Mutex<VecDeque<PublishKey>>>,
}

impl Outbox {
    /// Opens the journal kept in `tree`.
    pub fn open(tree: sled::Tree) -> Outbox {
        let mut done: Vec<(u64, PublishKey)> = tree
            .scan_prefix(b"d")
            .filter_map(|kv| kv.ok())
            .filter_map(|(k, v)| {
                let key: PublishKey = k.get(1..33)?.try_into().ok()?;
                Some((u64::from_be_bytes(v.as_ref().try_into().ok()?), key))
            })
            .collect();
        done.sort();
        Outbox {
            tree,
            done: Arc::new(Mutex::new(done.into_iter().map(|(_, k)| k).collect())),
        }
    }

    /// The highest sequence number given out so far (new publishes continue after it).
    pub(crate) fn last_seq(&self) -> u64 {
        let pending = self.pending().last().map_or(0, |e| e.seq);
        let done = self
            .done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .back()
            .and_then(|k| self.tree.get(done_key(k)).ok().flatten())
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0);
        pending.max(done)
    }

    /// Journalled publishes not yet completed, oldest first.
    pub(crate) fn pending(&self) -> Vec<Entry> {
        let mut out: Vec<Entry> = self
            .tree
            .scan_prefix(b"p")
            .filter_map(|kv| kv.ok())
            .filter_map(|(k, v)| {
                let pkid = u16::from_be_bytes(k.get(1..3)?.try_into().ok()?);
                let mut e = Entry::decode(pkid, &v)?;
                e.props = self
                    .tree
                    .get(props_key(pkid))
                    .ok()
                    .flatten()
                    .and_then(|v| serde_json::from_slice(&v).ok());
                Some(e)
            })
            .collect();
        out.sort_by_key(|e| e.seq);
        out
    }

    pub(crate) fn is_done(&self, key: &PublishKey) -> bool {
        matches!(self.tree.contains_key(done_key(key)), Ok(true))
    }

    /// Records a publish about to be sent (durable after [`Outbox::flush`]).
    pub(crate) fn record(&self, e: &Entry) -> sled::Result<()> {
        self.record_all(std::slice::from_ref(e))
    }

    /// Records publishes about to be sent, in one write (durable after [`Outbox::flush`]).
    /// One write for a batch rather than one per publish: each of sled's batch writes
    /// seals its log buffer and hands it to its I/O threads, a disk write of its own.
    pub(crate) fn record_all(&self, entries: &[Entry]) -> sled::Result<()> {
        let mut batch = sled::Batch::default();
        for e in entries {
            batch.insert(&entry_key(e.pkid)[..], e.encode());
            match &e.props {
                Some(p) => batch.insert(
                    &props_key(e.pkid)[..],
                    serde_json::to_vec(p).unwrap_or_default(),
                ),
                None => batch.remove(&props_key(e.pkid)[..]),
            }
        }
        self.tree.apply_batch(batch)
    }

    /// PUBCOMPs: these exchanges are over and their keys are done. One write for all of
    /// them (see [`Outbox::record_all`]).
    pub(crate) fn complete_all(&self, entries: &[Entry]) -> sled::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        // One write: a crash must not keep the removal without the done mark (the daemon
        // would then publish the message again as new).
        let mut batch = sled::Batch::default();
        for e in entries {
            batch.insert(&done_key(&e.key)[..], &e.seq.to_be_bytes());
            batch.remove(&entry_key(e.pkid)[..]);
            batch.remove(&props_key(e.pkid)[..]);
        }
        self.tree.apply_batch(batch)?;
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        done.extend(entries.iter().map(|e| e.key));
        if done.len() > 2 * DONE_KEPT {
            for old in done.drain(..DONE_KEPT) {
                self.tree.remove(done_key(&old))?;
            }
        }
        Ok(())
    }

    /// Removes the publish with this packet id without marking its key done (the broker
    /// refused it: publishing the key again sends it again).
    pub(crate) fn forget(&self, pkid: u16) -> sled::Result<()> {
        let mut batch = sled::Batch::default();
        batch.remove(&entry_key(pkid)[..]);
        batch.remove(&props_key(pkid)[..]);
        self.tree.apply_batch(batch)
    }

    /// Waits until everything recorded so far is on disk.
    pub(crate) async fn flush(&self) -> sled::Result<()> {
        gatehouse_store::flush_tree(&self.tree).await.map(|_| ())
    }

    /// Marks the publish with this packet id as received by the broker (PUBREC; durable after
    /// [`Outbox::flush`]).
    pub(crate) fn mark_released(&self, pkid: u16) -> sled::Result<()> {
        if let Some(v) = self.tree.get(entry_key(pkid))?
            && v.len() > 8
            && v[8] == 0
        {
            let mut v = v.to_vec();
            v[8] = 1;
            self.tree.insert(entry_key(pkid), v)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let e = Entry {
            seq: 42,
            pkid: 7,
            released: true,
            key: [3; 32],
            topic: "devices/a/down".into(),
            payload: b"hello".to_vec(),
            props: None,
        };
        let d = Entry::decode(7, &e.encode()).unwrap();
        assert_eq!(
            (
                d.seq,
                d.released,
                d.key,
                d.topic.as_str(),
                d.payload.as_slice()
            ),
            (42, true, [3; 32], "devices/a/down", &b"hello"[..])
        );
    }
}
