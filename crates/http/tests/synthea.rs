//! Group export over the real Synthea data set (`testdata/synthea-100`: 100 patients, 19
//! types, 8 Groups whose members are `urn:uuid:<patient id>` references).
//!
//! The data is loaded through the NDJSON importer (which resolves `urn:uuid:` references to
//! `Type/id`), then each Group is exported through the router and every type's exported id set
//! is compared with an independent computation over the raw source files: references resolved
//! here, compartments from `bulkhead_fhir::compartment::patient_compartments`. Exported lines are
//! also compared, field by field, with the (resolved) source resource.
//!
//! Exports are self-contained (README "Associated data"): the Practitioners, Organizations and
//! other resources outside the Patient compartment that the members' data references come
//! along, computed here by an independent walk of the source; and every reference in an export
//! resolves within it, except those whose target is not in the data set at all.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::time::Instant;

use axum::http::StatusCode;
use bulkhead_fhir::compartment::{is_compartment_type, patient_compartments};
use bulkhead_http::ndjson_import::{Importer, Location};
use bulkhead_http::HttpConfig;
use serde_json::Value;

use common::{get, Server};

/// The 19 files of the data set.
const TYPES: [&str; 19] = [
    "AllergyIntolerance",
    "CarePlan",
    "CareTeam",
    "Claim",
    "Condition",
    "Device",
    "DiagnosticReport",
    "DocumentReference",
    "Encounter",
    "ExplanationOfBenefit",
    "Group",
    "ImagingStudy",
    "Immunization",
    "MedicationRequest",
    "Observation",
    "Organization",
    "Patient",
    "Practitioner",
    "Procedure",
];

/// Member counts from the data README.
const GROUP_SIZES: [(&str, usize); 8] = [
    ("BlueCrossBlueShield", 27),
    ("HealthNewEngland", 25),
    ("TuftsHealthPlan", 22),
    ("BMCHealthNet", 10),
    ("NeighborhoodHealthPlan", 7),
    ("FallonHealth", 3),
    ("HarvardPilgrimHealthCare", 3),
    ("MinutemanHealth", 3),
];

/// Resources in the data set (README).
const TOTAL: usize = 38_483;

fn data_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthea-100");
    assert!(
        dir.join("Patient.ndjson.gz").is_file(),
        "the Synthea data set is missing: expected {} (it is vendored in the repository under testdata/)",
        dir.display()
    );
    dir
}

/// Every line of the data set as (type, line number, text).
fn read_source() -> Vec<(&'static str, u64, String)> {
    let dir = data_dir();
    let mut lines = Vec::new();
    for resource_type in TYPES {
        let file = std::fs::File::open(dir.join(format!("{resource_type}.ndjson.gz"))).unwrap();
        let reader = BufReader::new(flate2::read::GzDecoder::new(file));
        for (index, line) in reader.lines().enumerate() {
            let line = line.unwrap();
            if !line.trim().is_empty() {
                lines.push((resource_type, index as u64 + 1, line));
            }
        }
    }
    lines
}

/// Resolves `urn:uuid:<id>` references to `Type/<id>` when a resource with that id is in the
/// data set (data README), independently of the importer.
fn resolve(value: &mut Value, types_by_id: &HashMap<String, &'static str>) {
    match value {
        Value::Object(object) => {
            for (key, child) in object.iter_mut() {
                match child {
                    Value::String(reference) if key == "reference" => {
                        let target = reference
                            .strip_prefix("urn:uuid:")
                            .and_then(|id| types_by_id.get(id).map(|t| format!("{t}/{id}")));
                        if let Some(target) = target {
                            *reference = target;
                        }
                    }
                    _ => resolve(child, types_by_id),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| resolve(item, types_by_id)),
        _ => {}
    }
}

/// The number literals of a JSON text, in order, exactly as written: a tokenizer of its own, so
/// the comparison does not go through the JSON library the server uses.
fn number_literals(text: &str) -> Vec<&str> {
    let bytes = text.as_bytes();
    let (mut numbers, mut index, mut in_string) = (Vec::new(), 0, false);
    while index < bytes.len() {
        let byte = bytes[index];
        if in_string {
            match byte {
                b'\\' => index += 1,
                b'"' => in_string = false,
                _ => {}
            }
            index += 1;
        } else if byte == b'"' {
            in_string = true;
            index += 1;
        } else if byte == b'-' || byte.is_ascii_digit() {
            let start = index;
            while index < bytes.len() && matches!(bytes[index], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
                index += 1;
            }
            numbers.push(&text[start..index]);
        } else {
            index += 1;
        }
    }
    numbers
}

/// The resource without the server's `meta.versionId`/`meta.lastUpdated`.
fn without_server_meta(mut resource: Value) -> Value {
    if let Some(meta) = resource.get_mut("meta").and_then(Value::as_object_mut) {
        meta.remove("versionId");
        meta.remove("lastUpdated");
        if meta.is_empty() {
            resource.as_object_mut().unwrap().remove("meta");
        }
    }
    resource
}

/// The top-level elements in which two resources differ (values shortened).
fn differences(got: &Value, expected: &Value) -> String {
    let short = |value: Option<&Value>| {
        let text = value.map_or("(absent)".to_owned(), Value::to_string);
        if text.len() > 200 {
            format!("{}…", &text[..text.char_indices().nth(200).map_or(text.len(), |(i, _)| i)])
        } else {
            text
        }
    };
    let keys: BTreeSet<&String> =
        got.as_object().into_iter().chain(expected.as_object()).flat_map(|o| o.keys()).collect();
    keys.into_iter()
        .filter(|key| got.get(key.as_str()) != expected.get(key.as_str()))
        .map(|key| {
            format!("{key}: exported {} / source {}", short(got.get(key.as_str())), short(expected.get(key.as_str())))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Every literal `Type/id` reference in a resource (resolved `urn:uuid:` ones included), by an
/// independent walk.
fn literal_references(value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(object) => {
            for (key, child) in object {
                match child {
                    Value::String(reference) if key == "reference" => {
                        let mut parts = reference.split('/');
                        if let (Some(t), Some(id), None) = (parts.next(), parts.next(), parts.next()) {
                            if t.chars().next().is_some_and(|c| c.is_ascii_uppercase()) {
                                out.push((t.to_owned(), id.to_owned()));
                            }
                        }
                    }
                    _ => literal_references(child, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| literal_references(item, out)),
        _ => {}
    }
}

/// How many references away from the members' data a referenced resource may be (README).
const REFERENCE_DEPTH: usize = 3;

/// The patient ids of a Group's members, whose references must all start with `prefix`.
fn member_ids(group: &Value, prefix: &str, what: &str) -> BTreeSet<String> {
    group["member"]
        .as_array()
        .unwrap()
        .iter()
        .map(|member| {
            let reference = member["entity"]["reference"].as_str().unwrap();
            reference
                .strip_prefix(prefix)
                .unwrap_or_else(|| panic!("{what} {reference} is not {prefix}<id>"))
                .to_owned()
        })
        .collect()
}

#[test]
fn synthea_group_exports_follow_the_compartment_definition() {
    let started = Instant::now();
    let source = read_source();
    assert_eq!(source.len(), TOTAL, "resources in the data set");

    // ---- the independent view of the data ----
    let mut resources: Vec<(&'static str, String, Value)> = Vec::with_capacity(source.len());
    for (resource_type, line_number, line) in &source {
        let resource: Value =
            serde_json::from_str(line).unwrap_or_else(|error| panic!("{resource_type}:{line_number}: {error}"));
        assert_eq!(resource["resourceType"], *resource_type, "{resource_type}:{line_number}");
        let id = resource["id"].as_str().unwrap().to_owned();
        resources.push((resource_type, id, resource));
    }
    let mut types_by_id: HashMap<String, &'static str> = HashMap::new();
    for (resource_type, id, _) in &resources {
        let previous = types_by_id.insert(id.clone(), resource_type);
        assert!(previous.is_none(), "id {id} is used twice in the data set");
    }
    for (_, _, resource) in &mut resources {
        resolve(resource, &types_by_id);
    }
    // The server stamps its own versionId/lastUpdated (a few source resources carry some).
    let stripped: HashMap<(&str, &str), Value> =
        resources.iter().map(|(t, id, resource)| ((*t, id.as_str()), without_server_meta(resource.clone()))).collect();
    // Every number exactly as the source wrote it (the server stamps only strings into `meta`).
    let source_numbers: HashMap<(&str, &str), Vec<&str>> = resources
        .iter()
        .zip(&source)
        .map(|((t, id, _), (_, _, line))| ((*t, id.as_str()), number_literals(line)))
        .collect();
    let mut numbers_compared = 0usize;
    let mut references_resolved = 0usize;

    // ---- the server ----
    let server = Server::with_config(HttpConfig { export_part_size: 1_000, ..HttpConfig::default() });
    let tenant = server.tenant("synthea");
    let client = server.client(tenant);
    // Another tenant with the same data's Groups must not matter (ids collide on purpose).
    let other = server.tenant("other");

    let loading = Instant::now();
    let mut importer = Importer::new(server.store.clone(), tenant, None, 100_000);
    for (resource_type, line_number, line) in &source {
        importer
            .add_line(Location { source: format!("{resource_type}.ndjson.gz"), line: *line_number }, line.as_bytes())
            .unwrap();
    }
    let summary = importer.finish().unwrap();
    assert_eq!(summary.failed, 0, "import failures: {:#?}", summary.errors);
    assert_eq!(summary.created as usize, TOTAL, "{summary:?}");
    let load_time = loading.elapsed();
    // A copy of the Groups (only) in the other tenant, with their members resolved by hand.
    let mut decoys = Importer::new(server.store.clone(), other, None, 100_000);
    for (resource_type, line_number, line) in source.iter().filter(|(t, _, _)| *t == "Group") {
        let mut group: Value = serde_json::from_str(line).unwrap();
        resolve(&mut group, &types_by_id);
        decoys
            .add_resource(Location { source: format!("{resource_type}.ndjson.gz"), line: *line_number }, group, None)
            .unwrap();
    }
    assert_eq!(decoys.finish().unwrap().failed, 0);

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();

    let exporting = Instant::now();
    let mut exported_everywhere: BTreeMap<String, usize> = BTreeMap::new();
    let mut patients_seen = BTreeSet::new();
    for (group_id, size) in GROUP_SIZES {
        // ---- members: urn:uuid: in the source, Patient/<id> once stored ----
        let source_group: Value = serde_json::from_str(
            &source.iter().find(|(t, _, l)| *t == "Group" && l.contains(&format!("\"id\":\"{group_id}\""))).unwrap().2,
        )
        .unwrap();
        let members = member_ids(&source_group, "urn:uuid:", &format!("{group_id}: member"));
        assert_eq!(members.len(), size, "{group_id}: member count (README)");
        let reply = runtime.block_on(server.send(get(&format!("/r4/Group/{group_id}")).by(&client)));
        assert_eq!(reply.status, StatusCode::OK);
        let stored: Value = serde_json::from_slice(&reply.body).unwrap();
        let stored_members = member_ids(&stored, "Patient/", &format!("{group_id}: stored member"));
        assert_eq!(stored_members, members, "{group_id}: stored members");
        assert_eq!(
            without_server_meta(stored),
            stripped[&("Group", group_id)],
            "{group_id}: stored Group differs from its resolved source"
        );

        // ---- the expected export, from the compartment definition ----
        let mut expected: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (resource_type, id, resource) in &resources {
            if *resource_type == "Group" {
                continue;
            }
            if patient_compartments(resource_type, resource).iter().any(|patient| members.contains(patient)) {
                expected.entry(resource_type.to_string()).or_default().insert(id.clone());
            }
        }
        expected.entry("Group".into()).or_default().insert(group_id.to_owned());
        assert_eq!(expected["Patient"], members, "{group_id}: every member's Patient is in the data set");
        // Referenced resources: types outside the compartment (never a Group), level by level.
        let by_key: HashMap<(&str, &str), &Value> =
            resources.iter().map(|(t, id, resource)| ((*t, id.as_str()), resource)).collect();
        let mut frontier: Vec<&Value> = resources
            .iter()
            .filter(|(t, id, _)| *t != "Group" && expected.get(*t).is_some_and(|ids| ids.contains(id)))
            .map(|(_, _, resource)| resource)
            .collect();
        let mut referenced: BTreeSet<(String, String)> = BTreeSet::new();
        for _ in 0..REFERENCE_DEPTH {
            let mut next = Vec::new();
            for resource in frontier {
                let mut found = Vec::new();
                literal_references(resource, &mut found);
                for (t, id) in found {
                    if t == "Group" || is_compartment_type(&t) || referenced.contains(&(t.clone(), id.clone())) {
                        continue;
                    }
                    if let Some(target) = by_key.get(&(t.as_str(), id.as_str())) {
                        next.push(*target);
                    }
                    referenced.insert((t, id));
                }
            }
            frontier = next;
        }
        for (t, id) in &referenced {
            if by_key.contains_key(&(t.as_str(), id.as_str())) {
                expected.entry(t.clone()).or_default().insert(id.clone());
            }
        }

        // ---- the actual export ----
        let reply = runtime.block_on(server.send(get(&format!("/bulk-data/r4/Group/{group_id}/$export")).by(&client)));
        assert_eq!(reply.status, StatusCode::OK, "{group_id}: {}", reply.text());
        assert!(reply.header("content-type").contains("application/json"));
        let manifest: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(manifest["error"], serde_json::json!([]), "{group_id}: every member exists, so no error file");
        let mut got: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for item in manifest["output"].as_array().unwrap() {
            let item_type = item["type"].as_str().unwrap();
            let url = item["url"].as_str().unwrap();
            let path = &url[url.find("/bulk-data/").unwrap()..];
            let reply = runtime.block_on(server.send(get(path).by(&client)));
            assert_eq!(reply.status, StatusCode::OK, "{group_id}: download of a {item_type} file");
            assert_eq!(reply.header("content-type"), "application/fhir+ndjson");
            let text = String::from_utf8(reply.body).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(Some(lines.len() as u64), item["count"].as_u64(), "{group_id}: {item_type} file count");
            for line in lines {
                let resource: Value = serde_json::from_str(line).unwrap();
                assert_eq!(resource["resourceType"], item_type, "{group_id}: a line in a {item_type} file");
                let id = resource["id"].as_str().unwrap().to_owned();
                let source = stripped
                    .get(&(item_type, id.as_str()))
                    .unwrap_or_else(|| panic!("{group_id}: exported {item_type}/{id} is not in the data set"));
                assert_eq!(
                    number_literals(line),
                    source_numbers[&(item_type, id.as_str())],
                    "{group_id}: exported {item_type}/{id} does not carry the source's numbers character for character"
                );
                numbers_compared += source_numbers[&(item_type, id.as_str())].len();
                let exported = without_server_meta(resource);
                if &exported != source {
                    panic!(
                        "{group_id}: exported {item_type}/{id} differs from its resolved source: {}",
                        differences(&exported, source)
                    );
                }
                assert!(
                    got.entry(item_type.to_owned()).or_default().insert(id.clone()),
                    "{group_id}: {item_type}/{id} exported twice"
                );
            }
        }
        for needed in ["Practitioner", "Organization"] {
            assert!(got.get(needed).is_some_and(|ids| !ids.is_empty()), "{group_id}: no {needed} exported");
        }
        // Self-contained: every reference of every exported line resolves within the export,
        // unless its target is not in the data set at all.
        let mut resolved = 0usize;
        for (resource_type, ids) in &got {
            for id in ids {
                let mut found = Vec::new();
                literal_references(&stripped[&(resource_type.as_str(), id.as_str())], &mut found);
                for (t, target) in found {
                    if got.get(&t).is_some_and(|ids| ids.contains(&target)) {
                        resolved += 1;
                        continue;
                    }
                    assert!(
                        !types_by_id.contains_key(&target),
                        "{group_id}: exported {resource_type}/{id} references {t}/{target}, which is in the tenant \
                         but not in the export"
                    );
                }
            }
        }
        references_resolved += resolved;
        assert_eq!(got.get("Group"), Some(&BTreeSet::from([group_id.to_owned()])), "{group_id}: only the target Group");
        assert_eq!(got.get("Patient").map(BTreeSet::len), Some(size), "{group_id}: Patients exported");
        for (resource_type, ids) in expected.iter() {
            let actual = got.get(resource_type).cloned().unwrap_or_default();
            let missing: Vec<_> = ids.difference(&actual).take(5).collect();
            let extra: Vec<_> = actual.difference(ids).take(5).collect();
            assert!(
                missing.is_empty() && extra.is_empty(),
                "{group_id}: {resource_type}: {} expected, {} exported; missing {missing:?}, unexpected {extra:?}",
                ids.len(),
                actual.len()
            );
        }
        for resource_type in got.keys() {
            assert!(expected.contains_key(resource_type), "{group_id}: unexpected type {resource_type}");
        }
        for (resource_type, ids) in &got {
            *exported_everywhere.entry(resource_type.clone()).or_default() += ids.len();
        }
        patients_seen.extend(got["Patient"].iter().cloned());
    }
    assert!(numbers_compared > 10_000, "only {numbers_compared} numbers were compared");
    assert!(references_resolved > 10_000, "only {references_resolved} references resolved within exports");
    eprintln!(
        "synthea: {numbers_compared} numbers compared as text, {references_resolved} references resolved within their export; total {:?} (import of {TOTAL} resources {:?}, 8 exports {:?}); exported per type over the 8 Groups: {exported_everywhere:?}; {} distinct patients",
        started.elapsed(),
        load_time,
        exporting.elapsed(),
        patients_seen.len()
    );
}
