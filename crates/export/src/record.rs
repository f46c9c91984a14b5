//! The export record: what the file URLs of one export refer to, stored server-side (the
//! store's `ExportRecord`, tenant-scoped, expiring with the URLs) so that a URL carries only the
//! record's id and a file number ([`crate::token::FileRef`]), however long the kick-off's user
//! id, `_type` list or lenient-mode warnings were.

use serde::{Deserialize, Serialize};

use crate::level::ExportLevel;
use crate::token::{FileClaims, FileKind, FileRef};

/// A planned export: the kick-off's details shared by every file, and the files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedExport {
    /// The `client_id` that started the export; only it may download (when credentials apply).
    pub client: String,
    /// User scope (`x-oneup-user-id`), or `None` for the whole tenant.
    pub user: Option<String>,
    /// System, Patient, or which Group.
    pub level: ExportLevel,
    /// Group version the export was planned against (0 at the other levels).
    pub group_version: i64,
    /// `_since`, µs since the epoch.
    pub since: Option<i64>,
    /// `_until`, µs since the epoch.
    pub until: Option<i64>,
    /// The manifest's `transactionTime`, µs since the epoch.
    pub transaction_time: i64,
    /// The `_type` list as requested.
    pub requested_types: Option<Vec<String>>,
    /// Lenient-mode warnings of the kick-off, each the OperationOutcome line the error file
    /// writes.
    pub warnings: Vec<String>,
    /// `_typeFilter` queries (checked at kick-off), recompiled for each download.
    #[serde(default)]
    pub type_filters: Vec<String>,
    /// `_elements` entries, when given.
    #[serde(default)]
    pub elements: Option<Vec<String>>,
    /// `patient` (POST): the Patient ids the export was restricted to.
    #[serde(default)]
    pub patients: Option<Vec<String>>,
    /// In manifest order; a file URL names its index here.
    pub files: Vec<PlannedFile>,
    /// The stored associated set (Provenance, referenced resources) its associated files read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub associated_set: Option<String>,
}

/// One file of a planned export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedFile {
    pub kind: FileKind,
    /// Resource type of the file's contents.
    pub resource_type: String,
    /// Key range (inclusive) of an output file.
    pub start: i64,
    pub end: i64,
    /// Lines in the file when the manifest was made.
    pub total: u64,
    /// An output file of associated data: its keys index the export's associated set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub associated: bool,
}

impl PlannedExport {
    /// The claims of the file `file` names, issued at `issued` (Unix seconds); `None` when the
    /// record has no such file.
    pub fn claims(&self, file: &FileRef, issued: i64) -> Option<FileClaims> {
        let planned = self.files.get(usize::try_from(file.file).ok()?)?;
        Some(FileClaims {
            tenant: file.tenant,
            client: self.client.clone(),
            user: self.user.clone(),
            level: self.level.clone(),
            group_version: self.group_version,
            kind: planned.kind,
            resource_type: planned.resource_type.clone(),
            start: planned.start,
            end: planned.end,
            total: planned.total,
            since: self.since,
            until: self.until,
            transaction_time: self.transaction_time,
            requested_types: self.requested_types.clone(),
            // Only the error file writes them.
            warnings: if planned.kind == FileKind::Error { self.warnings.clone() } else { Vec::new() },
            associated_set: if planned.associated { self.associated_set.clone() } else { None },
            export_associated_set: self.associated_set.clone(),
            type_filters: self.type_filters.clone(),
            elements: self.elements.clone(),
            patients: self.patients.clone(),
            iat: issued,
            exp: file.exp,
        })
    }

    /// The record's stored text.
    pub fn to_json(&self) -> String {
        // Plain structs with string keys always serialize.
        serde_json::to_string(self).expect("a planned export serializes")
    }

    pub fn from_json(text: &str) -> Result<PlannedExport, serde_json::Error> {
        serde_json::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned() -> PlannedExport {
        PlannedExport {
            client: "c".into(),
            user: Some("u".into()),
            level: ExportLevel::Group("g".into()),
            group_version: 2,
            since: Some(5),
            until: None,
            transaction_time: 9,
            requested_types: Some(vec!["Observation".into()]),
            warnings: vec!["{\"resourceType\":\"OperationOutcome\"}".into()],
            type_filters: vec!["Observation?status=final".into()],
            elements: Some(vec!["id".into()]),
            patients: None,
            files: vec![
                PlannedFile {
                    kind: FileKind::Output,
                    resource_type: "Observation".into(),
                    start: 1,
                    end: 8,
                    total: 4,
                    associated: false,
                },
                PlannedFile {
                    kind: FileKind::Error,
                    resource_type: "OperationOutcome".into(),
                    start: 0,
                    end: 0,
                    total: 1,
                    associated: false,
                },
            ],
            associated_set: None,
        }
    }

    #[test]
    fn round_trips_and_resolves_files() {
        let planned = planned();
        assert_eq!(PlannedExport::from_json(&planned.to_json()).unwrap(), planned);
        let file = FileRef { tenant: 3, record: [0; 16], file: 0, exp: 100, requires_credentials: true };
        let output = planned.claims(&file, 50).unwrap();
        assert_eq!((output.tenant, output.start, output.end, output.total, output.exp), (3, 1, 8, 4, 100));
        assert!(output.warnings.is_empty());
        let error = planned.claims(&FileRef { file: 1, ..file }, 50).unwrap();
        assert_eq!(error.warnings, planned.warnings);
        assert_eq!(planned.claims(&FileRef { file: 2, ..file }, 50), None);
    }
}
