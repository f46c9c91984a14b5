//! The data set looks like a real population: heavy-tailed resources per patient, and a sane
//! average; plus a timing smoke that prints per-type counts (run with `--release --nocapture`).

mod common;

use std::time::Instant;

#[test]
fn resources_per_patient_are_heavy_tailed() {
    let data = common::ndjson(500, 41);
    let counts = common::per_patient_counts(&data.resources);
    assert_eq!(counts.len(), 500, "every patient owns resources");
    let mut v: Vec<u64> = counts.values().copied().collect();
    v.sort_unstable();
    let median = v[v.len() / 2];
    let max = *v.last().unwrap();
    let mean = v.iter().sum::<u64>() as f64 / v.len() as f64;
    println!("resources/patient: min {} median {median} mean {mean:.0} max {max}", v[0]);
    assert!(max >= 10 * median, "max {max} < 10 × median {median}");
    assert!(max >= 1000, "the heaviest patient has only {max} resources");
    assert!((20..=150).contains(&median), "median {median}");
    assert!((100.0..=200.0).contains(&mean), "mean {mean}");
}

#[test]
fn timing_smoke_1000_patients() {
    let started = Instant::now();
    let data = tempfile::tempdir().unwrap();
    let options =
        bulkhead_synth::SynthOptions { patients: 1000, seed: 42, format: bulkhead_synth::OutputFormat::Ndjson };
    let summary = bulkhead_synth::generate(&options, data.path()).unwrap();
    let secs = started.elapsed().as_secs_f64();
    for t in &summary.types {
        println!("{:<22} {:>9} {:>12}", t.resource_type, t.count, t.bytes);
    }
    let bytes: u64 = summary.types.iter().map(|t| t.bytes).sum();
    println!(
        "1000 patients: {} resources, {:.1} MB in {secs:.2} s ({:.0} resources/s; debug builds are much slower)",
        summary.resources,
        bytes as f64 / 1e6,
        summary.resources as f64 / secs
    );
    assert!(summary.resources > 50_000);
}
