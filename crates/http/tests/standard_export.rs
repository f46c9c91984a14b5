//! Tier-2 tests of the standard Bulk Data export (issue 9, checklist §2–§5): the three levels
//! (`$export`, `Patient/$export`, `Group/{id}/$export`) on both bases by GET and POST, the
//! manner of each base, `/bulk-data/r4/metadata` and the CapabilityStatement, and the
//! parameters `_typeFilter`, `_elements`, `patient` and the accepted hints. The last section
//! repeats every assertion of the Inferno Bulk Data v2.0.0 server suite that runs over plain
//! HTTP, for each level on both bases.

mod common;

use std::collections::BTreeSet;

use serde_json::{json, Value};

use common::*;

const BASES: [&str; 2] = ["/r4", "/bulk-data/r4"];

/// A tenant with two patients in a Group, a third patient outside it, clinical data for each,
/// and resources outside every patient compartment.
struct Fixture {
    client: Client,
    /// (member a, member b, non-member c)
    patients: [String; 3],
    group: String,
}

async fn fixture(server: &Server) -> Fixture {
    let client = server.tenant_client("acme");
    let mut ids = Vec::new();
    for family in ["Alpha", "Beta", "Gamma"] {
        ids.push(id_of(&server.create(&client, patient(family)).await));
    }
    for (n, id) in ids.iter().enumerate() {
        for (category, code, date) in [
            ("laboratory", "2345-7", "2024-01-10"),
            ("vital-signs", "8867-4", "2024-03-05"),
            ("survey", "72166-2", "2023-06-01"),
        ] {
            let observation = json!({
                "resourceType": "Observation", "status": if n == 0 { "final" } else { "amended" },
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}],
                "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                "subject": {"reference": format!("Patient/{id}")},
                "effectiveDateTime": format!("{date}T10:00:00Z"),
                "valueString": "v"
            });
            server.create(&client, observation).await;
        }
        let condition = json!({"resourceType": "Condition", "subject": {"reference": format!("Patient/{id}")},
                               "code": {"text": "c"}, "onsetDateTime": "2020-05-01"});
        server.create(&client, condition).await;
    }
    for (resource_type, id) in [("Practitioner", "dr1"), ("Organization", "org1")] {
        let reply = server
            .send(
                put(&format!("/r4/{resource_type}/{id}"))
                    .by(&client)
                    .json(&json!({"resourceType": resource_type, "id": id})),
            )
            .await;
        assert!(reply.status.is_success(), "{}", reply.text());
    }
    let group = id_of(&server.create(&client, group_of(&[&ids[0], &ids[1]])).await);
    Fixture { client, patients: [ids[0].clone(), ids[1].clone(), ids[2].clone()], group }
}

fn kick_off_path(base: &str, level: &str, fixture: &Fixture) -> String {
    match level {
        "system" => format!("{base}/$export"),
        "patient" => format!("{base}/Patient/$export"),
        _ => format!("{base}/Group/{}/$export", fixture.group),
    }
}

/// `Type/id` of every exported resource (each exactly once).
async fn exported(server: &Server, client: &Client, manifest: &Value) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (_, resource) in server.output_lines(client, manifest).await {
        let key = format!("{}/{}", resource["resourceType"].as_str().unwrap(), resource["id"].as_str().unwrap());
        assert!(found.insert(key.clone()), "{key} exported twice");
    }
    found
}

fn of_type<'a>(found: &'a BTreeSet<String>, resource_type: &str) -> Vec<&'a String> {
    found.iter().filter(|key| key.starts_with(&format!("{resource_type}/"))).collect()
}

fn parameters(entries: &[(&str, Value)]) -> Value {
    let parameter: Vec<Value> = entries
        .iter()
        .map(|(name, value)| {
            let mut entry = json!({"name": name});
            match value {
                Value::Object(_) => entry["valueReference"] = value.clone(),
                other => entry["valueString"] = other.clone(),
            }
            entry
        })
        .collect();
    json!({"resourceType": "Parameters", "parameter": parameter})
}

// ---------------------------------------------------------------------------------------------
// Levels and manners
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn each_level_exports_what_it_covers_on_both_bases_by_get_and_post() {
    let server = Server::start();
    let f = fixture(&server).await;
    let [a, b, c] = &f.patients;
    for base in BASES {
        for by_post in [false, true] {
            let call = |path: &str| match by_post {
                false => get(path).by(&f.client),
                true => post(path).by(&f.client).json(&parameters(&[])),
            };
            let what = format!("{base} post={by_post}");
            let system = server.manifest_of(&f.client, call(&kick_off_path(base, "system", &f))).await;
            let found = exported(&server, &f.client, &system).await;
            assert_eq!(of_type(&found, "Patient").len(), 3, "{what}: system export has every Patient");
            assert_eq!(of_type(&found, "Observation").len(), 9, "{what}");
            assert!(
                found.contains("Practitioner/dr1") && found.contains("Organization/org1"),
                "{what}: non-compartment types"
            );
            assert!(found.contains(&format!("Group/{}", f.group)), "{what}: Groups are a type like any other");

            let patients = server.manifest_of(&f.client, call(&kick_off_path(base, "patient", &f))).await;
            let found = exported(&server, &f.client, &patients).await;
            for p in [a, b, c] {
                assert!(found.contains(&format!("Patient/{p}")), "{what}");
            }
            assert_eq!(of_type(&found, "Observation").len(), 9, "{what}");
            assert_eq!(of_type(&found, "Condition").len(), 3, "{what}");
            assert!(
                of_type(&found, "Group").is_empty() && of_type(&found, "Practitioner").is_empty(),
                "{what}: {found:?}"
            );

            let group = server.manifest_of(&f.client, call(&kick_off_path(base, "group", &f))).await;
            let found = exported(&server, &f.client, &group).await;
            assert!(!found.contains(&format!("Patient/{c}")), "{what}: a non-member");
            assert_eq!(of_type(&found, "Observation").len(), 6, "{what}");
            assert!(found.contains(&format!("Group/{}", f.group)));
            // STU2 manifest `request`: a GET's full URL; a POST's without parameters.
            assert_eq!(group["request"], json!(format!("{BASE}{}", kick_off_path(base, "group", &f))), "{what}");
        }
    }
}

#[tokio::test]
async fn the_standard_base_is_always_asynchronous_and_the_bulk_data_base_keeps_the_1uphealth_manner() {
    let server = Server::start();
    let f = fixture(&server).await;
    for level in ["system", "patient", "group"] {
        let reply = server.send(get(&kick_off_path("/r4", level, &f)).by(&f.client)).await;
        assert_status(&reply, 202);
        assert!(reply.header("content-location").starts_with(&format!("{BASE}/")), "{level}: absolute");
        let reply = server.send(get(&kick_off_path("/bulk-data/r4", level, &f)).by(&f.client)).await;
        assert_status(&reply, 200);
        assert_eq!(reply.header("content-type"), "application/json");
        let reply = server.send(get(&kick_off_path("/bulk-data/r4", level, &f)).by(&f.client).respond_async()).await;
        assert_status(&reply, 202);
    }
}

#[tokio::test]
async fn bulk_data_metadata_declares_every_level_and_nothing_more() {
    let server = Server::start();
    for path in ["/r4/metadata", "/bulk-data/r4/metadata"] {
        let reply = server.send(get(path)).await;
        assert_status(&reply, 200);
        let capability = reply.json();
        let instantiates = capability["instantiates"].as_array().unwrap();
        assert!(instantiates.iter().any(|url| url
            .as_str()
            .unwrap()
            .starts_with("http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data")));
        let rest = capability["rest"].as_array().unwrap();
        assert_eq!(rest.len(), 1, "one rest entry");
        let operations = rest[0]["operation"].as_array().unwrap();
        assert_eq!(operations.len(), 1);
        assert_eq!(operations[0]["name"], "export");
        assert_eq!(operations[0]["definition"], "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export");
        for resource in rest[0]["resource"].as_array().unwrap() {
            let expected = match resource["type"].as_str().unwrap() {
                "Group" => Some("group-export"),
                "Patient" => Some("patient-export"),
                _ => None,
            };
            let operation = resource.get("operation").and_then(Value::as_array);
            match expected {
                Some(definition) => {
                    let operation = &operation.unwrap()[0];
                    assert_eq!(operation["name"], "export");
                    assert_eq!(
                        operation["definition"],
                        json!(format!("http://hl7.org/fhir/uv/bulkdata/OperationDefinition/{definition}"))
                    );
                    assert!(operation["documentation"].as_str().unwrap().contains("_typeFilter"));
                }
                None => assert!(operation.is_none(), "{}: no export there", resource["type"]),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn type_filter_narrows_exactly_and_client_defaults_work() {
    let server = Server::start();
    let f = fixture(&server).await;
    for base in BASES {
        // What clients send by default: several categories OR'ed, commas encoded or not.
        for filter in [
            "Observation%3Fcategory%3Dlaboratory%2Cvital-signs",
            "Observation?category=laboratory,vital-signs",
            "Observation%3Fcategory%3Dlaboratory&_typeFilter=Observation%3Fcategory%3Dvital-signs",
        ] {
            let path = format!("{}?_typeFilter={filter}", kick_off_path(base, "system", &f));
            let manifest = server.manifest_of(&f.client, get(&path).by(&f.client)).await;
            let found = exported(&server, &f.client, &manifest).await;
            assert_eq!(of_type(&found, "Observation").len(), 6, "{path}");
            assert_eq!(of_type(&found, "Condition").len(), 3, "{path}: other types are not filtered");
        }
        let subject_filter = format!("Observation%3Fsubject%3DPatient%2F{}", f.patients[1]);
        let cases = [
            ("Observation%3Fcode%3Dhttp%3A%2F%2Floinc.org%7C8867-4", 3),
            ("Observation%3Fstatus%3Dfinal%26date%3Dge2024-01-01", 2),
            (subject_filter.as_str(), 3),
            ("Observation%3Fdate%3Dlt2024", 3),
            ("Observation%3F_lastUpdated%3Dgt2000-01-01", 9),
        ];
        for (filter, count) in cases {
            let path = format!("{}?_type=Observation&_typeFilter={filter}", kick_off_path(base, "patient", &f));
            let manifest = server.manifest_of(&f.client, get(&path).by(&f.client)).await;
            let total: u64 =
                manifest["output"].as_array().unwrap().iter().map(|item| item["count"].as_u64().unwrap()).sum();
            assert_eq!(total, count, "{path}: manifest count");
            assert_eq!(exported(&server, &f.client, &manifest).await.len() as u64, count, "{path}: lines");
        }
        let path = format!("{}?_typeFilter=Condition%3Fonset-date%3Dge2020-01-01", kick_off_path(base, "group", &f));
        let found = exported(&server, &f.client, &server.manifest_of(&f.client, get(&path).by(&f.client)).await).await;
        assert_eq!(of_type(&found, "Condition").len(), 2);
    }
}

#[tokio::test]
async fn unsupported_type_filters_are_400_or_listed_in_error_when_lenient() {
    let server = Server::start();
    let f = fixture(&server).await;
    for base in BASES {
        let path = format!("{}?_typeFilter=Observation%3Fvalue-quantity%3D5", kick_off_path(base, "system", &f));
        assert_outcome(&server.send(get(&path).by(&f.client)).await, 400, "not-supported", Some("_typeFilter"));
        let lenient = get(&path).by(&f.client).header("prefer", "handling=lenient");
        let manifest = server.manifest_of(&f.client, lenient).await;
        assert_eq!(manifest["error"].as_array().unwrap().len(), 1, "{manifest}");
        let lines = server.download_lines(&f.client, manifest["error"][0]["url"].as_str().unwrap()).await;
        assert_eq!(lines.len(), 1);
        assert!(lines[0].contains("value-quantity") && lines[0].contains("warning"), "{}", lines[0]);
        let found = exported(&server, &f.client, &manifest).await;
        assert_eq!(of_type(&found, "Observation").len(), 9, "the ignored filter narrows nothing");
        let malformed = format!("{}?_typeFilter=Observation", kick_off_path(base, "system", &f));
        let reply = server.send(get(&malformed).by(&f.client).header("prefer", "handling=lenient")).await;
        assert_outcome(&reply, 400, "value", Some("_typeFilter"));
    }
}

/// Patient and Group exports deliver Provenance and non-compartment types only as associated
/// data, found from the cohort before `_typeFilter`: a filter on them is refused (lenient:
/// ignored with a warning), and a filter on Patient does not drop the Provenance of the Patients
/// it leaves out, nor what they reference. The system level filters those types like any other.
#[tokio::test]
async fn type_filters_narrow_compartment_data_not_associated_data() {
    let server = Server::start();
    let f = fixture(&server).await;
    let [a, b, _] = &f.patients;
    for patient in [a, b] {
        let provenance = json!({
            "resourceType": "Provenance", "id": format!("pro-{patient}"),
            "target": [{"reference": format!("Patient/{patient}")}], "recorded": "2024-01-01T00:00:00Z",
            "agent": [{"who": {"reference": "Practitioner/dr1"}}]
        });
        let reply = server.send(put(&format!("/r4/Provenance/pro-{patient}")).by(&f.client).json(&provenance)).await;
        assert!(reply.status.is_success(), "{}", reply.text());
    }
    // Beta is managed by org1: it comes as a referenced resource even when Beta is filtered out.
    let mut beta = patient("Beta");
    beta["id"] = json!(b);
    beta["managingOrganization"] = json!({"reference": "Organization/org1"});
    let reply = server.send(put(&format!("/r4/Patient/{b}")).by(&f.client).json(&beta)).await;
    assert!(reply.status.is_success(), "{}", reply.text());
    let both = BTreeSet::from([format!("Provenance/pro-{a}"), format!("Provenance/pro-{b}")]);
    for base in BASES {
        for level in ["patient", "group"] {
            let path = format!("{}?_typeFilter=Patient%3Ffamily%3DAlpha", kick_off_path(base, level, &f));
            let found =
                exported(&server, &f.client, &server.manifest_of(&f.client, get(&path).by(&f.client)).await).await;
            assert_eq!(of_type(&found, "Patient"), [&format!("Patient/{a}")], "{path}");
            let provenance: BTreeSet<String> = of_type(&found, "Provenance").into_iter().cloned().collect();
            assert_eq!(provenance, both, "{path}: Provenance of every member Patient, filtered out or not");
            assert!(found.contains("Organization/org1") && found.contains("Practitioner/dr1"), "{path}: {found:?}");
            for filter in ["Provenance%3Fpatient%3DPatient%2F", "Practitioner%3Fname%3Dx"] {
                let filter = if filter.starts_with("Provenance") { format!("{filter}{a}") } else { filter.to_owned() };
                let path = format!("{}?_typeFilter={filter}", kick_off_path(base, level, &f));
                let reply = server.send(get(&path).by(&f.client)).await;
                let outcome = assert_outcome(&reply, 400, "not-supported", Some("_typeFilter"));
                assert!(outcome.to_string().contains("only as associated data"), "{path}: {outcome}");
                let lenient = get(&path).by(&f.client).header("prefer", "handling=lenient");
                let manifest = server.manifest_of(&f.client, lenient).await;
                assert_eq!(manifest["error"].as_array().unwrap().len(), 1, "{path}: {manifest}");
                let lines = server.download_lines(&f.client, manifest["error"][0]["url"].as_str().unwrap()).await;
                assert!(lines.len() == 1 && lines[0].contains("only as associated data"), "{path}: {lines:?}");
                let found = exported(&server, &f.client, &manifest).await;
                let provenance: BTreeSet<String> = of_type(&found, "Provenance").into_iter().cloned().collect();
                assert_eq!(provenance, both, "{path}: the ignored filter narrows nothing");
            }
        }
        // The system level exports Provenance as a type like any other: the filter applies.
        let path = format!("{}?_typeFilter=Provenance%3Fpatient%3DPatient%2F{a}", kick_off_path(base, "system", &f));
        let manifest = server.manifest_of(&f.client, get(&path).by(&f.client)).await;
        assert_eq!(manifest["error"], json!([]), "{path}");
        let found = exported(&server, &f.client, &manifest).await;
        assert_eq!(of_type(&found, "Provenance"), [&format!("Provenance/pro-{a}")], "{path}");
    }
}

#[tokio::test]
async fn elements_keep_listed_mandatory_id_and_meta_and_tag_subsetted() {
    let server = Server::start();
    let f = fixture(&server).await;
    for base in BASES {
        // The Group membership pattern (Bulk Data IG §2.6): `_type=Patient&_elements=id`.
        let path = format!("{}?_type=Patient&_elements=id", kick_off_path(base, "group", &f));
        let manifest = server.manifest_of(&f.client, get(&path).by(&f.client)).await;
        let lines = server.output_lines(&f.client, &manifest).await;
        assert_eq!(lines.len(), 2);
        for (_, resource) in lines {
            let keys: BTreeSet<&str> = resource.as_object().unwrap().keys().map(String::as_str).collect();
            assert_eq!(keys, BTreeSet::from(["resourceType", "id", "meta"]), "{resource}");
            assert!(resource["meta"]["versionId"].is_string(), "meta is kept");
            let tags = resource["meta"]["tag"].as_array().unwrap();
            assert!(tags.iter().any(|tag| tag["code"] == "SUBSETTED"), "{resource}");
        }
        let path =
            format!("{}?_type=Observation,Condition&_elements=Observation.subject", kick_off_path(base, "system", &f));
        let manifest = server.manifest_of(&f.client, get(&path).by(&f.client)).await;
        for (_, resource) in server.output_lines(&f.client, &manifest).await {
            match resource["resourceType"].as_str().unwrap() {
                "Observation" => {
                    assert!(
                        resource.get("subject").is_some()
                            && resource.get("status").is_some()
                            && resource.get("code").is_some()
                    );
                    assert!(resource.get("valueString").is_none() && resource.get("category").is_none(), "{resource}");
                }
                _ => assert!(resource.get("onsetDateTime").is_some(), "types not named are whole: {resource}"),
            }
        }
        let path = format!("{}?_elements=Patient.name.given", kick_off_path(base, "system", &f));
        assert_outcome(&server.send(get(&path).by(&f.client)).await, 400, "value", Some("_elements"));
    }
}

#[tokio::test]
async fn patient_restricts_post_exports_and_must_be_a_member() {
    let server = Server::start();
    let f = fixture(&server).await;
    let [a, b, c] = &f.patients;
    for base in BASES {
        let only_b = parameters(&[("patient", json!({"reference": format!("Patient/{b}")}))]);
        for level in ["group", "patient"] {
            let call = post(&kick_off_path(base, level, &f)).by(&f.client).json(&only_b);
            let found = exported(&server, &f.client, &server.manifest_of(&f.client, call).await).await;
            assert_eq!(of_type(&found, "Patient"), [&format!("Patient/{b}")], "{base} {level}");
            assert_eq!(of_type(&found, "Observation").len(), 3, "{base} {level}");
        }
        // Patient-level: any Patient of the tenant; Group-level: members only.
        let only_c = parameters(&[("patient", json!({"reference": format!("Patient/{c}")}))]);
        let call = post(&kick_off_path(base, "patient", &f)).by(&f.client).json(&only_c);
        assert_eq!(
            of_type(&exported(&server, &f.client, &server.manifest_of(&f.client, call).await).await, "Patient").len(),
            1
        );
        let reply = server.send(post(&kick_off_path(base, "group", &f)).by(&f.client).json(&only_c)).await;
        assert_outcome(&reply, 400, "value", None);
        assert!(reply.text().contains(c.as_str()), "{}", reply.text());
        // POST-only.
        let path = format!("{}?patient=Patient/{a}", kick_off_path(base, "group", &f));
        assert_outcome(&server.send(get(&path).by(&f.client)).await, 400, "not-supported", Some("patient"));
        // Other POST parameters travel in the body too.
        let body = parameters(&[("_type", json!("Patient")), ("_outputFormat", json!("ndjson"))]);
        let call = post(&kick_off_path(base, "system", &f)).by(&f.client).json(&body);
        let found = exported(&server, &f.client, &server.manifest_of(&f.client, call).await).await;
        assert_eq!(found.len(), 3, "{found:?}");
        for bad in [
            json!({"resourceType": "Patient"}),
            json!({"resourceType": "Parameters", "parameter": [{"name": "_type"}]}),
        ] {
            let reply = server.send(post(&kick_off_path(base, "system", &f)).by(&f.client).json(&bad)).await;
            assert_outcome(&reply, 400, "invalid", None);
        }
    }
}

#[tokio::test]
async fn size_and_partial_manifest_hints_are_accepted() {
    let server = Server::start();
    let f = fixture(&server).await;
    for base in BASES {
        let path = format!(
            "{}?allowPartialManifests=true&_minimumFileSize=1&_maximumFileSize=100000000",
            kick_off_path(base, "group", &f)
        );
        let manifest = server.manifest_of(&f.client, get(&path).by(&f.client)).await;
        assert_eq!(manifest["error"], json!([]), "hints are not warnings");
    }
}

// ---------------------------------------------------------------------------------------------
// The Inferno Bulk Data v2.0.0 server suite, over plain HTTP, per level and base
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn inferno_export_assertions_hold_at_every_level_on_both_bases() {
    let server = Server::start();
    let f = fixture(&server).await;
    for base in BASES {
        for level in ["system", "patient", "group"] {
            let path = kick_off_path(base, level, &f);
            let what = path.clone();
            // x.1.02 no_auth_reject: 400 or 401, never 403.
            let reply = server.send(get(&path).respond_async()).await;
            assert!(matches!(reply.status.as_u16(), 400 | 401), "{what}: {}", reply.status);
            // x.1.03 kick_off: 202 with an absolute Content-Location.
            let reply = server.send(get(&path).by(&f.client).respond_async()).await;
            assert_status(&reply, 202);
            let location = reply.header("content-location").to_owned();
            assert!(location.starts_with("http://") || location.starts_with("https://"), "{what}: {location}");
            // x.1.04 status_check: 200, application/json, the five STU2 keys.
            let mut manifest = Value::Null;
            for _ in 0..200 {
                let poll = server.send(get(&local(&location)).by(&f.client).header("accept", "application/json")).await;
                if poll.status.as_u16() == 202 {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
                assert_status(&poll, 200);
                assert!(poll.header("content-type").contains("application/json"), "{what}");
                manifest = poll.json();
                break;
            }
            for key in ["transactionTime", "request", "requiresAccessToken", "output", "error"] {
                assert!(manifest.get(key).is_some(), "{what}: manifest lacks {key}: {manifest}");
            }
            // x.1.05 output_check: every item has type and an absolute url.
            let output = manifest["output"].as_array().unwrap();
            assert!(!output.is_empty(), "{what}");
            for item in output {
                assert!(item["type"].is_string(), "{what}");
                assert!(item["url"].as_str().unwrap().starts_with("http"), "{what}");
            }
            // x.2.02 ndjson_download: requiresAccessToken true, so no credentials → 400/401.
            assert_eq!(manifest["requiresAccessToken"], json!(true));
            let first = local(output[0]["url"].as_str().unwrap());
            let reply = server.send(get(&first).header("accept", "application/fhir+ndjson")).await;
            assert!(matches!(reply.status.as_u16(), 400 | 401), "{what}: {}", reply.status);
            // x.2.03 valid_resources (resourceType per line) and x.2.04 multiple_patients.
            let lines = server.output_lines(&f.client, &manifest).await;
            let patients: BTreeSet<&str> = lines
                .iter()
                .filter(|(_, resource)| resource["resourceType"] == "Patient")
                .map(|(_, resource)| resource["id"].as_str().unwrap())
                .collect();
            assert!(patients.len() >= 2, "{what}: {patients:?}");
            // x.3.01/02 cancel: DELETE 202, then the status URL is a 404 OperationOutcome.
            let reply = server.send(get(&path).by(&f.client).respond_async()).await;
            let status_url = local(reply.header("content-location"));
            let reply = server.send(delete(&status_url).by(&f.client).header("accept", "application/json")).await;
            assert_status(&reply, 202);
            let reply = server.send(get(&status_url).by(&f.client)).await;
            assert_outcome(&reply, 404, "not-found", None);
            // x.4.01 _outputFormat spellings and x.4.02 _since (Z, offset, fraction): 202 then DELETE 202.
            for query in [
                "_outputFormat=application%2Ffhir%2Bndjson",
                "_outputFormat=application%2Fndjson",
                "_outputFormat=ndjson",
                "_since=2024-01-01T00:00:00Z",
                "_since=2024-01-01T00:00:00%2B02:00",
                "_since=2024-01-01T00:00:00.123-05:00",
            ] {
                let reply = server.send(get(&format!("{path}?{query}")).by(&f.client).respond_async()).await;
                assert_status(&reply, 202);
                let status_url = local(reply.header("content-location"));
                assert_status(&server.send(delete(&status_url).by(&f.client)).await, 202);
            }
        }
    }
}
