//! The Bundles format: one transaction Bundle per patient plus a shared Bundle that sorts first,
//! local references as `urn:uuid:`, and exactly the same resources as the NDJSON format.

mod common;

use std::collections::{HashMap, HashSet};

use bulkhead_synth::{generate, OutputFormat, SynthOptions};
use common::for_each_reference;
use serde_json::Value;

const PATIENTS: u64 = 40;
const SEED: u64 = 31;

#[test]
fn bundles_are_transactions_whose_references_resolve() {
    let dir = tempfile::tempdir().unwrap();
    generate(&SynthOptions { patients: PATIENTS, seed: SEED, format: OutputFormat::Bundles }, dir.path()).unwrap();
    let files = common::read_dir_sorted(dir.path());
    assert_eq!(files.len() as u64, PATIENTS + 1);
    assert_eq!(files.keys().next().map(String::as_str), Some("0000-shared.json"), "shared Bundle must sort first");

    let shared: Value = serde_json::from_str(&files["0000-shared.json"]).unwrap();
    let shared_keys: HashSet<String> =
        shared["entry"].as_array().unwrap().iter().map(|e| e["request"]["url"].as_str().unwrap().to_string()).collect();
    for (name, text) in &files {
        let bundle: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(bundle["resourceType"], "Bundle");
        assert_eq!(bundle["type"], "transaction");
        let entries = bundle["entry"].as_array().unwrap();
        let mut full_urls = HashSet::new();
        let mut patients = 0;
        for e in entries {
            let r = &e["resource"];
            let (t, id) = (r["resourceType"].as_str().unwrap(), r["id"].as_str().unwrap());
            assert_eq!(e["fullUrl"].as_str().unwrap(), format!("urn:uuid:{id}"));
            assert_eq!(e["request"]["method"], "PUT");
            assert_eq!(e["request"]["url"].as_str().unwrap(), format!("{t}/{id}"));
            full_urls.insert(e["fullUrl"].as_str().unwrap().to_string());
            patients += (t == "Patient") as usize;
        }
        if name != "0000-shared.json" {
            assert_eq!(patients, 1, "{name} should hold exactly one Patient");
        }
        for e in entries {
            let mut path = e["resource"]["resourceType"].as_str().unwrap().to_string();
            for_each_reference(&e["resource"], &mut path, &mut |path, reference| {
                if reference.starts_with("urn:uuid:") {
                    assert!(full_urls.contains(reference), "{name}: {path}: {reference} not in the Bundle");
                } else {
                    // Only shared resources are referenced by Type/id, and they are in the shared Bundle.
                    assert!(shared_keys.contains(reference), "{name}: {path}: {reference} not a shared resource");
                }
            });
        }
    }
}

/// Rewrites `urn:uuid:<id>` references to `Type/<id>` using the Bundle's own entries.
fn resolve_urns(v: &mut Value, types: &HashMap<String, String>) {
    match v {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get_mut("reference") {
                if let Some(id) = r.strip_prefix("urn:uuid:") {
                    *r = format!("{}/{id}", types[id]);
                }
            }
            map.values_mut().for_each(|c| resolve_urns(c, types));
        }
        Value::Array(items) => items.iter_mut().for_each(|c| resolve_urns(c, types)),
        _ => {}
    }
}

#[test]
fn bundles_hold_the_same_resources_as_ndjson() {
    let ndjson = common::ndjson(PATIENTS, SEED);
    let dir = tempfile::tempdir().unwrap();
    let summary =
        generate(&SynthOptions { patients: PATIENTS, seed: SEED, format: OutputFormat::Bundles }, dir.path()).unwrap();
    assert_eq!(summary.resources, ndjson.summary.resources);
    let mut from_bundles: Vec<String> = Vec::new();
    for (_, text) in common::read_dir_sorted(dir.path()) {
        let bundle: Value = serde_json::from_str(&text).unwrap();
        let entries = bundle["entry"].as_array().unwrap();
        let types: HashMap<String, String> = entries
            .iter()
            .map(|e| {
                (
                    e["resource"]["id"].as_str().unwrap().to_string(),
                    e["resource"]["resourceType"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        for e in entries {
            let mut r = e["resource"].clone();
            resolve_urns(&mut r, &types);
            from_bundles.push(r.to_string());
        }
    }
    let mut from_ndjson: Vec<String> = ndjson.resources.iter().map(|(_, r)| r.to_string()).collect();
    from_bundles.sort();
    from_ndjson.sort();
    assert!(from_bundles == from_ndjson, "the two formats hold different resources");
}
