//! The listener's HTTP endpoints (`listen --http ADDR`): `/metrics` in Prometheus text format,
//! `/healthz` (the process is alive) and `/readyz` (its LISTEN session and Redis both work).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::Error;
use crate::shutdown::Shutdown;
use crate::sink::RedisSink;

/// What `/readyz` checks.
#[derive(Clone)]
pub struct Readiness {
    /// Set while the LISTEN session is up.
    pub listen_connected: Arc<AtomicBool>,
    /// Pinged on every check.
    pub sink: RedisSink,
}

#[derive(Clone)]
struct AppState {
    metrics: Option<PrometheusHandle>,
    readiness: Readiness,
}

/// Binds `address` now, so that a taken port fails start-up with a clear message, and returns the
/// server to run until shutdown.
pub async fn bind(
    address: SocketAddr,
    readiness: Readiness,
    shutdown: Shutdown,
) -> Result<impl std::future::Future<Output = ()>, Error> {
    let listener = tokio::net::TcpListener::bind(address).await.map_err(|e| {
        Error::Fragment(format!(
            "cannot serve HTTP on {address}: {e}; choose another --http address"
        ))
    })?;
    let state = AppState {
        metrics: crate::telemetry::install_prometheus(),
        readiness,
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(state);
    tracing::info!(%address, "serving /metrics, /healthz and /readyz");
    Ok(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::warn!(%error, "HTTP server stopped");
        }
    })
}

async fn metrics(State(state): State<AppState>) -> (StatusCode, String) {
    match &state.metrics {
        Some(handle) => (StatusCode::OK, handle.render()),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "another metrics recorder is installed in this process\n".into(),
        ),
    }
}

async fn ready(State(state): State<AppState>) -> (StatusCode, String) {
    let readiness = &state.readiness;
    if !readiness.listen_connected.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "PostgreSQL LISTEN session is down\n".into(),
        );
    }
    match tokio::time::timeout(Duration::from_secs(2), readiness.sink.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n".into()),
        Ok(Err(error)) => (StatusCode::SERVICE_UNAVAILABLE, format!("Redis: {error}\n")),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "Redis did not answer a PING within 2 s\n".into(),
        ),
    }
}
