//! FHIR's general parameters `_format` and `_pretty` (R4 §3.1.0.1.10) on every FHIR route: a
//! JSON `_format` and `_pretty=true|false` are accepted; XML is a clear 406, a bad `_pretty` 400.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn json_format_and_pretty_are_accepted_on_every_fhir_route() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let patient = json!({"resourceType": "Patient", "id": "p1", "gender": "female"});
    assert_status(&server.send(put("/r4/Patient/p1").by(&client).json(&patient)).await, 201);
    let group = json!({"resourceType": "Group", "id": "g1", "type": "person", "actual": true,
        "member": [{"entity": {"reference": "Patient/p1"}}]});
    assert_status(&server.send(put("/r4/Group/g1").by(&client).json(&group)).await, 201);

    // `+` unencoded in a query decodes to a space; clients send it both ways.
    for params in [
        "_format=json",
        "_format=application/json",
        "_format=application/fhir+json",
        "_format=application%2Ffhir%2Bjson",
        "_pretty=true",
        "_pretty=false&_format=json",
    ] {
        for (path, status) in [
            ("/r4/metadata", 200),
            ("/r4/Patient/p1", 200),
            ("/r4/Patient/p1/_history", 200),
            ("/r4/Patient/p1/_history/1", 200),
            ("/r4/Patient", 200),
            ("/r4/Patient?_id=p1", 200),
            ("/bulk-data/r4/Group/g1/$export", 200),
            ("/r4/Group/g1/$export", 202),
        ] {
            let separator = if path.contains('?') { '&' } else { '?' };
            let uri = format!("{path}{separator}{params}");
            let mut call = get(&uri).by(&client);
            if status == 202 {
                call = call.respond_async();
            }
            let reply = server.send(call).await;
            assert_eq!(reply.status.as_u16(), status, "{uri}: {}", reply.text());
        }
        let reply = server.send(put(&format!("/r4/Patient/p1?{params}")).by(&client).json(&patient)).await;
        assert_status(&reply, 200);
    }
    // The search still answers what was asked.
    let bundle = server.send(get("/r4/Patient?_id=p1&_format=json&_pretty=true").by(&client)).await.json();
    assert_eq!(bundle["entry"][0]["resource"]["id"], "p1", "{bundle}");
}

#[tokio::test]
async fn xml_format_is_not_acceptable_and_a_bad_pretty_is_refused() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let patient = json!({"resourceType": "Patient", "id": "p1"});
    assert_status(&server.send(put("/r4/Patient/p1").by(&client).json(&patient)).await, 201);
    for uri in ["/r4/Patient/p1?_format=xml", "/r4/Patient?_format=application/fhir%2Bxml", "/r4/metadata?_format=xml"]
    {
        let reply = server.send(get(uri).by(&client)).await;
        assert_outcome(&reply, 406, "not-supported", Some("_format"));
    }
    let reply = server.send(get("/r4/Patient?_pretty=yes").by(&client)).await;
    assert_outcome(&reply, 400, "invalid", Some("_pretty"));
}
