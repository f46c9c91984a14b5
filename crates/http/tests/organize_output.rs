//! `organizeOutputBy=Patient` (Bulk Data IG STU3) over HTTP: patient blocks with their headers,
//! the manifest's shape, exact counts, files that never split a block, and exactly the resources
//! the export by type delivers, with `_type`, `_since`, `_typeFilter`, `_elements`, `patient` and
//! associated data, at the Patient and Group levels, on both bases and in both manners.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use common::{assert_outcome, get, post, Client, Server};

const BASES: [&str; 2] = ["/r4", "/bulk-data/r4"];

async fn put(server: &Server, client: &Client, body: Value) {
    let path = format!("/r4/{}/{}", body["resourceType"].as_str().unwrap(), body["id"].as_str().unwrap());
    let reply = server.send(common::put(&path).json(&body).by(client)).await;
    assert!(reply.status.is_success(), "PUT {path}: {}", reply.text());
}

fn reference(target: &str) -> Value {
    json!({"reference": target})
}

fn observation(id: &str, subject: &str, performers: &[&str]) -> Value {
    let performer: Vec<Value> = performers.iter().map(|p| reference(p)).collect();
    json!({"resourceType": "Observation", "id": id, "status": "final", "code": {"text": id},
           "subject": reference(&format!("Patient/{subject}")), "performer": performer})
}

/// Members a, b, c (c has only a Patient), non-member s. Practitioner doc (of Organization org)
/// performs for a and b; an Observation of a is also performed by b (in both compartments);
/// Provenance about a's Observation and about b itself; s has its own data.
async fn world(server: &Server, client: &Client) -> String {
    put(server, client, json!({"resourceType": "Organization", "id": "org"})).await;
    put(
        server,
        client,
        json!({"resourceType": "Practitioner", "id": "doc",
               "qualification": [{"code": {"text": "md"}, "issuer": reference("Organization/org")}]}),
    )
    .await;
    put(server, client, json!({"resourceType": "Practitioner", "id": "s-doc"})).await;
    put(server, client, json!({"resourceType": "Location", "id": "ward"})).await;
    for id in ["a", "b", "c", "s"] {
        put(server, client, json!({"resourceType": "Patient", "id": id, "name": [{"family": id}], "gender": "other"}))
            .await;
    }
    put(server, client, observation("a-1", "a", &["Practitioner/doc"])).await;
    put(server, client, observation("a-shared", "a", &["Practitioner/doc", "Patient/b"])).await;
    put(server, client, observation("b-1", "b", &["Practitioner/doc"])).await;
    put(server, client, observation("s-1", "s", &["Practitioner/s-doc"])).await;
    put(
        server,
        client,
        json!({"resourceType": "Encounter", "id": "a-visit", "status": "finished", "class": {"code": "AMB"},
               "subject": reference("Patient/a"), "location": [{"location": reference("Location/ward")}]}),
    )
    .await;
    for (id, target) in [("prov-a", "Observation/a-1"), ("prov-b", "Patient/b"), ("prov-s", "Observation/s-1")] {
        put(
            server,
            client,
            json!({"resourceType": "Provenance", "id": id, "target": [reference(target)],
                   "recorded": "2020-01-01T00:00:00Z", "agent": [{"who": reference("Practitioner/doc")}]}),
        )
        .await;
    }
    let group = json!({"resourceType": "Group", "type": "person", "actual": true,
        "member": [{"entity": reference("Patient/a")}, {"entity": reference("Patient/b")},
                   {"entity": reference("Patient/c")}]});
    server.create(client, group).await["id"].as_str().unwrap().to_owned()
}

fn kick_off_path(base: &str, level: &str, group: &str) -> String {
    match level {
        "patient" => format!("{base}/Patient/$export"),
        _ => format!("{base}/Group/{group}/$export"),
    }
}

fn key(resource: &Value) -> String {
    format!("{}/{}", resource["resourceType"].as_str().unwrap(), resource["id"].as_str().unwrap())
}

/// `Type/id` of every line of a manifest organised by type, each once.
async fn by_type(server: &Server, client: &Client, manifest: &Value) -> BTreeSet<String> {
    assert!(manifest.get("outputOrganizedBy").is_none(), "{manifest}");
    let mut found = BTreeSet::new();
    for (_, resource) in server.output_lines(client, manifest).await {
        assert!(found.insert(key(&resource)), "{} exported twice", key(&resource));
    }
    found
}

/// The blocks of a manifest organised by patient, in file order, checking the manifest's shape,
/// each file's count (its lines, headers included), that each file starts with a header and that
/// no patient's block is split or repeated.
async fn blocks(server: &Server, client: &Client, manifest: &Value) -> Vec<(String, Vec<Value>)> {
    assert_eq!(manifest["outputOrganizedBy"], "Patient", "{manifest}");
    let mut blocks: Vec<(String, Vec<Value>)> = Vec::new();
    for item in manifest["output"].as_array().expect("output") {
        assert!(item.get("type").is_none(), "STU3: no type on organised items: {item}");
        assert!(item.get("continuesInFile").is_none(), "blocks are never split: {item}");
        let lines = server.download_lines(client, item["url"].as_str().unwrap()).await;
        assert_eq!(json!(lines.len()), item["count"], "{item}");
        for (index, line) in lines.iter().enumerate() {
            let resource: Value = serde_json::from_str(line).expect("NDJSON line");
            if resource["resourceType"] == "Parameters" {
                let parameter = &resource["parameter"];
                assert_eq!(parameter.as_array().map(Vec::len), Some(1), "{resource}");
                assert_eq!(parameter[0]["name"], "header");
                let reference = parameter[0]["valueReference"]["reference"].as_str().unwrap();
                let patient = reference.strip_prefix("Patient/").expect("a header names a Patient").to_owned();
                blocks.push((patient, Vec::new()));
            } else {
                assert!(index > 0, "a file starts with a header: {line}");
                blocks.last_mut().unwrap().1.push(resource);
            }
        }
    }
    let patients: Vec<&String> = blocks.iter().map(|(patient, _)| patient).collect();
    assert!(patients.windows(2).all(|pair| pair[0] < pair[1]), "one block per patient, in order: {patients:?}");
    assert!(blocks.iter().all(|(_, resources)| !resources.is_empty()), "no empty block");
    blocks
}

/// `Type/id` of every block's resources (a resource may be in several blocks).
fn union(blocks: &[(String, Vec<Value>)]) -> BTreeSet<String> {
    blocks.iter().flat_map(|(_, resources)| resources.iter().map(key)).collect()
}

/// Every reference (`Type/id`) anywhere in `value`.
fn references(value: &Value, into: &mut BTreeSet<String>) {
    match value {
        Value::Object(object) => {
            if let Some(Value::String(target)) = object.get("reference") {
                into.insert(target.clone());
            }
            object.values().for_each(|inner| references(inner, into));
        }
        Value::Array(items) => items.iter().for_each(|inner| references(inner, into)),
        _ => {}
    }
}

/// Each block holds its patient's data and what that data leads to: the Patient is its header's,
/// every other resource references the patient or is referenced by (or, a Provenance, targets) a
/// resource of the block.
fn assert_blocks_hold_their_patients_data(blocks: &[(String, Vec<Value>)]) {
    for (patient, resources) in blocks {
        let mut referenced = BTreeSet::new();
        resources.iter().for_each(|resource| references(resource, &mut referenced));
        let keys: BTreeSet<String> = resources.iter().map(key).collect();
        let header = format!("Patient/{patient}");
        for resource in resources {
            let mut own = BTreeSet::new();
            references(resource, &mut own);
            let this = key(resource);
            let belongs = this == header
                || own.contains(&header)
                || referenced.contains(&this)
                || (resource["resourceType"] == "Provenance" && own.iter().any(|target| keys.contains(target)));
            assert!(belongs, "{this} does not belong in {header}'s block");
        }
    }
}

async fn manifest(server: &Server, client: &Client, path: &str) -> Value {
    server.manifest_of(client, get(path).by(client)).await
}

#[tokio::test]
async fn organised_output_is_the_export_by_type_in_patient_blocks() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let group = world(&server, &client).await;
    for base in BASES {
        for level in ["patient", "group"] {
            let path = kick_off_path(base, level, &group);
            let plain = by_type(&server, &client, &manifest(&server, &client, &path).await).await;
            let organised = manifest(&server, &client, &format!("{path}?organizeOutputBy=Patient")).await;
            assert_eq!(organised["error"], json!([]), "{organised}");
            let found = blocks(&server, &client, &organised).await;
            assert_eq!(union(&found), plain, "{level} on {base}: the same resources as by type");
            assert_blocks_hold_their_patients_data(&found);
            let blocks: BTreeMap<&str, BTreeSet<String>> = found
                .iter()
                .map(|(patient, resources)| (patient.as_str(), resources.iter().map(key).collect()))
                .collect();
            let expected_a = [
                "Patient/a",
                "Observation/a-1",
                "Observation/a-shared",
                "Encounter/a-visit",
                "Provenance/prov-a",
                "Practitioner/doc",
                "Organization/org",
                "Location/ward",
            ];
            let mut expected_a: BTreeSet<String> = expected_a.iter().map(|k| k.to_string()).collect();
            if level == "group" {
                // The exported Group itself (the Group level's default types include it) goes
                // in the first block.
                expected_a.insert(format!("Group/{group}"));
            }
            assert_eq!(blocks["a"], expected_a, "{level} on {base}");
            let expected_b = [
                "Patient/b",
                "Observation/b-1",
                "Observation/a-shared",
                "Provenance/prov-b",
                "Practitioner/doc",
                "Organization/org",
            ];
            assert_eq!(blocks["b"], expected_b.iter().map(|k| k.to_string()).collect(), "{level} on {base}");
            assert_eq!(blocks["c"], ["Patient/c".to_string()].into(), "{level} on {base}");
            // The non-member's block exists only at the Patient level.
            assert_eq!(blocks.contains_key("s"), level == "patient", "{level} on {base}");
            // The Patient line comes first in its block.
            for (patient, resources) in &found {
                assert_eq!(key(&resources[0]), format!("Patient/{patient}"));
            }
        }
    }
}

#[tokio::test]
async fn organised_output_keeps_every_export_parameter() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let group = world(&server, &client).await;
    let since = manifest(&server, &client, &kick_off_path("/r4", "group", &group)).await["transactionTime"]
        .as_str()
        .unwrap()
        .to_owned();
    // Since: a's first Observation and the Organization changed.
    put(&server, &client, observation("a-1", "a", &["Practitioner/doc", "Practitioner/s-doc"])).await;
    put(&server, &client, json!({"resourceType": "Organization", "id": "org", "name": "Renamed"})).await;
    let since = since.replace('+', "%2B");
    assert!(since.starts_with("20"), "{since}");
    let queries = [
        format!("_since={since}"),
        "_type=Observation,Practitioner".to_owned(),
        "_type=Patient,Encounter&includeAssociatedData=_noReferencedResources".to_owned(),
        "_typeFilter=Observation%3F_id%3Da-shared".to_owned(),
        "_elements=id,Observation.status".to_owned(),
        "includeAssociatedData=LatestProvenanceResources".to_owned(),
        "_since=2000-01-01&_until=2999-01-01".to_owned(),
    ];
    for base in BASES {
        for level in ["patient", "group"] {
            let path = kick_off_path(base, level, &group);
            for query in &queries {
                let plain =
                    by_type(&server, &client, &manifest(&server, &client, &format!("{path}?{query}")).await).await;
                let organised_path = format!("{path}?{query}&organizeOutputBy=Patient");
                let organised = manifest(&server, &client, &organised_path).await;
                let found = blocks(&server, &client, &organised).await;
                assert_eq!(union(&found), plain, "{organised_path}");
                // With `_since`, `_typeFilter` or `_elements` the associated data comes from the
                // patient's whole compartment, part of which (or the references in it) is not
                // exported: the block holds it all the same.
                let narrowed = ["_since=20", "_typeFilter", "_elements"].iter().any(|q| query.starts_with(q));
                if !narrowed {
                    assert_blocks_hold_their_patients_data(&found);
                }
                if query.starts_with("_elements") {
                    let observation = found.iter().flat_map(|(_, r)| r).find(|r| r["resourceType"] == "Observation");
                    let observation = observation.expect("an Observation");
                    assert!(observation.get("performer").is_none(), "{observation}");
                    assert!(observation["meta"]["tag"].to_string().contains("SUBSETTED"), "{observation}");
                }
            }
        }
    }
    // _since: only what changed, still in its patient's block, with what it leads to.
    let organised =
        manifest(&server, &client, &format!("/r4/Group/{group}/$export?_since={since}&organizeOutputBy=Patient")).await;
    let found = blocks(&server, &client, &organised).await;
    let found: BTreeMap<&str, BTreeSet<String>> =
        found.iter().map(|(patient, resources)| (patient.as_str(), resources.iter().map(key).collect())).collect();
    let expected_a =
        ["Observation/a-1", "Provenance/prov-a", "Practitioner/doc", "Practitioner/s-doc", "Organization/org"];
    assert_eq!(found["a"], expected_a.iter().map(|k| k.to_string()).collect(), "{found:?}");
    // b changed nothing, but its data leads to doc (exported: the changed a-1 references it) and
    // to the renamed org; c's data leads nowhere.
    let expected_b = ["Practitioner/doc", "Organization/org"];
    assert_eq!(found["b"], expected_b.iter().map(|k| k.to_string()).collect(), "{found:?}");
    assert_eq!(found.len(), 2, "{found:?}");
    // patient (POST): only the named members' blocks.
    for base in BASES {
        let body = json!({"resourceType": "Parameters", "parameter": [
            {"name": "patient", "valueReference": {"reference": "Patient/b"}},
            {"name": "organizeOutputBy", "valueString": "Patient"}]});
        let call = post(&kick_off_path(base, "group", &group)).by(&client).json(&body);
        let organised = server.manifest_of(&client, call).await;
        let found = blocks(&server, &client, &organised).await;
        let patients: Vec<&str> = found.iter().map(|(patient, _)| patient.as_str()).collect();
        assert_eq!(patients, ["b"], "{base}");
    }
}

#[tokio::test]
async fn organised_files_close_after_part_size_lines_without_splitting_a_block() {
    let mut config = common::test_config();
    config.export_part_size = 3;
    let server = Server::with_config(config);
    let client = server.tenant_client("acme");
    let group = world(&server, &client).await;
    for base in BASES {
        let organised =
            manifest(&server, &client, &format!("{base}/Group/{group}/$export?organizeOutputBy=Patient")).await;
        let files = organised["output"].as_array().unwrap();
        // a's block (10 lines with the Group's) and b's (7) each fill a file; c's (2) is the last.
        let counts: Vec<&Value> = files.iter().map(|file| &file["count"]).collect();
        assert_eq!(counts, [&json!(10), &json!(7), &json!(2)], "{organised}");
        let found = blocks(&server, &client, &organised).await;
        assert_eq!(found.len(), 3);
    }
}

#[tokio::test]
async fn organise_by_other_types_or_at_the_system_level_is_refused() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let group = world(&server, &client).await;
    for base in BASES {
        for path in [
            format!("{base}/$export?organizeOutputBy=Patient"),
            format!("{base}/Group/{group}/$export?organizeOutputBy=Encounter"),
        ] {
            let reply = server.send(get(&path).by(&client)).await;
            assert_outcome(&reply, 400, "not-supported", Some("organizeOutputBy"));
            // Lenient: the export proceeds by type, with a warning in error[].
            let call = get(&path).by(&client).header("prefer", "handling=lenient");
            let lenient = server.manifest_of(&client, call).await;
            assert!(lenient.get("outputOrganizedBy").is_none(), "{lenient}");
            assert_eq!(lenient["error"].as_array().unwrap().len(), 1, "{lenient}");
            assert!(lenient["output"].as_array().unwrap().iter().all(|item| item["type"].is_string()));
        }
    }
}
