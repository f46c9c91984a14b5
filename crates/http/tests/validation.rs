//! R4 validation on every write path: REST create and update, transaction and batch Bundles,
//! `$upload-ndjson` and the importer answer structurally invalid resources with a 400 (or a
//! refused line) that names every problem's element, and store nothing invalid; with
//! `validation = off` the server stores what the client sent.

mod common;

use bulkhead_http::ndjson_import::{Importer, Location};
use bulkhead_http::validate::ValidationMode;
use bulkhead_http::HttpConfig;
use common::*;
use serde_json::{json, Value};

fn bad_patient() -> Value {
    json!({"resourceType": "Patient", "gender": "banana", "birthDate": "not-a-date", "foo": 1})
}

fn bad_observation() -> Value {
    json!({"resourceType": "Observation", "status": "bogus"})
}

fn good_observation() -> Value {
    json!({"resourceType": "Observation", "status": "final", "code": {"text": "heart rate"}})
}

/// The `(expression, code)` of every issue of an OperationOutcome.
fn issues(outcome: &Value) -> Vec<(String, String)> {
    outcome["issue"]
        .as_array()
        .expect("issue array")
        .iter()
        .map(|issue| {
            assert_eq!(issue["severity"], "error", "{outcome}");
            assert!(issue["diagnostics"].as_str().is_some_and(|d| !d.is_empty()), "{outcome}");
            (issue["expression"][0].as_str().unwrap_or("").to_owned(), issue["code"].as_str().unwrap().to_owned())
        })
        .collect()
}

fn expected(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(e, c)| (e.to_string(), c.to_string())).collect()
}

const PATIENT_ISSUES: &[(&str, &str)] =
    &[("Patient.gender", "code-invalid"), ("Patient.birthDate", "value"), ("Patient.foo", "structure")];
const OBSERVATION_ISSUES: &[(&str, &str)] = &[("Observation.status", "code-invalid"), ("Observation.code", "required")];

#[tokio::test]
async fn create_refuses_invalid_r4_with_one_issue_per_problem() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let reply = server.send(post("/r4/Patient").by(&client).json(&bad_patient())).await;
    let outcome = assert_error(&reply, 400, "code-invalid");
    assert_eq!(issues(&outcome), expected(PATIENT_ISSUES));
    assert!(outcome["issue"][0]["diagnostics"].as_str().unwrap().contains("banana"), "{outcome}");

    let reply = server.send(post("/r4/Observation").by(&client).json(&bad_observation())).await;
    assert_eq!(issues(&assert_error(&reply, 400, "code-invalid")), expected(OBSERVATION_ISSUES));
    assert!(server.stored_state(&client, &["Patient", "Observation"]).await.is_empty(), "nothing was stored");
}

#[tokio::test]
async fn update_refuses_invalid_r4_and_keeps_the_stored_version() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let good = json!({"resourceType": "Patient", "id": "p1", "gender": "female"});
    assert_status(&server.send(put("/r4/Patient/p1").by(&client).json(&good)).await, 201);
    let mut bad = bad_patient();
    bad["id"] = json!("p1");
    let reply = server.send(put("/r4/Patient/p1").by(&client).json(&bad)).await;
    assert_eq!(issues(&assert_error(&reply, 400, "code-invalid")), expected(PATIENT_ISSUES));

    let mut observation = bad_observation();
    observation["id"] = json!("o1");
    let reply = server.send(put("/r4/Observation/o1").by(&client).json(&observation)).await;
    assert_eq!(issues(&assert_error(&reply, 400, "code-invalid")), expected(OBSERVATION_ISSUES));

    let stored = server.send(get("/r4/Patient/p1").by(&client)).await;
    assert_status(&stored, 200);
    assert_eq!(
        (stored.json()["gender"].clone(), stored.json()["meta"]["versionId"].clone()),
        (json!("female"), json!("1"))
    );
    assert_status(&server.send(get("/r4/Observation/o1").by(&client)).await, 404);
}

fn entry(method: &str, url: &str, resource: Value) -> Value {
    json!({"resource": resource, "request": {"method": method, "url": url}})
}

#[tokio::test]
async fn a_transaction_with_an_invalid_entry_stores_nothing() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        entry("POST", "Observation", good_observation()),
        entry("POST", "Observation", bad_observation()),
        entry("PUT", "Patient/p1", json!({"resourceType": "Patient", "id": "p1", "gender": "banana", "birthDate": "not-a-date", "foo": 1})),
    ]});
    let reply = server.send(post("/r4").by(&client).json(&bundle)).await;
    let outcome = assert_error(&reply, 400, "code-invalid");
    // The first invalid entry refuses the transaction; its issues name entry and element.
    let in_entry =
        expected(&[("Bundle.entry[1].resource.status", "code-invalid"), ("Bundle.entry[1].resource.code", "required")]);
    assert_eq!(issues(&outcome), in_entry);
    assert!(server.stored_state(&client, &["Patient", "Observation"]).await.is_empty(), "all or nothing");
}

#[tokio::test]
async fn a_batch_stores_its_valid_entries_and_refuses_the_invalid_ones() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        entry("POST", "Observation", bad_observation()),
        entry("POST", "Observation", good_observation()),
        entry("POST", "Patient", bad_patient()),
        entry("PUT", "Patient/p2", json!({"resourceType": "Patient", "id": "p2", "birthDate": "1970-01-01"})),
    ]});
    let reply = server.send(post("/r4").by(&client).json(&bundle)).await;
    assert_status(&reply, 200);
    let response = reply.json();
    let statuses: Vec<&str> =
        response["entry"].as_array().unwrap().iter().map(|e| e["response"]["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["400 Bad Request", "201 Created", "400 Bad Request", "201 Created"], "{response}");
    let observation_issues =
        expected(&[("Bundle.entry[0].resource.status", "code-invalid"), ("Bundle.entry[0].resource.code", "required")]);
    assert_eq!(issues(&response["entry"][0]["response"]["outcome"]), observation_issues);
    let patient_issues = expected(&[
        ("Bundle.entry[2].resource.gender", "code-invalid"),
        ("Bundle.entry[2].resource.birthDate", "value"),
        ("Bundle.entry[2].resource.foo", "structure"),
    ]);
    assert_eq!(issues(&response["entry"][2]["response"]["outcome"]), patient_issues);
    let stored = server.stored_state(&client, &["Patient", "Observation"]).await;
    assert_eq!(stored.len(), 2, "the two valid entries were stored: {stored:?}");
    assert_status(&server.send(get("/r4/Patient/p2").by(&client)).await, 200);
}

#[tokio::test]
async fn an_upload_names_line_and_element_of_each_violation_and_stores_the_rest() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let body = [
        json!({"resourceType": "Patient", "id": "ok", "gender": "male"}).to_string(),
        json!({"resourceType": "Patient", "id": "bad", "gender": "banana", "birthDate": "not-a-date", "foo": 1})
            .to_string(),
        json!({"resourceType": "Observation", "id": "o1", "status": "bogus"}).to_string(),
    ]
    .join("\n");
    let reply = server.send(post("/r4/$upload-ndjson").by(&client).raw("application/fhir+ndjson", body)).await;
    assert_status(&reply, 200);
    let outcome = reply.json();
    let refused: Vec<(&str, &str)> = outcome["issue"].as_array().unwrap()[1..]
        .iter()
        .map(|issue| (issue["expression"][0].as_str().unwrap(), issue["diagnostics"].as_str().unwrap()))
        .collect();
    assert_eq!(refused.len(), 2, "{outcome}");
    assert_eq!(refused[0].0, "line 2");
    for element in ["Patient.gender: ", "Patient.birthDate: ", "Patient.foo: "] {
        assert!(refused[0].1.contains(element), "{element} in {}", refused[0].1);
    }
    assert_eq!(refused[1].0, "line 3");
    assert!(refused[1].1.contains("Observation.status: ") && refused[1].1.contains("Observation.code: "), "{outcome}");
    assert_status(&server.send(get("/r4/Patient/ok").by(&client)).await, 200);
    assert_status(&server.send(get("/r4/Patient/bad").by(&client)).await, 404);
}

#[tokio::test]
async fn the_importer_reports_file_line_and_element() {
    let server = Server::start();
    let tenant = server.tenant("acme");
    let store = server.store.clone();
    let summary = tokio::task::spawn_blocking(move || {
        let mut importer = Importer::new(store, tenant, None, 100);
        let lines = [
            r#"{"resourceType":"Patient","id":"a","gender":"female"}"#,
            r#"{"resourceType":"Observation","id":"o","status":"bogus"}"#,
        ];
        for (index, line) in lines.iter().enumerate() {
            let location = Location { source: "data/Observation.ndjson".into(), line: index as u64 + 1 };
            importer.add_line(location, line.as_bytes()).expect("store works");
        }
        importer.finish().expect("finish")
    })
    .await
    .expect("import thread");
    assert_eq!((summary.created, summary.failed), (1, 1));
    let error = &summary.errors[0];
    assert_eq!((error.location.source.as_str(), error.location.line), ("data/Observation.ndjson", 2));
    assert!(error.message.starts_with("Observation.status: 'bogus'"), "{}", error.message);
    assert!(error.message.contains("; Observation.code: "), "{}", error.message);
}

#[tokio::test]
async fn with_validation_off_the_server_stores_what_the_client_sent() {
    let server = Server::with_config(HttpConfig { validation: ValidationMode::Off, ..test_config() });
    let client = server.tenant_client("acme");
    let stored = server.create(&client, bad_patient()).await;
    assert_eq!((stored["gender"].clone(), stored["foo"].clone()), (json!("banana"), json!(1)));
    server.create(&client, bad_observation()).await;
    // What the server itself relies on is still checked.
    let bad_reference = json!({"resourceType": "Observation", "subject": {"reference": "Patient/"}});
    assert_error(&server.send(post("/r4/Observation").by(&client).json(&bad_reference)).await, 422, "value");
}

/// `[tenant_validation]` overrides the server's mode for one tenant, on every way in; the other
/// tenants keep the server's mode.
#[tokio::test]
async fn a_tenant_can_have_its_own_validation_mode() {
    let config = HttpConfig {
        tenant_validation: [("legacy".to_owned(), ValidationMode::Off)].into_iter().collect(),
        ..test_config()
    };
    let server = Server::with_config(config);
    let (legacy, clinic) = (server.tenant_client("legacy"), server.tenant_client("clinic"));

    assert_status(&server.send(post("/r4/Patient").by(&legacy).json(&bad_patient())).await, 201);
    assert_error(&server.send(post("/r4/Patient").by(&clinic).json(&bad_patient())).await, 400, "code-invalid");

    let line = bad_observation().to_string();
    let upload = |client: &Client| post("/r4/$upload-ndjson").by(client).raw("application/fhir+ndjson", line.clone());
    assert_status(&server.send(upload(&legacy)).await, 200);
    assert_status(&server.send(upload(&clinic)).await, 400);

    let bundle = json!({"resourceType": "Bundle", "type": "transaction",
        "entry": [entry("PUT", "Observation/b1", json!({"resourceType": "Observation", "id": "b1", "status": "bogus"}))]});
    assert_status(&server.send(post("/r4").by(&legacy).json(&bundle)).await, 200);
    assert_status(&server.send(post("/r4").by(&clinic).json(&bundle)).await, 400);
}
