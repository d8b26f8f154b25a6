//! Stopping a listener (SIGTERM, SIGINT, or an embedding program cancelling its token): it claims
//! nothing more, and the batches in hand finish, so their changes are in Redis and out of the queue
//! when it returns; a PostgreSQL that stopped answering holds it no longer than a grace period.

mod common;

use common::servers::{TempPostgres, TempRedis};
use common::{AlteredCard, SharedFragment, TestEnv, eventually, product_card, test_settings};
use pgfresh::Fragments;
use pgfresh::tokio_postgres;

/// How many sessions of the test's database match `condition` (SQL over `pg_stat_activity`).
async fn sessions(client: &tokio_postgres::Client, condition: &str) -> i64 {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE {condition} AND datname = current_database()"
    );
    client.query_one(&sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn a_batch_in_hand_at_shutdown_finishes_before_the_listener_returns() {
    let env = TestEnv::shop(3).await;
    // The listener claims the change, reads its rows and stalls before writing.
    let (stalling, release) = AlteredCard::stalling();
    let listener = env.start_listener_with(
        Fragments::new().with(&env.prefix, SharedFragment(stalling.clone())),
        test_settings(),
    );
    env.client()
        .await
        .execute("UPDATE products SET name = 'In hand' WHERE id = 2", &[])
        .await
        .unwrap();
    eventually("the listener to have read its rows", || async {
        stalling.gate_taken()
    })
    .await;

    listener.shutdown.cancel();
    // The listener's other tasks stop at once: its LISTEN session goes away.
    let db = env.client().await;
    eventually("the LISTEN session to close", || async {
        sessions(&db, "application_name = 'pgfresh listen'").await == 0
    })
    .await;
    assert!(
        !listener.task.is_finished(),
        "the listener waits for its batch"
    );
    release.send(()).unwrap();
    tokio::time::timeout(common::PATIENCE, listener.task)
        .await
        .expect("the listener returns")
        .unwrap()
        .expect("and without an error");
    assert!(
        env.get(&env.key(2, "full"))
            .await
            .is_some_and(|card| card.contains("<h2>In hand</h2>")),
        "the batch in hand was written"
    );
    assert_eq!(env.pending().await, 0, "and its change settled");
    env.cleanup().await;
}

/// An embedding program that drops (aborts) the `listen` future stops the whole listener, its
/// drain loop too: nothing of it keeps claiming changes, and its sessions close.
#[tokio::test]
async fn a_listener_whose_future_is_dropped_stops_its_drain_loop_and_closes_its_sessions() {
    let env = TestEnv::shop(3).await;
    // A database handle of its own, its sessions named apart, so that they close with the
    // listener (the test's own handle keeps its pools open).
    let url = format!("{}?application_name=dropped_listener", env.url);
    let db = pgfresh::Database::new(&url, 2).unwrap();
    let listener = env.start_listener_on(db, env.fragments(), test_settings());
    env.rename(1, "Before the drop").await;
    env.wait_name(1, "Before the drop").await;
    let client = env.client().await;
    let dropped = || sessions(&client, "application_name = 'dropped_listener'");
    assert!(
        dropped().await > 0,
        "the listener's sessions are named apart"
    );

    listener.task.abort();
    let _ = listener.task.await;
    eventually("every session of the dropped listener to close", || async {
        dropped().await == 0
    })
    .await;
    env.cleanup().await;
}

/// A batch still in hand when the shutdown's grace period ends is given up: the listener returns,
/// the batch's transaction rolls back (its session is not left in it), and its change stays queued
/// for the next listener.
#[tokio::test]
async fn a_batch_still_stalled_after_the_grace_period_rolls_back_and_its_change_stays_queued() {
    let env = TestEnv::shop(3).await;
    let (stalling, _never_released) = AlteredCard::stalling();
    let listener = env.start_listener_with(
        Fragments::new().with(&env.prefix, SharedFragment(stalling.clone())),
        test_settings(),
    );
    env.client()
        .await
        .execute("UPDATE products SET name = 'Stalled' WHERE id = 2", &[])
        .await
        .unwrap();
    eventually("the listener to have read its rows", || async {
        stalling.gate_taken()
    })
    .await;
    let client = env.client().await;
    let in_transaction = || sessions(&client, "state LIKE 'idle in transaction%'");
    // At least the stalled batch's (another worker's empty claim may be ending just then).
    assert!(
        in_transaction().await >= 1,
        "the batch holds its claim open"
    );

    listener.shutdown.cancel();
    // The grace period is 10 s.
    tokio::time::timeout(common::PATIENCE, listener.task)
        .await
        .expect("the listener returns after its grace period")
        .unwrap()
        .expect("and without an error");
    eventually("no session left in the batch's transaction", || async {
        in_transaction().await == 0
    })
    .await;
    assert_eq!(env.pending().await, 1, "the change stays queued");
    assert!(
        !env.get(&env.key(2, "full"))
            .await
            .is_some_and(|card| card.contains("<h2>Stalled</h2>")),
        "the stalled batch wrote nothing"
    );
    env.cleanup().await;
}

/// A listener whose PostgreSQL stops answering (a hung host) still stops when asked: its tasks and
/// its deregistration wait no longer than the grace period and a moment, however long the server
/// stays silent.
#[tokio::test]
async fn a_listener_whose_postgresql_stopped_answering_still_stops() {
    let server = TempPostgres::start();
    let redis = TempRedis::start();
    let db = pgfresh::Database::new(&server.url("postgres"), 2).unwrap();
    common::setup::setup(&db, 3).await.unwrap();
    let store = pgfresh::RedisStore::connect(&redis.url()).await.unwrap();
    let fragments = Fragments::new().with(product_card::KEY_PREFIX, product_card::ProductCard);
    let shutdown = pgfresh::Shutdown::new();
    let listener = tokio::spawn(pgfresh::listen(
        db.clone(),
        store,
        fragments,
        test_settings(),
        shutdown.clone(),
    ));
    let observer = common::connect(&server.url("postgres")).await;
    // Registered, and its first sweep done: the listener is idle, its sessions too.
    eventually("the listener's first sweep", || async {
        let sql = "SELECT (SELECT count(*) FROM pgfresh.listeners) = 1
                   AND EXISTS (SELECT FROM pgfresh.sweeps)";
        common::value::<bool>(&observer, sql).await
    })
    .await;
    let frozen = server.freeze();
    shutdown.cancel();
    tokio::time::timeout(common::PATIENCE, listener)
        .await
        .expect("the listener stops although PostgreSQL answers nothing")
        .unwrap()
        .expect("and stops without an error");
    drop(frozen);
}

/// A listener whose own sweep is stuck in a loader (one waiting on a server that stopped answering
/// never sees the shutdown token) still stops once the grace period is over.
#[tokio::test]
async fn a_listener_whose_sweep_is_stuck_in_a_loader_still_stops() {
    let env = TestEnv::shop(3).await;
    // A new version of the card: Redis holds the marker of version 1, so the listener sweeps it at
    // start, and that sweep's first load stalls.
    let (_never_released, gate) = tokio::sync::oneshot::channel();
    let stalling = std::sync::Arc::new(AlteredCard {
        gate: std::sync::Mutex::new(Some(gate)),
        ..AlteredCard::new("product_card", 2)
    });
    let listener = env.start_listener_with(
        Fragments::new().with(&env.prefix, SharedFragment(stalling.clone())),
        test_settings(),
    );
    eventually("the sweep's load to stall", || async {
        stalling.gate_taken()
    })
    .await;
    listener.stop().await;
    // What the stopped sweep held is given back: the next listener may sweep at once.
    let lease = "SELECT holder FROM pgfresh.sweep_lease";
    let holder: Option<String> = common::value(&env.client().await, lease).await;
    assert_eq!(holder, None, "the sweep lease is released");
    assert_eq!(env.registered_listeners().await, 0);
    env.cleanup().await;
}

/// A listener stopped while a migration holds the queue locked: its batch waits past the grace
/// period and is given up, and the listener still removes its row, on a session of its own (the
/// pool's session returned last is the given-up batch's, still waiting for the lock).
#[tokio::test]
async fn a_listener_stopped_while_the_queue_is_locked_still_removes_its_row() {
    let env = TestEnv::shop(3).await;
    let listener = env.start_listener(test_settings());
    eventually("the listener to register", || async {
        env.registered_listeners().await == 1
    })
    .await;
    let mut migration = env.client().await;
    let lock = migration.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE pgfresh.changes IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let client = env.client().await;
    eventually("a claim to wait for the lock", || async {
        sessions(
            &client,
            "wait_event_type = 'Lock' AND query LIKE '%pgfresh.changes%'",
        )
        .await
            >= 1
    })
    .await;
    listener.stop().await;
    assert_eq!(env.registered_listeners().await, 0, "its row is gone");
    lock.rollback().await.unwrap();
    env.cleanup().await;
}

/// A listener asked to stop while its start-up waits on PostgreSQL (here for a migration that
/// holds pgfresh's tables; a server that stopped answering after the connection was made is the
/// same) stops there, rather than once the wait is over.
#[tokio::test]
async fn a_listener_stopped_while_its_start_up_waits_for_a_lock_stops_there() {
    for (table, waiting_in) in [
        ("pgfresh.migrations", "its checks"),
        ("pgfresh.listeners", "its registration"),
    ] {
        let env = TestEnv::shop(3).await;
        let mut migration = env.client().await;
        let lock = migration.transaction().await.unwrap();
        let statement = format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE");
        lock.batch_execute(&statement).await.unwrap();
        let listener = env.start_listener(test_settings());
        let client = env.client().await;
        let waiting = format!("wait_event_type = 'Lock' AND query LIKE '%{table}%'");
        eventually(&format!("{waiting_in} to wait for the lock"), || async {
            sessions(&client, &waiting).await >= 1
        })
        .await;
        listener.stop().await;
        lock.rollback().await.unwrap();
        if table == "pgfresh.migrations" {
            assert_eq!(env.registered_listeners().await, 0, "it never registered");
        }
        env.cleanup().await;
    }
}
