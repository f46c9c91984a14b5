//! FHIR JSON in and out: `Accept` and `Content-Type` checks, body limits, responses.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bulkhead_fhir::IssueType;
use serde_json::Value;

use crate::error::ApiError;
use crate::state::AppState;
use crate::validate::parse_resource;
use crate::FHIR_JSON;
use time::macros::format_description;
use time::OffsetDateTime;

fn media_types(value: &str) -> impl Iterator<Item = String> + '_ {
    value.split(',').map(|item| item.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
}

/// Refuses (406) an `Accept` header that allows no JSON: FHIR XML is not served.
pub fn check_accept(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(accept) = headers.get(header::ACCEPT) else { return Ok(()) };
    let accept = accept.to_str().unwrap_or("");
    if accept.trim().is_empty() {
        return Ok(());
    }
    let acceptable = media_types(accept).any(|media| {
        matches!(media.as_str(), "application/fhir+json" | "application/json" | "*/*" | "application/*" | "json")
    });
    if acceptable {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::NOT_ACCEPTABLE,
        IssueType::NotSupported,
        format!("cannot produce '{accept}': this server speaks application/fhir+json"),
    )
    .at("Accept"))
}

/// A request body parsed as JSON, after the `Content-Type` (415) and size (413) checks.
pub struct JsonBody(pub Value);

impl FromRequest<AppState> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<JsonBody, ApiError> {
        let content_type = request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let media = media_types(content_type).next().unwrap_or_default();
        if !matches!(media.as_str(), "application/fhir+json" | "application/json" | "") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                IssueType::NotSupported,
                format!("content type '{content_type}' is not supported: send application/fhir+json"),
            )
            .at("Content-Type"));
        }
        let bytes = read_limited(request.into_body(), state.config.max_body_bytes).await?;
        Ok(JsonBody(parse_resource(&bytes)?))
    }
}

/// Reads a whole body, refusing one larger than `limit` (413), one that paused too long (408)
/// and one that ended early (400: the client aborted it).
pub async fn read_limited(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|error| body_error(&error, limit))
}

/// The client-facing error for a request body that could not be read.
pub fn body_error(error: &axum::Error, limit: usize) -> ApiError {
    if crate::timeouts::is_idle_timeout(error) {
        return ApiError::new(StatusCode::REQUEST_TIMEOUT, IssueType::Timeout, error.to_string());
    }
    let too_large = std::iter::successors(Some(error as &(dyn std::error::Error + 'static)), |e| e.source())
        .any(|e| e.is::<http_body_util::LengthLimitError>());
    if too_large {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            IssueType::TooCostly,
            format!("request body is larger than the limit of {limit} bytes"),
        );
    }
    ApiError::bad_request(IssueType::Structure, "the request body ended before it was complete")
}

/// A FHIR JSON response from stored text (sent as is, never re-serialised).
pub fn fhir_response(status: StatusCode, body: impl Into<Body>) -> Response {
    let mut response = (status, body.into()).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    response
}

/// An RFC 9110 IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) for Unix seconds, as `Expires` and
/// `Last-Modified` require.
pub fn http_date(seconds: i64) -> Option<String> {
    let format =
        format_description!("[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT");
    OffsetDateTime::from_unix_timestamp(seconds).ok()?.format(&format).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_are_imf_fixdates() {
        assert_eq!(http_date(784_111_777).as_deref(), Some("Sun, 06 Nov 1994 08:49:37 GMT"));
        assert_eq!(http_date(0).as_deref(), Some("Thu, 01 Jan 1970 00:00:00 GMT"));
    }
}
