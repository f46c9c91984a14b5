//! The NDJSON data set is self-consistent: parseable lines, matching types, unique valid ids,
//! every reference resolving to a resource of an allowed type, and an honest summary.

mod common;

use std::collections::{HashMap, HashSet};

use common::{for_each_reference, is_fhir_id};

/// Allowed target types of every reference element the generator emits (from the R4 element
/// definitions). An element missing here fails the test, so new references must be declared.
const ALLOWED_TARGETS: &[(&str, &[&str])] = &[
    ("AllergyIntolerance.patient", &["Patient"]),
    ("CarePlan.addresses", &["Condition"]),
    (
        "CarePlan.author",
        &["Patient", "Practitioner", "PractitionerRole", "Device", "RelatedPerson", "Organization", "CareTeam"],
    ),
    ("CarePlan.activity.detail.location", &["Location"]),
    ("CarePlan.encounter", &["Encounter"]),
    ("CarePlan.subject", &["Patient", "Group"]),
    ("Claim.facility", &["Location"]),
    ("Claim.insurance.coverage", &["Coverage"]),
    ("Claim.item.encounter", &["Encounter"]),
    ("Claim.patient", &["Patient"]),
    ("Claim.procedure.procedureReference", &["Procedure"]),
    ("Claim.provider", &["Practitioner", "PractitionerRole", "Organization"]),
    ("Condition.encounter", &["Encounter"]),
    ("Condition.recorder", &["Practitioner", "PractitionerRole", "Patient", "RelatedPerson"]),
    ("Condition.subject", &["Patient", "Group"]),
    ("Coverage.beneficiary", &["Patient"]),
    ("Coverage.payor", &["Organization", "Patient", "RelatedPerson"]),
    ("DiagnosticReport.encounter", &["Encounter"]),
    ("DiagnosticReport.performer", &["Practitioner", "PractitionerRole", "Organization", "CareTeam"]),
    ("DiagnosticReport.result", &["Observation"]),
    ("DiagnosticReport.subject", &["Patient", "Group", "Device", "Location"]),
    (
        "DocumentReference.author",
        &["Practitioner", "PractitionerRole", "Organization", "Device", "Patient", "RelatedPerson"],
    ),
    ("DocumentReference.context.encounter", &["Encounter", "EpisodeOfCare"]),
    ("DocumentReference.custodian", &["Organization"]),
    ("DocumentReference.subject", &["Patient", "Practitioner", "Group", "Device"]),
    ("Encounter.location.location", &["Location"]),
    ("Encounter.participant.individual", &["Practitioner", "PractitionerRole", "RelatedPerson"]),
    ("Encounter.serviceProvider", &["Organization"]),
    ("Encounter.subject", &["Patient", "Group"]),
    ("ExplanationOfBenefit.claim", &["Claim"]),
    ("ExplanationOfBenefit.insurance.coverage", &["Coverage"]),
    ("ExplanationOfBenefit.insurer", &["Organization"]),
    ("ExplanationOfBenefit.item.encounter", &["Encounter"]),
    ("ExplanationOfBenefit.patient", &["Patient"]),
    ("ExplanationOfBenefit.provider", &["Practitioner", "PractitionerRole", "Organization"]),
    ("Immunization.encounter", &["Encounter"]),
    ("Immunization.location", &["Location"]),
    ("Immunization.patient", &["Patient"]),
    ("Immunization.performer.actor", &["Practitioner", "PractitionerRole", "Organization"]),
    ("Location.managingOrganization", &["Organization"]),
    ("MedicationRequest.encounter", &["Encounter"]),
    ("MedicationRequest.medicationReference", &["Medication"]),
    ("MedicationRequest.reasonReference", &["Condition", "Observation"]),
    (
        "MedicationRequest.requester",
        &["Practitioner", "PractitionerRole", "Organization", "Patient", "RelatedPerson", "Device"],
    ),
    ("MedicationRequest.subject", &["Patient", "Group"]),
    ("Observation.encounter", &["Encounter"]),
    ("Observation.subject", &["Patient", "Group", "Device", "Location"]),
    ("Procedure.encounter", &["Encounter"]),
    ("Procedure.location", &["Location"]),
    (
        "Procedure.performer.actor",
        &["Practitioner", "PractitionerRole", "Organization", "Patient", "RelatedPerson", "Device"],
    ),
    ("Procedure.subject", &["Patient", "Group"]),
    (
        "Provenance.agent.onBehalfOf",
        &["Practitioner", "PractitionerRole", "RelatedPerson", "Patient", "Device", "Organization"],
    ),
    (
        "Provenance.agent.who",
        &["Practitioner", "PractitionerRole", "RelatedPerson", "Patient", "Device", "Organization"],
    ),
    ("Provenance.target", &["*"]),
    ("RelatedPerson.patient", &["Patient"]),
];

#[test]
fn every_line_is_a_resource_of_its_file_with_a_unique_valid_id() {
    let data = common::ndjson(120, 11);
    let mut ids = HashSet::new();
    for (file_type, r) in &data.resources {
        assert_eq!(r["resourceType"].as_str(), Some(file_type.as_str()), "resource in {file_type}.ndjson: {r}");
        let id = r["id"].as_str().unwrap_or_else(|| panic!("no id: {r}"));
        assert!(is_fhir_id(id), "invalid id {id:?}");
        // Unique across the whole data set, not just per type (ids are UUIDs).
        assert!(ids.insert(id.to_string()), "duplicate id {id}");
    }
    // The summary tells the truth about what is on disk.
    let mut counted: HashMap<&str, u64> = HashMap::new();
    for (t, _) in &data.resources {
        *counted.entry(t.as_str()).or_insert(0) += 1;
    }
    for t in &data.summary.types {
        assert_eq!(counted.get(t.resource_type.as_str()), Some(&t.count), "{}", t.resource_type);
        let size = std::fs::metadata(data.dir.path().join(format!("{}.ndjson", t.resource_type))).unwrap().len();
        assert_eq!(size, t.bytes, "{} bytes", t.resource_type);
    }
    assert_eq!(data.summary.resources, data.resources.len() as u64);
    assert_eq!(data.summary.patients, 120);
    assert_eq!(counted["Patient"], 120);
    // Every resource family the issue asks for is present.
    for t in [
        "AllergyIntolerance",
        "CarePlan",
        "Claim",
        "Condition",
        "Coverage",
        "DiagnosticReport",
        "DocumentReference",
        "Encounter",
        "ExplanationOfBenefit",
        "Immunization",
        "Location",
        "Medication",
        "MedicationRequest",
        "Observation",
        "Organization",
        "Patient",
        "Practitioner",
        "Procedure",
        "Provenance",
        "RelatedPerson",
    ] {
        assert!(counted.get(t).copied().unwrap_or(0) > 0, "no {t}");
    }
}

#[test]
fn every_reference_resolves_to_an_allowed_type() {
    let data = common::ndjson(120, 12);
    let known: HashSet<String> =
        data.resources.iter().map(|(t, r)| format!("{t}/{}", r["id"].as_str().unwrap())).collect();
    let allowed: HashMap<&str, &[&str]> = ALLOWED_TARGETS.iter().copied().collect();
    let mut checked = 0;
    for (t, r) in &data.resources {
        let mut path = t.clone();
        for_each_reference(r, &mut path, &mut |path, reference| {
            checked += 1;
            let (target_type, id) =
                reference.split_once('/').unwrap_or_else(|| panic!("{path}: not Type/id: {reference}"));
            assert!(is_fhir_id(id), "{path}: bad id in {reference}");
            assert!(known.contains(reference), "{path}: {reference} does not resolve");
            let types = allowed.get(path).unwrap_or_else(|| panic!("{path} is not a declared reference element"));
            assert!(types == &["*"] || types.contains(&target_type), "{path} may not point at {target_type}");
        });
    }
    assert!(checked > 10_000, "only {checked} references checked");
}

#[test]
fn provenance_covers_every_patient_resource_and_the_patient() {
    let data = common::ndjson(40, 13);
    let mut targeted: HashSet<String> = HashSet::new();
    for (t, r) in data.resources.iter().filter(|(t, _)| t == "Provenance") {
        let targets = r["target"].as_array().unwrap();
        assert!(targets[0]["reference"].as_str().unwrap().starts_with("Patient/"), "{t}: first target not the patient");
        targeted.extend(targets.iter().map(|x| x["reference"].as_str().unwrap().to_string()));
    }
    for (t, r) in &data.resources {
        if common::owning_patient(r).is_some() && t != "Provenance" {
            let key = format!("{t}/{}", r["id"].as_str().unwrap());
            assert!(targeted.contains(&key), "{key} has no Provenance");
        }
    }
}

#[test]
fn dates_stay_before_the_anchor_and_span_about_ten_years() {
    let data = common::ndjson(200, 14);
    let mut years = HashSet::new();
    for (_, r) in data.resources.iter().filter(|(t, _)| t == "Encounter") {
        let start = r["period"]["start"].as_str().unwrap();
        let end = r["period"]["end"].as_str().unwrap();
        assert!(start <= end && end < "2026-01-01T00:00:00Z", "{start}..{end}");
        years.insert(start[..4].to_string());
    }
    assert!(years.len() >= 10, "encounters only in years {years:?}");
}
