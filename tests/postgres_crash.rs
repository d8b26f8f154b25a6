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
    // Started in full (registered, drained once and idle), not restarted in the middle of start-up.
    started_in_full(&postgres).await;

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

/// Waits until the one listener is idle: registered, drained once, started in full.
async fn started_in_full(postgres: &TempPostgres) {
    eventually("the listener to be idle", || async {
        let client = common::connect(&postgres.url("shop")).await;
        let idle: i64 = client
            .query_one("SELECT count(*) FROM pgfresh.listeners WHERE idle", &[])
            .await
            .unwrap()
            .get(0);
        idle == 1
    })
    .await;
}

/// The reasons of the complete sweeps recorded, oldest first.
async fn restart_sweeps(postgres: &TempPostgres) -> Vec<String> {
    // Refused while PostgreSQL recovers: nothing recorded yet, then.
    let Ok((client, connection)) =
        pgfresh::tokio_postgres::connect(&postgres.url("shop"), pgfresh::tokio_postgres::NoTls)
            .await
    else {
        return Vec::new();
    };
    tokio::spawn(connection);
    client
        .query("SELECT reason FROM pgfresh.sweeps ORDER BY started_at", &[])
        .await
        .map(|rows| rows.iter().map(|row| row.get(0)).collect())
        .unwrap_or_default()
}

/// The render ticket sequence's last value.
async fn last_ticket(postgres: &TempPostgres) -> i64 {
    let client = common::connect(&postgres.url("shop")).await;
    client
        .query_one("SELECT last_value FROM pgfresh.render_tickets", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_crash_while_no_listener_ran_is_noticed_by_the_next_listener_which_sweeps() {
    let (postgres, db, sink, prefix) = shop_on_throwaway_postgres().await;
    pgfresh::testing::set_fragment_marker(&sink, &prefix, 1)
        .await
        .unwrap();
    // The crash comes while no listener runs: nobody saw PostgreSQL before it.
    drop(db);
    postgres.restart();
    let db = Database::new(&postgres.url("shop"), 8).unwrap();
    let shutdown = Shutdown::new();
    let listener = tokio::spawn(pgfresh::listen(
        db.clone(),
        sink.clone(),
        Fragments::new().with(&prefix, common::product_card::ProductCard),
        test_settings(),
        shutdown.clone(),
    ));
    eventually("the listener to sweep after the crash", || async {
        restart_sweeps(&postgres).await == ["restart"]
    })
    .await;
    assert!(
        last_ticket(&postgres).await > 1_000_000_000,
        "tickets moved ahead"
    );
    shutdown.cancel();
    listener.await.unwrap().unwrap();
    clean_up(&sink, &prefix).await;
}

#[tokio::test]
async fn crash_recovery_without_a_new_postmaster_is_noticed_and_swept() {
    let (postgres, db, sink, prefix) = shop_on_throwaway_postgres().await;
    pgfresh::testing::set_fragment_marker(&sink, &prefix, 1)
        .await
        .unwrap();
    let shutdown = Shutdown::new();
    let listener = tokio::spawn(pgfresh::listen(
        db.clone(),
        sink.clone(),
        Fragments::new().with(&prefix, common::product_card::ProductCard),
        test_settings(),
        shutdown.clone(),
    ));
    // Started in full: a crash in the middle of start-up fails the start instead, for the
    // supervisor to start it again.
    started_in_full(&postgres).await;
    let client = common::connect(&postgres.url("shop")).await;
    let started: String = client
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await
        .unwrap()
        .get(0);
    // A backend killed outright (the kernel's OOM killer, say): the postmaster ends every session
    // and recovers from the WAL, with restart_after_crash on, keeping its own start time.
    let victim: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &victim.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    eventually("the listener to sweep after crash recovery", || async {
        restart_sweeps(&postgres).await == ["restart"]
    })
    .await;
    let client = common::connect(&postgres.url("shop")).await;
    let after: String = client
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(started, after, "the postmaster kept running");
    assert!(
        last_ticket(&postgres).await > 1_000_000_000,
        "tickets moved ahead"
    );
    shutdown.cancel();
    listener.await.unwrap().unwrap();
    clean_up(&sink, &prefix).await;
}

/// Deletes this test's keys from the shared Redis.
async fn clean_up(sink: &RedisStore, prefix: &str) {
    let mut redis = sink.connection();
    for key in common::test_keys(&mut redis, prefix).await.unwrap() {
        let _: () = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn of_two_conflicting_listeners_after_the_registry_emptied_the_later_one_gives_way() {
    let (postgres, db, sink, prefix) = shop_on_throwaway_postgres().await;
    pgfresh::testing::set_fragment_marker(&sink, &prefix, 1)
        .await
        .unwrap();
    let card = || common::product_card::ProductCard;
    let shutdown = Shutdown::new();
    let plain = tokio::spawn(pgfresh::listen(
        db.clone(),
        sink.clone(),
        Fragments::new().with(&prefix, card()),
        test_settings(),
        shutdown.clone(),
    ));
    let client = common::connect(&postgres.url("shop")).await;
    eventually("the plain listener to register", || async {
        let n: i64 = client
            .query_one("SELECT count(*) FROM pgfresh.listeners", &[])
            .await
            .unwrap()
            .get(0);
        n == 1
    })
    .await;
    started_in_full(&postgres).await;
    // A crash empties the registry (here, by hand: the plain listener, idle, writes its row again
    // only at its next heartbeat); a listener storing the card in Django's format starts meanwhile,
    // and finds no one in its way.
    client
        .batch_execute("DELETE FROM pgfresh.listeners")
        .await
        .unwrap();
    let django = tokio::spawn(pgfresh::listen(
        db.clone(),
        sink.clone(),
        Fragments::new().with_storage(&prefix, card(), Storage::django("site", 1)),
        test_settings(),
        Shutdown::new(),
    ));
    let ended = tokio::time::timeout(common::PATIENCE, django)
        .await
        .expect("the later listener gives way")
        .unwrap();
    let error = ended
        .expect_err("with the conflict as its error")
        .to_string();
    assert!(error.contains("stores fragment product_card at"), "{error}");
    assert!(!plain.is_finished(), "the first listener runs on");
    shutdown.cancel();
    plain.await.unwrap().unwrap();
    clean_up(&sink, &prefix).await;
}
