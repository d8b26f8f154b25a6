//! The fragment API: what a user writes to have pgfresh keep some HTML fresh in Redis.
//!
//! A [`Fragment`] names the topics it reacts to, its variants, the Redis key of each (key, variant), a
//! batched loader, a maud render function and a keyset enumeration of every key for the sweep. The rest of
//! pgfresh only sees fragments through the object-safe [`DynFragment`], which works on keys as text
//! (as they come out of the queue) so that one listener can serve many fragment types.

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::str::FromStr;

use maud::Markup;
use tokio_postgres::Client;

/// A boxed future, as returned by the object-safe fragment methods.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

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

/// What a batch refresh found for one requested key (as text).
#[derive(Debug)]
pub enum KeyOutcome {
    /// The row exists: the rendered HTML of every variant, by Redis key.
    Rendered(Vec<(String, String)>),
    /// The row is gone: these Redis keys must be deleted.
    Gone(Vec<String>),
    /// This key cannot be refreshed (it does not parse, or its render panicked); the others can.
    Failed(String),
    /// Another spelling of the key at this earlier index (`042` and `42`): that one's outcome holds
    /// for both, and nothing is written twice.
    SameAs(usize),
}

/// The object-safe view of a [`Fragment`] that the listener and the sweep work with.
pub trait DynFragment: Send + Sync {
    /// See [`Fragment::name`].
    fn name(&self) -> &str;
    /// See [`Fragment::topics`].
    fn topics(&self) -> &[&str];
    /// See [`Fragment::variants`].
    fn variants(&self) -> &[&str];
    /// See [`Fragment::key_prefix`].
    fn key_prefix(&self) -> &str;
    /// See [`Fragment::version`].
    fn version(&self) -> u32;
    /// Loads and renders every variant of each key (text form), one outcome per key, in input order.
    /// An `Err` means the load itself failed and nothing was rendered.
    fn render_keys<'a>(
        &'a self,
        db: &'a Client,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<KeyOutcome>, tokio_postgres::Error>>;
    /// The Redis keys of every variant of a key (text form), or `None` if it does not parse.
    fn redis_keys(&self, key: &str) -> Option<Vec<String>>;
    /// See [`Fragment::count_keys`].
    fn count_keys<'a>(
        &'a self,
        db: &'a Client,
    ) -> BoxFuture<'a, Result<Option<i64>, tokio_postgres::Error>>;
    /// Keyset pagination over all keys, in text form. See [`Fragment::keys_after`].
    fn keys_after<'a>(
        &'a self,
        db: &'a Client,
        after: Option<&'a str>,
        limit: i64,
    ) -> BoxFuture<'a, Result<Vec<String>, crate::Error>>;
}

impl<F: Fragment> DynFragment for F {
    fn name(&self) -> &str {
        Fragment::name(self)
    }

    fn topics(&self) -> &[&str] {
        Fragment::topics(self)
    }

    fn variants(&self) -> &[&str] {
        Fragment::variants(self)
    }

    fn key_prefix(&self) -> &str {
        Fragment::key_prefix(self)
    }

    fn version(&self) -> u32 {
        Fragment::version(self)
    }

    fn render_keys<'a>(
        &'a self,
        db: &'a Client,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<KeyOutcome>, tokio_postgres::Error>> {
        Box::pin(async move {
            let parsed: Vec<Option<F::Key>> = keys.iter().map(|k| k.parse().ok()).collect();
            // Each distinct key once: two spellings of one key must not load, render or write twice
            // (a second lookup of a row already taken would read as "gone", and delete it).
            let mut first_at: HashMap<&F::Key, usize> = HashMap::new();
            for (index, key) in parsed.iter().enumerate() {
                if let Some(key) = key {
                    first_at.entry(key).or_insert(index);
                }
            }
            let distinct: Vec<F::Key> = first_at.keys().map(|key| (*key).clone()).collect();
            let started = std::time::Instant::now();
            let mut rows: HashMap<F::Key, F::Row> = if distinct.is_empty() {
                HashMap::new()
            } else {
                self.load(db, &distinct).await?.into_iter().collect()
            };
            let loaded = std::time::Instant::now();
            crate::telemetry::loaded(Fragment::name(self), loaded - started);
            let outcomes = keys
                .iter()
                .zip(&parsed)
                .enumerate()
                .map(|(index, (text, key))| match key {
                    None => KeyOutcome::Failed(format!(
                        "key {text:?} does not parse as a {} key",
                        Fragment::name(self)
                    )),
                    Some(key) if first_at[key] != index => KeyOutcome::SameAs(first_at[key]),
                    Some(key) => match rows.remove(key) {
                        Some(row) => render_variants(self, key, &row),
                        None => KeyOutcome::Gone(
                            self.variants()
                                .iter()
                                .map(|v| self.redis_key(key, v))
                                .collect(),
                        ),
                    },
                })
                .collect();
            crate::telemetry::rendered(Fragment::name(self), loaded.elapsed());
            Ok(outcomes)
        })
    }

    fn redis_keys(&self, key: &str) -> Option<Vec<String>> {
        let key: F::Key = key.parse().ok()?;
        Some(
            self.variants()
                .iter()
                .map(|variant| self.redis_key(&key, variant))
                .collect(),
        )
    }

    fn count_keys<'a>(
        &'a self,
        db: &'a Client,
    ) -> BoxFuture<'a, Result<Option<i64>, tokio_postgres::Error>> {
        Box::pin(Fragment::count_keys(self, db))
    }

    fn keys_after<'a>(
        &'a self,
        db: &'a Client,
        after: Option<&'a str>,
        limit: i64,
    ) -> BoxFuture<'a, Result<Vec<String>, crate::Error>> {
        Box::pin(async move {
            let after = match after {
                None => None,
                Some(text) => Some(text.parse::<F::Key>().map_err(|_| {
                    crate::Error::Fragment(format!(
                        "{}: key {text:?} from keys_after does not parse back",
                        Fragment::name(self)
                    ))
                })?),
            };
            let keys = Fragment::keys_after(self, db, after.as_ref(), limit).await?;
            Ok(keys.iter().map(ToString::to_string).collect())
        })
    }
}

/// Renders every variant of one row, turning a panic in user code into a failure of this key alone.
fn render_variants<F: Fragment>(fragment: &F, key: &F::Key, row: &F::Row) -> KeyOutcome {
    let rendered = catch_unwind(AssertUnwindSafe(|| {
        fragment
            .variants()
            .iter()
            .map(|variant| {
                let html = fragment.render(key, row, variant).into_string();
                (fragment.redis_key(key, variant), html)
            })
            .collect()
    }));
    match rendered {
        Ok(entries) => KeyOutcome::Rendered(entries),
        Err(panic) => KeyOutcome::Failed(format!(
            "render of {} key {key} panicked: {}",
            fragment.name(),
            panic_message(&panic)
        )),
    }
}

/// The text a panic was raised with, when it has one.
pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> &str {
    if let Some(text) = panic.downcast_ref::<&str>() {
        text
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text
    } else {
        "no message"
    }
}

/// The fragments one binary serves, checked once for mistakes that would otherwise show up as
/// mysterious Redis contents (two fragments sharing a prefix, a fragment with no variant).
#[derive(Clone, Default)]
pub struct Fragments {
    all: Vec<std::sync::Arc<dyn DynFragment>>,
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
            Ok(()) => self.all.push(std::sync::Arc::new(fragment)),
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
        let own = crate::keys::BOOKKEEPING_PREFIX;
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

    /// Every fragment, in the order added.
    pub fn iter(&self) -> impl Iterator<Item = &std::sync::Arc<dyn DynFragment>> {
        self.all.iter()
    }

    /// The fragment with this name.
    pub fn get(&self, name: &str) -> Option<&std::sync::Arc<dyn DynFragment>> {
        self.all.iter().find(|f| f.name() == name)
    }

    /// The fragments subscribed to a topic.
    pub fn for_topic<'a>(
        &'a self,
        topic: &'a str,
    ) -> impl Iterator<Item = &'a std::sync::Arc<dyn DynFragment>> + 'a {
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
