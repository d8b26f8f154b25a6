//! One batch of the listener's work: claim changes, decide which to render (coalescing covered ones,
//! deferring hot keys), render them through the shared refresh path, and settle every claimed change
//! (done, deferred, or failed for retry), all in one transaction that a crash rolls back.

use std::collections::{HashMap, HashSet};
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
/// changes it claimed. On an error the transaction rolls back and the batch stays queued as it was,
/// each change noting the error (without counting an attempt: an outage is not the change's fault),
/// so that `status` and `pgfresh.changes` say why it waits.
pub(crate) async fn process(shared: &Shared) -> Result<(usize, RefreshStats), Error> {
    let mut client = shared.db.get().await?;
    let txn = client.transaction().await?;
    let started = Instant::now();
    let claim = queue::claim_batch(txn.client(), shared.settings.batch_size).await?;
    let claimed = claim.changes.len() + claim.undecodable.len();
    if claimed == 0 {
        txn.rollback().await?;
        return Ok((0, RefreshStats::default()));
    }
    let ids: Vec<i64> = claim.changes.iter().map(|change| change.id).collect();
    match apply(shared, txn, claim, started).await {
        Ok(stats) => Ok((claimed, stats)),
        Err(error) => {
            queue::note_error(&client, &ids, &error.to_string()).await;
            Err(error)
        }
    }
}

/// Everything after the claim: plan, render, write, settle, commit.
async fn apply(
    shared: &Shared,
    txn: deadpool_postgres::Transaction<'_>,
    claim: queue::Claim,
    started: Instant,
) -> Result<RefreshStats, Error> {
    let claimed = claim.changes.len() + claim.undecodable.len();
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
    let rendered = render_changes(shared, &ids_by_change, claim.ticket).await?;
    let (stats, failed) = (rendered.stats, rendered.failed);
    if let Some(snapshot) = claim.snapshot {
        // A render written without a ticket to check against may have lost to nothing: it covers
        // nothing, not even the change this batch queues to render it again.
        let unchecked: HashSet<&str> = rendered
            .unchecked
            .iter()
            .map(|(_, key)| key.as_str())
            .collect();
        let covering = ids_by_change
            .keys()
            .filter(|change| !failed.contains_key(*change) && !unchecked.contains(change.1));
        shared
            .recent
            .record(covering.copied(), Arc::new(snapshot), Instant::now());
    }
    let rendered_at = started.elapsed();

    let covered_count = covered.len();
    let mut done = covered;
    let mut failures = claim.undecodable;
    for failure in &failures {
        tracing::warn!(change = failure.id, error = %failure.error, "change failed; will retry");
        shared
            .board
            .failed("?", &format!("change {}", failure.id), &failure.error);
    }
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
        claimed,
        settled,
        covered_count,
        deferred.len(),
        failures.len(),
    );
    queue::complete(txn.client(), &done).await?;
    queue::defer(txn.client(), &deferred, defer_for).await?;
    queue::record_failures(txn.client(), &failures, shared.settings.max_attempts).await?;
    requeue_unchecked(txn.client(), &rendered.unchecked).await?;
    txn.commit().await?;
    if !deferred.is_empty() {
        shared.wake_by(Instant::now() + defer_for);
    }
    let (render, settle) = (rendered_at - claimed_at, started.elapsed() - rendered_at);
    if started.elapsed() >= SLOW_BATCH {
        tracing::warn!(
            changes = claimed,
            rendered = ids_by_change.len(),
            claim = ?claimed_at,
            render = ?render,
            settle = ?settle,
            "slow batch: its changes reached Redis late"
        );
    } else {
        tracing::debug!(
            changes = claimed,
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
    Ok(stats)
}

/// Queues once more the keys written while Redis may evict keys, without a ticket to check against:
/// the next render, under a newer ticket, restores the newest data if an older render won.
async fn requeue_unchecked(
    txn: &tokio_postgres::Client,
    keys: &[(String, String)],
) -> Result<(), Error> {
    let mut by_topic: HashMap<&str, Vec<String>> = HashMap::new();
    for (topic, key) in keys {
        by_topic.entry(topic).or_default().push(key.clone());
    }
    for (topic, keys) in by_topic {
        tracing::debug!(
            topic,
            keys = keys.len(),
            "Redis had no ticket to check these renders against: rendering them again"
        );
        queue::requeue(txn, topic, &keys, &vec![None; keys.len()]).await?;
    }
    Ok(())
}

/// What rendering a batch's changes did.
#[derive(Default)]
struct RenderedChanges<'a> {
    stats: RefreshStats,
    /// The changes that failed, with why.
    failed: HashMap<(&'a str, &'a str), String>,
    /// Keys to render once more, by (topic, key): written while Redis may evict keys, without a
    /// ticket to check against.
    unchecked: Vec<(String, String)>,
}

/// Refreshes every fragment subscribed to the changes' topics. Rows are loaded on a connection of
/// their own: a loader's SQL error would otherwise abort the claiming transaction, and with it the
/// recording of that very failure.
async fn render_changes<'a>(
    shared: &Shared,
    changes: &HashMap<(&'a str, &'a str), Vec<i64>>,
    ticket: i64,
) -> Result<RenderedChanges<'a>, Error> {
    let mut rendered = RenderedChanges::default();
    if changes.is_empty() {
        return Ok(rendered);
    }
    let loader = shared.db.get().await?;
    for &(topic, key) in changes.keys() {
        if shared.fragments.for_topic(topic).next().is_none() {
            rendered.failed.insert(
                (topic, key),
                format!("no fragment subscribes to topic {topic:?}"),
            );
        }
    }
    for fragment in shared.fragments.iter() {
        // Every queued (topic, key) that reaches this fragment, by key.
        let mut reaching: HashMap<&str, Vec<(&str, &str)>> = HashMap::new();
        for &(topic, key) in changes.keys() {
            if fragment.topics().contains(&topic) {
                reaching.entry(key).or_default().push((topic, key));
            }
        }
        if reaching.is_empty() {
            continue;
        }
        let keys: Vec<String> = reaching.keys().map(|key| key.to_string()).collect();
        let refreshed = refresh(&loader, &shared.sink, fragment.as_ref(), &keys, ticket).await?;
        shared.board.refreshed(fragment.name(), refreshed.stats);
        rendered.stats += refreshed.stats;
        for (index, reason) in refreshed.failed {
            for &change in &reaching[keys[index].as_str()] {
                rendered
                    .failed
                    .entry(change)
                    .or_insert_with(|| reason.clone());
            }
        }
        let topic = fragment.topics()[0].to_string();
        let unchecked = refreshed.unchecked.into_iter();
        rendered
            .unchecked
            .extend(unchecked.map(|index| (topic.clone(), keys[index].clone())));
    }
    Ok(rendered)
}
