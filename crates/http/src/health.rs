//! `GET /healthz`: `ok` (200) while the server can take writes; otherwise 503 with an
//! OperationOutcome saying why (the store refuses a write, or its disk has less free space than
//! `min_free_disk_bytes`), so a load balancer stops sending writes before they fail with 507.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bulkhead_fhir::IssueType;
use bulkhead_store::StoreError;

use crate::error::ApiError;
use crate::state::AppState;

pub async fn healthz(State(state): State<AppState>) -> Response {
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
