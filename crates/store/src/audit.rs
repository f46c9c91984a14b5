//! The audit trail's records: who did what to which data, when, from where, and how it ended.
//! Append-only: a store offers appending, reading and pruning by age, never changing a record.

use bulkhead_fhir::Micros;

use crate::TenantId;

/// One audit record: one request (or one file download), never one per resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Assigned by the store when the record is appended (ascending); ignored on append.
    pub seq: i64,
    pub time: Micros,
    pub tenant: TenantId,
    /// The acting client id; `admin` for the admin API, `cli` for the command line.
    pub client: String,
    /// `x-oneup-user-id` (`None`: the whole tenant).
    pub user: Option<String>,
    /// The peer's socket address, when there is one.
    pub peer: Option<String>,
    pub request_id: String,
    /// `read`, `vread`, `history`, `search`, `create`, `update`, `delete`, `upload`,
    /// `export.kickoff`, `export.status`, `export.cancel`, `export.download`, `token.issue`,
    /// `client.create`, `client.revoke`, `tenant.create`, `audit.read`.
    pub action: String,
    /// What was acted on: `Patient/123`, `Patient/123/_history/2`, `Observation` (a search),
    /// `Group/g1/_history/3` (an export), a client id.
    pub target: String,
    /// `success`, `failure` (refused: 4xx), `error` (ours: 5xx), or `aborted` (a download that
    /// did not complete).
    pub outcome: String,
    /// The HTTP status answered (0 when none applies, e.g. a command-line action).
    pub status: u16,
    /// Action-specific details as a JSON object text (search parameters, counts per type, bytes
    /// sent); never a credential.
    pub detail: String,
    /// Patients whose compartment the accessed resources are in (`--patient` finds the record
    /// through them).
    pub patients: Vec<String>,
    /// For exports and their downloads: the Group and the transaction time, so the record is
    /// found for every patient that was a member of that Group at that time.
    pub cohort: Option<AuditCohort>,
}

/// The cohort an export record covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditCohort {
    pub group_id: String,
    pub transaction_time: Micros,
}

/// Which records [`crate::Store::audit_records`] returns: those of one tenant, matching every
/// given filter, in append order after `after_seq`, at most `limit`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Records with `time >= since`.
    pub since: Option<Micros>,
    pub client: Option<String>,
    /// Records touching this patient id: through [`AuditRecord::patients`], or an export whose
    /// Group had it as an active member at the export's transaction time.
    pub patient: Option<String>,
    pub action: Option<String>,
    /// Records with `seq > after_seq` (keyset paging).
    pub after_seq: Option<i64>,
    pub limit: usize,
}
