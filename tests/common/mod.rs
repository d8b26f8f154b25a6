//! Test harness: every test gets its own PostgreSQL database and its own Redis key prefix on the local
//! services, so the suite runs in parallel; helpers wait on conditions, never on fixed sleeps.
//!
//! `PGFRESH_TEST_DATABASE_URL` (a database to create test databases from) and `PGFRESH_TEST_REDIS_URL`
//! override the defaults, the local services on their standard ports.

#![allow(dead_code)]

pub mod cli;
#[path = "../../examples/shop/product_card.rs"]
pub mod product_card;
pub mod servers;
#[path = "../../examples/shop/setup.rs"]
pub mod setup;

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use pgfresh::Database;
use pgfresh::ListenSettings;
use pgfresh::Shutdown;
use pgfresh::tokio_postgres::{self, NoTls};
use pgfresh::{Fragment, Fragments};
use pgfresh::{RedisConnection, RedisStore};

use pgfresh::Variant;
use product_card::{Card, ProductCard};
use servers::BoundedOutput;

/// How long a condition may take before a test fails: generous, for a loaded 2-core machine.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The shop example binary, built by `cargo test` next to the test binaries.
pub fn shop_binary() -> std::path::PathBuf {
    let deps = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    deps.parent().unwrap().join("examples").join("shop")
}

pub fn admin_url() -> String {
    std::env::var("PGFRESH_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn redis_url() -> String {
    std::env::var("PGFRESH_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// One test's own database and Redis key prefix.
pub struct TestEnv {
    pub name: String,
    pub url: String,
    pub db: Database,
    pub sink: RedisStore,
    /// The test's product card key prefix, e.g. `t1234_5:shop:product_card:`.
    pub prefix: String,
    redis: RedisConnection,
    /// Where a failed test's Redis keys are deleted from (none for a throwaway server or cluster).
    redis_url: Option<String>,
    /// Set by [`TestEnv::cleanup`]; otherwise dropping the environment cleans up.
    cleaned: bool,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TestEnv {
    /// A fresh, empty database (no pgfresh, no shop) and a unique Redis prefix.
    pub async fn empty() -> TestEnv {
        TestEnv::empty_with_redis(&redis_url()).await
    }

    /// Like [`TestEnv::empty`], on another Redis.
    pub async fn empty_with_redis(redis_url: &str) -> TestEnv {
        let sink = RedisStore::connect(redis_url)
            .await
            .expect("connect to Redis");
        let mut env = TestEnv::empty_with_sink(sink).await;
        env.redis_url = Some(redis_url.to_string());
        env
    }

    /// Like [`TestEnv::empty`], writing through `sink` (another server, a cluster).
    pub async fn empty_with_sink(sink: RedisStore) -> TestEnv {
        TestEnv::create(sink, "").await
    }

    /// Like [`TestEnv::shop`], in a `SQL_ASCII` database, which stores any bytes as text.
    pub async fn shop_sql_ascii(products: i64) -> TestEnv {
        let sink = RedisStore::connect(&redis_url())
            .await
            .expect("connect to Redis");
        let mut env = TestEnv::create(
            sink,
            "ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
        )
        .await;
        env.redis_url = Some(redis_url());
        setup::setup(&env.db, products).await.expect("shop setup");
        pgfresh::testing::set_fragment_marker(&env.sink, &env.prefix, 1)
            .await
            .unwrap();
        env
    }

    async fn create(sink: RedisStore, options: &str) -> TestEnv {
        let name = format!(
            "pgfresh_test_{}_{}_{:04x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst),
            fastrand::u16(..)
        );
        let admin = admin_client().await;
        drop_leftover_databases(&admin).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name} {options}"))
            .await
            .expect("create test database");
        let url = database_url_for(&name);
        let db = Database::new(&url, 16).expect("database url");
        let redis = sink.connection();
        let prefix = format!("{name}:shop:product_card:");
        TestEnv {
            name,
            url,
            db,
            sink,
            prefix,
            redis,
            redis_url: None,
            cleaned: false,
        }
    }

    /// A database with the shop schema, `products` sample products, pgfresh and the watches.
    /// Redis is taken as already filled (the fragment's sweep marker is set), so a listener does not
    /// sweep at start-up; tests of that remove the marker.
    pub async fn shop(products: i64) -> TestEnv {
        TestEnv::shop_with_redis(products, &redis_url()).await
    }

    /// Like [`TestEnv::shop`], on another Redis.
    pub async fn shop_with_redis(products: i64, redis_url: &str) -> TestEnv {
        let sink = RedisStore::connect(redis_url)
            .await
            .expect("connect to Redis");
        let mut env = TestEnv::shop_with_sink(products, sink).await;
        env.redis_url = Some(redis_url.to_string());
        env
    }

    /// Like [`TestEnv::shop`], writing through `sink` (another server, a cluster).
    pub async fn shop_with_sink(products: i64, sink: RedisStore) -> TestEnv {
        let env = TestEnv::empty_with_sink(sink).await;
        setup::setup(&env.db, products).await.expect("shop setup");
        pgfresh::testing::set_fragment_marker(&env.sink, &env.prefix, 1)
            .await
            .expect("set marker");
        env
    }

    /// A full sweep of this test's fragments with `settings`.
    pub async fn try_sweep(
        &self,
        settings: pgfresh::SweepSettings,
    ) -> Result<pgfresh::SweepReport, pgfresh::Error> {
        self.sweep_of(&self.fragments(), settings).await
    }

    /// A full sweep of `fragments` with `settings`, into this test's database and Redis.
    pub async fn sweep_of(
        &self,
        fragments: &Fragments,
        settings: pgfresh::SweepSettings,
    ) -> Result<pgfresh::SweepReport, pgfresh::Error> {
        let shutdown = Shutdown::new();
        pgfresh::sweep(&self.db, &self.sink, fragments, &settings, &shutdown).await
    }

    /// A full sweep of this test's fragments with the default settings.
    pub async fn sweep(&self) -> pgfresh::SweepReport {
        self.try_sweep(Default::default()).await.expect("sweep")
    }

    pub fn marker_key(&self) -> String {
        format!("pgfresh:fragment:{}", self.prefix)
    }

    pub fn fragments(&self) -> Fragments {
        Fragments::new().with(&self.prefix, ProductCard)
    }

    pub fn key(&self, id: i64, variant: &str) -> String {
        format!("{}{id}:{variant}", self.prefix)
    }

    /// A new connection of its own, outside the pool (commits are real commits).
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    /// Reads a key, riding out the reconnect after a Redis restart or a cluster failover.
    pub async fn get(&self, key: &str) -> Option<String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match redis::cmd("GET")
                .arg(key)
                .query_async(&mut self.redis.clone())
                .await
            {
                Ok(value) => return value,
                Err(error)
                    if Instant::now() < deadline
                        && (error.is_io_error()
                            || error.is_connection_dropped()
                            || error.is_timeout()
                            || error.is_cluster_error()) =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => panic!("redis GET {key}: {error}"),
            }
        }
    }

    pub async fn set(&self, key: &str, value: &str) {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async(&mut self.redis.clone())
            .await
            .unwrap();
    }

    pub async fn del(&self, key: &str) {
        let _: () = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut self.redis.clone())
            .await
            .unwrap();
    }

    /// Every Redis key of this test's fragments, sorted.
    pub async fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query_async(&mut self.redis.clone())
            .await
            .unwrap();
        keys.sort();
        keys
    }

    /// What the shop's fragment renders for this product now, straight from the database.
    pub async fn fresh_render(&self, id: i64, variant: &str) -> Option<String> {
        let variant = *Card::ALL
            .iter()
            .find(|v| v.name() == variant)
            .expect("a variant");
        let client = self.client().await;
        let rows = ProductCard.load(&client, &[id]).await.expect("load");
        rows.first()
            .map(|(id, row)| ProductCard.render(id, row, variant).into_string())
    }

    /// Waits until `key` holds what a fresh render says (or is absent when the product is gone).
    pub async fn wait_fresh(&self, id: i64) {
        for variant in ["compact", "full"] {
            let key = self.key(id, variant);
            eventually(&format!("{key} to be fresh"), || async {
                self.get(&key).await == self.fresh_render(id, variant).await
            })
            .await;
        }
    }

    /// Starts a listener for this test's fragments; stop it with the returned token.
    pub fn start_listener(&self, settings: ListenSettings) -> RunningListener {
        self.start_listener_with(self.fragments(), settings)
    }

    /// Starts a listener for these fragments.
    pub fn start_listener_with(
        &self,
        fragments: Fragments,
        settings: ListenSettings,
    ) -> RunningListener {
        self.start_listener_on(self.db.clone(), fragments, settings)
    }

    /// Starts a listener for these fragments on `db` (pools of another size, a pooler's URL).
    pub fn start_listener_on(
        &self,
        db: Database,
        fragments: Fragments,
        settings: ListenSettings,
    ) -> RunningListener {
        let shutdown = Shutdown::new();
        let task = tokio::spawn(pgfresh::listen(
            db,
            self.sink.clone(),
            fragments,
            settings,
            shutdown.clone(),
        ));
        RunningListener { shutdown, task }
    }

    /// Renames product `id`, in a commit of its own.
    pub async fn rename(&self, id: i64, name: &str) {
        self.client()
            .await
            .execute("UPDATE products SET name = $2 WHERE id = $1", &[&id, &name])
            .await
            .unwrap();
    }

    /// Waits until product `id`'s compact card in Redis shows `name`.
    pub async fn wait_name(&self, id: i64, name: &str) {
        let needle = format!("<h2>{name}</h2>");
        eventually(&format!("product {id} to be named {name}"), || async {
            self.get(&self.key(id, "compact"))
                .await
                .is_some_and(|html| html.contains(&needle))
        })
        .await;
    }

    /// Starts a listener serving `--http` on a free port and waits until `/readyz` says ready.
    pub async fn start_listener_with_http(&self) -> (RunningListener, u16) {
        let port = servers::free_port();
        let listener = self.start_listener(tweak(test_settings(), |s| {
            s.http = Some(format!("127.0.0.1:{port}"))
        }));
        eventually("the listener to be ready", || async {
            servers::http_get(port, "/readyz").await.0 == 200
        })
        .await;
        (listener, port)
    }

    /// Renames products `ids` to `<name> <id>`, one commit each, each awaited fresh in Redis.
    pub async fn rename_products(&self, name: &str, ids: std::ops::RangeInclusive<i64>) {
        let client = self.client().await;
        for id in ids {
            client
                .execute(
                    "UPDATE products SET name = $2 || ' ' || id WHERE id = $1",
                    &[&id, &name],
                )
                .await
                .unwrap();
            self.wait_fresh(id).await;
        }
    }

    /// How many listeners are registered in `pgfresh.listeners`.
    pub async fn registered_listeners(&self) -> i64 {
        self.client()
            .await
            .query_one("SELECT count(*) FROM pgfresh.listeners", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// How many changes are parked in `pgfresh.failed`.
    pub async fn parked(&self) -> i64 {
        self.client()
            .await
            .query_one("SELECT count(*) FROM pgfresh.failed", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// The errors of the parked changes, ordered by `order_by`.
    pub async fn parked_errors(&self, order_by: &str) -> Vec<String> {
        self.client()
            .await
            .query(
                &format!("SELECT error FROM pgfresh.failed ORDER BY {order_by}"),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect()
    }

    /// The sum of a column of `pgfresh.listeners` (changes_done, refused_writes).
    pub async fn listener_total(&self, column: &str) -> i64 {
        self.client()
            .await
            .query_one(
                &format!("SELECT coalesce(sum({column}), 0)::bigint FROM pgfresh.listeners"),
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    pub async fn pending(&self) -> i64 {
        self.client()
            .await
            .query_one("SELECT count(*) FROM pgfresh.changes", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// Drops the database and this test's Redis keys: its fragments, and pgfresh's own keys about
    /// them (tickets, tombstones, markers), which all contain the test's unique name.
    /// Best effort on Redis: a test's own throwaway server may be gone already.
    pub async fn cleanup(mut self) {
        self.cleaned = true;
        remove(&self.name, Some(self.redis.clone())).await;
    }
}

/// A test that failed (or forgot [`TestEnv::cleanup`]) still leaves nothing behind. Its runtime may be
/// unwinding, so the cleanup runs on a runtime of its own.
impl Drop for TestEnv {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let name = self.name.clone();
        let redis_url = self.redis_url.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for cleanup");
            runtime.block_on(async {
                let redis = match redis_url {
                    Some(url) => RedisStore::connect(&url).await.ok().map(|s| s.connection()),
                    None => None,
                };
                remove(&name, redis).await;
            });
        })
        .join();
    }
}

/// Deletes the Redis keys naming test `name` and drops its database.
async fn remove(name: &str, redis: Option<RedisConnection>) {
    if let Some(mut redis) = redis
        && let Ok(keys) = test_keys(&mut redis, name).await
    {
        for key in keys {
            let _: Result<(), _> = redis::cmd("DEL").arg(key).query_async(&mut redis).await;
        }
    }
    let admin = admin_client().await;
    let _ = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await;
}

/// Every Redis key that names the test `name`: with KEYS, which a cluster connection sends to every
/// master; tests' Redis databases are small.
pub async fn test_keys(
    redis: &mut RedisConnection,
    name: &str,
) -> Result<Vec<String>, redis::RedisError> {
    redis::cmd("KEYS")
        .arg(format!("*{name}*"))
        .query_async(redis)
        .await
}

/// The one-line error a statement fails with: PostgreSQL's message, and its hint in parentheses.
pub async fn error_of(client: &impl tokio_postgres::GenericClient, sql: &str) -> String {
    let error = client.batch_execute(sql).await.unwrap_err();
    let db = error.as_db_error().expect("a server error");
    match db.hint() {
        Some(hint) => format!("{} ({hint})", db.message()),
        None => db.message().to_string(),
    }
}

/// Runs a SQL file of the repository with psql against `url`, stopping at the first error.
pub fn psql(url: &str, file: &str) -> std::process::Output {
    std::process::Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", file, url])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output_bounded()
        .expect("psql runs")
}

/// `value` changed by `change`: settings are `#[non_exhaustive]`, so tests start from one and
/// change what they need.
pub fn tweak<T>(mut value: T, change: impl FnOnce(&mut T)) -> T {
    change(&mut value);
    value
}

/// Settings for tests: fast polling, no periodic sweep unless a test asks for one.
pub fn test_settings() -> ListenSettings {
    tweak(ListenSettings::default(), |s| {
        s.poll_interval = Duration::from_millis(200);
        s.sweep_interval = None;
    })
}

pub struct RunningListener {
    pub shutdown: Shutdown,
    pub task: tokio::task::JoinHandle<Result<(), pgfresh::Error>>,
}

impl RunningListener {
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("listener stops in time")
            .expect("listener task")
            .expect("listener ran without error");
    }
}

/// The one value `sql` returns: its first row's first column.
pub async fn value<T>(client: &tokio_postgres::Client, sql: &str) -> T
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// Whether a listener has started in `client`'s database: registered, and its LISTEN session,
/// opened after that, the last thing it does before it runs (a stop asked for before that ends its
/// start-up instead).
pub async fn listener_started(client: &tokio_postgres::Client) -> bool {
    let sql = "SELECT EXISTS (SELECT FROM pgfresh.listeners l, pg_stat_activity a
                             WHERE a.datname = current_database() AND a.query LIKE 'LISTEN %'
                               AND a.backend_start >= l.started_at)";
    value(client, sql).await
}

/// Polls `condition` every 20 ms until it holds; fails the test after [`PATIENCE`].
pub async fn eventually<F, Fut>(what: &str, condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_after(Duration::ZERO, what, condition).await
}

/// Like [`eventually`], for a condition that cannot hold before `wait` has passed (a timeout of
/// pgfresh's own): the patience starts after it.
pub async fn eventually_after<F, Fut>(wait: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + wait + PATIENCE;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(connection);
    client
}

async fn admin_client() -> tokio_postgres::Client {
    connect(&admin_url()).await
}

/// The admin URL with its database replaced by `name`.
fn database_url_for(name: &str) -> String {
    let admin = admin_url();
    let base = match admin.rfind('/') {
        Some(slash) if slash > admin.find("://").map_or(0, |i| i + 2) => &admin[..slash],
        _ => admin.as_str(),
    };
    format!("{base}/{name}")
}

/// Drops databases and roles left by test processes that died before cleaning up (their names
/// start with `pgfresh_test_<pid>_`).
async fn drop_leftover_databases(admin: &tokio_postgres::Client) {
    let dead = |name: &str| {
        let pid = name.split('_').nth(2).and_then(|p| p.parse::<u32>().ok());
        pid.is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
    };
    let leftovers = |sql: &'static str| async move {
        admin
            .query(sql, &[])
            .await
            .unwrap()
            .iter()
            .map(|row| row.get::<_, String>(0))
            .filter(|name| dead(name))
            .collect::<Vec<String>>()
    };
    for name in
        leftovers("SELECT datname FROM pg_database WHERE datname LIKE 'pgfresh\\_test\\_%'").await
    {
        let _ = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
    }
    // Their databases are gone, and with them whatever the roles owned or were granted there.
    for name in
        leftovers("SELECT rolname FROM pg_roles WHERE rolname LIKE 'pgfresh\\_test\\_%'").await
    {
        let _ = admin
            .batch_execute(&format!("DROP ROLE IF EXISTS {name}"))
            .await;
    }
}

/// The shop's card with another name, version or markup (user code with a bug in it, or a deploy),
/// and optionally a load that stalls after reading its rows until `gate` fires (a slow render).
pub struct AlteredCard {
    pub name: &'static str,
    pub version: u32,
    pub render: fn(&i64, &product_card::Product, Card) -> maud::Markup,
    pub gate: std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
}

impl AlteredCard {
    pub fn new(name: &'static str, version: u32) -> AlteredCard {
        AlteredCard {
            name,
            version,
            render: |key, row, variant| ProductCard.render(key, row, variant),
            gate: std::sync::Mutex::new(None),
        }
    }

    /// The shop's own card, whose first load stalls after reading its rows until the returned
    /// sender fires (register it as a [`SharedFragment`] to watch [`AlteredCard::gate_taken`]).
    pub fn stalling() -> (
        std::sync::Arc<AlteredCard>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let (open, gate) = tokio::sync::oneshot::channel();
        let card = AlteredCard {
            gate: std::sync::Mutex::new(Some(gate)),
            ..AlteredCard::new("product_card", 1)
        };
        (std::sync::Arc::new(card), open)
    }

    /// Whether a load has read its rows and taken the gate.
    pub fn gate_taken(&self) -> bool {
        self.gate.lock().unwrap().is_none()
    }
}

impl Fragment for AlteredCard {
    type Key = i64;
    type Row = product_card::Product;
    type Variant = Card;
    type Error = tokio_postgres::Error;
    fn name(&self) -> &str {
        self.name
    }
    fn topics(&self) -> pgfresh::Topics {
        ProductCard.topics()
    }
    fn version(&self) -> u32 {
        self.version
    }
    async fn load(&self, db: &tokio_postgres::Client, keys: &[i64]) -> pgfresh::Loaded<Self> {
        let rows = ProductCard.load(db, keys).await?;
        let gate = self.gate.lock().unwrap().take();
        if let Some(gate) = gate {
            let _ = gate.await;
        }
        Ok(rows)
    }
    fn render(&self, key: &i64, row: &Self::Row, variant: Card) -> maud::Markup {
        (self.render)(key, row, variant)
    }
    async fn keys_after(
        &self,
        db: &tokio_postgres::Client,
        after: Option<&i64>,
        limit: i64,
    ) -> Result<Vec<i64>, tokio_postgres::Error> {
        ProductCard.keys_after(db, after, limit).await
    }
}

/// Any fragment shared with the test, which can then look at it while a listener uses it.
pub struct SharedFragment<F>(pub std::sync::Arc<F>);

impl<F: Fragment> Fragment for SharedFragment<F> {
    type Key = F::Key;
    type Row = F::Row;
    type Variant = F::Variant;
    type Error = F::Error;
    fn name(&self) -> &str {
        self.0.name()
    }
    fn topics(&self) -> pgfresh::Topics {
        self.0.topics()
    }
    fn version(&self) -> u32 {
        self.0.version()
    }
    async fn load(&self, db: &tokio_postgres::Client, keys: &[F::Key]) -> pgfresh::Loaded<Self> {
        self.0.load(db, keys).await
    }
    fn render(&self, key: &F::Key, row: &F::Row, variant: F::Variant) -> maud::Markup {
        self.0.render(key, row, variant)
    }
    async fn keys_after(
        &self,
        db: &tokio_postgres::Client,
        after: Option<&F::Key>,
        limit: i64,
    ) -> Result<Vec<F::Key>, F::Error> {
        self.0.keys_after(db, after, limit).await
    }
}

/// The number after `prefix` on a line of Redis's `INFO section` (up to a comma, if any), 0 if no
/// line has it.
pub async fn info_number(connection: &mut RedisConnection, section: &str, prefix: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(connection)
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix(prefix))
        .and_then(|rest| rest.split(',').next()?.trim().parse().ok())
        .unwrap_or(0)
}
