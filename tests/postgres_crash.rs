//! What a listener knows and promises survives a PostgreSQL crash: the registry is unlogged, so a
//! crash empties it, and each listener writes its whole row again. On a throwaway PostgreSQL of its
//! own, stopped as in a crash.

mod common;

use common::servers::TempPostgres;
use common::{eventually, test_settings};
use pgfresh::{Database, Fragments, RedisStore, Shutdown, Storage};

/// A throwaway PostgreSQL with the shop on it, and a prefix of the test's own on the shared Redis.
async fn shop_on_throwaway_postgres() -> (TempPostgres, Database, RedisStore, String) {
    let postgres = TempPostgres::start();
    let admin = common::connect(&postgres.url("postgres")).await;
    admin.batch_execute("CREATE DATABASE shop").await.unwrap();
    let db = Database::new(&postgres.url("shop"), 8).unwrap();
    common::setup::setup(&db, 3).await.unwrap();
    let sink = RedisStore::connect(&common::redis_url()).await.unwrap();
    let prefix = format!("pgfresh_test_crash_{}:card:", std::process::id());
    (postgres, db, sink, prefix)
}

#[tokio::test]
async fn after_a_crash_a_listener_still_says_where_it_stores_and_a_conflicting_one_is_refused() {
    let (postgres, db, sink, prefix) = shop_on_throwaway_postgres().await;
    let card = || common::product_card::ProductCard;
    let shutdown = Shutdown::new();
    let plain = tokio::spawn(pgfresh::listen(
        db.clone(),
        sink.clone(),
        Fragments::new().with(&prefix, card()),
        test_settings(),
        shutdown.clone(),
    ));
    let registered = || async {
        let client = common::connect(&postgres.url("shop")).await;
        let row = client
            .query_opt("SELECT stored FROM pgfresh.listeners", &[])
            .await
            .unwrap();
        row.map(|row| row.get::<_, Option<Vec<String>>>(0))
    };
    eventually("the listener to register", || async {
        registered().await.is_some()
    })
    .await;

    postgres.restart();
    // The crash emptied the registry; the listener's heartbeat or idle switch writes its row again.
    eventually("the listener's row to be back", || async {
        registered().await.is_some()
    })
    .await;
    assert_eq!(
        registered().await,
        Some(Some(vec![format!("{prefix}* (plain)")])),
        "the row says where the fragment is stored"
    );

    // A second listener storing the same fragment in Django's format would split the changes.
    let django = Fragments::new().with_storage(&prefix, card(), Storage::django("site", 1));
    let refused = tokio::time::timeout(
        common::PATIENCE,
        pgfresh::listen(
            db.clone(),
            sink.clone(),
            django,
            test_settings(),
            Shutdown::new(),
        ),
    )
    .await
    .expect("the second listener stops at once");
    let error = refused
        .expect_err("a conflicting listener is refused")
        .to_string();
    assert!(
        error.contains(&format!(
            "stores fragment product_card at {prefix}* (plain)"
        )),
        "{error}"
    );
    shutdown.cancel();
    plain.await.unwrap().unwrap();
    let mut redis = sink.connection();
    for key in common::test_keys(&mut redis, &prefix).await.unwrap() {
        let _: () = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
}
