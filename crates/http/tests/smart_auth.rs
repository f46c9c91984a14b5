//! SMART Backend Services end to end, in process: RSA and EC P-384 keys made here, JWK Sets
//! registered inline or served from a loopback HTTP server, client assertions signed with them,
//! tokens from `POST /auth/token`, and those tokens used on FHIR routes and exports; every
//! refusal the issue lists, each issuing no token; discovery; HTTP Basic.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::http::HeaderMap;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bulkhead_store::{ClientRegistration, TenantId};
use common::{
    assert_error, assert_status, get, group_of, local, patient, post, token_keys, Call, Client, Reply, Server,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const TOKEN_URL: &str = "http://bulkhead.test/auth/token";

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

/// The operating system's randomness as the `rand_core` 0.10 generator the RSA crate wants.
struct SystemRandom;

impl rand_core::TryRng for SystemRandom {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(rand::random())
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        Ok(rand::random())
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        rand::RngCore::fill_bytes(&mut rand::rng(), dst);
        Ok(())
    }
}

impl rand_core::TryCryptoRng for SystemRandom {}

/// A client's signing key and its public JWK.
#[derive(Clone)]
struct TestKey {
    alg: Algorithm,
    kid: String,
    signing: EncodingKey,
    public: Value,
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A new EC P-384 key.
fn ec_key(kid: &str) -> TestKey {
    use p384::elliptic_curve::sec1::ToSec1Point;
    use p384::pkcs8::EncodePrivateKey;
    let secret = loop {
        let mut bytes = [0u8; 48];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
        if let Ok(secret) = p384::SecretKey::from_slice(&bytes) {
            break secret;
        }
    };
    let point = secret.public_key().to_sec1_point(false);
    let public = json!({
        "kty": "EC", "crv": "P-384", "kid": kid, "alg": "ES384", "use": "sig", "key_ops": ["verify"],
        "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap()),
    });
    let der = secret.to_pkcs8_der().unwrap();
    TestKey { alg: Algorithm::ES384, kid: kid.into(), signing: EncodingKey::from_ec_der(der.as_bytes()), public }
}

/// The RSA key material (2048 bits), made once per test run: generating one takes a while.
fn rsa_material() -> &'static (Vec<u8>, String, String) {
    static MATERIAL: OnceLock<(Vec<u8>, String, String)> = OnceLock::new();
    MATERIAL.get_or_init(|| {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::traits::PublicKeyParts;
        let key = rsa::PrivateKey::new(&mut SystemRandom, 2048).unwrap();
        let minimal = |bytes: Box<[u8]>| {
            let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
            b64(&bytes[start..])
        };
        let (n, e) = (minimal(key.n().to_be_bytes()), minimal(key.e().to_be_bytes()));
        (key.to_pkcs1_der().unwrap().as_bytes().to_vec(), n, e)
    })
}

/// An RSA key usable with RS384 (and RS256).
fn rsa_key(kid: &str) -> TestKey {
    let (der, n, e) = rsa_material();
    let public = json!({"kty": "RSA", "kid": kid, "alg": "RS384", "n": n, "e": e});
    TestKey { alg: Algorithm::RS384, kid: kid.into(), signing: EncodingKey::from_rsa_der(der), public }
}

fn jwks(keys: &[&TestKey]) -> Value {
    json!({"keys": keys.iter().map(|key| key.public.clone()).collect::<Vec<_>>()})
}

// ---------------------------------------------------------------------------------------------
// Assertions and token requests
// ---------------------------------------------------------------------------------------------

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// The claims a well-behaved client sends (Inferno's shape: exp = now + 300).
fn claims(client_id: &str) -> Value {
    json!({"iss": client_id, "sub": client_id, "aud": TOKEN_URL, "exp": now() + 300, "jti": uuid::Uuid::new_v4().to_string()})
}

fn sign(key: &TestKey, claims: &Value) -> String {
    sign_with(key, claims, |_| {})
}

fn sign_with(key: &TestKey, claims: &Value, adjust: impl FnOnce(&mut Header)) -> String {
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.clone());
    adjust(&mut header);
    jsonwebtoken::encode(&header, claims, &key.signing).unwrap()
}

fn form(fields: &[(&str, &str)]) -> String {
    let mut form = form_urlencoded::Serializer::new(String::new());
    for (name, value) in fields {
        form.append_pair(name, value);
    }
    form.finish()
}

fn token_request(assertion: &str, scope: &str) -> Call {
    token_form(&[
        ("grant_type", "client_credentials"),
        ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
        ("client_assertion", assertion),
        ("scope", scope),
    ])
}

fn token_form(fields: &[(&str, &str)]) -> Call {
    post("/auth/token").raw("application/x-www-form-urlencoded", form(fields))
}

/// A 200 token answer: checks its shape and returns the access token.
#[track_caller]
fn granted(reply: &Reply, scope: &str, expires_in: u64) -> String {
    assert_status(reply, 200);
    assert_eq!(reply.header("cache-control"), "no-store");
    assert!(reply.header("content-type").starts_with("application/json"));
    let body = reply.json();
    assert_eq!(body["token_type"], "bearer", "{body}");
    assert_eq!(body["expires_in"], json!(expires_in), "{body}");
    assert_eq!(body["scope"], scope, "{body}");
    assert!(body.get("refresh_token").is_none(), "{body}");
    body["access_token"].as_str().expect("access_token").to_owned()
}

/// An RFC 6749 error answer that issued no token.
#[track_caller]
fn refused(reply: &Reply, status: u16, error: &str) -> String {
    assert_status(reply, status);
    assert_eq!(reply.header("cache-control"), "no-store");
    let body = reply.json();
    assert_eq!(body["error"], error, "{body}");
    assert!(body.get("access_token").is_none(), "{body}");
    body["error_description"].as_str().expect("error_description").to_owned()
}

fn bearer(call: Call, token: &str) -> Call {
    call.header("authorization", &format!("Bearer {token}"))
}

/// Registers a SMART client of `tenant` straight in the store.
fn smart_client(server: &Server, tenant: TenantId, registration: ClientRegistration) -> Client {
    let (_, credentials) =
        bulkhead_http::registration::create_client(server.store.as_ref(), tenant, Some(&registration), false)
            .expect("registration accepted");
    Client { id: credentials.client_id, secret: credentials.client_secret }
}

fn inline(keys: &[&TestKey], scopes: &str) -> ClientRegistration {
    ClientRegistration { jwks: Some(jwks(keys).to_string()), scopes: Some(scopes.into()), ..Default::default() }
}

// ---------------------------------------------------------------------------------------------
// A JWK Set served over loopback HTTP
// ---------------------------------------------------------------------------------------------

/// A JWK Set at `http://127.0.0.1:PORT/jwks.json`, changeable while it is served, counting
/// fetches.
struct JwksHost {
    url: String,
    served: Arc<Mutex<(Value, &'static str)>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksHost {
    async fn start(set: Value, cache_control: &'static str) -> JwksHost {
        let served = Arc::new(Mutex::new((set, cache_control)));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (state, count) = (served.clone(), fetches.clone());
        let app = axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || {
                let (state, count) = (state.clone(), count.clone());
                async move {
                    count.fetch_add(1, Ordering::SeqCst);
                    let (set, cache_control) = state.lock().unwrap().clone();
                    let mut headers = HeaderMap::new();
                    headers.insert("content-type", "application/json".parse().unwrap());
                    headers.insert("cache-control", cache_control.parse().unwrap());
                    (headers, set.to_string())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        JwksHost { url, served, fetches }
    }

    fn serve(&self, set: Value, cache_control: &'static str) {
        *self.served.lock().unwrap() = (set, cache_control);
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn es384_and_rs384_assertions_get_tokens_that_work_on_fhir_routes() {
    let server = Server::start();
    let tenant = server.tenant("acme");
    let (ec, rsa) = (ec_key("ec-1"), rsa_key("rsa-1"));
    let registration = ClientRegistration { token_ttl_seconds: Some(900), ..inline(&[&ec, &rsa], "system/*.cruds") };
    let client = smart_client(&server, tenant, registration);

    let reply = server.send(token_request(&sign(&ec, &claims(&client.id)), "system/*.cruds")).await;
    let writer = granted(&reply, "system/*.cruds", 900);
    let reply = server.send(token_request(&sign(&rsa, &claims(&client.id)), "system/*.read")).await;
    let reader = granted(&reply, "system/*.read", 900);
    // RS256 is advertised too; the RSA key (whose JWK names RS384) is only for RS384.
    let rs256 = TestKey { alg: Algorithm::RS256, public: json!({}), ..rsa_key("rsa-1") };
    let reply = server.send(token_request(&sign(&rs256, &claims(&client.id)), "system/*.read")).await;
    assert!(refused(&reply, 401, "invalid_client").contains("rsa-1"));

    let created = server.send(bearer(post("/r4/Patient"), &writer).json(&patient("Token"))).await;
    assert_status(&created, 201);
    let id = created.json()["id"].as_str().unwrap().to_owned();
    assert_status(&server.send(bearer(get(&format!("/r4/Patient/{id}")), &reader)).await, 200);
    assert_status(&server.send(bearer(get("/r4/Patient?_count=5"), &reader)).await, 200);
    assert_status(&server.send(bearer(get(&format!("/r4/Patient/{id}/_history")), &reader)).await, 200);
    // Read-only scopes: no writes, 403 OperationOutcome.
    let write = server.send(bearer(post("/r4/Patient"), &reader).json(&patient("Nope"))).await;
    assert_error(&write, 403, "forbidden");
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": patient("InBundle"), "request": {"method": "POST", "url": "Patient"}}]});
    assert_error(&server.send(bearer(post("/r4"), &reader).json(&bundle)).await, 403, "forbidden");
    assert_status(&server.send(bearer(post("/r4"), &writer).json(&bundle)).await, 200);
    let upload = bearer(post("/r4/$upload-ndjson"), &reader).raw("application/fhir+ndjson", patient("U").to_string());
    assert_error(&server.send(upload).await, 403, "forbidden");

    // No credentials: 401, never 403; an empty bearer is no credentials.
    assert_error(&server.send(get(&format!("/r4/Patient/{id}"))).await, 401, "login");
    assert_error(
        &server.send(get(&format!("/r4/Patient/{id}")).header("authorization", "Bearer ")).await,
        401,
        "login",
    );
    // A tampered token: 401.
    let mut tampered = reader.clone().into_bytes();
    let at = tampered.len() / 2;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    assert_error(&server.send(bearer(get(&format!("/r4/Patient/{id}")), &tampered)).await, 401, "login");
    // A file token is not an access token, and a token of another server's key is nothing.
    let foreign = TestKey {
        alg: Algorithm::HS256,
        kid: "k1".into(),
        signing: EncodingKey::from_secret(b"x").unwrap(),
        public: json!({}),
    };
    let forged = sign(
        &foreign,
        &json!({"sub": client.id, "tenant": tenant.0, "scope": "system/*.cruds", "iat": now(), "exp": now() + 60, "jti": "x"}),
    );
    assert_error(&server.send(bearer(get(&format!("/r4/Patient/{id}")), &forged)).await, 401, "login");
    // Both kinds of credentials at once: refused rather than guessed.
    let both = bearer(get(&format!("/r4/Patient/{id}")), &reader)
        .header("client_id", &client.id)
        .header("client_secret", &client.secret);
    assert_status(&server.send(both).await, 400);
}

#[tokio::test]
async fn a_token_used_after_its_expiry_or_after_revocation_is_refused() {
    let server = Server::start();
    let tenant = server.tenant("acme");
    let ec = ec_key("ec-1");
    let client = smart_client(&server, tenant, inline(&[&ec], "system/*.cruds"));
    let created = server.create(&client, patient("Old")).await;
    let path = format!("/r4/Patient/{}", created["id"].as_str().unwrap());
    // Signed by this server's key, for this client, expired a second ago.
    let expired = bulkhead_http::access_token::issue(
        &token_keys(),
        &client.id,
        tenant.0,
        "system/*.rs",
        Duration::from_secs(300),
        now() - 301,
    );
    let reply = server.send(bearer(get(&path), &expired)).await;
    let outcome = assert_error(&reply, 401, "login");
    assert!(outcome["issue"][0]["diagnostics"].as_str().unwrap().contains("expired"), "{outcome}");
    let live = bulkhead_http::access_token::issue(
        &token_keys(),
        &client.id,
        tenant.0,
        "system/*.rs",
        Duration::from_secs(300),
        now(),
    );
    assert_status(&server.send(bearer(get(&path), &live)).await, 200);
    server.store.revoke_client(&client.id).unwrap();
    assert_error(&server.send(bearer(get(&path), &live)).await, 401, "login");
}

#[tokio::test]
async fn every_bad_token_request_is_answered_as_rfc_6749_says_and_issues_no_token() {
    let server = Server::start();
    let tenant = server.tenant("acme");
    let (ec, rsa) = (ec_key("ec-1"), rsa_key("rsa-1"));
    let client = smart_client(&server, tenant, inline(&[&ec, &rsa], "system/Patient.rs system/Observation.rs"));
    let good_scope = "system/Patient.rs";
    let with = |key: &str, value: Value| {
        let mut claims = claims(&client.id);
        claims[key] = value;
        claims
    };

    let cases: Vec<(&str, Call, u16, &str)> = vec![
        (
            "wrong aud",
            token_request(&sign(&ec, &with("aud", json!("http://elsewhere/auth/token"))), good_scope),
            401,
            "invalid_client",
        ),
        (
            "expired assertion",
            token_request(&sign(&ec, &with("exp", json!(now() - 120))), good_scope),
            401,
            "invalid_client",
        ),
        (
            "exp too far ahead",
            token_request(&sign(&ec, &with("exp", json!(now() + 3600))), good_scope),
            401,
            "invalid_client",
        ),
        (
            "iss differs from sub",
            token_request(&sign(&ec, &with("sub", json!("bh_other"))), good_scope),
            401,
            "invalid_client",
        ),
        (
            "unknown kid",
            token_request(&sign(&TestKey { kid: "nope".into(), ..ec.clone() }, &claims(&client.id)), good_scope),
            401,
            "invalid_client",
        ),
        (
            "unknown client",
            token_request(
                &sign(
                    &ec,
                    &json!({"iss": "bh_unknown", "sub": "bh_unknown", "aud": TOKEN_URL, "exp": now() + 300, "jti": "u1"}),
                ),
                good_scope,
            ),
            401,
            "invalid_client",
        ),
        (
            "a jku though the keys are inline",
            token_request(
                &sign_with(&ec, &claims(&client.id), |header| header.jku = Some("http://127.0.0.1:1/jwks.json".into())),
                good_scope,
            ),
            401,
            "invalid_client",
        ),
        (
            "bad grant_type",
            token_form(&[
                ("grant_type", "not_a_grant_type"),
                ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
                ("client_assertion", &sign(&ec, &claims(&client.id))),
                ("scope", good_scope),
            ]),
            400,
            "unsupported_grant_type",
        ),
        (
            "bad client_assertion_type",
            token_form(&[
                ("grant_type", "client_credentials"),
                ("client_assertion_type", "not_an_assertion_type"),
                ("client_assertion", &sign(&ec, &claims(&client.id))),
                ("scope", good_scope),
            ]),
            400,
            "invalid_request",
        ),
        (
            "no scope",
            token_form(&[
                ("grant_type", "client_credentials"),
                ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
                ("client_assertion", &sign(&ec, &claims(&client.id))),
            ]),
            400,
            "invalid_request",
        ),
        (
            "scope beyond the registration",
            token_request(&sign(&ec, &claims(&client.id)), "system/Condition.rs"),
            400,
            "invalid_scope",
        ),
        ("a patient scope", token_request(&sign(&ec, &claims(&client.id)), "patient/*.read"), 400, "invalid_scope"),
        (
            // RFC 7521 §4.2: a client_id sent alongside the assertion must name the same client.
            "a client_id naming another client",
            token_form(&[
                ("grant_type", "client_credentials"),
                ("client_id", "bh_other"),
                ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
                ("client_assertion", &sign(&ec, &claims(&client.id))),
                ("scope", good_scope),
            ]),
            401,
            "invalid_client",
        ),
        ("not a form", post("/auth/token").raw("application/json", "{}"), 400, "invalid_request"),
    ];
    for (name, call, status, error) in cases {
        let reply = server.send(call).await;
        assert_eq!(reply.status.as_u16(), status, "{name}: {}", reply.text());
        refused(&reply, status, error);
    }

    // alg none: an unsigned assertion.
    let header = b64(json!({"alg": "none", "typ": "JWT", "kid": "ec-1"}).to_string().as_bytes());
    let unsigned = format!("{header}.{}.", b64(claims(&client.id).to_string().as_bytes()));
    refused(&server.send(token_request(&unsigned, good_scope)).await, 401, "invalid_client");
    // HS256 signed with the public key as the secret (the classic key-confusion attack).
    let public_text = jwks(&[&rsa]).to_string();
    let confused = TestKey {
        alg: Algorithm::HS256,
        kid: "rsa-1".into(),
        signing: EncodingKey::from_secret(public_text.as_bytes()).unwrap(),
        public: json!({}),
    };
    let reply = server.send(token_request(&sign(&confused, &claims(&client.id)), good_scope)).await;
    assert!(refused(&reply, 401, "invalid_client").contains("HS256"));
    // The same kid twice (an RSA and an RSA key): no guessing which.
    let twice = smart_client(
        &server,
        tenant,
        ClientRegistration {
            jwks: Some(json!({"keys": [rsa.public, rsa_key("rsa-1").public]}).to_string()),
            ..Default::default()
        },
    );
    let reply = server.send(token_request(&sign(&rsa, &claims(&twice.id)), good_scope)).await;
    assert!(refused(&reply, 401, "invalid_client").contains("more than one"));
    // A replayed jti: the first use succeeds, the second is refused, on any instance.
    let once = sign(&ec, &claims(&client.id));
    granted(&server.send(token_request(&once, good_scope)).await, "system/Patient.rs", 300);
    refused(&server.send(token_request(&once, good_scope)).await, 401, "invalid_client");
    let replay = server.sibling();
    refused(&replay.send(token_request(&once, good_scope)).await, 401, "invalid_client");
    // A revoked client.
    server.store.revoke_client(&client.id).unwrap();
    refused(&server.send(token_request(&sign(&ec, &claims(&client.id)), good_scope)).await, 401, "invalid_client");
}

#[tokio::test]
async fn jwks_urls_are_cached_as_cache_control_allows_and_refetched_for_a_new_kid() {
    let server = Server::start();
    let tenant = server.tenant("acme");
    let first = ec_key("first");
    let host = JwksHost::start(jwks(&[&first]), "max-age=300").await;
    let client = smart_client(
        &server,
        tenant,
        ClientRegistration {
            jwks_url: Some(host.url.clone()),
            scopes: Some("system/*.rs".into()),
            ..Default::default()
        },
    );
    let scope = "system/*.rs";
    granted(&server.send(token_request(&sign(&first, &claims(&client.id)), scope)).await, scope, 300);
    granted(&server.send(token_request(&sign(&first, &claims(&client.id)), scope)).await, scope, 300);
    assert_eq!(host.fetches(), 1, "cached within max-age");
    // The client rotates its keys: an unknown kid fetches the set again.
    let second = ec_key("second");
    host.serve(jwks(&[&second]), "no-store");
    granted(&server.send(token_request(&sign(&second, &claims(&client.id)), scope)).await, scope, 300);
    assert_eq!(host.fetches(), 2);
    // no-store: never cached.
    granted(&server.send(token_request(&sign(&second, &claims(&client.id)), scope)).await, scope, 300);
    assert_eq!(host.fetches(), 3);
    // A jku must be the registered URL; the registered URL itself is fine.
    let elsewhere = sign_with(&second, &claims(&client.id), |header| header.jku = Some(format!("{}?other", host.url)));
    assert!(refused(&server.send(token_request(&elsewhere, scope)).await, 401, "invalid_client").contains("jku"));
    let same = sign_with(&second, &claims(&client.id), |header| header.jku = Some(host.url.clone()));
    granted(&server.send(token_request(&same, scope)).await, scope, 300);
    // The old key is gone from the set: refused.
    refused(&server.send(token_request(&sign(&first, &claims(&client.id)), scope)).await, 401, "invalid_client");
    // Plain http to a host that is not loopback is refused at registration.
    let remote = ClientRegistration { jwks_url: Some("http://keys.example/jwks.json".into()), ..Default::default() };
    assert!(bulkhead_http::registration::create_client(server.store.as_ref(), tenant, Some(&remote), false).is_err());
}

#[tokio::test]
async fn discovery_advertises_the_token_endpoint_at_each_fhir_base() {
    let server = Server::start();
    for base in ["/r4", "/bulk-data/r4"] {
        let reply =
            server.send(get(&format!("{base}/.well-known/smart-configuration")).header("accept", "text/html")).await;
        assert_status(&reply, 200);
        assert!(reply.header("content-type").starts_with("application/json"));
        let config = reply.json();
        assert_eq!(config["token_endpoint"], TOKEN_URL);
        assert_eq!(config["grant_types_supported"], json!(["client_credentials"]));
        assert_eq!(config["token_endpoint_auth_methods_supported"], json!(["private_key_jwt"]));
        let algorithms = config["token_endpoint_auth_signing_alg_values_supported"].as_array().unwrap();
        assert!(algorithms.contains(&json!("RS384")) && algorithms.contains(&json!("ES384")), "{config}");
        for capability in ["client-confidential-asymmetric", "permission-v1", "permission-v2"] {
            assert!(config["capabilities"].as_array().unwrap().contains(&json!(capability)), "{config}");
        }
        assert!(config["scopes_supported"].as_array().unwrap().contains(&json!("system/*.rs")), "{config}");
    }
    let metadata = server.send(get("/r4/metadata")).await.json();
    let security = &metadata["rest"][0]["security"];
    assert_eq!(security["service"][0]["coding"][0]["code"], "SMART-on-FHIR", "{security}");
    assert_eq!(
        security["extension"][0]["url"],
        "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
    );
    assert_eq!(security["extension"][0]["extension"][0], json!({"url": "token", "valueUri": TOKEN_URL}));
}

/// Fills a tenant with two patients, an Observation (by a Practitioner outside the Patient
/// compartment) and a Condition each, and a Group of both.
async fn cohort(server: &Server, client: &Client) -> String {
    let practitioner = server.create(client, json!({"resourceType": "Practitioner"})).await;
    let performer = json!([{"reference": format!("Practitioner/{}", practitioner["id"].as_str().unwrap())}]);
    let mut members = Vec::new();
    for family in ["One", "Two"] {
        let created = server.create(client, patient(family)).await;
        let id = created["id"].as_str().unwrap().to_owned();
        let subject = json!({"reference": format!("Patient/{id}")});
        server
            .create(
                client,
                json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": subject,
                    "performer": performer}),
            )
            .await;
        server.create(client, json!({"resourceType": "Condition", "subject": subject, "code": {"text": "y"}})).await;
        members.push(id);
    }
    let members: Vec<&str> = members.iter().map(String::as_str).collect();
    server.create(client, group_of(&members)).await["id"].as_str().unwrap().to_owned()
}

fn output_types(manifest: &Value) -> Vec<String> {
    let mut types: Vec<String> =
        manifest["output"].as_array().unwrap().iter().map(|item| item["type"].as_str().unwrap().to_owned()).collect();
    types.sort();
    types
}

#[tokio::test]
async fn scopes_limit_exports_and_files_belong_to_the_client_that_started_them() {
    let server = Server::start();
    let tenant = server.tenant("acme");
    let ec = ec_key("ec-1");
    let client = smart_client(&server, tenant, inline(&[&ec], "system/*.cruds"));
    let group = cohort(&server, &client).await;
    let server = &server;
    let token = |scope: &str| {
        let call = token_request(&sign(&ec, &claims(&client.id)), scope);
        async move { server.send(call).await.json()["access_token"].as_str().unwrap().to_owned() }
    };
    let limited = token("system/Group.rs system/Patient.rs system/Observation.read").await;
    let everything = token("system/*.read").await;
    let kick_off = format!("/r4/Group/{group}/$export");

    // Without _type: only the covered types.
    let reply = server.send(bearer(get(&kick_off), &limited).respond_async()).await;
    assert_status(&reply, 202);
    let status_url = local(reply.header("content-location"));
    let manifest = server.send(bearer(get(&status_url), &limited)).await;
    assert_status(&manifest, 200);
    let manifest = manifest.json();
    assert_eq!(output_types(&manifest), ["Group", "Observation", "Patient"]);
    assert_eq!(manifest["requiresAccessToken"], true);
    // An explicit _type the scopes do not cover: 403 OperationOutcome.
    let reply =
        server.send(bearer(get(&format!("{kick_off}?_type=Patient,Condition")), &limited).respond_async()).await;
    assert_error(&reply, 403, "forbidden");
    // A Group export needs read on Group (the token endpoint adds it for readers registered for it).
    let no_group = bulkhead_http::access_token::issue(
        &token_keys(),
        &client.id,
        tenant.0,
        "system/Patient.rs",
        Duration::from_secs(60),
        now(),
    );
    assert_error(&server.send(bearer(get(&kick_off), &no_group).respond_async()).await, 403, "forbidden");
    let granted_scope = server.send(token_request(&sign(&ec, &claims(&client.id)), "system/Patient.read")).await.json();
    assert_eq!(granted_scope["scope"], "system/Patient.read system/Group.rs");

    // Everything readable: every type, and the resources the compartments reference, as with
    // client credentials; the files need the token of this client.
    let reply = server.send(bearer(get(&kick_off), &everything).respond_async()).await;
    let status_url = local(reply.header("content-location"));
    let manifest = server.send(bearer(get(&status_url), &everything)).await.json();
    assert_eq!(output_types(&manifest), ["Condition", "Group", "Observation", "Patient", "Practitioner"]);
    let file = local(manifest["output"][0]["url"].as_str().unwrap());
    assert_error(&server.send(get(&file)).await, 401, "login");
    assert_status(&server.send(bearer(get(&file), &everything)).await, 200);
    assert_status(&server.send(get(&file).by(&client)).await, 200);
    // Another client of the same tenant: not its job, not its files.
    let other = server.client(tenant);
    assert_status(&server.send(get(&status_url).by(&other)).await, 404);
    assert_status(&server.send(get(&file).by(&other)).await, 404);
    assert_status(&server.send(common::delete(&status_url).by(&other)).await, 404);
    assert_status(&server.send(bearer(common::delete(&status_url), &everything)).await, 202);

    // A token of tenant A on tenant B's Group: 404.
    let b_client = server.tenant_client("globex");
    let b_group = cohort(server, &b_client).await;
    let reply = server.send(bearer(get(&format!("/r4/Group/{b_group}/$export")), &everything).respond_async()).await;
    assert_status(&reply, 404);
    // A synchronous export started with client headers follows the server's mode, as before.
    let reply = server.send(get(&format!("/bulk-data/r4/Group/{group}/$export")).by(&client)).await;
    assert_status(&reply, 200);
    assert_eq!(reply.json()["requiresAccessToken"], true);
}

#[tokio::test]
async fn basic_is_another_spelling_of_client_headers() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let created = server.create(&client, patient("Basic")).await;
    let path = format!("/r4/Patient/{}", created["id"].as_str().unwrap());
    let basic = |id: &str, secret: &str| {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}")))
    };
    let reply = server.send(get(&path).header("authorization", &basic(&client.id, &client.secret))).await;
    assert_status(&reply, 200);
    assert_eq!(reply.json(), created);
    assert_error(&server.send(get(&path).header("authorization", &basic(&client.id, "wrong"))).await, 401, "login");
    assert_error(
        &server.send(get(&path).header("authorization", &basic("bh_unknown", &client.secret))).await,
        401,
        "login",
    );
    assert_error(&server.send(get(&path).header("authorization", "Digest abc")).await, 401, "login");
    // A client registered with scopes keeps them under Basic and client headers alike.
    let tenant = server.store.client(&client.id).unwrap().unwrap().tenant;
    let reader = smart_client(
        &server,
        tenant,
        ClientRegistration { scopes: Some("system/Patient.rs".into()), ..Default::default() },
    );
    assert_status(&server.send(get(&path).header("authorization", &basic(&reader.id, &reader.secret))).await, 200);
    let write = post("/r4/Patient").header("authorization", &basic(&reader.id, &reader.secret)).json(&patient("No"));
    assert_error(&server.send(write).await, 403, "forbidden");
    assert_error(&server.send(post("/r4/Patient").by(&reader).json(&patient("No"))).await, 403, "forbidden");
}

#[tokio::test]
async fn the_admin_api_registers_smart_clients_and_refuses_bad_registrations() {
    let admin_token = "an-admin-token-of-some-length";
    let server = Server::with_config(bulkhead_http::HttpConfig {
        admin_token: Some(admin_token.into()),
        ..common::test_config()
    });
    server.tenant("acme");
    let admin = |call: Call| call.header("authorization", &format!("Bearer {admin_token}"));
    let ec = ec_key("ec-1");
    let body = json!({"jwks": jwks(&[&ec]), "scopes": "system/Patient.rs", "token_ttl_seconds": 120});
    let reply = server.send(admin(post("/admin/tenants/acme/clients")).raw("application/json", body.to_string())).await;
    assert_status(&reply, 201);
    let client_id = reply.json()["client_id"].as_str().unwrap().to_owned();
    let reply = server.send(token_request(&sign(&ec, &claims(&client_id)), "system/Patient.rs")).await;
    granted(&reply, "system/Patient.rs", 120);

    for bad in [
        json!({"jwks": {"keys": [{"kty": "EC", "crv": "P-384", "x": "AAAA", "y": "AAAA"}]}}),
        json!({"jwks": jwks(&[&ec]), "jwks_url": "https://keys.example/jwks.json"}),
        json!({"jwks_url": "http://keys.example/jwks.json"}),
        json!({"scopes": "patient/*.read"}),
        json!({"token_ttl_seconds": 86_400}),
        json!({"token_ttl_seconds": "soon"}),
    ] {
        let reply =
            server.send(admin(post("/admin/tenants/acme/clients")).raw("application/json", bad.to_string())).await;
        assert_error(&reply, 400, "value");
    }
    // Without a body: a client-headers client, as before.
    assert_status(&server.send(admin(post("/admin/tenants/acme/clients"))).await, 201);
}
