//! Producing one export file from its claims: NDJSON lines streamed from the store.

use std::io::Write;

use bulkhead_fhir::{operation_outcome, Issue, IssueType};
use bulkhead_store::{PartRange, Store, TenantId, Visibility};
use serde_json::json;

use crate::elements::ElementSubset;
use crate::group::{deleted_ids, export_view, group_text, missing_members, ExportError, ExportView, ViewSpec};
use crate::organize::BlockWriter;
use crate::token::{FileClaims, FileKind};

/// Checks that the file's view can be rebuilt as planned (a Group export's Group still has, at
/// the transaction time, the version the plan saw) and returns it.
pub fn open_file_view(store: &dyn Store, claims: &FileClaims) -> Result<ExportView, ExportError> {
    let visibility = match &claims.user {
        Some(user) => Visibility::User(user.clone()),
        None => Visibility::Tenant,
    };
    let spec = ViewSpec {
        level: &claims.level,
        patients: claims.patients.as_deref(),
        type_filters: &claims.type_filters,
        since: claims.since,
        until: claims.until,
        transaction_time: claims.transaction_time,
    };
    let view = export_view(store, TenantId(claims.tenant), &visibility, &spec)?;
    if let Some(group) = &view.group {
        if group.version != claims.group_version {
            return Err(ExportError::NotFound(format!(
                "Group/{} version {} is not the exported one",
                group.id, claims.group_version
            )));
        }
    }
    Ok(view)
}

/// Bytes of an output file read from the store at a time, each window in its own short read
/// transaction: with the caller's buffers, this bounds a download's memory.
pub const WINDOW_BYTES: usize = 1 << 20;

/// Writes the file's NDJSON lines to `out`; returns how many lines were written. No database
/// transaction is open while `out` is written to, so `out` may block (on a slow client).
pub fn write_file(
    store: &dyn Store,
    claims: &FileClaims,
    view: &ExportView,
    out: &mut dyn Write,
) -> Result<u64, ExportError> {
    let sink_error = |error: std::io::Error| ExportError::Sink(error.to_string());
    let tenant = TenantId(claims.tenant);
    let subset = claims.elements.as_deref().map(ElementSubset::new);
    let subset = subset.filter(|subset| subset.applies_to(&claims.resource_type));
    match (claims.kind, claims.resource_type.as_str(), &view.group) {
        // A Group export's own Group line.
        (FileKind::Output, "Group", Some(_)) => {
            let text = group_text(store, tenant, view)?;
            let body = text.as_deref().unwrap_or("{}");
            let mut line = Vec::new();
            match &subset {
                Some(subset) => subset.apply("Group", body.as_bytes(), &mut line),
                None => {
                    line.extend_from_slice(body.as_bytes());
                    line.push(b'\n');
                }
            }
            out.write_all(&line).map_err(sink_error)?;
            Ok(1)
        }
        (FileKind::Output, _, _) if claims.members.is_some() => {
            let ([first, end], Some(spec)) = (claims.members.unwrap_or_default(), &claims.organized) else {
                return Err(ExportError::NotFound("an organised file without its block description".to_owned()));
            };
            let writer = BlockWriter {
                store,
                tenant,
                view,
                spec,
                set_id: claims.export_associated_set.as_deref(),
                elements: claims.elements.as_deref(),
            };
            let index = |value: u64| usize::try_from(value).unwrap_or(usize::MAX);
            writer.write_members(index(first), index(end), out)
        }
        (FileKind::Output, resource_type, _) => {
            let range = PartRange { first_key: claims.start, last_key: claims.end, count: claims.total };
            let mut reader = match &claims.associated_set {
                Some(set) => store.associated_reader(tenant, &view.selection, set, resource_type, range),
                None => store.part_reader(tenant, &view.selection, resource_type, range),
            };
            let mut window = Vec::with_capacity(WINDOW_BYTES + WINDOW_BYTES / 4);
            let mut subsetted = Vec::new();
            let mut written = 0;
            loop {
                window.clear();
                match reader.next_window(&mut window, WINDOW_BYTES)? {
                    0 => return Ok(written),
                    read => written += read,
                }
                // No read transaction is open here: `out` may block on a slow client.
                match &subset {
                    Some(subset) => {
                        subsetted.clear();
                        for line in window.split(|byte| *byte == b'\n').filter(|line| !line.is_empty()) {
                            subset.apply(resource_type, line, &mut subsetted);
                        }
                        out.write_all(&subsetted).map_err(sink_error)?;
                    }
                    None => out.write_all(&window).map_err(sink_error)?,
                }
            }
        }
        (FileKind::Deleted, resource_type, _) => {
            let deleted = deleted_ids(store, tenant, view, resource_type, claims.export_associated_set.as_deref())?;
            for id in &deleted {
                // Bulk Data IG: each line a transaction Bundle with DELETE entries.
                let line = json!({
                    "resourceType": "Bundle",
                    "type": "transaction",
                    "entry": [{"request": {"method": "DELETE", "url": format!("{resource_type}/{id}")}}],
                });
                writeln!(out, "{line}").map_err(sink_error)?;
            }
            Ok(deleted.len() as u64)
        }
        (FileKind::Error, _, _) => {
            let mut written = 0;
            for warning in &claims.warnings {
                // Already an OperationOutcome line (see `plan_group_export`).
                writeln!(out, "{warning}").map_err(sink_error)?;
                written += 1;
            }
            for member in missing_members(store, tenant, view)? {
                let issue = Issue::error(
                    IssueType::NotFound,
                    format!("Group member Patient/{member} does not exist in this tenant; it has no data to export"),
                )
                .at("Group.member.entity");
                writeln!(out, "{}", operation_outcome(&[issue])).map_err(sink_error)?;
                written += 1;
            }
            Ok(written)
        }
    }
}
