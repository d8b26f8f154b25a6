//! A bad row fails its own change, never the queue. Schema drift (a NULL in a column a loader reads as
//! non-null) makes user code panic or fail on one row: that change is retried with its error and
//! parked, visible in `status`, the metrics and `pgfresh.failed`, while every other change, even one
//! claimed and loaded in the same batch, reaches Redis as usual. The sweep likewise refreshes every
//! other key and hands the bad one to the queue.

mod common;

use std::process::{Child, Command, Stdio};

use common::cli::{run, stdout};
use common::servers::{TempRedis, free_port, http_get, metric};
use common::{TestEnv, eventually, shop_binary, tweak};
use pgfresh::tokio_postgres::{self, Client};
use pgfresh::{Fragment, Fragments, Topics};

/// Drops `products.name`'s NOT NULL and sets product `id`'s name to NULL: the shop's loader reads the
/// name as a `String`, and panics on that row.
async fn null_name(db: &Client, id: i64) {
    db.batch_execute("ALTER TABLE products ALTER name DROP NOT NULL")
        .await
        .unwrap();
    db.execute("UPDATE products SET name = NULL WHERE id = $1", &[&id])
        .await
        .unwrap();
}

/// Starts `shop listen` with `--max-attempts 3`, serving metrics on `port`.
fn start_shop_listener(env: &TestEnv, redis: &TempRedis, port: u16) -> Child {
    Command::new(shop_binary())
        .args([
            "listen",
            "--sweep-interval",
            "0",
            "--poll-interval",
            "200ms",
        ])
        .args([
            "--max-attempts",
            "3",
            "--http",
            &format!("127.0.0.1:{port}"),
        ])
        .env("DATABASE_URL", &env.url)
        .env("REDIS_URL", redis.url())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("shop listen starts")
}

/// Waits until `redis` holds `key` with `text` in it.
async fn wait_for(redis: &pgfresh::RedisStore, key: &str, text: &str) {
    eventually(&format!("{key} to show {text}"), || async {
        redis
            .get(key)
            .await
            .unwrap()
            .is_some_and(|html| html.contains(text))
    })
    .await;
}

#[tokio::test]
async fn a_loader_that_panics_on_one_row_fails_that_change_alone_and_every_other_goes_through() {
    let env = TestEnv::shop(10).await;
    let redis = TempRedis::start();
    let port = free_port();
    let mut listener = start_shop_listener(&env, &redis, port);
    eventually("the listener to be ready", || async {
        http_get(port, "/readyz").await.0 == 200
    })
    .await;
    let store = pgfresh::RedisStore::connect(&redis.url()).await.unwrap();
    // Redis starts empty: the listener's first sweep, done before product 5 goes bad.
    eventually("the first sweep", || async {
        let marker = store.get("pgfresh:fragment:shop:product_card:").await;
        marker.unwrap().is_some()
    })
    .await;
    let db = env.client().await;

    null_name(&db, 5).await;
    db.execute("UPDATE products SET price_cents = 606 WHERE id = 6", &[])
        .await
        .unwrap();
    wait_for(&store, "shop:product_card:6:full", "$6.06").await;
    // One transaction, so one batch and one load for both keys: the load panics on product 5, and
    // product 7 still reaches Redis.
    db.batch_execute(
        "BEGIN;
         UPDATE products SET price_cents = 505 WHERE id = 5;
         UPDATE products SET price_cents = 707 WHERE id = 7;
         COMMIT;",
    )
    .await
    .unwrap();
    wait_for(&store, "shop:product_card:7:full", "$7.07").await;

    // Product 5's changes are retried (1 s, then 2 s) and parked at the third attempt, with why.
    eventually("product 5's changes to be parked", || async {
        env.parked().await == 2 && env.pending().await == 0
    })
    .await;
    let parked = db
        .query("SELECT key, attempts, error FROM pgfresh.failed", &[])
        .await
        .unwrap();
    for row in &parked {
        let (key, attempts, error): (String, i32, String) = (row.get(0), row.get(1), row.get(2));
        assert_eq!((key.as_str(), attempts), ("5", 3), "{error}");
        assert!(
            error.contains("load of product_card panicked: error retrieving column 1"),
            "{error}"
        );
    }
    let card = store.get("shop:product_card:5:full").await.unwrap();
    assert!(
        !card.unwrap().contains("$5.05"),
        "product 5 was never rendered"
    );
    let (_, scrape) = http_get(port, "/metrics").await;
    assert!(
        metric(&scrape, "pgfresh_changes_failed_total") >= 6.0,
        "{scrape}"
    );
    let status = stdout(&run(&shop_binary(), &env.url, &redis.url(), &["status"]));
    assert!(status.contains("2 parked in pgfresh.failed"), "{status}");
    assert!(
        status.contains("product 5 (3 attempts): load of product_card panicked"),
        "{status}"
    );

    // The listener is alive and well: a later change goes through at once.
    db.execute("UPDATE products SET price_cents = 808 WHERE id = 8", &[])
        .await
        .unwrap();
    wait_for(&store, "shop:product_card:8:full", "$8.08").await;
    let _ = Command::new("kill")
        .args(["-TERM", &listener.id().to_string()])
        .status();
    let exited = listener.wait().unwrap();
    assert!(exited.success(), "{exited:?}");
    env.cleanup().await;
}

/// The shop's card with a loader that reads the name with `try_get`: a NULL is its error, not a
/// panic, and one that comes from the driver, not the server.
struct CarefulCard;

impl Fragment for CarefulCard {
    type Key = i64;
    type Row = String;
    type Variant = common::product_card::Card;
    type Error = tokio_postgres::Error;

    fn name(&self) -> &str {
        "careful_card"
    }
    fn topics(&self) -> Topics {
        Topics::new().direct("product")
    }
    async fn load(&self, db: &Client, ids: &[i64]) -> pgfresh::Loaded<Self> {
        let rows = db
            .query("SELECT id, name FROM products WHERE id = ANY($1)", &[&ids])
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect()
    }
    fn render(&self, _: &i64, name: &String, _: Self::Variant) -> pgfresh::maud::Markup {
        pgfresh::maud::html! { h2 { (name) } }
    }
    async fn keys_after(
        &self,
        db: &Client,
        after: Option<&i64>,
        limit: i64,
    ) -> Result<Vec<i64>, tokio_postgres::Error> {
        common::product_card::ProductCard
            .keys_after(db, after, limit)
            .await
    }
}

#[tokio::test]
async fn a_value_the_loader_cannot_convert_fails_its_key_alone_instead_of_waiting_forever() {
    let env = TestEnv::shop(10).await;
    let listener = env.start_listener_with(
        Fragments::new().with(&env.prefix, CarefulCard),
        tweak(common::test_settings(), |s| s.max_attempts = 2),
    );
    let db = env.client().await;
    null_name(&db, 3).await;
    db.batch_execute(
        "BEGIN;
         UPDATE products SET name = 'Careful 2' WHERE id = 2;
         UPDATE products SET price_cents = 1 WHERE id = 3;
         UPDATE products SET name = 'Careful 4' WHERE id = 4;
         COMMIT;",
    )
    .await
    .unwrap();
    for id in [2, 4] {
        let key = env.key(id, "compact");
        let expected = format!("<h2>Careful {id}</h2>");
        eventually(&key, || async {
            env.get(&key).await.as_deref() == Some(&expected)
        })
        .await;
    }
    // Not a lost connection: each attempt counts, and the change is parked.
    eventually("product 3's changes to be parked", || async {
        env.parked().await == 2 && env.pending().await == 0
    })
    .await;
    let errors = env.parked_errors("change_id").await;
    assert!(
        errors
            .iter()
            .all(|e| e.contains("load of careful_card failed")
                && e.contains("error deserializing column 1")),
        "{errors:?}"
    );
    listener.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_sweep_refreshes_every_key_but_the_one_whose_row_panics_the_loader_and_queues_that_one() {
    let env = TestEnv::shop(40).await;
    let db = env.client().await;
    null_name(&db, 17).await;
    // Pages of 10: the bad row's page loads 9 rows and fails one key, and the sweep goes on.
    let report = env
        .try_sweep(tweak(Default::default(), |s| s.page_size = 10))
        .await
        .expect("the sweep runs to its end");
    assert!(report.completed(), "{report}");
    assert_eq!((report.stats.errors, report.requeued), (1, 1), "{report}");
    assert_eq!(report.stats.rendered, 39 * 2, "{report}");
    for id in [11, 16, 18, 20, 40] {
        assert_eq!(
            env.get(&env.key(id, "full")).await,
            env.fresh_render(id, "full").await,
            "product {id}"
        );
    }
    assert_eq!(env.get(&env.key(17, "full")).await, None);
    let queued = db
        .query_one(
            "SELECT key, attempts, last_error FROM pgfresh.changes WHERE topic = 'fragment:product_card'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(queued.get::<_, String>(0), "17");
    assert!(
        queued
            .get::<_, String>(2)
            .contains("load of product_card panicked"),
        "{:?}",
        queued.get::<_, String>(2)
    );
    env.cleanup().await;
}

#[tokio::test]
async fn many_bad_rows_in_one_batch_park_only_their_own_changes() {
    let env = TestEnv::shop(200).await;
    let listener = env.start_listener_with(
        Fragments::new().with(&env.prefix, CarefulCard),
        tweak(common::test_settings(), |s| s.max_attempts = 2),
    );
    let db = env.client().await;
    db.batch_execute("ALTER TABLE products ALTER name DROP NOT NULL")
        .await
        .unwrap();
    // One statement, so one batch: 20 bad rows spread among 200.
    db.batch_execute(
        "UPDATE products SET name = CASE WHEN id % 10 = 3 THEN NULL ELSE 'Fine ' || id END",
    )
    .await
    .unwrap();
    eventually("the 180 good cards to be rendered", || async {
        let mut redis = env.sink.connection();
        let keys: Vec<String> = (1..=200)
            .filter(|id| id % 10 != 3)
            .map(|id| env.key(id, "compact"))
            .collect();
        let cards: Vec<Option<String>> = redis::cmd("MGET")
            .arg(keys)
            .query_async(&mut redis)
            .await
            .unwrap();
        cards
            .iter()
            .all(|card| card.as_deref().is_some_and(|c| c.contains("Fine")))
    })
    .await;
    eventually("the bad rows' changes to be parked", || async {
        env.pending().await == 0
    })
    .await;
    let parked: Vec<String> = db
        .query("SELECT DISTINCT key FROM pgfresh.failed ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let bad: Vec<String> = {
        let mut bad: Vec<String> = (1..=200)
            .filter(|id| id % 10 == 3)
            .map(|id| id.to_string())
            .collect();
        bad.sort();
        bad
    };
    assert_eq!(parked, bad, "only the bad rows' changes are parked");
    listener.stop().await;
    env.cleanup().await;
}

/// A card whose loader reports errors through anyhow, and whose first load loses its connection
/// (its own session is terminated under it).
struct FragileCard {
    loads: std::sync::atomic::AtomicUsize,
}

impl Fragment for FragileCard {
    type Key = i64;
    type Row = String;
    type Variant = common::product_card::Card;
    type Error = anyhow::Error;

    fn name(&self) -> &str {
        "fragile_card"
    }
    fn topics(&self) -> Topics {
        Topics::new().direct("product")
    }
    async fn load(&self, db: &Client, ids: &[i64]) -> pgfresh::Loaded<Self> {
        let first = self.loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
        if first {
            let _ = db
                .execute("SELECT pg_terminate_backend(pg_backend_pid())", &[])
                .await;
        }
        let rows = db
            .query("SELECT id, name FROM products WHERE id = ANY($1)", &[&ids])
            .await?;
        Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
    }
    fn render(&self, _: &i64, name: &String, _: Self::Variant) -> pgfresh::maud::Markup {
        pgfresh::maud::html! { h2 { (name) } }
    }
    async fn keys_after(
        &self,
        db: &Client,
        after: Option<&i64>,
        limit: i64,
    ) -> Result<Vec<i64>, anyhow::Error> {
        let keys = common::product_card::ProductCard.keys_after(db, after, limit);
        Ok(keys.await?)
    }
}

#[tokio::test]
async fn a_lost_connection_behind_an_anyhow_error_is_waited_out_not_split_and_counted() {
    let env = TestEnv::shop(4).await;
    let card = std::sync::Arc::new(FragileCard {
        loads: Default::default(),
    });
    let listener = env.start_listener_with(
        Fragments::new().with(&env.prefix, common::SharedFragment(card.clone())),
        common::test_settings(),
    );
    env.client()
        .await
        .batch_execute("UPDATE products SET name = 'Again ' || id WHERE id IN (1, 2, 3)")
        .await
        .unwrap();
    for id in 1..=3 {
        let key = env.key(id, "compact");
        let expected = format!("<h2>Again {id}</h2>");
        eventually(&key, || async {
            env.get(&key).await.as_deref() == Some(&expected)
        })
        .await;
    }
    let loads = card.loads.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        loads <= 3,
        "the lost connection was split into {loads} loads"
    );
    assert_eq!(env.parked().await, 0);
    listener.stop().await;
    env.cleanup().await;
}

/// A card whose load fails in its data (a division by zero) for product 3 and for product 2
/// grouped with others, and with a serialization failure (an error PostgreSQL calls transient) for
/// product 2 alone: splitting isolates 2 and 3, and every other key loads.
struct ConflictedCard;

impl Fragment for ConflictedCard {
    type Key = i64;
    type Row = String;
    type Variant = common::product_card::Card;
    type Error = anyhow::Error;

    fn name(&self) -> &str {
        "conflicted_card"
    }
    fn topics(&self) -> Topics {
        Topics::new().direct("product")
    }
    async fn load(&self, db: &Client, ids: &[i64]) -> pgfresh::Loaded<Self> {
        if ids.contains(&3) || (ids.contains(&2) && ids.len() > 1) {
            db.query("SELECT 1 / 0", &[]).await?;
        }
        if ids == [2] {
            db.batch_execute(
                "DO $$ BEGIN RAISE EXCEPTION 'could not serialize access'
                 USING ERRCODE = 'serialization_failure'; END $$",
            )
            .await?;
        }
        let rows = db
            .query("SELECT id, name FROM products WHERE id = ANY($1)", &[&ids])
            .await?;
        Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
    }
    fn render(&self, _: &i64, name: &String, _: Self::Variant) -> pgfresh::maud::Markup {
        pgfresh::maud::html! { h2 { (name) } }
    }
    async fn keys_after(
        &self,
        db: &Client,
        after: Option<&i64>,
        limit: i64,
    ) -> Result<Vec<i64>, anyhow::Error> {
        let keys = common::product_card::ProductCard.keys_after(db, after, limit);
        Ok(keys.await?)
    }
}

/// A transient error (a serialization failure) of a group that splitting a bad row's load made
/// fails that group alone, as any failure there does: the keys loaded in other groups reach Redis.
#[tokio::test]
async fn a_transient_error_while_isolating_a_bad_row_fails_its_own_group_alone() {
    let env = TestEnv::shop(4).await;
    let listener = env.start_listener_with(
        Fragments::new().with(&env.prefix, ConflictedCard),
        tweak(common::test_settings(), |s| s.max_attempts = 1),
    );
    // One statement, so one batch.
    env.client()
        .await
        .batch_execute("UPDATE products SET name = 'Again ' || id")
        .await
        .unwrap();
    eventually("products 2 and 3 to be parked", || async {
        env.parked().await == 2
    })
    .await;
    for id in [1, 4] {
        let key = env.key(id, "compact");
        let expected = format!("<h2>Again {id}</h2>");
        eventually(&key, || async {
            env.get(&key).await.as_deref() == Some(&expected)
        })
        .await;
    }
    let errors = env.parked_errors("key").await;
    assert!(
        errors.len() == 2
            && errors[0].contains("could not serialize access")
            && errors[0].contains("(key 2 alone)")
            && errors[1].contains("division by zero"),
        "{errors:?}"
    );
    assert_eq!(env.pending().await, 0);
    listener.stop().await;
    env.cleanup().await;
}
