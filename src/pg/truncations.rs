//! `pgfresh.truncations`: TRUNCATEs of watched tables, recorded by their trigger (a TRUNCATE names no
//! rows), read by the listener, which sweeps the topic's fragments and then deletes exactly the rows
//! its sweep covered.

use tokio_postgres::Client;
use tokio_postgres::types::Type;

use crate::Error;

/// One recorded TRUNCATE: its id and topic.
pub(crate) struct Truncation {
    pub(crate) id: i64,
    pub(crate) topic: String,
}

/// Every TRUNCATE recorded and not yet swept.
pub(crate) async fn recorded(client: &Client) -> Result<Vec<Truncation>, Error> {
    Ok(client
        .query_typed("SELECT id, topic FROM pgfresh.truncations", &[])
        .await?
        .iter()
        .map(|row| Truncation {
            id: row.get(0),
            topic: row.get(1),
        })
        .collect())
}

/// Deletes exactly the TRUNCATEs a sweep covered: one committed meanwhile keeps its row.
pub(crate) async fn settle(client: &Client, ids: &[i64]) -> Result<(), Error> {
    client
        .execute_typed(
            "DELETE FROM pgfresh.truncations WHERE id = ANY($1)",
            &[(&ids, Type::INT8_ARRAY)],
        )
        .await?;
    Ok(())
}

/// How many TRUNCATEs wait for a sweep, for `status`.
pub(crate) async fn count(client: &Client) -> Result<i64, Error> {
    Ok(client
        .query_typed_one("SELECT count(*) FROM pgfresh.truncations", &[])
        .await?
        .get(0))
}
