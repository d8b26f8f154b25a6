//! Redis: version-checked, batched writes of rendered fragments, and the key scan the sweep uses to find
//! orphans.
//!
//! Every fragment key has a companion ticket key, `pgfresh:ticket:<fragment key>`, holding the render
//! ticket of the value stored. One Lua script applies a whole batch: for each key it refuses the write
//! when a higher ticket is stored, so a slow render of old data can never overwrite a newer one. The
//! fragment itself stays a plain string that any client can `GET`.

use std::time::Duration;

use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::Error;
use crate::config::redact_url;

/// Redis keys pgfresh keeps for itself start with this; fragment prefixes may not.
pub const BOOKKEEPING_PREFIX: &str = "pgfresh:";

/// Where each fragment key's render ticket is kept.
const TICKET_PREFIX: &str = "pgfresh:ticket:";

/// Where the version of each fragment's last complete sweep is kept, by key prefix. Its absence means
/// Redis lost its data (or never had it), which calls for a sweep.
const MARKER_PREFIX: &str = "pgfresh:fragment:";

/// Set while a listener sweeps a fragment, to tell whether Redis was emptied during the sweep.
const SWEEPING_PREFIX: &str = "pgfresh:sweeping:";

/// Keys per script call: large enough to make round trips rare, small enough that one call does not
/// stall other Redis clients noticeably.
const KEYS_PER_CALL: usize = 1000;

/// Keys a SCAN step looks at: SCAN walks the whole keyspace whatever the MATCH, so few large steps.
const SCAN_COUNT: usize = 5000;

/// How long the ticket of a deleted fragment is kept, to refuse a late write of a render that started
/// before the delete. Renders take milliseconds; a day is a wide margin that still frees the memory.
const TOMBSTONE_MILLIS: u64 = 24 * 60 * 60 * 1000;

const WRITE_SCRIPT: &str = r#"
-- pgfresh: version-checked writes. KEYS come in pairs (fragment key, its ticket key). ARGV[1] is the
-- render ticket, ARGV[2] how long a deleted key's ticket is kept (ms), then one (op, html) pair per
-- key pair: op 's' sets the fragment to html, 'd' deletes it.
-- Returns one result per pair: 0 written, 1 unchanged, 2 refused (a newer render is stored),
-- 3 deleted, 4 already absent, or the error text when Redis refused this key (the others go on).
-- A fragment key holding another type is simply overwritten: it is under pgfresh's prefix.
local ticket = tonumber(ARGV[1])
local results = {}
for i = 1, #KEYS, 2 do
    local key, ticket_key = KEYS[i], KEYS[i + 1]
    local op, html = ARGV[i + 2], ARGV[i + 3]
    local stored = redis.pcall('GET', ticket_key)
    local result
    if type(stored) == 'table' and stored.err then
        result = 'error: ' .. stored.err
    elseif (tonumber(stored) or 0) > ticket then
        result = 2
    elseif op == 'd' then
        local removed = redis.call('DEL', key)
        redis.call('SET', ticket_key, ticket, 'PX', ARGV[2])
        result = removed == 1 and 3 or 4
    else
        result = 1
        if redis.pcall('GET', key) ~= html then
            local set = redis.pcall('SET', key, html)
            result = (type(set) == 'table' and set.err) and ('error: ' .. set.err) or 0
        end
        if result == 0 or result == 1 then
            redis.call('SET', ticket_key, ticket)
        end
    end
    results[#results + 1] = result
end
return results
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
    /// The key to delete did not exist.
    Absent,
    /// Redis refused this key (for example it holds a list, or memory is full); nothing was written.
    Failed(String),
}

/// A Redis connection that writes fragments. Cheap to clone; reconnects by itself.
#[derive(Clone)]
pub struct RedisSink {
    connection: ConnectionManager,
    url: String,
    script: Script,
}

impl RedisSink {
    /// Connects, failing with a clear message when Redis cannot be reached. A `/N` path in the URL
    /// selects database N.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        let shown = redact_url(url);
        let client = redis::Client::open(url).map_err(|e| Error::InvalidUrl {
            what: "Redis",
            url: shown.clone(),
            reason: e.to_string(),
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let connection = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| Error::RedisConnect {
                url: shown.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            connection,
            url: shown,
            script: Script::new(WRITE_SCRIPT),
        })
    }

    /// The URL with its password removed, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Applies writes taken under one render ticket, in as few round trips as the batch allows.
    /// Results come back in the order of `writes`.
    pub async fn write(&self, ticket: i64, writes: &[Write]) -> Result<Vec<WriteResult>, Error> {
        let mut results = Vec::with_capacity(writes.len());
        for chunk in writes.chunks(KEYS_PER_CALL) {
            let mut invocation = self.script.prepare_invoke();
            invocation.arg(ticket).arg(TOMBSTONE_MILLIS);
            for write in chunk {
                let (key, op, html) = match write {
                    Write::Set { key, html } => (key, "s", html.as_str()),
                    Write::Delete { key } => (key, "d", ""),
                };
                invocation
                    .key(key)
                    .key(format!("{TICKET_PREFIX}{key}"))
                    .arg(op)
                    .arg(html);
            }
            let replies: Vec<redis::Value> = invocation
                .invoke_async(&mut self.connection.clone())
                .await?;
            results.extend(replies.into_iter().map(|reply| match reply {
                redis::Value::Int(0) => WriteResult::Written,
                redis::Value::Int(1) => WriteResult::Unchanged,
                redis::Value::Int(2) => WriteResult::Refused,
                redis::Value::Int(3) => WriteResult::Deleted,
                redis::Value::Int(4) => WriteResult::Absent,
                other => WriteResult::Failed(describe_reply(other)),
            }));
        }
        Ok(results)
    }

    /// One step of a SCAN over keys starting with `prefix`: the next cursor (0 when done) and keys.
    pub async fn scan_prefix(
        &self,
        prefix: &str,
        cursor: u64,
    ) -> Result<(u64, Vec<String>), Error> {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{}*", escape_glob(prefix)))
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query_async(&mut self.connection.clone())
            .await?;
        Ok((next, keys))
    }

    /// The render tickets stored beside these fragment keys (0 where there is none), in one round trip.
    pub async fn tickets(&self, keys: &[String]) -> Result<Vec<i64>, Error> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let ticket_keys: Vec<String> = keys.iter().map(|k| format!("{TICKET_PREFIX}{k}")).collect();
        let stored: Vec<Option<String>> = redis::cmd("MGET")
            .arg(ticket_keys)
            .query_async(&mut self.connection.clone())
            .await?;
        Ok(stored
            .into_iter()
            .map(|t| t.and_then(|t| t.parse().ok()).unwrap_or(0))
            .collect())
    }

    /// Reads one key (for tests and the demo).
    pub async fn get(&self, key: &str) -> Result<Option<String>, Error> {
        Ok(redis::cmd("GET")
            .arg(key)
            .query_async(&mut self.connection.clone())
            .await?)
    }

    /// Fails unless Redis answers a PING.
    pub async fn ping(&self) -> Result<(), Error> {
        let _: String = redis::cmd("PING")
            .query_async(&mut self.connection.clone())
            .await?;
        Ok(())
    }

    /// The version of a fragment whose entries Redis holds (set after a complete sweep), or `None` when
    /// Redis has no record of it: never swept, or emptied since (restart, FLUSHALL, failover).
    pub async fn fragment_marker(&self, key_prefix: &str) -> Result<Option<u32>, Error> {
        Ok(redis::cmd("GET")
            .arg(format!("{MARKER_PREFIX}{key_prefix}"))
            .query_async(&mut self.connection.clone())
            .await?)
    }

    /// Notes that a sweep of a fragment starts; hand the token to [`RedisSink::finish_sweep`].
    pub async fn start_sweep(&self, key_prefix: &str) -> Result<String, Error> {
        let token = format!("{:016x}", fastrand::u64(..));
        let _: () = redis::cmd("SET")
            .arg(format!("{SWEEPING_PREFIX}{key_prefix}"))
            .arg(&token)
            .query_async(&mut self.connection.clone())
            .await?;
        Ok(token)
    }

    /// Records that every entry of a fragment was rendered by `version`, unless Redis lost its data
    /// since [`RedisSink::start_sweep`] (then the sweep's early pages are gone, and the missing marker
    /// calls for another). Returns whether the marker was set.
    pub async fn finish_sweep(
        &self,
        key_prefix: &str,
        token: &str,
        version: u32,
    ) -> Result<bool, Error> {
        let set: i64 = Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then
                 redis.call('SET', KEYS[2], ARGV[2])
                 redis.call('DEL', KEYS[1])
                 return 1
             end
             return 0",
        )
        .key(format!("{SWEEPING_PREFIX}{key_prefix}"))
        .key(format!("{MARKER_PREFIX}{key_prefix}"))
        .arg(token)
        .arg(version)
        .invoke_async(&mut self.connection.clone())
        .await?;
        Ok(set == 1)
    }

    /// Records that every entry of a fragment was rendered by `version` (tests, and tools that fill
    /// Redis by other means).
    pub async fn set_fragment_marker(&self, key_prefix: &str, version: u32) -> Result<(), Error> {
        let _: () = redis::cmd("SET")
            .arg(format!("{MARKER_PREFIX}{key_prefix}"))
            .arg(version)
            .query_async(&mut self.connection.clone())
            .await?;
        Ok(())
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
