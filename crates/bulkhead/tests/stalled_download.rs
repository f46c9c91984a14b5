//! Black-box tests (tier 3): a download whose client stops reading must neither pin the
//! database (the WAL stays small while writers keep writing) nor hold the server forever (it
//! is disconnected after `download_stall_timeout_seconds`).

#[allow(unused_imports)] // not every helper is used here
mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const MEMBERS: usize = 20;

/// An Observation of about `fill` bytes.
fn big_observation(id: &str, patient: &str, fill: usize, value: usize) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "valueString": format!("{value} {}", "heart rate trend ".repeat(fill / 17))})
}

/// Imports `observations` Observations of ~8 KiB about 20 members (one export file of
/// `observations` × 8 KiB), creates the Group `cohort` of them and exports its Observations.
/// Returns the client and the Observation file's URL.
async fn load_and_export(server: &Server, observations: usize) -> (Api, String) {
    server.create_tenant("acme");
    let api = server.create_client("acme");
    let dir = tempfile::tempdir().expect("temporary directory");
    let patients: Vec<String> = (0..MEMBERS)
        .map(|i| json!({"resourceType": "Patient", "id": format!("m{i}"), "gender": "female"}).to_string())
        .chain(std::iter::once(json!({"resourceType": "Patient", "id": "outsider"}).to_string()))
        .collect();
    std::fs::write(dir.path().join("Patient.ndjson"), patients.join("\n")).expect("writing patients");
    let lines: Vec<String> = (0..observations)
        .map(|n| big_observation(&format!("big-{n}"), &format!("m{}", n % MEMBERS), 8 * 1024, n).to_string())
        .collect();
    std::fs::write(dir.path().join("Observation.ndjson"), lines.join("\n")).expect("writing observations");
    server.cli(&["import", "--tenant", "acme", dir.path().to_str().expect("utf-8 path")]);
    let members: Vec<String> = (0..MEMBERS).map(|i| format!("m{i}")).collect();
    let members: Vec<&str> = members.iter().map(String::as_str).collect();
    api.upsert(&group(Some("cohort"), &members)).await;
    let kick_off = format!("{}/bulk-data/r4/Group/cohort/$export?_type=Observation", server.base);
    let manifest = Api::send(api.request(reqwest::Method::GET, &kick_off).header("accept", "application/fhir+json"))
        .await
        .expect(200);
    let output = manifest["output"].as_array().expect("output[]");
    assert_eq!(output.len(), 1, "one Observation file: {manifest}");
    assert_eq!(output[0]["count"], observations as u64);
    (api, output[0]["url"].as_str().expect("url").to_owned())
}

/// Starts downloading `url` on a socket with a small receive buffer, and reads nothing.
async fn start_stalled_download(api: &Api, url: &str) -> TcpStream {
    let url = reqwest::Url::parse(url).expect("file URL");
    let address: SocketAddr = format!("127.0.0.1:{}", url.port().expect("port")).parse().expect("address");
    let socket = TcpSocket::new_v4().expect("socket");
    // Small, so the kernel holds little of the file on our side (it would otherwise grow the
    // window to many MiB and read for us).
    socket.set_recv_buffer_size(16 * 1024).expect("SO_RCVBUF");
    let mut stream = socket.connect(address).await.expect("connecting");
    let request = format!(
        "GET {} HTTP/1.1\r\nhost: {}\r\nclient_id: {}\r\nclient_secret: {}\r\nconnection: close\r\n\r\n",
        url.path(),
        address,
        api.client_id,
        api.client_secret
    );
    stream.write_all(request.as_bytes()).await.expect("sending the request");
    stream
}

/// Reads the rest of a download until the server closes: the status code, the decoded body,
/// and whether the chunked body ended properly (its last chunk arrived).
async fn finish_download(mut stream: TcpStream) -> (u16, Vec<u8>, bool) {
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), async {
        let mut buffer = vec![0u8; 256 * 1024];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => raw.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server neither finished nor closed the download");
    let head_end = raw.windows(4).position(|window| window == b"\r\n\r\n").expect("a complete response head");
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let status = head.split(' ').nth(1).and_then(|code| code.parse().ok()).expect("status code");
    assert!(head.contains("transfer-encoding: chunked"), "a streamed body: {head}");
    let (body, complete) = decode_chunked(&raw[head_end + 4..]);
    (status, body, complete)
}

fn decode_chunked(mut data: &[u8]) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = data.windows(2).position(|window| window == b"\r\n") else { return (body, false) };
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16).expect("chunk size");
        data = &data[line_end + 2..];
        if size == 0 {
            return (body, true);
        }
        if data.len() < size + 2 {
            body.extend_from_slice(&data[..size.min(data.len())]);
            return (body, false);
        }
        body.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Samples the WAL's size every 20 ms until stopped; returns the largest seen.
fn watch_wal(data_dir: &Path) -> (Arc<AtomicBool>, tokio::task::JoinHandle<u64>) {
    let wal = data_dir.join("bulkhead.db-wal");
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let watcher = tokio::spawn(async move {
        let mut largest = 0;
        while !stopped.load(Ordering::Relaxed) {
            largest = largest.max(std::fs::metadata(&wal).map_or(0, |metadata| metadata.len()));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        largest
    });
    (stop, watcher)
}

/// One writer for `duration`: creates new Observations in the cohort, and updates, moves out
/// of the cohort and deletes the exported ones (so the file's rest must come from history).
/// Returns how many writes succeeded; fails on any that did not.
async fn write_for(api: Api, writer: usize, observations: usize, duration: Duration) -> u64 {
    let started = Instant::now();
    let mut done = 0u64;
    while started.elapsed() < duration {
        let n = (writer * 7_919 + done as usize * 104_729) % observations;
        let id = format!("big-{n}");
        let member = format!("m{}", (n + writer) % MEMBERS);
        let reply = match done % 4 {
            0 => {
                let mut created = big_observation("new", &member, 4 * 1024, n);
                created.as_object_mut().map(|body| body.remove("id"));
                api.post("/r4/Observation", &created).await
            }
            1 => api.put(&format!("/r4/Observation/{id}"), &big_observation(&id, &member, 4 * 1024, n + 1)).await,
            2 => api.put(&format!("/r4/Observation/{id}"), &big_observation(&id, "outsider", 4 * 1024, n)).await,
            _ => api.delete(&format!("/r4/Observation/{id}")).await,
        };
        assert!((200..300).contains(&reply.status), "writer {writer}: {} {}", reply.status, reply.text());
        done += 1;
    }
    done
}

/// The scenario: a client starts downloading a 24 MB file and stops reading (socket
/// open), while 8 writers write for 30 s. The WAL must stay under 64 MiB throughout and every
/// write succeed; the download, read to its end afterwards, is byte-identical to one made
/// before the writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_download_does_not_pin_the_wal_and_resumes_exactly() {
    const OBSERVATIONS: usize = 3_000;
    let server = Server::start().await;
    let (api, url) = load_and_export(&server, OBSERVATIONS).await;
    let unstalled = api.get(&url).await;
    assert_eq!(unstalled.status, 200);
    assert!(unstalled.body.len() > 20 << 20, "the file is many MB: {}", unstalled.body.len());

    let stalled = start_stalled_download(&api, &url).await;
    // Let the server fill every buffer between it and us, and block.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (stop, watcher) = watch_wal(&server.data_dir);
    let writers: Vec<_> = (0..8)
        .map(|writer| tokio::spawn(write_for(api.clone(), writer, OBSERVATIONS, Duration::from_secs(30))))
        .collect();
    let mut writes = 0;
    for writer in writers {
        writes += writer.await.expect("writer task");
    }
    stop.store(true, Ordering::Relaxed);
    let largest_wal = watcher.await.expect("watcher task");
    eprintln!("{writes} writes in 30 s; the WAL reached {} KiB", largest_wal >> 10);
    assert!(writes > 1_000, "the writers kept writing: {writes} writes");
    assert!(largest_wal < 64 << 20, "the WAL reached {} MiB during {writes} writes", largest_wal >> 20);

    let (status, body, complete) = finish_download(stalled).await;
    assert_eq!(status, 200);
    assert!(complete, "the resumed download ended properly");
    assert_eq!(body.len(), unstalled.body.len());
    assert!(body == unstalled.body, "the resumed download is byte-identical to the unstalled one");
    assert!(!server.log().contains("ended early"), "{}", server.log());
}

/// With `download_stall_timeout_seconds = 2`, a client that stops reading is disconnected: read
/// afterwards, its download ends without its last chunk, and the server's producing thread has
/// given up (it logs so).
#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_after_the_stall_timeout() {
    const OBSERVATIONS: usize = 1_500;
    let server = Server::start_with(Options {
        env: vec![("BULKHEAD_DOWNLOAD_STALL_TIMEOUT_SECONDS".into(), "2".into())],
        ..Default::default()
    })
    .await;
    let (api, url) = load_and_export(&server, OBSERVATIONS).await;
    let whole = api.get(&url).await;
    assert_eq!(whole.status, 200, "a client that reads gets the whole file");

    let stalled = start_stalled_download(&api, &url).await;
    let started = Instant::now();
    while !server.log().contains("ended early") {
        assert!(started.elapsed() < Duration::from_secs(20), "the download was not given up:\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(started.elapsed() >= Duration::from_secs(2), "not before the stall timeout");
    assert!(server.log().contains("client stopped reading"), "{}", server.log());
    let (status, body, complete) = finish_download(stalled).await;
    assert_eq!(status, 200);
    assert!(!complete, "a disconnected download must not look complete");
    assert!(body.len() < whole.body.len(), "{} of {} bytes", body.len(), whole.body.len());
    assert!(whole.body.starts_with(&body), "what arrived is the file's beginning");
}
