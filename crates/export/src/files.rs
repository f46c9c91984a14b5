//! Producing one export file from its claims: NDJSON lines streamed from the store.

use std::io::Write;

use bulkhead_fhir::{operation_outcome, Issue, IssueType};
use bulkhead_store::{PartRange, Store, TenantId, Visibility};
use serde_json::json;

use crate::associated::deleted_outside_set;
use crate::group::{export_view, missing_members, ExportError, ExportView};
use crate::token::{FileClaims, FileKind};

/// Checks that the file's view can be rebuilt as planned (the Group still has, at the
/// transaction time, the version the plan saw) and returns it.
pub fn open_file_view(store: &dyn Store, claims: &FileClaims) -> Result<ExportView, ExportError> {
    let visibility = match &claims.user {
        Some(user) => Visibility::User(user.clone()),
        None => Visibility::Tenant,
    };
    let view = export_view(
        store,
        TenantId(claims.tenant),
        &visibility,
        &claims.group,
        claims.since,
        claims.until,
        claims.transaction_time,
    )?;
    if view.group.version != claims.group_version {
        return Err(ExportError::NotFound(format!(
            "Group/{} version {} is not the exported one",
            claims.group, claims.group_version
        )));
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
    match (claims.kind, claims.resource_type.as_str()) {
        (FileKind::Output, "Group") => {
            let body = view.group.body.as_deref().unwrap_or("{}");
            out.write_all(body.as_bytes()).and_then(|_| out.write_all(b"\n")).map_err(sink_error)?;
            Ok(1)
        }
        (FileKind::Output, resource_type) => {
            let range = PartRange { first_key: claims.start, last_key: claims.end, count: claims.total };
            let mut reader = match &claims.associated_set {
                Some(set) => store.associated_reader(tenant, &view.selection, set, resource_type, range),
                None => store.part_reader(tenant, &view.selection, resource_type, range),
            };
            let mut window = Vec::with_capacity(WINDOW_BYTES + WINDOW_BYTES / 4);
            let mut written = 0;
            loop {
                window.clear();
                match reader.next_window(&mut window, WINDOW_BYTES)? {
                    0 => return Ok(written),
                    read => written += read,
                }
                // No read transaction is open here: `out` may block on a slow client.
                out.write_all(&window).map_err(sink_error)?;
            }
        }
        (FileKind::Deleted, resource_type) => {
            let set = claims.export_associated_set.as_deref();
            let deleted = deleted_outside_set(store, tenant, &view.selection, resource_type, set)?;
            for (id, _) in &deleted {
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
        (FileKind::Error, _) => {
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
