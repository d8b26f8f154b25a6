//! The drain loop: works through the queue whenever there may be work, until shutdown, one batch at
//! a time and up to `--workers` at once while claims come back full or a wake-up or poll comes
//! while a batch runs; switches between waiting for NOTIFYs (idle) and polling (busy) by the rate
//! of changes, as each batch ends; stands aside for a newer listener between drains.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinSet;

use super::floor::Waits;
use super::shared::Shared;
use crate::Error;
use crate::backoff::Backoff;
use crate::stats::RefreshStats;

/// Above this many changes per second the listener stops asking for NOTIFYs and polls instead. Every
/// notifying commit takes a cluster-wide lock; at this rate that costs writers little, while a listener
/// that kept notifications on under load was measured to cut 8-client write throughput to a fifth.
const BUSY_RATE: f64 = 300.0;

/// How often a busy listener looks at the queue: this bounds the latency it adds under load.
const BUSY_POLL: Duration = Duration::from_millis(20);

/// How long the queue must stay empty before a busy listener asks for NOTIFYs again.
const QUIET_BEFORE_IDLE: Duration = Duration::from_millis(100);

/// At or below this many changes per second, over a whole [`RATE_WINDOW`], a busy listener asks for
/// NOTIFYs again even though the queue is never quiet for long: at 100 changes a second it never is
/// for [`QUIET_BEFORE_IDLE`], and a listener that turned busy in a burst (or started busy) would
/// otherwise poll, adding about 10 ms to every change, for as long as that rate lasted. Half of
/// [`BUSY_RATE`], so that a rate near one threshold does not switch the listener at every batch.
const IDLE_RATE: f64 = BUSY_RATE / 2.0;

/// The window over which the change rate is measured.
const RATE_WINDOW: Duration = Duration::from_millis(200);

/// What one pass over the queue found.
#[derive(Default)]
struct Drained {
    stats: RefreshStats,
    changes: u64,
}

/// Drains the queue whenever there may be work, until shutdown.
///
/// While changes are rare the listener is *idle*: it has told the database so (triggers then NOTIFY)
/// and waits for a notification or the poll interval. When they arrive faster than [`BUSY_RATE`] it
/// turns *busy*: triggers stop notifying and the listener polls every [`BUSY_POLL`] until the queue
/// has been empty for [`QUIET_BEFORE_IDLE`].
pub(crate) async fn drain_loop(shared: &Arc<Shared>, wake: &Notify) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
    let mut failing_since: Option<Instant> = None;
    let mut pace = Pace::new();
    while !shared.shutdown.is_cancelled() {
        if stand_aside(shared).await {
            crate::shutdown::pause(&shared.shutdown, shared.settings.poll_interval).await;
            continue;
        }
        let drained_from = Instant::now();
        match drain(shared, wake, &mut pace).await {
            Ok(()) => {}
            Err(error) => {
                // PostgreSQL may have restarted, and handed out again ids claims had seen.
                shared.floor.forget();
                if failing_since.is_none() {
                    tracing::warn!(%error, "cannot process changes; they stay queued, retrying with backoff");
                    failing_since = Some(Instant::now());
                } else {
                    tracing::debug!(%error, "still cannot process changes");
                }
                backoff.wait(&shared.shutdown).await;
                continue;
            }
        };
        backoff.reset();
        if let Some(since) = failing_since.take() {
            tracing::info!(after = ?since.elapsed(), "processing changes again");
        }
        // After asking for NOTIFYs, drain once more: a change whose trigger read the flag just before
        // it was set would otherwise wait for the next poll.
        if pace.switch(shared, &Drained::default()).await == Some(true) {
            continue;
        }
        tokio::select! {
            _ = shared.shutdown.cancelled() => {}
            _ = wake.notified() => {}
            _ = tokio::time::sleep(pause(shared, drained_from)) => {}
        }
    }
}

/// Whether the listener waits for NOTIFYs (idle) or polls (busy), by the rate of changes.
struct Pace {
    rate: ChangeRate,
    /// When a drain last found changes; a listener starts busy, as if it just had.
    last_change: Instant,
    /// When the listener last turned busy (or started).
    busy_since: Instant,
}

impl Pace {
    fn new() -> Pace {
        Pace {
            rate: ChangeRate::default(),
            last_change: Instant::now(),
            busy_since: Instant::now(),
        }
    }

    /// Takes in a drain, and tells the database when the listener turns idle or busy; returns the
    /// new state when it changed and was recorded.
    async fn switch(&mut self, shared: &Shared, drained: &Drained) -> Option<bool> {
        if drained.changes > 0 {
            self.last_change = Instant::now();
            tracing::debug!(changes = drained.changes, stats = ?drained.stats, "drained");
        }
        let per_second = self.rate.record(drained.changes);
        let idle = shared.idle.load(Ordering::Relaxed);
        let quiet_for = self.last_change.elapsed();
        let busy_for = self.busy_since.elapsed();
        let want_idle = wants_idle(idle, drained.changes, per_second, quiet_for, busy_for);
        let switched = want_idle != idle && set_idle(shared, want_idle).await;
        if switched && !want_idle {
            self.busy_since = Instant::now();
        }
        switched.then_some(want_idle)
    }
}

/// Whether a listener that is `idle` (or busy, for `busy_for`) should be idle after a batch or a
/// drain that found `changes`, at `per_second` recently and `quiet_for` since the last change. Only
/// one that found changes turns an idle listener busy: the rate still counts a burst that has ended
/// (whose quiet turned the listener idle), and the two would otherwise take turns at every drain. A
/// busy one turns idle once the queue is quiet, or once a whole rate window since it turned busy
/// counted no more than [`IDLE_RATE`].
fn wants_idle(
    idle: bool,
    changes: u64,
    per_second: f64,
    quiet_for: Duration,
    busy_for: Duration,
) -> bool {
    if idle {
        changes == 0 || per_second <= BUSY_RATE
    } else {
        quiet_for >= QUIET_BEFORE_IDLE || (busy_for >= RATE_WINDOW && per_second <= IDLE_RATE)
    }
}

/// How long to wait before looking at the queue again: the poll interval when idle, a short poll
/// when busy, and no longer than until deferred changes become ready. Their time is kept until a
/// drain that started after it (`drained_from`, the last one's start) has looked: a NOTIFY that
/// ends the wait sooner brings a drain that may find them not ready yet.
fn pause(shared: &Shared, drained_from: Instant) -> Duration {
    let pause = poll_pause(shared);
    let mut next_wake = shared.next_wake.lock().expect("next wake lock");
    match *next_wake {
        Some(at) if at <= drained_from => {
            *next_wake = None;
            pause
        }
        // A little after the deferred changes' retry time, which PostgreSQL's clock decides.
        Some(at) => {
            pause.min(at.saturating_duration_since(Instant::now()) + Duration::from_millis(2))
        }
        None => pause,
    }
}

/// The poll interval when idle, a short poll when busy.
fn poll_pause(shared: &Shared) -> Duration {
    if shared.idle.load(Ordering::Relaxed) {
        shared.settings.poll_interval
    } else {
        BUSY_POLL
    }
}

/// Records in the registry whether this listener stands aside for a newer one, and returns whether it
/// does. The drain loop calls it between drains, so by the time standing aside is recorded no batch of
/// this listener is in hand; a standing-aside listener also stops asking for NOTIFYs.
async fn stand_aside(shared: &Shared) -> bool {
    let requested = shared.stand_aside.requested();
    if requested != shared.stand_aside.recorded() {
        if requested && shared.idle.load(Ordering::Relaxed) {
            set_idle(shared, false).await;
        }
        let recorded = shared.registration.say(&shared.db, &shared.board, |said| {
            said.standing_aside = requested;
        });
        match recorded.await {
            Ok(_) => {
                shared.stand_aside.set_recorded(requested);
                shared.board.standing_aside(requested);
                crate::ops::telemetry::standing_aside(requested);
            }
            Err(error) => tracing::debug!(%error, "cannot record standing aside"),
        }
    }
    shared.stand_aside.active()
}

/// Tells the database whether this listener wants NOTIFYs; returns whether that was recorded. If it
/// cannot be, nothing is lost: the poll still finds every change.
async fn set_idle(shared: &Shared, idle: bool) -> bool {
    if !shared.notifications {
        // It hears no NOTIFY: it only paces its polls, and never asks writers to notify.
        shared.idle.store(idle, Ordering::Relaxed);
        return true;
    }
    let recorded = shared
        .registration
        .say(&shared.db, &shared.board, |said| said.idle = idle);
    match recorded.await {
        Ok(_) => {
            shared.idle.store(idle, Ordering::Relaxed);
            tracing::debug!(idle, "told the database whether to notify");
            true
        }
        Err(error) => {
            tracing::debug!(%error, "cannot record the idle flag");
            false
        }
    }
}

/// Changes per second over the last [`RATE_WINDOW`].
#[derive(Default)]
struct ChangeRate {
    recent: std::collections::VecDeque<(Instant, u64)>,
}

impl ChangeRate {
    fn record(&mut self, changes: u64) -> f64 {
        let now = Instant::now();
        if changes > 0 {
            self.recent.push_back((now, changes));
        }
        while self
            .recent
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > RATE_WINDOW)
        {
            self.recent.pop_front();
        }
        self.recent.iter().map(|(_, n)| *n).sum::<u64>() as f64 / RATE_WINDOW.as_secs_f64()
    }
}

/// How long a drain's claims start past the changes it already claimed ([`Backlog`]): changes
/// below that become ready meanwhile (a late commit, a retry) wait at most this long, even under a
/// backlog that never lets the drain end.
const FLOOR_KEPT: Duration = Duration::from_secs(1);

/// What the workers of one drain share about its backlog: where their claims may start, and a
/// signal that brings in one more worker.
///
/// A claimed change is deleted, but its row (and its index entry) stays until no snapshot can
/// see it any more: a claim that started from the queue's first id walked over every change the
/// backlog's earlier batches took, in every batch, and over ever more of them while some session
/// holds an old snapshot (a long report, a forgotten `BEGIN`). After a full claim from the
/// listener's floor (`listener::floor`, which rises only as transaction ids prove it) the next
/// claims start past its last change; a drain that ends, or a floor older than [`FLOOR_KEPT`],
/// starts from the listener's floor again, and the time at which changes a batch deferred become
/// ready ([`Backlog::ready_again`]) lowers the floor to them.
pub(crate) struct Backlog {
    claims: std::sync::Mutex<Claims>,
    more_workers: tokio::sync::mpsc::Sender<()>,
}

/// Where claims start, and until when.
#[derive(Default)]
struct Claims {
    /// Past this id, until then.
    floor: Option<(i64, Instant)>,
    /// Changes that may be below the floor and become ready later: the floor goes below them
    /// then.
    ready_again: Waits,
}

impl Backlog {
    fn new(more_workers: tokio::sync::mpsc::Sender<()>) -> Backlog {
        Backlog {
            claims: std::sync::Mutex::new(Claims::default()),
            more_workers,
        }
    }

    /// The id past which the next claim looks, if this drain's backlog says (`None`: from the
    /// listener's floor, `listener::floor`).
    pub(crate) fn claim_after(&self) -> Option<i64> {
        let now = Instant::now();
        let mut claims = self.claims.lock().expect("backlog lock");
        let lowest = claims.ready_again.take_ready(now);
        if let (Some(first), Some((id, _))) = (lowest, &mut claims.floor) {
            *id = (*id).min(first.saturating_sub(1));
        }
        match claims.floor {
            Some((id, until)) if now < until => Some(id),
            _ => None,
        }
    }

    /// A claim that looked past `after` (as [`Backlog::claim_after`] said) came back full, up to
    /// `last_id`: later claims start past it, and one more worker may join. Only a claim from the
    /// listener's floor starts a backlog's: one that started past a floor since ended would set
    /// it again, over the changes its end was for.
    pub(crate) fn full_claim(&self, after: Option<i64>, last_id: i64) {
        let now = Instant::now();
        let mut claims = self.claims.lock().expect("backlog lock");
        claims.floor = match claims.floor {
            Some((id, until)) if now < until => Some((id.max(last_id), until)),
            _ if after.is_none() => Some((last_id, now + FLOOR_KEPT)),
            _ => None,
        };
        // A signal already waits, or the drain is done taking workers in: either is fine.
        let _ = self.more_workers.try_send(());
    }

    /// Changes from id `first` on, which may be below the floor, become ready at `at` (a batch
    /// deferred them, or rolled back): claims start at `first` again then.
    pub(crate) fn ready_again(&self, at: Instant, first: i64) {
        let mut claims = self.claims.lock().expect("backlog lock");
        claims.ready_again.add(at, first);
    }
}

/// Works through the queue until a claim comes back short, with one batch at a time to start and
/// up to `--workers` at once while claims come back full. At low rates a wake-up brings a change
/// or two, which the first claim takes: a second worker started with it would only open a
/// transaction to find nothing (half of all claims at 100 changes per second). A full claim says
/// there is a backlog, and brings in one more worker. So does a wake-up, or the time for a poll
/// (or for deferred changes), while fewer than `--workers` run: a batch that stalls (a slow load,
/// a lock) does not hold up the changes made after it. Each batch's changes go to `pace` as its
/// worker ends, so a drain that lasts keeps the listener's pace (idle or busy) current. After a
/// worker failed, no other is taken in: the drain ends, and the drain loop backs off.
async fn drain(shared: &Arc<Shared>, wake: &Notify, pace: &mut Pace) -> Result<(), Error> {
    let most = shared.settings.workers.max(1);
    // One signal waiting is enough: it brings in one worker, and the next full claim another.
    let (more_workers, mut wanted) = tokio::sync::mpsc::channel::<()>(1);
    let backlog = Arc::new(Backlog::new(more_workers));
    let take_in = || worker(shared.clone(), backlog.clone());
    let mut workers = JoinSet::new();
    workers.spawn(take_in());
    let poll = tokio::time::sleep_until(next_poll(shared));
    tokio::pin!(poll);
    let mut first_error = None;
    loop {
        let room = workers.len() < most
            && first_error.is_none()
            && !shared.shutdown.is_cancelled()
            && !shared.stand_aside.requested();
        let joined = tokio::select! {
            biased;
            joined = workers.join_next() => joined,
            Some(()) = wanted.recv(), if room => {
                workers.spawn(take_in());
                continue;
            }
            _ = wake.notified(), if room => {
                workers.spawn(take_in());
                continue;
            }
            _ = &mut poll, if room => {
                // A worker looks now: deferred changes that are ready are its to claim.
                let mut next_wake = shared.next_wake.lock().expect("next wake lock");
                if next_wake.is_some_and(|at| at <= Instant::now()) {
                    *next_wake = None;
                }
                drop(next_wake);
                poll.as_mut().reset(next_poll(shared));
                workers.spawn(take_in());
                continue;
            }
        };
        match joined {
            None => break,
            Some(Ok(Ok(drained))) => {
                // Asking for NOTIFYs: look once more, for a change whose trigger read the flag just
                // before it was set.
                if pace.switch(shared, &drained).await == Some(true) && room {
                    workers.spawn(take_in());
                }
                // Its batches may have deferred changes: while another worker holds the drain
                // open (a stalled load), the poll brings one in for them when they are ready.
                let sooner = next_poll(shared);
                if sooner < poll.deadline() {
                    poll.as_mut().reset(sooner);
                }
            }
            Some(Ok(Err(error))) => first_error = first_error.or(Some(error)),
            Some(Err(join_error)) => {
                first_error = first_error.or(Some(Error::Internal(format!(
                    "batch worker died: {join_error}"
                ))))
            }
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// When a drain with room for a worker takes one in for a poll: a poll interval from now, or
/// when deferred changes become ready, if sooner (read, not taken: the drain loop still needs it
/// when the drain ends first).
fn next_poll(shared: &Shared) -> tokio::time::Instant {
    let poll = Instant::now() + poll_pause(shared);
    let deferred = *shared.next_wake.lock().expect("next wake lock");
    let at = deferred.map_or(poll, |at| poll.min(at + Duration::from_millis(2)));
    tokio::time::Instant::from_std(at)
}

/// One worker of a drain: batch after batch until a claim comes back short.
async fn worker(shared: Arc<Shared>, backlog: Arc<Backlog>) -> Result<Drained, Error> {
    let mut drained = Drained::default();
    while !shared.shutdown.is_cancelled() && !shared.stand_aside.requested() {
        let (claimed, stats) = super::batch::process(&shared, &backlog).await?;
        drained.changes += claimed as u64;
        drained.stats += stats;
        if (claimed as i64) < shared.settings.batch_size {
            break;
        }
    }
    Ok(drained)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_turns_the_listener_busy_and_its_quiet_idle_once() {
        let busy_rate = BUSY_RATE * 10.0;
        let long = RATE_WINDOW * 10;
        assert!(
            !wants_idle(true, 2000, busy_rate, Duration::ZERO, long),
            "a burst"
        );
        assert!(
            wants_idle(true, 1, BUSY_RATE / 10.0, Duration::ZERO, long),
            "a trickle"
        );
        assert!(!wants_idle(
            false,
            0,
            busy_rate,
            Duration::from_millis(10),
            long
        ));
        assert!(
            wants_idle(false, 0, busy_rate, QUIET_BEFORE_IDLE, long),
            "quiet"
        );
        // Idle again while the rate still counts the burst: an empty drain keeps it idle.
        assert!(wants_idle(true, 0, busy_rate, QUIET_BEFORE_IDLE, long));
    }

    #[test]
    fn a_busy_listener_turns_idle_when_the_rate_falls_though_the_queue_is_never_quiet() {
        let never_quiet = Duration::from_millis(10);
        // 100 changes a second, a change every 10 ms: after a burst, or since the listener started.
        assert!(wants_idle(false, 1, 100.0, never_quiet, RATE_WINDOW));
        // Not on a window that has not yet seen a whole rate window of busy work.
        assert!(!wants_idle(false, 1, 100.0, never_quiet, RATE_WINDOW / 2));
        // Between the two thresholds, each state holds: no switching at every batch.
        let between = (IDLE_RATE + BUSY_RATE) / 2.0;
        assert!(!wants_idle(
            false,
            5,
            between,
            never_quiet,
            RATE_WINDOW * 10
        ));
        assert!(wants_idle(true, 5, between, never_quiet, RATE_WINDOW * 10));
    }

    fn backlog() -> Backlog {
        Backlog::new(tokio::sync::mpsc::channel(1).0)
    }

    #[test]
    fn claims_start_past_a_full_claim_from_the_first_id() {
        let backlog = backlog();
        assert_eq!(backlog.claim_after(), None);
        backlog.full_claim(None, 200);
        assert_eq!(backlog.claim_after(), Some(200));
        backlog.full_claim(Some(200), 400);
        assert_eq!(backlog.claim_after(), Some(400));
        // A claim that started before returns later, with lower ids: the floor stays.
        backlog.full_claim(None, 300);
        assert_eq!(backlog.claim_after(), Some(400));
    }

    #[test]
    fn changes_deferred_below_the_floor_are_claimed_once_ready() {
        let backlog = backlog();
        backlog.full_claim(None, 200);
        backlog.full_claim(Some(200), 400);
        backlog.ready_again(Instant::now() + Duration::from_secs(3600), 150);
        assert_eq!(
            backlog.claim_after(),
            Some(400),
            "not before they are ready"
        );
        backlog.ready_again(Instant::now(), 300);
        backlog.ready_again(Instant::now(), 250);
        // What is ready, from the first of it; the rest waits for its time.
        assert_eq!(backlog.claim_after(), Some(249));
        backlog.full_claim(Some(249), 600);
        assert_eq!(backlog.claim_after(), Some(600));
        assert_eq!(backlog.claims.lock().unwrap().ready_again.len(), 1);
    }

    #[test]
    fn a_claim_past_a_floor_that_has_ended_does_not_set_it_again() {
        let backlog = backlog();
        backlog.claims.lock().unwrap().floor = Some((200, Instant::now()));
        assert_eq!(backlog.claim_after(), None, "ended");
        // A claim made past the old floor returns full after its end.
        backlog.full_claim(Some(200), 400);
        assert_eq!(backlog.claim_after(), None);
    }
}
