//! Sender authentication: DKIM, SPF and DMARC (mail-auth), with DNS answers from config
//! before (or instead of) the system resolver.
//!
//! A sender is *verified* when the From domain is vouched for: DMARC passes, or, where the
//! domain publishes no DMARC record, a DKIM signature of an aligned domain (the From domain or
//! a parent of it) passes, or SPF passes for an aligned MAIL FROM domain.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Instant;

use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::verify::DomainKey;
use mail_auth::dmarc::Dmarc;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::spf::Spf;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, DkimResult, DmarcResult, MX, MessageAuthenticator, Parameters,
    ResolverCache, SpfResult, Txt,
};
use serde::{Deserialize, Serialize};

use super::config::DnsConfig;

/// What sender authentication found, as it travels with the message.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthResult {
    /// `pass`, `fail`, `none`, … for the best DKIM signature.
    pub dkim: String,
    /// SPF for the MAIL FROM domain.
    pub spf: String,
    /// DMARC for the From domain.
    pub dmarc: String,
    /// Whether the From address may be trusted as the sender's identity.
    pub verified: bool,
}

impl AuthResult {
    /// `dkim=pass spf=none dmarc=pass` (the shape of an Authentication-Results header).
    pub fn summary(&self) -> String {
        format!("dkim={} spf={} dmarc={}", self.dkim, self.spf, self.dmarc)
    }
}

/// Configured TXT records, and whether names outside them exist.
struct StaticTxt {
    records: HashMap<String, Txt>,
    exclusive: bool,
}

fn not_found() -> mail_auth::Error {
    mail_auth::Error::DnsRecordNotFound(
        mail_auth::hickory_resolver::proto::op::ResponseCode::NXDomain,
    )
}

impl ResolverCache<String, Txt> for StaticTxt {
    fn get<Q>(&self, name: &Q) -> Option<Txt>
    where
        String: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self.records.get(name) {
            Some(t) => Some(t.clone()),
            None if self.exclusive => Some(Txt::Error(not_found())),
            None => None,
        }
    }
    fn remove<Q>(&self, _: &Q) -> Option<Txt>
    where
        String: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        None
    }
    fn insert(&self, _: String, _: Txt, _: Instant) {}
}

/// Address lookups (SPF `a`/`mx`): nothing is known beyond the configured records, so with
/// the system resolver off every name has no addresses.
struct NoAddresses<V>(bool, std::marker::PhantomData<V>);

impl<K, V: Default> ResolverCache<K, V> for NoAddresses<V> {
    fn get<Q>(&self, _: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.then(V::default)
    }
    fn remove<Q>(&self, _: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        None
    }
    fn insert(&self, _: K, _: V, _: Instant) {}
}

/// Parses a configured TXT record into what its name is looked up as.
fn parse_record(name: &str, value: &str) -> Result<Txt, String> {
    let bytes = value.as_bytes();
    let err = |e: mail_auth::Error| format!("TXT record for {name}: {e}");
    if name.contains("._domainkey.") {
        Ok(Txt::DomainKey(Arc::new(
            DomainKey::parse(bytes).map_err(err)?,
        )))
    } else if name.starts_with("_dmarc.") {
        Ok(Txt::Dmarc(Arc::new(Dmarc::parse(bytes).map_err(err)?)))
    } else if value.trim_start().starts_with("v=spf1") {
        Ok(Txt::Spf(Arc::new(Spf::parse(bytes).map_err(err)?)))
    } else {
        Err(format!(
            "TXT record for {name}: expected a DKIM key (NAME under ._domainkey.), a DMARC \
             policy (NAME under _dmarc.) or an SPF record (v=spf1 …)"
        ))
    }
}

fn fqdn(name: &str) -> String {
    let mut n = name.trim().to_ascii_lowercase();
    if !n.ends_with('.') {
        n.push('.');
    }
    n
}

/// Checks senders.
pub struct Verifier {
    authenticator: MessageAuthenticator,
    txt: StaticTxt,
    host: String,
}

impl Verifier {
    /// Builds the verifier; a configured record that does not parse is an error naming it.
    pub fn new(dns: &DnsConfig, host: &str) -> Result<Self, String> {
        let mut records = HashMap::new();
        for (name, values) in &dns.records {
            // The first record of the right kind wins, as a resolver's answer would.
            let mut parsed = None;
            let mut last_err = None;
            for v in values {
                match parse_record(name, v) {
                    Ok(t) => {
                        parsed = Some(t);
                        break;
                    }
                    Err(e) => last_err = Some(e),
                }
            }
            match (parsed, last_err) {
                (Some(t), _) => {
                    records.insert(fqdn(name), t);
                }
                (None, Some(e)) => return Err(e),
                (None, None) => {}
            }
        }
        let authenticator = if dns.system {
            MessageAuthenticator::new_system_conf()
                .or_else(|_| MessageAuthenticator::new(Default::default(), Default::default()))
                .map_err(|e| format!("DNS resolver: {e}"))?
        } else {
            // Never asked: every name is answered from `records`.
            MessageAuthenticator::new(Default::default(), Default::default())
                .map_err(|e| format!("DNS resolver: {e}"))?
        };
        Ok(Self {
            authenticator,
            txt: StaticTxt {
                records,
                exclusive: !dns.system,
            },
            host: host.to_string(),
        })
    }

    /// Authenticates one message received from `ip` (HELO `helo`, MAIL FROM `mail_from`).
    pub async fn check(&self, raw: &[u8], ip: IpAddr, helo: &str, mail_from: &str) -> AuthResult {
        let Some(msg) = parse_authenticated(raw) else {
            return AuthResult {
                dkim: "none".into(),
                spf: "none".into(),
                dmarc: "none".into(),
                verified: false,
            };
        };
        let exclusive = self.txt.exclusive;
        let mx = NoAddresses::<Arc<Vec<MX>>>(exclusive, Default::default());
        let v4 = NoAddresses::<Arc<Vec<Ipv4Addr>>>(exclusive, Default::default());
        let v6 = NoAddresses::<Arc<Vec<Ipv6Addr>>>(exclusive, Default::default());
        let ptr = NoAddresses::<Arc<Vec<String>>>(exclusive, Default::default());

        let dkim = self
            .authenticator
            .verify_dkim(
                Parameters::new(&msg)
                    .with_txt_cache(&self.txt)
                    .with_mx_cache(&mx)
                    .with_ipv4_cache(&v4)
                    .with_ipv6_cache(&v6)
                    .with_ptr_cache(&ptr),
            )
            .await;
        let spf = if mail_from.is_empty() {
            // A bounce (null sender): SPF checks the HELO name.
            self.authenticator
                .verify_spf(
                    Parameters::new(SpfParameters::verify_ehlo(ip, helo, &self.host))
                        .with_txt_cache(&self.txt)
                        .with_mx_cache(&mx)
                        .with_ipv4_cache(&v4)
                        .with_ipv6_cache(&v6)
                        .with_ptr_cache(&ptr),
                )
                .await
        } else {
            self.authenticator
                .verify_spf(
                    Parameters::new(SpfParameters::verify_mail_from(
                        ip, helo, &self.host, mail_from,
                    ))
                    .with_txt_cache(&self.txt)
                    .with_mx_cache(&mx)
                    .with_ipv4_cache(&v4)
                    .with_ipv6_cache(&v6)
                    .with_ptr_cache(&ptr),
                )
                .await
        };
        let mail_from_domain = mail_from.rsplit_once('@').map_or(helo, |(_, d)| d);
        let dmarc = self
            .authenticator
            .verify_dmarc(
                Parameters::new(DmarcParameters::new(&msg, &dkim, mail_from_domain, &spf))
                    .with_txt_cache(&self.txt)
                    .with_mx_cache(&mx)
                    .with_ipv4_cache(&v4)
                    .with_ipv6_cache(&v6)
                    .with_ptr_cache(&ptr),
            )
            .await;

        let from_domain = msg
            .from
            .first()
            .and_then(|f| f.rsplit_once('@'))
            .map(|(_, d)| d.to_ascii_lowercase())
            .unwrap_or_default();
        let aligned = |d: &str| {
            let d = d.to_ascii_lowercase();
            !from_domain.is_empty() && (from_domain == d || from_domain.ends_with(&format!(".{d}")))
        };
        let dkim_pass_aligned = dkim.iter().any(|o| {
            o.result() == &DkimResult::Pass && o.signature().is_some_and(|s| aligned(&s.d))
        });
        let spf_pass_aligned = spf.result() == SpfResult::Pass && aligned(mail_from_domain);
        let dmarc_pass =
            dmarc.dkim_result() == &DmarcResult::Pass || dmarc.spf_result() == &DmarcResult::Pass;
        let has_dmarc = dmarc.dmarc_record().is_some();
        let verified = if has_dmarc {
            dmarc_pass
        } else {
            dkim_pass_aligned || spf_pass_aligned
        };
        let dkim_word = if dkim.iter().any(|o| o.result() == &DkimResult::Pass) {
            "pass".to_string()
        } else {
            dkim.first()
                .map(|o| match o.result() {
                    // mail-auth calls a body that no longer matches its signature neutral;
                    // for the reader (RFC 8601) the signature failed.
                    DkimResult::Neutral(mail_auth::Error::FailedBodyHashMatch) => "fail".into(),
                    r => word(&r.to_string()),
                })
                .unwrap_or_else(|| "none".into())
        };
        let dmarc_word = if !has_dmarc {
            "none".to_string()
        } else if dmarc_pass {
            "pass".into()
        } else {
            "fail".into()
        };
        AuthResult {
            dkim: dkim_word,
            spf: word(&spf.result().to_string()),
            dmarc: dmarc_word,
            verified,
        }
    }
}

/// mail-auth's parser, with a panic on hostile input turned into "not a message".
pub(crate) fn parse_authenticated(raw: &[u8]) -> Option<AuthenticatedMessage<'_>> {
    gatehouse_store::catch_quietly(|| AuthenticatedMessage::parse(raw))
        .ok()
        .flatten()
}

/// `fail; signature mismatch` → `fail`; `TempError` → `temperror`.
fn word(s: &str) -> String {
    s.split(';')
        .next()
        .unwrap_or("")
        .replace(' ', "")
        .to_ascii_lowercase()
}
