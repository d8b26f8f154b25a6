//! Redis memory policies that evict keys: whatever the `maxmemory-policy`, every fragment converges to
//! the render of the committed data, and `status` says when the policy can evict pgfresh's keys.

mod common;

use common::servers::BoundedOutput;

use common::servers::TempRedis;
use common::{AlteredCard, SharedFragment, TestEnv, eventually, shop_binary, test_settings};
use pgfresh::Eviction;
use pgfresh::Fragments;

/// A Redis that evicts any key once it holds 100 MB.
fn evicting_redis() -> TempRedis {
    TempRedis::start_with(&["--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru"])
}

#[tokio::test]
async fn a_render_that_finds_its_ticket_evicted_is_done_again_so_an_older_render_cannot_stay() {
    let redis = evicting_redis();
    let env = TestEnv::shop_with_redis(2, &redis.url()).await;
    assert_eq!(
        pgfresh::testing::check_eviction(&env.sink).await.0,
        Eviction::AnyKey
    );
    let db = env.client().await;

    // A slow listener claims the change to "Old", reads its rows and stalls.
    let (gate_taken, release) = AlteredCard::stalling();
    let slow = env.start_listener_with(
        Fragments::new().with(&env.prefix, SharedFragment(gate_taken.clone())),
        test_settings(),
    );
    db.batch_execute("UPDATE products SET name = 'Old' WHERE id = 1")
        .await
        .unwrap();
    eventually("the slow listener to have read its rows", || async {
        gate_taken.gate_taken()
    })
    .await;

    // Meanwhile the product changes again and a second listener writes the new data, whose ticket
    // Redis then evicts (here by hand).
    let fast = env.start_listener(test_settings());
    db.batch_execute("UPDATE products SET name = 'New' WHERE id = 1")
        .await
        .unwrap();
    eventually("the new name in Redis", || async {
        env.get(&env.key(1, "full"))
            .await
            .is_some_and(|html| html.contains("<h2>New</h2>"))
    })
    .await;
    for variant in ["compact", "full"] {
        env.del(&pgfresh::testing::ticket_key(
            &env.sink,
            &env.key(1, variant),
        ))
        .await;
    }

    // The slow render lands with nothing to check its ticket against. It cannot be refused, but it
    // is rendered again, and the newest data wins.
    release.send(()).unwrap();
    env.wait_fresh(1).await;
    assert!(
        env.get(&env.key(1, "full"))
            .await
            .unwrap()
            .contains("<h2>New</h2>")
    );
    eventually("the queue to drain", || async { env.pending().await == 0 }).await;
    slow.stop().await;
    fast.stop().await;

    // `status` says what the policy means for pgfresh.
    let out = std::process::Command::new(shop_binary())
        .arg("status")
        .env("DATABASE_URL", &env.url)
        .env("REDIS_URL", redis.url())
        .output_bounded()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("maxmemory-policy allkeys-lru: Redis may evict any key"),
        "{text}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn without_a_memory_limit_redis_evicts_nothing_and_status_says_so() {
    let env = TestEnv::shop(1).await;
    assert_eq!(
        pgfresh::testing::check_eviction(&env.sink).await.0,
        Eviction::Impossible
    );
    let out = std::process::Command::new(shop_binary())
        .arg("status")
        .env("DATABASE_URL", &env.url)
        .env("REDIS_URL", common::redis_url())
        .output_bounded()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(": Redis evicts nothing"), "{text}");
    env.cleanup().await;
}
