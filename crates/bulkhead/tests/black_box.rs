//! Black-box tests (tier 3 of STYLE.md): the built `bulkhead` binary, started and driven exactly
//! as a user would, through its command line and over HTTP.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// The flow test's first-generation data: ids the server assigned, and the Group.
struct Cohort {
    p1: String,
    p3: String,
    e3: String,
    o1b: String,
    o3: String,
    group: String,
}

/// Writes Patients and Observations one by one and through a transaction Bundle (checking the
/// `urn:uuid:` references were rewritten), and a Group of p1, p2 and p3. p4 is not a member.
async fn load_cohort(api: &Api) -> Cohort {
    let p1 = api.create(&patient(None, "One")).await;
    api.upsert(&patient(Some("p2"), "Two")).await;
    api.upsert(&observation(Some("o1a"), &p1, 70.0)).await;
    let o1b = api.create(&observation(None, &p1, 71.0)).await;
    api.upsert(&observation(Some("o2a"), "p2", 60.0)).await;
    api.upsert(&patient(Some("p4"), "Four")).await;
    api.upsert(&observation(Some("o4a"), "p4", 50.0)).await;

    let (pat, enc, obs) = (
        "urn:uuid:6f1e2c0a-1111-4a8e-9d6b-000000000001",
        "urn:uuid:6f1e2c0a-1111-4a8e-9d6b-000000000002",
        "urn:uuid:6f1e2c0a-1111-4a8e-9d6b-000000000003",
    );
    let mut bundle_observation = observation(None, "placeholder", 80.0);
    bundle_observation["subject"]["reference"] = pat.into();
    bundle_observation["encounter"] = json!({"reference": enc});
    let encounter = json!({"resourceType": "Encounter", "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}, "subject": {"reference": pat}});
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": pat, "resource": patient(None, "Three"), "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": enc, "resource": encounter, "request": {"method": "POST", "url": "Encounter"}},
        {"fullUrl": obs, "resource": bundle_observation, "request": {"method": "POST", "url": "Observation"}},
    ]});
    let response = api.post("/r4", &bundle).await.expect(200);
    assert_eq!(response["type"], "transaction-response");
    let assigned = |index: usize, resource_type: &str| -> String {
        let location = response["entry"][index]["response"]["location"].as_str().expect("location");
        let rest = location.strip_prefix(&format!("{resource_type}/")).unwrap_or_else(|| panic!("location {location}"));
        rest.split('/').next().unwrap().to_owned()
    };
    let (p3, e3, o3) = (assigned(0, "Patient"), assigned(1, "Encounter"), assigned(2, "Observation"));
    let stored = api.read(&format!("Observation/{o3}")).await;
    assert_eq!(
        stored["subject"]["reference"],
        format!("Patient/{p3}"),
        "urn:uuid reference rewritten to the assigned id"
    );
    assert_eq!(stored["encounter"]["reference"], format!("Encounter/{e3}"));
    assert_eq!(api.read(&format!("Encounter/{e3}")).await["subject"]["reference"], format!("Patient/{p3}"));
    assert_eq!(api.read(&format!("Patient/{p3}")).await["name"][0]["family"], "Three");

    let group = api.create(&common::group(None, &[&p1, "p2", &p3])).await;
    Cohort { p1, p3, e3, o1b, o3, group }
}

/// Kicks off a synchronous export and checks the manifest's fixed fields.
async fn export(api: &Api, url: &str) -> Value {
    let request = api.request(reqwest::Method::GET, url).header("accept", "application/fhir+json");
    let reply = Api::send(request).await;
    assert_eq!(reply.status, 200, "{url}: {}", reply.text());
    let media = reply.header("content-type").unwrap_or_default();
    assert!(media.starts_with("application/json"), "manifest content type {media}");
    let manifest = reply.json();
    assert!(manifest["transactionTime"].as_str().is_some_and(|time| time.ends_with('Z')), "{manifest}");
    assert_eq!(manifest["request"], url, "the manifest's request is the full kick-off URL");
    assert_eq!(manifest["requiresAccessToken"], true);
    manifest
}

/// Items 1 and 2 of the brief: CLI admin on a live server's data directory, then the whole
/// synchronous (1upHealth style) Group export flow, including `_since`.
#[tokio::test]
async fn cli_credentials_work_at_once_and_the_synchronous_group_export_is_exact() {
    // Small parts so that a type spans several files; configured through a TOML file.
    let server =
        Server::start_with(Options { config_toml: Some("export_part_size = 2\n".into()), ..Default::default() }).await;

    // The operator creates the tenant and client while the server runs; they work at once.
    server.create_tenant("acme");
    let api = server.create_client("acme");
    assert_eq!(api.get("/r4/Patient").await.expect(200)["resourceType"], "Bundle");

    let c = load_cohort(&api).await;
    let kick_off = format!("{}/bulk-data/r4/Group/{}/$export", server.base, c.group);
    let manifest = export(&api, &kick_off).await;
    let t1 = manifest["transactionTime"].as_str().unwrap().to_owned();
    let first = download_list(&api, &manifest, "output").await;
    let expected = expected_ids(&[
        ("Encounter", &[&c.e3]),
        ("Group", &[&c.group]),
        ("Observation", &["o1a", &c.o1b, "o2a", &c.o3]),
        ("Patient", &[&c.p1, "p2", &c.p3]),
    ]);
    assert_eq!(ids_by_type(&first), expected, "first export: exactly the members' data");
    assert_belongs_to_members(&first, &[&c.p1, "p2", &c.p3], &c.group);
    assert_eq!(first["Observation"].len(), 2, "export_part_size = 2 splits 4 Observations into 2 files");

    // Everything changes after the export: p2 leaves and p4 joins, a member's resource is
    // updated (twice), one created and one deleted.
    api.upsert(&common::group(Some(&c.group), &[&c.p1, &c.p3, "p4"])).await;
    assert_eq!(api.upsert(&observation(Some("o1a"), &c.p1, 72.0)).await["meta"]["versionId"], "2");
    api.upsert(&observation(Some("o1a"), &c.p1, 73.0)).await;
    let o1c = api.create(&observation(None, &c.p1, 74.0)).await;
    let deleted = api.delete(&format!("/r4/Observation/{}", c.o3)).await;
    assert_eq!(deleted.status, 204, "{}", deleted.text());
    assert_eq!(api.get(&format!("/r4/Observation/{}", c.o3)).await.status, 410);

    // The first export's files still download as the same bytes: they are a snapshot.
    for file in first.values().flatten() {
        let again = api.get(&file.url).await;
        assert_eq!(again.status, 200);
        assert!(
            again.body == file.bytes,
            "second download of {} differs:\n{}\nwas:\n{}",
            file.url,
            again.text(),
            String::from_utf8_lossy(&file.bytes)
        );
    }
    // Gzip on request, same content.
    for file in &first["Observation"] {
        let gz = Api::send(api.request(reqwest::Method::GET, &file.url).header("accept-encoding", "gzip")).await;
        assert_eq!(gz.status, 200);
        assert_eq!(gz.header("content-encoding").as_deref(), Some("gzip"));
        assert_eq!(gz.header("content-type").as_deref(), Some("application/fhir+ndjson"));
        assert!(gunzip(&gz.body) == file.bytes, "the gzip download of {} decompresses to other bytes", file.url);
    }

    // `_since` the first export: exactly the changes, plus the new member's full data.
    let since_kick_off = format!("{kick_off}?_since={t1}");
    let manifest = export(&api, &since_kick_off).await;
    let t2 = manifest["transactionTime"].as_str().unwrap();
    assert!(t2 > t1.as_str(), "transactionTime moves forward: {t1} then {t2}");
    let changes = download_list(&api, &manifest, "output").await;
    let expected =
        expected_ids(&[("Group", &[&c.group]), ("Observation", &["o1a", &o1c, "o4a"]), ("Patient", &["p4"])]);
    assert_eq!(ids_by_type(&changes), expected, "_since export: the changes and p4's full data, each once");
    assert_belongs_to_members(&changes, &[&c.p1, &c.p3, "p4"], &c.group);
    let o1a = all_lines(&changes).find(|line| line["id"] == "o1a").unwrap();
    assert_eq!(
        (o1a["valueQuantity"]["value"].as_f64(), o1a["meta"]["versionId"].as_str()),
        (Some(73.0), Some("3")),
        "the latest version"
    );
    assert_eq!(
        all_lines(&changes).find(|line| line["resourceType"] == "Group").unwrap()["member"].as_array().unwrap().len(),
        3
    );

    let deleted_files = download_list(&api, &manifest, "deleted").await;
    assert_eq!(deleted_files.keys().collect::<Vec<_>>(), vec!["Bundle"], "deleted[] files are Bundles");
    let mut deleted_urls = Vec::new();
    for bundle in all_lines(&deleted_files) {
        assert_eq!(bundle["type"], "transaction", "{bundle}");
        for entry in bundle["entry"].as_array().expect("entries") {
            assert_eq!(entry["request"]["method"], "DELETE", "{entry}");
            deleted_urls.push(entry["request"]["url"].as_str().expect("request.url").to_owned());
        }
    }
    assert_eq!(deleted_urls, vec![format!("Observation/{}", c.o3)]);
    assert_eq!(manifest["extension"]["removedMembers"], json!(["Patient/p2"]));
}

/// Item 3: tenants never see each other's data, nor users within a tenant.
#[tokio::test]
async fn tenants_never_see_each_other() {
    let server = Server::start().await;
    server.create_tenant("acme");
    server.create_tenant("globex");
    let acme = server.create_client("acme");
    let globex = server.create_client("globex");

    acme.upsert(&patient(Some("shared"), "Acme")).await;
    acme.upsert(&observation(Some("acme-obs"), "shared", 1.0)).await;
    acme.upsert(&group(Some("cohort"), &["shared"])).await;
    // The same id in the other tenant is another resource.
    globex.upsert(&patient(Some("shared"), "Globex")).await;
    assert_eq!(globex.read("Patient/shared").await["name"][0]["family"], "Globex");
    assert_eq!(acme.read("Patient/shared").await["name"][0]["family"], "Acme");

    let manifest = acme.get("/bulk-data/r4/Group/cohort/$export").await.expect(200);
    let file_urls: Vec<String> =
        manifest["output"].as_array().unwrap().iter().map(|item| item["url"].as_str().unwrap().to_owned()).collect();
    assert_eq!(file_urls.len(), 3, "Group, Observation and Patient files: {manifest}");

    for path in [
        "/r4/Group/cohort",
        "/r4/Observation/acme-obs",
        "/bulk-data/r4/Group/cohort/$export?_type=Observation",
        "/r4/Group/cohort/$export",
    ] {
        globex.get(path).await.expect_outcome(404);
    }
    let found = globex.get("/r4/Observation?_id=acme-obs").await.expect(200);
    assert_eq!(found["entry"].as_array().map_or(0, Vec::len), 0, "another tenant's resource found by search: {found}");
    let found = globex.get("/r4/Group").await.expect(200);
    assert_eq!(found["entry"].as_array().map_or(0, Vec::len), 0, "another tenant's Group found by search: {found}");
    for path in ["/r4/Observation/acme-obs", "/r4/Group/cohort"] {
        globex.delete(path).await.expect_outcome(404);
    }
    for url in &file_urls {
        let reply = globex.get(url).await;
        reply.expect_outcome(404);
        assert!(!reply.text().contains("Acme"));
    }
    // Acme's data survived every attempt, and its files still download.
    assert_eq!(acme.read("Group/cohort").await["member"].as_array().unwrap().len(), 1);
    assert_eq!(acme.read("Observation/acme-obs").await["subject"]["reference"], "Patient/shared");
    assert_eq!(download_list(&acme, &manifest, "output").await.len(), 3);

    // Globex's own Group of the same id exports only Globex's data.
    globex.upsert(&group(Some("cohort"), &["shared"])).await;
    let manifest = globex.get("/bulk-data/r4/Group/cohort/$export").await.expect(200);
    let files = download_list(&globex, &manifest, "output").await;
    assert_eq!(ids_by_type(&files), expected_ids(&[("Group", &["cohort"]), ("Patient", &["shared"])]));
    assert_eq!(files["Patient"][0].lines[0]["name"][0]["family"], "Globex");
}

/// Item 3, inside a tenant: a user-scoped request (`x-oneup-user-id`) never sees another
/// user's resources, not even through an export of its own Group that names them.
#[tokio::test]
async fn users_never_see_each_other() {
    let server = Server::start().await;
    server.create_tenant("acme");
    let acme = server.create_client("acme");
    let (alice, bob) = (acme.as_user("alice"), acme.as_user("bob"));
    bob.upsert(&patient(Some("bob-pat"), "Bob")).await;
    bob.upsert(&observation(Some("bob-obs"), "bob-pat", 2.0)).await;
    alice.upsert(&patient(Some("alice-pat"), "Alice")).await;
    alice.upsert(&observation(Some("alice-obs"), "alice-pat", 3.0)).await;
    assert_eq!(bob.read("Patient/bob-pat").await["id"], "bob-pat");
    assert_eq!(acme.read("Patient/bob-pat").await["id"], "bob-pat", "the tenant as a whole sees every user's data");

    alice.get("/r4/Patient/bob-pat").await.expect_outcome(404);
    alice.get("/r4/Observation/bob-obs").await.expect_outcome(404);
    let patients = alice.get("/r4/Patient").await.expect(200);
    let seen: Vec<&str> =
        patients["entry"].as_array().unwrap().iter().map(|entry| entry["resource"]["id"].as_str().unwrap()).collect();
    assert_eq!(seen, vec!["alice-pat"]);
    let observations = alice.get("/r4/Observation?subject=Patient/bob-pat").await.expect(200);
    assert_eq!(observations["entry"].as_array().map_or(0, Vec::len), 0, "{observations}");

    alice.upsert(&group(Some("alice-cohort"), &["alice-pat", "bob-pat"])).await;
    let manifest = alice.get("/bulk-data/r4/Group/alice-cohort/$export").await.expect(200);
    let files = download_list(&alice, &manifest, "output").await;
    assert_eq!(
        ids_by_type(&files),
        expected_ids(&[("Group", &["alice-cohort"]), ("Observation", &["alice-obs"]), ("Patient", &["alice-pat"])])
    );
    // Bob cannot download alice's files either.
    for file in files.values().flatten() {
        bob.get(&file.url).await.expect_outcome(404);
    }
}

/// Item 4: bad input is refused with the right status and an OperationOutcome, and changes
/// nothing.
#[tokio::test]
async fn bad_requests_are_refused_and_change_nothing() {
    let env = vec![("BULKHEAD_MAX_BODY_BYTES".to_owned(), "2048".to_owned())];
    let server = Server::start_with(Options { env, ..Default::default() }).await;
    server.create_tenant("acme");
    let api = server.create_client("acme");
    api.upsert(&patient(Some("p1"), "Original")).await;
    api.upsert(&group(Some("g"), &["p1"])).await;
    let original = api.get("/r4/Patient/p1").await;
    assert_eq!(original.status, 200);
    let unchanged = || async {
        let now = api.get("/r4/Patient/p1").await;
        assert!(now.status == 200 && now.body == original.body, "Patient/p1 changed: {}", now.text());
        let all = api.get("/r4/Patient").await.expect(200);
        assert_eq!(all["entry"].as_array().unwrap().len(), 1, "a refused write created something: {all}");
    };
    let mut changed = patient(Some("p1"), "Changed");

    // Credentials: 401, without saying which part was wrong.
    let wrong_secret = api.with_secret(&api.client_id, "not-the-secret");
    let unknown_id = api.with_secret("bh_00000000deadbeef", &api.client_secret);
    let refused_secret = wrong_secret.get("/r4/Patient/p1").await;
    let refused_id = unknown_id.get("/r4/Patient/p1").await;
    refused_secret.expect_outcome(401);
    refused_id.expect_outcome(401);
    assert_eq!(refused_secret.text(), refused_id.text(), "the 401 must not tell a wrong id from a wrong secret");
    Api::send(http_client().get(format!("{}/r4/Patient/p1", server.base))).await.expect_outcome(401);
    wrong_secret.put("/r4/Patient/p1", &changed).await.expect_outcome(401);
    wrong_secret.delete("/r4/Patient/p1").await.expect_outcome(401);
    wrong_secret.get("/bulk-data/r4/Group/g/$export").await.expect_outcome(401);
    unchanged().await;

    // Malformed JSON: 400.
    let malformed = r#"{"resourceType": "Patient", "id": "p1", "name": [{"family": "Changed"}"#;
    for (method, path) in [
        (reqwest::Method::PUT, "/r4/Patient/p1"),
        (reqwest::Method::POST, "/r4/Patient"),
        (reqwest::Method::POST, "/r4"),
    ] {
        let request = api.request(method, path).header("content-type", "application/fhir+json").body(malformed);
        Api::send(request).await.expect_outcome(400);
    }
    unchanged().await;

    // FHIR XML is not served: 406.
    Api::send(api.request(reqwest::Method::GET, "/r4/Patient/p1").header("accept", "application/fhir+xml"))
        .await
        .expect_outcome(406);

    // Larger than max_body_bytes (2048 here): 413.
    changed["name"][0]["family"] = "x".repeat(4096).into();
    api.put("/r4/Patient/p1", &changed).await.expect_outcome(413);
    api.post("/r4/Patient", &changed).await.expect_outcome(413);
    unchanged().await;

    // A body id that contradicts the URL: 400.
    changed["name"][0]["family"] = "Changed".into();
    changed["id"] = "p2".into();
    api.put("/r4/Patient/p1", &changed).await.expect_outcome(400);
    changed["id"] = "p1".into();
    // A transaction with one bad entry writes nothing at all.
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": changed, "request": {"method": "PUT", "url": "Patient/p1"}},
        {"resource": patient(None, "New"), "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "NotAType"}, "request": {"method": "POST", "url": "NotAType"}},
    ]});
    let reply = api.post("/r4", &bundle).await;
    assert!(matches!(reply.status, 400 | 422), "bad transaction: {} {}", reply.status, reply.text());
    reply.expect_outcome(reply.status);
    unchanged().await;

    // A type a Group export cannot hold: 400 naming it.
    let outcome = api.get("/bulk-data/r4/Group/g/$export?_type=Practitioner").await.expect_outcome(400);
    assert!(outcome.to_string().contains("Practitioner"), "the OperationOutcome names the refused type: {outcome}");

    // File URLs: credentials required, and a tampered token gives no data.
    let manifest = api.get("/bulk-data/r4/Group/g/$export?_type=Patient").await.expect(200);
    let url = manifest["output"][0]["url"].as_str().expect("a Patient file").to_owned();
    Api::send(http_client().get(&url)).await.expect_outcome(401);
    let (prefix, token) = url.rsplit_once('/').unwrap();
    let token = token.strip_suffix(".ndjson").unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT-like token: {token}");
    // Replaces a character well inside a segment (every bit of it is significant there).
    let flip = |segment: &str, at: usize| -> String {
        segment
            .char_indices()
            .map(|(index, ch)| {
                if index != at {
                    ch
                } else if ch == 'A' {
                    'B'
                } else {
                    'A'
                }
            })
            .collect()
    };
    let tampered = [
        format!("{prefix}/{}.{}.{}.ndjson", parts[0], parts[1], flip(parts[2], 5)),
        format!("{prefix}/{}.{}.{}.ndjson", parts[0], flip(parts[1], parts[1].len() / 2), parts[2]),
        format!("{prefix}/{}.{}.ndjson", parts[0], parts[1]),
        format!("{prefix}/{token}x.ndjson"),
        url.replace("/$export/Patient/", "/$export/Observation/"),
    ];
    for bad in &tampered {
        let reply = api.get(bad).await;
        assert!(matches!(reply.status, 401 | 404), "tampered URL {bad}: {} {}", reply.status, reply.text());
        reply.expect_outcome(reply.status);
        assert!(!reply.text().contains("Original"), "a tampered URL returned data: {}", reply.text());
    }
    let genuine = api.get(&url).await;
    assert!(genuine.status == 200 && genuine.text().contains("Original"), "{}", genuine.text());
}

/// Item 5: SIGTERM with nothing in flight (an idle keep-alive connection open) stops the server
/// promptly with success, and the data is there on the next start.
#[tokio::test]
async fn sigterm_stops_an_idle_server_cleanly() {
    let mut server = Server::start().await;
    server.create_tenant("acme");
    let api = server.create_client("acme");
    api.upsert(&patient(Some("p1"), "Kept")).await;
    let status = server.terminate(Duration::from_secs(5));
    assert!(status.success(), "exit status after SIGTERM: {status}\n{}", server.log());
    assert!(http_client().get(format!("{}/healthz", server.base)).send().await.is_err(), "still answering after exit");
    // Logs sent to a file (not a terminal) are plain text, without colour escape codes.
    let log = server.log();
    assert!(log.contains("bulkhead listening"), "{log}");
    assert!(!log.contains('\u{1b}'), "terminal escape codes in a log file:\n{log}");
    let restarted = Server::start_with(Options { data_dir: Some(server.data_dir.clone()), ..Default::default() }).await;
    let api = Api { base: restarted.base.clone(), ..api };
    assert_eq!(api.read("Patient/p1").await["name"][0]["family"], "Kept");
}

/// Item 7: a bad configuration value stops startup with an error that names the key.
#[test]
fn a_configuration_error_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let serve = |configure: &dyn Fn(&mut Command)| {
        let mut command = bulkhead();
        command.args(["serve", "--listen", &listen, "--data-dir"]).arg(dir.path().join("data"));
        configure(&mut command);
        let output = run_with_deadline(command, Duration::from_secs(20));
        assert!(!output.status.success(), "serve started despite a bad configuration");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let stderr = serve(&|command| {
        command.env("BULKHEAD_EXPORT_PART_SIZE", "abc");
    });
    assert!(stderr.contains("export_part_size"), "stderr does not name the key:\n{stderr}");
    let file = dir.path().join("bulkhead.toml");
    std::fs::write(&file, "max_body_bytes = 4096\nexport_part_sise = 10\n").unwrap();
    let stderr = serve(&|command| {
        command.arg("--config").arg(&file);
    });
    assert!(stderr.contains("export_part_sise"), "stderr does not name the misspelt key:\n{stderr}");
}
