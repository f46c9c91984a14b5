//! Talking to a running server as a client would: credentials on every request, responses
//! read to the end, and small FHIR bodies to write.

use std::time::Duration;

use serde_json::Value;

/// A plain HTTP client: no proxies, no automatic decompression (reqwest is built without it).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().expect("http client")
}

/// A client of the server: its credentials and, optionally, a user scope.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    pub client_id: String,
    pub client_secret: String,
    pub user: Option<String>,
}

/// A response read to the end.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("status {} body is not JSON ({error}): {}", self.status, self.text()))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(|value| value.to_str().expect("ASCII header").to_owned())
    }

    /// Asserts the status and returns the JSON body.
    pub fn expect(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "unexpected status; body: {}", self.text());
        self.json()
    }

    /// Asserts an error status answered with a FHIR OperationOutcome.
    pub fn expect_outcome(&self, status: u16) -> Value {
        let outcome = self.expect(status);
        assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
        assert_eq!(self.header("content-type").as_deref(), Some("application/fhir+json"));
        outcome
    }
}

impl Api {
    /// The same credentials acting as a user (`x-oneup-user-id`).
    pub fn as_user(&self, user: &str) -> Api {
        Api { user: Some(user.to_owned()), ..self.clone() }
    }

    /// The same server with other credentials.
    pub fn with_secret(&self, client_id: &str, client_secret: &str) -> Api {
        Api { client_id: client_id.to_owned(), client_secret: client_secret.to_owned(), ..self.clone() }
    }

    /// A request with the client headers; `target` is a path or an absolute URL.
    pub fn request(&self, method: reqwest::Method, target: &str) -> reqwest::RequestBuilder {
        let url = if target.starts_with("http") { target.to_owned() } else { format!("{}{target}", self.base) };
        let mut request = self
            .http
            .request(method, url)
            .header("client_id", &self.client_id)
            .header("client_secret", &self.client_secret);
        if let Some(user) = &self.user {
            request = request.header("x-oneup-user-id", user);
        }
        request
    }

    pub async fn send(request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.expect("HTTP request");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await.expect("response body").to_vec();
        Reply { status, headers, body }
    }

    pub async fn get(&self, target: &str) -> Reply {
        Api::send(self.request(reqwest::Method::GET, target)).await
    }

    pub async fn delete(&self, target: &str) -> Reply {
        Api::send(self.request(reqwest::Method::DELETE, target)).await
    }

    pub async fn post(&self, target: &str, body: &Value) -> Reply {
        Api::send(
            self.request(reqwest::Method::POST, target)
                .header("content-type", "application/fhir+json")
                .body(body.to_string()),
        )
        .await
    }

    pub async fn put(&self, target: &str, body: &Value) -> Reply {
        Api::send(
            self.request(reqwest::Method::PUT, target)
                .header("content-type", "application/fhir+json")
                .body(body.to_string()),
        )
        .await
    }

    /// `POST /r4/{type}` → the server-assigned id.
    pub async fn create(&self, body: &Value) -> String {
        let resource_type = body["resourceType"].as_str().expect("resourceType");
        let created = self.post(&format!("/r4/{resource_type}"), body).await.expect(201);
        created["id"].as_str().expect("created resource has an id").to_owned()
    }

    /// `PUT /r4/{type}/{id}` (create or update) → the stored resource.
    pub async fn upsert(&self, body: &Value) -> Value {
        let resource_type = body["resourceType"].as_str().expect("resourceType");
        let id = body["id"].as_str().expect("id");
        let reply = self.put(&format!("/r4/{resource_type}/{id}"), body).await;
        assert!(matches!(reply.status, 200 | 201), "PUT {resource_type}/{id}: {} {}", reply.status, reply.text());
        reply.json()
    }

    /// `GET /r4/{reference}` expecting 200.
    pub async fn read(&self, reference: &str) -> Value {
        self.get(&format!("/r4/{reference}")).await.expect(200)
    }
}

/// A Patient body.
pub fn patient(id: Option<&str>, family: &str) -> Value {
    let mut body = serde_json::json!({"resourceType": "Patient", "name": [{"family": family}], "gender": "female", "birthDate": "1970-01-01"});
    if let Some(id) = id {
        body["id"] = id.into();
    }
    body
}

/// An Observation body about `Patient/{patient}`.
pub fn observation(id: Option<&str>, patient: &str, value: f64) -> Value {
    let mut body = serde_json::json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "valueQuantity": {"value": value, "unit": "kg"},
    });
    if let Some(id) = id {
        body["id"] = id.into();
    }
    body
}

/// A Group body listing `Patient/{id}` members.
pub fn group(id: Option<&str>, members: &[&str]) -> Value {
    let member: Vec<Value> =
        members.iter().map(|id| serde_json::json!({"entity": {"reference": format!("Patient/{id}")}})).collect();
    let mut body = serde_json::json!({"resourceType": "Group", "type": "person", "actual": true, "member": member});
    if let Some(id) = id {
        body["id"] = id.into();
    }
    body
}
