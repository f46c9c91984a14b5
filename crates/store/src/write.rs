//! Writes: the operations a caller asks for, and the pieces every implementation shares
//! (meta stamping, Group member extraction, search tokens).

use bulkhead_fhir::{compartment::parse_reference, format_instant, parse_range, JsonView, Micros};
use serde_json::Value;

/// One write. Ids are assigned by the caller (the HTTP layer assigns server ids before a
/// transaction so `urn:uuid:` references can be rewritten).
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// Creates a new resource; an existing id is a conflict.
    Create { resource_type: String, id: String, body: Value },
    /// Updates, or creates when the id is new (update-as-create). `if_match` is the expected
    /// current version (`If-Match: W/"n"`).
    Update { resource_type: String, id: String, body: Value, if_match: Option<i64> },
    /// Deletes (a tombstone version). Deleting an already deleted resource changes nothing.
    Delete { resource_type: String, id: String },
}

impl WriteOp {
    pub fn id(&self) -> &str {
        match self {
            WriteOp::Create { id, .. } | WriteOp::Update { id, .. } | WriteOp::Delete { id, .. } => id,
        }
    }

    pub fn resource_type(&self) -> &str {
        match self {
            WriteOp::Create { resource_type, .. }
            | WriteOp::Update { resource_type, .. }
            | WriteOp::Delete { resource_type, .. } => resource_type,
        }
    }
}

/// How a list of writes is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// All or nothing (FHIR transaction).
    Transaction,
    /// Each entry on its own (FHIR batch, bulk upload).
    Batch,
}

/// The result of one write.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub resource_type: String,
    pub id: String,
    pub version: i64,
    pub last_updated: Micros,
    /// True when this write created the resource (201), false for an update or delete.
    pub created: bool,
    pub deleted: bool,
    /// False when the write changed nothing (an update with identical content, or deleting a
    /// deleted resource): no new version was made.
    pub changed: bool,
    /// The stored JSON text; `None` for deletes.
    pub body: Option<String>,
}

/// The JSON text to store for a resource: its content with `id`, `meta.versionId` and
/// `meta.lastUpdated` set, keeping the rest of `meta` (profiles, tags, security labels) and the
/// order of every other element. `resourceType`, `id` and `meta` come first.
///
/// Serialises straight from the caller's value, so a write never copies the resource tree.
pub fn stamped_json(body: &Value, id: &str, version: i64, last_updated: Micros) -> Result<String, serde_json::Error> {
    let mut text = Vec::with_capacity(256);
    write_stamped_json(&mut text, body, id, version, last_updated)?;
    // serde_json writes valid UTF-8.
    Ok(String::from_utf8(text).unwrap_or_default())
}

/// [`stamped_json`], appended to `out`: a caller that builds a larger buffer (the PostgreSQL
/// store's binary `COPY` of a batch) serialises each body once, in place.
pub fn write_stamped_json(
    out: &mut Vec<u8>,
    body: &Value,
    id: &str,
    version: i64,
    last_updated: Micros,
) -> Result<(), serde_json::Error> {
    use serde::ser::{SerializeMap, Serializer};

    let empty = serde_json::Map::new();
    let object = body.as_object().unwrap_or(&empty);
    let meta = StampedMeta {
        meta: object.get("meta").and_then(Value::as_object).unwrap_or(&empty),
        version_id: &version.to_string(),
        last_updated: &instant_text(last_updated),
    };
    let mut serializer = serde_json::Serializer::new(out);
    let mut map = serializer.serialize_map(None)?;
    if let Some(resource_type) = object.get("resourceType") {
        map.serialize_entry("resourceType", resource_type)?;
    }
    map.serialize_entry("id", id)?;
    map.serialize_entry("meta", &meta)?;
    for (key, value) in object {
        if !matches!(key.as_str(), "resourceType" | "id" | "meta") {
            map.serialize_entry(key, value)?;
        }
    }
    map.end()
}

/// What a write derives from a resource's body, computed before the write: a bulk load prepares
/// it on its own thread while the previous batch is written, and the writer only stamps the text
/// and inserts the rows. Built from the op's type, id and body ([`PreparedWrite::new`]), it holds
/// exactly what the writer would have computed from them.
#[derive(Debug, Clone)]
pub struct PreparedWrite {
    pub(crate) template: Option<StampTemplate>,
    /// Built by [`PreparedWrite::detached`]: the op's body is a placeholder, and the body is
    /// the template's text.
    pub(crate) detached: bool,
    /// `patient_compartments_of`: the patients whose compartments hold the resource.
    pub(crate) patients: Vec<String>,
    /// `outgoing_references`: references outside the Patient compartment and Provenance targets.
    pub(crate) references: Vec<bulkhead_fhir::references::OutgoingReference>,
    pub(crate) tokens: Vec<(&'static str, String, String)>,
}

impl PreparedWrite {
    pub fn new(resource_type: &str, id: &str, body: &Value) -> PreparedWrite {
        PreparedWrite {
            template: StampTemplate::new(body, id),
            detached: false,
            patients: bulkhead_fhir::compartment::patient_compartments_of(resource_type, id, body),
            references: bulkhead_fhir::references::outgoing_references(resource_type, body),
            tokens: search_tokens(body),
        }
    }

    /// Prepared from a view of the body that is not a `Value` (a bulk load's tape of each
    /// line, [`bulkhead_fhir::JsonTape`]), so that no `Value` is ever built for it: its op carries
    /// `Value::Null` as its body, and a store that needs the body (to compare it with the
    /// current version, or a store that does not use prepared writes) parses it back from
    /// the template ([`PreparedWrite::detached_body`]). `None` when the body's `meta` already
    /// has a stamp (no template): such a body is written from a `Value`.
    ///
    /// `size_hint`: the body's text length, to size the template in one allocation.
    pub fn detached<'a, J: JsonView<'a>>(
        resource_type: &str,
        id: &str,
        body: J,
        size_hint: usize,
    ) -> Option<PreparedWrite> {
        Some(PreparedWrite {
            template: Some(StampTemplate::build(body, id, size_hint + id.len() + 48)?),
            detached: true,
            patients: bulkhead_fhir::compartment::patient_compartments_in(resource_type, id, body),
            references: bulkhead_fhir::references::outgoing_references_in(resource_type, body),
            tokens: search_tokens(body),
        })
    }

    /// The body of a [`PreparedWrite::detached`] write (its op's body is a placeholder),
    /// parsed from the template; `None` for other prepared writes, whose op carries the body.
    /// (Its `meta` has the stamps of version 1 at time 0: every reader of it ignores them.)
    pub fn detached_body(&self) -> Option<Result<Value, serde_json::Error>> {
        let template = self.template.as_ref().filter(|_| self.detached)?;
        Some(bulkhead_fhir::parse_exact(template.stamp(1, 0).as_bytes()))
    }

    /// `op` with its body, when it is the placeholder of a detached write (a store that writes
    /// the ops as they are needs the body itself).
    pub fn attach(&self, op: &WriteOp) -> Result<WriteOp, serde_json::Error> {
        let Some(body) = self.detached_body().transpose()? else { return Ok(op.clone()) };
        Ok(match op {
            WriteOp::Create { resource_type, id, .. } => {
                WriteOp::Create { resource_type: resource_type.clone(), id: id.clone(), body }
            }
            WriteOp::Update { resource_type, id, if_match, .. } => {
                WriteOp::Update { resource_type: resource_type.clone(), id: id.clone(), body, if_match: *if_match }
            }
            WriteOp::Delete { .. } => op.clone(),
        })
    }
}

/// A resource's stored text prepared before its write, up to its stamps: a bulk load builds it
/// on its own thread, and the writer only fills in `meta.versionId` and `meta.lastUpdated`.
/// [`StampTemplate::stamp`] gives exactly [`stamped_json`]'s bytes.
#[derive(Debug, Clone)]
pub struct StampTemplate {
    /// `{"resourceType":…,"id":…,"meta":{` and the other `meta` elements, each followed by a
    /// comma; then, from `tail`, `}` and the resource's other elements and the closing brace.
    text: Vec<u8>,
    tail: usize,
}

impl StampTemplate {
    /// `None` when the resource's `meta` already has a stamp (whose place the stamped text keeps)
    /// or the body is not an object: such a resource is stamped by [`stamped_json`].
    pub fn new(body: &Value, id: &str) -> Option<StampTemplate> {
        StampTemplate::build(body, id, 1024)
    }

    /// [`StampTemplate::new`] for any [`JsonView`] of the body, in a buffer of `capacity`.
    fn build<'a, J: JsonView<'a>>(body: J, id: &str, capacity: usize) -> Option<StampTemplate> {
        if !body.is_object() {
            return None;
        }
        let meta = body.get("meta").filter(|meta| meta.is_object());
        if meta.is_some_and(|meta| meta.get("versionId").is_some() || meta.get("lastUpdated").is_some()) {
            return None;
        }
        let mut text = Vec::with_capacity(capacity);
        text.push(b'{');
        if let Some(resource_type) = body.get("resourceType") {
            template_entry(&mut text, "resourceType", resource_type);
            text.push(b',');
        }
        text.extend_from_slice(b"\"id\":");
        serde_json::to_writer(&mut text, id).ok()?;
        text.extend_from_slice(b",\"meta\":{");
        for (key, value) in meta.into_iter().flat_map(JsonView::entries) {
            template_entry(&mut text, key, value);
            text.push(b',');
        }
        let tail = text.len();
        text.push(b'}');
        for (key, value) in body.entries() {
            if !matches!(key, "resourceType" | "id" | "meta") {
                text.push(b',');
                template_entry(&mut text, key, value);
            }
        }
        text.push(b'}');
        // A batch's templates live until it is written: no doubling slack (a server's memory).
        if text.capacity() - text.len() > 64 {
            text.shrink_to_fit();
        }
        Some(StampTemplate { text, tail })
    }

    /// The stored text of the version `version` written at `last_updated`.
    pub fn stamp(&self, version: i64, last_updated: Micros) -> String {
        let (head, tail) = self.text.split_at(self.tail);
        let last_updated = instant_text(last_updated);
        let mut text = String::with_capacity(self.text.len() + 64);
        // Built by serde_json from `str`s: valid UTF-8, and the stamps are ASCII.
        text.push_str(std::str::from_utf8(head).unwrap_or_default());
        text.push_str("\"versionId\":\"");
        text.push_str(&version.to_string());
        text.push_str("\",\"lastUpdated\":\"");
        text.push_str(&last_updated);
        text.push('"');
        text.push_str(std::str::from_utf8(tail).unwrap_or_default());
        text
    }
}

/// `"key":value`, as serde_json's compact map serialisation writes an entry.
fn template_entry<'a, J: JsonView<'a>>(text: &mut Vec<u8>, key: &str, value: J) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *text, key);
    text.push(b':');
    value.write_compact(text);
}

/// A resource's `meta` with `versionId` and `lastUpdated` set, serialised from the stored
/// resource's own `meta` without copying it: the other elements keep their order, a stamp the
/// `meta` already had keeps its place (with the new value), and a missing one comes last
/// (`versionId` first), exactly as inserting them into a copy of the map would.
struct StampedMeta<'a> {
    meta: &'a serde_json::Map<String, Value>,
    version_id: &'a str,
    last_updated: &'a str,
}

impl serde::Serialize for StampedMeta<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;

        let mut map = serializer.serialize_map(None)?;
        for (key, value) in self.meta {
            match key.as_str() {
                "versionId" => map.serialize_entry(key, self.version_id)?,
                "lastUpdated" => map.serialize_entry(key, self.last_updated)?,
                _ => map.serialize_entry(key, value)?,
            }
        }
        if !self.meta.contains_key("versionId") {
            map.serialize_entry("versionId", self.version_id)?;
        }
        if !self.meta.contains_key("lastUpdated") {
            map.serialize_entry("lastUpdated", self.last_updated)?;
        }
        map.end()
    }
}

/// [`format_instant`], remembered for the last instant formatted on this thread: every resource
/// of a batch is stamped with the same one.
fn instant_text(at: Micros) -> String {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(Micros, String)>> = const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((cached, text)) if *cached == at => text.clone(),
            _ => {
                let text = format_instant(at);
                *last = Some((at, text.clone()));
                text
            }
        }
    })
}

/// The patient ids a Group (as stored JSON text) exports at time `at`: every `member.entity`
/// that references a Patient, except members marked `inactive: true` or whose `period.end` is
/// before `at`. Sorted and deduplicated.
///
/// Reads only the member fields, borrowing from the text: a 100,000-member Group costs a list
/// of ids, not a JSON tree. (An export reads a Group's members through
/// [`crate::Store::group_at`] instead, which parses each stored version once.)
pub fn group_members(group: &str, at: Micros) -> Result<Vec<String>, serde_json::Error> {
    let members = crate::members::GroupMembers::from_listed(member_list(group)?).at(at);
    Ok(members.ids().map(str::to_owned).collect())
}

/// The Patient members of a Group not marked inactive, each with the end of its `period.end`
/// (None: no end, or one that does not parse), sorted.
pub(crate) fn member_list(group: &str) -> Result<Vec<(String, Option<Micros>)>, serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct Group<'a> {
        #[serde(borrow, default)]
        member: Vec<Member<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Member<'a> {
        #[serde(borrow)]
        entity: Option<Reference<'a>>,
        inactive: Option<bool>,
        #[serde(borrow)]
        period: Option<Period<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Reference<'a> {
        #[serde(borrow)]
        reference: Option<std::borrow::Cow<'a, str>>,
    }
    #[derive(serde::Deserialize)]
    struct Period<'a> {
        #[serde(borrow)]
        end: Option<std::borrow::Cow<'a, str>>,
    }
    let group: Group<'_> = serde_json::from_str(group)?;
    let mut members: Vec<(String, Option<Micros>)> = group
        .member
        .iter()
        .filter(|member| member.inactive != Some(true))
        .filter_map(|member| {
            let end = member.period.as_ref().and_then(|period| period.end.as_deref());
            let end = end.and_then(|end| parse_range(end).ok()).map(|range| range.end);
            let (target_type, id) = parse_reference(member.entity.as_ref()?.reference.as_deref()?)?;
            (target_type == "Patient").then(|| (id.to_owned(), end))
        })
        .collect();
    members.sort_unstable();
    Ok(members)
}

/// A search token: `(param, system, value)`. Identifiers give `("identifier", system, value)`;
/// `subject` and `patient` references give `(param, target type, target id)`.
pub(crate) fn search_tokens<'a, J: JsonView<'a>>(body: J) -> Vec<(&'static str, String, String)> {
    let mut tokens = Vec::new();
    each_element(body.get("identifier"), |identifier| {
        if let Some(value) = identifier.get("value").and_then(JsonView::as_str) {
            let system = identifier.get("system").and_then(JsonView::as_str).unwrap_or("");
            tokens.push(("identifier", system.to_owned(), value.to_owned()));
        }
    });
    for param in ["subject", "patient"] {
        each_element(body.get(param), |reference| {
            if let Some((target_type, id)) =
                reference.get("reference").and_then(JsonView::as_str).and_then(parse_reference)
            {
                tokens.push((param, target_type.to_owned(), id.to_owned()));
            }
        });
    }
    tokens
}

/// Each item of an array, or an object itself (a repeating element sent as one value).
fn each_element<'a, J: JsonView<'a>>(value: Option<J>, mut visit: impl FnMut(J)) {
    match value {
        Some(items) if items.is_array() => items.items().for_each(visit),
        Some(item) if item.is_object() => visit(item),
        _ => {}
    }
}

/// The no-op answer to an update whose `body` has the content of the current version
/// (`stored_text`, ignoring `meta.versionId` and `meta.lastUpdated`): that version, unchanged.
/// `None` when the content differs. The stored text is parsed as the incoming body was, so equal
/// digits compare equal.
pub(crate) fn unchanged_write(
    stored_text: String,
    last_updated: Micros,
    version: i64,
    resource_type: &str,
    id: &str,
    body: &Value,
) -> Result<Option<Written>, crate::StoreError> {
    let mut stored: Value = bulkhead_fhir::parse_exact(stored_text.as_bytes())?;
    let mut incoming = body.clone();
    for value in [&mut stored, &mut incoming] {
        if let Some(meta) = value.get_mut("meta").and_then(Value::as_object_mut) {
            meta.remove("versionId");
            meta.remove("lastUpdated");
            if meta.is_empty() {
                value.as_object_mut().map(|object| object.remove("meta"));
            }
        }
        value.as_object_mut().map(|object| object.insert("id".into(), Value::String(id.to_owned())));
    }
    if stored != incoming {
        return Ok(None);
    }
    Ok(Some(Written {
        resource_type: resource_type.to_owned(),
        id: id.to_owned(),
        version,
        last_updated,
        created: false,
        deleted: false,
        changed: false,
        body: Some(stored_text),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stamping_keeps_other_meta_and_order() {
        let original = json!({"gender": "male", "resourceType": "Patient", "meta": {"profile": ["p"], "versionId": "9"}, "id": "old", "active": true});
        let text = stamped_json(&original, "a", 3, 0).unwrap();
        assert!(
            text.starts_with(r#"{"resourceType":"Patient","id":"a","meta":{"profile":["p"],"versionId":"3""#),
            "{text}"
        );
        assert!(text.ends_with(r#""gender":"male","active":true}"#), "{text}");
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["id"], "a");
        assert_eq!(body["meta"]["versionId"], "3");
        assert_eq!(body["meta"]["lastUpdated"], "1970-01-01T00:00:00.000000Z");
        assert_eq!(body["meta"]["profile"][0], "p");
    }

    /// The stamped `meta` is byte for byte what inserting the stamps into a copy of the map
    /// gives: a stamp already there keeps its place, missing ones come last, `versionId` first.
    #[test]
    fn stamps_replace_in_place_and_append_in_order() {
        let cases = [
            json!({"resourceType": "Patient"}),
            json!({"resourceType": "Patient", "meta": {}}),
            json!({"resourceType": "Patient", "meta": "not an object"}),
            json!({"resourceType": "Patient", "meta": {"lastUpdated": "x", "tag": [{"code": "t"}], "versionId": "7"}}),
            json!({"resourceType": "Patient", "meta": {"source": "s", "lastUpdated": "x"}}),
            json!({"resourceType": "Patient", "meta": {"versionId": "2", "profile": ["p"]}}),
        ];
        for (index, body) in cases.iter().enumerate() {
            let at = 1_700_000_000_123_456 + index as i64;
            let mut meta = match body.get("meta") {
                Some(Value::Object(meta)) => meta.clone(),
                _ => serde_json::Map::new(),
            };
            meta.insert("versionId".into(), Value::String("3".into()));
            meta.insert("lastUpdated".into(), Value::String(format_instant(at)));
            let expected = format!(r#"{{"resourceType":"Patient","id":"a","meta":{}}}"#, Value::Object(meta));
            assert_eq!(stamped_json(body, "a", 3, at).unwrap(), expected, "case {index}");
            assert_eq!(stamped_json(body, "a", 3, at).unwrap(), expected, "case {index}, the instant remembered");
        }
    }

    /// A template stamps exactly the bytes `stamped_json` writes, whatever the element order,
    /// escapes, numbers and `meta`; a `meta` that already has a stamp gets no template.
    #[test]
    fn templates_stamp_the_same_bytes() {
        let bodies = [
            r#"{"resourceType":"Observation","id":"o","status":"final","valueQuantity":{"value":1.50}}"#,
            r#"{"status":"final","id":"other","resourceType":"Observation","meta":{"profile":["p"]}}"#,
            r#"{"resourceType":"Patient","meta":{},"name":[{"text":"a \"q\" \\ \u0001 é \/ \u00e9"}],"n":1e2}"#,
            r#"{"meta":{"tag":[{"code":"t"}],"source":"s"},"resourceType":"Patient","a":[],"b":{},"c":null}"#,
            r#"{"resourceType":"Patient","meta":"not an object","x":-0.0}"#,
            r#"{"id":"no-type"}"#,
        ];
        for (index, text) in bodies.iter().enumerate() {
            let body = bulkhead_fhir::parse_exact(text.as_bytes()).unwrap();
            let at = 1_700_000_000_000_001 + index as i64;
            let template = StampTemplate::new(&body, "new-id").unwrap();
            for version in [1, 12] {
                assert_eq!(template.stamp(version, at), stamped_json(&body, "new-id", version, at).unwrap(), "{text}");
            }
        }
        for stamped in [r#"{"resourceType":"Patient","meta":{"versionId":"3"}}"#, r#"{"meta":{"lastUpdated":"x"}}"#] {
            let body: Value = serde_json::from_str(stamped).unwrap();
            assert!(StampTemplate::new(&body, "a").is_none(), "{stamped}");
        }
        assert!(StampTemplate::new(&json!([1]), "a").is_none());
    }

    /// Prepared from a tape of the text, a write holds exactly what it holds prepared from the
    /// text's `Value`: the same stored bytes, compartments, references and search tokens, and
    /// the body read back from the template is the `Value`.
    #[test]
    fn detached_writes_prepare_what_value_writes_prepare() {
        let bodies = [
            r#"{"resourceType":"Observation","id":"o","status":"final","subject":{"reference":"Patient/p"},"valueQuantity":{"value":1.50}}"#,
            r#"{"status":"final","id":"o2","resourceType":"Observation","meta":{"profile":["p"]},"performer":[{"reference":"Practitioner/x"}]}"#,
            r#"{"resourceType":"Patient","id":"p","meta":{},"name":[{"text":"a \"q\" \\ \u0001 é \/ \u00e9"}],"n":-0.0}"#,
            r#" {"meta" : {"tag":[{"code":"t"}],"source":"s"},"resourceType":"Patient","id":"p2","identifier":{"system":"s","value":"v"},"a":[],"b":{},"c":null} "#,
            r#"{"resourceType":"Provenance","id":"v","target":[{"reference":"Observation/o"},{"reference":"Practitioner/x"}],"patient":[{"reference":"Patient/p"}]}"#,
            r#"{"resourceType":"Patient","id":"p3","meta":"not an object","link":[{"other":{"reference":"Patient/p"}}]}"#,
        ];
        for (index, text) in bodies.iter().enumerate() {
            let value = bulkhead_fhir::parse_exact(text.as_bytes()).unwrap();
            let resource_type = value["resourceType"].as_str().unwrap();
            let id = value["id"].as_str().unwrap();
            let mut buffers = bulkhead_fhir::TapeBuffers::default();
            let tape = bulkhead_fhir::JsonTape::parse(text, &mut buffers).unwrap();
            let detached = PreparedWrite::detached(resource_type, id, tape.root(), text.len()).unwrap();
            let plain = PreparedWrite::new(resource_type, id, &value);
            let at = 1_700_000_000_000_001 + index as i64;
            let stamped = stamped_json(&value, id, 4, at).unwrap();
            assert_eq!(detached.template.as_ref().unwrap().stamp(4, at), stamped, "{text}");
            assert_eq!(plain.template.as_ref().unwrap().stamp(4, at), stamped, "{text}");
            assert_eq!(detached.patients, plain.patients, "{text}");
            assert_eq!(detached.references, plain.references, "{text}");
            assert_eq!(detached.tokens, plain.tokens, "{text}");
            let mut body = detached.detached_body().unwrap().unwrap();
            let meta = body["meta"].as_object_mut().unwrap();
            meta.remove("versionId");
            meta.remove("lastUpdated");
            let mut expected = value.clone();
            if !expected["meta"].is_object() {
                expected.as_object_mut().unwrap().insert("meta".into(), json!({}));
            }
            assert_eq!(body, expected, "{text}");
            assert!(plain.detached_body().is_none());
        }
        let stamped = r#"{"resourceType":"Patient","id":"a","meta":{"versionId":"3"}}"#;
        let mut buffers = bulkhead_fhir::TapeBuffers::default();
        let tape = bulkhead_fhir::JsonTape::parse(stamped, &mut buffers).unwrap();
        assert!(PreparedWrite::detached("Patient", "a", tape.root(), stamped.len()).is_none());
    }

    #[test]
    fn inactive_and_ended_members_are_not_exported() {
        let group = json!({"member": [
            {"entity": {"reference": "Patient/b"}},
            {"entity": {"reference": "Patient/a"}},
            {"entity": {"reference": "Patient/a"}},
            {"entity": {"reference": "Patient/c"}, "inactive": true},
            {"entity": {"reference": "Patient/d"}, "period": {"end": "2000-01-01"}},
            {"entity": {"reference": "Patient/e"}, "period": {"end": "2999-01-01"}},
            {"entity": {"reference": "Practitioner/f"}},
        ]});
        assert_eq!(group_members(&group.to_string(), bulkhead_fhir::now_micros()).unwrap(), vec!["a", "b", "e"]);
    }

    /// A large Group's list, filtered at each time: an ended member goes, one listed again
    /// without an end stays.
    #[test]
    fn a_large_groups_members_are_filtered_at_each_time() {
        let members = |ended: &str| {
            let mut member: Vec<Value> =
                (0..3_000).map(|i| json!({"entity": {"reference": format!("Patient/p{i:05}")}})).collect();
            member.push(json!({"entity": {"reference": "Patient/late"}, "period": {"end": ended}}));
            member.push(json!({"entity": {"reference": "Patient/p00001"}, "period": {"end": "2001-01-01"}}));
            json!({"resourceType": "Group", "member": member}).to_string()
        };
        let text = members("2010-01-01");
        let before = bulkhead_fhir::parse_since("2009-12-31").unwrap();
        let after = bulkhead_fhir::parse_since("2010-01-02").unwrap();
        let early = group_members(&text, before).unwrap();
        assert_eq!(early.len(), 3_001);
        assert!(early.contains(&"late".to_owned()) && early.contains(&"p00001".to_owned()));
        assert!(early.windows(2).all(|pair| pair[0] < pair[1]), "sorted, each once");
        let later = group_members(&text, after).unwrap();
        assert_eq!(later.len(), 3_000, "the ended member is gone at a later time");
        assert!(!later.contains(&"late".to_owned()));
        assert!(later.contains(&"p00001".to_owned()), "still a member through its other entry");
        let changed = members("2020-01-01");
        assert_eq!(group_members(&changed, after).unwrap().len(), 3_001, "another text is parsed afresh");
    }
}
