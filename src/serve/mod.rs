//! Misses filled by pgfresh (`listen --serve ADDR`): `GET /fragments/{key}` answers a fragment's
//! HTML for a key written as it is stored in plain format (`shop:product_card:42:full`), so that a
//! site keeps no second copy of its markup for a cold cache.
//!
//! - **200** with exactly what Redis holds for the entry (in the fragment's storage, decoded), and
//!   on a miss (or with `?fresh=1`) after rendering it now through the checked write
//!   ([`on_demand`]); **404** when the key's row does not exist; **400** for a key no fragment owns
//!   or that does not parse; **401** without the bearer token `--serve-token` asks for; **429** when
//!   more renders are in flight than `--serve-max-pending`; **500** when the fragment's own code
//!   fails on the key; **503** when PostgreSQL or Redis cannot be reached, when the load fails
//!   with an error PostgreSQL calls transient (a lock timeout, a serialization failure, a
//!   deadlock, a standby's recovery conflict), when the render takes longer than
//!   `--serve-wait` (it goes on), or while this listener stands aside for a newer one.
//! - It binds a loopback address unless a token is set (checked by [`crate::ListenSettings`]), and
//!   serves connections within the same limits as the status page (`ops::http::serve`).

mod on_demand;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use on_demand::{OnDemand, Rendered};

use crate::Error;
use crate::fragment::{DynFragment, Fragments};
use crate::ops::board::{ServeCounts, StatusBoard};
use crate::pg::Database;
use crate::shutdown::Shutdown;
use crate::store::RedisStore;

/// What the endpoint works with: the listener's connections, fragments and board.
pub(crate) struct Context {
    pub(crate) db: Database,
    pub(crate) store: RedisStore,
    pub(crate) fragments: Fragments,
    pub(crate) board: Arc<StatusBoard>,
    /// `--serve-max-pending`.
    pub(crate) max_pending: usize,
    /// `--serve-wait`: how long a request waits for its render.
    pub(crate) wait: std::time::Duration,
    /// How many on-demand renders may hold PostgreSQL sessions at once: what the listener's pools
    /// hold beyond its batches and sweep pages, so that a stampede of misses never makes a batch
    /// wait for a session (`listener::serve_render_slots`).
    pub(crate) render_slots: usize,
    /// `--serve-token`, when set.
    pub(crate) token: Option<String>,
    /// Whether the listener stands aside for a newer one now: it then renders nothing.
    pub(crate) standing_aside: Box<dyn Fn() -> bool + Send + Sync>,
    pub(crate) shutdown: Shutdown,
}

/// The answer of a listener that stands aside for a newer one: it renders nothing.
const STANDING_ASIDE: &str =
    "this listener stands aside for one with newer fragment versions: ask that one";

/// Most connections open at once: a site's workers each keep one or two.
const MAX_CONNECTIONS: usize = 512;

#[derive(Clone)]
struct ServeState {
    on_demand: Arc<OnDemand>,
    token: Option<Arc<str>>,
}

/// Binds `address` now (a taken port fails start-up with a clear message) and returns the server
/// to run until the listener's shutdown, and the counts it keeps.
pub(crate) async fn bind(
    address: &str,
    context: Context,
) -> Result<(impl Future<Output = ()> + use<>, Arc<ServeCounts>), Error> {
    let (listener, bound) = crate::ops::http::listen_on(address).await?;
    let counts = Arc::new(ServeCounts::default());
    let shutdown = context.shutdown.clone();
    let token = context
        .token
        .as_deref()
        .filter(|token| !token.is_empty())
        .map(Arc::from);
    let on_demand = OnDemand::new(context, counts.clone());
    let renders = on_demand.renders.clone();
    let state = ServeState { token, on_demand };
    let app = Router::new()
        .route("/fragments/{*key}", get(fragment))
        .with_state(state);
    tracing::info!(address = %bound, "serving GET /fragments/{{key}}: misses rendered on demand");
    // At shutdown, requests in flight are answered; renders their requests stopped waiting for
    // finish too, so that their sessions are back in the pools when the listener returns (within
    // its grace period, as every task of it).
    let server = async move {
        crate::ops::http::serve(listener, app, shutdown, MAX_CONNECTIONS).await;
        renders.close();
        renders.wait().await;
    };
    Ok((server, counts))
}

/// `GET /fragments/{key}`: see the module's documentation.
async fn fragment(
    State(state): State<ServeState>,
    Path(key): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let counts = &state.on_demand.counts;
    counts
        .requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // `?fresh=1` (or `fresh=true`, or a bare `fresh`): render from current rows even on a hit.
    let fresh = query.as_deref().unwrap_or("").split('&').any(|pair| {
        matches!(
            pair.split_once('=').unwrap_or((pair, "1")),
            ("fresh", "1" | "true" | "yes")
        )
    });
    let (status, answer) = answer(&state, &key, fresh, &headers).await;
    if status == StatusCode::TOO_MANY_REQUESTS {
        counts
            .refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    crate::ops::telemetry::serve_request(status.as_u16(), started.elapsed());
    let later = matches!(answer, Answer::Later(_));
    let mut response = match answer {
        Answer::Html(html) => (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            html,
        )
            .into_response(),
        Answer::Text(text) | Answer::Later(text) => (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{}\n", one_line(&text)),
        )
            .into_response(),
    };
    let headers = response.headers_mut();
    if status == StatusCode::UNAUTHORIZED {
        headers.insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    if later {
        headers.insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    response
}

enum Answer {
    Html(String),
    /// One line saying why.
    Text(String),
    /// One line saying why, and that asking again in a second may do (`Retry-After`): the
    /// renders in flight are many, this one is still going and will store its entry, or its load
    /// met an error that may not recur.
    Later(String),
}

async fn answer(
    state: &ServeState,
    key: &str,
    fresh: bool,
    headers: &HeaderMap,
) -> (StatusCode, Answer) {
    if let Some(token) = &state.token
        && !authorized(headers, token)
    {
        return (
            StatusCode::UNAUTHORIZED,
            Answer::Text(
                "send the token given to --serve-token as Authorization: Bearer ...".into(),
            ),
        );
    }
    let shared = state.on_demand.context();
    let (fragment, fragment_key) = match owner(shared, key) {
        Ok(found) => found,
        Err(reason) => return (StatusCode::BAD_REQUEST, Answer::Text(reason)),
    };
    let read = || async {
        shared
            .store
            .get_entries(fragment.storage(), &[key.to_string()])
            .await
            .map(|mut entries| entries.pop().flatten())
    };
    if !fresh {
        match read().await {
            Ok(Some(html)) => {
                state
                    .on_demand
                    .counts
                    .hits
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return (StatusCode::OK, Answer::Html(html));
            }
            Ok(None) => {}
            Err(error) => return unavailable(&error.to_string()),
        }
    }
    if (shared.standing_aside)() {
        return unavailable(STANDING_ASIDE);
    }
    // The render runs on a task of its own: a request that stops waiting leaves it to finish and
    // store the entry.
    let render = state.on_demand.render(&fragment, &fragment_key, fresh);
    let Ok(rendered) = tokio::time::timeout(shared.wait, render).await else {
        let counts = &state.on_demand.counts;
        counts
            .waited_out
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        crate::ops::telemetry::serve_waited_out();
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Answer::Later(format!(
                "no render within {} (--serve-wait): it waits for a PostgreSQL session, or its load is slow; it goes on and stores the entry",
                humantime::format_duration(shared.wait)
            )),
        );
    };
    match rendered {
        Rendered::Done => {}
        Rendered::Busy => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                Answer::Later(format!(
                    "more than {} renders are in flight (--serve-max-pending): try again shortly",
                    shared.max_pending
                )),
            );
        }
        Rendered::Failed(reason) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Answer::Text(format!("the fragment failed on this key: {reason}")),
            );
        }
        Rendered::Unreachable(reason) => return unavailable(&reason),
        Rendered::Transient(reason) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Answer::Later(format!("{reason}: ask again shortly")),
            );
        }
    }
    match read().await {
        Ok(Some(html)) => (StatusCode::OK, Answer::Html(html)),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Answer::Text(format!(
                "no row for key {fragment_key:?}: nothing is stored"
            )),
        ),
        Err(error) => unavailable(&error.to_string()),
    }
}

fn unavailable(reason: &str) -> (StatusCode, Answer) {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Answer::Text(reason.to_string()),
    )
}

/// The fragment that owns `key` (`<prefix><key>:<variant>`, its prefix as registered, whatever the
/// storage), and the fragment's key in it; or why none does.
fn owner(shared: &Context, key: &str) -> Result<(Arc<dyn DynFragment>, String), String> {
    let fragment = shared
        .fragments
        .iter()
        .filter(|fragment| key.starts_with(fragment.registered_prefix()))
        .max_by_key(|fragment| fragment.registered_prefix().len())
        .ok_or_else(|| {
            format!(
                "no fragment owns {key:?}: keys start with one of {}",
                shared
                    .fragments
                    .iter()
                    .map(|fragment| format!("{:?}", fragment.registered_prefix()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    let rest = &key[fragment.registered_prefix().len()..];
    let variants = fragment.variants().join(", ");
    let Some((fragment_key, variant)) = rest.rsplit_once(':') else {
        return Err(format!(
            "{key:?} names no variant: write <prefix><key>:<variant>, the variant one of {variants}"
        ));
    };
    if !fragment.variants().contains(&variant) {
        return Err(format!(
            "fragment {} has no variant {variant:?}: one of {variants}",
            fragment.name()
        ));
    }
    let Some(entries) = fragment.redis_keys(fragment_key) else {
        return Err(format!(
            "{fragment_key:?} is not a key of fragment {}",
            fragment.name()
        ));
    };
    // The key as the fragment spells it (`42`, not `042`): what a render writes, and reads back.
    if !entries.contains(&fragment.storage().redis_key(key)) {
        return Err(format!(
            "{fragment_key:?} is not how fragment {} spells that key: write it as its Display does",
            fragment.name()
        ));
    }
    Ok((fragment.clone(), fragment_key.to_string()))
}

/// Longest reason an error answer gives.
const MOST_CHARS: usize = 500;

/// `text` on one line (a fragment's error may span several, a panic's message too), shortened to
/// [`MOST_CHARS`].
fn one_line(text: &str) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(MOST_CHARS) {
        Some((end, _)) => format!("{}...", &line[..end]),
        None => line,
    }
}

/// Whether the request carries `Authorization: Bearer <token>`, compared in constant time.
fn authorized(headers: &HeaderMap, token: &str) -> bool {
    // The scheme's name is case-insensitive (RFC 9110).
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token)
    else {
        return false;
    };
    constant_time_eq(given.trim().as_bytes(), token.as_bytes())
}

/// Compares two byte strings in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn error_answers_are_one_short_line() {
        assert_eq!(super::one_line("a\nb\r\n  c\t"), "a b c");
        let long = "x".repeat(600);
        assert_eq!(super::one_line(&long).chars().count(), 503);
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"secret"));
    }
}
