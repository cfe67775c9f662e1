//! `gatehouse agent`: the client a person or an agent runs (identity, send, listen).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Subcommand;
use gatehouse_client::Client;
use gatehouse_protocol::content;
use gatehouse_protocol::identity::{Wallet, rfc3339_secs};

/// Agent commands.
#[derive(Subcommand, Debug)]
pub enum AgentCommand {
    /// Create (or load) this home's identity and register it on the node; prints the inbox id.
    Init {
        /// File holding the wallet's private key in hex; a new key is generated when omitted.
        #[arg(long)]
        wallet_key: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print this home's inbox id, wallet address and installation key.
    Id {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send a text message to an inbox or address (a DM, created if needed) or a conversation.
    Send {
        /// Recipient: inbox id or 0x address.
        #[arg(
            long,
            conflicts_with = "conversation",
            required_unless_present = "conversation"
        )]
        to: Option<String>,
        /// Hex id of an existing conversation.
        #[arg(long)]
        conversation: Option<String>,
        /// The text.
        text: String,
    },
    /// Print incoming messages, one JSON object (or line) per message.
    Listen {
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
        /// Exit after this many messages (exit status 3 if the timeout comes first).
        #[arg(long)]
        count: Option<usize>,
        /// Give up after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
    },
}

/// How often `listen` asks the node for news.
const LISTEN_POLL: Duration = Duration::from_millis(200);

async fn open(
    home: &Path,
    node: &str,
    wallet: Option<Wallet>,
) -> anyhow::Result<(sled::Db, Client)> {
    std::fs::create_dir_all(home).with_context(|| format!("creating {}", home.display()))?;
    let db = sled::open(home.join("db")).with_context(|| {
        format!(
            "opening {} (is another `gatehouse agent` using this home?)",
            home.display()
        )
    })?;
    let channel = gatehouse_client::connect(node)
        .await
        .with_context(|| format!("connecting to the XMTP node at {node}"))?;
    let client = Client::open(db.open_tree("agent")?, channel, wallet, None)?;
    Ok((db, client))
}

/// Runs one agent command.
pub async fn run(home: &Path, node: &str, cmd: AgentCommand) -> anyhow::Result<i32> {
    match cmd {
        AgentCommand::Init { wallet_key, json } => {
            let wallet = match wallet_key {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    let hexkey = text.trim().trim_start_matches("0x");
                    let bytes = hex::decode(hexkey)
                        .with_context(|| format!("{}: not hex", path.display()))?;
                    Some(Wallet::from_bytes(&bytes).with_context(|| {
                        format!("{}: not a secp256k1 private key", path.display())
                    })?)
                }
                None => None,
            };
            let (db, mut client) = open(home, node, wallet).await?;
            client.register().await?;
            db.flush_async().await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"inbox_id": client.inbox_id(), "address": client.address()})
                );
            } else {
                println!("{}", client.inbox_id());
            }
        }
        AgentCommand::Id { json } => {
            let (_db, client) = open(home, node, None).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"inbox_id": client.inbox_id(), "address": client.address(), "installation_key": hex::encode(client.installation_key())})
                );
            } else {
                println!(
                    "inbox id:         {}\nwallet address:   {}\ninstallation key: {}",
                    client.inbox_id(),
                    client.address(),
                    hex::encode(client.installation_key())
                );
            }
        }
        AgentCommand::Send {
            to,
            conversation,
            text,
        } => {
            let (db, mut client) = open(home, node, None).await?;
            client.register().await?;
            let gid = match (to, conversation) {
                (Some(to), _) => {
                    let inbox = client.resolve(&to).await?;
                    client.dm(&inbox).await?
                }
                (None, Some(c)) => hex::decode(&c).context("--conversation must be hex")?,
                (None, None) => anyhow::bail!("give --to or --conversation"),
            };
            client.send(&gid, &content::text(&text), None).await?;
            db.flush_async().await?;
            println!("{}", hex::encode(&gid));
        }
        AgentCommand::Listen {
            json,
            count,
            timeout,
        } => {
            let (db, mut client) = open(home, node, None).await?;
            client.register().await?;
            let deadline = timeout.map(|t| Instant::now() + Duration::from_secs(t));
            let mut seen = 0usize;
            loop {
                for m in client.sync_all().await? {
                    if json {
                        let v = serde_json::json!({
                            "conversation": m.conversation,
                            "id": m.id,
                            "sender_inbox": m.sender_inbox,
                            "sender_installation": m.sender_installation,
                            "content_type": m.content_type,
                            "text": m.text,
                            "sent_at": rfc3339_secs(m.sent_at_ns),
                            "sent_at_ns": m.sent_at_ns,
                        });
                        println!("{v}");
                    } else {
                        println!(
                            "[{}] {}: {}",
                            rfc3339_secs(m.sent_at_ns),
                            m.sender_inbox,
                            m.text.as_deref().unwrap_or("(no text)")
                        );
                    }
                    seen += 1;
                    if count.is_some_and(|c| seen >= c) {
                        db.flush_async().await?;
                        return Ok(0);
                    }
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    db.flush_async().await?;
                    if count.is_some() {
                        eprintln!("timed out after {seen} message(s)");
                        return Ok(3);
                    }
                    return Ok(0);
                }
                tokio::time::sleep(LISTEN_POLL).await;
            }
        }
    }
    Ok(0)
}
