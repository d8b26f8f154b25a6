//! The sweeps a listener runs on its own: periodically, when Redis has lost its data, when a deploy
//! changed a fragment's markup, when a watched table was truncated, and when PostgreSQL restarted.
//!
//! Each fragment has a marker in Redis (see `store::markers`) holding the fragment version of its last
//! complete sweep. Every second the listener reads the markers: a missing marker means Redis came
//! back empty or was never filled; an older version means this binary renders differently from what
//! Redis holds. Either way the fragment is swept. Only one listener at a time sweeps: the one holding
//! a PostgreSQL advisory lock (`lock`). A sweep that cannot complete is tried again after a backoff
//! (`schedule`); a PostgreSQL restart moves the render tickets ahead and sweeps everything
//! (`restarts`).

mod lock;
mod restarts;
mod schedule;

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::shared::Shared;
use super::stand_aside;
use crate::Error;
use crate::fragment::{DynFragment, Fragments};
use crate::store::{Eviction, RedisStore};
use crate::sweep::{self, SweepReport, Truncations};
use lock::SweepLock;
use restarts::PostgresRestarts;
use schedule::SweepSchedule;

/// How often the markers are read. One GET per fragment: negligible, and it bounds how long Redis
/// may sit empty before the sweep starts.
const MARKER_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How often Redis's memory policy is read again (it can be changed at run time).
const EVICTION_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// Why sweeps are due this round: the fragments, and the reason for the log and metrics.
struct Due {
    fragments: Vec<Arc<dyn DynFragment>>,
    reason: &'static str,
    label: &'static str,
    periodic: bool,
    /// The sweep covers a PostgreSQL restart.
    restart: bool,
}

/// Runs until shutdown; never fails (a sweep that fails is logged and tried again after a backoff).
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut maintenance = Maintenance {
        schedule: SweepSchedule::new(shared.settings.sweep_interval, Instant::now()),
        shared,
        lock: SweepLock::default(),
        at_startup: true,
        eviction_checked: None,
        restarts: PostgresRestarts::default(),
    };
    loop {
        maintenance.round().await;
        tokio::select! {
            _ = maintenance.shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(MARKER_CHECK_INTERVAL) => {}
        }
    }
}

/// The maintenance task's state between rounds.
struct Maintenance {
    shared: Arc<Shared>,
    schedule: SweepSchedule,
    lock: SweepLock,
    /// Markers have not been read yet (or the listener just stopped standing aside): a newer marker
    /// is a rollback to older markup then, and is swept back too.
    at_startup: bool,
    eviction_checked: Option<Instant>,
    restarts: PostgresRestarts,
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
        self.restarts.check(&self.shared.db).await;
        if self.shared.stand_aside.take_resumed() {
            // Back from standing aside: the newer listener may have left its markup behind.
            self.at_startup = true;
        }
        if self.shared.stand_aside.active() || !self.schedule.may_sweep(Instant::now()) {
            return;
        }
        let truncated = Truncations::read(&self.shared.db, &self.shared.fragments)
            .await
            .unwrap_or_else(|error| {
                tracing::debug!(%error, "cannot read pgfresh.truncations");
                Truncations::default()
            });
        if let Some(due) = self.due(&truncated).await {
            let outcome = self.sweep_due(&due, &truncated).await;
            self.note(&due, outcome);
        }
    }

    /// Reads Redis's memory policy again, and tells metrics and the status page.
    async fn check_eviction(&self) {
        let (eviction, policy) = self.shared.store.check_eviction().await;
        crate::ops::telemetry::redis_eviction(eviction != Eviction::Impossible);
        let description = eviction.describe(&policy);
        self.shared.board.redis_eviction(description, eviction);
    }

    /// What is due now: everything after a restart or when the periodic sweep is due, else the
    /// fragments whose marker is missing or outdated; plus those of truncated topics.
    async fn due(&mut self, truncated: &Truncations) -> Option<Due> {
        let fragments = &self.shared.fragments;
        let periodic = self.schedule.periodic_due(Instant::now());
        let restart = self.restarts.sweep_due();
        let mut due: Vec<Arc<dyn DynFragment>> = if periodic || restart {
            fragments.iter().cloned().collect()
        } else {
            match needing_sweep(&self.shared.store, fragments, self.at_startup).await {
                Ok(due) => {
                    self.at_startup = false;
                    due
                }
                Err(error) => {
                    tracing::debug!(%error, "cannot read fragment markers");
                    Vec::new()
                }
            }
        };
        let marker = !due.is_empty();
        for fragment in &truncated.fragments {
            if !due.iter().any(|f| f.name() == fragment.name()) {
                due.push(fragment.clone());
            }
        }
        let (reason, label) = match (restart, periodic, marker) {
            (true, _, _) => ("PostgreSQL restarted", "restart"),
            (_, true, _) => ("periodic", "periodic"),
            (_, _, true) => ("missing or outdated in Redis", "marker"),
            _ => ("a watched table was truncated", "truncate"),
        };
        (!due.is_empty()).then_some(Due {
            fragments: due,
            reason,
            label,
            periodic,
            restart,
        })
    }

    /// Sweeps what is due if this listener holds the sweep lock, and settles the TRUNCATEs it
    /// covered. Returns whether the sweep completed, or `None` if another listener sweeps.
    async fn sweep_due(&mut self, due: &Due, truncated: &Truncations) -> Option<bool> {
        let shared = &self.shared;
        stand_aside::wait_for_older(&shared.db, &shared.me, &shared.shutdown).await;
        let report = match self.lock.try_acquire(&shared.db).await {
            Ok(false) => {
                tracing::debug!("another listener is sweeping");
                return None;
            }
            Ok(true) => {
                let report = sweep::sweep_these(
                    &shared.db,
                    &shared.store,
                    &due.fragments,
                    truncated,
                    &shared.settings.sweep,
                    &shared.shutdown,
                    &sweep::Silent,
                )
                .await;
                self.lock.release().await;
                report
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
        let repaired = report.stats.written + report.orphans_deleted;
        crate::ops::telemetry::swept(due.label, repaired);
        board.swept(due.label, report.to_string(), report.succeeded());
        report.completed() || report.interrupted
    }

    /// Moves the schedule on after a sweep: done (here or by another listener), or to be tried
    /// again after a backoff.
    fn note(&mut self, due: &Due, outcome: Option<bool>) {
        let now = Instant::now();
        match outcome {
            Some(true) => {
                self.restarts.swept(due.restart);
                self.schedule.succeeded(due.periodic, now);
            }
            Some(false) => {
                let wait = self.schedule.failed(now);
                tracing::warn!(retry_in = ?wait, "the sweep could not complete; it will be tried again");
            }
            None => {
                // Another listener sweeps: a restart and the periodic sweep are covered by it.
                self.restarts.swept(due.restart);
                self.schedule.another_swept(due.periodic, now);
            }
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

fn log_report(reason: &str, swept: &[Arc<dyn DynFragment>], report: &SweepReport) {
    let names: Vec<&str> = swept.iter().map(|f| f.name()).collect();
    let fragments = names.join(", ");
    // Stopping in the middle of a sweep is what shutdown asks for, not a problem.
    if report.succeeded() || report.interrupted {
        tracing::info!(%fragments, reason, "{report}");
    } else {
        tracing::warn!(%fragments, reason, "{report}");
    }
}
