//! The wasmtime component host.
//!
//! Contract: loads plugins that implement `gatehouse:plugin/mapper@0.1.0` (see `wit/`), runs
//! every call under an epoch deadline (wall time), a memory cap and optional fuel, and
//! contains every failure: a trap, timeout, out-of-memory or a reach for the filesystem or
//! network becomes a [`PluginError`], the trapped instance is thrown away and the next call
//! gets a fresh one. Plugins get no WASI filesystem, network or environment: the WASI context
//! is empty, its preopens and network handle are denied, and the only grants are the `host`
//! (log, clock) and `kv` interfaces. This is the only crate that links wasmtime.

// One exception, `Host::compile`: loading a cached compiled component is `unsafe` in wasmtime.
#![deny(unsafe_code)]
#![warn(missing_docs)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

#[allow(missing_docs)]
mod bindings {
    wasmtime::component::bindgen!({ path: "../../wit", world: "mapper" });
}

pub use bindings::gatehouse::plugin::types::{Action, Message, Publish, Send};

/// The first-party MQTT plugin component, built from `plugins/mqtt`.
pub const MQTT_PLUGIN: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/gatehouse_plugin_mqtt.wasm"));

/// The first-party NATS plugin component, built from `plugins/nats`.
pub const NATS_PLUGIN: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/gatehouse_plugin_nats.wasm"));

/// The first-party email plugin component, built from `plugins/email`.
pub const EMAIL_PLUGIN: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/gatehouse_plugin_email.wasm"));

/// A deliberately bad plugin (loops, allocates, traps on request; echoes anything else) for
/// the isolation tests and benchmarks. Not part of the daemon: nothing there refers to it.
#[doc(hidden)]
pub const MISBEHAVE_PLUGIN: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/gatehouse_plugin_misbehave.wasm"));

/// How often the epoch ticks; deadlines are whole ticks (a call runs its deadline, and at most
/// one tick more).
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Per-plugin limits.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Wall-clock budget of one call; past it the call traps with an interrupt.
    pub deadline: Duration,
    /// Largest linear memory, bytes; growing past it traps.
    pub memory_bytes: usize,
    /// Fuel per call, if metering is on.
    pub fuel: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            deadline: Duration::from_millis(500),
            memory_bytes: 64 << 20,
            fuel: None,
        }
    }
}

/// Why a plugin call failed.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The plugin refused the message (its own `error` result).
    #[error("plugin refused: {code}: {message}")]
    Refused {
        /// Short machine-readable code.
        code: String,
        /// Human-readable reason.
        message: String,
    },
    /// The call ran past its deadline.
    #[error("plugin exceeded its {0:?} deadline")]
    Timeout(Duration),
    /// The call used up its fuel.
    #[error("plugin ran out of fuel")]
    OutOfFuel,
    /// The plugin trapped (including a failed memory grow past the cap).
    #[error("plugin trapped: {0}")]
    Trap(String),
    /// The plugin tried to grow its memory past the cap.
    #[error("plugin exceeded its memory cap of {cap} bytes (asked for {asked})")]
    OutOfMemory {
        /// The cap, bytes.
        cap: usize,
        /// What the failed grow asked for, as wasmtime reported it.
        asked: String,
    },
    /// The plugin called an import it is not granted (the WASI filesystem, sockets…).
    #[error("plugin used a capability it is not granted: {0}")]
    Denied(String),
    /// Loading or instantiating failed.
    #[error("plugin could not be loaded: {0}")]
    Load(String),
}

impl PluginError {
    /// A short name for the failure (`refused`, `timeout`, `fuel`, `trap`, `memory`,
    /// `denied`, `load`), as dead-letter records and counters use it.
    pub fn kind(&self) -> &'static str {
        match self {
            PluginError::Refused { .. } => "refused",
            PluginError::Timeout(_) => "timeout",
            PluginError::OutOfFuel => "fuel",
            PluginError::Trap(_) => "trap",
            PluginError::OutOfMemory { .. } => "memory",
            PluginError::Denied(_) => "denied",
            PluginError::Load(_) => "load",
        }
    }
}

struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    plugin: String,
    kv: Option<Arc<Kv>>,
}

/// A plugin's key-value store: a sled tree and a byte quota (keys + values).
pub struct Kv {
    tree: sled::Tree,
    quota: u64,
    used: std::sync::atomic::AtomicU64,
}

impl Kv {
    /// Wraps `tree` (counting what it already holds) with a quota in bytes.
    pub fn new(tree: sled::Tree, quota: u64) -> Self {
        let used: u64 = tree
            .iter()
            .flatten()
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum();
        Self {
            tree,
            quota,
            used: used.into(),
        }
    }

    /// Bytes in use (keys + values).
    pub fn used(&self) -> u64 {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl bindings::gatehouse::plugin::kv::Host for State {
    fn get(&mut self, key: String) -> Option<Vec<u8>> {
        let kv = self.kv.as_ref()?;
        kv.tree
            .get(key.as_bytes())
            .ok()
            .flatten()
            .map(|v| v.to_vec())
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), String> {
        use std::sync::atomic::Ordering;
        let Some(kv) = self.kv.as_ref() else {
            return Err("this plugin has no key-value store".into());
        };
        let old = kv
            .tree
            .get(key.as_bytes())
            .ok()
            .flatten()
            .map_or(0, |v| (key.len() + v.len()) as u64);
        let new = (key.len() + value.len()) as u64;
        let after = kv.used() - old + new;
        if after > kv.quota {
            return Err(format!(
                "quota: {after} bytes would exceed the plugin's {} byte key-value quota",
                kv.quota
            ));
        }
        kv.tree
            .insert(key.as_bytes(), value)
            .map_err(|e| format!("store: {e}"))?;
        kv.used.store(after, Ordering::Relaxed);
        Ok(())
    }

    fn delete(&mut self, key: String) {
        if let Some(kv) = self.kv.as_ref()
            && let Ok(Some(old)) = kv.tree.remove(key.as_bytes())
        {
            kv.used.fetch_sub(
                (key.len() + old.len()) as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl bindings::gatehouse::plugin::host::Host for State {
    fn log(&mut self, level: bindings::gatehouse::plugin::host::Level, message: String) {
        use bindings::gatehouse::plugin::host::Level;
        let plugin = &self.plugin;
        match level {
            Level::Debug => tracing::debug!(plugin, "{message}"),
            Level::Info => tracing::info!(plugin, "{message}"),
            Level::Warn => tracing::warn!(plugin, "{message}"),
            Level::Error => tracing::error!(plugin, "{message}"),
        }
    }

    fn now_ms(&mut self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

impl bindings::gatehouse::plugin::types::Host for State {}

/// The shared engine and its epoch ticker.
#[derive(Clone)]
pub struct Host {
    engine: Engine,
    /// Whether the engine counts fuel (instrumentation that slows every plugin a little).
    metered: bool,
    /// Where compiled components are kept (`<sha256 of the wasm>-<engine hash>.cwasm`).
    cache: Option<std::path::PathBuf>,
}

impl Host {
    /// Creates the engine and starts the epoch ticker thread (it stops when the process does).
    /// No fuel metering: plugins with `Limits::fuel` need [`Host::metered`].
    pub fn new() -> anyhow::Result<Self> {
        Self::build(false)
    }

    /// A host whose engine meters fuel, for plugins with an instruction budget.
    pub fn metered() -> anyhow::Result<Self> {
        Self::build(true)
    }

    fn build(metered: bool) -> anyhow::Result<Self> {
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .consume_fuel(metered)
            .wasm_component_model(true)
            // Plugins are synchronous mappers; without the async ABI's task bookkeeping a call
            // is about a fifth cheaper.
            .concurrency_support(false);
        let engine = Engine::new(&config)?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })?;
        Ok(Self {
            engine,
            metered,
            cache: None,
        })
    }

    /// Keeps compiled components in `dir`, keyed by the component's content hash and the
    /// engine's compatibility hash, so a restart loads them without compiling again.
    pub fn with_cache(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.cache = Some(dir.into());
        self
    }

    /// Compiles `wasm`, or loads its compiled form from the cache (writing it on a miss).
    #[allow(unsafe_code)]
    fn compile(&self, wasm: &[u8]) -> Result<Component, PluginError> {
        use sha2::Digest as _;
        let compile =
            || Component::new(&self.engine, wasm).map_err(|e| PluginError::Load(format!("{e:#}")));
        let Some(dir) = &self.cache else {
            return compile();
        };
        let mut engine_hash = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(
            &self.engine.precompile_compatibility_hash(),
            &mut engine_hash,
        );
        let key = format!(
            "{}-{:016x}.cwasm",
            hex::encode(sha2::Sha256::digest(wasm)),
            std::hash::Hasher::finish(&engine_hash)
        );
        let path = dir.join(key);
        // Read into memory rather than mapped: a file changed in place under a mapping would
        // crash the process.
        if let Ok(bytes) = std::fs::read(&path) {
            // SAFETY: the bytes are a file this host serialised into its own data directory,
            // named by the hash of the component it came from and of the engine's settings;
            // wasmtime still checks the header and refuses an incompatible artifact (then we
            // compile again).
            match unsafe { Component::deserialize(&self.engine, &bytes) } {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cached plugin artifact unusable; compiling again")
                }
            }
        }
        let component = compile()?;
        if let Ok(bytes) = component.serialize() {
            let tmp = path.with_extension("tmp");
            let written = std::fs::create_dir_all(dir)
                .and_then(|_| std::fs::write(&tmp, bytes))
                .and_then(|_| std::fs::rename(&tmp, &path));
            if let Err(e) = written {
                tracing::warn!(path = %path.display(), error = %e, "could not cache the compiled plugin");
            }
        }
        Ok(component)
    }

    /// Compiles and validates a component, returning a plugin ready to instantiate.
    pub fn load(
        &self,
        name: &str,
        wasm: &[u8],
        config: Vec<(String, String)>,
        limits: Limits,
    ) -> Result<Plugin, PluginError> {
        self.load_with_kv(name, wasm, config, limits, None)
    }

    /// [`Self::load`], with a key-value store for the plugin's `kv` import.
    pub fn load_with_kv(
        &self,
        name: &str,
        wasm: &[u8],
        config: Vec<(String, String)>,
        limits: Limits,
        kv: Option<Arc<Kv>>,
    ) -> Result<Plugin, PluginError> {
        if limits.fuel.is_some() && !self.metered {
            return Err(PluginError::Load(
                "a fuel limit needs a metered host (Host::metered)".into(),
            ));
        }
        let component = self.compile(wasm)?;
        let mut linker: Linker<State> = Linker::new(&self.engine);
        let load = |e: wasmtime::Error| PluginError::Load(format!("{e:#}"));
        link_wasi(&mut linker).map_err(load)?;
        bindings::Mapper::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s)
            .map_err(load)?;
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| PluginError::Load(format!("{e:#}")))?;
        let pre = bindings::MapperPre::new(pre).map_err(|e| PluginError::Load(format!("{e:#}")))?;
        let plugin = Plugin {
            name: name.to_string(),
            engine: self.engine.clone(),
            metered: self.metered,
            pre,
            config,
            limits,
            live: Arc::new(Mutex::new(None)),
            kv,
        };
        // Instantiate once now so that a plugin that cannot start fails at load, not per message.
        plugin.with_instance(|_, _| Ok(()))?;
        Ok(plugin)
    }
}

/// A call to an import the plugin is not granted.
#[derive(Debug)]
struct DeniedCall(&'static str);

impl std::fmt::Display for DeniedCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is not granted to plugins", self.0)
    }
}

impl std::error::Error for DeniedCall {}

/// Stands in for the two doors to the outside world: the filesystem's preopened directories
/// and the sockets' network handle. Every file or socket operation needs one of them, so
/// denying these denies all, and the attempt surfaces as `PluginError::Denied` (a fault).
struct Denied;

impl wasmtime::component::HasData for Denied {
    type Data<'a> = Denied;
}

impl wasmtime_wasi::p2::bindings::filesystem::preopens::Host for Denied {
    fn get_directories(
        &mut self,
    ) -> wasmtime::Result<
        Vec<(
            wasmtime::component::Resource<wasmtime_wasi::filesystem::Descriptor>,
            String,
        )>,
    > {
        Err(wasmtime::Error::new(DeniedCall(
            "wasi:filesystem/preopens#get-directories",
        )))
    }
}

impl wasmtime_wasi::p2::bindings::sockets::instance_network::Host for Denied {
    fn instance_network(
        &mut self,
    ) -> wasmtime::Result<wasmtime::component::Resource<wasmtime_wasi::p2::Network>> {
        Err(wasmtime::Error::new(DeniedCall(
            "wasi:sockets/instance-network#instance-network",
        )))
    }
}

/// WASI for plugins: everything a std-built component imports, over an empty context (no
/// environment, stdio that goes nowhere), with the filesystem's and sockets' entry points
/// replaced by [`Denied`].
fn link_wasi(l: &mut Linker<State>) -> wasmtime::Result<()> {
    use wasmtime_wasi::p2::bindings::{filesystem, sockets};
    wasmtime_wasi::p2::add_to_linker_sync(l)?;
    l.allow_shadowing(true);
    filesystem::preopens::add_to_linker::<State, Denied>(l, |_| Denied)?;
    sockets::instance_network::add_to_linker::<State, Denied>(l, |_| Denied)?;
    l.allow_shadowing(false);
    Ok(())
}

struct Live {
    store: Store<State>,
    mapper: bindings::Mapper,
}

/// A loaded plugin. Calls are serialised per plugin; a failed call discards its instance.
#[derive(Clone)]
pub struct Plugin {
    name: String,
    engine: Engine,
    metered: bool,
    pre: bindings::MapperPre<State>,
    config: Vec<(String, String)>,
    limits: Limits,
    live: Arc<Mutex<Option<Live>>>,
    kv: Option<Arc<Kv>>,
}

fn classify(e: wasmtime::Error, limits: &Limits) -> PluginError {
    if let Some(d) = e.downcast_ref::<DeniedCall>() {
        return PluginError::Denied(d.0.to_string());
    }
    let text = format!("{e:#}");
    if let Some((_, rest)) = text.split_once("forcing trap when growing memory to ") {
        return PluginError::OutOfMemory {
            cap: limits.memory_bytes,
            asked: rest
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" "),
        };
    }
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => PluginError::Timeout(limits.deadline),
        Some(wasmtime::Trap::OutOfFuel) => PluginError::OutOfFuel,
        Some(t) => PluginError::Trap(t.to_string()),
        None => PluginError::Trap(text),
    }
}

impl Plugin {
    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn instantiate(&self) -> Result<Live, PluginError> {
        let state = State {
            // Deny by default: no preopens, no environment, no network, no inherited stdio.
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(self.limits.memory_bytes)
                .trap_on_grow_failure(true)
                .build(),
            plugin: self.name.clone(),
            kv: self.kv.clone(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        self.arm(&mut store)?;
        let mapper = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| classify(e, &self.limits))?;
        self.arm(&mut store)?;
        match mapper.call_init(&mut store, &self.config) {
            Ok(Ok(())) => Ok(Live { store, mapper }),
            Ok(Err(e)) => Err(PluginError::Load(format!(
                "init refused: {}: {}",
                e.code, e.message
            ))),
            Err(e) => Err(classify(e, &self.limits)),
        }
    }

    fn arm(&self, store: &mut Store<State>) -> Result<(), PluginError> {
        // The call starts somewhere within a tick, so the first tick can come at once: one
        // more keeps the call running for at least its whole deadline (at most one tick more).
        let ticks = (self.limits.deadline.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64 + 1;
        store.set_epoch_deadline(ticks);
        if !self.metered {
            return Ok(());
        }
        store
            .set_fuel(self.limits.fuel.unwrap_or(u64::MAX))
            .map_err(|e| PluginError::Load(e.to_string()))
    }

    fn with_instance<T>(
        &self,
        f: impl FnOnce(&mut Live, &Plugin) -> Result<T, PluginError>,
    ) -> Result<T, PluginError> {
        let mut guard = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(self.instantiate()?);
        }
        let live = guard.as_mut().expect("instance was just created");
        self.arm(&mut live.store)?;
        let r = f(live, self);
        if matches!(
            r,
            Err(PluginError::Timeout(_)
                | PluginError::OutOfFuel
                | PluginError::Trap(_)
                | PluginError::OutOfMemory { .. }
                | PluginError::Denied(_))
        ) {
            // A trapped instance cannot be re-entered: the next call gets a fresh one.
            *guard = None;
        }
        r
    }

    fn result(
        r: wasmtime::Result<Result<Vec<Action>, bindings::gatehouse::plugin::types::Error>>,
        limits: &Limits,
    ) -> Result<Vec<Action>, PluginError> {
        match r {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => Err(PluginError::Refused {
                code: e.code,
                message: e.message,
            }),
            Err(e) => Err(classify(e, limits)),
        }
    }

    /// Discards the current instance: the next call instantiates afresh (benchmarks use this
    /// to measure instantiation).
    pub fn reset(&self) {
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Maps an external message. Blocking: call from a blocking thread.
    pub fn on_external(&self, msg: &Message) -> Result<Vec<Action>, PluginError> {
        self.with_instance(|live, p| {
            Self::result(
                live.mapper.call_on_external(&mut live.store, msg),
                &p.limits,
            )
        })
    }

    /// Maps a conversation message. Blocking: call from a blocking thread.
    pub fn on_conversation(&self, msg: &Message) -> Result<Vec<Action>, PluginError> {
        self.with_instance(|live, p| {
            Self::result(
                live.mapper.call_on_conversation(&mut live.store, msg),
                &p.limits,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(payload: &[u8]) -> Message {
        Message {
            payload: payload.to_vec(),
            content_type: "application/json".into(),
            metadata: vec![("topic".into(), "devices/t1/up".into())],
            endpoint: "t1".into(),
            conversation: None,
            sender: None,
            verified: false,
            idempotency_key: "k".into(),
        }
    }

    /// The embedded MQTT plugin maps JSON up, refuses garbage, and maps a reply down.
    #[test]
    fn mqtt_plugin_maps_both_ways() {
        let host = Host::new().unwrap();
        let p = host
            .load("mqtt", MQTT_PLUGIN, vec![], Limits::default())
            .unwrap();
        let a = p.on_external(&msg(br#"{"t": 21.5}"#)).unwrap();
        let [Action::Send(s)] = a.as_slice() else {
            panic!("{a:?}")
        };
        assert_eq!(s.content_type, "gatehouse.dev/json:1.0");
        assert_eq!(s.payload, br#"{"t":21.5}"#);
        match p.on_external(&msg(b"\x00garbage")) {
            Err(PluginError::Refused { code, .. }) => assert_eq!(code, "malformed"),
            other => panic!("{other:?}"),
        }
        let mut m = msg(b"hello");
        m.content_type = "xmtp.org/text:1.0".into();
        let a = p.on_conversation(&m).unwrap();
        let [Action::Publish(p)] = a.as_slice() else {
            panic!("{a:?}")
        };
        assert_eq!(p.address, "devices/t1/down");
        assert_eq!(p.payload, b"hello");
    }

    /// A plugin that loops is stopped at its deadline, one that allocates without bound is
    /// stopped at its memory cap, one that traps is contained; each time the next call gets a
    /// fresh instance and works.
    #[test]
    fn faults_are_contained() {
        let host = Host::new().unwrap();
        let limits = Limits {
            deadline: Duration::from_millis(100),
            memory_bytes: 16 << 20,
            fuel: None,
        };
        let p = host.load("bad", MISBEHAVE_PLUGIN, vec![], limits).unwrap();
        let echo = |p: &Plugin| {
            let a = p.on_external(&msg(b"still here")).unwrap();
            assert!(matches!(a.as_slice(), [Action::Send(s)] if s.payload == b"still here"));
        };
        echo(&p);
        assert!(matches!(
            p.on_external(&msg(b"loop")),
            Err(PluginError::Timeout(_))
        ));
        echo(&p);
        match p.on_external(&msg(b"alloc")) {
            Err(PluginError::OutOfMemory { cap, .. }) => assert_eq!(cap, 16 << 20),
            other => panic!("expected a trap at the memory cap, got {other:?}"),
        }
        echo(&p);
        match p.on_external(&msg(b"trap")) {
            Err(PluginError::Trap(_)) => {}
            other => panic!("expected a trap, got {other:?}"),
        }
        echo(&p);
        // Reaching for the host's files calls an import the plugin is not granted.
        match p.on_external(&msg(b"open")) {
            Err(PluginError::Denied(what)) => {
                assert!(what.starts_with("wasi:filesystem/"), "{what}")
            }
            other => panic!("expected the filesystem to be denied, got {other:?}"),
        }
        echo(&p);
        // The host returns what the plugin asked for; limiting it is the daemon's job.
        assert_eq!(p.on_external(&msg(b"many")).unwrap().len(), 10_000);
    }

    /// The key-value store is durable across instances and loads, private to its tree, and
    /// refuses writes past the quota; without a store, writes fail and reads find nothing.
    #[test]
    fn key_value_store_is_durable_and_capped() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let host = Host::new().unwrap();
        let text = |a: Vec<Action>| match a.as_slice() {
            [Action::Send(s)] => String::from_utf8(s.payload.clone()).unwrap(),
            other => panic!("{other:?}"),
        };
        let load = |quota| {
            let kv = Arc::new(Kv::new(db.open_tree("kv/bad").unwrap(), quota));
            host.load_with_kv("bad", MISBEHAVE_PLUGIN, vec![], Limits::default(), Some(kv))
                .unwrap()
        };
        let p = load(1024);
        assert_eq!(text(p.on_external(&msg(b"count")).unwrap()), "1");
        assert_eq!(text(p.on_external(&msg(b"count")).unwrap()), "2");
        p.reset();
        assert_eq!(
            text(p.on_external(&msg(b"count")).unwrap()),
            "3",
            "fresh instance"
        );
        let p = load(1024);
        assert_eq!(
            text(p.on_external(&msg(b"count")).unwrap()),
            "4",
            "reloaded"
        );
        match p.on_external(&msg(b"kvfill")) {
            Err(PluginError::Refused { code, message }) => {
                assert_eq!(code, "quota");
                assert!(message.contains("1024 byte"), "{message}");
            }
            other => panic!("expected the quota to refuse, got {other:?}"),
        }
        let used = Kv::new(db.open_tree("kv/bad").unwrap(), 1024).used();
        assert!(used <= 1024 && used > 900, "{used}");
        // No store configured: the write is refused with a reason.
        let bare = host
            .load("bare", MISBEHAVE_PLUGIN, vec![], Limits::default())
            .unwrap();
        match bare.on_external(&msg(b"count")) {
            Err(PluginError::Refused { code, message }) => {
                assert_eq!(code, "kv");
                assert!(message.contains("no key-value store"));
            }
            other => panic!("{other:?}"),
        }
    }

    /// With fuel metering on, a loop runs out of fuel before its deadline.
    #[test]
    fn fuel_limit() {
        let host = Host::metered().unwrap();
        let limits = Limits {
            deadline: Duration::from_secs(30),
            memory_bytes: 16 << 20,
            fuel: Some(5_000_000),
        };
        let p = host.load("bad", MISBEHAVE_PLUGIN, vec![], limits).unwrap();
        assert!(matches!(
            p.on_external(&msg(b"loop")),
            Err(PluginError::OutOfFuel)
        ));
        // An unmetered host refuses a fuel limit at load rather than ignoring it.
        let unmetered = Host::new().unwrap();
        let limits = Limits {
            fuel: Some(1),
            ..Limits::default()
        };
        assert!(matches!(
            unmetered.load("bad", MISBEHAVE_PLUGIN, vec![], limits),
            Err(PluginError::Load(m)) if m.contains("metered")
        ));
    }

    /// A bad config is refused at load with the plugin's reason.
    /// A compiled plugin is cached by content hash and loaded from the cache next time; a
    /// corrupt cache file is replaced by compiling again.
    #[test]
    fn compiled_plugins_are_cached() {
        let dir = std::env::temp_dir().join(format!("gh-plugin-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let host = Host::new().unwrap().with_cache(&dir);
        let load = || {
            host.load("mqtt", MQTT_PLUGIN, vec![], Limits::default())
                .unwrap()
        };
        load();
        let files: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
        assert_eq!(files.len(), 1);
        let path = files[0].path();
        assert!(path.to_string_lossy().ends_with(".cwasm"));
        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
        let p = load();
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            modified,
            "reused"
        );
        assert!(!p.on_external(&msg(br#"{"t":1}"#)).unwrap().is_empty());
        std::fs::write(&path, b"garbage").unwrap();
        let p = load();
        assert!(!p.on_external(&msg(br#"{"t":1}"#)).unwrap().is_empty());
        assert_ne!(std::fs::read(&path).unwrap(), b"garbage", "rewritten");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_config_fails_at_load() {
        let host = Host::new().unwrap();
        let r = host.load(
            "mqtt",
            MQTT_PLUGIN,
            vec![("format".into(), "xml".into())],
            Limits::default(),
        );
        assert!(matches!(r, Err(PluginError::Load(m)) if m.contains("format")));
    }
}
