//! The command line as a user runs it: the shop example binary and the plain pgfresh binary, as child
//! processes. Failures are one clear line on stderr and a non-zero exit, never a panic, a backtrace or a
//! password.

mod common;

use common::cli::{assert_one_clear_error, run, stderr, stdout};
use common::{TestEnv, shop_binary};
use std::path::PathBuf;
use std::process::Command;

#[test]
fn unreachable_postgres_gives_one_clear_line_without_the_password() {
    let out = run(
        &PathBuf::from(env!("CARGO_BIN_EXE_pgfresh")),
        "postgres://app:hunter2@127.0.0.1:1/shop",
        "redis://127.0.0.1:6379",
        &["status"],
    );
    assert_one_clear_error(
        &out,
        "cannot connect to PostgreSQL at postgres://app@127.0.0.1:1/shop: ",
    );
    assert!(stderr(&out).contains("DATABASE_URL"), "says what to do");
}

#[tokio::test]
async fn unreachable_redis_gives_one_clear_line_without_the_password() {
    let env = TestEnv::shop(2).await;
    let out = run(
        &shop_binary(),
        &env.url,
        "redis://:hunter2@127.0.0.1:1/0",
        &["sweep"],
    );
    assert_one_clear_error(&out, "cannot connect to Redis at redis://127.0.0.1:1: ");
    assert!(stderr(&out).contains("REDIS_URL"), "says what to do");
    env.cleanup().await;
}

#[tokio::test]
async fn commands_on_a_database_without_pgfresh_say_to_install_it() {
    let env = TestEnv::empty().await;
    for args in [&["status"][..], &["sweep"], &["retry-failed"]] {
        let out = run(&shop_binary(), &env.url, &common::redis_url(), args);
        assert_one_clear_error(&out, "pgfresh is not installed in database");
        assert!(stderr(&out).contains("install"), "{}", stderr(&out));
    }
    env.cleanup().await;
}

#[tokio::test]
async fn shop_setup_render_sweep_and_status_work_from_the_command_line() {
    let env = TestEnv::empty().await;
    // A Redis of its own: the shop binary writes under the shop's real prefix.
    let own_redis = common::servers::TempRedis::start();
    let redis = own_redis.url();
    let setup = run(
        &shop_binary(),
        &env.url,
        &redis,
        &["setup", "--products", "12"],
    );
    assert!(setup.status.success(), "{}", stderr(&setup));
    assert!(
        stdout(&setup).contains("12 products (12 loaded now)"),
        "{}",
        stdout(&setup)
    );
    let again = run(
        &shop_binary(),
        &env.url,
        &redis,
        &["setup", "--products", "12"],
    );
    assert!(
        stdout(&again).contains("12 products (0 loaded now)"),
        "setup is idempotent: {}",
        stdout(&again)
    );

    // render touches nothing: it does not even need Redis.
    let no_redis = "redis://127.0.0.1:1";
    let render = run(
        &shop_binary(),
        &env.url,
        no_redis,
        &["render", "product_card", "3", "--variant", "full"],
    );
    assert!(render.status.success(), "{}", stderr(&render));
    assert_eq!(
        stdout(&render).trim_end(),
        env.fresh_render(3, "full").await.unwrap()
    );

    // Without --variant, the first is rendered, and stderr says which (stdout stays the HTML).
    let first = run(
        &shop_binary(),
        &env.url,
        no_redis,
        &["render", "product_card", "3"],
    );
    assert!(first.status.success(), "{}", stderr(&first));
    assert_eq!(
        stdout(&first).trim_end(),
        env.fresh_render(3, "compact").await.unwrap()
    );
    assert_eq!(
        stderr(&first).trim(),
        "product_card 3: variant compact (the first of compact, full; choose with --variant)\n\
         stored in Redis at shop:product_card:3:compact (plain)"
    );

    let missing = run(
        &shop_binary(),
        &env.url,
        &redis,
        &["render", "product_card", "999"],
    );
    assert_one_clear_error(&missing, "product_card has no row for key \"999\"");
    let bad_variant = run(
        &shop_binary(),
        &env.url,
        &redis,
        &["render", "product_card", "1", "--variant", "huge"],
    );
    assert_one_clear_error(
        &bad_variant,
        "product_card has no variant \"huge\"; it has: compact, full",
    );

    let sweep = run(&shop_binary(), &env.url, &redis, &["sweep"]);
    assert!(sweep.status.success(), "{}", stderr(&sweep));
    assert!(
        stdout(&sweep).starts_with("sweep: 24 fragments rendered, "),
        "{}",
        stdout(&sweep)
    );
    let written = pgfresh::RedisStore::connect(&redis).await.unwrap();
    for id in [1, 12] {
        for variant in ["compact", "full"] {
            assert_eq!(
                written
                    .get(&format!("shop:product_card:{id}:{variant}"))
                    .await
                    .unwrap(),
                env.fresh_render(id, variant).await
            );
        }
    }

    let status = run(&shop_binary(), &env.url, &redis, &["status"]);
    assert!(status.status.success(), "{}", stderr(&status));
    let text = stdout(&status);
    assert!(text.contains("products.id -> topic product"), "{text}");
    assert!(
        text.contains("reviews.product_id -> topic product"),
        "{text}"
    );
    assert!(text.contains("queue: 0 pending"), "{text}");

    let client = env.client().await;
    client
        .batch_execute("UPDATE products SET name = 'x' WHERE id = 1")
        .await
        .unwrap();
    let status = stdout(&run(&shop_binary(), &env.url, &redis, &["status"]));
    assert!(status.contains("queue: 1 pending (oldest "), "{status}");
    assert!(!status.contains("warning"), "{status}");
    client
        .batch_execute("ALTER TABLE reviews DISABLE TRIGGER pgfresh_product")
        .await
        .unwrap();
    let status = stdout(&run(&shop_binary(), &env.url, &redis, &["status"]));
    assert!(
        status.contains("warning: trigger pgfresh_product on public.reviews is disabled"),
        "{status}"
    );
    env.cleanup().await;
}

#[test]
fn the_plain_binary_explains_that_listening_needs_your_fragments() {
    let out = run(
        &PathBuf::from(env!("CARGO_BIN_EXE_pgfresh")),
        &common::admin_url(),
        &common::redis_url(),
        &["listen"],
    );
    assert_one_clear_error(&out, "this binary has no fragments");
}

#[test]
fn bad_flag_values_are_rejected_with_a_hint() {
    for (args, hint) in [
        (
            &["listen", "--sweep-interval", "often"][..],
            "examples: 500ms, 1s, 10m, 1h, 0",
        ),
        (&["listen", "--poll-interval", "0"], "at least 10ms"),
        (
            &["listen", "--sweep-interval", "300000000000y"],
            "at most 366d",
        ),
        (&["listen", "--serve-wait", "51s"], "at most 50s"),
        (&["listen", "--http", "9187"], "expected host:port"),
        (
            &["listen", "--http", "nowhere.invalid:9187"],
            "cannot resolve nowhere.invalid:9187",
        ),
    ] {
        let out = run(
            &PathBuf::from(env!("CARGO_BIN_EXE_pgfresh")),
            &common::admin_url(),
            &common::redis_url(),
            args,
        );
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains(hint), "{args:?}: {}", stderr(&out));
    }
    // A host name is an address like any other.
    let out = run(
        &shop_binary(),
        &common::admin_url(),
        &common::redis_url(),
        &[
            "demo",
            "--web",
            "localhost:1",
            "--http",
            "localhost:2",
            "--help",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn version_and_help_say_what_a_user_needs() {
    let out = run(&shop_binary(), "", "", &["--version"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The version of pgfresh the binary was built with.
    assert_eq!(
        stdout(&out).trim(),
        format!("pgfresh {}", env!("CARGO_PKG_VERSION"))
    );

    let help = stdout(&run(&shop_binary(), "", "", &["listen", "--help"]));
    for heading in ["Listener:", "Sweep:", "Connections:", "Logging:"] {
        assert!(help.contains(heading), "{heading} in {help}");
    }
    // Each group's flags under its heading: the connection flags come after the listener's.
    assert!(help.find("--poll-interval").unwrap() < help.find("Connections:").unwrap());
    assert!(help.find("--database-url").unwrap() > help.find("Connections:").unwrap());
    assert!(
        help.contains("Serve the status page (/), /metrics"),
        "{help}"
    );
    assert!(help.contains("PGPASSWORD"), "{help}");
    assert!(!help.contains("REDIS_CLUSTER="), "{help}");

    // The plain binary points to a README section that exists.
    let out = run(
        &PathBuf::from(env!("CARGO_BIN_EXE_pgfresh")),
        &common::admin_url(),
        &common::redis_url(),
        &["listen"],
    );
    let readme = include_str!("../README.md");
    let named = stderr(&out)
        .split("see README, \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default()
        .to_string();
    assert!(
        readme.contains(&format!("## {named}\n")),
        "README has no section {named:?}"
    );
}

#[tokio::test]
async fn connection_failures_advise_what_fits_the_failure() {
    let env = TestEnv::shop(1).await;
    let out = run(
        &shop_binary(),
        &env.url,
        "redis://127.0.0.1:6379/99",
        &["sweep"],
    );
    assert_one_clear_error(&out, "fewer databases");
    let redis = common::servers::TempRedis::start_with(&["--requirepass", "right"]);
    let wrong = format!("redis://:hunter2@127.0.0.1:{}/0", redis.port);
    let out = run(&shop_binary(), &env.url, &wrong, &["sweep"]);
    assert_one_clear_error(&out, "check the user and password in --redis-url");
    let missing = env.url.replace(&env.name, "no_such_database");
    let out = run(&shop_binary(), &missing, &common::redis_url(), &["status"]);
    assert_one_clear_error(&out, "create it, or name another");
    env.cleanup().await;
}

#[tokio::test]
async fn sigterm_and_sigint_stop_the_listener_cleanly_and_json_logs_are_json() {
    let env = TestEnv::shop(3).await;
    // A Redis of its own: the shop binary writes under the shop's real prefix.
    let redis = common::servers::TempRedis::start();
    let db = env.client().await;
    for signal in ["-TERM", "-INT"] {
        let mut listener = Command::new(shop_binary())
            .args(["listen", "--sweep-interval", "0", "--log-format", "json"])
            .env("DATABASE_URL", &env.url)
            .env("REDIS_URL", redis.url())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        common::eventually("the listener to start", || common::listener_started(&db)).await;
        let status = Command::new("kill")
            .args([signal, &listener.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let stopped = std::time::Instant::now();
        let exit = loop {
            if let Some(exit) = listener.try_wait().unwrap() {
                break exit;
            }
            if stopped.elapsed() > std::time::Duration::from_secs(10) {
                let _ = listener.kill();
                panic!("still running 10 s after {signal}");
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert!(exit.success(), "{signal}: exit status {exit:?}");
        let mut logs = String::new();
        std::io::Read::read_to_string(&mut listener.stderr.take().unwrap(), &mut logs).unwrap();
        assert!(
            logs.contains("listening for changes") && logs.contains("listener stopped"),
            "{logs}"
        );
        for line in logs.lines() {
            assert!(
                line.starts_with('{')
                    && line.ends_with('}')
                    && (line.contains("\"level\":\"INFO\"") || line.contains("\"level\":\"WARN\"")),
                "--log-format json writes one JSON object per line: {line}"
            );
        }
        let n: i64 = db
            .query_one("SELECT count(*) FROM pgfresh.listeners", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "{signal}: it deregistered on the way out");
    }
    env.cleanup().await;
}

#[tokio::test]
async fn retry_failed_requeues_parked_changes_and_a_sweep_with_a_failed_key_exits_non_zero() {
    let env = TestEnv::shop(3).await;
    let redis = common::servers::TempRedis::start();
    let db = env.client().await;
    db.batch_execute(
        "INSERT INTO pgfresh.failed (change_id, topic, key, enqueued_at, attempts, error)
         VALUES (1, 'product', '2', now(), 10, 'it failed')",
    )
    .await
    .unwrap();
    let out = run(&shop_binary(), &env.url, &redis.url(), &["retry-failed"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        "1 parked changes put back in the queue"
    );
    assert_eq!(env.parked().await, 0);
    let requeued: (String, String, i32) = {
        let row = db
            .query_one("SELECT topic, key, attempts FROM pgfresh.changes", &[])
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!(requeued, ("product".into(), "2".into(), 0), "a fresh start");

    // Redis refuses product 3's full card (its ticket key holds a list): the sweep ends, queues the
    // key, and says so with a non-zero exit.
    let _: () = redis::cmd("RPUSH")
        .arg("pgfresh:ticket:shop:product_card:3:full")
        .arg("x")
        .query_async(
            &mut redis::Client::open(redis.url())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap(),
        )
        .await
        .unwrap();
    let out = run(&shop_binary(), &env.url, &redis.url(), &["sweep"]);
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains("1 errors")
            && stdout(&out).contains("1 failed keys queued for retry"),
        "{}",
        stdout(&out)
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_sweep_from_the_command_line_settles_the_truncations_it_covers() {
    let redis = common::servers::TempRedis::start();
    let env = TestEnv::shop(4).await;
    let db = env.client().await;
    db.batch_execute("TRUNCATE reviews").await.unwrap();
    let recorded = || async {
        db.query_one("SELECT count(*) FROM pgfresh.truncations", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(recorded().await, 1);

    // A topic no fragment of this binary handles is left for a binary that does.
    db.batch_execute("INSERT INTO pgfresh.truncations (topic, table_oid) VALUES ('elsewhere', 0)")
        .await
        .unwrap();
    let one = run(
        &shop_binary(),
        &env.url,
        &redis.url(),
        &["sweep", "--fragment", "product_card"],
    );
    assert!(one.status.success(), "{}", stderr(&one));
    let left: Vec<String> = db
        .query("SELECT topic FROM pgfresh.truncations", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        left,
        ["elsewhere"],
        "the shop's one fragment was swept: only the foreign topic's row is left"
    );
    let status = run(&shop_binary(), &env.url, &redis.url(), &["status"]);
    assert!(
        stdout(&status).contains("1 truncated tables awaiting a sweep"),
        "{}",
        stdout(&status)
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_listener_holds_no_more_connections_than_readme_says() {
    let env = TestEnv::shop(100).await;
    let redis = common::servers::TempRedis::start();
    let db = env.client().await;
    db.batch_execute("UPDATE products SET price_cents = price_cents + 1")
        .await
        .unwrap();
    // Only the listener's sessions count: the test's own (its setup ran through a pgfresh pool,
    // named like the listener's) started before it.
    let spawned_at: std::time::SystemTime = db
        .query_one("SELECT clock_timestamp()", &[])
        .await
        .unwrap()
        .get(0);
    // Redis is empty: the listener sweeps (in pages of 5) while it works through the queue.
    let mut listener = Command::new(shop_binary())
        .args([
            "listen",
            "--workers",
            "1",
            "--sweep-concurrency",
            "1",
            "--page-size",
            "5",
        ])
        .env("DATABASE_URL", &env.url)
        .env("REDIS_URL", redis.url())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let marker = pgfresh::RedisStore::connect(&redis.url()).await.unwrap();
    let most = std::sync::atomic::AtomicI64::new(0);
    common::eventually("the sweep and the queue to be done", || async {
        let connections: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = $1 AND application_name LIKE 'pgfresh%' AND backend_start >= $2",
                &[&env.name, &spawned_at],
            )
            .await
            .unwrap()
            .get(0);
        most.fetch_max(connections, std::sync::atomic::Ordering::SeqCst);
        marker
            .get("pgfresh:fragment:shop:product_card:")
            .await
            .unwrap()
            .is_some()
            && env.pending().await == 0
    })
    .await;
    let _ = Command::new("kill")
        .args(["-TERM", &listener.id().to_string()])
        .status();
    common::eventually("the listener to exit", || {
        let exited = listener.try_wait().unwrap().is_some();
        async move { exited }
    })
    .await;
    // README: one LISTEN connection, one for the sweep lock, and up to
    // 2 x (--workers + --sweep-concurrency) + 4 pooled ones.
    let bound = 1 + 1 + (2 * (1 + 1) + 4);
    let most = most.into_inner();
    assert!(
        most >= 2 && most <= bound,
        "{most} connections, at most {bound}"
    );
    env.cleanup().await;
}
