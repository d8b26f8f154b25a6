//! Where pgfresh keeps its own keys in Redis, beside the keys they describe.
//!
//! Beside every fragment key pgfresh keeps a ticket key (the render ticket of the stored value), and
//! per fragment a marker (the version of its last complete sweep) and, during a sweep, a canary. A
//! ticket-checked write reads and writes a fragment key and its ticket key in one script, so in a
//! Redis Cluster the two must live in the same hash slot; likewise a marker and its canary.
//!
//! On a single server the layout is plain: `pgfresh:ticket:<fragment key>`,
//! `pgfresh:fragment:<key prefix>`, `pgfresh:sweeping:<key prefix>`, and `pgfresh:servers:<key
//! prefix>` (which servers answered when a listener last looked; untagged in a cluster too).
//!
//! In a cluster each bookkeeping key carries a hash tag naming the slot it must live in:
//! `pgfresh:ticket:{<tag>}<fragment key>`, where `<tag>` is a short string that hashes to the fragment
//! key's slot (see [`slot_tag`]). This works for every fragment key, including keys that carry hash
//! tags of their own or braces that are not a tag. A cluster keeps one marker and one canary per
//! master, tagged with a slot that master serves, so that a master that restarts empty is noticed even
//! when the others kept their data.

use std::collections::HashMap;
use std::sync::OnceLock;

use redis::cluster_routing::Slot;

/// Redis keys pgfresh keeps for itself start with this; fragment prefixes may not.
pub(crate) const BOOKKEEPING_PREFIX: &str = "pgfresh:";

/// Where each fragment key's render ticket is kept.
const TICKET_PREFIX: &str = "pgfresh:ticket:";

/// Where the version of each fragment's last complete sweep is kept, by key prefix.
const MARKER_PREFIX: &str = "pgfresh:fragment:";

/// Set while a listener sweeps a fragment, to tell whether Redis was emptied during the sweep.
const SWEEPING_PREFIX: &str = "pgfresh:sweeping:";

/// Which Redis servers (their run ids) answered when a listener last looked, by key prefix: kept in
/// Redis, so that one restored from an older snapshot brings back an older answer.
const SERVERS_PREFIX: &str = "pgfresh:servers:";

/// Hash slots in a Redis Cluster.
const SLOTS: usize = 16384;

/// Which layout the keys follow: a single server, or a cluster (keys carry hash tags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// One Redis server (or a primary with replicas): no hash tags.
    Server,
    /// A Redis Cluster: bookkeeping keys are tagged into the slot they belong with.
    Cluster,
}

impl Layout {
    /// The ticket key beside `key`, in the same slot.
    pub(crate) fn ticket(self, key: &str) -> String {
        match self {
            Layout::Server => format!("{TICKET_PREFIX}{key}"),
            Layout::Cluster => tagged(TICKET_PREFIX, Slot::for_key(key), key),
        }
    }

    /// The marker of the fragment with `key_prefix`; in a cluster, the one kept in `anchor`'s slot.
    pub(crate) fn marker(self, key_prefix: &str, anchor: Option<Slot>) -> String {
        self.anchored(MARKER_PREFIX, key_prefix, anchor)
    }

    /// The canary of the sweep with `token` of the fragment with `key_prefix`, in the same slot as
    /// its marker: one per sweep, so that two sweeps of a fragment at once (a one-off `sweep` beside
    /// a listener's) do not take each other's for a Redis that lost its data.
    pub(crate) fn canary(self, key_prefix: &str, anchor: Option<Slot>, token: &str) -> String {
        format!("{}:{token}", self.latest_sweep(key_prefix, anchor))
    }

    /// The version the latest sweep of the fragment with `key_prefix` renders (`v<version>`), in
    /// the same slot as its marker. (Before 2026-12-07 this key was a sweep's canary, holding its
    /// token: a sweep of either kind started beside one of the other fails the other's check.)
    pub(crate) fn latest_sweep(self, key_prefix: &str, anchor: Option<Slot>) -> String {
        self.anchored(SWEEPING_PREFIX, key_prefix, anchor)
    }

    /// Which servers answered when the fragment with `key_prefix` was last looked at (one key, on
    /// whichever master serves it).
    pub(crate) fn servers(self, key_prefix: &str) -> String {
        format!("{SERVERS_PREFIX}{key_prefix}")
    }

    fn anchored(self, base: &str, key_prefix: &str, anchor: Option<Slot>) -> String {
        match (self, anchor) {
            (Layout::Cluster, Some(slot)) => tagged(base, slot, key_prefix),
            _ => format!("{base}{key_prefix}"),
        }
    }
}

/// `<base>{<tag of slot>}<name>`: the hash tag ends at the first `}`, and tags contain no braces, so
/// the key hashes to `slot` and `name` is recovered unambiguously.
fn tagged(base: &str, slot: Slot, name: &str) -> String {
    format!("{base}{{{}}}{name}", slot_tag(slot))
}

/// A short string that hashes to `slot`. The table is fixed: the first string, in the order of
/// [`candidate`], that hashes to each slot, so every pgfresh process and version agrees on it.
pub(crate) fn slot_tag(slot: Slot) -> &'static str {
    static TAGS: OnceLock<HashMap<Slot, String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags = HashMap::with_capacity(SLOTS);
        let mut n = 0;
        while tags.len() < SLOTS {
            let tag = candidate(n);
            tags.entry(Slot::for_key(&tag)).or_insert(tag);
            n += 1;
        }
        tags
    });
    &tags[&slot]
}

/// The `n`th string over `[0-9A-Za-z]` in length-then-lexical order: "0".."z", "00".."zz", ...
fn candidate(mut n: usize) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let base = ALPHABET.len();
    let mut length = 1;
    let mut count = base;
    while n >= count {
        n -= count;
        length += 1;
        count *= base;
    }
    let mut tag = vec![b'0'; length];
    for place in tag.iter_mut().rev() {
        *place = ALPHABET[n % base];
        n /= base;
    }
    String::from_utf8(tag).expect("ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_tickets_share_the_slot_of_their_fragment_key() {
        for key in [
            "shop:product:42:card",
            "plain",
            "has:{tag}:inside",
            "has:{}:empty-tag",
            "only}closing",
            "}{",
            "{",
            "",
        ] {
            let ticket = Layout::Cluster.ticket(key);
            assert_eq!(
                Slot::for_key(&ticket),
                Slot::for_key(key),
                "{key} -> {ticket}"
            );
            assert!(ticket.ends_with(key), "{ticket}");
        }
    }

    #[test]
    fn markers_and_canaries_share_their_anchor_slot() {
        let anchor = Slot::new(5461).unwrap();
        let marker = Layout::Cluster.marker("shop:product:", Some(anchor));
        let canary = Layout::Cluster.canary("shop:product:", Some(anchor), "0123456789abcdef");
        assert_eq!(Slot::for_key(&marker), anchor);
        assert_eq!(Slot::for_key(&canary), anchor);
        assert_ne!(marker, canary);
    }

    #[test]
    fn the_server_layout_is_plain() {
        assert_eq!(
            Layout::Server.ticket("shop:product:1:card"),
            "pgfresh:ticket:shop:product:1:card"
        );
        assert_eq!(
            Layout::Server.marker("shop:product:", None),
            "pgfresh:fragment:shop:product:"
        );
    }

    #[test]
    fn slot_tags_are_fixed() {
        // Ticket keys already stored in a cluster depend on this table: it must never change. Values
        // checked against `redis-cli CLUSTER KEYSLOT` on Redis 7.0.
        assert_eq!(slot_tag(Slot::new(0).unwrap()), "06S");
        assert_eq!(slot_tag(Slot::new(16383).unwrap()), "6ZJ");
        assert_eq!(
            Layout::Cluster.ticket("shop:product:42:card"),
            "pgfresh:ticket:{0w}shop:product:42:card"
        );
        assert_eq!(
            Layout::Cluster.ticket("only}closing"),
            "pgfresh:ticket:{74c}only}closing"
        );
    }
}
