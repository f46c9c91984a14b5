//! Write throughput over HTTP: single creates and transaction Bundles.

use std::time::Instant;

use futures::StreamExt;
use serde_json::{json, Value};

use super::client::Client;

pub struct WriteResult {
    pub single_creates: usize,
    pub single_seconds: f64,
    pub bundles: usize,
    pub bundle_entries: usize,
    pub bundle_seconds: f64,
}

impl WriteResult {
    pub fn creates_per_second(&self) -> f64 {
        self.single_creates as f64 / self.single_seconds.max(1e-9)
    }

    pub fn bundle_resources_per_second(&self) -> f64 {
        (self.bundles * self.bundle_entries) as f64 / self.bundle_seconds.max(1e-9)
    }
}

pub fn observation(patient_reference: &str, index: usize) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
        "subject": {"reference": patient_reference},
        "effectiveDateTime": "2025-06-01T10:00:00Z",
        "valueQuantity": {"value": 60 + (index % 40), "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}
    })
}

/// `creates` single POSTs (`concurrency` in flight), then `bundles` transaction Bundles of
/// `entries` resources each (one Patient, the rest Observations referencing it by urn:uuid).
pub async fn measure_writes(
    client: &Client,
    creates: usize,
    concurrency: usize,
    bundles: usize,
    entries: usize,
) -> anyhow::Result<WriteResult> {
    let started = Instant::now();
    let mut posts = futures::stream::iter((0..creates).map(|index| async move {
        let body = observation("Patient/bench-writes", index).to_string();
        client.post(&format!("{}/r4/Observation", client.base()), body).await
    }))
    .buffer_unordered(concurrency.max(1));
    while let Some(result) = posts.next().await {
        result?;
    }
    let single_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    for bundle_index in 0..bundles {
        let patient_url = format!("urn:uuid:00000000-0000-4000-8000-{bundle_index:012}");
        let mut items = vec![json!({
            "fullUrl": patient_url,
            "resource": {"resourceType": "Patient", "name": [{"family": format!("Bench{bundle_index}")}]},
            "request": {"method": "POST", "url": "Patient"}
        })];
        items.extend((1..entries).map(|index| json!({"resource": observation(&patient_url, index), "request": {"method": "POST", "url": "Observation"}})));
        let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": items});
        client.post(&format!("{}/r4", client.base()), bundle.to_string()).await?;
    }
    let bundle_seconds = started.elapsed().as_secs_f64();
    Ok(WriteResult { single_creates: creates, single_seconds, bundles, bundle_entries: entries, bundle_seconds })
}
