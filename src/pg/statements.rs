//! The statements every batch runs (the claim, the delete of what it applied), sent the cheapest
//! way the session allows. On pgfresh's own direct sessions each is prepared once and kept with
//! the pooled connection: PostgreSQL then parses and plans it once, not with every batch (the
//! claim's parse and plan cost more than running it on a short queue: BENCHMARKS.md, "Statements
//! prepared once"). Behind a connection pooler a prepared statement may not outlive the
//! transaction, so there each is parsed with its run, in one round trip (`query_typed`).

use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};

/// A transaction on one of pgfresh's own sessions, and whether its statements may be prepared.
#[derive(Clone, Copy)]
pub(crate) struct Hot<'s, 't> {
    txn: &'s deadpool_postgres::Transaction<'t>,
    prepare: bool,
}

impl<'s, 't> Hot<'s, 't> {
    /// `prepare` is false behind a connection pooler ([`super::Database::behind_pooler`]).
    pub(crate) fn new(txn: &'s deadpool_postgres::Transaction<'t>, prepare: bool) -> Self {
        Hot { txn, prepare }
    }

    /// Runs `sql` with typed parameters: prepared once per session and kept, or parsed now.
    /// The SQL must not depend on the session's `search_path` (pgfresh's never does).
    pub(crate) async fn query(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        if !self.prepare {
            return self.txn.query_typed(sql, params).await;
        }
        let types: Vec<Type> = params.iter().map(|(_, ty)| ty.clone()).collect();
        let statement = self.txn.prepare_typed_cached(sql, &types).await?;
        let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(value, _)| *value).collect();
        self.txn.query(&statement, &values).await
    }

    /// Forgets `sql` prepared with `types` on this session: its next run prepares it again, and
    /// PostgreSQL plans it for the tables as they are then.
    pub(crate) fn forget(&self, sql: &str, types: &[Type]) {
        if self.prepare {
            self.txn.statement_cache.remove(sql, types);
        }
    }
}
