//! PostgreSQL restarted under a running `bulkhead serve`, on a cluster of the test's own (the
//! shared one must stay up): an asynchronous export is being written (to S3 when the test
//! server is there) and a synchronous export's file is being downloaded when PostgreSQL stops.
//! While it is down, requests are answered 503 with an OperationOutcome and `Retry-After`, at
//! once (not after the pool's check-out timeout) and never 500; the download in flight either
//! completes whole or breaks visibly (never a short file that looks whole). PostgreSQL then
//! starts again on the same port and, without restarting bulkhead (its pool reconnects), the
//! job completes and every download is complete and correct. Run for a clean stop (`fast`) and a
//! crash (`immediate`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const PATIENTS: usize = 20;
const OBSERVATIONS_PER_PATIENT: usize = 20;
/// Each Observation carries this much text, so one Observation file (a part) is far larger than
/// what the server and the socket buffer ahead of a client that stops reading: its download is
/// still reading PostgreSQL when PostgreSQL stops.
const NOTE_BYTES: usize = 40_000;
const PART_SIZE: usize = 400;
/// The jobs' lease: far longer than the test, so only a job given back resumes in time (half a
/// lease leaves a loaded 2-core machine room: a CI run beside a release build needed over 30 s).
const LEASE: Duration = Duration::from_secs(120);
/// Asynchronous exports running at once when PostgreSQL stops.
const JOBS: usize = 3;
/// The pool's check-out timeout (the default): a 503 during the outage must come well before it.
const POOL_TIMEOUT: Duration = Duration::from_secs(10);

fn ndjson_data() -> String {
    let mut lines = Vec::new();
    for p in 0..PATIENTS {
        let patient_id = format!("p{p:03}");
        lines.push(patient(Some(&patient_id), "Restart").to_string());
        for o in 0..OBSERVATIONS_PER_PATIENT {
            let mut body = observation(Some(&format!("o{p:03}-{o:02}")), &patient_id, o as f64);
            // Text that differs per resource, so a mixed-up or repeated body shows.
            let note: String = (0..NOTE_BYTES).map(|i| char::from(b'a' + ((i * 7 + p * 31 + o) % 26) as u8)).collect();
            body["note"] = json!([{"text": note}]);
            lines.push(body.to_string());
        }
    }
    lines.join("\n") + "\n"
}

/// What was written, by type and id.
fn written_ids() -> BTreeMap<String, BTreeSet<String>> {
    let patients = (0..PATIENTS).map(|p| format!("p{p:03}"));
    let observations =
        (0..PATIENTS).flat_map(|p| (0..OBSERVATIONS_PER_PATIENT).map(move |o| format!("o{p:03}-{o:02}")));
    BTreeMap::from([
        ("Patient".to_owned(), patients.collect()),
        ("Observation".to_owned(), observations.collect()),
        ("Group".to_owned(), BTreeSet::from(["g1".to_owned()])),
    ])
}

/// Checks one downloaded file against its manifest item and the data written; returns its
/// `(type, id)`s.
fn check_file(item: &Value, body: &[u8]) -> Vec<(String, String)> {
    let url = item["url"].as_str().expect("url");
    let text = std::str::from_utf8(body).unwrap_or_else(|_| panic!("{url}: not UTF-8"));
    assert!(text.ends_with('\n'), "{url}: every line ends with a newline");
    let mut found = Vec::new();
    for line in text.lines() {
        let resource: Value = serde_json::from_str(line).unwrap_or_else(|error| panic!("{url}: {error}"));
        let (resource_type, id) =
            (resource["resourceType"].as_str().expect("type"), resource["id"].as_str().expect("id"));
        assert_eq!(resource_type, item["type"].as_str().expect("type"), "{url}");
        if resource_type == "Observation" {
            let (p, o): (usize, usize) = (id[1..4].parse().expect("p"), id[5..7].parse().expect("o"));
            let note = resource["note"][0]["text"].as_str().expect("note");
            assert_eq!(note.len(), NOTE_BYTES, "{url}: {id}'s note");
            assert!(note.starts_with(char::from(b'a' + ((p * 31 + o) % 26) as u8)), "{url}: {id}'s own note");
        }
        found.push((resource_type.to_owned(), id.to_owned()));
    }
    assert_eq!(found.len() as u64, item["count"].as_u64().expect("count"), "{url}: the manifest's count");
    found
}

/// Downloads every file of a manifest (from `api`'s instance) and checks that together they hold
/// every resource written exactly once.
async fn check_manifest(api: &Api, manifest: &Value) {
    let mut ids: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for item in manifest["output"].as_array().expect("output") {
        let reply = api.get(item["url"].as_str().expect("url")).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        for (resource_type, id) in check_file(item, &reply.body) {
            assert!(ids.entry(resource_type).or_default().insert(id.clone()), "{id} exported twice");
        }
    }
    assert_eq!(ids, written_ids(), "every resource written, each once, nothing else");
}

/// A request during the outage: 503, an OperationOutcome, `Retry-After`, promptly.
async fn expect_unavailable(request: reqwest::RequestBuilder, what: &str) {
    let started = Instant::now();
    let reply = Api::send(request).await;
    let took = started.elapsed();
    assert_eq!(reply.status, 503, "{what} during the outage: {} {}", reply.status, reply.text());
    let outcome = reply.expect_outcome(503);
    assert_eq!(outcome["issue"][0]["code"], "transient", "{what}: {outcome}");
    assert!(reply.header("retry-after").is_some_and(|seconds| seconds.parse::<u64>().is_ok()), "{what}: Retry-After");
    assert!(took < POOL_TIMEOUT / 2, "{what} answered in {took:?}: the outage is known, no waiting for the pool");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_and_its_downloads_survive_a_postgresql_restart() {
    restart_scenario("fast").await;
}

/// The same with a crash (`pg_ctl stop -m immediate`: no session is told, recovery at start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_and_its_downloads_survive_a_postgresql_crash() {
    restart_scenario("immediate").await;
}

/// Stops PostgreSQL with `pg_ctl stop -m mode` mid-export, then starts it again.
async fn restart_scenario(mode: &'static str) {
    let Some(cluster) = tokio::task::spawn_blocking(PgCluster::start).await.expect("starting PostgreSQL") else {
        return;
    };
    let s3 = s3_endpoint(
        "postgres_restart",
        "the asynchronous exports are not materialised, so they are done before the stop",
    );
    let mut toml = format!(
        "export_part_size = {PART_SIZE}\ndatabase_connect_timeout_seconds = 2\ndatabase_pool_timeout_seconds = {}\n\
         export_lease_seconds = {}\n",
        POOL_TIMEOUT.as_secs(),
        LEASE.as_secs()
    );
    let bucket = match &s3 {
        Some(endpoint) => Some(S3Bucket::create(endpoint).await),
        None => None,
    };
    if let Some(bucket) = &bucket {
        toml.push_str(&bucket.output_toml());
    }
    let options =
        Options { database_url: Some(cluster.url("postgres")), config_toml: Some(toml), ..Options::default() };
    let server = Server::start_with(options).await;
    server.create_tenant("acme");
    let api = server.create_client("acme");
    let data = tempfile::Builder::new().suffix(".ndjson").tempfile().expect("temporary file");
    std::fs::write(data.path(), ndjson_data()).expect("writing the data");
    server.cli(&["import", "--tenant", "acme", data.path().to_str().expect("UTF-8 path")]);
    let members: Vec<String> = (0..PATIENTS).map(|p| format!("p{p:03}")).collect();
    api.upsert(&group(Some("g1"), &members.iter().map(String::as_str).collect::<Vec<_>>())).await;

    // A synchronous export; its first Observation file is being downloaded (one chunk read, then
    // the client pauses) when PostgreSQL stops.
    let sync_manifest = api.get("/bulk-data/r4/Group/g1/$export").await.expect(200);
    let big_item = sync_manifest["output"]
        .as_array()
        .expect("output")
        .iter()
        .find(|item| item["type"] == "Observation")
        .expect("an Observation file")
        .clone();
    let big_url = big_item["url"].as_str().expect("url").to_owned();
    let mut in_flight = api.request(reqwest::Method::GET, &big_url).send().await.expect("download");
    assert_eq!(in_flight.status(), 200);
    let mut in_flight_body = in_flight.chunk().await.expect("a first chunk").expect("not empty").to_vec();

    // Asynchronous exports, being written (at once, by one worker) when PostgreSQL stops.
    let mut statuses = Vec::new();
    for _ in 0..JOBS {
        let kick_off = api.get("/r4/Group/g1/$export").await;
        assert_eq!(kick_off.status, 202, "{}", kick_off.text());
        statuses.push(kick_off.header("content-location").expect("Content-Location"));
    }
    let status = statuses[0].clone();
    if let Some(bucket) = &bucket {
        // The bucket, not the status URL (a poll waits a while for a job running here): stop once
        // the jobs have written a few of their files.
        let deadline = Instant::now() + Duration::from_secs(60);
        while bucket.object_count().await < JOBS {
            assert!(Instant::now() < deadline, "the jobs wrote no files");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    let stopping = std::sync::Arc::new(cluster);
    let stop = stopping.clone();
    tokio::task::spawn_blocking(move || stop.stop(mode)).await.expect("stopping PostgreSQL");

    // The outage: every request that needs the database gets a prompt 503.
    let reads = [
        ("a read", api.request(reqwest::Method::GET, "/r4/Patient/p000")),
        ("a search", api.request(reqwest::Method::GET, "/r4/Observation?subject=Patient/p001")),
        (
            "a write",
            api.request(reqwest::Method::PUT, "/r4/Patient/p999")
                .header("content-type", "application/fhir+json")
                .body(patient(Some("p999"), "Outage").to_string()),
        ),
        ("a status poll", api.request(reqwest::Method::GET, &status)),
        ("a synchronous kick-off", api.request(reqwest::Method::GET, "/bulk-data/r4/Group/g1/$export")),
        ("an asynchronous kick-off", api.request(reqwest::Method::GET, "/r4/Group/g1/$export")),
        ("a file download", api.request(reqwest::Method::GET, &big_url)),
    ];
    for (what, request) in reads {
        expect_unavailable(request, what).await;
    }
    let ready = Api::send(http_client().get(format!("{}/healthz/ready", server.base))).await;
    assert_eq!(ready.status, 503, "not ready while the database is down: {}", ready.text());
    let live = Api::send(http_client().get(format!("{}/healthz/live", server.base))).await;
    assert_eq!(live.status, 200, "alive all the same");

    // The download in flight: whole, or visibly broken.
    let mut cut_off = false;
    loop {
        match in_flight.chunk().await {
            Ok(Some(chunk)) => in_flight_body.extend_from_slice(&chunk),
            Ok(None) => break,
            Err(_) => {
                cut_off = true;
                break;
            }
        }
    }
    if cut_off {
        eprintln!("postgres_restart: the download in flight broke off after {} bytes", in_flight_body.len());
    } else {
        check_file(&big_item, &in_flight_body);
        eprintln!("postgres_restart: the download in flight was whole before it needed the database");
    }

    let start = stopping.clone();
    tokio::task::spawn_blocking(move || start.restart()).await.expect("starting PostgreSQL again");

    // The same server, without a restart: the jobs complete, and every download is whole. A job
    // the outage interrupted resumes soon, not once its holder's lease has lapsed.
    let deadline = Instant::now() + LEASE / 2;
    for status in &statuses {
        let manifest = loop {
            let reply = api.get(status).await;
            match reply.status {
                200 => break reply.json(),
                // Until the pool has reconnected, 503s are fine; 202 while the job resumes.
                202 | 503 => assert!(
                    Instant::now() < deadline,
                    "the job did not complete within half a lease (last status {}); the server's log:\n{}",
                    reply.status,
                    server.log()
                ),
                other => panic!("status after the restart: {other} {}", reply.text()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        check_manifest(&api, &manifest).await;
    }
    check_manifest(&api, &sync_manifest).await;
    let again = api.get("/bulk-data/r4/Group/g1/$export").await.expect(200);
    check_manifest(&api, &again).await;
    assert_eq!(api.read("Patient/p000").await["id"], "p000");
    let log = server.log();
    assert!(!log.contains("panicked"), "{log}");
    if s3.is_some() {
        // Written to S3 while PostgreSQL stopped: a job was paused and resumed, not failed.
        assert!(log.contains("export job paused: the database is unavailable"), "{log}");
        assert!(log.contains("export job claimed") && log.contains("fence=2"), "{log}");
    }
}
