//! Same seed → same bytes; different seed → different data.

mod common;

use bulkhead_synth::{generate, OutputFormat, SynthOptions};
use common::read_dir_sorted;

fn run(seed: u64, format: OutputFormat) -> (tempfile::TempDir, std::collections::BTreeMap<String, String>) {
    let dir = tempfile::tempdir().expect("temp dir");
    generate(&SynthOptions { patients: 60, seed, format }, dir.path()).expect("generate");
    let files = read_dir_sorted(dir.path());
    (dir, files)
}

#[test]
fn same_seed_gives_identical_bytes_in_both_formats() {
    for format in [OutputFormat::Ndjson, OutputFormat::Bundles] {
        let (_a, first) = run(7, format);
        let (_b, second) = run(7, format);
        assert!(!first.is_empty());
        assert_eq!(first.keys().collect::<Vec<_>>(), second.keys().collect::<Vec<_>>(), "{format:?} file names");
        for (name, text) in &first {
            assert!(text == &second[name], "{format:?}: {name} differs between two runs with the same seed");
        }
    }
}

#[test]
fn different_seed_gives_different_data_and_ids() {
    let (_a, first) = run(7, OutputFormat::Ndjson);
    let (_b, second) = run(8, OutputFormat::Ndjson);
    assert_eq!(first.keys().collect::<Vec<_>>(), second.keys().collect::<Vec<_>>());
    for (name, text) in &first {
        assert_ne!(text, &second[name], "{name} is the same for seeds 7 and 8");
    }
    // Ids must not be shared between seeds either (two data sets may be loaded side by side).
    let ids = |files: &std::collections::BTreeMap<String, String>| -> std::collections::HashSet<String> {
        files["Patient.ndjson"]
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(ids(&first).is_disjoint(&ids(&second)));
}

#[test]
fn a_patient_does_not_depend_on_how_many_follow_it() {
    // Patient k is generated from its own stream, so growing the data set keeps earlier patients
    // (as long as the shared provider pool keeps its size: 5 providers up to 1,499 patients).
    let small = tempfile::tempdir().unwrap();
    let large = tempfile::tempdir().unwrap();
    let opts = |patients| SynthOptions { patients, seed: 3, format: OutputFormat::Bundles };
    generate(&opts(3), small.path()).unwrap();
    generate(&opts(10), large.path()).unwrap();
    let small = read_dir_sorted(small.path());
    let large = read_dir_sorted(large.path());
    for (name, text) in small.iter().filter(|(n, _)| n.starts_with("patient-")) {
        assert_eq!(Some(text), large.get(name), "{name} changed when more patients were generated");
    }
}
