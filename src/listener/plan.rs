//! Doing less work than the queue asks for, without ever skipping a change that matters: repeated
//! changes to one key are rendered once, and a key that is hot is rendered at most once per interval.
//!
//! *Coverage.* Each claim records the claiming statement's snapshot, and every queued change records
//! the id of the transaction that wrote it. A render of key K whose rows were loaded after a claim with
//! snapshot S shows every change to K committed before S. So a change to K claimed later, by a
//! transaction visible in S, is already in Redis: it is settled without rendering. Under a backlog
//! (many changes per key queued) this renders each key about once instead of once per change.
//!
//! *Hot keys.* A key rendered less than [`HOT_KEY_INTERVAL`] ago is not rendered again at once: its
//! changes are put back in the queue until the interval is over, so a burst of updates to one product
//! costs a render per interval rather than one per batch, and the last change still shows soon after.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::pg::Snapshot;
use crate::pg::queue::Change;

/// Least time between two renders of one key while it keeps changing.
pub(crate) const HOT_KEY_INTERVAL: Duration = Duration::from_millis(50);

/// Coverage remembered, in keys; beyond this it is forgotten (which only costs extra renders).
const MAX_COVERED: usize = 100_000;

/// Render start times remembered before those older than the hot-key interval, which no longer
/// matter, are dropped (at most once per interval).
const STARTED_BEFORE_PRUNING: usize = 4096;

/// What this listener remembers of its recent renders, by (topic, key).
///
/// Keys are remembered by a 128-bit hash of (topic, key), not their text: a fan-out renders a hundred
/// thousand keys once each, and remembering their text doubled the listener's resident set. Two
/// (topic, key)s sharing a hash (about one chance in 10^28 among the keys remembered) would at worst
/// let one change wait for the next sweep.
#[derive(Default)]
pub(crate) struct RecentRenders {
    memory: Mutex<Memory>,
    hashers: (RandomState, RandomState),
}

#[derive(Default)]
struct Memory {
    /// When a render of the key last started. Set when it is planned, so that two batches running
    /// at once do not both render a hot key.
    started: HashMap<u128, Instant>,
    /// When `started` was last pruned.
    pruned: Option<Instant>,
    /// The snapshot after which the key's last successful render loaded its rows. Set only once the
    /// render is in Redis: a failed render covers nothing.
    covered_by: HashMap<u128, Arc<Snapshot>>,
    /// The highest `xmax` of the snapshots recorded renders loaded after (since transaction ids
    /// last went back, see [`RecentRenders::went_back`]).
    newest_xmax: u64,
}

/// What a claimed batch comes to: changes to settle at once, changes to put back for a moment, and
/// each (topic, key) to render once, with every change it settles.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct BatchPlan<'a> {
    /// Already in Redis (an earlier render saw them): settled without rendering.
    pub(crate) covered: Vec<i64>,
    /// Rendered too recently: back in the queue for `defer_for`.
    pub(crate) deferred: Vec<i64>,
    pub(crate) defer_for: Duration,
    /// To render, each (topic, key) once, with the ids of every queued copy.
    pub(crate) to_render: HashMap<(&'a str, &'a str), Vec<i64>>,
}

impl BatchPlan<'_> {
    /// How many changes the batch claimed (that could be read).
    pub(crate) fn claimed(&self) -> usize {
        self.covered.len()
            + self.deferred.len()
            + self.to_render.values().map(Vec::len).sum::<usize>()
    }
}

/// How a claimed change is to be handled.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Render it now.
    Render,
    /// Already in Redis: settle it without rendering.
    Covered,
    /// Rendered too recently: put it back in the queue for this long.
    Defer(Duration),
}

impl RecentRenders {
    fn id(&self, topic: &str, key: &str) -> u128 {
        let half = |hasher: &RandomState| hasher.hash_one((topic, key));
        (u128::from(half(&self.hashers.0)) << 64) | u128::from(half(&self.hashers.1))
    }

    /// The highest `xmax` of the snapshots recorded renders loaded after: read before a claim is
    /// sent, a bound its snapshot, taken later, can only be under if transaction ids went back.
    pub(crate) fn newest_xmax(&self) -> u64 {
        self.memory.lock().expect("recent renders lock").newest_xmax
    }

    /// Whether a claim's `snapshot`, taken after [`RecentRenders::newest_xmax`] said `before`, shows
    /// transaction ids gone back. They go back when PostgreSQL lost the end of its WAL (a crash with
    /// `synchronous_commit = off`, a failover to a standby that was behind): ids handed out before
    /// are handed out again, and a remembered snapshot would take a new change's reused id for one
    /// it saw, settling the change unrendered. Then every snapshot remembered is forgotten.
    pub(crate) fn went_back(&self, snapshot: &Snapshot, before: u64) -> bool {
        if snapshot.xmax() >= before {
            return false;
        }
        let mut memory = self.memory.lock().expect("recent renders lock");
        memory.covered_by.clear();
        memory.newest_xmax = snapshot.xmax();
        true
    }

    /// Decides what to do with a change to (topic, key) written by transaction `xid`. A key planned
    /// for rendering counts as rendered from now on, for the hot-key interval.
    pub(crate) fn plan(&self, topic: &str, key: &str, xid: u64, now: Instant) -> Plan {
        let id = self.id(topic, key);
        let mut memory = self.memory.lock().expect("recent renders lock");
        if memory
            .covered_by
            .get(&id)
            .is_some_and(|snapshot| snapshot.sees(xid))
        {
            return Plan::Covered;
        }
        if let Some(started) = memory.started.get(&id) {
            let since = now.saturating_duration_since(*started);
            if since < HOT_KEY_INTERVAL {
                return Plan::Defer(HOT_KEY_INTERVAL - since);
            }
        }
        memory.prune_started(now);
        memory.started.insert(id, now);
        Plan::Render
    }

    /// Plans a claimed batch: each change covered, deferred, or to render (once per (topic, key)).
    pub(crate) fn plan_batch<'a>(&self, changes: &'a [Change], now: Instant) -> BatchPlan<'a> {
        let mut plan = BatchPlan::default();
        for change in changes {
            // Another copy of a (topic, key) this batch renders is settled by that render.
            let id = (change.topic.as_str(), change.key.as_str());
            if let Some(ids) = plan.to_render.get_mut(&id) {
                ids.push(change.id);
                continue;
            }
            match self.plan(&change.topic, &change.key, change.xid, now) {
                Plan::Covered => plan.covered.push(change.id),
                Plan::Defer(delay) => {
                    plan.deferred.push(change.id);
                    plan.defer_for = plan.defer_for.max(delay);
                }
                Plan::Render => plan
                    .to_render
                    .entry((change.topic.as_str(), change.key.as_str()))
                    .or_default()
                    .push(change.id),
            }
        }
        plan
    }

    /// Remembers that these (topic, key)s are in Redis as rendered from rows loaded after `snapshot`.
    /// The hot-key interval runs from `landed`, when the render reached Redis, so that two renders of a
    /// hot key reach Redis at least the interval apart however long a render takes.
    pub(crate) fn record<'a>(
        &self,
        rendered: impl Iterator<Item = (&'a str, &'a str)>,
        snapshot: Arc<Snapshot>,
        landed: Instant,
    ) {
        let mut memory = self.memory.lock().expect("recent renders lock");
        if memory.covered_by.len() > MAX_COVERED {
            memory.covered_by.clear();
        }
        memory.newest_xmax = memory.newest_xmax.max(snapshot.xmax());
        memory.prune_started(landed);
        for (topic, key) in rendered {
            let id = self.id(topic, key);
            memory.started.insert(id, landed);
            memory.covered_by.insert(id, snapshot.clone());
        }
    }
}

impl Memory {
    /// Drops render start times older than the hot-key interval once there are many: a fan-out
    /// renders many keys once each, and only the last interval's starts can defer anything.
    fn prune_started(&mut self, now: Instant) {
        let due = self
            .pruned
            .is_none_or(|at| now.saturating_duration_since(at) >= HOT_KEY_INTERVAL);
        if self.started.len() > STARTED_BEFORE_PRUNING && due {
            self.started
                .retain(|_, at| now.saturating_duration_since(*at) < HOT_KEY_INTERVAL);
            self.pruned = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(id: i64, key: &str, xid: u64) -> Change {
        Change {
            id,
            topic: "product".into(),
            key: key.into(),
            xid,
            age: Duration::ZERO,
        }
    }

    #[test]
    fn transaction_ids_going_back_forget_every_snapshot_remembered() {
        let recent = RecentRenders::default();
        let start = Instant::now();
        let seen = Snapshot::parse("1000:1000:").unwrap();
        recent.record([("product", "1")].into_iter(), Arc::new(seen), start);
        let later = start + HOT_KEY_INTERVAL * 2;
        assert_eq!(recent.plan("product", "1", 950, later), Plan::Covered);
        // A claim sent now whose snapshot is older than what a recorded render saw: PostgreSQL
        // came back from losing the end of its WAL, and hands out ids from 900 on again, so 950
        // is a change the render never saw.
        let before = recent.newest_xmax();
        assert_eq!(before, 1000);
        assert!(recent.went_back(&Snapshot::parse("900:900:").unwrap(), before));
        assert_eq!(recent.plan("product", "1", 950, later), Plan::Render);
        // Ids going forward from there are not taken for going back.
        let before = recent.newest_xmax();
        assert!(!recent.went_back(&Snapshot::parse("960:960:").unwrap(), before));
    }

    #[test]
    fn a_batch_renders_each_key_once_and_settles_or_defers_the_rest() {
        let recent = RecentRenders::default();
        let start = Instant::now();
        // Key 1 was rendered from rows loaded after snapshot 100:100: and landed at `start`.
        recent.plan("product", "1", 1, start);
        let seen = Arc::new(Snapshot::parse("100:100:").unwrap());
        recent.record([("product", "1")].into_iter(), seen, start);
        let changes = [
            change(10, "1", 99),  // committed before that snapshot: covered
            change(11, "1", 150), // newer, but key 1 is hot: deferred
            change(12, "2", 150), // rendered...
            change(13, "2", 151), // ...once, settling both copies
            change(14, "3", 160),
        ];
        let plan = recent.plan_batch(&changes, start + Duration::from_millis(20));
        assert_eq!(plan.covered, [10]);
        assert_eq!(plan.deferred, [11]);
        assert_eq!(plan.defer_for, HOT_KEY_INTERVAL - Duration::from_millis(20));
        assert_eq!(plan.to_render.len(), 2);
        assert_eq!(plan.to_render[&("product", "2")], [12, 13]);
        assert_eq!(plan.to_render[&("product", "3")], [14]);
        assert_eq!(plan.claimed(), 5);
    }

    #[test]
    fn changes_are_covered_deferred_or_rendered() {
        let recent = RecentRenders::default();
        let start = Instant::now();
        assert_eq!(recent.plan("product", "1", 50, start), Plan::Render);
        assert_eq!(
            recent.plan("product", "1", 51, start),
            Plan::Defer(HOT_KEY_INTERVAL),
            "a render in flight makes the key hot, but covers nothing yet"
        );
        let snapshot = Arc::new(Snapshot::parse("100:100:").unwrap());
        // The render took 40 ms to land.
        let landed = start + Duration::from_millis(40);
        recent.record([("product", "1")].into_iter(), snapshot, landed);
        assert_eq!(
            recent.plan("product", "1", 99, landed),
            Plan::Covered,
            "committed before the load"
        );
        // 60 ms after the render started, 20 ms after it landed: the interval runs from the landing,
        // so the key waits 30 ms more (counted from the start it would be rendered at once).
        let plan = recent.plan("product", "1", 100, start + Duration::from_millis(60));
        assert_eq!(
            plan,
            Plan::Defer(Duration::from_millis(30)),
            "newer, but the key is hot"
        );
        assert_eq!(
            recent.plan("product", "1", 100, landed + HOT_KEY_INTERVAL),
            Plan::Render
        );
        assert_eq!(
            recent.plan("product", "1", 42, landed + HOT_KEY_INTERVAL),
            Plan::Covered
        );
        assert_eq!(recent.plan("product", "2", 100, start), Plan::Render);
    }

    #[test]
    fn a_fan_out_rendering_many_keys_once_is_not_remembered_for_long() {
        let recent = RecentRenders::default();
        let start = Instant::now();
        for key in 0..10_000 {
            recent.plan("fragment:teaser", &key.to_string(), 1, start);
        }
        let later = start + 2 * HOT_KEY_INTERVAL;
        assert_eq!(recent.plan("fragment:teaser", "x", 1, later), Plan::Render);
        let memory = recent.memory.lock().unwrap();
        assert_eq!(
            memory.started.len(),
            1,
            "only the last interval's starts are kept"
        );
    }
}
