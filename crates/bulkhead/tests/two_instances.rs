//! Two `bulkhead serve` processes on one store, run on both backings: SQLite in one shared data
//! directory (WAL lets several processes use one database; timestamps, the plan cache's
//! watermarks, signing keys and job leases all live in that database, never in one process), and
//! PostgreSQL with a data directory per instance (nothing copied between them: the token signing
//! keys are in the database too). One bucket is the output store when the S3 test server is
//! there (`scripts/with-s3`). Exports kicked off on instance 1 are polled on instance 2;
//! instance 1 is SIGKILLed in the middle of them; instance 2 takes over every job it held once
//! the lease lapses and finishes it; a third instance started afterwards serves the downloads,
//! and every resource written is downloaded exactly once per job.
//!
//! The same on PostgreSQL with SIGTERM instead (a deploy or a scale-in): instance 1 stops
//! promptly, handing its jobs' leases back, and instance 2 finishes them long before the (long)
//! lease would have lapsed.
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
/// Small files, so a materialised job writes many objects and takes seconds.
const PART_SIZE: usize = 2;
/// The files of one job: Patients and Observations in parts of [`PART_SIZE`], and the Group.
const FILES_PER_JOB: usize =
    PATIENTS.div_ceil(PART_SIZE) + (PATIENTS * OBSERVATIONS_PER_PATIENT).div_ceil(PART_SIZE) + 1;
const OBJECT_EXTENSION: &str = "https://bulkhead.example/fhir/bulk-data/extension/output-object";

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

/// Where the instances keep their data.
enum Backing {
    /// One SQLite data directory shared by every instance.
    SharedSqlite(std::path::PathBuf),
    /// One PostgreSQL database (its URL); each instance has a data directory of its own, under
    /// the temporary directory.
    Postgres(String, tempfile::TempDir),
}

impl Backing {
    /// How to start an instance. On PostgreSQL each has a data directory of its own and nothing
    /// is copied between them: the token signing keys are in the database.
    fn options(&self, toml: &str) -> Options {
        let config_toml = Some(toml.to_owned());
        match self {
            Backing::SharedSqlite(data_dir) => {
                Options { data_dir: Some(data_dir.clone()), config_toml, ..Options::default() }
            }
            Backing::Postgres(url, root) => {
                let instance_dir = tempfile::tempdir_in(root.path()).expect("temporary directory");
                let data_dir = instance_dir.keep().join("data");
                Options { data_dir: Some(data_dir), database_url: Some(url.clone()), config_toml, ..Options::default() }
            }
        }
    }
}

/// How instance 1 stops.
#[derive(Clone, Copy, PartialEq)]
enum Stop {
    /// SIGKILL, as a crash would: its jobs wait for their (short) leases to lapse.
    Kill,
    /// SIGTERM, as a deploy would: it hands its jobs' (long) leases back as it stops.
    Terminate,
}

impl Stop {
    /// The jobs' lease: short for a kill (the test waits it out), far longer than the test for a
    /// clean stop (only a lease handed back lets instance 2 finish in time).
    fn lease_seconds(self) -> u64 {
        match self {
            Stop::Kill => 2,
            Stop::Terminate => 600,
        }
    }

    /// How long instance 2 may take to finish every job once instance 1 is gone.
    fn finish_within(self) -> Duration {
        match self {
            Stop::Kill => Duration::from_secs(120),
            Stop::Terminate => Duration::from_secs(self.lease_seconds() / 5),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_instance_leaves_its_export_jobs_to_the_other() {
    let shared = tempfile::tempdir().expect("temporary directory");
    scenario(Backing::SharedSqlite(shared.path().join("data")), Stop::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_sigkilled_instance_leaves_its_export_jobs_to_the_other() {
    let Some(database) = bulkhead_store::postgres::testing::fresh_database() else { return };
    let root = tempfile::tempdir().expect("temporary directory");
    scenario(Backing::Postgres(database.url.clone(), root), Stop::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_stopping_instance_hands_its_export_jobs_to_the_other() {
    let Some(database) = bulkhead_store::postgres::testing::fresh_database() else { return };
    let root = tempfile::tempdir().expect("temporary directory");
    scenario(Backing::Postgres(database.url.clone(), root), Stop::Terminate).await;
}

async fn scenario(backing: Backing, stop: Stop) {
    let s3 = s3_endpoint("two_instances", "exports are not materialised, so the stop cannot be placed mid-job");
    let mut toml = format!("export_lease_seconds = {}\nexport_part_size = {PART_SIZE}\n", stop.lease_seconds());
    let bucket = match &s3 {
        Some(endpoint) => Some(S3Bucket::create(endpoint).await),
        None => None,
    };
    if let Some(bucket) = &bucket {
        toml.push_str(&bucket.output_toml());
    }
    let mut one = Server::start_with(backing.options(&toml)).await;
    one.create_tenant("acme");
    let api_one = one.create_client("acme");
    let data = tempfile::Builder::new().suffix(".ndjson").tempfile().expect("temporary file");
    std::fs::write(data.path(), ndjson_data()).expect("writing the data");
    one.cli(&["import", "--tenant", "acme", data.path().to_str().expect("UTF-8 path")]);
    let members: Vec<String> = (0..PATIENTS).map(|p| format!("p{p:03}")).collect();
    let member_refs: Vec<&str> = members.iter().map(String::as_str).collect();
    api_one.upsert(&group(Some("g1"), &member_refs)).await;

    let two = Server::start_with(backing.options(&toml)).await;
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
    if let Some(bucket) = &bucket {
        // Stop instance 1 once its jobs have written a few files (so one has written two) and
        // under half of all of them (so one has files left): mid-job, whatever the machine's
        // speed. The bucket, not the status URLs: a poll waits a while for a running job.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let written = bucket.object_count().await;
            assert!(written < JOBS * FILES_PER_JOB / 2, "instance 1 wrote {written} files before it could be stopped");
            if written >= JOBS * 2 {
                break;
            }
            assert!(Instant::now() < deadline, "no job reached its files on instance 1");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    match stop {
        Stop::Kill => one.sigkill(),
        Stop::Terminate => {
            let stopping = Instant::now();
            let exit = tokio::task::block_in_place(|| one.terminate(Duration::from_secs(60)));
            assert!(exit.success(), "instance 1 stopped cleanly: {exit}\n{}", one.log());
            eprintln!("two_instances: instance 1 stopped {:?} after SIGTERM", stopping.elapsed());
        }
    }

    // Instance 2 finishes every job (after a clean stop, long before a lease could lapse).
    let deadline = Instant::now() + stop.finish_within();
    let mut manifests = Vec::new();
    for status in &statuses {
        manifests.push(manifest(&api_two, status, deadline).await);
    }
    // A third instance, started once they are done, serves the downloads.
    let three = Server::start_with(backing.options(&toml)).await;
    let api_three = Api { base: three.base.clone(), ..api_one.clone() };
    let mut total_files = 0;
    for (status, manifest) in statuses.iter().zip(manifests) {
        let mut ids: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for item in manifest["output"].as_array().expect("output") {
            // URLs name the base the kick-off was sent to (behind a load balancer, every
            // instance's); here that is instance 1's port, so they are sent to instance 3's.
            let url = item["url"].as_str().expect("url");
            let path = url.strip_prefix(&one.base).unwrap_or_else(|| panic!("{url} is not under the kick-off's base"));
            let reply = api_three.get(path).await;
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
        assert_eq!(ids, written_ids(), "{status}: every resource written, each once, nothing else");
    }
    assert!(total_files >= JOBS * 3);

    let log = two.log();
    if s3.is_some() && stop == Stop::Terminate {
        let log = one.log();
        assert!(
            log.contains("export job handed back: this instance is stopping"),
            "instance 1 handed a job back:\n{log}"
        );
    }
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

/// The ids of what [`ndjson_data`] writes (and the Group), by type.
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
