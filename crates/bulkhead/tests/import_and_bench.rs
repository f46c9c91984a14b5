//! The data tools through the real binary: `bulkhead synth`, `bulkhead import` (including bad
//! lines), and a tiny `bulkhead bench` run so the benchmark cannot rot.

use std::path::Path;
use std::process::{Command, Output};

fn bulkhead(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bulkhead")).args(args).output().expect("run bulkhead")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn path(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

#[test]
fn synth_is_deterministic_and_imports_cleanly_and_idempotently() {
    let work = tempfile::tempdir().unwrap();
    let (first, second, data) = (work.path().join("a"), work.path().join("b"), work.path().join("data"));
    for out in [&first, &second] {
        let run = bulkhead(&["synth", "--patients", "12", "--seed", "7", "--out", path(out)]);
        assert!(run.status.success(), "{}", text(&run.stderr));
        assert!(text(&run.stdout).contains("total"), "synth prints per-type counts and a total");
    }
    let mut files: Vec<_> = std::fs::read_dir(&first).unwrap().map(|entry| entry.unwrap().file_name()).collect();
    files.sort();
    assert!(files.len() >= 15, "a realistic mix of types: {files:?}");
    for file in &files {
        assert_eq!(
            std::fs::read(first.join(file)).unwrap(),
            std::fs::read(second.join(file)).unwrap(),
            "{file:?} differs between runs"
        );
    }

    assert!(bulkhead(&["tenant", "create", "t", "--data-dir", path(&data)]).status.success());
    let import = bulkhead(&["import", "--tenant", "t", "--data-dir", path(&data), path(&first)]);
    assert!(import.status.success(), "{}", text(&import.stderr));
    let summary = text(&import.stdout);
    assert!(summary.contains(" 0 updated, 0 unchanged, 0 failed"), "{summary}");
    // The same files again: nothing changes, nothing fails.
    let again = bulkhead(&["import", "--tenant", "t", "--data-dir", path(&data), path(&first)]);
    let summary = text(&again.stdout);
    assert!(
        again.status.success() && summary.contains("0 created, 0 updated") && summary.contains(" 0 failed"),
        "{summary}"
    );
}

#[test]
fn import_reports_bad_lines_with_file_and_line_and_keeps_the_rest() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let file = work.path().join("mixed.ndjson");
    let lines = [
        r#"{"resourceType":"Patient","id":"p1"}"#,
        r#"{"resourceType":"Patient","id":"p2""#,
        r#"{"resourceType":"Nope","id":"x"}"#,
        r#"{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/"}}"#,
        r#"{"resourceType":"Observation","id":"o2","status":"final","code":{"text":"x"},"subject":{"reference":"urn:uuid:p1"}}"#,
        r#"{"resourceType":"Patient","id":"bad id"}"#,
    ];
    std::fs::write(&file, lines.join("\n")).unwrap();
    assert!(bulkhead(&["tenant", "create", "t", "--data-dir", path(&data)]).status.success());
    let import = bulkhead(&["import", "--tenant", "t", "--data-dir", path(&data), path(&file)]);
    assert!(!import.status.success(), "a partial import exits non-zero");
    let errors = text(&import.stderr);
    let name = path(&file);
    for line in [2, 3, 4, 6] {
        assert!(errors.contains(&format!("{name}:{line}:")), "line {line} reported: {errors}");
    }
    assert!(!errors.contains(&format!("{name}:1:")) && !errors.contains(&format!("{name}:5:")), "{errors}");
    // The summary says what was stored, not "imported 6 resources … 4 failed".
    let summary = text(&import.stdout);
    assert!(summary.contains("imported 2 of 6 resources"), "{summary}");
    assert!(summary.contains("2 created") && summary.contains("4 failed (not stored)"), "{summary}");
}

/// Structurally invalid R4 is refused line by line, naming file, line and element; with
/// `BULKHEAD_VALIDATION=off` the same file is stored as it is.
#[test]
fn import_validates_r4_unless_validation_is_off() {
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("Patient.ndjson");
    let lines = [
        r#"{"resourceType":"Patient","id":"good","gender":"female"}"#,
        r#"{"resourceType":"Patient","id":"bad","gender":"banana","birthDate":"not-a-date","foo":1}"#,
        r#"{"resourceType":"Observation","id":"o1","status":"bogus"}"#,
    ];
    std::fs::write(&file, lines.join("\n")).unwrap();
    let name = path(&file);

    let strict = work.path().join("strict");
    assert!(bulkhead(&["tenant", "create", "t", "--data-dir", path(&strict)]).status.success());
    let import = bulkhead(&["import", "--tenant", "t", "--data-dir", path(&strict), name]);
    assert!(!import.status.success(), "a partial import exits non-zero");
    let errors = text(&import.stderr);
    for expected in [
        format!("{name}:2: Patient.gender: 'banana'"),
        "; Patient.birthDate: 'not-a-date' is not a date".to_owned(),
        "; Patient.foo: unknown element 'foo'".to_owned(),
        format!("{name}:3: Observation.status: 'bogus'"),
        "; Observation.code: Observation requires 'code' (min 1)".to_owned(),
    ] {
        assert!(errors.contains(&expected), "{expected:?} in {errors}");
    }
    assert!(text(&import.stdout).contains("1 created") && text(&import.stdout).contains("2 failed"));

    let off = work.path().join("off");
    assert!(bulkhead(&["tenant", "create", "t", "--data-dir", path(&off)]).status.success());
    let import = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["import", "--tenant", "t", "--data-dir", path(&off), name])
        .env("BULKHEAD_VALIDATION", "off")
        .output()
        .expect("run bulkhead");
    assert!(import.status.success(), "{}", text(&import.stderr));
    assert!(text(&import.stdout).contains("3 created"), "{}", text(&import.stdout));
}

#[test]
fn a_tiny_benchmark_runs_end_to_end() {
    let work = tempfile::tempdir().unwrap();
    let json = work.path().join("bench.json");
    let run = bulkhead(&[
        "bench",
        "--patients",
        "6",
        "--groups",
        "2,6",
        "--work-dir",
        path(work.path()),
        "--manifest-runs",
        "2",
        "--since-writes",
        "3",
        "--upload-resources",
        "50",
        "--concurrent-exports",
        "3",
        "--concurrent-members",
        "6",
        "--mixed",
        "2,1,2",
        "--mixed-seconds",
        "1",
        "--creates",
        "5",
        "--bundles",
        "1",
        "--bundle-entries",
        "5",
        "--json",
        path(&json),
    ]);
    let stdout = text(&run.stdout);
    assert!(run.status.success(), "{stdout}\n{}", text(&run.stderr));
    assert!(stdout.contains("against the targets"), "the table says met or missed: {stdout}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let cores = report["machine"]["cores"].as_f64().unwrap();
    assert!(cores >= 1.0);
    let dataset = &report["datasets"][0];
    assert_eq!(dataset["patients"], 6);
    let resources = dataset["resources"].as_u64().unwrap();
    assert!(resources > 6);
    // The import: every line created, its own peak RSS read from the child process.
    assert_eq!(dataset["import_counts"]["created"].as_u64(), Some(resources));
    assert_eq!(dataset["import_counts"]["failed"], 0);
    assert!(dataset["import_peak_rss_bytes"].as_u64().unwrap() > 1_000_000, "import RSS from wait4");
    let cpu_share = |value: &serde_json::Value| {
        let share = value["client_cpu_share"].as_f64().unwrap();
        assert!(share > 0.0 && share <= cores + 0.5, "the client's CPU share is a share: {share}");
    };

    let groups = dataset["groups"].as_array().unwrap();
    assert_eq!(groups.iter().map(|g| g["members"].as_u64().unwrap()).collect::<Vec<_>>(), vec![2, 6]);
    for group in groups {
        let (kick_off, complete) =
            (group["async_kick_off_p50_ms"].as_f64().unwrap(), group["async_complete_p50_ms"].as_f64().unwrap());
        assert!(kick_off > 0.0 && complete >= kick_off, "202 first, then the status's 200: {group}");
        assert!(group["manifest_first_ms"].as_f64().unwrap() > 0.0, "{group}");
        let exports = group["exports"].as_array().unwrap();
        let encodings: Vec<&str> = exports.iter().map(|e| e["encoding"].as_str().unwrap()).collect();
        assert!(encodings.starts_with(&["none", "gzip"]), "{encodings:?}");
        assert!(encodings.len() == 2 || encodings[2] == "zstd", "zstd only when offered: {encodings:?}");
        for export in exports {
            assert_eq!(export["resources"], exports[0]["resources"], "every encoding exports the same resources");
            assert!(
                export["resources"].as_u64().unwrap() > 0 && export["resources_per_second"].as_f64().unwrap() > 0.0
            );
            assert!(
                export["server_peak_rss_bytes"].as_u64().unwrap() > 1_000_000,
                "peak RSS is read from the server process"
            );
            cpu_share(export);
            assert!(
                export["server_cpu_seconds"].as_f64().is_some_and(|cpu| cpu >= 0.0),
                "the server's CPU time is read from /proc: {export}"
            );
        }
    }
    let largest_export = groups[1]["exports"][0]["resources"].as_u64().unwrap();

    // `_since` after 3 writes to members lists exactly those 3.
    let since = &dataset["since"];
    assert_eq!((since["members"].as_u64(), since["writes"].as_u64()), (Some(6), Some(3)));
    assert_eq!(since["resources"], 3, "{since}");
    assert!(since["manifest_p50_ms"].as_f64().unwrap() > 0.0);
    assert!(since["manifest_first_ms"].as_f64().unwrap() > 0.0, "the first (uncached) manifest is reported too");

    // The system-level export: every resource of the tenant (the import, the 3 `_since` writes
    // and the Groups bench-2, bench-6 and bench-all-6), beside a Group of every patient.
    let system = &dataset["system_export"];
    assert_eq!(system["resources"].as_u64(), Some(resources + 3 + 3), "{system}");
    assert_eq!(system["group_members"], 6);
    let group_all = system["group_before_resources_per_second"].as_f64().unwrap();
    assert!(group_all > 0.0 && system["ratio_to_group"].as_f64().unwrap() > 0.0, "{system}");
    assert!(system["server_peak_rss_bytes"].as_u64().unwrap() > 1_000_000);

    // $upload-ndjson: the first 50 lines, each a create in the upload's own tenant.
    let upload = &dataset["upload"];
    assert_eq!((upload["sent"].as_u64(), upload["counts"]["created"].as_u64()), (Some(50), Some(50)), "{upload}");
    assert!(upload["resources_per_second"].as_f64().unwrap() > 0.0);
    assert!(upload["server_peak_rss_bytes"].as_u64().unwrap() > 1_000_000);
    cpu_share(upload);

    // 3 concurrent exports of the 6-member Group, which now also holds the 3 `_since` writes.
    let concurrent = &dataset["concurrent_exports"];
    assert_eq!((concurrent["exports"].as_u64(), concurrent["members"].as_u64()), (Some(3), Some(6)));
    assert_eq!(concurrent["resources"].as_u64(), Some(3 * (largest_export + 3)), "{concurrent}");
    assert!(concurrent["server_peak_rss_bytes"].as_u64().unwrap() > 1_000_000);
    cpu_share(concurrent);

    let mixed = &dataset["mixed_load"];
    assert_eq!(
        (mixed["writers"].as_u64(), mixed["exporters"].as_u64(), mixed["readers"].as_u64()),
        (Some(2), Some(1), Some(2))
    );
    for class in ["writes", "exports", "reads"] {
        assert!(mixed[class].as_u64().unwrap() > 0, "every class did work: {mixed}");
        assert_eq!(mixed[format!("{class}_failed")], 0, "{mixed}");
        assert!(mixed[format!("{class}_per_second")].as_f64().unwrap() > 0.0);
    }
    assert!(mixed["seconds"].as_f64().unwrap() >= 1.0, "runs for the fixed duration");
    assert!(mixed["server_peak_rss_bytes"].as_u64().unwrap() > 1_000_000);
    cpu_share(mixed);
    assert!(dataset["writes"]["single_creates_per_second"].as_f64().unwrap() > 0.0);

    // Every row of issue 10's table is there, each with its target and a verdict.
    let targets = dataset["targets"].as_array().unwrap();
    for row in [
        "synchronous manifest p50, 6-member Group",
        "manifest growth p50(6)/p50(2)",
        "async kick-off (202) p50",
        "async: status 200 p50, 6-member Group",
        "_since manifest p50, 6 members, 3 writes",
        "CLI import",
        "CLI import peak RSS",
        "POST /r4/$upload-ndjson",
        "server peak RSS during $upload-ndjson",
        "export NDJSON, 6-member Group",
        "export gzip, 6-member Group",
        "export zstd, 6-member Group",
        "server peak RSS, one ",
        "server peak RSS, 3 concurrent exports of 6 members",
        "server peak RSS, mixed load 2/1/2",
    ] {
        let found = targets.iter().find(|t| t["what"].as_str().unwrap().starts_with(row));
        let found = found.unwrap_or_else(|| panic!("no target row '{row}' in {targets:?}"));
        assert!(found["met"].is_boolean() || found["target"] == "-", "{found}");
    }
}

/// `--database-url`: the same tiny run on PostgreSQL (a database of the bench's own on the test
/// cluster, no SQLite file), served by two instances
/// whose peak RSS is reported one by one; with the S3 test server (`scripts/with-s3`) also
/// `--output-url`, whose materialised asynchronous export downloads every resource the streamed
/// one does. A second run reuses the import. Needs `scripts/with-postgres`; skipped loudly
/// without it (a failure under CI).
#[test]
fn a_tiny_benchmark_runs_on_postgres_with_two_instances() {
    let Some(server_url) = bulkhead_store::postgres::testing::cluster_url() else { return };
    let s3 = match std::env::var("BULKHEAD_TEST_S3_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => Some(endpoint),
        _ => {
            eprintln!("\n*** bench on PostgreSQL: no S3 test server (scripts/with-s3): --output-url is SKIPPED ***\n");
            None
        }
    };
    // Seven patients: the database `bulkhead_bench_7` is this test's alone on the cluster.
    let database = "bulkhead_bench_7";
    let work = tempfile::tempdir().unwrap();
    let json = work.path().join("bench.json");
    let mut args: Vec<String> = [
        "bench",
        "--patients",
        "7",
        "--groups",
        "3,7",
        "--work-dir",
        path(work.path()),
        "--manifest-runs",
        "2",
        "--since-writes",
        "2",
        "--upload-resources",
        "20",
        "--concurrent-exports",
        "2",
        "--concurrent-members",
        "7",
        "--mixed-seconds",
        "0",
        "--creates",
        "4",
        "--bundles",
        "1",
        "--bundle-entries",
        "3",
        "--closure-runs",
        "1",
        "--instances",
        "2",
        "--database-url",
        &server_url,
        "--json",
        path(&json),
    ]
    .map(str::to_owned)
    .to_vec();
    let mut command = Command::new(env!("CARGO_BIN_EXE_bulkhead"));
    if let Some(endpoint) = &s3 {
        let bucket = format!("bench-{}", std::process::id());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let created = runtime.block_on(reqwest::Client::new().put(format!("{endpoint}/{bucket}")).send()).unwrap();
        assert!(created.status().is_success(), "creating the bucket: {}", created.status());
        args.extend([
            "--output-url".to_owned(),
            format!("s3://{bucket}/bench"),
            "--async-runs".to_owned(),
            "1".to_owned(),
        ]);
        command.env("AWS_ENDPOINT_URL", endpoint).env("AWS_ALLOW_HTTP", "true");
    }
    let run = command.args(&args).output().expect("run bulkhead bench");
    let stdout = text(&run.stdout);
    assert!(run.status.success(), "{stdout}\n{}", text(&run.stderr));
    assert!(
        stdout.contains("on PostgreSQL ") && stdout.contains(database),
        "the data set line says which store: {stdout}"
    );
    assert!(!work.path().join("pg-7/bulkhead.db").exists(), "no SQLite database beside PostgreSQL");

    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let dataset = &report["datasets"][0];
    assert!(dataset["store"].as_str().unwrap().starts_with("PostgreSQL "), "{}", dataset["store"]);
    assert_eq!(dataset["instances"], 2);
    let resources = dataset["resources"].as_u64().unwrap();
    assert_eq!(dataset["import_counts"]["created"].as_u64(), Some(resources));
    assert_eq!(dataset["import_counts"]["failed"], 0);
    assert!(!report["command"].as_str().unwrap().is_empty());

    // The import is in the bench's own database on the server.
    let stored: i64 = {
        let mut client = postgres::Client::connect(&with_path(&server_url, database), postgres::NoTls).unwrap();
        client
            .query_one(
                "SELECT count(*) FROM resources r JOIN tenants t ON t.id = r.tenant_id WHERE t.name = 'bench'",
                &[],
            )
            .unwrap()
            .get(0)
    };
    assert!(stored as u64 >= resources, "{stored} rows for {resources} imported resources");

    let two_peaks = |value: &serde_json::Value| {
        let peaks = value["server_peak_rss_bytes_per_instance"].as_array().unwrap_or_else(|| panic!("{value}"));
        assert_eq!(peaks.len(), 2, "one peak per instance: {value}");
        assert!(peaks.iter().all(|peak| peak.as_u64().unwrap() > 1_000_000), "{value}");
        let largest = peaks.iter().map(|peak| peak.as_u64().unwrap()).max();
        assert_eq!(value["server_peak_rss_bytes"].as_u64(), largest, "the target is held to the larger");
    };
    let groups = dataset["groups"].as_array().unwrap();
    assert_eq!(groups.iter().map(|g| g["members"].as_u64().unwrap()).collect::<Vec<_>>(), vec![3, 7]);
    for group in groups {
        let exports = group["exports"].as_array().unwrap();
        for export in exports {
            assert_eq!(export["resources"], exports[0]["resources"], "every encoding exports the same resources");
            two_peaks(export);
        }
        let materialised = &group["materialised_export"];
        if s3.is_some() {
            assert_eq!(materialised["resources"], exports[0]["resources"], "materialised as streamed: {group}");
            assert!(materialised["files"].as_u64().unwrap() > 0, "{group}");
            two_peaks(materialised);
        } else {
            assert!(materialised.is_null(), "no output store, no materialised export: {group}");
        }
    }
    assert_eq!(dataset["since"]["resources"], 2, "{}", dataset["since"]);
    assert_eq!(dataset["upload"]["counts"]["created"].as_u64(), Some(20));
    two_peaks(&dataset["upload"]);
    two_peaks(&dataset["concurrent_exports"]);
    two_peaks(&dataset["system_export"]);

    // Again with --reuse-import: the database is kept, its import figures repeated.
    let again = bulkhead(&[
        "bench",
        "--patients",
        "7",
        "--groups",
        "7",
        "--work-dir",
        path(work.path()),
        "--manifest-runs",
        "1",
        "--since-writes",
        "0",
        "--upload-resources",
        "0",
        "--concurrent-exports",
        "0",
        "--mixed-seconds",
        "0",
        "--creates",
        "0",
        "--bundles",
        "0",
        "--closure-runs",
        "0",
        "--skip-system-export",
        "--reuse-import",
        "--database-url",
        &server_url,
        "--json",
        path(&json),
    ]);
    assert!(again.status.success(), "{}\n{}", text(&again.stdout), text(&again.stderr));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let reused = &report["datasets"][0];
    assert_eq!(reused["import_counts"], dataset["import_counts"], "the recorded import");
    assert_eq!(reused["instances"], 1);
    let exported = |dataset: &serde_json::Value| {
        dataset["groups"][dataset["groups"].as_array().unwrap().len() - 1]["exports"][0]["resources"].as_u64().unwrap()
    };
    assert!(exported(reused) >= exported(dataset), "the same data, and the first run's writes");

    let mut admin = postgres::Client::connect(&server_url, postgres::NoTls).unwrap();
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)")).unwrap();
}

/// `url` with its path (the database) replaced by `name`.
fn with_path(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, String::new()), |(base, query)| (base, format!("?{query}")));
    let authority = base.find("://").map_or(0, |index| index + 3);
    let path = base[authority..].find('/').map_or(base.len(), |index| authority + index);
    format!("{}/{name}{query}", &base[..path])
}

/// `--shape synthea`: the vendored Synthea sample copied twice with fresh ids, shared
/// organisations and practitioners written once, imported without a refusal.
#[test]
fn a_synthea_shaped_benchmark_imports_the_scaled_sample() {
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthea-100");
    let (mut total, mut shared) = (0u64, 0u64);
    for entry in std::fs::read_dir(&sample).unwrap() {
        let file = entry.unwrap().path();
        let name = file.file_name().unwrap().to_str().unwrap().to_owned();
        let lines = std::io::BufRead::lines(std::io::BufReader::new(flate2::read::GzDecoder::new(
            std::fs::File::open(&file).unwrap(),
        )))
        .filter(|line| !line.as_ref().unwrap().trim().is_empty())
        .count() as u64;
        total += lines;
        if ["Organization.", "Practitioner.", "Location.", "Medication."].iter().any(|t| name.starts_with(t)) {
            shared += lines;
        }
    }
    assert_eq!(total, 38_483, "the sample as testdata/README.md describes it");
    let expected = 2 * total - shared;

    let work = tempfile::tempdir().unwrap();
    let json = work.path().join("bench.json");
    let run = bulkhead(&[
        "bench",
        "--shape",
        "synthea",
        "--scale",
        "2",
        "--synthea-sample",
        path(&sample),
        "--groups",
        "100,200",
        "--work-dir",
        path(work.path()),
        "--manifest-runs",
        "1",
        "--since-writes",
        "0",
        "--upload-resources",
        "0",
        "--concurrent-exports",
        "0",
        "--mixed-seconds",
        "0",
        "--creates",
        "0",
        "--bundles",
        "0",
        "--json",
        path(&json),
    ]);
    assert!(run.status.success(), "{}\n{}", text(&run.stdout), text(&run.stderr));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let dataset = &report["datasets"][0];
    assert_eq!(dataset["shape"], "Synthea-shaped (sample x2)");
    assert_eq!(dataset["patients"], 200);
    assert_eq!(dataset["resources"].as_u64(), Some(expected));
    assert_eq!(dataset["import_counts"]["created"].as_u64(), Some(expected), "fresh ids: nothing updated twice");
    assert_eq!(dataset["import_counts"]["failed"], 0);
    let groups = dataset["groups"].as_array().unwrap();
    assert_eq!(groups.iter().map(|g| g["members"].as_u64().unwrap()).collect::<Vec<_>>(), vec![100, 200]);
    let exported = |group: &serde_json::Value| group["exports"][0]["resources"].as_u64().unwrap();
    // Each copy's patients own their resources: twice the patients, about twice the resources.
    assert!(exported(&groups[1]) > exported(&groups[0]) && exported(&groups[1]) < expected);
}

/// `bulkhead import` reads lines as bytes and refuses what REST refuses, with the same words:
/// text that is not UTF-8 (never stored with replacement characters) and a numeric id (never
/// given a random id, so a second import cannot duplicate it). Numbers keep their digits.
#[test]
fn import_refuses_what_rest_refuses_and_keeps_numbers_exact() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let file = work.path().join("edge.ndjson");
    let mut body = Vec::new();
    body.extend_from_slice(b"{\"resourceType\":\"Patient\",\"id\":\"p1\",\"name\":[{\"text\":\"M\xfcller\"}]}\n");
    body.extend_from_slice(b"{\"resourceType\":\"Patient\",\"id\":12}\n");
    body.extend_from_slice(
        br#"{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"x"},"valueQuantity":{"value":1.50E2}}"#,
    );
    std::fs::write(&file, &body).unwrap();
    assert!(bulkhead(&["tenant", "create", "t", "--data-dir", path(&data)]).status.success());
    for run in 0..2 {
        let import = bulkhead(&["import", "--tenant", "t", "--data-dir", path(&data), path(&file)]);
        let (out, errors, name) = (text(&import.stdout), text(&import.stderr), path(&file));
        assert!(errors.contains(&format!("{name}:1:")) && errors.contains("not valid UTF-8"), "run {run}: {errors}");
        assert!(
            errors.contains(&format!("{name}:2:")) && errors.contains("id must be a string"),
            "run {run}: {errors}"
        );
        let expected = if run == 0 { "1 created" } else { "1 unchanged" };
        assert!(out.contains(expected) && out.contains("2 failed"), "run {run}: {out}");
    }
    let database = database_text(&data.join("bulkhead.db"));
    assert!(database.contains(r#""value":1.50E2"#), "the stored Observation keeps 1.50E2");
}

/// The database's bytes (file and WAL) as text, lossily: a small database keeps JSON bodies
/// inline, so a stored body's exact characters can be looked for without another SQLite client.
fn database_text(path: &Path) -> String {
    let mut text = String::from_utf8_lossy(&std::fs::read(path).unwrap()).into_owned();
    let wal = path.with_extension("db-wal");
    if let Ok(bytes) = std::fs::read(wal) {
        text.push_str(&String::from_utf8_lossy(&bytes));
    }
    text
}

/// What bounds `bulkhead import`'s memory, through the binary: a line longer than
/// `max_body_bytes` is refused with `$upload-ndjson`'s words and the next lines load; a Bundle
/// is read entry by entry, so one cut short keeps the entries before the break, reported with
/// its entries' locations.
#[test]
fn import_refuses_lines_over_the_body_limit_and_keeps_a_cut_bundles_entries() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let patient = |id: &str, name: usize| {
        format!(r#"{{"resourceType":"Patient","id":"{id}","name":[{{"text":"{}"}}]}}"#, "n".repeat(name))
    };
    let lines = work.path().join("long.ndjson");
    std::fs::write(&lines, [patient("a", 10), patient("b", 2_000), patient("c", 10)].join("\n")).unwrap();
    let bundle = work.path().join("cut.json");
    let entries = [
        format!(r#"{{"resource":{}}}"#, patient("d", 10)),
        r#"{"fullUrl":"http://example.org/fhir/Patient/x"}"#.to_owned(),
        format!(r#"{{"resource":{}}}"#, patient("e", 10)),
    ];
    let cut = format!(
        "{{\"resourceType\":\"Bundle\",\"type\":\"collection\",\"entry\":[\n{},\n{{\"resou",
        entries.join(",\n")
    );
    std::fs::write(&bundle, cut).unwrap();
    assert!(bulkhead(&["tenant", "create", "t", "--data-dir", path(&data)]).status.success());
    let import = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["import", "--tenant", "t", "--data-dir", path(&data), path(&lines), path(&bundle)])
        .env("BULKHEAD_MAX_BODY_BYTES", "1024")
        .output()
        .expect("run bulkhead");
    assert!(!import.status.success(), "a partial import exits non-zero");
    let (errors, out) = (text(&import.stderr), text(&import.stdout));
    let (lines, bundle) = (path(&lines), path(&bundle));
    for expected in [
        format!("{lines}:2: line 2 is longer than 1024 bytes"),
        format!("{bundle} entry[1]:2: Bundle entry has no resource"),
        format!("{bundle}:5: not valid JSON: EOF while parsing"),
    ] {
        assert!(errors.contains(&expected), "{expected:?} in {errors}");
    }
    assert!(out.contains("imported 4 of 7 resources") && out.contains("4 created"), "{out}");
}
