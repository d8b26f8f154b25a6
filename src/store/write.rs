//! The ticket-checked write. Beside every fragment key Redis keeps a ticket key holding the render
//! ticket of the value stored; one call of `write.lua` applies many writes, refusing each whose ticket
//! is older than the stored one, so a slow render of old data never overwrites a newer one. The
//! fragment itself stays a string any client can `GET`, in the bytes its storage encodes. In a cluster one script call may only
//! touch one hash slot, so a batch is split by slot and the calls sent concurrently (the connection
//! to each node pipelines them).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::time::Duration;

use futures_util::{StreamExt, stream};
use redis::Value;
use redis::cluster_routing::Slot;

use super::{Eviction, RedisStore};
use crate::Error;

/// Keys per script call: large enough to make round trips rare, small enough that one call does not
/// stall other Redis clients noticeably. Below 2,000: `write.lua` passes up to four arguments per
/// key to one command, and Lua's `unpack` stops short of 8,000 (measured: 1,999 keys pass).
const KEYS_PER_CALL: usize = 1000;

/// Script calls in flight at once on a cluster, where a batch becomes one call per hash slot.
const CLUSTER_CALLS_IN_FLIGHT: usize = 256;

/// How long the ticket of a deleted fragment is kept, to refuse a late write of a render that started
/// before the delete. Renders take milliseconds; a day is a wide margin that still frees the memory.
const TOMBSTONE_MILLIS: u64 = 24 * 60 * 60 * 1000;

/// The codes of Redis's refusals that concern the server rather than a key: out of memory under
/// `noeviction`, a read-only replica, writes stopped after a failed save.
const SERVER_REFUSALS: [&str; 3] = ["OOM", "READONLY", "MISCONF"];

/// Whether Redis's error text (its code first) is a refusal of the server's: one of
/// [`SERVER_REFUSALS`], or an ACL that denies the user a command the writes run, which refuses
/// every key alike (where one that denies a key refuses that key alone). Redis words that
/// "NOPERM ... no permissions to run the 'set' command", and inside a script (Redis 7.0) "ERR The
/// user executing the script can't run this command or subcommand".
fn refused_by_server(error: &str) -> bool {
    let code = error.split_whitespace().next().unwrap_or_default();
    SERVER_REFUSALS.contains(&code)
        || error.contains("no permissions to run the")
        || error.contains("can't run this command")
}

/// One write for [`RedisStore::write`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub enum Write {
    /// Store this value under this key.
    Set {
        /// Fragment key, as stored.
        key: String,
        /// The rendered HTML, as stored.
        value: Vec<u8>,
        /// How long the entry lives, if not forever.
        ttl: Option<Duration>,
    },
    /// The row is gone: delete the key.
    Delete {
        /// Fragment key.
        key: String,
    },
}

impl Write {
    /// The fragment key written.
    pub(crate) fn key(&self) -> &str {
        match self {
            Write::Set { key, .. } | Write::Delete { key } => key,
        }
    }
}

/// What happened to one [`Write`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
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

impl RedisStore {
    /// Applies writes taken under one render ticket, in as few round trips as the batch allows.
    /// Results come back in the order of `writes` (owned, or borrowed from a larger batch). A
    /// refusal that concerns the server, not a key (out of memory, read-only), fails the whole call,
    /// as Redis being down does: every key would fail alike, and a change must not count an attempt,
    /// nor be parked, for it.
    pub(crate) async fn write(
        &self,
        ticket: i64,
        writes: &[impl Borrow<Write> + Sync],
    ) -> Result<Vec<WriteResult>, Error> {
        let results = self.write_all(ticket, writes).await?;
        for result in &results {
            if let WriteResult::Failed(reason) = result {
                let reason = reason.strip_prefix("error: ").unwrap_or(reason);
                if refused_by_server(reason) {
                    return Err(Error::RedisRefused {
                        reason: reason.to_string(),
                    });
                }
            }
        }
        Ok(results)
    }

    async fn write_all(
        &self,
        ticket: i64,
        writes: &[impl Borrow<Write> + Sync],
    ) -> Result<Vec<WriteResult>, Error> {
        if !self.is_cluster() {
            let mut results = Vec::with_capacity(writes.len());
            for chunk in writes.chunks(KEYS_PER_CALL) {
                results.extend(
                    self.write_call(ticket, chunk.iter().map(Borrow::borrow))
                        .await?,
                );
            }
            return Ok(results);
        }
        // One call per slot (and per KEYS_PER_CALL keys within a slot), all in flight together.
        let mut by_slot: HashMap<Slot, Vec<usize>> = HashMap::new();
        for (index, write) in writes.iter().map(Borrow::borrow).enumerate() {
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
                    .write_call(ticket, indices.iter().map(|&i| writes[i].borrow()))
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
        let mut invocation = self.write_script.prepare_invoke();
        let may_evict = self.eviction.load() != Eviction::Impossible;
        invocation
            .arg(ticket)
            .arg(TOMBSTONE_MILLIS)
            .arg(if may_evict { "1" } else { "0" });
        for write in writes {
            let (op, value, ttl): (_, &[u8], _) = match write {
                Write::Set { value, ttl, .. } => {
                    let millis = ttl.map_or(0, |ttl| ttl.as_millis().max(1));
                    ("s", value, millis)
                }
                Write::Delete { .. } => ("d", b"", 0),
            };
            invocation
                .key(write.key())
                .key(self.layout.ticket(write.key()))
                .arg(op)
                .arg(value)
                .arg(ttl.to_string());
        }
        let replies: Vec<Value> = invocation
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(|error| {
                // The script stopped at a write Redis refused as a whole (a `redis.call`).
                match error.code() {
                    Some(code) if refused_by_server(code) => {
                        let detail = error.detail().unwrap_or_default();
                        // Redis names the script's line after the message; the message is enough.
                        let detail = detail.split(" script: ").next().unwrap_or_default();
                        Error::RedisRefused {
                            reason: format!("{code} {detail}"),
                        }
                    }
                    _ => error.into(),
                }
            })?;
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

    /// For each write, whether Redis already holds exactly its value, confirmed under `ticket`: one
    /// MGET of the entries and their tickets, then one small script that raises each ticket still as
    /// read to `ticket` (the value itself is not sent again). A sweep leaves such entries alone instead
    /// of sending them through the ticket-checked script, with the same effect: no render older than
    /// `ticket` lands on them later. An entry whose ticket changed in between, or is missing while
    /// Redis may evict, is not held and takes the checked write. Deletes and writes with a TTL (which
    /// must renew it) are never held. On a cluster nothing is held: every write takes the checked path.
    pub(crate) async fn held(&self, ticket: i64, writes: &[Write]) -> Result<Vec<bool>, Error> {
        let candidate = |write: &Write| matches!(write, Write::Set { ttl: None, .. });
        if self.is_cluster() || !writes.iter().any(candidate) {
            return Ok(vec![false; writes.len()]);
        }
        let may_evict = self.eviction.load() != Eviction::Impossible;
        let mut held = Vec::with_capacity(writes.len());
        for chunk in writes.chunks(KEYS_PER_CALL) {
            let ticket_keys: Vec<String> =
                chunk.iter().map(|w| self.layout.ticket(w.key())).collect();
            let mut read = redis::cmd("MGET");
            for (write, ticket_key) in chunk.iter().zip(&ticket_keys) {
                read.arg(write.key()).arg(ticket_key);
            }
            let stored: Vec<Option<Vec<u8>>> =
                read.query_async(&mut self.connection.clone()).await?;
            let mut confirm = self.confirm_script.prepare_invoke();
            confirm.arg(ticket);
            let mut asked = Vec::new();
            for (index, (write, pair)) in chunk.iter().zip(stored.chunks(2)).enumerate() {
                let (value, seen) = (&pair[0], &pair[1]);
                let same = match write {
                    Write::Set {
                        value: wanted,
                        ttl: None,
                        ..
                    } => value.as_ref() == Some(wanted),
                    _ => false,
                };
                if same && (seen.is_some() || !may_evict) {
                    confirm
                        .key(&ticket_keys[index])
                        .arg(seen.as_deref().unwrap_or_default());
                    asked.push(index);
                }
            }
            let mut chunk_held = vec![false; chunk.len()];
            if !asked.is_empty() {
                let confirmed: Vec<i64> =
                    confirm.invoke_async(&mut self.connection.clone()).await?;
                for (index, confirmed) in asked.into_iter().zip(confirmed) {
                    chunk_held[index] = confirmed == 1;
                }
            }
            held.extend(chunk_held);
        }
        Ok(held)
    }

    /// Whether Redis holds each of these fragment keys' entry or its ticket (a live entry, or one
    /// deleted within the day), in one round trip (one per node in a cluster).
    pub(crate) async fn holds(&self, keys: &[String]) -> Result<Vec<bool>, Error> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let tickets = keys.iter().map(|k| self.layout.ticket(k));
        let both: Vec<String> = keys.iter().cloned().chain(tickets).collect();
        let stored: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(both)
            .query_async(&mut self.connection.clone())
            .await?;
        let (entries, tickets) = stored.split_at(keys.len());
        Ok(entries
            .iter()
            .zip(tickets)
            .map(|(entry, ticket)| entry.is_some() || ticket.is_some())
            .collect())
    }

    /// The render tickets stored beside these fragment keys (`None` where there is none), in one round
    /// trip (one per node in a cluster).
    pub(crate) async fn tickets(&self, keys: &[String]) -> Result<Vec<Option<i64>>, Error> {
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
}

/// One line for a script reply that is not a result code.
fn describe_reply(reply: redis::Value) -> String {
    match reply {
        redis::Value::BulkString(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        redis::Value::SimpleString(text) => text,
        other => format!("unexpected reply {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::refused_by_server;

    #[test]
    fn a_denied_command_is_the_server_s_refusal_and_a_denied_key_is_the_key_s() {
        for server in [
            "OOM command not allowed when used memory > 'maxmemory'.",
            "READONLY You can't write against a read only replica.",
            "NOPERM this user has no permissions to run the 'set' command",
            "NOPERM User pgfresh has no permissions to run the 'set' command",
            "ERR The user executing the script can't run this command or subcommand",
        ] {
            assert!(refused_by_server(server), "{server}");
        }
        for key in [
            "NOPERM this user has no permissions to access one of the keys used as arguments",
            "NOPERM No permissions to access a key",
            "ERR The user executing the script can't access at least one of the keys mentioned in the command",
            "WRONGTYPE Operation against a key holding the wrong kind of value",
        ] {
            assert!(!refused_by_server(key), "{key}");
        }
    }
}
