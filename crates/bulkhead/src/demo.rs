//! `bulkhead demo`: everything on the embedded default in one command: a tenant, a client,
//! synthetic patients, a Group, a live server, and a real export printed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bulkhead_store::{SearchQuery, Store, Visibility, WriteMode, WriteOp};
use clap::Args;
use serde_json::{json, Value};

use crate::admin::{find_tenant, new_client, open_store};
use crate::config::{Config, Overrides};
use crate::serve::{app_state, init_logging, runtime, shutdown_signal};

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
    /// Synthetic patients to load the first time.
    #[arg(long, default_value_t = 300)]
    pub patients: u64,
    /// Members of the demo Group.
    #[arg(long, default_value_t = 100)]
    pub group_size: usize,
    /// Stop after showing the export instead of serving until Ctrl-C.
    #[arg(long)]
    pub once: bool,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let config =
        Config::load(None, Overrides { listen: Some(args.listen.clone()), data_dir: Some(args.data_dir.clone()) })?;
    if std::env::var_os("RUST_LOG").is_none() {
        // Keep the demo's own output readable; RUST_LOG=info shows request logs.
        std::env::set_var("RUST_LOG", "warn");
    }
    crate::set_memory_profile(crate::MemoryProfile::Server);
    init_logging(config.log_format);
    let store: Arc<dyn Store> = Arc::new(open_store(&config)?);
    let (client_id, client_secret) = prepare_data(&store, &config, &args)?;
    let state = app_state(&config)?;
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
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
        print_curl_lines(&base, &client_id, &client_secret, &transaction_time);
        if once {
            let _ = stop_tx.send(());
        } else {
            println!("\nserving on {base} with data in {}; Ctrl-C stops", config.data_dir.display());
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
    let tenant = find_tenant(store.as_ref(), TENANT)?;
    let patients = patient_ids(store.as_ref(), tenant.id, args.group_size)?;
    if patients.is_empty() {
        let synth_dir = config.data_dir.join("synth");
        println!("generating {} synthetic patients into {} …", args.patients, synth_dir.display());
        let options = bulkhead_synth::SynthOptions {
            patients: args.patients,
            seed: 1,
            format: bulkhead_synth::OutputFormat::Ndjson,
        };
        bulkhead_synth::generate(&options, &synth_dir)?;
        let started = Instant::now();
        let summary = crate::import::import_into(store.clone(), TENANT, &[synth_dir], config.max_group_members)?;
        crate::import::report(&summary, started.elapsed().as_secs_f64());
    }
    let members = patient_ids(store.as_ref(), tenant.id, args.group_size)?;
    let member: Vec<Value> =
        members.iter().map(|id| json!({"entity": {"reference": format!("Patient/{id}")}})).collect();
    let group = json!({"resourceType": "Group", "id": GROUP, "type": "person", "actual": true, "name": "Demo cohort", "member": member});
    let op = WriteOp::Update { resource_type: "Group".into(), id: GROUP.into(), body: group, if_match: None };
    store.write(tenant.id, None, &[op], WriteMode::Transaction)?.remove(0)?;
    println!("tenant '{TENANT}' has Group/{GROUP} with {} members", members.len());
    let (client_id, client_secret) = new_client(store.as_ref(), TENANT)?;
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
    println!(
        "\nGET /bulk-data/r4/Group/{GROUP}/$export → 200 in {} ms, transactionTime {}",
        started.elapsed().as_millis(),
        manifest["transactionTime"]
    );
    let outputs = manifest["output"].as_array().cloned().unwrap_or_default();
    let mut total = 0;
    for output in &outputs {
        total += output["count"].as_u64().unwrap_or(0);
        println!("  {:<24} {:>7} resources", output["type"].as_str().unwrap_or("?"), output["count"]);
    }
    println!("  {:<24} {:>7} resources in {} files", "total", total, outputs.len());
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
        println!(
            "\nfirst line of the {} file ({} lines):\n  {}…",
            first["type"].as_str().unwrap_or("?"),
            text.lines().count(),
            line.char_indices().nth(160).map_or(line, |(cut, _)| &line[..cut])
        );
    }
    Ok(manifest["transactionTime"].as_str().unwrap_or_default().to_owned())
}

fn print_curl_lines(base: &str, client_id: &str, client_secret: &str, transaction_time: &str) {
    let auth = format!("-H 'client_id: {client_id}' -H 'client_secret: {client_secret}'");
    println!("\nTry it yourself (credentials of a fresh demo client):");
    println!("  curl -s {auth} '{base}/r4/Group/{GROUP}'");
    println!("  curl -s {auth} '{base}/bulk-data/r4/Group/{GROUP}/$export?_type=Patient,Observation'");
    println!("  # only what changed since the export above (nothing yet: output is empty):");
    println!("  curl -s {auth} '{base}/bulk-data/r4/Group/{GROUP}/$export?_since={transaction_time}'");
    println!("  # the standard asynchronous pattern: 202 and a Content-Location to poll:");
    println!("  curl -s -D - -H 'Prefer: respond-async' {auth} '{base}/r4/Group/{GROUP}/$export'");
    println!("  # then download any output[].url with the same two headers (add --compressed for gzip)");
}
