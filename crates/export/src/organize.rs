//! Output organised by patient (Bulk Data IG STU3 `organizeOutputBy=Patient`, §"Bulk Data Output
//! File Organization"), for Patient- and Group-level exports.
//!
//! Each output file holds whole *resource blocks*, one per member patient, in member order:
//!
//! 1. a header, `{"resourceType":"Parameters","parameter":[{"name":"header","valueReference":
//!    {"reference":"Patient/<id>"}}]}`;
//! 2. the patient's exported compartment data, type by type (`Patient` first), exactly what the
//!    export by type selects through that member (`_type`, `_since` with the member's own lower
//!    bound, `_until`, `_typeFilter`, `_elements`);
//! 3. the Group export's own Group line, in the first block only (when `_type` asks for it);
//! 4. the export's associated data that this patient's data leads to: the Provenance of the
//!    export's associated set that targets the patient or one of its compartment resources, and
//!    the set's referenced resources its compartment resources or the Provenance about them
//!    reference (transitively, up to [`REFERENCE_DEPTH`]). The IG lets resources that do not reference the
//!    patient go "in resource blocks that contain resources they reference"; a Practitioner seen
//!    by two patients is therefore in both blocks, so every block stands alone.
//!
//! A resource in two members' compartments (an Observation whose subject is one member and whose
//! performer is another) is in both blocks. The set of resources across all files is exactly the
//! export by type's. A block is never split across files (so `continuesInFile` is never needed);
//! a file closes once it holds `part_size` lines or more. A member with nothing to export has no
//! block. The manifest `count` of a file is its line count, headers included.
//!
//! Counts are exact because planning writes every block once to a counting sink: the same code
//! reading the same view (as of the transaction time) produces the download. Memory is bounded
//! by one patient's block (the ids it must look up), never by the cohort.

use std::collections::BTreeSet;
use std::io::Write;

use bulkhead_fhir::references::{is_referenced_type, outgoing_references};
use bulkhead_fhir::type_filter::TypeFilters;
use bulkhead_store::{MemberSelection, PartRange, Store, TenantId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::associated::REFERENCE_DEPTH;
use crate::elements::ElementSubset;
use crate::files::WINDOW_BYTES;
use crate::group::{ExportError, ExportView, PlanProgress, PlanStep};
use crate::record::PlannedFile;
use crate::token::FileKind;

/// The manifest's `outputOrganizedBy`, and the path segment of an organised file's URL.
pub const ORGANIZED_BY: &str = "Patient";

/// What each block of an organised export holds (stored with the export's record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSpec {
    /// Compartment types read through each member, `Patient` first.
    pub types: Vec<String>,
    /// The exported Group's own line goes in the first block.
    pub group_line: bool,
    /// The associated set's Provenance are looked up by target.
    pub provenance: bool,
    /// Referenced resources are followed: every referenced type (`None`), or only these.
    pub referenced: Option<ReferencedScope>,
}

/// Which referenced types a block follows and includes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReferencedScope {
    All,
    Only(Vec<String>),
}

impl ReferencedScope {
    fn follows(&self, resource_type: &str) -> bool {
        is_referenced_type(resource_type)
            && match self {
                ReferencedScope::All => true,
                ReferencedScope::Only(types) => types.iter().any(|t| t == resource_type),
            }
    }
}

/// Produces the blocks of one export: at planning (to a counting sink) and at each download.
pub struct BlockWriter<'a> {
    pub store: &'a dyn Store,
    pub tenant: TenantId,
    pub view: &'a ExportView,
    pub spec: &'a BlockSpec,
    /// The export's associated set (`None`: no associated data).
    pub set_id: Option<&'a str>,
    /// `_elements`, when given.
    pub elements: Option<&'a [String]>,
}

/// One block's output: the header goes out before the first resource, so a member with nothing
/// to export writes nothing.
struct BlockOut<'o> {
    out: &'o mut dyn Write,
    header: Vec<u8>,
    lines: u64,
    subset: Option<&'o ElementSubset>,
    scratch: Vec<u8>,
}

impl BlockOut<'_> {
    fn line(&mut self, resource_type: &str, line: &[u8]) -> Result<(), ExportError> {
        let sink = |error: std::io::Error| ExportError::Sink(error.to_string());
        if self.lines == 0 {
            self.out.write_all(&self.header).map_err(sink)?;
            self.lines = 1;
        }
        self.scratch.clear();
        match self.subset {
            Some(subset) => subset.apply(resource_type, line, &mut self.scratch),
            None => {
                self.scratch.extend_from_slice(line);
                self.scratch.push(b'\n');
            }
        }
        self.out.write_all(&self.scratch).map_err(sink)?;
        self.lines += 1;
        Ok(())
    }
}

/// The header line of `patient`'s block (IG: a `Parameters` with a `header` reference).
pub fn header_line(patient: &str) -> Vec<u8> {
    let header = json!({
        "resourceType": "Parameters",
        "parameter": [{"name": "header", "valueReference": {"reference": format!("Patient/{patient}")}}],
    });
    let mut line = header.to_string().into_bytes();
    line.push(b'\n');
    line
}

/// What a block's compartment data leads to: Provenance targets and referenced resources.
#[derive(Default)]
struct Leads {
    targets: Vec<(String, String)>,
    provenance: BTreeSet<String>,
    referenced: BTreeSet<(String, String)>,
}

impl BlockWriter<'_> {
    /// Writes the blocks of members `[first, end)` to `out`; returns the lines written.
    pub fn write_members(&self, first: usize, end: usize, out: &mut dyn Write) -> Result<u64, ExportError> {
        let subset = self.elements.map(ElementSubset::new);
        let mut lines = 0;
        for index in first..end.min(self.view.selection.members.len()) {
            lines += self.write_block(index, subset.as_ref(), out)?;
        }
        Ok(lines)
    }

    /// Writes member `index`'s block; returns its lines (0 when it has nothing to export).
    fn write_block(
        &self,
        index: usize,
        subset: Option<&ElementSubset>,
        out: &mut dyn Write,
    ) -> Result<u64, ExportError> {
        let selection = &self.view.selection;
        let (member, member_since) = &selection.members[index];
        let member_since = *member_since;
        let exported = MemberSelection { members: vec![(member.clone(), member_since)].into(), ..selection.clone() };
        let mut block = BlockOut { out, header: header_line(member), lines: 0, subset, scratch: Vec::new() };
        let with_associated = self.set_id.is_some() && (self.spec.provenance || self.spec.referenced.is_some());
        // The associated set is found from the member's whole compartment at the transaction
        // time, whatever `_since`, `_until` and `_typeFilter` keep of it (README "Associated
        // data"): with those, a second, unfiltered pass finds what the data leads to.
        let unfiltered = exported.since.is_none()
            && member_since.is_none()
            && exported.until.is_none()
            && exported.filters.is_empty();
        let mut leads = Leads::default();
        self.read_compartment(&exported, Some(&mut block), with_associated && unfiltered, &mut leads)?;
        if with_associated && !unfiltered {
            let cohort = MemberSelection {
                members: vec![(member.clone(), None)].into(),
                since: None,
                until: None,
                filters: TypeFilters::default(),
                ..selection.clone()
            };
            self.read_compartment(&cohort, None, true, &mut leads)?;
        }
        if index == 0 && self.spec.group_line {
            if let Some(group) = &self.view.group {
                let updated = group.last_updated;
                let passes = selection.since.is_none_or(|since| updated > since)
                    && selection.until.is_none_or(|until| updated < until);
                if passes {
                    let text = crate::group::group_text(self.store, self.tenant, self.view)?;
                    block.line("Group", text.as_deref().unwrap_or("{}").as_bytes())?;
                }
            }
        }
        if with_associated {
            self.write_associated(member, &mut leads, &mut block)?;
        }
        Ok(block.lines)
    }

    /// Reads the member's compartment data of the block's types through `selection`, writing it
    /// to `block` (unless `None`) and, when `collect`, noting what it leads to.
    fn read_compartment(
        &self,
        selection: &MemberSelection,
        mut block: Option<&mut BlockOut<'_>>,
        collect: bool,
        leads: &mut Leads,
    ) -> Result<(), ExportError> {
        let planned = self.store.plan_parts(self.tenant, selection, &self.spec.types, u64::MAX)?;
        let mut window = Vec::new();
        for resource_type in &self.spec.types {
            let Some((_, parts)) = planned.iter().find(|(planned_type, _)| planned_type == resource_type) else {
                continue;
            };
            for part in parts {
                let range = PartRange { first_key: part.first_key, last_key: part.last_key, count: part.count };
                let mut reader = self.store.part_reader(self.tenant, selection, resource_type, range);
                loop {
                    window.clear();
                    if reader.next_window(&mut window, WINDOW_BYTES)? == 0 {
                        break;
                    }
                    for line in window.split(|byte| *byte == b'\n').filter(|line| !line.is_empty()) {
                        if let Some(block) = block.as_deref_mut() {
                            block.line(resource_type, line)?;
                        }
                        if collect {
                            self.note_leads(resource_type, line, leads);
                        }
                    }
                    if collect {
                        self.find_provenance(leads)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Notes a compartment resource's id (a Provenance target) and its references.
    fn note_leads(&self, resource_type: &str, line: &[u8], leads: &mut Leads) {
        let Ok(resource) = serde_json::from_slice::<Value>(line) else { return };
        if self.spec.provenance {
            if let Some(id) = resource.get("id").and_then(Value::as_str) {
                leads.targets.push((resource_type.to_owned(), id.to_owned()));
            }
        }
        self.note_references(resource_type, &resource, &mut leads.referenced);
    }

    fn note_references(&self, resource_type: &str, resource: &Value, into: &mut BTreeSet<(String, String)>) {
        let Some(scope) = &self.spec.referenced else { return };
        for reference in outgoing_references(resource_type, resource) {
            if !reference.provenance_target && scope.follows(&reference.target_type) {
                into.insert((reference.target_type, reference.target_id));
            }
        }
    }

    /// Looks up the Provenance targeting the noted resources (a window at a time, so the list
    /// stays short).
    fn find_provenance(&self, leads: &mut Leads) -> Result<(), ExportError> {
        if leads.targets.is_empty() {
            return Ok(());
        }
        let at = self.view.selection.transaction_time;
        let found = self.store.provenance_targeting(self.tenant, &leads.targets, at)?;
        leads.targets.clear();
        leads.provenance.extend(found);
        Ok(())
    }

    /// Writes the block's associated data: the Provenance found (a Provenance about the Patient
    /// itself too), then the referenced resources, breadth first up to [`REFERENCE_DEPTH`]
    /// references away. Only resources the export's associated set holds are written; the walk
    /// passes through the others (an unchanged Practitioner under `_since` may lead to a changed
    /// Organization).
    fn write_associated(&self, member: &str, leads: &mut Leads, block: &mut BlockOut<'_>) -> Result<(), ExportError> {
        let Some(set_id) = self.set_id else { return Ok(()) };
        let at = self.view.selection.transaction_time;
        if self.spec.provenance {
            leads.targets.push(("Patient".to_owned(), member.to_owned()));
            self.find_provenance(leads)?;
        }
        let mut frontier = std::mem::take(&mut leads.referenced);
        // Every Provenance about the block's data leads on to what it references, whether the
        // export holds it (changed since `_since`, or the latest) or not.
        let provenance: Vec<String> = std::mem::take(&mut leads.provenance).into_iter().collect();
        let held = match provenance.is_empty() {
            true => Vec::new(),
            false => self.store.associated_ids(self.tenant, set_id, "Provenance", &provenance)?,
        };
        for id in &provenance {
            let Some(body) = self.body_at("Provenance", id, at)? else { continue };
            if held.contains(id) {
                block.line("Provenance", body.as_bytes())?;
            }
            if let Ok(resource) = serde_json::from_str::<Value>(&body) {
                self.note_references("Provenance", &resource, &mut frontier);
            }
        }
        let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
        for depth in 1..=REFERENCE_DEPTH {
            let mut next = BTreeSet::new();
            let fresh: Vec<(String, String)> = frontier.into_iter().filter(|key| seen.insert(key.clone())).collect();
            for chunk in fresh.chunk_by(|a, b| a.0 == b.0) {
                let resource_type = &chunk[0].0;
                let ids: Vec<String> = chunk.iter().map(|(_, id)| id.clone()).collect();
                let held = self.store.associated_ids(self.tenant, set_id, resource_type, &ids)?;
                for id in &ids {
                    let Some(body) = self.body_at(resource_type, id, at)? else { continue };
                    if held.contains(id) {
                        block.line(resource_type, body.as_bytes())?;
                    }
                    if depth < REFERENCE_DEPTH {
                        if let Ok(resource) = serde_json::from_str::<Value>(&body) {
                            self.note_references(resource_type, &resource, &mut next);
                        }
                    }
                }
            }
            frontier = next;
        }
        Ok(())
    }

    /// The body of a resource's version at `at` (None: it did not exist or was deleted then).
    fn body_at(&self, resource_type: &str, id: &str, at: i64) -> Result<Option<String>, ExportError> {
        let version = self.store.version_at(self.tenant, resource_type, id, at)?;
        Ok(version.filter(|version| !version.deleted).and_then(|version| version.body))
    }
}

/// Plans the output files of an organised export: writes every member's block to a counting
/// sink and closes a file once it holds `part_size` lines or more. Each file is
/// `resource_type: "Patient"` with the member index range it covers.
pub fn plan_blocks(
    writer: &BlockWriter<'_>,
    part_size: u64,
    progress: &PlanProgress<'_>,
) -> Result<Vec<PlannedFile>, ExportError> {
    let members = writer.view.selection.members.len();
    let subset = writer.elements.map(ElementSubset::new);
    let mut files = Vec::new();
    let (mut first, mut lines) = (0usize, 0u64);
    for index in 0..members {
        if index % 256 == 0 {
            progress(PlanStep::Blocks { done: index, members })?;
        }
        lines += writer.write_block(index, subset.as_ref(), &mut std::io::sink())?;
        if lines >= part_size.max(1) || index + 1 == members {
            if lines > 0 {
                files.push(PlannedFile {
                    kind: FileKind::Output,
                    resource_type: ORGANIZED_BY.to_owned(),
                    start: 0,
                    end: 0,
                    total: lines,
                    associated: false,
                    members: Some([first as u64, index as u64 + 1]),
                });
            }
            (first, lines) = (index + 1, 0);
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_a_parameters_line_naming_the_patient() {
        let line = header_line("p-1");
        assert_eq!(line.last(), Some(&b'\n'));
        let value: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            value,
            json!({"resourceType": "Parameters",
                   "parameter": [{"name": "header", "valueReference": {"reference": "Patient/p-1"}}]})
        );
    }

    #[test]
    fn referenced_scopes_follow_only_types_outside_the_compartment() {
        assert!(ReferencedScope::All.follows("Practitioner"));
        assert!(!ReferencedScope::All.follows("Observation") && !ReferencedScope::All.follows("Group"));
        let only = ReferencedScope::Only(vec!["Organization".into()]);
        assert!(only.follows("Organization") && !only.follows("Practitioner"));
    }
}
