//! Two `bulkhead serve` processes on one store: SQLite in one shared data directory (WAL lets
//! several processes use one database; timestamps, the plan cache's watermarks, key files and
//! job leases all live in that directory, never in one process), and one bucket as the output
//! store when the S3 test server is there (`scripts/with-s3`). Exports kicked off on instance 1
//! are polled on instance 2; instance 1 is SIGKILLed in the middle of them; instance 2 takes
//! over every job it held once the lease lapses and finishes it, and every resource is
//! downloaded exactly once.
//!
//! With S3 the kill is certain to land mid-job (instance 1 is killed once a job has written
//! some of its files), and the test also checks that instance 2 resumed rather than redid the
//! recorded files. Without S3 a job is only planned, which takes milliseconds: the kill lands
//! right after the kick-offs, wherever the jobs are, and the test checks that every job still
//! completes exactly once.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const PATIENTS: usize = 30;
const OBSERVATIONS_PER_PATIENT: usize = 10;
const JOBS: usize = 3;
/// Small files, so a materialised job writes ~170 objects and takes seconds.
const PART_SIZE: usize = 2;
const OBJECT_EXTENSION: &str = "https://bulkhead.example/fhir/bulk-data/extension/output-object";

/// The S3 test server's endpoint, if `scripts/with-s3` started one (a failure under CI if not).
fn s3_endpoint() -> Option<String> {
    match std::env::var("BULKHEAD_TEST_S3_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => Some(endpoint),
        _ if std::env::var_os("CI").is_some() => {
            panic!("BULKHEAD_TEST_S3_ENDPOINT is unset in CI: run the tests through scripts/with-s3")
        }
        _ => {
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                b"\n*** two_instances: no S3 test server (scripts/with-s3): exports are not materialised, so \
                  the kill cannot be placed mid-job ***\n",
            );
            None
        }
    }
}

fn ndjson_data() -> String {
    let mut lines = Vec::new();
    for p in 0..PATIENTS {
        let patient_id = format!("p{p:03}");
        lines.push(patient(Some(&patient_id), "Twin").to_string());
        for o in 0..OBSERVATIONS_PER_PATIENT {
            lines.push(observation(Some(&format!("o{p:03}-{o:02}")), &patient_id, o as f64).to_string());
        }
    }
    lines.join("\n") + "\n"
}

/// Polls `status` on `api`'s instance until 200; returns the manifest.
async fn manifest(api: &Api, status: &str, deadline: Instant) -> Value {
    loop {
        let reply = api.get(status).await;
        match reply.status {
            200 => return reply.json(),
            202 => assert!(Instant::now() < deadline, "{status} still running at the deadline"),
            other => panic!("{status}: {other} {}", reply.text()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_instance_leaves_its_export_jobs_to_the_other() {
    let s3 = s3_endpoint();
    let shared = tempfile::tempdir().expect("temporary directory");
    let data_dir = shared.path().join("data");
    let mut toml = format!("export_lease_seconds = 2\nexport_part_size = {PART_SIZE}\n");
    if let Some(endpoint) = &s3 {
        let bucket = format!("bulkhead-{}", uuid_like());
        let created = reqwest::Client::new().put(format!("{endpoint}/{bucket}")).send().await.expect("create bucket");
        assert!(created.status().is_success(), "creating bucket {bucket}: {}", created.status());
        toml.push_str(&format!(
            "output_url = \"s3://{bucket}/exports\"\noutput_endpoint = \"{endpoint}\"\noutput_region = \"us-east-1\"\n\
             output_access_key_id = \"test\"\noutput_secret_access_key = \"test\"\noutput_allow_http = true\n"
        ));
    }
    let options =
        || Options { data_dir: Some(data_dir.clone()), config_toml: Some(toml.clone()), ..Options::default() };
    let mut one = Server::start_with(options()).await;
    one.create_tenant("acme");
    let api_one = one.create_client("acme");
    let data = shared.path().join("data.ndjson");
    std::fs::write(&data, ndjson_data()).expect("writing the data");
    one.cli(&["import", "--tenant", "acme", data.to_str().expect("UTF-8 path")]);
    let members: Vec<String> = (0..PATIENTS).map(|p| format!("p{p:03}")).collect();
    let member_refs: Vec<&str> = members.iter().map(String::as_str).collect();
    api_one.upsert(&group(Some("g1"), &member_refs)).await;

    let two = Server::start_with(options()).await;
    let api_two = Api { base: two.base.clone(), ..api_one.clone() };

    // Kick-offs on instance 1; their status URLs are read on instance 2.
    let mut statuses = Vec::new();
    for _ in 0..JOBS {
        let reply = api_one.get("/r4/Group/g1/$export").await;
        assert_eq!(reply.status, 202, "{}", reply.text());
        let location = reply.header("content-location").expect("Content-Location");
        let path = location.strip_prefix(&one.base).unwrap_or_else(|| panic!("{location} is not instance 1's"));
        statuses.push(path.to_owned());
    }
    if s3.is_some() {
        // Wait until instance 2 sees a job of instance 1 with files written but not all.
        let deadline = Instant::now() + Duration::from_secs(60);
        'watch: loop {
            let mut finished = 0;
            for status in &statuses {
                let reply = api_two.get(status).await;
                if reply.status == 200 {
                    finished += 1;
                    continue;
                }
                let progress = reply.header("x-progress").unwrap_or_default();
                let written = progress
                    .strip_prefix("writing output: ")
                    .and_then(|rest| rest.split(' ').next())
                    .and_then(|done| done.parse::<usize>().ok());
                if written.is_some_and(|done| done >= 2) {
                    break 'watch;
                }
            }
            assert!(finished < JOBS, "every job finished before instance 1 could be killed mid-job");
            assert!(Instant::now() < deadline, "no job reached its files on instance 1");
        }
    }
    one.sigkill();

    let deadline = Instant::now() + Duration::from_secs(120);
    let mut total_files = 0;
    for status in &statuses {
        let manifest = manifest(&api_two, status, deadline).await;
        let mut ids: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for item in manifest["output"].as_array().expect("output") {
            // URLs name the base the kick-off was sent to (behind a load balancer, every
            // instance's); here that is instance 1's port, so they are sent to instance 2's.
            let url = item["url"].as_str().expect("url");
            let path = url.strip_prefix(&one.base).unwrap_or_else(|| panic!("{url} is not under the kick-off's base"));
            let reply = api_two.get(path).await;
            assert_eq!(reply.status, 200, "{url}: {}", reply.text());
            if s3.is_some() {
                assert!(url.contains("/$export-object/"), "a materialised file: {url}");
                let size = item["extension"][OBJECT_EXTENSION]["size"].as_u64();
                assert_eq!(size, Some(reply.body.len() as u64), "{url}: the recorded size is the object's");
            }
            let text = reply.text();
            let lines: Vec<Value> = text.lines().map(|line| serde_json::from_str(line).expect("NDJSON")).collect();
            assert_eq!(lines.len() as u64, item["count"].as_u64().expect("count"), "{url}");
            for line in lines {
                let resource_type = line["resourceType"].as_str().expect("resourceType").to_owned();
                let id = line["id"].as_str().expect("id").to_owned();
                assert!(ids.entry(resource_type).or_default().insert(id.clone()), "{id} exported twice in {status}");
            }
            total_files += 1;
        }
        let count = |resource_type: &str| ids.get(resource_type).map_or(0, BTreeSet::len);
        assert_eq!(count("Patient"), PATIENTS, "{status}");
        assert_eq!(count("Observation"), PATIENTS * OBSERVATIONS_PER_PATIENT, "{status}");
        assert_eq!(count("Group"), 1, "{status}");
        assert_eq!(ids.len(), 3, "nothing else: {:?}", ids.keys());
    }
    assert!(total_files >= JOBS * 3);

    let log = two.log();
    if s3.is_some() {
        let took_over = log.lines().any(|line| line.contains("export job claimed") && !line.contains("fence=1"));
        assert!(took_over, "instance 2 took over a job of instance 1:\n{log}");
        assert!(
            log.contains("resuming export output: recorded files are kept"),
            "instance 2 resumed the files instance 1 had recorded:\n{log}"
        );
    } else if log.lines().any(|line| line.contains("export job claimed") && !line.contains("fence=1")) {
        eprintln!("two_instances: instance 2 took over a job instance 1 held");
    }
}

/// A unique enough bucket suffix (no uuid crate in this test target).
fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{nanos:x}-{}", std::process::id())
}
