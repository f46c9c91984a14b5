//! Export file URLs: short whatever the kick-off asked (the details live in a stored, expiring
//! export record), and bound to the credentials mode they were minted in.

mod common;

use axum::body::Body;
use axum::http::Request;
use axum::Router;
use bulkhead_http::{router, AppState, HttpConfig};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use common::{assert_outcome, assert_status, get, local, put, test_config, token_keys, Call, Client, Reply, Server};

/// Every file URL of a manifest.
fn file_urls(manifest: &Value) -> Vec<String> {
    ["output", "deleted", "error"]
        .iter()
        .flat_map(|list| manifest[list].as_array().cloned().unwrap_or_default())
        .map(|item| item["url"].as_str().unwrap().to_owned())
        .collect()
}

/// A Patient, an Observation and a Group of that Patient, owned by `user` when given.
async fn cohort(server: &Server, client: &Client, user: Option<&str>, group: &str) {
    let bodies = [
        json!({"resourceType": "Patient", "id": "p1"}),
        json!({"resourceType": "Observation", "id": "o1", "status": "final",
               "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
               "subject": {"reference": "Patient/p1"}}),
        json!({"resourceType": "Group", "id": group, "type": "person", "actual": true,
               "member": [{"entity": {"reference": "Patient/p1"}}]}),
    ];
    for body in bodies {
        let path = format!("/r4/{}/{}", body["resourceType"].as_str().unwrap(), body["id"].as_str().unwrap());
        let mut call = put(&path).by(client).json(&body);
        if let Some(user) = user {
            call = call.header("x-oneup-user-id", user);
        }
        assert!(server.send(call).await.status.is_success(), "PUT {path}");
    }
}

#[tokio::test]
async fn file_urls_stay_short_whatever_the_request() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    // The longest user id and Group id there can be, every exportable type of the test data, and
    // many long parameters that lenient handling ignores.
    let user = "u".repeat(64);
    let group = "g".repeat(64);
    cohort(&server, &client, Some(&user), &group).await;
    let unknown: Vec<String> = (0..60).map(|i| format!("unknown{i:02}{}", "x".repeat(120))).collect();
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("_type", "Patient,Observation,Group,Encounter,Condition,Procedure,MedicationRequest");
    query.append_pair("_since", "2000-01-01T00:00:00Z");
    for name in &unknown {
        query.append_pair(name, &"v".repeat(120));
    }
    let path = format!("/bulk-data/r4/Group/{group}/$export?{}", query.finish());
    assert!(path.len() > 12_000, "the request is long: {} bytes", path.len());

    for respond_async in [false, true] {
        let mut call = get(&path).by(&client).header("x-oneup-user-id", &user).header("prefer", "handling=lenient");
        if respond_async {
            call = call.header("prefer", "respond-async").header("accept", "application/fhir+json");
        }
        let reply = server.send(call).await;
        let manifest = if respond_async {
            assert_status(&reply, 202);
            let status = local(reply.header("content-location"));
            let polled = server.send(get(&status).by(&client).header("x-oneup-user-id", &user)).await;
            assert_status(&polled, 200);
            polled.json()
        } else {
            assert_status(&reply, 200);
            reply.json()
        };
        let urls = file_urls(&manifest);
        assert_eq!(urls.len(), 4, "Patient, Observation, Group and the error file: {manifest}");
        for url in &urls {
            assert!(url.len() < 256, "{} characters: {url}", url.len());
        }

        // The error file still lists every ignored parameter, each once.
        let error_url = manifest["error"][0]["url"].as_str().unwrap();
        let reply = server.send(get(&local(error_url)).by(&client).header("x-oneup-user-id", &user)).await;
        assert_status(&reply, 200);
        let named: Vec<String> = reply
            .text()
            .lines()
            .map(|line| {
                serde_json::from_str::<Value>(line).unwrap()["issue"][0]["expression"][0].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(named, unknown, "one warning per ignored parameter, in order");
        assert_eq!(manifest["error"][0]["count"], json!(unknown.len()));
        for item in manifest["output"].as_array().unwrap() {
            let reply = server
                .send(get(&local(item["url"].as_str().unwrap())).by(&client).header("x-oneup-user-id", &user))
                .await;
            assert_status(&reply, 200);
            assert_eq!(json!(reply.text().lines().count()), item["count"], "{item}");
        }
    }
}

/// Sends a request to `app` (a second router over the same store).
async fn send(app: &Router, call: Call) -> Reply {
    let mut request = Request::builder().method(call.method).uri(&call.uri);
    for (name, value) in &call.headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let response = app.clone().oneshot(request.body(Body::from(call.body)).unwrap()).await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    let body = response.into_body().collect().await.unwrap().to_bytes().to_vec();
    Reply { status, headers, body }
}

#[tokio::test]
async fn a_file_url_keeps_the_credentials_mode_it_was_minted_in() {
    // One store, served first with credentials required, then (a restart) without.
    let strict = Server::start();
    let self_authorising = HttpConfig { file_urls_require_credentials: false, ..test_config() };
    let lax = router(AppState::new(strict.store.clone(), self_authorising, token_keys()));
    let client = strict.tenant_client("acme");
    let colleague = strict.client(strict.store.tenant_by_name("acme").unwrap().unwrap().id);
    cohort(&strict, &client, None, "g").await;
    let export = get("/bulk-data/r4/Group/g/$export?_type=Patient");

    let reply = strict.send(export.by(&client)).await;
    assert_status(&reply, 200);
    assert_eq!(reply.json()["requiresAccessToken"], true);
    let minted_strict = local(reply.json()["output"][0]["url"].as_str().unwrap());
    // After the switch to self-authorising URLs it is still refused without credentials...
    assert_outcome(&send(&lax, get(&minted_strict)).await, 401, "login", None);
    assert_outcome(&send(&lax, get(&minted_strict).by(&colleague)).await, 404, "not-found", None);
    // ...and served to its client.
    assert_status(&send(&lax, get(&minted_strict).by(&client)).await, 200);

    let reply = send(&lax, get("/bulk-data/r4/Group/g/$export?_type=Patient").by(&client)).await;
    assert_status(&reply, 200);
    assert_eq!(reply.json()["requiresAccessToken"], false);
    let minted_lax = local(reply.json()["output"][0]["url"].as_str().unwrap());
    let open = send(&lax, get(&minted_lax)).await;
    assert_status(&open, 200);
    assert_eq!(open.text().lines().count(), 1);
    // Back with credentials required: the stricter mode applies to self-authorising URLs too.
    assert_outcome(&strict.send(get(&minted_lax)).await, 401, "login", None);
    assert_outcome(&strict.send(get(&minted_lax).by(&colleague)).await, 404, "not-found", None);
    assert_status(&strict.send(get(&minted_lax).by(&client)).await, 200);
}

#[tokio::test]
async fn export_records_expire_with_their_urls_and_are_swept() {
    let config = HttpConfig { file_url_ttl: std::time::Duration::ZERO, ..test_config() };
    let server = Server::with_config(config);
    let client = server.tenant_client("acme");
    let tenant = server.store.tenant_by_name("acme").unwrap().unwrap().id;
    cohort(&server, &client, None, "g").await;
    let export = || get("/bulk-data/r4/Group/g/$export?_type=Patient").by(&client);
    let manifest = server.send(export()).await.json();
    let url = local(manifest["output"][0]["url"].as_str().unwrap());
    let token = url.rsplit('/').next().unwrap().strip_suffix(".ndjson").unwrap();
    let record = token_keys().verify(token, 0).expect("a token of this server").record_id();
    assert!(server.store.export_record(tenant, &record).unwrap().is_some(), "stored until swept");
    assert_outcome(&server.send(get(&url).by(&client)).await, 401, "security", None);
    server.send(export()).await;
    assert!(server.store.export_record(tenant, &record).unwrap().is_none(), "the next kick-off swept it");
}
