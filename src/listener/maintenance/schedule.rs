//! When sweeps are due: a fragment's periodic sweep an interval after its last complete sweep,
//! whoever ran it (recorded in `pgfresh.sweeps`), or an interval after this listener started if it
//! was never swept; and after a sweep that could not complete, none before a growing backoff has
//! passed, so a sweep that keeps failing never repeats back to back.

use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::pg::sweeps::LastSweep;

/// First and longest wait after a sweep that could not complete, before any sweep is tried again.
const SWEEP_RETRY_FIRST: Duration = Duration::from_secs(1);
const SWEEP_RETRY_MAX: Duration = Duration::from_secs(300);

/// When sweeps are due: the periodic ones, and after a sweep that could not complete, not before a
/// backoff has passed.
pub(crate) struct SweepSchedule {
    interval: Option<Duration>,
    /// When this listener started: a fragment never swept is due an interval after.
    started: Instant,
    retry: Backoff,
    not_before: Option<Instant>,
}

impl SweepSchedule {
    pub(crate) fn new(interval: Option<Duration>, now: Instant) -> Self {
        Self {
            interval,
            started: now,
            retry: Backoff::new(SWEEP_RETRY_FIRST, SWEEP_RETRY_MAX),
            not_before: None,
        }
    }

    /// Whether a sweep may be tried now (no backoff pending).
    pub(crate) fn may_sweep(&self, now: Instant) -> bool {
        self.not_before.is_none_or(|at| now >= at)
    }

    /// Whether the periodic sweep of a fragment whose last complete sweep was `last` is due.
    pub(crate) fn periodic_due(&self, last: Option<&LastSweep>, now: Instant) -> bool {
        let Some(interval) = self.interval else {
            return false;
        };
        let since = match last {
            Some(last) => last.age,
            None => now.saturating_duration_since(self.started),
        };
        since >= interval
    }

    /// A sweep completed: no backoff.
    pub(crate) fn succeeded(&mut self) {
        self.retry.reset();
        self.not_before = None;
    }

    /// A sweep could not complete: whatever made it due is still due, after a growing backoff.
    /// Returns the wait.
    pub(crate) fn failed(&mut self, now: Instant) -> Duration {
        let wait = self.retry.next_delay();
        self.not_before = Some(now + wait);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn swept(secs: u64) -> LastSweep {
        LastSweep {
            age: Duration::from_secs(secs),
        }
    }

    #[test]
    fn a_sweep_that_cannot_complete_is_retried_after_a_growing_wait() {
        let start = Instant::now();
        let mut schedule = SweepSchedule::new(Some(Duration::from_secs(3600)), start);
        assert!(schedule.may_sweep(start));
        let first = schedule.failed(start);
        assert!(!schedule.may_sweep(start), "not back to back");
        assert!(schedule.may_sweep(start + first));
        let waits: Vec<Duration> = (0..12).map(|_| schedule.failed(start)).collect();
        assert!(
            waits.last().unwrap() > &Duration::from_secs(60),
            "{waits:?}"
        );
        assert!(waits.iter().all(|wait| *wait <= SWEEP_RETRY_MAX));
        schedule.succeeded();
        assert!(schedule.may_sweep(start));
    }

    #[test]
    fn a_fragment_is_due_an_interval_after_its_last_complete_sweep_by_anyone() {
        let start = Instant::now();
        let schedule = SweepSchedule::new(Some(Duration::from_secs(60)), start);
        assert!(!schedule.periodic_due(Some(&swept(59)), start));
        assert!(schedule.periodic_due(Some(&swept(60)), start));
        // Never swept: an interval after this listener started.
        assert!(!schedule.periodic_due(None, start + Duration::from_secs(59)));
        assert!(schedule.periodic_due(None, start + Duration::from_secs(60)));
    }

    #[test]
    fn without_an_interval_nothing_is_ever_periodically_due() {
        let start = Instant::now();
        let schedule = SweepSchedule::new(None, start);
        assert!(!schedule.periodic_due(Some(&swept(1_000_000)), start));
    }
}
