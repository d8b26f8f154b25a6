//! The orphan pass: entries under a fragment's prefix whose row is gone. The sweep took a render
//! ticket before it began, so every entry whose ticket is still older was written (or confirmed as
//! holding its render) neither by the sweep nor by a listener since: unless its key failed, its row
//! no longer exists. Deleting it is one more ticket-checked write. When one SCAN step covers the
//! whole keyspace as the sweep begins (an empty Redis), only the entries found then are candidates.

use std::collections::HashSet;

use crate::Error;
use crate::store::{BOOKKEEPING_PREFIX, Eviction, RedisStore, Write, WriteResult};

/// The entries the orphan pass keeps although their tickets may be older than the sweep's: those of
/// keys that failed (their rows exist). Entries the sweep wrote or confirmed carry its tickets.
pub(super) type Kept = HashSet<String>;

/// Where the orphan pass looks for entries whose row is gone.
pub(super) enum Candidates {
    /// The keys under the prefix when the sweep began: one SCAN step covered the whole keyspace.
    Existing(Vec<String>),
    /// Every key under the prefix once the sweep is done, found by a scan of the whole keyspace.
    All,
}

impl Candidates {
    /// Taken after the sweep's start ticket and before its first page. A sweep into an empty
    /// Redis (the first one, or the one after Redis lost its data) would otherwise scan, at the
    /// end, every entry it had just written, and read their tickets: a third of such a sweep's
    /// time (`BENCHMARKS.md`). An entry created after this point was written with a ticket: by this
    /// sweep (its row exists), or by a listener, which renders a row that exists and deletes the
    /// entry when a captured change says the row is gone. Only a row deleted uncaptured (with
    /// `session_replication_role = replica`) while a listener's batch from before the start ticket
    /// lands its entry escapes this pass; the next sweep deletes that entry.
    pub(super) async fn before_sweep(store: &RedisStore, prefix: &str) -> Result<Self, Error> {
        Ok(
            match store.scan_prefix(prefix).await?.in_one_step().await? {
                Some(keys) => Candidates::Existing(keys),
                None => Candidates::All,
            },
        )
    }
}

/// Deletes every entry among `candidates` whose ticket is older than `start_ticket`, but for
/// those `kept`; returns how many.
///
/// While Redis may evict keys, an entry without a ticket proves nothing (its ticket may have been
/// evicted after this sweep wrote it), so it is left alone: a real orphan is then deleted by a later
/// sweep once it has been rewritten, or evicted. The ticket-checked delete checks the ticket again
/// atomically; only a ticket evicted between the two reads escapes this, and costs one cache miss.
pub(super) async fn delete_orphans(
    store: &RedisStore,
    prefix: &str,
    candidates: Candidates,
    start_ticket: i64,
    keep: &Kept,
) -> Result<u64, Error> {
    let mut deleted = 0;
    match candidates {
        Candidates::Existing(keys) => {
            for keys in keys.chunks(PAGE) {
                deleted += delete_among(store, keys.to_vec(), start_ticket, keep).await?;
            }
        }
        Candidates::All => {
            let mut scan = store.scan_prefix(prefix).await?;
            while let Some(keys) = scan.next_page().await? {
                deleted += delete_among(store, keys, start_ticket, keep).await?;
            }
        }
    }
    Ok(deleted)
}

/// Keys whose tickets one round trip reads, when they come from a list rather than a scan page.
const PAGE: usize = 5000;

/// Deletes the orphans among these keys; returns how many.
async fn delete_among(
    store: &RedisStore,
    mut keys: Vec<String>,
    start_ticket: i64,
    keep: &Kept,
) -> Result<u64, Error> {
    let may_evict = store.eviction().0 != Eviction::Impossible;
    // A fragment's prefix never overlaps pgfresh's own keys (see `Fragments`); never delete those.
    keys.retain(|key| !key.starts_with(BOOKKEEPING_PREFIX) && !keep.contains(key));
    // Most entries were just rewritten: read their tickets in one round trip and send only the
    // candidates through the ticket-checked delete.
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
