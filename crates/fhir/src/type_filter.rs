//! `_typeFilter` (Bulk Data IG §export, query parameters): FHIR search queries that narrow one
//! resource type of an export, compiled at kick-off and evaluated on each resource's stored JSON.
//!
//! Several queries for one type are OR'ed; the criteria of one query are AND'ed; the values of
//! one criterion (`category=laboratory,vital-signs`) are OR'ed. Supported, for every R4 search
//! parameter of these kinds (the generated [`SEARCH_PARAMS`] table, from the official
//! SearchParameter definitions):
//! - token: `code`, `system|code`, `|code` (no system), `system|`; on CodeableConcept, Coding,
//!   Identifier, code/string/id/uri and boolean elements;
//! - reference: `Type/id`, a bare `id`, or an absolute URL ending in `Type/id`;
//! - date: a date or dateTime of any precision, with the prefixes `eq` (default), `ne`, `gt`,
//!   `lt`, `ge`, `le`, `sa` and `eb`, compared as ranges (FHIR search §date), on date, dateTime,
//!   instant and Period elements;
//! - string: the default (case-insensitive prefix) and `:exact` (exact match), on string
//!   elements and the string parts of HumanName and Address;
//! - `_id` and `_lastUpdated` on every type.
//!
//! Anything else (other parameter kinds, modifiers, chained parameters, `ap`, `_count`…) is
//! refused at kick-off, so a filter is never silently half-applied.

use serde_json::Value;

use crate::instant::{parse_range, Micros};
use crate::resource_type::is_resource_type;

#[path = "search_param_table.rs"]
mod table;

pub use table::SEARCH_PARAMS;

/// A search parameter's kind, for the kinds `_typeFilter` supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Token,
    Reference,
    Date,
    String,
}

/// `(base type, code, kind, [(element path, reference target type or "")])`.
pub type ParamRow = (&'static str, &'static str, ParamKind, &'static [(&'static [&'static str], &'static str)]);

/// Why a `_typeFilter` query was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// Malformed (no `?`, an unknown type, an empty value, a bad date).
    #[error("{0}")]
    Invalid(String),
    /// Well-formed but not supported here (an unknown or unsupported parameter, a modifier).
    #[error("{0}")]
    NotSupported(String),
}

/// The search parameter `code` of `resource_type`, if the table has it (type-specific first,
/// then the ones every resource has).
pub fn search_param(resource_type: &str, code: &str) -> Option<&'static ParamRow> {
    let find = |base: &str| {
        SEARCH_PARAMS.binary_search_by(|row| (row.0, row.1).cmp(&(base, code))).ok().map(|index| &SEARCH_PARAMS[index])
    };
    find(resource_type).or_else(|| find("Resource"))
}

/// Splits one `_typeFilter` value into its queries. Queries are separated by commas, but commas
/// also separate a criterion's values (`Observation?category=a,b`), and clients encode either
/// way: a comma starts a new query only when what follows is `ResourceType?`.
pub fn split_type_filter(value: &str) -> Vec<&str> {
    let mut queries = Vec::new();
    let mut start = 0;
    for (at, _) in value.match_indices(',') {
        let rest = &value[at + 1..];
        let starts_query = rest.split_once('?').is_some_and(|(head, _)| is_resource_type(head.trim()));
        if starts_query {
            queries.push(value[start..at].trim());
            start = at + 1;
        }
    }
    queries.push(value[start..].trim());
    queries
}

/// One compiled `_typeFilter` query: `resource_type?criterion&criterion…`.
#[derive(Debug, Clone, PartialEq)]
pub struct TypeFilter {
    pub resource_type: String,
    /// The query as the client sent it (decoded once), kept to reproduce the filter later.
    pub text: String,
    criteria: Vec<Criterion>,
}

#[derive(Debug, Clone, PartialEq)]
struct Criterion {
    row: &'static ParamRow,
    /// `:exact` on a string parameter.
    exact: bool,
    /// OR'ed.
    values: Vec<Wanted>,
}

#[derive(Debug, Clone, PartialEq)]
enum Wanted {
    /// `system` (`None`: any; `Some("")`: none) and `code` (`None`: any).
    Token {
        system: Option<String>,
        code: Option<String>,
    },
    /// `Type/id` or a bare id.
    Reference {
        resource_type: Option<String>,
        id: String,
    },
    Date {
        prefix: Prefix,
        start: Micros,
        end: Micros,
    },
    /// Lowercased unless exact.
    String(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
}

impl TypeFilter {
    /// Compiles one query (`Observation?category=laboratory&date=ge2020-01-01`). Its parameter
    /// values may still be percent-encoded; `+` in a date is taken as an offset sign.
    pub fn parse(query: &str) -> Result<TypeFilter, FilterError> {
        let query = query.trim();
        let Some((resource_type, criteria_text)) = query.split_once('?') else {
            return Err(FilterError::Invalid(format!("'{}' is not of the form Type?search", shorten(query))));
        };
        if !is_resource_type(resource_type) {
            return Err(FilterError::Invalid(format!("'{}' is not an R4 resource type", shorten(resource_type))));
        }
        let mut criteria = Vec::new();
        // Not `form_urlencoded` decoding of `+`: a literal `+` is a date's offset sign here.
        for part in criteria_text.split('&').filter(|part| !part.is_empty()) {
            let (name, value) = part.split_once('=').unwrap_or((part, ""));
            let name = percent_decode(name);
            let value = percent_decode(value);
            criteria.push(Criterion::parse(resource_type, &name, &value)?);
        }
        if criteria.is_empty() {
            return Err(FilterError::Invalid(format!("'{}' has no search criteria", shorten(query))));
        }
        Ok(TypeFilter { resource_type: resource_type.to_owned(), text: query.to_owned(), criteria })
    }

    /// True when `resource` (of this filter's type) matches every criterion.
    pub fn matches(&self, resource: &Value) -> bool {
        self.criteria.iter().all(|criterion| criterion.matches(resource))
    }
}

/// The `_typeFilter` queries of one export, by type: a type with none is not filtered; a type
/// with several keeps a resource matching any of them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TypeFilters {
    filters: Vec<TypeFilter>,
}

impl TypeFilters {
    pub fn new(filters: Vec<TypeFilter>) -> TypeFilters {
        TypeFilters { filters }
    }

    /// Compiles queries already accepted once (an export's stored record).
    pub fn parse_all<'a>(queries: impl IntoIterator<Item = &'a str>) -> Result<TypeFilters, FilterError> {
        Ok(TypeFilters { filters: queries.into_iter().map(TypeFilter::parse).collect::<Result<_, _>>()? })
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// Whether resources of `resource_type` are filtered at all.
    pub fn filters(&self, resource_type: &str) -> bool {
        self.filters.iter().any(|filter| filter.resource_type == resource_type)
    }

    /// Whether a resource of `resource_type` with this stored JSON is selected. A body that is
    /// not JSON matches nothing filtered.
    pub fn matches_json(&self, resource_type: &str, body: &[u8]) -> bool {
        if !self.filters(resource_type) {
            return true;
        }
        let Ok(resource) = serde_json::from_slice::<Value>(body) else { return false };
        self.matches(resource_type, &resource)
    }

    pub fn matches(&self, resource_type: &str, resource: &Value) -> bool {
        let mut for_type = self.filters.iter().filter(|filter| filter.resource_type == resource_type).peekable();
        for_type.peek().is_none() || for_type.any(|filter| filter.matches(resource))
    }

    /// The queries as sent, in order.
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        self.filters.iter().map(|filter| filter.text.as_str())
    }
}

impl Criterion {
    fn parse(resource_type: &str, name: &str, value: &str) -> Result<Criterion, FilterError> {
        let (code, modifier) = match name.split_once(':') {
            Some((code, modifier)) => (code, Some(modifier)),
            None => (name, None),
        };
        let Some(row) = search_param(resource_type, code) else {
            return Err(FilterError::NotSupported(format!(
                "search parameter '{}' is not supported for {resource_type} in _typeFilter",
                shorten(code)
            )));
        };
        let exact = match modifier {
            None => false,
            Some("exact") if row.2 == ParamKind::String => true,
            Some(other) => {
                return Err(FilterError::NotSupported(format!(
                    "modifier ':{}' on '{code}' is not supported in _typeFilter",
                    shorten(other)
                )))
            }
        };
        let values = split_values(value)
            .into_iter()
            .map(|one| Wanted::parse(row.2, &one, exact, code))
            .collect::<Result<Vec<_>, _>>()?;
        if values.is_empty() {
            return Err(FilterError::Invalid(format!("search parameter '{code}' has an empty value")));
        }
        Ok(Criterion { row, exact, values })
    }

    fn matches(&self, resource: &Value) -> bool {
        let (_, _, kind, paths) = *self.row;
        let mut found = false;
        for (path, target) in paths {
            visit(resource, path, &mut |element| {
                if !found && self.values.iter().any(|wanted| wanted.matches(kind, element, target, self.exact)) {
                    found = true;
                }
            });
        }
        // `ne` must hold for the element found; with no element at all, FHIR servers differ:
        // a missing value never matches here.
        found
    }
}

/// Splits on commas not escaped with `\` (FHIR search §escaping) and unescapes `\,`, `\|`, `\$`
/// and `\\`.
fn split_values(value: &str) -> Vec<String> {
    let mut values = vec![String::new()];
    let mut chars = value.chars();
    while let Some(ch) = chars.next() {
        match ch {
            '\\' => match chars.next() {
                Some(next @ (',' | '$' | '\\')) => values.last_mut().expect("never empty").push(next),
                // `\|` stays escaped: token splitting needs to see it.
                Some(next) => {
                    let last = values.last_mut().expect("never empty");
                    last.push('\\');
                    last.push(next);
                }
                None => values.last_mut().expect("never empty").push('\\'),
            },
            ',' => values.push(String::new()),
            other => values.last_mut().expect("never empty").push(other),
        }
    }
    values.into_iter().filter(|value| !value.is_empty()).collect()
}

impl Wanted {
    fn parse(kind: ParamKind, value: &str, exact: bool, code: &str) -> Result<Wanted, FilterError> {
        let invalid =
            |why: &str| FilterError::Invalid(format!("'{}' is not a valid {code} value: {why}", shorten(value)));
        match kind {
            ParamKind::Token => {
                let (system, code) = match split_unescaped_bar(value) {
                    Some((system, code)) => (Some(system), code),
                    None => (None, value.to_owned()),
                };
                let code = (!code.is_empty()).then_some(code);
                if system.as_deref().is_some_and(str::is_empty) && code.is_none() {
                    return Err(invalid("'|' alone"));
                }
                Ok(Wanted::Token { system, code })
            }
            ParamKind::Reference => {
                let value = value.trim();
                match value.rsplit_once('/') {
                    Some((head, id)) if !id.is_empty() => {
                        let resource_type = head.rsplit('/').next().unwrap_or(head);
                        if !is_resource_type(resource_type) {
                            return Err(invalid("expected Type/id or an id"));
                        }
                        Ok(Wanted::Reference { resource_type: Some(resource_type.to_owned()), id: id.to_owned() })
                    }
                    Some(_) => Err(invalid("expected Type/id or an id")),
                    None => Ok(Wanted::Reference { resource_type: None, id: value.to_owned() }),
                }
            }
            ParamKind::Date => {
                let (prefix, rest) = date_prefix(value);
                let Some(prefix) = prefix else {
                    if value.starts_with("ap") {
                        return Err(FilterError::NotSupported(format!(
                            "date prefix 'ap' of '{}' is not supported (use eq, ne, gt, lt, ge, le, sa or eb)",
                            shorten(value)
                        )));
                    }
                    return Err(invalid("expected an optional prefix and a FHIR date or dateTime"));
                };
                // Form decoding may have turned an offset's `+` into a space.
                let repaired = rest.trim().replace(' ', "+");
                let range = parse_range(&repaired).map_err(|_| invalid("expected a FHIR date or dateTime"))?;
                Ok(Wanted::Date { prefix, start: range.start, end: range.end })
            }
            ParamKind::String => Ok(Wanted::String(if exact { value.to_owned() } else { fold(value) })),
        }
    }

    fn matches(&self, kind: ParamKind, element: &Value, target: &str, exact: bool) -> bool {
        match (self, kind) {
            (Wanted::Token { system, code }, ParamKind::Token) => {
                token_matches(element, system.as_deref(), code.as_deref())
            }
            (Wanted::Reference { resource_type, id }, ParamKind::Reference) => {
                let Some(reference) = element.get("reference").and_then(Value::as_str) else { return false };
                let Some((found_type, found_id)) = crate::compartment::parse_reference(reference) else { return false };
                found_id == id
                    && resource_type.as_deref().is_none_or(|wanted| wanted == found_type)
                    && (target.is_empty() || target == found_type)
            }
            (Wanted::Date { prefix, start, end }, ParamKind::Date) => {
                date_range(element).is_some_and(|(lo, hi)| prefix.holds((*start, *end), (lo, hi)))
            }
            (Wanted::String(wanted), ParamKind::String) => {
                let mut found = false;
                strings(element, &mut |text| {
                    found |= if exact { text == wanted } else { fold(text).starts_with(wanted.as_str()) };
                });
                found
            }
            _ => false,
        }
    }
}

fn split_unescaped_bar(value: &str) -> Option<(String, String)> {
    let mut escaped = false;
    for (at, ch) in value.char_indices() {
        match ch {
            '\\' if !escaped => escaped = true,
            '|' if !escaped => return Some((unescape(&value[..at]), unescape(&value[at + 1..]))),
            _ => escaped = false,
        }
    }
    None
}

fn unescape(value: &str) -> String {
    value.replace("\\|", "|")
}

fn date_prefix(value: &str) -> (Option<Prefix>, &str) {
    let prefixes = [
        ("eq", Prefix::Eq),
        ("ne", Prefix::Ne),
        ("gt", Prefix::Gt),
        ("lt", Prefix::Lt),
        ("ge", Prefix::Ge),
        ("le", Prefix::Le),
        ("sa", Prefix::Sa),
        ("eb", Prefix::Eb),
    ];
    if value.starts_with(|ch: char| ch.is_ascii_digit()) {
        return (Some(Prefix::Eq), value);
    }
    for (text, prefix) in prefixes {
        if let Some(rest) = value.strip_prefix(text) {
            return (Some(prefix), rest);
        }
    }
    (None, value)
}

impl Prefix {
    /// FHIR search §date: `search` and `value` are half-open ranges `[start, end)`.
    fn holds(self, search: (Micros, Micros), value: (Micros, Micros)) -> bool {
        let contained = search.0 <= value.0 && value.1 <= search.1;
        match self {
            Prefix::Eq => contained,
            Prefix::Ne => !contained,
            Prefix::Gt => value.1 > search.1,
            Prefix::Lt => value.0 < search.0,
            Prefix::Ge => value.1 > search.1 || contained,
            Prefix::Le => value.0 < search.0 || contained,
            Prefix::Sa => value.0 >= search.1,
            Prefix::Eb => value.1 <= search.0,
        }
    }
}

/// The range a date-like element covers: a date/dateTime/instant string, or a Period (an open
/// end is unbounded).
fn date_range(element: &Value) -> Option<(Micros, Micros)> {
    match element {
        Value::String(text) => parse_range(text).ok().map(|range| (range.start, range.end)),
        Value::Object(period) => {
            let start = period.get("start").and_then(Value::as_str);
            let end = period.get("end").and_then(Value::as_str);
            if start.is_none() && end.is_none() {
                return None;
            }
            let lo = match start {
                Some(text) => parse_range(text).ok()?.start,
                None => Micros::MIN,
            };
            let hi = match end {
                Some(text) => parse_range(text).ok()?.end,
                None => Micros::MAX,
            };
            Some((lo, hi))
        }
        _ => None,
    }
}

fn token_matches(element: &Value, system: Option<&str>, code: Option<&str>) -> bool {
    let pair_matches = |found_system: Option<&str>, found_code: Option<&str>| {
        let system_ok = match system {
            None => true,
            Some("") => found_system.is_none(),
            Some(wanted) => found_system == Some(wanted),
        };
        system_ok && code.is_none_or(|wanted| found_code == Some(wanted))
    };
    match element {
        // code, string, id, uri: no system.
        Value::String(text) => pair_matches(None, Some(text)),
        Value::Bool(flag) => pair_matches(None, Some(if *flag { "true" } else { "false" })),
        Value::Object(object) => {
            if let Some(codings) = object.get("coding").and_then(Value::as_array) {
                // CodeableConcept
                return codings.iter().any(|coding| {
                    pair_matches(
                        coding.get("system").and_then(Value::as_str),
                        coding.get("code").and_then(Value::as_str),
                    )
                });
            }
            let system_of = object.get("system").and_then(Value::as_str);
            if let Some(found) = object.get("code").and_then(Value::as_str) {
                return pair_matches(system_of, Some(found)); // Coding
            }
            if let Some(found) = object.get("value").and_then(Value::as_str) {
                return pair_matches(system_of, Some(found)); // Identifier, ContactPoint
            }
            false
        }
        _ => false,
    }
}

/// The strings a string parameter compares with: a string element itself, or the string parts
/// of a HumanName or Address.
fn strings(element: &Value, found: &mut dyn FnMut(&str)) {
    match element {
        Value::String(text) => found(text),
        Value::Object(object) => {
            for key in [
                "text",
                "family",
                "given",
                "prefix",
                "suffix",
                "line",
                "city",
                "district",
                "state",
                "postalCode",
                "country",
            ] {
                match object.get(key) {
                    Some(Value::String(text)) => found(text),
                    Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).for_each(&mut *found),
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

/// Case folding for the default string search (Unicode lowercase; accents are kept).
fn fold(text: &str) -> String {
    text.to_lowercase()
}

/// Calls `found` with every value at `path` (arrays flattened). A step naming a choice element
/// (`effective`) that is absent matches its typed form (`effectiveDateTime`, `effectivePeriod`…).
fn visit(value: &Value, path: &[&str], found: &mut dyn FnMut(&Value)) {
    let Some((step, rest)) = path.split_first() else {
        match value {
            Value::Array(items) => items.iter().for_each(&mut *found),
            other => found(other),
        }
        return;
    };
    match value {
        Value::Array(items) => items.iter().for_each(|item| visit(item, path, found)),
        Value::Object(object) => match object.get(*step) {
            Some(child) => visit(child, rest, found),
            None => {
                for (key, child) in object {
                    let typed = key
                        .strip_prefix(step)
                        .is_some_and(|suffix| suffix.starts_with(|c: char| c.is_ascii_uppercase()));
                    if typed {
                        visit(child, rest, found);
                    }
                }
            }
        },
        _ => {}
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[at] == b'%' && at + 2 < bytes.len() {
            if let (Some(high), Some(low)) = (hex(bytes[at + 1]), hex(bytes[at + 2])) {
                out.push((high * 16 + low) as u8);
                at += 3;
                continue;
            }
        }
        out.push(bytes[at]);
        at += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn shorten(text: &str) -> String {
    match text.char_indices().nth(100) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn filter(query: &str) -> TypeFilter {
        TypeFilter::parse(query).unwrap_or_else(|error| panic!("{query}: {error}"))
    }

    fn observation() -> Value {
        json!({
            "resourceType": "Observation", "id": "o1", "status": "final",
            "meta": {"lastUpdated": "2024-03-01T10:00:00.000Z"},
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": "Patient/p1"},
            "encounter": {"reference": "urn:uuid:e1"},
            "effectiveDateTime": "2024-02-10T08:30:00+01:00"
        })
    }

    #[test]
    fn the_search_parameter_table_has_what_the_issue_names() {
        for (resource_type, code, kind) in [
            ("Observation", "code", ParamKind::Token),
            ("Observation", "category", ParamKind::Token),
            ("Observation", "status", ParamKind::Token),
            ("Observation", "subject", ParamKind::Reference),
            ("Observation", "patient", ParamKind::Reference),
            ("Observation", "encounter", ParamKind::Reference),
            ("Observation", "date", ParamKind::Date),
            ("Condition", "onset-date", ParamKind::Date),
            ("MedicationRequest", "authoredon", ParamKind::Date),
            ("Patient", "family", ParamKind::String),
            ("Encounter", "_lastUpdated", ParamKind::Date),
        ] {
            let row = search_param(resource_type, code).unwrap_or_else(|| panic!("{resource_type}.{code}"));
            assert_eq!(row.2, kind, "{resource_type}.{code}");
        }
        assert!(SEARCH_PARAMS.windows(2).all(|w| (w[0].0, w[0].1) < (w[1].0, w[1].1)), "sorted for binary search");
        assert!(search_param("Observation", "value-quantity").is_none(), "quantity is not a supported kind");
        // `(Observation.value as CodeableConcept).text` is not a plain path: the parameter is
        // left out rather than applied to its other branch only.
        assert!(search_param("Observation", "value-string").is_none());
    }

    #[test]
    fn tokens_with_and_without_system() {
        let resource = observation();
        for (query, expected) in [
            ("Observation?code=8867-4", true),
            ("Observation?code=http://loinc.org|8867-4", true),
            ("Observation?code=http%3A%2F%2Floinc.org%7C8867-4", true),
            ("Observation?code=http://snomed.info/sct|8867-4", false),
            ("Observation?code=|8867-4", false),
            ("Observation?code=http://loinc.org|", true),
            ("Observation?category=laboratory,vital-signs,survey", true),
            ("Observation?category=laboratory", false),
            ("Observation?status=final", true),
            ("Observation?status=final&category=laboratory", false),
            ("Observation?_id=o1", true),
        ] {
            assert_eq!(filter(query).matches(&resource), expected, "{query}");
        }
    }

    #[test]
    fn references_by_type_and_id_or_id_alone() {
        let resource = observation();
        for (query, expected) in [
            ("Observation?subject=Patient/p1", true),
            ("Observation?subject=p1", true),
            ("Observation?patient=Patient/p1", true),
            ("Observation?subject=Group/p1", false),
            ("Observation?subject=Patient/p2", false),
            ("Observation?encounter=e1", false),
        ] {
            assert_eq!(filter(query).matches(&resource), expected, "{query}");
        }
    }

    #[test]
    fn dates_compare_as_ranges_with_prefixes() {
        let resource = observation(); // 2024-02-10T07:30:00Z, one second wide
        for (query, expected) in [
            ("Observation?date=2024-02-10", true),
            ("Observation?date=2024-02", true),
            ("Observation?date=2024-02-11", false),
            ("Observation?date=ge2024-02-10", true),
            ("Observation?date=gt2024-02-10", false),
            ("Observation?date=gt2024-02-09", true),
            ("Observation?date=lt2024-02-11", true),
            ("Observation?date=le2024-02-10T07:30:00Z", true),
            ("Observation?date=lt2024-02-10T07:30:00Z", false),
            ("Observation?date=sa2024-01-31", true),
            ("Observation?date=eb2024-02-10", false),
            ("Observation?date=ne2024-02-10", false),
            ("Observation?date=ge2024-02-10T08:30:00+01:00", true),
            ("Observation?date=ge2024-02-10T08:30:00 01:00", true),
            ("Observation?_lastUpdated=gt2024-02-29", true),
            ("Observation?_lastUpdated=lt2024-02-29", false),
        ] {
            assert_eq!(filter(query).matches(&resource), expected, "{query}");
        }
        let condition = json!({"resourceType": "Condition", "onsetPeriod": {"start": "2020-01-01"}});
        assert!(filter("Condition?onset-date=ge2023-01-01").matches(&condition), "open period runs on");
        assert!(!filter("Condition?onset-date=lt2019-12-31").matches(&condition));
        let request = json!({"resourceType": "MedicationRequest", "authoredOn": "2021-06-01"});
        assert!(filter("MedicationRequest?authoredon=2021").matches(&request));
    }

    #[test]
    fn strings_default_prefix_and_exact() {
        let patient = json!({"resourceType": "Patient", "name": [{"family": "Müller", "given": ["Anna"]}]});
        assert!(filter("Patient?family=mül").matches(&patient));
        assert!(filter("Patient?name=ann").matches(&patient));
        assert!(filter("Patient?family:exact=Müller").matches(&patient));
        assert!(!filter("Patient?family:exact=müller").matches(&patient));
        assert!(!filter("Patient?family=anna").matches(&patient));
    }

    #[test]
    fn unsupported_and_malformed_queries_are_refused() {
        for query in ["Observation?value-quantity=5", "Observation?code:text=x", "Observation?subject.name=x"] {
            assert!(matches!(TypeFilter::parse(query), Err(FilterError::NotSupported(_))), "{query}");
        }
        for query in ["Observation", "Bogus?code=1", "Observation?", "Observation?date=yesterday", "Observation?code="]
        {
            assert!(matches!(TypeFilter::parse(query), Err(FilterError::Invalid(_))), "{query}");
        }
        assert!(matches!(TypeFilter::parse("Observation?date=ap2020"), Err(FilterError::NotSupported(_))));
    }

    #[test]
    fn queries_split_only_before_a_type() {
        assert_eq!(
            split_type_filter("Observation?category=laboratory,vital-signs,MedicationRequest?status=active"),
            ["Observation?category=laboratory,vital-signs", "MedicationRequest?status=active"]
        );
        assert_eq!(split_type_filter("Condition?code=a"), ["Condition?code=a"]);
    }

    #[test]
    fn several_queries_for_a_type_are_ored_and_other_types_pass() {
        let filters =
            TypeFilters::new(vec![filter("Observation?category=laboratory"), filter("Observation?status=final")]);
        assert!(filters.matches("Observation", &observation()));
        let filters = TypeFilters::new(vec![filter("Observation?category=laboratory")]);
        assert!(!filters.matches("Observation", &observation()));
        assert!(filters.matches("Condition", &json!({"resourceType": "Condition"})));
        assert!(filters.matches_json("Observation", br#"{"category":[{"coding":[{"code":"laboratory"}]}]}"#));
    }
}
