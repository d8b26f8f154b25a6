//! `listen --http`: the Prometheus scrape, liveness and readiness, against real services; every
//! series is there from the first scrape; no request waits for the database.

mod common;

use std::time::Duration;

use common::servers::{TempRedis, free_port, http_get as get, metric};
use common::{TestEnv, eventually, test_settings, tweak};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn metrics_health_and_readiness_are_served() {
    let mut redis = TempRedis::start();
    let env = TestEnv::shop_with_redis(3, &redis.url()).await;
    let port = free_port();
    let settings = tweak(test_settings(), |s| {
        s.http = Some(format!("127.0.0.1:{port}"))
    });
    let listener = env.start_listener(settings);
    eventually("/readyz to say ready", || async {
        get(port, "/readyz").await == (200, "ready\n".into())
    })
    .await;
    assert_eq!(get(port, "/healthz").await, (200, "ok\n".into()));

    // Before anything happened, every series is there at zero: `absent()` and `rate()` alerts work
    // from the first scrape.
    let (_, first) = get(port, "/metrics").await;
    for zero in [
        "pgfresh_changes_applied_total 0",
        "pgfresh_changes_failed_total 0",
        "pgfresh_notifications_total 0",
        "pgfresh_reconnects_total{connection=\"listen\"} 0",
        "pgfresh_sweeps_total{reason=\"periodic\"} 0",
        "pgfresh_renders_total{fragment=\"product_card\"} 0",
        "pgfresh_writes_total{fragment=\"product_card\",result=\"refused\"} 0",
        "pgfresh_load_seconds_count{fragment=\"product_card\"} 0",
        "pgfresh_redis_write_seconds_count 0",
        "pgfresh_redis_can_evict 0",
        "pgfresh_standing_aside 0",
        "pgfresh_freshness_seconds_count{fragment=\"product_card\"} 0",
        "pgfresh_freshness_lag_seconds 0",
        "pgfresh_ready 1",
    ] {
        assert!(
            first.contains(zero),
            "{zero} missing from the first scrape:\n{first}"
        );
    }

    env.client()
        .await
        .batch_execute("UPDATE products SET name = 'Scraped' WHERE id = 1")
        .await
        .unwrap();
    env.wait_fresh(1).await;
    let expected = [
        "pgfresh_changes_claimed_total",
        "pgfresh_changes_applied_total",
        "pgfresh_renders_total{fragment=\"product_card\"}",
        "pgfresh_writes_total{fragment=\"product_card\",result=\"written\"}",
        "pgfresh_load_seconds_bucket{fragment=\"product_card\"",
        "pgfresh_render_seconds_bucket{fragment=\"product_card\"",
        "pgfresh_redis_write_seconds_bucket",
        "pgfresh_queue_pending",
        "pgfresh_queue_oldest_seconds",
        "pgfresh_parked_changes",
        "pgfresh_notification_queue_usage",
        "pgfresh_standing_aside",
    ];
    eventually("every metric in the scrape, the change counted", || async {
        let (status, body) = get(port, "/metrics").await;
        status == 200
            && expected.iter().all(|name| body.contains(name))
            && metric(&body, "pgfresh_changes_applied_total") >= 1.0
            && metric(&body, "pgfresh_renders_total{fragment=\"product_card\"}") >= 2.0
            && metric(
                &body,
                "pgfresh_freshness_seconds_count{fragment=\"product_card\"}",
            ) >= 1.0
            && body
                .contains("pgfresh_freshness_seconds_bucket{fragment=\"product_card\",le=\"300\"}")
    })
    .await;
    // A change that happened an hour ago (as its queue row says) counts as an hour stale.
    env.client()
        .await
        .batch_execute(
            "INSERT INTO pgfresh.changes (topic, key, enqueued_at)
             VALUES ('product', '2', now() - interval '1 hour')",
        )
        .await
        .unwrap();
    let within = "pgfresh_freshness_seconds_bucket{fragment=\"product_card\",le=\"300\"}";
    let count = "pgfresh_freshness_seconds_count{fragment=\"product_card\"}";
    let sum = "pgfresh_freshness_seconds_sum{fragment=\"product_card\"}";
    eventually("the hour-old change to count as an hour stale", || async {
        let (_, body) = get(port, "/metrics").await;
        metric(&body, count) >= 2.0
            && metric(&body, count) - metric(&body, within) == 1.0
            && metric(&body, sum) >= 3600.0
    })
    .await;

    // The status page: connections, queue, fragments, failures, as plain HTML.
    env.client()
        .await
        .batch_execute("INSERT INTO pgfresh.changes (topic, key) VALUES ('<nobody>', '1')")
        .await
        .unwrap();
    eventually("the status page to list the failure", || async {
        let (status, page) = get(port, "/").await;
        status == 200
            && page.contains("PostgreSQL LISTEN session up, Redis answering.")
            && page.contains("<td>product_card</td>")
            && page.contains(&format!("<td><code>{}* (plain)</code></td>", env.prefix))
            && page.contains("parked in pgfresh.failed")
            && page.contains("no fragment subscribes to topic &quot;&lt;nobody&gt;&quot;")
            && page.contains(r#"<meta http-equiv="refresh" content="2">"#)
    })
    .await;

    // A Redis that hangs (frozen: connected, silent) is caught by the PING's 2 s limit.
    let frozen = redis.freeze();
    eventually("/readyz to report Redis hanging", || async {
        get(port, "/readyz").await == (503, "Redis did not answer a PING within 2 s\n".into())
    })
    .await;
    let (_, scrape) = get(port, "/metrics").await;
    assert_eq!(
        metric(&scrape, "pgfresh_ready"),
        0.0,
        "not ready, says /metrics too"
    );
    drop(frozen);
    eventually("/readyz to recover", || async {
        get(port, "/readyz").await.0 == 200
    })
    .await;
    // A Redis that is gone is reported with its error.
    redis.stop();
    eventually("/readyz to report Redis down", || async {
        let (status, body) = get(port, "/readyz").await;
        status == 503 && body.starts_with("Redis: ")
    })
    .await;
    assert_eq!(get(port, "/healthz").await.0, 200, "alive all the same");
    redis.start_again();
    eventually("/readyz to recover", || async {
        get(port, "/readyz").await.0 == 200
    })
    .await;
    listener.stop().await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the HTTP server stops with the listener");
    env.cleanup().await;
}

#[tokio::test]
async fn a_taken_http_port_fails_start_up_with_a_clear_error() {
    let env = TestEnv::shop(1).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap();
    let settings = tweak(test_settings(), |s| s.http = Some(address.to_string()));
    let listener = env.start_listener(settings);
    let error = tokio::time::timeout(common::PATIENCE, listener.task)
        .await
        .expect("start-up fails at once")
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with(&format!("cannot serve HTTP on {address}")),
        "{error}"
    );
    let registered = env.registered_listeners().await;
    assert_eq!(
        registered, 0,
        "nothing registered for a listener that never started"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn the_endpoints_answer_from_samples_while_the_queue_is_locked() {
    let env = TestEnv::shop(2).await;
    let port = free_port();
    // A host name, resolved as any address is.
    let settings = tweak(test_settings(), |s| {
        s.http = Some(format!("localhost:{port}"))
    });
    let listener = env.start_listener(settings);
    let get = |path: &'static str| async move {
        let Ok(mut stream) = tokio::net::TcpStream::connect(("localhost", port)).await else {
            return (0, String::new());
        };
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, response)
    };
    eventually("/readyz to say ready", || async {
        get("/readyz").await.0 == 200
    })
    .await;
    eventually("the queue to be sampled", || async {
        get("/").await.1.contains("0 pending")
    })
    .await;

    // Whatever holds the queue (a long migration, a vacuum full, a stuck query), a request must not
    // wait for it: it would hold one of the listener's own connections while it waits.
    let mut locker = env.client().await;
    let txn = locker.transaction().await.unwrap();
    txn.batch_execute("LOCK TABLE pgfresh.changes IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    for path in ["/", "/readyz", "/metrics", "/healthz"] {
        let (status, _) = tokio::time::timeout(Duration::from_secs(5), get(path))
            .await
            .unwrap_or_else(|_| panic!("{path} waited for the locked queue"));
        assert_eq!(status, 200, "{path}");
    }
    txn.rollback().await.unwrap();
    listener.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn readiness_fails_while_the_listen_session_is_down() {
    let postgres = common::servers::TempPostgres::start();
    let admin = common::connect(&postgres.url("postgres")).await;
    admin.batch_execute("CREATE DATABASE shop").await.unwrap();
    drop(admin);
    let db = pgfresh::Database::new(&postgres.url("shop"), 8).unwrap();
    common::setup::setup(&db, 1).await.unwrap();
    let sink = pgfresh::RedisStore::connect(&common::redis_url())
        .await
        .unwrap();
    let prefix = format!("pgfresh_test_readyz_{}:card:", std::process::id());
    pgfresh::testing::set_fragment_marker(&sink, &prefix, 1)
        .await
        .unwrap();
    let port = free_port();
    let settings = tweak(test_settings(), |s| {
        s.http = Some(format!("127.0.0.1:{port}"))
    });
    let shutdown = pgfresh::Shutdown::new();
    let card = common::product_card::ProductCard;
    let listener = tokio::spawn(pgfresh::listen(
        db,
        sink.clone(),
        pgfresh::Fragments::new().with(&prefix, card),
        settings,
        shutdown.clone(),
    ));
    eventually("/readyz to say ready", || async {
        get(port, "/readyz").await.0 == 200
    })
    .await;
    postgres.stop();
    eventually("/readyz to report the LISTEN session down", || async {
        get(port, "/readyz").await == (503, "PostgreSQL LISTEN session is down\n".into())
    })
    .await;
    postgres.start_again();
    eventually("/readyz to recover", || async {
        get(port, "/readyz").await.0 == 200
    })
    .await;
    shutdown.cancel();
    tokio::time::timeout(common::PATIENCE, listener)
        .await
        .expect("the listener stops")
        .unwrap()
        .unwrap();
    let mut connection = sink.connection();
    let keys = common::test_keys(&mut connection, &prefix).await.unwrap();
    for key in keys {
        let _: () = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut connection)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn clients_that_never_finish_a_request_cannot_starve_the_listener_of_descriptors() {
    let env = TestEnv::shop(3).await;
    let redis = TempRedis::start();
    let port = free_port();
    // A listener with 128 file descriptors, as in a small container.
    let mut listener = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 128 && exec {} listen --sweep-interval 0 --poll-interval 200ms --http 127.0.0.1:{port}",
            common::shop_binary().display()
        ))
        .env("DATABASE_URL", &env.url)
        .env("REDIS_URL", redis.url())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually("the listener to be ready", || async {
        get(port, "/readyz").await.0 == 200
    })
    .await;
    // 160 clients that send half a request and then nothing.
    let mut half_open = Vec::new();
    for _ in 0..160 {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await;
        half_open.push(stream);
    }
    // The listener loses its PostgreSQL sessions meanwhile, and must open new ones.
    let db = env.client().await;
    db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name LIKE 'pgfresh%'",
        &[],
    )
    .await
    .unwrap();
    db.execute("UPDATE products SET price_cents = 4242 WHERE id = 2", &[])
        .await
        .unwrap();
    let store = pgfresh::RedisStore::connect(&redis.url()).await.unwrap();
    eventually("the change to be applied", || async {
        let card = store.get("shop:product_card:2:full").await.unwrap();
        card.is_some_and(|html| html.contains("$42.42"))
    })
    .await;
    // Every half-open connection is closed by the server.
    for stream in &mut half_open {
        let mut buffer = [0u8; 64];
        let read = tokio::time::timeout(common::PATIENCE, stream.read(&mut buffer)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "a connection still open: {read:?}"
        );
    }
    let _ = listener.kill();
    let _ = listener.wait();
    env.cleanup().await;
}
