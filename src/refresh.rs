//! The one path from keys to Redis, shared by the listener and the sweep: load the rows of a batch of
//! keys, render every variant, and write the results under one render ticket.

use std::ops::AddAssign;

use tokio_postgres::Client;

use crate::Error;
use crate::fragment::{DynFragment, KeyOutcome};
use crate::sink::{RedisSink, Write, WriteResult};

/// Counts of what a refresh did, added up over batches and fragments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefreshStats {
    /// Fragments (key × variant) rendered.
    pub rendered: u64,
    /// Fragments stored because their HTML changed.
    pub written: u64,
    /// Fragments whose HTML was already stored.
    pub unchanged: u64,
    /// Writes refused because a newer render was already stored.
    pub refused: u64,
    /// Fragments deleted because their row is gone.
    pub deleted: u64,
    /// Keys that could not be refreshed.
    pub errors: u64,
}

impl AddAssign for RefreshStats {
    fn add_assign(&mut self, other: Self) {
        self.rendered += other.rendered;
        self.written += other.written;
        self.unchanged += other.unchanged;
        self.refused += other.refused;
        self.deleted += other.deleted;
        self.errors += other.errors;
    }
}

/// The result of refreshing a batch of keys of one fragment.
#[derive(Debug, Default)]
pub struct Refreshed {
    /// What was done.
    pub stats: RefreshStats,
    /// Keys (by index into the input) that failed, with the reason; all others are in Redis.
    pub failed: Vec<(usize, String)>,
}

/// Loads, renders and writes `keys` (text form) of one fragment under `ticket`, which must have been
/// taken before this call. A load that fails with a database error fails every key of the batch, each
/// as its own failure; a lost connection or a Redis error fails the call, so that the caller retries
/// the whole batch later.
pub async fn refresh(
    db: &Client,
    sink: &RedisSink,
    fragment: &dyn DynFragment,
    keys: &[String],
    ticket: i64,
) -> Result<Refreshed, Error> {
    let started = std::time::Instant::now();
    let outcomes = match fragment.render_keys(db, keys).await {
        Ok(outcomes) => outcomes,
        Err(error) if error.as_db_error().is_some() => {
            let reason = format!(
                "load of {} failed: {}",
                fragment.name(),
                crate::error::describe_postgres(&error)
            );
            return Ok(Refreshed {
                stats: RefreshStats {
                    errors: keys.len() as u64,
                    ..RefreshStats::default()
                },
                failed: (0..keys.len()).map(|i| (i, reason.clone())).collect(),
            });
        }
        Err(error) => return Err(error.into()),
    };

    let mut refreshed = Refreshed::default();
    let mut writes = Vec::with_capacity(keys.len() * fragment.variants().len());
    // For each write, the index of the key it belongs to, to map a refused key back to its change.
    let mut owners = Vec::with_capacity(writes.capacity());
    for (index, outcome) in outcomes.into_iter().enumerate() {
        match outcome {
            KeyOutcome::Rendered(entries) => {
                refreshed.stats.rendered += entries.len() as u64;
                owners.extend(std::iter::repeat_n(index, entries.len()));
                writes.extend(
                    entries
                        .into_iter()
                        .map(|(key, html)| Write::Set { key, html }),
                );
            }
            KeyOutcome::Gone(redis_keys) => {
                owners.extend(std::iter::repeat_n(index, redis_keys.len()));
                writes.extend(redis_keys.into_iter().map(|key| Write::Delete { key }));
            }
            KeyOutcome::Failed(reason) => {
                refreshed.stats.errors += 1;
                refreshed.failed.push((index, reason));
            }
        }
    }
    let rendered_at = started.elapsed();
    let results = sink.write(ticket, &writes).await?;
    let write_time = started.elapsed() - rendered_at;
    for ((result, write), owner) in results.into_iter().zip(&writes).zip(owners) {
        if let WriteResult::Failed(reason) = &result
            && !refreshed.failed.iter().any(|(failed, _)| *failed == owner)
        {
            refreshed.stats.errors += 1;
            let key = match write {
                Write::Set { key, .. } | Write::Delete { key } => key,
            };
            refreshed
                .failed
                .push((owner, format!("Redis refused {key}: {reason}")));
        }
        count(&mut refreshed.stats, &result);
    }
    crate::telemetry::refreshed(fragment.name(), &refreshed.stats, write_time);
    tracing::trace!(fragment = fragment.name(), keys = keys.len(), load_and_render = ?rendered_at, write = ?write_time, "refreshed");
    Ok(refreshed)
}

/// Adds one write result to the counts.
pub fn count(stats: &mut RefreshStats, result: &WriteResult) {
    match result {
        WriteResult::Written => stats.written += 1,
        WriteResult::Unchanged => stats.unchanged += 1,
        WriteResult::Refused => stats.refused += 1,
        WriteResult::Deleted => stats.deleted += 1,
        WriteResult::Absent | WriteResult::Failed(_) => {}
    }
}
