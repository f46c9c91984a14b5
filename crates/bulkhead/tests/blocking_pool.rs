//! Black-box tests (tier 3): with the smallest pool of blocking threads the configuration
//! allows, a mixed load of writes, reads, exports and an upload all finish (work beyond the
//! pool queues, it never deadlocks); a pool that downloads, plans and uploads could fill is
//! refused; uploads beyond their own pool are answered 429.

#[allow(unused_imports)] // not every helper is used here
mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use serde_json::json;

const MEMBERS: usize = 6;

/// Longer than the load takes on a loaded 2-core machine by far; a hang fails the test here.
const LOAD_DEADLINE: Duration = Duration::from_secs(120);

/// An upload whose body arrives in `lines` pieces, `pause` apart: its importer holds a
/// blocking thread for the whole body.
fn slow_upload_body(lines: usize, pause: Duration) -> reqwest::Body {
    let pieces = futures::stream::iter(0..lines).then(move |n| async move {
        tokio::time::sleep(pause).await;
        let line = json!({"resourceType": "Patient", "id": format!("uploaded-{n}"), "gender": "other"});
        Ok::<_, std::io::Error>(format!("{line}\n"))
    });
    reqwest::Body::wrap_stream(pieces)
}

/// Four blocking threads: one each for a download, a plan and an upload, one for everything
/// else. Eight writers (all waiting for the one SQLite writer), four readers, two exporters and
/// a slow upload at once.
#[tokio::test(flavor = "multi_thread")]
async fn the_smallest_blocking_pool_queues_a_mixed_load_and_never_hangs() {
    let env = [
        ("BULKHEAD_MAX_BLOCKING_THREADS", "4"),
        ("BULKHEAD_MAX_CONCURRENT_DOWNLOADS", "1"),
        ("BULKHEAD_MAX_CONCURRENT_PLANS", "1"),
        ("BULKHEAD_MAX_CONCURRENT_UPLOADS", "1"),
        // Queued downloads and plans wait rather than get 429: this test is about queueing.
        ("BULKHEAD_DOWNLOAD_QUEUE_SECONDS", "120"),
        ("BULKHEAD_PLAN_QUEUE_SECONDS", "120"),
    ];
    let env = env.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect();
    let server = Server::start_with(Options { env, ..Options::default() }).await;
    server.create_tenant("acme");
    let api = server.create_client("acme");
    let members: Vec<String> = (0..MEMBERS).map(|i| format!("m{i}")).collect();
    for member in &members {
        api.upsert(&patient(Some(member), "Member")).await;
    }
    let member_refs: Vec<&str> = members.iter().map(String::as_str).collect();
    api.upsert(&group(Some("cohort"), &member_refs)).await;

    let writers = (0..8).map(|writer| {
        let (api, members) = (&api, &members);
        async move {
            for n in 0..5 {
                let subject = &members[(writer + n) % MEMBERS];
                api.post("/r4/Observation", &observation(None, subject, n as f64)).await.expect(201);
            }
        }
    });
    let readers = (0..4).map(|reader| {
        let (api, members) = (&api, &members);
        async move {
            for n in 0..5 {
                let member = &members[(reader + n) % MEMBERS];
                api.get(&format!("/r4/Patient/{member}")).await.expect(200);
                api.get(&format!("/r4/Observation?patient={member}")).await.expect(200);
            }
        }
    });
    let exporters = (0..2).map(|_| {
        let api = &api;
        let kick_off = format!("{}/bulk-data/r4/Group/cohort/$export", server.base);
        async move {
            for _ in 0..2 {
                let request = api.request(reqwest::Method::GET, &kick_off).header("accept", "application/fhir+json");
                let manifest = Api::send(request).await.expect(200);
                let files = download_list(api, &manifest, "output").await;
                assert!(files.contains_key("Patient"), "the members are exported: {manifest}");
            }
        }
    });
    let upload = async {
        let request = api
            .request(reqwest::Method::POST, "/r4/$upload-ndjson")
            .header("content-type", "application/fhir+ndjson")
            .body(slow_upload_body(10, Duration::from_millis(100)));
        let outcome = Api::send(request).await.expect(200);
        assert!(outcome.to_string().contains("10 resources stored"), "{outcome}");
    };
    let load = async {
        futures::join!(
            futures::future::join_all(writers),
            futures::future::join_all(readers),
            futures::future::join_all(exporters),
            upload
        )
    };
    if tokio::time::timeout(LOAD_DEADLINE, load).await.is_err() {
        panic!("the load did not finish within {LOAD_DEADLINE:?}: blocking work hangs\n{}", server.log());
    }
    // Every write is stored, and the server still answers.
    let mut stored = 0;
    for member in &members {
        let bundle = api.get(&format!("/r4/Observation?patient={member}&_count=100")).await.expect(200);
        stored += bundle["entry"].as_array().map_or(0, Vec::len);
    }
    assert_eq!(stored, 40, "8 writers × 5 Observations");
    api.read("Patient/uploaded-9").await;
}

/// A pool that downloads, plans and uploads could take whole is refused at startup, naming the
/// key.
#[test]
fn a_blocking_pool_no_larger_than_downloads_plans_and_uploads_is_refused() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut command = bulkhead();
    command
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port()), "--data-dir"])
        .arg(dir.path())
        .env("BULKHEAD_MAX_BLOCKING_THREADS", "12"); // 8 downloads + 2 plans + 2 uploads by default
    let output = run_with_deadline(command, Duration::from_secs(30));
    assert!(!output.status.success(), "started with a pool of 12");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("max_blocking_threads"), "{stderr}");
}

/// An upload beyond `max_concurrent_uploads` waits `upload_queue_seconds` for a place, then is
/// answered 429 with `Retry-After` and an OperationOutcome while the pool stays full, and stores
/// nothing; once the upload holding the place ends, the next is imported.
#[tokio::test(flavor = "multi_thread")]
async fn uploads_beyond_their_pool_are_answered_429_until_a_place_is_free() {
    // Two seconds' wait: the slow upload gets its place even behind a small one that arrived
    // first, and a small one behind the slow upload (6 s) is refused.
    let env = [("BULKHEAD_MAX_CONCURRENT_UPLOADS", "1"), ("BULKHEAD_UPLOAD_QUEUE_SECONDS", "2")];
    let env = env.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect();
    let server = Server::start_with(Options { env, ..Options::default() }).await;
    server.create_tenant("acme");
    let api = server.create_client("acme");
    let upload = |body: reqwest::Body| {
        api.request(reqwest::Method::POST, "/r4/$upload-ndjson")
            .header("content-type", "application/fhir+ndjson")
            .body(body)
    };
    let slow = tokio::spawn(Api::send(upload(slow_upload_body(40, Duration::from_millis(150)))));
    let line = |id: &str| json!({"resourceType": "Patient", "id": id, "gender": "other"}).to_string();
    // Small uploads until one finds the slow upload holding the only place.
    let mut attempt = 0;
    let refused = loop {
        attempt += 1;
        let reply = Api::send(upload(reqwest::Body::from(line(&format!("attempt-{attempt}"))))).await;
        if reply.status == 429 {
            break reply;
        }
        reply.expect(200);
        assert!(!slow.is_finished(), "the slow upload ended before any upload was refused\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    refused.expect_outcome(429);
    assert_eq!(refused.header("retry-after").as_deref(), Some("5"));
    api.get(&format!("/r4/Patient/attempt-{attempt}")).await.expect(404);
    let outcome = slow.await.expect("the slow upload's task").expect(200);
    assert!(outcome.to_string().contains("40 resources stored"), "{outcome}");
    let outcome = Api::send(upload(reqwest::Body::from(line("after")))).await.expect(200);
    assert!(outcome.to_string().contains("1 resources stored"), "{outcome}");
    api.read("Patient/after").await;
}
