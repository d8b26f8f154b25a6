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
        self.pages_failed == 0 && !self.interrupted
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
                collect(pages.join_next().await, report, progress);
            }
            pages.spawn(sweep_page(db.clone(), sink.clone(), fragment.clone(), keys));
        }
        if last_page {
            break;
        }
    }
    drop(pager);
    while let Some(joined) = pages.join_next().await {
        collect(Some(joined), report, progress);
    }
    progress.fragment_finished(fragment.name());
    // Entries of keys in a page that failed as a whole would look like orphans, and the marker would
    // claim what is not true: both wait for a complete sweep.
    if report.pages_failed == incomplete_before && !report.interrupted {
        report.orphans_deleted += delete_orphans(sink, fragment.key_prefix(), start_ticket).await?;
        let prefix = fragment.key_prefix();
        if !sink
            .finish_sweep(prefix, &canary, fragment.version())
            .await?
        {
            tracing::warn!(
                fragment = fragment.name(),
                "Redis lost its data during the sweep; the fragment will be swept again"
            );
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
    let failed_page = |error: Error| (keys.len() as u64, error.to_string());
    let client = db.get().await.map_err(failed_page)?;
    let ticket = take_ticket(&client).await.map_err(failed_page)?;
    let refreshed = refresh(&client, &sink, fragment.as_ref(), &keys, ticket)
        .await
        .map_err(failed_page)?;
    if let Some((index, reason)) = refreshed.failed.first() {
        tracing::warn!(fragment = fragment.name(), key = %keys[*index], error = %reason, "sweep could not refresh a key; it is queued for retry");
    }
    let mut again: Vec<String> = Vec::new();
    let mut errors: Vec<Option<String>> = Vec::new();
    for (index, reason) in &refreshed.failed {
        again.push(keys[*index].clone());
        errors.push(Some(reason.clone()));
    }
    for index in &refreshed.unchecked {
        again.push(keys[*index].clone());
        errors.push(None);
    }
    let topic = fragment.topics()[0];
    crate::queue::requeue(&client, topic, &again, &errors)
        .await
        .map_err(failed_page)?;
    Ok(PageDone {
        stats: refreshed.stats,
        requeued: refreshed.failed.len() as u64,
        first_error: refreshed
            .failed
            .into_iter()
            .next()
            .map(|(_, reason)| reason),
    })
}

/// A sweep page that completed: its counts, and the failed keys it queued.
struct PageDone {
    stats: RefreshStats,
    requeued: u64,
    first_error: Option<String>,
}

/// A sweep page's result: what it did, or how many keys it could neither refresh nor queue, and why.
type PageResult = Result<PageDone, (u64, String)>;

/// Adds a finished page to the report.
fn collect(
    joined: Option<Result<PageResult, tokio::task::JoinError>>,
    report: &mut SweepReport,
    progress: &dyn Progress,
) {
    match joined {
        None => {}
        Some(Ok(Ok(page))) => {
            progress.advanced(page.stats.rendered + page.stats.errors);
            report.stats += page.stats;
            report.requeued += page.requeued;
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

/// Deletes every entry under `prefix` whose ticket is older than `start_ticket`; returns how many.
async fn delete_orphans(sink: &RedisSink, prefix: &str, start_ticket: i64) -> Result<u64, Error> {
    let mut deleted = 0;
    let mut scan = sink.scan_prefix(prefix).await?;
    while let Some(mut keys) = scan.next_page().await? {
        // A fragment's prefix never overlaps pgfresh's own keys (see `Fragments`); never delete those.
        keys.retain(|key| !key.starts_with(crate::keys::BOOKKEEPING_PREFIX));
        // Most entries were just rewritten: read their tickets in one round trip and send only the
        // candidates through the version-checked delete, which checks again atomically.
        let tickets = sink.tickets(&keys).await?;
        let writes: Vec<Write> = keys
            .into_iter()
            .zip(tickets)
            .filter(|(_, ticket)| *ticket < start_ticket)
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
