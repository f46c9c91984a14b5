//! Prometheus metrics at `GET /metrics` (text exposition format), off unless `metrics = true`,
//! then answering only with `Authorization: Bearer <admin_token>`.
//!
//! Requests are counted from the access log's entry when the response ends (one family lookup
//! and a histogram observation per request, no allocation beyond the labels); per-tenant
//! figures come from the quota and export hooks; database and WAL sizes are read at scrape
//! time. Labels are route templates and tenant names, never raw paths (file URLs carry tokens)
//! or client-chosen values, so the number of series stays bounded.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bulkhead_store::TenantId;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::error::ApiError;
use crate::state::AppState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabels {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DownloadLabels {
    tenant: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuotaLabels {
    tenant: String,
    quota: &'static str,
}

type LatencyFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// Request latencies from 1 ms to about 65 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: LatencyFamily,
    failed_authentications: Counter,
    exports_running: Family<TenantLabels, Gauge>,
    downloads: Family<DownloadLabels, Gauge>,
    exported_resources: Family<TenantLabels, Counter>,
    exported_bytes: Family<TenantLabels, Counter>,
    imported_resources: Family<TenantLabels, Counter>,
    quota_rejections: Family<QuotaLabels, Counter>,
    open_connections: Gauge,
    database_bytes: Gauge,
    wal_bytes: Gauge,
    /// Tenant names by id, learnt from authenticated requests: a self-authorising download
    /// knows only its tenant's id.
    tenant_names: RwLock<HashMap<TenantId, String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("bulkhead");
        let metrics = Metrics {
            requests: Family::default(),
            latency: LatencyFamily::new_with_constructor(latency_histogram),
            failed_authentications: Counter::default(),
            exports_running: Family::default(),
            downloads: Family::default(),
            exported_resources: Family::default(),
            exported_bytes: Family::default(),
            imported_resources: Family::default(),
            quota_rejections: Family::default(),
            open_connections: Gauge::default(),
            database_bytes: Gauge::default(),
            wal_bytes: Gauge::default(),
            tenant_names: RwLock::default(),
            registry: Registry::default(),
        };
        registry.register(
            "http_requests",
            "HTTP requests by method, route template and status",
            metrics.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from a request's arrival to the end of its response body, by route template",
            metrics.latency.clone(),
        );
        registry.register(
            "failed_authentications",
            "Requests refused for missing or wrong credentials (401)",
            metrics.failed_authentications.clone(),
        );
        registry.register("exports_running", "Exports being planned, by tenant", metrics.exports_running.clone());
        registry.register(
            "export_downloads",
            "Export files streaming (state=running) or waiting for a place (state=queued), by tenant",
            metrics.downloads.clone(),
        );
        registry.register(
            "exported_resources",
            "Resources sent in export files, by tenant",
            metrics.exported_resources.clone(),
        );
        registry.register(
            "exported_bytes",
            "Bytes of export files sent (as encoded on the wire), by tenant",
            metrics.exported_bytes.clone(),
        );
        registry.register(
            "imported_resources",
            "Resources stored by $upload-ndjson, by tenant (rate() gives the import rate)",
            metrics.imported_resources.clone(),
        );
        registry.register(
            "quota_rejections",
            "Requests refused with 429 by a per-tenant quota, by tenant and quota",
            metrics.quota_rejections.clone(),
        );
        registry.register("open_connections", "Open HTTP connections", metrics.open_connections.clone());
        registry.register("database_bytes", "Size of the database on disk", metrics.database_bytes.clone());
        registry.register("wal_bytes", "Size of the database's write-ahead log", metrics.wal_bytes.clone());
        Metrics { registry, ..metrics }
    }

    /// Counts a finished request (called by the access log as each response ends).
    pub fn observe_request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let labels = RequestLabels { method: method.to_owned(), route: route.to_owned(), status };
        self.requests.get_or_create(&labels).inc();
        self.latency.get_or_create(&RouteLabels { route: labels.route }).observe(elapsed.as_secs_f64());
        if status == StatusCode::UNAUTHORIZED.as_u16() {
            self.failed_authentications.inc();
        }
    }

    pub fn name_tenant(&self, tenant: TenantId, name: &str) {
        let known = self.tenant_names.read().unwrap_or_else(|poisoned| poisoned.into_inner()).contains_key(&tenant);
        if !known {
            self.tenant_names.write().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(tenant, name.to_owned());
        }
    }

    /// The tenant's name when known, else its id.
    pub fn tenant_name(&self, tenant: TenantId) -> String {
        let names = self.tenant_names.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        names.get(&tenant).cloned().unwrap_or_else(|| tenant.0.to_string())
    }

    pub fn quota_rejected(&self, tenant: &str, quota: &'static str) {
        self.quota_rejections.get_or_create(&QuotaLabels { tenant: tenant.to_owned(), quota }).inc();
    }

    pub fn exports_running(&self, tenant: &str, running: usize) {
        self.exports_running.get_or_create(&TenantLabels { tenant: tenant.to_owned() }).set(running as i64);
    }

    pub fn imported(&self, tenant: &str, resources: u64) {
        self.imported_resources.get_or_create(&TenantLabels { tenant: tenant.to_owned() }).inc_by(resources);
    }

    /// Counts a download's resources and bytes (complete or not: what was sent).
    pub fn exported(&self, tenant: TenantId, resources: u64, bytes: u64) {
        let labels = TenantLabels { tenant: self.tenant_name(tenant) };
        self.exported_resources.get_or_create(&labels).inc_by(resources);
        self.exported_bytes.get_or_create(&labels).inc_by(bytes);
    }

    /// One more download of `tenant` in `state` (`running` or `queued`) until the guard drops.
    pub fn download_gauge(&self, tenant: TenantId, state: &'static str) -> GaugeGuard {
        GaugeGuard::new(self.downloads.get_or_create_owned(&DownloadLabels { tenant: self.tenant_name(tenant), state }))
    }

    /// One more open connection until the guard drops.
    pub fn connection(&self) -> GaugeGuard {
        GaugeGuard::new(self.open_connections.clone())
    }

    /// The text exposition, with the store's sizes as of now.
    pub fn render(&self, storage: Option<bulkhead_store::StorageBytes>) -> String {
        if let Some(storage) = storage {
            self.database_bytes.set(i64::try_from(storage.database).unwrap_or(i64::MAX));
            self.wal_bytes.set(i64::try_from(storage.wal).unwrap_or(i64::MAX));
        }
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(error = %error, "encoding metrics failed");
        }
        text
    }
}

/// Holds a gauge one higher while it lives.
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn new(gauge: Gauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The handle the access log finds in each request's extensions (`None`: metrics are off).
#[derive(Clone, Default)]
pub struct MetricsHandle(pub Option<Arc<Metrics>>);

/// `GET /metrics`: 404 while metrics are off; 401 without the admin token.
pub async fn scrape(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let Some(metrics) = state.metrics.clone() else {
        return Err(ApiError::not_found("metrics are disabled (set metrics = true)"));
    };
    crate::admin::require_admin(&state, &headers)?;
    let storage = state
        .blocking(|store| Ok(store.storage_bytes()))
        .await?
        .inspect_err(|error| tracing::warn!(error = %error, "reading the store's size failed"))
        .ok();
    let mut response = (StatusCode::OK, metrics.render(storage)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(response)
}

/// Counts what one download sent, from the producing thread: `resources(n)` once the file has
/// been written (or broke off), with the bytes handed to the response.
pub struct ExportCounter {
    metrics: Option<Arc<Metrics>>,
    tenant: TenantId,
}

impl ExportCounter {
    pub fn new(state: &AppState, tenant: i64) -> ExportCounter {
        ExportCounter { metrics: state.metrics.clone(), tenant: TenantId(tenant) }
    }

    pub fn sent(&self, resources: u64, bytes: u64) {
        if let Some(metrics) = &self.metrics {
            metrics.exported(self.tenant, resources, bytes);
        }
    }
}

/// Counts the resources an upload stored (the import rate is its `rate()`).
pub fn imported(state: &AppState, caller: &crate::auth::Caller, resources: u64) {
    if let Some(metrics) = &state.metrics {
        metrics.imported(&caller.tenant_name, resources);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_family_with_its_labels() {
        let metrics = Metrics::new();
        metrics.observe_request("GET", "/r4/{type}/{id}", 200, Duration::from_millis(3));
        metrics.observe_request("GET", "/r4/{type}/{id}", 401, Duration::from_millis(1));
        metrics.name_tenant(TenantId(3), "acme");
        metrics.exported(TenantId(3), 10, 2048);
        metrics.quota_rejected("acme", "requests");
        let _connection = metrics.connection();
        let text = metrics.render(Some(bulkhead_store::StorageBytes { database: 4096, wal: 512 }));
        for line in [
            "bulkhead_http_requests_total{method=\"GET\",route=\"/r4/{type}/{id}\",status=\"200\"} 1",
            "bulkhead_failed_authentications_total 1",
            "bulkhead_exported_resources_total{tenant=\"acme\"} 10",
            "bulkhead_exported_bytes_total{tenant=\"acme\"} 2048",
            "bulkhead_quota_rejections_total{tenant=\"acme\",quota=\"requests\"} 1",
            "bulkhead_open_connections 1",
            "bulkhead_database_bytes 4096",
            "bulkhead_wal_bytes 512",
            "bulkhead_http_request_duration_seconds_count{route=\"/r4/{type}/{id}\"} 2",
        ] {
            assert!(text.lines().any(|got| got == line), "missing {line} in\n{text}");
        }
    }

    /// The per-request cost (run with `--ignored --nocapture` to see it).
    #[test]
    #[ignore]
    fn cost_of_observing_a_request() {
        let metrics = Metrics::new();
        let rounds = 1_000_000;
        let started = std::time::Instant::now();
        for round in 0..rounds {
            let status = if round % 10 == 0 { 404 } else { 200 };
            metrics.observe_request("GET", "/bulk-data/r4/$export/{type}/{file}", status, Duration::from_micros(900));
        }
        println!("{:.0} ns per request", started.elapsed().as_nanos() as f64 / f64::from(rounds));
    }
}
