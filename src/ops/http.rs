//! The listener's HTTP endpoints (`listen --http ADDR`): `/` a status page (maud, refreshing itself),
//! `/metrics` in Prometheus text format, `/healthz` (the process is alive) and `/readyz` (its LISTEN
//! session and Redis both work).
//!
//! A request never takes what the listener needs: no pooled connection, no query, no Redis command.
//! Everything served was sampled in the background (the queue by the heartbeat, Redis by
//! [`probe_redis`]) and is read from the [`StatusBoard`], so a flood of requests costs only CPU. Nor
//! can clients hold what the listener needs: at most [`MAX_CONNECTIONS`] are open at once (more are
//! closed as they arrive), a request's headers must arrive within [`HEADER_READ_TIMEOUT`], and no
//! connection lives longer than [`CONNECTION_LIFETIME`]; file descriptors stay for PostgreSQL and
//! Redis.

use std::sync::Arc;

use crate::pg::standby::Standby;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Html;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::Error;
use crate::ops::board::StatusBoard;
use crate::shutdown::Shutdown;
use crate::store::RedisStore;

/// How often Redis is pinged in the background.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// How long a PING may take before Redis counts as not answering.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// An answer older than this is not trusted: the probe itself is stuck.
const PROBE_STALE: Duration = Duration::from_secs(5);

/// Most connections open at once: plenty for a scraper and a few browsers, few enough that clients
/// never take the descriptors the listener's own connections need.
const MAX_CONNECTIONS: usize = 64;

/// How long a client may take to send a request's headers (each request's, on a kept-alive
/// connection) before its connection is closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest a connection stays open, whatever it does; clients connect again.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// What the endpoints look at.
#[derive(Clone)]
pub(crate) struct Sources {
    /// Set while the LISTEN session is up.
    pub(crate) listen_connected: Arc<AtomicBool>,
    /// The listener's own record of what happened, and of what was sampled.
    pub(crate) board: Arc<StatusBoard>,
    /// Shown on the status page.
    pub(crate) listener_id: String,
    /// The hot standby loads may go to, when one was given.
    pub(crate) standby: Option<Arc<Standby>>,
    /// What `GET /fragments/{key}` has done, with `--serve`.
    pub(crate) serve: Option<Arc<super::board::ServeCounts>>,
}

#[derive(Clone)]
struct AppState {
    metrics: Option<PrometheusHandle>,
    sources: Sources,
}

/// Binds `address` now, so that a taken port fails start-up with a clear message, and returns the
/// server to run until shutdown.
pub(crate) async fn bind(
    address: &str,
    sources: Sources,
    shutdown: Shutdown,
) -> Result<impl std::future::Future<Output = ()> + use<>, Error> {
    let (listener, address) = listen_on(address).await?;
    let state = AppState {
        metrics: crate::ops::telemetry::install_prometheus(),
        sources,
    };
    let app = Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(state);
    tracing::info!(%address, "serving the status page, /metrics, /healthz and /readyz");
    Ok(serve(listener, app, shutdown, MAX_CONNECTIONS))
}

/// A TCP listener on `address`, and the address it is bound to (its port, when `:0` asked for
/// any), or one line saying why not.
pub(crate) async fn listen_on(
    address: &str,
) -> Result<(tokio::net::TcpListener, std::net::SocketAddr), Error> {
    let failed = |e: std::io::Error| Error::Http {
        address: address.to_string(),
        reason: e.to_string(),
    };
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(failed)?;
    let bound = listener.local_addr().map_err(failed)?;
    Ok((listener, bound))
}

/// Accepts connections until shutdown, each served on a task of its own within the limits above
/// and at most `max_connections` at once (the fragment server's own limit is larger).
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: Shutdown,
    max_connections: usize,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        while connections.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of descriptors, most likely: wait for some to be freed rather than spin.
                tracing::debug!(%error, "cannot accept an HTTP connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("{max_connections} HTTP connections open: closing a new one");
            continue;
        };
        connections.spawn(serve_connection(stream, app.clone(), slot));
    }
    connections.abort_all();
}

/// Serves one connection: HTTP/1.1 with keep-alive, headers within [`HEADER_READ_TIMEOUT`], for
/// at most [`CONNECTION_LIFETIME`].
async fn serve_connection(
    stream: tokio::net::TcpStream,
    app: Router,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let service = hyper_util::service::TowerToHyperService::new(app);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let connection = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    if let Ok(Err(error)) = tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
        tracing::debug!(%error, "HTTP connection ended");
    }
}

async fn metrics(State(state): State<AppState>) -> (StatusCode, String) {
    crate::ops::telemetry::ready(problem(&state.sources).is_none());
    match &state.metrics {
        Some(handle) => (StatusCode::OK, handle.render()),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "another metrics recorder is installed in this process\n".into(),
        ),
    }
}

async fn ready(State(state): State<AppState>) -> (StatusCode, String) {
    match problem(&state.sources) {
        None => (StatusCode::OK, "ready\n".into()),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}

/// Why the listener cannot do its work right now, if it cannot, from what was last sampled.
fn problem(sources: &Sources) -> Option<String> {
    let view = sources.board.view();
    if view.polling.is_none() && !sources.listen_connected.load(Ordering::Relaxed) {
        return Some("PostgreSQL LISTEN session is down".into());
    }
    match view.redis_answer {
        None => Some("Redis has not been asked yet".into()),
        Some((at, _)) if at.elapsed() > PROBE_STALE => Some(format!(
            "Redis has not answered a PING for {} s",
            at.elapsed().as_secs()
        )),
        Some((_, Ok(()))) => None,
        Some((_, Err(error))) => Some(error),
    }
}

async fn status_page(State(state): State<AppState>) -> Html<String> {
    let sources = &state.sources;
    let problem = problem(sources);
    let page = super::page::page(
        &sources.listener_id,
        problem.as_deref(),
        &sources.board.view(),
        sources
            .standby
            .as_ref()
            .map(|standby| standby.view())
            .as_ref(),
        sources.serve.as_deref(),
    );
    Html(page.into_string())
}

/// Pings Redis every [`PROBE_INTERVAL`] until shutdown, noting each answer on the board for
/// `/readyz` and the status page.
pub(crate) async fn probe_redis(store: RedisStore, board: Arc<StatusBoard>, shutdown: Shutdown) {
    loop {
        let answer = match tokio::time::timeout(PROBE_TIMEOUT, store.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(format!("Redis: {error}")),
            Err(_) => Err(format!(
                "Redis did not answer a PING within {} s",
                PROBE_TIMEOUT.as_secs()
            )),
        };
        board.redis_answered(answer);
        if !crate::shutdown::pause(&shutdown, PROBE_INTERVAL).await {
            return;
        }
    }
}
