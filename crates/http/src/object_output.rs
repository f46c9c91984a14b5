//! The output store: export files materialised as NDJSON objects in S3 (or anything speaking its
//! API), through `object_store`.
//!
//! Objects live at `{prefix}/{tenant}/{job id}/{file index}.ndjson`: the key follows from the
//! job and the file alone, so writing a file again (a retry, or later another instance taking a
//! job over) overwrites it, and removing a job's output is removing one key prefix. Each object
//! is written with a multipart upload, `PART_BYTES` at a time with at most `PARTS_IN_FLIGHT`
//! parts uploading, so a file of any size takes a fixed amount of memory.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::{Path, PathPart};
use object_store::signer::Signer;
use object_store::{ObjectStore, WriteMultipart};
use sha2::{Digest, Sha256};

use bulkhead_store::TenantId;

/// Bytes of a multipart upload's part (S3 needs at least 5 MiB for all parts but the last).
const PART_BYTES: usize = 8 * 1024 * 1024;
/// Parts of one object uploading at once; with `PART_BYTES` this bounds a writer's memory.
const PARTS_IN_FLIGHT: usize = 2;
/// The longest a SigV4 presigned URL may live (S3 refuses longer ones).
const MAX_PRESIGNED: Duration = Duration::from_secs(7 * 24 * 3600);

/// Where output goes and how to reach it: `output_url` and friends of the configuration. Unset
/// fields come from the standard `AWS_*` environment variables.
#[derive(Debug, Clone, Default)]
pub struct OutputSettings {
    /// `s3://BUCKET` or `s3://BUCKET/PREFIX`.
    pub url: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Allow a plain-HTTP endpoint (a local test server).
    pub allow_http: Option<bool>,
    /// Manifests list presigned S3 URLs (`requiresAccessToken: false`) instead of Bulkhead URLs.
    pub presigned_urls: bool,
}

/// Why the output store could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("output_url '{0}' is not s3://BUCKET or s3://BUCKET/PREFIX")]
    Url(String),
    #[error(transparent)]
    ObjectStore(#[from] object_store::Error),
    /// The file's bytes could not be produced (the store failed, or the job was cancelled).
    #[error("{0}")]
    Source(String),
}

/// What a written object is, as its manifest item reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenObject {
    pub bytes: u64,
    /// Lowercase hex SHA-256 of the object's bytes.
    pub sha256: String,
    /// Lines written (compared with the plan's count).
    pub lines: u64,
}

/// A configured output store.
pub struct OutputStore {
    s3: Arc<AmazonS3>,
    prefix: Vec<String>,
    presigned_urls: bool,
    /// An expired-output sweep is running (see [`OutputStore::sweep_turn`]).
    sweeping: AtomicBool,
}

/// The one expired-output sweep an instance runs at a time; dropping it ends the turn.
pub(crate) struct SweepTurn<'a>(&'a AtomicBool);

impl Drop for SweepTurn<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl std::fmt::Debug for OutputStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credentials.
        f.debug_struct("OutputStore").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl OutputStore {
    /// Builds the client (no request is made: a wrong endpoint shows at the first write).
    pub fn connect(settings: &OutputSettings) -> Result<OutputStore, OutputError> {
        let rest = settings.url.strip_prefix("s3://").ok_or_else(|| OutputError::Url(settings.url.clone()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(OutputError::Url(settings.url.clone()));
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(endpoint) = &settings.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = &settings.region {
            builder = builder.with_region(region);
        }
        if let Some(key) = &settings.access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = &settings.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        if let Some(allow_http) = settings.allow_http {
            builder = builder.with_allow_http(allow_http);
        }
        let prefix = prefix.split('/').filter(|part| !part.is_empty()).map(str::to_owned).collect();
        Ok(OutputStore {
            s3: Arc::new(builder.build()?),
            prefix,
            presigned_urls: settings.presigned_urls,
            sweeping: AtomicBool::new(false),
        })
    }

    /// Whether manifests list presigned S3 URLs.
    pub fn presigned_urls(&self) -> bool {
        self.presigned_urls
    }

    fn job_prefix(&self, tenant: TenantId, job_id: &str) -> Path {
        let tenant = tenant.0.to_string();
        let parts = self.prefix.iter().map(String::as_str).chain([tenant.as_str(), job_id]);
        Path::from_iter(parts.map(|part| PathPart::from(part.to_owned())))
    }

    /// The key of file `index` of the job.
    pub fn object_path(&self, tenant: TenantId, job_id: &str, index: u32) -> Path {
        self.job_prefix(tenant, job_id).child(format!("{index:05}.ndjson"))
    }

    /// Writes one object from `produce`'s bytes with a multipart upload, on a blocking thread
    /// (`runtime` drives the uploads). On any failure the upload is aborted: no partial object
    /// is left behind.
    pub fn write_object(
        &self,
        runtime: &tokio::runtime::Handle,
        path: &Path,
        produce: impl FnOnce(&mut dyn Write) -> Result<u64, String>,
    ) -> Result<WrittenObject, OutputError> {
        let _context = runtime.enter();
        let upload = runtime.block_on(self.s3.put_multipart(path))?;
        let mut writer = ObjectWriter {
            upload: WriteMultipart::new_with_chunk_size(upload, PART_BYTES),
            runtime,
            hasher: Sha256::new(),
            bytes: 0,
            failed: None,
        };
        let produced = produce(&mut writer);
        let ObjectWriter { upload, hasher, bytes, failed, .. } = writer;
        let lines = match (produced, failed) {
            (Ok(lines), None) => lines,
            (_, Some(error)) => {
                let _ = runtime.block_on(upload.abort());
                return Err(error.into());
            }
            (Err(error), None) => {
                let _ = runtime.block_on(upload.abort());
                return Err(OutputError::Source(error));
            }
        };
        runtime.block_on(upload.finish())?;
        let sha256 = hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect();
        Ok(WrittenObject { bytes, sha256, lines })
    }

    /// The turn to delete expired jobs' objects, None while another sweep holds it. Kick-offs
    /// sweep on blocking threads and wait there for the object store (its name lookups run on
    /// the same bounded pool): arriving together, they would each hold a thread for the same
    /// expired jobs.
    pub(crate) fn sweep_turn(&self) -> Option<SweepTurn<'_>> {
        self.sweeping.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).ok()?;
        Some(SweepTurn(&self.sweeping))
    }

    /// Deletes every object of the job (none is fine); returns how many.
    pub async fn delete_job(&self, tenant: TenantId, job_id: &str) -> Result<usize, OutputError> {
        let prefix = self.job_prefix(tenant, job_id);
        let locations = self.s3.list(Some(&prefix)).map_ok(|meta| meta.location).boxed();
        let deleted: Vec<Path> = self.s3.delete_stream(locations).try_collect().await?;
        Ok(deleted.len())
    }

    /// A URL that downloads the object without credentials for `expires_in` (at most 7 days).
    pub async fn presign(&self, path: &Path, expires_in: Duration) -> Result<String, OutputError> {
        let url = self.s3.signed_url(http::Method::GET, path, expires_in.min(MAX_PRESIGNED)).await?;
        Ok(url.to_string())
    }

    /// The object's bytes as a stream, and its size.
    pub async fn read(
        &self,
        path: &Path,
    ) -> Result<(u64, futures::stream::BoxStream<'static, object_store::Result<bytes::Bytes>>), OutputError> {
        let result = self.s3.get(path).await?;
        Ok((result.meta.size, result.into_stream()))
    }
}

/// The `Write` side of a multipart upload: hashes and counts what passes, and waits (on the
/// blocking thread) while `PARTS_IN_FLIGHT` parts are uploading.
struct ObjectWriter<'a> {
    upload: WriteMultipart,
    runtime: &'a tokio::runtime::Handle,
    hasher: Sha256,
    bytes: u64,
    /// The upload's own error, kept to report it rather than the I/O error it became.
    failed: Option<object_store::Error>,
}

impl Write for ObjectWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.failed.is_some() {
            return Err(std::io::Error::other("the upload failed"));
        }
        self.upload.write(bytes);
        self.hasher.update(bytes);
        self.bytes += bytes.len() as u64;
        if let Err(error) = self.runtime.block_on(self.upload.wait_for_capacity(PARTS_IN_FLIGHT)) {
            let message = error.to_string();
            self.failed = Some(error);
            return Err(std::io::Error::other(message));
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(url: &str) -> Result<OutputStore, OutputError> {
        let settings = OutputSettings {
            url: url.into(),
            region: Some("us-east-1".into()),
            endpoint: Some("http://127.0.0.1:1".into()),
            allow_http: Some(true),
            ..OutputSettings::default()
        };
        OutputStore::connect(&settings)
    }

    #[test]
    fn keys_are_prefix_tenant_job_and_file() {
        let output = store("s3://bucket/exports/prod/").unwrap();
        assert_eq!(output.object_path(TenantId(7), "job-1", 3).as_ref(), "exports/prod/7/job-1/00003.ndjson");
        let bare = store("s3://bucket").unwrap();
        assert_eq!(bare.object_path(TenantId(7), "job-1", 12).as_ref(), "7/job-1/00012.ndjson");
    }

    #[test]
    fn one_sweep_runs_at_a_time() {
        let output = store("s3://bucket").unwrap();
        let turn = output.sweep_turn().expect("the first sweep gets the turn");
        assert!(output.sweep_turn().is_none(), "a second sweep waits for none and skips");
        drop(turn);
        assert!(output.sweep_turn().is_some(), "the turn is free again once the sweep ends");
    }

    #[test]
    fn only_s3_urls_with_a_bucket_are_accepted() {
        for url in ["bucket/prefix", "s3://", "s3:///prefix", "https://bucket/prefix"] {
            assert!(matches!(store(url), Err(OutputError::Url(_))), "{url}");
        }
    }
}
