//! The node's sled store.
//!
//! Trees, and the key layout of each:
//! - `identity`: `seq (u64 BE)` → `inbox_id ‖ 0 ‖ server_ns (u64 BE) ‖ IdentityUpdate bytes`; node-wide order.
//! - `inbox_log`: `inbox_id ‖ 0 ‖ seq (BE)` → `()`; an inbox's log in order.
//! - `identifiers`: `lowercase identifier` → `inbox_id`.
//! - `key_packages`: `installation key` → TLS key package (the latest upload wins).
//! - `group_messages`: `len(gid) ‖ gid ‖ id (BE)` → `GroupMessage` bytes.
//! - `welcomes`: `len(key) ‖ key ‖ id (BE)` → `WelcomeMessage` bytes.
//! - `commit_log`: `len(gid) ‖ gid ‖ seq (BE)` → `CommitLogEntry` bytes.
//! - `meta`: counters.
//!
//! The stored group messages and welcomes are exactly the ciphertexts clients sent.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering::SeqCst;

use gatehouse_wire::Message as _;
use gatehouse_wire::associations::IdentityUpdate;

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    /// Stored bytes did not decode: the store is corrupt.
    #[error("corrupt record in {0}")]
    Corrupt(&'static str),
    /// The store is damaged or unreadable (found at open).
    #[error(transparent)]
    Integrity(#[from] gatehouse_store::IntegrityError),
}

/// The node's persistent state.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    /// The seal of an on-disk store (`None` for a temporary one).
    sealed: Option<std::sync::Arc<gatehouse_store::Sealed>>,
    identity: sled::Tree,
    inbox_log: sled::Tree,
    identifiers: sled::Tree,
    key_packages: sled::Tree,
    group_messages: sled::Tree,
    welcomes: sled::Tree,
    commit_log: sled::Tree,
    meta: sled::Tree,
    /// Concurrent requests' flushes, shared.
    flushes: std::sync::Arc<gatehouse_store::GroupFlush>,
    /// Held while group messages get their ids and are stored (see
    /// [`Store::append_group_messages`]).
    appending: std::sync::Arc<std::sync::Mutex<()>>,
    /// How far group-message ids are stored, and how far they are on disk (see
    /// [`Store::group_messages`]).
    watermark: std::sync::Arc<Watermark>,
}

/// Group-message ids stored (`assigned`: every id up to it has been written) and durable
/// (`durable`: every id up to it is on disk), and the same for welcomes. Readers see only
/// durable ones: a reader that saw a message a crash then lost would have its cursor past it,
/// and the id would be handed out again to a new message, which that reader would then never
/// read.
#[derive(Debug, Default)]
struct Watermark {
    assigned: std::sync::atomic::AtomicU64,
    durable: std::sync::atomic::AtomicU64,
    welcomes_assigned: std::sync::atomic::AtomicU64,
    welcomes_durable: std::sync::atomic::AtomicU64,
}

fn prefixed(prefix: &[u8], id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 9);
    k.push(prefix.len().min(255) as u8);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn prefix_of(prefix: &[u8]) -> Vec<u8> {
    let mut k = vec![prefix.len().min(255) as u8];
    k.extend_from_slice(prefix);
    k
}

fn id_of(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[key.len() - 8..]);
    u64::from_be_bytes(b)
}

/// One entry of an inbox's log.
#[derive(Clone, Debug)]
pub struct LoggedUpdate {
    /// Node-wide sequence id.
    pub sequence_id: u64,
    /// When the node stored it.
    pub server_timestamp_ns: u64,
    /// The update.
    pub update: IdentityUpdate,
}

impl Store {
    /// Opens (or creates) the store in `dir`, with sled's default page cache (1 GiB at most).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(dir, None)
    }

    /// Opens (or creates) the store in `dir`; `cache_bytes` bounds sled's page cache (the
    /// largest part of the store's memory).
    pub fn open_with_cache(dir: &Path, cache_bytes: Option<u64>) -> Result<Self, StoreError> {
        let mut config = sled::Config::new().path(dir).flush_every_ms(Some(200));
        if let Some(bytes) = cache_bytes {
            config = config.cache_capacity(bytes);
        }
        let sealed = gatehouse_store::open(config, dir, "the node's store")?;
        let mut store = Self::from_db(sealed.db().clone())?;
        store.sealed = Some(sealed);
        Ok(store)
    }

    /// Makes everything durable and seals the store (clean shutdown).
    pub async fn seal(&self) -> Result<(), StoreError> {
        if let Some(sealed) = self.sealed.clone() {
            tokio::task::spawn_blocking(move || sealed.seal())
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r)
                .map_err(sled::Error::Io)?;
        }
        Ok(())
    }

    /// A throwaway in-memory store (tests).
    pub fn temporary() -> Result<Self, StoreError> {
        Self::from_db(sled::Config::new().temporary(true).open()?)
    }

    fn from_db(db: sled::Db) -> Result<Self, StoreError> {
        let store = Self {
            identity: db.open_tree("identity")?,
            inbox_log: db.open_tree("inbox_log")?,
            identifiers: db.open_tree("identifiers")?,
            key_packages: db.open_tree("key_packages")?,
            group_messages: db.open_tree("group_messages")?,
            welcomes: db.open_tree("welcomes")?,
            commit_log: db.open_tree("commit_log")?,
            meta: db.open_tree("meta")?,
            db,
            sealed: None,
            flushes: Default::default(),
            appending: Default::default(),
            watermark: Default::default(),
        };
        // Whatever is in the store when it opens is on disk.
        let top = store.last_id("message_id");
        store.watermark.assigned.store(top, SeqCst);
        store.watermark.durable.store(top, SeqCst);
        let top = store.last_id("welcome_id");
        store.watermark.welcomes_assigned.store(top, SeqCst);
        store.watermark.welcomes_durable.store(top, SeqCst);
        Ok(store)
    }

    /// The highest id `counter` handed out so far (0 if none).
    fn last_id(&self, counter: &str) -> u64 {
        self.meta
            .get(counter)
            .ok()
            .flatten()
            .and_then(|b| b.as_ref().try_into().ok())
            .map_or(0, u64::from_be_bytes)
    }

    /// Every key and value the node holds, concatenated (for audits: tests search it for
    /// plaintext that must never reach the node).
    pub fn raw_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for name in self.db.tree_names() {
            if let Ok(tree) = self.db.open_tree(&name) {
                for (k, v) in tree.iter().flatten() {
                    out.extend_from_slice(&k);
                    out.extend_from_slice(&v);
                }
            }
        }
        out
    }

    /// Flushes everything written so far to disk (one flush shared by concurrent callers;
    /// on tokio's blocking pool: sled 0.34's `flush_async` deadlocks when several run at
    /// once, spacejam/sled#1308).
    pub async fn flush(&self) -> Result<(), StoreError> {
        // Every id up to `stored` was written before this call, so the flush covers it.
        let stored = self.watermark.assigned.load(SeqCst);
        let welcomes = self.watermark.welcomes_assigned.load(SeqCst);
        self.flushes.flush(&self.db).await?;
        self.watermark.durable.fetch_max(stored, SeqCst);
        self.watermark.welcomes_durable.fetch_max(welcomes, SeqCst);
        Ok(())
    }

    fn next(&self, counter: &str) -> Result<u64, StoreError> {
        self.take_ids(counter, 1)
    }

    /// Takes `n` (at least 1) consecutive ids from `counter`; returns the first.
    fn take_ids(&self, counter: &str, n: u64) -> Result<u64, StoreError> {
        let n = n.max(1);
        let v = self.meta.update_and_fetch(counter, |old| {
            let last = old
                .map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
                .unwrap_or(0)
                + n;
            Some(last.to_be_bytes().to_vec())
        })?;
        let last = v
            .map(|b| u64::from_be_bytes(b.as_ref().try_into().unwrap_or([0; 8])))
            .unwrap_or(n);
        Ok(last + 1 - n)
    }

    /// The log of an inbox after `after` (exclusive).
    pub fn inbox_log(&self, inbox_id: &str, after: u64) -> Result<Vec<LoggedUpdate>, StoreError> {
        let mut prefix = inbox_id.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for item in self.inbox_log.scan_prefix(&prefix) {
            let (k, _) = item?;
            let seq = id_of(&k);
            if seq <= after {
                continue;
            }
            let v = self
                .identity
                .get(seq.to_be_bytes())?
                .ok_or(StoreError::Corrupt("identity"))?;
            out.push(decode_logged(seq, &v)?);
        }
        Ok(out)
    }

    /// Appends a (validated) update to an inbox's log; returns its sequence id.
    pub fn append_update(
        &self,
        update: &IdentityUpdate,
        now_ns: u64,
        identifiers_added: &[String],
        identifiers_removed: &[String],
    ) -> Result<u64, StoreError> {
        let seq = self.next("identity_seq")?;
        let mut v = update.inbox_id.as_bytes().to_vec();
        v.push(0);
        v.extend_from_slice(&now_ns.to_be_bytes());
        v.extend_from_slice(&update.encode_to_vec());
        self.identity.insert(seq.to_be_bytes(), v)?;
        let mut k = update.inbox_id.as_bytes().to_vec();
        k.push(0);
        k.extend_from_slice(&seq.to_be_bytes());
        self.inbox_log.insert(k, &[])?;
        for id in identifiers_added {
            self.identifiers
                .insert(id.to_lowercase().as_bytes(), update.inbox_id.as_bytes())?;
        }
        for id in identifiers_removed {
            self.identifiers.remove(id.to_lowercase().as_bytes())?;
        }
        Ok(seq)
    }

    /// The inbox an identifier belongs to.
    pub fn inbox_of(&self, identifier: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .identifiers
            .get(identifier.to_lowercase().as_bytes())?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Stores an installation's key package.
    pub fn put_key_package(&self, installation: &[u8], tls: &[u8]) -> Result<(), StoreError> {
        self.key_packages.insert(installation, tls)?;
        Ok(())
    }

    /// An installation's latest key package.
    pub fn key_package(&self, installation: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.key_packages.get(installation)?.map(|v| v.to_vec()))
    }

    /// Allocates a group-message id.
    pub fn next_message_id(&self) -> Result<u64, StoreError> {
        self.next("message_id")
    }

    /// Allocates a welcome id.
    fn next_welcome_id(&self) -> Result<u64, StoreError> {
        self.next("welcome_id")
    }

    /// Stores a group message under its group and id.
    pub fn put_group_message(
        &self,
        group_id: &[u8],
        id: u64,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        self.group_messages.insert(prefixed(group_id, id), bytes)?;
        self.watermark.assigned.fetch_max(id, SeqCst);
        Ok(())
    }

    /// Appends messages to their groups (`groups[i]` is message i's group; `encode(i, id)` its
    /// stored bytes once it has its id) as one ordered step: ids are handed out and the
    /// messages stored under one lock, so a message is readable only once every message with a
    /// smaller id is (without it, a reader reading between two concurrent publishes into a group
    /// could see the later one first and move its cursor past the earlier one). Returns, per
    /// message, the id of the message before it in its group (0 if none) and its own id.
    pub fn append_group_messages(
        &self,
        groups: &[Vec<u8>],
        mut encode: impl FnMut(usize, u64) -> Vec<u8>,
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        let _order = self.appending.lock().unwrap_or_else(|p| p.into_inner());
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        // The call's ids in one counter update: consecutive, in message order.
        let first = self.take_ids("message_id", groups.len() as u64)?;
        // Each group's newest message, on disk or not (this publish's flush covers both),
        // looked up once; then the call's own messages follow it.
        let mut last: HashMap<&[u8], u64> = HashMap::new();
        let mut placed = Vec::with_capacity(groups.len());
        for (i, group_id) in groups.iter().enumerate() {
            let before = match last.get(group_id.as_slice()) {
                Some(&id) => id,
                None => self.last_group_message_id(group_id)?,
            };
            let id = first + i as u64;
            self.put_group_message(group_id, id, &encode(i, id))?;
            last.insert(group_id, id);
            placed.push((before, id));
        }
        Ok(placed)
    }

    /// The id of a group's newest stored message (0: none), without reading the message.
    fn last_group_message_id(&self, group_id: &[u8]) -> Result<u64, StoreError> {
        let p = prefix_of(group_id);
        for item in self
            .group_messages
            .range(p.clone()..prefixed(group_id, u64::MAX))
            .rev()
        {
            let (k, _) = item?;
            if k.starts_with(&p) && k.len() == p.len() + 8 {
                return Ok(id_of(&k));
            }
        }
        Ok(0)
    }

    /// Stores a welcome under its recipient key with the next id (`encode(id)` its stored
    /// bytes), in order as [`Store::append_group_messages`] does; returns the id.
    pub fn append_welcome(
        &self,
        key: &[u8],
        encode: impl FnOnce(u64) -> Vec<u8>,
    ) -> Result<u64, StoreError> {
        let _order = self.appending.lock().unwrap_or_else(|p| p.into_inner());
        let id = self.next_welcome_id()?;
        self.welcomes.insert(prefixed(key, id), encode(id))?;
        self.watermark.welcomes_assigned.fetch_max(id, SeqCst);
        Ok(id)
    }

    fn page(
        tree: &sled::Tree,
        prefix: &[u8],
        cursor: u64,
        descending: bool,
        limit: usize,
        upto: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let p = prefix_of(prefix);
        let mut out = Vec::new();
        if descending {
            // Ids below `cursor` (0: any) and not above `upto`.
            let below = if cursor == 0 { u64::MAX } else { cursor };
            let end = prefixed(prefix, below.min(upto.saturating_add(1)));
            for item in tree.range(p.clone()..end).rev() {
                let (k, v) = item?;
                if !k.starts_with(&p) || k.len() != p.len() + 8 {
                    continue;
                }
                out.push((id_of(&k), v.to_vec()));
                if out.len() >= limit {
                    break;
                }
            }
        } else {
            let start = prefixed(prefix, cursor.saturating_add(1));
            for item in tree.range(start..) {
                let (k, v) = item?;
                if !k.starts_with(&p) || k.len() != p.len() + 8 || id_of(&k) > upto {
                    break;
                }
                out.push((id_of(&k), v.to_vec()));
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// A page of a group's messages: ids greater than `cursor` (ascending) or smaller
    /// (descending; 0 = from the newest). Only messages on disk: one stored but not yet
    /// flushed shows once its flush is done (readers never see what a crash could take back).
    pub fn group_messages(
        &self,
        group_id: &[u8],
        cursor: u64,
        descending: bool,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let durable = self.watermark.durable.load(SeqCst);
        Self::page(
            &self.group_messages,
            group_id,
            cursor,
            descending,
            limit,
            durable,
        )
    }

    /// A page of an installation key's welcomes (those on disk, as for group messages).
    pub fn welcomes(
        &self,
        key: &[u8],
        cursor: u64,
        descending: bool,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let durable = self.watermark.welcomes_durable.load(SeqCst);
        Self::page(&self.welcomes, key, cursor, descending, limit, durable)
    }

    /// Appends a commit-log entry; returns its per-group sequence id.
    pub fn append_commit_log(
        &self,
        group_id: &[u8],
        entry: impl FnOnce(u64) -> Vec<u8>,
    ) -> Result<u64, StoreError> {
        let seq = self.next(&format!("commit_log/{}", hex::encode(group_id)))?;
        self.commit_log
            .insert(prefixed(group_id, seq), entry(seq))?;
        Ok(seq)
    }

    /// A page of a group's commit log.
    pub fn commit_log(
        &self,
        group_id: &[u8],
        cursor: u64,
        descending: bool,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        Self::page(
            &self.commit_log,
            group_id,
            cursor,
            descending,
            limit,
            u64::MAX,
        )
    }
}

fn decode_logged(seq: u64, v: &[u8]) -> Result<LoggedUpdate, StoreError> {
    let zero = v
        .iter()
        .position(|b| *b == 0)
        .ok_or(StoreError::Corrupt("identity"))?;
    let rest = &v[zero + 1..];
    if rest.len() < 8 {
        return Err(StoreError::Corrupt("identity"));
    }
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&rest[..8]);
    let update = IdentityUpdate::decode(&rest[8..]).map_err(|_| StoreError::Corrupt("identity"))?;
    Ok(LoggedUpdate {
        sequence_id: seq,
        server_timestamp_ns: u64::from_be_bytes(ts),
        update,
    })
}
