//! Associated data of Patient and Group exports (Bulk Data IG `includeAssociatedData`, and
//! self-contained exports): Provenance and referenced resources, added once per export at the
//! same transaction time. README "Associated data" states the rules; in short:
//!
//! - **Provenance.** Every Provenance whose `target` is a resource of the cohort's data (a
//!   resource in a member's compartment at the transaction time, of an exported type, or a member
//!   Patient) is exported, as the IG requires by default and for `RelevantProvenanceResources`;
//!   `LatestProvenanceResources` keeps, per targeted resource, the Provenance updated last.
//!   Provenance is exported through this rule only (never through the compartment join), so
//!   each appears once.
//! - **Referenced resources.** Resources of types outside the Patient compartment (Practitioner,
//!   PractitionerRole, Organization, Location, Medication, Device, Substance, …) referenced by
//!   the exported types' cohort data or by an added Provenance, and transitively by those up to
//!   [`REFERENCE_DEPTH`] references away from the cohort. Without `_type` every such type comes;
//!   with `_type`, only the named ones (`_type=MedicationRequest,Medication`). On by default;
//!   `includeAssociatedData=_noReferencedResources` turns them off.
//! - **`_since`.** An associated resource comes when it changed since `_since`, when it is
//!   reached through a member added since (that member's full data), or when a resource exported
//!   by this very export references it (or, for a Provenance, is its target): a client that keeps
//!   a replica then holds every associated resource of a full export at the new transaction time.

use bulkhead_fhir::{Issue, IssueType, Micros};
use bulkhead_store::{
    AssociatedRequest, MemberSelection, ProvenanceSelection, ReferencedTypes, Store, StoreError, TenantId,
};

use crate::params::ParamError;
use crate::record::PlannedFile;
use crate::token::FileKind;

/// How many references away from the cohort's data a referenced resource may be: 1 is what a
/// compartment resource references (an Encounter's Practitioner), 2 what that references (the
/// PractitionerRole's Organization), 3 one more (an Organization's `partOf`).
pub const REFERENCE_DEPTH: u32 = 3;

/// The custom `includeAssociatedData` value that turns referenced resources off.
pub const NO_REFERENCED_RESOURCES: &str = "_noReferencedResources";
/// The custom value asking for referenced resources (the default; it wins over
/// [`NO_REFERENCED_RESOURCES`], as the IG's "least restrictive value" rule requires).
pub const REFERENCED_RESOURCES: &str = "_referencedResources";

/// What `includeAssociatedData` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AssociatedData {
    pub provenance: ProvenanceSelection,
    /// Referenced resources outside the Patient compartment.
    pub referenced: bool,
}

impl Default for AssociatedData {
    /// Without `includeAssociatedData`: every relevant Provenance (the IG's SHALL) and
    /// referenced resources (a self-contained export).
    fn default() -> Self {
        AssociatedData { provenance: ProvenanceSelection::Relevant, referenced: true }
    }
}

/// Parses the `includeAssociatedData` values (comma lists, repeats allowed). Conflicting values
/// resolve to the least restrictive (IG): `RelevantProvenanceResources` over
/// `LatestProvenanceResources`, [`REFERENCED_RESOURCES`] over [`NO_REFERENCED_RESOURCES`]. An
/// unknown value is a 400, or a warning under `handling=lenient`.
pub fn parse_include_associated_data(
    values: &[&str],
    lenient: bool,
    warnings: &mut Vec<Issue>,
) -> Result<AssociatedData, ParamError> {
    const PARAM: &str = "includeAssociatedData";
    let mut associated = AssociatedData::default();
    let (mut latest, mut relevant, mut with_references, mut without_references) = (false, false, false, false);
    for value in values.iter().flat_map(|value| value.split(',')).map(str::trim) {
        match value {
            "LatestProvenanceResources" => latest = true,
            "RelevantProvenanceResources" => relevant = true,
            REFERENCED_RESOURCES => with_references = true,
            NO_REFERENCED_RESOURCES => without_references = true,
            other => {
                let shown: String = other.chars().take(100).collect();
                let message = format!(
                    "Parameter '{PARAM}': '{shown}' is not supported (supported: LatestProvenanceResources, \
                     RelevantProvenanceResources, {REFERENCED_RESOURCES}, {NO_REFERENCED_RESOURCES})"
                );
                if !lenient {
                    return Err(ParamError { issue: Issue::error(IssueType::NotSupported, message).at(PARAM) });
                }
                let message = format!("{message}; ignored (Prefer: handling=lenient)");
                warnings.push(Issue::warning(IssueType::NotSupported, message).at(PARAM));
            }
        }
    }
    if latest && !relevant {
        associated.provenance = ProvenanceSelection::Latest;
    }
    if without_references && !with_references {
        associated.referenced = false;
    }
    Ok(associated)
}

/// Computes and stores the associated data of an export whose compartment data covers
/// `cohort_types` (the types requested, or every compartment type; Provenance is handled here
/// only) and returns its output files, in type order. `requested` is the `_type` list, if any.
#[allow(clippy::too_many_arguments)]
pub fn plan_associated_files(
    store: &dyn Store,
    tenant: TenantId,
    selection: &MemberSelection,
    associated: &AssociatedData,
    requested: Option<&[String]>,
    cohort_types: &[String],
    part_size: u64,
    expires: Micros,
) -> Result<(Option<String>, Vec<PlannedFile>), StoreError> {
    let wants = |resource_type: &str| requested.is_none_or(|types| types.iter().any(|t| t == resource_type));
    let provenance = if wants("Provenance") { associated.provenance } else { ProvenanceSelection::None };
    let referenced = match (associated.referenced, requested) {
        (false, _) => ReferencedTypes::None,
        (true, None) => ReferencedTypes::All,
        (true, Some(types)) => {
            let named: Vec<String> =
                types.iter().filter(|t| bulkhead_fhir::references::is_referenced_type(t)).cloned().collect();
            if named.is_empty() {
                ReferencedTypes::None
            } else {
                ReferencedTypes::Only(named)
            }
        }
    };
    if provenance == ProvenanceSelection::None && referenced == ReferencedTypes::None {
        return Ok((None, Vec::new()));
    }
    let reference_sources: Vec<String> = cohort_types.iter().filter(|t| *t != "Provenance").cloned().collect();
    let mut provenance_sources = reference_sources.clone();
    // A Provenance about a member Patient belongs to the Patient's compartment: it comes whether
    // or not Patient itself is exported.
    if !provenance_sources.iter().any(|t| t == "Patient") {
        provenance_sources.push("Patient".to_owned());
    }
    let request = AssociatedRequest {
        set_id: uuid::Uuid::new_v4().simple().to_string(),
        expires,
        provenance,
        provenance_sources,
        referenced,
        reference_sources,
        depth: REFERENCE_DEPTH,
    };
    // The set id may be an earlier export's (the same set, shared): files read that one.
    let planned = store.plan_associated(tenant, selection, &request, part_size)?;
    let files = planned
        .parts
        .into_iter()
        .flat_map(|(resource_type, parts)| {
            parts.into_iter().map(move |part| PlannedFile {
                kind: FileKind::Output,
                resource_type: resource_type.clone(),
                start: part.first_key,
                end: part.last_key,
                total: part.count,
                associated: true,
                members: None,
            })
        })
        .collect();
    Ok((Some(planned.set_id), files))
}

/// `deleted[]` of one compartment type, less what the export's associated set exports: a
/// Provenance re-pointed from a member Patient to another resource of the cohort left the
/// compartment but is still exported (a resource is never both in `output` and `deleted[]`).
pub fn deleted_outside_set(
    store: &dyn Store,
    tenant: TenantId,
    selection: &MemberSelection,
    resource_type: &str,
    set_id: Option<&str>,
) -> Result<Vec<(String, Micros)>, StoreError> {
    let mut deleted = store.deleted_in_compartments(tenant, selection, resource_type)?;
    if let (Some(set_id), false) = (set_id, deleted.is_empty()) {
        let ids: Vec<String> = deleted.iter().map(|(id, _)| id.clone()).collect();
        let held = store.associated_ids(tenant, set_id, resource_type, &ids)?;
        if !held.is_empty() {
            deleted.retain(|(id, _)| !held.contains(id));
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(values: &[&str], lenient: bool) -> Result<(AssociatedData, Vec<Issue>), ParamError> {
        let mut warnings = Vec::new();
        parse_include_associated_data(values, lenient, &mut warnings).map(|parsed| (parsed, warnings))
    }

    #[test]
    fn defaults_to_relevant_provenance_and_referenced_resources() {
        let (parsed, warnings) = parse(&[], false).unwrap();
        assert_eq!(parsed, AssociatedData { provenance: ProvenanceSelection::Relevant, referenced: true });
        assert!(warnings.is_empty());
    }

    #[test]
    fn values_combine_and_the_least_restrictive_wins() {
        let case = |values: &[&str]| parse(values, false).unwrap().0;
        assert_eq!(case(&["LatestProvenanceResources"]).provenance, ProvenanceSelection::Latest);
        assert_eq!(
            case(&["LatestProvenanceResources,RelevantProvenanceResources"]).provenance,
            ProvenanceSelection::Relevant
        );
        assert_eq!(
            case(&["RelevantProvenanceResources", "LatestProvenanceResources"]).provenance,
            ProvenanceSelection::Relevant
        );
        assert!(!case(&["_noReferencedResources"]).referenced);
        assert_eq!(case(&["_noReferencedResources"]).provenance, ProvenanceSelection::Relevant);
        assert!(case(&["_noReferencedResources", "_referencedResources"]).referenced);
        assert!(
            case(&[" LatestProvenanceResources , _noReferencedResources"])
                == AssociatedData { provenance: ProvenanceSelection::Latest, referenced: false }
        );
    }

    #[test]
    fn unknown_values_are_refused_or_warned() {
        let issue = parse(&["_myPreset"], false).unwrap_err().issue;
        assert_eq!(issue.code, IssueType::NotSupported);
        assert_eq!(issue.expression.as_deref(), Some("includeAssociatedData"));
        assert!(issue.diagnostics.contains("_myPreset"));
        let (parsed, warnings) = parse(&["_myPreset,LatestProvenanceResources"], true).unwrap();
        assert_eq!(parsed.provenance, ProvenanceSelection::Latest);
        assert_eq!(warnings.len(), 1);
        // Values are case-sensitive codes.
        assert!(parse(&["latestprovenanceresources"], false).is_err());
    }
}
