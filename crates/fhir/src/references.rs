//! Outgoing references of a resource, for associated data in Patient and Group exports.
//!
//! Two kinds are extracted, and only these (the index they feed stays small):
//! - references to resources of types **outside** the R4 Patient compartment (Practitioner,
//!   Organization, Location, Medication, …), anywhere in the resource: the "referenced
//!   resources" a self-contained export adds;
//! - `Provenance.target` references, of any type: which resources a Provenance is about.
//!
//! References to compartment types (Patient, Encounter, Observation, Device, …) are not
//! referenced resources: those are some patient's data, exported with that patient's
//! compartment or not at all.

use serde_json::Value;

use crate::compartment::{is_compartment_type, parse_reference};
use crate::json_view::{JsonType, JsonView};

/// One outgoing reference.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OutgoingReference {
    pub target_type: String,
    pub target_id: String,
    /// True for an entry of `Provenance.target`.
    pub provenance_target: bool,
}

/// True when resources of this type can be added to an export as referenced resources: a
/// type outside the Patient compartment, and not a Group (other cohorts are never exported).
pub fn is_referenced_type(resource_type: &str) -> bool {
    resource_type != "Group" && !is_compartment_type(resource_type) && crate::is_resource_type(resource_type)
}

/// The references of `resource` (of `resource_type`) that the associated-data index keeps
/// (see the module documentation), sorted and deduplicated. Literal references only
/// (`Type/id`, absolute URLs, `/_history/n` forms); contained (`#x`), `urn:` and
/// identifier-only references resolve to nothing stored and are skipped.
pub fn outgoing_references(resource_type: &str, resource: &Value) -> Vec<OutgoingReference> {
    outgoing_references_in(resource_type, resource)
}

/// [`outgoing_references`] for any [`JsonView`] of the resource.
pub fn outgoing_references_in<'a, J: JsonView<'a>>(resource_type: &str, resource: J) -> Vec<OutgoingReference> {
    let mut found = Vec::new();
    for (key, value) in resource.entries() {
        // `contained` resources are part of this one, so their references count too; `meta`
        // and `text` hold none worth following.
        if matches!(key, "meta" | "text" | "resourceType" | "id") {
            continue;
        }
        let provenance_target = resource_type == "Provenance" && key == "target";
        walk(value, provenance_target, &mut found);
    }
    found.sort_unstable();
    found.dedup();
    found
}

/// Collects references below `value`. `provenance_target`: `value` is `Provenance.target`.
fn walk<'a, J: JsonView<'a>>(value: J, provenance_target: bool, out: &mut Vec<OutgoingReference>) {
    match value.json_type() {
        JsonType::Array => value.items().for_each(|item| walk(item, provenance_target, out)),
        // One pass over the members, no lookup by key (each would hash "reference"); the
        // caller sorts what is found.
        JsonType::Object => {
            for (key, child) in value.entries() {
                if key != "reference" {
                    // Below a target Reference (its extensions) nothing is a target any more.
                    walk(child, false, out);
                    continue;
                }
                let Some((target_type, target_id)) = child.as_str().and_then(parse_reference) else { continue };
                if provenance_target || is_referenced_type(target_type) {
                    out.push(OutgoingReference {
                        target_type: target_type.to_owned(),
                        target_id: target_id.to_owned(),
                        provenance_target,
                    });
                }
                if provenance_target && is_referenced_type(target_type) {
                    // A Provenance about a Practitioner also references it.
                    out.push(OutgoingReference {
                        target_type: target_type.to_owned(),
                        target_id: target_id.to_owned(),
                        provenance_target: false,
                    });
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refs(resource: Value) -> Vec<(String, String, bool)> {
        let resource_type = resource["resourceType"].as_str().unwrap().to_owned();
        outgoing_references(&resource_type, &resource)
            .into_iter()
            .map(|r| (r.target_type, r.target_id, r.provenance_target))
            .collect()
    }

    fn r(t: &str, id: &str, target: bool) -> (String, String, bool) {
        (t.to_owned(), id.to_owned(), target)
    }

    #[test]
    fn keeps_non_compartment_targets_anywhere_in_the_resource() {
        let encounter = json!({"resourceType": "Encounter", "id": "e",
            "subject": {"reference": "Patient/p"},
            "participant": [{"individual": {"reference": "Practitioner/pr1"}},
                            {"individual": {"reference": "https://x.org/fhir/Practitioner/pr2/_history/3"}}],
            "serviceProvider": {"reference": "Organization/o1"},
            "location": [{"location": {"reference": "Location/l1"}}, {"location": {"reference": "Location/l1"}}],
            "partOf": {"reference": "Encounter/e0"},
            "diagnosis": [{"condition": {"reference": "urn:uuid:abc"}}, {"condition": {"reference": "#c1"}}],
            "contained": [{"resourceType": "Medication", "manufacturer": {"reference": "Organization/o2"}}],
            "meta": {"source": "x"}});
        assert_eq!(
            refs(encounter),
            vec![
                r("Location", "l1", false),
                r("Organization", "o1", false),
                r("Organization", "o2", false),
                r("Practitioner", "pr1", false),
                r("Practitioner", "pr2", false)
            ]
        );
    }

    #[test]
    fn provenance_targets_are_flagged_whatever_their_type() {
        let provenance = json!({"resourceType": "Provenance", "id": "v",
            "target": [{"reference": "Observation/o"}, {"reference": "Patient/p"}, {"reference": "Practitioner/pr"}],
            "agent": [{"who": {"reference": "Practitioner/pr9"}, "onBehalfOf": {"reference": "Organization/o"}}]});
        assert_eq!(
            refs(provenance),
            vec![
                r("Observation", "o", true),
                r("Organization", "o", false),
                r("Patient", "p", true),
                r("Practitioner", "pr", false),
                r("Practitioner", "pr", true),
                r("Practitioner", "pr9", false)
            ]
        );
        // `target` of another type means nothing special.
        let other = json!({"resourceType": "Task", "focus": {"reference": "Observation/o"},
            "owner": {"reference": "Organization/o"}});
        assert_eq!(refs(other), vec![r("Organization", "o", false)]);
    }

    #[test]
    fn referenced_types_are_outside_the_compartment() {
        for t in ["Practitioner", "PractitionerRole", "Organization", "Location", "Medication", "Substance", "Device"] {
            assert!(is_referenced_type(t), "{t}");
        }
        for t in ["Patient", "Observation", "Encounter", "Group", "Provenance", "Bogus"] {
            assert!(!is_referenced_type(t), "{t}");
        }
    }
}
