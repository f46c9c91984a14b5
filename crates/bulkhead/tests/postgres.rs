//! The real binary on PostgreSQL (`serve --database-url`), end to end: the operator's CLI
//! (`migrate`, `tenant create`, `client create`, `import`) on the same URL, writes over HTTP, a
//! synchronous and an asynchronous Group export, downloads; then a second server process on the
//! same database (nothing lives in the first one's data directory) answers for the same data.
//!
//! Needs `BULKHEAD_TEST_DATABASE_URL` (scripts/with-postgres); skipped loudly without it, a
//! failure under CI.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn serve_on_postgres_from_tenant_to_downloaded_group_export() {
    let Some(database) = bulkhead_store::postgres::testing::fresh_database() else { return };

    // `migrate` on an empty database applies every version; a second run has nothing to do.
    let latest = bulkhead_store::postgres::migrations::latest();
    let all: Vec<String> =
        bulkhead_store::postgres::migrations::MIGRATIONS.iter().map(|(version, _, _)| version.to_string()).collect();
    let migrate = |expected: &str| {
        let mut command = bulkhead();
        command.args(["migrate", "--database-url", &database.url]);
        let stdout = expect_success(&run_with_deadline(command, Duration::from_secs(30)), "bulkhead migrate");
        assert!(stdout.contains(expected), "migrate printed: {stdout}");
    };
    migrate(&format!("applied migration(s) {}; schema at version {latest}", all.join(", ")));
    migrate(&format!("schema up to date at version {latest}"));

    let options = || Options { database_url: Some(database.url.clone()), ..Default::default() };
    let mut server = Server::start_with(options()).await;
    server.create_tenant("acme");
    let api = server.create_client("acme");
    assert!(!server.data_dir.join("bulkhead.db").exists(), "no SQLite database next to PostgreSQL");

    for patient_id in ["p1", "p2", "p3"] {
        api.upsert(&patient(Some(patient_id), "Family")).await;
        api.upsert(&observation(Some(&format!("o-{patient_id}")), patient_id, 1.0)).await;
    }
    api.upsert(&group(Some("g1"), &["p1", "p2"])).await;

    // An NDJSON import through the CLI on the same URL.
    let ndjson = server.data_dir.join("more.ndjson");
    let lines: Vec<String> = (0..20)
        .map(|n| {
            observation(Some(&format!("imported-{n}")), if n % 2 == 0 { "p1" } else { "p3" }, n as f64).to_string()
        })
        .collect();
    std::fs::write(&ndjson, lines.join("\n") + "\n").unwrap();
    server.cli(&["import", "--tenant", "acme", ndjson.to_str().unwrap()]);

    let expected_observations: BTreeSet<String> = ["o-p1".to_owned(), "o-p2".to_owned()]
        .into_iter()
        .chain((0..20).step_by(2).map(|n| format!("imported-{n}")))
        .collect();
    let check = |files: &Files| {
        let ids = ids_by_type(files);
        assert_eq!(ids["Patient"], BTreeSet::from(["p1", "p2"].map(String::from)), "{ids:?}");
        assert_eq!(ids["Observation"], expected_observations, "members' observations, imported ones too");
        assert_eq!(ids["Group"], BTreeSet::from(["g1".to_owned()]));
    };

    // Synchronous (1upHealth) export: the manifest at once, files streamed from PostgreSQL.
    let manifest = api.get("/bulk-data/r4/Group/g1/$export").await.expect(200);
    check(&download_list(&api, &manifest, "output").await);

    // Asynchronous export: 202, poll, manifest, the same files.
    let kick_off =
        api.request(reqwest::Method::GET, "/bulk-data/r4/Group/g1/$export").header("prefer", "respond-async");
    let reply = Api::send(kick_off).await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let status_url = reply.header("content-location").expect("Content-Location");
    let manifest = poll_manifest(&api, &status_url).await;
    check(&download_list(&api, &manifest, "output").await);

    // A second instance on the same database, with a data directory of its own, serves the same
    // tenant, client and data (the first one stopped: it kept nothing the second needs but the
    // signing keys of its own URLs).
    server.terminate(Duration::from_secs(20));
    let second = Server::start_with(options()).await;
    let api = Api { base: second.base.clone(), ..api.clone() };
    assert_eq!(api.read("Observation/imported-4").await["subject"], json!({"reference": "Patient/p1"}));
    let manifest = api.get("/bulk-data/r4/Group/g1/$export").await.expect(200);
    check(&download_list(&api, &manifest, "output").await);
}

/// Polls a status URL until it answers 200; returns the manifest.
async fn poll_manifest(api: &Api, status_url: &str) -> Value {
    for _ in 0..600 {
        let reply = api.get(status_url).await;
        match reply.status {
            200 => return reply.json(),
            202 => tokio::time::sleep(Duration::from_millis(50)).await,
            status => panic!("status URL answered {status}: {}", reply.text()),
        }
    }
    panic!("the export did not complete within 30 s")
}
