//! Tier-2 tests of the asynchronous Bulk Data pattern (`Prefer: respond-async`): kick-off → 202
//! with an absolute `Content-Location`, poll → 200 with the manifest the synchronous call gives,
//! `DELETE` → 202 then 404, and jobs that only their own tenant, client and user can see. The
//! real router, driven in process over a fresh SQLite store per test.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::Router;
use bulkhead_export::token::TokenKeys;
use bulkhead_http::credentials::{generate_credentials, hash_secret};
use bulkhead_http::{router, AppState, HttpConfig};
use bulkhead_store::sqlite::SqliteStore;
use bulkhead_store::{Store, TenantId};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

const BASE: &str = "http://bulkhead.test";
const STATUS_PREFIX: &str = "http://bulkhead.test/bulk-data/r4/$export-status/";

fn test_config() -> HttpConfig {
    HttpConfig { public_base_url: Some(BASE.into()), ..HttpConfig::default() }
}

struct Server {
    app: Router,
    store: Arc<SqliteStore>,
    _dir: tempfile::TempDir,
}

#[derive(Clone)]
struct Client {
    id: String,
    secret: String,
}

impl Server {
    fn start() -> Server {
        Server::with_config(test_config())
    }

    fn with_config(config: HttpConfig) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(SqliteStore::open(&dir.path().join("bulkhead.db")).expect("open store"));
        let keys = TokenKeys::new(vec![("k1".into(), b"0123456789abcdef0123456789abcdef".to_vec())]).expect("key");
        let state = AppState::new(store.clone(), config, keys);
        Server { app: router(state), store, _dir: dir }
    }

    fn tenant(&self, name: &str) -> TenantId {
        self.store.create_tenant(name).expect("create tenant").id
    }

    fn client(&self, tenant: TenantId) -> Client {
        let credentials = generate_credentials();
        let hash = hash_secret(&credentials.client_secret);
        self.store.create_client(tenant, &credentials.client_id, &hash).expect("create client");
        Client { id: credentials.client_id, secret: credentials.client_secret }
    }

    async fn send(&self, call: Call) -> Reply {
        let mut request = Request::builder().method(call.method).uri(&call.uri);
        for (name, value) in &call.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let request = request.body(Body::from(call.body)).expect("valid request");
        let response = self.app.clone().oneshot(request).await.expect("the router is infallible");
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.expect("readable body").to_bytes().to_vec();
        Reply { status, headers, body }
    }

    /// Creates a resource and returns its id.
    async fn create(&self, client: &Client, resource: Value) -> String {
        self.create_as(client, None, resource).await
    }

    /// Creates a resource owned by `user` (`x-oneup-user-id`) and returns its id.
    async fn create_as(&self, client: &Client, user: Option<&str>, resource: Value) -> String {
        let resource_type = resource["resourceType"].as_str().expect("resourceType").to_owned();
        let mut call = request(Method::POST, &format!("/r4/{resource_type}")).by(client);
        if let Some(user) = user {
            call = call.header("x-oneup-user-id", user);
        }
        call.body = resource.to_string().into_bytes();
        let reply = self.send(call.header("content-type", "application/fhir+json")).await;
        assert_status(&reply, 201);
        reply.json()["id"].as_str().expect("id").to_owned()
    }

    /// How many jobs the store holds (across tenants); empties it, so call it last.
    fn drain_jobs(&self) -> u64 {
        self.store.delete_expired_export_jobs(i64::MAX).expect("sweep")
    }
}

struct Call {
    method: Method,
    uri: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn request(method: Method, uri: &str) -> Call {
    Call { method, uri: uri.to_owned(), headers: Vec::new(), body: Vec::new() }
}

fn get(uri: &str) -> Call {
    request(Method::GET, uri)
}

fn delete(uri: &str) -> Call {
    request(Method::DELETE, uri)
}

impl Call {
    fn by(self, client: &Client) -> Call {
        self.header("client_id", &client.id).header("client_secret", &client.secret)
    }

    fn header(mut self, name: &str, value: &str) -> Call {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// What a standard Bulk Data client sends with a kick-off.
    fn respond_async(self) -> Call {
        self.header("accept", "application/fhir+json").header("prefer", "respond-async")
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| panic!("body is not JSON ({error}): {}", self.text()))
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
    }
}

#[track_caller]
fn assert_status(reply: &Reply, status: u16) {
    assert_eq!(reply.status.as_u16(), status, "unexpected status; body: {}", reply.text());
}

/// Checks an error answer: status, FHIR JSON and an OperationOutcome with an error of `code`.
#[track_caller]
fn assert_outcome(reply: &Reply, status: u16, code: &str) -> Value {
    assert_status(reply, status);
    assert_eq!(reply.header("content-type"), "application/fhir+json");
    let outcome = reply.json();
    assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
    assert_eq!(outcome["issue"][0]["severity"], "error", "{outcome}");
    assert_eq!(outcome["issue"][0]["code"], code, "{outcome}");
    outcome
}

/// A URL the server minted, as a path for the next request.
fn local(url: &str) -> String {
    url.strip_prefix(BASE).unwrap_or_else(|| panic!("'{url}' does not start with {BASE}")).to_owned()
}

/// The manifest with what changes from one export to the next (instants, file tokens, the
/// Group's UUID in `request`) replaced by placeholders.
fn redact(mut manifest: Value) -> Value {
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

fn patient(family: &str) -> Value {
    json!({"resourceType": "Patient", "name": [{"family": family}]})
}

fn observation(patient_id: &str) -> Value {
    json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
           "subject": {"reference": format!("Patient/{patient_id}")}})
}

fn group_of(patient_ids: &[&str]) -> Value {
    let members: Vec<Value> =
        patient_ids.iter().map(|id| json!({"entity": {"reference": format!("Patient/{id}")}})).collect();
    json!({"resourceType": "Group", "type": "person", "actual": true, "member": members})
}

/// A tenant with one client, two member patients with an Observation each, and their Group.
async fn populated(server: &Server, name: &str) -> (Client, String) {
    let client = server.client(server.tenant(name));
    let mut members = Vec::new();
    for family in ["One", "Two"] {
        let id = server.create(&client, patient(family)).await;
        server.create(&client, observation(&id)).await;
        members.push(id);
    }
    let group = server.create(&client, group_of(&[&members[0], &members[1]])).await;
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
    for item in manifest["output"].as_array().expect("output") {
        let reply = server.send(get(&local(item["url"].as_str().unwrap())).by(client)).await;
        assert_status(&reply, 200);
        assert_eq!(reply.header("content-type"), "application/fhir+ndjson");
        let lines: Vec<String> = reply.text().lines().map(str::to_owned).collect();
        assert_eq!(json!(lines.len()), item["count"], "{item}");
        for line in lines {
            let resource: Value = serde_json::from_str(&line).expect("NDJSON line");
            assert_eq!(resource["resourceType"], item["type"]);
            assert!(found.insert(line), "a line was exported twice");
        }
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
    assert_eq!(redact(manifest.clone()), redact(sync_manifest.clone()), "the same manifest, URLs aside");
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
    let mut expected = redact(sync_manifest);
    expected["request"] = json!(format!("{BASE}{r4_path}"));
    assert_eq!(redact(manifest), expected);
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
    assert_outcome(&reply, 404, "not-found");
    assert_outcome(&server.send(delete(&status).by(&client)).await, 404, "not-found");

    // Kick-off and DELETE back to back (as Inferno does for each `_outputFormat`).
    for format in ["application/fhir%2Bndjson", "application/ndjson", "ndjson"] {
        let path = format!("/bulk-data/r4/Group/{group}/$export?_outputFormat={format}");
        let status = kick_off(&server, get(&path).by(&client).respond_async()).await;
        assert_status(&server.send(delete(&status).by(&client)).await, 202);
    }
    assert_eq!(server.drain_jobs(), 0, "every deleted job is gone from the store");
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
        assert_outcome(&server.send(get(&status).by(who)).await, 404, "not-found");
        assert_outcome(&server.send(delete(&status).by(who)).await, 404, "not-found");
    }
    let as_alice = server.send(get(&status).by(&client).header("x-oneup-user-id", "alice")).await;
    assert_outcome(&as_alice, 404, "not-found");
    assert_outcome(&server.send(get(&status)).await, 401, "login");
    assert_outcome(&server.send(delete(&status)).await, 401, "login");
    // `x-oneup-user-id: client` is the whole tenant, like no header.
    let as_tenant = server.send(get(&status).by(&client).header("x-oneup-user-id", "client")).await;
    assert_status(&as_tenant, 200);
    assert_eq!(as_tenant.json(), manifest, "the failed attempts changed nothing");

    // A job started for a user is that user's.
    let alice_patient = server.create_as(&client, Some("alice"), patient("Alice")).await;
    let alice_group = server.create_as(&client, Some("alice"), group_of(&[&alice_patient])).await;
    let path = format!("/bulk-data/r4/Group/{alice_group}/$export");
    let alice_status =
        kick_off(&server, get(&path).by(&client).respond_async().header("x-oneup-user-id", "alice")).await;
    assert_outcome(&server.send(get(&alice_status).by(&client)).await, 404, "not-found");
    assert_outcome(
        &server.send(get(&alice_status).by(&client).header("x-oneup-user-id", "bob")).await,
        404,
        "not-found",
    );
    let reply = server.send(get(&alice_status).by(&client).header("x-oneup-user-id", "alice")).await;
    assert_status(&reply, 200);
    assert_outcome(&server.send(delete(&alice_status).by(&client)).await, 404, "not-found");
    let reply = server.send(delete(&alice_status).by(&client).header("x-oneup-user-id", "alice")).await;
    assert_status(&reply, 202);

    let unknown = format!("/bulk-data/r4/$export-status/{}", uuid::Uuid::new_v4());
    assert_outcome(&server.send(get(&unknown).by(&client)).await, 404, "not-found");
    assert_outcome(&server.send(get("/bulk-data/r4/$export-status/not-a-uuid").by(&client)).await, 404, "not-found");
    assert_outcome(&server.send(delete(&unknown).by(&client)).await, 404, "not-found");
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
            assert_outcome(&reply, 400, code);
        }
    }
    let reply = server.send(get("/bulk-data/r4/Group/no-such-group/$export").by(&client).respond_async()).await;
    assert_outcome(&reply, 404, "not-found");
    let reply = server.send(get(&format!("/bulk-data/r4/Group/{group}/$export")).by(&outsider).respond_async()).await;
    assert_outcome(&reply, 404, "not-found");
    let reply = server.send(get(&format!("/bulk-data/r4/Group/{group}/$export")).respond_async()).await;
    assert_outcome(&reply, 401, "login");
    let reply = server
        .send(
            get(&format!("/bulk-data/r4/Group/{group}/$export"))
                .by(&client)
                .header("prefer", "respond-async")
                .header("accept", "application/fhir+xml"),
        )
        .await;
    assert_status(&reply, 406);
    assert_eq!(server.drain_jobs(), 0, "no refused kick-off created a job");
}

#[tokio::test]
async fn lenient_handling_combines_with_respond_async() {
    let server = Server::start();
    let (client, group) = populated(&server, "acme").await;
    let path = format!("/bulk-data/r4/Group/{group}/$export?foo=1&_type=Patient");
    let sync = server.send(get(&path).by(&client).header("prefer", "handling=lenient")).await;
    assert_status(&sync, 200);
    let expected = redact(sync.json());
    assert_eq!(expected["error"].as_array().unwrap().len(), 1, "{expected}");

    let one_line = get(&path).by(&client).header("prefer", "respond-async, handling=lenient");
    let two_lines = get(&path).by(&client).header("prefer", "respond-async").header("prefer", "handling=lenient");
    let reversed = get(&path).by(&client).header("prefer", "handling=lenient,respond-async");
    for call in [one_line, two_lines, reversed] {
        let status = kick_off(&server, call).await;
        let (manifest, _) = poll(&server, &client, &status).await;
        assert_eq!(redact(manifest.clone()), expected);
        let reply = server.send(get(&local(manifest["error"][0]["url"].as_str().unwrap())).by(&client)).await;
        assert_status(&reply, 200);
        let outcome: Value = serde_json::from_str(reply.text().trim()).expect("one OperationOutcome line");
        assert_eq!(outcome["issue"][0]["severity"], "warning");
        assert!(outcome["issue"][0]["diagnostics"].as_str().unwrap().contains("'foo'"), "{outcome}");
    }

    // Strict (the default) refuses the same request, asynchronous or not.
    let reply = server.send(get(&path).by(&client).respond_async()).await;
    assert_outcome(&reply, 400, "invalid");
    let reply = server.send(get(&path).by(&client).header("prefer", "respond-async, handling=strict")).await;
    assert_outcome(&reply, 400, "invalid");
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
    assert_outcome(&server.send(get(&status).by(&client)).await, 404, "not-found");
    assert_outcome(&server.send(delete(&status).by(&client)).await, 404, "not-found");
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
    assert_eq!(server.drain_jobs(), 0, "the synchronous path creates no job");
}
