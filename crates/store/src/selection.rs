//! The export selection rules every store applies alike, whatever its SQL: which version of a
//! candidate resource an export sends, and which associated resources it adds. The stores find
//! candidates (their compartment index, their reference index); these functions decide.

use std::collections::HashMap;

use bulkhead_fhir::Micros;

use crate::{AssociatedRequest, MemberSelection, PartRange, ProvenanceSelection, ReferencedTypes, StoreError};

/// The version of one resource as it was at the transaction time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct VersionAt {
    pub(crate) last_updated: Micros,
    pub(crate) deleted: bool,
    /// The caller may see it (its owner matches a user-scoped selection).
    pub(crate) visible: bool,
}

/// Which members a candidate resource was found through.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reach {
    /// Some member gets its full history (added to the Group since `_since`).
    pub(crate) full_history: bool,
    /// The smallest `since` among the other members, if any.
    pub(crate) existing_since: Option<Micros>,
}

impl Reach {
    /// The lower bound on `lastUpdated` that applies (`None`: none).
    pub(crate) fn since(self) -> Option<Micros> {
        if self.full_history {
            None
        } else {
            self.existing_since
        }
    }

    /// The reach of a resource found through both: the most permissive bound wins.
    pub(crate) fn merge(self, other: Reach) -> Reach {
        let existing_since = match (self.existing_since, other.existing_since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Reach { full_history: self.full_history || other.full_history, existing_since }
    }
}

/// Whether a compartment resource's version at the transaction time is exported: live, visible,
/// changed after the `since` that applies, and before `_until`.
pub(crate) fn selected(selection: &MemberSelection, reach: Reach, version: &VersionAt) -> bool {
    !version.deleted
        && reach.since().is_none_or(|since| version.last_updated > since)
        && selection.until.is_none_or(|until| version.last_updated < until)
        && version.visible
}

/// What reaches an associated resource: the merged reach of the resources it was found through,
/// and whether one of those is exported by this export ("forced": sent whatever `_since`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Via {
    pub(crate) reach: Reach,
    pub(crate) forced: bool,
}

impl Via {
    /// What reaches a resource found through both (associative and commutative, so merging in
    /// memory before merging into stored rows changes nothing).
    pub(crate) fn merge(self, other: Via) -> Via {
        Via { reach: self.reach.merge(other.reach), forced: self.forced || other.forced }
    }
}

/// Whether an associated resource with this version and reach is exported: changed since
/// (`_since` of the members it was reached through), reached through a member added since, or
/// forced by an exported resource; and before `_until`.
pub(crate) fn exported(selection: &MemberSelection, via: Via, last_updated: Micros) -> bool {
    (via.forced || via.reach.since().is_none_or(|since| last_updated > since))
        && selection.until.is_none_or(|until| last_updated < until)
}

/// The types whose cohort resources an associated-data pass reads, each once: those whose
/// references it follows (when `referencing`), then those whose Provenance it adds (when
/// `any_provenance`: the tenant has Provenance targets at all).
pub(crate) fn source_types(request: &AssociatedRequest, referencing: bool, any_provenance: bool) -> Vec<&String> {
    let mut sources: Vec<&String> = Vec::new();
    if referencing {
        sources.extend(&request.reference_sources);
    }
    if any_provenance {
        for resource_type in &request.provenance_sources {
            if !sources.contains(&resource_type) {
                sources.push(resource_type);
            }
        }
    }
    sources
}

/// Which Provenance the exported resources bring: `targeting` holds `(target, Provenance key)`
/// for each target row valid at the transaction time, a target's rows together; `live` gives a
/// Provenance's `lastUpdated` when its version then is live and visible to the caller (`None`:
/// it brings nothing). Every live one comes, or only a target's latest for
/// [`ProvenanceSelection::Latest`]; `bring(target, Provenance key)` is called for each.
pub(crate) fn bring_provenance(
    targeting: &[(usize, i64)],
    mode: ProvenanceSelection,
    mut live: impl FnMut(i64) -> Result<Option<Micros>, StoreError>,
    mut bring: impl FnMut(usize, i64),
) -> Result<(), StoreError> {
    let mut candidates: Vec<(Micros, i64)> = Vec::new();
    for rows in targeting.chunk_by(|a, b| a.0 == b.0) {
        candidates.clear();
        for &(_, provenance) in rows {
            if let Some(last_updated) = live(provenance)? {
                candidates.push((last_updated, provenance));
            }
        }
        if mode == ProvenanceSelection::Latest {
            candidates.sort_unstable();
            candidates.drain(..candidates.len().saturating_sub(1));
        }
        for &(_, provenance) in &candidates {
            bring(rows[0].0, provenance);
        }
    }
    Ok(())
}

/// Whether a user-scoped selection may see a resource owned by `owner`.
pub(crate) fn visible_to(selection: &MemberSelection, owner: Option<&str>) -> bool {
    selection.visibility.user().is_none_or(|user| owner == Some(user))
}

/// Adds the next selected key (keys arrive in ascending order) to a type's parts of at most
/// `part_size` resources each.
pub(crate) fn add_to_parts(parts: &mut Vec<PartRange>, key: i64, part_size: u64) {
    match parts.last_mut() {
        Some(part) if part.count < part_size.max(1) => {
            part.last_key = key;
            part.count += 1;
        }
        _ => parts.push(PartRange { first_key: key, last_key: key, count: 1 }),
    }
}

/// Referenced resources found for one level of an associated-data pass (those of allowed
/// types), merged in memory: the same Practitioner or Organization is referenced by thousands
/// of a window's resources, and is recorded once per batch instead of once per reference. Each
/// store records them in its own node table, and decides when ([`FoundNodes::len`]).
pub(crate) struct FoundNodes<'a> {
    level: u32,
    allowed: &'a ReferencedTypes,
    /// Type, then id, to what reaches that resource.
    found: HashMap<String, HashMap<String, Via>>,
    len: usize,
}

impl<'a> FoundNodes<'a> {
    pub(crate) fn new(level: u32, allowed: &'a ReferencedTypes) -> Self {
        FoundNodes { level, allowed, found: HashMap::new(), len: 0 }
    }

    /// The level these nodes are recorded at.
    pub(crate) fn level(&self) -> u32 {
        self.level
    }

    /// Nodes held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Merges `via` into what reaches `target_type/target_id`, when its type is allowed.
    pub(crate) fn add(&mut self, target_type: &str, target_id: &str, via: Via) {
        let allowed = match self.allowed {
            ReferencedTypes::None => false,
            ReferencedTypes::All => true,
            ReferencedTypes::Only(types) => types.iter().any(|t| t == target_type),
        };
        if !allowed {
            return;
        }
        if !self.found.contains_key(target_type) {
            self.found.insert(target_type.to_owned(), HashMap::new());
        }
        let ids = self.found.get_mut(target_type).expect("inserted above");
        match ids.get_mut(target_id) {
            Some(held) => *held = held.merge(via),
            None => {
                ids.insert(target_id.to_owned(), via);
                self.len += 1;
            }
        }
    }

    /// Merges nodes found elsewhere (of allowed types, at this level) into these.
    pub(crate) fn absorb(&mut self, other: FoundNodes<'_>) {
        for (target_type, ids) in other.found {
            match self.found.get_mut(&target_type) {
                None => {
                    self.len += ids.len();
                    self.found.insert(target_type, ids);
                }
                Some(held) => {
                    for (target_id, via) in ids {
                        match held.get_mut(&target_id) {
                            Some(merged) => *merged = merged.merge(via),
                            None => {
                                held.insert(target_id, via);
                                self.len += 1;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Hands out every node held, by type (id to what reaches it), holding none after.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = (String, HashMap<String, Via>)> + '_ {
        self.len = 0;
        self.found.drain()
    }
}
