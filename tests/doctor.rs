//! `doctor`: a healthy deployment passes, and each misconfiguration it checks for is found, printed
//! with its fix, and makes it exit non-zero.

mod common;

use common::cli::{run, stdout};
use common::servers::TempRedis;
use common::{TestEnv, shop_binary, test_settings};

/// Runs `shop doctor` against the environment's database and `redis_url`.
fn doctor(url: &str, redis_url: &str) -> (bool, String) {
    let out = run(&shop_binary(), url, redis_url, &["doctor"]);
    let text = stdout(&out);
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// How many problems a text report found.
fn problem_count(report: &str) -> usize {
    report.matches("\nPROBLEM  ").count()
}

fn assert_problem(report: &str, problem: &str, fix: &str) {
    let found = report
        .split("PROBLEM  ")
        .skip(1)
        .find(|finding| finding.contains(problem));
    let finding = found.unwrap_or_else(|| panic!("no problem {problem:?} in:\n{report}"));
    assert!(
        finding.contains(&format!("fix: {fix}")),
        "{problem:?} without fix {fix:?} in:\n{report}"
    );
}

#[tokio::test]
async fn a_healthy_deployment_passes() {
    let env = TestEnv::shop(20).await;
    env.sweep().await;
    let listener = env.start_listener(test_settings());
    common::eventually("the listener to register", || async {
        env.registered_listeners().await > 0
    })
    .await;
    let (passed, report) = doctor(&env.url, &common::redis_url());
    assert!(passed, "{report}");
    assert!(report.contains("no problems found"), "{report}");
    assert!(
        report.contains("ok       product_card: loaded and rendered key 1 (read-only)"),
        "{report}"
    );
    assert!(report.contains("ok       1 live listener(s)"), "{report}");
    listener.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn each_misconfiguration_is_found_with_its_fix() {
    let env = TestEnv::shop(20).await;
    let admin = env.client().await;

    // No listener, an old change still queued, a parked one, a disabled trigger, a table watched for
    // a topic no fragment handles, and a Redis that may evict pgfresh's keys.
    admin
        .batch_execute(
            "INSERT INTO pgfresh.changes (topic, key, enqueued_at)
             VALUES ('product', '1', now() - interval '2 hours');
             INSERT INTO pgfresh.failed (change_id, topic, key, enqueued_at, attempts, error)
             VALUES (1, 'product', '2', now(), 10, 'boom');
             ALTER TABLE reviews DISABLE TRIGGER pgfresh_product;
             CREATE TABLE coupons (code text PRIMARY KEY);
             SELECT pgfresh.watch('coupons', 'code', 'coupon');
             CREATE TABLE \"gifts\nok       all is well\" (code text PRIMARY KEY);
             SELECT pgfresh.watch('\"gifts\nok       all is well\"', 'code', 'coupon');
             ALTER TABLE products ENABLE REPLICA TRIGGER pgfresh_product;
             ALTER TRIGGER \"pgfresh_coupon:truncate\" ON coupons RENAME TO coupon_truncations;
             DROP TRIGGER pgfresh_coupon ON coupons;
             CREATE TABLE visits (product_id bigint) PARTITION BY RANGE (product_id);
             CREATE TABLE visits_low PARTITION OF visits FOR VALUES FROM (0) TO (1000);
             SELECT pgfresh.watch('visits', 'product_id', 'product');
             ALTER TABLE visits_low DISABLE TRIGGER pgfresh_product;
             ALTER TABLE pgfresh.changes ALTER COLUMN id SET CACHE 20;
             ALTER SEQUENCE pgfresh.render_tickets CACHE 20;
             CREATE TABLE vouchers (code text PRIMARY KEY);
             SELECT pgfresh.watch('vouchers', 'code', 'coupon');
             ALTER TABLE vouchers RENAME COLUMN code TO voucher_code;",
        )
        .await
        .unwrap();
    let evicting =
        TempRedis::start_with(&["--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru"]);
    let (passed, report) = doctor(&env.url, &evicting.url());
    assert!(!passed, "{report}");
    assert_problem(&report, "no live listener", "start `listen`");
    assert_problem(
        &report,
        // Two hours, and the seconds the test took so far.
        "the oldest queued change was committed 720",
        "check that a listener runs",
    );
    assert_problem(
        &report,
        "1 changes are parked in pgfresh.failed",
        "read their errors",
    );
    assert_problem(
        &report,
        "the sequence pgfresh.render_tickets has a cache or does not count up",
        "ALTER SEQUENCE pgfresh.render_tickets CACHE 1 INCREMENT BY 1",
    );
    assert_problem(
        &report,
        "the identity of pgfresh.changes has a cache or does not count up",
        "ALTER TABLE pgfresh.changes ALTER COLUMN id SET CACHE 1",
    );
    assert_problem(
        &report,
        "trigger pgfresh_product on public.reviews is disabled: changes there are not captured",
        "ALTER TABLE public.reviews ENABLE TRIGGER pgfresh_product; then run `sweep`",
    );
    assert_problem(
        &report,
        "trigger pgfresh_product on public.products fires only on replicas (ENABLE REPLICA TRIGGER)",
        "ALTER TABLE public.products ENABLE TRIGGER pgfresh_product;",
    );
    assert_problem(
        &report,
        "trigger pgfresh_product on public.visits_low is disabled",
        "ALTER TABLE public.visits_low ENABLE TRIGGER pgfresh_product;",
    );
    assert_problem(
        &report,
        "the row trigger of a watch on public.coupons is missing",
        "SELECT pgfresh.watch('public.coupons', 'code', 'coupon'); (it recreates",
    );
    assert!(
        !report.contains("TRUNCATE trigger of a watch on public.coupons"),
        "a renamed trigger still captures:\n{report}"
    );
    assert_problem(
        &report,
        "the watch on public.vouchers for topic coupon reads column code, which it no longer has (renamed or dropped): every write to public.vouchers fails",
        "SELECT pgfresh.watch('public.vouchers', '<the key column now>', 'coupon'); then run `sweep`",
    );
    assert_problem(
        &report,
        "public.coupons.code is watched for topic coupon, which no fragment of this binary handles",
        "add a fragment for topic coupon",
    );
    assert!(
        !report
            .lines()
            .any(|line| line.starts_with("ok       all is well")),
        "a table name forged a line:\n{report}"
    );
    assert!(
        report.contains("public.\"gifts\\nok       all is well\".code is watched"),
        "{report}"
    );
    assert_problem(
        &report,
        "Redis maxmemory-policy allkeys-lru: Redis may evict any key",
        "CONFIG SET maxmemory-policy noeviction",
    );

    // A watched key column whose values are not the fragment's keys; then none watched at all.
    admin
        .batch_execute(
            "SELECT pgfresh.unwatch('products', 'product');
             SELECT pgfresh.unwatch('reviews', 'product');
             SELECT pgfresh.unwatch('visits', 'product');
             SELECT pgfresh.watch('products', 'name', 'product');",
        )
        .await
        .unwrap();
    let (_, report) = doctor(&env.url, &common::redis_url());
    assert_problem(
        &report,
        "20 of 20 sampled values of public.products.name (e.g. ",
        "watch the column that holds product_card's keys",
    );
    admin
        .batch_execute("SELECT pgfresh.unwatch('products', 'product')")
        .await
        .unwrap();
    let (_, report) = doctor(&env.url, &common::redis_url());
    assert_problem(
        &report,
        "product_card listen(s) to topic product, but no table is watched for it",
        "SELECT pgfresh.watch('<table>', '<key column>', 'product');",
    );

    // A schema older than the binary.
    admin
        .batch_execute("DELETE FROM pgfresh.migrations WHERE version = (SELECT max(version) FROM pgfresh.migrations)")
        .await
        .unwrap();
    let (_, report) = doctor(&env.url, &common::redis_url());
    assert!(
        report.contains("PROBLEM  schema version ")
            && report.contains(" is older than this binary's "),
        "{report}"
    );
    assert!(report.contains("fix: run `install` as the DBA"), "{report}");
    env.cleanup().await;
}

#[tokio::test]
async fn a_loader_that_fails_for_the_listeners_role_is_found() {
    let env = TestEnv::shop(5).await;
    let out = common::psql(&env.url, "sql/roles.sql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let login = format!("{}_doctor", env.name);
    env.client()
        .await
        .batch_execute(&format!(
            "CREATE ROLE {login} LOGIN IN ROLE pgfresh_listener; GRANT SELECT ON products TO {login};"
        ))
        .await
        .unwrap();
    let url = env.url.replacen("postgres@", &format!("{login}@"), 1);
    let (passed, report) = doctor(&url, &common::redis_url());
    assert!(!passed, "{report}");
    assert_problem(
        &report,
        "product_card: loading key 1 failed: ",
        "grant the listener's role SELECT on what the loader reads",
    );
    assert!(
        report.contains("permission denied for table reviews"),
        "{report}"
    );
    env.client()
        .await
        .batch_execute(&format!("DROP OWNED BY {login}; DROP ROLE {login};"))
        .await
        .unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn doctor_reads_watched_keys_in_the_settings_the_triggers_fix() {
    let env = TestEnv::shop(2).await;
    let admin = env.client().await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} SET timezone = 'America/New_York';
             CREATE TABLE stamps (at timestamptz PRIMARY KEY);
             INSERT INTO stamps VALUES ('2026-01-01 00:00:00+00');
             SELECT pgfresh.watch('stamps', 'at', 'product');",
            env.name
        ))
        .await
        .unwrap();
    let (_, report) = doctor(&env.url, &common::redis_url());
    // The trigger queues the key in UTC, whatever the writer's time zone; doctor reads it so.
    assert_problem(
        &report,
        "1 of 1 sampled values of public.stamps.at (e.g. \"2026-01-01 00:00:00+00\")",
        "watch the column that holds product_card's keys",
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_table_the_cards_loader_reads_that_no_watch_covers_is_named_with_its_watch() {
    let env = TestEnv::shop(5).await;
    let (_, healthy) = doctor(&env.url, &common::redis_url());
    assert!(
        healthy.contains(
            "ok       product_card: the 2 tables its loader and queries read are watched under its topics"
        ),
        "{healthy}"
    );
    env.client()
        .await
        .batch_execute("SELECT pgfresh.unwatch('reviews', 'product')")
        .await
        .unwrap();
    let (passed, report) = doctor(&env.url, &common::redis_url());
    assert!(!passed, "{report}");
    assert_problem(
        &report,
        "product_card: its loader reads reviews, which no watch of its topics (product) covers",
        "SELECT pgfresh.watch('reviews', 'product_id', 'product');",
    );

    // The same findings as JSON lines, for scripts, with the same exit status.
    let out = run(
        &shop_binary(),
        &env.url,
        &common::redis_url(),
        &["doctor", "--json"],
    );
    assert!(!out.status.success());
    let findings: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let text_lines = report
        .lines()
        .filter(|l| !l.starts_with("         fix:"))
        .count();
    // The text has a heading and a summary line more.
    assert_eq!(findings.len(), text_lines - 2, "{findings:#?}\n{report}");
    let problems: Vec<_> = findings
        .iter()
        .filter(|f| f["level"] == "problem")
        .collect();
    assert_eq!(problems.len(), problem_count(&report), "{findings:#?}");
    let reviews = problems
        .iter()
        .find(|f| f["what"].as_str().unwrap().contains("reads reviews"))
        .unwrap_or_else(|| panic!("{findings:#?}"));
    assert_eq!(
        reviews["what"],
        "product_card: its loader reads reviews, which no watch of its topics (product) covers: a change there leaves it stale until the next sweep"
    );
    assert_eq!(
        reviews["fix"],
        "SELECT pgfresh.watch('reviews', 'product_id', 'product');"
    );
    assert!(
        findings
            .iter()
            .all(|f| ["ok", "note", "problem"].contains(&f["level"].as_str().unwrap())),
        "{findings:#?}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_redis_that_cannot_be_reached_is_a_problem_with_the_variable_to_check() {
    let env = TestEnv::shop(3).await;
    let nowhere = format!("redis://127.0.0.1:{}", common::servers::free_port());
    let (passed, report) = doctor(&env.url, &nowhere);
    assert!(!passed, "{report}");
    assert_problem(
        &report,
        "Redis: ",
        "check --redis-url (or REDIS_URL) and that Redis runs",
    );
    env.cleanup().await;
}

/// On a logical replication subscriber, the apply worker writes as a replica, for which a trigger
/// firing on the origin alone does not fire: a watched table a subscription writes is named with
/// `ENABLE ALWAYS`, and is not once its triggers fire always. (On a server of its own: a database
/// with a subscription cannot be dropped, so a test that stopped half-way would leave it behind.)
#[tokio::test]
async fn a_watched_table_a_subscription_writes_needs_its_triggers_enabled_always() {
    let server = common::servers::TempPostgres::start();
    let admin = common::connect(&server.url("postgres")).await;
    admin
        .batch_execute(
            "CREATE TABLE products (id bigint PRIMARY KEY);
             CREATE PUBLICATION catalog FOR TABLE products;",
        )
        .await
        .unwrap();
    admin.batch_execute("CREATE DATABASE shop").await.unwrap();
    let db = pgfresh::Database::new(&server.url("shop"), 4).unwrap();
    common::setup::setup(&db, 3).await.unwrap();
    let shop = common::connect(&server.url("shop")).await;
    // Disabled, with no slot: no apply worker runs, but the subscription knows the tables it
    // writes (from the publisher, here a database of the same server).
    shop.batch_execute(&format!(
        "CREATE SUBSCRIPTION catalog CONNECTION 'host=127.0.0.1 port={} user=postgres dbname=postgres'
         PUBLICATION catalog WITH (copy_data = false, enabled = false, create_slot = false, slot_name = NONE)",
        server.port
    ))
    .await
    .unwrap();
    let (passed, report) = doctor(&server.url("shop"), &common::redis_url());
    assert!(!passed, "{report}");
    assert_problem(
        &report,
        "trigger pgfresh_product on public.products fires on this server's own writes only, and subscription catalog writes public.products as a replica: changes there are not captured",
        "ALTER TABLE public.products ENABLE ALWAYS TRIGGER pgfresh_product; then run `sweep`",
    );
    assert_problem(
        &report,
        "trigger \"pgfresh_product:truncate\" on public.products fires on this server's own writes only",
        "ALTER TABLE public.products ENABLE ALWAYS TRIGGER \"pgfresh_product:truncate\";",
    );
    assert!(!report.contains("on public.reviews"), "{report}");
    shop.batch_execute(
        r#"ALTER TABLE products ENABLE ALWAYS TRIGGER pgfresh_product;
           ALTER TABLE products ENABLE ALWAYS TRIGGER "pgfresh_product:truncate";"#,
    )
    .await
    .unwrap();
    let (_, report) = doctor(&server.url("shop"), &common::redis_url());
    assert!(!report.contains("as a replica"), "{report}");
}
