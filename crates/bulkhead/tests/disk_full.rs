//! A really full disk, through the real binary: the data directory sits on a 64 MiB tmpfs
//! that the test fills. Writes and exports answer 507 OperationOutcomes (not 500), `/healthz`
//! answers 503, an upload cut short says what it committed, and freeing space recovers without
//! a restart. Mounting needs root (or CAP_SYS_ADMIN): without it the test says loudly that it
//! did not run.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::{json, Value};

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).ok()?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(&path)
            .output()
            .ok()?;
        if !mounted.status.success() {
            eprintln!("mount: {}", String::from_utf8_lossy(&mounted.stderr));
            return None;
        }
        Some(Tmpfs { path, _dir: dir })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

/// Writes `file` until the disk refuses (ENOSPC).
fn fill(file: &Path) {
    let mut out = std::fs::File::create(file).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    loop {
        match out.write_all(&chunk) {
            Ok(()) => {}
            Err(error) if error.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(error) => panic!("filling the disk: {error}"),
        }
    }
    // Fill the last partial chunk too.
    while out.write_all(&[0u8; 512]).is_ok() {}
    let _ = out.sync_all();
}

fn patient(id: &str, text_bytes: usize) -> Value {
    json!({"resourceType": "Patient", "id": id, "name": [{"family": "F", "text": "x".repeat(text_bytes)}]})
}

/// Every Patient id the client can see, following `next` links.
async fn patient_count(api: &Api) -> usize {
    let mut count = 0;
    let mut next = Some("/r4/Patient?_count=1000".to_owned());
    while let Some(url) = next {
        let page = api.get(&url).await.expect(200);
        count += page["entry"].as_array().map_or(0, Vec::len);
        next = page["link"]
            .as_array()
            .and_then(|links| links.iter().find(|link| link["relation"] == "next"))
            .and_then(|link| link["url"].as_str())
            .map(str::to_owned);
    }
    count
}

/// Free space left for the partial upload, and the upload's size (about twice as much text,
/// which takes several times more space in the WAL, the tables and the indexes).
const ROOM: u64 = 16 * 1024 * 1024;
const UPLOAD_LINES: usize = 30_000;

#[tokio::test]
async fn a_full_disk_is_507_and_503_never_500() {
    let Some(disk) = Tmpfs::mount("64m") else {
        eprintln!("\n*** SKIPPED a_full_disk_is_507_and_503_never_500: cannot mount a tmpfs (needs root) ***\n");
        return;
    };
    let env = vec![("BULKHEAD_MIN_FREE_DISK_BYTES".to_owned(), "1048576".to_owned())];
    let server =
        Server::start_with(Options { env, data_dir: Some(disk.path.join("data")), ..Default::default() }).await;
    server.create_tenant("acme");
    let api = server.create_client("acme");
    api.upsert(&patient("p1", 10)).await;
    let group = json!({"resourceType": "Group", "id": "g1", "type": "person", "actual": true,
        "member": [{"entity": {"reference": "Patient/p1"}}]});
    api.upsert(&group).await;
    let health = || async { http_client().get(format!("{}/healthz", server.base)).send().await.unwrap() };
    assert_eq!(health().await.status(), 200);

    let filler = disk.path.join("filler");
    fill(&filler);
    let reply = health().await;
    assert_eq!(reply.status(), 503, "healthz on a full disk");
    let outcome: Value = reply.json().await.unwrap();
    assert_eq!(
        (outcome["resourceType"].as_str(), outcome["issue"][0]["code"].as_str()),
        (Some("OperationOutcome"), Some("transient"))
    );

    let refused = api.put("/r4/Patient/big", &patient("big", 100_000)).await;
    refused.expect_outcome(507);
    let export = api.get(&format!("{}/bulk-data/r4/Group/g1/$export", server.base)).await;
    export.expect_outcome(507);
    let upload = Api::send(
        api.request(reqwest::Method::POST, "/r4/$upload-ndjson")
            .header("content-type", "application/fhir+ndjson")
            .body(patient("u0", 100).to_string()),
    )
    .await;
    let outcome = upload.expect_outcome(507);
    assert!(outcome.to_string().contains("0 resources stored"), "{outcome}");
    assert_eq!(api.get("/r4/Patient/big").await.status, 404);

    // Room for part of an upload: it stops at the full disk and says what it stored.
    std::fs::File::options().write(true).open(&filler).unwrap().set_len(0).unwrap();
    std::fs::remove_file(&filler).unwrap();
    let room = disk.path.join("room");
    fill(&room);
    std::fs::File::options()
        .write(true)
        .open(&room)
        .unwrap()
        .set_len(std::fs::metadata(&room).unwrap().len().saturating_sub(ROOM))
        .unwrap();
    let before = patient_count(&api).await;
    let lines: Vec<String> = (0..UPLOAD_LINES).map(|n| patient(&format!("u{n}"), 1_000).to_string()).collect();
    let upload = Api::send(
        api.request(reqwest::Method::POST, "/r4/$upload-ndjson")
            .header("content-type", "application/fhir+ndjson")
            .body(lines.join("\n")),
    )
    .await;
    let outcome = upload.expect_outcome(507);
    let summary = outcome["issue"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|issue| issue["diagnostics"].as_str().filter(|text| text.contains("resources stored")))
        .unwrap_or_else(|| panic!("no summary: {outcome}"))
        .to_owned();
    let stored: usize = summary.split_whitespace().next().unwrap().parse().unwrap();
    assert!(stored > 0 && stored < UPLOAD_LINES, "{summary}");
    assert_eq!(patient_count(&api).await - before, stored, "the summary says exactly what was stored: {summary}");

    // Space freed: healthy again and writable, without a restart.
    std::fs::remove_file(&room).unwrap();
    assert_eq!(health().await.status(), 200);
    api.upsert(&patient("after", 10)).await;
    assert_eq!(api.get(&format!("{}/bulk-data/r4/Group/g1/$export", server.base)).await.status, 200);
    let log = server.log();
    assert!(!log.contains("panicked"), "{log}");
}
