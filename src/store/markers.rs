//! Per-fragment markers: `pgfresh:fragment:<key prefix>` holds the fragment version of its last
//! complete sweep (one per master in a cluster, since each may lose its data on its own). A missing
//! marker means Redis came back empty or was never filled, or a sweep of another version did not
//! finish; an older one, that the markup changed. A sweep sets a canary of its own when it starts,
//! notes the version it renders as the latest sweep's, and deletes a marker of another version
//! (`start_sweep.lua`); it sets the marker when it ends, only if its canary survived and no sweep of
//! another version started since (`finish_sweep.lua`), so a Redis emptied during the sweep is
//! noticed, while sweeps of one version at once (a one-off `sweep` beside a listener's) each
//! complete. Beside them,
//! which servers answered when a listener last looked (their run ids, in Redis too): a Redis that
//! restarted from a snapshot or failed over to a replica may hold less than was written to it, with
//! its markers, and the listener that notices forgets them.

use std::collections::HashMap;

use redis::Script;
use redis::Value;
use redis::cluster_routing::Slot;

use super::RedisStore;
use crate::Error;

impl RedisStore {
    /// The version of a fragment whose entries Redis holds (set after a complete sweep), or `None` when
    /// Redis has no record of it: never swept, or emptied since (restart, FLUSHALL, failover). In a
    /// cluster, one answer per master: each may have lost its data on its own.
    pub(crate) async fn fragment_markers(
        &self,
        key_prefix: &str,
    ) -> Result<Vec<Option<u32>>, Error> {
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

    /// Notes that a sweep of a fragment by `version` starts; hand the token to
    /// [`RedisStore::finish_sweep`]. A marker of another version goes now, before the sweep writes
    /// anything (`start_sweep.lua`): a sweep that does not finish (its process killed) leaves
    /// entries of two versions, and no marker may then say they all hold one.
    pub(crate) async fn start_sweep(
        &self,
        key_prefix: &str,
        version: u32,
    ) -> Result<String, Error> {
        let token = format!("{:016x}", fastrand::u64(..));
        let script = Script::new(include_str!("start_sweep.lua"));
        for anchor in self.anchors().await? {
            let _: i64 = script
                .key(self.layout.canary(key_prefix, anchor, &token))
                .key(self.layout.marker(key_prefix, anchor))
                .key(self.layout.latest_sweep(key_prefix, anchor))
                .arg(&token)
                .arg(version)
                .invoke_async(&mut self.connection.clone())
                .await?;
        }
        Ok(token)
    }

    /// Records that every entry of a fragment was rendered by `version`, unless Redis lost its data
    /// since [`RedisStore::start_sweep`] (then the sweep's early pages are gone, and the missing marker
    /// calls for another). Returns whether the marker was set (on every master of a cluster).
    pub(crate) async fn finish_sweep(
        &self,
        key_prefix: &str,
        token: &str,
        version: u32,
    ) -> Result<bool, Error> {
        let script = Script::new(include_str!("finish_sweep.lua"));
        let mut all_set = true;
        for anchor in self.anchors().await? {
            let set: i64 = script
                .key(self.layout.canary(key_prefix, anchor, token))
                .key(self.layout.marker(key_prefix, anchor))
                .key(self.layout.latest_sweep(key_prefix, anchor))
                .arg(token)
                .arg(version)
                .invoke_async(&mut self.connection.clone())
                .await?;
            all_set &= set == 1;
        }
        Ok(all_set)
    }

    /// Which servers answer now: the run id of every node, sorted and joined. A restart (from an
    /// RDB or AOF file, which may be older than what was written since) or a failover to another
    /// server changes it.
    pub(crate) async fn servers(&self) -> Result<String, Error> {
        let info: Value = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut self.connection.clone())
            .await?;
        let mut texts = Vec::new();
        super::eviction::collect_texts(&info, &mut texts);
        let mut ids: Vec<&str> = texts
            .iter()
            .flat_map(|text| text.lines())
            .filter_map(|line| line.strip_prefix("run_id:"))
            .map(str::trim)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.is_empty() {
            return Err(Error::Internal("INFO server gave no run_id".into()));
        }
        Ok(ids.join(","))
    }

    /// What [`RedisStore::note_servers`] last recorded for each of these fragments, in Redis itself
    /// (`None`: never, or lost with the rest of Redis's data).
    pub(crate) async fn noted_servers(
        &self,
        key_prefixes: &[&str],
    ) -> Result<Vec<Option<String>>, Error> {
        let keys: Vec<String> = key_prefixes
            .iter()
            .map(|prefix| self.layout.servers(prefix))
            .collect();
        Ok(redis::cmd("MGET")
            .arg(keys)
            .query_async(&mut self.connection.clone())
            .await?)
    }

    /// Records in Redis which servers answer now ([`RedisStore::servers`]) for a fragment.
    pub(crate) async fn note_servers(&self, key_prefix: &str, servers: &str) -> Result<(), Error> {
        self.set(&self.layout.servers(key_prefix), servers).await
    }

    /// Deletes a fragment's markers (every master's in a cluster): what Redis holds of it can no
    /// longer be vouched for, and the next look at the markers finds it due for a sweep. The note of
    /// the latest sweep's version goes too, so that a sweep under way (another listener's, a
    /// one-off), whose canary may have come back with the rest, does not set the marker again.
    pub(crate) async fn forget_markers(&self, key_prefix: &str) -> Result<(), Error> {
        for anchor in self.anchors().await? {
            let _: () = redis::cmd("DEL")
                .arg(self.layout.marker(key_prefix, anchor))
                .arg(self.layout.latest_sweep(key_prefix, anchor))
                .query_async(&mut self.connection.clone())
                .await?;
        }
        Ok(())
    }

    /// Records that every entry of a fragment was rendered by `version` (tests, and tools that fill
    /// Redis by other means).
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub(crate) async fn set_fragment_marker(
        &self,
        key_prefix: &str,
        version: u32,
    ) -> Result<(), Error> {
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
    pub(crate) async fn anchors(&self) -> Result<Vec<Option<Slot>>, Error> {
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
