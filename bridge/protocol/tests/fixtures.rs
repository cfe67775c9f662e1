//! Conformance against real libxmtp traffic (`../shared/testdata/xmtp-v3`, read in place).
//!
//! Runs with `--features fixtures` (as `.ci/run` does). The folder is found through
//! `GATEHOUSE_FIXTURES` or beside the checkout; when the feature is on and the folder is
//! missing, the suite fails and says where it looked.
#![cfg(feature = "fixtures")]

mod common;
use common::*;

use std::collections::BTreeMap;

use gatehouse_protocol::identity;
use gatehouse_protocol::mls;
use gatehouse_protocol::welcome;
use gatehouse_wire::Message;
use gatehouse_wire::{identity_api, mls_api};

/// Every recorded identity update verifies and folds; A–D fold to the README's inbox ids,
/// wallets and installation keys.
#[test]
fn identity_updates_verify_and_fold() {
    let mut logs: BTreeMap<String, Vec<_>> = BTreeMap::new();
    let mut count = 0;
    for c in calls() {
        if c["method"]
            .as_str()
            .unwrap()
            .ends_with("/PublishIdentityUpdate")
        {
            let req = identity_api::PublishIdentityUpdateRequest::decode(
                read(c["request"].as_str().unwrap()).as_slice(),
            )
            .unwrap();
            let u = req.identity_update.unwrap();
            logs.entry(u.inbox_id.clone()).or_default().push(u);
            count += 1;
        }
    }
    assert!(
        count >= 8,
        "expected the recorded registrations, found {count}"
    );
    let mut states = BTreeMap::new();
    for (inbox, updates) in &logs {
        let st = identity::fold(updates.iter())
            .unwrap_or_else(|e| panic!("inbox {inbox}: {e}"))
            .unwrap();
        assert_eq!(&st.inbox_id, inbox);
        states.insert(inbox.clone(), st);
    }
    let k = keys();
    for name in ["A", "B", "C", "D"] {
        let inbox = k[name]["inbox_id"].as_str().unwrap();
        let st = states
            .get(inbox)
            .unwrap_or_else(|| panic!("{name}'s inbox was not registered"));
        assert!(
            st.has_installation(&hexval(&k[name]["installation_public_key"])),
            "{name}'s installation"
        );
        assert_eq!(st.recovery, k[name]["wallet_address"].as_str().unwrap());
        assert_eq!(identity::inbox_id(&st.recovery, 1), inbox);
    }
    // A's and B's wallet keys derive their addresses.
    for name in ["A", "B", "C"] {
        let w = identity::Wallet::from_bytes(&hexval(&k[name]["wallet_private_key"])).unwrap();
        assert_eq!(w.address(), k[name]["wallet_address"].as_str().unwrap());
    }
    // Our signatures over A's registration text are accepted by the same fold.
    let a = identity::Wallet::from_bytes(&hexval(&k["A"]["wallet_private_key"])).unwrap();
    let inst = identity::InstallationKey::from_seed(
        &hexval(&k["A"]["installation_private_key"])
            .try_into()
            .unwrap(),
    );
    assert_eq!(
        hex::encode(inst.public()),
        k["A"]["installation_public_key"].as_str().unwrap()
    );
    let ours = identity::register_inbox(
        &a,
        1,
        &inst,
        logs[k["A"]["inbox_id"].as_str().unwrap()][0].client_timestamp_ns,
    );
    identity::apply_update(None, &ours).unwrap();
}

/// Every recorded welcome addressed to A–D opens with their keys and names the group and epoch
/// the README states, including the welcome-pointer route of group G2.
#[test]
fn welcomes_unwrap() {
    let k = keys();
    let expected: &[(&str, &str, &str, u64)] = &[
        (
            "A",
            "034-MlsApi-SubscribeWelcomeMessages.resp.bin",
            "cfd2102a02c9073d0dd061e1e274baf7",
            1,
        ),
        (
            "A",
            "036-MlsApi-QueryWelcomeMessages.resp.bin",
            "cfd2102a02c9073d0dd061e1e274baf7",
            1,
        ),
        (
            "A",
            "118-MlsApi-QueryWelcomeMessages.resp.bin",
            "9eb9847950415819ab3aab95e4d911b2",
            1,
        ),
        (
            "B",
            "137-MlsApi-QueryWelcomeMessages.resp.bin",
            "0509079f9a38b522b209d7987fd3f5e6",
            1,
        ),
        (
            "C",
            "105-MlsApi-QueryWelcomeMessages.resp.bin",
            "cfd2102a02c9073d0dd061e1e274baf7",
            3,
        ),
    ];
    let mut opened = 0;
    for (who, file, group, epoch) in expected {
        let bytes = read(file);
        let welcomes: Vec<mls_api::WelcomeMessage> = if file.contains("Subscribe") {
            vec![mls_api::WelcomeMessage::decode(bytes.as_slice()).unwrap()]
        } else {
            mls_api::QueryWelcomeMessagesResponse::decode(bytes.as_slice())
                .unwrap()
                .messages
        };
        let mut found = false;
        for w in welcomes {
            let Some(mls_api::welcome_message::Version::V1(v1)) = w.version else {
                continue;
            };
            for (i, wk) in k[who]["welcome_wrapper_keys"]
                .as_array()
                .unwrap()
                .iter()
                .enumerate()
            {
                if hexval(&wk["public"]) != v1.hpke_public_key {
                    continue;
                }
                let seed: [u8; 32] = hexval(&wk["private"]).try_into().unwrap();
                let u = welcome::unwrap(&v1.data, &v1.welcome_metadata, &seed).unwrap();
                assert!(u.metadata.is_some(), "{file}: metadata");
                let kp = &k[who]["key_packages"][i];
                let init: [u8; 32] = hexval(&kp["init_private"]).try_into().unwrap();
                let info =
                    mls::read_welcome(&u.mls_message, &hexval(&kp["key_package_ref"]), &init)
                        .unwrap();
                assert_eq!(hex::encode(&info.group_id), *group, "{file}");
                assert_eq!(info.epoch, *epoch, "{file}");
                found = true;
                opened += 1;
            }
        }
        assert!(found, "{file}: no welcome for {who}'s keys");
    }
    assert_eq!(opened, expected.len());

    // G2: pointers for A (151), B (153), D (152) all lead to the symmetric welcome in 155.
    let pointee = mls_api::QueryWelcomeMessagesResponse::decode(
        read("155-MlsApi-QueryWelcomeMessages.resp.bin").as_slice(),
    )
    .unwrap();
    let Some(mls_api::welcome_message::Version::V1(sym)) = pointee.messages[0].version.clone()
    else {
        panic!("155 is not v1")
    };
    for (who, file) in [("A", "151"), ("B", "153"), ("D", "152")] {
        let name = response_of(file);
        let resp = mls_api::QueryWelcomeMessagesResponse::decode(read(&name).as_slice()).unwrap();
        let mut done = false;
        for w in resp.messages {
            let Some(mls_api::welcome_message::Version::WelcomePointer(p)) = w.version else {
                continue;
            };
            for (i, wk) in k[who]["welcome_wrapper_keys"]
                .as_array()
                .unwrap()
                .iter()
                .enumerate()
            {
                if hexval(&wk["public"]) != p.hpke_public_key {
                    continue;
                }
                let seed: [u8; 32] = hexval(&wk["private"]).try_into().unwrap();
                let ptr = welcome::unwrap_pointer(&p.welcome_pointer, &seed).unwrap();
                assert_eq!(
                    ptr.destination, sym.installation_key,
                    "{who}: pointer destination"
                );
                let u = welcome::unwrap_symmetric(&sym.data, &sym.welcome_metadata, &ptr).unwrap();
                let kp = &k[who]["key_packages"][i];
                let init: [u8; 32] = hexval(&kp["init_private"]).try_into().unwrap();
                let info =
                    mls::read_welcome(&u.mls_message, &hexval(&kp["key_package_ref"]), &init)
                        .unwrap();
                assert_eq!(
                    hex::encode(&info.group_id),
                    "975780de6b83ed70278e42f86cf4e75a"
                );
                assert_eq!(info.epoch, 1);
                done = true;
            }
        }
        assert!(done, "{who}: pointer {file} did not open");
    }
}

/// Every group message's clear header names its group, and commits are marked as commits.
#[test]
fn group_message_headers() {
    let mut n = 0;
    for c in calls() {
        if c["method"]
            .as_str()
            .unwrap()
            .ends_with("/SendGroupMessages")
        {
            let req = mls_api::SendGroupMessagesRequest::decode(
                read(c["request"].as_str().unwrap()).as_slice(),
            )
            .unwrap();
            for m in req.messages {
                let Some(mls_api::group_message_input::Version::V1(v1)) = m.version else {
                    panic!()
                };
                let h = mls::read_header(&v1.data).unwrap();
                assert_eq!(h.wire_format, mls::wire_format::PRIVATE);
                assert!(h.content_type == 1 || h.content_type == 3);
                n += 1;
            }
        }
    }
    assert!(n > 10);
}

/// Every recorded key-package upload validates and names a registered inbox and installation;
/// ours advertise the same extensions and capabilities as libxmtp's.
#[test]
fn key_packages_validate() {
    use gatehouse_protocol::group;
    use openmls::prelude::ExtensionType;
    let provider = group::Provider::default();
    let k = keys();
    let mut n = 0;
    let mut theirs = None;
    for c in calls() {
        if c["method"].as_str().unwrap().ends_with("/UploadKeyPackage") {
            let req = mls_api::UploadKeyPackageRequest::decode(
                read(c["request"].as_str().unwrap()).as_slice(),
            )
            .unwrap();
            assert!(req.is_inbox_id_credential);
            let tls = req.key_package.unwrap().key_package_tls_serialized;
            let v = group::validate_key_package(&provider, &tls)
                .unwrap_or_else(|e| panic!("{}: {e}", c["request"]));
            assert_eq!(v.wrapper_public_key.as_ref().map(Vec::len), Some(1216));
            if v.inbox_id == k["A"]["inbox_id"].as_str().unwrap() {
                assert_eq!(
                    hex::encode(&v.installation_key),
                    k["A"]["installation_public_key"].as_str().unwrap()
                );
                theirs = Some(v);
            }
            n += 1;
        }
    }
    assert!(n >= 4);
    let theirs = theirs.unwrap();
    let mut rng = rand::rngs::OsRng;
    let inst = identity::InstallationKey::from_seed(&[5; 32]);
    let ours = group::validate_key_package(
        &provider,
        &group::build_key_package(&provider, "x", &inst, &mut rng)
            .unwrap()
            .tls,
    )
    .unwrap();
    // Ours add exactly one thing libxmtp's lack: the post-quantum twin (ignored by XMTP).
    let pq = ExtensionType::Unknown(group::EXT_PQ_KEY_PACKAGE);
    let types = |v: &group::VerifiedKeyPackage| {
        let mut t: Vec<_> = v
            .key_package
            .extensions()
            .iter()
            .map(|e| e.extension_type())
            .filter(|t| *t != pq)
            .collect();
        t.sort();
        t
    };
    assert!(ours.pq_key_package.is_some() && theirs.pq_key_package.is_none());
    assert_eq!(types(&ours), types(&theirs), "key-package extensions");
    let caps = |v: &group::VerifiedKeyPackage| {
        let c = v.key_package.leaf_node().capabilities();
        let mut e: Vec<_> = c
            .extensions()
            .iter()
            .copied()
            .filter(|t| *t != pq)
            .collect();
        e.sort();
        (e, c.proposals().to_vec(), c.ciphersuites().to_vec())
    };
    assert_eq!(caps(&ours), caps(&theirs), "leaf capabilities");
}

/// A DM we create carries the group-context extensions libxmtp's recorded DM (A–C, welcome
/// 118) carries: the same types, a byte-identical required-capabilities extension, and
/// metadata that decodes the same way.
#[test]
fn our_dm_context_matches_libxmtp() {
    use gatehouse_protocol::group;
    use gatehouse_wire::message_contents as mc;
    let k = keys();
    // Recorded: A's welcome to the DM with C.
    let resp = mls_api::QueryWelcomeMessagesResponse::decode(
        read("118-MlsApi-QueryWelcomeMessages.resp.bin").as_slice(),
    )
    .unwrap();
    let mut recorded = None;
    for w in resp.messages {
        let Some(mls_api::welcome_message::Version::V1(v1)) = w.version else {
            continue;
        };
        for (i, wk) in k["A"]["welcome_wrapper_keys"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            if hexval(&wk["public"]) == v1.hpke_public_key {
                let seed: [u8; 32] = hexval(&wk["private"]).try_into().unwrap();
                let u = welcome::unwrap(&v1.data, &v1.welcome_metadata, &seed).unwrap();
                let kp = &k["A"]["key_packages"][i];
                let init: [u8; 32] = hexval(&kp["init_private"]).try_into().unwrap();
                recorded = Some(
                    mls::read_welcome(&u.mls_message, &hexval(&kp["key_package_ref"]), &init)
                        .unwrap(),
                );
            }
        }
    }
    let recorded = recorded.expect("welcome 118 opens as A");

    // Ours: a DM between two fresh inboxes.
    let mut rng = rand::rngs::OsRng;
    let (pa, pb) = (group::Provider::default(), group::Provider::default());
    let (ka, kb) = (
        identity::InstallationKey::from_seed(&[1; 32]),
        identity::InstallationKey::from_seed(&[2; 32]),
    );
    let (ia, ib) = ("a".repeat(64), "b".repeat(64));
    let kp = group::validate_key_package(
        &pa,
        &group::build_key_package(&pb, &ib, &kb, &mut rng)
            .unwrap()
            .tls,
    )
    .unwrap();
    let membership = [(ia.clone(), 1u64), (ib.clone(), 2u64)].into();
    let created = group::create_dm(
        &pa,
        &ka,
        &ia,
        &ib,
        vec![kp.key_package],
        &membership,
        &mut rng,
    )
    .unwrap();
    let ours: Vec<(u16, Vec<u8>)> = created
        .group
        .extensions()
        .iter()
        .map(|e| {
            use tls_codec::Serialize;
            let bytes = e.tls_serialize_detached().unwrap();
            // Extension = u16 type ‖ opaque data<V>; strip the type and the length prefix.
            let mut r = gatehouse_protocol::tlsread::Reader::new(&bytes, "extension");
            let t = r.u16().unwrap();
            (t, r.vec().unwrap().to_vec())
        })
        .collect();
    let mut their_types: Vec<u16> = recorded
        .context_extensions
        .iter()
        .map(|e| e.ext_type)
        .collect();
    let mut our_types: Vec<u16> = ours.iter().map(|(t, _)| *t).collect();
    their_types.sort();
    our_types.sort();
    assert_eq!(our_types, their_types, "group-context extension types");
    let rc = |v: &[(u16, Vec<u8>)]| v.iter().find(|(t, _)| *t == 3).map(|(_, d)| d.clone());
    let theirs: Vec<(u16, Vec<u8>)> = recorded
        .context_extensions
        .iter()
        .map(|e| (e.ext_type, e.data.clone()))
        .collect();
    assert_eq!(rc(&ours), rc(&theirs), "required capabilities");
    // Immutable metadata: a length-prefixed GroupMetadataV1 naming a DM and its two members.
    for (exts, creator) in [
        (&ours, ia.as_str()),
        (&theirs, k["C"]["inbox_id"].as_str().unwrap()),
    ] {
        let data = &exts
            .iter()
            .find(|(t, _)| *t == mls::EXT_IMMUTABLE_METADATA)
            .unwrap()
            .1;
        let md = mc::GroupMetadataV1::decode(
            gatehouse_protocol::tlsread::Reader::new(data, "md")
                .vec()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(md.conversation_type, mc::ConversationType::Dm as i32);
        assert_eq!(md.creator_inbox_id, creator);
        assert!(md.dm_members.is_some());
        let perms = &exts
            .iter()
            .find(|(t, _)| *t == mls::EXT_GROUP_PERMISSIONS)
            .unwrap()
            .1;
        let p = mc::GroupMutablePermissionsV1::decode(perms.as_slice())
            .unwrap()
            .policies
            .unwrap();
        assert_eq!(
            p.add_member_policy,
            Some(mc::MembershipPolicy {
                kind: Some(mc::membership_policy::Kind::Base(2))
            })
        );
    }
}

/// libxmtp's recorded commit-log uploads and query answers: every entry's signature verifies
/// as our `commit_log::verify` checks it (Ed25519 over the serialised `PlaintextCommitLogEntry`,
/// no context), names its own group, and re-encodes byte for byte (our field layout is libxmtp's).
#[test]
fn commit_log_entries_verify() {
    use gatehouse_protocol::commit_log;
    use gatehouse_wire::Message as _;
    use gatehouse_wire::message_contents::{CommitLogEntry, CommitResult, PlaintextCommitLogEntry};
    use gatehouse_wire::mls_api as mpb;
    let check = |e: &CommitLogEntry, group: &[u8]| {
        let sig = e.signature.as_ref().expect("signed");
        let key =
            ed25519_dalek::VerifyingKey::from_bytes(sig.public_key.as_slice().try_into().unwrap())
                .unwrap();
        let plain = commit_log::verify(e, &key).expect("libxmtp's signature verifies");
        assert_eq!(plain.group_id, group);
        assert_eq!(plain.encode_to_vec(), e.serialized_commit_log_entry);
        plain
    };
    let mut published = 0;
    for name in [
        "047-MlsApi-BatchPublishCommitLog.req.bin",
        "063-MlsApi-BatchPublishCommitLog.req.bin",
    ] {
        let req = mpb::BatchPublishCommitLogRequest::decode(common::read(name).as_slice()).unwrap();
        for r in &req.requests {
            let e = CommitLogEntry {
                sequence_id: 0,
                serialized_commit_log_entry: r.serialized_commit_log_entry.clone(),
                signature: r.signature.clone(),
            };
            let plain: PlaintextCommitLogEntry = check(&e, &r.group_id);
            if plain.commit_result == CommitResult::Applied as i32 {
                assert!(!plain.applied_epoch_authenticator.is_empty());
            }
            published += 1;
        }
    }
    assert!(published > 0, "the recording holds uploads");
    let mut queried = 0;
    for call in [
        "044", "061", "069", "075", "083", "084", "085", "279", "305",
    ] {
        let name = format!("{call}-MlsApi-BatchQueryCommitLog.resp.bin");
        let resp =
            mpb::BatchQueryCommitLogResponse::decode(common::read(&name).as_slice()).unwrap();
        for r in &resp.responses {
            for e in &r.commit_log_entries {
                check(e, &r.group_id);
                queried += 1;
            }
        }
    }
    assert!(queried > 0, "the recording holds published entries");
    eprintln!("{published} uploaded and {queried} queried entries verified");
}
