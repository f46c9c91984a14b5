//! `bulkhead demo`: everything on the embedded default in one command: a tenant, a client,
//! synthetic patients, a Group, a live server, and a real export printed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bulkhead_store::{SearchQuery, Store, Visibility, WriteMode, WriteOp};
use clap::Args;
use serde_json::{json, Value};

use crate::admin::{data_dir_flag, find_tenant, new_client, open_store};
use crate::config::{Config, Overrides};
use crate::output::count;
use crate::serve::{app_state, init_logging, server_runtime, shutdown_signal};

const TENANT: &str = "demo";
const GROUP: &str = "demo-cohort";

#[derive(Args)]
pub struct DemoArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Data directory for the demo.
    #[arg(long, default_value = "./bulkhead-demo")]
    pub data_dir: PathBuf,
    /// Synthetic patients to load the first time [default: 300]; a data directory that already
    /// holds the demo's data keeps it (use a new --data-dir to generate again).
    #[arg(long)]
    pub patients: Option<u64>,
    /// Members of the demo Group.
    #[arg(long, default_value_t = 100)]
    pub group_size: usize,
    /// Stop after showing the export instead of serving until Ctrl-C (no curl lines then: the
    /// server they would call has stopped).
    #[arg(long)]
    pub once: bool,
}

/// Patients generated when `--patients` is not given.
const DEFAULT_PATIENTS: u64 = 300;

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let config = Config::load(
        None,
        Overrides { listen: Some(args.listen.clone()), data_dir: Some(args.data_dir.clone()), ..Overrides::default() },
    )?;
    if std::env::var_os("RUST_LOG").is_none() {
        // Keep the demo's own output readable; RUST_LOG=info shows request logs.
        std::env::set_var("RUST_LOG", "warn");
    }
    crate::set_memory_profile(crate::MemoryProfile::Server);
    init_logging(config.log_format);
    config.warn_ignored();
    // Bind before anything else: a port in use must fail now, not after minutes of generating.
    let listener = std::net::TcpListener::bind(&config.listen).with_context(|| format!("binding {}", config.listen))?;
    let store: Arc<dyn Store> = open_store(&config)?.shared();
    let (client_id, client_secret) = prepare_data(&store, &config, &args)?;
    let state = app_state(&config)?;
    server_runtime(&config)?.block_on(async move {
        listener.set_nonblocking(true).context("configuring the listener")?;
        let listener = tokio::net::TcpListener::from_std(listener).context("configuring the listener")?;
        let base = format!("http://{}", listener.local_addr()?);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let once = args.once;
        let shutdown = async move {
            if once {
                let _ = stop_rx.await;
            } else {
                shutdown_signal().await;
            }
        };
        let server = tokio::spawn(bulkhead_http::serve(listener, state, shutdown, Duration::from_secs(5)));
        let transaction_time = show_export(&base, &client_id, &client_secret).await?;
        if once {
            let _ = stop_tx.send(());
            say!(
                "\nthe server has stopped (--once). To try the API with curl, run it again without --once:\n  bulkhead demo --listen {} {}",
                config.listen,
                data_dir_flag(&config)
            );
        } else {
            print_curl_lines(&base, &client_id, &client_secret, &transaction_time);
            say!("\nserving on {base} with data in {}; Ctrl-C stops", config.data_dir.display());
        }
        server.await.context("server task")??;
        Ok(())
    })
}

/// Creates the tenant, synthetic data and Group on first use; a new client every run.
fn prepare_data(store: &Arc<dyn Store>, config: &Config, args: &DemoArgs) -> anyhow::Result<(String, String)> {
    if store.tenant_by_name(TENANT)?.is_none() {
        store.create_tenant(TENANT)?;
    }
    let tenant = find_tenant(store.as_ref(), config, TENANT)?;
    let patients = patient_ids(store.as_ref(), tenant.id, args.group_size)?;
    if patients.is_empty() {
        let wanted = args.patients.unwrap_or(DEFAULT_PATIENTS);
        let synth_dir = config.data_dir.join("synth");
        say!("generating {} into {} …", count(wanted, "synthetic patient"), synth_dir.display());
        let options =
            bulkhead_synth::SynthOptions { patients: wanted, seed: 1, format: bulkhead_synth::OutputFormat::Ndjson };
        // Patient data, even synthetic, stays private like the rest of the data directory.
        crate::private_files::create_private_dir(&synth_dir)?;
        let bar = crate::synth::patients_bar(wanted);
        bulkhead_synth::generate_with_progress(&options, &synth_dir, |done| {
            if done % 16 == 0 || done == wanted {
                bar.set_position(done);
            }
        })?;
        bar.finish_and_clear();
        let started = Instant::now();
        let summary = crate::import::import_into(store.clone(), config, TENANT, &[synth_dir])?;
        crate::import::report(&summary, started.elapsed().as_secs_f64());
    } else if let Some(wanted) = args.patients {
        say!(
            "--patients {wanted} is ignored: {} already holds the demo's data (use a new --data-dir to generate again)",
            config.data_dir.display()
        );
    }
    let members = patient_ids(store.as_ref(), tenant.id, args.group_size)?;
    let member: Vec<Value> =
        members.iter().map(|id| json!({"entity": {"reference": format!("Patient/{id}")}})).collect();
    let group = json!({"resourceType": "Group", "id": GROUP, "type": "person", "actual": true, "name": "Demo cohort", "member": member});
    let op = WriteOp::Update { resource_type: "Group".into(), id: GROUP.into(), body: group, if_match: None };
    store.write(tenant.id, None, &[op], WriteMode::Transaction)?.remove(0)?;
    say!("tenant '{TENANT}' has Group/{GROUP} with {}", count(members.len() as u64, "member"));
    let (client_id, client_secret) = new_client(store.as_ref(), config, TENANT)?;
    Ok((client_id, client_secret))
}

fn patient_ids(store: &dyn Store, tenant: bulkhead_store::TenantId, limit: usize) -> anyhow::Result<Vec<String>> {
    let query =
        SearchQuery { resource_type: "Patient".into(), count: limit.clamp(1, 1000) as u32, ..Default::default() };
    Ok(store.search(tenant, &Visibility::Tenant, &query)?.resources.into_iter().map(|patient| patient.id).collect())
}

/// Runs the synchronous Group export against the live server, prints what came back, and
/// returns its `transactionTime`.
async fn show_export(base: &str, client_id: &str, client_secret: &str) -> anyhow::Result<String> {
    let http = reqwest::Client::new();
    let started = Instant::now();
    let manifest: Value = http
        .get(format!("{base}/bulk-data/r4/Group/{GROUP}/$export"))
        .header("client_id", client_id)
        .header("client_secret", client_secret)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    say!(
        "\nGET /bulk-data/r4/Group/{GROUP}/$export → 200 in {} ms, transactionTime {}",
        started.elapsed().as_millis(),
        manifest["transactionTime"]
    );
    let outputs = manifest["output"].as_array().cloned().unwrap_or_default();
    let mut total = 0;
    for output in &outputs {
        total += output["count"].as_u64().unwrap_or(0);
        let n = output["count"].as_u64().unwrap_or(0);
        say!(
            "  {:<24} {:>7} {}",
            output["type"].as_str().unwrap_or("?"),
            n,
            if n == 1 { "resource" } else { "resources" }
        );
    }
    say!(
        "  {:<24} {:>7} {} in {}",
        "total",
        total,
        if total == 1 { "resource" } else { "resources" },
        count(outputs.len() as u64, "file")
    );
    if let Some(first) = outputs.first() {
        let url = first["url"].as_str().unwrap_or_default();
        let text = http
            .get(url)
            .header("client_id", client_id)
            .header("client_secret", client_secret)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        let line = text.lines().next().unwrap_or("");
        say!(
            "\nfirst line of the {} file ({}):\n  {}…",
            first["type"].as_str().unwrap_or("?"),
            count(text.lines().count() as u64, "line"),
            line.char_indices().nth(160).map_or(line, |(cut, _)| &line[..cut])
        );
    }
    Ok(manifest["transactionTime"].as_str().unwrap_or_default().to_owned())
}

fn print_curl_lines(base: &str, client_id: &str, client_secret: &str, transaction_time: &str) {
    let auth = format!("-H 'client_id: {client_id}' -H 'client_secret: {client_secret}'");
    say!("\nTry it yourself (credentials of a fresh demo client):");
    say!("  curl -s {auth} '{base}/r4/Group/{GROUP}'");
    say!("  curl -s {auth} '{base}/bulk-data/r4/Group/{GROUP}/$export?_type=Patient,Observation'");
    say!("  # only what changed since the export above (nothing yet: output is empty):");
    say!("  curl -s {auth} '{base}/bulk-data/r4/Group/{GROUP}/$export?_since={transaction_time}'");
    say!("  # the standard asynchronous pattern: 202 and a Content-Location to poll:");
    say!("  curl -s -D - -H 'Prefer: respond-async' {auth} '{base}/r4/Group/{GROUP}/$export'");
    say!("  # then download any output[].url with the same two headers (add --compressed for gzip)");
}
