//! Installing, upgrading, checking and removing the pgfresh schema.
//!
//! The SQL files under `sql/` are embedded here unchanged and applied exactly as `sql/install.sql`
//! applies them with psql: `prepare.sql`, then each numbered migration not yet recorded in
//! `pgfresh.migrations`, all in one transaction.

use tokio_postgres::Client;

use crate::Error;
use crate::db::Database;

/// The file every install runs first (schema, version table, install lock).
pub const PREPARE_SQL: &str = include_str!("../sql/prepare.sql");
/// The file every install runs last (PUBLIC's rights, whatever default privileges apply).
pub const FINISH_SQL: &str = include_str!("../sql/finish.sql");
/// The uninstall script, run as is.
pub const UNINSTALL_SQL: &str = include_str!("../sql/uninstall.sql");

/// A numbered, forward-only schema migration.
pub struct Migration {
    /// Its number; recorded in `pgfresh.migrations` by the file itself.
    pub version: i32,
    /// Its file name under `sql/migrations/`, without `.sql`.
    pub name: &'static str,
    /// The SQL, exactly as in the file.
    pub sql: &'static str,
}

/// Every migration this binary knows, in order. `sql/install.sql` must apply the same list.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_initial",
        sql: include_str!("../sql/migrations/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "0002_truncate",
        sql: include_str!("../sql/migrations/0002_truncate.sql"),
    },
    Migration {
        version: 3,
        name: "0003_fragment_versions",
        sql: include_str!("../sql/migrations/0003_fragment_versions.sql"),
    },
    Migration {
        version: 4,
        name: "0004_least_privilege",
        sql: include_str!("../sql/migrations/0004_least_privilege.sql"),
    },
];

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

/// The installed schema version, or `None` when pgfresh is not installed.
pub async fn installed_version(client: &Client) -> Result<Option<i32>, Error> {
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
pub async fn ensure_installed(db: &Database) -> Result<(), Error> {
    let client = db.get().await?;
    match installed_version(&client).await? {
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
