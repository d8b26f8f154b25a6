//! Fragments stored in Django's cache format and with a TTL: every guarantee of the plain format
//! (version-checked writes, deletes, the sweep's orphans and markers, `render`, the command line's
//! flags) holds there too. Django itself reading these entries is `tests/django.rs`.

mod common;

use std::time::Duration;

use common::cli::{assert_one_clear_error, run, stderr, stdout};
use common::product_card::ProductCard;
use common::{TestEnv, eventually, redis_url, shop_binary, test_settings, tweak};
use pgfresh::{Fragments, Storage};

/// What Python's `pickle.dumps(SafeString(html), 2)` loads from, written out by hand (not by
/// pgfresh's encoder): PROTO 2, GLOBAL, BINUNICODE with a little-endian length, TUPLE1, NEWOBJ, STOP.
fn pickled(html: &str) -> Vec<u8> {
    let mut bytes = b"\x80\x02cdjango.utils.safestring\nSafeString\nX".to_vec();
    bytes.extend_from_slice(&(html.len() as u32).to_le_bytes());
    bytes.extend_from_slice(html.as_bytes());
    bytes.extend_from_slice(b"\x85\x81.");
    bytes
}

async fn raw(env: &TestEnv, key: &str) -> Option<Vec<u8>> {
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut env.sink.connection())
        .await
        .unwrap()
}

async fn pttl(env: &TestEnv, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut env.sink.connection())
        .await
        .unwrap()
}

/// The Django key of one of this test's cards, with Django's default KEY_PREFIX and VERSION.
fn django_key(env: &TestEnv, id: i64, variant: &str) -> String {
    format!(":1:{}", env.key(id, variant))
}

/// A full sweep of these fragments in this test's database.
async fn sweep(env: &TestEnv, fragments: Fragments) -> pgfresh::SweepReport {
    pgfresh::sweep(
        &env.db,
        &env.sink,
        &fragments,
        &Default::default(),
        &pgfresh::Shutdown::new(),
    )
    .await
    .unwrap()
}

fn django_fragments(env: &TestEnv, storage: Storage) -> Fragments {
    Fragments::new().with_storage(&env.prefix, ProductCard, storage)
}

/// Waits until the Django entry of a card holds the pickle of a fresh render, or is gone with its
/// product.
async fn wait_fresh_django(env: &TestEnv, id: i64) {
    for variant in ["compact", "full"] {
        let key = django_key(env, id, variant);
        eventually(&format!("{key} to be fresh"), || async {
            let fresh = env.fresh_render(id, variant).await;
            raw(env, &key).await == fresh.as_deref().map(pickled)
        })
        .await;
    }
}

#[tokio::test]
async fn the_listener_writes_and_deletes_djangos_keys_and_nothing_plain() {
    let env = TestEnv::shop(5).await;
    let port = common::servers::free_port();
    let settings = tweak(test_settings(), |s| {
        s.http = Some(format!("127.0.0.1:{port}"))
    });
    let listener =
        env.start_listener_with(django_fragments(&env, Storage::django("", 1)), settings);
    // The marker the test set is the plain prefix's: the Django one is missing, so the listener
    // sweeps at start, filling entries whose rows never change.
    wait_fresh_django(&env, 1).await;
    let (_, page) = common::servers::http_get(port, "/").await;
    assert!(
        page.contains(&format!(
            "<code>:1:{}* (django (KEY_PREFIX &quot;&quot;, VERSION 1))</code>",
            env.prefix
        )),
        "{page}"
    );
    let db = env.client().await;
    db.batch_execute(
        "UPDATE products SET name = 'Tom & \"Jerry\" <l''été>' WHERE id = 2;
         INSERT INTO reviews (product_id, author, rating, body) VALUES (3, 'Zoë', 5, '✓ <b>');",
    )
    .await
    .unwrap();
    wait_fresh_django(&env, 2).await;
    wait_fresh_django(&env, 3).await;
    assert!(
        env.fresh_render(2, "full")
            .await
            .unwrap()
            .contains("Tom &amp; &quot;Jerry&quot; &lt;l'été&gt;"),
        "the hostile name is in the render"
    );
    assert_eq!(
        env.keys().await,
        Vec::<String>::new(),
        "no plain key written"
    );

    db.batch_execute("DELETE FROM reviews WHERE product_id = 4; DELETE FROM products WHERE id = 4")
        .await
        .unwrap();
    wait_fresh_django(&env, 4).await;
    assert_eq!(raw(&env, &django_key(&env, 4, "full")).await, None);
    listener.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_sweep_in_djangos_format_repairs_deletes_orphans_and_sets_its_own_marker() {
    let env = TestEnv::shop(4).await;
    let storage = Storage::django("site", 3);
    let fragments = django_fragments(&env, storage.clone());
    let key = |id: i64, variant: &str| format!("site:3:{}", env.key(id, variant));
    // Before the sweep: an entry the site wrote itself (a stale value), an orphan under the
    // fragment's Django prefix, and a plain entry, which is not under it and stays.
    env.set(&key(1, "full"), "stale").await;
    env.set(&key(99, "full"), "orphan").await;
    env.set(&env.key(99, "full"), "plain, not pgfresh's in this format")
        .await;

    let report = sweep(&env, fragments).await;
    assert!(report.succeeded(), "{report}");
    assert_eq!(report.orphans_deleted, 1, "{report}");
    for id in 1..=4 {
        for variant in ["compact", "full"] {
            let fresh = env.fresh_render(id, variant).await.unwrap();
            assert_eq!(raw(&env, &key(id, variant)).await, Some(pickled(&fresh)));
        }
    }
    assert_eq!(raw(&env, &key(99, "full")).await, None, "orphan deleted");
    assert_eq!(
        env.get(&env.key(99, "full")).await.as_deref(),
        Some("plain, not pgfresh's in this format")
    );
    let marker = format!("pgfresh:fragment:site:3:{}", env.prefix);
    assert_eq!(
        env.get(&marker).await.as_deref(),
        Some("1"),
        "marker of the Django prefix"
    );

    // The stored HTML reads back through the same storage, as the demo reads it.
    let html = env
        .sink
        .get_entries(&storage, &[env.key(2, "compact")])
        .await
        .unwrap();
    assert_eq!(html, [env.fresh_render(2, "compact").await]);
    env.cleanup().await;
}

#[tokio::test]
async fn a_ttl_is_set_on_every_write_renewed_by_the_sweep_and_dropped_with_the_flag() {
    let env = TestEnv::shop(2).await;
    let hour = Duration::from_secs(3700);
    let with_ttl = django_fragments(&env, Storage::django("", 1).with_ttl(hour));
    let key = django_key(&env, 1, "full");
    sweep(&env, with_ttl.clone()).await;
    let first = pttl(&env, &key).await;
    assert!(first > 3_600_000 && first <= 3_700_000, "PTTL {first}");

    // An unchanged entry has its TTL renewed, not left to run out.
    let _: () = redis::cmd("PEXPIRE")
        .arg(&key)
        .arg(5_000)
        .query_async(&mut env.sink.connection())
        .await
        .unwrap();
    let report = sweep(&env, with_ttl.clone()).await;
    assert_eq!(report.stats.written, 0, "nothing changed: {report}");
    assert!(pttl(&env, &key).await > 3_600_000, "TTL renewed");

    // A listener whose periodic sweep could not renew entries before they expire is refused.
    for sweep_interval in [None, Some(Duration::from_secs(1800))] {
        let refused = pgfresh::listen(
            env.db.clone(),
            env.sink.clone(),
            with_ttl.clone(),
            tweak(test_settings(), |s| s.sweep_interval = sweep_interval),
            pgfresh::Shutdown::new(),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            refused.contains("sweep at least every 20m 33s (a third of the TTL"),
            "{refused}"
        );
    }

    // The listener's writes carry it too.
    let settings = tweak(test_settings(), |s| {
        s.sweep_interval = Some(Duration::from_secs(1200))
    });
    let listener = env.start_listener_with(with_ttl, settings);
    env.client()
        .await
        .batch_execute("UPDATE products SET price_cents = price_cents + 1 WHERE id = 2")
        .await
        .unwrap();
    wait_fresh_django(&env, 2).await;
    assert!(pttl(&env, &django_key(&env, 2, "compact")).await > 3_600_000);
    listener.stop().await;
    // Tickets outlive their entries by a day, then go too.
    let ticket = pttl(&env, &pgfresh::testing::ticket_key(&env.sink, &key)).await;
    assert!(
        ticket > 3_700_000 && ticket <= 3_700_000 + 86_400_000,
        "ticket PTTL {ticket}"
    );

    // Without a TTL, what is written has none.
    env.client()
        .await
        .batch_execute("UPDATE products SET price_cents = price_cents + 1 WHERE id = 1")
        .await
        .unwrap();
    sweep(&env, django_fragments(&env, Storage::django("", 1))).await;
    assert_eq!(pttl(&env, &key).await, -1, "no TTL any more");
    assert_eq!(
        pttl(&env, &pgfresh::testing::ticket_key(&env.sink, &key)).await,
        -1
    );
    env.cleanup().await;
}

#[tokio::test]
async fn the_shops_flags_and_environment_choose_the_format() {
    let env = TestEnv::shop(3).await;
    let name = &env.name;
    let shop = shop_binary();
    let redis = redis_url();
    let flags = [
        "--cache-format",
        "django",
        "--cache-key-prefix",
        name.as_str(),
        "--cache-version",
        "2",
        "--cache-ttl",
        "1h",
    ];
    let sweep = run(&shop, &env.url, &redis, &[&["sweep"], &flags[..]].concat());
    assert!(sweep.status.success(), "{}", stderr(&sweep));
    let key = |id: i64, variant: &str| format!("{name}:2:shop:product_card:{id}:{variant}");
    let fresh = env.fresh_render(3, "full").await.unwrap();
    assert_eq!(raw(&env, &key(3, "full")).await, Some(pickled(&fresh)));
    assert!(pttl(&env, &key(3, "full")).await > 3_500_000);

    // The same through the environment, as a service's unit file would set it.
    let by_env = std::process::Command::new(&shop)
        .args(["render", "product_card", "3", "--variant", "full"])
        .env("DATABASE_URL", &env.url)
        .env("PGFRESH_CACHE_FORMAT", "django")
        .env("PGFRESH_CACHE_KEY_PREFIX", name)
        .env("PGFRESH_CACHE_VERSION", "2")
        .env("PGFRESH_CACHE_TTL", "1h")
        .output()
        .unwrap();
    assert!(by_env.status.success(), "{}", stderr(&by_env));
    assert_eq!(stdout(&by_env).trim_end(), fresh, "render prints the HTML");
    assert_eq!(
        stderr(&by_env).trim(),
        format!(
            "stored in Redis at {} (django (KEY_PREFIX \"{name}\", VERSION 2), TTL 1h)",
            key(3, "full")
        )
    );

    let forgot_format = run(
        &shop,
        &env.url,
        &redis,
        &["sweep", "--cache-key-prefix", name],
    );
    assert_one_clear_error(&forgot_format, "add --cache-format django");
    // Django reads `?db=5`; pgfresh would not, and would write where the site never reads.
    let db_parameter = run(
        &shop,
        &env.url,
        "redis://127.0.0.1:6379?db=5",
        &["sweep", "--cache-format", "django"],
    );
    assert_one_clear_error(&db_parameter, "select the database with a /N path");
    let bad_format = run(&shop, &env.url, &redis, &["sweep", "--cache-format", "php"]);
    assert!(!bad_format.status.success());
    assert!(
        stderr(&bad_format).contains("possible values: plain, django"),
        "{}",
        stderr(&bad_format)
    );
    env.cleanup().await;
}

#[test]
fn prefixes_that_overlap_where_they_are_stored_are_refused() {
    // Registered apart, but Django's key puts the second inside the first's prefix.
    let fragments = Fragments::new().with("x:1:", ProductCard).with_storage(
        "shop:product_card:",
        common::AlteredCard::new("card_two", 1),
        Storage::django("x", 1),
    );
    let error = fragments.validate().unwrap_err().to_string();
    assert!(error.contains("overlaps that of product_card"), "{error}");

    // Apart as registered; overlapping once the command line stores the first in Django's format.
    let fragments = Fragments::new().with("a:", ProductCard).with_storage(
        ":1:",
        common::AlteredCard::new("card_two", 1),
        Storage::plain(),
    );
    assert!(fragments.validate().is_ok());
    let error = fragments
        .stored_as(&Storage::django("", 1))
        .validate()
        .unwrap_err()
        .to_string();
    assert!(error.contains("key prefix \":1:\" overlaps"), "{error}");
}

#[tokio::test]
async fn a_listener_refuses_to_start_while_another_stores_its_fragment_elsewhere_or_nests_prefixes()
{
    let env = TestEnv::shop(2).await;
    let plain = env.start_listener(test_settings());
    eventually("the plain listener to register", || async {
        env.registered_listeners().await == 1
    })
    .await;
    let django = env.start_listener_with(
        django_fragments(&env, Storage::django("", 1)),
        test_settings(),
    );
    let refused = tokio::time::timeout(common::PATIENCE, django.task)
        .await
        .expect("the second listener gives up at once")
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains(&format!(
            "stores fragment product_card at {}* (plain), and this one would store it at :1:{}* (django)",
            env.prefix, env.prefix
        )),
        "{refused}"
    );
    assert_eq!(env.registered_listeners().await, 1, "it did not register");

    // `status` says where each listener stores what it renders.
    let status = run(&shop_binary(), &env.url, &redis_url(), &["status"]);
    assert!(
        stdout(&status).contains(&format!(
            "rendering product_card v1 at {}* (plain)",
            env.prefix
        )),
        "{}",
        stdout(&status)
    );

    // Nor may another fragment live under a prefix inside this one's: each sweep would delete the
    // other's entries as orphans.
    let inside = format!("{}extra:", env.prefix);
    let nested = env.start_listener_with(
        Fragments::new().with(&inside, common::AlteredCard::new("other_card", 1)),
        test_settings(),
    );
    let refused = tokio::time::timeout(common::PATIENCE, nested.task)
        .await
        .expect("the nested listener gives up at once")
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains(&format!(
            "stores fragment product_card under {:?}, which overlaps other_card's {inside:?}",
            env.prefix
        )),
        "{refused}"
    );

    // Once the plain one is gone, the Django one starts.
    plain.stop().await;
    let django = env.start_listener_with(
        django_fragments(&env, Storage::django("", 1)),
        test_settings(),
    );
    eventually("the Django listener to register", || async {
        env.registered_listeners().await == 1
    })
    .await;
    assert!(!django.task.is_finished());
    django.stop().await;
    env.cleanup().await;
}
