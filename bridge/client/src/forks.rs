//! Fork detection and recovery over XMTP's commit log (see `gatehouse_protocol::commit_log`).
//!
//! Every member keeps, per conversation, its epoch authenticator for each epoch it held
//! (`auth/<gid>/<epoch>`) and a local entry per commit it processed (`clog/<gid>/<seq>`). A
//! super admin uploads its entries, signed with the group's commit-log key. After reading a
//! commit, a member reads the published log: an authenticator that differs from its own for the
//! same epoch means it merged a different commit than the group did. It then stops sending
//! into that conversation, reports the fork (log line, `group info`), and asks a super admin —
//! in their DM — to re-add it; the admin's client removes the forked installation and adds it
//! back from a fresh key package in one commit, and the Welcome replaces the forked state.
//! The conversation keeps its id, read cursor and everything already delivered.

use std::collections::BTreeMap;

use gatehouse_protocol::commit_log::{self, Fork};
use gatehouse_protocol::{content, group};
use gatehouse_wire::Message as _;
use gatehouse_wire::message_contents::{CommitResult, PlaintextCommitLogEntry};
use gatehouse_wire::mls_api as mpb;

use crate::{Client, ClientError, Result, openmls_group::MlsGroup};

/// `gatehouse.dev/readd_request:1.0`: sent in a DM to a super admin by a forked member.
pub(crate) const READD_TYPE: &str = "readd_request";

fn be(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

fn key(prefix: &str, gid: &[u8]) -> Vec<u8> {
    [prefix.as_bytes(), gid, b"/"].concat()
}

impl Client {
    /// Notes the authenticator of the epoch `g` is in now.
    pub(crate) fn record_epoch(&self, g: &MlsGroup) -> Result<()> {
        let gid = g.group_id().as_slice();
        self.tree.insert(
            [key("auth/", gid), be(g.epoch().as_u64()).to_vec()].concat(),
            commit_log::authenticator(g),
        )?;
        Ok(())
    }

    /// Appends a local commit-log entry for the commit at node id `seq`.
    pub(crate) fn log_commit(
        &self,
        g: &MlsGroup,
        seq: u64,
        before: &[u8],
        result: CommitResult,
    ) -> Result<()> {
        let gid = g.group_id().as_slice();
        let after = (result == CommitResult::Applied)
            .then(|| (g.epoch().as_u64(), commit_log::authenticator(g)));
        let e = commit_log::entry(gid, seq, before, result, after);
        self.tree.insert(
            [key("clog/", gid), be(seq).to_vec()].concat(),
            e.encode_to_vec(),
        )?;
        // A commit that removed us leaves no epoch of ours to compare.
        if result == CommitResult::Applied && group::is_active(g) {
            self.record_epoch(g)?;
        }
        Ok(())
    }

    /// Uploads local entries not yet published, if this inbox is a super admin of the group
    /// (the group's publisher, as in libxmtp).
    pub(crate) async fn publish_commit_log(&mut self, g: &MlsGroup) -> Result<()> {
        let gid = g.group_id().as_slice().to_vec();
        let Some(signer) = commit_log::signer(g) else {
            return Ok(());
        };
        let meta = group::mutable_metadata(g)?;
        let is_super = meta
            .super_admin_list
            .as_ref()
            .is_some_and(|l| l.inbox_ids.contains(&self.inbox_id));
        if !is_super {
            return Ok(());
        }
        let up_key = key("clog_up/", &gid);
        let from = self
            .tree
            .get(&up_key)?
            .map(|v| u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])))
            .unwrap_or(0);
        let prefix = key("clog/", &gid);
        let mut requests = Vec::new();
        let mut last = from;
        for item in self
            .tree
            .range([prefix.clone(), be(from + 1).to_vec()].concat()..)
        {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            let seq = u64::from_be_bytes(k[prefix.len()..].try_into().unwrap_or([0; 8]));
            let entry = PlaintextCommitLogEntry::decode(v.as_ref())
                .map_err(|e| ClientError::Peer(format!("corrupt local commit log: {e}")))?;
            let (bytes, signature) = commit_log::sign(&entry, &signer);
            requests.push(mpb::PublishCommitLogRequest {
                group_id: gid.clone(),
                serialized_commit_log_entry: bytes,
                signature: Some(signature),
            });
            last = seq;
        }
        if requests.is_empty() {
            return Ok(());
        }
        self.mls
            .batch_publish_commit_log(mpb::BatchPublishCommitLogRequest { requests })
            .await?;
        self.tree.insert(up_key, &be(last))?;
        Ok(())
    }

    /// Reads the published commit log of `g` and compares it with this member's epochs.
    /// Marks the conversation forked (and asks to be re-added) on a disagreement.
    pub(crate) async fn check_fork(&mut self, g: &MlsGroup) -> Result<Option<Fork>> {
        let gid = g.group_id().as_slice().to_vec();
        if self.fork_state(&gid)?.is_some() || !group::is_active(g) {
            return Ok(None);
        }
        let Some(signer) = commit_log::signer(g) else {
            return Ok(None);
        };
        let verifying = signer.verifying_key();
        let down_key = key("clog_down/", &gid);
        let mut cursor = self
            .tree
            .get(&down_key)?
            .map(|v| u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])))
            .unwrap_or(0);
        let ours: BTreeMap<u64, Vec<u8>> = {
            let prefix = key("auth/", &gid);
            let mut m = BTreeMap::new();
            for item in self.tree.scan_prefix(&prefix) {
                let (k, v) = item?;
                let epoch = u64::from_be_bytes(k[prefix.len()..].try_into().unwrap_or([0; 8]));
                m.insert(epoch, v.to_vec());
            }
            m
        };
        let current = g.epoch().as_u64();
        loop {
            let resp = self
                .mls
                .batch_query_commit_log(mpb::BatchQueryCommitLogRequest {
                    requests: vec![mpb::QueryCommitLogRequest {
                        group_id: gid.clone(),
                        paging_info: Some(mpb::PagingInfo {
                            direction: mpb::SortDirection::Ascending as i32,
                            limit: 100,
                            id_cursor: cursor,
                        }),
                    }],
                })
                .await?
                .into_inner();
            let entries = resp
                .responses
                .into_iter()
                .next()
                .map(|r| r.commit_log_entries)
                .unwrap_or_default();
            let n = entries.len();
            let mut verified = Vec::new();
            for e in &entries {
                match commit_log::verify(e, &verifying) {
                    Ok(p) if p.group_id == gid => verified.push((e.sequence_id, p)),
                    Ok(_) => {}
                    Err(err) => {
                        tracing::warn!(conversation = %hex::encode(&gid), sequence = e.sequence_id, error = %err, "ignored a commit-log entry");
                    }
                }
            }
            let plain: Vec<PlaintextCommitLogEntry> =
                verified.iter().map(|(_, p)| p.clone()).collect();
            if let Some(fork) = commit_log::find_fork(&plain, &ours) {
                self.mark_forked(&gid, &fork).await?;
                return Ok(Some(fork));
            }
            // Entries for epochs not reached yet are read again next time.
            for (seq, p) in &verified {
                if p.applied_epoch_number > current {
                    break;
                }
                cursor = *seq;
            }
            self.tree.insert(&down_key, &be(cursor))?;
            if n < 100
                || verified
                    .iter()
                    .any(|(_, p)| p.applied_epoch_number > current)
            {
                break;
            }
        }
        Ok(None)
    }

    async fn mark_forked(&mut self, gid: &[u8], fork: &Fork) -> Result<()> {
        let conversation = hex::encode(gid);
        tracing::error!(
            %conversation,
            epoch = fork.epoch,
            commit = fork.commit_sequence_id,
            ours = %hex::encode(&fork.ours),
            published = %hex::encode(&fork.theirs),
            "conversation forked: this installation merged a different commit than the group; asking a super admin to re-add it"
        );
        let state = serde_json::json!({
            "epoch": fork.epoch,
            "commit_sequence_id": fork.commit_sequence_id,
            "detected_at_ns": crate::now_ns(),
            "readd_requested_from": serde_json::Value::Null,
        });
        self.tree.insert(
            [b"forked/".as_slice(), gid].concat(),
            state.to_string().as_bytes(),
        )?;
        self.request_readd(gid).await
    }

    /// Sends a re-add request to a super admin of the forked conversation (not ourselves).
    async fn request_readd(&mut self, gid: &[u8]) -> Result<()> {
        let g = group::load(&self.provider, gid)?
            .ok_or_else(|| ClientError::Peer("forked conversation vanished".into()))?;
        let meta = group::mutable_metadata(&g)?;
        let admins: Vec<String> = meta
            .super_admin_list
            .iter()
            .flat_map(|l| l.inbox_ids.clone())
            .chain(meta.admin_list.iter().flat_map(|l| l.inbox_ids.clone()))
            .filter(|i| *i != self.inbox_id)
            .collect();
        let Some(admin) = admins.first().cloned() else {
            tracing::error!(conversation = %hex::encode(gid), "forked, and no other admin can re-add this installation; leave and be added again");
            return Ok(());
        };
        let body = serde_json::json!({
            "conversation": hex::encode(gid),
            "installation": hex::encode(self.key.public()),
        })
        .to_string();
        let c = content::with_fallback(
            gatehouse_wire::message_contents::ContentTypeId {
                authority_id: "gatehouse.dev".into(),
                type_id: READD_TYPE.into(),
                version_major: 1,
                version_minor: 0,
            },
            body.into_bytes(),
            Some("(asks to be re-added to a conversation whose state diverged)".into()),
        );
        let dm = self.dm(&admin).await?;
        let mut dm_group = group::load(&self.provider, &dm)?
            .ok_or_else(|| ClientError::Peer("the DM with the admin vanished".into()))?;
        self.encrypt_and_publish(&mut dm_group, &c, None).await?;
        if let Some(mut state) = self.fork_state(gid)? {
            state["readd_requested_from"] = admin.clone().into();
            self.tree.insert(
                [b"forked/".as_slice(), gid].concat(),
                state.to_string().as_bytes(),
            )?;
        }
        tracing::info!(conversation = %hex::encode(gid), admin = %admin, "asked to be re-added");
        Ok(())
    }

    /// A re-add request arrived from `sender_inbox`'s installation `sender_installation`: if
    /// that installation is in the named conversation, it is re-added at our next membership
    /// pass (if the group's policy lets us add).
    pub(crate) fn note_readd_request(
        &self,
        body: &[u8],
        sender_inbox: &str,
        sender_installation: &[u8],
    ) -> Result<()> {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
            return Ok(());
        };
        let Some(gid) = v["conversation"].as_str().and_then(|s| hex::decode(s).ok()) else {
            return Ok(());
        };
        let Some(g) = group::load(&self.provider, &gid)? else {
            return Ok(());
        };
        let is_leaf = group::leaves(&g)
            .iter()
            .any(|(i, k)| i == sender_inbox && k == sender_installation);
        if !is_leaf {
            tracing::warn!(conversation = %hex::encode(&gid), sender = %sender_inbox, "ignored a re-add request from an installation that is not in the conversation");
            return Ok(());
        }
        self.tree.insert(
            [key("readd/", &gid), sender_installation.to_vec()].concat(),
            sender_inbox.as_bytes(),
        )?;
        tracing::info!(conversation = %hex::encode(&gid), sender = %sender_inbox, "re-add requested after a fork");
        Ok(())
    }

    /// Pending re-add requests of a group: `(inbox, installation key)`.
    pub(crate) fn readd_requests(&self, gid: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
        let prefix = key("readd/", gid);
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(&prefix) {
            let (k, v) = item?;
            out.push((
                String::from_utf8_lossy(&v).into_owned(),
                k[prefix.len()..].to_vec(),
            ));
        }
        Ok(out)
    }

    pub(crate) fn clear_readd_requests(
        &self,
        gid: &[u8],
        done: &[(String, Vec<u8>)],
    ) -> Result<()> {
        for (_, inst) in done {
            self.tree
                .remove([key("readd/", gid), inst.clone()].concat())?;
        }
        Ok(())
    }

    /// The fork record of a conversation, if it is forked.
    pub fn fork_state(&self, gid: &[u8]) -> Result<Option<serde_json::Value>> {
        Ok(self
            .tree
            .get([b"forked/".as_slice(), gid].concat())?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// After a Welcome replaced a forked conversation: the old epochs' authenticators belong to
    /// the fork and are forgotten; published entries up to now are not compared again.
    pub(crate) fn forget_fork(&self, g: &MlsGroup) -> Result<()> {
        let gid = g.group_id().as_slice();
        for prefix in [key("auth/", gid), key("clog/", gid)] {
            for item in self.tree.scan_prefix(&prefix).keys() {
                self.tree.remove(item?)?;
            }
        }
        self.tree.remove([b"forked/".as_slice(), gid].concat())?;
        self.record_epoch(g)?;
        tracing::info!(conversation = %hex::encode(gid), epoch = g.epoch().as_u64(), "re-added after the fork; the conversation is healthy again");
        Ok(())
    }

    /// Fault injection for tests: stages a rename and merges it locally without publishing it,
    /// exactly what a member that merged a commit the node did not order first would hold.
    #[doc(hidden)]
    pub async fn inject_fork(&mut self, gid: &[u8], name: &str) -> Result<()> {
        let mut g = group::load(&self.provider, gid)?
            .ok_or_else(|| ClientError::Peer("unknown conversation".into()))?;
        let exts = group::updated_extensions(
            &g,
            &group::MetadataUpdate::Attribute("group_name".into(), name.to_string()),
        )?;
        let _ = group::commit_extensions(&self.provider, &self.key, &mut g, exts)?;
        group::merge_pending(&self.provider, &mut g)?;
        self.record_epoch(&g)?;
        self.persist_mls()?;
        Ok(())
    }
}
