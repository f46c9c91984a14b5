//! Tier-2 tests of the output store: asynchronous exports materialised as NDJSON objects in a
//! real S3-speaking server (moto_server, started by `scripts/with-s3`, which sets
//! `BULKHEAD_TEST_S3_ENDPOINT`). Without it these tests skip with a loud message, unless `CI` is
//! set: then they fail.
//!
//! What they prove: the manifest of a materialised export lists every resource exactly once
//! (the same lines a streamed export of the same data gives), each item's size and SHA-256
//! match the object's bytes, Bulkhead URLs need credentials and presigned ones do not (and
//! expire no later than the job), and a job's objects are gone after `DELETE`, after expiry, and
//! after a failure midway.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_export::PlanStep;
use bulkhead_http::export_status::Planners;
use bulkhead_http::object_output::{OutputSettings, OutputStore};
use bulkhead_http::HttpConfig;
use bulkhead_store::{StoreError, TenantId};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use common::*;

const EXTENSION: &str = "https://bulkhead.example/fhir/bulk-data/extension/output-object";
const STATUS_PREFIX: &str = "http://bulkhead.test/bulk-data/r4/$export-status/";

/// The test server's endpoint, or `None` (with a loud message) when there is none outside CI.
fn s3_endpoint() -> Option<String> {
    match std::env::var("BULKHEAD_TEST_S3_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => Some(endpoint),
        _ if std::env::var_os("CI").is_some() => {
            panic!("BULKHEAD_TEST_S3_ENDPOINT is unset in CI: run the tests through scripts/with-s3")
        }
        _ => {
            // Straight to the process's stderr: the harness captures `eprintln!` of passing tests.
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                b"\n*** SKIPPED: S3 output tests need an S3 server; run them as \
                  `scripts/with-s3 cargo test -p bulkhead-http --test s3_output` ***\n",
            );
            None
        }
    }
}

/// A fresh bucket on the test server (moto takes an unsigned `PUT /bucket`).
async fn bucket(endpoint: &str) -> String {
    let name = format!("bulkhead-{}", uuid::Uuid::new_v4().simple());
    let response = reqwest::Client::new().put(format!("{endpoint}/{name}")).send().await.expect("create bucket");
    assert!(response.status().is_success(), "creating bucket {name}: {}", response.status());
    name
}

/// Keys under `prefix` in the bucket (moto answers unsigned listings).
async fn keys(endpoint: &str, bucket: &str, prefix: &str) -> Vec<String> {
    let url = format!("{endpoint}/{bucket}?list-type=2&prefix={prefix}");
    let body = reqwest::get(url).await.expect("list").text().await.expect("listing");
    body.split("<Key>").skip(1).filter_map(|rest| rest.split_once("</Key>")).map(|(key, _)| key.to_owned()).collect()
}

fn output_store(endpoint: &str, bucket: &str, presigned_urls: bool) -> Arc<OutputStore> {
    let settings = OutputSettings {
        url: format!("s3://{bucket}/exports"),
        endpoint: Some(endpoint.to_owned()),
        region: Some("us-east-1".into()),
        access_key_id: Some("bulkhead-test".into()),
        secret_access_key: Some("bulkhead-test-secret".into()),
        allow_http: Some(true),
        presigned_urls,
    };
    Arc::new(OutputStore::connect(&settings).expect("output store"))
}

/// Small parts, so one type spans several files.
fn config() -> HttpConfig {
    HttpConfig { export_part_size: 2, ..test_config() }
}

fn observation(patient_id: &str, value: i64) -> Value {
    json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
           "valueQuantity": {"value": value}, "subject": {"reference": format!("Patient/{patient_id}")}})
}

/// A tenant whose Group has three members with two Observations each.
async fn populated(server: &Server, name: &str) -> (TenantId, Client, String) {
    let tenant = server.tenant(name);
    let client = server.client(tenant);
    let mut members = Vec::new();
    for (index, family) in ["One", "Two", "Three"].into_iter().enumerate() {
        let id = id_of(&server.create(&client, patient(family)).await);
        for value in 0..2 {
            server.create(&client, observation(&id, index as i64 * 10 + value)).await;
        }
        members.push(id);
    }
    let refs: Vec<&str> = members.iter().map(String::as_str).collect();
    let group = id_of(&server.create(&client, group_of(&refs)).await);
    (tenant, client, group)
}

/// Kicks an asynchronous export off and returns its job id.
async fn kick_off(server: &Server, client: &Client, group: &str) -> String {
    let reply = server.send(get(&format!("/bulk-data/r4/Group/{group}/$export")).by(client).respond_async()).await;
    assert_status(&reply, 202);
    let location = reply.header("content-location");
    location.strip_prefix(STATUS_PREFIX).unwrap_or_else(|| panic!("{location}")).to_owned()
}

/// Polls the job until it is no longer 202.
async fn finished(server: &Server, client: &Client, job: &str) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reply = server.send(get(&format!("/bulk-data/r4/$export-status/{job}")).by(client)).await;
        if reply.status != 202 || Instant::now() > deadline {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Checks an item's bytes against its extension and count; returns its lines.
fn checked_lines(item: &Value, bytes: &[u8]) -> Vec<String> {
    let object = &item["extension"][EXTENSION];
    assert_eq!(object["size"], json!(bytes.len()), "size of {item}");
    assert_eq!(object["sha256"], json!(sha256_hex(bytes)), "SHA-256 of {item}");
    let lines: Vec<String> = String::from_utf8(bytes.to_vec()).expect("UTF-8").lines().map(str::to_owned).collect();
    assert_eq!(json!(lines.len()), item["count"], "{item}");
    lines
}

/// The lines of a synchronous (streamed) export of the same Group.
async fn streamed_lines(server: &Server, client: &Client, group: &str) -> Vec<String> {
    let reply = server.send(get(&format!("/bulk-data/r4/Group/{group}/$export")).by(client)).await;
    assert_status(&reply, 200);
    let manifest = reply.json();
    for item in manifest["output"].as_array().expect("output") {
        assert!(item["url"].as_str().unwrap().contains("/bulk-data/r4/$export/"), "the synchronous manner streams");
        assert!(item.get("extension").is_none());
    }
    let mut lines: Vec<String> =
        server.output_lines(client, &manifest).await.into_iter().map(|(line, _)| line).collect();
    lines.sort();
    lines
}

fn sorted_unique(lines: Vec<String>) -> Vec<String> {
    let unique: BTreeSet<&String> = lines.iter().collect();
    assert_eq!(unique.len(), lines.len(), "a resource was exported twice");
    let mut lines = lines;
    lines.sort();
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_exports_are_materialised_with_sizes_and_hashes_and_deleted_with_the_job() {
    let Some(endpoint) = s3_endpoint() else { return };
    let bucket = bucket(&endpoint).await;
    let output = output_store(&endpoint, &bucket, false);
    let server = Server::with_state(config(), |state| state.output = Some(output));
    let (tenant, client, group) = populated(&server, "acme").await;

    let job = kick_off(&server, &client, &group).await;
    let reply = finished(&server, &client, &job).await;
    assert_status(&reply, 200);
    let manifest = reply.json();
    assert_eq!(manifest["requiresAccessToken"], json!(true), "Bulkhead URLs need credentials");
    let items = manifest["output"].as_array().expect("output");
    assert!(items.len() >= 4, "Patient and Observation span several files: {manifest}");
    let prefix = format!("exports/{}/{job}/", tenant.0);
    assert_eq!(keys(&endpoint, &bucket, &prefix).await.len(), items.len(), "one object per file");

    let mut lines = Vec::new();
    for item in items {
        let url = item["url"].as_str().unwrap();
        assert!(url.contains("/bulk-data/r4/$export-object/"), "{url}");
        let anonymous = server.send(get(&local(url))).await;
        assert_status(&anonymous, 401);
        let reply = server.send(get(&local(url)).by(&client)).await;
        assert_status(&reply, 200);
        assert_eq!(reply.header("content-type"), "application/fhir+ndjson");
        lines.extend(checked_lines(item, &reply.body));
    }
    assert_eq!(sorted_unique(lines), streamed_lines(&server, &client, &group).await, "the same resources, each once");

    // Another tenant's client cannot read them.
    let stranger = server.tenant_client("other");
    let url = items[0]["url"].as_str().unwrap();
    assert_status(&server.send(get(&local(url)).by(&stranger)).await, 404);

    let deleted = server.send(delete(&format!("/bulk-data/r4/$export-status/{job}")).by(&client)).await;
    assert_status(&deleted, 202);
    assert!(keys(&endpoint, &bucket, &prefix).await.is_empty(), "DELETE removes the objects");
    assert_status(&server.send(get(&local(url)).by(&client)).await, 404);
    assert_status(&server.send(get(&format!("/bulk-data/r4/$export-status/{job}")).by(&client)).await, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presigned_urls_need_no_credentials_and_objects_go_when_the_job_expires() {
    let Some(endpoint) = s3_endpoint() else { return };
    let bucket = bucket(&endpoint).await;
    let output = output_store(&endpoint, &bucket, true);
    let ttl = Duration::from_secs(10);
    let config = HttpConfig { file_url_ttl: ttl, ..config() };
    let server = Server::with_state(config, |state| state.output = Some(output));
    let (tenant, client, group) = populated(&server, "acme").await;

    let job = kick_off(&server, &client, &group).await;
    let reply = finished(&server, &client, &job).await;
    assert_status(&reply, 200);
    let manifest = reply.json();
    assert_eq!(manifest["requiresAccessToken"], json!(false));
    let mut lines = Vec::new();
    for item in manifest["output"].as_array().expect("output") {
        let url = item["url"].as_str().unwrap();
        assert!(url.starts_with(&endpoint), "a presigned S3 URL: {url}");
        let expires: u64 = url
            .split(['?', '&'])
            .find_map(|pair| pair.strip_prefix("X-Amz-Expires="))
            .and_then(|seconds| seconds.parse().ok())
            .unwrap_or_else(|| panic!("no X-Amz-Expires in {url}"));
        assert!(expires >= 1 && expires <= ttl.as_secs(), "expires with the job: {expires} s");
        // No credentials of any kind: a plain GET.
        let response = reqwest::get(url).await.expect("download");
        assert_eq!(response.status(), 200, "{url}");
        let bytes = response.bytes().await.expect("body");
        lines.extend(checked_lines(item, &bytes));
    }
    assert_eq!(sorted_unique(lines), streamed_lines(&server, &client, &group).await);

    let prefix = format!("exports/{}/{job}/", tenant.0);
    assert!(!keys(&endpoint, &bucket, &prefix).await.is_empty());
    tokio::time::sleep(ttl + Duration::from_secs(1)).await;
    // The next kick-off sweeps expired jobs, objects first.
    let later = kick_off(&server, &client, &group).await;
    assert!(keys(&endpoint, &bucket, &prefix).await.is_empty(), "expiry removes the objects");
    assert_status(&server.send(get(&format!("/bulk-data/r4/$export-status/{job}")).by(&client)).await, 404);
    assert_status(&finished(&server, &client, &later).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_while_writing_fails_the_job_and_leaves_no_objects() {
    let Some(endpoint) = s3_endpoint() else { return };
    let bucket = bucket(&endpoint).await;
    let output = output_store(&endpoint, &bucket, false);
    let server = Server::with_state(config(), |state| {
        state.output = Some(output);
        // The store fails once two objects are written.
        state.planners = Arc::new(Planners::default().with_hook(|step| match step {
            PlanStep::Writing { done: 2, .. } => Err(StoreError::Database("disk I/O error".into())),
            _ => Ok(()),
        }));
    });
    let (tenant, client, group) = populated(&server, "acme").await;
    let job = kick_off(&server, &client, &group).await;
    let reply = finished(&server, &client, &job).await;
    let outcome = assert_error(&reply, 500, "exception");
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    // The worker fails the job first and then removes what it wrote (in that order, so that it
    // never removes a new lease holder's objects): a poll may see the failure a moment before.
    let prefix = format!("exports/{}/{job}/", tenant.0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !keys(&endpoint, &bucket, &prefix).await.is_empty() {
        assert!(Instant::now() < deadline, "partial output removed within 10 s of the failure");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A bucket that does not exist: the upload itself fails.
    let missing = output_store(&endpoint, "no-such-bucket-bulkhead", false);
    let server = Server::with_state(config(), |state| state.output = Some(missing));
    let (_, client, group) = populated(&server, "acme").await;
    let job = kick_off(&server, &client, &group).await;
    assert_error(&finished(&server, &client, &job).await, 500, "exception");
}
