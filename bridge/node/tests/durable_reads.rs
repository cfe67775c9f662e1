//! Readers see a group message only once it is on disk: one that a crash could still take back
//! (stored, not yet flushed) would leave a reader's cursor past an id the node hands out again.

use gatehouse_node::Store;

fn ids(page: &[(u64, Vec<u8>)]) -> Vec<u64> {
    page.iter().map(|(id, _)| *id).collect()
}

#[tokio::test]
async fn a_stored_message_is_read_only_once_flushed() {
    let store = Store::temporary().unwrap();
    let g = b"group-a".to_vec();
    let first = store
        .append_group_messages(std::slice::from_ref(&g), |_, id| {
            format!("m{id}").into_bytes()
        })
        .unwrap();
    store.flush().await.unwrap();
    let second = store
        .append_group_messages(&[g.clone(), g.clone()], |_, id| {
            format!("m{id}").into_bytes()
        })
        .unwrap();
    let (id1, id2, id3) = (first[0].1, second[0].1, second[1].1);
    // The unflushed two are not there for readers, ascending or descending.
    assert_eq!(ids(&store.group_messages(&g, 0, false, 10).unwrap()), [id1]);
    assert_eq!(ids(&store.group_messages(&g, 0, true, 10).unwrap()), [id1]);
    assert!(store.group_messages(&g, id1, false, 10).unwrap().is_empty());
    // But the publish placing them knows what came before (its own flush covers both).
    assert_eq!(second[0].0, id1);
    assert_eq!(second[1].0, id2);
    store.flush().await.unwrap();
    assert_eq!(
        ids(&store.group_messages(&g, 0, false, 10).unwrap()),
        [id1, id2, id3]
    );
    assert_eq!(
        ids(&store.group_messages(&g, 0, true, 10).unwrap()),
        [id3, id2, id1]
    );
    assert_eq!(
        ids(&store.group_messages(&g, id3, true, 10).unwrap()),
        [id2, id1]
    );
}

#[tokio::test]
async fn what_a_reopened_store_holds_is_readable() {
    let dir = std::env::temp_dir().join(format!("gatehouse-durable-reads-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let g = b"group-b".to_vec();
    let placed = {
        let store = Store::open(&dir).unwrap();
        let placed = store
            .append_group_messages(&[g.clone(), g.clone()], |_, id| id.to_be_bytes().to_vec())
            .unwrap();
        store.flush().await.unwrap();
        store.seal().await.unwrap();
        placed
    };
    let store = reopen(&dir);
    let want: Vec<u64> = placed.iter().map(|(_, id)| *id).collect();
    assert_eq!(ids(&store.group_messages(&g, 0, false, 10).unwrap()), want);
    // New messages carry on after them, and show once flushed.
    let next = store
        .append_group_messages(std::slice::from_ref(&g), |_, id| id.to_be_bytes().to_vec())
        .unwrap();
    assert!(next[0].1 > want[1]);
    assert_eq!(store.group_messages(&g, 0, false, 10).unwrap().len(), 2);
    store.flush().await.unwrap();
    assert_eq!(store.group_messages(&g, 0, false, 10).unwrap().len(), 3);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Opens a store just closed. sled's threads can hold the closed one's lock for a moment
/// after the last handle went, and nothing announces the release: retried for up to 5 s.
fn reopen(dir: &std::path::Path) -> Store {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match Store::open(dir) {
            Ok(s) => return s,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => panic!("reopening the store: {e}"),
        }
    }
}

#[tokio::test]
async fn a_stored_welcome_is_read_only_once_flushed() {
    let store = Store::temporary().unwrap();
    let key = b"installation-key".to_vec();
    let first = store
        .append_welcome(&key, |id| id.to_be_bytes().to_vec())
        .unwrap();
    store.flush().await.unwrap();
    let second = store
        .append_welcome(&key, |id| id.to_be_bytes().to_vec())
        .unwrap();
    assert!(second > first);
    assert_eq!(ids(&store.welcomes(&key, 0, false, 10).unwrap()), [first]);
    assert_eq!(ids(&store.welcomes(&key, 0, true, 10).unwrap()), [first]);
    store.flush().await.unwrap();
    let page = store.welcomes(&key, 0, false, 10).unwrap();
    assert_eq!(ids(&page), [first, second]);
    // Stored with its own id.
    assert_eq!(page[1].1, second.to_be_bytes());
}
