//! Installing, upgrading, checking and removing the pgfresh schema.
//!
//! The SQL files under `sql/` are embedded here unchanged and applied exactly as `sql/install.sql`
//! applies them with psql: `prepare.sql`, then each numbered migration not yet recorded in
//! `pgfresh.migrations`, then `finish.sql`, all in one transaction. The list of migrations is
//! `sql/install.sql`'s own (see `build.rs`).

use tokio_postgres::Client;

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
    let mut client = db.get().await?;
    let txn = client.transaction().await?;
    txn.batch_execute("SET LOCAL client_min_messages = warning")
        .await?;
    txn.batch_execute(PREPARE_SQL).await?;
    let mut applied = Vec::new();
    for migration in MIGRATIONS {
        let done = txn
            .query_opt(
                "SELECT FROM pgfresh.migrations WHERE version = $1",
                &[&migration.version],
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
    db.get().await?.batch_execute(UNINSTALL_SQL).await?;
    Ok(())
}

/// The schema version installed in `db`, or `None` when pgfresh is not installed there.
pub async fn installed_version(db: &Database) -> Result<Option<i32>, Error> {
    version_on(&*db.get().await?).await
}

/// The installed schema version, on a connection already at hand.
pub(crate) async fn version_on(client: &Client) -> Result<Option<i32>, Error> {
    let present: bool = client
        .query_one("SELECT to_regclass('pgfresh.migrations') IS NOT NULL", &[])
        .await?
        .get(0);
    if !present {
        return Ok(None);
    }
    Ok(client
        .query_one("SELECT max(version) FROM pgfresh.migrations", &[])
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

/// One watch, as `status` shows it.
pub(crate) struct Watch {
    pub(crate) table: String,
    pub(crate) key_column: String,
    pub(crate) topic: String,
}

/// Every watch, by table and topic.
pub(crate) async fn watches(client: &Client) -> Result<Vec<Watch>, Error> {
    let rows = client
        .query(
            "SELECT table_oid::regclass::text, key_column::text, topic FROM pgfresh.watches ORDER BY 1, 3",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| Watch {
            table: row.get(0),
            key_column: row.get(1),
            topic: row.get(2),
        })
        .collect())
}

/// pgfresh's triggers that are disabled (by a table's or a partition's owner), as (trigger, table):
/// nothing is captured there.
pub(crate) async fn disabled_triggers(client: &Client) -> Result<Vec<(String, String)>, Error> {
    let rows = client
        .query(
            "SELECT t.tgname::text, t.tgrelid::regclass::text FROM pg_trigger t
             JOIN pg_proc p ON p.oid = t.tgfoid
             WHERE p.pronamespace = 'pgfresh'::regnamespace AND t.tgenabled = 'D'
             ORDER BY 2, 1",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}
