//! Checks the generated Patient compartment table against the official R4 definition, and the
//! extraction against real Synthea data.
//!
//! The data is vendored under `testdata/` in the repository; these tests fail, rather than skip,
//! when it is missing.

use bulkhead_fhir::compartment::{compartment_params, compartment_types, is_compartment_type, patient_compartments};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

fn test_data(relative: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata").join(relative);
    assert!(path.exists(), "test data missing: {} (vendored under testdata/)", path.display());
    path
}

/// Type -> compartment parameter codes (without `{def}`), for types that have any.
fn official_definition() -> BTreeMap<String, BTreeSet<String>> {
    let path = test_data("fhir-r4/compartmentdefinition-patient.json");
    let text = std::fs::read_to_string(&path).expect("read CompartmentDefinition");
    let definition: Value = serde_json::from_str(&text).expect("parse CompartmentDefinition");
    assert_eq!(definition["code"], "Patient");
    assert_eq!(definition["version"], "4.0.1");
    let mut table = BTreeMap::new();
    for entry in definition["resource"].as_array().expect("resource array") {
        let Some(params) = entry["param"].as_array() else {
            continue;
        };
        let codes = params.iter().map(|p| p.as_str().unwrap().to_owned());
        table.insert(entry["code"].as_str().unwrap().to_owned(), codes.filter(|c| c != "{def}").collect());
    }
    table
}

#[test]
fn table_has_exactly_the_types_of_the_official_definition() {
    let official = official_definition();
    assert_eq!(official.len(), 66, "R4 4.0.1 has 66 types with compartment params");
    let ours: BTreeSet<&str> = compartment_types().iter().copied().collect();
    let theirs: BTreeSet<&str> = official.keys().map(String::as_str).collect();
    assert_eq!(ours, theirs);
    assert!(is_compartment_type("Patient"));
}

#[test]
fn table_covers_every_official_type_and_param() {
    for (resource_type, official_codes) in official_definition() {
        let ours: BTreeSet<String> =
            compartment_params(&resource_type).iter().map(|(code, _)| code.to_string()).collect();
        assert_eq!(ours, official_codes, "params of {resource_type}");
        for (code, path) in compartment_params(&resource_type) {
            assert!(!path.is_empty(), "{resource_type}.{code} has an empty path");
        }
    }
}

/// Decompresses one Synthea NDJSON file (no gzip crate in this package, so use the gzip tool).
fn synthea(resource_type: &str) -> Vec<Value> {
    let path = test_data(&format!("synthea-100/{resource_type}.ndjson.gz"));
    let output = Command::new("gzip").arg("-dc").arg(&path).output().expect("run gzip -dc");
    assert!(output.status.success(), "gzip -dc {} failed", path.display());
    let text = String::from_utf8(output.stdout).expect("utf-8 NDJSON");
    text.lines().map(|line| serde_json::from_str(line).expect("NDJSON line")).collect()
}

/// The referenced patient id of `resource[field]`, which Synthea writes as "Patient/<id>".
fn patient_at(resource: &Value, field: &str) -> String {
    let reference = resource[field]["reference"].as_str().expect("reference string");
    reference.strip_prefix("Patient/").expect("Patient reference").to_owned()
}

#[test]
fn synthea_resources_land_in_their_patients_compartment() {
    let patients: BTreeSet<String> = synthea("Patient").iter().map(|p| p["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(patients.len(), 100);
    for patient in synthea("Patient") {
        assert_eq!(patient_compartments("Patient", &patient), vec![patient["id"].as_str().unwrap()]);
    }

    // Each Synthea clinical resource names exactly its own patient, at `subject` or `patient`.
    let by_field = [
        ("Observation", "subject", 16_315),
        ("Encounter", "subject", 3_697),
        ("Condition", "subject", 639),
        ("Procedure", "subject", 2_351),
        ("DiagnosticReport", "subject", 897),
        ("MedicationRequest", "subject", 2_386),
        ("CarePlan", "subject", 278),
        ("CareTeam", "subject", 278),
        ("ImagingStudy", "subject", 16),
        ("DocumentReference", "subject", 3),
        ("Immunization", "patient", 1_287),
        ("AllergyIntolerance", "patient", 38),
        ("Claim", "patient", 6_083),
        ("ExplanationOfBenefit", "patient", 3_697),
    ];
    for (resource_type, field, count) in by_field {
        let resources = synthea(resource_type);
        assert_eq!(resources.len(), count, "{resource_type} count");
        for resource in &resources {
            let expected = patient_at(resource, field);
            assert!(patients.contains(&expected), "{resource_type} names unknown patient {expected}");
            assert_eq!(patient_compartments(resource_type, resource), vec![expected], "{resource_type}");
        }
    }
}

#[test]
fn synthea_shared_resources_are_outside_the_compartment() {
    for resource_type in ["Organization", "Practitioner", "Device"] {
        assert!(!is_compartment_type(resource_type));
        for resource in synthea(resource_type) {
            assert!(patient_compartments(resource_type, &resource).is_empty());
        }
    }
    // Synthea's Groups list members as urn:uuid:<patient id>; until the loader resolves them to
    // Patient/<id> they put the Group in no compartment.
    for group in synthea("Group") {
        assert!(patient_compartments("Group", &group).is_empty());
    }
}

/// The committed table is exactly what the generator writes from the vendored definitions.
#[test]
fn the_committed_table_is_the_generators_output() {
    let generator = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("gen/gen_compartment_table.py");
    let output = Command::new("python3").arg(&generator).arg("--check").output().expect("run python3");
    assert!(output.status.success(), "{} --check: {}", generator.display(), String::from_utf8_lossy(&output.stderr));
}
