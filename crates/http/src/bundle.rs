//! `POST /r4` with a `transaction` (all or nothing) or `batch` (entry by entry) Bundle.
//! `urn:uuid:` fullUrls get server ids, and every reference to them is rewritten, so a Synthea
//! patient Bundle loads as it is.

use std::collections::HashMap;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bulkhead_fhir::{format_instant, is_valid_id, operation_outcome, Issue, IssueType};
use bulkhead_store::{WriteMode, WriteOp, Written};
use serde_json::{json, Value};

use crate::audit::BundleEntry;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::negotiation::{check_accept, fhir_response, JsonBody};
use crate::rest::{known_type, parse_version_tag};
use crate::scopes::Access;
use crate::search::{conditional_query, find_one};
use crate::state::AppState;
use crate::validate::validate_resource;

/// What one entry asks for, once checked. Writes go to a separate list, in entry order, so they
/// can be handed to the store in one call.
enum Planned {
    Write,
    /// A conditional create that matched an existing resource.
    Existing {
        resource_type: String,
        id: String,
        version: i64,
    },
    Failed(ApiError),
}

/// `POST /r4`.
pub async fn process_bundle(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    JsonBody(bundle): JsonBody,
) -> Result<Response, ApiError> {
    check_accept(&headers)?;
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(
            ApiError::unprocessable(IssueType::Invalid, "POST to the base must carry a Bundle").at("resourceType")
        );
    }
    let mode = match bundle.get("type").and_then(Value::as_str) {
        Some("transaction") => WriteMode::Transaction,
        Some("batch") => WriteMode::Batch,
        other => {
            return Err(ApiError::unprocessable(
                IssueType::Value,
                format!("Bundle.type must be transaction or batch, not {}", other.unwrap_or("missing")),
            )
            .at("Bundle.type"));
        }
    };
    crate::audit::note(if mode == WriteMode::Transaction { "transaction" } else { "batch" }, "Bundle");
    let Some(Value::Array(entries)) = bundle.get("entry").cloned() else {
        return Ok(bundle_response(mode, Vec::new()));
    };
    let mut planned = Vec::with_capacity(entries.len());
    let mut ops = Vec::with_capacity(entries.len());
    let mut full_urls: HashMap<String, String> = HashMap::new();
    // The entry that first wrote each resource: a transaction may name a resource only once
    // (FHIR RESTful API §transaction), or its outcome would depend on entry order.
    let mut written_by: HashMap<(String, String), usize> = HashMap::new();
    for (index, entry) in entries.into_iter().enumerate() {
        let step = plan_entry(&state, &caller, entry, &mut full_urls).await.map_err(|error| within_entry(error, index));
        match (step, mode) {
            (Ok(Step::Write(op)), WriteMode::Transaction) => {
                let target = (op.resource_type().to_owned(), op.id().to_owned());
                if let Some(first) = written_by.insert(target, index) {
                    return Err(ApiError::bad_request(
                        IssueType::Duplicate,
                        format!(
                            "entries {first} and {index} both write {}/{}; a transaction may name a resource once",
                            op.resource_type(),
                            op.id()
                        ),
                    )
                    .at(format!("Bundle.entry[{index}]")));
                }
                ops.push(op);
                planned.push(Planned::Write);
            }
            (Ok(Step::Write(op)), WriteMode::Batch) => {
                ops.push(op);
                planned.push(Planned::Write);
            }
            (Ok(Step::Existing(existing)), _) => planned.push(existing),
            (Err(error), WriteMode::Transaction) => return Err(error),
            (Err(error), WriteMode::Batch) => planned.push(Planned::Failed(error)),
        }
    }
    if !full_urls.is_empty() {
        for op in &mut ops {
            if let WriteOp::Create { body, .. } | WriteOp::Update { body, .. } = op {
                rewrite_references(body, &full_urls);
            }
        }
    }
    let entries = planned.iter().map(|step| match step {
        Planned::Write => BundleEntry::Written,
        Planned::Failed(error) => BundleEntry::Refused(error.status),
        Planned::Existing { .. } => BundleEntry::Unwritten,
    });
    let audit = crate::audit::WriteAudit::for_bundle(mode, entries);
    let (tenant, owner) = (caller.tenant, caller.owner().map(str::to_owned));
    let mut results =
        state.blocking(move |store| Ok(audit.write(store, tenant, owner.as_deref(), &ops, mode)?)).await?.into_iter();
    let mut outcomes = Vec::with_capacity(planned.len());
    for step in planned {
        outcomes.push(match step {
            Planned::Write => results.next().ok_or_else(ApiError::internal)?.map_err(ApiError::from),
            Planned::Existing { resource_type, id, version } => Ok(Written {
                resource_type,
                id,
                version,
                last_updated: 0,
                created: false,
                deleted: false,
                changed: false,
                body: None,
            }),
            Planned::Failed(error) => Err(error),
        });
    }
    Ok(bundle_response(mode, outcomes))
}

/// A checked entry: a write, or a conditional create that found its match.
enum Step {
    Write(WriteOp),
    Existing(Planned),
}

async fn plan_entry(
    state: &AppState,
    caller: &Caller,
    entry: Value,
    full_urls: &mut HashMap<String, String>,
) -> Result<Step, ApiError> {
    let method = entry.pointer("/request/method").and_then(Value::as_str).unwrap_or("").to_owned();
    let url = entry.pointer("/request/url").and_then(Value::as_str).unwrap_or("").to_owned();
    let full_url = entry.get("fullUrl").and_then(Value::as_str).map(str::to_owned);
    let url_path = url.split('?').next().unwrap_or("").trim_start_matches('/');
    let mut segments = url_path.split('/');
    let resource_type = segments.next().unwrap_or("").to_owned();
    let url_id = segments.next().map(str::to_owned);
    if segments.next().is_some() {
        return Err(ApiError::bad_request(
            IssueType::NotSupported,
            format!("entry request url '{url}' is not Type or Type/id"),
        ));
    }
    known_type(&resource_type).map_err(|error| ApiError { status: StatusCode::BAD_REQUEST, ..error })?;
    // Each entry within the caller's scopes, as the same request on its own would be.
    let access = match (method.as_str(), &url_id) {
        ("POST", _) => Access::Create,
        ("PUT" | "PATCH", _) => Access::Update,
        ("DELETE", _) => Access::Delete,
        ("GET", Some(_)) => Access::Read,
        _ => Access::Search,
    };
    caller.require(&resource_type, access)?;
    let (max_members, validation) = (state.config.max_group_members, state.config.validation_for(&caller.tenant_name));
    match method.as_str() {
        "POST" => {
            let body = entry
                .get("resource")
                .cloned()
                .ok_or_else(|| ApiError::bad_request(IssueType::Required, "a POST entry needs a resource"))?;
            validate_resource(&body, &resource_type, None, max_members, validation)?;
            if let Some(condition) = entry.pointer("/request/ifNoneExist").and_then(Value::as_str) {
                if let Some(existing) = find_one(state, caller, conditional_query(&resource_type, condition)?).await? {
                    if let Some(full_url) = full_url {
                        full_urls.insert(full_url, format!("{resource_type}/{}", existing.id));
                    }
                    return Ok(Step::Existing(Planned::Existing {
                        resource_type,
                        id: existing.id,
                        version: existing.version,
                    }));
                }
            }
            let id = uuid::Uuid::new_v4().to_string();
            if let Some(full_url) = full_url {
                full_urls.insert(full_url, format!("{resource_type}/{id}"));
            }
            Ok(Step::Write(WriteOp::Create { resource_type, id, body }))
        }
        "PUT" => {
            let id = url_id.filter(|id| is_valid_id(id)).ok_or_else(|| {
                ApiError::bad_request(IssueType::Value, format!("PUT entry url '{url}' needs a valid Type/id"))
            })?;
            let body = entry
                .get("resource")
                .cloned()
                .ok_or_else(|| ApiError::bad_request(IssueType::Required, "a PUT entry needs a resource"))?;
            validate_resource(&body, &resource_type, Some(&id), max_members, validation)?;
            if let Some(full_url) = full_url {
                full_urls.insert(full_url, format!("{resource_type}/{id}"));
            }
            // Parsed as the If-Match header is: a tag that cannot be read is refused, not ignored.
            let if_match = match entry.pointer("/request/ifMatch") {
                None => None,
                Some(Value::String(tag)) => Some(parse_version_tag(tag, "request.ifMatch")?),
                Some(other) => Some(parse_version_tag(&other.to_string(), "request.ifMatch")?),
            };
            Ok(Step::Write(WriteOp::Update { resource_type, id, body, if_match }))
        }
        "DELETE" => {
            let id = url_id.filter(|id| is_valid_id(id)).ok_or_else(|| {
                ApiError::bad_request(IssueType::Value, format!("DELETE entry url '{url}' needs a valid Type/id"))
            })?;
            Ok(Step::Write(WriteOp::Delete { resource_type, id }))
        }
        other => Err(ApiError::bad_request(
            IssueType::NotSupported,
            format!("entry method '{other}' is not supported in a Bundle; use POST, PUT or DELETE"),
        )),
    }
}

/// Re-roots an entry's error expressions in the Bundle: `Observation.subject.reference` becomes
/// `Bundle.entry[3].resource.subject.reference`, so the client sees both entry and element.
fn within_entry(mut error: ApiError, index: usize) -> ApiError {
    let entry = format!("Bundle.entry[{index}]");
    for issue in &mut error.issues {
        issue.expression = Some(match issue.expression.as_deref() {
            Some(inner) if inner.starts_with("request.") => format!("{entry}.{inner}"),
            Some(inner) => match inner.split_once(['.', '[']) {
                Some((root, _)) if root.starts_with(char::is_uppercase) => {
                    format!("{entry}.resource{}", &inner[root.len()..])
                }
                _ => format!("{entry}.resource.{inner}"),
            },
            None => entry.clone(),
        });
    }
    error
}

/// Replaces every `reference` that names a Bundle entry's fullUrl with that entry's `Type/id`.
pub fn rewrite_references(value: &mut Value, full_urls: &HashMap<String, String>) {
    match value {
        Value::Object(object) => {
            for (key, child) in object.iter_mut() {
                if key == "reference" {
                    if let Value::String(reference) = child {
                        if let Some(target) = full_urls.get(reference.as_str()) {
                            *reference = target.clone();
                        }
                    }
                } else {
                    rewrite_references(child, full_urls);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| rewrite_references(item, full_urls)),
        _ => {}
    }
}

fn bundle_response(mode: WriteMode, outcomes: Vec<Result<Written, ApiError>>) -> Response {
    let entries: Vec<Value> = outcomes
        .into_iter()
        .map(|outcome| match outcome {
            Ok(written) => {
                let status = match (written.deleted, written.created) {
                    (true, _) => "204 No Content",
                    (false, true) => "201 Created",
                    (false, false) => "200 OK",
                };
                let mut response = json!({
                    "status": status,
                    "location": format!("{}/{}/_history/{}", written.resource_type, written.id, written.version),
                    "etag": format!("W/\"{}\"", written.version),
                });
                if written.last_updated > 0 {
                    response["lastModified"] = json!(format_instant(written.last_updated));
                }
                json!({"response": response})
            }
            Err(error) => {
                let status = format!("{} {}", error.status.as_u16(), error.status.canonical_reason().unwrap_or(""));
                let issues: Vec<Issue> = error.issues;
                json!({"response": {"status": status.trim_end(), "outcome": operation_outcome(&issues)}})
            }
        })
        .collect();
    let kind = if mode == WriteMode::Transaction { "transaction-response" } else { "batch-response" };
    let bundle = json!({"resourceType": "Bundle", "type": kind, "entry": entries});
    fhir_response(StatusCode::OK, bundle.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_errors_keep_the_element_path() {
        let error = ApiError::unprocessable(IssueType::Value, "bad").at("Observation.subject.reference");
        assert_eq!(
            within_entry(error, 3).issues[0].expression.as_deref(),
            Some("Bundle.entry[3].resource.subject.reference")
        );
        let error = ApiError::bad_request(IssueType::Value, "bad");
        assert_eq!(within_entry(error, 0).issues[0].expression.as_deref(), Some("Bundle.entry[0]"));
    }

    #[test]
    fn references_to_full_urls_are_rewritten_everywhere() {
        let mut body = json!({"subject": {"reference": "urn:uuid:1"}, "item": [{"x": {"reference": "urn:uuid:1"}}, {"reference": "urn:uuid:2"}]});
        let map = HashMap::from([("urn:uuid:1".to_owned(), "Patient/abc".to_owned())]);
        rewrite_references(&mut body, &map);
        assert_eq!(body["subject"]["reference"], "Patient/abc");
        assert_eq!(body["item"][0]["x"]["reference"], "Patient/abc");
        assert_eq!(body["item"][1]["reference"], "urn:uuid:2");
    }
}
