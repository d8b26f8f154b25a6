//! Redis, the store the fragments are kept in: one server or a Redis Cluster, reached through one
//! [`RedisStore`], which reads fragments as any client would and writes them the way only pgfresh
//! does, ticket-checked.
//!
//! - `connection`: the two kinds of connection and how a URL is shown.
//! - `layout`: where pgfresh's own keys live beside the fragments (tickets, markers, canaries), cluster
//!   hash slots included.
//! - `write`: the ticket-checked write (`write.lua`): a ticket beside every fragment, and a write
//!   whose ticket is older than the stored one refused.
//! - `markers`: per-fragment markers that say whether Redis still holds a complete sweep's work.
//! - `scan`: the key scan the sweep's orphan pass walks.
//! - `storage`: what a fragment's entries look like in Redis (plain HTML, or Django's cache format),
//!   and an optional TTL.
//! - `eviction`: what Redis's memory policy allows, which decides how far a missing ticket proves.

mod connection;
mod eviction;
mod layout;
mod markers;
mod scan;
mod storage;
mod write;

use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::Error;

pub use connection::RedisConnection;
pub(crate) use connection::shown_redis_url;
pub use eviction::Eviction;
use eviction::EvictionState;
pub(crate) use layout::{BOOKKEEPING_PREFIX, Layout};
pub use storage::{Format, Storage};
#[cfg(feature = "testing")]
pub use write::{Write, WriteResult};
#[cfg(not(feature = "testing"))]
pub(crate) use write::{Write, WriteResult};

use connection::{CONNECT_TIMEOUT, RESPONSE_TIMEOUT, invalid_url};

/// Redis as pgfresh uses it: fragments written ticket-checked, read with plain GETs. Cheap to clone
/// (clones share the connection); reconnects by itself.
#[derive(Clone)]
pub struct RedisStore {
    connection: RedisConnection,
    layout: Layout,
    url: String,
    write_script: redis::Script,
    confirm_script: redis::Script,
    /// What Redis's memory policy allows, as last read; shared by clones, so one check serves every
    /// writer.
    eviction: Arc<EvictionState>,
}

/// redis-py (and so Django) reads `?db=N`; the Redis client pgfresh uses ignores it and would write
/// to database 0 while the site reads N. Refused, saying what works.
fn refuse_db_parameter(url: &str, shown: &str) -> Result<(), Error> {
    let query = url.split_once('?').map_or("", |(_, query)| query);
    let query = query.split('#').next().unwrap_or("");
    if query
        .split('&')
        .any(|pair| pair.split('=').next() == Some("db"))
    {
        return Err(Error::InvalidUrl {
            what: "Redis",
            url: shown.to_string(),
            reason: "pgfresh does not read ?db=N; select the database with a /N path instead \
                     (redis://host:6379/N), which Django and redis-py read too"
                .into(),
        });
    }
    Ok(())
}

impl RedisStore {
    /// Connects to one Redis server, failing with one clear line when it cannot be reached or is a
    /// cluster node (use [`RedisStore::connect_cluster`]). A `/N` path in the URL selects database N.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        let shown = shown_redis_url(url);
        refuse_db_parameter(url, &shown)?;
        let client = redis::Client::open(url).map_err(|e| invalid_url(&shown, e))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let connect_error = |e: redis::RedisError| Error::RedisConnect {
            url: shown.clone(),
            reason: e.to_string(),
        };
        let mut connection = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(connect_error)?;
        // A user whose ACL forbids INFO skips this check; writes would then fail with MOVED errors.
        let info: Option<String> = redis::cmd("INFO")
            .arg("cluster")
            .query_async(&mut connection)
            .await
            .ok();
        if info.is_some_and(|info| info.lines().any(|line| line.trim() == "cluster_enabled:1")) {
            return Err(Error::RedisConnect {
                url: shown,
                reason: "this server is a Redis Cluster node; pass --redis-cluster \
                         (REDIS_CLUSTER=1) to use the cluster"
                    .into(),
            });
        }
        let store = Self::new(RedisConnection::server(connection), Layout::Server, shown);
        store.check_eviction().await;
        Ok(store)
    }

    /// Connects to a Redis Cluster through any of `urls` (seed nodes; the others are discovered).
    pub async fn connect_cluster(urls: &[&str]) -> Result<Self, Error> {
        let shown = urls
            .iter()
            .map(|url| shown_redis_url(url))
            .collect::<Vec<_>>()
            .join(",");
        let client = redis::cluster::ClusterClient::builder(urls.iter().copied())
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .retries(3)
            .max_retry_wait(1000)
            .build()
            .map_err(|e| invalid_url(&shown, e))?;
        let connection =
            RedisConnection::cluster(client)
                .await
                .map_err(|e| Error::RedisConnect {
                    url: shown.clone(),
                    reason: e.to_string(),
                })?;
        let store = Self::new(connection, Layout::Cluster, shown);
        store.check_eviction().await;
        Ok(store)
    }

    fn new(connection: RedisConnection, layout: Layout, url: String) -> Self {
        Self {
            connection,
            layout,
            url,
            write_script: redis::Script::new(include_str!("write.lua")),
            confirm_script: redis::Script::new(include_str!("confirm.lua")),
            eviction: Arc::new(EvictionState::default()),
        }
    }

    /// The URL with its password removed, for messages (several, comma-separated, for a cluster).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The store's connection, for commands of your own: `redis::cmd(..).query_async(&mut connection)`.
    pub fn connection(&self) -> RedisConnection {
        self.connection.clone()
    }

    /// Whether this store is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.layout == Layout::Cluster
    }

    /// The key holding the render ticket of the value stored under fragment key `key`: what to
    /// look at, beside the fragment, when a write was refused.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub(crate) fn ticket_key(&self, key: &str) -> String {
        self.layout.ticket(key)
    }

    /// Reads many fragments with one MGET (one per node in a cluster), `None` where a key is
    /// missing: how a page reads its fragments.
    pub async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<String>>, Error> {
        self.get_entries(&Storage::plain(), keys).await
    }

    /// Reads the HTML of many fragment entries (fragment keys, `<prefix><key>:<variant>`) from
    /// where `storage` keeps them, with one MGET (one per node in a cluster); `None` where an entry
    /// is missing or not in the storage's format.
    pub async fn get_entries(
        &self,
        storage: &Storage,
        keys: &[String],
    ) -> Result<Vec<Option<String>>, Error> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let stored: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(
                keys.iter()
                    .map(|key| storage.redis_key(key))
                    .collect::<Vec<_>>(),
            )
            .query_async(&mut self.connection.clone())
            .await?;
        Ok(stored
            .into_iter()
            .map(|value| storage.decode(&value?))
            .collect())
    }

    /// Reads one fragment.
    pub async fn get(&self, key: &str) -> Result<Option<String>, Error> {
        Ok(redis::cmd("GET")
            .arg(key)
            .query_async(&mut self.connection.clone())
            .await?)
    }

    /// Fails unless Redis answers a PING (every node of a cluster).
    pub async fn ping(&self) -> Result<(), Error> {
        let _: Value = redis::cmd("PING")
            .query_async(&mut self.connection.clone())
            .await?;
        Ok(())
    }
}
