//! A batch's transaction sends its BEGIN with its first statement (the claim) and its COMMIT right
//! behind its last (the delete of what it applied), without waiting in between
//! (`pg::transaction`). What the statements do stays one transaction's work: committed whole, or,
//! when a statement fails or the transaction is dropped unfinished, not at all, with the session
//! left idle for whatever it is asked next; and it takes two round trips, not four (counted by a
//! relay in front of PostgreSQL). (pgfresh's own sessions find nothing through their
//! `search_path`: the tests' tables are named with their schema.)

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::TestEnv;
use pgfresh::testing;
use pgfresh::tokio_postgres::Client;
use pgfresh::tokio_postgres::config::Host;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

async fn numbers(client: &Client, table: &str) -> Vec<i32> {
    let sql = format!("SELECT n FROM {table} ORDER BY n");
    let rows = client.query(&sql, &[]).await.expect("read the table");
    rows.iter().map(|row| row.get(0)).collect()
}

#[tokio::test]
async fn a_pipelined_transaction_commits_both_statements_or_neither() {
    let env = TestEnv::empty().await;
    let client = env.client().await;
    client
        .batch_execute("CREATE TABLE t (n int PRIMARY KEY)")
        .await
        .unwrap();

    testing::pipelined(
        &env.db,
        "INSERT INTO public.t VALUES (1)",
        Some("INSERT INTO public.t VALUES (2)"),
    )
    .await
    .expect("both statements commit");
    assert_eq!(numbers(&client, "t").await, [1, 2]);

    // The last statement fails, with the COMMIT already sent behind it: the first one's row is
    // not committed, and the error is the statement's. Sent before the statement, the COMMIT
    // would have committed row 3. The second time the statement is one the session keeps.
    for _ in 0..2 {
        let error = testing::pipelined(
            &env.db,
            "INSERT INTO public.t VALUES (3)",
            Some("INSERT INTO public.t VALUES (2)"),
        )
        .await
        .expect_err("the last statement fails");
        assert!(error.to_string().contains("duplicate key"), "{error}");
    }
    // A last statement the session has not prepared yet fails only once it runs (its division
    // is planned then): prepared first, it still goes out ahead of the COMMIT.
    let error = testing::pipelined(
        &env.db,
        "INSERT INTO public.t VALUES (4)",
        Some("INSERT INTO public.t VALUES (5 / 0)"),
    )
    .await
    .expect_err("the last statement fails");
    assert!(error.to_string().contains("division by zero"), "{error}");
    // The last statement fails before it is sent (its parameter is missing): no COMMIT goes
    // out, and the first one's row is not committed.
    let error = testing::pipelined(
        &env.db,
        "INSERT INTO public.t VALUES (8)",
        Some("INSERT INTO public.t VALUES ($1)"),
    )
    .await
    .expect_err("the last statement fails");
    assert!(error.to_string().contains("parameters"), "{error}");
    // The first statement fails: nothing after it runs.
    let error = testing::pipelined(
        &env.db,
        "INSERT INTO public.t VALUES (6 / 0)",
        Some("INSERT INTO public.t VALUES (7)"),
    )
    .await
    .expect_err("the first statement fails");
    assert!(error.to_string().contains("division by zero"), "{error}");
    assert_eq!(numbers(&client, "t").await, [1, 2]);

    env.cleanup().await;
}

#[tokio::test]
async fn a_pipelined_transaction_dropped_unfinished_rolls_back_and_leaves_its_session_idle() {
    let env = TestEnv::empty().await;
    let client = env.client().await;
    client
        .batch_execute("CREATE TABLE u (n int)")
        .await
        .unwrap();

    testing::pipelined(&env.db, "INSERT INTO public.u VALUES (1)", None)
        .await
        .expect("the statement runs");
    // The ROLLBACK goes out as the transaction is dropped, without waiting for its reply: wait
    // until no session of the database is in a transaction.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()
                   AND state LIKE 'idle in transaction%'",
                &[],
            )
            .await
            .unwrap();
        if row.get::<_, i64>(0) == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a session stayed in the dropped transaction"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Later transactions on the same sessions commit what they do and nothing more: had the
    // dropped one stayed open, the first of them would have committed its row 1 too.
    for n in [2, 3, 4, 5] {
        let (first, last) = (
            format!("INSERT INTO public.u VALUES ({n})"),
            format!("INSERT INTO public.u VALUES ({})", n * 10),
        );
        testing::pipelined(&env.db, &first, Some(&last))
            .await
            .unwrap();
    }
    assert_eq!(numbers(&client, "u").await, [2, 3, 4, 5, 20, 30, 40, 50]);

    env.cleanup().await;
}

/// A TCP relay in front of PostgreSQL that counts flights: each time a client sends after the
/// server last spoke (or first), the client waited for a reply before sending on, one round trip.
struct Relay {
    url: String,
    flights: Arc<AtomicUsize>,
}

impl Relay {
    async fn to(env: &TestEnv) -> Relay {
        let config: pgfresh::tokio_postgres::Config = env.url.parse().expect("the test's URL");
        let target = match (&config.get_hosts()[0], config.get_ports().first()) {
            (Host::Tcp(host), port) => format!("{host}:{}", port.copied().unwrap_or(5432)),
            other => panic!("the relay needs a TCP host, not {other:?}"),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "host=127.0.0.1 port={} user={} dbname={}",
            listener.local_addr().unwrap().port(),
            config.get_user().expect("the test's user"),
            config.get_dbname().expect("the test's database"),
        );
        let flights = Arc::new(AtomicUsize::new(0));
        let counted = flights.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(&target).await.expect("reach PostgreSQL");
                let (from_client, to_client) = client.into_split();
                let (from_server, to_server) = server.into_split();
                let client_spoke_last = Arc::new(AtomicBool::new(false));
                let (spoke, flights) = (client_spoke_last.clone(), counted.clone());
                tokio::spawn(pump(from_client, to_server, move || {
                    if !spoke.swap(true, Ordering::SeqCst) {
                        flights.fetch_add(1, Ordering::SeqCst);
                    }
                }));
                tokio::spawn(pump(from_server, to_client, move || {
                    client_spoke_last.store(false, Ordering::SeqCst);
                }));
            }
        });
        Relay { url, flights }
    }

    fn flights(&self) -> usize {
        self.flights.load(Ordering::SeqCst)
    }
}

/// Copies bytes one way, calling `seen` before forwarding each read.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, seen: impl Fn()) {
    let mut buffer = vec![0; 64 * 1024];
    while let Ok(read @ 1..) = from.read(&mut buffer).await {
        seen();
        if to.write_all(&buffer[..read]).await.is_err() {
            break;
        }
    }
}

#[tokio::test]
async fn a_pipelined_transaction_takes_two_round_trips() {
    let env = TestEnv::empty().await;
    env.client()
        .await
        .batch_execute("CREATE TABLE v (n int)")
        .await
        .unwrap();
    let relay = Relay::to(&env).await;
    let db = pgfresh::Database::new(&relay.url, 1).expect("the relay's URL");

    // The first transaction connects and prepares both statements; the session keeps them.
    let (first, last) = (
        "INSERT INTO public.v VALUES (1)",
        "INSERT INTO public.v VALUES (2)",
    );
    testing::pipelined(&db, first, Some(last)).await.unwrap();
    let before = relay.flights();
    testing::pipelined(&db, first, Some(last)).await.unwrap();
    // BEGIN with the first statement, the last statement with COMMIT. Each awaited on its own,
    // as tokio-postgres's `Transaction` does, they would take four.
    assert_eq!(
        relay.flights() - before,
        2,
        "round trips of one transaction"
    );
    assert_eq!(numbers(&env.client().await, "v").await, [1, 1, 2, 2]);

    env.cleanup().await;
}
