//! Stopping a listener (SIGTERM, SIGINT, or an embedding program cancelling its token): it claims
//! nothing more, and the batches in hand finish, so their changes are in Redis and out of the queue
//! when it returns.

mod common;

use common::{AlteredCard, SharedFragment, TestEnv, eventually, test_settings};
use pgfresh::Fragments;

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
        let sessions: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgfresh listen' AND datname = current_database()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        sessions == 0
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
