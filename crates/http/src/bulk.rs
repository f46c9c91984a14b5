//! Group bulk export over HTTP: the kick-off (1upHealth style without `Prefer: respond-async`:
//! 200 with the manifest at once; with it, 202 and a job, see [`crate::export_status`]) and the
//! signed file downloads, streamed from the store.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bulkhead_export::files::{open_file_view, write_file};
use bulkhead_export::params::{parse_export_params, ParseContext};
use bulkhead_export::prefer::parse_prefer;
use bulkhead_export::record::PlannedExport;
use bulkhead_export::token::{record_id, FileClaims, FileKind, FileRef, TokenError};
use bulkhead_export::{plan_group_export, ExportError, ExportLevel, GroupExportPlan, GroupExportRequest};
use bulkhead_fhir::{format_instant, now_micros, IssueType};
use bulkhead_store::{ExportRecord, StoreError, TenantId};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use crate::auth::{authenticate, authorize, AuthMethod, Caller};
use crate::chunk_pool::{CHUNKS, CHUNK_BYTES};
use crate::encoding::{encode, negotiate};
use crate::error::ApiError;
use crate::negotiation::{check_accept, JsonBody};
use crate::object_output::{OutputStore, WrittenObject};
use crate::scopes::{Access, Grant};
use crate::state::AppState;
use crate::urls::base_url;

/// Chunks of `CHUNK_BYTES` waiting for the response body at most: with them this bounds the
/// memory of a download, whatever the file's size.
const CHANNEL_DEPTH: usize = 4;

const MICROS_PER_SECOND: i64 = 1_000_000;

impl From<ExportError> for ApiError {
    fn from(error: ExportError) -> ApiError {
        match error {
            ExportError::NotFound(what) => ApiError::not_found(what),
            ExportError::Gone(what) => ApiError::new(StatusCode::GONE, IssueType::Deleted, what),
            ExportError::Invalid(what) => ApiError::bad_request(IssueType::Value, what),
            ExportError::HistoryPruned(what) => ApiError::bad_request(IssueType::Value, what).at("_since"),
            ExportError::Store(store_error) => store_error.into(),
            // Only a cancelled job's planner sees it, and nobody is waiting for that answer.
            ExportError::Cancelled => ApiError::internal(),
            ExportError::Sink(detail) => {
                tracing::info!(error = %detail, "download interrupted");
                ApiError::internal()
            }
        }
    }
}

pub(crate) fn now_seconds() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs() as i64)
}

/// `GET|POST [/bulk-data]/r4/Group/{id}/$export`.
pub async fn kick_off(
    State(state): State<AppState>,
    Path(group_id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    kick_off_at(state, ExportLevel::Group(group_id), uri, headers, None).await
}

/// `[/bulk-data]/r4/$export` and `[/bulk-data]/r4/Patient/$export` by GET.
pub async fn system_kick_off(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    kick_off_at(state, ExportLevel::System, uri, headers, None).await
}

pub async fn patient_kick_off(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    kick_off_at(state, ExportLevel::Patient, uri, headers, None).await
}

/// The POST kick-offs: the parameters come as a FHIR `Parameters` body.
pub async fn system_kick_off_post(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: JsonBody,
) -> Result<Response, ApiError> {
    kick_off_at(state, ExportLevel::System, uri, headers, Some(body.0)).await
}

pub async fn patient_kick_off_post(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: JsonBody,
) -> Result<Response, ApiError> {
    kick_off_at(state, ExportLevel::Patient, uri, headers, Some(body.0)).await
}

pub async fn group_kick_off_post(
    State(state): State<AppState>,
    Path(group_id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: JsonBody,
) -> Result<Response, ApiError> {
    kick_off_at(state, ExportLevel::Group(group_id), uri, headers, Some(body.0)).await
}

/// A kick-off at any level, by GET (`parameters` None: the query string) or POST (a
/// `Parameters` body). Every level plans the same way and builds the same manifest; the base
/// decides the manner: `/bulk-data/r4` keeps 1upHealth's (without `Prefer: respond-async`, 200
/// with the manifest at once), `/r4` follows the Bulk Data IG (always asynchronous: 202 as soon
/// as the request is checked, the plan made in the background at the kick-off's transaction
/// time, and the manifest at the job's status URL).
pub(crate) async fn kick_off_at(
    state: AppState,
    level: ExportLevel,
    uri: Uri,
    headers: HeaderMap,
    parameters: Option<Value>,
) -> Result<Response, ApiError> {
    let method = if parameters.is_some() { Method::POST } else { Method::GET };
    let caller = authorize(&state, &method, uri.path(), &headers).await?;
    check_accept(&headers)?;
    let preferences = parse_prefer(headers.get_all("prefer").iter().filter_map(|value| value.to_str().ok()));
    let raw_query = uri.query().unwrap_or("");
    let mut pairs: Vec<(String, String)> = form_urlencoded::parse(raw_query.as_bytes())
        .into_owned()
        .filter(|(name, _)| !crate::negotiation::is_general_param(name))
        .collect();
    let post = parameters.is_some();
    if let Some(parameters) = &parameters {
        pairs.extend(parameters_as_pairs(parameters)?);
    }
    crate::audit::note_export_kickoff(&level, &pairs);
    let context = ParseContext { level: &level, lenient: preferences.lenient, post };
    let (mut params, warnings) = parse_export_params(&pairs, context)
        .map_err(|error| ApiError::from_issue(StatusCode::BAD_REQUEST, error.issue))?;
    params.types = exportable_types(&caller, &level, params.types)?;
    let with_since = params.since.is_some();
    let standard_base = !uri.path().starts_with("/bulk-data/");
    // With an output store, an asynchronous export's files are written to it before the job
    // completes (see `crate::materialise`); a synchronous one always streams from the store.
    let output = state.output.clone().filter(|_| preferences.respond_async || standard_base);
    let urls = FileUrls::new(&state, &caller, output.as_deref());
    let request = GroupExportRequest {
        tenant: caller.tenant,
        client_id: caller.client_id.clone(),
        visibility: caller.visibility.clone(),
        level: level.clone(),
        params,
        warnings,
        part_size: state.config.export_part_size,
        files_expire: urls.expires.saturating_mul(MICROS_PER_SECOND),
    };
    let base = base_url(&state, &headers);
    // Bulk Data IG §manifest `request`: the full URL of a GET; a POST's without its parameters.
    let request_url = match post {
        false => format!("{base}{}", uri.path_and_query().map_or(uri.path(), |pq| pq.as_str())),
        true => format!("{base}{}", uri.path()),
    };
    if preferences.respond_async || standard_base {
        // The 202 goes out once the request is checked and the job stored with its work; a
        // worker (of any instance on the store) plans it, and writes its files to the output
        // store, if any. The job is named by its export record, so its objects are found from
        // either.
        let record = uuid::Uuid::from_bytes(urls.record).to_string();
        let work = crate::export_work::ExportWork {
            level: level.clone(),
            pairs,
            lenient: preferences.lenient,
            post,
            types: request.params.types.clone(),
            client_id: caller.client_id.clone(),
            user: caller.visibility.user().map(str::to_owned),
            part_size: request.part_size,
            record,
            issued: urls.issued,
            expires: urls.expires,
            requires_credentials: urls.requires_credentials,
            base: base.clone(),
            request_url,
            materialise: output.is_some(),
            transaction_time: 0,
        };
        return crate::export_status::accept(&state, &caller, &base, request, work).await;
    }
    let unfinished = match state.config.quotas.concurrent_exports {
        0 => 0,
        _ => {
            let tenant = caller.tenant;
            state.blocking(move |store| Ok(store.unfinished_export_jobs(tenant, now_micros())?)).await?
        }
    };
    let _running = crate::quotas::admit_export(&state, &caller, unfinished)?;
    let slot = match crate::planning_pool::planning_slot(&state).await {
        Ok(slot) => slot,
        Err(throttled) => return Ok(throttled),
    };
    let started = std::time::Instant::now();
    let sweep_output = state.output.clone();
    let plan = state
        .blocking(move |store| {
            let _slot = slot;
            crate::export_status::sweep_expired(store, sweep_output.as_deref(), now_micros());
            let plan = plan_group_export(store, &request)?;
            urls.store_record(store, &plan.export)?;
            Ok(plan)
        })
        .await?;
    tracing::info!(level = ?level, files = plan.export.files.len(), millis = started.elapsed().as_millis() as u64, "export planned");
    crate::audit::note_export_plan(&plan);
    let manifest = manifest(&state, &urls, &base, &request_url, plan, with_since, None);
    let mut response = (StatusCode::OK, manifest.body.to_string()).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

/// A POST kick-off's `Parameters` body as `(name, value)` text pairs, in order, for the same
/// parser a GET query goes through. Each parameter needs a `name` and exactly one primitive
/// `value[x]` (or a `valueReference`, whose `reference` is the text).
fn parameters_as_pairs(parameters: &Value) -> Result<Vec<(String, String)>, ApiError> {
    let invalid = |message: String| ApiError::bad_request(IssueType::Invalid, message);
    if parameters.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(invalid("a POST $export takes a Parameters resource as its body".to_owned()));
    }
    let entries = match parameters.get("parameter") {
        None => return Ok(Vec::new()),
        Some(Value::Array(entries)) => entries,
        Some(_) => return Err(invalid("Parameters.parameter must be an array".to_owned())),
    };
    let mut pairs = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        let Some(name) = entry.get("name").and_then(Value::as_str) else {
            return Err(invalid(format!("Parameters.parameter[{index}] has no name")));
        };
        let values: Vec<(&String, &Value)> =
            entry.as_object().into_iter().flatten().filter(|(key, _)| key.starts_with("value")).collect();
        let text = match values.as_slice() {
            [(key, Value::Object(reference))] if key.as_str() == "valueReference" => {
                reference.get("reference").and_then(Value::as_str).map(str::to_owned)
            }
            [(_, Value::String(text))] => Some(text.clone()),
            [(_, value @ (Value::Bool(_) | Value::Number(_)))] => Some(value.to_string()),
            _ => None,
        };
        let Some(text) = text else {
            return Err(invalid(format!(
                "Parameters.parameter[{index}] ('{}') needs exactly one primitive value[x] or a valueReference",
                name.chars().take(64).collect::<String>()
            )));
        };
        pairs.push((name.to_owned(), text));
    }
    Ok(pairs)
}

/// The types an export of `caller` covers (SMART backend-services: a Group export needs read
/// on Group; an explicit `_type` the scopes do not cover fails the kick-off with 403; without
/// `_type` only the covered types are exported). A read scope on every type (`system/*.read`)
/// covers what full access exports, so it keeps the associated data an explicit list would drop.
fn exportable_types(
    caller: &Caller,
    level: &ExportLevel,
    requested: Option<Vec<String>>,
) -> Result<Option<Vec<String>>, ApiError> {
    if caller.grant == Grant::Full || caller.grant.permits_every_type(Access::Read) {
        return Ok(requested);
    }
    if level.group().is_some() {
        caller.require("Group", Access::Read)?;
    }
    match requested {
        Some(types) => {
            for resource_type in &types {
                caller.require(resource_type, Access::Read)?;
            }
            Ok(Some(types))
        }
        None => {
            let covered: Vec<String> = level
                .exportable_types()
                .into_iter()
                .filter(|resource_type| caller.grant.permits(resource_type, Access::Read))
                .map(str::to_owned)
                .collect();
            Ok(Some(covered))
        }
    }
}

/// The path segment a file URL carries for its kind.
fn url_type(kind: FileKind, resource_type: &str) -> &str {
    match kind {
        FileKind::Output => resource_type,
        FileKind::Deleted => "Bundle",
        FileKind::Error => "OperationOutcome",
    }
}

/// How one export's file URLs are minted: the record they refer to (stored at kick-off), when
/// they expire, and whether they need the client's credentials (the server's mode now, recorded
/// in every token).
#[derive(Clone, Copy)]
pub(crate) struct FileUrls {
    pub tenant: TenantId,
    pub record: [u8; 16],
    pub issued: i64,
    pub expires: i64,
    pub requires_credentials: bool,
}

impl FileUrls {
    /// An export started with an access token always needs one to download (Bulk Data:
    /// `requiresAccessToken: true`); one started with client credentials follows
    /// `file_urls_require_credentials`. One materialised to `output` lists Bulkhead URLs that
    /// always need credentials, or presigned URLs that need none; it lives `file_url_ttl`
    /// whichever URLs its manifest lists (presigned ones expire with it).
    fn new(state: &AppState, caller: &Caller, output: Option<&OutputStore>) -> FileUrls {
        let config = &state.config;
        let tenant = caller.tenant;
        let requires_credentials = match output {
            Some(output) => !output.presigned_urls(),
            None => config.file_urls_require_credentials || caller.method == AuthMethod::Bearer,
        };
        let ttl = if requires_credentials || output.is_some() {
            config.file_url_ttl
        } else {
            config.self_authorising_url_ttl
        };
        let issued = now_seconds();
        let record = *uuid::Uuid::new_v4().as_bytes();
        FileUrls { tenant, record, issued, expires: issued + ttl.as_secs() as i64, requires_credentials }
    }

    /// Stores what the URLs refer to (nothing when there are no files), expiring with them.
    pub fn store_record(&self, store: &dyn bulkhead_store::Store, export: &PlannedExport) -> Result<(), StoreError> {
        if export.files.is_empty() {
            return Ok(());
        }
        let record = ExportRecord {
            id: record_id(&self.record),
            created: self.issued.saturating_mul(MICROS_PER_SECOND),
            expires: self.expires.saturating_mul(MICROS_PER_SECOND),
            plan: export.to_json(),
        };
        store.create_export_record(self.tenant, &record)
    }

    pub fn file(&self, index: usize) -> FileRef {
        FileRef {
            tenant: self.tenant.0,
            record: self.record,
            file: u32::try_from(index).unwrap_or(u32::MAX),
            exp: self.expires,
            requires_credentials: self.requires_credentials,
        }
    }
}

/// A Bulk Data manifest.
pub(crate) struct Manifest {
    pub body: Value,
}

/// The extension of a materialised manifest item: `{"size": bytes, "sha256": "lowercase hex"}` of
/// its object (Bulk Data IG: `extension`, namespaced by URL). See README, "Output store".
pub const OBJECT_EXTENSION: &str = "https://bulkhead.example/fhir/bulk-data/extension/output-object";

/// A materialised file as its manifest item shows it.
pub(crate) struct ObjectItem {
    url: String,
    object: WrittenObject,
}

/// The manifest items of a materialised export: presigned S3 URLs expiring with the job, or
/// Bulkhead URLs (credentials required) that stream the object back.
pub(crate) fn object_items(
    state: &AppState,
    urls: &FileUrls,
    base: &str,
    output: &OutputStore,
    job_id: &str,
    export: &PlannedExport,
    written: Vec<WrittenObject>,
) -> Result<Vec<ObjectItem>, ApiError> {
    let runtime = tokio::runtime::Handle::current();
    let lifetime = std::time::Duration::from_secs(u64::try_from(urls.expires - now_seconds()).unwrap_or(1).max(1));
    let mut items = Vec::with_capacity(written.len());
    for (index, object) in written.into_iter().enumerate() {
        let file = urls.file(index);
        let url = if output.presigned_urls() {
            let path = output.object_path(urls.tenant, job_id, file.file);
            runtime.block_on(output.presign(&path, lifetime)).map_err(|error| {
                tracing::error!(job = %job_id, error = %error, "presigning an export object failed");
                ApiError::internal()
            })?
        } else {
            let planned = &export.files[index];
            let item_type = url_type(planned.kind, &planned.resource_type);
            format!("{base}/bulk-data/r4/$export-object/{item_type}/{}.ndjson", state.token_keys.get().sign(&file))
        };
        items.push(ObjectItem { url, object });
    }
    Ok(items)
}

/// Builds the Bulk Data manifest, minting a signed URL per file (or listing the materialised
/// objects' URLs, with their size and SHA-256).
pub(crate) fn manifest(
    state: &AppState,
    urls: &FileUrls,
    base: &str,
    request_url: &str,
    plan: GroupExportPlan,
    with_since: bool,
    objects: Option<Vec<ObjectItem>>,
) -> Manifest {
    let (mut output, mut deleted, mut error) = (Vec::new(), Vec::new(), Vec::new());
    let organized = plan.export.organized.is_some();
    let mut objects = objects.map(Vec::into_iter);
    let keys = state.token_keys.get();
    for (index, file) in plan.export.files.iter().enumerate() {
        let item_type = url_type(file.kind, &file.resource_type);
        let item = match objects.as_mut().and_then(Iterator::next) {
            Some(ObjectItem { url, object }) => json!({
                "type": item_type,
                "url": url,
                "count": file.total,
                "extension": {OBJECT_EXTENSION: {"size": object.bytes, "sha256": object.sha256}},
            }),
            None => {
                let token = keys.sign(&urls.file(index));
                json!({"type": item_type, "url": format!("{base}/bulk-data/r4/$export/{item_type}/{token}.ndjson"), "count": file.total})
            }
        };
        let mut item = item;
        if organized && file.kind == FileKind::Output {
            // STU3: with organizeOutputBy, output items SHALL NOT carry `type` (a file holds
            // patient blocks of every type).
            if let Some(fields) = item.as_object_mut() {
                fields.remove("type");
            }
        }
        match file.kind {
            FileKind::Output => output.push(item),
            FileKind::Deleted => deleted.push(item),
            FileKind::Error => error.push(item),
        }
    }
    let mut manifest = json!({
        "transactionTime": format_instant(plan.transaction_time),
        "request": request_url,
        "requiresAccessToken": urls.requires_credentials,
        "output": output,
        "error": error,
    });
    if organized {
        manifest["outputOrganizedBy"] = json!(bulkhead_export::organize::ORGANIZED_BY);
    }
    if with_since {
        manifest["deleted"] = json!(deleted);
        // Members that left the Group since `_since`: the client may want to drop their data.
        let removed: Vec<String> = plan.removed_members.iter().map(|id| format!("Patient/{id}")).collect();
        manifest["extension"] = json!({"removedMembers": removed});
    }
    Manifest { body: manifest }
}

/// `GET /bulk-data/r4/$export/{type}/{token}.ndjson`: the file, streamed (zstd or gzip on
/// request). At most `max_concurrent_downloads` files stream at once, each with a fixed memory
/// budget; one more waits for a stream up to `download_queue_wait`, then gets 429.
pub async fn download(
    State(state): State<AppState>,
    Path((path_type, file)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    crate::audit::note("export.download", path_type.clone());
    let (_, claims) = authorize_download(&state, &headers, &path_type, &file).await?;
    crate::audit::note_download(&claims);
    let share = match crate::quotas::download_share(&state, TenantId(claims.tenant)).await {
        Ok(share) => share,
        Err(throttled) => return Ok(throttled),
    };
    let slot = match download_slot(&state).await {
        Ok(slot) => slot,
        Err(throttled) => return Ok(throttled),
    };
    let coding = negotiate(&headers);
    let (chunks_tx, chunks_rx) = mpsc::channel::<Piece>(CHANNEL_DEPTH);
    let (ready_tx, ready_rx) = oneshot::channel::<Result<(), ApiError>>();
    let store = state.store.clone();
    let stall_timeout = state.config.download_stall_timeout;
    let runtime = tokio::runtime::Handle::current();
    let exported = crate::metrics::ExportCounter::new(&state, claims.tenant);
    tokio::task::spawn_blocking(move || {
        let view = match open_file_view(store.as_ref(), &claims) {
            Ok(view) => view,
            Err(error) => {
                let _ = ready_tx.send(Err(error.into()));
                return;
            }
        };
        let _ = ready_tx.send(Ok(()));
        let mut writer = ChunkWriter { buffer: CHUNKS.take(), chunks: chunks_tx, runtime, stall_timeout, sent: 0 };
        let result = encode(coding, |out| write_file(store.as_ref(), &claims, &view, out), &mut writer);
        let result = result.and_then(|written| {
            writer
                .flush()
                .and_then(|_| writer.send(Piece::Complete))
                .map(|_| written)
                .map_err(|error| ExportError::Sink(error.to_string()))
        });
        exported.sent(*result.as_ref().unwrap_or(&0), writer.sent);
        match result {
            Ok(written) if written != claims.total => {
                tracing::error!(level = ?claims.level, resource_type = %claims.resource_type, written, planned = claims.total, "export file line count differs from its manifest count");
            }
            Ok(_) => {}
            // Dropping the sender without `Complete` ends the body with an error, so the client
            // sees a broken download, never a short file that looks whole.
            Err(error) => {
                tracing::warn!(level = ?claims.level, resource_type = %claims.resource_type, error = %error, "export file stream ended early");
            }
        }
    });
    ready_rx.await.map_err(|_| ApiError::internal())??;
    // The slot is held until the body is sent or dropped: it covers the buffered chunks too.
    let body = Body::from_stream(FileBody { pieces: chunks_rx, ended: false, _slot: (slot, share) });
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/fhir+ndjson"));
    if let Some(value) = coding.header_value() {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(value));
    }
    headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    Ok(response)
}

/// Seconds a client turned away by a full download pool is told to wait.
const POOL_RETRY_AFTER_SECONDS: u64 = 1;

/// A permit to stream one file: waits up to `download_queue_wait` for one of the
/// `max_concurrent_downloads` streams, then answers 429 with `Retry-After`.
async fn download_slot(state: &AppState) -> Result<OwnedSemaphorePermit, Response> {
    let (slots, wait) = (&state.download_slots, state.config.download_queue_wait);
    crate::planning_pool::slot(slots, wait, "download", POOL_RETRY_AFTER_SECONDS, || {
        format!(
            "{} export files are already being downloaded; retry after {POOL_RETRY_AFTER_SECONDS} s",
            state.config.max_concurrent_downloads
        )
    })
    .await
}

/// Resolves a file URL to the claims of its file and checks that the caller may download it.
///
/// Credentials are needed when the URL was minted while they were required (its token says so,
/// so switching `file_urls_require_credentials` off later does not open it) or when the server
/// requires them now (switching them on closes every self-authorising URL still out there): the
/// stricter of the two modes.
async fn authorize_download(
    state: &AppState,
    headers: &HeaderMap,
    path_type: &str,
    file: &str,
) -> Result<(FileRef, FileClaims), ApiError> {
    let file_ref = verify_file_token(state, file)?;
    let caller = if file_ref.requires_credentials || state.config.file_urls_require_credentials {
        Some(authenticate(state, headers).await?)
    } else {
        None
    };
    let record = state
        .blocking(move |store| Ok(store.export_record(TenantId(file_ref.tenant), &file_ref.record_id())?))
        .await?
        .filter(|record| record.expires > now_micros())
        .ok_or_else(no_such_file)?;
    let planned = PlannedExport::from_json(&record.plan).map_err(|error| {
        tracing::error!(error = %error, "unreadable export record");
        ApiError::internal()
    })?;
    let claims = planned.claims(&file_ref, record.created / MICROS_PER_SECOND).ok_or_else(no_such_file)?;
    if url_type(claims.kind, &claims.resource_type) != path_type {
        return Err(no_such_file());
    }
    if caller.is_some_and(|caller| !owns_file(&caller, &claims)) {
        // Another tenant's or client's file: as if it did not exist.
        return Err(no_such_file());
    }
    Ok((file_ref, claims))
}

/// `GET /bulk-data/r4/$export-object/{type}/{token}.ndjson`: a materialised file, streamed back
/// from the output store as it is stored. Authorised as a file URL (its tokens always require
/// credentials) and counted in the download pool like one.
pub async fn download_object(
    State(state): State<AppState>,
    Path((path_type, file)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    crate::audit::note("export.download", path_type.clone());
    let output = state.output.clone().ok_or_else(no_such_file)?;
    let (file_ref, claims) = authorize_download(&state, &headers, &path_type, &file).await?;
    crate::audit::note_download(&claims);
    let share = match crate::quotas::download_share(&state, TenantId(claims.tenant)).await {
        Ok(share) => share,
        Err(throttled) => return Ok(throttled),
    };
    let slot = match download_slot(&state).await {
        Ok(slot) => slot,
        Err(throttled) => return Ok(throttled),
    };
    let job_id = uuid::Uuid::from_bytes(file_ref.record).to_string();
    let path = output.object_path(TenantId(claims.tenant), &job_id, file_ref.file);
    let (size, stream) = output.read(&path).await.map_err(|error| match error {
        crate::object_output::OutputError::ObjectStore(object_store::Error::NotFound { .. }) => no_such_file(),
        error => {
            tracing::error!(job = %job_id, error = %error, "reading an export object failed");
            ApiError::internal()
        }
    })?;
    // The permits live as long as the body's stream.
    let held = (slot, share);
    let stream = futures::StreamExt::map(stream, move |chunk| {
        let _held = &held;
        chunk.map_err(std::io::Error::other)
    });
    let mut response = (StatusCode::OK, Body::from_stream(stream)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/fhir+ndjson"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    Ok(response)
}

fn no_such_file() -> ApiError {
    ApiError::not_found("no such export file")
}

fn verify_file_token(state: &AppState, file: &str) -> Result<FileRef, ApiError> {
    let token = file.strip_suffix(".ndjson").ok_or_else(no_such_file)?;
    let file_ref = state.token_keys.get().verify(token, now_seconds()).map_err(|error| match error {
        TokenError::Expired => ApiError::new(
            StatusCode::UNAUTHORIZED,
            IssueType::Security,
            "this file URL has expired; run the export again for fresh URLs",
        ),
        _ => {
            tracing::info!(error = %error, "file token refused");
            no_such_file()
        }
    })?;
    Ok(file_ref)
}

fn owns_file(caller: &Caller, claims: &FileClaims) -> bool {
    caller.tenant.0 == claims.tenant
        && caller.client_id == claims.client
        && caller.visibility.user() == claims.user.as_deref()
}

/// What the producing thread hands the response body.
enum Piece {
    Bytes(Bytes),
    /// The whole file was sent.
    Complete,
}

/// A download's response body: the producer's chunks, ending cleanly only on
/// [`Piece::Complete`]; a producer that stops without it (store error, stalled or departed
/// client) makes the body end with an error, so hyper aborts the response.
struct FileBody {
    pieces: mpsc::Receiver<Piece>,
    ended: bool,
    /// This stream's place in the download pool, and in its tenant's share of it.
    _slot: (OwnedSemaphorePermit, crate::quotas::DownloadShare),
}

impl tokio_stream::Stream for FileBody {
    type Item = std::io::Result<Bytes>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if self.ended {
            return std::task::Poll::Ready(None);
        }
        let piece = std::task::ready!(self.pieces.poll_recv(cx));
        std::task::Poll::Ready(match piece {
            Some(Piece::Bytes(bytes)) => Some(Ok(bytes)),
            Some(Piece::Complete) => {
                self.ended = true;
                None
            }
            None => {
                self.ended = true;
                Some(Err(std::io::Error::other("export file stream ended early")))
            }
        })
    }
}

/// A `Write` that hands fixed-size chunks (pooled buffers) to the response body. It blocks (on a blocking
/// thread, never inside a store transaction) while the client is slower than the store, which
/// keeps memory bounded, and gives up when the client has taken nothing for `stall_timeout`.
struct ChunkWriter {
    buffer: Vec<u8>,
    chunks: mpsc::Sender<Piece>,
    runtime: tokio::runtime::Handle,
    stall_timeout: std::time::Duration,
    /// Bytes handed to the response body so far (metrics).
    sent: u64,
}

impl ChunkWriter {
    fn send(&mut self, piece: Piece) -> std::io::Result<()> {
        let piece = match self.chunks.try_send(piece) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(client_gone()),
            Err(mpsc::error::TrySendError::Full(piece)) => piece,
        };
        match self.runtime.block_on(tokio::time::timeout(self.stall_timeout, self.chunks.send(piece))) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(client_gone()),
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the client stopped reading")),
        }
    }

    fn send_buffer(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buffer, CHUNKS.take());
        self.sent += chunk.len() as u64;
        self.send(Piece::Bytes(CHUNKS.bytes(chunk)))
    }
}

impl Drop for ChunkWriter {
    fn drop(&mut self) {
        CHUNKS.give(std::mem::take(&mut self.buffer));
    }
}

fn client_gone() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away")
}

impl Write for ChunkWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        // Never more than a chunk at once: `write_all` hands over the rest.
        let taken = bytes.len().min(CHUNK_BYTES - self.buffer.len());
        self.buffer.extend_from_slice(&bytes[..taken]);
        if self.buffer.len() >= CHUNK_BYTES {
            self.send_buffer()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send_buffer()
    }
}
