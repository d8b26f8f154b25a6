//! The listener registry, `pgfresh.listeners` (unlogged): who runs, whether it waits for NOTIFYs
//! (triggers only notify while a live listener is idle), which fragment versions it renders and where
//! it stores them, and whether it stands aside for a newer version (the column is named
//! `superseded`). Heartbeats keep each row fresh and publish the listener's totals for `status`.

use std::time::Duration;

use tokio_postgres::Client;
use tokio_postgres::types::Type;

use crate::Error;

/// How often a live listener writes its row (its heartbeat).
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(5);

/// A listener that has not written its row for this long (three missed heartbeats) no longer
/// counts among those sharing fragments: others stop standing aside or waiting for it, and where
/// it stored its fragments binds them no more.
const SHARING_WINDOW: Duration = Duration::from_secs(15);

/// A listener that has not written its row for this long is gone: `status` and `doctor` stop
/// listing it, and triggers stop waking it (their own window, in the capture code since migration
/// 0001, is this minute too).
const LIVE_WINDOW: Duration = Duration::from_secs(60);

/// The windows as SQL takes them, in seconds: `seen_at > now() - $n * interval '1 second'`.
fn seconds(window: Duration) -> f64 {
    window.as_secs_f64()
}

/// Who a running listener is: its id and the fragment versions it renders, as kept in
/// `pgfresh.listeners`.
#[derive(Clone, Debug)]
pub(crate) struct ListenerIdentity {
    /// Unique per process: `<host>:<pid>:<random>`.
    pub(crate) id: String,
    /// Names of the fragments it renders.
    pub(crate) fragments: Vec<String>,
    /// Their versions, in the same order.
    pub(crate) versions: Vec<i64>,
    /// Where each is stored in Redis (`<stored prefix>* (<format>)`), in the same order.
    pub(crate) stored: Vec<String>,
}

/// The live listeners other than `me` ($1) rendering a fragment `me` renders too (names $2, versions
/// $3), one row per shared fragment: `theirs.version` against `mine.version`. A listener that stopped
/// heartbeating counts as live for [`SHARING_WINDOW`] ($4, in seconds).
const OTHERS_SHARING_MY_FRAGMENTS: &str = "FROM pgfresh.listeners l
     CROSS JOIN LATERAL unnest(l.fragments, l.versions) AS theirs(name, version)
     JOIN unnest($2::text[], $3::bigint[]) AS mine(name, version) USING (name)
     WHERE l.id <> $1 AND l.seen_at > now() - $4::float8 * interval '1 second'";

/// Serializes listeners' start-up checks, so that two conflicting listeners starting at once cannot
/// both pass [`check_sharing`]: locks the sweep lease's row (which only listeners may update) until
/// the transaction ends.
pub(crate) async fn lock_registrations(txn: &Client) -> Result<(), Error> {
    txn.execute_typed("SELECT FROM pgfresh.sweep_lease FOR UPDATE", &[])
        .await?;
    Ok(())
}

/// Everything a listener's row says: written whole by [`write_row`], its one writer, so that a row
/// re-created after a PostgreSQL crash (the table is unlogged) says all it said before.
pub(crate) struct ListenerRow<'a> {
    pub(crate) me: &'a ListenerIdentity,
    /// It waits for NOTIFYs: triggers notify while some live listener is idle.
    pub(crate) idle: bool,
    /// It stands aside for a listener with newer fragment versions (column `superseded`).
    pub(crate) standing_aside: bool,
    /// Changes it applied (column `changes_done`), and stale writes Redis refused.
    pub(crate) applied: i64,
    pub(crate) refused: i64,
    /// When it first registered (seconds since the Unix epoch, PostgreSQL's clock), kept when the
    /// row is written again after a crash emptied the registry: which of two listeners came first
    /// does not change. `None` the first time: now, then.
    pub(crate) started_at: Option<f64>,
}

/// Writes this listener's row, all of it, and says it is alive. Returns when it first registered.
pub(crate) async fn write_row(client: &Client, row: &ListenerRow<'_>) -> Result<f64, Error> {
    let me = row.me;
    let written = client
        .query_typed_one(
            "INSERT INTO pgfresh.listeners
                 (id, idle, superseded, changes_done, refused_writes, fragments, versions, stored,
                  started_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, coalesce(to_timestamp($9::float8), now()))
             ON CONFLICT (id) DO UPDATE
             SET idle = $2, superseded = $3, changes_done = $4, refused_writes = $5,
                 fragments = $6, versions = $7, stored = $8, seen_at = now()
             RETURNING extract(epoch FROM started_at)::float8",
            &[
                (&me.id, Type::TEXT),
                (&row.idle, Type::BOOL),
                (&row.standing_aside, Type::BOOL),
                (&row.applied, Type::INT8),
                (&row.refused, Type::INT8),
                (&me.fragments, Type::TEXT_ARRAY),
                (&me.versions, Type::INT8_ARRAY),
                (&me.stored, Type::TEXT_ARRAY),
                (&row.started_at, Type::FLOAT8),
            ],
        )
        .await?;
    Ok(written.get(0))
}

/// Tells the triggers until when some listener waits for a NOTIFY: a minute past the last heartbeat
/// of the latest idle listener, none when none is idle (schema version 7's `pgfresh.notify_until`,
/// read by every capture instead of this table). Called after each write of a listener's row.
pub(crate) async fn publish_idle(client: &Client) -> Result<(), Error> {
    client
        .execute_typed(
            "SELECT setval('pgfresh.notify_until', coalesce(
                 (SELECT max(date_part('epoch', seen_at + $1::float8 * interval '1 second'))::bigint
                  FROM pgfresh.listeners WHERE idle), 0))",
            &[(&seconds(LIVE_WINDOW), Type::FLOAT8)],
        )
        .await?;
    Ok(())
}

/// Fails if a live listener other than `me` would share Redis with it badly: storing one of `me`'s
/// fragments elsewhere (the two would split the queue between them, each change reaching only one
/// place), or another fragment under a key prefix that overlaps one of `me`'s (see
/// [`prefix_conflict`]). Only listeners registered before `me` count (all of them while `me` is not
/// registered yet): of two in conflict, the later one gives way. Listeners older than schema
/// version 5 do not say where they store, and are not counted.
pub(crate) async fn check_sharing(client: &Client, me: &ListenerIdentity) -> Result<(), Error> {
    let row = client
        .query_typed_opt(
            "SELECT l.id, theirs.name, theirs.stored, mine.stored
             FROM pgfresh.listeners l
             CROSS JOIN LATERAL unnest(l.fragments, l.stored) AS theirs(name, stored)
             JOIN unnest($2::text[], $3::text[]) AS mine(name, stored) USING (name)
             WHERE l.id <> $1 AND l.seen_at > now() - $4::float8 * interval '1 second'
               AND l.stored IS NOT NULL AND theirs.stored IS DISTINCT FROM mine.stored
               AND (l.started_at, l.id) < (SELECT coalesce(max(started_at), 'infinity'), $1
                                          FROM pgfresh.listeners WHERE id = $1)
             ORDER BY l.started_at LIMIT 1",
            &[
                (&me.id, Type::TEXT),
                (&me.fragments, Type::TEXT_ARRAY),
                (&me.stored, Type::TEXT_ARRAY),
                (&seconds(SHARING_WINDOW), Type::FLOAT8),
            ],
        )
        .await?;
    if let Some(row) = row {
        return Err(Error::StorageConflict {
            listener: row.get(0),
            fragment: row.get(1),
            theirs: row.get(2),
            mine: row.get(3),
        });
    }
    prefix_conflict(client, me).await
}

/// The stored key prefix in a `stored` entry (`<prefix>* (<format>)`).
fn stored_prefix(stored: &str) -> &str {
    stored
        .rsplit_once("* (")
        .map_or(stored, |(prefix, _)| prefix)
}

/// Fails if a live listener other than `me` stores a fragment `me` does not render under a key
/// prefix that starts one of `me`'s, or starts with one: each one's sweep would take the other's
/// entries for orphans and delete them. Fragments' own checks catch this within one binary; this,
/// between binaries (and Django `KEY_PREFIX`es) sharing a database.
async fn prefix_conflict(client: &Client, me: &ListenerIdentity) -> Result<(), Error> {
    let rows = client
        .query_typed(
            "SELECT l.id, theirs.name, theirs.stored
             FROM pgfresh.listeners l
             CROSS JOIN LATERAL unnest(l.fragments, l.stored) AS theirs(name, stored)
             WHERE l.id <> $1 AND l.seen_at > now() - $3::float8 * interval '1 second'
               AND theirs.stored IS NOT NULL AND NOT theirs.name = ANY($2)
               AND (l.started_at, l.id) < (SELECT coalesce(max(started_at), 'infinity'), $1
                                          FROM pgfresh.listeners WHERE id = $1)
             ORDER BY l.started_at",
            &[
                (&me.id, Type::TEXT),
                (&me.fragments, Type::TEXT_ARRAY),
                (&seconds(SHARING_WINDOW), Type::FLOAT8),
            ],
        )
        .await?;
    for row in &rows {
        let (listener, theirs, stored): (String, String, String) =
            (row.get(0), row.get(1), row.get(2));
        let their_prefix = stored_prefix(&stored);
        let mine = me.fragments.iter().zip(&me.stored).find(|(_, mine)| {
            let my_prefix = stored_prefix(mine);
            my_prefix.starts_with(their_prefix) || their_prefix.starts_with(my_prefix)
        });
        if let Some((mine, my_stored)) = mine {
            return Err(Error::PrefixConflict {
                listener,
                theirs,
                their_prefix: their_prefix.to_string(),
                mine: mine.clone(),
                my_prefix: stored_prefix(my_stored).to_string(),
            });
        }
    }
    Ok(())
}

/// Live listeners other than `me` (`$1`, with fragments `$2` at versions `$3`) started after it that
/// render every fragment `me` renders, none at an older version, and more, and do not stand aside
/// themselves: a release that added a fragment (to a topic `me`'s fragments share, say) and
/// changed no version. Its listeners are newer. (Started after: a release that removed a fragment
/// renders part of what its predecessor does, and must not stand aside for it. Two binaries, one
/// rendering part of what the other does, count as releases of one: the earlier stands aside.)
const OTHERS_RENDERING_ALL_MINE_AND_MORE: &str = "FROM pgfresh.listeners l
     WHERE l.id <> $1 AND l.seen_at > now() - $4::float8 * interval '1 second'
       AND NOT l.superseded
       AND l.started_at > (SELECT me.started_at FROM pgfresh.listeners me WHERE me.id = $1)
       AND $2::text[] <@ l.fragments AND NOT l.fragments <@ $2::text[]
       AND NOT EXISTS (SELECT FROM unnest(l.fragments, l.versions) AS theirs(name, version)
                       JOIN unnest($2::text[], $3::bigint[]) AS mine(name, version) USING (name)
                       WHERE theirs.version < mine.version)";

/// Live listeners other than `me` started before it whose fragments `me` renders every one of,
/// none at an older version, and more: older, as [`OTHERS_RENDERING_ALL_MINE_AND_MORE`] are newer.
const OTHERS_RENDERING_PART_OF_MINE: &str = "FROM pgfresh.listeners l
     WHERE l.id <> $1 AND l.seen_at > now() - $4::float8 * interval '1 second'
       AND l.started_at < (SELECT me.started_at FROM pgfresh.listeners me WHERE me.id = $1)
       AND cardinality(l.fragments) > 0
       AND l.fragments <@ $2::text[] AND NOT $2::text[] <@ l.fragments
       AND NOT EXISTS (SELECT FROM unnest(l.fragments, l.versions) AS theirs(name, version)
                       JOIN unnest($2::text[], $3::bigint[]) AS mine(name, version) USING (name)
                       WHERE theirs.version > mine.version)";

/// Whether a live listener other than `me` is newer: it renders a newer version of one of `me`'s
/// fragments, or, started after `me`, every one of them at the same version or newer, and more.
/// (A listener whose fragments only overlap `me`'s, another binary's, is neither newer nor older.)
pub(crate) async fn newer_listener_running(
    client: &Client,
    me: &ListenerIdentity,
) -> Result<bool, Error> {
    Ok(client
        .query_typed_one(
            &format!(
                "SELECT EXISTS (SELECT {OTHERS_SHARING_MY_FRAGMENTS}
                                AND theirs.version > mine.version)
                     OR EXISTS (SELECT {OTHERS_RENDERING_ALL_MINE_AND_MORE})"
            ),
            &[
                (&me.id, Type::TEXT),
                (&me.fragments, Type::TEXT_ARRAY),
                (&me.versions, Type::INT8_ARRAY),
                (&seconds(SHARING_WINDOW), Type::FLOAT8),
            ],
        )
        .await?
        .get(0))
}

/// Live listeners still applying changes that are older than `me`: with an older version of one
/// of `me`'s fragments, or with part of `me`'s fragments (see [`newer_listener_running`]).
pub(crate) async fn older_listeners_working(
    client: &Client,
    me: &ListenerIdentity,
) -> Result<i64, Error> {
    Ok(client
        .query_typed_one(
            &format!(
                "SELECT count(DISTINCT id) FROM (
                     SELECT l.id {OTHERS_SHARING_MY_FRAGMENTS}
                     AND NOT l.superseded AND theirs.version < mine.version
                     UNION ALL
                     SELECT l.id {OTHERS_RENDERING_PART_OF_MINE} AND NOT l.superseded
                 ) AS older"
            ),
            &[
                (&me.id, Type::TEXT),
                (&me.fragments, Type::TEXT_ARRAY),
                (&me.versions, Type::INT8_ARRAY),
                (&seconds(SHARING_WINDOW), Type::FLOAT8),
            ],
        )
        .await?
        .get(0))
}

/// How long the row of a listener that stopped heartbeating without removing it (killed, its host
/// gone) stays: far past every window that counts it, so that a fleet whose listeners are killed now
/// and then does not grow the table for good.
const FORGOTTEN_AFTER: Duration = Duration::from_secs(3600);

/// Deletes the rows of listeners not seen for [`FORGOTTEN_AFTER`]; a listener does it as it
/// registers.
pub(crate) async fn forget_long_gone(client: &Client) -> Result<(), Error> {
    client
        .execute_typed(
            "DELETE FROM pgfresh.listeners WHERE seen_at < now() - $1::float8 * interval '1 second'",
            &[(&seconds(FORGOTTEN_AFTER), Type::FLOAT8)],
        )
        .await?;
    Ok(())
}

/// Removes a listener that is shutting down (and tells the triggers, if it was the last idle one).
pub(crate) async fn deregister_listener(client: &Client, listener_id: &str) -> Result<(), Error> {
    client
        .execute_typed(
            "DELETE FROM pgfresh.listeners WHERE id = $1",
            &[(&listener_id, Type::TEXT)],
        )
        .await?;
    publish_idle(client).await
}

/// A live listener, as `status` shows it.
pub(crate) struct LiveListener {
    pub(crate) id: String,
    pub(crate) idle: bool,
    pub(crate) seen_seconds_ago: f64,
    /// Changes it applied (the column is `changes_done`).
    pub(crate) applied: i64,
    pub(crate) refused: i64,
    pub(crate) standing_aside: bool,
    /// The fragment versions it renders, as "name v1, other v2".
    pub(crate) renders: String,
}

/// The listeners seen in the last minute, oldest first. `version` is the installed schema's: version
/// 3 added what each renders, and whether it stands aside.
pub(crate) async fn live_listeners(
    client: &Client,
    version: i32,
) -> Result<Vec<LiveListener>, Error> {
    let versions = if version >= 5 {
        "superseded, array_to_string(ARRAY(SELECT f || ' v' || v || coalesce(' at ' || s, '')
                                           FROM unnest(fragments, versions, stored) AS x(f, v, s)), ', ')"
    } else if version >= 3 {
        "superseded, array_to_string(ARRAY(SELECT f || ' v' || v FROM unnest(fragments, versions) AS x(f, v)), ', ')"
    } else {
        "false, ''"
    };
    let rows = client
        .query_typed(
            &format!(
                "SELECT id, idle, extract(epoch FROM now() - seen_at)::float8, changes_done, refused_writes, {versions}
                 FROM pgfresh.listeners
                 WHERE seen_at > now() - $1::float8 * interval '1 second' ORDER BY started_at"
            ),
            &[(&seconds(LIVE_WINDOW), Type::FLOAT8)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| LiveListener {
            id: row.get(0),
            idle: row.get(1),
            seen_seconds_ago: row.get(2),
            applied: row.get(3),
            refused: row.get(4),
            standing_aside: row.get(5),
            renders: row.get(6),
        })
        .collect())
}
