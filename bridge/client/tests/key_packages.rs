//! Key-package rotation, against an in-process node.

mod common;
use common::{client, node};

/// A welcome that used our key package rotates it; the old one stays for the grace period and
/// its private keys are deleted after it; new conversations use the new package.
#[tokio::test]
async fn rotated_after_a_welcome_and_deleted_after_grace() {
    let url = node().await;
    let mut a = client(&url, 1).await;
    let mut b = client(&url, 2).await;
    let mut c = client(&url, 3).await;
    let first = a.current_key_package().unwrap().unwrap();
    b.dm(a.inbox_id()).await.unwrap();
    assert_eq!(a.sync_welcomes().await.unwrap().len(), 1);
    let second = a.current_key_package().unwrap().unwrap();
    assert_ne!(first, second, "rotated after the welcome");
    assert!(a.holds_key_package(&first), "kept during the grace period");
    a.set_key_package_grace(std::time::Duration::ZERO);
    a.sync_welcomes().await.unwrap();
    assert!(
        !a.holds_key_package(&first),
        "deleted after the grace period"
    );
    assert!(a.holds_key_package(&second));
    // The new package works: C's DM reaches A.
    let gid = c.dm(a.inbox_id()).await.unwrap();
    assert_eq!(a.sync_welcomes().await.unwrap(), vec![gid]);
}
