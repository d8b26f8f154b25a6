//! One page of a sweep: its keys refreshed under a ticket of their own, through the path the listener
//! uses but writing only what Redis does not already hold; keys that fail queued as failed changes
//! (their entries kept), keys Redis could not check queued to render again; a page whose every key
//! fails counts as failed. Whether a page first reads its entries back depends on what the pages
//! before it found ([`HeldLately`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::orphans::Kept;
use super::{Progress, SweepReport};
use crate::fragment::DynFragment;
use crate::fragment::UserClient;
use crate::pg::Database;
use crate::refresh::{Writes, refresh};
use crate::stats::RefreshStats;
use crate::store::RedisStore;

/// Refreshes one page of keys under a ticket of its own. Keys that fail are handed to the queue with
/// their error; keys written without a ticket to check against are queued to be rendered again.
pub(super) async fn sweep_page(
    db: Database,
    store: RedisStore,
    fragment: Arc<dyn DynFragment>,
    keys: Vec<String>,
    held_lately: Arc<HeldLately>,
    look_up: LookUp,
) -> PageResult {
    let failed_page = |error: String| (keys.len() as u64, error);
    // Loads on the standby, when one was given and has replayed what the primary had written once
    // the ticket was taken.
    let (ticket, session) = db
        .ticket_and_loads()
        .await
        .map_err(|e| failed_page(e.to_string()))?;
    let loader = UserClient::of(&db, &session)
        .await
        .map_err(|e| failed_page(e.to_string()))?;
    let refreshed = refresh(
        loader,
        &store,
        fragment.as_ref(),
        &keys,
        ticket,
        held_lately.writes(),
    )
    .await
    .map_err(|e| failed_page(e.to_string()))?;
    held_lately.learn(&refreshed.stats);
    // Every key of a page failing is the page failing (a loader that times out, an ACL refusing
    // every key; Redis out of memory or read-only fails the call above): the sweep is incomplete
    // and tried again later, rather than the whole table queued, and in time parked, key by key.
    // Keys whose entries all held their render were not written, so they could not fail.
    let attempted = keys.len() - refreshed.confirmed;
    if attempted > 1 && refreshed.failed.len() == attempted {
        return Err(failed_page(refreshed.failed[0].1.clone()));
    }
    if let Some((index, reason)) = refreshed.failed.first() {
        tracing::warn!(fragment = fragment.name(), key = %keys[*index], error = %reason, "sweep could not refresh a key; it is queued for retry");
    }
    let mut again: Vec<String> = Vec::new();
    let mut errors: Vec<Option<String>> = Vec::new();
    let mut keep = Vec::new();
    for (index, reason) in &refreshed.failed {
        again.push(keys[*index].clone());
        errors.push(Some(reason.clone()));
        keep.extend(fragment.redis_keys(&keys[*index]).unwrap_or_default());
    }
    // Queued after the write, not with it: a crash in between leaves a render that Redis could not
    // check unchecked until the key changes or the next sweep, which only matters while Redis may
    // evict keys.
    // Keys loaded only with failing ones, not told apart: the listener loads them again, apart.
    for (index, _) in &refreshed.unresolved {
        again.push(keys[*index].clone());
        errors.push(None);
        keep.extend(fragment.redis_keys(&keys[*index]).unwrap_or_default());
    }
    for index in &refreshed.unchecked {
        again.push(keys[*index].clone());
        errors.push(None);
    }
    drop(session);
    let unexplained = match look_up {
        LookUp::Repairs => unexplained(&db, fragment.as_ref(), &keys, &refreshed.repaired)
            .await
            .map_err(|e| failed_page(e.to_string()))?,
        LookUp::Nothing => 0,
    };
    if !again.is_empty() {
        let requeued = match db.pinned().await {
            Ok(client) => {
                crate::pg::queue::requeue(&client, fragment.own_topic(), &again, &errors).await
            }
            Err(error) => Err(error),
        };
        requeued.map_err(|e| failed_page(e.to_string()))?;
    }
    Ok(PageDone {
        unexplained,
        stats: refreshed.stats,
        requeued: refreshed.failed.len() as u64,
        first_error: refreshed
            .failed
            .into_iter()
            .next()
            .map(|(_, reason)| reason),
        keep,
    })
}

/// Whether the entries of a sweep's pages have mostly held their renders so far, as in a periodic
/// sweep where little changed: a page then reads its entries back and only confirms those (no HTML
/// sent, see [`Writes::SkipHeld`]). Into an empty Redis, or one where most entries changed, that read
/// finds nothing to spare and costs a tenth of the fill (Redis's and pgfresh's CPU, and a round trip
/// per page): pages then send every write through the checked script at once, which still tells an
/// unchanged entry, so the next page learns when entries hold their renders again.
pub(super) struct HeldLately(AtomicBool);

impl HeldLately {
    /// Expecting entries to hold their renders, as a periodic sweep mostly finds them.
    pub(super) fn new() -> Self {
        Self(AtomicBool::new(true))
    }

    fn writes(&self) -> Writes {
        if self.0.load(Ordering::Relaxed) {
            Writes::SkipHeld
        } else {
            Writes::AllChecked
        }
    }

    /// Notes what a page found: mostly unchanged entries, or mostly written ones.
    fn learn(&self, stats: &RefreshStats) {
        if stats.unchanged + stats.written > 0 {
            self.0
                .store(stats.unchanged >= stats.written, Ordering::Relaxed);
        }
    }
}

/// Whether a page looks the keys it repaired up in the queue, to count those no change explains
/// (one read of the whole queue: the queue has no index by key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LookUp {
    Repairs,
    Nothing,
}

/// How many of the keys a page repaired had no change of the fragment's own topics waiting in the
/// queue: their rows changed, and nothing the triggers captured said so (or a change of a shared
/// row was still on its way, or Redis lost the entry).
async fn unexplained(
    db: &Database,
    fragment: &dyn DynFragment,
    keys: &[String],
    repaired: &[usize],
) -> Result<u64, crate::Error> {
    if repaired.is_empty() {
        return Ok(0);
    }
    let topics: Vec<&str> = fragment
        .topics()
        .iter()
        .filter(|t| t.mapping == crate::fragment::Mapping::Direct)
        .map(|t| t.name.as_str())
        .chain([fragment.own_topic()])
        .collect();
    let repaired: Vec<&str> = repaired.iter().map(|&i| keys[i].as_str()).collect();
    let client = db.pinned().await?;
    let unexplained = crate::pg::queue::not_pending(&client, &topics, &repaired).await?;
    Ok(unexplained.len() as u64)
}

/// A sweep page that completed: its counts, and the failed keys it queued.
pub(super) struct PageDone {
    /// Keys it repaired with no change waiting for them (see [`unexplained`]).
    unexplained: u64,
    stats: RefreshStats,
    requeued: u64,
    first_error: Option<String>,
    /// The Redis keys of the keys that failed: their rows exist, so the orphan pass must keep them.
    keep: Vec<String>,
}

/// A sweep page's result: what it did, or how many keys it could neither refresh nor queue, and why.
pub(super) type PageResult = Result<PageDone, (u64, String)>;

/// Adds a finished page to the report, and its failed keys' entries to those the orphan pass keeps.
pub(super) fn collect(
    joined: Option<Result<PageResult, tokio::task::JoinError>>,
    report: &mut SweepReport,
    keep: &mut Kept,
    progress: &dyn Progress,
) {
    match joined {
        None => {}
        Some(Ok(Ok(page))) => {
            progress.advanced(page.stats.rendered + page.stats.errors);
            report.stats += page.stats;
            report.unexplained += page.unexplained;
            report.requeued += page.requeued;
            keep.extend(page.keep);
            if let Some(error) = page.first_error {
                report.first_error.get_or_insert(error);
            }
        }
        Some(Ok(Err((keys, error)))) => {
            progress.advanced(keys);
            report.stats.errors += keys;
            report.pages_failed += 1;
            report.first_error.get_or_insert(error);
        }
        Some(Err(join_error)) => {
            report.stats.errors += 1;
            report.pages_failed += 1;
            report
                .first_error
                .get_or_insert(format!("sweep task died: {join_error}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(written: u64, unchanged: u64) -> RefreshStats {
        RefreshStats {
            written,
            unchanged,
            ..RefreshStats::default()
        }
    }

    #[test]
    fn pages_read_entries_back_while_they_mostly_hold_their_renders() {
        let held = HeldLately::new();
        assert_eq!(
            held.writes(),
            Writes::SkipHeld,
            "a sweep starts expecting them"
        );
        held.learn(&stats(20, 0));
        assert_eq!(held.writes(), Writes::AllChecked, "an empty Redis");
        held.learn(&RefreshStats::default());
        assert_eq!(
            held.writes(),
            Writes::AllChecked,
            "a page of failures says nothing"
        );
        held.learn(&stats(2, 18));
        assert_eq!(
            held.writes(),
            Writes::SkipHeld,
            "entries hold their renders again"
        );
        held.learn(&stats(11, 9));
        assert_eq!(held.writes(), Writes::AllChecked);
    }
}
