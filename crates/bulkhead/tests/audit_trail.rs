//! The audit trail through the real binary: each audited action (FHIR reads, searches, writes,
//! Bundles, uploads, both export modes with status, cancel and a file download, admin actions
//! over the API and on the command line) leaves exactly its record, found by its request id,
//! with the right tenant, client, user, action, target and outcome; another tenant's view holds
//! nothing of it; `--patient` finds reads and exports of a patient; the admin API gives the same
//! records as BALP-shaped `AuditEvent`s; and neither the log nor the trail holds a secret.

mod common;

use std::time::{Duration, Instant};

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

const ADMIN_TOKEN: &str = "admin-token-for-the-audit-test-0123456789";
const USER: &str = "nurse-7";

/// `bulkhead audit --tenant T --json [extra…]`, parsed.
fn audit(server: &Server, tenant: &str, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["audit", "--tenant", tenant, "--json"];
    args.extend_from_slice(extra);
    server
        .cli(&args)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|error| panic!("not JSON ({error}): {line}")))
        .collect()
}

/// The records of `tenant` with request id `request_id`, waiting until there are `count` (a
/// download's record is stored when its body ends, just after the client has it all).
async fn records_of(server: &Server, tenant: &str, request_id: &str, count: usize) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let found: Vec<Value> =
            audit(server, tenant, &[]).into_iter().filter(|record| record["request_id"] == request_id).collect();
        if found.len() >= count || started.elapsed() > Duration::from_secs(10) {
            assert_eq!(found.len(), count, "records of request {request_id} in {tenant}: {found:#?}");
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks the one record of `request_id`: acme, `client`, `user`, `action`, `target`, `outcome`.
async fn expect_record(
    server: &Server,
    request_id: &str,
    (client, user): (&str, Option<&str>),
    (action, target, outcome): (&str, &str, &str),
) -> Value {
    let record = records_of(server, "acme", request_id, 1).await.remove(0);
    assert_eq!(record["tenant"], "acme", "{record}");
    assert_eq!(record["client"], client, "{record}");
    assert_eq!(record["user"].as_str(), user, "{record}");
    assert_eq!((record["action"].as_str(), record["target"].as_str()), (Some(action), Some(target)), "{record}");
    assert_eq!(record["outcome"], outcome, "{record}");
    assert!(record["time"].as_str().is_some_and(|time| time.ends_with('Z')), "{record}");
    if client != "cli" {
        assert!(record["peer"].as_str().is_some_and(|peer| peer.starts_with("127.0.0.1:")), "{record}");
    }
    record
}

async fn send(api: &Api, method: Method, target: &str, request_id: &str, body: Option<&Value>) -> Reply {
    let mut request = api.request(method, target).header("x-request-id", request_id);
    if let Some(body) = body {
        request = request.header("content-type", "application/fhir+json").body(body.to_string());
    }
    Api::send(request).await
}

async fn admin(server: &Server, method: Method, path: &str, request_id: &str, body: Option<Value>) -> Reply {
    let mut request = http_client()
        .request(method, format!("{}{path}", server.base))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .header("x-request-id", request_id);
    if let Some(body) = body {
        request = request.header("content-type", "application/json").body(body.to_string());
    }
    Api::send(request).await
}

#[tokio::test]
async fn every_audited_action_leaves_exactly_its_record_in_its_tenant_only() {
    let env = vec![
        ("BULKHEAD_ADMIN_TOKEN".to_owned(), ADMIN_TOKEN.to_owned()),
        ("BULKHEAD_LOG_FORMAT".to_owned(), "json".to_owned()),
    ];
    let server = Server::start_with(Options { env, ..Default::default() }).await;
    server.create_tenant("acme");
    server.create_tenant("other");
    let tenant_wide = server.create_client("acme");
    let api = tenant_wide.as_user(USER);
    let stranger = server.create_client("other");
    let me = (api.client_id.as_str(), Some(USER));

    // The command line's own admin actions.
    let cli_records = audit(&server, "acme", &[]);
    let cli_actions: Vec<(&str, &str)> = cli_records
        .iter()
        .map(|record| (record["action"].as_str().unwrap_or(""), record["client"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(cli_actions, [("tenant.create", "cli"), ("client.create", "cli")], "{cli_records:#?}");
    assert_eq!(cli_records[1]["target"], tenant_wide.client_id.as_str());

    // FHIR writes and reads.
    let created = send(&api, Method::PUT, "/r4/Patient/p1", "rid-create", Some(&patient(Some("p1"), "One"))).await;
    assert_eq!(created.status, 201, "{}", created.text());
    let record = expect_record(&server, "rid-create", me, ("create", "Patient/p1/_history/1", "success")).await;
    assert_eq!(record["patients"], json!(["Patient/p1"]));
    let updated = send(&api, Method::PUT, "/r4/Patient/p1", "rid-update", Some(&patient(Some("p1"), "Uno"))).await;
    assert_eq!(updated.status, 200);
    expect_record(&server, "rid-update", me, ("update", "Patient/p1/_history/2", "success")).await;
    let posted = send(&api, Method::POST, "/r4/Observation", "rid-post", Some(&observation(None, "p1", 70.0))).await;
    let observation_id = posted.expect(201)["id"].as_str().unwrap().to_owned();
    let record = expect_record(
        &server,
        "rid-post",
        me,
        ("create", &format!("Observation/{observation_id}/_history/1"), "success"),
    )
    .await;
    assert_eq!(record["patients"], json!(["Patient/p1"]), "the Observation is in p1's compartment");
    let invalid = json!({"resourceType": "Patient", "gender": "sometimes"});
    assert_eq!(send(&api, Method::POST, "/r4/Patient", "rid-invalid", Some(&invalid)).await.status, 400);
    expect_record(&server, "rid-invalid", me, ("create", "Patient", "failure")).await;

    assert_eq!(send(&api, Method::GET, "/r4/Patient/p1", "rid-read", None).await.status, 200);
    let record = expect_record(&server, "rid-read", me, ("read", "Patient/p1/_history/2", "success")).await;
    assert_eq!(record["status"], 200);
    assert_eq!(send(&api, Method::GET, "/r4/Patient/p1/_history/1", "rid-vread", None).await.status, 200);
    expect_record(&server, "rid-vread", me, ("vread", "Patient/p1/_history/1", "success")).await;
    assert_eq!(send(&api, Method::GET, "/r4/Patient/p1/_history", "rid-history", None).await.status, 200);
    expect_record(&server, "rid-history", me, ("history", "Patient/p1", "success")).await;
    assert_eq!(send(&api, Method::GET, "/r4/Patient/nobody", "rid-404", None).await.status, 404);
    let record = expect_record(&server, "rid-404", me, ("read", "Patient/nobody", "failure")).await;
    assert_eq!(record["status"], 404);
    let search = send(&api, Method::GET, "/r4/Observation?subject=Patient/p1&_count=5", "rid-search", None).await;
    assert_eq!(search.status, 200);
    let record = expect_record(&server, "rid-search", me, ("search", "Observation", "success")).await;
    assert_eq!(record["detail"]["parameters"], json!([["subject", "Patient/p1"], ["_count", "5"]]), "{record}");
    assert_eq!(record["detail"]["returned"], 1);
    assert_eq!(record["patients"], json!(["Patient/p1"]));
    assert_eq!(
        send(&api, Method::DELETE, &format!("/r4/Observation/{observation_id}"), "rid-delete", None).await.status,
        204
    );
    expect_record(
        &server,
        "rid-delete",
        me,
        ("delete", &format!("Observation/{observation_id}/_history/2"), "success"),
    )
    .await;

    // A transaction: one record listing its entries, in the same transaction as the writes.
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": patient(Some("p9"), "Nine"), "request": {"method": "PUT", "url": "Patient/p9"}},
        {"resource": observation(Some("o9"), "p9", 1.0), "request": {"method": "PUT", "url": "Observation/o9"}},
    ]});
    assert_eq!(send(&api, Method::POST, "/r4", "rid-tx", Some(&bundle)).await.status, 200);
    let record = expect_record(&server, "rid-tx", me, ("transaction", "Bundle", "success")).await;
    assert_eq!(record["patients"], json!(["Patient/p9"]), "{record}");
    let targets: Vec<(&str, &str, i64)> = record["detail"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|record| {
            (record["action"].as_str().unwrap(), record["target"].as_str().unwrap(), record["entry"].as_i64().unwrap())
        })
        .collect();
    assert_eq!(targets, [("create", "Patient/p9/_history/1", 0), ("create", "Observation/o9/_history/1", 1)]);

    // An upload: one record with the counts per type.
    let lines = [patient(Some("u1"), "U"), patient(Some("u2"), "V"), observation(Some("uo"), "u1", 2.0)]
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    let upload = Api::send(
        api.request(Method::POST, "/r4/$upload-ndjson")
            .header("x-request-id", "rid-upload")
            .header("content-type", "application/fhir+ndjson")
            .body(lines),
    )
    .await;
    assert_eq!(upload.status, 200, "{}", upload.text());
    let record = expect_record(&server, "rid-upload", me, ("upload", "$upload-ndjson", "success")).await;
    assert_eq!(record["detail"]["stored"], json!({"Observation": 1, "Patient": 2}), "{record}");

    // Exports: a synchronous kick-off and one file download, then an asynchronous kick-off
    // polled and cancelled.
    api.upsert(&group(Some("cohort"), &["p1"])).await;
    let manifest =
        send(&api, Method::GET, "/bulk-data/r4/Group/cohort/$export?_type=Patient,Observation", "rid-kickoff", None)
            .await
            .expect(200);
    let record =
        expect_record(&server, "rid-kickoff", me, ("export.kickoff", "Group/cohort/_history/1", "success")).await;
    assert_eq!(record["detail"]["parameters"], json!([["_type", "Patient,Observation"]]), "{record}");
    assert_eq!(record["detail"]["counts"]["output:patient"], 1, "{record}");
    assert_eq!(record["cohort"]["group"], "Group/cohort", "{record}");
    let file_url = manifest["output"][0]["url"].as_str().unwrap().to_owned();
    let token = file_url.rsplit('/').next().unwrap().trim_end_matches(".ndjson").to_owned();
    let download = send(&api, Method::GET, &file_url, "rid-download", None).await;
    assert_eq!(download.status, 200);
    let record =
        expect_record(&server, "rid-download", me, ("export.download", "Group/cohort/_history/1", "success")).await;
    assert_eq!(record["detail"]["bytes"], download.body.len() as u64, "{record}");
    assert_eq!((record["detail"]["complete"].as_bool(), record["detail"]["resources"].as_u64()), (Some(true), Some(1)));

    let accepted = Api::send(
        api.request(Method::GET, "/bulk-data/r4/Group/cohort/$export")
            .header("prefer", "respond-async")
            .header("x-request-id", "rid-async"),
    )
    .await;
    assert_eq!(accepted.status, 202, "{}", accepted.text());
    let status_url = accepted.header("content-location").unwrap();
    let job = status_url.rsplit('/').next().unwrap().to_owned();
    let record = expect_record(&server, "rid-async", me, ("export.kickoff", "Group/cohort", "success")).await;
    assert_eq!(record["detail"]["job"], job.as_str());
    assert!(matches!(send(&api, Method::GET, &status_url, "rid-status", None).await.status, 200 | 202));
    expect_record(&server, "rid-status", me, ("export.status", &job, "success")).await;
    assert_eq!(send(&api, Method::DELETE, &status_url, "rid-cancel", None).await.status, 202);
    expect_record(&server, "rid-cancel", me, ("export.cancel", &job, "success")).await;

    // Admin API actions; the admin token is the actor.
    let admin_actor = ("admin", None);
    assert_eq!(admin(&server, Method::POST, "/admin/tenants/acme/clients", "rid-client", None).await.status, 201);
    let created_client = records_of(&server, "acme", "rid-client", 1).await.remove(0);
    let new_client = created_client["target"].as_str().unwrap().to_owned();
    expect_record(&server, "rid-client", admin_actor, ("client.create", &new_client, "success")).await;
    let revoke = format!("/admin/clients/{new_client}/revoke");
    assert_eq!(admin(&server, Method::POST, &revoke, "rid-revoke", None).await.status, 204);
    expect_record(&server, "rid-revoke", admin_actor, ("client.revoke", &new_client, "success")).await;
    let third = admin(&server, Method::POST, "/admin/tenants", "rid-tenant", Some(json!({"name": "third"}))).await;
    assert_eq!(third.status, 201);
    let third_records = records_of(&server, "third", "rid-tenant", 1).await;
    assert_eq!(
        (third_records[0]["action"].as_str(), third_records[0]["client"].as_str()),
        (Some("tenant.create"), Some("admin"))
    );

    // A probe from another tenant is in the prober's trail, never in acme's.
    assert_eq!(send(&stranger, Method::GET, "/r4/Patient/p1", "rid-probe", None).await.status, 404);
    let probe = records_of(&server, "other", "rid-probe", 1).await.remove(0);
    assert_eq!(
        (probe["client"].as_str(), probe["outcome"].as_str()),
        (Some(stranger.client_id.as_str()), Some("failure"))
    );
    let acme = audit(&server, "acme", &[]);
    assert!(acme.iter().all(|record| record["tenant"] == "acme" && record["request_id"] != "rid-probe"), "{acme:#?}");
    let other = audit(&server, "other", &[]);
    let acme_ids: Vec<&Value> = acme.iter().map(|record| &record["request_id"]).filter(|id| *id != "").collect();
    assert!(
        other.iter().all(|record| record["tenant"] == "other" && !acme_ids.contains(&&record["request_id"])),
        "{other:#?}"
    );
    assert!(other.iter().all(|record| record["client"] != api.client_id.as_str()), "{other:#?}");

    // Filters: a patient (its reads, writes, searches and the export whose Group held it), a
    // client, a time.
    let p1: Vec<String> = audit(&server, "acme", &["--patient", "Patient/p1"])
        .iter()
        .map(|record| record["request_id"].as_str().unwrap().to_owned())
        .collect();
    for expected in ["rid-create", "rid-read", "rid-vread", "rid-search", "rid-kickoff", "rid-download", "rid-async"] {
        assert!(p1.contains(&expected.to_owned()), "--patient Patient/p1 misses {expected}: {p1:?}");
    }
    for unexpected in ["rid-tx", "rid-upload", "rid-404", "rid-client"] {
        assert!(!p1.contains(&unexpected.to_owned()), "--patient Patient/p1 lists {unexpected}: {p1:?}");
    }
    let by_admin = audit(&server, "acme", &["--client", "admin"]);
    assert_eq!(by_admin.len(), 2, "{by_admin:#?}");
    assert!(audit(&server, "acme", &["--since", "2999-01-01"]).is_empty());
    let downloads = audit(&server, "acme", &["--action", "export.download"]);
    assert_eq!(downloads.len(), 1, "one record per download, not per resource: {downloads:#?}");

    // The admin API: the same records, also as AuditEvent NDJSON; another tenant's stay apart.
    let lines = admin(&server, Method::GET, "/admin/audit?tenant=acme", "rid-audit-json", None).await;
    assert_eq!(lines.status, 200);
    assert_eq!(lines.text().lines().count(), audit(&server, "acme", &[]).len());
    let events =
        admin(&server, Method::GET, "/admin/audit?tenant=acme&format=AuditEvent&action=read", "rid-ae", None).await;
    assert_eq!(events.header("content-type").as_deref(), Some("application/fhir+ndjson"));
    let events: Vec<Value> = events.text().lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(events.len(), 2, "rid-read and rid-404: {events:#?}");
    assert_eq!(events[0]["resourceType"], "AuditEvent");
    assert_eq!(
        events[0]["meta"]["profile"][0],
        "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientRead"
    );
    assert_eq!(events[0]["agent"][0]["who"]["identifier"]["value"], api.client_id.as_str());
    assert!(events[0]["entity"]
        .as_array()
        .unwrap()
        .iter()
        .any(|entity| entity["what"]["identifier"]["value"] == "rid-read"));
    assert_eq!(events[1]["outcome"], "4");
    let refused = admin(&server, Method::GET, "/admin/audit?tenant=nobody", "rid-nobody", None).await;
    assert_eq!(refused.status, 404);
    let unauthorised = Api::send(http_client().get(format!("{}/admin/audit?tenant=acme", server.base))).await;
    assert_eq!(unauthorised.status, 401);

    // No secret or token in the log, nor in the trail (item 2's check, with every one used).
    let log = server.log();
    let trail =
        [server.cli(&["audit", "--tenant", "acme", "--json"]), server.cli(&["audit", "--tenant", "acme", "--fhir"])]
            .concat();
    let secrets = [
        ("the acme client secret", api.client_secret.as_str()),
        ("the other client secret", stranger.client_secret.as_str()),
        ("the admin token", ADMIN_TOKEN),
        ("a file token", token.as_str()),
        ("part of a file token", &token[..24]),
    ];
    for (what, secret) in secrets {
        assert!(!log.contains(secret), "{what} is in the server log");
        assert!(!trail.contains(secret), "{what} is in the audit trail");
    }
    let access_lines = log.lines().filter(|line| line.contains("\"message\":\"access\"")).count();
    assert!(access_lines > 20, "the access log is on: {access_lines} lines");
}
