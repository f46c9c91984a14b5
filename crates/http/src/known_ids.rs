//! The type of every id seen in a load, which [`crate::ndjson_import`] needs to rewrite
//! `urn:uuid:<id>` references to `Type/<id>`.
//!
//! It grows with the load, so its memory is bounded: the most recent ids are kept in a hash
//! table that never grows past a fixed size; when it is full, its entries are written, sorted, to
//! an anonymous temporary file (a *run*) and found there again through an in-memory index of the
//! first key of each block of the run. A lookup reads at most one block per run, and runs are
//! merged into one whenever there are more than [`MAX_RUNS`], so a lookup that misses the table
//! costs at most `MAX_RUNS + 1` small reads from the page cache. Most `urn:uuid:` targets are
//! near their references (a Bundle, a patient's file), so most lookups never leave the table.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::os::unix::fs::FileExt;

/// Canonical UUIDs kept in memory: 7/8 of 2^20 slots, so the table (17 bytes and a control
/// byte per slot, 18.9 MB) is allocated once and never grows.
const UUIDS_IN_MEMORY: usize = 917_504;
/// Other ids kept in memory: 7/8 of 2^17 slots of 66 bytes (8.7 MB). Real loads rarely have any.
const OTHERS_IN_MEMORY: usize = 114_688;
/// Records per block of a run: one block is what a lookup reads from the file.
const BLOCK: usize = 256;
/// Runs are merged into one when there are more than this many.
const MAX_RUNS: usize = 4;

/// `id` → the index of its type in [`bulkhead_fhir::RESOURCE_TYPES`], for every id of a load.
/// An id in the canonical UUID form (lower-case hex with hyphens, as Synthea and most exporters
/// write them, and as FHIR's `uuid` type requires) is keyed by its 16 bytes; any other id by its
/// text (a valid FHIR id is at most 64 bytes and has no NUL, so zero padding keeps keys apart).
pub(crate) struct KnownIds {
    uuids: SpillingMap<16, 1>,
    others: SpillingMap<64, 1>,
}

const _: () = assert!(bulkhead_fhir::RESOURCE_TYPES.len() <= 256);

impl Default for KnownIds {
    fn default() -> KnownIds {
        KnownIds::with_limits(UUIDS_IN_MEMORY, OTHERS_IN_MEMORY)
    }
}

impl KnownIds {
    /// At most `uuids` and `others` entries in memory (tests use small limits).
    fn with_limits(uuids: usize, others: usize) -> KnownIds {
        KnownIds { uuids: SpillingMap::new(uuids), others: SpillingMap::new(others) }
    }

    /// The 16 bytes of an id that is exactly a canonical UUID (so no two ids share a key).
    fn uuid_key(id: &str) -> Option<[u8; 16]> {
        if id.len() != 36 {
            return None;
        }
        let uuid = uuid::Uuid::try_parse(id).ok()?;
        let mut text = [0u8; 36];
        (uuid.hyphenated().encode_lower(&mut text).as_bytes() == id.as_bytes()).then(|| uuid.into_bytes())
    }

    fn text_key(id: &str) -> Option<[u8; 64]> {
        let mut key = [0u8; 64];
        key.get_mut(..id.len())?.copy_from_slice(id.as_bytes());
        (!id.as_bytes().contains(&0)).then_some(key)
    }

    /// Records `id` as a `resource_type`; the last type recorded for an id wins. An id that is
    /// no valid FHIR id (longer than 64 bytes) is not recorded: its resource is refused anyway.
    pub(crate) fn insert(&mut self, id: &str, resource_type: &'static str) -> io::Result<()> {
        let Some(index) = bulkhead_fhir::resource_type_index(resource_type) else { return Ok(()) };
        let index = index as u8;
        if let Some(key) = KnownIds::uuid_key(id) {
            return self.uuids.insert(key, [index]);
        }
        match KnownIds::text_key(id) {
            Some(key) => self.others.insert(key, [index]),
            None => Ok(()),
        }
    }

    pub(crate) fn get(&self, id: &str) -> io::Result<Option<&'static str>> {
        let index = match KnownIds::uuid_key(id) {
            Some(key) => self.uuids.get(&key)?,
            None => match KnownIds::text_key(id) {
                Some(key) => self.others.get(&key)?,
                None => None,
            },
        };
        Ok(index.and_then(|[index]| bulkhead_fhir::RESOURCE_TYPES.get(usize::from(index)).copied()))
    }
}

/// `urn:uuid:` aliases kept in memory: 7/8 of 2^16 slots of 81 bytes (5.3 MB at most), and of
/// 2^14 slots of 129 bytes for other keys (2.1 MB). Real loads have few (an alias is a Bundle
/// entry whose resource has an id other than its fullUrl's uuid), so the tables stay small.
const ALIASES_IN_MEMORY: (usize, usize) = (57_344, 14_336);

/// The `Type/id` that a Bundle entry's `urn:uuid:<uuid>` fullUrl stands for, when `<uuid>` is
/// not the resource's id (a reference `urn:uuid:<uuid>` is then rewritten to that `Type/id`).
/// Only `urn:uuid:` fullUrls are kept: no other reference is looked up. Bounded as
/// [`KnownIds`] is: a uuid is keyed as an id is, a tail longer than a FHIR id (no UUID) by its
/// SHA-256; the value is the type's index and the id (a valid FHIR id: at most 64 bytes, no NUL).
pub(crate) struct FullUrlAliases {
    uuids: SpillingMap<16, 65>,
    others: SpillingMap<64, 65>,
}

impl Default for FullUrlAliases {
    fn default() -> FullUrlAliases {
        FullUrlAliases::with_limits(ALIASES_IN_MEMORY.0, ALIASES_IN_MEMORY.1)
    }
}

impl FullUrlAliases {
    /// At most `uuids` and `others` aliases in memory (tests use small limits).
    fn with_limits(uuids: usize, others: usize) -> FullUrlAliases {
        FullUrlAliases { uuids: SpillingMap::new(uuids), others: SpillingMap::new(others) }
    }

    /// The key of `uuid`, the text after `urn:uuid:`: its 16 bytes or its text as for an id, or
    /// for a longer text its SHA-256 followed by 32 bytes of 0xFF, which no UTF-8 text has.
    fn key(uuid: &str) -> Result<[u8; 16], [u8; 64]> {
        if let Some(key) = KnownIds::uuid_key(uuid) {
            return Ok(key);
        }
        Err(KnownIds::text_key(uuid).unwrap_or_else(|| {
            use sha2::Digest;
            let mut key = [0xFF; 64];
            key[..32].copy_from_slice(&sha2::Sha256::digest(uuid.as_bytes()));
            key
        }))
    }

    /// Records that `urn:uuid:<uuid>` stands for `resource_type/id`; the last one recorded wins.
    /// An id that is no valid FHIR id is not recorded: its resource is refused anyway.
    pub(crate) fn insert(&mut self, uuid: &str, resource_type: &'static str, id: &str) -> io::Result<()> {
        let Some(index) = bulkhead_fhir::resource_type_index(resource_type) else { return Ok(()) };
        let Some(text) = KnownIds::text_key(id) else { return Ok(()) };
        let mut value = [0u8; 65];
        value[0] = index as u8;
        value[1..].copy_from_slice(&text);
        match FullUrlAliases::key(uuid) {
            Ok(key) => self.uuids.insert(key, value),
            Err(key) => self.others.insert(key, value),
        }
    }

    /// Aliases held in memory (for tests).
    #[cfg(test)]
    pub(crate) fn in_memory(&self) -> usize {
        self.uuids.memory.len() + self.others.memory.len()
    }

    /// The `Type/id` that `urn:uuid:<uuid>` stands for, if it was recorded.
    pub(crate) fn get(&self, uuid: &str) -> io::Result<Option<String>> {
        let value = match FullUrlAliases::key(uuid) {
            Ok(key) => self.uuids.get(&key)?,
            Err(key) => self.others.get(&key)?,
        };
        Ok(value.and_then(|value| {
            let resource_type = bulkhead_fhir::RESOURCE_TYPES.get(usize::from(value[0]))?;
            let id = &value[1..];
            let id = std::str::from_utf8(&id[..id.iter().position(|byte| *byte == 0).unwrap_or(id.len())]).ok()?;
            Some(format!("{resource_type}/{id}"))
        }))
    }
}

/// Fixed-width keys → fixed-width values, at most `limit` of them in memory, the rest in sorted
/// runs.
struct SpillingMap<const K: usize, const V: usize> {
    memory: HashMap<[u8; K], [u8; V]>,
    limit: usize,
    /// Oldest first: a key in a later run (or in memory) was recorded later.
    runs: Vec<Run<K, V>>,
}

impl<const K: usize, const V: usize> SpillingMap<K, V> {
    fn new(limit: usize) -> SpillingMap<K, V> {
        SpillingMap { memory: HashMap::new(), limit: limit.max(1), runs: Vec::new() }
    }

    fn insert(&mut self, key: [u8; K], value: [u8; V]) -> io::Result<()> {
        self.memory.insert(key, value);
        if self.memory.len() >= self.limit {
            self.spill()?;
        }
        Ok(())
    }

    fn get(&self, key: &[u8; K]) -> io::Result<Option<[u8; V]>> {
        if let Some(value) = self.memory.get(key) {
            return Ok(Some(*value));
        }
        for run in self.runs.iter().rev() {
            if let Some(value) = run.get(key)? {
                return Ok(Some(value));
            }
        }
        Ok(None)
    }

    /// Writes the table out as a run (its allocation is kept for the next entries).
    fn spill(&mut self) -> io::Result<()> {
        let mut entries: Vec<([u8; K], [u8; V])> = self.memory.drain().collect();
        entries.sort_unstable_by_key(|entry| entry.0);
        let mut writer = RunWriter::new()?;
        for (key, value) in &entries {
            writer.push(key, value)?;
        }
        self.runs.push(writer.finish()?);
        if self.runs.len() > MAX_RUNS {
            self.merge()?;
        }
        Ok(())
    }

    /// Merges every run into one; of a key in several runs, the latest run's value is kept.
    fn merge(&mut self) -> io::Result<()> {
        let mut readers = self.runs.iter().map(Run::reader).collect::<io::Result<Vec<_>>>()?;
        let mut heads = readers.iter_mut().map(RunReader::next).collect::<io::Result<Vec<_>>>()?;
        let mut writer = RunWriter::new()?;
        while let Some(smallest) = heads.iter().filter_map(|head| head.map(|(key, _)| key)).min() {
            // Every run holding the key moves past it; the latest run's value is the one kept.
            let mut value = [0; V];
            for (run, head) in heads.iter_mut().enumerate() {
                if let Some((key, run_value)) = *head {
                    if key == smallest {
                        value = run_value;
                        *head = readers[run].next()?;
                    }
                }
            }
            writer.push(&smallest, &value)?;
        }
        self.runs = vec![writer.finish()?];
        Ok(())
    }
}

/// Records of a run: `K` bytes of key and `V` bytes of value, sorted by key, keys unique.
struct Run<const K: usize, const V: usize> {
    file: File,
    records: usize,
    /// The first key of each block of [`BLOCK`] records.
    firsts: Vec<[u8; K]>,
}

impl<const K: usize, const V: usize> Run<K, V> {
    const RECORD: usize = K + V;

    fn get(&self, key: &[u8; K]) -> io::Result<Option<[u8; V]>> {
        let Some(block) = self.firsts.partition_point(|first| first <= key).checked_sub(1) else {
            return Ok(None);
        };
        let start = block * BLOCK;
        let count = BLOCK.min(self.records - start);
        let mut bytes = vec![0u8; count * Self::RECORD];
        self.file.read_exact_at(&mut bytes, (start * Self::RECORD) as u64)?;
        let records: Vec<&[u8]> = bytes.chunks_exact(Self::RECORD).collect();
        let found = records.binary_search_by(|record| record[..K].cmp(key)).ok();
        Ok(found.and_then(|found| records[found][K..].try_into().ok()))
    }

    fn reader(&self) -> io::Result<RunReader<K, V>> {
        let mut file = self.file.try_clone()?;
        file.rewind()?;
        Ok(RunReader { file: BufReader::new(file) })
    }
}

struct RunReader<const K: usize, const V: usize> {
    file: BufReader<File>,
}

impl<const K: usize, const V: usize> RunReader<K, V> {
    fn next(&mut self) -> io::Result<Option<([u8; K], [u8; V])>> {
        let mut key = [0u8; K];
        match self.file.read_exact(&mut key) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(error) => return Err(error),
        }
        let mut value = [0u8; V];
        self.file.read_exact(&mut value)?;
        Ok(Some((key, value)))
    }
}

struct RunWriter<const K: usize, const V: usize> {
    file: BufWriter<File>,
    records: usize,
    firsts: Vec<[u8; K]>,
}

impl<const K: usize, const V: usize> RunWriter<K, V> {
    fn new() -> io::Result<RunWriter<K, V>> {
        Ok(RunWriter { file: BufWriter::new(tempfile::tempfile()?), records: 0, firsts: Vec::new() })
    }

    /// Appends a record; keys come in ascending order.
    fn push(&mut self, key: &[u8; K], value: &[u8; V]) -> io::Result<()> {
        if self.records.is_multiple_of(BLOCK) {
            self.firsts.push(*key);
        }
        self.file.write_all(key)?;
        self.file.write_all(value)?;
        self.records += 1;
        Ok(())
    }

    fn finish(self) -> io::Result<Run<K, V>> {
        let file = self.file.into_inner().map_err(io::IntoInnerError::into_error)?;
        Ok(Run { file, records: self.records, firsts: self.firsts })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A canonical UUID is kept as 16 bytes; any other spelling of an id (upper case, no
    /// hyphens, not a UUID at all) is kept as its text, so no two ids share an entry.
    #[test]
    fn known_ids_keep_every_spelling_apart() {
        let lower = "6f1c7c1e-3b8a-4c4e-9d5f-0a1b2c3d4e5f";
        let mut known = KnownIds::default();
        known.insert(lower, "Patient").unwrap();
        known.insert(&lower.to_uppercase(), "Practitioner").unwrap();
        known.insert(&lower.replace('-', ""), "Organization").unwrap();
        known.insert("p1", "Encounter").unwrap();
        assert_eq!((known.uuids.memory.len(), known.others.memory.len()), (1, 3));
        assert_eq!(known.get(lower).unwrap(), Some("Patient"));
        assert_eq!(known.get(&lower.to_uppercase()).unwrap(), Some("Practitioner"));
        assert_eq!(known.get(&lower.replace('-', "")).unwrap(), Some("Organization"));
        assert_eq!(known.get("p1").unwrap(), Some("Encounter"));
        assert_eq!(known.get("6f1c7c1e-3b8a-4c4e-9d5f-0a1b2c3d4e50").unwrap(), None);
        known.insert(lower, "Group").unwrap();
        assert_eq!(known.get(lower).unwrap(), Some("Group"), "the last type seen wins, as before");
    }

    fn uuid(n: u64) -> String {
        uuid::Uuid::from_u64_pair(n.wrapping_mul(0x9e37_79b9_7f4a_7c15), n).hyphenated().to_string()
    }

    /// Past the memory limit the ids go to runs, runs are merged, and every id is still found
    /// with the type recorded last, whether that was in memory, in one run or across a merge.
    #[test]
    fn ids_past_the_memory_limit_are_found_in_runs_with_their_last_type() {
        let types = bulkhead_fhir::RESOURCE_TYPES;
        let mut known = KnownIds::with_limits(100, 10);
        let count = 5_000u64;
        for n in 0..count {
            known.insert(&uuid(n), types[(n % 7) as usize]).unwrap();
            known.insert(&format!("text-{n}"), types[(n % 5) as usize]).unwrap();
        }
        // Every third id is recorded again, later, with another type.
        for n in (0..count).step_by(3) {
            known.insert(&uuid(n), types[10]).unwrap();
        }
        assert!(known.uuids.memory.len() < 100 && known.others.memory.len() < 10, "memory stays bounded");
        assert!((1..=MAX_RUNS).contains(&known.uuids.runs.len()), "runs were merged");
        assert!(known.others.runs.len() <= MAX_RUNS);
        for n in 0..count {
            let expected = if n % 3 == 0 { types[10] } else { types[(n % 7) as usize] };
            assert_eq!(known.get(&uuid(n)).unwrap(), Some(expected), "uuid {n}");
            assert_eq!(known.get(&format!("text-{n}")).unwrap(), Some(types[(n % 5) as usize]), "text {n}");
        }
        assert_eq!(known.get(&uuid(count)).unwrap(), None);
        assert_eq!(known.get("text-unknown").unwrap(), None);
        // Keys below the first of a run and above its last are absent, not errors.
        assert_eq!(known.get("0").unwrap(), None);
        assert_eq!(known.get("zzzz").unwrap(), None);
    }

    /// Aliases past the memory limit go to runs and are found with the `Type/id` recorded last;
    /// a uuid, another tail and a tail longer than an id (keyed by its hash) are kept apart.
    #[test]
    fn full_url_aliases_past_the_memory_limit_are_found_with_their_last_target() {
        let types = bulkhead_fhir::RESOURCE_TYPES;
        let mut aliases = FullUrlAliases::with_limits(50, 10);
        let long = |n: u64| format!("{}-{n}", "l".repeat(80));
        let count = 2_000u64;
        for n in 0..count {
            aliases.insert(&uuid(n), types[(n % 7) as usize], &format!("u{n}")).unwrap();
            aliases.insert(&format!("tail-{n}"), types[(n % 5) as usize], &format!("t{n}")).unwrap();
            aliases.insert(&long(n), "Patient", &"i".repeat(64)).unwrap();
        }
        for n in (0..count).step_by(3) {
            aliases.insert(&uuid(n), "Group", &format!("again{n}")).unwrap();
        }
        assert!(aliases.uuids.memory.len() < 50 && aliases.others.memory.len() < 10, "memory stays bounded");
        assert!(!aliases.uuids.runs.is_empty() && aliases.uuids.runs.len() <= MAX_RUNS);
        for n in 0..count {
            let expected =
                if n % 3 == 0 { format!("Group/again{n}") } else { format!("{}/u{n}", types[(n % 7) as usize]) };
            assert_eq!(aliases.get(&uuid(n)).unwrap(), Some(expected), "uuid {n}");
            let tail = aliases.get(&format!("tail-{n}")).unwrap();
            assert_eq!(tail, Some(format!("{}/t{n}", types[(n % 5) as usize])), "tail {n}");
            assert_eq!(aliases.get(&long(n)).unwrap(), Some(format!("Patient/{}", "i".repeat(64))), "long {n}");
        }
        assert_eq!(aliases.get(&uuid(count)).unwrap(), None);
        assert_eq!(aliases.get(&long(count)).unwrap(), None);
        assert_eq!(aliases.get(&uuid(1).to_uppercase()).unwrap(), None, "another spelling is another alias");
    }

    #[test]
    fn an_id_longer_than_a_fhir_id_is_not_recorded() {
        let mut known = KnownIds::default();
        let long = "a".repeat(65);
        known.insert(&long, "Patient").unwrap();
        assert_eq!(known.get(&long).unwrap(), None);
        let longest = "a".repeat(64);
        known.insert(&longest, "Patient").unwrap();
        assert_eq!(known.get(&longest).unwrap(), Some("Patient"));
    }
}
