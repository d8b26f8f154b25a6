//! The full sweep: re-renders every key of every fragment and deletes entries whose row is gone.
//!
//! Keys are enumerated with keyset pagination (bounded memory whatever the table size) and each page goes
//! through the same load/render/write path as the listener, several pages at a time. Orphans are found
//! without remembering any key: the sweep takes a render ticket before it starts, so afterwards every
//! entry under the fragment's prefix whose ticket is still older was neither rendered by this sweep nor
//! by a listener since, and so has no row. Deleting it is one more version-checked write.
//!
//! A key that fails (its render panics, its loader errs, Redis refuses it) does not hold the sweep
//! back: it is handed to the queue as a failed change, retried with backoff and parked like any other,
//! and the sweep completes. A complete sweep of a fragment sets its marker in Redis (see
//! `maintenance`), whoever ran it: a listener, or the one-off `sweep` command.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::Error;
use crate::config::SweepSettings;
use crate::db::Database;
use crate::fragment::{DynFragment, Fragments};
use crate::queue::take_ticket;
use crate::refresh::{RefreshStats, refresh};
use crate::shutdown::Shutdown;
use crate::sink::{RedisSink, Write, WriteResult};

/// What a sweep did.
#[derive(Clone, Debug, Default)]
pub struct SweepReport {
    /// Render and write counts over all fragments.
    pub stats: RefreshStats,
    /// Entries deleted because their row no longer exists.
    pub orphans_deleted: u64,
    /// Wall-clock time.
    pub elapsed: Duration,
    /// The first error met, if any (the count is in `stats.errors`).
    pub first_error: Option<String>,
    /// Keys that failed and were handed to the queue, to be retried and parked like failed changes.
    pub requeued: u64,
    /// Pages that failed as a whole (PostgreSQL or Redis unreachable): their keys were neither
    /// refreshed nor queued, so the sweep is incomplete.
    pub pages_failed: u64,
    /// Fragments whose marker could not be set because Redis lost data during their sweep (restart,
    /// FLUSHALL, an evicted canary): their early pages may be gone, so the sweep is incomplete.
    pub markers_lost: u64,
    /// Shutdown stopped the sweep before it finished.
    pub interrupted: bool,
}

impl SweepReport {
    /// True when every key was refreshed and the sweep ran to the end.
    pub fn succeeded(&self) -> bool {
        self.stats.errors == 0 && self.completed()
    }

    /// True when the sweep ran to the end and every key was either refreshed or handed to the queue:
    /// markers were set and orphans deleted.
    pub fn completed(&self) -> bool {
        self.pages_failed == 0 && self.markers_lost == 0 && !self.interrupted
    }
}

impl fmt::Display for SweepReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        write!(
            f,
            "sweep: {} fragments rendered, {} written, {} unchanged, {} orphans deleted, {} errors in {:.2} s ({:.0} fragments/s)",
            self.stats.rendered,
            self.stats.written,
            self.stats.unchanged,
            self.orphans_deleted,
            self.stats.errors,
            secs,
            self.stats.rendered as f64 / secs.max(1e-9),
        )?;
        if self.stats.refused > 0 {
            // Redis held newer renders: a listener wrote meanwhile, or, if every write is refused,
            // another database's pgfresh writes under the same key prefix.
            write!(
                f,
                "; {} refused (Redis held a newer render; all of them refused means another database writes under this prefix)",
                self.stats.refused
            )?;
        }
        if self.requeued > 0 {
            write!(f, "; {} failed keys queued for retry", self.requeued)?;
        }
        if self.interrupted {
            write!(f, "; interrupted by shutdown")?;
        }
        if let Some(error) = &self.first_error {
            write!(f, "; first error: {error}")?;
        }
        Ok(())
    }
}

/// Told how a sweep advances. The `sweep` command shows a progress bar; others stay silent.
pub trait Progress: Send + Sync {
    /// A fragment's sweep starts; `fragments` is how many it will render, when known.
    fn fragment_started(&self, _name: &str, _fragments: Option<u64>) {}
    /// More fragments were rendered (or failed).
    fn advanced(&self, _fragments: u64) {}
    /// The fragment's sweep ended.
    fn fragment_finished(&self, _name: &str) {}
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {}

/// Sweeps every fragment (or only `settings.only`).
pub async fn run(
    db: &Database,
    sink: &RedisSink,
    fragments: &Fragments,
    settings: &SweepSettings,
    shutdown: &Shutdown,
) -> Result<SweepReport, Error> {
    run_with_progress(db, sink, fragments, settings, shutdown, &Silent).await
}

/// Like [`run`], telling `progress` how it advances.
pub async fn run_with_progress(
    db: &Database,
    sink: &RedisSink,
    fragments: &Fragments,
    settings: &SweepSettings,
    shutdown: &Shutdown,
    progress: &dyn Progress,
) -> Result<SweepReport, Error> {
    fragments.validate()?;
    let selected: Vec<Arc<dyn DynFragment>> = match &settings.only {
        None => fragments.iter().cloned().collect(),
        Some(name) => vec![fragments.get(name).cloned().ok_or_else(|| {
            Error::Fragment(format!(
                "no fragment named {name:?}; this binary has: {}",
                fragments.names()
            ))
        })?],
    };
    run_selected(db, sink, &selected, settings, shutdown, progress).await
}

/// Sweeps these fragments, one after the other; `settings.only` is ignored.
pub async fn run_selected(
    db: &Database,
    sink: &RedisSink,
    selected: &[Arc<dyn DynFragment>],
    settings: &SweepSettings,
    shutdown: &Shutdown,
    progress: &dyn Progress,
) -> Result<SweepReport, Error> {
    let started = Instant::now();
    let mut report = SweepReport::default();
    for fragment in selected {
        sweep_fragment(
            db,
            sink,
            fragment.clone(),
            settings,
            shutdown,
            progress,
            &mut report,
        )
        .await?;
        if report.interrupted {
            break;
        }
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Sweeps one fragment, adding to `report`. Fails only when keys cannot be enumerated at all.
async fn sweep_fragment(
    db: &Database,
    sink: &RedisSink,
    fragment: Arc<dyn DynFragment>,
    settings: &SweepSettings,
    shutdown: &Shutdown,
    progress: &dyn Progress,
    report: &mut SweepReport,
) -> Result<(), Error> {
    let canary = sink.start_sweep(fragment.key_prefix()).await?;
    let pager = db.get().await?;
    let start_ticket = take_ticket(&pager).await?;
    let total = fragment.count_keys(&pager).await?;
    let variants = fragment.variants().len() as u64;
    progress.fragment_started(
        fragment.name(),
        total.map(|keys| keys.max(0) as u64 * variants),
    );
    let incomplete_before = report.pages_failed;
    let mut keep = HashSet::new();
    let mut pages = JoinSet::new();
    let mut after: Option<String> = None;
    loop {
        if shutdown.is_cancelled() {
            report.interrupted = true;
            break;
        }
        let keys = fragment
            .keys_after(&pager, after.as_deref(), settings.page_size)
            .await?;
        let last_page = (keys.len() as i64) < settings.page_size;
        after = keys.last().cloned();
        if !keys.is_empty() {
            while pages.len() >= settings.concurrency.max(1) {
                collect(pages.join_next().await, report, &mut keep, progress);
            }
            pages.spawn(sweep_page(db.clone(), sink.clone(), fragment.clone(), keys));
        }
        if last_page {
            break;
        }
    }
    drop(pager);
    while let Some(joined) = pages.join_next().await {
        collect(Some(joined), report, &mut keep, progress);
    }
    progress.fragment_finished(fragment.name());
    // Entries of keys in a page that failed as a whole would look like orphans, and the marker would
    // claim what is not true: both wait for a complete sweep.
    if report.pages_failed == incomplete_before && !report.interrupted {
        let prefix = fragment.key_prefix();
        report.orphans_deleted += delete_orphans(sink, prefix, start_ticket, &keep).await?;
        if !sink
            .finish_sweep(prefix, &canary, fragment.version())
            .await?
        {
            tracing::warn!(
                fragment = fragment.name(),
                "Redis lost its data during the sweep; the fragment will be swept again"
            );
            report.markers_lost += 1;
        }
    }
    Ok(())
}

/// Refreshes one page of keys under a ticket of its own. Keys that fail are handed to the queue with
/// their error; keys written without a ticket to check against are queued to be rendered again.
async fn sweep_page(
    db: Database,
    sink: RedisSink,
    fragment: Arc<dyn DynFragment>,
    keys: Vec<String>,
) -> PageResult {
    let failed_page = |error: String| (keys.len() as u64, error);
    let client = db.get().await.map_err(|e| failed_page(e.to_string()))?;
    let ticket = take_ticket(&client)
        .await
        .map_err(|e| failed_page(e.to_string()))?;
    let refreshed = refresh(&client, &sink, fragment.as_ref(), &keys, ticket)
        .await
        .map_err(|e| failed_page(e.to_string()))?;
    // Every key of a page failing is the page failing (Redis out of memory or read-only, a loader
    // that times out): the sweep is incomplete and tried again later, rather than the whole table
    // queued, and in time parked, key by key.
    if keys.len() > 1 && refreshed.failed.len() == keys.len() {
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
    for index in &refreshed.unchecked {
        again.push(keys[*index].clone());
        errors.push(None);
    }
    if !again.is_empty() {
        crate::queue::requeue(&client, fragment.topics()[0], &again, &errors)
            .await
            .map_err(|e| failed_page(e.to_string()))?;
    }
    Ok(PageDone {
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

/// A sweep page that completed: its counts, and the failed keys it queued.
struct PageDone {
    stats: RefreshStats,
    requeued: u64,
    first_error: Option<String>,
    /// The Redis keys of the keys that failed: their rows exist, so the orphan pass must keep them.
    keep: Vec<String>,
}

/// A sweep page's result: what it did, or how many keys it could neither refresh nor queue, and why.
type PageResult = Result<PageDone, (u64, String)>;

/// Adds a finished page to the report, and its failed keys' entries to those the orphan pass keeps.
fn collect(
    joined: Option<Result<PageResult, tokio::task::JoinError>>,
    report: &mut SweepReport,
    keep: &mut HashSet<String>,
    progress: &dyn Progress,
) {
    match joined {
        None => {}
        Some(Ok(Ok(page))) => {
            progress.advanced(page.stats.rendered + page.stats.errors);
            report.stats += page.stats;
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

/// Deletes every entry under `prefix` whose ticket is older than `start_ticket`, but for `keep`
/// (the entries of keys that failed in this sweep: their rows exist); returns how many.
///
/// While Redis may evict keys, an entry without a ticket proves nothing (its ticket may have been
/// evicted after this sweep wrote it), so it is left alone: a real orphan is then deleted by a later
/// sweep once it has been rewritten, or evicted. The version-checked delete checks the ticket again
/// atomically; only a ticket evicted between the two reads escapes this, and costs one cache miss.
async fn delete_orphans(
    sink: &RedisSink,
    prefix: &str,
    start_ticket: i64,
    keep: &HashSet<String>,
) -> Result<u64, Error> {
    let may_evict = sink.eviction().0 != crate::sink::Eviction::Impossible;
    let mut deleted = 0;
    let mut scan = sink.scan_prefix(prefix).await?;
    while let Some(mut keys) = scan.next_page().await? {
        // A fragment's prefix never overlaps pgfresh's own keys (see `Fragments`); never delete those.
        keys.retain(|key| !key.starts_with(crate::keys::BOOKKEEPING_PREFIX) && !keep.contains(key));
        // Most entries were just rewritten: read their tickets in one round trip and send only the
        // candidates through the version-checked delete.
        let tickets = sink.tickets(&keys).await?;
        let writes: Vec<Write> = keys
            .into_iter()
            .zip(tickets)
            .filter(|(_, ticket)| match ticket {
                Some(ticket) => *ticket < start_ticket,
                None => !may_evict,
            })
            .map(|(key, _)| Write::Delete { key })
            .collect();
        for result in sink.write(start_ticket, &writes).await? {
            if matches!(result, WriteResult::Deleted | WriteResult::DeletedUnchecked) {
                deleted += 1;
            }
        }
    }
    Ok(deleted)
}
