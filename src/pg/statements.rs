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
use tokio_postgres::{Client, Row, Statement};

use super::transaction::Pipelined;

/// The most statements one session keeps: past that it starts over, so that SQL built anew for
/// every call (an `IN` list spelled out) cannot fill the server's memory.
const KEPT_PER_SESSION: usize = 256;

/// Whether the sessions of one database may keep prepared statements: yes, until a statement was
/// found missing where PostgreSQL itself would still have it (SQLSTATE 26000), or a name taken
/// that this process never used on the session (42P05). Either means a connection pooler that
/// pgfresh took for a direct connection (one that passed its startup settings through) sent the
/// session's statements to several server sessions; from then on every statement is sent unnamed
/// and every call into user code runs in a transaction of its own, as behind a pooler pgfresh
/// knows of.
#[derive(Clone, Default)]
pub(crate) struct Kept {
    lost: Arc<AtomicBool>,
}

/// Where a kept statement runs, which decides what its failure may do.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Session {
    /// Inside a transaction of pgfresh's own, on one of its sessions: a failed statement aborts the
    /// transaction, so it is not tried again here, and since no user code runs on the session, a
    /// missing statement can only be a pooler's doing.
    Transaction,
    /// A loader's session, between transactions: a statement that failed because the server
    /// session no longer runs it as prepared (a schema change; user code that ran `DEALLOCATE`) is
    /// prepared again and run once more right away, and only if that one is lost too is it taken
    /// for a pooler's doing.
    Autocommit,
}

impl Kept {
    /// Whether statements may still be kept.
    pub(crate) fn allowed(&self) -> bool {
        !self.lost.load(Ordering::Relaxed)
    }

    /// Runs `sql` on `client`, prepared once and kept in `cache` (the session's), or, once keeping
    /// was given up, parsed now. A kept statement that fails is forgotten, so its next run prepares
    /// it again: a schema change may have made it unrunnable ("cached plan must not change result
    /// type"). The SQL must not depend on anything that differs between the session's runs but its
    /// tables (pgfresh's own never depend on the `search_path`; a loader's session keeps its
    /// settings).
    pub(crate) async fn query(
        &self,
        client: &Client,
        cache: &StatementCache,
        session: Session,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        if !self.allowed() {
            return client.query_typed(sql, params).await;
        }
        let types: Vec<Type> = params.iter().map(|(_, ty)| ty.clone()).collect();
        let error = match run(client, cache, sql, &types, params).await {
            Ok(rows) => return Ok(rows),
            Err(error) => error,
        };
        let pooled = is_pooled(&error);
        match session {
            Session::Transaction => {
                if pooled {
                    self.give_up(cache);
                }
                return Err(error);
            }
            Session::Autocommit if !pooled && !is_stale(&error) => return Err(error),
            Session::Autocommit => {}
        }
        match run(client, cache, sql, &types, params).await {
            Err(error) if is_pooled(&error) => {
                self.give_up(cache);
                client.query_typed(sql, params).await
            }
            ran => ran,
        }
    }

    /// `sql` prepared on a session in a transaction of pgfresh's own, for a caller that sends it
    /// in a request of its own (a pipeline, `super::transaction`); prepared now if the session does
    /// not keep it yet. A failure is to be told to [`Kept::failed`], as one of the run is.
    pub(crate) async fn prepare(
        &self,
        client: &Client,
        cache: &StatementCache,
        sql: &str,
        types: &[Type],
    ) -> Result<Statement, tokio_postgres::Error> {
        prepare(client, cache, sql, types).await
    }

    /// A statement kept on a session failed in a transaction of pgfresh's own: it is forgotten (its
    /// next run prepares it again), and keeping stops for good if the session had lost it to a
    /// pooler.
    pub(crate) fn failed(
        &self,
        cache: &StatementCache,
        sql: &str,
        types: &[Type],
        error: &tokio_postgres::Error,
    ) {
        cache.remove(sql, types);
        if is_pooled(error) {
            self.give_up(cache);
        }
    }

    /// Stops keeping statements on every session of the database.
    fn give_up(&self, cache: &StatementCache) {
        cache.clear();
        if !self.lost.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "prepared statements went to another server session than the one they were prepared on: PostgreSQL is reached through a connection pooler that took pgfresh's startup settings (give it `ignore_startup_parameters = options`, or none); from now on pgfresh keeps no statement and runs loaders in transactions of their own"
            );
        }
    }
}

/// Prepares `sql` once per session (`cache`) and runs it; forgets it if it fails, so that its
/// next run prepares it again.
async fn run(
    client: &Client,
    cache: &StatementCache,
    sql: &str,
    types: &[Type],
    params: &[(&(dyn ToSql + Sync), Type)],
) -> Result<Vec<Row>, tokio_postgres::Error> {
    let statement = prepare(client, cache, sql, types).await?;
    let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(value, _)| *value).collect();
    let ran = client.query(&statement, &values).await;
    if ran.is_err() {
        cache.remove(sql, types);
    }
    ran
}

/// `sql` as the session keeps it, prepared now if it is not yet.
async fn prepare(
    client: &Client,
    cache: &StatementCache,
    sql: &str,
    types: &[Type],
) -> Result<Statement, tokio_postgres::Error> {
    if cache.size() >= KEPT_PER_SESSION {
        cache.clear();
    }
    cache.prepare_typed(client, sql, types).await
}

/// A statement the session had prepared is not there, or a name this process gave no statement on
/// the session is taken.
fn is_pooled(error: &tokio_postgres::Error) -> bool {
    matches!(
        error.code(),
        Some(&SqlState::INVALID_SQL_STATEMENT_NAME | &SqlState::DUPLICATE_PSTATEMENT)
    )
}

/// PostgreSQL refuses to run the statement as it was prepared: what it returns has changed.
fn is_stale(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&SqlState::FEATURE_NOT_SUPPORTED)
}

/// A transaction on one of pgfresh's own sessions, and whether its statements may be kept.
#[derive(Clone, Copy)]
pub(crate) struct Hot<'s> {
    client: &'s Client,
    cache: &'s StatementCache,
    kept: Option<&'s Kept>,
}

impl<'s> Hot<'s> {
    /// `kept` is `None` behind a connection pooler ([`super::Database::kept_statements`]).
    pub(crate) fn new(txn: &Pipelined<'s>, kept: Option<&'s Kept>) -> Self {
        Hot {
            client: txn.client(),
            cache: txn.statement_cache(),
            kept,
        }
    }

    /// Runs `sql` with typed parameters: prepared once per session and kept, or parsed now.
    pub(crate) async fn query(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        match self.kept {
            Some(kept) => {
                kept.query(self.client, self.cache, Session::Transaction, sql, params)
                    .await
            }
            None => self.client.query_typed(sql, params).await,
        }
    }

    /// Forgets `sql` prepared with `types` on this session: its next run prepares it again, and
    /// PostgreSQL plans it for the tables as they are then.
    pub(crate) fn forget(&self, sql: &str, types: &[Type]) {
        if self.kept.is_some() {
            self.cache.remove(sql, types);
        }
    }
}
