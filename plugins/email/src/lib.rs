//! The first-party email mapper.
//!
//! In: the host hands over the mail's text (HTML already reduced to text) with its headers as
//! metadata (`subject`, `from`, `from_name`, `message_id`, `verified`, `auth`, `reply`).
//! A new thread becomes `Subject: …` followed by the text; a reply keeps only what is new:
//! the quoted earlier message (`> …` lines, an `On … wrote:` or `-----Original Message-----`
//! header and all below it) and the signature (after `-- `) are cut. The subject is kept (per
//! endpoint, in the plugin's key-value store) for the way back.
//! Out: conversation text becomes a mail to the endpoint's address, subject `Re: <the thread's
//! subject>` (the host's `subject` metadata for a thread's conversation; else the endpoint's
//! last subject; else `default_subject`).
//!
//! Config keys: `default_subject` (default `Message`), `keep_quotes` (`true` keeps replies
//! whole), `keep_signature` (`true` keeps signatures).

use std::cell::RefCell;

use gatehouse_plugin_sdk::*;

struct Config {
    default_subject: String,
    keep_quotes: bool,
    keep_signature: bool,
}

thread_local! {
    static CONFIG: RefCell<Config> = RefCell::new(Config {
        default_subject: "Message".into(),
        keep_quotes: false,
        keep_signature: false,
    });
}

fn flag(k: &str, v: &str) -> Result<bool, Error> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(error(
            "config",
            format!("{k} must be true or false, not {v}"),
        )),
    }
}

/// What is new in a reply: everything above the first quote header or quoted block, and
/// above the signature delimiter.
pub fn new_part(text: &str, keep_quotes: bool, keep_signature: bool) -> String {
    let mut out: Vec<&str> = Vec::new();
    for line in text.lines() {
        if !keep_signature && line == "-- " {
            break;
        }
        let t = line.trim_end();
        if !keep_quotes {
            let trimmed = t.trim_start();
            let header = (trimmed.starts_with("On ") && trimmed.ends_with("wrote:"))
                || trimmed.starts_with("-----Original Message-----")
                || (trimmed.starts_with("Am ") && trimmed.ends_with("schrieb:"))
                || (trimmed.starts_with("Le ") && trimmed.ends_with("a écrit :"));
            if header {
                break;
            }
            if trimmed.starts_with('>') {
                continue;
            }
        }
        out.push(t);
    }
    while out.last().is_some_and(|l| l.trim().is_empty()) {
        out.pop();
    }
    while out.first().is_some_and(|l| l.trim().is_empty()) {
        out.remove(0);
    }
    out.join("\n")
}

/// `Re: subject`, without piling up prefixes.
pub fn reply_subject(subject: &str) -> String {
    let s = subject.trim();
    let lower = s.to_ascii_lowercase();
    if lower.starts_with("re:") || lower.starts_with("aw:") || lower.starts_with("sv:") {
        s.to_string()
    } else {
        format!("Re: {s}")
    }
}

struct Email;

impl Guest for Email {
    fn init(config: Vec<(String, String)>) -> Result<(), Error> {
        CONFIG.with(|c| {
            let mut c = c.borrow_mut();
            for (k, v) in config {
                match k.as_str() {
                    "default_subject" => c.default_subject = v,
                    "keep_quotes" => c.keep_quotes = flag(&k, &v)?,
                    "keep_signature" => c.keep_signature = flag(&k, &v)?,
                    other => return Err(error("config", format!("unknown key {other}"))),
                }
            }
            Ok(())
        })
    }

    fn on_external(msg: Message) -> Result<Vec<Action>, Error> {
        let text = String::from_utf8(msg.payload)
            .map_err(|_| error("malformed", "mail text is not UTF-8"))?;
        let (keep_quotes, keep_signature) =
            CONFIG.with(|c| (c.borrow().keep_quotes, c.borrow().keep_signature));
        let subject = meta(&msg.metadata, "subject")
            .unwrap_or("")
            .trim()
            .to_string();
        let reply = meta(&msg.metadata, "reply") == Some("true");
        let body = if reply {
            new_part(&text, keep_quotes, keep_signature)
        } else {
            new_part(&text, true, keep_signature)
        };
        if !subject.is_empty() {
            // For the way back: the thread's subject, per endpoint.
            let _ = kv::set(&format!("subject/{}", msg.endpoint), subject.as_bytes());
        }
        let shown = if reply || subject.is_empty() {
            body
        } else {
            format!("Subject: {subject}\n\n{body}")
        };
        if shown.trim().is_empty() {
            return Ok(vec![Action::Drop("the mail has no new text".into())]);
        }
        Ok(vec![send_text(&shown)])
    }

    fn on_conversation(msg: Message) -> Result<Vec<Action>, Error> {
        if !msg.content_type.starts_with("xmtp.org/text:")
            && !msg.content_type.starts_with("gatehouse.dev/json:")
        {
            return Ok(vec![Action::Drop(format!(
                "content type {} is not sent as mail",
                msg.content_type
            ))]);
        }
        // The thread's subject when the conversation is a mail thread; else the last one
        // this endpoint wrote with; else the configured default.
        let subject = meta(&msg.metadata, "subject")
            .filter(|s| !s.trim().is_empty())
            .map(str::to_string)
            .or_else(|| {
                kv::get(&format!("subject/{}", msg.endpoint))
                    .and_then(|s| String::from_utf8(s).ok())
            })
            .map(|s| reply_subject(&s))
            .unwrap_or_else(|| CONFIG.with(|c| c.borrow().default_subject.clone()));
        Ok(vec![Action::Publish(Publish {
            channel: "email".into(),
            address: msg.endpoint.clone(),
            payload: msg.payload,
            metadata: vec![("subject".into(), subject)],
        })])
    }
}

export!(Email);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_lose_quotes_and_signatures() {
        let text = "Thanks, that works.\n\n-- \nAnn\n";
        assert_eq!(new_part(text, false, false), "Thanks, that works.");
        let text = "Yes please.\r\n\r\nOn Mon, 1 Jan 2026, Support <s@x> wrote:\r\n> Shall we?\r\n";
        assert_eq!(new_part(text, false, false), "Yes please.");
        let text = "> old\nnew line\n> older\n";
        assert_eq!(new_part(text, false, false), "new line");
        let text = "Top\n-----Original Message-----\nFrom: x\n";
        assert_eq!(new_part(text, false, false), "Top");
        assert_eq!(new_part("a\n> b\n", true, false), "a\n> b");
    }

    #[test]
    fn reply_subjects_do_not_pile_up() {
        assert_eq!(reply_subject("Printer"), "Re: Printer");
        assert_eq!(reply_subject("RE: Printer"), "RE: Printer");
    }
}
