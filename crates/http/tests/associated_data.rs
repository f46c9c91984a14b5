//! `includeAssociatedData`, Provenance and referenced resources over HTTP (README "Associated
//! data"): what a client sees at kick-off (400s, lenient warnings), in the manifest (counts) and
//! in the files, on both bases and in both manners (synchronous and `Prefer: respond-async`).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};

use common::{assert_outcome, assert_status, get, group_of, patient, Client, Server};

/// A member with an Observation by a Practitioner (who works for an Organization), two
/// Provenance about that Observation (not about the Patient), and a non-member with its own.
async fn world(server: &Server, client: &Client) -> String {
    let put = |body: Value| async move {
        let path = format!("/r4/{}/{}", body["resourceType"].as_str().unwrap(), body["id"].as_str().unwrap());
        let reply = server.send(common::put(&path).json(&body).by(client)).await;
        assert!(reply.status.is_success(), "PUT {path}: {}", reply.text());
    };
    put(json!({"resourceType": "Organization", "id": "org"})).await;
    put(json!({"resourceType": "Practitioner", "id": "doc",
        "qualification": [{"code": {"text": "md"}, "issuer": {"reference": "Organization/org"}}]}))
    .await;
    put(json!({"resourceType": "Practitioner", "id": "other-doc"})).await;
    let mut member = patient("Member");
    member["id"] = json!("m");
    put(member).await;
    let mut stranger = patient("Stranger");
    stranger["id"] = json!("s");
    put(stranger).await;
    for (id, subject, performer) in [("obs", "m", "doc"), ("obs-s", "s", "other-doc")] {
        put(json!({"resourceType": "Observation", "id": id, "status": "final", "code": {"text": "x"},
            "subject": {"reference": format!("Patient/{subject}")},
            "performer": [{"reference": format!("Practitioner/{performer}")}]}))
        .await;
    }
    for (id, target) in [("prov-old", "obs"), ("prov-new", "obs"), ("prov-s", "obs-s")] {
        put(json!({"resourceType": "Provenance", "id": id, "target": [{"reference": format!("Observation/{target}")}],
            "recorded": "2020-01-01T00:00:00Z", "agent": [{"who": {"reference": "Practitioner/doc"}}]}))
        .await;
    }
    server.create(client, group_of(&["m"])).await["id"].as_str().unwrap().to_owned()
}

/// `Type/id` of every output line, checking counts (done by `output_lines`) and uniqueness.
async fn exported(server: &Server, client: &Client, manifest: &Value) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (_, resource) in server.output_lines(client, manifest).await {
        let key = format!("{}/{}", resource["resourceType"].as_str().unwrap(), resource["id"].as_str().unwrap());
        assert!(found.insert(key.clone()), "{key} exported twice");
    }
    found
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|item| item.to_string()).collect()
}

async fn export(server: &Server, client: &Client, path: &str) -> Value {
    let reply = server.send(get(path).by(client)).await;
    assert_status(&reply, 200);
    reply.json()
}

#[tokio::test]
async fn provenance_about_any_exported_resource_and_referenced_resources_come_along() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let group = world(&server, &client).await;
    // The synchronous manner (under /r4 every kick-off is asynchronous: see the last test).
    for base in ["/bulk-data/r4"] {
        let manifest = export(&server, &client, &format!("{base}/Group/{group}/$export")).await;
        let group_key = format!("Group/{group}");
        assert_eq!(
            exported(&server, &client, &manifest).await,
            set(&[
                group_key.as_str(),
                "Observation/obs",
                "Organization/org",
                "Patient/m",
                "Practitioner/doc",
                "Provenance/prov-new",
                "Provenance/prov-old",
            ]),
            "{base}: the Provenance about the member's Observation (not the Patient), the Practitioner it names \
             and the Organization the Practitioner names; nothing of the non-member"
        );
    }
    let cases = [
        // Only the latest Provenance per resource.
        (
            "includeAssociatedData=LatestProvenanceResources&_type=Observation,Provenance",
            vec!["Observation/obs", "Provenance/prov-new"],
        ),
        // The least restrictive value wins.
        (
            "includeAssociatedData=LatestProvenanceResources,RelevantProvenanceResources&_type=Observation,Provenance",
            vec!["Observation/obs", "Provenance/prov-new", "Provenance/prov-old"],
        ),
        // With _type, only the named referenced types.
        ("_type=Observation,Practitioner", vec!["Observation/obs", "Practitioner/doc"]),
        ("_type=Observation,Organization", vec!["Observation/obs"]),
        // The switch: no referenced resources, Provenance stays.
        (
            "includeAssociatedData=_noReferencedResources&_type=Observation,Provenance,Patient",
            vec!["Observation/obs", "Patient/m", "Provenance/prov-new", "Provenance/prov-old"],
        ),
        (
            "includeAssociatedData=_noReferencedResources,_referencedResources&_type=Observation,Practitioner",
            vec!["Observation/obs", "Practitioner/doc"],
        ),
    ];
    for (query, expected) in cases {
        let manifest = export(&server, &client, &format!("/bulk-data/r4/Group/{group}/$export?{query}")).await;
        let expected: BTreeSet<String> = expected.into_iter().map(str::to_owned).collect();
        assert_eq!(exported(&server, &client, &manifest).await, expected, "{query}");
    }
}

#[tokio::test]
async fn associated_data_parameters_are_checked_at_kick_off() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let group = world(&server, &client).await;
    let cases = [
        ("_type=Practitioner,Organization", "not-supported", "_type"),
        ("includeAssociatedData=_myPreset", "not-supported", "includeAssociatedData"),
        ("includeAssociatedData=", "value", "includeAssociatedData"),
        ("includeAssociatedData=_noReferencedResources&_type=Observation,Practitioner", "not-supported", "_type"),
    ];
    for base in ["/r4", "/bulk-data/r4"] {
        for (query, code, expression) in cases {
            let reply = server.send(get(&format!("{base}/Group/{group}/$export?{query}")).by(&client)).await;
            assert_outcome(&reply, 400, code, Some(expression));
        }
    }
    // Lenient: the unknown value is ignored and reported in error[].
    let reply = server
        .send(
            get(&format!(
                "/bulk-data/r4/Group/{group}/$export?includeAssociatedData=_myPreset&_type=Observation,Practitioner"
            ))
            .header("prefer", "handling=lenient")
            .by(&client),
        )
        .await;
    assert_status(&reply, 200);
    let manifest = reply.json();
    assert_eq!(exported(&server, &client, &manifest).await, set(&["Observation/obs", "Practitioner/doc"]));
    let error_url = manifest["error"][0]["url"].as_str().expect("an error file").to_owned();
    let lines = server.download_lines(&client, &error_url).await;
    assert!(lines.iter().any(|line| line.contains("_myPreset")), "{lines:?}");
}

#[tokio::test]
async fn an_asynchronous_export_lists_the_same_associated_files() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let group = world(&server, &client).await;
    let reply = server.send(get(&format!("/r4/Group/{group}/$export")).respond_async().by(&client)).await;
    assert_status(&reply, 202);
    let status = reply.header("content-location").to_owned();
    let status = &status[status.find("/bulk-data/").expect("status path")..];
    let manifest = loop {
        let reply = server.send(get(status).by(&client)).await;
        if reply.status.as_u16() == 200 {
            break reply.json();
        }
        assert_status(&reply, 202);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let found = exported(&server, &client, &manifest).await;
    for key in ["Practitioner/doc", "Organization/org", "Provenance/prov-old", "Provenance/prov-new"] {
        assert!(found.contains(key), "{key} missing from {found:?}");
    }
    assert!(!found.contains("Practitioner/other-doc") && !found.contains("Provenance/prov-s"), "{found:?}");
}

/// A repeated manifest is answered from the plan cache (its plan and its associated set, whose
/// stored rows the repeat shares: the same set id, and the files read the same lines), on either
/// store; a write to a member's compartment, or to a type the associated set reaches, makes the
/// next one compute afresh, and its files show the change; a write elsewhere does not.
#[tokio::test]
async fn a_repeated_manifest_is_served_from_the_plan_cache_until_what_it_reads_changes() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let group = world(&server, &client).await;
    let (server_ref, client_ref) = (&server, &client);
    let put = |body: Value| async move {
        let path = format!("/r4/{}/{}", body["resourceType"].as_str().unwrap(), body["id"].as_str().unwrap());
        let reply = server_ref.send(common::put(&path).json(&body).by(client_ref)).await;
        assert!(reply.status.is_success(), "PUT {path}: {}", reply.text());
    };
    let stats = || server.plan_cache_stats().expect("both stores have a plan cache");
    let path = format!("/bulk-data/r4/Group/{group}/$export");
    let first = export(&server, &client, &path).await;
    let before = stats();
    let second = export(&server, &client, &path).await;
    let after = stats();
    // (The plan and the members' Patients are both answered from the cache: `hits` counts both.)
    assert!(after.hits > before.hits, "a repeat is a hit");
    assert_eq!((after.misses, after.associated_misses), (before.misses, before.associated_misses), "and nothing else");
    assert_eq!(after.associated_hits, before.associated_hits + 1, "its associated set is shared");
    assert_eq!(exported(&server, &client, &second).await, exported(&server, &client, &first).await);

    // Outside the members' compartments and of a type the set does not reach: still a hit.
    put(json!({"resourceType": "Observation", "id": "obs-s2", "status": "final", "code": {"text": "x"},
        "subject": {"reference": "Patient/s"}}))
    .await;
    let before = stats();
    export(&server, &client, &path).await;
    let after = stats();
    assert_eq!((after.misses, after.associated_misses), (before.misses, before.associated_misses));
    assert!(after.hits > before.hits, "a non-member's write keeps the plan");

    // A member's new Observation: the plan is computed again and counts it.
    put(json!({"resourceType": "Observation", "id": "obs2", "status": "final", "code": {"text": "x"},
        "subject": {"reference": "Patient/m"}}))
    .await;
    let before = stats();
    let manifest = export(&server, &client, &path).await;
    assert!(stats().misses > before.misses, "a member's write invalidates the plan");
    assert!(exported(&server, &client, &manifest).await.contains("Observation/obs2"));

    // A referenced Practitioner renamed: the associated set is computed again, with the new name.
    let before = stats();
    export(&server, &client, &path).await;
    assert_eq!(stats().associated_hits, before.associated_hits + 1);
    put(json!({"resourceType": "Practitioner", "id": "doc", "name": [{"family": "Renamed"}],
        "qualification": [{"code": {"text": "md"}, "issuer": {"reference": "Organization/org"}}]}))
    .await;
    let before = stats();
    let manifest = export(&server, &client, &path).await;
    let after = stats();
    assert_eq!(after.misses, before.misses, "the compartment plan is still valid");
    assert_eq!(after.associated_misses, before.associated_misses + 1, "a reachable type's write invalidates the set");
    let renamed = server
        .output_lines(&client, &manifest)
        .await
        .into_iter()
        .any(|(_, resource)| resource["id"] == "doc" && resource["name"][0]["family"] == "Renamed");
    assert!(renamed, "the new set holds the Practitioner at its new version");
}
