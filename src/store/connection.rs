//! The two kinds of connection pgfresh holds to Redis (one server, or a cluster whose commands go to
//! the node serving their keys' slot), their timeouts, and how a Redis URL is shown: rebuilt from the
//! parsed URL, never with its password.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::Error;

/// How long connecting to Redis may take before it counts as unreachable.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one Redis command may take.
pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to one server or to a cluster, usable with any `redis` command
/// (`redis::cmd(..).query_async(&mut connection)`). Both kinds reconnect by themselves; clones share
/// the connection.
#[derive(Clone)]
pub struct RedisConnection(Kind);

#[derive(Clone)]
enum Kind {
    /// One server.
    Server(ConnectionManager),
    /// A Redis Cluster: commands go to the node serving their keys' slot.
    Cluster(Arc<ClusterHandle>),
}

impl RedisConnection {
    pub(crate) fn server(connection: ConnectionManager) -> Self {
        RedisConnection(Kind::Server(connection))
    }

    /// Connects to a cluster through `client`.
    pub(crate) async fn cluster(client: ClusterClient) -> redis::RedisResult<Self> {
        let connection = client.get_async_connection().await?;
        Ok(RedisConnection(Kind::Cluster(Arc::new(ClusterHandle {
            client,
            current: Mutex::new((0, connection)),
            replacing: AtomicBool::new(false),
        }))))
    }

    /// Sends `cmd` to the master serving `slot` of a cluster; `None` for one server.
    pub(crate) async fn on_slot(&self, cmd: Cmd, slot: Slot) -> Option<redis::RedisResult<Value>> {
        let Kind::Cluster(cluster) = &self.0 else {
            return None;
        };
        let node = SingleNodeRoutingInfo::SpecificNode(Route::with_slot(slot, SlotAddr::Master));
        let (generation, mut connection) = cluster.current();
        let result = connection
            .route_command(cmd, RoutingInfo::SingleNode(node))
            .await;
        if let Err(error) = &result {
            cluster.replace(generation, error);
        }
        Some(result)
    }
}

/// A cluster connection that is replaced when it stops answering.
///
/// After a master fails over, the `redis` crate's cluster connection was seen to time out on every
/// command for minutes (with the new master serving and a fresh connection answering at once): a
/// listener sharing it applied nothing. A command that times out therefore has a new connection
/// built in the background, which later commands use; one replacement at a time.
struct ClusterHandle {
    client: ClusterClient,
    /// The connection in use, and how many replaced it before.
    current: Mutex<(u64, ClusterConnection)>,
    replacing: AtomicBool,
}

impl ClusterHandle {
    fn current(&self) -> (u64, ClusterConnection) {
        self.current
            .lock()
            .expect("cluster connection lock")
            .clone()
    }

    /// Replaces connection number `generation` unless it was replaced already or is being replaced.
    /// A command that is merely slow (a long script, a fork stall) costs one needless reconnect.
    fn replace(self: &Arc<Self>, generation: u64, error: &redis::RedisError) {
        if !error.is_timeout()
            || self.current().0 != generation
            || self.replacing.swap(true, Ordering::AcqRel)
        {
            return;
        }
        tracing::warn!(%error, "the Redis Cluster connection stopped answering: connecting again");
        let handle = self.clone();
        tokio::spawn(async move {
            // Cleared however the task ends, even cancelled by a runtime shutting down.
            let _replacing = ClearOnDrop(&handle.replacing);
            match handle.client.get_async_connection().await {
                Ok(connection) => {
                    let mut current = handle.current.lock().expect("cluster connection lock");
                    if current.0 == generation {
                        *current = (generation + 1, connection);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot connect to the Redis Cluster again yet")
                }
            }
        });
    }
}

/// Clears a flag when dropped.
struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.0 {
            Kind::Server(connection) => connection.req_packed_command(cmd),
            Kind::Cluster(cluster) => Box::pin(async move {
                let (generation, mut connection) = cluster.current();
                let result = connection.req_packed_command(cmd).await;
                if let Err(error) = &result {
                    cluster.replace(generation, error);
                }
                result
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.0 {
            Kind::Server(connection) => connection.req_packed_commands(pipeline, offset, count),
            Kind::Cluster(cluster) => Box::pin(async move {
                let (generation, mut connection) = cluster.current();
                let result = connection
                    .req_packed_commands(pipeline, offset, count)
                    .await;
                if let Err(error) = &result {
                    cluster.replace(generation, error);
                }
                result
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.0 {
            Kind::Server(connection) => connection.get_db(),
            Kind::Cluster(cluster) => cluster.current().1.get_db(),
        }
    }
}

pub(crate) fn invalid_url(shown: &str, error: redis::RedisError) -> Error {
    Error::InvalidUrl {
        what: "Redis",
        url: shown.to_string(),
        reason: error.to_string(),
    }
}

/// A Redis URL as it is safe to print: built from the parsed URL, without the password; for a URL
/// that does not parse, the text with everything that could be a password replaced by `***`, by
/// the one rule set pgfresh has for connection strings (`pg::conninfo`'s).
pub(crate) fn shown_redis_url(url: &str) -> String {
    use redis::{ConnectionAddr, IntoConnectionInfo};
    let Ok(info) = url.into_connection_info() else {
        return crate::pg::redact_unparsed(url);
    };
    let settings = info.redis_settings();
    let user = settings
        .username()
        .map(|user| format!("{user}@"))
        .unwrap_or_default();
    let db = match settings.db() {
        0 => String::new(),
        db => format!("/{db}"),
    };
    match info.addr() {
        ConnectionAddr::Tcp(host, port) => format!("redis://{user}{host}:{port}{db}"),
        ConnectionAddr::TcpTls { host, port, .. } => format!("rediss://{user}{host}:{port}{db}"),
        ConnectionAddr::Unix(path) => format!("redis+unix://{user}{}{db}", path.display()),
        other => format!("{other}{db}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_urls_are_shown_without_their_password() {
        assert_eq!(
            shown_redis_url("redis://:s3cret@cache:6379/2"),
            "redis://cache:6379/2"
        );
        assert_eq!(
            shown_redis_url("rediss://pgfresh:pa%2Fss@cache:6380"),
            "rediss://pgfresh@cache:6380"
        );
        assert_eq!(
            shown_redis_url("rediss://pgfresh:pa/ss@cache:6380"),
            "rediss://***@cache:6380",
            "a password that breaks the URL hides the user too"
        );
        for url in [
            "redis://:pa/ss@127.0.0.1:6379/0",
            "redis://user:pa?ss@host/1",
            "redis://user:p@ss@host:1/0",
            "redis://:x@y@z/0?password=pa/ss",
            "redis://user:pass word@host:notaport",
        ] {
            let shown = shown_redis_url(url);
            for secret in ["pa/ss", "pa?ss", "p@ss", "x@y", "pass word"] {
                assert!(!shown.contains(secret), "{url} -> {shown}");
            }
        }
    }

    #[test]
    fn a_url_that_does_not_parse_is_shown_by_the_one_rule_set_for_connection_strings() {
        for url in [
            "redis://:pa/ss@127.0.0.1:6379/0",
            "redis://h:notaport/0?password=s3cret",
            "cache:6379 password=s3cret",
        ] {
            let shown = shown_redis_url(url);
            assert_eq!(shown, crate::pg::redact_unparsed(url));
            assert!(
                !shown.contains("s3cret") && !shown.contains("pa/ss"),
                "{shown}"
            );
        }
    }
}
