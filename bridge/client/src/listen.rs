//! Listening: the node's streams say which conversation has something new, and only that one
//! is read — as XMTP clients stream rather than poll. A full read ([`Client::sync_all`]: new
//! conversations, consent from sibling installations, membership of every conversation) still
//! runs when the listener first subscribes, after a stream ended and
//! [`Listener::full_read_every`] after the last one, so nothing depends on the streams alone:
//! a missed or ended stream costs latency, never a message. When the client's conversations
//! change (a welcome joined, or it started one), the streams start again from the read cursors
//! and only conversations without one are read at once (an agent with thousands of
//! conversations is not read whole for each new one).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use gatehouse_wire::mls_api as mpb;
use tonic::Streaming;

use crate::{Client, Received, Result, flush_tree};

/// How long after the end of one full read [`Client::listen`] does the next, by default. A
/// full read asks the node about every conversation, so with thousands of them it takes
/// seconds; counted from its end, the streams are always served in between.
pub const FULL_READ_EVERY: Duration = Duration::from_secs(30);

/// The state of a [`Client::listen`] loop: the node's streams and when the last full read was.
/// One listener belongs to one client.
pub struct Listener {
    groups: Option<Streaming<mpb::GroupMessage>>,
    welcomes: Option<Streaming<mpb::WelcomeMessage>>,
    /// The client's conversation set the streams cover (see `Client::conversations_gen`).
    subscribed: Option<u64>,
    last_full: Option<Instant>,
    full_every: Duration,
    full_reads: u64,
    /// Whether the node said its group stream leaves nothing out
    /// ([`gatehouse_protocol::placed::GAP_FREE`]).
    gap_free: bool,
    /// Per conversation, the id the group stream has got to (its subscription cursor until it
    /// streams something; unknown for a conversation subscribed without one).
    streamed_to: HashMap<Vec<u8>, u64>,
    streamed_reads: u64,
}

impl Default for Listener {
    fn default() -> Self {
        Self::new()
    }
}

/// What one stream item says.
enum News {
    /// A message in this conversation, at this node id: the message itself.
    Group(Vec<u8>, u64, mpb::GroupMessage),
    /// A welcome for this installation (a new conversation), at this node id.
    Welcome(u64),
    /// Something this client does not read.
    Other,
}

impl Listener {
    /// A listener that is not subscribed yet (the first [`Client::listen`] subscribes).
    pub fn new() -> Self {
        Listener {
            groups: None,
            welcomes: None,
            subscribed: None,
            last_full: None,
            full_every: FULL_READ_EVERY,
            full_reads: 0,
            gap_free: false,
            streamed_to: HashMap::new(),
            streamed_reads: 0,
        }
    }

    /// Sets how often a full read runs besides the streamed news ([`FULL_READ_EVERY`]).
    pub fn full_read_every(mut self, every: Duration) -> Self {
        self.full_every = every;
        self
    }

    /// How many full reads this listener has done (the rest came from the streams).
    pub fn full_reads(&self) -> u64 {
        self.full_reads
    }

    /// How many conversation reads took the streamed messages as they came, without asking
    /// the node (possible with a node whose stream leaves nothing out).
    pub fn streamed_reads(&self) -> u64 {
        self.streamed_reads
    }

    /// The next stream item; `None` when a stream ended or failed (subscribe again).
    async fn next(&mut self) -> Option<News> {
        let (Some(g), Some(w)) = (self.groups.as_mut(), self.welcomes.as_mut()) else {
            return None;
        };
        tokio::select! {
            m = g.message() => match m {
                Ok(Some(m)) => Some(match &m.version {
                    Some(mpb::group_message::Version::V1(v)) => {
                        News::Group(v.group_id.clone(), v.id, m)
                    }
                    None => News::Other,
                }),
                _ => None,
            },
            m = w.message() => match m {
                Ok(Some(m)) => Some(match m.version {
                    Some(mpb::welcome_message::Version::V1(v)) => News::Welcome(v.id),
                    Some(mpb::welcome_message::Version::WelcomePointer(p)) => News::Welcome(p.id),
                    None => News::Other,
                }),
                _ => None,
            },
        }
    }

    fn ended(&mut self) {
        self.groups = None;
        self.welcomes = None;
        self.subscribed = None;
        self.gap_free = false;
        self.streamed_to.clear();
    }
}

/// What a gap-free stream ([`gatehouse_protocol::placed::GAP_FREE`]) brought for one
/// conversation: every message after id `from` up to the last one here, in id order, none
/// left out (`from` is where that stream had got before: its subscription cursor or the id of
/// the message it brought before these).
#[derive(Debug, Clone, Default)]
pub struct Streamed {
    /// Where the stream had got before these messages.
    pub from: u64,
    /// The messages after `from`, in id order.
    pub messages: Vec<mpb::GroupMessage>,
}

/// A group message's node id (0 for one of an unknown version).
fn message_id(m: &mpb::GroupMessage) -> u64 {
    match &m.version {
        Some(mpb::group_message::Version::V1(v)) => v.id,
        None => 0,
    }
}

/// Whether what a gap-free stream brings next for a conversation is all that follows its read
/// cursor: the stream had got to `streamed_to` before, so it brings next what follows that,
/// and the cursor is there or beyond (what the stream brought before was read, or skipped as
/// our own). Otherwise — the stream's start unknown, or a read that did not finish — the node
/// is asked.
fn streamed_complete(gap_free: bool, streamed_to: Option<u64>, cursor: u64) -> bool {
    gap_free && streamed_to.is_some_and(|s| cursor >= s)
}

impl Client {
    /// Waits up to `wait` for the node to report something new and returns what it reads, like
    /// [`Client::sync_all`] (consent-gated, deliveries retained) but reading only the
    /// conversations the node's streams named (a welcome is joined, and its conversation
    /// followed from the next call on). Returns early with a full read on the first call,
    /// after a stream ended and [`Listener::full_read_every`] after the last one. An empty
    /// result means nothing arrived within `wait`.
    pub async fn listen(&mut self, l: &mut Listener, wait: Duration) -> Result<Vec<Received>> {
        if l.subscribed.is_none() {
            // Subscribe first, then read everything: what arrives in between is both read
            // and streamed (the second is skipped by its id).
            self.subscribe(l).await?;
            return self.full_read(l).await;
        }
        if l.subscribed != Some(self.conversations_gen) {
            // A conversation came or went: the streams start again from the read cursors,
            // so only what has none (the node starts those at the present) is read now.
            let (fresh, no_welcome_cursor) = self.subscribe(l).await?;
            if no_welcome_cursor {
                self.sync_welcomes().await?;
            }
            return self.read_groups(fresh, HashMap::new()).await;
        }
        if l.last_full.is_none_or(|t| t.elapsed() >= l.full_every) {
            return self.full_read(l).await;
        }
        let until = l
            .last_full
            .map_or(wait, |t| wait.min(l.full_every.saturating_sub(t.elapsed())));
        let mut news = Vec::new();
        match tokio::time::timeout(until, l.next()).await {
            Err(_) => return Ok(Vec::new()),
            Ok(None) => {
                l.ended();
                return Ok(Vec::new());
            }
            Ok(Some(n)) => news.push(n),
        }
        // Whatever else has already arrived is read in the same pass.
        loop {
            match l.next().now_or_never() {
                Some(Some(n)) => news.push(n),
                Some(None) => {
                    l.ended();
                    break;
                }
                None => break,
            }
        }
        let mut groups: Vec<Vec<u8>> = Vec::new();
        // Per conversation named: whether the streamed messages are all that follows the
        // cursor, and those messages (after the cursor, in order).
        let mut named: HashMap<Vec<u8>, (bool, Vec<mpb::GroupMessage>)> = HashMap::new();
        let mut welcomed = false;
        for n in news {
            match n {
                News::Welcome(id) => {
                    welcomed |= id > crate::stored_welcome_cursor(&self.tree)?;
                }
                News::Group(gid, id, m) => {
                    let cursor = self.read_cursor(&gid)?;
                    let streamed_to = l.streamed_to.insert(gid.clone(), id);
                    if !named.contains_key(&gid) {
                        if id <= cursor {
                            continue;
                        }
                        let complete = streamed_complete(l.gap_free, streamed_to, cursor);
                        named.insert(gid.clone(), (complete, Vec::new()));
                        groups.push(gid.clone());
                    }
                    if let Some((true, page)) = named.get_mut(&gid)
                        && id > cursor
                    {
                        page.push(m);
                    }
                }
                News::Other => {}
            }
        }
        if welcomed {
            // New conversations: joined now; the next call follows them (their messages
            // replayed from their cursors, or read at once when they have none).
            self.sync_welcomes().await?;
        }
        let pages: HashMap<Vec<u8>, Vec<mpb::GroupMessage>> = named
            .into_iter()
            .filter(|(_, (complete, _))| *complete)
            .map(|(gid, (_, page))| (gid, page))
            .collect();
        l.streamed_reads += pages.len() as u64;
        self.read_groups(groups, pages).await
    }

    /// Reads only the conversations named — as [`Client::sync_all`] does (consent-gated,
    /// deliveries retained) but without joining welcomes or syncing consent, and with each
    /// conversation's membership looked at only when due. A conversation given with the
    /// messages a gap-free stream brought ([`Streamed`]) is read from them, without asking the
    /// node, when they cover everything after its read cursor (the cursor is at or past
    /// [`Streamed::from`]); otherwise, and without them, the node is asked. Returns what was
    /// read and how many conversations were read from their streamed messages.
    ///
    /// Unlike the other reads it does not flush: the caller calls [`Client::flush`] once it
    /// has acted on what was read (a crash before that loses the read, not the messages: they
    /// are read again from the node, so a consumer that publishes them may publish some twice).
    pub async fn read_named(
        &mut self,
        named: Vec<(Vec<u8>, Option<Streamed>)>,
    ) -> Result<(Vec<Received>, usize)> {
        let mut groups = Vec::with_capacity(named.len());
        let mut pages = HashMap::new();
        for (gid, streamed) in named {
            if let Some(s) = streamed {
                let cursor = self.read_cursor(&gid)?;
                if cursor >= s.from {
                    let page: Vec<mpb::GroupMessage> = s
                        .messages
                        .into_iter()
                        .filter(|m| message_id(m) > cursor)
                        .collect();
                    pages.insert(gid.clone(), page);
                }
            }
            groups.push(gid);
        }
        let streamed = pages.len();
        let out = self.read_pages(groups, false, pages).await?;
        Ok((self.gate(out)?, streamed))
    }

    /// Reads `groups`, consent-gated (membership looked at every `MEMBERSHIP_CHECK_INTERVAL`),
    /// with the node asked once for all of them ([`Client::read_pages`]).
    /// `pages` holds, for some of them, the messages that follow their cursors (streamed).
    async fn read_groups(
        &mut self,
        groups: Vec<Vec<u8>>,
        pages: HashMap<Vec<u8>, Vec<mpb::GroupMessage>>,
    ) -> Result<Vec<Received>> {
        let out = self.read_pages(groups, false, pages).await?;
        let out = self.gate(out)?;
        flush_tree(&self.tree).await?;
        Ok(out)
    }

    async fn full_read(&mut self, l: &mut Listener) -> Result<Vec<Received>> {
        l.full_reads += 1;
        let read = self.sync_all().await;
        l.last_full = Some(Instant::now());
        read
    }

    /// Opens the node's streams for this installation's welcomes and every known
    /// conversation, from the read cursors. Returns the conversations without a cursor and
    /// whether welcomes have none (for those the node's streams start at the present).
    async fn subscribe(&mut self, l: &mut Listener) -> Result<(Vec<Vec<u8>>, bool)> {
        l.ended();
        let gen_at = self.conversations_gen;
        let mut filters = Vec::new();
        let mut fresh = Vec::new();
        for (gid, _) in self.conversations()? {
            let id_cursor = self.read_cursor(&gid)?;
            if id_cursor == 0 {
                fresh.push(gid.clone());
            }
            filters.push(mpb::subscribe_group_messages_request::Filter {
                group_id: gid,
                id_cursor,
            });
        }
        let streamed_to: HashMap<Vec<u8>, u64> = filters
            .iter()
            .filter(|f| f.id_cursor != 0)
            .map(|f| (f.group_id.clone(), f.id_cursor))
            .collect();
        let groups = self
            .mls
            .subscribe_group_messages(mpb::SubscribeGroupMessagesRequest { filters })
            .await?;
        let gap_free = groups
            .metadata()
            .get(gatehouse_protocol::placed::STREAM_HEADER)
            .is_some_and(|v| v == gatehouse_protocol::placed::GAP_FREE);
        let groups = groups.into_inner();
        let welcome_cursor = crate::stored_welcome_cursor(&self.tree)?;
        let welcomes = self
            .mls
            .subscribe_welcome_messages(mpb::SubscribeWelcomeMessagesRequest {
                filters: vec![mpb::subscribe_welcome_messages_request::Filter {
                    installation_key: self.key.public().to_vec(),
                    id_cursor: welcome_cursor,
                }],
            })
            .await?
            .into_inner();
        l.groups = Some(groups);
        l.welcomes = Some(welcomes);
        l.subscribed = Some(gen_at);
        l.gap_free = gap_free;
        l.streamed_to = streamed_to;
        Ok((fresh, welcome_cursor == 0))
    }
}

#[cfg(test)]
mod tests {
    use super::streamed_complete;

    #[test]
    fn streamed_messages_count_as_complete_only_from_where_the_cursor_is() {
        // The stream got to 7 and the cursor is there (or past it: our own messages skipped).
        assert!(streamed_complete(true, Some(7), 7));
        assert!(streamed_complete(true, Some(7), 9));
        // A read that did not finish: the stream brought 8 and 9 but the cursor is at 7.
        assert!(!streamed_complete(true, Some(9), 7));
        // Subscribed without a cursor: where the stream starts is not known.
        assert!(!streamed_complete(true, None, 0));
        // A node that does not say its stream leaves nothing out.
        assert!(!streamed_complete(false, Some(7), 7));
    }
}
