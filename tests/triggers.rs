//! What the triggers record: `pgfresh.watch` and `unwatch` are idempotent and refuse bad input
//! clearly; every committed insert, update and delete queues its old and new keys as one text whoever
//! writes, odd identifiers and NULL keys included, and a rollback queues nothing; writers need no grant
//! on pgfresh; and commits NOTIFY only while a live listener is idle.

mod common;

use common::{TestEnv, error_of};

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

    let error = error_of(
        &client,
        "SELECT pgfresh.watch('products', 'nope', 'product')",
    )
    .await;
    assert!(error.contains("has no column nope"), "{error}");
    let long_topic = format!(
        "SELECT pgfresh.watch('products', 'id', '{}')",
        "t".repeat(41)
    );
    for bad_topic in [
        "SELECT pgfresh.watch('products', 'id', 'Bad; DROP')",
        long_topic.as_str(),
    ] {
        let error = error_of(&client, bad_topic).await;
        assert!(error.contains("not a valid topic name"), "{error}");
    }
    client
        .batch_execute(&format!(
            "SELECT pgfresh.watch('products', 'id', '{}')",
            "t".repeat(40)
        ))
        .await
        .expect("40 characters are fine");

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
    let denied = error_of(&txn, "SELECT count(*) FROM pgfresh.changes").await;
    assert!(denied.contains("permission denied"), "{denied}");
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
    // the marker, so none of the first three notified (NOTIFYs arrive in commit order). Each
    // listener publishes until when one is idle after writing its row, as a listener does.
    let publish = "SELECT setval('pgfresh.notify_until', coalesce(
        (SELECT max(date_part('epoch', seen_at + interval '1 minute'))::bigint
         FROM pgfresh.listeners WHERE idle), 0));";
    writer
        .batch_execute(&format!(
            "UPDATE products SET price_cents = 1 WHERE id = 1;
             INSERT INTO pgfresh.listeners (id, idle) VALUES ('busy', false); {publish}
             UPDATE products SET price_cents = 2 WHERE id = 1;
             INSERT INTO pgfresh.listeners (id, idle, seen_at) VALUES ('gone', true, now() - interval '2 minutes'); {publish}
             UPDATE products SET price_cents = 3 WHERE id = 1;
             NOTIFY pgfresh, 'marker';
             INSERT INTO pgfresh.listeners (id, idle) VALUES ('waiting', true); {publish}
             UPDATE products SET price_cents = 4 WHERE id = 1;"
        ))
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

#[tokio::test]
async fn a_truncate_of_one_partition_is_recorded_and_a_partition_attached_later_is_named_until_watched_again()
 {
    let env = TestEnv::empty().await;
    pgfresh::install(&env.db).await.unwrap();
    let client = env.client().await;
    client
        .batch_execute(
            "CREATE TABLE visits (id bigint) PARTITION BY RANGE (id);
             CREATE TABLE visits_low PARTITION OF visits FOR VALUES FROM (0) TO (100);
             SELECT pgfresh.watch('visits', 'id', 'visit');
             INSERT INTO visits VALUES (7);
             TRUNCATE visits_low;",
        )
        .await
        .unwrap();
    let truncated: Vec<String> = client
        .query(
            "SELECT table_oid::regclass::text FROM pgfresh.truncations WHERE topic = 'visit'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(truncated, ["visits_low"]);

    // A partition attached since has the row trigger (cloned) but not the TRUNCATE one: status says
    // so, with the watch() that puts it right.
    client
        .batch_execute(
            "CREATE TABLE visits_high PARTITION OF visits FOR VALUES FROM (100) TO (200)",
        )
        .await
        .unwrap();
    let report = status(&env);
    assert!(
        report.contains("the TRUNCATE trigger of a watch on public.visits_high is missing")
            && report.contains("SELECT pgfresh.watch('public.visits', 'id', 'visit');"),
        "{report}"
    );
    client
        .batch_execute("SELECT pgfresh.watch('visits', 'id', 'visit'); TRUNCATE visits_high;")
        .await
        .unwrap();
    let report = status(&env);
    assert!(!report.contains("missing"), "{report}");
    env.cleanup().await;
}

#[tokio::test]
async fn a_partitioned_table_with_a_foreign_partition_is_watched() {
    let env = TestEnv::empty().await;
    pgfresh::install(&env.db).await.unwrap();
    let client = env.client().await;
    // A foreign table takes no TRUNCATE trigger: the watch passes it over.
    client
        .batch_execute(
            "CREATE EXTENSION file_fdw;
             CREATE SERVER files FOREIGN DATA WRAPPER file_fdw;
             CREATE TABLE shipments (id bigint, region text) PARTITION BY LIST (region);
             CREATE TABLE shipments_near PARTITION OF shipments FOR VALUES IN ('near');
             CREATE FOREIGN TABLE shipments_far PARTITION OF shipments FOR VALUES IN ('far')
                 SERVER files OPTIONS (filename '/dev/null', format 'csv');
             SELECT pgfresh.watch('shipments', 'id', 'shipment');
             INSERT INTO shipments VALUES (7, 'near');
             TRUNCATE shipments_near;",
        )
        .await
        .unwrap();
    let queued: Vec<String> = client
        .query(
            "SELECT key FROM pgfresh.changes WHERE topic = 'shipment'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(queued, ["7"]);
    let truncated: i64 = client
        .query_one(
            "SELECT count(*) FROM pgfresh.truncations WHERE topic = 'shipment'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(truncated, 1);
    // No trigger is missing for status and doctor: none is expected on the foreign partition.
    let report = status(&env);
    assert!(report.contains("shipment"), "{report}");
    assert!(!report.contains("missing"), "{report}");
    env.cleanup().await;
}

/// What `status` prints for the environment's database.
fn status(env: &TestEnv) -> String {
    common::cli::stdout(&common::cli::run(
        &common::shop_binary(),
        &env.url,
        &common::redis_url(),
        &["status"],
    ))
}

/// A watched key column renamed makes writes to its table fail until the watch is made again for
/// the new name, which, in the same transaction as the rename, leaves no write failing and no change
/// uncaptured (README's advice for a framework's migration that renames a field).
#[tokio::test]
async fn a_renamed_key_column_watched_again_in_the_same_transaction_keeps_capturing() {
    let env = TestEnv::shop(3).await;
    let client = env.client().await;
    client
        .batch_execute(
            "CREATE TABLE vouchers (code text PRIMARY KEY);
             SELECT pgfresh.watch('vouchers', 'code', 'voucher');",
        )
        .await
        .unwrap();
    queued(&client).await;
    client
        .batch_execute("ALTER TABLE vouchers RENAME COLUMN code TO voucher_code")
        .await
        .unwrap();
    let error = error_of(&client, "INSERT INTO vouchers VALUES ('LOST')").await;
    assert!(error.contains("has no field \"code\""), "{error}");
    client
        .batch_execute(
            "BEGIN;
             ALTER TABLE vouchers RENAME COLUMN voucher_code TO code_now;
             SELECT pgfresh.watch('vouchers', 'code_now', 'voucher');
             COMMIT;
             INSERT INTO vouchers VALUES ('SPRING');
             UPDATE vouchers SET code_now = 'SUMMER' WHERE code_now = 'SPRING';",
        )
        .await
        .unwrap();
    assert_eq!(queued(&client).await, ["SPRING", "SPRING", "SUMMER"]);
    env.cleanup().await;
}

/// `watch` waits for no reader: a transaction that has read the table (a report, a forgotten
/// `BEGIN`) and stays open does not hold up a table's first watch, a second watch of it, nor the
/// watch of a partitioned table one of whose partitions it read; nor do queries of the table queue
/// behind `watch` meanwhile. The triggers it put in place capture each write once.
#[tokio::test]
async fn watch_waits_for_no_transaction_that_read_the_table() {
    let env = TestEnv::empty().await;
    pgfresh::install(&env.db).await.unwrap();
    let client = env.client().await;
    client
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY);
             CREATE TABLE shipments (id int, region text) PARTITION BY LIST (region);
             CREATE TABLE shipments_near PARTITION OF shipments FOR VALUES IN ('near');
             SELECT pgfresh.watch('items', 'id', 'item');",
        )
        .await
        .unwrap();
    let reader = env.client().await;
    reader
        .batch_execute("BEGIN; SELECT count(*) FROM items; SELECT count(*) FROM shipments_near;")
        .await
        .unwrap();
    // Were a lock taken that readers hold up, these would wait for the reader and fail after 10 s.
    client
        .batch_execute(
            "SET lock_timeout = '10s';
             SELECT pgfresh.watch('items', 'id', 'item');
             SELECT pgfresh.watch('items', 'id', 'item_too');
             SELECT pgfresh.watch('shipments', 'id', 'shipment');
             SELECT pgfresh.watch('shipments', 'id', 'shipment');
             RESET lock_timeout;",
        )
        .await
        .unwrap();
    reader.batch_execute("COMMIT").await.unwrap();
    client
        .batch_execute(
            "INSERT INTO items VALUES (1); INSERT INTO shipments VALUES (2, 'near');
             TRUNCATE shipments_near;",
        )
        .await
        .unwrap();
    let queued: Vec<(String, String)> = client
        .query(
            "SELECT topic, key FROM pgfresh.changes ORDER BY topic, key",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let pair = |topic: &str, key: &str| (topic.to_string(), key.to_string());
    assert_eq!(
        queued,
        [
            pair("item", "1"),
            pair("item_too", "1"),
            pair("shipment", "2")
        ]
    );
    let truncations: i64 = client
        .query_one(
            "SELECT count(*) FROM pgfresh.truncations WHERE topic = 'shipment'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(truncations, 1);
    env.cleanup().await;
}

/// A table watched on its own and then attached as a partition of a table watched under the same
/// topic keeps its own watch, named, rather than having its trigger silently replaced by a copy of
/// the table's (which would queue another column); a partition is not watched apart from the
/// table whose watch covers it either.
#[tokio::test]
async fn a_partition_with_a_watch_of_its_own_under_the_topic_is_refused_by_name() {
    let env = TestEnv::empty().await;
    pgfresh::install(&env.db).await.unwrap();
    let client = env.client().await;
    client
        .batch_execute(
            "CREATE TABLE orders (id int, region text, other_id int) PARTITION BY LIST (region);
             CREATE TABLE orders_eu (id int, region text, other_id int);
             SELECT pgfresh.watch('orders_eu', 'other_id', 'order');
             ALTER TABLE orders ATTACH PARTITION orders_eu FOR VALUES IN ('eu');",
        )
        .await
        .unwrap();
    let refused = error_of(&client, "SELECT pgfresh.watch('orders', 'id', 'order')").await;
    assert!(
        refused.contains(
            "partition public.orders_eu of public.orders has a watch of its own for topic order"
        ),
        "{refused}"
    );
    // Its own watch still queues its own key column.
    client
        .batch_execute("INSERT INTO orders VALUES (1, 'eu', 100)")
        .await
        .unwrap();
    assert_eq!(queued(&client).await, ["100"]);
    // Unwatched first, the table's watch covers it.
    client
        .batch_execute(
            "SELECT pgfresh.unwatch('orders_eu', 'order');
             SELECT pgfresh.watch('orders', 'id', 'order');
             INSERT INTO orders VALUES (2, 'eu', 200);",
        )
        .await
        .unwrap();
    assert_eq!(queued(&client).await, ["2"]);
    let refused = error_of(
        &client,
        "SELECT pgfresh.watch('orders_eu', 'other_id', 'order')",
    )
    .await;
    assert!(
        refused.contains(
            "public.orders_eu is a partition of public.orders, whose watch of topic order covers it"
        ),
        "{refused}"
    );
    env.cleanup().await;
}

/// On a logical replication subscriber the DBA enables pgfresh's triggers `ALWAYS` (or `REPLICA`),
/// so that the apply worker's writes are captured: watching the table again keeps each trigger as
/// it was, on the table and on each partition, instead of making it anew for the origin alone.
#[tokio::test]
async fn watch_again_keeps_triggers_enabled_always_or_replica() {
    let env = TestEnv::empty().await;
    pgfresh::install(&env.db).await.unwrap();
    let client = env.client().await;
    let states = || async {
        client
            .query(
                "SELECT tgrelid::regclass::text || ' ' || tgname || ' ' || tgenabled::text
                 FROM pg_trigger WHERE tgname LIKE 'pgfresh%' ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect::<Vec<String>>()
    };
    client
        .batch_execute(
            r#"CREATE TABLE shipments (id int, region text) PARTITION BY LIST (region);
               CREATE TABLE shipments_near PARTITION OF shipments FOR VALUES IN ('near');
               CREATE TABLE shipments_far PARTITION OF shipments FOR VALUES IN ('far');
               SELECT pgfresh.watch('shipments', 'id', 'shipment');
               ALTER TABLE shipments ENABLE ALWAYS TRIGGER pgfresh_shipment;
               ALTER TABLE shipments_far ENABLE REPLICA TRIGGER pgfresh_shipment;
               ALTER TABLE shipments_near ENABLE ALWAYS TRIGGER "pgfresh_shipment:truncate";"#,
        )
        .await
        .unwrap();
    let before = states().await;
    assert_eq!(
        before,
        [
            "shipments pgfresh_shipment A",
            "shipments pgfresh_shipment:truncate O",
            "shipments_far pgfresh_shipment R",
            "shipments_far pgfresh_shipment:truncate O",
            "shipments_near pgfresh_shipment A",
            "shipments_near pgfresh_shipment:truncate A",
        ]
    );
    client
        .batch_execute("SELECT pgfresh.watch('shipments', 'id', 'shipment')")
        .await
        .unwrap();
    assert_eq!(states().await, before);
    // Written as the apply worker writes: captured.
    client
        .batch_execute(
            "SET session_replication_role = replica;
             INSERT INTO shipments VALUES (1, 'near'), (2, 'far');
             RESET session_replication_role;",
        )
        .await
        .unwrap();
    assert_eq!(queued(&client).await, ["1", "2"]);
    env.cleanup().await;
}
