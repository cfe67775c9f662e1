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
            idempotency_key: key,
        }),
        _ => Ok(Opened::Raw {
            bytes: content,
            idempotency_key: key,
        }),
    }
}

/// A readable rendering: the text for text content, else the fallback.
pub fn display_text(c: &EncodedContent) -> Option<String> {
    match &c.r#type {
        Some(t) if t.authority_id == "xmtp.org" && t.type_id == "text" => {
            Some(String::from_utf8_lossy(&c.content).into_owned())
        }
        Some(t) if t.authority_id == "gatehouse.dev" && t.type_id == "json" => {
            Some(String::from_utf8_lossy(&c.content).into_owned())
        }
        _ => c.fallback.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A text message survives the envelope, and type ids render and parse back.
    #[test]
    fn envelope_round_trip() {
        let bytes = seal_envelope(&text("hi"), "k1");
        let Opened::Content {
            content,
            idempotency_key,
        } = open_envelope(&bytes).unwrap()
        else {
            panic!("expected content");
        };
        assert_eq!(display_text(&content).unwrap(), "hi");
        assert_eq!(idempotency_key, "k1");
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
}
