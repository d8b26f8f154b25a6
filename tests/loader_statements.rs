//! Loaders' statements kept prepared per session (`pgfresh::CachedStatements`): prepared once and run
//! by later batches as they are; prepared again and run at once when a schema change made them
//! unrunnable, or user code dropped them. (A pooler taken for PostgreSQL: `tests/pgbouncer.rs`.)

mod common;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use common::product_card::{Card, Product, ProductCard};
use common::{RunningListener, TestEnv, test_settings, tweak};
use pgfresh::tokio_postgres::{self, Client};
use pgfresh::{Fragment, Fragments};

/// What a session keeps of the load statement: `(backend pid, when it was prepared, runs)`.
type Kept = Option<(i32, String, i64)>;

/// The shop's card (whose load is kept prepared), which after each load looks at what its session
/// keeps: the load statement's preparation time and how often it has run there, by backend.
#[derive(Default)]
struct WatchedCard {
    /// One per load: what its session keeps, or how the load failed.
    seen: Mutex<Vec<Result<Kept, String>>>,
    /// Set by the test: the next load drops every statement its session has prepared.
    deallocate: AtomicBool,
    /// Where each load connects itself, rather than use the session pgfresh handed it.
    own_connection: Option<String>,
}

impl WatchedCard {
    /// What every load's session kept; fails the test if a load failed.
    fn kept(&self) -> Vec<Kept> {
        let seen = self.seen.lock().unwrap().clone();
        seen.into_iter()
            .map(|load| load.unwrap_or_else(|error| panic!("a load failed: {error}")))
            .collect()
    }
}

/// The card's load statement, as `pg_prepared_statements` shows it.
const LOAD_STATEMENT: &str = "%FROM products p%CROSS JOIN LATERAL%WHERE p.id = ANY($1)%";

impl Fragment for &'static WatchedCard {
    type Key = i64;
    type Row = Product;
    type Variant = Card;
    type Error = tokio_postgres::Error;
    fn name(&self) -> &str {
        "product_card"
    }
    fn topics(&self) -> pgfresh::Topics {
        ProductCard.topics()
    }
    async fn load(&self, handed: &Client, keys: &[i64]) -> pgfresh::Loaded<Self> {
        let own;
        let db = match &self.own_connection {
            Some(url) => {
                own = common::connect(url).await;
                &own
            }
            None => handed,
        };
        let rows = match ProductCard.load(db, keys).await {
            Ok(rows) => rows,
            Err(error) => {
                self.seen.lock().unwrap().push(Err(error.to_string()));
                return Err(error);
            }
        };
        let kept = db
            .query_opt(
                "SELECT pg_backend_pid(), prepare_time::text, generic_plans + custom_plans
                 FROM pg_prepared_statements WHERE statement LIKE $1",
                &[&LOAD_STATEMENT],
            )
            .await?;
        let kept = kept.map(|row| (row.get(0), row.get(1), row.get(2)));
        self.seen.lock().unwrap().push(Ok(kept));
        if self.deallocate.swap(false, Ordering::SeqCst) {
            db.batch_execute("DEALLOCATE ALL").await?;
        }
        Ok(rows)
    }
    fn render(&self, key: &i64, row: &Product, variant: Card) -> pgfresh::maud::Markup {
        ProductCard.render(key, row, variant)
    }
    async fn keys_after(
        &self,
        db: &Client,
        after: Option<&i64>,
        limit: i64,
    ) -> Result<Vec<i64>, tokio_postgres::Error> {
        ProductCard.keys_after(db, after, limit).await
    }
}

/// A listener of `card` with one worker.
fn listen(env: &TestEnv, card: &'static WatchedCard) -> RunningListener {
    let db = pgfresh::Database::new(&env.url, 2).unwrap();
    let fragments = Fragments::new().with(&env.prefix, card);
    env.start_listener_on(db, fragments, tweak(test_settings(), |s| s.workers = 1))
}

/// Renames product 1 `rounds` times, each time waiting for its card.
async fn renames(env: &TestEnv, label: &str, rounds: usize) {
    for round in 1..=rounds {
        let name = format!("{label} {round}");
        env.rename(1, &name).await;
        env.wait_name(1, &name).await;
    }
}

#[tokio::test]
async fn a_loader_statement_is_prepared_once_per_session_and_run_by_later_batches() {
    let env = TestEnv::shop(3).await;
    let card: &'static WatchedCard = Box::leak(Box::default());
    let listener = listen(&env, card);
    renames(&env, "Kept", 6).await;
    listener.stop().await;

    let seen = card.kept();
    assert!(
        seen.iter().all(Option::is_some),
        "every load ran a statement its session keeps: {seen:?}"
    );
    let seen: Vec<(i32, String, i64)> = seen.into_iter().flatten().collect();
    let mut reused = 0;
    for (pid, prepared, runs) in &seen {
        let earlier: Vec<_> = seen
            .iter()
            .filter(|(other, _, other_runs)| other == pid && other_runs < runs)
            .collect();
        // Each later load on a session ran the statement prepared by its first.
        for (_, first, _) in &earlier {
            assert_eq!(first, prepared, "backend {pid} prepared the load again");
        }
        reused += usize::from(!earlier.is_empty());
    }
    // Six batches and more over the pool's sessions: some session ran it more than once.
    assert!(reused > 0, "no load reused a statement: {seen:?}");
    env.cleanup().await;
}

/// The preparation times of the load statement that the loads since the `from`th ran.
fn prepared_since(card: &WatchedCard, from: usize) -> Vec<String> {
    let kept = card.kept()[from..].to_vec();
    kept.into_iter()
        .map(|kept| kept.expect("the load was kept").1)
        .collect()
}

#[tokio::test]
async fn a_kept_loader_statement_that_a_schema_change_made_unrunnable_is_prepared_again_at_once() {
    let env = TestEnv::shop(3).await;
    let card: &'static WatchedCard = Box::leak(Box::default());
    let listener = listen(&env, card);
    renames(&env, "Before", 3).await;
    let before = prepared_since(card, 0);
    // The load now returns another type for `name`: PostgreSQL refuses to run the statement as
    // prepared ("cached plan must not change result type"). Kept as it was, every later load of
    // the session would fail, and the change would end up parked.
    env.client()
        .await
        .batch_execute("ALTER TABLE products ALTER COLUMN name TYPE varchar(200)")
        .await
        .unwrap();
    let from = card.kept().len();
    renames(&env, "After", 3).await;
    listener.stop().await;
    // No load failed (`kept` says so), and every one after the change ran a statement prepared
    // after it.
    let after = prepared_since(card, from);
    assert!(
        after.iter().all(|prepared| !before.contains(prepared)),
        "prepared before the change: {before:?}, ran after it: {after:?}"
    );
    assert_eq!(env.parked().await, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn a_loader_statement_its_session_dropped_is_prepared_again_at_once_and_kept() {
    let env = TestEnv::shop(3).await;
    let card: &'static WatchedCard = Box::leak(Box::default());
    let listener = listen(&env, card);
    renames(&env, "Kept", 3).await;
    let before = prepared_since(card, 0);
    // User code drops every statement of its session: the next load finds its statement missing
    // (SQLSTATE 26000), as behind a pooler; once prepared again, it is there, so this is no pooler,
    // and statements are still kept.
    card.deallocate.store(true, Ordering::SeqCst);
    renames(&env, "Dropped", 1).await;
    let from = card.kept().len();
    renames(&env, "Again", 3).await;
    listener.stop().await;
    let after = prepared_since(card, from);
    assert!(
        after.iter().all(|prepared| !before.contains(prepared)),
        "prepared before the drop: {before:?}, ran after it: {after:?}"
    );
    assert!(
        after.windows(2).any(|pair| pair[0] == pair[1]),
        "still kept from one load to the next: {after:?}"
    );
    assert_eq!(env.parked().await, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn a_loader_s_own_connection_keeps_nothing_of_the_session_pgfresh_handed_it() {
    let env = TestEnv::shop(3).await;
    let card: &'static WatchedCard = Box::leak(Box::new(WatchedCard {
        own_connection: Some(env.url.clone()),
        ..WatchedCard::default()
    }));
    let fragments = Fragments::new().with(&env.prefix, card);
    let listener = env.start_listener_with(fragments, test_settings());
    renames(&env, "Own", 3).await;
    listener.stop().await;
    // Its statements are sent unnamed: one prepared there through the handed session's cache
    // would be run on the handed session, where it does not exist.
    let kept = card.kept();
    assert!(
        kept.len() >= 3 && kept.iter().all(Option::is_none),
        "{kept:?}"
    );
    assert_eq!(env.parked().await, 0);
    env.cleanup().await;
}
