//! Black-box: backup and restore of a live server under writes (every acknowledged write and
//! every file URL minted before the backup survive), `bulkhead prune` on a running server with
//! `_since` before its horizon refused, and metrics and quotas switched on from the environment.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::Value;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Runs a `bulkhead` command (no server flags added) and returns its output.
fn run(args: &[&std::ffi::OsStr]) -> std::process::Output {
    let mut command = bulkhead();
    command.args(args);
    run_with_deadline(command, Duration::from_secs(60))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_under_writes_restores_acknowledged_writes_and_old_file_urls() {
    let server = Server::start().await;
    server.create_tenant("acme");
    let api = server.create_client("acme");
    let mut members = Vec::new();
    for i in 0..4 {
        let id = format!("p{i}");
        api.upsert(&patient(Some(&id), "Backup")).await;
        api.upsert(&observation(Some(&format!("o{i}")), &id, i as f64)).await;
        members.push(id);
    }
    let members: Vec<&str> = members.iter().map(String::as_str).collect();
    api.upsert(&group(Some("g"), &members)).await;
    let manifest = api.get("/bulk-data/r4/Group/g/$export").await.expect(200);
    let urls: Vec<String> =
        manifest["output"].as_array().unwrap().iter().map(|item| item["url"].as_str().unwrap().to_owned()).collect();
    assert!(urls.len() >= 2, "{manifest}");
    let mut originals = Vec::new();
    for url in &urls {
        let reply = api.get(url).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        originals.push(reply.body);
    }

    // Writers keep going for the whole backup; each records what the server acknowledged.
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let writers: Vec<_> = (0..2)
        .map(|writer| {
            let (api, stop, acknowledged) = (api.clone(), stop.clone(), acknowledged.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Acquire) {
                    let id = format!("w{writer}-{n}");
                    n += 1;
                    let reply =
                        api.put(&format!("/r4/Observation/{id}"), &observation(Some(&id), "p0", n as f64)).await;
                    if reply.status == 201 {
                        let version = reply.json()["meta"]["versionId"].as_str().unwrap().to_owned();
                        acknowledged.lock().unwrap().push((id, version));
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before_backup = acknowledged.lock().unwrap().clone();
    assert!(!before_backup.is_empty(), "the writers wrote before the backup");
    let scratch = tempfile::tempdir().unwrap();
    let backup_file = scratch.path().join("bulkhead.backup");
    let data_dir = server.data_dir.clone();
    let backup = {
        let (data_dir, backup_file) = (data_dir.clone(), backup_file.clone());
        tokio::task::spawn_blocking(move || {
            run(&[
                "backup".as_ref(),
                "--data-dir".as_ref(),
                data_dir.as_os_str(),
                "--to".as_ref(),
                backup_file.as_os_str(),
            ])
        })
        .await
        .unwrap()
    };
    let stdout = expect_success(&backup, "bulkhead backup");
    assert!(stdout.contains("token signing keys"), "{stdout}");
    assert!(!data_dir.join("token-keys").exists(), "the signing keys live in the database, not in a file");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Release);
    for writer in writers {
        writer.await.unwrap();
    }
    assert!(acknowledged.lock().unwrap().len() > before_backup.len(), "writes went on during the backup");
    assert_eq!(mode(&backup_file), 0o600, "the backup holds keys and patient data");

    // Restoring over the live server's directory is refused, even with --force.
    let live = run(&[
        "restore".as_ref(),
        "--from".as_ref(),
        backup_file.as_os_str(),
        "--data-dir".as_ref(),
        data_dir.as_os_str(),
        "--force".as_ref(),
    ]);
    assert!(!live.status.success(), "restored over a running server");
    assert!(String::from_utf8_lossy(&live.stderr).contains("stop it"), "{}", String::from_utf8_lossy(&live.stderr));

    let restored_dir = scratch.path().join("restored");
    let restore = |force: bool| {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "restore".as_ref(),
            "--from".as_ref(),
            backup_file.as_os_str(),
            "--data-dir".as_ref(),
            restored_dir.as_os_str(),
        ];
        if force {
            args.push("--force".as_ref());
        }
        run(&args)
    };
    expect_success(&restore(false), "bulkhead restore");
    for (path, private) in [("", 0o700), ("bulkhead.db", 0o600), ("output", 0o700)] {
        assert_eq!(mode(&restored_dir.join(path)), private, "{path}");
    }
    let again = restore(false);
    assert!(!again.status.success(), "restored over a non-empty directory without --force");
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"), "{}", String::from_utf8_lossy(&again.stderr));
    expect_success(&restore(true), "bulkhead restore --force (no server on it)");

    let restored = Server::start_with(Options { data_dir: Some(restored_dir.clone()), ..Options::default() }).await;
    let restored_api = Api { base: restored.base.clone(), ..api.clone() };
    for (url, original) in urls.iter().zip(&originals) {
        let moved = url.replacen(&server.base, &restored.base, 1);
        let reply = restored_api.get(&moved).await;
        assert_eq!(reply.status, 200, "a file URL minted before the backup: {}", reply.text());
        assert!(reply.body == *original, "the restored server sends other bytes for {url}");
    }
    for (id, version) in &before_backup {
        let stored = restored_api.read(&format!("Observation/{id}")).await;
        assert_eq!(stored["meta"]["versionId"].as_str(), Some(version.as_str()), "{id}");
    }
}

#[tokio::test]
async fn prune_removes_old_history_while_serving_and_since_before_it_is_refused() {
    let server = Server::start().await;
    server.create_tenant("acme");
    let api = server.create_client("acme");
    api.upsert(&patient(Some("p1"), "Old")).await;
    let first = api.upsert(&observation(Some("old"), "p1", 1.0)).await;
    api.upsert(&observation(Some("old"), "p1", 2.0)).await;
    api.upsert(&observation(Some("gone"), "p1", 1.0)).await;
    api.delete("/r4/Observation/gone").await;
    api.upsert(&group(Some("g"), &["p1"])).await;
    assert_eq!(api.get("/r4/Observation/gone").await.status, 410);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let recent = api.upsert(&observation(Some("new"), "p1", 1.0)).await;
    api.upsert(&observation(Some("new"), "p1", 2.0)).await;

    let stdout = server.cli(&["prune", "--older-than", "2s"]);
    assert!(stdout.contains("pruned history before") && stdout.contains("1 deleted resources"), "{stdout}");
    let versions = |bundle: Value| -> Vec<String> {
        bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|entry| entry["resource"]["meta"]["versionId"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(versions(api.get("/r4/Observation/old/_history").await.expect(200)), vec!["2"]);
    assert_eq!(versions(api.get("/r4/Observation/new/_history").await.expect(200)), vec!["2", "1"]);
    let current = api.read("Observation/old").await;
    assert_eq!(current["valueQuantity"]["value"].as_f64(), Some(2.0), "current versions stay");
    assert_eq!(api.get("/r4/Observation/gone").await.status, 404, "the tombstone is gone");

    let since = |resource: &Value| resource["meta"]["lastUpdated"].as_str().unwrap().replace('+', "%2B");
    let refused = api.get(&format!("/bulk-data/r4/Group/g/$export?_since={}", since(&first))).await.expect_outcome(400);
    assert!(refused["issue"][0]["diagnostics"].as_str().unwrap().contains("history_retention"), "{refused}");
    api.get(&format!("/bulk-data/r4/Group/g/$export?_since={}", since(&recent))).await.expect(200);
}

#[tokio::test]
async fn metrics_and_a_request_quota_from_the_environment() {
    let token = "metrics-admin-token-0123";
    let env =
        [("BULKHEAD_METRICS", "true"), ("BULKHEAD_ADMIN_TOKEN", token), ("BULKHEAD_TENANT_REQUESTS_PER_SECOND", "2")];
    let server = Server::start_with(Options {
        env: env.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect(),
        ..Options::default()
    })
    .await;
    server.create_tenant("busy");
    server.create_tenant("calm");
    let (busy, calm) = (server.create_client("busy"), server.create_client("calm"));
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let reply = busy.get("/r4/Patient").await;
        if reply.status == 429 {
            reply.expect_outcome(429);
            assert_eq!(reply.header("retry-after").as_deref(), Some("1"));
        }
        statuses.push(reply.status);
    }
    assert!(statuses.contains(&429) && statuses.contains(&200), "{statuses:?}");
    assert_eq!(calm.get("/r4/Patient").await.status, 200, "another tenant is served");

    let http = http_client();
    let unauthorised = http.get(format!("{}/metrics", server.base)).send().await.unwrap();
    assert_eq!(unauthorised.status(), 401);
    let scrape = http.get(format!("{}/metrics", server.base)).bearer_auth(token).send().await.unwrap();
    assert_eq!(scrape.status(), 200);
    let text = scrape.text().await.unwrap();
    for expected in [
        r#"bulkhead_http_requests_total{method="GET",route="/r4/{type}",status="429"}"#,
        r#"bulkhead_quota_rejections_total{tenant="busy",quota="requests"}"#,
        "bulkhead_failed_authentications_total 1",
    ] {
        assert!(text.contains(expected), "no {expected} in\n{text}");
    }
    let open: f64 = text
        .lines()
        .find_map(|line| line.strip_prefix("bulkhead_open_connections "))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no open_connections in\n{text}"));
    assert!(open >= 1.0, "at least the scrape's own connection: {open}");
    assert!(!text.contains(token), "the admin token is never shown");
}
