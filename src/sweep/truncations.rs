//! TRUNCATEs of watched tables waiting for a sweep (see `sql/migrations/0002_truncate.sql`), seen by
//! the fragments that subscribe to their topics: which fragments to sweep, and which TRUNCATEs a
//! completed sweep covers (deleted then, by whoever swept: a listener or the one-off `sweep`).
//! TRUNCATEs of topics no fragment here handles are left for a binary that does.

use std::sync::Arc;

use crate::Error;
use crate::fragment::{DynFragment, Fragments};
use crate::pg::{Database, truncations};

/// The TRUNCATEs recorded when read, and the fragments that subscribe to their topics.
#[derive(Default)]
pub(crate) struct Truncations {
    /// Each recorded TRUNCATE: its id, and the fragments that subscribe to its topic.
    rows: Vec<(i64, Vec<String>)>,
    /// Every fragment that subscribes to a truncated topic.
    pub(crate) fragments: Vec<Arc<dyn DynFragment>>,
}

impl Truncations {
    /// Reads the recorded TRUNCATEs; read before sweeping, so that the sweep sees the truncated rows.
    pub(crate) async fn read(db: &Database, fragments: &Fragments) -> Result<Self, Error> {
        let recorded = truncations::recorded(&*db.pinned().await?).await?;
        let mut truncated = Self::default();
        for truncation in recorded {
            let subscribers: Vec<_> = fragments
                .for_topic(&truncation.topic)
                .map(|(fragment, _)| fragment)
                .collect();
            if subscribers.is_empty() {
                continue;
            }
            let names = subscribers.iter().map(|f| f.name().to_string()).collect();
            truncated.rows.push((truncation.id, names));
            for fragment in subscribers {
                if !truncated
                    .fragments
                    .iter()
                    .any(|f| f.name() == fragment.name())
                {
                    truncated.fragments.push(fragment.clone());
                }
            }
        }
        Ok(truncated)
    }

    /// Deletes the TRUNCATEs that a completed sweep of the fragments named `swept` covers; one
    /// recorded meanwhile keeps its row.
    pub(crate) async fn settle(&self, db: &Database, swept: &[&str]) -> Result<(), Error> {
        let covered: Vec<i64> = self
            .rows
            .iter()
            .filter(|(_, subscribers)| subscribers.iter().all(|s| swept.contains(&s.as_str())))
            .map(|(id, _)| *id)
            .collect();
        if covered.is_empty() {
            return Ok(());
        }
        truncations::settle(&*db.pinned().await?, &covered).await
    }
}
