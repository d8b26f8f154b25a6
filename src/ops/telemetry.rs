//! Metrics, through the `metrics` facade: the library records, the binary decides where they go.
//!
//! With no recorder installed every call here is a no-op. `listen --http` installs a Prometheus
//! recorder ([`install_prometheus`]) and serves it at `/metrics` (see `ops::http`).

use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::pg::queue::QueueStats;
use crate::stats::RefreshStats;

/// Installs a Prometheus recorder for this process (once; later calls return the same handle) and
/// describes every pgfresh metric. `None` if another recorder was installed first: then that one
/// receives the metrics.
pub(crate) fn install_prometheus() -> Option<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ])
                .ok()?
                .set_buckets_for_metric(
                    Matcher::Full("pgfresh_freshness_seconds".into()),
                    &super::history::FRESHNESS_BUCKETS,
                )
                .ok()?
                .install_recorder()
                .ok()?;
            describe();
            register();
            Some(handle)
        })
        .clone()
}

fn describe() {
    describe_counter!(
        "pgfresh_changes_claimed_total",
        "Changes claimed from the queue"
    );
    describe_counter!(
        "pgfresh_changes_applied_total",
        "Changes applied: their fragments are in Redis"
    );
    describe_counter!(
        "pgfresh_changes_coalesced_total",
        "Changes covered: settled without rendering, because an earlier render of their key already saw them (the name says coalesced)"
    );
    describe_counter!(
        "pgfresh_changes_deferred_total",
        "Changes to hot keys put back in the queue for a moment"
    );
    describe_counter!(
        "pgfresh_changes_failed_total",
        "Failed attempts to apply a change (retried with backoff)"
    );
    describe_counter!(
        "pgfresh_renders_total",
        "Entries (key and variant) rendered, by fragment"
    );
    describe_counter!(
        "pgfresh_writes_total",
        "Writes of entries to Redis by fragment and result: written, unchanged (Redis held that render already, confirmed by a sweep included), refused (a render with a newer ticket was stored), deleted"
    );
    describe_counter!(
        "pgfresh_serve_requests_total",
        "Requests to GET /fragments/{key} (listen --serve), by HTTP status"
    );
    describe_counter!(
        "pgfresh_serve_renders_total",
        "Renders on demand started by GET /fragments/{key}: misses, and fresh reads"
    );
    describe_counter!(
        "pgfresh_serve_coalesced_total",
        "Requests that waited for a render of their key already in flight instead of starting one"
    );
    describe_counter!(
        "pgfresh_serve_waited_out_total",
        "Requests to GET /fragments/{key} answered 503 because their render took longer than --serve-wait (the render goes on and stores the entry); counted in pgfresh_serve_requests_total{status=\"503\"} too"
    );
    describe_histogram!(
        "pgfresh_serve_request_seconds",
        "Time to answer GET /fragments/{key}, renders on demand included"
    );
    describe_counter!(
        "pgfresh_loads_total",
        "Batches' and sweep pages' loads with a standby given (--replica-url), by the server that served them and why: standby (caught_up: it had replayed the batch's changes), or primary (behind: it had not within --replica-max-wait; unavailable: down, promoted or another cluster's)"
    );
    describe_gauge!(
        "pgfresh_standby_replay_lag_bytes",
        "How far the standby's replay was behind the primary's WAL position when a batch last asked, in bytes"
    );
    describe_gauge!(
        "pgfresh_standby_up",
        "Whether loads may go to the standby (1) or it is down, promoted or another cluster's (0)"
    );
    describe_histogram!(
        "pgfresh_load_seconds",
        "Time to load the rows of one batch of keys, by fragment"
    );
    describe_histogram!(
        "pgfresh_render_seconds",
        "Time to render one batch of keys, by fragment"
    );
    describe_histogram!(
        "pgfresh_redis_write_seconds",
        "Time of the ticket-checked Redis write of one batch"
    );
    describe_histogram!(
        "pgfresh_freshness_seconds",
        "Time from a change's commit (its transaction's start where PostgreSQL does not track commit timestamps) to its fragment's render in Redis, by fragment"
    );
    describe_gauge!(
        "pgfresh_freshness_lag_seconds",
        "How long ago the oldest change still waiting in the queue was committed: how stale the stalest fragment may be now (0 when the queue is empty)"
    );
    describe_gauge!(
        "pgfresh_ready",
        "1 when the listener can do its work (its LISTEN session is up and Redis answers), as /readyz says"
    );
    describe_gauge!(
        "pgfresh_queue_pending",
        "Changes waiting in pgfresh.changes"
    );
    describe_gauge!(
        "pgfresh_queue_oldest_seconds",
        "Age of the oldest waiting change"
    );
    describe_gauge!("pgfresh_parked_changes", "Changes parked in pgfresh.failed");
    describe_gauge!(
        "pgfresh_notification_queue_usage",
        "pg_notification_queue_usage(): fraction of PostgreSQL's NOTIFY queue in use"
    );
    describe_counter!("pgfresh_notifications_total", "NOTIFY wake-ups received");
    describe_gauge!(
        "pgfresh_redis_can_evict",
        "1 when Redis's maxmemory-policy can evict pgfresh's keys (renders that find no ticket are then done again)"
    );
    describe_gauge!(
        "pgfresh_standing_aside",
        "1 while this listener stands aside for one rendering newer fragment versions"
    );
    describe_counter!(
        "pgfresh_reconnects_total",
        "Connections re-established after a loss, by connection"
    );
    describe_counter!(
        "pgfresh_sweep_unwatched_repairs_total",
        "Keys a periodic sweep repaired while this listener ran all along and no change was waiting for them, by fragment: a change reached the fragment that no watch reported (doctor names the table)"
    );
    describe_counter!(
        "pgfresh_sweeps_total",
        "Sweeps run by this listener, by reason"
    );
    describe_counter!(
        "pgfresh_sweep_repaired_total",
        "Entries a sweep rewrote or deleted because they were wrong"
    );
}

/// Every metric that has no label, or a fixed set of labels, starts at zero: alerts built on
/// `absent()`, `rate()` or `increase()` see the series from the first scrape, not after the first event.
fn register() {
    for name in [
        "pgfresh_changes_claimed_total",
        "pgfresh_changes_applied_total",
        "pgfresh_changes_coalesced_total",
        "pgfresh_changes_deferred_total",
        "pgfresh_changes_failed_total",
        "pgfresh_notifications_total",
        "pgfresh_sweep_repaired_total",
    ] {
        counter!(name).absolute(0);
    }
    counter!("pgfresh_reconnects_total", "connection" => "listen").absolute(0);
    for reason in ["periodic", "marker", "truncate", "restart"] {
        counter!("pgfresh_sweeps_total", "reason" => reason).absolute(0);
    }
    // Creating a handle registers the series; it renders with zero observations.
    let _ = histogram!("pgfresh_redis_write_seconds");
    for name in [
        "pgfresh_queue_pending",
        "pgfresh_queue_oldest_seconds",
        "pgfresh_parked_changes",
        "pgfresh_notification_queue_usage",
        "pgfresh_standing_aside",
        "pgfresh_redis_can_evict",
        "pgfresh_freshness_lag_seconds",
        "pgfresh_ready",
    ] {
        gauge!(name).set(0.0);
    }
}

/// Registers the per-fragment series at zero, for the same reason as [`register`].
pub(crate) fn register_fragments<'a>(names: impl Iterator<Item = &'a str>) {
    for fragment in names {
        let fragment = fragment.to_string();
        counter!("pgfresh_renders_total", "fragment" => fragment.clone()).absolute(0);
        for result in ["written", "unchanged", "refused", "deleted"] {
            counter!("pgfresh_writes_total", "fragment" => fragment.clone(), "result" => result)
                .absolute(0);
        }
        let _ = histogram!("pgfresh_load_seconds", "fragment" => fragment.clone());
        let _ = histogram!("pgfresh_render_seconds", "fragment" => fragment.clone());
        counter!("pgfresh_sweep_unwatched_repairs_total", "fragment" => fragment.clone())
            .absolute(0);
        let _ = histogram!("pgfresh_freshness_seconds", "fragment" => fragment);
    }
}

/// Records the load of one batch of keys.
pub(crate) fn loaded(fragment: &str, took: Duration) {
    histogram!("pgfresh_load_seconds", "fragment" => fragment.to_string()).record(took);
}

/// Records the render of one batch of keys.
pub(crate) fn rendered(fragment: &str, took: Duration) {
    histogram!("pgfresh_render_seconds", "fragment" => fragment.to_string()).record(took);
}

/// Records renders of `fragment` that reached Redis `lags` after their changes' commits.
pub(crate) fn fresh(fragment: &str, lags: &[Duration]) {
    let histogram = histogram!("pgfresh_freshness_seconds", "fragment" => fragment.to_string());
    for lag in lags {
        histogram.record(*lag);
    }
}

/// Records whether the listener is ready (as `/readyz` answers).
pub(crate) fn ready(ready: bool) {
    gauge!("pgfresh_ready").set(if ready { 1.0 } else { 0.0 });
}

/// Records one refresh of a batch of keys (its load and render are recorded as they happen).
pub(crate) fn refreshed(fragment: &str, stats: &RefreshStats, write: Duration) {
    let fragment = fragment.to_string();
    counter!("pgfresh_renders_total", "fragment" => fragment.clone()).increment(stats.rendered);
    for (result, count) in [
        ("written", stats.written),
        ("unchanged", stats.unchanged),
        ("refused", stats.refused),
        ("deleted", stats.deleted),
    ] {
        counter!("pgfresh_writes_total", "fragment" => fragment.clone(), "result" => result)
            .increment(count);
    }
    histogram!("pgfresh_redis_write_seconds").record(write);
}

/// Records how one claimed batch was settled.
pub(crate) fn batch(
    claimed: usize,
    applied: usize,
    covered: usize,
    deferred: usize,
    failed: usize,
) {
    counter!("pgfresh_changes_claimed_total").increment(claimed as u64);
    counter!("pgfresh_changes_applied_total").increment(applied as u64);
    counter!("pgfresh_changes_coalesced_total").increment(covered as u64);
    counter!("pgfresh_changes_deferred_total").increment(deferred as u64);
    counter!("pgfresh_changes_failed_total").increment(failed as u64);
}

/// Records the queue's state, read periodically.
pub(crate) fn queue(stats: &QueueStats, notification_queue_usage: f64) {
    gauge!("pgfresh_queue_pending").set(stats.pending as f64);
    gauge!("pgfresh_queue_oldest_seconds").set(stats.oldest.map_or(0.0, |age| age.as_secs_f64()));
    gauge!("pgfresh_parked_changes").set(stats.parked as f64);
    gauge!("pgfresh_freshness_lag_seconds").set(stats.lag.map_or(0.0, |lag| lag.as_secs_f64()));
    gauge!("pgfresh_notification_queue_usage").set(notification_queue_usage);
}

/// Records a NOTIFY wake-up.
pub(crate) fn notification() {
    counter!("pgfresh_notifications_total").increment(1);
}

/// Records a connection re-established after a loss.
pub(crate) fn reconnected(connection: &'static str) {
    counter!("pgfresh_reconnects_total", "connection" => connection).increment(1);
}

/// Records a sweep this listener ran.
pub(crate) fn swept(reason: &'static str, repaired: u64) {
    counter!("pgfresh_sweeps_total", "reason" => reason).increment(1);
    counter!("pgfresh_sweep_repaired_total").increment(repaired);
}

/// Records what a periodic sweep of `fragment` repaired that no watch reported.
pub(crate) fn unwatched(fragment: &str, repaired: u64) {
    counter!("pgfresh_sweep_unwatched_repairs_total", "fragment" => fragment.to_string())
        .increment(repaired);
}

/// Records whether Redis's memory policy can evict pgfresh's keys (1) or not (0).
pub(crate) fn redis_eviction(possible: bool) {
    gauge!("pgfresh_redis_can_evict").set(if possible { 1.0 } else { 0.0 });
}

/// Records whether the listener stands aside for one with newer fragment versions (1) or works (0).
pub(crate) fn standing_aside(standing_aside: bool) {
    gauge!("pgfresh_standing_aside").set(if standing_aside { 1.0 } else { 0.0 });
}

/// Records which server served a batch's loads, with a standby given, and why.
pub(crate) fn load_served(server: &'static str, reason: &'static str) {
    counter!("pgfresh_loads_total", "server" => server, "reason" => reason).increment(1);
}

/// Records how far behind the primary the standby last was, in bytes of WAL.
pub(crate) fn standby_lag(bytes: f64) {
    gauge!("pgfresh_standby_replay_lag_bytes").set(bytes);
}

/// Records whether loads may go to the standby.
pub(crate) fn standby_up(up: bool) {
    gauge!("pgfresh_standby_up").set(if up { 1.0 } else { 0.0 });
}

/// Records one answer of `GET /fragments/{key}`.
pub(crate) fn serve_request(status: u16, took: Duration) {
    counter!("pgfresh_serve_requests_total", "status" => status.to_string()).increment(1);
    histogram!("pgfresh_serve_request_seconds").record(took.as_secs_f64());
}

/// Records a render on demand.
pub(crate) fn serve_render() {
    counter!("pgfresh_serve_renders_total").increment(1);
}

/// Records a request that joined a render in flight.
pub(crate) fn serve_coalesced() {
    counter!("pgfresh_serve_coalesced_total").increment(1);
}

/// Counts a request to `GET /fragments/{key}` answered 503 once `--serve-wait` passed.
pub(crate) fn serve_waited_out() {
    counter!("pgfresh_serve_waited_out_total").increment(1);
}
