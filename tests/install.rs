//! Installing and removing pgfresh: both paths (psql with sql/install.sql, the binary) run the same
//! files, are idempotent, and uninstall leaves the user's tables and data untouched.

mod common;

use common::servers::BoundedOutput;

use common::TestEnv;
use common::servers::{TempPostgres, TempRedis, make_certificates};
use common::test_settings;
use std::process::Command;

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

fn psql(env: &TestEnv, file: &str) -> std::process::Output {
    std::process::Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", file, &env.url])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output_bounded()
        .expect("psql runs")
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
        let out = psql(&env, "sql/install.sql");
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
    let out = psql(&env, "sql/uninstall.sql");
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

#[tokio::test]
async fn watch_and_unwatch_are_idempotent_and_reject_bad_input_clearly() {
    let env = TestEnv::shop(3).await;
    let client = env.client().await;
    client
        .batch_execute("SELECT pgfresh.watch('products', 'id', 'product')")
        .await
        .unwrap();
    let triggers = |table: &'static str| {
        let client = &client;
        async move {
            client
                .query_one(
                    "SELECT coalesce(array_agg(tgname::text ORDER BY tgname), '{}') FROM pg_trigger \
                     WHERE tgrelid = $1::text::regclass AND tgname LIKE 'pgfresh%'",
                    &[&table],
                )
                .await
                .unwrap()
                .get::<_, Vec<String>>(0)
        }
    };
    assert_eq!(
        triggers("products").await,
        ["pgfresh_product", "pgfresh_product:truncate"],
        "watching twice leaves one row trigger and one TRUNCATE trigger"
    );

    let error = client
        .batch_execute("SELECT pgfresh.watch('products', 'nope', 'product')")
        .await
        .unwrap_err();
    assert!(
        error
            .as_db_error()
            .unwrap()
            .message()
            .contains("has no column nope")
    );
    let long_topic = format!(
        "SELECT pgfresh.watch('products', 'id', '{}')",
        "t".repeat(41)
    );
    for bad_topic in [
        "SELECT pgfresh.watch('products', 'id', 'Bad; DROP')",
        long_topic.as_str(),
    ] {
        let error = client.batch_execute(bad_topic).await.unwrap_err();
        assert!(
            error
                .as_db_error()
                .unwrap()
                .message()
                .contains("not a valid topic name")
        );
    }
    client
        .batch_execute(&format!(
            "SELECT pgfresh.watch('products', 'id', '{}')",
            "t".repeat(40)
        ))
        .await
        .expect("40 characters are fine");
    let error = client
        .batch_execute("SELECT pgfresh.watch('products', 'id', 'Bad; DROP')")
        .await
        .unwrap_err();
    assert!(
        error
            .as_db_error()
            .unwrap()
            .message()
            .contains("not a valid topic name")
    );

    client.batch_execute("SELECT pgfresh.unwatch('reviews', 'product'); SELECT pgfresh.unwatch('reviews', 'product')").await.unwrap();
    client
        .batch_execute(
            "INSERT INTO reviews (product_id, author, rating, body) VALUES (1, 'a', 5, 'b')",
        )
        .await
        .unwrap();
    client
        .batch_execute("DELETE FROM pgfresh.changes")
        .await
        .unwrap();
    client
        .batch_execute(
            "INSERT INTO reviews (product_id, author, rating, body) VALUES (1, 'a', 5, 'b')",
        )
        .await
        .unwrap();
    assert_eq!(env.pending().await, 0, "an unwatched table queues nothing");
    assert!(
        triggers("reviews").await.is_empty(),
        "unwatch drops both triggers"
    );
    client.batch_execute("TRUNCATE reviews").await.unwrap();
    let truncations: i64 = client
        .query_one("SELECT count(*) FROM pgfresh.truncations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(truncations, 0, "an unwatched table records no TRUNCATE");
    env.cleanup().await;
}

/// Takes every queued key out of the queue, sorted.
async fn queued(client: &pgfresh::tokio_postgres::Client) -> Vec<String> {
    let rows = client
        .query("DELETE FROM pgfresh.changes RETURNING key", &[])
        .await
        .unwrap();
    let mut keys: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    keys.sort();
    keys
}

#[tokio::test]
async fn triggers_queue_old_and_new_keys_and_nothing_on_rollback() {
    let env = TestEnv::shop(3).await;
    let mut client = env.client().await;
    client
        .batch_execute("UPDATE reviews SET product_id = 2 WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(
        queued(&client).await,
        ["1", "2"],
        "moving a review queues both products"
    );
    client
        .batch_execute("DELETE FROM products WHERE id = 3")
        .await
        .unwrap();
    assert_eq!(
        queued(&client).await,
        ["3", "3", "3", "3"],
        "the product and its three cascaded reviews"
    );

    let txn = client.transaction().await.unwrap();
    txn.batch_execute("UPDATE products SET name = 'never' WHERE id = 1")
        .await
        .unwrap();
    txn.rollback().await.unwrap();
    assert!(
        queued(&client).await.is_empty(),
        "a rolled-back change leaves no trace"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn keys_queue_as_one_text_whoever_writes_and_composite_keys_with_a_null_field_count() {
    let env = TestEnv::empty().await;
    pgfresh::install(&env.db).await.unwrap();
    let mut client = env.client().await;
    client
        .batch_execute(
            "CREATE TYPE pair AS (a int, b int);
             CREATE TABLE events (k pair, day date, at timestamptz);
             SELECT pgfresh.watch('events', 'k', 'pair');
             SELECT pgfresh.watch('events', 'day', 'day');
             SELECT pgfresh.watch('events', 'at', 'at');",
        )
        .await
        .unwrap();
    // A writer with unusual date settings: the key's text is what it is for everyone else.
    let txn = client.transaction().await.unwrap();
    txn.batch_execute(
        "SET LOCAL DateStyle = 'SQL, DMY'; SET LOCAL TimeZone = 'Asia/Tokyo';
         INSERT INTO events VALUES (ROW(1, NULL), '2024-03-05', '2024-03-05 10:00:00+00');",
    )
    .await
    .unwrap();
    txn.commit().await.unwrap();
    let mut queued: Vec<(String, String)> = client
        .query("SELECT topic, key FROM pgfresh.changes", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    queued.sort();
    assert_eq!(
        queued,
        [
            ("at".to_string(), "2024-03-05 10:00:00+00".to_string()),
            ("day".to_string(), "2024-03-05".to_string()),
            ("pair".to_string(), "(1,)".to_string()),
        ]
    );
    env.cleanup().await;
}

#[tokio::test]
async fn odd_identifiers_and_null_keys_are_watched_as_they_should_be() {
    let env = TestEnv::empty().await;
    pgfresh::install(&env.db).await.unwrap();
    let client = env.client().await;
    client
        .batch_execute(
            r#"CREATE SCHEMA "My Shop";
               CREATE TABLE "My Shop"."Odd ""Table""" ("Key Col" text, other int);
               SELECT pgfresh.watch('"My Shop"."Odd ""Table"""', 'Key Col', 'odd');
               INSERT INTO "My Shop"."Odd ""Table""" VALUES ('k1', 1), (NULL, 2);
               UPDATE "My Shop"."Odd ""Table""" SET "Key Col" = NULL WHERE other = 1;
               UPDATE "My Shop"."Odd ""Table""" SET "Key Col" = 'k2' WHERE other = 2;
               DELETE FROM "My Shop"."Odd ""Table""";"#,
        )
        .await
        .unwrap();
    // k1 inserted; k1 moved to NULL (the old key only); NULL moved to k2 (the new key only); the
    // delete of the NULL row queues nothing, that of k2 queues k2.
    assert_eq!(queued(&client).await, ["k1", "k1", "k2", "k2"]);
    let watches: Vec<String> = client
        .query(
            "SELECT table_oid::regclass::text || '.' || key_column FROM pgfresh.watches",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        watches,
        [r#""My Shop"."Odd ""Table"""."Key Col""#.replace(r#"."Key Col""#, ".Key Col")]
    );
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
async fn writers_need_no_grant_on_pgfresh_and_their_writes_are_queued() {
    let env = TestEnv::shop(2).await;
    let role = format!("{}_writer", env.name);
    let admin = env.client().await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role};
             GRANT SELECT, INSERT, UPDATE, DELETE ON products, reviews TO {role};
             GRANT USAGE ON SEQUENCE reviews_id_seq TO {role};"
        ))
        .await
        .unwrap();
    let mut writer = env.client().await;
    let txn = writer.transaction().await.unwrap();
    txn.batch_execute(&format!("SET LOCAL ROLE {role}"))
        .await
        .unwrap();
    let denied = txn
        .batch_execute("SELECT count(*) FROM pgfresh.changes")
        .await
        .unwrap_err();
    assert!(
        denied
            .as_db_error()
            .unwrap()
            .message()
            .contains("permission denied")
    );
    txn.rollback().await.unwrap();

    let txn = writer.transaction().await.unwrap();
    txn.batch_execute(&format!(
        "SET LOCAL ROLE {role};
         UPDATE products SET name = 'by the writer' WHERE id = 1;
         INSERT INTO reviews (product_id, author, rating, body) VALUES (2, 'w', 4, 'ok');
         DELETE FROM reviews WHERE product_id = 1;"
    ))
    .await
    .unwrap();
    txn.commit().await.unwrap();
    assert_eq!(queued(&admin).await, ["1", "1", "1", "1", "2"]);
    admin
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn the_listener_role_works_the_queue_and_reads_only_what_is_granted() {
    let env = TestEnv::shop(3).await;
    let out = psql(&env, "sql/roles.sql");
    assert!(
        out.status.success(),
        "roles.sql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = psql(&env, "sql/roles.sql");
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
        let error = as_listener.batch_execute(forbidden).await.unwrap_err();
        let message = error.as_db_error().unwrap().message().to_string();
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
        pgfresh::ListenSettings {
            max_attempts: 1,
            ..common::test_settings()
        },
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
async fn postgres_tls_is_used_when_the_url_asks_for_it() {
    let env = TestEnv::empty().await;
    let encrypted = |db: pgfresh::Database| async move {
        let client = db.get().await?;
        let row = client
            .query_one("SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)", &[])
            .await?;
        Ok::<bool, pgfresh::Error>(row.get(0))
    };
    let plain = pgfresh::Database::new(&env.url, 1).unwrap();
    assert!(!encrypted(plain).await.unwrap(), "no sslmode: plain text");

    let server_ssl: String = env
        .client()
        .await
        .query_one("SHOW ssl", &[])
        .await
        .unwrap()
        .get(0);
    let required = pgfresh::Database::new(&format!("{}?sslmode=require", env.url), 1).unwrap();
    if server_ssl == "on" {
        assert!(
            encrypted(required).await.unwrap(),
            "sslmode=require: encrypted"
        );
    } else {
        let error = encrypted(required).await.unwrap_err().to_string();
        assert!(error.starts_with("cannot connect to PostgreSQL"), "{error}");
    }
    env.cleanup().await;
}

#[tokio::test]
async fn postgres_certificates_are_verified_when_the_url_asks_for_it() {
    let server = TempPostgres::start_tls();
    let ca = server.certificate_authority();
    let stranger = std::env::temp_dir().join(format!("pgfresh-other-ca-{}", server.port));
    std::fs::create_dir_all(&stranger).unwrap();
    make_certificates(&stranger);
    let connect = |host: &str, params: String| {
        let url = format!(
            "postgres://postgres@{host}:{}/postgres?{params}",
            server.port
        );
        async move {
            let db = pgfresh::Database::new(&url, 1)?;
            let client = db.get().await?;
            let row = client
                .query_one(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    &[],
                )
                .await?;
            Ok::<bool, pgfresh::Error>(row.get(0))
        }
    };
    let with_ca =
        |mode: &str, ca: &std::path::Path| format!("sslmode={mode}&sslrootcert={}", ca.display());

    // The certificate names 127.0.0.1 and is signed by the server's CA.
    assert!(
        connect("127.0.0.1", with_ca("verify-full", &ca))
            .await
            .unwrap()
    );
    assert!(
        connect("127.0.0.1", with_ca("verify-ca", &ca))
            .await
            .unwrap()
    );
    // Through another name: verify-ca accepts it, verify-full does not.
    assert!(
        connect("localhost", with_ca("verify-ca", &ca))
            .await
            .unwrap()
    );
    let wrong_name = connect("localhost", with_ca("verify-full", &ca))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        wrong_name.starts_with("refusing PostgreSQL") && wrong_name.contains("sslrootcert"),
        "{wrong_name}"
    );
    assert!(wrong_name.contains("certificate"), "{wrong_name}");
    // Signed by a CA we do not trust: refused whatever the name. `require` still encrypts.
    for mode in ["verify-ca", "verify-full"] {
        let impostor = connect("127.0.0.1", with_ca(mode, &stranger.join("ca.pem")))
            .await
            .unwrap_err()
            .to_string();
        assert!(impostor.contains("certificate"), "{mode}: {impostor}");
        assert_eq!(impostor.lines().count(), 1, "{impostor}");
    }
    // `require` encrypts without verifying; but given root certificates it verifies the chain, as
    // libpq's `require` does.
    assert!(
        connect("127.0.0.1", "sslmode=require".into())
            .await
            .unwrap()
    );
    let required = connect("127.0.0.1", with_ca("require", &stranger.join("ca.pem")))
        .await
        .unwrap_err()
        .to_string();
    assert!(required.contains("certificate"), "{required}");
    // No roots to verify against: a clear error before connecting.
    let missing = connect(
        "127.0.0.1",
        "sslmode=verify-full&sslrootcert=/nonexistent.pem".into(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        missing.starts_with("invalid PostgreSQL URL") && missing.contains("sslrootcert=system"),
        "{missing}"
    );
    let _ = std::fs::remove_dir_all(&stranger);
}

#[tokio::test]
async fn a_redis_user_limited_to_pgfresh_commands_and_keys_suffices() {
    let redis = TempRedis::start();
    // The ACL README gives, with every test database's key prefix.
    let acl = "ACL SETUSER pgfresh on >s3cret resetkeys ~pgfresh_test_* ~pgfresh:* resetchannels \
               -@all +get +set +del +mget +scan +ping +evalsha +eval +script|load +select +info";
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
    assert_eq!(String::from_utf8_lossy(&cards.stdout).lines().count(), 8);
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
async fn upgrading_from_0001_gives_existing_watches_their_truncate_trigger() {
    let env = TestEnv::empty().await;
    let client = env.client().await;
    let migrations = pgfresh::testing::migrations();
    let (_, first_name, first) = migrations[0];
    assert_eq!(first_name, "0001_initial");
    client
        .batch_execute(&format!(
            "BEGIN; {} {first} COMMIT;",
            pgfresh::testing::prepare_sql()
        ))
        .await
        .unwrap();
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
async fn triggers_notify_only_while_a_live_listener_is_idle() {
    use futures_util::StreamExt;
    let env = TestEnv::shop(1).await;
    let (client, mut connection) =
        pgfresh::tokio_postgres::connect(&env.url, pgfresh::tokio_postgres::NoTls)
            .await
            .unwrap();
    let (heard, mut hearing) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let pgfresh::tokio_postgres::AsyncMessage::Notification(note) = message {
                let _ = heard.send(note.payload().to_string());
            }
        }
    });
    client.batch_execute("LISTEN pgfresh").await.unwrap();
    let writer = env.client().await;
    // No listener, then a busy one, then one idle but silent for two minutes: no NOTIFY. Then a
    // marker of the test's own, and an idle, live listener: the trigger's empty NOTIFY comes after
    // the marker, so none of the first three notified (NOTIFYs arrive in commit order).
    writer
        .batch_execute(
            "UPDATE products SET price_cents = 1 WHERE id = 1;
             INSERT INTO pgfresh.listeners (id, idle) VALUES ('busy', false);
             UPDATE products SET price_cents = 2 WHERE id = 1;
             INSERT INTO pgfresh.listeners (id, idle, seen_at) VALUES ('gone', true, now() - interval '2 minutes');
             UPDATE products SET price_cents = 3 WHERE id = 1;
             NOTIFY pgfresh, 'marker';
             INSERT INTO pgfresh.listeners (id, idle) VALUES ('waiting', true);
             UPDATE products SET price_cents = 4 WHERE id = 1;",
        )
        .await
        .unwrap();
    let mut payloads = Vec::new();
    while payloads.len() < 2 {
        let payload = tokio::time::timeout(common::PATIENCE, hearing.recv())
            .await
            .expect("notifications arrive")
            .unwrap();
        payloads.push(payload);
    }
    assert_eq!(payloads, ["marker", ""]);
    env.cleanup().await;
}
