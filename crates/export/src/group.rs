//! Planning an export at any level (system, Patient, Group): the frozen view (transaction
//! time, the members and per-member `since`, or the whole tenant) and the list of files, each
//! described by the claims that reproduce it.

use bulkhead_fhir::type_filter::TypeFilters;
use bulkhead_fhir::{operation_outcome, Issue, Micros};
use bulkhead_store::{
    MemberSelection, Members, SelectionScope, Store, StoreError, StoredResource, TenantId, Visibility,
};

use crate::associated::{deleted_outside_set, plan_associated_files};
use crate::level::ExportLevel;
use crate::organize::{plan_blocks, BlockSpec, BlockWriter, ReferencedScope};
use crate::params::ExportParams;
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
    /// The request names something the export cannot cover (a `patient` that is not a member
    /// of the Group, or not a Patient of the tenant): a 400.
    #[error("{0}")]
    Invalid(String),
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
    /// Freezing the Group's membership (or the tenant's Patients) at the transaction time.
    Membership,
    /// Counting the selected resources of `types` types (exact counts, split into parts).
    Counting { types: usize },
    /// Listing deletions (`_since`): `done` of `types` types so far.
    Deletions { done: usize, types: usize },
    /// Checking that the members' Patients exist.
    Members,
    /// Finding the associated data: Provenance and referenced resources.
    Associated,
    /// Writing the planned files to the output store (materialised exports): `done` of `files`.
    Writing { done: usize, files: usize },
    /// Organising the output by patient (counting each block): `done` of `members`.
    Blocks { done: usize, members: usize },
}

impl std::fmt::Display for PlanStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlanStep::Membership => write!(f, "planning: membership snapshot"),
            PlanStep::Counting { types } => write!(f, "planning: counting resources of {types} types"),
            PlanStep::Deletions { done, types } => write!(f, "planning: deletions, {done} of {types} types"),
            PlanStep::Members => write!(f, "planning: checking members"),
            PlanStep::Associated => write!(f, "planning: provenance and referenced resources"),
            PlanStep::Writing { done, files } => write!(f, "writing output: {done} of {files} files"),
            PlanStep::Blocks { done, members } => write!(f, "planning: patient blocks, {done} of {members} patients"),
        }
    }
}

/// Told each [`PlanStep`] before it starts; an error stops the plan with that error.
pub type PlanProgress<'a> = dyn Fn(PlanStep) -> Result<(), ExportError> + 'a;

/// Who asks, for which level (system, Patient, or which Group), with which parameters.
#[derive(Debug, Clone)]
pub struct GroupExportRequest {
    pub tenant: TenantId,
    pub client_id: String,
    pub visibility: Visibility,
    pub level: ExportLevel,
    pub params: ExportParams,
    /// Lenient-mode warnings from parameter parsing, for the `error[]` file.
    pub warnings: Vec<Issue>,
    /// Most resources per file.
    pub part_size: u64,
    /// When the export's file URLs expire (µs): its stored associated data goes with them.
    pub files_expire: Micros,
}

/// A planned export: everything the manifest needs except URLs (the HTTP layer stores `export`
/// and mints a URL per file of it).
#[derive(Debug, Clone)]
pub struct GroupExportPlan {
    pub transaction_time: Micros,
    /// The exported Group's version (0 at the other levels).
    pub group_version: i64,
    pub export: PlannedExport,
    /// Members at `_since` that are no longer members (only with `_since`).
    pub removed_members: Vec<String>,
}

/// The frozen view of one export.
pub struct ExportView {
    /// The exported Group's version at the transaction time (Group level only), without its
    /// text ([`group_text`] reads it for the Group line).
    pub group: Option<StoredResource>,
    /// `members` are the members at the transaction time, sorted: the Group's (Group level) or
    /// the tenant's Patients (Patient level), narrowed by `patient`; none at the system level.
    pub selection: MemberSelection,
    /// Patient level with `_since`: the Patients live at `_since` and deleted since (narrowed
    /// by `patient`), sorted. They are the export's removed members, and their Patient
    /// resources are listed in `deleted[]`.
    pub removed: Vec<String>,
}

/// What an export's view is made of: the same at kick-off and at every file download.
#[derive(Debug, Clone, Copy)]
pub struct ViewSpec<'a> {
    pub level: &'a ExportLevel,
    /// `patient` (POST): the members the export is restricted to.
    pub patients: Option<&'a [String]>,
    /// `_typeFilter` queries, already checked at kick-off.
    pub type_filters: &'a [String],
    pub since: Option<Micros>,
    pub until: Option<Micros>,
    pub transaction_time: Micros,
}

/// Rebuilds the view of an export at its transaction time. Deterministic: the same inputs give
/// the same view whenever it is computed, so file downloads see what the plan saw.
pub fn export_view(
    store: &dyn Store,
    tenant: TenantId,
    visibility: &Visibility,
    spec: &ViewSpec<'_>,
) -> Result<ExportView, ExportError> {
    let (since, until, transaction_time) = (spec.since, spec.until, spec.transaction_time);
    let filters = TypeFilters::parse_all(spec.type_filters.iter().map(String::as_str))
        .map_err(|error| ExportError::Invalid(format!("_typeFilter: {error}")))?;
    let selection = |members, scope| MemberSelection {
        members,
        since,
        until,
        transaction_time,
        visibility: visibility.clone(),
        scope,
        filters: filters.clone(),
    };
    match spec.level {
        ExportLevel::System => {
            let selection = selection(Members::default(), SelectionScope::Tenant);
            Ok(ExportView { group: None, selection, removed: Vec::new() })
        }
        ExportLevel::Patient => {
            let mut members = store.patients_at(tenant, visibility, transaction_time)?;
            let mut removed: Vec<String> = match since {
                Some(since) => store
                    .patients_at(tenant, visibility, since)?
                    .into_iter()
                    .filter(|patient| members.binary_search(patient).is_err())
                    .collect(),
                None => Vec::new(),
            };
            if let Some(patients) = spec.patients {
                removed.retain(|patient| patients.binary_search(patient).is_ok());
                let unknown: Vec<&String> = patients.iter().filter(|p| members.binary_search(*p).is_err()).collect();
                if let Some(first) = unknown.first() {
                    return Err(ExportError::Invalid(format!(
                        "patient: Patient/{first} is not a Patient of this tenant"
                    )));
                }
                members = patients.to_vec();
            }
            let selection_members = members.into_iter().map(|member| (member, since)).collect();
            let selection = selection(selection_members, SelectionScope::Members);
            Ok(ExportView { group: None, selection, removed })
        }
        ExportLevel::Group(group_id) => {
            // The version's member list is shared with every kick-off of it (not copied).
            let group = store
                .group_at(tenant, group_id, transaction_time)?
                .filter(|group| !group.version.deleted)
                .filter(|group| visibility.user().is_none() || group.version.owner.as_deref() == visibility.user())
                .ok_or_else(|| ExportError::NotFound(format!("Group/{group_id} not found")))?;
            let mut members = group.members.at(transaction_time);
            if let Some(patients) = spec.patients {
                // Bulk Data IG §patient: a patient who is not a member SHOULD fail the request.
                if let Some(outsider) = patients.iter().find(|p| !members.contains(p)) {
                    return Err(ExportError::Invalid(format!(
                        "patient: Patient/{outsider} is not a member of Group/{group_id}"
                    )));
                }
                members = patients.iter().map(|patient| (patient.clone(), None)).collect();
            }
            if let Some(since) = since {
                // A member who was already in the Group at `_since` gets only changes; one added
                // since gets its full history (Bulk Data IG: group export and `_since`).
                let earlier = store.members_at(tenant, group_id, since)?;
                members = members
                    .ids()
                    .map(|member| {
                        let member_since =
                            earlier.binary_search_by(|held| held.as_str().cmp(member)).ok().and(Some(since));
                        (member.to_owned(), member_since)
                    })
                    .collect();
            }
            Ok(ExportView {
                group: Some(group.version),
                selection: selection(members, SelectionScope::Members),
                removed: Vec::new(),
            })
        }
    }
}

/// The text of a Group export's Group (its version at the transaction time), for its Group line;
/// None at the other levels. The view keeps only the version: a large Group's text is read when
/// its line is written, not at every kick-off.
pub fn group_text(store: &dyn Store, tenant: TenantId, view: &ExportView) -> Result<Option<String>, ExportError> {
    let Some(group) = &view.group else { return Ok(None) };
    let version = store.version_at(tenant, "Group", &group.id, view.selection.transaction_time)?;
    match version {
        Some(version) if version.version == group.version => Ok(version.body),
        _ => Err(ExportError::NotFound(format!("Group/{} version {} is no longer kept", group.id, group.version))),
    }
}

/// `deleted[]` of one type as ids, sorted: the store's deletions for the view
/// ([`Store::deleted_in_compartments`]) and, at the Patient level, the Patients deleted since
/// `_since` (no member's compartment holds them any more).
pub fn deleted_ids(
    store: &dyn Store,
    tenant: TenantId,
    view: &ExportView,
    resource_type: &str,
    associated_set: Option<&str>,
) -> Result<Vec<String>, ExportError> {
    // A resource the export's associated set sends is not also deleted (a Provenance re-pointed
    // from a member Patient to another resource of the cohort).
    let mut ids: Vec<String> = deleted_outside_set(store, tenant, &view.selection, resource_type, associated_set)?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    if resource_type == "Patient" && !view.removed.is_empty() {
        ids.extend(view.removed.iter().cloned());
        ids.sort_unstable();
        ids.dedup();
    }
    Ok(ids)
}

/// Members of a Group export's view whose Patient did not exist (for this caller) at the
/// transaction time (none at the other levels: their members are existing Patients).
pub fn missing_members(store: &dyn Store, tenant: TenantId, view: &ExportView) -> Result<Vec<String>, ExportError> {
    if view.group.is_none() {
        return Ok(Vec::new());
    }
    Ok(store.missing_members(tenant, &view.selection)?)
}

/// The target Group itself is exported as a Group line when its version at the transaction
/// time passes the time filters.
fn group_line_selected(view: &ExportView) -> bool {
    let Some(group) = &view.group else { return false };
    let updated = group.last_updated;
    view.selection.since.is_none_or(|since| updated > since) && view.selection.until.is_none_or(|until| updated < until)
}

/// Plans an export: checks the request, reserves the transaction time, freezes the view, and
/// lists the files.
pub fn plan_group_export(store: &dyn Store, request: &GroupExportRequest) -> Result<GroupExportPlan, ExportError> {
    check_group(store, request)?;
    let transaction_time = store.reserve_transaction_time()?;
    plan_group_export_at(store, request, transaction_time, &|_| Ok(()))
}

/// The kick-off's check of the request as the caller sees it now. Group level: an unknown (or
/// another user's) Group is [`ExportError::NotFound`], a deleted one [`ExportError::Gone`], and
/// a `patient` that is not a member [`ExportError::Invalid`]. Patient level: a `patient` that is
/// not a Patient of the tenant is [`ExportError::Invalid`].
pub fn check_group(store: &dyn Store, request: &GroupExportRequest) -> Result<(), ExportError> {
    crate::retention::check_since_retained(store, request.params.since)?;
    let patients = request.params.patients.as_deref().unwrap_or_default();
    match &request.level {
        ExportLevel::System => Ok(()),
        ExportLevel::Patient => {
            let existing = store.existing_at(request.tenant, &request.visibility, "Patient", patients, Micros::MAX)?;
            match patients.iter().find(|p| existing.binary_search(*p).is_err()) {
                Some(unknown) => {
                    Err(ExportError::Invalid(format!("patient: Patient/{unknown} is not a Patient of this tenant")))
                }
                None => Ok(()),
            }
        }
        ExportLevel::Group(group_id) => {
            // The current version (its text is not read; its members are parsed once per version).
            let group = store.group_at(request.tenant, group_id, Micros::MAX)?.filter(|group| {
                request.visibility.user().is_none() || group.version.owner.as_deref() == request.visibility.user()
            });
            let group = match group {
                None => return Err(ExportError::NotFound(format!("Group/{group_id} not found"))),
                Some(group) if group.version.deleted => {
                    return Err(ExportError::Gone(format!("Group/{group_id} was deleted")))
                }
                Some(group) => group,
            };
            if patients.is_empty() {
                return Ok(());
            }
            let members = group.members.at(bulkhead_fhir::now_micros());
            match patients.iter().find(|p| !members.contains(p)) {
                Some(outsider) => Err(ExportError::Invalid(format!(
                    "patient: Patient/{outsider} is not a member of Group/{group_id}"
                ))),
                None => Ok(()),
            }
        }
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
    let spec = ViewSpec {
        level: &request.level,
        patients: params.patients.as_deref(),
        type_filters: &params.type_filters,
        since: params.since,
        until: params.until,
        transaction_time,
    };
    let view = export_view(store, request.tenant, &request.visibility, &spec)?;
    let types: Vec<String> = match &params.types {
        Some(types) => types.clone(),
        None => request.level.exportable_types().into_iter().map(str::to_owned).collect(),
    };
    // At the Group level only the target Group is exported as a Group (its own line, below);
    // at the system level Groups are a type like any other. At the Patient and Group levels,
    // types outside the compartment come only as associated data, and so does Provenance,
    // through its targets (README "Associated data"), though its deletions are still found
    // through the compartment index.
    let is_group_level = request.level.group().is_some();
    let with_associated = !matches!(request.level, ExportLevel::System);
    let compartment_types: Vec<String> = types
        .iter()
        .filter(|t| !is_group_level || *t != "Group")
        .filter(|t| !with_associated || !bulkhead_fhir::references::is_referenced_type(t))
        .cloned()
        .collect();
    let joined_types: Vec<String> =
        compartment_types.iter().filter(|t| !with_associated || *t != "Provenance").cloned().collect();
    let file = |kind, resource_type: &str, total| PlannedFile {
        kind,
        resource_type: resource_type.to_owned(),
        start: 0,
        end: 0,
        total,
        associated: false,
        members: None,
    };
    let mut files = Vec::new();
    progress(PlanStep::Counting { types: compartment_types.len() })?;
    let plan = store.plan_parts(request.tenant, &view.selection, &joined_types, request.part_size)?;
    for resource_type in &types {
        if is_group_level && resource_type == "Group" {
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
    let mut associated_set = None;
    if with_associated {
        progress(PlanStep::Associated)?;
        let (set, associated_files) = plan_associated_files(
            store,
            request.tenant,
            &view.selection,
            &params.associated,
            params.types.as_deref(),
            &compartment_types,
            request.part_size,
            request.files_expire,
        )?;
        associated_set = set;
        files.extend(associated_files);
    }
    let mut organized = None;
    if params.organize_by_patient {
        // The same data, in patient blocks instead of by type (see `crate::organize`).
        let spec = block_spec(&joined_types, &types, is_group_level, &view, params);
        let writer = BlockWriter {
            store,
            tenant: request.tenant,
            view: &view,
            spec: &spec,
            set_id: associated_set.as_deref(),
            elements: params.elements.as_deref(),
        };
        files = plan_blocks(&writer, request.part_size, progress)?;
        organized = Some(spec);
    }
    if params.since.is_some() {
        for (done, resource_type) in compartment_types.iter().enumerate() {
            progress(PlanStep::Deletions { done, types: compartment_types.len() })?;
            let deleted = deleted_ids(store, request.tenant, &view, resource_type, associated_set.as_deref())?;
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
    let group_version = view.group.as_ref().map_or(0, |group| group.version);
    let export = PlannedExport {
        client: request.client_id.clone(),
        user: request.visibility.user().map(str::to_owned),
        level: request.level.clone(),
        group_version,
        since: params.since,
        until: params.until,
        transaction_time,
        requested_types: params.types.clone(),
        warnings,
        type_filters: params.type_filters.clone(),
        elements: params.elements.clone(),
        patients: params.patients.clone(),
        files,
        associated_set,
        organized,
    };
    let removed_members = match (params.since, request.level.group()) {
        (Some(since), Some(group_id)) => {
            let before = store.members_at(request.tenant, group_id, since)?;
            before
                .into_iter()
                .filter(|member| !view.selection.members.contains(member))
                // Restricted by `patient`: only the named patients' removal is news.
                .filter(|member| params.patients.as_ref().is_none_or(|named| named.binary_search(member).is_ok()))
                .collect()
        }
        // Patient level: the Patients deleted since `_since`.
        _ => view.removed.clone(),
    };
    crate::retention::check_since_retained(store, params.since)?;
    Ok(GroupExportPlan { transaction_time, group_version, export, removed_members })
}

/// What each patient block of an organised export holds: the compartment types the export by
/// type reads (`Patient` first), the Group line when it would be exported, and the associated
/// data the export's set holds.
fn block_spec(
    joined_types: &[String],
    types: &[String],
    is_group_level: bool,
    view: &ExportView,
    params: &ExportParams,
) -> BlockSpec {
    let mut block_types: Vec<String> = joined_types.iter().filter(|t| *t == "Patient").cloned().collect();
    block_types.extend(joined_types.iter().filter(|t| *t != "Patient").cloned());
    let wants =
        |resource_type: &str| params.types.as_ref().is_none_or(|named| named.iter().any(|t| t == resource_type));
    let referenced = match (&params.associated.referenced, &params.types) {
        (false, _) => None,
        (true, None) => Some(ReferencedScope::All),
        (true, Some(named)) => {
            let named: Vec<String> =
                named.iter().filter(|t| bulkhead_fhir::references::is_referenced_type(t)).cloned().collect();
            (!named.is_empty()).then_some(ReferencedScope::Only(named))
        }
    };
    BlockSpec {
        types: block_types,
        group_line: is_group_level && types.iter().any(|t| t == "Group") && group_line_selected(view),
        provenance: wants("Provenance") && params.associated.provenance != bulkhead_store::ProvenanceSelection::None,
        referenced,
    }
}
