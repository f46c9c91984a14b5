//! A `.json` Bundle read entry by entry: each element of `entry` is parsed and handed to the
//! importer as soon as its text is read, so an import's memory does not grow with the file (a
//! 1 GB Bundle parsed whole took more than 15 GB: BENCHMARKS.md, session 15).
//!
//! Only a Bundle whose `resourceType` comes before its `entry` can be read so (as every
//! exporter writes them): until `resourceType` is read, an `entry` might be a List's. Any other
//! document is left to the caller, which reads it whole within the limit for one resource.

use std::cell::Cell;
use std::fmt;
use std::io::{self, BufRead, Read};
use std::rc::Rc;

use bulkhead_http::ndjson_import::{Importer, Location};
use bulkhead_store::StoreError;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

/// What [`stream_bundle`] did with a file.
#[derive(Debug, PartialEq, Eq)]
pub enum Streamed {
    /// A Bundle: every entry was handed to the importer (a file that broke off or held
    /// malformed JSON part-way is reported as one refusal after the entries before it).
    Bundle,
    /// Not a Bundle with `resourceType` before `entry` (or no JSON object): nothing was handed
    /// over; the file is to be read whole.
    NotStreamable,
}

/// Reads the JSON document in `reader` (a file named `source`) and, when it is a Bundle whose
/// `resourceType` comes first, adds its entries one at a time. One entry's text may be at most
/// `max_entry` bytes (the limit for one resource): a longer one is refused and the rest of the
/// file is not read. `progress(resources_processed)` now and then. `Err` for the store's
/// failure or a failure to read the file, which stop the import.
pub fn stream_bundle<R: BufRead>(
    importer: &mut Importer,
    source: &str,
    mut reader: R,
    max_entry: usize,
    progress: &mut dyn FnMut(u64),
) -> anyhow::Result<Streamed> {
    // Anything but an object is no Bundle: the whole-file path words the refusal (the parser
    // would read a top-level string whole to name it in its error).
    if !starts_an_object(&mut reader) {
        return Ok(Streamed::NotStreamable);
    }
    let position = Rc::new(Cell::new(0u64));
    let limit = Rc::new(Cell::new(u64::MAX));
    let bounded = Bounded { inner: reader, position: position.clone(), limit: limit.clone() };
    let mut state = BundleState {
        importer,
        source,
        max_entry,
        position,
        limit,
        progress,
        streaming: false,
        next_index: 0,
        outcome: Outcome::Read,
    };
    let mut deserializer = serde_json::Deserializer::from_reader(bounded);
    let parsed = (&mut deserializer).deserialize_map(BundleVisitor(&mut state)).and_then(|()| deserializer.end());
    let BundleState { importer, streaming, outcome, .. } = state;
    match (outcome, parsed) {
        (Outcome::StoreFailed(error), _) => Err(error.into()),
        // The file could not be read (a disk error, a corrupt gzip stream): not a refusal of
        // its text, an import that cannot go on.
        (Outcome::Read, Err(error)) if error.is_io() => {
            Err(anyhow::Error::new(error).context(format!("reading {source}")))
        }
        (Outcome::NotStreamable, _) => Ok(Streamed::NotStreamable),
        (Outcome::EntryTooLong { index, max }, _) => {
            let location = Location { source: format!("{source} entry[{index}]"), line: index as u64 + 1 };
            let refusal = format!(
                "the entry is longer than {max} bytes, the limit for one resource; the rest of the file is not read"
            );
            importer.refuse(location, refusal);
            Ok(Streamed::Bundle)
        }
        (Outcome::Read, Ok(())) if streaming => Ok(Streamed::Bundle),
        // An object with no `resourceType` (or no `entry`, which is read as none): whole.
        (Outcome::Read, Ok(())) => Ok(Streamed::NotStreamable),
        // Broken before it showed itself a Bundle: the whole-file path words the refusal (and
        // reads at most the limit for one resource).
        (Outcome::Read, Err(_)) if !streaming => Ok(Streamed::NotStreamable),
        (Outcome::Read, Err(error)) => {
            // The entries before the break are imported; the break is refused in the words a
            // request body gets (`validate::parse_resource`), at its line in the file.
            let location = Location { source: source.to_owned(), line: error.line() as u64 };
            importer.refuse(location, format!("not valid JSON: {error}"));
            Ok(Streamed::Bundle)
        }
    }
}

/// Whether the first byte other than whitespace in the reader's buffer (nothing is consumed,
/// so the parser's line numbers stay the file's) opens an object.
fn starts_an_object(reader: &mut impl BufRead) -> bool {
    let Ok(buffer) = reader.fill_buf() else { return false };
    buffer.iter().find(|byte| !byte.is_ascii_whitespace()) == Some(&b'{')
}

/// Why reading the current entry stopped: past its limit.
#[derive(Debug)]
struct EntryTooLong;

impl fmt::Display for EntryTooLong {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("entry too long")
    }
}

impl std::error::Error for EntryTooLong {}

/// The file's text as the parser reads it (byte by byte), counting its position and stopping
/// at `limit`, so one entry's text (which the parser keeps whole) cannot grow past it.
struct Bounded<R> {
    inner: R,
    position: Rc<Cell<u64>>,
    limit: Rc<Cell<u64>>,
}

impl<R: BufRead> Read for Bounded<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let position = self.position.get();
        if position >= self.limit.get() {
            return Err(io::Error::other(EntryTooLong));
        }
        let available = self.inner.fill_buf()?;
        let count = available.len().min(buffer.len());
        buffer[..count].copy_from_slice(&available[..count]);
        self.inner.consume(count);
        self.position.set(position + count as u64);
        Ok(count)
    }
}

/// How the read ended, beyond what the parser says.
enum Outcome {
    /// As far as the parser got.
    Read,
    /// No Bundle with `resourceType` first: the caller reads the file whole.
    NotStreamable,
    EntryTooLong {
        index: usize,
        max: usize,
    },
    StoreFailed(StoreError),
}

struct BundleState<'a> {
    importer: &'a mut Importer,
    source: &'a str,
    max_entry: usize,
    /// Bytes the parser has read, and where it must stop (see [`Bounded`]).
    position: Rc<Cell<u64>>,
    limit: Rc<Cell<u64>>,
    progress: &'a mut dyn FnMut(u64),
    /// `resourceType` was `Bundle`, before any `entry`.
    streaming: bool,
    /// The index of the next entry (a repeated `entry` key's elements continue the count).
    next_index: usize,
    outcome: Outcome,
}

impl BundleState<'_> {
    /// Stops the parse (the parser's error is then only the carrier of `outcome`).
    fn stop<E: serde::de::Error>(&mut self, outcome: Outcome) -> E {
        self.outcome = outcome;
        E::custom("stopped")
    }
}

/// The top-level object: `resourceType` first, then each element of `entry` as it is read;
/// every other member is checked as JSON and skipped.
struct BundleVisitor<'s, 'a>(&'s mut BundleState<'a>);

impl<'de> Visitor<'de> for BundleVisitor<'_, '_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let state = self.0;
        let mut typed = false;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                // A repeated `resourceType` is ignored (the first said what the file is).
                "resourceType" if !typed => {
                    typed = true;
                    // Held whole: bounded as an entry is (past it, the file is no Bundle).
                    state.limit.set(state.position.get().saturating_add(state.max_entry as u64));
                    let resource_type = match map.next_value::<Value>() {
                        Ok(resource_type) => resource_type,
                        Err(_) if state.position.get() >= state.limit.get() => {
                            return Err(state.stop(Outcome::NotStreamable))
                        }
                        Err(error) => return Err(error),
                    };
                    state.limit.set(u64::MAX);
                    if resource_type.as_str() != Some("Bundle") {
                        return Err(state.stop(Outcome::NotStreamable));
                    }
                    state.streaming = true;
                }
                "entry" if !state.streaming => return Err(state.stop(Outcome::NotStreamable)),
                "entry" => map.next_value_seed(EntriesSeed(&mut *state))?,
                _ => drop(map.next_value::<IgnoredAny>()?),
            }
        }
        Ok(())
    }
}

/// The value of `entry`: an array's elements go to the importer one by one; anything else is
/// skipped (a Bundle's `entry` that is not an array imports nothing, as it always did).
struct EntriesSeed<'s, 'a>(&'s mut BundleState<'a>);

impl<'de> DeserializeSeed<'de> for EntriesSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for EntriesSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let state = self.0;
        loop {
            let index = state.next_index;
            // The parser keeps an entry's text whole: it may read this far past the entry's start.
            state.limit.set(state.position.get().saturating_add(state.max_entry as u64));
            let entry = match seq.next_element::<Box<RawValue>>() {
                Ok(Some(entry)) => entry,
                Ok(None) => break,
                Err(error) if state.position.get() >= state.limit.get() => {
                    drop(error);
                    return Err(state.stop(Outcome::EntryTooLong { index, max: state.max_entry }));
                }
                Err(error) => return Err(error),
            };
            state.limit.set(u64::MAX);
            state.next_index += 1;
            // Parsed from its own text as a line is, so its numbers keep their digits.
            let text = entry.get().as_bytes();
            let added = match bulkhead_fhir::parse_exact(text) {
                Ok(entry) => state.importer.add_bundle_entry(state.source, index, entry, text.len()),
                // The parser checked this text already: not reached.
                Err(error) => {
                    let location =
                        Location { source: format!("{} entry[{index}]", state.source), line: index as u64 + 1 };
                    state.importer.refuse(location, format!("not valid JSON: {error}"));
                    Ok(())
                }
            };
            drop(entry);
            if let Err(error) = added {
                return Err(state.stop(Outcome::StoreFailed(error)));
            }
            if state.next_index.is_multiple_of(4096) {
                (state.progress)(state.importer.processed());
            }
        }
        state.limit.set(u64::MAX);
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::tests::{refusals, store_and_importer, stored_body};
    use std::io::{BufReader, Cursor};

    const U1: &str = "0d4c7b2e-51a4-4f3c-8f7e-5b2a9c1d3e41";
    const U2: &str = "0d4c7b2e-51a4-4f3c-8f7e-5b2a9c1d3e42";

    /// The entries of the Bundle the tests read: stored ones, refused ones, fullUrls standing
    /// for ids, numbers with digits to keep; spread over lines as a pretty-printer would.
    fn entries() -> String {
        [
            format!(
                r#"{{"fullUrl":"urn:uuid:{U1}","resource":{{"resourceType":"Observation","id":"o1","status":"final",
                "code":{{"text":"x"}},"subject":{{"reference":"urn:uuid:{U2}"}},"valueQuantity":{{"value":1.50E2}}}}}}"#
            ),
            r#"{"fullUrl":"http://example.org/fhir/Patient/none"}"#.to_owned(),
            r#"{"resource":{"resourceType":"Patient","id":"bad","gender":"banana"}}"#.to_owned(),
            format!(r#"{{"fullUrl":"urn:uuid:{U2}","resource":{{"resourceType":"Patient","id":"p9"}}}}"#),
            r#"{"resource":{"resourceType":"Observation","id":"o2","status":"final","code":{"text":"y"},
                "subject":{"reference":"urn:uuid:0d4c7b2e-51a4-4f3c-8f7e-5b2a9c1d3e42"},"valueQuantity":{"value":0.010}}}"#
                .to_owned(),
        ]
        .join(",\n  ")
    }

    /// A Bundle read entry by entry is imported as the same Bundle parsed whole is (the path
    /// kept for a Bundle whose entries come before its resourceType): the same resources, the
    /// same refusals at the same `entry[i]`, numbers with their digits, references resolved
    /// through fullUrls.
    #[test]
    fn a_streamed_bundle_imports_as_the_whole_bundle_does() {
        let streamed =
            format!("{{\"resourceType\":\"Bundle\",\"type\":\"collection\",\"entry\":[\n  {}\n]}}\n", entries());
        let whole =
            format!("{{\"type\":\"collection\",\"entry\":[\n  {}\n],\"resourceType\":\"Bundle\"}}\n", entries());
        let mut outcomes = Vec::new();
        for (text, expected) in [(streamed, Streamed::Bundle), (whole, Streamed::NotStreamable)] {
            let directory = tempfile::tempdir().unwrap();
            let (store, tenant, mut importer) = store_and_importer(directory.path());
            let read =
                stream_bundle(&mut importer, "b.json", BufReader::new(Cursor::new(text.clone())), 1_024, &mut |_| {});
            assert_eq!(read.unwrap(), expected);
            if expected == Streamed::NotStreamable {
                importer.add_bundle("b.json", bulkhead_fhir::parse_exact(text.as_bytes()).unwrap()).unwrap();
            }
            let summary = importer.finish().unwrap();
            let bodies: Vec<String> =
                ["o1", "o2"].iter().map(|id| stored_body(&store, tenant, "Observation", id).unwrap()).collect();
            let without_stamps = bodies.iter().map(|body| {
                let (head, rest) = body.split_once(r#""lastUpdated":""#).unwrap();
                format!("{head}{}", &rest[rest.find('"').unwrap()..])
            });
            outcomes.push((summary.created, refusals(&summary), without_stamps.collect::<Vec<_>>()));
        }
        let (created, refused, bodies) = &outcomes[0];
        assert_eq!(*created, 3);
        assert_eq!(refused.len(), 2);
        assert_eq!((refused[0].0.as_str(), refused[0].1), ("b.json entry[1]", 2));
        assert_eq!(refused[0].2, "Bundle entry has no resource");
        assert_eq!((refused[1].0.as_str(), refused[1].1), ("b.json entry[2]", 3));
        assert!(refused[1].2.starts_with("Patient.gender: 'banana'"), "{}", refused[1].2);
        assert!(
            bodies[0].contains(r#""reference":"Patient/p9""#) && bodies[0].contains(r#""value":1.50E2"#),
            "{}",
            bodies[0]
        );
        assert!(bodies[1].contains(r#""reference":"Patient/p9""#) && bodies[1].contains(r#""value":0.010"#));
        assert_eq!(outcomes[0], outcomes[1], "streamed and whole");
    }

    /// The file's text, read through a small buffer, with a check run once the read has gone
    /// past `check_at` bytes.
    struct Watched<F> {
        text: Cursor<Vec<u8>>,
        check_at: u64,
        check: F,
        seen: Option<bool>,
    }

    impl<F: FnMut() -> bool> Read for Watched<F> {
        fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
            if self.seen.is_none() && self.text.position() >= self.check_at {
                self.seen = Some((self.check)());
            }
            let wanted = buffer.len().min(256);
            self.text.read(&mut buffer[..wanted])
        }
    }

    /// The bound on memory, shown by its cause: the first entries are in the store while the
    /// end of the Bundle has not been read yet (parsed whole, nothing is stored before).
    #[test]
    fn entries_are_stored_before_the_bundle_is_read_to_its_end() {
        let directory = tempfile::tempdir().unwrap();
        let (store, tenant, importer) = store_and_importer(directory.path());
        // A batch per entry, committed at once.
        let mut importer = importer.with_batch_bytes(1);
        let entries: Vec<String> = (0..400)
            .map(|n| format!(r#"{{"resource":{{"resourceType":"Patient","id":"p{n}","gender":"female"}}}}"#))
            .collect();
        let text = format!("{{\"resourceType\":\"Bundle\",\"type\":\"collection\",\"entry\":[{}]}}", entries.join(","));
        let first_stored = || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while std::time::Instant::now() < deadline {
                if stored_body(&store, tenant, "Patient", "p0").is_some() {
                    return true;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            false
        };
        let check_at = text.len() as u64 - 500;
        let mut watched = Watched { text: Cursor::new(text.into_bytes()), check_at, check: first_stored, seen: None };
        let read =
            stream_bundle(&mut importer, "b.json", BufReader::with_capacity(256, &mut watched), 1_024, &mut |_| {});
        assert_eq!(read.unwrap(), Streamed::Bundle);
        assert_eq!(watched.seen, Some(true), "entry[0] was stored before the last 500 bytes were read");
        assert_eq!(importer.finish().unwrap().created, 400);
    }

    /// An entry longer than the limit for one resource is refused and ends the file's import
    /// (the parser would hold it whole); the entries before it are stored.
    #[test]
    fn an_entry_longer_than_the_limit_is_refused() {
        let directory = tempfile::tempdir().unwrap();
        let (store, tenant, mut importer) = store_and_importer(directory.path());
        let entry = |id: &str, bytes: usize| {
            format!(
                r#"{{"resource":{{"resourceType":"Patient","id":"{id}","name":[{{"text":"{}"}}]}}}}"#,
                "n".repeat(bytes)
            )
        };
        let entries = [entry("p0", 10), entry("p1", 3_000), entry("p2", 10)].join(",");
        let text = format!("{{\"resourceType\":\"Bundle\",\"entry\":[{entries}]}}");
        let read = stream_bundle(&mut importer, "b.json", BufReader::new(Cursor::new(text)), 1_024, &mut |_| {});
        assert_eq!(read.unwrap(), Streamed::Bundle);
        let summary = importer.finish().unwrap();
        let message =
            "the entry is longer than 1024 bytes, the limit for one resource; the rest of the file is not read";
        assert_eq!(refusals(&summary), [("b.json entry[1]".to_owned(), 2, message.to_owned())]);
        assert_eq!(summary.created, 1);
        assert!(stored_body(&store, tenant, "Patient", "p0").is_some());
        assert!(stored_body(&store, tenant, "Patient", "p2").is_none());
    }
}
