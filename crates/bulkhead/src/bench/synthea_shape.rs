//! A Synthea-shaped data set: the vendored 100-patient Synthea sample copied `scale` times with
//! fresh deterministic ids and every reference rewritten (testdata/README.md, "To grow it for
//! benchmarks"). Resources many patients share (organisations, practitioners, locations,
//! medications) are written once, so copies point at the same ones, as in a real tenant.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use anyhow::Context;
use serde_json::Value;

/// Types shared by every copy: written once, with their original ids.
pub const SHARED_TYPES: [&str; 4] = ["Organization", "Practitioner", "Location", "Medication"];

/// What a scaled data set holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaledCounts {
    pub patients: u64,
    pub resources: u64,
}

/// The sample's lines by resource type (files `Type.ndjson.gz` or `Type.ndjson`).
fn read_sample(sample: &Path) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let mut by_type = BTreeMap::new();
    let mut entries: Vec<_> = std::fs::read_dir(sample)
        .with_context(|| format!("reading the Synthea sample {}", sample.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().and_then(|name| name.to_str()).unwrap_or_default().to_owned();
        let Some(resource_type) = name.strip_suffix(".ndjson.gz").or_else(|| name.strip_suffix(".ndjson")) else {
            continue;
        };
        let file = std::fs::File::open(&path)?;
        let reader: Box<dyn std::io::Read> =
            if name.ends_with(".gz") { Box::new(flate2::read::MultiGzDecoder::new(file)) } else { Box::new(file) };
        let lines: Vec<String> = BufReader::new(reader)
            .lines()
            .filter(|line| !line.as_ref().is_ok_and(|line| line.trim().is_empty()))
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading {}", path.display()))?;
        by_type.insert(resource_type.to_owned(), lines);
    }
    anyhow::ensure!(by_type.contains_key("Patient"), "{} holds no Patient.ndjson(.gz)", sample.display());
    Ok(by_type)
}

/// The counts `scaled` would write, without writing: every resource `scale` times, shared
/// types once.
pub fn scaled_counts(sample: &Path, scale: u64) -> anyhow::Result<ScaledCounts> {
    let by_type = read_sample(sample)?;
    Ok(counts(&by_type, scale))
}

fn counts(by_type: &BTreeMap<String, Vec<String>>, scale: u64) -> ScaledCounts {
    let resources = by_type
        .iter()
        .map(|(resource_type, lines)| {
            lines.len() as u64 * if SHARED_TYPES.contains(&resource_type.as_str()) { 1 } else { scale }
        })
        .sum();
    ScaledCounts { patients: by_type.get("Patient").map_or(0, Vec::len) as u64 * scale, resources }
}

/// Writes `out/Type.ndjson` for every type of the sample, `scale` copies each (shared types
/// once), and returns what it wrote.
pub fn scaled(sample: &Path, scale: u64, out: &Path) -> anyhow::Result<ScaledCounts> {
    anyhow::ensure!(scale >= 1, "--scale must be at least 1");
    let by_type = read_sample(sample)?;
    // Ids of resources that each copy gets afresh.
    let mut copied_ids = HashSet::new();
    for (resource_type, lines) in &by_type {
        if SHARED_TYPES.contains(&resource_type.as_str()) {
            continue;
        }
        for line in lines {
            let resource: Value = serde_json::from_str(line)?;
            if let Some(id) = resource["id"].as_str() {
                copied_ids.insert(id.to_owned());
            }
        }
    }
    std::fs::create_dir_all(out)?;
    for (resource_type, lines) in &by_type {
        let shared = SHARED_TYPES.contains(&resource_type.as_str());
        let mut file = BufWriter::new(std::fs::File::create(out.join(format!("{resource_type}.ndjson")))?);
        for copy in 0..if shared { 1 } else { scale } {
            for line in lines {
                let mut resource: Value = serde_json::from_str(line)?;
                rewrite_ids(&mut resource, copy, &copied_ids);
                serde_json::to_writer(&mut file, &resource)?;
                file.write_all(b"\n")?;
            }
        }
        file.flush()?;
    }
    Ok(counts(&by_type, scale))
}

/// Replaces every string that names a copied resource (its id, `Type/id`, `urn:uuid:id`) with
/// the copy's id: the resource's own id, references, and identifiers that repeat the id.
fn rewrite_ids(value: &mut Value, copy: u64, copied: &HashSet<String>) {
    match value {
        Value::String(text) => {
            let (prefix, id) = match text.rsplit_once('/') {
                Some((resource_type, id)) if !resource_type.contains(':') => (format!("{resource_type}/"), id),
                _ => match text.strip_prefix("urn:uuid:") {
                    Some(id) => ("urn:uuid:".to_owned(), id),
                    None => (String::new(), text.as_str()),
                },
            };
            if copied.contains(id) {
                *text = format!("{prefix}{}", fresh_id(copy, id));
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| rewrite_ids(item, copy, copied)),
        Value::Object(fields) => fields.values_mut().for_each(|field| rewrite_ids(field, copy, copied)),
        _ => {}
    }
}

/// A UUID-shaped id determined by (copy, original id): two FNV-1a hashes, 128 bits.
pub fn fresh_id(copy: u64, id: &str) -> String {
    let hash = |basis: u64| {
        let mut hash = basis;
        for byte in copy.to_le_bytes().iter().chain(id.as_bytes()) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        hash
    };
    let (high, low) = (hash(0xcbf2_9ce4_8422_2325), hash(0x6c62_272e_07bb_0142));
    let value = (u128::from(high) << 64 | u128::from(low)) & !(0xf << 76) & !(0x3 << 62) | (0x4 << 76) | (0x2 << 62);
    let hex = format!("{value:032x}");
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn copies_get_fresh_stable_ids_and_shared_resources_keep_theirs() {
        let copied: HashSet<String> = ["p1", "e1"].into_iter().map(str::to_owned).collect();
        let original = json!({
            "resourceType": "Encounter", "id": "e1",
            "subject": {"reference": "Patient/p1"},
            "serviceProvider": {"reference": "Organization/o1"},
            "participant": [{"individual": {"reference": "urn:uuid:p1"}}],
            "text": "p1 is mentioned in prose only as part of a sentence"
        });
        let (mut first, mut second, mut again) = (original.clone(), original.clone(), original.clone());
        rewrite_ids(&mut first, 0, &copied);
        rewrite_ids(&mut second, 1, &copied);
        rewrite_ids(&mut again, 1, &copied);
        assert_eq!(second, again, "deterministic");
        assert_ne!(first["id"], second["id"], "each copy has its own ids");
        assert_eq!(first["id"], fresh_id(0, "e1"));
        assert_eq!(first["subject"]["reference"], format!("Patient/{}", fresh_id(0, "p1")));
        assert_eq!(first["participant"][0]["individual"]["reference"], format!("urn:uuid:{}", fresh_id(0, "p1")));
        assert_eq!(first["serviceProvider"]["reference"], "Organization/o1", "shared: written once, same id");
        assert_eq!(first["text"], original["text"]);
        let id = fresh_id(7, "p1");
        assert!(id.len() == 36 && id.as_bytes()[14] == b'4', "UUID-shaped (version 4 nibble): {id}");
    }
}
