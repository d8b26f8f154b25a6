//! The listener's HTTP endpoints (`listen --http ADDR`): `/` a status page (maud, refreshing itself),
//! `/metrics` in Prometheus text format, `/healthz` (the process is alive) and `/readyz` (its LISTEN
//! session and Redis both work).
//!
//! A request never takes what the listener needs: no pooled connection, no query, no Redis command.
//! Everything served was sampled in the background (the queue by the heartbeat, Redis by
//! [`probe_redis`]) and is read from the [`StatusBoard`], so a flood of requests costs only CPU. Nor
//! can clients hold what the listener needs: at most [`MAX_CONNECTIONS`] are open at once (more are
//! closed as they arrive), a request's headers must arrive within [`HEADER_READ_TIMEOUT`], and a
//! connection takes new requests for [`CONNECTION_LIFETIME`], then closes once its request in flight
//! is answered (within [`REQUEST_GRACE`]); file descriptors stay for PostgreSQL and Redis.

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

/// How long a connection takes new requests; clients connect again.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// How long a request in flight when its connection's lifetime ends has to be answered: longer
/// than any answer takes. `GET /fragments` waits for a render at most `--serve-wait`
/// ([`crate::config::MAX_SERVE_WAIT`] at most); its reads of Redis before and after take
/// milliseconds, well within the ten seconds to spare.
const REQUEST_GRACE: Duration = Duration::from_secs(60);
const _: () = assert!(crate::config::MAX_SERVE_WAIT.as_millis() < REQUEST_GRACE.as_millis());

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
/// and at most `max_connections` at once (the fragment server's own limit is larger). At shutdown
/// it stops accepting, and returns once each connection has answered the request it was
/// answering (if any, within [`REQUEST_GRACE`]; a listener stops this task after its own grace
/// period) and closed: a client waiting for an answer gets it, not a reset connection.
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
        connections.spawn(serve_connection(
            stream,
            app.clone(),
            slot,
            Lifetime::DEFAULT,
            shutdown.clone(),
        ));
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// How long a connection lives: [`CONNECTION_LIFETIME`], then as long again for a request in flight.
#[derive(Clone, Copy, Debug)]
struct Lifetime {
    /// After this, the connection takes no new request.
    lifetime: Duration,
    /// How long a request in flight as the lifetime ends has to be answered before the connection
    /// closes anyway.
    grace: Duration,
}

impl Lifetime {
    const DEFAULT: Lifetime = Lifetime {
        lifetime: CONNECTION_LIFETIME,
        grace: REQUEST_GRACE,
    };
}

/// Serves one connection: HTTP/1.1 with keep-alive, headers within [`HEADER_READ_TIMEOUT`] (idle
/// between requests no longer than that either), new requests for [`CONNECTION_LIFETIME`] or
/// until shutdown. Then it closes once the request being answered, if any, is answered (with
/// `Connection: close`), within [`REQUEST_GRACE`]: a request is not cut off because its
/// connection aged out, or the listener began to stop, while it was answered. (One whose headers
/// are still arriving then is, as at any idle close: clients retry a GET that fails on a reused
/// connection.)
async fn serve_connection(
    stream: tokio::net::TcpStream,
    app: Router,
    _slot: tokio::sync::OwnedSemaphorePermit,
    lifetime: Lifetime,
    shutdown: Shutdown,
) {
    let service = hyper_util::service::TowerToHyperService::new(app);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let connection = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::pin!(connection);
    let ended = tokio::select! {
        ended = connection.as_mut() => Some(ended),
        _ = tokio::time::sleep(lifetime.lifetime) => None,
        _ = shutdown.cancelled() => None,
    };
    let ended = match ended {
        Some(ended) => ended,
        None => {
            connection.as_mut().graceful_shutdown();
            match tokio::time::timeout(lifetime.grace, connection).await {
                Ok(ended) => ended,
                Err(_) => {
                    tracing::debug!(
                        grace = ?lifetime.grace,
                        "HTTP connection closed with a request unanswered past its lifetime"
                    );
                    Ok(())
                }
            }
        }
    };
    if let Err(error) = ended {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::Notify;

    /// A connection to a server of `app` whose connections live `lifetime`, with `grace` for a
    /// request in flight when it ends.
    async fn connect(app: Router, lifetime: Duration, grace: Duration) -> tokio::net::TcpStream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let slot = Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .unwrap();
        tokio::spawn(serve_connection(
            stream,
            app,
            slot,
            Lifetime { lifetime, grace },
            Shutdown::new(),
        ));
        client
    }

    /// Everything the server sends until it closes the connection, within `bound`.
    async fn read_until_closed(client: &mut tokio::net::TcpStream, bound: Duration) -> String {
        let mut answer = Vec::new();
        tokio::time::timeout(bound, client.read_to_end(&mut answer))
            .await
            .expect("the server closes the connection in time")
            .unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// Long enough for anything but a hang.
    const GENEROUS: Duration = Duration::from_secs(30);

    /// A route whose answer waits until the test releases it, telling when it has started.
    fn held_route(started: Arc<Notify>, release: Arc<Notify>) -> Router {
        Router::new().route(
            "/held",
            get(move || async move {
                started.notify_one();
                release.notified().await;
                "answered\n"
            }),
        )
    }

    #[tokio::test]
    async fn a_request_in_flight_as_its_connection_ages_out_is_answered_before_it_closes() {
        let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let lifetime = Duration::from_millis(200);
        let app = held_route(started.clone(), release.clone());
        let mut client = connect(app, lifetime, Duration::from_secs(30)).await;
        client
            .write_all(b"GET /held HTTP/1.1\r\nHost: pgfresh\r\n\r\n")
            .await
            .unwrap();
        started.notified().await;
        // The connection's lifetime ends while its request is being answered.
        tokio::time::sleep(lifetime * 3).await;
        release.notify_one();
        let answer = read_until_closed(&mut client, GENEROUS).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        assert!(answer.ends_with("answered\n"), "{answer:?}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer:?}"
        );
    }

    #[tokio::test]
    async fn an_idle_connection_closes_at_the_end_of_its_lifetime() {
        let app = Router::new().route("/healthz", get(|| async { "ok\n" }));
        let mut client = connect(app, Duration::from_millis(200), Duration::from_secs(30)).await;
        client
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: pgfresh\r\n\r\n")
            .await
            .unwrap();
        // Closed at its lifetime, before the idle limit between requests would close it.
        let bound = HEADER_READ_TIMEOUT - Duration::from_secs(1);
        let answer = read_until_closed(&mut client, bound).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        assert!(answer.ends_with("ok\n"), "{answer:?}");
    }

    #[tokio::test]
    async fn a_request_unanswered_past_the_grace_period_loses_its_connection() {
        let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let app = held_route(started.clone(), release);
        let lifetime = Duration::from_millis(200);
        let mut client = connect(app, lifetime, Duration::from_millis(200)).await;
        client
            .write_all(b"GET /held HTTP/1.1\r\nHost: pgfresh\r\n\r\n")
            .await
            .unwrap();
        started.notified().await;
        assert_eq!(read_until_closed(&mut client, GENEROUS).await, "");
    }

    #[tokio::test]
    async fn at_shutdown_a_request_in_flight_is_answered_and_idle_connections_close() {
        let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let app = held_route(started.clone(), release.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let shutdown = Shutdown::new();
        let server = tokio::spawn(serve(listener, app, shutdown.clone(), 4));
        let mut busy = tokio::net::TcpStream::connect(address).await.unwrap();
        busy.write_all(b"GET /held HTTP/1.1\r\nHost: pgfresh\r\n\r\n")
            .await
            .unwrap();
        started.notified().await;
        // A kept-alive connection, idle once its request is answered.
        let mut idle = tokio::net::TcpStream::connect(address).await.unwrap();
        idle.write_all(b"GET /elsewhere HTTP/1.1\r\nHost: pgfresh\r\n\r\n")
            .await
            .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8];
            idle.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 404"));
        shutdown.cancel();
        // It stops accepting at once, and closes the idle connection.
        let closed = async {
            while tokio::net::TcpStream::connect(address).await.is_ok() {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(GENEROUS, closed)
            .await
            .expect("the server stops accepting");
        // Closed at shutdown, before the idle limit between requests would close it.
        let prompt = HEADER_READ_TIMEOUT - Duration::from_secs(1);
        assert_eq!(read_until_closed(&mut idle, prompt).await, "");
        // The request in flight is answered, then its connection closes and the server returns.
        release.notify_one();
        let answer = read_until_closed(&mut busy, prompt).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        assert!(answer.ends_with("answered\n"), "{answer:?}");
        tokio::time::timeout(GENEROUS, server)
            .await
            .expect("the server returns once its connections closed")
            .unwrap();
    }
}
