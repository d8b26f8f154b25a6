//! pgfresh keeps pre-rendered HTML fragments in Redis fresh from PostgreSQL.
//!
//! Triggers (installed from `sql/`) queue every committed change to watched tables; a listener
//! re-renders only the affected fragments with maud and writes them to Redis within milliseconds; a
//! full sweep repairs anything else. You write fragments against [`Fragment`] and reuse the command
//! line with [`cli::main`], or run the listener and the sweep from a program of your own with
//! [`listen`] and [`sweep()`].
//!
//! # A complete fragment
//!
//! A card per product, in two variants, re-rendered whenever its product changes:
//!
//! ```
//! use pgfresh::maud::{Markup, html};
//! use pgfresh::tokio_postgres::{Client, Error, types::Type};
//! use pgfresh::{CachedStatements, Fragment, Fragments, Loaded, Topics};
//!
//! pgfresh::variants! {
//!     enum Card { Compact = "compact", Full = "full" }
//! }
//!
//! struct ProductCard;
//!
//! impl Fragment for ProductCard {
//!     type Key = i64;
//!     type Row = (String, i32);
//!     type Variant = Card;
//!     type Error = Error;
//!
//!     fn name(&self) -> &str {
//!         "product_card"
//!     }
//!     fn topics(&self) -> Topics {
//!         Topics::new().direct("product") // SELECT pgfresh.watch('products', 'id', 'product')
//!     }
//!     async fn load(&self, db: &Client, ids: &[i64]) -> Loaded<Self> {
//!         // Prepared once per session, not with every batch.
//!         let sql = "SELECT id, name, price_cents FROM products WHERE id = ANY($1)";
//!         let rows = db.query_typed_cached(sql, &[(&ids, Type::INT8_ARRAY)]).await?;
//!         Ok(rows.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect())
//!     }
//!     fn render(&self, _id: &i64, (name, cents): &Self::Row, variant: Card) -> Markup {
//!         html! { article { h2 { (name) } @if variant == Card::Full { p { (cents) } } } }
//!     }
//!     async fn keys_after(&self, db: &Client, after: Option<&i64>, limit: i64) -> Result<Vec<i64>, Error> {
//!         let rows = db
//!             .query(
//!                 "SELECT id FROM products WHERE id > coalesce($1, -1) ORDER BY id LIMIT $2",
//!                 &[&after, &limit],
//!             )
//!             .await?;
//!         Ok(rows.iter().map(|r| r.get(0)).collect())
//!     }
//! }
//!
//! // The whole `main` of a binary with pgfresh's commands (install, listen, sweep, status, ...);
//! // cards are kept at shop:product_card:<id>:compact and shop:product_card:<id>:full.
//! fn shop_main() -> std::process::ExitCode {
//!     pgfresh::cli::main(Fragments::new().with("shop:product_card:", ProductCard))
//! }
//!
//! // Rendering needs no services: what the listener writes for a row is what `render` returns.
//! let card = ProductCard.render(&42, &("Mug <XL>".to_string(), 1200), Card::Full);
//! assert_eq!(card.into_string(), "<article><h2>Mug &lt;XL&gt;</h2><p>1200</p></article>");
//! ```
//!
//! A fragment that shows shared rows (an author's name on every post) reaches them through a query:
//! see [`Topics::through`], and `examples/blog`.
//!
//! `examples/shop` is the complete reference, and `ARCHITECTURE.md` the map of this crate.

#![warn(missing_docs, unreachable_pub)]

mod backoff;
pub mod cli;
mod config;
mod error;
mod fragment;
mod listener;
mod ops;
mod pg;
mod refresh;
mod serve;
mod shutdown;
mod stats;
mod store;
mod sweep;

pub use config::{Environment, ListenSettings, SweepSettings};
pub use error::Error;
pub use fragment::{CachedStatements, Fragment, Fragments, Loaded, Topics, Variant};
pub use listener::listen;
pub use pg::Database;
pub use pg::queue::retry_failed;
pub use pg::schema::{install, installed_version, required_version, uninstall};
pub use shutdown::{Shutdown, shutdown_on_signal};
pub use stats::RefreshStats;
pub use store::{Eviction, Format, RedisConnection, RedisStore, Storage};
pub use sweep::{Progress, SweepReport, sweep, sweep_with_progress};

// The crates whose types pgfresh's own signatures name: fragments are written against maud and
// tokio-postgres, `Database::get` hands out a deadpool-postgres connection, and `Error` carries
// their errors and redis's. Use them through pgfresh, and their versions always match its own.
pub use deadpool_postgres;
pub use maud;
pub use redis;
pub use tokio_postgres;

/// What the crate's own tests reach into: internals with no stability promise, compiled only with
/// the `testing` feature, which `cargo test` turns on for the test suite.
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod testing {
    pub use crate::store::{Write, WriteResult};
    use crate::{Error, Eviction, RedisStore};

    /// The key of the render ticket kept beside a fragment key.
    pub fn ticket_key(store: &RedisStore, key: &str) -> String {
        store.ticket_key(key)
    }

    /// Marks a fragment as swept at `version`, as a complete sweep does.
    pub async fn set_fragment_marker(
        store: &RedisStore,
        key_prefix: &str,
        version: u32,
    ) -> Result<(), Error> {
        store.set_fragment_marker(key_prefix, version).await
    }

    /// What `doctor` prints for these fragments (the command's report, without its first line).
    pub async fn doctor(
        db: &crate::Database,
        store: RedisStore,
        fragments: &crate::Fragments,
    ) -> Result<String, Error> {
        let report = crate::ops::doctor::examine(db, Ok(store), fragments).await?;
        Ok(report.to_string())
    }

    /// Reads Redis's memory policy again.
    pub async fn check_eviction(store: &RedisStore) -> (Eviction, String) {
        store.check_eviction().await
    }

    /// Every migration, in order, as (version, file name, SQL).
    pub fn migrations() -> Vec<(i32, &'static str, &'static str)> {
        let all = crate::pg::schema::MIGRATIONS.iter();
        all.map(|m| (m.version, m.name, m.sql)).collect()
    }

    /// What every install runs before the migrations.
    pub fn prepare_sql() -> &'static str {
        crate::pg::schema::PREPARE_SQL
    }

    /// Version-checked writes under `ticket`.
    pub async fn write(
        store: &RedisStore,
        ticket: i64,
        writes: &[Write],
    ) -> Result<Vec<WriteResult>, Error> {
        store.write(ticket, writes).await
    }

    /// For each write, whether Redis already holds its value, confirmed under `ticket` (its ticket
    /// raised), as a sweep asks before writing.
    pub async fn held(
        store: &RedisStore,
        ticket: i64,
        writes: &[Write],
    ) -> Result<Vec<bool>, Error> {
        store.held(ticket, writes).await
    }

    /// Runs `first`, then `last`, in one transaction on one of pgfresh's own sessions, as a batch
    /// runs its claim and its delete: BEGIN sent with `first`, COMMIT right behind `last`, each
    /// statement kept on the session as the listener keeps them. Without `last`, the transaction
    /// is dropped unfinished after `first`.
    pub async fn pipelined(
        db: &crate::Database,
        first: &str,
        last: Option<&str>,
    ) -> Result<(), Error> {
        let session = db.pinned().await?;
        let kept = db.kept_statements().await?;
        let mut txn = crate::pg::transaction::Pipelined::begin(&session, None).await;
        let hot = crate::pg::statements::Hot::new(&txn, kept);
        let (begun, ran) = futures_util::future::join(txn.begun(), hot.query(first, &[])).await;
        begun?;
        ran?;
        match last {
            Some(last) => txn.commit_with(kept, last, &[]).await,
            None => Ok(()),
        }
    }

    /// The tickets stored beside fragment keys.
    pub async fn tickets(store: &RedisStore, keys: &[String]) -> Result<Vec<Option<i64>>, Error> {
        store.tickets(keys).await
    }
}
