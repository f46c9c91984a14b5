//! The benchmark's HTTP client: what a Bulk Data user does, with the tenant's credentials.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use serde_json::{json, Value};

use super::measure::{self, CpuClock, Download, Encoding, PeakRss};
use super::report::ExportResult;

/// A tenant's client of one or more server instances: each request goes to the next instance in
/// turn (round-robin, as a load balancer would spread them), URLs an instance minted included.
#[derive(Clone)]
pub struct Client {
    pub http: reqwest::Client,
    /// Every instance's base URL (`http://127.0.0.1:PORT`).
    pub bases: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
    pub client_id: String,
    pub client_secret: String,
}

/// One asynchronous kick-off: how long the 202 took, and how long until the status said 200.
pub struct AsyncExport {
    pub kick_off_ms: f64,
    pub complete_ms: f64,
}

impl Client {
    pub fn new(http: reqwest::Client, bases: Vec<String>, client_id: String, client_secret: String) -> Client {
        Client { http, bases: Arc::new(bases), next: Arc::new(AtomicUsize::new(0)), client_id, client_secret }
    }

    /// The base URL of the instance the next request goes to.
    pub fn base(&self) -> &str {
        &self.bases[self.next.fetch_add(1, Ordering::Relaxed) % self.bases.len()]
    }

    /// `url` (minted by one of the instances, e.g. a file or status URL) sent to the next
    /// instance instead; any other URL (a presigned S3 URL) unchanged.
    pub fn spread(&self, url: &str) -> String {
        if self.bases.len() < 2 {
            return url.to_owned();
        }
        match self.bases.iter().find_map(|base| url.strip_prefix(base.as_str()).filter(|rest| rest.starts_with('/'))) {
            Some(path) => format!("{}{path}", self.base()),
            None => url.to_owned(),
        }
    }

    pub fn get(&self, url: &str) -> reqwest::RequestBuilder {
        self.authorised(self.http.get(url))
    }

    fn authorised(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        request.header("client_id", &self.client_id).header("client_secret", &self.client_secret)
    }

    pub async fn patient_ids(&self, limit: usize) -> anyhow::Result<Vec<String>> {
        let mut ids = Vec::with_capacity(limit);
        let mut url = format!("{}/r4/Patient?_count=1000", self.base());
        while ids.len() < limit {
            let page: Value = self.get(&url).send().await?.error_for_status()?.json().await?;
            for entry in page["entry"].as_array().into_iter().flatten() {
                ids.extend(entry["resource"]["id"].as_str().map(str::to_owned));
            }
            match page["link"].as_array().into_iter().flatten().find(|link| link["relation"] == "next") {
                Some(next) => url = self.spread(next["url"].as_str().unwrap_or_default()),
                None => break,
            }
        }
        ids.truncate(limit);
        Ok(ids)
    }

    pub async fn post(&self, url: &str, body: String) -> anyhow::Result<()> {
        self.authorised(self.http.post(url))
            .header("content-type", "application/fhir+json")
            .body(body)
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    pub async fn put_group(&self, id: &str, members: &[String]) -> anyhow::Result<()> {
        let member: Vec<Value> =
            members.iter().map(|m| json!({"entity": {"reference": format!("Patient/{m}")}})).collect();
        let group = json!({"resourceType": "Group", "id": id, "type": "person", "actual": true, "member": member});
        self.authorised(self.http.put(format!("{}/r4/Group/{id}", self.base())))
            .header("content-type", "application/fhir+json")
            .body(group.to_string())
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    fn kick_off_url(&self, group_id: &str) -> String {
        self.group_kick_off_url(group_id)
    }

    /// `Group/{id}/$export` on the 1upHealth-style base (synchronous without `Prefer`).
    pub fn group_kick_off_url(&self, group_id: &str) -> String {
        format!("{}/bulk-data/r4/Group/{group_id}/$export", self.base())
    }

    /// The system-level `$export` on the 1upHealth-style base.
    pub fn system_kick_off_url(&self) -> String {
        format!("{}/bulk-data/r4/$export", self.base())
    }

    /// The synchronous manifest (no `Prefer: respond-async`).
    pub async fn manifest(&self, group_id: &str) -> anyhow::Result<Value> {
        self.manifest_from(&self.kick_off_url(group_id)).await
    }

    /// The synchronous manifest of a kick-off URL.
    async fn manifest_from(&self, kick_off_url: &str) -> anyhow::Result<Value> {
        Ok(measure::send_patiently(self.get(kick_off_url)).await?.0.json().await?)
    }

    /// The synchronous manifest of what changed after `since` (a server instant).
    pub async fn manifest_since(&self, group_id: &str, since: &str) -> anyhow::Result<Value> {
        let request = self.get(&self.kick_off_url(group_id)).query(&[("_since", since)]);
        Ok(measure::send_patiently(request).await?.0.json().await?)
    }

    /// `Prefer: respond-async`: times the 202, then polls the status URL (every `poll`) until it
    /// answers 200 with a manifest, and deletes the job.
    pub async fn export_async(&self, group_id: &str, poll: Duration) -> anyhow::Result<AsyncExport> {
        let started = Instant::now();
        let status_url = self.kick_off_async(group_id).await?;
        let kick_off_ms = started.elapsed().as_secs_f64() * 1000.0;
        self.finished_manifest(&status_url, started, poll).await?;
        let complete_ms = started.elapsed().as_secs_f64() * 1000.0;
        self.authorised(self.http.delete(self.spread(&status_url))).send().await?.error_for_status()?;
        Ok(AsyncExport { kick_off_ms, complete_ms })
    }

    /// An asynchronous export end to end, as a client of materialised output sees it: the
    /// kick-off, the status polled (every `poll`) until 200, every file downloaded
    /// (`concurrency` at a time), timed from the kick-off to the last byte; then the job is
    /// deleted.
    pub async fn export_async_downloaded(
        &self,
        group_id: &str,
        poll: Duration,
        concurrency: usize,
    ) -> anyhow::Result<ExportResult> {
        let clock = CpuClock::start();
        let started = Instant::now();
        let status_url = self.kick_off_async(group_id).await?;
        let manifest = self.finished_manifest(&status_url, started, poll).await?;
        let (files, totals) = self.download_all(&manifest, Encoding::Identity, concurrency).await?;
        let seconds = started.elapsed().as_secs_f64();
        self.authorised(self.http.delete(self.spread(&status_url))).send().await?.error_for_status()?;
        Ok(ExportResult {
            encoding: Encoding::Identity,
            files,
            resources: totals.resources,
            bytes: totals.bytes,
            seconds,
            throttled: totals.throttled,
            peak_rss_bytes: PeakRss::default(),
            client_cpu_share: clock.share(),
            server_cpu_seconds: None,
        })
    }

    /// Sends the asynchronous kick-off; returns the status URL of its 202.
    async fn kick_off_async(&self, group_id: &str) -> anyhow::Result<String> {
        let request = self.get(&self.kick_off_url(group_id)).header("prefer", "respond-async");
        let (response, _) = measure::send_patiently(request).await?;
        anyhow::ensure!(response.status() == reqwest::StatusCode::ACCEPTED, "kick-off answered {}", response.status());
        Ok(response
            .headers()
            .get("content-location")
            .and_then(|value| value.to_str().ok())
            .context("the 202 has no Content-Location")?
            .to_owned())
    }

    /// Polls a status URL (every `poll`, on every instance in turn) until it answers 200; returns
    /// the manifest.
    async fn finished_manifest(&self, status_url: &str, started: Instant, poll: Duration) -> anyhow::Result<Value> {
        let deadline = started + Duration::from_secs(600);
        loop {
            let response = self.get(&self.spread(status_url)).send().await?;
            match response.status() {
                reqwest::StatusCode::OK => {
                    let manifest: Value = response.json().await?;
                    anyhow::ensure!(manifest["output"].is_array(), "the finished status has no output list");
                    return Ok(manifest);
                }
                reqwest::StatusCode::ACCEPTED => {}
                other => anyhow::bail!("export status answered {other}"),
            }
            anyhow::ensure!(Instant::now() < deadline, "the export did not finish within 600 s");
            tokio::time::sleep(poll).await;
        }
    }

    /// Downloads every file of a manifest, `concurrency` at a time; returns how many files and
    /// what they brought.
    async fn download_all(
        &self,
        manifest: &Value,
        encoding: Encoding,
        concurrency: usize,
    ) -> anyhow::Result<(usize, Download)> {
        let outputs: Vec<(String, u64)> = manifest["output"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|item| (item["url"].as_str().unwrap_or_default().to_owned(), item["count"].as_u64().unwrap_or(0)))
            .collect();
        let mut downloads = futures::stream::iter(
            outputs.iter().map(|(url, count)| measure::download(self.get(&self.spread(url)), encoding, *count)),
        )
        .buffer_unordered(concurrency.max(1));
        let mut totals = Download::default();
        while let Some(download) = downloads.next().await {
            totals.add(&download?);
        }
        Ok((outputs.len(), totals))
    }

    /// Manifest plus every output file, `concurrency` downloads at a time.
    pub async fn export(&self, group_id: &str, encoding: Encoding, concurrency: usize) -> anyhow::Result<ExportResult> {
        self.export_from(&self.kick_off_url(group_id), encoding, concurrency).await
    }

    /// [`Client::export`] of a kick-off with extra query parameters (URL-safe values).
    pub async fn export_with(
        &self,
        group_id: &str,
        encoding: Encoding,
        concurrency: usize,
        query: &[(&str, &str)],
    ) -> anyhow::Result<ExportResult> {
        let query: Vec<String> = query.iter().map(|(name, value)| format!("{name}={value}")).collect();
        let url = format!("{}?{}", self.kick_off_url(group_id), query.join("&"));
        self.export_from(&url, encoding, concurrency).await
    }

    /// Manifest plus every output file of a kick-off URL (any level).
    pub async fn export_from(
        &self,
        kick_off_url: &str,
        encoding: Encoding,
        concurrency: usize,
    ) -> anyhow::Result<ExportResult> {
        let clock = CpuClock::start();
        let started = Instant::now();
        let manifest = self.manifest_from(kick_off_url).await?;
        let (files, totals) = self.download_all(&manifest, encoding, concurrency).await?;
        let seconds = started.elapsed().as_secs_f64();
        Ok(ExportResult {
            encoding,
            files,
            resources: totals.resources,
            bytes: totals.bytes,
            seconds,
            throttled: totals.throttled,
            peak_rss_bytes: PeakRss::default(),
            client_cpu_share: clock.share(),
            server_cpu_seconds: None,
        })
    }

    /// `POST /r4/$upload-ndjson` with `body` streamed; returns the OperationOutcome's text.
    pub async fn upload_ndjson(&self, body: reqwest::Body) -> anyhow::Result<String> {
        let response = self
            .authorised(self.http.post(format!("{}/r4/$upload-ndjson", self.base())))
            .header("content-type", "application/fhir+ndjson")
            .body(body)
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        anyhow::ensure!(status.is_success(), "$upload-ndjson answered {status}: {text}");
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::Client;

    #[test]
    fn requests_and_minted_urls_go_to_each_instance_in_turn() {
        let bases = vec!["http://127.0.0.1:1".to_owned(), "http://127.0.0.1:2".to_owned()];
        let client = Client::new(reqwest::Client::new(), bases, "id".into(), "secret".into());
        assert_eq!(
            [client.base(), client.base(), client.base()],
            ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:1"]
        );
        let minted = "http://127.0.0.1:1/bulk-data/r4/$export-file/x?y=1";
        assert_eq!(client.spread(minted), "http://127.0.0.1:2/bulk-data/r4/$export-file/x?y=1");
        assert_eq!(client.spread(minted), minted);
        // Not an instance's: a presigned S3 URL, or a port that merely starts the same.
        for other in ["http://127.0.0.1:9000/bucket/key?X-Amz-Signature=s", "http://127.0.0.1:10/path"] {
            assert_eq!(client.spread(other), other);
        }
        let single = Client::new(reqwest::Client::new(), vec!["http://h:1".into()], "id".into(), "secret".into());
        assert_eq!((single.base(), single.base()), ("http://h:1", "http://h:1"));
        assert_eq!(single.spread("http://h:1/x"), "http://h:1/x");
    }
}
