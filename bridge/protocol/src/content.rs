//! Message content: XMTP's `EncodedContent` inside a `PlaintextEnvelope`.
//!
//! An application message's MLS plaintext is a `PlaintextEnvelope` (v1: content bytes plus an
//! idempotency key); the content bytes are an `EncodedContent` with a
//! `authority/type:major.minor` type id and an optional human-readable fallback.

use gatehouse_wire::Message as _;
use gatehouse_wire::message_contents::{
    ContentTypeId, EncodedContent, PlaintextEnvelope, plaintext_envelope,
};

use crate::error::{ProtocolError, Result};

/// `xmtp.org/text:1.0`.
pub fn text_type() -> ContentTypeId {
    ContentTypeId {
        authority_id: "xmtp.org".into(),
        type_id: "text".into(),
        version_major: 1,
        version_minor: 0,
    }
}

/// `gatehouse.dev/json:1.0`: a JSON document, with the JSON text itself as the fallback.
pub fn json_type() -> ContentTypeId {
    ContentTypeId {
        authority_id: "gatehouse.dev".into(),
        type_id: "json".into(),
        version_major: 1,
        version_minor: 0,
    }
}

/// `authority/type:major.minor`.
pub fn type_string(t: &ContentTypeId) -> String {
    format!(
        "{}/{}:{}.{}",
        t.authority_id, t.type_id, t.version_major, t.version_minor
    )
}

/// Parses `authority/type:major.minor`.
pub fn parse_type(s: &str) -> Result<ContentTypeId> {
    let bad = || ProtocolError::malformed("content type", s);
    let (authority, rest) = s.split_once('/').ok_or_else(bad)?;
    let (type_id, version) = rest.split_once(':').ok_or_else(bad)?;
    let (major, minor) = version.split_once('.').ok_or_else(bad)?;
    Ok(ContentTypeId {
        authority_id: authority.into(),
        type_id: type_id.into(),
        version_major: major.parse().map_err(|_| bad())?,
        version_minor: minor.parse().map_err(|_| bad())?,
    })
}

/// A text message as XMTP encodes it (`encoding=UTF-8` parameter, content = the UTF-8 bytes).
pub fn text(s: &str) -> EncodedContent {
    EncodedContent {
        r#type: Some(text_type()),
        parameters: [("encoding".to_string(), "UTF-8".to_string())].into(),
        fallback: None,
        compression: None,
        content: s.as_bytes().to_vec(),
    }
}

/// A content of any type with a readable fallback for clients that don't know it.
pub fn with_fallback(
    t: ContentTypeId,
    content: Vec<u8>,
    fallback: Option<String>,
) -> EncodedContent {
    EncodedContent {
        r#type: Some(t),
        parameters: Default::default(),
        fallback,
        compression: None,
        content,
    }
}

/// Serialises content into the MLS application plaintext (`PlaintextEnvelope.V1`).
pub fn seal_envelope(content: &EncodedContent, idempotency_key: &str) -> Vec<u8> {
    PlaintextEnvelope {
        content: Some(plaintext_envelope::Content::V1(plaintext_envelope::V1 {
            content: content.encode_to_vec(),
            idempotency_key: idempotency_key.into(),
        })),
    }
    .encode_to_vec()
}

/// What an application message carried.
#[derive(Debug, Clone)]
pub enum Opened {
    /// User content.
    Content {
        /// The decoded content.
        content: EncodedContent,
        /// The content bytes exactly as sent (the input of XMTP's message id).
        bytes: Vec<u8>,
        /// The sender's idempotency key.
        idempotency_key: String,
    },
    /// Bytes that are not an `EncodedContent` (libxmtp's debug client sends raw text this way).
    Raw {
        /// The bytes as sent.
        bytes: Vec<u8>,
        /// The sender's idempotency key.
        idempotency_key: String,
    },
    /// A device-sync or preference message (V2 without user content).
    Sync,
}

/// Reads an MLS application plaintext.
pub fn open_envelope(bytes: &[u8]) -> Result<Opened> {
    let env = PlaintextEnvelope::decode(bytes)
        .map_err(|e| ProtocolError::malformed("PlaintextEnvelope", e))?;
    let (content, key) = match env.content {
        Some(plaintext_envelope::Content::V1(v1)) => (v1.content, v1.idempotency_key),
        Some(plaintext_envelope::Content::V2(v2)) => match v2.message_type {
            Some(plaintext_envelope::v2::MessageType::Content(c)) => (c, v2.idempotency_key),
            _ => return Ok(Opened::Sync),
        },
        None => return Err(ProtocolError::malformed("PlaintextEnvelope", "empty")),
    };
    // Content is `EncodedContent` when it decodes as one with a type; anything else is kept as
    // the raw bytes it is (protobuf decoding alone is too lenient to tell).
    match EncodedContent::decode(content.as_slice()) {
        Ok(c) if c.r#type.is_some() => Ok(Opened::Content {
            content: c,
            bytes: content,
            idempotency_key: key,
        }),
        _ => Ok(Opened::Raw {
            bytes: content,
            idempotency_key: key,
        }),
    }
}

fn type_id(authority: &str, type_id: &str, major: u32) -> ContentTypeId {
    ContentTypeId {
        authority_id: authority.into(),
        type_id: type_id.into(),
        version_major: major,
        version_minor: 0,
    }
}

/// Whether `c` is of type `authority/type` with major version `major` (the minor version does
/// not matter: later minors decode under earlier codecs).
pub fn is_type(c: &EncodedContent, authority: &str, type_name: &str, major: u32) -> bool {
    c.r#type.as_ref().is_some_and(|t| {
        t.authority_id == authority && t.type_id == type_name && t.version_major == major
    })
}

/// `xmtp.org/reply:1.0`: `inner` (a complete `EncodedContent`) in reply to the message whose id
/// is `reference` (lowercase hex), optionally naming that message's sender.
pub fn reply(
    reference: &str,
    reference_inbox: Option<&str>,
    inner: &EncodedContent,
) -> Result<EncodedContent> {
    let inner_type = inner
        .r#type
        .as_ref()
        .filter(|t| !t.authority_id.is_empty() && !t.type_id.is_empty())
        .ok_or_else(|| ProtocolError::malformed("reply", "the nested content has no type"))?;
    let mut parameters = std::collections::BTreeMap::from([
        ("reference".to_string(), reference.to_ascii_lowercase()),
        ("contentType".to_string(), type_string(inner_type)),
    ]);
    if let Some(inbox) = reference_inbox {
        parameters.insert("referenceInboxId".into(), inbox.into());
    }
    let fallback =
        display_text(inner).map(|t| format!("Replied with \"{t}\" to an earlier message"));
    Ok(EncodedContent {
        r#type: Some(type_id("xmtp.org", "reply", 1)),
        parameters,
        fallback,
        compression: None,
        content: inner.encode_to_vec(),
    })
}

/// The nested content and reference of a reply.
pub fn open_reply(c: &EncodedContent) -> Result<(String, EncodedContent)> {
    let reference = c
        .parameters
        .get("reference")
        .cloned()
        .ok_or_else(|| ProtocolError::malformed("reply", "no reference parameter"))?;
    let inner = EncodedContent::decode(c.content.as_slice())
        .map_err(|e| ProtocolError::malformed("reply", e))?;
    if inner.r#type.is_none() {
        return Err(ProtocolError::malformed(
            "reply",
            "the nested content has no type",
        ));
    }
    Ok((reference, inner))
}

/// XMTP's `ReactionV2` (`xmtp.org/reaction:2.0`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReactionV2 {
    /// The id (lowercase hex) of the message reacted to.
    #[prost(string, tag = "1")]
    pub reference: String,
    /// The inbox id of that message's sender (optional in groups).
    #[prost(string, tag = "2")]
    pub reference_inbox_id: String,
    /// 1 added, 2 removed.
    #[prost(int32, tag = "3")]
    pub action: i32,
    /// The reaction (an emoji for the unicode schema).
    #[prost(string, tag = "4")]
    pub content: String,
    /// 1 unicode, 2 shortcode, 3 custom.
    #[prost(int32, tag = "5")]
    pub schema: i32,
}

/// `xmtp.org/reaction:2.0`: `emoji` added (or removed) on message `reference`.
pub fn reaction(reference: &str, emoji: &str, removed: bool) -> EncodedContent {
    let r = ReactionV2 {
        reference: reference.to_ascii_lowercase(),
        reference_inbox_id: String::new(),
        action: if removed { 2 } else { 1 },
        content: emoji.into(),
        schema: 1,
    };
    EncodedContent {
        r#type: Some(type_id("xmtp.org", "reaction", 2)),
        parameters: Default::default(),
        fallback: Some(if removed {
            format!("Removed \"{emoji}\" from an earlier message")
        } else {
            format!("Reacted with \"{emoji}\" to an earlier message")
        }),
        compression: None,
        content: r.encode_to_vec(),
    }
}

/// `xmtp.org/readReceipt:1.0` (empty content).
pub fn read_receipt() -> EncodedContent {
    with_fallback(type_id("xmtp.org", "readReceipt", 1), Vec::new(), None)
}

/// `xmtp.org/attachment:1.0`: a small file carried inline.
pub fn attachment(filename: &str, mime_type: &str, data: Vec<u8>) -> EncodedContent {
    EncodedContent {
        r#type: Some(type_id("xmtp.org", "attachment", 1)),
        parameters: [
            ("filename".to_string(), filename.to_string()),
            ("mimeType".to_string(), mime_type.to_string()),
        ]
        .into(),
        fallback: Some(format!(
            "Can't display \"{filename}\". This app doesn't support attachments."
        )),
        compression: None,
        content: data,
    }
}

/// XMTP's `GroupUpdated` transcript (`xmtp.org/group_updated:1.0`): derived locally from a
/// validated commit, never published as an application message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GroupUpdated {
    /// Who made the commit.
    #[prost(string, tag = "1")]
    pub initiated_by_inbox_id: String,
    /// Inboxes added.
    #[prost(message, repeated, tag = "2")]
    pub added_inboxes: Vec<UpdatedInbox>,
    /// Inboxes removed.
    #[prost(message, repeated, tag = "3")]
    pub removed_inboxes: Vec<UpdatedInbox>,
    /// Mutable metadata changes.
    #[prost(message, repeated, tag = "4")]
    pub metadata_field_changes: Vec<MetadataFieldChange>,
    /// Inboxes removed on their own request.
    #[prost(message, repeated, tag = "5")]
    pub left_inboxes: Vec<UpdatedInbox>,
    /// Inboxes added to the admin list.
    #[prost(message, repeated, tag = "6")]
    pub added_admin_inboxes: Vec<UpdatedInbox>,
    /// Inboxes removed from the admin list.
    #[prost(message, repeated, tag = "7")]
    pub removed_admin_inboxes: Vec<UpdatedInbox>,
    /// Inboxes added to the super admin list.
    #[prost(message, repeated, tag = "8")]
    pub added_super_admin_inboxes: Vec<UpdatedInbox>,
    /// Inboxes removed from the super admin list.
    #[prost(message, repeated, tag = "9")]
    pub removed_super_admin_inboxes: Vec<UpdatedInbox>,
}

/// `GroupUpdated.Inbox`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UpdatedInbox {
    /// The inbox id.
    #[prost(string, tag = "1")]
    pub inbox_id: String,
}

/// `GroupUpdated.MetadataFieldChange`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MetadataFieldChange {
    /// XMTP's field name (`group_name`, `description`, …).
    #[prost(string, tag = "1")]
    pub field_name: String,
    /// The value before (absent when the field was absent).
    #[prost(string, optional, tag = "2")]
    pub old_value: Option<String>,
    /// The value after.
    #[prost(string, optional, tag = "3")]
    pub new_value: Option<String>,
}

impl GroupUpdated {
    /// Whether the commit changed nothing a person would see.
    pub fn is_empty(&self) -> bool {
        self.added_inboxes.is_empty()
            && self.removed_inboxes.is_empty()
            && self.left_inboxes.is_empty()
            && self.added_admin_inboxes.is_empty()
            && self.removed_admin_inboxes.is_empty()
            && self.added_super_admin_inboxes.is_empty()
            && self.removed_super_admin_inboxes.is_empty()
            && self
                .metadata_field_changes
                .iter()
                .all(|c| c.field_name.starts_with('_'))
    }

    /// One line for people: `<inbox> added <a>, removed <b>, set group_name to "x"`.
    pub fn summary(&self) -> String {
        let list = |v: &[UpdatedInbox]| {
            v.iter()
                .map(|i| i.inbox_id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut parts = Vec::new();
        for (verb, v) in [
            ("added", &self.added_inboxes),
            ("removed", &self.removed_inboxes),
            ("removed on request", &self.left_inboxes),
            ("made admin", &self.added_admin_inboxes),
            ("revoked admin of", &self.removed_admin_inboxes),
            ("made super admin", &self.added_super_admin_inboxes),
            ("revoked super admin of", &self.removed_super_admin_inboxes),
        ] {
            if !v.is_empty() {
                parts.push(format!("{verb} {}", list(v)));
            }
        }
        for c in &self.metadata_field_changes {
            if c.field_name.starts_with('_') {
                continue;
            }
            match &c.new_value {
                Some(v) => parts.push(format!("set {} to {v:?}", c.field_name)),
                None => parts.push(format!("cleared {}", c.field_name)),
            }
        }
        if parts.is_empty() {
            parts.push("updated the group".into());
        }
        format!("{} {}", self.initiated_by_inbox_id, parts.join("; "))
    }

    /// As content (`xmtp.org/group_updated:1.0`) with the summary as its fallback.
    pub fn to_content(&self) -> EncodedContent {
        with_fallback(
            type_id("xmtp.org", "group_updated", 1),
            self.encode_to_vec(),
            Some(self.summary()),
        )
    }
}

/// `gatehouse.dev/presence:1.0`: an endpoint came online or went offline (JSON
/// `{"endpoint":…,"state":"online"|"offline"}`), with a readable fallback.
pub fn presence(endpoint: &str, online: bool) -> EncodedContent {
    let state = if online { "online" } else { "offline" };
    with_fallback(
        type_id("gatehouse.dev", "presence", 1),
        serde_json::json!({"endpoint": endpoint, "state": state})
            .to_string()
            .into_bytes(),
        Some(format!("{endpoint} is {state}")),
    )
}

/// `gatehouse.dev/delivery_status:1.0`: what happened to message `reference` on the external
/// side (`delivered`, `failed`, …), with a readable fallback.
pub fn delivery_status(reference: &str, status: &str, detail: Option<&str>) -> EncodedContent {
    let mut v = serde_json::json!({"reference": reference, "status": status});
    if let Some(d) = detail {
        v["detail"] = d.into();
    }
    with_fallback(
        type_id("gatehouse.dev", "delivery_status", 1),
        v.to_string().into_bytes(),
        Some(match detail {
            Some(d) => format!("Message {reference}: {status} ({d})"),
            None => format!("Message {reference}: {status}"),
        }),
    )
}

/// XMTP's message id (lowercase hex): SHA-256 of `group id ‖ \t ‖ idempotency key ‖ \t ‖
/// content bytes`, so every client of the conversation (XMTP's included) derives the same id
/// for the same message, and a retried send keeps its id.
pub fn message_id(group_id: &[u8], content_bytes: &[u8], idempotency_key: &str) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(group_id);
    h.update(b"\t");
    h.update(idempotency_key.as_bytes());
    h.update(b"\t");
    h.update(content_bytes);
    hex::encode(h.finalize())
}

/// A readable rendering for people and logs-free displays: text and JSON as themselves, the
/// standard XMTP types described, anything else by its fallback (or a note naming the type, so
/// an unknown message is still shown, never dropped).
pub fn display_text(c: &EncodedContent) -> Option<String> {
    let Some(t) = &c.r#type else {
        return c.fallback.clone();
    };
    let utf8 = || String::from_utf8_lossy(&c.content).into_owned();
    match (t.authority_id.as_str(), t.type_id.as_str(), t.version_major) {
        ("xmtp.org", "text" | "markdown", 1) | ("gatehouse.dev", "json", 1) => Some(utf8()),
        ("xmtp.org", "reply", 1) => match open_reply(c) {
            Ok((reference, inner)) => Some(format!(
                "(reply to {reference}) {}",
                display_text(&inner).unwrap_or_default()
            )),
            Err(_) => c.fallback.clone(),
        },
        ("xmtp.org", "reaction", 2) => match ReactionV2::decode(c.content.as_slice()) {
            Ok(r) if r.action == 2 => Some(format!("(removed {} from {})", r.content, r.reference)),
            Ok(r) => Some(format!("(reacted {} to {})", r.content, r.reference)),
            Err(_) => c.fallback.clone(),
        },
        ("xmtp.org", "readReceipt", 1) => Some("(read)".into()),
        ("xmtp.org", "attachment", 1) => Some(format!(
            "(attachment {} {}, {} bytes)",
            c.parameters
                .get("filename")
                .map(String::as_str)
                .unwrap_or("unnamed"),
            c.parameters
                .get("mimeType")
                .map(String::as_str)
                .unwrap_or("application/octet-stream"),
            c.content.len()
        )),
        ("xmtp.org", "group_updated", 1) => match GroupUpdated::decode(c.content.as_slice()) {
            Ok(g) => Some(g.summary()),
            Err(_) => c.fallback.clone(),
        },
        _ => c
            .fallback
            .clone()
            .or_else(|| Some(format!("(unsupported content type {})", type_string(t)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same content encodes to the same bytes however its parameters were inserted (so a
    /// retry after a restart has the same XMTP message id and receivers drop it).
    #[test]
    fn parameters_encode_in_key_order() {
        use prost::Message as _;
        let keys: Vec<String> = (0..8).map(|i| format!("p{i}")).collect();
        let mut forward = text("hello");
        let mut backward = text("hello");
        for k in &keys {
            forward.parameters.insert(k.clone(), k.to_uppercase());
        }
        for k in keys.iter().rev() {
            backward.parameters.insert(k.clone(), k.to_uppercase());
        }
        assert_eq!(forward.encode_to_vec(), backward.encode_to_vec());
    }

    /// A text message survives the envelope, and type ids render and parse back.
    #[test]
    fn envelope_round_trip() {
        let bytes = seal_envelope(&text("hi"), "k1");
        let Opened::Content {
            content,
            idempotency_key,
            ..
        } = open_envelope(&bytes).unwrap()
        else {
            panic!("expected content");
        };
        assert_eq!(display_text(&content).unwrap(), "hi");
        assert_eq!(idempotency_key, "k1");
        // XMTP's id of this message: sha256("g" ‖ \t ‖ "k1" ‖ \t ‖ content bytes).
        let mut input = b"g\tk1\t".to_vec();
        input.extend(text("hi").encode_to_vec());
        use sha2::Digest as _;
        assert_eq!(
            message_id(b"g", &text("hi").encode_to_vec(), "k1"),
            hex::encode(sha2::Sha256::digest(&input))
        );
        assert_eq!(type_string(&text_type()), "xmtp.org/text:1.0");
        assert_eq!(parse_type("gatehouse.dev/json:1.0").unwrap(), json_type());
        assert!(open_envelope(b"\xff\xff").is_err());
        // Raw (non-EncodedContent) bytes, as libxmtp's debug client sends them, are kept.
        let raw = PlaintextEnvelope {
            content: Some(plaintext_envelope::Content::V1(plaintext_envelope::V1 {
                content: b"hello xmtp 1".to_vec(),
                idempotency_key: "k".into(),
            })),
        }
        .encode_to_vec();
        assert!(
            matches!(open_envelope(&raw).unwrap(), Opened::Raw { bytes, .. } if bytes == b"hello xmtp 1")
        );
    }

    /// Each standard type encodes as XMTP's catalogue says and decodes back to the same value;
    /// unknown types are shown by fallback or named, never dropped.
    #[test]
    fn standard_types_round_trip() {
        let r = reply("ABCD", Some("inbox1"), &text("yes")).unwrap();
        assert_eq!(
            type_string(r.r#type.as_ref().unwrap()),
            "xmtp.org/reply:1.0"
        );
        assert_eq!(r.parameters["reference"], "abcd");
        assert_eq!(r.parameters["contentType"], "xmtp.org/text:1.0");
        assert_eq!(r.parameters["referenceInboxId"], "inbox1");
        let (reference, inner) = open_reply(&r).unwrap();
        assert_eq!((reference.as_str(), inner), ("abcd", text("yes")));
        assert_eq!(display_text(&r).unwrap(), "(reply to abcd) yes");
        // A reply must nest typed content.
        assert!(reply("ab", None, &EncodedContent::default()).is_err());

        let re = reaction("ab", "👍", false);
        assert_eq!(
            type_string(re.r#type.as_ref().unwrap()),
            "xmtp.org/reaction:2.0"
        );
        let decoded = ReactionV2::decode(re.content.as_slice()).unwrap();
        assert_eq!(
            (decoded.action, decoded.schema, decoded.content.as_str()),
            (1, 1, "👍")
        );
        assert_eq!(display_text(&re).unwrap(), "(reacted 👍 to ab)");
        assert_eq!(
            display_text(&reaction("ab", "👍", true)).unwrap(),
            "(removed 👍 from ab)"
        );

        let rr = read_receipt();
        assert!(rr.content.is_empty() && is_type(&rr, "xmtp.org", "readReceipt", 1));

        let a = attachment("t.csv", "text/csv", b"a,b\n".to_vec());
        assert_eq!(a.parameters["mimeType"], "text/csv");
        assert_eq!(
            display_text(&a).unwrap(),
            "(attachment t.csv text/csv, 4 bytes)"
        );
        assert!(a.fallback.unwrap().contains("t.csv"));

        let g = GroupUpdated {
            initiated_by_inbox_id: "alice".into(),
            added_inboxes: vec![UpdatedInbox {
                inbox_id: "bob".into(),
            }],
            metadata_field_changes: vec![
                MetadataFieldChange {
                    field_name: "group_name".into(),
                    old_value: None,
                    new_value: Some("ops".into()),
                },
                MetadataFieldChange {
                    field_name: "_commit_log_signer".into(),
                    old_value: None,
                    new_value: Some("00".into()),
                },
            ],
            ..Default::default()
        };
        let gc = g.to_content();
        assert_eq!(GroupUpdated::decode(gc.content.as_slice()).unwrap(), g);
        assert_eq!(
            display_text(&gc).unwrap(),
            "alice added bob; set group_name to \"ops\""
        );
        assert!(!g.is_empty());

        let p = presence("thermo-1", false);
        assert_eq!(p.fallback.as_deref(), Some("thermo-1 is offline"));
        assert_eq!(display_text(&p).unwrap(), "thermo-1 is offline");
        let d = delivery_status("ab", "failed", Some("broker down"));
        assert_eq!(
            display_text(&d).unwrap(),
            "Message ab: failed (broker down)"
        );

        let unknown = with_fallback(parse_type("example.com/thing:3.1").unwrap(), vec![1], None);
        assert_eq!(
            display_text(&unknown).unwrap(),
            "(unsupported content type example.com/thing:3.1)"
        );
        // A later minor version still decodes under the same codec.
        let mut later = text("hi");
        later.r#type.as_mut().unwrap().version_minor = 7;
        assert_eq!(display_text(&later).unwrap(), "hi");
    }
}
