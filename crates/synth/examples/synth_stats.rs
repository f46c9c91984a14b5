//! Generates a data set and prints per-type counts, sizes and the time taken.
//!
//! `cargo run -p bulkhead-synth --release --example synth_stats -- [PATIENTS] [ndjson|bundles] [DIR]`
//! (defaults: 1000 patients, ndjson, a temporary directory that is removed afterwards).

use std::time::Instant;

use bulkhead_synth::{generate, OutputFormat, SynthOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let patients: u64 = args.next().map_or(Ok(1000), |a| a.parse())?;
    let format = match args.next().as_deref() {
        None | Some("ndjson") => OutputFormat::Ndjson,
        Some("bundles") => OutputFormat::Bundles,
        Some(other) => return Err(format!("unknown format {other:?}").into()),
    };
    let temp;
    let dir = match args.next() {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let options = SynthOptions { patients, seed: 42, format };
    let started = Instant::now();
    let summary = generate(&options, &dir)?;
    let elapsed = started.elapsed().as_secs_f64();
    println!("{:<22} {:>10} {:>14}", "type", "count", "bytes");
    let mut bytes = 0;
    for t in &summary.types {
        bytes += t.bytes;
        println!("{:<22} {:>10} {:>14}", t.resource_type, t.count, t.bytes);
    }
    println!(
        "{} patients, {} resources ({:.0}/patient), {:.1} MB in {:.2} s: {:.0} resources/s, {:.0} MB/s",
        summary.patients,
        summary.resources,
        summary.resources as f64 / summary.patients.max(1) as f64,
        bytes as f64 / 1e6,
        elapsed,
        summary.resources as f64 / elapsed,
        bytes as f64 / 1e6 / elapsed,
    );
    Ok(())
}
