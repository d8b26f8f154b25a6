//! The scan of every key under a prefix, on one server or master after master in a cluster: how the
//! sweep's orphan pass finds entries whose row is gone.

use redis::cluster_routing::Slot;

use super::{RedisConnection, RedisStore};
use crate::Error;

/// Keys a SCAN step looks at: SCAN walks the whole keyspace whatever the MATCH, so few large steps.
const SCAN_COUNT: usize = 5000;

impl RedisStore {
    /// Starts a scan of the keys starting with `prefix`, on every master of a cluster.
    pub(crate) async fn scan_prefix(&self, prefix: &str) -> Result<KeyScan, Error> {
        let anchors = self.anchors().await?;
        Ok(KeyScan {
            connection: self.connection.clone(),
            pattern: format!("{}*", escape_glob(prefix)),
            anchors,
            cursor: 0,
        })
    }
}

/// A SCAN over the keys matching a prefix: over one server, or master after master in a cluster. Keys
/// written or moved between nodes during the scan may be missed or seen twice.
pub(crate) struct KeyScan {
    connection: RedisConnection,
    pattern: String,
    /// Nodes still to scan, the current one last.
    anchors: Vec<Option<Slot>>,
    cursor: u64,
}

impl KeyScan {
    /// Whether no key is under the prefix, as one SCAN step per server proves; false as soon as
    /// a server's whole database (every key, under the prefix or not) is too large for one step to
    /// cover it. Costs one page.
    pub(crate) async fn none_in_one_step(mut self) -> Result<bool, Error> {
        while let Some(page) = self.next_page().await? {
            if self.cursor != 0 || !page.is_empty() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The next page of keys, or `None` when the scan is complete.
    pub(crate) async fn next_page(&mut self) -> Result<Option<Vec<String>>, Error> {
        let Some(&anchor) = self.anchors.last() else {
            return Ok(None);
        };
        let mut scan = redis::cmd("SCAN");
        scan.arg(self.cursor)
            .arg("MATCH")
            .arg(&self.pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT);
        let on_node = match anchor {
            Some(slot) => self.connection.on_slot(scan.clone(), slot).await,
            None => None,
        };
        let reply = match on_node {
            Some(reply) => reply?,
            None => scan.query_async(&mut self.connection).await?,
        };
        let (next, keys): (u64, Vec<String>) =
            redis::from_redis_value(reply).map_err(redis::RedisError::from)?;
        self.cursor = next;
        if next == 0 {
            self.anchors.pop();
        }
        Ok(Some(keys))
    }
}

/// Escapes Redis glob metacharacters so a prefix matches only itself.
fn escape_glob(prefix: &str) -> String {
    let mut escaped = String::with_capacity(prefix.len());
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}
