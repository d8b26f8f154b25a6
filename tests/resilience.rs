//! One test per promise of the listener under faults and bad input: lost and frozen connections,
//! Redis outages and restarts, several instances, bad changes, hostile notifications, deploys.

mod common;

use std::time::Duration;

use common::servers::{Stopped, TempRedis};
use common::{AlteredCard, TestEnv, eventually, eventually_after, test_settings, tweak};
use pgfresh::Fragments;
use pgfresh::ListenSettings;

/// Settings under which only NOTIFYs and reconnects (never the poll) bring changes in.
fn no_polling() -> ListenSettings {
    tweak(test_settings(), |s| {
        s.poll_interval = Duration::from_secs(3600)
    })
}

async fn wait_idle(env: &TestEnv, listeners: i64) {
    let db = env.client().await;
    eventually("the listeners to be idle", || async {
        let idle: i64 = db
            .query_one("SELECT count(*) FROM pgfresh.listeners WHERE idle", &[])
            .await
            .unwrap()
            .get(0);
        idle == listeners
    })
    .await;
}

/// The backend pids of this test database's connections whose application_name starts with `name`.
async fn backends(env: &TestEnv, name: &str) -> Vec<i32> {
    env.client()
        .await
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name LIKE $2 || '%'",
            &[&env.name, &name],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test]
async fn terminated_backends_are_replaced_and_changes_keep_flowing() {
    let env = TestEnv::shop(3).await;
    let listener = env.start_listener(no_polling());
    wait_idle(&env, 1).await;
    let admin = env.client().await;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = $1 AND application_name LIKE 'pgfresh%'",
            &[&env.name],
        )
        .await
        .unwrap();
    // Committed while the LISTEN session is gone: only the drain after reconnecting can apply it.
    env.rename(1, "After the cut").await;
    env.wait_name(1, "After the cut").await;
    eventually("a new LISTEN session", || async {
        !backends(&env, "pgfresh listen").await.is_empty()
    })
    .await;
    wait_idle(&env, 1).await;
    env.rename(2, "Through NOTIFY again").await;
    env.wait_name(2, "Through NOTIFY again").await;
    listener.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_claim_prepared_before_a_schema_change_is_prepared_again() {
    let env = TestEnv::shop(3).await;
    // Two sessions for pgfresh's own statements (one would not do: a batch and the bookkeeping each
    // need one), both made to prepare the claim below: a session that had not would prepare it
    // afresh and hide the fault.
    let db = pgfresh::Database::new(&env.url, 2).unwrap();
    let settings = tweak(test_settings(), |s| s.workers = 1);
    let listener = env.start_listener_on(db, env.fragments(), settings);
    for round in 1..=8 {
        let name = format!("Prepared {round}");
        env.rename(1, &name).await;
        env.wait_name(1, &name).await;
    }
    // What an upgrade could do: the claim now returns another type, and PostgreSQL refuses to
    // run it as prepared ("cached plan must not change result type"). The listener must prepare
    // it again rather than fail every batch.
    env.client()
        .await
        .batch_execute("ALTER TABLE pgfresh.changes ALTER COLUMN key TYPE varchar")
        .await
        .unwrap();
    env.rename(2, "Prepared again").await;
    env.wait_name(2, "Prepared again").await;
    listener.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_frozen_listen_session_is_detected_and_replaced() {
    let env = TestEnv::shop(2).await;
    let listener = env.start_listener(no_polling());
    wait_idle(&env, 1).await;
    let frozen = backends(&env, "pgfresh listen").await;
    assert_eq!(frozen.len(), 1);
    // SIGSTOP: the session stays connected but delivers nothing, like a half-open TCP connection.
    let stopped = Stopped::process(frozen[0] as u32);
    env.rename(1, "Despite the freeze").await;
    let started = std::time::Instant::now();
    env.wait_name(1, "Despite the freeze").await;
    let took = started.elapsed();
    drop(stopped);
    // README promises detection within 20 s (a ping every 10 s, 10 s for it to come back); the margin
    // is for reconnecting and draining on a loaded machine.
    assert!(took < Duration::from_secs(25), "detected after {took:?}");
    let current = backends(&env, "pgfresh listen").await;
    assert!(
        !current.contains(&frozen[0]) || current.len() > 1,
        "a new session replaced the frozen one"
    );
    listener.stop().await;
    env.cleanup().await;
}

/// Waits until the queued change of product `key` notes an error starting with `error`, with no
/// attempt counted against it.
async fn waits_with_error(env: &TestEnv, key: &str, error: &str) {
    let db = env.client().await;
    eventually("the change to note why it waits", || async {
        db.query_opt(
            "SELECT last_error FROM pgfresh.changes WHERE key = $1 AND attempts = 0",
            &[&key],
        )
        .await
        .unwrap()
        .and_then(|row| row.get::<_, Option<String>>(0))
        .is_some_and(|noted| noted.starts_with(error))
    })
    .await;
}

#[tokio::test]
async fn while_redis_is_full_changes_wait_without_counting_attempts_and_arrive_once_it_has_room() {
    let redis = TempRedis::start();
    let env = TestEnv::shop_with_redis(3, &redis.url()).await;
    // One failed attempt would park a change: a refusal counted against it shows at once.
    let listener = env.start_listener(tweak(test_settings(), |s| s.max_attempts = 1));
    env.rename(1, "Before Redis filled up").await;
    env.wait_name(1, "Before Redis filled up").await;

    let mut admin = env.sink.connection();
    let limit = |bytes: &str| {
        let mut command = redis::cmd("CONFIG");
        command.arg(&["SET", "maxmemory", bytes, "maxmemory-policy", "noeviction"][..]);
        command
    };
    let _: () = limit("1").query_async(&mut admin).await.unwrap();
    env.rename(2, "While Redis was full").await;
    waits_with_error(&env, "2", "Redis refused writes: OOM").await;
    assert_eq!(
        env.parked().await,
        0,
        "a full Redis is no reason to park a change"
    );
    let _: () = limit("0").query_async(&mut admin).await.unwrap();
    env.wait_name(2, "While Redis was full").await;
    eventually("the queue to drain", || async { env.pending().await == 0 }).await;
    assert_eq!(env.parked().await, 0);
    listener.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn while_redis_hangs_changes_wait_with_their_error_and_arrive_when_it_answers() {
    let redis = TempRedis::start();
    let env = TestEnv::shop_with_redis(3, &redis.url()).await;
    let listener = env.start_listener(test_settings());
    env.rename(1, "Before the outage").await;
    env.wait_name(1, "Before the outage").await;

    // Frozen, Redis keeps its data and the sweep marker: only the queue can bring the change in.
    let frozen = redis.freeze();
    env.rename(2, "During the outage").await;
    waits_with_error(&env, "2", "Redis").await;
    assert_eq!(
        env.parked().await,
        0,
        "an outage is no reason to park a change"
    );
    drop(frozen);
    env.wait_name(2, "During the outage").await;
    eventually("the queue to drain", || async { env.pending().await == 0 }).await;
    assert_eq!(
        env.get(&env.marker_key()).await.as_deref(),
        Some("1"),
        "no sweep was needed, or run"
    );
    listener.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_redis_that_comes_back_empty_is_swept() {
    let mut redis = TempRedis::start();
    let env = TestEnv::shop_with_redis(6, &redis.url()).await;
    let listener = env.start_listener(test_settings());
    env.rename(1, "Before the restart").await;
    env.wait_name(1, "Before the restart").await;
    redis.start_again();
    // The listener notices the missing marker and sweeps everything, so even products that never
    // changed are back.
    for id in 1..=6 {
        env.wait_fresh(id).await;
    }
    eventually("the sweep marker to be back", || async {
        env.get(&env.marker_key()).await.is_some()
    })
    .await;
    listener.stop().await;
    env.cleanup().await;
}

/// A Redis restarted from its snapshot (RDB or AOF) comes back with what it held when it saved,
/// markers included, but not the writes since: the listener notices that another server answers
/// and sweeps, so the change applied after the snapshot is not left undone. So does a listener
/// started after both restarted (a host rebooted), from the note it left in Redis.
#[tokio::test]
async fn a_redis_restored_from_an_older_snapshot_is_swept() {
    let mut redis = TempRedis::start_with_snapshots();
    let env = TestEnv::shop_with_redis(3, &redis.url()).await;
    env.sweep().await;
    for (round, listener_stays) in [(1, true), (2, false)] {
        let listener = env.start_listener(test_settings());
        env.wait_fresh(1).await;
        eventually("the listener to note which server answers", || async {
            env.get(&format!("pgfresh:servers:{}", env.prefix))
                .await
                .is_some()
        })
        .await;
        redis.save();
        let name = format!("After snapshot {round}");
        env.rename(1, &name).await;
        env.wait_name(1, &name).await;
        let listener = match listener_stays {
            true => Some(listener),
            false => {
                listener.stop().await;
                None
            }
        };
        // Killed, and started again from its snapshot: product 1 under its name before.
        redis.start_again();
        let listener = listener.unwrap_or_else(|| env.start_listener(test_settings()));
        env.wait_name(1, &name).await;
        listener.stop().await;
    }
    env.cleanup().await;
}

/// A Redis restored from a snapshot taken while another listener swept: the sweep's canary came
/// back with it, so that sweep would set its marker at its end, over the pages it wrote from rows
/// it loaded before a change the restore then lost; the listener that notices the restore makes
/// that sweep incomplete too, and the fragment is swept again.
#[tokio::test]
async fn a_redis_restored_during_another_listeners_sweep_is_swept_again() {
    let mut redis = TempRedis::start_with_snapshots();
    let env = TestEnv::shop_with_redis(3, &redis.url()).await;
    env.sweep().await;
    // The sweeping listener: its marker gone, it sweeps, and its sweep's load stalls.
    env.del(&env.marker_key()).await;
    let (stalling, open) = AlteredCard::stalling();
    let sweeping = env.start_listener_with(
        Fragments::new().with(&env.prefix, common::SharedFragment(stalling.clone())),
        test_settings(),
    );
    eventually("its sweep's load to stall", || async {
        stalling.gate_taken()
    })
    .await;
    let other = env.start_listener(test_settings());
    redis.save();
    // A change after the snapshot, applied, then lost with the restore.
    env.rename(2, "After the snapshot").await;
    env.wait_name(2, "After the snapshot").await;
    redis.start_again();
    // The other listener notices the restore; then the stalled sweep goes on, with rows it loaded
    // before the change, and ends.
    // The first command after the restart may meet the connection it broke.
    let info = std::sync::Mutex::new(String::new());
    eventually("Redis to answer again", || async {
        let answer = redis::cmd("INFO")
            .arg("server")
            .query_async::<String>(&mut env.sink.connection())
            .await;
        answer.map(|text| *info.lock().unwrap() = text).is_ok()
    })
    .await;
    let run_id = info
        .into_inner()
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("run_id:"))
        .unwrap()
        .trim()
        .to_string();
    eventually("the other listener to notice the restore", || async {
        env.get(&format!("pgfresh:servers:{}", env.prefix)).await == Some(run_id.clone())
    })
    .await;
    open.send(()).unwrap();
    env.wait_name(2, "After the snapshot").await;
    sweeping.stop().await;
    other.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn several_listeners_share_the_queue_without_doing_a_change_twice() {
    let env = TestEnv::shop(50).await;
    let settings = tweak(test_settings(), |s| s.batch_size = 7);
    // The first listener claims a batch and stalls in it: the others must take the rest.
    let (stalling, release) = AlteredCard::stalling();
    let one_worker = tweak(settings.clone(), |s| s.workers = 1);
    let first = env.start_listener_with(
        Fragments::new().with(&env.prefix, common::SharedFragment(stalling)),
        one_worker,
    );
    let db = env.client().await;
    db.execute("UPDATE products SET price_cents = price_cents + 1", &[])
        .await
        .unwrap();
    eventually("the first listener to hold a batch", || async {
        let unlocked: i64 = db
            .query_one(
                "SELECT count(*) FROM (SELECT FROM pgfresh.changes FOR UPDATE SKIP LOCKED) AS free",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        unlocked == 43
    })
    .await;
    let second = env.start_listener(settings.clone());
    let third = env.start_listener(settings);
    for round in 1..4 {
        db.execute(
            "UPDATE products SET price_cents = price_cents + $1",
            &[&(round + 1)],
        )
        .await
        .unwrap();
    }
    eventually("all but the stalled batch to be applied", || async {
        env.pending().await == 7
    })
    .await;
    release.send(()).unwrap();
    eventually("the queue to drain", || async { env.pending().await == 0 }).await;
    for id in 1..=50 {
        env.wait_fresh(id).await;
    }
    // Every change is counted once by the listener that applied it (heartbeats publish the counts),
    // and the stalled listener's batch by it alone.
    eventually("all 200 changes to be counted exactly once", || async {
        env.listener_total("changes_done").await == 200
    })
    .await;
    let per_listener: Vec<i64> = db
        .query(
            "SELECT changes_done FROM pgfresh.listeners ORDER BY started_at",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(per_listener[0], 7, "{per_listener:?}");
    assert_eq!(
        per_listener[1..].iter().sum::<i64>(),
        193,
        "{per_listener:?}"
    );
    for listener in [first, second, third] {
        listener.stop().await;
    }
    env.cleanup().await;
}

#[tokio::test]
async fn only_the_listener_holding_the_sweep_lease_sweeps_and_one_that_finds_it_held_takes_nothing_for_done()
 {
    let env = TestEnv::shop(3).await;
    env.del(&env.marker_key()).await;
    // Another listener holds the lease: this one must not sweep. Each attempt to take it is an
    // UPDATE of the lease row, counted here.
    let db = env.client().await;
    db.batch_execute(
        "UPDATE pgfresh.sweep_lease SET holder = 'another listener', expires_at = now() + interval '1 hour';
         CREATE TABLE lease_attempts (at timestamptz);
         CREATE FUNCTION count_attempt() RETURNS trigger LANGUAGE plpgsql AS
             $$BEGIN INSERT INTO public.lease_attempts VALUES (pg_catalog.now()); RETURN NULL; END$$;
         CREATE TRIGGER counted AFTER UPDATE ON pgfresh.sweep_lease
             FOR EACH STATEMENT EXECUTE FUNCTION count_attempt();",
    )
    .await
    .unwrap();
    let listener = env.start_listener(test_settings());
    eventually("three refused attempts to take the sweep lease", || async {
        let attempts: i64 = db
            .query_one("SELECT count(*) FROM lease_attempts", &[])
            .await
            .unwrap()
            .get(0);
        attempts >= 3
    })
    .await;
    assert_eq!(
        env.get(&env.key(3, "full")).await,
        None,
        "no sweep without the lease"
    );
    // The holder gives it up: the sweep it wanted is still due, and runs now.
    db.batch_execute("UPDATE pgfresh.sweep_lease SET holder = NULL")
        .await
        .unwrap();
    env.wait_fresh(3).await;
    let (reason, swept_by, rewritten): (String, String, i64) = {
        let row = db
            .query_one(
                "SELECT reason, swept_by, rewritten FROM pgfresh.sweeps WHERE fragment = 'product_card'",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!((reason.as_str(), rewritten), ("marker", 6));
    assert!(swept_by.contains(':'), "a listener id: {swept_by}");
    eventually("the lease to be given up after the sweep", || async {
        let holder: Option<String> = db
            .query_one("SELECT holder FROM pgfresh.sweep_lease", &[])
            .await
            .unwrap()
            .get(0);
        holder.is_none()
    })
    .await;
    listener.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn refused_stale_writes_are_counted_for_status() {
    let env = TestEnv::shop(1).await;
    // A render from the far future is stored: any render of product 1 now is older, and refused.
    let ticket_key = format!("pgfresh:ticket:{}", env.key(1, "compact"));
    env.set(&ticket_key, "9000000000000000").await;
    let listener = env.start_listener(test_settings());
    env.rename(1, "Refused").await;
    eventually("the refused write to be counted", || async {
        env.listener_total("refused_writes").await >= 1
    })
    .await;
    assert!(
        env.get(&env.key(1, "compact")).await.is_none(),
        "the older render was not written"
    );
    listener.stop().await;
    env.del(&ticket_key).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_panicking_render_a_redis_error_and_a_loader_error_each_fail_alone_and_are_parked() {
    let env = TestEnv::shop(4).await;
    // Rendering a product named "PANIC" panics: a bug in user code.
    let fussy = AlteredCard {
        render: |key, row, variant| {
            assert!(row.name != "PANIC", "cannot render a product named PANIC");
            pgfresh::Fragment::render(&common::product_card::ProductCard, key, row, variant)
        },
        ..AlteredCard::new("fussy_card", 1)
    };
    let fragments = Fragments::new().with(&env.prefix, fussy);
    let settings = tweak(test_settings(), |s| s.max_attempts = 2);
    let listener = env.start_listener_with(fragments, settings);
    // A ticket key of the wrong type: Redis refuses to GET it as a string.
    let ticket_key = format!("pgfresh:ticket:{}", env.key(2, "compact"));
    let _: () = redis::cmd("RPUSH")
        .arg(&ticket_key)
        .arg("not a string")
        .query_async(
            &mut redis::Client::open(common::redis_url())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap(),
        )
        .await
        .unwrap();
    // One transaction, so one batch, and products 2 and 3 in one script call: each fails alone.
    let db = env.client().await;
    db.batch_execute(
        "BEGIN;
         UPDATE products SET name = 'PANIC' WHERE id = 1;
         UPDATE products SET name = 'Wrong type in Redis' WHERE id = 2;
         UPDATE products SET name = 'Fine' WHERE id = 3;
         COMMIT;",
    )
    .await
    .unwrap();
    env.wait_name(3, "Fine").await;
    eventually(
        "the panicking and the refused change to be parked",
        || async { env.parked().await == 2 },
    )
    .await;
    let errors = env.parked_errors("key").await;
    assert!(
        errors[0].contains("panicked: cannot render a product named PANIC"),
        "{errors:?}"
    );
    assert!(
        errors[1].contains("Redis refused") && errors[1].contains("WRONGTYPE"),
        "{errors:?}"
    );

    // A loader that fails (its table is gone for a moment) fails its batch's changes, which are retried.
    db.batch_execute("ALTER TABLE reviews RENAME TO reviews_away")
        .await
        .unwrap();
    env.rename(4, "After the loader recovered").await;
    eventually("the loader failure to be recorded for retry", || async {
        let row = db
            .query_opt(
                "SELECT last_error FROM pgfresh.changes WHERE key = '4'",
                &[],
            )
            .await
            .unwrap();
        row.and_then(|r| r.get::<_, Option<String>>(0))
            .is_some_and(|e| e.contains("load of fussy_card failed"))
    })
    .await;
    db.batch_execute("ALTER TABLE reviews_away RENAME TO reviews")
        .await
        .unwrap();
    env.wait_name(4, "After the loader recovered").await;
    listener.stop().await;
    env.del(&ticket_key).await;
    env.cleanup().await;
}

#[tokio::test]
async fn notifications_from_anyone_are_only_hints() {
    let env = TestEnv::shop(3).await;
    let listener = env.start_listener(no_polling());
    wait_idle(&env, 1).await;
    let stranger = env.client().await;
    let huge = "x".repeat(7990);
    for payload in [
        "",
        "product:1",
        "ping:not-yours",
        "DROP TABLE products",
        "{\"topic\":\"product\",\"key\":\"2\"}",
        &huge,
    ] {
        stranger
            .execute("SELECT pg_notify('pgfresh', $1)", &[&payload])
            .await
            .unwrap();
    }
    // Nothing changed, so nothing is rendered, whatever the payloads asked for.
    env.rename(3, "A real change").await;
    env.wait_name(3, "A real change").await;
    assert_eq!(env.get(&env.key(1, "compact")).await, None);
    assert_eq!(env.get(&env.key(2, "compact")).await, None);
    assert!(
        !listener.task.is_finished(),
        "the listener is still running"
    );
    listener.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn after_a_deploy_that_changed_a_fragment_its_old_entries_are_replaced_at_once() {
    let env = TestEnv::shop(5).await;
    env.sweep().await;
    // Version 2 of the card, with new markup: what a deploy of changed fragment code looks like.
    let card_v2 = AlteredCard {
        render: |key, row, variant| {
            maud::html! { div class="v2" { (pgfresh::Fragment::render(&common::product_card::ProductCard, key, row, variant)) } }
        },
        ..AlteredCard::new("product_card", 2)
    };
    let fragments = Fragments::new().with(&env.prefix, card_v2);
    // The periodic sweep is off: only the version check can replace the old entries.
    let listener = env.start_listener_with(fragments, test_settings());
    for id in 1..=5 {
        let key = env.key(id, "full");
        eventually("the new markup", || async {
            env.get(&key)
                .await
                .is_some_and(|html| html.starts_with(r#"<div class="v2">"#))
        })
        .await;
    }
    eventually("the marker to record version 2", || async {
        env.get(&env.marker_key()).await.as_deref() == Some("2")
    })
    .await;
    listener.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn in_a_rolling_deploy_the_old_listener_stands_aside_until_the_new_one_is_gone() {
    let env = TestEnv::shop(8).await;
    env.sweep().await;
    let db = env.client().await;
    let old_superseded = || async {
        db.query_one(
            "SELECT bool_and(superseded) FROM pgfresh.listeners WHERE versions = '{1}'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, Option<bool>>(0)
    };
    let cards = || async {
        let mut cards = Vec::new();
        for id in 1..=8 {
            for variant in ["compact", "full"] {
                cards.push(env.get(&env.key(id, variant)).await.unwrap_or_default());
            }
        }
        cards
    };
    let old = env.start_listener(test_settings());
    eventually("the old listener to register", || async {
        old_superseded().await == Some(false)
    })
    .await;

    // The new version starts beside it: the old one stands aside, the new one sweeps.
    let card_v2 = AlteredCard {
        render: |key, row, variant| {
            maud::html! { div class="v2" { (pgfresh::Fragment::render(&common::product_card::ProductCard, key, row, variant)) } }
        },
        ..AlteredCard::new("product_card", 2)
    };
    let new = env.start_listener_with(Fragments::new().with(&env.prefix, card_v2), test_settings());
    eventually("the old listener to stand aside", || async {
        old_superseded().await == Some(true)
    })
    .await;
    eventually("the new markup everywhere", || async {
        cards()
            .await
            .iter()
            .all(|html| html.starts_with(r#"<div class="v2">"#))
    })
    .await;

    // What the old listener has applied, as its next heartbeat (every 5 s) publishes it.
    let old_applied = || async {
        let since: std::time::SystemTime = db.query_one("SELECT now()", &[]).await.unwrap().get(0);
        let applied = std::sync::Mutex::new(None);
        eventually("the old listener's next heartbeat", || async {
            let row = db
                .query_one(
                    "SELECT seen_at, changes_done FROM pgfresh.listeners WHERE versions = '{1}'",
                    &[],
                )
                .await
                .unwrap();
            let seen: std::time::SystemTime = row.get(0);
            *applied.lock().unwrap() = Some(row.get::<_, i64>(1));
            seen > since
        })
        .await;
        applied.into_inner().unwrap().unwrap()
    };
    let applied_before = old_applied().await;

    // Changes from now on are applied by the new listener only, with the new markup. One commit per
    // product and round, so that two listeners both applying changes would each take some.
    for round in 1..=5 {
        for id in 1..=8i64 {
            db.execute(
                "UPDATE products SET price_cents = price_cents + $1 WHERE id = $2",
                &[&round, &id],
            )
            .await
            .unwrap();
        }
    }
    eventually("the queue to drain", || async { env.pending().await == 0 }).await;
    assert_eq!(
        old_applied().await,
        applied_before,
        "the old listener applied changes while standing aside"
    );
    let after = cards().await;
    assert!(
        after
            .iter()
            .all(|html| html.starts_with(r#"<div class="v2">"#)),
        "an old listener wrote old markup after the new version swept: {after:?}"
    );

    // Rollback: the new listener goes away; the old one resumes and brings its markup back.
    new.stop().await;
    eventually("the old listener to resume", || async {
        old_superseded().await == Some(false)
    })
    .await;
    for id in 1..=8 {
        env.wait_fresh(id).await;
    }
    old.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_slow_batch_of_old_data_landing_after_a_newer_batch_is_refused() {
    let env = TestEnv::shop(2).await;
    // One listener claims the change to "Old", reads its rows and stalls before writing.
    let (stalling, release) = AlteredCard::stalling();
    let slow = env.start_listener_with(
        Fragments::new().with(&env.prefix, common::SharedFragment(stalling.clone())),
        test_settings(),
    );
    env.rename(1, "Old").await;
    eventually("the slow listener to have read its rows", || async {
        stalling.gate_taken()
    })
    .await;
    // Another applies the newer change meanwhile.
    let fast = env.start_listener(test_settings());
    env.rename(1, "New").await;
    env.wait_name(1, "New").await;
    // The slow batch took its ticket before it read "Old", so it is older than the fast one's, and
    // Redis refuses it, whichever lands last.
    release.send(()).unwrap();
    eventually("both stale writes to be refused", || async {
        env.listener_total("refused_writes").await >= 2
    })
    .await;
    env.wait_fresh(1).await;
    assert!(
        env.get(&env.key(1, "full"))
            .await
            .unwrap()
            .contains("<h2>New</h2>")
    );
    slow.stop().await;
    fast.stop().await;
    env.cleanup().await;
}

/// Whether every card of products 1..=`products` carries the v2 markup of [`v2_card`].
async fn all_v2(env: &TestEnv, products: i64) -> bool {
    for id in 1..=products {
        for variant in ["compact", "full"] {
            let html = env.get(&env.key(id, variant)).await.unwrap_or_default();
            if !html.starts_with(r#"<div class="v2">"#) {
                return false;
            }
        }
    }
    true
}

fn v2_card() -> AlteredCard {
    AlteredCard {
        render: |key, row, variant| {
            maud::html! { div class="v2" { (pgfresh::Fragment::render(&common::product_card::ProductCard, key, row, variant)) } }
        },
        ..AlteredCard::new("product_card", 2)
    }
}

#[tokio::test]
async fn a_newer_listener_that_stops_heartbeating_is_given_up_and_the_old_markup_returns() {
    let env = TestEnv::shop(3).await;
    env.sweep().await;
    let old = env.start_listener(test_settings());
    let new = env.start_listener_with(
        Fragments::new().with(&env.prefix, v2_card()),
        test_settings(),
    );
    eventually("the new markup everywhere", || all_v2(&env, 3)).await;
    // The new listener dies without deregistering (its host is gone): its registry row stays, and
    // only its silence (15 s without a heartbeat) tells the old one it is gone. It died in the
    // middle of a sweep, holding the sweep lease past that (for its 30-s term; 20 s here): the old
    // one, back from standing aside, waits for the lease and then still sweeps its markup back.
    new.task.abort();
    env.client()
        .await
        .batch_execute(
            "UPDATE pgfresh.sweep_lease SET holder = 'the-new-listener', expires_at = now() + interval '20 seconds'",
        )
        .await
        .unwrap();
    eventually_after(
        Duration::from_secs(20),
        "the old markup to come back",
        || async { !all_v2(&env, 3).await },
    )
    .await;
    for id in 1..=3 {
        env.wait_fresh(id).await;
    }
    old.stop().await;
    env.cleanup().await;
}

/// A sweep that renders another version than the marker says takes the marker away before it
/// writes: one that dies in the middle (its process killed) leaves no marker claiming that Redis
/// holds one version, so the listeners of the old version sweep their markup back.
#[tokio::test]
async fn a_sweep_of_another_version_that_dies_midway_leaves_no_marker_and_the_old_markup_returns() {
    let env = TestEnv::shop(3).await;
    env.sweep().await;
    let (open, gate) = tokio::sync::oneshot::channel();
    let card = std::sync::Arc::new(AlteredCard {
        gate: std::sync::Mutex::new(Some(gate)),
        ..v2_card()
    });
    let sweeping = tokio::spawn({
        let (db, sink) = (env.db.clone(), env.sink.clone());
        let fragments = Fragments::new().with(&env.prefix, common::SharedFragment(card.clone()));
        async move {
            let settings = pgfresh::SweepSettings::default();
            pgfresh::sweep(&db, &sink, &fragments, &settings, &pgfresh::Shutdown::new()).await
        }
    });
    eventually("the version 2 sweep to load its first page", || async {
        card.gate_taken()
    })
    .await;
    // What it wrote before it died (its first page of a larger table, say), and its death.
    let written = env.key(1, "compact");
    env.set(&written, r#"<div class="v2">written</div>"#).await;
    sweeping.abort();
    drop(open);
    assert_eq!(
        env.get(&env.marker_key()).await,
        None,
        "the marker says version 1"
    );
    let old = env.start_listener(test_settings());
    eventually("the old markup to come back", || async {
        env.get(&written)
            .await
            .is_some_and(|html| !html.contains("v2"))
    })
    .await;
    for id in 1..=3 {
        env.wait_fresh(id).await;
    }
    assert_eq!(env.get(&env.marker_key()).await.as_deref(), Some("1"));
    old.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_newer_listener_waits_for_older_ones_to_stand_aside_before_it_sweeps() {
    let env = TestEnv::shop(2).await;
    env.sweep().await;
    // An older listener that never stands aside (a release from before the mechanism): live, not
    // superseded, rendering version 1.
    env.client()
        .await
        .batch_execute(
            "INSERT INTO pgfresh.listeners (id, fragments, versions) VALUES ('old-release', '{product_card}', '{1}')",
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let new = env.start_listener_with(
        Fragments::new().with(&env.prefix, v2_card()),
        test_settings(),
    );
    eventually_after(Duration::from_secs(10), "the new markup everywhere", || {
        all_v2(&env, 2)
    })
    .await;
    // It waited (up to 10 s) for the old one to stand aside before sweeping its markup in.
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "swept after {:?}, without waiting",
        started.elapsed()
    );
    new.stop().await;
    env.cleanup().await;
}

/// A listener started beside a newer one (an old release restarted in the middle of a rolling
/// deploy) stands aside before its first batch: a change queued before it started is left to the
/// newer one, not applied with the old markup under a ticket newer than the new version's sweep.
#[tokio::test]
async fn a_listener_started_beside_a_newer_one_applies_nothing_before_standing_aside() {
    let env = TestEnv::shop(3).await;
    env.sweep().await;
    let db = env.client().await;
    // The newer listener, as its row says (live for the whole test), that has not claimed the
    // change yet.
    db.batch_execute(
        "INSERT INTO pgfresh.listeners (id, fragments, versions, seen_at)
         VALUES ('newer:1:1', '{product_card}', '{2}', now() + interval '1 hour')",
    )
    .await
    .unwrap();
    env.rename(1, "Queued before it started").await;
    let old = env.start_listener(test_settings());
    eventually("the old listener to stand aside", || async {
        let sql = "SELECT EXISTS (SELECT FROM pgfresh.listeners WHERE superseded)";
        common::value::<bool>(&db, sql).await
    })
    .await;
    assert_eq!(env.pending().await, 1, "the queued change was applied");
    old.stop().await;
    env.cleanup().await;
}

/// A release that adds a fragment and changes no version is newer too: an old listener beside one
/// of its listeners, started after it, stands aside (it would apply a change of a topic both
/// handle, render its own fragments alone, and settle it, leaving the new fragment's entry stale
/// until a sweep). A release that removed a fragment, started after the one before, does not stand
/// aside for it. A listener whose fragments only overlap another's (another binary on the same
/// database) is neither newer nor older, and both work.
#[tokio::test]
async fn a_listener_stands_aside_for_one_rendering_all_its_fragments_and_more_not_for_an_overlap() {
    let env = TestEnv::shop(3).await;
    env.sweep().await;
    let db = env.client().await;
    let superseded = || async {
        let sql = "SELECT EXISTS (SELECT FROM pgfresh.listeners WHERE superseded)";
        common::value::<bool>(&db, sql).await
    };
    // Another binary's listener: the card at the same version, and a fragment of its own. This
    // one's own fragments: the card and another.
    db.batch_execute(
        "INSERT INTO pgfresh.listeners (id, fragments, versions, seen_at)
         VALUES ('other-binary:1:1', '{product_card,order_summary}', '{1,1}', now() + interval '1 hour')",
    )
    .await
    .unwrap();
    let other_prefix = format!("{}other:", env.prefix.trim_end_matches("product_card:"));
    pgfresh::testing::set_fragment_marker(&env.sink, &other_prefix, 1)
        .await
        .unwrap();
    let fragments = env
        .fragments()
        .with(&other_prefix, common::AlteredCard::new("other_card", 1));
    let listener = env.start_listener_with(fragments, test_settings());
    env.rename(1, "Applied beside an overlap").await;
    let key = env.key(1, "full");
    eventually("the change to be applied", || async {
        env.get(&key)
            .await
            .is_some_and(|card| card.contains("Applied beside an overlap"))
    })
    .await;
    assert!(!superseded().await, "it stood aside for an overlap");
    listener.stop().await;

    // The previous release of this binary, which had one fragment more (this release removed it),
    // is still running: this one, started after it, is the newer and works.
    db.batch_execute(
        "DELETE FROM pgfresh.listeners;
         INSERT INTO pgfresh.listeners (id, fragments, versions, seen_at, started_at)
         VALUES ('previous-release:1:1', '{product_card,product_teaser}', '{1,1}',
                 now() + interval '1 hour', now() - interval '1 hour')",
    )
    .await
    .unwrap();
    let listener = env.start_listener(test_settings());
    env.rename(3, "Applied after removing a fragment").await;
    let key = env.key(3, "full");
    eventually("the change to be applied", || async {
        env.get(&key)
            .await
            .is_some_and(|card| card.contains("Applied after removing a fragment"))
    })
    .await;
    assert!(!superseded().await, "it stood aside for the release before");
    listener.stop().await;

    // The next release of this binary, started after this one: every fragment at the same
    // version, and one more.
    db.batch_execute(
        "DELETE FROM pgfresh.listeners;
         INSERT INTO pgfresh.listeners (id, fragments, versions, seen_at, started_at)
         VALUES ('next-release:1:1', '{product_card,product_teaser}', '{1,1}',
                 now() + interval '1 hour', now() + interval '1 hour')",
    )
    .await
    .unwrap();
    env.rename(2, "Queued beside the next release").await;
    let old = env.start_listener(test_settings());
    eventually("the old listener to stand aside", superseded).await;
    assert_eq!(env.pending().await, 1, "the queued change was applied");
    old.stop().await;
    env.cleanup().await;
}

/// A listener killed (or whose host went away) leaves its row; a listener starting deletes the rows
/// of those not seen for an hour, so that a fleet whose listeners are killed now and then does not
/// grow the registry for good, and keeps the recent ones.
#[tokio::test]
async fn a_listener_starting_forgets_the_rows_of_listeners_long_gone() {
    let env = TestEnv::shop(3).await;
    let db = env.client().await;
    db.batch_execute(
        "INSERT INTO pgfresh.listeners (id, seen_at) VALUES
             ('killed:1:yesterday', now() - interval '1 day'),
             ('killed:2:a-minute-ago', now() - interval '2 minutes')",
    )
    .await
    .unwrap();
    let listener = env.start_listener(test_settings());
    eventually("the listener to register", || async {
        let sql = "SELECT count(*) FROM pgfresh.listeners WHERE id NOT LIKE 'killed:%'";
        common::value::<i64>(&db, sql).await == 1
    })
    .await;
    let sql = "SELECT array_agg(id ORDER BY id) FROM pgfresh.listeners WHERE id LIKE 'killed:%'";
    let left: Vec<String> = common::value(&db, sql).await;
    assert_eq!(left, ["killed:2:a-minute-ago"]);
    listener.stop().await;
    env.cleanup().await;
}
