//! TLS to PostgreSQL and Redis: `sslmode` is read as libpq reads it and never quietly downgraded,
//! certificates are verified when the URL asks for it, and a `rediss://` URL encrypts the Redis
//! connection, refusing a server it cannot trust with one clear line; a pooled session over TLS
//! ends without a line in the server's log, and so does every session of a process that exits.

mod common;

use common::cli::{assert_one_clear_error, run, stderr, stdout};
use common::servers::{BoundedOutput, TempPostgres, TempRedis, make_certificates};
use common::{TestEnv, eventually, shop_binary};
use pgfresh::{Database, Environment};
use std::process::Command;

#[tokio::test]
async fn postgres_tls_is_used_when_the_url_asks_for_it() {
    let env = TestEnv::empty().await;
    let plain = Database::new(&env.url, 1).unwrap();
    assert!(!encrypted(&plain).await.unwrap(), "no sslmode: plain text");

    let server_ssl: String = env
        .client()
        .await
        .query_one("SHOW ssl", &[])
        .await
        .unwrap()
        .get(0);
    let required = Database::new(&format!("{}?sslmode=require", env.url), 1).unwrap();
    if server_ssl == "on" {
        assert!(
            encrypted(&required).await.unwrap(),
            "sslmode=require: encrypted"
        );
    } else {
        let error = encrypted(&required).await.unwrap_err().to_string();
        assert!(error.starts_with("cannot connect to PostgreSQL"), "{error}");
    }
    env.cleanup().await;
}

#[tokio::test]
async fn postgres_certificates_are_verified_when_the_url_asks_for_it() {
    let server = TempPostgres::start_tls();
    let ca = server.certificate_authority();
    let stranger = std::env::temp_dir().join(format!("pgfresh-other-ca-{}", server.port));
    std::fs::create_dir_all(&stranger).unwrap();
    make_certificates(&stranger);
    let connect = |host: &str, params: String| {
        let url = format!(
            "postgres://postgres@{host}:{}/postgres?{params}",
            server.port
        );
        async move { encrypted(&Database::new(&url, 1)?).await }
    };
    let with_ca =
        |mode: &str, ca: &std::path::Path| format!("sslmode={mode}&sslrootcert={}", ca.display());

    // The certificate names 127.0.0.1 and is signed by the server's CA.
    assert!(
        connect("127.0.0.1", with_ca("verify-full", &ca))
            .await
            .unwrap()
    );
    assert!(
        connect("127.0.0.1", with_ca("verify-ca", &ca))
            .await
            .unwrap()
    );
    // Through another name: verify-ca accepts it, verify-full does not.
    assert!(
        connect("localhost", with_ca("verify-ca", &ca))
            .await
            .unwrap()
    );
    let wrong_name = connect("localhost", with_ca("verify-full", &ca))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        wrong_name.starts_with("refusing PostgreSQL") && wrong_name.contains("sslrootcert"),
        "{wrong_name}"
    );
    assert!(wrong_name.contains("certificate"), "{wrong_name}");
    // Signed by a CA we do not trust: refused whatever the name. `require` still encrypts.
    for mode in ["verify-ca", "verify-full"] {
        let impostor = connect("127.0.0.1", with_ca(mode, &stranger.join("ca.pem")))
            .await
            .unwrap_err()
            .to_string();
        assert!(impostor.contains("certificate"), "{mode}: {impostor}");
        assert_eq!(impostor.lines().count(), 1, "{impostor}");
    }
    // `require` encrypts without verifying; but given root certificates it verifies the chain, as
    // libpq's `require` does.
    assert!(
        connect("127.0.0.1", "sslmode=require".into())
            .await
            .unwrap()
    );
    let required = connect("127.0.0.1", with_ca("require", &stranger.join("ca.pem")))
        .await
        .unwrap_err()
        .to_string();
    assert!(required.contains("certificate"), "{required}");
    // No roots to verify against: a clear error before connecting.
    let missing = connect(
        "127.0.0.1",
        "sslmode=verify-full&sslrootcert=/nonexistent.pem".into(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        missing.starts_with("invalid PostgreSQL URL") && missing.contains("sslrootcert=system"),
        "{missing}"
    );
    let _ = std::fs::remove_dir_all(&stranger);
}

/// A pooled session closed over TLS ends as PostgreSQL expects (the client's Terminate, then the
/// TLS session's close), at shutdown as after a peak: the server logs nothing for it, where a
/// connection cut mid-stream logs "could not receive data from client".
#[tokio::test]
async fn a_pooled_tls_session_closed_leaves_no_line_in_the_servers_log() {
    let server = TempPostgres::start_tls();
    let db = Database::new(&format!("{}?sslmode=require", server.url("postgres")), 2).unwrap();
    assert!(encrypted(&db).await.unwrap());
    let observer = Database::new(&server.url("postgres"), 1).unwrap();
    let observer = observer.get().await.unwrap();
    let encrypted_sessions = || async {
        let sql = "SELECT count(*) FROM pg_stat_ssl WHERE ssl";
        common::value::<i64>(&observer, sql).await
    };
    assert!(encrypted_sessions().await > 0);
    drop(db);
    eventually("the session closed", || async {
        encrypted_sessions().await == 0
    })
    .await;
    let log = server.log();
    assert!(!log.contains("could not receive data"), "{log}");
}

/// A program that closes its database before its runtime goes (as every command does when it is
/// done) ends every session as PostgreSQL expects: the runtime, dropped with connections still
/// open, would cut them, and the server would log each.
#[test]
fn a_database_closed_before_the_runtime_goes_leaves_no_line_in_the_servers_log() {
    let server = TempPostgres::start_tls();
    let url = format!("{}?sslmode=require", server.url("postgres"));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let db = Database::new(&url, 3).unwrap();
        // Three held at once: the pool opens three sessions.
        let (a, b, c) = tokio::join!(db.get(), db.get(), db.get());
        let sessions = [a.unwrap(), b.unwrap(), c.unwrap()];
        for session in &sessions {
            let sql = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
            assert!(session.query_one(sql, &[]).await.unwrap().get::<_, bool>(0));
        }
        drop(sessions);
        assert_eq!(
            db.close().await,
            0,
            "every session ended before the wait was over"
        );
        assert!(
            db.get().await.is_err(),
            "a closed database hands out no session"
        );
    });
    drop(runtime);
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        // Without TLS, and closed before its runtime goes too: its own session, cut, would be
        // the line the server logs.
        let url = format!("{}?sslmode=disable", server.url("postgres"));
        let db = Database::new(&url, 1).unwrap();
        let observer = db.get().await.unwrap();
        eventually("the sessions to end", || async {
            let sql = "SELECT count(*) FROM pg_stat_ssl WHERE ssl";
            common::value::<i64>(&observer, sql).await == 0
        })
        .await;
        drop(observer);
        db.close().await;
    });
    let log = server.log();
    assert!(!log.contains("could not receive data"), "{log}");
}

/// A listener stopped with SIGTERM ends its sessions, the LISTEN session among them, before it
/// exits: a server reached over TLS logs nothing for any of them.
#[tokio::test]
async fn a_listener_stopped_leaves_no_line_in_the_servers_log() {
    let server = TempPostgres::start_tls();
    let redis = TempRedis::start();
    let plain = Database::new(&server.url("postgres"), 2).unwrap();
    common::setup::setup(&plain, 3).await.unwrap();
    let observer = plain.get().await.unwrap();
    let mut listener = Command::new(shop_binary())
        .args(["listen", "--sweep-interval", "0"])
        .env(
            "DATABASE_URL",
            format!("{}?sslmode=require", server.url("postgres")),
        )
        .env("REDIS_URL", redis.url())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let encrypted_sessions = || async {
        let sql = "SELECT count(*) FROM pg_stat_ssl WHERE ssl";
        common::value::<i64>(&observer, sql).await
    };
    eventually("the listener to register", || async {
        common::value::<i64>(&observer, "SELECT count(*) FROM pgfresh.listeners").await == 1
    })
    .await;
    // A change applied: the batch's sessions, beside the LISTEN session and the registration's.
    observer
        .execute(
            "UPDATE products SET name = 'Stopped cleanly' WHERE id = 1",
            &[],
        )
        .await
        .unwrap();
    eventually("the change to be applied", || async {
        common::value::<bool>(&observer, "SELECT NOT EXISTS (SELECT FROM pgfresh.changes)").await
    })
    .await;
    assert!(encrypted_sessions().await >= 2);
    Command::new("kill")
        .args(["-TERM", &listener.id().to_string()])
        .status()
        .unwrap();
    let exit = tokio::task::spawn_blocking(move || {
        let exit = listener.wait().unwrap();
        let mut logs = String::new();
        std::io::Read::read_to_string(&mut listener.stderr.take().unwrap(), &mut logs).unwrap();
        (exit, logs)
    });
    let (exit, logs) = tokio::time::timeout(common::PATIENCE, exit)
        .await
        .expect("the listener stops on SIGTERM")
        .unwrap();
    assert!(exit.success(), "{logs}");
    assert!(!logs.contains("were cut"), "{logs}");
    eventually("the sessions to end", || async {
        encrypted_sessions().await == 0
    })
    .await;
    let log = server.log();
    assert!(!log.contains("could not receive data"), "{log}");
}

/// Whether a pooled session of `db` is encrypted.
async fn encrypted(db: &Database) -> Result<bool, pgfresh::Error> {
    let client = db.get().await?;
    let row = client
        .query_one(
            "SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

#[tokio::test]
async fn sslmode_is_read_as_libpq_reads_it_and_never_quietly_downgraded() {
    let server = TempPostgres::start_tls();
    let port = server.port;
    for (conninfo, tls) in [
        (
            format!("host=127.0.0.1 port={port} user=postgres sslmode = require"),
            true,
        ),
        (
            format!(
                "host=127.0.0.1 port={port} user=postgres application_name='a://b' sslmode=require"
            ),
            true,
        ),
        (
            format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode=prefer"),
            true,
        ),
        (
            format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            false,
        ),
    ] {
        let db = Database::new(&conninfo, 1).unwrap();
        assert_eq!(encrypted(&db).await.unwrap(), tls, "{conninfo}");
    }
    // PGSSLMODE fills in for a string that does not say.
    let environment = Environment::none().with_var("PGSSLMODE", "require");
    let db = Database::with_environment(&server.url("postgres"), 1, &environment).unwrap();
    assert!(encrypted(&db).await.unwrap());

    // What pgfresh cannot honour is refused before connecting, with one line saying so.
    for (conninfo, expected) in [
        ("sslmode=allow", "sslmode=allow"),
        ("sslmode=verify-everything", "is not one of"),
        (
            "sslcert=/etc/client.pem sslmode=require",
            "does not support the connection option sslcert",
        ),
        (
            "gssencmode=require",
            "does not support the connection option gssencmode",
        ),
    ] {
        let error = Database::new(conninfo, 1).err().unwrap().to_string();
        assert!(
            error.starts_with("invalid PostgreSQL URL"),
            "{conninfo}: {error}"
        );
        assert!(error.contains(expected), "{conninfo}: {error}");
        assert_eq!(error.lines().count(), 1);
    }
}

#[tokio::test]
async fn redis_over_tls_works_with_a_rediss_url() {
    let redis = common::servers::TempRedis::start_tls();
    let env = TestEnv::shop(4).await;
    let out = Command::new(shop_binary())
        .arg("sweep")
        .env("DATABASE_URL", &env.url)
        .env("REDIS_URL", redis.url())
        .env("SSL_CERT_FILE", redis.certificate_authority())
        .output_bounded()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("sweep: 8 fragments rendered, 8 written"),
        "{}",
        stdout(&out)
    );

    // Without trusting the certificate, the connection is refused with one clear line.
    let untrusted = run(&shop_binary(), &env.url, &redis.url(), &["sweep"]);
    assert_one_clear_error(&untrusted, "cannot connect to Redis at rediss://127.0.0.1:");
    env.cleanup().await;
}
