//! Following real libxmtp groups: acting as a recorded member that joined from a recorded
//! welcome, our MLS stack applies every commit other members made, in recorded (node) order,
//! drops the losers of same-epoch races as libxmtp did, and decrypts the application messages
//! up to the member's own first commit (which it recognises as its own, never as a fork).
#![cfg(feature = "fixtures")]

mod common;
use common::*;

use gatehouse_protocol::{content, group, mls, welcome};
use gatehouse_wire::{Message, mls_api};
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::*;
use openmls_traits::storage::StorageProvider as _;

fn template_bundle() -> KeyPackageBundle {
    let p = group::Provider::default();
    let key = gatehouse_protocol::identity::InstallationKey::from_seed(&[1; 32]);
    KeyPackage::builder()
        .build(
            group::CIPHERSUITE,
            &p,
            group::signer(&key),
            CredentialWithKey {
                credential: group::credential("x"),
                signature_key: key.public().to_vec().into(),
            },
        )
        .unwrap()
}

/// Replaces the only byte array inside a serialised private key with `bytes`.
fn set_key_bytes(v: &mut serde_json::Value, bytes: &[u8]) {
    match v {
        serde_json::Value::Array(a) if a.iter().all(|x| x.is_u64()) => {
            *v = serde_json::to_value(bytes).unwrap()
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| set_key_bytes(x, bytes)),
        serde_json::Value::Object(o) => o.values_mut().for_each(|x| set_key_bytes(x, bytes)),
        _ => {}
    }
}

/// A provider holding every recorded key package of `who` with its private keys.
fn provider_for(who: &str) -> group::Provider {
    let keys = json("keys.json");
    let provider = group::Provider::default();
    for kp in keys[who]["key_packages"].as_array().unwrap() {
        let req = mls_api::UploadKeyPackageRequest::decode(
            read(kp["uploaded_in"].as_str().unwrap()).as_slice(),
        )
        .unwrap();
        let tls = req.key_package.unwrap().key_package_tls_serialized;
        let key_package = KeyPackageIn::tls_deserialize(&mut tls.as_slice())
            .unwrap()
            .validate(provider.crypto(), ProtocolVersion::Mls10)
            .unwrap();
        let hash_ref = key_package.hash_ref(provider.crypto()).unwrap();
        assert_eq!(
            hex::encode(hash_ref.as_slice()),
            kp["key_package_ref"].as_str().unwrap()
        );
        // openmls has no public constructor for a bundle from raw keys; its serde form is public.
        let mut v = serde_json::to_value(template_bundle()).unwrap();
        v["key_package"] = serde_json::to_value(&key_package).unwrap();
        set_key_bytes(&mut v["private_init_key"], &hexval(&kp["init_private"]));
        set_key_bytes(
            &mut v["private_encryption_key"],
            &hexval(&kp["encryption_private"]),
        );
        let bundle: KeyPackageBundle = serde_json::from_value(v).unwrap();
        assert_eq!(
            bundle.init_private_key().to_vec(),
            hexval(&kp["init_private"])
        );
        provider
            .storage()
            .write_key_package(&hash_ref, &bundle)
            .unwrap();
    }
    provider
}

fn join(provider: &group::Provider, welcome_mls: &[u8]) -> MlsGroup {
    let MlsMessageBodyIn::Welcome(w) = MlsMessageIn::tls_deserialize(&mut &welcome_mls[..])
        .unwrap()
        .extract()
    else {
        panic!("not a welcome")
    };
    let config = MlsGroupJoinConfig::builder()
        .max_past_epochs(3)
        .use_ratchet_tree_extension(true)
        .build();
    // The recorded key packages expire on 2027-02-16: don't depend on the date.
    StagedWelcome::build_from_welcome(provider, &config, w)
        .unwrap()
        .skip_lifetime_validation()
        .build()
        .unwrap()
        .into_group(provider)
        .unwrap()
}

/// Every message published to `group_id`, in recorded (node) order.
fn recorded_messages(group_id: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for c in json("index.json")["calls"].as_array().unwrap() {
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
                let Some(mls_api::group_message_input::Version::V1(v)) = m.version else {
                    continue;
                };
                if hex::encode(mls::read_header(&v.data).unwrap().group_id) == group_id {
                    out.push(v.data);
                }
            }
        }
    }
    out
}

/// What following a group as one member produced.
#[derive(Debug, Default)]
struct Followed {
    texts: Vec<(String, String)>,
    other_types: Vec<String>,
    trace: Vec<String>,
    unprocessed: usize,
    commits_applied: usize,
    race_losers_dropped: usize,
    stopped_at_own_commit: bool,
}

fn follow(provider: &group::Provider, g: &mut MlsGroup, messages: &[Vec<u8>]) -> Followed {
    let mut f = Followed::default();
    let joined_at = g.epoch().as_u64();
    for data in messages {
        let h = mls::read_header(data).unwrap();
        if h.epoch < joined_at {
            // Sent before this member joined: not for it.
            continue;
        }
        if h.epoch < g.epoch().as_u64() && h.is_commit() {
            // A commit for an epoch that is already gone lost a race: libxmtp dropped it too.
            f.race_losers_dropped += 1;
            continue;
        }
        if h.epoch + 3 < g.epoch().as_u64() || h.epoch > g.epoch().as_u64() {
            f.trace.push(format!(
                "e{} {} skipped (group at e{})",
                h.epoch,
                if h.is_commit() { "commit" } else { "app" },
                g.epoch().as_u64()
            ));
            continue;
        }
        match group::process(provider, g, data) {
            Ok(group::Processed::Application {
                sender_inbox,
                plaintext,
                ..
            }) => {
                let opened = content::open_envelope(&plaintext)
                    .unwrap_or_else(|e| panic!("{e}: {}", hex::encode(&plaintext)));
                let text = match opened {
                    content::Opened::Content { content, .. } => {
                        match content::display_text(&content) {
                            Some(t) => t,
                            None => {
                                // Not text: kept as its content type (e.g. a leave request).
                                f.other_types.push(
                                    content
                                        .r#type
                                        .as_ref()
                                        .map(content::type_string)
                                        .unwrap_or_default(),
                                );
                                continue;
                            }
                        }
                    }
                    content::Opened::Raw { bytes, .. } => String::from_utf8(bytes).unwrap(),
                    content::Opened::Sync => continue,
                };
                f.trace
                    .push(format!("e{} text from {}", h.epoch, &sender_inbox[..6]));
                f.texts.push((sender_inbox, text));
            }
            Ok(group::Processed::PendingCommit {
                staged,
                new_leaves,
                removed,
                ..
            }) => {
                f.trace.push(format!(
                    "e{} commit adds/updates {} removes {}",
                    h.epoch,
                    new_leaves.len(),
                    removed.len()
                ));
                group::merge_commit(provider, g, *staged).unwrap();
                f.commits_applied += 1;
            }
            Ok(group::Processed::Proposal) => f.trace.push(format!("e{} proposal", h.epoch)),
            Ok(group::Processed::Own) => {
                // Our own message: a commit of ours is where the recording's private state ends.
                f.trace.push(format!(
                    "e{} own {}",
                    h.epoch,
                    if h.is_commit() { "commit" } else { "app" }
                ));
                if h.is_commit() {
                    f.stopped_at_own_commit = true;
                    break;
                }
            }
            Err(e) if e.to_string().contains("own sender ratchet") => {
                f.trace.push(format!(
                    "e{} own {}",
                    h.epoch,
                    if h.is_commit() { "commit" } else { "app" }
                ));
                // Our own message: a commit of ours is where the recording's private state ends.
                if h.is_commit() {
                    f.stopped_at_own_commit = true;
                    break;
                }
            }
            Err(e) => {
                f.trace.push(format!(
                    "e{} {} ERR {e}",
                    h.epoch,
                    if h.is_commit() { "commit" } else { "app" }
                ));
                f.unprocessed += 1;
                continue;
            }
        }
    }
    f
}

fn unwrap_v1(file: &str, who: &str) -> Vec<u8> {
    let keys = json("keys.json");
    let resp = mls_api::QueryWelcomeMessagesResponse::decode(read(file).as_slice()).unwrap();
    for w in resp.messages {
        let Some(mls_api::welcome_message::Version::V1(v1)) = w.version else {
            continue;
        };
        for wk in keys[who]["welcome_wrapper_keys"].as_array().unwrap() {
            if hexval(&wk["public"]) == v1.hpke_public_key {
                return welcome::unwrap(
                    &v1.data,
                    &v1.welcome_metadata,
                    &hexval(&wk["private"]).try_into().unwrap(),
                )
                .unwrap()
                .mls_message;
            }
        }
    }
    panic!("{file}: nothing for {who}")
}

fn check_texts(f: &Followed) {
    // Each healthcheck text names its sender: the decrypted sender must be that inbox.
    for (sender, text) in &f.texts {
        assert_eq!(
            text,
            &format!("healthcheck from {sender}"),
            "text and sender disagree"
        );
    }
}

/// G2 (welcome pointers): A, B and D each join, apply the others' commits in node order, drop
/// race losers, read the others' texts, and stop at their own first commit.
#[test]
fn follow_g2_as_a_b_d() {
    let keys = json("keys.json");
    let messages = recorded_messages("975780de6b83ed70278e42f86cf4e75a");
    let pointee = mls_api::QueryWelcomeMessagesResponse::decode(
        read("155-MlsApi-QueryWelcomeMessages.resp.bin").as_slice(),
    )
    .unwrap();
    let Some(mls_api::welcome_message::Version::V1(sym)) = pointee.messages[0].version.clone()
    else {
        panic!()
    };
    let mut total_texts = 0;
    for (who, file) in [("A", "151"), ("B", "153"), ("D", "152")] {
        let name = response_of(file);
        let resp = mls_api::QueryWelcomeMessagesResponse::decode(read(&name).as_slice()).unwrap();
        let Some(mls_api::welcome_message::Version::WelcomePointer(p)) =
            resp.messages[0].version.clone()
        else {
            panic!()
        };
        let seed = keys[who]["welcome_wrapper_keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| hexval(&k["public"]) == p.hpke_public_key)
            .map(|k| hexval(&k["private"]))
            .unwrap();
        let ptr = welcome::unwrap_pointer(&p.welcome_pointer, &seed.try_into().unwrap()).unwrap();
        let w = welcome::unwrap_symmetric(&sym.data, &sym.welcome_metadata, &ptr).unwrap();
        let provider = provider_for(who);
        let mut g = join(&provider, &w.mls_message);
        assert_eq!(g.epoch().as_u64(), 1);
        let f = follow(&provider, &mut g, &messages);
        check_texts(&f);
        assert!(
            f.texts
                .iter()
                .all(|(s, _)| s != keys[who]["inbox_id"].as_str().unwrap()),
            "{who} cannot read its own texts"
        );
        assert_eq!(f.unprocessed, 0, "{who}: {:?}", f.trace);
        assert!(f.stopped_at_own_commit, "{who}: {:?}", f.trace);
        // What the recording says each member could read before its own first commit: the
        // creator C's text, then the texts of members whose key updates won earlier.
        let senders: Vec<&str> = f.texts.iter().map(|(s, _)| s.as_str()).collect();
        let expected: Vec<&str> = match who {
            "A" => vec!["C", "D"],
            "B" => vec!["C", "D", "A"],
            _ => vec!["C"],
        }
        .into_iter()
        .map(|n| keys[n]["inbox_id"].as_str().unwrap())
        .collect();
        assert_eq!(senders, expected, "{who}: {:?}", f.trace);
        total_texts += f.texts.len();
    }
    assert_eq!(total_texts, 6);
}

/// G1: C joins from welcome 105 at epoch 3 and follows until its own first commit.
#[test]
fn follow_g1_as_c() {
    let provider = provider_for("C");
    let mut g = join(
        &provider,
        &unwrap_v1("105-MlsApi-QueryWelcomeMessages.resp.bin", "C"),
    );
    assert_eq!(g.epoch().as_u64(), 3);
    let f = follow(
        &provider,
        &mut g,
        &recorded_messages("cfd2102a02c9073d0dd061e1e274baf7"),
    );
    check_texts(&f);
    assert_eq!(f.unprocessed, 0, "{:?}", f.trace);
    // C applied the commit that followed its welcome, dropped the race loser, and stopped at
    // its own key-update commit (recognised as its own, not reported as a fork).
    assert_eq!(f.commits_applied, 1, "{:?}", f.trace);
    assert!(f.stopped_at_own_commit, "{:?}", f.trace);
}
