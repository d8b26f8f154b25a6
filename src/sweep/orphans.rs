//! The orphan pass: entries under a fragment's prefix whose row is gone. The sweep took a render
//! ticket before it began, so every entry whose ticket is still older was written (or confirmed as
//! holding its render) neither by the sweep nor by a listener since: unless its key failed, its row
//! no longer exists. Deleting it is one more ticket-checked write. A fragment's sweep that began
//! with no entry under the prefix in a nearly empty Redis (a first fill, or one after Redis lost its
//! data) skips the pass.

use std::collections::HashSet;

use crate::Error;
use crate::store::{BOOKKEEPING_PREFIX, Eviction, RedisStore, Write, WriteResult};

/// The entries the orphan pass keeps although their tickets may be older than the sweep's: those of
/// keys that failed (their rows exist). Entries the sweep wrote or confirmed carry its tickets.
pub(super) type Kept = HashSet<String>;

/// Whether there is no entry under `prefix` as one SCAN step per server proves: a step samples
/// about 5,000 keys of the whole database, so this is known only for a nearly empty Redis, at the
/// cost of one page of the pass. Asked after the fragment's start ticket, before its first page.
///
/// Such a sweep skips the orphan pass, which would otherwise scan every entry it had just written
/// and read their tickets: a third of a fill's time (`BENCHMARKS.md`). Every entry under the prefix
/// at its end was written after this check: by the sweep (its row exists), or by a listener. What
/// the pass would have caught and this does not: an entry written after the check by a render that
/// took its ticket before the sweep's (a listener's batch in flight as the sweep began), of a row
/// gone by then without a change for a listener to apply: a `TRUNCATE` just before, a commit a
/// failover lost, a variant only an older version renders, a delete that bypassed the triggers
/// (`session_replication_role = replica`). That entry waits for the next sweep that finds entries
/// (none with `--sweep-interval 0`), as one landing after the pass's scan always did.
pub(super) async fn none_under(store: &RedisStore, prefix: &str) -> Result<bool, Error> {
    store.scan_prefix(prefix).await?.none_in_one_step().await
}

/// Deletes every entry under `prefix` whose ticket is older than `start_ticket`, but for those
/// `kept`; returns how many.
///
/// While Redis may evict keys, an entry without a ticket proves nothing (its ticket may have been
/// evicted after this sweep wrote it), so it is left alone: a real orphan is then deleted by a later
/// sweep once it has been rewritten, or evicted. The ticket-checked delete checks the ticket again
/// atomically; only a ticket evicted between the two reads escapes this, and costs one cache miss.
pub(super) async fn delete_orphans(
    store: &RedisStore,
    prefix: &str,
    start_ticket: i64,
    keep: &Kept,
) -> Result<u64, Error> {
    let mut deleted = 0;
    let mut scan = store.scan_prefix(prefix).await?;
    // Each page's tickets are read while the scan's next step runs (the two requests share the
    // connection's pipeline): a round trip a page no longer waits for the other.
    let mut page = Vec::new();
    loop {
        let (next, done) = tokio::join!(
            scan.next_page(),
            delete_among(store, std::mem::take(&mut page), start_ticket)
        );
        deleted += done?;
        let Some(mut keys) = next? else { break };
        // A fragment's prefix never overlaps pgfresh's own keys (see `Fragments`); never delete those.
        keys.retain(|key| !key.starts_with(BOOKKEEPING_PREFIX) && !keep.contains(key));
        page = keys;
    }
    // The last page was checked on the turn that found the scan complete.
    Ok(deleted)
}

/// Deletes the orphans among these entries; returns how many. Most entries were just rewritten:
/// their tickets are read in one round trip, and only the candidates go through the ticket-checked
/// delete.
async fn delete_among(
    store: &RedisStore,
    keys: Vec<String>,
    start_ticket: i64,
) -> Result<u64, Error> {
    if keys.is_empty() {
        return Ok(0);
    }
    let may_evict = store.eviction().0 != Eviction::Impossible;
    let tickets = store.tickets(&keys).await?;
    let writes: Vec<Write> = keys
        .into_iter()
        .zip(tickets)
        .filter(|(_, ticket)| match ticket {
            Some(ticket) => *ticket < start_ticket,
            None => !may_evict,
        })
        .map(|(key, _)| Write::Delete { key })
        .collect();
    let mut deleted = 0;
    for result in store.write(start_ticket, &writes).await? {
        if matches!(result, WriteResult::Deleted | WriteResult::DeletedUnchecked) {
            deleted += 1;
        }
    }
    Ok(deleted)
}
