//! `gatehouse`: the bridge daemon, a standalone XMTP v3 node, the agent client and admin
//! commands, in one binary.

#![forbid(unsafe_code)]

/// jemalloc rather than the system allocator: a start with 10,000 endpoints reads each one's
/// store pages from several threads, and glibc's per-thread arenas (with its mmap threshold
/// raised by the first large free) kept up to 100 MiB of that churn resident for good;
/// jemalloc returns freed pages to the system (see docs/performance.md, "Scale").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod admin;
mod agent;
mod bench;
mod bridge;
mod config;
mod grants;
mod identity;
mod linger;
mod locate;
mod metrics;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::watch;

/// Gatehouse: a secure bridge between MQTT devices and XMTP agents.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the bridge daemon (with the embedded XMTP node unless the config says otherwise).
    Run {
        /// The config file.
        #[arg(long, default_value = "config.yaml")]
        config: PathBuf,
    },
    /// Validate a config file without starting anything.
    Check {
        /// The config file.
        #[arg(long, default_value = "config.yaml")]
        config: PathBuf,
    },
    /// Run a standalone XMTP v3 node.
    Node {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:5556")]
        listen: SocketAddr,
        /// Data directory.
        #[arg(long, default_value = "gatehouse-node-data")]
        data: PathBuf,
        /// PEM certificate for TLS (with --tls-key).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key for TLS.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Act as an XMTP client: identity, send, listen.
    Agent {
        /// Directory holding this agent's keys and state.
        #[arg(long)]
        home: PathBuf,
        /// The XMTP node.
        #[arg(long, env = "GATEHOUSE_NODE", default_value = "http://127.0.0.1:5556")]
        node: String,
        #[command(subcommand)]
        command: agent::AgentCommand,
    },
    /// Show the running daemon's status (version, uptime, bridge inbox, queue depths, MQTT state).
    Status {
        /// Print JSON (every field; for scripts).
        #[arg(long)]
        json: bool,
        /// The daemon's config file (its admin.listen is used).
        #[arg(long, default_value = "config.yaml", conflicts_with = "admin")]
        config: PathBuf,
        /// The admin API address, instead of reading it from the config.
        #[arg(long)]
        admin: Option<SocketAddr>,
    },
    /// The running daemon's plugins: version, limits, calls, faults, refused actions,
    /// quarantine. `gatehouse plugins reload NAME` loads a plugin's new version.
    Plugins {
        #[command(subcommand)]
        action: Option<PluginsAction>,
        /// Print JSON.
        #[arg(long, global = true)]
        json: bool,
        /// The daemon's config file (its admin.listen is used).
        #[arg(
            long,
            default_value = "config.yaml",
            conflicts_with = "admin",
            global = true
        )]
        config: PathBuf,
        /// The admin API address, instead of reading it from the config.
        #[arg(long, global = true)]
        admin: Option<SocketAddr>,
    },
    /// The dead-letter store: messages that could not be carried, with the reason (kind,
    /// plugin call time). `gatehouse dlq` lists them (payloads only with --payloads);
    /// `dlq retry ID…|--all` carries them again, `dlq drop ID…|--all` deletes them.
    #[command(alias = "dead-letters")]
    Dlq {
        #[command(subcommand)]
        action: Option<DlqAction>,
        /// Print JSON.
        #[arg(long, global = true)]
        json: bool,
        /// Only this route (listing).
        #[arg(long, global = true)]
        route: Option<String>,
        /// Include the payloads, hex (listing).
        #[arg(long, global = true)]
        payloads: bool,
        /// The daemon's config file (its admin.listen is used).
        #[arg(
            long,
            default_value = "config.yaml",
            conflicts_with = "admin",
            global = true
        )]
        config: PathBuf,
        /// The admin API address, instead of reading it from the config.
        #[arg(long, global = true)]
        admin: Option<SocketAddr>,
    },
    /// Conversation messages waiting for a consent decision, per endpoint.
    Requests {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Only this endpoint (its device name).
        #[arg(long)]
        endpoint: Option<String>,
        /// The daemon's config file (its admin.listen is used).
        #[arg(long, default_value = "config.yaml", conflicts_with = "admin")]
        config: PathBuf,
        /// The admin API address, instead of reading it from the config.
        #[arg(long)]
        admin: Option<SocketAddr>,
    },
    /// Allow or deny a sender (inbox id, 0x address or conversation id) for one endpoint.
    /// Allowed senders' waiting messages go to the device in order; denied ones are dropped.
    /// `gatehouse consent list [--endpoint DEVICE] [--json]` shows the endpoints' consent records.
    Consent {
        /// `allow`, `deny`, or `list`.
        #[arg(value_parser = ["allow", "deny", "list"])]
        decision: String,
        /// The endpoint (its device name, as `gatehouse endpoints` shows); for `list`, only
        /// this one.
        #[arg(long)]
        endpoint: Option<String>,
        /// Inbox id, 0x address or conversation id (not for `list`).
        target: Option<String>,
        /// Print JSON (`list`).
        #[arg(long)]
        json: bool,
        /// The daemon's config file (its admin.listen is used).
        #[arg(long, default_value = "config.yaml", conflicts_with = "admin")]
        config: PathBuf,
        /// The admin API address, instead of reading it from the config.
        #[arg(long)]
        admin: Option<SocketAddr>,
    },
    /// The daemon's routes: channel, addresses, plugin, agents and queue depth.
    Routes {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The daemon's config file (its admin.listen is used).
        #[arg(long, default_value = "config.yaml", conflicts_with = "admin")]
        config: PathBuf,
        /// The admin API address, instead of reading it from the config.
        #[arg(long)]
        admin: Option<SocketAddr>,
    },
    /// The load harness: raw broker hop, crypto bound, and both end-to-end paths through a
    /// daemon started in this process, side by side (needs mosquitto). Build with --release
    /// for figures that mean anything.
    Bench {
        /// Simulated devices (each its own MQTT client and endpoint).
        #[arg(long, default_value_t = 10)]
        devices: usize,
        /// Messages per path.
        #[arg(long, default_value_t = 5000)]
        messages: usize,
        /// With --rate: run each path this many seconds (rate × seconds messages per path,
        /// instead of --messages).
        #[arg(long, requires = "rate", conflicts_with = "messages")]
        duration: Option<u64>,
        /// Payload bytes.
        #[arg(long, default_value_t = 100)]
        payload: usize,
        /// Send rate, messages per second in total (open loop, for latency); default: as
        /// fast as the path takes them (closed loop, for throughput).
        #[arg(long)]
        rate: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The daemon's poll_interval_ms (how often endpoints read their conversations).
        #[arg(long, default_value_t = 250)]
        poll_ms: u64,
        /// Messages the agent sends per publish on the way back (path 4): 64 for an agent
        /// that batches, 1 for one that sends message by message.
        #[arg(long, default_value_t = 64)]
        agent_batch: usize,
        /// The daemon's storage.linger_ms: how long its intake may wait for more messages
        /// before a flush at moderate rates (0: never).
        #[arg(long, default_value_t = config::DEFAULT_LINGER_MS)]
        linger_ms: u64,
        /// The daemon's broker connection speaks MQTT 5 (the simulated devices stay on 3.1.1).
        #[arg(long)]
        mqtt5: bool,
        /// The daemon's publish_qos and subscribe_qos (the simulated devices stay at QoS 1).
        /// QoS 2 journals each publish to the devices and each PUBREC from the broker.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
        qos: u8,
        /// The devices and the daemon's route on NATS core subjects through a `nats-server`
        /// (needs the Debian package `nats-server`) instead of MQTT.
        #[arg(long, conflicts_with_all = ["mqtt5", "qos"])]
        nats: bool,
        /// With --nats: both ways through a JetStream stream (file storage): the daemon's route
        /// consumes it durably and publishes its answers to it, each acknowledged.
        #[arg(long, requires = "nats")]
        jetstream: bool,
        /// Instead of the four paths, the scale check: create this many endpoints through a
        /// `gatehouse run` child process, then report its memory, its start with them on disk
        /// and its CPU while idle.
        #[arg(long)]
        idle_endpoints: Option<usize>,
    },
    /// List the daemon's endpoint identities.
    Endpoints {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The daemon's config file (its admin.listen is used).
        #[arg(long, default_value = "config.yaml", conflicts_with = "admin")]
        config: PathBuf,
        /// The admin API address, instead of reading it from the config.
        #[arg(long)]
        admin: Option<SocketAddr>,
    },
}

/// The admin API address: given, or the config file's `admin.listen`.
#[derive(Subcommand, Debug)]
enum DlqAction {
    /// List them (the default).
    List,
    /// Carry them again: a device message goes back to its route's queue, a conversation
    /// message through the plugin to the channel. One that fails again gets a new id.
    Retry {
        /// Dead-letter ids (as `gatehouse dlq` shows).
        ids: Vec<u64>,
        /// Every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Delete them.
    Drop {
        /// Dead-letter ids.
        ids: Vec<u64>,
        /// Every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

#[derive(Subcommand, Debug)]
enum PluginsAction {
    /// Compile and validate the plugin's file (or builtin) again and swap it in; a version
    /// that fails leaves the old one serving. Lifts a quarantine.
    Reload {
        /// The plugin's name in config.yaml.
        name: String,
    },
}

/// `gatehouse status` for people: one line per fact.
fn print_status(v: &serde_json::Value) {
    let up = v["uptime_secs"].as_u64().unwrap_or(0);
    println!(
        "gatehouse {}, up {}h {}m {}s",
        v["version"].as_str().unwrap_or("?"),
        up / 3600,
        up / 60 % 60,
        up % 60
    );
    match v["not_ready_reason"].as_str() {
        None => println!("ready          yes"),
        Some(r) => println!("ready          no: {r}"),
    }
    println!(
        "bridge inbox   {}",
        v["bridge_inbox"].as_str().unwrap_or("?")
    );
    println!(
        "node           {}{}, {}",
        v["node"]["url"].as_str().unwrap_or("?"),
        if v["node"]["embedded"] == true {
            " (embedded)"
        } else {
            ""
        },
        if v["node"]["streaming"] == true {
            "streams followed (endpoints read on news)"
        } else if v["endpoints"] == 0 {
            "no endpoint to follow yet"
        } else {
            "streams down (every endpoint checked each poll_interval_ms)"
        }
    );
    println!(
        "endpoints      {} ({} open in memory)",
        v["endpoints"], v["open_endpoints"]
    );
    let by_route = v["inbox_by_route"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    println!("queued         {} ({by_route})", v["inbox_depth"]);
    println!("dead letters   {}", v["dead_letters"]);
    if let Some(plugins) = v["plugins"].as_object() {
        for (name, p) in plugins {
            println!(
                "plugin {name:<8} {} calls, {} faults{}",
                p["calls"],
                p["faults"],
                if p["quarantined"] == true {
                    ", QUARANTINED"
                } else {
                    ""
                }
            );
        }
    }
    if let Some(m) = v["mqtt"].as_str() {
        println!("mqtt           {m}");
    }
    if v["nats"].is_object() {
        println!(
            "nats           {} ({} disconnects)",
            v["nats"]["state"].as_str().unwrap_or("?"),
            v["nats"]["disconnects"]
        );
    }
}

fn admin_addr(admin: Option<SocketAddr>, config: &std::path::Path) -> anyhow::Result<SocketAddr> {
    Ok(match admin {
        Some(a) => a,
        None => config::Config::load(config)?.admin.listen,
    })
}

fn init_logging(default: &str) {
    init_logging_as(default, None, config::LogFormat::Text);
}

/// Logging to standard error: the filter is `GATEHOUSE_LOG` (whole), else `RUST_LOG`, else
/// config.yaml's `log.level`, else `default`.
fn init_logging_as(default: &str, level: Option<&str>, format: config::LogFormat) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let set = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let (filter, capped) = match set("GATEHOUSE_LOG") {
        Some(whole) => (tracing_subscriber::EnvFilter::new(whole), false),
        None => {
            let wanted = set("RUST_LOG")
                .or(level.map(String::from))
                .unwrap_or_else(|| default.to_string());
            (tracing_subscriber::EnvFilter::new(wanted), true)
        }
    };
    // Caps that hold whatever level is asked for (they only lower it; GATEHOUSE_LOG lifts
    // them, for debugging a dependency):
    // - openmls logs routine conditions (a stale epoch from a lost race) at error level;
    //   Gatehouse reports what they mean itself;
    // - the embedded broker (rumqttd) logs routine disconnects at error level; the daemon
    //   reports its start, its address and a taken port;
    // - below these levels, sled logs whole write batches (the stores hold decrypted
    //   messages), the SMTP, MQTT and HTTP/2 clients their traffic, and cranelift/wasmtime
    //   every compiled instruction: no plaintext or keys in the log, at any level.
    //
    // The caps never go above what the filter can let through: the `log` crate's global level
    // follows the most verbose of the two, and below it `log` macros evaluate their arguments
    // (openmls' in-memory store captures a backtrace in a `log::trace!` on every read and
    // write — with RUST_BACKTRACE=1 a twentieth of all CPU — even though the caps drop it).
    let most = filter.max_level_hint().unwrap_or(LevelFilter::TRACE);
    let cap = |level: LevelFilter| level.min(most);
    let caps = capped.then(|| {
        Targets::new()
            .with_default(cap(LevelFilter::TRACE))
            .with_target("openmls", LevelFilter::OFF)
            .with_target("rumqttd", LevelFilter::OFF)
            .with_target("sled", cap(LevelFilter::INFO))
            .with_target("cranelift", cap(LevelFilter::WARN))
            .with_target("wasmtime", cap(LevelFilter::INFO))
            .with_target("lettre", cap(LevelFilter::INFO))
            .with_target("rumqttc", cap(LevelFilter::DEBUG))
            .with_target("async_nats", cap(LevelFilter::DEBUG))
            .with_target("h2", cap(LevelFilter::INFO))
            .with_target("hyper", cap(LevelFilter::INFO))
            .with_target("tonic", cap(LevelFilter::INFO))
            .with_target("tower", cap(LevelFilter::INFO))
    });
    use std::io::IsTerminal as _;
    let output = match format {
        config::LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
        // Colours only on a terminal: a log file or journal gets plain text.
        config::LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(caps)
        .with(output)
        .init();
}

fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing SIGTERM handler");
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    rx
}

/// `gatehouse run`: the bridge until SIGTERM/SIGINT. SIGHUP reads the config file again: an
/// invalid one is refused (logged with file:line:column) and the daemon goes on with the
/// old. A valid one is applied in place when it changes only routes, plugins and the settings
/// read as they are used — routes and plugins that did not change keep running, untouched —
/// and otherwise by a graceful restart inside the process: in-flight work finishes as on
/// SIGTERM, then everything starts again on the new configuration (queues and cursors are on
/// disk, sources redeliver what was not acknowledged: nothing is lost).
async fn run_daemon(path: &std::path::Path, mut cfg: config::Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    loop {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
        let mut next: Option<config::Config> = None;
        let mut running = tokio::spawn(bridge::run_reloadable(cfg, stop_rx, Some(reload_rx)));
        let result = loop {
            tokio::select! {
                r = &mut running => break r,
                _ = tokio::signal::ctrl_c() => {
                    tracing::info!("shutting down (SIGINT)");
                    next = None;
                    let _ = stop_tx.send(true);
                }
                _ = term.recv() => {
                    tracing::info!("shutting down");
                    next = None;
                    let _ = stop_tx.send(true);
                }
                _ = hup.recv(), if !*stop_tx.borrow() => match config::Config::load(path) {
                    Ok(new) => {
                        let (done, outcome) = tokio::sync::oneshot::channel();
                        if reload_tx.send(bridge::Reload { cfg: new, done }).await.is_err() {
                            continue;
                        }
                        match outcome.await {
                            Ok(bridge::Reloaded::InPlace(what)) => {
                                tracing::info!(config = %path.display(), changes = %what, "SIGHUP: configuration reloaded in place (unchanged routes and plugins kept running)");
                            }
                            Ok(bridge::Reloaded::Refused(why)) => {
                                tracing::error!(config = %path.display(), error = %why, "SIGHUP: the new configuration was refused; going on with the old one");
                            }
                            Ok(bridge::Reloaded::NeedsRestart(why)) => match config::Config::load(path) {
                                Ok(new) => {
                                    tracing::info!(config = %path.display(), reason = %why, "SIGHUP: the new configuration needs a restart; restarting on it (in-flight work finishes first)");
                                    next = Some(new);
                                    let _ = stop_tx.send(true);
                                }
                                Err(e) => tracing::error!(error = %format!("{e:#}"), "SIGHUP: the new configuration is not valid; going on with the old one"),
                            },
                            // The bridge stopped meanwhile; its result comes next.
                            Err(_) => {}
                        }
                    }
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "SIGHUP: the new configuration is not valid; going on with the old one"),
                },
            }
        };
        result.context("the bridge task failed")??;
        match next {
            Some(new) => {
                cfg = new;
                tracing::info!("configuration reloaded");
            }
            None => return Ok(()),
        }
    }
}

/// `gatehouse … | head`: once the reader has gone, printing fails with EPIPE (Rust ignores
/// SIGPIPE) and `println!` panics. That is the reader's choice, not a fault: end quietly with
/// the status a shell gives a process killed by SIGPIPE (128 + 13).
fn quiet_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.contains("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

#[tokio::main]
async fn main() {
    quiet_broken_pipe();
    let cli = Cli::parse();
    let code = match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run { config } => {
            let cfg = config::Config::load(&config)?;
            init_logging_as("info", cfg.log.level.as_deref(), cfg.log.format);
            metrics::install();
            run_daemon(&config, cfg).await?;
        }
        Command::Check { config } => {
            config::Config::load(&config)?;
            println!("{}: ok", config.display());
        }
        Command::Node {
            listen,
            data,
            tls_cert,
            tls_key,
        } => {
            init_logging("info");
            let store = gatehouse_node::Store::open(&data)
                .with_context(|| format!("opening {}", data.display()))?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let tls = tls_cert
                .zip(tls_key)
                .map(|(cert, key)| gatehouse_node::TlsFiles { cert, key });
            let mut stop = shutdown_signal();
            gatehouse_node::serve(
                listener,
                gatehouse_node::Node::new(store),
                tls,
                async move {
                    let _ = stop.changed().await;
                },
            )
            .await?;
        }
        Command::Agent {
            home,
            node,
            command,
        } => {
            init_logging("warn");
            return agent::run(&home, &node, command).await;
        }
        Command::Status {
            json,
            config,
            admin,
        } => {
            let addr = admin_addr(admin, &config)?;
            let body = admin::get(addr, "/status").await?;
            if json {
                println!("{body}");
            } else {
                print_status(&serde_json::from_str(&body)?);
            }
        }
        Command::Routes {
            json,
            config,
            admin,
        } => {
            let addr = admin_addr(admin, &config)?;
            let body = admin::get(addr, "/routes").await?;
            if json {
                println!("{body}");
            } else {
                let routes: Vec<serde_json::Value> = serde_json::from_str(&body)?;
                println!(
                    "{:<16} {:<8} {:<32} {:<28} {:<10} {:>6} AGENTS",
                    "ROUTE", "CHANNEL", "SUBSCRIBE", "REPLY", "PLUGIN", "QUEUED"
                );
                for r in routes {
                    let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
                    println!(
                        "{:<16} {:<8} {:<32} {:<28} {:<10} {:>6} {}",
                        s("name"),
                        s("channel"),
                        s("subscribe"),
                        s("reply"),
                        s("plugin"),
                        r["queued"].as_u64().unwrap_or(0),
                        r["agents"].as_array().map_or(0, |a| a.len())
                    );
                }
            }
        }
        Command::Plugins {
            action,
            json,
            config,
            admin,
        } => {
            let addr = admin_addr(admin, &config)?;
            match action {
                Some(PluginsAction::Reload { name }) => {
                    let body = admin::post(
                        addr,
                        "/plugins/reload",
                        &serde_json::json!({"plugin": name}),
                    )
                    .await?;
                    if json {
                        println!("{body}");
                    } else {
                        let v: serde_json::Value = serde_json::from_str(&body)?;
                        println!(
                            "{name} reloaded: sha256 {}",
                            v["sha256"].as_str().unwrap_or("")
                        );
                    }
                }
                None => {
                    let body = admin::get(addr, "/plugins").await?;
                    if json {
                        println!("{body}");
                    } else {
                        let v: serde_json::Value = serde_json::from_str(&body)?;
                        println!(
                            "{:<16} {:<12} {:>8} {:>6} {:>8} {:<11} SOURCE",
                            "NAME", "VERSION", "CALLS", "FAULTS", "DEAD", "STATE"
                        );
                        for p in v.as_array().into_iter().flatten() {
                            let sha = p["sha256"].as_str().unwrap_or("");
                            println!(
                                "{:<16} {:<12} {:>8} {:>6} {:>8} {:<11} {}",
                                p["name"].as_str().unwrap_or(""),
                                &sha[..sha.len().min(12)],
                                p["calls"].to_string(),
                                p["faults"].to_string(),
                                p["dead_letters"].to_string(),
                                if p["quarantined"] == true {
                                    "quarantined"
                                } else {
                                    "serving"
                                },
                                p["source"].as_str().unwrap_or("")
                            );
                        }
                    }
                }
            }
        }
        Command::Dlq {
            action,
            json,
            route,
            payloads,
            config,
            admin,
        } => {
            let addr = admin_addr(admin, &config)?;
            let change = |path: &'static str, ids: Vec<u64>, all: bool| async move {
                if ids.is_empty() && !all {
                    anyhow::bail!("name dead-letter ids, or --all");
                }
                admin::post(addr, path, &serde_json::json!({"ids": ids, "all": all})).await
            };
            match action {
                Some(DlqAction::Retry { ids, all }) => {
                    let body = change("/dead-letters/retry", ids, all).await?;
                    let v: serde_json::Value = serde_json::from_str(&body)?;
                    if json {
                        println!("{body}");
                    } else {
                        println!("retried {}", v["retried"].as_array().map_or(0, |a| a.len()));
                        for f in v["failed"].as_array().into_iter().flatten() {
                            println!("{}: {}", f["id"], f["error"].as_str().unwrap_or(""));
                        }
                    }
                    if v["failed"].as_array().is_some_and(|a| !a.is_empty()) {
                        return Ok(1);
                    }
                }
                Some(DlqAction::Drop { ids, all }) => {
                    let body = change("/dead-letters/drop", ids, all).await?;
                    if json {
                        println!("{body}");
                    } else {
                        let v: serde_json::Value = serde_json::from_str(&body)?;
                        println!("dropped {}", v["dropped"].as_array().map_or(0, |a| a.len()));
                    }
                }
                None | Some(DlqAction::List) => {
                    let mut path = format!("/dead-letters?payloads={payloads}");
                    if let Some(r) = &route {
                        path.push_str(&format!("&route={r}"));
                    }
                    let body = admin::get(addr, &path).await?;
                    if json {
                        println!("{body}");
                    } else {
                        let v: serde_json::Value = serde_json::from_str(&body)?;
                        println!(
                            "{:>8} {:<8} {:<16} {:<12} REASON",
                            "ID", "DIR", "ROUTE", "KIND"
                        );
                        for d in v.as_array().into_iter().flatten() {
                            println!(
                                "{:>8} {:<8} {:<16} {:<12} {}",
                                d["id"].to_string(),
                                d["direction"].as_str().unwrap_or(""),
                                d["route"].as_str().unwrap_or(""),
                                d["kind"].as_str().unwrap_or(""),
                                d["reason"].as_str().unwrap_or("")
                            );
                        }
                    }
                }
            }
        }
        Command::Requests {
            json,
            endpoint,
            config,
            admin,
        } => {
            let addr = admin_addr(admin, &config)?;
            let path = match &endpoint {
                Some(e) => format!("/requests?endpoint={e}"),
                None => "/requests".into(),
            };
            let body = admin::get(addr, &path).await?;
            if json {
                println!("{body}");
            } else {
                let v: serde_json::Value = serde_json::from_str(&body)?;
                for ep in v.as_array().into_iter().flatten() {
                    for r in ep["requests"].as_array().into_iter().flatten() {
                        println!(
                            "{:<20} {} {} ({} bytes)",
                            ep["endpoint"].as_str().unwrap_or(""),
                            r["sender_inbox"].as_str().unwrap_or(""),
                            r["content_type"].as_str().unwrap_or(""),
                            r["bytes"]
                        );
                    }
                }
            }
        }
        Command::Consent {
            decision,
            endpoint,
            target,
            json,
            config,
            admin,
        } => {
            let addr = admin_addr(admin, &config)?;
            if decision == "list" {
                let path = match &endpoint {
                    Some(e) => format!("/consent?endpoint={e}"),
                    None => "/consent".to_string(),
                };
                let body = admin::get(addr, &path).await?;
                if json {
                    println!("{body}");
                } else {
                    let all: Vec<serde_json::Value> = serde_json::from_str(&body)?;
                    println!("{:<20} {:<14} {:<9} ENTITY", "ENDPOINT", "KIND", "STATE");
                    for ep in all {
                        for r in ep["records"].as_array().into_iter().flatten() {
                            println!(
                                "{:<20} {:<14} {:<9} {}",
                                ep["endpoint"].as_str().unwrap_or("?"),
                                r["kind"].as_str().unwrap_or("?"),
                                r["state"].as_str().unwrap_or("?"),
                                r["entity"].as_str().unwrap_or("?")
                            );
                        }
                    }
                }
                return Ok(0);
            }
            let (Some(endpoint), Some(target)) = (endpoint, target) else {
                anyhow::bail!(
                    "consent {decision} needs --endpoint DEVICE and the sender (inbox id, 0x address or conversation id)"
                );
            };
            let body = admin::post(
                addr,
                "/consent",
                &serde_json::json!({"endpoint": endpoint, "target": target, "state": decision}),
            )
            .await?;
            println!("{body}");
        }
        Command::Bench {
            devices,
            messages,
            duration,
            payload,
            rate,
            json,
            poll_ms,
            agent_batch,
            linger_ms,
            mqtt5,
            qos,
            nats,
            jetstream,
            idle_endpoints,
        } => {
            init_logging("warn");
            if let Some(n) = idle_endpoints {
                bench::idle(n, json).await?;
                return Ok(0);
            }
            // Open loop for a duration: the rate decides how many messages that is.
            let messages = match (duration, rate) {
                (Some(secs), Some(rate)) => {
                    usize::try_from(secs.saturating_mul(rate)).unwrap_or(usize::MAX)
                }
                _ => messages,
            };
            bench::run(bench::Opts {
                devices,
                messages,
                payload,
                rate,
                json,
                poll_ms,
                agent_batch,
                linger_ms,
                mqtt5,
                qos,
                nats,
                jetstream,
            })
            .await?;
        }
        Command::Endpoints {
            json,
            config,
            admin,
        } => {
            let addr = admin_addr(admin, &config)?;
            let body = admin::get(addr, "/endpoints").await?;
            if json {
                println!("{body}");
            } else {
                let eps: Vec<bridge::EndpointInfo> = serde_json::from_str(&body)?;
                println!("{:<20} {:<28} {:<44} INBOX", "DEVICE", "ADDRESS", "WALLET");
                for e in eps {
                    println!(
                        "{:<20} {:<28} {:<44} {}",
                        e.device, e.address, e.wallet_address, e.inbox_id
                    );
                }
            }
        }
    }
    Ok(0)
}
