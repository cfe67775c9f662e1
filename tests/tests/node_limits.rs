//! The node out of file descriptors: it keeps serving. tonic's accept loop ended the server
//! quietly (exit status 0) at the first `EMFILE`; the node's own accept loop pauses and
//! retries (`gatehouse_store::accept::Pause`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

use gatehouse_e2e::*;

#[test]
fn a_node_out_of_file_descriptors_keeps_serving() {
    let dir =
        std::env::temp_dir().join(format!("gatehouse-e2e-node-limits-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("node.log");
    let port = free_port();
    // 64 descriptors: enough to start, soon exhausted by connections it accepts.
    let script = format!(
        "ulimit -n 64 && exec '{}' node --listen 127.0.0.1:{port} --data '{}'",
        gatehouse_bin().display(),
        dir.join("data").display()
    );
    let mut node = Proc(
        Command::new("sh")
            .args(["-c", &script])
            .env("GATEHOUSE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("the node to listen", || {
        read_log().contains("XMTP node listening").then_some(())
    });

    // More connections than it has descriptors for (the kernel queues them all).
    let held: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    wait_for("the node to report failed accepts", || {
        assert!(
            node.0.try_wait().unwrap().is_none(),
            "the node exited when it ran out of file descriptors:\n{}",
            read_log()
        );
        read_log()
            .contains("accepting a connection failed")
            .then_some(())
    });
    assert!(read_log().contains("Too many open files"), "{}", read_log());

    // Descriptors free again: a new client gets an HTTP/2 answer (the server's SETTINGS).
    drop(held);
    let mut answer = [0u8; 9];
    wait_for("the node to serve a new connection", || {
        let mut c = TcpStream::connect(("127.0.0.1", port)).ok()?;
        c.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").ok()?;
        c.read_exact(&mut answer).ok()
    });
    assert_eq!(answer[3], 0x4, "an HTTP/2 SETTINGS frame: {answer:02x?}");
    wait_for("the node to say it accepts again", || {
        read_log()
            .contains("accepting connections again")
            .then_some(())
    });
    assert!(node.0.try_wait().unwrap().is_none(), "{}", read_log());
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}
