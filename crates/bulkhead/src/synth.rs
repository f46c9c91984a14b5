//! `bulkhead synth`: deterministic synthetic data.

use std::path::PathBuf;
use std::time::Instant;

use bulkhead_synth::{generate_with_progress, OutputFormat, SynthOptions};
use clap::{Args, ValueEnum};

#[derive(Args)]
pub struct SynthArgs {
    /// Number of patients.
    #[arg(long)]
    pub patients: u64,
    /// Random seed; the same seed gives byte-identical output.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = Format::Ndjson)]
    pub format: Format,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Ndjson,
    Bundles,
}

/// The progress bar of patient generation (hidden when stderr is not a terminal).
pub fn patients_bar(patients: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(patients);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} patients {per_sec} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

pub fn run(args: SynthArgs) -> anyhow::Result<()> {
    let format = match args.format {
        Format::Ndjson => OutputFormat::Ndjson,
        Format::Bundles => OutputFormat::Bundles,
    };
    let options = SynthOptions { patients: args.patients, seed: args.seed, format };
    let started = Instant::now();
    let bar = patients_bar(args.patients);
    let summary = generate_with_progress(&options, &args.out, |done| {
        if done % 64 == 0 || done == args.patients {
            bar.set_position(done);
        }
    })?;
    bar.finish_and_clear();
    say!("{:<24} {:>12} {:>14}", "type", "count", "bytes");
    for row in &summary.types {
        say!("{:<24} {:>12} {:>14}", row.resource_type, row.count, row.bytes);
    }
    let bytes: u64 = summary.types.iter().map(|row| row.bytes).sum();
    say!("{:<24} {:>12} {:>14}", "total", summary.resources, bytes);
    say!(
        "{}, seed {}, in {:.1} s → {}",
        crate::output::count(summary.patients, "patient"),
        args.seed,
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}
