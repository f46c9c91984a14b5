//! `_elements` (Bulk Data IG §export): resources reduced to the listed root elements, plus the
//! mandatory ones, `id` and `meta`, and tagged `SUBSETTED` (FHIR R4 search §_elements).
//!
//! Only exports with `_elements` parse and re-serialise their lines; the others stream the
//! stored bytes as they are.

use bulkhead_fhir::validation::top_level_elements;
use serde_json::{json, Map, Value};

/// The code system of the `SUBSETTED` tag.
pub const SUBSETTED_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

/// The checked `_elements` entries of one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElementSubset {
    entries: Vec<String>,
}

impl ElementSubset {
    /// `entries` as [`crate::params::ExportParams::elements`] holds them.
    pub fn new(entries: &[String]) -> ElementSubset {
        ElementSubset { entries: entries.to_vec() }
    }

    /// The listed elements that apply to `resource_type` (bare ones apply to every type);
    /// `None` when none do: the export then says nothing about the type, and its resources
    /// are exported whole.
    fn listed(&self, resource_type: &str) -> Option<Vec<&str>> {
        let listed: Vec<&str> = self
            .entries
            .iter()
            .filter_map(|entry| match entry.split_once('.') {
                Some((for_type, element)) => (for_type == resource_type).then_some(element),
                None => Some(entry.as_str()),
            })
            .collect();
        (!listed.is_empty()).then_some(listed)
    }

    /// Whether resources of `resource_type` are changed at all.
    pub fn applies_to(&self, resource_type: &str) -> bool {
        self.listed(resource_type).is_some()
    }

    /// Appends `line` (one stored resource, without its newline) reduced to the kept elements,
    /// then `\n`. A line that is not a JSON object is copied as it is.
    pub fn apply(&self, resource_type: &str, line: &[u8], out: &mut Vec<u8>) {
        let Some(listed) = self.listed(resource_type) else {
            return copy_line(line, out);
        };
        let Ok(Value::Object(resource)) = serde_json::from_slice::<Value>(line) else {
            return copy_line(line, out);
        };
        let required: Vec<&str> = top_level_elements(resource_type)
            .map(|elements| {
                elements.into_iter().filter(|element| element.required).map(|element| element.name).collect()
            })
            .unwrap_or_default();
        let keep = |key: &str| {
            // `_birthDate` (a primitive's extensions) goes with `birthDate`.
            let name = key.strip_prefix('_').unwrap_or(key);
            matches!(name, "resourceType" | "id" | "meta")
                || required.contains(&name)
                || listed.iter().any(|element| {
                    name == *element
                        || name
                            .strip_prefix(element)
                            .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase()))
                })
        };
        let mut kept: Map<String, Value> = resource.into_iter().filter(|(key, _)| keep(key.as_str())).collect();
        tag_subsetted(&mut kept);
        // Serialising a map of parsed JSON cannot fail.
        if serde_json::to_writer(&mut *out, &Value::Object(kept)).is_ok() {
            out.push(b'\n');
        }
    }
}

fn copy_line(line: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(line);
    out.push(b'\n');
}

/// Adds `meta.tag` SUBSETTED unless it is there already.
fn tag_subsetted(resource: &mut Map<String, Value>) {
    let meta = resource.entry("meta").or_insert_with(|| json!({}));
    let Value::Object(meta) = meta else { return };
    let tags = meta.entry("tag").or_insert_with(|| json!([]));
    let Value::Array(tags) = tags else { return };
    let tagged = tags.iter().any(|tag| tag["system"] == SUBSETTED_SYSTEM && tag["code"] == "SUBSETTED");
    if !tagged {
        tags.push(json!({"system": SUBSETTED_SYSTEM, "code": "SUBSETTED"}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(entries: &[&str], resource: Value) -> Value {
        let subset = ElementSubset::new(&entries.iter().map(|e| e.to_string()).collect::<Vec<_>>());
        let mut out = Vec::new();
        let resource_type = resource["resourceType"].as_str().unwrap().to_owned();
        subset.apply(&resource_type, resource.to_string().as_bytes(), &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        serde_json::from_slice(&out).unwrap()
    }

    fn observation() -> Value {
        // Parsed from text: `arbitrary_precision` keeps `1.50` as written.
        serde_json::from_str(
            r#"{"resourceType": "Observation", "id": "o", "meta": {"versionId": "1"}, "status": "final",
                "code": {"text": "x"}, "subject": {"reference": "Patient/p"}, "valueQuantity": {"value": 1.50},
                "note": [{"text": "n"}], "_status": {"extension": []}}"#,
        )
        .unwrap()
    }

    #[test]
    fn keeps_listed_mandatory_id_meta_and_tags() {
        let got = apply(&["Observation.subject"], observation());
        // status and code are mandatory (1..1) in R4 Observation.
        let keys: Vec<&str> = got.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["resourceType", "id", "meta", "status", "code", "subject", "_status"]);
        assert_eq!(got["meta"]["versionId"], "1");
        assert_eq!(got["meta"]["tag"], json!([{"system": SUBSETTED_SYSTEM, "code": "SUBSETTED"}]));
    }

    #[test]
    fn bare_elements_apply_to_every_type_and_choices_by_base_name() {
        let got = apply(&["value", "id"], observation());
        assert!(got.get("valueQuantity").is_some() && got.get("note").is_none());
        assert_eq!(got["valueQuantity"]["value"].to_string(), "1.50", "numbers keep their digits");
        let patient = apply(&["id"], json!({"resourceType": "Patient", "id": "p", "name": [{"family": "F"}]}));
        assert_eq!(
            patient,
            json!({"resourceType": "Patient", "id": "p",
            "meta": {"tag": [{"system": SUBSETTED_SYSTEM, "code": "SUBSETTED"}]}})
        );
    }

    #[test]
    fn types_not_named_are_exported_whole() {
        let patient = json!({"resourceType": "Patient", "id": "p", "name": [{"family": "F"}]});
        assert_eq!(apply(&["Observation.subject"], patient.clone()), patient);
    }
}
