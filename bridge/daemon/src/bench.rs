//! `gatehouse bench`: the load harness. One run on one machine measures, side by side:
//!
//! 1. the raw broker hop: MQTT QoS 1 publish → subscribe through the same mosquitto (with
//!    `--nats`: a core NATS publish → subscribe through a nats-server, and the devices and the
//!    daemon's route on NATS throughout);
//! 2. the crypto bound: MLS encrypt + decrypt of the same payload on the suite endpoints use
//!    (one core);
//! 3. end to end, device → agent: devices publish to mosquitto, the daemon (in this process,
//!    the real `bridge::run`) stores, maps, encrypts and publishes to its embedded node, an
//!    agent client reads and decrypts;
//! 4. the reverse, agent → devices;
//! 5. the ratios of 3 to 2 and to 1.
//!
//! Every payload carries its send time, so each hop's per-message latency is measured from
//! the sender's clock to the receiver's (same machine, same clock). Closed loop (as fast as
//! QoS 1 and the pipeline allow) by default; `--rate` paces the senders (open loop) for
//! latency at a given load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, watch};

/// What to run.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Simulated devices (each its own MQTT client and XMTP endpoint).
    pub devices: usize,
    /// Messages per measured path.
    pub messages: usize,
    /// Payload bytes (the JSON body is padded to this size).
    pub payload: usize,
    /// Total send rate, messages per second (open loop); `None`: closed loop.
    pub rate: Option<u64>,
    /// Print JSON instead of the table.
    pub json: bool,
    /// The daemon's `poll_interval_ms` (how often endpoints read their conversations).
    pub poll_ms: u64,
    /// Messages per agent publish on the way back (path 4).
    pub agent_batch: usize,
    /// The daemon's `storage.linger_ms`.
    pub linger_ms: u64,
    /// The daemon's broker connection speaks MQTT 5 (the devices stay on 3.1.1).
    pub mqtt5: bool,
    /// The daemon's `publish_qos` and `subscribe_qos` (the devices publish and subscribe at
    /// QoS 1).
    pub qos: u8,
    /// The devices and the daemon's route on NATS (core subjects through a `nats-server`)
    /// instead of MQTT.
    pub nats: bool,
    /// With `nats`: both ways through a JetStream stream (`BENCH`, file storage): the daemon's
    /// route consumes the devices' messages durably (`stream:`), acknowledging each once it is
    /// stored, and publishes its answers to the stream, each after the stream's
    /// acknowledgement (the devices read them as core subscribers).
    pub jetstream: bool,
}

/// The JetStream stream of a `--jetstream` run, after it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StreamStats {
    pub stream: String,
    /// Messages the stream holds (the devices' hellos, the measured messages both ways).
    pub messages: u64,
    /// Consumers on it (the daemon's durable one).
    pub consumers: usize,
}

/// One path's figures.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PathStats {
    /// Messages that arrived.
    pub messages: usize,
    /// From the first send to the last arrival, seconds.
    pub seconds: f64,
    /// messages / seconds.
    pub msg_per_sec: f64,
    /// Per-message latency, milliseconds: median (for the crypto bound: one encrypt +
    /// decrypt).
    pub p50_ms: Option<f64>,
    /// 90th percentile.
    pub p90_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
    /// The slowest.
    pub max_ms: Option<f64>,
    /// End to end only: CPU time (user + system) per message over the path's run, in
    /// microseconds, of everything on it: this process (the daemon, the agent, the simulated
    /// devices) and the broker. Steadier than msg/s across a machine's moods, and what a
    /// change to the per-message work shows in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_us_per_msg: Option<f64>,
    /// End to end only: how busy the machine's cores were over the path's run (that CPU time
    /// over wall time × cores), 0–1: near 1 the path is bound by CPU, well below by waiting
    /// (disk flushes, round trips, a serial stage).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_busy: Option<f64>,
}

impl PathStats {
    fn from(latencies_ns: &mut [u64], first_send: Instant, last_arrival: Instant) -> PathStats {
        latencies_ns.sort_unstable();
        let q = |p: f64| -> Option<f64> {
            if latencies_ns.is_empty() {
                return None;
            }
            let i = ((latencies_ns.len() as f64 * p).ceil() as usize).clamp(1, latencies_ns.len());
            Some(latencies_ns[i - 1] as f64 / 1e6)
        };
        let seconds = last_arrival
            .duration_since(first_send)
            .as_secs_f64()
            .max(1e-9);
        PathStats {
            messages: latencies_ns.len(),
            seconds,
            msg_per_sec: latencies_ns.len() as f64 / seconds,
            p50_ms: q(0.50),
            p90_ms: q(0.90),
            p99_ms: q(0.99),
            max_ms: q(1.0),
            cpu_us_per_msg: None,
            cpu_busy: None,
        }
    }

    /// With the CPU seconds the path's run used (see [`cpu_secs`]).
    fn with_cpu(mut self, cpu_secs: f64) -> PathStats {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        if self.messages > 0 {
            self.cpu_us_per_msg = Some(cpu_secs * 1e6 / self.messages as f64);
        }
        self.cpu_busy = Some(cpu_secs / (self.seconds * cores));
        self
    }
}

/// CPU time (user + system, seconds; 10 ms resolution) used so far by this process and by
/// process `other` (the broker), for a path's run: read before and after it.
fn cpu_secs(other: u32) -> f64 {
    [std::process::id(), other]
        .into_iter()
        .filter_map(|pid| proc_usage(pid).ok())
        .map(|(_, cpu)| cpu)
        .sum()
}

/// The whole run.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// Simulated devices.
    pub devices: usize,
    /// Messages per path.
    pub messages: usize,
    /// Payload size.
    pub payload_bytes: usize,
    /// Closed loop, or open loop at a rate.
    pub mode: String,
    /// The daemon's poll interval, milliseconds.
    pub poll_ms: u64,
    /// Messages per agent publish on the way back (path 4).
    pub agent_batch: usize,
    /// The daemon's `storage.linger_ms` (how long its intake may wait to batch).
    pub linger_ms: u64,
    /// The MQTT version of the daemon's broker connection (3 for 3.1.1, or 5); none over NATS.
    pub mqtt_version: Option<u8>,
    /// The QoS of the daemon's MQTT publishes and subscriptions; none over NATS.
    pub qos: Option<u8>,
    /// The devices' channel: `mqtt`, `nats` (core subjects) or `nats-jetstream`.
    pub channel: &'static str,
    /// With `--jetstream`: the stream the devices' messages went through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jetstream: Option<StreamStats>,
    /// `debug` or `release`: only release figures mean anything.
    pub build: &'static str,
    /// 1: MQTT QoS 1 through mosquitto (core NATS through nats-server with `--nats`).
    pub broker_hop: PathStats,
    /// 2: MLS encrypt + decrypt.
    pub crypto_bound: PathStats,
    /// 3: device → agent through the daemon.
    pub device_to_agent: PathStats,
    /// 4: agent → device through the daemon.
    pub agent_to_device: PathStats,
    /// 3 split where the node stored each message (its timestamp; the bench's node is
    /// embedded, so it shares the clock): device → stored on the node (broker, the daemon's
    /// queue, mapping, encryption, the publish) …
    pub device_to_node: PathStats,
    /// … and stored on the node → the agent has it (the node's flush and stream, the agent's
    /// read: identity check, decryption, its durable write).
    pub node_to_agent: PathStats,
    /// 4 split where the agent's publish was answered (the node stored it): agent → node
    /// (waiting for the batch's publish, encryption, the agent's state write, the publish) …
    pub agent_to_node: PathStats,
    /// … and answered → the device has it (the node's stream, the daemon's read and
    /// decryption, mapping, the MQTT publish).
    pub node_to_device: PathStats,
    /// 3 / 2, throughput.
    pub e2e_over_crypto: f64,
    /// 3 / 1, throughput.
    pub e2e_over_broker: f64,
    /// Where the daemon's time went during 3 and 4 (its own histograms): stage → (calls,
    /// total seconds).
    pub stages: BTreeMap<String, (u64, f64)>,
}

/// What the stage histograms gained from `before` to `after` (both from [`stages`]): the
/// histograms count from the process's start, set-up included (with 1,000 devices most of
/// the count).
fn stages_between(
    before: &BTreeMap<String, (u64, f64)>,
    after: BTreeMap<String, (u64, f64)>,
) -> BTreeMap<String, (u64, f64)> {
    after
        .into_iter()
        .map(|(stage, (calls, secs))| {
            let (c0, s0) = before.get(&stage).copied().unwrap_or_default();
            (stage, (calls.saturating_sub(c0), (secs - s0).max(0.0)))
        })
        .collect()
}

/// The daemon's stage histograms (`_count`, `_sum`) from its metrics, since the process
/// started.
fn stages() -> BTreeMap<String, (u64, f64)> {
    let text = crate::metrics::render(|| {});
    let mut out: BTreeMap<String, (u64, f64)> = BTreeMap::new();
    for (name, stage) in [
        ("gatehouse_plugin_call_seconds", "plugin calls (map)"),
        (
            "gatehouse_encrypt_send_seconds",
            "MLS encrypt + publish to node",
        ),
        (
            "gatehouse_sync_decrypt_seconds",
            "read + MLS decrypt (endpoints)",
        ),
        (
            "gatehouse_store_flush_seconds",
            "disk flushes (every store)",
        ),
    ] {
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let value: f64 = value.parse().unwrap_or(0.0);
            let e = out.entry(stage.to_string()).or_default();
            if series.starts_with(&format!("{name}_count")) {
                e.0 += value as u64;
            } else if series.starts_with(&format!("{name}_sum")) {
                e.1 += value;
            }
        }
    }
    out
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// `{"seq":N,"ns":T,"pad":"…"}` padded to `size` bytes.
fn body(seq: usize, size: usize) -> String {
    let head = format!("{{\"seq\":{seq},\"ns\":{},\"pad\":\"", now_ns());
    let pad = size.saturating_sub(head.len() + 2);
    format!("{head}{}\"}}", "x".repeat(pad))
}

/// The send time in a body (JSON, or the same text after the plugin re-encoded it).
fn sent_ns(text: &[u8]) -> Option<(usize, u64)> {
    let v: serde_json::Value = serde_json::from_slice(text).ok()?;
    Some((v["seq"].as_u64()? as usize, v["ns"].as_u64()?))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A mosquitto for the run (killed on drop).
struct Broker {
    child: std::process::Child,
    port: u16,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_broker(dir: &Path) -> anyhow::Result<Broker> {
    let port = free_port()?;
    let conf = dir.join("mosquitto.conf");
    // No queue limits: a closed-loop burst must not be dropped by the broker. Nagle off, as
    // recommended for a broker Gatehouse talks to: otherwise its PUBACKs to the daemon can
    // arrive 40 ms late (a delayed ACK), and an endpoint's pass waits for them.
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nmax_inflight_messages 0\nset_tcp_nodelay true\n"
        ),
    )?;
    let mut cmd = std::process::Command::new("mosquitto");
    cmd.arg("-c").arg(&conf);
    spawn_server(cmd, "mosquitto", port)
}

/// A `nats-server` on a free loopback port (with `jetstream`, JetStream on, stored in `dir`).
fn start_nats(dir: &Path, jetstream: bool) -> anyhow::Result<Broker> {
    let port = free_port()?;
    let mut cmd = std::process::Command::new("nats-server");
    cmd.args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .current_dir(dir);
    if jetstream {
        cmd.arg("-js").arg("-sd").arg(dir.join("jetstream"));
    }
    spawn_server(cmd, "nats-server", port)
}

/// Starts `cmd` (the Debian package `name`) and waits until it listens on `port`.
fn spawn_server(mut cmd: std::process::Command, name: &str, port: u16) -> anyhow::Result<Broker> {
    let child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {name} (install the Debian package `{name}`)"))?;
    let broker = Broker { child, port };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("{name} did not start listening on {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(broker)
}

/// An MQTT client whose event loop runs in a task; publishes received go to `rx`.
async fn mqtt_client(
    port: u16,
    id: &str,
    subscribe: Option<&str>,
) -> anyhow::Result<(AsyncClient, mpsc::UnboundedReceiver<(Instant, Vec<u8>)>)> {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(200);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(opts, 10_000);
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, mut ready_rx) = watch::channel(false);
    let want_sub = subscribe.is_some();
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) if !want_sub => {
                    let _ = ready_tx.send(true);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = ready_tx.send(true);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send((Instant::now(), p.payload.to_vec())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    if let Some(filter) = subscribe {
        client.subscribe(filter, QoS::AtLeastOnce).await?;
    }
    tokio::time::timeout(Duration::from_secs(10), ready_rx.wait_for(|r| *r))
        .await
        .context("the MQTT client did not connect")??;
    Ok((client, rx))
}

/// A simulated device: an MQTT client (QoS 1) or a NATS connection (core subjects).
#[derive(Clone)]
enum Device {
    Mqtt(AsyncClient),
    Nats(async_nats::Client),
}

impl Device {
    /// Connects device `id` to the broker of `o`'s channel at `port`.
    async fn connect(port: u16, id: &str, o: &Opts) -> anyhow::Result<Device> {
        Ok(if o.nats {
            Device::Nats(nats_client(port).await?)
        } else {
            Device::Mqtt(mqtt_client(port, id, None).await?.0)
        })
    }

    /// Publishes on `{prefix}/d{d}/up` (MQTT) or `{prefix}.d{d}.up` (NATS).
    async fn publish_up(&self, prefix: &str, d: usize, body: String) -> anyhow::Result<()> {
        match self {
            Device::Mqtt(c) => {
                c.publish(format!("{prefix}/d{d}/up"), QoS::AtLeastOnce, false, body)
                    .await?
            }
            Device::Nats(c) => c.publish(format!("{prefix}.d{d}.up"), body.into()).await?,
        }
        Ok(())
    }
}

async fn nats_client(port: u16) -> anyhow::Result<async_nats::Client> {
    async_nats::connect(format!("nats://127.0.0.1:{port}"))
        .await
        .context("connecting to nats-server")
}

/// What arrives on `{prefix}/+/{leaf}` (MQTT) or `{prefix}.*.{leaf}` (NATS), with its arrival
/// time; the returned guard keeps the subscription.
async fn sink(
    port: u16,
    prefix: &str,
    leaf: &str,
    o: &Opts,
) -> anyhow::Result<(Device, mpsc::UnboundedReceiver<(Instant, Vec<u8>)>)> {
    if !o.nats {
        let filter = format!("{prefix}/+/{leaf}");
        let (c, rx) = mqtt_client(port, &format!("{prefix}-{leaf}-sink"), Some(&filter)).await?;
        return Ok((Device::Mqtt(c), rx));
    }
    use futures::StreamExt;
    let c = nats_client(port).await?;
    let mut sub = c.subscribe(format!("{prefix}.*.{leaf}")).await?;
    // The subscription is in place once the server answered a round trip after it.
    c.flush().await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if tx.send((Instant::now(), m.payload.to_vec())).is_err() {
                return;
            }
        }
    });
    Ok((Device::Nats(c), rx))
}

/// Sends `total` messages spread over `devices` (round robin), paced by `rate` if given.
async fn publish_all(
    clients: &[Device],
    prefix: &str,
    total: usize,
    size: usize,
    rate: Option<u64>,
) -> anyhow::Result<()> {
    let mut tick = rate.map(|r| {
        let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / r.max(1) as f64));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        i
    });
    for seq in 0..total {
        if let Some(t) = tick.as_mut() {
            t.tick().await;
        }
        let d = seq % clients.len();
        clients[d].publish_up(prefix, d, body(seq, size)).await?;
    }
    // NATS publishes are buffered by the client: out before the senders count as done.
    for c in clients {
        if let Device::Nats(c) = c {
            c.flush().await?;
        }
    }
    Ok(())
}

/// Starts the devices publishing `o.messages` on `{prefix}/d{N}/up` (NATS: `{prefix}.d{N}.up`)
/// in a task of their own.
fn spawn_publishers(
    devices: &[Device],
    prefix: &'static str,
    o: &Opts,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let (devices, o) = (devices.to_vec(), o.clone());
    tokio::spawn(async move { publish_all(&devices, prefix, o.messages, o.payload, o.rate).await })
}

/// Collects up to `total` distinct messages, giving up after `patience` without one: their
/// latencies, each one's sequence number and arrival (nanoseconds since the epoch), and when
/// the last arrived.
async fn collect(
    rx: &mut mpsc::UnboundedReceiver<(Instant, Vec<u8>)>,
    total: usize,
    patience: Duration,
) -> (Vec<u64>, Vec<(usize, u64)>, Instant) {
    let mut lat = Vec::with_capacity(total);
    let mut arrivals = Vec::with_capacity(total);
    let mut seen = std::collections::HashSet::new();
    let mut last = Instant::now();
    while lat.len() < total {
        match tokio::time::timeout(patience, rx.recv()).await {
            Ok(Some((at, body))) => {
                if let Some((seq, ns)) = sent_ns(&body)
                    && seen.insert(seq)
                {
                    // Arrival on this process's clock, as nanoseconds since the epoch.
                    let arrived = now_ns().saturating_sub(at.elapsed().as_nanos() as u64);
                    lat.push(arrived.saturating_sub(ns));
                    arrivals.push((seq, arrived));
                    last = at;
                }
            }
            _ => break,
        }
    }
    (lat, arrivals, last)
}

async fn broker_hop(port: u16, o: &Opts) -> anyhow::Result<PathStats> {
    let (_sub, mut rx) = sink(port, "bench", "up", o).await?;
    let mut devices = Vec::new();
    for d in 0..o.devices {
        devices.push(Device::connect(port, &format!("bench-raw-{d}"), o).await?);
    }
    let started = Instant::now();
    let sender = spawn_publishers(&devices, "bench", o);
    let (mut lat, _, last) = collect(&mut rx, o.messages, Duration::from_secs(30)).await;
    sender.await??;
    Ok(PathStats::from(&mut lat, started, last))
}

/// MLS encrypt + decrypt on the post-quantum suite (what Gatehouse uses between its own
/// installations), one core, `n` messages of `size` bytes.
fn crypto_bound(n: usize, size: usize) -> anyhow::Result<PathStats> {
    use gatehouse_protocol::group::{self, Kind, PQ_CIPHERSUITE, Provider};
    use gatehouse_protocol::identity::InstallationKey;
    let member = |i: u8| {
        let mut seed = [0u8; 32];
        seed[0] = i;
        seed[1] = 0xbe;
        (
            format!("{i:064x}"),
            InstallationKey::from_seed(&seed),
            Provider::default(),
        )
    };
    let (a_inbox, a_key, a_provider) = member(1);
    let (b_inbox, b_key, b_provider) = member(2);
    let kp = group::build_key_package(&b_provider, &b_inbox, &b_key, &mut rand::rngs::OsRng)?;
    let v = group::validate_key_package(&a_provider, &kp.tls)?;
    let membership: BTreeMap<String, u64> = [(a_inbox.clone(), 1)].into();
    let created = group::create(
        &a_provider,
        &a_key,
        &a_inbox,
        Kind::Group {
            name: "bench",
            description: "",
        },
        vec![v.pq_key_package.context("no post-quantum key package")?],
        &membership,
        &mut rand::rngs::OsRng,
        PQ_CIPHERSUITE,
    )?;
    let mut ga = created.group;
    let mut gb = group::join(&b_provider, &created.welcome)?;
    let plaintext = gatehouse_protocol::content::seal_envelope(
        &gatehouse_protocol::content::text(&"x".repeat(size)),
        "bench",
    );
    let started = Instant::now();
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let ct = group::encrypt(&a_provider, &a_key, &mut ga, &plaintext)?;
        group::process(&b_provider, &mut gb, &ct)?;
        lat.push(t.elapsed().as_nanos() as u64);
    }
    Ok(PathStats::from(&mut lat, started, Instant::now()))
}

/// Device → agent and agent → device through the real daemon.
/// Path 3 (with its split at the node: device → node, node → agent) and path 4 (with its
/// split where the agent's publish was answered: agent → node, node → device).
struct EndToEnd {
    /// The daemon's stage histograms over paths 3 and 4 only.
    stages: BTreeMap<String, (u64, f64)>,
    up: PathStats,
    to_node: PathStats,
    from_node: PathStats,
    down: PathStats,
    down_to_node: PathStats,
    down_from_node: PathStats,
}

/// Runs paths 3 and 4; `broker_pid`: the broker's process, whose CPU counts too.
async fn end_to_end(dir: &Path, port: u16, broker_pid: u32, o: &Opts) -> anyhow::Result<EndToEnd> {
    let node_port = free_port()?;
    let admin_port = free_port()?;
    let node_url = format!("http://127.0.0.1:{node_port}");
    // The agent: an XMTP client of its own.
    let agent_db = sled::Config::new()
        .path(dir.join("agent"))
        .open()
        .context("opening the agent's store")?;
    let agent_tree = agent_db.open_tree("agent")?;
    if o.jetstream {
        let js = async_nats::jetstream::new(nats_client(port).await?);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: STREAM.into(),
            // A JetStream route publishes its answers to the stream too (acknowledged,
            // deduplicated by Nats-Msg-Id); the devices read them as core subscribers.
            subjects: vec!["devices.*.up".into(), "devices.*.down".into()],
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating the JetStream stream {STREAM}: {e}"))?;
    }
    let channel = if o.nats {
        let stream = if o.jetstream {
            format!(", stream: {STREAM}")
        } else {
            String::new()
        };
        format!(
            "channels: {{nats: {{urls: [\"nats://127.0.0.1:{port}\"]}}}}\n\
             plugins: {{nats: {{builtin: nats}}}}\n\
             routes:\n  - {{name: devices, channel: nats, subscribe: \"devices.{{device}}.up\", reply: \"devices.{{device}}.down\", plugin: nats, agents: [AGENT], max_payload: 1048576{stream}}}\n"
        )
    } else {
        format!(
            "channels: {{mqtt: {{port: {port}, client_id: gatehouse-bench, protocol: {}, publish_qos: {}, subscribe_qos: {}}}}}\n\
             plugins: {{mqtt: {{builtin: mqtt}}}}\n\
             routes:\n  - {{name: devices, channel: mqtt, subscribe: \"devices/{{device}}/up\", reply: \"devices/{{device}}/down\", plugin: mqtt, agents: [AGENT], max_payload: 1048576}}\n",
            if o.mqtt5 { "5" } else { "\"3.1.1\"" },
            o.qos,
            o.qos.max(1),
        )
    };
    let config = format!(
        "data_dir: {}\nnode: {{listen: 127.0.0.1:{node_port}}}\nadmin: {{listen: 127.0.0.1:{admin_port}}}\n\
         poll_interval_ms: {}\nstorage: {{linger_ms: {}}}\nlog: {{level: warn}}\n{channel}",
        dir.join("data").display(),
        o.poll_ms,
        o.linger_ms,
    );
    // The agent's inbox id is known before it registers (derived from its key); the channel
    // connects lazily, once the daemon's node listens.
    let channel = gatehouse_client::connect(&node_url).await?;
    let mut agent = gatehouse_client::Client::open_owned(agent_tree, channel, None, None)?;
    let agent_inbox = agent.inbox_id().to_string();
    let (stop_tx, stop_rx) = watch::channel(false);
    let config = config.replace("AGENT", &format!("\"{agent_inbox}\""));
    let path = dir.join("config.yaml");
    std::fs::write(&path, config)?;
    let cfg = crate::config::Config::load(&path)?;
    let daemon = tokio::spawn(crate::bridge::run(cfg, stop_rx));
    // The node listens once the daemon is up.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", admin_port)).is_err() {
        if Instant::now() > deadline || daemon.is_finished() {
            bail!("the daemon did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.register().await?;

    // Warm-up: each device says hello once (endpoints register, DMs are created).
    let mut devices = Vec::new();
    for d in 0..o.devices {
        devices.push(Device::connect(port, &format!("bench-dev-{d}"), o).await?);
    }
    for (d, c) in devices.iter().enumerate() {
        c.publish_up("devices", d, body(usize::MAX - d, o.payload))
            .await?;
    }
    // The agent streams, as XMTP agents do: the node says which conversation has news.
    let mut listener = gatehouse_client::Listener::new();
    let mut conversations: BTreeMap<String, String> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60 + o.devices as u64 / 10);
    let mut said_hello = Instant::now();
    while conversations.len() < o.devices {
        // Core NATS keeps nothing for a subscriber that is not there yet: until the daemon has
        // subscribed, the hellos are lost, so they are said again (their sequence numbers are
        // outside the measured range). A JetStream stream keeps them.
        if o.nats && !o.jetstream && said_hello.elapsed() > Duration::from_secs(1) {
            for (d, c) in devices.iter().enumerate() {
                c.publish_up("devices", d, body(usize::MAX - d, o.payload))
                    .await?;
            }
            said_hello = Instant::now();
        }
        for m in agent
            .listen(&mut listener, Duration::from_millis(100))
            .await?
        {
            if let Some(d) = m.delivery {
                agent.delivered(d)?;
            }
            if m.is_transcript() {
                continue;
            }
            conversations.insert(m.sender_inbox.clone(), m.conversation.clone());
        }
        if conversations.len() < o.devices && Instant::now() > deadline {
            bail!(
                "warm-up: {} of {} devices reached the agent",
                conversations.len(),
                o.devices
            );
        }
    }
    // A real agent allows the devices it talks to (their messages are then not requests).
    for inbox in conversations.keys() {
        agent
            .set_consent(
                gatehouse_protocol::consent::Entity::InboxId,
                inbox,
                gatehouse_protocol::consent::State::Allowed,
            )
            .await?;
    }

    // Device → agent.
    eprintln!("  3/4 device -> agent…");
    let stages_before = stages();
    let cpu_before = cpu_secs(broker_pid);
    let started = Instant::now();
    let sender = spawn_publishers(&devices, "devices", o);
    let mut lat = Vec::with_capacity(o.messages);
    let (mut to_node, mut from_node) = (
        Vec::with_capacity(o.messages),
        Vec::with_capacity(o.messages),
    );
    let mut seen = std::collections::HashSet::new();
    let mut last = Instant::now();
    let mut quiet_since = Instant::now();
    while seen.len() < o.messages && quiet_since.elapsed() < Duration::from_secs(30) {
        let batch = agent
            .listen(&mut listener, Duration::from_millis(100))
            .await?;
        let arrived = now_ns();
        if batch.is_empty() {
            continue;
        }
        quiet_since = Instant::now();
        for m in batch {
            if let Some(d) = m.delivery {
                agent.delivered(d)?;
            }
            if let Some((seq, ns)) = m.text.as_deref().and_then(|t| sent_ns(t.as_bytes()))
                && seq < o.messages
                && seen.insert(seq)
            {
                lat.push(arrived.saturating_sub(ns));
                to_node.push(m.sent_at_ns.saturating_sub(ns));
                from_node.push(arrived.saturating_sub(m.sent_at_ns));
                last = Instant::now();
            }
        }
    }
    sender.await??;
    let up = PathStats::from(&mut lat, started, last).with_cpu(cpu_secs(broker_pid) - cpu_before);
    let to_node = PathStats::from(&mut to_node, started, last);
    let from_node = PathStats::from(&mut from_node, started, last);
    // The agent no longer reads its stream: closed, rather than left to fill up with news of
    // its own sends (an unread stream holds the node's stop until the daemon gives up on it).
    drop(listener);
    // One poll interval of quiet between the paths: the daemon finishes the first path's
    // tail (its last deliveries' bookkeeping, the endpoints' reads of their own sends), so
    // the way back's first messages are not measured against it (they were, by up to 20 ms).
    tokio::time::sleep(Duration::from_millis(o.poll_ms.max(100))).await;

    // Agent → devices: the agent writes into each device's DM, `agent_batch` messages per
    // publish (one publish every `agent_batch / rate` seconds in open loop).
    let (_sink, mut rx) = sink(port, "devices", "down", o).await?;
    let dms: Vec<Vec<u8>> = conversations
        .values()
        .map(|c| hex::decode(c).context("conversation id"))
        .collect::<anyhow::Result<_>>()?;
    eprintln!("  4/4 agent -> device…");
    let cpu_before = cpu_secs(broker_pid);
    let started = Instant::now();
    let total = o.messages;
    let collector =
        tokio::spawn(async move { collect(&mut rx, total, Duration::from_secs(30)).await });
    let mut tick = o.rate.map(|r| {
        let mut i = tokio::time::interval(Duration::from_secs_f64(
            o.agent_batch as f64 / r.max(1) as f64,
        ));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        i
    });
    let mut seq = 0;
    // Per message, when the agent's publish of it was answered (stored on the node).
    let mut answered = vec![0u64; o.messages];
    while seq < o.messages {
        if let Some(t) = tick.as_mut() {
            t.tick().await;
        }
        let gid = &dms[(seq / o.agent_batch) % dms.len()];
        let n = o.agent_batch.min(o.messages - seq);
        let items: Vec<_> = (seq..seq + n)
            .map(|s| {
                (
                    gatehouse_protocol::content::text(&body(s, o.payload)),
                    format!("bench-{s}"),
                )
            })
            .collect();
        agent.send_batch(gid, &items).await?;
        answered[seq..seq + n].fill(now_ns());
        seq += n;
    }
    let (mut lat, arrivals, last) = collector.await?;
    let cpu = cpu_secs(broker_pid) - cpu_before;
    let stages = stages_between(&stages_before, stages());
    // Split where the publish was answered: latency = (answered − sent) + (arrived − answered).
    let (mut down_a, mut down_b): (Vec<u64>, Vec<u64>) = lat
        .iter()
        .zip(&arrivals)
        .filter_map(|(l, (seq, arrived))| {
            let answered = *answered.get(*seq)?;
            let after = arrived.saturating_sub(answered);
            Some((l.saturating_sub(after), after))
        })
        .unzip();
    let down = PathStats::from(&mut lat, started, last).with_cpu(cpu);
    let down_to_node = PathStats::from(&mut down_a, started, last);
    let down_from_node = PathStats::from(&mut down_b, started, last);

    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(15), daemon).await;
    Ok(EndToEnd {
        stages,
        up,
        to_node,
        from_node,
        down,
        down_to_node,
        down_from_node,
    })
}

/// The stream of a `--jetstream` run.
const STREAM: &str = "BENCH";

/// What the stream of a `--jetstream` run holds, and its consumers.
async fn stream_stats(port: u16) -> anyhow::Result<StreamStats> {
    let js = async_nats::jetstream::new(nats_client(port).await?);
    let mut stream = js
        .get_stream(STREAM)
        .await
        .map_err(|e| anyhow::anyhow!("the JetStream stream {STREAM}: {e}"))?;
    let info = stream
        .info()
        .await
        .map_err(|e| anyhow::anyhow!("the JetStream stream {STREAM}: {e}"))?;
    Ok(StreamStats {
        stream: STREAM.into(),
        messages: info.state.messages,
        consumers: info.state.consumer_count,
    })
}

/// Runs everything and prints the table (or JSON).
pub async fn run(o: Opts) -> anyhow::Result<Report> {
    // The daemon's own histograms say where its time goes.
    crate::metrics::install();
    if o.devices == 0 || o.messages == 0 || o.agent_batch == 0 {
        bail!("--devices, --messages and --agent-batch must be at least 1");
    }
    let dir = if o.nats {
        work_dir_with("gatehouse-bench", "nats-server", "nats-server")?
    } else {
        work_dir("gatehouse-bench")?
    };
    let result = async {
        let broker = if o.nats {
            start_nats(&dir, o.jetstream)?
        } else {
            start_broker(&dir)?
        };
        eprintln!("1/4 raw broker hop ({} messages)…", o.messages);
        let broker_hop = broker_hop(broker.port, &o).await?;
        eprintln!("2/4 crypto bound…");
        let crypto_n = o.messages.min(5000);
        let payload = o.payload;
        let crypto_bound =
            tokio::task::spawn_blocking(move || crypto_bound(crypto_n, payload)).await??;
        eprintln!("3/4 and 4/4 end to end, both ways…");
        let EndToEnd {
            stages,
            up: device_to_agent,
            to_node: device_to_node,
            from_node: node_to_agent,
            down: agent_to_device,
            down_to_node: agent_to_node,
            down_from_node: node_to_device,
        } = end_to_end(&dir, broker.port, broker.child.id(), &o).await?;
        let jetstream = if o.jetstream {
            Some(stream_stats(broker.port).await?)
        } else {
            None
        };
        Ok::<_, anyhow::Error>(Report {
            devices: o.devices,
            messages: o.messages,
            payload_bytes: o.payload,
            poll_ms: o.poll_ms,
            agent_batch: o.agent_batch,
            linger_ms: o.linger_ms,
            mqtt_version: (!o.nats).then_some(if o.mqtt5 { 5 } else { 3 }),
            qos: (!o.nats).then_some(o.qos),
            channel: if o.jetstream {
                "nats-jetstream"
            } else if o.nats {
                "nats"
            } else {
                "mqtt"
            },
            jetstream,
            mode: match o.rate {
                Some(r) => format!("open loop at {r} msg/s"),
                None => "closed loop".into(),
            },
            build: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            e2e_over_crypto: device_to_agent.msg_per_sec / crypto_bound.msg_per_sec.max(1e-9),
            e2e_over_broker: device_to_agent.msg_per_sec / broker_hop.msg_per_sec.max(1e-9),
            stages,
            broker_hop,
            crypto_bound,
            device_to_agent,
            agent_to_device,
            device_to_node,
            node_to_agent,
            agent_to_node,
            node_to_device,
        })
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    let report = result?;
    if o.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(report)
}

/// A fresh temporary directory for a run (which needs mosquitto: checked first).
fn work_dir(prefix: &str) -> anyhow::Result<PathBuf> {
    work_dir_with(prefix, "mosquitto", "mosquitto")
}

/// A fresh temporary directory for a run that needs `tool` (from the Debian package `package`).
fn work_dir_with(prefix: &str, tool: &str, package: &str) -> anyhow::Result<PathBuf> {
    if which(tool).is_none() {
        bail!("gatehouse bench needs {tool}: install the Debian package `{package}`");
    }
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{}", std::process::id(), now_ns()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

fn print_table(r: &Report) {
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    println!(
        "gatehouse bench: {} devices, {} messages of {} bytes, {}, poll_interval_ms {}, linger_ms {}, agent sends {} per publish, {} ({} build)",
        r.devices,
        r.messages,
        r.payload_bytes,
        r.mode,
        r.poll_ms,
        r.linger_ms,
        r.agent_batch,
        if r.channel == "nats" {
            "devices and daemon on NATS (core subjects)".to_string()
        } else if let Some(js) = &r.jetstream {
            format!(
                "devices and daemon on NATS through JetStream stream {} both ways ({} stored, {} consumer)",
                js.stream, js.messages, js.consumers
            )
        } else {
            format!(
                "daemon on MQTT {} at QoS {}",
                if r.mqtt_version == Some(5) {
                    "5"
                } else {
                    "3.1.1"
                },
                r.qos.unwrap_or(1)
            )
        },
        r.build
    );
    println!(
        "{:<44} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "path", "messages", "msg/s", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    let row = |name: &str, s: &PathStats| {
        println!(
            "{:<44} {:>9} {:>9.0} {:>9} {:>9} {:>9} {:>9}",
            name,
            s.messages,
            s.msg_per_sec,
            ms(s.p50_ms),
            ms(s.p90_ms),
            ms(s.p99_ms),
            ms(s.max_ms)
        );
    };
    row(
        if r.channel.starts_with("nats") {
            "1 raw broker hop (nats-server, core)"
        } else {
            "1 raw broker hop (mosquitto, QoS 1)"
        },
        &r.broker_hop,
    );
    row(
        "2 crypto bound (MLS PQ encrypt+decrypt, 1 core)",
        &r.crypto_bound,
    );
    row("3 end to end, device -> agent", &r.device_to_agent);
    row("4 end to end, agent -> device", &r.agent_to_device);
    println!(
        "5 ratios: end to end / crypto bound = {:.2}; end to end / broker hop = {:.3}",
        r.e2e_over_crypto, r.e2e_over_broker
    );
    let cpu = |s: &PathStats| match (s.cpu_us_per_msg, s.cpu_busy) {
        (Some(us), Some(busy)) => {
            format!("{us:.0} µs per message, cores {:.0} % busy", busy * 100.0)
        }
        _ => "-".into(),
    };
    println!(
        "  CPU (this process: daemon, agent, devices; and the broker): 3: {}; 4: {}",
        cpu(&r.device_to_agent),
        cpu(&r.agent_to_device)
    );
    println!("3 split where the node stored each message (its timestamp):");
    row("  3a device -> stored on the node", &r.device_to_node);
    row("  3b stored on the node -> agent", &r.node_to_agent);
    println!("4 split where the agent's publish was answered (stored on the node):");
    row("  4a agent -> stored on the node", &r.agent_to_node);
    row("  4b stored on the node -> device", &r.node_to_device);
    let wall = r.device_to_agent.seconds + r.agent_to_device.seconds;
    println!("where the daemon's time went in 3 and 4 ({wall:.2} s of wall time; 2 cores):");
    for (stage, (calls, secs)) in &r.stages {
        let each_ms = if *calls > 0 {
            secs * 1000.0 / *calls as f64
        } else {
            0.0
        };
        println!("  {stage:<34} {calls:>8} calls {secs:>9.3} s {each_ms:>8.3} ms each");
    }
}

/// The scale check's figures.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct IdleReport {
    /// Endpoints on disk.
    pub endpoints: usize,
    /// How long creating them took (each: registration, a DM with the agent), seconds.
    pub create_secs: f64,
    /// The daemon's resident memory once they were created and it was idle, MiB.
    pub rss_mib_after_create: f64,
    /// Its start with them on disk: until the admin API answered (endpoints loaded), seconds.
    pub start_secs: f64,
    /// Until `/ready` said 200, seconds.
    pub ready_secs: f64,
    /// Resident memory after the restart once idle, MiB.
    pub rss_mib_after_start: f64,
    /// Endpoints whose protocol state the restarted daemon had open once idle (those it read:
    /// news, or work of their own).
    pub open_after_start: u64,
    /// CPU the idle daemon used over `idle_window_secs` after the start's first full read.
    pub idle_cpu_percent: f64,
    /// The idle window, seconds.
    pub idle_window_secs: f64,
    /// The build profile.
    pub build: &'static str,
}

/// Reads a process's resident memory (MiB) and CPU time (seconds) from /proc.
fn proc_usage(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at ") ".
    let after = stat.rsplit_once(") ").map(|(_, a)| a).context("stat")?;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    Ok((rss_kib / 1024.0, ticks / 100.0))
}

/// One HTTP GET to the daemon's admin API: the status code and body.
async fn admin_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// Starts `gatehouse run` on `config` as a child process (its output to `log`).
fn spawn_daemon(config: &Path, log: &Path) -> anyhow::Result<std::process::Child> {
    let log = std::fs::File::create(log)?;
    Ok(std::process::Command::new(std::env::current_exe()?)
        .args(["run", "--config"])
        .arg(config)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?)
}

/// Waits until the admin API answers `path` with 200 and `ok(body)`.
async fn wait_admin(
    port: u16,
    path: &str,
    limit: Duration,
    mut ok: impl FnMut(&str) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some((200, body)) = admin_get(port, path).await
            && ok(&body)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the daemon's {path} did not come up within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The scale check: `n` endpoints (each a device that spoke once, with its DM to the agent)
/// created through a real `gatehouse run`; then its memory, its start with them on disk and
/// its CPU while idle.
pub async fn idle(n: usize, json: bool) -> anyhow::Result<IdleReport> {
    let dir = work_dir("gatehouse-bench-idle")?;
    let result = async {
        let broker = start_broker(&dir)?;
        let (node_port, admin_port) = (free_port()?, free_port()?);
        let node_url = format!("http://127.0.0.1:{node_port}");
        let agent_db = sled::Config::new().path(dir.join("agent")).open()?;
        let channel = gatehouse_client::connect(&node_url).await?;
        let mut agent =
            gatehouse_client::Client::open_owned(agent_db.open_tree("agent")?, channel, None, None)?;
        let config = format!(
            "data_dir: {}\nnode: {{listen: 127.0.0.1:{node_port}}}\nadmin: {{listen: 127.0.0.1:{admin_port}}}\n\
             log: {{level: warn}}\n\
             channels: {{mqtt: {{port: {}, client_id: gatehouse-bench}}}}\n\
             plugins: {{mqtt: {{builtin: mqtt}}}}\n\
             routes:\n  - {{name: devices, channel: mqtt, subscribe: \"devices/{{device}}/up\", reply: \"devices/{{device}}/down\", plugin: mqtt, agents: [\"{}\"]}}\n",
            dir.join("data").display(),
            broker.port,
            agent.inbox_id()
        );
        let path = dir.join("config.yaml");
        std::fs::write(&path, config)?;
        let mut daemon = spawn_daemon(&path, &dir.join("daemon-1.log"))?;
        wait_admin(admin_port, "/ready", Duration::from_secs(60), |_| true).await?;
        agent.register().await?;

        eprintln!("creating {n} endpoints (each registers and starts a DM with the agent)…");
        let started = Instant::now();
        let (device, _rx) = mqtt_client(broker.port, "bench-idle-devices", None).await?;
        for d in 0..n {
            device
                .publish(format!("devices/d{d}/up"), QoS::AtLeastOnce, false, "{\"hello\":1}")
                .await?;
        }
        let mut last_report = Instant::now();
        loop {
            let status = admin_get(admin_port, "/status").await;
            let v: serde_json::Value = status
                .and_then(|(_, b)| serde_json::from_str(&b).ok())
                .unwrap_or_default();
            let (made, queued) = (
                v["endpoints"].as_u64().unwrap_or(0) as usize,
                v["inbox_depth"].as_u64().unwrap_or(u64::MAX),
            );
            if made >= n && queued == 0 {
                break;
            }
            if last_report.elapsed() > Duration::from_secs(10) {
                eprintln!("  {made} of {n} endpoints, {queued} queued, {:.0} s", started.elapsed().as_secs_f64());
                last_report = Instant::now();
            }
            if let Some(s) = daemon.try_wait()? {
                bail!("the daemon exited ({s}); see {}", dir.join("daemon-1.log").display());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let create_secs = started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (rss_mib_after_create, _) = proc_usage(daemon.id())?;

        eprintln!("restarting the daemon with {n} endpoints on disk…");
        // A graceful stop (SIGTERM), as an operator would do it.
        std::process::Command::new("kill")
            .args(["-TERM", &daemon.id().to_string()])
            .status()?;
        daemon.wait()?;
        let started = Instant::now();
        let mut daemon = spawn_daemon(&path, &dir.join("daemon-2.log"))?;
        wait_admin(admin_port, "/status", Duration::from_secs(300), |_| true).await?;
        let start_secs = started.elapsed().as_secs_f64();
        wait_admin(admin_port, "/ready", Duration::from_secs(300), |_| true).await?;
        let ready_secs = started.elapsed().as_secs_f64();
        // The start reads every endpoint once (news from while it was down); then it idles.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let window = Duration::from_secs(20);
        let (_, cpu0) = proc_usage(daemon.id())?;
        tokio::time::sleep(window).await;
        let (rss_mib_after_start, cpu1) = proc_usage(daemon.id())?;
        let open_after_start = admin_get(admin_port, "/status")
            .await
            .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
            .and_then(|v| v["open_endpoints"].as_u64())
            .unwrap_or(0);
        let _ = daemon.kill();
        let _ = daemon.wait();
        drop(broker);
        Ok::<_, anyhow::Error>(IdleReport {
            endpoints: n,
            create_secs,
            rss_mib_after_create,
            start_secs,
            ready_secs,
            rss_mib_after_start,
            open_after_start,
            idle_cpu_percent: (cpu1 - cpu0) / window.as_secs_f64() * 100.0,
            idle_window_secs: window.as_secs_f64(),
            build: if cfg!(debug_assertions) { "debug" } else { "release" },
        })
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    let r = result?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "gatehouse bench --idle-endpoints {} ({} build)",
            r.endpoints, r.build
        );
        println!("  created in                     {:>9.1} s", r.create_secs);
        println!(
            "  resident memory, after creating {:>8.1} MiB",
            r.rss_mib_after_create
        );
        println!(
            "  start with them on disk        {:>9.2} s (admin API up; /ready after {:.2} s)",
            r.start_secs, r.ready_secs
        );
        println!(
            "  resident memory, after start   {:>9.1} MiB",
            r.rss_mib_after_start
        );
        println!("  endpoints open after start     {:>9}", r.open_after_start);
        println!(
            "  idle CPU                       {:>9.1} % of one core over {:.0} s",
            r.idle_cpu_percent, r.idle_window_secs
        );
    }
    Ok(r)
}
