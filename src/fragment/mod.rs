//! The fragment API: what a user writes to have pgfresh keep some HTML fresh in Redis.
//!
//! A [`Fragment`] says which topics reach it ([`Topics`]: directly, or through shared rows), its
//! [`Variant`]s, a batched loader, a maud render function and a keyset enumeration of every key for
//! the sweep. [`Fragments`] is the set a binary serves, each under the Redis key prefix it is
//! registered with, checked once. The rest of pgfresh sees fragments through the object-safe view in
//! `erased`, which works on keys as text (as they come out of the queue) so that one listener serves
//! many fragment types.

mod erased;
mod statements;
mod topics;

use std::fmt::Display;
use std::future::Future;
use std::hash::Hash;
use std::str::FromStr;
use std::sync::Arc;

use maud::Markup;
use tokio_postgres::Client;

use crate::store::Storage;

pub(crate) use erased::{DynFragment, KeyOutcome, LoadError, UserClient, panic_message};
pub use statements::CachedStatements;
pub(crate) use topics::Mapping;
pub use topics::Topics;

/// What a loader returns: each key that still has a row, with that row.
pub type Loaded<F> =
    Result<Vec<(<F as Fragment>::Key, <F as Fragment>::Row)>, <F as Fragment>::Error>;

/// One kind of pre-rendered HTML, kept in Redis for every key of its source rows, in every variant:
/// at `<key prefix><key>:<variant>`, the prefix given when it is registered with [`Fragments::with`]
/// (in the [`Storage`] it is registered with, plain HTML by default).
///
/// The loader and the key enumeration receive a [`Client`] that may be inside pgfresh's transaction
/// (behind a connection pooler, a batch's loads run inside the transaction that claimed it): they
/// should only read, and not end the transaction (behind a pooler, one that does fails its batch,
/// and the listener loads on sessions of its own from then on). The crate root has a complete
/// example; `examples/shop` and `examples/blog` are complete binaries.
pub trait Fragment: Send + Sync + 'static {
    /// The parsed key: the value of the watched key column. Its `Display` must give back the text form
    /// that the trigger queued (`key_column::text`), and `FromStr` must parse it.
    type Key: Clone + Eq + Hash + Display + FromStr + Send + Sync;
    /// Everything one render needs, loaded for a whole batch at once.
    type Row: Send + Sync;
    /// The variants rendered for every key, usually an enum declared with [`variants!`](crate::variants).
    type Variant: Variant;
    /// What the loader and the key enumeration fail with: `tokio_postgres::Error`, `anyhow::Error`, or
    /// an error type of your own. A failure that comes from a lost connection is retried with the whole
    /// batch; any other fails the keys loaded, which are retried and, at the limit, parked. A panic is
    /// such a failure too. When the cause may be one row's data (a panic, a value that does not
    /// convert, a data exception), pgfresh loads the keys again in halves to find the ones that fail,
    /// so one bad row never holds back the others.
    type Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send;

    /// Unique name, used by `sweep --fragment`, `render`, in logs and metrics.
    fn name(&self) -> &str;

    /// The topics (as given to `pgfresh.watch`) whose changes may change this fragment, and how their
    /// keys lead to this fragment's keys. At least one.
    fn topics(&self) -> Topics;

    /// Changes when the markup changes, so that a deploy replaces entries rendered by older code.
    fn version(&self) -> u32 {
        1
    }

    /// Loads the rows for a batch of keys in as few queries as possible (e.g. `WHERE id = ANY($1)`).
    /// A key missing from the result has no row any more: its entries are deleted from Redis.
    fn load(&self, db: &Client, keys: &[Self::Key]) -> impl Future<Output = Loaded<Self>> + Send;

    /// Renders one variant of one row. Splice row data (maud escapes it); never `PreEscaped` it.
    fn render(&self, key: &Self::Key, row: &Self::Row, variant: Self::Variant) -> Markup;

    /// Keyset pagination over every key that has a row, in a stable order: up to `limit` keys after
    /// `after` (from the start when `None`). Only an empty result ends the keys: a page of fewer
    /// than `limit` is followed by another call after its last key.
    fn keys_after(
        &self,
        db: &Client,
        after: Option<&Self::Key>,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<Self::Key>, Self::Error>> + Send;

    /// How many keys there are, if cheap to tell (e.g. `SELECT count(*)`): the sweep's progress bar
    /// then shows an ETA. `None` (the default) shows progress without one.
    fn count_keys(
        &self,
        _db: &Client,
    ) -> impl Future<Output = Result<Option<i64>, Self::Error>> + Send {
        async { Ok(None) }
    }
}

/// The variants of a fragment: a small `Copy` type, usually an enum, each value named in its Redis
/// keys. Declare one with [`variants!`](crate::variants).
pub trait Variant: Copy + Send + Sync + 'static {
    /// Every variant, rendered for every key. At least one.
    const ALL: &'static [Self];
    /// The name in Redis keys: `<prefix><key>:<name>`.
    fn name(self) -> &'static str;
}

/// Declares an enum of variants and its [`Variant`] implementation:
///
/// ```
/// pgfresh::variants! {
///     /// How a product card is shown.
///     pub enum Card { Compact = "compact", Full = "full" }
/// }
/// use pgfresh::Variant;
/// assert_eq!(Card::Full.name(), "full");
/// assert_eq!(Card::ALL.len(), 2);
/// ```
#[macro_export]
macro_rules! variants {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        $vis enum $name { $($variant),+ }

        impl $crate::Variant for $name {
            const ALL: &'static [Self] = &[$(Self::$variant),+];
            fn name(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }
    };
}

/// The fragments one binary serves, each under its Redis key prefix, checked once for mistakes that
/// would otherwise show up as mysterious Redis contents (two fragments sharing a prefix, a fragment
/// with no variant).
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

    /// Adds a fragment whose Redis keys start with `key_prefix`: nothing else may live under it, since
    /// the sweep deletes what has no row there. It is stored plain unless [`Fragments::stored_as`]
    /// (the command line's `--cache-format`) says otherwise. A malformed fragment (no variant or
    /// topic, an empty name or prefix, a duplicate name, a prefix overlapping another's or pgfresh's
    /// own) is refused: left out, and reported by [`Fragments::validate`], which every command runs
    /// first.
    pub fn with<F: Fragment>(self, key_prefix: impl Into<String>, fragment: F) -> Self {
        self.add(Arc::new(erased::Registered::new(
            fragment,
            key_prefix.into(),
            None,
        )))
    }

    /// Like [`Fragments::with`], stored as `storage` (for example [`Storage::django`]) whatever
    /// [`Fragments::stored_as`] says.
    pub fn with_storage<F: Fragment>(
        self,
        key_prefix: impl Into<String>,
        fragment: F,
        storage: Storage,
    ) -> Self {
        let registered = erased::Registered::new(fragment, key_prefix.into(), Some(storage));
        self.add(Arc::new(registered))
    }

    /// The same fragments, each registered with [`Fragments::with`] now stored as `storage` (those
    /// registered with [`Fragments::with_storage`] keep theirs), checked again: prefixes that did
    /// not overlap as registered may overlap where they are stored.
    pub fn stored_as(&self, storage: &Storage) -> Fragments {
        let mut stored = Fragments {
            problems: self.problems.clone(),
            ..Fragments::default()
        };
        for fragment in &self.all {
            let fragment = if fragment.has_own_storage() {
                fragment.clone()
            } else {
                fragment.stored_as(storage.clone())
            };
            stored = stored.add(fragment);
        }
        stored
    }

    fn add(mut self, fragment: Arc<dyn DynFragment>) -> Self {
        match self.check(&*fragment) {
            Ok(()) => self.all.push(fragment),
            Err(problem) => self
                .problems
                .push(format!("fragment {:?}: {problem}", fragment.name())),
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
            || new.registered_prefix().is_empty()
            || new.variants().is_empty()
            || new.topics().is_empty()
        {
            return Err(
                "name, key prefix, at least one variant and at least one topic are required".into(),
            );
        }
        topics::check(new.topics())?;
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
                return Err(format!(
                    "key prefix {:?} overlaps that of {} ({:?})",
                    new.key_prefix(),
                    old.name(),
                    old.key_prefix()
                ));
            }
        }
        Ok(())
    }

    /// Only the fragment named `name`, or an error listing the names there are.
    pub fn only(&self, name: &str) -> Result<Fragments, crate::Error> {
        match self.all.iter().find(|f| f.name() == name) {
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

    /// The fragments a topic reaches (directly, through shared rows, or as their own topic), each
    /// with how.
    pub(crate) fn for_topic<'a>(
        &'a self,
        topic: &'a str,
    ) -> impl Iterator<Item = (&'a Arc<dyn DynFragment>, &'a Mapping)> + 'a {
        self.all
            .iter()
            .filter_map(move |fragment| Some((fragment, fragment.mapping(topic)?)))
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
