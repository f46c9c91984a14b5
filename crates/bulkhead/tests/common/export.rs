//! Reading a Bulk Data manifest the way a client does: download every file and check what any
//! client relies on (URL shape, media type, `count` lines of the announced type).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use serde_json::Value;

use super::Api;

/// One downloaded export file.
pub struct Downloaded {
    pub url: String,
    pub bytes: Vec<u8>,
    pub lines: Vec<Value>,
}

/// Downloaded files by the manifest's `type`, in manifest order within a type.
pub type Files = BTreeMap<String, Vec<Downloaded>>;

/// Downloads every file of a manifest list (`output`, `deleted` or `error`) with the client's
/// headers.
pub async fn download_list(api: &Api, manifest: &Value, list: &str) -> Files {
    let mut files = Files::new();
    let items = manifest[list].as_array().unwrap_or_else(|| panic!("manifest has no {list}[]: {manifest}"));
    for item in items {
        let file_type = item["type"].as_str().expect("type").to_owned();
        let url = item["url"].as_str().expect("url").to_owned();
        let count = item["count"].as_u64().unwrap_or_else(|| panic!("{list} item without count: {item}"));
        let prefix = format!("{}/bulk-data/r4/$export/{file_type}/", api.base);
        let token = url.strip_prefix(&prefix).and_then(|rest| rest.strip_suffix(".ndjson"));
        assert!(
            token.is_some_and(|token| !token.is_empty() && !token.contains('/')),
            "file URL {url} is not {prefix}{{token}}.ndjson"
        );
        let reply = api.get(&url).await;
        assert_eq!(reply.status, 200, "downloading {url}: {}", reply.text());
        assert_eq!(reply.header("content-type").as_deref(), Some("application/fhir+ndjson"));
        assert_eq!(reply.header("content-encoding"), None, "not compressed unless asked");
        let text = reply.text();
        assert!(text.is_empty() || text.ends_with('\n'), "every NDJSON line ends with a newline");
        let lines: Vec<Value> = text
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|error| panic!("a line of the {file_type} file is not JSON ({error}): {line}"))
            })
            .collect();
        assert_eq!(
            lines.len() as u64,
            count,
            "the {file_type} file has {} lines but the manifest says {count}",
            lines.len()
        );
        for line in &lines {
            assert_eq!(line["resourceType"], file_type.as_str(), "a line of the {file_type} file: {line}");
        }
        files.entry(file_type).or_default().push(Downloaded { url, bytes: reply.body, lines });
    }
    files
}

/// Every line of every file.
pub fn all_lines(files: &Files) -> impl Iterator<Item = &Value> {
    files.values().flatten().flat_map(|file| &file.lines)
}

/// The ids per resource type, failing on any resource exported twice.
pub fn ids_by_type(files: &Files) -> BTreeMap<String, BTreeSet<String>> {
    let mut ids: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file_type, parts) in files {
        for line in parts.iter().flat_map(|part| &part.lines) {
            let id = line["id"].as_str().expect("exported resource has an id").to_owned();
            assert!(ids.entry(file_type.clone()).or_default().insert(id.clone()), "{file_type}/{id} exported twice");
        }
    }
    ids
}

/// `[("Patient", ["p1"])]` as an id map, for comparing with [`ids_by_type`].
pub fn expected_ids(items: &[(&str, &[&str])]) -> BTreeMap<String, BTreeSet<String>> {
    items
        .iter()
        .map(|(file_type, ids)| (file_type.to_string(), ids.iter().map(|id| id.to_string()).collect()))
        .collect()
}

/// Every exported line is a member Patient, in a member's compartment (by `subject`), or the
/// exported Group itself.
pub fn assert_belongs_to_members(files: &Files, members: &[&str], group_id: &str) {
    let members: BTreeSet<&str> = members.iter().copied().collect();
    for (file_type, parts) in files {
        for line in parts.iter().flat_map(|part| &part.lines) {
            let belongs = match file_type.as_str() {
                "Patient" => line["id"].as_str().is_some_and(|id| members.contains(id)),
                "Group" => line["id"] == group_id,
                _ => line["subject"]["reference"]
                    .as_str()
                    .and_then(|r| r.strip_prefix("Patient/"))
                    .is_some_and(|id| members.contains(id)),
            };
            assert!(belongs, "an exported {file_type} does not belong to the members {members:?}: {line}");
        }
    }
}

pub fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes).read_to_end(&mut out).expect("valid gzip");
    out
}
