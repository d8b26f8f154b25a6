//! The change queue, `pgfresh.changes`: claiming batches with their render ticket and snapshot,
//! settling them (applied, deferred, failed and retried, parked), queueing keys again, and the
//! bounded figures `status` and the metrics show.

use std::time::Duration;

use tokio_postgres::Client;
use tokio_postgres::types::Type;

use super::statements::{Hot, Kept};
use super::transaction::Pipelined;
use crate::Error;

/// One queued change: `key` of `topic` changed in a committed transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Change {
    /// Queue row id.
    pub(crate) id: i64,
    /// Topic given to `pgfresh.watch`.
    pub(crate) topic: String,
    /// Text form of the watched key column.
    pub(crate) key: String,
    /// The transaction that made the change.
    pub(crate) xid: u64,
    /// How long before the claiming statement read it the change was committed (see [`ORIGIN`]).
    pub(crate) age: Duration,
}

/// When a queued change happened, in SQL over a `pgfresh.changes` row: its transaction's commit
/// time where PostgreSQL records commit timestamps (`track_commit_timestamp = on`), else the start
/// of its transaction (`enqueued_at`, the trigger's `now()`), which is earlier by however long the
/// writing transaction ran, so freshness measured from it is never better than the truth. A row
/// written by hand with an infinite `enqueued_at` has no origin (an age of 0): subtracting it
/// fails the statement, and with it every claim that reads the row.
const ORIGIN: &str = "coalesce(CASE WHEN current_setting('track_commit_timestamp')::bool
                                   THEN pg_xact_commit_timestamp(xid(changes.xid)) END,
                              CASE WHEN isfinite(changes.enqueued_at) THEN changes.enqueued_at END,
                              clock_timestamp())";

/// Changes claimed by one transaction, with the render ticket taken before any row is loaded.
#[derive(Debug, Default)]
pub(crate) struct Claim {
    /// Orders this batch's Redis writes against every other render (see `store::write`).
    pub(crate) ticket: i64,
    /// The claimed changes, oldest first.
    pub(crate) changes: Vec<Change>,
    /// Claimed rows whose topic or key is not UTF-8 text (possible in a `SQL_ASCII` database): they
    /// can never be rendered, so they go the way of every failed change, retried and then parked.
    pub(crate) undecodable: Vec<Failure>,
    /// The claiming statement's snapshot: every render of this batch saw what it saw, and more.
    pub(crate) snapshot: Option<super::Snapshot>,
    /// What the claim tells the listener's floor (`None` when it claimed nothing).
    pub(crate) seen: Option<Seen>,
}

/// What a claim that claimed something saw, for the listener's floor (`listener::floor`).
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    /// Its snapshot: which transactions had ended.
    pub(crate) snapshot: super::Snapshot,
    /// Its own transaction id (assigned after its snapshot was taken, if the claim was its
    /// transaction's first statement to take one).
    pub(crate) xid: u64,
    /// The highest id it claimed.
    pub(crate) last_id: i64,
    /// Asked for with a floor: the first change past it that its snapshot saw ready to claim, or
    /// soon to be ([`LOOK_AHEAD`]), held by another batch or not (`None`: none).
    pub(crate) first_past_floor: Option<Option<i64>>,
}

/// A failed change and why.
#[derive(Clone, Debug)]
pub(crate) struct Failure {
    /// Queue row id.
    pub(crate) id: i64,
    /// One line for `status` and `pgfresh.failed`.
    pub(crate) error: String,
}

/// Queue figures for `status` and metrics.
#[derive(Clone, Debug, Default)]
pub(crate) struct QueueStats {
    /// Changes waiting, retrying ones included; an estimate when `pending_estimated`.
    pub(crate) pending: i64,
    /// The queue is longer than [`EXACT_COUNT_LIMIT`]: `pending` spans the queue's ids instead of
    /// counting its rows, an upper bound that is exact while the queue is drained oldest first.
    pub(crate) pending_estimated: bool,
    /// Age of the oldest waiting change.
    pub(crate) oldest: Option<Duration>,
    /// How long ago the oldest waiting change happened (see [`ORIGIN`]): how stale the stalest
    /// fragment may be now.
    pub(crate) lag: Option<Duration>,
    /// Changes parked in `pgfresh.failed`.
    pub(crate) parked: i64,
}

/// A change ready to claim within this long counts as ready for the first change past a floor
/// that a claim reads (a hot key's deferral, a retry apart, a failure's first retry or two hold a
/// listener's floor under them; see `listener::floor`). Whole seconds.
pub(crate) const LOOK_AHEAD: Duration = Duration::from_secs(2);

/// Claims up to `limit` ready changes with ids above `after`, oldest first, skipping rows another
/// transaction holds, and takes one render ticket. Must run inside a transaction: the row locks
/// last until it ends, and a crash or rollback leaves the changes queued; and be the first of its
/// statements that takes a transaction id (see `listener::floor`). With `floor`, it also reads the
/// first change past it that is ready or soon will be, locked by another batch or not.
pub(crate) async fn claim_batch(
    txn: Hot<'_>,
    after: i64,
    floor: Option<i64>,
    limit: i64,
) -> Result<Claim, Error> {
    // The ticket comes from an uncorrelated subquery, evaluated once per statement. The rows are loaded
    // by later statements, whose snapshots are newer than the ticket: that is what makes tickets order
    // renders by the data they saw.
    // A SQL_ASCII database stores any bytes as text, and the server refuses to send text that is
    // not valid in the client's encoding (UTF-8): one such row would fail every claim. There, topic
    // and key come as raw bytes, and a row that is not UTF-8 fails alone.
    // The limit is part of the text, not a parameter: prepared once (see `statements`), the
    // statement keeps one plan, and a plan made for an unknown limit assumes a tenth of the queue
    // and may sort all of it. `after` lets a drain's claims start past the changes it already
    // took from a backlog (see `listener::drain::Backlog`).
    // Ages come from PostgreSQL's clock alone (the claim's time less the change's), so the
    // listener's clock may differ from the server's without skewing freshness.
    // The claim's own transaction id (it needs one to lock the rows) and, given `$2`, the first
    // change past it are what `listener::floor` proves its floor with; a NULL `$2` reads nothing.
    let sql = format!(
        "WITH encoding AS (SELECT current_setting('server_encoding') = 'SQL_ASCII' AS raw)
         SELECT (SELECT nextval('pgfresh.render_tickets')), id,
                CASE WHEN NOT raw THEN topic END, CASE WHEN NOT raw THEN key END,
                xid::text::bigint, (SELECT pg_current_snapshot()::text),
                CASE WHEN raw THEN convert_to(topic, 'SQL_ASCII') END,
                CASE WHEN raw THEN convert_to(key, 'SQL_ASCII') END,
                extract(epoch FROM clock_timestamp() - {ORIGIN})::float8,
                (SELECT pg_current_xact_id()::text::bigint),
                (SELECT min(past.id) FROM pgfresh.changes past
                 WHERE past.id > $2 AND past.retry_at <= now() + interval '{look_ahead} seconds')
         FROM pgfresh.changes, encoding
         WHERE retry_at <= now() AND id > $1
         ORDER BY id
         LIMIT {limit}
         FOR UPDATE OF changes SKIP LOCKED",
        look_ahead = LOOK_AHEAD.as_secs()
    );
    let rows = txn
        .query(&sql, &[(&after, Type::INT8), (&floor, Type::INT8)])
        .await?;
    // A prepared statement keeps the plan made at its first run (until the table is analyzed):
    // on a queue that was short then, a sequential scan and a sort of every row, which on a
    // backlog of a million changes reads them all for each claim. A full claim says the queue is
    // long: the next claim is prepared again, and planned for the queue as it is (an index scan
    // that stops after `limit` rows). (The statements over a batch's ids need no such care: their
    // range keeps them on the index, see `bounds`.)
    if rows.len() as i64 >= limit {
        txn.forget(&sql, &[Type::INT8, Type::INT8]);
    }
    let mut claim = Claim {
        ticket: rows.first().map_or(0, |r| r.get(0)),
        snapshot: rows.first().and_then(|r| super::Snapshot::parse(r.get(5))),
        ..Claim::default()
    };
    if let (Some(first), Some(snapshot)) = (rows.first(), &claim.snapshot) {
        claim.seen = Some(Seen {
            snapshot: snapshot.clone(),
            xid: first.get::<_, i64>(9) as u64,
            last_id: rows.last().map_or(i64::MIN, |r| r.get(1)),
            first_past_floor: floor.map(|_| first.get(10)),
        });
    }
    for row in &rows {
        let id: i64 = row.get(1);
        match (text(row, 2, 6), text(row, 3, 7)) {
            (Some(topic), Some(key)) => claim.changes.push(Change {
                id,
                topic,
                key,
                xid: row.get::<_, i64>(4) as u64,
                age: Duration::from_secs_f64(row.get::<_, f64>(8).max(0.0)),
            }),
            _ => claim.undecodable.push(Failure {
                id,
                error: "topic or key is not valid UTF-8 text; fix or delete the row".into(),
            }),
        }
    }
    Ok(claim)
}

impl Claim {
    /// The lowest id it holds (`i64::MAX` when empty).
    pub(crate) fn first_id(&self) -> i64 {
        let ids = self.changes.iter().map(|c| c.id);
        ids.chain(self.undecodable.iter().map(|f| f.id))
            .min()
            .unwrap_or(i64::MAX)
    }

    /// The highest id it holds (`i64::MIN` when empty).
    pub(crate) fn last_id(&self) -> i64 {
        let ids = self.changes.iter().map(|c| c.id);
        ids.chain(self.undecodable.iter().map(|f| f.id))
            .max()
            .unwrap_or(i64::MIN)
    }
}

/// A column sent as text, or as raw bytes (from a SQL_ASCII database) that must be UTF-8.
fn text(row: &tokio_postgres::Row, as_text: usize, as_bytes: usize) -> Option<String> {
    match row.get::<_, Option<String>>(as_text) {
        Some(text) => Some(text),
        None => String::from_utf8(row.get::<_, Option<Vec<u8>>>(as_bytes)?).ok(),
    }
}

/// Puts changes back in the queue, untouched but for when they may be claimed again.
pub(crate) async fn defer(txn: &Client, ids: &[i64], delay: Duration) -> Result<(), Error> {
    if let Some((first, last)) = bounds(ids) {
        txn.execute_typed(
            "UPDATE pgfresh.changes SET retry_at = now() + $2 * interval '1 millisecond'
             WHERE id BETWEEN $3 AND $4 AND id = ANY($1)",
            &[
                (&ids, Type::INT8_ARRAY),
                (&(delay.as_secs_f64() * 1000.0), Type::FLOAT8),
                (&first, Type::INT8),
                (&last, Type::INT8),
            ],
        )
        .await?;
    }
    Ok(())
}

/// Puts changes back in the queue whose keys were loaded only with keys that failed, not told
/// apart from them, noting why: each waits a random 0.5 to 2 s, so that they come back in other
/// batches, apart from each other, and no attempt is counted (most of them are likely fine).
/// (Two seconds at most: within [`LOOK_AHEAD`], so listeners' floors stay under them.)
pub(crate) async fn retry_apart(txn: &Client, changes: &[(i64, &str)]) -> Result<(), Error> {
    if changes.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = changes.iter().map(|(id, _)| *id).collect();
    let errors: Vec<&str> = changes.iter().map(|(_, error)| *error).collect();
    txn.execute_typed(
        "UPDATE pgfresh.changes c
         SET retry_at = now() + (0.5 + random() * 1.5) * interval '1 second', last_error = u.error
         FROM unnest($1::bigint[], $2::text[]) AS u(id, error)
         WHERE c.id = u.id",
        &[(&ids, Type::INT8_ARRAY), (&errors, Type::TEXT_ARRAY)],
    )
    .await?;
    Ok(())
}

/// A change settled to wait: claimable again after `delay` (on PostgreSQL's clock, from its
/// statement's start).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Waiting {
    pub(crate) id: i64,
    pub(crate) delay: Duration,
}

impl Waiting {
    /// From a row of `(id, seconds until its retry_at)`.
    fn from_row(row: &tokio_postgres::Row) -> Waiting {
        Waiting {
            id: row.get(0),
            delay: Duration::from_secs_f64(row.get::<_, f64>(1).max(0.0)),
        }
    }
}

/// Takes a render ticket, and tells when on PostgreSQL's clock (seconds since the Unix epoch): when
/// a sweep of a fragment started, as `pgfresh.sweeps` records it.
pub(crate) async fn take_ticket_at(client: &Client) -> Result<(i64, f64), Error> {
    let row = client
        .query_typed_one(
            "SELECT nextval('pgfresh.render_tickets'), extract(epoch FROM clock_timestamp())::float8",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Takes a render ticket, for renders that do not come from a claim (the sweep).
pub(crate) async fn take_ticket(client: &Client) -> Result<i64, Error> {
    Ok(client
        .query_typed_one("SELECT nextval('pgfresh.render_tickets')", &[])
        .await?
        .get(0))
}

/// Deletes the changes a batch applied (their fragments are in Redis) and commits the batch's
/// transaction, the COMMIT sent right behind the delete.
pub(crate) async fn complete(
    txn: Pipelined<'_>,
    kept: Option<&Kept>,
    ids: &[i64],
) -> Result<(), Error> {
    let Some((first, last)) = bounds(ids) else {
        return txn.commit().await;
    };
    txn.commit_with(
        kept,
        "DELETE FROM pgfresh.changes WHERE id BETWEEN $2 AND $3 AND id = ANY($1)",
        &[
            (&ids, Type::INT8_ARRAY),
            (&first, Type::INT8),
            (&last, Type::INT8),
        ],
    )
    .await
}

/// The lowest and highest of `ids`, which bound a statement over them to a range of the primary
/// key. Without it PostgreSQL plans `id = ANY(<a thousand ids>)` as a sequential scan of the whole
/// queue (cheaper, by its costs, than a thousand index probes), so each batch of a backlog read
/// every change still queued; a claimed batch is the oldest changes, close together, and the range
/// makes the index the cheap way.
fn bounds(ids: &[i64]) -> Option<(i64, i64)> {
    Some((*ids.iter().min()?, *ids.iter().max()?))
}

/// Records failed attempts: each change is retried after an exponential backoff (1 s doubling, at
/// most 5 minutes, each wait jittered by a quarter either way, so that changes failing together
/// come back apart) until it has failed `max_attempts` times, then moved to `pgfresh.failed`. The
/// exponent is capped: past about 44 attempts `2^attempts` seconds is out of PostgreSQL's interval
/// range, and the error would roll back the batch, so the change would never be parked.
pub(crate) async fn record_failures(
    txn: &Client,
    failures: &[Failure],
    max_attempts: i32,
) -> Result<Vec<Waiting>, Error> {
    if failures.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = failures.iter().map(|f| f.id).collect();
    let errors: Vec<&str> = failures.iter().map(|f| f.error.as_str()).collect();
    txn.query_typed(
        "WITH failure AS (
             SELECT * FROM unnest($1::bigint[], $2::text[]) AS f(id, error)
         ), parked AS (
             DELETE FROM pgfresh.changes c USING failure f
             WHERE c.id = f.id AND c.attempts + 1 >= $3
             RETURNING c.id, c.topic, c.key, c.enqueued_at, c.attempts + 1, f.error
         ), recorded AS (
             INSERT INTO pgfresh.failed (change_id, topic, key, enqueued_at, attempts, error)
             SELECT * FROM parked
             ON CONFLICT (change_id) DO NOTHING
         )
         UPDATE pgfresh.changes c
         SET attempts = c.attempts + 1,
             last_error = f.error,
             retry_at = now() + least(interval '1 second' * power(2, least(c.attempts, 16)), interval '5 minutes')
                                * (0.75 + random() / 2)
         FROM failure f
         WHERE c.id = f.id AND c.attempts + 1 < $3
         RETURNING c.id, extract(epoch FROM c.retry_at - now())::float8",
        &[
            (&ids, Type::INT8_ARRAY),
            (&errors, Type::TEXT_ARRAY),
            (&max_attempts, Type::INT4),
        ],
    )
    .await
    .map(|rows| rows.iter().map(Waiting::from_row).collect())
    .map_err(Error::from)
}

/// Notes on changes whose batch failed as a whole (Redis or PostgreSQL unreachable) why they still
/// wait, without counting an attempt. Best effort: when the database itself is gone, nothing can be
/// noted, and the log says it.
pub(crate) async fn note_error(client: &Client, ids: &[i64], error: &str) {
    let Some((first, last)) = bounds(ids) else {
        return;
    };
    let noted = client
        .execute_typed(
            "UPDATE pgfresh.changes SET last_error = $2 WHERE id BETWEEN $3 AND $4 AND id = ANY($1)",
            &[
                (&ids, Type::INT8_ARRAY),
                (&error, Type::TEXT),
                (&first, Type::INT8),
                (&last, Type::INT8),
            ],
        )
        .await;
    if let Err(noting) = noted {
        tracing::debug!(error = %noting, "cannot note why changes wait");
    }
}

/// Queues keys of `topic` again, outside any claim: a render whose ticket Redis had lost (so it may
/// have lost to an older one) is done once more, and a key a sweep could not refresh goes the way of
/// a failed change. A key given with an error counts one failed attempt and waits like one.
pub(crate) async fn requeue(
    client: &Client,
    topic: &str,
    keys: &[String],
    errors: &[Option<String>],
) -> Result<(), Error> {
    if keys.is_empty() {
        return Ok(());
    }
    // The transaction id first (the CTE is read before any row is formed), then the rows' ids:
    // listeners' floors count on every change being written that way (`listener::floor`).
    client
        .execute_typed(
            "WITH xid AS MATERIALIZED (SELECT pg_current_xact_id())
             INSERT INTO pgfresh.changes (topic, key, attempts, retry_at, last_error)
             SELECT $1, k.key, CASE WHEN k.error IS NULL THEN 0 ELSE 1 END,
                    CASE WHEN k.error IS NULL THEN '-infinity' ELSE now() + interval '1 second' END,
                    k.error
             FROM xid, unnest($2::text[], $3::text[]) AS k(key, error)",
            &[
                (&topic, Type::TEXT),
                (&keys, Type::TEXT_ARRAY),
                (&errors, Type::TEXT_ARRAY),
            ],
        )
        .await?;
    Ok(())
}

/// Whether the queue's identity hands out ids in the order they are taken: no cache (each
/// session would take ids in blocks of its own), counting up. What `listener::floor` counts on.
pub(crate) async fn ids_in_order(client: &Client) -> Result<bool, Error> {
    in_order(
        client,
        "pg_catalog.pg_get_serial_sequence('pgfresh.changes', 'id')",
    )
    .await
}

/// Whether `pgfresh.render_tickets` hands out tickets in the order they are taken, as
/// [`ids_in_order`] asks of the queue's ids: renders on different sessions are ordered by them,
/// and Redis keeps the render with the higher ticket.
pub(crate) async fn tickets_in_order(client: &Client) -> Result<bool, Error> {
    in_order(client, "'pgfresh.render_tickets'").await
}

/// Whether the sequence `sequence` (an SQL expression of its name) has no cache and counts up.
async fn in_order(client: &Client, sequence: &str) -> Result<bool, Error> {
    let row = client
        .query_typed_one(
            &format!(
                "SELECT s.seqcache = 1 AND s.seqincrement > 0
                 FROM pg_catalog.pg_sequence s
                 WHERE s.seqrelid = {sequence}::regclass"
            ),
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Moves every parked change back into `db`'s queue, each for a fresh start; returns how many. What
/// the `retry-failed` command does.
pub async fn retry_failed(db: &crate::pg::Database) -> Result<u64, Error> {
    retry_failed_on(&*db.pinned().await?).await
}

async fn retry_failed_on(client: &Client) -> Result<u64, Error> {
    Ok(client
        .execute_typed(
            // Deleted (which gives the transaction its id) before any row's id is taken.
            "WITH moved AS (DELETE FROM pgfresh.failed RETURNING topic, key, change_id)
             INSERT INTO pgfresh.changes (topic, key)
             SELECT topic, key FROM moved ORDER BY change_id",
            &[],
        )
        .await?)
}

/// Up to this many queued or parked rows are counted exactly; beyond it the count is estimated, so
/// that reading the figures costs little however long the queue has grown.
pub(crate) const EXACT_COUNT_LIMIT: i64 = 100_000;

/// Pending and parked counts and the age of the oldest pending change, at a bounded cost: counts
/// stop at [`EXACT_COUNT_LIMIT`] rows, and the oldest change is the one with the lowest id (ids grow
/// with time), found through the primary key past `floor` (a listener's, `listener::floor`, so
/// that the look does not walk over applied changes a held snapshot keeps; else `i64::MIN`), as
/// are the ids that bound an estimate and the changes counted: between the floor and the last id,
/// a range the planner takes through the key even with no statistics on the queue (an open
/// `id > floor`, it reads with a sequential scan: every applied change still kept, at every
/// heartbeat).
pub(crate) async fn stats(client: &Client, floor: i64) -> Result<QueueStats, Error> {
    let sql = format!(
        "SELECT (SELECT count(*)
                 FROM (SELECT FROM pgfresh.changes
                       WHERE id > $2 AND id <= (SELECT max(id) FROM pgfresh.changes WHERE id > $2)
                       LIMIT $1) AS counted),
                (SELECT max(id) - min(id) + 1 FROM pgfresh.changes WHERE id > $2),
                (SELECT extract(epoch FROM now() - enqueued_at)::float8
                 FROM pgfresh.changes WHERE id > $2 AND isfinite(enqueued_at) ORDER BY id LIMIT 1),
                (SELECT count(*) FROM (SELECT FROM pgfresh.failed LIMIT $1) AS counted),
                (SELECT extract(epoch FROM clock_timestamp() - {ORIGIN})::float8
                 FROM pgfresh.changes WHERE id > $2 ORDER BY id LIMIT 1)"
    );
    let row = client
        .query_typed_one(
            &sql,
            &[(&(EXACT_COUNT_LIMIT + 1), Type::INT8), (&floor, Type::INT8)],
        )
        .await?;
    let counted: i64 = row.get(0);
    let pending_estimated = counted > EXACT_COUNT_LIMIT;
    Ok(QueueStats {
        pending: if pending_estimated {
            row.get::<_, Option<i64>>(1).unwrap_or(counted).max(counted)
        } else {
            counted
        },
        pending_estimated,
        oldest: row
            .get::<_, Option<f64>>(2)
            .map(|secs| Duration::from_secs_f64(secs.max(0.0))),
        lag: row
            .get::<_, Option<f64>>(4)
            .map(|secs| Duration::from_secs_f64(secs.max(0.0))),
        parked: row.get(3),
    })
}

/// Those of `keys` that no change of `topics` waits for in the queue: keys a sweep repaired although
/// nothing the triggers captured was on its way to them.
pub(crate) async fn not_pending(
    client: &Client,
    topics: &[&str],
    keys: &[&str],
) -> Result<Vec<String>, Error> {
    let rows = client
        .query_typed(
            "SELECT k FROM unnest($2::text[]) AS k
             WHERE NOT EXISTS (SELECT FROM pgfresh.changes c WHERE c.topic = ANY($1) AND c.key = k)",
            &[(&topics, Type::TEXT_ARRAY), (&keys, Type::TEXT_ARRAY)],
        )
        .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// A change that failed: retrying, or parked in `pgfresh.failed`.
#[derive(Clone, Debug)]
pub(crate) struct Trouble {
    pub(crate) topic: String,
    pub(crate) key: String,
    /// Failed attempts so far.
    pub(crate) attempts: i32,
    pub(crate) error: String,
    /// For a change still retrying: seconds until its next attempt; `None` once parked.
    pub(crate) retry_in: Option<f64>,
}

/// The latest parked changes, and the retrying changes among the oldest [`EXACT_COUNT_LIMIT`] queued
/// (a bounded read, however long the queue), up to `limit` of each, newest first.
pub(crate) async fn troubles(client: &Client, limit: i64) -> Result<Vec<Trouble>, Error> {
    let rows = client
        .query_typed(
            "(SELECT topic, key, attempts, coalesce(last_error, ''),
                     greatest(extract(epoch FROM retry_at - now()), 0)::float8
              FROM (SELECT * FROM pgfresh.changes ORDER BY id LIMIT $2) AS oldest
              WHERE attempts > 0 ORDER BY id DESC LIMIT $1)
             UNION ALL
             (SELECT topic, key, attempts, error, NULL
              FROM pgfresh.failed ORDER BY failed_at DESC, change_id DESC LIMIT $1)",
            &[(&limit, Type::INT8), (&EXACT_COUNT_LIMIT, Type::INT8)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| Trouble {
            topic: row.get(0),
            key: row.get(1),
            attempts: row.get(2),
            error: row.get(3),
            retry_in: row.get(4),
        })
        .collect())
}

/// `pg_notification_queue_usage()`: how full PostgreSQL's NOTIFY queue is (0 to 1). A long-open
/// transaction in a listening session stops it from being cleaned up.
pub(crate) async fn notification_queue_usage(client: &Client) -> Result<f64, Error> {
    Ok(client
        .query_typed_one("SELECT pg_notification_queue_usage()", &[])
        .await?
        .get(0))
}
