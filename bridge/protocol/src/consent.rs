//! XMTP consent records and their device-sync encoding.
//!
//! A record says whether an inbox (or a conversation) is `allowed`, `denied` or `unknown`, as
//! of a time. Records merge by "latest write wins"; equal times resolve by state (denied over
//! allowed over unknown), so every installation ends with the same list whatever order the
//! records arrive in. They travel between an inbox's own installations only inside its
//! device-sync group, as libxmtp sends them: an application message whose `EncodedContent`
//! (`xmtp.org/application/x-protobuf:1.0`) holds a `DeviceSyncContent` with `PreferenceUpdates`.

use gatehouse_wire::Message as _;
use gatehouse_wire::device_sync::consent_backup::{ConsentSave, ConsentStateSave, ConsentTypeSave};
use gatehouse_wire::device_sync::content::{
    DeviceSyncContent, PreferenceUpdate, PreferenceUpdates, device_sync_content, preference_update,
};
use gatehouse_wire::message_contents::{ContentTypeId, EncodedContent};
use serde::{Deserialize, Serialize};

use crate::error::{ProtocolError, Result};

/// A consent state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Never decided: messages wait in the request queue.
    Unknown,
    /// Delivered.
    Allowed,
    /// Dropped without any signal to the sender.
    Denied,
}

impl State {
    /// Parses `allowed` / `denied` / `unknown`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "allowed" | "allow" => Some(Self::Allowed),
            "denied" | "deny" => Some(Self::Denied),
            "unknown" => Some(Self::Unknown),
            _ => None,
        }
    }
}

/// What a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Entity {
    /// An inbox id.
    InboxId,
    /// A conversation (hex group id).
    ConversationId,
}

/// One consent record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Inbox or conversation.
    pub kind: Entity,
    /// The inbox id or hex conversation id.
    pub entity: String,
    /// The state.
    pub state: State,
    /// When it was decided (ns since the epoch).
    pub at_ns: i64,
}

impl Record {
    /// Whether `self` replaces `current` under "latest write wins, ties by state".
    pub fn wins_over(&self, current: &Record) -> bool {
        (self.at_ns, self.state) > (current.at_ns, current.state)
    }

    /// The storage key of the entity: `inbox/<id>` or `conversation/<hex>`.
    pub fn key(&self) -> String {
        key(self.kind, &self.entity)
    }

    fn to_save(&self) -> ConsentSave {
        ConsentSave {
            entity_type: match self.kind {
                Entity::InboxId => ConsentTypeSave::InboxId,
                Entity::ConversationId => ConsentTypeSave::ConversationId,
            } as i32,
            state: match self.state {
                State::Unknown => ConsentStateSave::Unknown,
                State::Allowed => ConsentStateSave::Allowed,
                State::Denied => ConsentStateSave::Denied,
            } as i32,
            entity: self.entity.clone(),
            consented_at_ns: self.at_ns,
        }
    }

    fn from_save(s: &ConsentSave) -> Option<Self> {
        let kind = match ConsentTypeSave::try_from(s.entity_type).ok()? {
            ConsentTypeSave::InboxId => Entity::InboxId,
            ConsentTypeSave::ConversationId => Entity::ConversationId,
            _ => return None,
        };
        let state = match ConsentStateSave::try_from(s.state).ok()? {
            ConsentStateSave::Unknown => State::Unknown,
            ConsentStateSave::Allowed => State::Allowed,
            ConsentStateSave::Denied => State::Denied,
            ConsentStateSave::Unspecified => return None,
        };
        Some(Record {
            kind,
            entity: s.entity.clone(),
            state,
            at_ns: s.consented_at_ns,
        })
    }
}

/// The storage key of an entity.
pub fn key(kind: Entity, entity: &str) -> String {
    match kind {
        Entity::InboxId => format!("inbox/{entity}"),
        Entity::ConversationId => format!("conversation/{}", entity.to_ascii_lowercase()),
    }
}

/// Folds records into a list (key → winning record), in any order.
pub fn merge(
    list: &mut std::collections::BTreeMap<String, Record>,
    records: impl IntoIterator<Item = Record>,
) {
    for r in records {
        match list.get(&r.key()) {
            Some(cur) if !r.wins_over(cur) => {}
            _ => {
                list.insert(r.key(), r);
            }
        }
    }
}

/// The content type libxmtp uses for device-sync messages.
pub fn sync_content_type() -> ContentTypeId {
    ContentTypeId {
        authority_id: "xmtp.org".into(),
        type_id: "application/x-protobuf".into(),
        version_major: 1,
        version_minor: 0,
    }
}

/// Encodes records as a device-sync `PreferenceUpdates` message.
pub fn encode_updates(records: &[Record]) -> EncodedContent {
    let content = DeviceSyncContent {
        content: Some(device_sync_content::Content::PreferenceUpdates(
            PreferenceUpdates {
                updates: records
                    .iter()
                    .map(|r| PreferenceUpdate {
                        update: Some(preference_update::Update::Consent(r.to_save())),
                    })
                    .collect(),
            },
        )),
    };
    EncodedContent {
        r#type: Some(sync_content_type()),
        parameters: Default::default(),
        fallback: None,
        compression: None,
        content: content.encode_to_vec(),
    }
}

/// The consent records in a device-sync message (other preference kinds are skipped).
pub fn decode_updates(c: &EncodedContent) -> Result<Vec<Record>> {
    let d = DeviceSyncContent::decode(c.content.as_slice())
        .map_err(|e| ProtocolError::malformed("DeviceSyncContent", e))?;
    Ok(match d.content {
        Some(device_sync_content::Content::PreferenceUpdates(p)) => p
            .updates
            .iter()
            .filter_map(|u| match &u.update {
                Some(preference_update::Update::Consent(s)) => Record::from_save(s),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn rec(entity: u8, state: u8, at: i64) -> Record {
        Record {
            kind: if entity.is_multiple_of(2) {
                Entity::InboxId
            } else {
                Entity::ConversationId
            },
            entity: format!("e{}", entity / 2),
            state: [State::Unknown, State::Allowed, State::Denied][state as usize % 3],
            at_ns: at,
        }
    }

    /// Records survive XMTP's device-sync encoding unchanged.
    #[test]
    fn device_sync_round_trip() {
        let records = vec![rec(0, 1, 5), rec(1, 2, 7), rec(2, 0, 9)];
        let c = encode_updates(&records);
        assert_eq!(c.r#type.as_ref().unwrap().type_id, "application/x-protobuf");
        assert_eq!(decode_updates(&c).unwrap(), records);
        assert!(
            decode_updates(&EncodedContent {
                content: vec![0xff, 0xff],
                ..Default::default()
            })
            .is_err()
        );
    }

    /// Latest wins; on equal times, denied beats allowed beats unknown.
    #[test]
    fn latest_write_wins_ties_by_state() {
        let mut list = BTreeMap::new();
        merge(&mut list, [rec(0, 1, 10), rec(0, 2, 5)]);
        assert_eq!(list["inbox/e0"].state, State::Allowed);
        merge(&mut list, [rec(0, 2, 10)]);
        assert_eq!(list["inbox/e0"].state, State::Denied);
        merge(&mut list, [rec(0, 1, 10)]);
        assert_eq!(list["inbox/e0"].state, State::Denied);
    }

    proptest! {
        /// Conflicting writes resolve to the same list in any order, and re-applying is a
        /// no-op (what lets every installation, and config and CLI, agree).
        #[test]
        fn merge_is_order_independent(
            writes in proptest::collection::vec((0u8..6, 0u8..3, 0i64..5), 0..40),
            seed in any::<u64>(),
        ) {
            let records: Vec<Record> = writes.iter().map(|(e, s, t)| rec(*e, *s, *t)).collect();
            let mut a = BTreeMap::new();
            merge(&mut a, records.clone());
            let mut shuffled = records.clone();
            let mut x = seed;
            for i in (1..shuffled.len()).rev() {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (x >> 33) as usize % (i + 1));
            }
            let mut b = BTreeMap::new();
            merge(&mut b, shuffled);
            merge(&mut b, records);
            prop_assert_eq!(a, b);
        }
    }
}
