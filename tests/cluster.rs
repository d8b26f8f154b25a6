//! Redis Cluster: the listener, the sweep and the CLI against a throwaway three-master cluster. Each
//! test starts its own cluster (about a second), so they run in parallel with the rest.

mod common;

use common::servers::BoundedOutput;

use std::process::Command;

use common::servers::TempRedisCluster;
use common::{TestEnv, eventually, product_card, shop_binary, test_settings};
use pgfresh::RedisStore;
use pgfresh::testing::{Write, WriteResult};

async fn cluster_env(cluster: &TempRedisCluster, products: i64) -> TestEnv {
    let urls = cluster.urls();
    let nodes: Vec<&str> = urls.split(',').collect();
    let sink = RedisStore::connect_cluster(&nodes)
        .await
        .expect("connect to the cluster");
    TestEnv::shop_with_sink(products, sink).await
}

/// How many keys each node holds, from the node itself.
fn keys_per_node(cluster: &TempRedisCluster) -> Vec<i64> {
    cluster
        .nodes
        .iter()
        .map(|node| {
            let out = Command::new("redis-cli")
                .args(["-p", &node.port.to_string(), "DBSIZE"])
                .output_bounded()
                .expect("redis-cli runs");
            String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
        })
        .collect()
}

#[tokio::test]
async fn the_sweep_and_the_listener_keep_a_cluster_fresh() {
    let cluster = TempRedisCluster::start();
    let env = cluster_env(&cluster, 60).await;
    let orphan = env.key(999, "compact");
    env.set(&orphan, "<p>a product that is gone</p>").await;

    let report = env.sweep().await;
    assert!(report.succeeded(), "{report}");
    assert_eq!(env.keys().await.len(), 120, "two variants of 60 products");
    assert_eq!(
        env.get(&orphan).await,
        None,
        "the orphan was found on its node"
    );
    for id in [1, 17, 60] {
        for variant in ["compact", "full"] {
            assert_eq!(
                env.get(&env.key(id, variant)).await,
                env.fresh_render(id, variant).await
            );
        }
    }
    let spread = keys_per_node(&cluster);
    assert!(
        spread.iter().all(|&keys| keys > 0),
        "every master holds entries: {spread:?}"
    );

    let listener = env.start_listener(test_settings());
    let db = env.client().await;
    db.execute(
        "UPDATE products SET price_cents = price_cents + 100 WHERE id <= 30",
        &[],
    )
    .await
    .unwrap();
    db.execute("DELETE FROM reviews WHERE product_id = 40", &[])
        .await
        .unwrap();
    db.execute("DELETE FROM products WHERE id = 41", &[])
        .await
        .unwrap();
    for id in (1..=30).chain([40, 41]) {
        env.wait_fresh(id).await;
    }
    // Which servers answer, as the listener notes them to tell a restart: every master's run id,
    // not whichever node a command happened to reach (the note would change every second).
    let note = format!("pgfresh:servers:{}", env.prefix);
    eventually("the listener to note every master", || async {
        env.get(&note)
            .await
            .is_some_and(|servers| servers.split(',').count() == 3)
    })
    .await;
    listener.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn version_checked_writes_hold_across_slots() {
    let cluster = TempRedisCluster::start();
    let env = cluster_env(&cluster, 1).await;
    // Keys in many slots (and so on every node), one of them with a hash tag of its own.
    let mut keys: Vec<String> = (0..200).map(|i| env.key(i, "x")).collect();
    keys.push(format!("{}{{tagged}}:1", env.prefix));
    let writes = |html: &str| -> Vec<Write> {
        keys.iter()
            .map(|key| Write::Set {
                key: key.clone(),
                value: html.into(),
                ttl: None,
            })
            .collect()
    };
    let newer = pgfresh::testing::write(&env.sink, 20, &writes("new"))
        .await
        .unwrap();
    assert!(
        newer.iter().all(|r| *r == WriteResult::Written),
        "{newer:?}"
    );
    let older = pgfresh::testing::write(&env.sink, 10, &writes("old"))
        .await
        .unwrap();
    assert!(
        older.iter().all(|r| *r == WriteResult::Refused),
        "{older:?}"
    );
    assert_eq!(
        env.sink.get_many(&keys).await.unwrap(),
        vec![Some("new".to_string()); keys.len()]
    );
    assert_eq!(
        pgfresh::testing::tickets(&env.sink, &keys).await.unwrap(),
        vec![Some(20); keys.len()]
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_master_restarted_empty_is_refilled() {
    let mut cluster = TempRedisCluster::start();
    let env = cluster_env(&cluster, 40).await;
    let listener = env.start_listener(test_settings());
    // The marker set by the test setup says Redis is full; the first sweep fills it.
    env.sweep().await;
    assert_eq!(env.keys().await.len(), 80);

    // One master loses everything; the other two keep their entries and their markers.
    cluster.nodes[1].start_again();
    cluster.wait_until_ok();
    eventually("the emptied master to be refilled", || async {
        env.keys().await.len() == 80 && keys_per_node(&cluster)[1] > 0
    })
    .await;
    for id in [1, 20, 40] {
        env.wait_fresh(id).await;
    }
    listener.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_command_line_sweeps_a_cluster_and_refuses_a_node_without_the_flag() {
    let cluster = TempRedisCluster::start();
    let env = cluster_env(&cluster, 5).await;
    let sweep = |redis_url: &str, extra: &[&str]| {
        Command::new(shop_binary())
            .arg("sweep")
            .args(extra)
            .env("DATABASE_URL", &env.url)
            .env("REDIS_URL", redis_url)
            .output_bounded()
            .expect("shop runs")
    };

    // Without the flag, one node or several: one line that says what to do, nothing written.
    for redis_url in [cluster.nodes[0].url(), cluster.urls()] {
        let refused = sweep(&redis_url, &[]);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success());
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("--redis-cluster"),
            "says what to do: {stderr}"
        );
    }

    let swept = sweep(&cluster.urls(), &["--redis-cluster"]);
    assert!(
        swept.status.success(),
        "{}",
        String::from_utf8_lossy(&swept.stderr)
    );
    // The binary writes under the shop's own prefix: this cluster is the test's alone.
    let mut redis = env.sink.connection();
    let cards: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", product_card::KEY_PREFIX))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(cards.len(), 10, "two variants of 5 products: {cards:?}");

    // In Django's format too: tickets in the slots of Django's keys, orphans found on every master.
    let django = ["--redis-cluster", "--cache-format", "django"];
    let first = sweep(&cluster.urls(), &django);
    assert!(first.status.success(), "{first:?}");
    let django_cards: Vec<String> = redis::cmd("KEYS")
        .arg(format!(":1:{}*", product_card::KEY_PREFIX))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(django_cards.len(), 10, "{django_cards:?}");
    env.client()
        .await
        .batch_execute("DELETE FROM products WHERE id = 5")
        .await
        .unwrap();
    let second = sweep(&cluster.urls(), &django);
    let report = String::from_utf8_lossy(&second.stdout);
    assert!(
        report.contains("0 written, 8 unchanged, 2 orphans deleted, 0 errors"),
        "{report}"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_failing_over_to_its_replica_loses_no_change() {
    let mut cluster = TempRedisCluster::start_with_replicas();
    let env = cluster_env(&cluster, 30).await;
    env.sweep().await;
    let listener = env.start_listener(test_settings());
    let role = common::servers::output_within(
        Command::new("redis-cli").args(["-p", &cluster.nodes[0].port.to_string(), "ROLE"]),
        common::servers::CHILD_PATIENCE,
    );
    assert!(String::from_utf8_lossy(&role.stdout).starts_with("master"));
    // An idle listener, as most are most of the time: in that state a failover was seen to leave the
    // cluster connection timing out on every command for minutes, until pgfresh replaced it.
    let db = env.client().await;
    eventually("the listener to wait for NOTIFYs", || async {
        db.query_one("SELECT count(*) FROM pgfresh.listeners WHERE idle", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    })
    .await;

    // The master dies, and its replica may not take over yet: every product changes while its slots
    // have no master, and the listener's writes there fail.
    let replica_failover = |nodes: &[common::servers::TempRedis], allowed: &str| {
        for node in &nodes[3..] {
            let port = node.port.to_string();
            let set = [
                "-p",
                &port,
                "CONFIG",
                "SET",
                "cluster-replica-no-failover",
                allowed,
            ];
            let out = Command::new("redis-cli")
                .args(set)
                .output_bounded()
                .unwrap();
            assert!(out.status.success());
        }
    };
    replica_failover(&cluster.nodes, "yes");
    cluster.nodes[0].stop();
    env.client()
        .await
        .execute("UPDATE products SET price_cents = price_cents + 7", &[])
        .await
        .unwrap();
    eventually(
        "a write failure to be noted on the waiting changes",
        || async {
            db.query_one(
            "SELECT count(*) FROM pgfresh.changes WHERE last_error LIKE 'Redis%' AND attempts = 0",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            > 0
        },
    )
    .await;
    assert_eq!(env.parked().await, 0);
    // Then the replica takes over (waited for off the runtime, which keeps running the listener).
    replica_failover(&cluster.nodes, "no");
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.kill_master_and_wait_for_failover(0);
        cluster
    })
    .await
    .unwrap();
    for id in 1..=30 {
        env.wait_fresh(id).await;
    }
    eventually("the queue to drain", || async { env.pending().await == 0 }).await;
    listener.stop().await;
    env.cleanup().await;
    drop(cluster);
}
