//! Tier-2 tests (STYLE.md "Tests, in three tiers"): the real router, driven in process with
//! `tower::ServiceExt::oneshot` over a fresh SQLite store per test (the harness is in
//! `common/mod.rs`). Every refusal is checked for its status and its OperationOutcome, and every
//! refused write for having stored nothing.
//!
//! This file holds the FHIR REST tests (CRUD, validation, auth, tenancy, users, search, metadata,
//! admin); Bundles and Group export are in `bundles_and_export.rs`.

mod common;

use std::cmp::Ordering;
use std::collections::BTreeSet;

use bulkhead_http::HttpConfig;
use serde_json::{json, Value};

use common::*;

// ---------------------------------------------------------------------------------------------
// CRUD
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn create_read_update_history_delete() {
    let server = Server::start();
    let client = server.tenant_client("acme");

    let reply = server.send(post("/r4/Patient").by(&client).json(&patient("Chalmers"))).await;
    assert_status(&reply, 201);
    let created = reply.json();
    let id = created["id"].as_str().expect("server id").to_owned();
    assert_eq!(created["meta"]["versionId"], "1");
    let first_updated = created["meta"]["lastUpdated"].as_str().expect("lastUpdated").to_owned();
    assert_eq!(reply.header("location"), format!("{BASE}/r4/Patient/{id}/_history/1"));
    assert_eq!(reply.header("etag"), "W/\"1\"");
    // Last-Modified is an HTTP-date of meta.lastUpdated (to the second).
    let instant = time::OffsetDateTime::parse(&first_updated, &time::format_description::well_known::Rfc3339).unwrap();
    let http_date = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    assert_eq!(reply.header("last-modified"), instant.format(&http_date).unwrap());
    assert_eq!(reply.header("content-type"), "application/fhir+json");

    let read = server.send(get(&format!("/r4/Patient/{id}")).by(&client)).await;
    assert_status(&read, 200);
    assert_eq!(read.json(), created);
    assert_eq!(read.header("etag"), "W/\"1\"");

    // Update: version 2, new lastUpdated, the old version still readable.
    let mut changed = created.clone();
    changed["name"][0]["family"] = json!("Chalmers-Smith");
    let reply =
        server.send(put(&format!("/r4/Patient/{id}")).by(&client).header("if-match", "W/\"1\"").json(&changed)).await;
    assert_status(&reply, 200);
    let updated = reply.json();
    assert_eq!(updated["meta"]["versionId"], "2");
    assert_eq!(updated["name"][0]["family"], "Chalmers-Smith");
    assert!(updated["meta"]["lastUpdated"].as_str().unwrap() > first_updated.as_str());
    assert_eq!(reply.header("etag"), "W/\"2\"");

    let old = server.send(get(&format!("/r4/Patient/{id}/_history/1")).by(&client)).await;
    assert_status(&old, 200);
    assert_eq!(old.json(), created);

    // A PUT of identical content is not a new version.
    let same = server.send(put(&format!("/r4/Patient/{id}")).by(&client).json(&changed)).await;
    assert_status(&same, 200);
    assert_eq!(same.json()["meta"]["versionId"], "2");
    assert_eq!(same.json()["meta"]["lastUpdated"], updated["meta"]["lastUpdated"]);

    // A stale If-Match is refused and changes nothing.
    let mut stale = changed.clone();
    stale["gender"] = json!("other");
    let reply =
        server.send(put(&format!("/r4/Patient/{id}")).by(&client).header("if-match", "W/\"1\"").json(&stale)).await;
    assert_outcome(&reply, 412, "conflict", None);
    let current = server.send(get(&format!("/r4/Patient/{id}")).by(&client)).await.json();
    assert_eq!(current, updated);

    // History: newest first, one entry per real version.
    let history = server.send(get(&format!("/r4/Patient/{id}/_history")).by(&client)).await;
    assert_status(&history, 200);
    let history = history.json();
    assert_eq!(history["type"], "history");
    assert_eq!(history["total"], 2);
    let versions: Vec<&Value> =
        history["entry"].as_array().unwrap().iter().map(|entry| &entry["resource"]["meta"]["versionId"]).collect();
    assert_eq!(versions, [&json!("2"), &json!("1")]);
    assert_eq!(history["entry"][0]["resource"], updated);
    assert_eq!(history["entry"][1]["request"]["method"], "POST");

    // Update-as-create with the client's id.
    let mut chosen = patient("Chosen");
    chosen["id"] = json!("my-own-id");
    let reply = server.send(put("/r4/Patient/my-own-id").by(&client).json(&chosen)).await;
    assert_status(&reply, 201);
    assert_eq!(reply.header("location"), format!("{BASE}/r4/Patient/my-own-id/_history/1"));
    assert_eq!(reply.json()["meta"]["versionId"], "1");

    // Delete: 204, then 410 with an OperationOutcome; the old versions stay in history.
    let reply = server.send(delete(&format!("/r4/Patient/{id}")).by(&client)).await;
    assert_status(&reply, 204);
    assert!(reply.body.is_empty());
    let gone = server.send(get(&format!("/r4/Patient/{id}")).by(&client)).await;
    assert_outcome(&gone, 410, "deleted", None);
    let history = server.send(get(&format!("/r4/Patient/{id}/_history")).by(&client)).await.json();
    assert_eq!(history["total"], 3);
    assert_eq!(history["entry"][0]["request"]["method"], "DELETE");
    assert!(history["entry"][0].get("resource").is_none());
    let old = server.send(get(&format!("/r4/Patient/{id}/_history/2")).by(&client)).await;
    assert_status(&old, 200);
    assert_eq!(old.json(), updated);
    let tombstone = server.send(get(&format!("/r4/Patient/{id}/_history/3")).by(&client)).await;
    assert_outcome(&tombstone, 410, "deleted", None);
    let remaining = server.search_all(&client, "/r4/Patient").await;
    assert_eq!(ids(&remaining), set(&["my-own-id"]));

    // A PUT brings a deleted resource back as a new version (201: it exists again).
    let reply = server.send(put(&format!("/r4/Patient/{id}")).by(&client).json(&changed)).await;
    assert_status(&reply, 201);
    assert_eq!(reply.json()["meta"]["versionId"], "4");

    let reply =
        server.send(put(&format!("/r4/Patient/{id}")).by(&client).header("if-match", "version 4").json(&changed)).await;
    assert_outcome(&reply, 400, "value", Some("If-Match"));
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

/// One refused write: what is sent, and the status, issue code and expression expected.
struct Refusal {
    what: &'static str,
    call: Call,
    status: u16,
    code: &'static str,
    expression: Option<&'static str>,
}

#[tokio::test]
async fn invalid_writes_are_refused_and_change_nothing() {
    let server = Server::with_config(HttpConfig { max_body_bytes: 4096, max_group_members: 3, ..test_config() });
    let client = server.tenant_client("acme");
    let existing = server.create(&client, patient("Existing")).await;
    let id = existing["id"].as_str().unwrap().to_owned();
    let group =
        |members: Vec<Value>| json!({"resourceType": "Group", "type": "person", "actual": true, "member": members});
    let member = |reference: &str| json!({"entity": {"reference": reference}});
    let long_id = "a".repeat(65);
    let by = |call: Call| call.by(&client);
    let refusals = vec![
        Refusal {
            what: "malformed JSON",
            call: by(post("/r4/Patient").raw("application/fhir+json", "{\"resourceType\": \"Patient\",")),
            status: 400,
            code: "structure",
            expression: None,
        },
        Refusal {
            what: "JSON array",
            call: by(post("/r4/Patient").json(&json!([patient("A")]))),
            status: 422,
            code: "structure",
            expression: None,
        },
        Refusal {
            what: "unknown resourceType",
            call: by(post("/r4/Patient").json(&json!({"resourceType": "Nope"}))),
            status: 422,
            code: "value",
            expression: Some("resourceType"),
        },
        Refusal {
            what: "resourceType differs from the URL",
            call: by(post("/r4/Patient").json(&json!({"resourceType": "Observation", "status": "final"}))),
            status: 400,
            code: "invalid",
            expression: Some("resourceType"),
        },
        Refusal {
            what: "id with an underscore",
            call: by(put("/r4/Patient/a_b").json(&json!({"resourceType": "Patient", "id": "a_b"}))),
            status: 400,
            code: "value",
            expression: Some("Patient.id"),
        },
        Refusal {
            what: "65-character id",
            call: by(put(&format!("/r4/Patient/{long_id}")).json(&json!({"resourceType": "Patient", "id": long_id}))),
            status: 400,
            code: "value",
            expression: Some("Patient.id"),
        },
        Refusal {
            what: "body id differs from the URL id",
            call: by(put(&format!("/r4/Patient/{id}")).json(&json!({"resourceType": "Patient", "id": "other"}))),
            status: 400,
            code: "invalid",
            expression: Some("Patient.id"),
        },
        Refusal {
            what: "update without an id",
            call: by(put(&format!("/r4/Patient/{id}")).json(&patient("NoId"))),
            status: 400,
            code: "required",
            expression: Some("Patient.id"),
        },
        Refusal {
            what: "malformed reference",
            call: by(post("/r4/Observation").json(
                &json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": "Patient/"}}),
            )),
            status: 422,
            code: "value",
            expression: Some("Observation.subject.reference"),
        },
        // Group.type and Group.actual are required by R4 itself: a structural 400 (the Group rules
        // of the export, 422, apply to valid Groups).
        Refusal {
            what: "Group without type",
            call: by(post("/r4/Group").json(&json!({"resourceType": "Group", "actual": true}))),
            status: 400,
            code: "required",
            expression: Some("Group.type"),
        },
        Refusal {
            what: "Group without actual",
            call: by(post("/r4/Group").json(&json!({"resourceType": "Group", "type": "person"}))),
            status: 400,
            code: "required",
            expression: Some("Group.actual"),
        },
        Refusal {
            what: "Group member that is a Practitioner",
            call: by(post("/r4/Group").json(&group(vec![member(&format!("Patient/{id}")), member("Practitioner/p1")]))),
            status: 422,
            code: "value",
            expression: Some("Group.member[1].entity"),
        },
        Refusal {
            what: "Group above the member cap",
            call: by(post("/r4/Group").json(&group((0..4).map(|i| member(&format!("Patient/p{i}"))).collect()))),
            status: 422,
            code: "too-costly",
            expression: Some("Group.member"),
        },
        Refusal {
            what: "body over max_body_bytes",
            call: by(post("/r4/Patient")
                .json(&json!({"resourceType": "Patient", "text": {"status": "generated", "div": "x".repeat(5000)}}))),
            status: 413,
            code: "too-costly",
            expression: None,
        },
        Refusal {
            what: "XML body",
            call: by(post("/r4/Patient").raw("application/fhir+xml", "<Patient xmlns=\"http://hl7.org/fhir\"/>")),
            status: 415,
            code: "not-supported",
            expression: Some("Content-Type"),
        },
        Refusal {
            what: "XML wanted back",
            call: by(post("/r4/Patient").header("accept", "application/fhir+xml").json(&patient("Xml"))),
            status: 406,
            code: "not-supported",
            expression: Some("Accept"),
        },
        Refusal {
            what: "unknown type in the URL",
            call: by(post("/r4/Nope").json(&json!({"resourceType": "Nope"}))),
            status: 404,
            code: "not-supported",
            expression: None,
        },
        Refusal {
            what: "update of an unknown type",
            call: by(put("/r4/Nope/1").json(&json!({"resourceType": "Nope", "id": "1"}))),
            status: 404,
            code: "not-supported",
            expression: None,
        },
    ];
    let types = ["Patient", "Observation", "Group"];
    let before = server.stored_state(&client, &types).await;
    assert_eq!(before.len(), 1);
    for refusal in refusals {
        let reply = server.send(refusal.call).await;
        assert_eq!(reply.status.as_u16(), refusal.status, "{}: {}", refusal.what, reply.text());
        assert_outcome(&reply, refusal.status, refusal.code, refusal.expression);
        assert_eq!(server.stored_state(&client, &types).await, before, "{} changed what is stored", refusal.what);
    }
    let unchanged = server.send(get(&format!("/r4/Patient/{id}")).by(&client)).await.json();
    assert_eq!(unchanged, existing);

    // The limits are not off by one: at the cap is accepted.
    let at_cap = group((0..3).map(|i| member(&format!("Patient/p{i}"))).collect());
    server.create(&client, at_cap).await;
}

#[tokio::test]
async fn reads_refuse_xml_and_unknown_types() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let created = server.create(&client, patient("Reader")).await;
    let id = created["id"].as_str().unwrap();

    let reply =
        server.send(get(&format!("/r4/Patient/{id}")).by(&client).header("accept", "application/fhir+xml")).await;
    assert_outcome(&reply, 406, "not-supported", Some("Accept"));
    // A list that allows JSON is served.
    let reply = server
        .send(
            get(&format!("/r4/Patient/{id}"))
                .by(&client)
                .header("accept", "application/fhir+xml;q=0.9, application/fhir+json"),
        )
        .await;
    assert_status(&reply, 200);

    for path in ["/r4/Nope", "/r4/Nope/1", "/r4/Nope/1/_history", "/r4/Nope/1/_history/1"] {
        let reply = server.send(get(path).by(&client)).await;
        assert_outcome(&reply, 404, "not-supported", None);
    }
    let reply = server.send(get("/r4/Patient/does-not-exist").by(&client)).await;
    assert_outcome(&reply, 404, "not-found", None);
    let reply = server.send(get("/nowhere").by(&client)).await;
    assert_outcome(&reply, 404, "not-found", None);
}

// ---------------------------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn authentication_failures_are_indistinguishable() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let revoked = server.tenant_client("other");
    server.create(&client, patient("Secret")).await;
    server.send(get("/r4/Patient").by(&revoked)).await; // warms the secret cache before revoking
    assert!(server.store.revoke_client(&revoked.id).unwrap());

    let failures = [
        ("no headers", get("/r4/Patient")),
        ("wrong secret", get("/r4/Patient").header("client_id", &client.id).header("client_secret", "not-the-secret")),
        (
            "unknown client",
            get("/r4/Patient").header("client_id", "bh_0000000000000000").header("client_secret", &client.secret),
        ),
        ("revoked client", get("/r4/Patient").by(&revoked)),
        ("id without secret", get("/r4/Patient").header("client_id", &client.id)),
    ];
    let mut bodies = BTreeSet::new();
    for (what, call) in failures {
        let reply = server.send(call).await;
        assert_eq!(reply.status.as_u16(), 401, "{what}");
        bodies.insert(assert_outcome(&reply, 401, "login", None).to_string());
    }
    assert_eq!(bodies.len(), 1, "401 bodies reveal which part was wrong: {bodies:?}");
    let expected = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "login", "diagnostics": "missing or invalid client credentials"}]});
    assert_eq!(bodies.into_iter().next().unwrap(), expected.to_string());

    // Writes are refused the same way, and store nothing.
    let reply = server
        .send(
            post("/r4/Patient").header("client_id", &client.id).header("client_secret", "x").json(&patient("Intruder")),
        )
        .await;
    assert_outcome(&reply, 401, "login", None);
    assert_eq!(server.search_all(&client, "/r4/Patient").await.len(), 1);

    // Hyphenated spellings work.
    let reply =
        server.send(get("/r4/Patient").header("client-id", &client.id).header("client-secret", &client.secret)).await;
    assert_status(&reply, 200);
    assert_eq!(reply.json()["entry"].as_array().unwrap().len(), 1);

    for bad_user in ["has space", "sl/ash", &"u".repeat(65)] {
        let reply = server.send(get("/r4/Patient").by(&client).header("x-oneup-user-id", bad_user)).await;
        assert_outcome(&reply, 400, "value", Some("x-oneup-user-id"));
    }
}

// ---------------------------------------------------------------------------------------------
// Tenancy and users
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn tenants_never_see_each_other() {
    let server = Server::start();
    let acme = server.tenant_client("acme");
    let globex = server.tenant_client("globex");
    let mut resource = patient("Private");
    resource["identifier"] = json!([{"system": "urn:mrn", "value": "m-1"}]);
    let created = server.create(&acme, resource).await;
    let id = created["id"].as_str().unwrap().to_owned();

    for path in
        [format!("/r4/Patient/{id}"), format!("/r4/Patient/{id}/_history/1"), format!("/r4/Patient/{id}/_history")]
    {
        let reply = server.send(get(&path).by(&globex)).await;
        assert_outcome(&reply, 404, "not-found", None);
    }
    let reply = server.send(delete(&format!("/r4/Patient/{id}")).by(&globex)).await;
    assert_outcome(&reply, 404, "not-found", None);
    for query in [format!("_id={id}"), "identifier=urn:mrn|m-1".to_owned(), String::new()] {
        assert!(server.search_all(&globex, &format!("/r4/Patient?{query}")).await.is_empty(), "{query}");
    }

    // Ids are per tenant: the same id in another tenant is another resource.
    let mut lookalike = patient("Lookalike");
    lookalike["id"] = json!(id);
    let reply = server.send(put(&format!("/r4/Patient/{id}")).by(&globex).json(&lookalike)).await;
    assert_status(&reply, 201);
    assert_eq!(reply.json()["meta"]["versionId"], "1");
    let original = server.send(get(&format!("/r4/Patient/{id}")).by(&acme)).await;
    assert_eq!(original.json(), created);
    let history = server.send(get(&format!("/r4/Patient/{id}/_history")).by(&acme)).await.json();
    assert_eq!(history["total"], 1);
}

#[tokio::test]
async fn users_own_what_they_write() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let as_user = |call: Call, user: &str| call.by(&client).header("x-oneup-user-id", user);

    let reply = server.send(as_user(post("/r4/Patient"), "alice").json(&patient("Alice"))).await;
    assert_status(&reply, 201);
    let alice_patient = reply.json();
    let id = alice_patient["id"].as_str().unwrap().to_owned();
    let path = format!("/r4/Patient/{id}");

    assert_status(&server.send(as_user(get(&path), "alice")).await, 200);
    assert_outcome(&server.send(as_user(get(&path), "bob")).await, 404, "not-found", None);
    assert_outcome(&server.send(as_user(get(&format!("{path}/_history")), "bob")).await, 404, "not-found", None);
    assert_outcome(&server.send(as_user(delete(&path), "bob")).await, 404, "not-found", None);
    let mut takeover = alice_patient.clone();
    takeover["gender"] = json!("male");
    assert_outcome(&server.send(as_user(put(&path), "bob").json(&takeover)).await, 404, "not-found", None);
    let bob_search = server.send(as_user(get("/r4/Patient"), "bob")).await.json();
    assert!(bob_search["entry"].as_array().unwrap().is_empty());

    // `client` or no header: the whole tenant.
    let as_client = server.send(as_user(get(&path), "client")).await;
    assert_status(&as_client, 200);
    assert_eq!(as_client.json(), alice_patient);
    assert_status(&server.send(get(&path).by(&client)).await, 200);
    assert_eq!(ids(&server.search_all(&client, "/r4/Patient").await), set(&[&id]));
    let alice_search = server.send(as_user(get("/r4/Patient"), "alice")).await.json();
    assert_eq!(alice_search["entry"][0]["resource"], alice_patient);
}

// ---------------------------------------------------------------------------------------------
// Search
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn search_by_id_identifier_and_reference() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let with_identifier = |identifier: Value| json!({"resourceType": "Patient", "identifier": [identifier]});
    let mrn = server.create(&client, with_identifier(json!({"system": "urn:mrn", "value": "123"}))).await;
    let other = server.create(&client, with_identifier(json!({"system": "urn:other", "value": "123"}))).await;
    let bare = server.create(&client, with_identifier(json!({"value": "123"}))).await;
    let [mrn, other, bare] = [&mrn, &other, &bare].map(|resource| resource["id"].as_str().unwrap().to_owned());

    let cases = [
        (format!("_id={mrn}"), vec![&mrn]),
        (format!("_id={mrn},{bare}"), vec![&mrn, &bare]),
        ("identifier=123".into(), vec![&mrn, &other, &bare]),
        ("identifier=urn:mrn|123".into(), vec![&mrn]),
        ("identifier=urn%3Aother%7C123".into(), vec![&other]),
        ("identifier=|123".into(), vec![&bare]),
        ("identifier=urn:mrn|999".into(), vec![]),
        ("_id=nope".into(), vec![]),
    ];
    for (query, expected) in cases {
        let found = server.search_all(&client, &format!("/r4/Patient?{query}")).await;
        let expected: BTreeSet<String> = expected.into_iter().cloned().collect();
        assert_eq!(ids(&found), expected, "{query}");
    }

    let observation = |subject: &str| json!({"resourceType": "Observation", "status": "final", "code": {"text": "bp"}, "subject": {"reference": subject}});
    let on_mrn = server.create(&client, observation(&format!("Patient/{mrn}"))).await;
    let on_other = server.create(&client, observation(&format!("Patient/{other}"))).await;
    let on_group = server.create(&client, observation(&format!("Group/{mrn}"))).await;
    let [on_mrn, on_other, on_group] =
        [&on_mrn, &on_other, &on_group].map(|resource| resource["id"].as_str().unwrap().to_owned());
    let cases = [
        (format!("subject=Patient/{mrn}"), vec![&on_mrn]),
        (format!("subject={mrn}"), vec![&on_mrn, &on_group]),
        (format!("subject=Group/{mrn}"), vec![&on_group]),
        (format!("patient={mrn}"), vec![&on_mrn]),
        (format!("patient=Patient/{other}"), vec![&on_other]),
        (format!("patient={bare}"), vec![]),
        (format!("patient={mrn}&_id={on_other}"), vec![]),
    ];
    for (query, expected) in cases {
        let found = server.search_all(&client, &format!("/r4/Observation?{query}")).await;
        let expected: BTreeSet<String> = expected.into_iter().cloned().collect();
        assert_eq!(ids(&found), expected, "{query}");
    }
}

#[tokio::test]
async fn search_by_last_updated_prefixes() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let mut created = Vec::new();
    for family in ["First", "Second", "Third"] {
        created.push(server.create(&client, patient(family)).await);
    }
    let id = |index: usize| created[index]["id"].as_str().unwrap().to_owned();
    let at = |index: usize| created[index]["meta"]["lastUpdated"].as_str().unwrap().to_owned();
    let (first, second, third) = (id(0), id(1), id(2));
    let instant = at(1);
    let day = &instant[..10];
    let month = &instant[..7];
    let year: i32 = instant[..4].parse().unwrap();

    // Partial dates cover their whole day, month or year. Expectations come from the stamps
    // themselves, so a run across midnight (or New Year) still holds.
    let stamped = [(first.clone(), at(0)), (second.clone(), at(1)), (third.clone(), at(2))];
    let select = |len: usize, keep: fn(Ordering) -> bool, bound: &str| -> Vec<String> {
        stamped.iter().filter(|(_, stamp)| keep(stamp[..len].cmp(&bound[..len]))).map(|(id, _)| id.clone()).collect()
    };
    let (last_year, next_year) = ((year - 1).to_string(), (year + 1).to_string());
    let cases: Vec<(String, Vec<String>)> = vec![
        (format!("eq{instant}"), vec![second.clone()]),
        (instant.clone(), vec![second.clone()]),
        (format!("gt{instant}"), vec![third.clone()]),
        (format!("ge{instant}"), vec![second.clone(), third.clone()]),
        (format!("lt{instant}"), vec![first.clone()]),
        (format!("le{instant}"), vec![first.clone(), second.clone()]),
        (format!("eq{day}"), select(10, Ordering::is_eq, day)),
        (format!("gt{day}"), select(10, Ordering::is_gt, day)),
        (format!("lt{day}"), select(10, Ordering::is_lt, day)),
        (format!("ge{month}"), select(7, Ordering::is_ge, month)),
        (format!("le{year}"), select(4, Ordering::is_le, &year.to_string())),
        (format!("gt{last_year}"), select(4, Ordering::is_gt, &last_year)),
        (format!("lt{next_year}"), select(4, Ordering::is_lt, &next_year)),
        (format!("ge{next_year}"), vec![]),
    ];
    assert!(cases[6].1.contains(&second) && cases[10].1.len() == 3, "the partial-date cases are not vacuous");
    for (value, expected) in cases {
        let found = server.search_all(&client, &format!("/r4/Patient?_lastUpdated={value}")).await;
        let expected: BTreeSet<String> = expected.into_iter().collect();
        assert_eq!(ids(&found), expected, "_lastUpdated={value}");
    }
    // Two bounds make a window.
    let window =
        server.search_all(&client, &format!("/r4/Patient?_lastUpdated=gt{}&_lastUpdated=lt{}", at(0), at(2))).await;
    assert_eq!(ids(&window), set(&[&second]));

    for bad in ["ne2024", "yesterday", "gt2024-13", "2024-01-01T10:00"] {
        let reply = server.send(get(&format!("/r4/Patient?_lastUpdated={bad}")).by(&client)).await;
        assert_outcome(&reply, 400, "invalid", Some("_lastUpdated"));
    }
}

#[tokio::test]
async fn search_pages_return_every_match_exactly_once() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let mut expected = BTreeSet::new();
    for index in 0..7 {
        let resource = json!({"resourceType": "Patient", "identifier": [{"system": "urn:page", "value": "p"}], "name": [{"family": format!("P{index}")}]});
        expected.insert(server.create(&client, resource).await["id"].as_str().unwrap().to_owned());
    }
    server.create(&client, patient("NotOnAnyPage")).await;

    let mut url = Some("/r4/Patient?identifier=urn:page|p&_count=3".to_owned());
    let (mut pages, mut seen) = (Vec::new(), Vec::new());
    while let Some(current) = url.take() {
        let reply = server.send(get(&current).by(&client)).await;
        assert_status(&reply, 200);
        let bundle = reply.json();
        let self_link = link(&bundle, "self").expect("self link");
        assert!(local(&self_link).starts_with("/r4/Patient?"), "{self_link}");
        let entries = bundle["entry"].as_array().unwrap();
        pages.push(entries.len());
        seen.extend(entries.iter().map(|entry| entry["resource"]["id"].as_str().unwrap().to_owned()));
        url = link(&bundle, "next").map(|next| local(&next));
        if let Some(next) = &url {
            assert!(next.contains("_count=3") && next.contains("identifier="), "next link keeps the query: {next}");
        }
    }
    assert_eq!(pages, [3, 3, 1]);
    assert_eq!(seen.len(), 7, "a resource repeated across pages: {seen:?}");
    assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), expected);
}

#[tokio::test]
async fn search_refuses_what_it_cannot_honour() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let cases = [
        ("/r4/Patient?name=smith", "not-supported", "name"),
        ("/r4/Patient?_id=a&birthdate=2000", "not-supported", "birthdate"),
        ("/r4/Patient?_count=0", "invalid", "_count"),
        ("/r4/Patient?_count=ten", "invalid", "_count"),
        ("/r4/Patient?_count=100000", "invalid", "_count"),
        ("/r4/Patient?_count=", "invalid", "_count"),
        ("/r4/Observation?patient=Group/1", "invalid", "patient"),
        ("/r4/Observation?subject=Patient/a b", "invalid", "subject"),
    ];
    for (path, code, parameter) in cases {
        let reply = server.send(get(&path.replace(' ', "%20")).by(&client)).await;
        assert_outcome(&reply, 400, code, Some(parameter));
    }
}

// ---------------------------------------------------------------------------------------------
// Metadata, health, admin
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn metadata_and_health_need_no_credentials() {
    let server = Server::start();
    let reply = server.send(get("/r4/metadata")).await;
    assert_status(&reply, 200);
    assert_eq!(reply.header("content-type"), "application/fhir+json");
    let capability = reply.json();
    assert_eq!(capability["resourceType"], "CapabilityStatement");
    assert_eq!(capability["fhirVersion"], "4.0.1");
    assert_eq!(capability["implementation"]["url"], format!("{BASE}/r4"));
    let resources = capability["rest"][0]["resource"].as_array().unwrap();
    let group = resources.iter().find(|resource| resource["type"] == "Group").expect("Group listed");
    assert_eq!(group["operation"][0]["name"], "export");
    let search_params: BTreeSet<&str> =
        group["searchParam"].as_array().unwrap().iter().map(|param| param["name"].as_str().unwrap()).collect();
    assert_eq!(search_params, ["_id", "_lastUpdated", "identifier", "patient", "subject"].into_iter().collect());

    assert_outcome(
        &server.send(get("/r4/metadata").header("accept", "application/fhir+xml")).await,
        406,
        "not-supported",
        Some("Accept"),
    );
    for path in ["/healthz", "/healthz/ready", "/healthz/live"] {
        let health = server.send(get(path)).await;
        assert_status(&health, 200);
        assert_eq!(health.text(), "ok", "{path}");
    }
}

#[tokio::test]
async fn admin_api_is_off_without_a_token() {
    let server = Server::start();
    for call in [
        get("/admin/tenants"),
        post("/admin/tenants").json(&json!({"name": "x"})).header("authorization", "Bearer anything"),
    ] {
        assert_outcome(&server.send(call).await, 404, "not-found", None);
    }
    assert!(server.store.tenant_by_name("x").unwrap().is_none());
}

#[tokio::test]
async fn admin_api_creates_tenants_and_clients_with_the_right_token() {
    let server = Server::with_config(HttpConfig { admin_token: Some("admin-secret-token".into()), ..test_config() });
    let admin = |call: Call| call.header("authorization", "Bearer admin-secret-token");
    for call in [
        post("/admin/tenants").json(&json!({"name": "acme"})),
        post("/admin/tenants").json(&json!({"name": "acme"})).header("authorization", "Bearer wrong-token"),
        post("/admin/tenants").json(&json!({"name": "acme"})).header("authorization", "admin-secret-token"),
    ] {
        assert_outcome(&server.send(call).await, 401, "login", None);
    }
    assert!(server.store.list_tenants().unwrap().is_empty());

    let reply = server.send(admin(post("/admin/tenants").json(&json!({"name": "acme"})))).await;
    assert_status(&reply, 201);
    assert_eq!(redact(reply.json()), json!({"name": "acme", "created": "<instant>"}));
    assert_outcome(
        &server.send(admin(post("/admin/tenants").json(&json!({"name": "acme"})))).await,
        409,
        "duplicate",
        None,
    );
    assert_outcome(
        &server.send(admin(post("/admin/tenants").json(&json!({"name": "bad name"})))).await,
        400,
        "value",
        Some("name"),
    );
    assert_outcome(&server.send(admin(post("/admin/tenants/nope/clients"))).await, 404, "not-found", None);

    let reply = server.send(admin(post("/admin/tenants/acme/clients"))).await;
    assert_status(&reply, 201);
    let credentials = reply.json();
    assert_eq!(credentials["tenant"], "acme");
    let client = Client {
        id: credentials["client_id"].as_str().unwrap().into(),
        secret: credentials["client_secret"].as_str().unwrap().into(),
    };
    assert_status(&server.send(get("/r4/Patient").by(&client)).await, 200);

    let listed = server.send(admin(get("/admin/tenants/acme/clients"))).await.json();
    assert_eq!(listed["clients"][0]["client_id"], json!(client.id));
    assert!(!listed.to_string().contains(&client.secret), "the secret is shown once only");

    assert_status(&server.send(admin(post(&format!("/admin/clients/{}/revoke", client.id)))).await, 204);
    assert_outcome(&server.send(get("/r4/Patient").by(&client)).await, 401, "login", None);
}

/// `POST /r4/$upload-ndjson`: a streamed NDJSON body goes through the import path; every refused
/// line is listed (with its line number) and the rest is stored; a second upload changes nothing.
#[tokio::test]
async fn ndjson_upload_reports_each_bad_line_and_stores_the_rest() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let lines = [
        r#"{"resourceType":"Patient","id":"u1"}"#,
        r#"{"resourceType":"Patient","id":"u2""#,
        r#"{"resourceType":"Nope","id":"x"}"#,
        "",
        r#"{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"x"},"subject":{"reference":"urn:uuid:u1"}}"#,
        r#"{"resourceType":"Observation","id":"o2","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/"}}"#,
    ];
    let body = lines.join("\n");
    let reply = server.send(post("/r4/$upload-ndjson").by(&client).raw("application/fhir+ndjson", body.clone())).await;
    assert_status(&reply, 200);
    let outcome = reply.json();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    let issues = outcome["issue"].as_array().unwrap();
    assert_eq!(issues[0]["severity"], "information");
    assert!(
        issues[0]["diagnostics"].as_str().unwrap().contains("2 created, 0 updated, 0 unchanged, 3 failed"),
        "{outcome}"
    );
    let failed_lines: Vec<&str> = issues[1..].iter().map(|issue| issue["expression"][0].as_str().unwrap()).collect();
    assert_eq!(failed_lines, vec!["line 2", "line 3", "line 6"]);
    // The urn:uuid reference was resolved to the Patient of the same upload.
    let observation = server.send(get("/r4/Observation/o1").by(&client)).await;
    assert_status(&observation, 200);
    assert_eq!(observation.json()["subject"]["reference"], "Patient/u1");
    assert_status(&server.send(get("/r4/Patient/u2").by(&client)).await, 404);

    let again = server.send(post("/r4/$upload-ndjson").by(&client).raw("application/ndjson", body)).await;
    assert_status(&again, 200);
    assert!(again.json()["issue"][0]["diagnostics"].as_str().unwrap().contains("0 created, 0 updated, 2 unchanged"));

    let wrong_type = server.send(post("/r4/$upload-ndjson").by(&client).raw("application/fhir+json", "{}")).await;
    assert_outcome(&wrong_type, 415, "not-supported", Some("Content-Type"));
    let anonymous = server.send(post("/r4/$upload-ndjson").raw("application/fhir+ndjson", lines[0])).await;
    assert_error(&anonymous, 401, "login");
}

/// However the body is cut into chunks (a line split over many, many lines in one), every line
/// arrives whole and keeps its number; a line over the limit is refused even when it comes in
/// pieces.
#[tokio::test]
async fn ndjson_upload_reassembles_lines_across_chunks() {
    let server = Server::with_config(HttpConfig { max_body_bytes: 2048, ..test_config() });
    let client = server.tenant_client("acme");
    let mut lines: Vec<String> = (0..40).map(|n| format!(r#"{{"resourceType":"Patient","id":"c{n}"}}"#)).collect();
    lines[17] = r#"{"resourceType":"Patient","id":"c17""#.to_owned();
    let body = lines.join("\n") + "\n";
    for (round, chunk) in [1, 7, 64, 1000].into_iter().enumerate() {
        let reply = server
            .send_in_chunks(post("/r4/$upload-ndjson").by(&client).raw("application/fhir+ndjson", body.clone()), chunk)
            .await;
        assert_status(&reply, 200);
        let outcome = reply.json();
        let expected = if round == 0 {
            "39 created, 0 updated, 0 unchanged, 1 failed"
        } else {
            "0 created, 0 updated, 39 unchanged, 1 failed"
        };
        assert!(
            outcome["issue"][0]["diagnostics"].as_str().unwrap().contains(expected),
            "chunks of {chunk}: {outcome}"
        );
        assert_eq!(outcome["issue"][1]["expression"][0], "line 18", "chunks of {chunk}");
    }
    let long = format!(r#"{{"resourceType":"Patient","id":"long","name":[{{"text":"{}"}}]}}"#, "x".repeat(4096));
    let body = format!("{}\n{long}\n{}\n", lines[0], lines[1]);
    let reply =
        server.send_in_chunks(post("/r4/$upload-ndjson").by(&client).raw("application/fhir+ndjson", body), 100).await;
    assert_eq!(reply.status.as_u16(), 413, "{}", reply.text());
}

/// An upload line longer than the body limit stops the upload with 413; the lines before it are
/// stored and the outcome says so.
#[tokio::test]
async fn ndjson_upload_refuses_an_oversized_line_and_reports_what_was_stored() {
    let server = Server::with_config(HttpConfig { max_body_bytes: 2048, ..test_config() });
    let client = server.tenant_client("acme");
    let long_name = "x".repeat(4096);
    let body = format!(
        "{}\n{}\n",
        r#"{"resourceType":"Patient","id":"first"}"#,
        json!({"resourceType": "Patient", "id": "second", "name": [{"family": long_name}]})
    );
    let reply = server.send(post("/r4/$upload-ndjson").by(&client).raw("application/fhir+ndjson", body)).await;
    let outcome = assert_error(&reply, 413, "too-costly");
    assert!(outcome["issue"][1]["diagnostics"].as_str().unwrap().contains("1 created"), "{outcome}");
    assert_status(&server.send(get("/r4/Patient/first").by(&client)).await, 200);
    assert_status(&server.send(get("/r4/Patient/second").by(&client)).await, 404);
}
