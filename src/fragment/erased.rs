//! The object-safe view of a [`Fragment`] that the listener and the sweep work with: keys as text,
//! loads and renders of a whole batch at once, a panic in user code turned into a failure of its key.

use std::collections::HashMap;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::Fragment;

/// A boxed future, as returned by the object-safe fragment methods.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a batch refresh found for one requested key (as text).
#[derive(Debug)]
pub(crate) enum KeyOutcome {
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

/// What [`DynFragment::render_keys`] did: one outcome per key, and where the time went.
pub(crate) struct RenderedKeys {
    pub(crate) outcomes: Vec<KeyOutcome>,
    pub(crate) load_time: Duration,
    pub(crate) render_time: Duration,
}

/// The object-safe view of a [`Fragment`] that the listener and the sweep work with.
pub(crate) trait DynFragment: Send + Sync {
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
    ) -> BoxFuture<'a, Result<RenderedKeys, tokio_postgres::Error>>;
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
    ) -> BoxFuture<'a, Result<RenderedKeys, tokio_postgres::Error>> {
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
            let started = Instant::now();
            let mut rows: HashMap<F::Key, F::Row> = if distinct.is_empty() {
                HashMap::new()
            } else {
                self.load(db, &distinct).await?.into_iter().collect()
            };
            let loaded = Instant::now();
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
            Ok(RenderedKeys {
                outcomes,
                load_time: loaded - started,
                render_time: loaded.elapsed(),
            })
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
