//! FHIR R4 knowledge with no I/O: resource types, the patient compartment table, ids, instants,
//! references, OperationOutcome, structural R4 validation, and JSON parsing that keeps every
//! number's digits.

pub mod compartment;
pub mod exact_json;
pub mod id;
pub mod instant;
pub mod json_tape;
pub mod json_view;
pub mod outcome;
pub mod references;
pub mod resource_type;
pub mod type_filter;
pub mod validation;

pub use exact_json::parse_exact;
pub use id::is_valid_id;
pub use instant::{format_instant, now_micros, parse_range, parse_since, DateRange, InstantError, Micros};
pub use json_tape::{JsonTape, TapeBuffers, TapeValue};
pub use json_view::{JsonType, JsonView};
pub use outcome::{operation_outcome, Issue, IssueType, Severity};
pub use resource_type::{
    is_resource_type, resource_type_code, resource_type_index, resource_type_name, RESOURCE_TYPES,
};
