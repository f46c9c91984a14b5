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
    assert!(
        text(&import.stdout).contains("2 created") && text(&import.stdout).contains("4 failed"),
        "{}",
        text(&import.stdout)
    );
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
        "--creates",
        "5",
        "--bundles",
        "1",
        "--bundle-entries",
        "5",
        "--json",
        path(&json),
    ]);
    assert!(run.status.success(), "{}\n{}", text(&run.stdout), text(&run.stderr));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let dataset = &report["datasets"][0];
    assert_eq!(dataset["patients"], 6);
    assert!(dataset["resources"].as_u64().unwrap() > 6);
    let groups = dataset["groups"].as_array().unwrap();
    assert_eq!(groups.iter().map(|g| g["members"].as_u64().unwrap()).collect::<Vec<_>>(), vec![2, 6]);
    for export in groups.iter().flat_map(|g| g["exports"].as_array().unwrap()) {
        assert!(export["resources"].as_u64().unwrap() > 0 && export["resources_per_second"].as_f64().unwrap() > 0.0);
        assert!(
            export["server_peak_rss_bytes"].as_u64().unwrap() > 1_000_000,
            "peak RSS is read from the server process"
        );
    }
    assert!(report["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(dataset["writes"]["single_creates_per_second"].as_f64().unwrap() > 0.0);
}
