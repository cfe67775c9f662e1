//! The SMTP listener: mailin's protocol state machine, driven line by line from tokio.
//!
//! Each finished message goes to the daemon as a [`MailIn`]; the client's final answer to
//! DATA waits for the daemon's [`Verdict`], so 250 means the message is stored. Recipients are
//! checked against the mailboxes the routes serve (550 otherwise), size against
//! `max_message_bytes` (552), and connections and per-address message rates are bounded.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mailin::{Action, Handler, Response, SessionBuilder};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use super::auth::{AuthResult, Verifier};
use super::config::{EmailConfig, ListenerTls};
use tokio_rustls::TlsAcceptor;

/// Longest command or data line accepted (RFC 5321 allows 1,000 octets; generous here).
const MAX_LINE: usize = 64 * 1024;
/// How long a client waits for the daemon to store a message before getting 451.
const STORE_TIMEOUT: Duration = Duration::from_secs(60);

/// One received message, waiting for the daemon's verdict.
#[derive(Debug)]
pub struct MailIn {
    /// The client's address.
    pub peer: IpAddr,
    /// Its HELO/EHLO name.
    pub helo: String,
    /// Envelope sender (empty for `<>`).
    pub mail_from: String,
    /// Accepted recipients, lowercased.
    pub rcpt: Vec<String>,
    /// The message as received.
    pub raw: Vec<u8>,
    /// Sender authentication.
    pub auth: AuthResult,
    verdict: oneshot::Sender<Verdict>,
}

/// The daemon's answer to a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Durably stored: 250.
    Stored,
    /// Not stored; the client should try again later (451 with the reason).
    TryLater(String),
    /// Refused for good (the code, e.g. 550, and the reason).
    Reject(u16, String),
}

impl MailIn {
    /// Answers the client.
    pub fn answer(self, verdict: Verdict) {
        let _ = self.verdict.send(verdict);
    }
}

/// The running listener.
pub struct EmailHandle {
    /// Where it listens (the port chosen when `listen` said 0).
    pub local_addr: std::net::SocketAddr,
    mailboxes: Mailboxes,
}

/// The mailbox patterns served, shared with every session (a reload changes them in place).
type Mailboxes = Arc<std::sync::RwLock<Vec<String>>>;

impl EmailHandle {
    /// Changes the mailboxes served (a configuration reload); sessions check the new set from
    /// their next RCPT TO.
    pub fn set_mailboxes(&self, mailboxes: Vec<String>) {
        *self.mailboxes.write().unwrap_or_else(|p| p.into_inner()) = mailboxes;
    }
}

/// Whether `addr` is served: a mailbox matches exactly (case-insensitive) or as `*@domain`.
pub fn mailbox_matches(pattern: &str, addr: &str) -> bool {
    let (p, a) = (pattern.to_ascii_lowercase(), addr.to_ascii_lowercase());
    match p.strip_prefix("*@") {
        Some(domain) => a.rsplit_once('@').is_some_and(|(_, d)| d == domain),
        None => p == a,
    }
}

/// What the handler collected for one transaction.
#[derive(Default)]
struct Transaction {
    helo: String,
    mail_from: String,
    rcpt: Vec<String>,
    data: Vec<u8>,
    oversize: bool,
    done: bool,
    /// Between DATA's 354 and the final dot.
    in_data: bool,
}

/// Stands in for `<>` inside mailin (see `serve`).
const NULL_SENDER: &str = "null-sender@gatehouse.invalid";

/// `MAIL FROM:<>` (with any parameters) rewritten to the placeholder.
fn null_sender(line: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(line).ok()?;
    let upper = text.to_ascii_uppercase();
    let rest = upper.strip_prefix("MAIL FROM:")?;
    let at = text.len() - rest.len();
    let after = text[at..].trim_start();
    let tail = after.strip_prefix("<>")?;
    Some(format!("MAIL FROM:<{NULL_SENDER}>{tail}").into_bytes())
}

struct SessionHandler {
    mailboxes: Mailboxes,
    max_bytes: usize,
    max_rcpt: usize,
    tx: Arc<Mutex<Transaction>>,
}

impl Handler for SessionHandler {
    fn helo(&mut self, _ip: IpAddr, domain: &str) -> Response {
        self.lock().helo = domain.to_string();
        mailin::response::OK
    }
    fn mail(&mut self, _ip: IpAddr, domain: &str, from: &str) -> Response {
        let mut t = self.lock();
        *t = Transaction {
            helo: domain.to_string(),
            mail_from: if from == NULL_SENDER {
                String::new()
            } else {
                from.to_string()
            },
            ..Default::default()
        };
        mailin::response::OK
    }
    fn rcpt(&mut self, to: &str) -> Response {
        let mut t = self.lock();
        if t.rcpt.len() >= self.max_rcpt {
            return Response::custom(452, "4.5.3 Too many recipients".into());
        }
        let served = self
            .mailboxes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|m| mailbox_matches(m, to));
        if served {
            t.rcpt.push(to.to_ascii_lowercase());
            mailin::response::OK
        } else {
            Response::custom(550, "5.1.1 No such mailbox here".into())
        }
    }
    fn data_start(&mut self, _domain: &str, _from: &str, _8bit: bool, _to: &[String]) -> Response {
        let mut t = self.lock();
        t.data.clear();
        t.oversize = false;
        t.done = false;
        t.in_data = true;
        mailin::response::OK
    }
    fn data(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut t = self.lock();
        if t.data.len() + buf.len() > self.max_bytes {
            // Keep reading to the end, storing nothing more; answered 552 there.
            t.oversize = true;
            t.data = Vec::new();
        } else if !t.oversize {
            t.data.extend_from_slice(buf);
        }
        Ok(())
    }
    fn data_end(&mut self) -> Response {
        let mut t = self.lock();
        t.done = true;
        t.in_data = false;
        // Replaced by the daemon's verdict (see `serve`).
        mailin::response::OK
    }
}

impl SessionHandler {
    fn lock(&self) -> std::sync::MutexGuard<'_, Transaction> {
        self.tx.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Messages per client address in the current minute.
type Rates = Arc<Mutex<HashMap<IpAddr, (Instant, u32)>>>;

/// Binds `cfg.listen` and serves until `shutdown`. Finished messages for the `mailboxes`
/// (patterns: an address or `*@domain`) go to `inbound`.
pub async fn start(
    cfg: &EmailConfig,
    mailboxes: Vec<String>,
    inbound: mpsc::Sender<MailIn>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<EmailHandle> {
    let listener = TcpListener::bind(cfg.listen).await?;
    let local_addr = listener.local_addr()?;
    let verifier = Arc::new(
        Verifier::new(&cfg.dns, &cfg.hostname)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
    );
    let tls = cfg.tls.as_ref().map(acceptor).transpose()?;
    if cfg.require_tls && tls.is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "require_tls needs tls (a certificate and key)",
        ));
    }
    let cfg = Arc::new(cfg.clone());
    let mailboxes: Mailboxes = Arc::new(std::sync::RwLock::new(mailboxes));
    let served = mailboxes.clone();
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let rates: Rates = Default::default();
    tracing::info!(listen = %local_addr, "SMTP listening");
    tokio::spawn(async move {
        let mut pause = gatehouse_store::accept::Pause::default();
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.changed() => return,
                v = pause.accept("SMTP", || listener.accept()) => v,
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                let mut stream = stream;
                let _ = stream
                    .write_all(b"421 4.7.0 Too many connections, try again later\r\n")
                    .await;
                tracing::warn!(%peer, "SMTP connection refused: max_connections reached");
                continue;
            };
            let (cfg, mailboxes, inbound, verifier, rates, tls, stop) = (
                cfg.clone(),
                mailboxes.clone(),
                inbound.clone(),
                verifier.clone(),
                rates.clone(),
                tls.clone(),
                shutdown.clone(),
            );
            tokio::spawn(async move {
                if let Err(e) = serve(
                    stream,
                    peer.ip(),
                    &cfg,
                    mailboxes,
                    inbound,
                    &verifier,
                    rates,
                    tls,
                    stop,
                )
                .await
                {
                    tracing::debug!(%peer, error = %e, "SMTP connection ended");
                }
                drop(permit);
            });
        }
    });
    Ok(EmailHandle {
        local_addr,
        mailboxes: served,
    })
}

fn rate_ok(rates: &Rates, ip: IpAddr, per_minute: u32) -> bool {
    let mut r = rates.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    r.retain(|_, (since, _)| now.duration_since(*since) < Duration::from_secs(60));
    let entry = r.entry(ip).or_insert((now, 0));
    entry.1 += 1;
    entry.1 <= per_minute
}

/// A connection before or after STARTTLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// The listener's TLS acceptor from the PEM files in `tls`.
fn acceptor(tls: &ListenerTls) -> io::Result<TlsAcceptor> {
    use tokio_rustls::rustls;
    let open = |p: &std::path::Path| {
        std::fs::File::open(p)
            .map(std::io::BufReader::new)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))
    };
    let certs = rustls_pemfile::certs(&mut open(&tls.cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", tls.cert.display())))?;
    if certs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: no PEM certificate in it", tls.cert.display()),
        ));
    }
    let key = rustls_pemfile::private_key(&mut open(&tls.key)?)?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: no PEM private key in it", tls.key.display()),
        )
    })?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(io::Error::other)?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("TLS certificate: {e}")))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

enum Read {
    Line(usize),
    Stop,
    Idle,
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    stream: TcpStream,
    peer: IpAddr,
    cfg: &EmailConfig,
    mailboxes: Mailboxes,
    inbound: mpsc::Sender<MailIn>,
    verifier: &Verifier,
    rates: Rates,
    tls: Option<TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut conn: BufReader<Box<dyn Io>> = BufReader::new(Box::new(stream));
    let tx = Arc::new(Mutex::new(Transaction::default()));
    let mut builder = SessionBuilder::new(cfg.hostname.clone());
    if tls.is_some() {
        builder.enable_start_tls();
    }
    let mut session = builder.build(
        peer,
        SessionHandler {
            mailboxes,
            max_bytes: cfg.max_message_bytes,
            max_rcpt: 100,
            tx: tx.clone(),
        },
    );
    let mut secure = false;
    conn.get_mut()
        .write_all(&session.greeting().buffer()?)
        .await?;
    let idle = Duration::from_secs(cfg.idle_timeout_secs);
    let mut line = Vec::with_capacity(1024);
    loop {
        line.clear();
        let read = {
            let mut limited = (&mut conn).take(MAX_LINE as u64);
            tokio::select! {
                _ = stop.changed() => Read::Stop,
                r = tokio::time::timeout(idle, limited.read_until(b'\n', &mut line)) => match r {
                    Ok(r) => Read::Line(r?),
                    Err(_) => Read::Idle,
                },
            }
        };
        let n = match read {
            Read::Line(n) => n,
            Read::Stop => {
                let _ = conn
                    .get_mut()
                    .write_all(b"421 4.3.2 Shutting down\r\n")
                    .await;
                return Ok(());
            }
            Read::Idle => {
                let _ = conn
                    .get_mut()
                    .write_all(b"421 4.4.2 Idle too long, closing\r\n")
                    .await;
                return Ok(());
            }
        };
        if n == 0 {
            return Ok(());
        }
        let out = conn.get_mut();
        if !line.ends_with(b"\n") {
            out.write_all(b"500 5.5.2 Line too long, closing\r\n")
                .await?;
            return Ok(());
        }
        // mailin refuses the null reverse path (`MAIL FROM:<>`, every bounce) as a syntax
        // error; it is valid SMTP (RFC 5321 §4.5.5), so it goes in under a placeholder that
        // the handler turns back into the empty sender.
        let in_data = tx.lock().unwrap_or_else(|p| p.into_inner()).in_data;
        if !in_data {
            if let Some(rewritten) = null_sender(&line) {
                line = rewritten;
            }
            if cfg.require_tls && !secure && is_mail_command(&line) {
                out.write_all(b"530 5.7.0 Must issue a STARTTLS command first\r\n")
                    .await?;
                continue;
            }
        }
        let response = session.process(&line);
        let finished = {
            let mut t = tx.lock().unwrap_or_else(|p| p.into_inner());
            if t.done {
                t.done = false;
                Some(std::mem::take(&mut *t))
            } else {
                None
            }
        };
        if let Some(t) = finished {
            let answer = finish(t, peer, cfg, &inbound, verifier, &rates).await;
            out.write_all(answer.as_bytes()).await?;
            continue;
        }
        match response.action {
            Action::NoReply => {}
            Action::Reply => out.write_all(&response.buffer()?).await?,
            Action::Close => {
                out.write_all(&response.buffer()?).await?;
                return Ok(());
            }
            Action::UpgradeTls => {
                let Some(acceptor) = &tls else {
                    out.write_all(b"454 4.7.0 TLS not available\r\n").await?;
                    continue;
                };
                out.write_all(&response.buffer()?).await?;
                // Commands pipelined after STARTTLS would cross into the encrypted session
                // (RFC 3207 §4.2): refuse them by closing.
                if !conn.buffer().is_empty() {
                    return Ok(());
                }
                let plain = conn.into_inner();
                let encrypted = acceptor.accept(plain).await?;
                conn = BufReader::new(Box::new(encrypted));
                session.tls_active();
                secure = true;
            }
        }
    }
}

/// `MAIL FROM:` (the start of a transaction).
fn is_mail_command(line: &[u8]) -> bool {
    line.len() >= 10 && line[..10].eq_ignore_ascii_case(b"MAIL FROM:")
}

/// The answer to the end of DATA.
async fn finish(
    t: Transaction,
    peer: IpAddr,
    cfg: &EmailConfig,
    inbound: &mpsc::Sender<MailIn>,
    verifier: &Verifier,
    rates: &Rates,
) -> String {
    if t.oversize {
        tracing::warn!(%peer, limit = cfg.max_message_bytes, "mail refused: larger than max_message_bytes (nothing stored)");
        return format!(
            "552 5.3.4 Message larger than {} bytes, not accepted\r\n",
            cfg.max_message_bytes
        );
    }
    if !rate_ok(rates, peer, cfg.max_messages_per_minute) {
        tracing::warn!(%peer, limit = cfg.max_messages_per_minute, "mail deferred: client over max_messages_per_minute");
        return "451 4.7.1 Too many messages from your address, try again later\r\n".into();
    }
    let auth = verifier.check(&t.data, peer, &t.helo, &t.mail_from).await;
    let (reply, answer) = oneshot::channel();
    let mail = MailIn {
        peer,
        helo: t.helo,
        mail_from: t.mail_from,
        rcpt: t.rcpt,
        raw: t.data,
        auth,
        verdict: reply,
    };
    if inbound.send(mail).await.is_err() {
        return "421 4.3.2 Shutting down\r\n".into();
    }
    match tokio::time::timeout(STORE_TIMEOUT, answer).await {
        Ok(Ok(Verdict::Stored)) => "250 2.0.0 Stored\r\n".into(),
        Ok(Ok(Verdict::TryLater(reason))) => format!("451 4.3.0 {}\r\n", one_line(&reason)),
        Ok(Ok(Verdict::Reject(code, reason))) => format!("{code} {}\r\n", one_line(&reason)),
        Ok(Err(_)) => "451 4.3.0 Not stored, try again later\r\n".into(),
        Err(_) => "451 4.3.0 Storage is slow, try again later\r\n".into(),
    }
}

/// Feeds `data` to a session with our handler as a client would (fuzzing): line by line with
/// the same null-sender rewrite, then once more inside a DATA phase.
pub(crate) fn fuzz_session(data: &[u8]) {
    let tx = Arc::new(Mutex::new(Transaction::default()));
    let ip = IpAddr::from([127, 0, 0, 1]);
    let mut session = SessionBuilder::new("fuzz.test").build(
        ip,
        SessionHandler {
            mailboxes: Arc::new(std::sync::RwLock::new(vec![
                "support@bridge.test".into(),
                "*@bridge.test".into(),
            ])),
            max_bytes: 4096,
            max_rcpt: 4,
            tx: tx.clone(),
        },
    );
    let prelude: &[&[u8]] = &[
        b"EHLO fuzz\r\n",
        b"MAIL FROM:<a@b>\r\n",
        b"RCPT TO:<support@bridge.test>\r\n",
        b"DATA\r\n",
    ];
    for pass in 0..2 {
        if pass == 1 {
            for l in prelude {
                session.process(l);
            }
        }
        for line in data.split_inclusive(|b| *b == b'\n').take(10_000) {
            let in_data = tx.lock().unwrap_or_else(|p| p.into_inner()).in_data;
            let rewritten = (!in_data).then(|| null_sender(line)).flatten();
            let _ = session.process(rewritten.as_deref().unwrap_or(line));
            let mut t = tx.lock().unwrap_or_else(|p| p.into_inner());
            if t.done {
                *t = Transaction::default();
            }
        }
        session.process(b"\r\n.\r\n");
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\r', '\n'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_null_sender_is_rewritten_only_in_mail_from() {
        assert_eq!(
            null_sender(b"MAIL FROM:<> SIZE=10\r\n").unwrap(),
            format!("MAIL FROM:<{NULL_SENDER}> SIZE=10\r\n").into_bytes()
        );
        assert!(null_sender(b"mail from: <>\r\n").is_some());
        assert!(null_sender(b"MAIL FROM:<a@b>\r\n").is_none());
        assert!(null_sender(b"RCPT TO:<>\r\n").is_none());
    }

    #[test]
    fn mailboxes_match_exactly_or_by_domain() {
        assert!(mailbox_matches(
            "Support@Bridge.test",
            "support@bridge.TEST"
        ));
        assert!(!mailbox_matches("support@bridge.test", "sales@bridge.test"));
        assert!(mailbox_matches("*@bridge.test", "sales@bridge.test"));
        assert!(!mailbox_matches("*@bridge.test", "sales@other.test"));
    }
}
