//! Capped, jittered exponential backoff for reconnects and retries, with a cancellable sleep.

use std::time::Duration;

use crate::shutdown::Shutdown;

/// Delays that double from `initial` up to `max`, each randomised to between half and all of its
/// value so that many listeners restarting together do not retry in lockstep.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `initial` and never exceeding `max`.
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            attempt: 0,
        }
    }

    /// Failures since the last success.
    pub(crate) fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Back to the initial delay, after a success.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next delay, jittered.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(20));
        self.attempt = self.attempt.saturating_add(1);
        let ceiling = self.initial.saturating_mul(factor).min(self.max);
        ceiling.mul_f64(0.5 + fastrand::f64() / 2.0)
    }

    /// Sleeps for the next delay; returns false if shutdown came first.
    pub(crate) async fn wait(&mut self, shutdown: &Shutdown) -> bool {
        crate::shutdown::pause(shutdown, self.next_delay()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_then_stay_under_the_cap_and_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let first = backoff.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        let delays: Vec<Duration> = (0..30).map(|_| backoff.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(30)));
        assert!(delays.last().unwrap() >= &Duration::from_secs(15));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
