//! `POST /r4/$upload-ndjson` throughput and the server's RSS while it loads: the data set's
//! files streamed (up to a number of resources) into a tenant of their own, so every line is a
//! create, as in the CLI import.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::time::Instant;

use futures::SinkExt;

use super::client::Client;
use super::measure::{peak_rss_during, CpuClock, PeakRss};
use super::summary::ImportCounts;

pub struct UploadResult {
    /// Lines sent.
    pub sent: u64,
    pub counts: ImportCounts,
    pub seconds: f64,
    pub peak_rss_bytes: PeakRss,
    pub client_cpu_share: f64,
}

impl UploadResult {
    pub fn per_second(&self) -> f64 {
        self.counts.processed() as f64 / self.seconds.max(1e-9)
    }
}

const CHUNK_BYTES: usize = 1 << 20;

pub async fn measure_upload(
    client: &Client,
    server_pids: &[u32],
    files: Vec<PathBuf>,
    limit: u64,
) -> anyhow::Result<UploadResult> {
    let (mut chunks, receiver) = futures::channel::mpsc::channel::<std::io::Result<Vec<u8>>>(8);
    // The files are read on a thread of their own, so the body streams without holding them.
    let reader = std::thread::spawn(move || -> anyhow::Result<u64> {
        let mut sent = 0u64;
        let mut chunk = Vec::with_capacity(CHUNK_BYTES);
        'files: for path in &files {
            let file = std::fs::File::open(path)?;
            let raw: Box<dyn Read> = match path.extension().and_then(|ext| ext.to_str()) {
                Some("gz") => Box::new(flate2::read::MultiGzDecoder::new(file)),
                _ => Box::new(file),
            };
            let mut lines = BufReader::new(raw);
            loop {
                if sent >= limit {
                    break 'files;
                }
                let before = chunk.len();
                if lines.read_until(b'\n', &mut chunk)? == 0 {
                    break;
                }
                if chunk[before..].iter().all(u8::is_ascii_whitespace) {
                    chunk.truncate(before);
                    continue;
                }
                if chunk.last() != Some(&b'\n') {
                    chunk.push(b'\n');
                }
                sent += 1;
                if chunk.len() >= CHUNK_BYTES {
                    let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK_BYTES));
                    futures::executor::block_on(chunks.send(Ok(full)))?;
                }
            }
        }
        if !chunk.is_empty() {
            futures::executor::block_on(chunks.send(Ok(chunk)))?;
        }
        Ok(sent)
    });
    let clock = CpuClock::start();
    let started = Instant::now();
    let (outcome, peak_rss_bytes) =
        peak_rss_during(server_pids, client.upload_ndjson(reqwest::Body::wrap_stream(receiver))).await;
    let seconds = started.elapsed().as_secs_f64();
    let client_cpu_share = clock.share();
    let sent = reader.join().map_err(|_| anyhow::anyhow!("the upload reader panicked"))??;
    let outcome = outcome?;
    let counts = ImportCounts::parse(&outcome)?;
    Ok(UploadResult { sent, counts, seconds, peak_rss_bytes, client_cpu_share })
}
