//! The listener's HTTP endpoints (`listen --http ADDR`): `/` a status page (maud, refreshing itself),
//! `/metrics` in Prometheus text format, `/healthz` (the process is alive) and `/readyz` (its LISTEN
//! session and Redis both work).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Html;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::Error;
use crate::db::Database;
use crate::shutdown::Shutdown;
use crate::sink::RedisSink;
use crate::status::StatusBoard;

/// What the endpoints look at.
#[derive(Clone)]
pub struct Sources {
    /// Set while the LISTEN session is up.
    pub listen_connected: Arc<AtomicBool>,
    /// Pinged on every readiness check.
    pub sink: RedisSink,
    /// Asked for the queue's state by the status page.
    pub db: Database,
    /// The listener's own record of what happened.
    pub board: Arc<StatusBoard>,
    /// Shown on the status page.
    pub listener_id: String,
}

#[derive(Clone)]
struct AppState {
    metrics: Option<PrometheusHandle>,
    sources: Sources,
}

/// Binds `address` now, so that a taken port fails start-up with a clear message, and returns the
/// server to run until shutdown.
pub async fn bind(
    address: SocketAddr,
    sources: Sources,
    shutdown: Shutdown,
) -> Result<impl std::future::Future<Output = ()>, Error> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| Error::Http {
            address,
            reason: e.to_string(),
        })?;
    let state = AppState {
        metrics: crate::telemetry::install_prometheus(),
        sources,
    };
    let app = Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(state);
    tracing::info!(%address, "serving the status page, /metrics, /healthz and /readyz");
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
    match problem(&state.sources).await {
        None => (StatusCode::OK, "ready\n".into()),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}

/// Why the listener cannot do its work right now, if it cannot.
async fn problem(sources: &Sources) -> Option<String> {
    if !sources.listen_connected.load(Ordering::Relaxed) {
        return Some("PostgreSQL LISTEN session is down".into());
    }
    match tokio::time::timeout(Duration::from_secs(2), sources.sink.ping()).await {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(format!("Redis: {error}")),
        Err(_) => Some("Redis did not answer a PING within 2 s".into()),
    }
}

async fn status_page(State(state): State<AppState>) -> Html<String> {
    let sources = &state.sources;
    let problem = problem(sources).await;
    let queue = match sources.db.get().await {
        Ok(client) => crate::queue::stats(&client)
            .await
            .map_err(|e| e.to_string()),
        Err(error) => Err(error.to_string()),
    };
    let page = crate::status::page(
        &sources.listener_id,
        problem.as_deref(),
        &queue,
        &sources.board.view(),
    );
    Html(page.into_string())
}
