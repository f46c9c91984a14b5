//! The one place where errors become HTTP statuses and OperationOutcomes.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bulkhead_fhir::{operation_outcome, Issue, IssueType};
use bulkhead_store::StoreError;

/// What a 503 tells the client to wait before sending the request again.
pub const RETRY_AFTER_SECONDS: &str = "5";

/// An error a client sees: a status and the issues of its OperationOutcome.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub issues: Vec<Issue>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: IssueType, diagnostics: impl Into<String>) -> ApiError {
        ApiError { status, issues: vec![Issue::error(code, diagnostics)] }
    }

    pub fn from_issue(status: StatusCode, issue: Issue) -> ApiError {
        ApiError { status, issues: vec![issue] }
    }

    pub fn bad_request(code: IssueType, diagnostics: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, diagnostics)
    }

    pub fn unprocessable(code: IssueType, diagnostics: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, diagnostics)
    }

    pub fn not_found(diagnostics: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, IssueType::NotFound, diagnostics)
    }

    /// Missing or wrong credentials; deliberately silent about which part was wrong.
    pub fn unauthorized() -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, IssueType::Login, "missing or invalid client credentials")
    }

    /// 507: the server's disk is full; the request stored nothing and can be sent again later.
    pub fn insufficient_storage() -> ApiError {
        ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            IssueType::Transient,
            "the server's storage is full: nothing of this request was stored; try again later",
        )
    }

    /// 503: the database cannot be reached now; nothing was done, and the same request can be
    /// sent again after `Retry-After`.
    pub fn store_unavailable() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            IssueType::Transient,
            "the database is unavailable: nothing was done; try again shortly",
        )
    }

    pub fn internal() -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, IssueType::Exception, "internal server error")
    }

    /// Points the (first) issue at a FHIRPath expression or parameter name.
    pub fn at(mut self, expression: impl Into<String>) -> ApiError {
        if let Some(first) = self.issues.first_mut() {
            first.expression = Some(expression.into());
        }
        self
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        match error {
            StoreError::NotFound(what) => ApiError::not_found(format!("{what} not found")),
            StoreError::Conflict(what) => ApiError::new(StatusCode::CONFLICT, IssueType::Duplicate, what),
            StoreError::VersionConflict(what) => {
                ApiError::new(StatusCode::PRECONDITION_FAILED, IssueType::Conflict, what)
            }
            StoreError::Invalid(what) => ApiError::unprocessable(IssueType::Invalid, what),
            StoreError::Database(detail) => {
                tracing::error!(error = %detail, "store failure");
                ApiError::internal()
            }
            StoreError::StorageFull(detail) => {
                tracing::error!(error = %detail, "storage full");
                ApiError::insufficient_storage()
            }
            StoreError::Unavailable(detail) => {
                tracing::error!(error = %detail, "store unavailable");
                ApiError::store_unavailable()
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_client_error() {
            // Diagnostics echo what the client sent: logged only through `log_value`.
            let diagnostics: Vec<String> =
                self.issues.iter().map(|issue| crate::log_value::log_value(&issue.diagnostics)).collect();
            tracing::info!(status = self.status.as_u16(), diagnostics = ?diagnostics, "request refused");
        }
        let refused_credentials = self.status == StatusCode::UNAUTHORIZED
            && self.issues.first().is_some_and(|issue| issue.code == IssueType::Login);
        let body = operation_outcome(&self.issues).to_string();
        let mut response = (self.status, body).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(crate::FHIR_JSON));
        if refused_credentials {
            response.extensions_mut().insert(crate::login_limits::CredentialsRefused);
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // A 503 is temporary (the database or the disk check): say when to come back.
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS));
        }
        response
    }
}

/// A panic in a handler becomes a logged 500 OperationOutcome, never a dropped connection.
pub fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    tracing::error!(panic = detail, "handler panicked");
    ApiError::internal().into_response()
}
