//! Black-box tests (tier 3) of clients that try to pin or flood the server (issue 7 §3): slow-loris
//! connections, more connections than the cap, and requests designed to flood the log or leak a
//! token into it. The real binary, over real sockets, with short timeouts configured.

#[allow(unused_imports)]
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How a slow connection ended, seen from the client.
#[derive(Debug)]
struct Ended {
    /// Time from connecting until the server closed the connection.
    after: Duration,
    /// What the server sent before closing.
    received: String,
}

/// Connects, sends `head`, then one byte of `drip` every `interval` until the server closes the
/// connection (or `give_up` passes: then the connection counts as never closed).
async fn trickle(port: u16, head: Vec<u8>, drip: u8, interval: Duration, give_up: Duration) -> Option<Ended> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.expect("connecting");
    let mut received = Vec::new();
    if !head.is_empty() && stream.write_all(&head).await.is_err() {
        return Some(Ended { after: started.elapsed(), received: String::new() });
    }
    let mut buffer = [0u8; 4096];
    while started.elapsed() < give_up {
        tokio::select! {
            read = stream.read(&mut buffer) => match read {
                Ok(0) | Err(_) => {
                    return Some(Ended { after: started.elapsed(), received: String::from_utf8_lossy(&received).into() });
                }
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            },
            _ = tokio::time::sleep(interval) => {
                if drip != 0 && stream.write_all(&[drip]).await.is_err() {
                    return Some(Ended { after: started.elapsed(), received: String::from_utf8_lossy(&received).into() });
                }
            }
        }
    }
    None
}

const HEADER_TIMEOUT: u64 = 2;
const BODY_IDLE_TIMEOUT: u64 = 2;
const REQUEST_TIMEOUT: u64 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_loris_connections_are_closed_while_others_are_answered() {
    let config = format!(
        "header_read_timeout_seconds = {HEADER_TIMEOUT}\nbody_idle_timeout_seconds = {BODY_IDLE_TIMEOUT}\n\
         request_timeout_seconds = {REQUEST_TIMEOUT}\nmax_connections = 64\n"
    );
    let server = Server::start_with(Options { config_toml: Some(config), ..Options::default() }).await;
    server.create_tenant("acme");
    let api = server.create_client("acme");
    let port = server.port;
    let give_up = Duration::from_secs(REQUEST_TIMEOUT + 6);
    let drip = Duration::from_millis(250);

    let mut slow = Vec::new();
    // 12 that trickle their headers, never finishing them.
    for _ in 0..12 {
        let head = b"GET /r4/Patient HTTP/1.1\r\nhost: x\r\nx-slow: ".to_vec();
        slow.push(("headers", tokio::spawn(trickle(port, head, b'a', drip, give_up))));
    }
    // 10 that connect and send nothing.
    for _ in 0..10 {
        slow.push(("idle", tokio::spawn(trickle(port, Vec::new(), 0, drip, give_up))));
    }
    // 10 authenticated uploads that trickle their body: never idle long, but never done.
    for _ in 0..10 {
        let head = format!(
            "POST /r4/Patient HTTP/1.1\r\nhost: x\r\nclient_id: {}\r\nclient_secret: {}\r\n\
             content-type: application/fhir+json\r\ncontent-length: 100000\r\n\r\n{{",
            api.client_id, api.client_secret
        );
        slow.push(("body", tokio::spawn(trickle(port, head.into_bytes(), b' ', drip, give_up))));
    }

    // Meanwhile a normal client, on a fresh connection each time, is answered promptly.
    let http = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(0).build().expect("http client");
    let normal = Api { http, ..api.clone() };
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(REQUEST_TIMEOUT + 2) {
        let asked = Instant::now();
        let reply = tokio::time::timeout(Duration::from_secs(5), normal.get("/r4/Patient")).await;
        let reply = reply.expect("a normal request was not answered within 5 s");
        assert_eq!(reply.status, 200, "{}", reply.text());
        slowest = slowest.max(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(slowest < Duration::from_secs(2), "a normal request took {slowest:?} beside 32 slow connections");

    for (kind, handle) in slow {
        let ended =
            handle.await.expect("trickle task").unwrap_or_else(|| panic!("a {kind} connection was never closed"));
        let timeout = if kind == "body" { REQUEST_TIMEOUT } else { HEADER_TIMEOUT };
        let window = Duration::from_secs(timeout) - Duration::from_millis(300)..Duration::from_secs(timeout + 3);
        assert!(window.contains(&ended.after), "a {kind} connection closed after {:?}, not ~{timeout} s", ended.after);
        if kind == "body" {
            assert!(ended.received.starts_with("HTTP/1.1 408"), "{}", ended.received);
            assert!(ended.received.contains("OperationOutcome"), "{}", ended.received);
        }
    }
}

#[tokio::test]
async fn a_connection_over_the_cap_gets_a_503_operation_outcome() {
    // A long header timeout: the idle connections must still be open when the fifth arrives,
    // however slow the machine.
    let config = "max_connections = 4\nheader_read_timeout_seconds = 30\n".to_owned();
    let server = Server::start_with(Options { config_toml: Some(config), ..Options::default() }).await;
    // Four idle connections that the server holds open. The harness's readiness probe may still
    // hold a slot for a moment, so one of ours can be refused (closed within 1 s): replace any
    // that closed until four stay open.
    let mut idle: Vec<TcpStream> = Vec::new();
    for _ in 0..5 {
        while idle.len() < 4 {
            idle.push(TcpStream::connect(("127.0.0.1", server.port)).await.expect("connecting"));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut probe = [0u8; 1];
        idle.retain(|stream| matches!(stream.try_read(&mut probe), Err(error) if error.kind() == std::io::ErrorKind::WouldBlock));
        if idle.len() == 4 {
            break;
        }
    }
    assert_eq!(idle.len(), 4, "four idle connections did not stay open");
    let http = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(0).build().expect("http client");
    let response = http.get(format!("{}/healthz", server.base)).send().await.expect("an answer, not a reset");
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(response.headers()["content-type"], "application/fhir+json");
    let outcome: Value = response.json().await.expect("JSON");
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_eq!(outcome["issue"][0]["code"], "transient");
    // Once the idle ones are gone, there is room again.
    drop(idle);
    let started = Instant::now();
    loop {
        let response = http.get(format!("{}/healthz", server.base)).send().await.expect("an answer");
        if response.status() == 200 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no room 10 s after the idle connections closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_log_holds_no_token_secret_or_flood() {
    let server = Server::start().await;
    server.create_tenant("acme");
    let api = server.create_client("acme");
    let patient = api.create(&patient(None, "Chalmers")).await;
    let group = api.create(&group(None, &[&patient])).await;
    let manifest = api.get(&format!("/bulk-data/r4/Group/{group}/$export")).await.expect(200);
    let url = manifest["output"][0]["url"].as_str().expect("a file URL").to_owned();
    let file = url.rsplit('/').next().expect("a file name").to_owned();
    let token = file.strip_suffix(".ndjson").expect("a .ndjson file").to_owned();
    let signature = token.rsplit('.').next().expect("a token signature").to_owned();
    let payload = token.split('.').nth(1).expect("a token payload").to_owned();
    assert!(token.len() >= 60 && signature.len() >= 40 && payload.len() >= 20, "{token}");

    // Mistyped and mis-routed variants of the file URL, with and without credentials.
    let anonymous = api.with_secret("", "");
    let targets = [
        url.clone(),
        format!("/bulk-data/r4/$export/Patient/{token}"),
        format!("/bulk-data/r4/$export/Observation/{file}"),
        format!("/bulk-data/r4/export/Patient/{file}"),
        format!("/r4/$export/Patient/{file}"),
        format!("/r4/Patient/{token}"),
        format!("/r4/Patient/{token}/_history/1"),
        format!("/r4/Patient?_id={token}"),
        format!("/bulk-data/r4/$export-status/{token}"),
        format!("/r4/Patient/x/{file}"),
    ];
    for target in &targets {
        for client in [&api, &anonymous] {
            let reply = client.get(target).await;
            assert!(reply.status < 500, "{target}: {}", reply.status);
        }
        let request = api.request(reqwest::Method::GET, target).header("x-request-id", token.as_str());
        Api::send(request).await;
    }
    // A secret sent as the client id (swapped headers), and a 60 KiB client id, many times.
    let swapped = api.with_secret(&api.client_secret, &api.client_id);
    assert_eq!(swapped.get("/r4/Patient").await.status, 401);
    let long_id = "A".repeat(60 * 1024);
    let flood = api.with_secret(&long_id, "wrong");
    for _ in 0..15 {
        assert!(matches!(flood.get("/r4/Patient").await.status, 401 | 429));
    }

    let log = server.log();
    for (what, secret) in [
        ("file token", token.as_str()),
        ("token payload", &payload),
        ("token signature", &signature),
        ("client secret", &api.client_secret),
    ] {
        assert!(!log.contains(secret), "the log holds the {what}:\n{log}");
    }
    assert!(!log.contains(&"A".repeat(200)), "the log holds the long client id");
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 2048, "a log line of {longest} bytes");
    assert!(log.len() < 256 * 1024, "the log grew to {} bytes", log.len());
    assert!(log.contains("authentication failed"), "failed logins are still logged:\n{log}");
}
