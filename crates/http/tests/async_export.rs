//! Tier-2 tests of the asynchronous Bulk Data pattern (`Prefer: respond-async`): kick-off → 202
//! with an absolute `Content-Location`, poll → 200 with the manifest the synchronous call gives,
//! `DELETE` → 202 then 404, and jobs that only their own tenant, client and user can see. The
//! real router, driven in process over a fresh SQLite store per test.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use bulkhead_http::HttpConfig;
use bulkhead_store::Store;
use serde_json::{json, Value};

use common::*;

// ---------------------------------------------------------------------------------------------
// Helpers (the harness is in `common/mod.rs`)
// ---------------------------------------------------------------------------------------------

const STATUS_PREFIX: &str = "http://bulkhead.test/bulk-data/r4/$export-status/";

/// How many jobs the store holds (across tenants); empties it, so call it last.
fn drain_jobs(server: &Server) -> u64 {
    server.store.delete_expired_export_jobs(i64::MAX).expect("sweep")
}

/// The manifest with what changes from one export to the next (the instant, file tokens)
/// replaced by placeholders.
fn redact_manifest(mut manifest: Value) -> Value {
    manifest["transactionTime"] = json!("<instant>");
    for list in ["output", "deleted", "error"] {
        if let Some(items) = manifest.get_mut(list).and_then(Value::as_array_mut) {
            for item in items {
                let url = item["url"].as_str().expect("url");
                let (head, file) = url.rsplit_once('/').expect("a path");
                assert!(file.ends_with(".ndjson"), "{url}");
                item["url"] = json!(format!("{head}/<token>.ndjson"));
            }
        }
    }
    manifest
}

fn observation(patient_id: &str) -> Value {
    json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
           "subject": {"reference": format!("Patient/{patient_id}")}})
}

/// A tenant with one client, two member patients with an Observation each, and their Group.
async fn populated(server: &Server, name: &str) -> (Client, String) {
    let client = server.tenant_client(name);
    let mut members = Vec::new();
    for family in ["One", "Two"] {
        let id = id_of(&server.create(&client, patient(family)).await);
        server.create(&client, observation(&id)).await;
        members.push(id);
    }
    let group = id_of(&server.create(&client, group_of(&[&members[0], &members[1]])).await);
    (client, group)
}

/// Kicks off with `call` (which must carry `Prefer: respond-async`), checks the 202 and returns
/// the status URL as a local path.
async fn kick_off(server: &Server, call: Call) -> String {
    let reply = server.send(call).await;
    assert_status(&reply, 202);
    let location = reply.header("content-location").to_owned();
    let job_id = location.strip_prefix(STATUS_PREFIX).unwrap_or_else(|| panic!("not absolute: {location}"));
    assert!(uuid::Uuid::parse_str(job_id).is_ok(), "job id {job_id} is a UUID");
    if !reply.body.is_empty() {
        assert_eq!(reply.header("content-type"), "application/fhir+json");
        let outcome = reply.json();
        assert_eq!(outcome["resourceType"], "OperationOutcome");
        assert_eq!(outcome["issue"][0]["severity"], "information", "{outcome}");
    }
    local(&location)
}

/// Polls a status URL as Inferno does and returns the manifest of the 200.
async fn poll(server: &Server, client: &Client, status_path: &str) -> (Value, Reply) {
    let reply = server.send(get(status_path).by(client).header("accept", "application/json")).await;
    assert_status(&reply, 200);
    assert_eq!(reply.header("content-type"), "application/json");
    (reply.json(), reply)
}

/// Every exported line of a manifest's `output[]`, downloaded with the client headers.
async fn exported(server: &Server, client: &Client, manifest: &Value) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (line, _) in server.output_lines(client, manifest).await {
        assert!(found.insert(line), "a line was exported twice");
    }
    found
}

/// Seconds from now until an `Expires` IMF-fixdate.
fn expires_in(http_date: &str) -> i64 {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let at = time::PrimitiveDateTime::parse(http_date, &format)
        .unwrap_or_else(|error| panic!("Expires '{http_date}' is not an HTTP-date: {error}"))
        .assume_utc();
    (at - time::OffsetDateTime::now_utc()).whole_seconds()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn async_kick_off_polls_to_the_synchronous_manifest() {
    let server = Server::start();
    let (client, group) = populated(&server, "acme").await;
    let path = format!("/bulk-data/r4/Group/{group}/$export?_type=Patient,Observation");

    let sync = server.send(get(&path).by(&client)).await;
    assert_status(&sync, 200);
    let sync_manifest = sync.json();
    assert_eq!(sync_manifest["output"].as_array().unwrap().len(), 2, "{sync_manifest}");

    let status = kick_off(&server, get(&path).by(&client).respond_async()).await;
    let (manifest, reply) = poll(&server, &client, &status).await;
    assert_eq!(
        redact_manifest(manifest.clone()),
        redact_manifest(sync_manifest.clone()),
        "the same manifest, URLs aside"
    );
    let ttl = expires_in(reply.header("expires"));
    assert!((24 * 3600 - 60..=24 * 3600).contains(&ttl), "Expires is the file URL expiry, not {ttl}s away");
    assert_eq!(exported(&server, &client, &manifest).await, exported(&server, &client, &sync_manifest).await);

    // Polling again gives the same manifest; so does the `/r4` spelling of the status URL.
    assert_eq!(poll(&server, &client, &status).await.0, manifest);
    let short = status.replace("/bulk-data/r4/", "/r4/");
    assert_eq!(poll(&server, &client, &short).await.0, manifest);

    // `/r4/Group/{id}/$export` kicks off the same way, and the manifest names that request.
    let r4_path = format!("/r4/Group/{group}/$export?_type=Patient,Observation");
    let status = kick_off(&server, get(&r4_path).by(&client).respond_async()).await;
    let (manifest, _) = poll(&server, &client, &status).await;
    let mut expected = redact_manifest(sync_manifest);
    expected["request"] = json!(format!("{BASE}{r4_path}"));
    assert_eq!(redact_manifest(manifest), expected);
}

#[tokio::test]
async fn content_location_is_absolute_without_a_configured_base() {
    let server = Server::with_config(HttpConfig::default());
    let (client, group) = populated(&server, "acme").await;
    let reply = server
        .send(
            get(&format!("/r4/Group/{group}/$export")).by(&client).respond_async().header("host", "fhir.example:8443"),
        )
        .await;
    assert_status(&reply, 202);
    let location = reply.header("content-location");
    assert!(location.starts_with("http://fhir.example:8443/bulk-data/r4/$export-status/"), "{location}");
}

#[tokio::test]
async fn delete_removes_the_job() {
    let server = Server::start();
    let (client, group) = populated(&server, "acme").await;
    let status =
        kick_off(&server, get(&format!("/bulk-data/r4/Group/{group}/$export")).by(&client).respond_async()).await;
    poll(&server, &client, &status).await;

    let reply = server.send(delete(&status).by(&client).header("accept", "application/json")).await;
    assert_status(&reply, 202);
    let reply = server.send(get(&status).by(&client).header("accept", "application/json")).await;
    assert_error(&reply, 404, "not-found");
    assert_error(&server.send(delete(&status).by(&client)).await, 404, "not-found");

    // Kick-off and DELETE back to back (as Inferno does for each `_outputFormat`).
    for format in ["application/fhir%2Bndjson", "application/ndjson", "ndjson"] {
        let path = format!("/bulk-data/r4/Group/{group}/$export?_outputFormat={format}");
        let status = kick_off(&server, get(&path).by(&client).respond_async()).await;
        assert_status(&server.send(delete(&status).by(&client)).await, 202);
    }
    assert_eq!(drain_jobs(&server), 0, "every deleted job is gone from the store");
}

#[tokio::test]
async fn jobs_are_seen_only_by_their_tenant_client_and_user() {
    let server = Server::start();
    let (client, group) = populated(&server, "acme").await;
    let acme = server.store.tenant_by_name("acme").unwrap().unwrap().id;
    let colleague = server.client(acme);
    let (outsider, _) = populated(&server, "globex").await;

    let status =
        kick_off(&server, get(&format!("/bulk-data/r4/Group/{group}/$export")).by(&client).respond_async()).await;
    let (manifest, _) = poll(&server, &client, &status).await;
    for who in [&outsider, &colleague] {
        assert_error(&server.send(get(&status).by(who)).await, 404, "not-found");
        assert_error(&server.send(delete(&status).by(who)).await, 404, "not-found");
    }
    let as_alice = server.send(get(&status).by(&client).header("x-oneup-user-id", "alice")).await;
    assert_error(&as_alice, 404, "not-found");
    assert_error(&server.send(get(&status)).await, 401, "login");
    assert_error(&server.send(delete(&status)).await, 401, "login");
    // `x-oneup-user-id: client` is the whole tenant, like no header.
    let as_tenant = server.send(get(&status).by(&client).header("x-oneup-user-id", "client")).await;
    assert_status(&as_tenant, 200);
    assert_eq!(as_tenant.json(), manifest, "the failed attempts changed nothing");

    // A job started for a user is that user's.
    let alice_patient = id_of(&server.create_as(&client, Some("alice"), patient("Alice")).await);
    let alice_group = id_of(&server.create_as(&client, Some("alice"), group_of(&[&alice_patient])).await);
    let path = format!("/bulk-data/r4/Group/{alice_group}/$export");
    let alice_status =
        kick_off(&server, get(&path).by(&client).respond_async().header("x-oneup-user-id", "alice")).await;
    assert_error(&server.send(get(&alice_status).by(&client)).await, 404, "not-found");
    assert_error(&server.send(get(&alice_status).by(&client).header("x-oneup-user-id", "bob")).await, 404, "not-found");
    let reply = server.send(get(&alice_status).by(&client).header("x-oneup-user-id", "alice")).await;
    assert_status(&reply, 200);
    assert_error(&server.send(delete(&alice_status).by(&client)).await, 404, "not-found");
    let reply = server.send(delete(&alice_status).by(&client).header("x-oneup-user-id", "alice")).await;
    assert_status(&reply, 202);

    let unknown = format!("/bulk-data/r4/$export-status/{}", uuid::Uuid::new_v4());
    assert_error(&server.send(get(&unknown).by(&client)).await, 404, "not-found");
    assert_error(&server.send(get("/bulk-data/r4/$export-status/not-a-uuid").by(&client)).await, 404, "not-found");
    assert_error(&server.send(delete(&unknown).by(&client)).await, 404, "not-found");
}

#[tokio::test]
async fn bad_kick_offs_with_respond_async_are_refused_without_a_job() {
    let server = Server::start();
    let (client, group) = populated(&server, "acme").await;
    let (outsider, _) = populated(&server, "globex").await;
    let cases = [
        ("_type=Practitioner", "not-supported"),
        ("_type=Nope", "value"),
        ("_since=yesterday", "value"),
        ("_outputFormat=text/csv", "not-supported"),
        ("foo=1", "invalid"),
    ];
    for base in ["/r4", "/bulk-data/r4"] {
        for (query, code) in cases {
            let reply =
                server.send(get(&format!("{base}/Group/{group}/$export?{query}")).by(&client).respond_async()).await;
            assert_error(&reply, 400, code);
        }
    }
    let reply = server.send(get("/bulk-data/r4/Group/no-such-group/$export").by(&client).respond_async()).await;
    assert_error(&reply, 404, "not-found");
    let reply = server.send(get(&format!("/bulk-data/r4/Group/{group}/$export")).by(&outsider).respond_async()).await;
    assert_error(&reply, 404, "not-found");
    let reply = server.send(get(&format!("/bulk-data/r4/Group/{group}/$export")).respond_async()).await;
    assert_error(&reply, 401, "login");
    let reply = server
        .send(
            get(&format!("/bulk-data/r4/Group/{group}/$export"))
                .by(&client)
                .header("prefer", "respond-async")
                .header("accept", "application/fhir+xml"),
        )
        .await;
    assert_status(&reply, 406);
    assert_eq!(drain_jobs(&server), 0, "no refused kick-off created a job");
}

#[tokio::test]
async fn lenient_handling_combines_with_respond_async() {
    let server = Server::start();
    let (client, group) = populated(&server, "acme").await;
    let path = format!("/bulk-data/r4/Group/{group}/$export?foo=1&_type=Patient");
    let sync = server.send(get(&path).by(&client).header("prefer", "handling=lenient")).await;
    assert_status(&sync, 200);
    let expected = redact_manifest(sync.json());
    assert_eq!(expected["error"].as_array().unwrap().len(), 1, "{expected}");

    let one_line = get(&path).by(&client).header("prefer", "respond-async, handling=lenient");
    let two_lines = get(&path).by(&client).header("prefer", "respond-async").header("prefer", "handling=lenient");
    let reversed = get(&path).by(&client).header("prefer", "handling=lenient,respond-async");
    for call in [one_line, two_lines, reversed] {
        let status = kick_off(&server, call).await;
        let (manifest, _) = poll(&server, &client, &status).await;
        assert_eq!(redact_manifest(manifest.clone()), expected);
        let reply = server.send(get(&local(manifest["error"][0]["url"].as_str().unwrap())).by(&client)).await;
        assert_status(&reply, 200);
        let outcome: Value = serde_json::from_str(reply.text().trim()).expect("one OperationOutcome line");
        assert_eq!(outcome["issue"][0]["severity"], "warning");
        assert!(outcome["issue"][0]["diagnostics"].as_str().unwrap().contains("'foo'"), "{outcome}");
    }

    // Strict (the default) refuses the same request, asynchronous or not.
    let reply = server.send(get(&path).by(&client).respond_async()).await;
    assert_error(&reply, 400, "invalid");
    let reply = server.send(get(&path).by(&client).header("prefer", "respond-async, handling=strict")).await;
    assert_error(&reply, 400, "invalid");
}

#[tokio::test]
async fn jobs_expire_with_their_file_urls() {
    // Self-authorising URLs: the job lives as long as they do.
    let config = HttpConfig {
        file_urls_require_credentials: false,
        self_authorising_url_ttl: Duration::from_secs(600),
        ..test_config()
    };
    let server = Server::with_config(config);
    let (client, group) = populated(&server, "acme").await;
    let status = kick_off(&server, get(&format!("/r4/Group/{group}/$export")).by(&client).respond_async()).await;
    let (manifest, reply) = poll(&server, &client, &status).await;
    assert_eq!(manifest["requiresAccessToken"], false);
    let ttl = expires_in(reply.header("expires"));
    assert!((540..=600).contains(&ttl), "Expires {ttl}s away");

    // URLs that expire at once: the job is a 404 from the start, and the next kick-off sweeps it.
    let config = HttpConfig { file_url_ttl: Duration::ZERO, ..test_config() };
    let server = Server::with_config(config);
    let (client, group) = populated(&server, "acme").await;
    let acme = server.store.tenant_by_name("acme").unwrap().unwrap().id;
    let path = format!("/r4/Group/{group}/$export");
    let status = kick_off(&server, get(&path).by(&client).respond_async()).await;
    let job_id = status.rsplit('/').next().unwrap().to_owned();
    assert!(server.store.export_job(acme, &job_id).unwrap().is_some(), "stored until swept");
    assert_error(&server.send(get(&status).by(&client)).await, 404, "not-found");
    assert_error(&server.send(delete(&status).by(&client)).await, 404, "not-found");
    kick_off(&server, get(&path).by(&client).respond_async()).await;
    assert!(server.store.export_job(acme, &job_id).unwrap().is_none(), "the next kick-off swept it");
}

#[tokio::test]
async fn without_respond_async_the_kick_off_stays_synchronous() {
    let server = Server::start();
    let (client, group) = populated(&server, "acme").await;
    for prefer in [None, Some("handling=lenient"), Some("return=minimal, respond-asyncx")] {
        let mut call = get(&format!("/bulk-data/r4/Group/{group}/$export")).by(&client);
        if let Some(prefer) = prefer {
            call = call.header("prefer", prefer);
        }
        let reply = server.send(call).await;
        assert_status(&reply, 200);
        assert_eq!(reply.header("content-type"), "application/json");
        assert!(reply.headers.get("content-location").is_none());
        // Patient, Observation and the Group itself.
        assert_eq!(reply.json()["output"].as_array().unwrap().len(), 3);
    }
    assert_eq!(drain_jobs(&server), 0, "the synchronous path creates no job");
}
