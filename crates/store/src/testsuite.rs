//! The conformance suite every [`Store`] implementation runs. Each function takes a fresh,
//! empty store; `store_test_suite!` turns them into `#[test]`s for one implementation.

use serde_json::{json, Value};

use crate::TokenKey;
use crate::{
    AssociatedRequest, AuditCohort, AuditQuery, AuditRecord, BulkBatch, BulkSource, ClientRegistration, ExportJob,
    ExportJobState, ExportRecord, IdentifierQuery, JobAdmission, JobLease, JobPart, LastUpdatedBound, MemberSelection,
    PartRange, PreparedWrite, ProvenanceSelection, ReferenceQuery, ReferencedTypes, SearchQuery, SelectionScope, Store,
    StoreError, TenantId, Visibility, WriteMode, WriteOp, Written,
};
use bulkhead_fhir::type_filter::{TypeFilter, TypeFilters};

/// Generates one `#[test]` per suite function; `$make` builds a fresh store (or a guard that
/// derefs to one).
#[macro_export]
macro_rules! store_test_suite {
    ($make:expr) => {
        $crate::store_test_suite!(@tests $make;
            tenants_and_clients, client_secret_hashes_and_server_keys, versions_and_history, tenants_are_isolated, users_see_their_own,
            deletes_leave_tombstones, unchanged_update_is_a_no_op, transactions_are_all_or_nothing,
            batches_apply_per_entry, search_subset, compartment_index_follows_updates,
            group_membership_history, export_is_a_snapshot, export_since_and_new_members,
            export_reports_deletions, export_reports_resources_that_left_the_cohort, export_parts_split_by_size, transaction_time_orders_writes,
            existence_at_a_time, a_patient_is_in_its_own_compartment_by_stored_id, export_jobs_round_trip, export_jobs_are_isolated_by_tenant,
            expired_export_jobs_are_swept, expired_export_jobs_are_listed_before_they_are_removed, planning_jobs_are_finished_once, export_records_round_trip_by_tenant_and_expire,
            a_fresh_store_is_writable_above_its_free_space_floor,
            export_windows_agree_whatever_is_written_between_them, client_registrations_round_trip,
            assertion_jtis_are_accepted_once_until_they_expire,
            large_writes_mix_new_and_existing_resources, transaction_time_holds_across_concurrent_writers,
            associated_data_follows_references_and_provenance, associated_data_is_as_of_the_transaction_time,
            associated_data_follows_since_rules, associated_data_is_exact_after_pruning,
            audit_records_are_per_tenant_filtered_and_paged, audited_writes_commit_with_their_records,
            audit_finds_exports_through_group_membership_at_their_time, audit_records_are_pruned_by_age,
            audit_patient_queries_match_whole_ids_only,
            pruning_removes_history_before_the_horizon_only, pruning_keeps_what_unexpired_exports_need,
            storage_bytes_are_reported,
            tenant_scope_selects_every_resource_of_a_type, patients_at_a_time, type_filters_select_exactly,
            associated_data_is_found_before_type_filters, provenance_is_found_by_target,
            provenance_is_found_whatever_the_order_of_writes,
            export_job_claims_are_exclusive_and_fair_across_tenants, an_expired_lease_is_taken_over_and_the_stale_holder_fenced,
            the_export_cap_is_counted_with_the_insert_across_instances, a_cancelled_job_stops_its_holder,
            a_handed_back_job_is_due_at_once_and_its_claims_are_not_interruptions,
            plans_are_reused_exactly_while_the_members_compartments_are_unchanged,
            associated_sets_are_reused_exactly_while_nothing_they_reach_changed,
            shared_associated_sets_live_until_their_last_export_expires, text_keys_sort_by_bytes,
            existing_patients_are_exact_through_the_plan_cache,
            groups_at_a_time_share_each_versions_members, missing_members_are_exact_through_the_plan_cache,
            token_keys_are_stored_once_and_rotated, quota_buckets_are_shared_and_refill,
            login_failures_count_in_fixed_windows, bulk_writes_index_exactly_as_single_writes,
            prepared_writes_store_what_plain_writes_store,
            search_tokens_follow_updates_and_deletes, bulk_loads_find_provenance_targets_wherever_they_were_written,
            keys_spread_thinly_then_densely_export_exactly);
    };
    (@tests $make:expr; $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                let store = $make;
                $crate::testsuite::$name(&*store);
            }
        )*
    };
}

fn tenant(store: &dyn Store, name: &str) -> TenantId {
    store.create_tenant(name).expect("create tenant").id
}

fn put(store: &dyn Store, tenant: TenantId, owner: Option<&str>, body: Value) -> Written {
    let resource_type = body["resourceType"].as_str().unwrap().to_owned();
    let id = body["id"].as_str().unwrap().to_owned();
    let op = WriteOp::Update { resource_type, id, body, if_match: None };
    store.write(tenant, owner, &[op], WriteMode::Transaction).expect("write").remove(0).expect("write entry")
}

fn delete(store: &dyn Store, tenant: TenantId, resource_type: &str, id: &str) -> Written {
    let op = WriteOp::Delete { resource_type: resource_type.into(), id: id.into() };
    store.write(tenant, None, &[op], WriteMode::Transaction).expect("delete").remove(0).expect("delete entry")
}

fn patient(id: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "identifier": [{"system": "urn:mrn", "value": format!("mrn-{id}")}]})
}

fn observation(id: &str, patient: &str, value: i64) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final", "code": {"text": "x"},
           "subject": {"reference": format!("Patient/{patient}")}, "valueInteger": value})
}

fn group(id: &str, members: &[&str]) -> Value {
    let member: Vec<Value> = members.iter().map(|m| json!({"entity": {"reference": format!("Patient/{m}")}})).collect();
    json!({"resourceType": "Group", "id": id, "type": "person", "actual": true, "member": member})
}

fn selection(store: &dyn Store, members: &[(&str, Option<i64>)], since: Option<i64>) -> MemberSelection {
    MemberSelection {
        members: members.iter().map(|(id, since)| (id.to_string(), *since)).collect(),
        since,
        until: None,
        transaction_time: store.reserve_transaction_time().unwrap(),
        visibility: Visibility::Tenant,
        scope: SelectionScope::Members,
        filters: TypeFilters::default(),
    }
}

/// Exported ids of one type, in key order, with the `valueInteger` of each line when present.
fn export_ids(store: &dyn Store, tenant: TenantId, selection: &MemberSelection, resource_type: &str) -> Vec<String> {
    let plan = store.plan_parts(tenant, selection, &[resource_type.to_owned()], 1_000).unwrap();
    let mut lines = Vec::new();
    for (_, parts) in plan {
        for part in parts {
            // One resource per window: every test crosses window edges.
            let (text, written) = read_part(store, tenant, selection, resource_type, &part, 1);
            assert_eq!(written, part.count, "a part streams exactly its planned count");
            for line in text.split(|byte| *byte == b'\n').filter(|line| !line.is_empty()) {
                let value: Value = serde_json::from_slice(line).unwrap();
                let mut line = value["id"].as_str().unwrap().to_owned();
                if let Some(n) = value.get("valueInteger") {
                    line.push_str(&format!("={n}"));
                }
                lines.push(line);
            }
        }
    }
    lines
}

/// Reads a whole part, `max_bytes` at a time: its NDJSON text and line count.
fn read_part(
    store: &dyn Store,
    tenant: TenantId,
    selection: &MemberSelection,
    resource_type: &str,
    part: &PartRange,
    max_bytes: usize,
) -> (Vec<u8>, u64) {
    let mut reader = store.part_reader(tenant, selection, resource_type, *part);
    let (mut text, mut written) = (Vec::new(), 0);
    loop {
        match reader.next_window(&mut text, max_bytes).unwrap() {
            0 => return (text, written),
            read => written += read,
        }
    }
}

pub fn tenants_and_clients(store: &dyn Store) {
    let acme = store.create_tenant("acme").unwrap();
    assert!(matches!(store.create_tenant("acme"), Err(StoreError::Conflict(_))));
    assert_eq!(store.tenant_by_name("acme").unwrap().unwrap().id, acme.id);
    assert!(store.tenant_by_name("nope").unwrap().is_none());
    store.create_client(acme.id, "c1", "$hash$").unwrap();
    assert!(matches!(store.create_client(acme.id, "c1", "$x$"), Err(StoreError::Conflict(_))));
    assert!(matches!(store.create_client(TenantId(9_999), "c2", "$x$"), Err(StoreError::NotFound(_))));
    let client = store.client("c1").unwrap().unwrap();
    assert_eq!((client.tenant, client.tenant_name.as_str(), client.revoked), (acme.id, "acme", false));
    assert_eq!(store.list_clients(acme.id).unwrap().len(), 1);
    assert!(store.revoke_client("c1").unwrap());
    assert!(store.client("c1").unwrap().unwrap().revoked);
    assert!(!store.revoke_client("missing").unwrap());
}

/// A secret hash is replaced only while it is the expected one; a server key is created once
/// and then the same for every caller.
pub fn client_secret_hashes_and_server_keys(store: &dyn Store) {
    let acme = store.create_tenant("acme").unwrap();
    store.create_client(acme.id, "c1", "$old$").unwrap();
    assert!(!store.replace_client_secret_hash("c1", "$other$", "$new$").unwrap());
    assert_eq!(store.client("c1").unwrap().unwrap().secret_hash, "$old$");
    assert!(store.replace_client_secret_hash("c1", "$old$", "$new$").unwrap());
    assert_eq!(store.client("c1").unwrap().unwrap().secret_hash, "$new$");
    assert!(!store.replace_client_secret_hash("missing", "$old$", "$new$").unwrap());
    let first = store.server_key("credentials", &[1; 32]).unwrap();
    assert_eq!(first, vec![1; 32]);
    assert_eq!(store.server_key("credentials", &[2; 32]).unwrap(), first, "the first key stays");
    assert_eq!(store.server_key("other", &[3; 32]).unwrap(), vec![3; 32]);
    assert_eq!(store.list_tenants().unwrap().len(), 1);
}

/// A SMART registration is stored per client, replaced as a whole, and refused for an unknown
/// client.
pub fn client_registrations_round_trip(store: &dyn Store) {
    let acme = store.create_tenant("acme").unwrap();
    store.create_client(acme.id, "c1", "$hash$").unwrap();
    assert_eq!(store.client_registration("c1").unwrap(), None);
    let registration = ClientRegistration {
        jwks: Some(r#"{"keys":[]}"#.into()),
        jwks_url: None,
        scopes: Some("system/*.rs".into()),
        token_ttl_seconds: Some(900),
    };
    assert!(store.set_client_registration("c1", &registration).unwrap());
    assert_eq!(store.client_registration("c1").unwrap(), Some(registration));
    let by_url = ClientRegistration { jwks_url: Some("https://keys.example/jwks.json".into()), ..Default::default() };
    assert!(store.set_client_registration("c1", &by_url).unwrap());
    assert_eq!(store.client_registration("c1").unwrap(), Some(by_url.clone()));
    assert!(!store.set_client_registration("missing", &by_url).unwrap());
    assert_eq!(store.client_registration("missing").unwrap(), None);
}

/// A jti is accepted once per (tenant, client) while it lives, again once it expired; other
/// clients and tenants have their own.
pub fn assertion_jtis_are_accepted_once_until_they_expire(store: &dyn Store) {
    let (a, b) = (tenant(store, "a"), tenant(store, "b"));
    assert!(store.record_assertion_jti(a, "c1", "j1", 2_000, 1_000).unwrap());
    assert!(!store.record_assertion_jti(a, "c1", "j1", 2_000, 1_500).unwrap(), "a replay");
    assert!(store.record_assertion_jti(a, "c2", "j1", 2_000, 1_500).unwrap(), "another client");
    assert!(store.record_assertion_jti(b, "c1", "j1", 2_000, 1_500).unwrap(), "another tenant");
    assert!(!store.record_assertion_jti(a, "c1", "j1", 2_500, 1_999).unwrap(), "still live");
    assert!(store.record_assertion_jti(a, "c1", "j1", 3_000, 2_000).unwrap(), "expired records are gone");
}

pub fn versions_and_history(store: &dyn Store) {
    let t = tenant(store, "t");
    let first = put(store, t, None, observation("o1", "p1", 1));
    assert!(first.created);
    assert_eq!(first.version, 1);
    let second = put(store, t, None, observation("o1", "p1", 2));
    assert!(!second.created);
    assert_eq!(second.version, 2);
    assert!(second.last_updated > first.last_updated);
    let read = store.read(t, &Visibility::Tenant, "Observation", "o1").unwrap().unwrap();
    let body: Value = serde_json::from_str(read.body.as_deref().unwrap()).unwrap();
    assert_eq!(body["meta"]["versionId"], "2");
    assert_eq!(body["valueInteger"], 2);
    assert!(store.vread(t, &Visibility::Tenant, "Observation", "o1", 9).unwrap().is_none());
    assert_eq!(store.vread(t, &Visibility::Tenant, "Observation", "o1", 2).unwrap().unwrap().version, 2);
    let old = store.vread(t, &Visibility::Tenant, "Observation", "o1", 1).unwrap().unwrap();
    assert!(old.body.unwrap().contains("\"valueInteger\":1"));
    let versions: Vec<i64> =
        store.history(t, &Visibility::Tenant, "Observation", "o1").unwrap().iter().map(|v| v.version).collect();
    assert_eq!(versions, vec![2, 1]);
    let stale = WriteOp::Update {
        resource_type: "Observation".into(),
        id: "o1".into(),
        body: observation("o1", "p1", 3),
        if_match: Some(1),
    };
    assert!(matches!(store.write(t, None, &[stale], WriteMode::Transaction), Err(StoreError::VersionConflict(_))));
    let create_again =
        WriteOp::Create { resource_type: "Observation".into(), id: "o1".into(), body: observation("o1", "p1", 3) };
    assert!(matches!(store.write(t, None, &[create_again], WriteMode::Transaction), Err(StoreError::Conflict(_))));
}

pub fn tenants_are_isolated(store: &dyn Store) {
    let (a, b) = (tenant(store, "a"), tenant(store, "b"));
    put(store, a, None, patient("p1"));
    assert!(store.read(b, &Visibility::Tenant, "Patient", "p1").unwrap().is_none());
    assert!(store.history(b, &Visibility::Tenant, "Patient", "p1").unwrap().is_empty());
    assert!(store.vread(b, &Visibility::Tenant, "Patient", "p1", 1).unwrap().is_none());
    let query = SearchQuery { resource_type: "Patient".into(), count: 10, ..Default::default() };
    assert!(store.search(b, &Visibility::Tenant, &query).unwrap().resources.is_empty());
    let op = WriteOp::Delete { resource_type: "Patient".into(), id: "p1".into() };
    assert!(matches!(store.write(b, None, &[op], WriteMode::Transaction), Err(StoreError::NotFound(_))));
    // The same id in another tenant is a different resource.
    put(store, b, None, patient("p1"));
    assert_eq!(store.read(a, &Visibility::Tenant, "Patient", "p1").unwrap().unwrap().version, 1);
    let selection = selection(store, &[("p1", None)], None);
    assert_eq!(export_ids(store, a, &selection, "Patient"), vec!["p1"]);
}

pub fn users_see_their_own(store: &dyn Store) {
    let t = tenant(store, "t");
    put(store, t, Some("alice"), patient("pa"));
    put(store, t, Some("bob"), patient("pb"));
    let alice = Visibility::User("alice".into());
    assert!(store.read(t, &alice, "Patient", "pa").unwrap().is_some());
    assert!(store.read(t, &alice, "Patient", "pb").unwrap().is_none());
    assert!(store.read(t, &Visibility::Tenant, "Patient", "pb").unwrap().is_some());
    let query = SearchQuery { resource_type: "Patient".into(), count: 10, ..Default::default() };
    let ids: Vec<String> = store.search(t, &alice, &query).unwrap().resources.into_iter().map(|r| r.id).collect();
    assert_eq!(ids, vec!["pa"]);
    let steal =
        WriteOp::Update { resource_type: "Patient".into(), id: "pb".into(), body: patient("pb"), if_match: None };
    assert!(matches!(store.write(t, Some("alice"), &[steal], WriteMode::Transaction), Err(StoreError::NotFound(_))));
    let mut selection = selection(store, &[("pa", None), ("pb", None)], None);
    selection.visibility = alice;
    assert_eq!(export_ids(store, t, &selection, "Patient"), vec!["pa"]);
}

pub fn deletes_leave_tombstones(store: &dyn Store) {
    let t = tenant(store, "t");
    put(store, t, None, patient("p1"));
    let deleted = delete(store, t, "Patient", "p1");
    assert_eq!((deleted.version, deleted.deleted), (2, true));
    let tombstone = store.read(t, &Visibility::Tenant, "Patient", "p1").unwrap().unwrap();
    assert!(tombstone.deleted && tombstone.body.is_none());
    assert_eq!(delete(store, t, "Patient", "p1").version, 2, "deleting twice adds no version");
    let query = SearchQuery { resource_type: "Patient".into(), count: 10, ..Default::default() };
    assert!(store.search(t, &Visibility::Tenant, &query).unwrap().resources.is_empty());
    let recreated = put(store, t, None, patient("p1"));
    assert_eq!((recreated.version, recreated.created), (3, true));
}

pub fn unchanged_update_is_a_no_op(store: &dyn Store) {
    let t = tenant(store, "t");
    let first = put(store, t, None, patient("p1"));
    let again = put(store, t, None, patient("p1"));
    assert_eq!((again.version, again.last_updated), (first.version, first.last_updated));
    let mut with_meta = patient("p1");
    with_meta["meta"] = json!({"versionId": "7", "lastUpdated": "2001-01-01T00:00:00Z"});
    assert_eq!(put(store, t, None, with_meta).version, 1);
    let mut changed = patient("p1");
    changed["gender"] = json!("female");
    assert_eq!(put(store, t, None, changed).version, 2);
}

pub fn transactions_are_all_or_nothing(store: &dyn Store) {
    let t = tenant(store, "t");
    put(store, t, None, patient("exists"));
    let ops = vec![
        WriteOp::Create { resource_type: "Patient".into(), id: "new".into(), body: patient("new") },
        WriteOp::Create { resource_type: "Patient".into(), id: "exists".into(), body: patient("exists") },
    ];
    assert!(store.write(t, None, &ops, WriteMode::Transaction).is_err());
    assert!(store.read(t, &Visibility::Tenant, "Patient", "new").unwrap().is_none());
    let query = SearchQuery { resource_type: "Patient".into(), count: 10, ..Default::default() };
    assert_eq!(store.search(t, &Visibility::Tenant, &query).unwrap().resources.len(), 1);
}

pub fn batches_apply_per_entry(store: &dyn Store) {
    let t = tenant(store, "t");
    put(store, t, None, patient("exists"));
    let ops = vec![
        WriteOp::Create { resource_type: "Patient".into(), id: "new".into(), body: patient("new") },
        WriteOp::Create { resource_type: "Patient".into(), id: "exists".into(), body: patient("exists") },
        WriteOp::Delete { resource_type: "Patient".into(), id: "missing".into() },
        WriteOp::Update {
            resource_type: "Observation".into(),
            id: "o".into(),
            body: observation("o", "new", 1),
            if_match: None,
        },
    ];
    let results = store.write(t, None, &ops, WriteMode::Batch).unwrap();
    assert!(results[0].is_ok());
    assert!(matches!(results[1], Err(StoreError::Conflict(_))));
    assert!(matches!(results[2], Err(StoreError::NotFound(_))));
    assert!(results[3].is_ok());
    let selection = selection(store, &[("new", None)], None);
    assert_eq!(export_ids(store, t, &selection, "Observation"), vec!["o=1"]);
}

pub fn search_subset(store: &dyn Store) {
    let t = tenant(store, "t");
    for i in 0..5 {
        put(store, t, None, patient(&format!("p{i}")));
    }
    let middle = put(store, t, None, observation("o1", "p1", 1)).last_updated;
    put(store, t, None, observation("o2", "p2", 1));
    let search = |query: SearchQuery| -> Vec<String> {
        store.search(t, &Visibility::Tenant, &query).unwrap().resources.into_iter().map(|r| r.id).collect()
    };
    let base =
        |resource_type: &str| SearchQuery { resource_type: resource_type.into(), count: 100, ..Default::default() };
    assert_eq!(search(SearchQuery { ids: vec!["p3".into(), "p1".into()], ..base("Patient") }), vec!["p1", "p3"]);
    let by_mrn = |system: Option<&str>| SearchQuery {
        identifiers: vec![IdentifierQuery { system: system.map(str::to_owned), value: "mrn-p2".into() }],
        ..base("Patient")
    };
    assert_eq!(search(by_mrn(None)), vec!["p2"]);
    assert_eq!(search(by_mrn(Some("urn:mrn"))), vec!["p2"]);
    assert!(search(by_mrn(Some("urn:other"))).is_empty());
    let subject = |target: Option<&str>| SearchQuery {
        references: vec![ReferenceQuery { param: "subject", target_type: target.map(str::to_owned), id: "p2".into() }],
        ..base("Observation")
    };
    assert_eq!(search(subject(Some("Patient"))), vec!["o2"]);
    assert_eq!(search(subject(None)), vec!["o2"]);
    assert!(search(subject(Some("Group"))).is_empty());
    let patient = SearchQuery {
        references: vec![ReferenceQuery { param: "patient", target_type: None, id: "p1".into() }],
        ..base("Observation")
    };
    assert_eq!(search(patient), vec!["o1"]);
    assert_eq!(
        search(SearchQuery { last_updated: vec![LastUpdatedBound::AtLeast(middle + 1)], ..base("Observation") }),
        vec!["o2"]
    );
    assert_eq!(
        search(SearchQuery { last_updated: vec![LastUpdatedBound::Before(middle + 1)], ..base("Observation") }),
        vec!["o1"]
    );
    // Keyset paging visits every resource once.
    let mut seen = Vec::new();
    let mut after_key = None;
    loop {
        let page =
            store.search(t, &Visibility::Tenant, &SearchQuery { count: 2, after_key, ..base("Patient") }).unwrap();
        seen.extend(page.resources.into_iter().map(|r| r.id));
        match page.next_key {
            Some(key) => after_key = Some(key),
            None => break,
        }
    }
    assert_eq!(seen, vec!["p0", "p1", "p2", "p3", "p4"]);
}

pub fn compartment_index_follows_updates(store: &dyn Store) {
    let t = tenant(store, "t");
    put(store, t, None, observation("o1", "a", 1));
    let before_move = selection(store, &[("a", None), ("b", None)], None);
    put(store, t, None, observation("o1", "b", 2));
    let after_move = selection(store, &[("a", None)], None);
    assert!(export_ids(store, t, &after_move, "Observation").is_empty(), "o1 left a's compartment");
    let only_b = selection(store, &[("b", None)], None);
    assert_eq!(export_ids(store, t, &only_b, "Observation"), vec!["o1=2"]);
    // The snapshot taken before the move still sees the old version, in a's compartment.
    let only_a_before = MemberSelection { members: vec![("a".into(), None)].into(), ..before_move };
    assert_eq!(export_ids(store, t, &only_a_before, "Observation"), vec!["o1=1"]);
}

pub fn group_membership_history(store: &dyn Store) {
    let t = tenant(store, "t");
    let v1 = put(store, t, None, group("g", &["a", "b"])).last_updated;
    let v2 = put(store, t, None, group("g", &["b", "c"])).last_updated;
    assert_eq!(store.members_at(t, "g", v1).unwrap(), vec!["a", "b"]);
    assert_eq!(store.members_at(t, "g", v2).unwrap(), vec!["b", "c"]);
    assert!(store.members_at(t, "g", v1 - 1).unwrap().is_empty());
    let gone = delete(store, t, "Group", "g").last_updated;
    assert!(store.members_at(t, "g", gone).unwrap().is_empty());
    assert_eq!(store.members_at(t, "g", gone - 1).unwrap(), vec!["b", "c"]);
    let group_then = store.version_at(t, "Group", "g", v1).unwrap().unwrap();
    assert_eq!(group_then.version, 1);
    assert!(store.version_at(t, "Group", "g", gone).unwrap().is_none());
}

pub fn export_is_a_snapshot(store: &dyn Store) {
    let t = tenant(store, "t");
    put(store, t, None, patient("p"));
    put(store, t, None, observation("o1", "p", 1));
    put(store, t, None, observation("o2", "p", 1));
    let frozen = selection(store, &[("p", None)], None);
    put(store, t, None, observation("o1", "p", 2));
    delete(store, t, "Observation", "o2");
    put(store, t, None, observation("o3", "p", 1));
    assert_eq!(export_ids(store, t, &frozen, "Observation"), vec!["o1=1", "o2=1"]);
    let now = selection(store, &[("p", None)], None);
    assert_eq!(export_ids(store, t, &now, "Observation"), vec!["o1=2", "o3=1"]);
}

pub fn export_since_and_new_members(store: &dyn Store) {
    let t = tenant(store, "t");
    put(store, t, None, observation("old-a", "a", 1));
    put(store, t, None, observation("old-b", "b", 1));
    let since = store.reserve_transaction_time().unwrap();
    put(store, t, None, observation("new-a", "a", 1));
    // a is an existing member (only changes); b joined since (full history).
    let selection = selection(store, &[("a", Some(since)), ("b", None)], Some(since));
    assert_eq!(export_ids(store, t, &selection, "Observation"), vec!["old-b=1", "new-a=1"]);
    let mut until = selection.clone();
    until.until = Some(since);
    assert_eq!(export_ids(store, t, &until, "Observation"), vec!["old-b=1"]);
}

pub fn export_reports_deletions(store: &dyn Store) {
    let t = tenant(store, "t");
    put(store, t, None, observation("keep", "a", 1));
    put(store, t, None, observation("gone-early", "a", 1));
    put(store, t, None, observation("gone", "a", 1));
    put(store, t, None, observation("other", "z", 1));
    delete(store, t, "Observation", "gone-early");
    let since = store.reserve_transaction_time().unwrap();
    let gone_at = delete(store, t, "Observation", "gone").last_updated;
    delete(store, t, "Observation", "other");
    let selection = selection(store, &[("a", Some(since))], Some(since));
    assert_eq!(
        store.deleted_in_compartments(t, &selection, "Observation").unwrap(),
        vec![("gone".to_owned(), gone_at)]
    );
    assert!(export_ids(store, t, &selection, "Observation").is_empty());
    let without_since = MemberSelection { since: None, members: vec![("a".into(), None)].into(), ..selection };
    assert!(store.deleted_in_compartments(t, &without_since, "Observation").unwrap().is_empty());
}

/// A wrong-patient correction: a resource re-pointed from a member to a non-member since
/// `_since` is listed in `deleted[]` ("no longer part of this cohort's data"); one re-pointed into
/// the cohort is exported instead.
pub fn export_reports_resources_that_left_the_cohort(store: &dyn Store) {
    let t = tenant(store, "t");
    let with_performer = |id: &str, subject: &str, performer: &str| {
        let mut body = observation(id, subject, 1);
        body["performer"] = json!([{"reference": format!("Patient/{performer}")}]);
        body
    };
    // a and a2 stay members, n joins after `since`, r leaves, x never is a member.
    for (id, subject) in [
        ("moved-out", "a"),
        ("moved-in", "x"),
        ("moved-to-new", "a"),
        ("moved-and-back", "a"),
        ("moved-then-deleted", "a"),
        ("removed-only", "r"),
        ("moved-after-export", "a"),
        ("owned", "a"),
    ] {
        put(store, t, None, observation(id, subject, 1));
    }
    put(store, t, Some("u"), observation("owned-by-u", "a", 1));
    put(store, t, None, with_performer("still-with-a2", "a", "a2"));
    let since = store.reserve_transaction_time().unwrap();
    let moved_at = put(store, t, None, observation("moved-out", "x", 2)).last_updated;
    put(store, t, None, observation("moved-in", "a", 2));
    put(store, t, None, observation("moved-to-new", "n", 2));
    put(store, t, None, observation("moved-and-back", "x", 2));
    put(store, t, None, observation("moved-and-back", "a", 3));
    put(store, t, None, observation("moved-then-deleted", "x", 2));
    let deleted_at = delete(store, t, "Observation", "moved-then-deleted").last_updated;
    put(store, t, None, observation("removed-only", "x", 2));
    put(store, t, None, observation("created-after", "a", 1));
    put(store, t, None, observation("created-after", "x", 2));
    let owned_moved_at = put(store, t, Some("u"), observation("owned-by-u", "x", 2)).last_updated;
    put(store, t, None, with_performer("still-with-a2", "x", "a2"));
    let members = [("a", Some(since)), ("a2", Some(since)), ("n", None)];
    let selection = selection(store, &members, Some(since));
    put(store, t, None, observation("moved-after-export", "x", 2));

    let deleted = store.deleted_in_compartments(t, &selection, "Observation").unwrap();
    assert_eq!(
        deleted,
        vec![
            ("moved-out".to_owned(), moved_at),
            ("moved-then-deleted".to_owned(), deleted_at),
            ("owned-by-u".to_owned(), owned_moved_at),
        ],
        "resources that left the continuing members' compartments, once each, in key order"
    );
    assert_eq!(
        export_ids(store, t, &selection, "Observation"),
        vec!["moved-in=2", "moved-to-new=2", "moved-and-back=3", "still-with-a2=1"],
        "re-pointed into the cohort (or still in it): exported"
    );
    // A user sees only its own resources leave.
    let as_user = MemberSelection { visibility: Visibility::User("u".into()), ..selection.clone() };
    assert_eq!(
        store.deleted_in_compartments(t, &as_user, "Observation").unwrap(),
        vec![("owned-by-u".to_owned(), owned_moved_at)]
    );
    // Without `_since` nothing is listed; a `since` after the move sees nothing leave.
    let without_since = MemberSelection { since: None, ..selection.clone() };
    assert!(store.deleted_in_compartments(t, &without_since, "Observation").unwrap().is_empty());
    let later = MemberSelection {
        since: Some(selection.transaction_time),
        members: vec![("a".into(), Some(selection.transaction_time))].into(),
        transaction_time: store.reserve_transaction_time().unwrap(),
        ..selection.clone()
    };
    assert_eq!(
        store
            .deleted_in_compartments(t, &later, "Observation")
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect::<Vec<_>>(),
        vec!["moved-after-export"]
    );
}

pub fn export_parts_split_by_size(store: &dyn Store) {
    let t = tenant(store, "t");
    for i in 0..7 {
        put(store, t, None, observation(&format!("o{i}"), if i % 2 == 0 { "a" } else { "b" }, i));
    }
    let selection = selection(store, &[("a", None), ("b", None)], None);
    let plan = store.plan_parts(t, &selection, &["Observation".into(), "Condition".into()], 3).unwrap();
    assert_eq!(plan.len(), 1, "types without data get no parts");
    let counts: Vec<u64> = plan[0].1.iter().map(|part| part.count).collect();
    assert_eq!(counts, vec![3, 3, 1]);
    let keys: Vec<&PartRange> = plan[0].1.iter().collect();
    assert!(keys.windows(2).all(|w| w[0].last_key < w[1].first_key));
    let mut lines = 0;
    for part in &plan[0].1 {
        lines += read_part(store, t, &selection, "Observation", part, usize::MAX).1;
    }
    assert_eq!(lines, 7);
}

/// A type whose keys are spread thinly among another type's, then dense, exports exactly, for
/// every member and for the tenant, whatever changed after the transaction time (a store may
/// widen its key windows over sparse keys and must narrow them again where keys are dense).
pub fn keys_spread_thinly_then_densely_export_exactly(store: &dyn Store) {
    let t = tenant(store, "t");
    put(store, t, None, patient("a"));
    put(store, t, None, patient("b"));
    let condition = |id: &str, patient: &str| json!({"resourceType": "Condition", "id": id, "subject": {"reference": format!("Patient/{patient}")}});
    let (mut of_a, mut all) = (Vec::new(), Vec::new());
    for i in 0..80 {
        if i % 13 == 0 || i >= 64 {
            let id = format!("c{i:02}");
            let owner = if i % 3 == 0 { "a" } else { "b" };
            put(store, t, None, condition(&id, owner));
            if owner == "a" {
                of_a.push(id.clone());
            }
            all.push(id);
        } else {
            put(store, t, None, observation(&format!("o{i}"), "b", i));
        }
    }
    let both = selection(store, &[("a", None), ("b", None)], None);
    let only_a = selection(store, &[("a", None)], None);
    let tenant_wide =
        MemberSelection { members: Default::default(), scope: SelectionScope::Tenant, ..selection(store, &[], None) };
    // Written after the transaction time: exported as they were.
    delete(store, t, "Condition", "c00");
    put(store, t, None, condition("c65", "a"));
    put(store, t, None, condition("c99", "a"));
    assert_eq!(export_ids(store, t, &both, "Condition"), all);
    assert_eq!(export_ids(store, t, &only_a, "Condition"), of_a);
    assert_eq!(export_ids(store, t, &tenant_wide, "Condition"), all);
    assert_eq!(export_ids(store, t, &only_a, "Observation"), Vec::<String>::new());
}

pub fn transaction_time_orders_writes(store: &dyn Store) {
    let t = tenant(store, "t");
    let before = put(store, t, None, patient("p1")).last_updated;
    let reserved = store.reserve_transaction_time().unwrap();
    let after = put(store, t, None, patient("p2")).last_updated;
    assert!(before <= reserved && reserved < after);
}

pub fn a_patient_is_in_its_own_compartment_by_stored_id(store: &dyn Store) {
    let t = tenant(store, "t");
    // A create assigns the id; whatever id the body carried does not count.
    let op = WriteOp::Create {
        resource_type: "Patient".into(),
        id: "assigned".into(),
        body: json!({"resourceType": "Patient", "id": "claimed"}),
    };
    store.write(t, None, &[op], WriteMode::Transaction).unwrap().remove(0).unwrap();
    let stored = store.read(t, &Visibility::Tenant, "Patient", "assigned").unwrap().unwrap();
    assert!(stored.body.unwrap().contains(r#""id":"assigned""#));
    assert_eq!(export_ids(store, t, &selection(store, &[("assigned", None)], None), "Patient"), vec!["assigned"]);
    assert!(export_ids(store, t, &selection(store, &[("claimed", None)], None), "Patient").is_empty());
}

pub fn existence_at_a_time(store: &dyn Store) {
    let t = tenant(store, "t");
    put(store, t, None, patient("a"));
    put(store, t, Some("alice"), patient("b"));
    let before = store.reserve_transaction_time().unwrap();
    delete(store, t, "Patient", "a");
    put(store, t, None, patient("c"));
    let ids: Vec<String> = ["a", "b", "c", "z"].iter().map(|id| id.to_string()).collect();
    let now = store.reserve_transaction_time().unwrap();
    assert_eq!(store.existing_at(t, &Visibility::Tenant, "Patient", &ids, before).unwrap(), vec!["a", "b"]);
    assert_eq!(store.existing_at(t, &Visibility::Tenant, "Patient", &ids, now).unwrap(), vec!["b", "c"]);
    let alice = Visibility::User("alice".into());
    assert_eq!(store.existing_at(t, &alice, "Patient", &ids, now).unwrap(), vec!["b"]);
}

fn export_job(id: &str, client_id: &str, visibility: Visibility, expires: i64) -> ExportJob {
    ExportJob {
        id: id.into(),
        client_id: client_id.into(),
        visibility,
        created: 1_000,
        expires,
        state: ExportJobState::Complete,
        manifest: json!({"transactionTime": "2024-01-01T00:00:00Z", "job": id, "output": []}).to_string(),
    }
}

/// A planning job is finished once (complete or failed); a cancelled (deleted) or finished job
/// is not touched again, so a planner's late result is discarded.
pub fn planning_jobs_are_finished_once(store: &dyn Store) {
    let t = store.create_tenant("acme").unwrap().id;
    let other = store.create_tenant("globex").unwrap().id;
    let planning = |id: &str| ExportJob {
        state: ExportJobState::Planning,
        manifest: String::new(),
        ..export_job(id, "c1", Visibility::Tenant, 5_000)
    };
    store.create_export_job(t, &planning("p1")).unwrap();
    assert_eq!(store.export_job(t, "p1").unwrap(), Some(planning("p1")));
    assert!(!store.finish_export_job(other, "p1", ExportJobState::Complete, "{}").unwrap(), "another tenant's job");
    assert!(store.finish_export_job(t, "p1", ExportJobState::Complete, "{\"output\":[]}").unwrap());
    let finished = store.export_job(t, "p1").unwrap().unwrap();
    assert_eq!((finished.state, finished.manifest.as_str()), (ExportJobState::Complete, "{\"output\":[]}"));
    let failed = ExportJobState::Failed { status: 500 };
    assert!(!store.finish_export_job(t, "p1", failed, "{}").unwrap(), "a finished job stays as it is");
    assert_eq!(store.export_job(t, "p1").unwrap().unwrap(), finished);

    store.create_export_job(t, &planning("p2")).unwrap();
    assert!(store.finish_export_job(t, "p2", failed, "{\"resourceType\":\"OperationOutcome\"}").unwrap());
    let p2 = store.export_job(t, "p2").unwrap().unwrap();
    assert_eq!((p2.state, p2.manifest.as_str()), (failed, "{\"resourceType\":\"OperationOutcome\"}"));

    store.create_export_job(t, &planning("p3")).unwrap();
    assert!(store.delete_export_job(t, "p3").unwrap());
    assert!(!store.finish_export_job(t, "p3", ExportJobState::Complete, "{}").unwrap(), "cancelled: discarded");
    assert!(store.export_job(t, "p3").unwrap().is_none(), "finishing a cancelled job does not bring it back");
}

pub fn export_jobs_round_trip(store: &dyn Store) {
    let t = tenant(store, "t");
    let job = export_job("job-1", "c1", Visibility::Tenant, 5_000);
    let alice = export_job("job-2", "c1", Visibility::User("alice".into()), 6_000);
    store.create_export_job(t, &job).unwrap();
    store.create_export_job(t, &alice).unwrap();
    assert_eq!(store.export_job(t, "job-1").unwrap(), Some(job.clone()));
    assert_eq!(store.export_job(t, "job-2").unwrap(), Some(alice), "the user scope is kept");
    assert!(store.export_job(t, "job-3").unwrap().is_none());
    let duplicate = ExportJob { manifest: "{}".into(), ..job.clone() };
    assert!(matches!(store.create_export_job(t, &duplicate), Err(StoreError::Conflict(_))));
    assert_eq!(store.export_job(t, "job-1").unwrap(), Some(job), "a refused duplicate changes nothing");
    assert!(store.delete_export_job(t, "job-1").unwrap());
    assert!(store.export_job(t, "job-1").unwrap().is_none());
    assert!(!store.delete_export_job(t, "job-1").unwrap(), "a second delete finds nothing");
    assert!(store.export_job(t, "job-2").unwrap().is_some(), "deleting one job leaves the others");
}

pub fn export_jobs_are_isolated_by_tenant(store: &dyn Store) {
    let (a, b) = (tenant(store, "a"), tenant(store, "b"));
    let job = export_job("shared-id", "ca", Visibility::Tenant, 5_000);
    store.create_export_job(a, &job).unwrap();
    assert!(store.export_job(b, "shared-id").unwrap().is_none(), "another tenant cannot read the job");
    assert!(!store.delete_export_job(b, "shared-id").unwrap(), "another tenant cannot delete the job");
    assert_eq!(store.export_job(a, "shared-id").unwrap(), Some(job.clone()));
    // The same id in another tenant is another job.
    let other = export_job("shared-id", "cb", Visibility::Tenant, 7_000);
    store.create_export_job(b, &other).unwrap();
    assert_eq!(store.export_job(a, "shared-id").unwrap(), Some(job));
    assert_eq!(store.export_job(b, "shared-id").unwrap(), Some(other.clone()));
    assert!(store.delete_export_job(a, "shared-id").unwrap());
    assert!(store.export_job(a, "shared-id").unwrap().is_none());
    assert_eq!(store.export_job(b, "shared-id").unwrap(), Some(other));
}

pub fn expired_export_jobs_are_swept(store: &dyn Store) {
    let (a, b) = (tenant(store, "a"), tenant(store, "b"));
    store.create_export_job(a, &export_job("a-old", "ca", Visibility::Tenant, 100)).unwrap();
    store.create_export_job(a, &export_job("a-new", "ca", Visibility::Tenant, 300)).unwrap();
    store.create_export_job(b, &export_job("b-edge", "cb", Visibility::Tenant, 200)).unwrap();
    assert_eq!(store.delete_expired_export_jobs(50).unwrap(), 0);
    assert_eq!(store.delete_expired_export_jobs(200).unwrap(), 2, "expiry is inclusive and spans tenants");
    assert!(store.export_job(a, "a-old").unwrap().is_none());
    assert!(store.export_job(b, "b-edge").unwrap().is_none());
    assert!(store.export_job(a, "a-new").unwrap().is_some());
    assert_eq!(store.delete_expired_export_jobs(200).unwrap(), 0);
}

pub fn expired_export_jobs_are_listed_before_they_are_removed(store: &dyn Store) {
    let (a, b) = (tenant(store, "a"), tenant(store, "b"));
    store.create_export_job(a, &export_job("a-old", "ca", Visibility::Tenant, 100)).unwrap();
    store.create_export_job(b, &export_job("b-edge", "cb", Visibility::Tenant, 200)).unwrap();
    store.create_export_job(a, &export_job("a-new", "ca", Visibility::Tenant, 300)).unwrap();
    assert!(store.expired_export_jobs(50, 10).unwrap().is_empty());
    let expired = store.expired_export_jobs(200, 10).unwrap();
    assert_eq!(expired, vec![(a, "a-old".to_owned()), (b, "b-edge".to_owned())], "inclusive, across tenants");
    assert_eq!(store.expired_export_jobs(200, 1).unwrap(), vec![(a, "a-old".to_owned())], "soonest first, limited");
    assert!(store.export_job(a, "a-old").unwrap().is_some(), "listing deletes nothing");
    assert!(store.delete_export_job(a, "a-old").unwrap());
    assert_eq!(store.expired_export_jobs(200, 10).unwrap(), vec![(b, "b-edge".to_owned())]);
}

pub fn export_records_round_trip_by_tenant_and_expire(store: &dyn Store) {
    let (a, b) = (tenant(store, "a"), tenant(store, "b"));
    let record = |id: &str, expires: i64| ExportRecord {
        id: id.into(),
        created: 10,
        expires,
        plan: format!(r#"{{"files":[],"w":["{}"]}}"#, "x".repeat(10_000)),
    };
    store.create_export_record(a, &record("r1", 100)).unwrap();
    assert!(matches!(store.create_export_record(a, &record("r1", 300)), Err(StoreError::Conflict(_))));
    assert_eq!(store.export_record(a, "r1").unwrap(), Some(record("r1", 100)), "stored whole");
    // Tenant-scoped: the same id in another tenant is another record, and a lookup never crosses.
    assert_eq!(store.export_record(b, "r1").unwrap(), None);
    store.create_export_record(b, &record("r1", 300)).unwrap();
    store.create_export_record(b, &record("r2", 100)).unwrap();
    assert_eq!(store.export_record(b, "r1").unwrap().unwrap().expires, 300);
    assert_eq!(store.export_record(a, "r1").unwrap().unwrap().expires, 100);
    // Expiry is inclusive, spans tenants, and leaves jobs alone.
    assert_eq!(store.delete_expired_export_records(99).unwrap(), 0);
    assert_eq!(store.delete_expired_export_records(100).unwrap(), 2);
    assert_eq!(store.export_record(a, "r1").unwrap(), None);
    assert_eq!(store.export_record(b, "r2").unwrap(), None);
    assert!(store.export_record(b, "r1").unwrap().is_some());
}

pub fn a_fresh_store_is_writable_above_its_free_space_floor(store: &dyn Store) {
    store.check_writable(0).expect("a fresh store takes writes");
    match store.check_writable(u64::MAX) {
        Err(StoreError::StorageFull(_)) => {}
        other => panic!("no disk has u64::MAX bytes free, yet check_writable answered {other:?}"),
    }
}

/// A part read window by window, with writes between the windows that touch every exported
/// resource (update, delete, re-point away, delete and re-create) and bring new ones into the
/// members' compartments, reads exactly what a one-shot read at the transaction time reads.
pub fn export_windows_agree_whatever_is_written_between_them(store: &dyn Store) {
    let t = tenant(store, "t");
    for member in ["a", "b", "z"] {
        put(store, t, None, patient(member));
    }
    for i in 0..12 {
        put(store, t, None, observation(&format!("o{i}"), ["a", "b", "z"][i % 3], i as i64));
    }
    // History before the transaction time too: an update, a delete, a move into the cohort.
    put(store, t, None, observation("o0", "a", 100));
    delete(store, t, "Observation", "o1");
    put(store, t, None, observation("o2", "a", 102));
    let frozen = selection(store, &[("a", None), ("b", None)], None);
    let plan = store.plan_parts(t, &frozen, &["Observation".into(), "Patient".into()], 4).unwrap();
    let parts: Vec<(String, PartRange)> =
        plan.iter().flat_map(|(kind, parts)| parts.iter().map(move |part| (kind.clone(), *part))).collect();
    assert!(parts.len() >= 3, "several parts: {plan:?}");
    let one_shot: Vec<Vec<u8>> =
        parts.iter().map(|(kind, part)| read_part(store, t, &frozen, kind, part, usize::MAX).0).collect();

    // Before each window, the resource it is about to read is written (updated, deleted, moved
    // out of the cohort, deleted and re-created, in turn), whether an earlier window already
    // resolved it or not; and a new resource enters the cohort.
    let mut step = 0i64;
    let mut write = |next: Option<&Value>| {
        put(store, t, None, observation(&format!("new{step}"), "b", step));
        let Some(next) = next else { return };
        let (kind, id) = (next["resourceType"].as_str().unwrap(), next["id"].as_str().unwrap());
        let gone = || WriteOp::Delete { resource_type: kind.into(), id: id.into() };
        let changed = |patient: &str| match kind {
            "Patient" => json!({"resourceType": "Patient", "id": id, "gender": "other"}),
            _ => observation(id, patient, 1_000 + step),
        };
        match step % 4 {
            0 => drop(put(store, t, None, changed("a"))),
            1 => drop(store.write(t, None, &[gone()], WriteMode::Transaction).unwrap()),
            2 => drop(put(store, t, None, changed("z"))),
            _ => {
                store.write(t, None, &[gone()], WriteMode::Transaction).unwrap();
                put(store, t, None, next.clone());
            }
        }
        step += 1;
    };
    for ((kind, part), expected) in parts.iter().zip(&one_shot) {
        let lines: Vec<Value> = expected
            .split(|byte| *byte == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| serde_json::from_slice(line).unwrap())
            .collect();
        let mut reader = store.part_reader(t, &frozen, kind, *part);
        let (mut text, mut written) = (Vec::new(), 0);
        loop {
            write(lines.get(written as usize));
            match reader.next_window(&mut text, 1).unwrap() {
                0 => break,
                read => written += read,
            }
        }
        assert_eq!(written, part.count, "{kind} part {part:?}: the planned count");
        assert_eq!(String::from_utf8_lossy(&text), String::from_utf8_lossy(expected), "{kind} part {part:?}");
    }
    let now = MemberSelection { transaction_time: store.reserve_transaction_time().unwrap(), ..frozen.clone() };
    assert_ne!(
        export_ids(store, t, &now, "Observation"),
        export_ids(store, t, &frozen, "Observation"),
        "the writes between windows changed what a later export sees"
    );
    // Read again after all those writes, in one go and in windows: still the same bytes.
    for ((kind, part), expected) in parts.iter().zip(&one_shot) {
        assert_eq!(&read_part(store, t, &frozen, kind, part, usize::MAX).0, expected);
        assert_eq!(&read_part(store, t, &frozen, kind, part, 1).0, expected);
    }
    let all: Vec<u8> = one_shot.concat();
    let text = String::from_utf8(all).unwrap();
    for expected in ["\"o0\"", "\"valueInteger\":100", "\"o2\"", "\"valueInteger\":102", "\"o3\"", "\"o4\""] {
        assert!(text.contains(expected), "{expected} exported: {text}");
    }
    assert!(!text.contains("\"o1\""), "deleted before the transaction time: {text}");
}

/// A write of many entries (what imports and uploads send: a store may insert the new resources
/// among them together) gives each entry the result, the index entries and the search tokens a
/// write of its own would: new ones, a repeated id, existing ones, a Group, failing entries.
pub fn large_writes_mix_new_and_existing_resources(store: &dyn Store) {
    let t = tenant(store, "t");
    put(store, t, Some("alice"), patient("old"));
    let update = |resource_type: &str, id: &str, body: Value| WriteOp::Update {
        resource_type: resource_type.into(),
        id: id.into(),
        body,
        if_match: None,
    };
    let mut ops: Vec<WriteOp> =
        (0..6).map(|n| update("Patient", &format!("p{n}"), patient(&format!("p{n}")))).collect();
    ops.push(update("Observation", "o1", observation("o1", "p1", 1)));
    ops.push(update("Observation", "twice", observation("twice", "p2", 1)));
    ops.push(update("Observation", "twice", observation("twice", "p2", 2)));
    ops.push(update("Patient", "old", json!({"resourceType": "Patient", "id": "old", "gender": "other"})));
    ops.push(WriteOp::Create { resource_type: "Patient".into(), id: "old".into(), body: patient("old") });
    ops.push(update("Group", "g", group("g", &["p1", "p2"])));
    ops.push(WriteOp::Delete { resource_type: "Patient".into(), id: "missing".into() });
    ops.push(WriteOp::Update {
        resource_type: "Patient".into(),
        id: "conditional".into(),
        body: patient("conditional"),
        if_match: Some(1),
    });
    let results = store.write(t, Some("alice"), &ops, WriteMode::Batch).unwrap();
    assert_eq!(results.len(), ops.len());
    for (index, result) in results.iter().enumerate().take(8) {
        let written = result.as_ref().unwrap_or_else(|error| panic!("entry {index}: {error}"));
        assert_eq!((written.version, written.created, written.changed), (1, true, true), "entry {index}");
    }
    let second = results[8].as_ref().unwrap();
    assert_eq!((second.version, second.created), (2, false), "the repeated id is an update of the first");
    let old = results[9].as_ref().unwrap();
    assert_eq!((old.version, old.created), (2, false));
    assert!(matches!(results[10], Err(StoreError::Conflict(_))));
    assert!(results[11].is_ok());
    assert!(matches!(results[12], Err(StoreError::NotFound(_))));
    assert!(matches!(results[13], Err(StoreError::VersionConflict(_))));

    // What each entry stored: bodies, owner, search tokens, compartments, membership.
    let alice = Visibility::User("alice".into());
    let p3 = store.read(t, &alice, "Patient", "p3").unwrap().expect("p3 is alice's");
    assert_eq!((p3.version, p3.owner.as_deref()), (1, Some("alice")));
    assert!(p3.body.unwrap().contains(r#""versionId":"1""#));
    let by_mrn = SearchQuery {
        resource_type: "Patient".into(),
        identifiers: vec![IdentifierQuery { system: Some("urn:mrn".into()), value: "mrn-p4".into() }],
        count: 10,
        ..Default::default()
    };
    let found: Vec<String> = store.search(t, &alice, &by_mrn).unwrap().resources.into_iter().map(|r| r.id).collect();
    assert_eq!(found, vec!["p4"]);
    let members = selection(store, &[("p1", None), ("p2", None)], None);
    assert_eq!(export_ids(store, t, &members, "Observation"), vec!["o1=1", "twice=2"]);
    assert_eq!(export_ids(store, t, &members, "Patient"), vec!["p1", "p2"]);
    let now = store.reserve_transaction_time().unwrap();
    assert_eq!(store.members_at(t, "g", now).unwrap(), vec!["p1", "p2"]);
    assert_eq!(store.history(t, &Visibility::Tenant, "Observation", "twice").unwrap().len(), 2);

    // As one transaction, a failing entry among many stores none of them.
    let mut ops: Vec<WriteOp> =
        (10..20).map(|n| update("Patient", &format!("p{n}"), patient(&format!("p{n}")))).collect();
    ops.push(WriteOp::Create { resource_type: "Patient".into(), id: "p1".into(), body: patient("p1") });
    assert!(matches!(store.write(t, None, &ops, WriteMode::Transaction), Err(StoreError::Conflict(_))));
    assert!(store.read(t, &Visibility::Tenant, "Patient", "p10").unwrap().is_none());
    assert!(export_ids(store, t, &selection(store, &[("p10", None)], None), "Patient").is_empty());
}

/// The transaction time's promise (Bulk Data IG) with writers running at once: what is stored
/// with `lastUpdated <= T` right after T is reserved is final, no write stamped before T commits
/// later (timestamp order is commit order).
pub fn transaction_time_holds_across_concurrent_writers(store: &dyn Store) {
    // Whether writes committed between the first reservation and the last.
    let interleaved = |seen: &[(i64, Vec<String>)]| match (seen.first(), seen.last()) {
        (Some((_, first)), Some((_, last))) => first.len() < last.len(),
        _ => false,
    };
    let t = tenant(store, "t");
    let upto = |at: i64| -> Vec<String> {
        let query = SearchQuery {
            resource_type: "Patient".into(),
            last_updated: vec![LastUpdatedBound::Before(at + 1)],
            count: 10_000,
            ..Default::default()
        };
        store.search(t, &Visibility::Tenant, &query).unwrap().resources.into_iter().map(|r| r.id).collect()
    };
    let running = std::sync::atomic::AtomicBool::new(true);
    let seen: Vec<(i64, Vec<String>)> = std::thread::scope(|scope| {
        for writer in 0..4 {
            let running = &running;
            scope.spawn(move || {
                let mut n = 0;
                while running.load(std::sync::atomic::Ordering::Relaxed) && n < 200 {
                    put(store, t, None, patient(&format!("w{writer}-{n}")));
                    n += 1;
                }
            });
        }
        // At least 30 reservations, and on until writes are seen to have landed between two of
        // them: on a loaded machine the writer threads may not have run at all during the first
        // 30 (which once failed this test). Bounded, and checked below.
        let mut seen: Vec<(i64, Vec<String>)> = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let at = store.reserve_transaction_time().unwrap();
            seen.push((at, upto(at)));
            if seen.len() >= 30 && interleaved(&seen) || std::time::Instant::now() > deadline {
                break;
            }
        }
        running.store(false, std::sync::atomic::Ordering::Relaxed);
        seen
    });
    assert!(interleaved(&seen), "the writers wrote while times were reserved");
    for (at, ids) in seen {
        assert_eq!(upto(at), ids, "a write stamped at or before {at} committed after it was reserved");
    }
}

// ---- associated data ----

static NEXT_SET: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn associated_request(provenance: ProvenanceSelection, referenced: ReferencedTypes, depth: u32) -> AssociatedRequest {
    let sources: Vec<String> = ["Patient", "Observation", "Encounter"].map(String::from).to_vec();
    AssociatedRequest {
        set_id: format!("set-{}", NEXT_SET.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
        expires: i64::MAX,
        provenance,
        provenance_sources: sources.clone(),
        referenced,
        reference_sources: sources,
        depth,
    }
}

/// Plans an associated set and reads every part back (one resource per window): sorted
/// `Type/id` of every line, checking each part's count.
fn associated(
    store: &dyn Store,
    tenant: TenantId,
    selection: &MemberSelection,
    request: &AssociatedRequest,
) -> Vec<String> {
    let planned = store.plan_associated(tenant, selection, request, 2).unwrap();
    let mut found = Vec::new();
    for (resource_type, parts) in planned.parts {
        assert!(!parts.is_empty(), "a planned type has parts");
        for part in parts {
            assert!(part.count <= 2, "parts hold at most part_size");
            let mut reader = store.associated_reader(tenant, selection, &planned.set_id, &resource_type, part);
            let (mut text, mut written) = (Vec::new(), 0);
            loop {
                match reader.next_window(&mut text, 1).unwrap() {
                    0 => break,
                    read => written += read,
                }
            }
            assert_eq!(written, part.count, "an associated part streams exactly its planned count");
            for line in text.split(|byte| *byte == b'\n').filter(|line| !line.is_empty()) {
                let value: Value = serde_json::from_slice(line).unwrap();
                assert_eq!(value["resourceType"], resource_type.as_str());
                found.push(format!("{resource_type}/{}", value["id"].as_str().unwrap()));
            }
        }
    }
    let mut sorted = found.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), found.len(), "each associated resource once: {found:?}");
    sorted
}

fn reference(target: &str) -> Value {
    json!({"reference": target})
}

fn provenance(id: &str, targets: &[&str], agent: &str) -> Value {
    let target: Vec<Value> = targets.iter().map(|t| reference(t)).collect();
    json!({"resourceType": "Provenance", "id": id, "target": target, "recorded": "2020-01-01T00:00:00Z",
           "agent": [{"who": reference(agent)}]})
}

/// A small world: member `a`, non-member `b`; an Encounter of `a` reaching a chain
/// PractitionerRole → Practitioner/Organization → Organization → Organization; Provenance about
/// `a`'s data and about `b`'s.
fn associated_world(store: &dyn Store, tenant: TenantId) {
    for id in ["a", "b"] {
        put(store, tenant, None, patient(id));
    }
    put(store, tenant, None, json!({"resourceType": "Organization", "id": "org4"}));
    put(
        store,
        tenant,
        None,
        json!({"resourceType": "Organization", "id": "org3", "partOf": reference("Organization/org4")}),
    );
    put(
        store,
        tenant,
        None,
        json!({"resourceType": "Organization", "id": "org2", "partOf": reference("Organization/org3")}),
    );
    put(
        store,
        tenant,
        None,
        json!({"resourceType": "Organization", "id": "org1", "partOf": reference("Organization/org2")}),
    );
    for id in ["pr1", "pr5", "pr7", "pr9"] {
        put(store, tenant, None, json!({"resourceType": "Practitioner", "id": id}));
    }
    put(
        store,
        tenant,
        None,
        json!({"resourceType": "PractitionerRole", "id": "role1",
        "practitioner": reference("Practitioner/pr1"), "organization": reference("Organization/org1")}),
    );
    put(store, tenant, None, json!({"resourceType": "Organization", "id": "orgX"}));
    put(
        store,
        tenant,
        None,
        json!({"resourceType": "Encounter", "id": "e1", "status": "finished", "class": {"code": "AMB"},
        "subject": reference("Patient/a"), "participant": [{"individual": reference("PractitionerRole/role1")}],
        "serviceProvider": reference("Organization/orgX")}),
    );
    let mut o1 = observation("o1", "a", 1);
    o1["performer"] = json!([reference("Practitioner/pr5"), reference("Practitioner/missing")]);
    put(store, tenant, None, o1);
    let mut o2 = observation("o2", "b", 2);
    o2["performer"] = json!([reference("Practitioner/pr9")]);
    put(store, tenant, None, o2);
    put(store, tenant, None, provenance("prov1", &["Observation/o1"], "Practitioner/pr7"));
    put(store, tenant, None, provenance("prov2", &["Observation/o2"], "Practitioner/pr9"));
    put(store, tenant, None, provenance("prov3", &["Patient/a"], "Organization/orgX"));
    put(store, tenant, None, group("g", &["a"]));
}

pub fn associated_data_follows_references_and_provenance(store: &dyn Store) {
    let acme = tenant(store, "acme");
    let other = tenant(store, "other");
    associated_world(store, acme);
    // The other tenant has the same ids, and its member `b` reaches pr9 and prov2.
    associated_world(store, other);
    put(store, other, None, group("g", &["b"]));
    let all = associated_request(ProvenanceSelection::Relevant, ReferencedTypes::All, 3);
    let chosen = selection(store, &[("a", None)], None);
    assert_eq!(
        associated(store, acme, &chosen, &all),
        [
            // Depth 3: role1 (1), pr1 and org1 (2), org2 (3); org3 is four references away.
            "Organization/org1",
            "Organization/org2",
            "Organization/orgX",
            "Practitioner/pr1",
            "Practitioner/pr5",
            "Practitioner/pr7",
            "PractitionerRole/role1",
            "Provenance/prov1",
            "Provenance/prov3",
        ],
        "b's Observation, its Provenance and its Practitioner stay out; a dangling reference is skipped"
    );
    let shallow = associated_request(ProvenanceSelection::None, ReferencedTypes::All, 1);
    assert_eq!(
        associated(store, acme, &chosen, &shallow),
        ["Organization/orgX", "Practitioner/pr5", "PractitionerRole/role1"]
    );
    // Only named types, and only through named types.
    let organizations =
        associated_request(ProvenanceSelection::None, ReferencedTypes::Only(vec!["Organization".into()]), 3);
    assert_eq!(associated(store, acme, &chosen, &organizations), ["Organization/orgX"]);
    let provenance_only = associated_request(ProvenanceSelection::Relevant, ReferencedTypes::None, 3);
    assert_eq!(associated(store, acme, &chosen, &provenance_only), ["Provenance/prov1", "Provenance/prov3"]);
    // Latest: one Provenance per targeted resource, the last updated.
    put(store, acme, None, provenance("prov4", &["Observation/o1", "Patient/a"], "Practitioner/pr1"));
    let latest = associated_request(ProvenanceSelection::Latest, ReferencedTypes::None, 3);
    let later = selection(store, &[("a", None)], None);
    assert_eq!(associated(store, acme, &later, &latest), ["Provenance/prov4"]);
    let relevant = associated_request(ProvenanceSelection::Relevant, ReferencedTypes::None, 3);
    assert_eq!(
        associated(store, acme, &later, &relevant),
        ["Provenance/prov1", "Provenance/prov3", "Provenance/prov4"]
    );
    // The other tenant's member b: its own data only.
    let other_selection = selection(store, &[("b", None)], None);
    let other_request = associated_request(ProvenanceSelection::Relevant, ReferencedTypes::All, 3);
    assert_eq!(associated(store, other, &other_selection, &other_request), ["Practitioner/pr9", "Provenance/prov2"]);
    // A user-scoped export sees only that user's associated resources.
    let mut scoped = chosen.clone();
    scoped.visibility = Visibility::User("u".into());
    assert!(associated(store, acme, &scoped, &all).is_empty(), "nothing belongs to user u");
    // associated_ids answers from the stored set; the set is swept with the export records.
    let ids: Vec<String> = ["prov1", "prov2", "prov3"].map(String::from).to_vec();
    assert_eq!(store.associated_ids(acme, &all.set_id, "Provenance", &ids).unwrap(), ["prov1", "prov3"]);
    assert!(store.associated_ids(other, &all.set_id, "Provenance", &ids).unwrap().is_empty(), "sets are per tenant");
    // (Depth 2: not the request above, whose set a store with a plan cache would share.)
    let expiring =
        AssociatedRequest { expires: 10, ..associated_request(ProvenanceSelection::Relevant, ReferencedTypes::All, 2) };
    associated(store, acme, &chosen, &expiring);
    assert_eq!(store.associated_ids(acme, &expiring.set_id, "Provenance", &ids).unwrap().len(), 2);
    store.delete_expired_export_records(11).unwrap();
    assert!(store.associated_ids(acme, &expiring.set_id, "Provenance", &ids).unwrap().is_empty(), "swept");
    assert_eq!(store.associated_ids(acme, &all.set_id, "Provenance", &ids).unwrap().len(), 2, "unexpired kept");
}

/// A repeated plan is answered from the plan cache only while no member's compartment
/// changed since it was computed: writes elsewhere keep it, every kind of write to a member's
/// compartment (new resource, update, moving out, deletion, a first resource of a member that
/// had none) replaces it, and an earlier transaction time never gets a later plan. A Group
/// written over the members (in their compartments, never exported from them) keeps it.
pub fn plans_are_reused_exactly_while_the_members_compartments_are_unchanged(store: &dyn Store) {
    let tenant = store.create_tenant("t").unwrap().id;
    let put = |id: &str, patient: &str| {
        let body = serde_json::json!({"resourceType": "Observation", "id": id,
                                      "subject": {"reference": format!("Patient/{patient}")}});
        let op = WriteOp::Update { resource_type: "Observation".into(), id: id.into(), body, if_match: None };
        store.write(tenant, None, &[op], WriteMode::Transaction).unwrap().remove(0).unwrap();
    };
    let delete = |id: &str| {
        let op = WriteOp::Delete { resource_type: "Observation".into(), id: id.into() };
        store.write(tenant, None, &[op], WriteMode::Transaction).unwrap().remove(0).unwrap();
    };
    // Members a and z (z has no data yet); c is not a member.
    let selection_at = |at| MemberSelection {
        members: vec![("a".into(), None), ("z".into(), None)].into(),
        since: None,
        until: None,
        transaction_time: at,
        visibility: Visibility::Tenant,
        scope: Default::default(),
        filters: Default::default(),
    };
    let count = |at| -> u64 {
        let plan = store.plan_parts(tenant, &selection_at(at), &["Observation".to_owned()], 100).unwrap();
        plan.iter().flat_map(|(_, parts)| parts).map(|part| part.count).sum()
    };
    let hits = || store.plan_cache_stats().expect("a plan cache").hits;

    put("o1", "a");
    let first = store.reserve_transaction_time().unwrap();
    assert_eq!(count(first), 1);
    assert_eq!(hits(), 0);
    put("o2", "c");
    assert_eq!(count(store.reserve_transaction_time().unwrap()), 1);
    assert_eq!(hits(), 1, "a write outside the members' compartments keeps the plan");

    put("o3", "a");
    assert_eq!(count(store.reserve_transaction_time().unwrap()), 2, "a new resource of a member");
    assert_eq!(hits(), 1);
    assert_eq!(count(first), 1, "an earlier transaction time is planned as of then");
    put("o2", "a");
    assert_eq!(count(store.reserve_transaction_time().unwrap()), 3, "moved into a member's compartment");
    put("o2", "c");
    assert_eq!(count(store.reserve_transaction_time().unwrap()), 2, "moved out");
    delete("o3");
    assert_eq!(count(store.reserve_transaction_time().unwrap()), 1, "deleted");
    put("o4", "z");
    assert_eq!(count(store.reserve_transaction_time().unwrap()), 2, "the first resource of a member");
    let misses = store.plan_cache_stats().expect("a plan cache").misses;
    assert_eq!(count(store.reserve_transaction_time().unwrap()), 2);
    assert_eq!(store.plan_cache_stats().expect("a plan cache").misses, misses, "and then the plan is reused again");

    // `deleted[]` follows the same rule.
    let since = store.reserve_transaction_time().unwrap();
    let deleted = |at| {
        let selection =
            MemberSelection { members: vec![("a".into(), Some(since))].into(), since: Some(since), ..selection_at(at) };
        store.deleted_in_compartments(tenant, &selection, "Observation").unwrap().len()
    };
    assert_eq!(deleted(store.reserve_transaction_time().unwrap()), 0);
    put("o5", "c");
    let before = hits();
    assert_eq!(deleted(store.reserve_transaction_time().unwrap()), 0);
    assert_eq!(hits(), before + 1);
    delete("o1");
    assert_eq!(deleted(store.reserve_transaction_time().unwrap()), 1, "a member's deletion is listed");

    // A `_since` manifest asks for every type's list and the plan: all of them stay cached
    // together, so the next one is answered from the cache throughout. (Its types are a Group
    // export's: every compartment type but Group, see below.)
    let types: Vec<String> = bulkhead_fhir::compartment::compartment_types()
        .iter()
        .filter(|name| **name != "Group")
        .map(|name| name.to_string())
        .collect();
    let since_manifest = |at| {
        let selection =
            MemberSelection { members: vec![("a".into(), Some(since))].into(), since: Some(since), ..selection_at(at) };
        for resource_type in &types {
            store.deleted_in_compartments(tenant, &selection, resource_type).unwrap();
        }
        store.plan_parts(tenant, &selection, &types, 100).unwrap();
    };
    since_manifest(store.reserve_transaction_time().unwrap());
    let before = hits();
    since_manifest(store.reserve_transaction_time().unwrap());
    assert_eq!(hits(), before + types.len() as u64 + 1, "every list and the plan reused");

    // A Group is in each member's compartment, but no export reads members' Groups: writing,
    // changing and deleting a cohort of the members keeps their plans...
    let group = |members: &[&str]| {
        let member: Vec<_> =
            members.iter().map(|id| serde_json::json!({"entity": {"reference": format!("Patient/{id}")}})).collect();
        let body = serde_json::json!({"resourceType": "Group", "id": "cohort", "type": "person", "actual": true,
            "member": member});
        let op = WriteOp::Update { resource_type: "Group".into(), id: "cohort".into(), body, if_match: None };
        store.write(tenant, None, &[op], WriteMode::Transaction).unwrap().remove(0).unwrap();
    };
    let observations = count(store.reserve_transaction_time().unwrap());
    for write in [&["a", "z", "new"][..], &["a"][..], &["z", "c"][..]] {
        group(write);
        let before = hits();
        assert_eq!(count(store.reserve_transaction_time().unwrap()), observations);
        assert_eq!(hits(), before + 1, "a cohort written over the members keeps their plan");
    }
    let op = WriteOp::Delete { resource_type: "Group".into(), id: "cohort".into() };
    store.write(tenant, None, &[op], WriteMode::Transaction).unwrap().remove(0).unwrap();
    let before = hits();
    assert_eq!(count(store.reserve_transaction_time().unwrap()), observations);
    assert_eq!(hits(), before + 1, "and so does deleting it");
    // ...so a plan over Group rows is never taken from the cache, and stays exact.
    let groups = |at| -> u64 {
        let plan = store.plan_parts(tenant, &selection_at(at), &["Group".to_owned()], 100).unwrap();
        plan.iter().flat_map(|(_, parts)| parts).map(|part| part.count).sum()
    };
    group(&["a"]);
    assert_eq!(groups(store.reserve_transaction_time().unwrap()), 1);
    group(&["c"]);
    let before = hits();
    assert_eq!(groups(store.reserve_transaction_time().unwrap()), 0, "the cohort left the members' compartments");
    assert_eq!(hits(), before, "not from the cache");
}

/// An associated set (Provenance and referenced resources) is reused from the plan cache only
/// while neither the members' compartments nor any type it reaches outside them changed: a
/// referenced Practitioner updated, deleted or re-created, a Provenance about a member's
/// Observation (not in any compartment), and a swept earlier copy each make it recompute, and
/// every reused set reads (under the set id the store answers) exactly what a fresh one would.
pub fn associated_sets_are_reused_exactly_while_nothing_they_reach_changed(store: &dyn Store) {
    use std::collections::BTreeSet;
    let tenant = store.create_tenant("t").unwrap().id;
    let write = |body: serde_json::Value| {
        let (resource_type, id) = (body["resourceType"].as_str().unwrap(), body["id"].as_str().unwrap());
        let op =
            WriteOp::Update { resource_type: resource_type.into(), id: id.into(), body: body.clone(), if_match: None };
        store.write(tenant, None, &[op], WriteMode::Transaction).unwrap().remove(0).unwrap();
    };
    let delete = |resource_type: &str, id: &str| {
        let op = WriteOp::Delete { resource_type: resource_type.into(), id: id.into() };
        store.write(tenant, None, &[op], WriteMode::Transaction).unwrap().remove(0).unwrap();
    };
    let observation = |id: &str, patient: &str, practitioner: &str| {
        write(serde_json::json!({"resourceType": "Observation", "id": id, "status": "final", "code": {"text": "x"},
            "subject": {"reference": format!("Patient/{patient}")},
            "performer": [{"reference": format!("Practitioner/{practitioner}")}]}));
    };
    let practitioner = |id: &str, name: &str| {
        write(serde_json::json!({"resourceType": "Practitioner", "id": id, "name": [{"family": name}]}));
    };
    let sets = std::cell::Cell::new(0);
    let request = |referenced: ReferencedTypes| {
        sets.set(sets.get() + 1);
        AssociatedRequest {
            set_id: format!("set{}", sets.get()),
            expires: i64::MAX,
            provenance: ProvenanceSelection::Relevant,
            provenance_sources: vec!["Observation".into(), "Patient".into()],
            referenced,
            reference_sources: vec!["Observation".into()],
            depth: 3,
        }
    };
    // The set at a new transaction time, as read back through its own set id: each line's
    // `type/id/name-or-target`.
    let associated_as = |referenced: ReferencedTypes| -> BTreeSet<String> {
        let at = store.reserve_transaction_time().unwrap();
        let selection = MemberSelection {
            members: vec![("a".into(), None)].into(),
            since: None,
            until: None,
            transaction_time: at,
            visibility: Visibility::Tenant,
            scope: Default::default(),
            filters: Default::default(),
        };
        let request = request(referenced);
        let plan = store.plan_associated(tenant, &selection, &request, 1).unwrap();
        let mut lines = BTreeSet::new();
        for (resource_type, parts) in plan.parts {
            for part in parts {
                let mut reader = store.associated_reader(tenant, &selection, &plan.set_id, &resource_type, part);
                let mut out = Vec::new();
                while reader.next_window(&mut out, 1 << 20).unwrap() > 0 {}
                let read: Vec<&str> = std::str::from_utf8(&out).unwrap().lines().collect();
                assert_eq!(read.len() as u64, part.count, "a part holds its planned count");
                for line in read {
                    let value: serde_json::Value = serde_json::from_str(line).unwrap();
                    let detail = value["name"][0]["family"].as_str().or(value["target"][0]["reference"].as_str());
                    lines.insert(format!(
                        "{}/{}/{}",
                        value["resourceType"].as_str().unwrap(),
                        value["id"].as_str().unwrap(),
                        detail.unwrap_or("")
                    ));
                }
            }
        }
        lines
    };
    let associated = || associated_as(ReferencedTypes::All);
    let set = |lines: &[&str]| lines.iter().map(|line| line.to_string()).collect::<BTreeSet<_>>();
    let stats = || {
        let stats = store.plan_cache_stats().expect("a plan cache");
        (stats.associated_hits, stats.associated_misses)
    };

    write(serde_json::json!({"resourceType": "Patient", "id": "a"}));
    practitioner("pr1", "One");
    observation("o1", "a", "pr1");
    assert_eq!(associated(), set(&["Practitioner/pr1/One"]));
    assert_eq!(stats(), (0, 1));
    assert_eq!(associated(), set(&["Practitioner/pr1/One"]));
    assert_eq!(stats(), (1, 1), "nothing changed: reused");
    observation("o2", "c", "pr2");
    assert_eq!(associated(), set(&["Practitioner/pr1/One"]));
    assert_eq!(stats(), (2, 1), "a non-member's new Observation changes nothing the set reaches");

    practitioner("pr1", "Renamed");
    assert_eq!(associated(), set(&["Practitioner/pr1/Renamed"]), "a referenced Practitioner updated");
    assert_eq!(stats(), (2, 2));
    delete("Practitioner", "pr1");
    assert_eq!(associated(), set(&[]), "a referenced Practitioner deleted");
    practitioner("pr1", "Back");
    assert_eq!(associated(), set(&["Practitioner/pr1/Back"]), "and created again");
    observation("o3", "a", "pr3");
    assert_eq!(associated(), set(&["Practitioner/pr1/Back"]), "a member's new Observation, dangling reference");
    practitioner("pr3", "Three");
    assert_eq!(associated(), set(&["Practitioner/pr1/Back", "Practitioner/pr3/Three"]), "the dangling one created");
    assert_eq!(stats(), (2, 6));

    // A Provenance about the member's Observation only: in no patient's compartment.
    write(serde_json::json!({"resourceType": "Provenance", "id": "v1", "recorded": "2020-01-01T00:00:00Z",
        "target": [{"reference": "Observation/o1"}], "agent": [{"who": {"reference": "Practitioner/pr3"}}]}));
    let with_provenance = set(&["Practitioner/pr1/Back", "Practitioner/pr3/Three", "Provenance/v1/Observation/o1"]);
    assert_eq!(associated(), with_provenance, "a new Provenance about a cohort resource");
    assert_eq!(associated(), with_provenance);
    assert_eq!(stats(), (3, 7));
    delete("Provenance", "v1");
    assert_eq!(associated(), set(&["Practitioner/pr1/Back", "Practitioner/pr3/Three"]), "the Provenance deleted");
    assert_eq!(stats(), (3, 8));

    // A type the request cannot reach changes nothing; one it can reach does.
    let only = || ReferencedTypes::Only(vec!["Practitioner".into()]);
    assert_eq!(associated_as(only()), set(&["Practitioner/pr1/Back", "Practitioner/pr3/Three"]));
    write(serde_json::json!({"resourceType": "Organization", "id": "org1"}));
    assert_eq!(associated_as(only()), set(&["Practitioner/pr1/Back", "Practitioner/pr3/Three"]));
    assert_eq!(stats(), (4, 9), "an Organization written: a Practitioner-only set is reused");
    assert_eq!(associated(), set(&["Practitioner/pr1/Back", "Practitioner/pr3/Three"]));
    assert_eq!(stats(), (4, 10), "but a set of every referenced type is not");

    // The stored copy a cached set names is swept: the set is computed again.
    assert_eq!(associated(), set(&["Practitioner/pr1/Back", "Practitioner/pr3/Three"]));
    assert_eq!(stats(), (5, 10));
    store.delete_expired_export_records(i64::MAX).unwrap();
    assert_eq!(associated(), set(&["Practitioner/pr1/Back", "Practitioner/pr3/Three"]));
    assert_eq!(stats(), (5, 11), "swept: recomputed");
    assert_eq!(associated(), set(&["Practitioner/pr1/Back", "Practitioner/pr3/Three"]));
    assert_eq!(stats(), (6, 11));
}

/// A set shared by a later export (a plan cache's reuse) stays until the later export expires
/// whatever the earlier one's expiry, a shorter later expiry never shortens it, and it goes once
/// the last one has expired.
pub fn shared_associated_sets_live_until_their_last_export_expires(store: &dyn Store) {
    let acme = tenant(store, "acme");
    associated_world(store, acme);
    let ids: Vec<String> = ["prov1", "prov2", "prov3"].map(String::from).to_vec();
    let plan = |expires| {
        let request =
            AssociatedRequest { expires, ..associated_request(ProvenanceSelection::Relevant, ReferencedTypes::All, 3) };
        store.plan_associated(acme, &selection(store, &[("a", None)], None), &request, 100).unwrap()
    };
    let held = |set_id: &str| store.associated_ids(acme, set_id, "Provenance", &ids).unwrap();
    let first = plan(10);
    let second = plan(1_000);
    let third = plan(20);
    assert_eq!((&first.parts, &second.parts), (&third.parts, &third.parts), "the same set each time");
    if store.plan_cache_stats().is_some() {
        assert_eq!((&first.set_id, &second.set_id), (&third.set_id, &third.set_id), "shared, not copied");
    }
    store.delete_expired_export_records(21).unwrap();
    for planned in [&second, &third] {
        assert_eq!(held(&planned.set_id), ["prov1", "prov3"], "kept while an export sharing it lives");
    }
    if first.set_id != second.set_id {
        assert!(held(&first.set_id).is_empty(), "an unshared set goes at its own expiry");
    }
    store.delete_expired_export_records(1_001).unwrap();
    assert!(held(&second.set_id).is_empty(), "swept once the last export expired");
    let again = plan(2_000);
    assert_eq!(again.parts, second.parts, "a swept set is computed again");
    assert_eq!(held(&again.set_id), ["prov1", "prov3"]);
}

pub fn associated_data_is_as_of_the_transaction_time(store: &dyn Store) {
    let acme = tenant(store, "acme");
    associated_world(store, acme);
    let fresh = || associated_request(ProvenanceSelection::Relevant, ReferencedTypes::All, 1);
    let before = selection(store, &[("a", None)], None);
    // After the transaction time: the Encounter re-pointed, an Organization deleted, a new
    // Provenance, and prov1 retargeted to b's Observation.
    put(
        store,
        acme,
        None,
        json!({"resourceType": "Encounter", "id": "e1", "status": "finished", "class": {"code": "AMB"},
        "subject": reference("Patient/a"), "participant": [{"individual": reference("Practitioner/pr9")}]}),
    );
    delete(store, acme, "Organization", "orgX");
    put(store, acme, None, provenance("prov5", &["Encounter/e1"], "Practitioner/pr1"));
    put(store, acme, None, provenance("prov1", &["Observation/o2"], "Practitioner/pr7"));
    let expected_before = [
        "Organization/orgX",
        "Practitioner/pr5",
        "Practitioner/pr7",
        "PractitionerRole/role1",
        "Provenance/prov1",
        "Provenance/prov3",
    ];
    assert_eq!(associated(store, acme, &before, &fresh()), expected_before, "planned after later writes: as of T");
    let after = selection(store, &[("a", None)], None);
    assert_eq!(
        associated(store, acme, &after, &fresh()),
        ["Practitioner/pr1", "Practitioner/pr5", "Practitioner/pr9", "Provenance/prov3", "Provenance/prov5"]
    );
    // A set planned at T reads the versions at T, whatever is written between planning and reading.
    let all = fresh();
    let planned = store.plan_associated(acme, &before, &all, 100).unwrap();
    put(store, acme, None, json!({"resourceType": "Practitioner", "id": "pr5", "name": [{"family": "Later"}]}));
    for (resource_type, parts) in planned.parts {
        let mut reader = store.associated_reader(acme, &before, &planned.set_id, &resource_type, parts[0]);
        let mut text = Vec::new();
        while reader.next_window(&mut text, 1 << 20).unwrap() > 0 {}
        let text = String::from_utf8(text).unwrap();
        assert!(!text.contains("Later"), "{text}");
        if resource_type == "Organization" {
            assert!(text.contains("orgX"), "a resource deleted since T is read at its version then");
        }
    }
    // Deleting the Encounter closes its references.
    delete(store, acme, "Encounter", "e1");
    let gone = selection(store, &[("a", None)], None);
    assert!(!associated(store, acme, &gone, &fresh()).contains(&"Practitioner/pr9".to_owned()));
}

pub fn associated_data_follows_since_rules(store: &dyn Store) {
    let acme = tenant(store, "acme");
    for id in ["a", "c"] {
        put(store, acme, None, patient(id));
    }
    for id in ["pr1", "pr2", "pr3", "pr4"] {
        put(store, acme, None, json!({"resourceType": "Practitioner", "id": id}));
    }
    let performed = |id: &str, subject: &str, by: &str, value: i64| {
        let mut body = observation(id, subject, value);
        body["performer"] = json!([reference(&format!("Practitioner/{by}"))]);
        body
    };
    put(store, acme, None, performed("o1", "a", "pr1", 1));
    put(store, acme, None, performed("o2", "a", "pr3", 1));
    put(store, acme, None, performed("o4", "c", "pr4", 1));
    put(store, acme, None, provenance("prov1", &["Observation/o1"], "Practitioner/pr1"));
    let since = store.reserve_transaction_time().unwrap();
    // Since: o3 (new) references the unchanged pr2; pr3 changed; prov1 unchanged.
    put(store, acme, None, performed("o3", "a", "pr2", 1));
    put(store, acme, None, json!({"resourceType": "Practitioner", "id": "pr3", "active": true}));
    let all = || associated_request(ProvenanceSelection::Relevant, ReferencedTypes::All, 3);
    // a was a member at `since`; c joined since (full history).
    let chosen = selection(store, &[("a", Some(since)), ("c", None)], Some(since));
    assert_eq!(
        associated(store, acme, &chosen, &all()),
        ["Practitioner/pr2", "Practitioner/pr3", "Practitioner/pr4"],
        "unchanged pr1 and prov1 reached only through unchanged data stay out"
    );
    // Changing the Observation the Provenance is about brings the Provenance (and its agent).
    put(store, acme, None, performed("o1", "a", "pr1", 2));
    let later = selection(store, &[("a", Some(since)), ("c", None)], Some(since));
    assert_eq!(
        associated(store, acme, &later, &all()),
        ["Practitioner/pr1", "Practitioner/pr2", "Practitioner/pr3", "Practitioner/pr4", "Provenance/prov1"]
    );
    // `_until` applies too: only what the new member's full history reaches, updated before it.
    let mut until = later.clone();
    until.until = Some(since);
    assert_eq!(associated(store, acme, &until, &all()), ["Practitioner/pr4"]);
}

fn versions(store: &dyn Store, t: TenantId, resource_type: &str, id: &str) -> Vec<i64> {
    store.history(t, &Visibility::Tenant, resource_type, id).unwrap().iter().map(|v| v.version).collect()
}

fn audit_record(
    tenant: TenantId,
    time: i64,
    client: &str,
    action: &str,
    target: &str,
    patients: &[&str],
) -> AuditRecord {
    AuditRecord {
        seq: 0,
        time,
        tenant,
        client: client.into(),
        user: Some("u1".into()),
        peer: Some("127.0.0.1:5000".into()),
        request_id: format!("req-{time}"),
        action: action.into(),
        target: target.into(),
        outcome: "success".into(),
        status: 200,
        detail: r#"{"k":"v"}"#.into(),
        patients: patients.iter().map(|id| id.to_string()).collect(),
        cohort: None,
    }
}

fn audit_query(limit: usize) -> AuditQuery {
    AuditQuery { limit, ..AuditQuery::default() }
}

fn audited(store: &dyn Store, tenant: TenantId, query: AuditQuery) -> Vec<(String, String)> {
    let found = store.audit_records(tenant, &query).unwrap();
    found.into_iter().map(|record| (record.action, record.target)).collect()
}

pub fn audit_records_are_per_tenant_filtered_and_paged(store: &dyn Store) {
    let (a, b) = (tenant(store, "a"), tenant(store, "b"));
    let records = [
        audit_record(a, 100, "c1", "read", "Patient/p1", &["p1"]),
        audit_record(b, 150, "c9", "read", "Patient/p1", &["p1"]),
        audit_record(a, 200, "c2", "search", "Observation", &["p1", "p2"]),
        audit_record(a, 300, "c1", "export.kickoff", "Group/g/_history/1", &[]),
    ];
    store.append_audit(&records).unwrap();
    let all = store.audit_records(a, &audit_query(100)).unwrap();
    assert_eq!(all.len(), 3, "only tenant a's records: {all:?}");
    assert!(all.windows(2).all(|pair| pair[0].seq < pair[1].seq), "append order");
    let first = AuditRecord { seq: all[0].seq, ..records[0].clone() };
    assert_eq!(all[0], first, "every field round-trips");
    assert_eq!(all[1].patients, vec!["p1", "p2"]);
    assert_eq!(audited(store, b, audit_query(100)), vec![("read".into(), "Patient/p1".into())]);

    let since = AuditQuery { since: Some(200), ..audit_query(100) };
    assert_eq!(audited(store, a, since).len(), 2);
    let client = AuditQuery { client: Some("c1".into()), ..audit_query(100) };
    assert_eq!(
        audited(store, a, client).iter().map(|(action, _)| action.as_str()).collect::<Vec<_>>(),
        ["read", "export.kickoff"]
    );
    let action = AuditQuery { action: Some("search".into()), ..audit_query(100) };
    assert_eq!(audited(store, a, action), vec![("search".into(), "Observation".into())]);
    let patient = AuditQuery { patient: Some("p2".into()), ..audit_query(100) };
    assert_eq!(audited(store, a, patient), vec![("search".into(), "Observation".into())]);
    let nobody = AuditQuery { patient: Some("p3".into()), ..audit_query(100) };
    assert!(audited(store, a, nobody).is_empty());

    // Keyset paging: two at a time, then the rest.
    let page = store.audit_records(a, &audit_query(2)).unwrap();
    assert_eq!(page.len(), 2);
    let rest = store.audit_records(a, &AuditQuery { after_seq: Some(page[1].seq), ..audit_query(2) }).unwrap();
    assert_eq!(rest.iter().map(|record| record.time).collect::<Vec<_>>(), [300]);
}

pub fn audited_writes_commit_with_their_records(store: &dyn Store) {
    let t = tenant(store, "t");
    let describe = |results: &[Result<Written, StoreError>]| -> Vec<AuditRecord> {
        results
            .iter()
            .map(|result| match result {
                Ok(written) => {
                    audit_record(t, 1, "c", "update", &format!("{}/{}", written.resource_type, written.id), &[])
                }
                Err(_) => AuditRecord { outcome: "failure".into(), ..audit_record(t, 1, "c", "update", "?", &[]) },
            })
            .collect()
    };
    let ops = [
        WriteOp::Update { resource_type: "Patient".into(), id: "p1".into(), body: patient("p1"), if_match: None },
        WriteOp::Update { resource_type: "Patient".into(), id: "p2".into(), body: patient("p2"), if_match: None },
    ];
    store.write_audited(t, None, &ops, WriteMode::Transaction, &describe).unwrap();
    assert_eq!(
        audited(store, t, audit_query(100)),
        vec![("update".into(), "Patient/p1".into()), ("update".into(), "Patient/p2".into())]
    );

    // A failed transaction stores neither its writes nor its records.
    let failing = [
        WriteOp::Update { resource_type: "Patient".into(), id: "p3".into(), body: patient("p3"), if_match: None },
        WriteOp::Create { resource_type: "Patient".into(), id: "p1".into(), body: patient("p1") },
    ];
    assert!(store.write_audited(t, None, &failing, WriteMode::Transaction, &describe).is_err());
    assert!(store.read(t, &Visibility::Tenant, "Patient", "p3").unwrap().is_none());
    assert_eq!(store.audit_records(t, &audit_query(100)).unwrap().len(), 2, "no record of the rolled-back write");

    // A batch: the records see each entry's own result.
    let results = store.write_audited(t, None, &failing, WriteMode::Batch, &describe).unwrap();
    assert!(results[0].is_ok() && results[1].is_err());
    let outcomes: Vec<String> =
        store.audit_records(t, &audit_query(100)).unwrap().into_iter().map(|r| r.outcome).collect();
    assert_eq!(outcomes, ["success", "success", "success", "failure"]);

    // Plain writes record nothing.
    put(store, t, None, patient("p4"));
    assert_eq!(store.audit_records(t, &audit_query(100)).unwrap().len(), 4);
}

pub fn audit_finds_exports_through_group_membership_at_their_time(store: &dyn Store) {
    let t = tenant(store, "t");
    put(store, t, None, group("g", &["a", "b"]));
    let first = store.reserve_transaction_time().unwrap();
    put(store, t, None, group("g", &["b", "c"]));
    let second = store.reserve_transaction_time().unwrap();
    let export = |time: i64, target: &str| AuditRecord {
        cohort: Some(AuditCohort { group_id: "g".into(), transaction_time: time }),
        ..audit_record(t, time, "c", "export.kickoff", target, &[])
    };
    store.append_audit(&[export(first, "first"), export(second, "second")]).unwrap();
    let for_patient = |id: &str| {
        let query = AuditQuery { patient: Some(id.into()), ..audit_query(100) };
        store.audit_records(t, &query).unwrap().into_iter().map(|record| record.target).collect::<Vec<_>>()
    };
    assert_eq!(for_patient("a"), ["first"], "a left the Group before the second export");
    assert_eq!(for_patient("b"), ["first", "second"]);
    assert_eq!(for_patient("c"), ["second"], "c joined after the first export");
    assert!(for_patient("z").is_empty());
    let other = tenant(store, "other");
    assert!(store
        .audit_records(other, &AuditQuery { patient: Some("b".into()), ..audit_query(100) })
        .unwrap()
        .is_empty());
}

/// A patient query finds the records listing exactly that id: not one whose id merely contains
/// it, or is contained in it, whatever characters the ids hold.
pub fn audit_patient_queries_match_whole_ids_only(store: &dyn Store) {
    let t = tenant(store, "t");
    let odd = ["p1", "p10", "xp1", "a\"b", "\"p1\"", "c,d", "\\", "\u{1}", "ü"];
    let records: Vec<AuditRecord> =
        odd.iter().map(|id| audit_record(t, 100, "c", "read", &format!("Patient/{id}"), &[id])).collect();
    store.append_audit(&records).unwrap();
    store.append_audit(&[audit_record(t, 200, "c", "search", "Observation", &["b", "p1", "q"])]).unwrap();
    for id in odd {
        let query = AuditQuery { patient: Some(id.into()), ..audit_query(100) };
        let mut found: Vec<String> = store.audit_records(t, &query).unwrap().into_iter().map(|r| r.target).collect();
        found.retain(|target| target != "Observation");
        assert_eq!(found, [format!("Patient/{id}")], "patient {id:?}");
    }
    let of_p1 = AuditQuery { patient: Some("p1".into()), ..audit_query(100) };
    assert_eq!(audited(store, t, of_p1).len(), 2, "the search lists p1 among others");
    for absent in ["p", "1", "b\"", ",", "\"", "c", "d"] {
        let query = AuditQuery { patient: Some(absent.into()), ..audit_query(100) };
        assert!(store.audit_records(t, &query).unwrap().is_empty(), "patient {absent:?} is in no record");
    }
}

pub fn audit_records_are_pruned_by_age(store: &dyn Store) {
    let (a, b) = (tenant(store, "a"), tenant(store, "b"));
    store
        .append_audit(&[
            audit_record(a, 100, "c", "read", "Patient/old", &["old"]),
            audit_record(b, 150, "c", "read", "Patient/old", &["old"]),
            audit_record(a, 200, "c", "read", "Patient/new", &["new"]),
        ])
        .unwrap();
    assert_eq!(store.prune_audit(200).unwrap(), 2, "both tenants' records before 200");
    assert_eq!(audited(store, a, audit_query(100)), vec![("read".into(), "Patient/new".into())]);
    assert!(store.audit_records(b, &audit_query(100)).unwrap().is_empty());
    assert!(store
        .audit_records(a, &AuditQuery { patient: Some("old".into()), ..audit_query(100) })
        .unwrap()
        .is_empty());
    assert_eq!(store.prune_audit(200).unwrap(), 0);
}

/// Versions superseded before the horizon, tombstones, closed compartment rows and ended
/// memberships go; what was current at the horizon, and everything after it, stays; the
/// horizon is recorded and never moves back.
pub fn pruning_removes_history_before_the_horizon_only(store: &dyn Store) {
    let t = tenant(store, "t");
    assert_eq!(store.history_horizon().unwrap(), None);
    put(store, t, None, patient("p1"));
    put(store, t, None, patient("p2"));
    put(store, t, None, observation("o1", "p1", 1));
    put(store, t, None, observation("o1", "p1", 2));
    put(store, t, None, observation("o2", "p1", 1));
    delete(store, t, "Observation", "o2");
    put(store, t, None, group("g", &["p1"]));
    put(store, t, None, group("g", &[]));
    put(store, t, None, observation("o3", "p1", 1));
    let moved = put(store, t, None, observation("o3", "p2", 1));
    let cutoff = moved.last_updated + 1;
    put(store, t, None, observation("o1", "p1", 3));
    // A second tenant's history goes by the same rule and is not mixed up with the first's.
    let other = tenant(store, "other");
    put(store, other, None, observation("o1", "p1", 1));

    let report = store.prune_history(cutoff, cutoff, 2).unwrap();
    assert_eq!(report.horizon, cutoff);
    assert_eq!(store.history_horizon().unwrap(), Some(cutoff));
    // Versions: o1 v1, o2 v1, g v1, o3 v1 (o1 v2 was current at the horizon). Closed compartment
    // rows: o3 in p1's, g in p1's (a Group is in its members' compartments).
    assert_eq!((report.versions, report.tombstones, report.compartment_rows, report.memberships), (4, 1, 2, 1));
    assert_eq!(versions(store, t, "Observation", "o1"), vec![3, 2]);
    assert_eq!(versions(store, t, "Observation", "o3"), vec![2]);
    assert_eq!(versions(store, t, "Group", "g"), vec![2]);
    assert!(store.read(t, &Visibility::Tenant, "Observation", "o2").unwrap().is_none(), "tombstone removed");
    assert!(store.history(t, &Visibility::Tenant, "Observation", "o2").unwrap().is_empty());
    assert_eq!(versions(store, other, "Observation", "o1"), vec![1]);
    for (resource_type, id) in [("Patient", "p1"), ("Patient", "p2"), ("Group", "g")] {
        assert!(store.read(t, &Visibility::Tenant, resource_type, id).unwrap().is_some(), "{id} is current");
    }
    // Exports at or after the horizon read what they read before.
    let o1_at_cutoff = store.version_at(t, "Observation", "o1", cutoff).unwrap().unwrap();
    assert_eq!(o1_at_cutoff.version, 2);
    assert!(store.members_at(t, "g", cutoff).unwrap().is_empty());
    let frozen = selection(store, &[("p1", None), ("p2", None)], None);
    assert_eq!(export_ids(store, t, &frozen, "Observation"), vec!["o1=3", "o3=1"]);
    // A later prune with an earlier cutoff leaves the recorded horizon where it was.
    store.prune_history(cutoff - 1_000_000, cutoff, 100).unwrap();
    assert_eq!(store.history_horizon().unwrap(), Some(cutoff));
    // Deleted and re-created: a new resource.
    assert_eq!(put(store, t, None, observation("o2", "p1", 9)).version, 1);
}

/// An unexpired export record (or a planning job) older than the cutoff holds the horizon back
/// to its creation, so its file URLs still read their snapshot; once expired it no longer does.
pub fn pruning_keeps_what_unexpired_exports_need(store: &dyn Store) {
    let t = tenant(store, "t");
    let first = put(store, t, None, observation("o1", "p1", 1));
    let export_created = first.last_updated + 1;
    let record = ExportRecord { id: "r1".into(), created: export_created, expires: i64::MAX - 1, plan: "{}".into() };
    store.create_export_record(t, &record).unwrap();
    let second = put(store, t, None, observation("o1", "p1", 2));
    let cutoff = second.last_updated + 10;
    let report = store.prune_history(cutoff, cutoff, 10).unwrap();
    assert_eq!(report.horizon, export_created);
    assert_eq!((report.versions, store.history_horizon().unwrap()), (0, Some(export_created)));
    assert_eq!(store.version_at(t, "Observation", "o1", export_created).unwrap().unwrap().version, 1);

    let job = ExportJob { created: export_created, expires: i64::MAX, ..export_job("j1", "c", Visibility::Tenant, 0) };
    let job = ExportJob { state: ExportJobState::Planning, manifest: String::new(), ..job };
    store.create_export_job(t, &job).unwrap();
    assert_eq!(store.delete_expired_export_records(i64::MAX).unwrap(), 1);
    assert_eq!(store.prune_history(cutoff, cutoff, 10).unwrap().horizon, export_created, "the planning job");
    store.delete_export_job(t, "j1").unwrap();
    let report = store.prune_history(cutoff, cutoff, 10).unwrap();
    assert_eq!((report.horizon, report.versions), (cutoff, 1));
    assert_eq!(versions(store, t, "Observation", "o1"), vec![2]);
}

pub fn storage_bytes_are_reported(store: &dyn Store) {
    let t = tenant(store, "t");
    put(store, t, None, patient("p1"));
    let bytes = store.storage_bytes().unwrap();
    assert!(bytes.database + bytes.wal > 0, "{bytes:?}");
}

pub fn associated_data_is_exact_after_pruning(store: &dyn Store) {
    let acme = tenant(store, "acme");
    put(store, acme, None, patient("a"));
    for id in ["pr1", "pr2", "pr3"] {
        put(store, acme, None, json!({"resourceType": "Practitioner", "id": id}));
    }
    let encounter = |practitioner: &str| {
        json!({"resourceType": "Encounter", "id": "e1", "status": "finished", "class": {"code": "AMB"},
               "subject": reference("Patient/a"), "participant": [{"individual": reference(&format!("Practitioner/{practitioner}"))}]})
    };
    put(store, acme, None, encounter("pr1"));
    put(store, acme, None, provenance("gone", &["Encounter/e1"], "Practitioner/pr3"));
    delete(store, acme, "Provenance", "gone");
    put(store, acme, None, encounter("pr2"));
    put(store, acme, None, provenance("kept", &["Encounter/e1"], "Practitioner/pr1"));
    let cutoff = store.reserve_transaction_time().unwrap() + 1;
    store.prune_history(cutoff, cutoff + 1, 2).unwrap();
    let request = associated_request(ProvenanceSelection::Relevant, ReferencedTypes::All, 3);
    let after = selection(store, &[("a", None)], None);
    assert_eq!(
        associated(store, acme, &after, &request),
        ["Practitioner/pr1", "Practitioner/pr2", "Provenance/kept"],
        "pruned history leaves the references of current versions intact"
    );
}

/// A system-level selection reads every resource of a type in the tenant (compartment or not)
/// as of the transaction time, with `_since`, deletions and user scope, and nothing of another
/// tenant.
pub fn tenant_scope_selects_every_resource_of_a_type(store: &dyn Store) {
    let acme = tenant(store, "acme");
    let other = tenant(store, "other");
    put(store, acme, None, patient("a"));
    put(store, acme, None, observation("o1", "a", 1));
    put(store, acme, None, observation("o2", "nobody", 2)); // in no stored patient's compartment
    put(store, acme, None, json!({"resourceType": "Practitioner", "id": "dr1"}));
    put(store, acme, Some("u"), json!({"resourceType": "Practitioner", "id": "dr2"}));
    put(store, other, None, json!({"resourceType": "Practitioner", "id": "dr9"}));
    let everything =
        MemberSelection { members: Default::default(), scope: SelectionScope::Tenant, ..selection(store, &[], None) };
    put(store, acme, None, json!({"resourceType": "Practitioner", "id": "dr3"})); // after the transaction time
    put(store, acme, None, observation("o1", "a", 10)); // changed after it: exported as it was
    assert_eq!(export_ids(store, acme, &everything, "Practitioner"), ["dr1", "dr2"]);
    assert_eq!(export_ids(store, acme, &everything, "Observation"), ["o1=1", "o2=2"]);
    assert_eq!(export_ids(store, acme, &everything, "Patient"), ["a"]);
    let as_user = MemberSelection { visibility: Visibility::User("u".into()), ..everything.clone() };
    assert_eq!(export_ids(store, acme, &as_user, "Practitioner"), ["dr2"]);
    let since = everything.transaction_time;
    delete(store, acme, "Practitioner", "dr1");
    let later = MemberSelection {
        since: Some(since),
        transaction_time: store.reserve_transaction_time().unwrap(),
        ..everything
    };
    assert_eq!(export_ids(store, acme, &later, "Practitioner"), ["dr3"]);
    assert_eq!(export_ids(store, acme, &later, "Observation"), ["o1=10"]);
    let deleted: Vec<String> =
        store.deleted_in_compartments(acme, &later, "Practitioner").unwrap().into_iter().map(|(id, _)| id).collect();
    assert_eq!(deleted, ["dr1"]);
}

/// The Patients that existed at a time (a Patient-level export's members), per tenant and user.
pub fn patients_at_a_time(store: &dyn Store) {
    let acme = tenant(store, "acme");
    let other = tenant(store, "other");
    put(store, acme, None, patient("b"));
    put(store, acme, Some("u"), patient("a"));
    put(store, acme, None, patient("c"));
    put(store, other, None, patient("z"));
    let at = store.reserve_transaction_time().unwrap();
    delete(store, acme, "Patient", "c");
    put(store, acme, None, patient("d"));
    assert_eq!(store.patients_at(acme, &Visibility::Tenant, at).unwrap(), ["a", "b", "c"]);
    assert_eq!(store.patients_at(acme, &Visibility::User("u".into()), at).unwrap(), ["a"]);
    let now = store.reserve_transaction_time().unwrap();
    assert_eq!(store.patients_at(acme, &Visibility::Tenant, now).unwrap(), ["a", "b", "d"]);
}

/// `_typeFilter` narrows planned counts and streamed lines alike, on the version at the
/// transaction time; unfiltered types are untouched.
pub fn type_filters_select_exactly(store: &dyn Store) {
    let acme = tenant(store, "acme");
    put(store, acme, None, patient("a"));
    for (id, status) in [("o1", "final"), ("o2", "preliminary"), ("o3", "final"), ("o4", "amended")] {
        let mut body = observation(id, "a", 1);
        body["status"] = json!(status);
        put(store, acme, None, body);
    }
    let filters = TypeFilters::new(vec![
        TypeFilter::parse("Observation?status=final").unwrap(),
        TypeFilter::parse("Observation?status=amended").unwrap(),
    ]);
    let filtered = MemberSelection { filters, ..selection(store, &[("a", None)], None) };
    let mut body = observation("o1", "a", 1);
    body["status"] = json!("cancelled"); // after the transaction time: the filter sees the old version
    put(store, acme, None, body);
    assert_eq!(export_ids(store, acme, &filtered, "Observation"), ["o1=1", "o3=1", "o4=1"]);
    assert_eq!(export_ids(store, acme, &filtered, "Patient"), ["a"]);
    let everything = MemberSelection { members: Default::default(), scope: SelectionScope::Tenant, ..filtered };
    assert_eq!(export_ids(store, acme, &everything, "Observation"), ["o1=1", "o3=1", "o4=1"]);
}

/// The associated data comes from the cohort before `_typeFilter` (README "Associated data"): a
/// filter leaving out a member Patient or an Observation keeps their Provenance and what they
/// reference; only a resource the export sends (one the filter keeps) forces, with `_since`,
/// the unchanged resources it reaches.
pub fn associated_data_is_found_before_type_filters(store: &dyn Store) {
    let acme = tenant(store, "acme");
    associated_world(store, acme);
    let all = || associated_request(ProvenanceSelection::Relevant, ReferencedTypes::All, 3);
    let nothing_kept = || {
        TypeFilters::new(vec![
            TypeFilter::parse("Observation?status=amended").unwrap(),
            TypeFilter::parse("Patient?_id=nobody").unwrap(),
        ])
    };
    let plain = selection(store, &[("a", None)], None);
    let filtered = MemberSelection { filters: nothing_kept(), ..plain.clone() };
    let expected = associated(store, acme, &plain, &all());
    assert!(expected.contains(&"Provenance/prov3".to_owned()) && expected.contains(&"Provenance/prov1".to_owned()));
    assert_eq!(associated(store, acme, &filtered, &all()), expected, "the filter does not narrow the cohort");
    // With `_since`: o1 changed since, so an export sending it brings its unchanged Provenance,
    // performer and the Provenance's agent; one whose filter leaves o1 out does not.
    let since = store.reserve_transaction_time().unwrap();
    let mut o1 = observation("o1", "a", 5);
    o1["performer"] = json!([reference("Practitioner/pr5"), reference("Practitioner/missing")]);
    put(store, acme, None, o1);
    let plain = selection(store, &[("a", Some(since))], Some(since));
    assert_eq!(
        associated(store, acme, &plain, &all()),
        ["Practitioner/pr5", "Practitioner/pr7", "Provenance/prov1"],
        "the changed o1 forces what it reaches"
    );
    let filtered = MemberSelection { filters: nothing_kept(), ..plain };
    assert!(associated(store, acme, &filtered, &all()).is_empty(), "o1 is not sent: it forces nothing");
}

pub fn provenance_is_found_by_target(store: &dyn Store) {
    let acme = tenant(store, "acme");
    let other = tenant(store, "other");
    associated_world(store, acme);
    put(store, other, None, patient("a"));
    let at = store.reserve_transaction_time().unwrap();
    let target = |t: &str, id: &str| (t.to_owned(), id.to_owned());
    let found = |tenant, targets: &[(String, String)], at| store.provenance_targeting(tenant, targets, at).unwrap();
    assert_eq!(found(acme, &[target("Observation", "o1")], at), ["prov1"]);
    assert_eq!(
        found(acme, &[target("Patient", "a"), target("Observation", "o1"), target("Observation", "o2")], at),
        ["prov1", "prov2", "prov3"],
        "sorted, each once"
    );
    assert!(found(acme, &[target("Practitioner", "pr7")], at).is_empty(), "an agent is no target");
    assert!(found(acme, &[target("Observation", "nope")], at).is_empty());
    assert!(found(other, &[target("Observation", "o1"), target("Patient", "a")], at).is_empty(), "per tenant");
    // As of `at`: prov1 retargeted later is still found through its target then, and a deleted
    // Provenance no longer after its deletion.
    put(store, acme, None, provenance("prov1", &["Observation/o2"], "Practitioner/pr7"));
    delete(store, acme, "Provenance", "prov3");
    assert_eq!(found(acme, &[target("Observation", "o1"), target("Patient", "a")], at), ["prov1", "prov3"]);
    let later = store.reserve_transaction_time().unwrap();
    assert!(found(acme, &[target("Observation", "o1"), target("Patient", "a")], later).is_empty());
    assert_eq!(found(acme, &[target("Observation", "o2")], later), ["prov1", "prov2"]);
    // A target that does not exist yet, then is created, then deleted: found throughout.
    put(store, acme, None, provenance("prov9", &["Observation/ghost", "Observation/o2"], "Practitioner/pr7"));
    let unwritten = store.reserve_transaction_time().unwrap();
    assert_eq!(found(acme, &[target("Observation", "ghost")], unwritten), ["prov9"], "a target not yet written");
    put(store, acme, None, observation("ghost", "a", 9));
    let written = store.reserve_transaction_time().unwrap();
    delete(store, acme, "Observation", "ghost");
    let deleted = store.reserve_transaction_time().unwrap();
    for at in [written, deleted] {
        assert_eq!(found(acme, &[target("Observation", "ghost"), target("Observation", "nope")], at), ["prov9"]);
    }
    assert_eq!(found(acme, &[target("Observation", "o2")], deleted), ["prov1", "prov2", "prov9"]);
}

/// Provenance is found through the resources it targets whatever the order of the writes: a
/// Provenance written before its target existed (in an earlier write, or earlier in the same
/// write, single or bulk), a target deleted and re-created, a Provenance retargeted, each as of
/// its transaction time; and after a target's tombstone is pruned (its key may be handed out
/// again), only a resource of that type and id brings the Provenance back.
pub fn provenance_is_found_whatever_the_order_of_writes(store: &dyn Store) {
    let acme = tenant(store, "acme");
    let found = |selection: &MemberSelection| {
        let request = associated_request(ProvenanceSelection::Relevant, ReferencedTypes::None, 1);
        associated(store, acme, selection, &request)
    };
    let update = |body: Value| WriteOp::Update {
        resource_type: body["resourceType"].as_str().unwrap().to_owned(),
        id: body["id"].as_str().unwrap().to_owned(),
        body,
        if_match: None,
    };
    put(store, acme, None, patient("a"));
    put(store, acme, None, patient("b"));
    put(store, acme, None, provenance("early", &["Observation/o1", "Observation/o2"], "Practitioner/x"));
    let before_targets = selection(store, &[("a", None), ("b", None)], None);
    put(store, acme, None, observation("o1", "a", 1));
    // One transaction: each Provenance before its target.
    let one_write = [provenance("same", &["Observation/o3"], "Practitioner/x"), observation("o3", "a", 1)];
    store.write(acme, None, &one_write.map(update), WriteMode::Transaction).unwrap();
    // A bulk write (new resources in a handful of statements where a store has such a path):
    // Provenance targeting resources of the same write, before and after them, and one whose
    // target comes in a later write.
    let mut bulk = vec![provenance("bulk1", &["Observation/o5"], "Practitioner/x")];
    for n in 5..12 {
        bulk.push(observation(&format!("o{n}"), if n % 2 == 0 { "a" } else { "b" }, 1));
    }
    bulk.push(provenance("bulk2", &["Observation/o6", "Observation/o2"], "Practitioner/x"));
    bulk.push(provenance("bulk3", &["Observation/o7"], "Practitioner/x"));
    let written = store.write(acme, None, &bulk.into_iter().map(update).collect::<Vec<_>>(), WriteMode::Batch);
    assert!(written.unwrap().iter().all(|entry| entry.as_ref().is_ok_and(|written| written.created)));
    put(store, acme, None, observation("o2", "b", 1));
    put(store, acme, None, observation("o4", "a", 1));
    put(store, acme, None, provenance("late", &["Observation/o4"], "Practitioner/x"));
    let first_a = selection(store, &[("a", None)], None);
    let first_b = selection(store, &[("b", None)], None);
    assert!(found(&before_targets).is_empty(), "as of before its targets existed, nothing targets the cohort");
    let all_of_a = ["Provenance/bulk2", "Provenance/early", "Provenance/late", "Provenance/same"];
    assert_eq!(found(&first_a), all_of_a);
    assert_eq!(found(&first_b), ["Provenance/bulk1", "Provenance/bulk2", "Provenance/bulk3", "Provenance/early"]);
    // Retargeted from a's o4 to b's o2; o1 deleted, then re-created.
    put(store, acme, None, provenance("late", &["Observation/o2"], "Practitioner/x"));
    delete(store, acme, "Observation", "o1");
    let o1_deleted = selection(store, &[("a", None)], None);
    put(store, acme, None, observation("o1", "a", 2));
    let now_a = selection(store, &[("a", None)], None);
    let now_b = selection(store, &[("b", None)], None);
    assert_eq!(found(&first_a), all_of_a, "as of the first time, whatever was written since");
    assert_eq!(found(&o1_deleted), ["Provenance/bulk2", "Provenance/same"], "o1 deleted; late moved to b");
    assert_eq!(found(&now_a), ["Provenance/bulk2", "Provenance/early", "Provenance/same"], "o1 is back");
    assert_eq!(
        found(&now_b),
        ["Provenance/bulk1", "Provenance/bulk2", "Provenance/bulk3", "Provenance/early", "Provenance/late"]
    );
    // The newest resource's tombstone is pruned; the next new resource may get its key.
    put(store, acme, None, provenance("pruned", &["Observation/o99"], "Practitioner/x"));
    put(store, acme, None, observation("o99", "a", 1));
    assert!(found(&selection(store, &[("a", None)], None)).contains(&"Provenance/pruned".to_owned()));
    delete(store, acme, "Observation", "o99");
    let cutoff = store.reserve_transaction_time().unwrap() + 1;
    store.prune_history(cutoff, cutoff + 1, 100).unwrap();
    put(store, acme, None, observation("o100", "a", 1));
    let after_prune = selection(store, &[("a", None)], None);
    assert_eq!(found(&after_prune), ["Provenance/bulk2", "Provenance/early", "Provenance/same"], "o100 is not o99");
    put(store, acme, None, observation("o99", "a", 2));
    let recreated = selection(store, &[("a", None)], None);
    assert_eq!(
        found(&recreated),
        ["Provenance/bulk2", "Provenance/early", "Provenance/pruned", "Provenance/same"],
        "o99 created again"
    );
}

/// A write of many new resources at once (where a store has a bulk path: imports) stores and
/// indexes each exactly as writing them one by one does: stored text, keys in write order,
/// search tokens (an identifier listed twice), compartments (a resource in two), references
/// (one listed twice) and Provenance targets (in the same write, stored before it, or missing).
pub fn bulk_writes_index_exactly_as_single_writes(store: &dyn Store) {
    let (bulk, single) = (tenant(store, "bulk"), tenant(store, "single"));
    let mut twice = patient("p1");
    twice["identifier"] = json!([{"system": "urn:mrn", "value": "m1"}, {"system": "urn:mrn", "value": "m1"}]);
    let mut shared = observation("o2", "p1", 2);
    shared["performer"] = json!([reference("Patient/p2"), reference("Practitioner/dr"), reference("Practitioner/dr")]);
    shared["identifier"] = json!([{"value": "lab-2"}]);
    let resources = vec![
        provenance("early", &["Observation/o1", "Observation/before", "Observation/nowhere"], "Practitioner/dr"),
        twice,
        patient("p2"),
        json!({"resourceType": "Practitioner", "id": "dr"}),
        observation("o1", "p1", 1),
        shared,
        json!({"resourceType": "Encounter", "id": "e1", "status": "finished", "class": {"code": "AMB"},
               "subject": reference("Patient/p2"), "participant": [{"individual": reference("Practitioner/dr")}]}),
        observation("o3", "p2", 3),
        provenance("late", &["Observation/o3", "Patient/p2"], "Practitioner/dr"),
    ];
    for t in [bulk, single] {
        put(store, t, None, observation("before", "p2", 0));
    }
    let ops: Vec<WriteOp> = resources
        .iter()
        .map(|body| WriteOp::Update {
            resource_type: body["resourceType"].as_str().unwrap().to_owned(),
            id: body["id"].as_str().unwrap().to_owned(),
            body: body.clone(),
            if_match: None,
        })
        .collect();
    let written = store.write(bulk, Some("owner"), &ops, WriteMode::Transaction).unwrap();
    assert!(written.iter().all(|entry| entry.as_ref().is_ok_and(|written| written.created && written.version == 1)));
    for op in &ops {
        store.write(single, Some("owner"), std::slice::from_ref(op), WriteMode::Transaction).unwrap();
    }

    // Stored text, with the time of each write's own transaction blanked.
    let stored = |t: TenantId| -> Vec<Option<String>> {
        ops.iter()
            .map(|op| {
                let resource =
                    store.read(t, &Visibility::User("owner".into()), op.resource_type(), op.id()).unwrap()?;
                let mut body: Value = serde_json::from_str(resource.body.as_deref()?).unwrap();
                body["meta"]["lastUpdated"] = json!("T");
                Some(format!("{}@{}", body, resource.version))
            })
            .collect()
    };
    assert!(stored(bulk).iter().all(Option::is_some));
    assert_eq!(stored(bulk), stored(single));

    let search = |t: TenantId, query: SearchQuery| -> Vec<String> {
        store.search(t, &Visibility::Tenant, &query).unwrap().resources.into_iter().map(|r| r.id).collect()
    };
    let queries = || {
        let identifier = |resource_type: &str, system: Option<&str>, value: &str| SearchQuery {
            resource_type: resource_type.into(),
            identifiers: vec![IdentifierQuery { system: system.map(str::to_owned), value: value.into() }],
            count: 10,
            ..Default::default()
        };
        let reference = |param: &'static str, id: &str| SearchQuery {
            resource_type: "Observation".into(),
            references: vec![ReferenceQuery { param, target_type: None, id: id.into() }],
            count: 10,
            ..Default::default()
        };
        vec![
            identifier("Patient", Some("urn:mrn"), "m1"),
            identifier("Patient", None, "mrn-p2"),
            identifier("Observation", None, "lab-2"),
            reference("subject", "p1"),
            reference("patient", "p2"),
            SearchQuery { resource_type: "Observation".into(), count: 10, ..Default::default() },
        ]
    };
    let found: Vec<Vec<String>> = queries().into_iter().map(|query| search(bulk, query)).collect();
    assert_eq!(found, queries().into_iter().map(|query| search(single, query)).collect::<Vec<_>>());
    assert_eq!(found[0], ["p1"], "an identifier listed twice finds its resource once");
    assert_eq!(found[5], ["before", "o1", "o2", "o3"], "keys follow the order of the writes");

    // Compartments (o2 is in p1's through its subject and in p2's through its performer), then
    // references and Provenance.
    let exported = |t: TenantId| -> Vec<Vec<String>> {
        let mut out = Vec::new();
        for members in [&[("p1", None)][..], &[("p2", None)][..], &[("p1", None), ("p2", None)][..]] {
            let chosen = selection(store, members, None);
            for resource_type in ["Patient", "Observation", "Encounter", "Provenance"] {
                out.push(export_ids(store, t, &chosen, resource_type));
            }
            let request = associated_request(ProvenanceSelection::Relevant, ReferencedTypes::All, 2);
            out.push(associated(store, t, &chosen, &request));
        }
        out
    };
    let bulk_exported = exported(bulk);
    assert_eq!(bulk_exported, exported(single));
    assert_eq!(bulk_exported[1], ["o1=1", "o2=2"]);
    assert_eq!(bulk_exported[6], ["before=0", "o2=2", "o3=3"]);
    assert_eq!(
        bulk_exported[9],
        ["Practitioner/dr", "Provenance/early", "Provenance/late"],
        "Provenance found through targets written in the same write and before it"
    );
}

/// A bulk load's source: the batches of each inner list are handed over without waiting (a
/// store may write them in one transaction), the lists one after the other. Every entry must
/// succeed.
struct LoadSource {
    transactions: std::collections::VecDeque<std::collections::VecDeque<BulkBatch>>,
    written: usize,
}

impl BulkSource for LoadSource {
    fn next_batch(&mut self, wait: bool) -> Option<BulkBatch> {
        while wait && self.transactions.front().is_some_and(std::collections::VecDeque::is_empty) {
            self.transactions.pop_front();
        }
        self.transactions.front_mut()?.pop_front()
    }
    fn written(&mut self, _batch: BulkBatch, results: Vec<Result<Written, StoreError>>) {
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        self.written += results.len();
    }
    fn committed(&mut self) {}
    fn rewind(&mut self) {
        panic!("no entry of this load fails");
    }
}

/// Loads `transactions` (lists of batches of resources) with [`Store::write_bulk`], each
/// resource prepared as an import prepares it.
fn bulk_load(store: &dyn Store, tenant: TenantId, transactions: &[Vec<Vec<Value>>]) {
    let batch = |bodies: &Vec<Value>| {
        let (ops, prepared) = bodies
            .iter()
            .map(|body| {
                let (resource_type, id) = (body["resourceType"].as_str().unwrap(), body["id"].as_str().unwrap());
                let prepared = PreparedWrite::new(resource_type, id, body);
                let op = WriteOp::Update {
                    resource_type: resource_type.into(),
                    id: id.into(),
                    body: body.clone(),
                    if_match: None,
                };
                (op, Some(prepared))
            })
            .unzip();
        BulkBatch { ops, prepared }
    };
    let mut source = LoadSource {
        transactions: transactions.iter().map(|batches| batches.iter().map(batch).collect()).collect(),
        written: 0,
    };
    store.write_bulk(tenant, None, &mut source).unwrap();
    assert_eq!(source.written, transactions.iter().flatten().flatten().count());
}

/// A bulk load finds each Provenance target's resource wherever it was written: earlier in the
/// same batch or after the Provenance in it, in an earlier batch of the same transaction, in an
/// earlier transaction of the load, in an earlier load, in a later load, never; a Provenance
/// targeting itself or another Provenance; a Provenance rewritten in the same transaction; and
/// many targets to a Provenance. The associated data and lookups by target are those of the
/// same resources written one by one.
pub fn bulk_loads_find_provenance_targets_wherever_they_were_written(store: &dyn Store) {
    let (bulk, single) = (tenant(store, "bulk"), tenant(store, "single"));
    let obs = |id: &str, patient: &str| observation(id, patient, 1);
    let numbered = |from: usize, to: usize, patient: &str| -> Vec<Value> {
        (from..to).map(|n| obs(&format!("t{n}"), patient)).collect()
    };
    let many: Vec<String> = (0..20).map(|n| format!("Observation/t{n}")).collect();
    let mut p2_targets = vec!["Observation/o1", "Observation/o2"];
    p2_targets.extend(many.iter().map(String::as_str));
    let first_p1 = ["Observation/old", "Observation/o1", "Observation/o2", "Observation/o3", "Observation/never"];
    let mut batch_3 = vec![
        provenance("p1", &["Observation/o2", "Observation/later"], "Practitioner/x"),
        provenance("p4", &["Observation/o2", "Observation/t15"], "Practitioner/x"),
    ];
    batch_3.extend(numbered(0, 10, "a"));
    batch_3.push(provenance("p4", &["Observation/t6"], "Practitioner/x"));
    let mut batch_4 = vec![obs("o3", "b")];
    batch_4.extend(numbered(10, 20, "b"));
    batch_4.push(provenance("p3", &["Provenance/p1", "Observation/o3", "Observation/never"], "Practitioner/x"));
    batch_4.push(provenance("p5", &["Provenance/p5", "Patient/a"], "Practitioner/x"));
    let loads = [
        vec![vec![vec![patient("a"), patient("b"), obs("old", "a")]]],
        vec![
            vec![
                vec![
                    provenance("p1", &[&first_p1[..], &["Observation/later", "Patient/a"]].concat(), "Practitioner/x"),
                    obs("o1", "a"),
                ],
                vec![obs("o2", "b"), provenance("p2", &p2_targets, "Practitioner/x")],
                batch_3,
            ],
            vec![batch_4],
        ],
        vec![vec![vec![obs("later", "a")]]],
    ];
    let request = || associated_request(ProvenanceSelection::Relevant, ReferencedTypes::None, 1);
    let found =
        |t: TenantId, member: &str| associated(store, t, &selection(store, &[(member, None)], None), &request());
    let by_target = |t: TenantId, target: &str, at: i64| {
        let (resource_type, id) = target.split_once('/').unwrap();
        store.provenance_targeting(t, &[(resource_type.to_owned(), id.to_owned())], at).unwrap()
    };
    let mut seen = Vec::new();
    for (n, load) in loads.iter().enumerate() {
        bulk_load(store, bulk, load);
        for body in load.iter().flatten().flatten() {
            put(store, single, None, body.clone());
        }
        if n == 0 {
            continue;
        }
        let at = store.reserve_transaction_time().unwrap();
        for member in ["a", "b"] {
            let bulk_found = found(bulk, member);
            assert_eq!(bulk_found, found(single, member), "load {n}, member {member}");
            seen.push(bulk_found);
        }
        for target in ["Observation/never", "Observation/later", "Provenance/p1", "Provenance/p5", "Observation/t19"] {
            assert_eq!(by_target(bulk, target, at), by_target(single, target, at), "load {n}, {target}");
        }
        assert_eq!(by_target(bulk, "Observation/never", at), ["p3"], "a target never written");
    }
    assert_eq!(
        seen,
        [
            vec!["Provenance/p2", "Provenance/p4", "Provenance/p5"],
            vec!["Provenance/p1", "Provenance/p2", "Provenance/p3"],
            vec!["Provenance/p1", "Provenance/p2", "Provenance/p4", "Provenance/p5"],
            vec!["Provenance/p1", "Provenance/p2", "Provenance/p3"],
        ],
        "a through o1, t0–t9, Patient/a and, once written, later; b through o2, o3 and t10–t19 (p4 \
         moved from b's to a's)"
    );
}

// ---- export job leases ----

fn planning_job(id: &str, created: i64, expires: i64) -> ExportJob {
    ExportJob {
        state: ExportJobState::Planning,
        manifest: String::new(),
        created,
        ..export_job(id, "c1", Visibility::Tenant, expires)
    }
}

fn enqueue(store: &dyn Store, tenant: TenantId, id: &str, created: i64) {
    let work = format!("{{\"job\":\"{id}\"}}");
    let admitted = store.enqueue_export_job(tenant, &planning_job(id, created, 1_000_000), &work, 0, created);
    assert_eq!(admitted.unwrap(), JobAdmission::Queued);
}

/// Each due job goes to exactly one claimer, however many claim at once; claims prefer the
/// tenant with the fewest running jobs, then the oldest job.
pub fn export_job_claims_are_exclusive_and_fair_across_tenants(store: &dyn Store) {
    let (a, b) = (tenant(store, "a"), tenant(store, "b"));
    enqueue(store, a, "a1", 10);
    enqueue(store, a, "a2", 20);
    enqueue(store, b, "b1", 30);
    let claim = |owner: &str| store.claim_export_job(owner, 100, 50).unwrap();
    let first = claim("i1").expect("a due job");
    assert_eq!((first.lease.tenant, first.lease.job_id.as_str(), first.lease.fence), (a, "a1", 1), "oldest first");
    assert_eq!((first.lease.owner.as_str(), first.lease.expires), ("i1", 150));
    assert_eq!(first.work, "{\"job\":\"a1\"}", "the kick-off's work is handed over");
    assert_eq!((first.checkpoint, first.parts), (None, Vec::new()));
    let second = claim("i2").expect("a due job");
    assert_eq!((second.lease.tenant, second.lease.job_id.as_str()), (b, "b1"), "b runs nothing, a runs one");
    assert_eq!(claim("i1").expect("a due job").lease.job_id, "a2");
    assert!(claim("i2").is_none(), "every job is leased");
    let activity = store.export_job_activity(a, "a1").unwrap().unwrap();
    assert_eq!((activity.owner.as_deref(), activity.lease_expires, activity.fence), (Some("i1"), 150, 1));
    assert!(store.export_job_activity(b, "a1").unwrap().is_none(), "another tenant's job is not there");

    // Concurrent claimers ("instances"): every job is claimed exactly once.
    let c = tenant(store, "c");
    for n in 0..12 {
        enqueue(store, c, &format!("c{n:02}"), 40 + n);
    }
    let claimed: Vec<String> = std::thread::scope(|scope| {
        let claimers: Vec<_> = (0..4)
            .map(|instance| {
                scope.spawn(move || {
                    let mut mine = Vec::new();
                    while let Some(job) = store.claim_export_job(&format!("i{instance}"), 100, 50).unwrap() {
                        mine.push(job.lease.job_id);
                    }
                    mine
                })
            })
            .collect();
        claimers.into_iter().flat_map(|claimer| claimer.join().unwrap()).collect()
    });
    let mut sorted = claimed.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!((claimed.len(), sorted.len()), (12, 12), "each job once: {claimed:?}");
}

/// A lease that lapsed is claimed by another instance with the next fencing token; the new
/// holder gets the old holder's checkpoint and parts, and the old holder can write nothing more.
pub fn an_expired_lease_is_taken_over_and_the_stale_holder_fenced(store: &dyn Store) {
    let t = tenant(store, "t");
    enqueue(store, t, "j", 10);
    let old = store.claim_export_job("i1", 100, 50).unwrap().expect("due").lease;
    let part = |index: u32| JobPart { index, bytes: 100 + u64::from(index), sha256: format!("{index:064}"), lines: 3 };
    assert!(store.record_export_job_part(&old, &part(0)).unwrap());
    assert!(store.record_export_job_part(&old, &part(1)).unwrap());
    assert!(store.save_export_job_checkpoint(&old, "planned").unwrap());
    assert!(store.claim_export_job("i2", 140, 50).unwrap().is_none(), "the lease is live until 150");
    assert!(store.renew_export_job_lease(&old, 140, 50, "writing 2/5").unwrap(), "the heartbeat extends it");
    assert!(store.claim_export_job("i2", 180, 50).unwrap().is_none(), "renewed until 190");
    assert_eq!(store.export_job_activity(t, "j").unwrap().unwrap().progress, "writing 2/5");

    let taken = store.claim_export_job("i2", 190, 50).unwrap().expect("lapsed at 190");
    assert_eq!((taken.lease.owner.as_str(), taken.lease.fence, taken.lease.expires), ("i2", 2, 240));
    assert_eq!(taken.checkpoint.as_deref(), Some("planned"), "the checkpoint is handed over");
    assert_eq!(taken.parts, vec![part(0), part(1)], "recorded parts are handed over, not redone");

    // The stale holder wakes up: every write it tries is refused and changes nothing.
    assert!(!store.renew_export_job_lease(&old, 200, 50, "stale").unwrap());
    assert!(!store.record_export_job_part(&old, &part(2)).unwrap());
    assert!(!store.save_export_job_checkpoint(&old, "stale").unwrap());
    assert!(!store.finish_leased_export_job(&old, ExportJobState::Complete, "{\"stale\":true}").unwrap());
    let job = store.export_job(t, "j").unwrap().unwrap();
    assert_eq!(job.state, ExportJobState::Planning, "the stale finish was refused");
    assert_eq!(store.export_job_activity(t, "j").unwrap().unwrap().owner.as_deref(), Some("i2"));

    let new = taken.lease;
    assert!(store.record_export_job_part(&new, &part(2)).unwrap());
    let forged = JobLease { fence: new.fence + 1, ..new.clone() };
    assert!(!store.record_export_job_part(&forged, &part(3)).unwrap(), "only the newest token writes");
    assert!(store.finish_leased_export_job(&new, ExportJobState::Complete, "{\"output\":[]}").unwrap());
    let job = store.export_job(t, "j").unwrap().unwrap();
    assert_eq!((job.state, job.manifest.as_str()), (ExportJobState::Complete, "{\"output\":[]}"));
    assert!(!store.finish_leased_export_job(&new, ExportJobState::Failed { status: 500 }, "{}").unwrap());
    assert!(!store.renew_export_job_lease(&new, 200, 50, "done").unwrap(), "a finished job has no lease");
    assert!(store.claim_export_job("i3", 10_000, 50).unwrap().is_none(), "a finished job is never claimed");
    assert!(matches!(store.finish_leased_export_job(&new, ExportJobState::Planning, ""), Err(StoreError::Invalid(_))));

    // A job that expired is not claimed, whatever its lease.
    store.enqueue_export_job(t, &planning_job("late", 10, 500), "{}", 0, 10).unwrap();
    assert!(store.claim_export_job("i1", 500, 50).unwrap().is_none(), "expired at 500");
}

/// The per-tenant cap counts unfinished jobs in the insert's own transaction: concurrent
/// kick-offs on several instances never pass it together; finished or expired jobs do not count.
pub fn the_export_cap_is_counted_with_the_insert_across_instances(store: &dyn Store) {
    let (a, b) = (tenant(store, "a"), tenant(store, "b"));
    let admit = |tenant: TenantId, id: &str, cap: u64| {
        store.enqueue_export_job(tenant, &planning_job(id, 10, 1_000), "{}", cap, 100).unwrap()
    };
    assert_eq!(admit(a, "a1", 2), JobAdmission::Queued);
    assert_eq!(admit(a, "a2", 2), JobAdmission::Queued);
    assert_eq!(admit(a, "a3", 2), JobAdmission::AtCap { unfinished: 2 });
    assert!(store.export_job(a, "a3").unwrap().is_none(), "a refused job is not stored");
    assert_eq!(admit(b, "b1", 2), JobAdmission::Queued, "another tenant has its own count");
    assert_eq!(store.unfinished_export_jobs(a, 100).unwrap(), 2);
    assert!(matches!(
        store.enqueue_export_job(a, &planning_job("a1", 10, 1_000), "{}", 0, 100),
        Err(StoreError::Conflict(_))
    ));

    let lease = store.claim_export_job("i1", 100, 50).unwrap().expect("due").lease;
    assert_eq!(lease.job_id, "a1");
    assert!(store.finish_leased_export_job(&lease, ExportJobState::Complete, "{}").unwrap());
    assert_eq!(admit(a, "a3", 2), JobAdmission::Queued, "a finished job leaves room");
    assert_eq!(store.unfinished_export_jobs(a, 1_000).unwrap(), 0, "expired jobs do not count");

    // Eight kick-offs at once on as many "instances", cap 3: exactly three are stored.
    let c = tenant(store, "c");
    let admitted = std::thread::scope(|scope| {
        let kick_offs: Vec<_> = (0..8)
            .map(|n| {
                scope.spawn(move || {
                    store.enqueue_export_job(c, &planning_job(&format!("c{n}"), 10, 1_000), "{}", 3, 100)
                })
            })
            .collect();
        kick_offs
            .into_iter()
            .map(|kick_off| kick_off.join().unwrap().unwrap())
            .filter(|admitted| *admitted == JobAdmission::Queued)
            .count()
    });
    assert_eq!(admitted, 3);
    assert_eq!(store.unfinished_export_jobs(c, 100).unwrap(), 3);
}

/// Deleting a job (a client's DELETE) stops its holder: its heartbeat and writes are refused, and
/// the job's recorded parts go with it.
pub fn a_cancelled_job_stops_its_holder(store: &dyn Store) {
    let t = tenant(store, "t");
    enqueue(store, t, "j", 10);
    let lease = store.claim_export_job("i1", 100, 50).unwrap().expect("due").lease;
    let part = JobPart { index: 0, bytes: 1, sha256: "0".repeat(64), lines: 1 };
    assert!(store.record_export_job_part(&lease, &part).unwrap());
    assert!(store.delete_export_job(t, "j").unwrap());
    assert!(!store.renew_export_job_lease(&lease, 110, 50, "x").unwrap());
    assert!(!store.record_export_job_part(&lease, &part).unwrap());
    assert!(store.export_job_activity(t, "j").unwrap().is_none());
    // The same id again (a new job) starts with no parts.
    enqueue(store, t, "j", 20);
    let again = store.claim_export_job("i2", 200, 50).unwrap().expect("due");
    assert_eq!((again.lease.fence, again.parts), (1, Vec::new()));
}

/// A holder that stops gracefully hands its job back: the job is due at once (not when the
/// lease would have lapsed), the next claim still takes a new fencing token (the old holder is
/// fenced off), and the hand-backs are counted, so claims that follow them are not taken for
/// interruptions (a job that lives through many restarts is not failed as "keeps killing its
/// worker"), while claims after a lapsed lease are.
pub fn a_handed_back_job_is_due_at_once_and_its_claims_are_not_interruptions(store: &dyn Store) {
    let t = tenant(store, "t");
    enqueue(store, t, "j", 10);
    let first = store.claim_export_job("i1", 100, 1_000).unwrap().expect("due");
    assert_eq!((first.lease.fence, first.handed_back, first.interrupted_claims()), (1, 0, 1));
    assert!(store.save_export_job_checkpoint(&first.lease, "planned").unwrap());
    assert!(store.claim_export_job("i2", 200, 1_000).unwrap().is_none(), "the lease is live until 1100");
    assert!(store.hand_back_export_job(&first.lease, 200, "handed back").unwrap());
    assert_eq!(store.export_job_activity(t, "j").unwrap().unwrap().progress, "handed back");

    // Due at once, to any instance, under the next token.
    let mut held = store.claim_export_job("i2", 200, 1_000).unwrap().expect("due once handed back");
    assert_eq!((held.lease.fence, held.handed_back, held.interrupted_claims()), (2, 1, 1));
    assert_eq!(held.checkpoint.as_deref(), Some("planned"), "resumed from the checkpoint");
    // The holder that handed it back can write nothing more, not even a second hand-back.
    assert!(!store.save_export_job_checkpoint(&first.lease, "stale").unwrap());
    assert!(!store.renew_export_job_lease(&first.lease, 210, 1_000, "stale").unwrap());
    assert!(!store.hand_back_export_job(&first.lease, 210, "stale").unwrap());

    // Five more graceful restarts: seven claims, one of them interrupted.
    for n in 3..=7 {
        assert!(store.hand_back_export_job(&held.lease, 300 + n, "handed back").unwrap());
        held = store.claim_export_job(&format!("i{n}"), 300 + n, 1_000).unwrap().expect("due");
        assert_eq!((held.lease.fence, held.handed_back, held.interrupted_claims()), (n, n - 1, 1));
    }
    // A holder that dies instead: the claim after the lapse is an interruption.
    let lapsed = store.claim_export_job("i8", 300 + 7 + 1_000, 1_000).unwrap().expect("lapsed");
    assert_eq!((lapsed.lease.fence, lapsed.handed_back, lapsed.interrupted_claims()), (8, 6, 2));
    assert!(!store.hand_back_export_job(&held.lease, 2_000, "stale").unwrap(), "the dead holder's token is stale");
    assert!(store.finish_leased_export_job(&lapsed.lease, ExportJobState::Complete, "{}").unwrap());
    assert!(!store.hand_back_export_job(&lapsed.lease, 2_000, "done").unwrap(), "a finished job has no lease");
    assert!(store.claim_export_job("i9", 2_000, 1_000).unwrap().is_none());
}

/// Ids that sort differently by bytes and by a language's rules (case, `-`, `.`, digits) come
/// back in byte order (Rust's `str` order, which callers binary-search and merge with) from every
/// call that returns them sorted: a Patient-level export's Patients, a Group's members, tenants.
pub fn text_keys_sort_by_bytes(store: &dyn Store) {
    let ids = ["b", "B", "a-2", "a.1", "a1", "A", "a", "Z", "a-B", "0", "aB", "ab"];
    let acme = tenant(store, "acme");
    for id in ids {
        put(store, acme, None, patient(id));
    }
    put(store, acme, None, group("g", &ids));
    let mut sorted: Vec<String> = ids.map(String::from).to_vec();
    sorted.sort();
    let at = store.reserve_transaction_time().unwrap();
    assert_eq!(store.patients_at(acme, &Visibility::Tenant, at).unwrap(), sorted, "Patients by bytes");
    assert_eq!(store.members_at(acme, "g", at).unwrap(), sorted, "members by bytes");
    for name in ["beta", "Alpha", "alpha", "a-b", "a.b", "Beta"] {
        tenant(store, name);
    }
    let listed: Vec<String> = store.list_tenants().unwrap().into_iter().map(|tenant| tenant.name).collect();
    let mut names = listed.clone();
    names.sort();
    assert_eq!(listed, names, "tenants by bytes");
}

/// Which members' Patients exist at a time (checked at every Group kick-off) is remembered while
/// the members are unchanged, and exact whatever happens: a repeat is a cache hit, a Patient
/// created or deleted shows at once, an earlier time is answered as of then, and each
/// visibility gets its own answer.
pub fn existing_patients_are_exact_through_the_plan_cache(store: &dyn Store) {
    let acme = tenant(store, "acme");
    put(store, acme, None, patient("a"));
    put(store, acme, None, patient("b"));
    let ids: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
    let existing_as = |visibility: &Visibility, at| store.existing_at(acme, visibility, "Patient", &ids, at).unwrap();
    let existing = || existing_as(&Visibility::Tenant, store.reserve_transaction_time().unwrap());
    let first = store.reserve_transaction_time().unwrap();
    assert_eq!(existing_as(&Visibility::Tenant, first), ["a", "b"]);
    let hits = || store.plan_cache_stats().map(|stats| stats.hits);
    let before = hits();
    assert_eq!(existing(), ["a", "b"]);
    assert_eq!(hits(), before.map(|hits| hits + 1), "a repeat is answered from the cache");
    put(store, acme, None, observation("o", "a", 1));
    assert_eq!(existing(), ["a", "b"], "a member's other data changed");
    put(store, acme, None, patient("c"));
    assert_eq!(existing(), ["a", "b", "c"], "a member's Patient created");
    delete(store, acme, "Patient", "a");
    assert_eq!(existing(), ["b", "c"], "a member's Patient deleted");
    put(store, acme, None, patient("a"));
    assert_eq!(existing(), ["a", "b", "c"], "and created again");
    put(store, acme, Some("u"), patient("d"));
    assert_eq!(existing(), ["a", "b", "c", "d"]);
    let user = Visibility::User("u".into());
    assert_eq!(existing_as(&user, store.reserve_transaction_time().unwrap()), ["d"], "per visibility");
    assert_eq!(existing_as(&user, store.reserve_transaction_time().unwrap()), ["d"]);
    assert_eq!(existing_as(&Visibility::Tenant, first), ["a", "b"], "an earlier time as of then");
}

/// How many Provenance member `a`'s associated set holds at `at` (the stores' migration tests
/// compare it before and after a migration).
pub fn provenance_of_member_a_at(store: &dyn Store, tenant: TenantId, at: i64, set: &str) -> u64 {
    let selection = MemberSelection {
        members: vec![("a".into(), None)].into(),
        since: None,
        until: None,
        transaction_time: at,
        visibility: Visibility::Tenant,
        scope: SelectionScope::Members,
        filters: Default::default(),
    };
    let sources = vec!["Patient".to_owned(), "Observation".to_owned()];
    let request = AssociatedRequest {
        set_id: set.into(),
        expires: i64::MAX,
        provenance: ProvenanceSelection::Relevant,
        provenance_sources: sources.clone(),
        referenced: ReferencedTypes::None,
        reference_sources: sources,
        depth: 1,
    };
    let planned = store.plan_associated(tenant, &selection, &request, 100).unwrap();
    planned
        .parts
        .iter()
        .filter(|(resource_type, _)| resource_type == "Provenance")
        .map(|(_, parts)| parts[0].count)
        .sum()
}

/// Token signing keys: stored once (a second start keeps the first keys), rotated in one step
/// (new signing key first, the previous one retired, long-retired ones dropped), with a version
/// that changes on every change and a `Debug` that never shows a secret.
pub fn token_keys_are_stored_once_and_rotated(store: &dyn Store) {
    assert_eq!(store.token_keys().unwrap(), vec![]);
    let empty_version = store.token_keys_version().unwrap();
    let imported = vec![
        TokenKey { kid: "k2".into(), secret: vec![2; 32], retired: None },
        TokenKey { kid: "k1".into(), secret: vec![1; 32], retired: Some(100) },
    ];
    assert!(store.init_token_keys(&imported).unwrap());
    assert_eq!(store.token_keys().unwrap(), imported, "newest first, as given");
    let version = store.token_keys_version().unwrap();
    assert_ne!(version, empty_version);
    let other = [TokenKey { kid: "k1".into(), secret: vec![9; 32], retired: None }];
    assert!(!store.init_token_keys(&other).unwrap(), "a second first start keeps the stored keys");
    assert_eq!(store.token_keys().unwrap(), imported);
    assert_eq!(store.token_keys_version().unwrap(), version);

    let rotated = store.rotate_token_keys(&[3; 32], 1_000, 500).unwrap();
    let expected = vec![
        TokenKey { kid: "k3".into(), secret: vec![3; 32], retired: None },
        TokenKey { kid: "k2".into(), secret: vec![2; 32], retired: Some(1_000) },
    ];
    assert_eq!(rotated, expected, "k1 (retired at 100) is past its retention at 500");
    assert_eq!(store.token_keys().unwrap(), expected);
    let after = store.token_keys_version().unwrap();
    assert_ne!(after, version);
    let again = store.rotate_token_keys(&[4; 32], 2_000, 500).unwrap();
    let kids: Vec<(&str, Option<i64>)> = again.iter().map(|key| (key.kid.as_str(), key.retired)).collect();
    assert_eq!(kids, [("k4", None), ("k3", Some(2_000)), ("k2", Some(1_000))], "a retired key keeps its time");
    assert_ne!(store.token_keys_version().unwrap(), after);
    let shown = format!("{again:?}");
    assert!(!shown.contains("[4, 4") && shown.contains("k4"), "Debug shows no secret: {shown}");
}

/// A quota's token bucket is shared: draws take what is left (never more than asked, never
/// below empty), refill with time up to the capacity, and concurrent draws never hand out more
/// than the bucket held; each tenant and quota has its own bucket.
pub fn quota_buckets_are_shared_and_refill(store: &dyn Store) {
    let (a, b) = (tenant(store, "a"), tenant(store, "b"));
    let start = 1_000_000_000;
    let draw = |tenant, quota, want, now| store.draw_quota_tokens(tenant, quota, want, 10.0, 5.0, now).unwrap();
    assert_eq!(draw(a, "requests", 4.0, start), 4.0, "a new bucket starts full");
    assert_eq!(draw(a, "requests", 4.0, start), 4.0);
    assert_eq!(draw(a, "requests", 4.0, start), 2.0, "what is left");
    assert_eq!(draw(a, "requests", 4.0, start), 0.0, "empty");
    assert_eq!(draw(b, "requests", 4.0, start), 4.0, "another tenant's bucket");
    assert_eq!(draw(a, "uploads", 4.0, start), 4.0, "another quota's bucket");
    assert_eq!(draw(a, "requests", 4.0, start + 400_000), 2.0, "0.4 s at 5/s refills 2");
    assert_eq!(draw(a, "requests", 4.0, start + 100_000), 0.0, "a clock behind the last draw adds nothing");
    assert_eq!(draw(a, "requests", 20.0, start + 60_000_000), 10.0, "refilled to the capacity only");

    let later = start + 120_000_000;
    let taken: f64 = std::thread::scope(|scope| {
        let draws: Vec<_> =
            (0..4).map(|_| scope.spawn(move || (0..5).map(|_| draw(b, "requests", 1.0, later)).sum::<f64>())).collect();
        draws.into_iter().map(|draw| draw.join().unwrap()).sum()
    });
    assert_eq!(taken, 10.0, "concurrent draws share one full bucket");
}

/// Failed logins are counted per key in a fixed window from the first failure; a new window
/// starts once it has ended; keys are counted apart.
pub fn login_failures_count_in_fixed_windows(store: &dyn Store) {
    let window = 60_000_000;
    let start = 5_000_000_000;
    for failures in 1..=3 {
        let counted = store.record_login_failure("peer:10.0.0.1", window, start + failures * 1_000).unwrap();
        assert_eq!(counted, crate::LoginWindow { started: start + 1_000, failures: failures as u32 });
    }
    let other = store.record_login_failure("client:abc", window, start + 5_000).unwrap();
    assert_eq!(other.failures, 1);
    let next = store.record_login_failure("peer:10.0.0.1", window, start + 1_000 + window).unwrap();
    assert_eq!(next, crate::LoginWindow { started: start + 1_000 + window, failures: 1 }, "a new window");
}

/// A Group as of a time: its version then (tombstones included, no text), and the members that
/// version lists, filtered by each member's `period.end` at the time asked. A version's list is
/// shared by every call that finds it; another version, Group or tenant has its own.
pub fn groups_at_a_time_share_each_versions_members(store: &dyn Store) {
    let acme = tenant(store, "acme");
    let other = tenant(store, "other");
    let before = store.reserve_transaction_time().unwrap();
    put(store, acme, Some("u"), group("g", &["b", "a"]));
    put(store, other, None, group("g", &["x"]));
    let first = store.reserve_transaction_time().unwrap();
    let ids = |group: &crate::GroupAt, at| group.members.at(at).ids().map(str::to_owned).collect::<Vec<_>>();
    assert!(store.group_at(acme, "g", before).unwrap().is_none(), "no version yet");
    assert!(store.group_at(acme, "nope", first).unwrap().is_none());
    let at_first = store.group_at(acme, "g", first).unwrap().expect("a version");
    assert_eq!((at_first.version.version, at_first.version.deleted), (1, false));
    assert_eq!((at_first.version.owner.as_deref(), at_first.version.body.as_deref()), (Some("u"), None));
    assert_eq!(ids(&at_first, first), ["a", "b"]);
    let again = store.group_at(acme, "g", store.reserve_transaction_time().unwrap()).unwrap().unwrap();
    assert!(again.members.at(first).shares(&at_first.members.at(first)), "one list per version, shared");
    assert_eq!(ids(&store.group_at(other, "g", first).unwrap().unwrap(), first), ["x"], "per tenant");

    let ended = json!({"resourceType": "Group", "id": "g", "type": "person", "actual": true, "member": [
        {"entity": {"reference": "Patient/a"}, "period": {"end": "2000-01-01"}},
        {"entity": {"reference": "Patient/c"}},
        {"entity": {"reference": "Patient/d"}, "inactive": true},
        {"entity": {"reference": "Practitioner/e"}},
    ]});
    put(store, acme, Some("u"), ended);
    let second = store.reserve_transaction_time().unwrap();
    let at_second = store.group_at(acme, "g", second).unwrap().unwrap();
    assert_eq!(at_second.version.version, 2);
    assert_eq!(ids(&at_second, second), ["c"]);
    let in_1999 = bulkhead_fhir::parse_since("1999-06-01").unwrap();
    assert_eq!(ids(&at_second, in_1999), ["a", "c"], "a member until its period ends");
    assert_eq!(ids(&store.group_at(acme, "g", first).unwrap().unwrap(), first), ["a", "b"], "as of then");

    delete(store, acme, "Group", "g");
    let gone = store.group_at(acme, "g", store.reserve_transaction_time().unwrap()).unwrap().unwrap();
    assert!(gone.version.deleted && gone.members.at(second).is_empty(), "a tombstone has no members");
    assert_eq!(ids(&store.group_at(acme, "g", second).unwrap().unwrap(), second), ["c"], "still as of then");
}

/// A Group export's missing members (whose Patient did not exist, live and visible, at the
/// transaction time) are remembered while the members are unchanged, and exact whatever happens:
/// a repeat is a cache hit, a member's Patient created or deleted shows at once, an earlier time
/// is answered as of then, and each visibility gets its own answer.
pub fn missing_members_are_exact_through_the_plan_cache(store: &dyn Store) {
    let acme = tenant(store, "acme");
    put(store, acme, None, patient("a"));
    put(store, acme, None, patient("b"));
    let members: crate::Members = ["a", "b", "c", "d"].iter().map(|id| (id.to_string(), None)).collect();
    let missing_as = |visibility: &Visibility, at| {
        let selection = MemberSelection {
            members: members.clone(),
            since: None,
            until: None,
            transaction_time: at,
            visibility: visibility.clone(),
            scope: SelectionScope::Members,
            filters: Default::default(),
        };
        store.missing_members(acme, &selection).unwrap()
    };
    let missing = || missing_as(&Visibility::Tenant, store.reserve_transaction_time().unwrap());
    let first = store.reserve_transaction_time().unwrap();
    assert_eq!(missing_as(&Visibility::Tenant, first), ["c", "d"]);
    let hits = || store.plan_cache_stats().map(|stats| stats.hits);
    let before = hits();
    assert_eq!(missing(), ["c", "d"]);
    assert_eq!(hits(), before.map(|hits| hits + 1), "a repeat is answered from the cache");
    put(store, acme, None, observation("o", "a", 1));
    assert_eq!(missing(), ["c", "d"], "a member's other data changed");
    put(store, acme, None, patient("c"));
    assert_eq!(missing(), ["d"], "a member's Patient created");
    delete(store, acme, "Patient", "a");
    assert_eq!(missing(), ["a", "d"], "a member's Patient deleted");
    put(store, acme, None, patient("a"));
    assert_eq!(missing(), ["d"], "and created again");
    put(store, acme, Some("u"), patient("d"));
    assert!(missing().is_empty());
    let user = Visibility::User("u".into());
    assert_eq!(missing_as(&user, store.reserve_transaction_time().unwrap()), ["a", "b", "c"], "per visibility");
    assert_eq!(missing_as(&user, store.reserve_transaction_time().unwrap()), ["a", "b", "c"]);
    assert_eq!(missing_as(&Visibility::Tenant, first), ["c", "d"], "an earlier time as of then");
    let other = tenant(store, "other");
    let selection = MemberSelection { members: members.clone(), ..selection(store, &[], None) };
    assert_eq!(store.missing_members(other, &selection).unwrap(), ["a", "b", "c", "d"], "per tenant");
}

/// A write with its ops prepared ahead (a bulk load's) stores exactly what the same write without
/// them stores: the same outcomes, versions and no-ops, each new version's text byte for byte
/// ([`crate::stamped_json`] of its body at its time, read back as written), and the same
/// compartment and search index entries.
pub fn prepared_writes_store_what_plain_writes_store(store: &dyn Store) {
    let update = |body: Value| WriteOp::Update {
        resource_type: body["resourceType"].as_str().unwrap().to_owned(),
        id: body["id"].as_str().unwrap().to_owned(),
        body,
        if_match: None,
    };
    let bodies = [
        patient("p1"),
        observation("o1", "p1", 1),
        json!({"status": "final", "resourceType": "Observation", "id": "o2",
               "meta": {"profile": ["urn:p"], "tag": [{"code": "t"}]}, "code": {"text": "é \"q\" \\ \u{1}"},
               "subject": {"reference": "Patient/p1"}, "valueQuantity": {"value": 1.50}}),
        // A stamp already in meta: no template.
        json!({"resourceType": "Patient", "id": "p2", "meta": {"versionId": "9"}}),
    ];
    for mode in [WriteMode::Transaction, WriteMode::Batch] {
        let plain = tenant(store, &format!("plain-{mode:?}"));
        let templated = tenant(store, &format!("templated-{mode:?}"));
        for round in 0..3 {
            let mut ops: Vec<WriteOp> = bodies.iter().cloned().map(update).collect();
            if round == 1 {
                // An update of one resource; the others are unchanged.
                ops[1] = update(observation("o1", "p1", 2));
            }
            if round == 2 {
                ops.push(WriteOp::Delete { resource_type: "Patient".into(), id: "p2".into() });
            }
            // One op (the last) has no entry at all.
            let prepared: Vec<Option<PreparedWrite>> = ops[..ops.len() - 1]
                .iter()
                .map(|op| match op {
                    WriteOp::Update { resource_type, body, id, .. } => {
                        Some(PreparedWrite::new(resource_type, id, body))
                    }
                    _ => None,
                })
                .collect();
            let expected = store.write(plain, None, &ops, mode).unwrap();
            let written = store.write_prepared(templated, None, &ops, &prepared, mode).unwrap();
            for ((op, expected), written) in ops.iter().zip(expected).zip(written) {
                let (expected, written) = (expected.unwrap(), written.unwrap());
                let outcome = |w: &Written| (w.version, w.created, w.deleted, w.changed, w.body.is_some());
                assert_eq!(outcome(&written), outcome(&expected), "{mode:?} round {round}: {}", op.id());
                let stored = store.read(templated, &Visibility::Tenant, op.resource_type(), op.id()).unwrap().unwrap();
                // (In round 2, p2's update is followed by its deletion.)
                if round < 2 || op.id() != "p2" {
                    assert_eq!(stored.body, written.body, "read back as written");
                }
                if let (WriteOp::Update { body, id, .. }, true) = (op, written.changed) {
                    let text = crate::stamped_json(body, id, written.version, written.last_updated).unwrap();
                    assert_eq!(written.body.as_deref(), Some(text.as_str()), "{mode:?} round {round}: {id}");
                }
            }
            // The same index entries: search tokens and the patient's compartment.
            let found = |t: TenantId, query: SearchQuery| -> Vec<String> {
                let page = store.search(t, &Visibility::Tenant, &query).unwrap();
                page.resources.into_iter().map(|resource| resource.id).collect()
            };
            let by_patient = || SearchQuery {
                resource_type: "Observation".into(),
                count: 10,
                references: vec![ReferenceQuery { param: "patient", target_type: None, id: "p1".into() }],
                ..Default::default()
            };
            let by_identifier = || SearchQuery {
                resource_type: "Patient".into(),
                count: 10,
                identifiers: vec![IdentifierQuery { system: Some("urn:mrn".into()), value: "mrn-p1".into() }],
                ..Default::default()
            };
            assert_eq!(found(templated, by_patient()), ["o1", "o2"]);
            assert_eq!(found(templated, by_identifier()), ["p1"]);
            assert_eq!(found(templated, by_patient()), found(plain, by_patient()));
            let members = [("p1", None)];
            assert_eq!(
                export_ids(store, templated, &selection(store, &members, None), "Observation"),
                export_ids(store, plain, &selection(store, &members, None), "Observation"),
            );
        }
    }
}

/// Search finds a resource by the identifiers and references of its current version only:
/// an update replaces its tokens (keeping those it still has, dropping the others, through plain
/// and prepared writes alike), a delete removes them all, and a re-creation brings its tokens
/// back. An identifier listed twice leaves with its one row.
pub fn search_tokens_follow_updates_and_deletes(store: &dyn Store) {
    let t = tenant(store, "t");
    let with_identifiers = |values: &[&str], patient: &str, n: i64| -> Value {
        let mut body = observation("o1", patient, n);
        body["identifier"] = values.iter().map(|value| json!({"system": "urn:lab", "value": value})).collect();
        body
    };
    let found = |identifier: &str, patient: &str| -> (Vec<String>, Vec<String>) {
        let search = |query: SearchQuery| -> Vec<String> {
            let query = SearchQuery { resource_type: "Observation".into(), count: 10, ..query };
            store.search(t, &Visibility::Tenant, &query).unwrap().resources.into_iter().map(|r| r.id).collect()
        };
        let by_identifier = SearchQuery {
            identifiers: vec![IdentifierQuery { system: Some("urn:lab".into()), value: identifier.into() }],
            ..Default::default()
        };
        let by_patient = SearchQuery {
            references: vec![ReferenceQuery { param: "patient", target_type: None, id: patient.into() }],
            ..Default::default()
        };
        (search(by_identifier), search(by_patient))
    };
    let o1 = || vec!["o1".to_owned()];
    let none = Vec::<String>::new;
    put(store, t, None, with_identifiers(&["x1", "kept", "x1"], "p1", 1));
    assert_eq!(found("x1", "p1"), (o1(), o1()));
    put(store, t, None, with_identifiers(&["kept", "x2"], "p2", 2));
    assert_eq!(found("x1", "p1"), (none(), none()), "the replaced version's tokens are gone");
    assert_eq!(found("kept", "p2"), (o1(), o1()));
    assert_eq!(found("x2", "p2"), (o1(), o1()));
    // Through a prepared write (a bulk load's path), which finds the resource after trying to
    // insert it.
    let body = with_identifiers(&["x3"], "p3", 3);
    let op =
        WriteOp::Update { resource_type: "Observation".into(), id: "o1".into(), body: body.clone(), if_match: None };
    let prepared = [Some(PreparedWrite::new("Observation", "o1", &body))];
    store.write_prepared(t, None, std::slice::from_ref(&op), &prepared, WriteMode::Transaction).unwrap();
    assert_eq!(found("kept", "p2"), (none(), none()));
    assert_eq!(found("x3", "p3"), (o1(), o1()));
    // Other content changes, the tokens do not.
    put(store, t, None, with_identifiers(&["x3"], "p3", 4));
    assert_eq!(found("x3", "p3"), (o1(), o1()));
    delete(store, t, "Observation", "o1");
    assert_eq!(found("x3", "p3"), (none(), none()), "a tombstone has no tokens");
    put(store, t, None, with_identifiers(&["x1"], "p1", 5));
    assert_eq!(found("x1", "p1"), (o1(), o1()), "re-created");
    assert_eq!(found("x3", "p3"), (none(), none()));
}
