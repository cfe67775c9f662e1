//! sled helpers shared by the node, the clients and the daemon, and the pause of their
//! listeners after a failed accept.
//!
//! - [`open`]: a store with a seal, so damage is found at open (below);
//! - [`flush_tree`]: a flush that does not block the async runtime;
//! - [`accept::Pause`]: the back-off of every accept loop (out of file descriptors, a loop that
//!   retried at once would spin).
//!
//! # Damage detection
//!
//! sled 0.34 recovers a damaged log by keeping what precedes the first bad block and dropping
//! the rest, silently; some damage makes it panic instead. Neither may start a daemon that then
//! acts on half its state (a rolled-back MLS group reuses keys; a shrunken inbox forgets
//! acknowledged messages). So every store opened here carries a *seal*:
//!
//! - a write generation in the store (tree `gatehouse-integrity`, key `generation`), and
//! - the same generation in a small file beside sled's own (`DIR/gatehouse.seal`), written
//!   only after a flush made that generation durable.
//!
//! The file therefore never claims more than the log holds. At open, a store whose generation
//! is below the file's lost writes it had made durable: the open fails with
//! [`IntegrityError::Damaged`], naming the directory and the ways out. A panic inside sled's
//! recovery becomes [`IntegrityError::Unreadable`].
//!
//! A background thread seals every [`SEAL_PERIOD`] when something was flushed since the last
//! seal (every flush in the workspace calls [`note_flush`]), and [`Sealed`] seals once more
//! when dropped; [`Sealed::seal`] seals at once (clean shutdown). Idle stores cost nothing.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod accept;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often a written-to store is sealed.
pub const SEAL_PERIOD: Duration = Duration::from_millis(200);

/// The seal file inside a store's directory.
pub const SEAL_FILE: &str = "gatehouse.seal";

const MAGIC: &[u8; 8] = b"GHSEAL01";
const TREE: &str = "gatehouse-integrity";
const KEY: &[u8] = b"generation";

/// Flushes anywhere in the process (see [`note_flush`]).
static FLUSHES: AtomicU64 = AtomicU64::new(0);

/// Records that a sled flush wrote something; the sealers seal at their next round.
pub fn note_flush() {
    FLUSHES.fetch_add(1, Ordering::Relaxed);
}

/// Why a store did not open.
#[derive(Debug, thiserror::Error)]
pub enum IntegrityError {
    /// Another process holds the store's lock.
    #[error(
        "{what} at {dir} is in use by another process (another Gatehouse on the same \
         directory?); stop that one first, or give this one a directory of its own"
    )]
    InUse {
        /// What the store is.
        what: String,
        /// Its directory.
        dir: PathBuf,
    },
    /// sled refused the directory.
    #[error(
        "{what} at {dir} is damaged or was written by an incompatible version: sled cannot \
         open it ({error}), and nothing was started on it. Restore it from a backup, or move \
         {dir} aside to start empty (what it held is then lost)"
    )]
    Open {
        /// What the store is, for the reader.
        what: String,
        /// Its directory.
        dir: PathBuf,
        /// sled's error.
        error: sled::Error,
    },
    /// sled panicked while recovering the log.
    #[error(
        "{what} at {dir} is damaged: sled could not recover its log ({reason}), and nothing \
         was started on it. Restore it from a backup, or move {dir} aside to start empty (what \
         it held is then lost)"
    )]
    Unreadable {
        /// What the store is.
        what: String,
        /// Its directory.
        dir: PathBuf,
        /// sled's panic message.
        reason: String,
    },
    /// The log holds less than it held when it was last sealed.
    #[error(
        "{what} at {dir} is damaged: it was sealed at write generation {sealed} but its log \
         now ends at {found}, so writes it had made durable are gone (a damaged or truncated \
         file), and nothing was started on it. Restore it from a backup; or move {dir} aside \
         to start empty; or, to accept the loss and go on with what is left, delete {seal}"
    )]
    Damaged {
        /// What the store is.
        what: String,
        /// Its directory.
        dir: PathBuf,
        /// The generation the seal file holds.
        sealed: u64,
        /// The generation the log holds.
        found: u64,
        /// The seal file.
        seal: PathBuf,
    },
    /// The seal file is not one.
    #[error(
        "{what} at {dir}: the seal file {seal} is damaged, so the store cannot be checked, and \
         nothing was started on it. Restore the directory from a backup, or, if you know the \
         store is whole, delete {seal}"
    )]
    BadSeal {
        /// What the store is.
        what: String,
        /// Its directory.
        dir: PathBuf,
        /// The seal file.
        seal: PathBuf,
    },
    /// Reading or writing the seal failed.
    #[error("{what} at {dir}: {context}: {source}")]
    Io {
        /// What the store is.
        what: String,
        /// Its directory.
        dir: PathBuf,
        /// The step.
        context: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

/// A sled store with a seal. Derefs to the [`sled::Db`]. Dropping it stops its sealer and
/// seals once more.
pub struct Sealed {
    inner: Arc<Inner>,
    /// Dropping the sender stops the sealer thread.
    sealer: Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
}

struct Inner {
    db: sled::Db,
    counter: sled::Tree,
    /// The seal file and the generation last written to it (held while sealing).
    file: Mutex<(File, u64)>,
    next: AtomicU64,
    /// [`FLUSHES`] at the last seal.
    seen: AtomicU64,
}

impl std::ops::Deref for Sealed {
    type Target = sled::Db;
    fn deref(&self) -> &sled::Db {
        &self.inner.db
    }
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealed").finish_non_exhaustive()
    }
}

fn encode(generation: u64) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&generation.to_le_bytes());
    b[16..].copy_from_slice(&(!generation).to_le_bytes());
    b
}

/// `Ok(None)`: empty (a crash right after creating it). `Err`: not a seal.
fn decode(b: &[u8]) -> Result<Option<u64>, ()> {
    if b.is_empty() {
        return Ok(None);
    }
    if b.len() != 24 || &b[..8] != MAGIC {
        return Err(());
    }
    let generation = u64::from_le_bytes(b[8..16].try_into().map_err(|_| ())?);
    let check = u64::from_le_bytes(b[16..].try_into().map_err(|_| ())?);
    if check != !generation {
        return Err(());
    }
    Ok(Some(generation))
}

thread_local! {
    static OPENING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with a panic caught and kept off stderr (the panic hook stays quiet for this
/// thread meanwhile); returns the panic's message. For library code that panics on input it
/// should refuse: sled recovering a damaged log, a MIME parser's debug assertions.
pub fn catch_quietly<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !OPENING.with(|o| o.get()) {
                previous(info);
            }
        }));
    });
    let outer = OPENING.with(|o| o.replace(true));
    let r = std::panic::catch_unwind(AssertUnwindSafe(f));
    OPENING.with(|o| o.set(outer));
    r.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into())
    })
}

/// Opens the store `config` points at (its `path` must be `dir`), checks it against its
/// seal, and starts its sealer. `what` names it in errors ("the bridge store").
pub fn open(config: sled::Config, dir: &Path, what: &str) -> Result<Arc<Sealed>, IntegrityError> {
    let what = what.to_string();
    let opened = catch_quietly(|| -> sled::Result<(sled::Db, sled::Tree, Option<u64>)> {
        let db = config.open()?;
        let tree = db.open_tree(TREE)?;
        let generation = tree.get(KEY)?.map(|v| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&v[..8.min(v.len())]);
            u64::from_be_bytes(b)
        });
        Ok((db, tree, generation))
    });
    let (db, tree, found) = match opened {
        Ok(Ok(v)) => v,
        Ok(Err(sled::Error::Io(e))) if e.to_string().starts_with("could not acquire lock") => {
            return Err(IntegrityError::InUse {
                what,
                dir: dir.into(),
            });
        }
        Ok(Err(error)) => {
            return Err(IntegrityError::Open {
                what,
                dir: dir.into(),
                error,
            });
        }
        Err(reason) => {
            return Err(IntegrityError::Unreadable {
                what,
                dir: dir.into(),
                reason,
            });
        }
    };
    let seal = dir.join(SEAL_FILE);
    let io = |context, source| IntegrityError::Io {
        what: what.clone(),
        dir: dir.into(),
        context,
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&seal)
        .map_err(|e| io("opening the seal file", e))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| io("reading the seal file", e))?;
    let sealed = decode(&bytes).map_err(|()| IntegrityError::BadSeal {
        what: what.clone(),
        dir: dir.into(),
        seal: seal.clone(),
    })?;
    if let Some(sealed) = sealed
        && found.unwrap_or(0) < sealed
    {
        return Err(IntegrityError::Damaged {
            what,
            dir: dir.into(),
            sealed,
            found: found.unwrap_or(0),
            seal,
        });
    }
    let start = found.unwrap_or(0).max(sealed.unwrap_or(0));
    let inner = Arc::new(Inner {
        db,
        counter: tree,
        file: Mutex::new((file, sealed.unwrap_or(0))),
        next: AtomicU64::new(start + 1),
        seen: AtomicU64::new(FLUSHES.load(Ordering::Relaxed)),
    });
    // Seal now, so protection starts with this run (a store from before seals, or one whose
    // seal was deleted on purpose).
    inner.seal().map_err(|e| io("writing the seal", e))?;
    let (stop, stopped) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("gatehouse-sealer".into())
        .spawn({
            let inner = inner.clone();
            move || sealer(&inner, &stopped)
        })
        .map_err(|e| io("starting the sealer thread", e))?;
    Ok(Arc::new(Sealed {
        inner,
        sealer: Some((stop, thread)),
    }))
}

fn sealer(store: &Inner, stop: &std::sync::mpsc::Receiver<()>) {
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(SEAL_PERIOD) {
        if let Err(e) = store.seal_if_written() {
            tracing::warn!(error = %e, "sealing a store failed (damage detection lags)");
        }
    }
}

impl Sealed {
    /// The store.
    pub fn db(&self) -> &sled::Db {
        &self.inner.db
    }

    /// Makes everything written so far durable and records it in the seal file.
    pub fn seal(&self) -> std::io::Result<()> {
        self.inner.seal()
    }
}

impl Inner {
    fn seal(&self) -> std::io::Result<()> {
        // One seal at a time: a generation written after a later one would leave the store
        // behind its own seal file.
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        self.seen
            .store(FLUSHES.load(Ordering::Relaxed), Ordering::Relaxed);
        let generation = self.next.fetch_add(1, Ordering::Relaxed);
        self.counter
            .insert(KEY, &generation.to_be_bytes())
            .map_err(std::io::Error::other)?;
        self.db.flush().map_err(std::io::Error::other)?;
        file.0.write_all_at(&encode(generation), 0)?;
        file.1 = generation;
        Ok(())
    }

    /// Seals if anything was flushed (here or elsewhere) since the last seal, or if sled has
    /// unflushed writes.
    fn seal_if_written(&self) -> std::io::Result<bool> {
        let flushed = self.db.flush().map_err(std::io::Error::other)?;
        if flushed == 0 && FLUSHES.load(Ordering::Relaxed) == self.seen.load(Ordering::Relaxed) {
            return Ok(false);
        }
        self.seal()?;
        Ok(true)
    }
}

impl Drop for Sealed {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.sealer.take() {
            drop(stop);
            let _ = thread.join();
        }
        if let Err(e) = self.seal() {
            tracing::warn!(error = %e, "sealing a store at close failed");
        }
    }
}

/// Writes a sled tree's pending changes to disk without blocking the async runtime, and
/// records the flush for the sealers.
///
/// sled 0.34's own `flush_async` deadlocks when several run at once (spacejam/sled#1308: every
/// thread of sled's pool waits for a log write that needs a thread of that pool); it stopped
/// the daemon in a crash-loop test. The synchronous flush runs on tokio's blocking pool instead.
pub async fn flush_tree(tree: &sled::Tree) -> sled::Result<usize> {
    let tree = tree.clone();
    let started = std::time::Instant::now();
    let n = tokio::task::spawn_blocking(move || tree.flush())
        .await
        .unwrap_or_else(|e| {
            Err(sled::Error::ReportableBug(format!(
                "flush task failed: {e}"
            )))
        })?;
    // Durations only (the `metrics` crate's global recorder, where one is installed): how
    // fast this disk makes writes durable bounds every path that waits for it.
    metrics::histogram!("gatehouse_store_flush_seconds").record(started.elapsed().as_secs_f64());
    note_flush();
    Ok(n)
}

/// Writes to one tree, applied together ([`Writes::apply`]): what `sled::Batch` is, but
/// knowing its size. sled 0.34's `apply_batch` begins by sealing its log buffer and handing it
/// to its I/O threads — a disk write of its own and their wake-ups — however small the batch;
/// applied here, a single write goes to the tree alone (atomic by itself) and none costs
/// nothing.
#[derive(Debug, Default)]
pub struct Writes {
    ops: Vec<(sled::IVec, Option<sled::IVec>)>,
}

impl Writes {
    /// Sets `key` to `value`.
    pub fn insert<K: Into<sled::IVec>, V: Into<sled::IVec>>(&mut self, key: K, value: V) {
        self.ops.push((key.into(), Some(value.into())));
    }

    /// Removes `key`.
    pub fn remove<K: Into<sled::IVec>>(&mut self, key: K) {
        self.ops.push((key.into(), None));
    }

    /// How many writes it holds (a key written twice counts twice).
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Applies the writes to `tree`, all or none; for a key written more than once, the last
    /// write counts.
    pub fn apply(self, tree: &sled::Tree) -> sled::Result<()> {
        let mut ops = self.ops;
        match ops.len() {
            0 => Ok(()),
            1 => match ops.pop() {
                Some((key, Some(value))) => tree.insert(key, value).map(drop),
                Some((key, None)) => tree.remove(key).map(drop),
                None => Ok(()),
            },
            _ => {
                let mut batch = sled::Batch::default();
                for (key, value) in ops {
                    match value {
                        Some(value) => batch.insert(key, value),
                        None => batch.remove(key),
                    }
                }
                tree.apply_batch(batch)
            }
        }
    }
}

/// Flushes shared by concurrent callers (group commit). A caller whose writes a flush that
/// started after them already covered returns without flushing again; otherwise one flush
/// covers every caller that came before it started. Eight concurrent publishes cost one or two
/// flushes instead of eight in a row.
#[derive(Debug, Default)]
pub struct GroupFlush {
    /// Taken by each caller after its writes.
    tickets: AtomicU64,
    /// The highest ticket whose writes are on disk; held while flushing.
    flushed: tokio::sync::Mutex<u64>,
    /// Flushes done.
    done: AtomicU64,
}

impl GroupFlush {
    /// Returns once everything written to `tree`'s database before the call is on disk.
    pub async fn flush(&self, tree: &sled::Tree) -> sled::Result<()> {
        let mine = self.tickets.fetch_add(1, Ordering::SeqCst) + 1;
        let mut flushed = self.flushed.lock().await;
        if *flushed >= mine {
            return Ok(());
        }
        // Every ticket taken so far belongs to writes made before this flush starts.
        let upto = self.tickets.load(Ordering::SeqCst);
        flush_tree(tree).await?;
        *flushed = upto;
        self.done.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// How many flushes were done.
    pub fn flushes(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Writes` applies none, one or many writes with `sled::Batch`'s meaning: all of them,
    /// the last write of a key counting.
    #[test]
    fn writes_apply_like_a_batch() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        tree.insert("gone", "x").unwrap();
        Writes::default().apply(&tree).unwrap();
        assert_eq!(tree.len(), 1);

        let mut one = Writes::default();
        one.remove("gone");
        assert_eq!(one.len(), 1);
        one.apply(&tree).unwrap();
        assert!(tree.is_empty());
        let mut one = Writes::default();
        one.insert("a", "1");
        one.apply(&tree).unwrap();
        assert_eq!(tree.get("a").unwrap().as_deref(), Some(&b"1"[..]));

        let mut many = Writes::default();
        many.insert("b", "1");
        many.insert("a", "2");
        many.remove("b");
        many.insert("c", "3");
        many.insert("c", "4");
        assert_eq!(many.len(), 5);
        many.apply(&tree).unwrap();
        let all: Vec<(Vec<u8>, Vec<u8>)> = tree
            .iter()
            .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
            .collect();
        assert_eq!(
            all,
            [
                (b"a".to_vec(), b"2".to_vec()),
                (b"c".to_vec(), b"4".to_vec())
            ]
        );
    }

    /// A scratch directory, removed when dropped.
    struct Scratch(PathBuf);
    impl Scratch {
        fn new() -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("gatehouse-integrity-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Self(dir)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn config(dir: &Path) -> sled::Config {
        sled::Config::new().path(dir)
    }

    /// Opens a store that was just closed. sled's I/O threads can still hold the closed
    /// store's file (and lock) for a moment after the last handle went; nothing announces
    /// the release, so this retries for up to 5 s.
    fn reopen(dir: &Path) -> Result<Arc<Sealed>, IntegrityError> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match open(config(dir), dir, "the test store") {
                Err(IntegrityError::InUse { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                r => return r,
            }
        }
    }

    #[test]
    fn seal_round_trips_and_rejects_garbage() {
        assert_eq!(decode(&encode(42)), Ok(Some(42)));
        assert_eq!(decode(&[]), Ok(None));
        let mut b = encode(42);
        b[9] ^= 1;
        assert_eq!(decode(&b), Err(()));
        assert_eq!(decode(b"hello"), Err(()));
    }

    #[test]
    fn a_store_in_use_says_so() {
        let tmp = Scratch::new();
        let dir = tmp.path().join("s");
        let _held = open(config(&dir), &dir, "the test store").unwrap();
        // sled's lock is an flock on its own file descriptor: a second open conflicts even
        // in this process, as a second daemon would.
        let err = open(config(&dir), &dir, "the test store").unwrap_err();
        assert!(matches!(err, IntegrityError::InUse { .. }), "{err}");
        assert!(
            err.to_string().contains("in use by another process"),
            "{err}"
        );
    }

    #[test]
    fn a_whole_store_reopens() {
        let tmp = Scratch::new();
        let dir = tmp.path().join("s");
        {
            let db = open(config(&dir), &dir, "the test store").unwrap();
            db.insert("k", "v").unwrap();
            db.flush().unwrap();
            note_flush();
        }
        let db = reopen(&dir).unwrap();
        assert_eq!(db.get("k").unwrap().as_deref(), Some(&b"v"[..]));
    }

    #[test]
    fn a_store_that_lost_sealed_writes_is_refused() {
        let tmp = Scratch::new();
        let dir = tmp.path().join("s");
        {
            let db = open(config(&dir), &dir, "the test store").unwrap();
            for i in 0u32..5_000 {
                db.insert(i.to_be_bytes(), vec![7u8; 100]).unwrap();
            }
        }
        // What sled does when it drops the end of a damaged log: the seal is ahead.
        let sealed = decode(&std::fs::read(dir.join(SEAL_FILE)).unwrap())
            .unwrap()
            .unwrap();
        std::fs::write(dir.join(SEAL_FILE), encode(sealed + 5)).unwrap();
        let err = reopen(&dir).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, IntegrityError::Damaged { found, .. } if found == sealed),
            "{text}"
        );
        assert!(text.contains("the test store at"), "{text}");
        assert!(text.contains(SEAL_FILE), "{text}");

        // Real damage: the whole log overwritten (sled recovers it as empty, or panics).
        std::fs::write(dir.join(SEAL_FILE), encode(sealed)).unwrap();
        let len = std::fs::metadata(dir.join("db")).unwrap().len();
        std::fs::write(dir.join("db"), vec![0xAA; len as usize]).unwrap();
        let err = reopen(&dir).unwrap_err();
        assert!(
            matches!(
                err,
                IntegrityError::Damaged { .. }
                    | IntegrityError::Unreadable { .. }
                    | IntegrityError::Open { .. }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("is damaged"), "{err}");
    }

    #[test]
    fn a_damaged_seal_is_reported_and_deleting_it_accepts_the_store() {
        let tmp = Scratch::new();
        let dir = tmp.path().join("s");
        drop(open(config(&dir), &dir, "the test store").unwrap());
        std::fs::write(dir.join(SEAL_FILE), b"not a seal").unwrap();
        let err = reopen(&dir).unwrap_err();
        assert!(matches!(err, IntegrityError::BadSeal { .. }), "{err}");
        std::fs::remove_file(dir.join(SEAL_FILE)).unwrap();
        drop(reopen(&dir).unwrap());
        assert!(
            decode(&std::fs::read(dir.join(SEAL_FILE)).unwrap())
                .unwrap()
                .is_some()
        );
    }

    /// Callers that arrive while a flush is running share the next one: eight writers waiting
    /// behind a flush in progress are all covered by a single flush, and a caller that comes
    /// after them flushes again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_flushes_are_shared() {
        let tmp = Scratch::new();
        let db = sled::Config::new().path(tmp.path()).open().unwrap();
        let group = Arc::new(GroupFlush::default());
        // A flush in progress: the lock held.
        let held = group.flushed.lock().await;
        let mut waiting = Vec::new();
        for i in 0u8..8 {
            let (db, group) = (db.clone(), group.clone());
            waiting.push(tokio::spawn(async move {
                db.insert([i], &[i]).unwrap();
                group.flush(&db).await.unwrap();
            }));
        }
        while group.tickets.load(Ordering::SeqCst) < 8 {
            tokio::task::yield_now().await;
        }
        drop(held);
        for w in waiting {
            w.await.unwrap();
        }
        assert_eq!(group.flushes(), 1);
        db.insert(b"later", b"x").unwrap();
        group.flush(&db).await.unwrap();
        assert_eq!(group.flushes(), 2);
    }
}
