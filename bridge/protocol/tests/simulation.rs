//! Deterministic group simulation: no sockets, a virtual clock, an in-memory node.
//!
//! 3–10 installations share one group. Each tick of the virtual clock a seeded scheduler picks
//! an action: a member sends, a member commits (any member adds; the super admin removes), a
//! member reads, or an attacker replays an old envelope. The network between members and the
//! node drops publishes, duplicates them, delays them past later ones (reorder), and fails,
//! duplicates, shuffles or truncates reads. Members follow the client's rules: read in node
//! order from a cursor; a commit is merged only when the node ordered it first for its epoch,
//! otherwise it is dropped and the intent retried on the new epoch; a publish not seen in the
//! log is sent again (the same commit bytes; a message with the same idempotency key, on the
//! current epoch if the old copy landed on a stale one); receivers drop idempotency keys they
//! have seen.
//!
//! At the end every member in the group is on the same epoch with the same authenticator,
//! every member decrypted exactly the messages sent while it was in the group (each once, with
//! the text sent), and no replayed envelope was ever accepted.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use gatehouse_protocol::content;
use gatehouse_protocol::group::{self, MlsGroupHandle as MlsGroup, Processed, Provider};
use gatehouse_protocol::identity::InstallationKey;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Ticks a publish may wait in the network before it reaches the node.
const MAX_DELAY: u64 = 6;
/// Ticks a sender waits for its publish to show in the log before sending it again.
const RESEND_AFTER: u64 = 10;

#[derive(Clone)]
struct Envelope {
    id: u64,
    data: Vec<u8>,
    commit: bool,
}

#[derive(Default)]
struct Node {
    log: Vec<Envelope>,
    /// Welcomes per member: (welcome, cursor to read after).
    welcomes: HashMap<usize, Vec<(Vec<u8>, u64)>>,
}

impl Node {
    fn append(&mut self, data: Vec<u8>, commit: bool) -> u64 {
        let id = self.log.len() as u64 + 1;
        self.log.push(Envelope { id, data, commit });
        id
    }
}

struct Attempt {
    data: Vec<u8>,
    epoch: u64,
    at: u64,
}

struct Outgoing {
    key: String,
    text: String,
    attempts: Vec<Attempt>,
}

enum Intent {
    Add(usize),
    Remove(usize),
}

struct PendingCommit {
    data: Vec<u8>,
    welcome: Option<(usize, Vec<u8>)>,
    at: u64,
}

struct Member {
    inbox: String,
    key: InstallationKey,
    provider: Provider,
    group: Option<MlsGroup>,
    cursor: u64,
    welcome_cursor: usize,
    pending: Option<PendingCommit>,
    intents: Vec<Intent>,
    outbox: Vec<Outgoing>,
    seen: BTreeSet<String>,
    received: Vec<(String, String)>,
}

impl Member {
    fn active(&self) -> bool {
        self.group.as_ref().is_some_and(group::is_active)
    }
    fn epoch(&self) -> u64 {
        self.group.as_ref().map_or(0, |g| g.epoch().as_u64())
    }
}

/// What the omniscient observer records: membership changes and delivered messages, each at
/// its node position.
#[derive(Default)]
struct Truth {
    /// (position, member, joined?) in node order.
    membership: Vec<(u64, usize, bool)>,
    /// key → (position of the copy that counted, text).
    delivered: BTreeMap<String, (u64, String)>,
    sent: BTreeMap<String, String>,
    replays_accepted: usize,
    replayed: BTreeSet<u64>,
}

impl Truth {
    fn member_at(&self, m: usize, position: u64, initial: &[usize]) -> bool {
        let mut inside = initial.contains(&m);
        for (p, who, joined) in &self.membership {
            if *p < position && *who == m {
                inside = *joined;
            }
        }
        inside
    }
}

struct Sim {
    rng: StdRng,
    now: u64,
    node: Node,
    members: Vec<Member>,
    /// Publishes in flight: (due tick, data, commit).
    network: Vec<(u64, Vec<u8>, bool)>,
    faults: bool,
    truth: Truth,
    initial: Vec<usize>,
    next_message: usize,
}

impl Sim {
    fn new(seed: u64, size: usize) -> Self {
        let mut members: Vec<Member> = (0..size)
            .map(|i| Member {
                inbox: format!("{:064x}", i + 1),
                key: InstallationKey::from_seed(&[i as u8 + 1; 32]),
                provider: Provider::default(),
                group: None,
                cursor: 0,
                welcome_cursor: 0,
                pending: None,
                intents: Vec::new(),
                outbox: Vec::new(),
                seen: BTreeSet::new(),
                received: Vec::new(),
            })
            .collect();
        let mut rng = StdRng::seed_from_u64(seed);
        // Member 0 creates the group with members 1 and 2.
        let initial = vec![0, 1, 2];
        let invitees = (1..3)
            .map(|i| key_package(&members[i], &members[0]))
            .collect();
        let membership = initial
            .iter()
            .map(|i| (members[*i].inbox.clone(), 1u64))
            .collect();
        let created = group::create_best(
            &members[0].provider,
            &members[0].key,
            &members[0].inbox.clone(),
            group::Kind::Group {
                name: "sim",
                description: "",
            },
            invitees,
            &membership,
            &mut rng,
        )
        .unwrap();
        let mut node = Node::default();
        let id = node.append(created.commit, true);
        members[0].group = Some(created.group);
        members[0].cursor = id;
        for i in 1..3 {
            node.welcomes
                .entry(i)
                .or_default()
                .push((created.welcome.clone(), id));
        }
        Sim {
            rng,
            now: 0,
            node,
            members,
            network: Vec::new(),
            faults: true,
            truth: Truth::default(),
            initial,
            next_message: 0,
        }
    }

    /// A publish through the faulty network.
    fn publish(&mut self, data: Vec<u8>, commit: bool) {
        if self.faults {
            let r: f64 = self.rng.r#gen();
            if r < 0.10 {
                return; // lost
            }
            let copies = if r < 0.18 { 2 } else { 1 };
            for _ in 0..copies {
                let delay = self.rng.gen_range(0..=MAX_DELAY);
                self.network.push((self.now + delay, data.clone(), commit));
            }
        } else {
            self.network.push((self.now, data, commit));
        }
    }

    fn deliver_network(&mut self) {
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.network)
            .into_iter()
            .partition(|(t, _, _)| *t <= now);
        self.network = later;
        for (_, data, commit) in due {
            self.node.append(data, commit);
        }
    }

    /// A read through the faulty network: may fail, duplicate, shuffle or truncate.
    fn fetch(&mut self, after: u64) -> Option<Vec<Envelope>> {
        let mut page: Vec<Envelope> = self
            .node
            .log
            .iter()
            .filter(|e| e.id > after)
            .cloned()
            .collect();
        if self.faults {
            let r: f64 = self.rng.r#gen();
            if r < 0.1 {
                return None;
            }
            if r < 0.3 && !page.is_empty() {
                let extra = page[self.rng.gen_range(0..page.len())].clone();
                page.push(extra);
            }
            if r < 0.5 {
                page.shuffle(&mut self.rng);
            }
            if r > 0.8 && page.len() > 1 {
                let keep = self.rng.gen_range(1..page.len());
                page.truncate(keep);
            }
        }
        Some(page)
    }

    fn join_welcomes(&mut self, m: usize) {
        if self.faults && self.rng.gen_bool(0.1) {
            return;
        }
        let list = self.node.welcomes.get(&m).cloned().unwrap_or_default();
        let member = &mut self.members[m];
        for (w, cursor) in list.into_iter().skip(member.welcome_cursor) {
            member.welcome_cursor += 1;
            let g = group::join(&member.provider, &w).expect("welcome joins");
            member.group = Some(g);
            member.cursor = cursor;
            member.pending = None;
        }
    }

    /// Reads the log in node order from the member's cursor and applies it.
    fn sync(&mut self, m: usize) {
        self.join_welcomes(m);
        if self.members[m].group.is_none() {
            return;
        }
        let cursor = self.members[m].cursor;
        let Some(mut page) = self.fetch(cursor) else {
            return;
        };
        // The client's rules: node order, each id once, nothing at or below the cursor, and
        // only a gap-free prefix (a truncated read is continued next time).
        page.sort_by_key(|e| e.id);
        page.dedup_by_key(|e| e.id);
        for (next, e) in (cursor + 1..).zip(page) {
            if e.id != next {
                break;
            }
            self.apply(m, &e);
            self.members[m].cursor = e.id;
            if !self.members[m].active() {
                break;
            }
        }
    }

    fn apply(&mut self, m: usize, e: &Envelope) {
        let replay = self.truth.replayed.contains(&e.id);
        let member = &mut self.members[m];
        if !member.active() {
            return;
        }
        let epoch_before = member.epoch();
        // Our own envelopes come back: confirm them.
        if let Some(p) = &member.pending
            && p.data == e.data
        {
            let p = member.pending.take().unwrap();
            let g = member.group.as_mut().unwrap();
            let before = leaves_of(g);
            group::merge_pending(&member.provider, g).unwrap();
            let after = leaves_of(g);
            if let Some((to, w)) = p.welcome {
                self.node.welcomes.entry(to).or_default().push((w, e.id));
            }
            if m == 0 {
                self.record_membership(e.id, &before, &after);
            }
            return;
        }
        if !e.commit
            && let Some(pos) = member
                .outbox
                .iter()
                .position(|o| o.attempts.iter().any(|a| a.data == e.data))
        {
            let attempt_epoch = member.outbox[pos]
                .attempts
                .iter()
                .find(|a| a.data == e.data)
                .unwrap()
                .epoch;
            // Counted only if it landed on the epoch it was encrypted for; otherwise the
            // sender sends it again (same key) on the current epoch.
            if attempt_epoch == epoch_before {
                let o = member.outbox.remove(pos);
                self.truth.delivered.entry(o.key).or_insert((e.id, o.text));
            } else {
                member.outbox[pos]
                    .attempts
                    .iter_mut()
                    .for_each(|a| a.at = 0);
            }
            return;
        }
        let g = member.group.as_mut().unwrap();
        let before = leaves_of(g);
        match group::process(&member.provider, g, &e.data) {
            Ok(Processed::Application { plaintext, .. }) => {
                if replay {
                    self.truth.replays_accepted += 1;
                }
                let content::Opened::Content {
                    content,
                    idempotency_key,
                    ..
                } = content::open_envelope(&plaintext).unwrap()
                else {
                    panic!("not content");
                };
                if member.seen.insert(idempotency_key.clone()) {
                    member
                        .received
                        .push((idempotency_key, content::display_text(&content).unwrap()));
                }
            }
            Ok(Processed::PendingCommit { staged, .. }) => {
                if replay {
                    self.truth.replays_accepted += 1;
                }
                // Another member's commit came first for this epoch: ours loses and is
                // retried on the new epoch.
                if let Some(p) = member.pending.take() {
                    group::clear_pending(&member.provider, g).unwrap();
                    let _ = p;
                }
                group::merge_commit(&member.provider, g, *staged).unwrap();
                let after = leaves_of(g);
                if m == 0 {
                    self.record_membership(e.id, &before, &after);
                }
            }
            Ok(_) => {}
            Err(_) => {} // stale epoch, our own message, or a replay
        }
    }

    fn record_membership(&mut self, position: u64, before: &[Vec<u8>], after: &[Vec<u8>]) {
        for (i, member) in self.members.iter().enumerate() {
            let k = member.key.public().to_vec();
            match (before.contains(&k), after.contains(&k)) {
                (false, true) => self.truth.membership.push((position, i, true)),
                (true, false) => self.truth.membership.push((position, i, false)),
                _ => {}
            }
        }
    }

    fn send(&mut self, m: usize) {
        self.sync(m);
        let member = &self.members[m];
        if !member.active() || member.pending.is_some() {
            return;
        }
        self.next_message += 1;
        let key = format!("k{}", self.next_message);
        let text = format!("message {} from {}", self.next_message, m);
        self.truth.sent.insert(key.clone(), text.clone());
        self.members[m].outbox.push(Outgoing {
            key,
            text,
            attempts: Vec::new(),
        });
        self.flush_outbox(m);
    }

    /// Sends outbox messages with no recent attempt (first sends and resends).
    fn flush_outbox(&mut self, m: usize) {
        let now = self.now;
        let mut out = Vec::new();
        {
            let member = &mut self.members[m];
            if !member.active() || member.pending.is_some() {
                return;
            }
            let epoch = member.epoch();
            for o in member.outbox.iter_mut() {
                if o.attempts
                    .iter()
                    .any(|a| a.at + RESEND_AFTER > now && a.at != 0)
                {
                    continue;
                }
                let data = group::encrypt(
                    &member.provider,
                    &member.key,
                    member.group.as_mut().unwrap(),
                    &content::seal_envelope(&content::text(&o.text), &o.key),
                )
                .unwrap();
                o.attempts.push(Attempt {
                    data: data.clone(),
                    epoch,
                    at: now.max(1),
                });
                out.push(data);
            }
        }
        for data in out {
            self.publish(data, false);
        }
    }

    fn commit(&mut self, m: usize) {
        self.sync(m);
        if !self.members[m].active() {
            return;
        }
        if self.members[m].pending.is_some() {
            self.resend_pending(m);
            return;
        }
        let inside: Vec<usize> = {
            let g = self.members[m].group.as_ref().unwrap();
            let leaves = leaves_of(g);
            (0..self.members.len())
                .filter(|i| leaves.contains(&self.members[*i].key.public().to_vec()))
                .collect()
        };
        if self.members[m].intents.is_empty() {
            let outside: Vec<usize> = (0..self.members.len())
                .filter(|i| !inside.contains(i))
                .collect();
            let removable: Vec<usize> = inside.iter().copied().filter(|i| *i != 0).collect();
            if m == 0 && !removable.is_empty() && (outside.is_empty() || self.rng.gen_bool(0.3)) {
                let r = removable[self.rng.gen_range(0..removable.len())];
                self.members[m].intents.push(Intent::Remove(r));
            } else if !outside.is_empty() {
                let a = outside[self.rng.gen_range(0..outside.len())];
                self.members[m].intents.push(Intent::Add(a));
            }
        }
        let Some(intent) = self.members[m].intents.pop() else {
            return;
        };
        // Intents that no longer make sense on the current epoch are dropped.
        let (adds, remove, welcome_to) = match intent {
            Intent::Add(a) if !inside.contains(&a) => {
                let kp = key_package(&self.members[a], &self.members[m]);
                (vec![kp], vec![], Some(a))
            }
            Intent::Remove(r) if inside.contains(&r) => {
                (vec![], vec![self.members[r].key.public().to_vec()], None)
            }
            _ => return,
        };
        let retry = match &intent {
            Intent::Add(a) => Intent::Add(*a),
            Intent::Remove(r) => Intent::Remove(*r),
        };
        let member = &mut self.members[m];
        let g = member.group.as_mut().unwrap();
        let mut membership = group::membership(g).unwrap();
        if let Some(a) = welcome_to {
            membership.insert(format!("{:064x}", a + 1), 1);
        }
        if let Intent::Remove(r) = &intent {
            membership.remove(&format!("{:064x}", r + 1));
        }
        let adds = group::key_packages_for(g, adds);
        let staged =
            group::commit_membership(&member.provider, &member.key, g, adds, &remove, &membership)
                .unwrap();
        member.intents.push(retry);
        member.pending = Some(PendingCommit {
            data: staged.commit.clone(),
            welcome: welcome_to.map(|a| (a, staged.welcome.clone().unwrap())),
            at: self.now,
        });
        self.publish(staged.commit, true);
    }

    /// A pending commit not seen in the log is published again (the same bytes).
    fn resend_pending(&mut self, m: usize) {
        if let Some(p) = &self.members[m].pending
            && p.at + RESEND_AFTER <= self.now
        {
            let data = p.data.clone();
            self.members[m].pending.as_mut().unwrap().at = self.now;
            self.publish(data, true);
        }
    }

    /// The attacker (or a buggy node) appends a copy of an earlier envelope.
    fn replay(&mut self) {
        if self.node.log.len() < 2 {
            return;
        }
        let old = self.node.log[self.rng.gen_range(1..self.node.log.len())].clone();
        let id = self.node.append(old.data, old.commit);
        self.truth.replayed.insert(id);
    }

    fn tick(&mut self) {
        self.now += 1;
        self.deliver_network();
        let m = self.rng.gen_range(0..self.members.len());
        let r: f64 = self.rng.r#gen();
        if r < 0.40 {
            self.send(m);
        } else if r < 0.52 {
            self.commit(m);
        } else if r < 0.97 {
            self.sync(m);
            self.flush_outbox(m);
        } else {
            self.replay();
        }
        // Intents whose commit won are done: drop the intent once it no longer applies.
        for i in 0..self.members.len() {
            if self.members[i].pending.is_none() {
                let inside: Vec<Vec<u8>> = self.members[i]
                    .group
                    .as_ref()
                    .map(leaves_of)
                    .unwrap_or_default();
                let keys: Vec<Vec<u8>> = self
                    .members
                    .iter()
                    .map(|x| x.key.public().to_vec())
                    .collect();
                self.members[i].intents.retain(|it| match it {
                    Intent::Add(a) => !inside.contains(&keys[*a]),
                    Intent::Remove(r) => inside.contains(&keys[*r]),
                });
            }
        }
    }

    /// Faults off; everyone reads until nothing is pending or unsent.
    fn settle(&mut self) {
        self.faults = false;
        for _ in 0..200 {
            self.now += RESEND_AFTER;
            self.deliver_network();
            for m in 0..self.members.len() {
                self.members[m].intents.clear();
                self.sync(m);
                self.resend_pending(m);
                self.flush_outbox(m);
            }
            self.deliver_network();
            let busy = self
                .members
                .iter()
                .any(|m| m.active() && (m.pending.is_some() || !m.outbox.is_empty()))
                || !self.network.is_empty();
            if !busy {
                for m in 0..self.members.len() {
                    self.sync(m);
                }
                return;
            }
        }
        let state: Vec<String> = self
            .members
            .iter()
            .map(|m| {
                format!(
                    "active {} epoch {} cursor {} pending {} outbox {:?}",
                    m.active(),
                    m.epoch(),
                    m.cursor,
                    m.pending.is_some(),
                    m.outbox
                        .iter()
                        .map(|o| o.attempts.iter().map(|a| a.epoch).collect::<Vec<_>>())
                        .collect::<Vec<_>>()
                )
            })
            .collect();
        panic!(
            "the simulation did not settle (log {}): {state:#?}",
            self.node.log.len()
        );
    }
}

fn leaves_of(g: &MlsGroup) -> Vec<Vec<u8>> {
    group::leaves(g).into_iter().map(|(_, k)| k).collect()
}

fn key_package(of: &Member, reader: &Member) -> group::VerifiedKeyPackage {
    let kp =
        group::build_key_package(&of.provider, &of.inbox, &of.key, &mut rand::rngs::OsRng).unwrap();
    group::validate_key_package(&reader.provider, &kp.tls).unwrap()
}

fn run(seed: u64, size: usize, ticks: u64) {
    let mut sim = Sim::new(seed, size);
    for _ in 0..ticks {
        sim.tick();
    }
    sim.settle();
    let label = format!("seed {seed}, {size} members");

    // Same epoch and authenticator for everyone in the group.
    let inside: Vec<usize> = (0..size).filter(|m| sim.members[*m].active()).collect();
    assert!(inside.contains(&0), "{label}: the creator is in the group");
    let (epoch, auth) = {
        let g = sim.members[0].group.as_ref().unwrap();
        (
            g.epoch().as_u64(),
            g.epoch_authenticator().as_slice().to_vec(),
        )
    };
    assert!(epoch > 1, "{label}: commits happened");
    for m in &inside {
        let g = sim.members[*m].group.as_ref().unwrap();
        assert_eq!(g.epoch().as_u64(), epoch, "{label}: member {m} epoch");
        assert_eq!(
            g.epoch_authenticator().as_slice(),
            auth.as_slice(),
            "{label}: member {m} authenticator"
        );
    }
    assert_eq!(
        sim.truth.replays_accepted, 0,
        "{label}: a replay was accepted"
    );
    assert!(
        !sim.truth.replayed.is_empty(),
        "{label}: replays were tried"
    );

    // Everything sent was delivered, and each member decrypted exactly what was sent while it
    // was in the group: once each, with the text sent.
    // (A member removed before its message was ordered keeps it, undelivered: it is no longer
    // in the group to send it.)
    for k in sim.truth.sent.keys() {
        if !sim.truth.delivered.contains_key(k) {
            let held_by_removed = sim
                .members
                .iter()
                .any(|m| !m.active() && m.outbox.iter().any(|o| o.key == *k));
            assert!(held_by_removed, "{label}: {k} was never delivered");
        }
    }
    assert!(
        sim.truth.delivered.len() * 2 > sim.truth.sent.len(),
        "{label}: most messages were delivered"
    );
    let mut decrypted = 0;
    for (m, member) in sim.members.iter().enumerate() {
        let got: BTreeMap<&str, &str> = member
            .received
            .iter()
            .map(|(k, t)| (k.as_str(), t.as_str()))
            .collect();
        assert_eq!(
            got.len(),
            member.received.len(),
            "{label}: member {m} got a duplicate"
        );
        for (k, t) in &got {
            assert_eq!(
                sim.truth.sent.get(*k).map(String::as_str),
                Some(*t),
                "{label}"
            );
        }
        for (k, (position, text)) in &sim.truth.delivered {
            let sender_is_m = text.ends_with(&format!("from {m}"));
            if sim.truth.member_at(m, *position, &sim.initial) && !sender_is_m {
                assert_eq!(
                    got.get(k.as_str()),
                    Some(&text.as_str()),
                    "{label}: member {m} missed {k} at position {position}"
                );
            }
        }
        decrypted += got.len();
    }
    assert!(decrypted > 0, "{label}: messages were decrypted");
}

/// 3 to 10 installations, each with its own seed, under drops, duplicates, reorders and replays.
#[test]
fn random_interleavings_converge() {
    for size in 3..=10 {
        run(size as u64 * 7919, size, 120);
    }
}
