use bulkhead_fhir::type_filter::TypeFilters;
use bulkhead_fhir::Micros;

/// A tenant's database key. Every resource query takes one, so no query can forget the tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(pub i64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    pub created: Micros,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRecord {
    pub client_id: String,
    pub tenant: TenantId,
    pub tenant_name: String,
    /// A hash of the secret (a keyed `hmac-sha256$…` or a legacy Argon2 PHC string); never the
    /// secret.
    pub secret_hash: String,
    pub revoked: bool,
    pub created: Micros,
}

/// How a client may use SMART Backend Services, and what it may do: its public keys (an
/// inline JWKS, or the URL of one), the scopes it is pre-authorised for and the lifetime of the
/// access tokens it gets.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientRegistration {
    /// An inline JWK Set (JSON text).
    pub jwks: Option<String>,
    /// The URL of the client's JWK Set.
    pub jwks_url: Option<String>,
    /// Space-separated SMART scopes; `None`: full access to the tenant (as client headers
    /// always had).
    pub scopes: Option<String>,
    /// Access token lifetime in seconds; `None`: the server's default.
    pub token_ttl_seconds: Option<u32>,
}

/// Which part of a tenant a reader sees: the whole tenant, or one user's resources
/// (1upHealth `x-oneup-user-id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visibility {
    Tenant,
    User(String),
}

impl Visibility {
    pub fn user(&self) -> Option<&str> {
        match self {
            Visibility::Tenant => None,
            Visibility::User(user) => Some(user),
        }
    }
}

/// One stored version of a resource.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResource {
    pub resource_type: String,
    pub id: String,
    pub version: i64,
    pub last_updated: Micros,
    pub deleted: bool,
    pub owner: Option<String>,
    /// The final JSON text (with `meta` stamped); `None` for a tombstone.
    pub body: Option<String>,
}

/// What an export selects, frozen at kick-off: the member patients with, for each, the lower
/// bound of `lastUpdated` that applies to it (`None`: full history, e.g. a member added since
/// `_since`), an optional `_until`, the transaction time and the user scope.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberSelection {
    /// `(patient id, since)`, sorted by patient id, without duplicates; shared, so cloning a
    /// selection does not copy its members.
    pub members: crate::Members,
    /// The `_since` of the export, used for deletions.
    pub since: Option<Micros>,
    pub until: Option<Micros>,
    pub transaction_time: Micros,
    pub visibility: Visibility,
    /// Which resources are candidates: the members' compartments, or every resource of the
    /// tenant (a system-level export; `members` is then empty and `since` applies to all).
    pub scope: SelectionScope,
    /// `_typeFilter`: resources of a filtered type are selected only when their version at the
    /// transaction time matches (evaluated on the stored JSON, when counting and when reading).
    pub filters: TypeFilters,
}

/// Where an export's candidates come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SelectionScope {
    /// Resources in the members' Patient compartments (Group- and Patient-level exports).
    #[default]
    Members,
    /// Every resource of the type in the tenant, read in key order (system-level export).
    Tenant,
}

/// A contiguous key range of one type's selected resources, with its exact count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartRange {
    pub first_key: i64,
    pub last_key: i64,
    pub count: u64,
}

/// What the file URLs of one export (either mode) refer to: the planned files and the kick-off's
/// details (client, user, filters, lenient-mode warnings), kept server-side so a URL carries only
/// the record's id and the file's number. The tenant is not a field: it keys every record method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRecord {
    /// A random UUID.
    pub id: String,
    pub created: Micros,
    /// When the export's file URLs expire; an expired record is as if it did not exist.
    pub expires: Micros,
    /// The plan, as JSON text (its shape belongs to the export crate).
    pub plan: String,
}

/// Where an asynchronous export job is: planned in the background after its 202, then complete
/// (its manifest) or failed (an OperationOutcome and the HTTP status the status URL answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportJobState {
    Planning,
    Complete,
    Failed { status: u16 },
}

/// An asynchronous Bulk Data export job (kick-off with `Prefer: respond-async`). It is stored as
/// [`ExportJobState::Planning`] when the 202 goes out and finished once by its planner
/// ([`crate::Store::finish_export_job`]); the status URL answers from it until `expires`. The
/// tenant is not a field: it is part of every job method's signature (and of the job's key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportJob {
    /// A random UUID; the status URL is `…/$export-status/{id}`.
    pub id: String,
    /// The client that kicked the export off; only it may poll or cancel the job.
    pub client_id: String,
    /// The user scope of the kick-off (`x-oneup-user-id`); only the same scope sees the job.
    pub visibility: Visibility,
    pub created: Micros,
    /// When the job (and its file URLs) expire; an expired job is as if it did not exist.
    pub expires: Micros,
    pub state: ExportJobState,
    /// JSON text: the complete manifest, the failure's OperationOutcome, or empty while planning.
    pub manifest: String,
}

/// Which Provenance resources an export adds as associated data (Bulk Data IG
/// `includeAssociatedData`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProvenanceSelection {
    /// None.
    None,
    /// Every Provenance whose `target` is one of the export's cohort resources
    /// (`RelevantProvenanceResources`, and the IG's default).
    Relevant,
    /// For each cohort resource, only the Provenance targeting it that was updated last
    /// (`LatestProvenanceResources`; ties go to the larger key).
    Latest,
}

/// Which referenced resources (types outside the Patient compartment) an export adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReferencedTypes {
    None,
    /// Every type outside the Patient compartment (no `_type`).
    All,
    /// Only these (the `_type` entries outside the compartment).
    Only(Vec<String>),
}

/// The associated data of one Patient or Group export, computed once at planning (as of the
/// selection's transaction time) and kept under `set_id` until `expires`, so every file of the
/// export reads the same set ([`crate::Store::plan_associated`]).
///
/// Rules (README "Associated data"): the cohort is every resource of a member's compartment
/// at the transaction time (live, visible), whatever `_since` and the selection's `_typeFilter`
/// (a filter narrows what is exported of its type, not the cohort). A Provenance is added when it
/// targets a cohort resource of `provenance_sources`; a referenced resource when a cohort
/// resource of `reference_sources`, an added Provenance, or (transitively, up to `depth`
/// references away from the cohort) another referenced resource references it. `_since`: an
/// added resource is exported when it changed since, when it is reached through a member added
/// since (full history), or when a resource exported by this export (one matching the
/// `_typeFilter` of its type) references (or is the target of) it; `_until` applies as to
/// compartment data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssociatedRequest {
    /// A random id naming the set when it is computed (a reused set keeps its own id, see
    /// [`AssociatedPlan`]).
    pub set_id: String,
    /// When the set may be swept (with its export's file URLs).
    pub expires: Micros,
    pub provenance: ProvenanceSelection,
    /// Cohort types whose resources' Provenance is added.
    pub provenance_sources: Vec<String>,
    pub referenced: ReferencedTypes,
    /// Cohort types whose resources' references are followed.
    pub reference_sources: Vec<String>,
    /// How many references away from the cohort a referenced resource may be (1: only those the
    /// cohort's resources reference directly).
    pub depth: u32,
}

/// A planned associated set ([`crate::Store::plan_associated`]): the id its rows are stored under
/// (the request's, or that of an earlier export's identical set, shared) and each type's parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssociatedPlan {
    pub set_id: String,
    pub parts: Vec<(String, Vec<PartRange>)>,
}
