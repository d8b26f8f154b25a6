//! Statements a loader keeps: [`CachedStatements::query_typed_cached`] runs a query the way
//! tokio-postgres's `query_typed` does, except that on pgfresh's direct sessions the statement is
//! prepared once per session and kept, so PostgreSQL parses and plans it once rather than with
//! every batch (for the shop's card, about half of a one-product load: BENCHMARKS.md).
//!
//! A loader is handed a plain [`Client`], which keeps nothing; the session's statement cache comes
//! with the call instead. While pgfresh runs a call into a fragment ([`within`]), a task-local names
//! the client it handed over and that session's cache; a query on that very client uses it, and any
//! other query (another client, a task the loader spawned, a session behind a pooler) is sent
//! unnamed, as `query_typed` would.

use std::future::Future;
use std::sync::Arc;

use deadpool_postgres::StatementCache;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Error, Row};

use crate::pg::statements::Kept;
use crate::pg::statements::Session::Autocommit;

/// Prepared statements for loaders and key enumerations: `use pgfresh::CachedStatements;` and call
/// `db.query_typed_cached(sql, params)` where you would call `db.query_typed(sql, params)`.
///
/// On a direct session, the first call with a given SQL text and parameter types prepares it and
/// keeps it with the pooled session; later calls on that session, in later batches too, only run
/// it. Behind a connection pooler, or outside a call from pgfresh, it is `query_typed`. Use it for
/// SQL whose text is fixed (`WHERE id = ANY($1)` rather than an `IN` list spelled out): a session
/// keeps a few hundred statements and starts over past that. As with any prepared statement,
/// PostgreSQL may settle on a generic plan after five runs, one made without the parameters'
/// values: fine for lookups by key, worth an `EXPLAIN` for a query whose best plan depends on them.
/// A kept statement that PostgreSQL no longer runs as prepared (a schema change altered what it
/// returns) is prepared again and run at once.
///
/// ```no_run
/// use pgfresh::CachedStatements;
/// use pgfresh::tokio_postgres::{Client, Error, types::Type};
///
/// async fn names(db: &Client, ids: &[i64]) -> Result<Vec<(i64, String)>, Error> {
///     let sql = "SELECT id, name FROM products WHERE id = ANY($1)";
///     let rows = db.query_typed_cached(sql, &[(&ids, Type::INT8_ARRAY)]).await?;
///     Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
/// }
/// ```
pub trait CachedStatements: sealed::Sealed {
    /// Runs `sql` with its parameters and their types, prepared once per session where it can be:
    /// see [`CachedStatements`].
    fn query_typed_cached(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Vec<Row>, Error>> + Send;
}

impl CachedStatements for Client {
    async fn query_typed_cached(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, Error> {
        let handed = SESSION
            .try_with(|session| {
                session
                    .as_ref()
                    .filter(|session| session.client == address(self))
                    .map(|session| (session.cache.clone(), session.kept.clone()))
            })
            .ok()
            .flatten();
        match handed {
            Some((cache, kept)) => kept.query(self, &cache, Autocommit, sql, params).await,
            None => self.query_typed(sql, params).await,
        }
    }
}

mod sealed {
    /// Only pgfresh implements [`super::CachedStatements`], so that it can grow.
    pub trait Sealed {}
    impl Sealed for tokio_postgres::Client {}
}

/// The session pgfresh handed to user code: the client's address, the cache of its session.
#[derive(Clone)]
pub(crate) struct Session {
    client: usize,
    cache: Arc<StatementCache>,
    kept: Kept,
}

impl Session {
    /// `client`, with its session's statement cache.
    pub(crate) fn new(client: &Client, cache: Arc<StatementCache>, kept: Kept) -> Self {
        Session {
            client: address(client),
            cache,
            kept,
        }
    }
}

tokio::task_local! {
    static SESSION: Option<Session>;
}

/// Runs `call`, a call into user code, with `session` as the one whose statements it may keep.
pub(crate) async fn within<T>(session: Option<Session>, call: impl Future<Output = T>) -> T {
    SESSION.scope(session, call).await
}

/// A client is the one handed over if it is at the same address: it is borrowed for the whole call.
fn address(client: &Client) -> usize {
    client as *const Client as usize
}
