//! A repeated synchronous Group manifest is answered from what the store remembers (the plan,
//! the members' check, the Group version's member list), and never stale: each kind of change a
//! manifest depends on shows in the next one, on either store.

mod common;

use std::collections::BTreeMap;

use serde_json::{json, Value};

use common::{assert_status, get, Client, Server};

/// `count` by file type of a manifest (`output[]` and `error[]`).
fn counts(manifest: &Value) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for item in
        manifest["output"].as_array().into_iter().flatten().chain(manifest["error"].as_array().into_iter().flatten())
    {
        *counts.entry(item["type"].as_str().unwrap().to_owned()).or_default() += item["count"].as_u64().unwrap();
    }
    counts
}

fn expect(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(kind, count)| (kind.to_string(), *count)).collect()
}

async fn put(server: &Server, client: &Client, body: Value) {
    let path = format!("/r4/{}/{}", body["resourceType"].as_str().unwrap(), body["id"].as_str().unwrap());
    let reply = server.send(common::put(&path).json(&body).by(client)).await;
    assert!(reply.status.is_success(), "PUT {path}: {}", reply.text());
}

fn group(name: &str, members: &[&str]) -> Value {
    let member: Vec<Value> =
        members.iter().map(|id| json!({"entity": {"reference": format!("Patient/{id}")}})).collect();
    json!({"resourceType": "Group", "id": "g", "name": name, "type": "person", "actual": true, "member": member})
}

fn observation(id: &str, patient: &str) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final", "code": {"text": "x"},
           "subject": {"reference": format!("Patient/{patient}")}})
}

async fn manifest(server: &Server, client: &Client) -> Value {
    let reply = server.send(get("/bulk-data/r4/Group/g/$export?_type=Group,Patient,Observation").by(client)).await;
    assert_status(&reply, 200);
    reply.json()
}

/// The Group line the manifest's Group file holds.
async fn group_line(server: &Server, client: &Client, manifest: &Value) -> Value {
    let lines = server.output_lines(client, manifest).await;
    let groups: Vec<&Value> =
        lines.iter().map(|(_, resource)| resource).filter(|r| r["resourceType"] == "Group").collect();
    assert_eq!(groups.len(), 1);
    groups[0].clone()
}

/// A repeat is a cache hit with the same counts; then a member's new data, a Group update, a
/// member's Patient deleted or created, a Group update that keeps its members, and the Group
/// deleted each change the next manifest as they must, and the files agree with the counts.
#[tokio::test]
async fn a_repeated_manifest_changes_with_everything_it_depends_on() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    for id in ["m1", "m2", "m3", "other"] {
        put(&server, &client, json!({"resourceType": "Patient", "id": id})).await;
        put(&server, &client, observation(&format!("obs-{id}"), id)).await;
    }
    // `ghost` has no Patient: it is listed in the error file.
    put(&server, &client, group("first", &["m1", "m2", "m3", "ghost"])).await;
    let first = manifest(&server, &client).await;
    let full = expect(&[("Group", 1), ("Patient", 3), ("Observation", 3), ("OperationOutcome", 1)]);
    assert_eq!(counts(&first), full);
    let stats = || server.plan_cache_stats().expect("both stores have a plan cache");
    let before = stats();
    let again = manifest(&server, &client).await;
    assert_eq!(counts(&again), full);
    let after = stats();
    assert!(after.hits > before.hits && after.misses == before.misses, "a repeat is answered from the cache");
    assert_eq!(group_line(&server, &client, &again).await["name"], "first");

    // A member's new Observation; a non-member's does not count.
    put(&server, &client, observation("obs-m1-b", "m1")).await;
    put(&server, &client, observation("obs-other-b", "other")).await;
    let full = expect(&[("Group", 1), ("Patient", 3), ("Observation", 4), ("OperationOutcome", 1)]);
    assert_eq!(counts(&manifest(&server, &client).await), full);

    // The Group updated: m3 leaves, `other` joins.
    put(&server, &client, group("second", &["m1", "m2", "other", "ghost"])).await;
    let changed = manifest(&server, &client).await;
    assert_eq!(counts(&changed), expect(&[("Group", 1), ("Patient", 3), ("Observation", 5), ("OperationOutcome", 1)]));
    assert_eq!(group_line(&server, &client, &changed).await["name"], "second");
    // The first manifest's files still hold its own Group version.
    assert_eq!(group_line(&server, &client, &again).await["name"], "first");

    // A member's Patient deleted: one Patient less, one more member missing; then created again.
    let reply = server.send(common::delete("/r4/Patient/m2").by(&client)).await;
    assert!(reply.status.is_success(), "{}", reply.text());
    let deleted = expect(&[("Group", 1), ("Patient", 2), ("Observation", 5), ("OperationOutcome", 2)]);
    assert_eq!(counts(&manifest(&server, &client).await), deleted);
    put(&server, &client, json!({"resourceType": "Patient", "id": "ghost"})).await;
    let found = expect(&[("Group", 1), ("Patient", 3), ("Observation", 5), ("OperationOutcome", 1)]);
    assert_eq!(counts(&manifest(&server, &client).await), found);

    // The same members under a new Group version: the same counts, the new Group line.
    put(&server, &client, group("third", &["m1", "m2", "other", "ghost"])).await;
    let renamed = manifest(&server, &client).await;
    assert_eq!(counts(&renamed), found);
    assert_eq!(group_line(&server, &client, &renamed).await["name"], "third");

    // The Group deleted: the kick-off says so.
    let reply = server.send(common::delete("/r4/Group/g").by(&client)).await;
    assert!(reply.status.is_success(), "{}", reply.text());
    let reply = server.send(get("/bulk-data/r4/Group/g/$export").by(&client)).await;
    assert_status(&reply, 410);
}

/// A Group whose members have `period.end`s: the repeated manifest follows each member's end as
/// time passes (the member list is remembered per Group version, the time filter is not).
#[tokio::test]
async fn member_periods_are_applied_at_each_kick_off() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    for id in ["a", "b"] {
        put(&server, &client, json!({"resourceType": "Patient", "id": id})).await;
    }
    let soon = bulkhead_fhir::format_instant(bulkhead_fhir::now_micros() + 1_500_000);
    let body = json!({"resourceType": "Group", "id": "g", "type": "person", "actual": true, "member": [
        {"entity": {"reference": "Patient/a"}},
        {"entity": {"reference": "Patient/b"}, "period": {"end": soon}},
    ]});
    put(&server, &client, body).await;
    assert_eq!(counts(&manifest(&server, &client).await), expect(&[("Group", 1), ("Patient", 2)]));
    assert_eq!(counts(&manifest(&server, &client).await), expect(&[("Group", 1), ("Patient", 2)]));
    tokio::time::sleep(std::time::Duration::from_millis(1_600)).await;
    assert_eq!(
        counts(&manifest(&server, &client).await),
        expect(&[("Group", 1), ("Patient", 1)]),
        "b's membership ended"
    );
}
