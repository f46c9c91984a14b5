//! Kick-off parameters of `$export` at every level (Bulk Data STU2, plus STU3 `_until` and the
//! STU3/STU4 hints).
//!
//! Strict by default: a parameter the server cannot honour exactly is a 400 with an
//! OperationOutcome, because silently ignoring a filter hands the client more (or other) data
//! than it asked for. Under `Prefer: handling=lenient` unsupported parameters, unsupported
//! `_type` entries, unsupported `_typeFilter` queries and unknown `_elements` entries are
//! dropped instead, each reported as a warning issue for the manifest's `error[]` file.
//!
//! Some mistakes stay fatal even when lenient, because "ignoring" them cannot give the client
//! what it meant:
//! - a malformed `_since`/`_until`, or `_until <= _since` (ignoring a bound returns too much);
//! - an `_outputFormat` other than NDJSON (we would send a format the client cannot read);
//! - a repeated `_since`, `_until` or `_outputFormat` (which one did the client mean?);
//! - an empty value or an empty `_type` entry (`_type=`, `_type=A,,B`: a malformed request,
//!   not an unsupported feature);
//! - a malformed `_typeFilter` query (not `Type?criteria`, a bad date) or `patient` reference;
//!
//! At the Patient and Group levels a `_typeFilter` on Provenance or on a type outside the Patient
//! compartment is unsupported (400, or a lenient warning): those come only as associated data,
//! found from the cohort's unfiltered data.
//! - a `_type` list of which lenient mode would drop *every* entry: exporting all types instead
//!   would surprise the client far more than a 400.
//!
//! `allowPartialManifests`, `_minimumFileSize` and `_maximumFileSize` are hints (STU3/STU4): they
//! are accepted and the server keeps its own file policy.
//!
//! The parser runs in two steps: [`collect`] sorts the query pairs by parameter (checking
//! repeats and empty values), then one small function per parameter interprets its raw text.
//! `_typeFilter` values are split into queries where a comma is followed by `Type?` (see
//! [`split_type_filter`]), so it does not matter whether a client encoded its commas.

use bulkhead_fhir::compartment::parse_reference;
use bulkhead_fhir::references::is_referenced_type;
use bulkhead_fhir::type_filter::{split_type_filter, FilterError, TypeFilter};
use bulkhead_fhir::validation::top_level_elements;
use bulkhead_fhir::{is_resource_type, parse_since, Issue, IssueType, Micros, Severity, RESOURCE_TYPES};

use crate::level::ExportLevel;

use crate::associated::{parse_include_associated_data, AssociatedData};

/// The canonical NDJSON media type every accepted `_outputFormat` spelling is normalised to.
pub const NDJSON: &str = "application/fhir+ndjson";

/// `_outputFormat` values meaning FHIR NDJSON (compared case-insensitively). The spec requires
/// the first three; the fourth is what a raw `+` becomes after form-decoding.
const NDJSON_SPELLINGS: &[&str] =
    &["application/fhir+ndjson", "application/ndjson", "ndjson", "application/fhir ndjson"];

/// Bulk Data parameters we know of but do not implement (yet).
const UNSUPPORTED_PARAMS: &[&str] = &["organizeOutputBy"];

/// Parameters accepted as hints only: the server keeps its own file policy.
const HINT_PARAMS: &[&str] = &["allowPartialManifests", "_minimumFileSize", "_maximumFileSize"];

/// Longest slice of a client value echoed into diagnostics, so a huge query cannot bloat the
/// OperationOutcome.
const MAX_ECHO_CHARS: usize = 100;

/// The validated kick-off parameters of a Group export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportParams {
    /// Requested types, deduplicated, in request order; `None` when `_type` was absent.
    /// Never `Some(empty)`.
    pub types: Option<Vec<String>>,
    /// `_since`: only resources with `meta.lastUpdated` strictly after this instant.
    pub since: Option<Micros>,
    /// `_until` (STU3): only resources with `meta.lastUpdated` strictly before this instant.
    pub until: Option<Micros>,
    /// Always [`NDJSON`] (`application/fhir+ndjson`): every accepted spelling is normalised.
    pub output_format: String,
    /// `includeAssociatedData` (Provenance and referenced resources; see [`crate::associated`]).
    pub associated: AssociatedData,
    /// `_typeFilter` queries, each checked to compile ([`TypeFilter::parse`]), in request order.
    pub type_filters: Vec<String>,
    /// `_elements` entries (`Type.element` or `element`), checked, deduplicated; `None` when
    /// absent.
    pub elements: Option<Vec<String>>,
    /// `patient` (POST only): the Patient ids the export is restricted to, sorted, deduplicated;
    /// `None` when absent.
    pub patients: Option<Vec<String>>,
}

/// Where a kick-off's parameters came from and how to treat them.
#[derive(Debug, Clone, Copy)]
pub struct ParseContext<'a> {
    pub level: &'a ExportLevel,
    /// `Prefer: handling=lenient`.
    pub lenient: bool,
    /// A POST kick-off (`patient` is POST-only).
    pub post: bool,
}

/// A kick-off parameter problem that must fail the request (HTTP 400).
///
/// `issue` is ready for an OperationOutcome: severity `error`, code `invalid`, `value` or
/// `not-supported`, diagnostics naming the parameter and value, `expression` = parameter name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", .issue.diagnostics)]
pub struct ParamError {
    /// The OperationOutcome issue describing the problem.
    pub issue: Issue,
}

impl ParamError {
    fn new(code: IssueType, param: &str, diagnostics: impl Into<String>) -> ParamError {
        ParamError { issue: Issue::error(code, diagnostics).at(param) }
    }
}

/// Parses and validates the kick-off parameters of `Group/[id]/$export` sent by GET.
pub fn parse_group_export_params(
    pairs: &[(String, String)],
    lenient: bool,
) -> Result<(ExportParams, Vec<Issue>), ParamError> {
    let level = ExportLevel::Group(String::new());
    parse_export_params(pairs, ParseContext { level: &level, lenient, post: false })
}

/// Parses and validates the kick-off parameters of `$export` at any level.
///
/// `pairs` are the decoded parameters in request order (repeats allowed): the query string of
/// a GET, or the `Parameters` of a POST turned into text. Returns the parameters plus the
/// warning issues (one per ignored item) that belong in the manifest's `error[]` file. See the
/// module documentation for which problems stay errors even in lenient mode.
pub fn parse_export_params(
    pairs: &[(String, String)],
    context: ParseContext<'_>,
) -> Result<(ExportParams, Vec<Issue>), ParamError> {
    let lenient = context.lenient;
    let raw = collect(pairs)?;
    let mut warnings = ignore_unsupported(&raw.unsupported, lenient)?;
    let types = match &raw.types {
        Some(values) => Some(parse_types(values, context.level, lenient, &mut warnings)?),
        None => None,
    };
    let since = raw.since.map(|v| parse_instant("_since", v)).transpose()?;
    let until = raw.until.map(|v| parse_instant("_until", v)).transpose()?;
    check_window(since, until, &raw)?;
    let output_format = parse_output_format(raw.output_format)?;
    let type_filters = parse_type_filters(&raw.type_filters, context.level, lenient, &mut warnings)?;
    let elements = match raw.elements.is_empty() {
        true => None,
        false => parse_elements(&raw.elements, lenient, &mut warnings)?,
    };
    let patients = match raw.patients.is_empty() {
        true => None,
        false => parse_patients(&raw.patients, context, &mut warnings)?,
    };
    let associated = parse_include_associated_data(&raw.associated, lenient, &mut warnings)?;
    let types = match types {
        Some(types) => Some(check_referenced_types(types, context.level, &associated, lenient, &mut warnings)?),
        None => None,
    };
    let params = ExportParams { types, since, until, output_format, type_filters, elements, patients, associated };
    Ok((params, warnings))
}

/// Types a Group export may return: `Patient`, `Group` (only the exported Group itself) and
/// every R4 Patient-compartment type. Sorted.
pub fn group_export_types() -> Vec<&'static str> {
    ExportLevel::Group(String::new()).exportable_types()
}

#[cfg(test)]
fn is_group_export_type(resource_type: &str) -> bool {
    ExportLevel::Group(String::new()).exports(resource_type)
}

/// What a query parameter name means to us.
enum Param {
    Type,
    Since,
    Until,
    OutputFormat,
    IncludeAssociatedData,
    TypeFilter,
    Elements,
    Patient,
    /// Accepted, not acted on.
    Hint,
    /// Defined by the Bulk Data IG but not implemented here.
    Unsupported,
    /// Not a Bulk Data kick-off parameter at all.
    Unknown,
}

/// Parameter names are case-sensitive in FHIR, so `_Type` is an unknown parameter.
fn classify(name: &str) -> Param {
    match name {
        "_type" => Param::Type,
        "_since" => Param::Since,
        "_until" => Param::Until,
        "_outputFormat" => Param::OutputFormat,
        "includeAssociatedData" => Param::IncludeAssociatedData,
        "_typeFilter" => Param::TypeFilter,
        "_elements" => Param::Elements,
        "patient" => Param::Patient,
        _ if HINT_PARAMS.contains(&name) => Param::Hint,
        _ if UNSUPPORTED_PARAMS.contains(&name) => Param::Unsupported,
        _ => Param::Unknown,
    }
}

/// The query sorted by parameter, still as raw text.
#[derive(Default)]
struct RawParams<'a> {
    /// Every `_type` value in order (each may be a comma list); `None` when absent.
    types: Option<Vec<&'a str>>,
    since: Option<&'a str>,
    until: Option<&'a str>,
    output_format: Option<&'a str>,
    /// Every `includeAssociatedData` value in order (each may be a comma list).
    associated: Vec<&'a str>,
    /// Every `_typeFilter`, `_elements` and `patient` value in order.
    type_filters: Vec<&'a str>,
    elements: Vec<&'a str>,
    patients: Vec<&'a str>,
    /// Unsupported or unknown parameter names, first occurrence order, deduplicated.
    unsupported: Vec<(&'a str, bool)>,
}

/// Sorts the pairs by parameter; rejects empty values and repeats of single-valued parameters.
fn collect(pairs: &[(String, String)]) -> Result<RawParams<'_>, ParamError> {
    let mut raw = RawParams::default();
    for (name, value) in pairs {
        let param = classify(name);
        let known = !matches!(param, Param::Unsupported | Param::Unknown | Param::Hint);
        if known && value.trim().is_empty() {
            let message = format!("Parameter '{name}' has an empty value");
            return Err(ParamError::new(IssueType::Value, name, message));
        }
        match param {
            Param::Type => raw.types.get_or_insert_with(Vec::new).push(value),
            Param::Since => set_once(&mut raw.since, name, value)?,
            Param::Until => set_once(&mut raw.until, name, value)?,
            Param::OutputFormat => set_once(&mut raw.output_format, name, value)?,
            Param::IncludeAssociatedData => raw.associated.push(value),
            Param::TypeFilter => raw.type_filters.push(value),
            Param::Elements => raw.elements.push(value),
            Param::Patient => raw.patients.push(value),
            Param::Hint => {}
            Param::Unsupported | Param::Unknown => {
                let is_known = matches!(param, Param::Unsupported);
                if !raw.unsupported.iter().any(|(seen, _)| seen == name) {
                    raw.unsupported.push((name, is_known));
                }
            }
        }
    }
    Ok(raw)
}

/// Stores a single-valued parameter; a second occurrence is an error because we cannot tell
/// which value the client meant.
fn set_once<'a>(slot: &mut Option<&'a str>, name: &str, value: &'a str) -> Result<(), ParamError> {
    if slot.is_some() {
        let message = format!("Parameter '{name}' may appear at most once");
        return Err(ParamError::new(IssueType::Invalid, name, message));
    }
    *slot = Some(value);
    Ok(())
}

/// Strict: the first unsupported/unknown parameter is an error. Lenient: one warning each.
fn ignore_unsupported(names: &[(&str, bool)], lenient: bool) -> Result<Vec<Issue>, ParamError> {
    let mut warnings = Vec::new();
    for &(name, is_bulk_param) in names {
        let (code, what) = if is_bulk_param {
            (IssueType::NotSupported, "is not supported by this server")
        } else {
            (IssueType::Invalid, "is not a known $export parameter")
        };
        let message = format!("Parameter '{}' {what}", echo(name));
        if !lenient {
            return Err(ParamError::new(code, name, message));
        }
        warnings.push(Issue::warning(code, format!("{message}; ignored (Prefer: handling=lenient)")).at(name));
    }
    Ok(warnings)
}

/// Splits, trims, checks and deduplicates every `_type` entry. Lenient mode drops unsupported
/// entries with one warning per distinct name, but refuses to drop them all.
fn parse_types(
    values: &[&str],
    level: &ExportLevel,
    lenient: bool,
    warnings: &mut Vec<Issue>,
) -> Result<Vec<String>, ParamError> {
    let mut types: Vec<String> = Vec::new();
    let mut dropped: Vec<&str> = Vec::new();
    for entry in values.iter().flat_map(|value| value.split(',')).map(str::trim) {
        if entry.is_empty() {
            let message = format!("Parameter '_type' has an empty entry in '{}'", echo(&values.join(",")));
            return Err(ParamError::new(IssueType::Value, "_type", message));
        }
        match check_type(entry, level) {
            Ok(()) if !types.iter().any(|t| t == entry) => types.push(entry.to_owned()),
            Ok(()) => {}
            Err(error) if lenient => {
                if !dropped.contains(&entry) {
                    dropped.push(entry);
                    warnings.push(as_lenient_warning(error.issue));
                }
            }
            Err(error) => return Err(error),
        }
    }
    if types.is_empty() {
        let message = format!(
            "None of the requested types ({}) can be exported by {}",
            echo(&dropped.join(",")),
            level.describe()
        );
        return Err(ParamError::new(IssueType::NotSupported, "_type", message));
    }
    Ok(types)
}

/// Why a single `_type` entry cannot be honoured, if it cannot.
fn check_type(name: &str, level: &ExportLevel) -> Result<(), ParamError> {
    check_type_of("_type", name, level)
}

/// Why `param` naming `name` cannot be honoured at `level`, if it cannot.
fn check_type_of(param: &str, name: &str, level: &ExportLevel) -> Result<(), ParamError> {
    if !is_resource_type(name) {
        let message = format!("Parameter '{param}': '{}' is not an R4 resource type", echo(name));
        return Err(ParamError::new(IssueType::Value, param, message));
    }
    if !level.exports(name) && (param != "_type" || !is_referenced_type(name)) {
        let what = match level {
            ExportLevel::Patient => "only Patient and Patient-compartment types other than Group are",
            _ => "only Patient, Group and Patient-compartment types are",
        };
        let message = format!("Parameter '{param}': '{name}' is not available from {} ({what})", level.describe());
        return Err(ParamError::new(IssueType::NotSupported, param, message));
    }
    Ok(())
}

/// Types outside the Patient compartment are exported only as resources referenced by the
/// compartment data (README "Associated data"): a `_type` list of nothing else exports nothing
/// (an error even when lenient, like any list lenient mode would empty), and one that names them
/// while `includeAssociatedData=_noReferencedResources` turns referenced resources off is a
/// contradiction (strict: an error; lenient: they are dropped).
fn check_referenced_types(
    types: Vec<String>,
    level: &ExportLevel,
    associated: &AssociatedData,
    lenient: bool,
    warnings: &mut Vec<Issue>,
) -> Result<Vec<String>, ParamError> {
    if matches!(level, ExportLevel::System) {
        return Ok(types);
    }
    let (referenced, cohort): (Vec<&String>, Vec<&String>) = types.iter().partition(|t| !level.exports(t));
    if cohort.is_empty() {
        let names = referenced.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(",");
        let message = format!(
            "Parameter '_type': {} lie outside the Patient compartment; {} returns such resources only when \
             its compartment data references them, so name a Patient-compartment type too",
            echo(&names),
            level.describe()
        );
        return Err(ParamError::new(IssueType::NotSupported, "_type", message));
    }
    if associated.referenced || referenced.is_empty() {
        return Ok(types);
    }
    let names = referenced.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(",");
    let message = format!(
        "Parameter '_type': {} would only be exported as referenced resources, which \
         includeAssociatedData=_noReferencedResources turns off",
        echo(&names)
    );
    if !lenient {
        return Err(ParamError::new(IssueType::NotSupported, "_type", message));
    }
    warnings.push(as_lenient_warning(ParamError::new(IssueType::NotSupported, "_type", message).issue));
    Ok(types.into_iter().filter(|t| level.exports(t)).collect())
}

/// At the Patient and Group levels, Provenance and the types outside the Patient compartment
/// come only as associated data, found from the cohort's unfiltered data (README "Associated
/// data"): a `_typeFilter` on them cannot narrow anything, so it is refused rather than
/// silently ignored.
fn check_associated_filter(name: &str, level: &ExportLevel) -> Result<(), ParamError> {
    if matches!(level, ExportLevel::System) || !is_resource_type(name) {
        return Ok(());
    }
    if name != "Provenance" && !is_referenced_type(name) {
        return Ok(());
    }
    let message = format!(
        "Parameter '_typeFilter': {} delivers '{name}' only as associated data (through the cohort's \
         resources, whatever their filters), so a filter on it is not supported",
        level.describe()
    );
    Err(ParamError::new(IssueType::NotSupported, "_typeFilter", message))
}

/// Compiles every `_typeFilter` query (each value may hold several). A malformed query is an
/// error even when lenient; an unsupported one (parameter, modifier, prefix, or a type the level
/// cannot export) is dropped with a warning when lenient, and then no longer narrows its type.
fn parse_type_filters(
    values: &[&str],
    level: &ExportLevel,
    lenient: bool,
    warnings: &mut Vec<Issue>,
) -> Result<Vec<String>, ParamError> {
    let mut queries: Vec<String> = Vec::new();
    for query in values.iter().flat_map(|value| split_type_filter(value)) {
        let compiled = TypeFilter::parse(query).map_err(|error| {
            let code = match error {
                FilterError::Invalid(_) => IssueType::Value,
                FilterError::NotSupported(_) => IssueType::NotSupported,
            };
            ParamError::new(code, "_typeFilter", format!("Parameter '_typeFilter': {} ({})", error, echo(query)))
        });
        let checked = compiled.and_then(|filter| {
            check_associated_filter(&filter.resource_type, level)?;
            check_type_of("_typeFilter", &filter.resource_type, level)
        });
        match checked {
            Ok(()) if !queries.iter().any(|seen| seen == query) => queries.push(query.to_owned()),
            Ok(()) => {}
            Err(error) if lenient && error.issue.code == IssueType::NotSupported => {
                warnings.push(as_lenient_warning(error.issue));
            }
            Err(error) => return Err(error),
        }
    }
    Ok(queries)
}

/// Checks `_elements` entries: `Type.element` or `element`, root elements only (a choice by
/// its base name, `value` for `value[x]`). Unknown entries are errors, or dropped with a warning
/// when lenient; `None` when lenient dropped them all (the resources are then exported whole).
fn parse_elements(
    values: &[&str],
    lenient: bool,
    warnings: &mut Vec<Issue>,
) -> Result<Option<Vec<String>>, ParamError> {
    let mut elements: Vec<String> = Vec::new();
    for entry in values.iter().flat_map(|value| value.split(',')).map(str::trim) {
        if entry.is_empty() {
            let message = format!("Parameter '_elements' has an empty entry in '{}'", echo(&values.join(",")));
            return Err(ParamError::new(IssueType::Value, "_elements", message));
        }
        let known = match entry.split_once('.') {
            Some((resource_type, element)) => {
                is_resource_type(resource_type) && !element.contains('.') && has_element(resource_type, element)
            }
            None => RESOURCE_TYPES.iter().any(|resource_type| has_element(resource_type, entry)),
        };
        if !known {
            let message = format!(
                "Parameter '_elements': '{}' is not a root element of an R4 resource (Type.element or element)",
                echo(entry)
            );
            let error = ParamError::new(IssueType::Value, "_elements", message);
            if lenient {
                warnings.push(as_lenient_warning(error.issue));
                continue;
            }
            return Err(error);
        }
        if !elements.iter().any(|seen| seen == entry) {
            elements.push(entry.to_owned());
        }
    }
    Ok((!elements.is_empty()).then_some(elements))
}

/// True when `element` is a root element of `resource_type` (a choice by its base name too).
pub(crate) fn has_element(resource_type: &str, element: &str) -> bool {
    if matches!(element, "id" | "meta" | "resourceType") {
        return true;
    }
    top_level_elements(resource_type).is_some_and(|elements| {
        elements.iter().any(|found| {
            found.name == element
                || (found.choice
                    && found
                        .name
                        .strip_prefix(element)
                        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase())))
        })
    })
}

/// `patient` (POST only, Group and Patient levels): references to Patients (`Patient/id`, or
/// an absolute URL ending so). Sent by GET, or at the system level, it is an unsupported use
/// (strict: 400; lenient: ignored with a warning). A malformed reference is always an error.
fn parse_patients(
    values: &[&str],
    context: ParseContext<'_>,
    warnings: &mut Vec<Issue>,
) -> Result<Option<Vec<String>>, ParamError> {
    let refusal = if !context.post {
        Some("is only accepted in a POST kick-off (a Parameters body)")
    } else if *context.level == ExportLevel::System {
        Some("applies to Patient- and Group-level exports only")
    } else {
        None
    };
    if let Some(why) = refusal {
        let message = format!("Parameter 'patient' {why}");
        if context.lenient {
            warnings.push(
                Issue::warning(IssueType::NotSupported, format!("{message}; ignored (Prefer: handling=lenient)"))
                    .at("patient"),
            );
            return Ok(None);
        }
        return Err(ParamError::new(IssueType::NotSupported, "patient", message));
    }
    let mut patients = Vec::new();
    for value in values.iter().flat_map(|value| value.split(',')).map(str::trim) {
        match parse_reference(value) {
            Some(("Patient", id)) => patients.push(id.to_owned()),
            _ => {
                let message =
                    format!("Parameter 'patient': '{}' is not a reference to a Patient (Patient/id)", echo(value));
                return Err(ParamError::new(IssueType::Value, "patient", message));
            }
        }
    }
    patients.sort_unstable();
    patients.dedup();
    Ok(Some(patients))
}

/// Turns a would-be error into the warning lenient mode records instead.
fn as_lenient_warning(issue: Issue) -> Issue {
    Issue {
        severity: Severity::Warning,
        diagnostics: format!("{}; ignored (Prefer: handling=lenient)", issue.diagnostics),
        ..issue
    }
}

/// Parses `_since`/`_until` (instant or `YYYY-MM-DD`).
///
/// A space is never valid in an instant, so one is taken to be a `+` offset sign that form
/// decoding turned into a space (`…T10:00:00+01:00` sent unencoded); this is unambiguous and
/// spares clients a confusing 400.
fn parse_instant(name: &str, value: &str) -> Result<Micros, ParamError> {
    let repaired = value.trim().replace(' ', "+");
    parse_since(&repaired).map_err(|_| {
        let message = format!("Parameter '{name}': '{}' is not a FHIR instant or a date (YYYY-MM-DD)", echo(value));
        ParamError::new(IssueType::Value, name, message)
    })
}

/// `_until` must lie after `_since`, otherwise the window is empty by construction, which is
/// almost certainly a client mistake rather than a wish for an empty export.
fn check_window(since: Option<Micros>, until: Option<Micros>, raw: &RawParams<'_>) -> Result<(), ParamError> {
    match (since, until) {
        (Some(since), Some(until)) if until <= since => {
            let message = format!(
                "Parameter '_until' ({}) must be later than '_since' ({})",
                echo(raw.until.unwrap_or_default()),
                echo(raw.since.unwrap_or_default())
            );
            Err(ParamError::new(IssueType::Value, "_until", message))
        }
        _ => Ok(()),
    }
}

/// Accepts the NDJSON spellings (media types are case-insensitive) and normalises them.
fn parse_output_format(value: Option<&str>) -> Result<String, ParamError> {
    let Some(value) = value else {
        return Ok(NDJSON.to_owned());
    };
    let trimmed = value.trim();
    if NDJSON_SPELLINGS.iter().any(|s| s.eq_ignore_ascii_case(trimmed)) {
        return Ok(NDJSON.to_owned());
    }
    let message = format!("Parameter '_outputFormat': '{}' is not supported; use {NDJSON}", echo(value));
    Err(ParamError::new(IssueType::NotSupported, "_outputFormat", message))
}

/// A client value shortened for diagnostics.
fn echo(value: &str) -> String {
    match value.char_indices().nth(MAX_ECHO_CHARS) {
        Some((cut, _)) => format!("{}…", &value[..cut]),
        None => value.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn query(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn parse(pairs: &[(&str, &str)], lenient: bool) -> Result<(ExportParams, Vec<Issue>), ParamError> {
        parse_group_export_params(&query(pairs), lenient)
    }

    fn ok(pairs: &[(&str, &str)]) -> ExportParams {
        let (params, warnings) = parse(pairs, false).expect("should be accepted");
        assert!(warnings.is_empty(), "strict mode never warns: {warnings:?}");
        params
    }

    fn err(pairs: &[(&str, &str)], lenient: bool) -> Issue {
        parse(pairs, lenient).expect_err("should be refused").issue
    }

    fn types(params: &ExportParams) -> Vec<&str> {
        params.types.as_ref().unwrap().iter().map(String::as_str).collect()
    }

    // ---- defaults ----

    #[test]
    fn empty_query_gives_defaults() {
        let params = ok(&[]);
        let expected = ExportParams {
            types: None,
            since: None,
            until: None,
            output_format: NDJSON.to_owned(),
            type_filters: Vec::new(),
            elements: None,
            patients: None,
            associated: AssociatedData::default(),
        };
        assert_eq!(params, expected);
    }

    // ---- _type ----

    #[test]
    fn type_comma_lists_and_repeats_merge_in_order() {
        let params = ok(&[("_type", "Patient,Observation"), ("_type", "Condition")]);
        assert_eq!(types(&params), ["Patient", "Observation", "Condition"]);
    }

    #[test]
    fn type_entries_are_trimmed_and_deduplicated() {
        let params = ok(&[("_type", " Observation , Patient"), ("_type", "Observation,Patient ,Group")]);
        assert_eq!(types(&params), ["Observation", "Patient", "Group"]);
    }

    #[test]
    fn empty_type_value_or_entry_is_an_error_even_lenient() {
        for (value, lenient) in
            [("", false), ("", true), (" ", true), ("Patient,,Observation", true), ("Patient,", false)]
        {
            let issue = err(&[("_type", value)], lenient);
            assert_eq!(issue.code, IssueType::Value, "{value:?}");
            assert_eq!(issue.expression.as_deref(), Some("_type"));
        }
    }

    #[test]
    fn unknown_type_is_an_error_naming_it() {
        let issue = err(&[("_type", "Patient,Bogus")], false);
        assert_eq!(issue.severity, Severity::Error);
        assert_eq!(issue.code, IssueType::Value);
        assert!(issue.diagnostics.contains("Bogus"), "{}", issue.diagnostics);
        assert_eq!(issue.expression.as_deref(), Some("_type"));
        // Type names are case-sensitive.
        assert_eq!(err(&[("_type", "patient")], false).code, IssueType::Value);
    }

    #[test]
    fn types_outside_the_group_compartment_are_not_supported() {
        for t in ["Practitioner", "Organization", "Medication", "Location", "Device", "Bundle"] {
            let issue = err(&[("_type", t)], false);
            assert_eq!(issue.code, IssueType::NotSupported, "{t}");
            assert!(issue.diagnostics.contains(t));
        }
    }

    #[test]
    fn lenient_drops_bad_types_with_one_warning_each() {
        let pairs = [("_type", "Patient,Bundle2,Bogus"), ("_type", "Bundle2,Observation")];
        let (params, warnings) = parse(&pairs, true).unwrap();
        assert_eq!(types(&params), ["Patient", "Observation"]);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings.iter().all(|w| w.severity == Severity::Warning));
        assert!(warnings[0].diagnostics.contains("Bundle2"));
        assert_eq!(warnings[0].code, IssueType::Value);
        assert!(warnings[1].diagnostics.contains("Bogus"));
        assert_eq!(warnings[1].expression.as_deref(), Some("_type"));
    }

    #[test]
    fn referenced_types_are_accepted_beside_compartment_types() {
        let params = ok(&[("_type", "MedicationRequest,Medication,Practitioner")]);
        assert_eq!(types(&params), ["MedicationRequest", "Medication", "Practitioner"]);
        assert!(params.associated.referenced);
    }

    #[test]
    fn referenced_types_contradict_the_switch_off() {
        let pairs = [("_type", "Observation,Practitioner"), ("includeAssociatedData", "_noReferencedResources")];
        let issue = err(&pairs, false);
        assert_eq!(issue.code, IssueType::NotSupported);
        assert!(issue.diagnostics.contains("Practitioner"), "{}", issue.diagnostics);
        let (params, warnings) = parse(&pairs, true).unwrap();
        assert_eq!(types(&params), ["Observation"]);
        assert!(!params.associated.referenced);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].severity, Severity::Warning);
    }

    #[test]
    fn lenient_dropping_every_type_is_an_error() {
        let issue = err(&[("_type", "Practitioner,Organization")], true);
        assert_eq!(issue.code, IssueType::NotSupported);
        assert_eq!(issue.severity, Severity::Error);
        assert!(issue.diagnostics.contains("Practitioner,Organization"), "{}", issue.diagnostics);
    }

    #[test]
    fn group_export_types_cover_patient_group_and_compartment() {
        let allowed = group_export_types();
        for t in ["Patient", "Group", "Observation", "Encounter", "Provenance"] {
            assert!(allowed.contains(&t), "{t}");
        }
        for t in ["Practitioner", "Organization", "Medication"] {
            assert!(!allowed.contains(&t), "{t}");
        }
        assert!(allowed.windows(2).all(|w| w[0] < w[1]), "sorted, unique");
        assert!(allowed.iter().all(|t| is_group_export_type(t) && is_resource_type(t)));
    }

    // ---- _since / _until ----

    #[test]
    fn since_accepts_dates_and_instants() {
        assert_eq!(ok(&[("_since", "2024-01-01")]).since, Some(1_704_067_200_000_000));
        assert_eq!(ok(&[("_since", "2024-01-01T01:00:00.5+01:00")]).since, Some(1_704_067_200_500_000));
    }

    #[test]
    fn since_repairs_a_form_decoded_plus() {
        assert_eq!(ok(&[("_since", "2024-01-01T01:00:00 01:00")]).since, Some(1_704_067_200_000_000));
    }

    #[test]
    fn since_in_the_future_is_fine() {
        assert_eq!(ok(&[("_since", "2999-01-01")]).since, Some(32_472_144_000_000_000));
    }

    #[test]
    fn bad_since_or_until_is_an_error_even_lenient() {
        for name in ["_since", "_until"] {
            for value in ["yesterday", "2024-13-01", "2024-01-01T00:00:00", "2024"] {
                let issue = err(&[(name, value)], true);
                assert_eq!(issue.code, IssueType::Value);
                assert_eq!(issue.expression.as_deref(), Some(name));
                assert!(issue.diagnostics.contains(value) && issue.diagnostics.contains(name));
            }
        }
    }

    #[test]
    fn until_must_follow_since() {
        let params = ok(&[("_since", "2024-01-01"), ("_until", "2024-01-02")]);
        assert_eq!(params.until, Some(1_704_153_600_000_000));
        for until in ["2024-01-01", "2023-12-31", "2024-01-01T00:00:00Z"] {
            let issue = err(&[("_since", "2024-01-01"), ("_until", until)], true);
            assert_eq!(issue.expression.as_deref(), Some("_until"), "{until}");
        }
        // Alone, _until is fine.
        assert!(ok(&[("_until", "2024-01-01")]).until.is_some());
    }

    #[test]
    fn single_valued_parameters_may_not_repeat() {
        let cases = [
            ("_since", "2024-01-01", "2024-01-01"),
            ("_until", "2024-01-01", "2025-01-01"),
            ("_outputFormat", "ndjson", "ndjson"),
        ];
        for (name, first, second) in cases {
            let issue = err(&[(name, first), (name, second)], true);
            assert_eq!(issue.code, IssueType::Invalid, "{name}");
            assert_eq!(issue.expression.as_deref(), Some(name));
        }
    }

    #[test]
    fn empty_values_of_known_parameters_are_errors() {
        for name in ["_since", "_until", "_outputFormat"] {
            assert_eq!(err(&[(name, "")], true).code, IssueType::Value, "{name}");
        }
    }

    // ---- _outputFormat ----

    #[test]
    fn ndjson_spellings_are_normalised() {
        for spelling in ["application/fhir+ndjson", "application/ndjson", "ndjson", "application/fhir ndjson", "NDJSON"]
        {
            assert_eq!(ok(&[("_outputFormat", spelling)]).output_format, NDJSON, "{spelling}");
        }
    }

    #[test]
    fn other_formats_are_not_supported_even_lenient() {
        for format in ["application/fhir+json", "text/csv", "application/x-parquet"] {
            let issue = err(&[("_outputFormat", format)], true);
            assert_eq!(issue.code, IssueType::NotSupported);
            assert_eq!(issue.expression.as_deref(), Some("_outputFormat"));
            assert!(issue.diagnostics.contains(format));
        }
    }

    // ---- unsupported and unknown parameters ----

    #[test]
    fn unsupported_bulk_parameters_are_errors_when_strict() {
        for name in UNSUPPORTED_PARAMS {
            let issue = err(&[(name, "x")], false);
            assert_eq!(issue.code, IssueType::NotSupported, "{name}");
            assert_eq!(issue.expression.as_deref(), Some(*name));
            assert!(issue.diagnostics.contains(name));
        }
    }

    #[test]
    fn unknown_parameters_are_errors_when_strict() {
        for name in ["_count", "foo", "_Type", ""] {
            let issue = err(&[(name, "1")], false);
            assert_eq!(issue.code, IssueType::Invalid, "{name:?}");
            assert_eq!(issue.expression.as_deref(), Some(name));
        }
    }

    #[test]
    fn lenient_ignores_unknown_parameters_with_one_warning_each() {
        let pairs = [
            ("organizeOutputBy", "Patient"),
            ("_type", "Observation"),
            ("foo", "1"),
            ("_typeFilter", "Condition?x=y"),
            ("_elements", "bogusElement"),
        ];
        let (params, warnings) = parse(&pairs, true).unwrap();
        assert_eq!(types(&params), ["Observation"]);
        assert!(params.type_filters.is_empty() && params.elements.is_none());
        let named: Vec<_> = warnings.iter().map(|w| w.expression.as_deref().unwrap()).collect();
        assert_eq!(named, ["organizeOutputBy", "foo", "_typeFilter", "_elements"]);
        assert!(warnings.iter().all(|w| w.severity == Severity::Warning));
        assert!(warnings.iter().all(|w| w.diagnostics.contains(w.expression.as_deref().unwrap())));
    }

    // ---- levels, _typeFilter, _elements, patient, hints ----

    fn parse_at(
        pairs: &[(&str, &str)],
        level: &ExportLevel,
        lenient: bool,
        post: bool,
    ) -> Result<(ExportParams, Vec<Issue>), ParamError> {
        parse_export_params(&query(pairs), ParseContext { level, lenient, post })
    }

    #[test]
    fn types_allowed_depend_on_the_level() {
        let (params, _) =
            parse_at(&[("_type", "Practitioner,Organization,Group")], &ExportLevel::System, false, false).unwrap();
        assert_eq!(types(&params), ["Practitioner", "Organization", "Group"]);
        for t in ["Practitioner", "Group"] {
            let issue = parse_at(&[("_type", t)], &ExportLevel::Patient, false, false).unwrap_err().issue;
            assert_eq!(issue.code, IssueType::NotSupported, "{t}");
            assert!(issue.diagnostics.contains("Patient-level"), "{}", issue.diagnostics);
        }
    }

    #[test]
    fn type_filters_compile_split_and_dedupe() {
        let pairs = [
            ("_typeFilter", "Observation?category=laboratory,vital-signs,MedicationRequest?status=active"),
            ("_typeFilter", "Observation?code=http%3A%2F%2Floinc.org%7C8867-4"),
            ("_typeFilter", "MedicationRequest?status=active"),
        ];
        let filters = ok(&pairs).type_filters;
        assert_eq!(
            filters,
            [
                "Observation?category=laboratory,vital-signs",
                "MedicationRequest?status=active",
                "Observation?code=http%3A%2F%2Floinc.org%7C8867-4"
            ]
        );
    }

    #[test]
    fn type_filter_problems() {
        // Unsupported: strict 400, lenient warning.
        let issue = err(&[("_typeFilter", "Observation?value-quantity=5")], false);
        assert_eq!((issue.code, issue.expression.as_deref()), (IssueType::NotSupported, Some("_typeFilter")));
        assert!(issue.diagnostics.contains("value-quantity"), "{}", issue.diagnostics);
        let (params, warnings) = parse(&[("_typeFilter", "Observation?value-quantity=5")], true).unwrap();
        assert!(params.type_filters.is_empty());
        assert_eq!(warnings.len(), 1);
        // A type the level cannot export.
        assert_eq!(err(&[("_typeFilter", "Bundle?_id=x")], false).code, IssueType::NotSupported);
        // Types a Group export delivers only as associated data: strict 400, lenient warning.
        for associated in ["Provenance?patient=Patient/p1", "Practitioner?name=x"] {
            let issue = err(&[("_typeFilter", associated)], false);
            assert_eq!(issue.code, IssueType::NotSupported, "{associated}");
            assert!(issue.diagnostics.contains("only as associated data"), "{}", issue.diagnostics);
            let (params, warnings) = parse(&[("_typeFilter", associated), ("_typeFilter", "Patient?family=x")], true)
                .expect("lenient mode drops it");
            assert_eq!(params.type_filters, ["Patient?family=x"]);
            assert_eq!(warnings.len(), 1);
            assert!(warnings[0].diagnostics.contains("only as associated data"), "{}", warnings[0].diagnostics);
            let issue = parse_at(&[("_typeFilter", associated)], &ExportLevel::Patient, false, false).unwrap_err();
            assert!(issue.issue.diagnostics.contains("Patient-level"), "{}", issue.issue.diagnostics);
            // The system level exports them like any type: the filter applies.
            let (params, _) = parse_at(&[("_typeFilter", associated)], &ExportLevel::System, false, false).unwrap();
            assert_eq!(params.type_filters, [associated]);
        }
        // Malformed: an error even when lenient.
        for bad in ["Observation", "Bogus?code=1", "Observation?date=notadate"] {
            assert_eq!(err(&[("_typeFilter", bad)], true).code, IssueType::Value, "{bad}");
        }
    }

    #[test]
    fn elements_are_checked_root_elements() {
        let params = ok(&[("_elements", "id,Patient.name, code"), ("_elements", "Observation.value,code")]);
        assert_eq!(params.elements.unwrap(), ["id", "Patient.name", "code", "Observation.value"]);
        for bad in ["Patient.name.given", "Patient.bogus", "Bogus.id", "notAnElement"] {
            assert_eq!(err(&[("_elements", bad)], false).code, IssueType::Value, "{bad}");
        }
        assert_eq!(err(&[("_elements", "id,,code")], true).code, IssueType::Value);
    }

    #[test]
    fn patient_is_post_only_and_a_patient_reference() {
        let group = ExportLevel::Group("g".into());
        let (params, _) =
            parse_at(&[("patient", "Patient/b"), ("patient", "Patient/a,Patient/b")], &group, false, true).unwrap();
        assert_eq!(params.patients.unwrap(), ["a", "b"]);
        let issue = parse_at(&[("patient", "Patient/a")], &group, false, false).unwrap_err().issue;
        assert_eq!((issue.code, issue.expression.as_deref()), (IssueType::NotSupported, Some("patient")));
        let (params, warnings) = parse_at(&[("patient", "Patient/a")], &group, true, false).unwrap();
        assert_eq!((params.patients, warnings.len()), (None, 1));
        assert!(parse_at(&[("patient", "Patient/a")], &ExportLevel::System, false, true).is_err());
        let issue = parse_at(&[("patient", "Observation/a")], &ExportLevel::Patient, true, true).unwrap_err().issue;
        assert_eq!(issue.code, IssueType::Value);
    }

    #[test]
    fn size_and_partial_manifest_hints_are_accepted_quietly() {
        let (_, warnings) = parse(
            &[("allowPartialManifests", "true"), ("_minimumFileSize", "10"), ("_maximumFileSize", "whatever")],
            false,
        )
        .unwrap();
        assert!(warnings.is_empty());
    }

    #[test]
    fn long_values_are_shortened_in_diagnostics() {
        let long = "x".repeat(10_000);
        let issue = err(&[("_since", &long)], false);
        assert!(issue.diagnostics.len() < 400, "{}", issue.diagnostics.len());
    }

    // ---- property ----

    proptest! {
        #[test]
        fn allowed_type_lists_round_trip(
            picks in prop::collection::vec(0usize..1000, 1..20),
            cuts in prop::collection::vec(any::<bool>(), 20),
            pads in prop::collection::vec(0usize..3, 20),
        ) {
            let allowed = group_export_types();
            let names: Vec<&str> = picks.iter().map(|i| allowed[i % allowed.len()]).collect();
            // Spread the names over repeated `_type` parameters and comma lists, with padding.
            let mut pairs: Vec<(String, String)> = Vec::new();
            let mut current: Vec<String> = Vec::new();
            for (i, name) in names.iter().enumerate() {
                let pad = " ".repeat(pads[i]);
                current.push(format!("{pad}{name}{pad}"));
                if cuts[i] {
                    pairs.push(("_type".into(), current.join(",")));
                    current.clear();
                }
            }
            if !current.is_empty() {
                pairs.push(("_type".into(), current.join(",")));
            }
            let mut expected: Vec<&str> = Vec::new();
            for name in &names {
                if !expected.contains(name) {
                    expected.push(name);
                }
            }
            let (params, warnings) = parse_group_export_params(&pairs, false).unwrap();
            prop_assert!(warnings.is_empty());
            prop_assert_eq!(types(&params), expected);
        }
    }
}
