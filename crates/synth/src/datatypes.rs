//! FHIR datatypes (Coding, CodeableConcept, Reference, Quantity, ...) written with [`JsonWriter`].

use crate::calendar::Moment;
use crate::json::JsonWriter;
use crate::measures::Measure;
use crate::rng::Id;
use crate::terminology::{Code, UCUM};

/// A reference target: resource type, id, and whether it lives in the same patient Bundle.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ref {
    pub(crate) resource_type: &'static str,
    pub(crate) id: Id,
    /// True for the patient's own resources; false for shared ones (Practitioner, ...), which
    /// are always written as `Type/id` because they live in the shared Bundle.
    pub(crate) local: bool,
}

impl JsonWriter {
    /// `"k":{"reference":"Type/id"}` (or `urn:uuid:id` for a local target inside a Bundle).
    pub(crate) fn reference(&mut self, k: &str, target: Ref) {
        self.key(k);
        self.reference_value(target, None);
    }

    /// A Reference object as a value (array element), with an optional display.
    pub(crate) fn reference_value(&mut self, target: Ref, display: Option<&str>) {
        self.begin_obj();
        self.key("reference");
        if target.local && self.local_refs_as_urn {
            self.str_parts(&["urn:uuid:", target.id.as_str()]);
        } else {
            self.str_parts(&[target.resource_type, "/", target.id.as_str()]);
        }
        if let Some(d) = display {
            self.field_str("display", d);
        }
        self.end_obj();
    }

    /// A Coding object as a value.
    pub(crate) fn coding_value(&mut self, code: &Code) {
        self.begin_obj();
        self.field_str("system", code.system);
        self.field_str("code", code.code);
        self.field_str("display", code.display);
        self.end_obj();
    }

    /// `"k":{"coding":[...],"text":display}`.
    pub(crate) fn concept(&mut self, k: &str, code: &Code) {
        self.key(k);
        self.concept_value(code);
    }

    pub(crate) fn concept_value(&mut self, code: &Code) {
        self.begin_obj();
        self.field_arr("coding");
        self.coding_value(code);
        self.end_arr();
        self.field_str("text", code.display);
        self.end_obj();
    }

    /// `"k":[{"coding":[...]}]` for the many 0..* CodeableConcept elements that carry one code.
    pub(crate) fn concept_list(&mut self, k: &str, code: &Code) {
        self.field_arr(k);
        self.concept_value(code);
        self.end_arr();
    }

    /// A status-like CodeableConcept whose coding has no display (clinicalStatus etc.).
    pub(crate) fn status_concept(&mut self, k: &str, system: &str, code: &str) {
        self.field_obj(k);
        self.field_arr("coding");
        self.begin_obj();
        self.field_str("system", system);
        self.field_str("code", code);
        self.end_obj();
        self.end_arr();
        self.end_obj();
    }

    /// A UCUM Quantity value (`value`, `unit`, `system`, `code`), as the vital-signs profile
    /// requires.
    pub(crate) fn ucum_quantity(&mut self, k: &str, value: f64, measure: &Measure) {
        self.field_obj(k);
        self.key("value");
        self.decimal(value, measure.places);
        self.field_str("unit", measure.unit);
        self.field_str("system", UCUM);
        self.field_str("code", measure.unit);
        self.end_obj();
    }

    /// A USD Money value.
    pub(crate) fn money(&mut self, k: &str, cents: u64) {
        self.field_obj(k);
        self.key("value");
        self.decimal(cents as f64 / 100.0, 2);
        self.field_str("currency", "USD");
        self.end_obj();
    }

    pub(crate) fn field_date(&mut self, k: &str, at: Moment) {
        self.key(k);
        self.str(at.date().as_str());
    }

    pub(crate) fn field_date_time(&mut self, k: &str, at: Moment) {
        self.key(k);
        self.str(at.date_time().as_str());
    }

    pub(crate) fn period(&mut self, k: &str, start: Moment, end: Option<Moment>) {
        self.field_obj(k);
        self.field_date_time("start", start);
        if let Some(end) = end {
            self.field_date_time("end", end);
        }
        self.end_obj();
    }

    /// An Identifier with a system.
    pub(crate) fn identifier_value(&mut self, system: &str, value: &str) {
        self.begin_obj();
        self.field_str("system", system);
        self.field_str("value", value);
        self.end_obj();
    }
}
