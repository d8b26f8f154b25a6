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

/// Keys per script call: large enough to make round trips rare, small enough that one call does not
/// stall other Redis clients noticeably.
const KEYS_PER_CALL: usize = 1000;

/// How long the ticket of a deleted fragment is kept, to refuse a late write of a render that started
/// before the delete. Renders take milliseconds; a day is a wide margin that still frees the memory.
const TOMBSTONE_MILLIS: u64 = 24 * 60 * 60 * 1000;

const WRITE_SCRIPT: &str = r#"
-- pgfresh: version-checked writes. KEYS come in pairs (fragment key, its ticket key). ARGV[1] is the
-- render ticket, ARGV[2] how long a deleted key's ticket is kept (ms), then one (op, html) pair per
-- key pair: op 's' sets the fragment to html, 'd' deletes it.
-- Returns one code per pair: 0 written, 1 unchanged, 2 refused (a newer render is stored),
-- 3 deleted, 4 already absent.
local ticket = tonumber(ARGV[1])
local results = {}
for i = 1, #KEYS, 2 do
    local key, ticket_key = KEYS[i], KEYS[i + 1]
    local op, html = ARGV[i + 2], ARGV[i + 3]
    local stored = tonumber(redis.call('GET', ticket_key) or '0') or 0
    if stored > ticket then
        results[#results + 1] = 2
    elseif op == 's' then
        if redis.call('GET', key) == html then
            results[#results + 1] = 1
        else
            redis.call('SET', key, html)
            results[#results + 1] = 0
        end
        redis.call('SET', ticket_key, ticket)
    else
        local removed = redis.call('DEL', key)
        redis.call('SET', ticket_key, ticket, 'PX', ARGV[2])
        results[#results + 1] = removed == 1 and 3 or 4
    end
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
            let codes: Vec<u8> = invocation
                .invoke_async(&mut self.connection.clone())
                .await?;
            results.extend(codes.into_iter().map(|code| match code {
                0 => WriteResult::Written,
                1 => WriteResult::Unchanged,
                2 => WriteResult::Refused,
                3 => WriteResult::Deleted,
                _ => WriteResult::Absent,
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
            .arg(KEYS_PER_CALL)
            .query_async(&mut self.connection.clone())
            .await?;
        Ok((next, keys))
    }

    /// Reads one key (for `render --compare`, tests and the demo).
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
