//! Connecting as libpq would, and never showing a secret: passwords stay out of every printed line
//! whatever they contain; libpq's environment variables and password file are honoured with libpq's
//! precedence; the user's `options` reach pooled sessions; the pools hand out the session returned
//! last, and a listener closes those a peak opened once they go unused. (TLS settings: tests/tls.rs.)

mod common;

use common::servers::BoundedOutput;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use common::servers::{PostgresSetup, TempPostgres, TempRedis};
use common::{TestEnv, eventually, shop_binary, test_settings, tweak};
use pgfresh::Database;
use pgfresh::Environment;

const PASSWORD: &str = "s3cr/et?x";

fn pgfresh_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pgfresh"))
}

/// Runs a binary with exactly these environment variables (and PATH), none inherited.
fn run(binary: &PathBuf, vars: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(binary)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(vars.iter().copied())
        .output_bounded()
        .expect("binary runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A server that wants [`PASSWORD`] from user postgres, with pgfresh installed in database postgres.
async fn password_server() -> TempPostgres {
    let server = TempPostgres::start_with(PostgresSetup {
        password: Some(PASSWORD),
        ..PostgresSetup::default()
    });
    let environment = Environment::none().with_var("PGPASSWORD", PASSWORD);
    let db = Database::with_environment(&server.url("postgres"), 1, &environment).unwrap();
    pgfresh::install(&db).await.unwrap();
    server
}

#[tokio::test]
async fn passwords_never_appear_in_any_line_pgfresh_prints() {
    let secrets = ["pa/ss", "pa?ss", "p@ss", "it's", "with space"];
    let database_urls = [
        "postgres://postgres:pa/ss@127.0.0.1:1/postgres".to_string(),
        "postgres://postgres:pa?ss@127.0.0.1:1/postgres".to_string(),
        "postgres://postgres:p@ss@127.0.0.1:1/postgres".to_string(),
        "postgres://postgres:pa%2Fss@127.0.0.1:1/postgres".to_string(),
        "postgres://postgres@127.0.0.1:1/postgres?password=pa/ss".to_string(),
        "host=127.0.0.1 port=1 user=postgres password = 'with space'".to_string(),
        r"host=127.0.0.1 port=1 password='it\'s' user=postgres".to_string(),
        "host=127.0.0.1 port=1 password=pa/ss bogus_option=1".to_string(),
        "host=127.0.0.1 port=1 password='unterminated pa/ss".to_string(),
    ];
    for url in &database_urls {
        let out = run(&pgfresh_binary(), &[("DATABASE_URL", url)], &["status"]);
        let printed = text(&out);
        assert!(!out.status.success(), "{url}: {printed}");
        assert_eq!(printed.lines().count(), 1, "{url}: {printed}");
        for secret in secrets {
            assert!(!printed.contains(secret), "{url} printed {printed}");
        }
    }
    let env = TestEnv::shop(1).await;
    for redis_url in [
        "redis://:pa/ss@127.0.0.1:1/0",
        "redis://user:p@ss@127.0.0.1:1/0",
        "redis://:pa%2Fss@127.0.0.1:1/0",
    ] {
        let out = run(
            &shop_binary(),
            &[("DATABASE_URL", &env.url), ("REDIS_URL", redis_url)],
            &["sweep"],
        );
        let printed = text(&out);
        assert!(!out.status.success(), "{redis_url}: {printed}");
        for secret in secrets {
            assert!(!printed.contains(secret), "{redis_url} printed {printed}");
        }
    }
    env.cleanup().await;
}

#[tokio::test]
async fn libpq_variables_and_the_password_file_are_honoured_with_libpqs_precedence() {
    let server = password_server().await;
    let port = server.port.to_string();
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let shown = format!("at postgres://postgres@127.0.0.1:{port}/postgres");

    // PGPASSWORD completes a URL without a password.
    let out = run(
        &pgfresh_binary(),
        &[("DATABASE_URL", &url), ("PGPASSWORD", PASSWORD)],
        &["status"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&shown), "{}", text(&out));
    assert!(!text(&out).contains(PASSWORD));

    // PGHOST, PGPORT, PGUSER and PGDATABASE stand in for a URL altogether.
    let out = run(
        &pgfresh_binary(),
        &[
            ("PGHOST", "127.0.0.1"),
            ("PGPORT", &port),
            ("PGUSER", "postgres"),
            ("PGDATABASE", "postgres"),
            ("PGPASSWORD", PASSWORD),
        ],
        &["status"],
    );
    assert!(out.status.success(), "{}", text(&out));

    // A password in the URL wins over PGPASSWORD.
    let with_password = format!("postgres://postgres:s3cr%2Fet%3Fx@127.0.0.1:{port}/postgres");
    let out = run(
        &pgfresh_binary(),
        &[("DATABASE_URL", &with_password), ("PGPASSWORD", "wrong")],
        &["status"],
    );
    assert!(out.status.success(), "{}", text(&out));

    // A wrong password says to check the password, not to start the server, and shows none.
    let out = run(
        &pgfresh_binary(),
        &[("DATABASE_URL", &url), ("PGPASSWORD", "wrong")],
        &["status"],
    );
    assert!(!out.status.success());
    let printed = text(&out);
    assert!(printed.contains("check the user and password"), "{printed}");
    assert!(
        !printed.contains("wrong") && !printed.contains("start it"),
        "{printed}"
    );

    // The password file, as PGPASSFILE or ~/.pgpass, and only when only its owner can read it.
    let home = std::env::temp_dir().join(format!("pgfresh-home-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    let passfile = home.join(".pgpass");
    std::fs::write(
        &passfile,
        format!("# comment\nother:5432:*:*:nope\n127.0.0.1:{port}:*:postgres:{PASSWORD}\n"),
    )
    .unwrap();
    let chmod = |mode| {
        std::fs::set_permissions(
            &passfile,
            std::os::unix::fs::PermissionsExt::from_mode(mode),
        )
        .unwrap()
    };
    chmod(0o600);
    let home_str = home.to_str().unwrap();
    let out = run(
        &pgfresh_binary(),
        &[("DATABASE_URL", &url), ("HOME", home_str)],
        &["status"],
    );
    assert!(out.status.success(), "~/.pgpass: {}", text(&out));
    let out = run(
        &pgfresh_binary(),
        &[
            ("DATABASE_URL", &url),
            ("PGPASSFILE", passfile.to_str().unwrap()),
        ],
        &["status"],
    );
    assert!(out.status.success(), "PGPASSFILE: {}", text(&out));
    chmod(0o644);
    let out = run(
        &pgfresh_binary(),
        &[("DATABASE_URL", &url), ("HOME", home_str)],
        &["status"],
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("chmod 0600"), "{}", text(&out));

    // PGSSLMODE is honoured too: this server speaks no TLS, so requiring it fails.
    let out = run(
        &pgfresh_binary(),
        &[
            ("DATABASE_URL", &url),
            ("PGPASSWORD", PASSWORD),
            ("PGSSLMODE", "require"),
        ],
        &["status"],
    );
    assert!(!out.status.success(), "{}", text(&out));
    let _ = std::fs::remove_dir_all(&home);
}

#[tokio::test]
async fn the_listening_line_and_status_show_the_connection_without_its_password() {
    let server = password_server().await;
    let with_password = format!(
        "postgres://postgres:s3cr%2Fet%3Fx@127.0.0.1:{}/postgres",
        server.port
    );
    let redis = TempRedis::start_with(&["--requirepass", "r3dis/pw"]);
    let redis_url = format!("redis://:r3dis%2Fpw@127.0.0.1:{}", redis.port);
    let environment = Environment::none().with_var("PGPASSWORD", PASSWORD);
    let db = Database::with_environment(&server.url("postgres"), 2, &environment).unwrap();
    common::setup::setup(&db, 2).await.unwrap();
    let status = run(
        &shop_binary(),
        &[("DATABASE_URL", &with_password), ("REDIS_URL", &redis_url)],
        &["status"],
    );
    let printed = text(&status);
    assert!(status.status.success(), "{printed}");
    assert!(
        printed.contains(&format!(
            "at postgres://postgres@127.0.0.1:{}/postgres",
            server.port
        )),
        "{printed}"
    );
    assert!(
        printed.contains(&format!(
            "redis: redis://127.0.0.1:{} answering",
            redis.port
        )),
        "{printed}"
    );

    let mut listener = Command::new(shop_binary())
        .args(["listen", "--sweep-interval", "0", "--log-format", "json"])
        .env("DATABASE_URL", &with_password)
        .env("REDIS_URL", &redis_url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let client = common::connect(&with_password).await;
    common::eventually("the listener to start", || {
        common::listener_started(&client)
    })
    .await;
    Command::new("kill")
        .args(["-TERM", &listener.id().to_string()])
        .status()
        .unwrap();
    let exit = tokio::time::timeout(common::PATIENCE, async {
        loop {
            if let Some(exit) = listener.try_wait().unwrap() {
                break exit;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the listener stops on SIGTERM");
    assert!(exit.success());
    let mut logs = String::new();
    std::io::Read::read_to_string(&mut listener.stderr.take().unwrap(), &mut logs).unwrap();
    let listening = logs
        .lines()
        .find(|line| line.contains("listening for changes"))
        .unwrap_or_else(|| panic!("{logs}"));
    assert!(
        listening.contains(&format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            server.port
        )) && listening.contains(&format!("redis://127.0.0.1:{}", redis.port)),
        "{listening}"
    );
    for secret in ["s3cr", "r3dis"] {
        assert!(!logs.contains(secret), "{logs}");
    }
}

#[tokio::test]
async fn the_users_options_reach_pooled_sessions_beside_pgfreshs_own() {
    let env = TestEnv::empty().await;
    let url = format!(
        "{}?options=-c%20statement_timeout%3D1234%20-c%20work_mem%3D5MB",
        env.url
    );
    let db = Database::new(&url, 1).unwrap();
    let client = db.get().await.unwrap();
    let mut settings = Vec::new();
    for name in ["statement_timeout", "work_mem", "synchronous_commit", "jit"] {
        let row = client
            .query_one(&format!("SHOW {name}"), &[])
            .await
            .unwrap();
        settings.push(row.get::<_, String>(0));
    }
    assert_eq!(settings, ["1234ms", "5MB", "off", "off"]);
    drop(client);
    drop(db);
    env.cleanup().await;
}

/// The session handed out next is the one returned last, as PgBouncer reuses its server connections:
/// at a few batches a second one or two PostgreSQL backends do the work, their caches warm, instead
/// of every session in the pool by turns (BENCHMARKS.md "Sessions reused last in, first out").
#[tokio::test]
async fn the_session_returned_last_is_the_next_one_handed_out() {
    let env = TestEnv::empty().await;
    let db = Database::new(&env.url, 3).unwrap();
    let sessions = [
        db.get().await.unwrap(),
        db.get().await.unwrap(),
        db.get().await.unwrap(),
    ];
    let mut pids = Vec::new();
    for session in &sessions {
        pids.push(backend_pid(session).await);
    }
    // Returned in another order than they were opened: the middle one last.
    let [first, second, third] = sessions;
    drop(first);
    drop(third);
    drop(second);
    for _ in 0..3 {
        let session = db.get().await.unwrap();
        assert_eq!(backend_pid(&session).await, pids[1], "sessions {pids:?}");
    }
    drop(db);
    env.cleanup().await;
}

/// Closing a database ends its idle sessions, and cuts the one still running a statement rather
/// than wait for the statement: a stalled batch at exit delays the process by a moment, not by as
/// long as its statement would run.
#[tokio::test]
async fn a_closed_database_ends_its_idle_sessions_and_cuts_a_busy_one() {
    let env = TestEnv::empty().await;
    let db = Database::new(&env.url, 3).unwrap();
    let observer = env.client().await;
    let (idle, busy) = (db.get().await.unwrap(), db.get().await.unwrap());
    let busy_pid = backend_pid(&busy).await;
    drop(idle);
    // The server notices the cut connection within a tenth of a second, not after its sleep.
    busy.batch_execute("SET client_connection_check_interval = 100")
        .await
        .unwrap();
    let sleeping = tokio::spawn(async move {
        let _ = busy.batch_execute("SELECT pg_sleep(60)").await;
        busy
    });
    eventually("the statement to run", || async {
        let sql =
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND query LIKE '%pg_sleep%'";
        observer
            .query_one(sql, &[&busy_pid])
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    })
    .await;
    assert_eq!(db.close().await, 1, "the busy session is the one cut");
    assert!(
        db.get().await.is_err(),
        "a closed database hands out no session"
    );
    sleeping.abort();
    let _ = sleeping.await;
    eventually("no session of the database left", || async {
        let sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()";
        common::value::<i64>(&observer, sql).await == 0
    })
    .await;
    env.cleanup().await;
}

/// A peak's sessions, unused since, are closed by the listener's heartbeat, all but the one returned
/// last: they no longer hold a backend of the server, nor go stale behind a firewall.
#[tokio::test]
async fn a_listener_closes_the_pooled_sessions_a_peak_opened_once_unused() {
    let env = TestEnv::shop(3).await;
    let settings = tweak(test_settings(), |s| {
        s.idle_session_lifetime = Duration::from_millis(200)
    });
    let listener = env.start_listener(settings);
    env.rename(1, "Before").await;
    env.wait_name(1, "Before").await;

    // The listener's pools are the test's: four sessions for user code at once.
    let sessions = [
        env.db.get().await.unwrap(),
        env.db.get().await.unwrap(),
        env.db.get().await.unwrap(),
        env.db.get().await.unwrap(),
    ];
    let mut pids = Vec::new();
    for session in &sessions {
        pids.push(backend_pid(session).await);
    }
    drop(sessions);
    let observer = env.client().await;
    // The listener hands out no session for user code while nothing changes: the one returned
    // last stays.
    eventually(
        "the peak's sessions closed, but the one returned last",
        || async {
            let sql = "SELECT array_agg(pid) FROM pg_stat_activity WHERE pid = ANY($1)";
            let row = observer.query_one(sql, &[&pids]).await.unwrap();
            row.get::<_, Option<Vec<i32>>>(0) == Some(vec![pids[3]])
        },
    )
    .await;

    // What the pools still hold, or open again, serves the next change.
    env.rename(2, "After").await;
    env.wait_name(2, "After").await;
    listener.stop().await;
    env.cleanup().await;
}

async fn backend_pid(client: &pgfresh::tokio_postgres::Client) -> i32 {
    let row = client.query_one("SELECT pg_backend_pid()", &[]).await;
    row.unwrap().get(0)
}
