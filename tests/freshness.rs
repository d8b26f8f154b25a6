//! Freshness (`pgfresh_freshness_seconds`) where PostgreSQL records commit timestamps: measured
//! from the commit, not from the writing transaction's start. In a test binary of its own, since
//! the metrics are the process's.

mod common;

use common::servers::{TempRedis, free_port, http_get as get, metric};
use common::{eventually, test_settings, tweak};

#[tokio::test]
async fn freshness_counts_from_the_commit_where_postgresql_records_commit_timestamps() {
    use common::servers::PostgresSetup;
    let postgres = common::servers::TempPostgres::start_with(PostgresSetup {
        settings: &["track_commit_timestamp=on"],
        ..PostgresSetup::default()
    });
    let redis = TempRedis::start();
    let admin = common::connect(&postgres.url("postgres")).await;
    admin.batch_execute("CREATE DATABASE shop").await.unwrap();
    drop(admin);
    let db = pgfresh::Database::new(&postgres.url("shop"), 8).unwrap();
    common::setup::setup(&db, 3).await.unwrap();
    let sink = pgfresh::RedisStore::connect(&redis.url()).await.unwrap();
    let prefix = "shop:card:";
    pgfresh::testing::set_fragment_marker(&sink, prefix, 1)
        .await
        .unwrap();
    let port = free_port();
    let shutdown = pgfresh::Shutdown::new();
    let listener = tokio::spawn(pgfresh::listen(
        db.clone(),
        sink,
        pgfresh::Fragments::new().with(prefix, common::product_card::ProductCard),
        tweak(test_settings(), |s| {
            s.http = Some(format!("127.0.0.1:{port}"))
        }),
        shutdown.clone(),
    ));
    eventually("/readyz to say ready", || async {
        get(port, "/readyz").await.0 == 200
    })
    .await;
    // A queue row whose transaction, by its own clock, began an hour ago, but committed just now:
    // with commit timestamps, that is how fresh it is.
    db.get()
        .await
        .unwrap()
        .batch_execute(
            "INSERT INTO pgfresh.changes (topic, key, enqueued_at)
             VALUES ('product', '1', now() - interval '1 hour')",
        )
        .await
        .unwrap();
    let count = "pgfresh_freshness_seconds_count{fragment=\"product_card\"}";
    let within = "pgfresh_freshness_seconds_bucket{fragment=\"product_card\",le=\"300\"}";
    let sum = "pgfresh_freshness_seconds_sum{fragment=\"product_card\"}";
    eventually("the change to be counted", || async {
        metric(&get(port, "/metrics").await.1, count) >= 1.0
    })
    .await;
    let (_, body) = get(port, "/metrics").await;
    assert_eq!(metric(&body, within), metric(&body, count), "{body}");
    assert!(metric(&body, sum) < 300.0, "{body}");
    shutdown.cancel();
    tokio::time::timeout(common::PATIENCE, listener)
        .await
        .expect("the listener stops")
        .unwrap()
        .unwrap();
}
