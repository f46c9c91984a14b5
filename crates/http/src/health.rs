//! Health probes, public (no credentials) and cheap.
//!
//! - `GET /healthz/live`: `ok` (200) whenever the process answers HTTP; it touches no store, so a
//!   full disk or a read-only database never gets a live server restarted.
//! - `GET /healthz/ready` (and its alias `GET /healthz`): `ok` (200) while the server can take
//!   writes; otherwise 503 with an OperationOutcome saying why (the store refuses a write, or its
//!   disk has less free space than `min_free_disk_bytes`), so a load balancer stops sending
//!   writes before they fail with 507. The schema is applied when the store opens, before the
//!   server listens, and the probe's write goes to one of its tables: a database without it fails.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bulkhead_fhir::IssueType;
use bulkhead_store::StoreError;

use crate::error::ApiError;
use crate::state::AppState;

/// `GET /healthz/live`.
pub async fn live() -> &'static str {
    "ok"
}

/// `GET /healthz/ready` and `GET /healthz`.
pub async fn ready(State(state): State<AppState>) -> Response {
    let floor = state.config.min_free_disk_bytes;
    let checked = state.blocking(move |store| Ok(store.check_writable(floor))).await;
    let diagnostics = match checked {
        Ok(Ok(())) => return "ok".into_response(),
        Ok(Err(StoreError::StorageFull(detail))) => {
            tracing::error!(error = %detail, "unhealthy: storage full");
            format!("storage is full or below the configured floor of {floor} free bytes")
        }
        Ok(Err(error)) => {
            tracing::error!(error = %error, "unhealthy: the store refuses writes");
            "the store cannot take writes".to_owned()
        }
        Err(_) => "the health check could not run".to_owned(),
    };
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, IssueType::Transient, diagnostics).into_response()
}
