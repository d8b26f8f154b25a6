//! Statements sent the cheapest way the session allows. On direct sessions each statement that runs
//! with every batch is prepared once and kept with the pooled connection: PostgreSQL then parses and
//! plans it once, not with every batch (parsing and planning the claim cost more than running it on
//! a short queue, and the shop's load spent about half its time there: BENCHMARKS.md, "Statements
//! prepared once"). That holds for pgfresh's own statements ([`Hot`]: the claim, the delete of what
//! a batch applied) and for loaders' ([`crate::CachedStatements`]). Behind a connection pooler a
//! prepared statement may not outlive the transaction, so there each is parsed with its run, in one
//! round trip (`query_typed`); and should a session lose a statement it had prepared ([`Kept`]),
//! pgfresh stops keeping them for good.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use deadpool_postgres::StatementCache;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Row};

/// The most statements one session keeps: past that it starts over, so that SQL built anew for
/// every call (an `IN` list spelled out) cannot fill the server's memory.
const KEPT_PER_SESSION: usize = 64;

/// Whether the sessions of one database may keep prepared statements: yes, until one of them lost
/// a statement it had prepared (SQLSTATE 26000). PostgreSQL itself never drops one, so that means
/// a connection pooler that pgfresh took for a direct connection (one that passed its startup
/// settings through) handed the session's next statement to another server session; from then on
/// every statement is sent unnamed, as behind a pooler pgfresh knows of.
#[derive(Clone, Default)]
pub(crate) struct Kept {
    lost: Arc<AtomicBool>,
}

impl Kept {
    /// Whether statements may still be kept.
    pub(crate) fn allowed(&self) -> bool {
        !self.lost.load(Ordering::Relaxed)
    }

    /// Runs `sql` on `client`, prepared once and kept in `cache` (the session's), or, once keeping
    /// was given up, parsed now. A kept statement that fails is forgotten, so the next run prepares
    /// it again: a schema change may have made it unrunnable ("cached plan must not change result
    /// type"). The SQL must not depend on anything that differs between the session's runs but
    /// its tables (pgfresh's own never depend on the `search_path`; a loader's session keeps its
    /// settings).
    pub(crate) async fn query(
        &self,
        client: &Client,
        cache: &StatementCache,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        if !self.allowed() {
            return client.query_typed(sql, params).await;
        }
        let types: Vec<Type> = params.iter().map(|(_, ty)| ty.clone()).collect();
        if cache.size() >= KEPT_PER_SESSION {
            cache.clear();
        }
        let statement = cache.prepare_typed(client, sql, &types).await?;
        let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(value, _)| *value).collect();
        let ran = client.query(&statement, &values).await;
        if let Err(error) = &ran {
            cache.remove(sql, &types);
            if error.code() == Some(&SqlState::INVALID_SQL_STATEMENT_NAME) {
                self.give_up(cache);
            }
        }
        ran
    }

    /// Stops keeping statements on every session of the database, after one lost its own.
    fn give_up(&self, cache: &StatementCache) {
        cache.clear();
        if !self.lost.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "a session lost a statement pgfresh had prepared on it: PostgreSQL is reached through a connection pooler that took pgfresh's startup settings (give the pooler `ignore_startup_parameters = options`, or none); from now on pgfresh prepares no statement to keep"
            );
        }
    }
}

/// A transaction on one of pgfresh's own sessions, and whether its statements may be kept.
#[derive(Clone, Copy)]
pub(crate) struct Hot<'s, 't> {
    txn: &'s deadpool_postgres::Transaction<'t>,
    kept: Option<&'s Kept>,
}

impl<'s, 't> Hot<'s, 't> {
    /// `kept` is `None` behind a connection pooler ([`super::Database::kept_statements`]).
    pub(crate) fn new(txn: &'s deadpool_postgres::Transaction<'t>, kept: Option<&'s Kept>) -> Self {
        Hot { txn, kept }
    }

    /// Runs `sql` with typed parameters: prepared once per session and kept, or parsed now.
    pub(crate) async fn query(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        match self.kept {
            Some(kept) => {
                let client = self.txn.client();
                kept.query(client, &self.txn.statement_cache, sql, params)
                    .await
            }
            None => self.txn.query_typed(sql, params).await,
        }
    }

    /// Forgets `sql` prepared with `types` on this session: its next run prepares it again, and
    /// PostgreSQL plans it for the tables as they are then.
    pub(crate) fn forget(&self, sql: &str, types: &[Type]) {
        if self.kept.is_some() {
            self.txn.statement_cache.remove(sql, types);
        }
    }
}
