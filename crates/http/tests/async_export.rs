//! Tier-2 tests of the asynchronous Bulk Data pattern (`Prefer: respond-async`): kick-off → 202
//! with an absolute `Content-Location`, poll → 200 with the manifest the synchronous call gives,
//! `DELETE` → 202 then 404, and jobs that only their own tenant, client and user can see. The
//! real router, driven in process over a fresh SQLite store per test.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bulkhead_export::PlanStep;
use bulkhead_fhir::parse_since;
use bulkhead_http::export_status::Planners;
use bulkhead_http::{router, AppState, HttpConfig};
use bulkhead_store::StoreError;
use serde_json::{json, Value};

use common::*;

// ---------------------------------------------------------------------------------------------
// Helpers (the harness is in `common/mod.rs`)
// ---------------------------------------------------------------------------------------------

const STATUS_PREFIX: &str = "http://bulkhead.test/bulk-data/r4/$export-status/";

/// How many jobs the store holds (across tenants); empties it, so call it last.
fn drain_jobs(server: &Server) -> u64 {
    server.store.delete_expired_export_jobs(i64::MAX).expect("sweep")
}

/// The manifest with what changes from one export to the next (the instant, file tokens)
/// replaced by placeholders.
fn redact_manifest(mut manifest: Value) -> Value {
    manifest["transactionTime"] = json!("<instant>");
    for list in ["output", "deleted", "error"] {
        if let Some(items) = manifest.get_mut(list).and_then(Value::as_array_mut) {
            for item in items {
                let url = item["url"].as_str().expect("url");
                let (head, file) = url.rsplit_once('/').expect("a path");
                assert!(file.ends_with(".ndjson"), "{url}");
                item["url"] = json!(format!("{head}/<token>.ndjson"));
            }
        }
    }
    manifest
}

fn observation(patient_id: &str) -> Value {
    json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
           "subject": {"reference": format!("Patient/{patient_id}")}})
}

/// A tenant with one client, two member patients with an Observation each, and their Group.
async fn populated(server: &Server, name: &str) -> (Client, String) {
    let client = server.tenant_client(name);
    let mut members = Vec::new();
    for family in ["One", "Two"] {
        let id = id_of(&server.create(&client, patient(family)).await);
        server.create(&client, observation(&id)).await;
        members.push(id);
    }
    let group = id_of(&server.create(&client, group_of(&[&members[0], &members[1]])).await);
    (client, group)
}

/// Kicks off with `call` (which must carry `Prefer: respond-async`), checks the 202 and returns
/// the status URL as a local path.
async fn kick_off(server: &Server, call: Call) -> String {
    let reply = server.send(call).await;
    assert_status(&reply, 202);
    let location = reply.header("content-location").to_owned();
    let job_id = location.strip_prefix(STATUS_PREFIX).unwrap_or_else(|| panic!("not absolute: {location}"));
    assert!(uuid::Uuid::parse_str(job_id).is_ok(), "job id {job_id} is a UUID");
    if !reply.body.is_empty() {
        assert_eq!(reply.header("content-type"), "application/fhir+json");
        let outcome = reply.json();
        assert_eq!(outcome["resourceType"], "OperationOutcome");
        assert_eq!(outcome["issue"][0]["severity"], "information", "{outcome}");
    }
    local(&location)
}

/// Polls a status URL as Inferno does and returns the manifest of the 200.
async fn poll(server: &Server, client: &Client, status_path: &str) -> (Value, Reply) {
    let reply = server.send(get(status_path).by(client).header("accept", "application/json")).await;
    assert_status(&reply, 200);
    assert_eq!(reply.header("content-type"), "application/json");
    (reply.json(), reply)
}

/// Every exported line of a manifest's `output[]`, downloaded with the client headers.
async fn exported(server: &Server, client: &Client, manifest: &Value) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (line, _) in server.output_lines(client, manifest).await {
        assert!(found.insert(line), "a line was exported twice");
    }
    found
}

/// Seconds from now until an `Expires` IMF-fixdate.
fn expires_in(http_date: &str) -> i64 {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let at = time::PrimitiveDateTime::parse(http_date, &format)
        .unwrap_or_else(|error| panic!("Expires '{http_date}' is not an HTTP-date: {error}"))
        .assume_utc();
    (at - time::OffsetDateTime::now_utc()).whole_seconds()
}

/// Holds background planners at the first step `at` accepts until the test opens it, and
/// records every step planners reached (so a test can wait for one, and see where it stopped).
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    reached: Vec<PlanStep>,
    open: bool,
}

impl Gate {
    fn hold(&self, step: PlanStep, at: fn(PlanStep) -> bool) {
        let mut state = self.state.lock().unwrap();
        state.reached.push(step);
        self.changed.notify_all();
        // Bounded, so a failed test (which never opens the gate) cannot hang the runtime's drop.
        let deadline = Instant::now() + Duration::from_secs(30);
        while at(step) && !state.open && Instant::now() < deadline {
            state = self.changed.wait_timeout(state, Duration::from_millis(100)).unwrap().0;
        }
    }

    fn open(&self) {
        self.state.lock().unwrap().open = true;
        self.changed.notify_all();
    }

    fn reached(&self) -> Vec<PlanStep> {
        self.state.lock().unwrap().reached.clone()
    }

    /// Waits (without blocking the test's runtime) until a planner reached a step `at` accepts.
    async fn wait_for(&self, at: fn(PlanStep) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.reached().into_iter().any(at) {
            assert!(Instant::now() < deadline, "no planner reached the step; reached {:?}", self.reached());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn counting(step: PlanStep) -> bool {
    matches!(step, PlanStep::Counting { .. })
}

/// A server whose planners stop at the counting step until `gate` opens, and whose polls wait
/// only briefly for a planning job.
fn gated_server(gate: &Arc<Gate>) -> (Server, Arc<Planners>) {
    let hook_gate = gate.clone();
    let planners = Arc::new(Planners::default().with_status_wait(Duration::from_millis(50)).with_hook(move |step| {
        hook_gate.hold(step, counting);
        Ok(())
    }));
    let state_planners = planners.clone();
    (Server::with_state(test_config(), move |state| state.planners = state_planners), planners)
}

/// Waits until no planner runs any more.
async fn planners_done(planners: &Planners) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while planners.running() > 0 {
        assert!(Instant::now() < deadline, "a planner is still running");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A poll that finds the job planning: 202, `X-Progress`, `Retry-After`, an information outcome.
async fn poll_planning(server: &Server, client: &Client, status_path: &str) -> String {
    let reply = server.send(get(status_path).by(client).header("accept", "application/json")).await;
    assert_status(&reply, 202);
    assert_eq!(reply.header("retry-after"), "1");
    assert_eq!(reply.json()["issue"][0]["severity"], "information");
    let progress = reply.header("x-progress").to_owned();
    assert!(progress.len() < 100, "{progress}");
    progress
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn async_kick_off_polls_to_the_synchronous_manifest() {
    let server = Server::start();
    let (client, group) = populated(&server, "acme").await;
    let path = format!("/bulk-data/r4/Group/{group}/$export?_type=Patient,Observation");

    let sync = server.send(get(&path).by(&client)).await;
    assert_status(&sync, 200);
    let sync_manifest = sync.json();
    assert_eq!(sync_manifest["output"].as_array().unwrap().len(), 2, "{sync_manifest}");

    let status = kick_off(&server, get(&path).by(&client).respond_async()).await;
    let (manifest, reply) = poll(&server, &client, &status).await;
    assert_eq!(
        redact_manifest(manifest.clone()),
        redact_manifest(sync_manifest.clone()),
        "the same manifest, URLs aside"
    );
    let ttl = expires_in(reply.header("expires"));
    assert!((24 * 3600 - 60..=24 * 3600).contains(&ttl), "Expires is the file URL expiry, not {ttl}s away");
    assert_eq!(exported(&server, &client, &manifest).await, exported(&server, &client, &sync_manifest).await);

    // Polling again gives the same manifest; so does the `/r4` spelling of the status URL.
    assert_eq!(poll(&server, &client, &status).await.0, manifest);
    let short = status.replace("/bulk-data/r4/", "/r4/");
    assert_eq!(poll(&server, &client, &short).await.0, manifest);

    // `/r4/Group/{id}/$export` kicks off the same way, and the manifest names that request.
    let r4_path = format!("/r4/Group/{group}/$export?_type=Patient,Observation");
    let status = kick_off(&server, get(&r4_path).by(&client).respond_async()).await;
    let (manifest, _) = poll(&server, &client, &status).await;
    let mut expected = redact_manifest(sync_manifest);
    expected["request"] = json!(format!("{BASE}{r4_path}"));
    assert_eq!(redact_manifest(manifest), expected);
}

#[tokio::test]
async fn content_location_is_absolute_without_a_configured_base() {
    let server = Server::with_config(HttpConfig::default());
    let (client, group) = populated(&server, "acme").await;
    let reply = server
        .send(
            get(&format!("/r4/Group/{group}/$export")).by(&client).respond_async().header("host", "fhir.example:8443"),
        )
        .await;
    assert_status(&reply, 202);
    let location = reply.header("content-location");
    assert!(location.starts_with("http://fhir.example:8443/bulk-data/r4/$export-status/"), "{location}");
}

#[tokio::test]
async fn delete_removes_the_job() {
    let server = Server::start();
    let (client, group) = populated(&server, "acme").await;
    let status =
        kick_off(&server, get(&format!("/bulk-data/r4/Group/{group}/$export")).by(&client).respond_async()).await;
    poll(&server, &client, &status).await;

    let reply = server.send(delete(&status).by(&client).header("accept", "application/json")).await;
    assert_status(&reply, 202);
    let reply = server.send(get(&status).by(&client).header("accept", "application/json")).await;
    assert_error(&reply, 404, "not-found");
    assert_error(&server.send(delete(&status).by(&client)).await, 404, "not-found");

    // Kick-off and DELETE back to back (as Inferno does for each `_outputFormat`).
    for format in ["application/fhir%2Bndjson", "application/ndjson", "ndjson"] {
        let path = format!("/bulk-data/r4/Group/{group}/$export?_outputFormat={format}");
        let status = kick_off(&server, get(&path).by(&client).respond_async()).await;
        assert_status(&server.send(delete(&status).by(&client)).await, 202);
    }
    assert_eq!(drain_jobs(&server), 0, "every deleted job is gone from the store");
}

#[tokio::test]
async fn jobs_are_seen_only_by_their_tenant_client_and_user() {
    let server = Server::start();
    let (client, group) = populated(&server, "acme").await;
    let acme = server.store.tenant_by_name("acme").unwrap().unwrap().id;
    let colleague = server.client(acme);
    let (outsider, _) = populated(&server, "globex").await;

    let status =
        kick_off(&server, get(&format!("/bulk-data/r4/Group/{group}/$export")).by(&client).respond_async()).await;
    let (manifest, _) = poll(&server, &client, &status).await;
    for who in [&outsider, &colleague] {
        assert_error(&server.send(get(&status).by(who)).await, 404, "not-found");
        assert_error(&server.send(delete(&status).by(who)).await, 404, "not-found");
    }
    let as_alice = server.send(get(&status).by(&client).header("x-oneup-user-id", "alice")).await;
    assert_error(&as_alice, 404, "not-found");
    assert_error(&server.send(get(&status)).await, 401, "login");
    assert_error(&server.send(delete(&status)).await, 401, "login");
    // `x-oneup-user-id: client` is the whole tenant, like no header.
    let as_tenant = server.send(get(&status).by(&client).header("x-oneup-user-id", "client")).await;
    assert_status(&as_tenant, 200);
    assert_eq!(as_tenant.json(), manifest, "the failed attempts changed nothing");

    // A job started for a user is that user's.
    let alice_patient = id_of(&server.create_as(&client, Some("alice"), patient("Alice")).await);
    let alice_group = id_of(&server.create_as(&client, Some("alice"), group_of(&[&alice_patient])).await);
    let path = format!("/bulk-data/r4/Group/{alice_group}/$export");
    let alice_status =
        kick_off(&server, get(&path).by(&client).respond_async().header("x-oneup-user-id", "alice")).await;
    assert_error(&server.send(get(&alice_status).by(&client)).await, 404, "not-found");
    assert_error(&server.send(get(&alice_status).by(&client).header("x-oneup-user-id", "bob")).await, 404, "not-found");
    let reply = server.send(get(&alice_status).by(&client).header("x-oneup-user-id", "alice")).await;
    assert_status(&reply, 200);
    assert_error(&server.send(delete(&alice_status).by(&client)).await, 404, "not-found");
    let reply = server.send(delete(&alice_status).by(&client).header("x-oneup-user-id", "alice")).await;
    assert_status(&reply, 202);

    let unknown = format!("/bulk-data/r4/$export-status/{}", uuid::Uuid::new_v4());
    assert_error(&server.send(get(&unknown).by(&client)).await, 404, "not-found");
    assert_error(&server.send(get("/bulk-data/r4/$export-status/not-a-uuid").by(&client)).await, 404, "not-found");
    assert_error(&server.send(delete(&unknown).by(&client)).await, 404, "not-found");
}

#[tokio::test]
async fn bad_kick_offs_with_respond_async_are_refused_without_a_job() {
    let server = Server::start();
    let (client, group) = populated(&server, "acme").await;
    let (outsider, _) = populated(&server, "globex").await;
    let cases = [
        ("_type=Practitioner", "not-supported"),
        ("_type=Nope", "value"),
        ("_since=yesterday", "value"),
        ("_outputFormat=text/csv", "not-supported"),
        ("foo=1", "invalid"),
    ];
    for base in ["/r4", "/bulk-data/r4"] {
        for (query, code) in cases {
            let reply =
                server.send(get(&format!("{base}/Group/{group}/$export?{query}")).by(&client).respond_async()).await;
            assert_error(&reply, 400, code);
        }
    }
    let reply = server.send(get("/bulk-data/r4/Group/no-such-group/$export").by(&client).respond_async()).await;
    assert_error(&reply, 404, "not-found");
    let reply = server.send(get(&format!("/bulk-data/r4/Group/{group}/$export")).by(&outsider).respond_async()).await;
    assert_error(&reply, 404, "not-found");
    let reply = server.send(get(&format!("/bulk-data/r4/Group/{group}/$export")).respond_async()).await;
    assert_error(&reply, 401, "login");
    let reply = server
        .send(
            get(&format!("/bulk-data/r4/Group/{group}/$export"))
                .by(&client)
                .header("prefer", "respond-async")
                .header("accept", "application/fhir+xml"),
        )
        .await;
    assert_status(&reply, 406);
    assert_eq!(drain_jobs(&server), 0, "no refused kick-off created a job");
}

#[tokio::test]
async fn lenient_handling_combines_with_respond_async() {
    let server = Server::start();
    let (client, group) = populated(&server, "acme").await;
    let path = format!("/bulk-data/r4/Group/{group}/$export?foo=1&_type=Patient");
    let sync = server.send(get(&path).by(&client).header("prefer", "handling=lenient")).await;
    assert_status(&sync, 200);
    let expected = redact_manifest(sync.json());
    assert_eq!(expected["error"].as_array().unwrap().len(), 1, "{expected}");

    let one_line = get(&path).by(&client).header("prefer", "respond-async, handling=lenient");
    let two_lines = get(&path).by(&client).header("prefer", "respond-async").header("prefer", "handling=lenient");
    let reversed = get(&path).by(&client).header("prefer", "handling=lenient,respond-async");
    for call in [one_line, two_lines, reversed] {
        let status = kick_off(&server, call).await;
        let (manifest, _) = poll(&server, &client, &status).await;
        assert_eq!(redact_manifest(manifest.clone()), expected);
        let reply = server.send(get(&local(manifest["error"][0]["url"].as_str().unwrap())).by(&client)).await;
        assert_status(&reply, 200);
        let outcome: Value = serde_json::from_str(reply.text().trim()).expect("one OperationOutcome line");
        assert_eq!(outcome["issue"][0]["severity"], "warning");
        assert!(outcome["issue"][0]["diagnostics"].as_str().unwrap().contains("'foo'"), "{outcome}");
    }

    // Strict (the default) refuses the same request, asynchronous or not.
    let reply = server.send(get(&path).by(&client).respond_async()).await;
    assert_error(&reply, 400, "invalid");
    let reply = server.send(get(&path).by(&client).header("prefer", "respond-async, handling=strict")).await;
    assert_error(&reply, 400, "invalid");
}

#[tokio::test]
async fn jobs_expire_with_their_file_urls() {
    // Self-authorising URLs: the job lives as long as they do.
    let config = HttpConfig {
        file_urls_require_credentials: false,
        self_authorising_url_ttl: Duration::from_secs(600),
        ..test_config()
    };
    let server = Server::with_config(config);
    let (client, group) = populated(&server, "acme").await;
    let status = kick_off(&server, get(&format!("/r4/Group/{group}/$export")).by(&client).respond_async()).await;
    let (manifest, reply) = poll(&server, &client, &status).await;
    assert_eq!(manifest["requiresAccessToken"], false);
    let ttl = expires_in(reply.header("expires"));
    assert!((540..=600).contains(&ttl), "Expires {ttl}s away");

    // URLs that expire at once: the job is a 404 from the start, and the next kick-off sweeps it.
    let config = HttpConfig { file_url_ttl: Duration::ZERO, ..test_config() };
    let server = Server::with_config(config);
    let (client, group) = populated(&server, "acme").await;
    let acme = server.store.tenant_by_name("acme").unwrap().unwrap().id;
    let path = format!("/r4/Group/{group}/$export");
    let status = kick_off(&server, get(&path).by(&client).respond_async()).await;
    let job_id = status.rsplit('/').next().unwrap().to_owned();
    assert!(server.store.export_job(acme, &job_id).unwrap().is_some(), "stored until swept");
    assert_error(&server.send(get(&status).by(&client)).await, 404, "not-found");
    assert_error(&server.send(delete(&status).by(&client)).await, 404, "not-found");
    kick_off(&server, get(&path).by(&client).respond_async()).await;
    assert!(server.store.export_job(acme, &job_id).unwrap().is_none(), "the next kick-off swept it");
}

#[tokio::test]
async fn without_respond_async_the_kick_off_stays_synchronous() {
    let server = Server::start();
    let (client, group) = populated(&server, "acme").await;
    for prefer in [None, Some("handling=lenient"), Some("return=minimal, respond-asyncx")] {
        let mut call = get(&format!("/bulk-data/r4/Group/{group}/$export")).by(&client);
        if let Some(prefer) = prefer {
            call = call.header("prefer", prefer);
        }
        let reply = server.send(call).await;
        assert_status(&reply, 200);
        assert_eq!(reply.header("content-type"), "application/json");
        assert!(reply.headers.get("content-location").is_none());
        // Patient, Observation and the Group itself.
        assert_eq!(reply.json()["output"].as_array().unwrap().len(), 3);
    }
    assert_eq!(drain_jobs(&server), 0, "the synchronous path creates no job");
}

#[tokio::test]
async fn the_202_comes_before_the_plan_and_the_plan_is_the_synchronous_one_at_the_kick_off() {
    let gate = Arc::new(Gate::default());
    let (server, planners) = gated_server(&gate);
    let (client, group) = populated(&server, "acme").await;
    let path = format!("/bulk-data/r4/Group/{group}/$export?_type=Patient,Observation,Group");
    let sync = server.send(get(&path).by(&client)).await;
    assert_status(&sync, 200);
    let sync_manifest = sync.json();
    let sync_lines = exported(&server, &client, &sync_manifest).await;

    // The planner is held at its counting step: the 202 cannot have waited for the plan.
    let status = kick_off(&server, get(&path).by(&client).respond_async()).await;
    gate.wait_for(counting).await;
    let progress = poll_planning(&server, &client, &status).await;
    assert_eq!(progress, "planning: counting resources of 2 types", "the Group line needs no counting");
    assert_eq!(poll_planning(&server, &client, &status).await, progress, "polls do not move the plan");

    // Writes after the kick-off are after its transaction time: the plan must not see them.
    let group_body = server.send(get(&format!("/r4/Group/{group}")).by(&client)).await.json();
    let member = group_body["member"][0]["entity"]["reference"].as_str().unwrap().trim_start_matches("Patient/");
    let late = server.create(&client, observation(member)).await;
    let newcomer = id_of(&server.create(&client, patient("Late")).await);
    let mut grown = group_body.clone();
    grown["member"].as_array_mut().unwrap().push(json!({"entity": {"reference": format!("Patient/{newcomer}")}}));
    assert_status(&server.send(put(&format!("/r4/Group/{group}")).by(&client).json(&grown)).await, 200);

    gate.open();
    let (manifest, _) = poll(&server, &client, &status).await;
    assert_eq!(redact_manifest(manifest.clone()), redact_manifest(sync_manifest.clone()));
    assert_eq!(exported(&server, &client, &manifest).await, sync_lines, "the same lines as the synchronous export");
    let transaction_time = parse_since(manifest["transactionTime"].as_str().unwrap()).unwrap();
    let sync_time = parse_since(sync_manifest["transactionTime"].as_str().unwrap()).unwrap();
    let late_time = parse_since(late["meta"]["lastUpdated"].as_str().unwrap()).unwrap();
    assert!(sync_time < transaction_time && transaction_time < late_time, "the kick-off's time, not the plan's");
    planners_done(&planners).await;
    assert!(gate.reached().contains(&PlanStep::Members), "the plan ran to its end");
}

#[tokio::test]
async fn delete_while_planning_cancels_the_plan() {
    let gate = Arc::new(Gate::default());
    let (server, planners) = gated_server(&gate);
    let (client, group) = populated(&server, "acme").await;
    let status =
        kick_off(&server, get(&format!("/bulk-data/r4/Group/{group}/$export")).by(&client).respond_async()).await;
    gate.wait_for(counting).await;
    poll_planning(&server, &client, &status).await;

    assert_status(&server.send(delete(&status).by(&client)).await, 202);
    assert_error(&server.send(get(&status).by(&client)).await, 404, "not-found");
    gate.open();
    planners_done(&planners).await;
    assert_error(&server.send(get(&status).by(&client)).await, 404, "not-found");
    assert_error(&server.send(delete(&status).by(&client)).await, 404, "not-found");
    assert!(!gate.reached().contains(&PlanStep::Members), "the planner stopped: {:?}", gate.reached());
    assert_eq!(drain_jobs(&server), 0, "the cancelled plan's result was discarded, not stored");
}

#[tokio::test]
async fn a_failure_during_planning_is_an_operation_outcome_at_the_status_url() {
    let planners = Planners::default().with_hook(|step| match step {
        PlanStep::Counting { .. } => Err(StoreError::Database("disk I/O error".into())),
        _ => Ok(()),
    });
    let server = Server::with_state(test_config(), move |state| state.planners = Arc::new(planners));
    let (client, group) = populated(&server, "acme").await;
    let status =
        kick_off(&server, get(&format!("/bulk-data/r4/Group/{group}/$export")).by(&client).respond_async()).await;
    let reply = server.send(get(&status).by(&client).header("accept", "application/json")).await;
    let outcome = assert_error(&reply, 500, "exception");
    let diagnostics = outcome["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(diagnostics.contains("kick the export off again"), "{diagnostics}");
    assert!(!diagnostics.contains("disk I/O"), "store details stay in the log: {diagnostics}");
    assert_eq!(server.send(get(&status).by(&client)).await.body, reply.body, "the failure is kept");
    assert_status(&server.send(delete(&status).by(&client)).await, 202);
    assert_error(&server.send(get(&status).by(&client)).await, 404, "not-found");
}

/// An instance whose worker stalls mid-job (frozen, or dead: the store cannot tell) stops
/// renewing its lease once it reported no progress for `STALL_LEASES` leases; once it lapses, another instance on the same store claims the job with
/// the next fencing token and finishes it, and the stalled worker, when it wakes up, finds its
/// lease gone and writes nothing.
#[tokio::test]
async fn a_job_whose_worker_stalls_past_its_lease_is_taken_over_by_another_instance() {
    let gate = Arc::new(Gate::default());
    let config = HttpConfig { export_lease: Duration::from_millis(600), ..test_config() };
    // Instance A runs one job at a time, and its worker stalls at the counting step.
    let hook_gate = gate.clone();
    let a_planners = Arc::new(Planners::default().with_slots(1).with_status_wait(Duration::from_millis(50)).with_hook(
        move |step| {
            hook_gate.hold(step, counting);
            Ok(())
        },
    ));
    let state_planners = a_planners.clone();
    let mut server = Server::with_state(config.clone(), move |state| state.planners = state_planners);
    let (client, group) = populated(&server, "acme").await;
    let path = format!("/bulk-data/r4/Group/{group}/$export?_type=Patient,Observation,Group");
    let sync_manifest = server.send(get(&path).by(&client)).await.json();
    let status = kick_off(&server, get(&path).by(&client).respond_async()).await;
    gate.wait_for(counting).await;
    assert_eq!(a_planners.running(), 1, "A holds the job");

    // Instance B on the same store, polled from now on.
    let b_planners = Arc::new(Planners::default());
    let mut b_state = AppState::new(server.store.clone(), config, token_keys());
    b_state.planners = b_planners.clone();
    let instance_a = std::mem::replace(&mut server.app, router(b_state));
    let deadline = Instant::now() + Duration::from_secs(30);
    let manifest = loop {
        let reply = server.send(get(&status).by(&client).header("accept", "application/json")).await;
        if reply.status == 200 {
            break reply.json();
        }
        assert_status(&reply, 202);
        assert!(Instant::now() < deadline, "no instance took the job over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(redact_manifest(manifest.clone()), redact_manifest(sync_manifest.clone()));
    assert_eq!(exported(&server, &client, &manifest).await, exported(&server, &client, &sync_manifest).await);
    let job_id = status.rsplit('/').next().unwrap();
    let tenant = server.store.tenant_by_name("acme").unwrap().unwrap().id;
    let activity = server.store.export_job_activity(tenant, job_id).unwrap().unwrap();
    assert_eq!(activity.fence, 2, "claimed twice");
    assert_eq!(activity.owner.as_deref(), Some(b_planners.instance()), "by B the second time");

    // A wakes up: its next step finds the lease gone, so it stops and overwrites nothing.
    gate.open();
    planners_done(&a_planners).await;
    assert!(!gate.reached().contains(&PlanStep::Members), "A stopped at its next step: {:?}", gate.reached());
    server.app = instance_a;
    let again = server.send(get(&status).by(&client).header("accept", "application/json")).await;
    assert_status(&again, 200);
    assert_eq!(again.json(), manifest, "the job keeps B's manifest");
}

/// One step longer than the lease (a large cohort's plan on a loaded database) does not cost
/// the job its lease: the holder's heartbeat renews it while the step runs, so the job finishes
/// under its first claim instead of being taken over again and again.
#[tokio::test]
async fn a_step_longer_than_the_lease_keeps_the_lease() {
    let config = HttpConfig { export_lease: Duration::from_millis(600), ..test_config() };
    let slept = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hook_slept = slept.clone();
    let planners = Arc::new(Planners::default().with_status_wait(Duration::from_millis(50)).with_hook(move |step| {
        if counting(step) && !hook_slept.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(2_500));
        }
        Ok(())
    }));
    let state_planners = planners.clone();
    let server = Server::with_state(config, move |state| state.planners = state_planners);
    let (client, group) = populated(&server, "acme").await;
    let path = format!("/bulk-data/r4/Group/{group}/$export?_type=Patient,Observation,Group");
    let status = kick_off(&server, get(&path).by(&client).respond_async()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = server.send(get(&status).by(&client).header("accept", "application/json")).await;
        if reply.status == 200 {
            break;
        }
        assert_status(&reply, 202);
        assert!(Instant::now() < deadline, "the job did not complete");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(slept.load(std::sync::atomic::Ordering::SeqCst), "the long step ran");
    let job_id = status.rsplit('/').next().unwrap();
    let tenant = server.store.tenant_by_name("acme").unwrap().unwrap().id;
    let activity = server.store.export_job_activity(tenant, job_id).unwrap().unwrap();
    assert_eq!(activity.fence, 1, "claimed once: the lease held through the long step");
}

#[tokio::test]
async fn kick_offs_beyond_the_planning_pool_queue_and_a_synchronous_one_gets_429() {
    let gate = Arc::new(Gate::default());
    let hook_gate = gate.clone();
    let planners = Arc::new(Planners::default().with_status_wait(Duration::from_millis(50)).with_hook(move |step| {
        hook_gate.hold(step, counting);
        Ok(())
    }));
    let state_planners = planners.clone();
    let config = HttpConfig { max_concurrent_plans: 1, plan_queue_wait: Duration::ZERO, ..test_config() };
    let server = Server::with_state(config, move |state| state.planners = state_planners);
    let (client, group) = populated(&server, "acme").await;
    let path = format!("/bulk-data/r4/Group/{group}/$export?_type=Patient,Observation");

    // The first job takes the only planner and is held at its counting step.
    let first = kick_off(&server, get(&path).by(&client).respond_async()).await;
    gate.wait_for(counting).await;
    // A second job is accepted at once, but it waits for the pool: its plan has not started.
    let second = kick_off(&server, get(&path).by(&client).respond_async()).await;
    poll_planning(&server, &client, &second).await;
    let started = |gate: &Gate| gate.reached().into_iter().filter(|step| *step == PlanStep::Membership).count();
    assert_eq!(started(&gate), 1, "one plan at a time: {:?}", gate.reached());
    // A synchronous kick-off finds no planner free and may not wait for one.
    let refused = server.send(get(&path).by(&client)).await;
    let outcome = assert_outcome(&refused, 429, "throttled", None);
    assert!(outcome["issue"][0]["diagnostics"].as_str().unwrap().contains("being planned"), "{outcome}");
    assert_eq!(refused.header("retry-after"), "2");
    assert_eq!(started(&gate), 1, "the refused kick-off planned nothing");

    // Once the first plan is made, the queued one runs; both jobs end with the same manifest.
    gate.open();
    let first_manifest = poll_until_done(&server, &client, &first).await;
    let second_manifest = poll_until_done(&server, &client, &second).await;
    planners_done(&planners).await;
    assert_eq!(started(&gate), 2);
    assert_eq!(redact_manifest(second_manifest), redact_manifest(first_manifest.clone()));
    // With the planner free, the synchronous kick-off is answered. The worker gives its place
    // back just after the job's manifest is stored, so a kick-off in that instant may still be
    // told to retry: it does, as a client would (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    let answered = loop {
        let reply = server.send(get(&path).by(&client)).await;
        if reply.status.as_u16() != 429 || Instant::now() >= deadline {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_status(&answered, 200);
    assert_eq!(redact_manifest(answered.json()), redact_manifest(first_manifest));
}

/// Polls a status URL until the job is done (bounded) and returns its manifest.
async fn poll_until_done(server: &Server, client: &Client, status_path: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = server.send(get(status_path).by(client).header("accept", "application/json")).await;
        if reply.status.as_u16() == 200 {
            return reply.json();
        }
        assert_status(&reply, 202);
        assert!(Instant::now() < deadline, "the job did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A store unavailable for a moment (PostgreSQL restarting, a connection cut) pauses a job
/// instead of failing it for good: the worker gives the job back, and the next claim runs it to
/// the manifest a synchronous export gives. Polls meanwhile see a job still in progress.
#[tokio::test]
async fn a_job_interrupted_by_an_unavailable_store_runs_again_instead_of_failing() {
    let counted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hook_counted = counted.clone();
    let planners = Planners::default().with_status_wait(Duration::from_millis(50)).with_hook(move |step| match step {
        PlanStep::Counting { .. } if hook_counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 => {
            Err(StoreError::Unavailable("connection refused".into()))
        }
        _ => Ok(()),
    });
    let server = Server::with_state(test_config(), move |state| state.planners = Arc::new(planners));
    let (client, group) = populated(&server, "acme").await;
    let path = format!("/bulk-data/r4/Group/{group}/$export");
    let status = kick_off(&server, get(&path).by(&client).respond_async()).await;
    let manifest = poll_until_done(&server, &client, &status).await;
    assert!(counted.load(std::sync::atomic::Ordering::SeqCst) >= 2, "the job was planned again");
    let sync_manifest = server.send(get(&path).by(&client)).await;
    assert_status(&sync_manifest, 200);
    assert_eq!(redact_manifest(manifest), redact_manifest(sync_manifest.json()));
}

/// A deploy restarts every instance, so a long job may be handed back many times: each stopping
/// instance gives its lease back ([`bulkhead_http::export_worker::drain`]) and the next one
/// resumes it at once. Those claims are not interruptions: a job that lives through more
/// graceful restarts than `MAX_CLAIMS` still completes, under the newest fencing token.
#[tokio::test]
async fn a_job_handed_back_by_more_stopping_instances_than_max_claims_still_completes() {
    use bulkhead_http::export_worker::{drain, wake, MAX_CLAIMS};
    // A long lease: only a hand-back makes the job due again within the test.
    let config = HttpConfig { export_lease: Duration::from_secs(600), ..test_config() };
    let gated = |gate: &Arc<Gate>| {
        let hook_gate = gate.clone();
        Arc::new(Planners::default().with_status_wait(Duration::from_millis(50)).with_hook(move |step| {
            hook_gate.hold(step, counting);
            Ok(())
        }))
    };
    let mut gate = Arc::new(Gate::default());
    let first_planners = gated(&gate);
    let mut instance = None;
    let mut server = Server::with_state(config.clone(), |state| {
        state.planners = first_planners;
        instance = Some(state.clone());
    });
    let mut instance = instance.expect("the first instance's state");
    let (client, group) = populated(&server, "acme").await;
    let path = format!("/bulk-data/r4/Group/{group}/$export?_type=Patient,Observation,Group");
    let sync_manifest = server.send(get(&path).by(&client)).await.json();
    let status = kick_off(&server, get(&path).by(&client).respond_async()).await;
    let job_id = status.rsplit('/').next().unwrap().to_owned();
    let tenant = server.store.tenant_by_name("acme").unwrap().unwrap().id;

    let restarts = MAX_CLAIMS + 1;
    for restart in 1..=restarts {
        // The instance holds the job mid-plan, then stops: the job goes back to the store.
        wake(&instance);
        gate.wait_for(counting).await;
        let stopping = instance.clone();
        let drained = tokio::spawn(async move { drain(&stopping, Duration::from_secs(30)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        gate.open();
        drained.await.expect("drain");
        assert_eq!(instance.planners.running(), 0, "restart {restart}: the job was handed back");
        let activity = server.store.export_job_activity(tenant, &job_id).unwrap().unwrap();
        assert_eq!(activity.fence, restart, "claimed once per instance");
        assert_eq!(activity.progress, "handed back by a stopping instance");

        // The next instance on the same store.
        gate = Arc::new(Gate::default());
        let planners = if restart < restarts { gated(&gate) } else { Arc::new(Planners::default()) };
        instance = AppState::new(server.store.clone(), config.clone(), token_keys());
        instance.planners = planners;
        server.app = router(instance.clone());
    }
    wake(&instance);
    let manifest = poll_until_done(&server, &client, &status).await;
    assert_eq!(redact_manifest(manifest.clone()), redact_manifest(sync_manifest.clone()));
    assert_eq!(exported(&server, &client, &manifest).await, exported(&server, &client, &sync_manifest).await);
    let activity = server.store.export_job_activity(tenant, &job_id).unwrap().unwrap();
    assert_eq!(activity.fence, restarts + 1, "the fencing token still counts every claim");
}
