//! Token signing keys in the database (the real binary on PostgreSQL): an earlier version's
//! `token-keys` file is imported once, so URLs it signed keep verifying; two instances with data
//! directories of their own sign with the same key and verify each other's URLs;
//! `bulkhead keys rotate --database-url` reaches both within about a second, and URLs signed
//! before still download on either.
//!
//! Needs `BULKHEAD_TEST_DATABASE_URL` (scripts/with-postgres); skipped loudly without it, a
//! failure under CI.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bulkhead_export::token::TokenKeys;
use common::*;
use serde_json::Value;

/// The `kid` in a token's header.
fn kid_of(jwt: &str) -> String {
    let header = jwt.split('.').next().unwrap();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    header["kid"].as_str().unwrap().to_owned()
}

fn file_token(url: &str) -> &str {
    url.rsplit('/').next().unwrap().strip_suffix(".ndjson").unwrap()
}

/// The file URL of a synchronous Group export on `api`'s instance.
async fn file_url(api: &Api) -> String {
    let manifest = api.get("/bulk-data/r4/Group/g1/$export?_type=Patient").await.expect(200);
    manifest["output"][0]["url"].as_str().unwrap().to_owned()
}

fn now_seconds() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_keys_are_imported_once_shared_by_instances_and_rotated_for_all() {
    let Some(database) = bulkhead_store::postgres::testing::fresh_database() else { return };
    // The data directory of an instance of an earlier version, with its key file.
    let scratch = tempfile::tempdir().unwrap();
    let old_dir = scratch.path().join("old");
    std::fs::create_dir_all(&old_dir).unwrap();
    let secret = [5u8; 32];
    std::fs::write(old_dir.join("token-keys"), format!("k5 {}\n", URL_SAFE_NO_PAD.encode(secret))).unwrap();
    let old_keys = TokenKeys::new(vec![("k5".into(), secret.to_vec())]).unwrap();

    let url = Some(database.url.clone());
    let one =
        Server::start_with(Options { data_dir: Some(old_dir), database_url: url.clone(), ..Default::default() }).await;
    let two = Server::start_with(Options { database_url: url, ..Default::default() }).await;
    assert!(!two.data_dir.join("token-keys").exists());
    one.create_tenant("acme");
    let on_one = one.create_client("acme");
    let on_two = Api { base: two.base.clone(), ..on_one.clone() };
    on_one.upsert(&patient(Some("p1"), "Keys")).await;
    on_one.upsert(&group(Some("g1"), &["p1"])).await;

    let before = file_url(&on_one).await;
    for url in [&before, &file_url(&on_two).await] {
        assert_eq!(kid_of(file_token(url)), "k5", "the imported key signs, on both instances: {url}");
        old_keys.verify(file_token(url), now_seconds()).expect("signed with the key of the file");
    }
    let elsewhere = before.replacen(&one.base, &two.base, 1);
    assert_eq!(on_two.get(&elsewhere).await.status, 200, "a URL minted by one downloads from two");

    let said = two.cli(&["keys", "rotate"]);
    assert!(said.contains("new signing key k6"), "{said}");
    let rotated = Instant::now();
    for api in [&on_one, &on_two] {
        while kid_of(file_token(&file_url(api).await)) != "k6" {
            assert!(rotated.elapsed() < Duration::from_secs(5), "{} never signed with the new key", api.base);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for (api, url) in [(&on_one, &before), (&on_two, &elsewhere)] {
        assert_eq!(api.get(url).await.status, 200, "a URL signed before the rotation: {url}");
    }

    // The file is imported once: a restarted instance keeps the rotated keys.
    let data_dir = one.data_dir.clone();
    drop(one);
    let again = Server::start_with(Options {
        data_dir: Some(data_dir),
        database_url: Some(database.url.clone()),
        ..Default::default()
    })
    .await;
    let on_again = Api { base: again.base.clone(), ..on_two.clone() };
    assert_eq!(kid_of(file_token(&file_url(&on_again).await)), "k6");
    assert!(!again.log().contains(&URL_SAFE_NO_PAD.encode(secret)), "a key in the log");
}
