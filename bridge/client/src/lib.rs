//! The async XMTP client.
//!
//! Contract: one `Client` is one XMTP installation of one inbox. It talks to any XMTP v3 node
//! over gRPC and keeps everything it must not lose in one sled tree: its keys, the openmls
//! store (written back after every operation that changes it), the X-Wing seeds of its key
//! packages, its conversations and per-conversation cursors. Used by `gatehouse agent` and by
//! the daemon for every endpoint identity. It never logs keys or message plaintext.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

pub use channel::Channel;
use gatehouse_protocol::group::{self, Provider};
use gatehouse_protocol::identity::{self, InstallationKey, SoftPasskey, Wallet};
use gatehouse_protocol::{content, welcome};
use gatehouse_wire::Message as _;
use gatehouse_wire::associations::IdentifierKind;
use gatehouse_wire::identity_api::identity_api_client::IdentityApiClient;
use gatehouse_wire::message_contents::CommitResult;
use gatehouse_wire::mls_api::mls_api_client::MlsApiClient;
use gatehouse_wire::{identity_api as ipb, message_contents as mc, mls_api as mpb};

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The node refused or failed a call.
    #[error("node: {0}")]
    Node(Box<tonic::Status>),
    /// The node could not be reached.
    #[error("cannot reach node: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// Local state failed.
    #[error("local store: {0}")]
    Store(#[from] sled::Error),
    /// The protocol core refused something.
    #[error(transparent)]
    Protocol(#[from] gatehouse_protocol::ProtocolError),
    /// A peer is not usable (not registered, no key packages, unknown conversation).
    #[error("{0}")]
    Peer(String),
}

impl ClientError {
    /// Whether the node could not be reached or the connection to it broke (it stopped or is
    /// restarting): worth trying again later, unlike a refusal or local trouble.
    pub fn is_unreachable(&self) -> bool {
        match self {
            ClientError::Connect(_) => true,
            ClientError::Node(s) => {
                matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Cancelled)
                    || (s.code() == tonic::Code::Unknown && s.message().contains("transport"))
            }
            _ => false,
        }
    }
}

impl From<identity::AssociationError> for ClientError {
    fn from(e: identity::AssociationError) -> Self {
        ClientError::Protocol(e.into())
    }
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError::Node(Box::new(s))
    }
}

type Result<T, E = ClientError> = std::result::Result<T, E>;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A received message.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Received {
    /// Hex group id of the conversation.
    pub conversation: String,
    /// The node's message id.
    pub id: u64,
    /// Sender inbox id.
    pub sender_inbox: String,
    /// Sender installation key (hex).
    pub sender_installation: String,
    /// `authority/type:major.minor`.
    pub content_type: String,
    /// The text (text or JSON content, else the fallback).
    pub text: Option<String>,
    /// The raw content bytes.
    #[serde(skip)]
    pub content: Vec<u8>,
    /// Node timestamp, nanoseconds.
    pub sent_at_ns: u64,
    /// The sender's idempotency key.
    pub idempotency_key: String,
    /// XMTP's message id (hex), the reference replies and reactions use.
    pub message_id: String,
    /// From a conversation whose consent is `unknown`: the message waits in the request queue
    /// and is shown once, marked as a request (allowing does not show it again).
    #[serde(default)]
    pub request: bool,
    /// What a Gatehouse bridge attests about the sender, if the message carries an attestation.
    pub sender_endpoint: Option<SenderEndpoint>,
    /// With [`Client::set_retain_deliveries`]: the number to pass to [`Client::delivered`].
    #[serde(default)]
    pub delivery: Option<u64>,
}

/// What [`Client::send`] published.
#[derive(Debug, Clone)]
pub struct Sent {
    /// The idempotency key inside the envelope.
    pub idempotency_key: String,
    /// XMTP's message id (hex).
    pub message_id: String,
}

impl Received {
    /// Whether this is a transcript of a commit (`xmtp.org/group_updated`), derived locally
    /// rather than sent by anyone: shown to people, never forwarded to a device.
    pub fn is_transcript(&self) -> bool {
        self.content_type.starts_with("xmtp.org/group_updated:")
    }
}

/// A bridge's attestation about a sender, as checked by this client.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SenderEndpoint {
    /// The bridge's inbox id.
    pub bridge: String,
    /// Channel kind (`mqtt`).
    pub channel: String,
    /// The endpoint's channel address.
    pub address: String,
    /// True only if the signature verifies, the signing key is a live installation of the
    /// bridge inbox, and the attested endpoint is the sender.
    pub verified: bool,
    /// How the bridge authenticated the sender (email: DKIM/SPF/DMARC and whether the address
    /// is verified), as the bridge signed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender_auth: Option<gatehouse_protocol::attestation::SenderAuth>,
}

pub use gatehouse_store::flush_tree;

/// A gRPC channel to a node URL (`http://` or `https://`). It connects lazily: the first call
/// that needs the node reports an unreachable node, so purely local commands work offline.
pub async fn connect(url: &str) -> Result<Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| ClientError::Peer(format!("bad node URL {url}: {e}")))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .http2_keep_alive_interval(std::time::Duration::from_secs(16));
    Ok(Channel::remote(endpoint.connect_lazy()))
}

/// Digests ([`published_digest`]) of group messages clients published, recorded before each
/// publish, so that whoever follows the node's streams can tell its own messages coming back
/// from news (and remove them as they come back).
pub type PublishedSink = std::sync::Arc<std::sync::Mutex<std::collections::HashSet<u64>>>;

/// The digest of a group message's bytes as published (and as the node's streams return
/// them).
pub fn published_digest(data: &[u8]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    h.finish()
}

/// Past this many digests not seen back, a sink is emptied (bounded memory; the cost is a
/// read that finds only our own messages).
const PUBLISHED_SINK_MAX: usize = 100_000;

/// The writes of a read pass over several conversations, applied once at its end
/// ([`Client::read_pages`]) instead of once per conversation: the pages' retained copies,
/// "seen" marks and cursors. Any save of the MLS state takes them along
/// ([`Client::persist_mls`]), so the state never gets ahead of the cursors on disk.
#[derive(Default)]
struct Deferred {
    batch: gatehouse_store::Writes,
    /// The cursors written in `batch`: what [`Client::read_cursor`] answers until it is applied.
    cursors: std::collections::HashMap<Vec<u8>, u64>,
    /// The message ids marked seen in `batch` (see [`Client::first_sight`]).
    seen: std::collections::HashSet<String>,
    /// Messages read into `batch`: past [`DEFER_MAX`] it is applied.
    messages: usize,
    /// The signature checks of the messages delivered from `batch`, done together before it
    /// is applied ([`Client::persist_with`]).
    checks: Vec<PendingCheck>,
    /// Messages whose check failed (conversation, node id): the read pass leaves them out of
    /// what it returns.
    refused: std::collections::HashSet<(String, u64)>,
}

/// A delivered message whose signature is not checked yet, and what of it is in the
/// deferred write (taken back out if the check fails).
struct PendingCheck {
    conversation: String,
    id: u64,
    delivery: Option<u64>,
    message_id: String,
    /// Its "seen" mark's number, when it has one.
    seen: Option<u64>,
    check: gatehouse_protocol::mls_crypto::SignatureCheck,
}

/// The most messages a read pass reads before it writes (see [`Deferred`]): bounds its memory
/// and the size of one write.
const DEFER_MAX: usize = 1024;

/// One installation of one inbox.
pub struct Client {
    tree: sled::Tree,
    /// Message ids seen in the read under way, written with its cursor.
    unsaved_seen: Vec<String>,
    /// The last numbers handed out by the counters written with a read's batch (`seen`,
    /// `deliv`; see [`Client::next_seq_in`]).
    batch_seqs: BTreeMap<&'static str, u64>,
    /// A read pass's writes not applied yet (see [`Client::read_pages`]).
    deferred: std::sync::Mutex<Deferred>,
    mls: MlsApiClient<Channel>,
    ids: IdentityApiClient<Channel>,
    provider: Provider,
    owner: Owner,
    key: InstallationKey,
    inbox_id: String,
    /// How long rotated-out key packages stay usable.
    key_package_grace: std::time::Duration,
    /// Fault injection: fail right after publishing a commit, before merging it.
    crash_after_commit_publish: bool,
    /// Where the digests of the group messages it publishes go (see [`PublishedSink`]).
    published: Option<PublishedSink>,
    /// Whether messages from `unknown` conversations are held (else dropped).
    hold_unknown: bool,
    /// Whether returned messages are also kept (`deliv/`) until [`Client::delivered`].
    retain: bool,
    /// Whether a newly held message is also returned once, marked as a request.
    surface_requests: bool,
    /// Bound of the request queue.
    max_requests: usize,
    /// Messages in the request queue, once counted (kept up to date by `hold` and
    /// `release_requests`, so holding a message does not scan the queue).
    held_len: Option<usize>,
    /// Bumped whenever the consent list changes; held requests are looked at again only
    /// then (a read does not deserialize the whole queue each time).
    consent_version: std::sync::atomic::AtomicU64,
    /// The `consent_version` the request queue was last released at.
    released_version: u64,
    /// When this installation last looked for siblings to sync consent with.
    last_sync_group_check: Option<std::time::Instant>,
    /// When each conversation's membership was last brought up to date (in this process).
    membership_checked: std::collections::HashMap<Vec<u8>, std::time::Instant>,
    /// Attestations whose signature verified, by value: a bridge signs the same statement for
    /// every message of an endpoint (Ed25519 is deterministic), so each is verified once.
    /// Bounded by [`ATTESTATION_CACHE`]; liveness of the signing key is still checked per read.
    attestations: std::collections::HashMap<
        String,
        (
            gatehouse_protocol::attestation::EndpointAttestation,
            Vec<u8>,
        ),
    >,
    /// Identity states folded from the node's logs, with the sequence id they reach (see
    /// [`Client::inbox_state`]).
    identities: std::collections::HashMap<String, (identity::InboxState, u64)>,
    /// Who created each conversation, from its immutable metadata: consent asks it for every
    /// conversation a read delivers from, and reading it means loading the whole MLS group.
    /// Bounded by [`CREATOR_CACHE`].
    creators: std::sync::Mutex<std::collections::HashMap<Vec<u8>, String>>,
    /// Bumped whenever a conversation is added or removed: a [`Listener`] subscribed to an
    /// older set subscribes again.
    conversations_gen: u64,
    /// The inboxes whose identity states the last messages read in each conversation needed
    /// (senders, attesting bridges): a streamed read pass asks for them all in one request
    /// ([`Client::read_pages`]). Hints only; emptied when [`SENDER_HINTS`] is reached.
    senders: std::collections::HashMap<Vec<u8>, Vec<String>>,
}

/// Conversations whose recent senders are kept (see `Client::senders`).
const SENDER_HINTS: usize = 4096;

/// Messages asked of the node per query when reading a conversation.
const PAGE: u32 = 100;

/// Conversations whose first pages a read pass asks the node for at once.
const READ_AHEAD: usize = 32;

/// The query for up to `limit` messages of a conversation after `cursor`, oldest first.
/// Where the node placed what was published, from its answer's header (Gatehouse's node).
fn placed_in(answer: &tonic::Response<()>) -> Option<Vec<(u64, u64)>> {
    let value = answer
        .metadata()
        .get(gatehouse_protocol::placed::HEADER)?
        .to_str()
        .ok()?;
    gatehouse_protocol::placed::decode(value)
}

fn page_query(gid: &[u8], cursor: u64, limit: u32) -> mpb::QueryGroupMessagesRequest {
    mpb::QueryGroupMessagesRequest {
        group_id: gid.to_vec(),
        paging_info: Some(mpb::PagingInfo {
            direction: mpb::SortDirection::Ascending as i32,
            limit,
            id_cursor: cursor,
        }),
    }
}

/// Verified attestations kept (see `Client::attestations`); the cache is emptied when full.
const ATTESTATION_CACHE: usize = 1024;

/// Conversations whose creator is kept in memory (about 100 bytes each); emptied when full.
const CREATOR_CACHE: usize = 65_536;

/// Inboxes whose folded identity state is kept (see [`Client::inbox_state`]); emptied when full.
const IDENTITY_CACHE: usize = 1024;

/// How often a read or a send brings a conversation's membership up to date (new or revoked
/// installations; leave and re-add requests are acted on at once); a full read
/// ([`Client::sync_all`]) of a conversation with new messages always does, a streamed read
/// ([`Client::listen`]) at this interval. libxmtp looks before a send at most every 5 s.
const MEMBERSHIP_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Who owns (and recovers) the inbox: a wallet or a passkey.
#[derive(Clone, Debug)]
pub enum Owner {
    /// An Ethereum wallet (ERC-191).
    Wallet(Wallet),
    /// A WebAuthn P-256 passkey.
    Passkey(SoftPasskey),
}

impl Owner {
    fn signer(&self) -> identity::SignerRef<'_> {
        match self {
            Owner::Wallet(w) => identity::SignerRef::Wallet(w),
            Owner::Passkey(p) => identity::SignerRef::Passkey(p),
        }
    }

    /// The public identifier: `0x` address or hex passkey key.
    pub fn identifier(&self) -> String {
        self.signer().member().to_string()
    }
}

/// How long a key package is used before it is replaced even without welcomes.
pub const KEY_PACKAGE_ROTATION: std::time::Duration =
    std::time::Duration::from_secs(30 * 24 * 3600);
/// How long a replaced key package stays usable (welcomes to it may still be in flight).
pub const KEY_PACKAGE_GRACE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

const K_PASSKEY: &[u8] = b"id/passkey";
const K_PASSKEY_ORIGIN: &[u8] = b"id/passkey-origin";

const K_WALLET: &[u8] = b"id/wallet";
const K_INSTALLATION: &[u8] = b"id/installation";
const K_MLS: &[u8] = b"mls";
const K_WELCOME_CURSOR: &[u8] = b"cursor/welcome";
/// How many received message ids each installation remembers to drop duplicates (a retried
/// publish arrives within moments; this covers far more than any retry window).
pub const SEEN_WINDOW: u64 = 100_000;

/// Where each entry of the MLS state is stored: this prefix, then the entry's key.
const MLS_ENTRY_PREFIX: &[u8] = b"mlsk/";
/// Entries at least this long are stored compressed.
const COMPRESS_FROM: usize = 512;

/// How a stored MLS entry (or an earlier version's whole state) begins when it is compressed
/// (a zstd frame). An uncompressed entry is binary (first byte 0) or JSON and never begins so;
/// an uncompressed whole state begins with the length of its first key (so `00 00`).
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// An MLS state entry as stored. Entries in the binary encoding are mostly keys and secrets
/// and stored as they are; long JSON ones (byte strings as arrays of numbers, as openmls and
/// earlier versions encoded them: the tree, key packages and message secrets of a DM are
/// 3–16 KiB each) are compressed, to about a quarter.
fn encode_mls_entry(raw: &[u8]) -> Result<Vec<u8>> {
    if raw.len() < COMPRESS_FROM || raw.first() == Some(&gatehouse_protocol::mls_store::BINARY) {
        return Ok(raw.to_vec());
    }
    zstd::bulk::compress(raw, 1)
        .map_err(|e| ClientError::Peer(format!("compressing the MLS state: {e}")))
}

/// An MLS entry (or an earlier version's whole state) from its stored form.
fn decode_mls_entry(stored: &[u8]) -> Result<Vec<u8>> {
    if stored.starts_with(&ZSTD_MAGIC) {
        zstd::stream::decode_all(stored).map_err(|e| {
            ClientError::Peer(format!(
                "the stored MLS state is corrupt (decompressing: {e})"
            ))
        })
    } else {
        Ok(stored.to_vec())
    }
}

/// The MLS state stored in `tree`. Earlier versions stored it whole under one key, rewritten
/// at every send and read; such a state is split into entries here, once, atomically.
fn load_mls_store(tree: &sled::Tree) -> Result<group::MlsStore> {
    if let Some(whole) = tree.get(K_MLS)? {
        let entries = group::storage_entries(&decode_mls_entry(&whole)?)?;
        let mut batch = sled::Batch::default();
        // Entries left by a newer version that this state's writer did not know are stale.
        for item in tree.scan_prefix(MLS_ENTRY_PREFIX) {
            batch.remove(item?.0);
        }
        for (k, v) in &entries {
            batch.insert([MLS_ENTRY_PREFIX, k].concat(), encode_mls_entry(v)?);
        }
        batch.remove(K_MLS);
        tree.apply_batch(batch)?;
        return Ok(group::MlsStore::from_entries(entries));
    }
    let mut entries = Vec::new();
    for item in tree.scan_prefix(MLS_ENTRY_PREFIX) {
        let (k, v) = item?;
        entries.push((k[MLS_ENTRY_PREFIX.len()..].to_vec(), decode_mls_entry(&v)?));
    }
    Ok(group::MlsStore::from_entries(entries))
}

fn stored_u64(tree: &sled::Tree, key: &[u8]) -> Result<u64> {
    Ok(tree
        .get(key)?
        .map(|v| u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])))
        .unwrap_or(0))
}

/// The conversations an installation's store knows (group id → peer inbox for DMs), read
/// without opening it (see [`Client::conversations`]).
pub fn stored_conversations(tree: &sled::Tree) -> Result<Vec<(Vec<u8>, String)>> {
    let mut out = Vec::new();
    for item in tree.scan_prefix(b"conv/") {
        let (k, v) = item?;
        out.push((k[5..].to_vec(), String::from_utf8_lossy(&v).into_owned()));
    }
    Ok(out)
}

/// The node id of the last message of `gid` the installation in `tree` has read (0: none).
pub fn stored_group_cursor(tree: &sled::Tree, gid: &[u8]) -> Result<u64> {
    stored_u64(tree, &[b"cursor/g/".as_slice(), gid].concat())
}

/// The node id of the last welcome the installation in `tree` has read (0: none).
pub fn stored_welcome_cursor(tree: &sled::Tree) -> Result<u64> {
    stored_u64(tree, K_WELCOME_CURSOR)
}

/// The public installation key stored in `tree`, if it holds an installation.
pub fn stored_installation_key(tree: &sled::Tree) -> Result<Option<[u8; 32]>> {
    let Some(seed) = tree.get(K_INSTALLATION)? else {
        return Ok(None);
    };
    let seed: [u8; 32] = seed
        .as_ref()
        .try_into()
        .map_err(|_| ClientError::Peer("stored installation key is corrupt".into()))?;
    Ok(Some(InstallationKey::from_seed(&seed).public()))
}

/// Whether the installation in `tree` has work of its own waiting, whatever the node holds:
/// retained messages not yet marked delivered, or a re-add or leave request to carry out.
pub fn stored_work_waiting(tree: &sled::Tree) -> Result<bool> {
    for prefix in [b"deliv/".as_slice(), b"readd/", b"leave/"] {
        if tree.scan_prefix(prefix).next().transpose()?.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

impl Client {
    /// Opens the installation stored in `tree`, creating keys on first use (the wallet from
    /// `wallet` when given, else random). Does not talk to the node; call `register`.
    pub fn open(
        tree: sled::Tree,
        channel: Channel,
        wallet: Option<Wallet>,
        installation: Option<InstallationKey>,
    ) -> Result<Self> {
        Self::open_owned(tree, channel, wallet.map(Owner::Wallet), installation)
    }

    /// Like [`Client::open`], for any owner kind. A stored owner always wins over `owner`.
    pub fn open_owned(
        tree: sled::Tree,
        channel: Channel,
        owner: Option<Owner>,
        installation: Option<InstallationKey>,
    ) -> Result<Self> {
        let stored_passkey = match (tree.get(K_PASSKEY)?, tree.get(K_PASSKEY_ORIGIN)?) {
            (Some(sk), Some(origin)) => Some(SoftPasskey::from_bytes(
                &sk,
                &String::from_utf8_lossy(&origin),
            )?),
            _ => None,
        };
        let (owner, wallet) = match (stored_passkey, tree.get(K_WALLET)?, owner) {
            (Some(p), _, _) => (Some(Owner::Passkey(p)), None),
            (None, None, Some(Owner::Passkey(p))) => {
                tree.insert(K_PASSKEY, &p.to_bytes())?;
                tree.insert(K_PASSKEY_ORIGIN, p.origin().as_bytes())?;
                (Some(Owner::Passkey(p)), None)
            }
            // A home that already holds a wallet keeps it: its identity does not change.
            (None, Some(_), Some(Owner::Passkey(_))) => {
                return Err(ClientError::Peer(
                    "this home already holds a wallet identity; use a new home for a passkey"
                        .into(),
                ));
            }
            (None, _, Some(Owner::Wallet(w))) => (None, Some(w)),
            (None, _, None) => (None, None),
        };
        let owner = match owner {
            Some(o) => o,
            None => Owner::Wallet(match tree.get(K_WALLET)? {
                Some(sk) => Wallet::from_bytes(&sk)?,
                None => {
                    let w = match wallet {
                        Some(w) => w,
                        None => loop {
                            let mut sk = [0u8; 32];
                            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut sk);
                            if let Ok(w) = Wallet::from_bytes(&sk) {
                                break w;
                            }
                        },
                    };
                    tree.insert(K_WALLET, &w.to_bytes())?;
                    w
                }
            }),
        };
        let key = match tree.get(K_INSTALLATION)? {
            Some(seed) => InstallationKey::from_seed(
                &seed
                    .as_ref()
                    .try_into()
                    .map_err(|_| ClientError::Peer("stored installation key is corrupt".into()))?,
            ),
            None => {
                let k = installation.unwrap_or_else(|| {
                    let mut seed = [0u8; 32];
                    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
                    InstallationKey::from_seed(&seed)
                });
                tree.insert(K_INSTALLATION, &k.seed())?;
                k
            }
        };
        let provider = group::Provider::with_storage(load_mls_store(&tree)?);
        let inbox_id = identity::inbox_id(&owner.identifier(), 1);
        Ok(Self {
            tree,
            mls: MlsApiClient::new(channel.clone()).max_decoding_message_size(32 << 20),
            ids: IdentityApiClient::new(channel),
            provider,
            owner,
            key,
            inbox_id,
            key_package_grace: KEY_PACKAGE_GRACE,
            crash_after_commit_publish: false,
            published: None,
            hold_unknown: true,
            retain: false,
            surface_requests: true,
            max_requests: consent::MAX_REQUESTS,
            held_len: None,
            consent_version: std::sync::atomic::AtomicU64::new(1),
            released_version: 0,
            last_sync_group_check: None,
            membership_checked: Default::default(),
            attestations: Default::default(),
            conversations_gen: 0,
            identities: Default::default(),
            creators: Default::default(),
            senders: Default::default(),
            unsaved_seen: Vec::new(),
            batch_seqs: BTreeMap::new(),
            deferred: Default::default(),
        })
    }

    /// This inbox's id.
    pub fn inbox_id(&self) -> &str {
        &self.inbox_id
    }

    /// This inbox's wallet address.
    pub fn address(&self) -> String {
        self.owner.identifier()
    }

    /// This installation's public key.
    pub fn installation_key(&self) -> [u8; 32] {
        self.key.public()
    }

    /// Saves the MLS state's entries changed since the last save, with a read pass's
    /// deferred writes.
    fn persist_mls(&self) -> Result<()> {
        let batch = std::mem::take(&mut self.deferred().batch);
        self.persist_with(batch)
    }

    /// Applies `batch` (holding the deferred writes, taken) with the MLS state's changes;
    /// the deferred cursors are then on disk.
    fn persist_with(&self, mut batch: gatehouse_store::Writes) -> Result<()> {
        self.settle_checks(&mut batch);
        let result = self.apply_with_mls(batch);
        let mut d = self.deferred();
        d.cursors.clear();
        d.seen.clear();
        d.messages = 0;
        result
    }

    /// Checks the signatures of the deferred messages (one batch; one by one if it fails)
    /// before `batch` (holding their writes) is applied, and takes out of it what does not
    /// verify: the retained copy and the "seen" mark; the read pass then leaves the message
    /// out of what it returns (`Deferred::refused`).
    fn settle_checks(&self, batch: &mut gatehouse_store::Writes) {
        let mut d = self.deferred();
        if d.checks.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut d.checks);
        let checks: Vec<_> = pending.iter().map(|p| &p.check).collect();
        let held = gatehouse_protocol::mls_crypto::verify_all(&checks);
        for (p, ok) in pending.iter().zip(held) {
            if ok {
                continue;
            }
            tracing::warn!(conversation = %p.conversation, id = p.id, "rejected a message whose signature does not verify");
            if let Some(seq) = p.delivery {
                batch.remove(consent::seq_key(b"deliv/", seq));
            }
            if let Some(seq) = p.seen {
                batch.remove([b"seen/".as_slice(), p.message_id.as_bytes()].concat());
                batch.remove(consent::seq_key(b"seenq/", seq));
            }
            d.seen.remove(&p.message_id);
            d.refused.insert((p.conversation.clone(), p.id));
        }
    }

    fn deferred(&self) -> std::sync::MutexGuard<'_, Deferred> {
        self.deferred.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `batch` with the MLS state's changed entries added to it, atomically. If the
    /// write fails, the entries count as unsaved and go with the next one.
    fn apply_with_mls(&self, mut batch: gatehouse_store::Writes) -> Result<()> {
        let store = self.provider.store();
        let changes = store.take_changes();
        let mut keys = Vec::with_capacity(changes.len());
        let mut staged = Ok(());
        for (k, v) in changes {
            let stored_key = [MLS_ENTRY_PREFIX, &k].concat();
            match v.as_deref().map(encode_mls_entry).transpose() {
                Ok(Some(v)) => batch.insert(stored_key, v),
                Ok(None) => batch.remove(stored_key),
                Err(e) => staged = Err(e),
            }
            keys.push(k);
        }
        let result = staged.and_then(|()| Ok(batch.apply(&self.tree)?));
        if result.is_err() {
            store.mark_unsaved(keys);
        }
        result
    }

    /// Registers the inbox and this installation on the node if needed, and makes sure the
    /// node has a key package for it.
    pub async fn register(&mut self) -> Result<()> {
        let log = self.identity_log(&self.inbox_id.clone(), 0).await?;
        let state = identity::fold(log.iter().map(|(_, u)| u))?;
        let registered = state
            .as_ref()
            .is_some_and(|s| s.has_installation(&self.key.public()));
        if !registered && state.is_some() && self.tree.get(b"id/registered")?.is_some() {
            // Registered once, and the inbox still lists it no more: revoked. It does not
            // re-add itself. (An inbox the node does not know at all is registered anew.)
            return Err(ClientError::Peer(format!(
                "this installation ({}) was revoked from inbox {}; use a new home to add a new installation",
                hex::encode(self.key.public()),
                self.inbox_id
            )));
        }
        if !registered {
            let update = match &state {
                // A further installation of an existing inbox: the wallet adds it (XMTP's flow
                // when an app starts with a wallet that already has an inbox).
                Some(st) => {
                    if !st.members.contains_key(&self.owner.signer().member())
                        && st.recovery != self.owner.identifier()
                    {
                        return Err(ClientError::Peer(format!(
                            "wallet {} is no longer a member of inbox {}; it cannot add installations",
                            self.owner.identifier(),
                            self.inbox_id
                        )));
                    }
                    identity::build_update(
                        &self.inbox_id,
                        now_ns(),
                        &[identity::Pending::Add {
                            existing: self.owner.signer(),
                            new: identity::SignerRef::Installation(&self.key),
                        }],
                    )
                }
                None => identity::register_inbox_with(self.owner.signer(), 1, &self.key, now_ns()),
            };
            self.ids
                .publish_identity_update(ipb::PublishIdentityUpdateRequest {
                    identity_update: Some(update),
                })
                .await?;
            tracing::info!(inbox = %self.inbox_id, "inbox registered");
        }
        self.tree.insert(b"id/registered", &[1])?;
        // Make sure the node holds a key package for us (it may be a new or wiped node).
        let held = self
            .mls
            .fetch_key_packages(mpb::FetchKeyPackagesRequest {
                installation_keys: vec![self.key.public().to_vec()],
            })
            .await?
            .into_inner()
            .key_packages
            .first()
            .is_some_and(|k| !k.key_package_tls_serialized.is_empty());
        if !held || self.tree.get(b"kp/current")?.is_none() {
            self.upload_key_package().await?;
        }
        Ok(())
    }

    async fn upload_key_package(&mut self) -> Result<()> {
        let kp = group::build_key_package(
            &self.provider,
            &self.inbox_id,
            &self.key,
            &mut rand::rngs::OsRng,
        )?;
        let v = group::validate_key_package(&self.provider, &kp.tls)?;
        let pk = v
            .wrapper_public_key
            .ok_or_else(|| ClientError::Peer("own key package lacks a wrapper key".into()))?;
        // Seeds are stored before the upload so a welcome to this key can always be opened.
        self.tree
            .insert([b"wrap/".as_slice(), &pk].concat(), &kp.wrapper_seed)?;
        self.persist_mls()?;
        self.mls
            .upload_key_package(mpb::UploadKeyPackageRequest {
                key_package: Some(mpb::KeyPackageUpload {
                    key_package_tls_serialized: kp.tls,
                }),
                is_inbox_id_credential: true,
            })
            .await?;
        // The previous package stays usable for a grace period (welcomes may be in flight),
        // then its private keys are deleted (`expire_key_packages`).
        if let Some(old) = self.tree.insert(b"kp/current", kp.reference.clone())? {
            self.tree.insert(
                [b"kp/old/".as_slice(), &old].concat(),
                &now_ns().to_be_bytes(),
            )?;
        }
        self.tree.insert(
            [b"kp/wrap/".as_slice(), &kp.reference].concat(),
            pk.as_slice(),
        )?;
        self.tree.insert(b"kp/created", &now_ns().to_be_bytes())?;
        flush_tree(&self.tree).await?;
        Ok(())
    }

    /// Rotates the key package when it is older than [`KEY_PACKAGE_ROTATION`] and deletes the
    /// private keys of packages rotated out more than `key_package_grace` ago.
    async fn expire_key_packages(&mut self) -> Result<()> {
        let now = now_ns();
        let created = self
            .tree
            .get(b"kp/created")?
            .map(|v| u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])))
            .unwrap_or(now);
        if now.saturating_sub(created) > KEY_PACKAGE_ROTATION.as_nanos() as u64 {
            self.upload_key_package().await?;
        }
        let grace = self.key_package_grace.as_nanos() as u64;
        let mut expired = Vec::new();
        for item in self.tree.scan_prefix(b"kp/old/") {
            let (k, v) = item?;
            let rotated = u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8]));
            if now.saturating_sub(rotated) >= grace {
                expired.push(k[b"kp/old/".len()..].to_vec());
            }
        }
        for reference in &expired {
            group::delete_key_package(&self.provider, reference)?;
            if let Some(pk) = self
                .tree
                .remove([b"kp/wrap/".as_slice(), reference].concat())?
            {
                self.tree.remove([b"wrap/".as_slice(), &pk].concat())?;
            }
            self.tree
                .remove([b"kp/old/".as_slice(), reference].concat())?;
            tracing::debug!(key_package = %hex::encode(reference), "old key package deleted");
        }
        if !expired.is_empty() {
            self.persist_mls()?;
        }
        Ok(())
    }

    /// Sets how long a rotated-out key package stays usable (default [`KEY_PACKAGE_GRACE`]).
    pub fn set_key_package_grace(&mut self, grace: std::time::Duration) {
        self.key_package_grace = grace;
    }

    /// Fault injection for tests: the next commit fails right after it is published, before
    /// it is merged (as if the process stopped there).
    #[doc(hidden)]
    pub fn crash_after_commit_publish(&mut self, on: bool) {
        self.crash_after_commit_publish = on;
    }

    /// Whether this installation still holds the private keys of key package `reference`.
    pub fn holds_key_package(&self, reference: &[u8]) -> bool {
        group::has_key_package(&self.provider, reference)
    }

    /// The reference of the key package currently on the node.
    pub fn current_key_package(&self) -> Result<Option<Vec<u8>>> {
        Ok(self.tree.get(b"kp/current")?.map(|v| v.to_vec()))
    }

    async fn publish(
        &mut self,
        update: gatehouse_wire::associations::IdentityUpdate,
    ) -> Result<()> {
        self.ids
            .publish_identity_update(ipb::PublishIdentityUpdateRequest {
                identity_update: Some(update),
            })
            .await?;
        Ok(())
    }

    /// This inbox's verified state.
    pub async fn identity(&mut self) -> Result<identity::InboxState> {
        let id = self.inbox_id.clone();
        Ok(self.inbox_state(&id).await?.0)
    }

    /// Revokes an installation of this inbox (this home's wallet must be the recovery address).
    pub async fn revoke_installation(&mut self, installation: &[u8]) -> Result<()> {
        let st = self.identity().await?;
        if st.recovery != self.owner.identifier() {
            return Err(ClientError::Peer(format!(
                "only the recovery address {} may revoke; this home holds {}",
                st.recovery,
                self.owner.identifier()
            )));
        }
        if !st.has_installation(installation) {
            return Err(ClientError::Peer(format!(
                "{} is not a live installation of inbox {}",
                hex::encode(installation),
                self.inbox_id
            )));
        }
        let update = identity::build_update(
            &self.inbox_id,
            now_ns(),
            &[identity::Pending::Revoke {
                recovery: self.owner.signer(),
                member: identity::Member::Installation(installation.to_vec()),
            }],
        );
        self.publish(update).await
    }

    /// Hands recovery of this inbox to another address (this home's wallet must hold it now).
    pub async fn change_recovery(&mut self, new_address: &str) -> Result<()> {
        let new_address = identity::normalize_address(new_address)?;
        let update = identity::build_update(
            &self.inbox_id,
            now_ns(),
            &[identity::Pending::ChangeRecovery {
                recovery: self.owner.signer(),
                new_recovery: new_address,
            }],
        );
        self.publish(update).await
    }

    /// An inbox's identity log after sequence id `after`: `(sequence id, update)`.
    async fn identity_log(
        &mut self,
        inbox: &str,
        after: u64,
    ) -> Result<Vec<(u64, gatehouse_wire::associations::IdentityUpdate)>> {
        let resp = self
            .ids
            .get_identity_updates(ipb::GetIdentityUpdatesRequest {
                requests: vec![ipb::get_identity_updates_request::Request {
                    inbox_id: inbox.into(),
                    sequence_id: after,
                }],
            })
            .await?
            .into_inner();
        Ok(resp
            .responses
            .into_iter()
            .flat_map(|r| r.updates)
            .filter_map(|u| u.update.map(|up| (u.sequence_id, up)))
            .collect())
    }

    /// The verified state of another inbox and its latest sequence id. The log is read from
    /// the node every time (a revocation counts at once), but only past the last update this
    /// client already verified for the inbox: identity logs only grow, so the state folded so
    /// far is kept ([`IDENTITY_CACHE`]) and the new updates applied to it — not the whole
    /// log's signatures checked again on every read.
    pub async fn inbox_state(&mut self, inbox: &str) -> Result<(identity::InboxState, u64)> {
        let after = self.identities.get(inbox).map_or(0, |(_, seq)| *seq);
        let updates = self.identity_log(inbox, after).await?;
        self.fold_identity(inbox, after, updates)
    }

    /// Folds a batched identity-log answer for `wanted` (asked from the sequence ids kept
    /// for them) into states, as [`Client::inbox_state`] does one. An inbox whose log is
    /// missing or does not verify is left out, and so is everything when the node could not
    /// answer: asking for one alone later says why.
    fn fold_states(
        &mut self,
        wanted: &[String],
        answer: std::result::Result<
            tonic::Response<ipb::GetIdentityUpdatesResponse>,
            tonic::Status,
        >,
    ) -> BTreeMap<String, identity::InboxState> {
        let mut out = BTreeMap::new();
        let Ok(answer) = answer else {
            return out;
        };
        for r in answer.into_inner().responses {
            if !wanted.contains(&r.inbox_id) {
                continue;
            }
            let after = self.identities.get(&r.inbox_id).map_or(0, |(_, seq)| *seq);
            let updates = r
                .updates
                .into_iter()
                .filter_map(|u| u.update.map(|up| (u.sequence_id, up)))
                .collect();
            if let Ok((st, _)) = self.fold_identity(&r.inbox_id, after, updates) {
                out.insert(r.inbox_id, st);
            }
        }
        out
    }

    /// Applies an inbox's log updates that follow `after` to the state kept for it (none when
    /// `after` is 0) and keeps the result.
    fn fold_identity(
        &mut self,
        inbox: &str,
        after: u64,
        updates: Vec<(u64, gatehouse_wire::associations::IdentityUpdate)>,
    ) -> Result<(identity::InboxState, u64)> {
        let mut st = match self.identities.get(inbox) {
            Some((st, seq)) if *seq == after => Some(st.clone()),
            _ if after == 0 => None,
            _ => {
                return Err(ClientError::Peer(format!(
                    "inbox {inbox}: its kept identity state moved while it was read"
                )));
            }
        };
        let mut last = after;
        for (seq, update) in updates {
            st = Some(identity::apply_update(st.as_ref(), &update)?);
            last = seq;
        }
        let st = st.ok_or_else(|| ClientError::Peer(format!("inbox {inbox} is not registered")))?;
        if last != after || !self.identities.contains_key(inbox) {
            if self.identities.len() >= IDENTITY_CACHE {
                self.identities.clear();
            }
            self.identities
                .insert(inbox.to_string(), (st.clone(), last));
        }
        Ok((st, last))
    }

    /// Resolves `0x…` addresses to inbox ids; inbox ids pass through.
    pub async fn resolve(&mut self, who: &str) -> Result<String> {
        if !who.starts_with("0x") {
            return Ok(who.to_lowercase());
        }
        let addr = identity::normalize_address(who)?;
        let resp = self
            .ids
            .get_inbox_ids(ipb::GetInboxIdsRequest {
                requests: vec![ipb::get_inbox_ids_request::Request {
                    identifier: addr.clone(),
                    identifier_kind: IdentifierKind::Ethereum as i32,
                }],
            })
            .await?
            .into_inner();
        resp.responses
            .into_iter()
            .find_map(|r| r.inbox_id)
            .ok_or_else(|| ClientError::Peer(format!("{addr} has no XMTP inbox")))
    }

    /// The DM with `peer` (an inbox id), creating it if there is none.
    pub async fn dm(&mut self, peer: &str) -> Result<Vec<u8>> {
        let peer = peer.to_lowercase();
        if let Some(g) = self.tree.get(format!("dm/{peer}"))? {
            return Ok(g.to_vec());
        }
        // A DM the peer created may be waiting as a welcome: join it rather than fork a second.
        self.sync_welcomes().await?;
        if let Some(g) = self.tree.get(format!("dm/{peer}"))? {
            return Ok(g.to_vec());
        }
        let (peer_state, peer_seq) = self.inbox_state(&peer).await?;
        let (_, my_seq) = self.inbox_state(&self.inbox_id.clone()).await?;
        // Fail closed: only live installations of the peer (from its identity log), each with a
        // key package that names exactly that inbox and installation.
        let wanted: Vec<(String, Vec<u8>)> = peer_state
            .installations()
            .map(|k| (peer.clone(), k.to_vec()))
            .collect();
        let (kps, wrappers) = self.usable_key_packages(&wanted).await?;
        if kps.is_empty() {
            return Err(ClientError::Peer(format!(
                "inbox {peer} has no usable key package"
            )));
        }
        let membership: BTreeMap<String, u64> =
            [(self.inbox_id.clone(), my_seq), (peer.clone(), peer_seq)].into();
        // Post-quantum when every installation of the peer is a Gatehouse one (PQ twin).
        let created = group::create_best(
            &self.provider,
            &self.key,
            &self.inbox_id,
            group::Kind::Dm { peer: &peer },
            kps,
            &membership,
            &mut rand::rngs::OsRng,
        )?;
        let gid = created.group.group_id().as_slice().to_vec();
        self.announce_created(created, peer.as_bytes(), wrappers)
            .await?;
        self.tree.insert(format!("dm/{peer}"), gid.clone())?;
        self.allow_conversation(&gid)?;
        tracing::info!(peer = %peer, conversation = %hex::encode(&gid), "DM created");
        Ok(gid)
    }

    /// Records a conversation we just created (`peer` is the DM peer, empty for a group),
    /// publishes its creating commit, starts reading after it, and sends the welcomes.
    async fn announce_created(
        &mut self,
        created: group::Created,
        peer: &[u8],
        wrappers: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<Vec<u8>> {
        let gid = created.group.group_id().as_slice().to_vec();
        // Owed before the group exists on disk: a crash before the welcomes went out sends
        // them before the first message into the conversation (`ready_to_send`), instead of
        // writing into a conversation the peer never joined.
        let owed = [b"created_welcome/".as_slice(), &gid].concat();
        self.store_welcomes_at(&owed, &created.welcome, &wrappers)?;
        self.record_epoch(&created.group)?;
        self.persist_mls()?;
        self.tree
            .insert([b"conv/".as_slice(), &gid].concat(), peer)?;
        self.conversations_gen += 1;
        self.publish_group_message(created.commit, false).await?;
        // Our own commit is already applied: start reading after it.
        let newest = self.newest_id(&gid).await?;
        self.tree.insert(
            [b"cursor/g/".as_slice(), &gid].concat(),
            &newest.to_be_bytes(),
        )?;
        self.send_welcomes(&created.welcome, newest, wrappers)
            .await?;
        self.tree.remove(&owed)?;
        flush_tree(&self.tree).await?;
        Ok(gid)
    }

    /// Wraps a welcome to each new installation's X-Wing key and sends them in one call.
    async fn send_welcomes(
        &mut self,
        welcome_mls: &[u8],
        message_cursor: u64,
        wrappers: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<()> {
        let mut messages = Vec::with_capacity(wrappers.len());
        for (installation_key, pk) in wrappers {
            let (data, welcome_metadata) = welcome::wrap(
                welcome_mls,
                &mpb::WelcomeMetadata { message_cursor },
                &pk,
                &mut rand::rngs::OsRng,
            )?;
            messages.push(mpb::WelcomeMessageInput {
                version: Some(mpb::welcome_message_input::Version::V1(
                    mpb::welcome_message_input::V1 {
                        installation_key,
                        data,
                        hpke_public_key: pk,
                        wrapper_algorithm: mc::WelcomeWrapperAlgorithm::XwingMlkem768Draft6 as i32,
                        welcome_metadata,
                    },
                )),
            });
        }
        self.mls
            .send_welcome_messages(mpb::SendWelcomeMessagesRequest { messages })
            .await?;
        Ok(())
    }

    /// Fetches and checks the key packages of `(inbox, installation)` pairs: each must verify
    /// and name exactly that inbox and installation (fail closed), and carry an X-Wing key.
    /// Returns the usable packages and `(installation, wrapper key)` for their welcomes.
    async fn usable_key_packages(
        &mut self,
        wanted: &[(String, Vec<u8>)],
    ) -> Result<(Vec<group::VerifiedKeyPackage>, Vec<(Vec<u8>, Vec<u8>)>)> {
        let resp = self
            .mls
            .fetch_key_packages(mpb::FetchKeyPackagesRequest {
                installation_keys: wanted.iter().map(|(_, k)| k.clone()).collect(),
            })
            .await?
            .into_inner();
        let mut kps = Vec::new();
        let mut wrappers = Vec::new();
        for ((inbox, inst), kp) in wanted.iter().zip(resp.key_packages) {
            if kp.key_package_tls_serialized.is_empty() {
                continue;
            }
            let v = match group::validate_key_package(
                &self.provider,
                &kp.key_package_tls_serialized,
            ) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(inbox = %inbox, error = %e, "skipping an invalid key package");
                    continue;
                }
            };
            if &v.inbox_id != inbox || &v.installation_key != inst {
                tracing::warn!(inbox = %inbox, "skipping a key package that does not match the identity log");
                continue;
            }
            let Some(pk) = v.wrapper_public_key.clone() else {
                continue;
            };
            wrappers.push((inst.clone(), pk));
            kps.push(v);
        }
        Ok((kps, wrappers))
    }

    /// This installation's read position in a conversation (the last node id it processed).
    fn read_cursor(&self, gid: &[u8]) -> Result<u64> {
        if let Some(c) = self.deferred().cursors.get(gid) {
            return Ok(*c);
        }
        stored_group_cursor(&self.tree, gid)
    }

    /// Up to `limit` group messages with ids greater than `cursor`, in node order.
    async fn messages_after(
        &mut self,
        gid: &[u8],
        cursor: u64,
        limit: u32,
    ) -> Result<Vec<mpb::GroupMessage>> {
        Ok(self
            .mls
            .query_group_messages(page_query(gid, cursor, limit))
            .await?
            .into_inner()
            .messages)
    }

    /// Records the digests ([`published_digest`]) of what is about to be published in the
    /// sink, if there is one.
    fn record_published(&self, digests: &[u64]) {
        if let Some(sink) = &self.published {
            let mut set = sink.lock().unwrap_or_else(|p| p.into_inner());
            if set.len() > PUBLISHED_SINK_MAX {
                set.clear();
            }
            set.extend(digests.iter().copied());
        }
    }

    /// Has the digests of the group messages this client publishes recorded in `sink`.
    pub fn set_published_sink(&mut self, sink: PublishedSink) {
        self.published = Some(sink);
    }

    /// Publishes one MLS message to the node. Returns where the node placed it, when it says
    /// ([`gatehouse_protocol::placed`]).
    async fn publish_group_message(
        &mut self,
        data: Vec<u8>,
        should_push: bool,
    ) -> Result<Option<Vec<(u64, u64)>>> {
        self.record_published(&[published_digest(&data)]);
        let answer = self
            .mls
            .send_group_messages(mpb::SendGroupMessagesRequest {
                messages: vec![mpb::GroupMessageInput {
                    version: Some(mpb::group_message_input::Version::V1(
                        mpb::group_message_input::V1 {
                            data,
                            sender_hmac: vec![],
                            should_push,
                        },
                    )),
                }],
            })
            .await?;
        Ok(placed_in(&answer))
    }

    async fn newest_id(&mut self, gid: &[u8]) -> Result<u64> {
        let r = self
            .mls
            .get_newest_group_message(mpb::GetNewestGroupMessageRequest {
                group_ids: vec![gid.to_vec()],
                include_content: false,
            })
            .await?
            .into_inner();
        Ok(r.responses
            .first()
            .and_then(|r| r.group_message.as_ref())
            .and_then(|m| m.version.as_ref())
            .map(|mpb::group_message::Version::V1(v)| v.id)
            .unwrap_or(0))
    }

    /// Joins every new conversation addressed to this installation. Returns new group ids.
    pub async fn sync_welcomes(&mut self) -> Result<Vec<Vec<u8>>> {
        let mut joined = Vec::new();
        loop {
            let cursor = stored_welcome_cursor(&self.tree)?;
            let resp = self
                .mls
                .query_welcome_messages(mpb::QueryWelcomeMessagesRequest {
                    installation_key: self.key.public().to_vec(),
                    paging_info: Some(mpb::PagingInfo {
                        direction: mpb::SortDirection::Ascending as i32,
                        limit: 100,
                        id_cursor: cursor,
                    }),
                })
                .await?
                .into_inner();
            let n = resp.messages.len();
            for w in resp.messages {
                let id = match &w.version {
                    Some(mpb::welcome_message::Version::V1(v)) => v.id,
                    Some(mpb::welcome_message::Version::WelcomePointer(p)) => p.id,
                    None => continue,
                };
                match self.open_welcome(w).await {
                    Ok(Some(g)) => joined.push(g),
                    Ok(None) => {}
                    // A bad welcome is skipped, not retried forever: it cannot become valid.
                    Err(e) => tracing::warn!(welcome = id, error = %e, "welcome rejected"),
                }
                self.tree.insert(K_WELCOME_CURSOR, &id.to_be_bytes())?;
            }
            if n < 100 {
                break;
            }
        }
        // A welcome used our last-resort key package: rotate it (as libxmtp does), keeping the
        // old one for the grace period.
        if !joined.is_empty() {
            self.upload_key_package().await?;
        }
        self.expire_key_packages().await?;
        flush_tree(&self.tree).await?;
        Ok(joined)
    }

    async fn open_welcome(&mut self, w: mpb::WelcomeMessage) -> Result<Option<Vec<u8>>> {
        let unwrapped = match w.version {
            Some(mpb::welcome_message::Version::V1(v)) => {
                let seed = self.wrapper_seed(&v.hpke_public_key)?;
                welcome::unwrap(&v.data, &v.welcome_metadata, &seed)?
            }
            Some(mpb::welcome_message::Version::WelcomePointer(p)) => {
                let seed = self.wrapper_seed(&p.hpke_public_key)?;
                let ptr = welcome::unwrap_pointer(&p.welcome_pointer, &seed)?;
                let resp = self
                    .mls
                    .query_welcome_messages(mpb::QueryWelcomeMessagesRequest {
                        installation_key: ptr.destination.clone(),
                        paging_info: None,
                    })
                    .await?
                    .into_inner();
                let Some(mpb::welcome_message::Version::V1(sym)) =
                    resp.messages.into_iter().next().and_then(|m| m.version)
                else {
                    return Err(ClientError::Peer("welcome pointer leads nowhere".into()));
                };
                welcome::unwrap_symmetric(&sym.data, &sym.welcome_metadata, &ptr)?
            }
            None => return Ok(None),
        };
        let mut g = group::join_replacing(&self.provider, &unwrapped.mls_message, |gid| {
            self.fork_state(gid).ok().flatten().is_some()
        })?;
        let gid = g.group_id().as_slice().to_vec();
        // Fail closed: every leaf must be a live installation of the inbox its credential names.
        for (inbox, inst) in group::leaves(&g) {
            let (st, _) = self.inbox_state(&inbox).await?;
            if !st.has_installation(&inst) {
                let _ = group::delete(&self.provider, &mut g);
                self.persist_mls()?;
                return Err(ClientError::Peer(format!(
                    "welcome names installation {} that is not live on inbox {inbox}",
                    hex::encode(inst)
                )));
            }
        }
        let md = group::group_metadata(&g)?;
        // A device-sync group is only ever our own installations.
        if md.conversation_type == mc::ConversationType::Sync as i32 {
            if md.creator_inbox_id != self.inbox_id
                || group::leaves(&g).iter().any(|(i, _)| *i != self.inbox_id)
            {
                let _ = group::delete(&self.provider, &mut g);
                self.persist_mls()?;
                return Err(ClientError::Peer(
                    "refused a device-sync group that is not this inbox's own".into(),
                ));
            }
            self.persist_mls()?;
            self.record_epoch(&g)?;
            self.tree
                .insert([b"sync/".as_slice(), &gid].concat(), b"")?;
            let cursor = unwrapped.metadata.map(|m| m.message_cursor).unwrap_or(0);
            self.tree.insert(
                [b"cursor/g/".as_slice(), &gid].concat(),
                &cursor.to_be_bytes(),
            )?;
            tracing::info!(conversation = %hex::encode(&gid), "joined this inbox's device-sync group");
            return Ok(None);
        }
        self.persist_mls()?;
        if self.fork_state(&gid)?.is_some() {
            self.forget_fork(&g)?;
        } else {
            self.record_epoch(&g)?;
        }
        if md.conversation_type == mc::ConversationType::Dm as i32 {
            let peer = md
                .dm_members
                .as_ref()
                .and_then(|d| {
                    [d.dm_member_one.as_ref(), d.dm_member_two.as_ref()]
                        .into_iter()
                        .flatten()
                        .map(|i| i.inbox_id.clone())
                        .find(|i| *i != self.inbox_id)
                })
                .unwrap_or_default();
            // Keep the first DM with a peer as the one we send on; later ones still deliver.
            // DM stitching (libxmtp's rule): the most recently active DM with a peer is the one
            // we send on; a newly joined DM is the most recent. Messages on every DM still arrive.
            self.tree.insert(format!("dm/{peer}"), gid.clone())?;
            self.tree
                .insert([b"conv/".as_slice(), &gid].concat(), peer.as_bytes())?;
        } else {
            self.tree
                .insert([b"conv/".as_slice(), &gid].concat(), b"")?;
        }
        self.conversations_gen += 1;
        let cursor = unwrapped.metadata.map(|m| m.message_cursor).unwrap_or(0);
        self.tree.insert(
            [b"cursor/g/".as_slice(), &gid].concat(),
            &cursor.to_be_bytes(),
        )?;
        tracing::info!(conversation = %hex::encode(&gid), "joined conversation");
        Ok(Some(gid))
    }

    fn wrapper_seed(&self, pk: &[u8]) -> Result<[u8; 32]> {
        let v = self
            .tree
            .get([b"wrap/".as_slice(), pk].concat())?
            .ok_or_else(|| ClientError::Peer("welcome for a key package we do not hold".into()))?;
        v.as_ref()
            .try_into()
            .map_err(|_| ClientError::Peer("stored wrapper key is corrupt".into()))
    }

    /// Known conversations (hex group id → peer inbox for DMs).
    pub fn conversations(&self) -> Result<Vec<(Vec<u8>, String)>> {
        stored_conversations(&self.tree)
    }

    /// Sends content into a conversation. Returns the idempotency key used and XMTP's id of
    /// the message.
    pub async fn send(
        &mut self,
        gid: &[u8],
        c: &mc::EncodedContent,
        idempotency_key: Option<String>,
    ) -> Result<Sent> {
        let mut g = self.ready_to_send(gid).await?;
        self.encrypt_and_publish(&mut g, c, idempotency_key).await
    }

    /// Loads a conversation for sending: refuses when this installation is no longer a member
    /// or the conversation forked, and records the reply as consent.
    ///
    /// As libxmtp does (it publishes an application message before it receives), messages are
    /// encrypted on the epoch this installation holds, without asking the node first: members
    /// keep [`group::MAX_PAST_EPOCHS`] past epochs, so a commit published meanwhile does not
    /// make them unreadable, and what arrived is read when the installation's owner reads
    /// (the bridge: when the node's stream names the conversation). What arrived is applied
    /// first when the membership is looked at (a commit has to be made on the current epoch):
    /// the first send of a process, every [`MEMBERSHIP_CHECK_INTERVAL`] after, and when a
    /// leave or re-add waits — so a removal or revocation is noticed within that interval.
    async fn ready_to_send(&mut self, gid: &[u8]) -> Result<openmls_group::MlsGroup> {
        let mut g = group::load(&self.provider, gid)?.ok_or_else(|| {
            ClientError::Peer(format!("unknown conversation {}", hex::encode(gid)))
        })?;
        // Created, but the process stopped before the welcomes went out.
        self.send_welcomes_at(&[b"created_welcome/".as_slice(), gid].concat(), gid)
            .await?;
        // As libxmtp does before a send, the membership is looked at only when it was not
        // lately (node round trips per send batch otherwise), or when work is asked of it.
        if self.membership_due(gid) {
            self.sync_group_inner(&mut g).await?;
            self.maintain_membership(&mut g, None).await?;
            self.membership_checked
                .insert(gid.to_vec(), std::time::Instant::now());
        }
        if !group::is_active(&g) {
            return Err(ClientError::Peer(format!(
                "this installation is no longer a member of conversation {} (revoked or removed)",
                hex::encode(gid)
            )));
        }
        // Replying is consent: the conversation (and a DM's peer) become allowed.
        if self.conversation_state(gid)? != gatehouse_protocol::consent::State::Allowed {
            self.allow_conversation(gid)?;
        }
        if self.fork_state(gid)?.is_some() {
            return Err(ClientError::Peer(format!(
                "conversation {} forked (this installation's state differs from the group's); a re-add has been requested, try again once it is back",
                hex::encode(gid)
            )));
        }
        Ok(g)
    }

    /// Sends several messages into one conversation, in order, with one read first, one write
    /// of the MLS state and one publish (the bridge's hot path). Each item is content and its
    /// idempotency key.
    pub async fn send_batch(
        &mut self,
        gid: &[u8],
        items: &[(mc::EncodedContent, String)],
    ) -> Result<Vec<Sent>> {
        let mut g = self.ready_to_send(gid).await?;
        let mut inputs = Vec::with_capacity(items.len());
        let mut sent = Vec::with_capacity(items.len());
        for (c, key) in items {
            let data = group::encrypt(
                &self.provider,
                &self.key,
                &mut g,
                &content::seal_envelope(c, key),
            )?;
            inputs.push(mpb::GroupMessageInput {
                version: Some(mpb::group_message_input::Version::V1(
                    mpb::group_message_input::V1 {
                        data,
                        sender_hmac: vec![],
                        should_push: true,
                    },
                )),
            });
            sent.push(Sent {
                message_id: content::message_id(gid, &c.encode_to_vec(), key),
                idempotency_key: key.clone(),
            });
        }
        // Written before publishing: a crash after the publish never reuses a ratchet step.
        self.persist_mls()?;
        let digests: Vec<u64> = inputs
            .iter()
            .filter_map(|i| {
                i.version
                    .as_ref()
                    .map(|mpb::group_message_input::Version::V1(v)| published_digest(&v.data))
            })
            .collect();
        self.record_published(&digests);
        let before = self.read_cursor(gid)?;
        let answer = self
            .mls
            .send_group_messages(mpb::SendGroupMessagesRequest { messages: inputs })
            .await?;
        self.skip_own(gid, before, &digests, placed_in(&answer))
            .await;
        Ok(sent)
    }

    /// After publishing application messages (their `digests`) into `gid` with its cursor at
    /// `before`: when they are all that followed the cursor, it moves past them, as a read
    /// would (our own messages cannot be decrypted by us), so the conversation holds nothing
    /// unread for this installation and a check of the node's newest message finds no news.
    /// Where the node said where it placed them (`placed`, Gatehouse's node) that answers it;
    /// otherwise the node is asked. Anything else there is left to the next read; a failure
    /// here only costs that read.
    async fn skip_own(
        &mut self,
        gid: &[u8],
        before: u64,
        digests: &[u64],
        placed: Option<Vec<(u64, u64)>>,
    ) {
        let last = match placed {
            Some(placed) if placed.len() == digests.len() => {
                gatehouse_protocol::placed::cursor_after(before, &placed)
            }
            Some(_) => None,
            None => self.own_run_after(gid, before, digests).await,
        };
        if let Some(id) = last
            && self.read_cursor(gid).is_ok_and(|c| c == before)
        {
            let key = [b"cursor/g/".as_slice(), gid].concat();
            let mut d = self.deferred();
            if let Some(c) = d.cursors.get_mut(gid) {
                *c = id;
                d.batch.insert(key, &id.to_be_bytes());
            } else {
                let _ = self.tree.insert(key, &id.to_be_bytes());
            }
        }
    }

    /// Asks the node what followed `before` in `gid`: the id of the last of our messages
    /// (`digests`) when they are all there is.
    async fn own_run_after(&mut self, gid: &[u8], before: u64, digests: &[u64]) -> Option<u64> {
        let limit = u32::try_from(digests.len() + 1).unwrap_or(u32::MAX);
        let after = self.messages_after(gid, before, limit).await.ok()?;
        if after.len() != digests.len() {
            return None;
        }
        let mut last = None;
        for (m, digest) in after.iter().zip(digests) {
            match &m.version {
                Some(mpb::group_message::Version::V1(v))
                    if !v.is_commit && published_digest(&v.data) == *digest =>
                {
                    last = Some(v.id)
                }
                _ => return None,
            }
        }
        last
    }

    /// Fault injection for tests: sends `c` signed with a key that is not this installation's
    /// (what a member impersonating another would send); every receiver must refuse it.
    #[doc(hidden)]
    pub async fn send_forged(&mut self, gid: &[u8], c: &mc::EncodedContent) -> Result<()> {
        let mut g = self.ready_to_send(gid).await?;
        let impostor = InstallationKey::from_seed(&[0x5a; 32]);
        let key = hex::encode(rand::random::<[u8; 16]>());
        let data = group::encrypt(
            &self.provider,
            &impostor,
            &mut g,
            &content::seal_envelope(c, &key),
        )?;
        self.persist_mls()?;
        self.publish_group_message(data, true).await?;
        Ok(())
    }

    /// Encrypts content on the group's current epoch and publishes it (no read first).
    async fn encrypt_and_publish(
        &mut self,
        g: &mut openmls_group::MlsGroup,
        c: &mc::EncodedContent,
        idempotency_key: Option<String>,
    ) -> Result<Sent> {
        let key = idempotency_key.unwrap_or_else(|| hex::encode(rand::random::<[u8; 16]>()));
        let data = group::encrypt(
            &self.provider,
            &self.key,
            g,
            &content::seal_envelope(c, &key),
        )?;
        self.persist_mls()?;
        let gid = g.group_id().as_slice().to_vec();
        let (before, digest) = (self.read_cursor(&gid)?, published_digest(&data));
        let placed = self.publish_group_message(data, true).await?;
        self.skip_own(&gid, before, &[digest], placed).await;
        Ok(Sent {
            message_id: content::message_id(g.group_id().as_slice(), &c.encode_to_vec(), &key),
            idempotency_key: key,
        })
    }

    /// Reads new messages of one conversation (consent applies, as in [`Self::sync_all`]).
    pub async fn sync_group(&mut self, gid: &[u8]) -> Result<Vec<Received>> {
        let mut g = group::load(&self.provider, gid)?.ok_or_else(|| {
            ClientError::Peer(format!("unknown conversation {}", hex::encode(gid)))
        })?;
        let got = self.sync_group_inner(&mut g).await?;
        self.gate(got)
    }

    async fn sync_group_inner(&mut self, g: &mut openmls_group::MlsGroup) -> Result<Vec<Received>> {
        // Identity states fetched during this read, so each inbox is asked for once.
        let mut states = BTreeMap::new();
        self.sync_group_with(g, &mut states, None, false).await
    }

    /// Reads what follows the conversation's cursor, page by page. `states` holds the identity
    /// states already fetched in this read pass (each inbox is asked for once per pass);
    /// `first`, when given, is the first page, fetched ahead (see [`Client::read_pages`]):
    /// whatever of it is at or below the cursor by now is skipped.
    async fn sync_group_with(
        &mut self,
        g: &mut openmls_group::MlsGroup,
        states: &mut BTreeMap<String, identity::InboxState>,
        mut first: Option<Vec<mpb::GroupMessage>>,
        defer: bool,
    ) -> Result<Vec<Received>> {
        let gid = g.group_id().as_slice().to_vec();
        let ckey = [b"cursor/g/".as_slice(), &gid].concat();
        let mut out = Vec::new();
        let mut saw_commit = false;
        loop {
            let cursor = self.read_cursor(&gid)?;
            let messages = match first.take() {
                Some(page) => page,
                None => self.messages_after(&gid, cursor, PAGE).await?,
            };
            let n = messages.len();
            let messages = messages.into_iter().filter(|m| match &m.version {
                Some(mpb::group_message::Version::V1(v)) => v.id > cursor,
                None => true,
            });
            // One atomic write per page: the retained copies, the "seen" marks, the cursor
            // and the MLS state move together, so a crash keeps all or none of the page (a
            // durable "seen" without the copy would drop a message when it is read again; a
            // cursor without the state would leave messages the ratchet has moved past). In
            // a read pass over several conversations the write waits for the pass's end
            // (`Deferred`), all of them still moving together.
            let mut batch = std::mem::take(&mut self.deferred().batch);
            let mut last = None;
            let mut failed = None;
            // Messages of this page delivered on a signature not yet checked: where they are
            // in `out`, and the check.
            let mut unchecked = Vec::new();
            for m in messages {
                let Some(mpb::group_message::Version::V1(v)) = m.version else {
                    continue;
                };
                saw_commit |= v.is_commit;
                // A message that fails is not marked seen: it is read again.
                let seen_before = self.unsaved_seen.len();
                match self.handle_message(g, &gid, &v, states, true).await {
                    Ok(Some((mut r, check))) => {
                        if let Err(e) = self.retain_delivery(&mut r, &mut batch) {
                            self.unsaved_seen.truncate(seen_before);
                            failed = Some(e);
                            break;
                        }
                        self.note_senders(&gid, &r);
                        if let Some(check) = check {
                            unchecked.push((out.len(), check));
                        }
                        out.push(r);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.unsaved_seen.truncate(seen_before);
                        failed = Some(e);
                        break;
                    }
                }
                last = Some(v.id);
            }
            // The signatures are checked when the write that keeps their messages is applied
            // (`settle_checks`): in a pass at its end, with every conversation's; otherwise
            // at this page's.
            // What was processed before a failure is written too: the ratchet has moved
            // past it, so it could not be read again.
            let seen = if defer {
                self.unsaved_seen.clone()
            } else {
                Vec::new()
            };
            let mut marks = Vec::new();
            if let Some(id) = last {
                marks = self.save_seen(&mut batch)?;
                batch.insert(ckey.as_slice(), &id.to_be_bytes());
            }
            let mut d = self.deferred();
            for (at, check) in unchecked {
                let r = &out[at];
                d.checks.push(PendingCheck {
                    conversation: r.conversation.clone(),
                    id: r.id,
                    delivery: r.delivery,
                    message_id: r.message_id.clone(),
                    seen: marks
                        .iter()
                        .find(|(m, _)| *m == r.message_id)
                        .map(|(_, seq)| *seq),
                    check,
                });
            }
            if defer || last.is_none() {
                d.batch = batch;
                if let Some(id) = last {
                    d.cursors.insert(gid.clone(), id);
                    d.seen.extend(seen);
                    d.messages += n;
                }
                if d.messages >= DEFER_MAX {
                    drop(d);
                    self.persist_mls()?;
                }
            } else {
                drop(d);
                self.persist_with(batch)?;
                let refused = std::mem::take(&mut self.deferred().refused);
                out.retain(|r| !refused.contains(&(r.conversation.clone(), r.id)));
            }
            if let Some(e) = failed {
                self.persist_mls()?;
                return Err(e);
            }
            if n < PAGE as usize {
                break;
            }
        }
        // After a commit: publish our commit log (if we are its publisher) and compare ours with
        // the published one, so a fork is found within one round.
        if saw_commit {
            if let Err(e) = self.publish_commit_log(g).await {
                tracing::warn!(conversation = %hex::encode(&gid), error = %e, "publishing the commit log failed; will retry");
            }
            self.check_fork(g).await?;
        }
        Ok(out)
    }

    /// Records the inboxes whose states reading `r` needed (see `Client::senders`).
    fn note_senders(&mut self, gid: &[u8], r: &Received) {
        let bridge = r.sender_endpoint.as_ref().map(|e| e.bridge.as_str());
        let known = self.senders.get(gid);
        let fresh = |i: &str| known.is_none_or(|k| !k.iter().any(|x| x == i));
        if !fresh(&r.sender_inbox) && bridge.is_none_or(|b| !fresh(b)) {
            return;
        }
        if self.senders.len() >= SENDER_HINTS && !self.senders.contains_key(gid) {
            self.senders.clear();
        }
        let list = self.senders.entry(gid.to_vec()).or_default();
        for inbox in std::iter::once(r.sender_inbox.as_str()).chain(bridge) {
            if !inbox.is_empty() && !list.iter().any(|x| x == inbox) {
                // A few per conversation: the latest senders.
                if list.len() >= 4 {
                    list.remove(0);
                }
                list.push(inbox.to_string());
            }
        }
    }

    /// Reads several conversations with the node asked once for all of them: their first
    /// pages are fetched together, and the identity states their recent senders need in one
    /// request. Then each is read in turn (further pages, and inboxes not foreseen, as a
    /// single read asks for them); one with nothing new whose membership was looked at
    /// lately is skipped without loading its MLS state (the costly part of a read that finds
    /// nothing). A conversation with new messages has its membership brought up to date
    /// always, or (`always_membership` false) when it is due. Returns what was read, not yet
    /// consent-gated.
    ///
    /// The pages' writes (retained copies, "seen" marks, cursors) and the MLS state are
    /// written once, at the end (or at the first failure, with what was read before it), not
    /// once per conversation: with many conversations, each write to the store was a fixed
    /// cost of its own.
    pub(crate) async fn read_pages(
        &mut self,
        gids: Vec<Vec<u8>>,
        always_membership: bool,
        given: std::collections::HashMap<Vec<u8>, Vec<mpb::GroupMessage>>,
    ) -> Result<Vec<Received>> {
        self.deferred().refused.clear();
        let read = self
            .read_pages_deferred(gids, always_membership, given)
            .await;
        let saved = self.persist_mls();
        let mut out = read?;
        saved?;
        let refused = std::mem::take(&mut self.deferred().refused);
        if !refused.is_empty() {
            out.retain(|r| !refused.contains(&(r.conversation.clone(), r.id)));
        }
        Ok(out)
    }

    async fn read_pages_deferred(
        &mut self,
        gids: Vec<Vec<u8>>,
        always_membership: bool,
        mut given: std::collections::HashMap<Vec<u8>, Vec<mpb::GroupMessage>>,
    ) -> Result<Vec<Received>> {
        // Identity states fetched during this pass, so each inbox is asked for once.
        let mut states = BTreeMap::new();
        let mut out = Vec::new();
        let mut memberships = Vec::new();
        for chunk in gids.chunks(READ_AHEAD) {
            let mut cursors = Vec::with_capacity(chunk.len());
            for gid in chunk.iter().filter(|g| !given.contains_key(*g)) {
                cursors.push((gid, self.read_cursor(gid)?));
            }
            let pages = futures::future::join_all(cursors.into_iter().map(|(gid, cursor)| {
                let mut mls = self.mls.clone();
                let request = page_query(gid, cursor, PAGE);
                async move { mls.query_group_messages(request).await }
            }));
            let mut wanted: Vec<String> = chunk
                .iter()
                .flat_map(|g| self.senders.get(g).into_iter().flatten())
                .filter(|inbox| !states.contains_key(*inbox))
                .cloned()
                .collect();
            wanted.sort();
            wanted.dedup();
            let pages = if wanted.is_empty() {
                pages.await
            } else {
                let mut ids = self.ids.clone();
                let request = ipb::GetIdentityUpdatesRequest {
                    requests: wanted
                        .iter()
                        .map(|inbox| ipb::get_identity_updates_request::Request {
                            inbox_id: inbox.clone(),
                            sequence_id: self.identities.get(inbox).map_or(0, |(_, seq)| *seq),
                        })
                        .collect(),
                };
                let (pages, answer) =
                    futures::join!(
                        pages,
                        async move { ids.get_identity_updates(request).await }
                    );
                states.extend(self.fold_states(&wanted, answer));
                pages
            };
            let mut pages = pages.into_iter();
            for gid in chunk {
                let page = match given.remove(gid) {
                    Some(page) => page,
                    None => match pages.next() {
                        Some(page) => page?.into_inner().messages,
                        None => Vec::new(),
                    },
                };
                if page.is_empty() && !self.membership_due(gid) {
                    continue;
                }
                let (received, due) = self
                    .read_conversation(gid, always_membership, &mut states, Some(page))
                    .await?;
                out.extend(received);
                memberships.extend(due);
            }
            // The chunk's conversations due for a look at their membership, together.
            self.maintain_memberships(std::mem::take(&mut memberships))
                .await;
        }
        Ok(out)
    }

    /// Whether `message_id` is seen for the first time (recorded as seen if so, in memory
    /// until [`Client::save_seen`] writes it with the message's cursor).
    fn first_sight(&mut self, message_id: &str) -> Result<bool> {
        let key = [b"seen/".as_slice(), message_id.as_bytes()].concat();
        if self.tree.contains_key(&key)?
            || self.unsaved_seen.iter().any(|m| m == message_id)
            || self.deferred().seen.contains(message_id)
        {
            return Ok(false);
        }
        self.unsaved_seen.push(message_id.to_string());
        Ok(true)
    }

    /// Puts the ids [`Client::first_sight`] saw into `batch`. The last [`SEEN_WINDOW`] ids are
    /// kept (`seen/ID` → sequence, `seenq/SEQ` → id), older ones are forgotten.
    fn save_seen(&mut self, batch: &mut gatehouse_store::Writes) -> Result<Vec<(String, u64)>> {
        let mut marks = Vec::new();
        for message_id in std::mem::take(&mut self.unsaved_seen) {
            let seq = self.next_seq_in("seen", batch)?;
            batch.insert(
                [b"seen/".as_slice(), message_id.as_bytes()].concat(),
                &seq.to_be_bytes(),
            );
            batch.insert(
                [b"seenq/".as_slice(), &seq.to_be_bytes()].concat(),
                message_id.as_bytes(),
            );
            if seq > SEEN_WINDOW {
                let old = [b"seenq/".as_slice(), &(seq - SEEN_WINDOW).to_be_bytes()].concat();
                if let Some(id) = self.tree.get(&old)? {
                    batch.remove(old);
                    batch.remove([b"seen/".as_slice(), &id].concat());
                }
            }
            marks.push((message_id, seq));
        }
        Ok(marks)
    }

    async fn live(
        &mut self,
        states: &mut BTreeMap<String, identity::InboxState>,
        inbox: &str,
        installation: &[u8],
    ) -> Result<bool> {
        if !states.contains_key(inbox) {
            match self.inbox_state(inbox).await {
                Ok((st, _)) => {
                    states.insert(inbox.to_string(), st);
                }
                Err(ClientError::Peer(_)) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(states
            .get(inbox)
            .is_some_and(|s| s.has_installation(installation)))
    }

    /// Processes one group message: verifies senders and commit leaves against the identity
    /// logs (fail closed), merges valid commits, returns application content. With
    /// `batch_signatures`, the signature of application content that is only delivered (that
    /// does not act, as consent records and re-add and leave requests do) is not checked here
    /// but returned with it, **for the caller to check before it trusts the content**
    /// (`Client::settle_checks`).
    async fn handle_message(
        &mut self,
        g: &mut openmls_group::MlsGroup,
        gid: &[u8],
        v: &mpb::group_message::V1,
        states: &mut BTreeMap<String, identity::InboxState>,
        batch_signatures: bool,
    ) -> Result<
        Option<(
            Received,
            Option<gatehouse_protocol::mls_crypto::SignatureCheck>,
        )>,
    > {
        let conversation = hex::encode(gid);
        let before = v
            .is_commit
            .then(|| gatehouse_protocol::commit_log::authenticator(g));
        let log = |c: &Self, g: &openmls_group::MlsGroup, r: CommitResult| -> Result<()> {
            match &before {
                Some(b) => c.log_commit(g, v.id, b, r),
                None => Ok(()),
            }
        };
        let (processed, mut check) = if batch_signatures {
            group::process_deferring_signature(&self.provider, g, &v.data)
        } else {
            (group::process(&self.provider, g, &v.data), None)
        };
        match processed {
            Ok(group::Processed::Application {
                sender_inbox,
                sender_installation,
                plaintext,
            }) => {
                if !self
                    .live(states, &sender_inbox, &sender_installation)
                    .await?
                {
                    tracing::warn!(%conversation, id = v.id, sender = %sender_inbox, installation = %hex::encode(&sender_installation), "rejected a message from an installation that is not live on its inbox");
                    return Ok(None);
                }
                let (content, idempotency_key, message_id) =
                    match content::open_envelope(&plaintext) {
                        Ok(content::Opened::Content {
                            content,
                            bytes,
                            idempotency_key,
                        }) => {
                            let id = content::message_id(gid, &bytes, &idempotency_key);
                            (content, idempotency_key, id)
                        }
                        // Raw bytes (not EncodedContent): shown as text when they are UTF-8.
                        Ok(content::Opened::Raw {
                            bytes,
                            idempotency_key,
                        }) => (
                            gatehouse_wire::message_contents::EncodedContent {
                                content: bytes.clone(),
                                fallback: String::from_utf8(bytes.clone()).ok(),
                                ..Default::default()
                            },
                            content::message_id(gid, &bytes, &idempotency_key),
                            idempotency_key,
                        ),
                        _ => return Ok(None),
                    };
                // Content that acts (consent records, re-add and leave requests) is checked
                // before anything is done with it; only messages that are delivered wait for
                // the page's batch.
                let acts = content.r#type.as_ref().is_some_and(|t| {
                    (t.authority_id == "xmtp.org"
                        && (t.type_id == "application/x-protobuf" || t.type_id == "leave_request"))
                        || (t.authority_id == "gatehouse.dev" && t.type_id == forks::READD_TYPE)
                });
                if acts && !check.take().is_none_or(|c| c.verify()) {
                    tracing::warn!(%conversation, id = v.id, sender = %sender_inbox, "rejected a message whose signature does not verify");
                    return Ok(None);
                }
                // The same content under the same idempotency key is the same message (XMTP's
                // message id covers both): a sender's retry after an ambiguous publish shows once.
                if !idempotency_key.is_empty() && !self.first_sight(&message_id)? {
                    tracing::debug!(%conversation, id = v.id, "duplicate message dropped (same idempotency key and content)");
                    return Ok(None);
                }
                // Consent records from our own installations (device-sync group).
                if content.r#type.as_ref().is_some_and(|t| {
                    t.authority_id == "xmtp.org" && t.type_id == "application/x-protobuf"
                }) {
                    self.receive_consent(gid, &sender_inbox, &content)?;
                    return Ok(None);
                }
                // A forked member asks (in our DM) to be re-added: handled, not shown.
                if content.r#type.as_ref().is_some_and(|t| {
                    t.authority_id == "gatehouse.dev" && t.type_id == forks::READD_TYPE
                }) {
                    self.note_readd_request(&content.content, &sender_inbox, &sender_installation)?;
                    return Ok(None);
                }
                // A leave request: recorded, and carried out by a member allowed to remove.
                if content
                    .r#type
                    .as_ref()
                    .is_some_and(|t| t.authority_id == "xmtp.org" && t.type_id == "leave_request")
                {
                    self.tree.insert(
                        [b"leave/".as_slice(), gid, b"/", sender_inbox.as_bytes()].concat(),
                        b"",
                    )?;
                }
                // The DM a peer last wrote on is the one we answer on (DM stitching).
                if let Some(peer) = self.dm_peer(gid)?
                    && peer == sender_inbox
                {
                    let key = format!("dm/{peer}");
                    if self.tree.get(&key)?.is_none_or(|g| g != gid) {
                        if !check.take().is_none_or(|c| c.verify()) {
                            tracing::warn!(%conversation, id = v.id, sender = %sender_inbox, "rejected a message whose signature does not verify");
                            self.unsaved_seen.retain(|m| *m != message_id);
                            return Ok(None);
                        }
                        self.tree.insert(key, gid)?;
                    }
                }
                let sender_endpoint = match content
                    .parameters
                    .get(gatehouse_protocol::attestation::PARAMETER)
                {
                    Some(value) => {
                        Some(self.check_attestation(value, &sender_inbox, states).await?)
                    }
                    None => None,
                };
                Ok(Some((
                    Received {
                        sender_endpoint,
                        conversation,
                        id: v.id,
                        sender_inbox,
                        sender_installation: hex::encode(sender_installation),
                        content_type: content
                            .r#type
                            .as_ref()
                            .map(content::type_string)
                            .unwrap_or_default(),
                        text: content::display_text(&content),
                        content: content.content.clone(),
                        sent_at_ns: v.created_ns,
                        idempotency_key,
                        message_id,
                        request: false,
                        delivery: None,
                    },
                    check,
                )))
            }
            Ok(group::Processed::PendingCommit {
                staged,
                new_leaves,
                added,
                removed,
                committer,
                committer_installation,
            }) => {
                // Identity logs only grow: re-read them for a commit so new installations are seen.
                states.clear();
                for (inbox, inst) in &new_leaves {
                    if !self.live(states, inbox, inst).await? {
                        tracing::error!(%conversation, id = v.id, inbox = %inbox, installation = %hex::encode(inst), "rejected a commit whose leaf is not a live installation of its inbox");
                        log(self, g, CommitResult::Invalid)?;
                        return Ok(None);
                    }
                }
                // The group's policy: adding new member inboxes and removing live installations
                // of other inboxes need the committer to hold the right role. Installation
                // changes of existing members and removal of revoked ones are maintenance.
                let leaves = group::leaves(g);
                let mut removed_live = Vec::new();
                for key in &removed {
                    if let Some((inbox, _)) = leaves.iter().find(|(_, k)| k == key)
                        && self.live(states, inbox, key).await?
                    {
                        removed_live.push(inbox.clone());
                    }
                }
                if let Some(rule) =
                    group::commit_policy_violation(g, &committer, &added, &removed_live)?
                {
                    tracing::error!(%conversation, id = v.id, committer = %committer, "rejected a commit: {rule}");
                    log(self, g, CommitResult::Invalid)?;
                    return Ok(None);
                }
                let before = group::snapshot(g);
                let sender_installation = hex::encode(&committer_installation);
                group::merge_commit(&self.provider, g, *staged)?;
                log(self, g, CommitResult::Applied)?;
                // XMTP's transcript of the commit (never published, derived by every member).
                let leave_prefix = [b"leave/".as_slice(), gid, b"/"].concat();
                let left: Vec<String> = self
                    .tree
                    .scan_prefix(&leave_prefix)
                    .keys()
                    .filter_map(|k| k.ok())
                    .map(|k| String::from_utf8_lossy(&k[leave_prefix.len()..]).into_owned())
                    .collect();
                let update = group::transcript(&before, g, &committer, &left);
                if update.is_empty() {
                    return Ok(None);
                }
                let c = update.to_content();
                Ok(Some((
                    Received {
                        sender_endpoint: None,
                        conversation,
                        id: v.id,
                        sender_inbox: committer,
                        sender_installation,
                        content_type: c
                            .r#type
                            .as_ref()
                            .map(content::type_string)
                            .unwrap_or_default(),
                        text: content::display_text(&c),
                        message_id: content::message_id(
                            gid,
                            &c.content,
                            &format!("commit/{}", v.id),
                        ),
                        content: c.content,
                        sent_at_ns: v.created_ns,
                        idempotency_key: String::new(),
                        request: false,
                        delivery: None,
                    },
                    None,
                )))
            }
            // Our own commit, still pending: we stopped (crashed) between publishing it and
            // merging it. The node ordered it, so it is the group's next epoch: merge it now and
            // send the welcomes it owes.
            Ok(group::Processed::Own) if v.is_commit && g.pending_commit().is_some() => {
                group::merge_pending(&self.provider, g)?;
                log(self, g, CommitResult::Applied)?;
                tracing::info!(%conversation, id = v.id, epoch = g.epoch().as_u64(), "merged our own commit published before a restart");
                self.send_pending_welcomes(gid).await?;
                Ok(None)
            }
            Ok(group::Processed::Proposal) | Ok(group::Processed::Own) => Ok(None),
            // Our own messages come back and cannot be decrypted by us; others are logged.
            Err(e) => {
                if v.is_commit {
                    let wrong_epoch = gatehouse_protocol::mls::read_header(&v.data)
                        .is_ok_and(|h| h.epoch != g.epoch().as_u64());
                    log(
                        self,
                        g,
                        if wrong_epoch {
                            CommitResult::WrongEpoch
                        } else {
                            CommitResult::Undecryptable
                        },
                    )?;
                }
                tracing::debug!(%conversation, id = v.id, error = %e, "message not processed");
                Ok(None)
            }
        }
    }

    async fn check_attestation(
        &mut self,
        value: &str,
        sender_inbox: &str,
        states: &mut BTreeMap<String, identity::InboxState>,
    ) -> Result<SenderEndpoint> {
        use gatehouse_protocol::attestation::EndpointAttestation;
        let checked = match self.attestations.get(value) {
            Some(hit) => Ok(hit.clone()),
            None => EndpointAttestation::verify_signature(value).inspect(|ok| {
                if self.attestations.len() >= ATTESTATION_CACHE {
                    self.attestations.clear();
                }
                self.attestations.insert(value.to_string(), ok.clone());
            }),
        };
        let (claim, verified) = match checked {
            Ok((claim, key)) => {
                let live = claim.endpoint == sender_inbox
                    && self.live(states, &claim.bridge, &key).await?;
                (claim, live)
            }
            Err(_) => match EndpointAttestation::parse_unverified(value) {
                Some(claim) => (claim, false),
                None => (EndpointAttestation::default(), false),
            },
        };
        Ok(SenderEndpoint {
            bridge: claim.bridge,
            channel: claim.channel,
            address: claim.address,
            verified,
            sender_auth: claim.sender_auth,
        })
    }

    /// Brings a group's membership in line with its members' identity logs, as libxmtp does:
    /// installations revoked since the group last looked are removed, new installations of
    /// member inboxes are added, and the membership extension records the new log positions.
    /// One commit, ordered by the node: if another commit wins the race, ours is dropped.
    /// `changed`, when given, says which members' identity logs went on past the positions
    /// the group records (asked on the group as it is now); otherwise the node is asked.
    async fn maintain_membership(
        &mut self,
        g: &mut openmls_group::MlsGroup,
        changed: Option<Vec<String>>,
    ) -> Result<()> {
        if !group::is_active(g) {
            return Ok(());
        }
        let gid = g.group_id().as_slice().to_vec();
        let known = group::membership(g)?;
        let changed = match changed {
            Some(changed) => changed,
            None => {
                let asked = known.iter().map(|(i, s)| (i.clone(), *s)).collect();
                let went_on = self.identity_logs_went_on(&asked).await?;
                went_on.into_iter().map(|(inbox, _)| inbox).collect()
            }
        };
        // Members that asked to leave, removed by whoever may remove members.
        let leave_prefix = [b"leave/".as_slice(), &gid, b"/"].concat();
        let mut leavers: Vec<String> = Vec::new();
        let current = group::leaves(g);
        for item in self.tree.scan_prefix(&leave_prefix) {
            let (k, _) = item?;
            let inbox = String::from_utf8_lossy(&k[leave_prefix.len()..]).into_owned();
            if current.iter().any(|(i, _)| *i == inbox) {
                leavers.push(inbox);
            } else {
                // Gone already: the request is done.
                self.tree.remove(&k)?;
            }
        }
        let may_remove = !leavers.is_empty()
            && group::may_change_membership(g, &self.inbox_id, group::MembershipChange::Remove)?;
        // Forked installations that asked to be re-added: removed and added back from a fresh
        // key package in one commit (whoever may add members does it).
        let readds: Vec<(String, Vec<u8>)> = self
            .readd_requests(&gid)?
            .into_iter()
            .filter(|(_, k)| current.iter().any(|(_, c)| c == k) && *k != self.key.public())
            .collect();
        let may_readd = !readds.is_empty()
            && group::may_change_membership(g, &self.inbox_id, group::MembershipChange::Add)?;
        if changed.is_empty() && !may_remove && !may_readd {
            return Ok(());
        }
        let leaves = group::leaves(g);
        let mine = self.key.public().to_vec();
        let mut membership = known.clone();
        let mut remove = Vec::new();
        let mut add_keys = Vec::new();
        for inbox in &changed {
            let (st, seq) = self.inbox_state(inbox).await?;
            // A revoked installation must not commit: its commits would be refused anyway.
            if *inbox == self.inbox_id && !st.has_installation(&mine) {
                return Err(ClientError::Peer(format!(
                    "this installation ({}) was revoked from inbox {}",
                    hex::encode(&mine),
                    self.inbox_id
                )));
            }
            membership.insert(inbox.clone(), seq);
            for (li, key) in &leaves {
                if li == inbox && !st.has_installation(key) && *key != mine {
                    remove.push(key.clone());
                }
            }
            for inst in st.installations() {
                if !leaves.iter().any(|(_, k)| k == inst) {
                    add_keys.push((inbox.clone(), inst.to_vec()));
                }
            }
        }
        if may_readd {
            for (inbox, inst) in &readds {
                remove.push(inst.clone());
                add_keys.push((inbox.clone(), inst.clone()));
            }
        }
        let (adds, wrappers) = if add_keys.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            self.usable_key_packages(&add_keys).await?
        };
        if may_remove {
            for leaver in &leavers {
                if *leaver == self.inbox_id {
                    continue;
                }
                remove.extend(
                    leaves
                        .iter()
                        .filter(|(i, _)| i == leaver)
                        .map(|(_, k)| k.clone()),
                );
                membership.remove(leaver);
            }
        }
        remove.sort();
        remove.dedup();
        if adds.is_empty() && remove.is_empty() {
            return Ok(());
        }
        let adds = group::key_packages_for(g, adds);
        let staged =
            group::commit_membership(&self.provider, &self.key, g, adds, &remove, &membership)?;
        if self.publish_commit(g, staged, wrappers).await? {
            tracing::info!(conversation = %hex::encode(&gid), removed = remove.len(), readded = readds.len(), "membership updated");
            self.clear_readd_requests(&gid, &readds)?;
        }
        flush_tree(&self.tree).await?;
        Ok(())
    }

    /// Publishes a staged commit and applies it only if the node ordered it first (another
    /// member's earlier commit wins: ours is cleared and theirs applied). Sends the welcomes of
    /// a winning commit. Returns whether ours won.
    async fn publish_commit(
        &mut self,
        g: &mut openmls_group::MlsGroup,
        staged: group::MembershipCommit,
        wrappers: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<bool> {
        let gid = g.group_id().as_slice().to_vec();
        let before = self.read_cursor(&gid)?;
        let before_auth = gatehouse_protocol::commit_log::authenticator(g);
        // Durable before it leaves: the pending commit (MLS state) and the welcomes it owes, so
        // a restart after publishing can still merge it and send them.
        self.persist_mls()?;
        if let Some(w) = &staged.welcome {
            self.store_pending_welcomes(&gid, w, &wrappers)?;
        }
        flush_tree(&self.tree).await?;
        self.publish_group_message(staged.commit.clone(), false)
            .await?;
        if self.crash_after_commit_publish {
            return Err(ClientError::Peer(
                "fault injection: stopped between publishing a commit and merging it".into(),
            ));
        }
        let messages = self.messages_after(&gid, before, 1000).await?;
        // Application messages are left for the next read (their epoch keys are kept), and the
        // read cursor is not moved here, so nothing is skipped.
        let mut states = BTreeMap::new();
        let mut ours_won = false;
        for m in messages {
            let Some(mpb::group_message::Version::V1(v)) = m.version else {
                continue;
            };
            if v.data == staged.commit {
                group::merge_pending(&self.provider, g)?;
                self.log_commit(g, v.id, &before_auth, CommitResult::Applied)?;
                ours_won = true;
                break;
            }
            if v.is_commit {
                group::clear_pending(&self.provider, g)?;
                self.tree
                    .remove([b"pending_welcome/".as_slice(), &gid].concat())?;
                tracing::info!(conversation = %hex::encode(&gid), "another member's commit came first; ours is dropped");
                let _ = self.handle_message(g, &gid, &v, &mut states, false).await?;
                break;
            }
        }
        self.persist_mls()?;
        if ours_won {
            self.send_pending_welcomes(&gid).await?;
            if let Err(e) = self.publish_commit_log(g).await {
                tracing::warn!(conversation = %hex::encode(&gid), error = %e, "publishing the commit log failed; will retry");
            }
        }
        flush_tree(&self.tree).await?;
        Ok(ours_won)
    }

    /// Marks a conversation (and a DM's peer) allowed, decided now; synced to our other
    /// installations at the next read.
    fn allow_conversation(&self, gid: &[u8]) -> Result<()> {
        use gatehouse_protocol::consent::{Entity, Record, State};
        let at_ns = now_ns() as i64;
        let mut records = vec![Record {
            kind: Entity::ConversationId,
            entity: hex::encode(gid),
            state: State::Allowed,
            at_ns,
        }];
        if let Some(peer) = self.dm_peer(gid)? {
            records.push(Record {
                kind: Entity::InboxId,
                entity: peer,
                state: State::Allowed,
                at_ns,
            });
        }
        self.note_consent(records)
    }

    fn store_pending_welcomes(
        &self,
        gid: &[u8],
        welcome: &[u8],
        wrappers: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<()> {
        self.store_welcomes_at(
            &[b"pending_welcome/".as_slice(), gid].concat(),
            welcome,
            wrappers,
        )
    }

    /// Keeps a welcome and its wrapper keys under `key` until it has been sent.
    fn store_welcomes_at(
        &self,
        key: &[u8],
        welcome: &[u8],
        wrappers: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<()> {
        let v = serde_json::json!({
            "welcome": hex::encode(welcome),
            "wrappers": wrappers.iter().map(|(a, b)| [hex::encode(a), hex::encode(b)]).collect::<Vec<_>>(),
        });
        self.tree.insert(key, v.to_string().as_bytes())?;
        Ok(())
    }

    /// Sends the welcomes of our last merged commit, if any are owed.
    async fn send_pending_welcomes(&mut self, gid: &[u8]) -> Result<()> {
        self.send_welcomes_at(&[b"pending_welcome/".as_slice(), gid].concat(), gid)
            .await
    }

    /// Sends the welcome kept under `key` for conversation `gid`, if any, then forgets it.
    async fn send_welcomes_at(&mut self, k: &[u8], gid: &[u8]) -> Result<()> {
        let Some(raw) = self.tree.get(k)? else {
            return Ok(());
        };
        let v: serde_json::Value = serde_json::from_slice(&raw)
            .map_err(|e| ClientError::Peer(format!("corrupt pending welcome: {e}")))?;
        let hexv =
            |x: &serde_json::Value| hex::decode(x.as_str().unwrap_or_default()).unwrap_or_default();
        let welcome = hexv(&v["welcome"]);
        let wrappers = v["wrappers"]
            .as_array()
            .map(|a| a.iter().map(|p| (hexv(&p[0]), hexv(&p[1]))).collect())
            .unwrap_or_default();
        let newest = self.newest_id(gid).await?;
        self.send_welcomes(&welcome, newest, wrappers).await?;
        self.tree.remove(k)?;
        Ok(())
    }

    /// Creates a group with `members` (inbox ids): every live installation of each member and
    /// this inbox's other installations are added. Returns the group id.
    pub async fn create_group(
        &mut self,
        name: &str,
        description: &str,
        members: &[String],
    ) -> Result<Vec<u8>> {
        let mut membership = BTreeMap::new();
        let mut wanted = Vec::new();
        let me = self.inbox_id.clone();
        for inbox in std::iter::once(&me).chain(members) {
            let (st, seq) = self.inbox_state(inbox).await?;
            membership.insert(inbox.clone(), seq);
            wanted.extend(
                st.installations()
                    .filter(|k| *k != self.key.public())
                    .map(|k| (inbox.clone(), k.to_vec())),
            );
        }
        let (kps, wrappers) = self.usable_key_packages(&wanted).await?;
        let created = group::create_best(
            &self.provider,
            &self.key,
            &me,
            group::Kind::Group { name, description },
            kps,
            &membership,
            &mut rand::rngs::OsRng,
        )?;
        self.announce_created(created, b"", wrappers).await
    }

    /// Adds member inboxes (all their live installations) to a group, if its policy lets us.
    pub async fn add_members(&mut self, gid: &[u8], inboxes: &[String]) -> Result<()> {
        let mut g = group::load(&self.provider, gid)?.ok_or_else(|| {
            ClientError::Peer(format!("unknown conversation {}", hex::encode(gid)))
        })?;
        self.sync_group_inner(&mut g).await?;
        if !group::may_change_membership(&g, &self.inbox_id, group::MembershipChange::Add)? {
            return Err(ClientError::Peer(
                "the group's policy does not let you add members".into(),
            ));
        }
        let mut membership = group::membership(&g)?;
        let mut wanted = Vec::new();
        for inbox in inboxes {
            let (st, seq) = self.inbox_state(inbox).await?;
            membership.insert(inbox.clone(), seq);
            wanted.extend(st.installations().map(|k| (inbox.clone(), k.to_vec())));
        }
        let (kps, wrappers) = self.usable_key_packages(&wanted).await?;
        if kps.is_empty() {
            return Err(ClientError::Peer(
                "none of those inboxes has a usable key package".into(),
            ));
        }
        let kps = group::key_packages_for(&g, kps);
        if kps.is_empty() {
            return Err(ClientError::Peer("none of those inboxes can join this group (a post-quantum group needs Gatehouse installations)".into()));
        }
        let staged =
            group::commit_membership(&self.provider, &self.key, &mut g, kps, &[], &membership)?;
        if !self.publish_commit(&mut g, staged, wrappers).await? {
            return Err(ClientError::Peer(
                "another member's change came first; try again".into(),
            ));
        }
        Ok(())
    }

    /// Removes member inboxes (all their installations) from a group, if its policy lets us.
    pub async fn remove_members(&mut self, gid: &[u8], inboxes: &[String]) -> Result<()> {
        let mut g = group::load(&self.provider, gid)?.ok_or_else(|| {
            ClientError::Peer(format!("unknown conversation {}", hex::encode(gid)))
        })?;
        self.sync_group_inner(&mut g).await?;
        if !group::may_change_membership(&g, &self.inbox_id, group::MembershipChange::Remove)? {
            return Err(ClientError::Peer(
                "the group's policy does not let you remove members".into(),
            ));
        }
        let keys: Vec<Vec<u8>> = group::leaves(&g)
            .into_iter()
            .filter(|(i, _)| inboxes.contains(i))
            .map(|(_, k)| k)
            .collect();
        if keys.is_empty() {
            return Err(ClientError::Peer(
                "none of those inboxes is a member".into(),
            ));
        }
        let mut membership = group::membership(&g)?;
        membership.retain(|i, _| !inboxes.contains(i));
        let staged = group::commit_membership(
            &self.provider,
            &self.key,
            &mut g,
            vec![],
            &keys,
            &membership,
        )?;
        if !self.publish_commit(&mut g, staged, vec![]).await? {
            return Err(ClientError::Peer(
                "another member's change came first; try again".into(),
            ));
        }
        Ok(())
    }

    /// Asks to leave a group (XMTP's `leave_request`): a member allowed to remove members takes
    /// this inbox out at its next read.
    pub async fn leave(&mut self, gid: &[u8]) -> Result<()> {
        let request = gatehouse_wire::message_contents::content_types::LeaveRequest {
            authenticated_note: None,
        };
        let c = content::with_fallback(
            mc::ContentTypeId {
                authority_id: "xmtp.org".into(),
                type_id: "leave_request".into(),
                version_major: 1,
                version_minor: 0,
            },
            gatehouse_wire::Message::encode_to_vec(&request),
            Some("(left the group)".into()),
        );
        self.send(gid, &c, None).await?;
        Ok(())
    }

    /// Changes a group's metadata or roles, if its policy lets us.
    pub async fn update_metadata(
        &mut self,
        gid: &[u8],
        update: group::MetadataUpdate,
    ) -> Result<()> {
        let mut g = group::load(&self.provider, gid)?.ok_or_else(|| {
            ClientError::Peer(format!("unknown conversation {}", hex::encode(gid)))
        })?;
        self.sync_group_inner(&mut g).await?;
        let exts = group::updated_extensions(&g, &update)?;
        if let Some(rule) = group::extensions_policy_violation(&g, &self.inbox_id, &exts)? {
            return Err(ClientError::Peer(rule.replace("this member", "you")));
        }
        let staged = group::commit_extensions(&self.provider, &self.key, &mut g, exts)?;
        if !self.publish_commit(&mut g, staged, vec![]).await? {
            return Err(ClientError::Peer(
                "another member's change came first; try again".into(),
            ));
        }
        Ok(())
    }

    /// A conversation's kind, name, epoch, members and roles.
    pub fn conversation_info(&self, gid: &[u8]) -> Result<serde_json::Value> {
        let g = group::load(&self.provider, gid)?.ok_or_else(|| {
            ClientError::Peer(format!("unknown conversation {}", hex::encode(gid)))
        })?;
        let md = group::group_metadata(&g)?;
        let mm = group::mutable_metadata(&g)?;
        let mut members: Vec<String> = group::leaves(&g).into_iter().map(|(i, _)| i).collect();
        members.sort();
        members.dedup();
        let kind = if md.conversation_type == mc::ConversationType::Dm as i32 {
            "dm"
        } else {
            "group"
        };
        Ok(serde_json::json!({
            "conversation": hex::encode(gid),
            "kind": kind,
            "name": mm.attributes.get("group_name").cloned().unwrap_or_default(),
            "description": mm.attributes.get("description").cloned().unwrap_or_default(),
            "epoch": g.epoch().as_u64(),
            "ciphersuite": format!("{:?}", g.ciphersuite()),
            "creator": md.creator_inbox_id,
            "members": members,
            "admins": mm.admin_list.map(|l| l.inbox_ids).unwrap_or_default(),
            "super_admins": mm.super_admin_list.map(|l| l.inbox_ids).unwrap_or_default(),
            "active": group::is_active(&g),
            "forked": self.fork_state(gid)?,
        }))
    }

    /// Whether a conversation's membership is due to be brought up to date: not looked at
    /// within [`MEMBERSHIP_CHECK_INTERVAL`] (in this process), or a re-add (after a fork) or
    /// leave request waits.
    fn membership_due(&self, gid: &[u8]) -> bool {
        let recent = self
            .membership_checked
            .get(gid)
            .is_some_and(|t| t.elapsed() < MEMBERSHIP_CHECK_INTERVAL);
        let requested = || {
            [b"readd/".as_slice(), b"leave/".as_slice()]
                .iter()
                .any(|kind| {
                    self.tree
                        .scan_prefix([kind, gid, b"/"].concat())
                        .next()
                        .is_some()
                })
        };
        !recent || requested()
    }

    /// Joins new conversations, then reads every conversation.
    pub async fn sync_all(&mut self) -> Result<Vec<Received>> {
        self.sync_welcomes().await?;
        let gids = self.conversations()?.into_iter().map(|(g, _)| g).collect();
        let out = self.read_pages(gids, true, Default::default()).await?;
        if let Err(e) = self.sync_consent().await {
            tracing::warn!(error = %e, "consent sync failed; will retry");
        }
        let out = self.gate(out)?;
        flush_tree(&self.tree).await?;
        Ok(out)
    }

    /// Reads one conversation's new messages (not yet consent-gated). Returns them with the
    /// group when its membership is to be brought up to date (by the pass, for several
    /// conversations at once: [`Client::maintain_memberships`]) — always, or
    /// (`always_membership` false) only when it was not within [`MEMBERSHIP_CHECK_INTERVAL`].
    /// `states` are the identity states the read pass fetched so far, `first` the first page,
    /// fetched ahead. An unknown conversation reads as nothing.
    async fn read_conversation(
        &mut self,
        gid: &[u8],
        always_membership: bool,
        states: &mut BTreeMap<String, identity::InboxState>,
        first: Option<Vec<mpb::GroupMessage>>,
    ) -> Result<(Vec<Received>, Option<openmls_group::MlsGroup>)> {
        let Some(mut g) = group::load(&self.provider, gid)? else {
            return Ok((Vec::new(), None));
        };
        let out = self.sync_group_with(&mut g, states, first, true).await?;
        let due = always_membership || self.membership_due(gid);
        Ok((out, due.then_some(g)))
    }

    /// Which of `asked` (inbox, log position) have identity updates after that position: one
    /// request for them all.
    async fn identity_logs_went_on(
        &self,
        asked: &BTreeSet<(String, u64)>,
    ) -> Result<BTreeSet<(String, u64)>> {
        if asked.is_empty() {
            return Ok(BTreeSet::new());
        }
        let requests = asked
            .iter()
            .map(|(inbox, seq)| ipb::get_identity_updates_request::Request {
                inbox_id: inbox.clone(),
                sequence_id: *seq,
            })
            .collect();
        let resp = self
            .ids
            .clone()
            .get_identity_updates(ipb::GetIdentityUpdatesRequest { requests })
            .await?
            .into_inner();
        // Answered in the order asked (an inbox may be asked at two positions).
        if resp.responses.len() != asked.len()
            || resp
                .responses
                .iter()
                .zip(asked)
                .any(|(r, (inbox, _))| r.inbox_id != *inbox)
        {
            return Err(ClientError::Peer(
                "the node's identity updates do not match the inboxes asked for".into(),
            ));
        }
        Ok(resp
            .responses
            .iter()
            .zip(asked)
            .filter(|(r, _)| !r.updates.is_empty())
            .map(|(_, a)| a.clone())
            .collect())
    }

    /// Brings the memberships of a read pass's conversations up to date
    /// ([`Client::maintain_membership`]), with one question to the node about all their
    /// members' identity logs (was one per conversation, in a row).
    async fn maintain_memberships(&mut self, groups: Vec<openmls_group::MlsGroup>) {
        if groups.is_empty() {
            return;
        }
        let known: Vec<Option<BTreeMap<String, u64>>> = groups
            .iter()
            .map(|g| {
                group::is_active(g)
                    .then(|| group::membership(g).ok())
                    .flatten()
            })
            .collect();
        let asked: BTreeSet<(String, u64)> = known
            .iter()
            .flatten()
            .flat_map(|k| k.iter().map(|(i, s)| (i.clone(), *s)))
            .collect();
        let went_on = self.identity_logs_went_on(&asked).await;
        if let Err(e) = &went_on {
            tracing::warn!(error = %e, "asking for the members' identity updates failed; asking per conversation");
        }
        for (mut g, known) in groups.into_iter().zip(known) {
            let gid = g.group_id().as_slice().to_vec();
            let changed = match (&went_on, known) {
                (Ok(went_on), Some(known)) => Some(
                    known
                        .into_iter()
                        .filter(|pair| went_on.contains(pair))
                        .map(|(inbox, _)| inbox)
                        .collect(),
                ),
                _ => None,
            };
            if let Err(e) = self.maintain_membership(&mut g, changed).await {
                tracing::warn!(conversation = %hex::encode(&gid), error = %e, "membership update failed");
            }
            self.membership_checked
                .insert(gid, std::time::Instant::now());
        }
    }

    /// The peer inbox of a DM conversation.
    pub fn dm_peer(&self, gid: &[u8]) -> Result<Option<String>> {
        Ok(self
            .tree
            .get([b"conv/".as_slice(), gid].concat())?
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .filter(|s| !s.is_empty()))
    }
}

mod channel;
mod consent;
mod deliveries;
mod forks;
mod listen;

pub use listen::{FULL_READ_EVERY, Listener, Streamed};

pub use consent::MAX_REQUESTS;
pub use deliveries::{SetAside, unreadable};

mod openmls_group {
    pub use gatehouse_protocol::group::MlsGroupHandle as MlsGroup;
}
