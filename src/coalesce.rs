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

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Least time between two renders of one key while it keeps changing.
pub const HOT_KEY_INTERVAL: Duration = Duration::from_millis(50);

/// Keys remembered; beyond this the oldest memories are dropped (which only costs extra renders).
const MAX_REMEMBERED: usize = 200_000;

/// A PostgreSQL snapshot (`pg_current_snapshot()`): which transactions had committed when it was taken.
#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot {
    xmin: u64,
    xmax: u64,
    in_progress: HashSet<u64>,
}

impl Snapshot {
    /// Parses the text form `xmin:xmax:xip,xip,...`.
    pub fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let in_progress = match parts.next() {
            Some("") | None => HashSet::new(),
            Some(list) => list
                .split(',')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?,
        };
        Some(Snapshot {
            xmin,
            xmax,
            in_progress,
        })
    }

    /// Whether transaction `xid` had committed (or aborted) when the snapshot was taken.
    pub fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.in_progress.contains(&xid))
    }
}

/// What this listener remembers of its recent renders, by (topic, key).
#[derive(Default)]
pub struct RecentRenders {
    memory: Mutex<Memory>,
}

#[derive(Default)]
struct Memory {
    /// When a render of the key last started. Set when it is planned, so that two batches running
    /// at once do not both render a hot key.
    started: HashMap<(String, String), Instant>,
    /// The snapshot after which the key's last successful render loaded its rows. Set only once the
    /// render is in Redis: a failed render covers nothing.
    covered_by: HashMap<(String, String), Arc<Snapshot>>,
}

/// How a claimed change is to be handled.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Render it now.
    Render,
    /// Already in Redis: settle it without rendering.
    Covered,
    /// Rendered too recently: put it back in the queue for this long.
    Defer(Duration),
}

impl RecentRenders {
    /// Decides what to do with a change to (topic, key) written by transaction `xid`. A key planned
    /// for rendering counts as rendered from now on, for the hot-key interval.
    pub fn plan(&self, topic: &str, key: &str, xid: u64, now: Instant) -> Plan {
        let mut memory = self.memory.lock().expect("recent renders lock");
        let id = (topic.to_string(), key.to_string());
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
        if memory.started.len() > MAX_REMEMBERED {
            memory
                .started
                .retain(|_, at| now.saturating_duration_since(*at) < HOT_KEY_INTERVAL);
        }
        memory.started.insert(id, now);
        Plan::Render
    }

    /// Remembers that these (topic, key)s are in Redis as rendered from rows loaded after `snapshot`.
    /// The hot-key interval runs from `landed`, when the render reached Redis, so that two renders of a
    /// hot key reach Redis at least the interval apart however long a render takes.
    pub fn record<'a>(
        &self,
        rendered: impl Iterator<Item = (&'a str, &'a str)>,
        snapshot: Arc<Snapshot>,
        landed: Instant,
    ) {
        let mut memory = self.memory.lock().expect("recent renders lock");
        if memory.covered_by.len() > MAX_REMEMBERED {
            memory.covered_by.clear();
        }
        for (topic, key) in rendered {
            let id = (topic.to_string(), key.to_string());
            memory.started.insert(id.clone(), landed);
            memory.covered_by.insert(id, snapshot.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_sees_transactions_that_ended_before_it() {
        let snapshot = Snapshot::parse("100:110:103,105").unwrap();
        assert!(snapshot.sees(99));
        assert!(snapshot.sees(104));
        assert!(!snapshot.sees(103), "in progress when taken");
        assert!(!snapshot.sees(110), "started after");
        assert_eq!(
            Snapshot::parse("7:7:").unwrap(),
            Snapshot::parse("7:7").unwrap()
        );
        assert!(Snapshot::parse("garbage").is_none());
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
}
