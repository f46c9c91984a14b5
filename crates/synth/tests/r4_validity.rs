//! Structural R4 validity: every resource passes the server's own validator
//! (`bulkhead_fhir::validation`) and decodes cleanly with `fhirkit` (an R4 4.0.1 structural
//! validator: cardinalities, unknown elements, primitive formats), and a compact checker of
//! our own covers what fhirkit does not: required bindings, fixed systems, the vital-signs
//! profile, and invariants such as con-3.

mod common;

use serde_json::Value;

/// All values at a dotted path, arrays flattened (`"category.coding.code"`).
fn at<'a>(v: &'a Value, path: &str) -> Vec<&'a Value> {
    let mut current = vec![v];
    for key in path.split('.') {
        let mut next = Vec::new();
        for v in current {
            match v.get(key) {
                Some(Value::Array(items)) => next.extend(items.iter()),
                Some(x) => next.push(x),
                None => {}
            }
        }
        current = next;
    }
    current
}

fn strings<'a>(v: &'a Value, path: &str) -> Vec<&'a str> {
    at(v, path).into_iter().filter_map(Value::as_str).collect()
}

/// One rule: `path` must be present (`min` values) and every string there must be in `codes`
/// (empty = any value).
struct Rule {
    path: &'static str,
    min: usize,
    codes: &'static [&'static str],
}

const fn req(path: &'static str) -> Rule {
    Rule { path, min: 1, codes: &[] }
}

const fn bound(path: &'static str, codes: &'static [&'static str]) -> Rule {
    Rule { path, min: 1, codes }
}

const FINANCIAL_STATUS: &[&str] = &["active", "cancelled", "draft", "entered-in-error"];
const CLINICAL_CONDITION: &str = "http://terminology.hl7.org/CodeSystem/condition-clinical";

/// Required elements (R4 min ≥ 1) and required bindings, per type, for what we emit.
fn rules(resource_type: &str) -> Vec<Rule> {
    match resource_type {
        "Patient" => vec![
            bound("gender", &["male", "female", "other", "unknown"]),
            req("birthDate"),
            req("name.family"),
            req("identifier.system"),
            req("identifier.value"),
            req("address.city"),
        ],
        "RelatedPerson" => vec![
            req("patient.reference"),
            req("relationship.coding.code"),
            bound("gender", &["male", "female", "other", "unknown"]),
        ],
        "Practitioner" => vec![req("name.family"), req("identifier.system")],
        "Organization" => vec![req("name"), req("identifier.system")],
        "Location" => vec![bound("status", &["active", "suspended", "inactive"]), bound("mode", &["instance", "kind"])],
        "Medication" => vec![
            bound("status", &["active", "inactive", "entered-in-error"]),
            bound("code.coding.system", &["http://www.nlm.nih.gov/research/umls/rxnorm"]),
        ],
        "Encounter" => vec![
            bound(
                "status",
                &[
                    "planned",
                    "arrived",
                    "triaged",
                    "in-progress",
                    "onleave",
                    "finished",
                    "cancelled",
                    "entered-in-error",
                    "unknown",
                ],
            ),
            bound("class.system", &["http://terminology.hl7.org/CodeSystem/v3-ActCode"]),
            bound("class.code", &["AMB", "EMER", "IMP", "VR", "HH", "FLD", "SS", "ACUTE", "NONAC", "OBSENC", "PRENC"]),
            req("subject.reference"),
            req("period.start"),
        ],
        "Observation" => vec![
            bound(
                "status",
                &[
                    "registered",
                    "preliminary",
                    "final",
                    "amended",
                    "corrected",
                    "cancelled",
                    "entered-in-error",
                    "unknown",
                ],
            ),
            bound("code.coding.system", &["http://loinc.org"]),
            req("code.coding.code"),
            bound("category.coding.system", &["http://terminology.hl7.org/CodeSystem/observation-category"]),
            bound("category.coding.code", &["vital-signs", "laboratory"]),
            req("subject.reference"),
            req("effectiveDateTime"),
        ],
        "Condition" => vec![
            bound("clinicalStatus.coding.system", &[CLINICAL_CONDITION]),
            bound(
                "clinicalStatus.coding.code",
                &["active", "recurrence", "relapse", "inactive", "remission", "resolved"],
            ),
            bound("verificationStatus.coding.system", &["http://terminology.hl7.org/CodeSystem/condition-ver-status"]),
            bound(
                "verificationStatus.coding.code",
                &["unconfirmed", "provisional", "differential", "confirmed", "refuted", "entered-in-error"],
            ),
            bound("code.coding.system", &["http://snomed.info/sct"]),
            req("subject.reference"),
        ],
        "MedicationRequest" => vec![
            bound(
                "status",
                &["active", "on-hold", "cancelled", "completed", "entered-in-error", "stopped", "draft", "unknown"],
            ),
            bound(
                "intent",
                &[
                    "proposal",
                    "plan",
                    "order",
                    "original-order",
                    "reflex-order",
                    "filler-order",
                    "instance-order",
                    "option",
                ],
            ),
            req("subject.reference"),
        ],
        "Procedure" => vec![
            bound(
                "status",
                &[
                    "preparation",
                    "in-progress",
                    "not-done",
                    "on-hold",
                    "stopped",
                    "completed",
                    "entered-in-error",
                    "unknown",
                ],
            ),
            req("subject.reference"),
            bound("code.coding.system", &["http://snomed.info/sct"]),
        ],
        "Immunization" => vec![
            bound("status", &["completed", "entered-in-error", "not-done"]),
            bound("vaccineCode.coding.system", &["http://hl7.org/fhir/sid/cvx"]),
            req("patient.reference"),
            req("occurrenceDateTime"),
        ],
        "AllergyIntolerance" => vec![
            bound(
                "clinicalStatus.coding.system",
                &["http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"],
            ),
            bound("clinicalStatus.coding.code", &["active", "inactive", "resolved"]),
            bound("verificationStatus.coding.code", &["unconfirmed", "confirmed", "refuted", "entered-in-error"]),
            bound("type", &["allergy", "intolerance"]),
            bound("category", &["food", "medication", "environment", "biologic"]),
            bound("criticality", &["low", "high", "unable-to-assess"]),
            req("patient.reference"),
        ],
        "DiagnosticReport" => vec![
            bound(
                "status",
                &[
                    "registered",
                    "partial",
                    "preliminary",
                    "final",
                    "amended",
                    "corrected",
                    "appended",
                    "cancelled",
                    "entered-in-error",
                    "unknown",
                ],
            ),
            req("code.coding.code"),
            req("subject.reference"),
            req("result.reference"),
        ],
        "DocumentReference" => vec![
            bound("status", &["current", "superseded", "entered-in-error"]),
            bound("docStatus", &["preliminary", "final", "amended", "entered-in-error"]),
            req("content.attachment.contentType"),
            req("subject.reference"),
        ],
        "CarePlan" => vec![
            bound("status", &["draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"]),
            bound("intent", &["proposal", "plan", "order", "option"]),
            req("subject.reference"),
            bound(
                "activity.detail.status",
                &[
                    "not-started",
                    "scheduled",
                    "in-progress",
                    "on-hold",
                    "completed",
                    "cancelled",
                    "stopped",
                    "unknown",
                    "entered-in-error",
                ],
            ),
        ],
        "Coverage" => vec![bound("status", FINANCIAL_STATUS), req("beneficiary.reference"), req("payor.reference")],
        "Claim" => vec![
            bound("status", FINANCIAL_STATUS),
            bound("type.coding.system", &["http://terminology.hl7.org/CodeSystem/claim-type"]),
            bound("type.coding.code", &["institutional", "oral", "pharmacy", "professional", "vision"]),
            bound("use", &["claim", "preauthorization", "predetermination"]),
            req("patient.reference"),
            req("created"),
            req("provider.reference"),
            bound("priority.coding.system", &["http://terminology.hl7.org/CodeSystem/processpriority"]),
            req("insurance.sequence"),
            req("insurance.focal"),
            req("insurance.coverage.reference"),
            req("item.sequence"),
            req("item.productOrService.coding.code"),
        ],
        "ExplanationOfBenefit" => vec![
            bound("status", FINANCIAL_STATUS),
            req("type.coding.code"),
            bound("use", &["claim", "preauthorization", "predetermination"]),
            req("patient.reference"),
            req("created"),
            req("insurer.reference"),
            req("provider.reference"),
            bound("outcome", &["queued", "complete", "error", "partial"]),
            req("insurance.focal"),
            req("insurance.coverage.reference"),
            req("item.adjudication.category.coding.code"),
            req("total.category.coding.code"),
            req("total.amount.value"),
        ],
        "Provenance" => vec![req("target.reference"), req("recorded"), req("agent.who.reference")],
        other => panic!("no rules for {other}: add them"),
    }
}

/// What the rules table cannot say: the vital-signs profile and cross-element invariants.
fn check_special(r: &Value, problems: &mut Vec<String>) {
    let t = r["resourceType"].as_str().unwrap_or("");
    let id = r["id"].as_str().unwrap_or("");
    let mut fail = |msg: String| problems.push(format!("{t}/{id}: {msg}"));
    match t {
        "Observation" => {
            let quantities: Vec<&Value> =
                if r.get("component").is_some() { at(r, "component.valueQuantity") } else { at(r, "valueQuantity") };
            if quantities.is_empty() {
                fail("no valueQuantity".into());
            }
            for q in quantities {
                if q["system"] != "http://unitsofmeasure.org"
                    || !q["value"].is_number()
                    || !q["code"].is_string()
                    || q["unit"] != q["code"]
                {
                    fail(format!("not a UCUM quantity: {q}"));
                }
            }
            let codes = strings(r, "code.coding.code");
            // R4 oxygen-saturation profile: code must include 2708-6.
            if codes.contains(&"59408-5") && !codes.contains(&"2708-6") {
                fail("oxygen saturation without LOINC 2708-6".into());
            }
            if codes == ["85354-9"] {
                let mut parts = strings(r, "component.code.coding.code");
                parts.sort_unstable();
                if parts != ["8462-4", "8480-6"] {
                    fail(format!("blood pressure components {parts:?}"));
                }
            }
        }
        // con-3/con-4: an abated condition is not active.
        "Condition"
            if r.get("abatementDateTime").is_some()
                && !matches!(strings(r, "clinicalStatus.coding.code")[..], ["inactive" | "resolved" | "remission"]) =>
        {
            fail("abated but still active".into());
        }
        // medication[x] is 1..1: exactly one of the two choices.
        "MedicationRequest"
            if r.get("medicationReference").is_some() == r.get("medicationCodeableConcept").is_some() =>
        {
            fail("needs exactly one medication[x]".into());
        }
        "DocumentReference" => {
            for a in at(r, "content.attachment") {
                match (a["data"].as_str(), a["url"].as_str()) {
                    (Some(data), None) => {
                        if data.len() % 4 != 0
                            || !data.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
                        {
                            fail("attachment data is not base64".into());
                        }
                    }
                    (None, Some(url)) if url.starts_with("https://") => {}
                    _ => fail(format!("attachment needs data or an https url: {a}")),
                }
            }
        }
        _ => {}
    }
}

#[test]
fn every_resource_satisfies_required_elements_and_bindings() {
    let data = common::ndjson(150, 21);
    let mut problems = Vec::new();
    for (t, r) in &data.resources {
        for rule in rules(t) {
            let values = at(r, rule.path);
            if values.len() < rule.min {
                problems.push(format!("{t}/{}: missing {}", r["id"], rule.path));
            }
            for v in values.iter().filter_map(|v| v.as_str()) {
                if !rule.codes.is_empty() && !rule.codes.contains(&v) {
                    problems.push(format!("{t}/{}: {} = {v:?} not in required value set", r["id"], rule.path));
                }
            }
        }
        check_special(r, &mut problems);
    }
    problems.truncate(20);
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn every_resource_passes_fhirkit_r4_structural_validation() {
    let data = common::ndjson(60, 22);
    let mut problems = Vec::new();
    for (t, r) in &data.resources {
        let text = r.to_string();
        let (decoded, issues) = fhirkit::from_json::<fhirkit::r4::Resource>(&text).expect("JSON");
        if decoded.is_none() {
            problems.push(format!("{t}/{}: not decodable", r["id"]));
        }
        for issue in issues.iter().filter(|i| i.severity == fhirkit::Severity::Error) {
            problems.push(format!("{t}/{}: {issue}", r["id"]));
        }
    }
    problems.truncate(20);
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn every_resource_passes_the_servers_r4_validator() {
    // The validator every write path uses (bulkhead_fhir::validation): what synth emits must load.
    let data = common::ndjson(150, 24);
    let mut problems = Vec::new();
    for (t, r) in &data.resources {
        for violation in bulkhead_fhir::validation::validate_resource(r) {
            problems.push(format!("{t}/{}: {}: {}", r["id"], violation.expression, violation.message));
        }
    }
    problems.truncate(20);
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_checker_rejects_broken_resources() {
    // Guard against a checker that cannot fail: break a valid resource in several ways.
    let data = common::ndjson(5, 23);
    let (_, obs) = data.resources.iter().find(|(t, r)| t == "Observation" && r.get("valueQuantity").is_some()).unwrap();
    let mut broken = obs.clone();
    broken["status"] = "done".into();
    broken["valueQuantity"]["system"] = "http://example.org".into();
    let mut problems = Vec::new();
    check_special(&broken, &mut problems);
    assert_eq!(problems.len(), 1, "{problems:?}");
    let status = rules("Observation").into_iter().find(|r| r.path == "status").unwrap();
    assert!(!status.codes.contains(&broken["status"].as_str().unwrap()));
    let (_, issues) =
        fhirkit::from_json::<fhirkit::r4::Resource>(r#"{"resourceType":"Claim","status":"active","bogus":1}"#).unwrap();
    assert!(issues.iter().any(|i| i.severity == fhirkit::Severity::Error), "fhirkit accepted an invalid Claim");
}
