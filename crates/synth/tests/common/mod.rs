//! Helpers shared by the integration tests: generate into a temp dir and load the result.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use bulkhead_synth::{generate, OutputFormat, SynthOptions, SynthSummary};
use serde_json::Value;

/// A generated NDJSON data set held in memory.
pub struct Dataset {
    pub dir: tempfile::TempDir,
    pub summary: SynthSummary,
    /// (file type name, resource) in file order, files in name order.
    pub resources: Vec<(String, Value)>,
}

pub fn ndjson(patients: u64, seed: u64) -> Dataset {
    let dir = tempfile::tempdir().expect("temp dir");
    let summary =
        generate(&SynthOptions { patients, seed, format: OutputFormat::Ndjson }, dir.path()).expect("generate");
    let resources = load_ndjson(dir.path());
    Dataset { dir, summary, resources }
}

/// Every `{Type}.ndjson` file in `dir`, parsed line by line (panics on a bad line).
pub fn load_ndjson(dir: &Path) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for (name, text) in read_dir_sorted(dir) {
        let file_type = name.strip_suffix(".ndjson").unwrap_or_else(|| panic!("unexpected file {name}"));
        assert!(text.ends_with('\n'), "{name} does not end with a newline");
        for (n, line) in text.lines().enumerate() {
            let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{name}:{} is not JSON: {e}", n + 1));
            out.push((file_type.to_string(), v));
        }
    }
    out
}

/// (file name, contents) for every file in `dir`, sorted by name.
pub fn read_dir_sorted(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| {
            let e = e.expect("dir entry");
            let name = e.file_name().into_string().expect("utf-8 name");
            let text = std::fs::read_to_string(e.path()).expect("read file");
            (name, text)
        })
        .collect()
}

/// FHIR R4 `id`: `[A-Za-z0-9\-\.]{1,64}`.
pub fn is_fhir_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Calls `f(path, reference_string)` for every `reference` in `v`; the path is dotted element
/// names from the resource root (`Encounter.participant.individual`), array indexes dropped.
pub fn for_each_reference(v: &Value, path: &mut String, f: &mut impl FnMut(&str, &str)) {
    match v {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("reference") {
                f(path, r);
            }
            for (k, child) in map {
                if k == "reference" {
                    continue;
                }
                let len = path.len();
                path.push('.');
                path.push_str(k);
                for_each_reference(child, path, f);
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            for item in items {
                for_each_reference(item, path, f);
            }
        }
        _ => {}
    }
}

/// The patient a resource belongs to (by its patient-pointing element), if any.
pub fn owning_patient(resource: &Value) -> Option<String> {
    let t = resource["resourceType"].as_str()?;
    if t == "Patient" {
        return Some(format!("Patient/{}", resource["id"].as_str()?));
    }
    for k in ["subject", "patient", "beneficiary"] {
        if let Some(r) = resource[k]["reference"].as_str() {
            return Some(r.to_string());
        }
    }
    if t == "Provenance" {
        return resource["target"][0]["reference"].as_str().map(str::to_string);
    }
    None
}

/// Resources per patient.
pub fn per_patient_counts(resources: &[(String, Value)]) -> HashMap<String, u64> {
    let mut counts = HashMap::new();
    for (_, r) in resources {
        if let Some(p) = owning_patient(r) {
            *counts.entry(p).or_insert(0) += 1;
        }
    }
    counts
}
