//! The last 15 minutes of a listener, in 10-second slots: changes applied, freshness (the time from
//! a change's commit to its fragment in Redis, as histogram buckets, overall and per fragment) and
//! queue depth. The status page draws its charts and its per-fragment freshness from it. Bounded:
//! 90 slots of fixed-size bucket counts, whatever the rate.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// One slot's length.
pub(crate) const SLOT: Duration = Duration::from_secs(10);
/// Slots kept: 15 minutes.
pub(crate) const SLOTS: usize = 90;

/// Upper bounds, in seconds, of the freshness buckets: the Prometheus histogram
/// `pgfresh_freshness_seconds` uses the same, so the page and Prometheus agree.
pub(crate) const FRESHNESS_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Freshness observations counted by bucket; the last counts those above every bound.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Buckets {
    counts: [u64; FRESHNESS_BUCKETS.len() + 1],
}

impl Buckets {
    fn observe(&mut self, seconds: f64) {
        let index = FRESHNESS_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(FRESHNESS_BUCKETS.len());
        self.counts[index] += 1;
    }

    fn add(&mut self, other: &Buckets) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts) {
            *mine += theirs;
        }
    }

    /// Observations counted.
    pub(crate) fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The `q` quantile in seconds, estimated as Prometheus's `histogram_quantile` does: linearly
    /// within the bucket it falls in. Above the last bound it is that bound (a lower limit).
    pub(crate) fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let mut below = 0u64;
        for (index, count) in self.counts.iter().enumerate() {
            if (below + count) as f64 >= rank && *count > 0 {
                let Some(upper) = FRESHNESS_BUCKETS.get(index) else {
                    return FRESHNESS_BUCKETS.last().copied();
                };
                let lower = if index == 0 {
                    0.0
                } else {
                    FRESHNESS_BUCKETS[index - 1]
                };
                let within = (rank - below as f64) / *count as f64;
                return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
            }
            below += count;
        }
        FRESHNESS_BUCKETS.last().copied()
    }
}

/// One 10-second slot.
#[derive(Clone, Debug, Default)]
struct Slot {
    /// Slots since the listener started.
    number: u64,
    applied: u64,
    freshness: Buckets,
    by_fragment: BTreeMap<String, Buckets>,
    /// The last queue depth sampled in this slot.
    queue: Option<i64>,
}

/// A listener's last 15 minutes.
#[derive(Debug)]
pub(crate) struct History {
    started: Instant,
    slots: VecDeque<Slot>,
}

/// One slot as the page draws it.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Point {
    /// Changes applied per second over the slot; `None` before the listener started.
    pub(crate) applied_per_second: Option<f64>,
    /// Freshness median and 99th percentile over the slot, in seconds, when anything was applied.
    pub(crate) p50: Option<f64>,
    pub(crate) p99: Option<f64>,
    /// Queue depth, when sampled in the slot.
    pub(crate) queue: Option<i64>,
}

/// The window, for the page.
#[derive(Clone, Debug, Default)]
pub(crate) struct HistoryView {
    /// [`SLOTS`] points, oldest first, the last one the slot under way.
    pub(crate) points: Vec<Point>,
    /// Freshness over the whole window, by fragment.
    pub(crate) by_fragment: BTreeMap<String, Buckets>,
}

impl History {
    pub(crate) fn new(started: Instant) -> Self {
        Self {
            started,
            slots: VecDeque::with_capacity(SLOTS + 1),
        }
    }

    fn number(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_secs() / SLOT.as_secs()
    }

    /// The slot `now` falls in, created if needed; slots older than the window are dropped.
    fn slot(&mut self, now: Instant) -> &mut Slot {
        let number = self.number(now);
        if self.slots.back().is_none_or(|last| last.number < number) {
            self.slots.push_back(Slot {
                number,
                ..Slot::default()
            });
        }
        while self
            .slots
            .front()
            .is_some_and(|first| first.number + (SLOTS as u64) <= number)
        {
            self.slots.pop_front();
        }
        self.slots.back_mut().expect("a slot was just ensured")
    }

    /// Counts changes applied.
    pub(crate) fn applied(&mut self, changes: u64, now: Instant) {
        self.slot(now).applied += changes;
    }

    /// Counts fragment renders that reached Redis `lags` after their changes' commits.
    pub(crate) fn fresh(&mut self, fragment: &str, lags: &[Duration], now: Instant) {
        let slot = self.slot(now);
        let mine = slot.by_fragment.entry(fragment.to_string()).or_default();
        for lag in lags {
            mine.observe(lag.as_secs_f64());
            slot.freshness.observe(lag.as_secs_f64());
        }
    }

    /// Notes the queue's depth.
    pub(crate) fn queue(&mut self, pending: i64, now: Instant) {
        self.slot(now).queue = Some(pending);
    }

    /// The window ending at `now`: [`SLOTS`] points, the last one the slot under way; those before
    /// the listener started are empty.
    pub(crate) fn view(&self, now: Instant) -> HistoryView {
        let last = self.number(now);
        let mut view = HistoryView::default();
        for back in (0..SLOTS as u64).rev() {
            let Some(number) = last.checked_sub(back) else {
                view.points.push(Point::default());
                continue;
            };
            let slot = self.slots.iter().find(|slot| slot.number == number);
            // The slot under way is shorter than the others.
            let begun = self.started + SLOT * number as u32;
            let length = now.saturating_duration_since(begun).min(SLOT);
            let mut point = Point {
                applied_per_second: Some(0.0),
                ..Point::default()
            };
            if let Some(slot) = slot {
                point.applied_per_second =
                    Some(slot.applied as f64 / length.as_secs_f64().max(1.0));
                point.p50 = slot.freshness.quantile(0.5);
                point.p99 = slot.freshness.quantile(0.99);
                point.queue = slot.queue;
                for (fragment, buckets) in &slot.by_fragment {
                    view.by_fragment
                        .entry(fragment.clone())
                        .or_default()
                        .add(buckets);
                }
            }
            view.points.push(point);
        }
        view
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_a_bucket_as_prometheus_does() {
        let mut buckets = Buckets::default();
        assert_eq!(buckets.quantile(0.5), None);
        for _ in 0..100 {
            buckets.observe(0.003); // bucket (0.0025, 0.005]
        }
        let median = buckets.quantile(0.5).unwrap();
        assert!((median - 0.00375).abs() < 1e-9, "{median}");
        buckets.observe(1000.0);
        assert_eq!(buckets.quantile(1.0), Some(300.0));
    }

    #[test]
    fn the_window_keeps_fifteen_minutes_and_forgets_older_slots() {
        let start = Instant::now();
        let mut history = History::new(start);
        history.applied(50, start);
        history.fresh("card", &[Duration::from_millis(2)], start);
        history.queue(7, start + Duration::from_secs(5));
        let view = history.view(start + Duration::from_secs(5));
        assert_eq!(view.points.len(), SLOTS);
        let now = view.points.last().unwrap();
        assert_eq!(now.queue, Some(7));
        assert_eq!(now.applied_per_second, Some(10.0));
        // Before the listener started there is nothing; since, a quiet slot applied nothing.
        assert_eq!(view.points[0].applied_per_second, None);
        assert!(now.p50.unwrap() > 0.001 && now.p50.unwrap() <= 0.0025);
        assert_eq!(view.by_fragment["card"].count(), 1);

        // Fifteen minutes and a slot later, nothing of it is left.
        let later = start + SLOT * (SLOTS as u32 + 1);
        history.applied(1, later);
        let view = history.view(later);
        assert!(view.by_fragment.is_empty());
        assert_eq!(view.points.iter().filter(|p| p.queue.is_some()).count(), 0);
        assert!(view.points.iter().all(|p| p.applied_per_second.is_some()));
        assert_eq!(history.slots.len(), 1);
    }
}
