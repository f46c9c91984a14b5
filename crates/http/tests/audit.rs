//! The audit trail in process: outcomes a black-box client cannot easily cause or observe —
//! a download abandoned part-way (`aborted`), a refused write recorded once with its status and
//! no success record, and a batch recorded as one record listing every entry's outcome (refused
//! entries included); and that a burst of concurrent requests, whose records are group-committed
//! after the responses, leaves exactly one record each, which the admin API shows at once.

mod common;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use bulkhead_store::{AuditQuery, AuditRecord, TenantId};
use serde_json::{json, Value};
use tower::ServiceExt;

use bulkhead_http::HttpConfig;
use common::{assert_status, get, local, post, put, test_config, Server};

/// The records of `tenant`, once every record handed to the audit writer so far is stored.
fn records(server: &Server, tenant: TenantId) -> Vec<AuditRecord> {
    server.audit.flush_blocking();
    server.store.audit_records(tenant, &AuditQuery { limit: 1_000, ..AuditQuery::default() }).unwrap()
}

/// Waits for a record of `action` (downloads are recorded when their body is dropped, on a
/// blocking thread).
async fn wait_for(server: &Server, tenant: TenantId, action: &str) -> AuditRecord {
    let started = Instant::now();
    loop {
        if let Some(found) = records(server, tenant).into_iter().find(|record| record.action == action) {
            return found;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no {action} record: {:#?}", records(server, tenant));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn detail(record: &AuditRecord) -> Value {
    serde_json::from_str(&record.detail).unwrap()
}

#[tokio::test]
async fn an_abandoned_download_is_recorded_as_aborted() {
    let server = Server::start();
    let tenant = server.tenant("acme");
    let client = server.client(tenant);
    for p in 0..50 {
        let patient = json!({"resourceType": "Patient", "id": format!("p{p}"), "name": [{"text": "x".repeat(4_000)}]});
        assert_status(&server.send(put(&format!("/r4/Patient/p{p}")).by(&client).json(&patient)).await, 201);
    }
    let members: Vec<Value> = (0..50).map(|p| json!({"entity": {"reference": format!("Patient/p{p}")}})).collect();
    let group = json!({"resourceType": "Group", "id": "g", "type": "person", "actual": true, "member": members});
    assert_status(&server.send(put("/r4/Group/g").by(&client).json(&group)).await, 201);
    let manifest: Value = server.send(get("/bulk-data/r4/Group/g/$export?_type=Patient").by(&client)).await.json();
    let url = local(manifest["output"][0]["url"].as_str().unwrap());

    let request = Request::builder()
        .uri(&url)
        .header("client_id", &client.id)
        .header("client_secret", &client.secret)
        .body(Body::empty())
        .unwrap();
    let response = server.app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    drop(response); // the client goes away before reading anything
    let record = wait_for(&server, tenant, "export.download").await;
    assert_eq!(record.outcome, "aborted", "{record:?}");
    let detail = detail(&record);
    assert_eq!((detail["complete"].as_bool(), detail["resources"].is_null()), (Some(false), true), "{detail}");
    assert_eq!(record.client, client.id);
    assert_eq!(record.target, "Group/g/_history/1");
}

#[tokio::test]
async fn a_refused_write_has_one_failure_record_and_no_success_record() {
    let server = Server::start();
    let tenant = server.tenant("acme");
    let client = server.client(tenant);
    let patient = json!({"resourceType": "Patient", "id": "p1", "gender": "female"});
    assert_status(&server.send(put("/r4/Patient/p1").by(&client).json(&patient)).await, 201);
    let stale = server.send(put("/r4/Patient/p1").by(&client).header("if-match", "W/\"7\"").json(&patient)).await;
    assert_status(&stale, 412);
    let found: Vec<(String, String, String, u16)> = records(&server, tenant)
        .into_iter()
        .map(|record| (record.action, record.target, record.outcome, record.status))
        .collect();
    assert_eq!(
        found,
        [
            ("create".to_owned(), "Patient/p1/_history/1".to_owned(), "success".to_owned(), 201),
            ("update".to_owned(), "Patient/p1".to_owned(), "failure".to_owned(), 412),
        ]
    );
}

#[tokio::test]
async fn a_batch_is_one_record_listing_each_entry_with_its_outcome() {
    let server = Server::start();
    let tenant = server.tenant("acme");
    let client = server.client(tenant);
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {"resourceType": "Patient", "id": "a"}, "request": {"method": "PUT", "url": "Patient/a"}},
        {"resource": {"resourceType": "Patient", "id": "b"}, "request": {"method": "PUT", "url": "Patient/b"}},
        {"request": {"method": "DELETE", "url": "Patient/a"}},
    ]});
    assert_status(&server.send(post("/r4").by(&client).json(&bundle)).await, 200);
    let conflicting = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {"resourceType": "Patient", "id": "b"}, "request": {"method": "PUT", "url": "Patient/b", "ifMatch": "W/\"9\""}},
        {"resource": {"resourceType": "Patient", "id": "c", "gender": "sometimes"}, "request": {"method": "PUT", "url": "Patient/c"}},
        {"resource": {"resourceType": "Patient", "id": "c"}, "request": {"method": "PUT", "url": "Patient/c"}},
    ]});
    assert_status(&server.send(post("/r4").by(&client).json(&conflicting)).await, 200);
    // One record per Bundle (per request), listing every entry with its own outcome.
    let found = records(&server, tenant);
    let summary: Vec<(&str, &str, &str)> =
        found.iter().map(|record| (record.action.as_str(), record.target.as_str(), record.outcome.as_str())).collect();
    assert_eq!(summary, [("batch", "Bundle", "success"), ("batch", "Bundle", "failure")]);
    assert_eq!(found[0].patients, ["a", "b"]);
    let entries = |record: &AuditRecord| -> Vec<(i64, String, String, String, u64)> {
        detail(record)["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|entry| {
                let text = |name: &str| entry[name].as_str().unwrap().to_owned();
                (
                    entry["entry"].as_i64().unwrap(),
                    text("action"),
                    text("target"),
                    text("outcome"),
                    entry["status"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let owned = |items: &[(i64, &str, &str, &str, u64)]| -> Vec<(i64, String, String, String, u64)> {
        items.iter().map(|(e, a, t, o, s)| (*e, a.to_string(), t.to_string(), o.to_string(), *s)).collect()
    };
    assert_eq!(
        entries(&found[0]),
        owned(&[
            (0, "create", "Patient/a/_history/1", "success", 201),
            (1, "create", "Patient/b/_history/1", "success", 201),
            (2, "delete", "Patient/a/_history/2", "success", 204),
        ])
    );
    assert_eq!(
        entries(&found[1]),
        owned(&[
            (0, "update", "Patient/b", "failure", 412),
            (1, "refused", "Bundle.entry[1]", "failure", 400),
            (2, "create", "Patient/c/_history/1", "success", 201),
        ])
    );
    assert_eq!(detail(&found[1])["failed"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_concurrent_requests_leaves_exactly_one_record_each() {
    const ADMIN_TOKEN: &str = "admin-token-for-the-burst-0123456789";
    const BURST: usize = 300;
    let server = Server::with_config(HttpConfig { admin_token: Some(ADMIN_TOKEN.into()), ..test_config() });
    let tenant = server.tenant("acme");
    let client = server.client(tenant);
    let patient = json!({"resourceType": "Patient", "id": "p1"});
    assert_status(&server.send(put("/r4/Patient/p1").by(&client).json(&patient)).await, 201);
    let ids: Vec<String> = (0..BURST).map(|index| format!("burst-{index}")).collect();
    let reads = ids.iter().map(|id| {
        let server = &server;
        let call = get(if id.ends_with('7') { "/r4/Patient/nobody" } else { "/r4/Patient/p1" })
            .by(&client)
            .header("x-request-id", id);
        async move { server.send(call).await.status }
    });
    let statuses = futures::future::join_all(reads).await;
    assert!(statuses.iter().all(|status| [200, 404].contains(&status.as_u16())), "{statuses:?}");

    // Asked right after the last response, the admin API lists every one of them: it waits for
    // the records still on their way to the store.
    let listed =
        server.send(get("/admin/audit?tenant=acme").header("authorization", &format!("Bearer {ADMIN_TOKEN}"))).await;
    assert_status(&listed, 200);
    let listed: Vec<String> = listed
        .text()
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap()["request_id"].as_str().unwrap().to_owned())
        .filter(|id| id.starts_with("burst-"))
        .collect();
    assert_eq!(listed.len(), BURST, "{listed:?}");

    let mut found: Vec<(String, String)> = records(&server, tenant)
        .into_iter()
        .filter(|record| record.request_id.starts_with("burst-"))
        .map(|record| (record.request_id, record.outcome))
        .collect();
    found.sort();
    let mut expected: Vec<(String, String)> =
        ids.iter().map(|id| (id.clone(), if id.ends_with('7') { "failure" } else { "success" }.to_owned())).collect();
    expected.sort();
    assert_eq!(found, expected, "exactly one record per request, with its outcome");
}

/// `audit_trail = false` (for measuring the trail's cost): nothing a request does is recorded,
/// neither a write (in its transaction) nor a read or search (by the writer thread), while the
/// requests are answered as usual.
#[tokio::test]
async fn with_the_trail_off_requests_leave_no_record() {
    let server = Server::with_config(HttpConfig { audit_trail: false, ..test_config() });
    let tenant = server.tenant("acme");
    let client = server.client(tenant);
    let patient = json!({"resourceType": "Patient", "id": "p1"});
    assert_status(&server.send(put("/r4/Patient/p1").by(&client).json(&patient)).await, 201);
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": "Patient/p1"}}, "request": {"method": "POST", "url": "Observation"}},
    ]});
    assert_status(&server.send(post("/r4").by(&client).json(&bundle)).await, 200);
    assert_status(&server.send(get("/r4/Patient/p1").by(&client)).await, 200);
    assert_status(&server.send(get("/r4/Observation?patient=p1").by(&client)).await, 200);
    assert_eq!(records(&server, tenant), Vec::<AuditRecord>::new());
}
