//! Redis: version-checked, batched writes of rendered fragments; the key scan the sweep uses to find
//! orphans; the per-fragment markers that tell whether Redis still holds what was written.
//!
//! Every fragment key has a companion ticket key (see [`crate::keys`]) holding the render ticket of the
//! value stored. One Lua script applies many writes: for each key it refuses the write when a higher
//! ticket is stored, so a slow render of old data can never overwrite a newer one. The fragment itself
//! stays a plain string that any client can `GET`.
//!
//! The same sink talks to a single server or to a Redis Cluster. In a cluster one script call may only
//! touch one hash slot, so a batch is split by slot and the calls are sent concurrently (the
//! connection to each node pipelines them); scans and markers visit every master.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::{StreamExt, stream};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
use redis::{Cmd, Pipeline, RedisFuture, Script, Value};

use crate::Error;
use crate::config::shown_redis_url;
use crate::keys::Layout;

pub use crate::keys::BOOKKEEPING_PREFIX;

/// Keys per script call: large enough to make round trips rare, small enough that one call does not
/// stall other Redis clients noticeably.
const KEYS_PER_CALL: usize = 1000;

/// Script calls in flight at once on a cluster, where a batch becomes one call per hash slot.
const CLUSTER_CALLS_IN_FLIGHT: usize = 256;

/// Keys a SCAN step looks at: SCAN walks the whole keyspace whatever the MATCH, so few large steps.
const SCAN_COUNT: usize = 5000;

/// How long the ticket of a deleted fragment is kept, to refuse a late write of a render that started
/// before the delete. Renders take milliseconds; a day is a wide margin that still frees the memory.
const TOMBSTONE_MILLIS: u64 = 24 * 60 * 60 * 1000;

const WRITE_SCRIPT: &str = r#"
-- pgfresh: version-checked writes. KEYS come in pairs (fragment key, its ticket key). ARGV[1] is the
-- render ticket, ARGV[2] how long a deleted key's ticket is kept (ms), ARGV[3] '1' when Redis may
-- evict keys, then one (op, html) pair per key pair: op 's' sets the fragment to html, 'd' deletes it.
-- Returns one result per pair: 0 written, 1 unchanged, 2 refused (a newer render is stored),
-- 3 deleted, 4 already absent, 5 written and 6 deleted without a ticket to check against (Redis may
-- have evicted a newer render's ticket: render the key again), or the error text when Redis refused
-- this key (the others go on).
-- A fragment key holding another type is simply overwritten: it is under pgfresh's prefix.
local ticket = tonumber(ARGV[1])
local may_evict = ARGV[3] == '1'
local results = {}
for i = 1, #KEYS, 2 do
    local key, ticket_key = KEYS[i], KEYS[i + 1]
    local op, html = ARGV[i + 3], ARGV[i + 4]
    local stored = redis.pcall('GET', ticket_key)
    local result
    if type(stored) == 'table' and stored.err then
        result = 'error: ' .. stored.err
    elseif (tonumber(stored) or 0) > ticket then
        result = 2
    else
        local unchecked = may_evict and not stored
        if op == 'd' then
            local removed = redis.call('DEL', key)
            redis.call('SET', ticket_key, ticket, 'PX', ARGV[2])
            result = removed == 1 and (unchecked and 6 or 3) or 4
        else
            result = 1
            if redis.pcall('GET', key) ~= html then
                local set = redis.pcall('SET', key, html)
                result = (type(set) == 'table' and set.err) and ('error: ' .. set.err) or 0
            end
            if result == 0 or result == 1 then
                redis.call('SET', ticket_key, ticket)
            end
            if result == 0 and unchecked then
                result = 5
            end
        end
    end
    results[#results + 1] = result
end
return results
"#;

/// Sets a fragment's marker if its sweep's canary still holds the sweep's token.
const FINISH_SWEEP_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('SET', KEYS[2], ARGV[2])
    redis.call('DEL', KEYS[1])
    return 1
end
return 0
"#;

/// One write for [`RedisSink::write`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Store this HTML under this key.
    Set {
        /// Fragment key.
        key: String,
        /// Rendered HTML.
        html: String,
    },
    /// The row is gone: delete the key.
    Delete {
        /// Fragment key.
        key: String,
    },
}

impl Write {
    /// The fragment key written.
    pub fn key(&self) -> &str {
        match self {
            Write::Set { key, .. } | Write::Delete { key } => key,
        }
    }
}

/// What happened to one [`Write`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteResult {
    /// The value changed and was stored.
    Written,
    /// The same value was already stored; only the ticket moved.
    Unchanged,
    /// A newer render was already stored: this one was dropped.
    Refused,
    /// The key was deleted.
    Deleted,
    /// The value changed and was stored, but Redis held no ticket to check this render against
    /// although it may evict keys: a newer render's ticket may have been evicted, so the key must be
    /// rendered once more.
    WrittenUnchecked,
    /// Like [`WriteResult::WrittenUnchecked`], for a delete.
    DeletedUnchecked,
    /// The key to delete did not exist.
    Absent,
    /// Redis refused this key (for example it holds a list, or memory is full); nothing was written.
    Failed(String),
}

/// A connection to one server or to a cluster, usable with any `redis` command
/// (`redis::cmd(..).query_async(&mut connection)`). Both kinds reconnect by themselves; clones share
/// the connection.
#[derive(Clone)]
pub enum RedisConnection {
    /// One server.
    Server(ConnectionManager),
    /// A Redis Cluster: commands go to the node serving their keys' slot.
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Server(connection) => connection.req_packed_command(cmd),
            RedisConnection::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Server(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
            RedisConnection::Cluster(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Server(connection) => connection.get_db(),
            RedisConnection::Cluster(connection) => connection.get_db(),
        }
    }
}

/// A Redis connection that writes fragments. Cheap to clone; reconnects by itself.
#[derive(Clone)]
pub struct RedisSink {
    connection: RedisConnection,
    layout: Layout,
    url: String,
    script: Script,
    /// What Redis's memory policy allows, as last read (see [`RedisSink::check_eviction`]); shared
    /// by clones, so one check serves every writer.
    eviction: std::sync::Arc<EvictionState>,
}

/// Whether Redis may evict pgfresh's keys, which decides how far a missing ticket can be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eviction {
    /// No `maxmemory`, or `maxmemory-policy noeviction`: a key disappears only when deleted.
    Impossible,
    /// `volatile-*`: keys with a TTL may go, and pgfresh's tombstones have one.
    VolatileKeys,
    /// `allkeys-*`: any key may go, tickets and markers included.
    AnyKey,
    /// Redis would not say (an ACL without `INFO`): treated as if it may evict.
    Unknown,
}

impl Eviction {
    /// Orders the kinds from evicting nothing to evicting anything.
    fn severity(self) -> u8 {
        match self {
            Eviction::Impossible => 0,
            Eviction::VolatileKeys => 1,
            Eviction::AnyKey | Eviction::Unknown => 2,
        }
    }

    /// One line for the status page and `status`.
    pub fn describe(self, policy: &str) -> String {
        match self {
            Eviction::Impossible => format!("{policy}: Redis evicts nothing"),
            Eviction::VolatileKeys => format!(
                "{policy}: Redis may evict pgfresh's tombstones (keys with a TTL); a render that finds no ticket is done again"
            ),
            Eviction::AnyKey => format!(
                "{policy}: Redis may evict any key, fragments, tickets and markers included; a render that finds no ticket is done again, an evicted fragment stays missing until it changes or the next sweep"
            ),
            Eviction::Unknown => {
                "unknown (Redis refused INFO): treated as if Redis may evict any key".into()
            }
        }
    }
}

/// The last [`Eviction`] read, and the policy's name.
struct EvictionState {
    state: std::sync::Mutex<(Eviction, String)>,
}

impl EvictionState {
    fn load(&self) -> Eviction {
        self.state.lock().expect("eviction state lock").0
    }
}

impl RedisSink {
    /// Connects to one Redis server, failing with a clear message when it cannot be reached or is a
    /// cluster node (use [`RedisSink::connect_cluster`]). A `/N` path in the URL selects database N.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        let shown = shown_redis_url(url);
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
        let sink = Self::new(RedisConnection::Server(connection), Layout::Server, shown);
        sink.check_eviction().await;
        Ok(sink)
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
        let connection = client
            .get_async_connection()
            .await
            .map_err(|e| Error::RedisConnect {
                url: shown.clone(),
                reason: e.to_string(),
            })?;
        let sink = Self::new(RedisConnection::Cluster(connection), Layout::Cluster, shown);
        sink.check_eviction().await;
        Ok(sink)
    }

    fn new(connection: RedisConnection, layout: Layout, url: String) -> Self {
        Self {
            connection,
            layout,
            url,
            script: Script::new(WRITE_SCRIPT),
            eviction: std::sync::Arc::new(EvictionState {
                state: std::sync::Mutex::new((Eviction::Unknown, "not read yet".into())),
            }),
        }
    }

    /// Reads Redis's `maxmemory` and `maxmemory-policy` (every master's, in a cluster), remembers
    /// them for the writes, and returns what they allow with the policy's name. While Redis may
    /// evict, a write that finds no ticket beside its fragment cannot tell whether a newer render's
    /// ticket was evicted, so it is reported as unchecked and the key is rendered once more.
    pub async fn check_eviction(&self) -> (Eviction, String) {
        let info: Result<Value, _> = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut self.connection.clone())
            .await;
        let read = match info {
            Ok(value) => eviction_from_info(&value),
            Err(_) => (Eviction::Unknown, "unknown".to_string()),
        };
        *self.eviction.state.lock().expect("eviction state lock") = read.clone();
        read
    }

    /// What the last [`RedisSink::check_eviction`] found.
    pub fn eviction(&self) -> (Eviction, String) {
        self.eviction
            .state
            .lock()
            .expect("eviction state lock")
            .clone()
    }

    /// The URL with its password removed, for messages (several, comma-separated, for a cluster).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The sink's connection, for commands of your own (reading fragments, tests).
    pub fn connection(&self) -> RedisConnection {
        self.connection.clone()
    }

    /// Whether this sink writes to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.layout == Layout::Cluster
    }

    /// The key holding the render ticket of the value stored under fragment key `key`.
    pub fn ticket_key(&self, key: &str) -> String {
        self.layout.ticket(key)
    }

    /// Applies writes taken under one render ticket, in as few round trips as the batch allows.
    /// Results come back in the order of `writes`.
    pub async fn write(&self, ticket: i64, writes: &[Write]) -> Result<Vec<WriteResult>, Error> {
        if !self.is_cluster() {
            let mut results = Vec::with_capacity(writes.len());
            for chunk in writes.chunks(KEYS_PER_CALL) {
                results.extend(self.write_call(ticket, chunk.iter()).await?);
            }
            return Ok(results);
        }
        // One call per slot (and per KEYS_PER_CALL keys within a slot), all in flight together.
        let mut by_slot: HashMap<Slot, Vec<usize>> = HashMap::new();
        for (index, write) in writes.iter().enumerate() {
            by_slot
                .entry(Slot::for_key(write.key()))
                .or_default()
                .push(index);
        }
        let calls = by_slot
            .into_values()
            .flat_map(|indices| {
                indices
                    .chunks(KEYS_PER_CALL)
                    .map(<[usize]>::to_vec)
                    .collect::<Vec<_>>()
            })
            .map(|indices| async move {
                let results = self
                    .write_call(ticket, indices.iter().map(|&i| &writes[i]))
                    .await?;
                Ok::<_, Error>((indices, results))
            });
        let mut results = vec![None; writes.len()];
        let mut replies = stream::iter(calls).buffer_unordered(CLUSTER_CALLS_IN_FLIGHT);
        while let Some(reply) = replies.next().await {
            let (indices, call_results) = reply?;
            for (index, result) in indices.into_iter().zip(call_results) {
                results[index] = Some(result);
            }
        }
        Ok(results
            .into_iter()
            .map(|result| {
                result.unwrap_or_else(|| WriteResult::Failed("Redis returned no result".into()))
            })
            .collect())
    }

    /// One script call applying `writes`, which a cluster needs all in one slot.
    async fn write_call(
        &self,
        ticket: i64,
        writes: impl Iterator<Item = &Write>,
    ) -> Result<Vec<WriteResult>, Error> {
        let mut invocation = self.script.prepare_invoke();
        let may_evict = self.eviction.load() != Eviction::Impossible;
        invocation
            .arg(ticket)
            .arg(TOMBSTONE_MILLIS)
            .arg(if may_evict { "1" } else { "0" });
        for write in writes {
            let (op, html) = match write {
                Write::Set { html, .. } => ("s", html.as_str()),
                Write::Delete { .. } => ("d", ""),
            };
            invocation
                .key(write.key())
                .key(self.layout.ticket(write.key()))
                .arg(op)
                .arg(html);
        }
        let replies: Vec<Value> = invocation
            .invoke_async(&mut self.connection.clone())
            .await?;
        Ok(replies
            .into_iter()
            .map(|reply| match reply {
                Value::Int(0) => WriteResult::Written,
                Value::Int(1) => WriteResult::Unchanged,
                Value::Int(2) => WriteResult::Refused,
                Value::Int(3) => WriteResult::Deleted,
                Value::Int(4) => WriteResult::Absent,
                Value::Int(5) => WriteResult::WrittenUnchecked,
                Value::Int(6) => WriteResult::DeletedUnchecked,
                other => WriteResult::Failed(describe_reply(other)),
            })
            .collect())
    }

    /// Starts a scan of the keys starting with `prefix`, on every master of a cluster.
    pub async fn scan_prefix(&self, prefix: &str) -> Result<KeyScan, Error> {
        let anchors = self.anchors().await?;
        Ok(KeyScan {
            connection: self.connection.clone(),
            pattern: format!("{}*", escape_glob(prefix)),
            anchors,
            cursor: 0,
        })
    }

    /// The render tickets stored beside these fragment keys (`None` where there is none), in one round
    /// trip (one per node in a cluster).
    pub async fn tickets(&self, keys: &[String]) -> Result<Vec<Option<i64>>, Error> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let ticket_keys: Vec<String> = keys.iter().map(|k| self.layout.ticket(k)).collect();
        let stored: Vec<Option<String>> = redis::cmd("MGET")
            .arg(ticket_keys)
            .query_async(&mut self.connection.clone())
            .await?;
        Ok(stored
            .into_iter()
            .map(|t| t.and_then(|t| t.parse().ok()))
            .collect())
    }

    /// Reads many keys with one MGET (one per node in a cluster), `None` where a key is missing: how
    /// a page reads its fragments.
    pub async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<String>>, Error> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        Ok(redis::cmd("MGET")
            .arg(keys)
            .query_async(&mut self.connection.clone())
            .await?)
    }

    /// Reads one key (for tests and the demo).
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

    /// The version of a fragment whose entries Redis holds (set after a complete sweep), or `None` when
    /// Redis has no record of it: never swept, or emptied since (restart, FLUSHALL, failover). In a
    /// cluster, one answer per master: each may have lost its data on its own.
    pub async fn fragment_markers(&self, key_prefix: &str) -> Result<Vec<Option<u32>>, Error> {
        let keys: Vec<String> = self
            .anchors()
            .await?
            .into_iter()
            .map(|anchor| self.layout.marker(key_prefix, anchor))
            .collect();
        // One MGET; a cluster connection splits it by slot and puts the answers back in order.
        Ok(redis::cmd("MGET")
            .arg(keys)
            .query_async(&mut self.connection.clone())
            .await?)
    }

    /// Notes that a sweep of a fragment starts; hand the token to [`RedisSink::finish_sweep`].
    pub async fn start_sweep(&self, key_prefix: &str) -> Result<String, Error> {
        let token = format!("{:016x}", fastrand::u64(..));
        for anchor in self.anchors().await? {
            self.set(&self.layout.canary(key_prefix, anchor), &token)
                .await?;
        }
        Ok(token)
    }

    /// Records that every entry of a fragment was rendered by `version`, unless Redis lost its data
    /// since [`RedisSink::start_sweep`] (then the sweep's early pages are gone, and the missing marker
    /// calls for another). Returns whether the marker was set (on every master of a cluster).
    pub async fn finish_sweep(
        &self,
        key_prefix: &str,
        token: &str,
        version: u32,
    ) -> Result<bool, Error> {
        let script = Script::new(FINISH_SWEEP_SCRIPT);
        let mut all_set = true;
        for anchor in self.anchors().await? {
            let set: i64 = script
                .key(self.layout.canary(key_prefix, anchor))
                .key(self.layout.marker(key_prefix, anchor))
                .arg(token)
                .arg(version)
                .invoke_async(&mut self.connection.clone())
                .await?;
            all_set &= set == 1;
        }
        Ok(all_set)
    }

    /// Records that every entry of a fragment was rendered by `version` (tests, and tools that fill
    /// Redis by other means).
    pub async fn set_fragment_marker(&self, key_prefix: &str, version: u32) -> Result<(), Error> {
        for anchor in self.anchors().await? {
            self.set(&self.layout.marker(key_prefix, anchor), version)
                .await?;
        }
        Ok(())
    }

    /// One SET (not MSET: a least-privilege ACL need not allow it).
    async fn set(&self, key: &str, value: impl redis::ToRedisArgs) -> Result<(), Error> {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async(&mut self.connection.clone())
            .await?;
        Ok(())
    }

    /// One slot served by each master of a cluster (its lowest), or a single `None` for one server:
    /// where per-node keys go, and how commands are sent to each node.
    async fn anchors(&self) -> Result<Vec<Option<Slot>>, Error> {
        if !self.is_cluster() {
            return Ok(vec![None]);
        }
        let ranges: Vec<Vec<Value>> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut self.connection.clone())
            .await?;
        let mut lowest: HashMap<Vec<u8>, i64> = HashMap::new();
        for range in &ranges {
            let (Some(Value::Int(start)), Some(Value::Array(master))) =
                (range.first(), range.get(2))
            else {
                continue;
            };
            if let [Value::BulkString(host), Value::Int(port), ..] = master.as_slice() {
                let mut node = host.clone();
                node.extend_from_slice(format!(":{port}").as_bytes());
                let slot = lowest.entry(node).or_insert(*start);
                *slot = (*slot).min(*start);
            }
        }
        let mut slots: Vec<i64> = lowest.into_values().collect();
        slots.sort_unstable();
        let anchors: Vec<Option<Slot>> = slots
            .into_iter()
            .filter_map(|slot| u16::try_from(slot).ok().and_then(Slot::new))
            .map(Some)
            .collect();
        if anchors.is_empty() {
            return Err(Error::Internal(
                "CLUSTER SLOTS named no master; is the cluster set up?".into(),
            ));
        }
        Ok(anchors)
    }
}

/// What `INFO memory` (one node's text, or every node's in a cluster) says of eviction: the most
/// permissive of the nodes'.
fn eviction_from_info(info: &Value) -> (Eviction, String) {
    let mut texts = Vec::new();
    collect_texts(info, &mut texts);
    texts
        .iter()
        .filter_map(|text| node_eviction(text))
        .max_by_key(|(eviction, _)| eviction.severity())
        .unwrap_or((Eviction::Unknown, "unknown".into()))
}

/// One node's `INFO memory`: a node without a memory limit evicts nothing, whatever its policy.
fn node_eviction(info: &str) -> Option<(Eviction, String)> {
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.trim().strip_prefix(name)?.strip_prefix(':'))
            .map(str::to_string)
    };
    let (policy, limit) = (field("maxmemory_policy")?, field("maxmemory")?);
    let eviction = if limit == "0" || policy == "noeviction" {
        Eviction::Impossible
    } else if policy.starts_with("volatile-") {
        Eviction::VolatileKeys
    } else {
        Eviction::AnyKey
    };
    Some((eviction, policy))
}

/// Every text in a reply, however nested (a cluster answers INFO with one text per node).
fn collect_texts(value: &Value, texts: &mut Vec<String>) {
    match value {
        Value::BulkString(bytes) => texts.push(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(text) | Value::VerbatimString { text, .. } => texts.push(text.clone()),
        Value::Array(items) | Value::Set(items) => {
            items.iter().for_each(|item| collect_texts(item, texts))
        }
        Value::Map(pairs) => pairs
            .iter()
            .for_each(|(_, item)| collect_texts(item, texts)),
        _ => {}
    }
}

/// How long connecting to Redis may take before it counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one Redis command may take.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

fn invalid_url(shown: &str, error: redis::RedisError) -> Error {
    Error::InvalidUrl {
        what: "Redis",
        url: shown.to_string(),
        reason: error.to_string(),
    }
}

/// A SCAN over the keys matching a prefix: over one server, or master after master in a cluster. Keys
/// written or moved between nodes during the scan may be missed or seen twice.
pub struct KeyScan {
    connection: RedisConnection,
    pattern: String,
    /// Nodes still to scan, the current one last.
    anchors: Vec<Option<Slot>>,
    cursor: u64,
}

impl KeyScan {
    /// The next page of keys, or `None` when the scan is complete.
    pub async fn next_page(&mut self) -> Result<Option<Vec<String>>, Error> {
        let Some(&anchor) = self.anchors.last() else {
            return Ok(None);
        };
        let mut scan = redis::cmd("SCAN");
        scan.arg(self.cursor)
            .arg("MATCH")
            .arg(&self.pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT);
        let reply = match (&mut self.connection, anchor) {
            (RedisConnection::Cluster(cluster), Some(slot)) => {
                let node =
                    SingleNodeRoutingInfo::SpecificNode(Route::with_slot(slot, SlotAddr::Master));
                cluster
                    .route_command(scan, RoutingInfo::SingleNode(node))
                    .await?
            }
            (connection, _) => scan.query_async(connection).await?,
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

/// One line for a script reply that is not a result code.
fn describe_reply(reply: redis::Value) -> String {
    match reply {
        redis::Value::BulkString(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        redis::Value::SimpleString(text) => text,
        other => format!("unexpected reply {other:?}"),
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
