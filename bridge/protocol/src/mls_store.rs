//! openmls' key-value state, held in memory and saved by the caller entry by entry.
//!
//! openmls rewrites parts of a group's state on every message (the ratchets in the message
//! secrets after each encrypt and decrypt). The store remembers which entries changed since
//! the caller last took them, so the caller writes those few entries and not the whole store:
//! an installation in 1,000 conversations writes one conversation's entries after a read of
//! it, not all 1,000.
//!
//! Entries are keyed as openmls' own in-memory store keys them (a label, the JSON of the key,
//! the storage version). Values are written in a binary encoding (see [`BINARY`]) and read in
//! it or in the JSON that openmls' store, and so earlier versions of Gatehouse (which kept
//! that store as one blob), wrote: their state reads unchanged, and is rewritten binary entry
//! by entry as it changes.

use std::collections::{HashMap, HashSet};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use openmls_rust_crypto::RustCrypto;
use openmls_traits::OpenMlsProvider;
use openmls_traits::storage::{CURRENT_VERSION, StorageProvider, traits};
use serde::Serialize;
use serde::de::DeserializeOwned;

// The labels openmls' in-memory store uses: stored state depends on them.
const KEY_PACKAGE: &[u8] = b"KeyPackage";
const PSK: &[u8] = b"Psk";
const ENCRYPTION_KEY_PAIR: &[u8] = b"EncryptionKeyPair";
const SIGNATURE_KEY_PAIR: &[u8] = b"SignatureKeyPair";
const EPOCH_KEY_PAIRS: &[u8] = b"EpochKeyPairs";
const TREE: &[u8] = b"Tree";
const GROUP_CONTEXT: &[u8] = b"GroupContext";
const APPLICATION_EXPORT_TREE: &[u8] = b"ApplicationExportTree";
const INTERIM_TRANSCRIPT_HASH: &[u8] = b"InterimTranscriptHash";
const CONFIRMATION_TAG: &[u8] = b"ConfirmationTag";
const JOIN_CONFIG: &[u8] = b"MlsGroupJoinConfig";
const OWN_LEAF_NODES: &[u8] = b"OwnLeafNodes";
const GROUP_STATE: &[u8] = b"GroupState";
const QUEUED_PROPOSAL: &[u8] = b"QueuedProposal";
const PROPOSAL_QUEUE_REFS: &[u8] = b"ProposalQueueRefs";
const OWN_LEAF_NODE_INDEX: &[u8] = b"OwnLeafNodeIndex";
const EPOCH_SECRETS: &[u8] = b"EpochSecrets";
const RESUMPTION_PSK: &[u8] = b"ResumptionPsk";
const MESSAGE_SECRETS: &[u8] = b"MessageSecrets";

/// An entry of the MLS state could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[error("MLS state entry {label}: {reason}")]
pub struct StoreError {
    label: String,
    reason: String,
}

impl StoreError {
    fn new(label: &[u8], reason: impl std::fmt::Display) -> Self {
        Self {
            label: String::from_utf8_lossy(label).into_owned(),
            reason: reason.to_string(),
        }
    }
}

type Res<T> = Result<T, StoreError>;

#[derive(Debug, Default)]
struct Inner {
    values: HashMap<Vec<u8>, Vec<u8>>,
    /// Keys written or deleted since the caller last took the changes.
    changed: HashSet<Vec<u8>>,
}

/// A change to save: the entry's new value, or `None` when it was deleted.
pub type Change = (Vec<u8>, Option<Vec<u8>>);

/// openmls' state for one installation: every entry in memory, changes tracked for saving.
#[derive(Debug, Default)]
pub struct MlsStore {
    inner: RwLock<Inner>,
    /// Writes JSON, as earlier versions did (to test that their state still reads).
    json: bool,
}

impl MlsStore {
    /// A store holding `entries` (as saved), none of them counted as changed.
    pub fn from_entries(entries: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>) -> Self {
        Self {
            inner: RwLock::new(Inner {
                values: entries.into_iter().collect(),
                changed: HashSet::new(),
            }),
            json: false,
        }
    }

    /// A store that writes every value as JSON, as earlier versions of Gatehouse did: for
    /// tests that state from them still reads.
    #[doc(hidden)]
    pub fn writing_json_as_earlier_versions() -> Self {
        Self {
            json: true,
            ..Self::default()
        }
    }

    fn encode<T: DeserializeOwned>(
        &self,
        label: &[u8],
        value: &(impl Serialize + ?Sized),
    ) -> Res<Vec<u8>> {
        if self.json {
            encode_json(label, value)
        } else {
            encode::<T>(label, value)
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Every entry, sorted by key.
    pub fn entries(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out: Vec<_> = self
            .read()
            .values
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.sort();
        out
    }

    /// How many entries the store holds.
    pub fn len(&self) -> usize {
        self.read().values.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entries changed since the last call, sorted by key; they count as saved from now
    /// on. A caller whose write then fails hands the keys back with [`Self::mark_unsaved`].
    pub fn take_changes(&self) -> Vec<Change> {
        let mut inner = self.write();
        let changed = std::mem::take(&mut inner.changed);
        let mut out: Vec<Change> = changed
            .into_iter()
            .map(|k| {
                let v = inner.values.get(&k).cloned();
                (k, v)
            })
            .collect();
        out.sort();
        out
    }

    /// Counts entries as changed again (their write failed).
    pub fn mark_unsaved(&self, keys: impl IntoIterator<Item = Vec<u8>>) {
        self.write().changed.extend(keys);
    }

    /// Whether entries changed since the changes were last taken.
    pub fn has_changes(&self) -> bool {
        !self.read().changed.is_empty()
    }

    fn put(&self, key: Vec<u8>, value: Vec<u8>) {
        let mut inner = self.write();
        inner.changed.insert(key.clone());
        inner.values.insert(key, value);
    }

    fn remove(&self, key: Vec<u8>) {
        let mut inner = self.write();
        if inner.values.remove(&key).is_some() {
            inner.changed.insert(key);
        }
    }

    fn get<V: DeserializeOwned>(&self, label: &[u8], key: &[u8]) -> Res<Option<V>> {
        match self.read().values.get(key) {
            Some(bytes) => decode(label, bytes).map(Some),
            None => Ok(None),
        }
    }

    fn write_entity<T: Serialize + DeserializeOwned>(
        &self,
        label: &[u8],
        key: &impl Serialize,
        value: &T,
    ) -> Res<()> {
        self.put(storage_key(label, key)?, self.encode::<T>(label, value)?);
        Ok(())
    }

    fn read_entity<V: DeserializeOwned>(
        &self,
        label: &[u8],
        key: &impl Serialize,
    ) -> Res<Option<V>> {
        self.get(label, &storage_key(label, key)?)
    }

    fn delete_entity(&self, label: &[u8], key: &impl Serialize) -> Res<()> {
        self.remove(storage_key(label, key)?);
        Ok(())
    }

    /// A list entry: the encoded items, in a list that is itself encoded.
    fn list_bytes(&self, label: &[u8], key: &[u8]) -> Res<Vec<Vec<u8>>> {
        Ok(self.get(label, key)?.unwrap_or_default())
    }

    fn read_list<V: DeserializeOwned>(&self, label: &[u8], key: &impl Serialize) -> Res<Vec<V>> {
        self.list_bytes(label, &storage_key(label, key)?)?
            .iter()
            .map(|item| decode(label, item))
            .collect()
    }

    fn push_to_list<T: Serialize + DeserializeOwned>(
        &self,
        label: &[u8],
        key: &impl Serialize,
        item: &T,
    ) -> Res<()> {
        let key = storage_key(label, key)?;
        let mut list = self.list_bytes(label, &key)?;
        list.push(self.encode::<T>(label, item)?);
        self.put(key, self.encode::<Vec<Vec<u8>>>(label, &list)?);
        Ok(())
    }

    fn remove_from_list<T: Serialize + DeserializeOwned>(
        &self,
        label: &[u8],
        key: &impl Serialize,
        item: &T,
    ) -> Res<()> {
        let key = storage_key(label, key)?;
        let mut list = self.list_bytes(label, &key)?;
        // An item may have been listed in either encoding.
        let (binary, json) = (encode::<T>(label, item)?, encode_json(label, item)?);
        if let Some(at) = list.iter().position(|i| *i == binary || *i == json) {
            list.remove(at);
            self.put(key, self.encode::<Vec<Vec<u8>>>(label, &list)?);
        }
        Ok(())
    }
}

/// The first byte of a value in Gatehouse's binary encoding (postcard). A value in openmls'
/// own encoding (JSON: an object, array, number, string or literal) never begins with it.
pub const BINARY: u8 = 0;

/// A value in the binary encoding: a fraction of the JSON's size (byte strings are bytes,
/// not arrays of decimal numbers) and several times faster to write and read, which matters
/// for the message secrets openmls writes at every encrypt and decrypt.
///
/// The join configuration stays JSON: openmls reads one of its fields in a way only a
/// self-describing encoding supports. Debug builds check that every value they encode
/// decodes, so a type that needs the same treatment fails every test that stores it.
fn encode<T: DeserializeOwned>(label: &[u8], value: &(impl Serialize + ?Sized)) -> Res<Vec<u8>> {
    if label == JOIN_CONFIG {
        return encode_json(label, value);
    }
    let out = postcard::to_extend(value, vec![BINARY])
        .map_err(|e| StoreError::new(label, format!("encoding: {e}")))?;
    #[cfg(debug_assertions)]
    if let Err(e) = decode::<T>(label, &out) {
        panic!("an MLS state value does not survive the binary encoding: {e}");
    }
    Ok(out)
}

fn encode_json(label: &[u8], value: &(impl Serialize + ?Sized)) -> Res<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| StoreError::new(label, format!("encoding: {e}")))
}

/// A value in either encoding: binary, or JSON as openmls' own store and earlier versions of
/// Gatehouse wrote it.
fn decode<T: DeserializeOwned>(label: &[u8], bytes: &[u8]) -> Res<T> {
    match bytes.split_first() {
        Some((&BINARY, rest)) => {
            postcard::from_bytes(rest).map_err(|e| StoreError::new(label, format!("corrupt: {e}")))
        }
        _ => serde_json::from_slice(bytes)
            .map_err(|e| StoreError::new(label, format!("corrupt: {e}"))),
    }
}

/// `label ‖ JSON(key) ‖ version`.
fn storage_key(label: &[u8], key: &impl Serialize) -> Res<Vec<u8>> {
    let mut out = label.to_vec();
    serde_json::to_writer(&mut out, key)
        .map_err(|e| StoreError::new(label, format!("encoding the key: {e}")))?;
    out.extend_from_slice(&CURRENT_VERSION.to_be_bytes());
    Ok(out)
}

/// The key of a group's epoch encryption keys: the JSON of its three parts, one after the other.
fn epoch_key_pairs_key(
    group_id: &impl Serialize,
    epoch: &impl Serialize,
    leaf_index: u32,
) -> Res<Vec<u8>> {
    let bad = |e: serde_json::Error| StoreError::new(EPOCH_KEY_PAIRS, format!("encoding: {e}"));
    let mut out = EPOCH_KEY_PAIRS.to_vec();
    serde_json::to_writer(&mut out, group_id).map_err(bad)?;
    serde_json::to_writer(&mut out, epoch).map_err(bad)?;
    serde_json::to_writer(&mut out, &leaf_index).map_err(bad)?;
    out.extend_from_slice(&CURRENT_VERSION.to_be_bytes());
    Ok(out)
}

const V: u16 = CURRENT_VERSION;

impl StorageProvider<V> for MlsStore {
    type Error = StoreError;

    fn write_mls_join_config<
        GroupId: traits::GroupId<V>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<V>,
    >(
        &self,
        group_id: &GroupId,
        config: &MlsGroupJoinConfig,
    ) -> Res<()> {
        self.write_entity(JOIN_CONFIG, group_id, config)
    }

    fn append_own_leaf_node<GroupId: traits::GroupId<V>, LeafNode: traits::LeafNode<V>>(
        &self,
        group_id: &GroupId,
        leaf_node: &LeafNode,
    ) -> Res<()> {
        self.push_to_list(OWN_LEAF_NODES, group_id, leaf_node)
    }

    fn queue_proposal<
        GroupId: traits::GroupId<V>,
        ProposalRef: traits::ProposalRef<V>,
        QueuedProposal: traits::QueuedProposal<V>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
        proposal: &QueuedProposal,
    ) -> Res<()> {
        self.write_entity(QUEUED_PROPOSAL, &(group_id, proposal_ref), proposal)?;
        self.push_to_list(PROPOSAL_QUEUE_REFS, group_id, proposal_ref)
    }

    fn write_tree<GroupId: traits::GroupId<V>, TreeSync: traits::TreeSync<V>>(
        &self,
        group_id: &GroupId,
        tree: &TreeSync,
    ) -> Res<()> {
        self.write_entity(TREE, group_id, tree)
    }

    fn write_interim_transcript_hash<
        GroupId: traits::GroupId<V>,
        InterimTranscriptHash: traits::InterimTranscriptHash<V>,
    >(
        &self,
        group_id: &GroupId,
        interim_transcript_hash: &InterimTranscriptHash,
    ) -> Res<()> {
        self.write_entity(INTERIM_TRANSCRIPT_HASH, group_id, interim_transcript_hash)
    }

    fn write_context<GroupId: traits::GroupId<V>, GroupContext: traits::GroupContext<V>>(
        &self,
        group_id: &GroupId,
        group_context: &GroupContext,
    ) -> Res<()> {
        self.write_entity(GROUP_CONTEXT, group_id, group_context)
    }

    fn write_confirmation_tag<
        GroupId: traits::GroupId<V>,
        ConfirmationTag: traits::ConfirmationTag<V>,
    >(
        &self,
        group_id: &GroupId,
        confirmation_tag: &ConfirmationTag,
    ) -> Res<()> {
        self.write_entity(CONFIRMATION_TAG, group_id, confirmation_tag)
    }

    fn write_group_state<GroupState: traits::GroupState<V>, GroupId: traits::GroupId<V>>(
        &self,
        group_id: &GroupId,
        group_state: &GroupState,
    ) -> Res<()> {
        self.write_entity(GROUP_STATE, group_id, group_state)
    }

    fn write_message_secrets<
        GroupId: traits::GroupId<V>,
        MessageSecrets: traits::MessageSecrets<V>,
    >(
        &self,
        group_id: &GroupId,
        message_secrets: &MessageSecrets,
    ) -> Res<()> {
        self.write_entity(MESSAGE_SECRETS, group_id, message_secrets)
    }

    fn write_resumption_psk_store<
        GroupId: traits::GroupId<V>,
        ResumptionPskStore: traits::ResumptionPskStore<V>,
    >(
        &self,
        group_id: &GroupId,
        resumption_psk_store: &ResumptionPskStore,
    ) -> Res<()> {
        self.write_entity(RESUMPTION_PSK, group_id, resumption_psk_store)
    }

    fn write_own_leaf_index<
        GroupId: traits::GroupId<V>,
        LeafNodeIndex: traits::LeafNodeIndex<V>,
    >(
        &self,
        group_id: &GroupId,
        own_leaf_index: &LeafNodeIndex,
    ) -> Res<()> {
        self.write_entity(OWN_LEAF_NODE_INDEX, group_id, own_leaf_index)
    }

    fn write_group_epoch_secrets<
        GroupId: traits::GroupId<V>,
        GroupEpochSecrets: traits::GroupEpochSecrets<V>,
    >(
        &self,
        group_id: &GroupId,
        group_epoch_secrets: &GroupEpochSecrets,
    ) -> Res<()> {
        self.write_entity(EPOCH_SECRETS, group_id, group_epoch_secrets)
    }

    fn write_application_export_tree<
        GroupId: traits::GroupId<V>,
        ApplicationExportTree: traits::ApplicationExportTree<V>,
    >(
        &self,
        group_id: &GroupId,
        application_export_tree: &ApplicationExportTree,
    ) -> Res<()> {
        self.write_entity(APPLICATION_EXPORT_TREE, group_id, application_export_tree)
    }

    fn write_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<V>,
        SignatureKeyPair: traits::SignatureKeyPair<V>,
    >(
        &self,
        public_key: &SignaturePublicKey,
        signature_key_pair: &SignatureKeyPair,
    ) -> Res<()> {
        self.write_entity(SIGNATURE_KEY_PAIR, public_key, signature_key_pair)
    }

    fn write_encryption_key_pair<
        EncryptionKey: traits::EncryptionKey<V>,
        HpkeKeyPair: traits::HpkeKeyPair<V>,
    >(
        &self,
        public_key: &EncryptionKey,
        key_pair: &HpkeKeyPair,
    ) -> Res<()> {
        self.write_entity(ENCRYPTION_KEY_PAIR, public_key, key_pair)
    }

    fn write_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<V>,
        EpochKey: traits::EpochKey<V>,
        HpkeKeyPair: traits::HpkeKeyPair<V>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
        key_pairs: &[HpkeKeyPair],
    ) -> Res<()> {
        self.put(
            epoch_key_pairs_key(group_id, epoch, leaf_index)?,
            self.encode::<Vec<HpkeKeyPair>>(EPOCH_KEY_PAIRS, key_pairs)?,
        );
        Ok(())
    }

    fn write_key_package<
        HashReference: traits::HashReference<V>,
        KeyPackage: traits::KeyPackage<V>,
    >(
        &self,
        hash_ref: &HashReference,
        key_package: &KeyPackage,
    ) -> Res<()> {
        self.write_entity(KEY_PACKAGE, hash_ref, key_package)
    }

    fn write_psk<PskId: traits::PskId<V>, PskBundle: traits::PskBundle<V>>(
        &self,
        psk_id: &PskId,
        psk: &PskBundle,
    ) -> Res<()> {
        self.write_entity(PSK, psk_id, psk)
    }

    fn mls_group_join_config<
        GroupId: traits::GroupId<V>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<V>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Res<Option<MlsGroupJoinConfig>> {
        self.read_entity(JOIN_CONFIG, group_id)
    }

    fn own_leaf_nodes<GroupId: traits::GroupId<V>, LeafNode: traits::LeafNode<V>>(
        &self,
        group_id: &GroupId,
    ) -> Res<Vec<LeafNode>> {
        self.read_list(OWN_LEAF_NODES, group_id)
    }

    fn queued_proposal_refs<GroupId: traits::GroupId<V>, ProposalRef: traits::ProposalRef<V>>(
        &self,
        group_id: &GroupId,
    ) -> Res<Vec<ProposalRef>> {
        self.read_list(PROPOSAL_QUEUE_REFS, group_id)
    }

    fn queued_proposals<
        GroupId: traits::GroupId<V>,
        ProposalRef: traits::ProposalRef<V>,
        QueuedProposal: traits::QueuedProposal<V>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Res<Vec<(ProposalRef, QueuedProposal)>> {
        let refs: Vec<ProposalRef> = self.read_list(PROPOSAL_QUEUE_REFS, group_id)?;
        refs.into_iter()
            .map(|r| {
                let proposal = self
                    .read_entity(QUEUED_PROPOSAL, &(group_id, &r))?
                    .ok_or_else(|| {
                        StoreError::new(QUEUED_PROPOSAL, "listed in the queue but not stored")
                    })?;
                Ok((r, proposal))
            })
            .collect()
    }

    fn tree<GroupId: traits::GroupId<V>, TreeSync: traits::TreeSync<V>>(
        &self,
        group_id: &GroupId,
    ) -> Res<Option<TreeSync>> {
        self.read_entity(TREE, group_id)
    }

    fn group_context<GroupId: traits::GroupId<V>, GroupContext: traits::GroupContext<V>>(
        &self,
        group_id: &GroupId,
    ) -> Res<Option<GroupContext>> {
        self.read_entity(GROUP_CONTEXT, group_id)
    }

    fn interim_transcript_hash<
        GroupId: traits::GroupId<V>,
        InterimTranscriptHash: traits::InterimTranscriptHash<V>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Res<Option<InterimTranscriptHash>> {
        self.read_entity(INTERIM_TRANSCRIPT_HASH, group_id)
    }

    fn confirmation_tag<
        GroupId: traits::GroupId<V>,
        ConfirmationTag: traits::ConfirmationTag<V>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Res<Option<ConfirmationTag>> {
        self.read_entity(CONFIRMATION_TAG, group_id)
    }

    fn group_state<GroupState: traits::GroupState<V>, GroupId: traits::GroupId<V>>(
        &self,
        group_id: &GroupId,
    ) -> Res<Option<GroupState>> {
        self.read_entity(GROUP_STATE, group_id)
    }

    fn message_secrets<GroupId: traits::GroupId<V>, MessageSecrets: traits::MessageSecrets<V>>(
        &self,
        group_id: &GroupId,
    ) -> Res<Option<MessageSecrets>> {
        self.read_entity(MESSAGE_SECRETS, group_id)
    }

    fn resumption_psk_store<
        GroupId: traits::GroupId<V>,
        ResumptionPskStore: traits::ResumptionPskStore<V>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Res<Option<ResumptionPskStore>> {
        self.read_entity(RESUMPTION_PSK, group_id)
    }

    fn own_leaf_index<GroupId: traits::GroupId<V>, LeafNodeIndex: traits::LeafNodeIndex<V>>(
        &self,
        group_id: &GroupId,
    ) -> Res<Option<LeafNodeIndex>> {
        self.read_entity(OWN_LEAF_NODE_INDEX, group_id)
    }

    fn group_epoch_secrets<
        GroupId: traits::GroupId<V>,
        GroupEpochSecrets: traits::GroupEpochSecrets<V>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Res<Option<GroupEpochSecrets>> {
        self.read_entity(EPOCH_SECRETS, group_id)
    }

    fn signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<V>,
        SignatureKeyPair: traits::SignatureKeyPair<V>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Res<Option<SignatureKeyPair>> {
        self.read_entity(SIGNATURE_KEY_PAIR, public_key)
    }

    fn encryption_key_pair<
        HpkeKeyPair: traits::HpkeKeyPair<V>,
        EncryptionKey: traits::EncryptionKey<V>,
    >(
        &self,
        public_key: &EncryptionKey,
    ) -> Res<Option<HpkeKeyPair>> {
        self.read_entity(ENCRYPTION_KEY_PAIR, public_key)
    }

    fn encryption_epoch_key_pairs<
        GroupId: traits::GroupId<V>,
        EpochKey: traits::EpochKey<V>,
        HpkeKeyPair: traits::HpkeKeyPair<V>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Res<Vec<HpkeKeyPair>> {
        let key = epoch_key_pairs_key(group_id, epoch, leaf_index)?;
        Ok(self.get(EPOCH_KEY_PAIRS, &key)?.unwrap_or_default())
    }

    fn key_package<KeyPackageRef: traits::HashReference<V>, KeyPackage: traits::KeyPackage<V>>(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Res<Option<KeyPackage>> {
        self.read_entity(KEY_PACKAGE, hash_ref)
    }

    fn psk<PskBundle: traits::PskBundle<V>, PskId: traits::PskId<V>>(
        &self,
        psk_id: &PskId,
    ) -> Res<Option<PskBundle>> {
        self.read_entity(PSK, psk_id)
    }

    fn application_export_tree<
        GroupId: traits::GroupId<V>,
        ApplicationExportTree: traits::ApplicationExportTree<V>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Res<Option<ApplicationExportTree>> {
        self.read_entity(APPLICATION_EXPORT_TREE, group_id)
    }

    fn remove_proposal<GroupId: traits::GroupId<V>, ProposalRef: traits::ProposalRef<V>>(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
    ) -> Res<()> {
        self.remove_from_list(PROPOSAL_QUEUE_REFS, group_id, proposal_ref)?;
        self.delete_entity(QUEUED_PROPOSAL, &(group_id, proposal_ref))
    }

    fn delete_own_leaf_nodes<GroupId: traits::GroupId<V>>(&self, group_id: &GroupId) -> Res<()> {
        self.delete_entity(OWN_LEAF_NODES, group_id)
    }

    fn delete_group_config<GroupId: traits::GroupId<V>>(&self, group_id: &GroupId) -> Res<()> {
        self.delete_entity(JOIN_CONFIG, group_id)
    }

    fn delete_tree<GroupId: traits::GroupId<V>>(&self, group_id: &GroupId) -> Res<()> {
        self.delete_entity(TREE, group_id)
    }

    fn delete_confirmation_tag<GroupId: traits::GroupId<V>>(&self, group_id: &GroupId) -> Res<()> {
        self.delete_entity(CONFIRMATION_TAG, group_id)
    }

    fn delete_group_state<GroupId: traits::GroupId<V>>(&self, group_id: &GroupId) -> Res<()> {
        self.delete_entity(GROUP_STATE, group_id)
    }

    fn delete_context<GroupId: traits::GroupId<V>>(&self, group_id: &GroupId) -> Res<()> {
        self.delete_entity(GROUP_CONTEXT, group_id)
    }

    fn delete_interim_transcript_hash<GroupId: traits::GroupId<V>>(
        &self,
        group_id: &GroupId,
    ) -> Res<()> {
        self.delete_entity(INTERIM_TRANSCRIPT_HASH, group_id)
    }

    fn delete_message_secrets<GroupId: traits::GroupId<V>>(&self, group_id: &GroupId) -> Res<()> {
        self.delete_entity(MESSAGE_SECRETS, group_id)
    }

    fn delete_all_resumption_psk_secrets<GroupId: traits::GroupId<V>>(
        &self,
        group_id: &GroupId,
    ) -> Res<()> {
        self.delete_entity(RESUMPTION_PSK, group_id)
    }

    fn delete_own_leaf_index<GroupId: traits::GroupId<V>>(&self, group_id: &GroupId) -> Res<()> {
        self.delete_entity(OWN_LEAF_NODE_INDEX, group_id)
    }

    fn delete_group_epoch_secrets<GroupId: traits::GroupId<V>>(
        &self,
        group_id: &GroupId,
    ) -> Res<()> {
        self.delete_entity(EPOCH_SECRETS, group_id)
    }

    fn clear_proposal_queue<GroupId: traits::GroupId<V>, ProposalRef: traits::ProposalRef<V>>(
        &self,
        group_id: &GroupId,
    ) -> Res<()> {
        let refs: Vec<ProposalRef> = self.read_list(PROPOSAL_QUEUE_REFS, group_id)?;
        for r in &refs {
            self.delete_entity(QUEUED_PROPOSAL, &(group_id, r))?;
        }
        self.delete_entity(PROPOSAL_QUEUE_REFS, group_id)
    }

    fn delete_signature_key_pair<SignaturePublicKey: traits::SignaturePublicKey<V>>(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Res<()> {
        self.delete_entity(SIGNATURE_KEY_PAIR, public_key)
    }

    fn delete_encryption_key_pair<EncryptionKey: traits::EncryptionKey<V>>(
        &self,
        public_key: &EncryptionKey,
    ) -> Res<()> {
        self.delete_entity(ENCRYPTION_KEY_PAIR, public_key)
    }

    fn delete_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<V>,
        EpochKey: traits::EpochKey<V>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Res<()> {
        self.remove(epoch_key_pairs_key(group_id, epoch, leaf_index)?);
        Ok(())
    }

    fn delete_key_package<KeyPackageRef: traits::HashReference<V>>(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Res<()> {
        self.delete_entity(KEY_PACKAGE, hash_ref)
    }

    fn delete_psk<PskKey: traits::PskId<V>>(&self, psk_id: &PskKey) -> Res<()> {
        self.delete_entity(PSK, psk_id)
    }

    fn delete_application_export_tree<
        GroupId: traits::GroupId<V>,
        ApplicationExportTree: traits::ApplicationExportTree<V>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Res<()> {
        self.delete_entity(APPLICATION_EXPORT_TREE, group_id)
    }
}

/// The openmls provider: RustCrypto for crypto and randomness (with decoded signer keys kept,
/// [`crate::mls_crypto::Crypto`]), [`MlsStore`] for state.
#[derive(Debug, Default)]
pub struct Provider {
    crypto: crate::mls_crypto::Crypto,
    storage: MlsStore,
}

impl Provider {
    /// A provider over `storage`.
    pub fn with_storage(storage: MlsStore) -> Self {
        Self {
            crypto: Default::default(),
            storage,
        }
    }

    /// The state store (as `storage()`, without the openmls trait in scope).
    pub fn store(&self) -> &MlsStore {
        &self.storage
    }
}

impl OpenMlsProvider for Provider {
    type CryptoProvider = crate::mls_crypto::Crypto;
    type RandProvider = RustCrypto;
    type StorageProvider = MlsStore;

    fn storage(&self) -> &MlsStore {
        &self.storage
    }

    fn crypto(&self) -> &crate::mls_crypto::Crypto {
        &self.crypto
    }

    fn rand(&self) -> &RustCrypto {
        self.crypto.rust_crypto()
    }
}
