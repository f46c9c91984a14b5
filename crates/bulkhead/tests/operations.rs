//! Operations, through the real binary: the access log (one JSON line per request, with the
//! caller, the route template and the bytes sent, and never a secret or a file token) and the
//! health probes (`/healthz/ready` goes 503 when the data directory becomes unwritable while
//! `/healthz/live` stays 200).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The access lines (JSON) of the server log whose request id is `request_id`.
fn access_lines(log: &str, request_id: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["fields"]["message"] == "access" && line["fields"]["request_id"] == request_id)
        .map(|line| line["fields"].clone())
        .collect()
}

/// Waits (a download's line is written when its body ends) until `request_id` has a line.
async fn access_line(server: &Server, request_id: &str) -> Value {
    let started = Instant::now();
    loop {
        let log = server.log();
        let lines = access_lines(&log, request_id);
        if !lines.is_empty() || started.elapsed() > Duration::from_secs(10) {
            assert_eq!(lines.len(), 1, "exactly one access line for request {request_id}:\n{log}");
            return lines.into_iter().next().unwrap_or_default();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `method target` with the request id `request_id` (so its line can be found).
async fn send(api: &Api, method: reqwest::Method, target: &str, request_id: &str, body: Option<&Value>) -> Reply {
    let mut request = api.request(method, target).header("x-request-id", request_id);
    if let Some(body) = body {
        request = request.header("content-type", "application/fhir+json").body(body.to_string());
    }
    Api::send(request).await
}

#[tokio::test]
async fn every_request_gets_one_access_line_without_secrets() {
    let server =
        Server::start_with(Options { env: vec![("BULKHEAD_LOG_FORMAT".into(), "json".into())], ..Default::default() })
            .await;
    server.create_tenant("acme");
    let api = server.create_client("acme");
    use reqwest::Method;

    let write = send(&api, Method::PUT, "/r4/Patient/p1", "rid-write", Some(&patient(Some("p1"), "One"))).await;
    assert_eq!(write.status, 201, "{}", write.text());
    api.upsert(&group(Some("cohort"), &["p1"])).await;
    let read = send(&api, Method::GET, "/r4/Patient/p1", "rid-read", None).await;
    assert_eq!(read.status, 200);
    let missing = send(&api, Method::GET, "/r4/Patient/nobody", "rid-404", None).await;
    assert_eq!(missing.status, 404);
    let manifest = send(&api, Method::GET, "/bulk-data/r4/Group/cohort/$export", "rid-manifest", None).await;
    assert_eq!(manifest.status, 200, "{}", manifest.text());
    let manifest = manifest.json();
    let file_url = manifest["output"]
        .as_array()
        .and_then(|output| output.iter().find(|item| item["type"] == "Patient"))
        .and_then(|item| item["url"].as_str())
        .unwrap_or_else(|| panic!("no Patient file in {manifest}"))
        .to_owned();
    let token = file_url.rsplit('/').next().and_then(|file| file.strip_suffix(".ndjson")).expect("token").to_owned();
    let download = send(&api, Method::GET, &file_url, "rid-download", None).await;
    assert_eq!(download.status, 200);
    assert!(!download.body.is_empty());
    // A failed login: the secret tried must not reach the log either.
    let wrong_secret = "WrongSecretWrongSecretWrongSecretWrongSecret";
    let impostor = api.with_secret(&api.client_id, wrong_secret);
    let refused = send(&impostor, Method::GET, "/r4/Patient/p1", "rid-401", None).await;
    assert_eq!(refused.status, 401);

    let expected: [(&str, &str, &str, u16, Option<usize>); 6] = [
        ("rid-write", "PUT", "/r4/{type}/{id}", 201, Some(write.body.len())),
        ("rid-read", "GET", "/r4/{type}/{id}", 200, Some(read.body.len())),
        ("rid-404", "GET", "/r4/{type}/{id}", 404, Some(missing.body.len())),
        ("rid-manifest", "GET", "/bulk-data/r4/Group/{id}/$export", 200, None),
        ("rid-download", "GET", "/bulk-data/r4/$export/{type}/{file}", 200, Some(download.body.len())),
        ("rid-401", "GET", "/r4/{type}/{id}", 401, None),
    ];
    for (request_id, method, route, status, bytes) in expected {
        let line = access_line(&server, request_id).await;
        assert_eq!(line["method"], method, "{request_id}: {line}");
        assert_eq!(line["route"], route, "{request_id}: {line}");
        assert_eq!(line["status"], status, "{request_id}: {line}");
        assert_eq!(line["complete"], true, "{request_id}: {line}");
        assert!(line["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{request_id}: {line}");
        assert!(line["bytes"].as_u64().is_some_and(|sent| sent > 0), "{request_id}: {line}");
        if let Some(bytes) = bytes {
            assert_eq!(line["bytes"], bytes as u64, "{request_id}: {line}");
        }
        // The caller is the authenticated one; a refused login names nobody.
        let (tenant, client) = if status == 401 { ("", "") } else { ("acme", api.client_id.as_str()) };
        assert_eq!((line["tenant"].as_str(), line["client"].as_str()), (Some(tenant), Some(client)), "{line}");
    }

    let log = server.log();
    assert!(!log.contains(&api.client_secret), "the client secret is in the server log");
    assert!(!log.contains(wrong_secret), "a refused secret is in the server log");
    assert!(!log.contains(&token), "the file token is in the server log");
    assert!(!log.contains(&token[..24]), "part of the file token is in the server log");
}

/// Makes files immutable (`chattr +i`) and undoes it when dropped, so the test's temporary
/// directory can be removed.
struct Immutable(Vec<PathBuf>);

impl Immutable {
    fn set(paths: Vec<PathBuf>) -> Result<Immutable, String> {
        let mut guard = Immutable(Vec::new());
        for path in paths {
            let output = Command::new("chattr").arg("+i").arg(&path).output().map_err(|error| error.to_string())?;
            if !output.status.success() {
                return Err(String::from_utf8_lossy(&output.stderr).into_owned());
            }
            guard.0.push(path);
        }
        Ok(guard)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = Command::new("chattr").arg("-i").arg(path).status();
        }
    }
}

/// The data directory, the database and its WAL. Not the `-shm` index: SQLite maps it into
/// memory, and a write to a mapped page of an immutable file kills the process with SIGBUS, a
/// different failure from the one under test.
fn database_files(data_dir: &Path) -> Vec<PathBuf> {
    let mut files = vec![data_dir.to_owned(), data_dir.join("bulkhead.db")];
    let wal = data_dir.join("bulkhead.db-wal");
    if wal.exists() {
        files.push(wal);
    }
    files
}

#[tokio::test]
async fn ready_goes_503_when_the_data_directory_is_unwritable_while_live_stays_200() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // Permissions are checked when a file is opened: the server's open database stays
        // writable after a chmod, so only an immutable flag (root) makes it unwritable.
        eprintln!("SKIPPED: making the open database unwritable needs root (chattr +i); not running as root");
        return;
    }
    if which("chattr").is_none() {
        eprintln!("SKIPPED: chattr is not installed");
        return;
    }
    let server = Server::start().await;
    server.create_tenant("acme");
    let api = server.create_client("acme");
    api.upsert(&patient(Some("p1"), "One")).await;
    let http = http_client();
    let get = |path: &str| {
        let request = http.get(format!("{}{path}", server.base));
        async move { Api::send(request).await }
    };
    assert_eq!(get("/healthz/ready").await.status, 200);

    let immutable = match Immutable::set(database_files(&server.data_dir)) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("SKIPPED: chattr +i is not supported here: {error}");
            return;
        }
    };
    for path in ["/healthz/ready", "/healthz"] {
        let reply = get(path).await;
        assert_eq!(reply.status, 503, "{path} on an unwritable data directory: {}", reply.text());
        let outcome = reply.json();
        assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
        assert_eq!(outcome["issue"][0]["code"], "transient", "{outcome}");
    }
    let live = get("/healthz/live").await;
    assert_eq!((live.status, live.text().as_str()), (200, "ok"));
    // Reads still work.
    assert_eq!(api.get("/r4/Patient/p1").await.status, 200);

    drop(immutable);
    assert_eq!(get("/healthz/ready").await.status, 200, "ready again once the directory is writable");
}

/// The server turns transparent huge pages off for itself (a purged page inside a 2 MiB one
/// stays resident: under concurrent exports and writes the resident set doubled with them on).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_server_runs_without_transparent_huge_pages() {
    let server = Server::start().await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    let Some(line) = status.lines().find(|line| line.starts_with("THP_enabled:")) else {
        eprintln!("SKIPPED: this kernel's /proc/PID/status has no THP_enabled line (before Linux 5.0)");
        return;
    };
    assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
}
