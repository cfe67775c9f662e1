//! Outbound mail through an SMTP relay (lettre): threading headers, the loop header, TLS and
//! authentication from config. Failures are sorted into permanent (the relay refused for
//! good: dead letter) and transient (retried).

use std::time::Duration;

use lettre::message::Mailbox;
use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::config::{RelayConfig, RelayTls};
use super::parse::LOOP_HEADER;

/// One reply to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutMail {
    /// Sender address (the route's mailbox).
    pub from: String,
    /// Sender display name.
    pub from_name: Option<String>,
    /// Recipient address.
    pub to: String,
    /// Subject.
    pub subject: String,
    /// Plain-text body.
    pub text: String,
    /// Message-ID, without angle brackets (the same on a retry, so receivers can drop a copy).
    pub message_id: String,
    /// The message this answers, without angle brackets.
    pub in_reply_to: Option<String>,
    /// The thread so far, oldest first, without angle brackets.
    pub references: Vec<String>,
    /// Bridge hops the message being answered had made.
    pub hops: u32,
}

/// Why a send failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The relay refused for good (or the message cannot be built): retrying will not help.
    #[error("{0}")]
    Permanent(String),
    /// Worth retrying (connection, timeout, 4xx).
    #[error("{0}")]
    Transient(String),
}

/// A connection recipe for the relay.
#[derive(Clone)]
pub struct Relay {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    hostname: String,
    describe: String,
}

impl Relay {
    /// Builds the transport (nothing is connected yet). `hostname`: ours, for the loop header.
    pub fn new(cfg: &RelayConfig, hostname: &str) -> Result<Self, String> {
        let params = || {
            TlsParameters::new(cfg.host.clone())
                .map_err(|e| format!("email relay {}: TLS: {e}", cfg.host))
        };
        let tls = match cfg.tls {
            RelayTls::None => Tls::None,
            RelayTls::Opportunistic => Tls::Opportunistic(params()?),
            RelayTls::Starttls => Tls::Required(params()?),
            RelayTls::Tls => Tls::Wrapper(params()?),
        };
        let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&cfg.host)
            .port(cfg.port)
            .tls(tls)
            .timeout(Some(Duration::from_secs(cfg.timeout_secs)));
        if let (Some(u), Some(p)) = (&cfg.username, &cfg.password) {
            b = b.credentials(Credentials::new(u.clone(), p.clone()));
        }
        Ok(Self {
            transport: b.build(),
            hostname: hostname.to_string(),
            describe: format!("{}:{}", cfg.host, cfg.port),
        })
    }

    /// Builds the message (exposed for tests).
    pub fn build(&self, m: &OutMail) -> Result<Message, SendError> {
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            SendError::Permanent(format!("cannot build the mail: {what}: {e}"))
        };
        let from: lettre::Address = m.from.parse().map_err(|e| bad("from address", &e))?;
        let to: Mailbox = m.to.parse().map_err(|e| bad("to address", &e))?;
        let mut b = Message::builder()
            .from(Mailbox::new(m.from_name.clone(), from))
            .to(to)
            .subject(m.subject.clone())
            .message_id(Some(format!("<{}>", m.message_id)))
            .raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str(LOOP_HEADER),
                format!("{}; hops={}", self.hostname, m.hops + 1),
            ));
        if let Some(r) = &m.in_reply_to {
            b = b.in_reply_to(format!("<{r}>"));
        }
        if !m.references.is_empty() {
            let refs: Vec<String> = m.references.iter().map(|r| format!("<{r}>")).collect();
            b = b.references(refs.join(" "));
        }
        b.header(ContentType::TEXT_PLAIN)
            .body(m.text.clone())
            .map_err(|e| bad("body", &e))
    }

    /// Sends one message; returns when the relay accepted it (250).
    pub async fn send(&self, m: &OutMail) -> Result<(), SendError> {
        let msg = self.build(m)?;
        match self.transport.send(msg).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_permanent() => Err(SendError::Permanent(format!(
                "the relay {} refused the mail: {e}",
                self.describe
            ))),
            Err(e) => Err(SendError::Transient(format!(
                "sending through {}: {e}",
                self.describe
            ))),
        }
    }
}
