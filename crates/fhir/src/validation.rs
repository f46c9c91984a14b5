//! Structural validation of R4 (4.0.1) resources in their JSON form.
//!
//! [`validate_resource`] checks a resource against the official StructureDefinitions, reduced
//! ahead of time by `gen/gen_validation_table.py` to the static table in `validation_table.rs`:
//! unknown elements, JSON types, arrays versus single values, primitive formats (the R4 regexes
//! and integer ranges), required elements (min 1), one choice (`value[x]`) at a time, `required`
//! bindings on `code` elements, contained resources (validated as resources, never nesting
//! `contained`), extensions (`url`, at most one `value[x]`, a value or nested extensions but not
//! both) and primitive extensions (`_birthDate`, `_given` arrays aligned with their values).
//!
//! Invariants (FHIRPath constraints such as `dom-3`), profiles, non-`required` bindings and
//! references to other resources are not checked here.
//!
//! A valid resource is checked without allocating: element paths for messages are kept as a
//! chain of borrowed steps on the stack and spelled out only when a problem is reported.

mod primitive;

use serde_json::Value;

use crate::json_view::{JsonType, JsonView};
use crate::IssueType;
pub use primitive::Primitive;
use primitive::PrimitiveError;

// Generated data; see the header of that file for how to regenerate it.
#[path = "validation_table.rs"]
mod table;

/// Most violations reported for one resource; the last one says that more were left out.
pub const MAX_VIOLATIONS: usize = 100;

/// One problem found in a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Where: a FHIRPath-style path of JSON property names and array indexes from the resource
    /// type, e.g. `Observation.status`, `Patient.name[0].given[1]`, `Observation.valueQuantity`,
    /// `Patient._birthDate.extension[0].url`.
    pub expression: String,
    /// The FHIR issue type: `structure` (unknown element, wrong JSON type, array/single mismatch,
    /// two choices), `required` (missing element), `value` (bad primitive format or range) or
    /// `code-invalid` (a code outside its required value set).
    pub code: IssueType,
    /// What is wrong, for a human.
    pub message: String,
}

/// Validates one resource (a JSON object with a `resourceType`) and returns every problem found,
/// at most [`MAX_VIOLATIONS`]; an empty list means the resource is structurally valid R4.
pub fn validate_resource(resource: &Value) -> Vec<Violation> {
    validate_json(resource)
}

/// [`validate_resource`] for any [`JsonView`] of the resource (a bulk load validates the tape of
/// each line): the same checks and the same messages.
pub fn validate_json<'a, J: JsonView<'a>>(resource: J) -> Vec<Violation> {
    let mut validator = Validator { violations: Vec::new() };
    validator.resource(resource, None, false);
    validator.violations
}

/// A top-level element of a resource type, as `_elements` needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopElement {
    /// The JSON property name (a choice is listed once per type: `valueQuantity`, `valueString`…).
    pub name: &'static str,
    /// min ≥ 1 (for a choice: one of its forms is required).
    pub required: bool,
    /// Part of a choice element (`value[x]`).
    pub choice: bool,
}

/// The top-level elements of an R4 resource type; `None` for an unknown type.
pub fn top_level_elements(resource_type: &str) -> Option<Vec<TopElement>> {
    let row = resource_row(resource_type)?;
    Some(
        row.elements()
            .iter()
            .map(|element| TopElement {
                name: element.name(),
                required: element.required != 0,
                choice: element.choice != 0,
            })
            .collect(),
    )
}

/// One element of a row (see the generated table).
#[derive(Debug, Clone, Copy)]
struct Element {
    /// Index into `NAMES`.
    name: u16,
    /// Length of the name in bytes (lookups compare it first).
    name_len: u8,
    /// A primitive (`Primitive` order), `RESOURCE_TYPE`, or `FIRST_ROW` + row.
    ty: u16,
    /// Index into `BINDINGS`, or `NB`.
    binding: u16,
    /// Max > 1: a JSON array.
    many: bool,
    /// Choice group (1-based) of an expanded `name[x]`, 0 for none.
    choice: u8,
    /// Required slot (1-based) when min ≥ 1, 0 for none; the expansions of one choice share it.
    required: u8,
}

/// Compact constructor for the generated table.
const fn el(name: u16, name_len: u8, ty: u16, binding: u16, many: u8, choice: u8, required: u8) -> Element {
    Element { name, name_len, ty, binding, many: many != 0, choice, required }
}

/// No binding.
const NB: u16 = u16::MAX;

/// Type number of "any resource".
const RESOURCE_TYPE: u16 = Primitive::ALL.len() as u16;

/// A resource type, data type or BackboneElement: its elements are
/// `ELEMENTS[start..start + len]`, sorted by name length and then name; `required` is the
/// number of required slots. Names are looked up in the row's open-addressing hash table,
/// `SLOTS[slots..slots + 2^slot_bits]` (load at most 1/2), so a lookup is one hash of four
/// bytes and usually one comparison.
struct Row {
    name: &'static str,
    start: u16,
    len: u16,
    required: u8,
    slots: u16,
    slot_bits: u8,
}

/// A required binding whose codes are known.
struct Binding {
    value_set: &'static str,
    codes: &'static [&'static str],
}

impl Row {
    fn elements(&self) -> &'static [Element] {
        let start = usize::from(self.start);
        &table::ELEMENTS[start..start + usize::from(self.len)]
    }

    fn find(&self, name: &str) -> Option<&'static Element> {
        if name.is_empty() {
            return None;
        }
        let elements = self.elements();
        let mask = (1usize << self.slot_bits) - 1;
        let slots = &table::SLOTS[usize::from(self.slots)..=usize::from(self.slots) + mask];
        let mut at = (slot_hash(name.as_bytes()) >> (32 - u32::from(self.slot_bits))) as usize;
        loop {
            let element = &elements[usize::from(slots[at]).checked_sub(1)?];
            if usize::from(element.name_len) == name.len() && element.name() == name {
                return Some(element);
            }
            at = (at + 1) & mask;
        }
    }
}

impl Element {
    fn name(&self) -> &'static str {
        table::NAMES[usize::from(self.name)]
    }

    fn kind(&self) -> Kind {
        match self.ty {
            ty if ty < RESOURCE_TYPE => Kind::Primitive(Primitive::ALL[usize::from(ty)]),
            RESOURCE_TYPE => Kind::Resource,
            ty => Kind::Row(&table::ROWS[usize::from(ty - table::FIRST_ROW)]),
        }
    }

    fn type_name(&self) -> &'static str {
        match self.kind() {
            Kind::Primitive(primitive) => primitive.name(),
            Kind::Resource => "Resource",
            Kind::Row(row) => row.name,
        }
    }

    /// `value[x]` for the expansion `valueQuantity`, the name itself otherwise.
    fn display_name(&self) -> String {
        let name = self.name();
        if self.choice == 0 {
            return name.to_owned();
        }
        let suffix = self.type_name();
        let base = name.len().saturating_sub(suffix.len());
        format!("{}[x]", &name[..base])
    }
}

enum Kind {
    Primitive(Primitive),
    Resource,
    Row(&'static Row),
}

/// The lookup hash of a (non-empty) element name: its length and four of its bytes, mixed
/// (the generator computes the same).
fn slot_hash(name: &[u8]) -> u32 {
    let n = name.len();
    let mut hash = n as u32;
    for index in [0, n / 2, n - 1, n * 3 / 4] {
        hash = hash.wrapping_mul(31).wrapping_add(u32::from(name[index]));
    }
    hash.wrapping_mul(0x9E37_79B1)
}

fn resource_row(resource_type: &str) -> Option<&'static Row> {
    // `RESOURCES` lists `RESOURCE_TYPES` (a test checks it).
    let index = crate::resource_type::resource_type_index(resource_type)?;
    Some(&table::ROWS[usize::from(table::RESOURCES[index].1)])
}

/// One step of an element path, linked to its parent; spelled out only for a report.
#[derive(Clone, Copy)]
struct Path<'a> {
    parent: Option<&'a Path<'a>>,
    step: Step<'a>,
}

#[derive(Clone, Copy)]
enum Step<'a> {
    /// The resource type at the root.
    Root(&'a str),
    Field(&'a str),
    Index(usize),
}

impl<'a> Path<'a> {
    fn root(resource_type: &'a str) -> Path<'a> {
        Path { parent: None, step: Step::Root(resource_type) }
    }

    fn field(&'a self, name: &'a str) -> Path<'a> {
        Path { parent: Some(self), step: Step::Field(name) }
    }

    fn index(&'a self, index: usize) -> Path<'a> {
        Path { parent: Some(self), step: Step::Index(index) }
    }

    fn render(&self) -> String {
        let mut steps = vec![self.step];
        let mut current = self.parent;
        while let Some(path) = current {
            steps.push(path.step);
            current = path.parent;
        }
        let mut out = String::new();
        for step in steps.into_iter().rev() {
            match step {
                Step::Root(name) => out.push_str(name),
                Step::Field(name) if out.is_empty() => out.push_str(name),
                Step::Field(name) => {
                    out.push('.');
                    out.push_str(name);
                }
                Step::Index(index) => {
                    out.push('[');
                    out.push_str(&index.to_string());
                    out.push(']');
                }
            }
        }
        out
    }
}

struct Validator {
    violations: Vec<Violation>,
}

impl Validator {
    fn full(&self) -> bool {
        self.violations.len() >= MAX_VIOLATIONS
    }

    fn report(&mut self, path: &Path, code: IssueType, message: String) {
        match self.violations.len() {
            n if n + 1 < MAX_VIOLATIONS => {
                self.violations.push(Violation { expression: path.render(), code, message });
            }
            n if n + 1 == MAX_VIOLATIONS => self.violations.push(Violation {
                expression: path.render(),
                code: IssueType::TooCostly,
                message: format!("more problems were found; only the first {} are reported", MAX_VIOLATIONS - 1),
            }),
            _ => {}
        }
    }

    /// A resource at the root (`at` is None) or inside another (`contained`, `Bundle.entry.resource`).
    fn resource<'a, J: JsonView<'a>>(&mut self, value: J, at: Option<&Path>, contained: bool) {
        let unnamed = Path::root("");
        let here = at.unwrap_or(&unnamed);
        if !value.is_object() {
            let found = primitive::json_type_name(value);
            self.report(here, IssueType::Structure, format!("a resource must be a JSON object, not {found}"));
            return;
        }
        let object = value;
        let resource_type = match object.get("resourceType") {
            Some(name) if name.json_type() == JsonType::String => name.as_str().unwrap_or_default(),
            Some(other) => {
                let found = primitive::json_type_name(other);
                let message = format!("resourceType must be a string naming an R4 resource type, not {found}");
                self.report(&here.field("resourceType"), IssueType::Structure, message);
                return;
            }
            None => {
                let message = "resourceType is missing".to_owned();
                self.report(&here.field("resourceType"), IssueType::Required, message);
                return;
            }
        };
        let Some(row) = resource_row(resource_type) else {
            let message = format!("'{resource_type}' is not an R4 resource type");
            self.report(&here.field("resourceType"), IssueType::Value, message);
            return;
        };
        match at {
            Some(path) => self.object(object, row, path, ObjectKind::Resource { contained }),
            None => self.object(object, row, &Path::root(resource_type), ObjectKind::Resource { contained }),
        }
    }

    /// The properties of one JSON object whose type is `row`.
    fn object<'a, J: JsonView<'a>>(&mut self, object: J, row: &'static Row, path: &Path, kind: ObjectKind) {
        let mut choices_seen = 0u32;
        let mut required_seen = 0u64;
        for (key, value) in object.entries() {
            if self.full() {
                return;
            }
            if key == "resourceType" && matches!(kind, ObjectKind::Resource { .. }) {
                continue;
            }
            let (name, underscore) = match key.strip_prefix('_') {
                Some(name) => (name, true),
                None => (key, false),
            };
            let Some(element) = row.find(name) else {
                let message = format!("unknown element '{key}' in {}", row.name);
                self.report(&path.field(key), IssueType::Structure, message);
                continue;
            };
            if underscore && !matches!(element.kind(), Kind::Primitive(_)) {
                let message = format!("'{key}' is not allowed: '{name}' is not a primitive element");
                self.report(&path.field(key), IssueType::Structure, message);
                continue;
            }
            if element.choice != 0 && !(underscore && object.get(name).is_some()) {
                let bit = 1u32 << (element.choice - 1);
                if choices_seen & bit != 0 {
                    let message = self.two_choices(object, row, element, key);
                    self.report(&path.field(key), IssueType::Structure, message);
                    continue;
                }
                choices_seen |= bit;
            }
            if element.required != 0 {
                required_seen |= 1 << (element.required - 1);
            }
            if element.ty == RESOURCE_TYPE && kind == (ObjectKind::Resource { contained: true }) && key == "contained" {
                let message = "a contained resource cannot contain resources".to_owned();
                self.report(&path.field(key), IssueType::Structure, message);
                continue;
            }
            self.property(object, element, key, value, &path.field(key), underscore);
        }
        let all_required = (1u64 << row.required) - 1;
        if required_seen != all_required {
            self.missing(row, required_seen, path);
        }
        if std::ptr::eq(row, &table::ROWS[usize::from(table::EXTENSION_ROW)])
            && choices_seen != 0
            && object.get("extension").is_some_and(|nested| nested.array_len().is_none_or(|n| n != 0))
        {
            let message = "an extension has either a value[x] or nested extensions, not both (ext-1)".to_owned();
            self.report(path, IssueType::Structure, message);
        }
    }

    fn two_choices<'a, J: JsonView<'a>>(&self, object: J, row: &Row, element: &Element, key: &str) -> String {
        let other = object
            .entries()
            .map(|(other, _)| other)
            .find(|other| {
                *other != key
                    && row.find(other).is_some_and(|e| e.choice == element.choice && !std::ptr::eq(e, element))
            })
            .unwrap_or("another");
        format!("only one of {} may be present, but both '{other}' and '{key}' are", element.display_name())
    }

    fn missing(&mut self, row: &Row, required_seen: u64, path: &Path) {
        for slot in 0..row.required {
            if required_seen & (1 << slot) != 0 {
                continue;
            }
            let Some(element) = row.elements().iter().find(|e| e.required == slot + 1) else {
                continue;
            };
            let name = element.display_name();
            let message = format!("{} requires '{name}' (min 1), which is missing", row.name);
            self.report(&path.field(element.name()), IssueType::Required, message);
        }
    }

    /// One property's value: an array or a single value, as the element's max says.
    #[allow(clippy::too_many_arguments)]
    fn property<'a, J: JsonView<'a>>(
        &mut self,
        object: J,
        element: &Element,
        key: &str,
        value: J,
        path: &Path,
        underscore: bool,
    ) {
        match (value.array_len(), element.many) {
            (Some(items), true) => {
                // Primitive arrays and their `_name` twin are aligned, with nulls for the gaps.
                let twin = underscore.then(|| object.get(&key[1..])).flatten().and_then(JsonView::array_len);
                if let Some(values) = twin {
                    if values != items {
                        let message =
                            format!("'{key}' has {items} entries but '{}' has {values}; they must align", &key[1..]);
                        self.report(path, IssueType::Structure, message);
                    }
                }
                for (index, item) in value.items().enumerate() {
                    if item.is_null() && self.null_allowed(object, element, key, index, underscore) {
                        continue;
                    }
                    self.single(element, key, item, &path.index(index), underscore);
                }
            }
            (Some(_), false) => {
                let message = format!("'{key}' takes a single value (max 1), not an array");
                self.report(path, IssueType::Structure, message);
            }
            (_, true) => {
                let message = format!("'{key}' must be an array (max *), not {}", primitive::json_type_name(value));
                self.report(path, IssueType::Structure, message);
            }
            (_, false) => self.single(element, key, value, path, underscore),
        }
    }

    /// A null in a primitive array stands for "no value" or "no extension" at that index; the
    /// value array may hold one only where the `_name` array has an extension, and vice versa.
    fn null_allowed<'a, J: JsonView<'a>>(
        &self,
        object: J,
        element: &Element,
        key: &str,
        index: usize,
        underscore: bool,
    ) -> bool {
        if !matches!(element.kind(), Kind::Primitive(_)) {
            return false;
        }
        let twin = if underscore { object.get(&key[1..]) } else { object.get(&format!("_{key}")) };
        match twin {
            Some(twins) if twins.is_array() => twins.items().nth(index).is_some_and(|t| !t.is_null()),
            // `_given` alone: nulls mark entries without extensions.
            None => underscore,
            Some(_) => false,
        }
    }

    fn single<'a, J: JsonView<'a>>(&mut self, element: &Element, key: &str, value: J, path: &Path, underscore: bool) {
        if underscore {
            let element_row = &table::ROWS[usize::from(table::ELEMENT_ROW)];
            match value {
                object if object.is_object() => self.object(object, element_row, path, ObjectKind::Element),
                other => {
                    let found = primitive::json_type_name(other);
                    let message = format!("'{key}' must be a JSON object (id, extension), not {found}");
                    self.report(path, IssueType::Structure, message);
                }
            }
            return;
        }
        match element.kind() {
            Kind::Primitive(primitive) => self.primitive(element, primitive, key, value, path),
            Kind::Resource => self.resource(value, Some(path), key == "contained"),
            Kind::Row(row) => match value {
                object if object.is_object() => self.object(object, row, path, ObjectKind::Element),
                other => {
                    let found = primitive::json_type_name(other);
                    let message = format!("'{key}' must be a JSON object ({}), not {found}", row.name);
                    self.report(path, IssueType::Structure, message);
                }
            },
        }
    }

    fn primitive<'a, J: JsonView<'a>>(
        &mut self,
        element: &Element,
        primitive: Primitive,
        key: &str,
        value: J,
        path: &Path,
    ) {
        let name = primitive.name();
        match primitive::check(primitive, value) {
            Ok(()) => {}
            Err(PrimitiveError::JsonType(expected)) => {
                let found = primitive::json_type_name(value);
                let message = format!("'{key}' is a {name} and must be {expected}, not {found}");
                return self.report(path, IssueType::Structure, message);
            }
            Err(PrimitiveError::Format(expected)) => {
                let message = format!("{} is not {expected}", shown(value));
                return self.report(path, IssueType::Value, message);
            }
        }
        if element.binding == NB {
            return;
        }
        let binding = &table::BINDINGS[usize::from(element.binding)];
        let Some(code) = value.as_str() else {
            return;
        };
        if binding.codes.binary_search(&code).is_err() {
            let allowed = if binding.codes.len() <= 12 {
                binding.codes.join(" | ")
            } else {
                format!("{} codes", binding.codes.len())
            };
            let message = format!("'{code}' is not a code of the required value set {} ({allowed})", binding.value_set);
            self.report(path, IssueType::CodeInvalid, message);
        }
    }
}

/// A value quoted for a message, cut short if long.
fn shown<'a, J: JsonView<'a>>(value: J) -> String {
    let text = match (value.as_str(), value.number_text()) {
        (Some(text), _) => format!("'{text}'"),
        (_, Some(number)) => number.to_owned(),
        _ => value.to_value().to_string(),
    };
    match text.char_indices().nth(80) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ObjectKind {
    /// A resource; `contained` when it sits in another's `contained`.
    Resource { contained: bool },
    /// A data type, BackboneElement or primitive extension object.
    Element,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primitive_order_matches_the_generated_table() {
        let names: Vec<&str> = Primitive::ALL.iter().map(|p| p.name()).collect();
        assert_eq!(names, table::PRIMITIVE_NAMES);
        assert_eq!(table::FIRST_ROW, RESOURCE_TYPE + 1);
    }

    /// The server's list of resource types (routes, `_type`, references) and the types the
    /// official StructureDefinitions define are the same list.
    #[test]
    fn the_resource_types_are_those_of_the_definitions() {
        let defined: Vec<&str> = table::RESOURCES.iter().map(|(name, _)| *name).collect();
        assert_eq!(defined, crate::RESOURCE_TYPES);
    }

    #[test]
    fn table_is_sorted_for_binary_search() {
        assert!(table::NAMES.windows(2).all(|w| w[0] < w[1]));
        assert!(table::RESOURCES.windows(2).all(|w| w[0].0 < w[1].0));
        for row in table::ROWS {
            let key = |e: &Element| (e.name().len(), e.name());
            assert!(row.elements().windows(2).all(|w| key(&w[0]) < key(&w[1])), "{}", row.name);
            assert!(row.elements().iter().all(|e| usize::from(e.name_len) == e.name().len()), "{}", row.name);
        }
        for binding in table::BINDINGS {
            assert!(binding.codes.windows(2).all(|w| w[0] < w[1]), "{}", binding.value_set);
        }
        for row in table::ROWS {
            for element in row.elements() {
                assert!(std::ptr::eq(row.find(element.name()).unwrap(), element), "{}.{}", row.name, element.name());
            }
            assert!(row.find("noSuchElement").is_none() && row.find("").is_none());
        }
        assert_eq!(table::ROWS[usize::from(table::EXTENSION_ROW)].name, "Extension");
        assert_eq!(table::ROWS[usize::from(table::ELEMENT_ROW)].name, "Element");
    }

    #[test]
    fn every_r4_resource_type_has_a_row() {
        for resource_type in crate::RESOURCE_TYPES {
            assert!(resource_row(resource_type).is_some(), "{resource_type}");
        }
    }
}
