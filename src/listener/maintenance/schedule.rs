//! When sweeps are due: the periodic one, an interval after the last (or after another listener's);
//! and after a sweep that could not complete, none before a growing backoff has passed, so a sweep
//! that keeps failing never repeats back to back.

use std::time::{Duration, Instant};

use crate::backoff::Backoff;

/// First and longest wait after a sweep that could not complete, before any sweep is tried again.
const SWEEP_RETRY_FIRST: Duration = Duration::from_secs(1);
const SWEEP_RETRY_MAX: Duration = Duration::from_secs(300);

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
