//! The listener: HTTP/1.1 connections under a cap, each with a header read timeout and a limit on
//! how long a client may stop reading ([`crate::stall`]), serving the router until shutdown.
//! Slow or idle clients cost a small task each, never a blocking thread, and are disconnected
//! when they stall ([`crate::timeouts`] bounds the rest of a request).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::StatusCode;
use bulkhead_fhir::{operation_outcome, Issue, IssueType};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::stall::StallLimited;
use crate::state::AppState;

/// Largest request head (request line and headers) read: beyond it hyper answers 431. Real
/// clients send a few KiB; the default (~400 KiB) let one header fill log lines and memory.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// How long a refused connection (over the cap) gets to take its 503.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Serves the router on an already bound listener until `shutdown` resolves, then lets in-flight
/// requests finish (up to `grace`).
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    // Jobs of instances that died are taken over even when this one gets no kick-off.
    crate::export_worker::start(&state);
    let limits = state.config.limits.clone();
    let stall_limit = state.config.download_stall_timeout;
    let metrics = state.metrics.clone();
    let audit = state.audit.clone();
    let jobs = state.clone();
    let app = crate::router(state);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).max_buf_size(MAX_HEAD_BYTES);
    tokio::pin!(shutdown);
    // Refusals are logged at most every 10 s, with a count: a flood must not flood the log.
    let (mut refused, mut last_warning): (u64, Option<std::time::Instant>) = (0, None);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused += 1;
            if last_warning.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                tracing::warn!(refused, max_connections = limits.max_connections, "connection cap reached: refusing");
                (refused, last_warning) = (0, Some(std::time::Instant::now()));
            }
            tokio::spawn(refuse_connection(stream, limits.max_connections));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let mut request = request.map(Body::new);
            request.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(request)
        });
        let connection =
            graceful.watch(http.serve_connection(TokioIo::new(StallLimited::new(stream, stall_limit)), service));
        let open = metrics.as_ref().map(|metrics| metrics.connection());
        tokio::spawn(async move {
            // Timeouts and clients hanging up end here; neither is the server's error.
            if let Err(error) = connection.await {
                tracing::debug!(error = %error, "connection ended with an error");
            }
            drop((slot, open));
        });
    }
    drop(listener);
    tracing::info!("shutting down: finishing in-flight requests");
    // Export jobs go back to the queue (for other instances) while the last requests finish.
    let requests = async {
        if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
            tracing::warn!(grace_seconds = grace.as_secs(), "in-flight requests did not finish in time");
        }
    };
    tokio::join!(requests, crate::export_worker::drain(&jobs, grace));
    // The records of the last requests (and downloads) are stored before the process ends.
    audit.flush().await;
    Ok(())
}

/// Answers a connection over the cap with a 503 OperationOutcome and closes it. The request
/// head is read first (briefly, up to 16 KiB, and discarded): clients treat an answer that comes
/// before their request as a broken connection, and closing with unread bytes resets it.
async fn refuse_connection(mut stream: TcpStream, max_connections: usize) {
    let body = operation_outcome(&[Issue::error(
        IssueType::Transient,
        format!("the server is at its limit of {max_connections} open connections; retry shortly"),
    )])
    .to_string();
    let status = StatusCode::SERVICE_UNAVAILABLE;
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        crate::FHIR_JSON,
        body.len()
    );
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        let mut request = Vec::new();
        let mut buffer = [0u8; 4096];
        while request.len() < 16 * 1024 && !request.windows(4).any(|window| window == b"\r\n\r\n") {
            match stream.read(&mut buffer).await? {
                0 => break,
                n => request.extend_from_slice(&buffer[..n]),
            }
        }
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await?;
        while stream.read(&mut buffer).await? > 0 {}
        Ok::<(), std::io::Error>(())
    })
    .await;
}

/// The peer of a request served by [`serve`] (absent in-process, where no socket exists).
pub fn peer_address(request: &axum::extract::Request) -> Option<SocketAddr> {
    request.extensions().get::<ConnectInfo<SocketAddr>>().map(|info| info.0)
}
