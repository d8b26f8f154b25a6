//! The full sweep: re-renders every key of every fragment and deletes entries whose row is gone.
//!
//! Keys are enumerated with keyset pagination (bounded memory whatever the table size) and each page goes
//! through the same load/render/write path as the listener, several pages at a time. Orphans are found
//! without remembering what the sweep wrote: the sweep takes a render ticket before it starts, so
//! afterwards every entry under the fragment's prefix whose ticket is still older was neither rendered
//! by this sweep nor by a listener since, and so has no row. Deleting it is one more ticket-checked
//! write, once a scan of the keyspace after the last page has found it. A sweep that began with no
//! entry under the prefix (into an empty Redis) has none to find, but for a corner `orphans` names.
//!
//! A key that fails (its render panics, its loader errs, Redis refuses it) does not hold the sweep
//! back: it is handed to the queue as a failed change, retried with backoff and parked like any other,
//! and the sweep completes. A complete sweep of a fragment sets its marker in Redis (see
//! `store::markers`), whoever ran it: a listener, or the one-off `sweep` command.
//!
//! - `page`: one page of keys, through the shared refresh path, failures queued.
//! - `orphans`: the pass that deletes entries whose row is gone.
//! - `truncations`: which recorded TRUNCATEs a sweep covers.
//! - `progress`: the `sweep` command's progress bar, or a line every few seconds.

mod orphans;
mod page;
pub(crate) mod progress;
mod truncations;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::Error;
use crate::config::SweepSettings;
use crate::fragment::UserClient;
use crate::fragment::{DynFragment, Fragments};
use crate::pg::Database;
use crate::pg::queue::take_ticket_at;
use crate::pg::sweeps::{SweptFragment, note_epoch, record};
use crate::shutdown::Shutdown;
use crate::stats::RefreshStats;
use crate::store::RedisStore;
use page::{LookUp, collect};

pub(crate) use truncations::Truncations;

/// What a sweep did.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
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
    /// FLUSHALL, an evicted canary; their early pages may be gone), or a sweep of another version
    /// started meanwhile (it may have written over this one's): the sweep is incomplete.
    pub markers_lost: u64,
    /// Fragments that could not be swept at all: their keys could not be listed (the pager's query
    /// failed), or PostgreSQL or Redis failed between pages. The others were swept all the same;
    /// the first error is in [`SweepReport::first_error`].
    pub fragments_failed: u64,
    /// Shutdown stopped the sweep before it finished.
    pub interrupted: bool,
    /// Keys it repaired (wrote or deleted entries of) with no change of theirs waiting in the
    /// queue: what changed without a watch saying so, unless the listener was down or Redis lost
    /// data. Counted by periodic sweeps only; 0 for the others (after an outage, a deploy, a
    /// `TRUNCATE`, a one-off sweep), which do not look their repairs up in the queue.
    pub unexplained: u64,
    /// Fragments whose repairs no watch explains, and how many: those of [`SweepReport::unexplained`]
    /// made by a periodic sweep of a listener that ran since the fragment's previous complete
    /// sweep, with no crash in between. Some table its loader reads is not watched (`doctor` says
    /// which).
    pub unwatched_changes: Vec<(String, u64)>,
}

impl SweepReport {
    /// True when every key was refreshed and the sweep ran to the end.
    pub fn succeeded(&self) -> bool {
        self.stats.errors == 0 && self.completed()
    }

    /// True when the sweep ran to the end and every key was either refreshed or handed to the queue:
    /// markers were set and orphans deleted.
    pub fn completed(&self) -> bool {
        self.pages_failed == 0
            && self.markers_lost == 0
            && self.fragments_failed == 0
            && !self.interrupted
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
        if self.pages_failed > 0 {
            write!(f, "; {} pages failed", self.pages_failed)?;
        }
        if self.fragments_failed > 0 {
            write!(
                f,
                "; {} fragments could not be swept",
                self.fragments_failed
            )?;
        }
        if self.markers_lost > 0 {
            write!(
                f,
                "; {} fragments not marked swept (Redis lost data, or a sweep of another version started, meanwhile)",
                self.markers_lost
            )?;
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
pub(crate) struct Silent;

impl Progress for Silent {}

/// Sweeps every one of `fragments`: renders every key, writes what changed, deletes entries whose row
/// is gone, queues keys that fail, marks each fragment complete in Redis, records it in
/// `pgfresh.sweeps`, and settles the TRUNCATEs of watched tables (recorded before it started) that it
/// covered. Fails only when PostgreSQL cannot be reached as it starts; everything else is in the
/// report (a fragment whose keys cannot be listed fails alone, and the others are swept).
pub async fn sweep(
    db: &Database,
    store: &RedisStore,
    fragments: &Fragments,
    settings: &SweepSettings,
    shutdown: &Shutdown,
) -> Result<SweepReport, Error> {
    sweep_with_progress(db, store, fragments, settings, shutdown, &Silent).await
}

/// Like [`sweep`], telling `progress` how it advances.
pub async fn sweep_with_progress(
    db: &Database,
    store: &RedisStore,
    fragments: &Fragments,
    settings: &SweepSettings,
    shutdown: &Shutdown,
    progress: &dyn Progress,
) -> Result<SweepReport, Error> {
    fragments.validate()?;
    settings.validate()?;
    // Read before sweeping: the sweep covers the TRUNCATEs recorded so far.
    let truncated = Truncations::read(db, fragments).await?;
    let all: Vec<Swept> = fragments
        .iter()
        .map(|fragment| (fragment.clone(), ONE_OFF))
        .collect();
    let sweeper = Sweeper {
        db,
        store,
        settings,
        shutdown,
        progress,
    };
    sweeper.sweep(&all, &truncated, ONE_OFF).await
}

/// Why a sweep that no listener ran ran, and who ran it, as `pgfresh.sweeps` records them.
const ONE_OFF: &str = "one-off";

/// A fragment to sweep, and why (`periodic`, `marker`, `restart`, `truncate`, `one-off`), as
/// recorded in `pgfresh.sweeps`.
pub(crate) type Swept = (Arc<dyn DynFragment>, &'static str);

/// What every part of one sweep works with.
pub(crate) struct Sweeper<'a> {
    pub(crate) db: &'a Database,
    pub(crate) store: &'a RedisStore,
    pub(crate) settings: &'a SweepSettings,
    pub(crate) shutdown: &'a Shutdown,
    pub(crate) progress: &'a dyn Progress,
}

impl Sweeper<'_> {
    /// Sweeps these fragments, one after the other, recording each complete one as swept by
    /// `swept_by`; once all of them completed, settles the `truncated` tables (read before the
    /// sweep) that they cover.
    pub(crate) async fn sweep(
        &self,
        selected: &[Swept],
        truncated: &Truncations,
        swept_by: &str,
    ) -> Result<SweepReport, Error> {
        let started = Instant::now();
        // A crash or a failover not noted yet: move tickets ahead before rendering anything.
        note_epoch(&*self.db.pinned().await?).await?;
        let mut report = SweepReport::default();
        for (fragment, reason) in selected {
            let before = report.clone();
            // Only a periodic sweep's repairs can be a finding (see `pg::sweeps::record`), so only
            // it looks each repaired key up in the queue: a read of the whole queue per page, which
            // after an outage, when the other sweeps run, may hold a backlog.
            let look_up = match *reason {
                "periodic" => LookUp::Repairs,
                _ => LookUp::Nothing,
            };
            // A fragment that cannot be swept (its pager's query fails, PostgreSQL or Redis went
            // away) fails alone: the fragments after it are swept all the same, and it stays due.
            let started_at = match self.sweep_fragment(fragment, look_up, &mut report).await {
                Ok(started_at) => started_at,
                Err(error) => {
                    tracing::warn!(fragment = fragment.name(), %error, "cannot sweep the fragment");
                    report.fragments_failed += 1;
                    let error = format!("{}: {error}", fragment.name());
                    report.first_error.get_or_insert(error);
                    continue;
                }
            };
            if report.interrupted {
                break;
            }
            // Complete if none of its own pages failed and its marker was set: another
            // fragment's incomplete sweep does not make this one incomplete.
            let complete = report.pages_failed == before.pages_failed
                && report.markers_lost == before.markers_lost;
            if complete {
                let swept = SweptFragment {
                    fragment: fragment.name(),
                    reason,
                    swept_by,
                    started_at,
                    rewritten: report.stats.written - before.stats.written,
                    deleted: report.stats.deleted + report.orphans_deleted
                        - before.stats.deleted
                        - before.orphans_deleted,
                    unexplained: report.unexplained + report.orphans_deleted
                        - before.unexplained
                        - before.orphans_deleted,
                };
                if self.record(&swept).await {
                    let found = (fragment.name().to_string(), swept.unexplained);
                    report.unwatched_changes.push(found);
                }
            }
        }
        if report.completed() {
            let swept: Vec<&str> = selected.iter().map(|(f, _)| f.name()).collect();
            truncated.settle(self.db, &swept).await?;
        }
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Records a complete sweep of a fragment; returns whether its repairs are a finding (see
    /// `pg::sweeps::record`). One that cannot be recorded is logged, not failed.
    async fn record(&self, swept: &SweptFragment<'_>) -> bool {
        let recorded = match self.db.pinned().await {
            Ok(client) => record(&client, swept).await,
            Err(error) => Err(error),
        };
        recorded.unwrap_or_else(|error| {
            tracing::warn!(%error, fragment = swept.fragment, "cannot record the sweep in pgfresh.sweeps");
            false
        })
    }

    /// Sweeps one fragment, adding to `report`; returns when it started, on PostgreSQL's clock.
    /// Fails when its keys cannot be listed, or PostgreSQL or Redis fails between pages.
    async fn sweep_fragment(
        &self,
        fragment: &Arc<dyn DynFragment>,
        look_up: LookUp,
        report: &mut SweepReport,
    ) -> Result<f64, Error> {
        let (store, prefix) = (self.store, fragment.key_prefix());
        let canary = store.start_sweep(prefix, fragment.version()).await?;
        let (start_ticket, started_at) = take_ticket_at(&*self.db.pinned().await?).await?;
        let empty = orphans::none_under(store, prefix).await?;
        let incomplete_before = report.pages_failed;
        let keep = self.render_pages(fragment, look_up, report).await?;
        // Entries of keys in a page that failed as a whole would look like orphans, and the marker
        // would claim what is not true: both wait for a complete sweep.
        if report.pages_failed != incomplete_before || report.interrupted {
            return Ok(started_at);
        }
        if !empty {
            report.orphans_deleted +=
                orphans::delete_orphans(store, prefix, start_ticket, &keep).await?;
        }
        if !store
            .finish_sweep(prefix, &canary, fragment.version())
            .await?
        {
            tracing::warn!(
                fragment = fragment.name(),
                "Redis lost its data during the sweep, or a sweep of another version started meanwhile; the fragment will be swept again"
            );
            report.markers_lost += 1;
        }
        Ok(started_at)
    }

    /// Pages through the fragment's keys in key order and renders each page,
    /// `settings.concurrency` at a time; returns the keys that exist, whose entries the orphan pass
    /// keeps.
    async fn render_pages(
        &self,
        fragment: &Arc<dyn DynFragment>,
        look_up: LookUp,
        report: &mut SweepReport,
    ) -> Result<orphans::Kept, Error> {
        let (settings, progress) = (self.settings, self.progress);
        // Keys listed on the standby, when one was given, only once it has replayed what the
        // primary had written after the fragment's start ticket: a key it did not list would have
        // its entry deleted as an orphan.
        let session = self.db.loads(&*self.db.pinned().await?).await?;
        let pager = UserClient::of(self.db, &session).await?;
        // Only the progress bar needs the count: a count that fails leaves it without a total.
        let total = fragment.count_keys(pager).await.unwrap_or_else(|error| {
            tracing::warn!(fragment = fragment.name(), error = %Error::from(error), "cannot count keys");
            None
        });
        let variants = fragment.variants().len() as u64;
        progress.fragment_started(
            fragment.name(),
            total.map(|keys| keys.max(0) as u64 * variants),
        );
        let mut keep = orphans::Kept::default();
        let held_lately = Arc::new(page::HeldLately::new());
        let mut pages = JoinSet::new();
        let mut after: Option<String> = None;
        loop {
            if self.shutdown.is_cancelled() {
                report.interrupted = true;
                break;
            }
            let mut keys = fragment
                .keys_after(pager, after.as_deref(), settings.page_size)
                .await?;
            // A `keys_after` that ignores `after` and lists one key (a fragment of one entry)
            // ends there; one that lists more again, from where it began, is a bug said so. (With
            // pages of one key, a pager that lists the key it was given again cannot be told from
            // one stuck on its first key: said so too.)
            if let (Some(asked), [only]) = (&after, keys.as_slice())
                && asked == only
                && settings.page_size > 1
            {
                keys.clear();
            } else if let (Some(asked), Some(last)) = (&after, keys.last())
                && asked == last
            {
                return Err(Error::Fragment(format!(
                    "keys_after listed {asked:?} again, after itself: it must list only keys after the one it is given"
                )));
            }
            // Only an empty page ends the keys: `keys_after` gives *up to* a page, and one that
            // gives fewer before the end (a cap of its own, rows filtered after its `LIMIT`) would
            // otherwise end the sweep early, and its orphan pass delete every entry past that page.
            let last_page = keys.is_empty();
            after = keys.last().cloned();
            if !keys.is_empty() {
                while pages.len() >= settings.concurrency.max(1) {
                    collect(pages.join_next().await, report, &mut keep, progress);
                }
                let page = page::sweep_page(
                    self.db.clone(),
                    self.store.clone(),
                    fragment.clone(),
                    keys,
                    held_lately.clone(),
                    look_up,
                );
                pages.spawn(page);
            }
            if last_page {
                break;
            }
        }
        drop(session);
        while let Some(joined) = pages.join_next().await {
            collect(Some(joined), report, &mut keep, progress);
        }
        progress.fragment_finished(fragment.name());
        Ok(keep)
    }
}
