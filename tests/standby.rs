//! Loads from a hot standby (`--replica-url`): a real streaming standby of a throwaway primary, made
//! with `pg_basebackup -R`. With its replay paused, a committed change is applied from the primary
//! (the listener's batches and a one-off sweep's pages alike), never from the standby's older rows;
//! once replay resumes, loads go to the standby; with the standby down, or pointing at a server that
//! is no standby, nothing stops; `doctor` says which.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::cli::{run, stdout};
use common::product_card::{Card, ProductCard};
use common::servers::{TempPgBouncer, TempPostgres, TempRedis, free_port, http_get};
use common::{eventually, shop_binary};
use pgfresh::{Database, Fragment};

const PRODUCTS: i64 = 5;

/// A throwaway primary with the shop installed, and a streaming standby of it that has replayed
/// the shop.
async fn primary_and_standby() -> (TempPostgres, TempPostgres) {
    let primary = TempPostgres::start();
    let admin = common::connect(&primary.url("postgres")).await;
    admin.batch_execute("CREATE DATABASE shop").await.unwrap();
    let db = Database::new(&primary.url("shop"), 2).unwrap();
    common::setup::setup(&db, PRODUCTS).await.unwrap();
    let standby = primary.standby();
    eventually("the standby to have the shop", || async {
        let Ok((client, connection)) =
            tokio_postgres::connect(&standby.url("shop"), tokio_postgres::NoTls).await
        else {
            return false;
        };
        tokio::spawn(connection);
        client
            .query_one("SELECT count(*) FROM products", &[])
            .await
            .is_ok_and(|row| row.get::<_, i64>(0) == PRODUCTS)
    })
    .await;
    (primary, standby)
}

/// A shop listener process on `primary` loading from `standby`, serving its status page on `http`
/// and `/fragments` on [`serve_port`]`(http)`.
fn listener(primary: &str, standby: &str, redis: &str, http: u16) -> Child {
    Command::new(shop_binary())
        .args(["listen", "--http", &format!("127.0.0.1:{http}")])
        .args(["--serve", &format!("127.0.0.1:{}", serve_port(http))])
        .env("DATABASE_URL", primary)
        .env("PGFRESH_REPLICA_URL", standby)
        .env("REDIS_URL", redis)
        .env("RUST_LOG", "pgfresh=info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A [`listener`] of `primary` loading from `standby`, once its status page answers; and the
/// status page's port.
async fn started_listener(
    primary: &TempPostgres,
    standby: &TempPostgres,
    redis: &TempRedis,
) -> (Child, u16) {
    let http = free_port();
    let child = listener(
        &primary.url("shop"),
        &standby.url("shop"),
        &redis.url(),
        http,
    );
    eventually("the status page", || async {
        !standby_line(http).await.is_empty()
    })
    .await;
    (child, http)
}

async fn connect_redis(redis: &TempRedis) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Where the listener whose status page is on `http` serves `/fragments`: a port picked once per
/// status page port.
fn serve_port(http: u16) -> u16 {
    static PORTS: std::sync::Mutex<Vec<(u16, u16)>> = std::sync::Mutex::new(Vec::new());
    let mut ports = PORTS.lock().unwrap();
    if let Some((_, serve)) = ports.iter().find(|(h, _)| *h == http) {
        return *serve;
    }
    let serve = free_port();
    ports.push((http, serve));
    serve
}

/// The standby's line on the status page.
async fn standby_line(http: u16) -> String {
    let (_, page) = http_get(http, "/").await;
    page.lines()
        .find(|line| line.contains("Loads served by the standby"))
        .map(str::to_string)
        .unwrap_or_default()
}

/// How many loads the status page says the standby served.
async fn served_by_standby(http: u16) -> u64 {
    let line = standby_line(http).await;
    line.split("Loads served by the standby ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

async fn set_price(primary: &tokio_postgres::Client, id: i64, cents: i32) {
    primary
        .execute(
            "UPDATE products SET price_cents = $1 WHERE id = $2",
            &[&cents, &id],
        )
        .await
        .unwrap();
}

/// What Redis holds for a product's full card.
async fn card(redis: &mut redis::aio::MultiplexedConnection, id: i64) -> Option<String> {
    redis::cmd("GET")
        .arg(format!("shop:product_card:{id}:full"))
        .query_async(redis)
        .await
        .unwrap()
}

/// The full card rendered from the primary's current rows.
async fn fresh_card(primary: &tokio_postgres::Client, id: i64) -> String {
    let rows = ProductCard.load(primary, &[id]).await.expect("load");
    let (id, row) = rows.first().expect("the product exists");
    ProductCard.render(id, row, Card::Full).into_string()
}

async fn wait_applied(
    what: &str,
    primary: &tokio_postgres::Client,
    redis: &mut redis::aio::MultiplexedConnection,
    id: i64,
) {
    let expected = fresh_card(primary, id).await;
    eventually(what, || {
        let mut redis = redis.clone();
        let expected = expected.clone();
        async move { card(&mut redis, id).await.as_deref() == Some(&expected) }
    })
    .await;
}

/// Changes product `id` until a batch has loaded from the standby (the status page says it is used).
async fn until_used(what: &str, writer: &tokio_postgres::Client, http: u16, id: i64) {
    let mut cents = 60_000;
    eventually(what, || {
        cents += 1;
        async move {
            set_price(writer, id, cents).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            standby_line(http).await.contains(": used,")
        }
    })
    .await;
}

async fn stop(mut child: Child) {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn with_replay_paused_changes_load_from_the_primary_and_once_resumed_from_the_standby() {
    let (primary, standby) = primary_and_standby().await;
    let redis = TempRedis::start();
    let mut redis_client = connect_redis(&redis).await;
    let writer = common::connect(&primary.url("shop")).await;
    let replica = common::connect(&standby.url("shop")).await;

    // A one-off sweep while the standby has not replayed a change: its pages load from the primary.
    replica
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    set_price(&writer, 3, 30_303).await;
    let out = run(
        &shop_binary(),
        &primary.url("shop"),
        &redis.url(),
        &["sweep", "--replica-url", &standby.url("shop")],
    );
    assert!(out.status.success(), "{}", common::cli::stderr(&out));
    assert_eq!(
        card(&mut redis_client, 3).await,
        Some(fresh_card(&writer, 3).await),
        "the sweep wrote the primary's rows, not the paused standby's"
    );

    // The listener, replay still paused: a change is applied from the primary.
    let (child, http) = started_listener(&primary, &standby, &redis).await;
    set_price(&writer, 1, 10_101).await;
    wait_applied("product 1 from the primary", &writer, &mut redis_client, 1).await;
    let line = standby_line(http).await;
    assert!(line.contains("with the standby behind"), "{line}");
    assert!(
        !line.contains(" 0 with the standby behind"),
        "a batch fell back for the paused replay: {line}"
    );
    // The standby still has the old price: what Redis holds was not loaded there.
    let old: i32 = replica
        .query_one("SELECT price_cents FROM products WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(old, 10_101, "replay was paused");
    // A fresh read through GET /fragments, likewise: the primary's rows, not the standby's.
    set_price(&writer, 1, 10_102).await;
    let (status, body) = http_get(
        serve_port(http),
        "/fragments/shop:product_card:1:full?fresh=1",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("$101.02"), "{body}");

    // Replay resumes: loads go to the standby, and changes are still applied.
    replica
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    let before = served_by_standby(http).await;
    let mut cents = 20_000;
    eventually("a batch to load from the standby", || {
        cents += 1;
        let (writer, http) = (&writer, http);
        async move {
            set_price(writer, 2, cents).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            served_by_standby(http).await > before
        }
    })
    .await;
    wait_applied(
        "product 2 after replay resumed",
        &writer,
        &mut redis_client,
        2,
    )
    .await;

    // With nothing in the queue, only GET /fragments loads: its fresh reads go to the standby too.
    eventually("the queue to be empty", || async {
        writer
            .query_one("SELECT count(*) FROM pgfresh.changes", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 0
    })
    .await;
    let before = served_by_standby(http).await;
    let path = "/fragments/shop:product_card:3:full?fresh=1";
    eventually("a fresh read to load from the standby", || async {
        let (status, body) = http_get(serve_port(http), path).await;
        assert_eq!(status, 200, "{body}");
        served_by_standby(http).await > before
    })
    .await;
    stop(child).await;
}

#[tokio::test]
async fn a_standby_that_is_down_or_no_standby_stops_nothing_and_doctor_says_why() {
    let (primary, standby) = primary_and_standby().await;
    let redis = TempRedis::start();
    let mut redis_client = connect_redis(&redis).await;
    let writer = common::connect(&primary.url("shop")).await;

    let doctor = |replica: String| {
        let (primary, redis) = (primary.url("shop"), redis.url());
        async move {
            stdout(&run(
                &shop_binary(),
                &primary,
                &redis,
                &["doctor", "--replica-url", &replica],
            ))
        }
    };
    let report = doctor(standby.url("shop")).await;
    assert!(
        report.contains("ok       standby at postgres://postgres@127.0.0.1:"),
        "{report}"
    );
    // The primary itself is no standby: doctor says so, and a sweep loads from the primary.
    let report = doctor(primary.url("shop")).await;
    assert!(
        report.contains("cannot serve loads: it is not in recovery"),
        "{report}"
    );
    set_price(&writer, 4, 40_404).await;
    let out = run(
        &shop_binary(),
        &primary.url("shop"),
        &redis.url(),
        &["sweep", "--replica-url", &primary.url("shop")],
    );
    assert!(out.status.success(), "{}", common::cli::stderr(&out));
    assert!(
        common::cli::stderr(&out).contains("not loading from the standby"),
        "{}",
        common::cli::stderr(&out)
    );
    assert_eq!(
        card(&mut redis_client, 4).await,
        Some(fresh_card(&writer, 4).await)
    );

    // The standby goes down under a running listener: changes are applied all the same.
    let (child, http) = started_listener(&primary, &standby, &redis).await;
    until_used("the standby in use", &writer, http, 5).await;
    standby.stop();
    set_price(&writer, 5, 50_505).await;
    wait_applied(
        "product 5 with the standby down",
        &writer,
        &mut redis_client,
        5,
    )
    .await;
    let line = standby_line(http).await;
    assert!(line.contains(": not used,"), "{line}");
    let report = doctor(standby.url("shop")).await;
    assert!(
        report.contains("cannot serve loads: cannot connect"),
        "{report}"
    );

    // Back up: it is used again.
    standby.start_again();
    until_used("the standby in use again", &writer, http, 5).await;
    wait_applied(
        "product 5 with the standby back",
        &writer,
        &mut redis_client,
        5,
    )
    .await;
    stop(child).await;
}

#[tokio::test]
async fn a_standby_of_another_cluster_is_never_used() {
    // Two clusters with the shop, each with its own standby; the listener on the first is given
    // the second's standby. Its WAL positions mean nothing to the first primary.
    let ((primary, _own_standby), (_other, other_standby)) =
        tokio::join!(primary_and_standby(), primary_and_standby());
    let redis = TempRedis::start();
    let mut redis_client = connect_redis(&redis).await;
    let report = stdout(&run(
        &shop_binary(),
        &primary.url("shop"),
        &redis.url(),
        &["doctor", "--replica-url", &other_standby.url("shop")],
    ));
    assert!(
        report
            .contains("cannot serve loads: it is a standby of another cluster (system identifier"),
        "{report}"
    );
    let writer = common::connect(&primary.url("shop")).await;
    let (child, http) = started_listener(&primary, &other_standby, &redis).await;
    set_price(&writer, 2, 22_222).await;
    wait_applied("product 2 from the primary", &writer, &mut redis_client, 2).await;
    let line = standby_line(http).await;
    assert!(line.contains("standby of another cluster"), "{line}");
    assert_eq!(served_by_standby(http).await, 0, "{line}");
    stop(child).await;
}

#[tokio::test]
async fn a_standby_behind_a_pooler_that_ignores_startup_settings_serves_no_load() {
    let (primary, standby) = primary_and_standby().await;
    // PgBouncer in transaction pooling in front of the standby, passing the settings pgfresh
    // opens its sessions with over in silence: the replay check and the loads after it could run
    // on different server sessions (of different standbys, behind a pooler that spreads them).
    let Some(bouncer) =
        TempPgBouncer::in_front_of(standby.port, "ignore_startup_parameters = options")
    else {
        return;
    };
    let redis = TempRedis::start();
    let redis_client = connect_redis(&redis).await;
    let writer = common::connect(&primary.url("shop")).await;
    let through = bouncer.url("shop");
    let report = stdout(&run(
        &shop_binary(),
        &primary.url("shop"),
        &redis.url(),
        &["doctor", "--replica-url", &through],
    ));
    assert!(
        report.contains("cannot serve loads: its sessions lack the settings pgfresh opened them with: the URL leads through a connection pooler; give a direct connection to the standby"),
        "{report}"
    );
    // A listener given that URL loads from the primary, and says why on its status page.
    let http = free_port();
    let listener = listener(&primary.url("shop"), &through, &redis.url(), http);
    eventually("the listener to be ready", || async {
        http_get(http, "/readyz").await.0 == 200
    })
    .await;
    set_price(&writer, 2, 20_202).await;
    eventually("the change applied", || async {
        card(&mut redis_client.clone(), 2)
            .await
            .is_some_and(|html| html.contains("$202.02"))
    })
    .await;
    eventually("the standby found unusable", || async {
        standby_line(http)
            .await
            .contains("give a direct connection to the standby")
    })
    .await;
    assert_eq!(
        served_by_standby(http).await,
        0,
        "{}",
        standby_line(http).await
    );
    stop(listener).await;
    drop(bouncer);
}
