//! Endpoint identities: every bridged endpoint is an ordinary XMTP inbox whose keys are
//! derived from the bridge's secret seed and the endpoint's stable name, so the identity
//! survives reinstalls and is backed up as one 32-byte secret.

use std::path::Path;

use anyhow::Context;
use gatehouse_protocol::identity::{InstallationKey, Wallet};
use hkdf::Hkdf;
use sha2::Sha256;

/// Salt of the derivation; changing it changes every endpoint identity.
const SALT: &[u8] = b"gatehouse endpoint identity v1";

/// Loads the bridge seed from `path`, creating it (mode 0600) on first start.
pub fn load_or_create_seed(path: &Path) -> anyhow::Result<[u8; 32]> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let bytes = hex::decode(text.trim())
            .with_context(|| format!("{}: the seed must be 64 hex digits", path.display()))?;
        return bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("{}: the seed must be 32 bytes", path.display()));
    }
    let seed: [u8; 32] = rand::random();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    write_private(path, hex::encode(seed).as_bytes())
        .with_context(|| format!("writing seed {}", path.display()))?;
    tracing::info!(path = %path.display(), "created a new bridge seed; back it up: it is every endpoint's identity");
    Ok(seed)
}

/// Writes a new file readable only by its owner (secrets: seeds, keys).
#[cfg(unix)]
pub(crate) fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

#[cfg(not(unix))]
pub(crate) fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, data)
}

fn derive(seed: &[u8; 32], purpose: &str, name: &str, counter: u32) -> [u8; 32] {
    let hk = Hkdf::<Sha256>::new(Some(SALT), seed);
    let mut out = [0u8; 32];
    let info = format!("{purpose}\0{name}\0{counter}");
    // 32 bytes is far below HKDF-SHA256's output limit.
    hk.expand(info.as_bytes(), &mut out)
        .expect("HKDF output length");
    out
}

/// The wallet and installation key of an endpoint named `name` (e.g. `mqtt/devices/thermo-1`).
pub fn endpoint_keys(seed: &[u8; 32], name: &str) -> (Wallet, InstallationKey) {
    let mut counter = 0;
    let wallet = loop {
        // A derived scalar is invalid with probability ~2^-128; the counter makes it total.
        if let Ok(w) = Wallet::from_bytes(&derive(seed, "wallet", name, counter)) {
            break w;
        }
        counter += 1;
    };
    (
        wallet,
        InstallationKey::from_seed(&derive(seed, "installation", name, 0)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same seed and name give the same identity; another name gives another.
    #[test]
    fn deterministic() {
        let s = [3u8; 32];
        let (a, ia) = endpoint_keys(&s, "mqtt/devices/thermo-1");
        let (b, ib) = endpoint_keys(&s, "mqtt/devices/thermo-1");
        let (c, _) = endpoint_keys(&s, "mqtt/devices/thermo-2");
        assert_eq!(a.address(), b.address());
        assert_eq!(ia.public(), ib.public());
        assert_ne!(a.address(), c.address());
    }
}
