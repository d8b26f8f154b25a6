//! A PostgreSQL snapshot, as `pg_current_snapshot()` gives it: which transactions had ended when it was
//! taken. Each claim records its own, and each queued change the transaction that wrote it: the
//! listener's planning compares the two to know what an earlier render already saw.

use std::collections::HashSet;

/// A PostgreSQL snapshot (`pg_current_snapshot()`): which transactions had committed when it was taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Snapshot {
    xmin: u64,
    xmax: u64,
    in_progress: HashSet<u64>,
}

impl Snapshot {
    /// Parses the text form `xmin:xmax:xip,xip,...`.
    pub(crate) fn parse(text: &str) -> Option<Snapshot> {
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

    /// No transaction from this id on had ended when the snapshot was taken.
    pub(crate) fn xmax(&self) -> u64 {
        self.xmax
    }

    /// The transactions still running when the snapshot was taken.
    pub(crate) fn running(&self) -> impl Iterator<Item = u64> + '_ {
        self.in_progress.iter().copied()
    }

    /// Those of them below `xid`.
    pub(crate) fn running_below(&self, xid: u64) -> impl Iterator<Item = u64> + '_ {
        self.running().filter(move |&x| x < xid)
    }

    /// Whether transaction `xid` had committed (or aborted) when the snapshot was taken.
    pub(crate) fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.in_progress.contains(&xid))
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
}
