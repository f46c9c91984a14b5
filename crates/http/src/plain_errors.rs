//! The last guard of "every error is an OperationOutcome": an error response made anywhere but
//! [`ApiError`] (axum's extractor rejections for a bad path or query, a layer's refusal) is
//! rewritten as an OperationOutcome with the same status and headers.

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bulkhead_fhir::IssueType;

use crate::error::ApiError;

/// Longest plain-text error body kept as diagnostics.
const MAX_DIAGNOSTICS_BYTES: usize = 1024;

/// Middleware: rewrites an error response that is not FHIR JSON.
pub async fn errors_as_operation_outcomes(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_fhir = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with(crate::FHIR_JSON));
    // The token endpoint answers in OAuth's shape (RFC 6749 §5.2), which clients parse.
    let is_oauth = response.extensions().get::<crate::token_endpoint::OAuthAnswer>().is_some();
    if !(status.is_client_error() || status.is_server_error()) || is_fhir || is_oauth {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_DIAGNOSTICS_BYTES)
        .await
        .ok()
        .and_then(|bytes| String::from_utf8(bytes.to_vec()).ok())
        .map(|text| text.trim().to_owned())
        .filter(|text| !text.is_empty());
    let diagnostics = text.unwrap_or_else(|| status.canonical_reason().unwrap_or("request refused").to_owned());
    let mut outcome = ApiError::new(status, issue_type(status), diagnostics).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            outcome.headers_mut().append(name.clone(), value.clone());
        }
    }
    outcome
}

fn issue_type(status: StatusCode) -> IssueType {
    match status {
        StatusCode::UNAUTHORIZED => IssueType::Login,
        StatusCode::FORBIDDEN => IssueType::Forbidden,
        StatusCode::NOT_FOUND => IssueType::NotFound,
        StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_ACCEPTABLE | StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            IssueType::NotSupported
        }
        StatusCode::REQUEST_TIMEOUT => IssueType::Timeout,
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE | StatusCode::URI_TOO_LONG => {
            IssueType::TooCostly
        }
        StatusCode::TOO_MANY_REQUESTS => IssueType::Throttled,
        StatusCode::CONFLICT => IssueType::Conflict,
        status if status.is_server_error() => IssueType::Exception,
        _ => IssueType::Invalid,
    }
}
