//! PostgreSQL connections: two pools, and the dedicated connection that LISTENs (a pool would
//! swallow notifications).
//!
//! pgfresh's own statements (claims, settles, the registry, `status`, `doctor`, ...) run on sessions
//! whose `search_path` is pinned to `pg_catalog, pg_temp`, so that no function or operator of
//! anyone's schema (a database owner can create in `public`, and set the database's path) can stand
//! in for PostgreSQL's own when pgfresh runs as a superuser. User code (loaders, key enumerations,
//! through queries) runs with the user's own settings, on a pool of its own: it names its tables as
//! the application does.
//!
//! Behind a transaction pooler (PgBouncer with `pool_mode = transaction`), a session is not
//! pgfresh's from one transaction to the next. The pooler refuses the `options` startup parameter
//! (or, told to, ignores it), so pgfresh finds out on its first connection and from then on sends
//! no startup settings: its sessions run with the server's defaults for the role, keep nothing
//! between transactions, and user code runs inside transactions of its own, or, for a batch's
//! loads, in savepoints of the transaction that claimed it (see [`Database::behind_pooler`]). What
//! needs a session (`LISTEN`) gets a direct connection of its own when one is given
//! ([`Database::with_session_url`]).
//!
//! The pools hand out the session returned last, close on request those long unused
//! ([`Database::close_idle`]), and end a dropped session with a Terminate ([`EndsCleanly`]), which
//! [`Database::close`] gives a moment before the process exits; every connection has TCP
//! keepalives and a user timeout unless its string says otherwise ([`with_defaults`]).

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, QueueMode, RecyclingMethod, Runtime};
use tokio_postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::task::TaskTracker;

use super::conninfo::{ConnInfo, redact_unparsed};
use super::standby::Standby;
use super::statements::Kept;
use super::tls::PostgresTls;
use crate::Error;
use crate::config::Environment;

/// How long a connection attempt may take before it counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A PostgreSQL database: its parsed configuration, and pools of connections to it: one for pgfresh's
/// own statements, one (with your settings) for your loaders and your own queries.
#[derive(Clone)]
pub struct Database {
    /// The user's settings, plus the pinned `search_path`: pgfresh's own sessions.
    config: Config,
    url: String,
    /// pgfresh's own statements.
    pinned: Pool,
    /// User code: loaders, key enumerations, and what [`Database::get`] hands out.
    users: Pool,
    /// Both kinds of sessions as the user's settings alone make them: behind a pooler.
    plain_pinned: Pool,
    plain_users: Pool,
    /// Whether PostgreSQL is reached through a transaction pooler, found on the first connection.
    pooler: Arc<tokio::sync::OnceCell<bool>>,
    /// Whether sessions may keep prepared statements (when not behind a pooler).
    kept: Kept,
    /// A direct connection for what needs a session of its own (`LISTEN`), when given.
    session: Option<SessionServer>,
    connector: MakeRustlsConnect,
    /// The tasks running the pooled sessions' connections, which [`Database::close`] waits for.
    connections: TaskTracker,
    /// A hot standby for loads, when given.
    standby: Option<Arc<Standby>>,
    /// The primary's system identifier, read when a standby is first used.
    primary_identifier: Arc<tokio::sync::OnceCell<String>>,
}

/// What pgfresh's pooled sessions always run with. The listener's own writes (deleting done changes,
/// its idle flag) need no fsync: losing them in a crash only means a change is rendered again. And its
/// queries are short lookups by key, for which JIT compilation never pays: with misleading statistics
/// it was seen to add 180 ms to a 20 ms load.
const POOLED_OPTIONS: &str = "-c synchronous_commit=off -c jit=off";

/// The same settings for one transaction, where a pooler takes no startup options: the listener's
/// claim transactions (their commit is the one that would wait for its WAL flush; their through
/// queries are the JIT's to compile).
pub(crate) const POOLED_SETTINGS_LOCAL: &str =
    "SET LOCAL synchronous_commit = off; SET LOCAL jit = off";

/// What every session running pgfresh's own statements runs with, after the user's options so that
/// nothing overrides it: PostgreSQL's own functions and operators, and no one else's.
const PINNED_OPTIONS: &str = "-c search_path=pg_catalog,pg_temp";

/// The `search_path` pgfresh's own sessions run with (see [`PINNED_OPTIONS`]).
pub(crate) const PINNED_SEARCH_PATH: &str = "pg_catalog, pg_temp";

/// Connection settings pgfresh honours itself rather than passing them to tokio-postgres.
const HANDLED_HERE: &[&str] = &[
    "sslmode",
    "sslrootcert",
    "passfile",
    "fallback_application_name",
];

/// libpq settings tokio-postgres knows: passed on as given.
const PASSED_ON: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "options",
    "application_name",
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
    "sslnegotiation",
];

impl Database {
    /// Parses the connection string (a URL or libpq key=value pairs) and builds pools of at most
    /// `pool_size` connections each (pgfresh's own statements, and user code), with nothing taken
    /// from the environment. Connects lazily: call [`Database::check`] to fail early with a clear
    /// message.
    pub fn new(url: &str, pool_size: usize) -> Result<Self, Error> {
        Self::with_environment(url, pool_size, &Environment::none())
    }

    /// Like [`Database::new`], filling what the string leaves out as libpq does: from the `PG*`
    /// variables and the password file of `environment`, then pgfresh's defaults (host 127.0.0.1,
    /// port 5432, user postgres, database named as the user).
    pub fn with_environment(
        url: &str,
        pool_size: usize,
        environment: &Environment,
    ) -> Result<Self, Error> {
        let info = resolve(url, environment)?;
        let shown = info.shown();
        let invalid = |reason: String| invalid_url(shown.clone(), reason);
        let tls = PostgresTls::from_settings(
            info.get("sslmode"),
            info.get("sslrootcert"),
            environment.home(),
        )
        .map_err(invalid)?;
        let mut config: Config = info
            .to_tokio_postgres(HANDLED_HERE)
            .parse()
            .map_err(|e: tokio_postgres::Error| invalid(crate::error::describe_postgres(&e)))?;
        config.ssl_mode(tls.mode);
        with_defaults(&info, &mut config);
        let connector = tls.connector();
        let connections = TaskTracker::new();
        let pool = |config: Config| build_pool(config, &connector, &connections, pool_size);
        let users = pool(with_options(&config, POOLED_OPTIONS, ""));
        let plain_pinned = pool(config.clone());
        let plain_users = pool(config.clone());
        let config = with_options(&config, "", PINNED_OPTIONS);
        let pinned = pool(with_options(&config, POOLED_OPTIONS, ""));
        Ok(Self {
            config,
            url: shown,
            pinned,
            users,
            plain_pinned,
            plain_users,
            pooler: Arc::new(tokio::sync::OnceCell::new()),
            kept: Kept::default(),
            session: None,
            connector,
            connections,
            standby: None,
            primary_identifier: Arc::new(tokio::sync::OnceCell::new()),
        })
    }

    /// The same database, with a direct connection (`url`, read as the main one is) for what needs
    /// a session of its own: the listener's `LISTEN`, when the main URL leads through a transaction
    /// pooler that would hand each notification to whichever client it serves next.
    pub fn with_session_url(mut self, url: &str, environment: &Environment) -> Result<Self, Error> {
        let (config, url, connector) = other_server(url, environment)?;
        self.session = Some(SessionServer {
            config: with_options(&config, "", PINNED_OPTIONS),
            url,
            connector,
        });
        Ok(self)
    }

    /// The same database, with a hot standby of it (`url`, read as the main one is, TLS included)
    /// for loads: each batch and sweep page loads there once the standby has replayed the batch's
    /// changes, waiting up to `max_wait` for it, and from the primary otherwise (see
    /// `pg::standby`).
    pub fn with_replica_url(
        mut self,
        url: &str,
        environment: &Environment,
        max_wait: Duration,
    ) -> Result<Self, Error> {
        let (config, shown, connector) = other_server(url, environment)?;
        let size = self.users.status().max_size;
        let options = with_options(&config, POOLED_OPTIONS, super::standby::SESSION_MARK);
        let pool = build_pool(options, &connector, &self.connections, size);
        self.standby = Some(Arc::new(Standby::new(shown, pool, max_wait)));
        Ok(self)
    }

    /// The hot standby loads may go to, when one was given.
    pub(crate) fn standby(&self) -> Option<Arc<Standby>> {
        self.standby.clone()
    }

    /// A render ticket, then a session for loads under it ([`Database::loads`]): what a sweep page
    /// and an on-demand render start with. The primary's session is held for those two alone.
    pub(crate) async fn ticket_and_loads(&self) -> Result<(i64, deadpool_postgres::Object), Error> {
        let primary = self.pinned().await?;
        let ticket = super::queue::take_ticket(&primary).await?;
        Ok((ticket, self.loads(&primary).await?))
    }

    /// A session for a sweep page's (or an on-demand render's) loads, with your settings: on the
    /// standby when one was given and it has replayed every commit the primary had made when this
    /// is called (`primary`, a session on the primary, after the caller took its ticket), on the
    /// primary otherwise.
    pub(crate) async fn loads(&self, primary: &Client) -> Result<deadpool_postgres::Object, Error> {
        match self.standby_loads(primary).await? {
            Some(session) => Ok(session),
            None => self.get().await,
        }
    }

    /// A session on the standby for loads, as [`Database::loads`] would choose it; `None` when
    /// there is no standby, or it is not to be used for these loads.
    pub(crate) async fn standby_loads(
        &self,
        primary: &Client,
    ) -> Result<Option<deadpool_postgres::Object>, Error> {
        let Some(standby) = &self.standby else {
            return Ok(None);
        };
        let identifier = self
            .primary_identifier
            .get_or_try_init(|| super::standby::system_identifier(primary))
            .await?;
        Ok(standby.session_at(primary, identifier).await.ok())
    }

    /// Whether a direct session URL was given ([`Database::with_session_url`]).
    pub(crate) fn has_session_url(&self) -> bool {
        self.session.is_some()
    }

    /// Whether PostgreSQL is reached through a connection pooler, found out on the first connection:
    /// the pooler refused pgfresh's startup options (PgBouncer: "unsupported startup parameter"), or
    /// took them and ignored them (`ignore_startup_parameters = options`: the session's
    /// `search_path` is not the one pgfresh pinned). Then pgfresh sends no startup settings, relies
    /// on no session state between transactions, and runs user code inside transactions (named
    /// prepared statements live no longer than one there).
    pub(crate) async fn behind_pooler(&self) -> Result<bool, Error> {
        self.pooler
            .get_or_try_init(|| self.detect_pooler())
            .await
            .copied()
    }

    /// Whether statements may be prepared once and kept with the session: not behind a pooler
    /// (`None`), and then as long as no session lost one ([`Kept`]).
    pub(crate) async fn kept_statements(&self) -> Result<Option<&Kept>, Error> {
        Ok((!self.behind_pooler().await?).then_some(&self.kept))
    }

    async fn detect_pooler(&self) -> Result<bool, Error> {
        let found = match self.pinned.get().await {
            Err(deadpool_postgres::PoolError::Backend(error))
                if crate::error::describe_postgres(&error)
                    .contains("unsupported startup parameter") =>
            {
                Some("refused")
            }
            Err(error) => return Err(self.pool_error(error)),
            Ok(client) => {
                let path: String = client
                    .query_typed_one("SELECT pg_catalog.current_setting('search_path')", &[])
                    .await?
                    .get(0);
                // PostgreSQL reports the path as it was given: compare it without the spaces.
                (path.replace(' ', "") != PINNED_SEARCH_PATH.replace(' ', "")).then_some("ignored")
            }
        };
        if let Some(how) = found {
            tracing::info!(
                url = %self.url,
                "PostgreSQL is reached through a connection pooler (it {how} pgfresh's startup settings): pgfresh keeps no session state between transactions there, and runs loaders in transactions of their own (a batch's, in savepoints of its claim)"
            );
        }
        Ok(found.is_some())
    }

    /// The URL with its password removed, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database name, for messages.
    pub fn name(&self) -> String {
        self.config
            .get_dbname()
            .or(self.config.get_user())
            .unwrap_or("postgres")
            .to_string()
    }

    /// A pooled connection with your settings (your `search_path`, your `options`): what loaders
    /// are given, and what a program of yours can use for its own queries. Or an error saying
    /// PostgreSQL is unreachable.
    /// Behind a transaction pooler, a statement with parameters must run inside a transaction, or
    /// with `query_typed` (tokio-postgres's `query` prepares a named statement first, which the
    /// pooler may send to another server connection than the one that runs it).
    pub async fn get(&self) -> Result<deadpool_postgres::Object, Error> {
        match self.behind_pooler().await? {
            false => self.take(&self.users).await,
            true => self.take(&self.plain_users).await,
        }
    }

    /// The sizes of its two pools: pgfresh's own statements, and user code.
    pub(crate) fn pool_sizes(&self) -> (usize, usize) {
        (self.pinned.status().max_size, self.users.status().max_size)
    }

    /// Holds at most `size` connections for user code (what a command needs differs between the
    /// two pools).
    pub(crate) fn limit_user_sessions(&self, size: usize) {
        self.users.resize(size.max(1));
        self.plain_users.resize(size.max(1));
        if let Some(standby) = &self.standby {
            standby.resize(size);
        }
    }

    /// Closes the pooled sessions not handed out for `lifetime`, all but the one returned last of
    /// each pool, and returns how many it closed. The pools hand out the session returned last, so
    /// under a steady load the same few stay in use, and those opened for a moment's peak (a sweep,
    /// a burst of misses) wait unused: closed, they no longer hold a backend of the server. (Time
    /// counts from a session's last hand-out, which is what deadpool records: one held longer than
    /// `lifetime` and not returned last is closed at the next call.) One session of each pool stays,
    /// however long unused, so that the first batch after a quiet spell does not wait to connect.
    pub(crate) fn close_idle(&self, lifetime: Duration) -> usize {
        self.pools()
            .map(|pool| close_idle_sessions(pool, lifetime))
            .sum()
    }

    /// Closes every pool, and gives the sessions' connections up to a second to end as
    /// PostgreSQL expects (each its Terminate, and over TLS the close of the TLS session); returns
    /// how many were still open then, left to be cut. Call it last, before the process exits: a
    /// runtime dropped with connections open cuts them, and a server reached over TLS logs each
    /// ("could not receive data from client: Connection reset by peer"). An idle session ends at
    /// once; one still held ends when returned, and one whose statement still runs on the server
    /// (a stalled batch's, a render's that outlived its request) cannot end cleanly and is cut.
    /// Every clone of this database is closed with it, and none hands out a session after this.
    pub async fn close(&self) -> usize {
        for pool in self.pools() {
            pool.close();
        }
        self.connections.close();
        if tokio::time::timeout(CLOSING_WAIT, self.connections.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let open = self.connections.len();
        tracing::info!(
            sessions = open,
            "PostgreSQL sessions still running a statement when closed were cut"
        );
        open
    }

    /// Every pool, the standby's included.
    fn pools(&self) -> impl Iterator<Item = &Pool> {
        let own = [
            &self.pinned,
            &self.users,
            &self.plain_pinned,
            &self.plain_users,
        ];
        own.into_iter()
            .chain(self.standby.as_ref().map(|standby| standby.pool()))
    }

    /// A pooled connection for pgfresh's own statements, its `search_path` pinned to
    /// `pg_catalog, pg_temp` (unless [`Database::behind_pooler`]): never for user code, which would
    /// not find its tables.
    pub(crate) async fn pinned(&self) -> Result<deadpool_postgres::Object, Error> {
        match self.behind_pooler().await? {
            false => self.take(&self.pinned).await,
            true => self.take(&self.plain_pinned).await,
        }
    }

    /// A new session for pgfresh's own statements, opened as the pool's are (and so ended cleanly
    /// when dropped) but not taken from it: for a last statement at shutdown, which the session
    /// returned last might keep waiting behind a statement of an aborted task.
    pub(crate) async fn fresh_pinned(&self) -> Result<deadpool_postgres::ClientWrapper, Error> {
        use deadpool::managed::Manager as _;
        let pool = match self.behind_pooler().await? {
            false => &self.pinned,
            true => &self.plain_pinned,
        };
        pool.manager()
            .create()
            .await
            .map_err(|e| self.connect_error(&e))
    }

    async fn take(&self, pool: &Pool) -> Result<deadpool_postgres::Object, Error> {
        pool.get().await.map_err(|e| self.pool_error(e))
    }

    fn pool_error(&self, error: deadpool_postgres::PoolError) -> Error {
        use deadpool_postgres::{PoolError, TimeoutType};
        // Every error in making a new pooled connection is a connection error, the server's own
        // (a wrong password, a missing database) included, and says which server it was.
        match error {
            PoolError::Backend(e) => self.connect_error(&e),
            PoolError::Timeout(TimeoutType::Create | TimeoutType::Recycle) => {
                Error::PostgresConnect {
                    url: self.url.clone(),
                    reason: format!("no connection within {CONNECT_TIMEOUT:?}"),
                }
            }
            other => Error::Pool(other),
        }
    }

    /// Opens a connection outside the pools for pgfresh's own statements (`search_path` pinned),
    /// and hands back its connection half, for the caller to drive (the LISTEN connection reads
    /// notifications from it): to the session URL when one is given.
    pub(crate) async fn connect_raw(
        &self,
        application_name: &str,
    ) -> Result<
        (
            Client,
            tokio_postgres::Connection<tokio_postgres::Socket, super::tls::TlsStream>,
        ),
        Error,
    > {
        let (mut config, connector) = match &self.session {
            Some(session) => (session.config.clone(), session.connector.clone()),
            None => (self.config.clone(), self.connector.clone()),
        };
        config.application_name(application_name);
        config
            .connect(connector)
            .await
            .map_err(|e| connect_error(self.listen_url(), &e))
    }

    /// Where [`Database::connect_raw`] connects, password removed, for messages: the session URL
    /// when one was given.
    pub(crate) fn listen_url(&self) -> &str {
        self.session
            .as_ref()
            .map_or(self.url.as_str(), |session| session.url.as_str())
    }

    /// Fails with a clear message unless PostgreSQL answers.
    pub async fn check(&self) -> Result<(), Error> {
        self.pinned().await?.simple_query("SELECT 1").await?;
        Ok(())
    }

    fn connect_error(&self, error: &tokio_postgres::Error) -> Error {
        connect_error(&self.url, error)
    }
}

/// A failed connection to the server at `url` (password removed), in one line.
fn connect_error(url: &str, error: &tokio_postgres::Error) -> Error {
    let url = url.to_string();
    let reason = crate::error::describe_postgres(error);
    if reason.contains("invalid peer certificate") {
        Error::PostgresCertificate { url, reason }
    } else {
        Error::PostgresConnect { url, reason }
    }
}

/// Reads the connection string and fills what it leaves out as libpq does: the `PG*` variables, the
/// password file, then pgfresh's defaults. Refuses settings pgfresh would have to ignore.
fn resolve(url: &str, environment: &Environment) -> Result<ConnInfo, Error> {
    let mut info = ConnInfo::parse(url)
        .map_err(|reason| invalid_url(redact_unparsed(url), reason))?
        .with_environment(|name| environment.var(name))
        .with_defaults();
    if info.get("password").is_none() {
        match info.password_from_file(environment.home()) {
            Ok(Some(password)) => info.set("password", &password),
            Ok(None) => {}
            Err(warning) => tracing::warn!("{warning}"),
        }
    }
    if let Some(keyword) = info
        .keywords()
        .find(|k| !HANDLED_HERE.contains(k) && !PASSED_ON.contains(k))
    {
        return Err(invalid_url(
            info.shown(),
            format!(
                "pgfresh does not support the connection option {keyword}, and will not connect with less than it asks for; remove it"
            ),
        ));
    }
    if info.get("application_name").is_none() {
        let name = info
            .get("fallback_application_name")
            .unwrap_or("pgfresh")
            .to_string();
        info.set("application_name", &name);
    }
    Ok(info)
}

/// `config` with `before` and `after` around the options it has: the user's options win over what
/// comes before them, and lose to what comes after.
fn with_options(config: &Config, before: &str, after: &str) -> Config {
    let theirs = config.get_options().unwrap_or_default();
    let options: Vec<&str> = [before, theirs, after]
        .into_iter()
        .filter(|part| !part.trim().is_empty())
        .collect();
    let mut config = config.clone();
    config.options(options.join(" "));
    config
}

/// The direct connection given for what needs a session of its own, with its own TLS settings.
#[derive(Clone)]
struct SessionServer {
    config: Config,
    /// Password removed, for messages.
    url: String,
    connector: MakeRustlsConnect,
}

/// Another server's connection string (the session URL, the standby), read as the main one is:
/// its configuration, how it is shown, and its TLS connector.
fn other_server(
    url: &str,
    environment: &Environment,
) -> Result<(Config, String, MakeRustlsConnect), Error> {
    let info = resolve(url, environment)?;
    let shown = info.shown();
    let tls = PostgresTls::from_settings(
        info.get("sslmode"),
        info.get("sslrootcert"),
        environment.home(),
    )
    .map_err(|reason| invalid_url(shown.clone(), reason))?;
    let mut config: Config =
        info.to_tokio_postgres(HANDLED_HERE)
            .parse()
            .map_err(|e: tokio_postgres::Error| {
                invalid_url(shown.clone(), crate::error::describe_postgres(&e))
            })?;
    config.ssl_mode(tls.mode);
    with_defaults(&info, &mut config);
    Ok((config, shown, tls.connector()))
}

/// Where the connection string leaves each out: a connect timeout; TCP keepalives sent after a
/// minute idle (the operating system's default, which libpq and tokio-postgres keep, is two hours);
/// and a TCP user timeout of two minutes. pgfresh's pooled sessions wait idle for long (the pools
/// keep the one returned last however long unused): a load balancer or NAT gateway that drops
/// connections idle for a few minutes would leave one that looks open, and a query sent on it would
/// wait for TCP's retransmissions to give up, a quarter of an hour. Probed every minute, an idle
/// connection stays known to the network; and data the server has not acknowledged for two minutes
/// (a batch's query sent to a server gone silently: keepalives probe only idle connections) closes
/// it, so the batch fails and is retried on a new session. A live server acknowledges what it
/// receives at once, however long its query runs.
fn with_defaults(info: &ConnInfo, config: &mut Config) {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if info.get("keepalives_idle").is_none() {
        config.keepalives_idle(KEEPALIVES_IDLE);
    }
    if info.get("keepalives_interval").is_none() {
        config.keepalives_interval(KEEPALIVES_INTERVAL);
    }
    if info.get("keepalives_count").is_none() {
        config.keepalives_retries(KEEPALIVES_COUNT);
    }
    match info
        .get("tcp_user_timeout")
        .map(|value| value.trim().parse::<u64>())
    {
        None => {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        // libpq reads milliseconds where tokio-postgres reads seconds; 0 is the system's default.
        Some(Ok(millis)) if millis > 0 => {
            config.tcp_user_timeout(Duration::from_millis(millis));
        }
        Some(_) => {}
    }
}

/// TCP keepalives where the connection string sets none (see [`with_defaults`]).
const KEEPALIVES_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVES_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVES_COUNT: u32 = 5;
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(120);

/// A pool of sessions with `config`. It hands out the session returned last, as PgBouncer reuses its
/// server connections: a steady load keeps one or two warm backends busy, where handing out the one
/// idle longest sent every batch to a backend gone cold since its last turn (a quarter more
/// PostgreSQL CPU per change at 100 changes/s, BENCHMARKS.md).
fn build_pool(
    config: Config,
    connector: &MakeRustlsConnect,
    connections: &TaskTracker,
    size: usize,
) -> Pool {
    let manager = Manager::from_connect(
        config,
        EndsCleanly(connector.clone(), connections.clone()),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size.max(1))
        .queue_mode(QueueMode::Lifo)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(CONNECT_TIMEOUT))
        .wait_timeout(Some(Duration::from_secs(30)))
        .build()
        .expect("a pool with a runtime and a size always builds")
}

/// Opens pooled sessions whose connection ends as PostgreSQL expects when the pool drops them: the
/// client's Terminate message, then (over TLS) the close of the TLS session. deadpool-postgres's own
/// way aborts the connection's task instead, and a server reached over TLS logs every such session
/// ("could not receive data from client: Connection reset by peer") after each peak whose sessions
/// [`Database::close_idle`] closes. Here the connection runs in a task of its own, which ends once
/// its client is dropped and its last request answered, or [`CLOSE_WITHIN`] after the drop if the
/// server does not answer (a network gone: the task and its socket would otherwise wait for TCP to
/// give up); what deadpool aborts is a guard whose end starts that clock. The connections' tasks are
/// tracked, so that [`Database::close`] can wait for them before the process exits (the runtime goes
/// with it, and would cut any still running).
struct EndsCleanly(MakeRustlsConnect, TaskTracker);

/// How long a dropped session's connection may take to end cleanly before it is cut.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// How long [`Database::close`] waits for the sessions' connections to end. Ending takes no reply
/// from the server (the Terminate, the TLS close), so an idle session ends in a few milliseconds
/// and one whose last reply is on its way (a dropped batch's ROLLBACK) within a round trip; a
/// session still running a statement would take as long as the statement, and is cut instead.
pub(crate) const CLOSING_WAIT: Duration = Duration::from_secs(1);

impl deadpool_postgres::Connect for EndsCleanly {
    fn connect(
        &self,
        config: &Config,
    ) -> futures_util::future::BoxFuture<
        '_,
        Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
    > {
        let (tls, config, connections) = (self.0.clone(), config.clone(), self.1.clone());
        Box::pin(async move {
            let (client, connection) = config.connect(tls).await?;
            let (guard, dropped) = tokio::sync::oneshot::channel::<()>();
            connections.spawn(async move {
                let mut connection = std::pin::pin!(connection);
                let ended = tokio::select! {
                    ended = &mut connection => ended,
                    _ = dropped => match tokio::time::timeout(CLOSE_WITHIN, connection).await {
                        Ok(ended) => ended,
                        Err(_) => return tracing::debug!("a dropped PostgreSQL session was cut"),
                    },
                };
                if let Err(error) = ended {
                    tracing::debug!(%error, "a pooled PostgreSQL session ended");
                }
            });
            let held = tokio::spawn(async move {
                let _guard = guard;
                std::future::pending::<()>().await
            });
            Ok((client, held))
        })
    }
}

/// Closes the sessions of `pool` not handed out for `lifetime`, but the one returned last; returns
/// how many it closed. Idle sessions wait in the order they were returned.
fn close_idle_sessions(pool: &Pool, lifetime: Duration) -> usize {
    let available = pool.status().available;
    let mut position = 0;
    let kept = pool.retain(|_, metrics| {
        position += 1;
        position >= available || metrics.last_used() < lifetime
    });
    kept.removed.len()
}

fn invalid_url(url: String, reason: String) -> Error {
    Error::InvalidUrl {
        what: "PostgreSQL",
        url,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalives_and_a_tcp_user_timeout_unless_the_url_says_otherwise() {
        let db = Database::new("postgres://postgres@db.internal/shop", 1).unwrap();
        assert!(db.config.get_keepalives());
        assert_eq!(db.config.get_keepalives_idle(), KEEPALIVES_IDLE);
        assert_eq!(
            db.config.get_keepalives_interval(),
            Some(KEEPALIVES_INTERVAL)
        );
        assert_eq!(db.config.get_keepalives_retries(), Some(KEEPALIVES_COUNT));
        assert_eq!(db.config.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));

        let url = "postgres://postgres@db.internal/shop?keepalives_idle=300&keepalives_count=2&tcp_user_timeout=0";
        let db = Database::new(url, 1).unwrap();
        assert_eq!(db.config.get_tcp_user_timeout(), None, "0: the system's");
        assert_eq!(db.config.get_keepalives_idle(), Duration::from_secs(300));
        assert_eq!(db.config.get_keepalives_retries(), Some(2));
        assert_eq!(
            db.config.get_keepalives_interval(),
            Some(KEEPALIVES_INTERVAL)
        );

        let db = Database::new("host=db.internal dbname=shop keepalives=0", 1).unwrap();
        assert!(!db.config.get_keepalives());

        // In milliseconds, as libpq reads it.
        let db = Database::new("host=db.internal dbname=shop tcp_user_timeout=30000", 1).unwrap();
        let timeout = db.config.get_tcp_user_timeout();
        assert_eq!(timeout, Some(&Duration::from_secs(30)));
    }
}
