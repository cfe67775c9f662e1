//! Reading a received message with mail-parser: sender, threading headers, the text (HTML
//! reduced to text when there is no text part), attachments, and whether it is an automatic
//! message (auto-reply, bounce, list traffic) that must not become a chat message.

use mail_parser::{HeaderValue, MessageParser, MimeHeaders};
use serde::{Deserialize, Serialize};

/// The header every message the bridge sends carries (its value: the sending bridge's host
/// name and a hop count), so bridges recognise each other's mail.
pub const LOOP_HEADER: &str = "X-Gatehouse-Loop";

/// More bridge hops than this and a message is treated as a loop.
pub const MAX_HOPS: u32 = 3;

/// An attachment, bytes as received.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// File name, if it has one.
    pub name: Option<String>,
    /// MIME type.
    pub content_type: String,
    /// The decoded bytes.
    pub bytes: Vec<u8>,
}

/// What the bridge needs from a message.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParsedMail {
    /// The From address, lowercased.
    pub from: Option<String>,
    /// The From display name.
    pub from_name: Option<String>,
    /// Subject, decoded.
    pub subject: Option<String>,
    /// Message-ID without angle brackets.
    pub message_id: Option<String>,
    /// In-Reply-To ids.
    pub in_reply_to: Vec<String>,
    /// References ids, oldest first.
    pub references: Vec<String>,
    /// The text body (HTML reduced to text if there is no text part).
    pub text: String,
    /// The HTML body, if there is one.
    pub html: Option<String>,
    /// Attachments.
    pub attachments: Vec<Attachment>,
    /// Why this is an automatic message (not for the conversation), if it is one.
    pub automatic: Option<String>,
    /// Bridge hops counted in the loop header (0 when absent).
    pub hops: u32,
}

fn ids(v: &HeaderValue) -> Vec<String> {
    match v {
        HeaderValue::Text(t) => vec![t.to_string()],
        HeaderValue::TextList(l) => l.iter().map(|t| t.to_string()).collect(),
        _ => Vec::new(),
    }
}

/// Parses `raw`; `None` when it is not a message at all. `null_sender`: the envelope's MAIL
/// FROM was `<>` (a bounce by definition).
pub fn parse(raw: &[u8], null_sender: bool) -> Option<ParsedMail> {
    // mail-parser 0.11 has debug assertions that fire on some malformed multipart input (found
    // by our fuzzing); such a mail is one that does not parse, never a panic of the daemon.
    gatehouse_store::catch_quietly(|| parse_(raw, null_sender))
        .ok()
        .flatten()
}

fn parse_(raw: &[u8], null_sender: bool) -> Option<ParsedMail> {
    let msg = MessageParser::default().parse(raw)?;
    let from = msg.from().and_then(|a| a.first());
    let header = |name: &str| msg.header_raw(name).map(|v| v.trim().to_string());
    let content_type = msg
        .content_type()
        .map(|c| format!("{}/{}", c.ctype(), c.subtype().unwrap_or("")).to_ascii_lowercase())
        .unwrap_or_default();
    let automatic = if null_sender {
        Some("null sender (a bounce)".to_string())
    } else if content_type == "multipart/report" {
        Some("delivery or disposition report (multipart/report)".into())
    } else if let Some(v) = header("Auto-Submitted").filter(|v| !v.eq_ignore_ascii_case("no")) {
        Some(format!("Auto-Submitted: {v}"))
    } else if let Some(v) = header("Precedence").filter(|v| {
        ["bulk", "junk", "list", "auto_reply"]
            .iter()
            .any(|p| v.eq_ignore_ascii_case(p))
    }) {
        Some(format!("Precedence: {v}"))
    } else if header("X-Autoreply").is_some() || header("X-Autorespond").is_some() {
        Some("auto-responder header".into())
    } else {
        None
    };
    let hops = header(LOOP_HEADER)
        .and_then(|v| v.rsplit(';').next().map(str::trim).map(str::to_string))
        .and_then(|v| v.strip_prefix("hops=").and_then(|n| n.parse().ok()))
        .unwrap_or(0);
    let attachments = msg
        .attachments()
        .map(|p| Attachment {
            name: p.attachment_name().map(str::to_string),
            content_type: p
                .content_type()
                .map(|c| format!("{}/{}", c.ctype(), c.subtype().unwrap_or("octet-stream")))
                .unwrap_or_else(|| "application/octet-stream".into()),
            bytes: p.contents().to_vec(),
        })
        .collect();
    Some(ParsedMail {
        from: from
            .and_then(|a| a.address())
            .map(|a| a.trim().to_ascii_lowercase()),
        from_name: from.and_then(|a| a.name()).map(str::to_string),
        subject: msg.subject().map(str::to_string),
        message_id: msg.message_id().map(str::to_string),
        in_reply_to: ids(msg.in_reply_to()),
        references: ids(msg.references()),
        text: msg.body_text(0).map(|t| t.into_owned()).unwrap_or_default(),
        html: msg.body_html(0).map(|h| h.into_owned()),
        attachments,
        automatic,
        hops,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sender_subject_threading_and_text() {
        let raw = b"From: =?utf-8?q?Ann_M=C3=BCller?= <Ann@Example.org>\r\n\
To: support@bridge.test\r\n\
Subject: =?utf-8?b?SGVsbG8g4oCU?=\r\n\
Message-ID: <m2@example.org>\r\n\
In-Reply-To: <m1@example.org>\r\n\
References: <m0@example.org> <m1@example.org>\r\n\
Content-Type: text/plain; charset=iso-8859-1\r\n\
\r\n\
Gr\xfc\xdfe\r\n";
        let m = parse(raw, false).unwrap();
        assert_eq!(m.from.as_deref(), Some("ann@example.org"));
        assert_eq!(m.from_name.as_deref(), Some("Ann Müller"));
        assert_eq!(m.subject.as_deref(), Some("Hello —"));
        assert_eq!(m.message_id.as_deref(), Some("m2@example.org"));
        assert_eq!(m.in_reply_to, ["m1@example.org"]);
        assert_eq!(m.references, ["m0@example.org", "m1@example.org"]);
        assert_eq!(m.text.trim_end(), "Grüße");
        assert_eq!(m.automatic, None);
    }

    #[test]
    fn html_only_is_reduced_to_text_and_attachments_kept() {
        let raw = b"From: a@example.org\r\n\
Subject: x\r\n\
Content-Type: multipart/mixed; boundary=\"b\"\r\n\
\r\n\
--b\r\n\
Content-Type: text/html\r\n\
\r\n\
<p>Hello <b>there</b></p>\r\n\
--b\r\n\
Content-Type: application/pdf\r\n\
Content-Disposition: attachment; filename=\"r.pdf\"\r\n\
Content-Transfer-Encoding: base64\r\n\
\r\n\
JVBERg==\r\n\
--b--\r\n";
        let m = parse(raw, false).unwrap();
        assert!(m.text.contains("Hello there"), "{:?}", m.text);
        assert!(m.html.unwrap().contains("<b>there</b>"));
        assert_eq!(m.attachments.len(), 1);
        assert_eq!(m.attachments[0].name.as_deref(), Some("r.pdf"));
        assert_eq!(m.attachments[0].bytes, b"%PDF");
    }

    #[test]
    fn automatic_messages_are_recognised() {
        let base = "From: a@example.org\r\nSubject: x\r\n";
        for (extra, null) in [
            ("Auto-Submitted: auto-replied\r\n", false),
            ("Precedence: bulk\r\n", false),
            ("X-Autoreply: yes\r\n", false),
            (
                "Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n",
                false,
            ),
            ("", true),
        ] {
            let raw = format!("{base}{extra}\r\nbody\r\n");
            assert!(
                parse(raw.as_bytes(), null).unwrap().automatic.is_some(),
                "{extra}"
            );
        }
        let raw = format!("{base}Auto-Submitted: no\r\n\r\nbody\r\n");
        assert_eq!(parse(raw.as_bytes(), false).unwrap().automatic, None);
        let raw = format!("{base}{LOOP_HEADER}: bridge.test; hops=2\r\n\r\nbody\r\n");
        assert_eq!(parse(raw.as_bytes(), false).unwrap().hops, 2);
    }
}
