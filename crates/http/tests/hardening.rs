//! Tier-2 tests of what a hostile or broken client may send (issue 7 §3): malformed credential
//! headers never widen the scope, credential checks are cheap and rate-limited, searches and
//! admin calls refuse abuse with 4xx, minted URLs ignore a forged Host, bodies that stall or
//! abort are answered with the right status, and every error is an OperationOutcome.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Method, Request};
use bulkhead_http::credentials::{legacy_argon2_hash, SecretVerifier};
use bulkhead_http::login_limits::LoginLimits;
use bulkhead_http::{ConnectionLimits, HttpConfig};
use bulkhead_store::Visibility;
use http_body_util::BodyExt;
use serde_json::json;
use tower::ServiceExt;

use common::*;

/// Sends a request whose headers may hold any bytes, from `peer` when given.
async fn send_raw(
    server: &Server,
    method: Method,
    uri: &str,
    headers: &[(&str, &[u8])],
    body: Body,
    peer: Option<&str>,
) -> Reply {
    let mut request = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        request = request.header(*name, HeaderValue::from_bytes(value).expect("a header value"));
    }
    let mut request = request.body(body).expect("a request");
    if let Some(peer) = peer {
        let address: SocketAddr = peer.parse().expect("a socket address");
        request.extensions_mut().insert(ConnectInfo(address));
    }
    let response = server.app.clone().oneshot(request).await.expect("the router is infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.map(|body| body.to_bytes().to_vec()).unwrap_or_default();
    Reply { status, headers, body }
}

fn credentials(client: &Client) -> Vec<(&'static str, Vec<u8>)> {
    vec![("client_id", client.id.clone().into_bytes()), ("client_secret", client.secret.clone().into_bytes())]
}

fn as_refs<'a>(headers: &'a [(&'static str, Vec<u8>)]) -> Vec<(&'static str, &'a [u8])> {
    headers.iter().map(|(name, value)| (*name, value.as_slice())).collect()
}

// ---------------------------------------------------------------------------------------------
// User scope and malformed credential headers
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_unreadable_user_id_is_refused_never_read_as_the_whole_tenant() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let alice = server.create_as(&client, Some("alice"), patient("Alice")).await;
    let path = format!("/r4/Patient/{}", id_of(&alice));
    let mut replacement = alice.clone();
    replacement["name"] = json!([{"family": "Overwritten"}]);

    for user in [&b"bob\x80"[..], b"\xff", b"al\xe9ice", b"bob\xc3\xa9"] {
        let mut headers = credentials(&client);
        headers.push(("x-oneup-user-id", user.to_vec()));
        let headers = as_refs(&headers);
        let read = send_raw(&server, Method::GET, &path, &headers, Body::empty(), None).await;
        assert_outcome(&read, 400, "value", Some("x-oneup-user-id"));
        let search = send_raw(&server, Method::GET, "/r4/Patient", &headers, Body::empty(), None).await;
        assert_outcome(&search, 400, "value", Some("x-oneup-user-id"));
        let mut with_json = headers.clone();
        with_json.push(("content-type", b"application/fhir+json"));
        let body = Body::from(replacement.to_string());
        let overwrite = send_raw(&server, Method::PUT, &path, &with_json, body, None).await;
        assert_outcome(&overwrite, 400, "value", Some("x-oneup-user-id"));
        let delete = send_raw(&server, Method::DELETE, &path, &headers, Body::empty(), None).await;
        assert_outcome(&delete, 400, "value", Some("x-oneup-user-id"));
    }
    // Two different user ids: refused, not "the first one" or "none".
    let mut headers = credentials(&client);
    headers.push(("x-oneup-user-id", b"bob".to_vec()));
    headers.push(("x-oneup-user-id", b"alice".to_vec()));
    let reply = send_raw(&server, Method::DELETE, &path, &as_refs(&headers), Body::empty(), None).await;
    assert_outcome(&reply, 400, "value", Some("x-oneup-user-id"));

    // Alice's resource is untouched, and still invisible to bob.
    let stored =
        server.store.read(client_tenant(&server), &Visibility::User("alice".into()), "Patient", &id_of(&alice));
    let stored = stored.unwrap().expect("alice's patient exists");
    assert!(!stored.deleted, "the patient was deleted");
    assert_eq!(stored.version, 1, "the patient was overwritten");
    let as_bob = server.send(get(&path).by(&client).header("x-oneup-user-id", "bob")).await;
    assert_status(&as_bob, 404);
}

fn client_tenant(server: &Server) -> bulkhead_store::TenantId {
    server.store.tenant_by_name("acme").unwrap().expect("tenant acme").id
}

#[tokio::test]
async fn malformed_client_credentials_are_refused_not_ignored() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let other = server.tenant_client("other");
    let cases: Vec<Vec<(&str, Vec<u8>)>> = vec![
        vec![("client_id", b"bh_\xff".to_vec()), ("client_secret", client.secret.clone().into_bytes())],
        vec![("client_id", client.id.clone().into_bytes()), ("client_secret", b"s\x80cret".to_vec())],
        // The same credential header twice with different values, under either spelling.
        [credentials(&client), vec![("client_id", other.id.clone().into_bytes())]].concat(),
        [credentials(&client), vec![("client-id", other.id.clone().into_bytes())]].concat(),
        [credentials(&client), vec![("client-secret", other.secret.clone().into_bytes())]].concat(),
    ];
    for headers in &cases {
        let reply = send_raw(&server, Method::GET, "/r4/Patient", &as_refs(headers), Body::empty(), None).await;
        assert_error(&reply, 400, "value");
    }
    // The same value twice is one value.
    let twice = [credentials(&client), credentials(&client)].concat();
    let reply = send_raw(&server, Method::GET, "/r4/Patient", &as_refs(&twice), Body::empty(), None).await;
    assert_status(&reply, 200);
    // Oversized credentials are a plain failed login.
    let long = vec![("client_id", vec![b'a'; 4096]), ("client_secret", client.secret.clone().into_bytes())];
    let reply = send_raw(&server, Method::GET, "/r4/Patient", &as_refs(&long), Body::empty(), None).await;
    assert_outcome(&reply, 401, "login", None);
}

// ---------------------------------------------------------------------------------------------
// Credential checks: cost, migration, rate limits
// ---------------------------------------------------------------------------------------------

fn with_verifier(config: HttpConfig) -> (Server, Arc<SecretVerifier>) {
    let mut verifier = None;
    let server = Server::with_state(config, |state| verifier = Some(state.verifier.clone()));
    (server, verifier.expect("the state has a verifier"))
}

#[tokio::test]
async fn a_wrong_secret_costs_what_an_unknown_id_costs() {
    let (server, verifier) = with_verifier(test_config());
    let client = server.tenant_client("acme");
    let wrong = Client { id: client.id.clone(), secret: "x".repeat(43) };
    let unknown = Client { id: "bh_0000000000000000".into(), secret: client.secret.clone() };
    for _ in 0..5 {
        assert_outcome(&server.send(get("/r4/Patient").by(&wrong)).await, 401, "login", None);
        assert_outcome(&server.send(get("/r4/Patient").by(&unknown)).await, 401, "login", None);
    }
    assert_status(&server.send(get("/r4/Patient").by(&client)).await, 200);
    assert_eq!(verifier.argon2_runs(), 0, "no Argon2 for keyed hashes, whatever the secret");
    let stored = server.store.client(&client.id).unwrap().unwrap().secret_hash;
    assert!(stored.starts_with("hmac-sha256$"), "{stored}");
}

#[tokio::test]
async fn an_argon2_row_is_rehashed_on_its_next_successful_login() {
    let (server, verifier) = with_verifier(test_config());
    let tenant = server.tenant("acme");
    let secret = "legacy-secret-of-an-older-version-000000000";
    server.store.create_client(tenant, "bh_legacy00000000000", &legacy_argon2_hash(secret)).unwrap();
    let legacy = Client { id: "bh_legacy00000000000".into(), secret: secret.into() };
    let wrong = Client { id: legacy.id.clone(), secret: "wrong".into() };

    assert_outcome(&server.send(get("/r4/Patient").by(&wrong)).await, 401, "login", None);
    assert_eq!(verifier.argon2_runs(), 1, "an unmigrated row still needs Argon2");
    assert_status(&server.send(get("/r4/Patient").by(&legacy)).await, 200);
    assert_eq!(verifier.argon2_runs(), 2);
    let stored = server.store.client(&legacy.id).unwrap().unwrap().secret_hash;
    assert!(stored.starts_with("hmac-sha256$"), "migrated on success: {stored}");
    assert!(!stored.contains(secret));

    assert_status(&server.send(get("/r4/Patient").by(&legacy)).await, 200);
    assert_outcome(&server.send(get("/r4/Patient").by(&wrong)).await, 401, "login", None);
    assert_eq!(verifier.argon2_runs(), 2, "a migrated row never runs Argon2 again");
}

#[tokio::test]
async fn failed_logins_are_limited_per_peer_and_per_client_id() {
    let limits = LoginLimits { per_peer: 3, per_client: 5, window: Duration::from_secs(60), max_tracked: 100 };
    let server = Server::with_config(HttpConfig { login_limits: limits, ..test_config() });
    let victim = server.tenant_client("acme");
    let bystander = server.tenant_client("other");
    let wrong = credentials(&Client { id: victim.id.clone(), secret: "guess".into() });
    let (attacker, friend, third) = (Some("10.0.0.66:4000"), Some("10.0.0.7:5000"), Some("10.0.0.8:5000"));
    let get_as = |headers: Vec<(&'static str, Vec<u8>)>, peer: Option<&'static str>| {
        let server = &server;
        async move { send_raw(server, Method::GET, "/r4/Patient", &as_refs(&headers), Body::empty(), peer).await }
    };

    for _ in 0..3 {
        assert_outcome(&get_as(wrong.clone(), attacker).await, 401, "login", None);
    }
    // The attacker's peer is now refused without a check, even with good credentials.
    let throttled = get_as(wrong.clone(), attacker).await;
    assert_error(&throttled, 429, "throttled");
    let retry_after: u64 = throttled.header("retry-after").parse().expect("Retry-After in seconds");
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    assert_error(&get_as(credentials(&bystander), attacker).await, 429, "throttled");

    // Another peer is unaffected, for another client and for the attacked one (3 of its 5).
    assert_status(&get_as(credentials(&bystander), friend).await, 200);
    assert_status(&get_as(credentials(&victim), friend).await, 200);

    // Two more failures for the victim's id from a third peer reach the per-client limit.
    for _ in 0..2 {
        assert_outcome(&get_as(wrong.clone(), third).await, 401, "login", None);
    }
    assert_error(&get_as(credentials(&victim), friend).await, 429, "throttled");
    assert_status(&get_as(credentials(&bystander), friend).await, 200);
    // Requests without credentials are never throttled.
    let metadata = send_raw(&server, Method::GET, "/r4/metadata", &[], Body::empty(), attacker).await;
    assert_status(&metadata, 200);
}

// ---------------------------------------------------------------------------------------------
// Search, admin, Host
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_search_parameter_repeated_a_thousand_times_is_a_400() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    for (name, value) in
        [("identifier", "urn:x|1"), ("_id", "p1"), ("subject", "Patient/p1"), ("_lastUpdated", "gt2020")]
    {
        let query = vec![format!("{name}={value}"); 1000].join("&");
        let reply = server.send(get(&format!("/r4/Observation?{query}")).by(&client)).await;
        assert_error(&reply, 400, "too-costly");
    }
    let ids: Vec<String> = (0..5000).map(|n| format!("p{n}")).collect();
    let reply = server.send(get(&format!("/r4/Patient?_id={}", ids.join(","))).by(&client)).await;
    assert_error(&reply, 400, "too-costly");
    // A few repeats stay fine.
    let reply = server.send(get("/r4/Observation?identifier=urn:x|1&identifier=urn:y|2&_id=a,b,c").by(&client)).await;
    assert_status(&reply, 200);
}

#[tokio::test]
async fn admin_routes_check_the_token_before_reading_the_request() {
    let config = HttpConfig { admin_token: Some("admin-token-0123456789".into()), ..test_config() };
    let server = Server::with_config(config);
    let malformed = post("/admin/tenants").raw("application/json", "{not json");
    assert_outcome(&server.send(malformed).await, 401, "login", None);
    let wrong = post("/admin/tenants").header("authorization", "Bearer wrong").raw("text/plain", "{");
    assert_outcome(&server.send(wrong).await, 401, "login", None);
    let bad_path = post("/admin/tenants/%FF/clients").header("authorization", "Bearer wrong");
    assert_outcome(&server.send(bad_path).await, 401, "login", None);
    // With the token, the body is parsed and refused for what it is.
    let right =
        post("/admin/tenants").header("authorization", "Bearer admin-token-0123456789").raw("application/json", "{");
    assert_error(&server.send(right).await, 400, "structure");
}

#[tokio::test]
async fn a_forged_host_does_not_reach_minted_urls() {
    let forged = "evil.example";
    // With public_base_url: every URL uses it.
    let server = Server::start();
    let client = server.tenant_client("acme");
    let patient_id = id_of(&server.create(&client, patient("Chalmers")).await);
    let group = server.create(&client, group_of(&[&patient_id])).await;
    let create = server.send(post("/r4/Patient").by(&client).header("host", forged).json(&patient("Other"))).await;
    assert_status(&create, 201);
    assert!(create.header("location").starts_with(BASE), "{}", create.header("location"));
    let export_path = format!("/bulk-data/r4/Group/{}/$export", id_of(&group));
    let manifest = server.send(get(&export_path).by(&client).header("host", forged)).await;
    assert_status(&manifest, 200);
    assert!(!manifest.text().contains(forged), "{}", manifest.text());
    assert!(manifest.json()["output"][0]["url"].as_str().unwrap().starts_with(BASE));

    // Without public_base_url and not trusting Host: the configured fallback.
    let config = HttpConfig {
        public_base_url: None,
        trust_host_header: false,
        fallback_base_url: "http://10.1.2.3:8080".into(),
        ..HttpConfig::default()
    };
    let server = Server::with_config(config);
    let client = server.tenant_client("acme");
    let create = server.send(post("/r4/Patient").by(&client).header("host", forged).json(&patient("Other"))).await;
    assert_status(&create, 201);
    assert!(create.header("location").starts_with("http://10.1.2.3:8080/r4/Patient/"), "{}", create.header("location"));
    let search = server.send(get("/r4/Patient").by(&client).header("host", forged)).await;
    assert!(!search.text().contains(forged), "{}", search.text());

    // Trusting Host (a loopback listen, or configured): it is used.
    let server = Server::with_config(HttpConfig { public_base_url: None, ..HttpConfig::default() });
    let client = server.tenant_client("acme");
    let create = server.send(post("/r4/Patient").by(&client).header("host", "fhir.local:9").json(&patient("X"))).await;
    assert!(create.header("location").starts_with("http://fhir.local:9/r4/Patient/"));
}

// ---------------------------------------------------------------------------------------------
// Bodies that stall or abort, and errors that must be OperationOutcomes
// ---------------------------------------------------------------------------------------------

fn quick_limits() -> HttpConfig {
    let limits = ConnectionLimits {
        body_idle_timeout: Duration::from_millis(300),
        request_timeout: Duration::from_secs(2),
        ..ConnectionLimits::default()
    };
    HttpConfig { limits, ..test_config() }
}

fn json_headers(client: &Client) -> Vec<(&'static str, Vec<u8>)> {
    [credentials(client), vec![("content-type", b"application/fhir+json".to_vec())]].concat()
}

#[tokio::test]
async fn a_body_that_stalls_or_trickles_is_a_408_and_one_that_aborts_a_400() {
    let server = Server::with_config(quick_limits());
    let client = server.tenant_client("acme");
    let headers = json_headers(&client);

    let stalled = futures::stream::once(async { Ok::<_, std::io::Error>(Bytes::from_static(b"{\"resourceType\"")) })
        .chain(futures::stream::pending());
    let started = std::time::Instant::now();
    let reply =
        send_raw(&server, Method::POST, "/r4/Patient", &as_refs(&headers), Body::from_stream(stalled), None).await;
    assert_error(&reply, 408, "timeout");
    assert_eq!(reply.header("connection"), "close");
    assert!(started.elapsed() < Duration::from_secs(2), "the idle timeout, not the total one");

    // A byte every 100 ms never pauses for 300 ms, but the request takes longer than 2 s.
    let trickle = futures::stream::unfold((), |()| async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((Ok::<_, std::io::Error>(Bytes::from_static(b" ")), ()))
    });
    let reply =
        send_raw(&server, Method::POST, "/r4/Patient", &as_refs(&headers), Body::from_stream(trickle), None).await;
    assert_error(&reply, 408, "timeout");
    assert!(started.elapsed() >= Duration::from_secs(2));

    let aborted = futures::stream::iter([
        Ok(Bytes::from_static(b"{\"resourceType\":")),
        Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "client went away")),
    ]);
    let reply =
        send_raw(&server, Method::POST, "/r4/Patient", &as_refs(&headers), Body::from_stream(aborted), None).await;
    assert_error(&reply, 400, "structure");
    assert!(server.search_all(&client, "/r4/Patient").await.is_empty(), "nothing was stored");
}

use futures::StreamExt;

#[tokio::test]
async fn every_error_is_an_operation_outcome() {
    let config = HttpConfig { max_body_bytes: 2048, ..quick_limits() };
    let server = Server::with_config(config);
    let client = server.tenant_client("acme");
    let big = json!({"resourceType": "Patient", "name": [{"family": "x".repeat(4096)}]});
    let cases: Vec<(Call, u16, &str)> = vec![
        (get("/no/such/route"), 404, "not-found"),
        (get("/bulk-data/r4/Group"), 404, "not-found"),
        (request(Method::PUT, "/healthz"), 405, "not-supported"),
        (request(Method::DELETE, "/r4").by(&client), 405, "not-supported"),
        (request(Method::PATCH, "/r4/Patient/1").by(&client), 405, "not-supported"),
        (get("/r4/Patient/%FF").by(&client), 400, "invalid"),
        (get("/r4/Patient/%FF/_history/1").by(&client), 400, "invalid"),
        (get("/r4/Patient"), 401, "login"),
        (post("/r4/Patient").by(&client).raw("application/fhir+json", "{not json"), 400, "structure"),
        (post("/r4/Patient").by(&client).raw("application/xml", "<Patient/>"), 415, "not-supported"),
        (post("/r4/Patient").by(&client).json(&big), 413, "too-costly"),
        (get("/r4/Patient").by(&client).header("accept", "application/fhir+xml"), 406, "not-supported"),
        (get("/r4/Patient?name=x").by(&client), 400, "not-supported"),
    ];
    for (call, status, code) in cases {
        let what = format!("{} {}", call.method, call.uri);
        let reply = server.send(call).await;
        assert_eq!(reply.status.as_u16(), status, "{what}: {}", reply.text());
        assert_eq!(
            reply.headers.get("content-type").map(|v| v.to_str().unwrap()),
            Some("application/fhir+json"),
            "{what}"
        );
        let outcome = reply.json();
        assert_eq!(outcome["resourceType"], "OperationOutcome", "{what}: {outcome}");
        assert_eq!(outcome["issue"][0]["code"], code, "{what}: {outcome}");
    }
}
