//! Export file downloads: the content codings offered (zstd, gzip), their bytes the same on every
//! download, and the bounded pool of download streams (one more waits, then gets 429).

mod common;

use std::io::Read;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use bulkhead_http::HttpConfig;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use common::{assert_outcome, assert_status, get, local, put, test_config, Client, Server};

/// `patients` Patients with three Observations each, in a Group "g"; returns the Observation
/// file's URL of a fresh export.
async fn cohort(server: &Server, client: &Client, patients: usize) -> String {
    let mut members = Vec::new();
    for p in 0..patients {
        let patient = json!({"resourceType": "Patient", "id": format!("p{p}"), "gender": "female"});
        assert!(server.send(put(&format!("/r4/Patient/p{p}")).by(client).json(&patient)).await.status.is_success());
        for o in 0..3 {
            let observation = json!({"resourceType": "Observation", "id": format!("o{p}-{o}"), "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                "subject": {"reference": format!("Patient/p{p}")}, "valueQuantity": {"value": o, "unit": "/min"}});
            let path = format!("/r4/Observation/o{p}-{o}");
            assert!(server.send(put(&path).by(client).json(&observation)).await.status.is_success());
        }
        members.push(json!({"entity": {"reference": format!("Patient/p{p}")}}));
    }
    let group = json!({"resourceType": "Group", "id": "g", "type": "person", "actual": true, "member": members});
    assert!(server.send(put("/r4/Group/g").by(client).json(&group)).await.status.is_success());
    let manifest = server.send(get("/bulk-data/r4/Group/g/$export?_type=Observation").by(client)).await;
    assert_status(&manifest, 200);
    let manifest: Value = manifest.json();
    assert_eq!(manifest["output"][0]["count"], json!(patients * 3));
    local(manifest["output"][0]["url"].as_str().unwrap())
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes).read_to_end(&mut out).expect("valid gzip");
    out
}

#[tokio::test]
async fn zstd_and_gzip_are_negotiated_and_decode_to_the_same_file_every_time() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let url = cohort(&server, &client, 20).await;
    let plain = server.send(get(&url).by(&client)).await;
    assert_status(&plain, 200);
    assert!(plain.headers.get("content-encoding").is_none());
    assert_eq!(plain.header("vary"), "accept-encoding");
    assert_eq!(plain.text().lines().count(), 60);

    let cases = [
        ("zstd", "zstd"),
        ("gzip, deflate, br, zstd", "zstd"),
        ("gzip;q=1.0, zstd;q=0.5", "gzip"),
        ("zstd;q=0, gzip", "gzip"),
        ("gzip", "gzip"),
    ];
    for (accept, expected) in cases {
        let first = server.send(get(&url).by(&client).header("accept-encoding", accept)).await;
        assert_status(&first, 200);
        assert_eq!(first.header("content-encoding"), expected, "Accept-Encoding: {accept}");
        assert_eq!(first.header("vary"), "accept-encoding");
        let decoded = match expected {
            "zstd" => zstd::stream::decode_all(&first.body[..]).expect("valid zstd"),
            _ => gunzip(&first.body),
        };
        assert!(decoded == plain.body, "{accept}: decodes to other bytes than the plain file");
        assert!(first.body.len() < plain.body.len(), "{accept}: compressed");
        let again = server.send(get(&url).by(&client).header("accept-encoding", accept)).await;
        assert!(again.body == first.body, "{accept}: the same file downloads to different bytes");
    }
}

/// Starts a download and returns its response with the body not read: the stream stays open.
async fn open_download(server: &Server, client: &Client, url: &str) -> axum::response::Response {
    let request = Request::builder()
        .uri(url)
        .header("client_id", &client.id)
        .header("client_secret", &client.secret)
        .body(Body::empty())
        .unwrap();
    server.app.clone().oneshot(request).await.unwrap()
}

#[tokio::test]
async fn a_download_beyond_the_pool_gets_429_with_retry_after_and_the_others_complete() {
    let config = HttpConfig { max_concurrent_downloads: 2, download_queue_wait: Duration::ZERO, ..test_config() };
    let server = Server::with_config(config);
    let client = server.tenant_client("acme");
    let url = cohort(&server, &client, 5).await;
    let expected = server.send(get(&url).by(&client)).await;
    assert_status(&expected, 200);

    // Two streams open (their bodies not read yet): the pool is full.
    let first = open_download(&server, &client, &url).await;
    let second = open_download(&server, &client, &url).await;
    assert_eq!((first.status().as_u16(), second.status().as_u16()), (200, 200));
    let refused = server.send(get(&url).by(&client)).await;
    let outcome = assert_outcome(&refused, 429, "throttled", None);
    assert!(outcome["issue"][0]["diagnostics"].as_str().unwrap().contains("retry after"), "{outcome}");
    assert_eq!(refused.header("retry-after"), "1");

    // The open streams still deliver whole files; once one is read, the pool has room again.
    let first = first.into_body().collect().await.unwrap().to_bytes();
    assert!(first == expected.body, "a pooled download delivered other bytes");
    let third = server.send(get(&url).by(&client)).await;
    assert_status(&third, 200);
    assert!(third.body == expected.body);
    let second = second.into_body().collect().await.unwrap().to_bytes();
    assert!(second == expected.body);
}

#[tokio::test]
async fn a_download_beyond_the_pool_waits_for_a_stream_when_the_queue_allows() {
    let config =
        HttpConfig { max_concurrent_downloads: 1, download_queue_wait: Duration::from_secs(30), ..test_config() };
    let server = Server::with_config(config);
    let client = server.tenant_client("acme");
    let url = cohort(&server, &client, 5).await;
    let expected = server.send(get(&url).by(&client)).await;
    assert_status(&expected, 200);

    let holder = open_download(&server, &client, &url).await;
    assert_status(&common::Reply { status: holder.status(), headers: holder.headers().clone(), body: vec![] }, 200);
    let waiting = tokio::spawn({
        let app = server.app.clone();
        let request = Request::builder()
            .uri(&url)
            .header("client_id", &client.id)
            .header("client_secret", &client.secret)
            .body(Body::empty())
            .unwrap();
        async move {
            let response = app.oneshot(request).await.unwrap();
            let status = response.status().as_u16();
            (status, response.into_body().collect().await.unwrap().to_bytes())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the second download must wait while the only stream is taken");
    // Reading the first download to its end frees its stream: the waiting one gets it.
    let held = holder.into_body().collect().await.unwrap().to_bytes();
    assert!(held == expected.body);
    let (status, body) = tokio::time::timeout(Duration::from_secs(20), waiting).await.expect("served").unwrap();
    assert_eq!(status, 200);
    assert!(body == expected.body, "the queued download delivered other bytes");
}
