//! The object-safe view of a registered [`Fragment`] that the listener and the sweep work with: keys
//! as text, loads and renders of a whole batch at once, a panic in user code turned into a failure of
//! its key, and the user's errors sorted into lost connections (retry the batch) and failures (of its
//! keys), transient ones (a lock timeout, a serialization failure) told apart for a caller waiting.

use std::collections::HashMap;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};

use futures_util::FutureExt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use deadpool_postgres::{ClientWrapper, StatementCache};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use super::statements::{self, Session};
use super::topics::{self, Mapping, Topic};
use super::{Fragment, Variant};
use crate::pg::statements::Kept;
use crate::store::{Format, Storage};

/// A boxed future, as returned by the object-safe fragment methods.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a batch refresh found for one requested key (as text).
#[derive(Debug)]
pub(crate) enum KeyOutcome {
    /// The row exists: the rendered HTML of every variant, by Redis key (the storage's).
    Rendered(Vec<(String, String)>),
    /// The row is gone: these Redis keys must be deleted.
    Gone(Vec<String>),
    /// This key cannot be refreshed (it does not parse, or its render panicked); the others can.
    Failed(String),
    /// This key was loaded only together with keys whose rows fail the loader, and was not told
    /// apart from them: try it again soon, apart from them, with no attempt counted.
    Unresolved(String),
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

/// Why user code could not load: the connection went away (retry the whole batch later, counting
/// no attempt); the server said the statement may succeed if run again (a failure of the keys asked
/// for, like the next, but one that a caller waiting for an answer should ask again for); or
/// anything else (a failure of the keys asked for). Each holds one line saying so.
#[derive(Debug)]
pub(crate) enum LoadError {
    Connection(String),
    Transient(String),
    Failed(String),
}

/// A call into user code that failed or panicked, sorted: what it means for the keys, and whether
/// the cause may lie in one key's row (a panic, a value that does not convert, a data exception), so
/// that loading the keys in smaller groups would find which.
struct Caught {
    error: LoadError,
    in_the_data: bool,
}

impl Caught {
    /// Sorts what `what` (the load, the key enumeration) of `fragment` failed with. A client that is
    /// now closed means a lost connection, whatever the error says (wrapped in `anyhow` or an error
    /// of the user's own, the driver's error may not be found in its chain); so does the server's
    /// word that it is going away. Otherwise the server's error, where one is in the chain, says
    /// whether the cause may lie in the data.
    fn sort(
        fragment: &str,
        what: &str,
        db: &Client,
        error: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        let error: Box<dyn std::error::Error + Send + Sync> = error.into();
        if db.is_closed() {
            return Self::connection_lost(&error.to_string());
        }
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&*error);
        while let Some(current) = cause {
            if let Some(postgres) = current.downcast_ref::<tokio_postgres::Error>() {
                let reason = crate::error::describe_postgres(postgres);
                return match postgres.as_db_error() {
                    Some(server) => Self::sort_server(fragment, what, server.code(), reason),
                    // A value that does not convert (a NULL read as non-null, say): some row's.
                    None => Self::failed(fragment, what, reason, true),
                };
            }
            if let Some(server) = current.downcast_ref::<tokio_postgres::error::DbError>() {
                let reason = server.message().to_string();
                return Self::sort_server(fragment, what, server.code(), reason);
            }
            cause = current.source();
        }
        Self::failed(fragment, what, error.to_string(), true)
    }

    /// The server's error of class `code`: going away (08 connection exceptions, 57P the server
    /// shutting down or ending the session), in the data (22: a bad cast, a division by zero),
    /// transient (below), or failing every key alike (a missing table or grant, a syntax error).
    fn sort_server(fragment: &str, what: &str, code: &SqlState, reason: String) -> Self {
        let code = code.code();
        if code.starts_with("08") || code.starts_with("57P") {
            return Self::connection_lost(&reason);
        }
        if is_transient(code) {
            return Caught {
                error: LoadError::Transient(format!("{what} of {fragment} failed: {reason}")),
                in_the_data: false,
            };
        }
        Self::failed(fragment, what, reason, code.starts_with("22"))
    }

    fn failed(fragment: &str, what: &str, reason: String, in_the_data: bool) -> Self {
        Caught {
            error: LoadError::Failed(format!("{what} of {fragment} failed: {reason}")),
            in_the_data,
        }
    }

    /// A call that ran in a savepoint of the caller's transaction ended that transaction.
    fn transaction_ended(fragment: &str, what: &str, reason: &str) -> Self {
        Caught {
            error: LoadError::Connection(format!(
                "{what} of {fragment} ended the transaction pgfresh ran it in ({reason}): it must only read"
            )),
            in_the_data: false,
        }
    }

    fn connection_lost(reason: &str) -> Self {
        Caught {
            error: LoadError::Connection(format!("PostgreSQL: {reason}")),
            in_the_data: false,
        }
    }

    /// A panic: in the data, unless the connection is gone (a loader's `expect` on a query).
    fn panicked(
        fragment: &str,
        what: &str,
        db: &Client,
        panic: &Box<dyn std::any::Any + Send>,
    ) -> Self {
        let message = panic_message(panic);
        if db.is_closed() {
            return Self::connection_lost(message);
        }
        Caught {
            error: LoadError::Failed(format!("{what} of {fragment} panicked: {message}")),
            in_the_data: true,
        }
    }
}

/// Whether an error of SQLSTATE `code` says the statement may well succeed if run again, whatever
/// the keys: a serialization failure (a hot standby's recovery conflict is one), a deadlock, a
/// lock timeout. Not a statement timeout (57014), nor the server's limits (class 53: a
/// `temp_file_limit`, too few lock slots): one key's load may meet those every time.
fn is_transient(code: &str) -> bool {
    matches!(code, "40001" | "40P01" | "55P03")
}

/// A session user code runs on, and what each call into user code runs in: nothing more than the
/// session; a transaction of its own, behind a connection pooler (see `Database::behind_pooler`),
/// where a statement prepared outside a transaction may be run on another server session than the
/// one that prepared it; or a savepoint of the caller's transaction, when user code runs inside a
/// claim (behind a pooler, see `listener::batch::render_changes`). On a direct session, the
/// session's statement cache too, for [`crate::CachedStatements`].
#[derive(Clone, Copy)]
pub(crate) struct UserClient<'a> {
    pub(crate) client: &'a Client,
    each_call: EachCall,
    statements: Option<(&'a Arc<StatementCache>, &'a Kept)>,
    /// Set when a call ended the caller's transaction it ran in (in savepoints).
    ended: Option<&'a AtomicBool>,
}

/// What a call into user code runs in, beyond the session.
#[derive(Clone, Copy, PartialEq, Eq)]
enum EachCall {
    /// The session as it is (in the caller's transaction, or one statement at a time).
    AsItIs,
    /// A transaction of its own, committed when the call succeeds.
    Transaction,
    /// A savepoint in the caller's transaction, rolled back to when the call ends, whether it
    /// succeeded or failed (user code only reads, and what it read is in hand): a failing call,
    /// or one that ignored an error of its own, leaves the transaction usable, and nothing the
    /// call set (`SET LOCAL`, a role, a lock) outlives it.
    Savepoint,
}

/// The statement that ends a call's savepoint (see [`EachCall::Savepoint`]).
const END_SAVEPOINT: &str = "ROLLBACK TO pgfresh_user_code; RELEASE pgfresh_user_code";

impl EachCall {
    /// The statements that open and end a call's scope: (open, succeeded, failed).
    fn statements(self) -> Option<(&'static str, &'static str, &'static str)> {
        match self {
            EachCall::AsItIs => None,
            EachCall::Transaction => Some(("BEGIN", "COMMIT", "ROLLBACK")),
            EachCall::Savepoint => {
                Some(("SAVEPOINT pgfresh_user_code", END_SAVEPOINT, END_SAVEPOINT))
            }
        }
    }
}

impl<'a> UserClient<'a> {
    /// A session from `db`'s user pool (or its standby's).
    pub(crate) async fn of(
        db: &'a crate::pg::Database,
        session: &'a ClientWrapper,
    ) -> Result<Self, crate::Error> {
        let kept = db.kept_statements().await?.filter(|kept| kept.allowed());
        Ok(UserClient {
            client: session,
            each_call: match kept {
                Some(_) => EachCall::AsItIs,
                None => EachCall::Transaction,
            },
            statements: kept.map(|kept| (&session.statement_cache, kept)),
            ended: None,
        })
    }

    /// A session already in a transaction of the caller's.
    pub(crate) fn in_transaction(client: &'a Client) -> Self {
        UserClient {
            client,
            each_call: EachCall::AsItIs,
            statements: None,
            ended: None,
        }
    }

    /// A session in a transaction of the caller's, which each call must leave usable whether it
    /// succeeds or fails: each runs in a savepoint. A call that ends the transaction itself (a
    /// `COMMIT` of its own) fails as a lost connection would, and sets `ended`.
    pub(crate) fn in_savepoints(client: &'a Client, ended: &'a AtomicBool) -> Self {
        UserClient {
            client,
            each_call: EachCall::Savepoint,
            statements: None,
            ended: Some(ended),
        }
    }

    /// What a call into user code on this session may keep prepared.
    fn session(&self) -> Option<Session> {
        let (cache, kept) = self.statements?;
        Some(Session::new(self.client, cache.clone(), kept.clone()))
    }
}

/// Runs `call`, a call into user code, turning its panic or its error into a [`Caught`]: user code
/// fails, it does not take the listener's task down with it. The call runs in what `db` says: a
/// transaction of its own or a savepoint, ended as the call succeeded or failed.
async fn guarded<T, E>(
    fragment: &str,
    what: &str,
    db: UserClient<'_>,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, Caught>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let client = db.client;
    let scope = db.each_call.statements();
    if let Some((open, _, _)) = scope {
        client
            .batch_execute(open)
            .await
            .map_err(|error| Caught::sort(fragment, what, client, error))?;
    }
    let result = match statements::within(db.session(), AssertUnwindSafe(call).catch_unwind()).await
    {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(Caught::sort(fragment, what, client, error)),
        Err(panic) => Err(Caught::panicked(fragment, what, client, &panic)),
    };
    if let Some((_, succeeded, failed)) = scope {
        let end = if result.is_ok() { succeeded } else { failed };
        let ended = client.batch_execute(end).await;
        match (&result, ended) {
            // The session is gone: the call's own error says why.
            (Err(caught), Err(_)) if matches!(caught.error, LoadError::Connection(_)) => {}
            // Its savepoint could not be rolled back to: user code ended the caller's
            // transaction (a COMMIT of its own), or the session is gone. Either way the
            // transaction cannot settle the batch: the batch rolls back, as when the connection
            // is lost, and nothing is lost with it.
            (_, Err(error)) if db.each_call == EachCall::Savepoint => {
                let reason = crate::error::describe_postgres(&error);
                if client.is_closed() {
                    return Err(Caught::connection_lost(&reason));
                }
                if let Some(ended) = db.ended {
                    ended.store(true, Ordering::Relaxed);
                }
                return Err(Caught::transaction_ended(fragment, what, &reason));
            }
            (Ok(_), Err(error)) => return Err(Caught::sort(fragment, what, client, error)),
            _ => {}
        }
    }
    result
}

/// Extra loads one batch may spend halving a load that failed in its data, to find the keys that
/// fail: two per halving, so one bad key among 4,096 is found, while a loader that fails on every
/// key costs a batch at most this many more loads.
const SPLITTING_LOADS: usize = 24;

impl From<LoadError> for crate::Error {
    fn from(error: LoadError) -> Self {
        match error {
            LoadError::Connection(reason)
            | LoadError::Transient(reason)
            | LoadError::Failed(reason) => crate::Error::Fragment(reason),
        }
    }
}

/// The object-safe view of a registered fragment that the listener and the sweep work with.
pub(crate) trait DynFragment: Send + Sync {
    /// See [`Fragment::name`].
    fn name(&self) -> &str;
    /// The topics that reach it, as [`Fragment::topics`] gave them.
    fn topics(&self) -> &[Topic];
    /// The topic its own keys are queued under, by pgfresh (fanned-out keys, keys to render again):
    /// `fragment:<name>`, which no watched table can use.
    fn own_topic(&self) -> &str;
    /// How keys of `topic` become this fragment's keys; `None` if the topic does not reach it.
    fn mapping(&self, topic: &str) -> Option<&Mapping>;
    /// The variants' names, in order.
    fn variants(&self) -> &[&'static str];
    /// Where its entries live in Redis: the key prefix it was registered with, as its storage
    /// stores it (`shop:product_card:`, or `:1:shop:product_card:` in Django's format). The sweep
    /// deletes orphans under it and keeps its marker by it.
    fn key_prefix(&self) -> &str;
    /// The key prefix as registered, before the storage's.
    fn registered_prefix(&self) -> &str;
    /// How its entries are stored.
    fn storage(&self) -> &Storage;
    /// Where its entries are, in a line that differs whenever two storages would not share entries:
    /// `:1:shop:product_card:* (django)`. Listeners compare it.
    fn stored_at(&self) -> String {
        let format = match self.storage().format() {
            Format::Plain => "plain",
            Format::Django { .. } => "django",
        };
        format!("{}* ({format})", self.key_prefix())
    }
    /// Whether its storage was given at registration ([`Fragments::with_storage`]), rather than
    /// left to [`Fragments::stored_as`].
    ///
    /// [`Fragments::with_storage`]: super::Fragments::with_storage
    /// [`Fragments::stored_as`]: super::Fragments::stored_as
    fn has_own_storage(&self) -> bool;
    /// The same fragment, stored as `storage` (its default storage, not its own).
    fn stored_as(&self, storage: Storage) -> Arc<dyn DynFragment>;
    /// See [`Fragment::version`].
    fn version(&self) -> u32;
    /// Loads and renders every variant of each key (text form), one outcome per key, in input order.
    /// An `Err` means the load itself failed and nothing was rendered.
    fn render_keys<'a>(
        &'a self,
        db: UserClient<'a>,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<RenderedKeys, LoadError>>;
    /// The Redis keys of every variant of a key (text form), or `None` if it does not parse.
    fn redis_keys(&self, key: &str) -> Option<Vec<String>>;
    /// See [`Fragment::count_keys`].
    fn count_keys<'a>(
        &'a self,
        db: UserClient<'a>,
    ) -> BoxFuture<'a, Result<Option<i64>, LoadError>>;
    /// Keyset pagination over all keys, in text form. See [`Fragment::keys_after`].
    fn keys_after<'a>(
        &'a self,
        db: UserClient<'a>,
        after: Option<&'a str>,
        limit: i64,
    ) -> BoxFuture<'a, Result<Vec<String>, crate::Error>>;
}

/// What [`Registered::load_isolating`] found: rows by key, the keys whose load failed, and those
/// loaded only with keys that failed, none told apart within the budget, each with why.
struct Loads<F: Fragment> {
    rows: HashMap<F::Key, F::Row>,
    failed: HashMap<F::Key, String>,
    unresolved: HashMap<F::Key, String>,
}

/// A fragment as registered: the user's value, its key prefix and storage, and what it said about
/// itself once.
pub(crate) struct Registered<F> {
    fragment: Arc<F>,
    registered_prefix: String,
    storage: Storage,
    own_storage: bool,
    /// `registered_prefix` as `storage` stores it.
    key_prefix: String,
    topics: Vec<Topic>,
    own_topic: String,
    variants: Vec<&'static str>,
}

impl<F: Fragment> Registered<F> {
    /// Registers `fragment` under `key_prefix`, stored as `storage` when it is given (its own),
    /// else plain until [`DynFragment::stored_as`] says otherwise.
    pub(crate) fn new(fragment: F, key_prefix: String, storage: Option<Storage>) -> Self {
        let own_storage = storage.is_some();
        let storage = storage.unwrap_or_default();
        Self::shared(Arc::new(fragment), key_prefix, storage, own_storage)
    }

    fn shared(
        fragment: Arc<F>,
        registered_prefix: String,
        storage: Storage,
        own_storage: bool,
    ) -> Self {
        Self {
            topics: fragment.topics().into_list(),
            own_topic: topics::own_topic(fragment.name()),
            variants: F::Variant::ALL.iter().map(|v| v.name()).collect(),
            key_prefix: storage.redis_key(&registered_prefix),
            fragment,
            registered_prefix,
            storage,
            own_storage,
        }
    }

    fn redis_key(&self, key: &F::Key, variant: &str) -> String {
        // Both formats keep the registered prefix's place at the start: `<prefix><key>:<variant>`.
        format!("{}{key}:{variant}", self.key_prefix)
    }

    /// Loads the rows of `keys`. A load that fails in its data (see [`Caught`]) is split in halves,
    /// and those again, level by level, until the keys that fail are alone or [`SPLITTING_LOADS`]
    /// are spent: one bad row fails its own key, not every key loaded with it. Keys still in a
    /// failing group when the budget is spent are unresolved (tried again soon, apart, with no
    /// attempt counted: most of them are likely fine). A load that fails every key alike (no split
    /// helps; a transient error) fails the call, or after a split its own group; a lost connection
    /// always fails the call.
    async fn load_isolating(
        &self,
        db: UserClient<'_>,
        keys: Vec<F::Key>,
    ) -> Result<Loads<F>, LoadError> {
        let mut loads = Loads {
            rows: HashMap::new(),
            failed: HashMap::new(),
            unresolved: HashMap::new(),
        };
        let mut parts = std::collections::VecDeque::new();
        if !keys.is_empty() {
            parts.push_back(keys);
        }
        let mut budget = SPLITTING_LOADS;
        let mut split = false;
        while let Some(mut part) = parts.pop_front() {
            let load = self.fragment.load(db.client, &part);
            let loaded = guarded(self.name(), "load", db, load).await;
            let reason = match loaded {
                Ok(rows) => {
                    loads.rows.extend(rows);
                    continue;
                }
                Err(Caught {
                    error: LoadError::Failed(reason),
                    in_the_data,
                }) => {
                    if in_the_data && part.len() > 1 {
                        if budget < 2 {
                            let unresolved = part.into_iter().map(|key| (key, reason.clone()));
                            loads.unresolved.extend(unresolved);
                            continue;
                        }
                        budget -= 2;
                        split = true;
                        let second = part.split_off(part.len() / 2);
                        parts.extend([part, second]);
                        continue;
                    }
                    reason
                }
                // After a split, an error the server calls transient fails its own group, as any
                // other failure there does: the groups loaded already, and those still to load,
                // keep their outcomes. Before one, it fails the call as what it is.
                Err(Caught {
                    error: LoadError::Transient(reason),
                    ..
                }) if split => reason,
                Err(Caught { error, .. }) => return Err(error),
            };
            if !split {
                return Err(LoadError::Failed(reason));
            }
            let reason = match part.as_slice() {
                [key] => format!("{reason} (key {key} alone)"),
                _ => reason,
            };
            loads
                .failed
                .extend(part.into_iter().map(|key| (key, reason.clone())));
        }
        Ok(loads)
    }

    /// Renders every variant of one row, turning a panic in user code into a failure of this key.
    fn render_variants(&self, key: &F::Key, row: &F::Row) -> KeyOutcome {
        let rendered = catch_unwind(AssertUnwindSafe(|| {
            F::Variant::ALL
                .iter()
                .map(|&variant| {
                    let html = self.fragment.render(key, row, variant).into_string();
                    (self.redis_key(key, variant.name()), html)
                })
                .collect()
        }));
        match rendered {
            Ok(entries) => KeyOutcome::Rendered(entries),
            Err(panic) => KeyOutcome::Failed(format!(
                "render of {} key {key} panicked: {}",
                self.name(),
                panic_message(&panic)
            )),
        }
    }
}

impl<F: Fragment> DynFragment for Registered<F> {
    fn name(&self) -> &str {
        self.fragment.name()
    }

    fn topics(&self) -> &[Topic] {
        &self.topics
    }

    fn own_topic(&self) -> &str {
        &self.own_topic
    }

    fn mapping(&self, topic: &str) -> Option<&Mapping> {
        if topic == self.own_topic {
            return Some(&Mapping::Direct);
        }
        let found = self.topics.iter().find(|t| t.name == topic);
        found.map(|t| &t.mapping)
    }

    fn variants(&self) -> &[&'static str] {
        &self.variants
    }

    fn key_prefix(&self) -> &str {
        &self.key_prefix
    }

    fn registered_prefix(&self) -> &str {
        &self.registered_prefix
    }

    fn storage(&self) -> &Storage {
        &self.storage
    }

    fn has_own_storage(&self) -> bool {
        self.own_storage
    }

    fn stored_as(&self, storage: Storage) -> Arc<dyn DynFragment> {
        Arc::new(Self::shared(
            self.fragment.clone(),
            self.registered_prefix.clone(),
            storage,
            false,
        ))
    }

    fn version(&self) -> u32 {
        self.fragment.version()
    }

    fn render_keys<'a>(
        &'a self,
        db: UserClient<'a>,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<RenderedKeys, LoadError>> {
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
            let Loads {
                mut rows,
                mut failed,
                mut unresolved,
            } = self.load_isolating(db, distinct).await?;
            let loaded = Instant::now();
            let outcomes = keys
                .iter()
                .zip(&parsed)
                .enumerate()
                .map(|(index, (text, key))| match key {
                    None => KeyOutcome::Failed(format!(
                        "key {text:?} does not parse as a {} key",
                        self.name()
                    )),
                    Some(key) if first_at[key] != index => KeyOutcome::SameAs(first_at[key]),
                    Some(key) if failed.contains_key(key) => {
                        KeyOutcome::Failed(failed.remove(key).expect("checked above"))
                    }
                    Some(key) if unresolved.contains_key(key) => {
                        KeyOutcome::Unresolved(unresolved.remove(key).expect("checked above"))
                    }
                    Some(key) => match rows.remove(key) {
                        Some(row) => self.render_variants(key, &row),
                        None => KeyOutcome::Gone(
                            self.variants
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
            self.variants
                .iter()
                .map(|variant| self.redis_key(&key, variant))
                .collect(),
        )
    }

    fn count_keys<'a>(
        &'a self,
        db: UserClient<'a>,
    ) -> BoxFuture<'a, Result<Option<i64>, LoadError>> {
        Box::pin(async move {
            let count = self.fragment.count_keys(db.client);
            let counted = guarded(self.name(), "count", db, count).await;
            counted.map_err(|caught| caught.error)
        })
    }

    fn keys_after<'a>(
        &'a self,
        db: UserClient<'a>,
        after: Option<&'a str>,
        limit: i64,
    ) -> BoxFuture<'a, Result<Vec<String>, crate::Error>> {
        Box::pin(async move {
            let after = match after {
                None => None,
                Some(text) => Some(text.parse::<F::Key>().map_err(|_| {
                    crate::Error::Fragment(format!(
                        "{}: key {text:?} from keys_after does not parse back",
                        self.name()
                    ))
                })?),
            };
            let listed = self.fragment.keys_after(db.client, after.as_ref(), limit);
            let keys = guarded(self.name(), "key enumeration", db, listed)
                .await
                .map_err(|caught| caught.error)?;
            Ok(keys.iter().map(ToString::to_string).collect())
        })
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
