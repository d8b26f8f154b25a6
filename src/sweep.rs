//! The full sweep: re-renders every key of every fragment and deletes entries whose row is gone.
//!
//! Keys are enumerated with keyset pagination (bounded memory whatever the table size) and each page goes
//! through the same load/render/write path as the listener, several pages at a time. Orphans are found
//! without remembering any key: the sweep takes a render ticket before it starts, so afterwards every
//! entry under the fragment's prefix whose ticket is still older was neither rendered by this sweep nor
//! by a listener since, and so has no row. Deleting it is one more version-checked write.

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
    /// Shutdown stopped the sweep before it finished.
    pub interrupted: bool,
}

impl SweepReport {
    /// True when every key was refreshed and the sweep ran to the end.
    pub fn succeeded(&self) -> bool {
        self.stats.errors == 0 && !self.interrupted
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
    let pager = db.get().await?;
    let start_ticket = take_ticket(&pager).await?;
    let total = fragment.count_keys(&pager).await?;
    let variants = fragment.variants().len() as u64;
    progress.fragment_started(
        fragment.name(),
        total.map(|keys| keys.max(0) as u64 * variants),
    );
    let errors_before = report.stats.errors;
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
    // An entry whose render failed here would look like an orphan: only delete when all went well.
    if report.stats.errors == errors_before && !report.interrupted {
        report.orphans_deleted += delete_orphans(sink, fragment.key_prefix(), start_ticket).await?;
    }
    Ok(())
}

/// Refreshes one page of keys under a ticket of its own; counts a failed page as errors.
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
        tracing::warn!(fragment = fragment.name(), key = %keys[*index], error = %reason, "sweep could not refresh a key");
    }
    Ok(refreshed.stats)
}

/// A sweep page's result: its counts, or how many keys failed and why.
type PageResult = Result<RefreshStats, (u64, String)>;

/// Adds a finished page to the report.
fn collect(
    joined: Option<Result<PageResult, tokio::task::JoinError>>,
    report: &mut SweepReport,
    progress: &dyn Progress,
) {
    match joined {
        None => {}
        Some(Ok(Ok(stats))) => {
            progress.advanced(stats.rendered + stats.errors);
            report.stats += stats;
        }
        Some(Ok(Err((keys, error)))) => {
            progress.advanced(keys);
            report.stats.errors += keys;
            report.first_error.get_or_insert(error);
        }
        Some(Err(join_error)) => {
            report.stats.errors += 1;
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
    while let Some(keys) = scan.next_page().await? {
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
            if result == WriteResult::Deleted {
                deleted += 1;
            }
        }
    }
    Ok(deleted)
}
