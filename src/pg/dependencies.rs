//! What a session has read, and how it relates to what is watched: for `doctor`'s check that every
//! table a fragment's code reads is watched under one of its topics.
//!
//! A query holds an `AccessShareLock` on every relation it touches until its transaction ends, the
//! tables behind a view and each partition it scanned included, so the locks of a session that ran
//! a loader (and nothing else) in a transaction say what the loader read.

use tokio_postgres::Client;
use tokio_postgres::types::Type;

use crate::Error;

/// A table a session read: itself, then each table it is a partition of, up to the root of its
/// partition tree (a watch on any of them covers it).
pub(crate) type TableRead = Vec<u32>;

/// What a session read.
#[derive(Debug, Default)]
pub(crate) struct Reads {
    /// Tables a watch can cover.
    pub(crate) tables: Vec<TableRead>,
    /// Relations whose rows no trigger here sees change, each with what it is.
    pub(crate) unwatchable: Vec<(u32, Unwatchable)>,
}

/// A relation a query reads rows of, which no watch can cover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unwatchable {
    /// Its rows change all at once, by `REFRESH MATERIALIZED VIEW`, which fires no trigger.
    MaterializedView,
    /// Its rows live, and change, on another server (or in a file). (A partition of a watched
    /// table too: the rows written to it through this database reach the watch, but not what
    /// changes where they live.)
    ForeignTable,
}

/// What the session of backend `pid` holds locks on: everything but PostgreSQL's own catalogs and
/// pgfresh's tables; tables each with the tables they are a partition of. Asked from another
/// session, while `pid`'s transaction is still open.
pub(crate) async fn locked_by(client: &Client, pid: i32) -> Result<Reads, Error> {
    let rows = client
        .query_typed(
            "SELECT DISTINCT c.relkind::text, coalesce(
                 nullif(ARRAY(SELECT a.relid::oid FROM pg_partition_ancestors(c.oid) a), '{}'),
                 ARRAY[c.oid])
             FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
             WHERE l.pid = $1 AND l.locktype = 'relation' AND c.relkind IN ('r', 'p', 'm', 'f')
               AND c.relnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace,
                                          'pgfresh'::regnamespace)
             ORDER BY 2",
            &[(&pid, Type::INT4)],
        )
        .await?;
    let mut reads = Reads::default();
    for row in &rows {
        let read: TableRead = row.get(1);
        match row.get::<_, &str>(0) {
            "m" => reads
                .unwatchable
                .push((read[0], Unwatchable::MaterializedView)),
            "f" => reads.unwatchable.push((read[0], Unwatchable::ForeignTable)),
            _ => reads.tables.push(read),
        }
    }
    Ok(reads)
}

/// The watch that would cover `table` for a fragment keyed like the tables watched under `topics`:
/// a single-column foreign key from `table` to a table watched under one of `topics` by the
/// column the key references (`reviews.product_id` references `products.id`, watched for topic
/// `product`). Returns the foreign key's column and the topic.
pub(crate) async fn watch_by_foreign_key(
    client: &Client,
    table: u32,
    topics: &[&str],
) -> Result<Option<(String, String)>, Error> {
    let row = client
        .query_typed_opt(
            "SELECT a.attname::text, w.topic
             FROM pg_constraint fk
             JOIN pg_attribute a ON a.attrelid = fk.conrelid AND a.attnum = fk.conkey[1]
             JOIN pg_attribute r ON r.attrelid = fk.confrelid AND r.attnum = fk.confkey[1]
             JOIN pgfresh.watches w ON w.table_oid = fk.confrelid AND w.key_column = r.attname
             WHERE fk.conrelid = $1 AND fk.contype = 'f' AND cardinality(fk.conkey) = 1
               AND w.topic = ANY($2)
             ORDER BY array_position($2, w.topic), fk.conname LIMIT 1",
            &[(&table, Type::OID), (&topics, Type::TEXT_ARRAY)],
        )
        .await?;
    Ok(row.map(|row| (row.get(0), row.get(1))))
}

/// How a session with `client`'s search_path names `table` (`reviews` where `public` is on it,
/// `shop.reviews` elsewhere): the name to give `pgfresh.watch` in a fix the DBA runs as usual.
pub(crate) async fn name_in_session(client: &Client, table: u32) -> Result<String, Error> {
    Ok(client
        .query_typed_one(
            "SELECT $1::pg_catalog.oid::pg_catalog.regclass::pg_catalog.text",
            &[(&table, Type::OID)],
        )
        .await?
        .get(0))
}

/// This session's backend process id.
pub(crate) async fn backend_pid(client: &Client) -> Result<i32, Error> {
    Ok(client
        .query_typed_one("SELECT pg_catalog.pg_backend_pid()", &[])
        .await?
        .get(0))
}
