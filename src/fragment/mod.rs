//! The fragment API: what a user writes to have pgfresh keep some HTML fresh in Redis.
//!
//! A [`Fragment`] names the topics it reacts to, its variants, the Redis key of each (key, variant), a
//! batched loader, a maud render function and a keyset enumeration of every key for the sweep.
//! [`Fragments`] is the set a binary serves, checked once. The rest of pgfresh sees fragments through
//! the object-safe view in `erased`, which works on keys as text (as they come out of the queue) so
//! that one listener serves many fragment types.

mod erased;

use std::fmt::Display;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;

use maud::Markup;
use tokio_postgres::Client;

pub(crate) use erased::{DynFragment, KeyOutcome, panic_message};

/// What a loader returns: each key that still has a row, with that row.
pub type Loaded<F> =
    Result<Vec<(<F as Fragment>::Key, <F as Fragment>::Row)>, tokio_postgres::Error>;

/// One kind of pre-rendered HTML, kept in Redis for every key of its source rows.
///
/// The loader and the key enumeration receive a [`Client`] that may be inside pgfresh's transaction:
/// they should only read. See `examples/shop/product_card.rs` for a complete implementation.
pub trait Fragment: Send + Sync + 'static {
    /// The parsed key: the value of the watched key column. Its `Display` must give back the text form
    /// that the trigger queued (`key_column::text`), and `FromStr` must parse it.
    type Key: Clone + Eq + std::hash::Hash + Display + FromStr + Send + Sync;
    /// Everything one render needs, loaded for a whole batch at once.
    type Row: Send + Sync;

    /// Unique name, used by `sweep --fragment`, `render` and in logs.
    fn name(&self) -> &str;

    /// Topics (as given to `pgfresh.watch`) whose changes may change this fragment.
    fn topics(&self) -> &[&str];

    /// Variants rendered for every key, e.g. `["compact", "full"]`. At least one.
    fn variants(&self) -> &[&str];

    /// Every Redis key of this fragment starts with this prefix, and nothing else under it belongs to
    /// anyone else: the sweep deletes keys under it whose row no longer exists.
    fn key_prefix(&self) -> &str;

    /// Changes when the markup changes, so that a deploy replaces entries rendered by older code.
    fn version(&self) -> u32 {
        1
    }

    /// The Redis key for one (key, variant). It must start with [`Fragment::key_prefix`].
    fn redis_key(&self, key: &Self::Key, variant: &str) -> String {
        format!("{}{key}:{variant}", self.key_prefix())
    }

    /// Loads the rows for a batch of keys in as few queries as possible (e.g. `WHERE id = ANY($1)`).
    /// A key missing from the result has no row any more: its entries are deleted from Redis.
    fn load(&self, db: &Client, keys: &[Self::Key]) -> impl Future<Output = Loaded<Self>> + Send;

    /// Renders one variant of one row. Splice row data (maud escapes it); never `PreEscaped` it.
    fn render(&self, key: &Self::Key, row: &Self::Row, variant: &str) -> Markup;

    /// Keyset pagination over every key that has a row, in a stable order: up to `limit` keys after
    /// `after` (from the start when `None`).
    fn keys_after(
        &self,
        db: &Client,
        after: Option<&Self::Key>,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<Self::Key>, tokio_postgres::Error>> + Send;

    /// How many keys there are, if cheap to tell (e.g. `SELECT count(*)`): the sweep's progress bar
    /// then shows an ETA. `None` (the default) shows progress without one.
    fn count_keys(
        &self,
        _db: &Client,
    ) -> impl Future<Output = Result<Option<i64>, tokio_postgres::Error>> + Send {
        async { Ok(None) }
    }
}

/// The fragments one binary serves, checked once for mistakes that would otherwise show up as
/// mysterious Redis contents (two fragments sharing a prefix, a fragment with no variant).
#[derive(Clone, Default)]
pub struct Fragments {
    all: Vec<Arc<dyn DynFragment>>,
    /// Mistakes found by [`Fragments::with`], reported by [`Fragments::validate`] as one clear error
    /// instead of a panic at start-up.
    problems: Vec<String>,
}

impl Fragments {
    /// An empty set: enough for `install`, `uninstall` and `status`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a fragment. A malformed one (no variant, empty name or prefix, a duplicate name, or a key
    /// prefix overlapping another fragment's) is left out and reported by [`Fragments::validate`].
    pub fn with<F: Fragment>(mut self, fragment: F) -> Self {
        match self.check(&fragment) {
            Ok(()) => self.all.push(Arc::new(fragment)),
            Err(problem) => self.problems.push(format!(
                "fragment {:?}: {problem}",
                Fragment::name(&fragment)
            )),
        }
        self
    }

    /// Fails with the first mistake [`Fragments::with`] found.
    pub fn validate(&self) -> Result<(), crate::Error> {
        match self.problems.first() {
            Some(problem) => Err(crate::Error::Fragment(problem.clone())),
            None => Ok(()),
        }
    }

    fn check(&self, new: &dyn DynFragment) -> Result<(), String> {
        if new.name().is_empty()
            || new.key_prefix().is_empty()
            || new.variants().is_empty()
            || new.topics().is_empty()
        {
            return Err(
                "name, key prefix, at least one variant and at least one topic are required".into(),
            );
        }
        // The sweep deletes orphans under a fragment's prefix: a prefix that pgfresh's own keys start
        // with (`pg`, `pgfresh`), or one inside them, would have it delete its tickets and markers.
        let own = crate::store::BOOKKEEPING_PREFIX;
        if new.key_prefix().starts_with(own) || own.starts_with(new.key_prefix()) {
            return Err(format!(
                "key prefix {:?} overlaps pgfresh's own keys ({own}*); choose a prefix that neither starts {own} nor is the start of it",
                new.key_prefix()
            ));
        }
        for old in &self.all {
            if old.name() == new.name() {
                return Err("another fragment has the same name".into());
            }
            if old.key_prefix().starts_with(new.key_prefix())
                || new.key_prefix().starts_with(old.key_prefix())
            {
                return Err(format!("key prefix overlaps that of {}", old.name()));
            }
        }
        Ok(())
    }

    /// Only the fragment named `name`, or an error listing the names there are.
    pub fn only(&self, name: &str) -> Result<Fragments, crate::Error> {
        match self.get(name) {
            Some(fragment) => Ok(Fragments {
                all: vec![fragment.clone()],
                problems: Vec::new(),
            }),
            None => Err(crate::Error::Fragment(format!(
                "no fragment named {name:?}; this binary has: {}",
                self.names()
            ))),
        }
    }

    /// Every fragment, in the order added.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<dyn DynFragment>> {
        self.all.iter()
    }

    /// The fragment with this name.
    pub(crate) fn get(&self, name: &str) -> Option<&Arc<dyn DynFragment>> {
        self.all.iter().find(|f| f.name() == name)
    }

    /// The fragments subscribed to a topic.
    pub(crate) fn for_topic<'a>(
        &'a self,
        topic: &'a str,
    ) -> impl Iterator<Item = &'a Arc<dyn DynFragment>> + 'a {
        self.all.iter().filter(move |f| f.topics().contains(&topic))
    }

    /// Names of all fragments, for error messages.
    pub fn names(&self) -> String {
        let names: Vec<&str> = self.all.iter().map(|f| f.name()).collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }

    /// True when no fragment was added.
    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }
}
