//! What a client stores comes back character for character, whatever way it came in (create,
//! update, transaction and batch Bundles, the NDJSON importer, `POST /r4/$upload-ndjson`), and
//! every way in refuses the same bad input with the same message.

mod common;

use bulkhead_http::ndjson_import::{Importer, Location};
use common::*;
use serde_json::{json, Value};

/// Decimals whose digits a careless server changes (`1.50` → `1.5`, `112.41600000000001` →
/// `112.416`, `1e2` → `100.0`, `-0.0` → `0.0`, big integers → floats).
const EDGE_NUMBERS: [&str; 7] =
    ["1.50", "0.010", "1e2", "-0.0", "12345678901234567890", "3.14159265358979323846264338", "112.41600000000001"];

/// An Observation of `subject` whose components carry every edge number, as JSON text (built as
/// text so no JSON library has touched the digits).
fn observation_text(id: Option<&str>, subject: &str) -> String {
    let components: Vec<String> = EDGE_NUMBERS
        .iter()
        .map(|number| format!(r#"{{"code":{{"text":"c"}},"valueQuantity":{{"value":{number},"unit":"mg"}}}}"#))
        .collect();
    let id = id.map(|id| format!(r#""id":"{id}","#)).unwrap_or_default();
    format!(
        r#"{{"resourceType":"Observation",{id}"status":"final","code":{{"text":"edge numbers"}},"subject":{{"reference":"{subject}"}},"component":[{}]}}"#,
        components.join(",")
    )
}

/// The `valueQuantity.value` texts of a stored or exported Observation line, in order.
fn component_values(line: &str) -> Vec<String> {
    line.split(r#""valueQuantity":{"value":"#)
        .skip(1)
        .map(|rest| rest.split([',', '}']).next().unwrap().to_owned())
        .collect()
}

#[track_caller]
fn assert_exact(line: &str, how: &str) {
    assert_eq!(component_values(line), EDGE_NUMBERS, "{how}: the numbers changed: {line}");
}

#[tokio::test]
async fn numbers_keep_their_digits_through_every_write_path_and_the_export() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let patient = server.create(&client, json!({"resourceType": "Patient", "id": "p"})).await;
    let subject = format!("Patient/{}", id_of(&patient));
    let write = |call: Call, text: String| call.by(&client).raw("application/fhir+json", text);

    // REST create and update (PUT as create, then PUT as update).
    let created = server.send(write(post("/r4/Observation"), observation_text(None, &subject))).await;
    assert_status(&created, 201);
    assert_exact(&created.text(), "create");
    let put_new = server.send(write(put("/r4/Observation/o-put"), observation_text(Some("o-put"), &subject))).await;
    assert_status(&put_new, 201);
    let text = observation_text(Some("o-put"), &subject).replace("edge numbers", "edge numbers again");
    let updated = server.send(write(put("/r4/Observation/o-put"), text)).await;
    assert_status(&updated, 200);
    assert_exact(&server.send(get("/r4/Observation/o-put").by(&client)).await.text(), "update, then read");

    // Transaction and batch Bundles.
    for (kind, id) in [("transaction", "o-tx"), ("batch", "o-batch")] {
        let bundle = format!(
            r#"{{"resourceType":"Bundle","type":"{kind}","entry":[{{"resource":{},"request":{{"method":"PUT","url":"Observation/{id}"}}}}]}}"#,
            observation_text(Some(id), &subject)
        );
        assert_status(&server.send(write(post("/r4"), bundle)).await, 200);
        assert_exact(&server.send(get(&format!("/r4/Observation/{id}")).by(&client)).await.text(), kind);
    }

    // The importer (what `bulkhead import` runs) and the upload endpoint.
    let tenant = server.store.tenant_by_name("acme").unwrap().unwrap().id;
    let mut importer = Importer::new(server.store.clone(), tenant, None, 100);
    let line = observation_text(Some("o-import"), &subject);
    importer.add_line(Location { source: "test.ndjson".into(), line: 1 }, line.as_bytes()).unwrap();
    assert_eq!(importer.finish().unwrap().created, 1);
    assert_exact(&server.send(get("/r4/Observation/o-import").by(&client)).await.text(), "import");
    let upload = observation_text(Some("o-upload"), &subject);
    let reply = server.send(post("/r4/$upload-ndjson").by(&client).raw("application/fhir+ndjson", upload)).await;
    assert_status(&reply, 200);
    assert_exact(&server.send(get("/r4/Observation/o-upload").by(&client)).await.text(), "upload");

    // Re-sending the same digits changes nothing; other digits for the same value are a change.
    let again = observation_text(Some("o-import"), &subject);
    let reply = server.send(post("/r4/$upload-ndjson").by(&client).raw("application/fhir+ndjson", again)).await;
    assert!(reply.text().contains("1 unchanged"), "{}", reply.text());

    // The export carries every one of them, character for character.
    let group = server.create(&client, group_of(&[&id_of(&patient)])).await;
    let reply =
        server.send(get(&format!("/bulk-data/r4/Group/{}/$export?_type=Observation", id_of(&group))).by(&client)).await;
    assert_status(&reply, 200);
    let lines = server.output_lines(&client, &reply.json()).await;
    assert_eq!(lines.len(), 6, "one Observation per write path");
    for (line, resource) in &lines {
        assert_exact(line, &format!("export of {}", resource["id"]));
    }
}

/// Not UTF-8, a numeric id, an unknown type: every way in refuses the line with the same words.
#[tokio::test]
async fn every_way_in_refuses_bad_input_alike() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let tenant = server.store.tenant_by_name("acme").unwrap().unwrap().id;
    let cases: [(&str, Vec<u8>); 3] = [
        (
            "not UTF-8",
            b"{\"resourceType\":\"Patient\",\"id\":\"bad-utf8\",\"name\":[{\"text\":\"M\xfcller\"}]}".to_vec(),
        ),
        ("numeric id", br#"{"resourceType":"Patient","id":12}"#.to_vec()),
        ("unknown type", br#"{"resourceType":"Nope","id":"x"}"#.to_vec()),
    ];
    for (what, body) in cases {
        // REST.
        let rest = server.send(post("/r4/Patient").by(&client).raw("application/fhir+json", body.clone())).await;
        assert!(rest.status.is_client_error(), "{what}: REST answered {}", rest.status);
        let rest_words = rest.json()["issue"][0]["diagnostics"].as_str().unwrap().to_owned();

        // The importer (the CLI's path) and the upload: refused, never stored in another shape.
        let mut importer = Importer::new(server.store.clone(), tenant, None, 100);
        importer.add_line(Location { source: "f.ndjson".into(), line: 7 }, &body).unwrap();
        let summary = importer.finish().unwrap();
        assert_eq!((summary.created, summary.failed), (0, 1), "{what}: import {summary:?}");
        assert!(
            summary.errors[0].message.contains(&rest_words),
            "{what}: import said {:?}, REST {rest_words:?}",
            summary.errors[0]
        );
        assert_eq!(summary.errors[0].location.line, 7);

        let upload = server.send(post("/r4/$upload-ndjson").by(&client).raw("application/fhir+ndjson", body)).await;
        let outcome = assert_error(&upload, 400, "invalid");
        assert_eq!(outcome["issue"][0]["diagnostics"], "nothing was stored: all 1 lines were refused", "{what}");
        let line_issue =
            outcome["issue"].as_array().unwrap().iter().find(|issue| issue["expression"] == json!(["line 1"]));
        let line_words =
            line_issue.unwrap_or_else(|| panic!("{what}: no line issue in {outcome}"))["diagnostics"].as_str().unwrap();
        assert!(line_words.contains(&rest_words), "{what}: upload said {line_words:?}, REST {rest_words:?}");
    }
    // Nothing of it was stored, under any id.
    assert_eq!(server.stored_state(&client, &["Patient"]).await.len(), 0);

    let empty = server.send(post("/r4/$upload-ndjson").by(&client).raw("application/fhir+ndjson", "\n\n")).await;
    assert_outcome(&empty, 400, "required", None);
}

#[tokio::test]
async fn transactions_refuse_unreadable_if_match_and_two_writes_of_one_resource() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    server.send(put("/r4/Patient/p1").by(&client).json(&json!({"resourceType": "Patient", "id": "p1"}))).await;
    let entry = |id: &str, if_match: Option<&str>| {
        let mut request = json!({"method": "PUT", "url": format!("Patient/{id}")});
        if let Some(tag) = if_match {
            request["ifMatch"] = json!(tag);
        }
        json!({"resource": {"resourceType": "Patient", "id": id, "active": true}, "request": request})
    };
    let bundle = |kind: &str, entries: Vec<Value>| json!({"resourceType": "Bundle", "type": kind, "entry": entries});

    // An ifMatch that cannot be read is refused like the If-Match header, not dropped.
    let reply =
        server.send(post("/r4").by(&client).json(&bundle("transaction", vec![entry("p1", Some("W/\"one\""))]))).await;
    assert_outcome(&reply, 400, "value", Some("Bundle.entry[0].request.ifMatch"));
    let reply = server.send(post("/r4").by(&client).json(&bundle("batch", vec![entry("p1", Some("yesterday"))]))).await;
    assert_status(&reply, 200);
    assert!(reply.json()["entry"][0]["response"]["status"].as_str().unwrap().starts_with("400"), "{}", reply.text());
    // A readable one is honoured.
    let stale =
        server.send(post("/r4").by(&client).json(&bundle("transaction", vec![entry("p1", Some("W/\"7\""))]))).await;
    assert_error(&stale, 412, "conflict");

    // Two writes of one resource in a transaction: refused whole, nothing written.
    let before = server.stored_state(&client, &["Patient"]).await;
    let twice = bundle("transaction", vec![entry("p2", None), entry("p1", None), entry("p2", None)]);
    let reply = server.send(post("/r4").by(&client).json(&twice)).await;
    let outcome = assert_outcome(&reply, 400, "duplicate", Some("Bundle.entry[2]"));
    assert!(outcome["issue"][0]["diagnostics"].as_str().unwrap().contains("Patient/p2"), "{outcome}");
    assert_eq!(server.stored_state(&client, &["Patient"]).await, before);
    let delete_and_put = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        entry("p1", None), {"request": {"method": "DELETE", "url": "Patient/p1"}}]});
    assert_outcome(
        &server.send(post("/r4").by(&client).json(&delete_and_put)).await,
        400,
        "duplicate",
        Some("Bundle.entry[1]"),
    );
}
