//! Fan-out: the keys of shared rows (an author, a tag) mapped to the keys of the fragments that show
//! them, with the fragment's through query, and queued under the fragment's own topic.
//!
//! One `INSERT ... SELECT` does it inside the claiming transaction, so the mapped keys never pass
//! through the listener's memory however many there are, and they are queued exactly when the change
//! that caused them is settled: a crash in between loses nothing and repeats only the mapping.

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement};

use super::PINNED_SEARCH_PATH;

/// The statement that maps and queues: the user's query sees `$1`; `$2` is the fragment's topic. It
/// runs under the user's `search_path` (the query names the application's tables), so every name of
/// its own is qualified.
fn statement(query: &str) -> String {
    format!(
        "INSERT INTO pgfresh.changes (topic, key)
         SELECT DISTINCT $2::pg_catalog.text, mapped.k::pg_catalog.text
         FROM ({query}) AS mapped(k)
         WHERE mapped.k IS NOT NULL"
    )
}

/// Runs the statements that follow in this transaction under the users' `search_path`, until the
/// transaction or the savepoint it is called in ends, or [`pin_search_path`].
pub(crate) async fn use_users_search_path(
    txn: &Client,
    path: &str,
) -> Result<(), tokio_postgres::Error> {
    txn.execute_typed(
        "SELECT pg_catalog.set_config('search_path', $1, true)",
        &[(&path, Type::TEXT)],
    )
    .await?;
    Ok(())
}

/// Puts the session's `search_path` back to pgfresh's pinned one, for the session and not only the
/// transaction: a through query that changed it for the session (`set_config(..., false)`) would
/// otherwise leave a pooled session of pgfresh's own unpinned for good.
pub(crate) async fn pin_search_path(txn: &Client) -> Result<(), tokio_postgres::Error> {
    txn.execute_typed(
        "SELECT pg_catalog.set_config('search_path', $1, false)",
        &[(&PINNED_SEARCH_PATH, Type::TEXT)],
    )
    .await?;
    Ok(())
}

/// The `search_path` of sessions that user code runs in (`Database::get`), for through queries,
/// which run inside pgfresh's own transactions.
pub(crate) async fn users_search_path(users: &Client) -> Result<String, tokio_postgres::Error> {
    Ok(users
        .query_typed_one("SELECT pg_catalog.current_setting('search_path')", &[])
        .await?
        .get(0))
}

/// What a fan-out did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct FannedOut {
    /// Fragment keys queued.
    pub(crate) queued: u64,
    /// Topic keys that are not of the type the query takes (their changes fail alone).
    pub(crate) unfit: Vec<String>,
}

/// Why a through query cannot run at all, in one line.
pub(crate) fn check_statement(statement: &Statement) -> Result<(), String> {
    let taken = statement
        .params()
        .first()
        .map(Type::name)
        .unwrap_or("nothing");
    match statement.params().first() {
        Some(t) if KeyArray::supports(t) => Ok(()),
        _ => Err(format!(
            "it takes $1 as {taken}; pgfresh passes the topic's keys as an array of bigint, integer, smallint or text: compare with = ANY($1), casting if needed ($1::text[])"
        )),
    }
}

/// Prepares the fan-out statement for a through query (to check it at start-up, and to run it).
pub(crate) async fn prepare(
    client: &Client,
    query: &str,
) -> Result<Statement, tokio_postgres::Error> {
    client.prepare(&statement(query)).await
}

/// Why a fan-out did not happen.
#[derive(Debug)]
pub(crate) enum FanOutError {
    /// The query cannot work as written (a server error, a missing grant, a `$1` of another type):
    /// the changes that asked for it fail, with this line.
    Query(String),
    /// The connection went away: the whole batch waits.
    Connection(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for FanOutError {
    fn from(error: tokio_postgres::Error) -> Self {
        match error.as_db_error() {
            Some(_) => FanOutError::Query(crate::error::describe_postgres(&error)),
            None => FanOutError::Connection(error),
        }
    }
}

/// Maps `keys` (text, as queued) with `query` and queues the results under `own_topic`. Must run
/// inside the claiming transaction, in a savepoint: a failing query aborts what it runs in.
pub(crate) async fn fan_out(
    txn: &Client,
    query: &str,
    own_topic: &str,
    keys: &[&str],
) -> Result<FannedOut, FanOutError> {
    let statement = prepare(txn, query).await?;
    check_statement(&statement).map_err(FanOutError::Query)?;
    let (array, unfit) = KeyArray::parse(&statement.params()[0], keys);
    let queued = txn
        .execute(&statement, &[array.as_param(), &own_topic])
        .await?;
    Ok(FannedOut { queued, unfit })
}

/// Runs a through query alone on `keys` (text, as queued), its rows read and dropped: for `doctor`,
/// which looks at the tables it reads. Must run in a transaction of the caller's (read-only).
pub(crate) async fn try_query(
    client: &Client,
    query: &str,
    keys: &[&str],
) -> Result<(), FanOutError> {
    let statement = client
        .prepare(&format!("SELECT 1 FROM ({query}) AS mapped"))
        .await?;
    check_statement(&statement).map_err(FanOutError::Query)?;
    let (array, _) = KeyArray::parse(&statement.params()[0], keys);
    client.query(&statement, &[array.as_param()]).await?;
    Ok(())
}

/// Topic keys converted to the array type a through query takes as `$1`.
enum KeyArray {
    Int8(Vec<i64>),
    Int4(Vec<i32>),
    Int2(Vec<i16>),
    Text(Vec<String>),
}

impl KeyArray {
    fn supports(t: &Type) -> bool {
        [
            Type::INT8_ARRAY,
            Type::INT4_ARRAY,
            Type::INT2_ARRAY,
            Type::TEXT_ARRAY,
            Type::VARCHAR_ARRAY,
        ]
        .contains(t)
    }

    /// The keys as `t[]`, and those that do not fit it.
    fn parse(t: &Type, keys: &[&str]) -> (KeyArray, Vec<String>) {
        fn numbers<N: std::str::FromStr>(keys: &[&str], unfit: &mut Vec<String>) -> Vec<N> {
            let parsed = keys.iter().filter_map(|key| match key.parse() {
                Ok(number) => Some(number),
                Err(_) => {
                    unfit.push(key.to_string());
                    None
                }
            });
            parsed.collect()
        }
        let mut unfit = Vec::new();
        let array = match *t {
            Type::INT8_ARRAY => KeyArray::Int8(numbers(keys, &mut unfit)),
            Type::INT4_ARRAY => KeyArray::Int4(numbers(keys, &mut unfit)),
            Type::INT2_ARRAY => KeyArray::Int2(numbers(keys, &mut unfit)),
            _ => KeyArray::Text(keys.iter().map(|key| key.to_string()).collect()),
        };
        (array, unfit)
    }

    fn as_param(&self) -> &(dyn ToSql + Sync) {
        match self {
            KeyArray::Int8(keys) => keys,
            KeyArray::Int4(keys) => keys,
            KeyArray::Int2(keys) => keys,
            KeyArray::Text(keys) => keys,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_do_not_fit_the_array_type_are_set_apart() {
        let (array, unfit) = KeyArray::parse(&Type::INT8_ARRAY, &["1", "x", "3"]);
        assert!(matches!(array, KeyArray::Int8(ref keys) if keys == &[1, 3]));
        assert_eq!(unfit, ["x"]);
        let (array, unfit) = KeyArray::parse(&Type::TEXT_ARRAY, &["a", "1"]);
        assert!(matches!(array, KeyArray::Text(ref keys) if keys == &["a", "1"]));
        assert!(unfit.is_empty());
    }

    #[test]
    fn the_users_query_is_a_subquery_whose_first_column_is_queued() {
        let sql = statement("SELECT id FROM posts WHERE author_id = ANY($1)");
        assert!(sql.contains("FROM (SELECT id FROM posts WHERE author_id = ANY($1)) AS mapped(k)"));
        assert!(
            !sql.contains("::text"),
            "every name of pgfresh's own is qualified"
        );
    }
}
