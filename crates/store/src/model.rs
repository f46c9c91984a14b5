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
    /// PHC-formatted slow hash of the secret; never the secret.
    pub secret_hash: String,
    pub revoked: bool,
    pub created: Micros,
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
    /// `(patient id, since)`, sorted by patient id, without duplicates.
    pub members: Vec<(String, Option<Micros>)>,
    /// The `_since` of the export, used for deletions.
    pub since: Option<Micros>,
    pub until: Option<Micros>,
    pub transaction_time: Micros,
    pub visibility: Visibility,
}

/// A contiguous key range of one type's selected resources, with its exact count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartRange {
    pub first_key: i64,
    pub last_key: i64,
    pub count: u64,
}
