//! The sweep lease (`pgfresh.sweep_lease`: which listener sweeps now) and the record of complete
//! sweeps (`pgfresh.sweeps`: when each fragment was last swept, why, and what it repaired).
//!
//! Only `pgfresh_listener` may update the lease, so no other role can keep listeners from sweeping;
//! and since complete sweeps are recorded, whoever ran them, a listener never takes a sweep for done
//! that nobody completed.

use std::collections::HashMap;
use std::time::Duration;

use tokio_postgres::Client;

use crate::Error;

/// How many complete sweeps of each fragment are kept.
const SWEEPS_KEPT: i64 = 20;

/// Takes the lease for `holder` for `term`, or renews it; `false` while another holder's lease runs.
pub(crate) async fn take_lease(
    client: &Client,
    holder: &str,
    term: Duration,
) -> Result<bool, Error> {
    let taken = client
        .query_opt(
            "UPDATE pgfresh.sweep_lease
             SET holder = $1, expires_at = now() + $2::float8 * interval '1 second'
             WHERE holder IS NULL OR holder = $1 OR expires_at < now()
             RETURNING true",
            &[&holder, &term.as_secs_f64()],
        )
        .await?;
    Ok(taken.is_some())
}

/// Gives the lease up, if `holder` still holds it.
pub(crate) async fn release_lease(client: &Client, holder: &str) -> Result<(), Error> {
    client
        .execute(
            "UPDATE pgfresh.sweep_lease SET holder = NULL, expires_at = '-infinity'
             WHERE holder = $1",
            &[&holder],
        )
        .await?;
    Ok(())
}

/// One complete sweep of one fragment.
pub(crate) struct SweptFragment<'a> {
    pub(crate) fragment: &'a str,
    /// Why it ran: `periodic`, `marker`, `restart`, `truncate`, `one-off`.
    pub(crate) reason: &'a str,
    /// The listener's id, or `one-off`.
    pub(crate) swept_by: &'a str,
    /// How long it took: it started that long before it is recorded.
    pub(crate) took: Duration,
    /// Entries written because Redis held something else or nothing.
    pub(crate) rewritten: u64,
    /// Entries deleted because their row was gone.
    pub(crate) deleted: u64,
}

/// Records a complete sweep, and forgets all but the last [`SWEEPS_KEPT`] of its fragment.
pub(crate) async fn record(client: &Client, swept: &SweptFragment<'_>) -> Result<(), Error> {
    client
        .execute(
            "WITH recorded AS (
                 INSERT INTO pgfresh.sweeps (fragment, reason, swept_by, started_at, rewritten, deleted)
                 VALUES ($1, $2, $3, clock_timestamp() - $4::float8 * interval '1 second', $5, $6)
             )
             DELETE FROM pgfresh.sweeps WHERE fragment = $1 AND id NOT IN (
                 SELECT id FROM pgfresh.sweeps WHERE fragment = $1
                 ORDER BY started_at DESC LIMIT $7)",
            &[
                &swept.fragment,
                &swept.reason,
                &swept.swept_by,
                &swept.took.as_secs_f64(),
                &(swept.rewritten as i64),
                &(swept.deleted as i64),
                &(SWEEPS_KEPT - 1),
            ],
        )
        .await?;
    Ok(())
}

/// A fragment's last complete sweep.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct LastSweep {
    /// How long ago it started.
    pub(crate) age: Duration,
    /// It started after PostgreSQL did: it covers whatever a restart may have lost.
    pub(crate) since_restart: bool,
}

/// The last complete sweep of each of `fragments` that was ever swept, by name.
pub(crate) async fn last_sweeps(
    client: &Client,
    fragments: &[&str],
) -> Result<HashMap<String, LastSweep>, Error> {
    let rows = client
        .query(
            "SELECT fragment, extract(epoch FROM now() - max(started_at))::float8,
                    max(started_at) > pg_postmaster_start_time()
             FROM pgfresh.sweeps WHERE fragment = ANY($1) GROUP BY fragment",
            &[&fragments],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| {
            let last = LastSweep {
                age: Duration::from_secs_f64(row.get::<_, f64>(1).max(0.0)),
                since_restart: row.get(2),
            };
            (row.get(0), last)
        })
        .collect())
}
