//! `gatehouse agent`: the client a person or an agent runs (identity, send, listen).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Subcommand;
use gatehouse_client::{Client, Owner};
use gatehouse_protocol::content;
use gatehouse_protocol::identity::SoftPasskey;
use gatehouse_protocol::identity::{Wallet, rfc3339_secs};

/// Agent commands.
#[derive(Subcommand, Debug)]
pub enum AgentCommand {
    /// Create (or load) this home's identity and register it on the node; prints the inbox id.
    Init {
        /// File holding the wallet's private key in hex; a new key is generated when omitted.
        #[arg(long, conflicts_with = "passkey")]
        wallet_key: Option<PathBuf>,
        /// Own the inbox with a software passkey (P-256) kept in this file (hex); the file is
        /// created with a new key if it does not exist.
        #[arg(long)]
        passkey: Option<PathBuf>,
        /// The passkey's relying-party origin.
        #[arg(long, default_value = "https://gatehouse.local", requires = "passkey")]
        origin: String,
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
        /// What to send: `text` (xmtp.org/text:1.0), `json` (gatehouse.dev/json:1.0, with the
        /// JSON as the fallback XMTP clients show), `reply` (TEXT in reply to --reference),
        /// `reaction` (TEXT is the emoji; --remove takes it back), `read-receipt`, or
        /// `attachment` (--file, sent inline).
        #[arg(long = "type", default_value = "text", value_parser = ["text", "json", "reply", "reaction", "read-receipt", "attachment"])]
        kind: String,
        /// The message id (hex, as `listen` prints it) a reply or reaction refers to.
        #[arg(long)]
        reference: Option<String>,
        /// A reaction: remove it instead of adding it.
        #[arg(long)]
        remove: bool,
        /// An attachment: the file to send (at most 1 MiB inline).
        #[arg(long)]
        file: Option<PathBuf>,
        /// An attachment's MIME type.
        #[arg(long, default_value = "application/octet-stream")]
        mime: String,
        /// Print `{"conversation":…,"message_id":…}` instead of the conversation id.
        #[arg(long)]
        json: bool,
        /// Send each line of standard input as its own message (`--type text` or `json`), in
        /// order, up to 64 per publish; TEXT is not used.
        #[arg(long)]
        lines: bool,
        /// The text (JSON document, reply text or emoji); not used by read receipts and
        /// attachments.
        #[arg(default_value = "")]
        text: String,
    },
    /// Show or change this inbox's identity (identifiers, installations, recovery).
    Identity {
        #[command(subcommand)]
        command: IdentityCommand,
    },
    /// Create and manage groups.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
        /// Print JSON: the new group's id for `create`, the group as `info` shows it after
        /// `add`, `remove`, `set`, `admin` and `leave`.
        #[arg(long, global = true)]
        json: bool,
    },
    /// List this home's conversations (JSON lines, as `group info`).
    Conversations {
        /// Accepted for symmetry; the output is always JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Messages waiting for a consent decision (from senders neither allowed nor denied).
    Requests {
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Stored message records that could not be read (a damaged disk, a hand edit): set aside
    /// with their bytes instead of being dropped. `listen` and `requests` say when there are any.
    Unreadable {
        /// Print JSON lines, with each record's stored bytes in hex.
        #[arg(long)]
        json: bool,
        /// Drop the records after printing them.
        #[arg(long)]
        forget: bool,
    },
    /// Allow, deny or list senders and conversations (synced to this inbox's other
    /// installations through its private device-sync group).
    Consent {
        #[command(subcommand)]
        command: ConsentCommand,
    },
    /// Resolve an inbox id or 0x address through the node and show its identity.
    Whois {
        /// Inbox id or 0x address.
        identifier: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
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
        /// Also print group changes (XMTP's `group_updated` transcripts: who added, removed
        /// or renamed what); they count towards --count.
        #[arg(long)]
        transcripts: bool,
    },
}

/// Consent commands.
#[derive(Subcommand, Debug)]
pub enum ConsentCommand {
    /// Allow an inbox (id or 0x address) or a conversation (hex id): its waiting messages are
    /// delivered, in order, at the next read.
    Allow {
        /// Inbox id, 0x address, or conversation id.
        target: String,
    },
    /// Deny an inbox or a conversation: its messages are dropped, without any signal.
    Deny {
        /// Inbox id, 0x address, or conversation id.
        target: String,
    },
    /// Every consent record.
    List {
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
}

/// Group commands. Members are inbox ids or 0x addresses.
#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// Create a group (libxmtp's default policy: anyone adds, admins remove; you are super admin).
    Create {
        /// Group name.
        #[arg(long, default_value = "")]
        name: String,
        /// Group description.
        #[arg(long, default_value = "")]
        description: String,
        /// A member to add (repeat).
        #[arg(long = "member")]
        members: Vec<String>,
    },
    /// Add members (all their installations).
    Add {
        /// The group's id (hex).
        #[arg(long)]
        conversation: String,
        /// A member to add (repeat).
        #[arg(long = "member", required = true)]
        members: Vec<String>,
    },
    /// Remove members (all their installations).
    Remove {
        /// The group's id (hex).
        #[arg(long)]
        conversation: String,
        /// A member to remove (repeat).
        #[arg(long = "member", required = true)]
        members: Vec<String>,
    },
    /// Change the group's name or description (per its metadata policy).
    Set {
        /// The group's id (hex).
        #[arg(long)]
        conversation: String,
        /// New name.
        #[arg(long)]
        name: Option<String>,
        /// New description.
        #[arg(long)]
        description: Option<String>,
    },
    /// Add or remove an admin (super admins only, by default).
    #[command(alias = "set-admin")]
    Admin {
        /// The group's id (hex).
        #[arg(long)]
        conversation: String,
        /// Make this member an admin (`--member` is accepted too).
        #[arg(
            long,
            alias = "member",
            conflicts_with = "remove",
            required_unless_present = "remove"
        )]
        add: Option<String>,
        /// Take admin away from this member.
        #[arg(long)]
        remove: Option<String>,
    },
    /// Ask to leave a group: an admin's client removes you at its next read.
    Leave {
        /// The group's id (hex).
        #[arg(long)]
        conversation: String,
    },
    /// Kind, name, epoch, ciphersuite, members, admins (JSON).
    Info {
        /// The conversation's id (hex).
        #[arg(long)]
        conversation: String,
    },
}

/// Identity commands.
#[derive(Subcommand, Debug)]
pub enum IdentityCommand {
    /// Identifiers, installations and recovery address of this inbox.
    Show {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make this (new) home another installation of an existing inbox, signed by its owner.
    AddInstallation {
        /// The owner wallet's private key file (hex).
        #[arg(long, conflicts_with = "passkey", required_unless_present = "passkey")]
        wallet_key: Option<PathBuf>,
        /// The owner passkey's key file (hex).
        #[arg(long)]
        passkey: Option<PathBuf>,
        /// The passkey's relying-party origin.
        #[arg(long, default_value = "https://gatehouse.local")]
        origin: String,
    },
    /// Revoke an installation (hex key) of this inbox; this home's wallet must be the recovery address.
    RevokeInstallation {
        /// The installation key, hex.
        installation: String,
    },
    /// Hand recovery of this inbox to another 0x address.
    ChangeRecovery {
        /// The new recovery address.
        address: String,
    },
}

fn identity_json(
    st: &gatehouse_protocol::identity::InboxState,
    this: Option<&[u8]>,
) -> serde_json::Value {
    serde_json::json!({
        "inbox_id": st.inbox_id,
        "recovery": st.recovery,
        "identifiers": st.public_identifiers(),
        "installations": st.installations().map(hex::encode).collect::<Vec<_>>(),
        "this_installation": this.map(hex::encode),
    })
}

fn print_identity(st: &gatehouse_protocol::identity::InboxState, this: Option<&[u8]>, json: bool) {
    if json {
        println!("{}", identity_json(st, this));
    } else {
        println!(
            "inbox id:      {}\nrecovery:      {}",
            st.inbox_id, st.recovery
        );
        for i in st.public_identifiers() {
            println!("identifier:    {i}");
        }
        for k in st.installations() {
            let mark = if this == Some(k) { " (this one)" } else { "" };
            println!("installation:  {}{mark}", hex::encode(k));
        }
    }
}

fn load_or_create_passkey(path: &Path, origin: &str) -> anyhow::Result<SoftPasskey> {
    let bytes = match std::fs::read_to_string(path) {
        Ok(text) => {
            hex::decode(text.trim()).with_context(|| format!("{}: not hex", path.display()))?
        }
        Err(_) => {
            let key: [u8; 32] = loop {
                let k: [u8; 32] = rand::random();
                if SoftPasskey::from_bytes(&k, origin).is_ok() {
                    break k;
                }
            };
            crate::identity::write_private(path, hex::encode(key).as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            key.to_vec()
        }
    };
    SoftPasskey::from_bytes(&bytes, origin)
        .with_context(|| format!("{}: not a P-256 private key", path.display()))
}

async fn resolve_all(client: &mut Client, members: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::with_capacity(members.len());
    for m in members {
        out.push(client.resolve(m).await?);
    }
    Ok(out)
}

/// The longest `listen` waits on the node's streams before looking at its deadline again
/// (news ends the wait at once).
const LISTEN_WAIT: Duration = Duration::from_secs(1);
/// First and longest wait of `agent listen` before it tries an unreachable node again.
const LISTEN_RETRY_FIRST: Duration = Duration::from_secs(1);
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(30);

async fn open(
    home: &Path,
    node: &str,
    owner: Option<Owner>,
) -> anyhow::Result<(Arc<gatehouse_store::Sealed>, Client)> {
    std::fs::create_dir_all(home).with_context(|| format!("creating {}", home.display()))?;
    let dir = home.join("db");
    let db = gatehouse_store::open(sled::Config::new().path(&dir), &dir, "the agent's store")?;
    let channel = gatehouse_client::connect(node)
        .await
        .with_context(|| format!("connecting to the XMTP node at {node}"))?;
    let mut client = Client::open_owned(db.open_tree("agent")?, channel, owner, None)?;
    // Every command that reads conversations (`group info`, `requests`, `consent list`, …)
    // keeps what it read until `listen` has printed it: no command swallows a message.
    client.set_retain_deliveries(true);
    Ok((db, client))
}

/// Says on standard error when stored message records could not be read (they were set
/// aside, not dropped; `agent unreadable` shows them).
fn mention_unreadable(client: &Client) -> anyhow::Result<()> {
    let n = client.set_aside_records()?.len();
    if n > 0 {
        eprintln!(
            "{n} stored message record(s) could not be read and were set aside with their bytes; `gatehouse agent unreadable` shows them"
        );
    }
    Ok(())
}

/// The conversation `send` writes to: the DM with `--to` (created if needed) or
/// `--conversation`.
async fn target(
    client: &mut Client,
    to: Option<String>,
    conversation: Option<String>,
) -> anyhow::Result<Vec<u8>> {
    Ok(match (to, conversation) {
        (Some(to), _) => {
            let inbox = client.resolve(&to).await?;
            client.dm(&inbox).await?
        }
        (None, Some(c)) => hex::decode(&c).context("--conversation must be hex")?,
        (None, None) => anyhow::bail!("give --to or --conversation"),
    })
}

/// `agent send --lines`: each line of standard input is a message, sent in order, up to 64
/// per publish.
async fn send_lines(
    home: &Path,
    node: &str,
    to: Option<String>,
    conversation: Option<String>,
    kind: &str,
    json: bool,
) -> anyhow::Result<i32> {
    use std::io::BufRead as _;
    anyhow::ensure!(
        kind == "text" || kind == "json",
        "--lines sends `--type text` or `json` messages"
    );
    let mut bodies = Vec::new();
    for (n, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line.context("reading standard input")?;
        let body = if kind == "json" {
            let v: serde_json::Value = serde_json::from_str(&line)
                .with_context(|| format!("line {}: not valid JSON", n + 1))?;
            let canonical = v.to_string();
            content::with_fallback(
                content::json_type(),
                canonical.clone().into_bytes(),
                Some(canonical),
            )
        } else {
            content::text(&line)
        };
        bodies.push((body, hex::encode(rand::random::<[u8; 16]>())));
    }
    let (db, mut client) = open(home, node, None).await?;
    client.register().await?;
    let gid = target(&mut client, to, conversation).await?;
    for chunk in bodies.chunks(64) {
        for sent in client.send_batch(&gid, chunk).await? {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"conversation": hex::encode(&gid), "message_id": sent.message_id})
                );
            }
        }
    }
    gatehouse_client::flush_tree(&db).await?;
    if !json {
        println!("{}", hex::encode(&gid));
    }
    Ok(0)
}

/// Runs one agent command.
pub async fn run(home: &Path, node: &str, cmd: AgentCommand) -> anyhow::Result<i32> {
    match cmd {
        AgentCommand::Init {
            wallet_key,
            passkey,
            origin,
            json,
        } => {
            let owner = match (wallet_key, passkey) {
                (_, Some(path)) => Some(Owner::Passkey(load_or_create_passkey(&path, &origin)?)),
                (wallet_key, None) => match wallet_key {
                    Some(path) => {
                        let text = std::fs::read_to_string(&path)
                            .with_context(|| format!("reading {}", path.display()))?;
                        let hexkey = text.trim().trim_start_matches("0x");
                        let bytes = hex::decode(hexkey)
                            .with_context(|| format!("{}: not hex", path.display()))?;
                        Some(Owner::Wallet(Wallet::from_bytes(&bytes).with_context(
                            || format!("{}: not a secp256k1 private key", path.display()),
                        )?))
                    }
                    None => None,
                },
            };
            let (db, mut client) = open(home, node, owner).await?;
            client.register().await?;
            gatehouse_client::flush_tree(&db).await?;
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
            kind,
            reference,
            remove,
            file,
            mime,
            json,
            lines,
            text,
        } => {
            let reference = || -> anyhow::Result<String> {
                let r = reference
                    .clone()
                    .with_context(|| format!("--type {kind} needs --reference MESSAGE_ID"))?;
                anyhow::ensure!(
                    hex::decode(&r).is_ok(),
                    "--reference must be a hex message id (as `agent listen` prints it)"
                );
                Ok(r)
            };
            if lines {
                return send_lines(home, node, to, conversation, &kind, json).await;
            }
            let body = match kind.as_str() {
                "json" => {
                    let v: serde_json::Value = serde_json::from_str(&text)
                        .context("--type json: the message is not valid JSON")?;
                    let canonical = v.to_string();
                    content::with_fallback(
                        content::json_type(),
                        canonical.clone().into_bytes(),
                        Some(canonical),
                    )
                }
                "reply" => content::reply(&reference()?, None, &content::text(&text))?,
                "reaction" => {
                    anyhow::ensure!(!text.is_empty(), "--type reaction needs the emoji as TEXT");
                    content::reaction(&reference()?, &text, remove)
                }
                "read-receipt" => content::read_receipt(),
                "attachment" => {
                    let path = file.context("--type attachment needs --file PATH")?;
                    let data = std::fs::read(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    anyhow::ensure!(
                        data.len() <= 1 << 20,
                        "{}: {} bytes; inline attachments are limited to 1 MiB",
                        path.display(),
                        data.len()
                    );
                    let name = path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    content::attachment(&name, &mime, data)
                }
                _ => content::text(&text),
            };
            let (db, mut client) = open(home, node, None).await?;
            client.register().await?;
            let gid = target(&mut client, to, conversation).await?;
            let sent = client.send(&gid, &body, None).await?;
            gatehouse_client::flush_tree(&db).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"conversation": hex::encode(&gid), "message_id": sent.message_id})
                );
            } else {
                println!("{}", hex::encode(&gid));
            }
        }
        AgentCommand::Identity {
            command:
                IdentityCommand::AddInstallation {
                    wallet_key,
                    passkey,
                    origin,
                },
        } => {
            let owner = match (wallet_key, passkey) {
                (_, Some(path)) => {
                    anyhow::ensure!(path.exists(), "{}: no such passkey file", path.display());
                    Owner::Passkey(load_or_create_passkey(&path, &origin)?)
                }
                (Some(path), None) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    let bytes = hex::decode(text.trim().trim_start_matches("0x"))
                        .with_context(|| format!("{}: not hex", path.display()))?;
                    Owner::Wallet(Wallet::from_bytes(&bytes).with_context(|| {
                        format!("{}: not a secp256k1 private key", path.display())
                    })?)
                }
                (None, None) => anyhow::bail!("give --wallet-key or --passkey"),
            };
            let (db, mut client) = open(home, node, Some(owner)).await?;
            // Only an existing inbox: creating one is `init`.
            let inbox = client.inbox_id().to_string();
            client.inbox_state(&inbox).await.with_context(|| {
                format!("inbox {inbox} does not exist yet; use `init` to create it")
            })?;
            client.register().await?;
            gatehouse_client::flush_tree(&db).await?;
            println!("{}", hex::encode(client.installation_key()));
        }
        AgentCommand::Identity { command } => {
            let (db, mut client) = open(home, node, None).await?;
            match command {
                IdentityCommand::AddInstallation { .. } => unreachable!("handled above"),
                IdentityCommand::Show { json } => {
                    let st = client.identity().await?;
                    print_identity(&st, Some(&client.installation_key()), json);
                }
                IdentityCommand::RevokeInstallation { installation } => {
                    let key = hex::decode(installation.trim_start_matches("0x"))
                        .context("the installation key must be hex")?;
                    client.revoke_installation(&key).await?;
                    println!("revoked {}", hex::encode(&key));
                }
                IdentityCommand::ChangeRecovery { address } => {
                    client.change_recovery(&address).await?;
                    println!("recovery is now {}", address.to_lowercase());
                }
            }
            gatehouse_client::flush_tree(&db).await?;
        }
        AgentCommand::Group { command, json } => {
            let (db, mut client) = open(home, node, None).await?;
            client.register().await?;
            // The group a changing command touched, printed with --json.
            let mut touched: Option<Vec<u8>> = None;
            match command {
                GroupCommand::Create {
                    name,
                    description,
                    members,
                } => {
                    let inboxes = resolve_all(&mut client, &members).await?;
                    let gid = client.create_group(&name, &description, &inboxes).await?;
                    if json {
                        println!("{}", client.conversation_info(&gid)?);
                    } else {
                        println!("{}", hex::encode(gid));
                    }
                }
                GroupCommand::Add {
                    conversation,
                    members,
                } => {
                    let gid = hex::decode(&conversation).context("--conversation must be hex")?;
                    let inboxes = resolve_all(&mut client, &members).await?;
                    client.add_members(&gid, &inboxes).await?;
                    touched = Some(gid);
                }
                GroupCommand::Remove {
                    conversation,
                    members,
                } => {
                    let gid = hex::decode(&conversation).context("--conversation must be hex")?;
                    let inboxes = resolve_all(&mut client, &members).await?;
                    client.remove_members(&gid, &inboxes).await?;
                    touched = Some(gid);
                }
                GroupCommand::Set {
                    conversation,
                    name,
                    description,
                } => {
                    let gid = hex::decode(&conversation).context("--conversation must be hex")?;
                    anyhow::ensure!(
                        name.is_some() || description.is_some(),
                        "give --name and/or --description"
                    );
                    if let Some(n) = name {
                        client
                            .update_metadata(
                                &gid,
                                gatehouse_protocol::group::MetadataUpdate::Attribute(
                                    "group_name".into(),
                                    n,
                                ),
                            )
                            .await?;
                    }
                    if let Some(d) = description {
                        client
                            .update_metadata(
                                &gid,
                                gatehouse_protocol::group::MetadataUpdate::Attribute(
                                    "description".into(),
                                    d,
                                ),
                            )
                            .await?;
                    }
                    touched = Some(gid);
                }
                GroupCommand::Admin {
                    conversation,
                    add,
                    remove,
                } => {
                    let gid = hex::decode(&conversation).context("--conversation must be hex")?;
                    let update = match (add, remove) {
                        (Some(a), _) => gatehouse_protocol::group::MetadataUpdate::AddAdmin(
                            client.resolve(&a).await?,
                        ),
                        (None, Some(r)) => gatehouse_protocol::group::MetadataUpdate::RemoveAdmin(
                            client.resolve(&r).await?,
                        ),
                        (None, None) => anyhow::bail!("give --add or --remove"),
                    };
                    client.update_metadata(&gid, update).await?;
                    touched = Some(gid);
                }
                GroupCommand::Leave { conversation } => {
                    let gid = hex::decode(&conversation).context("--conversation must be hex")?;
                    client.leave(&gid).await?;
                    touched = Some(gid);
                }
                GroupCommand::Info { conversation } => {
                    let gid = hex::decode(&conversation).context("--conversation must be hex")?;
                    client.sync_all().await?;
                    println!("{}", client.conversation_info(&gid)?);
                }
            }
            if json && let Some(gid) = touched {
                println!("{}", client.conversation_info(&gid)?);
            }
            gatehouse_client::flush_tree(&db).await?;
        }
        AgentCommand::Conversations { json: _ } => {
            let (_db, mut client) = open(home, node, None).await?;
            client.sync_welcomes().await?;
            for (gid, _) in client.conversations()? {
                println!("{}", client.conversation_info(&gid)?);
            }
        }
        AgentCommand::Requests { json } => {
            let (db, mut client) = open(home, node, None).await?;
            client.register().await?;
            client.set_surface_requests(false);
            client.sync_all().await?;
            let requests = client.requests()?;
            mention_unreadable(&client)?;
            for m in requests {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "conversation": m.conversation,
                            "id": m.id,
                            "message_id": m.message_id,
                            "sender_inbox": m.sender_inbox,
                            "content_type": m.content_type,
                            "text": m.text,
                            "sent_at": rfc3339_secs(m.sent_at_ns),
                        })
                    );
                } else {
                    println!(
                        "[{}] {} (conversation {}): {}",
                        rfc3339_secs(m.sent_at_ns),
                        m.sender_inbox,
                        m.conversation,
                        m.text.as_deref().unwrap_or("(no text)")
                    );
                }
            }
            gatehouse_client::flush_tree(&db).await?;
        }
        AgentCommand::Unreadable { json, forget } => {
            let (db, client) = open(home, node, None).await?;
            for aside in client.set_aside_records()? {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "record": aside.name(),
                            "what": aside.what(),
                            "problem": aside.problem,
                            "bytes": aside.bytes.len(),
                            "payload": hex::encode(&aside.bytes),
                        })
                    );
                } else {
                    println!(
                        "{} ({}): {}; {} bytes kept",
                        aside.name(),
                        aside.what(),
                        aside.problem,
                        aside.bytes.len()
                    );
                }
                if forget {
                    client.forget_set_aside(&aside)?;
                }
            }
            gatehouse_client::flush_tree(&db).await?;
        }
        AgentCommand::Consent { command } => {
            use gatehouse_protocol::consent::{Entity, State};
            let (db, mut client) = open(home, node, None).await?;
            client.register().await?;
            let allow = matches!(command, ConsentCommand::Allow { .. });
            match command {
                ConsentCommand::Allow { target } | ConsentCommand::Deny { target } => {
                    let state = if allow { State::Allowed } else { State::Denied };
                    // A conversation this home knows, else an inbox id or 0x address.
                    let is_conversation = hex::decode(&target).is_ok_and(|gid| {
                        client
                            .conversations()
                            .is_ok_and(|c| c.iter().any(|(g, _)| *g == gid))
                    });
                    let (kind, entity) = if is_conversation {
                        (Entity::ConversationId, target.to_ascii_lowercase())
                    } else {
                        (Entity::InboxId, client.resolve(&target).await?)
                    };
                    client.set_consent(kind, &entity, state).await?;
                    println!(
                        "{} {entity}",
                        if state == State::Allowed {
                            "allowed"
                        } else {
                            "denied"
                        }
                    );
                }
                ConsentCommand::List { json } => {
                    client.sync_all().await?;
                    for r in client.consent_list()? {
                        if json {
                            println!("{}", serde_json::to_string(&r)?);
                        } else {
                            println!("{:?} {} {:?}", r.kind, r.entity, r.state);
                        }
                    }
                }
            }
            gatehouse_client::flush_tree(&db).await?;
        }
        AgentCommand::Whois { identifier, json } => {
            let (_db, mut client) = open(home, node, None).await?;
            let inbox = client.resolve(&identifier).await?;
            let (st, _) = client.inbox_state(&inbox).await?;
            print_identity(&st, None, json);
        }
        AgentCommand::Listen {
            json,
            count,
            timeout,
            transcripts,
        } => {
            let (db, mut client) = open(home, node, None).await?;
            client.register().await?;
            // A message read but not yet printed (by another command, or a `--count` reached
            // mid-batch, or a kill) stays owed and is printed by the next listen, first.
            let deadline = timeout.map(|t| Instant::now() + Duration::from_secs(t));
            let mut seen = 0usize;
            let mut owed = client.undelivered()?;
            mention_unreadable(&client)?;
            // The node's streams say which conversation has news (as XMTP clients stream);
            // a full read still runs every few seconds and after each new conversation.
            let mut listener = gatehouse_client::Listener::new();
            // The node stopping or restarting is waited out, as `mosquitto_sub` waits out its
            // broker: nothing is lost (what was read but not printed stays owed).
            let mut backoff = LISTEN_RETRY_FIRST;
            loop {
                let batch = if owed.is_empty() {
                    let wait = deadline.map_or(LISTEN_WAIT, |d| {
                        LISTEN_WAIT.min(d.saturating_duration_since(Instant::now()))
                    });
                    match client.listen(&mut listener, wait).await {
                        Ok(batch) => {
                            backoff = LISTEN_RETRY_FIRST;
                            batch
                        }
                        Err(e) if e.is_unreachable() => {
                            let why = match &e {
                                gatehouse_client::ClientError::Node(s)
                                    if !s.message().is_empty() =>
                                {
                                    s.message().to_string()
                                }
                                other => other.to_string(),
                            };
                            eprintln!(
                                "the node is unreachable ({why}); trying again in {} s",
                                backoff.as_secs()
                            );
                            let until = Instant::now() + backoff;
                            tokio::time::sleep_until(
                                deadline.map_or(until, |d| until.min(d)).into(),
                            )
                            .await;
                            backoff = (backoff * 2).min(LISTEN_RETRY_MAX);
                            // Streams opened afresh, with a full read.
                            listener = gatehouse_client::Listener::new();
                            owed = client.undelivered()?;
                            Vec::new()
                        }
                        Err(e) => return Err(e.into()),
                    }
                } else {
                    std::mem::take(&mut owed)
                };
                for m in batch {
                    if m.is_transcript() && !transcripts {
                        if let Some(d) = m.delivery {
                            client.delivered(d)?;
                        }
                        continue;
                    }
                    if json {
                        let v = serde_json::json!({
                            "conversation": m.conversation,
                            "id": m.id,
                            "message_id": m.message_id,
                            "request": m.request,
                            "sender_inbox": m.sender_inbox,
                            "sender_installation": m.sender_installation,
                            "content_type": m.content_type,
                            "text": m.text,
                            "sent_at": rfc3339_secs(m.sent_at_ns),
                            "sent_at_ns": m.sent_at_ns,
                            "sender_endpoint": m.sender_endpoint,
                        });
                        println!("{v}");
                    } else {
                        println!(
                            "[{}] {}{}: {}",
                            rfc3339_secs(m.sent_at_ns),
                            if m.request { "(request) " } else { "" },
                            m.sender_inbox,
                            m.text.as_deref().unwrap_or("(no text)")
                        );
                    }
                    if let Some(d) = m.delivery {
                        client.delivered(d)?;
                    }
                    seen += 1;
                    if count.is_some_and(|c| seen >= c) {
                        gatehouse_client::flush_tree(&db).await?;
                        return Ok(0);
                    }
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    gatehouse_client::flush_tree(&db).await?;
                    if count.is_some() {
                        eprintln!("timed out after {seen} message(s)");
                        return Ok(3);
                    }
                    return Ok(0);
                }
            }
        }
    }
    Ok(0)
}
