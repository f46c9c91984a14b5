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
            let interactions: Vec<Value> =
                ["create", "read", "vread", "update", "delete", "history-instance", "search-type"]
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
            match *name {
                "Group" => {
                    resource["operation"] = json!([export_operation(
                        "group-export",
                        &format!("the compartments of the Group's members, and the Group itself; {ASSOCIATED_DATA}")
                    )])
                }
                "Patient" => {
                    resource["operation"] = json!([export_operation(
                        "patient-export",
                        &format!(
                            "the compartments of all the tenant's Patients (no Group resources); {ASSOCIATED_DATA}"
                        )
                    )])
                }
                _ => {}
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
                "extension": [{
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [{"url": "token", "valueUri": format!("{base}{}", crate::token_endpoint::TOKEN_PATH)}]
                }],
                "service": [{
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}],
                    "text": "SMART Backend Services (client_credentials with private_key_jwt; see [base]/.well-known/smart-configuration)"
                }],
                "description": "Two ways in, on every request: (1) a bearer access token from the token endpoint (SMART Backend Services: client_credentials grant, private_key_jwt client assertion signed RS384/ES384, RS256/ES256; SMART v1 and v2 system scopes); (2) client credentials, as the headers client_id and client_secret (hyphenated spellings accepted) or as HTTP Basic. Optional x-oneup-user-id (a user id, or 'client' for the whole tenant)."
            },
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
            "operation": [export_operation("export", "every resource of the tenant the caller may read, of every type")]
        }]
    })
}

/// Bulk Data kick-off parameters and how they are treated (the same at every level).
const EXPORT_PARAMETERS: &str = "GET (query string) or POST (a Parameters body). Parameters: _outputFormat (application/fhir+ndjson, application/ndjson, ndjson), _since, _until, _type, _typeFilter, _elements, patient (POST only; Patient and Group levels); allowPartialManifests, _minimumFileSize and _maximumFileSize are accepted as hints. Unsupported parameters or values are a 400 OperationOutcome unless Prefer: handling=lenient, which ignores them and lists each in the manifest's error[]. _typeFilter: FHIR search queries per type (several for one type are OR'ed), with R4 token parameters ([system]|[code], |code, system|), reference parameters (Type/id or id), date parameters (prefixes eq, ne, gt, lt, ge, le, sa, eb), string parameters (default and :exact), _id and _lastUpdated; other parameter kinds, modifiers and chains are refused. _elements: root elements (Type.element or element); mandatory elements, id and meta are kept and meta.tag SUBSETTED added. Manner: under [base]/r4 a kick-off is always asynchronous (202 and an absolute Content-Location; GET it for 200 with the manifest, DELETE to cancel); under [base]/bulk-data/r4 a kick-off without Prefer: respond-async answers 200 with the manifest at once (1upHealth style).";

/// What Patient and Group exports add (README "Associated data").
const ASSOCIATED_DATA: &str = "self-contained: every Provenance targeting an exported resource, and the resources outside the Patient compartment that exported resources reference (Practitioner, Organization, Location, Medication, ...), followed up to 3 references deep; with _type only the named types. includeAssociatedData: LatestProvenanceResources, RelevantProvenanceResources, and _noReferencedResources to leave referenced resources out";

/// One `$export` operation entry: `definition` names the Bulk Data OperationDefinition.
fn export_operation(definition: &str, covers: &str) -> Value {
    json!({
        "name": "export",
        "definition": format!("http://hl7.org/fhir/uv/bulkdata/OperationDefinition/{definition}"),
        "documentation": format!("Exports {covers}. {EXPORT_PARAMETERS}"),
    })
}

pub fn metadata_response(base: &str) -> Response {
    fhir_response(StatusCode::OK, capability_statement(base).to_string())
}
