//! `listen --serve`: `GET /fragments/{key}` answers from Redis, renders a miss on demand through the
//! checked write, renders from current rows with `?fresh=1`, shares one render among concurrent
//! misses, never lets an older on-demand render overwrite a newer one, and makes each of its error
//! answers; a stampede of slow misses never makes a batch wait for a session.

mod common;

use common::cli::{assert_one_clear_error, run};
use common::product_card::ProductCard;
use common::servers::{TempPostgres, TempRedis, free_port, http_get, http_get_with, http_response};
use common::{
    AlteredCard, RunningListener, SharedFragment, TestEnv, eventually, shop_binary, test_settings,
    tweak,
};
use pgfresh::{Database, Fragments, RedisStore, Shutdown};

/// A listener serving `/fragments` (and its status page) on free ports, with `fragments`.
async fn serving(
    env: &TestEnv,
    fragments: Fragments,
    change: impl FnOnce(&mut pgfresh::ListenSettings),
) -> (RunningListener, u16, u16) {
    let (serve, http) = (free_port(), free_port());
    let settings = tweak(test_settings(), |s| {
        s.serve = Some(format!("127.0.0.1:{serve}"));
        s.http = Some(format!("127.0.0.1:{http}"));
        change(s);
    });
    let listener = env.start_listener_with(fragments, settings);
    eventually("the listener to be ready", || async {
        http_get(http, "/readyz").await.0 == 200
    })
    .await;
    (listener, serve, http)
}

async fn get(port: u16, key: &str) -> (u16, String, String) {
    http_get_with(port, &format!("/fragments/{key}"), &[]).await
}

/// The count the status page gives after `label` on its `/fragments` line.
async fn counted(http: u16, label: &str) -> u64 {
    let (_, page) = http_get(http, "/").await;
    let line = page
        .lines()
        .find(|line| line.contains("GET /fragments (--serve)"))
        .unwrap_or_default()
        .to_string();
    line.split(", ")
        .find(|part| part.contains(label))
        .and_then(|part| {
            part.trim_start_matches(|c: char| !c.is_ascii_digit())
                .split(' ')
                .next()
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

async fn set_price(env: &TestEnv, id: i64, cents: i32) {
    env.client()
        .await
        .execute(
            "UPDATE products SET price_cents = $1 WHERE id = $2",
            &[&cents, &id],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_miss_is_rendered_on_demand_stored_and_then_answered_from_redis() {
    let env = TestEnv::shop(5).await;
    let (listener, serve, http) = serving(&env, env.fragments(), |_| {}).await;
    let key = env.key(3, "full");
    assert_eq!(env.get(&key).await, None, "a cold cache");

    let (status, content_type, body) = get(serve, &key).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(content_type, "text/html; charset=utf-8");
    let fresh = env.fresh_render(3, "full").await.unwrap();
    assert_eq!(body, fresh, "exactly the fragment's render");
    assert_eq!(env.get(&key).await, Some(fresh.clone()), "stored as well");
    assert_eq!(
        env.get(&env.key(3, "compact")).await,
        env.fresh_render(3, "compact").await,
        "with every variant of the key"
    );
    assert_eq!(counted(http, "renders on demand").await, 1);

    // Now a hit: what Redis holds is the answer, byte for byte, with no render.
    let (status, _, again) = get(serve, &key).await;
    assert_eq!((status, again), (200, fresh));
    assert_eq!(counted(http, "answered from Redis").await, 1);
    assert_eq!(counted(http, "renders on demand").await, 1);

    // A key whose row does not exist: 404, nothing stored, not even a delete's ticket (kept a day)
    // for any of its variants: a client asking for ids with no row cannot grow Redis.
    let missing = env.key(999, "full");
    let (status, _, body) = get(serve, &missing).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(env.get(&missing).await, None);
    let mut redis = env.sink.connection();
    let left: Vec<String> = common::test_keys(&mut redis, &format!("{}999:", env.prefix))
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");

    // Keys no fragment owns or that do not parse: 400 with one line saying why.
    for (bad, why) in [
        ("nobody:1:full".to_string(), "no fragment owns"),
        (
            format!("{}abc:full", env.prefix),
            "is not a key of fragment product_card",
        ),
        (format!("{}1:tiny", env.prefix), "has no variant \"tiny\""),
        (format!("{}1", env.prefix), "names no variant"),
        (
            format!("{}03:full", env.prefix),
            "is not how fragment product_card spells",
        ),
    ] {
        let (status, _, body) = get(serve, &bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains(why), "{bad}: {body}");
        assert_eq!(body.trim().lines().count(), 1, "{body}");
    }
    listener.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn fresh_renders_the_committed_change_even_when_redis_holds_the_entry() {
    let env = TestEnv::shop(3).await;
    let (listener, serve, _) = serving(&env, env.fragments(), |_| {}).await;
    let key = env.key(2, "full");
    let (status, _, before) = get(serve, &key).await;
    assert_eq!(status, 200);
    // A change no trigger reports (triggers off for this session), so that only the fresh read can
    // bring it: a plain GET keeps answering what Redis holds.
    env.client()
        .await
        .batch_execute(
            "SET session_replication_role = replica; \
             UPDATE products SET price_cents = 424242 WHERE id = 2",
        )
        .await
        .unwrap();
    let (_, _, cached) = get(serve, &key).await;
    assert_eq!(cached, before, "a hit is Redis's entry");
    let (status, _, fresh) = get(serve, &format!("{key}?fresh=1")).await;
    assert_eq!(status, 200, "{fresh}");
    assert!(fresh.contains("$4242.42"), "{fresh}");
    assert_eq!(env.get(&key).await, Some(fresh), "and Redis agrees");

    // The row deleted, unreported as well: a fresh read deletes every variant Redis held.
    let compact = env.key(2, "compact");
    assert!(env.get(&compact).await.is_some());
    env.client()
        .await
        .batch_execute("SET session_replication_role = replica; DELETE FROM products WHERE id = 2")
        .await
        .unwrap();
    let (status, _, body) = get(serve, &format!("{key}?fresh=1")).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!((env.get(&key).await, env.get(&compact).await), (None, None));
    // A key that never had a row: nothing at all is written for it, not even a delete's ticket
    // (kept a day), so fresh reads of made-up keys cannot grow Redis.
    let (status, _, body) = get(serve, &format!("{}?fresh=1", env.key(999, "full"))).await;
    assert_eq!(status, 404, "{body}");
    let mut redis = env.sink.connection();
    let left: Vec<String> = common::test_keys(&mut redis, &format!("{}999:", env.prefix))
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    listener.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn an_older_on_demand_render_never_overwrites_a_newer_one() {
    let env = TestEnv::shop(3).await;
    let (card, open) = AlteredCard::stalling();
    let fragments = Fragments::new().with(&env.prefix, SharedFragment(card.clone()));
    let (listener, serve, _) = serving(&env, fragments, |_| {}).await;
    let key = env.key(1, "full");
    // The on-demand render takes its ticket, reads its rows, and waits.
    let request = tokio::spawn({
        let key = key.clone();
        async move { get(serve, &key).await }
    });
    eventually("the render to have read its rows", || async {
        card.gate_taken()
    })
    .await;
    // Meanwhile the price changes, and the listener renders the change under a newer ticket.
    set_price(&env, 1, 515_151).await;
    eventually("the listener's newer render", || async {
        env.get(&key)
            .await
            .is_some_and(|html| html.contains("$5151.51"))
    })
    .await;
    // The older render goes on with the rows it saw: its write is refused, and the answer is
    // what Redis holds, the newer render.
    open.send(()).unwrap();
    let (status, _, body) = request.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("$5151.51"),
        "the newer render is the answer: {body}"
    );
    assert!(
        env.get(&key).await.unwrap().contains("$5151.51"),
        "the newer render stays"
    );
    listener.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn too_many_renders_in_flight_are_refused_and_concurrent_misses_share_one_render() {
    let env = TestEnv::shop(3).await;
    let (card, open) = AlteredCard::stalling();
    let fragments = Fragments::new().with(&env.prefix, SharedFragment(card.clone()));
    let (listener, serve, http) = serving(&env, fragments, |s| s.serve_max_pending = 1).await;
    let held = env.key(1, "full");
    let first = tokio::spawn({
        let held = held.clone();
        async move { get(serve, &held).await }
    });
    eventually("the render to have read its rows", || async {
        card.gate_taken()
    })
    .await;
    // Concurrent misses of the same key (another variant included) wait for that render...
    let mut waiting = Vec::new();
    for variant in ["full", "compact", "full"] {
        let key = env.key(1, variant);
        waiting.push(tokio::spawn(async move { get(serve, &key).await }));
    }
    eventually("the misses to join the render in flight", || async {
        counted(http, "waited for a render in flight").await == 3
    })
    .await;
    // ...and a miss of another key would be one render too many: ask again shortly.
    let path = format!("/fragments/{}", env.key(2, "full"));
    let response = http_response(serve, &path, &[]).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 429"), "{response}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    assert!(body.contains("--serve-max-pending"), "{body}");
    open.send(()).unwrap();
    let (status, _, first) = first.await.unwrap();
    assert_eq!(status, 200);
    for (joined, variant) in waiting.into_iter().zip(["full", "compact", "full"]) {
        let (status, _, body) = joined.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(Some(body), env.fresh_render(1, variant).await);
    }
    assert_eq!(first, env.fresh_render(1, "full").await.unwrap());
    assert_eq!(
        counted(http, "renders on demand").await,
        1,
        "one render for four requests"
    );
    assert_eq!(counted(http, "refused").await, 1);
    // With the render done, another key renders again.
    assert_eq!(get(serve, &env.key(2, "full")).await.0, 200);
    listener.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_token_is_required_when_set_and_for_any_address_but_loopback() {
    let env = TestEnv::shop(2).await;
    let (listener, serve, _) = serving(&env, env.fragments(), |s| {
        s.serve_token = Some("s3cret-token".into())
    })
    .await;
    let path = format!("/fragments/{}", env.key(1, "full"));
    for headers in [
        &[][..],
        &["Authorization: Bearer wrong-token"],
        &["Authorization: s3cret-token"],
    ] {
        let (status, _, body) = http_get_with(serve, &path, headers).await;
        assert_eq!(status, 401, "{headers:?}: {body}");
        assert!(!body.contains("s3cret"), "{body}");
    }
    for scheme in ["Bearer", "bearer"] {
        let header = format!("Authorization: {scheme} s3cret-token");
        assert_eq!(
            http_get_with(serve, &path, &[&header]).await.0,
            200,
            "{header}"
        );
    }
    listener.stop().await;

    // Reachable from other machines without a token: refused at start, in one line.
    let out = run(
        &shop_binary(),
        &env.url,
        &common::redis_url(),
        &["listen", "--serve", &format!("0.0.0.0:{}", free_port())],
    );
    assert!(!out.status.success());
    assert_one_clear_error(&out, "give --serve-token");
    env.cleanup().await;
}

#[tokio::test]
async fn postgres_or_redis_unreachable_or_refusing_is_503() {
    let postgres = TempPostgres::start();
    let redis = TempRedis::start();
    let admin = common::connect(&postgres.url("postgres")).await;
    admin.batch_execute("CREATE DATABASE shop").await.unwrap();
    let db = Database::new(&postgres.url("shop"), 4).unwrap();
    common::setup::setup(&db, 3).await.unwrap();
    let sink = RedisStore::connect(&redis.url()).await.unwrap();
    pgfresh::testing::set_fragment_marker(&sink, "shop:product_card:", 1)
        .await
        .unwrap();
    let serve = free_port();
    let shutdown = Shutdown::new();
    let listener = tokio::spawn(pgfresh::listen(
        db,
        sink,
        Fragments::new().with("shop:product_card:", ProductCard),
        tweak(test_settings(), |s| {
            s.serve = Some(format!("127.0.0.1:{serve}"))
        }),
        shutdown.clone(),
    ));
    eventually("the fragment server", || async {
        get(serve, "shop:product_card:1:full").await.0 == 200
    })
    .await;
    postgres.stop();
    let (status, _, body) = get(serve, "shop:product_card:2:full").await;
    assert_eq!(status, 503, "a miss with PostgreSQL down: {body}");
    assert!(body.contains("PostgreSQL"), "{body}");
    assert_eq!(body.trim().lines().count(), 1, "{body}");
    // A hit needs Redis only.
    assert_eq!(get(serve, "shop:product_card:1:full").await.0, 200);
    postgres.start_again();
    // Redis refusing the write (out of memory, noeviction): the render was fine, Redis was not.
    let mut admin_redis = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory", "1", "maxmemory-policy", "noeviction"][..])
        .query_async(&mut admin_redis)
        .await
        .unwrap();
    let (status, _, body) = get(serve, "shop:product_card:3:full").await;
    assert_eq!(status, 503, "Redis refusing the write: {body}");
    assert!(body.contains("Redis refused"), "{body}");
    drop(redis);
    let (status, _, body) = get(serve, "shop:product_card:1:full").await;
    assert_eq!(status, 503, "Redis down: {body}");
    shutdown.cancel();
    let _ = listener.await;
}

#[tokio::test]
async fn a_key_the_fragment_fails_on_is_500_with_its_error_and_other_keys_still_render() {
    let env = TestEnv::shop(3).await;
    // Schema drift: the loader reads the name as text that cannot be NULL.
    env.client()
        .await
        .batch_execute(
            "ALTER TABLE products ALTER name DROP NOT NULL; \
             UPDATE products SET name = NULL WHERE id = 3",
        )
        .await
        .unwrap();
    let (listener, serve, _) = serving(&env, env.fragments(), |_| {}).await;
    let (status, _, body) = get(serve, &env.key(3, "full")).await;
    assert_eq!(status, 500, "{body}");
    assert!(
        body.starts_with("the fragment failed on this key: "),
        "{body}"
    );
    assert_eq!(body.trim().lines().count(), 1, "{body}");
    assert_eq!(env.get(&env.key(3, "full")).await, None, "nothing stored");
    assert_eq!(get(serve, &env.key(2, "full")).await.0, 200);
    listener.stop().await;
    env.cleanup().await;
}

/// A load that meets an error PostgreSQL calls transient (here a lock timeout, while a migration
/// holds the table; a serialization failure or a standby's recovery conflict alike) is not the
/// key's fault: 503 with `Retry-After`, and once the lock is gone the same request renders it.
#[tokio::test]
async fn a_load_that_meets_a_lock_timeout_is_503_with_retry_after_not_a_failure_of_the_key() {
    let env = TestEnv::shop(3).await;
    // A second card, under a prefix of its own, whose loads give up by statement timeout.
    let slow_prefix = format!("{}slow:", env.prefix.trim_end_matches("product_card:"));
    pgfresh::testing::set_fragment_marker(&env.sink, &slow_prefix, 1)
        .await
        .unwrap();
    let fragments = Fragments::new()
        .with(&env.prefix, ImpatientCard("lock_timeout"))
        .with(&slow_prefix, ImpatientCard("statement_timeout"));
    let (listener, serve, _) = serving(&env, fragments, |_| {}).await;
    let key = env.key(2, "full");
    assert_eq!(env.get(&key).await, None, "a cold cache");
    let migration = env.client().await;
    migration
        .batch_execute("BEGIN; LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let response = http_response(serve, &format!("/fragments/{key}"), &[])
        .await
        .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 503"), "{response}");
    assert!(
        head.to_ascii_lowercase().contains("\r\nretry-after: 1\r\n"),
        "{head}"
    );
    assert!(body.contains("lock timeout"), "{body}");
    assert_eq!(body.trim().lines().count(), 1, "{body}");
    // A statement timeout is not transient: one key's load may meet it every time.
    let slow = format!("{slow_prefix}2:full");
    let (status, _, body) = get(serve, &slow).await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("statement timeout"), "{body}");
    migration.batch_execute("COMMIT").await.unwrap();
    let (status, _, body) = get(serve, &key).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Product 2"), "{body}");
    listener.stop().await;
    env.cleanup().await;
}

/// The shop's card, whose loads give up after 200 ms, by the timeout it names
/// (`lock_timeout`, `statement_timeout`).
struct ImpatientCard(&'static str);

impl pgfresh::Fragment for ImpatientCard {
    type Key = i64;
    type Row = <ProductCard as pgfresh::Fragment>::Row;
    type Variant = <ProductCard as pgfresh::Fragment>::Variant;
    type Error = <ProductCard as pgfresh::Fragment>::Error;

    fn name(&self) -> &str {
        match self.0 {
            "lock_timeout" => ProductCard.name(),
            _ => "slow_card",
        }
    }

    fn topics(&self) -> pgfresh::Topics {
        ProductCard.topics()
    }

    async fn load(
        &self,
        db: &pgfresh::tokio_postgres::Client,
        keys: &[i64],
    ) -> pgfresh::Loaded<Self> {
        db.batch_execute(&format!("SET {} = '200ms'", self.0))
            .await?;
        ProductCard.load(db, keys).await
    }

    fn render(&self, key: &i64, row: &Self::Row, variant: Self::Variant) -> maud::Markup {
        ProductCard.render(key, row, variant)
    }

    async fn keys_after(
        &self,
        db: &pgfresh::tokio_postgres::Client,
        after: Option<&i64>,
        limit: i64,
    ) -> Result<Vec<i64>, Self::Error> {
        ProductCard.keys_after(db, after, limit).await
    }
}

#[tokio::test]
async fn a_render_slower_than_serve_wait_is_answered_503_and_goes_on_to_store_its_entry() {
    let env = TestEnv::shop(20).await;
    let fragments = Fragments::new().with(&env.prefix, SlowMissCard);
    let wait = std::time::Duration::from_millis(500);
    let (listener, serve, http) = serving(&env, fragments, |s| s.serve_wait = wait).await;
    let key = env.key(11, "full");
    // Its load takes 5 s: the request stops waiting first, and is told to ask again shortly.
    let response = http_response(serve, &format!("/fragments/{key}"), &[])
        .await
        .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 503"), "{response}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    assert!(body.contains("--serve-wait"), "{body}");
    assert_eq!(body.trim().lines().count(), 1, "{body}");
    assert_eq!(counted(http, "answered 503 before their render").await, 1);
    // The render went on without the request and stored the entry, which is then a hit.
    eventually("the render to store its entry", || async {
        env.get(&key).await.is_some()
    })
    .await;
    let hits = counted(http, "answered from Redis").await;
    let (status, _, body) = get(serve, &key).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Product 11"), "{body}");
    assert_eq!(
        counted(http, "answered from Redis").await,
        hits + 1,
        "answered from Redis"
    );
    listener.stop().await;
    env.cleanup().await;
}

/// The shop's card for products 1 to 10 (the keys its sweep lists); a miss of any other product
/// is rendered too, and its load takes 5 seconds.
struct SlowMissCard;

impl pgfresh::Fragment for SlowMissCard {
    type Key = i64;
    type Row = <ProductCard as pgfresh::Fragment>::Row;
    type Variant = <ProductCard as pgfresh::Fragment>::Variant;
    type Error = <ProductCard as pgfresh::Fragment>::Error;

    fn name(&self) -> &str {
        ProductCard.name()
    }

    fn topics(&self) -> pgfresh::Topics {
        ProductCard.topics()
    }

    async fn load(
        &self,
        db: &pgfresh::tokio_postgres::Client,
        keys: &[i64],
    ) -> pgfresh::Loaded<Self> {
        if keys.iter().any(|&key| key > 10) {
            db.execute("SELECT pg_sleep(5)", &[]).await?;
        }
        ProductCard.load(db, keys).await
    }

    fn render(&self, key: &i64, row: &Self::Row, variant: Self::Variant) -> maud::Markup {
        ProductCard.render(key, row, variant)
    }

    async fn keys_after(
        &self,
        db: &pgfresh::tokio_postgres::Client,
        after: Option<&i64>,
        limit: i64,
    ) -> Result<Vec<i64>, Self::Error> {
        let keys = ProductCard.keys_after(db, after, limit).await?;
        Ok(keys.into_iter().filter(|&key| key <= 10).collect())
    }
}

#[tokio::test]
async fn a_stampede_of_slow_misses_never_makes_a_batch_wait_for_a_session() {
    let env = TestEnv::shop(20).await;
    let (serve, http) = (free_port(), free_port());
    // Pools of three sessions; one worker and one sweep page keep one each.
    let db = Database::new(&env.url, 3).unwrap();
    let settings = tweak(test_settings(), |s| {
        s.serve = Some(format!("127.0.0.1:{serve}"));
        s.http = Some(format!("127.0.0.1:{http}"));
        s.workers = 1;
        s.sweep.concurrency = 1;
    });
    let listener = env.start_listener_on(
        db,
        Fragments::new().with(&env.prefix, SlowMissCard),
        settings,
    );
    eventually("the listener to be ready", || async {
        http_get(http, "/readyz").await.0 == 200
    })
    .await;
    // Three misses at once, each load taking 5 s: as many as the pools hold.
    let misses: Vec<_> = [11, 12, 13]
        .map(|id| {
            let key = env.key(id, "full");
            tokio::spawn(async move { get(serve, &key).await.0 })
        })
        .into_iter()
        .collect();
    eventually("the misses to be rendering", || async {
        let client = env.client().await;
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE '%pg_sleep(5)%' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0) >= 1
    })
    .await;
    // A change meanwhile is applied while every miss is still loading: its batch found a
    // session, though the misses wanted every one of them.
    env.rename(1, "Not held up").await;
    env.wait_name(1, "Not held up").await;
    let answered = misses.iter().filter(|miss| miss.is_finished()).count();
    assert_eq!(
        answered, 0,
        "a miss was answered before the change was applied"
    );
    for miss in misses {
        assert_eq!(miss.await.unwrap(), 200, "each miss is answered in the end");
    }
    listener.stop().await;
    env.cleanup().await;
}

/// A render on demand that waited for its turn while a newer version of the fragment started (a
/// rolling deploy) writes nothing: under a ticket taken after the new version swept, the old markup
/// would win over the new and stay.
#[tokio::test]
async fn a_render_that_waited_through_the_start_of_a_newer_version_writes_no_old_markup() {
    let env = TestEnv::shop(3).await;
    env.sweep().await;
    for id in [1, 2] {
        for variant in ["compact", "full"] {
            env.del(&env.key(id, variant)).await;
        }
    }
    let (serve, http) = (free_port(), free_port());
    // One render at a time (the pools hold one session beyond the listener's own work), and a
    // first load that stalls until the test lets it go.
    let db = Database::new(&env.url, 5).unwrap();
    let settings = tweak(test_settings(), |s| {
        s.serve = Some(format!("127.0.0.1:{serve}"));
        s.http = Some(format!("127.0.0.1:{http}"));
        s.serve_wait = common::PATIENCE;
        s.workers = 1;
        s.sweep.concurrency = 1;
    });
    let (card, open) = AlteredCard::stalling();
    let fragments = Fragments::new().with(&env.prefix, SharedFragment(card.clone()));
    let old = env.start_listener_on(db, fragments, settings);
    eventually("the listener to be ready", || async {
        http_get(http, "/readyz").await.0 == 200
    })
    .await;
    let (first, waiting) = (env.key(1, "full"), env.key(2, "full"));
    let first = tokio::spawn(async move { get(serve, &first).await });
    eventually("the first render to stall", || async { card.gate_taken() }).await;
    let second = tokio::spawn({
        let waiting = waiting.clone();
        async move { get(serve, &waiting).await }
    });
    eventually("the second render to wait for its turn", || async {
        counted(http, "renders on demand").await == 2
    })
    .await;

    // The new version starts: the old listener stands aside, the new one sweeps its markup in.
    let card_v2 = AlteredCard {
        render: |key, row, variant| {
            maud::html! { div class="v2" { (pgfresh::Fragment::render(&ProductCard, key, row, variant)) } }
        },
        ..AlteredCard::new("product_card", 2)
    };
    let new = env.start_listener_with(Fragments::new().with(&env.prefix, card_v2), test_settings());
    let is_new = |html: &Option<String>| {
        html.as_deref()
            .is_some_and(|html| html.starts_with(r#"<div class="v2">"#))
    };
    eventually("the new markup for both keys", || async {
        is_new(&env.get(&env.key(1, "full")).await) && is_new(&env.get(&waiting).await)
    })
    .await;

    // The stalled render goes on (its older ticket loses), and the waiting one gets its turn.
    open.send(()).unwrap();
    let (status, _, body) = second.await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("stands aside"), "{body}");
    first.await.unwrap();
    for id in [1, 2] {
        for variant in ["compact", "full"] {
            let html = env.get(&env.key(id, variant)).await;
            assert!(is_new(&html), "old markup written over the new: {html:?}");
        }
    }
    old.stop().await;
    new.stop().await;
    env.cleanup().await;
}

/// A listener asked to stop (a rolling restart) answers the requests it is rendering for before it
/// returns, rather than resetting their connections.
#[tokio::test]
async fn a_listener_stopped_with_a_request_in_flight_answers_it() {
    let env = TestEnv::shop(3).await;
    env.sweep().await;
    let key = env.key(1, "full");
    env.del(&key).await;
    let (card, open) = AlteredCard::stalling();
    let fragments = Fragments::new().with(&env.prefix, SharedFragment(card.clone()));
    let (listener, serve, _) = serving(&env, fragments, |s| s.serve_wait = common::PATIENCE).await;
    let request = tokio::spawn({
        let key = key.clone();
        async move { get(serve, &key).await }
    });
    eventually("the render to stall", || async { card.gate_taken() }).await;
    listener.shutdown.cancel();
    eventually("the listener to stop accepting requests", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", serve))
            .await
            .is_err()
    })
    .await;
    open.send(()).unwrap();
    let (status, _, body) = request.await.unwrap();
    assert_eq!(status, 200, "answered, not cut: {body:?}");
    assert_eq!(Some(body), env.fresh_render(1, "full").await);
    listener.stop().await;
    env.cleanup().await;
}

/// A render whose request stopped waiting for it (`--serve-wait`) still holds sessions and has an
/// entry to store: a listener asked to stop waits for it (within its grace period).
#[tokio::test]
async fn a_listener_stopped_with_a_render_its_request_gave_up_on_finishes_it_first() {
    let env = TestEnv::shop(20).await;
    let fragments = Fragments::new().with(&env.prefix, SlowMissCard);
    let wait = std::time::Duration::from_millis(100);
    let (listener, serve, _) = serving(&env, fragments, |s| s.serve_wait = wait).await;
    // Its load takes 5 s: the request stops waiting first.
    let key = env.key(11, "full");
    let (status, _, body) = get(serve, &key).await;
    assert_eq!(status, 503, "{body}");
    listener.stop().await;
    assert!(
        env.get(&key).await.is_some(),
        "the render stored its entry before the listener returned"
    );
    env.cleanup().await;
}
