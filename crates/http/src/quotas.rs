//! Per-tenant quotas: requests per second, export plans at once, upload bytes per minute, and a
//! tenant's share of the download pool. Beyond a quota the request gets 429 with `Retry-After`
//! (an OperationOutcome, `throttled`) and the refusal is counted in the metrics; other tenants
//! are not affected, since every limit is kept per tenant.
//!
//! Running exports are counted from the store, so the cap holds across every instance on it:
//! an asynchronous job counts from its kick-off until it finishes (or expires), counted in the
//! transaction that stores it; a synchronous kick-off counts in this process while it is
//! planned, on top of the store's count.
//!
//! The request rate and upload bytes are token buckets. On one machine (SQLite) they live in
//! this process, one per tenant. With [`QuotaConfig::shared`] (several instances on PostgreSQL)
//! each tenant's bucket is a row of the store (`quota_buckets`) and every instance draws
//! batches from it, a tenth of the bucket at a time, into a local allowance it serves requests
//! from: most requests cost no database round trip, and the instances together never take more
//! from the bucket than it holds. What they can serve beyond one bucket is what they hold at
//! once: at most a batch each (N instances: N tenths of a second's requests), plus the upload
//! bytes that arrive beyond what an upload's admission drew, which its instance owes the bucket
//! and pays at its next draw. Drawn tokens an instance does not spend within the bucket's
//! window (a second, a minute) are dropped, never saved up. An instance that finds the bucket
//! empty waits for a batch to refill before it asks again (refusing locally meanwhile), so a
//! tenant over its limit costs the database at most ten draws a second per instance. While the
//! store cannot be reached, this process's own buckets count.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use bulkhead_fhir::IssueType;
use bulkhead_store::TenantId;
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

/// The per-tenant limits (0: no limit).
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaConfig {
    /// Authenticated requests per second per tenant (a token bucket holding one second's worth).
    pub requests_per_second: u32,
    /// Exports of one tenant at once, across instances: asynchronous jobs not yet finished and
    /// synchronous kick-offs being planned.
    pub concurrent_exports: usize,
    /// Request body bytes of `$upload-ndjson` per tenant per minute.
    pub upload_bytes_per_minute: u64,
    /// Export files of one tenant streamed at once (its share of `max_concurrent_downloads`).
    pub concurrent_downloads: usize,
    /// Keep the request-rate and upload buckets (and the failed-login counts) in the store,
    /// shared by every instance on it (set on PostgreSQL), instead of in this process.
    pub shared: bool,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig {
            requests_per_second: 0,
            concurrent_exports: 0,
            upload_bytes_per_minute: 0,
            concurrent_downloads: 4,
            shared: false,
        }
    }
}

/// The quotas' running state.
#[derive(Default)]
pub struct Quotas {
    requests: Mutex<HashMap<TenantId, Bucket>>,
    uploads: Mutex<HashMap<TenantId, Bucket>>,
    exports: Mutex<HashMap<TenantId, usize>>,
    downloads: Mutex<HashMap<TenantId, Arc<Semaphore>>>,
    allowances: Mutex<HashMap<(TenantId, &'static str), SharedAllowance>>,
}

/// Tokens of a shared bucket drawn by this process and not spent yet (negative: upload bytes
/// owed to the bucket).
#[derive(Debug, Default)]
struct Allowance {
    tokens: f64,
    drawn: Option<Instant>,
    /// The bucket was found empty: refuse here until then without asking the store.
    empty_until: Option<Instant>,
}

/// One tenant's allowance of one shared bucket, locked while it draws.
type SharedAllowance = Arc<Mutex<Allowance>>;

/// A tenant's bucket in the store ([`bulkhead_store::Store::draw_quota_tokens`]).
#[derive(Debug, Clone, Copy)]
struct SharedBucket {
    quota: &'static str,
    capacity: f64,
    rate: f64,
    /// How long drawn tokens may wait here to be spent.
    keep: Duration,
}

/// Each draw asks for this fraction of the bucket (more when one upload needs more).
const BATCH_FRACTION: f64 = 0.1;

/// A token bucket: `capacity` tokens, refilled at `rate` per second; it may go below zero (an
/// upload is charged as its bytes arrive), and then refuses until it is positive again.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn refill(&mut self, capacity: f64, rate: f64, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(capacity);
        self.updated = now;
        self.tokens
    }
}

/// Seconds until a bucket at `tokens` holds `needed`, at least 1.
fn seconds_until(tokens: f64, needed: f64, rate: f64) -> u64 {
    (((needed - tokens) / rate).ceil() as u64).max(1)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Quotas {
    /// Takes one request token of `tenant`; `Err(seconds to wait)` when there is none.
    fn take_request(&self, tenant: TenantId, per_second: u32, now: Instant) -> Result<(), u64> {
        let rate = f64::from(per_second);
        let mut buckets = lock(&self.requests);
        let bucket = buckets.entry(tenant).or_insert(Bucket { tokens: rate, updated: now });
        let tokens = bucket.refill(rate, rate, now);
        if tokens < 1.0 {
            return Err(seconds_until(tokens, 1.0, rate));
        }
        bucket.tokens -= 1.0;
        Ok(())
    }

    /// Whether `tenant` may start an upload of `announced` bytes (its `Content-Length`, if any):
    /// `Err(seconds to wait)` while its bucket is empty, or too low for the announced size.
    fn admit_upload(&self, tenant: TenantId, per_minute: u64, announced: Option<u64>, now: Instant) -> Result<(), u64> {
        let (capacity, rate) = (per_minute as f64, per_minute as f64 / 60.0);
        let mut buckets = lock(&self.uploads);
        let bucket = buckets.entry(tenant).or_insert(Bucket { tokens: capacity, updated: now });
        let tokens = bucket.refill(capacity, rate, now);
        // An upload larger than a whole minute's allowance may start with a full bucket.
        let needed = announced.map_or(1.0, |bytes| (bytes as f64).clamp(1.0, capacity));
        if tokens < needed {
            return Err(seconds_until(tokens, needed, rate));
        }
        Ok(())
    }

    /// Charges `bytes` to `tenant`'s allowance of a shared bucket (it may go below zero: a debt
    /// the next draw pays).
    fn charge_shared(&self, tenant: TenantId, quota: &'static str, bytes: u64) {
        let cell = lock(&self.allowances).entry((tenant, quota)).or_default().clone();
        lock(&cell).tokens -= bytes as f64;
    }

    /// Charges `bytes` of upload to `tenant`.
    fn charge_upload(&self, tenant: TenantId, bytes: u64) {
        if let Some(bucket) = lock(&self.uploads).get_mut(&tenant) {
            bucket.tokens -= bytes as f64;
        }
    }

    /// Makes `needed` tokens of `tenant`'s shared `bucket` available in this process, drawing
    /// from the store when the local allowance is short; `take`: spend them now (a request), or
    /// leave them for the charges as bytes arrive (an upload). `Ok(Err(seconds to wait))` when
    /// the bucket cannot give them.
    fn take_shared(
        &self,
        store: &dyn bulkhead_store::Store,
        tenant: TenantId,
        bucket: SharedBucket,
        needed: f64,
        take: bool,
        now: Instant,
    ) -> Result<Result<(), u64>, bulkhead_store::StoreError> {
        let cell = lock(&self.allowances).entry((tenant, bucket.quota)).or_default().clone();
        let mut allowance = lock(&cell);
        if allowance.tokens > 0.0
            && allowance.drawn.is_some_and(|drawn| now.saturating_duration_since(drawn) >= bucket.keep)
        {
            allowance.tokens = 0.0;
        }
        if allowance.tokens < needed {
            if allowance.empty_until.is_some_and(|until| until > now) {
                return Ok(Err(seconds_until(allowance.tokens, needed, bucket.rate)));
            }
            let batch = (bucket.capacity * BATCH_FRACTION).max(1.0);
            let want = (needed - allowance.tokens).max(batch);
            let now_micros = bulkhead_fhir::now_micros();
            let granted =
                store.draw_quota_tokens(tenant, bucket.quota, want, bucket.capacity, bucket.rate, now_micros)?;
            allowance.tokens += granted;
            allowance.drawn = Some(now);
            if allowance.tokens < needed {
                allowance.empty_until = Some(now + Duration::from_secs_f64(batch / bucket.rate));
                return Ok(Err(seconds_until(allowance.tokens, needed, bucket.rate)));
            }
            allowance.empty_until = None;
        }
        if take {
            allowance.tokens -= needed;
        }
        Ok(Ok(()))
    }

    /// The pool share of `tenant`: a semaphore of `permits`.
    fn download_share(&self, tenant: TenantId, permits: usize) -> Arc<Semaphore> {
        lock(&self.downloads).entry(tenant).or_insert_with(|| Arc::new(Semaphore::new(permits.max(1)))).clone()
    }
}

tokio::task_local! {
    /// The `Retry-After` of the current request's quota refusal, set where it is refused.
    static RETRY_AFTER: Cell<Option<u64>>;
}

/// A 429 OperationOutcome; its `Retry-After` header is added by [`retry_after_header`].
fn throttled(state: &AppState, caller: &Caller, quota: &'static str, seconds: u64, what: String) -> ApiError {
    let _ = RETRY_AFTER.try_with(|slot| slot.set(Some(seconds)));
    if let Some(metrics) = &state.metrics {
        metrics.quota_rejected(&caller.tenant_name, quota);
    }
    tracing::info!(tenant = %caller.tenant_name, quota, retry_after = seconds, "quota exceeded");
    ApiError::new(StatusCode::TOO_MANY_REQUESTS, IssueType::Throttled, format!("{what}; retry after {seconds} s"))
}

/// Middleware adding `Retry-After` to a response refused by a quota.
pub async fn retry_after_header(request: Request, next: Next) -> Response {
    let (mut response, retry_after) = RETRY_AFTER
        .scope(Cell::new(None), async {
            let response = next.run(request).await;
            (response, RETRY_AFTER.with(Cell::get))
        })
        .await;
    if let Some(seconds) = retry_after.filter(|_| response.status() == StatusCode::TOO_MANY_REQUESTS) {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// Counts one authenticated request against the caller's tenant (`tenant_requests_per_second`).
pub fn admit_request(state: &AppState, caller: &Caller) -> Result<(), ApiError> {
    if let Some(metrics) = &state.metrics {
        metrics.name_tenant(caller.tenant, &caller.tenant_name);
    }
    let per_second = state.config.quotas.requests_per_second;
    if per_second == 0 {
        return Ok(());
    }
    let now = Instant::now();
    let rate = f64::from(per_second);
    let bucket = SharedBucket { quota: "requests", capacity: rate, rate, keep: Duration::from_secs(1) };
    let admitted = match state.config.quotas.shared {
        true => state.quotas.take_shared(state.store.as_ref(), caller.tenant, bucket, 1.0, true, now),
        false => Ok(state.quotas.take_request(caller.tenant, per_second, now)),
    };
    let admitted = admitted.unwrap_or_else(|error| {
        tracing::debug!(error = %error, "request rate counted in this process only");
        state.quotas.take_request(caller.tenant, per_second, now)
    });
    admitted.map_err(|seconds| {
        throttled(state, caller, "requests", seconds, format!("tenant request rate above {per_second} per second"))
    })
}

/// One export of a tenant being planned; dropping it ends the count.
pub struct RunningExport {
    state: AppState,
    tenant: TenantId,
    tenant_name: String,
}

impl Drop for RunningExport {
    fn drop(&mut self) {
        let mut running = lock(&self.state.quotas.exports);
        if let Some(count) = running.get_mut(&self.tenant) {
            *count = count.saturating_sub(1);
            if let Some(metrics) = &self.state.metrics {
                metrics.exports_running(&self.tenant_name, *count);
            }
        }
    }
}

/// The 429 of a kick-off beyond `tenant_concurrent_exports`.
pub fn exports_throttled(state: &AppState, caller: &Caller) -> ApiError {
    let limit = state.config.quotas.concurrent_exports;
    throttled(state, caller, "exports", 1, format!("this tenant already has {limit} exports running"))
}

/// The cap an asynchronous kick-off's job insert applies to the tenant's unfinished jobs
/// ([`bulkhead_store::Store::enqueue_export_job`]): `tenant_concurrent_exports` less this
/// process's synchronous kick-offs being planned. `None`: no cap; `Some(0)`: refuse at once.
pub fn job_cap(state: &AppState, caller: &Caller) -> Option<u64> {
    let limit = state.config.quotas.concurrent_exports;
    if limit == 0 {
        return None;
    }
    let local = lock(&state.quotas.exports).get(&caller.tenant).copied().unwrap_or(0);
    Some(limit.saturating_sub(local) as u64)
}

/// Sets the `exports_running` gauge of `tenant`: its `unfinished` jobs on the store (every
/// instance's) and this process's synchronous kick-offs being planned.
pub fn note_exports_running(state: &AppState, tenant: TenantId, unfinished: u64) {
    if let Some(metrics) = &state.metrics {
        let local = lock(&state.quotas.exports).get(&tenant).copied().unwrap_or(0);
        metrics.exports_running(&metrics.tenant_name(tenant), local + unfinished as usize);
    }
}

/// Admits one synchronous export kick-off of the caller's tenant (`tenant_concurrent_exports`),
/// given the tenant's `unfinished` asynchronous jobs on the store; the export counts as running
/// until the returned value is dropped (its plan is made).
pub fn admit_export(state: &AppState, caller: &Caller, unfinished: u64) -> Result<RunningExport, ApiError> {
    let limit = state.config.quotas.concurrent_exports;
    let mut running = lock(&state.quotas.exports);
    let count = running.entry(caller.tenant).or_insert(0);
    if limit > 0 && (*count as u64).saturating_add(unfinished) >= limit as u64 {
        drop(running);
        return Err(exports_throttled(state, caller));
    }
    *count += 1;
    if let Some(metrics) = &state.metrics {
        metrics.exports_running(&caller.tenant_name, *count);
    }
    Ok(RunningExport { state: state.clone(), tenant: caller.tenant, tenant_name: caller.tenant_name.clone() })
}

/// Admits an upload of the caller's tenant (`tenant_upload_bytes_per_minute`) and returns its
/// body, charging the tenant for every byte as it arrives.
pub fn metered_upload(state: &AppState, caller: &Caller, headers: &HeaderMap, body: Body) -> Result<Body, ApiError> {
    let per_minute = state.config.quotas.upload_bytes_per_minute;
    if per_minute == 0 {
        return Ok(body);
    }
    let announced = headers.get(header::CONTENT_LENGTH).and_then(|value| value.to_str().ok()?.parse().ok());
    let now = Instant::now();
    let capacity = per_minute as f64;
    let bucket = SharedBucket { quota: "upload_bytes", capacity, rate: capacity / 60.0, keep: Duration::from_secs(60) };
    let needed = announced.map_or(1.0, |bytes| (bytes as f64).clamp(1.0, capacity));
    let shared = state.config.quotas.shared
        && match state.quotas.take_shared(state.store.as_ref(), caller.tenant, bucket, needed, false, now) {
            Ok(Ok(())) => true,
            Ok(Err(seconds)) => {
                let what = format!("tenant uploads above {per_minute} bytes per minute");
                return Err(throttled(state, caller, "upload_bytes", seconds, what));
            }
            Err(error) => {
                tracing::debug!(error = %error, "upload bytes counted in this process only");
                false
            }
        };
    if !shared {
        state.quotas.admit_upload(caller.tenant, per_minute, announced, now).map_err(|seconds| {
            let what = format!("tenant uploads above {per_minute} bytes per minute");
            throttled(state, caller, "upload_bytes", seconds, what)
        })?;
    }
    let (state, tenant) = (state.clone(), caller.tenant);
    Ok(Body::from_stream(body.into_data_stream().inspect(move |chunk| {
        if let Ok(chunk) = chunk {
            match shared {
                true => state.quotas.charge_shared(tenant, "upload_bytes", chunk.len() as u64),
                false => state.quotas.charge_upload(tenant, chunk.len() as u64),
            }
        }
    })))
}

/// A tenant's place in its share of the download pool, held with the pool slot for as long as
/// the file streams.
pub struct DownloadShare {
    _permit: OwnedSemaphorePermit,
    _running: Option<crate::metrics::GaugeGuard>,
}

/// Waits (up to `download_queue_wait`) for one of the tenant's `tenant_concurrent_downloads`
/// places: a tenant downloading many files at once queues behind itself, never taking the whole
/// pool from the others. Beyond the wait: 429.
pub async fn download_share(state: &AppState, tenant: TenantId) -> Result<DownloadShare, Response> {
    let share = state.quotas.download_share(tenant, state.config.quotas.concurrent_downloads);
    let queued = state.metrics.as_ref().map(|metrics| metrics.download_gauge(tenant, "queued"));
    let wait = state.config.download_queue_wait;
    let permit = match share.clone().try_acquire_owned() {
        Ok(permit) => Some(permit),
        Err(_) => tokio::time::timeout(wait, share.acquire_owned()).await.ok().and_then(Result::ok),
    };
    drop(queued);
    let Some(permit) = permit else {
        let limit = state.config.quotas.concurrent_downloads;
        if let Some(metrics) = &state.metrics {
            metrics.quota_rejected(&metrics.tenant_name(tenant), "downloads");
        }
        let error = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            IssueType::Throttled,
            format!("this tenant is already downloading {limit} export files; retry after 1 s"),
        );
        let mut response = axum::response::IntoResponse::into_response(error);
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1u64));
        return Err(response);
    };
    let running = state.metrics.as_ref().map(|metrics| metrics.download_gauge(tenant, "running"));
    Ok(DownloadShare { _permit: permit, _running: running })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_bucket_holds_one_seconds_worth_and_refills() {
        let quotas = Quotas::default();
        let (a, b) = (TenantId(1), TenantId(2));
        let start = Instant::now();
        for _ in 0..5 {
            quotas.take_request(a, 5, start).unwrap();
        }
        assert_eq!(quotas.take_request(a, 5, start), Err(1));
        quotas.take_request(b, 5, start).expect("another tenant has its own bucket");
        quotas.take_request(a, 5, start + Duration::from_millis(210)).expect("refilled by one token");
        assert!(quotas.take_request(a, 5, start + Duration::from_millis(210)).is_err());
    }

    #[test]
    fn an_upload_bucket_goes_into_debt_and_waits_for_it() {
        let quotas = Quotas::default();
        let tenant = TenantId(1);
        let start = Instant::now();
        quotas.admit_upload(tenant, 6000, Some(5000), start).unwrap();
        quotas.charge_upload(tenant, 9000);
        // 3000 bytes of debt at 100 bytes/s: 31 s before one byte fits, 80 s before 5000 do.
        assert_eq!(quotas.admit_upload(tenant, 6000, None, start), Err(31));
        assert_eq!(quotas.admit_upload(tenant, 6000, Some(5000), start), Err(80));
        assert_eq!(quotas.admit_upload(tenant, 6000, Some(1), start + Duration::from_secs(31)), Ok(()));
        // Larger than a minute's allowance: admitted with a full bucket.
        assert_eq!(quotas.admit_upload(TenantId(2), 6000, Some(1 << 30), start), Ok(()));
    }

    /// Two processes on one store draw a tenant's requests from one bucket: together they
    /// admit what it holds (plus at most what one has drawn and not spent), not twice that.
    #[test]
    fn shared_request_buckets_hold_across_processes() {
        let dir = tempfile::tempdir().unwrap();
        let store = bulkhead_store::sqlite::SqliteStore::open(&dir.path().join("db")).unwrap();
        let (one, two) = (Quotas::default(), Quotas::default());
        let bucket = SharedBucket { quota: "requests", capacity: 20.0, rate: 20.0, keep: Duration::from_secs(1) };
        let (a, b) = (TenantId(1), TenantId(2));
        let now = Instant::now();
        let mut admitted = 0;
        for n in 0..40 {
            let quotas = if n % 2 == 0 { &one } else { &two };
            if quotas.take_shared(&store, a, bucket, 1.0, true, now).unwrap().is_ok() {
                admitted += 1;
            }
        }
        assert!((20..=20 + 2 * 2).contains(&admitted), "{admitted} admitted of a bucket of 20");
        assert_eq!(one.take_shared(&store, a, bucket, 1.0, true, now).unwrap(), Err(1), "refused locally");
        assert!(two.take_shared(&store, b, bucket, 1.0, true, now).unwrap().is_ok(), "another tenant is served");
    }

    /// Upload bytes beyond what an admission drew are owed and paid from the shared bucket at
    /// the next admission.
    #[test]
    fn shared_upload_debt_is_paid_at_the_next_draw() {
        let dir = tempfile::tempdir().unwrap();
        let store = bulkhead_store::sqlite::SqliteStore::open(&dir.path().join("db")).unwrap();
        let quotas = Quotas::default();
        let bucket = SharedBucket { quota: "upload_bytes", capacity: 6000.0, rate: 1.0, keep: Duration::from_secs(60) };
        let (tenant, now) = (TenantId(1), Instant::now());
        assert_eq!(quotas.take_shared(&store, tenant, bucket, 1000.0, false, now).unwrap(), Ok(()));
        quotas.charge_shared(tenant, "upload_bytes", 5500);
        // 4500 owed: paid from the 5000 the bucket still holds, so 500 are left for the next.
        assert!(quotas.take_shared(&store, tenant, bucket, 1000.0, false, now).unwrap().is_err());
        let other = Quotas::default();
        assert!(other.take_shared(&store, tenant, bucket, 1.0, false, now).unwrap().is_err(), "the bucket is empty");
    }
}
