//! The proof of pgfresh's promise: once the last change to a row has committed, its fragments show it,
//! whatever happened in between.
//!
//! On a PostgreSQL cluster and a Redis server of its own, writers make random changes to the shop while
//! the test, in turn, SIGKILLs the listener and starts another, terminates its PostgreSQL backends,
//! restarts PostgreSQL, restarts Redis empty, and runs a second listener and a one-off sweep at once.
//! Then writes stop, and every product's fragments must equal a fresh render of its rows, with no
//! fragment left for a deleted product. The periodic sweep is off: only the listener's own mechanisms
//! (the queue, reconnects, the empty-Redis check) can repair anything.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use common::product_card::ProductCard;
use common::servers::{TempPostgres, TempRedis};
use common::shop_binary;
use pgfresh::Fragment;
use pgfresh::db::Database;
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
        Command::new(shop_binary())
            .arg("sweep")
            .env("DATABASE_URL", &self.database_url)
            .env("REDIS_URL", self.redis.url())
            .output()
            .expect("shop sweep runs")
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

/// Writes until told to stop, reconnecting through faults; returns how many transactions committed.
async fn writer(url: String, next_id: Arc<AtomicI64>, stop: Arc<AtomicBool>) -> u64 {
    let mut committed = 0;
    let mut db = None;
    while !stop.load(Ordering::Relaxed) {
        if db
            .as_ref()
            .is_none_or(|c: &tokio_postgres::Client| c.is_closed())
        {
            db = connect(&url).await;
            if db.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        if let Ok(true) = random_change(db.as_mut().unwrap(), &next_id).await {
            committed += 1;
        }
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

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait().unwrap()
}

/// Every mismatch between Redis and a fresh render of the current rows; empty when all is fresh.
async fn mismatches(
    url: &str,
    redis: &mut redis::aio::ConnectionManager,
    ever: i64,
) -> Vec<String> {
    let card = ProductCard::new();
    let client = connect(url).await.expect("PostgreSQL answers");
    let ids: Vec<i64> = (1..ever).collect();
    let rows = card.load(&client, &ids).await.unwrap();
    let mut expected = std::collections::BTreeMap::new();
    for (id, row) in &rows {
        for variant in card.variants() {
            expected.insert(
                card.redis_key(id, variant),
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

    let next_id = Arc::new(AtomicI64::new(PRODUCTS + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| tokio::spawn(writer(database_url.clone(), next_id.clone(), stop.clone())))
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

    // 2. Terminate every pgfresh backend.
    tokio::time::sleep(BETWEEN_FAULTS).await;
    query_until_ok(&database_url, |c| async move {
        c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'pgfresh%'", &[])
            .await
    })
    .await;
    faults += 1;

    // 3. Restart PostgreSQL abruptly.
    tokio::time::sleep(BETWEEN_FAULTS).await;
    refused += refused_writes(&database_url).await;
    cluster.pg.restart();
    faults += 1;

    // 4. Restart Redis empty.
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
    stop.store(true, Ordering::Relaxed);
    let mut committed = 0;
    for writer in writers {
        committed += writer.await.unwrap();
    }

    let mut redis = redis::Client::open(cluster.redis.url())
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap();
    let ever = next_id.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pending: i64 = query_until_ok(&database_url, |c| async move {
            Ok(c.query_one("SELECT count(*) FROM pgfresh.changes", &[])
                .await?
                .get(0))
        })
        .await;
        let problems = if pending == 0 {
            mismatches(&database_url, &mut redis, ever).await
        } else {
            vec![]
        };
        if pending == 0 && problems.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            panic!(
                "not fresh 60 s after writes stopped ({pending} pending); logs in {}:\n{}",
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
    let parked: i64 = query_until_ok(&database_url, |c| async move {
        Ok(c.query_one("SELECT count(*) FROM pgfresh.failed", &[])
            .await?
            .get(0))
    })
    .await;
    assert_eq!(parked, 0, "no change was parked");

    refused += refused_writes(&database_url).await;
    for child in [&mut listener, &mut second] {
        assert!(terminate(child).success(), "listeners exit 0 on SIGTERM");
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
