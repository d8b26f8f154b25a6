//! Through PgBouncer in transaction pooling (Debian's `pgbouncer` with its default settings, a
//! throwaway instance in front of the shared server): every
//! command works; two listeners, one with a direct `--session-url` for LISTEN and one polling, apply a
//! concurrent workload with nothing lost and no error from a prepared statement, and sweep one at a
//! time; a pool of one server session serves a listener, a failing load failing only its own key,
//! as a load that panics with a failing statement of its own unread does, and a load that ends its
//! batch's transaction failing that batch alone, with nothing lost; a
//! standby URL through the pooler is named as such.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::cli::{run, stderr, stdout};
use common::product_card::{Card, ProductCard};
use common::servers::{TempPgBouncer, TempRedis};
use common::{TestEnv, eventually, shop_binary};
use pgfresh::tokio_postgres::Client;
use pgfresh::tokio_postgres::types::Type;
use pgfresh::{CachedStatements, Database, Fragment, Fragments, Loaded, Shutdown, Topics};

const PRODUCTS: i64 = 60;

/// What no command or listener may say through the pooler.
fn assert_no_session_trouble(what: &str, text: &str) {
    for symptom in [
        "prepared statement",
        "unsupported startup parameter",
        "panicked",
        "ERROR",
    ] {
        assert!(!text.contains(symptom), "{what} says {symptom:?}:\n{text}");
    }
}

/// A shop listener process through `url`, its log in `log`.
fn listener(url: &str, redis: &str, session_url: Option<&str>, log: &std::path::Path) -> Child {
    let mut command = Command::new(shop_binary());
    command
        .args([
            "listen",
            "--sweep-interval",
            "1s",
            "--poll-interval",
            "100ms",
        ])
        .env("DATABASE_URL", url)
        .env("REDIS_URL", redis)
        .env("RUST_LOG", "pgfresh=info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    if let Some(session) = session_url {
        command.env("PGFRESH_SESSION_URL", session);
    }
    command.spawn().unwrap()
}

/// Stops a listener with SIGTERM and waits for it; returns whether it exited cleanly.
async fn stop(mut child: Child) -> bool {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = std::time::Instant::now() + common::PATIENCE;
    loop {
        if let Some(exit) = child.try_wait().unwrap() {
            return exit.success();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn every_command_and_two_listeners_work_through_pgbouncer_in_transaction_pooling() {
    let Some(bouncer) = TempPgBouncer::start() else {
        return;
    };
    let env = TestEnv::shop(PRODUCTS).await;
    let redis = TempRedis::start();
    let through = bouncer.url(&env.name);

    // Each command, run as a user would, with DATABASE_URL at the pooler.
    for args in [&["install"][..], &["sweep"], &["status"], &["retry-failed"]] {
        let out = run(&shop_binary(), &through, &redis.url(), args);
        let said = format!("{}{}", stdout(&out), stderr(&out));
        assert!(out.status.success(), "{args:?}: {said}");
        assert_no_session_trouble(&format!("{args:?}"), &said);
        assert!(said.contains("through a connection pooler"), "{said}");
    }
    let out = run(&shop_binary(), &through, &redis.url(), &["doctor"]);
    let report = stdout(&out);
    assert_no_session_trouble("doctor", &report);
    // As a superuser through the pooler: its search_path cannot be pinned there, which doctor says.
    assert!(
        report.contains("ok       product_card: loaded and rendered key 1 (read-only)")
            && report
                .contains("note     reached through a connection pooler with no --session-url")
            && report
                .contains("PROBLEM  running as superuser postgres through a connection pooler")
            && report.contains("PROBLEM  no live listener")
            && report.contains("2 problems found"),
        "{report}"
    );

    // Two listeners: one hears NOTIFYs on a direct session, the other polls.
    let logs = tempfile_dir(&env.name);
    let direct = listener(
        &through,
        &redis.url(),
        Some(&env.url),
        &logs.join("direct.log"),
    );
    let polling = listener(&through, &redis.url(), None, &logs.join("polling.log"));
    eventually("both listeners to register", || async {
        env.registered_listeners().await == 2
    })
    .await;

    // Eight writers through the pooler, as an application would write: plain statements.
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..8_i64 {
        let url = through.clone();
        writers.spawn(async move {
            let client = common::connect(&url).await;
            for round in 0..25_i64 {
                let id = 1 + (writer * 25 + round) % PRODUCTS;
                let sql = match round % 5 {
                    0 => format!(
                        "INSERT INTO reviews (product_id, author, rating, body) \
                         VALUES ({id}, 'writer {writer}', 4, 'round {round}')"
                    ),
                    _ => format!(
                        "UPDATE products SET price_cents = price_cents + 1, name = 'Item {id} r{round}' \
                         WHERE id = {id}"
                    ),
                };
                client.batch_execute(&sql).await.unwrap();
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }

    // Every card is what a fresh render says, and the queue is empty: nothing was lost.
    let mut redis_client = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for id in 1..=PRODUCTS {
        for variant in ["compact", "full"] {
            let key = format!("shop:product_card:{id}:{variant}");
            let expected = env.fresh_render(id, variant).await;
            eventually(&format!("{key} to be fresh"), || {
                let mut redis_client = redis_client.clone();
                let (key, expected) = (key.clone(), expected.clone());
                async move {
                    let held: Option<String> = redis::cmd("GET")
                        .arg(&key)
                        .query_async(&mut redis_client)
                        .await
                        .unwrap();
                    held == expected
                }
            })
            .await;
        }
    }
    let _ = &mut redis_client;
    eventually("the queue to be empty", || async {
        env.pending().await == 0
    })
    .await;
    assert_eq!(env.parked().await, 0);

    // One sweep leader: no two listeners' complete sweeps overlap in time.
    eventually("periodic sweeps", || async {
        env.client()
            .await
            .query_one(
                "SELECT count(*) FROM pgfresh.sweeps WHERE reason = 'periodic'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            >= 2
    })
    .await;
    let overlapping: i64 = env
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM pgfresh.sweeps a JOIN pgfresh.sweeps b
             ON a.swept_by <> b.swept_by AND a.started_at < b.finished_at AND b.started_at < a.finished_at",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(overlapping, 0, "two listeners swept at once");

    // The polling listener never asked writers to NOTIFY; the other did while idle.
    let idle_flags: Vec<(String, bool)> = env
        .client()
        .await
        .query("SELECT id, idle FROM pgfresh.listeners", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(idle_flags.len(), 2, "{idle_flags:?}");

    assert!(stop(direct).await, "the direct listener exits cleanly");
    assert!(stop(polling).await, "the polling listener exits cleanly");
    let direct_log = std::fs::read_to_string(logs.join("direct.log")).unwrap();
    let polling_log = std::fs::read_to_string(logs.join("polling.log")).unwrap();
    assert_no_session_trouble("the direct listener", &direct_log);
    assert_no_session_trouble("the polling listener", &polling_log);
    assert!(
        polling_log.contains("no LISTEN session, so changes are found by polling"),
        "{polling_log}"
    );
    assert!(
        !direct_log.contains("no LISTEN session"),
        "the listener with a session URL LISTENs: {direct_log}"
    );
    let _ = std::fs::remove_dir_all(&logs);
    drop(bouncer);
    env.cleanup().await;
}

/// A directory of this test's own for logs.
fn tempfile_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pgfresh-pgbouncer-logs-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn a_pooler_that_ignores_the_startup_options_is_found_too() {
    let Some(bouncer) = TempPgBouncer::start_with("ignore_startup_parameters = options") else {
        return;
    };
    let env = TestEnv::shop(3).await;
    let through = bouncer.url(&env.name);
    let out = run(&shop_binary(), &through, &common::redis_url(), &["status"]);
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("through a connection pooler (it ignored pgfresh's startup settings)"),
        "{said}"
    );
    assert_no_session_trouble("status", &said);
    // And a direct connection is not taken for one (PostgreSQL reports the pinned path as given).
    let direct = run(&shop_binary(), &env.url, &common::redis_url(), &["status"]);
    let said = format!("{}{}", stdout(&direct), stderr(&direct));
    assert!(direct.status.success(), "{said}");
    assert!(!said.contains("connection pooler"), "{said}");
    drop(bouncer);
    env.cleanup().await;
}

/// The shop's card, mapped from topic `probe` by a through query that finds a product only while
/// its transaction runs with the settings pgfresh gives its claims (`synchronous_commit` and `jit`
/// off): through queries run inside the claim's transaction.
struct SettingsProbe;

impl Fragment for SettingsProbe {
    type Key = i64;
    type Row = <ProductCard as Fragment>::Row;
    type Variant = <ProductCard as Fragment>::Variant;
    type Error = <ProductCard as Fragment>::Error;

    fn name(&self) -> &str {
        ProductCard.name()
    }

    fn topics(&self) -> Topics {
        Topics::new().through(
            "probe",
            "SELECT id FROM products WHERE id = ANY($1) \
             AND current_setting('synchronous_commit') = 'off' AND current_setting('jit') = 'off'",
        )
    }

    async fn load(&self, db: &Client, keys: &[i64]) -> Loaded<Self> {
        ProductCard.load(db, keys).await
    }

    fn render(&self, key: &i64, row: &Self::Row, variant: Self::Variant) -> maud::Markup {
        ProductCard.render(key, row, variant)
    }

    async fn keys_after(
        &self,
        db: &Client,
        after: Option<&i64>,
        limit: i64,
    ) -> Result<Vec<i64>, Self::Error> {
        ProductCard.keys_after(db, after, limit).await
    }
}

#[tokio::test]
async fn claims_through_the_pooler_run_with_pgfresh_s_settings_set_in_the_transaction() {
    let Some(bouncer) = TempPgBouncer::start() else {
        return;
    };
    let env = TestEnv::shop(3).await;
    let db = Database::new(&bouncer.url(&env.name), 4).unwrap();
    let shutdown = Shutdown::new();
    let listener = tokio::spawn(pgfresh::listen(
        db,
        env.sink.clone(),
        Fragments::new().with(&env.prefix, SettingsProbe),
        common::tweak(common::test_settings(), |s| {
            s.poll_interval = Duration::from_millis(50)
        }),
        shutdown.clone(),
    ));
    eventually("the listener to register", || async {
        env.registered_listeners().await == 1
    })
    .await;
    // A change of a shared row, as a trigger would queue it.
    env.client()
        .await
        .batch_execute("INSERT INTO pgfresh.changes (topic, key) VALUES ('probe', '2')")
        .await
        .unwrap();
    let key = env.key(2, "full");
    eventually("product 2 fanned out and rendered", || async {
        env.get(&key).await.is_some()
    })
    .await;
    shutdown.cancel();
    listener.await.unwrap().unwrap();
    drop(bouncer);
    env.cleanup().await;
}

/// A card showing a product's name, every table named with its schema: it serves a database whose
/// sessions start with the `search_path` pgfresh pins its own to. Its load is kept prepared.
struct QualifiedCard;

impl Fragment for QualifiedCard {
    type Key = i64;
    type Row = String;
    type Variant = Card;
    type Error = pgfresh::tokio_postgres::Error;

    fn name(&self) -> &str {
        "product_card"
    }

    fn topics(&self) -> Topics {
        Topics::new().direct("product")
    }

    async fn load(&self, db: &Client, keys: &[i64]) -> Loaded<Self> {
        let sql = "SELECT id, name FROM public.products WHERE id = ANY($1)";
        let rows = db
            .query_typed_cached(sql, &[(&keys, Type::INT8_ARRAY)])
            .await?;
        Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
    }

    fn render(&self, _key: &i64, name: &String, _variant: Card) -> maud::Markup {
        maud::html! { h2 { (name) } }
    }

    async fn keys_after(
        &self,
        db: &Client,
        after: Option<&i64>,
        limit: i64,
    ) -> Result<Vec<i64>, Self::Error> {
        let sql = "SELECT id FROM public.products WHERE id > coalesce($1, 0) ORDER BY id LIMIT $2";
        let rows = db
            .query_typed_cached(sql, &[(&after, Type::INT8), (&limit, Type::INT8)])
            .await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }
}

#[tokio::test]
async fn a_pooler_taken_for_postgresql_loses_no_change_and_statements_are_no_longer_kept() {
    let Some(bouncer) = TempPgBouncer::start_with("ignore_startup_parameters = options") else {
        return;
    };
    let env = TestEnv::shop(3).await;
    // Sessions start with the path pgfresh pins its own to: PgBouncer drops pgfresh's startup
    // settings, and nothing shows it. pgfresh takes it for PostgreSQL and keeps statements,
    // which the pooler then sends to whichever server session it hands out next.
    let admin = env.client().await;
    let pinned = format!(
        "ALTER DATABASE {} SET search_path = pg_catalog, pg_temp",
        env.name
    );
    admin.batch_execute(&pinned).await.unwrap();
    // What the listener logs (the test runs it on this thread).
    let log = Log::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(log.clone())
        .with_ansi(false)
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);
    let db = Database::new(&bouncer.url(&env.name), 4).unwrap();
    let listener = env.start_listener_on(
        db,
        Fragments::new().with(&env.prefix, QualifiedCard),
        common::tweak(common::test_settings(), |s| {
            s.poll_interval = Duration::from_millis(50)
        }),
    );
    for round in 1..=9_i64 {
        let (id, name) = (round % 3 + 1, format!("Round {round}"));
        let rename = "UPDATE public.products SET name = $2 WHERE id = $1";
        env.client()
            .await
            .execute(rename, &[&id, &name])
            .await
            .unwrap();
        let (key, needle) = (env.key(id, "compact"), format!("<h2>{name}</h2>"));
        eventually(&format!("product {id} named {name}"), || async {
            env.get(&key)
                .await
                .is_some_and(|html| html.contains(&needle))
        })
        .await;
    }
    listener.stop().await;
    assert_eq!(env.parked().await, 0);
    // The first statement found missing was the last: pgfresh kept no statement after it.
    let log = log.text();
    assert!(
        log.contains("from now on pgfresh keeps no statement"),
        "{log}"
    );
    let missing = log.matches("does not exist").count();
    assert!(missing <= 1, "{missing} statements missing:\n{log}");
    drop(bouncer);
    env.cleanup().await;
}

/// Log lines, kept for the test to read.
#[derive(Clone, Default)]
struct Log(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Log {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Log {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Log {
    type Writer = Log;
    fn make_writer(&'a self) -> Log {
        self.clone()
    }
}

#[tokio::test]
async fn a_session_url_that_cannot_be_reached_is_the_one_named() {
    let env = TestEnv::shop(2).await;
    let redis = TempRedis::start();
    let logs = tempfile_dir(&format!("{}-session", env.name));
    let log = logs.join("listener.log");
    let unreachable = format!(
        "postgres://postgres:hunter2@127.0.0.1:{}/{}",
        common::servers::free_port(),
        env.name
    );
    let child = listener(&env.url, &redis.url(), Some(&unreachable), &log);
    let shown = unreachable.replace(":hunter2", "");
    eventually(
        "the listener to name the session URL it cannot reach",
        || async {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(&format!("cannot connect to PostgreSQL at {shown}"))
        },
    )
    .await;
    assert!(stop(child).await, "the listener exits cleanly");
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(!said.contains("hunter2"), "{said}");
    let _ = std::fs::remove_dir_all(&logs);
    env.cleanup().await;
}

/// A card showing a product's name, and what its load found of its transaction: its isolation
/// level, and a setting an earlier load of the same transaction may have left behind. Its load
/// fails in its data (a division by zero) for product 13 alone; and it leaves that setting behind,
/// and ignores an error of its own, as a careless loader might.
struct FragileCard;

impl Fragment for FragileCard {
    type Key = i64;
    type Row = (String, String, String);
    type Variant = Card;
    type Error = pgfresh::tokio_postgres::Error;

    fn name(&self) -> &str {
        "product_card"
    }

    fn topics(&self) -> Topics {
        Topics::new().direct("product")
    }

    async fn load(&self, db: &Client, keys: &[i64]) -> Loaded<Self> {
        let sql = "SELECT id, name || substr('', 1 / (id - 13)::int), \
                          current_setting('transaction_isolation'), \
                          coalesce(current_setting('pgfresh_test.left', true), '') \
                   FROM products WHERE id = ANY($1)";
        let rows = db.query(sql, &[&keys]).await?;
        db.execute(
            "SELECT set_config('pgfresh_test.left', 'by an earlier load', true)",
            &[],
        )
        .await?;
        let _ignored = db.execute("SELECT 1 / 0", &[]).await;
        let rows = rows
            .iter()
            .map(|row| (row.get(0), (row.get(1), row.get(2), row.get(3))));
        Ok(rows.collect())
    }

    fn render(&self, _key: &i64, row: &Self::Row, _variant: Card) -> maud::Markup {
        let (name, isolation, left) = row;
        maud::html! { h2 { (name) } p { (isolation) } p { (left) } }
    }

    async fn keys_after(
        &self,
        db: &Client,
        after: Option<&i64>,
        limit: i64,
    ) -> Result<Vec<i64>, Self::Error> {
        let sql = "SELECT id FROM products WHERE id > coalesce($1, 0) ORDER BY id LIMIT $2";
        let rows = db.query(sql, &[&after, &limit]).await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }
}

#[tokio::test]
async fn a_pool_of_one_server_session_serves_a_listener_and_a_failing_load_fails_only_its_key() {
    // One server session for every client of the database, and a client left waiting for it is
    // refused after 5 s (the default is 2 minutes): a batch that held the session for its claim
    // while it waited for another for its loads would never get one.
    let Some(bouncer) = TempPgBouncer::start_with("default_pool_size = 1\nquery_wait_timeout = 5")
    else {
        return;
    };
    let env = TestEnv::shop(20).await;
    // Transactions default to REPEATABLE READ: each batch's must still run at READ COMMITTED, or
    // its loads would read the snapshot its claim took before its ticket.
    let isolation = format!(
        "ALTER DATABASE {} SET default_transaction_isolation = 'repeatable read'",
        env.name
    );
    env.client().await.batch_execute(&isolation).await.unwrap();
    let db = Database::new(&bouncer.url(&env.name), 4).unwrap();
    let listener = env.start_listener_on(
        db,
        Fragments::new().with(&env.prefix, FragileCard),
        common::tweak(common::test_settings(), |s| {
            s.poll_interval = Duration::from_millis(50);
            s.workers = 2;
        }),
    );
    // Twenty changes, in one transaction: claimed together, or apart by two workers. Product
    // 13's load fails, in its batch's transaction behind the pooler: only its own key may fail,
    // the loads of the others (in halves, to find the failing key) each start as the first did,
    // and the error each load ignores fails nothing.
    env.client()
        .await
        .batch_execute("UPDATE products SET name = 'Pooled ' || id")
        .await
        .unwrap();
    for id in (1..=20).filter(|&id| id != 13) {
        let key = env.key(id, "compact");
        let expected = format!("<h2>Pooled {id}</h2><p>read committed</p><p></p>");
        eventually(&format!("product {id} renamed"), || async {
            env.get(&key).await.is_some_and(|html| html == expected)
        })
        .await;
    }
    only_13_failed(&env, "division by zero").await;
    listener.stop().await;
    assert!(
        !bouncer.log().contains("query_wait_timeout"),
        "{}",
        bouncer.log()
    );
    drop(bouncer);
    env.cleanup().await;
}

/// Waits for product 13's change to note a failed attempt with `error`, then checks that no
/// other change waits.
async fn only_13_failed(env: &TestEnv, error: &str) {
    eventually("product 13's change to note its failure", || async {
        let row = env
            .client()
            .await
            .query_opt(
                "SELECT last_error FROM pgfresh.changes WHERE key = '13' AND attempts > 0",
                &[],
            )
            .await
            .unwrap();
        row.and_then(|row| row.get::<_, Option<String>>(0))
            .is_some_and(|noted| noted.contains(error))
    })
    .await;
    let waiting: i64 = env
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM pgfresh.changes WHERE key <> '13'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(waiting, 0, "every other change left the queue");
}

/// The shop's card, whose load runs in a transaction of its own making, as a loader may on a
/// session of its own (to read from one snapshot, say).
struct CommittingCard;

impl Fragment for CommittingCard {
    type Key = i64;
    type Row = <ProductCard as Fragment>::Row;
    type Variant = <ProductCard as Fragment>::Variant;
    type Error = <ProductCard as Fragment>::Error;

    fn name(&self) -> &str {
        ProductCard.name()
    }

    fn topics(&self) -> Topics {
        ProductCard.topics()
    }

    async fn load(&self, db: &Client, keys: &[i64]) -> Loaded<Self> {
        db.batch_execute("BEGIN").await?;
        let loaded = ProductCard.load(db, keys).await?;
        db.batch_execute("COMMIT").await?;
        Ok(loaded)
    }

    fn render(&self, key: &i64, row: &Self::Row, variant: Self::Variant) -> maud::Markup {
        ProductCard.render(key, row, variant)
    }

    async fn keys_after(
        &self,
        db: &Client,
        after: Option<&i64>,
        limit: i64,
    ) -> Result<Vec<i64>, Self::Error> {
        ProductCard.keys_after(db, after, limit).await
    }
}

#[tokio::test]
async fn a_load_that_ends_its_batch_s_transaction_fails_that_batch_and_loads_apart_from_then_on() {
    let Some(bouncer) = TempPgBouncer::start() else {
        return;
    };
    let env = TestEnv::shop(3).await;
    let db = Database::new(&bouncer.url(&env.name), 4).unwrap();
    let listener = env.start_listener_on(
        db,
        Fragments::new().with(&env.prefix, CommittingCard),
        common::tweak(common::test_settings(), |s| {
            s.poll_interval = Duration::from_millis(50)
        }),
    );
    // Two changes in one transaction: the first batch's load commits the claim's transaction,
    // which rolls back; the batches after it load on sessions of their own, and apply both.
    env.client()
        .await
        .batch_execute("UPDATE products SET name = 'Own snapshot ' || id WHERE id IN (2, 3)")
        .await
        .unwrap();
    for id in [2, 3] {
        let (key, needle) = (env.key(id, "full"), format!("Own snapshot {id}"));
        eventually(&format!("product {id} renamed"), || async {
            env.get(&key)
                .await
                .is_some_and(|html| html.contains(&needle))
        })
        .await;
    }
    eventually("the queue to empty", || async { env.pending().await == 0 }).await;
    listener.stop().await;
    assert_eq!(env.parked().await, 0);
    drop(bouncer);
    env.cleanup().await;
}

#[tokio::test]
async fn a_standby_url_through_a_pooler_is_named_as_such() {
    let Some(bouncer) = TempPgBouncer::start() else {
        return;
    };
    let env = TestEnv::shop(2).await;
    // The primary directly, the "standby" through PgBouncer, which refuses the session settings
    // pgfresh opens the standby's sessions with.
    let replica = bouncer.url(&env.name);
    let out = run(
        &shop_binary(),
        &env.url,
        &common::redis_url(),
        &["doctor", "--replica-url", &replica],
    );
    let said = stdout(&out);
    assert!(
        said.contains("cannot serve loads")
            && said.contains(
                "the URL leads through a connection pooler; give a direct connection to the standby"
            ),
        "{said}{}",
        stderr(&out)
    );
    drop(bouncer);
    env.cleanup().await;
}

/// The shop's card, whose load of product 13 panics with a failing statement of its own sent, its
/// error not read: the transaction the load ran in is left aborted.
struct PanickingCard;

impl Fragment for PanickingCard {
    type Key = i64;
    type Row = <ProductCard as Fragment>::Row;
    type Variant = <ProductCard as Fragment>::Variant;
    type Error = <ProductCard as Fragment>::Error;

    fn name(&self) -> &str {
        ProductCard.name()
    }

    fn topics(&self) -> Topics {
        ProductCard.topics()
    }

    async fn load(&self, db: &Client, keys: &[i64]) -> Loaded<Self> {
        if keys.contains(&13) {
            // Sent on its first poll, its reply (an error) never read.
            let mut failing = std::pin::pin!(db.batch_execute("SELECT 1 / 0"));
            assert!(futures_util::poll!(&mut failing).is_pending());
            panic!("the card cannot show product 13");
        }
        ProductCard.load(db, keys).await
    }

    fn render(&self, key: &i64, row: &Self::Row, variant: Self::Variant) -> maud::Markup {
        ProductCard.render(key, row, variant)
    }

    async fn keys_after(
        &self,
        db: &Client,
        after: Option<&i64>,
        limit: i64,
    ) -> Result<Vec<i64>, Self::Error> {
        ProductCard.keys_after(db, after, limit).await
    }
}

#[tokio::test]
async fn a_load_that_panics_mid_statement_behind_a_pool_of_one_fails_only_its_key() {
    let Some(bouncer) = TempPgBouncer::start_with("default_pool_size = 1\nquery_wait_timeout = 5")
    else {
        return;
    };
    let env = TestEnv::shop(20).await;
    let db = Database::new(&bouncer.url(&env.name), 4).unwrap();
    let listener = env.start_listener_on(
        db,
        Fragments::new().with(&env.prefix, PanickingCard),
        common::tweak(common::test_settings(), |s| {
            s.poll_interval = Duration::from_millis(50)
        }),
    );
    // One transaction: one batch, whose load of all twenty panics, then halves until product 13
    // stands alone; every load runs in a savepoint of the claim's transaction.
    env.client()
        .await
        .batch_execute("UPDATE products SET name = 'Unshaken ' || id")
        .await
        .unwrap();
    for id in (1..=20).filter(|&id| id != 13) {
        let key = env.key(id, "full");
        let needle = format!("<h2>Unshaken {id}</h2>");
        eventually(&format!("product {id} renamed"), || async {
            env.get(&key)
                .await
                .is_some_and(|html| html.contains(&needle))
        })
        .await;
    }
    only_13_failed(&env, "the card cannot show product 13").await;
    listener.stop().await;
    assert!(
        !bouncer.log().contains("query_wait_timeout"),
        "{}",
        bouncer.log()
    );
    drop(bouncer);
    env.cleanup().await;
}
