//! Deterministic, realistic synthetic FHIR R4 data at any scale.
//!
//! [`generate`] writes `patients` patients and the shared resources they point at
//! (Organizations, Locations, Practitioners, Medications), either as one NDJSON file per
//! resource type or as one transaction Bundle per patient. The same options always give
//! byte-identical files: the crate carries its own PRNG, never reads the clock, and dates are
//! offsets from a fixed anchor (2026-01-01T00:00:00Z) spread over the ten years before it.
//!
//! Each patient is generated from its own random stream `(seed, patient index)`, so patient `k`
//! is the same whatever the patient count (only the shared pool of providers grows with it).
//! Encounter counts are heavy-tailed: most patients have tens to a few hundred resources, a few
//! have thousands, which is what bulk export has to cope with in real cohorts.

mod calendar;
mod care_patterns;
mod clinical;
mod datatypes;
mod financial;
mod json;
mod measures;
mod observations;
mod patient;
mod population;
mod rng;
mod shared;
mod terminology;
mod writer;

use std::path::{Path, PathBuf};

/// How the data set is laid out on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// One `{Type}.ndjson` file per resource type (the Bulk Data export/import format).
    Ndjson,
    /// One transaction Bundle per patient (`patient-{index}-{id}.json`) plus `0000-shared.json`
    /// with the shared resources, named to sort (and so be loaded) first.
    Bundles,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// Number of patients.
    pub patients: u64,
    /// Seed of every random choice; the same seed gives the same bytes.
    pub seed: u64,
    /// Output layout.
    pub format: OutputFormat,
}

/// Count and size of one resource type in the generated data set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeSummary {
    /// FHIR resource type name.
    pub resource_type: String,
    /// Number of resources.
    pub count: u64,
    /// Bytes of resource JSON (in NDJSON including the newline; in Bundles the resource alone).
    pub bytes: u64,
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthSummary {
    /// Per resource type, sorted by type name.
    pub types: Vec<TypeSummary>,
    /// Number of patients.
    pub patients: u64,
    /// Total resources, shared ones included.
    pub resources: u64,
}

/// Why generation failed.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// The options cannot be honoured.
    #[error("invalid synth options: {0}")]
    InvalidOptions(String),
    /// Creating or writing an output file failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl SynthError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> SynthError {
        SynthError::Io { path: path.to_path_buf(), source }
    }
}

/// Patient ids live in 38 bits of the 62-bit id key space (24 bits are the per-patient counter).
const MAX_PATIENTS: u64 = (1 << 38) - 2;

/// Writes the data set into `out_dir` (created if missing). See [`OutputFormat`] for the layout.
/// Existing files of the same names are overwritten; other files are left alone.
pub fn generate(options: &SynthOptions, out_dir: &Path) -> Result<SynthSummary, SynthError> {
    generate_with_progress(options, out_dir, |_| {})
}

/// As [`generate`], calling `progress(patients_done)` after each patient (for a progress bar).
pub fn generate_with_progress(
    options: &SynthOptions,
    out_dir: &Path,
    mut progress: impl FnMut(u64),
) -> Result<SynthSummary, SynthError> {
    if options.patients > MAX_PATIENTS {
        return Err(SynthError::InvalidOptions(format!(
            "at most {MAX_PATIENTS} patients, asked for {}",
            options.patients
        )));
    }
    std::fs::create_dir_all(out_dir).map_err(|source| SynthError::io(out_dir, source))?;
    let shared = shared::plan(options.seed, options.patients);
    let mut out = writer::Output::new(out_dir, options.format);
    shared::write(&shared, options.seed, &mut out)?;
    for index in 0..options.patients {
        patient::generate(options.seed, index, &shared, &mut out)?;
        progress(index + 1);
    }
    let types = out.finish()?;
    let resources = types.iter().map(|t| t.count).sum();
    Ok(SynthSummary { types, patients: options.patients, resources })
}
