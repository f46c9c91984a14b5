//! Black-box: SMART Backend Services with a published Bulk Data client. `smart-fetch` (PyPI,
//! pinned) is installed once into a virtual environment under the target directory; it reads
//! the server's discovery and CapabilityStatement, gets a token with an ES384 client assertion
//! and completes a Group export, whose files are checked resource by resource. The same client
//! then exports with HTTP Basic. Also here: failed token requests count toward the failed-login
//! limit, and `bulkhead keys rotate` on a running server.
//!
//! Needs python3 with venv and pip, and the package registry: when `CI` is set a missing
//! environment fails the test; otherwise the client tests skip with a loud message.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::*;
use serde_json::{json, Value};

/// The client under test, pinned: its behaviour (scopes per type, `_type` from the
/// CapabilityStatement, `_since` only with `_lastUpdated`) is what this test relies on.
const SMART_FETCH: &str = "smart-fetch==1.0.3";

/// The virtual environment with smart-fetch, made once per target directory; `None` (after a
/// loud message) when it cannot be built outside CI.
fn smart_fetch() -> Option<&'static Path> {
    static VENV: OnceLock<Option<PathBuf>> = OnceLock::new();
    VENV.get_or_init(|| {
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("smart-fetch-1.0.3-venv");
        let program = venv.join("bin").join("smart-fetch");
        let marker = venv.join("installed");
        if marker.is_file() && program.is_file() {
            return Some(program);
        }
        if which("python3").is_none() {
            if std::env::var_os("CI").is_some() {
                panic!("CI is set, so python3 must be installed for the smart-fetch tests");
            }
            eprintln!("\n*** SKIPPED: no python3; the real-client SMART tests did NOT run ***\n");
            return None;
        }
        let _ = std::fs::remove_dir_all(&venv);
        let mut create = Command::new("python3");
        create.arg("-m").arg("venv").arg(&venv);
        let mut install = Command::new(venv.join("bin").join("pip"));
        install.args(["install", "--quiet", "--disable-pip-version-check", SMART_FETCH]);
        for (what, command) in [("python3 -m venv", create), ("pip install smart-fetch", install)] {
            let (status, _, stderr) = run_to_files(command, Duration::from_secs(600), &venv.with_extension("log"));
            if !status.success() {
                let why = format!("`{what}` failed: {status}\n{stderr}");
                if std::env::var_os("CI").is_some() {
                    panic!("CI is set, so the smart-fetch environment must build: {why}");
                }
                eprintln!(
                    "\n*** SKIPPED: the smart-fetch environment could not be built; the real-client SMART tests did NOT run ***\n{why}"
                );
                return None;
            }
        }
        std::fs::write(&marker, SMART_FETCH).expect("writing the venv marker");
        Some(program)
    })
    .as_deref()
}

/// A new EC P-384 key: (the private JWK smart-fetch signs with, the public JWK Bulkhead holds).
fn es384_key(kid: &str) -> (Value, Value) {
    use p384::elliptic_curve::sec1::ToSec1Point;
    let secret = loop {
        let mut bytes = [0u8; 48];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
        if let Ok(secret) = p384::SecretKey::from_slice(&bytes) {
            break secret;
        }
    };
    let point = secret.public_key().to_sec1_point(false);
    let (x, y) = (URL_SAFE_NO_PAD.encode(point.x().unwrap()), URL_SAFE_NO_PAD.encode(point.y().unwrap()));
    let d = URL_SAFE_NO_PAD.encode(secret.to_bytes());
    let public =
        json!({"kty": "EC", "crv": "P-384", "kid": kid, "alg": "ES384", "key_ops": ["verify"], "x": x, "y": y});
    let private =
        json!({"kty": "EC", "crv": "P-384", "kid": kid, "alg": "ES384", "key_ops": ["sign"], "x": x, "y": y, "d": d});
    (private, public)
}

/// Two member patients with Observations, Conditions and an Encounter, and one non-member
/// with data of its own; returns the Group id and, per type, the ids the export must hold.
async fn cohort(api: &Api) -> (String, BTreeMap<String, BTreeSet<String>>) {
    let mut expected: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut members = Vec::new();
    for (index, family) in ["Ames", "Baker", "Outsider"].iter().enumerate() {
        let patient = api.create(&patient(None, family)).await;
        let subject = json!({"reference": format!("Patient/{patient}")});
        let observation = api.create(&observation(None, &patient, 70.0 + index as f64)).await;
        let condition = api
            .create(&json!({"resourceType": "Condition", "subject": subject,
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]}}))
            .await;
        let encounter = api
            .create(&json!({"resourceType": "Encounter", "status": "finished", "subject": subject,
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}}))
            .await;
        if *family == "Outsider" {
            continue;
        }
        for (resource_type, id) in
            [("Patient", &patient), ("Observation", &observation), ("Condition", &condition), ("Encounter", &encounter)]
        {
            expected.entry(resource_type.to_owned()).or_default().insert(id.clone());
        }
        members.push(patient);
    }
    let members: Vec<&str> = members.iter().map(String::as_str).collect();
    let group = api.create(&group(None, &members)).await;
    (group, expected)
}

/// Every resource in the NDJSON files (plain or gzipped) under `dir`, as type → ids; panics on
/// a resource written twice.
fn exported(dir: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut found: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).expect("reading the export directory") {
            let path = entry.expect("directory entry").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            // smart-fetch links finished files into the output folder; read each file once.
            if path.is_symlink() {
                continue;
            }
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            // Resource files are named after their type (Patient.000.ndjson.gz); smart-fetch's
            // own logs (log.ndjson) are not resources.
            if !name.starts_with(|c: char| c.is_ascii_uppercase()) {
                continue;
            }
            let bytes = std::fs::read(&path).expect("reading an export file");
            let text = if name.ends_with(".ndjson.gz") {
                String::from_utf8(gunzip(&bytes)).unwrap()
            } else if name.ends_with(".ndjson") {
                String::from_utf8(bytes).unwrap()
            } else {
                continue;
            };
            for line in text.lines().filter(|line| !line.trim().is_empty()) {
                let resource: Value = serde_json::from_str(line).expect("an NDJSON line");
                let (resource_type, id) =
                    (resource["resourceType"].as_str().unwrap(), resource["id"].as_str().unwrap());
                assert!(
                    found.entry(resource_type.to_owned()).or_default().insert(id.to_owned()),
                    "{resource_type}/{id} exported twice ({})",
                    path.display()
                );
            }
        }
    }
    found
}

/// Runs smart-fetch's Group export into a new folder and returns what it wrote.
fn run_smart_fetch(
    program: &Path,
    base: &str,
    group: &str,
    auth: &[String],
    work: &Path,
) -> BTreeMap<String, BTreeSet<String>> {
    let output_dir = work.join("export");
    let mut command = Command::new(program);
    command
        .args(["export", "--fhir-url", &format!("{base}/r4"), "--group", group, "--export-mode", "bulk"])
        .args([
            "--type",
            "Patient,Observation,Condition,Encounter",
            "--no-default-filters",
            "--hydration-tasks",
            "none",
        ])
        .args(auth)
        .arg(&output_dir)
        .env("NO_COLOR", "1")
        .env("TERM", "dumb");
    let (status, stdout, stderr) = run_to_files(command, Duration::from_secs(300), &work.join("smart-fetch"));
    assert!(status.success(), "smart-fetch failed ({status}):\n{stdout}\n{stderr}");
    exported(&output_dir)
}

/// Runs `command` with its output in files beside `log` (a chatty child never blocks on a full
/// pipe), killing it after `deadline`; returns its status, stdout and stderr.
fn run_to_files(mut command: Command, deadline: Duration, log: &Path) -> (std::process::ExitStatus, String, String) {
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    let (out, err) = (log.with_extension("stdout"), log.with_extension("stderr"));
    command
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    let mut child = command.spawn().expect("spawning the command");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the command") {
            break status;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{command:?} did not finish within {deadline:?}:\n{}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
    (status, read(&out), read(&err))
}

#[tokio::test]
async fn smart_fetch_exports_a_group_with_an_es384_token_and_with_basic() {
    let Some(program) = smart_fetch() else { return };
    let server = Server::start().await;
    server.create_tenant("acme");
    let loader = server.create_client("acme");
    let (group, expected) = cohort(&loader).await;

    let work = tempfile::tempdir().unwrap();
    let (private, public) = es384_key("smart-fetch-1");
    let public_file = work.path().join("public.jwks.json");
    std::fs::write(&public_file, json!({"keys": [public]}).to_string()).unwrap();
    let stdout = server.cli(&[
        "client",
        "create",
        "--tenant",
        "acme",
        "--jwks-file",
        &public_file.display().to_string(),
        "--scopes",
        "system/*.rs",
        "--token-ttl",
        "600s",
        "--json",
    ]);
    let created: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| panic!("one JSON object: {stdout}"));
    let client_id = created["client_id"].as_str().unwrap().to_owned();
    let client_secret = created["client_secret"].as_str().unwrap().to_owned();
    assert_eq!(created["scopes"], "system/*.rs");

    // SMART Backend Services: a private_key_jwt assertion signed ES384.
    let private_file = work.path().join("client.jwks");
    std::fs::write(&private_file, json!({"keys": [private]}).to_string()).unwrap();
    let smart = run_smart_fetch(
        program,
        &server.base,
        &group,
        &["--smart-client-id".into(), client_id.clone(), "--smart-key".into(), private_file.display().to_string()],
        &work.path().join("smart"),
    );
    assert_eq!(smart, expected, "the SMART export holds exactly the members' resources of the requested types");
    let log = server.log();
    assert!(log.contains("access token issued"), "the export used a token:\n{log}");
    assert!(!log.contains(&client_secret), "the log shows no secret");

    // HTTP Basic with the same client's secret.
    let password_file = work.path().join("password");
    std::fs::write(&password_file, &client_secret).unwrap();
    let basic = run_smart_fetch(
        program,
        &server.base,
        &group,
        &["--basic-user".into(), client_id, "--basic-passwd".into(), password_file.display().to_string()],
        &work.path().join("basic"),
    );
    assert_eq!(basic, expected, "the Basic export holds exactly the members' resources");
}

/// A bad client assertion, as an attacker guessing keys would send.
fn bad_token_request(http: &reqwest::Client, base: &str) -> reqwest::RequestBuilder {
    let form = "grant_type=client_credentials&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion=eyJhbGciOiJFUzM4NCJ9.e30.AAAA&scope=system%2F*.rs";
    http.post(format!("{base}/auth/token")).header("content-type", "application/x-www-form-urlencoded").body(form)
}

#[tokio::test]
async fn failed_token_requests_count_toward_the_failed_login_limit() {
    let options = Options { config_toml: Some("failed_logins_per_peer = 3\n".into()), ..Default::default() };
    let server = Server::start_with(options).await;
    let http = http_client();
    for _ in 0..3 {
        let reply = Api::send(bad_token_request(&http, &server.base)).await;
        assert_eq!(reply.status, 401, "{}", reply.text());
        assert_eq!(reply.json()["error"], "invalid_client");
    }
    let reply = Api::send(bad_token_request(&http, &server.base)).await;
    assert_eq!(reply.status, 429, "{}", reply.text());
    assert!(reply.header("retry-after").is_some());
}

/// The `kid` in a JWT's header.
fn kid_of(jwt: &str) -> String {
    let header = jwt.split('.').next().unwrap();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    header["kid"].as_str().unwrap().to_owned()
}

fn file_token(url: &str) -> &str {
    url.rsplit('/').next().unwrap().strip_suffix(".ndjson").unwrap()
}

#[tokio::test]
async fn keys_rotate_on_a_running_server_new_urls_use_the_new_key_and_old_ones_still_work() {
    let server = Server::start().await;
    server.create_tenant("acme");
    let api = server.create_client("acme");
    let (group, _) = cohort(&api).await;
    let kick_off = format!("/bulk-data/r4/Group/{group}/$export?_type=Patient");
    let before = api.get(&kick_off).await.expect(200);
    let old_url = before["output"][0]["url"].as_str().unwrap().to_owned();
    assert_eq!(kid_of(file_token(&old_url)), "k1");

    let said = server.cli(&["keys", "rotate"]);
    assert!(said.contains("new signing key k2"), "{said}");
    let started = Instant::now();
    let new_url = loop {
        let after = api.get(&kick_off).await.expect(200);
        let url = after["output"][0]["url"].as_str().unwrap().to_owned();
        if kid_of(file_token(&url)) == "k2" {
            break url;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the server never picked up the new key");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for url in [&old_url, &new_url] {
        let reply = api.get(url).await;
        assert_eq!(reply.status, 200, "{url}: {}", reply.text());
        assert_eq!(reply.text().lines().count(), 2, "the two members");
    }
}
