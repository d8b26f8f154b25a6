//! What a DBA relies on when installing pgfresh on a database shared by several roles: a table owner
//! gains nothing through pgfresh's triggers, whatever DDL they run on their own table; install adopts
//! no schema or role that someone else prepared; a DBA who is not a superuser can install and watch;
//! trigger names never collide; sites using two-phase commit have a supported way to run; and the
//! listener needs only the `pgfresh_listener` role and a Redis user limited to its commands and keys.
//!
//! Tests that change cluster-wide roles (pgfresh_capture, pgfresh_listener) run on a PostgreSQL
//! server of their own, so that they cannot disturb the other tests' installs.

mod common;

use common::servers::{BoundedOutput, PostgresSetup, TempPostgres, TempRedis};
use common::{TestEnv, connect, error_of, eventually, psql, test_settings, tweak};
use pgfresh::testing::Write;
use pgfresh::tokio_postgres::Client;
use std::ops::Not;
use std::process::Command;

/// The owners of the functions pgfresh's triggers call.
async fn capture_owners(client: &Client) -> Vec<String> {
    client
        .query(
            "SELECT DISTINCT p.proowner::regrole::text FROM pg_proc p
             WHERE p.pronamespace = 'pgfresh'::regnamespace AND p.proname LIKE 'capture%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// A table owner's attack through the watched column: as the owner `<test>_app` of `items`, whose
/// `tag` text column is watched for topic `item`, runs `prepare` (types, functions, casts of its
/// own), changes the column to `new_type` (`'x'` for every row), then inserts, updates and deletes a
/// row. Returns the admin session, the owner's name and every queued `(topic, key)`; drop both with
/// [`drop_owner`].
async fn owner_attacks_the_watched_column(
    env: &TestEnv,
    prepare: &str,
    new_type: &str,
) -> (Client, String, Vec<(String, String)>) {
    pgfresh::install(&env.db).await.unwrap();
    let app = format!("{}_app", env.name);
    let admin = env.client().await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {app} LOGIN; GRANT CREATE ON SCHEMA public TO {app};
             SET ROLE {app}; CREATE TABLE items(id int PRIMARY KEY, tag text); RESET ROLE;
             SELECT pgfresh.watch('items', 'tag', 'item');
             SET ROLE {app};
             {prepare}
             ALTER TABLE items ALTER COLUMN tag TYPE {new_type} USING 'x';
             INSERT INTO items VALUES (1, 'x');
             UPDATE items SET tag = 'y';
             DELETE FROM items;
             RESET ROLE;"
        ))
        .await
        .unwrap();
    let queued = admin
        .query("SELECT topic, key FROM pgfresh.changes ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    (admin, app, queued)
}

/// What the capture must have queued for [`owner_attacks_the_watched_column`]'s writes: the keys in
/// the type's own text form, and nothing else.
fn item_changes() -> Vec<(String, String)> {
    ["x", "y", "x", "y"]
        .map(|key| ("item".to_string(), key.to_string()))
        .to_vec()
}

/// Drops the test's `items` table, everything role `app` owns and the role, then the test's database.
async fn drop_owner(env: TestEnv, admin: &Client, app: &str) {
    admin
        .batch_execute(&format!(
            "DROP TABLE items; DROP OWNED BY {app} CASCADE; DROP ROLE {app}"
        ))
        .await
        .unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_table_owner_gains_nothing_by_changing_the_watched_columns_type() {
    let env = TestEnv::empty().await;
    let app = format!("{}_app", env.name);
    // The recipe from the hardening issue, plus an equality operator of the owner's own, which
    // `IS DISTINCT FROM` would look up.
    let prepare = format!(
        "CREATE TYPE evil AS ENUM ('x', 'y');
         CREATE FUNCTION evil_text(evil) RETURNS text LANGUAGE plpgsql AS
             $$BEGIN EXECUTE 'ALTER ROLE {app} SUPERUSER'; RETURN 'x'; END$$;
         CREATE CAST (evil AS text) WITH FUNCTION evil_text(evil);
         CREATE FUNCTION evil_eq(evil, evil) RETURNS boolean LANGUAGE plpgsql AS
             $$BEGIN EXECUTE 'ALTER ROLE {app} CREATEROLE'; RETURN $1::text = $2::text; END$$;
         CREATE OPERATOR = (LEFTARG = evil, RIGHTARG = evil, FUNCTION = evil_eq);"
    );
    let (admin, app, queued) = owner_attacks_the_watched_column(&env, &prepare, "evil").await;
    let (superuser, createrole): (bool, bool) = {
        let row = admin
            .query_one(
                "SELECT rolsuper, rolcreaterole FROM pg_roles WHERE rolname = $1",
                &[&app],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(!superuser && !createrole, "the table owner gained rights");
    assert_eq!(queued, item_changes());
    assert_eq!(capture_owners(&admin).await, ["pgfresh_capture"]);
    drop_owner(env, &admin, &app).await;
}

/// A cast PostgreSQL would plan, even where it never runs it, can run code: an inlinable SQL cast
/// function calling an argument-less `IMMUTABLE` one is folded at plan time. The capture function
/// must not plan a cast to text of any type but the one it was watched with (a capture that put the
/// cast in one expression with its type test did, and ran this as `pgfresh_capture`).
#[tokio::test]
async fn a_table_owners_cast_to_text_is_not_run_by_the_capture_even_at_plan_time() {
    let env = TestEnv::empty().await;
    let prepare = "CREATE TYPE folded AS ENUM ('x', 'y');
         CREATE FUNCTION forge() RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO pgfresh.changes (topic, key) VALUES ('forged', current_user);
         END $$;
         CREATE FUNCTION payload() RETURNS text LANGUAGE plpgsql IMMUTABLE AS
             $$BEGIN PERFORM forge(); RETURN 'x'; END$$;
         CREATE FUNCTION folded_text(folded) RETURNS text LANGUAGE sql IMMUTABLE AS
             $$ SELECT payload() $$;
         CREATE CAST (folded AS text) WITH FUNCTION folded_text(folded);";
    let (admin, app, queued) = owner_attacks_the_watched_column(&env, prepare, "folded").await;
    assert_eq!(queued, item_changes());
    drop_owner(env, &admin, &app).await;
}

#[tokio::test]
async fn a_writers_search_path_cannot_put_its_own_operators_or_types_into_the_capture_code() {
    let env = TestEnv::empty().await;
    pgfresh::install(&env.db).await.unwrap();
    let writer = format!("{}_writer", env.name);
    let admin = env.client().await;
    // The writer's schema, first on its search_path (pg_catalog explicitly after it) and open to
    // everyone (pgfresh_capture included), holds an operator for every comparison and arithmetic the
    // capture code does, and a type named text: each raises if the capture code, which runs as
    // pgfresh_capture, ever uses it.
    let mut hijacks = String::new();
    for (op, left, right, returns) in [
        ("<>", "text", "text", "bool"),
        ("=", "text", "text", "bool"),
        ("<>", "name", "name", "bool"),
        ("=", "name", "name", "bool"),
        ("=", "oid", "int4", "bool"),
        ("=", "oid", "oid", "bool"),
        ("=", "int4", "int4", "bool"),
        (">", "timestamptz", "timestamptz", "bool"),
        ("-", "timestamptz", "interval", "timestamptz"),
        (">", "int8", "float8", "bool"),
        (">", "float8", "float8", "bool"),
    ] {
        let name = format!("hijack_{}", hijacks.matches("CREATE OPERATOR").count());
        hijacks.push_str(&format!(
            "CREATE FUNCTION {writer}.{name}(pg_catalog.{left}, pg_catalog.{right})
                 RETURNS pg_catalog.{returns} LANGUAGE plpgsql AS
                 $$BEGIN RAISE EXCEPTION 'hijacked as %', current_user; END$$;
             CREATE OPERATOR {writer}.{op} (LEFTARG = pg_catalog.{left}, RIGHTARG = pg_catalog.{right},
                 FUNCTION = {writer}.{name});\n"
        ));
    }
    admin
        .batch_execute(&format!(
            "CREATE ROLE {writer} LOGIN; CREATE SCHEMA {writer} AUTHORIZATION {writer};
             CREATE TABLE items(id int PRIMARY KEY); GRANT ALL ON items TO {writer};
             SELECT pgfresh.watch('items', 'id', 'item');
             INSERT INTO pgfresh.listeners (id, idle) VALUES ('an idle listener', true);
             SELECT setval('pgfresh.notify_until', date_part('epoch', now())::bigint + 60);
             SET ROLE {writer};
             GRANT USAGE ON SCHEMA {writer} TO PUBLIC;
             {hijacks}
             CREATE FUNCTION {writer}.refuse(pg_catalog.text) RETURNS pg_catalog.bool LANGUAGE plpgsql AS
                 $$BEGIN RAISE EXCEPTION 'hijacked as %', current_user; END$$;
             CREATE DOMAIN {writer}.text AS pg_catalog.text CHECK ({writer}.refuse(VALUE));
             CREATE FUNCTION {writer}.lower(pg_catalog.text) RETURNS pg_catalog.text LANGUAGE plpgsql AS
                 $$BEGIN RAISE EXCEPTION 'hijacked as %', current_user; END$$;
             RESET ROLE;"
        ))
        .await
        .unwrap();
    let url = env.url.replacen("postgres@", &format!("{writer}@"), 1);
    let as_writer = connect(&url).await;
    as_writer
        .batch_execute(&format!(
            "SET search_path = {writer}, pg_catalog;
             INSERT INTO public.items VALUES (1);
             UPDATE public.items SET id = 2;
             DELETE FROM public.items;"
        ))
        .await
        .unwrap_or_else(|e| panic!("the capture code used the writer's objects: {e:?}"));
    let keys: Vec<String> = admin
        .query("SELECT key FROM pgfresh.changes ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(keys, ["1", "2", "1", "2"]);
    drop(as_writer);
    drop_owner(env, &admin, &writer).await;
}

#[tokio::test]
async fn capture_code_runs_as_a_role_that_may_only_queue_changes() {
    let env = TestEnv::shop(2).await;
    let client = env.client().await;
    assert_eq!(capture_owners(&client).await, ["pgfresh_capture"]);
    let row = client
        .query_one(
            "SELECT r.rolcanlogin, r.rolsuper, r.rolcreaterole, r.rolcreatedb, r.rolbypassrls,
                    (SELECT count(*) FROM pg_auth_members m WHERE m.member = r.oid),
                    has_table_privilege(r.oid, 'pgfresh.changes', 'SELECT'),
                    has_table_privilege(r.oid, 'pgfresh.changes', 'UPDATE'),
                    has_table_privilege(r.oid, 'pgfresh.changes', 'DELETE'),
                    has_column_privilege(r.oid, 'pgfresh.changes', 'key', 'INSERT'),
                    has_column_privilege(r.oid, 'pgfresh.changes', 'attempts', 'INSERT'),
                    has_column_privilege(r.oid, 'pgfresh.listeners', 'idle', 'SELECT'),
                    has_column_privilege(r.oid, 'pgfresh.listeners', 'id', 'SELECT'),
                    has_table_privilege(r.oid, 'pgfresh.listeners', 'UPDATE'),
                    has_table_privilege(r.oid, 'pgfresh.failed', 'SELECT'),
                    has_table_privilege(r.oid, 'products', 'SELECT'),
                    has_schema_privilege(r.oid, 'pgfresh', 'CREATE'),
                    has_sequence_privilege(r.oid, 'pgfresh.notify_until', 'SELECT'),
                    has_sequence_privilege(r.oid, 'pgfresh.notify_until', 'UPDATE')
             FROM pg_roles r WHERE r.rolname = 'pgfresh_capture'",
            &[],
        )
        .await
        .unwrap();
    let attributes: Vec<bool> = (0..5).map(|i| row.get(i)).collect();
    assert_eq!(attributes, [false; 5], "no login, no special attribute");
    assert_eq!(row.get::<_, i64>(5), 0, "a member of no role");
    let rights: Vec<bool> = (6..19).map(|i| row.get(i)).collect();
    assert_eq!(
        rights,
        [
            false, false, false, // reads, rewrites or deletes no queued change
            true, false, // queues (topic, key), nothing else
            false, false, false, // reads nothing of the registry
            false, false, false, // nothing else at all
            true, false // reads until when a listener waits for a NOTIFY, and cannot set it
        ]
    );
    env.cleanup().await;
}

#[tokio::test]
async fn install_refuses_a_pgfresh_schema_or_object_that_someone_else_created() {
    let env = TestEnv::empty().await;
    let squatter = format!("{}_squatter", env.name);
    let admin = env.client().await;
    // The owner of a database (or anyone with CREATE on it) prepares pgfresh's schema, with a fake
    // migration list and a watch() of their own that the DBA would then call.
    admin
        .batch_execute(&format!(
            "CREATE ROLE {squatter};
             CREATE SCHEMA pgfresh AUTHORIZATION {squatter};
             SET ROLE {squatter};
             CREATE TABLE pgfresh.migrations (version int PRIMARY KEY, name text, applied_at timestamptz);
             INSERT INTO pgfresh.migrations SELECT v, 'fake', now() FROM generate_series(1, 99) v;
             CREATE FUNCTION pgfresh.watch(regclass, name, text) RETURNS void LANGUAGE sql AS 'SELECT';
             RESET ROLE;"
        ))
        .await
        .unwrap();
    let refused = pgfresh::install(&env.db).await.unwrap_err().to_string();
    assert!(
        refused.contains(&format!(
            "schema pgfresh belongs to role {squatter}, neither you (postgres) nor a superuser"
        )),
        "{refused}"
    );
    assert_eq!(refused.lines().count(), 1, "{refused}");
    let out = psql(&env.url, "sql/install.sql");
    assert!(!out.status.success(), "psql install.sql adopted it too");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("will not adopt it"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A schema of the DBA's own, but with an object or a CREATE right someone else holds.
    admin
        .batch_execute(&format!(
            "DROP SCHEMA pgfresh CASCADE; CREATE SCHEMA pgfresh;
             CREATE TABLE pgfresh.changes (id int); ALTER TABLE pgfresh.changes OWNER TO {squatter};"
        ))
        .await
        .unwrap();
    let refused = pgfresh::install(&env.db).await.unwrap_err().to_string();
    assert!(
        refused.contains(&format!("relation changes belongs to role {squatter}")),
        "{refused}"
    );
    admin
        .batch_execute(&format!(
            "DROP TABLE pgfresh.changes; GRANT CREATE ON SCHEMA pgfresh TO {squatter}"
        ))
        .await
        .unwrap();
    let refused = pgfresh::install(&env.db).await.unwrap_err().to_string();
    assert!(
        refused.contains(&format!(
            "role {squatter} may create objects in schema pgfresh"
        )),
        "{refused}"
    );

    // Once the DBA has cleaned up, install goes ahead.
    admin
        .batch_execute(&format!(
            "REVOKE CREATE ON SCHEMA pgfresh FROM {squatter}; DROP OWNED BY {squatter}; DROP ROLE {squatter}"
        ))
        .await
        .unwrap();
    pgfresh::install(&env.db).await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn install_refuses_pgfresh_roles_that_someone_else_prepared() {
    let server = TempPostgres::start();
    let admin = connect(&server.url("postgres")).await;
    admin
        .batch_execute("CREATE ROLE mallory LOGIN")
        .await
        .unwrap();
    let db = pgfresh::Database::new(&server.url("postgres"), 2).unwrap();

    // A capture role that can log in would let whoever knows its password alter the capture code.
    admin
        .batch_execute("CREATE ROLE pgfresh_capture LOGIN PASSWORD 'known'")
        .await
        .unwrap();
    let refused = pgfresh::install(&db).await.unwrap_err().to_string();
    assert!(
        refused.contains("role pgfresh_capture exists and may log in or holds a special attribute"),
        "{refused}"
    );
    // So would a member of it.
    admin
        .batch_execute("ALTER ROLE pgfresh_capture NOLOGIN; GRANT pgfresh_capture TO mallory")
        .await
        .unwrap();
    let refused = pgfresh::install(&db).await.unwrap_err().to_string();
    assert!(
        refused.contains("role mallory is a member of pgfresh_capture"),
        "{refused}"
    );
    admin
        .batch_execute("REVOKE pgfresh_capture FROM mallory")
        .await
        .unwrap();
    pgfresh::install(&db).await.unwrap();

    // roles.sql likewise refuses a pgfresh_listener that can log in by itself.
    admin
        .batch_execute("CREATE ROLE pgfresh_listener LOGIN")
        .await
        .unwrap();
    let out = psql(&server.url("postgres"), "sql/roles.sql");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("role pgfresh_listener exists and may log in"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    admin
        .batch_execute("ALTER ROLE pgfresh_listener NOLOGIN")
        .await
        .unwrap();
    let out = psql(&server.url("postgres"), "sql/roles.sql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_dba_who_is_not_a_superuser_can_install_and_watch() {
    let server = TempPostgres::start();
    let admin = connect(&server.url("postgres")).await;
    admin
        .batch_execute("CREATE ROLE dba LOGIN CREATEROLE")
        .await
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE shop OWNER dba")
        .await
        .unwrap();
    let url = server.url("shop").replacen("postgres@", "dba@", 1);
    let dba = connect(&url).await;
    // The DBA's default privileges give another role every function they create: the capture
    // functions too, which only pgfresh_capture could take them back from once handed over.
    dba.batch_execute(
        "CREATE ROLE app; ALTER DEFAULT PRIVILEGES GRANT EXECUTE ON FUNCTIONS TO app;",
    )
    .await
    .unwrap();
    let db = pgfresh::Database::new(&url, 2).unwrap();
    pgfresh::install(&db).await.unwrap();
    assert!(pgfresh::install(&db).await.unwrap().is_empty());
    dba.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY);
         SELECT pgfresh.watch('items', 'id', 'item');
         SELECT pgfresh.watch('items', 'id', 'item');
         INSERT INTO items VALUES (7);",
    )
    .await
    .unwrap();
    assert_eq!(capture_owners(&dba).await, ["pgfresh_capture"]);
    let executes: Vec<String> = dba
        .query(
            "SELECT p.proname::text FROM pg_proc p
             WHERE p.pronamespace = 'pgfresh'::regnamespace AND has_function_privilege('app', p.oid, 'EXECUTE')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(executes.is_empty(), "app may run {executes:?}");
    assert!(
        pgfresh::install(&db).await.unwrap().is_empty(),
        "and installs again"
    );
    let queued: String = dba
        .query_one("SELECT key FROM pgfresh.changes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(queued, "7");
    let create: bool = dba
        .query_one(
            "SELECT has_schema_privilege('pgfresh_capture', 'pgfresh', 'CREATE')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        !create,
        "the right to create was only lent for the hand-over"
    );
    dba.batch_execute("SELECT pgfresh.unwatch('items', 'item')")
        .await
        .unwrap();
    assert!(
        capture_owners(&dba).await.len() == 1,
        "only capture_truncate is left"
    );
}

/// Every pgfresh trigger on `items`, sorted.
async fn triggers(client: &Client) -> Vec<String> {
    client
        .query_one(
            "SELECT coalesce(array_agg(tgname::text ORDER BY tgname), '{}') FROM pg_trigger
             WHERE tgrelid = 'items'::regclass AND tgname LIKE 'pgfresh%'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// The topics queued and truncations recorded by one INSERT and one TRUNCATE of `items`.
async fn captured(client: &Client) -> (Vec<String>, Vec<String>) {
    client
        .batch_execute(
            "DELETE FROM pgfresh.changes; DELETE FROM pgfresh.truncations;
             INSERT INTO items VALUES (1); TRUNCATE items;",
        )
        .await
        .unwrap();
    let topics = |sql| async move {
        client
            .query(sql, &[])
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect::<Vec<String>>()
    };
    (
        topics("SELECT topic FROM pgfresh.changes ORDER BY topic").await,
        topics("SELECT topic FROM pgfresh.truncations ORDER BY topic").await,
    )
}

#[tokio::test]
async fn topics_x_and_x_truncate_keep_all_four_of_their_triggers() {
    let env = TestEnv::empty().await;
    pgfresh::install(&env.db).await.unwrap();
    let client = env.client().await;
    client
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY);
             SELECT pgfresh.watch('items', 'id', 'x');
             SELECT pgfresh.watch('items', 'id', 'x_truncate');",
        )
        .await
        .unwrap();
    assert_eq!(
        triggers(&client).await,
        [
            "pgfresh_x",
            "pgfresh_x:truncate",
            "pgfresh_x_truncate",
            "pgfresh_x_truncate:truncate"
        ]
    );
    assert_eq!(
        captured(&client).await,
        (
            vec!["x".to_string(), "x_truncate".to_string()],
            vec!["x".to_string(), "x_truncate".to_string()]
        )
    );
    env.cleanup().await;
}

#[tokio::test]
async fn upgrading_from_version_3_rebuilds_every_watch_under_the_capture_role() {
    let env = TestEnv::empty().await;
    let client = env.client().await;
    let mut sql = format!("BEGIN; {}", pgfresh::testing::prepare_sql());
    for (_, _, migration) in &pgfresh::testing::migrations()[..3] {
        sql += migration;
    }
    client.batch_execute(&(sql + " COMMIT;")).await.unwrap();
    // Under version 3 the second watch's row trigger replaced the first's TRUNCATE trigger, and a
    // watched table that is dropped leaves its registry row behind.
    client
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY);
             CREATE TABLE gone (id int PRIMARY KEY);
             SELECT pgfresh.watch('items', 'id', 'x');
             SELECT pgfresh.watch('items', 'id', 'x_truncate');
             SELECT pgfresh.watch('gone', 'id', 'gone');
             DROP TABLE gone;",
        )
        .await
        .unwrap();
    assert_eq!(
        triggers(&client).await,
        [
            "pgfresh_x",
            "pgfresh_x_truncate",
            "pgfresh_x_truncate_truncate"
        ]
    );

    let applied = pgfresh::install(&env.db).await.unwrap();
    let after_3: Vec<&str> = pgfresh::testing::migrations()
        .into_iter()
        .filter(|(version, _, _)| *version > 3)
        .map(|(_, name, _)| name)
        .collect();
    assert_eq!(applied, after_3);
    assert_eq!(
        triggers(&client).await,
        [
            "pgfresh_x",
            "pgfresh_x:truncate",
            "pgfresh_x_truncate",
            "pgfresh_x_truncate:truncate"
        ]
    );
    assert_eq!(capture_owners(&client).await, ["pgfresh_capture"]);
    let watches: i64 = client
        .query_one("SELECT count(*) FROM pgfresh.watches", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(watches, 2, "the dropped table's watch is forgotten");
    assert_eq!(
        captured(&client).await,
        (
            vec!["x".to_string(), "x_truncate".to_string()],
            vec!["x".to_string(), "x_truncate".to_string()]
        )
    );
    env.cleanup().await;
}

#[tokio::test]
async fn with_pgfresh_notify_off_prepared_transactions_commit_and_the_poll_applies_them() {
    let server = TempPostgres::start_with(PostgresSetup {
        settings: &["max_prepared_transactions=10"],
        ..PostgresSetup::default()
    });
    let admin = connect(&server.url("postgres")).await;
    admin.batch_execute("CREATE DATABASE shop").await.unwrap();
    let url = server.url("shop");
    let db = pgfresh::Database::new(&url, 8).unwrap();
    common::setup::setup(&db, 3).await.unwrap();
    let redis = pgfresh::RedisStore::connect(&common::redis_url())
        .await
        .unwrap();
    let prefix = format!("pgfresh_test_2pc_{}:card:", std::process::id());
    let card = common::product_card::ProductCard;
    pgfresh::testing::set_fragment_marker(&redis, &prefix, 1)
        .await
        .unwrap();
    let shutdown = pgfresh::Shutdown::new();
    let listener = tokio::spawn(pgfresh::listen(
        db.clone(),
        redis.clone(),
        pgfresh::Fragments::new().with(&prefix, card),
        test_settings(),
        shutdown.clone(),
    ));
    let client = connect(&url).await;
    eventually("the listener to wait for NOTIFYs", || async {
        client
            .query_one("SELECT count(*) FROM pgfresh.listeners WHERE idle", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    })
    .await;

    // While a listener is idle, a trigger NOTIFYs, and a transaction that did cannot be prepared.
    let refused = error_of(
        &client,
        "BEGIN; UPDATE products SET name = 'never' WHERE id = 1; PREPARE TRANSACTION 'with_notify'",
    )
    .await;
    assert!(refused.contains("NOTIFY"), "{refused}");
    client.batch_execute("ROLLBACK").await.ok();

    // With the setting off (here for the whole database), it can, and the poll finds the change.
    admin
        .batch_execute("ALTER DATABASE shop SET pgfresh.notify = off")
        .await
        .unwrap();
    let xa = connect(&url).await;
    xa.batch_execute(
        "BEGIN; UPDATE products SET name = 'Two-phase' WHERE id = 2; PREPARE TRANSACTION 'xa'",
    )
    .await
    .unwrap();
    xa.batch_execute("COMMIT PREPARED 'xa'").await.unwrap();
    let key = format!("{prefix}2:compact");
    eventually("the prepared change to reach Redis", || async {
        redis
            .get(&key)
            .await
            .unwrap()
            .is_some_and(|html| html.contains("<h2>Two-phase</h2>"))
    })
    .await;
    shutdown.cancel();
    listener.await.unwrap().unwrap();
    let mut connection = redis.connection();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{prefix}*"))
        .query_async(&mut connection)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(keys)
        .query_async(&mut connection)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_database_owners_search_path_does_not_reach_the_install() {
    let env = TestEnv::empty().await;
    let owner = format!("{}_owner", env.name);
    let admin = env.client().await;
    // The database's owner puts their own schema first, with an `=` and a now() of their own that
    // make whoever calls them a superuser's accomplice.
    admin
        .batch_execute(&format!(
            "CREATE ROLE {owner}; ALTER DATABASE {name} OWNER TO {owner};
             ALTER DATABASE {name} SET search_path = public, pg_catalog;
             SET ROLE {owner};
             CREATE FUNCTION public.eq(int, int) RETURNS bool LANGUAGE plpgsql AS $$BEGIN
                 IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
                     EXECUTE 'ALTER ROLE {owner} SUPERUSER';
                 END IF;
                 RETURN $1 OPERATOR(pg_catalog.=) $2; END$$;
             CREATE OPERATOR public.= (LEFTARG = int, RIGHTARG = int, FUNCTION = public.eq);
             CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE sql AS 'SELECT pg_catalog.now()';
             RESET ROLE;",
            name = env.name
        ))
        .await
        .unwrap();
    // New sessions (the database's search_path applies at connect) install, by both paths.
    let db = pgfresh::Database::new(&env.url, 1).unwrap();
    pgfresh::install(&db).await.unwrap();
    let out = psql(&env.url, "sql/install.sql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client = env.client().await;
    let superuser: bool = client
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = $1",
            &[&owner],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!superuser, "the install ran the database owner's code");
    let defaults: Vec<String> = client
        .query(
            "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d
             JOIN pg_class c ON c.oid = d.adrelid WHERE c.relnamespace = 'pgfresh'::regnamespace",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        defaults.iter().all(|default| !default.contains("public.")),
        "{defaults:?}"
    );
    drop(client);
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {name} OWNER TO postgres; DROP OWNED BY {owner} CASCADE; DROP ROLE {owner}",
            name = env.name
        ))
        .await
        .ok();
    env.cleanup().await;
}

#[tokio::test]
async fn a_column_name_cannot_smuggle_code_into_the_capture_function() {
    let env = TestEnv::empty().await;
    pgfresh::install(&env.db).await.unwrap();
    let owner = format!("{}_owner", env.name);
    let admin = env.client().await;
    // A column name that ends the generated function's body and calls the owner's function, which
    // would run as the DBA calling watch().
    let column = "*/$body$;SELECT public.e();SELECT /*";
    admin
        .batch_execute(&format!(
            "CREATE ROLE {owner}; GRANT CREATE ON SCHEMA public TO {owner};
             ALTER DATABASE {name} SET check_function_bodies = off;
             SET ROLE {owner};
             CREATE FUNCTION public.e() RETURNS void LANGUAGE plpgsql AS
                 $$BEGIN EXECUTE 'ALTER ROLE {owner} SUPERUSER'; END$$;
             CREATE TABLE items (id int, \"{column}\" int);
             RESET ROLE;",
            name = env.name
        ))
        .await
        .unwrap();
    let dba = env.client().await;
    dba.execute("SELECT pgfresh.watch('items', $1, 'item')", &[&column])
        .await
        .unwrap();
    dba.batch_execute("INSERT INTO items VALUES (1, 42)")
        .await
        .unwrap();
    let superuser: bool = dba
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = $1",
            &[&owner],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!superuser);
    let key: String = dba
        .query_one("SELECT key FROM pgfresh.changes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(key, "42", "the odd column is watched like any other");
    drop_owner(env, &admin, &owner).await;
}

#[tokio::test]
async fn the_installing_roles_default_privileges_give_public_nothing() {
    let env = TestEnv::empty().await;
    let client = env.client().await;
    client
        .batch_execute(
            "ALTER DEFAULT PRIVILEGES GRANT USAGE ON SCHEMAS TO PUBLIC;
             ALTER DEFAULT PRIVILEGES GRANT SELECT, DELETE ON TABLES TO PUBLIC;
             ALTER DEFAULT PRIVILEGES GRANT USAGE ON SEQUENCES TO PUBLIC;",
        )
        .await
        .unwrap();
    pgfresh::install(&env.db).await.unwrap();
    let public: i64 = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_namespace n, aclexplode(n.nspacl) a
                     WHERE n.nspname = 'pgfresh' AND a.grantee = 0)
                  + (SELECT count(*) FROM pg_class c, aclexplode(c.relacl) a
                     WHERE c.relnamespace = 'pgfresh'::regnamespace AND a.grantee = 0)
                  + (SELECT count(*) FROM pg_proc p, aclexplode(p.proacl) a
                     WHERE p.pronamespace = 'pgfresh'::regnamespace AND a.grantee = 0)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(public, 0, "PUBLIC holds rights in schema pgfresh");
    env.cleanup().await;
}

#[tokio::test]
async fn the_listener_role_works_the_queue_and_reads_only_what_is_granted() {
    let env = TestEnv::shop(3).await;
    let out = psql(&env.url, "sql/roles.sql");
    assert!(
        out.status.success(),
        "roles.sql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = psql(&env.url, "sql/roles.sql");
    assert!(
        again.status.success(),
        "roles.sql twice: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    let login = format!("{}_listener", env.name);
    let admin = env.client().await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {login} LOGIN IN ROLE pgfresh_listener;
             GRANT SELECT ON products, reviews TO {login};
             CREATE TABLE secrets (id int); INSERT INTO secrets VALUES (1);"
        ))
        .await
        .unwrap();
    let url = env.url.replacen("postgres@", &format!("{login}@"), 1);
    let as_listener = common::connect(&url).await;
    for forbidden in [
        "SELECT * FROM secrets",
        "UPDATE products SET name = 'x'",
        "DROP TABLE pgfresh.changes",
    ] {
        let message = error_of(&as_listener, forbidden).await;
        assert!(
            message.contains("permission denied") || message.contains("must be owner"),
            "{forbidden}: {message}"
        );
    }

    // A listener running as that role applies changes.
    let db = pgfresh::Database::new(&url, 8).unwrap();
    let shutdown = pgfresh::Shutdown::new();
    let task = tokio::spawn(pgfresh::listen(
        db,
        env.sink.clone(),
        env.fragments(),
        tweak(common::test_settings(), |s| s.max_attempts = 1),
        shutdown.clone(),
    ));
    // It parks a change that fails (inserts into pgfresh.failed)...
    admin
        .batch_execute("INSERT INTO pgfresh.changes (topic, key) VALUES ('nobody_listens', '1')")
        .await
        .unwrap();
    common::eventually("the bad change to be parked", || async {
        env.parked().await == 1
    })
    .await;
    // ...applies the good ones...
    admin
        .batch_execute("UPDATE products SET name = 'Least privilege' WHERE id = 2")
        .await
        .unwrap();
    env.wait_fresh(2).await;
    // And settles a TRUNCATE (reads and deletes pgfresh.truncations).
    admin.batch_execute("TRUNCATE reviews").await.unwrap();
    env.wait_fresh(3).await;
    common::eventually("the truncation to be settled", || async {
        admin
            .query_one("SELECT count(*) FROM pgfresh.truncations", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 0
    })
    .await;
    shutdown.cancel();
    tokio::time::timeout(common::PATIENCE, task)
        .await
        .expect("the listener stops")
        .unwrap()
        .unwrap();

    // A role without a newer schema's grants (roles.sql not run again after an upgrade) would
    // apply changes but never sweep: it is refused at start, with what to do.
    admin
        .batch_execute("REVOKE UPDATE ON pgfresh.sweep_lease FROM pgfresh_listener")
        .await
        .unwrap();
    let refused = pgfresh::listen(
        pgfresh::Database::new(&url, 8).unwrap(),
        env.sink.clone(),
        env.fragments(),
        common::test_settings(),
        pgfresh::Shutdown::new(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        refused.contains(&format!(
            "role {login} lacks rights a listener needs on pgfresh's tables (pgfresh.sweep_lease: UPDATE)"
        )) && refused.contains("run sql/roles.sql"),
        "{refused}"
    );
    let doctor = common::cli::run(
        &common::shop_binary(),
        &url,
        &common::redis_url(),
        &["doctor"],
    );
    assert!(
        common::cli::stdout(&doctor).contains("pgfresh.sweep_lease: UPDATE"),
        "{}",
        common::cli::stdout(&doctor)
    );
    drop(as_listener);
    admin
        .batch_execute(&format!(
            "DROP TABLE secrets; DROP OWNED BY {login}; DROP ROLE {login}"
        ))
        .await
        .unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_redis_user_limited_to_pgfresh_commands_and_keys_suffices() {
    // The ACL README gives, with every test database's key prefix.
    redis_user_suffices(
        "+get +set +del +mget +mset +exists +scan +ping +evalsha +eval +script|load +select +info",
    )
    .await;
}

#[tokio::test]
async fn a_redis_user_from_before_the_bulk_writes_still_suffices() {
    // README's ACL until 2026-12-06, without the MSET and EXISTS the writes now take in bulk: they
    // fall back to a GET and a SET per key.
    redis_user_suffices(
        "+get +set +del +mget +scan +ping +evalsha +eval +script|load +select +info",
    )
    .await;
}

/// A sweep and a listener work for a Redis user limited to these commands and pgfresh's keys, and
/// that user reaches nothing else.
async fn redis_user_suffices(commands: &str) {
    let redis = TempRedis::start();
    let acl = format!(
        "ACL SETUSER pgfresh on >s3cret resetkeys ~pgfresh_test_* ~pgfresh:* resetchannels -@all {commands}"
    );
    let out = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string()])
        .args(acl.split_whitespace())
        .output_bounded()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
    // A database of its own, as a /N path selects, which takes SELECT.
    let url = format!("redis://pgfresh:s3cret@127.0.0.1:{}/3", redis.port);

    let env = TestEnv::shop_with_redis(4, &url).await;
    let report = env.sweep().await;
    assert!(report.succeeded(), "{report}");
    let cards = Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "-n",
            "3",
            "--scan",
            "--pattern",
        ])
        .arg(format!("{}*", env.prefix))
        .output_bounded()
        .unwrap();
    let keys: Vec<String> = String::from_utf8_lossy(&cards.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(keys.len(), 8);
    // Each entry found holding its render is confirmed, its ticket raised, without writing it.
    let mut entries = Vec::new();
    for key in &keys {
        let value = env.get(key).await.unwrap().into_bytes();
        let ttl = None;
        entries.push(Write::Set {
            key: key.clone(),
            value,
            ttl,
        });
    }
    let stored = pgfresh::testing::tickets(&env.sink, &keys).await.unwrap();
    let ticket = stored.iter().flatten().max().unwrap() + 1;
    let held = pgfresh::testing::held(&env.sink, ticket, &entries)
        .await
        .unwrap();
    assert_eq!(held, [true; 8]);
    let raised = pgfresh::testing::tickets(&env.sink, &keys).await.unwrap();
    assert_eq!(raised, [Some(ticket); 8]);
    let again = env.sweep().await;
    assert_eq!(
        (again.stats.unchanged, again.stats.written),
        (8, 0),
        "{again}"
    );
    let listener = env.start_listener(test_settings());
    env.client()
        .await
        .execute("UPDATE products SET price_cents = 1 WHERE id = 3", &[])
        .await
        .unwrap();
    env.wait_fresh(3).await;
    listener.stop().await;
    // And nothing outside its keys.
    let denied = env.sink.get("someone:else").await.unwrap_err().to_string();
    assert!(denied.contains("no permissions"), "{denied}");
    env.cleanup().await;
}

#[tokio::test]
async fn a_redis_user_denied_a_command_the_writes_need_fails_batches_and_parks_nothing() {
    // Without SET, which writes an entry with a TTL: every key would fail alike, as when Redis is
    // out of memory; no change may count an attempt, or be parked, for it.
    let redis = TempRedis::start();
    let acl = |change: &str| {
        let out = Command::new("redis-cli")
            .args(["-p", &redis.port.to_string()])
            .args(format!("ACL SETUSER pgfresh {change}").split_whitespace())
            .output_bounded()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
    };
    acl(
        "on >s3cret resetkeys ~pgfresh_test_* ~pgfresh:* resetchannels -@all +get +set +del +mget +mset +exists +scan +ping +evalsha +eval +script|load +select +info",
    );
    let url = format!("redis://pgfresh:s3cret@127.0.0.1:{}/3", redis.port);
    let env = TestEnv::shop_with_redis(3, &url).await;
    acl("-set");
    let storage = pgfresh::Storage::plain().with_ttl(std::time::Duration::from_secs(3 * 3600));
    let fragments = pgfresh::Fragments::new().with_storage(
        &env.prefix,
        common::product_card::ProductCard,
        storage,
    );
    let settings = tweak(test_settings(), |s| {
        s.sweep_interval = Some(std::time::Duration::from_secs(3600));
        s.max_attempts = 2;
    });
    let listener = env.start_listener_with(fragments, settings);
    env.client()
        .await
        .execute("UPDATE products SET price_cents = 1 WHERE id = 3", &[])
        .await
        .unwrap();
    eventually("the change to note why it waits (or be parked)", || async {
        env.client()
            .await
            .query(
                "SELECT FROM pgfresh.changes WHERE key = '3' AND last_error LIKE '%can''t run this command%'
                 UNION ALL SELECT FROM pgfresh.failed WHERE key = '3'",
                &[],
            )
            .await
            .unwrap()
            .is_empty()
            .not()
    })
    .await;
    listener.stop().await;
    let errors: Vec<String> = env
        .client()
        .await
        .query("SELECT error FROM pgfresh.failed", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let (attempts, parked): (i32, i64) = {
        let client = env.client().await;
        let attempts = client
            .query_one(
                "SELECT coalesce(max(attempts), 0) FROM pgfresh.changes WHERE key = '3'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let parked = client
            .query_one("SELECT count(*) FROM pgfresh.failed", &[])
            .await
            .unwrap()
            .get(0);
        (attempts, parked)
    };
    assert_eq!(
        (attempts, parked),
        (0, 0),
        "no attempt counted, nothing parked: {errors:?}"
    );
    env.cleanup().await;
}
