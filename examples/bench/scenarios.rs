//! The benchmark scenarios. Each prints one line of figures; timing lives here, never in tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use pgfresh::Database;
use pgfresh::RedisStore;
use pgfresh::Shutdown;
use pgfresh::tokio_postgres::{self, NoTls};
use pgfresh::{Fragment, Fragments};
use pgfresh::{ListenSettings, SweepSettings};

use crate::cost::CpuSample;
use crate::product_card::{Card, ProductCard};
use crate::queue_only::{self, QueueOnly};
use pgfresh::Variant;

/// Every benchmark fragment lives under this Redis prefix.
const PREFIX: &str = "bench:product_card:";
/// The table size for everything but the large sweep.
pub(crate) const PRODUCTS: i64 = 20_000;
/// How long each pgbench run lasts.
const PGBENCH_SECONDS: u32 = 10;

pub struct Bench {
    admin_url: String,
    redis_url: String,
    /// The figures issue 14's targets are about, as scenarios measure them.
    targets: Mutex<Vec<Target>>,
}

/// One figure beside its target.
struct Target {
    scenario: &'static str,
    measured: String,
    target: &'static str,
    met: bool,
}

pub(crate) fn fragments() -> Fragments {
    Fragments::new().with(PREFIX, ProductCard)
}

pub(crate) async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Peak resident set size of this process, in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// CPU time (user + system) this process has used.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: u64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// One complete sweep of the shop's fragments with the default settings; fails unless every key
/// was refreshed.
pub(crate) async fn sweep_all(db: &Database, sink: &RedisStore) -> Result<pgfresh::SweepReport> {
    let report = pgfresh::sweep(
        db,
        sink,
        &fragments(),
        &SweepSettings::default(),
        &Shutdown::new(),
    )
    .await?;
    if !report.succeeded() {
        bail!("{report}");
    }
    Ok(report)
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// One catch-up run: how many changes were queued, how long the listener took to drain them, and
/// what that cost.
struct CatchUp {
    queued: i64,
    elapsed: Duration,
    cost: crate::cost::Cost,
    /// Updates at 100/s right after the drain, by the same listener (what was held still held, if
    /// it was), and what they cost.
    after: Latencies,
    after_cost: crate::cost::Cost,
}

impl CatchUp {
    /// `then at 100 updates/s: p50 .., p99 ..; CPU ...`
    fn after(&self) -> String {
        let mut sorted = self.after.latencies.clone();
        sorted.sort();
        format!(
            "then at 100 updates/s: p50 {}, p99 {}; {}",
            ms(percentile(&sorted, 0.50)),
            ms(percentile(&sorted, 0.99)),
            self.after_cost.per_thousand(sorted.len() as f64, "changes")
        )
    }
}

/// What another session holds during a catch-up run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hold {
    Nothing,
    /// A `REPEATABLE READ` transaction's snapshot (a long report): no transaction id, so the
    /// xmin of other sessions' snapshots moves on.
    Snapshot,
    /// A transaction id (a forgotten `BEGIN` that wrote something): every snapshot's xmin stays
    /// at or below it.
    TransactionId,
}

/// A listener running in this process, for the scenarios that measure it.
struct Running {
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<Result<(), pgfresh::Error>>,
}

impl Running {
    async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.task.await??;
        Ok(())
    }
}

impl Bench {
    pub fn new(admin_url: &str, redis_url: &str) -> Bench {
        Bench {
            admin_url: admin_url.into(),
            redis_url: redis_url.into(),
            targets: Mutex::default(),
        }
    }

    /// Says so when the server runs without autovacuum (as this project's CI image does): its
    /// figures then leave out what vacuuming the queue and the tables costs.
    pub async fn note_server_settings(&self) -> Result<()> {
        let client = connect(&self.admin_url).await?;
        let autovacuum: String = client.query_one("SHOW autovacuum", &[]).await?.get(0);
        if autovacuum == "off" {
            println!(
                "note: autovacuum is off on this PostgreSQL server: these figures leave out vacuum's work"
            );
        }
        Ok(())
    }

    fn target(&self, scenario: &'static str, measured: String, target: &'static str, met: bool) {
        self.targets.lock().unwrap().push(Target {
            scenario,
            measured,
            target,
            met,
        });
    }

    /// The figures measured so far beside their targets (BENCHMARKS.md, "Round two"), as a
    /// Markdown table; nothing if no scenario measured one.
    pub fn print_targets(&self) {
        let targets = self.targets.lock().unwrap();
        if targets.is_empty() {
            return;
        }
        println!("\n| scenario | measured | target | |\n| --- | --- | --- | --- |");
        for t in targets.iter() {
            let verdict = if t.met { "met" } else { "missed" };
            println!(
                "| {} | {} | {} | {verdict} |",
                t.scenario, t.measured, t.target
            );
        }
    }

    fn database_url(&self, name: &str) -> String {
        let base = self
            .admin_url
            .rsplit_once('/')
            .map_or(self.admin_url.as_str(), |(base, _)| base);
        format!("{base}/{name}")
    }

    pub(crate) fn admin_url(&self) -> &str {
        &self.admin_url
    }

    pub(crate) fn redis_url(&self) -> &str {
        &self.redis_url
    }

    /// The database `name`, created if missing (benchmark databases are kept for later runs).
    pub(crate) async fn database(&self, name: &str) -> Result<Database> {
        let admin = connect(&self.admin_url)
            .await
            .context("connecting to PostgreSQL")?;
        let exists = admin
            .query_opt("SELECT FROM pg_database WHERE datname = $1", &[&name])
            .await?
            .is_some();
        if !exists {
            admin
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await?;
        }
        Ok(Database::new(&self.database_url(name), 16)?)
    }

    /// The shop with `products` products in a database of its own, pgfresh installed and watching, the
    /// queue empty.
    pub(crate) async fn shop(&self, products: i64) -> Result<(Database, String)> {
        let name = format!("pgfresh_bench_{products}");
        let db = self.database(&name).await?;
        setup_shop(&db, products).await?;
        Ok((db, self.database_url(&name)))
    }

    /// An empty Redis database and a sink on it.
    pub(crate) async fn redis(&self) -> Result<(RedisStore, redis::aio::ConnectionManager)> {
        let sink = RedisStore::connect(&self.redis_url).await?;
        let mut plain = redis::Client::open(self.redis_url.as_str())?
            .get_connection_manager()
            .await?;
        let _: () = redis::cmd("FLUSHDB")
            .arg("ASYNC")
            .query_async(&mut plain)
            .await?;
        Ok((sink, plain))
    }

    /// Starts a listener of the product card here, after telling it Redis is already filled (no
    /// start-up sweep), and waits until it is idle.
    async fn start_listener(&self, db: &Database, sink: &RedisStore, url: &str) -> Result<Running> {
        self.start_listener_of(db, sink, url, Listened::Card).await
    }

    /// Like [`Bench::start_listener`], of the given fragment.
    async fn start_listener_of(
        &self,
        db: &Database,
        sink: &RedisStore,
        url: &str,
        listened: Listened,
    ) -> Result<Running> {
        let listener = spawn_listener_of(db, sink, listened).await?;
        let client = connect(url).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let idle: i64 = client
                .query_one("SELECT count(*) FROM pgfresh.listeners WHERE idle", &[])
                .await?
                .get(0);
            if idle > 0 {
                return Ok(listener);
            }
            if Instant::now() > deadline {
                bail!("the listener did not become idle");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn all(&self) -> Result<()> {
        self.sweep().await?;
        self.latency().await?;
        self.write_overhead().await?;
        self.burst().await?;
        self.catch_up().await?;
        self.fan_out().await?;
        self.cluster().await
    }

    /// Full sweeps, each in a fresh process: of 20,000 products into an empty Redis, again with
    /// nothing changed, and again with 10% of the products changed; of 200,000 products into an
    /// empty Redis and again with nothing changed (peak RSS against the 20,000 runs'); and a naive
    /// per-product rebuild (the cron job's shape).
    pub async fn sweep(&self) -> Result<()> {
        let (_, url) = self.shop(PRODUCTS).await?;
        self.redis().await?;
        let filled = self.sweep_child(PRODUCTS).await?;
        println!("sweep: {PRODUCTS} products into an empty Redis: {filled}");
        let unchanged = self.sweep_child(PRODUCTS).await?;
        println!("sweep: {PRODUCTS} products, nothing changed: {unchanged}");
        let client = connect(&url).await?;
        client
            .batch_execute(
                "UPDATE products SET price_cents = price_cents + 1 WHERE id % 10 = 0;
                 TRUNCATE pgfresh.changes",
            )
            .await?;
        let changed = self.sweep_child(PRODUCTS).await?;
        println!("sweep: {PRODUCTS} products, 10% changed: {changed}");
        self.target(
            "sweep, 20,000 products, nothing changed",
            format!("{:.0} fragments/s", unchanged.rate()),
            "≥ 120,000 fragments/s",
            unchanged.rate() >= 120_000.0,
        );
        self.target(
            "sweep, 20,000 products, 10% changed",
            format!("{:.0} fragments/s", changed.rate()),
            "≥ 100,000 fragments/s",
            changed.rate() >= 100_000.0,
        );
        let cpu = unchanged.cost.total_per_thousand(unchanged.rendered);
        self.target(
            "sweep CPU, all processes, nothing changed",
            format!("{cpu:.1} ms per 1,000 fragments"),
            "≤ 12 ms per 1,000 (1.2 CPU-s per 100,000)",
            cpu <= 12.0,
        );
        let naive = self.naive_rebuild(PRODUCTS).await?;
        println!(
            "sweep: naive per-product rebuild {naive:.0} fragments/s ({:.0}x slower than the sweep with nothing changed)",
            unchanged.rate() / naive
        );

        let large = 10 * PRODUCTS;
        self.shop(large).await?;
        self.redis().await?;
        let swept = self.sweep_child(large).await?;
        println!(
            "sweep: {large} products into an empty Redis: {swept} ({:.2}x the {PRODUCTS}-product run's peak RSS)",
            swept.peak_rss / filled.peak_rss
        );
        self.target(
            "sweep, 200,000 products into an empty Redis (issue 21)",
            format!("{:.0} fragments/s", swept.rate()),
            "≥ 120,000 fragments/s",
            swept.rate() >= 120_000.0,
        );
        // The same sweep again: every entry holds its render, and is only confirmed.
        let again = self.sweep_child(large).await?;
        println!(
            "sweep: {large} products, nothing changed: {again} ({:.2}x the {PRODUCTS}-product run's peak RSS)",
            again.peak_rss / unchanged.peak_rss
        );
        Ok(())
    }

    /// One sweep of `products` in a child process, with what it cost every process.
    async fn sweep_child(&self, products: i64) -> Result<SweepRun> {
        let commands_before = crate::cost::redis_command_micros(&self.redis_url).await?;
        let before = CpuSample::now(&self.redis_url).await?;
        let child = tokio::process::Command::new(std::env::current_exe()?)
            .args([
                "--database-url",
                &self.admin_url,
                "--redis-url",
                &self.redis_url,
            ])
            .args(["--products", &products.to_string(), "sweep-once"])
            .output()
            .await?;
        // The child's PostgreSQL sessions end with it: let the postmaster reap them, so that their
        // CPU time is counted.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let cost = CpuSample::now(&self.redis_url).await?.since(before);
        let commands_after = crate::cost::redis_command_micros(&self.redis_url).await?;
        let out = String::from_utf8_lossy(&child.stdout);
        if !child.status.success() {
            bail!(
                "sweep child failed: {}",
                String::from_utf8_lossy(&child.stderr)
            );
        }
        let figures: Vec<f64> = out
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        let [rendered, written, seconds, peak_rss] = figures[..] else {
            bail!("unexpected sweep child output: {out}")
        };
        let redis_commands = crate::cost::top_commands(&commands_before, &commands_after, rendered);
        Ok(SweepRun {
            rendered,
            written,
            seconds,
            peak_rss,
            cost,
            redis_commands,
        })
    }

    /// Child process: one sweep, printing "rendered written seconds peak_rss_mib".
    pub async fn sweep_once(&self, products: i64) -> Result<()> {
        let db = Database::new(&self.database_url(&format!("pgfresh_bench_{products}")), 16)?;
        let sink = RedisStore::connect(&self.redis_url).await?;
        let report = sweep_all(&db, &sink).await?;
        println!(
            "{} {} {} {}",
            report.stats.rendered,
            report.stats.written,
            report.elapsed.as_secs_f64(),
            peak_rss_mib(),
        );
        Ok(())
    }

    /// What the hourly cron job does: one product at a time, a query, two renders, two SETs. Runs for
    /// three seconds; returns fragments per second.
    async fn naive_rebuild(&self, products: i64) -> Result<f64> {
        let client = connect(&self.database_url(&format!("pgfresh_bench_{products}"))).await?;
        let mut redis = redis::Client::open(self.redis_url.as_str())?
            .get_connection_manager()
            .await?;
        let card = ProductCard;
        let started = Instant::now();
        let mut rendered = 0u64;
        let mut id = 1;
        while started.elapsed() < Duration::from_secs(3) && id <= products {
            for (key, row) in card.load(&client, &[id]).await? {
                for &variant in Card::ALL {
                    let html = card.render(&key, &row, variant).into_string();
                    let _: () = redis::cmd("SET")
                        .arg(format!("bench:naive:{key}:{}", variant.name()))
                        .arg(html)
                        .query_async(&mut redis)
                        .await?;
                    rendered += 1;
                }
            }
            id += 1;
        }
        Ok(rendered as f64 / started.elapsed().as_secs_f64())
    }

    /// Commit-to-Redis latency of UPDATEs at 100 and 1,000 per second over random products.
    pub async fn latency(&self) -> Result<()> {
        let (db, url) = self.shop(PRODUCTS).await?;
        let (sink, _) = self.redis().await?;
        let listener = self
            .start_listener(&db, &sink, &url)
            .await
            .context("starting the listener")?;
        for rate in [100u32, 1000] {
            let (samples, cost) = self.costed_latency(&url, rate, Capture::On).await?;
            let mut sorted = samples.latencies.clone();
            sorted.sort();
            let stale = stale_cards(&db, &sink, &samples.touched).await?;
            println!(
                "latency at {rate}/s: {} updates, p50 {}, p99 {}, max {}{}; {} products touched, {stale} stale after the queue drained; {} (writers and subscriber included)",
                sorted.len(),
                ms(percentile(&sorted, 0.50)),
                ms(percentile(&sorted, 0.99)),
                ms(sorted.last().copied().unwrap_or_default()),
                if samples.missing > 0 {
                    // Keyspace notifications are fire-and-forget: the stale count below tells
                    // whether such an update reached Redis all the same.
                    format!(", {} never seen by the subscriber", samples.missing)
                } else {
                    String::new()
                },
                samples.touched.len(),
                cost.per_thousand(sorted.len() as f64, "changes"),
            );
            let (p50, p99) = (percentile(&sorted, 0.50), percentile(&sorted, 0.99));
            if rate == 100 {
                self.target(
                    "latency at 100 updates/s, before COMMIT → Redis",
                    format!("p50 {}, p99 {}", ms(p50), ms(p99)),
                    "p50 ≤ 1.5 ms, p99 ≤ 5 ms",
                    p50 <= Duration::from_micros(1500) && p99 <= Duration::from_millis(5),
                );
            } else {
                // What the same writers cost with no capture (and so nothing for the listener to
                // do): their own transactions, which no queue can make cheaper.
                let (alone, alone_cost) = self.costed_latency(&url, rate, Capture::Off).await?;
                let updates = alone.updates as f64;
                let split = alone_cost.per_thousand(updates, "updates");
                let alone = alone_cost.total_per_thousand(updates) / 1000.0;
                let all = cost.total_per_thousand(sorted.len() as f64) / 1000.0;
                let added = all - alone;
                println!(
                    "latency at {rate}/s, the same writers with no capture: {split}; pgfresh adds {added:.3} ms per change (capture, listener, Redis, the subscriber's reads)"
                );
                // The subscriber that measures latency reads every card back, and Redis publishes
                // every write to it: a cost of the measurement, not of pgfresh.
                let (unobserved, unobserved_cost) =
                    self.costed_latency(&url, rate, Capture::Unobserved).await?;
                let updates = unobserved.updates as f64;
                let split = unobserved_cost.per_thousand(updates, "changes");
                let bare = unobserved_cost.total_per_thousand(updates) / 1000.0 - alone;
                println!(
                    "latency at {rate}/s, unobserved (no subscriber, no keyspace notifications, until the queue is empty): {split}; pgfresh adds {bare:.3} ms per change (capture, listener, Redis)"
                );
                self.target(
                    "CPU per applied change at 1,000 updates/s, all processes",
                    format!("{all:.2} ms, of which the writers' own {alone:.2}"),
                    "measured, then halved (from 0.6 ms: ≤ 0.3 ms)",
                    all <= 0.3,
                );
                self.target(
                    "CPU pgfresh adds per change at 1,000 updates/s",
                    format!("{added:.3} ms; unobserved {bare:.3} ms"),
                    "halved (0.22-0.29 ms on 2026-12-06: ≤ 0.13 ms)",
                    added <= 0.13,
                );
            }
        }
        listener.stop().await
    }

    /// Runs `rate` UPDATEs a second for 10 s; returns what the run cost every process beside its
    /// figures. With [`Capture::Off`] the writers' sessions fire no trigger
    /// (`session_replication_role = replica`): nothing is queued, nothing is watched, and only
    /// `updates` counts.
    async fn costed_latency(
        &self,
        url: &str,
        rate: u32,
        capture: Capture,
    ) -> Result<(Latencies, crate::cost::Cost)> {
        let before = CpuSample::now(&self.redis_url).await?;
        let run = self.measure_latency(url, rate, capture).await?;
        Ok((run, CpuSample::now(&self.redis_url).await?.since(before)))
    }

    /// The run of [`Bench::costed_latency`], without its cost.
    async fn measure_latency(&self, url: &str, rate: u32, capture: Capture) -> Result<Latencies> {
        let duration = Duration::from_secs(10);
        // seq -> (product, time just before COMMIT); resolved when Redis shows that name or a later one.
        let pending: Arc<Mutex<HashMap<u64, (i64, Instant)>>> = Arc::default();
        let results: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let touched: Arc<Mutex<std::collections::BTreeSet<i64>>> = Arc::default();
        let watcher = match capture {
            Capture::On => Some(
                self.watch_keyspace(pending.clone(), results.clone())
                    .await?,
            ),
            Capture::Unobserved => {
                disable_keyspace_events(&self.redis_url).await?;
                None
            }
            Capture::Off => None,
        };

        let writers = rate.div_ceil(250);
        let mut tasks = Vec::new();
        for writer in 0..writers {
            let client = connect(url).await?;
            if capture == Capture::Off {
                client
                    .batch_execute("SET session_replication_role = replica")
                    .await?;
            }
            let pending = pending.clone();
            let touched = touched.clone();
            let period = Duration::from_secs_f64(f64::from(writers) / f64::from(rate));
            tasks.push(tokio::spawn(async move {
                let mut client = client;
                let mut ticker = tokio::time::interval(period);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let started = Instant::now();
                let mut seq = u64::from(writer) << 40;
                while started.elapsed() < duration {
                    ticker.tick().await;
                    seq += 1;
                    let id = fastrand::i64(1..=PRODUCTS);
                    let txn = client.transaction().await?;
                    txn.execute(
                        "UPDATE products SET name = $2 WHERE id = $1",
                        &[&id, &format!("lat-{seq}")],
                    )
                    .await?;
                    pending.lock().unwrap().insert(seq, (id, Instant::now()));
                    touched.lock().unwrap().insert(id);
                    txn.commit().await?;
                }
                Ok::<u64, anyhow::Error>(seq - (u64::from(writer) << 40))
            }));
        }
        let mut updates = 0;
        for task in tasks {
            updates += task.await?.context("latency writer")?;
        }
        if capture == Capture::Unobserved {
            wait_for_empty_queue(&connect(url).await?).await?;
        }
        let Some(watcher) = watcher else {
            return Ok(Latencies {
                updates,
                ..Latencies::default()
            });
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pending.lock().unwrap().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        watcher.abort();
        let missing = pending.lock().unwrap().len();
        pending.lock().unwrap().clear();
        let latencies = std::mem::take(&mut *results.lock().unwrap());
        let touched = std::mem::take(&mut *touched.lock().unwrap());
        Ok(Latencies {
            updates,
            latencies,
            missing,
            touched,
        })
    }

    /// Subscribes to SETs of compact cards; resolves every pending update the new value covers.
    async fn watch_keyspace(
        &self,
        pending: Arc<Mutex<HashMap<u64, (i64, Instant)>>>,
        results: Arc<Mutex<Vec<Duration>>>,
    ) -> Result<tokio::task::JoinHandle<()>> {
        let client = redis::Client::open(self.redis_url.as_str())?;
        let database = enable_keyspace_events(&client, &self.redis_url).await?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub
            .psubscribe(format!("__keyspace@{database}__:{PREFIX}*:compact"))
            .await?;
        let mut reader = client.get_connection_manager().await?;
        Ok(tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            while let Some(message) = messages.next().await {
                let now = Instant::now();
                let Some(key) = message
                    .get_channel_name()
                    .split_once("__:")
                    .map(|(_, k)| k.to_string())
                else {
                    continue;
                };
                let Ok(Some(html)) = redis::cmd("GET")
                    .arg(&key)
                    .query_async::<Option<String>>(&mut reader)
                    .await
                else {
                    continue;
                };
                let Some((id, seq)) = shown_update(&key, &html) else {
                    continue;
                };
                let mut pending = pending.lock().unwrap();
                // Every update of this product committed no later than the one shown is visible now,
                // whichever writer sent it. (If the shown one was resolved before, so were those.)
                let Some(&(_, shown_at)) = pending.get(&seq) else {
                    continue;
                };
                let done: Vec<u64> = pending
                    .iter()
                    .filter(|(_, (product, committed))| *product == id && *committed <= shown_at)
                    .map(|(s, _)| *s)
                    .collect();
                let mut results = results.lock().unwrap();
                for s in done {
                    if let Some((_, committed)) = pending.remove(&s) {
                        results.push(now.saturating_duration_since(committed));
                    }
                }
            }
        }))
    }

    /// pgbench-style load (8 clients, one-row UPDATEs) with no trigger, with the plainest durable
    /// trigger (`INSERT (topic, key)` into an unindexed table) and with pgfresh's capture, in
    /// interleaved rounds: without a listener, then with one draining the queue. Prints each
    /// variant's TPS, its ratio to no trigger and the PostgreSQL CPU a write adds, beside round
    /// three's targets (the capture within 0.03 of the plain trigger; 0.75 with a listener).
    pub async fn write_overhead(&self) -> Result<()> {
        let (db, url) = self.shop(PRODUCTS).await?;
        let (sink, _) = self.redis().await?;
        let script = std::env::temp_dir().join("pgfresh-bench-update.sql");
        std::fs::write(
            &script,
            format!(
                "\\set id random(1, {PRODUCTS})\nUPDATE products SET price_cents = price_cents + 1 WHERE id = :id;\n"
            ),
        )?;
        let client = connect(&url).await?;
        client.batch_execute(PLAIN_TRIGGER).await?;
        for listened in [None, Some(Listened::Card), Some(Listened::QueueOnly)] {
            let with_listener = listened.is_some();
            let listener = match listened {
                Some(listened) => Some(self.start_listener_of(&db, &sink, &url, listened).await?),
                None => None,
            };
            let started = (cpu_time(), Instant::now());
            let rounds =
                interleave_captures(&client, &url, &script, &self.redis_url, with_listener).await?;
            let listener_share =
                (cpu_time() - started.0).as_secs_f64() / started.1.elapsed().as_secs_f64();
            client
                .batch_execute(&format!(
                    "{NO_CAPTURE} SELECT pgfresh.watch('products', 'id', 'product')"
                ))
                .await?;
            let ratio = |variant: usize| mean(&rounds[variant].tps) / mean(&rounds[0].tps);
            let added = |variant: usize| mean(&rounds[variant].cpu_us) - mean(&rounds[0].cpu_us);
            let (plain, shipped) = (ratio(1), ratio(2));
            let figures: Vec<String> = CAPTURES
                .iter()
                .zip(&rounds)
                .enumerate()
                .map(|(variant, (name, runs))| {
                    format!(
                        "{name}: TPS [{}], ratio {:.2}, +{:.0} µs PostgreSQL CPU per write",
                        joined(&runs.tps, 0),
                        ratio(variant),
                        added(variant)
                    )
                })
                .collect();
            if let Some(listener) = listener {
                wait_for_empty_queue(&client).await?;
                listener.stop().await?;
            }
            if listened == Some(Listened::QueueOnly) {
                println!(
                    "write-overhead (c) listener draining a fragment that loads nothing (8 clients; listener CPU {:.0}% of one core): {}",
                    listener_share * 100.0,
                    figures.join("; ")
                );
            } else if listened == Some(Listened::Card) {
                self.target(
                    "write overhead, listener draining",
                    format!("{shipped:.2}"),
                    "≥ 0.75",
                    shipped >= 0.75,
                );
                println!(
                    "write-overhead (b) listener draining (8 clients; listener CPU {:.0}% of one core): {}",
                    listener_share * 100.0,
                    figures.join("; ")
                );
            } else {
                self.target(
                    "write overhead, no listener: capture against the plain trigger",
                    format!("{shipped:.2} (plain {plain:.2})"),
                    "≥ plain − 0.03",
                    shipped >= plain - 0.03,
                );
                println!(
                    "write-overhead (a) no listener (8 clients): {}",
                    figures.join("; ")
                );
            }
        }
        client
            .batch_execute("TRUNCATE pgfresh.changes, pgfresh_bench.plain_queue")
            .await?;
        Ok(())
    }

    /// 10,000 updates to one product from one client, as fast as it commits them.
    pub async fn burst(&self) -> Result<()> {
        let (db, url) = self.shop(PRODUCTS).await?;
        let (sink, _) = self.redis().await?;
        let listener = self.start_listener(&db, &sink, &url).await?;
        let key = pgfresh::Storage::plain().entry_key(PREFIX, 1, Card::Compact);
        let (renders, recorder) = self.record_sets(&key).await?;
        let mut reader = redis::Client::open(self.redis_url.as_str())?
            .get_connection_manager()
            .await?;
        let writer = connect(&url).await?;
        let update = writer
            .prepare("UPDATE products SET name = $1 WHERE id = 1")
            .await?;
        let before = CpuSample::now(&self.redis_url).await?;
        let started = Instant::now();
        for i in 0..10_000 {
            writer.execute(&update, &[&format!("burst-{i}")]).await?;
        }
        let last_commit = Instant::now();
        let burst = last_commit - started;
        Self::wait_for(&mut reader, &key, "<h2>burst-9999</h2>").await?;
        let settled = last_commit.elapsed();
        let cost = CpuSample::now(&self.redis_url).await?.since(before);
        tokio::time::sleep(Duration::from_millis(100)).await;
        recorder.abort();
        let times = renders.lock().unwrap().clone();
        let during: Vec<&Instant> = times.iter().filter(|t| **t <= last_commit).collect();
        let min_gap = during
            .windows(2)
            .map(|w| w[1].saturating_duration_since(*w[0]))
            .min()
            .unwrap_or_default();
        println!(
            "burst: 10000 updates to one product in {:.2} s: {} renders ({} during the burst, {:.0}/s, closest {} apart); final fragment correct {} after the last commit; {} (the writer included)",
            burst.as_secs_f64(),
            times.len(),
            during.len(),
            during.len() as f64 / burst.as_secs_f64(),
            ms(min_gap),
            ms(settled),
            cost.per_thousand(10_000.0, "updates"),
        );
        listener.stop().await
    }

    /// Records when each SET of `key` happens, until the returned task is aborted.
    async fn record_sets(
        &self,
        key: &str,
    ) -> Result<(Arc<Mutex<Vec<Instant>>>, tokio::task::JoinHandle<()>)> {
        let client = redis::Client::open(self.redis_url.as_str())?;
        let database = enable_keyspace_events(&client, &self.redis_url).await?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub
            .subscribe(format!("__keyspace@{database}__:{key}"))
            .await?;
        let sets: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let recorder = {
            let sets = sets.clone();
            tokio::spawn(async move {
                let mut messages = pubsub.into_on_message();
                while messages.next().await.is_some() {
                    sets.lock().unwrap().push(Instant::now());
                }
            })
        };
        Ok((sets, recorder))
    }

    /// Waits (30 s at most) until `key` holds HTML containing `needle`.
    async fn wait_for(
        reader: &mut redis::aio::ConnectionManager,
        key: &str,
        needle: &str,
    ) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let html: Option<String> = redis::cmd("GET").arg(key).query_async(reader).await?;
            if html.is_some_and(|h| h.contains(needle)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{needle} never reached {key}");
            }
            tokio::task::yield_now().await;
        }
    }

    /// 100,000 changes over 20,000 products queued while no listener runs; then one starts.
    pub async fn catch_up(&self) -> Result<()> {
        let normal = self.catch_up_once(Hold::Nothing).await?;
        println!(
            "catch-up: {} queued changes over {PRODUCTS} products drained in {:.2} s: {:.0} changes/s; {}; {}",
            normal.queued,
            normal.elapsed.as_secs_f64(),
            normal.queued as f64 / normal.elapsed.as_secs_f64(),
            normal.cost.per_thousand(normal.queued as f64, "changes"),
            normal.after()
        );
        // Issue 21's case: another session holds a transaction open for the whole run (a long
        // report, a forgotten BEGIN), so no dead row of the queue can be removed meanwhile; then
        // the same with a transaction id held (a forgotten BEGIN that wrote something, a prepared
        // transaction nobody finished): every snapshot's xmin stays at it.
        for (hold, what) in [
            (Hold::Snapshot, "a transaction held open (xmin pinned)"),
            (
                Hold::TransactionId,
                "a transaction holding a transaction id",
            ),
        ] {
            let held = self.catch_up_once(hold).await?;
            println!(
                "catch-up with {what}: {} queued changes drained in {:.2} s: {:.0} changes/s ({:.2}x the normal run's time); {}; {} (its dead rows still kept)",
                held.queued,
                held.elapsed.as_secs_f64(),
                held.queued as f64 / held.elapsed.as_secs_f64(),
                held.elapsed.as_secs_f64() / normal.elapsed.as_secs_f64(),
                held.cost.per_thousand(held.queued as f64, "changes"),
                held.after()
            );
        }
        Ok(())
    }

    /// Queues five changes to every product, then times a listener draining them, while another
    /// session holds what `hold` says from before the changes until the listener has stopped.
    async fn catch_up_once(&self, hold: Hold) -> Result<CatchUp> {
        let (db, url) = self.shop(PRODUCTS).await?;
        let (sink, _) = self.redis().await?;
        let client = connect(&url).await?;
        client.batch_execute("TRUNCATE pgfresh.changes").await?;
        let holder = connect(&url).await?;
        match hold {
            Hold::Nothing => {}
            Hold::Snapshot => {
                holder
                    .batch_execute(
                        "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM products",
                    )
                    .await?
            }
            Hold::TransactionId => {
                holder
                    .batch_execute("BEGIN; SELECT pg_current_xact_id()")
                    .await?
            }
        }
        for _ in 0..5 {
            client
                .batch_execute("UPDATE products SET price_cents = price_cents + 1")
                .await?;
        }
        let queued: i64 = client
            .query_one("SELECT count(*) FROM pgfresh.changes", &[])
            .await?
            .get(0);
        let before = CpuSample::now(&self.redis_url).await?;
        let started = Instant::now();
        let listener = spawn_listener(&db, &sink).await?;
        wait_for_empty_queue(&client).await?;
        let elapsed = started.elapsed();
        let cost = CpuSample::now(&self.redis_url).await?.since(before);
        let (after, after_cost) = self.costed_latency(&url, 100, Capture::On).await?;
        listener.stop().await?;
        if hold != Hold::Nothing {
            holder.batch_execute("COMMIT").await?;
        }
        Ok(CatchUp {
            queued,
            elapsed,
            cost,
            after,
            after_cost,
        })
    }
}

/// What one sweep child did.
struct SweepRun {
    rendered: f64,
    written: f64,
    seconds: f64,
    peak_rss: f64,
    cost: crate::cost::Cost,
    /// Where Redis's time went, by command (see `cost::top_commands`).
    redis_commands: String,
}

impl SweepRun {
    fn rate(&self) -> f64 {
        self.rendered / self.seconds
    }
}

/// `40000 fragments (4000 written) in 0.31 s: 129000 fragments/s, peak RSS 22.0 MiB; CPU ms per ...;
/// Redis ms per 1,000 by command ...: evalsha 7.6, ...`
impl std::fmt::Display for SweepRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} fragments ({} written) in {:.2} s: {:.0} fragments/s, peak RSS {:.1} MiB; {}; Redis ms per 1,000 by command (a script's own commands also in its evalsha): {}",
            self.rendered,
            self.written,
            self.seconds,
            self.rate(),
            self.peak_rss,
            self.cost.per_thousand(self.rendered, "fragments"),
            self.redis_commands
        )
    }
}

#[derive(Default)]
struct Latencies {
    /// Every update committed.
    updates: u64,
    latencies: Vec<Duration>,
    missing: usize,
    /// Every product updated.
    touched: std::collections::BTreeSet<i64>,
}

/// Whether a latency run's writers fire pgfresh's capture, and whether the run watches Redis.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Capture {
    /// Captured, and every card read back as it is written (keyspace notifications on).
    On,
    /// Captured, nothing read back (keyspace notifications off): the run ends when the queue is
    /// empty. What pgfresh costs, without what measuring its latency costs.
    Unobserved,
    /// Nothing captured.
    Off,
}

/// Which fragment a benchmark's listener keeps fresh.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Listened {
    /// The shop's product card.
    Card,
    /// A fragment that loads nothing ([`QueueOnly`]): the listener's own work alone.
    QueueOnly,
}

/// Starts a listener of the product card in this process with default settings but no periodic
/// sweep, after telling it Redis is already filled (so it does not sweep at start-up either).
async fn spawn_listener(db: &Database, sink: &RedisStore) -> Result<Running> {
    spawn_listener_of(db, sink, Listened::Card).await
}

/// Like [`spawn_listener`], of the given fragment.
async fn spawn_listener_of(
    db: &Database,
    sink: &RedisStore,
    listened: Listened,
) -> Result<Running> {
    let fragments = match listened {
        Listened::Card => fragments(),
        Listened::QueueOnly => Fragments::new().with(queue_only::PREFIX, QueueOnly),
    };
    let prefix = match listened {
        Listened::Card => PREFIX,
        Listened::QueueOnly => queue_only::PREFIX,
    };
    pgfresh::testing::set_fragment_marker(sink, prefix, 1).await?;
    let shutdown = Shutdown::new();
    let mut settings = ListenSettings::default();
    settings.sweep_interval = None;
    let task = tokio::spawn(pgfresh::listen(
        db.clone(),
        sink.clone(),
        fragments,
        settings,
        shutdown.clone(),
    ));
    Ok(Running { shutdown, task })
}

/// The shop, set up (idempotently), its queue emptied and stale listener rows removed.
async fn setup_shop(db: &Database, products: i64) -> Result<()> {
    crate::setup::setup(db, products).await?;
    db.get()
        .await?
        .batch_execute("TRUNCATE pgfresh.changes, pgfresh.failed; DELETE FROM pgfresh.listeners")
        .await?;
    Ok(())
}

/// Waits until no change is queued. Asked every 10 ms while a listener drains 100,000 changes, so
/// it asks whether one row exists: counting them all, as it once did, read the whole queue each
/// time, and that reading weighed on the very figures measured (PostgreSQL's CPU per change).
async fn wait_for_empty_queue(client: &tokio_postgres::Client) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let empty: bool = client
            .query_one("SELECT NOT EXISTS (SELECT FROM pgfresh.changes)", &[])
            .await?
            .get(0);
        if empty {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("changes still queued after 120 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Turns keyspace notifications off, as Redis ships.
async fn disable_keyspace_events(url: &str) -> Result<()> {
    set_keyspace_events(&redis::Client::open(url)?, "").await
}

/// Turns on keyspace notifications for string commands; returns the Redis database number the URL
/// selects, which names the notification channels.
async fn enable_keyspace_events(client: &redis::Client, url: &str) -> Result<u32> {
    set_keyspace_events(client, "K$").await?;
    Ok(url
        .rsplit_once('/')
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(0))
}

/// Sets Redis's `notify-keyspace-events` to `classes`.
async fn set_keyspace_events(client: &redis::Client, classes: &str) -> Result<()> {
    let mut config = client.get_multiplexed_async_connection().await?;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg(classes)
        .query_async(&mut config)
        .await?;
    Ok(())
}

/// One pgbench run of `script`, 8 clients for `seconds`; returns transactions per second.
pub(crate) async fn pgbench(url: &str, script: &std::path::Path, seconds: u32) -> Result<f64> {
    let out = tokio::process::Command::new("pgbench")
        .args(["-n", "-c", "8", "-j", "2", "-T", &seconds.to_string(), "-f"])
        .arg(script)
        .arg(url)
        .output()
        .await
        .context("running pgbench (package postgresql-client)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|tps| tps.parse().ok())
        .with_context(|| {
            format!(
                "pgbench output: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// How many of these products' compact cards in Redis differ from a render of the database now:
/// after the queue has drained this must be 0, or a change was lost.
async fn stale_cards(
    db: &Database,
    sink: &RedisStore,
    ids: &std::collections::BTreeSet<i64>,
) -> Result<usize> {
    let client = db.get().await?;
    let card = ProductCard;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let queued: i64 = client
            .query_one("SELECT count(*) FROM pgfresh.changes", &[])
            .await?
            .get(0);
        if queued == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ids: Vec<i64> = ids.iter().copied().collect();
    let mut stale = 0;
    for chunk in ids.chunks(1000) {
        let rows = card.load(&client, chunk).await?;
        let keys: Vec<String> = rows
            .iter()
            .map(|(id, _)| pgfresh::Storage::plain().entry_key(PREFIX, id, Card::Compact))
            .collect();
        let stored = sink.get_many(&keys).await?;
        for ((id, row), stored) in rows.iter().zip(stored) {
            if stored.as_deref() != Some(card.render(id, row, Card::Compact).into_string().as_str())
            {
                stale += 1;
            }
        }
    }
    Ok(stale)
}

/// The captures `write-overhead` compares, in the order it runs them.
const CAPTURES: [&str; 3] = ["no trigger", "plain trigger", "pgfresh capture"];

/// The plainest durable capture: a row trigger inserting (topic, key) into a table with no index,
/// the transaction's id by default; what pgfresh's capture is measured against.
const PLAIN_TRIGGER: &str = "
    CREATE SCHEMA IF NOT EXISTS pgfresh_bench;
    CREATE TABLE IF NOT EXISTS pgfresh_bench.plain_queue (
        topic text, key text, xid xid8 DEFAULT pg_current_xact_id());
    CREATE OR REPLACE FUNCTION pgfresh_bench.plain_capture() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO pgfresh_bench.plain_queue (topic, key) VALUES ('product', NEW.id::text);
        RETURN NULL;
    END $$;";

/// Removes every capture from `products`.
const NO_CAPTURE: &str = "SELECT pgfresh.unwatch('products', 'product');
    DROP TRIGGER IF EXISTS bench_plain ON products;";

/// One capture's runs.
#[derive(Default)]
struct CaptureRuns {
    tps: Vec<f64>,
    /// PostgreSQL CPU µs per transaction.
    cpu_us: Vec<f64>,
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// Figures with `decimals` decimals, comma-separated.
fn joined(figures: &[f64], decimals: usize) -> String {
    figures
        .iter()
        .map(|f| format!("{f:.decimals$}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Three rounds of the captures in [`CAPTURES`], rotated each round so that drift on a noisy
/// machine hits them all alike. With a listener draining, each switch waits for the queue to be
/// empty first: dropping a trigger locks `products` until its transaction ends, and a batch still
/// loading products, whose rows the `TRUNCATE` then waited for, would wait on that lock for ever (in
/// the listener, where PostgreSQL cannot see it as a deadlock). Each statement commits on its own.
async fn interleave_captures(
    client: &tokio_postgres::Client,
    url: &str,
    script: &std::path::Path,
    redis_url: &str,
    draining: bool,
) -> Result<Vec<CaptureRuns>> {
    let mut runs: Vec<CaptureRuns> = CAPTURES.iter().map(|_| CaptureRuns::default()).collect();
    for round in 0..3 {
        for step in 0..CAPTURES.len() {
            let variant = (step + round) % CAPTURES.len();
            if draining {
                wait_for_empty_queue(client).await?;
            }
            client.batch_execute(NO_CAPTURE).await?;
            client
                .batch_execute("TRUNCATE pgfresh.changes, pgfresh_bench.plain_queue")
                .await?;
            client.batch_execute("CHECKPOINT").await?;
            client
                .batch_execute(match variant {
                    0 => "",
                    1 => {
                        "CREATE TRIGGER bench_plain AFTER INSERT OR UPDATE OR DELETE ON products \
                          FOR EACH ROW EXECUTE FUNCTION pgfresh_bench.plain_capture()"
                    }
                    _ => "SELECT pgfresh.watch('products', 'id', 'product')",
                })
                .await?;
            let sample = CpuSample::now(redis_url).await?;
            let tps = pgbench(url, script, PGBENCH_SECONDS).await?;
            let postgres = CpuSample::now(redis_url).await?.since(sample).postgres();
            runs[variant].tps.push(tps);
            runs[variant]
                .cpu_us
                .push(postgres * 1e6 / (tps * f64::from(PGBENCH_SECONDS)));
        }
    }
    Ok(runs)
}

/// The product and the update sequence number a latency card shows (`<h2>lat-<seq></h2>`).
fn shown_update(key: &str, html: &str) -> Option<(i64, u64)> {
    let seq = html
        .split("<h2>lat-")
        .nth(1)
        .and_then(|rest| rest.split('<').next())
        .and_then(|s| s.parse::<u64>().ok())?;
    let id = key
        .trim_start_matches(PREFIX)
        .split(':')
        .next()
        .and_then(|i| i.parse().ok())
        .unwrap_or(0);
    Some((id, seq))
}
