use super::*;

/// libxmtp's published signature-text example (unsigned_actions.rs) is reproduced exactly.
#[test]
fn signature_text_matches_libxmtp() {
    let owner = "0x1234567890abcdef1234567890abcdef12345678".to_string();
    let id = inbox_id(&owner, 0);
    assert_eq!(
        id,
        "fcd18d86276d7a99fe522dba9660c420f03c8648785ada7c5daae232a3df77a9"
    );
    let addr = Member::Ethereum("0x4567890abcdef1234567890abcdef12345678123".into());
    let inst = Member::Installation(vec![1, 2, 3]);
    let text = signature_text(
        &id,
        12,
        &[
            UnsignedAction::CreateInbox { owner, nonce: 0 },
            UnsignedAction::Add(addr.clone()),
            UnsignedAction::Add(inst.clone()),
            UnsignedAction::Revoke(addr),
            UnsignedAction::Revoke(inst),
            UnsignedAction::ChangeRecovery("0x7890abcdef1234567890abcdef12345678123456".into()),
        ],
    );
    let expected = "XMTP : Authenticate to inbox\n\nInbox ID: fcd18d86276d7a99fe522dba9660c420f03c8648785ada7c5daae232a3df77a9\nCurrent time: 1970-01-01T00:00:00Z\n\n- Create inbox\n  (Owner: 0x1234567890abcdef1234567890abcdef12345678)\n- Link address to inbox\n  (Address: 0x4567890abcdef1234567890abcdef12345678123)\n- Grant messaging access to app\n  (ID: 010203)\n- Unlink address from inbox\n  (Address: 0x4567890abcdef1234567890abcdef12345678123)\n- Revoke messaging access from app\n  (ID: 010203)\n- Change inbox recovery address\n  (Address: 0x7890abcdef1234567890abcdef12345678123456)\n\nFor more info: https://xmtp.org/signatures";
    assert_eq!(text, expected);
}

/// EIP-191 known answer: the address of private key 0x…01 is the well-known
/// 0x7e5f4552091a69125d5dfcb7b8c2659029395bdf, and recovery returns it.
#[test]
fn erc191_sign_and_recover() {
    let mut sk = [0u8; 32];
    sk[31] = 1;
    let w = Wallet::from_bytes(&sk).unwrap();
    assert_eq!(w.address(), "0x7e5f4552091a69125d5dfcb7b8c2659029395bdf");
    let sig = w.sign_text("hello");
    let (addr, _) = recover_erc191("hello", &sig).unwrap();
    assert_eq!(addr, w.address());
    let (other, _) = recover_erc191("hellO", &sig).unwrap();
    assert_ne!(other, w.address());
    let mut bad = sig.clone();
    bad[64] = 29;
    assert_eq!(
        recover_erc191("hello", &bad).unwrap_err(),
        SignatureError::BadRecoveryByte(29)
    );
}

/// A registration folds to an inbox with the wallet and the installation; replaying it fails.
#[test]
fn register_and_fold() {
    let w = Wallet::from_bytes(&[7u8; 32]).unwrap();
    let inst = InstallationKey::from_seed(&[9u8; 32]);
    let u = register_inbox(&w, 1, &inst, 1_700_000_000_000_000_000);
    let st = apply_update(None, &u).unwrap();
    assert_eq!(st.inbox_id, inbox_id(&w.address(), 1));
    assert!(st.has_installation(&inst.public()));
    assert_eq!(
        st.addresses().collect::<Vec<_>>(),
        vec![w.address().as_str()]
    );
    assert!(apply_update(Some(&st), &u).is_err());
    let mut forged = u.clone();
    forged.client_timestamp_ns += 1_000_000_000;
    assert!(apply_update(None, &forged).is_err());
}

/// Civil dates come out right around leap years.
#[test]
fn rfc3339() {
    assert_eq!(rfc3339_secs(0), "1970-01-01T00:00:00Z");
    assert_eq!(
        rfc3339_secs(951_782_400 * 1_000_000_000),
        "2000-02-29T00:00:00Z"
    );
    assert_eq!(
        rfc3339_secs(1_795_506_939_986_000_000),
        "2026-11-24T07:55:39Z"
    );
}

/// Known answer from the web3.js documentation (`web3.eth.accounts.sign('Some data', key)`):
/// the EIP-191 hash, the signature our RFC 6979 signer produces, and the recovered address.
#[test]
fn erc191_web3js_vector() {
    let key =
        hex::decode("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318").unwrap();
    let w = Wallet::from_bytes(&key).unwrap();
    assert_eq!(w.address(), "0x2c7536e3605d9c16a7a3d7b1898e529396a65c23");
    assert_eq!(
        hex::encode(eip191_hash("Some data")),
        "1da44b586eb0729ff70a73c326926f6ed5a25f5b056e7f47fbc6e58d86871655"
    );
    let expected = "b91467e570a6466aa9e9876cbcd013baba02900b8979d43fe208a4a4f339f5fd6007e74cd82e037b800186422fc2da167c747ef045e5d18a5f5d4300f8e1a0291c";
    assert_eq!(hex::encode(w.sign_text("Some data")), expected);
    let (addr, _) = recover_erc191("Some data", &hex::decode(expected).unwrap()).unwrap();
    assert_eq!(addr, w.address());
}

fn wallet(n: u8) -> Wallet {
    Wallet::from_bytes(&[n; 32]).unwrap()
}

fn inst(n: u8) -> InstallationKey {
    InstallationKey::from_seed(&[n; 32])
}

const T0: u64 = 1_700_000_000_000_000_000;
const SEC: u64 = 1_000_000_000;

/// A second installation, a second wallet, revocation (with the revoked wallet's
/// installations) and a recovery change all fold as XMTP's rules say.
#[test]
fn installations_wallets_revocation_recovery() {
    let (w1, w2, w3) = (wallet(1), wallet(2), wallet(3));
    let (i1, i2, i3) = (inst(11), inst(12), inst(13));
    let id = inbox_id(&w1.address(), 1);
    let u1 = register_inbox(&w1, 1, &i1, T0);
    let s1 = apply_update(None, &u1).unwrap();
    let u2 = build_update(
        &id,
        T0 + SEC,
        &[Pending::Add {
            existing: SignerRef::Wallet(&w1),
            new: SignerRef::Installation(&i2),
        }],
    );
    let s2 = apply_update(Some(&s1), &u2).unwrap();
    assert_eq!(s2.installations().count(), 2);
    // An installation may add a wallet, and that wallet its own installation.
    let u3 = build_update(
        &id,
        T0 + 2 * SEC,
        &[
            Pending::Add {
                existing: SignerRef::Installation(&i2),
                new: SignerRef::Wallet(&w2),
            },
            Pending::Add {
                existing: SignerRef::Wallet(&w2),
                new: SignerRef::Installation(&i3),
            },
        ],
    );
    let s3 = apply_update(Some(&s2), &u3).unwrap();
    assert!(s3.has_installation(&i3.public()));
    // Revoking w2 takes the installation it added (i3) with it, not i1 or i2.
    let u4 = build_update(
        &id,
        T0 + 3 * SEC,
        &[Pending::Revoke {
            recovery: SignerRef::Wallet(&w1),
            member: Member::Ethereum(w2.address()),
        }],
    );
    let s4 = apply_update(Some(&s3), &u4).unwrap();
    assert!(!s4.members.contains_key(&Member::Ethereum(w2.address())));
    assert!(!s4.has_installation(&i3.public()));
    assert!(s4.has_installation(&i1.public()) && s4.has_installation(&i2.public()));
    // Hand recovery to w3; from then on only w3 may revoke.
    let u5 = build_update(
        &id,
        T0 + 4 * SEC,
        &[Pending::ChangeRecovery {
            recovery: SignerRef::Wallet(&w1),
            new_recovery: w3.address(),
        }],
    );
    let s5 = apply_update(Some(&s4), &u5).unwrap();
    assert_eq!(s5.recovery, w3.address());
    let by_old = build_update(
        &id,
        T0 + 5 * SEC,
        &[Pending::Revoke {
            recovery: SignerRef::Wallet(&w1),
            member: Member::Installation(i1.public().to_vec()),
        }],
    );
    assert_eq!(
        apply_update(Some(&s5), &by_old).unwrap_err(),
        AssociationError::NotRecoveryIdentifier
    );
    let by_new = build_update(
        &id,
        T0 + 5 * SEC,
        &[Pending::Revoke {
            recovery: SignerRef::Wallet(&w3),
            member: Member::Installation(i1.public().to_vec()),
        }],
    );
    let s6 = apply_update(Some(&s5), &by_new).unwrap();
    assert!(!s6.has_installation(&i1.public()));
    assert_eq!(
        fold([&u1, &u2, &u3, &u4, &u5, &by_new]).unwrap().unwrap(),
        s6
    );
}

/// A passkey can be linked and then add an installation, as libxmtp verifies WebAuthn.
#[test]
fn passkey_member() {
    let w = wallet(1);
    let pk = SoftPasskey::from_bytes(&[7; 32], "https://gatehouse.example").unwrap();
    let id = inbox_id(&w.address(), 1);
    let s1 = apply_update(None, &register_inbox(&w, 1, &inst(1), T0)).unwrap();
    let u = build_update(
        &id,
        T0 + SEC,
        &[Pending::Add {
            existing: SignerRef::Wallet(&w),
            new: SignerRef::Passkey(&pk),
        }],
    );
    let s2 = apply_update(Some(&s1), &u).unwrap();
    assert!(s2.members.contains_key(&Member::Passkey(pk.public())));
    let u = build_update(
        &id,
        T0 + 2 * SEC,
        &[Pending::Add {
            existing: SignerRef::Passkey(&pk),
            new: SignerRef::Installation(&inst(2)),
        }],
    );
    assert!(
        apply_update(Some(&s2), &u)
            .unwrap()
            .has_installation(&inst(2).public())
    );
    // A passkey assertion over another text is refused.
    let sig = pk.signature("another text");
    assert_eq!(
        verify("the text", &sig).unwrap_err(),
        SignatureError::PasskeyChallenge
    );
}

fn replace_sig(u: &mut pb::IdentityUpdate, action: usize, existing: bool, sig: pb::Signature) {
    match u.actions[action].kind.as_mut().unwrap() {
        pb::identity_action::Kind::Add(a) if existing => a.existing_member_signature = Some(sig),
        pb::identity_action::Kind::Add(a) => a.new_member_signature = Some(sig),
        pb::identity_action::Kind::CreateInbox(c) => c.initial_identifier_signature = Some(sig),
        pb::identity_action::Kind::Revoke(r) => r.recovery_identifier_signature = Some(sig),
        pb::identity_action::Kind::ChangeRecoveryAddress(c) => {
            c.existing_recovery_identifier_signature = Some(sig)
        }
    }
}

/// Each broken rule is refused with its own error.
#[test]
fn negative_cases() {
    let (w1, w2) = (wallet(1), wallet(2));
    let (i1, i2) = (inst(11), inst(12));
    let id = inbox_id(&w1.address(), 1);
    let s1 = apply_update(None, &register_inbox(&w1, 1, &i1, T0)).unwrap();

    // A signature made for another inbox recovers someone else: not the owner.
    let other = register_inbox(&w2, 1, &i2, T0);
    let mut stolen = register_inbox(&w1, 1, &i1, T0);
    replace_sig(
        &mut stolen,
        0,
        false,
        other.actions[0]
            .kind
            .as_ref()
            .map(|k| match k {
                pb::identity_action::Kind::CreateInbox(c) => {
                    c.initial_identifier_signature.clone().unwrap()
                }
                _ => unreachable!(),
            })
            .unwrap(),
    );
    assert_eq!(
        apply_update(None, &stolen).unwrap_err(),
        AssociationError::MissingExistingMember
    );

    // Replaying a signature from an earlier update.
    let add = build_update(
        &id,
        T0 + SEC,
        &[Pending::Add {
            existing: SignerRef::Wallet(&w1),
            new: SignerRef::Installation(&i2),
        }],
    );
    let s2 = apply_update(Some(&s1), &add).unwrap();
    assert_eq!(
        apply_update(Some(&s2), &add).unwrap_err(),
        AssociationError::Replay
    );

    // An association signed by one side only: the new member's signature is missing...
    let mut one_sided = build_update(
        &id,
        T0 + 2 * SEC,
        &[Pending::Add {
            existing: SignerRef::Wallet(&w1),
            new: SignerRef::Wallet(&w2),
        }],
    );
    if let Some(pb::identity_action::Kind::Add(a)) = one_sided.actions[0].kind.as_mut() {
        a.new_member_signature = None;
    }
    assert_eq!(
        apply_update(Some(&s1), &one_sided).unwrap_err(),
        AssociationError::Signature(SignatureError::Missing("new member"))
    );
    // ...or made by the existing member instead of the new one.
    let mut wrong = build_update(
        &id,
        T0 + 2 * SEC,
        &[Pending::Add {
            existing: SignerRef::Wallet(&w1),
            new: SignerRef::Wallet(&w2),
        }],
    );
    let text = signature_text(
        &id,
        T0 + 2 * SEC,
        &[UnsignedAction::Add(Member::Ethereum(w2.address()))],
    );
    replace_sig(&mut wrong, 0, false, wallet(3).signature(&text));
    assert_eq!(
        apply_update(Some(&s1), &wrong).unwrap_err(),
        AssociationError::NewMemberIdSignatureMismatch
    );
    // ...or the "existing member" is a stranger.
    let stranger = build_update(
        &id,
        T0 + 2 * SEC,
        &[Pending::Add {
            existing: SignerRef::Wallet(&wallet(4)),
            new: SignerRef::Wallet(&w2),
        }],
    );
    assert_eq!(
        apply_update(Some(&s1), &stranger).unwrap_err(),
        AssociationError::MissingExistingMember
    );

    // Revocation signed by a member that is not the recovery identifier.
    let s_w2 = apply_update(
        Some(&s1),
        &build_update(
            &id,
            T0 + 3 * SEC,
            &[Pending::Add {
                existing: SignerRef::Wallet(&w1),
                new: SignerRef::Wallet(&w2),
            }],
        ),
    )
    .unwrap();
    let revoke = build_update(
        &id,
        T0 + 4 * SEC,
        &[Pending::Revoke {
            recovery: SignerRef::Wallet(&w2),
            member: Member::Installation(i1.public().to_vec()),
        }],
    );
    assert_eq!(
        apply_update(Some(&s_w2), &revoke).unwrap_err(),
        AssociationError::NotRecoveryIdentifier
    );

    // A tampered update: the signed text no longer matches, so the signer is someone else.
    let mut tampered = add.clone();
    if let Some(pb::identity_action::Kind::Add(a)) = tampered.actions[0].kind.as_mut() {
        a.new_member_identifier = Some(Member::Installation(inst(99).public().to_vec()).to_proto());
    }
    assert!(matches!(
        apply_update(Some(&s1), &tampered).unwrap_err(),
        AssociationError::NewMemberIdSignatureMismatch | AssociationError::Signature(_)
    ));
    let mut moved = add.clone();
    moved.client_timestamp_ns += 5 * SEC;
    assert!(apply_update(Some(&s1), &moved).is_err());

    // An installation may not add an installation.
    let i_adds_i = build_update(
        &id,
        T0 + 5 * SEC,
        &[Pending::Add {
            existing: SignerRef::Installation(&i1),
            new: SignerRef::Installation(&i2),
        }],
    );
    assert_eq!(
        apply_update(Some(&s1), &i_adds_i).unwrap_err(),
        AssociationError::MemberNotAllowed {
            existing: "installation",
            new: "installation"
        }
    );

    // A wallet's signature may not stand for an installation.
    let mut kind_swap = build_update(
        &id,
        T0 + 6 * SEC,
        &[Pending::Add {
            existing: SignerRef::Wallet(&w1),
            new: SignerRef::Installation(&i2),
        }],
    );
    let text = signature_text(
        &id,
        T0 + 6 * SEC,
        &[UnsignedAction::Add(Member::Installation(
            i2.public().to_vec(),
        ))],
    );
    replace_sig(&mut kind_swap, 0, true, i1.signature(&text));
    replace_sig(&mut kind_swap, 0, false, i2.signature(&text));
    assert_eq!(
        apply_update(Some(&s1), &kind_swap).unwrap_err(),
        AssociationError::MemberNotAllowed {
            existing: "installation",
            new: "installation"
        }
    );

    // ERC-191: the high-s twin of a valid signature and a wrong v.
    let sig = w1.sign_text("x");
    let n =
        hex::decode("fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141").unwrap();
    let mut high = sig.clone();
    let mut borrow = 0i32;
    for i in (0..32).rev() {
        let d = n[i] as i32 - sig[32 + i] as i32 - borrow;
        high[32 + i] = d.rem_euclid(256) as u8;
        borrow = (d < 0) as i32;
    }
    high[64] = if sig[64] == 27 { 28 } else { 27 };
    assert_eq!(
        recover_erc191("x", &high).unwrap_err(),
        SignatureError::HighS
    );
    let mut v = sig.clone();
    v[64] = 35;
    assert_eq!(
        recover_erc191("x", &v).unwrap_err(),
        SignatureError::BadRecoveryByte(35)
    );

    // The eleventh installation is refused.
    let mut st = s1.clone();
    for k in 0..(MAX_INSTALLATIONS_PER_INBOX as u8 - 1) {
        let u = build_update(
            &id,
            T0 + (10 + k as u64) * SEC,
            &[Pending::Add {
                existing: SignerRef::Wallet(&w1),
                new: SignerRef::Installation(&inst(100 + k)),
            }],
        );
        st = apply_update(Some(&st), &u).unwrap();
    }
    let u = build_update(
        &id,
        T0 + 99 * SEC,
        &[Pending::Add {
            existing: SignerRef::Wallet(&w1),
            new: SignerRef::Installation(&inst(200)),
        }],
    );
    assert_eq!(
        apply_update(Some(&st), &u).unwrap_err(),
        AssociationError::TooManyInstallations(MAX_INSTALLATIONS_PER_INBOX)
    );
    // Creating twice, and acting on an inbox that does not exist.
    assert_eq!(
        apply_update(Some(&s1), &register_inbox(&w1, 1, &i1, T0 + 50 * SEC)).unwrap_err(),
        AssociationError::MultipleCreate
    );
    assert_eq!(
        apply_update(None, &add).unwrap_err(),
        AssociationError::NotCreated
    );
}

mod properties {
    use proptest::prelude::*;

    use super::super::*;
    use super::{SEC, T0, inst, wallet};

    #[derive(Debug, Clone)]
    enum Op {
        AddInstallation(u8),
        RevokeInstallation(u8),
        AddWallet(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..6).prop_map(Op::AddInstallation),
            (0u8..6).prop_map(Op::RevokeInstallation),
            (0u8..3).prop_map(Op::AddWallet)
        ]
    }

    /// Turns ops into pending actions that are valid in sequence.
    fn plan(ops: &[Op]) -> Vec<(Op, bool)> {
        let mut live_inst = std::collections::BTreeSet::new();
        let mut live_wallets = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for o in ops {
            let ok = match o {
                Op::AddInstallation(k) => live_inst.insert(*k),
                Op::RevokeInstallation(k) => live_inst.remove(k),
                Op::AddWallet(k) => live_wallets.insert(*k),
            };
            out.push((o.clone(), ok));
        }
        out
    }

    fn pending<'a>(
        o: &Op,
        owner: &'a Wallet,
        keys: &'a [InstallationKey],
        wallets: &'a [Wallet],
    ) -> Pending<'a> {
        match o {
            Op::AddInstallation(k) => Pending::Add {
                existing: SignerRef::Wallet(owner),
                new: SignerRef::Installation(&keys[*k as usize]),
            },
            Op::RevokeInstallation(k) => Pending::Revoke {
                recovery: SignerRef::Wallet(owner),
                member: Member::Installation(keys[*k as usize].public().to_vec()),
            },
            Op::AddWallet(k) => Pending::Add {
                existing: SignerRef::Wallet(owner),
                new: SignerRef::Wallet(&wallets[*k as usize]),
            },
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Valid logs fold to the same members and recovery whatever the batching.
        #[test]
        fn batching_does_not_change_the_state(ops in proptest::collection::vec(op(), 1..10), split in 1usize..4) {
            let owner = wallet(1);
            let keys: Vec<_> = (0..6).map(|k| inst(50 + k)).collect();
            let wallets: Vec<_> = (0..3).map(|k| wallet(60 + k)).collect();
            let id = inbox_id(&owner.address(), 1);
            let steps: Vec<_> = plan(&ops).into_iter().filter(|(_, ok)| *ok).map(|(o, _)| o).collect();
            let reg = register_inbox(&owner, 1, &inst(1), T0);
            let one_each: Vec<_> = steps.iter().enumerate()
                .map(|(n, o)| build_update(&id, T0 + (n as u64 + 1) * SEC, &[pending(o, &owner, &keys, &wallets)])).collect();
            let batched: Vec<_> = steps.chunks(split).enumerate()
                .map(|(n, c)| build_update(&id, T0 + (n as u64 + 1) * SEC, &c.iter().map(|o| pending(o, &owner, &keys, &wallets)).collect::<Vec<_>>())).collect();
            let a = fold(std::iter::once(&reg).chain(&one_each)).unwrap().unwrap();
            let b = fold(std::iter::once(&reg).chain(&batched)).unwrap().unwrap();
            prop_assert_eq!(&a.members.keys().collect::<Vec<_>>(), &b.members.keys().collect::<Vec<_>>());
            prop_assert_eq!(a.recovery, b.recovery);
        }

        /// A single changed byte anywhere in a signed update is refused, unless it changes nothing
        /// that is signed (XMTP signs the text: e.g. sub-second timestamp digits), in which case
        /// the update folds to exactly the same state.
        #[test]
        fn single_byte_changes_are_refused(pos in any::<prop::sample::Index>(), delta in 1u8..=255) {
            use gatehouse_wire::Message as _;
            let owner = wallet(1);
            let id = inbox_id(&owner.address(), 1);
            let reg = register_inbox(&owner, 1, &inst(1), T0);
            let s1 = apply_update(None, &reg).unwrap();
            let update = build_update(&id, T0 + SEC, &[Pending::Add { existing: SignerRef::Wallet(&owner), new: SignerRef::Installation(&inst(2)) }]);
            let good = apply_update(Some(&s1), &update).unwrap();
            let mut bytes = update.encode_to_vec();
            let i = pos.index(bytes.len());
            bytes[i] = bytes[i].wrapping_add(delta);
            if let Ok(changed) = pb::IdentityUpdate::decode(bytes.as_slice())
                && let Ok(st) = apply_update(Some(&s1), &changed)
            {
                    let who = |m: &std::collections::BTreeMap<Member, MemberRecord>| m.iter().map(|(k, r)| (k.clone(), r.added_by.clone())).collect::<Vec<_>>();
                    prop_assert_eq!(who(&st.members), who(&good.members));
                    prop_assert_eq!(
                        signature_text(&changed.inbox_id, changed.client_timestamp_ns, &[UnsignedAction::Add(Member::Installation(inst(2).public().to_vec()))]),
                        signature_text(&update.inbox_id, update.client_timestamp_ns, &[UnsignedAction::Add(Member::Installation(inst(2).public().to_vec()))])
                    );
            }
        }
    }
}

/// An inbox owned by a passkey: created, extended and recovered by passkey signatures.
#[test]
fn passkey_owned_inbox() {
    let pk = SoftPasskey::from_bytes(&[9; 32], "https://gatehouse.example").unwrap();
    let id = inbox_id(&hex::encode(pk.public()), 1);
    let s1 = apply_update(
        None,
        &register_inbox_with(SignerRef::Passkey(&pk), 1, &inst(1), T0),
    )
    .unwrap();
    assert_eq!(s1.inbox_id, id);
    assert_eq!(s1.recovery, hex::encode(pk.public()));
    assert_eq!(s1.recovery_member(), Member::Passkey(pk.public()));
    let revoke = build_update(
        &id,
        T0 + SEC,
        &[Pending::Revoke {
            recovery: SignerRef::Passkey(&pk),
            member: Member::Installation(inst(1).public().to_vec()),
        }],
    );
    assert!(
        !apply_update(Some(&s1), &revoke)
            .unwrap()
            .has_installation(&inst(1).public())
    );
    // A wallet that is not the recovery identifier cannot revoke.
    let by_wallet = build_update(
        &id,
        T0 + SEC,
        &[Pending::Revoke {
            recovery: SignerRef::Wallet(&wallet(5)),
            member: Member::Installation(inst(1).public().to_vec()),
        }],
    );
    assert_eq!(
        apply_update(Some(&s1), &by_wallet).unwrap_err(),
        AssociationError::NotRecoveryIdentifier
    );
}
