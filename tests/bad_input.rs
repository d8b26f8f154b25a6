//! Bad input fails alone, with a clear error, and never wedges the listener: a change that keeps
//! failing is still parked however many attempts it takes, two spellings of one key do not delete its
//! fragment, a key that is not text fails alone, settings out of range are refused at start-up, and a
//! key prefix cannot reach into pgfresh's own keys.

mod common;

use std::time::Duration;

use common::product_card::ProductCard;
use common::{TestEnv, eventually, test_settings, tweak};
use pgfresh::Fragments;

/// The attempts and last error recorded for the queued change with this key.
async fn attempts(env: &TestEnv, key: &str) -> Option<(i32, Option<String>)> {
    env.client()
        .await
        .query_opt(
            "SELECT attempts, last_error FROM pgfresh.changes WHERE key = $1",
            &[&key],
        )
        .await
        .unwrap()
        .map(|row| (row.get(0), row.get(1)))
}

#[tokio::test]
async fn a_change_that_failed_dozens_of_times_is_still_retried_then_parked() {
    let env = TestEnv::shop(1).await;
    // 2^60 seconds is out of PostgreSQL's interval range: the backoff must be capped, or recording
    // the failure fails, the batch rolls back, and the change is claimed again forever.
    env.client()
        .await
        .batch_execute(
            "INSERT INTO pgfresh.changes (topic, key, attempts) VALUES ('nobody_listens', 'sixty', 60)",
        )
        .await
        .unwrap();
    let settings = tweak(test_settings(), |s| s.max_attempts = 62);
    let listener = env.start_listener(settings);
    eventually("the 61st attempt to be recorded", || async {
        attempts(&env, "sixty").await.is_some_and(|(n, _)| n == 61)
    })
    .await;
    let (_, error) = attempts(&env, "sixty").await.unwrap();
    assert!(
        error.unwrap().contains("no fragment subscribes"),
        "the error is recorded"
    );
    // And the next failure, the 62nd, parks it (after a backoff of at most five minutes, which the
    // test does not wait for).
    env.client()
        .await
        .batch_execute("UPDATE pgfresh.changes SET retry_at = now() WHERE key = 'sixty'")
        .await
        .unwrap();
    eventually("the change to be parked", || async {
        env.parked().await == 1
    })
    .await;
    listener.stop().await;
    env.cleanup().await;
}

/// A change written by hand with an infinite `enqueued_at` has no age to measure, and subtracting
/// it fails the statement: it must not fail every claim that reads it (the queue would stall
/// behind it), nor the listener's figures.
#[tokio::test]
async fn a_change_queued_by_hand_at_an_infinite_time_is_applied_with_the_rest() {
    let env = TestEnv::shop(2).await;
    let listener = env.start_listener(test_settings());
    env.client()
        .await
        .batch_execute(
            "UPDATE products SET name = 'Renamed ' || id;
             INSERT INTO pgfresh.changes (topic, key, enqueued_at) VALUES ('product', '1', '-infinity');
             INSERT INTO pgfresh.changes (topic, key, enqueued_at) VALUES ('product', '2', 'infinity');",
        )
        .await
        .unwrap();
    for id in [1, 2] {
        let key = env.key(id, "full");
        eventually(&key, || async {
            env.get(&key)
                .await
                .is_some_and(|card| card.contains("Renamed"))
        })
        .await;
    }
    eventually("the queue to drain", || async { env.pending().await == 0 }).await;
    assert_eq!(env.parked().await, 0);
    listener.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn two_spellings_of_one_key_in_a_batch_render_it_once_and_keep_it() {
    let env = TestEnv::shop(50).await;
    let listener = env.start_listener(test_settings());
    let db = env.client().await;
    // One transaction, so one batch: the trigger's "42" and a hand-queued "042".
    db.batch_execute(
        "BEGIN;
         UPDATE products SET name = 'Spelled twice' WHERE id = 42;
         INSERT INTO pgfresh.changes (topic, key) VALUES ('product', '042'), ('product', '+42');
         COMMIT;",
    )
    .await
    .unwrap();
    eventually("the queue to drain", || async { env.pending().await == 0 }).await;
    env.wait_fresh(42).await;
    assert!(
        env.get(&env.key(42, "full"))
            .await
            .expect("the card of a product that exists is never deleted")
            .contains("<h2>Spelled twice</h2>")
    );
    assert_eq!(env.parked().await, 0);
    listener.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_key_that_is_not_utf8_text_fails_alone_and_is_parked() {
    let env = TestEnv::shop_sql_ascii(3).await;
    let db = env.client().await;
    // A SQL_ASCII database stores any bytes; this key cannot be read as text by any client.
    db.batch_execute(
        "INSERT INTO pgfresh.changes (topic, key)
             VALUES ('product', convert_from('\\xff'::bytea, 'SQL_ASCII'));
         UPDATE products SET name = 'Behind a bad key' WHERE id = 2;",
    )
    .await
    .unwrap();
    let settings = tweak(test_settings(), |s| s.max_attempts = 2);
    let listener = env.start_listener(settings);
    env.wait_fresh(2).await;
    eventually("the bad key to be parked", || async {
        env.parked().await == 1 && env.pending().await == 0
    })
    .await;
    let errors = env.parked_errors("change_id").await;
    assert!(errors[0].contains("not valid UTF-8"), "{errors:?}");
    listener.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn settings_out_of_range_are_refused_at_start_up() {
    let env = TestEnv::shop(1).await;
    for (settings, expected) in [
        (
            tweak(test_settings(), |s| s.poll_interval = Duration::ZERO),
            "poll interval 0ns is too short",
        ),
        (
            tweak(test_settings(), |s| {
                s.sweep_interval = Some(Duration::from_secs(u64::MAX / 2))
            }),
            "sweep interval is too long",
        ),
        (
            tweak(test_settings(), |s| s.workers = 0),
            "must each be at least 1",
        ),
    ] {
        let listener = env.start_listener(settings);
        let error = tokio::time::timeout(common::PATIENCE, listener.task)
            .await
            .expect("refused at once")
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(error.contains(expected), "{error}");
    }
    assert_eq!(env.registered_listeners().await, 0);
    env.cleanup().await;
}

#[test]
fn key_prefixes_that_overlap_pgfreshs_own_keys_are_refused() {
    for prefix in ["p", "pg", "pgfresh", "pgfresh:", "pgfresh:shop:"] {
        let error = Fragments::new()
            .with(prefix, ProductCard)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("overlaps pgfresh's own keys"),
            "{prefix}: {error}"
        );
    }
    for prefix in ["shop:", "pgfreshly:", "pg_shop:"] {
        assert!(
            Fragments::new()
                .with(prefix, ProductCard)
                .validate()
                .is_ok(),
            "{prefix}"
        );
    }
}
