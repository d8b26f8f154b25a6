//! What a running listener knows about itself, for the status page and the readiness check: recent
//! failures, the last sweep, what each fragment has done, and the queue, Redis's memory policy and
//! Redis's answers as sampled in the background. Updated as things happen; read by [`crate::http`],
//! whose requests therefore never take a connection or a query from the listener.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use crate::queue::QueueStats;
use crate::refresh::RefreshStats;
use crate::sink::Eviction;

/// Failures kept for the page.
const RECENT_FAILURES: usize = 20;

/// One failed attempt to apply a change.
#[derive(Clone, Debug)]
pub struct RecentFailure {
    /// When it failed.
    pub at: SystemTime,
    /// The change's topic.
    pub topic: String,
    /// The change's key.
    pub key: String,
    /// Why.
    pub error: String,
}

/// The last sweep this listener ran.
#[derive(Clone, Debug)]
pub struct LastSweep {
    /// When it ended.
    pub at: SystemTime,
    /// Why it ran ("periodic", "marker").
    pub reason: &'static str,
    /// Its summary line.
    pub summary: String,
    /// Whether it succeeded.
    pub succeeded: bool,
}

/// A snapshot of the board, for rendering.
#[derive(Clone, Debug)]
pub struct BoardView {
    /// When the listener started.
    pub started: Instant,
    /// Newest first.
    pub recent_failures: Vec<RecentFailure>,
    /// The last sweep, if any.
    pub last_sweep: Option<LastSweep>,
    /// Totals by fragment name.
    pub fragments: BTreeMap<String, RefreshStats>,
    /// Changes settled since start.
    pub changes_applied: u64,
    /// Whether the listener stands aside for one with newer fragment versions.
    pub standing_aside: bool,
    /// The queue as last sampled, and when.
    pub queue: Option<(Instant, Result<QueueStats, String>)>,
    /// Redis's memory policy as last read: what it allows, in a line, and whether it may evict.
    pub redis_eviction: Option<(String, Eviction)>,
    /// Redis's last answer to the background PING, and when.
    pub redis_answer: Option<(Instant, Result<(), String>)>,
}

/// The listener's status board.
pub struct StatusBoard {
    started: Instant,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    recent_failures: VecDeque<RecentFailure>,
    last_sweep: Option<LastSweep>,
    fragments: BTreeMap<String, RefreshStats>,
    changes_applied: u64,
    standing_aside: bool,
    queue: Option<(Instant, Result<QueueStats, String>)>,
    redis_eviction: Option<(String, Eviction)>,
    redis_answer: Option<(Instant, Result<(), String>)>,
}

impl Default for StatusBoard {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            inner: Mutex::default(),
        }
    }
}

impl StatusBoard {
    /// Adds a fragment's batch to its totals.
    pub fn refreshed(&self, fragment: &str, stats: RefreshStats) {
        let mut inner = self.inner.lock().expect("status board lock");
        *inner.fragments.entry(fragment.to_string()).or_default() += stats;
    }

    /// Counts changes settled.
    pub fn applied(&self, changes: usize) {
        self.inner
            .lock()
            .expect("status board lock")
            .changes_applied += changes as u64;
    }

    /// Notes a failed attempt.
    pub fn failed(&self, topic: &str, key: &str, error: &str) {
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
    pub fn swept(&self, reason: &'static str, summary: String, succeeded: bool) {
        self.inner.lock().expect("status board lock").last_sweep = Some(LastSweep {
            at: SystemTime::now(),
            reason,
            summary,
            succeeded,
        });
    }

    /// Notes whether the listener stands aside for a newer one.
    pub fn standing_aside(&self, standing_aside: bool) {
        self.inner.lock().expect("status board lock").standing_aside = standing_aside;
    }

    /// Notes the queue's figures, sampled by the listener's heartbeat.
    pub fn queue_sampled(&self, stats: Result<QueueStats, String>) {
        self.inner.lock().expect("status board lock").queue = Some((Instant::now(), stats));
    }

    /// Notes what Redis's memory policy allows.
    pub fn redis_eviction(&self, description: String, eviction: Eviction) {
        self.inner.lock().expect("status board lock").redis_eviction =
            Some((description, eviction));
    }

    /// Notes Redis's answer to a background PING.
    pub fn redis_answered(&self, answer: Result<(), String>) {
        self.inner.lock().expect("status board lock").redis_answer = Some((Instant::now(), answer));
    }

    /// A copy of everything, for the page.
    pub fn view(&self) -> BoardView {
        let inner = self.inner.lock().expect("status board lock");
        BoardView {
            started: self.started,
            recent_failures: inner.recent_failures.iter().cloned().collect(),
            last_sweep: inner.last_sweep.clone(),
            fragments: inner.fragments.clone(),
            changes_applied: inner.changes_applied,
            standing_aside: inner.standing_aside,
            queue: inner.queue.clone(),
            redis_eviction: inner.redis_eviction.clone(),
            redis_answer: inner.redis_answer.clone(),
        }
    }
}

/// The status page: plain HTML that refreshes itself every two seconds.
pub fn page(listener_id: &str, problem: Option<&str>, board: &BoardView) -> maud::Markup {
    let uptime = board.started.elapsed().as_secs_f64().max(1.0);
    maud::html! {
        (maud::DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content="2";
                title { "pgfresh listener" }
                style { (maud::PreEscaped(STYLE)) }
            }
            body {
                h1 { "pgfresh listener " small { (listener_id) } }
                section {
                    h2 { "Connections" }
                    @match problem {
                        None => p class="ok" { "PostgreSQL LISTEN session up, Redis answering." },
                        Some(problem) => p class="bad" { (problem) },
                    }
                    @if let Some((policy, eviction)) = &board.redis_eviction {
                        p class=(if *eviction == Eviction::Impossible { "ok" } else { "bad" }) {
                            "Redis maxmemory-policy " (policy)
                        }
                    }
                    @if board.standing_aside {
                        p class="bad" {
                            "Standing aside: a listener with a newer version of these fragments is running. "
                            "This one applies no changes until it is gone."
                        }
                    }
                }
                section {
                    h2 { "Queue" }
                    @match &board.queue {
                        None => p { "not sampled yet" },
                        Some((at, Ok(stats))) => p {
                            @if stats.pending_estimated { "about " }
                            (stats.pending) " pending"
                            @if let Some(oldest) = stats.oldest { ", oldest " (format!("{:.1}", oldest.as_secs_f64())) " s" }
                            "; " (stats.failed) " parked in pgfresh.failed"
                            " (sampled " (at.elapsed().as_secs()) " s ago)"
                        },
                        Some((_, Err(error))) => p class="bad" { "cannot read the queue: " (error) },
                    }
                    p {
                        (board.changes_applied) " changes applied since start ("
                        (format!("{:.1}", board.changes_applied as f64 / uptime)) " per second)"
                    }
                }
                section {
                    h2 { "Fragments" }
                    table {
                        tr { th { "fragment" } th { "rendered" } th { "written" } th { "unchanged" } th { "stale writes refused" } th { "deleted" } th { "errors" } }
                        @for (name, stats) in &board.fragments {
                            tr {
                                td { (name) } td { (stats.rendered) } td { (stats.written) } td { (stats.unchanged) }
                                td { (stats.refused) } td { (stats.deleted) } td { (stats.errors) }
                            }
                        }
                    }
                }
                section {
                    h2 { "Last sweep" }
                    @match &board.last_sweep {
                        None => p { "none by this listener yet" },
                        Some(sweep) => p class=(if sweep.succeeded { "ok" } else { "bad" }) {
                            (ago(sweep.at)) " (" (sweep.reason) "): " (sweep.summary)
                        },
                    }
                }
                section {
                    h2 { "Recent failures" }
                    @if board.recent_failures.is_empty() {
                        p { "none" }
                    } @else {
                        table {
                            tr { th { "when" } th { "topic" } th { "key" } th { "error" } }
                            @for failure in &board.recent_failures {
                                tr { td { (ago(failure.at)) } td { (failure.topic) } td { (failure.key) } td { (failure.error) } }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn ago(at: SystemTime) -> String {
    let secs = at.elapsed().map_or(0, |d| d.as_secs());
    format!("{secs} s ago")
}

/// Inline styles: the page needs no other request.
const STYLE: &str = "body{font:15px/1.4 system-ui,sans-serif;margin:2em;max-width:70em}\
h1 small{font-weight:normal;color:#666}table{border-collapse:collapse}\
td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}.ok{color:#176117}.bad{color:#a31515}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_says_when_the_listener_stands_aside() {
        let board = StatusBoard::default();
        let before = page("me", None, &board.view()).into_string();
        assert!(!before.contains("Standing aside"));
        board.standing_aside(true);
        let during = page("me", None, &board.view()).into_string();
        assert!(during.contains("Standing aside: a listener with a newer version"));
    }
}
