//! Type-level search: `_id`, `_lastUpdated`, `identifier`, `patient`, `subject`, `_count`,
//! keyset paging. Any other parameter is refused (400), never silently ignored.

use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bulkhead_fhir::{parse_range, IssueType};
use bulkhead_store::{IdentifierQuery, LastUpdatedBound, ReferenceQuery, SearchQuery, StoredResource};
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::negotiation::{check_accept, fhir_response};
use crate::rest::{known_type, raw_json};
use crate::state::AppState;
use crate::urls::base_url;

const DEFAULT_COUNT: u32 = 50;
const MAX_COUNT: u32 = 1_000;
/// Most parameters in one search: each becomes a condition of one SQL statement, and a
/// thousand repeats made the statement too large for SQLite (a 500).
pub const MAX_PARAMETERS: usize = 32;
/// Most ids in `_id` lists, all together.
pub const MAX_IDS: usize = 1_000;

/// Parameters this server supports on every type, for the CapabilityStatement.
pub const SEARCH_PARAMS: &[(&str, &str, &str)] = &[
    ("_id", "token", "Logical id; a comma list means any of them"),
    ("_lastUpdated", "date", "With eq (default), gt, ge, lt, le prefixes; repeat to bound both ends"),
    ("identifier", "token", "[system|]value on the resource's top-level identifier"),
    ("patient", "reference", "[Patient/]id on the top-level patient element or a Patient subject"),
    ("subject", "reference", "[Type/]id on the top-level subject element"),
];

fn invalid(param: &str, diagnostics: impl Into<String>) -> ApiError {
    ApiError::bad_request(IssueType::Invalid, diagnostics).at(param.to_owned())
}

/// Turns decoded query pairs into a store query.
pub fn parse_search(resource_type: &str, pairs: &[(String, String)]) -> Result<SearchQuery, ApiError> {
    let mut query = SearchQuery { resource_type: resource_type.to_owned(), count: DEFAULT_COUNT, ..Default::default() };
    if pairs.len() > MAX_PARAMETERS {
        return Err(ApiError::bad_request(
            IssueType::TooCostly,
            format!("a search takes at most {MAX_PARAMETERS} parameters; this one has {}", pairs.len()),
        ));
    }
    for (name, value) in pairs {
        if value.is_empty() {
            return Err(invalid(name, format!("search parameter '{name}' has an empty value")));
        }
        match name.as_str() {
            "_id" => {
                query.ids.extend(value.split(',').map(str::to_owned));
                if query.ids.len() > MAX_IDS {
                    return Err(ApiError::bad_request(
                        IssueType::TooCostly,
                        format!("_id lists at most {MAX_IDS} ids"),
                    )
                    .at(name.to_owned()));
                }
            }
            "_lastUpdated" => query.last_updated.extend(parse_last_updated(value)?),
            "identifier" => {
                if value.contains(',') {
                    return Err(invalid(name, "identifier does not support comma (OR) lists here"));
                }
                let (system, code) = match value.split_once('|') {
                    Some((system, code)) => (Some(system.to_owned()), code.to_owned()),
                    None => (None, value.clone()),
                };
                query.identifiers.push(IdentifierQuery { system, value: code });
            }
            "patient" | "subject" => query.references.push(parse_reference_param(name, value)?),
            "_count" => {
                query.count = value
                    .parse::<u32>()
                    .ok()
                    .filter(|count| (1..=MAX_COUNT).contains(count))
                    .ok_or_else(|| invalid(name, format!("_count must be a number from 1 to {MAX_COUNT}")))?;
            }
            "_cursor" => {
                query.after_key =
                    Some(value.parse().map_err(|_| invalid(name, "_cursor is not a cursor this server issued"))?);
            }
            // Checked on every FHIR route by `negotiation::general_params`.
            name if crate::negotiation::is_general_param(name) => {}
            _ => {
                return Err(ApiError::bad_request(IssueType::NotSupported, format!("search parameter '{name}' is not supported on {resource_type}; supported: _id, _lastUpdated, identifier, patient, subject, _count"))
                    .at(name.to_owned()));
            }
        }
    }
    Ok(query)
}

fn parse_last_updated(value: &str) -> Result<Vec<LastUpdatedBound>, ApiError> {
    let (prefix, date) = match value.get(..2) {
        Some(prefix @ ("eq" | "gt" | "ge" | "lt" | "le")) => (prefix, &value[2..]),
        Some("ne" | "sa" | "eb" | "ap") => {
            return Err(invalid("_lastUpdated", format!("prefix '{}' is not supported", &value[..2])))
        }
        _ => ("eq", value),
    };
    let range = parse_range(date).map_err(|error| invalid("_lastUpdated", error.to_string()))?;
    Ok(match prefix {
        "gt" => vec![LastUpdatedBound::AtLeast(range.end)],
        "ge" => vec![LastUpdatedBound::AtLeast(range.start)],
        "lt" => vec![LastUpdatedBound::Before(range.start)],
        "le" => vec![LastUpdatedBound::Before(range.end)],
        _ => vec![LastUpdatedBound::AtLeast(range.start), LastUpdatedBound::Before(range.end)],
    })
}

fn parse_reference_param(name: &str, value: &str) -> Result<ReferenceQuery, ApiError> {
    let (target_type, id) = match value.rsplit_once('/') {
        Some((target_type, id)) => (Some(target_type.to_owned()), id),
        None => (None, value),
    };
    if !bulkhead_fhir::is_valid_id(id) || target_type.as_deref().is_some_and(|t| !bulkhead_fhir::is_resource_type(t)) {
        return Err(invalid(name, format!("'{value}' is not a reference of the form [Type/]id")));
    }
    if name == "patient" && target_type.as_deref().is_some_and(|t| t != "Patient") {
        return Err(invalid(name, "patient must reference a Patient"));
    }
    let param = if name == "patient" { "patient" } else { "subject" };
    Ok(ReferenceQuery { param, target_type, id: id.to_owned() })
}

/// `If-None-Exist: identifier=system|value` (only `identifier` and `_id` conditions).
pub fn conditional_query(resource_type: &str, condition: &str) -> Result<SearchQuery, ApiError> {
    let pairs: Vec<(String, String)> =
        form_urlencoded::parse(condition.trim_start_matches('?').as_bytes()).into_owned().collect();
    let usable = !pairs.is_empty() && pairs.iter().all(|(name, _)| name == "identifier" || name == "_id");
    if !usable {
        return Err(ApiError::bad_request(
            IssueType::NotSupported,
            "conditional create supports only identifier= and _id= conditions",
        )
        .at("If-None-Exist"));
    }
    let mut query = parse_search(resource_type, &pairs)?;
    query.count = 2;
    Ok(query)
}

/// The single match of a conditional query; several matches are a 412 (FHIR conditional create).
pub async fn find_one(
    state: &AppState,
    caller: &Caller,
    query: SearchQuery,
) -> Result<Option<StoredResource>, ApiError> {
    let (tenant, visibility) = (caller.tenant, caller.visibility.clone());
    let page = state.blocking(move |store| Ok(store.search(tenant, &visibility, &query)?)).await?;
    if page.resources.len() > 1 {
        return Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            IssueType::Duplicate,
            "the condition matches more than one resource",
        ));
    }
    Ok(page.resources.into_iter().next())
}

/// `GET /r4/{type}?...`: a `searchset` Bundle with a `next` link while more results remain.
pub async fn search(
    state: AppState,
    caller: Caller,
    resource_type: String,
    raw_query: Option<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    known_type(&resource_type)?;
    check_accept(&headers)?;
    let raw_query = raw_query.unwrap_or_default();
    let pairs: Vec<(String, String)> = form_urlencoded::parse(raw_query.as_bytes()).into_owned().collect();
    crate::audit::note_search(&resource_type, &pairs);
    let query = parse_search(&resource_type, &pairs)?;
    let (tenant, visibility) = (caller.tenant, caller.visibility.clone());
    let page = state.blocking(move |store| Ok(store.search(tenant, &visibility, &query)?)).await?;
    crate::audit::note_found(&page.resources);
    let base = base_url(&state, &headers);
    let self_url = format!(
        "{base}/r4/{resource_type}{}",
        if raw_query.is_empty() { String::new() } else { format!("?{raw_query}") }
    );
    let mut links = vec![json!({"relation": "self", "url": self_url})];
    if let Some(next_key) = page.next_key {
        let mut next = form_urlencoded::Serializer::new(String::new());
        for (name, value) in pairs.iter().filter(|(name, _)| name != "_cursor") {
            next.append_pair(name, value);
        }
        next.append_pair("_cursor", &next_key.to_string());
        links.push(json!({"relation": "next", "url": format!("{base}/r4/{resource_type}?{}", next.finish())}));
    }
    let entries = page
        .resources
        .into_iter()
        .map(|resource| {
            Ok(json!({
                "fullUrl": format!("{base}/r4/{}/{}", resource.resource_type, resource.id),
                "resource": raw_json(resource.body.unwrap_or_default())?,
                "search": {"mode": "match"},
            }))
        })
        .collect::<Result<Vec<Value>, ApiError>>()?;
    let bundle = json!({"resourceType": "Bundle", "type": "searchset", "link": links, "entry": entries});
    Ok(fhir_response(StatusCode::OK, bundle.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn unknown_parameters_are_refused() {
        let error = parse_search("Patient", &pairs(&[("name", "x")])).unwrap_err();
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert_eq!(error.issues[0].expression.as_deref(), Some("name"));
    }

    #[test]
    fn last_updated_prefixes() {
        let query =
            parse_search("Patient", &pairs(&[("_lastUpdated", "gt2024-01-01"), ("_lastUpdated", "lt2025")])).unwrap();
        assert_eq!(query.last_updated.len(), 2);
        assert!(parse_search("Patient", &pairs(&[("_lastUpdated", "ne2024")])).is_err());
        assert!(parse_search("Patient", &pairs(&[("_lastUpdated", "gtyesterday")])).is_err());
    }

    #[test]
    fn identifiers_and_references() {
        let query = parse_search(
            "Observation",
            &pairs(&[("identifier", "urn:x|1"), ("subject", "Patient/p1"), ("_count", "5")]),
        )
        .unwrap();
        assert_eq!(query.identifiers[0].system.as_deref(), Some("urn:x"));
        assert_eq!(query.references[0].target_type.as_deref(), Some("Patient"));
        assert_eq!(query.count, 5);
        assert!(parse_search("Observation", &pairs(&[("patient", "Group/1")])).is_err());
        assert!(parse_search("Observation", &pairs(&[("_count", "0")])).is_err());
        assert!(parse_search("Observation", &pairs(&[("subject", "")])).is_err());
    }
}
