//! Validation of resources on write: shape, type, id, R4 structure, references, and Group rules.
//! Every write path (REST create/update, Bundle entries, `bulkhead import`, `$upload-ndjson`)
//! goes through [`validate_resource`].

use axum::http::StatusCode;
use bulkhead_fhir::compartment::parse_reference;
use bulkhead_fhir::validation::validate_json as validate_structure;
use bulkhead_fhir::{is_resource_type, is_valid_id, parse_exact, Issue, IssueType, JsonType, JsonView};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ApiError;

/// Parses one resource's JSON text, the same way for every way in (REST bodies, Bundle and
/// NDJSON files, uploads), so each refusal reads the same: text that is not UTF-8 is refused,
/// never repaired with replacement characters.
pub fn parse_resource(bytes: &[u8]) -> Result<Value, ApiError> {
    if let Err(error) = std::str::from_utf8(bytes) {
        return Err(ApiError::bad_request(
            IssueType::Structure,
            format!("the JSON text is not valid UTF-8 (invalid byte at offset {})", error.valid_up_to()),
        ));
    }
    parse_exact(bytes).map_err(|error| ApiError::bad_request(IssueType::Structure, format!("not valid JSON: {error}")))
}

/// Whether writes are checked against the R4 StructureDefinitions (config key `validation`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValidationMode {
    /// Structurally invalid R4 is refused (400, one issue per problem).
    #[default]
    Strict,
    /// Stores what the client sent: only the checks the server itself relies on remain (resource
    /// type and id, well-formed references, Group membership rules).
    Off,
}

/// Checks a resource body against the URL it was sent to: `expected_type` from the path, and
/// `expected_id` for an update. Returns 400 for URL mismatches and, in `Strict` mode, for
/// structurally invalid R4 (one issue per violation, each with its `expression`); 422 for
/// malformed references and Group rules.
pub fn validate_resource(
    body: &Value,
    expected_type: &str,
    expected_id: Option<&str>,
    max_group_members: usize,
    mode: ValidationMode,
) -> Result<(), ApiError> {
    validate_json(body, expected_type, expected_id, max_group_members, mode)
}

/// [`validate_resource`] for any [`JsonView`] of the body (a bulk load's tape of each line): the
/// same checks, the same messages.
pub fn validate_json<'a, J: JsonView<'a>>(
    body: J,
    expected_type: &str,
    expected_id: Option<&str>,
    max_group_members: usize,
    mode: ValidationMode,
) -> Result<(), ApiError> {
    if !body.is_object() {
        return Err(ApiError::unprocessable(IssueType::Structure, "a resource must be a JSON object"));
    }
    let object = body;
    let resource_type = match object.get("resourceType").and_then(JsonView::as_str) {
        Some(name) => name,
        _ => return Err(ApiError::unprocessable(IssueType::Required, "resourceType is missing").at("resourceType")),
    };
    if !is_resource_type(resource_type) {
        return Err(ApiError::unprocessable(IssueType::Value, format!("'{resource_type}' is not an R4 resource type"))
            .at("resourceType"));
    }
    if resource_type != expected_type {
        return Err(ApiError::bad_request(
            IssueType::Invalid,
            format!("resourceType '{resource_type}' does not match the URL type '{expected_type}'"),
        )
        .at("resourceType"));
    }
    let id = object.get("id").map(|id| id.as_str().ok_or(id));
    match (id, expected_id) {
        (Some(Ok(id)), _) if !is_valid_id(id) => {
            return Err(ApiError::bad_request(IssueType::Value, format!("'{id}' is not a valid FHIR id"))
                .at(format!("{resource_type}.id")));
        }
        (Some(Ok(id)), Some(expected)) if id != expected => {
            return Err(ApiError::bad_request(
                IssueType::Invalid,
                format!("body id '{id}' does not match the URL id '{expected}'"),
            )
            .at(format!("{resource_type}.id")));
        }
        (None, Some(_)) => {
            return Err(ApiError::bad_request(
                IssueType::Required,
                "an update must carry the id of the URL in the body",
            )
            .at(format!("{resource_type}.id")));
        }
        (Some(Ok(_)) | None, _) => {}
        (Some(_), _) => {
            return Err(
                ApiError::unprocessable(IssueType::Structure, "id must be a string").at(format!("{resource_type}.id"))
            )
        }
    }
    if mode == ValidationMode::Strict {
        let violations = validate_structure(body);
        if !violations.is_empty() {
            let issues = violations
                .into_iter()
                .map(|violation| Issue::error(violation.code, violation.message).at(violation.expression))
                .collect();
            return Err(ApiError { status: StatusCode::BAD_REQUEST, issues });
        }
    }
    check_references(body, resource_type)?;
    if resource_type == "Group" {
        validate_group(body, max_group_members)?;
    }
    Ok(())
}

/// The issues of a refusal on one line, each led by its element path (`Patient.gender: …`), for
/// import summaries that report `file:line`.
pub fn describe_issues(issues: &[Issue]) -> String {
    let described: Vec<String> = issues
        .iter()
        .map(|issue| match &issue.expression {
            Some(expression) => format!("{expression}: {}", issue.diagnostics),
            None => issue.diagnostics.clone(),
        })
        .collect();
    described.join("; ")
}

/// Every `reference` string must be a well-formed reference: relative `Type/id`, absolute URL,
/// `urn:uuid:`/`urn:oid:`, or a contained `#id`.
fn check_references<'a, J: JsonView<'a>>(value: J, resource_type: &str) -> Result<(), ApiError> {
    let mut path = Vec::new();
    match find_bad_reference(value, &mut path) {
        None => Ok(()),
        Some(reference) => {
            // The path is only spelled out for the error, never on the common, valid path.
            let expression =
                std::iter::once(resource_type).chain(path.iter().rev().copied()).collect::<Vec<_>>().join(".");
            Err(ApiError::unprocessable(IssueType::Value, format!("'{reference}' is not a valid reference"))
                .at(expression))
        }
    }
}

/// The first malformed reference, with the keys leading to it pushed innermost first.
fn find_bad_reference<'a, J: JsonView<'a>>(value: J, path: &mut Vec<&'a str>) -> Option<&'a str> {
    match value.json_type() {
        JsonType::Object => {
            for (key, child) in value.entries() {
                let found = match (key, child.as_str()) {
                    ("reference", Some(reference)) => (!is_well_formed_reference(reference)).then_some(reference),
                    // Contained resources and extensions are checked like the rest.
                    _ => find_bad_reference(child, path),
                };
                if found.is_some() {
                    path.push(key);
                    return found;
                }
            }
            None
        }
        JsonType::Array => value.items().find_map(|item| find_bad_reference(item, path)),
        _ => None,
    }
}

fn is_well_formed_reference(reference: &str) -> bool {
    if let Some(fragment) = reference.strip_prefix('#') {
        return fragment.is_empty() || is_valid_id(fragment);
    }
    if reference.starts_with("urn:uuid:") || reference.starts_with("urn:oid:") {
        return reference.len() > 9;
    }
    if reference.starts_with("http://") || reference.starts_with("https://") {
        return !reference.contains(char::is_whitespace);
    }
    // Relative: `Type/id`, `Type/id/_history/n`, or a search-style conditional reference.
    if reference.contains('?') {
        let (target_type, _) = reference.split_once('?').unwrap_or(("", ""));
        return is_resource_type(target_type);
    }
    parse_reference(reference).is_some_and(|(target_type, _)| is_resource_type(target_type))
}

/// R4 requires `type` and `actual`; members must reference Patients; the member count is capped.
fn validate_group<'a, J: JsonView<'a>>(group: J, max_members: usize) -> Result<(), ApiError> {
    if !group.get("type").is_some_and(|kind| kind.json_type() == JsonType::String) {
        return Err(ApiError::unprocessable(IssueType::Required, "Group.type is required").at("Group.type"));
    }
    if !group.get("actual").is_some_and(|actual| actual.json_type() == JsonType::Bool) {
        return Err(
            ApiError::unprocessable(IssueType::Required, "Group.actual is required (true or false)").at("Group.actual")
        );
    }
    let members = match group.get("member") {
        None => return Ok(()),
        Some(members) if members.is_array() => members,
        Some(_) => {
            return Err(
                ApiError::unprocessable(IssueType::Structure, "Group.member must be an array").at("Group.member")
            )
        }
    };
    let count = members.array_len().unwrap_or_default();
    if count > max_members {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            IssueType::TooCostly,
            format!("Group has {count} members; the limit is {max_members}"),
        )
        .at("Group.member"));
    }
    for (index, member) in members.items().enumerate() {
        let period_end = member.get("period").and_then(|period| period.get("end"));
        let well_typed = member.get("inactive").is_none_or(|inactive| inactive.json_type() == JsonType::Bool)
            && period_end.is_none_or(|end| end.json_type() == JsonType::String);
        if !well_typed {
            return Err(ApiError::unprocessable(
                IssueType::Structure,
                format!("Group.member[{index}]: inactive must be a boolean and period.end a dateTime"),
            )
            .at(format!("Group.member[{index}]")));
        }
        let reference = member.get("entity").and_then(|entity| entity.get("reference")).and_then(JsonView::as_str);
        let is_patient = reference.and_then(parse_reference).is_some_and(|(target_type, _)| target_type == "Patient");
        if !is_patient {
            let shown = reference.unwrap_or("(no reference)");
            return Err(ApiError::unprocessable(
                IssueType::Value,
                format!("Group.member[{index}].entity must reference a Patient as 'Patient/{{id}}', not '{shown}'"),
            )
            .at(format!("Group.member[{index}].entity")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check_in(mode: ValidationMode, body: Value) -> Result<(), u16> {
        let expected_type = body["resourceType"].as_str().unwrap_or("Patient").to_owned();
        validate_resource(&body, &expected_type, None, 3, mode).map_err(|error| error.status.as_u16())
    }

    fn check(body: Value) -> Result<(), u16> {
        check_in(ValidationMode::Strict, body)
    }

    /// The Group rules and reference checks hold with validation off too.
    fn check_off(body: Value) -> Result<(), u16> {
        check_in(ValidationMode::Off, body)
    }

    #[test]
    fn parsing_refuses_what_it_cannot_read_with_one_message() {
        let not_utf8 = parse_resource(b"{\"resourceType\":\"Patient\",\"name\":[{\"text\":\"\xff\"}]}").unwrap_err();
        assert_eq!(not_utf8.status, 400);
        assert_eq!(not_utf8.issues[0].diagnostics, "the JSON text is not valid UTF-8 (invalid byte at offset 43)");
        let not_json = parse_resource(b"{").unwrap_err();
        assert!(not_json.issues[0].diagnostics.starts_with("not valid JSON: "), "{:?}", not_json.issues);
        let numbers = parse_resource(br#"{"v":[1.50,0.010,1e2,1E-2,-0.0,112.41600000000001]}"#).unwrap();
        assert_eq!(numbers.to_string(), r#"{"v":[1.50,0.010,1e2,1E-2,-0.0,112.41600000000001]}"#);
    }

    #[test]
    fn resource_shape() {
        assert_eq!(check(json!([1])), Err(422));
        assert_eq!(check(json!({"resourceType": "Nope"})), Err(422));
        assert_eq!(check(json!({"resourceType": "Patient", "id": "a b"})), Err(400));
        assert_eq!(check(json!({"resourceType": "Patient", "id": "ok"})), Ok(()));
        let wrong_type =
            validate_resource(&json!({"resourceType": "Patient"}), "Observation", None, 3, ValidationMode::Strict);
        assert_eq!(wrong_type.unwrap_err().status, 400);
        let wrong_id = validate_resource(
            &json!({"resourceType": "Patient", "id": "a"}),
            "Patient",
            Some("b"),
            3,
            ValidationMode::Strict,
        );
        assert_eq!(wrong_id.unwrap_err().status, 400);
    }

    #[test]
    fn references_must_be_well_formed() {
        let observation = |reference: &str| json!({"resourceType": "Observation", "status": "final", "code": {"text": "t"}, "subject": {"reference": reference}});
        for good in ["Patient/1", "urn:uuid:abc", "#c1", "https://x.org/fhir/Patient/1", "Patient?identifier=x|1"] {
            assert_eq!(check(observation(good)), Ok(()), "{good}");
        }
        for bad in ["Patient", "Patient/", "Nope/1", "Patient/a b", "urn:uuid:"] {
            assert_eq!(check(observation(bad)), Err(422), "{bad}");
            assert_eq!(check_off(observation(bad)), Err(422), "{bad}");
        }
    }

    #[test]
    fn structural_violations_are_one_issue_each() {
        let body = json!({"resourceType": "Patient", "gender": "banana", "birthDate": "not-a-date", "foo": 1});
        let error = validate_resource(&body, "Patient", None, 3, ValidationMode::Strict).unwrap_err();
        assert_eq!(error.status, 400);
        let expressions: Vec<_> = error.issues.iter().map(|issue| issue.expression.as_deref()).collect();
        assert_eq!(expressions, [Some("Patient.gender"), Some("Patient.birthDate"), Some("Patient.foo")]);
        let codes: Vec<_> = error.issues.iter().map(|issue| issue.code).collect();
        assert_eq!(codes, [IssueType::CodeInvalid, IssueType::Value, IssueType::Structure]);
        assert!(describe_issues(&error.issues).starts_with("Patient.gender: 'banana'"));
        assert_eq!(check_off(body), Ok(()), "validation = off stores what the client sent");
    }

    #[test]
    fn group_rules() {
        let member = |reference: &str| json!({"entity": {"reference": reference}});
        // Group.type and Group.actual are required by R4 (400 when validating), and by the export
        // rules even when validation is off (422).
        assert_eq!(check(json!({"resourceType": "Group", "actual": true})), Err(400));
        assert_eq!(check(json!({"resourceType": "Group", "type": "person"})), Err(400));
        assert_eq!(check_off(json!({"resourceType": "Group", "actual": true})), Err(422));
        assert_eq!(check_off(json!({"resourceType": "Group", "type": "person"})), Err(422));
        assert_eq!(
            check(json!({"resourceType": "Group", "type": "person", "actual": true, "member": [member("Patient/1")]})),
            Ok(())
        );
        assert_eq!(
            check(
                json!({"resourceType": "Group", "type": "person", "actual": true, "member": [member("Practitioner/1")]})
            ),
            Err(422)
        );
        let inactive_text = json!({"entity": {"reference": "Patient/1"}, "inactive": "yes"});
        let group = json!({"resourceType": "Group", "type": "person", "actual": true, "member": [inactive_text]});
        assert_eq!(check(group.clone()), Err(400));
        assert_eq!(check_off(group), Err(422));
        let four: Vec<Value> = (0..4).map(|i| member(&format!("Patient/{i}"))).collect();
        assert_eq!(check(json!({"resourceType": "Group", "type": "person", "actual": true, "member": four})), Err(422));
    }
}
