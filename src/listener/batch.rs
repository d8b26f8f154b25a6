//! One batch of the listener's work, as a pipeline: claim changes and take a render ticket, plan
//! (`plan`: settle what an earlier render covered, defer hot keys, render each (topic, key) once),
//! route (`route`: render the fragments whose own key it is, fan keys of shared rows out into the
//! queue), render and write through the shared refresh path, and settle every claimed change
//! (applied, deferred, failed for retry or parking, queued again when Redis could not check a
//! write), all in one transaction that a crash rolls back.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::drain::Backlog;
use super::plan::BatchPlan;
use super::route::{self, ChangeKey, Routes};
use super::shared::Shared;
use crate::Error;
use crate::fragment::UserClient;
use crate::pg::queue::{self, Claim, Failure};
use crate::pg::statements::Hot;
use crate::pg::transaction::Pipelined;
use crate::refresh::{Writes, refresh};
use crate::stats::RefreshStats;

/// A batch taking this long is logged as a warning with where its time went: changes normally reach
/// Redis within milliseconds.
const SLOW_BATCH: Duration = Duration::from_secs(1);

/// Claims one batch, refreshes its fragments and settles it, all in one transaction. Returns how many
/// changes it claimed. On an error the transaction rolls back and the batch stays queued as it was,
/// each change noting the error (without counting an attempt: an outage is not the change's fault),
/// so that `status` and `pgfresh.changes` say why it waits. Claims past the listener's floor or
/// where `backlog` says, and tells it as soon as the claim comes back full, before the batch is
/// worked.
pub(crate) async fn process(
    shared: &Shared,
    backlog: &Backlog,
) -> Result<(usize, RefreshStats), Error> {
    let client = shared.db.pinned().await?;
    let pooled = shared.db.behind_pooler().await?;
    // A kept statement that fails is forgotten (`pg::statements::Kept`): one a schema upgrade
    // made unrunnable is prepared again by the next batch.
    let kept = shared.db.kept_statements().await?;
    // Past the listener's floor (below it, once, where changes it made wait are ready), or past
    // what this drain's backlog already took; only a claim from the floor looks for the first
    // change past it, which is what moves the floor. Asked before the transaction begins, so
    // that its `now()`, against which the claim checks retry times, is later.
    let start = shared.floor.start();
    // Before the claim is sent: its snapshot, taken later, sees at least as far, unless PostgreSQL
    // hands out transaction ids again.
    let newest_xmax = shared.recent.newest_xmax();
    // BEGIN goes out with the claim (`pg::transaction`), with the settings a pooler would not
    // take at connection, set for this transaction alone.
    let settings = pooled.then_some(crate::pg::POOLED_SETTINGS_LOCAL);
    let mut txn = Pipelined::begin(&client, settings).await;
    let started = Instant::now();
    let backlog_after = backlog.claim_after().filter(|&after| after > start.floor);
    let mut after = backlog_after.unwrap_or(start.floor);
    if let Some(due) = start.due {
        after = after.min(due - 1);
    }
    let from_floor = (backlog_after.is_none() && after == start.floor).then_some(start.floor);
    let claim = queue::claim_batch(
        Hot::new(&txn, kept),
        after,
        from_floor,
        shared.settings.batch_size,
    );
    let (begun, claim) = futures_util::future::join(txn.begun(), claim).await;
    begun?;
    let mut claim = claim?;
    if let Some(snapshot) = &claim.snapshot
        && shared.recent.went_back(snapshot, newest_xmax)
    {
        tracing::warn!(
            "PostgreSQL hands out transaction ids again (it lost the end of its WAL: a crash or a failover): forgetting what earlier renders covered"
        );
        shared.floor.forget();
    }
    if start.walk {
        shared.floor.walked(start, started.elapsed());
    }
    // A transaction the floor passed has ended: a claim below the floor is due now, after this
    // batch (which may be short, and end the drain).
    if let Some(seen) = claim.seen.take()
        && shared.floor.claimed(start, seen)
    {
        shared.wake_by(Instant::now());
    }
    let claimed = claim.changes.len() + claim.undecodable.len();
    if claimed == 0 {
        // Only a claim that returns rows brings a snapshot: while the floor has passed
        // transactions still running, an empty one asks for its own, and when one of them has
        // ended, a claim below the floor is due at once (what it committed may be all that is
        // left to claim, on a quiet queue).
        if shared.floor.passing() {
            let row = client
                .query_typed_one("SELECT pg_current_snapshot()::text", &[])
                .await?;
            if let Some(snapshot) = crate::pg::Snapshot::parse(row.get(0))
                && shared.floor.ended(&snapshot)
            {
                shared.wake_by(Instant::now());
            }
        }
        txn.rollback();
        return Ok((0, RefreshStats::default()));
    }
    if claimed as i64 >= shared.settings.batch_size {
        backlog.full_claim(backlog_after, claim.last_id());
        // Below the floor, from changes it passed: the next claim goes on from here.
        if start.due.is_some_and(|due| after == due - 1) {
            shared.floor.go_on(claim.last_id());
        }
    }
    let ids: Vec<i64> = claim.changes.iter().map(|change| change.id).collect();
    let first = claim.first_id();
    match apply(shared, backlog, txn, pooled, claim, started).await {
        Ok(stats) => Ok((claimed, stats)),
        Err(error) => {
            queue::note_error(&client, &ids, &error.to_string()).await;
            // Rolled back and noted (on this session, after the rollback): its changes are ready
            // again, maybe below where the drain's claims start.
            backlog.ready_again(Instant::now(), first);
            Err(error)
        }
    }
}

/// Everything after the claim: plan, route and fan out, render and write, settle, commit.
async fn apply(
    shared: &Shared,
    backlog: &Backlog,
    mut txn: Pipelined<'_>,
    pooled: bool,
    claim: Claim,
    started: Instant,
) -> Result<RefreshStats, Error> {
    let claimed_at = started.elapsed();
    // Measured from before the claim was sent: the claiming statement read each age later than
    // that, so age plus the time since is never less than the truth.
    let ages = Ages {
        by_id: claim.changes.iter().map(|c| (c.id, c.age)).collect(),
        since: started,
    };
    let plan = shared.recent.plan_batch(&claim.changes, started);
    let routes = route::route(&shared.fragments, plan.to_render.keys().copied());
    let fanned = route::fan_out(shared, &mut txn, &routes.fan_outs).await?;
    let mut rendered = render_changes(shared, txn.client(), pooled, &routes, claim.ticket).await?;
    for change in &routes.unrouted {
        let reason = format!("no fragment subscribes to topic {:?}", change.0);
        rendered.failed.entry(*change).or_insert(reason);
    }
    for (change, reason) in fanned.failed {
        rendered.failed.entry(change).or_insert(reason);
    }
    let snapshot = claim.snapshot.map(Arc::new);
    let fanned_out: HashSet<ChangeKey<'_>> = routes
        .fan_outs
        .iter()
        .flat_map(|job| job.keys.iter().map(|key| (job.topic, *key)))
        .collect();
    // A render in Redis covers later changes at once; a fan-out only once its keys are committed.
    let (fanned_out, rendered_only) = covering(&plan, &rendered, &fanned_out);
    remember_coverage(shared, rendered_only, snapshot.clone());
    let rendered_at = started.elapsed();
    let (settled, waiting) = settle(shared, txn, &plan, &rendered, claim.undecodable).await?;
    ages.record(shared, &plan, &rendered);
    remember_coverage(shared, fanned_out, snapshot);
    if !plan.deferred.is_empty() {
        let ready = Instant::now() + plan.defer_for;
        shared.wake_by(ready);
        if let Some(&first) = plan.deferred.iter().min() {
            backlog.ready_again(ready, first);
            // Claimed from below the floor, it would have nothing else to bring it back.
            shared.floor.wait(first, plan.defer_for);
        }
    }
    // Failed changes wait for their retry: maybe below the floor by then.
    for change in waiting {
        shared.floor.wait(change.id, change.delay);
    }
    shared.board.applied(settled);
    log_batch(&plan, claimed_at, rendered_at, started.elapsed());
    Ok(rendered.stats)
}

/// The changes whose rendering (or fan-out) succeeded and now covers later changes to the same
/// (topic, key): split into those that went through a fan-out and those only rendered. A render
/// written without a ticket to check against may have lost to nothing: it covers nothing, not even
/// the change this batch queues to render it again.
fn covering<'a>(
    plan: &BatchPlan<'a>,
    rendered: &RenderedChanges<'a>,
    fanned_out: &HashSet<ChangeKey<'a>>,
) -> (Vec<ChangeKey<'a>>, Vec<ChangeKey<'a>>) {
    let unchecked: HashSet<&str> = rendered
        .unchecked
        .iter()
        .map(|(_, key)| key.as_str())
        .collect();
    plan.to_render
        .keys()
        .filter(|change| !rendered.missed(change) && !unchecked.contains(change.1))
        .partition(|change| fanned_out.contains(*change))
}

/// Remembers that these (topic, key)s are in Redis (or queued) as of the claim's snapshot.
fn remember_coverage(
    shared: &Shared,
    changes: Vec<ChangeKey<'_>>,
    snapshot: Option<Arc<crate::pg::Snapshot>>,
) {
    let Some(snapshot) = snapshot else { return };
    if !changes.is_empty() {
        shared
            .recent
            .record(changes.into_iter(), snapshot, Instant::now());
    }
}

/// Settles every claimed change in the claim's transaction and commits it: deferred ones wait,
/// failed ones count an attempt (and are parked at the limit), keys Redis could not check are
/// queued again, and applied ones (rendered, or covered) are deleted, the COMMIT sent with that
/// delete. Returns how many were applied, and the failed ones that wait to be tried again.
async fn settle(
    shared: &Shared,
    txn: Pipelined<'_>,
    plan: &BatchPlan<'_>,
    rendered: &RenderedChanges<'_>,
    undecodable: Vec<Failure>,
) -> Result<(usize, Vec<queue::Waiting>), Error> {
    let mut applied = plan.covered.clone();
    let mut unresolved: Vec<(i64, &str)> = Vec::new();
    let mut failures = undecodable;
    for failure in &failures {
        tracing::warn!(change = failure.id, error = %failure.error, "change failed; will retry");
        let change = format!("change {}", failure.id);
        shared.board.failed("?", &change, &failure.error);
    }
    for (change, ids) in &plan.to_render {
        match rendered.failed.get(change) {
            None => match rendered.unresolved.get(change) {
                None => applied.extend_from_slice(ids),
                Some(reason) => unresolved.extend(ids.iter().map(|&id| (id, reason.as_str()))),
            },
            Some(reason) => {
                tracing::warn!(topic = change.0, key = change.1, error = %reason, "change failed; will retry");
                shared.board.failed(change.0, change.1, reason);
                let failed = ids.iter().map(|&id| Failure {
                    id,
                    error: reason.clone(),
                });
                failures.extend(failed);
            }
        }
    }
    crate::ops::telemetry::batch(
        plan.claimed(),
        applied.len(),
        plan.covered.len(),
        plan.deferred.len(),
        failures.len(),
    );
    queue::defer(txn.client(), &plan.deferred, plan.defer_for).await?;
    let mut waiting =
        queue::record_failures(txn.client(), &failures, shared.settings.max_attempts).await?;
    queue::retry_apart(txn.client(), &unresolved).await?;
    // Ready within LOOK_AHEAD, which the floor's look covers, but for changes claimed from below
    // the floor (see `listener::floor`).
    waiting.extend(unresolved.iter().map(|&(id, _)| queue::Waiting {
        id,
        delay: queue::LOOK_AHEAD,
    }));
    requeue_unchecked(txn.client(), &rendered.unchecked).await?;
    let kept = shared.db.kept_statements().await?;
    queue::complete(txn, kept, &applied).await?;
    Ok((applied.len(), waiting))
}

/// Logs a batch at debug level, or as a warning when it was slow, with where its time went.
fn log_batch(plan: &BatchPlan<'_>, claimed: Duration, rendered: Duration, total: Duration) {
    let (render, settle) = (rendered - claimed, total - rendered);
    if total >= SLOW_BATCH {
        tracing::warn!(
            changes = plan.claimed(),
            rendered = plan.to_render.len(),
            claim = ?claimed,
            render = ?render,
            settle = ?settle,
            "slow batch: its changes reached Redis late"
        );
    } else {
        tracing::debug!(
            changes = plan.claimed(),
            rendered = plan.to_render.len(),
            deferred = plan.deferred.len(),
            claim = ?claimed,
            render = ?render,
            settle = ?settle,
            "batch applied"
        );
    }
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
    failed: HashMap<ChangeKey<'a>, String>,
    /// The changes whose keys were loaded only with keys that failed, and not told apart from
    /// them: tried again soon, with no attempt counted.
    unresolved: HashMap<ChangeKey<'a>, String>,
    /// Keys to render once more, by (topic, key): written while Redis may evict keys, without a
    /// ticket to check against. The topic is the fragment's own.
    unchecked: Vec<(String, String)>,
    /// By fragment: the changes whose render reached Redis, and when the write returned.
    fresh: Vec<(String, Vec<(ChangeKey<'a>, Instant)>)>,
}

impl RenderedChanges<'_> {
    /// Whether the change did not reach Redis in this batch: failed, or unresolved.
    fn missed(&self, change: &ChangeKey<'_>) -> bool {
        self.failed.contains_key(change) || self.unresolved.contains_key(change)
    }
}

/// How long before the claim each claimed change happened, for freshness.
struct Ages {
    by_id: HashMap<i64, Duration>,
    /// Taken before the claim was sent.
    since: Instant,
}

impl Ages {
    /// How long the fragment of change `id` was stale until `written`: its age at the claim plus
    /// the time from sending the claim to the write.
    fn lag(&self, id: i64, written: Instant) -> Option<Duration> {
        Some(*self.by_id.get(&id)? + written.saturating_duration_since(self.since))
    }

    /// Counts the freshness of each change this batch applied, by fragment: only once the batch has
    /// committed, and not for changes that failed in some fragment (they are retried, and counted
    /// then).
    fn record(&self, shared: &Shared, plan: &BatchPlan<'_>, rendered: &RenderedChanges<'_>) {
        for (fragment, renders) in &rendered.fresh {
            let lags: Vec<Duration> = renders
                .iter()
                .filter(|(change, _)| !rendered.missed(change))
                .filter_map(|(change, written)| Some((plan.to_render.get(change)?, *written)))
                .flat_map(|(ids, written)| ids.iter().filter_map(move |id| self.lag(*id, written)))
                .collect();
            crate::ops::telemetry::fresh(fragment, &lags);
            shared.board.fresh(fragment, &lags);
        }
    }
}

/// Refreshes the keys each fragment is routed. Rows are loaded on the standby, when one was given
/// and has replayed what the primary (`claiming`, the claim's session, after its ticket) had
/// written by then. On the primary, they are loaded on a session of their own, with the users'
/// settings, or behind a connection pooler (`pooled`) on the claim's, each load in a savepoint: a
/// loader's SQL error leaves the claiming transaction usable for recording that very failure. A
/// pooler hands each transaction one server session from a pool the claims share: a batch that
/// held one for its claim while it waited for another for its loads would stall once the pool is
/// that small, as every batch did with `default_pool_size = 1`. A load that ends the claim's
/// transaction itself (to read from one snapshot, say) fails its batch, which rolls back; from
/// then on this listener's batches load on sessions of their own, as on a direct connection.
async fn render_changes<'a>(
    shared: &Shared,
    claiming: &tokio_postgres::Client,
    pooled: bool,
    routes: &Routes<'a>,
    ticket: i64,
) -> Result<RenderedChanges<'a>, Error> {
    let mut rendered = RenderedChanges::default();
    if routes.renders.is_empty() {
        return Ok(rendered);
    }
    let in_claim = pooled && !shared.loads_apart.load(Ordering::Relaxed);
    let session = match shared.db.standby_loads(claiming).await? {
        Some(session) => Some(session),
        None if in_claim => None,
        None => Some(shared.db.get().await?),
    };
    let ended = AtomicBool::new(false);
    let loader = match &session {
        Some(session) => UserClient::of(&shared.db, session).await?,
        None => UserClient::in_savepoints(claiming, &ended),
    };
    for part in &routes.renders {
        let fragment = part.fragment;
        let keys: Vec<String> = part.keys.keys().map(|key| key.to_string()).collect();
        let refreshed = refresh(
            loader,
            &shared.store,
            fragment.as_ref(),
            &keys,
            ticket,
            Writes::AllChecked,
        )
        .await
        .inspect_err(|error| {
            if ended.load(Ordering::Relaxed) && !shared.loads_apart.swap(true, Ordering::Relaxed) {
                tracing::warn!(fragment = fragment.name(), %error, "a load ended the transaction that claimed its batch, which rolls back: from now on this listener loads each batch on a session of its own, which holds a second server connection of the pooler while the claim holds one");
            }
        })?;
        shared.board.refreshed(fragment.name(), refreshed.stats);
        rendered.stats += refreshed.stats;
        // Every change whose fragment now holds a render that saw it (written, unchanged, or
        // refused for a newer one); failed and unchecked keys are not there yet.
        let missed: HashSet<usize> = refreshed
            .failed
            .iter()
            .chain(&refreshed.unresolved)
            .map(|(index, _)| *index)
            .chain(refreshed.unchecked.iter().copied())
            .collect();
        let written = Instant::now();
        let reached = keys
            .iter()
            .enumerate()
            .filter(|(index, _)| !missed.contains(index))
            .flat_map(|(_, key)| part.keys[key.as_str()].iter())
            .map(|change| (*change, written));
        rendered
            .fresh
            .push((fragment.name().to_string(), reached.collect()));
        for (index, reason) in refreshed.failed {
            for &change in &part.keys[keys[index].as_str()] {
                rendered
                    .failed
                    .entry(change)
                    .or_insert_with(|| reason.clone());
            }
        }
        for (index, reason) in refreshed.unresolved {
            for &change in &part.keys[keys[index].as_str()] {
                rendered
                    .unresolved
                    .entry(change)
                    .or_insert_with(|| reason.clone());
            }
        }
        let topic = fragment.own_topic().to_string();
        let unchecked = refreshed.unchecked.into_iter();
        rendered
            .unchecked
            .extend(unchecked.map(|index| (topic.clone(), keys[index].clone())));
    }
    Ok(rendered)
}
