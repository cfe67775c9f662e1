//! The local admin API: plain HTTP/1.1 on a loopback address, read-only for now.
//!
//! `GET /endpoints` lists endpoint identities; `GET /status` gives version and counts;
//! `GET /plugins` gives each plugin's limits, counters and quarantine state.
//! There is no authentication: the listener must be loopback (config validation enforces it),
//! so only local users can reach it.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::bridge::Bridge;

/// Largest request head read; longer requests are refused.
const MAX_REQUEST: usize = 8192;

/// Serves until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    bridge: Arc<Bridge>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (mut sock, _) = tokio::select! {
            _ = shutdown.changed() => return,
            r = listener.accept() => match r { Ok(s) => s, Err(e) => { tracing::warn!(error = %e, "admin accept failed"); continue } },
        };
        let bridge = bridge.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_REQUEST];
            let mut n = 0;
            while n < buf.len() {
                match sock.read(&mut buf[n..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match path {
                "/endpoints" => (
                    "200 OK",
                    serde_json::to_string(&bridge.endpoints()).unwrap_or_default(),
                ),
                "/status" => ("200 OK", bridge.status().to_string()),
                "/plugins" => ("200 OK", bridge.plugins().to_string()),
                _ => ("404 Not Found", r#"{"error":"not found"}"#.to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}

/// `GET path` against the admin API; returns the body.
pub async fn get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    use anyhow::Context;
    let mut sock = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot reach the daemon's admin API at {addr}: is `gatehouse run` running with this config?"))?;
    sock.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut resp = String::new();
    sock.read_to_string(&mut resp).await?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .context("malformed admin response")?;
    if !head.starts_with("HTTP/1.1 200") {
        anyhow::bail!("admin API: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}
