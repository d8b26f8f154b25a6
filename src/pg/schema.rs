//! Installing, upgrading, checking and removing the pgfresh schema.
//!
//! The SQL files under `sql/` are embedded here unchanged and applied exactly as `sql/install.sql`
//! applies them with psql: `prepare.sql`, then each numbered migration not yet recorded in
//! `pgfresh.migrations`, then `finish.sql`, all in one transaction. The list of migrations is
//! `sql/install.sql`'s own (see `build.rs`).

use tokio_postgres::Client;
use tokio_postgres::types::Type;

use crate::Error;
use crate::pg::Database;

/// The file every install runs first (schema, version table, install lock).
pub(crate) const PREPARE_SQL: &str = include_str!("../../sql/prepare.sql");
/// The file every install runs last (PUBLIC's rights, whatever default privileges apply).
pub(crate) const FINISH_SQL: &str = include_str!("../../sql/finish.sql");
/// The uninstall script, run as is.
pub(crate) const UNINSTALL_SQL: &str = include_str!("../../sql/uninstall.sql");

/// A numbered, forward-only schema migration.
pub(crate) struct Migration {
    /// Its number; recorded in `pgfresh.migrations` by the file itself.
    pub(crate) version: i32,
    /// Its file name under `sql/migrations/`, without `.sql`.
    pub(crate) name: &'static str,
    /// The SQL, exactly as in the file.
    pub(crate) sql: &'static str,
}

/// Every migration this binary knows, in order: the files `sql/install.sql` applies, read from it by
/// `build.rs` (add a migration there, and only there).
pub(crate) const MIGRATIONS: &[Migration] = include!(concat!(env!("OUT_DIR"), "/migrations.rs"));

/// The schema version this binary needs.
pub fn required_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Installs pgfresh or upgrades it to this binary's version; a no-op when already there. Returns the
/// migrations applied.
pub async fn install(db: &Database) -> Result<Vec<&'static str>, Error> {
    let mut client = db.pinned().await?;
    let txn = client.transaction().await?;
    txn.batch_execute("SET LOCAL client_min_messages = warning")
        .await?;
    txn.batch_execute(PREPARE_SQL).await?;
    let mut applied = Vec::new();
    for migration in MIGRATIONS {
        let done = txn
            .query_typed_opt(
                "SELECT FROM pgfresh.migrations WHERE version = $1",
                &[(&migration.version, Type::INT4)],
            )
            .await?
            .is_some();
        if !done {
            txn.batch_execute(migration.sql).await?;
            applied.push(migration.name);
        }
    }
    txn.batch_execute(FINISH_SQL).await?;
    txn.commit().await?;
    Ok(applied)
}

/// Removes every pgfresh object, triggers on user tables included; user tables are untouched.
pub async fn uninstall(db: &Database) -> Result<(), Error> {
    // The file carries its own BEGIN/COMMIT for psql; as one simple-query batch it runs the same way.
    let client = db.pinned().await?;
    if let Err(error) = client.batch_execute(UNINSTALL_SQL).await {
        // Its transaction stopped part-way: ended here, so the session goes back to the pool usable.
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(error.into());
    }
    Ok(())
}

/// The schema version installed in `db`, or `None` when pgfresh is not installed there.
pub async fn installed_version(db: &Database) -> Result<Option<i32>, Error> {
    version_on(&*db.pinned().await?).await
}

/// The installed schema version, on a connection already at hand.
pub(crate) async fn version_on(client: &Client) -> Result<Option<i32>, Error> {
    let present: bool = client
        .query_typed_one("SELECT to_regclass('pgfresh.migrations') IS NOT NULL", &[])
        .await?
        .get(0);
    if !present {
        return Ok(None);
    }
    Ok(client
        .query_typed_one("SELECT max(version) FROM pgfresh.migrations", &[])
        .await?
        .get(0))
}

/// Fails with a message saying what to run unless this binary's schema version is installed.
pub(crate) async fn ensure_installed(db: &Database) -> Result<(), Error> {
    match installed_version(db).await? {
        None => Err(Error::NotInstalled {
            database: db.name(),
        }),
        Some(installed) if installed < required_version() => Err(Error::OutdatedSchema {
            database: db.name(),
            installed,
            required: required_version(),
        }),
        Some(_) => Ok(()),
    }
}

/// What a listener does to pgfresh's tables, as `sql/roles.sql` grants it to `pgfresh_listener`.
const LISTENER_NEEDS: &[(&str, &str)] = &[
    ("pgfresh.changes", "SELECT, DELETE"),
    ("pgfresh.failed", "SELECT, INSERT"),
    ("pgfresh.listeners", "SELECT, INSERT, UPDATE, DELETE"),
    ("pgfresh.migrations", "SELECT"),
    ("pgfresh.watches", "SELECT"),
    ("pgfresh.truncations", "SELECT, DELETE"),
    ("pgfresh.sweep_lease", "SELECT, UPDATE"),
    ("pgfresh.sweeps", "SELECT, INSERT, DELETE"),
    ("pgfresh.server_epoch", "SELECT, INSERT"),
    ("pgfresh.notify_until", "UPDATE"),
];

/// What this session's role lacks of what a listener does to pgfresh's tables, as
/// `table: privilege` (empty when nothing is missing): a listener role not given the grants of a
/// newer schema version (`sql/roles.sql` not run again after `install`) cannot sweep.
pub(crate) async fn missing_listener_grants(client: &Client) -> Result<Vec<String>, Error> {
    let mut missing = Vec::new();
    for (table, privileges) in LISTENER_NEEDS {
        for privilege in privileges.split(", ") {
            // For a sequence, UPDATE is setval's right, and has_sequence_privilege's to tell.
            let held: bool = client
                .query_typed_one(
                    "SELECT CASE WHEN c.relkind = 'S' THEN has_sequence_privilege(c.oid, $2)
                                 ELSE has_table_privilege(c.oid, $2) END
                     FROM pg_class c WHERE c.oid = $1::text::regclass",
                    &[(table, Type::TEXT), (&privilege, Type::TEXT)],
                )
                .await?
                .get(0);
            if !held {
                missing.push(format!("{table}: {privilege}"));
            }
        }
    }
    Ok(missing)
}

/// What this session's role may do beyond what pgfresh needs, in words ("superuser postgres",
/// "role app with BYPASSRLS"), or `None`. pgfresh needs only `pgfresh_listener`'s rights; under more,
/// every loader and through query runs with them too.
pub(crate) async fn excess_privileges(client: &Client) -> Result<Option<String>, Error> {
    let row = client
        .query_typed_one(
            "SELECT current_user::text, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?;
    let (role, superuser, bypass): (String, bool, bool) = (row.get(0), row.get(1), row.get(2));
    Ok(if superuser {
        Some(format!("superuser {role}"))
    } else if bypass {
        Some(format!(
            "role {role}, which bypasses row-level security (BYPASSRLS)"
        ))
    } else {
        None
    })
}

/// One watch, as `status` shows it.
pub(crate) struct Watch {
    pub(crate) table_oid: u32,
    /// The table's name, schema-qualified and quoted as SQL needs it.
    pub(crate) table: String,
    pub(crate) key_column: String,
    pub(crate) topic: String,
}

/// Every watch, by table and topic.
pub(crate) async fn watches(client: &Client) -> Result<Vec<Watch>, Error> {
    let rows = client
        .query_typed(
            "SELECT table_oid::regclass::text, key_column::text, topic, table_oid
             FROM pgfresh.watches ORDER BY 1, 3",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| Watch {
            table_oid: row.get(3),
            table: row.get(0),
            key_column: row.get(1),
            topic: row.get(2),
        })
        .collect())
}

/// The SQL expression that reads a watch's key column as text the way its capture trigger does,
/// running no code of the table owner's: `::text` while the column's type is (a domain over) one of
/// PostgreSQL's own, whose casts only a superuser can define; else the type's output function, which
/// for any type a role other than a superuser can create is PostgreSQL's own code. A column of a type
/// of their own with `CREATE CAST (... AS text)` would otherwise run the owner's function as whoever
/// reads it.
/// Returns (the expression, the quoted column).
pub(crate) async fn key_as_text(client: &Client, watch: &Watch) -> Result<(String, String), Error> {
    let row = client
        .query_typed_opt(
            "WITH RECURSIVE chain(type, depth) AS (
                 SELECT a.atttypid, 0 FROM pg_attribute a
                 WHERE a.attrelid = $1 AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped
                 UNION ALL
                 SELECT t.typbasetype, c.depth + 1 FROM chain c JOIN pg_type t ON t.oid = c.type
                 WHERE t.typtype = 'd'
             )
             SELECT type < 16384 FROM chain ORDER BY depth DESC LIMIT 1",
            &[
                (&watch.table_oid, Type::OID),
                (&watch.key_column, Type::TEXT),
            ],
        )
        .await?;
    let column = format!("\"{}\"", watch.key_column.replace('"', "\"\""));
    let expression = match row.map(|row| row.get::<_, bool>(0)) {
        Some(true) => format!("{column}::pg_catalog.text"),
        _ => format!("pg_catalog.format('%s', {column})"),
    };
    Ok((expression, column))
}

/// A watch whose changes are not captured somewhere: one of its triggers is missing (dropped), or
/// does not fire on the origin (disabled, or enabled only as a replica's).
pub(crate) struct CaptureGap {
    /// What is wrong, in words: `trigger "pgfresh_product" on public.reviews is disabled`.
    pub(crate) what: String,
    /// The SQL that puts it right.
    pub(crate) fix: String,
}

/// Every watch's triggers that do not capture: the row trigger on the table and on each of its
/// partitions, and the TRUNCATE trigger on the table and on each partition but a foreign one (which
/// takes none; migration 0008), found by the function they call (so a renamed trigger still
/// counts), and each firing on the origin (`tgenabled` `O` or `A`), and, where a logical
/// replication subscription of this database writes the table, on the apply worker's writes too
/// (`A`: the worker writes as a replica).
pub(crate) async fn capture_gaps(client: &Client) -> Result<Vec<CaptureGap>, Error> {
    let rows = client
        .query_typed(
            "WITH watched AS (
                 SELECT w.table_oid, w.topic, w.key_column, part.relid
                 FROM pgfresh.watches w, LATERAL (
                     SELECT w.table_oid::regclass AS relid
                     UNION SELECT relid FROM pg_partition_tree(w.table_oid)
                 ) part
                 WHERE EXISTS (SELECT FROM pg_class c WHERE c.oid = w.table_oid)
             ), expected AS (
                 SELECT table_oid, topic, key_column, relid, 'row' AS kind,
                        format('capture_%s_%s', table_oid, topic) AS function, NULL::bytea AS args
                 FROM watched
                 UNION ALL
                 SELECT table_oid, topic, key_column, relid, 'TRUNCATE', 'capture_truncate',
                        convert_to(topic, current_setting('server_encoding')) || '\\x00'::bytea
                 FROM watched
                 WHERE (SELECT c.relkind FROM pg_class c WHERE c.oid = watched.relid) <> 'f'
             ), subscribed AS (
                 SELECT r.srrelid AS relid, s.subname
                 FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid
                 WHERE s.subdbid = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
             )
             SELECT e.relid::regclass::text, e.kind, t.name, t.state,
                    format('SELECT pgfresh.watch(%L, %L, %L);', e.table_oid::regclass::text, e.key_column, e.topic),
                    sub.subname::text
             FROM expected e
             LEFT JOIN LATERAL (
                 SELECT format('%I', t.tgname) AS name, t.tgenabled::text AS state
                 FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
                 WHERE t.tgrelid = e.relid AND p.pronamespace = 'pgfresh'::regnamespace
                   AND p.proname = e.function AND (e.args IS NULL OR t.tgargs = e.args)
                 ORDER BY t.tgenabled IN ('O', 'A') DESC LIMIT 1
             ) t ON true
             LEFT JOIN LATERAL (
                 SELECT subscribed.subname FROM subscribed
                 WHERE subscribed.relid IN (e.relid, e.table_oid)
                 ORDER BY 1 LIMIT 1
             ) sub ON true
             WHERE t.state IS DISTINCT FROM 'A'
               AND (t.state IS DISTINCT FROM 'O' OR sub.subname IS NOT NULL)
             ORDER BY 1, 2",
            &[],
        )
        .await?;
    let mut gaps = dropped_tables(client).await?;
    gaps.extend(lost_key_columns(client).await?);
    gaps.extend(rows.iter().map(|row| {
        let (table, kind, watch): (String, String, String) = (row.get(0), row.get(1), row.get(4));
        match (
            row.get::<_, Option<String>>(2),
            row.get::<_, Option<String>>(3),
        ) {
            (Some(trigger), Some(state)) => {
                let fires = match state.as_str() {
                    "O" => "fires on this server's own writes only",
                    "R" => "fires only on replicas (ENABLE REPLICA TRIGGER)",
                    _ => "is disabled",
                };
                // A table a subscription writes needs it ALWAYS: the apply worker writes as a
                // replica.
                match row.get::<_, Option<String>>(5) {
                    Some(subscription) => CaptureGap {
                        what: format!(
                            "trigger {trigger} on {table} {fires}, and subscription {subscription} writes {table} as a replica"
                        ),
                        fix: format!(
                            "ALTER TABLE {table} ENABLE ALWAYS TRIGGER {trigger}; then run `sweep`"
                        ),
                    },
                    None => CaptureGap {
                        what: format!("trigger {trigger} on {table} {fires}"),
                        fix: format!(
                            "ALTER TABLE {table} ENABLE TRIGGER {trigger}; then run `sweep`"
                        ),
                    },
                }
            }
            _ => CaptureGap {
                what: format!("the {kind} trigger of a watch on {table} is missing"),
                fix: format!("{watch} (it recreates the watch's triggers); then run `sweep`"),
            },
        }
    }));
    Ok(gaps)
}

/// The settings a capture trigger fixes for keys of dates, times, numbers and bytes (migration 0004,
/// `watch_rows`), so that one key queues as one text whoever writes; set for the rest of a
/// transaction.
pub(crate) const KEY_TEXT_SETTINGS: &str = "SET LOCAL DateStyle = 'ISO, YMD';
     SET LOCAL IntervalStyle = postgres; SET LOCAL TimeZone = 'UTC';
     SET LOCAL extra_float_digits = 1; SET LOCAL bytea_output = hex; SET LOCAL lc_monetary = 'C'";

/// Watches whose key column is gone from their table (renamed, or dropped): their capture function
/// still reads it by its name, so every write to the table fails until the watch is made again.
async fn lost_key_columns(client: &Client) -> Result<Vec<CaptureGap>, Error> {
    let rows = client
        .query_typed(
            "SELECT w.table_oid::regclass::text, w.topic, w.key_column::text
             FROM pgfresh.watches w
             WHERE EXISTS (SELECT FROM pg_class c WHERE c.oid = w.table_oid)
               AND NOT EXISTS (SELECT FROM pg_attribute a
                               WHERE a.attrelid = w.table_oid AND a.attname = w.key_column
                                 AND a.attnum > 0 AND NOT a.attisdropped)
             ORDER BY 1, 2",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| {
            let (table, topic, column): (String, String, String) =
                (row.get(0), row.get(1), row.get(2));
            CaptureGap {
                what: format!(
                    "the watch on {table} for topic {topic} reads column {column}, which it no longer has (renamed or dropped): every write to {table} fails"
                ),
                fix: format!(
                    "SELECT pgfresh.watch('{}', '<the key column now>', '{topic}'); then run `sweep` (or rename the column back)",
                    table.replace('\'', "''")
                ),
            }
        })
        .collect())
}

/// Watches of tables dropped since: nothing to capture, and nothing `unwatch` can name.
async fn dropped_tables(client: &Client) -> Result<Vec<CaptureGap>, Error> {
    let rows = client
        .query_typed(
            "SELECT w.table_oid::bigint, w.topic,
                    format('DELETE FROM pgfresh.watches WHERE table_oid = %s AND topic = %L; DROP FUNCTION IF EXISTS pgfresh.%I();',
                           w.table_oid, w.topic, format('capture_%s_%s', w.table_oid, w.topic))
             FROM pgfresh.watches w
             WHERE NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = w.table_oid)
             ORDER BY 1, 2",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| CaptureGap {
            what: format!(
                "the table (oid {}) watched for topic {} was dropped",
                row.get::<_, i64>(0),
                row.get::<_, String>(1)
            ),
            fix: row.get(2),
        })
        .collect())
}
