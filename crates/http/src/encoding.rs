//! Content codings of export file downloads: negotiation (`Accept-Encoding`) and compression on
//! a second thread, in parallel with reading the file from the store.
//!
//! Compressed bytes are deterministic: one encoder with fixed settings sees the file's bytes in
//! order, so the same file downloads to the same bytes every time.

use std::cell::Cell;
use std::io::Write;
use std::rc::Rc;
use std::sync::mpsc::{sync_channel, SyncSender};

use axum::http::{header, HeaderMap};
use bulkhead_export::ExportError;

use crate::chunk_pool::{CHUNKS, CHUNK_BYTES};

/// A download's content coding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Identity,
    Gzip,
    Zstd,
}

impl Coding {
    /// The `Content-Encoding` value, if any.
    pub fn header_value(self) -> Option<&'static str> {
        match self {
            Coding::Identity => None,
            Coding::Gzip => Some("gzip"),
            Coding::Zstd => Some("zstd"),
        }
    }
}

/// zstd level 1: the fastest, still smaller than gzip level 1 on NDJSON.
const ZSTD_LEVEL: i32 = 1;

/// Picks the coding from `Accept-Encoding`: zstd when listed with a quality at least gzip's,
/// else gzip when listed, else identity. `*` stands for any coding not listed by name; a
/// quality of 0 refuses a coding.
pub fn negotiate(headers: &HeaderMap) -> Coding {
    let (mut gzip, mut zstd, mut any) = (None::<f32>, None::<f32>, None::<f32>);
    let items = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','));
    for item in items {
        let mut parts = item.split(';').map(str::trim);
        let coding = parts.next().unwrap_or("");
        let mut quality = 1.0;
        for param in parts {
            let param = param.replace(' ', "");
            if let Some(value) = param.strip_prefix("q=").or_else(|| param.strip_prefix("Q=")) {
                // An unreadable quality refuses the coding rather than guessing.
                quality = value.parse::<f32>().ok().filter(|q| q.is_finite()).unwrap_or(0.0);
            }
        }
        let slot = if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            &mut gzip
        } else if coding.eq_ignore_ascii_case("zstd") {
            &mut zstd
        } else if coding == "*" {
            &mut any
        } else {
            continue;
        };
        // The same coding listed twice: the higher quality counts.
        *slot = Some(slot.map_or(quality, |old: f32| old.max(quality)));
    }
    let gzip = gzip.or(any).unwrap_or(0.0);
    let zstd = zstd.or(any).unwrap_or(0.0);
    if zstd > 0.0 && zstd >= gzip {
        Coding::Zstd
    } else if gzip > 0.0 {
        Coding::Gzip
    } else {
        Coding::Identity
    }
}

/// Bytes handed from the reading thread to the compressing thread at a time (a pooled buffer,
/// given back once compressed).
const HANDOFF_BYTES: usize = CHUNK_BYTES;

/// Runs `produce` (which writes the file's bytes) and encodes what it writes into `sink` with
/// `coding`. A compressing coding runs `produce` on a second thread, so reading the store and
/// compressing overlap; at most two hand-off buffers are in flight. Returns `produce`'s result;
/// the encoder is finished only when `produce` succeeded, so a failed file never ends cleanly.
pub fn encode<P>(coding: Coding, produce: P, sink: &mut (dyn Write + Send)) -> Result<u64, ExportError>
where
    P: FnOnce(&mut dyn Write) -> Result<u64, ExportError> + Send,
{
    let sink_error = |error: std::io::Error| ExportError::Sink(error.to_string());
    if coding == Coding::Identity {
        return produce(sink);
    }
    std::thread::scope(|scope| {
        let (handoff, received) = sync_channel::<Vec<u8>>(1);
        let producer = scope.spawn(move || {
            let mut writer = Handoff { buffer: CHUNKS.take(), handoff };
            let written = produce(&mut writer)?;
            writer.send().map_err(sink_error)?;
            Ok(written)
        });
        let closed = Rc::new(Cell::new(false));
        let gate = Gate { sink, closed: closed.clone() };
        let mut encoder = match coding {
            Coding::Zstd => Encoder::Zstd(zstd::stream::write::Encoder::new(gate, ZSTD_LEVEL).map_err(sink_error)?),
            _ => Encoder::Gzip(flate2::write::GzEncoder::new(gate, flate2::Compression::fast())),
        };
        let mut compressed = Ok(());
        while let Ok(buffer) = received.recv() {
            compressed = encoder.write_all(&buffer);
            CHUNKS.give(buffer);
            if compressed.is_err() {
                break;
            }
        }
        // A failed encoder (the client went away) ends the producer: its next send fails.
        drop(received);
        let produced = producer.join().unwrap_or_else(|_| Err(ExportError::Sink("file producer panicked".into())));
        if produced.is_err() || compressed.is_err() {
            // Dropping an encoder writes its trailer: the gate keeps a failed file from looking whole.
            closed.set(true);
        }
        let written = produced?;
        compressed.map_err(sink_error)?;
        // The trailer is written only once the whole file was: a failed file never ends cleanly.
        encoder.finish().map_err(sink_error)?;
        Ok(written)
    })
}

/// The encoder's way to the sink, closed once the file has failed.
struct Gate<'a> {
    sink: &'a mut (dyn Write + Send),
    closed: Rc<Cell<bool>>,
}

impl Write for Gate<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.closed.get() {
            return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the file failed"));
        }
        self.sink.write(bytes)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.closed.get() {
            return Ok(());
        }
        self.sink.flush()
    }
}

enum Encoder<'a> {
    Gzip(flate2::write::GzEncoder<Gate<'a>>),
    Zstd(zstd::stream::write::Encoder<'static, Gate<'a>>),
}

impl Encoder<'_> {
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Encoder::Gzip(gzip) => gzip.write_all(bytes),
            Encoder::Zstd(zstd) => zstd.write_all(bytes),
        }
    }

    fn finish(self) -> std::io::Result<()> {
        match self {
            Encoder::Gzip(gzip) => gzip.finish().map(drop),
            Encoder::Zstd(zstd) => zstd.finish().map(drop),
        }
    }
}

/// The reading side's `Write`: fills a buffer and hands it to the compressing thread, blocking
/// while that thread is busy with the previous one.
struct Handoff {
    buffer: Vec<u8>,
    handoff: SyncSender<Vec<u8>>,
}

impl Handoff {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buffer, CHUNKS.take());
        self.handoff.send(full).map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "compression ended"))
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        CHUNKS.give(std::mem::take(&mut self.buffer));
    }
}

impl Write for Handoff {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let taken = bytes.len().min(HANDOFF_BYTES - self.buffer.len());
        self.buffer.extend_from_slice(&bytes[..taken]);
        if self.buffer.len() >= HANDOFF_BYTES {
            self.send()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with(value: &str) -> Coding {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(value).unwrap());
        negotiate(&headers)
    }

    #[test]
    fn negotiation() {
        assert_eq!(negotiate(&HeaderMap::new()), Coding::Identity);
        assert_eq!(with("gzip"), Coding::Gzip);
        assert_eq!(with("br, gzip;q=0.5"), Coding::Gzip);
        assert_eq!(with("gzip;q=0"), Coding::Identity);
        assert_eq!(with("zstd"), Coding::Zstd);
        assert_eq!(with("gzip, deflate, br, zstd"), Coding::Zstd, "equal qualities: zstd");
        assert_eq!(with("gzip;q=1, zstd;q=0.5"), Coding::Gzip, "gzip preferred by quality");
        assert_eq!(with("gzip;q=0.5, zstd;q=0.9"), Coding::Zstd);
        assert_eq!(with("zstd;q=0, gzip"), Coding::Gzip);
        assert_eq!(with("*"), Coding::Zstd);
        assert_eq!(with("gzip, *;q=0"), Coding::Gzip);
        assert_eq!(with("zstd;q=abc"), Coding::Identity, "an unreadable quality refuses");
        assert_eq!(with("identity"), Coding::Identity);
    }

    fn produce_lines(out: &mut dyn Write) -> Result<u64, ExportError> {
        for line in 0..20_000u64 {
            writeln!(out, "{{\"resourceType\":\"Observation\",\"id\":\"{line}\"}}")
                .map_err(|error| ExportError::Sink(error.to_string()))?;
        }
        Ok(20_000)
    }

    #[test]
    fn compressed_bytes_decode_to_the_file_and_repeat_exactly() {
        let mut plain = Vec::new();
        produce_lines(&mut plain).unwrap();
        for coding in [Coding::Gzip, Coding::Zstd] {
            let mut first = Vec::new();
            assert_eq!(encode(coding, produce_lines, &mut first).unwrap(), 20_000);
            let mut second = Vec::new();
            encode(coding, produce_lines, &mut second).unwrap();
            assert_eq!(first, second, "{coding:?}: deterministic bytes");
            let decoded = match coding {
                Coding::Gzip => {
                    let mut decoded = Vec::new();
                    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&first[..]), &mut decoded).unwrap();
                    decoded
                }
                _ => zstd::stream::decode_all(&first[..]).unwrap(),
            };
            assert_eq!(decoded, plain, "{coding:?}");
        }
    }

    #[test]
    fn a_failed_producer_leaves_the_stream_unfinished() {
        let failing = |out: &mut dyn Write| -> Result<u64, ExportError> {
            produce_lines(out)?;
            Err(ExportError::Sink("store failed".into()))
        };
        for coding in [Coding::Gzip, Coding::Zstd] {
            let mut out = Vec::new();
            assert!(encode(coding, failing, &mut out).is_err());
            assert!(!out.is_empty(), "{coding:?}: the file's start was sent");
            let decoded = match coding {
                Coding::Gzip => {
                    let mut decoded = Vec::new();
                    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&out[..]), &mut decoded).map(drop)
                }
                _ => zstd::stream::decode_all(&out[..]).map(drop),
            };
            assert!(decoded.is_err(), "{coding:?}: a truncated stream must not decode as whole");
        }
    }
}
