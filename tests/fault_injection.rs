//! The proof of pgfresh's promise: once the last change to a row has committed, its fragments show it,
//! whatever happened in between.
//!
//! On a PostgreSQL cluster and a Redis server of its own, filled by a first sweep, writers make random
//! changes to the shop while the test, in turn, SIGKILLs the listener and starts another, terminates
//! its PostgreSQL backends, restarts PostgreSQL, restarts Redis empty, and runs a second listener and a
//! one-off sweep at once. After each of the first three faults, which no sweep follows, the writers
//! pause and every product's fragments must equal a fresh render of its rows, with no fragment left
//! for a deleted product: the periodic sweep is off, so only the listener's own mechanisms (the
//! queue, reconnects) can have kept them so. The last two faults sweep; the same check ends the test.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::product_card::{Card, KEY_PREFIX, ProductCard};
use common::servers::{TempPostgres, TempRedis};
use common::shop_binary;
use pgfresh::Database;
use pgfresh::Fragment;
use pgfresh::Variant;
use pgfresh::tokio_postgres::{self, NoTls};

const PRODUCTS: i64 = 60;
/// How long writers run between two faults.
const BETWEEN_FAULTS: Duration = Duration::from_millis(1500);
const WRITERS: usize = 3;

struct Cluster {
    pg: TempPostgres,
    redis: TempRedis,
    database_url: String,
    logs: PathBuf,
    started: usize,
}

impl Cluster {
    /// Starts `shop listen` (no periodic sweep, quick polling), logging to a file of its own.
    fn start_listener(&mut self) -> Child {
        self.started += 1;
        let log = std::fs::File::create(self.logs.join(format!("listener-{}.log", self.started)))
            .unwrap();
        Command::new(shop_binary())
            .args([
                "listen",
                "--sweep-interval",
                "0",
                "--poll-interval",
                "200ms",
                "--batch-size",
                "50",
            ])
            .env("DATABASE_URL", &self.database_url)
            .env("REDIS_URL", self.redis.url())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("shop listen starts")
    }

    fn sweep(&self) -> std::process::Output {
        common::servers::output_within(
            Command::new(shop_binary())
                .arg("sweep")
                .env("DATABASE_URL", &self.database_url)
                .env("REDIS_URL", self.redis.url()),
            Duration::from_secs(120),
        )
    }
}

async fn connect(url: &str) -> Option<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.ok()?;
    tokio::spawn(connection);
    Some(client)
}

/// One random change to the shop; returns whether it committed (errors during faults are expected).
async fn random_change(
    db: &mut tokio_postgres::Client,
    next_id: &AtomicI64,
) -> Result<bool, tokio_postgres::Error> {
    let product = fastrand::i64(1..next_id.load(Ordering::Relaxed));
    let other = fastrand::i64(1..next_id.load(Ordering::Relaxed));
    let txn = db.transaction().await?;
    // Inserts outnumber deletes, so the shop keeps products to change.
    match fastrand::u8(0..12) {
        0..=2 => {
            let name = format!("Product {product} <v{}>", fastrand::u16(..));
            txn.execute(
                "UPDATE products SET name = $2, price_cents = $3 WHERE id = $1",
                &[&product, &name, &fastrand::i32(1..100_000)],
            )
            .await?;
        }
        3 | 4 => {
            let id = next_id.fetch_add(1, Ordering::Relaxed);
            txn.execute(
                "INSERT INTO products (id, name, description, price_cents) VALUES ($1, 'New ' || $1, 'Fresh & new', 100)",
                &[&id],
            )
            .await?;
        }
        5 => {
            txn.execute("DELETE FROM products WHERE id = $1", &[&product])
                .await?;
        }
        6 | 7 => {
            txn.execute(
                "INSERT INTO reviews (product_id, author, rating, body) SELECT id, 'W', $2, 'Review \"' || $3 || '\"' FROM products WHERE id = $1",
                &[&product, &fastrand::i16(1..=5), &fastrand::u32(..).to_string()],
            )
            .await?;
        }
        8 => {
            txn.execute(
                "UPDATE reviews SET rating = $2, body = 'edited ' || id WHERE id = (SELECT min(id) FROM reviews WHERE product_id = $1)",
                &[&product, &fastrand::i16(1..=5)],
            )
            .await?;
        }
        9 => {
            txn.execute("DELETE FROM reviews WHERE id = (SELECT max(id) FROM reviews WHERE product_id = $1)", &[&product])
                .await?;
        }
        _ => {
            txn.execute(
                "UPDATE reviews SET product_id = $2 WHERE id = (SELECT max(id) FROM reviews WHERE product_id = $1)
                 AND EXISTS (SELECT FROM products WHERE id = $2)",
                &[&product, &other],
            )
            .await?;
        }
    }
    if fastrand::u8(0..10) == 0 {
        txn.rollback().await?;
        return Ok(false);
    }
    txn.commit().await?;
    Ok(true)
}

/// Tells the writers to stop, or to pause while the test checks freshness.
#[derive(Default)]
struct Writers {
    stop: AtomicBool,
    paused: AtomicBool,
    /// Transactions begun and not yet ended: the writers are quiet when it is 0 while paused.
    in_flight: AtomicUsize,
}

impl Writers {
    /// Pauses the writers and waits until no transaction of theirs is in flight.
    async fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.in_flight.load(Ordering::SeqCst) > 0 {
            assert!(Instant::now() < deadline, "the writers did not pause");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }
}

/// Writes until told to stop, reconnecting through faults; returns how many transactions committed.
async fn writer(url: String, next_id: Arc<AtomicI64>, control: Arc<Writers>) -> u64 {
    let mut committed = 0;
    let mut db = None;
    while !control.stop.load(Ordering::SeqCst) {
        control.in_flight.fetch_add(1, Ordering::SeqCst);
        if control.paused.load(Ordering::SeqCst) {
            control.in_flight.fetch_sub(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        if db
            .as_ref()
            .is_none_or(|c: &tokio_postgres::Client| c.is_closed())
        {
            db = connect(&url).await;
            if db.is_none() {
                control.in_flight.fetch_sub(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        if let Ok(true) = random_change(db.as_mut().unwrap(), &next_id).await {
            committed += 1;
        }
        control.in_flight.fetch_sub(1, Ordering::SeqCst);
        // Pace the load: a few hundred transactions a second across writers.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    committed
}

/// Runs `what` against PostgreSQL until it succeeds (the server may be restarting).
async fn query_until_ok<T, F, Fut>(url: &str, what: F) -> T
where
    F: Fn(tokio_postgres::Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(client) = connect(url).await
            && let Ok(value) = what(client).await
        {
            return value;
        }
        assert!(Instant::now() < deadline, "PostgreSQL did not answer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn refused_writes(url: &str) -> i64 {
    query_until_ok(url, |c| async move {
        Ok(c.query_one(
            "SELECT coalesce(sum(refused_writes), 0)::bigint FROM pgfresh.listeners",
            &[],
        )
        .await?
        .get(0))
    })
    .await
}

/// SIGTERM, then the exit status, which must come within the promised few seconds (generously).
async fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + common::PATIENCE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("a listener still ran {:?} after SIGTERM", common::PATIENCE);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (60 s at most) until the queue is empty and every fragment equals a fresh render of its
/// rows, none left for a deleted product; panics naming `after` otherwise.
async fn assert_fresh(cluster: &Cluster, ever: i64, after: &str) {
    let mut redis = redis::Client::open(cluster.redis.url())
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap();
    let url = &cluster.database_url;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pending: i64 = query_until_ok(url, |c| async move {
            Ok(c.query_one("SELECT count(*) FROM pgfresh.changes", &[])
                .await?
                .get(0))
        })
        .await;
        let problems = if pending == 0 {
            mismatches(url, &mut redis, ever).await
        } else {
            vec![]
        };
        if pending == 0 && problems.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "not fresh 60 s after {after} ({pending} pending); logs in {}:\n{}",
                cluster.logs.display(),
                problems
                    .iter()
                    .take(10)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Lets the writers run for a while, then pauses them and checks that nothing is stale or lost.
async fn write_then_check(cluster: &Cluster, control: &Writers, next_id: &AtomicI64, after: &str) {
    control.resume();
    tokio::time::sleep(BETWEEN_FAULTS).await;
    control.pause().await;
    assert_fresh(cluster, next_id.load(Ordering::SeqCst), after).await;
}

/// Every mismatch between Redis and a fresh render of the current rows; empty when all is fresh.
async fn mismatches(
    url: &str,
    redis: &mut redis::aio::ConnectionManager,
    ever: i64,
) -> Vec<String> {
    let card = ProductCard;
    let client = connect(url).await.expect("PostgreSQL answers");
    let ids: Vec<i64> = (1..ever).collect();
    let rows = card.load(&client, &ids).await.unwrap();
    let mut expected = std::collections::BTreeMap::new();
    for (id, row) in &rows {
        for &variant in Card::ALL {
            expected.insert(
                format!("{KEY_PREFIX}{id}:{}", variant.name()),
                card.render(id, row, variant).into_string(),
            );
        }
    }
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("shop:product_card:*")
        .query_async(redis)
        .await
        .unwrap();
    let mut problems = Vec::new();
    for key in keys.iter().collect::<BTreeSet<_>>() {
        if !expected.contains_key(key) {
            problems.push(format!("{key} exists but its product does not"));
        }
    }
    for (key, html) in &expected {
        let stored: Option<String> = redis::cmd("GET").arg(key).query_async(redis).await.unwrap();
        if stored.as_ref() != Some(html) {
            problems.push(format!("{key} is {stored:?}, fresh render is {html:?}"));
        }
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_is_stale_or_lost_after_kills_disconnects_restarts_and_races() {
    let pg = TempPostgres::start();
    let redis = TempRedis::start();
    let logs = std::env::temp_dir().join(format!("pgfresh-faults-{}", std::process::id()));
    std::fs::create_dir_all(&logs).unwrap();
    let admin = connect(&pg.url("postgres")).await.unwrap();
    admin.batch_execute("CREATE DATABASE shop").await.unwrap();
    let database_url = pg.url("shop");
    common::setup::setup(&Database::new(&database_url, 2).unwrap(), PRODUCTS)
        .await
        .unwrap();
    let mut cluster = Cluster {
        pg,
        redis,
        database_url: database_url.clone(),
        logs,
        started: 0,
    };

    // Fill Redis first (the one-off sweep sets the marker): no listener sweeps until fault 4.
    let fill = cluster.sweep();
    assert!(
        fill.status.success(),
        "{}",
        String::from_utf8_lossy(&fill.stderr)
    );

    let next_id = Arc::new(AtomicI64::new(PRODUCTS + 1));
    let control = Arc::new(Writers::default());
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            tokio::spawn(writer(
                database_url.clone(),
                next_id.clone(),
                control.clone(),
            ))
        })
        .collect();
    let mut listener = cluster.start_listener();
    let mut refused = 0;
    let mut faults = 0;

    // 1. SIGKILL the listener mid-work, start another.
    tokio::time::sleep(BETWEEN_FAULTS).await;
    refused += refused_writes(&database_url).await;
    listener.kill().unwrap();
    listener.wait().unwrap();
    listener = cluster.start_listener();
    faults += 1;
    write_then_check(&cluster, &control, &next_id, "a SIGKILLed listener").await;

    // 2. Terminate every pgfresh backend.
    control.resume();
    tokio::time::sleep(BETWEEN_FAULTS).await;
    query_until_ok(&database_url, |c| async move {
        c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'pgfresh%'", &[])
            .await
    })
    .await;
    faults += 1;
    write_then_check(&cluster, &control, &next_id, "terminated backends").await;

    // 3. Restart PostgreSQL abruptly.
    control.resume();
    tokio::time::sleep(BETWEEN_FAULTS).await;
    refused += refused_writes(&database_url).await;
    cluster.pg.restart();
    faults += 1;
    write_then_check(&cluster, &control, &next_id, "a PostgreSQL restart").await;

    // 4. Restart Redis empty: the listener sweeps what is missing.
    control.resume();
    tokio::time::sleep(BETWEEN_FAULTS).await;
    cluster.redis.start_again();
    faults += 1;

    // 5. A second listener and a one-off sweep, at the same time as the first.
    tokio::time::sleep(BETWEEN_FAULTS).await;
    let mut second = cluster.start_listener();
    let sweep = cluster.sweep();
    assert!(
        sweep.status.success(),
        "sweep: {}",
        String::from_utf8_lossy(&sweep.stderr)
    );
    faults += 1;

    tokio::time::sleep(BETWEEN_FAULTS).await;
    control.stop.store(true, Ordering::SeqCst);
    let mut committed = 0;
    for writer in writers {
        committed += tokio::time::timeout(common::PATIENCE, writer)
            .await
            .expect("writers stop")
            .unwrap();
    }
    assert_fresh(&cluster, next_id.load(Ordering::SeqCst), "the last fault").await;
    let parked: i64 = query_until_ok(&database_url, |c| async move {
        Ok(c.query_one("SELECT count(*) FROM pgfresh.failed", &[])
            .await?
            .get(0))
    })
    .await;
    assert_eq!(parked, 0, "no change was parked");

    refused += refused_writes(&database_url).await;
    for child in [&mut listener, &mut second] {
        assert!(
            terminate(child).await.success(),
            "listeners exit 0 on SIGTERM"
        );
    }
    let products: i64 = query_until_ok(&database_url, |c| async move {
        Ok(c.query_one("SELECT count(*) FROM products", &[])
            .await?
            .get(0))
    })
    .await;
    println!(
        "fault injection: {committed} committed transactions, {faults} faults, {refused} refused stale writes, {products} products fresh"
    );
    if std::env::var_os("PGFRESH_KEEP_LOGS").is_none() {
        let _ = std::fs::remove_dir_all(&cluster.logs);
    }
}
