//! The search subset the store answers: `_id`, `_lastUpdated`, `identifier`, and `subject` /
//! `patient` references, keyset-paged in key order.

use bulkhead_fhir::Micros;

use crate::StoredResource;

/// A `_lastUpdated` bound, already turned into a half-open comparison on microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LastUpdatedBound {
    AtLeast(Micros),
    Before(Micros),
}

/// `identifier=[system|]value`: `system` is `None` for "any system", `Some("")` for "no system".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentifierQuery {
    pub system: Option<String>,
    pub value: String,
}

/// `subject=` / `patient=`: a reference to `[type/]id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferenceQuery {
    /// `"subject"`, or `"patient"` (the `patient` element or a Patient `subject`; the target
    /// type is always Patient).
    pub param: &'static str,
    pub target_type: Option<String>,
    pub id: String,
}

/// A type-level search; all conditions are ANDed, a list of `ids` is ORed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SearchQuery {
    pub resource_type: String,
    pub ids: Vec<String>,
    pub last_updated: Vec<LastUpdatedBound>,
    pub identifiers: Vec<IdentifierQuery>,
    pub references: Vec<ReferenceQuery>,
    /// Page size.
    pub count: u32,
    /// Keyset cursor: return resources with a key greater than this.
    pub after_key: Option<i64>,
}

/// One page of results; `next_key` is the cursor for the next page, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchPage {
    pub resources: Vec<StoredResource>,
    pub next_key: Option<i64>,
}
