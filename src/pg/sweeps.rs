//! The sweep lease (`pgfresh.sweep_lease`: which listener sweeps now), the record of complete
//! sweeps (`pgfresh.sweeps`: when each fragment was last swept, why, and what it repaired), and the
//! server epoch (`pgfresh.server_epoch`: since when PostgreSQL has kept every commit).
//!
//! Only `pgfresh_listener` may update the lease, so no other role can keep listeners from sweeping;
//! and since complete sweeps are recorded, whoever ran them, a listener never takes a sweep for done
//! that nobody completed.

use std::collections::HashMap;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_postgres::types::Type;

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
        .query_typed_opt(
            "UPDATE pgfresh.sweep_lease
             SET holder = $1, expires_at = now() + $2::float8 * interval '1 second'
             WHERE holder IS NULL OR holder = $1 OR expires_at < now()
             RETURNING true",
            &[(&holder, Type::TEXT), (&term.as_secs_f64(), Type::FLOAT8)],
        )
        .await?;
    Ok(taken.is_some())
}

/// Gives the lease up, if `holder` still holds it.
pub(crate) async fn release_lease(client: &Client, holder: &str) -> Result<(), Error> {
    client
        .execute_typed(
            "UPDATE pgfresh.sweep_lease SET holder = NULL, expires_at = '-infinity'
             WHERE holder = $1",
            &[(&holder, Type::TEXT)],
        )
        .await?;
    Ok(())
}

/// How far render tickets are moved ahead after a crash or a failover: far more tickets than one can
/// lose (those taken since the last WAL flush, seconds of work), far fewer than a bigint holds.
const TICKET_JUMP: i64 = 1_000_000_000;

/// Makes sure the server epoch is noted: if a crash or a failover emptied `pgfresh.server_epoch`
/// (unlogged), notes one now and moves render tickets ahead past any the lost WAL handed out, in
/// one statement, so that exactly one caller does both. Returns whether this call noted it.
pub(crate) async fn note_epoch(client: &Client) -> Result<bool, Error> {
    let noted = client
        .query_typed_one(
            "WITH noted AS (
                 INSERT INTO pgfresh.server_epoch (after_crash) VALUES (true)
                 ON CONFLICT (singleton) DO NOTHING RETURNING true
             )
             SELECT EXISTS (SELECT FROM noted),
                    (SELECT setval('pgfresh.render_tickets', nextval('pgfresh.render_tickets') + $1)
                     FROM noted)",
            &[(&TICKET_JUMP, Type::INT8)],
        )
        .await?;
    Ok(noted.get(0))
}

/// One complete sweep of one fragment.
pub(crate) struct SweptFragment<'a> {
    pub(crate) fragment: &'a str,
    /// Why it ran: `periodic`, `marker`, `restart`, `truncate`, `one-off`.
    pub(crate) reason: &'a str,
    /// The listener's id, or `one-off`.
    pub(crate) swept_by: &'a str,
    /// When it started, on PostgreSQL's clock (seconds since the Unix epoch), read with its first
    /// render ticket.
    pub(crate) started_at: f64,
    /// Entries written because Redis held something else or nothing.
    pub(crate) rewritten: u64,
    /// Entries deleted because their row was gone.
    pub(crate) deleted: u64,
    /// Keys repaired with no change waiting for them, and orphans deleted.
    pub(crate) unexplained: u64,
}

/// Records a complete sweep, and forgets all but the last [`SWEEPS_KEPT`] of its fragment. Returns
/// whether its repairs are a finding (`pgfresh.sweeps.unwatched`): a periodic sweep by a listener
/// that has run since the fragment's previous complete sweep started, with no crash noted since,
/// that repaired what no change was on its way for. A change reached the fragment that no watch
/// reported.
pub(crate) async fn record(client: &Client, swept: &SweptFragment<'_>) -> Result<bool, Error> {
    let row = client
        .query_typed_one(
            "WITH previous AS (
                 SELECT max(started_at) AS started_at FROM pgfresh.sweeps WHERE fragment = $1
             ), recorded AS (
                 INSERT INTO pgfresh.sweeps
                     (fragment, reason, swept_by, started_at, rewritten, deleted, unexplained, unwatched)
                 SELECT $1, $2, $3, to_timestamp($4), $5, $6, $8,
                        $8 > 0 AND $2 = 'periodic'
                        AND EXISTS (SELECT FROM pgfresh.listeners l
                                    WHERE l.id = $3 AND l.started_at < p.started_at)
                        AND EXISTS (SELECT FROM pgfresh.server_epoch e WHERE e.noticed_at < p.started_at)
                 FROM previous p
                 RETURNING unwatched
             ), trimmed AS (
                 DELETE FROM pgfresh.sweeps WHERE fragment = $1 AND id NOT IN (
                     SELECT id FROM pgfresh.sweeps WHERE fragment = $1
                     ORDER BY started_at DESC LIMIT $7)
             )
             SELECT unwatched FROM recorded",
            &[
                (&swept.fragment, Type::TEXT),
                (&swept.reason, Type::TEXT),
                (&swept.swept_by, Type::TEXT),
                (&swept.started_at, Type::FLOAT8),
                (&(swept.rewritten as i64), Type::INT8),
                (&(swept.deleted as i64), Type::INT8),
                (&(SWEEPS_KEPT - 1), Type::INT8),
                (&(swept.unexplained as i64), Type::INT8),
            ],
        )
        .await?;
    Ok(row.get(0))
}

/// A fragment's last complete sweep.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct LastSweep {
    /// How long ago it started.
    pub(crate) age: Duration,
}

/// What the sweeps record says of a set of fragments.
#[derive(Debug, Default)]
pub(crate) struct SweptSoFar {
    /// The last complete sweep of each fragment that was ever swept, by name.
    pub(crate) last: HashMap<String, LastSweep>,
    /// The fragments that a crash or a failover may have left stale: with the epoch noted after
    /// one, those not swept completely since (all of them while no epoch is noted yet).
    pub(crate) since_crash: Vec<String>,
}

/// What the sweeps record says of `fragments`.
pub(crate) async fn swept_so_far(client: &Client, fragments: &[&str]) -> Result<SweptSoFar, Error> {
    let rows = client
        .query_typed(
            "WITH epoch AS (SELECT noticed_at, after_crash FROM pgfresh.server_epoch),
             last AS (
                 SELECT fragment, max(started_at) AS started_at
                 FROM pgfresh.sweeps WHERE fragment = ANY($1) GROUP BY fragment
             )
             SELECT f.name, extract(epoch FROM now() - last.started_at)::float8,
                    NOT EXISTS (SELECT FROM epoch)
                    OR EXISTS (SELECT FROM epoch WHERE after_crash
                               AND (last.started_at IS NULL OR last.started_at < noticed_at))
             FROM unnest($1::text[]) AS f(name) LEFT JOIN last ON last.fragment = f.name",
            &[(&fragments, Type::TEXT_ARRAY)],
        )
        .await?;
    let mut so_far = SweptSoFar::default();
    for row in &rows {
        let name: String = row.get(0);
        if let Some(age) = row.get::<_, Option<f64>>(1) {
            let age = Duration::from_secs_f64(age.max(0.0));
            so_far.last.insert(name.clone(), LastSweep { age });
        }
        if row.get::<_, bool>(2) {
            so_far.since_crash.push(name);
        }
    }
    Ok(so_far)
}

/// A fragment's last complete sweep, as `doctor` shows it.
pub(crate) struct SweepSummary {
    pub(crate) fragment: String,
    pub(crate) reason: String,
    /// Seconds since it started.
    pub(crate) age: f64,
    /// Entries it wrote and deleted.
    pub(crate) repaired: i64,
    /// Keys it repaired with no change waiting for them, and orphans.
    pub(crate) unexplained: i64,
    /// Its repairs are a finding (see [`record`]).
    pub(crate) unwatched: bool,
}

/// The last complete sweep of each of `fragments` that was ever swept and, before it, the last one
/// whose repairs were a finding, if that is still recorded: by fragment, latest first.
pub(crate) async fn last_of_each(
    client: &Client,
    fragments: &[&str],
) -> Result<Vec<SweepSummary>, Error> {
    let rows = client
        .query_typed(
            "SELECT * FROM (
                 SELECT DISTINCT ON (fragment, unwatched) fragment, reason,
                        extract(epoch FROM now() - started_at)::float8 AS age,
                        rewritten + deleted, unexplained, unwatched
                 FROM pgfresh.sweeps WHERE fragment = ANY($1)
                 ORDER BY fragment, unwatched, started_at DESC) AS last
             ORDER BY fragment, age",
            &[(&fragments, Type::TEXT_ARRAY)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| SweepSummary {
            fragment: row.get(0),
            reason: row.get(1),
            age: row.get(2),
            repaired: row.get(3),
            unexplained: row.get(4),
            unwatched: row.get(5),
        })
        .collect())
}
