//! The local admin API: plain HTTP/1.1 on a loopback address.
//!
//! `GET /endpoints` lists endpoint identities; `GET /status` gives version and counts;
//! `GET /live` answers 200 while the process serves;
//! `GET /ready` answers 200 while the daemon takes in messages and 503 with the reason when
//! it does not (short of disk space, store failed);
//! `GET /plugins` gives each plugin's limits, counters and quarantine state;
//! `GET /requests[?endpoint=E]` each endpoint's request queue; `GET /dead-letters[?route=R]
//! [&payloads=1]` the newest dead letters with their reasons; `POST /consent` with
//! `{"endpoint","target","state":"allow"|"deny"}` records an operator's decision;
//! `POST /plugins/reload` with `{"plugin": NAME}` loads a plugin's new version;
//! `POST /dead-letters/retry` and `/dead-letters/drop` with `{"ids": [..]}` or `{"all": true}`.
//! There is no authentication: the listener must be loopback (config validation enforces it),
//! so only local users can reach it.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::bridge::Bridge;

/// Answers a POST: `/consent` and `/plugins/reload`.
async fn answer_post(bridge: &Bridge, path: &str, v: &serde_json::Value) -> (&'static str, String) {
    let answer = |r: anyhow::Result<serde_json::Value>| match r {
        Ok(v) => ("200 OK", v.to_string()),
        Err(e) => (
            "400 Bad Request",
            serde_json::json!({"error": format!("{e:#}")}).to_string(),
        ),
    };
    match path {
        "/consent" => {
            let device = v["endpoint"].as_str().unwrap_or_default();
            let target = v["target"].as_str().unwrap_or_default();
            match v["state"].as_str() {
                Some("allow" | "allowed") => {
                    crate::metrics::consent("allow");
                    answer(bridge.decide(device, target, true).await)
                }
                Some("deny" | "denied") => {
                    crate::metrics::consent("deny");
                    answer(bridge.decide(device, target, false).await)
                }
                _ => (
                    "400 Bad Request",
                    r#"{"error":"state must be allow or deny"}"#.to_string(),
                ),
            }
        }
        "/plugins/reload" => match v["plugin"].as_str() {
            Some(name) => answer(bridge.reload(name).await),
            None => (
                "400 Bad Request",
                serde_json::json!({"error": "name the plugin: {\"plugin\": NAME}"}).to_string(),
            ),
        },
        "/dead-letters/retry" | "/dead-letters/drop" => {
            let all = v["all"].as_bool().unwrap_or(false);
            let ids: Vec<u64> = v["ids"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i.as_u64())
                .collect();
            if ids.is_empty() && !all {
                return (
                    "400 Bad Request",
                    r#"{"error":"name dead letters: {\"ids\": [ID, ...]} or {\"all\": true}"}"#
                        .to_string(),
                );
            }
            if path.ends_with("retry") {
                answer(bridge.retry_dead_letters(&ids, all).await)
            } else {
                answer(bridge.drop_dead_letters(&ids, all))
            }
        }
        _ => ("404 Not Found", r#"{"error":"not found"}"#.to_string()),
    }
}

/// Largest request head read; longer requests are refused.
const MAX_REQUEST: usize = 8192;

/// Serves until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    bridge: Arc<Bridge>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut pause = gatehouse_store::accept::Pause::default();
    loop {
        let (mut sock, _) = tokio::select! {
            _ = shutdown.changed() => return,
            s = pause.accept("admin", || listener.accept()) => s,
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
            let head_end = buf[..n]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map(|p| p + 4)
                .unwrap_or(n);
            let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
            let mut words = head.split_whitespace();
            let method = words.next().unwrap_or("GET").to_string();
            let target = words.next().unwrap_or("/").to_string();
            let (path, query) = target.split_once('?').unwrap_or((&target, ""));
            let param = |name: &str| {
                query
                    .split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            };
            let (status, body) = match (method.as_str(), path) {
                ("GET", "/consent") => (
                    "200 OK",
                    bridge
                        .consent_records(param("endpoint").as_deref())
                        .await
                        .to_string(),
                ),
                ("GET", "/requests") => (
                    "200 OK",
                    bridge
                        .requests(param("endpoint").as_deref())
                        .await
                        .to_string(),
                ),
                // Changes are POSTs with a JSON body: a web page cannot send those cross-origin
                // without a CORS preflight, which this API never answers.
                ("POST", path) => {
                    let json_body = head.lines().any(|l| {
                        l.to_ascii_lowercase()
                            .starts_with("content-type: application/json")
                    });
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    let mut body = buf[head_end..n].to_vec();
                    while body.len() < len.min(MAX_REQUEST) {
                        let mut more = [0u8; 1024];
                        match sock.read(&mut more).await {
                            Ok(0) | Err(_) => break,
                            Ok(k) => body.extend_from_slice(&more[..k]),
                        }
                    }
                    match serde_json::from_slice::<serde_json::Value>(&body) {
                        _ if !json_body => (
                            "415 Unsupported Media Type",
                            r#"{"error":"send content-type: application/json"}"#.to_string(),
                        ),
                        Ok(v) => answer_post(&bridge, path, &v).await,
                        Err(e) => (
                            "400 Bad Request",
                            serde_json::json!({"error": format!("bad JSON: {e}")}).to_string(),
                        ),
                    }
                }
                ("GET", "/dead-letters") => (
                    "200 OK",
                    bridge
                        .dead_letters(
                            param("route").as_deref(),
                            param("payloads").is_some_and(|v| v == "1" || v == "true"),
                        )
                        .to_string(),
                ),
                (_, p) => match p {
                    "/endpoints" => (
                        "200 OK",
                        serde_json::to_string(&bridge.endpoints()).unwrap_or_default(),
                    ),
                    "/status" => ("200 OK", bridge.status().to_string()),
                    // For liveness probes: the process serves requests.
                    "/live" => ("200 OK", r#"{"live":true}"#.to_string()),
                    // For probes: 200 when taking in messages, 503 (with the reason) when not.
                    "/ready" => match bridge.not_ready() {
                        None => ("200 OK", r#"{"ready":true}"#.to_string()),
                        Some(reason) => (
                            "503 Service Unavailable",
                            serde_json::json!({"ready": false, "reason": reason}).to_string(),
                        ),
                    },
                    "/plugins" => ("200 OK", bridge.plugins().to_string()),
                    "/routes" => ("200 OK", bridge.routes().to_string()),
                    "/metrics" => ("200 OK", bridge.metrics_text()),
                    _ => ("404 Not Found", r#"{"error":"not found"}"#.to_string()),
                },
            };
            // Prometheus' text exposition format for /metrics; JSON for everything else.
            let content_type = if path == "/metrics" && status == "200 OK" {
                "text/plain; version=0.0.4; charset=utf-8"
            } else {
                "application/json"
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}

/// `POST path` with a JSON body against the admin API; returns the body (errors carry the
/// API's message).
pub async fn post(
    addr: std::net::SocketAddr,
    path: &str,
    body: &serde_json::Value,
) -> anyhow::Result<String> {
    let body = body.to_string();
    request(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await
}

/// `GET path` against the admin API; returns the body.
pub async fn get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"),
    )
    .await
}

/// Sends one request; returns the body of a 200 answer, else the API's error message.
async fn request(addr: std::net::SocketAddr, raw: &str) -> anyhow::Result<String> {
    use anyhow::Context;
    let mut sock = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot reach the daemon's admin API at {addr}: is `gatehouse run` running with this config?"))?;
    sock.write_all(raw.as_bytes()).await?;
    let mut resp = String::new();
    sock.read_to_string(&mut resp).await?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .context("malformed admin response")?;
    if !head.starts_with("HTTP/1.1 200") {
        let msg = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"].as_str().map(String::from))
            .unwrap_or_else(|| format!("admin API: {}", head.lines().next().unwrap_or("")));
        anyhow::bail!("{msg}");
    }
    Ok(body.to_string())
}
