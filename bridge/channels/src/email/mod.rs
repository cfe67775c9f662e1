//! Email: an SMTP listener (mailin's state machine on tokio) that answers 250 only after the
//! daemon stored a message; sender authentication (DKIM, SPF, DMARC with mail-auth; DNS
//! answers from config first); parsing with mail-parser; replies through an SMTP relay
//! (lettre).

mod auth;
mod config;
pub mod fuzz;
mod parse;
mod send;
mod smtp;

pub use auth::{AuthResult, Verifier};
pub use config::{DnsConfig, EmailConfig, ListenerTls, RelayConfig, RelayTls, Unverified};
pub use parse::{Attachment, LOOP_HEADER, MAX_HOPS, ParsedMail, parse};
pub use send::{OutMail, Relay, SendError};
pub use smtp::{EmailHandle, MailIn, Verdict, mailbox_matches, start};
