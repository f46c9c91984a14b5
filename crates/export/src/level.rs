//! The three Bulk Data export levels (Bulk Data IG §endpoints) and what each may return.

use bulkhead_fhir::compartment::{compartment_types, is_compartment_type};
use bulkhead_fhir::{is_resource_type, RESOURCE_TYPES};
use serde::{Deserialize, Serialize};

/// Which `$export` was asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportLevel {
    /// `[base]/$export`: every resource of the tenant the caller may read.
    System,
    /// `[base]/Patient/$export`: the compartments of all the tenant's Patients.
    Patient,
    /// `[base]/Group/{id}/$export`: the compartments of the Group's members.
    Group(String),
}

impl ExportLevel {
    /// The types an export of this level may return, sorted.
    ///
    /// System: every R4 type. Patient: `Patient` and the Patient-compartment types, except
    /// `Group` (other cohorts are never exported from a patient's compartment). Group: the
    /// same plus `Group` (only the exported Group itself).
    pub fn exportable_types(&self) -> Vec<&'static str> {
        match self {
            ExportLevel::System => {
                let mut types = RESOURCE_TYPES.to_vec();
                types.sort_unstable();
                types
            }
            ExportLevel::Patient | ExportLevel::Group(_) => {
                let mut types = compartment_types().to_vec();
                types.extend(["Patient", "Group"]);
                if *self == ExportLevel::Patient {
                    types.retain(|name| *name != "Group");
                }
                types.sort_unstable();
                types.dedup();
                types
            }
        }
    }

    /// True when an export of this level may return resources of `resource_type`.
    pub fn exports(&self, resource_type: &str) -> bool {
        match self {
            ExportLevel::System => is_resource_type(resource_type),
            ExportLevel::Patient => {
                resource_type == "Patient" || (resource_type != "Group" && is_compartment_type(resource_type))
            }
            ExportLevel::Group(_) => matches!(resource_type, "Patient" | "Group") || is_compartment_type(resource_type),
        }
    }

    /// How diagnostics name this level.
    pub fn describe(&self) -> &'static str {
        match self {
            ExportLevel::System => "a system-level export",
            ExportLevel::Patient => "a Patient-level export",
            ExportLevel::Group(_) => "a Group export",
        }
    }

    /// The Group's id for a Group export.
    pub fn group(&self) -> Option<&str> {
        match self {
            ExportLevel::Group(id) => Some(id),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_export_what_the_ig_says() {
        let group = ExportLevel::Group("g".into());
        for level in [ExportLevel::System, ExportLevel::Patient, group.clone()] {
            let types = level.exportable_types();
            assert!(types.windows(2).all(|w| w[0] < w[1]), "sorted, unique");
            assert!(types.iter().all(|t| level.exports(t)));
            assert!(types.contains(&"Patient") && types.contains(&"Observation"));
        }
        assert!(ExportLevel::System.exports("Practitioner") && ExportLevel::System.exports("Group"));
        assert!(!ExportLevel::Patient.exports("Practitioner") && !ExportLevel::Patient.exports("Group"));
        assert!(group.exports("Group") && !group.exports("Organization"));
        assert!(!ExportLevel::System.exports("Bogus"));
    }
}
