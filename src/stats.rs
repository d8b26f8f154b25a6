//! What a refresh did, counted: the one totals value that the listener's registry row, the status
//! page and the metrics are all fed from.

use std::ops::AddAssign;

/// What rendering and writing fragments did, added up over batches and fragments: a sweep's
/// [`SweepReport`](crate::SweepReport) carries one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RefreshStats {
    /// Entries (key × variant) rendered.
    pub rendered: u64,
    /// Entries stored because Redis held other HTML, or none.
    pub written: u64,
    /// Entries Redis already held exactly (confirmed by a sweep, or rewritten by the listener with
    /// the same HTML): only their tickets moved.
    pub unchanged: u64,
    /// Writes refused because a render with a newer ticket was already stored.
    pub refused: u64,
    /// Entries deleted because their row is gone.
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
