//! SIGKILL in the middle of writes and downloads: every write the server acknowledged is there
//! after a restart, exactly as acknowledged, and a file URL minted before the crash downloads
//! the same bytes after it (the export record, the token keys and the credential key all
//! survive).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;

#[tokio::test]
async fn a_sigkill_loses_no_acknowledged_write_and_changes_no_file() {
    let mut server = Server::start().await;
    server.create_tenant("acme");
    let api = server.create_client("acme");
    api.upsert(&patient(Some("p1"), "Crash")).await;
    for i in 0..300 {
        api.upsert(&observation(Some(&format!("before-{i}")), "p1", i as f64 + 0.25)).await;
    }
    api.upsert(&group(Some("g1"), &["p1"])).await;
    let manifest = api.get("/bulk-data/r4/Group/g1/$export").await.expect(200);
    let urls: Vec<String> = manifest["output"]
        .as_array()
        .expect("output")
        .iter()
        .map(|item| item["url"].as_str().unwrap().into())
        .collect();
    let mut before = Vec::new();
    for url in &urls {
        let reply = api.get(url).await;
        assert_eq!(reply.status, 200, "{url}: {}", reply.text());
        before.push(reply.body);
    }

    // Writers PUT new versions and new resources as fast as they can; a download runs beside them.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for writer in 0..4 {
        let (api, stop) = (api.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut acknowledged: Vec<(String, Value)> = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let id =
                    if n % 2 == 0 { format!("w{writer}-{n}") } else { format!("before-{}", (writer * 50 + n) % 300) };
                let body = observation(Some(&id), "p1", (writer * 100_000 + n) as f64 + 0.5);
                // The kill breaks the requests in flight: those were never acknowledged.
                let sent = api.request(reqwest::Method::PUT, &format!("/r4/Observation/{id}")).json(&body).send().await;
                if let Ok(response) = sent {
                    if matches!(response.status().as_u16(), 200 | 201) {
                        if let Ok(stored) = response.json::<Value>().await {
                            acknowledged.push((id, stored));
                        }
                    }
                }
                n += 1;
            }
            acknowledged
        }));
    }
    let downloader = {
        let (api, url) = (api.clone(), urls[0].clone());
        tokio::spawn(
            async move { api.request(reqwest::Method::GET, &url).send().await.map(|response| response.status()) },
        )
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.sigkill();
    stop.store(true, Ordering::Relaxed);
    let _ = downloader.await;
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.expect("writer task"));
    }
    assert!(acknowledged.len() > 20, "only {} writes were acknowledged before the kill", acknowledged.len());

    let restarted = Server::start_with(Options { data_dir: Some(server.data_dir.clone()), ..Default::default() }).await;
    let api = Api { base: restarted.base.clone(), ..api };
    // The last acknowledged version of each resource is what is stored (a later write to the
    // same id may have been acknowledged too: the newest acknowledged version wins).
    let mut newest: std::collections::BTreeMap<String, Value> = Default::default();
    for (id, stored) in acknowledged {
        let version = |value: &Value| value["meta"]["versionId"].as_str().unwrap().parse::<u64>().unwrap();
        match newest.get(&id) {
            Some(kept) if version(kept) >= version(&stored) => {}
            _ => drop(newest.insert(id, stored)),
        }
    }
    for (id, expected) in &newest {
        let stored = api.read(&format!("Observation/{id}")).await;
        let version = |value: &Value| value["meta"]["versionId"].as_str().unwrap().parse::<u64>().unwrap();
        assert!(version(&stored) >= version(expected), "Observation/{id}: acknowledged {expected}, stored {stored}");
        if version(&stored) == version(expected) {
            assert_eq!(&stored, expected, "Observation/{id} differs from what was acknowledged");
        }
    }
    // File URLs minted before the crash still download, byte for byte.
    for (url, bytes) in urls.iter().zip(&before) {
        let local = url.replacen(&url[..url.find("/bulk-data/").unwrap()], &restarted.base, 1);
        let reply = api.get(&local).await;
        assert_eq!(reply.status, 200, "{local}: {}", reply.text());
        assert!(reply.body == *bytes, "{local}: the file changed across the crash");
    }
}
