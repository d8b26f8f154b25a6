//! Whether Redis may evict pgfresh's keys: read from `INFO memory` (`maxmemory`, `maxmemory-policy`),
//! shown on the status page and in `status`, and handed to every write, which then treats a missing
//! ticket as proving nothing.

use redis::Value;

use super::RedisStore;

/// Whether Redis may evict pgfresh's keys, which decides how far a missing ticket can be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
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
                "{policy}: Redis may evict keys with a TTL: pgfresh's tombstones (a render that finds no ticket is done again), and fragments stored with a TTL (missing until they change or the next sweep)"
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
pub(crate) struct EvictionState {
    state: std::sync::Mutex<(Eviction, String)>,
}

impl Default for EvictionState {
    fn default() -> Self {
        // Until Redis says otherwise, a missing ticket proves nothing.
        Self {
            state: std::sync::Mutex::new((Eviction::Unknown, "not read yet".into())),
        }
    }
}

impl EvictionState {
    pub(crate) fn load(&self) -> Eviction {
        self.state.lock().expect("eviction state lock").0
    }
}

impl RedisStore {
    /// Reads Redis's `maxmemory` and `maxmemory-policy` (every master's, in a cluster), remembers
    /// them for the writes, and returns what they allow with the policy's name. While Redis may
    /// evict, a write that finds no ticket beside its fragment cannot tell whether a newer render's
    /// ticket was evicted, so it is reported as unchecked and the key is rendered once more.
    pub(crate) async fn check_eviction(&self) -> (Eviction, String) {
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

    /// What the last [`RedisStore::check_eviction`] found.
    pub(crate) fn eviction(&self) -> (Eviction, String) {
        self.eviction
            .state
            .lock()
            .expect("eviction state lock")
            .clone()
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
pub(super) fn collect_texts(value: &Value, texts: &mut Vec<String>) {
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
