//! What a running listener knows about itself, for the status page, the readiness check and its
//! registry row: totals, recent failures, the last sweep, what each fragment has done, and the queue,
//! Redis's memory policy and Redis's answers as sampled in the background, and the last 15 minutes
//! (`history`). Updated as things happen;
//! read by `ops::http`, whose requests therefore never take a connection or a query from the listener.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use super::history::{History, HistoryView};
use crate::fragment::Fragments;
use crate::pg::queue::QueueStats;
use crate::stats::RefreshStats;
use crate::store::Eviction;

/// Failures kept for the page.
const RECENT_FAILURES: usize = 20;

/// One failed attempt to apply a change.
#[derive(Clone, Debug)]
pub(crate) struct RecentFailure {
    /// When it failed.
    pub(crate) at: SystemTime,
    /// The change's topic.
    pub(crate) topic: String,
    /// The change's key.
    pub(crate) key: String,
    /// Why.
    pub(crate) error: String,
}

/// The last sweep this listener ran.
#[derive(Clone, Debug)]
pub(crate) struct LastSweep {
    /// When it ended.
    pub(crate) at: SystemTime,
    /// Why it ran ("periodic", "marker").
    pub(crate) reason: &'static str,
    /// Its summary line.
    pub(crate) summary: String,
    /// Whether it succeeded.
    pub(crate) succeeded: bool,
}

/// A snapshot of the board, for rendering.
#[derive(Clone, Debug)]
pub(crate) struct BoardView {
    /// When the listener started.
    pub(crate) started: Instant,
    /// Newest first.
    pub(crate) recent_failures: Vec<RecentFailure>,
    /// The last sweep, if any.
    pub(crate) last_sweep: Option<LastSweep>,
    /// Totals by fragment name.
    pub(crate) fragments: BTreeMap<String, RefreshStats>,
    /// Where each fragment is stored in Redis, in a line, by fragment name.
    pub(crate) stored: BTreeMap<String, String>,
    /// Changes applied since start.
    pub(crate) changes_applied: u64,
    /// Whether the listener stands aside for one with newer fragment versions.
    pub(crate) standing_aside: bool,
    /// The queue as last sampled, and when.
    pub(crate) queue: Option<(Instant, Result<QueueStats, String>)>,
    /// Redis's memory policy as last read: what it allows, in a line, and whether it may evict.
    pub(crate) redis_eviction: Option<(String, Eviction)>,
    /// Redis's last answer to the background PING, and when.
    pub(crate) redis_answer: Option<(Instant, Result<(), String>)>,
    /// The last 15 minutes: changes applied, freshness, queue depth.
    pub(crate) history: HistoryView,
    /// By fragment: when a periodic sweep last repaired what no watch reported, and how many keys.
    pub(crate) unwatched: BTreeMap<String, (SystemTime, u64)>,
    /// With no LISTEN session (behind a connection pooler, no session URL): how often it polls.
    pub(crate) polling: Option<Duration>,
}

/// The listener's status board.
pub(crate) struct StatusBoard {
    started: Instant,
    stored: BTreeMap<String, String>,
    inner: Mutex<Inner>,
}

struct Inner {
    recent_failures: VecDeque<RecentFailure>,
    last_sweep: Option<LastSweep>,
    fragments: BTreeMap<String, RefreshStats>,
    changes_applied: u64,
    standing_aside: bool,
    queue: Option<(Instant, Result<QueueStats, String>)>,
    redis_eviction: Option<(String, Eviction)>,
    redis_answer: Option<(Instant, Result<(), String>)>,
    history: History,
    unwatched: BTreeMap<String, (SystemTime, u64)>,
    polling: Option<Duration>,
}

impl Default for StatusBoard {
    fn default() -> Self {
        Self::new(&Fragments::new())
    }
}

impl StatusBoard {
    /// The board of a listener serving `fragments`.
    pub(crate) fn new(fragments: &Fragments) -> Self {
        let stored = fragments
            .iter()
            .map(|f| {
                let place = format!("{}* ({})", f.key_prefix(), f.storage());
                (f.name().to_string(), place)
            })
            .collect();
        let started = Instant::now();
        Self {
            started,
            stored,
            inner: Mutex::new(Inner {
                recent_failures: VecDeque::new(),
                last_sweep: None,
                fragments: BTreeMap::new(),
                changes_applied: 0,
                standing_aside: false,
                queue: None,
                redis_eviction: None,
                redis_answer: None,
                history: History::new(started),
                unwatched: BTreeMap::new(),
                polling: None,
            }),
        }
    }

    /// Adds a fragment's batch to its totals.
    pub(crate) fn refreshed(&self, fragment: &str, stats: RefreshStats) {
        let mut inner = self.inner.lock().expect("status board lock");
        *inner.fragments.entry(fragment.to_string()).or_default() += stats;
    }

    /// Counts changes applied.
    pub(crate) fn applied(&self, changes: usize) {
        let mut inner = self.inner.lock().expect("status board lock");
        inner.changes_applied += changes as u64;
        inner.history.applied(changes as u64, Instant::now());
    }

    /// Notes renders of `fragment` that reached Redis `lags` after their changes' commits.
    pub(crate) fn fresh(&self, fragment: &str, lags: &[Duration]) {
        if !lags.is_empty() {
            let mut inner = self.inner.lock().expect("status board lock");
            inner.history.fresh(fragment, lags, Instant::now());
        }
    }

    /// Notes a failed attempt.
    pub(crate) fn failed(&self, topic: &str, key: &str, error: &str) {
        let mut inner = self.inner.lock().expect("status board lock");
        if inner.recent_failures.len() == RECENT_FAILURES {
            inner.recent_failures.pop_back();
        }
        inner.recent_failures.push_front(RecentFailure {
            at: SystemTime::now(),
            topic: topic.into(),
            key: key.into(),
            error: error.into(),
        });
    }

    /// Notes a finished sweep.
    pub(crate) fn swept(&self, reason: &'static str, summary: String, succeeded: bool) {
        self.inner.lock().expect("status board lock").last_sweep = Some(LastSweep {
            at: SystemTime::now(),
            reason,
            summary,
            succeeded,
        });
    }

    /// Notes that a periodic sweep of `fragment` repaired `keys` keys no watch reported.
    pub(crate) fn unwatched(&self, fragment: &str, keys: u64) {
        let mut inner = self.inner.lock().expect("status board lock");
        inner
            .unwatched
            .insert(fragment.to_string(), (SystemTime::now(), keys));
    }

    /// Notes that the listener has no LISTEN session, and polls every `interval`.
    pub(crate) fn polling(&self, interval: Duration) {
        self.inner.lock().expect("status board lock").polling = Some(interval);
    }

    /// Notes whether the listener stands aside for a newer one.
    pub(crate) fn standing_aside(&self, standing_aside: bool) {
        self.inner.lock().expect("status board lock").standing_aside = standing_aside;
    }

    /// Notes the queue's figures, sampled by the listener's heartbeat.
    pub(crate) fn queue_sampled(&self, stats: Result<QueueStats, String>) {
        let mut inner = self.inner.lock().expect("status board lock");
        if let Ok(stats) = &stats {
            inner.history.queue(stats.pending, Instant::now());
        }
        inner.queue = Some((Instant::now(), stats));
    }

    /// Notes what Redis's memory policy allows.
    pub(crate) fn redis_eviction(&self, description: String, eviction: Eviction) {
        self.inner.lock().expect("status board lock").redis_eviction =
            Some((description, eviction));
    }

    /// Notes Redis's answer to a background PING.
    pub(crate) fn redis_answered(&self, answer: Result<(), String>) {
        self.inner.lock().expect("status board lock").redis_answer = Some((Instant::now(), answer));
    }

    /// Changes applied and stale writes refused since start: the totals the registry row publishes.
    pub(crate) fn totals(&self) -> (i64, i64) {
        let inner = self.inner.lock().expect("status board lock");
        let refused: u64 = inner.fragments.values().map(|stats| stats.refused).sum();
        (inner.changes_applied as i64, refused as i64)
    }

    /// A copy of everything, for the page.
    pub(crate) fn view(&self) -> BoardView {
        let inner = self.inner.lock().expect("status board lock");
        BoardView {
            started: self.started,
            recent_failures: inner.recent_failures.iter().cloned().collect(),
            last_sweep: inner.last_sweep.clone(),
            fragments: inner.fragments.clone(),
            stored: self.stored.clone(),
            changes_applied: inner.changes_applied,
            standing_aside: inner.standing_aside,
            queue: inner.queue.clone(),
            redis_eviction: inner.redis_eviction.clone(),
            redis_answer: inner.redis_answer.clone(),
            history: inner.history.view(Instant::now()),
            unwatched: inner.unwatched.clone(),
            polling: inner.polling,
        }
    }
}

/// What `GET /fragments/{key}` (`listen --serve`) has done, for the status page (the metrics count
/// the same).
#[derive(Default)]
pub(crate) struct ServeCounts {
    pub(crate) requests: std::sync::atomic::AtomicU64,
    pub(crate) hits: std::sync::atomic::AtomicU64,
    pub(crate) renders: std::sync::atomic::AtomicU64,
    pub(crate) coalesced: std::sync::atomic::AtomicU64,
    pub(crate) refused: std::sync::atomic::AtomicU64,
    /// Answered 503 once `--serve-wait` passed, their render still going.
    pub(crate) waited_out: std::sync::atomic::AtomicU64,
}
