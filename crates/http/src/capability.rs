//! `GET /r4/metadata`: a CapabilityStatement that says what is really implemented.

use axum::http::StatusCode;
use axum::response::Response;
use bulkhead_fhir::{format_instant, now_micros, RESOURCE_TYPES};
use serde_json::{json, Value};

use crate::negotiation::fhir_response;
use crate::search::SEARCH_PARAMS;

/// Builds the CapabilityStatement for `base` (the absolute server URL).
pub fn capability_statement(base: &str) -> Value {
    let search_params: Vec<Value> = SEARCH_PARAMS
        .iter()
        .map(|(name, kind, documentation)| json!({"name": name, "type": kind, "documentation": documentation}))
        .collect();
    let resources: Vec<Value> = RESOURCE_TYPES
        .iter()
        .filter(|name| !matches!(**name, "Bundle" | "OperationOutcome" | "Parameters"))
        .map(|name| {
            let interactions: Vec<Value> = ["create", "read", "vread", "update", "delete", "history-instance", "search-type"]
                .iter()
                .map(|code| json!({"code": code}))
                .collect();
            let mut resource = json!({
                "type": name,
                "interaction": interactions,
                "versioning": "versioned",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": true,
                "searchParam": search_params,
            });
            if *name == "Group" {
                resource["operation"] = json!([{
                    "name": "export",
                    "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export",
                    "documentation": "Without Prefer: respond-async: 200 with the manifest at once (synchronous). With Prefer: respond-async: 202 and an absolute Content-Location [base]/bulk-data/r4/$export-status/{job}; GET it for 200 with the manifest (application/json, Expires), DELETE it to cancel (202; later polls 404). Prefer: handling=lenient ignores unsupported parameters. Parameters: _type, _since, _until, _outputFormat (NDJSON), includeAssociatedData (LatestProvenanceResources, RelevantProvenanceResources; _noReferencedResources turns referenced resources off). Self-contained: Provenance targeting any exported resource, and resources outside the Patient compartment that exported resources reference (Practitioner, Organization, Location, Medication, ...), followed up to 3 references deep; with _type, only the named types (README: Associated data)."
                }]);
            }
            resource
        })
        .collect();
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": format_instant(now_micros()),
        "kind": "instance",
        "software": {"name": "Bulkhead", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "Bulkhead multi-tenant FHIR R4 bulk export server", "url": format!("{base}/r4")},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "application/json"],
        "instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"],
        "rest": [{
            "mode": "server",
            "security": {
                "description": "Client headers on every request: client_id and client_secret (hyphenated spellings accepted), optional x-oneup-user-id (a user id, or 'client' for the whole tenant)."
            },
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
            "operation": [{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export"}]
        }]
    })
}

pub fn metadata_response(base: &str) -> Response {
    fhir_response(StatusCode::OK, capability_statement(base).to_string())
}
