//! Incremental (`_since`) Group exports after wrong-patient corrections: a resource re-pointed
//! from a member to a non-member is listed in `deleted[]`, one re-pointed the other way is in
//! `output`, so a client that applies each export to its copy holds exactly the cohort's data.

mod common;

use std::collections::BTreeMap;

use serde_json::{json, Value};

use common::{assert_status, get, put, Client, Server};

fn observation(id: &str, patient: &str) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
           "subject": {"reference": format!("Patient/{patient}")}})
}

async fn write(server: &Server, client: &Client, body: Value) {
    let path = format!("/r4/{}/{}", body["resourceType"].as_str().unwrap(), body["id"].as_str().unwrap());
    assert!(server.send(put(&path).by(client).json(&body)).await.status.is_success(), "PUT {path}");
}

async fn export(server: &Server, client: &Client, since: Option<&str>) -> Value {
    let mut path = "/bulk-data/r4/Group/cohort/$export".to_owned();
    if let Some(since) = since {
        path.push_str(&format!("?_since={}", since.replace('+', "%2B")));
    }
    let reply = server.send(get(&path).by(client)).await;
    assert_status(&reply, 200);
    reply.json()
}

/// `Type/id` of every `output[]` line with the line, and of every `deleted[]` entry.
async fn contents(server: &Server, client: &Client, manifest: &Value) -> (BTreeMap<String, String>, Vec<String>) {
    let mut output = BTreeMap::new();
    for (line, resource) in server.output_lines(client, manifest).await {
        output.insert(
            format!("{}/{}", resource["resourceType"].as_str().unwrap(), resource["id"].as_str().unwrap()),
            line,
        );
    }
    let mut deleted = Vec::new();
    for item in manifest["deleted"].as_array().into_iter().flatten() {
        let lines = server.download_lines(client, item["url"].as_str().unwrap()).await;
        assert_eq!(json!(lines.len()), item["count"], "deleted[] count is exact: {item}");
        for line in lines {
            let bundle: Value = serde_json::from_str(&line).unwrap();
            assert_eq!((&bundle["resourceType"], &bundle["type"]), (&json!("Bundle"), &json!("transaction")));
            assert_eq!(bundle["entry"][0]["request"]["method"], "DELETE");
            deleted.push(bundle["entry"][0]["request"]["url"].as_str().unwrap().to_owned());
        }
    }
    (output, deleted)
}

#[tokio::test]
async fn a_since_export_reports_resources_re_pointed_out_of_and_into_the_cohort() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    for id in ["m1", "m2", "x"] {
        write(&server, &client, json!({"resourceType": "Patient", "id": id})).await;
    }
    write(
        &server,
        &client,
        json!({"resourceType": "Group", "id": "cohort", "type": "person", "actual": true,
        "member": [{"entity": {"reference": "Patient/m1"}}, {"entity": {"reference": "Patient/m2"}}]}),
    )
    .await;
    write(&server, &client, observation("wrongly-attributed", "m1")).await;
    write(&server, &client, observation("belongs-to-m2", "x")).await;
    write(&server, &client, observation("untouched", "m1")).await;

    let full = export(&server, &client, None).await;
    let (mut replica, _) = contents(&server, &client, &full).await;
    assert!(replica.contains_key("Observation/wrongly-attributed"));
    assert!(!replica.contains_key("Observation/belongs-to-m2"));

    // Wrong-patient corrections, in both directions.
    write(&server, &client, observation("wrongly-attributed", "x")).await;
    write(&server, &client, observation("belongs-to-m2", "m2")).await;

    let since = full["transactionTime"].as_str().unwrap();
    let incremental = export(&server, &client, Some(since)).await;
    let (output, deleted) = contents(&server, &client, &incremental).await;
    assert_eq!(deleted, vec!["Observation/wrongly-attributed"], "{incremental}");
    assert_eq!(incremental["deleted"][0]["type"], "Bundle");
    assert_eq!(incremental["deleted"][0]["count"], 1);
    assert_eq!(output.keys().collect::<Vec<_>>(), vec!["Observation/belongs-to-m2"], "{incremental}");
    assert_eq!(incremental["extension"]["removedMembers"], json!([]));

    // The client's copy, with the export applied, is exactly a full export now.
    for key in &deleted {
        replica.remove(key);
    }
    replica.extend(output);
    let now = export(&server, &client, None).await;
    let (expected, _) = contents(&server, &client, &now).await;
    assert_eq!(replica, expected);
}
