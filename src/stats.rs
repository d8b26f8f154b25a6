//! What a refresh did, counted: the one totals value that the listener's registry row, the status
//! page and the metrics are all fed from.

use std::ops::AddAssign;

/// What rendering and writing fragments did, added up over batches and fragments: a sweep's
/// [`SweepReport`](crate::SweepReport) carries one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RefreshStats {
    /// Fragments (key × variant) rendered.
    pub rendered: u64,
    /// Fragments stored because their HTML changed.
    pub written: u64,
    /// Fragments whose HTML was already stored.
    pub unchanged: u64,
    /// Writes refused because a newer render was already stored.
    pub refused: u64,
    /// Fragments deleted because their row is gone.
    pub deleted: u64,
    /// Keys that could not be refreshed.
    pub errors: u64,
}

impl AddAssign for RefreshStats {
    fn add_assign(&mut self, other: Self) {
        self.rendered += other.rendered;
        self.written += other.written;
        self.unchanged += other.unchanged;
        self.refused += other.refused;
        self.deleted += other.deleted;
        self.errors += other.errors;
    }
}
