//! A bucket of a test's own on the S3 test server `scripts/with-s3` starts, as the `output_*`
//! lines of a server's config file.

/// The S3 test server's endpoint, if `scripts/with-s3` started one (a failure under CI if not;
/// otherwise a loud notice naming what `test` cannot check without it).
pub fn s3_endpoint(test: &str, without_it: &str) -> Option<String> {
    match std::env::var("BULKHEAD_TEST_S3_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => Some(endpoint),
        _ if std::env::var_os("CI").is_some() => {
            panic!("BULKHEAD_TEST_S3_ENDPOINT is unset in CI: run the tests through scripts/with-s3")
        }
        _ => {
            eprintln!("\n*** {test}: no S3 test server (scripts/with-s3): {without_it} ***\n");
            None
        }
    }
}

/// A fresh bucket on the S3 test server.
pub struct S3Bucket {
    pub endpoint: String,
    pub name: String,
}

impl S3Bucket {
    /// Creates a bucket on `endpoint`.
    pub async fn create(endpoint: &str) -> S3Bucket {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let name = format!("bulkhead-{nanos:x}-{}", std::process::id());
        let created = reqwest::Client::new().put(format!("{endpoint}/{name}")).send().await.expect("create bucket");
        assert!(created.status().is_success(), "creating bucket {name}: {}", created.status());
        S3Bucket { endpoint: endpoint.to_owned(), name }
    }

    /// The config lines that make a server write asynchronous exports under `exports/`.
    pub fn output_toml(&self) -> String {
        format!(
            "output_url = \"s3://{}/exports\"\noutput_endpoint = \"{}\"\noutput_region = \"us-east-1\"\n\
             output_access_key_id = \"test\"\noutput_secret_access_key = \"test\"\noutput_allow_http = true\n",
            self.name, self.endpoint
        )
    }

    /// How many objects the bucket holds (up to 1,000).
    pub async fn object_count(&self) -> usize {
        let url = format!("{}/{}?list-type=2", self.endpoint, self.name);
        let listing = reqwest::Client::new().get(url).send().await.expect("list the bucket");
        assert!(listing.status().is_success(), "listing {}: {}", self.name, listing.status());
        listing.text().await.expect("the listing").matches("<Key>").count()
    }
}
