//! How audit records are shown: one JSON object per line (`bulkhead audit --json`,
//! `GET /admin/audit`), or a FHIR R4 `AuditEvent` shaped after IHE Basic Audit Log Patterns
//! (BALP): `type` = DICOM/HL7 `rest`, `subtype` = the FHIR restful interaction, the client as the
//! Source Role agent (with its network address), the user as a human-user agent, Bulkhead as the
//! Destination Role agent and the observer, and entities for the target, each patient, the query
//! and the request id (BALP `XrequestId`). The profile is claimed only where the record fits it:
//! a successful read, query, create, update or delete.

use bulkhead_fhir::format_instant;
use bulkhead_store::AuditRecord;
use serde_json::{json, Value};

const AUDIT_EVENT_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-event-type";
const RESTFUL_INTERACTION: &str = "http://hl7.org/fhir/restful-interaction";
const DICOM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const ENTITY_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-entity-type";
const OBJECT_ROLE: &str = "http://terminology.hl7.org/CodeSystem/object-role";
const BALP_ENTITY_TYPE: &str = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType";
const BALP_PROFILE: &str = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.";
/// Identifier systems of Bulkhead's clients and users (not resolvable URLs: names).
const CLIENT_SYSTEM: &str = "urn:bulkhead:client";
const USER_SYSTEM: &str = "urn:bulkhead:user";

/// A record as one JSON object (the `--json` line and the admin API's NDJSON).
pub fn record_json(record: &AuditRecord, tenant_name: &str) -> Value {
    let detail: Value = serde_json::from_str(&record.detail).unwrap_or_else(|_| json!({}));
    let mut line = json!({
        "seq": record.seq,
        "time": format_instant(record.time),
        "tenant": tenant_name,
        "client": record.client,
        "user": record.user,
        "peer": record.peer,
        "request_id": record.request_id,
        "action": record.action,
        "target": record.target,
        "outcome": record.outcome,
        "status": record.status,
        "patients": record.patients.iter().map(|id| format!("Patient/{id}")).collect::<Vec<_>>(),
        "detail": detail,
    });
    if let Some(cohort) = &record.cohort {
        line["cohort"] = json!({"group": format!("Group/{}", cohort.group_id), "transaction_time": format_instant(cohort.transaction_time)});
    }
    line
}

/// `(subtype code, AuditEvent.action, BALP profile for a success)` of an action.
fn interaction(action: &str) -> (&'static str, &'static str, Option<&'static str>) {
    match action {
        "read" => ("read", "R", Some("Read")),
        "vread" => ("vread", "R", Some("Read")),
        "history" => ("history-instance", "R", None),
        "search" => ("search-type", "E", Some("Query")),
        "create" => ("create", "C", Some("Create")),
        "update" => ("update", "U", Some("Update")),
        "delete" => ("delete", "D", Some("Delete")),
        "transaction" => ("transaction", "E", None),
        "batch" => ("batch", "E", None),
        "export.download" | "export.status" | "audit.read" => ("operation", "R", None),
        "export.cancel" | "client.revoke" => ("operation", "D", None),
        "client.create" | "tenant.create" | "token.issue" => ("operation", "C", None),
        _ => ("operation", "E", None),
    }
}

/// R4 `AuditEvent.outcome`: 0 success, 4 minor failure (refused), 8 serious failure (ours or
/// aborted).
fn outcome_code(outcome: &str) -> &'static str {
    match outcome {
        "success" => "0",
        "failure" => "4",
        _ => "8",
    }
}

/// A record as a FHIR R4 `AuditEvent` (BALP-shaped); `base` is the server's FHIR base URL.
pub fn audit_event(record: &AuditRecord, tenant_name: &str, base: &str) -> Value {
    let (subtype, action, profile) = interaction(&record.action);
    let patient_profile = !record.patients.is_empty();
    let mut event = json!({
        "resourceType": "AuditEvent",
        "id": format!("{tenant_name}-{}", record.seq).chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.')).take(64).collect::<String>(),
        "type": event_type(record),
        "subtype": [{"system": RESTFUL_INTERACTION, "code": subtype}],
        "action": action,
        "recorded": format_instant(record.time),
        "outcome": outcome_code(&record.outcome),
        "outcomeDesc": match record.status {
            0 => format!("{} (command line): {}", record.outcome, record.action),
            status => format!("{} (HTTP {status}): {}", record.outcome, record.action),
        },
        "agent": agents(record, base),
        "source": {
            "site": tenant_name,
            "observer": {"display": format!("Bulkhead at {base}")},
            "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4", "display": "Application Server"}],
        },
        "entity": entities(record),
    });
    if let Some(profile) = profile.filter(|_| record.outcome == "success") {
        let name = if patient_profile { format!("Patient{profile}") } else { profile.to_owned() };
        event["meta"] = json!({"profile": [format!("{BALP_PROFILE}{name}")]});
    }
    event
}

/// `rest` for what came over the API; DICOM "Application Activity" for command-line actions
/// (status 0), which no REST request carried.
fn event_type(record: &AuditRecord) -> Value {
    if record.status == 0 {
        json!({"system": DICOM, "code": "110100", "display": "Application Activity"})
    } else {
        json!({"system": AUDIT_EVENT_TYPE, "code": "rest", "display": "Restful Operation"})
    }
}

fn agents(record: &AuditRecord, base: &str) -> Value {
    let mut client = json!({
        "type": {"coding": [{"system": DICOM, "code": "110153", "display": "Source Role ID"}]},
        "who": {"identifier": {"system": CLIENT_SYSTEM, "value": record.client}},
        "requestor": true,
    });
    if let Some(peer) = &record.peer {
        let address = peer.parse::<std::net::SocketAddr>().map_or_else(|_| peer.clone(), |peer| peer.ip().to_string());
        client["network"] = json!({"address": address, "type": "2"});
    }
    let server = json!({
        "type": {"coding": [{"system": DICOM, "code": "110152", "display": "Destination Role ID"}]},
        "who": {"display": "Bulkhead"},
        "requestor": false,
        "network": {"address": base, "type": "5"},
    });
    let mut agents = vec![client, server];
    if let Some(user) = &record.user {
        agents.push(json!({
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type", "code": "humanuser", "display": "human user"}]},
            "who": {"identifier": {"system": USER_SYSTEM, "value": user}},
            "requestor": true,
        }));
    }
    Value::Array(agents)
}

fn entities(record: &AuditRecord) -> Value {
    let mut entities = Vec::new();
    let detail: Value = serde_json::from_str(&record.detail).unwrap_or_else(|_| json!({}));
    if record.action == "search" {
        let query: String = detail["parameters"]
            .as_array()
            .map(|pairs| {
                let mut query = form_urlencoded::Serializer::new(String::new());
                for pair in pairs {
                    query.append_pair(pair[0].as_str().unwrap_or(""), pair[1].as_str().unwrap_or(""));
                }
                query.finish()
            })
            .unwrap_or_default();
        use base64::Engine;
        entities.push(json!({
            "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
            "role": {"system": OBJECT_ROLE, "code": "24", "display": "Query"},
            "description": record.target,
            "query": base64::engine::general_purpose::STANDARD.encode(format!("{}?{query}", record.target)),
        }));
    } else if !record.target.is_empty() {
        let what = if record.target.contains('/') && !record.target.starts_with('$') {
            json!({"reference": record.target})
        } else {
            json!({"display": record.target})
        };
        let mut entity = json!({
            "what": what,
            "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
            "role": {"system": OBJECT_ROLE, "code": "4", "display": "Domain Resource"},
        });
        let details: Vec<Value> = detail
            .as_object()
            .map(|fields| {
                fields
                    .iter()
                    .map(|(name, value)| {
                        let text = value.as_str().map_or_else(|| value.to_string(), str::to_owned);
                        json!({"type": name, "valueString": text})
                    })
                    .collect()
            })
            .unwrap_or_default();
        if !details.is_empty() {
            entity["detail"] = Value::Array(details);
        }
        entities.push(entity);
    }
    for patient in &record.patients {
        entities.push(json!({
            "what": {"reference": format!("Patient/{patient}")},
            "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
            "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"},
        }));
    }
    if let Some(cohort) = &record.cohort {
        entities.push(json!({
            "what": {"reference": format!("Group/{}", cohort.group_id)},
            "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
            "role": {"system": OBJECT_ROLE, "code": "4", "display": "Domain Resource"},
            "description": format!("the export's cohort at its transaction time {}", format_instant(cohort.transaction_time)),
        }));
    }
    if !record.request_id.is_empty() {
        entities.push(json!({
            "what": {"identifier": {"value": record.request_id}},
            "type": {"system": BALP_ENTITY_TYPE, "code": "XrequestId", "display": "X-Request-Id"},
        }));
    }
    Value::Array(entities)
}

#[cfg(test)]
mod tests {
    use bulkhead_store::{AuditCohort, TenantId};

    use super::*;

    fn record(action: &str, outcome: &str, patients: &[&str]) -> AuditRecord {
        AuditRecord {
            seq: 7,
            time: 1_700_000_000_000_000,
            tenant: TenantId(1),
            client: "bh_client".into(),
            user: Some("u-1".into()),
            peer: Some("127.0.0.1:40000".into()),
            request_id: "req-1".into(),
            action: action.into(),
            target: "Patient/p1/_history/2".into(),
            outcome: outcome.into(),
            status: 200,
            detail: r#"{"parameters":[["identifier","urn:mrn|1"]],"returned":3}"#.into(),
            patients: patients.iter().map(|id| id.to_string()).collect(),
            cohort: None,
        }
    }

    /// Every action and outcome gives an AuditEvent the R4 validator accepts.
    #[test]
    fn every_kind_of_record_is_a_valid_r4_audit_event() {
        let actions = [
            "read",
            "vread",
            "history",
            "search",
            "create",
            "update",
            "delete",
            "upload",
            "export.kickoff",
            "export.status",
            "export.cancel",
            "export.download",
            "token.issue",
            "client.create",
            "client.revoke",
            "tenant.create",
            "audit.read",
        ];
        for action in actions {
            for outcome in ["success", "failure", "error", "aborted"] {
                let mut record = record(action, outcome, &["p1", "p2"]);
                record.cohort = Some(AuditCohort { group_id: "g1".into(), transaction_time: 1_700_000_000_000_000 });
                let event = audit_event(&record, "acme", "http://127.0.0.1:8080");
                let violations = bulkhead_fhir::validation::validate_resource(&event);
                assert!(violations.is_empty(), "{action}/{outcome}: {violations:?}\n{event:#}");
            }
        }
        let bare = AuditRecord {
            user: None,
            peer: None,
            request_id: String::new(),
            detail: "{}".into(),
            status: 0,
            ..record("tenant.create", "success", &[])
        };
        let event = audit_event(&bare, "acme", "http://h");
        assert!(bulkhead_fhir::validation::validate_resource(&event).is_empty(), "{event:#}");
        assert_eq!(event["type"]["code"], "110100", "a command-line action is no REST operation");
        // The validator does look at AuditEvents: a wrong instant or code is caught.
        for (element, wrong) in [("recorded", json!("yesterday")), ("outcome", json!("7")), ("action", json!("X"))] {
            let mut broken = event.clone();
            broken[element] = wrong;
            assert!(!bulkhead_fhir::validation::validate_resource(&broken).is_empty(), "{element} not checked");
        }
    }

    #[test]
    fn balp_shape_and_profiles() {
        let event = audit_event(&record("read", "success", &["p1"]), "acme", "http://h");
        assert_eq!(event["meta"]["profile"][0], format!("{BALP_PROFILE}PatientRead"));
        assert_eq!((event["action"].as_str(), event["outcome"].as_str()), (Some("R"), Some("0")));
        assert_eq!(event["subtype"][0]["code"], "read");
        assert_eq!(event["agent"][0]["who"]["identifier"]["value"], "bh_client");
        assert_eq!(event["agent"][0]["network"]["address"], "127.0.0.1");
        assert_eq!(event["agent"][2]["who"]["identifier"]["value"], "u-1");
        let entities = event["entity"].as_array().unwrap();
        assert!(entities
            .iter()
            .any(|entity| entity["what"]["reference"] == "Patient/p1" && entity["role"]["code"] == "1"));
        assert!(entities
            .iter()
            .any(|entity| entity["type"]["code"] == "XrequestId" && entity["what"]["identifier"]["value"] == "req-1"));

        let query = audit_event(&record("search", "success", &[]), "acme", "http://h");
        assert_eq!(query["meta"]["profile"][0], format!("{BALP_PROFILE}Query"));
        use base64::Engine;
        let text =
            base64::engine::general_purpose::STANDARD.decode(query["entity"][0]["query"].as_str().unwrap()).unwrap();
        assert_eq!(String::from_utf8(text).unwrap(), "Patient/p1/_history/2?identifier=urn%3Amrn%7C1");
        let refused = audit_event(&record("read", "failure", &[]), "acme", "http://h");
        assert!(refused.get("meta").is_none(), "BALP profiles describe successes only");
        assert_eq!(refused["outcome"], "4");
    }

    #[test]
    fn the_json_line_has_the_documented_fields() {
        let line = record_json(&record("read", "success", &["p1"]), "acme");
        for field in ["time", "tenant", "client", "user", "action", "target", "outcome", "request_id"] {
            assert!(line.get(field).is_some_and(|value| !value.is_null()), "{field}: {line}");
        }
        assert_eq!(line["time"], "2023-11-14T22:13:20.000000Z");
        assert_eq!(line["patients"][0], "Patient/p1");
    }
}
