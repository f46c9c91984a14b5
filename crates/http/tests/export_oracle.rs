//! Correctness oracle for Group export, and for system- and Patient-level exports with
//! `_typeFilter` and `_elements`.
//!
//! Property test: random scenarios (two tenants with the same patient and resource ids, a target
//! Group and a decoy Group per tenant, resources of several compartment types, updates that move
//! resources between patients, wrong-patient corrections that re-point resources out of the
//! cohort or into it, deletes, resurrections, membership changes) are driven through
//! the real router in-process. At every export checkpoint the manifest and every file are
//! downloaded and compared with a brute-force model kept here: every version written (with the
//! `meta.versionId`/`meta.lastUpdated` the server returned for it), the compartments of each
//! version as this test built them, and the membership timeline of the Group. The server's own
//! query code is never consulted.
//!
//! Expected rules (DESIGN §3, Bulk Data IG):
//! - output: per resource, its version at `transactionTime` (T), when it is live, lies in the
//!   compartment (of that version) of a member active at T, and `lastUpdated > _since`; a member
//!   who was not active at `_since` lifts the `_since` bound for resources in its compartment;
//! - each resource once, exact stored text, no other tenant's data, no other Group than the
//!   target (and that one only when its version at T passes `_since` and `_type` allows it);
//! - `deleted[]` (only with `_since`): resources whose version at T is a tombstone made in
//!   `(_since, T]` and whose last live version was in the compartment of a member active both at
//!   `_since` and at T (a continuing member); and resources whose version at `_since` was live in
//!   a continuing member's compartment and whose version at T is not live in any member's
//!   compartment ("no longer part of this cohort's data", e.g. re-pointed to a non-member);
//! - `error[]`: one OperationOutcome per active member whose Patient does not exist at T;
//! - associated data (README "Associated data"), computed here by a brute-force walk of the
//!   model: every Provenance live at T whose target (at T) is a resource of the cohort's data
//!   (compartment data of a member at T, of a requested type, or a member Patient); and every
//!   Practitioner and Organization (types outside the compartment) live at T that the cohort's
//!   data of requested types, those Provenance, or (up to three references away from the
//!   cohort, through Practitioners and Organizations) each other reference; each once, none
//!   missing. With `_since`, one comes when it changed since, when it is reached through a member
//!   added since, or when a resource this export sends references it (is its target);
//!   `deleted[]` of Provenance leaves out those in `output`;
//! - manifest `count` = lines in the file; `extension.removedMembers` = members at `_since` that
//!   are no longer members at T;
//! - system level: every resource of the tenant whose version at T is live and `lastUpdated >
//!   _since`; `deleted[]`: every resource whose version at T is a tombstone made after `_since`;
//! - Patient level: as a Group whose members are the Patients live at T, every one of them a
//!   continuing member (no full-history lift), with the same associated data, and no Group
//!   resources;
//! - `_typeFilter` (brute force here over each version's JSON, one predicate per query): a
//!   filtered type keeps the resources matching any of its queries, counts included;
//!   `deleted[]` is not filtered (a tombstone has nothing to match). At the Patient level the
//!   associated data is found from the unfiltered cohort (only sent resources force what they
//!   reach), and a filter on Provenance is a 400, or ignored with a warning when lenient;
//! - `_elements=identifier`: each line keeps `resourceType`, `id`, `meta`, `identifier` and the
//!   type's mandatory elements (listed here from the R4 specification), with the SUBSETTED tag;
//! - a client that keeps a replica (full export, then `_since` = previous `transactionTime`;
//!   it removes `deleted[]`, drops what it holds only through removed members, i.e. resources in
//!   no continuing member's compartment, and stores `output`) holds exactly a full export at T,
//!   and receives nothing twice (except a new member's full data); its associated data holds
//!   every associated resource of a full export at T, at its version then (deletions of
//!   associated data are not reported, so it may hold more).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use axum::http::StatusCode;
use bulkhead_fhir::{format_instant, parse_since, Micros};
use bulkhead_http::credentials::{generate_credentials, store_client};
use bulkhead_http::HttpConfig;
use proptest::prelude::*;
use serde_json::{json, Value};

use common::{delete, get, put, Call, Client, Reply, Server};

/// The compartment types the scenarios write (plus Patient and the Group).
const KINDS: [&str; 5] = ["Observation", "AllergyIntolerance", "Encounter", "Claim", "Provenance"];
/// The types outside the Patient compartment the scenarios write (referenced resources).
const SHARED: [&str; 2] = ["Practitioner", "Organization"];
/// How many ids of each shared type the scenarios use (some never written: dangling).
const SHARED_IDS: [u8; 2] = [3, 4];
/// Every type an export can be asked for in these scenarios.
const EXPORT_TYPES: [&str; 9] = [
    "Patient",
    "Observation",
    "AllergyIntolerance",
    "Encounter",
    "Claim",
    "Provenance",
    "Group",
    "Practitioner",
    "Organization",
];
/// The associated types: exported only through their targets or referrers.
const ASSOCIATED: [&str; 3] = ["Provenance", "Practitioner", "Organization"];
/// How many references away from the cohort's data a referenced resource may be.
const REFERENCE_DEPTH: u32 = 3;
const TARGET_GROUP: &str = "g";
const DECOY_GROUP: &str = "decoy";
/// A patient that is created only by a later step.
const LATE: &str = "late";
/// A patient that never exists, yet is referenced by members and resources.
const GHOST: &str = "ghost";

// ---------------------------------------------------------------------------------------------
// Scenario

#[derive(Debug, Clone)]
enum SinceChoice {
    None,
    /// The `transactionTime` of an earlier checkpoint of the tenant (index modulo their count).
    Checkpoint(u8),
    /// The `lastUpdated` of an earlier write (index modulo their count): a boundary case.
    WriteTime(u8),
    /// The same `_since` as the tenant's previous Group export (a repeated request).
    Previous,
}

#[derive(Debug, Clone)]
enum Step {
    /// Creates a resource of `KINDS[kind]` (or a Patient when `kind == 5`) referencing patients
    /// picked by `a` and `b` (`b` only when `two`); kinds 6 and 7 write a Practitioner or an
    /// Organization (id picked by `a`, linked to an Organization picked by `b` when `two`).
    Create {
        tenant: usize,
        kind: u8,
        a: u8,
        b: u8,
        two: bool,
    },
    /// Updates a picked resource (resurrects it when deleted); `moved` re-targets its references.
    Update {
        tenant: usize,
        pick: u16,
        a: u8,
        b: u8,
        two: bool,
        moved: bool,
    },
    Delete {
        tenant: usize,
        pick: u16,
    },
    /// A wrong-patient correction: re-points a picked resource to one patient only, a member of
    /// the target Group (`into_cohort`) or a patient that is not one (picked by `to`).
    Repoint {
        tenant: usize,
        pick: u16,
        to: u8,
        into_cohort: bool,
    },
    /// 0-2: add (a second, active entry when the patient is listed inactive), 3: remove,
    /// 4: mark inactive, 5: add to the decoy Group.
    Member {
        tenant: usize,
        patient: u8,
        action: u8,
    },
    /// `types` is a bit mask over `EXPORT_TYPES`; a `deferred` export's files are downloaded
    /// only after the next step's writes (files come from the snapshot at `transactionTime`).
    Export {
        tenant: usize,
        types: Option<u16>,
        since: SinceChoice,
        deferred: bool,
    },
    /// Full export, then incremental exports with `_since` = previous `transactionTime`.
    Sync {
        tenant: usize,
    },
    /// Deletes the target Group (exports answer 410 until a membership change re-creates it).
    DeleteGroup {
        tenant: usize,
    },
    /// Updates (or deletes) a picked Practitioner or Organization, or (`provenance`) a picked
    /// Provenance: a change to associated data alone.
    Touch {
        tenant: usize,
        pick: u16,
        delete: bool,
        provenance: bool,
    },
    /// The same Group export three times: twice in a row (the second may reuse the first's plan
    /// and associated set), then after one change to associated data (`change` picks a
    /// Practitioner or Organization updated, deleted or created, or a Provenance created,
    /// updated or deleted; see [`expand`]), which a reused set must not miss.
    Repeat {
        tenant: usize,
        types: Option<u16>,
        since: SinceChoice,
        change: u8,
        a: u8,
        b: u8,
        pick: u16,
    },
    /// A system- (`system`) or Patient-level export on the standard base, with the
    /// `_typeFilter` set `FILTERS[filter % FILTERS.len()]` and optionally `_elements=identifier`.
    Standard {
        tenant: usize,
        system: bool,
        since: SinceChoice,
        filter: u8,
        elements: bool,
    },
}

#[derive(Debug, Clone)]
struct Scenario {
    part_size: u64,
    patients: [usize; 2],
    /// Initial members: (patient pick, inactive).
    members: [Vec<(u8, bool)>; 2],
    steps: Vec<Step>,
}

fn since_strategy() -> impl Strategy<Value = SinceChoice> {
    prop_oneof![
        2 => Just(SinceChoice::None),
        3 => any::<u8>().prop_map(SinceChoice::Checkpoint),
        1 => any::<u8>().prop_map(SinceChoice::WriteTime),
    ]
}

fn step_strategy() -> impl Strategy<Value = Step> {
    let tenant = 0..2usize;
    prop_oneof![
        10 => (tenant.clone(), 0..8u8, any::<u8>(), any::<u8>(), any::<bool>())
            .prop_map(|(tenant, kind, a, b, two)| Step::Create { tenant, kind, a, b, two }),
        4 => (tenant.clone(), any::<u16>(), any::<u8>(), any::<u8>(), any::<bool>(), any::<bool>())
            .prop_map(|(tenant, pick, a, b, two, moved)| Step::Update { tenant, pick, a, b, two, moved }),
        2 => (tenant.clone(), any::<u16>()).prop_map(|(tenant, pick)| Step::Delete { tenant, pick }),
        3 => (tenant.clone(), any::<u16>(), any::<u8>(), any::<bool>())
            .prop_map(|(tenant, pick, to, into_cohort)| Step::Repoint { tenant, pick, to, into_cohort }),
        3 => (tenant.clone(), any::<u8>(), 0..6u8).prop_map(|(tenant, patient, action)| Step::Member { tenant, patient, action }),
        3 => (tenant.clone(), proptest::option::of(1..512u16), since_strategy(), proptest::bool::weighted(0.3))
            .prop_map(|(tenant, types, since, deferred)| Step::Export { tenant, types, since, deferred }),
        1 => tenant.clone().prop_map(|tenant| Step::Sync { tenant }),
        1 => tenant.clone().prop_map(|tenant| Step::DeleteGroup { tenant }),
        3 => (tenant.clone(), proptest::option::weighted(0.3, 1..512u16), since_strategy(), 0..5u8, any::<u8>(), any::<u8>(), any::<u16>())
            .prop_map(|(tenant, types, since, change, a, b, pick)| Step::Repeat { tenant, types, since, change, a, b, pick }),
        3 => (tenant, any::<bool>(), since_strategy(), any::<u8>(), proptest::bool::weighted(0.3))
            .prop_map(|(tenant, system, since, filter, elements)| Step::Standard { tenant, system, since, filter, elements }),
    ]
}

fn scenario_strategy() -> impl Strategy<Value = Scenario> {
    let members = || proptest::collection::vec((any::<u8>(), proptest::bool::weighted(0.2)), 1..7);
    (1..4u64, 2..5usize, 2..5usize, members(), members(), proptest::collection::vec(step_strategy(), 20..80)).prop_map(
        |(part_size, p0, p1, m0, m1, steps)| Scenario { part_size, patients: [p0, p1], members: [m0, m1], steps },
    )
}

// ---------------------------------------------------------------------------------------------
// The model (the oracle's data)

/// One version of a resource as written.
#[derive(Debug, Clone)]
struct Ver {
    version: i64,
    last_updated: Micros,
    /// The stored text the server returned; `None` for a tombstone.
    body: Option<String>,
    /// Patients whose compartment this version is in; for a tombstone, those of the last live
    /// version.
    compartments: BTreeSet<String>,
    /// Practitioners and Organizations this version references (empty for a tombstone).
    refs: BTreeSet<(String, String)>,
    /// For a Provenance: its targets (empty for a tombstone).
    targets: BTreeSet<(String, String)>,
}

/// What a live resource looks like, so an update can re-create it with a change.
#[derive(Debug, Clone)]
struct Shape {
    kind: &'static str,
    a: String,
    b: Option<String>,
    /// Picks the shared resources it references (and a Provenance's Observation target).
    r: u8,
}

/// A client's replica: the `transactionTime` of its last export, and `(type, id)` → body.
type Replica = (Micros, BTreeMap<(String, String), String>);

#[derive(Default)]
struct TenantModel {
    patients: Vec<String>,
    /// Every version of every resource, by (type, id), oldest first.
    resources: BTreeMap<(String, String), Vec<Ver>>,
    shapes: BTreeMap<(String, String), Shape>,
    /// Membership timeline of the target Group: (lastUpdated, active members).
    membership: Vec<(Micros, BTreeSet<String>)>,
    /// Current entries of the target Group: (patient, inactive).
    entries: Vec<(String, bool)>,
    decoy_entries: Vec<String>,
    next_id: usize,
    counter: u64,
    checkpoints: Vec<Micros>,
    write_times: Vec<Micros>,
    replica: Option<Replica>,
    /// The `_since` of the previous Group export.
    last_since: Option<Micros>,
}

impl TenantModel {
    fn pool(&self) -> Vec<String> {
        let mut pool = self.patients.clone();
        pool.push(LATE.into());
        pool.push(GHOST.into());
        pool
    }

    fn pick_patient(&self, pick: u8) -> String {
        let pool = self.pool();
        pool[pick as usize % pool.len()].clone()
    }

    fn members_at(&self, at: Micros) -> BTreeSet<String> {
        self.membership
            .iter()
            .rev()
            .find(|(updated, _)| *updated <= at)
            .map(|(_, members)| members.clone())
            .unwrap_or_default()
    }

    fn version_at(&self, key: &(String, String), at: Micros) -> Option<&Ver> {
        self.resources.get(key)?.iter().rev().find(|version| version.last_updated <= at)
    }

    fn record(&mut self, key: (String, String), ver: Ver) {
        self.write_times.push(ver.last_updated);
        let versions = self.resources.entry(key).or_default();
        if let Some(last) = versions.last() {
            assert!(
                ver.version == last.version + 1,
                "version numbers must grow by one: {} after {}",
                ver.version,
                last.version
            );
            assert!(ver.last_updated > last.last_updated, "lastUpdated must grow");
        } else {
            assert_eq!(ver.version, 1, "a new resource starts at version 1");
        }
        versions.push(ver);
    }

    fn is_live(&self, key: &(String, String)) -> bool {
        self.resources.get(key).and_then(|versions| versions.last()).is_some_and(|version| version.body.is_some())
    }
}

/// What one export should contain, per the rules in the module documentation.
#[derive(Debug, Default, PartialEq)]
struct Expected {
    output: BTreeMap<(String, String), String>,
    deleted: BTreeSet<(String, String)>,
    missing: BTreeSet<String>,
    removed: BTreeSet<String>,
}

fn expected(model: &TenantModel, at: Micros, since: Option<Micros>, types: &BTreeSet<&str>) -> Expected {
    let members = model.members_at(at);
    let members_at_since = since.map(|since| model.members_at(since));
    expected_for(model, at, since, types, &members, members_at_since.as_ref(), &|_, _| true)
}

/// [`expected`] for a cohort of `members` at T (`members_at_since`: the members at `_since`),
/// with `keeps` as the `_typeFilter` (whether the export sends a compartment resource's version,
/// given its type and stored text). The cohort's data, from which associated data is found, is
/// not filtered; only what a sent resource references or is the target of is forced.
fn expected_for(
    model: &TenantModel,
    at: Micros,
    since: Option<Micros>,
    types: &BTreeSet<&str>,
    members: &BTreeSet<String>,
    members_at_since: Option<&BTreeSet<String>>,
    keeps: &dyn Fn(&str, &str) -> bool,
) -> Expected {
    let continuing: BTreeSet<String> =
        members_at_since.iter().flat_map(|earlier| earlier.intersection(members).cloned()).collect();
    let mut result = Expected::default();
    // The cohort's data at T, whatever `_type` and `_since`: key -> how it is reached.
    let mut cohort: BTreeMap<(String, String), Via> = BTreeMap::new();
    for key in model.resources.keys() {
        let (resource_type, _) = key;
        if SHARED.contains(&resource_type.as_str()) {
            continue;
        }
        let Some(version) = model.version_at(key, at) else {
            continue;
        };
        if resource_type == "Group" {
            if types.contains("Group")
                && key.1 == TARGET_GROUP
                && version.body.is_some()
                && since.is_none_or(|since| version.last_updated > since)
            {
                result.output.insert(key.clone(), version.body.clone().unwrap());
            }
            continue;
        }
        let reaching: Vec<&String> = version.compartments.iter().filter(|patient| members.contains(*patient)).collect();
        if types.contains(resource_type.as_str()) {
            if let Some(since) = since {
                // Live in a continuing member's compartment at `_since`, in no member's live data at T.
                let held = model.version_at(key, since).is_some_and(|then| {
                    then.body.is_some() && then.compartments.iter().any(|patient| continuing.contains(patient))
                });
                if held && (version.body.is_none() || reaching.is_empty()) {
                    result.deleted.insert(key.clone());
                }
            }
        }
        if reaching.is_empty() {
            continue;
        }
        let existing = |patient: &String| members_at_since.is_some_and(|earlier| earlier.contains(patient));
        match &version.body {
            Some(body) => {
                let full = since.is_none() || reaching.iter().any(|patient| !existing(patient));
                let sent = (full || version.last_updated > since.unwrap()) && keeps(resource_type, body);
                if types.contains(resource_type.as_str()) && sent && resource_type != "Provenance" {
                    result.output.insert(key.clone(), body.clone());
                }
                let since_bound = if full { None } else { since };
                // In the cohort whether or not `_typeFilter` keeps it; forcing only when sent.
                cohort.insert(key.clone(), Via { full, since: since_bound, forced: sent });
            }
            None => {
                if types.contains(resource_type.as_str()) {
                    if let Some(since) = since {
                        if version.last_updated > since && reaching.iter().any(|patient| existing(patient)) {
                            result.deleted.insert(key.clone());
                        }
                    }
                }
            }
        }
    }
    let associated = expected_associated(model, at, types, &cohort);
    for key in associated.keys() {
        // A Provenance sent as associated data is not also deleted.
        result.deleted.remove(key);
    }
    result.output.extend(associated);
    for member in members {
        let patient = model.version_at(&("Patient".into(), member.clone()), at);
        if patient.is_none_or(|patient| patient.body.is_none()) {
            result.missing.insert(member.clone());
        }
    }
    if let Some(earlier) = members_at_since {
        result.removed = earlier.difference(members).cloned().collect();
    }
    result
}

/// How an associated resource (or a cohort resource it is found through) is reached: through a
/// member added since `_since` (`full`), else the `_since` that applies; `forced`: a resource
/// this export sends reaches it.
#[derive(Debug, Clone, Copy)]
struct Via {
    full: bool,
    since: Option<Micros>,
    forced: bool,
}

impl Via {
    fn merge(self, other: Via) -> Via {
        let since = match (self.since, other.since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Via { full: self.full || other.full, since, forced: self.forced || other.forced }
    }

    fn sends(self, last_updated: Micros) -> bool {
        self.forced || self.full || self.since.is_none_or(|since| last_updated > since)
    }
}

/// The associated data a brute-force walk of the model finds (README "Associated data").
fn expected_associated(
    model: &TenantModel,
    at: Micros,
    types: &BTreeSet<&str>,
    cohort: &BTreeMap<(String, String), Via>,
) -> BTreeMap<(String, String), String> {
    let mut output = BTreeMap::new();
    let live_at = |key: &(String, String)| model.version_at(key, at).filter(|version| version.body.is_some());
    // Provenance: targets among the cohort's data of requested types, or member Patients.
    let mut provenance: BTreeMap<(String, String), Via> = BTreeMap::new();
    if types.contains("Provenance") {
        for (key, _) in model.resources.iter().filter(|(key, _)| key.0 == "Provenance") {
            let Some(version) = live_at(key) else { continue };
            let vias: Vec<Via> = version
                .targets
                .iter()
                .filter(|target| {
                    target.0 != "Provenance" && (types.contains(target.0.as_str()) || target.0 == "Patient")
                })
                .filter_map(|target| cohort.get(target).copied())
                .collect();
            if let Some(via) = vias.into_iter().reduce(Via::merge) {
                if via.sends(version.last_updated) {
                    output.insert(key.clone(), version.body.clone().unwrap());
                }
                provenance.insert(key.clone(), Via { forced: via.sends(version.last_updated), ..via });
            }
        }
    }
    // Referenced resources, level by level; a resource keeps the level it was first found at.
    let allowed = |resource_type: &str| types.contains(resource_type);
    let mut level: BTreeMap<(String, String), Via> = BTreeMap::new();
    let sources = cohort
        .iter()
        .filter(|(key, _)| key.0 != "Provenance" && types.contains(key.0.as_str()))
        .chain(provenance.iter());
    for (key, via) in sources {
        let version = live_at(key).expect("cohort resources are live");
        for target in version.refs.iter().filter(|target| allowed(&target.0)) {
            let merged = level.get(target).map_or(*via, |found| found.merge(*via));
            level.insert(target.clone(), merged);
        }
    }
    let mut seen: BTreeSet<(String, String)> = level.keys().cloned().collect();
    for depth in 1..=REFERENCE_DEPTH {
        let mut next: BTreeMap<(String, String), Via> = BTreeMap::new();
        for (key, via) in &level {
            let Some(version) = live_at(key) else { continue };
            let sent = via.sends(version.last_updated);
            if sent {
                output.insert(key.clone(), version.body.clone().unwrap());
            }
            if depth == REFERENCE_DEPTH {
                continue;
            }
            for target in version.refs.iter().filter(|target| allowed(&target.0) && !seen.contains(*target)) {
                let via = Via { forced: sent, ..*via };
                let merged = next.get(target).map_or(via, |found| found.merge(via));
                next.insert(target.clone(), merged);
            }
        }
        seen.extend(next.keys().cloned());
        level = next;
    }
    output
}

// ---------------------------------------------------------------------------------------------
// Resource bodies (compartments computed here, independently of the server)

fn reference(target: &str) -> Value {
    json!({"reference": target})
}

/// A body as written, with what the oracle needs to know about it.
struct Built {
    body: Value,
    compartments: BTreeSet<String>,
    refs: BTreeSet<(String, String)>,
    targets: BTreeSet<(String, String)>,
}

fn practitioner(pick: u8) -> String {
    format!("pr{}", pick % SHARED_IDS[0])
}

fn organization(pick: u8) -> String {
    format!("o{}", pick % SHARED_IDS[1])
}

fn key(resource_type: &str, id: &str) -> (String, String) {
    (resource_type.to_owned(), id.to_owned())
}

/// The body of a resource, the patients whose compartments it is in, the Practitioners and
/// Organizations it references, and (a Provenance) its targets. `observation`: an Observation a
/// Provenance also targets.
fn build(kind: &str, id: &str, shape: &Shape, counter: u64, tenant: usize, observation: Option<&str>) -> Built {
    let a = format!("Patient/{}", shape.a);
    let b = shape.b.as_ref().map(|b| format!("Patient/{b}"));
    let marker = json!([{"system": "urn:oracle", "value": format!("t{tenant}-{id}-{counter}")}]);
    let mut compartments: BTreeSet<String> = [shape.a.clone()].into();
    let mut refs = BTreeSet::new();
    let mut targets = BTreeSet::new();
    let (pr, org) = (practitioner(shape.r), organization(shape.r));
    let body = match kind {
        "Patient" => {
            compartments = [id.to_owned()].into();
            refs.insert(key("Organization", &org));
            json!({"resourceType": "Patient", "id": id, "identifier": marker, "name": [{"family": format!("F{counter}")}],
                "managingOrganization": reference(&format!("Organization/{org}"))})
        }
        "Practitioner" | "Organization" => {
            compartments = BTreeSet::new();
            let mut body = json!({"resourceType": kind, "id": id, "identifier": marker});
            // `a` holds the Organization it links to, if any.
            if !shape.a.is_empty() {
                refs.insert(key("Organization", &shape.a));
                let link = reference(&format!("Organization/{}", shape.a));
                if kind == "Organization" {
                    body["partOf"] = link;
                } else {
                    body["qualification"] = json!([{"code": {"text": "md"}, "issuer": link}]);
                }
            }
            body
        }
        "Observation" => {
            let mut body = json!({"resourceType": "Observation", "id": id, "identifier": marker, "status": "final",
                "code": {"text": "x"}, "subject": reference(&a), "valueInteger": counter});
            if let Some(b) = &b {
                refs.insert(key("Practitioner", &pr));
                body["performer"] = json!([reference(&format!("Practitioner/{pr}")), reference(b)]);
            }
            body
        }
        "AllergyIntolerance" => {
            // `recorder` puts it in a second patient's compartment.
            let mut body =
                json!({"resourceType": "AllergyIntolerance", "id": id, "identifier": marker, "patient": reference(&a)});
            if let Some(b) = &b {
                body["recorder"] = reference(b);
            }
            body
        }
        "Encounter" => {
            // A non-Patient reference elsewhere must not count.
            let mut body = json!({"resourceType": "Encounter", "id": id, "identifier": marker, "status": "finished",
                "class": {"code": "AMB"}, "subject": reference(&a),
                "serviceProvider": reference(&format!("Organization/{org}"))});
            refs.insert(key("Organization", &org));
            if let Some(b) = &b {
                body["participant"] =
                    json!([{"individual": reference(&format!("RelatedPerson/{}", b.trim_start_matches("Patient/")))}]);
            }
            body
        }
        "Claim" => {
            let mut body = json!({"resourceType": "Claim", "id": id, "identifier": marker, "status": "active",
                "type": {"text": "professional"}, "use": "claim", "patient": reference(&a), "created": "2020-01-01",
                "provider": reference(&format!("Organization/{org}")), "priority": {"text": "normal"},
                "insurance": [{"sequence": 1, "focal": true, "coverage": reference("Coverage/c1")}]});
            refs.insert(key("Organization", &org));
            if let Some(b) = &b {
                body["payee"] = json!({"type": {"text": "subscriber"}, "party": reference(b)});
            }
            body
        }
        "Provenance" => {
            let observation = observation.unwrap_or("elsewhere");
            let mut target = vec![reference(&a), reference(&format!("Observation/{observation}"))];
            targets.insert(key("Patient", &shape.a));
            targets.insert(key("Observation", observation));
            if let Some(b) = &b {
                target.push(reference(b));
                targets.insert(key("Patient", shape.b.as_ref().unwrap()));
            }
            refs.insert(key("Practitioner", &pr));
            // R4 Provenance has no identifier: the marker goes into `policy` (a uri).
            let policy = format!("urn:oracle:t{tenant}-{id}-{counter}");
            json!({"resourceType": "Provenance", "id": id, "policy": [policy], "target": target,
                "recorded": "2020-01-01T00:00:00Z", "agent": [{"who": reference(&format!("Practitioner/{pr}"))}]})
        }
        other => unreachable!("unknown kind {other}"),
    };
    if !matches!(kind, "Patient" | "Encounter" | "Practitioner" | "Organization") {
        if let Some(b) = &shape.b {
            compartments.insert(b.clone());
        }
    }
    Built { body, compartments, refs, targets }
}

fn group_body(id: &str, entries: &[(String, bool)]) -> Value {
    let members: Vec<Value> = entries
        .iter()
        .map(|(patient, inactive)| {
            let mut member = json!({"entity": reference(&format!("Patient/{patient}"))});
            if *inactive {
                member["inactive"] = json!(true);
            }
            member
        })
        .collect();
    json!({"resourceType": "Group", "id": id, "type": "person", "actual": true, "member": members})
}

fn active(entries: &[(String, bool)]) -> BTreeSet<String> {
    entries.iter().filter(|(_, inactive)| !inactive).map(|(patient, _)| patient.clone()).collect()
}

// ---------------------------------------------------------------------------------------------
// The server under test

struct Credentials {
    clients: [Client; 2],
}

/// The same two clients in every case: client ids only need to be unique per store, and every
/// case has a fresh store.
fn credentials() -> &'static Credentials {
    static CREDENTIALS: OnceLock<Credentials> = OnceLock::new();
    CREDENTIALS.get_or_init(|| {
        let (a, b) = (generate_credentials(), generate_credentials());
        Credentials {
            clients: [
                Client { id: a.client_id, secret: a.client_secret },
                Client { id: b.client_id, secret: b.client_secret },
            ],
        }
    })
}

/// The server of one case: two tenants (`tenant0`, `tenant1`) with one client each.
struct Tenants {
    server: Server,
}

impl Tenants {
    fn start(part_size: u64) -> Tenants {
        let creds = credentials();
        let config = HttpConfig { export_part_size: part_size, ..HttpConfig::default() };
        let server = Server::with_config(config);
        for tenant in 0..2 {
            let created = server.tenant(&format!("tenant{tenant}"));
            let client = &creds.clients[tenant];
            store_client(server.store.as_ref(), created, &client.id, &client.secret).unwrap();
        }
        Tenants { server }
    }

    /// Sends `call` with the credentials of `tenant`'s client.
    async fn send(&self, tenant: usize, call: Call) -> Reply {
        self.server.send(call.by(&credentials().clients[tenant])).await
    }

    /// PUTs a resource and returns the version the server made.
    async fn put(&self, tenant: usize, body: &Value) -> Ver {
        let (resource_type, id) = (body["resourceType"].as_str().unwrap(), body["id"].as_str().unwrap());
        let reply = self.send(tenant, put(&format!("/r4/{resource_type}/{id}")).json(body)).await;
        assert!(reply.status.is_success(), "PUT {resource_type}/{id}: {} {}", reply.status, reply.text());
        let text = String::from_utf8(reply.body.clone()).unwrap();
        let stored = reply.json();
        Ver {
            version: stored["meta"]["versionId"].as_str().unwrap().parse().unwrap(),
            last_updated: parse_since(stored["meta"]["lastUpdated"].as_str().unwrap()).unwrap(),
            body: Some(text),
            compartments: BTreeSet::new(),
            refs: BTreeSet::new(),
            targets: BTreeSet::new(),
        }
    }

    /// DELETEs a resource; returns the tombstone's (version, lastUpdated) from its history.
    async fn delete(&self, tenant: usize, resource_type: &str, id: &str) -> (i64, Micros) {
        let reply = self.send(tenant, delete(&format!("/r4/{resource_type}/{id}"))).await;
        assert_eq!(reply.status, StatusCode::NO_CONTENT, "DELETE {resource_type}/{id}");
        let history = self.send(tenant, get(&format!("/r4/{resource_type}/{id}/_history"))).await.json();
        let newest = &history["entry"][0];
        assert_eq!(
            newest["request"]["method"], "DELETE",
            "newest history entry of {resource_type}/{id} after a delete"
        );
        let etag = newest["response"]["etag"].as_str().unwrap();
        let version = etag.trim_start_matches("W/").trim_matches('"').parse().unwrap();
        (version, parse_since(newest["response"]["lastModified"].as_str().unwrap()).unwrap())
    }
}

// ---------------------------------------------------------------------------------------------
// Running a scenario

/// What one export returned.
struct Exported {
    transaction_time: Micros,
    output: BTreeMap<(String, String), String>,
    deleted: BTreeSet<(String, String)>,
}

fn type_list(mask: Option<u16>) -> Option<Vec<&'static str>> {
    mask.map(|mask| {
        let mut types: Vec<&str> =
            EXPORT_TYPES.iter().enumerate().filter(|(bit, _)| mask & (1 << bit) != 0).map(|(_, name)| *name).collect();
        // Referenced types alone are a 400 (they come only with compartment data).
        if types.iter().all(|t| SHARED.contains(t)) {
            types.insert(0, "Patient");
        }
        types
    })
}

/// Runs one export, downloads every file, checks the files' own consistency and compares the
/// result with the oracle.
async fn export(
    server: &Tenants,
    model: &TenantModel,
    tenant: usize,
    types: Option<Vec<&'static str>>,
    since: Option<Micros>,
) -> Exported {
    let kicked = kick_off(server, tenant, types, since).await;
    collect(server, model, tenant, kicked).await
}

/// A manifest whose files are not downloaded yet.
struct Kicked {
    what: String,
    manifest: Value,
    transaction_time: Micros,
    types: Option<Vec<&'static str>>,
    since: Option<Micros>,
}

async fn kick_off(server: &Tenants, tenant: usize, types: Option<Vec<&'static str>>, since: Option<Micros>) -> Kicked {
    let mut query = form_urlencoded::Serializer::new(String::new());
    if let Some(types) = &types {
        query.append_pair("_type", &types.join(","));
    }
    if let Some(since) = since {
        query.append_pair("_since", &format_instant(since));
    }
    let query = query.finish();
    let what = format!("tenant {tenant} export ?{query}");
    let reply = server.send(tenant, get(&format!("/bulk-data/r4/Group/{TARGET_GROUP}/$export?{query}"))).await;
    assert_eq!(reply.status, StatusCode::OK, "{what}: {}", reply.text());
    let content_type = reply.header("content-type");
    assert!(content_type.contains("application/json"), "{what}: manifest content type {content_type}");
    let manifest = reply.json();
    let transaction_time = parse_since(manifest["transactionTime"].as_str().expect("transactionTime")).unwrap();
    assert_eq!(manifest["requiresAccessToken"], json!(true));
    assert_eq!(manifest.get("deleted").is_some(), since.is_some(), "{what}: deleted[] is present exactly with _since");

    Kicked { what, manifest, transaction_time, types, since }
}

/// Downloads every file of a manifest and checks the export against the oracle.
async fn collect(server: &Tenants, model: &TenantModel, tenant: usize, kicked: Kicked) -> Exported {
    let Kicked { what, manifest, transaction_time, types, since } = kicked;
    let mut output: BTreeMap<(String, String), String> = BTreeMap::new();
    for item in manifest["output"].as_array().expect("output[]") {
        let item_type = item["type"].as_str().unwrap();
        assert!(
            types.as_ref().is_none_or(|types| types.contains(&item_type)),
            "{what}: file of unrequested type {item_type}"
        );
        for line in download(server, tenant, item, &what).await {
            let resource: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(resource["resourceType"], item_type, "{what}: line in the {item_type} file: {line}");
            let key = (item_type.to_owned(), resource["id"].as_str().unwrap().to_owned());
            assert!(output.insert(key.clone(), line).is_none(), "{what}: {key:?} exported twice");
        }
    }
    let mut deleted = BTreeSet::new();
    for item in manifest.get("deleted").and_then(Value::as_array).into_iter().flatten() {
        assert_eq!(item["type"], "Bundle", "{what}: deleted[] item type");
        for line in download(server, tenant, item, &what).await {
            let bundle: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(
                (bundle["resourceType"].as_str(), bundle["type"].as_str()),
                (Some("Bundle"), Some("transaction")),
                "{what}: {line}"
            );
            for entry in bundle["entry"].as_array().expect("entries") {
                assert_eq!(entry["request"]["method"], "DELETE", "{what}: {line}");
                let url = entry["request"]["url"].as_str().unwrap();
                let (resource_type, id) = url.split_once('/').expect("Type/id");
                assert!(deleted.insert((resource_type.to_owned(), id.to_owned())), "{what}: {url} in deleted[] twice");
            }
        }
    }
    let mut missing = BTreeSet::new();
    for item in manifest["error"].as_array().expect("error[]") {
        assert_eq!(item["type"], "OperationOutcome", "{what}: error[] item type");
        for line in download(server, tenant, item, &what).await {
            let outcome: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(outcome["resourceType"], "OperationOutcome");
            let diagnostics = outcome["issue"][0]["diagnostics"].as_str().unwrap_or("");
            let patient = diagnostics.split("Patient/").nth(1).and_then(|rest| rest.split_whitespace().next());
            let patient = patient.unwrap_or_else(|| panic!("{what}: error line names no Patient: {line}"));
            assert!(missing.insert(patient.to_owned()), "{what}: missing member {patient} reported twice");
        }
    }
    let removed: BTreeSet<String> = manifest
        .pointer("/extension/removedMembers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|member| member.as_str().unwrap().trim_start_matches("Patient/").to_owned())
        .collect();

    let wanted: BTreeSet<&str> = types.clone().unwrap_or(EXPORT_TYPES.to_vec()).into_iter().collect();
    let oracle = expected(model, transaction_time, since, &wanted);
    compare(&what, &oracle.output, &output, model, transaction_time);
    assert_eq!(oracle.deleted, deleted, "{what}: deleted[] (expected left, got right)");
    assert_eq!(oracle.missing, missing, "{what}: members reported missing (expected left, got right)");
    assert_eq!(oracle.removed, removed, "{what}: removedMembers (expected left, got right)");
    for key in &deleted {
        assert!(!output.contains_key(key), "{what}: {key:?} both in output and deleted[]");
    }
    count(&STATS.exports, 1);
    count(&STATS.with_since, since.is_some() as usize);
    count(&STATS.files, manifest["output"].as_array().map_or(0, Vec::len));
    count(&STATS.lines, output.len());
    count(&STATS.group_lines, output.keys().filter(|(t, _)| t == "Group").count());
    count(&STATS.provenance_lines, output.keys().filter(|(t, _)| t == "Provenance").count());
    count(&STATS.referenced_lines, output.keys().filter(|(t, _)| SHARED.contains(&t.as_str())).count());
    let beyond_patient = output
        .keys()
        .filter(|key| key.0 == "Provenance")
        .filter_map(|key| model.version_at(key, transaction_time))
        .filter(|version| {
            version.targets.iter().any(|target| {
                target.0 != "Patient" && version.compartments.is_disjoint(&model.members_at(transaction_time))
            })
        })
        .count();
    count(&STATS.provenance_beyond_patient, beyond_patient);
    count(&STATS.deleted, deleted.len());
    count(
        &STATS.left,
        deleted.iter().filter(|key| model.version_at(key, transaction_time).is_some_and(|v| v.body.is_some())).count(),
    );
    count(&STATS.missing, missing.len());
    count(&STATS.removed, removed.len());
    if let Some(since) = since {
        let lifted = output
            .keys()
            .filter(|key| model.version_at(key, transaction_time).is_some_and(|v| v.last_updated <= since))
            .count();
        count(&STATS.lifted, lifted);
    }
    Exported { transaction_time, output, deleted }
}

/// Downloads one manifest file; checks its content type and that it has `count` lines.
async fn download(server: &Tenants, tenant: usize, item: &Value, what: &str) -> Vec<String> {
    let url = item["url"].as_str().unwrap();
    let path = &url[url.find("/bulk-data/").expect("file URL path")..];
    let reply = server.send(tenant, get(path)).await;
    assert_eq!(reply.status, StatusCode::OK, "{what}: download {}", reply.text());
    assert_eq!(reply.header("content-type"), "application/fhir+ndjson");
    let text = String::from_utf8(reply.body).unwrap();
    assert!(text.is_empty() || text.ends_with('\n'), "{what}: NDJSON ends with a newline");
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    assert_eq!(
        Some(lines.len() as u64),
        item["count"].as_u64(),
        "{what}: manifest count vs lines of a {} file",
        item["type"]
    );
    lines
}

/// Compares output sets, explaining the first differences.
fn compare(
    what: &str,
    expected: &BTreeMap<(String, String), String>,
    got: &BTreeMap<(String, String), String>,
    model: &TenantModel,
    at: Micros,
) {
    if expected == got {
        return;
    }
    let mut problems = Vec::new();
    for (key, body) in expected {
        match got.get(key) {
            None => problems.push(format!("missing {key:?}: {body}")),
            Some(line) if line != body => {
                problems.push(format!("wrong version of {key:?}: expected {body}, got {line}"))
            }
            _ => {}
        }
    }
    for (key, line) in got {
        if !expected.contains_key(key) {
            let history = model.resources.get(key).map(|versions| {
                versions
                    .iter()
                    .map(|v| {
                        format!("v{}@{} live={} in {:?}", v.version, v.last_updated, v.body.is_some(), v.compartments)
                    })
                    .collect::<Vec<_>>()
            });
            problems.push(format!("unexpected {key:?}: {line}; model history: {history:?}"));
        }
    }
    panic!(
        "{what} (T={at}, members {:?}): {} differences:\n{}",
        model.members_at(at),
        problems.len(),
        problems.join("\n")
    );
}

async fn write_target_group(server: &Tenants, model: &mut TenantModel, tenant: usize) {
    let body = group_body(TARGET_GROUP, &model.entries);
    let ver = server.put(tenant, &body).await;
    let key = ("Group".to_owned(), TARGET_GROUP.to_owned());
    if model.resources.get(&key).and_then(|v| v.last()).is_some_and(|last| last.version == ver.version) {
        return; // unchanged content: no new version
    }
    model.membership.push((ver.last_updated, active(&model.entries)));
    model.record(key, ver);
}

async fn write_resource(
    server: &Tenants,
    model: &mut TenantModel,
    tenant: usize,
    kind: &'static str,
    id: String,
    shape: Shape,
) {
    model.counter += 1;
    let observations: Vec<&String> =
        model.shapes.keys().filter(|(kind, _)| kind == "Observation").map(|(_, id)| id).collect();
    let observation = (!observations.is_empty()).then(|| observations[shape.r as usize % observations.len()].clone());
    let built = build(kind, &id, &shape, model.counter, tenant, observation.as_deref());
    let mut ver = server.put(tenant, &built.body).await;
    ver.compartments = built.compartments;
    ver.refs = built.refs;
    ver.targets = built.targets;
    let key = (kind.to_owned(), id);
    model.record(key.clone(), ver);
    model.shapes.insert(key, shape);
}

/// Runs a scenario; returns how often the server reused an associated set.
async fn run(scenario: Scenario) -> Option<u64> {
    let server = Tenants::start(scenario.part_size);
    let mut models: [TenantModel; 2] = Default::default();
    for (tenant, model) in models.iter_mut().enumerate() {
        model.patients = (0..scenario.patients[tenant]).map(|i| format!("p{i}")).collect();
        for patient in model.patients.clone() {
            let shape = Shape { kind: "Patient", a: patient.clone(), b: None, r: model.patients.len() as u8 };
            write_resource(&server, model, tenant, "Patient", patient, shape).await;
        }
        for (pick, inactive) in &scenario.members[tenant] {
            let patient = model.pick_patient(*pick);
            if !model.entries.iter().any(|(listed, _)| *listed == patient) {
                model.entries.push((patient, *inactive));
            }
        }
        write_target_group(&server, model, tenant).await;
        // Another cohort sharing the same patients: must never leak into the target's export.
        model.decoy_entries = model.patients.clone();
        let decoy =
            group_body(DECOY_GROUP, &model.decoy_entries.iter().map(|p| (p.clone(), false)).collect::<Vec<_>>());
        let ver = server.put(tenant, &decoy).await;
        model.record(("Group".into(), DECOY_GROUP.into()), ver);
    }
    let mut steps: Vec<Step> = scenario.steps.iter().cloned().flat_map(expand).collect();
    steps.extend([
        Step::Export { tenant: 0, types: None, since: SinceChoice::Checkpoint(u8::MAX), deferred: false },
        Step::Export { tenant: 1, types: None, since: SinceChoice::None, deferred: false },
        Step::Sync { tenant: 0 },
        Step::Sync { tenant: 1 },
    ]);
    let mut pending: Option<(usize, Kicked)> = None;
    for step in steps {
        let Some(step) = resolve_touch(&models, step) else { continue };
        // An export checkpoint first completes a deferred one.
        if matches!(step, Step::Export { .. } | Step::Sync { .. } | Step::Standard { .. }) {
            if let Some((tenant, kicked)) = pending.take() {
                collect(&server, &models[tenant], tenant, kicked).await;
            }
        }
        let deferred = pending.take();
        apply(&server, &mut models, step, &mut pending).await;
        if let Some((tenant, kicked)) = deferred {
            collect(&server, &models[tenant], tenant, kicked).await;
        }
    }
    if let Some((tenant, kicked)) = pending.take() {
        collect(&server, &models[tenant], tenant, kicked).await;
    }
    let reused = server.server.plan_cache_stats().map(|stats| stats.associated_hits);
    count(&STATS.associated_reused, reused.unwrap_or(0) as usize);
    reused
}

/// Applies one step to the server and the model.
async fn apply(server: &Tenants, models: &mut [TenantModel; 2], step: Step, pending: &mut Option<(usize, Kicked)>) {
    match step {
        Step::Create { tenant, kind, a, b, two } => {
            let model = &mut models[tenant];
            if kind as usize > KINDS.len() {
                // A Practitioner or an Organization, linked to an Organization when `two`.
                let shared = kind as usize - KINDS.len() - 1;
                let (shared_kind, id) = match shared {
                    0 => (SHARED[0], practitioner(a)),
                    _ => (SHARED[1], organization(a)),
                };
                let link = if two { organization(b) } else { String::new() };
                let shape = Shape { kind: shared_kind, a: link, b: None, r: 0 };
                write_resource(server, model, tenant, shared_kind, id, shape).await;
            } else if kind as usize == KINDS.len() {
                // A Patient: one of the pool (the late one comes alive, a deleted one returns).
                let patient = model.pick_patient(a);
                if patient == GHOST {
                    return;
                }
                let shape = Shape { kind: "Patient", a: patient.clone(), b: None, r: a ^ b };
                write_resource(server, model, tenant, "Patient", patient, shape).await;
            } else {
                let kind = KINDS[kind as usize];
                model.next_id += 1;
                let id = format!("{}{}", &kind[..3].to_lowercase(), model.next_id);
                let shape = Shape { kind, a: model.pick_patient(a), b: two.then(|| model.pick_patient(b)), r: a ^ b };
                write_resource(server, model, tenant, kind, id, shape).await;
            }
        }
        Step::Update { tenant, pick, a, b, two, moved } => {
            let model = &mut models[tenant];
            let keys: Vec<(String, String)> = model.shapes.keys().cloned().collect();
            let key = keys[pick as usize % keys.len()].clone();
            let mut shape = model.shapes[&key].clone();
            if moved && SHARED.contains(&shape.kind) {
                // A Practitioner or Organization re-linked (or unlinked).
                shape.a = if two { organization(b) } else { String::new() };
            } else if moved {
                if shape.kind != "Patient" {
                    shape.a = model.pick_patient(a);
                    shape.b = two.then(|| model.pick_patient(b));
                }
                // Other Practitioners and Organizations referenced.
                shape.r = shape.r.wrapping_add(1);
            }
            write_resource(server, model, tenant, shape.kind, key.1.clone(), shape).await;
        }
        Step::Repoint { tenant, pick, to, into_cohort } => {
            let model = &mut models[tenant];
            let keys: Vec<(String, String)> = model
                .shapes
                .keys()
                .filter(|(kind, _)| kind != "Patient" && !SHARED.contains(&kind.as_str()))
                .cloned()
                .collect();
            if keys.is_empty() {
                return;
            }
            let key = keys[pick as usize % keys.len()].clone();
            let members = active(&model.entries);
            let targets: Vec<String> =
                model.pool().into_iter().filter(|patient| members.contains(patient) == into_cohort).collect();
            if targets.is_empty() {
                return;
            }
            let mut shape = model.shapes[&key].clone();
            shape.a = targets[to as usize % targets.len()].clone();
            shape.b = None;
            count(&STATS.repointed, 1);
            write_resource(server, model, tenant, shape.kind, key.1.clone(), shape).await;
        }
        Step::Delete { tenant, pick } => {
            let model = &mut models[tenant];
            let keys: Vec<(String, String)> = model.shapes.keys().cloned().collect();
            let key = keys[pick as usize % keys.len()].clone();
            let was_live = model.is_live(&key);
            let (version, last_updated) = server.delete(tenant, &key.0, &key.1).await;
            if was_live {
                let compartments = model.resources[&key].last().unwrap().compartments.clone();
                model.record(
                    key,
                    Ver {
                        version,
                        last_updated,
                        body: None,
                        compartments,
                        refs: BTreeSet::new(),
                        targets: BTreeSet::new(),
                    },
                );
            } else {
                // Deleting a tombstone changes nothing.
                let last = model.resources[&key].last().unwrap();
                assert_eq!(
                    (version, last_updated),
                    (last.version, last.last_updated),
                    "deleting a deleted {key:?} made a version"
                );
            }
        }
        Step::Member { tenant, patient, action } => {
            let model = &mut models[tenant];
            let patient = model.pick_patient(patient);
            // Every change rewrites the Group (a no-op rewrite must make no version; a deleted
            // Group comes back).
            match action {
                0..=2 => {
                    let listed_active = model.entries.iter().any(|(listed, inactive)| *listed == patient && !inactive);
                    // A second entry for a patient listed inactive: active wins.
                    if !listed_active {
                        model.entries.push((patient, false));
                    }
                }
                3 => {
                    model.entries.retain(|(listed, _)| *listed != patient);
                }
                4 => {
                    for (listed, inactive) in &mut model.entries {
                        if *listed == patient {
                            *inactive = true;
                        }
                    }
                }
                _ => {
                    if model.decoy_entries.contains(&patient) {
                        return;
                    }
                    model.decoy_entries.push(patient);
                    let decoy = group_body(
                        DECOY_GROUP,
                        &model.decoy_entries.iter().map(|p| (p.clone(), false)).collect::<Vec<_>>(),
                    );
                    let ver = server.put(tenant, &decoy).await;
                    model.record(("Group".into(), DECOY_GROUP.into()), ver);
                    return;
                }
            }
            write_target_group(server, model, tenant).await;
        }
        Step::Export { tenant, types, since, deferred } => {
            let model = &mut models[tenant];
            if !group_is_live(server, model, tenant).await {
                return;
            }
            let since = pick_since(model, since);
            model.last_since = since;
            let kicked = kick_off(server, tenant, type_list(types), since).await;
            model.checkpoints.push(kicked.transaction_time);
            if deferred {
                *pending = Some((tenant, kicked));
            } else {
                collect(server, model, tenant, kicked).await;
            }
        }
        Step::Sync { tenant } => {
            if group_is_live(server, &models[tenant], tenant).await {
                sync(server, &mut models[tenant], tenant).await;
            }
        }
        Step::Standard { tenant, system, since, filter, elements } => {
            let model = &mut models[tenant];
            let since = pick_since(model, since);
            standard_export(server, model, tenant, system, since, filter, elements).await;
        }
        Step::Touch { .. } | Step::Repeat { .. } => unreachable!("resolved and expanded by run()"),
        Step::DeleteGroup { tenant } => {
            let model = &mut models[tenant];
            let key = ("Group".to_owned(), TARGET_GROUP.to_owned());
            if !model.is_live(&key) {
                return;
            }
            let (version, last_updated) = server.delete(tenant, "Group", TARGET_GROUP).await;
            let ver = Ver {
                version,
                last_updated,
                body: None,
                compartments: BTreeSet::new(),
                refs: BTreeSet::new(),
                targets: BTreeSet::new(),
            };
            model.record(key, ver);
            model.membership.push((last_updated, BTreeSet::new()));
        }
    }
}

fn pick_since(model: &TenantModel, since: SinceChoice) -> Option<Micros> {
    match since {
        SinceChoice::None => None,
        SinceChoice::Checkpoint(k) => {
            (!model.checkpoints.is_empty()).then(|| model.checkpoints[k as usize % model.checkpoints.len()])
        }
        SinceChoice::WriteTime(k) => Some(model.write_times[k as usize % model.write_times.len()]),
        SinceChoice::Previous => model.last_since,
    }
}

/// The steps a step stands for: a [`Step::Repeat`] is three exports of the same request around
/// one change to associated data.
fn expand(step: Step) -> Vec<Step> {
    let Step::Repeat { tenant, types, since, change, a, b, pick } = step else { return vec![step] };
    let export = |since| Step::Export { tenant, types, since, deferred: false };
    let change = match change % 5 {
        0 => Step::Touch { tenant, pick, delete: false, provenance: false },
        1 => Step::Touch { tenant, pick, delete: true, provenance: false },
        // A Practitioner or an Organization (maybe one referenced before it existed).
        2 => Step::Create { tenant, kind: 6 + (a & 1), a: a >> 1, b, two: b & 1 == 1 },
        // A Provenance about a picked patient (maybe not a member) and an Observation.
        3 => Step::Create { tenant, kind: 4, a, b, two: false },
        _ => Step::Touch { tenant, pick, delete: a & 1 == 1, provenance: true },
    };
    vec![export(since), export(SinceChoice::Previous), change, export(SinceChoice::Previous)]
}

/// A [`Step::Touch`] as the update or delete of the resource it picks (`None`: nothing to pick).
fn resolve_touch(models: &[TenantModel; 2], step: Step) -> Option<Step> {
    let Step::Touch { tenant, pick, delete, provenance } = step else { return Some(step) };
    let keys: Vec<&(String, String)> = models[tenant].shapes.keys().collect();
    let candidates: Vec<usize> = (0..keys.len())
        .filter(|index| {
            let kind = keys[*index].0.as_str();
            if provenance {
                kind == "Provenance"
            } else {
                SHARED.contains(&kind)
            }
        })
        .collect();
    if candidates.is_empty() {
        return None;
    }
    let pick = candidates[pick as usize % candidates.len()] as u16;
    Some(if delete {
        Step::Delete { tenant, pick }
    } else {
        Step::Update { tenant, pick, a: 0, b: 0, two: false, moved: false }
    })
}

// ---------------------------------------------------------------------------------------------
// System- and Patient-level exports, `_typeFilter` and `_elements`

/// `_typeFilter` sets the scenarios use; each query has a brute-force twin in [`filter_keeps`].
/// A set naming Provenance applies at the system level only: a Patient-level export refuses it
/// (strict) or ignores it with a warning (lenient), see [`names_associated_type`].
const FILTERS: [&[&str]; 6] = [
    &[],
    &["Observation?subject=Patient/p0"],
    &["Observation?subject=p1,Patient/p0", "AllergyIntolerance?patient=Patient/p1"],
    &["Patient?family=F1"],
    &["Claim?use=claim&patient=Patient/p0", "Observation?_id=obs1,obs3,obs5"],
    &["Encounter?_lastUpdated=gt2000-01-01", "Provenance?patient=Patient/p0"],
];

/// The brute-force `_typeFilter` of set `filter`: `None` when the set does not filter the type.
fn filter_keeps(filter: usize, resource_type: &str, body: &Value) -> Option<bool> {
    let reference = |value: &Value| value["reference"].as_str().unwrap_or("").to_owned();
    let is = |value: &Value, wanted: &[&str]| wanted.contains(&reference(value).as_str());
    match (filter, resource_type) {
        (1, "Observation") => Some(is(&body["subject"], &["Patient/p0"])),
        (2, "Observation") => Some(is(&body["subject"], &["Patient/p1", "Patient/p0"])),
        (2, "AllergyIntolerance") => Some(is(&body["patient"], &["Patient/p1"])),
        (3, "Patient") => Some(
            body["name"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|name| name["family"].as_str().is_some_and(|family| family.to_lowercase().starts_with("f1"))),
        ),
        (4, "Claim") => Some(body["use"] == "claim" && is(&body["patient"], &["Patient/p0"])),
        (4, "Observation") => Some(["obs1", "obs3", "obs5"].contains(&body["id"].as_str().unwrap_or(""))),
        (5, "Encounter") => Some(true),
        (5, "Provenance") => {
            Some(body["target"].as_array().into_iter().flatten().any(|target| is(target, &["Patient/p0"])))
        }
        _ => None,
    }
}

/// R4 mandatory (min ≥ 1) root elements of the types the scenarios write.
fn mandatory(resource_type: &str) -> &'static [&'static str] {
    match resource_type {
        "Observation" => &["status", "code"],
        "AllergyIntolerance" => &["patient"],
        "Encounter" => &["status", "class"],
        "Claim" => &["status", "type", "use", "patient", "created", "provider", "priority", "insurance"],
        "Provenance" => &["target", "recorded", "agent"],
        "Group" => &["type", "actual"],
        _ => &[],
    }
}

/// What `_elements=identifier` makes of a stored body.
fn subsetted(resource_type: &str, body: &str) -> Value {
    let Value::Object(resource) = serde_json::from_str::<Value>(body).unwrap() else { unreachable!() };
    let mut kept: serde_json::Map<String, Value> = resource
        .into_iter()
        .filter(|(key, _)| {
            ["resourceType", "id", "meta", "identifier"].contains(&key.as_str())
                || mandatory(resource_type).contains(&key.as_str())
        })
        .collect();
    let tag = json!({"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"});
    let meta = kept.entry("meta").or_insert_with(|| json!({}));
    match meta.get_mut("tag").and_then(Value::as_array_mut) {
        Some(tags) => tags.push(tag),
        None => meta["tag"] = json!([tag]),
    }
    Value::Object(kept)
}

/// Output lines (as JSON) by `(type, id)`, and `deleted[]`.
type StandardExpected = (BTreeMap<(String, String), Value>, BTreeSet<(String, String)>);

/// The oracle of a system- (`system`) or Patient-level export.
fn expected_standard(
    model: &TenantModel,
    at: Micros,
    since: Option<Micros>,
    system: bool,
    filter: usize,
    elements: bool,
) -> StandardExpected {
    let line = |resource_type: &str, body: &str| -> Value {
        if elements {
            subsetted(resource_type, body)
        } else {
            serde_json::from_str(body).unwrap()
        }
    };
    if !system {
        return expected_patient_level(model, at, since, filter, line);
    }
    let (mut output, mut deleted) = (BTreeMap::new(), BTreeSet::new());
    for key in model.resources.keys() {
        let resource_type = key.0.as_str();
        let Some(version) = model.version_at(key, at) else { continue };
        let changed = since.is_none_or(|since| version.last_updated > since);
        match &version.body {
            Some(body) if changed => {
                let parsed: Value = serde_json::from_str(body).unwrap();
                if filter_keeps(filter, resource_type, &parsed).unwrap_or(true) {
                    output.insert(key.clone(), line(resource_type, body));
                }
            }
            Some(_) => {}
            None => {
                if since.is_some() && changed {
                    deleted.insert(key.clone());
                }
            }
        }
    }
    (output, deleted)
}

/// The Patient level: a Group export (with its associated data) whose members are the Patients
/// live at T, every one of them a continuing member (README: `_since` applies to every Patient
/// alike, no full-history lift), without Group resources. `_typeFilter` narrows what is sent of
/// the compartment types, not the cohort the associated data is found from (README
/// "Associated data"); a filter on an associated-only type was refused or, lenient, ignored.
fn expected_patient_level(
    model: &TenantModel,
    at: Micros,
    since: Option<Micros>,
    filter: usize,
    line: impl Fn(&str, &str) -> Value,
) -> StandardExpected {
    let live = |at: Micros| -> BTreeSet<String> {
        model
            .resources
            .iter()
            .filter(|((resource_type, _), _)| resource_type == "Patient")
            .filter(|(key, _)| model.version_at(key, at).is_some_and(|v| v.body.is_some()))
            .map(|((_, id), _)| id.clone())
            .collect()
    };
    let members = live(at);
    let types: BTreeSet<&str> = EXPORT_TYPES.into_iter().filter(|t| *t != "Group").collect();
    let keeps = |resource_type: &str, body: &str| {
        ASSOCIATED.contains(&resource_type)
            || filter_keeps(filter, resource_type, &serde_json::from_str(body).unwrap()).unwrap_or(true)
    };
    let result = expected_for(model, at, since, &types, &members, since.map(|_| &members), &keeps);
    let output = result.output.iter().map(|(key, body)| (key.clone(), line(&key.0, body))).collect();
    let mut deleted = result.deleted;
    if let Some(since) = since {
        // A Patient deleted since `_since` is no longer a member: its own deletion is listed.
        for id in live(since).difference(&members) {
            let key = ("Patient".to_owned(), id.clone());
            if model.version_at(&key, at).is_some_and(|version| version.body.is_none()) {
                deleted.insert(key);
            }
        }
    }
    (output, deleted)
}

/// True when filter set `filter` names a type that Patient- and Group-level exports deliver
/// only as associated data (refused there; lenient: ignored with a warning).
fn names_associated_type(filter: usize) -> bool {
    FILTERS[filter].iter().any(|query| ASSOCIATED.iter().any(|t| query.starts_with(&format!("{t}?"))))
}

/// Runs a system- or Patient-level export on the standard base (202, polled to its
/// manifest), downloads every file and compares with [`expected_standard`].
async fn standard_export(
    server: &Tenants,
    model: &mut TenantModel,
    tenant: usize,
    system: bool,
    since: Option<Micros>,
    filter: u8,
    elements: bool,
) {
    let filter = filter as usize % FILTERS.len();
    let mut query = form_urlencoded::Serializer::new(String::new());
    if let Some(since) = since {
        query.append_pair("_since", &format_instant(since));
    }
    for query_text in FILTERS[filter] {
        query.append_pair("_typeFilter", query_text);
    }
    if elements {
        query.append_pair("_elements", "identifier");
    }
    let query = query.finish();
    let path = if system { "/r4/$export" } else { "/r4/Patient/$export" };
    let what = format!("tenant {tenant} {path}?{query}");
    let refused = !system && names_associated_type(filter);
    let mut call = get(&format!("{path}?{query}"));
    if refused {
        // Strict: a 400 saying why; lenient: ignored, with a warning in `error[]`.
        let reply = server.send(tenant, get(&format!("{path}?{query}"))).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{what}: {}", reply.text());
        let outcome = reply.json();
        assert_eq!(outcome["resourceType"], "OperationOutcome", "{what}");
        assert!(outcome.to_string().contains("only as associated data"), "{what}: {outcome}");
        call = call.header("prefer", "handling=lenient");
    }
    let reply = server.send(tenant, call).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{what}: {}", reply.text());
    let location = reply.header("content-location");
    let status = location[location.find("/bulk-data/").expect("status URL path")..].to_owned();
    let manifest = loop {
        let poll = server.send(tenant, get(&status)).await;
        match poll.status {
            StatusCode::OK => break poll.json(),
            StatusCode::ACCEPTED => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            other => panic!("{what}: status poll answered {other}: {}", poll.text()),
        }
    };
    let at = parse_since(manifest["transactionTime"].as_str().unwrap()).unwrap();
    model.checkpoints.push(at);
    if refused {
        let errors = manifest["error"].as_array().expect("error[]");
        assert_eq!(errors.len(), 1, "{what}: {manifest}");
        let warnings = download(server, tenant, &errors[0], &what).await;
        assert_eq!(warnings.len(), 1, "{what}: {warnings:?}");
        assert!(warnings[0].contains("only as associated data"), "{what}: {warnings:?}");
    } else {
        assert_eq!(manifest["error"], json!([]), "{what}");
    }
    let mut output: BTreeMap<(String, String), Value> = BTreeMap::new();
    for item in manifest["output"].as_array().expect("output[]") {
        let item_type = item["type"].as_str().unwrap();
        for line in download(server, tenant, item, &what).await {
            let resource: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(resource["resourceType"], item_type, "{what}: {line}");
            let key = (item_type.to_owned(), resource["id"].as_str().unwrap().to_owned());
            assert!(output.insert(key.clone(), resource).is_none(), "{what}: {key:?} exported twice");
        }
    }
    let mut deleted = BTreeSet::new();
    for item in manifest.get("deleted").and_then(Value::as_array).into_iter().flatten() {
        for line in download(server, tenant, item, &what).await {
            let bundle: Value = serde_json::from_str(&line).unwrap();
            let url = bundle["entry"][0]["request"]["url"].as_str().unwrap();
            let (resource_type, id) = url.split_once('/').expect("Type/id");
            assert!(deleted.insert((resource_type.to_owned(), id.to_owned())), "{what}: {url} twice");
        }
    }
    let (expected_output, expected_deleted) = expected_standard(model, at, since, system, filter, elements);
    let missing: Vec<_> = expected_output.keys().filter(|key| !output.contains_key(*key)).collect();
    let extra: Vec<_> = output.keys().filter(|key| !expected_output.contains_key(*key)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "{what} (T={at}): missing {missing:?}, unexpected {extra:?}");
    for (key, line) in &output {
        assert_eq!(line, &expected_output[key], "{what}: {key:?} (got left, expected right)");
    }
    assert_eq!(expected_deleted, deleted, "{what}: deleted[] (expected left, got right)");
    if let Some(since) = since {
        // Patient level: the Patients deleted since `_since` are its removed members.
        let live = |at: Micros| -> BTreeSet<String> {
            model
                .resources
                .iter()
                .filter(|((resource_type, _), _)| resource_type == "Patient")
                .filter(|(key, _)| model.version_at(key, at).is_some_and(|v| v.body.is_some()))
                .map(|((_, id), _)| format!("Patient/{id}"))
                .collect()
        };
        let expected: BTreeSet<String> =
            if system { BTreeSet::new() } else { live(since).difference(&live(at)).cloned().collect() };
        let removed: BTreeSet<String> = manifest["extension"]["removedMembers"]
            .as_array()
            .expect("removedMembers with _since")
            .iter()
            .map(|member| member.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(expected, removed, "{what}: removedMembers (expected left, got right)");
    }
    if !system {
        // The same export organised by patient (no write in between, so the same data): the
        // blocks together hold exactly the resources, and lines, of the export by type.
        let call = get(&format!("{path}?{query}&organizeOutputBy=Patient"));
        let call = if refused { call.header("prefer", "handling=lenient") } else { call };
        let organised = organised_blocks(server, tenant, call, &what).await;
        let mut union: BTreeMap<(String, String), Value> = BTreeMap::new();
        for (patient, resources) in &organised {
            for resource in resources {
                let key = (
                    resource["resourceType"].as_str().unwrap().to_owned(),
                    resource["id"].as_str().unwrap().to_owned(),
                );
                if key.0 == "Patient" {
                    assert_eq!(&key.1, patient, "{what}: a Patient is in its own block only");
                }
                union.insert(key, resource.clone());
            }
        }
        let keys = |map: &BTreeMap<(String, String), Value>| map.keys().cloned().collect::<BTreeSet<_>>();
        assert_eq!(keys(&union), keys(&output), "{what}: organised by patient (left) vs by type (right)");
        for (key, resource) in &union {
            assert_eq!(resource, &output[key], "{what}: {key:?} organised by patient");
        }
        count(&STATS.organised, 1);
    }
    count(&STATS.standard, 1);
    count(&STATS.filtered, usize::from(filter != 0));
    count(&STATS.subsetted, usize::from(elements));
    count(&STATS.lines, output.len());
}

/// Kicks an organised export off on the standard base, polls it, and returns its blocks
/// (patient, resources) in file order, checking the manifest's shape, each file's count, that
/// each file starts with a header and that each patient has one block.
async fn organised_blocks(server: &Tenants, tenant: usize, call: Call, what: &str) -> Vec<(String, Vec<Value>)> {
    let reply = server.send(tenant, call).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{what}: {}", reply.text());
    let location = reply.header("content-location");
    let status = location[location.find("/bulk-data/").expect("status URL path")..].to_owned();
    let manifest = loop {
        let poll = server.send(tenant, get(&status)).await;
        match poll.status {
            StatusCode::OK => break poll.json(),
            StatusCode::ACCEPTED => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            other => panic!("{what}: organised status poll answered {other}: {}", poll.text()),
        }
    };
    assert_eq!(manifest["outputOrganizedBy"], "Patient", "{what}: {manifest}");
    let mut blocks: Vec<(String, Vec<Value>)> = Vec::new();
    for item in manifest["output"].as_array().expect("output[]") {
        assert!(item.get("type").is_none(), "{what}: {item}");
        for (index, line) in download(server, tenant, item, what).await.iter().enumerate() {
            let resource: Value = serde_json::from_str(line).unwrap();
            if resource["resourceType"] == "Parameters" {
                let reference = resource["parameter"][0]["valueReference"]["reference"].as_str().unwrap();
                blocks.push((reference.strip_prefix("Patient/").unwrap().to_owned(), Vec::new()));
            } else {
                assert!(index > 0, "{what}: a file starts with a header");
                blocks.last_mut().unwrap().1.push(resource);
            }
        }
    }
    assert!(blocks.windows(2).all(|pair| pair[0].0 < pair[1].0), "{what}: one block per patient, in order");
    blocks
}

/// True when the target Group exists; otherwise checks that an export of it answers 410.
async fn group_is_live(server: &Tenants, model: &TenantModel, tenant: usize) -> bool {
    if model.is_live(&("Group".to_owned(), TARGET_GROUP.to_owned())) {
        return true;
    }
    let reply = server.send(tenant, get(&format!("/r4/Group/{TARGET_GROUP}/$export"))).await;
    assert_eq!(reply.status, StatusCode::GONE, "export of a deleted Group");
    false
}

/// The client's incremental loop: a full export, then exports with `_since` = the previous
/// `transactionTime`. The replica must hold every resource of a full export at the latest
/// transaction time, at its version then; an incremental export must not resend a resource
/// unchanged since the previous one unless a member added since reaches it.
async fn sync(server: &Tenants, model: &mut TenantModel, tenant: usize) {
    let since = model.replica.as_ref().map(|(at, _)| *at);
    let exported = export(server, model, tenant, None, since).await;
    count(&STATS.syncs, 1);
    let at = exported.transaction_time;
    model.checkpoints.push(at);
    let mut replica = model.replica.take().map(|(_, replica)| replica).unwrap_or_default();
    if let Some(since) = since {
        let new_members: BTreeSet<String> =
            model.members_at(at).difference(&model.members_at(since)).cloned().collect();
        for key in exported.output.keys().filter(|key| !ASSOCIATED.contains(&key.0.as_str())) {
            let version = model.version_at(key, at).unwrap();
            let via_new_member = version.compartments.iter().any(|patient| new_members.contains(patient));
            assert!(
                version.last_updated > since || via_new_member,
                "tenant {tenant}: {key:?} unchanged since the previous transactionTime was sent again"
            );
        }
    }
    for key in &exported.deleted {
        replica.remove(key);
    }
    if let Some(since) = since {
        // `removedMembers`: drop what is held only through removed members, that is in no
        // compartment (of the held version) of a member that stayed.
        let members = model.members_at(at);
        let stayed: BTreeSet<String> = model.members_at(since).intersection(&members).cloned().collect();
        replica.retain(|key, held| {
            // Associated data is kept: its deletions are not reported (README).
            if key.0 == "Group" || ASSOCIATED.contains(&key.0.as_str()) {
                return true;
            }
            let versions = &model.resources[key];
            let version = versions.iter().find(|version| version.body.as_ref() == Some(held)).expect("held version");
            let keep = version.compartments.iter().any(|patient| stayed.contains(patient));
            count(&STATS.dropped, usize::from(!keep));
            keep
        });
    }
    replica.extend(exported.output);
    let all: BTreeSet<&str> = EXPORT_TYPES.into_iter().collect();
    let full = expected(model, at, None, &all).output;
    for (key, body) in &full {
        match replica.get(key) {
            Some(held) => {
                assert_eq!(held, body, "tenant {tenant}: replica holds a stale {key:?} after an incremental export")
            }
            None => panic!("tenant {tenant}: replica lost {key:?} (incremental exports since {since:?})"),
        }
    }
    for key in replica.keys().filter(|key| !ASSOCIATED.contains(&key.0.as_str())) {
        assert!(
            full.contains_key(key),
            "tenant {tenant}: replica still holds {key:?}, which is no longer part of the cohort's data \
             (incremental exports since {since:?}); model history: {:?}",
            model.resources[key]
                .iter()
                .map(|v| (v.last_updated, v.body.is_some(), &v.compartments))
                .collect::<Vec<_>>()
        );
    }
    model.replica = Some((at, replica));
}

/// Counters over all cases, printed at the end (`--nocapture`), to show what was covered.
#[derive(Default)]
struct Stats {
    exports: AtomicUsize,
    with_since: AtomicUsize,
    files: AtomicUsize,
    lines: AtomicUsize,
    deleted: AtomicUsize,
    missing: AtomicUsize,
    removed: AtomicUsize,
    lifted: AtomicUsize,
    group_lines: AtomicUsize,
    provenance_lines: AtomicUsize,
    /// Provenance exported only through a target other than a member Patient.
    provenance_beyond_patient: AtomicUsize,
    /// Practitioner and Organization lines (referenced resources).
    referenced_lines: AtomicUsize,
    syncs: AtomicUsize,
    repointed: AtomicUsize,
    /// `deleted[]` entries for resources that are live at T (they left the cohort).
    left: AtomicUsize,
    /// Resources a replica dropped because of `removedMembers`.
    dropped: AtomicUsize,
    /// System- and Patient-level exports; those with `_typeFilter`; with `_elements`.
    standard: AtomicUsize,
    filtered: AtomicUsize,
    subsetted: AtomicUsize,
    /// Patient-level exports repeated organised by patient.
    organised: AtomicUsize,
    /// Associated sets the server reused from an earlier export (plan cache hits).
    associated_reused: AtomicUsize,
}

static STATS: Stats = Stats {
    exports: AtomicUsize::new(0),
    with_since: AtomicUsize::new(0),
    files: AtomicUsize::new(0),
    lines: AtomicUsize::new(0),
    deleted: AtomicUsize::new(0),
    missing: AtomicUsize::new(0),
    removed: AtomicUsize::new(0),
    lifted: AtomicUsize::new(0),
    group_lines: AtomicUsize::new(0),
    provenance_lines: AtomicUsize::new(0),
    provenance_beyond_patient: AtomicUsize::new(0),
    referenced_lines: AtomicUsize::new(0),
    syncs: AtomicUsize::new(0),
    repointed: AtomicUsize::new(0),
    left: AtomicUsize::new(0),
    dropped: AtomicUsize::new(0),
    standard: AtomicUsize::new(0),
    filtered: AtomicUsize::new(0),
    subsetted: AtomicUsize::new(0),
    organised: AtomicUsize::new(0),
    associated_reused: AtomicUsize::new(0),
};

fn count(counter: &AtomicUsize, n: usize) {
    counter.fetch_add(n, Ordering::Relaxed);
}

#[test]
fn group_export_matches_the_oracle() {
    let config =
        ProptestConfig { cases: 48, failure_persistence: None, max_shrink_iters: 200, ..ProptestConfig::default() };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let started = std::time::Instant::now();
    let result = runner.run(&scenario_strategy(), |scenario| {
        runtime.block_on(run(scenario));
        Ok(())
    });
    if let Err(error) = result {
        panic!("{error}");
    }
    let get = |counter: &AtomicUsize| counter.load(Ordering::Relaxed);
    eprintln!(
        "oracle: {:?}; {} exports ({} with _since, {} replica syncs), {} files, {} resource lines ({} Group), {} deleted[] entries, \
         {} missing-member errors, {} removed members, {} resources exported only through a new member's full history, \
         {} re-pointings, {} deleted[] entries for resources that left the cohort, {} held resources dropped for removed members, \
         {} Provenance lines ({} only through a target other than a member Patient), {} referenced-resource lines; \
         {} system/Patient-level exports ({} with _typeFilter, {} with _elements, {} repeated organised by patient); {} associated sets reused",
        started.elapsed(),
        get(&STATS.exports),
        get(&STATS.with_since),
        get(&STATS.syncs),
        get(&STATS.files),
        get(&STATS.lines),
        get(&STATS.group_lines),
        get(&STATS.deleted),
        get(&STATS.missing),
        get(&STATS.removed),
        get(&STATS.lifted),
        get(&STATS.repointed),
        get(&STATS.left),
        get(&STATS.dropped),
        get(&STATS.provenance_lines),
        get(&STATS.provenance_beyond_patient),
        get(&STATS.referenced_lines),
        get(&STATS.standard),
        get(&STATS.filtered),
        get(&STATS.subsetted),
        get(&STATS.organised),
        get(&STATS.associated_reused),
    );
}

/// A fixed scenario exercising every rule at least once, so a regression shows up without
/// relying on the random cases.
#[test]
fn fixed_scenario() {
    let scenario = Scenario {
        part_size: 2,
        patients: [3, 2],
        members: [vec![(0, false), (1, false), (4, false), (2, true)], vec![(0, false)]],
        steps: vec![
            Step::Create { tenant: 0, kind: 0, a: 0, b: 1, two: true },
            Step::Create { tenant: 0, kind: 1, a: 1, b: 2, two: true },
            Step::Create { tenant: 0, kind: 4, a: 4, b: 0, two: true },
            Step::Create { tenant: 1, kind: 0, a: 0, b: 0, two: false },
            Step::Export { tenant: 0, types: None, since: SinceChoice::None, deferred: false },
            Step::Sync { tenant: 0 },
            Step::Repoint { tenant: 0, pick: 1, to: 0, into_cohort: false },
            Step::Repoint { tenant: 1, pick: 0, to: 0, into_cohort: false },
            Step::Sync { tenant: 0 },
            Step::Repoint { tenant: 0, pick: 1, to: 0, into_cohort: true },
            Step::Update { tenant: 0, pick: 0, a: 2, b: 0, two: false, moved: true },
            Step::Member { tenant: 0, patient: 2, action: 0 },
            Step::Delete { tenant: 0, pick: 1 },
            Step::Create { tenant: 0, kind: 5, a: 3, b: 0, two: false },
            Step::Member { tenant: 0, patient: 3, action: 0 },
            Step::Member { tenant: 0, patient: 1, action: 4 },
            Step::Export { tenant: 0, types: None, since: SinceChoice::Checkpoint(0), deferred: true },
            // Written after the kick-off, before the downloads.
            Step::Update { tenant: 0, pick: 2, a: 0, b: 0, two: false, moved: true },
            Step::Delete { tenant: 0, pick: 0 },
            Step::Export { tenant: 0, types: Some(0b100_0011), since: SinceChoice::Checkpoint(0), deferred: false },
            Step::Sync { tenant: 0 },
            Step::Standard { tenant: 0, system: true, since: SinceChoice::None, filter: 2, elements: false },
            Step::Standard { tenant: 0, system: false, since: SinceChoice::None, filter: 4, elements: true },
            Step::Standard { tenant: 0, system: true, since: SinceChoice::Checkpoint(1), filter: 5, elements: true },
            Step::Standard { tenant: 0, system: false, since: SinceChoice::Checkpoint(1), filter: 3, elements: false },
            Step::Standard { tenant: 1, system: false, since: SinceChoice::WriteTime(0), filter: 1, elements: false },
        ],
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(run(scenario));
}

/// A fixed scenario for associated data: a chain of Organizations longer than the reference
/// depth, Practitioners linked to Organizations, Provenance about Observations, changes to
/// referenced resources between incremental exports, a new member, `_type` lists naming
/// referenced types, and deletions of referenced resources.
#[test]
fn fixed_associated_scenario() {
    let organization =
        |a: u8, link: Option<u8>| Step::Create { tenant: 0, kind: 7, a, b: link.unwrap_or(0), two: link.is_some() };
    let practitioner =
        |a: u8, link: Option<u8>| Step::Create { tenant: 0, kind: 6, a, b: link.unwrap_or(0), two: link.is_some() };
    let scenario = Scenario {
        part_size: 2,
        patients: [3, 2],
        members: [vec![(0, false), (1, false)], vec![(0, false)]],
        steps: vec![
            // o0 -> o1 -> o2 -> o3: o3 is four references from a Patient managed by o0.
            organization(0, Some(1)),
            organization(1, Some(2)),
            organization(2, Some(3)),
            organization(3, None),
            practitioner(0, Some(2)),
            practitioner(1, None),
            practitioner(2, Some(0)),
            // Observations performed by Practitioners, of members and of a non-member.
            Step::Create { tenant: 0, kind: 0, a: 0, b: 1, two: true },
            Step::Create { tenant: 0, kind: 0, a: 2, b: 2, two: true },
            Step::Create { tenant: 0, kind: 0, a: 1, b: 3, two: true },
            // Provenance about Observations (and Patients), a Claim, an Encounter.
            Step::Create { tenant: 0, kind: 4, a: 0, b: 1, two: false },
            Step::Create { tenant: 0, kind: 4, a: 2, b: 0, two: false },
            Step::Create { tenant: 0, kind: 3, a: 1, b: 5, two: false },
            Step::Create { tenant: 0, kind: 2, a: 0, b: 6, two: false },
            Step::Create { tenant: 1, kind: 0, a: 0, b: 1, two: true },
            organization(1, None),
            Step::Export { tenant: 0, types: None, since: SinceChoice::None, deferred: false },
            Step::Sync { tenant: 0 },
            // A referenced resource changes: the next incremental export sends it.
            Step::Update { tenant: 0, pick: 1, a: 0, b: 2, two: true, moved: true },
            Step::Sync { tenant: 0 },
            // A new member: its referenced resources come with its full data.
            Step::Member { tenant: 0, patient: 2, action: 0 },
            Step::Sync { tenant: 0 },
            Step::Export { tenant: 0, types: Some(0b1000_0010), since: SinceChoice::None, deferred: false },
            Step::Export { tenant: 0, types: Some(0b1_0001_0000), since: SinceChoice::Checkpoint(0), deferred: false },
            Step::Export { tenant: 0, types: Some(0b10_0000), since: SinceChoice::None, deferred: true },
            // Deleted after the kick-off: the deferred export still has it.
            Step::Delete { tenant: 0, pick: 0 },
            Step::Repoint { tenant: 0, pick: 3, to: 0, into_cohort: false },
            Step::Sync { tenant: 0 },
            Step::Update { tenant: 0, pick: 5, a: 0, b: 0, two: false, moved: true },
            Step::Sync { tenant: 0 },
        ],
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(run(scenario));
}

/// Repeated Group exports around changes to associated data alone: a referenced Practitioner or
/// Organization updated, deleted or created (one referenced before it existed), a Provenance
/// about a non-member Patient and a member's Observation created (in no member's compartment),
/// updated and deleted. The repeat right after an export reuses its associated set (the server
/// says so); the export after each change must see it, which the oracle checks line by line.
#[test]
fn repeated_exports_see_changes_to_associated_data() {
    let repeat = |change: u8, a: u8, b: u8, pick: u16, types: Option<u16>, since: SinceChoice| Step::Repeat {
        tenant: 0,
        types,
        since,
        change,
        a,
        b,
        pick,
    };
    let create = |kind: u8, a: u8, b: u8, two: bool| Step::Create { tenant: 0, kind, a, b, two };
    let scenario = Scenario {
        part_size: 2,
        patients: [3, 2],
        members: [vec![(0, false), (1, false)], vec![(0, false)]],
        steps: vec![
            // o0 -> o1; pr0 -> o2; pr1; (pr2 and o3 referenced before they exist).
            create(7, 0, 1, true),
            create(7, 1, 0, false),
            create(7, 2, 0, false),
            create(6, 0, 2, true),
            create(6, 1, 0, false),
            // Observations of members performed by Practitioners, an Encounter and a Claim
            // (Organizations), a non-member's Observation.
            create(0, 0, 1, true),
            create(0, 1, 2, true),
            create(0, 2, 1, true),
            create(2, 0, 3, false),
            create(3, 1, 2, false),
            // Provenance about the non-member p2 and an Observation.
            create(4, 2, 0, false),
            create(4, 2, 1, false),
            repeat(0, 0, 0, 0, None, SinceChoice::None),
            repeat(0, 0, 0, 3, None, SinceChoice::None),
            repeat(2, 4, 3, 0, None, SinceChoice::None),
            repeat(2, 5, 0, 0, None, SinceChoice::None),
            repeat(3, 2, 1, 0, None, SinceChoice::None),
            repeat(4, 0, 0, 1, None, SinceChoice::None),
            repeat(4, 1, 0, 0, None, SinceChoice::None),
            repeat(1, 0, 0, 1, None, SinceChoice::None),
            Step::Sync { tenant: 0 },
            repeat(0, 0, 0, 2, None, SinceChoice::Checkpoint(0)),
            repeat(3, 2, 2, 0, Some(0b1_1010_0001), SinceChoice::None),
            repeat(1, 0, 0, 0, Some(0b1000_0001), SinceChoice::None),
            repeat(4, 0, 0, 0, None, SinceChoice::Checkpoint(1)),
            Step::Sync { tenant: 0 },
        ],
    };
    let repeats = scenario.steps.iter().filter(|step| matches!(step, Step::Repeat { .. })).count() as u64;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let reused = runtime.block_on(run(scenario)).expect("both stores have a plan cache");
    assert!(reused >= repeats, "each repeat right after an export reuses its associated set: {reused} of {repeats}");
}
