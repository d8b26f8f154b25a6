//! The full sweep and the write path it shares with the listener: fills an empty Redis, repairs
//! deleted and corrupted entries, deletes orphans, leaves other keys alone, reports what it did; and an
//! older render never overwrites a newer one, whichever finishes last.

mod common;

use common::TestEnv;
use common::info_number;
use common::tweak;
use pgfresh::Shutdown;
use pgfresh::SweepSettings;

/// Small pages, so that a few products span several pages run concurrently.
fn small_pages() -> SweepSettings {
    tweak(SweepSettings::default(), |s| {
        s.page_size = 7;
        s.concurrency = 3;
    })
}

#[tokio::test]
async fn a_sweep_fills_redis_then_repairs_deleted_and_corrupted_entries_and_removes_orphans() {
    let env = TestEnv::shop(30).await;
    let first = env.try_sweep(small_pages()).await.unwrap();
    assert_eq!(
        (
            first.stats.rendered,
            first.stats.written,
            first.stats.errors
        ),
        (60, 60, 0)
    );
    for id in 1..=30 {
        env.wait_fresh(id).await;
    }

    env.del(&env.key(5, "full")).await;
    env.set(&env.key(6, "compact"), "<p>corrupted</p>").await;
    env.set(
        &env.key(999, "full"),
        "orphan of a product that never existed",
    )
    .await;
    env.set(
        &env.key(7, "retired_variant"),
        "a variant the fragment no longer has",
    )
    .await;
    let unrelated = format!("{}other:keep-me", env.name);
    env.set(&unrelated, "not under the fragment prefix").await;
    // A product deleted behind pgfresh's back (its change removed from the queue).
    let db = env.client().await;
    db.batch_execute("DELETE FROM products WHERE id = 30; DELETE FROM pgfresh.changes")
        .await
        .unwrap();

    let second = env.try_sweep(small_pages()).await.unwrap();
    assert_eq!(second.stats.rendered, 58);
    assert_eq!(
        second.stats.written, 2,
        "the deleted and the corrupted entry"
    );
    assert_eq!(second.stats.unchanged, 56);
    assert_eq!(
        second.orphans_deleted, 4,
        "product 999, product 30's two cards, the retired variant"
    );
    assert!(second.succeeded());
    for id in [5, 6, 30] {
        env.wait_fresh(id).await;
    }
    assert_eq!(env.get(&env.key(999, "full")).await, None);
    assert_eq!(env.get(&env.key(7, "retired_variant")).await, None);
    assert!(
        env.get(&unrelated).await.is_some(),
        "keys outside the prefix are never touched"
    );
    env.del(&unrelated).await;

    let line = second.to_string();
    assert!(
        line.starts_with(
            "sweep: 58 fragments rendered, 2 written, 56 unchanged, 4 orphans deleted, 0 errors in "
        ),
        "{line}"
    );
    assert!(line.ends_with("fragments/s)"), "{line}");
    env.cleanup().await;
}

#[tokio::test]
async fn a_sweep_confirms_entries_holding_their_render_fences_late_renders_and_finds_orphans() {
    use pgfresh::testing::{Write, WriteResult};
    let env = TestEnv::shop(6).await;
    env.sweep().await;
    let ticket_of = |key: String| {
        let ticket_key = pgfresh::testing::ticket_key(&env.sink, &key);
        let mut redis = env.sink.connection();
        async move {
            redis::cmd("GET")
                .arg(ticket_key)
                .query_async::<Option<i64>>(&mut redis)
                .await
                .unwrap()
        }
    };
    let before = ticket_of(env.key(1, "full")).await.unwrap();
    // An entry rewritten behind pgfresh's back with other bytes must go through the checked write.
    env.set(&env.key(3, "compact"), "changed behind pgfresh's back")
        .await;
    // A product deleted without its trigger: its entries (with tickets older than the sweep's) are
    // orphans although they hold what was once their render.
    env.client()
        .await
        .batch_execute("SET session_replication_role = replica; DELETE FROM products WHERE id = 6")
        .await
        .unwrap();

    let report = env.sweep().await;
    assert_eq!(
        (
            report.stats.written,
            report.stats.unchanged,
            report.orphans_deleted
        ),
        (1, 9, 2),
        "{report}"
    );
    // Left as it was, but its ticket raised to the sweep's: a render that took its ticket before the
    // sweep (a listener's batch still in flight, from before a lost commit) and lands now is refused.
    let after = ticket_of(env.key(1, "full")).await.unwrap();
    assert!(after > before + 1, "ticket {before} -> {after}");
    let late = [Write::Set {
        key: env.key(1, "full"),
        value: b"a render from before the sweep".to_vec(),
        ttl: None,
    }];
    assert_eq!(
        pgfresh::testing::write(&env.sink, before + 1, &late)
            .await
            .unwrap(),
        [WriteResult::Refused]
    );
    env.wait_fresh(1).await;
    env.wait_fresh(3).await;
    assert_eq!(env.get(&env.key(6, "full")).await, None);
    assert_eq!(env.get(&env.key(6, "compact")).await, None);
    env.cleanup().await;
}

#[tokio::test]
async fn sweeping_an_unknown_fragment_fails_with_the_names_there_are() {
    let env = TestEnv::shop(1).await;
    let error = env.fragments().only("nope").err().unwrap();
    assert_eq!(
        error.to_string(),
        "no fragment named \"nope\"; this binary has: product_card"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn an_older_render_never_overwrites_a_newer_one() {
    use pgfresh::testing::{Write, WriteResult};
    let env = TestEnv::empty().await;
    let key = env.key(1, "full");
    let set = |html: &str| {
        vec![Write::Set {
            key: key.clone(),
            value: html.into(),
            ttl: None,
        }]
    };
    assert_eq!(
        pgfresh::testing::write(&env.sink, 10, &set("new"))
            .await
            .unwrap(),
        [WriteResult::Written]
    );
    assert_eq!(
        pgfresh::testing::write(&env.sink, 9, &set("old"))
            .await
            .unwrap(),
        [WriteResult::Refused]
    );
    assert_eq!(
        pgfresh::testing::write(&env.sink, 10, &set("new"))
            .await
            .unwrap(),
        [WriteResult::Unchanged]
    );
    assert_eq!(env.get(&key).await.as_deref(), Some("new"));

    let delete = vec![Write::Delete { key: key.clone() }];
    assert_eq!(
        pgfresh::testing::write(&env.sink, 11, &delete)
            .await
            .unwrap(),
        [WriteResult::Deleted]
    );
    assert_eq!(
        pgfresh::testing::write(&env.sink, 10, &set("resurrected"))
            .await
            .unwrap(),
        [WriteResult::Refused]
    );
    assert_eq!(
        env.get(&key).await,
        None,
        "a render older than the delete cannot bring the key back"
    );
    assert_eq!(
        pgfresh::testing::write(&env.sink, 12, &set("recreated"))
            .await
            .unwrap(),
        [WriteResult::Written]
    );
    env.del(&format!("pgfresh:ticket:{key}")).await;
    env.cleanup().await;
}

#[tokio::test]
async fn one_script_call_gives_each_write_the_result_it_would_have_alone() {
    use pgfresh::testing::{Write, WriteResult};
    let env = TestEnv::empty().await;
    let key = |name: &str| format!("{}{name}", env.prefix);
    let set = |name: &str, html: &str| Write::Set {
        key: key(name),
        value: html.into(),
        ttl: None,
    };
    let delete = |name: &str| Write::Delete { key: key(name) };
    let write = |ticket: i64, writes: Vec<Write>| {
        let sink = env.sink.clone();
        async move {
            pgfresh::testing::write(&sink, ticket, &writes)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        write(
            10,
            vec![
                set("newer", "by ticket 20"),
                set("same", "same"),
                set("gone", "x")
            ]
        )
        .await,
        [const { WriteResult::Written }; 3]
    );
    assert_eq!(
        write(20, vec![set("newer", "by ticket 20")]).await,
        [WriteResult::Unchanged]
    );
    let hour = std::time::Duration::from_secs(3600);
    let mixed = vec![
        set("newer", "an older render"),
        set("same", "same"),
        set("new", "fresh"),
        delete("gone"),
        delete("never"),
        Write::Set {
            key: key("with ttl"),
            value: b"expires".to_vec(),
            ttl: Some(hour),
        },
    ];
    assert_eq!(
        write(15, mixed.clone()).await,
        [
            WriteResult::Refused,
            WriteResult::Unchanged,
            WriteResult::Written,
            WriteResult::Deleted,
            WriteResult::Absent,
            WriteResult::Written,
        ]
    );
    assert_eq!(
        env.get(&key("newer")).await.as_deref(),
        Some("by ticket 20")
    );
    assert_eq!(env.get(&key("new")).await.as_deref(), Some("fresh"));
    assert_eq!(env.get(&key("gone")).await, None);
    let mut redis = env.sink.connection();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(key("with ttl"))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(ttl > 3_000_000, "the entry's TTL: {ttl} ms");
    let tickets = pgfresh::testing::tickets(&env.sink, &[key("same"), key("new"), key("gone")])
        .await
        .unwrap();
    assert_eq!(
        tickets,
        [Some(15); 3],
        "every key the call was allowed to write"
    );

    // The same key twice in one call: as if written one after the other.
    let twice = vec![
        set("new", "first"),
        set("new", "second"),
        set("new", "second"),
    ];
    assert_eq!(
        write(16, twice).await,
        [
            WriteResult::Written,
            WriteResult::Written,
            WriteResult::Unchanged
        ]
    );
    assert_eq!(env.get(&key("new")).await.as_deref(), Some("second"));

    // A ticket key holding another type: that key alone is refused, the others are written.
    let _: () = redis::cmd("RPUSH")
        .arg(pgfresh::testing::ticket_key(&env.sink, &key("listed")))
        .arg("not a ticket")
        .query_async(&mut redis)
        .await
        .unwrap();
    let results = write(
        17,
        vec![set("new", "third"), set("listed", "y"), set("other", "z")],
    )
    .await;
    assert_eq!(results[0], WriteResult::Written);
    assert!(
        matches!(&results[1], WriteResult::Failed(error) if error.contains("WRONGTYPE")),
        "{results:?}"
    );
    assert_eq!(results[2], WriteResult::Written);
    assert_eq!(env.get(&key("other")).await.as_deref(), Some("z"));
    env.cleanup().await;
}

#[tokio::test]
async fn a_sweep_reads_and_writes_redis_in_bulk_not_key_by_key() {
    // A server of its own, so that its command counts are this test's.
    let redis = common::servers::TempRedis::start();
    let env = TestEnv::shop_with_redis(50, &redis.url()).await;
    let mut connection = env.sink.connection();
    // Filling 100 entries, then finding each holding its render (tickets raised), then writing 10 of
    // them again: with a GET and a SET per key each pass would call them hundreds of times.
    let filled = env.sweep().await;
    assert_eq!(filled.stats.written, 100, "{filled}");
    let held = env.sweep().await;
    assert_eq!(held.stats.unchanged, 100, "{held}");
    env.client()
        .await
        .batch_execute("UPDATE products SET price_cents = price_cents + 1 WHERE id % 10 = 0")
        .await
        .unwrap();
    let changed = env.sweep().await;
    assert_eq!(changed.stats.written, 10, "{changed}");
    let mut calls = async |command: &str| {
        let line = format!("cmdstat_{command}:calls=");
        info_number(&mut connection, "commandstats", &line).await
    };
    let per_key = calls("get").await + calls("set").await;
    assert!(
        per_key < 40,
        "{per_key} GETs and SETs for three sweeps of 100 entries"
    );
    assert!(
        calls("mset").await >= 3,
        "the entries and tickets go in MSETs"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_sweep_into_an_empty_redis_stops_reading_entries_back_after_its_first_pages() {
    // A server of its own, so that its counts are this test's.
    let redis = common::servers::TempRedis::start();
    let env = TestEnv::shop_with_redis(60, &redis.url()).await;
    let mut connection = env.sink.connection();
    // One page at a time, so that each page knows what the one before it found.
    let pages = tweak(SweepSettings::default(), |s| {
        s.page_size = 10;
        s.concurrency = 1;
    });
    let before = info_number(&mut connection, "stats", "keyspace_misses:").await;
    let filled = env.try_sweep(pages.clone()).await.unwrap();
    assert_eq!(filled.stats.written, 120, "{filled}");
    // Read back first, each entry misses five times (its value and ticket read back, then the
    // script's reads of its ticket, whether that ticket exists, and its value); sent straight to the
    // script, three. Only the first page reads back: 20 x 5 + 100 x 3 = 400, against 600.
    let fill_misses = info_number(&mut connection, "stats", "keyspace_misses:").await - before;
    assert!(fill_misses < 4 * 120, "{fill_misses} keyspace misses");
    // The next sweep expects entries to hold their renders again, and confirms them.
    let again = env.try_sweep(pages).await.unwrap();
    assert_eq!(
        (again.stats.unchanged, again.stats.written),
        (120, 0),
        "{again}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_sweep_into_an_empty_redis_does_not_scan_it_for_orphans_afterwards() {
    // A server of its own, so that its command counts are this test's.
    let redis = common::servers::TempRedis::start();
    // 3,000 products: 6,000 entries and as many tickets, more keys than one SCAN step samples.
    let env = TestEnv::shop_with_redis(3000, &redis.url()).await;
    let mut connection = env.sink.connection();
    let scans = async |connection: &mut pgfresh::RedisConnection| {
        info_number(connection, "commandstats", "cmdstat_scan:calls=").await
    };

    let before = scans(&mut connection).await;
    let filled = env.sweep().await;
    assert_eq!(filled.stats.written, 6000, "{filled}");
    // One step as the sweep began, which found nothing; scanning the 12,000 keys it left would take
    // at least three more.
    assert_eq!(scans(&mut connection).await - before, 1, "SCAN calls");

    // With entries in Redis, orphans are found by scanning it after the pages: a product deleted
    // behind pgfresh's back leaves two, and 300 entries of products that never existed, spread
    // over every step of the scan, are one each.
    env.client()
        .await
        .batch_execute("SET session_replication_role = replica; DELETE FROM products WHERE id = 7")
        .await
        .unwrap();
    let never: Vec<String> = (100_000..100_300).map(|id| env.key(id, "full")).collect();
    let mut mset = redis::cmd("MSET");
    for key in &never {
        mset.arg(key).arg("orphan");
    }
    let _: () = mset.query_async(&mut connection).await.unwrap();
    let before = scans(&mut connection).await;
    let again = env.sweep().await;
    assert_eq!(
        (again.stats.unchanged, again.orphans_deleted),
        (5998, 302),
        "{again}"
    );
    for key in never
        .iter()
        .chain([&env.key(7, "full"), &env.key(7, "compact")])
    {
        assert_eq!(env.get(key).await, None, "{key}");
    }
    assert!(scans(&mut connection).await - before >= 3, "SCAN calls");

    // An entry in an otherwise empty Redis is enough for the fill to look for orphans.
    let _: () = redis::cmd("FLUSHDB")
        .query_async(&mut connection)
        .await
        .unwrap();
    env.set(&env.key(99_998, "full"), "orphan").await;
    let refilled = env.sweep().await;
    assert_eq!(
        (refilled.stats.written, refilled.orphans_deleted),
        (5998, 1),
        "{refilled}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_full_redis_fails_a_write_as_a_whole_with_one_line_saying_what_to_do() {
    use pgfresh::testing::Write;
    let redis = common::servers::TempRedis::start();
    let env = TestEnv::shop_with_redis(1, &redis.url()).await;
    let set = |value: &str| {
        vec![Write::Set {
            key: env.key(1, "full"),
            value: value.into(),
            ttl: None,
        }]
    };
    pgfresh::testing::write(&env.sink, 10, &set("stored"))
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory", "1", "maxmemory-policy", "noeviction"][..])
        .query_async(&mut env.sink.connection())
        .await
        .unwrap();
    // A changed entry (its SET refused), and an unchanged one (only its ticket to raise).
    for value in ["changed", "stored"] {
        let error = pgfresh::testing::write(&env.sink, 11, &set(value))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("Redis refused writes: OOM") && error.contains("raise maxmemory"),
            "{error}"
        );
        assert_eq!(error.lines().count(), 1, "{error}");
    }
    env.cleanup().await;
}

#[tokio::test]
async fn the_listener_runs_the_periodic_sweep() {
    let env = TestEnv::shop(3).await;
    let settings = tweak(common::test_settings(), |s| {
        s.sweep_interval = Some(std::time::Duration::from_millis(200))
    });
    let listener = env.start_listener(settings);
    // Nothing changed, so only a sweep can fill Redis, and refill what is deleted behind its back.
    for id in 1..=3 {
        env.wait_fresh(id).await;
    }
    env.del(&env.key(2, "full")).await;
    env.wait_fresh(2).await;
    listener.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_sweep_reports_its_progress_against_the_fragment_count() {
    use std::sync::Mutex;
    #[derive(Default)]
    struct Seen {
        started: Vec<(String, Option<u64>)>,
        advanced: u64,
        finished: Vec<String>,
    }
    #[derive(Default)]
    struct Recorded(Mutex<Seen>);
    impl pgfresh::Progress for Recorded {
        fn fragment_started(&self, name: &str, fragments: Option<u64>) {
            self.0
                .lock()
                .unwrap()
                .started
                .push((name.into(), fragments));
        }
        fn advanced(&self, fragments: u64) {
            self.0.lock().unwrap().advanced += fragments;
        }
        fn fragment_finished(&self, name: &str) {
            self.0.lock().unwrap().finished.push(name.into());
        }
    }
    let env = TestEnv::shop(9).await;
    let recorded = Recorded::default();
    let report = pgfresh::sweep_with_progress(
        &env.db,
        &env.sink,
        &env.fragments(),
        &small_pages(),
        &Shutdown::new(),
        &recorded,
    )
    .await
    .unwrap();
    let Seen {
        started,
        advanced,
        finished,
    } = recorded.0.into_inner().unwrap();
    assert_eq!(started, [("product_card".to_string(), Some(18))]);
    assert_eq!(advanced, report.stats.rendered);
    assert_eq!(advanced, 18);
    assert_eq!(finished, ["product_card"]);
    env.cleanup().await;
}

#[tokio::test]
async fn a_one_off_sweep_sets_the_marker_so_a_listener_does_not_sweep_again() {
    let env = TestEnv::shop(3).await;
    env.del(&env.marker_key()).await;
    let report = env.sweep().await;
    assert!(report.succeeded(), "{report}");
    assert_eq!(env.get(&env.marker_key()).await.as_deref(), Some("1"));
    env.cleanup().await;
}

#[tokio::test]
async fn a_key_that_fails_in_every_sweep_is_queued_and_parked_while_the_sweep_completes() {
    let env = TestEnv::shop(5).await;
    // Redis refuses every write of product 3's full card: its ticket key holds a list.
    let broken_ticket = pgfresh::testing::ticket_key(&env.sink, &env.key(3, "full"));
    let _: () = redis::cmd("RPUSH")
        .arg(&broken_ticket)
        .arg("x")
        .query_async(&mut env.sink.connection())
        .await
        .unwrap();
    let orphan = env.key(999, "full");
    env.set(&orphan, "a product that does not exist").await;
    env.del(&env.marker_key()).await;

    let settings = tweak(common::test_settings(), |s| s.max_attempts = 2);
    let listener = env.start_listener(settings);
    // The marker sweep completes despite the key: marker set, orphans deleted, the rest fresh.
    common::eventually("the marker to be set", || async {
        env.get(&env.marker_key()).await.as_deref() == Some("1")
    })
    .await;
    assert_eq!(env.get(&orphan).await, None, "orphans are deleted");
    for id in [1, 2, 4, 5] {
        env.wait_fresh(id).await;
    }
    // The failing key went the way of a failed change: retried, then parked with its error.
    common::eventually("the failing key to be parked", || async {
        env.parked().await == 1 && env.pending().await == 0
    })
    .await;
    let errors = env.parked_errors("change_id").await;
    assert!(errors[0].contains("WRONGTYPE"), "{errors:?}");
    let parked_key: String = env
        .client()
        .await
        .query_one("SELECT key FROM pgfresh.failed", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(parked_key, "3");
    listener.stop().await;
    env.del(&broken_ticket).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_key_that_fails_in_a_sweep_keeps_its_entries_for_its_row_exists() {
    let env = TestEnv::shop(5).await;
    env.sweep().await;
    let before = env.get(&env.key(3, "full")).await;
    assert!(before.is_some());
    // A render bug for product 3 only: the sweep queues it, and must not delete its entries as
    // orphans (their tickets are older than the sweep's, as an orphan's are).
    let buggy = common::AlteredCard {
        render: |key, row, variant| {
            assert!(*key != 3, "cannot render product 3");
            pgfresh::Fragment::render(&common::product_card::ProductCard, key, row, variant)
        },
        ..common::AlteredCard::new("product_card", 1)
    };
    let report = pgfresh::sweep(
        &env.db,
        &env.sink,
        &pgfresh::Fragments::new().with(&env.prefix, buggy),
        &Default::default(),
        &Shutdown::new(),
    )
    .await
    .unwrap();
    assert_eq!(
        (report.requeued, report.orphans_deleted),
        (1, 0),
        "{report}"
    );
    assert!(!report.succeeded() && report.completed(), "{report}");
    assert_eq!(env.get(&env.key(3, "full")).await, before);
    env.cleanup().await;
}

/// The harness, which every test here relies on: a test that fails leaves neither its database nor
/// its Redis keys behind, so failures do not pile up on a developer's services.
#[test]
fn a_failed_tests_database_and_redis_keys_are_removed() {
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let (sender, names) = std::sync::mpsc::channel();
    let failed = std::thread::spawn(move || {
        runtime().block_on(async {
            let env = TestEnv::shop(2).await;
            env.sweep().await;
            sender.send(env.name.clone()).unwrap();
            panic!("(expected) a test failing with its environment in hand");
        })
    })
    .join();
    assert!(failed.is_err(), "the test thread panicked");
    let name = names.recv().unwrap();
    runtime().block_on(async {
        let admin = common::connect(&common::admin_url()).await;
        let databases: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_database WHERE datname = $1",
                &[&name],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(databases, 0, "database {name} was dropped");
        let store = pgfresh::RedisStore::connect(&common::redis_url())
            .await
            .unwrap();
        let keys = common::test_keys(&mut store.connection(), &name)
            .await
            .unwrap();
        assert!(keys.is_empty(), "keys left behind: {keys:?}");
    });
}

#[tokio::test]
async fn the_librarys_sweep_settles_the_truncations_it_covers_as_the_command_does() {
    let env = TestEnv::shop(6).await;
    env.sweep().await;
    let db = env.client().await;
    db.batch_execute("TRUNCATE products, reviews")
        .await
        .unwrap();
    // A topic none of these fragments reads: a sweep of them does not cover it.
    db.batch_execute("INSERT INTO pgfresh.truncations (topic, table_oid) VALUES ('elsewhere', 0)")
        .await
        .unwrap();
    let report = env.sweep().await;
    assert_eq!(report.orphans_deleted, 12, "{report}");
    let left: Vec<String> = db
        .query("SELECT topic FROM pgfresh.truncations", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(left, ["elsewhere"]);
    env.cleanup().await;
}

#[tokio::test]
async fn tickets_past_two_to_the_53_still_order_renders_exactly() {
    use pgfresh::testing::{Write, WriteResult};
    let env = TestEnv::shop(1).await;
    let key = env.key(1, "full");
    let set = |value: &str| {
        [Write::Set {
            key: key.clone(),
            value: value.as_bytes().to_vec(),
            ttl: None,
        }]
    };
    // 2^53 + 1 and 2^53 are one and the same double.
    let newer = (1_i64 << 53) + 1;
    let written = pgfresh::testing::write(&env.sink, newer, &set("newer"))
        .await
        .unwrap();
    assert_eq!(written, [WriteResult::Written]);
    let older = pgfresh::testing::write(&env.sink, newer - 1, &set("older"))
        .await
        .unwrap();
    assert_eq!(older, [WriteResult::Refused]);
    assert_eq!(env.get(&key).await.as_deref(), Some("newer"));
    let stored = pgfresh::testing::tickets(&env.sink, std::slice::from_ref(&key))
        .await
        .unwrap();
    assert_eq!(stored, [Some(newer)], "the ticket is kept digit for digit");
    // Seventeen digits, as a sequence that jumped past a few restarts may hand out.
    let far = 12_345_678_901_234_567_i64;
    let written = pgfresh::testing::write(&env.sink, far, &set("far"))
        .await
        .unwrap();
    assert_eq!(written, [WriteResult::Written]);
    let refused = pgfresh::testing::write(&env.sink, far - 1, &set("before far"))
        .await
        .unwrap();
    assert_eq!(refused, [WriteResult::Refused]);
    env.cleanup().await;
}

/// A card whose loader fails for every key alike (its table is missing): every page of its sweep
/// fails.
struct BrokenCard;

impl pgfresh::Fragment for BrokenCard {
    type Key = i64;
    type Row = ();
    type Variant = common::product_card::Card;
    type Error = pgfresh::tokio_postgres::Error;
    fn name(&self) -> &str {
        "broken_card"
    }
    fn topics(&self) -> pgfresh::Topics {
        pgfresh::Topics::new().direct("product")
    }
    async fn load(&self, db: &pgfresh::tokio_postgres::Client, _: &[i64]) -> pgfresh::Loaded<Self> {
        db.query("SELECT FROM no_such_table", &[]).await?;
        Ok(Vec::new())
    }
    fn render(&self, _: &i64, _: &(), _: Self::Variant) -> pgfresh::maud::Markup {
        pgfresh::maud::html! {}
    }
    async fn keys_after(
        &self,
        db: &pgfresh::tokio_postgres::Client,
        after: Option<&i64>,
        limit: i64,
    ) -> Result<Vec<i64>, pgfresh::tokio_postgres::Error> {
        pgfresh::Fragment::keys_after(&common::product_card::ProductCard, db, after, limit).await
    }
}

#[tokio::test]
async fn each_fragment_that_a_sweep_completes_is_recorded_whatever_the_others_did() {
    let env = TestEnv::shop(5).await;
    let fragments = pgfresh::Fragments::new()
        .with(format!("{}:broken:", env.name), BrokenCard)
        .with(&env.prefix, common::product_card::ProductCard);
    let report = pgfresh::sweep(
        &env.db,
        &env.sink,
        &fragments,
        &Default::default(),
        &Shutdown::new(),
    )
    .await
    .unwrap();
    assert!(
        !report.completed(),
        "the broken card's pages failed: {report}"
    );
    let recorded: Vec<(String, String, i64)> = env
        .client()
        .await
        .query(
            "SELECT fragment, reason, rewritten FROM pgfresh.sweeps
             WHERE started_at <= finished_at AND finished_at <= now()",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(
        recorded,
        [("product_card".to_string(), "one-off".to_string(), 10)]
    );
    env.cleanup().await;
}

/// The shop's card, listing its keys its own way.
struct ListedCard(Listing);

enum Listing {
    /// Its key enumeration fails (its table is missing, or its role lacks a grant).
    Failing,
    /// At most `cap` keys a call, whatever the page size (a cap of its own); `ignores_after`: the
    /// first ones every time, whatever key it is given (a bug, or a fragment of one entry).
    Capped { cap: i64, ignores_after: bool },
}

impl pgfresh::Fragment for ListedCard {
    type Key = i64;
    type Row = common::product_card::Product;
    type Variant = common::product_card::Card;
    type Error = pgfresh::tokio_postgres::Error;
    fn name(&self) -> &str {
        match self.0 {
            Listing::Failing => "unlistable_card",
            Listing::Capped { .. } => "product_card",
        }
    }
    fn topics(&self) -> pgfresh::Topics {
        pgfresh::Fragment::topics(&common::product_card::ProductCard)
    }
    async fn load(
        &self,
        db: &pgfresh::tokio_postgres::Client,
        keys: &[i64],
    ) -> pgfresh::Loaded<Self> {
        pgfresh::Fragment::load(&common::product_card::ProductCard, db, keys).await
    }
    fn render(&self, key: &i64, row: &Self::Row, variant: Self::Variant) -> pgfresh::maud::Markup {
        pgfresh::Fragment::render(&common::product_card::ProductCard, key, row, variant)
    }
    async fn keys_after(
        &self,
        db: &pgfresh::tokio_postgres::Client,
        after: Option<&i64>,
        limit: i64,
    ) -> Result<Vec<i64>, pgfresh::tokio_postgres::Error> {
        let Listing::Capped { cap, ignores_after } = self.0 else {
            db.query("SELECT FROM no_such_table", &[]).await?;
            return Ok(Vec::new());
        };
        let (capped, after) = (limit.min(cap), after.filter(|_| !ignores_after));
        pgfresh::Fragment::keys_after(&common::product_card::ProductCard, db, after, capped).await
    }
}

/// A fragment whose keys cannot be listed fails alone: the fragments after it are swept (a
/// persistent failure of the first would otherwise keep every other one from ever being swept,
/// after Redis lost its data, say), and the report says which failed and why.
#[tokio::test]
async fn a_fragment_whose_keys_cannot_be_listed_fails_alone_and_the_others_are_swept() {
    let env = TestEnv::shop(5).await;
    let fragments = pgfresh::Fragments::new()
        .with(
            format!("{}:unlistable:", env.name),
            ListedCard(Listing::Failing),
        )
        .with(&env.prefix, common::product_card::ProductCard);
    let report = env.sweep_of(&fragments, Default::default()).await.unwrap();
    assert!(!report.completed(), "{report}");
    assert_eq!(report.fragments_failed, 1, "{report}");
    let shown = report.to_string();
    assert!(shown.contains("1 fragments could not be swept"), "{shown}");
    assert!(
        shown.contains("unlistable_card") && shown.contains("no_such_table"),
        "{shown}"
    );
    assert_eq!(
        report.stats.rendered, 10,
        "product_card was swept: {report}"
    );
    assert!(env.get(&env.key(5, "full")).await.is_some());
    let sql = "SELECT array_agg(fragment) FROM pgfresh.sweeps";
    let recorded: Vec<String> = common::value(&env.client().await, sql).await;
    assert_eq!(recorded, ["product_card"]);
    env.cleanup().await;
}

/// A page shorter than asked for does not end the keys: the sweep goes on until a page is empty,
/// and its orphan pass keeps the entries of every key (it deleted those past the first page).
#[tokio::test]
async fn a_short_page_of_keys_does_not_end_the_sweep() {
    let env = TestEnv::shop(5).await;
    env.sweep().await;
    let capped = ListedCard(Listing::Capped {
        cap: 2,
        ignores_after: false,
    });
    let fragments = pgfresh::Fragments::new().with(&env.prefix, capped);
    let report = env.sweep_of(&fragments, Default::default()).await.unwrap();
    assert!(report.succeeded(), "{report}");
    assert_eq!(
        (report.stats.rendered, report.orphans_deleted),
        (10, 0),
        "{report}"
    );
    for id in 1..=5 {
        for variant in ["compact", "full"] {
            let key = env.key(id, variant);
            assert!(env.get(&key).await.is_some(), "{key} deleted as an orphan");
        }
    }
    env.cleanup().await;
}

/// A `keys_after` that lists the keys it was given to go past (a bug) fails the fragment's sweep
/// with one line, rather than paging forever.
#[tokio::test]
async fn a_key_enumeration_that_does_not_move_on_fails_its_fragment() {
    let env = TestEnv::shop(5).await;
    let stuck = ListedCard(Listing::Capped {
        cap: 2,
        ignores_after: true,
    });
    let fragments = pgfresh::Fragments::new().with(&env.prefix, stuck);
    let sweep = env.sweep_of(&fragments, Default::default());
    let report = tokio::time::timeout(common::PATIENCE, sweep)
        .await
        .expect("the sweep ends")
        .unwrap();
    assert_eq!(report.fragments_failed, 1, "{report}");
    let shown = report.to_string();
    assert!(shown.contains("keys_after listed \"2\" again"), "{shown}");
    env.cleanup().await;
}

/// Two sweeps of a fragment at once (a one-off `sweep` beside a listener's): of one version, each
/// completes and sets the marker (one took the other's canary for a Redis that lost its data, and
/// failed); of two versions, the one that started first does not set its marker, which would claim
/// the other's entries for its own version.
#[tokio::test]
async fn two_sweeps_of_a_fragment_at_once_complete_unless_their_versions_differ() {
    let env = TestEnv::shop(4).await;
    for other_version in [1, 2] {
        let (stalling, open) = common::AlteredCard::stalling();
        let first = tokio::spawn({
            let (db, sink) = (env.db.clone(), env.sink.clone());
            let fragments = pgfresh::Fragments::new()
                .with(&env.prefix, common::SharedFragment(stalling.clone()));
            async move {
                let settings = Default::default();
                pgfresh::sweep(&db, &sink, &fragments, &settings, &Shutdown::new()).await
            }
        });
        common::eventually("the first sweep's load to stall", || async {
            stalling.gate_taken()
        })
        .await;
        let other = common::AlteredCard::new("product_card", other_version);
        let fragments = pgfresh::Fragments::new().with(&env.prefix, other);
        let second = env.sweep_of(&fragments, Default::default()).await.unwrap();
        assert!(second.succeeded(), "{second}");
        open.send(()).unwrap();
        let first = first.await.unwrap().unwrap();
        assert_eq!(first.markers_lost, u64::from(other_version != 1), "{first}");
        assert_eq!(
            env.get(&env.marker_key()).await.as_deref(),
            Some(other_version.to_string().as_str()),
            "the marker of the version whose sweep started last"
        );
    }
    env.cleanup().await;
}

/// A fragment of one entry whose `keys_after` lists its one key whatever it is given (no `after` to
/// go past) is swept: its one key, listed again after itself, ends its keys.
#[tokio::test]
async fn a_fragment_of_one_key_listed_whatever_the_after_is_swept() {
    let env = TestEnv::shop(1).await;
    let single = ListedCard(Listing::Capped {
        cap: 1,
        ignores_after: true,
    });
    let fragments = pgfresh::Fragments::new().with(&env.prefix, single);
    let report = env.sweep_of(&fragments, Default::default()).await.unwrap();
    assert!(report.succeeded(), "{report}");
    assert_eq!(report.stats.rendered, 2, "{report}");
    // With pages of one key it cannot be told from a pager stuck on its first key: said so.
    let one = tweak(SweepSettings::default(), |s| s.page_size = 1);
    let report = env.sweep_of(&fragments, one).await.unwrap();
    assert_eq!(report.fragments_failed, 1, "{report}");
    env.cleanup().await;
}
