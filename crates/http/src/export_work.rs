//! The work of an asynchronous export job, as its kick-off stores it with the job
//! ([`ExportWork`]) and as any instance runs it once it has claimed the job ([`run`]).
//!
//! The work holds the kick-off's own parameters (not their parsed form), so a worker parses
//! them again exactly as the kick-off did, plus what the kick-off decided: the types the
//! caller's scopes allow, the reserved transaction time, the export record's id and the URLs'
//! lifetime. Running it is deterministic at that transaction time, so an instance that takes a
//! job over from a dead one gets the same plan and the same bytes. What is done already is not
//! redone: the plan is checkpointed once stored, and every materialised file is recorded as a
//! part under the lease.

use std::collections::HashMap;

use bulkhead_export::params::{parse_export_params, ParseContext};
use bulkhead_export::record::PlannedExport;
use bulkhead_export::{
    plan_group_export_at, ExportError, ExportLevel, GroupExportPlan, GroupExportRequest, PlanProgress,
};
use bulkhead_fhir::Micros;
use bulkhead_store::{JobLease, JobPart, Store, StoreError, TenantId, Visibility};
use serde::{Deserialize, Serialize};

use crate::bulk::FileUrls;
use crate::error::ApiError;
use crate::object_output::WrittenObject;
use crate::state::AppState;

const MICROS_PER_SECOND: i64 = 1_000_000;

/// What a worker needs to run an asynchronous export, stored with its job at kick-off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ExportWork {
    pub level: ExportLevel,
    /// The kick-off's parameters as `(name, value)` text pairs (query string or `Parameters`).
    pub pairs: Vec<(String, String)>,
    /// `Prefer: handling=lenient`.
    pub lenient: bool,
    /// A POST kick-off.
    pub post: bool,
    /// The types the caller's scopes allow (replaces the parsed `_type`).
    pub types: Option<Vec<String>>,
    pub client_id: String,
    pub user: Option<String>,
    pub part_size: u64,
    /// The export record's id (the job's id): a hyphenated UUID.
    pub record: String,
    /// When the file URLs were issued and expire (Unix seconds).
    pub issued: i64,
    pub expires: i64,
    pub requires_credentials: bool,
    /// The base URL and the manifest's `request`, as the kick-off saw them.
    pub base: String,
    pub request_url: String,
    /// Whether the files are written to the output store before the job completes.
    pub materialise: bool,
    /// Reserved at kick-off.
    pub transaction_time: Micros,
}

impl ExportWork {
    pub fn to_json(&self) -> String {
        // Plain data with string keys always serializes.
        serde_json::to_string(self).expect("export work serializes")
    }

    pub fn from_json(text: &str) -> Result<ExportWork, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The export request, parsed again from the kick-off's parameters (which passed this very
    /// parser at kick-off, so an error here means the work was stored by another version).
    fn request(&self, tenant: TenantId) -> Result<GroupExportRequest, ApiError> {
        let context = ParseContext { level: &self.level, lenient: self.lenient, post: self.post };
        let (mut params, warnings) = parse_export_params(&self.pairs, context).map_err(|error| {
            tracing::error!(error = %error, "stored export parameters no longer parse");
            ApiError::internal()
        })?;
        params.types = self.types.clone();
        Ok(GroupExportRequest {
            tenant,
            client_id: self.client_id.clone(),
            visibility: self.user.clone().map_or(Visibility::Tenant, Visibility::User),
            level: self.level.clone(),
            params,
            warnings,
            part_size: self.part_size,
            files_expire: self.expires.saturating_mul(MICROS_PER_SECOND),
        })
    }

    fn urls(&self, tenant: TenantId) -> Result<FileUrls, ApiError> {
        let record = uuid::Uuid::parse_str(&self.record).map_err(|_| ApiError::internal())?;
        Ok(FileUrls {
            tenant,
            record: *record.as_bytes(),
            issued: self.issued,
            expires: self.expires,
            requires_credentials: self.requires_credentials,
        })
    }
}

/// What a holder saves once the plan is stored: a later holder starts from it instead of
/// planning again.
#[derive(Debug, Serialize, Deserialize)]
struct Checkpoint {
    export: PlannedExport,
    removed_members: Vec<String>,
}

/// Why a job's work stopped without a manifest.
#[derive(Debug)]
pub(crate) enum WorkStop {
    /// The lease was lost (taken over, or the job cancelled): nothing more may be written.
    LeaseLost,
    /// The export failed: the job fails with this error.
    Failed(ApiError),
}

impl From<ApiError> for WorkStop {
    fn from(error: ApiError) -> WorkStop {
        WorkStop::Failed(error)
    }
}

impl From<StoreError> for WorkStop {
    fn from(error: StoreError) -> WorkStop {
        WorkStop::Failed(error.into())
    }
}

impl From<ExportError> for WorkStop {
    fn from(error: ExportError) -> WorkStop {
        match error {
            // The progress callback stops a holder whose lease is gone (or whose job was
            // cancelled here) this way.
            ExportError::Cancelled => WorkStop::LeaseLost,
            error => WorkStop::Failed(error.into()),
        }
    }
}

/// A fenced write's answer: false means the lease is gone.
fn held(written: bool) -> Result<(), WorkStop> {
    if written {
        Ok(())
    } else {
        Err(WorkStop::LeaseLost)
    }
}

/// Runs a claimed job's work to its manifest (JSON text): plans it at its transaction time (or
/// takes the plan from an earlier holder's checkpoint), stores its export record, materialises
/// its files when it has an output store (skipping `parts` recorded by earlier holders), and
/// builds the manifest. Runs on a blocking thread.
pub(crate) fn run(
    state: &AppState,
    work: &ExportWork,
    lease: &JobLease,
    checkpoint: Option<&str>,
    parts: &[JobPart],
    progress: &PlanProgress<'_>,
) -> Result<String, WorkStop> {
    let store = state.store.as_ref();
    let tenant = lease.tenant;
    let request = work.request(tenant)?;
    let urls = work.urls(tenant)?;
    let with_since = request.params.since.is_some();
    let resumed = checkpoint.and_then(|text| match serde_json::from_str::<Checkpoint>(text) {
        Ok(checkpoint) => Some(checkpoint),
        Err(error) => {
            tracing::warn!(job = %lease.job_id, error = %error, "unreadable job checkpoint; planning again");
            None
        }
    });
    let plan = match resumed {
        Some(Checkpoint { export, removed_members }) => {
            tracing::info!(job = %lease.job_id, fence = lease.fence, "export job resumed from its checkpoint");
            GroupExportPlan {
                transaction_time: work.transaction_time,
                group_version: export.group_version,
                export,
                removed_members,
            }
        }
        None => plan_and_checkpoint(store, &request, work, &urls, lease, progress)?,
    };
    let objects = match work.materialise {
        false => None,
        true => {
            let Some(output) = state.output.as_deref() else {
                tracing::error!(job = %lease.job_id, "this instance has no output store, but the job's kick-off had one");
                return Err(WorkStop::Failed(ApiError::internal()));
            };
            let done: HashMap<u32, WrittenObject> = parts
                .iter()
                .map(|part| {
                    let object = WrittenObject { bytes: part.bytes, sha256: part.sha256.clone(), lines: part.lines };
                    (part.index, object)
                })
                .collect();
            if !done.is_empty() {
                tracing::info!(job = %lease.job_id, done = done.len(), files = plan.export.files.len(), "resuming export output: recorded files are kept");
            }
            let claims_of = |index: usize| plan.export.claims(&urls.file(index), urls.issued);
            let record = |index: usize, object: &WrittenObject| -> Result<(), WorkStop> {
                let part = JobPart {
                    index: u32::try_from(index).unwrap_or(u32::MAX),
                    bytes: object.bytes,
                    sha256: object.sha256.clone(),
                    lines: object.lines,
                };
                held(store.record_export_job_part(lease, &part)?)
            };
            let job_id = lease.job_id.as_str();
            let steps = crate::materialise::Steps { claims_of: &claims_of, done: &done, record: &record, progress };
            let written = crate::materialise::materialise(store, output, tenant, job_id, &plan.export, &steps)?;
            let items = crate::bulk::object_items(state, &urls, &work.base, output, job_id, &plan.export, written)?;
            Some(items)
        }
    };
    let manifest = crate::bulk::manifest(state, &urls, &work.base, &work.request_url, plan, with_since, objects);
    Ok(manifest.body.to_string())
}

/// Plans the export, stores its record and checkpoints the plan under the lease. A record an
/// earlier holder stored (it died before its checkpoint) wins over the new plan's files, so every
/// holder's files agree with the URLs already minted from it.
fn plan_and_checkpoint(
    store: &dyn Store,
    request: &GroupExportRequest,
    work: &ExportWork,
    urls: &FileUrls,
    lease: &JobLease,
    progress: &PlanProgress<'_>,
) -> Result<GroupExportPlan, WorkStop> {
    let mut plan = plan_group_export_at(store, request, work.transaction_time, progress)?;
    match urls.store_record(store, &plan.export) {
        Ok(()) => {}
        Err(StoreError::Conflict(_)) => {
            let stored = store.export_record(lease.tenant, &bulkhead_export::token::record_id(&urls.record))?;
            let stored = stored.ok_or_else(|| WorkStop::Failed(ApiError::internal()))?;
            plan.export = PlannedExport::from_json(&stored.plan).map_err(|error| {
                tracing::error!(job = %lease.job_id, error = %error, "unreadable export record");
                WorkStop::Failed(ApiError::internal())
            })?;
        }
        Err(error) => return Err(error.into()),
    }
    // Only the newest holder reaches this point without being fenced: progress was checked.
    let checkpoint = Checkpoint { export: plan.export.clone(), removed_members: plan.removed_members.clone() };
    let text = serde_json::to_string(&checkpoint).map_err(|_| WorkStop::Failed(ApiError::internal()))?;
    held(store.save_export_job_checkpoint(lease, &text)?)?;
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_round_trips_through_its_stored_text() {
        let work = ExportWork {
            level: ExportLevel::Group("g1".into()),
            pairs: vec![("_type".into(), "Patient,Observation".into()), ("_since".into(), "2024-01-01".into())],
            lenient: true,
            post: false,
            types: Some(vec!["Patient".into()]),
            client_id: "c".into(),
            user: Some("alice".into()),
            part_size: 7,
            record: uuid::Uuid::new_v4().to_string(),
            issued: 10,
            expires: 20,
            requires_credentials: true,
            base: "http://b".into(),
            request_url: "http://b/r4/Group/g1/$export".into(),
            materialise: true,
            transaction_time: 123,
        };
        assert_eq!(ExportWork::from_json(&work.to_json()).unwrap(), work);
        let request = work.request(TenantId(3)).unwrap();
        assert_eq!(request.params.types, Some(vec!["Patient".to_owned()]), "the scopes' types win");
        assert!(request.params.since.is_some());
        assert_eq!((request.visibility, request.files_expire), (Visibility::User("alice".into()), 20_000_000));
    }
}
