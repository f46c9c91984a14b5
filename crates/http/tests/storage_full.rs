//! A full disk (simulated by a page cap on the database: SQLite answers SQLITE_FULL exactly as
//! on a full disk) is the server's condition, not the client's mistake: writes and exports
//! answer 507 with an OperationOutcome, `/healthz` answers 503, and an upload cut short says
//! what it committed. The real full disk (tmpfs) is in the black-box tier.

mod common;

use bulkhead_http::HttpConfig;
use common::*;
use serde_json::{json, Value};

fn patient(id: &str, text_bytes: usize) -> Value {
    json!({"resourceType": "Patient", "id": id, "name": [{"family": "F", "text": "x".repeat(text_bytes)}]})
}

#[tokio::test]
async fn writes_and_exports_on_a_full_store_answer_507() {
    if skip_on_postgres("a page cap on the database file is a SQLite setting") {
        return;
    }
    let server = Server::start();
    let client = server.tenant_client("acme");
    assert_status(&server.send(put("/r4/Patient/p1").by(&client).json(&patient("p1", 10))).await, 201);
    let group = json!({"resourceType": "Group", "id": "g1", "type": "person", "actual": true,
        "member": [{"entity": {"reference": "Patient/p1"}}]});
    assert_status(&server.send(put("/r4/Group/g1").by(&client).json(&group)).await, 201);
    let server = server.reopen_with_page_cap(test_config(), 4);

    // One write larger than the space left: 507, and nothing of it stored.
    let reply = server.send(put("/r4/Patient/big").by(&client).json(&patient("big", 200_000))).await;
    assert_outcome(&reply, 507, "transient", None);
    assert_status(&server.send(get("/r4/Patient/big").by(&client)).await, 404);
    for bundle_type in ["transaction", "batch"] {
        let bundle = json!({"resourceType": "Bundle", "type": bundle_type, "entry": [
            {"resource": patient("b1", 10), "request": {"method": "PUT", "url": "Patient/b1"}},
            {"resource": patient("b2", 200_000), "request": {"method": "PUT", "url": "Patient/b2"}},
        ]});
        let reply = server.send(post("/r4").by(&client).json(&bundle)).await;
        assert_outcome(&reply, 507, "transient", None);
    }
    // Fill what is left with small writes until the store refuses; never a 500.
    let mut full = false;
    for n in 0..2_000 {
        let reply =
            server.send(put(&format!("/r4/Patient/s{n}")).by(&client).json(&patient(&format!("s{n}"), 2_000))).await;
        match reply.status.as_u16() {
            201 => continue,
            507 => {
                assert_outcome(&reply, 507, "transient", None);
                full = true;
                break;
            }
            other => panic!("write {n} on a filling store answered {other}: {}", reply.text()),
        }
    }
    assert!(full, "the capped store never filled");
    // An asynchronous export records its job: the small row may still fit in a page with room
    // (the black-box test on a full tmpfs makes it fail), but it is never a 500.
    let reply = server.send(get("/r4/Group/g1/$export").by(&client).respond_async()).await;
    match reply.status.as_u16() {
        202 => {}
        507 => drop(assert_outcome(&reply, 507, "transient", None)),
        other => panic!("export kick-off on a full store answered {other}: {}", reply.text()),
    }
    // Reads still work.
    assert_status(&server.send(get("/r4/Patient/p1").by(&client)).await, 200);
}

#[tokio::test]
async fn health_is_503_below_the_free_space_floor() {
    if skip_on_postgres("a page cap on the database file is a SQLite setting") {
        return;
    }
    let server = Server::start();
    assert_status(&server.send(get("/healthz")).await, 200);
    let floor_unreachable = HttpConfig { min_free_disk_bytes: u64::MAX, ..test_config() };
    let server = server.reopen_with_page_cap(floor_unreachable, 1_000_000);
    for path in ["/healthz", "/healthz/ready"] {
        let reply = server.send(get(path)).await;
        let outcome = assert_outcome(&reply, 503, "transient", None);
        assert!(outcome["issue"][0]["diagnostics"].as_str().unwrap().contains("floor"), "{path}: {outcome}");
    }
    // Liveness does not look at the store: restarting the process would not free the disk.
    let live = server.send(get("/healthz/live")).await;
    assert_status(&live, 200);
    assert_eq!(live.text(), "ok");
}

#[tokio::test]
async fn an_upload_stopped_by_a_full_store_reports_what_it_committed() {
    if skip_on_postgres("a page cap on the database file is a SQLite setting") {
        return;
    }
    let server = Server::start();
    let client = server.tenant_client("acme");
    // Room (8 MiB of 16 KiB pages) for a few of the upload's 2 MiB batches, not all of them.
    let server = server.reopen_with_page_cap(test_config(), 512);
    let lines: Vec<String> = (0..6_000).map(|n| patient(&format!("u{n}"), 2_000).to_string()).collect();
    let reply =
        server.send(post("/r4/$upload-ndjson").by(&client).raw("application/fhir+ndjson", lines.join("\n"))).await;
    let outcome = assert_outcome(&reply, 507, "transient", None);
    assert!(outcome["issue"][0]["diagnostics"].as_str().unwrap().contains("the upload stopped"), "{outcome}");
    let summary = outcome["issue"]
        .as_array()
        .unwrap()
        .iter()
        .find(|issue| issue["severity"] == "information")
        .and_then(|issue| issue["diagnostics"].as_str())
        .unwrap_or_else(|| panic!("no summary of what was stored: {outcome}"));
    let stored: u64 = summary
        .strip_suffix(" failed")
        .and_then(|_| summary.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected summary {summary:?}"));
    assert!(summary.contains(&format!("{stored} created")), "{summary}");
    assert!(stored > 0 && stored < 6_000, "a part of the upload fits: {summary}");
    let found = server.search_all(&client, "/r4/Patient?_count=1000").await;
    assert_eq!(found.len() as u64, stored, "the outcome says exactly what is stored: {summary}");
}
