//! FHIR JSON in and out: `Accept` and `Content-Type` checks, body limits, responses.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
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

/// FHIR's general parameters (R4 §3.1.0.1.10: `_format`, `_pretty`), allowed on every FHIR
/// route and checked once by [`general_params`]; route-specific parsers skip them.
pub fn is_general_param(name: &str) -> bool {
    matches!(name, "_format" | "_pretty")
}

/// Checks the general parameters of a query: a JSON `_format` and `_pretty=true|false` are
/// accepted (the JSON served is the stored text, so `_pretty` changes nothing), any other
/// `_format` is 406 like an `Accept` without JSON, and any other `_pretty` is 400.
pub fn check_general_params(query: &str) -> Result<(), ApiError> {
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        match name.as_ref() {
            "_format" => {
                // `+` in a query decodes to a space: `_format=application/fhir+json` arrives as
                // `application/fhir json` unless the client percent-encoded it.
                let media = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
                let json = matches!(
                    media.as_str(),
                    "json"
                        | "application/json"
                        | "application/fhir+json"
                        | "application/fhir json"
                        | "application/json+fhir"
                        | "application/json fhir"
                );
                if !json {
                    return Err(ApiError::new(
                        StatusCode::NOT_ACCEPTABLE,
                        IssueType::NotSupported,
                        format!("_format '{value}' is not supported: this server speaks application/fhir+json (_format=json)"),
                    )
                    .at("_format"));
                }
            }
            "_pretty" if !matches!(value.as_ref(), "true" | "false") => {
                return Err(ApiError::bad_request(IssueType::Invalid, "_pretty must be true or false").at("_pretty"));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Middleware for the FHIR routes: [`check_general_params`] before the handler runs.
pub async fn general_params(request: Request, next: Next) -> Response {
    match check_general_params(request.uri().query().unwrap_or("")) {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
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
    fn json_formats_and_pretty_pass_and_xml_is_not_acceptable() {
        for query in [
            "_format=json",
            "_format=application/json",
            "_format=application/fhir+json",
            "_format=application%2Ffhir%2Bjson",
            "_format=application/fhir%2Bjson;fhirVersion=4.0",
            "_pretty=true",
            "_pretty=false&_format=JSON",
            "_count=5",
            "",
        ] {
            assert!(check_general_params(query).is_ok(), "{query}");
        }
        for (query, status, at) in [
            ("_format=xml", StatusCode::NOT_ACCEPTABLE, "_format"),
            ("_format=application/fhir%2Bxml", StatusCode::NOT_ACCEPTABLE, "_format"),
            ("_format=json&_format=html", StatusCode::NOT_ACCEPTABLE, "_format"),
            ("_pretty=yes", StatusCode::BAD_REQUEST, "_pretty"),
        ] {
            let error = check_general_params(query).unwrap_err();
            assert_eq!((error.status, error.issues[0].expression.as_deref()), (status, Some(at)), "{query}");
        }
    }

    #[test]
    fn http_dates_are_imf_fixdates() {
        assert_eq!(http_date(784_111_777).as_deref(), Some("Sun, 06 Nov 1994 08:49:37 GMT"));
        assert_eq!(http_date(0).as_deref(), Some("Thu, 01 Jan 1970 00:00:00 GMT"));
    }
}
