//! Sweeps a listener runs on its own: periodically, when Redis has lost its data, when a deploy
//! changed a fragment's markup, and when a watched table was truncated.
//!
//! Each fragment has a marker in Redis, `pgfresh:fragment:<key prefix>` (one per master in a cluster,
//! see [`crate::keys`]), holding the fragment version of its last complete sweep. Every second the
//! listener reads the markers: a missing marker means Redis came back empty (restart without
//! persistence, FLUSHALL, failover to an empty replica) or was never filled; an older version means
//! this binary renders differently from what Redis holds. Either way the fragment is swept, and the
//! marker set once the sweep has succeeded. Only one listener at a time sweeps: the one holding a
//! PostgreSQL advisory lock on a dedicated session, released with it if the process dies. A TRUNCATE of
//! a watched table leaves a row in `pgfresh.truncations`, read every second too: the fragments of its
//! topic are swept, and the row deleted once the sweep has succeeded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::Error;
use crate::backoff::Backoff;
use crate::config::SweepSettings;
use crate::db::Database;
use crate::deploy::StandAside;
use crate::fragment::{DynFragment, Fragments};
use crate::queue::ListenerIdentity;
use crate::shutdown::Shutdown;
use crate::sink::RedisSink;
use crate::status::StatusBoard;
use crate::sweep::{self, SweepReport};

/// The advisory lock key held by the listener that sweeps ("pgfresh" in ASCII).
const SWEEP_LOCK: i64 = 0x0070_6766_7265_7368;

/// How often the markers are read. One GET per fragment: negligible, and it bounds how long Redis
/// may sit empty before the sweep starts.
const MARKER_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How often Redis's memory policy is read again (it can be changed at run time).
const EVICTION_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// First and longest wait after a sweep that could not complete, before any sweep is tried again.
const SWEEP_RETRY_FIRST: Duration = Duration::from_secs(1);
const SWEEP_RETRY_MAX: Duration = Duration::from_secs(300);

/// What the maintenance loop works with: the running listener's connections, fragments and state.
pub struct Maintainer {
    /// Where fragments are loaded from and the sweep lock is held.
    pub db: Database,
    /// Where fragments are written and markers read.
    pub sink: RedisSink,
    /// The fragments to keep swept.
    pub fragments: Fragments,
    /// The listener, as registered: a sweep waits for older versions to stand aside.
    pub me: ListenerIdentity,
    /// Whether it stands aside for a newer listener: then it sweeps nothing.
    pub stand_aside: Arc<StandAside>,
    /// Where sweep results are shown.
    pub board: Arc<StatusBoard>,
}

/// When sweeps are due: the periodic one, and after a sweep that could not complete, not before a
/// backoff has passed (a sweep that keeps failing must not repeat back to back).
pub(crate) struct SweepSchedule {
    interval: Option<Duration>,
    next_periodic: Option<Instant>,
    retry: Backoff,
    not_before: Option<Instant>,
}

impl SweepSchedule {
    pub(crate) fn new(interval: Option<Duration>, now: Instant) -> Self {
        Self {
            interval,
            next_periodic: interval.and_then(|interval| now.checked_add(interval)),
            retry: Backoff::new(SWEEP_RETRY_FIRST, SWEEP_RETRY_MAX),
            not_before: None,
        }
    }

    /// Whether a sweep may be tried now (no backoff pending).
    pub(crate) fn may_sweep(&self, now: Instant) -> bool {
        self.not_before.is_none_or(|at| now >= at)
    }

    /// Whether the periodic sweep is due.
    pub(crate) fn periodic_due(&self, now: Instant) -> bool {
        self.next_periodic.is_some_and(|at| now >= at)
    }

    /// A sweep completed: no backoff; the next periodic one is an interval away if this was it.
    pub(crate) fn succeeded(&mut self, was_periodic: bool, now: Instant) {
        self.retry.reset();
        self.not_before = None;
        if was_periodic {
            self.next_periodic = self.interval.and_then(|interval| now.checked_add(interval));
        }
    }

    /// Another listener holds the sweep lock and sweeps: if the periodic sweep was due, it is done for
    /// this interval (every listener sweeping in turn would multiply the work by their number).
    pub(crate) fn another_swept(&mut self, was_periodic: bool, now: Instant) {
        if was_periodic {
            self.next_periodic = self.interval.and_then(|interval| now.checked_add(interval));
        }
    }

    /// A sweep could not complete: whatever made it due is still due, after a growing backoff.
    /// Returns the wait.
    pub(crate) fn failed(&mut self, now: Instant) -> Duration {
        let wait = self.retry.next_delay();
        self.not_before = Some(now + wait);
        wait
    }
}

/// Why sweeps are due this round: the fragments, and the reason for the log and metrics.
struct Due {
    fragments: Vec<Arc<dyn DynFragment>>,
    reason: &'static str,
    label: &'static str,
    periodic: bool,
    /// The sweep covers a PostgreSQL restart.
    restart: bool,
}

/// Notices that PostgreSQL restarted (its postmaster start time changed), which may have lost
/// commits that were already rendered: a crash with `synchronous_commit = off` in any session (the
/// listener's own, or a writer's), or a failover to a replica that had not received them. Redis may
/// then hold renders of rows that no longer exist as rendered, and the render ticket sequence may
/// have gone back below tickets stored in Redis (its advances were among the lost WAL), which would
/// have Redis refuse every new render. So the sequence is moved far ahead, and everything swept.
#[derive(Default)]
pub(crate) struct PostgresRestarts {
    /// The postmaster start time last seen.
    started: Option<String>,
    /// A restart was seen and no sweep has covered it yet.
    sweep_due: bool,
}

/// How far the ticket sequence is moved after a restart: far more tickets than a crash can lose
/// (those taken since the last WAL flush, seconds of work), far fewer than a bigint holds.
const TICKET_JUMP: i64 = 1_000_000_000;

impl PostgresRestarts {
    async fn check(&mut self, db: &Database) {
        let started = match db.get().await {
            Ok(client) => client
                .query_one("SELECT pg_postmaster_start_time()::text", &[])
                .await
                .map(|row| row.get::<_, String>(0)),
            Err(_) => return,
        };
        let Ok(started) = started else { return };
        match &self.started {
            Some(known) if *known != started => {
                tracing::warn!(
                    "PostgreSQL restarted: commits lost in a crash or failover may have been rendered; moving render tickets ahead and sweeping"
                );
                if let Err(error) = jump_tickets(db).await {
                    tracing::warn!(%error, "cannot move render tickets ahead; renders may be refused until the sweep");
                }
                self.sweep_due = true;
            }
            _ => {}
        }
        self.started = Some(started);
    }

    fn swept(&mut self, covered: bool) {
        if covered {
            self.sweep_due = false;
        }
    }
}

async fn jump_tickets(db: &Database) -> Result<(), Error> {
    db.get()
        .await?
        .execute(
            "SELECT setval('pgfresh.render_tickets', nextval('pgfresh.render_tickets') + $1)",
            &[&TICKET_JUMP],
        )
        .await?;
    Ok(())
}

/// Runs until shutdown; never fails (a sweep that fails is logged and tried again after a backoff).
pub async fn run(
    maintainer: Maintainer,
    periodic: Option<Duration>,
    settings: SweepSettings,
    shutdown: Shutdown,
) {
    let mut schedule = SweepSchedule::new(periodic, Instant::now());
    let mut lock = SweepLock::default();
    let mut at_startup = true;
    let mut eviction_checked: Option<Instant> = None;
    let mut restarts = PostgresRestarts::default();
    loop {
        if eviction_checked.is_none_or(|at| at.elapsed() >= EVICTION_CHECK_INTERVAL) {
            check_eviction(&maintainer).await;
            eviction_checked = Some(Instant::now());
        }
        restarts.check(&maintainer.db).await;
        if maintainer.stand_aside.take_resumed() {
            // Back from standing aside: the newer listener may have left its markup behind.
            at_startup = true;
        }
        if !maintainer.stand_aside.active() && schedule.may_sweep(Instant::now()) {
            let truncated = match truncations(&maintainer.db, &maintainer.fragments).await {
                Ok(truncated) => truncated,
                Err(error) => {
                    tracing::debug!(%error, "cannot read pgfresh.truncations");
                    Truncations::default()
                }
            };
            let due = due(
                &maintainer,
                &schedule,
                &truncated,
                &mut at_startup,
                &restarts,
            )
            .await;
            if let Some(due) = due {
                let outcome = sweep_due(
                    &maintainer,
                    &mut lock,
                    &due,
                    &truncated,
                    &settings,
                    &shutdown,
                )
                .await;
                if outcome.is_some_and(|completed| completed) || outcome.is_none() {
                    // Swept here or by another listener: a restart is covered either way.
                    restarts.swept(due.restart);
                }
                match outcome {
                    Some(true) => schedule.succeeded(due.periodic, Instant::now()),
                    Some(false) => {
                        let wait = schedule.failed(Instant::now());
                        tracing::warn!(retry_in = ?wait, "the sweep could not complete; it will be tried again");
                    }
                    None => schedule.another_swept(due.periodic, Instant::now()),
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(MARKER_CHECK_INTERVAL) => {}
        }
    }
}

/// Reads Redis's memory policy again, and tells metrics and the status page.
async fn check_eviction(maintainer: &Maintainer) {
    let (eviction, policy) = maintainer.sink.check_eviction().await;
    crate::telemetry::redis_eviction(eviction != crate::sink::Eviction::Impossible);
    maintainer
        .board
        .redis_eviction(eviction.describe(&policy), eviction);
}

/// What is due now: the periodic sweep of everything, else the fragments whose marker is missing or
/// outdated, plus those of truncated topics.
async fn due(
    maintainer: &Maintainer,
    schedule: &SweepSchedule,
    truncated: &Truncations,
    at_startup: &mut bool,
    restarts: &PostgresRestarts,
) -> Option<Due> {
    let fragments = &maintainer.fragments;
    let periodic = schedule.periodic_due(Instant::now());
    let restart = restarts.sweep_due;
    let mut due: Vec<Arc<dyn DynFragment>> = if periodic || restart {
        fragments.iter().cloned().collect()
    } else {
        match fragments_needing_sweep(&maintainer.sink, fragments, *at_startup).await {
            Ok(due) => {
                *at_startup = false;
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
    let (reason, label) = if restart {
        ("PostgreSQL restarted", "restart")
    } else if periodic {
        ("periodic", "periodic")
    } else if marker {
        ("missing or outdated in Redis", "marker")
    } else {
        ("a watched table was truncated", "truncate")
    };
    (!due.is_empty()).then_some(Due {
        fragments: due,
        reason,
        label,
        periodic,
        restart,
    })
}

/// Sweeps what is due if this listener holds the sweep lock; settles the truncations it covered.
/// Returns whether the sweep completed, or `None` if another listener sweeps.
async fn sweep_due(
    maintainer: &Maintainer,
    lock: &mut SweepLock,
    due: &Due,
    truncated: &Truncations,
    settings: &SweepSettings,
    shutdown: &Shutdown,
) -> Option<bool> {
    let Maintainer {
        db,
        sink,
        me,
        board,
        ..
    } = maintainer;
    crate::deploy::wait_for_older(db, me, shutdown).await;
    let report = match lock.try_acquire(db).await {
        Ok(false) => {
            tracing::debug!("another listener is sweeping");
            return None;
        }
        Ok(true) => {
            let report =
                sweep::run_selected(db, sink, &due.fragments, settings, shutdown, &sweep::Silent)
                    .await;
            lock.release().await;
            report
        }
        Err(error) => Err(error),
    };
    let report = match report {
        Ok(report) => report,
        Err(error) => {
            tracing::warn!(%error, reason = due.reason, "sweep failed");
            board.swept(due.label, format!("failed: {error}"), false);
            return Some(false);
        }
    };
    log_report(due.reason, &due.fragments, &report);
    crate::telemetry::swept(due.label, report.stats.written + report.orphans_deleted);
    board.swept(due.label, report.to_string(), report.succeeded());
    let swept: Vec<&str> = due.fragments.iter().map(|f| f.name()).collect();
    let covered = truncated.covered_by(&swept);
    if report.completed()
        && !covered.is_empty()
        && let Err(error) = settle_truncations(db, &covered).await
    {
        tracing::warn!(%error, "cannot settle swept truncations; they will be swept again");
    }
    Some(report.completed() || report.interrupted)
}

/// The advisory lock that elects the one listener that sweeps, held on a session of its own that
/// lives as long as the listener (released with it if the process dies): a listener that is not
/// elected asks again every second on the same session instead of opening a new one each time.
#[derive(Default)]
struct SweepLock {
    session: Option<tokio_postgres::Client>,
}

impl SweepLock {
    async fn try_acquire(&mut self, db: &Database) -> Result<bool, Error> {
        if self
            .session
            .as_ref()
            .is_none_or(|session| session.is_closed())
        {
            self.session = Some(db.connect_dedicated("pgfresh sweep lock").await?);
        }
        let session = self.session.as_ref().expect("connected above");
        let elected = session
            .query_one("SELECT pg_try_advisory_lock($1)", &[&SWEEP_LOCK])
            .await;
        match elected {
            Ok(row) => Ok(row.get(0)),
            Err(error) => {
                self.session = None;
                Err(error.into())
            }
        }
    }

    async fn release(&mut self) {
        let Some(session) = &self.session else {
            return;
        };
        if session
            .execute("SELECT pg_advisory_unlock($1)", &[&SWEEP_LOCK])
            .await
            .is_err()
        {
            // A session that cannot unlock may still hold the lock: drop it, which releases it.
            self.session = None;
        }
    }
}

/// TRUNCATEs of watched tables waiting for a sweep (see `sql/migrations/0002_truncate.sql`): the rows
/// and the fragments that subscribe to their topics. Rows of topics no fragment here handles are left
/// for a binary that does.
#[derive(Default)]
pub(crate) struct Truncations {
    /// Each recorded TRUNCATE: its id, and the fragments that subscribe to its topic.
    rows: Vec<(i64, Vec<String>)>,
    /// Every fragment that subscribes to a truncated topic.
    pub(crate) fragments: Vec<Arc<dyn DynFragment>>,
}

impl Truncations {
    /// The TRUNCATEs that a successful sweep of the fragments named `swept` covers.
    pub(crate) fn covered_by(&self, swept: &[&str]) -> Vec<i64> {
        self.rows
            .iter()
            .filter(|(_, subscribers)| subscribers.iter().all(|s| swept.contains(&s.as_str())))
            .map(|(id, _)| *id)
            .collect()
    }
}

pub(crate) async fn truncations(
    db: &Database,
    fragments: &Fragments,
) -> Result<Truncations, Error> {
    let rows = db
        .get()
        .await?
        .query("SELECT id, topic FROM pgfresh.truncations", &[])
        .await?;
    let mut truncated = Truncations::default();
    for row in rows {
        let topic: &str = row.get(1);
        let subscribers: Vec<_> = fragments
            .iter()
            .filter(|f| f.topics().contains(&topic))
            .collect();
        if subscribers.is_empty() {
            continue;
        }
        let names = subscribers.iter().map(|f| f.name().to_string()).collect();
        truncated.rows.push((row.get(0), names));
        for fragment in subscribers {
            if !truncated
                .fragments
                .iter()
                .any(|f| f.name() == fragment.name())
            {
                truncated.fragments.push(fragment.clone());
            }
        }
    }
    Ok(truncated)
}

/// Deletes exactly the truncations a sweep covered: one committed meanwhile keeps its row.
pub(crate) async fn settle_truncations(db: &Database, ids: &[i64]) -> Result<(), Error> {
    db.get()
        .await?
        .execute(
            "DELETE FROM pgfresh.truncations WHERE id = ANY($1)",
            &[&ids],
        )
        .await?;
    Ok(())
}

/// Fragments whose marker is missing or older than this binary's version. At start-up a newer marker
/// counts too: that is a rollback to older markup.
async fn fragments_needing_sweep(
    sink: &RedisSink,
    fragments: &Fragments,
    at_startup: bool,
) -> Result<Vec<Arc<dyn DynFragment>>, Error> {
    let mut due = Vec::new();
    for fragment in fragments.iter() {
        let markers = sink.fragment_markers(fragment.key_prefix()).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_that_cannot_complete_is_retried_after_a_growing_wait() {
        let start = Instant::now();
        let mut schedule = SweepSchedule::new(Some(Duration::from_secs(3600)), start);
        assert!(schedule.may_sweep(start) && !schedule.periodic_due(start));
        let later = start + Duration::from_secs(3600);
        assert!(schedule.periodic_due(later));

        let first = schedule.failed(later);
        assert!(!schedule.may_sweep(later), "not back to back");
        assert!(schedule.may_sweep(later + first));
        assert!(
            schedule.periodic_due(later + first),
            "a failed periodic sweep is still due, not an interval away"
        );
        let waits: Vec<Duration> = (0..12).map(|_| schedule.failed(later)).collect();
        assert!(
            waits.last().unwrap() > &Duration::from_secs(60),
            "{waits:?}"
        );
        assert!(waits.iter().all(|wait| *wait <= SWEEP_RETRY_MAX));

        schedule.succeeded(true, later);
        assert!(schedule.may_sweep(later));
        assert!(!schedule.periodic_due(later + Duration::from_secs(1)));
        assert!(schedule.periodic_due(later + Duration::from_secs(3600)));
    }

    #[test]
    fn a_periodic_sweep_another_listener_runs_is_not_run_again_here() {
        let start = Instant::now();
        let interval = Duration::from_secs(60);
        let mut schedule = SweepSchedule::new(Some(interval), start);
        let due = start + interval;
        assert!(schedule.periodic_due(due));
        schedule.another_swept(true, due);
        assert!(!schedule.periodic_due(due + Duration::from_secs(1)));
        assert!(schedule.periodic_due(due + interval));
    }

    #[test]
    fn an_interval_past_the_end_of_time_never_comes_instead_of_panicking() {
        let start = Instant::now();
        let schedule = SweepSchedule::new(Some(Duration::from_secs(u64::MAX)), start);
        assert!(!schedule.periodic_due(start + Duration::from_secs(1_000_000)));
    }
}
