//! Tier-2 tests (the harness is in `common/mod.rs`) of transaction and batch Bundles
//! (Synthea-style loads, atomicity, conditional create, size) and Group export through HTTP: the
//! compartment index seen from a one-patient export, kick-off refusals, lenient mode, and the
//! signed file URLs.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use common::*;

const SYNTHEA: &str = "https://github.com/synthetichealth/synthea";

fn urn() -> String {
    format!("urn:uuid:{}", uuid::Uuid::new_v4())
}

fn reference(full_url: &str) -> Value {
    json!({"reference": full_url})
}

fn post_entry(full_url: &str, resource: Value, if_none_exist: Option<String>) -> Value {
    let resource_type = resource["resourceType"].as_str().expect("resourceType").to_owned();
    let mut request = json!({"method": "POST", "url": resource_type});
    if let Some(condition) = if_none_exist {
        request["ifNoneExist"] = json!(condition);
    }
    json!({"fullUrl": full_url, "resource": resource, "request": request})
}

fn transaction(entries: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

/// One patient's record as Synthea writes it: every entry POSTed under a `urn:uuid:` fullUrl,
/// every reference pointing at those fullUrls; the Patient, Organization and Practitioner are
/// conditional creates (`ifNoneExist`), as in Synthea's shared-resource bundles.
fn synthea_record(family: &str, mrn: &str) -> Value {
    let [patient, org, doctor, encounter, glucose, bmi, condition, procedure, medication, immunization, report, care_plan, care_team, allergy, document, claim, eob] =
        std::array::from_fn(|_| urn());
    let coding = |system: &str, code: &str, display: &str| json!({"coding": [{"system": system, "code": code, "display": display}], "text": display});
    let snomed = "http://snomed.info/sct";
    let loinc = "http://loinc.org";
    let patient_ref = reference(&patient);
    let encounter_ref = reference(&encounter);
    let observation = |code: &str, display: &str, value: f64, unit: &str| {
        json!({
            "resourceType": "Observation", "status": "final",
            "category": [coding("http://terminology.hl7.org/CodeSystem/observation-category", "laboratory", "laboratory")],
            "code": coding(loinc, code, display), "subject": patient_ref, "encounter": encounter_ref,
            "effectiveDateTime": "2019-03-04T10:00:00-05:00", "issued": "2019-03-04T10:00:00.123-05:00",
            "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
        })
    };
    let entries = vec![
        post_entry(
            &patient,
            json!({
                "resourceType": "Patient",
                "identifier": [{"system": SYNTHEA, "value": mrn}],
                "name": [{"use": "official", "family": family, "given": ["Ana"]}],
                "gender": "female", "birthDate": "1970-05-01",
                "address": [{"city": "Boston", "state": "MA", "country": "US"}],
            }),
            Some(format!("identifier={SYNTHEA}|{mrn}")),
        ),
        post_entry(
            &org,
            json!({"resourceType": "Organization", "identifier": [{"system": SYNTHEA, "value": "org-pcp-1"}], "name": "PCP Clinic", "active": true}),
            Some(format!("identifier={SYNTHEA}|org-pcp-1")),
        ),
        post_entry(
            &doctor,
            json!({"resourceType": "Practitioner", "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "9999912345"}], "name": [{"family": "Doctor"}]}),
            Some("identifier=http://hl7.org/fhir/sid/us-npi|9999912345".into()),
        ),
        post_entry(
            &encounter,
            json!({
                "resourceType": "Encounter", "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                "type": [coding(snomed, "185349003", "Encounter for check up")],
                "subject": patient_ref, "participant": [{"individual": reference(&doctor)}],
                "period": {"start": "2019-03-04T09:00:00-05:00", "end": "2019-03-04T09:30:00-05:00"},
                "serviceProvider": reference(&org),
            }),
            None,
        ),
        post_entry(&glucose, observation("2339-0", "Glucose", 93.0, "mg/dL"), None),
        post_entry(&bmi, observation("39156-5", "Body mass index", 27.1, "kg/m2"), None),
        post_entry(
            &condition,
            json!({
                "resourceType": "Condition",
                "clinicalStatus": coding("http://terminology.hl7.org/CodeSystem/condition-clinical", "active", "active"),
                "verificationStatus": coding("http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed", "confirmed"),
                "code": coding(snomed, "44054006", "Diabetes"), "subject": patient_ref, "encounter": encounter_ref,
                "onsetDateTime": "2019-03-04T09:00:00-05:00",
            }),
            None,
        ),
        post_entry(
            &procedure,
            json!({
                "resourceType": "Procedure", "status": "completed", "code": coding(snomed, "430193006", "Medication reconciliation"),
                "subject": patient_ref, "encounter": encounter_ref,
                "performedPeriod": {"start": "2019-03-04T09:00:00-05:00", "end": "2019-03-04T09:15:00-05:00"},
            }),
            None,
        ),
        post_entry(
            &medication,
            json!({
                "resourceType": "MedicationRequest", "status": "active", "intent": "order",
                "medicationCodeableConcept": coding("http://www.nlm.nih.gov/research/umls/rxnorm", "860975", "metformin"),
                "subject": patient_ref, "encounter": encounter_ref, "authoredOn": "2019-03-04T09:00:00-05:00",
                "requester": reference(&doctor), "reasonReference": [reference(&condition)],
            }),
            None,
        ),
        post_entry(
            &immunization,
            json!({
                "resourceType": "Immunization", "status": "completed",
                "vaccineCode": coding("http://hl7.org/fhir/sid/cvx", "140", "Influenza"),
                "patient": patient_ref, "encounter": encounter_ref, "occurrenceDateTime": "2019-03-04T09:00:00-05:00", "primarySource": true,
            }),
            None,
        ),
        post_entry(
            &report,
            json!({
                "resourceType": "DiagnosticReport", "status": "final", "code": coding(loinc, "51990-0", "Basic metabolic panel"),
                "subject": patient_ref, "encounter": encounter_ref, "effectiveDateTime": "2019-03-04T10:00:00-05:00",
                "result": [reference(&glucose), reference(&bmi)],
            }),
            None,
        ),
        post_entry(
            &care_plan,
            json!({
                "resourceType": "CarePlan", "status": "active", "intent": "order", "subject": patient_ref, "encounter": encounter_ref,
                "careTeam": [reference(&care_team)], "addresses": [reference(&condition)],
            }),
            None,
        ),
        post_entry(
            &care_team,
            json!({
                "resourceType": "CareTeam", "status": "active", "subject": patient_ref, "encounter": encounter_ref,
                "participant": [{"member": patient_ref}, {"member": reference(&doctor)}], "managingOrganization": [reference(&org)],
            }),
            None,
        ),
        post_entry(
            &allergy,
            json!({
                "resourceType": "AllergyIntolerance", "type": "allergy", "category": ["food"],
                "code": coding(snomed, "91935009", "Peanut allergy"), "patient": patient_ref,
            }),
            None,
        ),
        post_entry(
            &document,
            json!({
                "resourceType": "DocumentReference", "status": "current", "type": coding(loinc, "34117-2", "History and physical note"),
                "subject": patient_ref, "author": [reference(&doctor)],
                "content": [{"attachment": {"contentType": "text/plain", "data": "Tm90ZQ=="}}],
                "context": {"encounter": [encounter_ref]},
            }),
            None,
        ),
        post_entry(
            &claim,
            json!({
                "resourceType": "Claim", "status": "active", "use": "claim",
                "type": coding("http://terminology.hl7.org/CodeSystem/claim-type", "professional", "professional"),
                "patient": patient_ref, "created": "2019-03-04T09:30:00-05:00", "provider": reference(&org),
                "priority": coding("http://terminology.hl7.org/CodeSystem/processpriority", "normal", "normal"),
                "diagnosis": [{"sequence": 1, "diagnosisReference": reference(&condition)}],
                "procedure": [{"sequence": 1, "procedureReference": reference(&procedure)}],
                "insurance": [{"sequence": 1, "focal": true, "coverage": {"display": "Cigna Health"}}],
                "item": [{"sequence": 1, "productOrService": coding(snomed, "185349003", "Check up"), "encounter": [encounter_ref]}],
                "total": {"value": 129.16, "currency": "USD"},
            }),
            None,
        ),
        post_entry(
            &eob,
            json!({
                "resourceType": "ExplanationOfBenefit", "status": "active", "use": "claim", "outcome": "complete",
                "type": coding("http://terminology.hl7.org/CodeSystem/claim-type", "professional", "professional"),
                "patient": patient_ref, "created": "2019-03-04T09:30:00-05:00", "insurer": {"display": "Cigna Health"},
                "provider": reference(&doctor), "claim": reference(&claim),
                "insurance": [{"focal": true, "coverage": {"display": "Cigna Health"}}],
                "item": [{"sequence": 1, "productOrService": coding(snomed, "185349003", "Check up"), "encounter": [encounter_ref]}],
            }),
            None,
        ),
    ];
    transaction(entries)
}

/// What a transaction created: `(fullUrl, "Type/id")` in entry order.
struct Loaded {
    entries: Vec<(String, String)>,
}

impl Loaded {
    fn by_full_url(&self) -> HashMap<String, String> {
        self.entries.iter().cloned().collect()
    }

    fn of_type(&self, resource_type: &str) -> Vec<String> {
        self.entries
            .iter()
            .map(|(_, target)| target.clone())
            .filter(|target| target.starts_with(&format!("{resource_type}/")))
            .collect()
    }

    fn patient_id(&self) -> String {
        self.of_type("Patient")[0].trim_start_matches("Patient/").to_owned()
    }
}

/// POSTs a transaction, checks the transaction-response, and returns where each entry went.
async fn load(server: &Server, client: &Client, bundle: &Value) -> Loaded {
    let reply = server.send(post("/r4").by(client).json(bundle)).await;
    assert_status(&reply, 200);
    let response = reply.json();
    assert_eq!(response["type"], "transaction-response");
    let request_entries = bundle["entry"].as_array().unwrap();
    let response_entries = response["entry"].as_array().unwrap();
    assert_eq!(response_entries.len(), request_entries.len());
    let entries = request_entries
        .iter()
        .zip(response_entries)
        .map(|(request, response)| {
            let status = response["response"]["status"].as_str().unwrap();
            assert!(status == "201 Created" || status == "200 OK", "{response}");
            let location = response["response"]["location"].as_str().unwrap();
            let (target, _) = location.split_once("/_history/").expect("versioned location");
            assert!(target.starts_with(request["resource"]["resourceType"].as_str().unwrap()), "{location}");
            (request["fullUrl"].as_str().unwrap().to_owned(), target.to_owned())
        })
        .collect();
    Loaded { entries }
}

fn collect_references(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(object) => {
            for (key, child) in object {
                match (key.as_str(), child) {
                    ("reference", Value::String(reference)) => found.push(reference.clone()),
                    _ => collect_references(child, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_references(item, found)),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Bundles
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn synthea_transaction_loads_with_references_rewritten() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let bundle = synthea_record("Alvarez", "mrn-1");
    let loaded = load(&server, &client, &bundle).await;
    let targets: BTreeSet<String> = loaded.entries.iter().map(|(_, target)| target.clone()).collect();
    assert_eq!(targets.len(), bundle["entry"].as_array().unwrap().len(), "every entry got its own id");

    for ((full_url, target), request) in loaded.entries.iter().zip(bundle["entry"].as_array().unwrap()) {
        let reply = server.send(get(&format!("/r4/{target}")).by(&client)).await;
        assert_status(&reply, 200);
        let stored = reply.json();
        assert_eq!(format!("{}/{}", stored["resourceType"].as_str().unwrap(), stored["id"].as_str().unwrap()), *target);
        assert!(!target.contains(full_url.trim_start_matches("urn:uuid:")), "the server assigns new ids");
        let mut references = Vec::new();
        collect_references(&stored, &mut references);
        for reference in &references {
            assert!(
                targets.contains(reference),
                "{target}: reference '{reference}' was not rewritten to a loaded resource"
            );
        }
        // Apart from references, id and meta, the stored resource is what was sent.
        let mut sent = request["resource"].clone();
        let mut kept = stored.clone();
        kept.as_object_mut().unwrap().remove("meta");
        kept.as_object_mut().unwrap().remove("id");
        bulkhead_http::bundle::rewrite_references(&mut sent, &loaded.by_full_url());
        assert_eq!(kept, sent, "{target}");
    }
    let patient = format!("Patient/{}", loaded.patient_id());
    let encounter = server.send(get(&format!("/r4/{}", loaded.of_type("Encounter")[0])).by(&client)).await.json();
    assert_eq!(encounter["subject"]["reference"], json!(patient));
    let report = server.send(get(&format!("/r4/{}", loaded.of_type("DiagnosticReport")[0])).by(&client)).await.json();
    assert_eq!(
        report["result"],
        json!(loaded.of_type("Observation").iter().map(|o| json!({"reference": o})).collect::<Vec<_>>())
    );
    let by_patient = server.search_all(&client, &format!("/r4/Observation?patient={}", loaded.patient_id())).await;
    assert_eq!(by_patient.len(), 2);
}

#[tokio::test]
async fn transaction_with_one_bad_entry_stores_nothing() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let types = [
        "Patient",
        "Organization",
        "Practitioner",
        "Encounter",
        "Observation",
        "Condition",
        "Claim",
        "ExplanationOfBenefit",
    ];

    // Invalid last entry: refused before anything is written.
    let mut bundle = synthea_record("Broken", "mrn-broken");
    let last = bundle["entry"].as_array().unwrap().len();
    bundle["entry"].as_array_mut().unwrap().push(post_entry(
        &urn(),
        json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": "Nope/1"}}),
        None,
    ));
    let reply = server.send(post("/r4").by(&client).json(&bundle)).await;
    assert_outcome(&reply, 422, "value", Some(&format!("Bundle.entry[{last}].resource.subject.reference")));
    assert!(server.stored_state(&client, &types).await.is_empty());

    // Valid entries, but one fails in the store (deleting what does not exist): rolled back.
    let mut bundle = synthea_record("Rollback", "mrn-rollback");
    bundle["entry"]
        .as_array_mut()
        .unwrap()
        .push(json!({"request": {"method": "DELETE", "url": "Patient/does-not-exist"}}));
    let reply = server.send(post("/r4").by(&client).json(&bundle)).await;
    assert_outcome(&reply, 404, "not-found", None);
    assert!(server.stored_state(&client, &types).await.is_empty());

    // A stale ifMatch in a transaction: 412, nothing written.
    let existing = server.create(&client, patient("Existing")).await;
    let before = server.stored_state(&client, &types).await;
    let mut changed = existing.clone();
    changed["gender"] = json!("other");
    let bundle = transaction(vec![
        post_entry(&urn(), patient("New"), None),
        json!({"resource": changed, "request": {"method": "PUT", "url": format!("Patient/{}", existing["id"].as_str().unwrap()), "ifMatch": "W/\"7\""}}),
    ]);
    let reply = server.send(post("/r4").by(&client).json(&bundle)).await;
    assert_outcome(&reply, 412, "conflict", None);
    assert_eq!(server.stored_state(&client, &types).await, before);

    // Not a transaction or batch at all.
    let reply = server
        .send(post("/r4").by(&client).json(&json!({"resourceType": "Bundle", "type": "collection", "entry": []})))
        .await;
    assert_outcome(&reply, 422, "value", Some("Bundle.type"));
    let reply = server.send(post("/r4").by(&client).json(&patient("NotABundle"))).await;
    assert_outcome(&reply, 422, "invalid", Some("resourceType"));
    assert_eq!(server.stored_state(&client, &types).await, before);
}

#[tokio::test]
async fn batch_reports_each_entry_and_keeps_the_good_ones() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let mut fixed = patient("Fixed");
    fixed["id"] = json!("fixed-id");
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        post_entry(&urn(), patient("Good"), None),
        post_entry(&urn(), json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": "Patient/"}}), None),
        {"resource": fixed, "request": {"method": "PUT", "url": "Patient/fixed-id"}},
        {"request": {"method": "DELETE", "url": "Patient/missing"}},
        {"request": {"method": "PATCH", "url": "Patient/fixed-id"}},
    ]});
    let reply = server.send(post("/r4").by(&client).json(&bundle)).await;
    assert_status(&reply, 200);
    let response = reply.json();
    let outcome = |status: &str, code: &str, diagnostics: &str, expression: &str| {
        json!({"response": {"status": status, "outcome": {"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": code, "diagnostics": diagnostics, "expression": [expression]}
        ]}}})
    };
    let expected = json!({"resourceType": "Bundle", "type": "batch-response", "entry": [
        {"response": {"status": "201 Created", "location": "Patient/<uuid>/_history/1", "etag": "W/\"1\"", "lastModified": "<instant>"}},
        outcome("422 Unprocessable Entity", "value", "'Patient/' is not a valid reference", "Bundle.entry[1].resource.subject.reference"),
        {"response": {"status": "201 Created", "location": "Patient/fixed-id/_history/1", "etag": "W/\"1\"", "lastModified": "<instant>"}},
        {"response": {"status": "404 Not Found", "outcome": {"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "not-found", "diagnostics": "Patient/missing not found"}
        ]}}},
        outcome("400 Bad Request", "not-supported", "entry method 'PATCH' is not supported in a Bundle; use POST, PUT or DELETE", "Bundle.entry[4]"),
    ]});
    assert_eq!(redact(response.clone()), expected);

    let created =
        response["entry"][0]["response"]["location"].as_str().unwrap().split("/_history/").next().unwrap().to_owned();
    assert_eq!(
        ids(&server.search_all(&client, "/r4/Patient").await),
        set(&[created.trim_start_matches("Patient/"), "fixed-id"])
    );
    assert!(server.search_all(&client, "/r4/Observation").await.is_empty());
}

#[tokio::test]
async fn conditional_create_does_not_duplicate_the_patient() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let bundle = synthea_record("Twice", "mrn-twice");
    let first = load(&server, &client, &bundle).await;
    let second = load(&server, &client, &bundle).await;

    // Patient, Organization and Practitioner matched the first load; the rest is new.
    for resource_type in ["Patient", "Organization", "Practitioner"] {
        assert_eq!(first.of_type(resource_type), second.of_type(resource_type), "{resource_type}");
        assert_eq!(server.search_all(&client, &format!("/r4/{resource_type}")).await.len(), 1, "{resource_type}");
    }
    let patients = server.search_all(&client, &format!("/r4/Patient?identifier={SYNTHEA}|mrn-twice")).await;
    assert_eq!(patients.len(), 1);
    assert_eq!(patients[0]["meta"]["versionId"], "1");
    assert_ne!(first.of_type("Encounter"), second.of_type("Encounter"));
    let encounter = server.send(get(&format!("/r4/{}", second.of_type("Encounter")[0])).by(&client)).await.json();
    assert_eq!(encounter["subject"]["reference"], json!(format!("Patient/{}", first.patient_id())));
    assert_eq!(server.search_all(&client, &format!("/r4/Encounter?patient={}", first.patient_id())).await.len(), 2);

    // The REST form: If-None-Exist on a create.
    let mut again = patients[0].clone();
    again.as_object_mut().unwrap().remove("id");
    let reply = server
        .send(
            post("/r4/Patient")
                .by(&client)
                .header("if-none-exist", &format!("identifier={SYNTHEA}|mrn-twice"))
                .json(&again),
        )
        .await;
    assert_status(&reply, 200);
    assert_eq!(reply.json(), patients[0]);
    assert_eq!(server.search_all(&client, "/r4/Patient").await.len(), 1);
}

#[tokio::test]
async fn ten_thousand_entry_transaction_loads() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let patient_url = urn();
    let mut entries = vec![post_entry(&patient_url, patient("Many"), None)];
    for index in 1..10_000 {
        let observation = json!({"resourceType": "Observation", "status": "final", "code": {"text": format!("o{index}")}, "subject": {"reference": patient_url}});
        entries.push(post_entry(&urn(), observation, None));
    }
    let bundle = transaction(entries);
    let started = Instant::now();
    let loaded = load(&server, &client, &bundle).await;
    let elapsed = started.elapsed();
    eprintln!("10,000-entry transaction: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(10), "a 10,000-entry transaction took {elapsed:?}");
    assert_eq!(loaded.entries.len(), 10_000);
    let observations = server
        .search_all(&client, &format!("/r4/Observation?subject=Patient/{}&_count=1000", loaded.patient_id()))
        .await;
    assert_eq!(observations.len(), 9_999);
}

// ---------------------------------------------------------------------------------------------
// Group export
// ---------------------------------------------------------------------------------------------

/// Kicks off a synchronous Group export and returns the manifest.
/// The manifest of an export kick-off (synchronous under `/bulk-data/r4`, polled under `/r4`).
async fn export(server: &Server, client: &Client, path_and_query: &str) -> Value {
    server.manifest_of(client, get(path_and_query).by(client)).await
}

/// Downloads a manifest file: its NDJSON lines, parsed.
async fn download(server: &Server, client: &Client, url: &str) -> Vec<Value> {
    let lines = server.download_lines(client, url).await;
    lines.iter().map(|line| serde_json::from_str(line).expect("NDJSON line")).collect()
}

/// Every `Type/id` in a manifest's `output[]` files, checking each file's type and count.
async fn exported(server: &Server, client: &Client, manifest: &Value) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (_, resource) in server.output_lines(client, manifest).await {
        let key = format!("{}/{}", resource["resourceType"].as_str().unwrap(), resource["id"].as_str().unwrap());
        assert!(found.insert(key.clone()), "{key} exported twice");
    }
    found
}

#[tokio::test]
async fn group_export_lists_each_resource_under_its_patients() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let alpha = load(&server, &client, &synthea_record("Alpha", "mrn-a")).await;
    let beta = load(&server, &client, &synthea_record("Beta", "mrn-b")).await;
    let (a, b) = (alpha.patient_id(), beta.patient_id());
    // Resources in both compartments, through parameters other than subject/patient.
    let allergy = server
        .create(&client, json!({"resourceType": "AllergyIntolerance", "patient": {"reference": format!("Patient/{a}")}, "asserter": {"reference": format!("Patient/{b}")}}))
        .await;
    let observation = server
        .create(&client, json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": format!("Patient/{a}")}, "performer": [{"reference": format!("Patient/{b}")}]}))
        .await;
    let shared: BTreeSet<String> = [&allergy, &observation]
        .iter()
        .map(|r| format!("{}/{}", r["resourceType"].as_str().unwrap(), r["id"].as_str().unwrap()))
        .collect();
    let group_a = server.create(&client, group_of(&[&a])).await["id"].as_str().unwrap().to_owned();
    let group_b = server.create(&client, group_of(&[&b])).await["id"].as_str().unwrap().to_owned();

    // Everything of the record except its non-compartment Organization and Practitioner.
    let compartment = |loaded: &Loaded| -> BTreeSet<String> {
        loaded
            .entries
            .iter()
            .map(|(_, target)| target.clone())
            .filter(|target| !target.starts_with("Organization/") && !target.starts_with("Practitioner/"))
            .collect()
    };
    let record_types: BTreeSet<String> =
        compartment(&alpha).iter().map(|target| target.split('/').next().unwrap().to_owned()).collect();
    assert_eq!(record_types.len(), 14, "the record covers 14 compartment types: {record_types:?}");

    for (group, own, other) in [(&group_a, &alpha, &beta), (&group_b, &beta, &alpha)] {
        let manifest = export(&server, &client, &format!("/r4/Group/{group}/$export")).await;
        let found = exported(&server, &client, &manifest).await;
        let mut expected = compartment(own);
        expected.extend(shared.iter().cloned());
        expected.insert(format!("Group/{group}"));
        // Without referenced resources: exactly the compartment data.
        let query = "includeAssociatedData=_noReferencedResources";
        let manifest = export(&server, &client, &format!("/r4/Group/{group}/$export?{query}")).await;
        assert_eq!(exported(&server, &client, &manifest).await, expected, "Group/{group} with {query}");
        // By default the export is self-contained: the record's Organization and Practitioner,
        // which its resources reference, come along.
        expected.extend(own.entries.iter().map(|(_, target)| target.clone()));
        for target in &expected {
            assert!(found.contains(target), "{target} is missing from the export of Group/{group}");
        }
        for target in compartment(other) {
            assert!(!found.contains(&target), "{target} of the other patient leaked into the export of Group/{group}");
        }
        assert_eq!(found, expected);
    }
}

#[tokio::test]
async fn export_kick_off_refuses_bad_parameters() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let other = server.tenant_client("globex");
    let patient_id = server.create(&client, patient("Member")).await["id"].as_str().unwrap().to_owned();
    let group = server.create(&client, group_of(&[&patient_id])).await["id"].as_str().unwrap().to_owned();
    let cases = [
        ("_type=Practitioner", "not-supported", "_type"),
        ("_type=Nope", "value", "_type"),
        ("_type=Patient,Nope", "value", "_type"),
        ("_since=yesterday", "value", "_since"),
        ("_outputFormat=text/csv", "not-supported", "_outputFormat"),
        ("foo=1", "invalid", "foo"),
        ("_typeFilter=Observation%3Fvalue-quantity%3D5", "not-supported", "_typeFilter"),
        ("organizeOutputBy=Patient", "not-supported", "organizeOutputBy"),
    ];
    for base in ["/r4", "/bulk-data/r4"] {
        for (query, code, expression) in cases {
            let reply = server.send(get(&format!("{base}/Group/{group}/$export?{query}")).by(&client)).await;
            assert_outcome(&reply, 400, code, Some(expression));
        }
    }
    for (who, group_id) in [(&client, "no-such-group"), (&other, group.as_str())] {
        let reply = server.send(get(&format!("/r4/Group/{group_id}/$export")).by(who)).await;
        assert_outcome(&reply, 404, "not-found", None);
    }
    assert_outcome(&server.send(get(&format!("/r4/Group/{group}/$export"))).await, 401, "login", None);
    let reply = server.send(get(&format!("/r4/Patient/{patient_id}/$export")).by(&client)).await;
    assert_outcome(&reply, 400, "not-supported", None);

    let reply = server.send(delete(&format!("/r4/Group/{group}")).by(&client)).await;
    assert_status(&reply, 204);
    let reply = server.send(get(&format!("/r4/Group/{group}/$export")).by(&client)).await;
    assert_outcome(&reply, 410, "deleted", None);
}

#[tokio::test]
async fn export_reports_members_without_data_in_its_error_file() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let patient_id = server.create(&client, patient("Member")).await["id"].as_str().unwrap().to_owned();
    let group = server.create(&client, group_of(&[&patient_id, "ghost"])).await["id"].as_str().unwrap().to_owned();
    let manifest = export(&server, &client, &format!("/r4/Group/{group}/$export")).await;
    assert_eq!(
        exported(&server, &client, &manifest).await,
        set(&[&format!("Patient/{patient_id}"), &format!("Group/{group}")])
    );
    let errors = manifest["error"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{manifest}");
    let outcomes = download(&server, &client, errors[0]["url"].as_str().unwrap()).await;
    assert_eq!(json!(outcomes.len()), errors[0]["count"]);
    assert_eq!(outcomes.len(), 1);
    let issue = &outcomes[0]["issue"][0];
    assert_eq!(issue["code"], "not-found");
    assert!(issue["diagnostics"].as_str().unwrap().contains("Patient/ghost"), "{issue}");
}

#[tokio::test]
async fn lenient_export_reports_ignored_parameters_in_its_error_file() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let patient_id = server.create(&client, patient("Member")).await["id"].as_str().unwrap().to_owned();
    let group = server.create(&client, group_of(&[&patient_id])).await["id"].as_str().unwrap().to_owned();

    let reply = server
        .send(
            get(&format!("/bulk-data/r4/Group/{group}/$export?foo=1&_type=Patient"))
                .by(&client)
                .header("prefer", "handling=lenient"),
        )
        .await;
    assert_status(&reply, 200);
    let manifest = reply.json();
    let file = |resource_type: &str| json!({"type": resource_type, "url": format!("{BASE}/bulk-data/r4/$export/{resource_type}/<token>.ndjson"), "count": 1});
    let expected = json!({
        "transactionTime": "<instant>",
        "request": format!("{BASE}/bulk-data/r4/Group/<uuid>/$export?foo=1&_type=Patient"),
        "requiresAccessToken": true,
        "output": [file("Patient")],
        "error": [file("OperationOutcome")],
    });
    assert_eq!(redact(manifest.clone()), expected);

    let outcomes = download(&server, &client, manifest["error"][0]["url"].as_str().unwrap()).await;
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0]["resourceType"], "OperationOutcome");
    let issue = &outcomes[0]["issue"][0];
    assert_eq!(issue["severity"], "warning");
    // The file keeps the kick-off's issue whole: code, text and the parameter it names.
    assert_eq!(issue["code"], "invalid");
    assert_eq!(issue["expression"][0], "foo");
    assert!(issue["diagnostics"].as_str().unwrap().contains("'foo'"), "{issue}");
    assert_eq!(exported(&server, &client, &manifest).await, set(&[&format!("Patient/{patient_id}")]));

    // Strict (the default) refuses the same request.
    let reply = server.send(get(&format!("/bulk-data/r4/Group/{group}/$export?foo=1")).by(&client)).await;
    assert_outcome(&reply, 400, "invalid", Some("foo"));
}

#[tokio::test]
async fn export_file_urls_serve_only_their_client_and_expire() {
    let server = Server::start();
    let acme_tenant = server.tenant("acme");
    let client = server.client(acme_tenant);
    let colleague = server.client(acme_tenant);
    let outsider = server.tenant_client("globex");
    let patient_id = server.create(&client, patient("Member")).await["id"].as_str().unwrap().to_owned();
    let group = server.create(&client, group_of(&[&patient_id])).await["id"].as_str().unwrap().to_owned();
    let manifest = export(&server, &client, &format!("/bulk-data/r4/Group/{group}/$export?_type=Patient")).await;
    let minted = manifest["output"][0]["url"].as_str().unwrap();
    assert_eq!(download(&server, &client, minted).await.len(), 1);
    let url = local(minted);

    for stranger in [&colleague, &outsider] {
        assert_outcome(&server.send(get(&url).by(stranger)).await, 404, "not-found", None);
    }
    assert_outcome(&server.send(get(&url)).await, 401, "login", None);

    let (prefix, file) = url.rsplit_once('/').unwrap();
    let token = file.strip_suffix(".ndjson").unwrap();
    let signature_at = token.rfind('.').unwrap() + 5;
    let flipped = if &token[signature_at..=signature_at] == "A" { "B" } else { "A" };
    let tampered = format!("{prefix}/{}{flipped}{}.ndjson", &token[..signature_at], &token[signature_at + 1..]);
    assert_outcome(&server.send(get(&tampered).by(&client)).await, 404, "not-found", None);
    let wrong_type = url.replace("/$export/Patient/", "/$export/Observation/");
    assert_outcome(&server.send(get(&wrong_type).by(&client)).await, 404, "not-found", None);

    // The same file, signed with the same key, but past its expiry.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let keys = token_keys();
    let mut file = keys.verify(token, now).expect("the manifest's token verifies");
    file.exp = now - 60;
    let expired = format!("{prefix}/{}.ndjson", keys.sign(&file));
    assert_outcome(&server.send(get(&expired).by(&client)).await, 401, "security", None);
}
