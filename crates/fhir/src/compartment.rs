//! The FHIR R4 (4.0.1) Patient compartment: which patients a resource belongs to.
//!
//! A resource is in a patient's compartment when one of its type's compartment search parameters
//! (from the official Patient `CompartmentDefinition`) references that patient. The parameters'
//! FHIRPath expressions are reduced ahead of time to plain JSON element paths by
//! `gen/gen_compartment_table.py`, which writes the static table in `compartment_table.rs`; at run
//! time membership is a binary search for the type plus a walk of a few paths, with no allocation
//! beyond the returned ids.

use serde_json::Value;

use crate::json_view::JsonView;

// Generated data; see the header of that file for how to regenerate it.
#[path = "compartment_table.rs"]
mod table;

/// One resource type's entry in the generated table.
struct CompartmentRow {
    /// The resource type, e.g. `"Observation"`.
    #[cfg_attr(not(test), allow(dead_code))] // lookups go via `TYPES`; tests check alignment
    resource_type: &'static str,
    /// Every (search parameter code, element path) pair. A parameter whose expression has several
    /// branches for this type (e.g. AuditEvent `patient`) appears once per branch.
    params: &'static [(&'static str, &'static [&'static str])],
    /// The distinct element paths of `params`, so that extraction walks each path only once
    /// (several parameters often share one, e.g. `subject` and `patient`).
    paths: &'static [&'static [&'static str]],
}

/// Maximum length of a FHIR logical id.
const MAX_ID_LEN: usize = 64;

/// Resource types that have a Patient compartment definition (66 in R4 4.0.1), sorted.
///
/// `"Patient"` is one of them: the R4 definition puts a Patient in its own compartment and, via
/// `link`, in the compartments of the patients it links to.
pub fn compartment_types() -> &'static [&'static str] {
    table::TYPES
}

/// True when resources of this type can belong to some patient's compartment (includes "Patient").
pub fn is_compartment_type(resource_type: &str) -> bool {
    row(resource_type).is_some()
}

/// The ids of the patients whose compartments this resource belongs to, sorted and deduplicated.
///
/// `resource` is the resource JSON (already parsed). For a Patient the result contains its own id
/// (if it has a valid one) plus any patients it names in `link.other`, as the R4 definition says.
/// References are read from every path of the table for that type; a reference counts when it
/// points at a Patient: "Patient/123", "Patient/123/_history/4", or an absolute URL
/// ".../Patient/123" (optionally with /_history/n). Contained ("#x"), urn:uuid:, identifier-only
/// and non-Patient references are ignored. Arrays at any level of the path are walked.
/// Types outside the compartment (see [`is_compartment_type`]) give an empty Vec.
pub fn patient_compartments(resource_type: &str, resource: &Value) -> Vec<String> {
    let own_id = resource.get("id").and_then(Value::as_str).unwrap_or("");
    patient_compartments_of(resource_type, own_id, resource)
}

/// As [`patient_compartments`], for a resource stored under `id` whatever id its body carries
/// (a create assigns the id): a Patient is in its own compartment by that id.
pub fn patient_compartments_of(resource_type: &str, id: &str, resource: &Value) -> Vec<String> {
    patient_compartments_in(resource_type, id, resource)
}

/// [`patient_compartments_of`] for any [`JsonView`] of the resource.
pub fn patient_compartments_in<'a, J: JsonView<'a>>(resource_type: &str, id: &str, resource: J) -> Vec<String> {
    let mut ids = Vec::new();
    if resource_type == "Patient" && is_id(id) {
        ids.push(id.to_owned());
    }
    if let Some(row) = row(resource_type) {
        for path in row.paths {
            collect_patient_ids(resource, path, &mut ids);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The parameter codes and element paths used for a type (for docs/CapabilityStatement and tests).
///
/// Each path is a list of JSON property names from the resource root to the Reference, e.g.
/// `("payee", &["payee", "party"])` for Claim. A code appears once per path, so usually once, but
/// twice for AuditEvent `patient` (`agent.who` and `entity.what`). Empty for other types.
pub fn compartment_params(resource_type: &str) -> &'static [(&'static str, &'static [&'static str])] {
    row(resource_type).map_or(&[], |row| row.params)
}

/// Parses a reference string into (type, id) for relative "Type/id", "Type/id/_history/v" and absolute
/// ".../Type/id[/_history/v]" forms; None for contained, urn:, or malformed references.
///
/// An absolute reference must start with a URL scheme and authority (`scheme://host...`). Both the
/// id and the version must be valid FHIR ids (`[A-Za-z0-9\-\.]{1,64}`); the type must start with an
/// uppercase ASCII letter and be alphanumeric.
pub fn parse_reference(reference: &str) -> Option<(&str, &str)> {
    // Try the versioned form first: "<ref>/_history/<v>", where <ref> is itself unversioned.
    if let Some((head, version)) = reference.rsplit_once('/') {
        if let Some((unversioned, "_history")) = head.rsplit_once('/') {
            if is_id(version) {
                return parse_unversioned(unversioned);
            }
            return None;
        }
    }
    parse_unversioned(reference)
}

/// Parses "Type/id" or "scheme://authority/.../Type/id".
fn parse_unversioned(reference: &str) -> Option<(&str, &str)> {
    let (head, id) = reference.rsplit_once('/')?;
    let (base, resource_type) = match head.rsplit_once('/') {
        Some((base, resource_type)) => (Some(base), resource_type),
        None => (None, head),
    };
    let base_ok = base.is_none_or(is_absolute_base);
    (base_ok && is_type_name(resource_type) && is_id(id)).then_some((resource_type, id))
}

/// True for a service base URL such as "https://example.org/fhir" (scheme, "://", non-empty rest).
fn is_absolute_base(base: &str) -> bool {
    let Some((scheme, rest)) = base.split_once("://") else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        && !rest.is_empty()
}

/// True for a FHIR resource type name: an uppercase ASCII letter, then ASCII letters or digits.
fn is_type_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_uppercase()) && bytes.all(|b| b.is_ascii_alphanumeric())
}

/// True for a FHIR logical id (or version id): `[A-Za-z0-9\-\.]{1,64}`.
fn is_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// The generated row for a type (`TYPES` is sorted and parallel to `ROWS`), found through the
/// type's position in [`crate::RESOURCE_TYPES`]: every write asks for every reference it holds.
fn row(resource_type: &str) -> Option<&'static CompartmentRow> {
    static ROW_OF_TYPE: std::sync::LazyLock<Vec<Option<u8>>> = std::sync::LazyLock::new(|| {
        let row = |name: &&str| table::TYPES.binary_search(name).ok().and_then(|index| u8::try_from(index).ok());
        crate::RESOURCE_TYPES.iter().map(row).collect()
    });
    let index = ROW_OF_TYPE[crate::resource_type::resource_type_index(resource_type)?]?;
    Some(&table::ROWS[usize::from(index)])
}

/// [`patient_compartments_of`] for a resource's JSON text, without building a `Value`: only the
/// type's compartment paths are followed, every other element is skipped as it is read. For
/// code that has the stored text and no parsed resource (the audit trail, which names the
/// patients of every resource a read or search returns). Text that is not JSON gives an empty Vec.
pub fn patient_compartments_in_text(resource_type: &str, id: &str, text: &str) -> Vec<String> {
    let mut ids = Vec::new();
    if resource_type == "Patient" && is_id(id) {
        ids.push(id.to_owned());
    }
    if let Some(row) = row(resource_type) {
        let mut found = Vec::new();
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let walk = text_walk::Walk { paths: row.paths.to_vec(), out: &mut found };
        if serde::de::DeserializeSeed::deserialize(walk, &mut deserializer).is_ok() && deserializer.end().is_ok() {
            ids.append(&mut found);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The streaming walk of [`patient_compartments_in_text`]: a value is visited with the paths
/// (suffixes) still to follow from it, as [`collect_patient_ids`] follows them in a `Value`.
mod text_walk {
    use std::fmt;

    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

    use super::parse_reference;

    pub(super) struct Walk<'a> {
        /// Paths from this value; an empty one ends here (this value is a Reference).
        pub(super) paths: Vec<&'static [&'static str]>,
        pub(super) out: &'a mut Vec<String>,
    }

    impl<'de> DeserializeSeed<'de> for Walk<'_> {
        type Value = ();

        fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
            deserializer.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Walk<'_> {
        type Value = ();

        fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            formatter.write_str("a FHIR element")
        }

        // A primitive where an element or Reference is expected: malformed, nothing to find.
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
            let Walk { paths, out } = self;
            while items.next_element_seed(Walk { paths: paths.clone(), out: &mut *out })?.is_some() {}
            Ok(())
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let Walk { paths, out } = self;
            let is_reference = paths.iter().any(|path| path.is_empty());
            while let Some(key) = map.next_key_seed(Key { paths: &paths, is_reference })? {
                match key {
                    Found::Reference => {
                        if let Some(literal) = map.next_value::<Option<ReferenceText>>()?.and_then(|text| text.0) {
                            if let Some(("Patient", id)) = parse_reference(&literal) {
                                out.push(id.to_owned());
                            }
                        }
                    }
                    Found::Descend(rest) => map.next_value_seed(Walk { paths: rest, out: &mut *out })?,
                    Found::Skip => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(())
        }
    }

    /// What a key of an object on the paths leads to.
    enum Found {
        /// `reference` of a Reference at the end of a path.
        Reference,
        /// A step along paths: their rest.
        Descend(Vec<&'static [&'static str]>),
        Skip,
    }

    struct Key<'p> {
        paths: &'p [&'static [&'static str]],
        is_reference: bool,
    }

    impl<'de> DeserializeSeed<'de> for Key<'_> {
        type Value = Found;

        fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Found, D::Error> {
            deserializer.deserialize_str(self)
        }
    }

    impl Visitor<'_> for Key<'_> {
        type Value = Found;

        fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            formatter.write_str("a property name")
        }

        fn visit_str<E>(self, key: &str) -> Result<Found, E> {
            let rest: Vec<&'static [&'static str]> =
                self.paths.iter().filter(|path| path.first() == Some(&key)).map(|path| &path[1..]).collect();
            Ok(match (self.is_reference && key == "reference", rest.is_empty()) {
                // A path ending at a Reference and another going on through its `reference`
                // (no such pair in R4's table): the Reference wins, as a string has no elements.
                (true, _) => Found::Reference,
                (false, false) => Found::Descend(rest),
                (false, true) => Found::Skip,
            })
        }
    }

    /// A `reference` value: its text when it is a string, `None` for anything else.
    struct ReferenceText(Option<String>);

    impl<'de> serde::Deserialize<'de> for ReferenceText {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Text;
            impl<'de> Visitor<'de> for Text {
                type Value = ReferenceText;
                fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                    formatter.write_str("a reference")
                }
                fn visit_str<E>(self, text: &str) -> Result<ReferenceText, E> {
                    Ok(ReferenceText(Some(text.to_owned())))
                }
                fn visit_bool<E>(self, _: bool) -> Result<ReferenceText, E> {
                    Ok(ReferenceText(None))
                }
                fn visit_i64<E>(self, _: i64) -> Result<ReferenceText, E> {
                    Ok(ReferenceText(None))
                }
                fn visit_u64<E>(self, _: u64) -> Result<ReferenceText, E> {
                    Ok(ReferenceText(None))
                }
                fn visit_f64<E>(self, _: f64) -> Result<ReferenceText, E> {
                    Ok(ReferenceText(None))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<ReferenceText, A::Error> {
                    while items.next_element::<IgnoredAny>()?.is_some() {}
                    Ok(ReferenceText(None))
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ReferenceText, A::Error> {
                    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                    Ok(ReferenceText(None))
                }
            }
            deserializer.deserialize_any(Text)
        }
    }
}

/// Follows `path` from `value`, fanning out over arrays, and pushes the id of every Reference at
/// the end of the path that points at a Patient.
fn collect_patient_ids<'a, J: JsonView<'a>>(value: J, path: &[&str], out: &mut Vec<String>) {
    if value.is_array() {
        for item in value.items() {
            collect_patient_ids(item, path, out);
        }
    } else if value.is_object() {
        match path.split_first() {
            Some((property, rest)) => {
                if let Some(child) = value.get(property) {
                    collect_patient_ids(child, rest, out);
                }
            }
            None => {
                if let Some(id) = referenced_patient(value) {
                    out.push(id.to_owned());
                }
            }
        }
    }
    // A primitive where an element or Reference is expected: malformed, nothing to find.
}

/// The patient id a Reference object points at, if it is a literal reference to a Patient.
fn referenced_patient<'a, J: JsonView<'a>>(reference: J) -> Option<&'a str> {
    let literal = reference.get("reference")?.as_str()?;
    match parse_reference(literal)? {
        ("Patient", id) => Some(id),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn compartments(resource: Value) -> Vec<String> {
        let resource_type = resource["resourceType"].as_str().expect("test resource has a type");
        patient_compartments(resource_type, &resource)
    }

    /// The text walk agrees with the `Value` walk, for `resource` and its text.
    fn assert_text_agrees(resource: &Value) {
        let resource_type = resource["resourceType"].as_str().unwrap_or("Basic");
        let id = resource["id"].as_str().unwrap_or("");
        let text = resource.to_string();
        assert_eq!(
            patient_compartments_in_text(resource_type, id, &text),
            patient_compartments_of(resource_type, id, resource),
            "{text}"
        );
    }

    /// Nests a Reference to `patient` (and a decoy to a Practitioner) at `path`, as an array at
    /// every other level, with unrelated elements and numbers beside it.
    fn nested(path: &[&str], patient: &str, depth: usize) -> Value {
        match path.split_first() {
            None => {
                json!({"reference": format!("Patient/{patient}"), "display": "x", "extension": [{"valueDecimal": 1.50}]})
            }
            Some((property, rest)) => {
                let child = nested(rest, patient, depth + 1);
                let child =
                    if depth.is_multiple_of(2) { json!([{"reference": "Practitioner/p"}, child]) } else { child };
                let mut object = json!({"other": {"reference": "Patient/decoy"}, "n": 12.000});
                object[*property] = child;
                object
            }
        }
    }

    #[test]
    fn the_text_walk_finds_what_the_value_walk_finds_on_every_path_of_every_type() {
        for (index, (resource_type, row)) in table::TYPES.iter().zip(table::ROWS.iter()).enumerate() {
            let mut resource =
                json!({"resourceType": resource_type, "id": format!("r{index}"), "meta": {"versionId": "1"}});
            for (number, path) in row.paths.iter().enumerate() {
                let branch = nested(path, &format!("p{index}-{number}"), 0);
                // Paths sharing a first element: merge into the existing element.
                let first = path[0];
                match (resource.get(first).cloned(), branch.get(first).cloned()) {
                    (Some(Value::Object(mut existing)), Some(Value::Object(more))) => {
                        existing.extend(more);
                        resource[first] = Value::Object(existing);
                    }
                    (_, Some(value)) => resource[first] = value,
                    _ => {}
                }
                assert_text_agrees(&nested(path, "alone", 1));
            }
            assert_text_agrees(&resource);
            assert!(
                !patient_compartments_in_text(resource_type, "x", &resource.to_string()).is_empty()
                    || row.paths.is_empty()
            );
        }
    }

    #[test]
    fn the_text_walk_reads_reference_forms_and_ignores_malformed_text() {
        for resource in [
            json!({"resourceType": "Observation", "id": "o", "subject": {"reference": "https://h.example/fhir/Patient/a/_history/2"},
                   "performer": [{"reference": "Patient/b"}, {"reference": "#c"}, {"reference": "urn:uuid:1"}, {"reference": 7}, "bad"]}),
            json!({"resourceType": "Patient", "id": "me", "link": [{"other": {"reference": "Patient/other"}}]}),
            json!({"resourceType": "Observation", "subject": {"reference": null}, "valueQuantity": {"value": 1.50}}),
            json!({"resourceType": "Observation", "subject": [[{"reference": "Patient/deep"}]]}),
            json!({"resourceType": "Organization", "id": "org", "partOf": {"reference": "Patient/a"}}),
        ] {
            assert_text_agrees(&resource);
        }
        assert_eq!(
            patient_compartments_in_text("Observation", "o", r#"{"subject": {"reference": "Patient/a"}"#),
            ids(&[])
        );
        assert_eq!(patient_compartments_in_text("Patient", "p", "not json"), ids(&["p"]));
    }

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    // ---- parse_reference ----

    #[test]
    fn parses_relative_references() {
        assert_eq!(parse_reference("Patient/123"), Some(("Patient", "123")));
        assert_eq!(parse_reference("Patient/a-b.C9"), Some(("Patient", "a-b.C9")));
        assert_eq!(parse_reference("Practitioner/x"), Some(("Practitioner", "x")));
        assert_eq!(parse_reference("Patient/123/_history/4"), Some(("Patient", "123")));
    }

    #[test]
    fn parses_absolute_references() {
        assert_eq!(parse_reference("http://example.org/fhir/Patient/123"), Some(("Patient", "123")));
        assert_eq!(parse_reference("https://example.org/fhir/R4/Patient/123/_history/7"), Some(("Patient", "123")));
        assert_eq!(parse_reference("https://host/Observation/o1"), Some(("Observation", "o1")));
    }

    #[test]
    fn rejects_contained_urn_and_malformed_references() {
        let rejected = [
            "",
            "#p1",
            "#Patient/1",
            "urn:uuid:e6dde18e-af01-4f2f-b74a-1ec7d0368f93",
            "urn:oid:1.2.3/Patient/1",
            "Patient",
            "Patient/",
            "/Patient/1",
            "patient/1",
            "Patient/1 ",
            "Patient/a_b",
            "Patient/1?x=y",
            "Pat-ient/1",
            "Patient/1/_history/",
            "Patient/1/_history",
            "Patient/1/_history/a_b",
            "Patient/1/extra",
            "example.org/Patient/1",
            "://host/Patient/1",
            "http:///Patient/1",
        ];
        for reference in rejected {
            assert_eq!(parse_reference(reference), None, "{reference:?}");
        }
        let too_long = format!("Patient/{}", "a".repeat(65));
        assert_eq!(parse_reference(&too_long), None);
        let longest = format!("Patient/{}", "a".repeat(64));
        assert!(parse_reference(&longest).is_some());
    }

    // ---- table lookups ----

    #[test]
    fn types_are_sorted_unique_and_parallel_to_rows() {
        let types = compartment_types();
        assert_eq!(types.len(), 66);
        assert!(types.windows(2).all(|w| w[0] < w[1]), "TYPES must be sorted for binary search");
        assert_eq!(types.len(), table::ROWS.len());
        for (name, row) in types.iter().zip(table::ROWS) {
            assert_eq!(*name, row.resource_type);
            assert!(!row.params.is_empty(), "{name} has no params");
        }
    }

    #[test]
    fn compartment_type_membership() {
        for t in ["Patient", "Observation", "Claim", "Group", "Provenance", "VisionPrescription"] {
            assert!(is_compartment_type(t), "{t}");
        }
        // Not in the R4 Patient compartment (Device only joined it in R5).
        for t in ["Practitioner", "Organization", "Device", "Medication", "Location", "", "patient"] {
            assert!(!is_compartment_type(t), "{t}");
            assert!(compartment_params(t).is_empty(), "{t}");
        }
    }

    #[test]
    fn params_for_known_types() {
        assert_eq!(compartment_params("Claim"), &[("patient", &["patient"][..]), ("payee", &["payee", "party"][..])]);
        assert_eq!(compartment_params("Group"), &[("member", &["member", "entity"][..])]);
        assert_eq!(
            compartment_params("AuditEvent"),
            &[("patient", &["agent", "who"][..]), ("patient", &["entity", "what"][..])]
        );
        assert_eq!(compartment_params("Provenance"), &[("patient", &["target"][..])]);
        assert_eq!(compartment_params("Patient"), &[("link", &["link", "other"][..])]);
    }

    // ---- table-driven: every (type, param, path) ----

    /// Builds `{resourceType, p0: {p1: {... leaf}}}`, wrapping each level in an array when asked.
    fn resource_with(resource_type: &str, path: &[&str], leaf: Value, arrays: bool) -> Value {
        let mut value = leaf;
        for property in path.iter().rev() {
            let inner = if arrays { json!([value]) } else { value };
            value = json!({ *property: inner });
        }
        value["resourceType"] = json!(resource_type);
        value
    }

    #[test]
    fn every_table_path_puts_a_patient_reference_in_the_compartment() {
        for &resource_type in compartment_types() {
            for &(code, path) in compartment_params(resource_type) {
                for arrays in [false, true] {
                    let leaf = json!({ "reference": "Patient/p1", "display": "Pat" });
                    let resource = resource_with(resource_type, path, leaf, arrays);
                    assert_eq!(
                        compartments(resource),
                        ids(&["p1"]),
                        "{resource_type}.{code} via {path:?} (arrays: {arrays})"
                    );
                }
            }
        }
    }

    #[test]
    fn every_table_path_ignores_non_patient_references() {
        let not_patients = [
            json!({ "reference": "Practitioner/p1" }),
            json!({ "reference": "RelatedPerson/p1" }),
            json!({ "reference": "Group/p1" }),
            json!({ "reference": "urn:uuid:p1" }),
            json!({ "reference": "#p1" }),
            json!({ "identifier": { "system": "urn:x", "value": "p1" }, "type": "Patient" }),
            json!({ "display": "Patient/p1" }),
            json!("Patient/p1"),
        ];
        for &resource_type in compartment_types() {
            for &(code, path) in compartment_params(resource_type) {
                for leaf in &not_patients {
                    let resource = resource_with(resource_type, path, leaf.clone(), true);
                    assert!(compartments(resource).is_empty(), "{resource_type}.{code} {leaf}");
                }
            }
        }
    }

    #[test]
    fn unrelated_elements_do_not_count() {
        // The Patient reference is only at elements outside the compartment definition.
        let observation = json!({
            "resourceType": "Observation",
            "subject": { "reference": "Group/g1" },
            "focus": [{ "reference": "Patient/p1" }],
            "encounter": { "reference": "Patient/p2" },
            "contained": [{ "resourceType": "Observation", "subject": { "reference": "Patient/p3" } }]
        });
        assert!(compartments(observation).is_empty());
        let device = json!({ "resourceType": "Device", "patient": { "reference": "Patient/p1" } });
        assert!(compartments(device).is_empty(), "Device is not in the R4 Patient compartment");
    }

    // ---- hand-written, realistic resources ----

    #[test]
    fn observation_subject_and_performer() {
        let observation = json!({
            "resourceType": "Observation",
            "id": "o1",
            "status": "final",
            "subject": { "reference": "Patient/p1" },
            "performer": [
                { "reference": "Practitioner/dr" },
                { "reference": "http://example.org/fhir/Patient/p2/_history/3" },
                { "reference": "Patient/p1" }
            ]
        });
        assert_eq!(compartments(observation), ids(&["p1", "p2"]));
        let group_subject = json!({
            "resourceType": "Observation",
            "subject": { "reference": "Group/g1" },
            "performer": [{ "reference": "Practitioner/dr" }]
        });
        assert!(compartments(group_subject).is_empty());
    }

    #[test]
    fn allergy_intolerance_patient_recorder_asserter() {
        let allergy = |field: &str| {
            let mut r = json!({ "resourceType": "AllergyIntolerance", "id": "a1" });
            r[field] = json!({ "reference": format!("Patient/{field}") });
            r
        };
        for field in ["patient", "recorder", "asserter"] {
            assert_eq!(compartments(allergy(field)), ids(&[field]), "{field}");
        }
        let recorded_by_practitioner = json!({
            "resourceType": "AllergyIntolerance",
            "patient": { "reference": "Patient/p1" },
            "recorder": { "reference": "Practitioner/dr" },
            "asserter": { "reference": "RelatedPerson/mum" }
        });
        assert_eq!(compartments(recorded_by_practitioner), ids(&["p1"]));
    }

    #[test]
    fn claim_and_explanation_of_benefit_patient_and_payee() {
        for resource_type in ["Claim", "ExplanationOfBenefit"] {
            let resource = json!({
                "resourceType": resource_type,
                "patient": { "reference": "Patient/p1" },
                "payee": { "type": { "text": "subscriber" }, "party": { "reference": "Patient/p2" } },
                "provider": { "reference": "Patient/not-a-compartment-param" }
            });
            assert_eq!(compartments(resource), ids(&["p1", "p2"]), "{resource_type}");
            let paid_to_provider = json!({
                "resourceType": resource_type,
                "patient": { "reference": "Patient/p1" },
                "payee": { "party": { "reference": "Organization/o1" } }
            });
            assert_eq!(compartments(paid_to_provider), ids(&["p1"]), "{resource_type}");
        }
    }

    #[test]
    fn medication_request_subject() {
        let request = json!({
            "resourceType": "MedicationRequest",
            "subject": { "reference": "Patient/p1" },
            "requester": { "reference": "Patient/p2" },
            "medicationReference": { "reference": "Medication/m1" }
        });
        assert_eq!(compartments(request), ids(&["p1"]), "requester is not a compartment param");
    }

    #[test]
    fn provenance_patient_is_a_patient_target() {
        let provenance = json!({
            "resourceType": "Provenance",
            "target": [
                { "reference": "Observation/o1" },
                { "reference": "Patient/p1/_history/2" },
                { "reference": "Patient/p2" }
            ],
            "agent": [{ "who": { "reference": "Patient/p3" } }]
        });
        assert_eq!(compartments(provenance), ids(&["p1", "p2"]));
    }

    #[test]
    fn encounter_condition_procedure_diagnostic_report_subject() {
        for resource_type in ["Encounter", "Condition", "Procedure", "DiagnosticReport"] {
            let resource = json!({
                "resourceType": resource_type,
                "subject": { "reference": "Patient/p1" },
                "encounter": { "reference": "Encounter/e1" }
            });
            assert_eq!(compartments(resource), ids(&["p1"]), "{resource_type}");
        }
        let asserted = json!({
            "resourceType": "Condition",
            "subject": { "reference": "Patient/p1" },
            "asserter": { "reference": "Patient/p2" }
        });
        assert_eq!(compartments(asserted), ids(&["p1", "p2"]));
        let performed = json!({
            "resourceType": "Procedure",
            "subject": { "reference": "Patient/p1" },
            "performer": [{ "actor": { "reference": "Patient/p2" } }, { "actor": { "reference": "Practitioner/d" } }]
        });
        assert_eq!(compartments(performed), ids(&["p1", "p2"]));
    }

    #[test]
    fn group_member_entity() {
        let group = json!({
            "resourceType": "Group",
            "type": "person",
            "actual": true,
            "member": [
                { "entity": { "reference": "Patient/p2" } },
                { "entity": { "reference": "Patient/p1" }, "inactive": true },
                { "entity": { "reference": "Practitioner/dr" } },
                // Synthea's unresolved form: the loader must rewrite it to Patient/<id> first.
                { "entity": { "reference": "urn:uuid:3b1a9cb0-e3d3-4bce-8b20-864c3dc7e8c0" } }
            ]
        });
        assert_eq!(compartments(group), ids(&["p1", "p2"]));
    }

    #[test]
    fn patient_is_in_its_own_compartment_and_those_it_links_to() {
        let patient = json!({ "resourceType": "Patient", "id": "p1", "name": [{ "family": "Doe" }] });
        assert_eq!(compartments(patient), ids(&["p1"]));
        let linked = json!({
            "resourceType": "Patient",
            "id": "p1",
            "link": [
                { "other": { "reference": "Patient/p0" }, "type": "replaces" },
                { "other": { "reference": "RelatedPerson/r1" }, "type": "seealso" },
                { "other": { "reference": "Patient/p1" }, "type": "seealso" }
            ]
        });
        assert_eq!(compartments(linked), ids(&["p0", "p1"]));
        let no_id = json!({ "resourceType": "Patient" });
        assert!(compartments(no_id).is_empty());
        let bad_id = json!({ "resourceType": "Patient", "id": "not valid" });
        assert!(compartments(bad_id).is_empty());
    }

    #[test]
    fn coverage_policy_holder_subscriber_beneficiary_payor() {
        let coverage = json!({
            "resourceType": "Coverage",
            "policyHolder": { "reference": "Patient/holder" },
            "subscriber": { "reference": "Patient/subscriber" },
            "beneficiary": { "reference": "Patient/beneficiary" },
            "payor": [{ "reference": "Organization/ins" }, { "reference": "Patient/payor" }]
        });
        assert_eq!(compartments(coverage), ids(&["beneficiary", "holder", "payor", "subscriber"]));
    }

    #[test]
    fn care_team_subject_and_participant_member() {
        let care_team = json!({
            "resourceType": "CareTeam",
            "subject": { "reference": "Patient/p1" },
            "participant": [
                { "role": [{ "text": "patient" }], "member": { "reference": "Patient/p1" } },
                { "member": { "reference": "Practitioner/dr" } },
                { "member": { "reference": "Patient/p2" } }
            ]
        });
        assert_eq!(compartments(care_team), ids(&["p1", "p2"]));
    }

    #[test]
    fn document_reference_subject_and_author() {
        let document = json!({
            "resourceType": "DocumentReference",
            "subject": { "reference": "Patient/p1" },
            "author": [{ "reference": "Practitioner/dr" }, { "reference": "Patient/p2" }],
            "custodian": { "reference": "Patient/p3" }
        });
        assert_eq!(compartments(document), ids(&["p1", "p2"]));
    }

    #[test]
    fn immunization_patient() {
        let immunization = json!({
            "resourceType": "Immunization",
            "patient": { "reference": "Patient/p1" },
            "performer": [{ "actor": { "reference": "Patient/p2" } }]
        });
        assert_eq!(compartments(immunization), ids(&["p1"]), "performer is not a compartment param");
    }

    #[test]
    fn related_person_patient() {
        let related = json!({ "resourceType": "RelatedPerson", "patient": { "reference": "Patient/p1" } });
        assert_eq!(compartments(related), ids(&["p1"]));
    }

    #[test]
    fn audit_event_agent_and_entity() {
        let audit = json!({
            "resourceType": "AuditEvent",
            "agent": [{ "who": { "reference": "Patient/p1" } }, { "who": { "reference": "Device/d" } }],
            "entity": [{ "what": { "reference": "Patient/p2" } }]
        });
        assert_eq!(compartments(audit), ids(&["p1", "p2"]));
    }

    #[test]
    fn result_is_sorted_and_deduplicated() {
        let communication = json!({
            "resourceType": "Communication",
            "subject": { "reference": "Patient/b" },
            "sender": { "reference": "Patient/a" },
            "recipient": [{ "reference": "Patient/b" }, { "reference": "Patient/c" }, { "reference": "Patient/a" }]
        });
        assert_eq!(compartments(communication), ids(&["a", "b", "c"]));
    }

    #[test]
    fn malformed_shapes_are_ignored_not_panics() {
        let odd = [
            json!({ "resourceType": "Observation", "subject": "Patient/p1" }),
            json!({ "resourceType": "Observation", "subject": { "reference": 7 } }),
            json!({ "resourceType": "Observation", "subject": null }),
            json!({ "resourceType": "Observation", "subject": [[{ "reference": "Patient/p1" }]] }),
            json!({ "resourceType": "Claim", "payee": { "party": [] } }),
            json!("not an object"),
        ];
        let found: Vec<Vec<String>> = odd.iter().map(|r| patient_compartments("Observation", r)).collect();
        // Nested arrays are walked too (not valid FHIR, but harmless).
        assert_eq!(found[3], ids(&["p1"]));
        for (i, ids) in found.iter().enumerate().filter(|(i, _)| *i != 3) {
            assert!(ids.is_empty(), "case {i}: {ids:?}");
        }
    }
}
