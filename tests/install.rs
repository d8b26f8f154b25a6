//! Installing, upgrading and removing pgfresh: both paths (psql with sql/install.sql, the binary) run
//! the same files and are idempotent; every migration records its version; an upgrade brings existing
//! watches up to date; a failed install leaves nothing; uninstall keeps the user's tables and data.

mod common;

use common::{TestEnv, psql};

/// Every object that belongs to pgfresh: its schema, anything in it, and triggers calling into it.
async fn pgfresh_objects(env: &TestEnv) -> i64 {
    env.client()
        .await
        .query_one(
            "SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = 'pgfresh')
                  + (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = 'pgfresh')
                  + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                     WHERE n.nspname = 'pgfresh')
                  + (SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgfresh%')",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn product_and_review_counts(env: &TestEnv) -> (i64, i64) {
    let row = env
        .client()
        .await
        .query_one(
            "SELECT (SELECT count(*) FROM products), (SELECT count(*) FROM reviews)",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn installing_twice_then_uninstalling_leaves_no_pgfresh_object_and_keeps_user_data() {
    let env = TestEnv::shop(20).await;
    let applied_again = pgfresh::install(&env.db).await.unwrap();
    assert!(applied_again.is_empty(), "a second install applies nothing");
    assert!(pgfresh_objects(&env).await > 10);

    pgfresh::uninstall(&env.db).await.unwrap();
    pgfresh::uninstall(&env.db).await.unwrap();
    assert_eq!(pgfresh_objects(&env).await, 0);
    assert_eq!(product_and_review_counts(&env).await, (20, 60));
    // Writes to the formerly watched tables work without pgfresh.
    env.client()
        .await
        .batch_execute("UPDATE products SET name = 'after' WHERE id = 1")
        .await
        .unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn psql_install_sql_is_idempotent_and_matches_the_binary() {
    let env = TestEnv::empty().await;
    for _ in 0..2 {
        let out = psql(&env.url, "sql/install.sql");
        assert!(
            out.status.success(),
            "psql install: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let version = pgfresh::installed_version(&env.db).await.unwrap();
    assert_eq!(version, Some(pgfresh::required_version()));
    // The binary sees a complete install and has nothing left to apply.
    assert!(pgfresh::install(&env.db).await.unwrap().is_empty());

    common::setup::setup(&env.db, 5).await.unwrap();
    let out = psql(&env.url, "sql/uninstall.sql");
    assert!(
        out.status.success(),
        "psql uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(pgfresh_objects(&env).await, 0);
    assert_eq!(product_and_review_counts(&env).await, (5, 15));
    env.cleanup().await;
}

#[test]
fn every_migration_install_sql_applies_records_its_own_version() {
    // build.rs reads the list from sql/install.sql (and checks each file follows its guard).
    let migrations = pgfresh::testing::migrations();
    assert!(migrations.len() >= 4);
    for (index, (version, name, sql)) in migrations.iter().enumerate() {
        assert_eq!(*version as usize, index + 1, "numbered from 1 without gaps");
        assert!(
            sql.contains(&format!("VALUES ({version}, '{name}')")),
            "{name} records its own version"
        );
    }
}

/// pgfresh as the release of schema version `version` installed it: `prepare.sql` and the
/// migrations up to it, in one transaction.
async fn install_up_to(client: &pgfresh::tokio_postgres::Client, version: i32) {
    let migrations: String = pgfresh::testing::migrations()
        .iter()
        .filter(|(number, _, _)| *number <= version)
        .map(|(_, _, sql)| *sql)
        .collect();
    client
        .batch_execute(&format!(
            "BEGIN; {} {migrations} COMMIT;",
            pgfresh::testing::prepare_sql()
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn upgrading_from_0001_gives_existing_watches_their_truncate_trigger() {
    let env = TestEnv::empty().await;
    let client = env.client().await;
    let migrations = pgfresh::testing::migrations();
    install_up_to(&client, 1).await;
    client
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY); SELECT pgfresh.watch('items', 'id', 'item')",
        )
        .await
        .unwrap();

    let applied = pgfresh::install(&env.db).await.unwrap();
    let later: Vec<&str> = migrations[1..].iter().map(|(_, name, _)| *name).collect();
    assert_eq!(applied, later);
    assert_eq!(applied[0], "0002_truncate");
    let triggers: Vec<String> = client
        .query_one(
            "SELECT array_agg(tgname::text ORDER BY tgname) FROM pg_trigger WHERE tgrelid = 'items'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(triggers, ["pgfresh_item", "pgfresh_item:truncate"]);
    client
        .batch_execute("INSERT INTO items VALUES (1); TRUNCATE items")
        .await
        .unwrap();
    let (changes, truncations): (i64, i64) = {
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM pgfresh.changes), (SELECT count(*) FROM pgfresh.truncations WHERE topic = 'item')",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((changes, truncations), (1, 1));
    env.cleanup().await;
}

#[tokio::test]
async fn a_role_that_does_not_own_pgfresh_cannot_watch_and_a_failed_install_leaves_nothing() {
    let env = TestEnv::empty().await;
    let client = env.client().await;
    // An install that fails midway (here: a table of 0001 exists already) rolls back whole.
    client
        .batch_execute("CREATE SCHEMA pgfresh; CREATE TABLE pgfresh.watches (x int);")
        .await
        .unwrap();
    let error = pgfresh::install(&env.db).await.unwrap_err().to_string();
    assert!(error.contains("already exists"), "{error}");
    let left: Vec<String> = client
        .query(
            "SELECT relname::text FROM pg_class WHERE relnamespace = 'pgfresh'::regnamespace ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(left, ["watches"], "nothing of the failed install is left");
    client
        .batch_execute("DROP SCHEMA pgfresh CASCADE")
        .await
        .unwrap();

    pgfresh::install(&env.db).await.unwrap();
    let stranger = format!("{}_stranger", env.name);
    client
        .batch_execute(&format!(
            "CREATE ROLE {stranger}; CREATE TABLE items (id int); ALTER TABLE items OWNER TO {stranger}"
        ))
        .await
        .unwrap();
    // Even the table's owner may not call watch(): only pgfresh's owner and superusers may.
    let txn_error = client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL ROLE {stranger}; SELECT pgfresh.watch('items', 'id', 'item')"
        ))
        .await
        .unwrap_err();
    let message = txn_error.as_db_error().unwrap().message().to_string();
    assert!(message.contains("permission denied"), "{message}");
    client
        .batch_execute(&format!("ROLLBACK; DROP TABLE items; DROP ROLE {stranger}"))
        .await
        .unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn upgrading_from_version_5_keeps_every_queued_and_parked_change_and_rebuilds_the_capture() {
    let env = TestEnv::empty().await;
    let client = env.client().await;
    // Schema version 5, as the last release installed it, with a watch, a queued change and a
    // parked one.
    install_up_to(&client, 5).await;
    client
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY); SELECT pgfresh.watch('items', 'id', 'item');
             INSERT INTO items VALUES (1), (2);
             INSERT INTO pgfresh.failed (change_id, topic, key, enqueued_at, attempts, error)
             SELECT id, topic, key, enqueued_at, 10, 'parked before the upgrade'
             FROM pgfresh.changes WHERE key = '2';
             DELETE FROM pgfresh.changes WHERE key = '2';",
        )
        .await
        .unwrap();

    let applied = pgfresh::install(&env.db).await.unwrap();
    assert_eq!(
        applied,
        [
            "0006_sweep_lease",
            "0007_cheaper_capture",
            "0008_foreign_partitions",
            "0009_watch_beside_readers"
        ]
    );
    let (queued, parked): (Vec<String>, Vec<String>) = {
        let keys = |sql: &'static str| {
            let client = &client;
            async move {
                let rows = client.query(sql, &[]).await.unwrap();
                rows.iter().map(|row| row.get(0)).collect::<Vec<String>>()
            }
        };
        (
            keys("SELECT key FROM pgfresh.changes ORDER BY id").await,
            keys("SELECT key FROM pgfresh.failed").await,
        )
    };
    assert_eq!(
        (queued, parked),
        (vec!["1".to_string()], vec!["2".to_string()])
    );
    // The watch runs version 7's capture: no search_path of its own, the idle flag from the
    // sequence, and it still queues.
    let (config, source): (Option<Vec<String>>, String) = {
        let row = client
            .query_one(
                "SELECT proconfig, prosrc FROM pg_proc
                 WHERE proname = format('capture_%s_item', 'items'::regclass::oid)",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(config, None, "no SET clause");
    assert!(source.contains("pgfresh.notify_until"), "{source}");
    client
        .batch_execute("UPDATE items SET id = 3 WHERE id = 1")
        .await
        .unwrap();
    let keys: Vec<String> = client
        .query("SELECT key FROM pgfresh.changes ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(keys, ["1", "3", "1"]);
    env.cleanup().await;
}

#[tokio::test]
async fn an_upgrade_over_a_foreign_partition_added_since_its_table_was_watched_is_refused_first() {
    let env = TestEnv::empty().await;
    let client = env.client().await;
    // Schema version 6, a watched partitioned table, then a foreign partition added to it: its
    // row trigger is cloned there, its TRUNCATE trigger is not (nor could it be).
    install_up_to(&client, 6).await;
    client
        .batch_execute(
            "CREATE EXTENSION file_fdw;
             CREATE SERVER files FOREIGN DATA WRAPPER file_fdw;
             CREATE TABLE shipments (id bigint, region text) PARTITION BY LIST (region);
             CREATE TABLE shipments_near PARTITION OF shipments FOR VALUES IN ('near');
             SELECT pgfresh.watch('shipments', 'id', 'shipment');
             CREATE FOREIGN TABLE shipments_far PARTITION OF shipments FOR VALUES IN ('far')
                 SERVER files OPTIONS (filename '/dev/null', format 'csv');
             CREATE TABLE shipments_mid PARTITION OF shipments FOR VALUES IN ('mid')
                 PARTITION BY LIST (id);
             CREATE FOREIGN TABLE shipments_mid_far PARTITION OF shipments_mid FOR VALUES IN (9)
                 SERVER files OPTIONS (filename '/dev/null', format 'csv');",
        )
        .await
        .unwrap();
    let refused = pgfresh::install(&env.db).await.unwrap_err().to_string();
    // Both, each with the statement that detaches it from its own parent.
    assert!(
        refused.contains("(ALTER TABLE public.shipments DETACH PARTITION public.shipments_far)")
            && refused.contains(
                "public.shipments_mid_far is a foreign partition of public.shipments_mid, watched for topic shipment (ALTER TABLE public.shipments_mid DETACH PARTITION public.shipments_mid_far)"
            ),
        "{refused}"
    );
    assert!(
        refused.contains(
            "public.shipments_far is a foreign partition of public.shipments, watched for topic shipment"
        ) && refused.contains("DETACH PARTITION"),
        "{refused}"
    );
    assert_eq!(pgfresh::installed_version(&env.db).await.unwrap(), Some(6));
    // Detached, the upgrade goes through; attached again, the table is watched again with it.
    client
        .batch_execute(
            "ALTER TABLE shipments DETACH PARTITION shipments_far;
             ALTER TABLE shipments_mid DETACH PARTITION shipments_mid_far;",
        )
        .await
        .unwrap();
    pgfresh::install(&env.db).await.unwrap();
    client
        .batch_execute(
            "ALTER TABLE shipments ATTACH PARTITION shipments_far FOR VALUES IN ('far');
             SELECT pgfresh.watch('shipments', 'id', 'shipment');
             INSERT INTO shipments VALUES (7, 'near');",
        )
        .await
        .unwrap();
    let queued: i64 = client
        .query_one(
            "SELECT count(*) FROM pgfresh.changes WHERE topic = 'shipment' AND key = '7'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(queued, 1);
    // And installs at the latest version go through with the foreign partition there.
    assert!(pgfresh::install(&env.db).await.unwrap().is_empty());
    env.cleanup().await;
}

/// Whether a session of this database holds (`granted`) or waits for (`!granted`) a lock of
/// `mode` on `table`.
async fn lock_on(
    client: &pgfresh::tokio_postgres::Client,
    table: &str,
    mode: &str,
    granted: bool,
) -> bool {
    client
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_locks
                            WHERE database = (SELECT oid FROM pg_database WHERE datname = current_database())
                              AND relation = $1::text::regclass AND mode = $2 AND granted = $3)",
            &[&table, &mode, &granted],
        )
        .await
        .unwrap()
        .get(0)
}

/// An upgrade from before version 7 rebuilds every watch after taking locks on pgfresh's own
/// tables that the old capture reads on every write; writers that hold a watched table by then and
/// wait for one of those used to deadlock with it. The upgrade takes the watched tables first, so
/// writers wait for it, and it goes through.
#[tokio::test]
async fn an_upgrade_from_version_6_under_writes_locks_the_watched_tables_first_and_deadlocks_with_none()
 {
    let env = TestEnv::empty().await;
    let client = env.client().await;
    install_up_to(&client, 6).await;
    client
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
             SELECT pgfresh.watch('items', 'id', 'item');
             INSERT INTO items VALUES (1), (2);
             DELETE FROM pgfresh.changes;",
        )
        .await
        .unwrap();
    // A writer in the middle of its transaction: it holds `items` and, through version 6's
    // capture, pgfresh.listeners, so the upgrade waits for it, on `items` first.
    let first = env.client().await;
    first
        .batch_execute("BEGIN; UPDATE items SET n = n + 1 WHERE id = 1")
        .await
        .unwrap();
    let db = env.db.clone();
    let upgrade = tokio::spawn(async move { pgfresh::install(&db).await });
    common::eventually("the upgrade to wait for items", || async {
        lock_on(&client, "items", "AccessExclusiveLock", false).await
    })
    .await;
    // A second writer comes while the upgrade waits.
    let second = env.client().await;
    let second_write = tokio::spawn(async move {
        second
            .batch_execute("BEGIN; UPDATE items SET n = n + 1 WHERE id = 2; COMMIT")
            .await
    });
    common::eventually("the second writer to wait, or to be through", || async {
        lock_on(&client, "items", "RowExclusiveLock", false).await || second_write.is_finished()
    })
    .await;
    first.batch_execute("COMMIT").await.unwrap();

    let applied = upgrade.await.unwrap();
    let written = second_write.await.unwrap();
    assert!(
        applied.is_ok() && written.is_ok(),
        "upgrade: {applied:?}; second writer: {written:?}"
    );
    assert_eq!(
        pgfresh::installed_version(&env.db).await.unwrap(),
        Some(pgfresh::required_version())
    );
    // Both writes are queued (the second by whichever capture was in place when it wrote: between
    // two of the upgrade's rounds it may come before it).
    let keys: Vec<String> = client
        .query(
            "SELECT key FROM pgfresh.changes WHERE topic = 'item' ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(keys, ["1", "2"]);
    env.cleanup().await;
}

/// A writer that changes two watched tables in one transaction, the later one first, while the
/// upgrade holds the earlier one and waits for the later: the upgrade gives up its round well
/// before a deadlock check could find the two in a cycle, so neither the write nor the install
/// fails.
#[tokio::test]
async fn an_upgrade_from_version_6_beside_a_writer_of_two_tables_deadlocks_with_neither() {
    let env = TestEnv::empty().await;
    let client = env.client().await;
    install_up_to(&client, 6).await;
    // The upgrade's rounds last half of this (up to a second), whatever the server's setting.
    let database: String = client
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    client
        .batch_execute(&format!(
            "ALTER DATABASE {database} SET deadlock_timeout = '2s';
             CREATE TABLE items (id int PRIMARY KEY); CREATE TABLE orders (id int PRIMARY KEY);
             SELECT pgfresh.watch('items', 'id', 'item'); SELECT pgfresh.watch('orders', 'id', 'order');"
        ))
        .await
        .unwrap();
    let writer = env.client().await;
    writer
        .batch_execute("BEGIN; INSERT INTO orders VALUES (1)")
        .await
        .unwrap();
    let db = env.db.clone();
    let upgrade = tokio::spawn(async move { pgfresh::install(&db).await });
    // `items` comes first in the upgrade's order (created first, a lower oid): it holds it and
    // waits for `orders`.
    common::eventually("the upgrade to hold items and wait for orders", || async {
        lock_on(&client, "items", "AccessExclusiveLock", true).await
            && lock_on(&client, "orders", "AccessExclusiveLock", false).await
    })
    .await;
    let write = tokio::spawn(async move {
        writer
            .batch_execute("INSERT INTO items VALUES (2); COMMIT")
            .await
    });
    let applied = upgrade.await.unwrap();
    let written = write.await.unwrap();
    assert!(
        applied.is_ok() && written.is_ok(),
        "upgrade: {applied:?}; writer: {written:?}"
    );
    let queued: Vec<(String, String)> = client
        .query("SELECT topic, key FROM pgfresh.changes ORDER BY topic", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(
        queued,
        [
            ("item".to_string(), "2".to_string()),
            ("order".to_string(), "1".to_string())
        ]
    );
    env.cleanup().await;
}

/// Uninstalling drops nothing of the DBA's: a view and a function over pgfresh's queue stop it,
/// named, with everything left as it was; once they are gone it uninstalls.
#[tokio::test]
async fn uninstall_refuses_to_drop_what_depends_on_pgfresh_and_names_it() {
    let env = TestEnv::shop(3).await;
    let admin = env.client().await;
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA mon_{name};
             CREATE VIEW mon_{name}.queue_depth AS SELECT count(*) FROM pgfresh.changes;
             CREATE FUNCTION mon_{name}.queued() RETURNS bigint LANGUAGE sql
                 BEGIN ATOMIC SELECT count(*) FROM pgfresh.changes; END;",
            name = env.name
        ))
        .await
        .unwrap();
    let objects = pgfresh_objects(&env).await;
    let error = pgfresh::uninstall(&env.db).await.unwrap_err().to_string();
    for named in [
        format!("view mon_{}.queue_depth", env.name),
        format!("function mon_{}.queued()", env.name),
    ] {
        assert!(error.contains(&named), "{error}");
    }
    assert_eq!(pgfresh_objects(&env).await, objects, "nothing was dropped");
    let sql = "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgfresh%'";
    assert!(
        common::value::<i64>(&env.client().await, sql).await > 0,
        "the triggers stay"
    );
    // The session it ran on went back to the pool usable.
    pgfresh::installed_version(&env.db).await.unwrap();
    admin
        .batch_execute(&format!("DROP SCHEMA mon_{} CASCADE", env.name))
        .await
        .unwrap();
    pgfresh::uninstall(&env.db).await.unwrap();
    assert_eq!(pgfresh_objects(&env).await, 0);
    env.cleanup().await;
}
