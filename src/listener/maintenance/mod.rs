//! The sweeps a listener runs on its own: periodically, when Redis has lost its data, when a deploy
//! changed a fragment's markup, when a watched table was truncated, and when PostgreSQL restarted.
//!
//! Each fragment has a marker in Redis (see `store::markers`) holding the fragment version of its last
//! complete sweep. Every second the listener reads the markers: a missing marker means Redis came
//! back empty or was never filled; an older version means this binary renders differently from what
//! Redis holds. Either way the fragment is swept. Before that it asks which servers answer: a Redis
//! restarted from a snapshot or failed over to a replica keeps its markers but may have lost writes,
//! and its markers are forgotten. Every complete sweep is recorded in
//! `pgfresh.sweeps`, whoever ran it: a fragment's periodic sweep is due an interval after its last
//! one, and after a PostgreSQL restart every fragment not swept since is due. Only one listener at a
//! time sweeps, the one holding the sweep lease (`lease`); a listener that finds it held takes
//! nothing for done, and looks again a second later. A sweep that cannot complete is tried again
//! after a backoff (`schedule`); a PostgreSQL restart also moves the render tickets ahead
//! (`restarts`).

mod lease;
mod restarts;
mod schedule;

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::shared::Shared;
use super::stand_aside;
use crate::Error;
use crate::fragment::{DynFragment, Fragments};
use crate::pg::sweeps::{SweptSoFar, swept_so_far};
use crate::store::{Eviction, RedisStore};
use crate::sweep::{self, SweepReport, Sweeper, Swept, Truncations};
use lease::SweepLease;
use schedule::SweepSchedule;

/// How often the markers are read. One GET per fragment: negligible, and it bounds how long Redis
/// may sit empty before the sweep starts.
const MARKER_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How often Redis's memory policy is read again (it can be changed at run time).
const EVICTION_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// The sweeps due this round: each fragment with why, and the reason for the log and metrics
/// (the most pressing of them).
struct Due {
    fragments: Vec<Swept>,
    reason: &'static str,
    label: &'static str,
}

/// Runs until shutdown; never fails (a sweep that fails is logged and tried again after a backoff).
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut maintenance = Maintenance {
        schedule: SweepSchedule::new(shared.settings.sweep_interval, Instant::now()),
        lease: SweepLease::new(shared.me.id.clone()),
        shared,
        at_startup: true,
        eviction_checked: None,
    };
    loop {
        maintenance.round().await;
        let shutdown = &maintenance.shared.shutdown;
        if !crate::shutdown::pause(shutdown, MARKER_CHECK_INTERVAL).await {
            return;
        }
    }
}

/// The maintenance task's state between rounds.
struct Maintenance {
    shared: Arc<Shared>,
    schedule: SweepSchedule,
    lease: SweepLease,
    /// Markers have not been read and swept after yet (since start-up, or since the listener
    /// stopped standing aside): a newer marker is a rollback to older markup then, and is swept back
    /// too.
    at_startup: bool,
    eviction_checked: Option<Instant>,
}

impl Maintenance {
    /// One round: look at Redis's memory policy and PostgreSQL's start time, then sweep what is due.
    async fn round(&mut self) {
        if self
            .eviction_checked
            .is_none_or(|at| at.elapsed() >= EVICTION_CHECK_INTERVAL)
        {
            self.check_eviction().await;
            self.eviction_checked = Some(Instant::now());
        }
        restarts::notice(&self.shared.db).await;
        if self.shared.stand_aside.take_resumed() {
            // Back from standing aside: the newer listener may have left its markup behind.
            self.at_startup = true;
        }
        if self.shared.stand_aside.active() {
            return;
        }
        self.notice_redis_restart().await;
        if !self.schedule.may_sweep(Instant::now()) {
            return;
        }
        let truncated = Truncations::read(&self.shared.db, &self.shared.fragments)
            .await
            .unwrap_or_else(|error| {
                tracing::debug!(%error, "cannot read pgfresh.truncations");
                Truncations::default()
            });
        let (due, markers_read) = self.due(&truncated).await;
        let done = match due {
            Some(due) => {
                let outcome = self.sweep_due(&due, &truncated).await;
                self.note(outcome);
                outcome == Some(true)
            }
            None => true,
        };
        // A newer marker is swept back only once: after a sweep that read it completed, not when
        // another listener held the lease (one that died in the middle of its sweep holds it
        // for a term) or the sweep failed.
        if done && markers_read {
            self.at_startup = false;
        }
    }

    /// Forgets the markers of the fragments whose servers changed since a listener last noted them
    /// in Redis (`store::markers`): a Redis restarted from its RDB or AOF file, or a replica that
    /// took over, may hold less than was written to it (the writes since its last save, or that
    /// had not reached it), and nothing else would tell. Noted in Redis itself, not here, so that a
    /// Redis restored from an older snapshot brings back the older note, whether or not this
    /// listener ran all along. The markers gone, the fragments are swept as after Redis lost its
    /// data. (A Redis that lost the note too, with its data, has lost its markers as well.)
    async fn notice_redis_restart(&self) {
        let store = &self.shared.store;
        let prefixes: Vec<&str> = self
            .shared
            .fragments
            .iter()
            .map(|f| f.key_prefix())
            .collect();
        let noticed = async {
            let now = store.servers().await?;
            let noted = store.noted_servers(&prefixes).await?;
            for (prefix, noted) in prefixes.iter().zip(noted) {
                match noted {
                    Some(noted) if noted == now => continue,
                    Some(noted) => {
                        tracing::warn!(
                            prefix,
                            before = %noted,
                            now = %now,
                            "Redis restarted or failed over: what it holds may be older than what was written to it; sweeping the fragment"
                        );
                        // Before the note: should this fail, the next round finds the change again.
                        store.forget_markers(prefix).await?;
                    }
                    None => {}
                }
                store.note_servers(prefix, &now).await?;
            }
            Ok::<_, Error>(())
        };
        if let Err(error) = noticed.await {
            tracing::debug!(%error, "cannot tell whether Redis restarted");
        }
    }

    /// Reads Redis's memory policy again, and tells metrics and the status page.
    async fn check_eviction(&self) {
        let (eviction, policy) = self.shared.store.check_eviction().await;
        crate::ops::telemetry::redis_eviction(eviction != Eviction::Impossible);
        let description = eviction.describe(&policy);
        self.shared.board.redis_eviction(description, eviction);
    }

    /// What is due now, fragment by fragment: those not swept since PostgreSQL crashed or failed
    /// over, those whose marker is missing or outdated, those whose periodic sweep is due, those of
    /// truncated topics; and whether the markers could be read.
    async fn due(&self, truncated: &Truncations) -> (Option<Due>, bool) {
        let fragments = &self.shared.fragments;
        let mut due: Vec<Swept> = Vec::new();
        let mut add = |fragment: &Arc<dyn DynFragment>, why: &'static str| {
            if !due.iter().any(|(f, _)| f.name() == fragment.name()) {
                due.push((fragment.clone(), why));
            }
        };
        // Each fragment is swept for the first of its reasons in this order. A missing or outdated
        // marker comes before a periodic sweep that is due too: such a sweep repairs what Redis
        // lost or what another version wrote, which is no finding, and needs no look at the queue.
        let so_far = self.swept_so_far().await;
        if let Some(so_far) = &so_far {
            for fragment in fragments.iter() {
                if so_far
                    .since_crash
                    .iter()
                    .any(|name| name == fragment.name())
                {
                    add(fragment, "restart");
                }
            }
        }
        let markers_read = match needing_sweep(&self.shared.store, fragments, self.at_startup).await
        {
            Ok(stale) => {
                stale.iter().for_each(|f| add(f, "marker"));
                true
            }
            Err(error) => {
                tracing::debug!(%error, "cannot read fragment markers");
                false
            }
        };
        if let Some(so_far) = &so_far {
            let now = Instant::now();
            for fragment in fragments.iter() {
                if self
                    .schedule
                    .periodic_due(so_far.last.get(fragment.name()), now)
                {
                    add(fragment, "periodic");
                }
            }
        }
        truncated.fragments.iter().for_each(|f| add(f, "truncate"));
        let Some(label) = ["restart", "marker", "periodic", "truncate"]
            .into_iter()
            .find(|label| due.iter().any(|(_, why)| why == label))
        else {
            return (None, markers_read);
        };
        let reason = match label {
            "restart" => "PostgreSQL crashed or failed over",
            "periodic" => "periodic",
            "marker" => "missing or outdated in Redis",
            _ => "a watched table was truncated",
        };
        let due = Due {
            fragments: due,
            reason,
            label,
        };
        (Some(due), markers_read)
    }

    /// What the sweeps record says of this listener's fragments; `None` when it cannot be read
    /// (nothing is taken for due, or for done, then).
    async fn swept_so_far(&self) -> Option<SweptSoFar> {
        let names: Vec<&str> = self.shared.fragments.iter().map(|f| f.name()).collect();
        let read = match self.shared.db.pinned().await {
            Ok(client) => swept_so_far(&client, &names).await,
            Err(error) => Err(error),
        };
        read.inspect_err(|error| tracing::debug!(%error, "cannot read pgfresh.sweeps"))
            .ok()
    }

    /// Sweeps what is due if this listener holds the sweep lease (the sweep settles the TRUNCATEs
    /// it covered). Returns whether the sweep completed, or `None` if another listener holds the
    /// lease: then nothing is taken for done, and the next round looks again.
    async fn sweep_due(&mut self, due: &Due, truncated: &Truncations) -> Option<bool> {
        let shared = &self.shared;
        let report = match self.lease.take(&shared.db).await {
            Ok(false) => {
                tracing::debug!("another listener holds the sweep lease");
                return None;
            }
            Ok(true) => {
                let work = async {
                    stand_aside::wait_for_older(&shared.db, &shared.me, &shared.shutdown).await;
                    let sweeper = Sweeper {
                        db: &shared.db,
                        store: &shared.store,
                        settings: &shared.settings.sweep,
                        shutdown: &shared.shutdown,
                        progress: &sweep::Silent,
                    };
                    sweeper
                        .sweep(&due.fragments, truncated, &shared.me.id)
                        .await
                };
                self.lease.hold_while(&shared.db, work).await
            }
            Err(error) => Err(error),
        };
        Some(self.report(due, report))
    }

    /// Logs, counts and shows a sweep's outcome. Returns whether the sweep completed (or was
    /// stopped by shutdown).
    fn report(&self, due: &Due, report: Result<SweepReport, Error>) -> bool {
        let board = &self.shared.board;
        let report = match report {
            Ok(report) => report,
            Err(error) => {
                tracing::warn!(%error, reason = due.reason, "sweep failed");
                board.swept(due.label, format!("failed: {error}"), false);
                return false;
            }
        };
        log_report(due.reason, &due.fragments, &report);
        for (fragment, keys) in &report.unwatched_changes {
            tracing::warn!(
                fragment,
                keys,
                "the periodic sweep repaired keys that no watch reported, although this listener ran all along: a table the fragment's loader reads is not watched; run doctor"
            );
            crate::ops::telemetry::unwatched(fragment, *keys);
            board.unwatched(fragment, *keys);
        }
        let repaired = report.stats.written + report.orphans_deleted;
        crate::ops::telemetry::swept(due.label, repaired);
        board.swept(due.label, report.to_string(), report.succeeded());
        report.completed() || report.interrupted
    }

    /// Moves the schedule on after a sweep: done, or to be tried again after a backoff. When
    /// another listener holds the lease, nothing changes.
    fn note(&mut self, outcome: Option<bool>) {
        match outcome {
            Some(true) => self.schedule.succeeded(),
            Some(false) => {
                let wait = self.schedule.failed(Instant::now());
                tracing::warn!(retry_in = ?wait, "the sweep could not complete; it will be tried again");
            }
            None => {}
        }
    }
}

/// Fragments whose marker is missing or older than this binary's version. At start-up a newer marker
/// counts too: that is a rollback to older markup.
async fn needing_sweep(
    store: &RedisStore,
    fragments: &Fragments,
    at_startup: bool,
) -> Result<Vec<Arc<dyn DynFragment>>, Error> {
    let mut due = Vec::new();
    for fragment in fragments.iter() {
        let markers = store.fragment_markers(fragment.key_prefix()).await?;
        let needed = markers.into_iter().any(|marker| match marker {
            None => true,
            Some(version) if version < fragment.version() => true,
            Some(version) => at_startup && version != fragment.version(),
        });
        if needed {
            due.push(fragment.clone());
        }
    }
    Ok(due)
}

fn log_report(reason: &str, swept: &[Swept], report: &SweepReport) {
    let names: Vec<&str> = swept.iter().map(|(f, _)| f.name()).collect();
    let fragments = names.join(", ");
    // Stopping in the middle of a sweep is what shutdown asks for, not a problem.
    if report.succeeded() || report.interrupted {
        tracing::info!(%fragments, reason, "{report}");
    } else {
        tracing::warn!(%fragments, reason, "{report}");
    }
}
