//! Tier 2: what an operator relies on. Prometheus metrics at `/metrics` (off by default, behind
//! the admin token, counters that move with traffic); per-tenant quotas (429 with `Retry-After`
//! for the tenant over its limit while another tenant is served); and `_since` refused with 400
//! once the history it reaches back to has been pruned.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use bulkhead_export::PlanStep;
use bulkhead_fhir::{format_instant, now_micros};
use bulkhead_http::export_status::Planners;
use bulkhead_http::quotas::QuotaConfig;
use bulkhead_http::HttpConfig;
use common::*;
use serde_json::{json, Value};
use tower::ServiceExt;

const ADMIN_TOKEN: &str = "admin-token-0123456789";

fn metrics_config() -> HttpConfig {
    HttpConfig { metrics: true, admin_token: Some(ADMIN_TOKEN.into()), ..test_config() }
}

fn with_quotas(quotas: QuotaConfig) -> HttpConfig {
    HttpConfig { quotas, ..metrics_config() }
}

/// The exposition's samples: `name{labels}` → value.
async fn scrape(server: &Server) -> std::collections::BTreeMap<String, f64> {
    let reply = server.send(get("/metrics").header("authorization", &format!("Bearer {ADMIN_TOKEN}"))).await;
    assert_status(&reply, 200);
    assert!(reply.header("content-type").starts_with("application/openmetrics-text"), "{:?}", reply.headers);
    reply
        .text()
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
            (series.to_owned(), value.parse().unwrap_or_else(|_| panic!("not a number: {line}")))
        })
        .collect()
}

fn sample(samples: &std::collections::BTreeMap<String, f64>, series: &str) -> f64 {
    *samples.get(series).unwrap_or_else(|| panic!("no sample {series} in {samples:#?}"))
}

/// Writes a small cohort (patients with one Observation each, Group `g`) and returns the
/// synchronous manifest of its export.
async fn cohort(server: &Server, client: &Client, patients: usize) -> Value {
    let mut members = Vec::new();
    for p in 0..patients {
        let id = format!("p{p}");
        let patient = json!({"resourceType": "Patient", "id": id, "gender": "female"});
        assert_status(&server.send(put(&format!("/r4/Patient/{id}")).by(client).json(&patient)).await, 201);
        let observation = json!({"resourceType": "Observation", "id": format!("o{p}"), "status": "final",
            "code": {"text": "pulse"}, "subject": {"reference": format!("Patient/{id}")}});
        assert_status(&server.send(put(&format!("/r4/Observation/o{p}")).by(client).json(&observation)).await, 201);
        members.push(json!({"entity": {"reference": format!("Patient/{id}")}}));
    }
    let group = json!({"resourceType": "Group", "id": "g", "type": "person", "actual": true, "member": members});
    assert_status(&server.send(put("/r4/Group/g").by(client).json(&group)).await, 201);
    let manifest = server.send(get("/bulk-data/r4/Group/g/$export?_type=Patient,Observation").by(client)).await;
    assert_status(&manifest, 200);
    manifest.json()
}

#[tokio::test]
async fn metrics_are_404_when_off() {
    let server = Server::with_config(HttpConfig { admin_token: Some(ADMIN_TOKEN.into()), ..test_config() });
    let reply = server.send(get("/metrics").header("authorization", &format!("Bearer {ADMIN_TOKEN}"))).await;
    assert_error(&reply, 404, "not-found");
}

#[tokio::test]
async fn metrics_need_the_admin_token_and_count_requests_downloads_and_failed_logins() {
    let server = Server::with_config(metrics_config());
    assert_error(&server.send(get("/metrics")).await, 401, "login");
    let wrong = server.send(get("/metrics").header("authorization", "Bearer admin-token-wrong-000000")).await;
    assert_error(&wrong, 401, "login");
    let client = server.tenant_client("acme");
    let manifest = cohort(&server, &client, 3).await;
    let mut lines = 0;
    for item in manifest["output"].as_array().unwrap() {
        lines += server.download_lines(&client, item["url"].as_str().unwrap()).await.len();
    }
    assert_eq!(lines, 6);
    assert_status(&server.send(get("/r4/Patient/p0").by(&client)).await, 200);
    assert_status(&server.send(get("/r4/Patient/nobody").by(&client)).await, 404);
    let stranger = Client { id: client.id.clone(), secret: "wrong-secret".into() };
    assert_status(&server.send(get("/r4/Patient/p0").by(&stranger)).await, 401);
    let upload = "{\"resourceType\":\"Patient\",\"id\":\"u1\"}\n{\"resourceType\":\"Patient\",\"id\":\"u2\"}\n";
    assert_status(
        &server.send(post("/r4/$upload-ndjson").by(&client).raw("application/fhir+ndjson", upload)).await,
        200,
    );

    let samples = scrape(&server).await;
    let read = r#"bulkhead_http_requests_total{method="GET",route="/r4/{type}/{id}",status="#;
    assert_eq!(sample(&samples, &format!("{read}\"200\"}}")), 1.0);
    assert_eq!(sample(&samples, &format!("{read}\"404\"}}")), 1.0);
    assert_eq!(sample(&samples, &format!("{read}\"401\"}}")), 1.0);
    assert_eq!(sample(&samples, r#"bulkhead_http_requests_total{method="GET",route="/metrics",status="401"}"#), 2.0);
    assert_eq!(sample(&samples, "bulkhead_failed_authentications_total"), 3.0);
    // The cohort's 7 PUTs and the 3 reads.
    let latency = r#"bulkhead_http_request_duration_seconds_count{route="/r4/{type}/{id}"}"#;
    assert_eq!(sample(&samples, latency), 10.0);
    assert_eq!(sample(&samples, r#"bulkhead_exported_resources_total{tenant="acme"}"#), 6.0);
    assert!(sample(&samples, r#"bulkhead_exported_bytes_total{tenant="acme"}"#) > 100.0);
    assert_eq!(sample(&samples, r#"bulkhead_imported_resources_total{tenant="acme"}"#), 2.0);
    assert_eq!(sample(&samples, r#"bulkhead_exports_running{tenant="acme"}"#), 0.0, "the plan finished");
    assert_eq!(sample(&samples, r#"bulkhead_export_downloads{tenant="acme",state="running"}"#), 0.0);
    assert!(sample(&samples, "bulkhead_database_bytes") + sample(&samples, "bulkhead_wal_bytes") > 0.0);
    // The route label is the template: no token, id or other client value becomes a series.
    assert!(!samples.keys().any(|series| series.contains("p0") || series.contains(".ndjson")), "{samples:#?}");
}

/// Asserts a quota's 429: a `throttled` OperationOutcome and a `Retry-After` of whole seconds.
fn assert_throttled(reply: &Reply) -> u64 {
    let outcome = assert_error(reply, 429, "throttled");
    assert!(outcome["issue"][0]["diagnostics"].as_str().unwrap().contains("retry after"), "{outcome}");
    reply.header("retry-after").parse().expect("Retry-After in seconds")
}

#[tokio::test]
async fn a_tenant_over_its_request_rate_gets_429_while_another_is_served() {
    let server = Server::with_config(with_quotas(QuotaConfig { requests_per_second: 3, ..QuotaConfig::default() }));
    let (busy, calm) = (server.tenant_client("busy"), server.tenant_client("calm"));
    for _ in 0..3 {
        assert_status(&server.send(get("/r4/Patient?_count=1").by(&busy)).await, 200);
    }
    let refused = server.send(get("/r4/Patient?_count=1").by(&busy)).await;
    assert_eq!(assert_throttled(&refused), 1);
    assert_status(&server.send(get("/r4/Patient?_count=1").by(&calm)).await, 200);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_status(&server.send(get("/r4/Patient?_count=1").by(&busy)).await, 200);
    let samples = scrape(&server).await;
    assert_eq!(sample(&samples, r#"bulkhead_quota_rejections_total{tenant="busy",quota="requests"}"#), 1.0);
    assert!(!samples.keys().any(|series| series.contains(r#"tenant="calm",quota"#)));
}

/// Two instances on one store with shared quotas (as on PostgreSQL): the tenant's request rate
/// holds in total across both, 429 with `Retry-After` past it, while another tenant is served
/// by either. (Each on its own would admit 4 a second of its own, 8 in total.)
#[tokio::test]
async fn the_request_rate_holds_in_total_across_two_instances_on_one_store() {
    let config = with_quotas(QuotaConfig { requests_per_second: 4, shared: true, ..QuotaConfig::default() });
    let one = Server::with_config(config.clone());
    let two = one.sibling_with(config);
    let (busy, calm) = (one.tenant_client("busy"), one.tenant_client("calm"));
    let started = std::time::Instant::now();
    let (mut admitted, mut refused) = (0, 0);
    for n in 0..16 {
        let instance = if n % 2 == 0 { &one } else { &two };
        let reply = instance.send(get("/r4/Patient?_count=1").by(&busy)).await;
        match reply.status.as_u16() {
            200 => admitted += 1,
            429 => {
                assert!(assert_throttled(&reply) >= 1);
                refused += 1;
            }
            other => panic!("{other}: {}", reply.text()),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // The bucket's 4, what it refilled meanwhile, and at most one drawn batch (1) per instance.
    let bound = 4.0 + 4.0 * elapsed + 2.0;
    assert!(admitted >= 4 && f64::from(admitted) <= bound, "{admitted} admitted in {elapsed:.2} s (bound {bound:.1})");
    assert!(refused > 0);
    assert_status(&one.send(get("/r4/Patient?_count=1").by(&calm)).await, 200);
    assert_status(&two.send(get("/r4/Patient?_count=1").by(&calm)).await, 200);
}

#[tokio::test]
async fn a_tenant_over_its_upload_bytes_gets_429_while_another_uploads() {
    let server =
        Server::with_config(with_quotas(QuotaConfig { upload_bytes_per_minute: 600, ..QuotaConfig::default() }));
    let (busy, calm) = (server.tenant_client("busy"), server.tenant_client("calm"));
    let lines = |prefix: &str| -> String {
        (0..10).map(|i| format!("{{\"resourceType\":\"Patient\",\"id\":\"{prefix}{i}\"}}\n")).collect()
    };
    let upload = |client: &Client, body: String| {
        let length = body.len().to_string();
        post("/r4/$upload-ndjson").by(client).raw("application/fhir+ndjson", body).header("content-length", &length)
    };
    // 370 bytes: within the minute's 600; the next 370 do not fit (14 s until they do).
    assert_status(&server.send(upload(&busy, lines("a"))).await, 200);
    let refused = server.send(upload(&busy, lines("b"))).await;
    let wait = assert_throttled(&refused);
    assert_eq!(wait, 14, "(370 - 230) bytes at 10 bytes/s");
    assert_status(&server.send(upload(&calm, lines("c"))).await, 200);
    // Nothing of the refused upload was stored.
    assert_status(&server.send(get("/r4/Patient/b0").by(&busy)).await, 404);
    let samples = scrape(&server).await;
    assert_eq!(sample(&samples, r#"bulkhead_quota_rejections_total{tenant="busy",quota="upload_bytes"}"#), 1.0);
}

#[tokio::test]
async fn a_tenant_at_its_concurrent_exports_gets_429_while_another_kicks_off() {
    let gate = Arc::new(AtomicBool::new(true));
    let held = gate.clone();
    let config = with_quotas(QuotaConfig { concurrent_exports: 1, ..QuotaConfig::default() });
    let server = Server::with_state(config, move |state| {
        state.planners = Arc::new(Planners::default().with_hook(move |step| {
            while step == PlanStep::Membership && held.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        }));
    });
    let (busy, calm) = (server.tenant_client("busy"), server.tenant_client("calm"));
    for client in [&busy, &calm] {
        let group = json!({"resourceType": "Group", "id": "g", "type": "person", "actual": true});
        assert_status(&server.send(put("/r4/Group/g").by(client).json(&group)).await, 201);
    }
    let kick_off = |client: &Client| get("/bulk-data/r4/Group/g/$export").by(client).respond_async();
    let first = server.send(kick_off(&busy)).await;
    assert_status(&first, 202);
    let samples = scrape(&server).await;
    assert_eq!(sample(&samples, r#"bulkhead_exports_running{tenant="busy"}"#), 1.0);
    assert_eq!(assert_throttled(&server.send(kick_off(&busy)).await), 1);
    assert_throttled(&server.send(get("/bulk-data/r4/Group/g/$export").by(&busy)).await);
    assert_status(&server.send(kick_off(&calm)).await, 202);

    gate.store(false, Ordering::Release);
    let status = local(first.header("content-location"));
    for _ in 0..200 {
        if server.send(get(&status).by(&busy)).await.status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The plan is made: the tenant may export again.
    let mut again = server.send(get("/bulk-data/r4/Group/g/$export").by(&busy)).await;
    for _ in 0..100 {
        if again.status != 429 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        again = server.send(get("/bulk-data/r4/Group/g/$export").by(&busy)).await;
    }
    assert_status(&again, 200);
    let samples = scrape(&server).await;
    assert_eq!(sample(&samples, r#"bulkhead_quota_rejections_total{tenant="busy",quota="exports"}"#), 2.0);
}

/// Starts a download and returns its response with the body not read: the stream stays open.
async fn open_download(server: &Server, client: &Client, url: &str) -> axum::response::Response {
    let request = Request::builder()
        .uri(local(url))
        .header("client_id", &client.id)
        .header("client_secret", &client.secret)
        .body(Body::empty())
        .unwrap();
    server.app.clone().oneshot(request).await.unwrap()
}

#[tokio::test]
async fn a_tenant_cannot_take_the_whole_download_pool() {
    let config = HttpConfig {
        max_concurrent_downloads: 3,
        download_queue_wait: Duration::ZERO,
        quotas: QuotaConfig { concurrent_downloads: 2, ..QuotaConfig::default() },
        ..metrics_config()
    };
    let server = Server::with_config(config);
    let (busy, calm) = (server.tenant_client("busy"), server.tenant_client("calm"));
    let busy_url = cohort(&server, &busy, 2).await["output"][0]["url"].as_str().unwrap().to_owned();
    let calm_url = cohort(&server, &calm, 2).await["output"][0]["url"].as_str().unwrap().to_owned();
    let held = [open_download(&server, &busy, &busy_url).await, open_download(&server, &busy, &busy_url).await];
    assert!(held.iter().all(|response| response.status() == 200));
    let samples = scrape(&server).await;
    assert_eq!(sample(&samples, r#"bulkhead_export_downloads{tenant="busy",state="running"}"#), 2.0);
    // The pool has a stream left, but not for this tenant.
    assert_eq!(assert_throttled(&server.send(get(&local(&busy_url)).by(&busy)).await), 1);
    assert_eq!(server.download_lines(&calm, &calm_url).await.len(), 2, "the other tenant is served");
    drop(held);
    assert_eq!(server.download_lines(&busy, &busy_url).await.len(), 2, "a place is free again");
}

#[tokio::test]
async fn since_before_the_prune_horizon_is_refused_with_400() {
    let server = Server::start();
    let client = server.tenant_client("acme");
    let manifest = cohort(&server, &client, 2).await;
    let early = manifest["transactionTime"].as_str().unwrap().to_owned();
    // The export's record would hold the horizon back to its creation (its file URLs read that
    // snapshot): sweep it as if expired, then prune everything before now.
    assert_eq!(server.store.delete_expired_export_records(i64::MAX).unwrap(), 1);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let cutoff = now_micros();
    let report = server.store.prune_history(cutoff, cutoff, 100).unwrap();
    assert_eq!(report.horizon, cutoff);

    for call in [
        get(&format!("/bulk-data/r4/Group/g/$export?_since={early}")).by(&client),
        get(&format!("/bulk-data/r4/Group/g/$export?_since={early}")).by(&client).respond_async(),
        get(&format!("/r4/Group/g/$export?_since={early}")).by(&client).respond_async(),
    ] {
        let refused = server.send(call).await;
        let outcome = assert_outcome(&refused, 400, "value", Some("_since"));
        let diagnostics = outcome["issue"][0]["diagnostics"].as_str().unwrap();
        assert!(
            diagnostics.contains("history_retention") && diagnostics.contains(&format_instant(cutoff)),
            "{diagnostics}"
        );
    }
    let after = format_instant(cutoff);
    let allowed = server.send(get(&format!("/bulk-data/r4/Group/g/$export?_since={after}")).by(&client)).await;
    assert_status(&allowed, 200);
    assert_status(&server.send(get("/bulk-data/r4/Group/g/$export").by(&client)).await, 200);
}
