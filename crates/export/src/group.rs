//! Planning a Group export: the frozen view (transaction time, membership snapshot, per-member
//! `since`) and the list of files, each described by the claims that reproduce it.

use bulkhead_fhir::{operation_outcome, Issue, Micros};
use bulkhead_store::{group_members, MemberSelection, Store, StoreError, StoredResource, TenantId, Visibility};

use crate::params::{group_export_types, ExportParams};
use crate::record::{PlannedExport, PlannedFile};
use crate::token::FileKind;

/// Why an export could not be planned or a file could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The Group does not exist for this caller (or did not exist at the transaction time).
    #[error("{0}")]
    NotFound(String),
    /// The Group was deleted.
    #[error("{0}")]
    Gone(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The download's destination failed (usually: the client went away).
    #[error("writing the file failed: {0}")]
    Sink(String),
    /// The plan's progress callback stopped it (its job was cancelled).
    #[error("planning was cancelled")]
    Cancelled,
    /// `_since` is before the prune horizon: the history it needs is gone (a 400).
    #[error("{0}")]
    HistoryPruned(String),
}

/// A step of planning, reported before it starts (an asynchronous job's `X-Progress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanStep {
    /// Freezing the Group's membership at the transaction time.
    Membership,
    /// Counting the selected resources of `types` types (exact counts, split into parts).
    Counting { types: usize },
    /// Listing deletions (`_since`): `done` of `types` types so far.
    Deletions { done: usize, types: usize },
    /// Checking that the members' Patients exist.
    Members,
}

impl std::fmt::Display for PlanStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlanStep::Membership => write!(f, "planning: membership snapshot"),
            PlanStep::Counting { types } => write!(f, "planning: counting resources of {types} types"),
            PlanStep::Deletions { done, types } => write!(f, "planning: deletions, {done} of {types} types"),
            PlanStep::Members => write!(f, "planning: checking members"),
        }
    }
}

/// Told each [`PlanStep`] before it starts; an error stops the plan with that error.
pub type PlanProgress<'a> = dyn Fn(PlanStep) -> Result<(), ExportError> + 'a;

/// Who asks, for which Group, with which parameters.
#[derive(Debug, Clone)]
pub struct GroupExportRequest {
    pub tenant: TenantId,
    pub client_id: String,
    pub visibility: Visibility,
    pub group_id: String,
    pub params: ExportParams,
    /// Lenient-mode warnings from parameter parsing, for the `error[]` file.
    pub warnings: Vec<Issue>,
    /// Most resources per file.
    pub part_size: u64,
}

/// A planned export: everything the manifest needs except URLs (the HTTP layer stores `export`
/// and mints a URL per file of it).
#[derive(Debug, Clone)]
pub struct GroupExportPlan {
    pub transaction_time: Micros,
    pub group_version: i64,
    pub export: PlannedExport,
    /// Members at `_since` that are no longer members (only with `_since`).
    pub removed_members: Vec<String>,
}

/// The frozen view of one Group export.
pub struct ExportView {
    pub group: StoredResource,
    pub selection: MemberSelection,
    /// Current members (at the transaction time), sorted.
    pub members: Vec<String>,
}

/// Rebuilds the view of a Group export at `transaction_time`. Deterministic: the same inputs
/// give the same view whenever it is computed, so file downloads see what the plan saw.
pub fn export_view(
    store: &dyn Store,
    tenant: TenantId,
    visibility: &Visibility,
    group_id: &str,
    since: Option<Micros>,
    until: Option<Micros>,
    transaction_time: Micros,
) -> Result<ExportView, ExportError> {
    let group = store
        .version_at(tenant, "Group", group_id, transaction_time)?
        .filter(|group| visibility.user().is_none() || group.owner.as_deref() == visibility.user())
        .ok_or_else(|| ExportError::NotFound(format!("Group/{group_id} not found")))?;
    let members = group_members(group.body.as_deref().unwrap_or("{}"), transaction_time).map_err(StoreError::from)?;
    let members_at_since = match since {
        Some(since) => Some(store.members_at(tenant, group_id, since)?),
        None => None,
    };
    let selection_members = members
        .iter()
        .map(|member| {
            // A member who was already in the Group at `_since` gets only changes; one added
            // since gets its full history (Bulk Data IG: group export and `_since`).
            let member_since = match &members_at_since {
                Some(earlier) if earlier.binary_search(member).is_ok() => since,
                _ => None,
            };
            (member.clone(), member_since)
        })
        .collect();
    let selection =
        MemberSelection { members: selection_members, since, until, transaction_time, visibility: visibility.clone() };
    Ok(ExportView { group, selection, members })
}

/// Members of the view whose Patient did not exist (for this caller) at the transaction time.
pub fn missing_members(store: &dyn Store, tenant: TenantId, view: &ExportView) -> Result<Vec<String>, ExportError> {
    let selection = &view.selection;
    let existing =
        store.existing_at(tenant, &selection.visibility, "Patient", &view.members, selection.transaction_time)?;
    // Both lists are sorted.
    Ok(view.members.iter().filter(|member| existing.binary_search(member).is_err()).cloned().collect())
}

/// The target Group itself is exported as a Group line when its version at the transaction
/// time passes the time filters.
fn group_line_selected(view: &ExportView) -> bool {
    let updated = view.group.last_updated;
    view.selection.since.is_none_or(|since| updated > since) && view.selection.until.is_none_or(|until| updated < until)
}

/// Plans a Group export: checks the Group, reserves the transaction time, freezes the view, and
/// lists the files.
pub fn plan_group_export(store: &dyn Store, request: &GroupExportRequest) -> Result<GroupExportPlan, ExportError> {
    check_group(store, request)?;
    let transaction_time = store.reserve_transaction_time()?;
    plan_group_export_at(store, request, transaction_time, &|_| Ok(()))
}

/// The kick-off's check of the Group as the caller sees it now: unknown (or another user's) is
/// [`ExportError::NotFound`], deleted is [`ExportError::Gone`].
pub fn check_group(store: &dyn Store, request: &GroupExportRequest) -> Result<(), ExportError> {
    crate::retention::check_since_retained(store, request.params.since)?;
    match store.read(request.tenant, &request.visibility, "Group", &request.group_id)? {
        None => Err(ExportError::NotFound(format!("Group/{} not found", request.group_id))),
        Some(group) if group.deleted => Err(ExportError::Gone(format!("Group/{} was deleted", request.group_id))),
        Some(_) => Ok(()),
    }
}

/// Plans a Group export at a transaction time already reserved (after [`check_group`]), telling
/// `progress` each step. Deterministic: the same request and time give the same plan whenever
/// it runs (history is kept), so planning may happen after the kick-off has answered.
pub fn plan_group_export_at(
    store: &dyn Store,
    request: &GroupExportRequest,
    transaction_time: Micros,
    progress: &PlanProgress<'_>,
) -> Result<GroupExportPlan, ExportError> {
    let params = &request.params;
    progress(PlanStep::Membership)?;
    let view = export_view(
        store,
        request.tenant,
        &request.visibility,
        &request.group_id,
        params.since,
        params.until,
        transaction_time,
    )?;
    let types: Vec<String> = match &params.types {
        Some(types) => types.clone(),
        None => group_export_types().into_iter().map(str::to_owned).collect(),
    };
    let compartment_types: Vec<String> = types.iter().filter(|t| *t != "Group").cloned().collect();
    let file = |kind, resource_type: &str, total| PlannedFile {
        kind,
        resource_type: resource_type.to_owned(),
        start: 0,
        end: 0,
        total,
    };
    let mut files = Vec::new();
    progress(PlanStep::Counting { types: compartment_types.len() })?;
    let plan = store.plan_parts(request.tenant, &view.selection, &compartment_types, request.part_size)?;
    for resource_type in &types {
        if resource_type == "Group" {
            if group_line_selected(&view) {
                files.push(file(FileKind::Output, "Group", 1));
            }
            continue;
        }
        let Some((_, parts)) = plan.iter().find(|(planned_type, _)| planned_type == resource_type) else { continue };
        for part in parts {
            files.push(PlannedFile {
                start: part.first_key,
                end: part.last_key,
                ..file(FileKind::Output, resource_type, part.count)
            });
        }
    }
    if params.since.is_some() {
        for (done, resource_type) in compartment_types.iter().enumerate() {
            progress(PlanStep::Deletions { done, types: compartment_types.len() })?;
            let deleted = store.deleted_in_compartments(request.tenant, &view.selection, resource_type)?;
            if !deleted.is_empty() {
                files.push(file(FileKind::Deleted, resource_type, deleted.len() as u64));
            }
        }
    }
    progress(PlanStep::Members)?;
    let missing = missing_members(store, request.tenant, &view)?;
    // Each warning travels as its whole OperationOutcome line, so the file keeps its issue code
    // and the parameter it names.
    let warnings: Vec<String> =
        request.warnings.iter().map(|issue| operation_outcome(std::slice::from_ref(issue)).to_string()).collect();
    if !missing.is_empty() || !warnings.is_empty() {
        files.push(file(FileKind::Error, "OperationOutcome", (missing.len() + warnings.len()) as u64));
    }
    let export = PlannedExport {
        client: request.client_id.clone(),
        user: request.visibility.user().map(str::to_owned),
        group: request.group_id.clone(),
        group_version: view.group.version,
        since: params.since,
        until: params.until,
        transaction_time,
        requested_types: params.types.clone(),
        warnings,
        files,
    };
    let removed_members = match params.since {
        Some(since) => {
            let before = store.members_at(request.tenant, &request.group_id, since)?;
            before.into_iter().filter(|member| view.members.binary_search(member).is_err()).collect()
        }
        None => Vec::new(),
    };
    crate::retention::check_since_retained(store, params.since)?;
    Ok(GroupExportPlan { transaction_time, group_version: view.group.version, export, removed_members })
}
