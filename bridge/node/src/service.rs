//! The gRPC services. Handlers validate, store, then announce to live subscribers.

// tonic's `Status` is the error type the generated traits require; boxing it would only add
// a conversion at every return.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::pin::Pin;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::Stream;
use gatehouse_protocol::{group, identity, mls, placed};
use gatehouse_wire::Message as _;
use gatehouse_wire::identity_api as ipb;
use gatehouse_wire::mls_api as mpb;
use tokio::sync::{broadcast, mpsc};
use tonic::{Request, Response, Status};

use crate::store::{Store, StoreError};

/// Page size when a query names none (libxmtp pages by 100).
pub const DEFAULT_PAGE: usize = 100;
/// Largest page a query may ask for.
pub const MAX_PAGE: usize = 1000;
/// Live events buffered per subscriber before it falls back to re-reading the store.
const EVENT_BUFFER: usize = 4096;
/// Messages queued per subscription stream; the subscription task waits when it is full.
const STREAM_BUFFER: usize = 256;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn internal(e: StoreError) -> Status {
    tracing::error!(error = %e, "node store failure");
    Status::internal("storage failure")
}

#[derive(Clone, Debug)]
enum Event {
    Group(Vec<u8>),
    Welcome(Vec<u8>),
}

/// Shared node state behind both services.
#[derive(Clone)]
pub struct Node {
    store: Store,
    events: broadcast::Sender<Event>,
    // Serialises identity appends so that validation and append see the same log.
    identity_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// Set when the server stops: live subscriptions end, so a graceful shutdown does not
    /// wait for clients to hang up.
    closing: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
}

impl Node {
    /// A node over a store.
    pub fn new(store: Store) -> Self {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Self {
            store,
            events,
            identity_lock: Default::default(),
            closing: std::sync::Arc::new(tokio::sync::watch::channel(false).0),
        }
    }

    /// Ends every live subscription (and any opened later): the server is stopping.
    pub fn close_streams(&self) {
        self.closing.send_replace(true);
    }

    /// The store (for tests and admin).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The MlsApi service.
    pub fn mls(&self) -> MlsService {
        MlsService(self.clone())
    }

    /// The IdentityApi service.
    pub fn identity(&self) -> IdentityService {
        IdentityService(self.clone())
    }

    fn inbox_state(&self, inbox_id: &str) -> Result<(Option<identity::InboxState>, u64), Status> {
        let log = self.store.inbox_log(inbox_id, 0).map_err(internal)?;
        let last = log.last().map(|l| l.sequence_id).unwrap_or(0);
        let st = identity::fold(log.iter().map(|l| &l.update)).map_err(|e| {
            Status::internal(format!("stored log of {inbox_id} no longer folds: {e}"))
        })?;
        Ok((st, last))
    }
}

fn paging(p: Option<&mpb::PagingInfo>) -> (u64, bool, usize) {
    let p = p.cloned().unwrap_or_default();
    let descending = p.direction == mpb::SortDirection::Descending as i32;
    let limit = if p.limit == 0 {
        DEFAULT_PAGE
    } else {
        (p.limit as usize).min(MAX_PAGE)
    };
    (p.id_cursor, descending, limit)
}

fn paging_out(
    p: Option<&mpb::PagingInfo>,
    page: &[(u64, Vec<u8>)],
    limit: usize,
) -> Option<mpb::PagingInfo> {
    let p = p.cloned().unwrap_or_default();
    // The cursor is set only on a full page: that is how clients know to ask for more.
    let id_cursor = if page.len() == limit {
        page.last().map(|(id, _)| *id).unwrap_or(0)
    } else {
        0
    };
    Some(mpb::PagingInfo {
        direction: p.direction,
        limit: limit as u32,
        id_cursor,
    })
}

/// `xmtp.mls.api.v1.MlsApi`.
#[derive(Clone)]
pub struct MlsService(Node);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl mpb::mls_api_server::MlsApi for MlsService {
    async fn send_group_messages(
        &self,
        req: Request<mpb::SendGroupMessagesRequest>,
    ) -> Result<Response<()>, Status> {
        let node = &self.0;
        let req = req.into_inner();
        // Validate the whole batch before storing any of it.
        let mut parsed = Vec::with_capacity(req.messages.len());
        for (i, m) in req.messages.into_iter().enumerate() {
            let Some(mpb::group_message_input::Version::V1(v1)) = m.version else {
                return Err(Status::invalid_argument(format!(
                    "message {i}: no v1 payload"
                )));
            };
            let h = mls::read_header(&v1.data)
                .map_err(|e| Status::invalid_argument(format!("message {i}: {e}")))?;
            parsed.push((h, v1));
        }
        let groups: Vec<Vec<u8>> = parsed.iter().map(|(h, _)| h.group_id.clone()).collect();
        let placed = node
            .store
            .append_group_messages(&groups, |i, id| {
                let (h, v1) = &mut parsed[i];
                mpb::GroupMessage {
                    version: Some(mpb::group_message::Version::V1(mpb::group_message::V1 {
                        id,
                        created_ns: now_ns(),
                        group_id: h.group_id.clone(),
                        data: std::mem::take(&mut v1.data),
                        sender_hmac: std::mem::take(&mut v1.sender_hmac),
                        should_push: v1.should_push,
                        is_commit: h.is_commit(),
                    })),
                }
                .encode_to_vec()
            })
            .map_err(internal)?;
        // On disk before it is acknowledged or announced: a sender that got an answer never
        // loses the message to a crash of the node.
        node.store.flush().await.map_err(internal)?;
        // One event per group the publish touched (a subscriber's catch-up reads all that
        // follows its cursor): one per message made 63 empty reads of a 64-message publish.
        let mut announced: Vec<&[u8]> = Vec::new();
        for g in &groups {
            if !announced.contains(&g.as_slice()) {
                announced.push(g);
                let _ = node.events.send(Event::Group(g.clone()));
            }
        }
        let mut response = Response::new(());
        // Where the messages went, so the sender can move its cursor past them unasked (left
        // out when long: every client must be able to take the answer).
        let value = placed::encode(&placed);
        if value.len() <= placed::MAX_HEADER_LEN
            && let Ok(value) = value.parse()
        {
            response.metadata_mut().insert(placed::HEADER, value);
        }
        Ok(response)
    }

    async fn send_welcome_messages(
        &self,
        req: Request<mpb::SendWelcomeMessagesRequest>,
    ) -> Result<Response<()>, Status> {
        let node = &self.0;
        let mut keys = Vec::new();
        for (i, m) in req.into_inner().messages.into_iter().enumerate() {
            // The id is set when it is stored (`Store::append_welcome`).
            let id = 0;
            let (key, mut msg) = match m.version {
                Some(mpb::welcome_message_input::Version::V1(v)) => (
                    v.installation_key.clone(),
                    mpb::WelcomeMessage {
                        version: Some(mpb::welcome_message::Version::V1(
                            mpb::welcome_message::V1 {
                                id,
                                created_ns: now_ns(),
                                installation_key: v.installation_key,
                                data: v.data,
                                hpke_public_key: v.hpke_public_key,
                                wrapper_algorithm: v.wrapper_algorithm,
                                welcome_metadata: v.welcome_metadata,
                            },
                        )),
                    },
                ),
                Some(mpb::welcome_message_input::Version::WelcomePointer(v)) => (
                    v.installation_key.clone(),
                    mpb::WelcomeMessage {
                        version: Some(mpb::welcome_message::Version::WelcomePointer(
                            mpb::welcome_message::WelcomePointer {
                                id,
                                created_ns: now_ns(),
                                installation_key: v.installation_key,
                                welcome_pointer: v.welcome_pointer,
                                hpke_public_key: v.hpke_public_key,
                                wrapper_algorithm: v.wrapper_algorithm,
                            },
                        )),
                    },
                ),
                None => return Err(Status::invalid_argument(format!("welcome {i}: no payload"))),
            };
            if key.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "welcome {i}: no installation key"
                )));
            }
            // Welcomes may be addressed to keys that are not installations (welcome pointers
            // send the shared welcome to a fresh key), so the key is not checked against inboxes.
            node.store
                .append_welcome(&key, |id| {
                    match &mut msg.version {
                        Some(mpb::welcome_message::Version::V1(v)) => v.id = id,
                        Some(mpb::welcome_message::Version::WelcomePointer(v)) => v.id = id,
                        None => {}
                    }
                    msg.encode_to_vec()
                })
                .map_err(internal)?;
            keys.push(key);
        }
        node.store.flush().await.map_err(internal)?;
        for key in keys {
            let _ = node.events.send(Event::Welcome(key));
        }
        Ok(Response::new(()))
    }

    async fn register_installation(
        &self,
        _: Request<mpb::RegisterInstallationRequest>,
    ) -> Result<Response<mpb::RegisterInstallationResponse>, Status> {
        Err(Status::unimplemented(
            "RegisterInstallation is XMTP's pre-inbox API; use UploadKeyPackage",
        ))
    }

    async fn upload_key_package(
        &self,
        req: Request<mpb::UploadKeyPackageRequest>,
    ) -> Result<Response<()>, Status> {
        let node = &self.0;
        let tls = req
            .into_inner()
            .key_package
            .ok_or_else(|| Status::invalid_argument("no key package"))?
            .key_package_tls_serialized;
        let provider = group::Provider::default();
        let kp = group::validate_key_package(&provider, &tls)
            .map_err(|e| Status::invalid_argument(format!("key package: {e}")))?;
        // libxmtp uploads its first key package before it publishes the identity update that
        // registers the installation, so liveness is not required here (XMTP's node doesn't
        // either); clients check it against the identity log before adding a member.
        node.store
            .put_key_package(&kp.installation_key, &tls)
            .map_err(internal)?;
        node.store.flush().await.map_err(internal)?;
        Ok(Response::new(()))
    }

    async fn fetch_key_packages(
        &self,
        req: Request<mpb::FetchKeyPackagesRequest>,
    ) -> Result<Response<mpb::FetchKeyPackagesResponse>, Status> {
        let node = &self.0;
        let mut key_packages = Vec::new();
        // Exactly one entry per requested key, in order; empty when unknown.
        for key in req.into_inner().installation_keys {
            let tls = node
                .store
                .key_package(&key)
                .map_err(internal)?
                .unwrap_or_default();
            key_packages.push(mpb::fetch_key_packages_response::KeyPackage {
                key_package_tls_serialized: tls,
            });
        }
        Ok(Response::new(mpb::FetchKeyPackagesResponse {
            key_packages,
        }))
    }

    async fn revoke_installation(
        &self,
        _: Request<mpb::RevokeInstallationRequest>,
    ) -> Result<Response<()>, Status> {
        Err(Status::unimplemented(
            "RevokeInstallation is XMTP's pre-inbox API; publish a revoke identity update",
        ))
    }

    async fn get_identity_updates(
        &self,
        _: Request<mpb::GetIdentityUpdatesRequest>,
    ) -> Result<Response<mpb::GetIdentityUpdatesResponse>, Status> {
        Err(Status::unimplemented(
            "MlsApi.GetIdentityUpdates is XMTP's pre-inbox API; use IdentityApi.GetIdentityUpdates",
        ))
    }

    async fn query_group_messages(
        &self,
        req: Request<mpb::QueryGroupMessagesRequest>,
    ) -> Result<Response<mpb::QueryGroupMessagesResponse>, Status> {
        let req = req.into_inner();
        let (cursor, desc, limit) = paging(req.paging_info.as_ref());
        let page = self
            .0
            .store
            .group_messages(&req.group_id, cursor, desc, limit)
            .map_err(internal)?;
        let paging_info = paging_out(req.paging_info.as_ref(), &page, limit);
        let messages = page
            .iter()
            .map(|(_, b)| {
                mpb::GroupMessage::decode(b.as_slice())
                    .map_err(|_| Status::internal("corrupt message"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Response::new(mpb::QueryGroupMessagesResponse {
            messages,
            paging_info,
        }))
    }

    async fn query_welcome_messages(
        &self,
        req: Request<mpb::QueryWelcomeMessagesRequest>,
    ) -> Result<Response<mpb::QueryWelcomeMessagesResponse>, Status> {
        let req = req.into_inner();
        let (cursor, desc, limit) = paging(req.paging_info.as_ref());
        let page = self
            .0
            .store
            .welcomes(&req.installation_key, cursor, desc, limit)
            .map_err(internal)?;
        let paging_info = paging_out(req.paging_info.as_ref(), &page, limit);
        let messages = page
            .iter()
            .map(|(_, b)| {
                mpb::WelcomeMessage::decode(b.as_slice())
                    .map_err(|_| Status::internal("corrupt welcome"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Response::new(mpb::QueryWelcomeMessagesResponse {
            messages,
            paging_info,
        }))
    }

    type SubscribeGroupMessagesStream = BoxStream<mpb::GroupMessage>;

    async fn subscribe_group_messages(
        &self,
        req: Request<mpb::SubscribeGroupMessagesRequest>,
    ) -> Result<Response<Self::SubscribeGroupMessagesStream>, Status> {
        let cursors: HashMap<Vec<u8>, u64> = req
            .into_inner()
            .filters
            .into_iter()
            .map(|f| (f.group_id, f.id_cursor))
            .collect();
        let node = self.0.clone();
        let mut response = Response::new(subscribe(node, cursors, true, |b| {
            mpb::GroupMessage::decode(b).ok()
        }));
        // Replayed from each cursor, then read from the store after the last one sent, with ids
        // visible only in order (`Store::append_group_messages`): nothing is left out.
        response.metadata_mut().insert(
            placed::STREAM_HEADER,
            tonic::metadata::MetadataValue::from_static(placed::GAP_FREE),
        );
        Ok(response)
    }

    type SubscribeWelcomeMessagesStream = BoxStream<mpb::WelcomeMessage>;

    async fn subscribe_welcome_messages(
        &self,
        req: Request<mpb::SubscribeWelcomeMessagesRequest>,
    ) -> Result<Response<Self::SubscribeWelcomeMessagesStream>, Status> {
        let cursors: HashMap<Vec<u8>, u64> = req
            .into_inner()
            .filters
            .into_iter()
            .map(|f| (f.installation_key, f.id_cursor))
            .collect();
        let node = self.0.clone();
        Ok(Response::new(subscribe(node, cursors, false, |b| {
            mpb::WelcomeMessage::decode(b).ok()
        })))
    }

    async fn batch_publish_commit_log(
        &self,
        req: Request<mpb::BatchPublishCommitLogRequest>,
    ) -> Result<Response<()>, Status> {
        for r in req.into_inner().requests {
            self.0
                .store
                .append_commit_log(&r.group_id, |seq| {
                    gatehouse_wire::message_contents::CommitLogEntry {
                        sequence_id: seq,
                        serialized_commit_log_entry: r.serialized_commit_log_entry.clone(),
                        signature: r.signature.clone(),
                    }
                    .encode_to_vec()
                })
                .map_err(internal)?;
        }
        self.0.store.flush().await.map_err(internal)?;
        Ok(Response::new(()))
    }

    async fn batch_query_commit_log(
        &self,
        req: Request<mpb::BatchQueryCommitLogRequest>,
    ) -> Result<Response<mpb::BatchQueryCommitLogResponse>, Status> {
        let mut responses = Vec::new();
        for r in req.into_inner().requests {
            let (cursor, desc, limit) = paging(r.paging_info.as_ref());
            let page = self
                .0
                .store
                .commit_log(&r.group_id, cursor, desc, limit)
                .map_err(internal)?;
            let paging_info = paging_out(r.paging_info.as_ref(), &page, limit);
            let commit_log_entries = page
                .iter()
                .map(|(_, b)| {
                    gatehouse_wire::message_contents::CommitLogEntry::decode(b.as_slice())
                        .map_err(|_| Status::internal("corrupt commit log"))
                })
                .collect::<Result<_, _>>()?;
            responses.push(mpb::QueryCommitLogResponse {
                group_id: r.group_id,
                commit_log_entries,
                paging_info,
            });
        }
        Ok(Response::new(mpb::BatchQueryCommitLogResponse {
            responses,
        }))
    }

    async fn get_newest_group_message(
        &self,
        req: Request<mpb::GetNewestGroupMessageRequest>,
    ) -> Result<Response<mpb::GetNewestGroupMessageResponse>, Status> {
        let req = req.into_inner();
        let mut responses = Vec::new();
        for gid in req.group_ids {
            let page = self
                .0
                .store
                .group_messages(&gid, 0, true, 1)
                .map_err(internal)?;
            let group_message = match page.first() {
                Some((_, b)) => {
                    let mut m = mpb::GroupMessage::decode(b.as_slice())
                        .map_err(|_| Status::internal("corrupt message"))?;
                    if let (false, Some(mpb::group_message::Version::V1(v1))) =
                        (req.include_content, m.version.as_mut())
                    {
                        v1.data.clear();
                    }
                    Some(m)
                }
                None => None,
            };
            responses.push(mpb::get_newest_group_message_response::Response { group_message });
        }
        Ok(Response::new(mpb::GetNewestGroupMessageResponse {
            responses,
        }))
    }
}

/// A live subscription: replays stored items after each filter's cursor (when the cursor is
/// non-zero), then forwards new ones. A subscriber that falls behind the live buffer re-reads
/// the store from its last position, so nothing is skipped.
fn subscribe<T: Send + 'static>(
    node: Node,
    mut cursors: HashMap<Vec<u8>, u64>,
    groups: bool,
    decode: fn(&[u8]) -> Option<T>,
) -> BoxStream<T> {
    let (tx, rx) = mpsc::channel::<Result<T, Status>>(STREAM_BUFFER);
    let mut events = node.events.subscribe();
    let mut closing = node.closing.subscribe();
    tokio::spawn(async move {
        tokio::select! {
            _ = closing.wait_for(|&c| c) => {}
            _ = follow(node, &mut cursors, groups, decode, &tx, &mut events) => {}
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// A subscription's work: the replay, then live items, until the subscriber goes away.
async fn follow<T: Send + 'static>(
    node: Node,
    cursors: &mut HashMap<Vec<u8>, u64>,
    groups: bool,
    decode: fn(&[u8]) -> Option<T>,
    tx: &mpsc::Sender<Result<T, Status>>,
    events: &mut broadcast::Receiver<Event>,
) {
    let read = |key: &[u8], after: u64| -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        if groups {
            node.store.group_messages(key, after, false, MAX_PAGE)
        } else {
            node.store.welcomes(key, after, false, MAX_PAGE)
        }
    };
    // New subscriptions with a zero cursor start at the present.
    for (key, cursor) in cursors.iter_mut() {
        if *cursor == 0 {
            let newest = if groups {
                node.store.group_messages(key, 0, true, 1)
            } else {
                node.store.welcomes(key, 0, true, 1)
            };
            *cursor = newest
                .ok()
                .and_then(|p| p.first().map(|(id, _)| *id))
                .unwrap_or(0);
            continue;
        }
        loop {
            let Ok(page) = read(key, *cursor) else { return };
            if page.is_empty() {
                break;
            }
            for (id, b) in page {
                *cursor = id;
                if let Some(item) = decode(&b)
                    && tx.send(Ok(item)).await.is_err()
                {
                    return;
                }
            }
        }
    }
    loop {
        let key = match events.recv().await {
            Ok(Event::Group(g)) if groups => g,
            Ok(Event::Welcome(k)) if !groups => k,
            Ok(_) => continue,
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // Catch up every filter from the store.
                let keys: Vec<_> = cursors.keys().cloned().collect();
                for k in keys {
                    if catch_up(&read, tx, cursors, &k, decode).await.is_err() {
                        return;
                    }
                }
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if cursors.contains_key(&key) && catch_up(&read, tx, cursors, &key, decode).await.is_err() {
            return;
        }
    }
}

async fn catch_up<T>(
    read: &impl Fn(&[u8], u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError>,
    tx: &mpsc::Sender<Result<T, Status>>,
    cursors: &mut HashMap<Vec<u8>, u64>,
    key: &[u8],
    decode: fn(&[u8]) -> Option<T>,
) -> Result<(), ()> {
    let Some(cursor) = cursors.get_mut(key) else {
        return Ok(());
    };
    // Everything after the cursor, page by page: an event stands for all of a publish's
    // messages in its group, however many.
    loop {
        let page = read(key, *cursor).map_err(|_| ())?;
        let full = page.len() >= MAX_PAGE;
        for (id, b) in page {
            *cursor = id;
            if let Some(item) = decode(&b) {
                tx.send(Ok(item)).await.map_err(|_| ())?;
            }
        }
        if !full {
            return Ok(());
        }
    }
}

/// `xmtp.identity.api.v1.IdentityApi`.
#[derive(Clone)]
pub struct IdentityService(Node);

#[tonic::async_trait]
impl ipb::identity_api_server::IdentityApi for IdentityService {
    async fn publish_identity_update(
        &self,
        req: Request<ipb::PublishIdentityUpdateRequest>,
    ) -> Result<Response<ipb::PublishIdentityUpdateResponse>, Status> {
        let node = &self.0;
        let update = req
            .into_inner()
            .identity_update
            .ok_or_else(|| Status::invalid_argument("no identity update"))?;
        let _guard = node.identity_lock.lock().await;
        let (state, _) = node.inbox_state(&update.inbox_id)?;
        let new = identity::apply_update(state.as_ref(), &update).map_err(|e| {
            Status::invalid_argument(format!("identity update for {}: {e}", update.inbox_id))
        })?;
        // GetInboxIds resolves every public identifier (addresses, passkeys) of live members.
        let before: Vec<String> = state
            .as_ref()
            .map(|s| s.public_identifiers())
            .unwrap_or_default();
        let after: Vec<String> = new.public_identifiers();
        let added: Vec<String> = after
            .iter()
            .filter(|a| !before.contains(a))
            .cloned()
            .collect();
        let removed: Vec<String> = before
            .iter()
            .filter(|a| !after.contains(a))
            .cloned()
            .collect();
        let seq = node
            .store
            .append_update(&update, now_ns(), &added, &removed)
            .map_err(internal)?;
        node.store.flush().await.map_err(internal)?;
        tracing::debug!(inbox = %update.inbox_id, seq, "identity update stored");
        Ok(Response::new(ipb::PublishIdentityUpdateResponse {}))
    }

    async fn get_identity_updates(
        &self,
        req: Request<ipb::GetIdentityUpdatesRequest>,
    ) -> Result<Response<ipb::GetIdentityUpdatesResponse>, Status> {
        let mut responses = Vec::new();
        for r in req.into_inner().requests {
            let log = self
                .0
                .store
                .inbox_log(&r.inbox_id, r.sequence_id)
                .map_err(internal)?;
            responses.push(ipb::get_identity_updates_response::Response {
                inbox_id: r.inbox_id,
                updates: log
                    .into_iter()
                    .map(|l| ipb::get_identity_updates_response::IdentityUpdateLog {
                        sequence_id: l.sequence_id,
                        server_timestamp_ns: l.server_timestamp_ns,
                        update: Some(l.update),
                    })
                    .collect(),
            });
        }
        Ok(Response::new(ipb::GetIdentityUpdatesResponse { responses }))
    }

    async fn get_inbox_ids(
        &self,
        req: Request<ipb::GetInboxIdsRequest>,
    ) -> Result<Response<ipb::GetInboxIdsResponse>, Status> {
        let mut responses = Vec::new();
        for r in req.into_inner().requests {
            let inbox_id = self.0.store.inbox_of(&r.identifier).map_err(internal)?;
            responses.push(ipb::get_inbox_ids_response::Response {
                identifier: r.identifier,
                inbox_id,
                identifier_kind: r.identifier_kind,
            });
        }
        Ok(Response::new(ipb::GetInboxIdsResponse { responses }))
    }

    async fn verify_smart_contract_wallet_signatures(
        &self,
        req: Request<ipb::VerifySmartContractWalletSignaturesRequest>,
    ) -> Result<Response<ipb::VerifySmartContractWalletSignaturesResponse>, Status> {
        let responses = req
            .into_inner()
            .signatures
            .into_iter()
            .map(|_| ipb::verify_smart_contract_wallet_signatures_response::ValidationResponse {
                is_valid: false,
                block_number: None,
                error: Some("smart-contract wallet verification needs a chain RPC, and this node has none configured".into()),
            })
            .collect();
        Ok(Response::new(
            ipb::VerifySmartContractWalletSignaturesResponse { responses },
        ))
    }
}
