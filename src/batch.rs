//! One batch of the listener's work: claim changes, decide which to render (coalescing covered ones,
//! deferring hot keys), render them through the shared refresh path, and settle every claimed change
//! (done, deferred, or failed for retry), all in one transaction that a crash rolls back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::Error;
use crate::coalesce::Plan;
use crate::listener::Shared;
use crate::queue::{self, Failure};
use crate::refresh::{RefreshStats, refresh};

/// A batch taking this long is logged as a warning with where its time went: changes normally reach
/// Redis within milliseconds.
const SLOW_BATCH: Duration = Duration::from_secs(1);

/// Claims one batch, refreshes its fragments and settles it, all in one transaction. Returns how many
/// changes it claimed. On an error the transaction rolls back and the batch stays queued.
pub(crate) async fn process(shared: &Shared) -> Result<(usize, RefreshStats), Error> {
    let mut client = shared.db.get().await?;
    let txn = client.transaction().await?;
    let started = Instant::now();
    let claim = queue::claim_batch(txn.client(), shared.settings.batch_size).await?;
    if claim.changes.is_empty() {
        txn.rollback().await?;
        return Ok((0, RefreshStats::default()));
    }
    let claimed_at = started.elapsed();

    // The same (topic, key) may be queued many times: render it once, settle every copy.
    let mut covered = Vec::new();
    let mut deferred = Vec::new();
    let mut defer_for = Duration::ZERO;
    let mut ids_by_change: HashMap<(&str, &str), Vec<i64>> = HashMap::new();
    for change in &claim.changes {
        match shared
            .recent
            .plan(&change.topic, &change.key, change.xid, started)
        {
            Plan::Covered => covered.push(change.id),
            Plan::Defer(delay) => {
                deferred.push(change.id);
                defer_for = defer_for.max(delay);
            }
            Plan::Render => ids_by_change
                .entry((change.topic.as_str(), change.key.as_str()))
                .or_default()
                .push(change.id),
        }
    }
    let (stats, failed) = render_changes(shared, &ids_by_change, claim.ticket).await?;
    if let Some(snapshot) = claim.snapshot {
        let rendered = ids_by_change
            .keys()
            .filter(|change| !failed.contains_key(*change));
        shared.recent.record(rendered.copied(), Arc::new(snapshot));
    }
    let rendered_at = started.elapsed();

    let covered_count = covered.len();
    let mut done = covered;
    let mut failures = Vec::new();
    for (change, ids) in &ids_by_change {
        match failed.get(change) {
            None => done.extend_from_slice(ids),
            Some(reason) => {
                tracing::warn!(topic = change.0, key = change.1, error = %reason, "change failed; will retry");
                shared.board.failed(change.0, change.1, reason);
                failures.extend(ids.iter().map(|&id| Failure {
                    id,
                    error: reason.clone(),
                }));
            }
        }
    }
    let settled = done.len();
    crate::telemetry::batch(
        claim.changes.len(),
        settled,
        covered_count,
        deferred.len(),
        failures.len(),
    );
    queue::complete(txn.client(), &done).await?;
    queue::defer(txn.client(), &deferred, defer_for).await?;
    queue::record_failures(txn.client(), &failures, shared.settings.max_attempts).await?;
    txn.commit().await?;
    if !deferred.is_empty() {
        shared.wake_by(Instant::now() + defer_for);
    }
    let (render, settle) = (rendered_at - claimed_at, started.elapsed() - rendered_at);
    if started.elapsed() >= SLOW_BATCH {
        tracing::warn!(
            changes = claim.changes.len(),
            rendered = ids_by_change.len(),
            claim = ?claimed_at,
            render = ?render,
            settle = ?settle,
            "slow batch: its changes reached Redis late"
        );
    } else {
        tracing::debug!(
            changes = claim.changes.len(),
            rendered = ids_by_change.len(),
            deferred = deferred.len(),
            claim = ?claimed_at,
            render = ?render,
            settle = ?settle,
            "batch applied"
        );
    }
    shared.counters.add(settled, &stats);
    shared.board.applied(settled);
    Ok((claim.changes.len(), stats))
}

/// Refreshes every fragment subscribed to the changes' topics; returns the counts and the changes that
/// failed, with why. Rows are loaded on a connection of their own: a loader's SQL error would
/// otherwise abort the claiming transaction, and with it the recording of that very failure.
async fn render_changes<'a>(
    shared: &Shared,
    changes: &HashMap<(&'a str, &'a str), Vec<i64>>,
    ticket: i64,
) -> Result<(RefreshStats, HashMap<(&'a str, &'a str), String>), Error> {
    let mut failed = HashMap::new();
    let mut stats = RefreshStats::default();
    if changes.is_empty() {
        return Ok((stats, failed));
    }
    let loader = shared.db.get().await?;
    for &(topic, key) in changes.keys() {
        if shared.fragments.for_topic(topic).next().is_none() {
            failed.insert(
                (topic, key),
                format!("no fragment subscribes to topic {topic:?}"),
            );
        }
    }
    for fragment in shared.fragments.iter() {
        let mut keys: Vec<String> = changes
            .keys()
            .filter(|(topic, _)| fragment.topics().contains(topic))
            .map(|(_, key)| key.to_string())
            .collect();
        if keys.is_empty() {
            continue;
        }
        keys.sort();
        keys.dedup();
        let refreshed = refresh(&loader, &shared.sink, fragment.as_ref(), &keys, ticket).await?;
        shared.board.refreshed(fragment.name(), refreshed.stats);
        stats += refreshed.stats;
        for (index, reason) in refreshed.failed {
            // Every queued (topic, key) that reached this fragment with this key failed with it.
            for &(topic, key) in changes.keys() {
                if key == keys[index] && fragment.topics().contains(&topic) {
                    failed.entry((topic, key)).or_insert_with(|| reason.clone());
                }
            }
        }
    }
    Ok((stats, failed))
}
