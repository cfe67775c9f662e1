//! Endpoint attestations: the bridge's signed statement "inbox E is endpoint ADDRESS on CHANNEL,
//! bridged by bridge inbox B".
//!
//! It travels as an `EncodedContent` parameter (`gatehouse.attestation`) on every message an
//! endpoint sends, so XMTP clients that don't know it simply ignore it, while Gatehouse clients
//! verify it: the signature is an Ed25519ph signature (context `GATEHOUSE ENDPOINT ATTESTATION`)
//! by an installation key that must be a live installation of the bridge inbox, and the
//! endpoint named must be the message's sender. The liveness check needs the bridge's identity
//! log, so it is the caller's (the client's) step.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512};

use crate::error::{ProtocolError, Result};
use crate::identity::InstallationKey;

/// The `EncodedContent` parameter that carries the attestation.
pub const PARAMETER: &str = "gatehouse.attestation";
/// Ed25519ph context of attestation signatures.
pub const CONTEXT: &[u8] = b"GATEHOUSE ENDPOINT ATTESTATION";

/// What a bridge asserts about one endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EndpointAttestation {
    /// The bridge's own inbox id.
    pub bridge: String,
    /// The endpoint's inbox id.
    pub endpoint: String,
    /// Channel kind (`mqtt`).
    pub channel: String,
    /// The endpoint's address on the channel (its topic, its email address).
    pub address: String,
    /// How the bridge authenticated the message's sender, where the channel can (email:
    /// DKIM, SPF, DMARC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender_auth: Option<SenderAuth>,
}

/// The bridge's finding about a message's sender.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SenderAuth {
    /// What the checks found, e.g. `dkim=pass spf=none dmarc=pass`.
    pub results: String,
    /// Whether the sender's address may be trusted as its identity.
    pub verified: bool,
}

#[derive(Serialize, Deserialize)]
struct Signed {
    v: u32,
    #[serde(flatten)]
    claim: EndpointAttestation,
    key: String,
    sig: String,
}

impl EndpointAttestation {
    fn text(&self) -> String {
        let mut t = format!(
            "Gatehouse endpoint attestation v1\nbridge: {}\nendpoint: {}\nchannel: {}\naddress: {}",
            self.bridge, self.endpoint, self.channel, self.address
        );
        // Absent for channels without sender authentication, so their signatures stay as
        // they were.
        if let Some(a) = &self.sender_auth {
            t.push_str(&format!(
                "\nsender_auth: {}\nsender_verified: {}",
                a.results, a.verified
            ));
        }
        t
    }

    /// Signs with the bridge's installation key; returns the parameter value.
    pub fn sign(&self, bridge_key: &InstallationKey) -> String {
        let mut prehash = Sha512::new();
        prehash.update(self.text().as_bytes());
        let sig = bridge_key.sign_prehashed(prehash, CONTEXT);
        let signed = Signed {
            v: 1,
            claim: self.clone(),
            key: hex::encode(bridge_key.public()),
            sig: hex::encode(sig),
        };
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&signed).unwrap_or_default())
    }

    /// Reads the claim without checking anything (to show what an invalid attestation claimed).
    pub fn parse_unverified(value: &str) -> Option<EndpointAttestation> {
        let bytes = URL_SAFE_NO_PAD.decode(value).ok()?;
        serde_json::from_slice::<Signed>(&bytes)
            .ok()
            .map(|s| s.claim)
    }

    /// Parses a parameter value and checks its signature. Returns the claim and the signing
    /// installation key; the caller must still check that the key is a live installation of
    /// `claim.bridge` and that `claim.endpoint` sent the message.
    pub fn verify_signature(value: &str) -> Result<(EndpointAttestation, Vec<u8>)> {
        let bytes = URL_SAFE_NO_PAD
            .decode(value)
            .map_err(|e| ProtocolError::malformed("attestation", e))?;
        let signed: Signed = serde_json::from_slice(&bytes)
            .map_err(|e| ProtocolError::malformed("attestation", e))?;
        if signed.v != 1 {
            return Err(ProtocolError::Unsupported(format!(
                "attestation version {}",
                signed.v
            )));
        }
        let key: [u8; 32] = hex::decode(&signed.key)
            .ok()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| ProtocolError::malformed("attestation", "key"))?;
        let sig: [u8; 64] = hex::decode(&signed.sig)
            .ok()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| ProtocolError::malformed("attestation", "signature"))?;
        let vk = VerifyingKey::from_bytes(&key)
            .map_err(|_| ProtocolError::malformed("attestation", "key is not a point"))?;
        let mut prehash = Sha512::new();
        prehash.update(signed.claim.text().as_bytes());
        vk.verify_prehashed_strict(
            prehash,
            Some(CONTEXT),
            &ed25519_dalek::Signature::from_bytes(&sig),
        )
        .map_err(|_| ProtocolError::Decrypt("attestation signature does not verify"))?;
        Ok((signed.claim, key.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A signed attestation verifies and names its key; a changed claim or another key's
    /// signature does not pass.
    #[test]
    fn sign_and_verify() {
        let bridge = InstallationKey::from_seed(&[1; 32]);
        let a = EndpointAttestation {
            bridge: "b".repeat(64),
            endpoint: "e".repeat(64),
            channel: "mqtt".into(),
            address: "devices/t/up".into(),
            sender_auth: None,
        };
        let value = a.sign(&bridge);
        let (claim, key) = EndpointAttestation::verify_signature(&value).unwrap();
        assert_eq!(claim, a);
        assert_eq!(key, bridge.public());
        // Tamper with the claim: the signature no longer covers it.
        let mut signed: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&value).unwrap()).unwrap();
        signed["address"] = "devices/other/up".into();
        let forged = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&signed).unwrap());
        assert!(EndpointAttestation::verify_signature(&forged).is_err());
        // Claim another key: the signature was not made by it.
        signed["address"] = "devices/t/up".into();
        signed["key"] = hex::encode(InstallationKey::from_seed(&[2; 32]).public()).into();
        let forged = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&signed).unwrap());
        assert!(EndpointAttestation::verify_signature(&forged).is_err());
    }
}
