//! The audit trail: one record per audited request, or per export file download, stored in the
//! [`Store`] (append-only; see [`crate::audit_event`] for how records are shown and exported).
//!
//! How a request gets its record: the [`trail`] middleware opens a pending record for every
//! request (time, request id, peer); authentication names the actor ([`record_caller`], or
//! [`note_admin`] for the admin API); the handler says what it does with one-line hooks
//! ([`note`], [`note_resource`], [`note_export_plan`], …). When the response is ready the
//! middleware appends the record with the outcome read from the status: `success` (2xx/3xx),
//! `failure` (4xx), `error` (5xx). Writes are recorded by the store in the same transaction
//! ([`WriteAudit`]), a Bundle as one record listing its entries; a download is recorded when its body ends, with the
//! bytes sent and whether it completed (`aborted` otherwise).
//!
//! A request that names no tenant (refused credentials, public endpoints) makes no record: the
//! access log has it. A record that cannot be stored (a full disk) is logged as an error at
//! target `bulkhead::audit` and the response still goes out: refusing reads while the disk is
//! full would turn a storage alarm into an outage (see docs/security.md).

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use bulkhead_export::token::FileClaims;
use bulkhead_export::GroupExportPlan;
use bulkhead_fhir::compartment::{patient_compartments_in_text, patient_compartments_of};
use bulkhead_fhir::{now_micros, Micros};
use bulkhead_store::{
    AuditCohort, AuditRecord, Store, StoreError, StoredResource, TenantId, WriteMode, WriteOp, Written,
};
use serde_json::{json, Map, Value};

use crate::audit_writer::AuditWriter;
use crate::auth::Caller;
use crate::counted_body::CountedBody;
use crate::state::AppState;

tokio::task_local! {
    static PENDING: Arc<Mutex<Pending>>;
}

/// Longest request id kept (client-chosen ids are otherwise unbounded).
const MAX_REQUEST_ID: usize = 128;

/// Who acts.
#[derive(Debug, Clone)]
struct Actor {
    tenant: TenantId,
    client: String,
    user: Option<String>,
}

/// What the handler says the request does.
#[derive(Debug, Clone, Default)]
struct Event {
    action: String,
    target: String,
    detail: Map<String, Value>,
    patients: Vec<String>,
    cohort: Option<AuditCohort>,
    /// The Group an export kick-off names.
    group: Option<String>,
    /// A file download: recorded when its body ends.
    planned_resources: Option<u64>,
    /// The record is stored before the response goes out (administrative actions); other
    /// records are stored by the group-committing [`AuditWriter`] just after.
    durable: bool,
}

/// The record being assembled for the current request.
#[derive(Debug, Default)]
struct Pending {
    time: Micros,
    request_id: String,
    peer: Option<String>,
    actor: Option<Actor>,
    event: Option<Event>,
    /// The write stored it in its own transaction.
    stored: bool,
}

impl Pending {
    /// The record of the request, if it names a tenant and an action and is not stored yet.
    fn record(&self, outcome: &str, status: u16) -> Option<AuditRecord> {
        let (actor, event) = (self.actor.as_ref()?, self.event.as_ref()?);
        (!self.stored).then(|| AuditRecord {
            seq: 0,
            time: self.time,
            tenant: actor.tenant,
            client: actor.client.clone(),
            user: actor.user.clone(),
            peer: self.peer.clone(),
            request_id: self.request_id.clone(),
            action: event.action.clone(),
            target: event.target.clone(),
            outcome: outcome.to_owned(),
            status,
            detail: Value::Object(event.detail.clone()).to_string(),
            patients: event.patients.clone(),
            cohort: event.cohort.clone(),
        })
    }
}

fn with_pending(work: impl FnOnce(&mut Pending)) {
    let _ = PENDING.try_with(|pending| {
        if let Ok(mut pending) = pending.lock() {
            work(&mut pending);
        }
    });
}

fn with_event(work: impl FnOnce(&mut Event)) {
    with_pending(|pending| {
        if let Some(event) = pending.event.as_mut() {
            work(event);
        }
    });
}

/// The outcome of a status: `success`, `failure` (the request's fault) or `error` (ours).
pub fn outcome_of(status: StatusCode) -> &'static str {
    if status.is_server_error() {
        "error"
    } else if status.is_client_error() {
        "failure"
    } else {
        "success"
    }
}

/// Middleware: opens the request's pending record and appends it once the response is ready
/// (a download's, once its body ends).
pub async fn trail(State(state): State<AppState>, request: Request, next: Next) -> Response {
    // Off (`audit_trail = false`): no pending record, so every hook below and the writes'
    // `WriteAudit` find none and record nothing.
    if !state.config.audit_trail {
        return next.run(request).await;
    }
    let request_id = request
        .headers()
        .get(crate::REQUEST_ID)
        .map(|id| String::from_utf8_lossy(id.as_bytes()).chars().take(MAX_REQUEST_ID).collect())
        .unwrap_or_default();
    let peer = crate::connections::peer_address(&request).map(|peer| peer.to_string());
    let pending = Arc::new(Mutex::new(Pending { time: now_micros(), request_id, peer, ..Pending::default() }));
    let response = PENDING.scope(pending.clone(), next.run(request)).await;
    let status = response.status();
    let download = pending.lock().ok().and_then(|pending| {
        let planned = pending.event.as_ref()?.planned_resources?;
        Some((pending.record("success", status.as_u16())?, planned))
    });
    if let Some((record, planned)) = download.filter(|_| status.is_success()) {
        let (parts, body) = response.into_parts();
        let audit = state.audit;
        let body =
            CountedBody::new(body, move |bytes, complete| append_download(&audit, record, planned, bytes, complete));
        return Response::from_parts(parts, Body::new(body));
    }
    let record = pending.lock().ok().and_then(|pending| {
        let durable = pending.event.as_ref().is_some_and(|event| event.durable);
        Some((pending.record(outcome_of(status), status.as_u16())?, durable))
    });
    match record {
        Some((record, true)) => state.audit.submit_durable(record).await,
        Some((record, false)) => state.audit.submit(record).await,
        None => {}
    }
    response
}

/// Names the authenticated client as the request's actor (called by `auth::authenticate`).
pub fn record_caller(caller: &Caller) {
    let actor = Actor {
        tenant: caller.tenant,
        client: caller.client_id.clone(),
        user: caller.visibility.user().map(Into::into),
    };
    with_pending(|pending| pending.actor = Some(actor));
}

/// An admin API action on `tenant` (actor `admin`).
pub fn note_admin(tenant: TenantId, action: &str, target: &str) {
    with_pending(|pending| pending.actor = Some(Actor { tenant, client: "admin".into(), user: None }));
    note(action, target);
    with_event(|event| event.durable = true);
}

/// Says what the request does (`read`, `Patient/123`). A later call replaces an earlier one.
pub fn note(action: &str, target: impl Into<String>) {
    let event = Event { action: action.to_owned(), target: target.into(), ..Event::default() };
    with_pending(|pending| pending.event = Some(event));
}

/// Adds one detail to the request's record.
pub fn note_detail(key: &str, value: impl Into<Value>) {
    let value = value.into();
    with_event(|event| {
        event.detail.insert(key.to_owned(), value);
    });
}

/// A resource read (or vread): its version and the patients whose compartment it is in.
pub fn note_resource(resource: &StoredResource) {
    let patients = resource.body.as_deref().map(|body| patients_of(&resource.resource_type, &resource.id, body));
    with_event(|event| {
        event.target = format!("{}/{}/_history/{}", resource.resource_type, resource.id, resource.version);
        event.patients = patients.unwrap_or_default();
    });
}

/// Resources returned by a search or a history: the patients they concern.
pub fn note_found(resources: &[StoredResource]) {
    let mut patients: Vec<String> = resources
        .iter()
        .filter_map(|resource| Some(patients_of(&resource.resource_type, &resource.id, resource.body.as_deref()?)))
        .flatten()
        .collect();
    patients.sort_unstable();
    patients.dedup();
    let count = resources.len();
    with_event(|event| {
        event.patients = patients;
        event.detail.insert("returned".into(), json!(count));
    });
}

/// A search: its type and parameters (any parameter named like a credential keeps its name
/// only: a client that put one in a URL must not find it in the audit trail too).
pub fn note_search(resource_type: &str, pairs: &[(String, String)]) {
    note("search", resource_type);
    note_detail("parameters", parameters(pairs));
}

/// Query parameters as `[[name, value]]`, credential-like values replaced by `"***"`.
fn parameters(pairs: &[(String, String)]) -> Value {
    let secret = |name: &str| {
        let name = name.to_ascii_lowercase();
        ["secret", "token", "password", "authorization", "assertion", "key"].iter().any(|word| name.contains(word))
    };
    pairs
        .iter()
        .map(|(name, value)| json!([name, if secret(name) { "***" } else { value.as_str() }]))
        .collect::<Vec<_>>()
        .into()
}

/// The patients of a stored resource, read from its text (no `Value` is built: a search's
/// record names the patients of every resource it returns).
fn patients_of(resource_type: &str, id: &str, body: &str) -> Vec<String> {
    patient_compartments_in_text(resource_type, id, body)
}

/// An export kick-off: its level (`Group/{id}`, `Patient`, `system`) and the parameters. Only
/// a Group export names its cohort: Patient- and system-level exports are not linked to
/// individual patients (`--patient` does not find them; `--action export.kickoff` does).
pub fn note_export_kickoff(level: &bulkhead_export::ExportLevel, pairs: &[(String, String)]) {
    use bulkhead_export::ExportLevel;
    let (target, group) = match level {
        ExportLevel::Group(id) => (format!("Group/{id}"), Some(id.clone())),
        ExportLevel::Patient => ("Patient".to_owned(), None),
        ExportLevel::System => ("system".to_owned(), None),
    };
    note("export.kickoff", target);
    note_detail("parameters", parameters(pairs));
    with_event(|event| event.group = group);
}

/// A planned export: the Group's version, the transaction time (the cohort) and the counts.
pub fn note_export_plan(plan: &GroupExportPlan) {
    let mut counts = Map::new();
    for file in &plan.export.files {
        let key = format!("{:?}:{}", file.kind, file.resource_type).to_ascii_lowercase();
        let total = counts.get(&key).and_then(Value::as_u64).unwrap_or(0) + file.total;
        counts.insert(key, json!(total));
    }
    let (target, group) = export_target(&plan.export.level, plan.group_version);
    with_event(|event| {
        event.target = target;
        event.detail.insert("counts".into(), Value::Object(counts));
        event.detail.insert("files".into(), json!(plan.export.files.len()));
        event.cohort = group.map(|group_id| AuditCohort { group_id, transaction_time: plan.transaction_time });
    });
}

/// The target of an export of `level` (a Group's with its version) and its Group, if any.
fn export_target(level: &bulkhead_export::ExportLevel, group_version: i64) -> (String, Option<String>) {
    use bulkhead_export::ExportLevel;
    match level {
        ExportLevel::Group(id) => (format!("Group/{id}/_history/{group_version}"), Some(id.clone())),
        ExportLevel::Patient => ("Patient".to_owned(), None),
        ExportLevel::System => ("system".to_owned(), None),
    }
}

/// An asynchronous kick-off accepted: its job and transaction time (the plan follows later).
pub fn note_export_accepted(job_id: &str, transaction_time: Micros) {
    with_event(|event| {
        event.detail.insert("job".into(), json!(job_id));
        event.cohort = event.group.clone().map(|group_id| AuditCohort { group_id, transaction_time });
    });
}

/// A file download about to stream: recorded when the body ends, with bytes and completion.
/// The actor is the export's client and user (a self-authorising URL presents no credentials).
pub fn note_download(claims: &FileClaims) {
    let actor = Actor { tenant: TenantId(claims.tenant), client: claims.client.clone(), user: claims.user.clone() };
    with_pending(|pending| pending.actor = Some(actor));
    let (target, group) = export_target(&claims.level, claims.group_version);
    note("export.download", target);
    let cohort = group.map(|group_id| AuditCohort { group_id, transaction_time: claims.transaction_time });
    let detail = json!({"type": claims.resource_type, "kind": format!("{:?}", claims.kind).to_ascii_lowercase()});
    with_event(|event| {
        event.cohort = cohort;
        event.planned_resources = Some(claims.total);
        if let Value::Object(detail) = detail {
            event.detail = detail;
        }
    });
}

/// An NDJSON upload's result: counts per type (what was committed, also when it stopped).
pub fn note_upload(stored_by_type: &std::collections::BTreeMap<String, u64>, failed: u64) {
    note("upload", "$upload-ndjson");
    note_detail("stored", json!(stored_by_type));
    note_detail("failed", failed);
}

/// An access token issued to `client_id` of `tenant` (SMART Backend Services token endpoint).
pub fn note_token_issue(tenant: TenantId, client_id: &str, scope: &str) {
    with_pending(|pending| pending.actor = Some(Actor { tenant, client: client_id.to_owned(), user: None }));
    note("token.issue", client_id);
    note_detail("scope", scope);
}

/// What became of one Bundle entry before the write ([`WriteAudit::for_bundle`]).
#[derive(Debug, Clone, Copy)]
pub enum BundleEntry {
    /// The next write op: recorded with the write's result.
    Written,
    /// Refused before writing (a batch entry that failed its checks), with its status.
    Refused(StatusCode),
    /// Answered without a write (a conditional create that found its match): no record.
    Unwritten,
}

/// The Bundle whose entries are written.
#[derive(Debug, Clone)]
struct BundleEntries {
    /// `transaction` or `batch`.
    kind: &'static str,
    entries: Vec<BundleEntry>,
}

/// The audit context of the writes of the current request, carried onto the blocking thread
/// that writes: the store then appends the write's record in the write's own transaction.
#[derive(Debug, Clone)]
pub struct WriteAudit {
    pending: Option<Arc<Mutex<Pending>>>,
    bundle: Option<BundleEntries>,
}

impl WriteAudit {
    /// The current request's context (none outside a request: nothing is recorded).
    pub fn current() -> WriteAudit {
        WriteAudit { pending: PENDING.try_with(Arc::clone).ok(), bundle: None }
    }

    /// The context of a Bundle's entries, in entry order.
    pub fn for_bundle(mode: WriteMode, entries: impl IntoIterator<Item = BundleEntry>) -> WriteAudit {
        let kind = match mode {
            WriteMode::Transaction => "transaction",
            WriteMode::Batch => "batch",
        };
        let bundle = BundleEntries { kind, entries: entries.into_iter().collect() };
        WriteAudit { bundle: Some(bundle), ..WriteAudit::current() }
    }

    /// Writes `ops` with their audit records. Once it commits, the request's own record is
    /// marked stored; if it fails, the request's record (with the failure's status) is appended
    /// by the middleware.
    pub fn write(
        &self,
        store: &dyn Store,
        tenant: TenantId,
        owner: Option<&str>,
        ops: &[WriteOp],
        mode: WriteMode,
    ) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
        let Some(pending) = &self.pending else { return store.write(tenant, owner, ops, mode) };
        let template = match pending.lock() {
            Ok(pending) => pending.record("success", 200),
            Err(_) => None,
        };
        let Some(template) = template else { return store.write(tenant, owner, ops, mode) };
        // What does not depend on the results is worked out here, before the store takes its
        // write lock: the closure runs while every other write waits.
        let patients: Vec<Vec<String>> = ops.iter().map(patients_written).collect();
        let records = |results: &[Result<Written, StoreError>]| {
            entry_records(&template, self.bundle.as_ref(), ops, &patients, results)
        };
        let results = store.write_audited(tenant, owner, ops, mode, &records)?;
        if let Ok(mut pending) = pending.lock() {
            pending.stored = true;
        }
        Ok(results)
    }
}

/// The records of a write: one per written resource for a plain write (a single create,
/// update or delete); one for a whole Bundle, listing each entry's action, target, outcome and
/// status in `detail.entries` (one record per request, not per resource, keeps the trail's cost
/// flat however large the Bundle), with the patients of every entry.
fn entry_records(
    template: &AuditRecord,
    bundle: Option<&BundleEntries>,
    ops: &[WriteOp],
    patients_of_ops: &[Vec<String>],
    results: &[Result<Written, StoreError>],
) -> Vec<AuditRecord> {
    let Some(bundle) = bundle else {
        return ops
            .iter()
            .zip(patients_of_ops)
            .zip(results)
            .map(|((op, patients), result)| written_record(template, op, patients, result))
            .collect();
    };
    // Per entry only what the listing shows is worked out (this runs under the store's write
    // lock, once per entry of Bundles of thousands): no per-entry record, no JSON tree.
    let mut written = ops.iter().zip(patients_of_ops).zip(results);
    let mut listed = Vec::with_capacity(bundle.entries.len());
    let mut patients: Vec<&String> = Vec::new();
    let mut failed = 0;
    for (index, entry) in bundle.entries.iter().enumerate() {
        let outcome = match *entry {
            BundleEntry::Unwritten => continue,
            BundleEntry::Refused(status) => EntryOutcome {
                action: "refused",
                target: format!("Bundle.entry[{index}]"),
                outcome: outcome_of(status),
                status: status.as_u16(),
            },
            BundleEntry::Written => {
                let Some(((op, entry_patients), result)) = written.next() else { break };
                patients.extend(entry_patients);
                EntryOutcome::of(op, result)
            }
        };
        failed += usize::from(outcome.outcome != "success");
        listed.push(ListedEntry { entry: index, outcome });
    }
    patients.sort_unstable();
    patients.dedup();
    let detail = serde_json::to_string(&BundleDetail { entries: &listed, failed })
        .expect("a Bundle's audit detail is plain strings and numbers");
    vec![AuditRecord {
        action: bundle.kind.to_owned(),
        target: "Bundle".into(),
        outcome: if failed == 0 { "success" } else { "failure" }.into(),
        status: 200,
        detail,
        patients: patients.into_iter().cloned().collect(),
        ..template.clone()
    }]
}

/// What one written entry came to: its record's action, target, outcome and status.
#[derive(serde::Serialize)]
struct EntryOutcome {
    action: &'static str,
    target: String,
    outcome: &'static str,
    status: u16,
}

impl EntryOutcome {
    fn of(op: &WriteOp, result: &Result<Written, StoreError>) -> EntryOutcome {
        match result {
            Ok(written) => EntryOutcome {
                action: if written.created { "create" } else { op_action(op) },
                target: format!("{}/{}/_history/{}", written.resource_type, written.id, written.version),
                outcome: "success",
                status: match (written.created, written.deleted) {
                    (true, _) => 201,
                    (_, true) => 204,
                    _ => 200,
                },
            },
            Err(error) => {
                let status = store_error_status(error);
                EntryOutcome {
                    action: op_action(op),
                    target: format!("{}/{}", op.resource_type(), op.id()),
                    outcome: outcome_of(status),
                    status: status.as_u16(),
                }
            }
        }
    }
}

fn op_action(op: &WriteOp) -> &'static str {
    match op {
        WriteOp::Create { .. } => "create",
        WriteOp::Update { .. } => "update",
        WriteOp::Delete { .. } => "delete",
    }
}

/// One line of a Bundle record's `detail.entries`.
#[derive(serde::Serialize)]
struct ListedEntry {
    entry: usize,
    #[serde(flatten)]
    outcome: EntryOutcome,
}

/// A Bundle record's `detail`.
#[derive(serde::Serialize)]
struct BundleDetail<'a> {
    entries: &'a [ListedEntry],
    failed: usize,
}

/// The patients whose compartment a write op's resource is in, sorted.
fn patients_written(op: &WriteOp) -> Vec<String> {
    let mut patients = match op {
        WriteOp::Create { body, .. } | WriteOp::Update { body, .. } => {
            patient_compartments_of(op.resource_type(), op.id(), body)
        }
        WriteOp::Delete { .. } if op.resource_type() == "Patient" => vec![op.id().to_owned()],
        WriteOp::Delete { .. } => Vec::new(),
    };
    patients.sort_unstable();
    patients.dedup();
    patients
}

/// The record of one written entry (`patients`: [`patients_written`] of `op`).
fn written_record(
    template: &AuditRecord,
    op: &WriteOp,
    patients: &[String],
    result: &Result<Written, StoreError>,
) -> AuditRecord {
    let mut detail = Map::new();
    if let Ok(written) = result {
        detail.insert("changed".into(), json!(written.changed));
    }
    let EntryOutcome { action, target, outcome, status } = EntryOutcome::of(op, result);
    AuditRecord {
        action: action.to_owned(),
        target,
        outcome: outcome.to_owned(),
        status,
        detail: Value::Object(detail).to_string(),
        patients: patients.to_vec(),
        ..template.clone()
    }
}

/// The status a store error answers (as `ApiError::from` maps it), without consuming it.
fn store_error_status(error: &StoreError) -> StatusCode {
    match error {
        StoreError::NotFound(_) => StatusCode::NOT_FOUND,
        StoreError::Conflict(_) => StatusCode::CONFLICT,
        StoreError::VersionConflict(_) => StatusCode::PRECONDITION_FAILED,
        StoreError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        StoreError::Database(_) => StatusCode::INTERNAL_SERVER_ERROR,
        StoreError::StorageFull(_) => StatusCode::INSUFFICIENT_STORAGE,
        StoreError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// Appends a download's record once its body is done: bytes handed to the connection, and
/// `aborted` when it did not complete.
fn append_download(audit: &AuditWriter, mut record: AuditRecord, planned: u64, bytes: u64, complete: bool) {
    {
        let mut detail: Map<String, Value> = serde_json::from_str(&record.detail).unwrap_or_default();
        detail.insert("bytes".into(), json!(bytes));
        detail.insert("complete".into(), json!(complete));
        // Resources sent: the file's count when it completed; a cut-off stream does not say
        // how many whole lines reached the client (it may be compressed), so none is claimed.
        detail.insert("resources".into(), if complete { json!(planned) } else { Value::Null });
        record.detail = Value::Object(detail).to_string();
        if !complete {
            record.outcome = "aborted".into();
        }
        audit.submit_detached(record);
    }
}
