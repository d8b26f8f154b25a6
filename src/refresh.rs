//! The one path from keys to Redis, shared by the listener and the sweep: load the rows of a batch of
//! keys, render every variant, encode it as the fragment's storage says, and write the results under
//! one render ticket. A sweep first reads the entries back and confirms, with a small script that
//! raises their tickets, those that already hold exactly their render; it writes only the others: in
//! steady state almost nothing changed, and the checked write, sending every fragment's HTML, was
//! most of a sweep's cost in Redis.

use crate::Error;
use crate::fragment::UserClient;
use crate::fragment::{DynFragment, KeyOutcome, LoadError};
use crate::stats::RefreshStats;
use crate::store::{RedisStore, Storage, Write, WriteResult};

/// How the reason of a key whose write Redis refused (out of memory, read-only) starts: the key's
/// render was fine, Redis was not.
pub(crate) const REDIS_REFUSED: &str = "Redis refused ";

/// Whether to skip writes whose value Redis already holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Writes {
    /// Every write goes through the ticket-checked script (the listener: what it renders changed;
    /// a sweep filling Redis).
    AllChecked,
    /// Entries Redis already holds exactly (same bytes, no TTL) are confirmed (their tickets raised,
    /// no value sent) and counted in [`Refreshed::confirmed`]; the rest go through the checked
    /// script (a sweep, while the entries mostly hold their renders).
    SkipHeld,
    /// Every write checked, and no delete: an on-demand render of a miss. Redis holds nothing to
    /// delete there, and the delete's ticket (kept a day, so that no older render brings the entry
    /// back) would let any client that asks for keys with no row grow Redis.
    NoDeletes,
    /// Every write checked, and a delete only of an entry Redis holds, or its ticket: a fresh
    /// on-demand render (`?fresh=1`). An entry of a row deleted since goes, with its ticket; for a
    /// key that never had one nothing is written, as for a miss. (A render that loaded the row
    /// before its delete and writes after is undone by the listener, which applies the delete.)
    HeldDeletes,
}

/// The result of refreshing a batch of keys of one fragment.
#[derive(Debug, Default)]
pub(crate) struct Refreshed {
    /// What was done.
    pub(crate) stats: RefreshStats,
    /// Keys (by index into the input) that failed, with the reason; all others are in Redis but
    /// the unresolved.
    pub(crate) failed: Vec<(usize, String)>,
    /// Whether every key failed with an error the server calls transient (a serialization
    /// failure, a lock timeout: [`LoadError::Transient`]): failed like any other in a batch, but
    /// a caller waiting for the render is told to ask again.
    pub(crate) transient: bool,
    /// Keys (by index into the input) loaded only together with keys that failed, not told apart
    /// from them (see [`KeyOutcome::Unresolved`]): to be tried again soon, with no attempt
    /// counted, with the reason.
    pub(crate) unresolved: Vec<(usize, String)>,
    /// Keys (by index into the input) written without a ticket to check against while Redis may
    /// evict keys (see [`WriteResult::WrittenUnchecked`]): they must be rendered once more.
    pub(crate) unchecked: Vec<usize>,
    /// Keys (by index into the input) of which Redis held something else than the render, or
    /// nothing: at least one entry was written or deleted. What a sweep repaired.
    pub(crate) repaired: Vec<usize>,
    /// With [`Writes::SkipHeld`]: how many keys had every entry confirmed (found holding its
    /// render, its ticket raised), nothing written (so nothing that could fail).
    pub(crate) confirmed: usize,
}

impl Refreshed {
    /// Every one of `keys` failed, for `reason`.
    fn all_failed(keys: &[String], reason: String, transient: bool) -> Refreshed {
        Refreshed {
            stats: RefreshStats {
                errors: keys.len() as u64,
                ..RefreshStats::default()
            },
            failed: (0..keys.len()).map(|i| (i, reason.clone())).collect(),
            transient,
            ..Refreshed::default()
        }
    }
}

/// Loads, renders and writes `keys` (text form) of one fragment under `ticket`, which must have been
/// taken before this call. A load that fails with a database error fails every key of the batch, each
/// as its own failure; a lost connection or a Redis error fails the call, so that the caller retries
/// the whole batch later.
pub(crate) async fn refresh(
    db: UserClient<'_>,
    store: &RedisStore,
    fragment: &dyn DynFragment,
    keys: &[String],
    ticket: i64,
    writes: Writes,
) -> Result<Refreshed, Error> {
    let started = std::time::Instant::now();
    let rendered = match fragment.render_keys(db, keys).await {
        Ok(rendered) => rendered,
        Err(LoadError::Failed(reason)) => return Ok(Refreshed::all_failed(keys, reason, false)),
        Err(LoadError::Transient(reason)) => return Ok(Refreshed::all_failed(keys, reason, true)),
        Err(error) => return Err(error.into()),
    };
    crate::ops::telemetry::loaded(fragment.name(), rendered.load_time);
    crate::ops::telemetry::rendered(fragment.name(), rendered.render_time);
    let mut planned = plan_writes(fragment.storage(), rendered.outcomes);
    match writes {
        Writes::NoDeletes => planned.keep_deletes(|_| false),
        Writes::HeldDeletes => {
            let deletes: Vec<String> = planned
                .writes
                .iter()
                .filter_map(|write| match write {
                    Write::Delete { key } => Some(key.clone()),
                    _ => None,
                })
                .collect();
            // In the order the deletes come, which is the order `keep_deletes` asks in.
            let mut held = store.holds(&deletes).await?.into_iter();
            planned.keep_deletes(|_| held.next().unwrap_or(true));
        }
        Writes::AllChecked | Writes::SkipHeld => {}
    }
    let rendered_at = started.elapsed();
    let (results, held) = match writes {
        Writes::AllChecked | Writes::NoDeletes | Writes::HeldDeletes => {
            (store.write(ticket, &planned.writes).await?, Vec::new())
        }
        Writes::SkipHeld => write_unless_held(store, ticket, &planned.writes).await?,
    };
    let write_time = started.elapsed() - rendered_at;
    let confirmed = confirmed_keys(&planned, &held);
    let mut refreshed = settle_writes(planned, results);
    refreshed.confirmed = confirmed;
    crate::ops::telemetry::refreshed(fragment.name(), &refreshed.stats, write_time);
    tracing::trace!(fragment = fragment.name(), keys = keys.len(), load_and_render = ?rendered_at, write = ?write_time, "refreshed");
    Ok(refreshed)
}

/// Writes those of `writes` that Redis does not already hold; the held ones count as unchanged.
/// Returns the results, and for each write whether it was held.
async fn write_unless_held(
    store: &RedisStore,
    ticket: i64,
    writes: &[Write],
) -> Result<(Vec<WriteResult>, Vec<bool>), Error> {
    let held = store.held(ticket, writes).await?;
    let to_send: Vec<&Write> = writes
        .iter()
        .zip(&held)
        .filter(|(_, held)| !**held)
        .map(|(write, _)| write)
        .collect();
    let mut sent = store.write(ticket, &to_send).await?.into_iter();
    let mut results = Vec::with_capacity(writes.len());
    for &held in &held {
        if held {
            results.push(WriteResult::Unchanged);
        } else {
            let result = sent.next();
            results.push(
                result.unwrap_or_else(|| WriteResult::Failed("Redis returned no result".into())),
            );
        }
    }
    Ok((results, held))
}

/// How many keys had writes, every one of them held (`held` is empty when nothing was held).
fn confirmed_keys(planned: &PlannedWrites, held: &[bool]) -> usize {
    if held.is_empty() {
        return 0;
    }
    // Per key: whether it has a write, and whether all its writes were held.
    let mut keys = vec![(false, true); planned.same_as.len()];
    for (&owner, &held) in planned.owners.iter().zip(held) {
        keys[owner].0 = true;
        keys[owner].1 &= held;
    }
    keys.iter()
        .filter(|(wrote, all_held)| *wrote && *all_held)
        .count()
}

/// The writes a batch's outcomes call for, and which key each belongs to.
struct PlannedWrites {
    writes: Vec<Write>,
    /// For each write, the index of the key it belongs to.
    owners: Vec<usize>,
    /// For each key, the index whose outcome it shares (itself, or an earlier spelling of it).
    same_as: Vec<usize>,
    refreshed: Refreshed,
}

impl PlannedWrites {
    /// Leaves out the deletes of keys `keep` refuses, asked of each delete in order (and their
    /// owners, kept beside them).
    fn keep_deletes(&mut self, mut keep: impl FnMut(&str) -> bool) {
        let (writes, owners) = std::mem::take(&mut self.writes)
            .into_iter()
            .zip(std::mem::take(&mut self.owners))
            .filter(|(write, _)| match write {
                Write::Delete { key } => keep(key),
                _ => true,
            })
            .unzip();
        self.writes = writes;
        self.owners = owners;
    }
}

fn plan_writes(storage: &Storage, outcomes: Vec<KeyOutcome>) -> PlannedWrites {
    let mut planned = PlannedWrites {
        writes: Vec::new(),
        owners: Vec::new(),
        same_as: (0..outcomes.len()).collect(),
        refreshed: Refreshed::default(),
    };
    for (index, outcome) in outcomes.into_iter().enumerate() {
        match outcome {
            KeyOutcome::Rendered(entries) => {
                planned.refreshed.stats.rendered += entries.len() as u64;
                planned
                    .owners
                    .extend(std::iter::repeat_n(index, entries.len()));
                let sets = entries.into_iter().map(|(key, html)| Write::Set {
                    key,
                    value: storage.encode(html),
                    ttl: storage.ttl(),
                });
                planned.writes.extend(sets);
            }
            KeyOutcome::Gone(redis_keys) => {
                planned
                    .owners
                    .extend(std::iter::repeat_n(index, redis_keys.len()));
                let deletes = redis_keys.into_iter().map(|key| Write::Delete { key });
                planned.writes.extend(deletes);
            }
            KeyOutcome::Failed(reason) => {
                planned.refreshed.stats.errors += 1;
                planned.refreshed.failed.push((index, reason));
            }
            KeyOutcome::Unresolved(reason) => planned.refreshed.unresolved.push((index, reason)),
            KeyOutcome::SameAs(first) => planned.same_as[index] = first,
        }
    }
    planned
}

/// Counts the write results, and gives each key the failure or recheck of any of its writes; a key
/// spelled twice shares the outcome of its first spelling.
fn settle_writes(planned: PlannedWrites, results: Vec<WriteResult>) -> Refreshed {
    let PlannedWrites {
        writes,
        owners,
        same_as,
        mut refreshed,
    } = planned;
    let mut failed: Vec<Option<String>> = vec![None; same_as.len()];
    for (index, reason) in refreshed.failed.drain(..) {
        failed[index] = Some(reason);
    }
    let mut unresolved: Vec<Option<String>> = vec![None; same_as.len()];
    for (index, reason) in refreshed.unresolved.drain(..) {
        unresolved[index] = Some(reason);
    }
    let mut unchecked = vec![false; same_as.len()];
    let mut repaired = vec![false; same_as.len()];
    for ((result, write), owner) in results.into_iter().zip(&writes).zip(owners) {
        count(&mut refreshed.stats, &result);
        match &result {
            WriteResult::Written
            | WriteResult::WrittenUnchecked
            | WriteResult::Deleted
            | WriteResult::DeletedUnchecked => repaired[owner] = true,
            _ => {}
        }
        match &result {
            WriteResult::Failed(reason) if failed[owner].is_none() => {
                refreshed.stats.errors += 1;
                failed[owner] = Some(format!("{REDIS_REFUSED}{}: {reason}", write.key()));
            }
            WriteResult::WrittenUnchecked | WriteResult::DeletedUnchecked => {
                unchecked[owner] = true
            }
            _ => {}
        }
    }
    for (index, &first) in same_as.iter().enumerate() {
        if first != index {
            failed[index] = failed[first].clone();
            unresolved[index] = unresolved[first].clone();
            unchecked[index] = unchecked[first];
        }
    }
    let indexed = |reasons: Vec<Option<String>>| -> Vec<(usize, String)> {
        let reasons = reasons.into_iter().enumerate();
        reasons
            .filter_map(|(index, reason)| Some((index, reason?)))
            .collect()
    };
    refreshed.failed = indexed(failed);
    refreshed.unresolved = indexed(unresolved);
    refreshed.unchecked = (0..same_as.len()).filter(|&i| unchecked[i]).collect();
    refreshed.repaired = (0..same_as.len()).filter(|&i| repaired[i]).collect();
    refreshed
}

/// Adds one write result to the counts.
pub(crate) fn count(stats: &mut RefreshStats, result: &WriteResult) {
    match result {
        WriteResult::Written | WriteResult::WrittenUnchecked => stats.written += 1,
        WriteResult::Unchanged => stats.unchanged += 1,
        WriteResult::Refused => stats.refused += 1,
        WriteResult::Deleted | WriteResult::DeletedUnchecked => stats.deleted += 1,
        WriteResult::Absent | WriteResult::Failed(_) => {}
    }
}
