//! `bulkhead audit`: a tenant's audit trail from the data directory (text, `--json` lines, or
//! `--fhir` AuditEvent NDJSON), `--prune` by `audit_retention_days`; the server's pruning
//! thread; and the records of the command line's own admin actions.

use std::sync::Arc;
use std::time::Duration;

use bulkhead_fhir::{format_instant, now_micros, parse_since};
use bulkhead_http::audit_api::{patient_id, write_records, AuditFormat, AuditRequest};
use bulkhead_store::{AuditQuery, AuditRecord, Store, TenantId};
use clap::Args;

use crate::admin::{find_tenant, open_existing_store};
use crate::cli::ConfigArgs;

const MICROS_PER_DAY: i64 = 86_400 * 1_000_000;

#[derive(Args)]
pub struct AuditArgs {
    /// The tenant whose records to show.
    #[arg(long, required_unless_present = "prune")]
    tenant: Option<String>,
    /// Only records at or after this instant or date (`2026-01-31`, `2026-01-31T10:00:00Z`).
    #[arg(long)]
    since: Option<String>,
    /// Only records of this client id.
    #[arg(long)]
    client: Option<String>,
    /// Only records touching this patient (`Patient/ID` or `ID`): accesses of resources in its
    /// compartment, and exports whose Group had it as a member at the export's transaction time.
    #[arg(long)]
    patient: Option<String>,
    /// Only records of this action (`read`, `export.download`, …).
    #[arg(long)]
    action: Option<String>,
    /// One JSON object per line.
    #[arg(long, conflicts_with = "fhir")]
    json: bool,
    /// One FHIR R4 AuditEvent (IHE BALP-shaped) per line, NDJSON.
    #[arg(long)]
    fhir: bool,
    /// Delete every tenant's records older than `audit_retention_days` (what the server does hourly).
    #[arg(long, conflicts_with_all = ["tenant", "since", "client", "patient", "action", "json", "fhir"])]
    prune: bool,
    #[command(flatten)]
    config: ConfigArgs,
}

pub fn run(args: AuditArgs) -> anyhow::Result<()> {
    let config = args.config.load_for_tool()?;
    let store = open_existing_store(&config)?;
    if args.prune {
        let pruned = prune(&*store, config.audit_retention_days)?;
        say!("pruned {pruned} audit records older than {} days", config.audit_retention_days);
        return Ok(());
    }
    let tenant = find_tenant(&*store, &config, args.tenant.as_deref().unwrap_or_default())?;
    let since = args.since.as_deref().map(parse_since).transpose()?;
    let query = AuditQuery {
        since,
        client: args.client,
        patient: args.patient.as_deref().map(|patient| patient_id(patient).to_owned()),
        action: args.action,
        after_seq: None,
        limit: 1_000,
    };
    let format = if args.fhir { AuditFormat::AuditEvent } else { AuditFormat::Json };
    let request = AuditRequest { tenant: tenant.name.clone(), query, limit: None, format };
    let base = config.public_base_url.clone().unwrap_or_else(|| format!("http://{}", config.listen));
    if args.json || args.fhir {
        write_records(&*store, &tenant, &request, &base, |chunk| crate::output::bytes(&chunk))?;
        return Ok(());
    }
    // Text: one record per line, tab-separated, for a terminal.
    let mut query = request.query;
    loop {
        let page = store.audit_records(tenant.id, &query)?;
        for record in &page {
            say!(
                "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                format_instant(record.time),
                record.client,
                record.user.as_deref().unwrap_or("-"),
                record.action,
                record.target,
                record.outcome,
                record.request_id
            );
        }
        if page.len() < query.limit {
            return Ok(());
        }
        query.after_seq = page.last().map(|record| record.seq);
    }
}

/// Deletes records older than `retention_days` (0: keeps everything); returns how many.
pub fn prune(store: &dyn Store, retention_days: u64) -> anyhow::Result<u64> {
    if retention_days == 0 {
        return Ok(0);
    }
    let days = i64::try_from(retention_days).unwrap_or(i64::MAX);
    Ok(store.prune_audit(now_micros().saturating_sub(days.saturating_mul(MICROS_PER_DAY)))?)
}

/// How often the server prunes the audit trail.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// Prunes the audit trail now and then hourly, for as long as the store lives.
pub fn spawn_pruning(store: &Arc<dyn Store>, retention_days: u64) {
    if retention_days == 0 {
        return;
    }
    let store = Arc::downgrade(store);
    let spawned = std::thread::Builder::new().name("audit-pruning".into()).spawn(move || loop {
        let Some(live) = store.upgrade() else { return };
        match prune(live.as_ref(), retention_days) {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(pruned, retention_days, "audit trail pruned"),
            Err(error) => tracing::warn!(error = %error, "audit pruning failed"),
        }
        drop(live);
        std::thread::sleep(PRUNE_INTERVAL);
    });
    if let Err(error) = spawned {
        tracing::warn!(error = %error, "could not start the audit pruning thread");
    }
}

/// Records an admin action taken on the command line (client `cli`; the operating-system user
/// in the detail). A record that cannot be stored is a warning: the action itself is done.
pub fn record_command(store: &dyn Store, tenant: TenantId, action: &str, target: &str) {
    record_command_outcome(store, tenant, action, target, true, serde_json::Map::new());
}

/// [`record_command`] with an outcome and details (an import's counts per type).
pub fn record_command_outcome(
    store: &dyn Store,
    tenant: TenantId,
    action: &str,
    target: &str,
    succeeded: bool,
    mut detail: serde_json::Map<String, serde_json::Value>,
) {
    detail.insert("os_user".into(), std::env::var("USER").unwrap_or_default().into());
    let record = AuditRecord {
        seq: 0,
        time: now_micros(),
        tenant,
        client: "cli".into(),
        user: None,
        peer: None,
        request_id: String::new(),
        action: action.into(),
        target: target.into(),
        outcome: if succeeded { "success" } else { "error" }.into(),
        status: 0,
        detail: serde_json::Value::Object(detail).to_string(),
        patients: Vec::new(),
        cohort: None,
    };
    if let Err(error) = store.append_audit(&[record]) {
        crate::warn(&format!("the audit record of {action} {target} could not be stored: {error}"));
    }
}
