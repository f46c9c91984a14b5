//! The harness shared by the tier-2 tests of this crate: the real router over a fresh store
//! (SQLite in a temporary directory; a database of its own on the test PostgreSQL cluster when
//! `BULKHEAD_TEST_STORE=postgres`, see [`Backing`]), driven in process with `tower::ServiceExt::oneshot`; tenants
//! and clients made straight in the store; requests built with the 1upHealth client headers;
//! replies read whole; and the checks every test repeats (status, OperationOutcome, redaction of
//! what changes from run to run).
//!
//! Each test file is its own crate and uses a part of this module, hence `allow(dead_code)`.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::Router;
use bulkhead_export::token::TokenKeys;
use bulkhead_http::credentials::register_client;
use bulkhead_http::{router, AppState, HttpConfig};
use bulkhead_store::postgres::testing::TestDatabase;
use bulkhead_store::sqlite::{SqliteOptions, SqliteStore};
use bulkhead_store::{Store, TenantId};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

/// The public base of `test_config()`: every URL the server mints starts with it.
pub const BASE: &str = "http://bulkhead.test";
pub const TOKEN_KID: &str = "k1";
pub const TOKEN_SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

/// The keys every test server signs file URLs with.
pub fn token_keys() -> TokenKeys {
    TokenKeys::new(vec![(TOKEN_KID.into(), TOKEN_SECRET.to_vec())]).expect("valid token key")
}

/// The default configuration with the public base `BASE`.
pub fn test_config() -> HttpConfig {
    HttpConfig { public_base_url: Some(BASE.into()), ..HttpConfig::default() }
}

/// A router over its own temporary database.
pub struct Server {
    pub app: Router,
    pub store: Arc<dyn Store>,
    /// The app's audit writer (its records reach the store just after the response).
    pub audit: Arc<bulkhead_http::audit_writer::AuditWriter>,
    backing: Backing,
}

/// Which store the tests run on: `BULKHEAD_TEST_STORE=postgres` selects PostgreSQL (the
/// cluster of `BULKHEAD_TEST_DATABASE_URL`, as `scripts/with-postgres` sets it), anything else
/// (or nothing) SQLite.
pub enum Backing {
    /// The directory, and the store typed (for SQLite-only settings such as a page cap).
    Sqlite(tempfile::TempDir, Arc<SqliteStore>),
    /// Dropped after the store: the database goes when the test ends.
    Postgres(TestDatabase),
    /// A store the test made itself, or shares with another server.
    Given,
}

/// True when this run's tests use PostgreSQL.
pub fn on_postgres() -> bool {
    std::env::var("BULKHEAD_TEST_STORE").is_ok_and(|store| store.eq_ignore_ascii_case("postgres"))
}

/// True (after saying so) when the test needs SQLite and this run is on PostgreSQL.
pub fn skip_on_postgres(why: &str) -> bool {
    if on_postgres() {
        eprintln!("SKIPPED on PostgreSQL: {why}");
    }
    on_postgres()
}

/// A fresh store of the selected kind.
pub fn fresh_store() -> (Arc<dyn Store>, Backing) {
    if on_postgres() {
        let database = bulkhead_store::postgres::testing::fresh_database()
            .expect("BULKHEAD_TEST_STORE=postgres needs BULKHEAD_TEST_DATABASE_URL (scripts/with-postgres)");
        let store =
            bulkhead_store::postgres::PgStore::open(&database.url, bulkhead_store::postgres::testing::test_options())
                .expect("open the test database");
        return (Arc::new(store), Backing::Postgres(database));
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(SqliteStore::open(&dir.path().join("bulkhead.db")).expect("open store"));
    (store.clone(), Backing::Sqlite(dir, store))
}

/// Client-header credentials.
#[derive(Clone)]
pub struct Client {
    pub id: String,
    pub secret: String,
}

impl Server {
    /// A server with `test_config()`.
    pub fn start() -> Server {
        Server::with_config(test_config())
    }

    pub fn with_config(config: HttpConfig) -> Server {
        Server::with_state(config, |_| {})
    }

    /// A server whose state `adjust` may change before the router is built.
    pub fn with_state(config: HttpConfig, adjust: impl FnOnce(&mut AppState)) -> Server {
        let (store, backing) = fresh_store();
        let mut state = AppState::new(store.clone(), config, token_keys());
        adjust(&mut state);
        Server { audit: state.audit.clone(), app: router(state), store, backing }
    }

    /// A server over a store the test made (e.g. one whose database cannot be reached).
    pub fn over_store(store: Arc<dyn Store>, config: HttpConfig) -> Server {
        let state = AppState::new(store.clone(), config, token_keys());
        Server { audit: state.audit.clone(), app: router(state), store, backing: Backing::Given }
    }

    /// The same database reopened under `config` with a cap of `extra_pages` pages
    /// beyond what it holds now: writes past the cap fail as on a full disk (SQLITE_FULL).
    /// SQLite only (the callers skip on PostgreSQL, whose disk a test cannot fill).
    pub fn reopen_with_page_cap(self, config: HttpConfig, extra_pages: u64) -> Server {
        let Server { app, store, audit, backing } = self;
        let Backing::Sqlite(_dir, typed) = backing else { panic!("a page cap is a SQLite setting") };
        // The last connection to close checkpoints the WAL into the file, so its size is exact.
        drop((app, audit, typed));
        drop(store);
        let path = _dir.path().join("bulkhead.db");
        let file = std::fs::read(&path).expect("database file");
        // The page size is in the file header (bytes 16-17, big-endian; 1 means 65536).
        let page_size = match u16::from_be_bytes([file[16], file[17]]) {
            1 => 65_536,
            size => u64::from(size),
        };
        let pages = file.len() as u64 / page_size;
        let options = SqliteOptions { max_page_count: Some(pages + extra_pages), ..SqliteOptions::default() };
        let store = Arc::new(SqliteStore::open_with(&path, options).expect("reopen store"));
        let state = AppState::new(store.clone(), config, token_keys());
        Server { audit: state.audit.clone(), app: router(state), backing: Backing::Sqlite(_dir, store.clone()), store }
    }

    /// The store's plan cache statistics (both stores have one).
    pub fn plan_cache_stats(&self) -> Option<bulkhead_store::PlanCacheStats> {
        self.store.plan_cache_stats()
    }

    /// Another instance of the server (its own state: limiter, caches) on the same database
    /// (which lives as long as this server).
    pub fn sibling(&self) -> Server {
        self.sibling_with(test_config())
    }

    /// [`Server::sibling`] under `config`.
    pub fn sibling_with(&self, config: HttpConfig) -> Server {
        let state = AppState::new(self.store.clone(), config, token_keys());
        let audit = state.audit.clone();
        Server { app: router(state), store: self.store.clone(), audit, backing: Backing::Given }
    }

    pub fn tenant(&self, name: &str) -> TenantId {
        self.store.create_tenant(name).expect("create tenant").id
    }

    pub fn client(&self, tenant: TenantId) -> Client {
        let (_, credentials) = register_client(self.store.as_ref(), tenant).expect("create client");
        Client { id: credentials.client_id, secret: credentials.client_secret }
    }

    /// A new tenant with one client.
    pub fn tenant_client(&self, name: &str) -> Client {
        let tenant = self.tenant(name);
        self.client(tenant)
    }

    pub async fn send(&self, call: Call) -> Reply {
        self.send_in_chunks(call, usize::MAX).await
    }

    /// Sends the call's body as a stream of `chunk` bytes at a time (as a slow client would).
    pub async fn send_in_chunks(&self, call: Call, chunk: usize) -> Reply {
        let mut request = Request::builder().method(call.method).uri(&call.uri);
        for (name, value) in &call.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let body = if chunk >= call.body.len() {
            Body::from(call.body)
        } else {
            let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
                call.body.chunks(chunk).map(|part| Ok(part.to_vec())).collect();
            Body::from_stream(futures::stream::iter(chunks))
        };
        let request = request.body(body).expect("valid request");
        let response = self.app.clone().oneshot(request).await.expect("the router is infallible");
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.expect("readable body").to_bytes().to_vec();
        Reply { status, headers, body }
    }

    /// Creates a resource and returns its stored JSON.
    pub async fn create(&self, client: &Client, resource: Value) -> Value {
        self.create_as(client, None, resource).await
    }

    /// Creates a resource, owned by `user` (`x-oneup-user-id`) when given, and returns its
    /// stored JSON.
    pub async fn create_as(&self, client: &Client, user: Option<&str>, resource: Value) -> Value {
        let resource_type = resource["resourceType"].as_str().expect("resourceType").to_owned();
        let mut call = post(&format!("/r4/{resource_type}")).by(client);
        if let Some(user) = user {
            call = call.header("x-oneup-user-id", user);
        }
        let reply = self.send(call.json(&resource)).await;
        assert_status(&reply, 201);
        reply.json()
    }

    /// Every result of a search, following `next` links; panics on a repeated resource.
    pub async fn search_all(&self, client: &Client, path_and_query: &str) -> Vec<Value> {
        let mut found = Vec::new();
        let mut seen = BTreeSet::new();
        let mut next = Some(path_and_query.to_owned());
        while let Some(url) = next.take() {
            let reply = self.send(get(&url).by(client)).await;
            assert_status(&reply, 200);
            let bundle = reply.json();
            assert_eq!(bundle["type"], "searchset");
            for entry in bundle["entry"].as_array().expect("entry array") {
                let resource = entry["resource"].clone();
                let key =
                    format!("{}/{}", resource["resourceType"].as_str().unwrap(), resource["id"].as_str().unwrap());
                assert!(seen.insert(key.clone()), "{key} appeared twice while paging {path_and_query}");
                found.push(resource);
            }
            next = link(&bundle, "next").map(|url| local(&url));
        }
        found
    }

    /// `(type/id, versionId)` of every current resource of `types`, to prove a refused write
    /// changed nothing.
    pub async fn stored_state(&self, client: &Client, types: &[&str]) -> BTreeSet<(String, String)> {
        let mut state = BTreeSet::new();
        for resource_type in types {
            for resource in self.search_all(client, &format!("/r4/{resource_type}?_count=1000")).await {
                let key = format!("{resource_type}/{}", resource["id"].as_str().unwrap());
                state.insert((key, resource["meta"]["versionId"].as_str().unwrap().to_owned()));
            }
        }
        state
    }

    /// Downloads an export file (a URL the server minted) with the client headers: its lines,
    /// after checking the status and the NDJSON content type.
    pub async fn download_lines(&self, client: &Client, url: &str) -> Vec<String> {
        let reply = self.send(get(&local(url)).by(client)).await;
        assert_status(&reply, 200);
        assert_eq!(reply.header("content-type"), "application/fhir+ndjson");
        reply.text().lines().map(str::to_owned).collect()
    }

    /// Runs an export kick-off (any level, GET or POST) and returns its manifest: the 200 body at
    /// once, or, after a 202, the status URL's 200 body once planning is done.
    pub async fn manifest_of(&self, client: &Client, call: Call) -> Value {
        let reply = self.send(call).await;
        if reply.status.as_u16() == 200 {
            assert!(reply.header("content-type").contains("application/json"));
            return reply.json();
        }
        assert_status(&reply, 202);
        let status_url = local(reply.header("content-location"));
        for _ in 0..200 {
            let poll = self.send(get(&status_url).by(client)).await;
            match poll.status.as_u16() {
                200 => {
                    assert!(poll.header("content-type").contains("application/json"));
                    return poll.json();
                }
                202 => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                _ => panic!("status poll answered {}: {}", poll.status, poll.text()),
            }
        }
        panic!("the export did not finish planning");
    }

    /// Every line of a manifest's `output[]` files with the resource it holds, checking each
    /// file's `count` and that every line is of the file's type.
    pub async fn output_lines(&self, client: &Client, manifest: &Value) -> Vec<(String, Value)> {
        let mut found = Vec::new();
        for item in manifest["output"].as_array().expect("output") {
            let lines = self.download_lines(client, item["url"].as_str().unwrap()).await;
            assert_eq!(json!(lines.len()), item["count"], "{item}");
            for line in lines {
                let resource: Value = serde_json::from_str(&line).expect("NDJSON line");
                assert_eq!(resource["resourceType"], item["type"]);
                found.push((line, resource));
            }
        }
        found
    }
}

// ---------------------------------------------------------------------------------------------
// Requests and replies
// ---------------------------------------------------------------------------------------------

/// One request being built.
pub struct Call {
    pub method: Method,
    pub uri: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

pub fn request(method: Method, uri: &str) -> Call {
    Call { method, uri: uri.to_owned(), headers: Vec::new(), body: Vec::new() }
}

pub fn get(uri: &str) -> Call {
    request(Method::GET, uri)
}

pub fn post(uri: &str) -> Call {
    request(Method::POST, uri)
}

pub fn put(uri: &str) -> Call {
    request(Method::PUT, uri)
}

pub fn delete(uri: &str) -> Call {
    request(Method::DELETE, uri)
}

impl Call {
    /// Authenticates with the 1upHealth client headers.
    pub fn by(self, client: &Client) -> Call {
        self.header("client_id", &client.id).header("client_secret", &client.secret)
    }

    pub fn header(mut self, name: &str, value: &str) -> Call {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn json(self, body: &Value) -> Call {
        self.raw("application/fhir+json", body.to_string())
    }

    pub fn raw(mut self, content_type: &str, body: impl Into<Vec<u8>>) -> Call {
        self.body = body.into();
        self.header("content-type", content_type)
    }

    /// What a standard Bulk Data client sends with an asynchronous kick-off.
    pub fn respond_async(self) -> Call {
        self.header("accept", "application/fhir+json").header("prefer", "respond-async")
    }
}

/// A response with its body read.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| panic!("body is not JSON ({error}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
    }
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

#[track_caller]
pub fn assert_status(reply: &Reply, status: u16) {
    assert_eq!(reply.status.as_u16(), status, "unexpected status; body: {}", reply.text());
}

/// Checks an error answer: status, FHIR JSON and an OperationOutcome whose first issue is an
/// error with `code`.
#[track_caller]
pub fn assert_error(reply: &Reply, status: u16, code: &str) -> Value {
    assert_status(reply, status);
    assert_eq!(reply.header("content-type"), "application/fhir+json");
    let outcome = reply.json();
    assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
    let issue = &outcome["issue"][0];
    assert_eq!(issue["severity"], "error", "{outcome}");
    assert_eq!(issue["code"], code, "{outcome}");
    outcome
}

/// `assert_error`, and the issue has diagnostics and exactly `expression` (None: the server
/// names no location).
#[track_caller]
pub fn assert_outcome(reply: &Reply, status: u16, code: &str, expression: Option<&str>) -> Value {
    let outcome = assert_error(reply, status, code);
    let issue = &outcome["issue"][0];
    assert!(issue["diagnostics"].as_str().is_some_and(|text| !text.is_empty()), "{outcome}");
    match expression {
        Some(expression) => assert_eq!(issue["expression"], json!([expression]), "{outcome}"),
        None => assert!(issue.get("expression").is_none(), "{outcome}"),
    }
    outcome
}

/// Replaces what changes from run to run (instants, UUIDs, file tokens) with placeholders, so
/// whole Bundles and OperationOutcomes can be compared.
pub fn redact(mut value: Value) -> Value {
    fn walk(value: &mut Value) {
        match value {
            Value::String(text) => *text = redact_text(text),
            Value::Array(items) => items.iter_mut().for_each(walk),
            Value::Object(object) => object.values_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut value);
    value
}

fn redact_text(text: &str) -> String {
    if text.len() >= 20 && text.contains('T') && bulkhead_fhir::parse_since(text).is_ok() {
        return "<instant>".into();
    }
    if let Some((head, file)) = text.rsplit_once('/') {
        if text.contains("/$export/") && file.ends_with(".ndjson") {
            return format!("{head}/<token>.ndjson");
        }
    }
    let mut redacted = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(first) = rest.chars().next() {
        match rest.get(..36).filter(|candidate| is_uuid(candidate)) {
            Some(_) => {
                redacted.push_str("<uuid>");
                rest = &rest[36..];
            }
            None => {
                redacted.push(first);
                rest = &rest[first.len_utf8()..];
            }
        }
    }
    redacted
}

fn is_uuid(text: &str) -> bool {
    text.len() == 36
        && text.char_indices().all(
            |(i, c)| {
                if matches!(i, 8 | 13 | 18 | 23) {
                    c == '-'
                } else {
                    c.is_ascii_hexdigit()
                }
            },
        )
}

// ---------------------------------------------------------------------------------------------
// URLs, ids and resources
// ---------------------------------------------------------------------------------------------

/// A URL the server minted, as a path for the next request.
pub fn local(url: &str) -> String {
    url.strip_prefix(BASE).unwrap_or_else(|| panic!("'{url}' does not start with {BASE}")).to_owned()
}

pub fn link(bundle: &Value, relation: &str) -> Option<String> {
    bundle["link"]
        .as_array()?
        .iter()
        .find(|link| link["relation"] == relation)
        .and_then(|link| link["url"].as_str())
        .map(str::to_owned)
}

/// A resource's `id`.
pub fn id_of(resource: &Value) -> String {
    resource["id"].as_str().expect("id").to_owned()
}

pub fn ids(resources: &[Value]) -> BTreeSet<String> {
    resources.iter().map(id_of).collect()
}

pub fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|item| item.to_string()).collect()
}

pub fn patient(family: &str) -> Value {
    json!({"resourceType": "Patient", "name": [{"family": family}], "gender": "female"})
}

pub fn group_of(patient_ids: &[&str]) -> Value {
    let members: Vec<Value> =
        patient_ids.iter().map(|id| json!({"entity": {"reference": format!("Patient/{id}")}})).collect();
    json!({"resourceType": "Group", "type": "person", "actual": true, "member": members})
}
