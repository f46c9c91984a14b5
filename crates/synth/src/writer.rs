//! Where generated resources go: one NDJSON file per type, or one transaction Bundle per patient.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::json::JsonWriter;
use crate::rng::Id;
use crate::{OutputFormat, SynthError, TypeSummary};

/// Bytes buffered per NDJSON file before a write system call.
const FILE_BUFFER: usize = 1 << 20;

/// An open output file that remembers its path for error messages.
struct OutFile {
    path: PathBuf,
    writer: BufWriter<File>,
}

impl OutFile {
    fn create(path: PathBuf) -> Result<OutFile, SynthError> {
        let file = File::create(&path).map_err(|source| SynthError::io(&path, source))?;
        Ok(OutFile { writer: BufWriter::with_capacity(FILE_BUFFER, file), path })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), SynthError> {
        self.writer.write_all(bytes).map_err(|source| SynthError::io(&self.path, source))
    }

    fn finish(mut self) -> Result<(), SynthError> {
        self.writer.flush().map_err(|source| SynthError::io(&self.path, source))
    }
}

/// Receives resources in generation order and writes them in the chosen format.
pub(crate) struct Output {
    dir: PathBuf,
    format: OutputFormat,
    /// The resource being written (reused: one allocation for the whole run).
    json: JsonWriter,
    /// NDJSON: one file per resource type, opened on first use.
    ndjson: BTreeMap<&'static str, OutFile>,
    /// Bundles: the Bundle being assembled and the file it goes to.
    bundle: Vec<u8>,
    bundle_path: Option<PathBuf>,
    bundle_entries: usize,
    /// Per type: (resources, bytes of resource JSON).
    stats: BTreeMap<&'static str, (u64, u64)>,
}

impl Output {
    pub(crate) fn new(dir: &Path, format: OutputFormat) -> Output {
        Output {
            dir: dir.to_path_buf(),
            format,
            json: JsonWriter::new(format == OutputFormat::Bundles),
            ndjson: BTreeMap::new(),
            bundle: Vec::new(),
            bundle_path: None,
            bundle_entries: 0,
            stats: BTreeMap::new(),
        }
    }

    /// Starts a group of resources: a Bundle file `name` in Bundles format, nothing in NDJSON
    /// (where resources go to their type's file).
    pub(crate) fn begin_group(&mut self, name: &str) {
        if self.format == OutputFormat::Bundles {
            self.bundle.clear();
            self.bundle.extend_from_slice(br#"{"resourceType":"Bundle","type":"transaction","entry":["#);
            self.bundle_path = Some(self.dir.join(name));
            self.bundle_entries = 0;
        }
    }

    /// Ends the group started by [`Output::begin_group`], writing its Bundle file.
    pub(crate) fn end_group(&mut self) -> Result<(), SynthError> {
        if let Some(path) = self.bundle_path.take() {
            self.bundle.extend_from_slice(b"]}\n");
            std::fs::write(&path, &self.bundle).map_err(|source| SynthError::io(&path, source))?;
        }
        Ok(())
    }

    /// Writes one resource: `body` adds the fields after `resourceType` and `id`.
    pub(crate) fn resource(
        &mut self,
        resource_type: &'static str,
        id: Id,
        body: impl FnOnce(&mut JsonWriter),
    ) -> Result<(), SynthError> {
        let w = &mut self.json;
        w.clear();
        w.begin_obj();
        w.field_str("resourceType", resource_type);
        w.field_str("id", id.as_str());
        body(w);
        w.end_obj();
        let stat = self.stats.entry(resource_type).or_insert((0, 0));
        stat.0 += 1;
        match self.format {
            OutputFormat::Ndjson => {
                self.json.buf.push(b'\n');
                stat.1 += self.json.buf.len() as u64;
                let file = match self.ndjson.get_mut(resource_type) {
                    Some(file) => file,
                    None => {
                        let path = self.dir.join(format!("{resource_type}.ndjson"));
                        self.ndjson.entry(resource_type).or_insert(OutFile::create(path)?)
                    }
                };
                file.write(&self.json.buf)?;
            }
            OutputFormat::Bundles => {
                stat.1 += self.json.buf.len() as u64;
                self.append_bundle_entry(resource_type, id);
            }
        }
        Ok(())
    }

    /// A transaction entry: `fullUrl` is the `urn:uuid:` that local references use, and PUT keeps
    /// our ids (so NDJSON and Bundle loads of the same seed give the same server ids).
    fn append_bundle_entry(&mut self, resource_type: &str, id: Id) {
        let b = &mut self.bundle;
        if self.bundle_entries > 0 {
            b.push(b',');
        }
        self.bundle_entries += 1;
        b.extend_from_slice(b"{\"fullUrl\":\"urn:uuid:");
        b.extend_from_slice(id.as_str().as_bytes());
        b.extend_from_slice(b"\",\"resource\":");
        b.extend_from_slice(&self.json.buf);
        b.extend_from_slice(b",\"request\":{\"method\":\"PUT\",\"url\":\"");
        b.extend_from_slice(resource_type.as_bytes());
        b.push(b'/');
        b.extend_from_slice(id.as_str().as_bytes());
        b.extend_from_slice(b"\"}}");
    }

    /// Flushes every file and returns the per-type counts, sorted by type name.
    pub(crate) fn finish(self) -> Result<Vec<TypeSummary>, SynthError> {
        for (_, file) in self.ndjson {
            file.finish()?;
        }
        Ok(self
            .stats
            .into_iter()
            .map(|(t, (count, bytes))| TypeSummary { resource_type: t.to_string(), count, bytes })
            .collect())
    }
}
